"""Q2n (Q4, Q8, ...): the hypercomplex UIQI of Garzelli & Nencini, exactly as the toolbox's `q2n.m`.

Steps (toolbox `q2n.m` / `onions_quality.m` / `onion_mult*.m`):

1. Blocks of `block` x `block` at steps of `shift` (32/32 by default). If H or W is not covered, the
   image is extended at the bottom/right by symmetric mirroring that repeats the edge sample.
2. Both images are rounded like MATLAB `uint16()` (half away from zero, saturating to [0, 65535]);
   `round_uint16=False` skips this (a documented deviation, e.g. for reflectance in [0, 1]).
3. Zero bands are appended up to the next power of two N.
4. Per block, each reference band is normalised by its own block mean and sample std (N-1; a zero std
   becomes eps) as (x - mean) / std + 1, and the fused band with the reference's mean and std (when that
   mean is exactly 0 the toolbox only adds 1). The fused vector is conjugated (bands 2..N negated).
5. q = k (E[x * y] - E[x] * E[y]) * 2 |E x| |E y| / (|E x|^2 + |E y|^2) * 2 / (s_x^2 + s_y^2), with `*`
   the toolbox's Cayley-Dickson product, k = S / (S - 1) for S pixels per block and s^2 the summed
   k-corrected band variances; a block whose variances vanish gives the mean term alone.
6. Q2n = mean over blocks (padded ones included) of the modulus |q|.

The Cayley-Dickson product is bilinear, so E[x * y] is taken from the block cross-moment matrix
E[x_i y_j] (one matrix product per block) and a signed permutation table built once per N.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fusion_cli.errors import FusionError
from fusion_cli.metrics._common import (
    as_chw,
    as_mask,
    check_pair,
    holds_whole_dn,
    iter_blocks,
    refuse_non_finite,
    round_uint16,
)

_EPS = float(np.finfo(np.float64).eps)  # MATLAB eps, used for a zero block std


def _conj(v: np.ndarray) -> np.ndarray:
    """Hypercomplex conjugate of vectors along axis 0: negate components 2..N."""
    return np.concatenate([v[:1], -v[1:]], axis=0)


def onion_mult(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The toolbox's `onion_mult` / `onion_mult2D`: hypercomplex product of vectors along axis 0.

    `a`, `b`: `(N, ...)` with N a power of two, broadcasting over the trailing axes.
    """
    n = a.shape[0]
    if n == 1:
        return a * b
    half = n // 2
    p, q = a[:half], _conj(a[half:])
    r, s = b[:half], _conj(b[half:])
    if n == 2:
        return np.concatenate([p * r - s * q, p * s + r * q], axis=0)
    return np.concatenate(
        [onion_mult(p, r) - onion_mult(s, _conj(q)), onion_mult(_conj(p), s) + onion_mult(r, q)], axis=0
    )


@lru_cache(maxsize=16)
def product_table(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed permutation form of the product: `(x * y)_k = sum_i sign[k, i] x_i y_{partner[k, i]}`.

    Built by multiplying basis vectors with `onion_mult`; returns `(partner, sign)`, both `(N, N)`.
    """
    eye = np.eye(n, dtype=np.int8)
    table = onion_mult(eye[:, :, None], eye[:, None, :])  # (k, i, j)
    if not (np.abs(table).sum(axis=2) == 1).all():
        raise AssertionError("hypercomplex basis products must be signed basis elements")
    partner = np.abs(table).argmax(axis=2)  # (k, i)
    sign = np.take_along_axis(table, partner[:, :, None], axis=2)[:, :, 0].astype(np.float64)
    return partner, sign


def _apply_table(m: np.ndarray, partner: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Contract pair terms `m (nb, N, N)` [i, j] into hypercomplex components `(nb, N)`."""
    rows = np.broadcast_to(np.arange(m.shape[1]), partner.shape)
    return (m[:, rows, partner] * sign).sum(axis=-1)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _q2n_blocks(ref: np.ndarray, fus: np.ndarray, n: int) -> np.ndarray:
    """Hypercomplex quality `(nb, N)` of blocks `ref, fus (nb, C, S)` (C <= N, zero bands appended)."""
    nb, c, s = ref.shape
    if c < n:
        zeros = np.zeros((nb, n - c, s))
        ref = np.concatenate([ref, zeros], axis=1)
        fus = np.concatenate([fus, zeros], axis=1)
    mu = ref.mean(axis=-1, keepdims=True)
    sd = ref.std(axis=-1, ddof=1, keepdims=True)
    sd[sd == 0] = _EPS
    x = (ref - mu) / sd + 1.0
    y = np.where(mu == 0, fus + 1.0, (fus - mu) / sd + 1.0)
    y[:, 1:] *= -1.0  # conjugate the fused vector
    k = s / (s - 1.0)
    m1, m2 = x.mean(axis=-1), y.mean(axis=-1)  # (nb, N)
    mod1m2, mod2m2 = (m1**2).sum(axis=1), (m2**2).sum(axis=1)
    # mean of |q|^2 over pixels, via the modulus as the toolbox does (sqrt, then square)
    int1 = k * (np.sqrt((x**2).sum(axis=1)) ** 2).mean(axis=-1)
    int2 = k * (np.sqrt((y**2).sum(axis=1)) ** 2).mean(axis=-1)
    term3 = int1 + int2 - k * (mod1m2 + mod2m2)
    mean_bias = 2.0 * np.sqrt(mod1m2 * mod2m2) / (mod1m2 + mod2m2)
    partner, sign = product_table(n)
    cross = np.matmul(x, y.transpose(0, 2, 1)) / s  # (nb, N, N): E[x_i y_j]
    qv = k * _apply_table(cross, partner, sign)
    qm = _apply_table(m1[:, :, None] * m2[:, None, :], partner, sign)
    flat = term3 == 0
    scale = np.where(flat, 0.0, mean_bias * 2.0 / np.where(flat, 1.0, term3))
    q = (qv - k * qm) * scale[:, None]
    q[flat, -1] = mean_bias[flat]
    return q


def q2n_map(
    ref: np.ndarray,
    fused: np.ndarray,
    block: int = 32,
    shift: int = 32,
    round_uint16_: bool | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block Q2n moduli and validity: `(map (ny, nx), valid (ny, nx))`.

    `mask` `(H, W)` (True = valid): a block is valid when all its pixels are (padding mirrors the mask).
    `round_uint16_` None: round when `ref` holds whole-number DN (`holds_whole_dn`), as `fusion
    metrics` decides.
    """
    ref, fused = as_chw(ref, "reference"), as_chw(fused, "fused")
    check_pair(ref, fused)
    if block < 2 or shift < 1:
        raise FusionError(f"Q2n needs block >= 2 and shift >= 1, got block {block}, shift {shift}")
    m = as_mask(mask, ref.shape[1:])
    refuse_non_finite([("reference", ref), ("fused", fused)], m)
    n = next_pow2(ref.shape[0])
    if round_uint16_ is None:
        round_uint16_ = holds_whole_dn(ref, m)
    transform = round_uint16 if round_uint16_ else None
    values, valid = [], []
    for (r, f), ok in iter_blocks([ref, fused], block, shift, pad=True, mask=m, transform=transform):
        values.append(np.sqrt((_q2n_blocks(r, f, n) ** 2).sum(axis=1)))
        valid.append(ok)
    h, w = ref.shape[1:]
    shape = (max(1, -(-h // shift)), max(1, -(-w // shift)))
    return np.concatenate(values).reshape(shape), np.concatenate(valid).reshape(shape)


def q2n(
    ref: np.ndarray,
    fused: np.ndarray,
    block: int = 32,
    shift: int = 32,
    round_uint16: bool | None = None,
    mask: np.ndarray | None = None,
) -> float:
    """Q2n of `fused` against `ref` (both `(C, H, W)` DN): mean over blocks of the hypercomplex UIQI.
    Both are rounded to uint16 first, as the toolbox does, when `ref` holds whole-number DN (or
    `round_uint16=True`); reflectance and signed DN are not (`round_uint16=False` forces that).

    With a mask, blocks holding any invalid pixel are left out of the mean (the toolbox has no masks).
    """
    qmap, valid = q2n_map(ref, fused, block, shift, round_uint16, mask)
    if not valid.any():
        raise FusionError(f"no {block}x{block} block is free of nodata: Q2n cannot be computed")
    return float(qmap[valid].mean())


def q2n_label(n_bands: int) -> str:
    """Published name of the index: Q4 / Q8 / Q16 for power-of-two band counts, else Q2n."""
    return f"Q{n_bands}" if n_bands > 1 and next_pow2(n_bands) == n_bands else "Q2n"
