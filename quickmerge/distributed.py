"""Data parallelism through ``torch.distributed``: the process group that ``torchrun`` or
``accelerate launch`` describe in the environment, or a single process.

    ctx = distributed.setup()         # reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR
    mine = ctx.shard(range(n))        # this rank's share of n work items
    rows = ctx.gather(my_rows)        # on rank 0: every rank's rows; elsewhere None
    ctx.close()

Rank r takes items r, r + world, r + 2 world, ...; CUDA processes use NCCL on their local
device, CPU processes gloo. Without the environment variables everything runs in one
process and every call is a no-op.

Every collective here waits until the backend has let go of its tensors before returning.
A gloo worker thread drops its reference to a finished operation a moment after the caller's
``wait()`` returns; if the Python tensor is already gone by then, that drop needs the GIL, and
when it comes during interpreter shutdown (a rank that exits right after its last collective)
the process aborts ("terminate called without an active exception", SIGABRT). Holding the
tensors until the backend has released them makes the drop a plain counter decrement.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class Context:
    """This process's place in the group."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable default

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that writes results and shows progress)."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (every ``world``-th, starting at ``rank``)."""
        return list(items[self.rank :: self.world])

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable) on rank 0 (in rank order), None elsewhere."""
        if self.world == 1:
            return [obj]
        blobs = self._all_gather_bytes(pickle.dumps(obj))
        return [pickle.loads(b) for b in blobs] if self.main else None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if self.world == 1:
            return obj
        return pickle.loads(self._all_gather_bytes(pickle.dumps(obj) if self.main else b"")[0])

    def sum(self, value: float) -> float:
        """The sum of ``value`` over ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._wire)
        dist.all_reduce(t)
        _wait_until_released(t)
        return float(t)

    @property
    def _wire(self) -> torch.device:
        """Where collective tensors live: the GPU under NCCL, else the CPU."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank (sizes first, then padded payloads)."""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._wire)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        lengths = [int(s) for s in sizes]
        padded = torch.zeros(max(max(lengths), 1), dtype=torch.uint8)
        if data:
            padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        padded = padded.to(self._wire)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        blobs = [o.cpu().numpy()[:n].tobytes() for o, n in zip(out, lengths, strict=True)]
        _wait_until_released(size, *sizes, padded, *out)
        return blobs

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _wait_until_released(*tensors: torch.Tensor, timeout_s: float = 30.0) -> None:
    """Block until no one but the caller holds ``tensors`` (the backend's finished work has been dropped).

    Uses ``Tensor._use_count`` where this torch has it; without it returns at once."""
    if not hasattr(torch.Tensor, "_use_count"):
        return
    deadline = time.monotonic() + timeout_s
    while any(t._use_count() > 1 for t in tensors) and time.monotonic() < deadline:
        time.sleep(0.0005)


def setup() -> Context:
    """Join the process group described by the environment (``torchrun``, ``accelerate launch``), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Context(rank, world, device)
