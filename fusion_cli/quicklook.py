"""True-colour quicklooks: a per-band percentile stretch to 8 bits, saved as PNG with matplotlib.

`mask` arguments are `(H, W)` bool arrays, True where the pixel is valid; invalid pixels (and NaN) are
left out of the percentiles and drawn black, so nodata borders do not wash out the stretch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fusion_cli.errors import FusionError

if TYPE_CHECKING:
    from rasterio.enums import ColorInterp

    from fusion_cli.wavelengths import Wavelength


def default_rgb(n_bands: int) -> tuple[int, int, int]:
    """A guess of the 0-based (red, green, blue) bands when the sensor is unknown.

    8-band WorldView order (coastal, blue, green, yellow, red, ...) -> (4, 2, 1); 4-band B, G, R, NIR
    -> (2, 1, 0); 3 bands are taken as R, G, B; fewer bands are shown as grey.
    """
    if n_bands >= 8:
        return (4, 2, 1)
    if n_bands >= 4:
        return (2, 1, 0)
    if n_bands == 3:
        return (0, 1, 2)
    return (0, 0, 0)


# Display wavelengths (um) of red, green and blue, and how far a band's centre may be from them
_RGB_UM = (0.65, 0.55, 0.47)
_RGB_TOLERANCE_UM = 0.05


def display_bands(
    names: Sequence[str | None],
    count: int,
    colorinterp: Sequence[ColorInterp] = (),
    stated: Sequence[Wavelength | None] = (),
) -> tuple[int, int, int]:
    """0-based (r, g, b) band indexes: the bands nearest 650 / 550 / 470 nm where the band `names` (a
    model card's, or the descriptions) or the raster's own tags (`stated`, its IMAGERY domain: the MS's
    wavelengths) give wavelengths (a 128-band HSI showed 498 / 477 / 467 nm, nearly grey), else bands
    named red / green / blue (B4 / B3 / B2), else `colorinterp` where it marks each of red, green and
    blue once (a B, G, R MS tagged so; not bands 1-3 of 8 or more, as SpaceNet's WorldView-3 MS has
    them), else the common guess by band count (`default_rgb`)."""
    from fusion_cli.raster import RGB_INTERP
    from fusion_cli.wavelengths import from_names

    labels = [str(n or "") for n in names]
    waves = from_names(labels) if labels else None
    for found in (waves, list(stated)):
        if found and len(found) == count and all(found):
            centres = np.array([w.centre_um for w in found if w is not None])
            picks = [int(np.argmin(np.abs(centres - um))) for um in _RGB_UM]
            if all(abs(centres[i] - um) <= _RGB_TOLERANCE_UM for i, um in zip(picks, _RGB_UM, strict=True)):
                return picks[0], picks[1], picks[2]

    def find(*keys: str) -> int | None:
        for i, n in enumerate(labels):
            if any(re.search(rf"\b{k}\b", n.lower()) for k in keys):  # words: "[inferred]" is no red
                return i
        return None

    r, g, b = find("red", "b4"), find("green", "b3"), find("blue", "b2")
    if r is not None and g is not None and b is not None:
        return r, g, b
    marked = [[i for i, c in enumerate(colorinterp) if c == colour] for colour in RGB_INTERP]
    # red, green, blue on bands 1-3 of an 8-band file are what SpaceNet's WorldView-3 MS carries on its
    # coastal, blue and green bands (vegetation showed dark blue): 8 bands go by WorldView's order
    gdal_default = count >= 8 and [m[:1] for m in marked] == [[0], [1], [2]]
    if all(len(m) == 1 for m in marked) and not gdal_default:
        return marked[0][0], marked[1][0], marked[2][0]
    return default_rgb(count)


def raster_display_bands(path: str | Path) -> tuple[int, int, int]:
    """`display_bands` of a raster file, from its band descriptions, wavelength tags and colours: what
    the report shows of a product (it went by the band count alone: a Landsat-7 R, G, B, ... product
    was drawn with red and blue swapped, a Hyperion one from its 436-467 nm bands)."""
    from fusion_cli.raster import gdal_env, open_raster
    from fusion_cli.wavelengths import of_raster

    with gdal_env(), open_raster(path, "product") as ds:
        bands = range(1, ds.count + 1)
        return display_bands(list(ds.descriptions), ds.count, ds.colorinterp, of_raster(ds, bands))


def _check_rgb(n_bands: int, rgb: Sequence[int]) -> tuple[int, int, int]:
    if len(rgb) != 3:
        raise FusionError(f"rgb needs three 0-based band indices, got {list(rgb)}")
    if min(rgb) < 0 or max(rgb) >= n_bands:
        raise FusionError(f"rgb bands {list(rgb)} out of range for an image with {n_bands} bands (0-based)")
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def stretch_limits(
    img: np.ndarray, pct: tuple[float, float] = (2.0, 98.0), mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band `pct` percentiles `(lo (C,), hi (C,))` over valid pixels of `(C, H, W)`."""
    data = np.asarray(img, dtype=np.float32)
    valid = _valid(data, mask)
    if not valid.any():
        return np.zeros(data.shape[0]), np.ones(data.shape[0])
    lo, hi = np.percentile(data[:, valid], pct, axis=1)
    return lo, hi


def _valid(data: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    valid = np.isfinite(data).all(axis=0)
    if mask is not None:
        if mask.shape != data.shape[1:]:
            raise FusionError(f"mask shape {mask.shape} does not match image rows/cols {data.shape[1:]}")
        valid &= mask.astype(bool)
    return valid


def stretch(
    img: np.ndarray,
    pct: tuple[float, float] = (2.0, 98.0),
    mask: np.ndarray | None = None,
    limits: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Stretch each band of `(C, H, W)` to [0, 1] between its own `pct` percentiles over valid pixels.

    `limits` (per-band lo, hi, e.g. a reference's `stretch_limits`) replaces the percentiles, so that
    several images share one stretch and their colours compare. Returns float32 `(C, H, W)`; invalid
    pixels are 0. A constant band maps to 0.
    """
    if img.ndim != 3:
        raise FusionError(f"expected a (bands, rows, cols) image, got shape {img.shape}")
    data = img.astype(np.float32, copy=False)
    valid = _valid(data, mask)
    lo, hi = (
        stretch_limits(data, pct, mask) if limits is None else (np.asarray(limits[0]), np.asarray(limits[1]))
    )
    span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    out = (data - lo[:, None, None].astype(np.float32)) / span[:, None, None]
    out = np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)
    out[:, ~valid] = 0.0
    return out


def stretch_rgb(
    img: np.ndarray,
    rgb: Sequence[int] = (0, 1, 2),
    pct: tuple[float, float] = (2.0, 98.0),
    mask: np.ndarray | None = None,
    limits: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """`(C, H, W)` image -> `(H, W, 3)` uint8 true-colour composite of the 0-based `rgb` bands.

    `limits`: per-band (lo, hi) of the three displayed bands, to share a stretch between images.
    """
    if img.ndim == 2:
        img = img[None]
    r, g, b = _check_rgb(img.shape[0], rgb)
    unit = stretch(img[[r, g, b]], pct, mask, limits)  # (3, H, W)
    return np.round(unit * 255.0).astype(np.uint8).transpose(1, 2, 0)


def save_quicklook(
    png_path: str | Path,
    img: np.ndarray,
    rgb: Sequence[int] | None = None,
    pct: tuple[float, float] = (2.0, 98.0),
    mask: np.ndarray | None = None,
    max_side: int | None = 2048,
    limits: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Write a true-colour PNG of `(C, H, W)` `img` (the input is never modified).

    `rgb=None` guesses the bands from the band count (`default_rgb`). `max_side` subsamples by an integer
    stride so that neither side exceeds it (None keeps full size); the percentiles are taken on the
    subsampled pixels, which is what is shown.
    """
    # matplotlib's image writer, not pyplot: a library call must not switch the process's backend
    # (matplotlib.use("Agg") turned a notebook's inline plots off)
    from matplotlib.image import imsave

    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise FusionError(f"a quicklook needs a (bands, rows, cols) image, got shape {img.shape}")
    if not 0 <= pct[0] < pct[1] <= 100:
        raise FusionError(f"stretch percentiles must satisfy 0 <= low < high <= 100, got {tuple(pct)}")
    if max_side is not None and max_side < 1:
        raise FusionError(f"max_side must be at least 1 pixel (or None for full size), got {max_side}")
    if Path(png_path).suffix.lower() != ".png":
        raise FusionError(f"a quicklook is a PNG: give a file name ending in .png, got {png_path}")
    if img.ndim == 2:
        img = img[None]
    if rgb is None:
        rgb = default_rgb(img.shape[0])
    step = 1
    if max_side is not None and max(img.shape[1:]) > max_side:
        step = -(-max(img.shape[1:]) // max_side)
    sub = img[:, ::step, ::step]
    sub_mask = None if mask is None else mask[::step, ::step]
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, stretch_rgb(sub, rgb, pct, sub_mask, limits))
    return path
