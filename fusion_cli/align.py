"""How the PAN (high-resolution) and MS (low-resolution) grids relate, and placing the MS on the
PAN grid.

The output grid is the PAN grid restricted to the area both inputs cover. The MS is placed on it
through the geotransforms, not by array index: for every output window the MS is resampled
(separable Keys cubic) at the centres of the window's ratio x ratio blocks, so that low-resolution
sample (i, j) covers PAN pixels [r*i, r*(i+1)) x [r*j, r*(j+1)) exactly (the area-aligned grid the
fusers expect). Grids that are already area-aligned get an exact copy (cubic weights at integer
positions are 0/1); Landsat's half-PAN-pixel offset becomes a quarter-MS-pixel resampling, and a
measured misregistration (`estimate_shift`) is just one more offset in the same mapping.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from rasterio.transform import Affine
from rasterio.windows import Window

from fusion_cli.errors import FusionError
from fusion_cli.notices import notify

# Relative tolerance on the pixel-size ratio: WorldView-2's 2.0000966 m / 0.4999935 m = 4.00025.
RATIO_TOL = 1e-3
# PAN pixels within this fraction of a pixel of the common area still count as covered.
EDGE_TOL = 0.05


@dataclass(frozen=True)
class Alignment:
    """Geometry of one PAN/MS pair.

    PAN continuous pixel coordinates (y, x) (pixel corners at integers) map to MS continuous pixel
    coordinates by `ms_y = ay * (y - dy) + by`, `ms_x = ax * (x - dx) + bx`, where (dy, dx) is the
    applied content shift in PAN pixels (0 unless coregistration is applied).
    """

    ratio: int
    ratio_measured: tuple[float, float]  # (y, x) pixel-size ratio from the transforms
    row0: int  # output window in PAN pixel coordinates
    col0: int
    height: int
    width: int
    ay: float
    by: float
    ax: float
    bx: float
    crs: Any = None
    out_transform: Affine | None = None
    georeferenced: bool = True
    dy: float = 0.0
    dx: float = 0.0
    # PAN px from a block's area centre to where its low-resolution sample is taken. 0: the toolbox's
    # convention (the product's MS content half a PAN px right/below its geotransform at even ratios);
    # `sampling_phase(ratio)`: taken where the toolbox's upsampling puts it, so the product sits on
    # its geotransform (--ms-phase geometric)
    phase: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def with_shift(self, dy: float, dx: float) -> Alignment:
        """The same geometry with a content shift (PAN px) applied to the MS placement."""
        return replace(self, dy=float(dy), dx=float(dx))

    def ms_centres(self, start: int, count: int, axis: int) -> np.ndarray:
        """MS centre-index coordinates (pixel i's centre at i) of `count` low-resolution samples
        starting at PAN pixel `start` (absolute PAN coordinates) along axis 0 (rows) or 1 (cols)."""
        centres = start + self.ratio * (np.arange(count, dtype=np.float64) + 0.5) + self.phase
        if axis == 0:
            return self.ay * (centres - self.dy) + self.by - 0.5
        return self.ax * (centres - self.dx) + self.bx - 0.5


def _is_identity(t: Affine) -> bool:
    return t.almost_equals(Affine.identity())


def _ratio_or_error(value: float, what: str, swappable: bool = True) -> int:
    """`value` as an integer ratio; `swappable`: the two grids are inputs a user may have swapped
    (PAN and MS), not a product and its reference."""
    r = round(value)
    if r < 1 or abs(value - r) > RATIO_TOL * r:
        inverse = round(1 / value) if value > 0 else 0
        if swappable and inverse > 1 and abs(1 / value - inverse) <= RATIO_TOL * inverse:
            raise FusionError(
                f"{what} is {value:.5g}: the high-resolution input has the larger pixels; are the two "
                "inputs swapped? (see the command's --help for their order)"
            )
        raise FusionError(
            f"{what} is {value:.5g}, not an integer; "
            "resample the MS to an integer multiple of the PAN pixel size"
        )
    return r


def _check_expected(ratio: int, expected: int | None) -> None:
    if expected is not None and ratio != expected:
        raise FusionError(
            f"the PAN/MS resolution ratio is {ratio} but the model expects {expected}; "
            f"use a model or method for ratio {ratio}"
        )


def relate_shapes(
    pan_shape: tuple[int, int], ms_shape: tuple[int, int], expected_ratio: int | None = None
) -> Alignment:
    """Grids without georeferencing: accepted when the sizes are an exact integer ratio apart."""
    (ph, pw), (mh, mw) = pan_shape, ms_shape
    ratio = size_ratio(pan_shape, ms_shape, exact=True)
    if ratio is None:
        if size_ratio(ms_shape, pan_shape, exact=True) is not None:
            raise FusionError(
                f"the PAN ({ph}x{pw}) is smaller than the MS ({mh}x{mw}): are the two inputs swapped? "
                "(see the command's --help for their order)"
            )
        hint = f" (the model expects ratio {expected_ratio})" if expected_ratio else ""
        raise FusionError(
            f"inputs have no georeferencing and their sizes {ph}x{pw} (PAN) and {mh}x{mw} (MS) are not an "
            f"exact integer ratio apart{hint}; crop them or add georeferencing"
        )
    _check_expected(ratio, expected_ratio)
    return Alignment(
        ratio=ratio,
        ratio_measured=(float(ratio), float(ratio)),
        row0=0,
        col0=0,
        height=ph,
        width=pw,
        ay=1.0 / ratio,
        by=0.0,
        ax=1.0 / ratio,
        bx=0.0,
        georeferenced=False,
    )


def _georef_ratio(
    fine: Any, coarse: Any, names: tuple[str, str] = ("PAN", "MS"), crs_hint: str = ""
) -> tuple[int, float, float] | None:
    """The integer pixel-size ratio coarse/fine of two georeferenced grids (rasterio datasets or
    anything with `transform`, `crs`, `width`, `height`), with the measured (y, x) ratios; None when
    neither grid is georeferenced. Raises FusionError for one grid without CRS, a CRS mismatch,
    rotated or not north-up grids, or a non-integer ratio."""
    ft, ct = fine.transform, coarse.transform
    f_name, c_name = names
    if fine.crs is None and coarse.crs is None and _is_identity(ft) and _is_identity(ct):
        return None
    for ds, name in ((fine, f_name), (coarse, c_name)):
        if ds.crs is None and _is_identity(ds.transform):  # the other input is georeferenced
            how = (
                " (only ground control points or RPCs, which this tool does not apply: warp it to a "
                "regular grid first, gdalwarp)"
                if only_gcps_or_rpcs(ds)
                else "; give both inputs the same georeferencing, or neither"
            )
            raise FusionError(f"the {name} has no geotransform but the other input has one{how}")
    if (fine.crs is None) != (coarse.crs is None):
        which = f_name if fine.crs is None else c_name
        raise FusionError(f"the {which} has no CRS but the other input has one; assign the same CRS to both")
    if fine.crs is not None and not same_crs(fine.crs, coarse.crs):
        raise FusionError(
            f"CRS mismatch: {f_name} is {crs_name(fine.crs)} but {c_name} is {crs_name(coarse.crs)}; "
            + (crs_hint or "reproject one onto the other's grid first (gdalwarp -t_srs)")
        )
    for t, what in ((ft, f_name), (ct, c_name)):
        if abs(t.b) > 1e-12 * abs(t.a) or abs(t.d) > 1e-12 * abs(t.e):
            raise FusionError(
                f"the {what} grid is rotated or sheared; warp it to a north-up grid first (gdalwarp)"
            )
        if t.a < 0 or t.e > 0:  # the pixel phases below assume rows run south and columns east
            raise FusionError(
                f"the {what} grid is not north-up (its rows run north or its columns west); "
                "warp it to a north-up grid first (gdalwarp)"
            )
    rx, ry = ct.a / ft.a, ct.e / ft.e
    pair = f"{c_name}/{f_name}"
    swappable = {f_name, c_name} == {"PAN", "MS"}
    ratio = _ratio_or_error(rx, f"the {pair} pixel-size ratio along x", swappable)
    if _ratio_or_error(ry, f"the {pair} pixel-size ratio along y", swappable) != ratio:
        raise FusionError(f"{pair} pixel-size ratios differ between x ({rx:.5g}) and y ({ry:.5g})")
    return ratio, ry, rx


def only_gcps_or_rpcs(ds: Any) -> bool:
    """Whether a grid without a geotransform is placed by ground control points or RPCs: a rasterio
    dataset that carries them, or an object that says so (`assess.Image.only_gcps_or_rpcs`)."""
    if getattr(ds, "only_gcps_or_rpcs", False):
        return True
    if ds.crs is not None or not _is_identity(ds.transform):
        return False
    gcps = getattr(ds, "gcps", None)
    return bool(gcps and gcps[0]) or bool(getattr(ds, "rpcs", None))


def _refuse_gcps_or_rpcs(grids: Sequence[Any], names: Sequence[str]) -> None:
    for ds, what in zip(grids, names, strict=True):
        if only_gcps_or_rpcs(ds):
            raise FusionError(
                f"the {what} is georeferenced by ground control points or RPCs only, which this "
                "tool does not apply; warp it to a regular grid first (gdalwarp)"
            )


def same_crs(a: Any, b: Any) -> bool:
    """Whether two CRSs place a geotransform's coordinates alike: equal, or equal but for the axis
    order of their definitions (EPSG:4326 beside OGC:CRS84 or an ESRI .prj of WGS 84 was refused as a
    mismatch, though GDAL rasters are always x = easting/longitude)."""
    if a == b:
        return True
    proj = a.to_proj4()  # says nothing of the axis order, nor of a datum's realisation:
    return bool(proj) and proj == b.to_proj4() and _datum(a) == _datum(b)  # GDA94 and GDA2020 print alike


def _datum(crs: Any) -> str | None:
    """A CRS's datum name as its WKT states it, without ESRI's "D_" (GDA94 and GDA2020 differ by 1.8 m
    and share their PROJ string)."""
    found = re.search(r'DATUM\["(?:D_)?([^"]+)"', crs.to_wkt())
    return found.group(1) if found else None


def crs_name(crs: Any) -> str:
    """A CRS as a one-line message names it: its authority code, else its PROJ string, else its name
    (a CRS without an EPSG code printed 500 characters of WKT)."""
    text = crs.to_string()
    if len(text) <= 60:
        return text
    proj = crs.to_proj4().replace("+no_defs=True", "").strip()
    if proj and len(proj) <= 120:
        return proj
    return f'"{text.split(chr(34), 2)[1]}" (no EPSG code)' if text.count('"') >= 2 else text[:60] + "..."


def relate_grids(pan_ds: Any, ms_ds: Any, expected_ratio: int | None = None) -> Alignment:
    """Check that two open rasters can be fused and describe how their grids relate.

    Raises FusionError for a CRS mismatch, rotated grids, a non-integer or unexpected ratio, or no
    overlap. Inputs without CRS and transform fall back to `relate_shapes` with a warning.
    """
    pt, mt = pan_ds.transform, ms_ds.transform
    hint = "pass --reproject to warp the MS onto the PAN's CRS, or reproject it first (gdalwarp -t_srs)"
    measured = _georef_ratio(pan_ds, ms_ds, crs_hint=hint)
    if measured is None:
        _refuse_gcps_or_rpcs((pan_ds, ms_ds), ("PAN", "MS"))
        notify(
            "inputs have no georeferencing: assuming their grids share the top-left corner; "
            "the output is written without CRS"
        )
        return relate_shapes(pan_ds.shape, ms_ds.shape, expected_ratio)
    ratio, ry, rx = measured
    _check_expected(ratio, expected_ratio)

    # PAN pixel (y, x) -> world -> MS pixel: both affine and axis-aligned, so one scale+offset per axis.
    ax, bx = pt.a / mt.a, (pt.c - mt.c) / mt.a
    ay, by = pt.e / mt.e, (pt.f - mt.f) / mt.e
    # MS extent in PAN pixel coordinates, intersected with the PAN extent.
    x0, x1 = sorted(((0 - bx) / ax, (ms_ds.width - bx) / ax))
    y0, y1 = sorted(((0 - by) / ay, (ms_ds.height - by) / ay))
    col0 = max(0, math.ceil(x0 - EDGE_TOL))
    col1 = min(pan_ds.width, math.floor(x1 + EDGE_TOL))
    row0 = max(0, math.ceil(y0 - EDGE_TOL))
    row1 = min(pan_ds.height, math.floor(y1 + EDGE_TOL))
    if col1 - col0 < ratio or row1 - row0 < ratio:
        raise FusionError(
            "PAN and MS do not overlap (their bounds do not intersect by at least one MS pixel); "
            "check that they are the same scene"
        )
    return Alignment(
        ratio=ratio,
        ratio_measured=(float(ry), float(rx)),
        row0=row0,
        col0=col0,
        height=row1 - row0,
        width=col1 - col0,
        ay=ay,
        by=by,
        ax=ax,
        bx=bx,
        crs=pan_ds.crs,
        out_transform=pt @ Affine.translation(col0, row0),
        georeferenced=pan_ds.crs is not None or not _is_identity(pt),
    )


def sampling_phase(ratio: int) -> float:
    """PAN px from the centre of an MS pixel's ratio x ratio footprint to the centre of PAN pixel
    ratio*k + ratio//2, where the toolbox's interpolation (`resample.interp23`, `upsample_ms`) puts
    low-resolution sample k: half a pixel at even ratios, none at odd ones."""
    return ratio // 2 + 0.5 - ratio / 2


def size_ratio(fine_shape: tuple[int, ...], coarse_shape: tuple[int, ...], exact: bool = False) -> int | None:
    """The PAN/MS ratio r of two grids from their sizes alone (the last two entries of each shape), or
    None when they are not a ratio apart: the one rule wherever no georeferencing tells the ratio.

    The fine grid is r times the coarse one along both axes, plus, unless `exact`, fewer than r extra
    pixels per axis (e.g. Landsat's extra PAN row, which is then cropped)."""
    (fh, fw), (ch, cw) = fine_shape[-2:], coarse_shape[-2:]
    r = fw // cw if cw else 0
    extra = r if not exact else 1
    if r < 1 or not (0 <= fw - r * cw < extra and 0 <= fh - r * ch < extra):
        return None
    return r


def shape_ratio(fine_shape: tuple[int, ...], coarse_shape: tuple[int, ...], names: Sequence[str]) -> int:
    """Ratio of two grids without georeferencing that share their top-left corner (`size_ratio`); a
    FusionError naming the grids (`names`: coarse, fine) when they are not a ratio apart."""
    (fh, fw), (ch, cw) = fine_shape[-2:], coarse_shape[-2:]
    r = size_ratio(fine_shape, coarse_shape)
    if r is None:
        raise FusionError(
            f"{names[1]} {fh}x{fw} and {names[0]} {ch}x{cw} differ in size by other than an integer ratio "
            "(r times as large, plus fewer than r pixels) and have no georeferencing to line them up; "
            "crop them to the same area or add georeferencing"
        )
    return r


def block_windows(
    coarse: Any,
    fines: Sequence[Any],
    ratio: int | None = None,
    names: Sequence[str] = ("MS", "PAN"),
    bare_pairs_by_size: bool = False,
) -> tuple[int, Window, list[Window]]:
    """Line grids up by their geotransforms for pixel-wise comparison (metrics, the Wald protocol).

    `coarse` and each of `fines` have `transform`, `crs`, `width`, `height` (a rasterio dataset, an
    `assess.Image`); `names` are the coarse one's then the fines' for messages. The ratio r comes from
    the pixel sizes (or, where a grid has no georeferencing, from the sizes: `shape_ratio`) and must be
    `ratio` when given. Returns r, the coarse window common to all grids and the window of each fine
    grid that it covers: coarse pixel (i, j) of the window over fine pixels [r*i, r*i+r) x [r*j, r*j+r)
    of that fine window, to the nearest fine pixel (a tie, such as Landsat's half PAN pixel, goes to
    the earlier pixel). Grids without georeferencing pair by their sizes; with `bare_pairs_by_size`,
    so does one without against one with (a reference made from a .mat and a georeferenced product),
    else that is refused, as for a pair to fuse. Raises FusionError when the grids cannot be compared
    (one placed by GCPs or RPCs only, too) or do not overlap.
    """
    _refuse_gcps_or_rpcs([coarse, *fines], names)
    offsets = []  # per fine grid: its pixel coordinates (y, x) of the coarse grid's corner, rounded
    rs = set()
    for fine, name in zip(fines, names[1:], strict=True):
        bare = [g.crs is None and _is_identity(g.transform) for g in (fine, coarse)]
        by_size = all(bare) or (bare_pairs_by_size and any(bare))
        measured = None if by_size else _georef_ratio(fine, coarse, (name, names[0]))
        if measured is None:
            rs.add(shape_ratio((fine.height, fine.width), (coarse.height, coarse.width), (names[0], name)))
            offsets.append((0, 0))
            continue
        rs.add(measured[0])
        ft, ct = fine.transform, coarse.transform
        # ceil(u - 0.5): the nearest integer, ties down (1e-6: a tie computed as 0.5000001 stays a tie)
        offsets.append(tuple(math.ceil(u - 0.5 - 1e-6) for u in ((ct.f - ft.f) / ft.e, (ct.c - ft.c) / ft.a)))
    if len(rs) > 1:
        raise FusionError(f"{', '.join(names[1:])} have different pixel sizes: give images on one grid")
    r = rs.pop()
    if ratio is not None and r != ratio:
        raise FusionError(
            f"the {names[0]}/{names[1]} pixel-size ratio is {r}, not {ratio}: check that the files belong "
            "together (and --ratio)"
        )
    spans = []
    for axis, n_coarse in enumerate((coarse.height, coarse.width)):
        lo, hi = 0, n_coarse
        for fine, off in zip(fines, offsets, strict=True):
            n_fine = (fine.height, fine.width)[axis]
            lo, hi = max(lo, -(off[axis] // r)), min(hi, (n_fine - off[axis]) // r)
        if hi <= lo:
            raise FusionError(
                f"{' and '.join(names)} do not overlap (their bounds do not intersect by a whole "
                f"{names[0]} pixel): check that they are the same scene"
            )
        spans.append((lo, hi - lo))
    (row0, h), (col0, w) = spans
    fine_windows = [Window(oc + r * col0, orow + r * row0, r * w, r * h) for orow, oc in offsets]
    return r, Window(col0, row0, w, h), fine_windows


def warp_to_pan_crs(
    ms_ds: Any, pan_ds: Any, expected_ratio: int | None = None, nodata: float | None = None
) -> Any:
    """The MS as a GDAL warped VRT in the PAN's CRS, on a grid aligned with the PAN grid: its pixel
    is `ratio` PAN pixels, `ratio` being the MS/PAN pixel-size ratio measured in the PAN's CRS
    (rounded; the model's ratio when given and within 5 %), its origin a PAN pixel corner. The pair
    then relates like a same-CRS pair. Cubic resampling, done block by block by GDAL as windows are
    read (memory stays bounded); pixels outside the MS footprint read as masked (its nodata, or an
    alpha band when it has none, which `raster.select_bands` leaves out).

    `nodata` replaces the MS's own nodata value (--ms-nodata), so the resampling leaves it out too.
    The caller closes the returned dataset. Raises FusionError when either input lacks a CRS or the
    PAN grid is rotated.
    """
    from rasterio.enums import ColorInterp, Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.warp import calculate_default_transform, transform_bounds

    if pan_ds.crs is None or ms_ds.crs is None:
        raise FusionError("--reproject needs a CRS on both inputs")
    pt = pan_ds.transform
    if abs(pt.b) > 1e-12 * abs(pt.a) or abs(pt.d) > 1e-12 * abs(pt.e) or pt.a <= 0 or pt.e >= 0:
        raise FusionError("--reproject needs a north-up PAN grid; warp the PAN first (gdalwarp)")
    native, _, _ = calculate_default_transform(
        ms_ds.crs, pan_ds.crs, ms_ds.width, ms_ds.height, *ms_ds.bounds
    )
    measured = math.sqrt(abs(native.a * native.e) / abs(pt.a * pt.e))
    ratio = max(1, round(measured))
    if expected_ratio is not None and abs(measured / expected_ratio - 1) < 0.05:
        ratio = expected_ratio
    cell_x, cell_y = ratio * pt.a, ratio * -pt.e
    left, bottom, right, top = transform_bounds(ms_ds.crs, pan_ds.crs, *ms_ds.bounds, densify_pts=21)
    col0, col1 = math.floor((left - pt.c) / cell_x), math.ceil((right - pt.c) / cell_x)
    row0, row1 = math.floor((pt.f - top) / cell_y), math.ceil((pt.f - bottom) / cell_y)
    transform = Affine(cell_x, 0.0, pt.c + col0 * cell_x, 0.0, -cell_y, pt.f - row0 * cell_y)
    nodata = ms_ds.nodata if nodata is None else nodata
    return WarpedVRT(
        ms_ds,
        crs=pan_ds.crs,
        transform=transform,
        width=col1 - col0,
        height=row1 - row0,
        resampling=Resampling.cubic,
        src_nodata=nodata,
        nodata=nodata,
        add_alpha=nodata is None and ColorInterp.alpha not in ms_ds.colorinterp,  # GDAL: one alpha at most
    )


def _keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    w = np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a)
    return np.where(t < 2, w, 0.0)


def cubic_matrix(u: np.ndarray, start: int, n: int) -> np.ndarray:
    """Interpolation matrix `(len(u), n)`: row k holds the cubic weights that sample position u[k]
    from samples at indices start .. start+n-1. The caller reads those samples (padded)."""
    idx = np.arange(start, start + n, dtype=np.float64)
    w = _keys_cubic(u[:, None] - idx[None, :])
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def support(u: np.ndarray) -> tuple[int, int]:
    """Index range [start, stop) the cubic kernel needs to sample at positions u."""
    return int(math.floor(u.min())) - 1, int(math.floor(u.max())) + 3


def _selection(w: np.ndarray) -> np.ndarray | None:
    """The sample index of each row when `w` only picks samples (weights 1 and 0: MS centres on the
    sample grid, the usual aligned pair), else None."""
    idx = np.argmax(w, axis=1)
    if np.all(w[np.arange(w.shape[0]), idx] == 1.0) and np.count_nonzero(w) == w.shape[0]:
        return idx
    return None


def resample(data: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """`(C, n, m)` samples -> `(C, len(u_y), len(u_x))` through separable weight matrices."""
    data = data.astype(np.float32, copy=False)
    iy, ix = _selection(wy), _selection(wx)
    if iy is not None and ix is not None:  # a crop: no arithmetic, same values
        return data[:, iy][:, :, ix]
    # In float64: a float32 GEMM's rounding depends on the BLAS's thread count at start-up
    # (OPENBLAS/OMP_NUM_THREADS=1, as Dask workers run, changed 55 of 1.2M example-scene DN by 1),
    # so the same scene fused on a cluster and here differed; float64 rounds back to the same float32.
    # numpy's matmul falls back to a slow non-BLAS loop (~1000x) for a transposed (F-ordered) right
    # operand broadcast over bands: give it a C-contiguous one.
    rows = np.matmul(wy.astype(np.float64), data.astype(np.float64))
    return np.matmul(rows, np.ascontiguousarray(wx.T, dtype=np.float64)).astype(np.float32)


def nearest_index(u: np.ndarray, start: int, n: int) -> np.ndarray:
    return np.clip(np.floor(u + 0.5).astype(np.int64) - start, 0, n - 1)


# ---------------------------------------------------------------------------------------------
# Misregistration: phase correlation with an upsampled-DFT peak (Guizar-Sicairos et al. 2008).

# Lowest correlation peak whose shift --coregister applies. Real pairs measured 0.46-0.48 (Landsat-7
# FuseBox), 0.58 (WorldView-3), 0.62-0.73 (EO-1), 0.66 (Landsat-8), 0.75 (WorldView-2); unrelated
# images 0.21-0.27, with shifts of several MS pixels that would misplace the product.
MIN_SHIFT_PEAK = 0.35


class ShiftNotMeasurable(FusionError):
    """No shift can be measured: an image has no features (it is constant) where it is measured
    (phase correlation of a constant image divides zero by zero and returns an arbitrary peak), or,
    when the shift is to be applied, the scene is too small or mostly nodata (`measure_shift`)."""


def _featureless(image: np.ndarray, valid: np.ndarray | None = None) -> bool:
    """Whether `image` is constant over its `valid` pixels (to 1e-6 of its magnitude)."""
    values = image[valid] if valid is not None else image
    if values.size == 0:
        return True
    return not float(np.ptp(values)) > 1e-6 * float(np.abs(values).max())


def _hann2d(h: int, w: int) -> np.ndarray:
    return np.outer(np.hanning(h), np.hanning(w)).astype(np.float64)


def phase_correlation(ref: np.ndarray, mov: np.ndarray, upsample: int = 20) -> tuple[float, float, float]:
    """Sub-pixel shift (dy, dx) such that mov(y, x) ~ ref(y - dy, x - dx); also the peak height
    (0..1, how much the two images agree). Raises ShiftNotMeasurable when either is constant."""
    h, w = ref.shape
    win = _hann2d(h, w)
    fa = np.fft.fft2((ref - ref.mean()) * win)
    fb = np.fft.fft2((mov - mov.mean()) * win)
    cross = fb * np.conj(fa)
    magnitude = np.abs(cross)
    if not magnitude.max() > 0:
        raise ShiftNotMeasurable("cannot measure a shift: one of the images is constant (featureless)")
    cross /= magnitude + 1e-12 * magnitude.max()
    cc = np.fft.ifft2(cross).real
    py, px = np.unravel_index(int(np.argmax(cc)), cc.shape)
    py = py - h if py > h // 2 else py
    px = px - w if px > w // 2 else px
    # Refine on a 3x3-pixel neighbourhood of the peak with a matrix DFT at 1/upsample spacing.
    offs = np.arange(-1.5, 1.5 + 1e-9, 1.0 / upsample)
    ys, xs = py + offs, px + offs
    ky, kx = np.fft.fftfreq(h), np.fft.fftfreq(w)
    ey = np.exp(2j * np.pi * np.outer(ys, ky))
    ex = np.exp(2j * np.pi * np.outer(kx, xs))
    fine = (ey @ cross @ ex).real / (h * w)
    iy, ix = np.unravel_index(int(np.argmax(fine)), fine.shape)
    return float(ys[iy]), float(xs[ix]), float(fine[iy, ix])


def fit_intensity(ms: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Least-squares combination of MS bands `(C, h, w)` (plus offset) that best matches `target (h, w)`."""
    c = ms.shape[0]
    x = ms.reshape(c, -1).T.astype(np.float64)
    y = target.reshape(-1).astype(np.float64)
    if valid is not None:
        sel = valid.reshape(-1)
        x, y = x[sel], y[sel]
    if y.size < 16:
        raise ShiftNotMeasurable("too few valid pixels to estimate the PAN/MS shift")
    a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return np.tensordot(coef[:c], ms.astype(np.float64), axes=1) + coef[c]


def estimate_shift(
    pan: np.ndarray, ms_lr: np.ndarray, ratio: int, valid: np.ndarray | None = None, upsample: int = 20
) -> tuple[float, float, float]:
    """Content shift (dy, dx) in PAN pixels of the PAN relative to the area-aligned MS.

    pan `(H, W)` and ms_lr `(C, H/r, W/r)` on the area-aligned grid of the same window; `valid
    (H, W)`. `(+a, +b)` means the PAN content sits a rows lower and b columns further right than
    the MS (the convention of ../shared/data/README.md). The PAN is area-averaged to the MS grid
    (the low-pass), an intensity is fitted from the MS bands, and both are phase-correlated at
    the MS resolution; returns (dy, dx, peak). A PAN or MS without features (constant over the
    valid pixels) has no shift to measure: ShiftNotMeasurable, not an arbitrary peak.
    """
    h, w = ms_lr.shape[-2:]
    pan_lr = pan[: h * ratio, : w * ratio].reshape(h, ratio, w, ratio).mean(axis=(1, 3))
    v_lr = None
    if valid is not None:
        v_lr = valid[: h * ratio, : w * ratio].reshape(h, ratio, w, ratio).all(axis=(1, 3))
    inten = fit_intensity(ms_lr, pan_lr, v_lr)
    for name, image in (("PAN", pan_lr), ("MS", inten)):
        if _featureless(image, v_lr):
            raise ShiftNotMeasurable(
                f"cannot measure the PAN/MS shift: the {name} is featureless (constant) where it is measured"
            )
    if v_lr is not None and not v_lr.all():
        # Invalid pixels would dominate the correlation: give them the valid mean in both images.
        inten = np.where(v_lr, inten, inten[v_lr].mean())
        pan_lr = np.where(v_lr, pan_lr, pan_lr[v_lr].mean())
    dy, dx, peak = phase_correlation(inten, pan_lr, upsample)
    return dy * ratio, dx * ratio, peak
