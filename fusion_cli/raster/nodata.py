"""Which pixels are invalid: a nodata value given on the command line on top of a file's own
(`NodataOverride`), and whether a file can have invalid pixels at all (`has_mask`)."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags

from fusion_cli.errors import FusionError
from fusion_cli.notices import notify


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


def with_nodata(ds: Any, value: float | None, what: str = "input") -> Any:
    """`ds` with `value` as an extra nodata value (NodataOverride), or `ds` itself for None (refused
    by `check_nodata_fits` when its pixels cannot hold it)."""
    if value is None:
        return ds
    check_nodata_fits(value, ds.dtypes, what)
    return NodataOverride(ds, value)


def nodata_fits(value: float, dtype: str) -> bool:
    """Whether pixels of `dtype` can hold `value` (an integer in range; any float32/64 value)."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return math.isfinite(value) and value == int(value) and info.min <= value <= info.max
    return not math.isfinite(value) or abs(value) <= np.finfo(dt).max


def check_nodata_fits(value: float, dtypes: Sequence[str], what: str = "input") -> None:
    """A nodata value the pixels cannot hold is refused: it would mask nothing (NaN or -1 in uint16
    data) while the product's nodata silently became another value."""
    for dtype in sorted(set(dtypes)):
        if not nodata_fits(value, dtype):
            raise FusionError(
                f"nodata value {value:g} cannot occur in the {what}'s {dtype} pixels; give one within "
                f"the {dtype} range (e.g. 0), or none"
            )


def has_mask(ds: rasterio.io.DatasetReader, bands: Sequence[int] | None = None) -> bool:
    """True if some pixels may be invalid: a nodata value, an internal/sidecar mask or alpha."""
    return alpha_band(ds) is not None or any(band_masked(ds, b) for b in (bands or range(1, ds.count + 1)))


def band_masked(ds: rasterio.io.DatasetReader, band: int) -> bool:
    """Whether GDAL's mask of a 1-based band can mark pixels invalid: one from nodata or a mask, or
    from an alpha band that is a transparency (`alpha_band`), not one that holds data."""
    flags = ds.mask_flag_enums[band - 1]
    return MaskFlags.all_valid not in flags and (MaskFlags.alpha not in flags or alpha_band(ds) is not None)


# Per open dataset: its alpha-labelled band's verdict (`alpha_band`), read once
_ALPHA: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()


def alpha_band(ds: Any) -> int | None:
    """The 1-based band whose colour interpretation is alpha and that holds a transparency mask, or
    None. GDAL masks the other bands by it only when the TIFF declares it as an extra sample; a band
    merely labelled alpha is left to the reader (`read_padded` masks by it, as the band selection
    leaves it out). GDAL labels band 4 of every 4-band Byte GeoTIFF alpha, so a band so labelled
    counts only when at least half its (sampled) non-zero pixels hold its largest value (opaque): an
    8-bit B, G, R, NIR MS lost its NIR to a mask at exit 0; it is fused as a band, with a warning."""
    try:
        return _ALPHA[ds]
    except (KeyError, TypeError):
        pass
    found = None
    for i, interp in enumerate(ds.colorinterp, start=1):
        if interp == ColorInterp.alpha:
            found = i if _is_transparency(ds, i) else None
            if found is None:  # said once per run: a run's collection keeps each message once
                notify(
                    f"band {i} of {ds.name} is labelled alpha but holds data (GDAL labels the 4th band "
                    "of 4-band 8-bit GeoTIFFs so): it is read as a band, not as a mask"
                )
            break
    with contextlib.suppress(TypeError):  # an object that takes no weak reference is asked again
        _ALPHA[ds] = found
    return found


def _is_transparency(ds: Any, band: int) -> bool:
    step = max(1, math.ceil(math.sqrt(ds.width * ds.height / ALPHA_SAMPLES)))
    shape = (max(1, ds.height // step), max(1, ds.width // step))
    values = ds.read(band, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
    # opaque is one value (the type's maximum, 255 in any type as gdalwarp writes it, or 1): most of
    # the band's non-zero pixels hold it; a data band's differ (an 8-bit NIR with a 55 % zero collar)
    opaque = values[values != 0]
    return opaque.size == 0 or float((opaque == opaque.max()).mean()) >= 0.5


ALPHA_SAMPLES = 256 * 256  # pixels read to tell an alpha band's transparency from data
