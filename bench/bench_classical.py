"""Classical methods: end-to-end throughput of `fuse_files` on CPU, wall clock and CPU time.

Each method fuses a synthetic 4-band uint16 scene of 2048 x 2048 PAN pixels (ratio 4, 11-bit DN,
LZW-tiled inputs made by `bench_pipeline.make_scene`) with `fusion_cli.pipeline.fuse_files` and the
default options (the method's preferred tile, DEFLATE output), statistics pass included for the
methods that need one, as are reading, MS placement, blending and the compressed GeoTIFF writer.
Figures are PAN megapixels per second: "wall" is elapsed time, "CPU" is the process's CPU time
(user + system, all threads), which is what to compare on a shared machine where other jobs steal
the cores. Rows are given with 1 torch thread and with the default thread count, and for the methods
with a statistics pass also with `stats_mpx=1` (statistics from 1 PAN Mpx of tiles on a regular
sub-grid, `--stats-mpx 1`; here 4 of the 16 tiles). Goal: >= 5 PAN Mpx/s end to end on the 2-core
machine.

`run() -> list[dict]` is what `bench/run.py` collects; `python bench/bench_classical.py [METHOD ...]`
prints it (`--tile N` to force a tile side).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE = 2048
RATIO = 4


def fuse_once(
    pan: Path,
    ms: Path,
    out: Path,
    method: str,
    threads: int,
    tile: int | None = None,
    stats_mpx: float | None = None,
) -> dict:
    """One `fuse_files` run: wall and CPU seconds, PAN Mpx/s for each."""
    import torch

    from fusion_cli.classical import make_method
    from fusion_cli.pipeline import FuseOptions, fuse_files

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fuser = make_method(method, RATIO, "wv2")
        opts = FuseOptions(tile=tile, overwrite=True, stats_mpx=stats_mpx)
        c0, t0 = time.process_time(), time.perf_counter()
        summary = fuse_files(pan, ms, out, fuser, opts)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)
    mpx = SIZE * SIZE / 1e6
    return {
        "method": method,
        "threads": threads,
        "tile": summary.tile,
        "statistics": "exact" if stats_mpx is None else f"{stats_mpx:g} Mpx",
        "wall s": round(wall, 2),
        "CPU s": round(cpu, 2),
        "PAN Mpx/s (wall)": round(mpx / wall, 2),
        "PAN Mpx/s (CPU)": round(mpx / cpu, 2),
    }


def run(methods: list[str] | None = None, tile: int | None = None) -> list[dict]:
    sys.path.insert(0, str(HERE))
    import torch
    from bench_pipeline import make_scene

    from fusion_cli.classical import METHODS
    from fusion_cli.cli.main import bound_heap

    bound_heap()  # the malloc thresholds the `fusion` entry point sets
    rows = []
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pan, ms = make_scene(folder, SIZE)
        out = folder / "out.tif"
        for name in methods or list(METHODS):
            runs = [(threads, None) for threads in sorted({1, default_threads})]
            if METHODS[name].needs_stats:
                runs.append((default_threads, 1.0))
            for threads, stats_mpx in runs:
                row = fuse_once(pan, ms, out, name, threads, tile, stats_mpx)
                if not METHODS[name].needs_stats:
                    row["statistics"] = "-"
                row["scene"] = f"{SIZE}x{SIZE} PAN, 4-band uint16"
                row["load avg (1 min)"] = round(os.getloadavg()[0], 1)
                rows.append(row)
                out.unlink(missing_ok=True)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    args = sys.argv[1:]
    forced = None
    if "--tile" in args:
        i = args.index("--tile")
        forced = int(args[i + 1])
        del args[i : i + 2]
    for r in run(args or None, forced):
        print(r)
