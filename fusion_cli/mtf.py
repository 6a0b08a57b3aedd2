"""Sensor-MTF low-pass filters and the Wald-protocol degradation, as the reference toolbox does them.

The kernel is the toolbox's `genMTF.m`: a 41x41 Gaussian *frequency* response whose value at the
Nyquist frequency of the low-resolution grid (1 / (2 ratio) cycles per PAN pixel) equals the sensor's
gain G, peak-normalised and turned into a spatial FIR filter by the 2-D window method of MATLAB's
`fwind1` with a Kaiser window (beta 0.5) rotated into a circular window (Huang's method). As in
`fwind1`, the taps are not renormalised to sum 1 (their sum is ~0.999): this is what reproduces the
toolbox's degraded images to 1e-4 DN. Filtering is a correlation with replicate borders (`imfilter(...,
'replicate')`), decimation takes samples `[ratio//2::ratio]` (MATLAB `imresize(..., 1/ratio,
'nearest')`).

Speed: the kernel is numerically separable (second singular value ~6e-6 of the first), so it is applied
as a sum of a few separable passes from its SVD; `rank=None` keeps every term above 1e-9 (exact to
float precision), `rank=1` is the fast path used by the classical methods (error ~1e-5 relative), which
also drops the outer taps that carry under 1e-6 of the kernel's weight (41 -> ~21 taps at ratio 4).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from fusion_cli.errors import FusionError

KERNEL_SIZE = 41
_KAISER_BETA = 0.5  # MATLAB kaiser(N) default
_EXACT_TOL = 1e-9
_FAST_TAIL = 1e-6  # kernel weight the fast path may drop, relative (<= 0.07 DN at 16-bit full scale)

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _check_gain(gain: float) -> None:
    if not 0.0 < gain < 1.0:
        raise FusionError(f"MTF gain at Nyquist must be between 0 and 1 (exclusive), got {gain}")


@lru_cache(maxsize=256)
def _kernel_cached(gain: float, ratio: int, size: int) -> np.ndarray:
    _check_gain(gain)
    if ratio < 1:
        raise FusionError(f"ratio must be a positive integer, got {ratio}")
    half = (size - 1) / 2
    t = np.arange(size, dtype=np.float64) - half
    # std of the Gaussian frequency response, in frequency samples, so that H(Nyquist) = gain
    alpha = np.sqrt(((size - 1) * (1.0 / ratio) / 2) ** 2 / (-2.0 * np.log(gain)))
    hd = np.exp(-0.5 * (t[:, None] / alpha) ** 2 - 0.5 * (t[None, :] / alpha) ** 2)
    hd /= hd.max()
    # fwind1: centred inverse DFT of the desired response (DC at the centre sample)
    h = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(hd))).real
    # Huang's method: the 1-D Kaiser window sampled along the radius, zero outside the unit circle
    tn = t / half
    radius = np.hypot(tn[:, None], tn[None, :])
    window = np.interp(radius, tn, np.kaiser(size, _KAISER_BETA))
    window[radius > 1.0] = 0.0
    kernel = h * window
    kernel.setflags(write=False)
    return kernel


def mtf_kernel(gain: float, ratio: int, size: int = KERNEL_SIZE) -> np.ndarray:
    """The toolbox's `(size, size)` float64 MTF-matched kernel for one band (a read-only array)."""
    return _kernel_cached(float(gain), int(ratio), int(size))


@lru_cache(maxsize=256)
def _separable_terms(gain: float, ratio: int, size: int, rank: int | None) -> tuple[np.ndarray, np.ndarray]:
    """SVD of the kernel: `(k, size)` column and row factors with kernel = sum_k col_k row_k^T."""
    u, s, vt = np.linalg.svd(mtf_kernel(gain, ratio, size))
    keep = int(np.sum(s > s[0] * _EXACT_TOL)) if rank is None else max(1, min(rank, size))
    sq = np.sqrt(s[:keep])
    cols, rows = (u[:, :keep] * sq).T, vt[:keep] * sq[:, None]
    if rank is not None:
        # fast path: drop the outer taps (both factors alike) while the weight they carry stays
        # below _FAST_TAIL of the total: for ratio 4 the 41 taps become ~21 (half the work)
        mass = np.abs(cols).sum(0) + np.abs(rows).sum(0)
        tail = np.cumsum(mass[: size // 2]) + np.cumsum(mass[::-1][: size // 2])
        trim = int(np.sum(tail <= _FAST_TAIL * mass.sum()))
        cols, rows = cols[:, trim : size - trim], rows[:, trim : size - trim]
    return cols.copy(), rows.copy()


def _filter_torch(
    img: torch.Tensor, gains: list[float], ratio: int, rank: int | None, size: int, decimate: bool = False
) -> torch.Tensor:
    """img `(B, C, H, W)` -> `(B, C, H, W)`: per-band separable correlation, replicate borders.

    With `decimate`, only the samples `[ratio//2::ratio]` are computed (strided passes), which is
    what a low-pass-then-decimate needs at 1/ratio of the cost.
    """
    c = img.shape[1]
    cols, rows = zip(*(_separable_terms(float(g), ratio, size, rank) for g in gains), strict=True)
    k = max(x.shape[0] for x in cols)
    n = max(x.shape[1] for x in cols)  # taps (odd, centred): the fast path trims negligible ends
    # pad every band to the same number of terms and taps (zeros contribute nothing)
    col_w = np.zeros((c, k, n))
    row_w = np.zeros((c, k, n))
    for i, (cc, rr) in enumerate(zip(cols, rows, strict=True)):
        off = (n - cc.shape[1]) // 2
        col_w[i, : cc.shape[0], off : off + cc.shape[1]] = cc
        row_w[i, : rr.shape[0], off : off + rr.shape[1]] = rr
    return _correlate(img, col_w, row_w, ratio, decimate)


# above this size of the (B, C*k, H, W) intermediate, `_correlate` filters one band at a time
_BAND_AT_A_TIME_BYTES = 64 << 20


def _correlate(
    img: torch.Tensor, col_w: np.ndarray, row_w: np.ndarray, ratio: int, decimate: bool
) -> torch.Tensor:
    """`_filter_torch` with its separable terms given: `col_w`, `row_w` `(C, k, n)` (n odd)."""
    b, c, h, w = img.shape
    k, size = col_w.shape[1:]
    if c > 1 and b * c * k * h * w * img.element_size() > _BAND_AT_A_TIME_BYTES:
        # a whole image (the full-resolution indices): its (B, C*k, H, W) intermediates, twice, took
        # gigabytes; band by band they are k planes, and the result the same
        return torch.cat(
            [
                _correlate(img[:, i : i + 1], col_w[i : i + 1], row_w[i : i + 1], ratio, decimate)
                for i in range(c)
            ],
            dim=1,
        )
    pad = size // 2
    x = F.pad(img, (pad, pad, pad, pad), mode="replicate")
    if k == 1 and not decimate:
        # one separable term at full resolution: shifted multiply-adds beat a depthwise conv2d (~1.5x)
        return _shift_filter(_shift_filter(x, row_w[:, 0], -1), col_w[:, 0], -2)
    step, start = (ratio, ratio // 2) if decimate else (1, 0)
    x = x[..., start:, start:]
    wr = torch.as_tensor(row_w, dtype=img.dtype, device=img.device).reshape(c * k, 1, 1, size)
    wc = torch.as_tensor(col_w, dtype=img.dtype, device=img.device).reshape(c * k, 1, size, 1)
    x = F.conv2d(x, wr, stride=(1, step), groups=c)  # (B, C*k, H', W'): each band feeds its k row filters
    x = F.conv2d(x, wc, stride=(step, 1), groups=c * k)  # (B, C*k, H', W')
    return x.reshape(b, c, k, x.shape[-2], x.shape[-1]).sum(dim=2)


def _shift_filter(x: torch.Tensor, taps: np.ndarray, axis: int) -> torch.Tensor:
    """Valid correlation of `(B, C, H, W)` along `axis` with per-band taps `(C, n)`: the output is
    n - 1 samples shorter on that axis."""
    n = taps.shape[1]
    length = x.shape[axis] - n + 1
    w = torch.as_tensor(taps, dtype=x.dtype, device=x.device).T.reshape(n, 1, -1, 1, 1)  # (n, 1, C, 1, 1)
    out = x.narrow(axis, 0, length) * w[0]
    for t in range(1, n):
        out.addcmul_(x.narrow(axis, t, length), w[t])
    return out


def _as_gains(gains: float | list[float], n_bands: int) -> list[float]:
    if isinstance(gains, (int, float)):
        return [float(gains)] * n_bands
    gains = [float(g) for g in gains]
    if len(gains) != n_bands:
        raise FusionError(f"{len(gains)} MTF gains given for {n_bands} bands")
    return gains


def mtf_filter(
    img: ArrayT, gains: float | list[float], ratio: int, rank: int | None = None, size: int = KERNEL_SIZE
) -> ArrayT:
    """Low-pass each band with its MTF-matched kernel, replicate borders, no decimation.

    img: numpy `(C, H, W)` (computed in float64, returned as float64) or torch `(B, C, H, W)`
    (computed in its own float dtype and device). `gains`: one per band, or one for all.
    """
    if isinstance(img, torch.Tensor):
        if img.ndim != 4:
            raise FusionError(f"expected a (B, C, H, W) tensor, got shape {tuple(img.shape)}")
        x = img if img.is_floating_point() else img.float()
        return _filter_torch(x, _as_gains(gains, x.shape[1]), ratio, rank, size)
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim != 3:
        raise FusionError(f"expected a (C, H, W) array, got shape {arr.shape}")
    out = _filter_torch(torch.from_numpy(arr)[None], _as_gains(gains, arr.shape[0]), ratio, rank, size)
    return out[0].numpy()


def mtf_filter_decimate(
    img: torch.Tensor,
    gains: float | list[float],
    ratio: int,
    rank: int | None = None,
    size: int = KERNEL_SIZE,
) -> torch.Tensor:
    """`decimate(mtf_filter(img))`, computed only where sampled: `(B, C, H, W)` -> `(B, C, ⌈H/r⌉, ⌈W/r⌉)`."""
    x = img if img.is_floating_point() else img.float()
    return _filter_torch(x, _as_gains(gains, x.shape[1]), ratio, rank, size, decimate=True)


def decimate(img: ArrayT, ratio: int) -> ArrayT:
    """Samples `[ratio//2::ratio]` on both spatial axes (the toolbox's nearest-neighbour decimation)."""
    return img[..., ratio // 2 :: ratio, ratio // 2 :: ratio]


def degrade_ms(ms: ArrayT, gains: float | list[float], ratio: int) -> ArrayT:
    """Wald-protocol MS degradation: MTF low-pass, then decimation by `ratio`.

    ms `(C, H, W)` numpy or `(B, C, H, W)` torch -> `(.., C, ceil(H/ratio), ceil(W/ratio))`.
    """
    if isinstance(ms, torch.Tensor):
        return mtf_filter_decimate(ms, gains, ratio)
    arr = torch.from_numpy(np.asarray(ms, dtype=np.float64))[None]
    return mtf_filter_decimate(arr, gains, ratio)[0].numpy()


def degrade_valid(
    valid: np.ndarray, ratio: int, mode: Literal["mtf", "bicubic"] = "mtf", size: int = KERNEL_SIZE
) -> np.ndarray:
    """Validity `(ceil(H/r), ceil(W/r))` of `degrade_ms` (mode "mtf") or `degrade_pan` (either mode) of
    an image valid at `valid (H, W)`: a sample stays valid only if every pixel its filter reads is,
    borders padded as the filter pads them. Correlating the invalid pixels with taps of 1 over the
    filter's footprint counts those it reads; a filled hole still leaks into every sample it reaches."""
    bad = torch.from_numpy(~np.asarray(valid, dtype=bool)).double()[None, None]
    if mode == "bicubic":
        from fusion_cli.resample import imresize_down_reach

        reached = imresize_down_reach(bad, ratio)
    else:
        ones = np.ones((1, 1, size))  # the exact kernel's separable terms span all `size` taps
        reached = _correlate(bad, ones, ones, ratio, decimate=True)
    return (reached[0, 0] < 0.5).numpy()


def degrade_pan(
    pan: ArrayT, ratio: int, mode: Literal["bicubic", "mtf"] = "bicubic", gain: float | None = None
) -> ArrayT:
    """Wald-protocol PAN degradation by `ratio`.

    `bicubic`: MATLAB `imresize(pan, 1/ratio)` (bicubic with antialiasing), the toolbox default.
    `mtf`: the PAN's MTF-matched Gaussian (`gain`, e.g. 0.14 for WV3) then decimation, like the MS.
    pan `(P, H, W)` numpy or `(B, P, H, W)` torch.
    """
    if mode == "mtf":
        if gain is None:
            raise FusionError("PAN MTF degradation needs the PAN's Nyquist gain (pick a --sensor)")
        return degrade_ms(pan, gain, ratio)
    if mode != "bicubic":
        raise FusionError(f"unknown PAN degradation {mode!r}: use 'bicubic' or 'mtf'")
    from fusion_cli.resample import imresize_down

    if isinstance(pan, torch.Tensor):
        return imresize_down(pan, ratio)
    arr = torch.from_numpy(np.asarray(pan, dtype=np.float64))[None]
    return imresize_down(arr, ratio)[0].numpy()
