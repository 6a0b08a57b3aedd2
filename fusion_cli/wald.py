"""Wald's reduced-resolution protocol: degrade a PAN/MS pair by the ratio so that the original MS
becomes the reference of a fusion made at the lower scale.

MS: each band low-passed by its sensor's MTF-matched Gaussian and decimated `[ratio//2::ratio]`
(`fusion_cli.mtf.degrade_ms`). PAN: MATLAB `imresize(pan, 1/ratio)` (bicubic, antialiased), as the
reference toolbox's `resize_images.m`, or its own MTF filter with `pan_mode="mtf"` (as PanCollection
and the FusionMamba golden data). The arrays are cropped first to a whole number of low-resolution
pixels so the three products tile each other exactly: ref `(C, h, w)`, ms_lr `(C, h/r, w/r)`,
pan_lr `(P, h, w)` with h, w multiples of r.

Validity (nodata, masks, alpha): invalid pixels are filled with their band's mean of the valid ones
before filtering (`pipeline.readers.fill_invalid`), so that the valid samples near a hole stay sane,
and a reduced sample is invalid wherever its filter reads an invalid pixel (`mtf.degrade_valid`); the
reference is invalid exactly where the MS is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

from fusion_cli import raster
from fusion_cli.align import block_windows
from fusion_cli.errors import FusionError
from fusion_cli.mtf import degrade_ms, degrade_pan, degrade_valid
from fusion_cli.pipeline.output import finish_block
from fusion_cli.pipeline.readers import fill_invalid
from fusion_cli.raster import make_output_folder
from fusion_cli.sensors import canonical_sensor, nyquist_gains, sensor_band_numbers

PanMode = Literal["bicubic", "mtf", "keep"]


@dataclass
class Reduced:
    """`simulate_arrays`' result. It unpacks as `(pan, ms, ref)`, the three arrays alone, as before
    validity was carried; each `*_valid` is `(H, W)` bool, None where no validity was given."""

    pan: np.ndarray  # (P, h', w') float64
    ms: np.ndarray  # (C, h'/r, w'/r) float64
    ref: np.ndarray  # (C, h', w') float64: the cropped MS, invalid pixels unchanged
    pan_valid: np.ndarray | None = None
    ms_valid: np.ndarray | None = None
    ref_valid: np.ndarray | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.pan, self.ms, self.ref))


def simulate_arrays(
    pan: np.ndarray,
    ms: np.ndarray,
    ratio: int,
    sensor: str | None = None,
    pan_mode: PanMode = "bicubic",
    sensor_bands: list[int] | None = None,
    pan_valid: np.ndarray | None = None,
    ms_valid: np.ndarray | None = None,
) -> Reduced:
    """Degrade a pair by `ratio`: pan `(P, H, W)`, ms `(C, h, w)` with H ~ ratio*h, in DN.

    Returns float64 `(pan_lr (P, h', w'), ms_lr (C, h'/r, w'/r), ref (C, h', w'))` (a `Reduced`, which
    unpacks as that tuple), where ref is the MS cropped to h' = r * floor(min(h, H/r) / r) (same for
    w'), unrounded DN. `sensor_bands` (1-based sensor band numbers, one per MS band) picks the MTF
    gains when the MS holds a subset of the sensor's bands. `pan_valid (H, W)` / `ms_valid (h, w)`:
    where the inputs are valid; invalid pixels are filled before filtering and the outputs' validity
    comes back with them.
    """
    if pan.ndim == 2:
        pan = pan[None]
    if pan.ndim != 3 or ms.ndim != 3:
        raise FusionError(f"expected pan (P, H, W) and ms (C, h, w), got {pan.shape} and {ms.shape}")
    for what, arr, valid in (("pan", pan, pan_valid), ("ms", ms, ms_valid)):
        if valid is not None and np.shape(valid) != arr.shape[1:]:
            raise FusionError(f"{what}_valid is {np.shape(valid)}, not the {what}'s {arr.shape[1:]}")
        # the filters would spread a NaN over every sample they reach (64 NaN in ms_lr from one)
        bad = raster.non_finite_pixels(np.asarray(arr), None if valid is None else np.asarray(valid, bool))
        if bad is not None and bad.any():
            raise FusionError(
                f"the {what} has NaN or infinite values at {int(bad.sum())} px; pass {what}_valid False there"
            )
    if ratio < 2:
        raise FusionError(f"the Wald protocol needs a ratio of at least 2, got {ratio}")
    if pan_mode == "mtf" and pan.shape[0] > 1:
        # the sensor table has one PAN gain; an MSI's bands each have their own MTF
        raise FusionError(
            f"--pan-mtf degrades a one-band PAN by its MTF, but this high-resolution image has "
            f"{pan.shape[0]} bands (an MSI): leave --pan-mtf off to reduce it by bicubic"
        )
    # "keep": HISR data on one grid (HSI and MSI the same size): the MSI is already at the
    # reference's resolution, so only the HSI is reduced, as the HISR recipes' Wald pairs are
    grid = 1 if pan_mode == "keep" else ratio
    h = (min(ms.shape[1], pan.shape[1] // grid) // ratio) * ratio
    w = (min(ms.shape[2], pan.shape[2] // grid) // ratio) * ratio
    if h < ratio * 4 or w < ratio * 4:
        raise FusionError(
            f"images too small for a ratio-{ratio} reduction (MS {ms.shape[1]}x{ms.shape[2]}): "
            f"need at least {ratio * 4}x{ratio * 4} MS pixels"
        )
    ref = np.asarray(ms[:, :h, :w], dtype=np.float64)
    pan_c = np.asarray(pan[:, : h * grid, : w * grid], dtype=np.float64)
    ref_valid = None if ms_valid is None else np.asarray(ms_valid, dtype=bool)[:h, :w]
    pan_c_valid = None if pan_valid is None else np.asarray(pan_valid, dtype=bool)[: h * grid, : w * grid]
    numbers = sensor_band_numbers(sensor, ref.shape[0], stated=sensor_bands)
    gains, pan_gain = nyquist_gains(sensor, ref.shape[0], numbers)
    ms_lr = degrade_ms(_filled(ref, ref_valid), gains, ratio)
    if pan_mode == "keep":
        return Reduced(
            pan_c,
            ms_lr,
            ref,
            pan_c_valid,
            None if ref_valid is None else degrade_valid(ref_valid, ratio, "mtf"),
            ref_valid,
        )
    pan_lr = degrade_pan(_filled(pan_c, pan_c_valid), ratio, pan_mode, pan_gain)
    return Reduced(
        pan_lr,
        ms_lr,
        ref,
        None if pan_c_valid is None else degrade_valid(pan_c_valid, ratio, pan_mode),
        None if ref_valid is None else degrade_valid(ref_valid, ratio, "mtf"),
        ref_valid,
    )


def _filled(data: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """`data` with its invalid pixels at the band means of the valid ones: nodata (65535, 0, NaN) fed
    to the filters would spread into every valid sample they reach."""
    return data if valid is None else fill_invalid(data, valid, np.float64)


@dataclass
class SimulatedPair:
    pan: Path
    ms: Path
    ref: Path
    ratio: int
    sensor: str
    pan_mode: str
    # which of the sensor's bands (1-based) the reduced MS's bands are (None: as `nyquist_gains` reads
    # a file of that many bands): a fusion of the reduced pair takes them as its --sensor-bands
    sensor_bands: list[int] | None = None


class Read(NamedTuple):
    data: np.ndarray  # (C, H, W) in the file's dtype
    valid: np.ndarray | None  # (H, W): nodata, masks, alpha; None: the file cannot have invalid pixels
    meta: dict  # nodata, tags, band descriptions
    transform: Affine | None  # None: no georeferencing
    crs: object


def _read(ds: rasterio.io.DatasetReader, win: Window, bands: Sequence[int] | None = None) -> Read:
    """The window of an open raster (its `bands` only, when given), where it is valid, its metadata
    (`file_bands`: how many data bands the file holds), its transform (None without georeferencing)
    and CRS."""
    georef = ds.crs is not None or not ds.transform.is_identity
    meta = {"nodata": ds.nodata, "tags": ds.tags(), "desc": ds.descriptions}
    meta["file_bands"] = len(raster.select_bands(ds, None, "input", read=False))
    transform = ds.transform @ Affine.translation(win.col_off, win.row_off) if georef else None
    # an alpha band is left out (transparency, not a band to degrade): it is part of `valid`; a dead
    # band left out by `bands` is not read (its NaN refused the whole file)
    data, valid, bands = raster.read_whole(ds, "input", win, bands)
    meta["desc"] = [ds.descriptions[b - 1] for b in bands]
    meta["encoding"] = raster.Encoding.of(ds, bands)  # the outputs hold the same DN
    meta["band_tags"] = raster.carried_band_tags(ds, bands)
    meta["imagery"] = [ds.tags(b, ns="IMAGERY") for b in bands]
    meta["colorinterp"] = [ds.colorinterp[b - 1] for b in bands]
    # invalid pixels are filled before filtering; a NaN in a valid one would spread through the filters
    raster.refuse_non_finite(ds.name, data, valid, bands)
    return Read(data, valid, meta, transform, ds.crs)


def read_pair(
    pan_path: str | Path, ms_path: str | Path, ratio: int | None = None, ms_bands: Sequence[int] | None = None
) -> tuple[int, Read, Read]:
    """The ratio and the PAN and MS (its `ms_bands`, 1-based, when given) over the area both cover,
    lined up by their geotransforms (`align.block_windows`: MS pixel i over PAN pixels [r*i, r*i+r)),
    each as `_read` gives it."""
    with raster.gdal_env(), raster.open_raster(pan_path, "PAN") as pan:
        with raster.open_raster(ms_path, "MS") as ms:
            r, ms_win, (pan_win,) = block_windows(ms, [pan], ratio, ("MS", "PAN"))
            pan_read = _read(pan, pan_win)
            raster.refuse_constant(raster.constant_value(pan_read.data, pan_read.valid), "PAN", pan_path)
            return r, pan_read, _read(ms, ms_win, ms_bands)


def _same_grid_hisr(
    pan_path: str | Path, ms_path: str | Path, ms_bands: Sequence[int] | None
) -> tuple[Read, Read] | None:
    """The MSI and HSI of a HISR pair on one grid (pixel-size ratio 1, a multi-band high-resolution
    image), as `read_pair` reads them; None for any other pair."""
    try:
        grid, pan_read, ms_read = read_pair(pan_path, ms_path, None, ms_bands)
    except FusionError:
        return None
    return (pan_read, ms_read) if grid == 1 and pan_read.data.shape[0] > 1 else None


def _image(
    path: Path,
    data: np.ndarray,
    valid: np.ndarray | None,
    transform: Affine | None,
    crs: object,
    meta: dict,
    dtype: str,
    filtered: bool = True,
) -> raster.GeoTiff:
    """One simulated image, with the source's NBITS/SOURCE tags, band names and scale/offset (existing
    outputs were refused, or allowed by --overwrite, before any work), and its validity as the
    source expressed it: the source's nodata value written into the invalid pixels (NaN in a
    `filtered` float image, whose blurred DN may take any other value), else an internal mask."""
    tags = raster.carried_tags(meta["tags"]) | meta.get("extra", {})
    nodata = meta["nodata"]
    if nodata is not None and filtered and np.issubdtype(np.dtype(dtype), np.floating):
        nodata = math.nan
    mask = None
    if nodata is not None and valid is not None:
        # the pipeline's own finishing: invalid pixels take the nodata value, a valid one equal to
        # it moves one step off, so that no reader takes it for nodata
        data = finish_block(data, valid, dtype, None, None, nodata)
    elif valid is not None and not valid.all():
        mask = valid
    return raster.GeoTiff(
        path, data, dtype, transform, crs, nodata, tags, meta["desc"], mask, meta["encoding"],
        meta["band_tags"], meta["imagery"], meta["colorinterp"],
    )  # fmt: skip


def _check_targets(out_dir: Path, targets: list[Path], inputs: list[str | Path], overwrite: bool) -> None:
    """Before reading anything: the folder is a folder, and no output replaces an input (the same
    file, a link to it, or a file a VRT or archive input reads) or, without --overwrite, any file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FusionError(f"-o {out_dir} is a file; give a folder for the simulated pair")
    if out_dir.is_dir() and not os.access(out_dir, os.W_OK | os.X_OK):
        raise FusionError(f"-o {out_dir} is not writable; choose another folder")
    read = raster.files_read(inputs)
    for t in targets:
        if t.is_dir():
            raise FusionError(f"{t} is a folder; remove it or choose another -o folder")
        if raster.replaced_input(t, read) is not None:
            raise FusionError(f"output {t} would overwrite an input: choose another -o folder")
        if t.exists() and not overwrite:
            raise FusionError(f"{t} exists: pass --overwrite or choose another -o folder")


def simulate_files(
    pan_path: str | Path,
    ms_path: str | Path,
    out_dir: str | Path,
    sensor: str | None = None,
    ratio: int | None = None,
    pan_mtf: bool = False,
    dtype: Literal["float32", "source"] = "float32",
    overwrite: bool = False,
    sensor_bands: list[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    bands: list[int] | None = None,
) -> SimulatedPair:
    """Write `pan_lr.tif`, `ms_lr.tif` and `ms_ref.tif` (the cropped original MS) into `out_dir`.

    PAN and MS are lined up by their geotransforms and cropped to the area both cover (`read_pair`);
    the outputs keep that area's origin and multiply the pixel size by the ratio, so `fusion
    pansharpen pan_lr.tif ms_lr.tif` covers the ground of `ms_ref.tif` and `fusion metrics --ref`
    lines the two up (to the nearest pixel: Landsat's reduced PAN grid is a quarter pixel off the
    MS grid). Inputs without georeferencing give outputs without it. `dtype="source"` rounds to the
    input types; float32 (default) keeps the unrounded DN, as the toolbox does. `progress(done, 5)`
    is called after each step: read, degrade, and each of the three writes. `sensor_bands`: which
    of the sensor's bands (1-based) the MS's bands are, for their MTF gains (`simulate_arrays`).
    `bands` (1-based MS bands): reduce and keep only those, in that order (`fusion evaluate --bands`:
    a cube's dead bands left out); the gains follow them.
    """

    def step(done: int) -> None:
        if progress is not None:
            progress(done, 5)

    out_dir = Path(out_dir)
    key = canonical_sensor(sensor)
    targets = [out_dir / "pan_lr.tif", out_dir / "ms_lr.tif", out_dir / "ms_ref.tif"]
    _check_targets(out_dir, targets, [pan_path, ms_path], overwrite)
    raster.check_same_file(pan_path, ms_path)  # with --ratio, one file given twice 'simulated' Q2n 0.99
    pan_mode: PanMode = "mtf" if pan_mtf else "bicubic"
    try:
        ratio, pan_read, ms_read = read_pair(pan_path, ms_path, ratio, bands)
    except FusionError as exc:
        # HISR data on one grid (an HSI and an MSI of the same size, as the San Francisco pair):
        # --ratio says how far to reduce the HSI; the MSI stays as it is
        same_grid = _same_grid_hisr(pan_path, ms_path, bands) if ratio is not None else None
        if same_grid is None:
            raise
        if pan_mtf:
            raise FusionError(
                "--pan-mtf degrades the high-resolution image, which HISR data on one grid keep as it "
                "is (only the HSI is reduced by --ratio): leave --pan-mtf off"
            ) from exc
        pan_read, ms_read = same_grid
        pan_mode = "keep"
    (pan, _, pan_meta, pan_tf, pan_crs), (ms, _, ms_meta, ms_tf, ms_crs) = pan_read, ms_read
    step(1)
    if ratio < 2:
        raise FusionError(f"the Wald protocol needs a PAN/MS ratio of at least 2, got {ratio}")
    paths = SimulatedPair(*targets, ratio, key, pan_mode)
    if bands is not None:  # the gains of the bands kept
        sensor_bands = sensor_band_numbers(key, ms_meta["file_bands"], bands, sensor_bands)
    paths.sensor_bands = sensor_bands
    red = simulate_arrays(pan, ms, ratio, key, paths.pan_mode, sensor_bands, pan_read.valid, ms_read.valid)
    for what, valid in (
        ("reference", red.ref_valid),
        ("reduced MS", red.ms_valid),
        ("reduced PAN", red.pan_valid),
    ):
        if valid is not None and not valid.any():
            raise FusionError(
                f"no valid pixel is left in the {what}: nodata or masks cover the area PAN and MS share, "
                "or reach every reduced pixel through the filters; check the inputs' nodata"
            )
    make_output_folder(out_dir, "-o")
    step(2)
    scale = Affine.scale(ratio)
    info = {"WALD_RATIO": str(ratio), "WALD_SENSOR": key, "WALD_PAN_MODE": paths.pan_mode}
    ms_dtype = "float32" if dtype == "float32" else str(ms.dtype)
    pan_dtype = "float32" if dtype == "float32" else str(pan.dtype)
    # A float MS keeps the source dtype in a tag: models with a DN scale per dtype read it from there.
    ms_info = info | {raster.SOURCE_DTYPE_TAG: str(ms.dtype)}
    images = [
        _image(
            paths.pan,
            red.pan,
            red.pan_valid,
            pan_tf @ scale if pan_tf and pan_mode != "keep" else pan_tf,
            pan_crs,
            pan_meta | {"extra": info},
            pan_dtype,
        ),
        _image(
            paths.ms,
            red.ms,
            red.ms_valid,
            ms_tf @ scale if ms_tf else None,
            ms_crs,
            ms_meta | {"extra": ms_info},
            ms_dtype,
        ),
        # the original DN, unchanged (invalid pixels take the nodata value, if the MS has one)
        _image(paths.ref, red.ref, red.ref_valid, ms_tf, ms_crs, ms_meta, str(ms.dtype), filtered=False),
    ]
    # all three or none: a failure halfway must not leave a reduced pair of this scene beside the
    # reference of another
    raster.write_geotiffs(images, "simulated image", written=lambda i: step(3 + i))
    return paths
