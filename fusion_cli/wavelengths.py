"""The wavelengths of a product's bands, for GDAL's IMAGERY metadata domain: from a sensor's band
table (the classical methods, given `--sensor`) or from the band names of a model card (a network).

The tables give each band's centre and full width at half maximum in micrometres:

* Landsat-8/9 OLI: the measured relative spectral responses (Barsi et al., "The Spectral Response of
  the Landsat-8 Operational Land Imager", Remote Sens. 2014, 6, 10232), bands 1-7.
* Landsat-7 ETM+: the bandpasses of the Landsat 7 Science Data Users Handbook, bands 1-5 and 7.
* WorldView-2/3 (8 VNIR bands), QuickBird, IKONOS, GeoEye-1, WorldView-4: the nominal bandpasses of
  the vendors' spectral sheets (centre: the middle; width: the bandpass).

Sentinel-2, Hyperion and the generic entry have no table here: their products get no wavelengths
from `--sensor`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fusion_cli.sensors import four_band, sensor_or_generic


@dataclass(frozen=True)
class Wavelength:
    centre_um: float
    fwhm_um: float | None = None  # None: the source gives a centre only

    @classmethod
    def span(cls, lo_um: float, hi_um: float) -> Wavelength:
        return cls(round((lo_um + hi_um) / 2, 6), round(hi_um - lo_um, 6))


def _spans(*bands: tuple[str, float, float]) -> dict[str, Wavelength]:
    return {name: Wavelength.span(lo, hi) for name, lo, hi in bands}


_VNIR8 = _spans(
    ("coastal", 0.400, 0.450),
    ("blue", 0.450, 0.510),
    ("green", 0.510, 0.580),
    ("yellow", 0.585, 0.625),
    ("red", 0.630, 0.690),
    ("rededge", 0.705, 0.745),
    ("nir1", 0.770, 0.895),
    ("nir2", 0.860, 1.040),
)
_GEOEYE = _spans(
    ("blue", 0.450, 0.510), ("green", 0.510, 0.580), ("red", 0.655, 0.690), ("nir", 0.780, 0.920)
)

# Per sensor (a key of `sensors.SENSORS`), its MS bands in the sensor's band order.
BANDS: dict[str, dict[str, Wavelength]] = {
    "landsat8": {
        "coastal": Wavelength(0.443, 0.016),
        "blue": Wavelength(0.482, 0.060),
        "green": Wavelength(0.561, 0.057),
        "red": Wavelength(0.655, 0.037),
        "nir": Wavelength(0.865, 0.028),
        "swir1": Wavelength(1.609, 0.085),
        "swir2": Wavelength(2.201, 0.187),
    },
    "landsat7": _spans(
        ("blue", 0.450, 0.515),
        ("green", 0.525, 0.605),
        ("red", 0.630, 0.690),
        ("nir", 0.775, 0.900),
        ("swir1", 1.550, 1.750),
        ("swir2", 2.090, 2.350),
    ),
    "wv2": _VNIR8,
    "wv3": _VNIR8,
    "qb": _spans(
        ("blue", 0.450, 0.520), ("green", 0.520, 0.600), ("red", 0.630, 0.690), ("nir", 0.760, 0.900)
    ),
    "ikonos": _spans(
        ("blue", 0.445, 0.516), ("green", 0.506, 0.595), ("red", 0.632, 0.698), ("nir", 0.757, 0.853)
    ),
    "geoeye1": _GEOEYE,
    "wv4": _GEOEYE,
}


def _words(name: str) -> set[str]:
    """The band words of a name: "B5 NIR" -> {b5, nir}; "SWIR 1" -> {swir1}; "red edge" -> {rededge}."""
    text = re.sub(r"([a-z])[\s_-]+(\d)\b", r"\1\2", name.lower())
    words = set(re.findall(r"[a-z]+\d*", text))
    if "edge" in words:  # red edge is its own band, not red
        words = (words - {"red", "edge"}) | {"rededge"}
    return words


def from_sensor(
    sensor: str | None,
    names: Sequence[str],
    bands: Sequence[int],
    file_bands: int,
    numbers: Sequence[int] | None = None,
) -> list[Wavelength] | None:
    """The product bands' wavelengths from the sensor's table: each band by the one table band its
    `names` (the MS band descriptions) name (e.g. "B4 red"); else by its sensor band number
    (`numbers`, as --sensor-bands gave them or `sensors.sensor_band_numbers` found them); else, for an
    MS with all the sensor's bands, by number (`bands`, 1-based in the file), or its blue, green, red
    and NIR1 for a 4-band MS of an 8-band sensor. None for an unknown sensor or bands it cannot place."""
    key = sensor_or_generic(sensor)
    table = BANDS.get(key or "")
    if table is None:
        return None
    order = list(table)
    picks = []
    for name in names:
        hits = [b for b in order if b in _words(name)]
        picks.append(hits[0] if len(hits) == 1 else None)
    if all(picks) and len(set(picks)) == len(picks):
        return [table[b] for b in picks]
    if numbers is not None and len(numbers) == len(bands) and max(numbers) <= len(order):
        return [table[order[n - 1]] for n in numbers]
    four = four_band(key) if key else None
    if file_bands == len(order):
        return [table[order[b - 1]] for b in bands]
    if file_bands == 4 and four is not None:
        return [table[order[four[b - 1]]] for b in bands]
    return None


_RANGE = re.compile(r"(\d+(?:\.\d+)?)\s*[-\u2013]\s*(\d+(?:\.\d+)?)\s*nm")
_VALUE = re.compile(r"(\d+(?:\.\d+)?)\s*nm")


def _name_spans(name: str) -> list[tuple[float, float]]:
    """The bandpasses (nm) a band name states: "ETM+ B3 630-690 nm / OLI B4 636-673 nm" -> two; a
    lone value ("457.34 nm") is a span of zero width."""
    spans = [(float(a), float(b)) for a, b in _RANGE.findall(name)]
    return spans + [(float(v), float(v)) for v in _VALUE.findall(_RANGE.sub("", name))]


def bandpasses_of_names(names: Sequence[str]) -> list[list[Wavelength]] | None:
    """Every bandpass each band name states (a card naming two sensors' bands gives both), as
    wavelengths; None unless every name gives one."""
    out = []
    for name in names:
        spans = _name_spans(name)
        if not spans:
            return None
        out.append([Wavelength.span(lo / 1000, hi / 1000) for lo, hi in spans])
    return out


def from_names(names: Sequence[str]) -> list[Wavelength] | None:
    """Wavelengths from band names that state them in nm, as model cards do: "red (630-690 nm)" ->
    0.66 um wide 0.06, "Hyperion band 11 (457.34 nm)" -> 0.45734 um. A name giving several sensors'
    bandpasses ("ETM+ B3 630-690 nm / OLI B4 636-673 nm") gets their common part (636-673 nm): what
    every sensor the card names sees. None unless every name gives one."""
    out = []
    for name in names:
        spans = _name_spans(name)
        if not spans:
            return None
        lo, hi = max(s[0] for s in spans), min(s[1] for s in spans)
        if lo > hi:  # bandpasses that do not overlap: no one wavelength
            return None
        w = Wavelength.span(lo / 1000, hi / 1000)
        out.append(w if w.fwhm_um else Wavelength(w.centre_um))
    return out


def of_raster(ds: Any, bands: Sequence[int]) -> list[Wavelength | None]:
    """The wavelengths of a raster's `bands` (1-based) as it states them: GDAL's IMAGERY domain
    (CENTRAL_WAVELENGTH_UM, FWHM_UM: what this tool's products carry), a WAVELENGTH_NM band tag,
    ENVI's `wavelength` (and `fwhm`) band items in their `wavelength_units` (what GDAL reads from an
    ENVI header and gdal_translate keeps), or a band description in nm ("Hyperion band 11 (457.34
    nm)", "B4 red (636-673 nm)"); None for a band that states none (or one that does not parse). A
    centre stated without a width takes the description's bandpass around it."""
    units = ds.tags().get("wavelength_units")
    out: list[Wavelength | None] = []
    for b in bands:
        named = from_names([ds.descriptions[b - 1] or ""])
        try:
            stated = _stated(ds.tags(b, ns="IMAGERY"), ds.tags(b), units)
        except ValueError:
            out.append(None)
            continue
        if stated is None:
            out.append(named[0] if named else None)
        elif stated.fwhm_um is None and named and named[0].fwhm_um and _within(stated, named[0]):
            out.append(Wavelength(stated.centre_um, named[0].fwhm_um))
        else:
            out.append(stated)
    return out


def _stated(imagery: dict[str, str], tags: dict[str, str], units: str | None) -> Wavelength | None:
    """A band's wavelength from its IMAGERY items, WAVELENGTH_NM or ENVI items (ValueError: one that
    does not parse); None when it states none."""
    if "CENTRAL_WAVELENGTH_UM" in imagery:
        fwhm = imagery.get("FWHM_UM")
        return Wavelength(float(imagery["CENTRAL_WAVELENGTH_UM"]), float(fwhm) if fwhm else None)
    if "WAVELENGTH_NM" in tags:
        return Wavelength(float(tags["WAVELENGTH_NM"]) / 1000)
    if "wavelength" in tags:
        centre = float(tags["wavelength"])
        unit = (tags.get("wavelength_units") or units or "").strip().lower()
        # ENVI writes "Nanometers" or "Micrometers"; without them ("Unknown", "Index", none), VNIR-SWIR
        # centres tell the two apart
        if unit.startswith(("mic", "um", "µm")):
            to_um = 1.0
        elif unit.startswith("nan") or unit == "nm":
            to_um = 1e-3
        else:
            to_um = 1e-3 if centre > 100 else 1.0
        fwhm = float(tags["fwhm"]) * to_um if tags.get("fwhm") else None
        return Wavelength(round(centre * to_um, 6), round(fwhm, 6) if fwhm else None)
    return None


def _within(centre: Wavelength, band: Wavelength) -> bool:
    """Whether a stated centre lies inside a bandpass (the description's, `band`)."""
    return abs(centre.centre_um - band.centre_um) <= (band.fwhm_um or 0) / 2


def imagery_metadata(wavelengths: Sequence[Wavelength | None]) -> list[dict[str, str]]:
    """Each band's items of GDAL's IMAGERY metadata domain, where GDAL (3.10+) and GIS tools read a
    band's wavelength: CENTRAL_WAVELENGTH_UM, and FWHM_UM when known; none for a band of unknown
    wavelength (None)."""
    items: list[dict[str, str]] = []
    for w in wavelengths:
        if w is None:
            items.append({})
            continue
        band = {"CENTRAL_WAVELENGTH_UM": f"{w.centre_um:.6g}"}
        if w.fwhm_um is not None:
            band["FWHM_UM"] = f"{w.fwhm_um:.6g}"
        items.append(band)
    return items
