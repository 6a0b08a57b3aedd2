"""Full-resolution indices (no reference): QNR (D_lambda, D_s) and the hybrid HQNR (D_lambda^K, D_s).

Inputs in DN: `fused (C, H, W)` and `pan (1, H, W)` on the PAN grid, `ms_up (C, H, W)` the MS
interpolated to the PAN grid (`upsample` below: the toolbox's 23-tap interpolator for power-of-two
ratios, bicubic otherwise). `mask` is `(H, W)` bool on the PAN grid, True = valid.

Block UIQI (toolbox `uqi.m` under `blockproc`): non-overlapping `block` x `block` blocks, full blocks
only (a remainder strip at the right/bottom is not scored); blocks touching an invalid pixel are left
out of the mean; a block where both bands are constant scores by the `img_qi.m` guards instead of NaN.

Published "QNR" columns of DLPan-Toolbox tables are HQNR (D_lambda^K with the sensor MTF, and D_s).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fusion_cli.errors import FusionError
from fusion_cli.metrics._common import (
    as_chw,
    as_mask,
    check_pair,
    erode,
    fill_invalid,
    iter_blocks,
    refuse_non_finite,
    uiqi_from_moments,
)
from fusion_cli.metrics.q2n import q2n


def _block_uiqi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """UIQI of blocks `x (nb, C, S)` against `y (nb, C or 1, S)` -> `(nb, C)`."""
    mx, my = x.mean(axis=-1), y.mean(axis=-1)
    xc, yc = x - mx[..., None], y - my[..., None]
    vx, vy = (xc * xc).mean(axis=-1), (yc * yc).mean(axis=-1)
    cxy = (xc * yc).mean(axis=-1)
    return uiqi_from_moments(mx, my, vx, vy, cxy, _flat_tol(mx, my))


def _flat_tol(mx: np.ndarray, my: np.ndarray) -> np.ndarray:
    # a constant block's centred values are ~1e-16 of its mean: treat variances below that as zero
    return 1e-20 * (mx * mx + my * my)


def _pair_uiqi(blocks: np.ndarray) -> np.ndarray:
    """UIQI between every pair of bands of `blocks (nb, C, S)` -> `(nb, C, C)`."""
    m = blocks.mean(axis=-1)
    c = blocks - m[..., None]
    cov = np.matmul(c, c.transpose(0, 2, 1)) / blocks.shape[-1]
    var = np.diagonal(cov, axis1=1, axis2=2)
    mi, mj = m[:, :, None], m[:, None, :]
    return uiqi_from_moments(mi, mj, var[:, :, None], var[:, None, :], cov, _flat_tol(mi, mj))


def _check_block_mean(total: np.ndarray, count: int, block: int) -> np.ndarray:
    if count == 0:
        raise FusionError(f"no {block}x{block} block is free of nodata: the index cannot be computed")
    return total / count


def d_lambda(
    fused: np.ndarray, ms_up: np.ndarray, block: int = 32, mask: np.ndarray | None = None, p: float = 1.0
) -> float:
    """QNR spectral distortion: (mean over band pairs |Q(F_i, F_j) - Q(M_i, M_j)|^p)^(1/p).

    Q is the block UIQI averaged over blocks, on the fused image and on the upsampled MS.
    """
    fused, ms_up = as_chw(fused, "fused"), as_chw(ms_up, "upsampled MS")
    check_pair(ms_up, fused, ("upsampled MS", "fused"))
    return d_lambda_from_sums(*d_lambda_sums(fused, ms_up, block, as_mask(mask, fused.shape[1:])), block, p)


def d_lambda_sums(
    fused: np.ndarray, ms_up: np.ndarray, block: int, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """D_lambda's block sums: the band-pair UIQI `(C, C)` of the fused image and of the upsampled MS
    summed over the full blocks free of invalid pixels, and their count (what row strips add up)."""
    c = fused.shape[0]
    refuse_non_finite([("fused", fused), ("upsampled MS", ms_up)], mask)
    qf, qm, count = np.zeros((c, c)), np.zeros((c, c)), 0
    for (f, ms), ok in iter_blocks([fused, ms_up], block, mask=mask):
        qf += _pair_uiqi(f[ok]).sum(axis=0)
        qm += _pair_uiqi(ms[ok]).sum(axis=0)
        count += int(ok.sum())
    return qf, qm, count


def d_lambda_from_sums(qf: np.ndarray, qm: np.ndarray, count: int, block: int, p: float = 1.0) -> float:
    """D_lambda from `d_lambda_sums` (added up over strips)."""
    if qf.shape[0] < 2:
        raise FusionError("D_lambda needs at least two bands")
    diff = np.abs(_check_block_mean(qf, count, block) - _check_block_mean(qm, count, block)) ** p
    iu = np.triu_indices(qf.shape[0], k=1)
    return float(diff[iu].mean() ** (1.0 / p))


def full_resolution_reach(ratio: int) -> int:
    """PAN pixels on each side that the full-resolution indices read around a pixel: the MS
    interpolation after the PAN's bicubic reduction (D_s: +-2 MS px of antialiased bicubic), or the
    MTF filters of D_lambda^K and HPC, whichever reaches further."""
    from fusion_cli.mtf import KERNEL_SIZE
    from fusion_cli.resample import interp_support

    return max(interp_support(ratio) + 2 * ratio, KERNEL_SIZE // 2)


def pan_lowpass(pan: np.ndarray, ratio: int) -> np.ndarray:
    """The PAN at the MS scale and back (toolbox D_s): MATLAB imresize(1/ratio) bicubic, then `upsample`."""
    from fusion_cli.resample import imresize_down

    t = torch.from_numpy(np.asarray(as_chw(pan, "PAN"), dtype=np.float64))[None]
    return upsample(imresize_down(t, ratio)[0].numpy(), ratio)


def upsample(ms: np.ndarray, ratio: int) -> np.ndarray:
    """MS `(C, h, w)` -> `(C, ratio*h, ratio*w)` float64 on the PAN grid (23-tap, or bicubic)."""
    from fusion_cli.resample import upsample_ms

    t = torch.from_numpy(np.asarray(as_chw(ms, "MS"), dtype=np.float64))[None]
    return upsample_ms(t, ratio)[0].numpy()


def nodata_safe(
    images: list[tuple[str, np.ndarray]], mask: np.ndarray | None, ratio: int
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """`images` `(C, H, W)` with their invalid pixels set to band means, and `mask` left with the pixels
    whose filters (`full_resolution_reach`) read valid data only, as `full_resolution` scores: what a
    nodata pixel holds must not reach an index through the PAN's low-pass, the MTF or the high-pass."""
    chw = [(name, as_chw(img, name)) for name, img in images]
    m = None if mask is None else as_mask(mask, chw[0][1].shape[1:])
    if m is None or m.all():
        return [img for _, img in chw], m
    refuse_non_finite(chw, m)  # before a NaN becomes every invalid pixel's band mean
    filled = [fill_invalid(img, m, name) for name, img in chw]
    return filled, erode(m, full_resolution_reach(ratio))


def d_s_bands(
    fused: np.ndarray,
    ms_up: np.ndarray,
    pan: np.ndarray,
    ratio: int,
    block: int = 32,
    mask: np.ndarray | None = None,
    pan_lp: np.ndarray | None = None,
) -> np.ndarray:
    """Per-band spatial distortion terms `(C,)`: |Q(F_b, P) - Q(M_b, P_lp)| (see `d_s`). With a mask,
    as `nodata_safe` (`pan_lp`, if given, must have been made from a PAN filled the same way)."""
    (fused, pan), mask = nodata_safe([("fused", fused), ("PAN", pan)], mask, ratio)
    fused, ms_up, pan = as_chw(fused, "fused"), as_chw(ms_up, "upsampled MS"), as_chw(pan, "PAN")
    check_pair(ms_up, fused, ("upsampled MS", "fused"))
    if pan.shape[0] != 1 or pan.shape[1:] != fused.shape[1:]:
        raise FusionError(f"PAN must be one band on the fused grid {fused.shape[1:]}, got {pan.shape}")
    lp = pan_lowpass(pan, ratio) if pan_lp is None else as_chw(pan_lp, "low-passed PAN")
    return d_s_from_sums(*d_s_sums(fused, ms_up, pan, lp, block, as_mask(mask, fused.shape[1:])), block)


def d_s_sums(
    fused: np.ndarray,
    ms_up: np.ndarray,
    pan: np.ndarray,
    pan_lp: np.ndarray,
    block: int,
    mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """D_s's block sums: UIQI `(C,)` of each fused band with the PAN and of each upsampled MS band with
    the low-passed PAN, summed over the full blocks free of invalid pixels, and their count."""
    refuse_non_finite([("fused", fused), ("upsampled MS", ms_up), ("PAN", pan)], mask)
    hi, lo, count = np.zeros(fused.shape[0]), np.zeros(fused.shape[0]), 0
    for (f, ms, p, plp), ok in iter_blocks([fused, ms_up, pan, pan_lp], block, mask=mask):
        hi += _block_uiqi(f[ok], p[ok]).sum(axis=0)
        lo += _block_uiqi(ms[ok], plp[ok]).sum(axis=0)
        count += int(ok.sum())
    return hi, lo, count


def d_s_from_sums(hi: np.ndarray, lo: np.ndarray, count: int, block: int) -> np.ndarray:
    """Per-band D_s terms from `d_s_sums` (added up over strips)."""
    return np.abs(_check_block_mean(hi, count, block) - _check_block_mean(lo, count, block))


def d_s(
    fused: np.ndarray,
    ms_up: np.ndarray,
    pan: np.ndarray,
    ratio: int,
    block: int = 32,
    mask: np.ndarray | None = None,
    q: float = 1.0,
    pan_lp: np.ndarray | None = None,
) -> float:
    """QNR spatial distortion: (mean over bands |Q(F_b, P) - Q(M_b, P_lp)|^q)^(1/q).

    P_lp is the PAN degraded by 1/ratio (bicubic, antialiased) and interpolated back (`pan_lowpass`;
    pass it in to reuse it).
    """
    terms = d_s_bands(fused, ms_up, pan, ratio, block, mask, pan_lp)
    return float((terms**q).mean() ** (1.0 / q))


def qnr(d_lambda_value: float, d_s_value: float, alpha: float = 1.0, beta: float = 1.0) -> float:
    """QNR = (1 - D_lambda)^alpha (1 - D_s)^beta; also HQNR when given D_lambda^K."""
    return float((1.0 - d_lambda_value) ** alpha * (1.0 - d_s_value) ** beta)


def d_lambda_khan(
    fused: np.ndarray,
    ms_up: np.ndarray,
    ratio: int,
    sensor: str | None = None,
    block: int = 32,
    mask: np.ndarray | None = None,
    gains: list[float] | None = None,
    round_uint16: bool | None = None,
) -> float:
    """Khan's D_lambda^K = 1 - Q2n(upsampled MS, fused low-passed by the sensor MTF, no decimation).

    As the toolbox's `D_lambda_K.m`: Q2n with the uint16 rounding, blocks of `block`. `round_uint16`
    None rounds where uint16 keeps the data (`rounding_keeps`: DN, not reflectance, which it would
    flatten to a few grey levels); True or False forces it. With a mask, as `nodata_safe`.

    `gains` (one per band) overrides the sensor table; `sensor=None` uses the generic gains.
    """
    (fused,), m = nodata_safe([("fused", fused)], mask, ratio)
    if round_uint16 is None:
        round_uint16 = rounding_keeps(as_chw(ms_up, "upsampled MS"), m)
    fused, ms_up = as_chw(fused, "fused"), as_chw(ms_up, "upsampled MS")
    check_pair(ms_up, fused, ("upsampled MS", "fused"))
    if gains is None:
        from fusion_cli.sensors import nyquist_gains

        gains = nyquist_gains(sensor, fused.shape[0])[0]
    return 1.0 - q2n(ms_up, mtf_lowpass(fused, gains, ratio), block, block, round_uint16, m)


def rounding_keeps(x: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """Whether rounding `x (C, H, W)` to uint16 keeps its content: its 1st-99th percentiles within
    [0, 65535] and at least 32 whole numbers apart (DN, integer or float, where an interpolated MS may
    undershoot 0 at a few pixels, as opposed to reflectance: HQNR 0.07 instead of 0.71 on a WV3
    product in [0, 1])."""
    values = x[:, mask] if mask is not None else np.asarray(x).reshape(len(x), -1)
    if not values.size:
        return False
    lo, hi = np.percentile(values[:, :: max(1, values.shape[1] // 65536)], [1, 99])
    return bool(lo >= -0.5 and hi <= np.iinfo(np.uint16).max + 0.5 and hi - lo >= 32)


def mtf_lowpass(fused: np.ndarray, gains: Sequence[float], ratio: int) -> np.ndarray:
    """`fused (C, H, W)` low-passed by each band's MTF, no decimation (float64): what D_lambda^K
    compares with the upsampled MS."""
    from fusion_cli.mtf import mtf_filter

    # float32 torch filtering: ~10x faster than float64 on CPU, and its < 1e-3 DN error is far below
    # the uint16 rounding q2n applies next
    t = torch.from_numpy(np.ascontiguousarray(fused, dtype=np.float32))[None]
    return mtf_filter(t, list(gains), ratio)[0].double().numpy()


def hqnr(
    fused: np.ndarray,
    ms_up: np.ndarray,
    pan: np.ndarray,
    ratio: int,
    sensor: str | None = None,
    block: int = 32,
    mask: np.ndarray | None = None,
    round_uint16: bool | None = None,
) -> float:
    """HQNR = (1 - D_lambda^K)(1 - D_s): what DLPan tables publish as "QNR"."""
    dk = d_lambda_khan(fused, ms_up, ratio, sensor, block, mask, round_uint16=round_uint16)
    return qnr(dk, d_s(fused, ms_up, pan, ratio, block, mask))
