"""One-shot GPU benchmark of the scan backends and the network (run by scripts/device_bench.sh).

Sections, each on its own (one failing is recorded in the table and the others still run):
- scan: µs per selective scan at L = 65 536, B = 1, D = 128 (d = 32 x 4 directions grouped, G = 4),
  N = 8, for every backend that runs here (torch, triton, mamba_ssm), forward and forward + backward,
  with the max relative difference to the torch backend (output and all gradients) and peak memory;
  then a small sweep of the triton launch settings (BLOCK_D, CHUNK, warps) at that shape.
- pansharpen: end-to-end `fusion pansharpen` of the WorldView-3 pair wv3_spacenet2 with the official
  checkpoint fusionmamba_official/420.pth (both read from the shared data folder, `$FUSION_SHARED_DATA`
  or ../shared/data), in fp32 and bf16 (`--precision`), automatic scan backend: PAN Mpx/s of a second
  (warm) run, and the max abs difference between the fp32 and bf16 products in DN.
- train: training patches/s of `fusion_cli.training.loop.train` on 64 x 64 PAN patches, d = 32, batch 16,
  synthetic 8-band pairs (speed only), per scan backend and precision.

Writes `gpu_bench.md` (markdown tables) and `gpu_bench.jsonl` (one row per measurement, appended as
they come, so a run cut short keeps what it measured) to --out (default $OUT).

    python bench/bench_gpu.py --out /tmp/gb                      # on the GPU machine
    TRITON_INTERPRET=1 python bench/bench_gpu.py --dry-run --out /tmp/gb   # CPU: every path, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusion_cli.models import scan, scan_triton  # noqa: E402
from fusion_cli.paths import shared_data_dir  # noqa: E402

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


class Report:
    """Rows by section; every row is also appended to gpu_bench.jsonl at once."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = out / "gpu_bench.jsonl"
        self.jsonl.write_text("")
        self.sections: dict[str, list[dict[str, Any]]] = {}
        self.notes: list[str] = []

    def add(self, section: str, **row: Any) -> None:
        self.sections.setdefault(section, []).append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"section": section, **row}, default=str) + "\n")
        print(json.dumps({"section": section, **row}, default=str), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print("note:", text, flush=True)

    def write_markdown(self) -> Path:
        lines = ["# GPU benchmark (bench/bench_gpu.py)", ""]
        for name, rows in self.sections.items():
            lines += [f"## {name}", ""]
            cols: list[str] = []
            for r in rows:
                cols += [k for k in r if k not in cols]
            lines.append("| " + " | ".join(_fmt(c) for c in cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in rows:
                lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in cols) + " |")
            lines.append("")
        if self.notes:
            lines += ["## notes", ""] + [f"- {n}" for n in self.notes] + [""]
        path = self.out / "gpu_bench.md"
        path.write_text("\n".join(lines))
        return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v).replace("|", "/").replace("\n", " ")


def section(report: Report, name: str, fn: Callable[[], None]) -> None:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # one section failing must not cost the others their turn
        traceback.print_exc()
        report.add(name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    report.note(f"section {name}: {time.perf_counter() - t0:.1f} s")
    report.write_markdown()


# ------------------------------------------------------------------------------------------------ env


def environment(report: Report, device: str) -> None:
    smi = shutil.which("nvidia-smi")
    gpu, driver = "none", "none"
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode == 0 and out.stdout.strip():
            parts = [p.strip() for p in out.stdout.strip().splitlines()[0].split(",")]
            gpu, driver = parts[0], parts[1]
            report.add("environment", item="GPU memory", value=parts[2] if len(parts) > 2 else "")
    ok, why_triton = scan_triton.triton_import()
    fn, why_mamba = scan._mamba_ssm_import()
    auto, reason = scan.resolve_backend(None, device)
    report.add("environment", item="GPU (nvidia-smi)", value=gpu)
    report.add("environment", item="driver", value=driver)
    if torch.cuda.is_available():
        report.add("environment", item="torch device", value=torch.cuda.get_device_name(0))
    report.add("environment", item="python / torch / CUDA", value=f"{platform.python_version()} / "
               f"{torch.__version__} / {torch.version.cuda}")  # fmt: skip
    report.add("environment", item="triton", value=why_triton)
    report.add("environment", item="mamba_ssm", value=why_mamba)
    report.add("environment", item=f"automatic scan backend on {device}", value=f"{auto} ({reason})")
    report.add("environment", item="TRITON_INTERPRET", value=os.environ.get("TRITON_INTERPRET", "unset"))


# ----------------------------------------------------------------------------------------------- scan


def scan_case(device: str, length: int, d: int, groups: int, n: int) -> dict[str, torch.Tensor]:
    """The network's call: u, delta, z `(1, D, L)`, grouped B/C `(1, G, N, L)`, fp32."""
    gen = torch.Generator().manual_seed(0)
    t = {
        "u": torch.randn(1, d, length, generator=gen),
        "delta": torch.randn(1, d, length, generator=gen) * 0.5 - 2.0,
        "A": -torch.exp(torch.randn(d, n, generator=gen)),
        "B": torch.randn(1, groups, n, length, generator=gen),
        "C": torch.randn(1, groups, n, length, generator=gen),
        "D": torch.randn(d, generator=gen),
        "z": torch.randn(1, d, length, generator=gen),
        "delta_bias": torch.randn(d, generator=gen) * 0.3,
    }
    return {k: v.to(device) for k, v in t.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_us(fn: Callable[[], Any], device: str, reps: int, warmup: int = 2) -> float:
    """Median µs of `reps` calls after `warmup` (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return float(np.median(times))


def _fwd_bwd(fn: Callable[..., torch.Tensor], t: dict[str, torch.Tensor], w: torch.Tensor):
    y = fn(**t, delta_softplus=True)
    grads = torch.autograd.grad(y, [t[k] for k in ARGS], w)
    return y, grads


def bench_scan(report: Report, device: str, dry: bool) -> None:
    # Dry runs: the interpreter costs ~10 ms per position and program, so a few dozen positions.
    length, d, groups, n = (40, 8, 4, 4) if dry else (65536, 128, 4, 8)
    reps, warmup = (1, 0) if dry else (20, 2)
    shape = f"L={length} B=1 D={d} G={groups} N={n}"
    backends = ["torch", "triton"]
    if device.startswith("cuda") and scan._mamba_ssm_import()[0] is not None:
        backends.append("mamba_ssm")
    base = scan_case(device, length, d, groups, n)
    w = torch.randn(1, d, length, generator=torch.Generator().manual_seed(1)).to(device)
    ref_y, ref_g = None, None
    torch_us: dict[str, float] = {}
    for name in backends:
        impl = scan._IMPLS[name]
        try:
            with torch.inference_mode():
                fwd_us = time_us(lambda impl=impl: impl(**base, delta_softplus=True), device, reps, warmup)
            t = {k: v.clone().requires_grad_(True) for k, v in base.items()}
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            y, g = _fwd_bwd(impl, t, w)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
            both_us = time_us(lambda impl=impl, t=t: _fwd_bwd(impl, t, w), device, reps, warmup)
        except Exception as exc:
            traceback.print_exc()
            report.add("scan", backend=name, shape=shape, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            continue
        if ref_y is None:
            ref_y, ref_g = y.detach(), [x.detach() for x in g]
        rel_y = float((y - ref_y).abs().max() / ref_y.abs().max())
        rel_g = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g, ref_g, strict=True))
        for pass_, us in (("fwd", fwd_us), ("fwd+bwd", both_us)):
            torch_us.setdefault(pass_, us)
            report.add(
                "scan",
                backend=name,
                shape=shape,
                **{"pass": pass_, "µs": round(us, 1), "speedup vs torch": round(torch_us[pass_] / us, 2)},
                **{"max rel diff vs torch (y; grads)": f"{rel_y:.1e}; {rel_g:.1e}"},
                **{"peak MiB fwd+bwd": round(peak, 1)},
            )
        del y, g, t
    # The triton launch settings around the default, to pick better defaults from a real GPU.
    configs = [(None, None, None)]
    if not dry:
        configs += [(1, 128, 4), (1, 256, 8), (1, 512, 8), (2, 128, 8), (2, 256, 8), (4, 64, 8), (1, 128, 8)]
    bd0, _, ch0 = scan_triton.choose_blocks(1, groups, d // groups, n, length, loop=False)
    for block_d, chunk, warps in configs:
        kw = {"block_d": block_d, "chunk": chunk, "num_warps": warps}
        label = "default" if block_d is None else f"BLOCK_D={block_d} CHUNK={chunk} warps={warps}"
        if block_d is None:
            label += f" (BLOCK_D={bd0} CHUNK={ch0} warps=4/8)"

        def impl(*a: Any, kw: dict = kw, **k: Any) -> torch.Tensor:
            return scan_triton.selective_scan_triton(*a, **k, **kw)

        try:
            with torch.inference_mode():
                fwd_us = time_us(lambda impl=impl: impl(**base, delta_softplus=True), device, reps, warmup)
            t = {k: v.clone().requires_grad_(True) for k, v in base.items()}
            both_us = time_us(lambda impl=impl, t=t: _fwd_bwd(impl, t, w), device, reps, warmup)
            report.add("triton launch settings", settings=label, shape=shape, **{"fwd µs": round(fwd_us, 1)},
                       **{"fwd+bwd µs": round(both_us, 1)})  # fmt: skip
        except Exception as exc:
            report.add(
                "triton launch settings", settings=label, error=f"{type(exc).__name__}: {str(exc)[:200]}"
            )


# ----------------------------------------------------------------------------------------- pansharpen


def _crop_pair(src: Path, dst: Path, pan_side: int) -> tuple[Path, Path]:
    """A small top-left crop of the pair (dry runs): PAN `pan_side`², MS `pan_side / 4`²."""
    import rasterio
    from rasterio.windows import Window

    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for name, side in (("pan.tif", pan_side), ("ms.tif", pan_side // 4)):
        with rasterio.open(src / name) as ds:
            win = Window(0, 0, side, side)
            prof = ds.profile | {"width": side, "height": side, "transform": ds.window_transform(win)}
            prof.pop("blockxsize", None), prof.pop("blockysize", None)
            prof["tiled"] = False
            with rasterio.open(dst / name, "w", **prof) as o:
                o.write(ds.read(window=win))
        out.append(dst / name)
    return out[0], out[1]


def bench_pansharpen(report: Report, device: str, dry: bool, work: Path) -> None:
    data = shared_data_dir()
    pair = data / "wv3_spacenet2"
    ckpt = data / "fusionmamba_official" / "420.pth"
    missing = [str(p) for p in (pair / "pan.tif", pair / "ms.tif", ckpt) if not p.exists()]
    if missing:
        report.add(
            "pansharpen", skipped=f"shared data not found: {', '.join(missing)} (set FUSION_SHARED_DATA)"
        )
        return
    try:
        import rasterio  # noqa: F401
    except ImportError as exc:
        report.add("pansharpen", skipped=f"rasterio does not import ({exc}); carry its wheels (.whl)")
        return
    pan, ms = pair / "pan.tif", pair / "ms.tif"
    if dry:
        pan, ms = _crop_pair(pair, work / "crop", 64)
    with __import__("rasterio").open(pan) as ds:
        mpx = ds.width * ds.height / 1e6
    # Dry runs: the interpreter would take minutes per tile, so the CPU check runs the torch scan.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if dry:
        env["FUSION_SCAN_BACKEND"] = "torch"
    backend = scan.resolve_backend(env.get("FUSION_SCAN_BACKEND") or None, device)[0]
    precisions = ["fp32", "bf16"] if device.startswith("cuda") or dry else ["fp32"]
    products: dict[str, Path] = {}
    for precision in precisions:
        out = work / f"wv3_{precision}.tif"
        cmd = [
            sys.executable, "-c", "import sys; from fusion_cli.cli.main import main; main(sys.argv[1:])",
            "pansharpen", str(pan), str(ms), "-o", str(out), "--weights", str(ckpt), "--device", device,
            "--precision", precision, "--overwrite", "--json", "-q",
        ]  # fmt: skip
        runs = []
        # The first run pays the kernel compiles and cuDNN's choices; dry runs only check the path.
        for attempt in ("cold",) if dry else ("cold", "warm"):
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            wall = time.perf_counter() - t0
            if res.returncode != 0:
                raise RuntimeError(
                    f"pansharpen {precision} failed: {(res.stderr or res.stdout).strip()[-400:]}"
                )
            summary = json.loads(res.stdout)
            runs.append((attempt, wall, summary))
        for attempt, wall, summary in runs:
            report.add(
                "pansharpen",
                scene=f"wv3_spacenet2 {mpx:.2f} PAN Mpx",
                weights="420.pth",
                precision=precision,
                scan=backend,
                run=attempt,
                **{"fuse s": round(float(summary.get("seconds", float("nan"))), 2)},
                **{"PAN Mpx/s": round(float(summary.get("mpx_per_s", float("nan"))), 3)},
                **{"process wall s": round(wall, 1)},
            )
        products[precision] = out
    if len(products) == 2:
        import rasterio

        with rasterio.open(products["fp32"]) as a, rasterio.open(products["bf16"]) as b:
            x, y = a.read().astype(np.int64), b.read().astype(np.int64)
        diff = np.abs(x - y)
        report.add(
            "fp32 vs bf16 product",
            scene="wv3_spacenet2",
            dtype=str(a.dtypes[0]),
            **{"max abs diff DN": int(diff.max()), "mean abs diff DN": round(float(diff.mean()), 4)},
            **{"pixels differing": f"{float((diff > 0).mean()):.2%}"},
        )


# ---------------------------------------------------------------------------------------------- train


def bench_train(report: Report, device: str, dry: bool, work: Path, seconds: float) -> None:
    from fusion_cli.training.data import TrainPair
    from fusion_cli.training.loop import TrainConfig, train

    rng = np.random.default_rng(0)
    side = 64 if dry else 256  # reduced-grid PAN side of each synthetic pair
    pairs = []
    for k in range(2 if dry else 8):
        ref = rng.random((8, side, side), dtype=np.float32)
        ms = ref.reshape(8, side // 4, 4, side // 4, 4).mean((2, 4))
        pan = ref.mean(0, keepdims=True) + 0.01 * rng.standard_normal((1, side, side), dtype=np.float32)
        pairs.append(TrainPair(f"synthetic{k}", pan.astype(np.float32), ms, ref, 4))
    cases = [("torch", "fp32")] if dry else []
    if not dry:
        auto = scan.resolve_backend(None, device)[0]
        cases = [(auto, "fp32"), (auto, "bf16"), ("torch", "fp32")]
        if auto != "triton":
            cases.insert(2, ("triton", "fp32"))
    for backend, precision in cases:
        cfg = TrainConfig(
            dim=4 if dry else 32,
            d_state=8,
            patch=16 if dry else 64,
            batch=2 if dry else 16,
            steps_per_epoch=2 if dry else 10,
            epochs=10**6,
            max_seconds=seconds,
            device=device,
            precision=precision,
            scan_backend=backend,
            val_every=10**6,
        )
        res = train(pairs, [], cfg, work / f"train_{backend}_{precision}")
        # Whole epochs after the first (which pays compiles and warm-up) give the steady rate.
        rates = [h["patches_per_s"] for h in res.history if "patches_per_s" in h]
        steady = rates[1:-1] or rates
        report.add(
            "train",
            backend=backend,
            precision=precision,
            patch=f"{cfg.patch}² PAN",
            dim=cfg.dim,
            batch=cfg.batch,
            steps=res.steps,
            **{"patches/s": round(float(np.median(steady)), 1) if steady else float("nan")},
            **{"budget s": seconds},
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu_bench"))
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks every code path")
    ap.add_argument("--sections", default="scan,pansharpen,train")
    ap.add_argument("--train-seconds", type=float, default=None, help="per case (default 25; dry run 3)")
    args = ap.parse_args()
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    report = Report(Path(args.out))
    t0 = time.perf_counter()
    section(report, "environment", lambda: environment(report, device))
    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    wanted = args.sections.split(",")
    if "scan" in wanted:
        section(report, "scan", lambda: bench_scan(report, device, args.dry_run))
    if "pansharpen" in wanted:
        section(report, "pansharpen", lambda: bench_pansharpen(report, device, args.dry_run, work))
    if "train" in wanted:
        seconds = args.train_seconds or (3.0 if args.dry_run else 25.0)
        section(report, "train", lambda: bench_train(report, device, args.dry_run, work, seconds))
    report.note(f"total {time.perf_counter() - t0:.0f} s")
    path = report.write_markdown()
    shutil.rmtree(work, ignore_errors=True)
    print(path.read_text())
    return 1 if any("error" in r for rows in report.sections.values() for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
