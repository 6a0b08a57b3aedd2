"""FusionMamba speed: each selective-scan backend at L=4096, d=32, N=8 (B=1), the network's forward time
per 256 x 256 PAN tile (8-band WV3 config with the official 420.pth when present) with the torch scan,
and the machine's 2048^2 fp32 matmul rate (the compute floor). On CUDA also torch vs mamba_ssm.

`run() -> list[dict]` is what `bench/run.py` collects; `python bench/bench_model.py` prints it.
Wall time inflates when other jobs share the cores; `cpu_seconds` is given beside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch

from fusion_cli.models import scan


def _time(fn: Callable[[], Any], repeat: int = 3, sync: bool = False) -> tuple[float, float]:
    """(best wall seconds, its process CPU seconds) over `repeat` runs after one warm-up."""
    fn()
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if sync:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        if wall < best[0]:
            best = (wall, time.process_time() - c0)
    return best


def _row(case: str, wall: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {"bench": "model", "case": case, "seconds": round(wall, 4), "cpu_seconds": round(cpu, 4), **extra}


def scan_inputs(device: str = "cpu", length: int = 4096, d: int = 32, n: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    t = {
        "u": torch.randn(1, d, length, generator=gen),
        "delta": torch.randn(1, d, length, generator=gen) * 0.5,
        "A": -torch.exp(torch.randn(d, n, generator=gen)),
        "B": torch.randn(1, n, length, generator=gen),
        "C": torch.randn(1, n, length, generator=gen),
        "D": torch.randn(d, generator=gen),
        "z": torch.randn(1, d, length, generator=gen),
        "delta_bias": torch.randn(d, generator=gen) * 0.3,
    }
    return {k: v.to(device) for k, v in t.items()}


def bench_scans(device: str = "cpu") -> list[dict[str, Any]]:
    rows = []
    t = scan_inputs(device)
    sync = device.startswith("cuda")
    backends = ["reference", "torch"]
    if sync and scan._mamba_ssm_import()[0] is not None:
        backends.append("mamba_ssm")
    outs = {}
    with torch.inference_mode():
        for name in backends:
            fn = scan._IMPLS[name]
            wall, cpu = _time(
                lambda fn=fn: fn(**t, delta_softplus=True), repeat=1 if name == "reference" else 5, sync=sync
            )
            outs[name] = fn(**t, delta_softplus=True)
            rows.append(_row(f"scan {name} L=4096 d=32 N=8 ({device})", wall, cpu))
    ref = outs["reference"]
    for row, name in zip(rows, backends, strict=True):
        row["speedup_vs_reference"] = round(rows[0]["seconds"] / row["seconds"], 1)
        row["max_rel_diff_vs_reference"] = float((outs[name] - ref).abs().max() / ref.abs().max())
    return rows


def bench_model_tile(device: str = "cpu", tile: int = 256, backend: str = "torch") -> dict[str, Any]:
    from fusion_cli.models.fusionmamba import FusionMamba, FusionMambaConfig
    from fusion_cli.paths import shared_data_dir

    model = FusionMamba(FusionMambaConfig(ms_bands=8, scan_backend=backend))
    ckpt = shared_data_dir() / "fusionmamba_official" / "420.pth"
    if ckpt.exists():
        model.load_state_dict(torch.load(ckpt, weights_only=True, map_location="cpu"))
    model.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    ms = torch.rand(1, 8, tile // 4, tile // 4, generator=gen).to(device)
    pan = torch.rand(1, 1, tile, tile, generator=gen).to(device)
    with torch.inference_mode():
        wall, cpu = _time(lambda: model(ms, pan), repeat=2, sync=device.startswith("cuda"))
    return _row(
        f"FusionMamba forward {tile}x{tile} PAN tile, 8 bands, {backend} scan ({device})",
        wall,
        cpu,
        weights="420.pth" if ckpt.exists() else "random",
        threads=torch.get_num_threads(),
    )


def bench_matmul(device: str = "cpu", size: int = 2048) -> dict[str, Any]:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    wall, cpu = _time(lambda: a @ b, repeat=5, sync=device.startswith("cuda"))
    return _row(f"matmul {size}^2 fp32 ({device})", wall, cpu, gflops=round(2 * size**3 / wall / 1e9, 1))


def run() -> list[dict[str, Any]]:
    rows = [bench_matmul("cpu"), *bench_scans("cpu"), bench_model_tile("cpu")]
    if torch.cuda.is_available():
        rows += [bench_matmul("cuda"), *bench_scans("cuda"), bench_model_tile("cuda", 512)]
        if scan._mamba_ssm_import()[0] is not None:
            rows.append(bench_model_tile("cuda", 512, "mamba_ssm"))
    return rows


if __name__ == "__main__":
    for r in run():
        print(json.dumps(r))
