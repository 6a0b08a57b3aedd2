"""Reduced-resolution indices (a reference image exists), following the toolbox of Vivone et al.

Inputs are `(C, H, W)` arrays in DN (not rescaled), `ref` first. `mask` is `(H, W)` bool, True = valid;
how each index leaves out invalid pixels is said in its docstring. Loops run over bands only.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from fusion_cli.errors import FusionError
from fusion_cli.metrics._common import (
    CHUNK_ELEMENTS,
    STRIP_ROWS,
    as_chw,
    as_mask,
    box_mean_valid,
    check_pair,
    fill_invalid,
    parallel_map,
    refuse_non_finite,
    uiqi_from_moments,
    window_means,
    windows_all_valid,
)

PSNR_PEAKS = ("dnmax", "band-max")  # named peaks; a number is also accepted


def _prepare(
    ref: np.ndarray, fused: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    ref, fused = as_chw(ref, "reference"), as_chw(fused, "fused")
    check_pair(ref, fused)
    m = as_mask(mask, ref.shape[1:])
    refuse_non_finite([("reference", ref), ("fused", fused)], m)
    return fill_invalid(ref, m, "reference"), fill_invalid(fused, m, "product"), m


def _band(img: np.ndarray, b: int) -> np.ndarray:
    return np.asarray(img[b], dtype=np.float64)


# --- Q: Wang-Bovik UIQI on a sliding window ---------------------------------------------------------


def _window_uiqi(x0: np.ndarray, y0: np.ndarray, k: int, ox: float, oy: float, tiny: float) -> np.ndarray:
    """UIQI map over the 'valid' k x k windows of two bands centred by offsets ox, oy (toolbox `img_qi.m`).

    Centring keeps the window sums small, so variances stay exact to ~1e-13.
    """
    mx0, my0 = box_mean_valid(x0, k), box_mean_valid(y0, k)
    vx = box_mean_valid(x0 * x0, k)
    vx -= mx0 * mx0
    np.maximum(vx, 0.0, out=vx)
    vy = box_mean_valid(y0 * y0, k)
    vy -= my0 * my0
    np.maximum(vy, 0.0, out=vy)
    cxy = box_mean_valid(x0 * y0, k)
    cxy -= mx0 * my0
    mx0 += ox
    my0 += oy
    return uiqi_from_moments(mx0, my0, vx, vy, cxy, tiny)


def q_index_bands(
    ref: np.ndarray, fused: np.ndarray, block: int = 32, mask: np.ndarray | None = None
) -> np.ndarray:
    """Per-band Q `(C,)`: mean UIQI over every `block` x `block` window fully inside the image.

    Windows touching an invalid pixel are left out.
    """
    ref, fused, m = _prepare(ref, fused, mask)
    h, w = ref.shape[1:]
    if min(h, w) < block:
        raise FusionError(f"Q needs images of at least {block}x{block} pixels, got {h}x{w}")
    sel = slice(None) if m is None else m
    # global per-band offsets and the rounding floor for "both variances are zero"
    stats = []
    for b in range(ref.shape[0]):
        x, y = _band(ref, b)[sel], _band(fused, b)[sel]
        ox, oy = float(x.mean()), float(y.mean())
        stats.append((ox, oy, 1e-12 * (float(((x - ox) ** 2).mean()) + float(((y - oy) ** 2).mean()))))

    def strip(b: int, o0: int, o1: int) -> np.ndarray:
        ox, oy, tiny = stats[b]
        rows = slice(o0, o1 + block - 1)
        x0, y0 = _band(ref[:, rows], b) - ox, _band(fused[:, rows], b) - oy
        return _window_uiqi(x0, y0, block, ox, oy, tiny)

    return window_means(ref.shape[0], h, block, windows_all_valid(m, block), strip, "Q")


def q_index(ref: np.ndarray, fused: np.ndarray, block: int = 32, mask: np.ndarray | None = None) -> float:
    """Q: the band average of the sliding-window UIQI (toolbox `Q.m` with `img_qi(.., 32)`)."""
    return float(q_index_bands(ref, fused, block, mask).mean())


# --- SAM -------------------------------------------------------------------------------------------


def sam_map(ref: np.ndarray, fused: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel spectral angle in degrees `(H, W)`; NaN where either spectrum has zero norm or is masked."""
    ref, fused, m = _prepare(ref, fused, mask)
    c, h, w = ref.shape
    out = np.full((h, w), np.nan)
    step = max(1, CHUNK_ELEMENTS // (c * w))  # strips of rows: float64 copies stay small
    for r0 in range(0, h, step):
        rows = slice(r0, r0 + step)
        r = np.asarray(ref[:, rows], dtype=np.float64)
        f = np.asarray(fused[:, rows], dtype=np.float64)
        dot = np.einsum("chw,chw->hw", r, f)
        norm = np.sqrt(np.einsum("chw,chw->hw", r, r) * np.einsum("chw,chw->hw", f, f))
        ok = norm > 0
        if m is not None:
            ok &= m[rows]
        out[rows][ok] = np.degrees(np.arccos(np.clip(dot[ok] / norm[ok], -1.0, 1.0)))
    return out


def sam(ref: np.ndarray, fused: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SAM in degrees: mean spectral angle over pixels where both spectra have non-zero norm.

    Zero-norm (and masked) pixels are excluded from both the sum and the count, as in `SAM.m`.
    """
    angles = sam_map(ref, fused, mask)
    ok = np.isfinite(angles)
    if not ok.any():
        raise FusionError("SAM: every pixel has a zero spectrum or is masked")
    return float(angles[ok].mean())


# --- ERGAS, RMSE, PSNR -------------------------------------------------------------------------------


def _band_mse_and_mean(
    ref: np.ndarray, fused: np.ndarray, m: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band MSE and reference mean over valid pixels: `(C,)`, `(C,)`."""
    sel = slice(None) if m is None else m
    if m is not None and not m.any():
        raise FusionError("no valid pixels: check the mask / nodata")
    mse = np.array([((_band(ref, b)[sel] - _band(fused, b)[sel]) ** 2).mean() for b in range(ref.shape[0])])
    mean = np.array([_band(ref, b)[sel].mean() for b in range(ref.shape[0])])
    return mse, mean


def ergas_bands(
    ref: np.ndarray, fused: np.ndarray, ratio: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """Per-band ERGAS terms `(C,)`: (100 / ratio) sqrt(MSE_b / mean(ref_b)^2)."""
    ref, fused, m = _prepare(ref, fused, mask)
    if ratio < 1:  # 1/4 (the MS/PAN ratio some papers write) would scale ERGAS 16-fold
        raise FusionError(f"ratio is the PAN/MS pixel-size ratio, at least 1 (e.g. 4, not 1/4), got {ratio}")
    mse, mean = _band_mse_and_mean(ref, fused, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (100.0 / ratio) * np.sqrt(mse / mean**2)


def ergas(ref: np.ndarray, fused: np.ndarray, ratio: float, mask: np.ndarray | None = None) -> float:
    """ERGAS = (100 / ratio) sqrt(mean_b MSE_b / mean(ref_b)^2), ratio = PAN/MS pixel-size ratio (4, not 1/4).

    MSE and mean are taken over valid pixels.
    """
    terms = ergas_bands(ref, fused, ratio, mask)
    return float(np.sqrt((terms**2).mean()))


def rmse_bands(ref: np.ndarray, fused: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    ref, fused, m = _prepare(ref, fused, mask)
    return np.sqrt(_band_mse_and_mean(ref, fused, m)[0])


def rmse(ref: np.ndarray, fused: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Root mean square error in DN over all bands and valid pixels."""
    return float(np.sqrt((rmse_bands(ref, fused, mask) ** 2).mean()))


def parse_peak(peak: float | str) -> float | str:
    """A PSNR/SSIM peak as given by a user: a positive number, "dnmax" or "band-max"."""
    if isinstance(peak, str) and peak in PSNR_PEAKS:
        return peak
    try:
        value = float(peak)
    except ValueError:
        raise FusionError(f"PSNR peak must be a number, 'dnmax' or 'band-max', got {peak!r}") from None
    if not value > 0:
        raise FusionError(f"PSNR peak must be positive, got {peak}")
    return value


def _peaks(ref: np.ndarray, m: np.ndarray | None, peak: float | str) -> np.ndarray:
    sel = slice(None) if m is None else m
    peak = parse_peak(peak)
    if peak == "dnmax":
        return np.full(ref.shape[0], max(float(_band(ref, b)[sel].max()) for b in range(ref.shape[0])))
    if peak == "band-max":
        return np.array([float(_band(ref, b)[sel].max()) for b in range(ref.shape[0])])
    return np.full(ref.shape[0], float(peak))


def psnr_bands(
    ref: np.ndarray, fused: np.ndarray, peak: float | str = "dnmax", mask: np.ndarray | None = None
) -> np.ndarray:
    """Per-band PSNR in dB `(C,)`: 10 log10(peak^2 / MSE_b); inf for a perfect band.

    `peak`: a number (1 for reflectance, 255 for 8-bit, 2047 for 11-bit DN ...), `"dnmax"` (the
    reference's maximum over all bands) or `"band-max"` (each reference band's own maximum).
    """
    ref, fused, m = _prepare(ref, fused, mask)
    mse, _ = _band_mse_and_mean(ref, fused, m)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(_peaks(ref, m, peak) ** 2 / mse)


def psnr(
    ref: np.ndarray, fused: np.ndarray, peak: float | str = "dnmax", mask: np.ndarray | None = None
) -> float:
    """PSNR in dB averaged over bands (the HISR convention)."""
    return float(psnr_bands(ref, fused, peak, mask).mean())


# --- SSIM ------------------------------------------------------------------------------------------


def _gauss_taps(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(a: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation with `taps` on 'valid' positions only: `(H, W)` -> `(H-n+1, W-n+1)`."""
    n = len(taps)
    a = sliding_window_view(a, n, axis=1) @ taps
    return sliding_window_view(a, n, axis=0) @ taps


def ssim_bands(
    ref: np.ndarray,
    fused: np.ndarray,
    peak: float | str = "dnmax",
    mask: np.ndarray | None = None,
    k: tuple[float, float] = (0.01, 0.03),
) -> np.ndarray:
    """Per-band SSIM `(C,)` of Wang et al.: Gaussian window 11 / sigma 1.5, K = (0.01, 0.03), L = peak.

    Mean of the SSIM map over 'valid' window positions; windows touching an invalid pixel are left out.
    """
    ref, fused, m = _prepare(ref, fused, mask)
    if min(ref.shape[1:]) < 11:
        raise FusionError(f"SSIM needs images of at least 11x11 pixels, got {ref.shape[1:]}")
    taps = _gauss_taps()
    n = len(taps)
    peaks = _peaks(ref, m, peak)

    def strip(b: int, o0: int, o1: int) -> np.ndarray:
        rows = slice(o0, o1 + n - 1)
        x, y = _band(ref[:, rows], b), _band(fused[:, rows], b)
        c1, c2 = (k[0] * peaks[b]) ** 2, (k[1] * peaks[b]) ** 2
        mx, my = _filter_valid(x, taps), _filter_valid(y, taps)
        vx = _filter_valid(x * x, taps) - mx**2
        vy = _filter_valid(y * y, taps) - my**2
        cxy = _filter_valid(x * y, taps) - mx * my
        return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))

    return window_means(ref.shape[0], ref.shape[1], n, windows_all_valid(m, n), strip, "SSIM")


def ssim(
    ref: np.ndarray, fused: np.ndarray, peak: float | str = "dnmax", mask: np.ndarray | None = None
) -> float:
    """SSIM averaged over bands."""
    return float(ssim_bands(ref, fused, peak, mask).mean())


# --- SCC -------------------------------------------------------------------------------------------

_SOBEL = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])


def _sobel_magnitude(inner: np.ndarray, top: bool, bottom: bool) -> np.ndarray:
    """Sobel gradient magnitude of rows of the interior (the image without its 1-pixel frame).

    `inner` holds the strip plus one halo row above (unless `top`: the strip starts the interior) and
    below (unless `bottom`); the interior is zero-padded (toolbox `SCC.m`), halo rows are dropped.
    """
    gy = ndimage.correlate(inner, _SOBEL, mode="constant", cval=0.0)
    gx = ndimage.correlate(inner, _SOBEL.T, mode="constant", cval=0.0)
    return np.hypot(gx, gy)[(0 if top else 1) : (None if bottom else -1)]


def scc_bands(ref: np.ndarray, fused: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-band SCC `(C,)`: normalised inner product of Sobel gradient magnitudes (no mean removal)."""
    return _scc(ref, fused, mask)[1]


def scc(ref: np.ndarray, fused: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SCC: sum(G_F G_R) / sqrt(sum G_F^2) / sqrt(sum G_R^2) over interior pixels and all bands.

    G = Sobel gradient magnitude ([1 2 1; 0 0 0; -1 -2 -1] and its transpose) of the image without its
    outer one-pixel frame, zero-padded. With a mask, pixels whose 3x3 neighbourhood touches an invalid
    pixel are left out of the sums.
    """
    return _scc(ref, fused, mask)[0]


def _scc(ref: np.ndarray, fused: np.ndarray, mask: np.ndarray | None) -> tuple[float, np.ndarray]:
    ref, fused, m = _prepare(ref, fused, mask)
    if min(ref.shape[1:]) < 3:
        raise FusionError("SCC needs images of at least 3x3 pixels")
    sel = None
    if m is not None:
        sel = ndimage.binary_erosion(m, np.ones((3, 3), bool), border_value=1)[1:-1, 1:-1]
    n_in = ref.shape[1] - 2  # interior rows; interior row i is image row i + 1
    items = [
        (b, o0, min(o0 + STRIP_ROWS, n_in)) for b in range(ref.shape[0]) for o0 in range(0, n_in, STRIP_ROWS)
    ]

    def one(i: int) -> tuple[float, float, float]:
        b, o0, o1 = items[i]
        top, bottom = o0 == 0, o1 == n_in
        rows = slice(o0 + (1 if top else 0), o1 + (1 if bottom else 2))  # image rows, with halo
        gf = _sobel_magnitude(_band(fused[:, rows], b)[:, 1:-1], top, bottom)
        gr = _sobel_magnitude(_band(ref[:, rows], b)[:, 1:-1], top, bottom)
        if sel is not None:
            gf, gr = gf[sel[o0:o1]], gr[sel[o0:o1]]
        return float((gf * gr).sum()), float((gf * gf).sum()), float((gr * gr).sum())

    sums = np.zeros((ref.shape[0], 3))
    for (b, _, _), part in zip(items, parallel_map(one, len(items)), strict=True):
        sums[b] += part
    fr, ff, rr = sums.T
    with np.errstate(divide="ignore", invalid="ignore"):
        per_band = fr / np.sqrt(ff) / np.sqrt(rr)
        total = fr.sum() / np.sqrt(ff.sum()) / np.sqrt(rr.sum())
    return float(total), per_band
