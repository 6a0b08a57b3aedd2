"""Assess fused rasters on disk: read the product and its reference (or its PAN and MS), build the
validity mask, check the geometry, and call the quality indices of `fusion_cli.metrics`.

Shared by `fusion metrics` and `fusion report`. Rasters are read whole in their own type. The
full-resolution indices filter them by row strips (`metrics.fullres`), so their memory is the rasters
and a bounded work area; the reduced-resolution ones work on whole float64 copies (a 2048 x 2048 x 8
product is ~270 MB in float64).

Validity: a pixel is valid when every band is valid in every input, by the rasters' own masks (nodata
value, internal mask, alpha) and by `nodata` if given (a pixel whose bands all equal it is invalid:
for unflagged zero borders such as SpaceNet's). Low-resolution MS validity is carried to the PAN grid
by pixel replication.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.transform import Affine
from rasterio.windows import Window

from fusion_cli.align import block_windows, only_gcps_or_rpcs
from fusion_cli.errors import FusionError
from fusion_cli.memory import available_memory
from fusion_cli.metrics import full_resolution, reduced_resolution
from fusion_cli.metrics.fullres import work_bytes
from fusion_cli.metrics.table import index_order
from fusion_cli.notices import notify
from fusion_cli.raster.bands import Encoding
from fusion_cli.raster.checks import check_same_encoding, refuse_constant
from fusion_cli.raster.nodata import nodata_fits
from fusion_cli.raster.read import constant_value, recorded_params
from fusion_cli.raster.write import COMPLETE_TAG
from fusion_cli.sensors import canonical_sensor, sensor_band_numbers


@dataclass
class EvalOptions:
    """Conventions of an evaluation (each is documented in `fusion metrics --help`)."""

    ratio: int | None = None  # PAN/MS pixel-size ratio; default: from the grids, or the product's tags
    cut: int = 0  # toolbox border cut K: keep [K-1, H-K)
    clip_bits: int | None = None  # clip the fused image to [0, 2^L] first
    # Q2n's and D_lambda^K's uint16 rounding (the toolbox's); None: when the reference (full
    # resolution: the MS) holds integer DN, as float reflectance would keep two or three grey levels
    round_uint16: bool | None = None
    per_band: bool = False
    block: int = 32  # Q2n / Q / QNR block size
    psnr_peak: float | str = "dnmax"
    # MTF gains for D_lambda^K and HPC; None: the sensor the product records, else generic gains
    sensor: str | None = None
    nodata: float | None = None  # extra nodata value
    # 1-based bands of the reference / MS that the product's bands are, in its order (what --bands
    # selected when it was fused); None: all, or the selection its FUSION_PARAMS tag records
    bands: list[int] | None = None
    # which of the sensor's bands (1-based) the MS file's bands are, one per band: their MTF gains
    # (`sensors.sensor_band_numbers`); None: the sensor's bands in order, or its 4-band set
    sensor_bands: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Image:
    """A raster read whole: `data (C, H, W)` native dtype, `valid (H, W)` bool, and where it came from."""

    path: Path | str  # a str for a GDAL virtual path (/vsizip/...), which Path would fold
    data: np.ndarray
    valid: np.ndarray
    tags: dict[str, str] = field(default_factory=dict)
    descriptions: list[str | None] = field(default_factory=list)
    transform: Affine = field(default_factory=Affine.identity)
    crs: Any = None
    encoding: Encoding | None = None  # its bands' scale, offset and unit
    # `valid` before NaN/inf were left out (nodata, masks, alpha only): a band selection takes NaN
    # from its own bands only (a dead NaN band left out by --bands invalidated every pixel)
    declared: np.ndarray | None = None
    # placed by ground control points or RPCs only (no geotransform): `align` refuses to line it up
    only_gcps_or_rpcs: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(os.fspath(self.path))

    @property
    def height(self) -> int:
        return self.data.shape[-2]

    @property
    def width(self) -> int:
        return self.data.shape[-1]

    def crop(self, win: Window) -> Image:
        """The part of the image in `win`; the transform follows (a grid without georeferencing keeps
        the identity: such grids are related by their top-left corners)."""
        rows, cols = win.toslices()
        georef = self.crs is not None or not self.transform.is_identity
        t = self.transform @ Affine.translation(win.col_off, win.row_off) if georef else self.transform
        declared = None if self.declared is None else self.declared[rows, cols]
        return replace(
            self, data=self.data[:, rows, cols], valid=self.valid[rows, cols], transform=t, declared=declared
        )

    def select(self, data: np.ndarray, encoding: Encoding | None) -> Image:
        """The image with only `data` `(C', H, W)`, some of its bands: valid where they are finite."""
        valid = self.valid if self.declared is None else self.declared & np.isfinite(data).all(axis=0)
        return replace(self, data=data, encoding=encoding, valid=valid)


@dataclass
class Case:
    """One product to evaluate, with a reference (reduced resolution) or its PAN and MS (full)."""

    fused: Image
    ref: Image | None = None
    pan: Image | None = None
    ms: Image | None = None
    ratio: int | None = None  # PAN/MS pixel-size ratio
    # the reference's (or MS's) 1-based bands compared with the product's, in its order, once
    # `with_product_bands` chose them; None: all of them, as they are
    bands_compared: list[int] | None = None

    @property
    def mode(self) -> str:
        return "reduced" if self.ref is not None else "full"


def read_image(path: str | Path, what: str, nodata: float | None = None) -> Image:
    """Read every band of a raster with its validity mask (see the module docstring)."""
    from fusion_cli.raster import damaged_input, gdal_env, is_gdal_path, open_raster, read_whole

    with gdal_env(), open_raster(path, what) as ds, damaged_input(ds):
        data, valid, bands = read_whole(ds, what)  # an alpha band masks, it is not a band
        valid = np.ones(data.shape[1:], bool) if valid is None else valid
        tags = dict(ds.tags())
        descriptions = [ds.descriptions[b - 1] for b in bands]
        transform, crs = ds.transform, ds.crs
        encoding = Encoding.of(ds, bands)
        gcps_only = only_gcps_or_rpcs(ds)
    if nodata is not None:
        valid &= ~(data == nodata).all(axis=0)
    declared = None
    if np.issubdtype(data.dtype, np.floating):
        declared = valid.copy()
        valid &= np.isfinite(data).all(axis=0)
    where = os.fspath(path) if is_gdal_path(path) else Path(path)
    return Image(where, data, valid, tags, descriptions, transform, crs, encoding, declared, gcps_only)


def product_sources(fused: Image) -> tuple[str | None, str | None, dict[str, Any]]:
    """The PAN and MS paths and run parameters a `fusion` product records in its tags (or None)."""
    return fused.tags.get("FUSION_PAN"), fused.tags.get("FUSION_MS"), recorded_params(fused.tags)


# Peak memory of scoring. At reduced resolution, per product pixel and band (its inputs read whole,
# float64 copies, the filtered images), measured on 8-band WV3 products: 5.95 GB for 8100^2 (11 B) and
# 1.68 GB for 2600^2 uint16 (22 B above the interpreter): 24 B. At full resolution the product, PAN
# and MS are read whole in their own type and the filters run by row strips (`metrics.fullres`):
# per PAN pixel, the PAN, the masks and a float64 copy of the PAN for its percentiles (measured:
# 8 x 3900^2 uint16 1.40 GB, 8 x 6500^2 2.23 GB, ~15 B per pixel beside the product): 24 B; and the
# largest strip's work (`metrics.fullres.work_bytes`, which depends on the block).
REDUCED_BYTES_PER_SAMPLE = 24
FULL_BYTES_PER_PIXEL = 24


def scoring_bytes(bands: int, height: int, width: int, itemsize: int, full: bool, block: int = 32) -> int:
    """Peak memory of scoring a product of that shape and sample size (bytes, beyond the interpreter)."""
    if not full:
        return bands * height * width * REDUCED_BYTES_PER_SAMPLE
    return (
        bands * height * width * itemsize
        + height * width * FULL_BYTES_PER_PIXEL
        + work_bytes(bands, height, width, block)
    )


def check_scoring_memory(fused: str | Path, full: bool, block: int = 32) -> None:
    """Refuse, before reading, a product whose scoring needs more memory than is available: the
    kernel killed `fusion metrics` on an 8 x 8100^2 product (24 GB machine) without a word."""
    from fusion_cli.raster import open_raster

    with open_raster(fused, "fused product") as ds:
        bands, height, width = ds.count, ds.height, ds.width
        itemsize = max(np.dtype(t).itemsize for t in ds.dtypes)
    mode = "full" if full else "reduced"
    need, free = scoring_bytes(bands, height, width, itemsize, full, block), available_memory()
    if free is not None and need > free:
        why = "the product and PAN are read whole" if full else "the indices read the images whole"
        raise FusionError(
            f"scoring {os.path.basename(os.fspath(fused))} ({bands} x {height} x {width}) at {mode} "
            f"resolution needs about {need / 2**30:.1f} GiB of memory, {free / 2**30:.1f} GiB is available "
            f"({why}): score a crop (gdal_translate -srcwin) or on a machine with more memory"
        )


def load_case(
    fused: str | Path,
    ref: str | Path | None = None,
    pan: str | Path | None = None,
    ms: str | Path | None = None,
    nodata: float | None = None,
    ratio: int | None = None,
    block: int = 32,
) -> Case:
    """Read a product and what it is judged against: `ref`, else `pan` + `ms`, else the product's tags.

    The images are lined up by their geotransforms (`align.block_windows`) and cropped to the area
    they all cover, so that the arrays compare pixel for pixel: the product and its reference on one
    grid; the product and PAN `ratio` times the MS (e.g. the demo's Landsat product, which lacks the
    half-covered first PAN row and column). `ratio` (the PAN/MS pixel-size ratio) is checked against
    the grids; with a reference it defaults to the one the product's FUSION_PARAMS tag records.
    `block`: the indices' block size, which the memory check counts with.
    """
    check_scoring_memory(fused, full=ref is None, block=block)
    img = read_image(fused, "fused product", nodata)
    if "FUSION_PARAMS" in img.tags and img.tags.get(COMPLETE_TAG) != "1":
        raise FusionError(
            f"{fused} is an unfinished product: it lacks the {COMPLETE_TAG} tag that a fusion writes last "
            "(the run that wrote it was cut short); fuse it again"
        )
    case = _load_case(img, ref, pan, ms, nodata, ratio)
    images = [i for i in (case.fused, case.ref, case.pan, case.ms) if i is not None]
    if nodata is not None and not any(nodata_fits(nodata, str(i.data.dtype)) for i in images):
        kinds = ", ".join(sorted({str(i.data.dtype) for i in images}))
        raise FusionError(
            f"--nodata {nodata:g} cannot occur in any input's pixels ({kinds}); give a value they can hold"
        )
    return case


def _load_case(
    img: Image,
    ref: str | Path | None,
    pan: str | Path | None,
    ms: str | Path | None,
    nodata: float | None,
    ratio: int | None,
) -> Case:
    if ref is not None:
        if pan is not None or ms is not None:
            raise FusionError("give either --ref (reduced resolution) or --pan and --ms (full), not both")
        gt = read_image(ref, "reference", nodata)
        _, win, (f_win,) = block_windows(gt, [img], 1, ("reference", "product"), bare_pairs_by_size=True)
        recorded = product_sources(img)[2].get("ratio")
        if isinstance(recorded, int) and ratio is not None and ratio != recorded:
            raise FusionError(
                f"--ratio {ratio} contradicts the ratio {recorded} that {img.name} was fused at (its "
                "FUSION_PARAMS tag): ERGAS scales with it; drop --ratio"
            )
        if ratio is None and isinstance(recorded, int):
            ratio = recorded
        return Case(img.crop(f_win), ref=gt.crop(win), ratio=ratio)
    if (pan is None) != (ms is None):
        raise FusionError("full-resolution evaluation needs both --pan and --ms")
    if pan is None:
        pan, ms, _ = product_sources(img)
        if pan is None or ms is None:
            raise FusionError(
                f"{img.name}: give --ref GT, or --pan and --ms (products written by fusion name them "
                "in their FUSION_PAN / FUSION_MS tags, this one does not)"
            )
        check_recorded_inputs(img, pan, ms)
    pan_img, ms_img = read_image(pan, "PAN", nodata), read_image(ms, "MS", nodata)
    refuse_constant(constant_value(pan_img.data, pan_img.valid), "PAN", pan)
    r, win, (f_win, p_win) = block_windows(ms_img, [img, pan_img], ratio, ("MS", "product", "PAN"))
    return Case(img.crop(f_win), pan=pan_img.crop(p_win), ms=ms_img.crop(win), ratio=r)


def check_recorded_inputs(img: Image, pan: str, ms: str) -> None:
    """Refuse the inputs a product's tags name when they are missing (a moved product: "PAN file not
    found" gave no hint), or not the files it was fused from (its FUSION_REQUEST fingerprints: size
    and time, else SHA-256): an MS rewritten after the fusion was scored at exit 0 (QNR 0.848 became
    0.264, HQNR 0.838 became 0.038)."""
    from fusion_cli.raster import changed_inputs, is_gdal_path

    paths = {"pan": pan, "ms": ms}
    for role, path in paths.items():
        if not is_gdal_path(path) and not os.path.exists(path):  # a moved product, or moved inputs
            raise FusionError(
                f"the {role.upper()} {path} that {img.name} names (its FUSION_{role.upper()} tag) is not "
                "there: pass --pan and --ms (or --ref) to say what to score it against"
            )
    try:
        made = json.loads(img.tags.get("FUSION_REQUEST", "{}"))
    except ValueError:
        return
    for role in changed_inputs(made, paths):
        raise FusionError(
            f"the {role.upper()} {paths[role]} that {img.name} names is not the file it was fused from (it "
            "changed or was replaced since: its size, or its time and SHA-256, differ; added overviews "
            "or tags count too); pass --pan and --ms to score against the files as they are now"
        )


def with_product_bands(case: Case, bands: list[int] | None = None) -> Case:
    """The case with its reference and MS cut to the product's bands, in its order: what `score`
    compares, and what the report's figures show."""
    img, what = (case.ref, "reference") if case.ref is not None else (case.ms, "MS")
    if img is None:
        return case
    data, taken = _bands_of_product(case.fused, img, what, bands)
    encoding = img.encoding.select([b - 1 for b in taken]) if img.encoding and taken else img.encoding
    img = img.select(data, encoding)
    # the indices compare stored DN: the product's with the reference's (or the MS's), and the PAN's
    why = "the indices compare stored DN"
    if case.fused.encoding is not None and encoding is not None:
        check_same_encoding(("product", case.fused.encoding), (what, encoding), why, per_band=True)
    if case.ref is not None:
        return replace(case, ref=img, bands_compared=taken)
    if encoding is not None and case.pan is not None and case.pan.encoding is not None:
        check_same_encoding(("PAN", case.pan.encoding), ("MS", encoding), why)
    return replace(case, ms=img, bands_compared=taken)


def _bands_of_product(
    fused: Image, img: Image, what: str, given: list[int] | None = None
) -> tuple[np.ndarray, list[int] | None]:
    """`img`'s bands that match the product's, and which they are (1-based; None: all, as they are):
    the `given` 1-based bands (in the fused order), else the `bands` the product's FUSION_PARAMS tag
    records (a subset, or the same bands reordered: `--bands 3,2,1,4,5,6` fuses red first), else all
    when the counts agree. An `img` whose band names are the product's, in its order, is taken as it
    is (already selected and ordered); without names, an `img` that is already in the product's order
    needs `given` (the tag says what the MS was, not what this file is)."""
    data, c = img.data, fused.data.shape[0]
    if given is not None:
        if len(given) != c or min(given) < 1 or max(given) > data.shape[0]:
            raise FusionError(
                f"bands {given} do not fit: the product has {c} bands, the {what} {img.name} {data.shape[0]}"
            )
        return data[[b - 1 for b in given]], list(given)
    named = [d for d in fused.descriptions if d]
    if data.shape[0] == c and len(named) == c and list(img.descriptions) == list(fused.descriptions):
        return data, None
    bands = product_sources(fused)[2].get("bands")
    if isinstance(bands, list) and len(bands) == c and all(isinstance(b, int) for b in bands):
        if max(bands) <= data.shape[0] and min(bands) >= 1:
            return data[[b - 1 for b in bands]], list(bands)
    if data.shape[0] == c:
        return data, None
    raise FusionError(
        f"fused has {c} bands but the {what} {img.name} has {data.shape[0]}: pass the {what} that was fused"
    )


def holds_whole_dn(img: Image) -> bool:
    """Whether an image holds whole-number DN that Q2n rounds to uint16 (`metrics.holds_whole_dn`)."""
    from fusion_cli.metrics import holds_whole_dn as whole

    return whole(img.data, img.valid)


# How far apart (99th percentiles, the MS's over all its bands) a PAN and its MS may be before they are
# in other units: the real pairs here sit 0.4-1.6x; a uint8 PAN beside a uint16 MS (1/257) made D_s 0
# and QNR 0.94 at exit 0, and reflectance beside DN sits 1e4 apart.
PAN_MS_LEVEL_RATIO = 50.0


def check_pan_ms_levels(pan: np.ndarray, ms: np.ndarray, pan_name: str, ms_name: str) -> None:
    """Refuse a PAN whose valid values sit PAN_MS_LEVEL_RATIO times above or below the MS's: the
    no-reference indices compare them as the same DN (UIQI is not scale-free)."""
    if pan.size == 0 or ms.size == 0:
        return
    p, m = (float(np.percentile(a, 99)) for a in (pan, ms))
    if p <= 0 or m <= 0 or max(p / m, m / p) > PAN_MS_LEVEL_RATIO:
        raise FusionError(
            f"PAN {pan_name} (99th percentile {p:.4g}) and MS {ms_name} ({m:.4g}) are not in the same units "
            "or bit depth: the full-resolution indices compare them as one DN; give the PAN and MS the "
            "product was fused from"
        )


def _product_sensor_bands(case: Case, opts: EvalOptions, file_bands: int) -> list[int] | None:
    """Which of the sensor's bands the product's are (their MTF gains): from --sensor-bands (the MS
    file's) through the bands compared; else as the product recorded them when it was fused for the
    same sensor (so `fusion metrics` scores what `batch --metrics` scored); else as the MS file's
    band count tells (`sensors.sensor_band_numbers`)."""
    if opts.sensor_bands is None and opts.sensor is not None:
        params = product_sources(case.fused)[2]
        recorded = params.get("sensor_bands")
        if (
            params.get("sensor") == canonical_sensor(opts.sensor)
            and isinstance(recorded, list)
            and len(recorded) == case.fused.data.shape[0]
        ):
            return [int(b) for b in recorded]
    return sensor_band_numbers(opts.sensor, file_bands, case.bands_compared, opts.sensor_bands)


def _recorded_sensor(fused: Image) -> str | None:
    """The sensor a `fusion` product was fused for (its FUSION_PARAMS tag), when it names a known one:
    without --sensor, its D_lambda^K and HPC use that sensor's gains, as `batch --metrics` did."""
    sensor = product_sources(fused)[2].get("sensor")
    if not isinstance(sensor, str):
        return None
    try:
        return canonical_sensor(sensor)
    except FusionError:
        return None


def _mask_or_none(valid: np.ndarray) -> np.ndarray | None:
    return None if valid.all() else valid


def _say_why_infinite(values: dict[str, Any], ref: np.ndarray, fused: np.ndarray, valid: np.ndarray) -> None:
    """A warning naming the bands that make ERGAS or PSNR infinite (a JSON null, an `inf` cell): a
    reference band averaging 0 (ERGAS divides by it), a band equal to the reference (PSNR's MSE 0),
    as dead or constant bands of a hyperspectral cube are; the index is left as the toolbox defines it."""
    bad = [k for k in ("ERGAS", "PSNR") if isinstance(values.get(k), float) and not math.isfinite(values[k])]
    if not bad:  # the usual case: no copy of the images
        return
    r = ref[:, valid].astype(np.float64)
    f = fused[:, valid].astype(np.float64)
    causes = {
        "ERGAS": (r.mean(axis=1) == 0, "average 0 in the reference (ERGAS divides by the band mean)"),
        "PSNR": ((r == f).all(axis=1), "equal the reference exactly (their PSNR is infinite)"),
    }
    for key in bad:
        bands, why = causes[key]
        value = values[key]
        if bands.any():
            listed = ", ".join(str(b + 1) for b in np.flatnonzero(bands)[:10])
            notify(
                f"{key} is {value}: band(s) {listed} of the product {why}; dead or constant bands? "
                "fuse without them (--bands) and the indices leave them out"
            )


def score(case: Case, opts: EvalOptions | None = None) -> dict[str, Any]:
    """All indices of a loaded case: reduced resolution with a reference, else full resolution.

    Returns the index values (floats) with `product`, `mode`, the inputs' paths and `settings`.
    """
    opts = opts or EvalOptions()
    file_bands = case.ms.data.shape[0] if case.ms is not None else 0
    if case.ref is None and case.pan is not None and case.ms is not None and case.pan.data.shape[0] == 1:
        # the whole MS: a hyperspectral band alone may sit 18x below the PAN (Paris SWIR); its bands
        # that are NaN throughout (dead) left out, or no pixel is valid and nothing was checked
        ms = case.ms
        if not ms.valid.any() and ms.declared is not None:
            live = np.isfinite(ms.data[:, ms.declared]).all(axis=1)
            ms = ms.select(ms.data[live], None)
        check_pan_ms_levels(case.pan.data[0][case.pan.valid], ms.data[:, ms.valid], case.pan.name, ms.name)
    case = with_product_bands(case, opts.bands)
    f = case.fused
    failed = 0 if f.declared is None else int((f.declared & ~f.valid).sum())
    if failed:
        # in a reference or an MS, NaN marks dead bands or pixels, and is left out; in a product it is
        # a fusion that failed there, and was scored around at exit 0 (helper)
        raise FusionError(
            f"the fused product {f.name} has NaN or infinite values at {failed} px outside its nodata; "
            "declare them nodata (gdal_translate -a_nodata nan IN OUT) to score the other pixels"
        )
    if opts.round_uint16 is None:
        compared = case.ref if case.ref is not None else case.ms
        assert compared is not None
        opts = replace(opts, round_uint16=holds_whole_dn(compared))
    out: dict[str, Any] = {"product": str(f.path), "mode": case.mode, "bands_compared": case.bands_compared}
    if case.ref is not None:
        r = case.ref
        if r.data.shape != f.data.shape:
            raise FusionError(
                f"reference {r.name} {r.data.shape} and product {f.name} {f.data.shape} differ "
                "in (bands, rows, cols): compare a product with the reference of the same scene"
            )
        ratio = case.ratio if case.ratio is not None else opts.ratio
        if ratio is None:
            raise FusionError("reduced-resolution metrics need --ratio (PAN/MS pixel-size ratio, e.g. 4)")
        out["reference"], out["ratio"] = str(r.path), ratio
        valid = f.valid & r.valid
        out.update(
            reduced_resolution(
                r.data,
                f.data,
                ratio,
                cut=opts.cut,
                clip_bits=opts.clip_bits,
                mask=_mask_or_none(valid),
                per_band=opts.per_band,
                block=opts.block,
                round_uint16=bool(opts.round_uint16),
                psnr_peak=opts.psnr_peak,
            )
        )
        _say_why_infinite(out, r.data, f.data, valid)
    else:
        assert case.pan is not None and case.ms is not None
        ms = case.ms.data
        ratio = case.ratio  # load_case lined the grids up: product and PAN are ratio x MS
        assert ratio is not None
        fused, pan = f.data, case.pan.data
        if pan.shape[0] != 1:
            raise FusionError(
                f"the high-resolution input {case.pan.name} has {pan.shape[0]} bands (an MSI: a HISR "
                "product?); the no-reference indices (QNR, HQNR) need a single-band PAN: score it "
                "against a reference with --ref (or, in fusion evaluate, --no-full)"
            )
        ms_valid = np.repeat(np.repeat(case.ms.valid, ratio, axis=0), ratio, axis=1)
        valid = f.valid & case.pan.valid & ms_valid
        out["pan"], out["ms"] = str(case.pan.path), str(case.ms.path)
        if opts.sensor is None:
            opts = replace(opts, sensor=_recorded_sensor(f))
        sensor_bands = _product_sensor_bands(case, opts, file_bands)
        out.update(
            full_resolution(
                fused,
                pan,
                ms,
                ratio,
                opts.sensor,
                _mask_or_none(valid),
                opts.block,
                opts.clip_bits,
                opts.per_band,
                bool(opts.round_uint16),
                sensor_bands,
                file_bands,
            )
        )
        if f.data.shape[0] == 1:
            notify(f"{f.name} has one band: D_lambda and QNR compare band pairs and are NaN (null in JSON)")
    out["valid_fraction"] = float(valid.mean())  # the PAN's and MS's nodata too (full resolution)
    out["settings"] = opts.to_dict()
    return out


def evaluate(
    fused: str | Path,
    ref: str | Path | None = None,
    pan: str | Path | None = None,
    ms: str | Path | None = None,
    opts: EvalOptions | None = None,
) -> dict[str, Any]:
    """Read and score one product (see `load_case` and `score`)."""
    opts = opts or EvalOptions()
    return score(load_case(fused, ref, pan, ms, opts.nodata, opts.ratio, opts.block), opts)


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """One flat row for CSV: paths, mode, indices in the metric table's order, then per-band values as
    `Q_b1`..."""
    row: dict[str, Any] = {k: result[k] for k in ("product", "mode", "reference", "pan", "ms") if k in result}
    row.update({k: result[k] for k in index_order() if k in result})
    for k in ("q2n_name", "bands", "ratio", "valid_fraction", "scored_fraction"):
        if k in result:
            row[k] = result[k]
    if result.get("bands_compared"):
        row["bands_compared"] = ",".join(map(str, result["bands_compared"]))
    for name, values in result.get("per_band", {}).items():
        row.update({f"{name}_b{i + 1}": v for i, v in enumerate(values)})
    settings = result.get("settings", {})
    row.update({f"opt_{k}": v for k, v in settings.items() if k != "per_band"})
    return row


# The first columns of every metrics row (`flatten`): how an appended-to CSV is recognised as ours.
CSV_KEY = ("product", "mode")


def check_csv(path: str | Path, inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """Refuse, before any work, a CSV path that names a folder or one of the `inputs` (the same path,
    a symbolic or a hard link to it: appending would modify the input)."""
    from fusion_cli.raster import same_file
    from fusion_cli.raster.checks import check_not_special

    p = Path(path)
    if p.is_dir():
        raise FusionError(f"CSV {p} is a folder; give a file name like {p / 'metrics.csv'}")
    check_not_special(p)  # a FIFO would block the read before an append
    for src in inputs:
        if src is not None and same_file(p, src):
            raise FusionError(f"--csv {p} is an input file ({src}); choose another name")
    folder = p.parent if str(p.parent) else Path(".")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise FusionError(f"CSV folder {folder} is not writable; choose another --csv path")
    return p


def write_csv(
    rows: list[dict[str, Any]], path: str | Path, append: bool = False, overwrite: bool = True
) -> Path:
    """Write rows (union of their keys, first-seen order) to CSV; `append` adds them to an existing
    metrics CSV (header starting with CSV_KEY; a foreign file is refused), whose columns come first
    and gain the new rows' other columns (a full-resolution row after reduced-resolution ones keeps
    its indices; old rows leave them empty). The file is replaced whole, atomically: a failed write
    leaves the previous file as it was."""
    import csv
    import io

    from fusion_cli.raster import atomic_output

    p = check_csv(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new_columns: list[str] = []
    for r in rows:
        new_columns += [k for k in r if k not in new_columns]
    columns, old_rows = new_columns, []
    if append and p.exists() and p.stat().st_size > 0:
        try:
            with p.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a BOM from Excel's "CSV UTF-8"
                reader = csv.DictReader(io.StringIO(fh.read()))
                header, old_rows = list(reader.fieldnames or []), list(reader)
        except (UnicodeDecodeError, csv.Error):
            header = []
        if tuple(header[: len(CSV_KEY)]) != CSV_KEY:
            raise FusionError(
                f"{p} is not a metrics CSV (its header does not start with {','.join(CSV_KEY)}); "
                "choose another --csv file"
            )
        columns = header + [k for k in new_columns if k not in header]
    with atomic_output(p, overwrite=overwrite or append, what="CSV") as tmp, tmp.open("w", newline="") as fh:
        # extrasaction: a malformed old row's fields past the header (DictReader's None key) go
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerows(rows)
    return p
