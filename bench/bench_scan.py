"""Selective scan on CPU: the fused numba backend against the chunked torch one at L = 65 536 (one
256 x 256 tile's tokens), as the model calls it (B=1, 32 channels x 4 directions = D=128 in G=4 groups,
N=8) and plain (D=32, one group); forward alone (inference) and forward + backward (training). The
reference loop only at L=1024. In the same run: the machine's 2048^2 fp32 matmul rate, numba's
first-call compile time (cold cache) and cache load time, and how two processes scanning at once slow
each other down (numba vs torch).

`run() -> list[dict]` is what `bench/run.py` collects; `python bench/bench_scan.py` prints it.
Wall time inflates when other jobs share the cores; `cpu_seconds` is given beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fusion_cli.models import scan

ROOT = Path(__file__).resolve().parent.parent
LONG = 65_536
SHORT = 1024
SHAPES = {"model (D=128, G=4)": (128, 4), "plain (D=32, G=1)": (32, 1)}


def _time(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, float]:
    """(best wall seconds, its process CPU seconds) over `repeat` runs after one warm-up."""
    fn()
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = time.perf_counter() - t0
        if wall < best[0]:
            best = (wall, time.process_time() - c0)
    return best


def scan_inputs(length: int, d: int, g: int, n: int = 8) -> dict[str, torch.Tensor]:
    """Random scan arguments, fp32: u, delta, z `(1, D, L)`; A `(D, N)`; B, C `(1, G, N, L)`."""
    gen = torch.Generator().manual_seed(0)
    return {
        "u": torch.randn(1, d, length, generator=gen),
        "delta": torch.randn(1, d, length, generator=gen) * 0.5,
        "A": -torch.exp(torch.randn(d, n, generator=gen)),
        "B": torch.randn(1, g, n, length, generator=gen),
        "C": torch.randn(1, g, n, length, generator=gen),
        "D": torch.randn(d, generator=gen),
        "z": torch.randn(1, d, length, generator=gen),
        "delta_bias": torch.randn(d, generator=gen) * 0.3,
    }


def bench_matmul(size: int = 2048) -> dict[str, Any]:
    a, b = torch.randn(size, size), torch.randn(size, size)
    wall, cpu = _time(lambda: a @ b, repeat=5)
    return {"case": f"matmul {size}^2 fp32", "us": round(wall * 1e6), "cpu_seconds": round(cpu, 4),
            "gflops": round(2 * size**3 / wall / 1e9, 1)}  # fmt: skip


def bench_backends(length: int, shape: str, backends: list[str], backward: bool) -> list[dict[str, Any]]:
    d, g = SHAPES[shape]
    t = scan_inputs(length, d, g)
    rows, outs = [], {}
    for name in backends:
        fn = scan._IMPLS[name]
        with torch.inference_mode():
            repeat = 1 if name == "reference" else 3
            wall, cpu = _time(lambda fn=fn: fn(**t, delta_softplus=True), repeat=repeat)
            outs[name] = fn(**t, delta_softplus=True)
        row = {"case": f"scan fwd {name} L={length} {shape}", "us": round(wall * 1e6),
               "cpu_seconds": round(cpu, 4)}  # fmt: skip
        rows.append(row)
        if backward:
            leaves = {k: v.clone().requires_grad_() for k, v in t.items()}

            def step(fn: Callable[..., torch.Tensor] = fn, leaves: dict[str, torch.Tensor] = leaves) -> None:
                for v in leaves.values():
                    v.grad = None
                fn(**leaves, delta_softplus=True).sum().backward()

            wall, cpu = _time(step, repeat=1)
            rows.append({"case": f"scan fwd+bwd {name} L={length} {shape}", "us": round(wall * 1e6),
                         "cpu_seconds": round(cpu, 4)})  # fmt: skip
    base = "reference" if "reference" in outs else "torch"
    for row in rows:
        name = row["case"].split()[2]
        if base in outs and row["case"].startswith("scan fwd "):
            ref = outs[base]
            row[f"max_rel_diff_vs_{base}"] = float((outs[name] - ref).abs().max() / ref.abs().max())
    for kind in ("fwd", "fwd+bwd"):
        by = {r["case"].split()[2]: r for r in rows if r["case"].split()[1] == kind}
        if "torch" in by and "numba" in by:
            torch_row, numba_row = by["torch"], by["numba"]
            numba_row["speedup_vs_torch"] = round(torch_row["us"] / numba_row["us"], 1)
            # in CPU seconds too: the wall-clock ratio moves with the host (torch's many small
            # calls wait for time slices when other jobs run)
            numba_row["speedup_vs_torch_cpu"] = round(torch_row["cpu_seconds"] / numba_row["cpu_seconds"], 1)
    return rows


_CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from bench_scan import scan_inputs
from fusion_cli.models import scan
t = scan_inputs({length}, 128, 4)
t0 = time.perf_counter()
import fusion_cli.models.scan_numba
imported = time.perf_counter()
with torch.inference_mode():
    if {warm}:  # compile / cache load and first-touch outside the timing
        scan._IMPLS[{backend!r}](**t, delta_softplus=True)
        imported = time.perf_counter()
    for _ in range({calls}):
        scan._IMPLS[{backend!r}](**t, delta_softplus=True)
first = time.perf_counter()
leaves = {{k: v.clone().requires_grad_() for k, v in t.items()}}
if {backward}:
    scan._IMPLS[{backend!r}](**leaves, delta_softplus=True).sum().backward()
print(imported - t0, first - imported, time.perf_counter() - first)
"""


def _child(
    backend: str, length: int, calls: int, backward: bool, env: dict[str, str], warm: bool = False
) -> subprocess.Popen:
    code = _CHILD.format(
        root=str(ROOT), bench=str(ROOT / "bench"), length=length, calls=calls, backend=backend,
        backward=backward, warm=warm,
    )  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)


def _times(proc: subprocess.Popen) -> list[float]:
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"bench child failed ({proc.returncode})")
    return [float(x) for x in out.split()]


def bench_compile() -> list[dict[str, Any]]:
    """First call in a fresh process with an empty numba cache (compile), then again (cache load)."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold cache (compiles)", "warm cache"):
            imp, fwd, bwd = _times(_child("numba", 64, 1, True, env))
            rows.append({"case": f"numba first call, {label}: import / fwd / bwd seconds",
                         "us": round((imp + fwd + bwd) * 1e6), "import_s": round(imp, 2),
                         "fwd_first_s": round(fwd, 2), "bwd_first_s": round(bwd, 2)})  # fmt: skip
    return rows


def bench_concurrency() -> list[dict[str, Any]]:
    """Wall time of a few forwards at L=65536 (model shape, after a warm-up call) in one process alone,
    then in each of two processes started together (each with torch's default thread count)."""
    rows = []
    env = dict(os.environ)
    for backend, calls in (("numba", 5), ("torch", 1)):
        alone = _times(_child(backend, LONG, calls, False, env, warm=True))[1]
        procs = [_child(backend, LONG, calls, False, env, warm=True) for _ in range(2)]
        pair = [_times(p)[1] for p in procs]
        rows.append({"case": f"{backend}: {calls} fwd L={LONG} model shape, 1 process vs 2 at once",
                     "us": round(alone * 1e6), "two_processes_us": f"{pair[0]*1e6:.0f}, {pair[1]*1e6:.0f}",
                     "slowdown": round(max(pair) / alone, 2)})  # fmt: skip
    return rows


def run() -> list[dict[str, Any]]:
    rows = [bench_matmul()]
    if scan._numba_import()[0] is None:
        return rows + [{"case": "numba scan", "error": scan._numba_import()[1]}]
    rows += bench_compile()
    rows += bench_backends(SHORT, "model (D=128, G=4)", ["reference", "torch", "numba"], backward=False)
    for shape in SHAPES:
        rows += bench_backends(LONG, shape, ["torch", "numba"], backward=True)
    rows += bench_concurrency()
    threads = torch.get_num_threads()
    for r in rows:
        r.setdefault("threads", threads)
    return rows


if __name__ == "__main__":
    for r in run():
        print(json.dumps(r))
