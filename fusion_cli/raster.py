"""Raster I/O with rasterio: opening with clear errors, padded window reads with validity masks,
DN-scale detection, the output profile, and the atomic (optionally Cloud-Optimized) writer.

Everything that touches a GeoTIFF on disk lives here; geometry between two grids is `align`,
windows and blending are `tiling`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio._err import CPLE_BaseError  # GDAL errors (CPLE_*): rasterio exports them only here
from rasterio.enums import ColorInterp, Interleaving, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from fusion_cli.choices import COMPRESSIONS
from fusion_cli.errors import FusionError, OutputWriteError

# The tag written last, just before the file is closed: a file without it was not finished.
COMPLETE_TAG = "FUSION_COMPLETE"
BLOCK = 256
# DEFLATE level of the outputs: with the horizontal predictor, real 16-bit products barely compress
# further at higher levels (GSA on the WV3 pair: 14 267 KiB at level 1, 14 242 at 3, 14 379 at 6; the
# Landsat-8 example: 1 876 / 1 921 / 1 931 KiB), while level 1 costs the least CPU: EXP on the
# 2048-px benchmark scene runs at 6.2 PAN Mpx/s end to end against 5.3 at level 3.
DEFLATE_LEVEL = 1
# Tag of a float raster whose values are DN of another dtype (e.g. a Wald-reduced uint8 MS)
SOURCE_DTYPE_TAG = "FUSION_SOURCE_DTYPE"
# Bounded GDAL block cache: without it GDAL may cache up to 5 % of RAM while writing, which
# grows with the scene. Internal masks keep the mask inside the GeoTIFF (no .msk sidecar).
GDAL_ENV = {"GDAL_CACHEMAX": 32, "GDAL_TIFF_INTERNAL_MASK": True}


def gdal_env() -> rasterio.Env:
    return rasterio.Env(**GDAL_ENV)


def is_gdal_path(path: str | os.PathLike[str]) -> bool:
    """A GDAL virtual path (`/vsizip/...`, `/vsicurl/...`, `s3://...`): not a local file to check with
    `Path.exists()`, nor to pass through `Path` (which folds the `//` these paths rely on)."""
    text = os.fspath(path)
    return text.startswith("/vsi") or "://" in text


def recorded_path(path: str | os.PathLike[str]) -> str:
    """How a product's tags name an input: absolute for a local file, a GDAL path as given."""
    return os.fspath(path) if is_gdal_path(path) else str(Path(path).resolve())


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
            return rasterio.open(p, "r")
    except RasterioIOError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unknown format"
        if isinstance(p, str):  # GDAL decides whether a virtual path exists
            raise FusionError(
                f"{what} cannot be opened by GDAL ({first}): {p}; check the path inside the archive or URL"
            ) from None
        raise FusionError(f"{what} is not a readable raster ({first}): {p}") from None


def is_warped(ds: Any) -> bool:
    """Whether `ds` is a GDAL warped VRT (an input reprojected on the fly)."""
    from rasterio.vrt import WarpedVRT

    return isinstance(ds, WarpedVRT)


def select_bands(ds: rasterio.io.DatasetReader, bands: Sequence[int] | None, what: str = "MS") -> list[int]:
    """1-based band indexes to read; all bands but an alpha band when `bands` is None."""
    if bands is None:
        return [i for i in range(1, ds.count + 1) if ds.colorinterp[i - 1] != ColorInterp.alpha]
    bad = [b for b in bands if b < 1 or b > ds.count]
    if bad:
        raise FusionError(
            f"{what} has {ds.count} bands, cannot select band(s) {bad}; use --bands 1..{ds.count}"
        )
    return list(bands)


def detect_dn_max(ds: rasterio.io.DatasetReader) -> float | None:
    """Largest DN the sensor can produce, from NBITS metadata (e.g. 11 -> 2047); None if unknown."""
    nbits = ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") or ds.tags(ns="IMAGE_STRUCTURE").get("NBITS")
    if nbits is None:
        return None
    try:
        return float(2 ** int(nbits) - 1)
    except ValueError:
        return None


# Default ceiling on a product's pixels (PAN grid): 10 Gpx, far above real scenes (a WorldView
# strip is ~1.5 Gpx), far below what a sparse or mistaken header can declare (10^12 px = 12 TB).
MAX_PIXELS = 1e10


def check_scene_size(height: int, width: int, max_pixels: float | None) -> None:
    """Refuse a product larger than `max_pixels` (None: MAX_PIXELS) before any work."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if height * width > limit:
        raise FusionError(
            f"the product would be {height} x {width} = {height * width / 1e9:.3g} Gpx, over the "
            f"limit of {limit / 1e9:.3g} Gpx; check the inputs' sizes, or raise --max-pixels"
        )


def check_dn_max(dn_max: float | None) -> None:
    """--dn-max is the largest valid DN: a positive finite number (0 or NaN clip everything to 0)."""
    if dn_max is not None and not (math.isfinite(dn_max) and dn_max > 0):
        raise FusionError(f"--dn-max must be a positive number like 2047 or 65535, got {dn_max}")


def check_pixel_type(ds: rasterio.io.DatasetReader, what: str) -> None:
    """Complex pixels would lose their imaginary part: refuse them (and anything not numeric)."""
    for dt in set(ds.dtypes):
        kind = np.dtype(dt).kind
        if kind not in "uif":
            raise FusionError(
                f"{what} {ds.name} has {dt} pixels; fusion needs real-valued integer or float "
                "bands (convert it, e.g. gdal_translate -ot Float32 on the amplitude)"
            )


def check_same_file(pan: str | os.PathLike[str], ms: str | os.PathLike[str]) -> None:
    """The two inputs of a fusion must be two files: one given twice 'fuses' with itself."""
    with contextlib.suppress(OSError):
        if os.path.samefile(pan, ms):
            raise FusionError(f"the PAN and MS are the same file ({ms}); give the two images of the pair")


def check_narrowing(in_dtype: str, out_dtype: str, lo: float | None, hi: float | None) -> None:
    """Refuse an integer --dtype that cannot hold the input's value range [lo, hi] (every value past
    it would be clipped: int8 output of uint16 data is 127 everywhere)."""
    rng = dtype_range(out_dtype)
    if rng is None or lo is None or hi is None:
        return
    if lo < rng[0] or hi > rng[1]:
        raise FusionError(
            f"--dtype {out_dtype} holds {rng[0]:g}..{rng[1]:g} but the {in_dtype} input's values reach "
            f"{lo:g}..{hi:g}; use {in_dtype} or float32, or state the real ceiling with --dn-max"
        )


def dtype_range(dtype: str | np.dtype) -> tuple[float, float] | None:
    """Representable range of an integer dtype; None for floats (no clipping)."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return float(info.min), float(info.max)
    return None


class NodataOverride:
    """An input read with a nodata value given on the command line (`--nodata`, `--pan-nodata`,
    `--ms-nodata`) for files that carry none, such as a zero collar without a flag: a pixel of a
    band is invalid where it equals the value (GDAL's meaning), on top of the file's own nodata or
    masks. Everything else is the wrapped dataset's; closing this closes it."""

    def __init__(self, ds: Any, value: float) -> None:
        self._ds = ds
        self.nodata = float(value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)

    def __enter__(self) -> NodataOverride:
        return self

    def __exit__(self, *exc: object) -> None:
        self._ds.close()

    @property
    def nodatavals(self) -> tuple[float, ...]:
        return (self.nodata,) * self._ds.count

    @property
    def mask_flag_enums(self) -> tuple[list[MaskFlags], ...]:
        return tuple([MaskFlags.nodata] for _ in range(self._ds.count))

    def read_masks(self, indexes: Any = None, window: Any = None, **kwargs: Any) -> np.ndarray:
        own = self._ds.read_masks(indexes, window=window, **kwargs)
        data = self._ds.read(indexes, window=window, **kwargs)  # blocks just read: GDAL's cache
        hit = np.isnan(data) if math.isnan(self.nodata) else data == self.nodata
        return np.where(hit, np.uint8(0), own)


def with_nodata(ds: Any, value: float | None) -> Any:
    """`ds` with `value` as an extra nodata value (NodataOverride), or `ds` itself for None."""
    return ds if value is None else NodataOverride(ds, value)


def has_mask(ds: rasterio.io.DatasetReader, bands: Sequence[int] | None = None) -> bool:
    """True if some pixels may be invalid: a nodata value, an internal/sidecar mask or alpha."""
    idx = [b - 1 for b in (bands or range(1, ds.count + 1))]
    return any(MaskFlags.all_valid not in ds.mask_flag_enums[i] for i in idx)


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
        if has_mask(ds, bands):
            valid = (ds.read_masks(list(bands), window=win) > 0).all(axis=0)
        else:
            valid = np.ones((rh, cw), dtype=bool)
    if zero_is_nodata:
        valid &= (data != 0).any(axis=0)
    refuse_non_finite(ds.name, data, valid)
    pads = [(pt, pb), (pl, pr)]
    return _pad(data, [(0, 0), *pads]), _pad(valid, pads)


def read_whole(
    ds: rasterio.io.DatasetReader, what: str = "input", window: Window | None = None
) -> np.ndarray:
    """Every band of `ds` (or of its `window`) in its own dtype, `(C, H, W)`: reads that need the whole
    scene at once (metrics, the Wald protocol, training). Complex pixels and damaged files are
    one-line errors."""
    check_pixel_type(ds, what)
    with damaged_input(ds):
        return ds.read(window=window)


def refuse_non_finite(name: str, data: np.ndarray, valid: np.ndarray | None = None) -> None:
    """NaN or inf outside the declared nodata (`valid`: where data counts; None: everywhere) would
    spread through every filter and regression (a singular matrix, NaN statistics, a failed
    assert in a metric): refuse them, saying how to declare them."""
    if data.dtype.kind != "f":
        return
    bad = ~np.isfinite(data).all(axis=0)
    if valid is not None:
        bad &= valid
    if bad.any():
        raise FusionError(
            f"{name} has NaN or infinite values that are not its nodata ({int(bad.sum())} px); "
            "declare them nodata (gdal_edit.py -a_nodata nan FILE) or fill them"
        )


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
        raise FusionError(
            f"{ds.name} is damaged (truncated or corrupted: {_reason(exc)}); re-download or re-export it"
        ) from exc


def band_descriptions(ds: rasterio.io.DatasetReader, bands: Sequence[int]) -> list[str]:
    return [ds.descriptions[b - 1] or f"band {b}" for b in bands]


def rgb_colorinterp(count: int, *namings: Sequence[str]) -> list[ColorInterp] | None:
    """Colour interpretation of a `count`-band product: red, green and blue for the bands named so
    (e.g. "B4 red", "red (630-690 nm)"; not "red edge"), the others undefined, from the first of
    `namings` (band descriptions, a model card's bands) that names each of the three exactly once;
    None when none does (GIS viewers then show the first three bands)."""
    for names in namings:
        if len(names) != count:
            continue
        words = [set(re.findall(r"[a-z]+", name.lower())) for name in names]
        colours = ("red", "green", "blue")
        hits = {c: [i for i, w in enumerate(words) if c in w and "edge" not in w] for c in colours}
        if all(len(v) == 1 for v in hits.values()):
            interp = [ColorInterp.undefined] * count
            for colour, (i,) in hits.items():
                interp[i] = ColorInterp[colour]
            return interp
    return None


def output_profile(
    *,
    width: int,
    height: int,
    count: int,
    dtype: str,
    crs: Any,
    transform: Any,
    nodata: float | None,
    compress: str = "deflate",
    creation_options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Tiled, compressed GeoTIFF profile; predictor 2 for integers, 3 for floats. `creation_options`
    (GTiff's, e.g. {"ZLEVEL": "9", "BLOCKXSIZE": "512"}) replace the defaults of the same name."""
    compress = compress.lower()
    if compress not in COMPRESSIONS:
        raise FusionError(f"unknown compression {compress!r}; use {', '.join(COMPRESSIONS)}")
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype,
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "interleave": "pixel" if count <= 4 else "band",
        "BIGTIFF": "IF_SAFER",
    }
    if compress != "none":
        profile["num_threads"] = "ALL_CPUS"  # GDAL compresses blocks in worker threads
        profile["compress"] = compress
        profile["predictor"] = 3 if np.issubdtype(np.dtype(dtype), np.floating) else 2
        if compress == "deflate":
            profile["zlevel"] = DEFLATE_LEVEL
    if crs is not None:
        profile["crs"] = crs
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    for key, value in (creation_options or {}).items():
        # lower case, as the keys above: one entry per option, and the COG step finds compress/zlevel
        profile = {k: v for k, v in profile.items() if k.lower() != key.lower()}
        profile[key.lower()] = value
    return profile


def check_writable(
    out_path: str | os.PathLike[str],
    overwrite: bool,
    inputs: Sequence[str | os.PathLike[str]],
    side_outputs: Sequence[Path] = (),
) -> Path:
    """Fail early (before any work) if the output, or a side file written with it (a quicklook),
    cannot be written where asked."""
    out = Path(out_path)
    for side in side_outputs:
        if side.exists() and not overwrite:
            raise FusionError(f"{side} already exists; pass --overwrite to replace it")
    for src in inputs:
        if Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise FusionError(f"output {out} is one of the inputs; choose another output path")
    if out.is_dir():
        raise FusionError(f"output {out} is a folder; give a file name like {out / 'fused.tif'}")
    if out.exists() and not overwrite:
        raise FusionError(f"output {out} already exists; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FusionError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FusionError(f"output folder {parent} is not writable; choose another output path")
    return out


# Temporary names this tool writes beside an output: `.<name>.<tag>-<pid>-<8 hex><suffix>`, plus
# GDAL's own sidecars of such a file. Only names of this shape are ever removed as stale.
TEMP_TAGS = ("partial", "cog", "tmp")
# (a sidecar of `out`, like `<out>.metrics.json`, has its name between)
_TEMP_RE = re.compile(r"(?:\.[^/]+?)?\.(?:" + "|".join(TEMP_TAGS) + r")-\d+-[0-9a-f]+(?:\.[A-Za-z0-9]+)*\Z")


def _temp_name(out: Path, tag: str, suffix: str = ".tif") -> Path:
    # Same folder as the output so the final rename is atomic (same filesystem); hidden name.
    assert tag in TEMP_TAGS
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def is_own_temporary(out: Path, candidate: Path) -> bool:
    """Whether `candidate` is a temporary file this tool names for `out` (`_temp_name`)."""
    prefix = f".{out.name}"
    name = candidate.name
    return (
        candidate.parent == out.parent
        and name.startswith(prefix)
        and bool(_TEMP_RE.match(name[len(prefix) :]))
    )


def _reason(exc: BaseException) -> str:
    """First line of an error; rasterio's 'See previous exception' points at GDAL's own, its cause."""
    while exc.__cause__ is not None and "previous exception" in str(exc):
        exc = exc.__cause__
    return (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__


def verify_geotiff(path: Path, complete_tag: bool = True) -> None:
    """Raise OSError unless `path` opens, carries the completion tag and holds every block it
    indexes: a write cut short by a full disk or a file-size limit (which GDAL only prints, and
    rasterio's close does not raise) leaves a file without its directory or with blocks past its end."""
    size = path.stat().st_size
    with gdal_env(), rasterio.open(path) as ds:
        if complete_tag and ds.tags().get(COMPLETE_TAG) != "1":
            raise OSError("the completion tag is missing")
        # pixel-interleaved files share one block index for all bands
        for b in range(1, (ds.count if ds.interleaving == Interleaving.band else 1) + 1):
            for (i, j), _ in ds.block_windows(b):
                off = ds.get_tag_item(f"BLOCK_OFFSET_{j}_{i}", "TIFF", bidx=b)
                n = ds.get_tag_item(f"BLOCK_SIZE_{j}_{i}", "TIFF", bidx=b)
                if not off or not n or int(off) + int(n) > size:
                    raise OSError(f"block {i},{j} of band {b} is missing")


def write_geotiff(
    path: Path,
    data: np.ndarray,
    dtype: str,
    transform: Any = None,
    crs: Any = None,
    nodata: float | None = None,
    tags: dict[str, str] | None = None,
    descriptions: Sequence[str | None] | None = None,
    what: str = "image",
) -> None:
    """Write a whole `(C, H, W)` array as a deflate GeoTIFF (tiled when over 256 px), atomically and
    verified: integer `dtype`s get the values rounded and clipped to their range. `transform` None
    writes no georeferencing (for an input that had none); `descriptions` name the bands."""
    out = data
    if not np.issubdtype(np.dtype(dtype), np.floating):
        info = np.iinfo(dtype)
        out = np.clip(np.round(data), info.min, info.max)
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": dtype,
        "compress": "deflate",
        "predictor": 3 if dtype == "float32" else 2,
    }
    if data.shape[1] > BLOCK and data.shape[2] > BLOCK:
        profile.update(tiled=True, blockxsize=BLOCK, blockysize=BLOCK)
    if transform is not None:
        profile.update(transform=transform, crs=crs)
    if nodata is not None:
        profile["nodata"] = nodata
    with atomic_output(path, overwrite=True, what=what) as tmp:
        with warnings.catch_warnings():
            # a no-georef input gives a no-georef output, by design
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(tmp, "w", **profile)
        with ds:
            ds.write(out.astype(dtype))
            ds.update_tags(**(tags or {}))
            if descriptions and len(descriptions) == data.shape[0]:
                for i, d in enumerate(descriptions, start=1):
                    if d:
                        ds.set_band_description(i, d)
        verify_geotiff(tmp, complete_tag=False)


@contextlib.contextmanager
def atomic_output(
    out: str | os.PathLike[str], overwrite: bool = False, what: str = "output"
) -> Iterator[Path]:
    """A temporary path beside `out` to write a side file (PNG, CSV, JSON, HTML) to; renamed onto
    `out` only when the body succeeds and wrote something, else removed. An existing `out` needs
    `overwrite`; a failed write is an OutputWriteError naming `out` (exit 1), never a half file."""
    final = Path(out)
    if final.exists() and not overwrite:
        raise FusionError(f"{what} {final} already exists; pass --overwrite to replace it")
    tmp = _temp_name(final, "tmp", final.suffix)
    try:
        yield tmp
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise OSError("nothing was written")
        os.replace(tmp, final)
    except FusionError:
        raise
    except Exception as exc:  # a writer library's own error type (safetensors, matplotlib) included
        raise OutputWriteError(f"cannot write {what} {final}: {_reason(exc)}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class AtomicWriter:
    """Streams windows to a temporary GeoTIFF beside `out`; `commit()` renames it into place.

    Use as a context manager: on any exception (including KeyboardInterrupt) before commit the
    temporary files are removed, so no partial output ever appears under the final name.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        profile: dict[str, Any],
        *,
        descriptions: Sequence[str] | None = None,
        tags: dict[str, Any] | None = None,
        use_mask: bool = False,
        overwrite: bool = False,
        cog: bool = False,
        colorinterp: Sequence[ColorInterp] | None = None,
    ) -> None:
        self.out = Path(out)
        self.colorinterp = colorinterp
        self.profile = profile
        self.descriptions = descriptions
        self.tags = {k: _tag_text(v) for k, v in (tags or {}).items()}
        self.use_mask = use_mask
        self.overwrite = overwrite
        self.cog = cog
        self._tmp = _temp_name(self.out, "partial")
        self._env: rasterio.Env | None = None
        self._dst: rasterio.io.DatasetWriter | None = None
        self._committed = False

    def __enter__(self) -> AtomicWriter:
        self._env = gdal_env()
        self._env.__enter__()
        try:  # __exit__ does not run when __enter__ fails (or Ctrl-C lands in it): clean up here
            try:
                self._dst = rasterio.open(self._tmp, "w", **self.profile)
            except Exception as exc:
                raise FusionError(f"cannot write output {self.out}: {_reason(exc)}") from None
            if self.descriptions:
                for i, d in enumerate(self.descriptions, start=1):
                    self._dst.set_band_description(i, d)
            if self.colorinterp:
                self._dst.colorinterp = self.colorinterp
            self._dst.update_tags(**self.tags)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, data: np.ndarray, row0: int, col0: int, valid: np.ndarray | None = None) -> None:
        """Write `(C, h, w)` at (row0, col0); `valid (h, w)` goes to the internal mask if enabled."""
        assert self._dst is not None
        win = Window(col0, row0, data.shape[-1], data.shape[-2])
        with self._failing_write():
            self._dst.write(data, window=win)
            if self.use_mask:
                m = (
                    np.full(data.shape[-2:], 255, np.uint8)
                    if valid is None
                    else np.where(valid, 255, 0).astype(np.uint8)
                )
                self._dst.write_mask(m, window=win)

    @contextlib.contextmanager
    def _failing_write(self) -> Iterator[None]:
        """Any GDAL/OS error while writing is an OutputWriteError naming the output (exit 1)."""
        try:
            yield
        except (FusionError, OutputWriteError):
            raise
        except Exception as exc:
            raise OutputWriteError(f"writing output {self.out} failed: {_reason(exc)}") from exc

    def update_tags(self, **tags: Any) -> None:
        assert self._dst is not None
        self._dst.update_tags(**{k: _tag_text(v) for k, v in tags.items()})

    def commit(self) -> Path:
        """Mark complete, close, convert to COG if asked, and rename into place."""
        assert self._dst is not None
        if self.out.exists() and not self.overwrite:
            raise FusionError(f"output {self.out} appeared while fusing; pass --overwrite to replace it")
        with self._failing_write():
            return self._finish()

    def _finish(self) -> Path:
        assert self._dst is not None
        self._dst.update_tags(**{COMPLETE_TAG: "1"})
        self._dst.close()
        verify_geotiff(self._tmp)
        final = self._tmp
        if self.cog:
            final = _temp_name(self.out, "cog")
            self._cog_tmp = final
            with rasterio.open(self._tmp, "r+") as dst:
                factors = overview_factors(dst.width, dst.height)
                if factors:
                    dst.build_overviews(factors, Resampling.average)
            # The COG driver reuses the overviews just built and streams block by block.
            opts = {k: v for k, v in self.profile.items() if k in {"compress", "predictor"}}
            if "zlevel" in self.profile:  # the COG driver names the DEFLATE level LEVEL
                opts["level"] = self.profile["zlevel"]
            rasterio.shutil.copy(self._tmp, final, driver="COG", BLOCKSIZE=BLOCK, BIGTIFF="IF_SAFER", **opts)
            self._tmp.unlink()
            verify_geotiff(final)
        os.replace(final, self.out)
        self._committed = True
        return self.out

    def _cleanup(self) -> None:
        for p in (self._tmp, getattr(self, "_cog_tmp", None)):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    Path(p).unlink()
                with contextlib.suppress(FileNotFoundError):
                    Path(str(p) + ".ovr").unlink()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._dst is not None and not self._dst.closed:
                self._dst.close()
            if not self._committed:
                self._cleanup()
        finally:
            if self._env is not None:
                self._env.__exit__(exc_type, exc, tb)


def overview_factors(width: int, height: int, min_size: int = BLOCK) -> list[int]:
    """Powers of two until the smaller side fits in one block."""
    factors, f = [], 2
    while min(width, height) / f >= min_size / 2 and f <= 1024:
        factors.append(f)
        f *= 2
    return factors


def _tag_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, sort_keys=True)


def is_complete_output(path: str | os.PathLike[str]) -> bool:
    """True if `path` is a fusion-cli product that was written to the end (completion tag present)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with gdal_env(), rasterio.open(p) as ds:
            return ds.tags().get(COMPLETE_TAG) == "1"
    except Exception:
        return False


def iter_blocks(height: int, width: int, block: int = BLOCK) -> Iterator[Window]:
    for r in range(0, height, block):
        for c in range(0, width, block):
            yield Window(c, r, min(block, width - c), min(block, height - r))
