"""Networks end to end on the CPU: `fusion pansharpen` (the CLI, in a subprocess, as a user runs it)
with the official checkpoint on a 1024 x 1024 PAN crop of the WorldView-3 pair and with the default
`landsat` model on the shipped example scene (one window) and on the shared Landsat-8 crop (1254 x
1207 PAN px, several windows: at the default tile and at the 512 px the default was before), at the
default options (tile, ensemble, threads).

Each row gives PAN Mpx/s on the wall clock and per CPU-second, and, beside it, the machine's 2048^2
fp32 matmul rate measured in the same run and the network's matmul/conv FLOPs per PAN pixel (counted
by torch's FlopCounterMode over one 256^2 window, times 2 with a transpose ensemble): their quotient
is the rate at which the machine could run the network's dense algebra alone ("matmul floor"), and
the last column is the fraction of it reached. The scans' own arithmetic is not in that floor. Rows
for two runs at once (each run's rate and their sum) show what sharing the cores costs, and the batch
rows what a folder costs: `fusion batch` over four links to the example pair with one and with two
scenes in flight in one process, and as two processes fusing half each (--shard 1/2, 2/2); their
PAN Mpx/s is the whole folder's.

`run() -> list[dict]` is what `bench/run.py` collects; `python bench/bench_network.py` prints it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fusion_cli.paths import shared_data_dir

ROOT = Path(__file__).resolve().parent.parent
CROP = 1024


def matmul_gflops(size: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


@contextlib.contextmanager
def counting_fused_scans(counts: dict[str, float]) -> Iterator[None]:
    """While open, add to counts["updates"] the state updates of the fused CPU blocks' scans (batch x
    directions x channels x N x positions) and to counts["flops"] the FLOPs torch's FlopCounterMode
    does not see: x_proj where numba computes it (inside the scan kernels at N = 8, by `_project` at
    E = 8 otherwise) and the thin Linear layers `mamba_numba.linear` computes."""
    from fusion_cli.models import mamba_numba

    scan, project, linear = mamba_numba.scan_directions, mamba_numba._project, mamba_numba._linear

    def add(key: str, value: float) -> None:
        counts[key] = counts.get(key, 0) + value

    def counted_scan(u: Any, sources: Any, x_w: Any, *rest: Any, **kwargs: Any) -> Any:
        b, g, length, e = u.shape
        outputs, n = x_w.shape[1], rest[4].shape[2]  # R + 2N; A `(G, E, N)` after xz, dt_w, dt_bias, floor
        add("updates", b * g * length * e * n)
        if n == mamba_numba.HALF and ((e == mamba_numba.HALF and g % 2 == 0) or e % mamba_numba.LANES == 0):
            add("flops", 2 * b * g * length * e * outputs)  # x_proj inside the scan kernel
        return scan(u, sources, x_w, *rest, **kwargs)

    def counted_project(src: Any, weight: Any, out: Any) -> Any:
        add("flops", 2 * out.size * weight.shape[2])
        return project(src, weight, out)

    def counted_linear(x: Any, wt: Any, bias: Any, out: Any) -> Any:
        add("flops", 2 * x.shape[0] * wt.shape[0] * wt.shape[1])
        return linear(x, wt, bias, out)

    mamba_numba.scan_directions = counted_scan  # type: ignore[assignment]
    mamba_numba._project, mamba_numba._linear = counted_project, counted_linear
    try:
        yield
    finally:
        mamba_numba.scan_directions = scan  # type: ignore[assignment]
        mamba_numba._project, mamba_numba._linear = project, linear


def flops_per_pixel(model: str | None, weights: str | None) -> float:
    """Dense FLOPs (matmuls, convs; x_proj also where the scan kernel computes it) per output PAN
    pixel of one network call (both passes of a transpose ensemble)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fusion_cli.models.registry import load_model

    net = load_model(name=model, weights=weights, device="cpu").model.eval()
    cfg = net.config
    side = 256
    pan = torch.rand(1, cfg.pan_bands, side, side)
    ms = torch.rand(1, cfg.ms_bands, side // cfg.ratio, side // cfg.ratio)
    base = torch.rand(1, cfg.ms_bands, side, side) if cfg.base else None
    counter = FlopCounterMode(display=False)
    inline: dict[str, float] = {}
    with counter, torch.no_grad(), counting_fused_scans(inline):
        net(ms, pan, None, base)  # no_grad, not inference: FlopCounterMode needs the dispatcher
    return (counter.get_total_flops() + inline.get("flops", 0)) / side**2


def _crop_wv3(folder: Path) -> tuple[Path, Path] | None:
    import rasterio
    from rasterio.windows import Window

    src = shared_data_dir() / "wv3_spacenet2"
    if not (src / "pan.tif").exists():
        return None
    out = []
    for name, side in (("pan", CROP), ("ms", CROP // 4)):
        with rasterio.open(src / f"{name}.tif") as ds:
            win = Window(0, 0, side, side)
            profile = ds.profile | {"width": side, "height": side, "transform": ds.window_transform(win)}
            path = folder / f"wv3_{name}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(ds.read(window=win))
        out.append(path)
    return out[0], out[1]


def _l8_six_bands(folder: Path) -> tuple[Path, Path] | None:
    """The shared Landsat-8 crop (1254 x 1207 PAN px) with the `landsat` model's six MS bands
    (B2-B7, stacked from the per-band files): a scene that needs several windows."""
    import rasterio

    src = shared_data_dir() / "landsat8_oli"
    if not (src / "l8_B8.tif").exists():
        return None
    bands = [src / f"l8_B{i}.tif" for i in range(2, 8)]
    with rasterio.open(bands[0]) as ds:
        profile = ds.profile | {"count": 6}
    ms = folder / "l8_ms6.tif"
    with rasterio.open(ms, "w", **profile) as dst:
        for i, path in enumerate(bands, start=1):
            with rasterio.open(path) as ds:
                dst.write(ds.read(1), i)
    return src / "l8_B8.tif", ms


def _fuse_cmd(pan: Path, ms: Path, out: Path, extra: list[str]) -> list[str]:
    code = "import sys; from fusion_cli.cli.main import main; main(sys.argv[1:])"
    return [sys.executable, "-c", code, "pansharpen", str(pan), str(ms), "-o", str(out), "--overwrite",
            "--json", *extra]  # fmt: skip


def _wait(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """(CPU seconds, peak RSS MB) of a finished child."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


Result = tuple[dict[str, Any], float, float, float]  # JSON summary, wall s, CPU s, peak RSS MB


def _run_cases(cases: list[tuple[list[str], Path]]) -> list[Result]:
    """Run the commands at once; (JSON summary, wall s, CPU s, peak RSS MB) of each."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for cmd, _ in cases]
    results = []
    for proc, (cmd, _) in zip(procs, cases, strict=True):
        assert proc.stdout is not None
        out = proc.stdout.read()
        cpu, rss = _wait(proc)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[3:6])} failed with exit {proc.returncode}")
        results.append((json.loads(out), wall, cpu, rss))
    return results


BOTH = ("one run", "two runs at once")

# `fusion batch` over copies of the example scene: one process with one or two scenes in flight, and
# two processes splitting the folder (--shard), as a cluster array or GNU parallel would
BATCH_SCENES = 4
BATCH_MODES = {
    "batch, 4 scenes, --scene-workers 1": [["--scene-workers", "1"]],
    "batch, 4 scenes, --scene-workers 2": [["--scene-workers", "2"]],
    "batch, 4 scenes, two processes (--shard 1/2, 2/2)": [["--shard", "1/2"], ["--shard", "2/2"]],
}


def _batch_cmd(in_dir: Path, out_dir: Path, extra: list[str]) -> list[str]:
    code = "import sys; from fusion_cli.cli.main import main; main(sys.argv[1:])"
    return [sys.executable, "-c", code, "batch", str(in_dir), str(out_dir), "--pan", "*_PAN.tif", "--ms",
            "*_MS.tif", "--json", "--quiet", *extra]  # fmt: skip


def _batch_rows(
    folder: Path, pan: Path, ms: Path
) -> list[tuple[str, list[tuple[dict[str, Any], float, float, float]]]]:
    """Each BATCH_MODES case over BATCH_SCENES links to the example pair, into a fresh OUT_DIR."""
    in_dir = folder / "batch_in"
    in_dir.mkdir()
    for i in range(BATCH_SCENES):
        (in_dir / f"s{i}_PAN.tif").symlink_to(pan)
        (in_dir / f"s{i}_MS.tif").symlink_to(ms)
    out = []
    for k, (mode, runs) in enumerate(BATCH_MODES.items()):
        out_dir = folder / f"batch_out{k}"
        results = _run_cases([(_batch_cmd(in_dir, out_dir, extra), out_dir) for extra in runs])
        done = sum(r[0]["done"] for r in results)
        if done != BATCH_SCENES:
            raise RuntimeError(f"{mode}: {done} of {BATCH_SCENES} scenes done")
        out.append((mode, results))
    return out


def run() -> list[dict[str, Any]]:
    gflops = matmul_gflops()
    rows: list[dict[str, Any]] = []
    official = shared_data_dir() / "fusionmamba_official" / "420.pth"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scenes = []
        wv3 = _crop_wv3(folder)
        if wv3 is not None and official.exists():
            scenes.append(("official 420.pth, WV3 1024^2 crop", wv3, ["--weights", str(official)],
                           flops_per_pixel(None, str(official)), BOTH))  # fmt: skip
        else:
            rows.append({"bench": "network", "case": "official: skipped, ../shared/data missing"})
        landsat_fpp = flops_per_pixel("landsat", None)
        landsat = ROOT / "examples" / "landsat8_pan.tif", ROOT / "examples" / "landsat8_ms.tif"
        scenes.append(("landsat (default model), example scene", landsat, [], landsat_fpp, BOTH))
        l8 = _l8_six_bands(folder)
        if l8 is not None:  # the default tile against the previous one, on a scene of several windows
            label = "landsat (default model), Landsat-8 1254 x 1207 crop"
            scenes.append((label, l8, [], landsat_fpp, ("one run",)))
            scenes.append((label, l8, ["--tile", "512"], landsat_fpp, ("one run, --tile 512",)))
        cases: list[tuple[str, str, float, list[Result], int | str]] = []
        for label, (pan, ms), extra, fpp, modes in scenes:
            for mode in modes:
                outs = [folder / f"o{i}.tif" for i in range(2 if mode == "two runs at once" else 1)]
                results = _run_cases([(_fuse_cmd(pan, ms, out, extra), out) for out in outs])
                cases.append((label, mode, fpp, results, results[0][0]["tile"]))
        for mode, results in _batch_rows(folder, *landsat):
            cases.append(("landsat (default model), example scene", mode, landsat_fpp, results, 640))
        for label, mode, fpp, results, tile in cases:
            if mode.startswith("batch"):
                total = sum(r[0]["pan_mpx_done"] for r in results)
            else:
                total = sum(s["shape"][1] * s["shape"][2] / 1e6 for s, _, _, _ in results)
            floor = gflops * 1e9 / fpp / 1e6  # PAN Mpx/s if only the dense algebra ran, at the matmul rate
            wall = max(r[1] for r in results)
            cpu = sum(r[2] for r in results)
            rows.append(
                {
                    "bench": "network",
                    "case": label,
                    "mode": mode,
                    "tile": tile,
                    "PAN Mpx": round(total, 3),
                    "wall s": round(wall, 2),
                    "CPU s": round(cpu, 2),
                    "PAN Mpx/s (wall)": round(total / wall, 4),
                    "PAN Mpx/s per CPU s": round(total / cpu, 4),
                    "peak RSS MB (per run)": round(max(r[3] for r in results)),
                    "matmul GFLOP/s": round(gflops, 1),
                    "dense MFLOP / PAN px": round(fpp / 1e6, 3),
                    "matmul floor Mpx/s": round(floor, 3),
                    "fraction of floor": round(total / wall / floor, 3),
                }
            )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import table

    print(table(run()))
