"""Batch throughput on real Landsat-7 pairs: fusing N scenes with and without read-ahead, and the
cost of a resumed run that finds every output complete (validation only).

    python bench/bench_batch.py [--scenes 8] [--method exp]

Prints one JSON object; the figures go to BENCHMARKS.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from fusion_cli import batch
from fusion_cli.cli.main import bound_heap
from fusion_cli.paths import shared_data_dir
from fusion_cli.pipeline import FuseOptions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--method", default="exp")
    args = ap.parse_args()
    bound_heap()  # as the `fusion` entry point does
    src = shared_data_dir() / "landsat7_etm_fusebox"
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        in_dir = Path(tmp) / "in"
        in_dir.mkdir()
        for k in range(1, args.scenes + 1):
            for role in ("pan", "ms"):
                shutil.copy(src / f"{k}_{role}.tif", in_dir / f"{k}_{role}.tif")
        plan = batch.pair_by_patterns(in_dir, Path(tmp) / "out")
        job = batch.FuseJob({"method": args.method, "device": "cpu"}, FuseOptions())
        process = batch.make_scene_processor(job)
        result: dict[str, object] = {
            "scenes": len(plan.scenes),
            "method": args.method,
            "cpus": os.cpu_count(),
        }
        for io_workers in (0, 1):
            shutil.rmtree(Path(tmp) / "out", ignore_errors=True)
            s = batch.run_batch(plan, process, io_workers=io_workers)
            assert s.done == len(plan.scenes), [r.reason for r in s.results if r.status == "failed"]
            result[f"io_workers={io_workers}"] = {
                "seconds": round(s.seconds, 2),
                "mpx_per_s": round(s.mpx_per_s, 3),
            }
        t0 = time.perf_counter()
        s = batch.run_batch(plan, process)
        assert s.skipped == len(plan.scenes)
        result["resume_all_complete_ms_per_scene"] = round(
            (time.perf_counter() - t0) / len(plan.scenes) * 1e3, 2
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
