"""Raster I/O with rasterio: opening with clear errors, padded window reads with validity masks,
DN-scale detection, the output profile, and the atomic (optionally Cloud-Optimized) writer.

Everything that touches a GeoTIFF on disk lives here; geometry between two grids is `align`,
windows and blending are `tiling`.
"""

from __future__ import annotations

import contextlib
import json
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
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from fusion_cli.errors import FusionError

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


def dtype_range(dtype: str | np.dtype) -> tuple[float, float] | None:
    """Representable range of an integer dtype; None for floats (no clipping)."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return float(info.min), float(info.max)
    return None


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
    data = ds.read(list(bands), window=win)
    if has_mask(ds, bands):
        valid = (ds.read_masks(list(bands), window=win) > 0).all(axis=0)
    else:
        valid = np.ones((rh, cw), dtype=bool)
    if zero_is_nodata:
        valid &= (data != 0).any(axis=0)
    pads = [(pt, pb), (pl, pr)]
    return _pad(data, [(0, 0), *pads]), _pad(valid, pads)


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
    return ds.read(
        list(bands), window=window, out_shape=(len(bands), *out_shape), resampling=Resampling.average
    )


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
    if compress not in {"deflate", "zstd", "lzw", "none"}:
        raise FusionError(f"unknown compression {compress!r}; use deflate, zstd, lzw or none")
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
    out_path: str | os.PathLike[str], overwrite: bool, inputs: Sequence[str | os.PathLike[str]]
) -> Path:
    """Fail early (before any work) if the output cannot be written where asked."""
    out = Path(out_path)
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


def _temp_name(out: Path, tag: str) -> Path:
    # Same folder as the output so the final rename is atomic (same filesystem); hidden name.
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}.tif")


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
                raise FusionError(f"cannot write output {self.out}: {str(exc).splitlines()[0]}") from None
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
        self._dst.write(data, window=win)
        if self.use_mask:
            m = (
                np.full(data.shape[-2:], 255, np.uint8)
                if valid is None
                else np.where(valid, 255, 0).astype(np.uint8)
            )
            self._dst.write_mask(m, window=win)

    def update_tags(self, **tags: Any) -> None:
        assert self._dst is not None
        self._dst.update_tags(**{k: _tag_text(v) for k, v in tags.items()})

    def commit(self) -> Path:
        """Mark complete, close, convert to COG if asked, and rename into place."""
        assert self._dst is not None
        if self.out.exists() and not self.overwrite:
            raise FusionError(f"output {self.out} appeared while fusing; pass --overwrite to replace it")
        self._dst.update_tags(**{COMPLETE_TAG: "1"})
        self._dst.close()
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
