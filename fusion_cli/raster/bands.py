"""What a product's bands are: their descriptions and the RGB colour interpretation."""

from __future__ import annotations

import re
from collections.abc import Sequence

import rasterio
from rasterio.enums import ColorInterp


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
