"""EXP: the MS interpolated to the PAN grid, the reference every method must improve on."""

from __future__ import annotations

import torch

from fusion_cli.classical.base import ClassicalFuser


class Exp(ClassicalFuser):
    """MS interpolated to the PAN grid with the 23-tap polynomial kernel (bicubic for other ratios); Aiazzi
    et al., "Context-driven fusion ... oversampled multiresolution analysis", IEEE TGRS 2002."""

    name = "exp"

    def _fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        return self.upsample(ms)
