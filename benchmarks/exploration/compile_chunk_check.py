"""The shipped ViT compiled with QuickMerge++'s default at r = 48: time to the first two calls and per batch, with the
matching round split into chunks of images as eagerly, or whole (stop 73).

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/exploration/compile_chunk_check.py chunked|whole|library

``chunked`` forces the eager split inside the compiled graph, ``whole`` the batch at once, ``library`` leaves
``quickmerge.baselines.tome.images_per_chunk`` as it is. Give each run a fresh inductor cache, or the compile time is
a cache hit.
"""

import statistics
import sys
import time

import torch

from quickmerge.baselines import tome
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "library"
    if mode not in ("chunked", "whole", "library"):
        raise SystemExit(f"mode must be chunked, whole or library, got {mode!r}")
    torch.set_num_threads(2)
    if mode == "whole":
        tome.images_per_chunk = lambda b, *args, **kwargs: b
    elif mode == "chunked":  # the eager rule, whether compiling or not
        tome.images_per_chunk = lambda b, t, c, scaled, device="cpu": min(
            b, max(1, tome._ELEMENTS_PER_CHUNK // (t * c + 2 * ((t + 1) // 2) * (t // 2))))
    print(mode, "images per chunk of the first block's round:", tome.images_per_chunk(256, 196, 128, True))
    model = load_fashion_vit().eval()
    x = normalize(load_fashion_mnist("test")[0][:256])
    patch(model, r=48)
    compiled = torch.compile(model)
    with torch.inference_mode():
        start = time.perf_counter()
        compiled(x)
        compiled(x)
        first = time.perf_counter() - start
        times = []
        for _ in range(5):
            start = time.perf_counter()
            compiled(x)
            times.append(time.perf_counter() - start)
    print(f"{mode}: first two calls {first:.1f} s, then {statistics.median(times):.3f} s per batch of 256")


if __name__ == "__main__":
    main()
