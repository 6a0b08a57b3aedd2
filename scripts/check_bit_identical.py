"""Fuse a fixed set of cases through the `fusion` CLI and record the SHA-256 of every product's
pixels, so a refactoring can be checked to leave the products bit-identical.

    python scripts/check_bit_identical.py OUT.json            # run the cases, write the hashes
    python scripts/check_bit_identical.py OUT.json --compare BEFORE.json   # ... and diff them

Cases: the in-repo Landsat example (the default network, bdsd-pc, gsa) and the WorldView-3 pair of
../shared/data (bdsd-pc, gsa, mtf-glp-hpm on the whole scene; the shipped `vhr4` network on a
512 x 512 PAN crop, bands blue/green/red/NIR1), plus `fuse_arrays` with gsa on that crop. Each
entry records the pixel hash (bands and the dataset mask) and, for information, the run's
FUSION_PARAMS tag and its --json summary's device and precision (metadata may gain keys; pixels may
not change). Run from the repository root with the package importable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = (ROOT / "examples/landsat8_pan.tif", ROOT / "examples/landsat8_ms.tif")
WV3 = ROOT.parent / "shared/data/wv3_spacenet2"


def pixel_sha(path: Path) -> str:
    """SHA-256 over the dtype, shape, band data and dataset mask of a raster."""
    with rasterio.open(path) as ds:
        data = ds.read()
        mask = ds.dataset_mask()
    h = hashlib.sha256()
    h.update(f"{data.dtype}{data.shape}".encode())
    h.update(np.ascontiguousarray(data).tobytes())
    h.update(np.ascontiguousarray(mask).tobytes())
    return h.hexdigest()


def fuse(pan: Path, ms: Path, out: Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fusion_cli", "pansharpen", str(pan), str(ms), "-o", str(out), "--json"]
    run = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd + list(args))} failed:\n{run.stderr}")
    summary = json.loads(run.stdout)
    with rasterio.open(out) as ds:
        params = json.loads(ds.tags()["FUSION_PARAMS"])
    return {
        "sha256": pixel_sha(out),
        "device": summary["device"],
        "precision": summary["precision"],
        "params": params,
    }


def crop(src: Path, dst: Path, side: int) -> None:
    """The top-left `side` x `side` pixels of `src`, georeferencing kept."""
    with rasterio.open(src) as ds:
        win = Window(0, 0, side, side)
        profile = ds.profile | {"width": side, "height": side, "transform": ds.window_transform(win)}
        data = ds.read(window=win)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)


def arrays_case(pan_path: Path, ms_path: Path) -> dict[str, Any]:
    from fusion_cli.pipeline import fuse_arrays, make_fuser

    with rasterio.open(pan_path) as p, rasterio.open(ms_path) as m:
        pan, ms = p.read().astype(np.float32), m.read().astype(np.float32)
    fused = fuse_arrays(pan, ms, make_fuser(method="gsa", ratio=4, sensor="wv3", device="cpu"))
    return {"sha256": hashlib.sha256(np.ascontiguousarray(fused).tobytes()).hexdigest()}


def run_cases(tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    pan, ms = EXAMPLE
    results["example/default"] = fuse(pan, ms, tmp / "ex_default.tif", "--device", "cpu")
    for method in ("bdsd-pc", "gsa"):
        results[f"example/{method}"] = fuse(
            pan, ms, tmp / f"ex_{method}.tif", "--method", method, "--sensor", "landsat8"
        )
    if WV3.is_dir():
        for method in ("bdsd-pc", "gsa", "mtf-glp-hpm"):
            out = tmp / f"wv3_{method}.tif"
            results[f"wv3/{method}"] = fuse(
                WV3 / "pan.tif", WV3 / "ms.tif", out, "--method", method, "--sensor", "wv3"
            )
        crop(WV3 / "pan.tif", tmp / "wv3_pan_crop.tif", 512)
        crop(WV3 / "ms.tif", tmp / "wv3_ms_crop.tif", 128)
        results["wv3-crop/vhr4"] = fuse(
            tmp / "wv3_pan_crop.tif",
            tmp / "wv3_ms_crop.tif",
            tmp / "wv3_vhr4.tif",
            "--model",
            "vhr4",
            "--bands",
            "2,3,5,7",
            "--device",
            "cpu",
        )
        results["wv3-crop/fuse_arrays-gsa"] = arrays_case(tmp / "wv3_pan_crop.tif", tmp / "wv3_ms_crop.tif")
    else:
        print(f"note: {WV3} missing, WorldView-3 cases skipped", file=sys.stderr)
    return results


def compare(now: dict[str, Any], before: dict[str, Any]) -> bool:
    same = True
    for case in sorted(set(now) | set(before)):
        a, b = before.get(case), now.get(case)
        if a is None or b is None:
            print(f"{case}: only in {'after' if a is None else 'before'}")
            same = False
            continue
        ok = a["sha256"] == b["sha256"]
        same &= ok
        line = f"{case}: pixels {'identical' if ok else 'DIFFER'}"
        if "params" in a:
            keys = set(a["params"]) | set(b["params"])
            changed = {k for k in keys if a["params"].get(k) != b["params"].get(k)}
            if changed:
                line += "; FUSION_PARAMS " + ", ".join(
                    f"{k}: {a['params'].get(k, '-')} -> {b['params'].get(k, '-')}" for k in sorted(changed)
                )
        print(line)
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON file for the hashes")
    parser.add_argument("--compare", type=Path, help="an earlier JSON to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_cases(Path(tmp))
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if args.compare is not None:
        if not compare(results, json.loads(args.compare.read_text())):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
