"""Seams: a tiled product against the same scene fused in one piece, in output DN.

The scene is the shipped example (`examples/landsat8_{pan,ms}.tif`, Landsat-8 OLI, 16-bit DN,
320 x 640 PAN), small enough to fuse as one window. Each row fuses it with `fuse_files` at a tile
size and overlap and reports the max, mean and 99.9th percentile of |tiled - one piece| over all
bands and pixels. Rows: the default network (`landsat`, its card's scan memory of 20 tokens), the same
network with unbounded scans (`--scan-memory 0`, as the paper), and its base method alone (`bdsd-pc`),
which separates what the pipeline does (windows, halo, blending, statistics pass) from what the
network does. FusionMamba's selective scans run over each window's flattened rows and columns; an
unbounded trained scan keeps channels whose state barely decays, so every output pixel depends on the
whole window, which no finite halo reproduces. Bounded memory (`FusionMambaConfig.scan_memory`) makes
each pixel depend on a neighbourhood that the halo covers.

`run() -> list[dict]` is what `bench/run.py` collects; `python bench/bench_seam.py` prints it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAN = ROOT / "examples" / "landsat8_pan.tif"
MS = ROOT / "examples" / "landsat8_ms.tif"
# (tile, overlap) PAN px; 512/32 is the CPU default
CASES = [(512, 32), (256, 32), (128, 32), (256, 128), (512, 128)]
# Windows stop at the scene's edges (a scene that fits in one is fused as its authors run a whole
# image); within about 5 scan memories of those edges each window's row- and column-major scans wrap
# around to its own far side, not the one piece's, so the two differ there: reported apart.
EDGE = 96
# (label, make_fuser keywords, cases)
FUSERS = [
    ("landsat (scan memory 20)", {"model": "landsat"}, CASES),
    ("landsat unbounded (--scan-memory 0)", {"model": "landsat", "scan_memory": 0}, [CASES[0], CASES[3]]),
    ("bdsd-pc", {"method": "bdsd-pc"}, CASES),
]


def _fuse(out: Path, fuser_kw: dict, tile: int, overlap: int) -> tuple[object, float]:
    import numpy as np
    import rasterio

    from fusion_cli.pipeline import FuseOptions, fuse_files, make_fuser

    fuser = make_fuser(**fuser_kw, ratio=2, sensor="landsat8", device="cpu")
    t0 = time.perf_counter()
    fuse_files(PAN, MS, out, fuser, FuseOptions(tile=tile, overlap=overlap, overwrite=True))
    seconds = time.perf_counter() - t0
    with rasterio.open(out) as ds:
        return ds.read().astype(np.int64), seconds


def run() -> list[dict]:
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw, cases in FUSERS:
            one, _ = _fuse(Path(tmp) / "one.tif", kw, tile=1024, overlap=32)
            for tile, overlap in cases:
                tiled, seconds = _fuse(Path(tmp) / "tiled.tif", kw, tile=tile, overlap=overlap)
                diff = np.abs(tiled - one)
                interior = diff[:, EDGE:-EDGE, EDGE:-EDGE]
                rows.append(
                    {
                        "fuser": name,
                        "tile": tile,
                        "overlap": overlap,
                        f"max abs diff DN >= {EDGE} px from the edges": int(interior.max()),
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
