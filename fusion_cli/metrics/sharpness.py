"""HPC, the high-pass correlation of each fused band with the PAN at full resolution: how much of the
PAN's detail a product carries, so a soft product is visible where QNR/HQNR reward it.

Inputs in DN: `fused (C, H, W)` and `pan (1, H, W)` on the PAN grid, `mask (H, W)` bool (True = valid).

Per band b: Pearson correlation, over the valid pixels, of HP_b(fused_b) with HP_b(PAN), where
HP_b(x) = x - x low-passed by band b's sensor-MTF Gaussian at the ratio (`mtf.mtf_filter`; the
generic Nyquist gains when the sensor is unknown), the same filter on the band and on the PAN: what is
left is the detail above what the MS band already resolves. PAN itself copied into every band scores 1.
The Gaussian is a soft low-pass, so interpolated MS content near its Nyquist frequency passes too and
plain interpolation, which adds no PAN detail, still scores well above 0: HPC ranks products of one
scene (Landsat-8 example: EXP 0.44, BDSD-PC 0.78, GSA 0.93, GSA blurred by a 1.5 px Gaussian 0.47).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fusion_cli.errors import FusionError
from fusion_cli.metrics._common import as_chw, as_mask, refuse_non_finite


def _highpass(band: np.ndarray, gain: float, ratio: int) -> np.ndarray:
    """`band (H, W)` minus its MTF low-pass (float64 `(H, W)`). The filter runs in float32 torch with
    the fast separable kernel: its ~1e-5 relative error is far below the detail being correlated."""
    from fusion_cli.mtf import mtf_filter

    t = torch.from_numpy(np.ascontiguousarray(band, dtype=np.float32))[None, None]
    low = mtf_filter(t, [gain], ratio, rank=1)[0, 0].double().numpy()
    return band.astype(np.float64) - low


def hpc_bands(
    fused: np.ndarray,
    pan: np.ndarray,
    ratio: int,
    sensor: str | None = None,
    mask: np.ndarray | None = None,
    gains: list[float] | None = None,
) -> np.ndarray:
    """Per-band high-pass correlation with the PAN `(C,)` (see the module docstring). `gains` (one per
    band) overrides the sensor table's MS Nyquist gains. With a mask, as `noreference.nodata_safe`."""
    from fusion_cli.metrics.noreference import nodata_safe

    (fused, pan), mask = nodata_safe([("fused", fused), ("PAN", pan)], mask, ratio)
    fused, pan = as_chw(fused, "fused"), as_chw(pan, "PAN")
    c, h, w = fused.shape
    if pan.shape != (1, h, w):
        raise FusionError(f"PAN must be one band on the fused grid {(h, w)}, got {pan.shape}")
    if ratio < 1:
        raise FusionError(f"ratio must be a positive integer, got {ratio}")
    if gains is None:
        from fusion_cli.sensors import nyquist_gains

        gains = nyquist_gains(sensor, c)[0]
    if len(gains) != c:
        raise FusionError(f"{len(gains)} MTF gains given for {c} bands")
    m = as_mask(mask, (h, w))
    if m is not None and not m.any():
        raise FusionError("no valid pixel is left: HPC cannot be computed")
    return hpc_from_moments(hpc_moments(fused, pan, ratio, gains, m))


def hpc_moments(
    fused: np.ndarray,
    pan: np.ndarray,
    ratio: int,
    gains: Sequence[float],
    mask: np.ndarray | None = None,
    rows: slice = slice(None),
) -> np.ndarray:
    """Per band `(C, 6)`: count, means and centred (co)moments (n, mean_f, mean_p, S_ff, S_pp, S_fp) of
    the high-passed fused band and PAN over the valid pixels of `rows` (the filters read every row
    given: a strip's halo), for `merge_moments` and `hpc_from_moments`."""
    refuse_non_finite([("fused", fused), ("PAN", pan)], mask)  # a NaN band correlated as 0 before
    keep = None if mask is None else mask[rows]

    def valid(a: np.ndarray) -> np.ndarray:
        a = a[rows]
        return a.ravel() if keep is None else a[keep]

    pan_hp: dict[float, np.ndarray] = {}  # one PAN high-pass per distinct gain (hyperspectral: one)
    out = np.zeros((fused.shape[0], 6))
    for b, g in enumerate(gains):
        if g not in pan_hp:
            pan_hp[g] = valid(_highpass(pan[0], g, ratio))
        f, p = valid(_highpass(fused[b], g, ratio)), pan_hp[g]
        if f.size:
            fc, pc = f - f.mean(), p - p.mean()
            out[b] = f.size, f.mean(), p.mean(), (fc * fc).sum(), (pc * pc).sum(), (fc * pc).sum()
    return out


def merge_moments(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The moments (`hpc_moments`) of two disjoint sets of pixels taken together (Chan et al.)."""
    n = a[:, 0] + b[:, 0]
    safe = np.where(n > 0, n, 1.0)
    df, dp = b[:, 1] - a[:, 1], b[:, 2] - a[:, 2]
    w = a[:, 0] * b[:, 0] / safe
    out = np.empty_like(a)
    out[:, 0] = n
    out[:, 1] = a[:, 1] + df * b[:, 0] / safe
    out[:, 2] = a[:, 2] + dp * b[:, 0] / safe
    out[:, 3] = a[:, 3] + b[:, 3] + df * df * w
    out[:, 4] = a[:, 4] + b[:, 4] + dp * dp * w
    out[:, 5] = a[:, 5] + b[:, 5] + df * dp * w
    return out


def hpc_from_moments(moments: np.ndarray) -> np.ndarray:
    """Per-band correlation `(C,)` from `hpc_moments`; 0 where either side has no variance (no detail
    to correlate)."""
    den = np.sqrt(moments[:, 3] * moments[:, 4])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, moments[:, 5] / np.where(den > 0, den, 1.0), 0.0)


def hpc(
    fused: np.ndarray,
    pan: np.ndarray,
    ratio: int,
    sensor: str | None = None,
    mask: np.ndarray | None = None,
) -> float:
    """HPC: the band mean of `hpc_bands`."""
    return float(hpc_bands(fused, pan, ratio, sensor, mask).mean())
