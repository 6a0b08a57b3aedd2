"""BDSD-PC: band-dependent spatial detail with physical constraints (reference toolbox `BDSD_PC.m`).

Per band k the fused image is X_k + g_k P + sum_j h_kj X_j. The coefficients are fitted at reduced
scale, where the original MS is the target: with GT = imresize(X, 1/r) (the MS brought back to its
grid), M = MTF(GT) (the MS degraded once more) and P_r = the PAN MTF-filtered and decimated, solve
min || g P_r + sum_j h_kj M_j - (GT_k - M_k) ||^2 subject to g >= 0 and h_kj <= 0. The least-squares
problem only needs the Gram matrix of [P_r, M, GT - M], which streams; the sign constraints are
solved in `finalize` by non-negative least squares on its Cholesky factor.
"""

from __future__ import annotations

import numpy as np
import torch

from fusion_cli.classical.base import (
    MTF_HALF,
    ClassicalFuser,
    Moments,
    add_moments,
    lr_valid,
    merged,
    mix_bands,
)
from fusion_cli.errors import NoValidPixels
from fusion_cli.mtf import mtf_filter, mtf_filter_decimate
from fusion_cli.resample import MIN_AXIS, axis_matrix, imresize_down, upsample_ms


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0, for a `(m, n)` of full column rank (BDSD-PC's Cholesky
    factor): Lawson and Hanson's active set. Here rather than `scipy.optimize.nnls`, whose import
    (scipy.optimize pulls sparse, spatial, special and linalg) cost every BDSD-PC run 0.3 s."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10.0 * max(a.shape) * np.finfo(float).eps * np.abs(a).sum(axis=0).max() * max(1.0, np.abs(b).max())
    for _ in range(3 * n):
        gradient = a.T @ (b - a @ x)  # the objective's descent direction
        if passive.all() or gradient[~passive].max() <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:
            trial = np.zeros(n)
            trial[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            blocked = passive & (trial <= 0)
            if not blocked.any():
                x = trial
                break
            # step from x toward trial as far as feasibility allows, then free the variables it zeroes
            step = np.min(x[blocked] / (x[blocked] - trial[blocked]))
            x = x + step * (trial - x)
            passive &= x > tol
            x[~passive] = 0.0
            if not passive.any():
                break
    return x


def interp_and_back(ms: torch.Tensor, ratio: int) -> torch.Tensor:
    """imresize_down(upsample_ms(ms)): `(B, C, h, w)` -> `(B, C, h, w)`, by the composite's matrices on
    the MS grid (`axis_matrix(down=True)`) instead of through the ratio^2 larger PAN grid."""
    h, w = ms.shape[-2:]
    if min(h, w) < MIN_AXIS:
        return imresize_down(upsample_ms(ms, ratio), ratio)
    a_h = axis_matrix(h, ratio, down=True).to(ms)
    a_w = axis_matrix(w, ratio, down=True).to(ms)
    return a_h @ ms @ a_w.T


class BDSDPC(ClassicalFuser):
    """Band-dependent spatial detail with physical constraints (PAN gain >= 0, MS gains <= 0), fitted at
    reduced scale; Vivone, "Robust band-dependent spatial-detail approaches for panchromatic
    sharpening", IEEE TGRS 2019."""

    name = "bdsd-pc"
    uses_mtf_gains = True  # its reduced-scale fit degrades with them
    needs_stats = True

    def stats_support(self) -> int:
        # MTF at the MS scale (20 MS px) after imresize (2) of the interpolated MS; fusing needs
        # only the interpolation's context
        return (MTF_HALF + 2) * self.ratio + self.support()

    def _init_state(self) -> None:
        self._moments: Moments | None = None
        self.coef: torch.Tensor | None = None  # (C + 1, C): rows [g; h_1..h_C], one column per band

    def _accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int]
    ) -> None:
        c = ms.shape[1]
        gt = interp_and_back(ms, self.ratio)
        degraded = mtf_filter(gt, self.gains(c), self.ratio, rank=1)
        pan_r = mtf_filter_decimate(pan, self.pan_gain(c), self.ratio, rank=1)
        feats = [pan_r, degraded, gt - degraded]  # (B, 2C + 1, h, w) together
        self._moments = add_moments(self._moments, feats, lr_valid(valid, self.ratio))

    def _merge(self, other: ClassicalFuser) -> None:
        assert isinstance(other, BDSDPC)
        self._moments = merged(self._moments, other._moments)

    def _finalize(self) -> None:
        if self._moments is None or self._moments.n < 2:
            raise NoValidPixels()
        gram = self._moments.gram.numpy()
        d = (gram.shape[0] - 1) // 2 + 1  # regressors: P_r and the C degraded bands
        hth, hty = gram[:d, :d], gram[:d, d:]
        # substitute z = sign * gamma so that every constraint reads z >= 0
        sign = np.r_[1.0, -np.ones(d - 1)]
        g = hth * np.outer(sign, sign)
        r = np.linalg.cholesky(g + np.eye(d) * 1e-12 * np.trace(g)).T  # g = r^T r
        coef = np.empty((d, d - 1))
        for k in range(d - 1):
            rhs = np.linalg.solve(r.T, sign * hty[:, k])
            coef[:, k] = sign * nnls(r, rhs)
        self.coef = torch.from_numpy(coef)

    def _fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        x = self.upsample(ms)
        return x + mix_bands(torch.cat([pan, x], dim=1), self.coef)
