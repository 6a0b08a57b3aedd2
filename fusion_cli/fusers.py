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

`Fuser` declares every attribute the pipeline uses; `FuserDefaults` gives the optional ones
(device, precision, card, tiling preferences...) their neutral values for fusers without a network.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from fusion_cli.models.registry import ModelCard


@runtime_checkable
class Fuser(Protocol):
    """Everything the pipeline reads from or calls on a fuser. Besides the geometry, a fuser states
    what it actually runs (`device`, `precision`, `scan_backend`): that, not what was asked for, is
    what a product's tags and the run summary record."""

    name: str
    ratio: int
    ms_bands: int | None  # bands the method expects; None = any count
    pan_bands: int  # 1 for a panchromatic band, >1 for an MSI (HISR)
    halo: int  # PAN pixels of context needed on each side of a tile
    stats_halo: int | None  # context of the statistics pass's windows; None: the fusion's margin
    tile_multiple: int  # tile sides must be multiples of this (PAN pixels)
    needs_stats: bool  # True: call accumulate() over the scene, then finalize(), before fuse()
    preferred_tile: int | None  # output tile side (PAN px) when the user gives none; None: pipeline's
    preferred_overlap: int | None  # blend zone (PAN px) when the user gives none; None: pipeline's
    # CPU windows fused concurrently, one single-threaded window per torch thread (small element-wise
    # ops, where intra-op threads mostly wait on each other)
    parallel_windows: bool
    device: torch.device  # where it runs (tiles are handed to it there)
    precision: str  # what it computes in: fp32, bf16 or fp16
    scan_backend: str | None  # a network's selective-scan backend; None without one
    card: ModelCard | None  # a network's model card (band names, DN scales); None for methods
    weights_sha256: str | None  # the weights it runs; None without weights
    weights_files: tuple[Path, ...]  # the files its weights came from (never to be overwritten)
    dn_max: float | None  # the DN scale it normalises by (a network); None: works in DN
    # why it needs DN >= 0 and what to do instead (a network, a ratio method); None: any sign
    nonnegative_dn: str | None
    scan_memory: float | None  # a network's scan memory in tokens (None: unbounded, or no scan)
    transpose_ensemble: bool | None  # a network's transpose self-ensemble; None without one

    def accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int] = (0, 0)
    ) -> None:
        """First streaming pass: gather global statistics from one tile.

        pan `(1, P, H, W)`, ms `(1, C, H/r, W/r)` in DN; valid `(1, 1, H, W)` bool, False at nodata;
        origin: the scene (row, col) of the window's top-left PAN pixel, for statistics that sample
        pixels by position (so that they do not depend on how the scene was cut into windows).
        """

    def finalize(self) -> None:
        """Turn accumulated statistics into the method's global parameters."""

    def fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        """Fuse a batch of windows: pan `(B, P, H, W)`, ms `(B, C, H/r, W/r)` -> `(B, C, H, W)`, DN."""


@runtime_checkable
class SplittableStats(Protocol):
    """A fuser whose statistics are sums (the classical methods): a part of the scene estimates them
    (`--stats-mpx`), and copies accumulating different windows in other threads merge exactly. A
    network's per-band maximum is not estimated from part of a scene, so networks are not this."""

    def stats_copy(self) -> Fuser:
        """A fresh, unfitted fuser of the same configuration, to accumulate part of a scene."""

    def merge_stats(self, other: Any) -> None:
        """Add the statistics a `stats_copy` accumulated; before `finalize`."""


@runtime_checkable
class SensorBound(Protocol):
    """A fuser set up for one sensor's bands (the classical methods: their MTF gains), whose products
    can carry that sensor's band wavelengths."""

    sensor: str  # a key of the sensor table (`sensors.canonical_sensor`); "generic" when none given
    sensor_bands: list[int] | None  # which of its bands (1-based) the MS bands are; None: in order
    ms_file_bands: int | None  # the band count of the MS file they were picked from, when known


class FuserDefaults:
    """The optional `Fuser` attributes at their neutral values, for fusers without a network (the
    classical methods, test fusers): on the CPU in fp32, no card, weights or scan; the pipeline's
    tiling defaults; one window at a time."""

    stats_halo: int | None = None
    preferred_tile: int | None = None
    preferred_overlap: int | None = None
    parallel_windows: bool = False
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    scan_backend: str | None = None
    card: ModelCard | None = None
    weights_sha256: str | None = None
    weights_files: tuple[Path, ...] = ()
    dn_max: float | None = None
    nonnegative_dn: str | None = None
    scan_memory: float | None = None
    transpose_ensemble: bool | None = None
