"""What a product's bands are: their descriptions, the RGB colour interpretation, and how they
encode their values (GDAL's band scale, offset and unit)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import rasterio
from rasterio.enums import ColorInterp

# The colour interpretations of a true-colour image's bands, in the order RGB means
RGB_INTERP = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)


def band_descriptions(ds: rasterio.io.DatasetReader, bands: Sequence[int]) -> list[str]:
    return [ds.descriptions[b - 1] or f"band {b}" for b in bands]


# An input's metadata items (default domain) that do not describe what is made from it: this tool's
# own record (an MS that is itself a product would make the new one's temporary look complete; a
# simulated MS's WALD_* tags describe its reduction, not a product), the
# TIFF's file-level tags, the grid's pixel convention (the product's transform states its own),
# netCDF packing (the encoding is written apart) and band statistics (of the source's pixels).
_NOT_CARRIED = re.compile(
    r"^(FUSION_|WALD_|TIFFTAG_|STATISTICS_)|^(AREA_OR_POINT|scale_factor|add_offset|_FillValue|missing_value)$"
)


def carried_tags(tags: dict[str, str]) -> dict[str, str]:
    """The items of an input's tags (a dataset's or a band's) that a product made from it keeps:
    scene ids, acquisition dates, sources, per-band wavelengths (WAVELENGTH_NM, ENVI's wavelength
    and fwhm)."""
    return {k: v for k, v in tags.items() if not _NOT_CARRIED.search(k)}


def carried_band_tags(ds: rasterio.io.DatasetReader, bands: Sequence[int]) -> list[dict[str, str]]:
    """`carried_tags` of each of `bands` (1-based), in their order: what each product band keeps."""
    return [carried_tags(ds.tags(b)) for b in bands]


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


def product_colorinterp(
    stated: Sequence[ColorInterp], descriptions: Sequence[str], model_names: Sequence[str] = ()
) -> list[ColorInterp] | None:
    """Colour interpretation of a product of MS bands whose own is `stated`: red, green and blue by the
    MS band `descriptions` where they name them (`rgb_colorinterp`), else the MS's where it states a
    colour (a B, G, R file tagged blue, green, red lost that order: GTiff's default made its product
    red, green, blue), else by the `model_names`; the other bands undefined. None: nothing says."""
    count = len(stated)
    named = rgb_colorinterp(count, descriptions)
    if named is not None:
        return named
    if any(c in RGB_INTERP for c in stated):
        return [c if c in RGB_INTERP else ColorInterp.undefined for c in stated]
    return rgb_colorinterp(count, model_names)


def is_rgb_order(colorinterp: Sequence[ColorInterp] | None) -> bool:
    """Whether the first three bands are red, green and blue in that order: what a TIFF's
    PHOTOMETRIC=RGB says to any reader, GDAL or not."""
    return colorinterp is not None and list(colorinterp[:3]) == list(RGB_INTERP)


@dataclass(frozen=True)
class Encoding:
    """How bands store their values, per band: value = DN * scale + offset, in `units` (GDAL's band
    scale, offset and unit type; Landsat Collection-2 reflectance is 2.75e-05 / -0.2). Fusion works
    on the stored DN: a product in MS DN keeps the MS bands' encoding to mean what they mean."""

    scales: tuple[float, ...]
    offsets: tuple[float, ...]
    units: tuple[str, ...]

    @classmethod
    def of(cls, ds: Any, bands: Sequence[int]) -> Encoding:
        """The encoding of the 1-based `bands` of an open dataset (1 / 0 and no unit where unset)."""

        def number(value: float | None, default: float) -> float:
            return default if value is None else float(value)

        return cls(
            tuple(number(ds.scales[b - 1], 1.0) for b in bands),
            tuple(number(ds.offsets[b - 1], 0.0) for b in bands),
            tuple(ds.units[b - 1] or "" for b in bands),
        )

    def select(self, positions: Sequence[int]) -> Encoding:
        """The encoding of some of these bands (0-based `positions`, in that order)."""
        parts = (self.scales, self.offsets, self.units)
        return Encoding(*(tuple(part[i] for i in positions) for part in parts))

    @property
    def pairs(self) -> tuple[tuple[float, float], ...]:
        return tuple(zip(self.scales, self.offsets, strict=True))

    @property
    def scaled(self) -> bool:
        """Whether a band stores its values scaled or offset (not 1 / 0)."""
        return any(p != (1.0, 0.0) for p in self.pairs)

    def describe(self) -> str:
        """The distinct scale / offset of the bands: "2.75e-05 / -0.2", "1 / 0, 2 / 0"."""
        return ", ".join(f"{s:.10g} / {o:.10g}" for s, o in dict.fromkeys(self.pairs))

    def write(self, dst: Any) -> None:
        """Set on an open writer of as many bands; plain bands (1 / 0, no unit) stay unset, as GDAL
        leaves them, so that their products are what they were."""
        if self.scaled:
            dst.scales = self.scales
            dst.offsets = self.offsets
        if any(self.units):
            dst.units = self.units
