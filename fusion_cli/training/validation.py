"""Validation of a network on reduced-resolution pairs: the mean L1 in network units and the metric
table's validation indices in DN (`quality`), as the training loop and the recipes score an epoch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fusion_cli.errors import FusionError
from fusion_cli.training.data import TrainPair, attach_base


def autocast(device: torch.device, precision: str) -> Any:
    """Reduced-precision autocast on CUDA for bf16/fp16; a disabled one otherwise (fp32, the CPU)."""
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def model_base(model: nn.Module) -> str | None:
    """The classical base method a model corrects (FusionMambaConfig.base), None for the paper's."""
    return getattr(getattr(model, "config", None), "base", None)


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module,
    pairs: Sequence[TrainPair],
    device: torch.device,
    dn_max: float,
    precision: str = "fp32",
    sensor: str | None = None,
) -> dict[str, float]:
    """Mean L1 (network units) and the metric table's validation indices (on DN: `quality`) of the model
    over reduced-resolution pairs.
    A model with a base method gets it on each pair (fitted per pair, MTF gains of `sensor`)."""
    model.eval()
    method = model_base(model)
    if method is not None:
        pairs = attach_base(pairs, method, sensor)
    l1s: list[float] = []
    scores: dict[str, list[float]] = {}
    for p in pairs:
        pan = torch.from_numpy(np.ascontiguousarray(p.pan))[None].to(device)
        ms = torch.from_numpy(np.ascontiguousarray(p.ms))[None].to(device)
        base = None if p.base is None else torch.from_numpy(np.ascontiguousarray(p.base))[None].to(device)
        with autocast(device, precision):
            out = model(ms, pan, base=base)
        out = out.float()[0].cpu().numpy()
        l1s.append(float(np.abs(out - p.ref).mean()))
        for k, v in quality(p.ref * dn_max, np.clip(out, 0, None) * dn_max, p.ratio, dn_max).items():
            scores.setdefault(k, []).append(v)
    model.train()
    res = {"val_l1": float(np.mean(l1s)) if l1s else float("nan")}
    res.update({k: float(np.mean(v)) for k, v in scores.items() if v})
    return res


def quality(ref: np.ndarray, fused: np.ndarray, ratio: int, dn_max: float) -> dict[str, float]:
    """The validation indices of the metric table (Q2n, SAM, ERGAS, PSNR), keyed in lower case, of
    `fused` against `ref`, `(C, H, W)` DN.

    Integer DN products are rounded as the toolbox does for Q2n; float (reflectance-like) data,
    `dn_max` <= 1, are not; the PSNR peak is `dn_max`. An index that cannot be computed on this crop
    (e.g. a Q2n block larger than it) is left out rather than failing a training run.
    """
    from fusion_cli.metrics.table import Inputs, metrics

    block = min(32, ref.shape[1], ref.shape[2])
    x = Inputs(fused, ratio, ref=ref, block=block, round_uint16=dn_max > 1, psnr_peak=dn_max)
    out: dict[str, float] = {}
    for m in metrics("reduced"):
        if not m.validate:
            continue
        try:
            value = m.function(x)
        except (FusionError, ValueError, FloatingPointError):
            continue
        out[m.name.lower()] = float(value[0] if isinstance(value, tuple) else value)
    return out


# The smallest change of a validation index that the cards treat as real (issue 15's bound on what a
# speed change may move): a transpose ensemble, which doubles inference time, must buy more than this.
ENSEMBLE_MIN_GAIN = {"q2n": 0.002, "sam": 0.01, "ergas": 0.01}
_HIGHER_IS_BETTER = {"q2n": True, "sam": False, "ergas": False}


def ensemble_pays(one_pass: dict[str, float], ensemble: dict[str, float]) -> bool:
    """Whether the transpose ensemble earns its second pass on these validation scores: it improves at
    least one of Q2n, SAM, ERGAS by more than `ENSEMBLE_MIN_GAIN` and makes none of them worse."""
    gains = {}
    for key, higher in _HIGHER_IS_BETTER.items():
        if key in one_pass and key in ensemble:
            gains[key] = (ensemble[key] - one_pass[key]) * (1 if higher else -1)
    return all(g >= 0 for g in gains.values()) and any(g > ENSEMBLE_MIN_GAIN[k] for k, g in gains.items())


def choose_ensemble(
    model: nn.Module, pairs: Sequence[TrainPair], device: torch.device, dn_max: float, sensor: str | None
) -> tuple[bool, dict[str, dict[str, float]]]:
    """Score the model on validation pairs in one pass and with its transpose ensemble, set
    `model.config.transpose_ensemble` by `ensemble_pays`, and return the choice with both scores
    (`{"one_pass": ..., "ensemble": ...}`, for the card)."""
    scores = {}
    for label, on in (("one_pass", False), ("ensemble", True)):
        model.config = replace(model.config, transpose_ensemble=on)
        scores[label] = evaluate_pairs(model, pairs, device, dn_max, sensor=sensor)
    chosen = ensemble_pays(scores["one_pass"], scores["ensemble"])
    model.config = replace(model.config, transpose_ensemble=chosen)
    model.eval()
    return chosen, scores
