"""Reading windows of a pair: a PAN tile, the MS resampled onto the tile's area-aligned grid, and
their validity, from files or from arrays; opening a pair of files; measuring its PAN/MS shift."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import DTypeLike
from scipy import ndimage

from fusion_cli import align, notices, raster

# How far (MS px; PAN px times the ratio) an edge's values reach into nodata before the scene's
# band means take over: past the classical methods' filters (8 MS px: 16-32 PAN px at ratio 2-4).
FILL_REACH = 8
# Largest window side (PAN px) used to measure the PAN/MS shift: bounded memory and time.
SHIFT_WINDOW = 1024

# (row, col, height, width) in a raster's own pixels -> (data (B, h, w), valid (h, w)), reflect-padded
Reader = Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class Tile:
    pan: np.ndarray  # (P, h, w) float32, nodata filled
    ms: np.ndarray  # (C, h/r, w/r) float32, nodata filled, area-aligned to pan
    valid: np.ndarray  # (h, w) bool


def fill_invalid(
    data: np.ndarray,
    valid: np.ndarray,
    dtype: DTypeLike = np.float32,
    fill: np.ndarray | None = None,
    reach: int = 0,
) -> np.ndarray:
    """Replace invalid pixels so a fuser never sees nodata; a copy of `data` `(C, H, W)` in `dtype`
    (float64 for the Wald filters, which work in it). Those within `reach` px (taxicab) of a valid
    pixel take the nearest one's value, as a border does under replicate padding: a constant there
    made the upsampled MS a blend of the scene and that constant for a few pixels inside the edge
    (BT-H, whose gain divides by a small intensity, doubled NIR there). The others take `fill`
    `(C,)` (the scene's band means, `raster.scene_fill`), else the band means of the valid ones here."""
    data = data.astype(dtype, copy=True)
    if valid.all():
        return data
    if fill is None and not valid.any():
        data[:] = 0.0
        return data
    invalid = ~valid
    if reach and valid.any():
        dist, (rows, cols) = ndimage.distance_transform_cdt(invalid, metric="taxicab", return_indices=True)
        near = invalid & (dist <= reach)
        data[:, near] = data[:, rows[near], cols[near]]
        invalid &= ~near
    means = data[:, valid].mean(axis=1) if fill is None else fill
    data[:, invalid] = means[:, None]
    return data


def valid_means(data: np.ndarray, valid: np.ndarray | None) -> np.ndarray | None:
    """`raster.scene_fill` for an in-memory `(C, H, W)` array: band means of its valid pixels."""
    if valid is None or valid.all() or not valid.any():
        return None
    return data[:, valid].mean(axis=1, dtype=np.float64)


class PairSource:
    """Reads output windows (output pixel coordinates) from a PAN/MS pair.

    `pan_reader(row, col, h, w)` and `ms_reader(row, col, h, w)` return (data, valid) in their own
    pixel coordinates, reflect-padded; `geom` maps output rows/cols to MS coordinates. `pan_fill`
    and `ms_fill` `(P,)`, `(C,)`: what invalid pixels read as, the same in every window (else each
    window's own means: a product that depends on the tiling along nodata edges).
    """

    def __init__(
        self,
        geom: align.Alignment,
        pan_reader: Reader,
        ms_reader: Reader,
        pan_fill: np.ndarray | None = None,
        ms_fill: np.ndarray | None = None,
    ) -> None:
        self.geom = geom
        self.pan_reader = pan_reader
        self.ms_reader = ms_reader
        self.pan_fill = pan_fill
        self.ms_fill = ms_fill

    def read(self, row: int, col: int, size_h: int, size_w: int) -> Tile:
        g, r = self.geom, self.geom.ratio
        pan, pvalid = _read_filled(
            self.pan_reader, self.pan_fill, FILL_REACH * r, g.row0 + row, g.col0 + col, size_h, size_w
        )
        uy = g.ms_centres(g.row0 + row, size_h // r, 0)
        ux = g.ms_centres(g.col0 + col, size_w // r, 1)
        (y0, y1), (x0, x1) = align.support(uy), align.support(ux)
        ms, mvalid = _read_filled(self.ms_reader, self.ms_fill, FILL_REACH, y0, x0, y1 - y0, x1 - x0)
        ms_lr = align.resample(ms, align.cubic_matrix(uy, y0, y1 - y0), align.cubic_matrix(ux, x0, x1 - x0))
        # MS validity at each low-resolution sample: that of the MS pixel under its centre.
        v_lr = mvalid[np.ix_(align.nearest_index(uy, y0, y1 - y0), align.nearest_index(ux, x0, x1 - x0))]
        valid = pvalid & np.repeat(np.repeat(v_lr, r, axis=0), r, axis=1)
        return Tile(pan, ms_lr.astype(np.float32), valid)


def _read_filled(
    reader: Reader, fill: np.ndarray | None, reach: int, row: int, col: int, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """A window `(B, h, w)` float32 with its invalid pixels filled (`fill_invalid`), and its validity.
    With a scene fill (the raster may hold nodata), it is read `reach` px wider on every side so the
    nearest valid pixel within reach is always in view: a pixel fills alike in every window."""
    if fill is None:
        data, valid = reader(row, col, h, w)
        return fill_invalid(data, valid), valid
    data, valid = reader(row - reach, col - reach, h + 2 * reach, w + 2 * reach)
    inner = (slice(reach, reach + h), slice(reach, reach + w))
    return fill_invalid(data, valid, fill=fill, reach=reach)[(slice(None), *inner)], valid[inner]


def array_reader(arr: np.ndarray, valid: np.ndarray | None) -> Reader:
    """Windows of an in-memory `(B, H, W)` array with an optional `(H, W)` validity mask."""
    v = np.ones(arr.shape[-2:], bool) if valid is None else valid.astype(bool)

    def read(row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        return raster.pad_array(arr, v, row, col, h, w)

    return read


def file_reader(ds: Any, bands: Sequence[int], zero_is_nodata: bool) -> Reader:
    """Windows of the 1-based `bands` of an open dataset, validity from its nodata/masks."""

    def read(row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        return raster.read_padded(ds, row, col, h, w, bands, zero_is_nodata)

    return read


def measure_shift(source: PairSource, required: bool = False) -> dict[str, float] | None:
    """PAN/MS content shift on a central window of at most SHIFT_WINDOW PAN px (bounded memory).
    None when the scene is too small (under 16 MS px per side) or that window mostly nodata (under
    20 % valid): there is not enough to measure. `required` (the shift is to be applied, --coregister)
    makes those cases a ShiftNotMeasurable saying why, as a featureless scene always is."""
    g = source.geom
    side_h = min(g.height, SHIFT_WINDOW) // g.ratio * g.ratio
    side_w = min(g.width, SHIFT_WINDOW) // g.ratio * g.ratio
    if min(side_h, side_w) < 16 * g.ratio:
        if required:
            raise align.ShiftNotMeasurable(
                f"cannot measure the PAN/MS shift on this scene: it is {g.height} x {g.width} PAN px, "
                f"under the {16 * g.ratio} px per side the measurement needs at ratio {g.ratio}"
            )
        return None
    row, col = (g.height - side_h) // 2, (g.width - side_w) // 2
    # measured against the MS on its area-aligned grid (estimate_shift's convention), whatever the
    # phase the fusion samples it in
    area_aligned = PairSource(
        replace(g, phase=0.0), source.pan_reader, source.ms_reader, source.pan_fill, source.ms_fill
    )
    t = area_aligned.read(row, col, side_h, side_w)
    if t.valid.mean() < 0.2:
        if required:
            raise align.ShiftNotMeasurable(
                f"cannot measure the PAN/MS shift on this scene: only {t.valid.mean():.0%} of its central "
                f"{side_h} x {side_w} PAN px is valid data (the measurement needs 20%)"
            )
        return None
    pan = t.pan.mean(axis=0) if t.pan.shape[0] > 1 else t.pan[0]
    dy, dx, peak = align.estimate_shift(pan, t.ms, g.ratio, t.valid)
    if required and peak < align.MIN_SHIFT_PEAK:
        raise align.ShiftNotMeasurable(
            f"the PAN/MS correlation peak is {peak:.2f}, under {align.MIN_SHIFT_PEAK}: the two share too "
            f"little structure to trust the shift measured (dy {dy:.1f}, dx {dx:.1f} PAN px)"
        )
    return {"dy": round(dy + g.dy, 3), "dx": round(dx + g.dx, 3), "peak": round(peak, 3)}


@contextlib.contextmanager
def open_pair(
    pan_path: str | os.PathLike[str],
    ms_path: str | os.PathLike[str],
    reproject: bool = False,
    expected_ratio: int | None = None,
    pan_nodata: float | None = None,
    ms_nodata: float | None = None,
) -> Iterator[tuple[Any, Any]]:
    """(pan, ms) datasets, read-only; with `reproject`, an MS in another CRS than the PAN's comes as a
    warped VRT on the PAN's CRS and grid (`align.warp_to_pan_crs`). `pan_nodata` / `ms_nodata`: nodata
    values added to the files' own (`raster.with_nodata`; the warp leaves the MS's out)."""
    with contextlib.ExitStack() as stack:
        pan_ds = stack.enter_context(raster.open_raster(pan_path, "PAN"))
        ms_ds = stack.enter_context(raster.open_raster(ms_path, "MS"))
        raster.check_same_file(pan_path, ms_path)
        raster.check_pixel_type(pan_ds, "PAN")
        raster.check_pixel_type(ms_ds, "MS")
        crs = pan_ds.crs, ms_ds.crs
        if reproject and None not in crs and not align.same_crs(*crs):
            ms_ds = stack.enter_context(align.warp_to_pan_crs(ms_ds, pan_ds, expected_ratio, ms_nodata))
        yield raster.with_nodata(pan_ds, pan_nodata, "PAN"), raster.with_nodata(ms_ds, ms_nodata, "MS")


def measure_ratio(
    pan_path: str | os.PathLike[str], ms_path: str | os.PathLike[str], reproject: bool = False
) -> int:
    """Resolution ratio of a pair from its geotransforms (or sizes, without georeferencing)."""
    # what relating the grids warns about is said by the run that fuses them, not here too
    with open_pair(pan_path, ms_path, reproject) as (p, m), warnings.catch_warnings(), notices.collected():
        warnings.simplefilter("ignore")
        return align.relate_grids(p, m).ratio


def band_count(path: str | os.PathLike[str], what: str, bands: Sequence[int] | None = None) -> int:
    """Data bands of a raster (an alpha band is a mask, not a band, as the readers treat it), or how
    many `bands` pick (1-based), refused in one line when the file lacks one: "MS" (--bands) or
    "PAN" (--pan-bands)."""
    with raster.open_raster(path, what) as ds:
        return len(raster.select_bands(ds, bands, what, read=False))
