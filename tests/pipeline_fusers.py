"""Small local fusers for the pipeline tests: geometry, nodata and seams are tested independently
of the network (their receptive field is known, so tiled output must equal one-piece output)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion_cli.fusers import FuserDefaults


class RepeatFuser(FuserDefaults):
    """Returns the MS nearest-upsampled (each low-res sample fills its ratio x ratio block): exposes
    exactly what the pipeline fed as MS, so placement can be checked pixel by pixel."""

    name = "repeat"
    halo = 0
    tile_multiple = 1
    needs_stats = False

    def __init__(self, ratio: int, ms_bands: int | None = None, pan_bands: int = 1) -> None:
        self.ratio, self.ms_bands, self.pan_bands = ratio, ms_bands, pan_bands

    def accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int] = (0, 0)
    ) -> None:
        pass

    def finalize(self) -> None:
        pass

    def fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        r = self.ratio
        return ms.repeat_interleave(r, dim=2).repeat_interleave(r, dim=3)


class DetailFuser(RepeatFuser):
    """Bicubic MS plus the PAN's 5x5 high-pass detail: a local, non-trivial fuser with a known
    receptive field (bicubic: 2 MS px, box: 2 PAN px), hence halo 8 PAN px covers it."""

    name = "detail"
    halo = 8

    def fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(ms, scale_factor=self.ratio, mode="bicubic", align_corners=False)
        p = pan.mean(dim=1, keepdim=True)
        low = F.avg_pool2d(F.pad(p, (2, 2, 2, 2), mode="reflect"), 5, 1)
        return up + (p - low)


class StatsFuser(DetailFuser):
    """Needs a first pass: counts the valid PAN pixels it was shown, refuses to fuse before finalize()."""

    name = "stats"
    needs_stats = True

    def __init__(self, ratio: int, ms_bands: int | None = None, pan_bands: int = 1) -> None:
        super().__init__(ratio, ms_bands, pan_bands)
        self.sums = [0.0, 0.0]
        self.gain: float | None = None

    def accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int] = (0, 0)
    ) -> None:
        self.sums[0] += float(pan[valid.expand_as(pan)].sum())
        self.sums[1] += float(valid.sum())

    def finalize(self) -> None:
        self.gain = 1.0

    def fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        assert self.gain is not None, "fuse() before finalize()"
        return super().fuse(pan, ms) * self.gain


class FailingFuser(DetailFuser):
    """Raises after a few calls: the output must not appear (atomic write)."""

    def __init__(self, ratio: int, after: int = 2, exc: type[BaseException] = RuntimeError) -> None:
        super().__init__(ratio)
        self.calls, self.after, self.exc = 0, after, exc

    def fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise self.exc("simulated failure mid-run")
        return super().fuse(pan, ms)
