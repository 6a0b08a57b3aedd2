"""Classical methods: end-to-end throughput through the streaming pipeline, on CPU.

Each method fuses a synthetic 4-band uint16 scene of 1024 x 1024 PAN pixels (ratio 4, 11-bit DN,
made by `bench_pipeline.make_scene`) with `fusion_cli.pipeline.pansharpen` (statistics pass
included for the methods that need one, reading, tiling, blending and the compressed GeoTIFF writer
included). Figures are PAN megapixels per second, wall clock; "fuse only" times the method's
`fuse` on the pipeline's default 256-px tiles plus its halo, without I/O. Goal: >= 5 PAN Mpx/s
end to end on the 2-core machine.

`run() -> list[dict]` is what `bench/run.py` collects; `python bench/bench_classical.py` prints it.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE = 1024
RATIO = 4


def _fuse_only(name: str, tile: int = 256, repeats: int = 3) -> float:
    """PAN Mpx/s of `fuse` alone on one batch of 4 windows (core `tile` + halo)."""
    import torch

    from fusion_cli.classical import make_method

    f = make_method(name, RATIO, "wv2")
    side = tile + 2 * f.halo
    g = torch.Generator().manual_seed(0)
    pan = 400 + 300 * torch.rand(4, 1, side, side, generator=g)
    ms = 400 + 300 * torch.rand(4, 4, side // RATIO, side // RATIO, generator=g)
    f.fit(pan[:1], ms[:1])
    f.fuse(pan, ms)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        f.fuse(pan, ms)
    seconds = (time.perf_counter() - t0) / repeats
    return 4 * tile * tile / seconds / 1e6


def run() -> list[dict]:
    sys.path.insert(0, str(HERE))
    import torch
    from bench_pipeline import make_scene

    from fusion_cli.classical import METHODS
    from fusion_cli.pipeline import pansharpen

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pan, ms = make_scene(folder, SIZE)
        for name in METHODS:
            out = folder / f"{name}.tif"
            t0 = time.perf_counter()
            pansharpen(pan, ms, out, method=name, sensor="wv2", progress=False)
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "method": name,
                    "scene": f"{SIZE}x{SIZE} PAN, 4-band uint16",
                    "seconds": round(seconds, 2),
                    "PAN Mpx/s (end to end)": round(SIZE * SIZE / seconds / 1e6, 2),
                    "PAN Mpx/s (fuse only)": round(_fuse_only(name), 2),
                    "threads": torch.get_num_threads(),
                }
            )
            out.unlink()
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    for row in run():
        print(row)
