"""Full-resolution terms of the training loss: what the product must satisfy at the scale it is used.

Wald-protocol training shows a network the MS one scale down, where the reference holds less detail
than a classical base injects; a network that corrects such a base learns to remove detail, and at
full resolution its products are softer than the base (`landsat`: HPC 0.436 against BDSD-PC's 0.542
on its held-out scenes). Two terms on patches of the training scenes at their original resolution,
which need no reference, tie the product to its own scale:

- spectral consistency: the product, low-passed with the sensor's MTF and decimated by the ratio,
  gives back the MS it was made from (Wald's consistency property); L1 in network units;
- detail: per band, the high-pass correlation with the PAN (HPC, `fusion_cli.metrics.sharpness`) is
  at least the base product's; the mean shortfall (a hinge, 0 where the network is as sharp).

Patches `(B, C, H, W)` on the PAN grid, MS `(B, C, H/r, W/r)`, PAN `(B, 1, H, W)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fusion_cli.errors import FusionError
from fusion_cli.training.data import Scene, TrainPair, attach_base


def full_resolution_pairs(scenes: Sequence[Scene], method: str, sensor: str | None) -> list[TrainPair]:
    """The real pairs among `scenes` at their original resolution, in network units, with the base
    `method`'s product. No reference exists at this scale: `ref` holds the base product too (the
    detail term compares with it). Scenes whose high-resolution input was synthesised (ratio 1) have
    no original-resolution pair and are left out."""
    pairs = []
    for s in scenes:
        if s.simulated or s.ratio == 1:
            continue
        r = s.ratio
        c, h, w = s.ms.shape
        h, w = h - h % r, w - w % r
        scale = np.float32(1.0 / s.dn_max)
        pan = np.ascontiguousarray(s.pan[:, : h * r, : w * r], dtype=np.float32) * scale
        ms = np.ascontiguousarray(s.ms[:, :h, :w], dtype=np.float32) * scale
        pairs.append(
            TrainPair(f"{s.name} (original resolution)", pan, ms, np.empty((c, 0, 0), np.float32), r)
        )
    with_base = attach_base(pairs, method, sensor)
    return [TrainPair(p.name, p.pan, p.ms, p.base, p.ratio, p.base) for p in with_base]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correlation over each patch's pixels, `(B, C, H, W)` twice -> `(B, C)`: the batched,
    differentiable form of `metrics.sharpness._pearson` (the metric works on masked numpy bands)."""
    a = a - a.mean(dim=(2, 3), keepdim=True)
    b = b - b.mean(dim=(2, 3), keepdim=True)
    den = torch.sqrt((a * a).sum(dim=(2, 3)) * (b * b).sum(dim=(2, 3)))
    return (a * b).sum(dim=(2, 3)) / den.clamp_min(1e-20)


def full_resolution_terms(
    out: torch.Tensor,
    pan: torch.Tensor,
    ms: torch.Tensor,
    base: torch.Tensor,
    gains: list[float],
    ratio: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(spectral consistency, detail shortfall) of a batch of products `out` (see the module
    docstring); `gains` are the bands' MTF gains at Nyquist."""
    from fusion_cli.mtf import mtf_filter, mtf_filter_decimate

    spectral = (mtf_filter_decimate(out, gains, ratio) - ms).abs().mean()

    def highpass(x: torch.Tensor) -> torch.Tensor:
        return x - mtf_filter(x, gains, ratio)

    pan_hp = highpass(pan[:, :1].expand(-1, out.shape[1], -1, -1))
    with torch.no_grad():
        target = _pearson(highpass(base), pan_hp)
    detail = torch.relu(target - _pearson(highpass(out), pan_hp)).mean()
    return spectral, detail


@torch.no_grad()
def full_resolution_scores(
    model: nn.Module, pairs: Sequence[TrainPair], device: torch.device, gains: list[float]
) -> dict[str, float]:
    """Mean spectral-consistency and detail terms of the model over full-resolution (validation) pairs:
    `{"full_spectral": ..., "full_detail": ...}`."""
    if not pairs:
        raise FusionError("no full-resolution validation pairs")
    was_training = model.training
    model.eval()
    spectral, detail = [], []
    for p in pairs:
        pan, ms, base = (
            torch.from_numpy(np.ascontiguousarray(a))[None].to(device) for a in (p.pan, p.ms, p.base)
        )
        out = model(ms, pan, base=base).float()
        s, d = full_resolution_terms(out, pan, ms, base, gains, p.ratio)
        spectral.append(float(s))
        detail.append(float(d))
    model.train(was_training)
    return {"full_spectral": float(np.mean(spectral)), "full_detail": float(np.mean(detail))}
