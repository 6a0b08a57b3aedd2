"""Where a network's CPU time goes: one 256 x 256 PAN window of the official WV3 checkpoint and of the
default `landsat` model, fused by `NetworkFuser.fuse` (so the BDSD-PC base and the transpose ensemble
count as they do in a run), split by part of the network with forward hooks, on one thread (so the
split is not blurred by threads waiting on each other), with the scan backend the pipeline picks.
Seconds are process CPU seconds (what the part costs, whatever else shares the machine).

Parts: the selective scans of the Mamba blocks (on the fused CPU path: the directions' scans with
their mean, gate and LayerNorm); their conv1d + silu (fused path); the rest of those blocks (in, x
and out projections; token gathers on the generic path); the LayerNorms before the blocks (fused
path); the spectral attention; everything else of a network pass (stems, stride-2 and transposed
convs, head, residuals); the base method; and the second, transposed
pass of the ensemble. "halo x" is what the default plan computes per output pixel for that model on
a large scene (window area over core area at the default tile): the same work again at the edges.

"ceiling" rows: what the network's arithmetic alone would allow on this CPU. Per PAN pixel of a
window (ensemble included): the scans' state updates (counted in the fused kernel's calls) times the
best per-update cost the scan kernel reaches on one core in isolation (its float32 kernel at the
model shape, L = 65 536, D = 128 in 4 groups, N = 8, softplus on, inputs in its layout), plus the dense FLOPs
(matmuls, convs: torch's FlopCounterMode) at the one-thread 2048^2 matmul rate. Everything else
(conv1d, gates, norms, gathers, memory traffic, the base method) counted as free. The row gives that
ceiling per core and on every core, beside the window's measured rate per core.

`run() -> list[dict]` is what `bench/run.py` collects; `python bench/bench_profile.py` prints it.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fusion_cli.models import fusionmamba
from fusion_cli.models.scan import resolve_backend
from fusion_cli.paths import shared_data_dir

SIDE = 256


def _timer(fn: Callable[..., Any], key: str, totals: dict[str, float]) -> Callable[..., Any]:
    """`fn`, adding its CPU seconds to totals[key]."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        out = fn(*args, **kwargs)
        totals[key] += time.process_time() - t0
        return out

    return timed


@contextmanager
def _timed_parts(model: torch.nn.Module, totals: dict[str, float]) -> Iterator[None]:
    """Accumulate seconds per part into `totals` while the context is open."""
    handles = []
    starts: dict[int, float] = {}

    def enter(module: torch.nn.Module, *_: Any) -> None:
        starts[id(module)] = time.process_time()

    def leave(key: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, *_: Any) -> None:
            totals[key] += time.process_time() - starts.pop(id(module))

        return hook

    for name, module in model.named_modules():
        key = None
        if name == "spe_attn":
            key = "spectral attention"
        elif isinstance(module, fusionmamba.MultiScanMamba) and not name.startswith("spe_attn"):
            key = "mamba blocks (all)"
        if key is not None:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave(key)))
    scan_fn = fusionmamba.selective_scan

    fusionmamba.selective_scan = _timer(scan_fn, "scan (all)", totals)  # type: ignore[assignment]
    # the fused CPU inference path runs in mamba_numba: its scans (the four directions, mean, gate,
    # norm), its conv1d + silu, and the LayerNorms before the blocks (outside MultiScanMamba)
    fused: dict[str, Callable[..., Any]] = {}
    try:
        from fusion_cli.models import mamba_numba

        for attr, key in (
            ("scan_directions", "scan (all)"),
            ("conv_silu", "conv1d (all)"),
            ("layer_norm", "layer norms"),
        ):
            fused[attr] = getattr(mamba_numba, attr)
            setattr(mamba_numba, attr, _timer(fused[attr], key, totals))
    except ImportError:
        pass
    try:
        yield
    finally:
        fusionmamba.selective_scan = scan_fn  # type: ignore[assignment]
        for attr, fn in fused.items():
            setattr(mamba_numba, attr, fn)
        for h in handles:
            h.remove()


def _window(fuser: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One SIDE x SIDE window of seeded random PAN `(1, P, SIDE, SIDE)` and MS at 30 % of the DN range."""
    cfg = fuser.model.config
    gen = torch.Generator().manual_seed(0)
    dn = fuser.dn_max * 0.3
    pan = torch.rand(1, cfg.pan_bands, SIDE, SIDE, generator=gen) * dn
    ms = torch.rand(1, cfg.ms_bands, SIDE // cfg.ratio, SIDE // cfg.ratio, generator=gen) * dn
    return pan, ms


def profile_fuser(fuser: Any, label: str) -> list[dict[str, Any]]:
    """One SIDE x SIDE window through `fuser.fuse`, split into parts (seconds and % of the whole)."""
    cfg = fuser.model.config
    r = cfg.ratio
    pan, ms = _window(fuser)
    fuser.fuse(pan[..., :64, :64], ms[..., : 64 // r, : 64 // r])  # warm-up (JIT, allocator)
    totals: dict[str, float] = defaultdict(float)
    base_fn = fuser._base if fuser.base_fuser is not None else None
    if base_fn is not None:
        fuser._base = _timer(base_fn, "base method", totals)
    ensemble = cfg.transpose_ensemble
    try:
        with _timed_parts(fuser.model, totals):
            t0, c0 = time.perf_counter(), time.process_time()
            fuser.fuse(pan, ms)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        if base_fn is not None:
            del fuser._base
    passes = 2 if ensemble else 1
    per_pass = {k: v / passes for k, v in totals.items() if k != "base method"}
    net = cpu - totals.get("base method", 0.0)
    scans, conv1d = per_pass.get("scan (all)", 0.0), per_pass.get("conv1d (all)", 0.0)
    norms = per_pass.get("layer norms", 0.0)
    parts = {
        "selective scans": scans,
        "conv1d + silu of the Mamba blocks (fused path)": conv1d,
        "rest of the Mamba blocks (projections; gathers on the generic path)": per_pass.get(
            "mamba blocks (all)", 0.0
        )
        - scans
        - conv1d,
        "LayerNorms before the Mamba blocks (fused path)": norms,
        "spectral attention": per_pass.get("spectral attention", 0.0),
        "convs, stems, head, residuals": net / passes
        - per_pass.get("mamba blocks (all)", 0.0)
        - per_pass.get("spectral attention", 0.0)
        - norms,
        "second (transposed) pass of the ensemble": net / 2 if ensemble else 0.0,
        "base method": totals.get("base method", 0.0),
    }
    halo = fuser.halo
    tile = fuser.preferred_tile  # the default tile on this device
    window = tile + 32 + 2 * halo  # tile + default 32 px blend zone + context
    rows = []
    for part, seconds in parts.items():
        rows.append(
            {
                "bench": "profile",
                "model": label,
                "part": part,
                "seconds": round(seconds, 4),
                "% of window": round(100 * seconds / cpu, 1),
            }
        )
    rows.append(
        {
            "bench": "profile",
            "model": label,
            "part": f"whole window ({SIDE}^2, {resolve_backend(None, 'cpu')[0]} scan)",
            "seconds": round(cpu, 4),
            "% of window": 100.0,
            "wall_seconds": round(wall, 4),
            "PAN Mpx/s per pass": round(SIDE * SIDE / 1e6 / (net / passes), 4),
            "default tile": tile,
            "halo x (default tile)": round(window**2 / tile**2, 2),
        }
    )
    return rows


def _state_updates_per_pixel(fuser: Any) -> float:
    """State updates (batch x directions x channels x N x positions) the fused scan kernel performs
    per PAN pixel of a SIDE x SIDE window through `fuser.fuse`."""
    import bench_network

    counts: dict[str, float] = {}
    pan, ms = _window(fuser)
    with bench_network.counting_fused_scans(counts):
        fuser.fuse(pan, ms)
    return counts["updates"] / SIDE**2


def _scan_ns_per_update() -> float:
    """Best CPU nanoseconds per state update of the fused float32 scan kernel on one core, in
    isolation: inputs already in its layout, output array reused, no gate (the fused path gates
    after the directions' mean)."""
    from fusion_cli.models import scan_numba

    gen = torch.Generator().manual_seed(0)
    batch, channels, groups, n, length = 1, 128, 4, 8, 65_536
    u, delta = (torch.randn(batch, channels, length, generator=gen) for _ in range(2))
    A = -torch.rand(channels, n, generator=gen) * 8 - 0.5
    B, C = (torch.randn(batch, groups, n, length, generator=gen) for _ in range(2))
    D, bias = torch.randn(channels, generator=gen), torch.full((channels,), -1.0)
    args = scan_numba._arrays(u, delta, A, B, C, D, None, bias)
    y = np.empty(args[0].shape, dtype=np.float32)
    best = float("inf")
    with scan_numba._threads():
        for _ in range(5):
            t0 = time.process_time()
            scan_numba._forward_lanes(*args[:7], args[7], True, False, y)
            best = min(best, time.process_time() - t0)
    return best / (batch * channels * n * length) * 1e9


def ceiling_rows(fusers: list[tuple[Any, str, float, float]]) -> list[dict[str, Any]]:
    """One "ceiling" row per (fuser, label, dense FLOPs per PAN px, measured CPU-s per window)."""
    import bench_network

    ns = _scan_ns_per_update()
    gflops = bench_network.matmul_gflops()  # one thread: run() holds torch at 1
    cores = os.cpu_count() or 1
    rows = []
    for fuser, label, flops, cpu in fusers:
        updates = _state_updates_per_pixel(fuser)
        per_core = 1e-6 / (updates * ns * 1e-9 + flops / (gflops * 1e9))
        rows.append(
            {
                "bench": "profile",
                "model": label,
                "part": "ceiling: scans at the kernel's best rate + dense FLOPs at the matmul rate",
                "state updates per PAN px": round(updates),
                "scan ns per update (1 core)": round(ns, 3),
                "dense MFLOP per PAN px": round(flops / 1e6, 4),
                "matmul GFLOP/s (1 core)": round(gflops, 1),
                "ceiling PAN Mpx/s per core": round(per_core, 4),
                f"ceiling PAN Mpx/s ({cores} cores)": round(per_core * cores, 4),
                "measured PAN Mpx/s per core": round(SIDE**2 / 1e6 / cpu, 4),
            }
        )
    return rows


def run() -> list[dict[str, Any]]:
    from fusion_cli.models.fuser import NetworkFuser
    from fusion_cli.models.registry import load_model

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import bench_network

        rows: list[dict[str, Any]] = []
        ceilings = []

        def profile(fuser: Any, label: str, flops: float) -> None:
            part_rows = profile_fuser(fuser, label)
            rows.extend(part_rows)
            ceilings.append((fuser, label, flops, part_rows[-1]["seconds"]))

        official = shared_data_dir() / "fusionmamba_official" / "420.pth"
        if official.exists():
            fuser = NetworkFuser(load_model(weights=official, device="cpu"), device="cpu")
            profile(fuser, "official 420.pth (d=32, WV3)", bench_network.flops_per_pixel(None, str(official)))
        else:
            rows.append({"bench": "profile", "model": "official", "part": f"skipped: {official} missing"})
        landsat = NetworkFuser(load_model(name="landsat", device="cpu"), device="cpu")
        landsat_flops = bench_network.flops_per_pixel("landsat", None)
        profile(landsat, "landsat (d=8, BDSD-PC base, ensemble)", landsat_flops)
        one_pass = NetworkFuser(load_model(name="landsat", device="cpu"), device="cpu")
        one_pass.model.config = replace(one_pass.model.config, transpose_ensemble=False)
        rows += profile_fuser(one_pass, "landsat, one pass (--no-ensemble)")
        return rows + ceiling_rows(ceilings)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from run import table

    print(table(run()))
