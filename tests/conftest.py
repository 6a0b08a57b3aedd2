"""Shared fixtures: real imagery from ../shared/data, read at run time (never copied in), and the
in-repository Landsat-8 example scene, so that each module also has tests on a fresh clone."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from fusion_cli.paths import shared_data_dir

if TYPE_CHECKING:
    from rasterio.windows import Window

SHARED = shared_data_dir()
# The repository root, so that tests import the build-time scripts as `recipes.train_recipes` (they
# are not in the installed package).
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def need_shared(*parts: str) -> Path:
    """Path inside the shared data folder, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared real data not found: {path} (the ../shared/data folder is missing)")
    return path


def have_shared(*parts: str) -> bool:
    """Whether the shared data folder holds `parts`: a test that checks a real file's figures where it
    can, and the same behaviour on the shipped example otherwise, asks this instead of skipping."""
    return SHARED.joinpath(*parts).exists()


# The shared folders' file names, for the tests of pairing by name (which opens no file).
SHARED_NAMES = {
    "landsat7_etm_fusebox": [f"{k}_{role}.tif" for k in range(1, 31) for role in ("pan", "ms")]
    + ["LICENSE", "README.txt", "locations.txt"],
    "wv2_spacenet6": ["pan_1.tif", "ms_1.tif", "pan_2.tif", "ms_2.tif"],
    "wv3_spacenet2": ["pan.tif", "ms.tif"],
}


def shared_or_named_alike(folder: str, tmp: Path) -> Path:
    """The shared `folder`, or where ../shared is missing a folder in `tmp` of empty files named as
    its files are (pairing reads names, not pixels)."""
    if have_shared(folder):
        return SHARED / folder
    d = tmp / folder
    d.mkdir(parents=True, exist_ok=True)
    for name in SHARED_NAMES[folder]:
        (d / name).touch()
    return d


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared real data folder not found: {SHARED}")
    return SHARED


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_PAN, EXAMPLE_MS = EXAMPLES / "landsat8_pan.tif", EXAMPLES / "landsat8_ms.tif"


@dataclass(frozen=True)
class Pair:
    """A PAN/MS pair as arrays: `pan (1, H, W)`, `ms (C, H / ratio, W / ratio)`, float64 DN."""

    pan: np.ndarray
    ms: np.ndarray
    ratio: int
    sensor: str


@cache
def _example_arrays() -> tuple[np.ndarray, np.ndarray]:
    import rasterio

    # Tracked in git (examples/make_example.py rebuilds them); a fresh clone has them.
    with rasterio.open(EXAMPLE_PAN) as p, rasterio.open(EXAMPLE_MS) as m:
        return p.read(), m.read()


def example_pair(ms_rows: int = 160, ms_cols: int = 320, ratio: int = 2) -> Pair:
    """The shipped Landsat-8 example (ratio 2, 6 bands B, G, R, NIR, SWIR1, SWIR2) as arrays, the
    MS's top-left `ms_rows x ms_cols` pixels and the PAN over them. Indexed by array position: the
    PAN grid sits half a PAN pixel off the MS grid, a real misregistration the methods must bear.
    `ratio=4` reduces the 30 m MS once more by 2 with the Landsat MTF (a 60 m MS, as Wald's protocol
    would), so that ratio-4 code paths run on real content too."""
    from fusion_cli.mtf import degrade_ms
    from fusion_cli.sensors import nyquist_gains

    pan, ms = _example_arrays()
    lo = ms[:, :ms_rows, :ms_cols].astype(np.float64)
    if ratio == 4:
        lo = degrade_ms(lo, nyquist_gains("landsat8", lo.shape[0])[0], 2)
    elif ratio != 2:
        raise ValueError(f"the example pair has ratio 2 or 4, not {ratio}")
    return Pair(pan[:, : 2 * ms_rows, : 2 * ms_cols].astype(np.float64), lo, ratio, "landsat8")


def write_example_crop(
    dst: Path, stem: str, ms_window: Window | None = None, georef: bool = True, ms_reduce: int = 1
) -> tuple[Path, Path]:
    """`stem_pan.tif` / `stem_ms.tif` in `dst`: the example's MS `ms_window` (default: all of it) and
    the PAN over it (the PAN window keeps Landsat's half-pixel offset), optionally without
    georeferencing (the ratio then comes from the sizes) or with the MS MTF-reduced by `ms_reduce`
    (its pixel size grows accordingly). Returns the PAN and MS paths."""
    import warnings

    import rasterio
    from rasterio.windows import Window

    from fusion_cli.mtf import degrade_ms
    from fusion_cli.sensors import nyquist_gains

    ms_window = ms_window or Window(0, 0, 320, 160)
    pan_window = Window(
        2 * ms_window.col_off, 2 * ms_window.row_off, 2 * ms_window.width, 2 * ms_window.height
    )
    paths = []
    for role, src_path, win in (("pan", EXAMPLE_PAN, pan_window), ("ms", EXAMPLE_MS, ms_window)):
        with rasterio.open(src_path) as src:
            data, transform, profile = src.read(window=win), src.window_transform(win), src.profile
        if role == "ms" and ms_reduce > 1:
            gains = nyquist_gains("landsat8", data.shape[0])[0]
            data = np.round(degrade_ms(data.astype(np.float64), gains, ms_reduce)).astype(data.dtype)
            transform = transform * rasterio.Affine.scale(ms_reduce)
        profile.update(width=data.shape[2], height=data.shape[1], transform=transform)
        if not georef:
            profile.update(crs=None, transform=rasterio.Affine.identity())
        paths.append(dst / f"{stem}_{role}.tif")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no georeferencing, on purpose
            with rasterio.open(paths[-1], "w", **profile) as out:
                out.write(data)
    return paths[0], paths[1]


# The example MS's 40 x 80 px hole of `write_example_ms_with_hole` (rows, columns)
EXAMPLE_HOLE = (slice(60, 100), slice(120, 200))


def write_example_ms_with_hole(path: Path, how: str) -> Path:
    """The example MS with EXAMPLE_HOLE invalid, as `how` says: "mask" (65535 there, out by an
    internal mask), "nodata" (0 there, nodata 0) or "nan" (float32, NaN there, nodata NaN)."""
    import rasterio

    with rasterio.open(EXAMPLE_MS) as src:
        data, profile, tags = src.read(), src.profile, src.tags()
    if how == "nan":
        data = data.astype(np.float32)
        profile.update(dtype="float32", predictor=3, nodata=float("nan"))
    elif how == "nodata":
        profile.update(nodata=0)
    data[:, EXAMPLE_HOLE[0], EXAMPLE_HOLE[1]] = {"mask": 65535, "nodata": 0, "nan": np.nan}[how]
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(**tags)
        if how == "mask":
            mask = np.full(data.shape[1:], 255, np.uint8)
            mask[EXAMPLE_HOLE] = 0
            dst.write_mask(mask)
    return path


@pytest.fixture(scope="session")
def landsat_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`make demo` on the shipped Landsat-8 example with BDSD-PC (fast; the demo's network runs the
    same pipeline): its PAN, MS and product (319 x 639: the half-covered first PAN row and column
    lie outside the MS)."""
    from fusion_cli.pipeline import pansharpen

    pan, ms = EXAMPLES / "landsat8_pan.tif", EXAMPLES / "landsat8_ms.tif"
    out = tmp_path_factory.mktemp("demo") / "landsat8_bdsd_pc.tif"
    pansharpen(pan, ms, out, method="bdsd-pc", sensor="landsat8")
    return {"pan": pan, "ms": ms, "product": out}


def crop_raster(src: Path, dst: Path, window: Window) -> Path:
    """The `window` of raster `src` as a GeoTIFF at `dst`, georeferenced as it was there."""
    import rasterio

    with rasterio.open(src) as ds:
        profile = {**ds.profile, "width": window.width, "height": window.height}
        with rasterio.open(dst, "w", **{**profile, "transform": ds.window_transform(window)}) as out:
            out.write(ds.read(window=window))
    return dst


def restamp(
    src: Path, dst: Path, data: np.ndarray | None = None, *, descriptions: bool = True, **band_meta: object
) -> Path:
    """A copy of raster `src` at `dst`, with its georeferencing, optionally other `data` (its dtype
    becomes the file's) and the band metadata rasterio sets by name: `scales`, `offsets`, `units`,
    `colorinterp`. `descriptions=False` leaves the band names out."""
    import warnings

    import rasterio

    with rasterio.open(src) as s:
        profile, names, own = s.profile, s.descriptions, s.read()
    data = own if data is None else data
    profile.update(count=data.shape[0], dtype=data.dtype.name, driver="GTiff", photometric="MINISBLACK")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a crop without georeferencing, on purpose
        with rasterio.open(dst, "w", **profile) as out:
            out.write(data)
            for key, value in band_meta.items():
                setattr(out, key, value)
            for i, name in enumerate(names[: data.shape[0]] if descriptions else (), start=1):
                if name:
                    out.set_band_description(i, name)
    return dst


def tiff_photometric(path: Path) -> int:
    """The PHOTOMETRIC tag of a (classic, little-endian: GDAL's) TIFF's first image (1: min-is-black,
    2: RGB), as any TIFF reader sees it, not only GDAL with its own metadata on top."""
    import struct

    raw = Path(path).read_bytes()
    assert raw[:4] == b"II*\x00", f"{path} is not a classic little-endian TIFF"
    ifd = struct.unpack("<I", raw[4:8])[0]
    for i in range(struct.unpack("<H", raw[ifd : ifd + 2])[0]):
        tag, _, _, value = struct.unpack("<HHII", raw[ifd + 2 + 12 * i : ifd + 14 + 12 * i])
        if tag == 262:
            return value & 0xFFFF  # a SHORT, left-aligned in the value field
    raise AssertionError(f"{path} has no PHOTOMETRIC tag")
