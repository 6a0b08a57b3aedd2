"""The one interface between the streaming pipeline and every fusion method.

The network and each classical method implement `Fuser`, so the reader, tiler, nodata handling,
blending and writer are shared. Tiles are torch tensors in DN units (float32), never rescaled by
the caller: a fuser normalises by its own DN scale where it needs to.

Geometry of a call to `fuse`: `pan` is `(B, P, H, W)` with H and W multiples of `ratio`; `ms` is
`(B, C, H // ratio, W // ratio)` on the area-aligned low-resolution grid of the same window, so that
`ms[..., i, j]` covers `pan[..., ratio*i:ratio*(i+1), ratio*j:ratio*(j+1)]`. The window includes
`halo` PAN pixels of context on each side (reflect-padded at the scene edges); the pipeline crops
the halo off the result and blends the overlaps. A fuser whose statistics need another context than
its fusion may state `stats_halo`; the statistics pass then reads its windows with that margin.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Fuser(Protocol):
    name: str
    ratio: int
    ms_bands: int | None  # bands the method expects; None = any count
    pan_bands: int  # 1 for a panchromatic band, >1 for an MSI (HISR)
    halo: int  # PAN pixels of context needed on each side of a tile
    tile_multiple: int  # tile sides must be multiples of this (PAN pixels)
    needs_stats: bool  # True: call accumulate() over the scene, then finalize(), before fuse()

    def accumulate(self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor) -> None:
        """First streaming pass: gather global statistics from one tile.

        pan `(1, P, H, W)`, ms `(1, C, H/r, W/r)` in DN; valid `(1, 1, H, W)` bool, False at nodata.
        """

    def finalize(self) -> None:
        """Turn accumulated statistics into the method's global parameters."""

    def fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        """Fuse a batch of windows: pan `(B, P, H, W)`, ms `(B, C, H/r, W/r)` -> `(B, C, H, W)`, DN."""
