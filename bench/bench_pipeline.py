"""Pipeline benchmarks: peak memory against scene size, and CPU throughput.

- Peak RSS of `fuse_files` on synthetic 4-band uint16 scenes of 2k x 2k and 8k x 8k PAN pixels
  (ratio 4), with a fast pass-through fuser so the 8k scene stays quick: the streaming design must
  keep the 8k peak within +25 % of the 2k peak. Each run is a fresh child process; its peak is read
  with `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` by a small wrapper process.
- CPU throughput in PAN megapixels per second of the network (official FusionMamba WV3 checkpoint,
  when available) on a 256 x 256 PAN crop of the real WorldView-3 pair, and of a classical method on
  a 512 x 512 crop.

`run() -> list[dict]` is what `bench/run.py` collects; `python bench/bench_pipeline.py` prints it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
SIZES = (2048, 8192)
RATIO = 4


def make_scene(folder: Path, size: int) -> tuple[Path, Path]:
    """Synthetic 4-band uint16 MS + PAN (11-bit DN, textured), written strip by strip."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    pan_path, ms_path = folder / f"pan_{size}.tif", folder / f"ms_{size}.tif"
    common = {"driver": "GTiff", "dtype": "uint16", "crs": "EPSG:32631", "tiled": True, "compress": "lzw"}
    rng = np.random.default_rng(size)
    lr = size // RATIO
    with rasterio.open(
        ms_path, "w", width=lr, height=lr, count=4, transform=from_origin(500000, 5800000, 2.0, 2.0), **common
    ) as ms:
        for r in range(0, lr, 256):
            h = min(256, lr - r)
            y, x = np.mgrid[r : r + h, 0:lr].astype(np.float32)
            base = 600 + 300 * np.sin(x / 37.0) * np.cos(y / 23.0)
            bands = [base * g + rng.normal(0, 20, base.shape) for g in (0.8, 1.0, 1.1, 1.5)]
            ms.write(np.clip(bands, 1, 2047).astype(np.uint16), window=rasterio.windows.Window(0, r, lr, h))
    with rasterio.open(
        pan_path,
        "w",
        width=size,
        height=size,
        count=1,
        transform=from_origin(500000, 5800000, 0.5, 0.5),
        **common,
    ) as pan:
        for r in range(0, size, 512):
            h = min(512, size - r)
            y, x = np.mgrid[r : r + h, 0:size].astype(np.float32) / RATIO
            base = 700 + 300 * np.sin(x / 37.0) * np.cos(y / 23.0) + rng.normal(0, 30, x.shape)
            pan.write(
                np.clip(base, 1, 2047).astype(np.uint16)[None], window=rasterio.windows.Window(0, r, size, h)
            )
    return pan_path, ms_path


def _pass_through_fuser() -> object:
    """Nearest-upsampled MS: no arithmetic, so the run measures the pipeline itself. (Built in the
    child: the wrapper process imports nothing heavy.)"""
    import torch.nn.functional as F

    from fusion_cli.fusers import FuserDefaults

    class PassThroughFuser(FuserDefaults):
        name = "pass-through"
        ratio = RATIO
        ms_bands = None
        pan_bands = 1
        halo = 0
        tile_multiple = 1
        needs_stats = False

        def accumulate(self, pan, ms, valid, origin=(0, 0)) -> None:  # noqa: ANN001
            pass

        def finalize(self) -> None:
            pass

        def fuse(self, pan, ms):  # noqa: ANN001, ANN201
            return F.interpolate(ms, scale_factor=RATIO, mode="nearest")

    return PassThroughFuser()


def _child(pan: str, ms: str, out: str) -> None:
    """Runs in its own process: one fusion, summary on stdout, with the malloc thresholds the
    `fusion` entry point sets (they bound the peak RSS measured here)."""
    from fusion_cli.cli.main import bound_heap
    from fusion_cli.pipeline import FuseOptions, fuse_files

    bound_heap()

    s = fuse_files(pan, ms, out, _pass_through_fuser(), FuseOptions(overwrite=True, measure_shift=True))
    print(json.dumps({"seconds": s.seconds, "mpx_per_s": s.mpx_per_s, "shape": s.shape}))


def _wrapper(pan: str, ms: str, out: str) -> None:
    """Runs the child and reports its peak RSS (the wrapper itself imports nothing heavy)."""
    import resource

    res = subprocess.run([sys.executable, str(HERE), "child", pan, ms, out], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(summary))


def _measure(pan: Path, ms: Path, out: Path) -> dict:
    res = subprocess.run(
        [sys.executable, str(HERE), "wrapper", str(pan), str(ms), str(out)], capture_output=True, text=True
    )
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory_rows() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp:
        folder = Path(tmp)
        for size in SIZES:
            pan, ms = make_scene(folder, size)
            m = _measure(pan, ms, folder / f"out_{size}.tif")
            rows.append(
                {
                    "bench": "pipeline",
                    "case": f"{size}x{size} PAN, 4-band uint16, ratio 4, pass-through fuser",
                    "peak_rss_mb": round(m["peak_rss_mb"], 1),
                    "seconds": m["seconds"],
                    "pan_mpx_per_s": m["mpx_per_s"],
                }
            )
            for p in (pan, ms, folder / f"out_{size}.tif"):
                p.unlink(missing_ok=True)
    small, big = rows[0]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
    rows[-1]["note"] = f"peak {100 * (big / small - 1):+.1f} % vs 2k (limit +25 %)"
    return rows


def _crop(src: Path, dst: Path, window: tuple[int, int, int, int]) -> Path:
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(src) as ds:
        win = Window(*window)
        profile = ds.profile
        profile.update(width=window[2], height=window[3], transform=ds.window_transform(win))
        with rasterio.open(dst, "w", **profile) as out:
            out.write(ds.read(window=win))
    return dst


def throughput_rows(side: int = 512) -> list[dict]:
    """Network and classical CPU throughput on a `side` x `side` PAN crop of the real WV3 pair."""
    from fusion_cli.cli.main import bound_heap
    from fusion_cli.errors import FusionError
    from fusion_cli.paths import shared_data_dir
    from fusion_cli.pipeline import FuseOptions, fuse_files, make_fuser

    bound_heap()  # as the `fusion` entry point does

    data = shared_data_dir()
    pan, ms = data / "wv3_spacenet2" / "pan.tif", data / "wv3_spacenet2" / "ms.tif"
    weights = data / "fusionmamba_official" / "420.pth"
    if not pan.exists():
        return [{"bench": "pipeline", "case": "throughput", "note": f"skipped: {pan} missing"}]
    import torch

    rows = []
    # The pure-PyTorch scan is slow on CPU: the network gets a quarter of the crop.
    candidates = [
        ("FusionMamba (official WV3 weights)", {"weights": weights}, side // 2),
        ("classical mtf-glp", {"method": "mtf-glp"}, side),
    ]
    with tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp:
        # Crops in a temporary folder (never in the repository), same georeferencing as the source.
        for label, kw, n in candidates:
            pan_c = _crop(pan, Path(tmp) / "pan.tif", (0, 0, n, n))
            ms_c = _crop(ms, Path(tmp) / "ms.tif", (0, 0, n // RATIO, n // RATIO))
            try:
                fuser = make_fuser(ratio=4, sensor="wv3", device="cpu", **kw)
            except FusionError as exc:
                rows.append(
                    {"bench": "pipeline", "case": f"CPU throughput, {label}", "note": f"skipped: {exc}"}
                )
                continue
            s = fuse_files(pan_c, ms_c, Path(tmp) / "o.tif", fuser, FuseOptions(overwrite=True))
            rows.append(
                {
                    "bench": "pipeline",
                    "case": f"CPU throughput, {label}, WV3 {n}x{n} PAN crop, tile 256",
                    "threads": torch.get_num_threads(),
                    "seconds": s.seconds,
                    "pan_mpx_per_s": s.mpx_per_s,
                }
            )
    return rows


def run() -> list[dict]:
    return memory_rows() + throughput_rows()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        _child(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == "wrapper":
        _wrapper(*sys.argv[2:5])
    else:
        for row in run():
            print(row)
