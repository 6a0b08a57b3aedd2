"""Quality-index benchmarks: time and peak memory of every reduced-resolution index on an 8-band
2048 x 2048 pair (goal: all of them in under 10 s on the 2-core CI machine, memory proportional to the
image), and of the full-resolution indices on 2048 x 2048 and 4096 x 4096 products with their PAN and
MS (they run by row strips: their work memory should not grow with the scene).

`seconds` is wall time (it grows when other jobs share the cores), `cpu_seconds` the process CPU time
(per-band work runs on up to 4 threads, so it can exceed the wall time on an idle machine).
Peak memory is the tracemalloc peak of the numpy/Python allocations during each call (numpy reports
its buffers to tracemalloc), next to the image size for scale. Tracing slows numpy a little, so times
are measured in a separate untraced run.

`run() -> list[dict]` is what `bench/run.py` collects; `python bench/bench_metrics.py` prints it.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

SIZE, BANDS, RATIO = 2048, 8, 4


def make_pair(size: int = SIZE, bands: int = BANDS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured 11-bit uint16 reference and a noisy float32 estimate of it, `(C, H, W)`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    base = 700 + 300 * np.sin(x / 37.0) * np.cos(y / 23.0)
    ref = np.stack(
        [np.clip(base * g + rng.normal(0, 25, base.shape), 1, 2047) for g in np.linspace(0.6, 1.5, bands)]
    )
    fused = ref * np.float32(1.02) + rng.normal(0, 15, ref.shape).astype(np.float32)
    return ref.astype(np.uint16), fused.astype(np.float32)


def _measure(name: str, fn: Callable[[], Any], image_mb: float) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "bench": "metrics",
        "case": name,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),  # wall time inflates when other jobs share the 2 cores
        "peak_mb": round(peak / 2**20, 1),
        "peak_over_image": round(peak / 2**20 / image_mb, 2),
    }


def run() -> list[dict[str, Any]]:
    from fusion_cli import metrics as m

    ref, fused = make_pair()
    image_mb = ref.size * 8 / 2**20  # one band stack in float64, the unit of "proportional"
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("Q2n", lambda: m.q2n(ref, fused)),
        ("Q", lambda: m.q_index(ref, fused)),
        ("SAM", lambda: m.sam(ref, fused)),
        ("ERGAS", lambda: m.ergas(ref, fused, RATIO)),
        ("SCC", lambda: m.scc(ref, fused)),
        ("PSNR", lambda: m.psnr(ref, fused)),
        ("SSIM", lambda: m.ssim(ref, fused)),
        (
            "reduced_resolution (all, per band)",
            lambda: m.reduced_resolution(ref, fused, RATIO, per_band=True),
        ),
    ]
    rows = [_measure(n, f, image_mb) for n, f in cases]
    for r in rows:
        r["shape"] = f"{BANDS}x{SIZE}x{SIZE}"
    return rows + [_full_resolution(size) for size in (SIZE, 2 * SIZE)]


def _full_resolution(size: int) -> dict[str, Any]:
    """The full-resolution indices of a `size`^2 product: they run by row strips, so their work memory
    stays put as the scene grows (the product itself is the caller's)."""
    from fusion_cli import metrics as m

    ref, fused = make_pair(size)
    ms = ref[:, 2::RATIO, 2::RATIO].copy()
    pan = ref.mean(axis=0, keepdims=True).astype(np.float32)
    row = _measure(
        "full_resolution (QNR + HQNR + HPC)",
        lambda: m.full_resolution(fused, pan, ms, RATIO, "wv3"),
        ref.size * 8 / 2**20,
    )
    row["shape"] = f"{BANDS}x{size}x{size} from {BANDS}x{size // RATIO}x{size // RATIO} MS"
    return row


if __name__ == "__main__":
    for row in run():
        print(json.dumps(row))
