"""Sensor MTF table: the amplitude of each band's modulation transfer function at the Nyquist frequency
of the low-resolution grid. One table shared by the Wald protocol, the MTF-based classical methods and
the full-resolution quality indices (HQNR), so they all degrade images the same way.

Values for QuickBird, IKONOS, GeoEye-1/WV4, WorldView-2/3 and the generic default are those of the
reference toolbox (Vivone et al., `genMTF.m`). The others are documented choices:

* Landsat-8 OLI and Landsat-7 ETM+: on-orbit edge-response studies put the MS MTF at Nyquist around
  0.25-0.35 and the PAN around 0.15-0.2 (Storey et al., Remote Sens. 2014; ETM+ calibration papers),
  so the toolbox default (0.3 per MS band, 0.15 PAN) sits in the measured range and is kept.
* Sentinel-2 MSI: ESA's requirement is 0.15-0.3 at Nyquist and the in-flight 10 m / 20 m bands
  measure about 0.25-0.3; 0.27 per band is used. S2 has no PAN: the "PAN" gain (0.27) applies when a
  10 m band plays the PAN role for 20 m bands (ratio 2).
* EO-1 Hyperion + ALI: Hyperion's VNIR/SWIR MTF at Nyquist is reported around 0.27-0.3 pre-launch and
  lower on orbit; 0.27 per band is used, with the ALI PAN at 0.15 (the default PAN value).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fusion_cli.errors import FusionError

GENERIC_MS_GAIN = 0.3
GENERIC_PAN_GAIN = 0.15


@dataclass(frozen=True)
class SensorMTF:
    ms: tuple[float, ...]  # MS gains in the sensor's band order
    pan: float
    # 0-based positions of B, G, R, NIR in `ms`, for the common 4-band products of 8-band sensors
    four_band: tuple[int, ...] | None = None


_TABLE: dict[str, SensorMTF] = {
    "qb": SensorMTF((0.34, 0.32, 0.30, 0.22), 0.15),
    "ikonos": SensorMTF((0.26, 0.28, 0.29, 0.28), 0.17),
    "geoeye1": SensorMTF((0.23,) * 4, 0.16),
    "wv4": SensorMTF((0.23,) * 4, 0.16),
    # WV2/WV3 8-band order: coastal, blue, green, yellow, red, red edge, NIR1, NIR2
    "wv2": SensorMTF((0.35,) * 7 + (0.27,), 0.11, four_band=(1, 2, 4, 6)),
    "wv3": SensorMTF((0.325, 0.355, 0.360, 0.350, 0.365, 0.360, 0.335, 0.315), 0.14, four_band=(1, 2, 4, 6)),
    "landsat8": SensorMTF((GENERIC_MS_GAIN,), GENERIC_PAN_GAIN),
    "landsat7": SensorMTF((GENERIC_MS_GAIN,), GENERIC_PAN_GAIN),
    "sentinel2": SensorMTF((0.27,), 0.27),
    "hyperion": SensorMTF((0.27,), GENERIC_PAN_GAIN),
    "generic": SensorMTF((GENERIC_MS_GAIN,), GENERIC_PAN_GAIN),
}

_ALIASES = {
    "quickbird": "qb",
    "geoeye": "geoeye1",
    "ge1": "geoeye1",
    "worldview2": "wv2",
    "worldview3": "wv3",
    "worldview4": "wv4",
    "oli": "landsat8",
    "l8": "landsat8",
    "landsat9": "landsat8",
    "etm": "landsat7",
    "l7": "landsat7",
    "s2": "sentinel2",
    "msi": "sentinel2",
    "eo1": "hyperion",
    "ali": "hyperion",
    "none": "generic",
}

SENSORS: tuple[str, ...] = tuple(_TABLE)


def sensor_rows() -> list[dict[str, Any]]:
    """Each sensor's MS gains at Nyquist, its PAN gain and, where the wavelength table knows them, its
    bands in the order --sensor-bands numbers them: what `fusion info` lists."""
    from fusion_cli.wavelengths import BANDS

    return [
        {"sensor": key, "bands": list(BANDS.get(key, {})), "ms_gains": list(entry.ms), "pan_gain": entry.pan}
        for key, entry in _TABLE.items()
    ]


def sensor_aliases() -> tuple[str, ...]:
    """Other names `canonical_sensor` accepts (quickbird, worldview3, l8 ...), for shell completion."""
    return tuple(_ALIASES)


def four_band(sensor: str) -> tuple[int, ...] | None:
    """0-based positions of B, G, R, NIR in an 8-band sensor's bands (its 4-band products); None
    for other sensors. `sensor`: a key of the table (`canonical_sensor`)."""
    return _TABLE[sensor].four_band


def sensor_or_generic(sensor: str | None) -> str | None:
    """A known sensor's key, else None (generic gains): for free-text sensors of model cards."""
    try:
        return canonical_sensor(sensor) if sensor else None
    except FusionError:
        return None


def canonical_sensor(sensor: str | None) -> str:
    """Normalise a user-given sensor name ("WV3", "WorldView-3", "QB", None) to a key of the table."""
    if sensor is None:
        return "generic"
    key = sensor.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in _TABLE:
        raise FusionError(
            f"unknown sensor {sensor!r}: use one of {', '.join(SENSORS)} (or leave it out for generic gains)"
        )
    return key


def nyquist_gains(
    sensor: str | None, n_bands: int, bands: list[int] | None = None, file_bands: int | None = None
) -> tuple[list[float], float]:
    """MTF gains at Nyquist for `n_bands` MS bands and the PAN: `(ms_gains, pan_gain)`.

    `bands` (1-based, sensor order) selects a subset of the sensor's bands, as `--bands` does. A
    4-band image from an 8-band WorldView sensor is taken as blue, green, red, NIR1. Sensors with one
    gain for every band broadcast it to any band count. `file_bands`: the band count of the file the
    `n_bands` were picked from, when `bands` could not be told (`sensor_band_numbers`): the defaults
    above describe a file, so a pick from a file of another count is refused (4 of a 6-band WV3 file
    got blue, green, red, NIR1's gains).
    """
    if n_bands < 1:
        raise FusionError(f"need at least one MS band, got {n_bands}")
    entry = _TABLE[canonical_sensor(sensor)]
    table = list(entry.ms)
    if bands is None and file_bands is not None and file_bands != n_bands and len(table) > 1:
        raise FusionError(
            f"sensor {sensor} has {len(table)} bands but the MS holds {file_bands}: say which sensor bands "
            "it holds (--sensor-bands, e.g. 2,3,4,5,6,7) or use --sensor generic"
        )
    if bands is not None:
        if len(bands) != n_bands:
            raise FusionError(f"{len(bands)} band numbers given for a {n_bands}-band image")
        if len(table) > 1:
            if max(bands) > len(table) or min(bands) < 1:
                raise FusionError(f"band numbers must be in 1..{len(table)} for sensor {sensor}")
            return [table[b - 1] for b in bands], entry.pan
    if len(table) == 1:
        return table * n_bands, entry.pan
    if n_bands == len(table):
        return table, entry.pan
    if n_bands == 4 and entry.four_band is not None:
        return [table[i] for i in entry.four_band], entry.pan
    raise FusionError(
        f"sensor {sensor} has {len(table)} bands but the image has {n_bands}: "
        "say which sensor bands it holds (--sensor-bands, e.g. 2,3,5,7) or use --sensor generic"
    )


def check_sensor_bands_use(stated: Sequence[int] | None, sensor: str | None, classical: bool = True) -> None:
    """--sensor-bands (`stated`) says which of --sensor's bands the MS holds, for a classical method's
    MTF gains (and the indices' and the Wald reduction's): refused without a sensor, and for a network,
    whose card names its bands (`classical` False)."""
    if stated is None:
        return
    if not classical:
        raise FusionError(
            "--sensor-bands picks a classical method's MTF gains; a network's card names its bands: drop "
            "--sensor-bands"
        )
    if canonical_sensor(sensor) == "generic":
        raise FusionError("--sensor-bands says which of a sensor's bands the MS holds: give --sensor too")


def sensor_band_numbers(
    sensor: str | None,
    file_bands: int,
    selected: Sequence[int] | None = None,
    stated: Sequence[int] | None = None,
) -> list[int] | None:
    """1-based sensor band numbers (the sensor's own order: WV3 1 = coastal ... 8 = NIR2) of the
    `selected` bands (1-based in the file, as --bands; None: all) of an image that holds `file_bands`
    bands: what picks each band's MTF gain once --bands has subset or reordered the MS.

    The file's own numbers are `stated` (--sensor-bands, one per file band in file order); else, for a
    sensor with a gain per band, 1..n when the file holds all n of its bands, or blue, green, red and
    NIR1 for a 4-band file of an 8-band sensor. None where they cannot be told or do not matter (one
    gain for every band); `nyquist_gains` then says what to give.
    """
    check_sensor_bands_use(stated, sensor)
    entry = _TABLE[canonical_sensor(sensor)]
    n = len(entry.ms)
    if stated is not None:
        numbers = list(stated)
        if len(numbers) != file_bands:
            raise FusionError(
                f"--sensor-bands names {len(numbers)} band(s) but the MS holds {file_bands}: give one "
                "sensor band number per MS band, in the file's order"
            )
        if min(numbers) < 1 or (n > 1 and max(numbers) > n) or len(set(numbers)) != len(numbers):
            top = f"1..{n}" if n > 1 else "1 or more"
            raise FusionError(f"--sensor-bands must be distinct numbers in {top} for sensor {sensor}")
    elif n == 1:
        return None
    elif file_bands == n:
        numbers = list(range(1, n + 1))
    elif file_bands == 4 and entry.four_band is not None:
        numbers = [i + 1 for i in entry.four_band]
    else:
        return None
    if selected is None:
        return numbers
    if min(selected) < 1 or max(selected) > len(numbers):
        raise FusionError(f"bands {list(selected)} do not fit an MS of {len(numbers)} bands")
    return [numbers[b - 1] for b in selected]
