"""Data parallelism through ``torch.distributed``: the process group that ``torchrun`` or
``accelerate launch`` describe in the environment, or a single process.

    ctx = distributed.setup()         # reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR
    mine = ctx.shard(range(n))        # this rank's share of n work items
    rows = ctx.gather(my_rows)        # on rank 0: every rank's rows; elsewhere None
    ctx.close()

Rank r takes items r, r + world, r + 2 world, ...; CUDA processes use NCCL on their local
device, CPU processes gloo. Without the environment variables everything runs in one
process and every call is a no-op.
"""

from __future__ import annotations

import os
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
        """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: float) -> float:
        """The sum of ``value`` over ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


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
