"""Multiresolution-analysis methods on the MTF-matched generalized Laplacian pyramid (GLP).

The PAN's low-pass for band k is the sensor's MTF filter for that band, decimation by the ratio and
23-tap interpolation back (`pan_lowpass_per_band`); the detail P - P_L is injected into the
interpolated MS X. They differ by the injection model: additive with unit gain after matching the
PAN's mean/std to each band (MTF-GLP), multiplicative (HPM), or additive with gains regressed at full
scale (FS). All reproduce the reference toolbox's `MTF_GLP*.m`.
"""

from __future__ import annotations

import numpy as np
import torch

from fusion_cli.classical.base import (
    EPS,
    MTF_HALF,
    RATIO_METHOD_DN,
    ClassicalFuser,
    Moments,
    add_interp_moments,
    add_moments,
    gauss_lowpass_on_box,
    interp_support,
    kernel_sums,
    lr_valid,
    merged,
    mix_bands,
    pan_lowpass_per_band,
    valid_box,
)
from fusion_cli.errors import NoValidPixels
from fusion_cli.mtf import mtf_filter_decimate


class _MRA(ClassicalFuser):
    """The family's shared geometry: the PAN low-pass (MTF filter, half-width MTF_HALF) runs before
    interpolation, so every output pixel depends on that much more context; all gather statistics."""

    needs_stats = True
    uses_mtf_gains = True

    def support(self) -> int:
        return MTF_HALF + super().support()

    def stats_support(self) -> int:
        # the statistics' images (interpolated MS, PAN low-passed at full resolution or decimated)
        # each need one operator's context, not the chain's
        return max(MTF_HALF, interp_support(self.ratio))

    def _inject(
        self, pan: torch.Tensor, ms: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        """Additive injection X_k + gain_k (P - P_low,k) + offset_k, `(B, C, H, W)`.

        P_low,k is the GLP low-pass interp(D_k), D_k the PAN MTF-filtered (band k's gain) and
        decimated; interpolation is linear, so this equals interp(MS_k - gain_k D_k) + gain_k P +
        offset_k: one interpolation of C low-resolution bands, none of the PAN's low-pass."""
        c = ms.shape[1]
        g = gain.to(pan.dtype).view(1, c, 1, 1)
        low_lr = pan_lowpass_per_band(pan, self.gains(c), self.ratio, interpolate=False)
        out = self.upsample(ms - g * low_lr)
        return out.addcmul_(g, pan).add_(offset.to(pan.dtype).view(1, c, 1, 1))


class _GLP(_MRA):
    """PAN detail through the MTF-matched GLP; equalisation statistics shared by GLP and HPM."""

    def _init_state(self) -> None:
        self._moments: Moments | None = None
        self.scale: torch.Tensor | None = None  # (C,) a_k: PAN std matched to band k
        self.offset: torch.Tensor | None = None  # (C,) b_k: PAN mean matched to band k
        self.ksum: torch.Tensor | None = None  # (C,) MTF kernel sums
        self.band_mean: torch.Tensor | None = None  # (C,) |mean X_k|

    def _accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int]
    ) -> None:
        # features: X (C), P, LPfilterGauss(P): the toolbox matches std(X_k) / std(P low-passed)
        box = valid_box(valid)
        if box is None:
            return
        low = gauss_lowpass_on_box(pan, box, self.ratio)  # only the box counts: filter just that much
        self._moments = add_interp_moments(self._moments, ms, [pan, low], valid, self.ratio, full=False)

    def _merge(self, other: ClassicalFuser) -> None:
        assert isinstance(other, _GLP)
        self._moments = merged(self._moments, other._moments)

    def _finalize(self) -> None:
        if self._moments is None:
            raise NoValidPixels()
        m, sd = self._moments.mean, self._moments.std
        c = m.shape[0] - 2
        self.scale = sd[:c] / torch.clamp(sd[c + 1], min=EPS)
        self.offset = m[:c] - self.scale * m[c]
        self.band_mean = torch.clamp(m[:c].abs(), min=EPS)
        self.ksum = kernel_sums(self.gains(c), self.ratio)


class MTFGLP(_GLP):
    """Additive detail injection on the MTF-matched generalized Laplacian pyramid; Aiazzi et al.,
    "MTF-tailored multiscale fusion of high-resolution MS and Pan imagery", PE&RS 2006."""

    name = "mtf-glp"

    def _fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        # X + P_k - LP(P_k) with P_k = a_k P + b_k: gain a_k, offset b_k (1 - sum of the kernel)
        return self._inject(pan, ms, self.scale, self.offset * (1 - self.ksum))


class MTFGLPHPM(_GLP):
    """MTF-GLP with high-pass modulation (multiplicative injection, X * P / P_low); Aiazzi et al.,
    "An MTF-based spectral distortion minimizing model for pan-sharpening ...", URBAN 2003, and Vivone et al.
    IEEE GRSL 2014."""

    name = "mtf-glp-hpm"
    nonnegative_dn = RATIO_METHOD_DN

    def _fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        c = ms.shape[1]
        a = self.scale.to(pan.dtype).view(1, c, 1, 1)
        b = self.offset.to(pan.dtype).view(1, c, 1, 1)
        # equalised PAN P_k = a_k P + b_k and, the filter being linear, LP(P_k) = a_k LP(P) + b_k sum(kernel)
        p = torch.addcmul(b, a, pan)
        low = pan_lowpass_per_band(pan, self.gains(c), self.ratio)
        p_low = torch.addcmul(b * self.ksum.to(pan.dtype).view(1, c, 1, 1), a, low)
        # the mean/std-matched PAN goes negative on dark pixels (water, shadow) when a band's std is
        # large relative to its mean; the toolbox then divides by ~0 and explodes. Floor both terms
        # at 1 % of the band mean: identical wherever the toolbox's result is meaningful.
        floor = (0.01 * self.band_mean.to(pan.dtype)).view(1, c, 1, 1)
        gain = torch.maximum(p, floor, out=p).div_(torch.maximum(p_low, floor, out=p_low))
        return self.upsample(ms).mul_(gain)


class MTFGLPHS(_MRA):
    """Hypersharpening: for each band a synthetic PAN, regressed on the high-resolution bands (the HISR
    MSI, or the PAN) at low resolution, is injected by MTF-GLP high-pass modulation; Selva, Aiazzi,
    Butera, Chiarantini and Baronti, "Hyper-sharpening: a first approach on SIM-GA data", IEEE JSTARS
    2015."""

    name = "mtf-glp-hs"
    multiband_pan = True
    nonnegative_dn = RATIO_METHOD_DN

    def _init_state(self) -> None:
        self._moments: Moments | None = None  # [high-res bands degraded (P), MS (C)] on the MS grid
        self.weights: torch.Tensor | None = None  # (P, C): synthetic PAN of band k = pan . w_k + b_k
        self.bias: torch.Tensor | None = None  # (C,)
        self.band_mean: torch.Tensor | None = None  # (C,) |mean X_k|, the HPM floor's scale
        self.ksum: torch.Tensor | None = None  # (C,) MTF kernel sums

    def stats_support(self) -> int:
        return MTF_HALF  # the regression runs on the MS grid: only the PAN's MTF decimation

    def _regression_gain(self, c: int) -> float:
        # one degradation for the regression features: the mean MTF gain of the bands they predict
        return float(np.mean(self.gains(c)))

    def _accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int]
    ) -> None:
        c = ms.shape[1]
        pan_lr = mtf_filter_decimate(pan, self._regression_gain(c), self.ratio, rank=1)
        self._moments = add_moments(self._moments, [pan_lr, ms], lr_valid(valid, self.ratio))

    def _merge(self, other: ClassicalFuser) -> None:
        assert isinstance(other, MTFGLPHS)
        self._moments = merged(self._moments, other._moments)

    def _finalize(self) -> None:
        if self._moments is None:
            raise NoValidPixels()
        p = self.pan_bands
        cov, mean = self._moments.cov, self._moments.mean
        cxx = cov[:p, :p]
        ridge = 1e-9 * float(torch.trace(cxx)) / p  # collinear MSI bands stay solvable
        self.weights = torch.linalg.solve(cxx + ridge * torch.eye(p, dtype=cxx.dtype), cov[:p, p:])
        self.bias = mean[p:] - mean[:p] @ self.weights
        self.band_mean = torch.clamp(mean[p:].abs(), min=EPS)
        self.ksum = kernel_sums(self.gains(cov.shape[0] - p), self.ratio)

    def _fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        c = ms.shape[1]
        w, b = self.weights.to(pan.dtype), self.bias.to(pan.dtype)
        synth = mix_bands(pan, w) + b.view(1, c, 1, 1)
        # the low-pass is linear: LP(pan . w_k + b_k) = LP(pan) . w_k + b_k sum(kernel_k), one LP(pan)
        # per distinct band gain
        gains = self.gains(c)
        low = torch.empty_like(synth)
        for g in sorted(set(gains)):
            idx = torch.as_tensor([k for k in range(c) if gains[k] == g], device=pan.device)
            lp = self.upsample(mtf_filter_decimate(pan, g, self.ratio, rank=1))
            s = self.ksum.to(pan.dtype)[idx.cpu()].to(pan.device)
            low[:, idx] = mix_bands(lp, w[:, idx]) + (b[idx] * s).view(1, -1, 1, 1)
        floor = (0.01 * self.band_mean.to(pan.dtype)).view(1, -1, 1, 1)  # as MTF-GLP-HPM
        return self.upsample(ms) * (torch.maximum(synth, floor) / torch.maximum(low, floor))


class MTFGLPFS(_MRA):
    """MTF-GLP with injection gains regressed at full scale, cov(X_k, P) / cov(P_low, P); Vivone, Restaino
    and Chanussot, "Full scale regression-based injection coefficients for panchromatic sharpening",
    IEEE TIP 2018."""

    name = "mtf-glp-fs"

    def stats_support(self) -> int:
        return self.support()  # P_low is interpolated: the whole chain

    def _init_state(self) -> None:
        self._moments: Moments | None = None  # [X (C), P_low per distinct band gain, P]
        self._bands = 0
        self.gain: torch.Tensor | None = None  # (C,)

    def _accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int]
    ) -> None:
        self._bands = c = ms.shape[1]
        uniq = sorted(set(self.gains(c)))
        low = mtf_filter_decimate(pan.expand(-1, len(uniq), -1, -1), uniq, self.ratio, rank=1)
        # P_low is the interpolated decimated low-pass: both it and X are interpolations
        lr = torch.cat([ms, low], dim=1)
        self._moments = add_interp_moments(self._moments, lr, [pan], valid, self.ratio)

    def _merge(self, other: ClassicalFuser) -> None:
        assert isinstance(other, MTFGLPFS)
        self._moments = merged(self._moments, other._moments)
        self._bands = self._bands or other._bands

    def _finalize(self) -> None:
        if self._moments is None:
            raise NoValidPixels()
        c, gains = self._bands, self.gains(self._bands)
        cov_with_pan = self._moments.cov[:, -1]  # cov(X_k, P) for k < c, then cov(P_low, P)
        uniq = sorted(set(gains))
        cov_low = cov_with_pan[c:-1][[uniq.index(g) for g in gains]]
        safe = torch.where(cov_low.abs() > EPS, cov_low, torch.full_like(cov_low, EPS))
        self.gain = cov_with_pan[:c] / safe

    def _fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        return self._inject(pan, ms, self.gain, torch.zeros_like(self.gain))
