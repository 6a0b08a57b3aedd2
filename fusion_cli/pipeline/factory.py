"""What fuser to build (`FuserSpec`) and building it (`build_fuser`, or `make_fuser` with keywords):
a network from the registry, or a classical method for the pair's ratio."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from fusion_cli import raster
from fusion_cli.device import resolve_device
from fusion_cli.errors import FusionError
from fusion_cli.fusers import Fuser, SplittableStats

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class FuserSpec:
    """What to build: a network (`model` name or `weights` file; the default shipped model when both
    are None) or a classical `method`, where it runs and how. How to run it over a scene is a
    `FuseOptions`. The fuser built reports what it actually runs (a network asked for bf16 on a CPU
    runs fp32): read that from the fuser, not from here."""

    model: str | None = None
    weights: str | os.PathLike[str] | None = None
    method: str | None = None
    sensor: str | None = None  # MTF table of a classical method
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (a network on a GPU)
    dn_max: float | None = None  # a network's DN scale; None: its card's
    # network scan memory in tokens (FusionMambaConfig.scan_memory); None: the model card's, 0: unbounded
    scan_memory: float | None = None
    # network transpose self-ensemble (FusionMambaConfig.transpose_ensemble); None: the model card's
    ensemble: bool | None = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def build_fuser(
    spec: FuserSpec, *, ratio: int | None = None, ms_bands: int | None = None, pan_bands: int = 1
) -> Fuser:
    """The fuser `spec` names, for a pair of the given geometry: a classical method needs `ratio`
    (measured from the inputs); `ms_bands` is the MS band count when known, `pan_bands > 1` for HISR
    (an MSI in place of the PAN)."""
    network = spec.method is None
    if not network and (spec.model is not None or spec.weights is not None):
        raise FusionError("give either --method or --model/--weights, not both")
    if spec.scan_memory is not None and not network:
        raise FusionError("--scan-memory applies to networks, not to classical methods")
    if spec.ensemble is not None and not network:
        raise FusionError("--ensemble/--no-ensemble applies to networks, not to classical methods")
    if spec.scan_memory is not None and spec.scan_memory < 0:
        raise FusionError(
            f"--scan-memory must be a number of tokens > 0, or 0 for unbounded; got {spec.scan_memory}"
        )
    if spec.precision not in PRECISIONS:
        raise FusionError(f"unknown precision {spec.precision!r}; use fp32, bf16 or fp16")
    raster.check_dn_max(spec.dn_max)
    dev = resolve_device(spec.device)
    if spec.method is not None:
        from fusion_cli.classical import METHODS, make_method

        if spec.method.strip().lower() not in METHODS:  # make_method's own reading of the name
            raise FusionError(f"unknown method {spec.method!r}; choose one of: {', '.join(sorted(METHODS))}")
        if ratio is None:
            raise FusionError("a classical method needs the resolution ratio (measured from the inputs)")
        return make_method(spec.method, ratio, sensor=spec.sensor, ms_bands=ms_bands, pan_bands=pan_bands)
    from fusion_cli.models.fuser import NetworkFuser
    from fusion_cli.models.registry import load_model

    weights = None if spec.weights is None else str(spec.weights)
    loaded = load_model(name=spec.model, weights=weights, device=dev)
    if spec.scan_memory is not None:
        loaded.model.set_scan_memory(spec.scan_memory or None)
    if spec.ensemble is not None:
        loaded.model.config = replace(loaded.model.config, transpose_ensemble=spec.ensemble)
    kwargs: dict[str, Any] = {"device": dev, "precision": spec.precision}
    if spec.dn_max is not None:
        kwargs["dn_max"] = spec.dn_max
    return NetworkFuser(loaded, **kwargs)


def make_fuser(
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    method: str | None = None,
    ratio: int | None = None,
    sensor: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    dn_max: float | None = None,
    ms_bands: int | None = None,
    pan_bands: int = 1,
    scan_memory: float | None = None,
    ensemble: bool | None = None,
) -> Fuser:
    """`build_fuser` with the spec's fields as keywords. A network (`model` name or `weights` file;
    the default shipped model when both are None) or a classical `method` (needs `ratio`;
    `pan_bands > 1` for HISR). `scan_memory` overrides the network's (tokens; 0 = unbounded, as the
    official checkpoint); `ensemble` switches its transpose self-ensemble on or off (None: its card's)."""
    spec = FuserSpec(
        model=model,
        weights=weights,
        method=method,
        sensor=sensor,
        device=device,
        precision=precision,
        dn_max=dn_max,
        scan_memory=scan_memory,
        ensemble=ensemble,
    )
    return build_fuser(spec, ratio=ratio, ms_bands=ms_bands, pan_bands=pan_bands)


def scene_fuser(fuser: Fuser) -> Fuser:
    """The fuser one call of the pipeline works with: a copy that owns the scene's state (its
    statistics, the DN scale of its dtype, an --adapt-ed network), so the caller's fuser serves the
    next scene as it served this one. A classical method's sums start afresh (a second scene added
    to the first's statistics, or failed because they were final)."""
    if isinstance(fuser, SplittableStats) and fuser.needs_stats:
        return fuser.stats_copy()
    return copy.copy(fuser)


def adapt_dn_scale(fuser: Fuser, ms_dtype: str, override: float | None) -> None:
    """A model trained on several bit depths names its DN scale per input dtype in its card
    (`dn_max_by_dtype`, e.g. uint8 255 / uint16 65535); --dn-max, given to the fuser, wins."""
    table = fuser.card.dn_max_by_dtype if fuser.card is not None else None
    if override is None and table and ms_dtype in table and fuser.dn_max is not None:
        fuser.dn_max = float(table[ms_dtype])
