"""Classical pansharpening methods, each a `Fuser` that streams through the same pipeline as the
network. `METHODS` maps a `--method` name to its class; `make_method` builds one; `describe` gives
the one-sentence help (with the paper) for the CLI.

Layout: `base` (shared plumbing, streaming statistics, low-pass operators), `exp` (interpolation),
`component` (component substitution: BT-H, GSA, PCA), `mra` (MTF-GLP family), `bdsd` (BDSD-PC).
"""

from __future__ import annotations

from collections.abc import Sequence

from fusion_cli.classical.base import ClassicalFuser
from fusion_cli.classical.bdsd import BDSDPC
from fusion_cli.classical.component import GSA, PCA, BroveyHaze
from fusion_cli.classical.exp import Exp
from fusion_cli.classical.mra import MTFGLP, MTFGLPFS, MTFGLPHPM, MTFGLPHS
from fusion_cli.errors import FusionError

METHODS: dict[str, type[ClassicalFuser]] = {
    cls.name: cls for cls in (Exp, BroveyHaze, GSA, PCA, MTFGLP, MTFGLPHPM, MTFGLPFS, BDSDPC, MTFGLPHS)
}


def make_method(
    name: str,
    ratio: int,
    sensor: str | None = None,
    ms_bands: int | None = None,
    pan_bands: int = 1,
    sensor_bands: Sequence[int] | None = None,
) -> ClassicalFuser:
    """A fresh classical fuser (statistics are per scene: build one per scene). `pan_bands > 1`: HISR,
    the high-resolution MSI's band mean is the method's PAN. `sensor_bands`: which of the sensor's
    bands (1-based) the MS bands are, for their MTF gains (default: all its bands in order)."""
    key = name.strip().lower()
    if key not in METHODS:
        raise FusionError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[key](
        ratio, sensor=sensor, ms_bands=ms_bands, pan_bands=pan_bands, sensor_bands=sensor_bands
    )


def describe(name: str) -> str:
    """One-paragraph help of a method: what it does and the paper it comes from."""
    doc = METHODS[name].__doc__ or ""
    return " ".join(doc.split())


__all__ = ["METHODS", "ClassicalFuser", "describe", "make_method"]
