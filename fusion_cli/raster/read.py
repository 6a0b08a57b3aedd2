"""Reading rasters: opening with one-line errors, band selection, the DN scale, padded window reads
with validity masks, whole and decimated reads, and damaged files as bad input."""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import rasterio
from rasterio._err import CPLE_BaseError  # GDAL errors (CPLE_*): rasterio exports them only here
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from fusion_cli.errors import FusionError, NegativeDN
from fusion_cli.raster.checks import check_one_type, check_pixel_type, refuse_non_finite
from fusion_cli.raster.gdal import is_gdal_path, reason
from fusion_cli.raster.nodata import alpha_band, band_masked, has_mask

# Tag of a float raster whose values are DN of another dtype (e.g. a Wald-reduced uint8 MS)
SOURCE_DTYPE_TAG = "FUSION_SOURCE_DTYPE"


def recorded_params(tags: Mapping[str, str]) -> dict[str, Any]:
    """The run parameters a `fusion` product records in its FUSION_PARAMS tag; {} where it has none
    (another tool's file) or it is not a JSON object."""
    try:
        params = json.loads(tags.get("FUSION_PARAMS", "{}"))
    except ValueError:
        return {}
    return params if isinstance(params, dict) else {}


def open_raster(path: str | os.PathLike[str], what: str = "input") -> rasterio.io.DatasetReader:
    """Open a raster read-only, or raise a one-line FusionError saying what is wrong."""
    p: str | Path = os.fspath(path) if is_gdal_path(path) else Path(path)
    if isinstance(p, Path) and not p.exists():
        raise FusionError(f"{what} file not found: {p}")
    if isinstance(p, Path) and p.is_dir():
        raise FusionError(f"{what} is a folder, not a raster file: {p}")
    try:
        with warnings.catch_warnings():
            # Missing georeferencing is handled (and reported once) by align.relate_grids.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(p, "r")
    except RasterioIOError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unknown format"
        if isinstance(p, str):  # GDAL decides whether a virtual path exists
            raise FusionError(
                f"{what} cannot be opened by GDAL ({first}): {p}; check the path inside the archive or URL"
            ) from None
        raise FusionError(f"{what} is not a readable raster ({first}): {p}") from None
    if ds.count == 0:  # an HDF5 or netCDF container: its rasters are subdatasets (a traceback later)
        names = list(ds.subdatasets)
        ds.close()
        if not names:
            raise FusionError(f"{what} {p} holds no raster bands")
        raise FusionError(
            f"{what} {p} holds {len(names)} subdatasets, not bands; give one of them, e.g. {names[0]}"
            + (f" or {names[1]}" if len(names) > 1 else "")
        )
    return ds


def is_warped(ds: Any) -> bool:
    """Whether `ds` is a GDAL warped VRT (an input reprojected on the fly)."""
    from rasterio.vrt import WarpedVRT

    return isinstance(ds, WarpedVRT)


def select_bands(
    ds: rasterio.io.DatasetReader, bands: Sequence[int] | None, what: str = "MS", read: bool = True
) -> list[int]:
    """1-based band indexes to read; all bands but an alpha band when `bands` is None. `what`: "MS"
    (bands from --bands) or "PAN" (from --pan-bands). `read`: the bands are read together, so they
    must share one pixel type (False: only counted)."""
    if bands is None:
        alpha = alpha_band(ds)
        picked = [i for i in range(1, ds.count + 1) if i != alpha]
    else:
        bad = [b for b in bands if b < 1 or b > ds.count]
        if bad:
            option = "--pan-bands" if what == "PAN" else "--bands"
            raise FusionError(
                f"{what} has {ds.count} bands, cannot select band(s) {bad}; use {option} 1..{ds.count}"
            )
        picked = list(bands)
    if read:
        check_one_type(ds, picked, what)
    return picked


def data_band_positions(ds: rasterio.io.DatasetReader, bands: Sequence[int] | None) -> tuple[int, list[int]]:
    """The raster's data band count (an alpha band is a mask, not a band) and where `bands` (1-based
    in the file; None: the data bands) sit among them, 1-based: what a sensor's band numbers index."""
    data_bands = select_bands(ds, None, read=False)
    picked = data_bands if bands is None else bands
    return len(data_bands), [data_bands.index(b) + 1 if b in data_bands else b for b in picked]


def detect_dn_max(ds: rasterio.io.DatasetReader) -> float | None:
    """Largest DN the sensor can produce, from NBITS metadata (e.g. 11 -> 2047); None if unknown."""
    nbits = ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") or ds.tags(ns="IMAGE_STRUCTURE").get("NBITS")
    if nbits is None:
        return None
    try:
        return float(2 ** int(nbits) - 1)
    except ValueError:
        return None


# Pixels of a decimated read `check_dn_range` looks at, and the share of them outside the DN range
# that is a wrong ceiling rather than a few saturated outliers.
DN_CHECK_SAMPLES = 512 * 512
DN_CHECK_SHARE = 0.01
# Negative values within this fraction of the data's 99th-percentile magnitude are float round-off
# (filtering a zero collar), not an offset a ratio method cannot take.
NEGATIVE_ROUNDOFF = 1e-4
# How far below and above the DN scale a network divides by (its card's units) the 99th percentile of
# its inputs may sit before they are data in other units. Below: reflectance (0..0.6) through a model
# of 10000-scaled DN reached it as ~1e-5 (SAM 97 degrees at exit 0), and 8-bit DN in a 16-bit file
# through `landsat` (uint16: 65535) as 1/257 (ERGAS 101 against 2.4 at exit 0); the real scenes here sit
# 1-5x below their models' scales (FuseBox uint8 2-3.4x, Landsat-8 4.8x, WorldView 2.5-3.8x, Hyperion
# 4.5x). Above: DN (0..6000) through a reflectance model (~6000), or a few saturated pixels.
DN_SCALE_BELOW = 30.0
DN_SCALE_ABOVE = 10.0


def check_dn_range(
    ds: Any,
    bands: Sequence[int],
    dn_max: float | None,
    given: bool,
    nonnegative: str | None = None,
    what: str = "MS",
    scale: tuple[str, float] | None = None,
) -> None:
    """Refuse DN the product cannot represent, seen on a decimated read of the selected bands
    (nearest samples, bounded memory): a ceiling `dn_max` that more than DN_CHECK_SHARE of the
    pixels exceed (every product pixel is clipped to it and a network divides by it, so `--dn-max
    100` on 16-bit data wrote a constant image at exit 0; `given`: from --dn-max, else the file's
    NBITS tag), and with `nonnegative` (why the fuser needs DN >= 0 and what to do: a network, which
    reads DN from 0 up to its scale, a ratio method) as large a share of negative band values (int8
    data fused by the landsat model lost their sign, exit 0).
    `scale` (a network's name and the DN scale it divides by): refuse data whose 99th percentile is
    DN_SCALE_BELOW times below it or DN_SCALE_ABOVE times above it, data in other units."""
    if dn_max is None and not nonnegative and scale is None:
        return
    check_dn_values(sample_values(ds, bands), dn_max, given, nonnegative, what, scale)


def check_same_bit_depth(pan_ds: Any, ms_ds: Any, why: str) -> None:
    """Refuse a PAN and MS whose NBITS tags differ (a 12-bit PAN with an 11-bit MS reached the
    official network at twice the MS's scale: 15 % of the mean off at exit 0)."""
    pan_max, ms_max = detect_dn_max(pan_ds), detect_dn_max(ms_ds)
    if pan_max is not None and ms_max is not None and pan_max != ms_max:
        bits = [round(math.log2(v + 1)) for v in (pan_max, ms_max)]
        raise FusionError(
            f"the PAN is {bits[0]}-bit and the MS {bits[1]}-bit (their NBITS tags): {why}; bring them to "
            "one bit depth first, or use a classical --method"
        )


def sample_values(ds: Any, bands: Sequence[int], zero_is_nodata: bool = False) -> np.ndarray:
    """The valid values `(C, N)` of the 1-based `bands` on a decimated read (nearest samples, at most
    DN_CHECK_SAMPLES pixels: bounded memory for any scene); `zero_is_nodata` as in `read_padded`."""
    step = max(1, math.ceil(math.sqrt(ds.width * ds.height / DN_CHECK_SAMPLES)))
    shape = (len(bands), max(1, ds.height // step), max(1, ds.width // step))
    with damaged_input(ds):
        data = ds.read(list(bands), out_shape=shape, resampling=Resampling.nearest)
        valid = valid_pixels(ds, bands, size=shape[1:])
    if zero_is_nodata:
        nonzero = (data != 0).any(axis=0)
        valid = nonzero if valid is None else valid & nonzero
    return data[:, valid] if valid is not None else data.reshape(len(bands), -1)


def constant_value(data: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray | None:
    """Each band's one value `(C,)` when every band of `data` `(C, ...)` holds a single value over its
    `valid` pixels (None: all), else None (None too for no valid pixel)."""
    values = data[:, valid] if valid is not None else data.reshape(len(data), -1)
    if values.size == 0 or not (values == values[:, :1]).all():
        return None
    return values[:, 0].astype(np.float64)


def constant_band_value(ds: Any, bands: Sequence[int], zero_is_nodata: bool = False) -> np.ndarray | None:
    """`constant_value` of a raster's `bands` over every valid pixel: the decimated sample first, and
    only when that is constant, the whole raster in strips (a low-contrast image can sample flat)."""
    value = constant_value(sample_values(ds, bands, zero_is_nodata))  # (C, N): all valid
    if value is None:
        return None
    step = max(1, DN_CHECK_SAMPLES // max(ds.width, 1))
    for row in range(0, ds.height, step):
        win = Window(0, row, ds.width, min(step, ds.height - row))
        with damaged_input(ds):
            data = ds.read(list(bands), window=win)
            valid = valid_pixels(ds, bands, window=win)
        if zero_is_nodata:
            nonzero = (data != 0).any(axis=0)
            valid = nonzero if valid is None else valid & nonzero
        values = data[:, valid] if valid is not None else data.reshape(len(bands), -1)
        if values.size and (values != value[:, None]).any():
            return None
    return value


# Share of a file's pixels that may be 0 in every band before an undeclared zero collar is suspected
ZERO_COLLAR_SHARE = 0.02


def fill_share(ds: Any, bands: Sequence[int], value: float = 0.0) -> float:
    """Share of the pixels (decimated sample) that are `value` in every selected band of a file that
    declares no nodata, mask or alpha: an unflagged fill collar (SpaceNet's WorldView-2 tiles: 32 %
    zeros; a block at the type's largest value) is fused as data, and its fill enters the methods'
    statistics (5 % of the mean DN far inside, GSA; 45 % with a 65535 block). 0 where the file marks
    its invalid pixels."""
    if has_mask(ds, bands):  # nodata, masks or alpha
        return 0.0
    values = sample_values(ds, bands)
    return float((values == value).all(axis=0).mean()) if values.size else 0.0


def scene_fill(ds: Any, bands: Sequence[int], zero_is_nodata: bool = False) -> np.ndarray | None:
    """Per-band value `(C,)` float64 that stands in for a raster's invalid pixels, the same in every
    window: the mean of its valid samples (`sample_values`). A window's own means made the product
    along a nodata edge depend on the tile size (900 DN steps between tiles, GSA on Landsat-8).
    None where no pixel can be invalid or none of the samples is valid (finite)."""
    if not (zero_is_nodata or has_mask(ds, bands)):
        return None
    values = sample_values(ds, bands, zero_is_nodata).astype(np.float64)
    finite = np.isfinite(values).all(axis=0)
    return values[:, finite].mean(axis=1) if finite.any() else None


# Fewer whole-number steps than this between a float MS's 1st and 99th percentile: an integer
# --dtype would keep its values as a few grey levels (reflectance 0.49..0.99 as uint16 was 0 and 1).
# Float DN of an 8-bit sensor (a Wald-reduced FuseBox scene) span more, even on a dull scene.
MIN_INTEGER_LEVELS = 32


def check_integer_output(ds: Any, bands: Sequence[int], out_dtype: str) -> None:
    """Refuse an integer --dtype for float MS data it cannot hold: more than DN_CHECK_SHARE of the
    values past its range, or values too fine for whole numbers (fewer than MIN_INTEGER_LEVELS steps
    over the data's range). Float DN of thousands (a Wald-reduced MS) round as they should and pass."""
    if np.dtype(ds.dtypes[bands[0] - 1]).kind != "f" or np.dtype(out_dtype).kind not in "ui":
        return
    values = sample_values(ds, bands)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    info = np.iinfo(np.dtype(out_dtype))
    outside = float(((values < info.min) | (values > info.max)).mean())
    if outside > DN_CHECK_SHARE:  # a few negative ringing samples may clip, as integer data's do
        why = f"would clip {outside:.0%} of its values ({float(values.min()):.4g}..{float(values.max()):.4g})"
    elif hi - lo < MIN_INTEGER_LEVELS:
        levels = round(hi - lo) + 1
        why = f"would round its values of {lo:.4g}..{hi:.4g} (1st-99th percentile) to {levels} level(s)"
    else:
        return
    raise FusionError(
        f"--dtype {out_dtype} holds whole numbers in {info.min}..{info.max} and {why} (a float MS); keep "
        "a float --dtype, or scale the data to DN first"
    )


def check_dn_values(
    values: np.ndarray,
    dn_max: float | None,
    given: bool,
    nonnegative: str | None = None,
    what: str = "MS",
    scale: tuple[str, float] | None = None,
) -> None:
    """`check_dn_range` on sampled valid values `(C, N)` (of a file, or of an array)."""
    if values.size == 0:
        return
    above = float((values > dn_max).any(axis=0).mean()) if dn_max is not None else 0.0  # pixels clipped
    if dn_max is not None and above > DN_CHECK_SHARE:
        source = f"--dn-max {dn_max:g}" if given else f"the {what}'s NBITS tag (largest DN {dn_max:g})"
        todo = (
            "give the data's real largest DN or leave --dn-max out"
            if given
            else "pass --dn-max with the real largest DN"
        )
        raise FusionError(
            f"{above:.0%} of the {what}'s pixels exceed {source} (up to "
            f"{float(values.max()):g}): the product would be clipped to it; {todo}"
        )
    # of all band values (a few noisy bands of a 128-band HSI pass), and below the float round-off of
    # the data's scale: a Wald-reduced MS rings to -7.5e-9 beside a zero collar, which is no offset
    if nonnegative and float((values < 0).mean()) > DN_CHECK_SHARE:
        floor = -NEGATIVE_ROUNDOFF * float(np.percentile(np.abs(values.astype(np.float64)), 99))
        negative = float((values < floor).mean())
        if negative > DN_CHECK_SHARE:
            raise NegativeDN(
                f"{negative:.0%} of the {what}'s values are negative (down to {float(values.min()):g}): "
                + nonnegative
            )
    if scale is not None:
        name, units = scale
        p99 = float(np.percentile(values, 99))
        if p99 * DN_SCALE_BELOW < units or p99 > units * DN_SCALE_ABOVE:
            todo = (
                "pass --dn-max with the data's full scale (e.g. 255 for 8-bit DN in a 16-bit file, 2047 "
                "for 11-bit, 1 for reflectance in 0..1, 10000 for reflectance scaled by 10000)"
                if what == "MS"
                else f"the network divides the {what} by the MS's scale: give a {what} in the MS's units "
                "and bit depth"
            )
            raise FusionError(
                f"the {what}'s values (99th percentile {p99:.4g}) are not in the units of model {name}, "
                f"which divides them by {units:g} (its card's DN scale, or --dn-max); {todo}"
            )


def _pad_spec(start: int, size: int, limit: int) -> tuple[int, int, int, int]:
    """Clamp [start, start+size) to [0, limit): (read_start, read_size, pad_before, pad_after)."""
    a = max(start, 0)
    b = min(start + size, limit)
    if b <= a:  # entirely outside: read the nearest edge line and pad from it
        a = 0 if start + size <= 0 else limit - 1
        b = a + 1
    return a, b - a, a - start, (start + size) - b


def _pad(arr: np.ndarray, pads: list[tuple[int, int]]) -> np.ndarray:
    if not any(p for pair in pads for p in pair):
        return arr
    # Reflect (mirror without repeating the edge) keeps image statistics at the scene edges;
    # a 1-pixel-wide read cannot be reflected, so it is extended instead.
    small = any(arr.shape[i] < 2 and (pads[i][0] or pads[i][1]) for i in range(arr.ndim))
    return np.pad(arr, pads, mode="edge" if small else "reflect")


def read_padded(
    ds: rasterio.io.DatasetReader,
    row0: int,
    col0: int,
    height: int,
    width: int,
    bands: Sequence[int],
    zero_is_nodata: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Read `(C, height, width)` starting at pixel (row0, col0), reflect-padded outside the raster.

    Returns the data in its native dtype and a validity mask `(height, width)` bool: False where
    any selected band is nodata or masked (or, with zero_is_nodata, where all bands are 0).
    """
    r, rh, pt, pb = _pad_spec(row0, height, ds.height)
    c, cw, pl, pr = _pad_spec(col0, width, ds.width)
    win = Window(c, r, cw, rh)
    with damaged_input(ds):
        data = ds.read(list(bands), window=win)
        valid = valid_pixels(ds, bands, window=win)
        valid = np.ones((rh, cw), dtype=bool) if valid is None else valid
    if zero_is_nodata:
        valid &= (data != 0).any(axis=0)
    refuse_non_finite(ds.name, data, valid, bands)
    pads = [(pt, pb), (pl, pr)]
    return _pad(data, [(0, 0), *pads]), _pad(valid, pads)


def valid_pixels(
    ds: Any, bands: Sequence[int], window: Window | None = None, size: tuple[int, int] | None = None
) -> np.ndarray | None:
    """Where every selected band is valid `(H, W)`, in `window` (or the whole raster read at `size`,
    nearest samples): the file's nodata and masks, and an alpha band's transparency (GDAL masks by it
    only when the TIFF declares it an extra sample). None when every pixel may count."""
    masked = [b for b in bands if band_masked(ds, b)]
    shape = None if size is None else (len(masked), *size)
    valid = (ds.read_masks(masked, window=window, out_shape=shape) > 0).all(axis=0) if masked else None
    alpha = alpha_band(ds)
    if alpha is not None and alpha not in bands:
        opaque = ds.read(alpha, window=window, out_shape=size, resampling=Resampling.nearest) > 0
        valid = opaque if valid is None else valid & opaque
    return valid


class WholeRead(NamedTuple):
    data: np.ndarray  # (C, H, W) in the file's dtype, every band but an alpha band
    valid: np.ndarray | None  # (H, W): nodata, masks and alpha transparency; None: all pixels count
    bands: list[int]  # the 1-based bands in `data`


def read_whole(
    ds: rasterio.io.DatasetReader,
    what: str = "input",
    window: Window | None = None,
    bands: Sequence[int] | None = None,
) -> WholeRead:
    """The bands of `ds` (or of its `window`; `bands`, 1-based: those only) and where they are valid:
    reads that need the whole scene at once (metrics, the Wald protocol, training). An alpha band is
    a mask, not data, as in `read_padded`. Complex pixels and damaged files are one-line errors."""
    check_pixel_type(ds, what)
    bands = select_bands(ds, bands, "MS" if bands is not None else what)
    with damaged_input(ds):
        data = ds.read(bands, window=window)
        valid = valid_pixels(ds, bands, window=window)
    return WholeRead(data, valid, bands)


def pad_array(
    arr: np.ndarray, valid: np.ndarray, row0: int, col0: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """`read_padded` for an in-memory `(C, H, W)` array and its `(H, W)` validity."""
    r, rh, pt, pb = _pad_spec(row0, height, arr.shape[-2])
    c, cw, pl, pr = _pad_spec(col0, width, arr.shape[-1])
    pads = [(pt, pb), (pl, pr)]
    return _pad(arr[:, r : r + rh, c : c + cw], [(0, 0), *pads]), _pad(valid[r : r + rh, c : c + cw], pads)


def read_decimated(
    ds: rasterio.io.DatasetReader, bands: Sequence[int], window: Window, out_shape: tuple[int, int]
) -> np.ndarray:
    """Area-averaged read of a window to a smaller shape `(C, h, w)` (uses overviews when present)."""
    with damaged_input(ds):
        return ds.read(
            list(bands), window=window, out_shape=(len(bands), *out_shape), resampling=Resampling.average
        )


@contextlib.contextmanager
def damaged_input(ds: Any) -> Iterator[None]:
    """A file that opened but cannot be decoded (truncated, corrupted bytes) is bad input naming
    the file (exit 2), not a disk problem: GDAL reports both as the same I/O error."""
    try:
        yield
    except (RasterioError, CPLE_BaseError) as exc:
        why = reason(exc)
        if "No such file or directory" in why:  # a VRT's source, a sidecar: moved, not damaged
            raise FusionError(
                f"{ds.name} refers to a file that is missing ({why}); restore it or fix the path"
            ) from exc
        raise FusionError(
            f"{ds.name} is damaged (truncated or corrupted: {why}); re-download or re-export it"
        ) from exc
