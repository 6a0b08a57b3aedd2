"""Seams: a tiled product against the same scene fused in one piece, in output DN.

The scene is the shipped example (`examples/landsat8_{pan,ms}.tif`, Landsat-8 OLI, 16-bit DN,
320 x 640 PAN), small enough to fuse as one window. Each row fuses it with `fuse_files` at a tile
size and overlap and reports the max, mean and 99.9th percentile of |tiled - one piece| over all
bands and pixels. Rows: the default network (`landsat`) and its base method alone (`bdsd-pc`), which
separates what the pipeline does (windows, halo, blending, statistics pass) from what the network
does: FusionMamba's selective scans run over each window's flattened rows and columns, so every
output pixel depends on the whole window and on its width (the decay between a pixel and the one
above it is one row of tokens), which no finite halo reproduces.

`run() -> list[dict]` is what `bench/run.py` collects; `python bench/bench_seam.py` prints it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAN = ROOT / "examples" / "landsat8_pan.tif"
MS = ROOT / "examples" / "landsat8_ms.tif"
CASES = [(256, 32), (128, 32), (256, 128), (512, 128)]  # (tile, overlap) PAN px; default 256 / 32


def _fuse(out: Path, model: str | None, method: str | None, tile: int, overlap: int) -> tuple[object, float]:
    import numpy as np
    import rasterio

    from fusion_cli.pipeline import FuseOptions, fuse_files, make_fuser

    fuser = make_fuser(model=model, method=method, ratio=2, sensor="landsat8", device="cpu")
    t0 = time.perf_counter()
    fuse_files(PAN, MS, out, fuser, FuseOptions(tile=tile, overlap=overlap, progress=False, overwrite=True))
    seconds = time.perf_counter() - t0
    with rasterio.open(out) as ds:
        return ds.read().astype(np.int64), seconds


def run() -> list[dict]:
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, method in (("landsat", None), (None, "bdsd-pc")):
            name = model or method
            kw = {"model": model, "method": method}
            one, _ = _fuse(Path(tmp) / "one.tif", **kw, tile=1024, overlap=32)
            for tile, overlap in CASES:
                tiled, seconds = _fuse(Path(tmp) / "tiled.tif", **kw, tile=tile, overlap=overlap)
                diff = np.abs(tiled - one)
                rows.append(
                    {
                        "fuser": name,
                        "tile": tile,
                        "overlap": overlap,
                        "max abs diff DN": int(diff.max()),
                        "mean abs diff DN": round(float(diff.mean()), 3),
                        "p99.9 abs diff DN": float(np.percentile(diff, 99.9)),
                        "product DN range": f"{int(one.min())}-{int(one.max())}",
                        "seconds": round(seconds, 1),
                    }
                )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
