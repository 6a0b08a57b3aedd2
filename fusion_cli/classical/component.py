"""Component-substitution methods: an intensity I is built from the interpolated MS X, the PAN
(matched to I) replaces it, and the difference is injected into every band. They reproduce the
reference toolbox's `BroveyRegHazeMin.m`, `GSA.m` and `PCA.m`; every global quantity comes from
streamed moments (see `base`).

Each exposes `intensity(x)`, the component the PAN replaces expressed in PAN units: fusing with a
PAN equal to it returns X unchanged, the defining property of component substitution.
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
    QuantileSample,
    add_interp_moments,
    add_moments,
    gauss_lowpass_on_box,
    lr_valid,
    merged,
    mix_bands,
    position_keys,
    rows_where,
    upsample_on_box,
    valid_box,
)
from fusion_cli.errors import NoValidPixels
from fusion_cli.mtf import mtf_filter_decimate
from fusion_cli.sensors import GENERIC_MS_GAIN

# BT-H haze: a fraction of each band's 1st percentile (B, G, R, NIR), from Lolli et al. 2017
_HAZE_FRACTIONS = (0.95, 0.45, 0.40, 0.05)
_HAZE_PERCENTILE = 1.0
# A regression intensity whose weights cancel each other (sum |alpha| over |sum alpha|) amplifies each
# band's noise by that much in P / I: 1.6-2.2 on the WorldView-2/-3 and Landsat-8 scenes here, 14.5
# on the 128-band Paris HSI and worse on its thirds (weights of +-20: 12 pixels at 3-50x the truth).
_MAX_WEIGHT_SPREAD = 5.0


def _weighted_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_k w_k x_k: x `(B, C, H, W)`, w `(C,)` -> `(B, 1, H, W)`."""
    return mix_bands(x, w.reshape(-1, 1))


class BroveyHaze(ClassicalFuser):
    """Brovey transform with haze correction (BT-H): regression intensity, bands scaled by PAN / I after
    removing a per-band haze offset; Lolli, Alparone, Garzelli and Vivone, "Haze correction for
    contrast-based multispectral pansharpening", IEEE GRSL 2017."""

    name = "brovey"
    needs_stats = True
    nonnegative_dn = RATIO_METHOD_DN

    def support(self) -> int:
        return max(super().support(), MTF_HALF)

    def _init_state(self) -> None:
        self._moments: Moments | None = None
        self._quant = QuantileSample()
        self._min: torch.Tensor | None = None
        self.haze: torch.Tensor | None = None  # (C,) L_k
        self.alpha: torch.Tensor | None = None  # (C,) regression of the low-passed PAN on X
        self.pan_scale = self.pan_shift = 0.0  # P_eq = P * scale + shift
        self.mean_i = 0.0

    def _accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int]
    ) -> None:
        box = valid_box(valid)
        if box is None:
            return
        # everything on the valid box only: the window's margin is context
        x = upsample_on_box(ms, box, self.ratio)
        valid = valid[..., box[0], box[1]]
        low = gauss_lowpass_on_box(pan, box, self.ratio)
        self._moments = add_moments(self._moments, [x, low], valid)
        xr = rows_where(x, valid)
        if xr.shape[1] == len(_HAZE_FRACTIONS):
            # keyed by scene position: the same haze however the scene is cut into windows
            corner = (origin[0] + box[0].start, origin[1] + box[1].start)
            self._quant.add(xr, position_keys(valid, corner))
        elif xr.shape[0]:
            m = xr.min(0).values
            self._min = m if self._min is None else torch.minimum(self._min, m)

    def _merge(self, other: ClassicalFuser) -> None:
        assert isinstance(other, BroveyHaze)
        self._moments = merged(self._moments, other._moments)
        self._quant.merge(other._quant)
        if other._min is not None:
            self._min = other._min if self._min is None else torch.minimum(self._min, other._min)

    def _finalize(self) -> None:
        mom = self._moments
        if mom is None:
            raise NoValidPixels()
        c = mom.s.shape[0] - 1
        if c == len(_HAZE_FRACTIONS):
            self.haze = torch.as_tensor(_HAZE_FRACTIONS, dtype=mom.s.dtype) * self._quant.percentile(
                _HAZE_PERCENTILE
            )
        else:
            self.haze = self._min
        # alpha = X \ P_low (least squares, no constant), from the Gram matrix
        gram, rhs = mom.gram[:c, :c], mom.gram[:c, c]
        cov, mean = mom.cov, mom.mean

        def intensity_stats(alpha: torch.Tensor) -> tuple[float, float]:
            """Mean and std of the dehazed intensity I = sum alpha_k (X_k - L_k)."""
            spread = torch.sqrt(torch.clamp(alpha @ cov[:c, :c] @ alpha, min=0))
            return float(alpha @ (mean[:c] - self.haze)), float(spread)

        # a constant band carries no intensity, but in this uncentred fit it would act as an intercept
        # and move the other bands' weights: it gets weight 0
        varying = torch.diagonal(cov[:c, :c]) > 1e-12 * float(torch.diagonal(cov[:c, :c]).max())
        gram_v, rhs_v = gram[varying][:, varying], rhs[varying]
        self.alpha = torch.zeros_like(rhs)
        self.alpha[varying] = least_squares(gram_v, rhs_v[:, None])[:, 0]
        mean_i, std_i = intensity_stats(self.alpha)
        spread = float(self.alpha.abs().sum() / self.alpha.sum().abs().clamp(min=EPS))
        if varying.any() and (mean_i <= std_i or spread > _MAX_WEIGHT_SPREAD):
            # The free fit's intensity lies within one standard deviation of zero, or its weights
            # cancel, so the ratio P / I explodes: the fit is ill-posed with about as many bands as
            # MS pixels (Hyperion, 128 bands on 8 x 19 MS px: weights of +-200, ERGAS 273 and 391 on
            # two Paris thirds; +-20 on another, ERGAS 43.7). A PAN is a non-negative mix of band
            # responses: fit that instead.
            self.alpha[varying] = nonneg_lstsq(gram_v, rhs_v)
            mean_i, std_i = intensity_stats(self.alpha)
        self.mean_i = mean_i
        std_low = float(torch.sqrt(cov[c, c]))
        self.pan_scale = std_i / max(std_low, EPS)
        self.pan_shift = mean_i - float(mean[c]) * self.pan_scale

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        """PAN value that leaves X unchanged: the equalisation inverted on I = sum alpha_k (X_k - L_k)."""
        i = _weighted_sum(x - self.haze.to(x.dtype).view(1, -1, 1, 1), self.alpha)
        return (i - self.pan_shift) / self.pan_scale

    def _fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        haze = self.haze.to(ms.dtype).view(1, -1, 1, 1)
        dehazed = self.upsample(ms).sub_(haze)  # X - L, in place (X itself is not needed)
        i = _weighted_sum(dehazed, self.alpha)
        p_eq = pan * self.pan_scale + self.pan_shift
        # I ~ 0 where every band is at its haze level: floor it (and the matched PAN) at 1 % of the
        # mean intensity instead of the toolbox's `+ eps`, which divides by ~0 there
        floor = max(0.01 * abs(self.mean_i), EPS)
        gain = p_eq.clamp_(min=floor).div_(i.clamp_(min=floor))
        return dehazed.clamp_(min=0).mul_(gain).add_(haze)


def least_squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The minimum-norm least-squares solution of a x = b, by SVD (`gelsd`). torch's default CPU
    driver (`gelsy`, pivoted QR) went wrong on a singular system: one constant band (Hyperion's
    uncalibrated bands are zeros) gave a zero row and column, and GSA's weights collapsed, so its
    product was the interpolated MS at exit 0."""
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def nonneg_lstsq(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """argmin ||X a - y||^2 subject to a >= 0, from the normal equations (gram = X^T X, rhs = X^T y).

    With gram = V L V^T, the rows sqrt(L) V^T and the target L^-1/2 V^T rhs give the same objective
    up to a constant, so SciPy's Lawson-Hanson solver runs on a C x C system, not on every pixel."""
    from scipy.optimize import nnls

    g, b = gram.double().numpy(), rhs.double().numpy()
    vals, vecs = np.linalg.eigh(g)
    keep = vals > max(float(vals.max()), EPS) * 1e-12  # rhs = X^T y lies in the range of gram
    root = np.sqrt(vals[keep])
    a, _ = nnls(root[:, None] * vecs[:, keep].T, (vecs[:, keep].T @ b) / root, maxiter=50 * g.shape[0])
    return torch.from_numpy(a).to(gram.dtype)


class GSA(ClassicalFuser):
    """Gram-Schmidt adaptive: intensity from a regression of the MS on the low-passed PAN, injection gains
    cov(X_k, I) / var(I); Aiazzi, Baronti and Selva, "Improving component substitution pansharpening
    through multivariate regression of MS+Pan data", IEEE TGRS 2007."""

    name = "gsa"
    needs_stats = True

    def _init_state(self) -> None:
        self._hr: Moments | None = None  # [X, P] on the PAN grid
        self._lr: Moments | None = None  # [MS, P low-passed and decimated] on the MS grid
        self.alpha: torch.Tensor | None = None  # (C,)
        self.gain: torch.Tensor | None = None  # (C,)
        self.mean_x: torch.Tensor | None = None
        self.mean_p = 0.0

    def _accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int]
    ) -> None:
        self._hr = add_interp_moments(self._hr, ms, [pan], valid, self.ratio)
        # the toolbox low-passes the PAN with an undecimated starlet; a 0.3-gain Gaussian MTF plays
        # the same role
        p_low = mtf_filter_decimate(pan, GENERIC_MS_GAIN, self.ratio, rank=1)
        self._lr = add_moments(self._lr, [ms, p_low], lr_valid(valid, self.ratio))

    def _merge(self, other: ClassicalFuser) -> None:
        assert isinstance(other, GSA)
        self._hr, self._lr = merged(self._hr, other._hr), merged(self._lr, other._lr)

    def _finalize(self) -> None:
        if self._hr is None or self._lr is None:
            raise NoValidPixels()
        c = self._lr.s.shape[0] - 1
        lr_cov = self._lr.cov
        # regression with a constant term = regression of the centred variables
        self.alpha = least_squares(lr_cov[:c, :c], lr_cov[:c, c:])[:, 0]
        cov_x = self._hr.cov[:c, :c]
        var_i = float(self.alpha @ cov_x @ self.alpha)
        self.gain = (cov_x @ self.alpha) / max(var_i, EPS)
        mean = self._hr.mean
        self.mean_x, self.mean_p = mean[:c], float(mean[c])

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        return _weighted_sum(x - self.mean_x.to(x.dtype).view(1, -1, 1, 1), self.alpha) + self.mean_p

    def _fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        x = self.upsample(ms)
        c = x.shape[1]
        return x + self.gain.to(x.dtype).view(1, c, 1, 1) * (pan - self.intensity(x))


class PCA(ClassicalFuser):
    """Principal component substitution: the first principal component of the MS is replaced by the PAN
    matched to its mean and variance; Chavez and Kwarteng, "Extracting spectral contrast in Landsat
    Thematic Mapper image data using selective principal component analysis", PE&RS 1989 (as in Vivone
    et al., IEEE TGRS 2015)."""

    name = "pca"
    needs_stats = True

    def _init_state(self) -> None:
        self._moments: Moments | None = None
        self.w: torch.Tensor | None = None  # (C,) first principal direction
        self.mean_x: torch.Tensor | None = None
        self.pan_scale = self.pan_shift = 0.0  # PAN matched to PC1: P * scale + shift

    def _accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int]
    ) -> None:
        self._moments = add_interp_moments(self._moments, ms, [pan], valid, self.ratio)

    def _merge(self, other: ClassicalFuser) -> None:
        assert isinstance(other, PCA)
        self._moments = merged(self._moments, other._moments)

    def _finalize(self) -> None:
        if self._moments is None:
            raise NoValidPixels()
        cov, mean = self._moments.cov, self._moments.mean
        c = cov.shape[0] - 1
        evals, evecs = torch.linalg.eigh(cov[:c, :c])
        w = evecs[:, -1]
        # an eigenvector's sign is arbitrary: orient PC1 to correlate positively with the PAN
        if float(w @ cov[:c, c]) < 0:
            w = -w
        self.w, self.mean_x = w, mean[:c]
        std_pc1 = float(torch.sqrt(torch.clamp(evals[-1], min=0)))
        self.pan_scale = std_pc1 / max(float(torch.sqrt(cov[c, c])), EPS)
        self.pan_shift = -float(mean[c]) * self.pan_scale  # PC1 has zero mean

    def _pc1(self, x: torch.Tensor) -> torch.Tensor:
        return _weighted_sum(x - self.mean_x.to(x.dtype).view(1, -1, 1, 1), self.w)

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        return (self._pc1(x) - self.pan_shift) / self.pan_scale

    def _fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        x = self.upsample(ms)
        detail = pan * self.pan_scale + self.pan_shift - self._pc1(x)
        return x + self.w.to(x.dtype).view(1, -1, 1, 1) * detail
