"""Argument shapes shared by every selective-scan backend (`scan`, `scan_numba`, `scan_triton`)."""

from __future__ import annotations

import torch


def grouped_bc(channels: int, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C as `(B, G, N, L)`: a 3-D `(B, N, L)` is one group. The `channels` of u split into G
    equal groups that share B and C, so G must divide them and B and C must agree."""
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    if B.shape[1] != C.shape[1] or B.shape[2] != C.shape[2] or channels % B.shape[1]:
        raise ValueError(
            f"scan shapes: {channels} channels, B {tuple(B.shape)} and C {tuple(C.shape)} are not "
            "(B, G, N, L) groups of them"
        )
    return B, C
