"""Quality indices: definitions checked by hand-computed cases, a literal transcription of the toolbox's
q2n.m / onions_quality.m, invariances, and the published figures on real WorldView-3 data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import example_pair, have_shared, need_shared

from fusion_cli.errors import FusionError
from fusion_cli.metrics import (
    border_cut,
    d_lambda,
    d_s,
    ergas,
    ergas_bands,
    full_resolution,
    psnr,
    q2n,
    q2n_label,
    q_index,
    reduced_resolution,
    round_uint16,
    sam,
    sam_map,
    scc,
    ssim,
    upsample,
)

RNG = np.random.default_rng(7)


# --- a literal, loop-by-loop transcription of the toolbox's q2n.m (MATLAB layout H, W, N) -----------


def _mat_onion_mult2d(o1: np.ndarray, o2: np.ndarray) -> np.ndarray:
    n = o1.shape[2]
    if n == 1:
        return o1 * o2
    half = n // 2
    a, b = o1[:, :, :half], o1[:, :, half:].copy()
    b[:, :, 1:] *= -1
    c, d = o2[:, :, :half], o2[:, :, half:].copy()
    d[:, :, 1:] *= -1
    if n == 2:
        return np.concatenate([a * c - d * b, a * d + c * b], axis=2)
    bc = b.copy()
    bc[:, :, 1:] *= -1
    ac = a.copy()
    ac[:, :, 1:] *= -1
    r1 = _mat_onion_mult2d(a, c)
    r2 = _mat_onion_mult2d(d, bc)
    r3 = _mat_onion_mult2d(ac, d)
    r4 = _mat_onion_mult2d(c, b)
    return np.concatenate([r1 - r2, r3 + r4], axis=2)


def _mat_onions_quality(d1: np.ndarray, d2: np.ndarray, size: int) -> np.ndarray:
    d1, d2 = d1.astype(float).copy(), d2.astype(float).copy()
    d2[:, :, 1:] *= -1
    n3 = d1.shape[2]
    for i in range(n3):
        s = d1[:, :, i].mean()
        t = d1[:, :, i].std(ddof=1)
        if t == 0:
            t = np.finfo(float).eps
        d1[:, :, i] = (d1[:, :, i] - s) / t + 1
        if s == 0:
            d2[:, :, i] = d2[:, :, i] - s + 1 if i == 0 else -(-d2[:, :, i] - s + 1)
        else:
            d2[:, :, i] = (d2[:, :, i] - s) / t + 1 if i == 0 else -((-d2[:, :, i] - s) / t + 1)
    m1 = np.array([d1[:, :, i].mean() for i in range(n3)])
    m2 = np.array([d2[:, :, i].mean() for i in range(n3)])
    mod_q1m, mod_q2m = math.sqrt((m1**2).sum()), math.sqrt((m2**2).sum())
    mod_q1, mod_q2 = np.sqrt((d1**2).sum(axis=2)), np.sqrt((d2**2).sum(axis=2))
    k = size * size / (size * size - 1)
    termine2, termine4 = mod_q1m * mod_q2m, mod_q1m**2 + mod_q2m**2
    int1, int2 = k * (mod_q1**2).mean(), k * (mod_q2**2).mean()
    termine3 = int1 + int2 - k * (mod_q1m**2 + mod_q2m**2)
    mean_bias = 2 * termine2 / termine4
    if termine3 == 0:
        q = np.zeros(n3)
        q[-1] = mean_bias
        return q
    qu = _mat_onion_mult2d(d1, d2)
    qm = _mat_onion_mult2d(m1[None, None], m2[None, None])[0, 0]
    qv = np.array([k * qu[:, :, i].mean() for i in range(n3)])
    return (qv - k * qm) * mean_bias * 2 / termine3


def _mat_uint16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.where(x >= 0, np.floor(x + 0.5), np.ceil(x - 0.5)), 0, 65535)


def _mat_q2n(gt: np.ndarray, f: np.ndarray, bs: int = 32) -> float:
    """q2n.m with block = shift = bs, on (H, W, N) arrays."""
    n1, n2, n3 = gt.shape
    sx, sy = math.ceil(n1 / bs), math.ceil(n2 / bs)
    e1, e2 = sx * bs - n1, sy * bs - n2

    def pad(a: np.ndarray) -> np.ndarray:
        out = np.zeros((n1 + e1, n2 + e2, n3))
        out[:n1, :n2] = a
        if e2:
            out[:, n2 : n2 + e2] = out[:, n2 - 1 : n2 - e2 - 1 if n2 - e2 - 1 >= 0 else None : -1]
        if e1:
            out[n1 : n1 + e1] = out[n1 - 1 : n1 - e1 - 1 if n1 - e1 - 1 >= 0 else None : -1]
        return out

    gt, f = _mat_uint16(pad(gt)), _mat_uint16(pad(f))
    if 2 ** math.ceil(math.log2(n3)) != n3:
        extra = np.zeros(gt.shape[:2] + (2 ** math.ceil(math.log2(n3)) - n3,))
        gt, f = np.concatenate([gt, extra], axis=2), np.concatenate([f, extra], axis=2)
    vals = []
    for j in range(sx):
        for i in range(sy):
            blk = (slice(j * bs, j * bs + bs), slice(i * bs, i * bs + bs))
            vals.append(math.sqrt((_mat_onions_quality(gt[blk], f[blk], bs) ** 2).sum()))
    return float(np.mean(vals))


def _pair(c: int, h: int, w: int, noise: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth-ish DN reference and a noisy, biased estimate of it."""
    base = RNG.uniform(200, 900, (c, 1, 1)) + RNG.normal(0, 60, (c, h, w)).cumsum(axis=2) / 8
    fused = base * RNG.uniform(0.9, 1.1, (c, 1, 1)) + RNG.normal(0, noise, (c, h, w))
    return base, fused


# --- Q2n ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "c,h,w", [(4, 64, 64), (8, 64, 96), (3, 45, 70), (6, 33, 40), (1, 40, 32), (5, 32, 31)]
)
def test_q2n_matches_literal_toolbox_transcription(c: int, h: int, w: int) -> None:
    # covers the mirror padding (non-multiples of 32), zero bands (3, 5, 6 -> 4, 8, 8) and rounding
    ref, fused = _pair(c, h, w)
    fused[0, :3, :3] = -7.0  # saturates to 0 in uint16
    expect = _mat_q2n(ref.transpose(1, 2, 0), fused.transpose(1, 2, 0))
    # the toolbox always rounds; the library, by default, only where the reference holds whole DN
    assert q2n(ref, fused, round_uint16=True) == pytest.approx(expect, abs=1e-10)


def test_q2n_constant_reference_block_follows_toolbox() -> None:
    ref, fused = _pair(4, 64, 64)
    ref[:, :32, :32] = 500.0  # zero std -> eps normalisation, as norm_blocco.m
    fused[:, :32, :32] = 500.0
    ref[2, 32:, 32:] = 0.0  # zero mean -> the toolbox only adds 1 to the fused band
    expect = _mat_q2n(ref.transpose(1, 2, 0), fused.transpose(1, 2, 0))
    # the toolbox always rounds; the library, by default, only where the reference holds whole DN
    assert q2n(ref, fused, round_uint16=True) == pytest.approx(expect, abs=1e-10)


def test_q2n_identity_and_bounds() -> None:
    ref, fused = _pair(8, 64, 64, noise=80)
    assert q2n(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < q2n(ref, fused) < 1.0
    assert q2n(ref, np.zeros_like(ref) + 300) < 0.2  # no spatial information left


def test_q2n_uint16_rounding() -> None:
    ref = np.round(_pair(4, 32, 32)[0])
    # +0.4 rounds back to the reference: a perfect score only with the toolbox rounding
    assert q2n(ref, ref + 0.4) == pytest.approx(1.0, abs=1e-12)
    assert q2n(ref, ref + 0.4, round_uint16=False) < 1.0
    # half away from zero: +0.5 is +1 after rounding
    assert q2n(ref, ref + 0.5) == pytest.approx(q2n(ref, ref + 1.0, round_uint16=False), abs=1e-12)
    np.testing.assert_array_equal(
        round_uint16(np.array([-3.0, 0.5, 1.5, 2.5, 70000.0, np.nan])), [0, 1, 2, 3, 65535, 0]
    )


def test_q2n_non_power_of_two_appends_zero_bands() -> None:
    ref, fused = _pair(3, 64, 64)
    zero = np.zeros((1, 64, 64))
    padded = q2n(np.concatenate([ref, zero]), np.concatenate([fused, zero]))
    assert q2n(ref, fused) == pytest.approx(padded, abs=1e-12)
    assert q2n_label(8) == "Q8" and q2n_label(4) == "Q4" and q2n_label(6) == "Q2n"


def test_q2n_single_band_is_block_uiqi_of_normalised_data() -> None:
    ref, fused = _pair(1, 32, 32)
    r, f = np.round(ref[0]), np.round(fused[0])
    mu, sd = r.mean(), r.std(ddof=1)
    x, y = (r - mu) / sd + 1, (f - mu) / sd + 1
    cov = ((x - x.mean()) * (y - y.mean())).sum() / (x.size - 1)
    uiqi = 4 * cov * x.mean() * y.mean() / ((x.var(ddof=1) + y.var(ddof=1)) * (x.mean() ** 2 + y.mean() ** 2))
    assert q2n(ref, fused, round_uint16=True) == pytest.approx(abs(uiqi), abs=1e-12)


def test_q2n_mask_drops_blocks() -> None:
    ref, fused = _pair(4, 64, 32)
    garbage = fused.copy()
    garbage[:, 32:] = 0.0
    mask = np.ones((64, 32), bool)
    mask[40, 5] = False  # one nodata pixel removes the whole second block
    assert q2n(ref, garbage, mask=mask) == pytest.approx(q2n(ref[:, :32], fused[:, :32]), abs=1e-12)


# --- Q (sliding-window UIQI) ------------------------------------------------------------------------


def test_q_hand_computed() -> None:
    x = np.tile(np.arange(32.0), (32, 1))[None]
    # y = x + c: equal variances and cov = var, so UIQI = 2 mx my / (mx^2 + my^2)
    mx, my = x.mean(), x.mean() + 10
    assert q_index(x, x + 10) == pytest.approx(2 * mx * my / (mx**2 + my**2), abs=1e-12)
    assert q_index(x, x) == pytest.approx(1.0, abs=1e-12)
    # constant windows: the img_qi.m guards (mean term; 1 when the means vanish too)
    const = np.full((1, 32, 32), 5.0)
    assert q_index(const, const * 2) == pytest.approx(2 * 5 * 10 / (25 + 100), abs=1e-12)
    assert q_index(const * 0, const * 0) == 1.0


def test_q_slides_over_valid_windows_only() -> None:
    ref, fused = _pair(2, 33, 34)
    windows = []
    for i in range(2):
        for j in range(3):
            windows.append(q_index(ref[:, i : i + 32, j : j + 32], fused[:, i : i + 32, j : j + 32]))
    assert q_index(ref, fused) == pytest.approx(np.mean(windows), abs=1e-10)


# --- SAM, ERGAS, SCC, PSNR, SSIM --------------------------------------------------------------------


def test_sam_hand_computed_and_zero_norm_excluded() -> None:
    ref = np.array([[[1.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]])  # (2 bands, 1 row, 3 pixels)
    fused = np.array([[[0.0, 1.0, 3.0]], [[1.0, 1.0, 4.0]]])
    # pixel angles 90 and 45 degrees; the third reference spectrum is zero and is left out
    assert sam(ref, fused) == pytest.approx(67.5, abs=1e-12)
    assert np.isnan(sam_map(ref, fused)[0, 2])
    assert sam(ref, ref) == 0.0


def test_sam_invariant_to_per_pixel_scaling() -> None:
    ref, fused = _pair(8, 40, 40)
    scale = RNG.uniform(0.1, 10, (1, 40, 40))
    assert sam(ref, fused * scale) == pytest.approx(sam(ref, fused), abs=1e-9)
    assert sam(ref, ref * scale) == pytest.approx(0.0, abs=1e-5)


def test_ergas_hand_computed_and_ratio() -> None:
    ref = np.full((2, 8, 8), 10.0)
    fused = ref.copy()
    fused[0] += 1.0  # band 0: MSE 1 / mean^2 100; band 1: 0
    assert ergas(ref, fused, 4) == pytest.approx(25 * math.sqrt(0.01 / 2), abs=1e-12)
    np.testing.assert_allclose(ergas_bands(ref, fused, 4), [2.5, 0.0])
    a, b = _pair(4, 32, 32)
    assert ergas(a, b, 2) == pytest.approx(2 * ergas(a, b, 4), rel=1e-12)
    assert ergas(a, a, 4) == 0.0
    with pytest.raises(FusionError):
        ergas(a, b, 0)
    with pytest.raises(FusionError, match="not 1/4"):  # the MS/PAN ratio: 16 times the ERGAS
        ergas(a, b, 0.25)
    from fusion_cli.pipeline import make_fuser

    with pytest.raises(FusionError, match="positive integer, got 2.5"):  # was built as ratio 2
        make_fuser(method="gsa", ratio=2.5)


def test_scc_hand_computed() -> None:
    # interior 2x2 blocks, zero padded: Sobel magnitudes (0, 2, 2, sqrt 2) and (sqrt 2, 2, 2, 0)
    ref = RNG.uniform(0, 100, (1, 4, 4))  # the outer frame is dropped: its values must not matter
    fused = RNG.uniform(0, 100, (1, 4, 4))
    ref[0, 1:3, 1:3] = [[1, 0], [0, 0]]
    fused[0, 1:3, 1:3] = [[0, 0], [0, 1]]
    assert scc(ref, fused) == pytest.approx(8 / 10, abs=1e-12)
    a, b = _pair(3, 30, 30)
    assert scc(a, a) == pytest.approx(1.0, abs=1e-12)
    assert scc(a, 3 * a) == pytest.approx(1.0, abs=1e-12)  # no mean removal, scale-free
    assert scc(a, a + 50) < 1.0  # a DN offset shows up at the zero-padded frame, as in SCC.m


def test_psnr_and_ssim_hand_computed() -> None:
    ref = np.zeros((2, 16, 16))
    fused = ref + 1.0  # MSE 1 in every band
    assert psnr(ref, fused, peak=255) == pytest.approx(20 * math.log10(255), abs=1e-12)
    assert psnr(ref, fused, peak="255") == pytest.approx(20 * math.log10(255), abs=1e-12)
    a, b = np.full((1, 16, 16), 100.0), np.full((1, 16, 16), 110.0)
    c1 = (0.01 * 255) ** 2  # constant images: only the luminance term is left
    assert ssim(a, b, peak=255) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), abs=1e-12)
    x, y = _pair(3, 40, 40)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert 0 < ssim(x, y) < 1
    assert psnr(x, y, peak="band-max") != psnr(x, y, peak="dnmax")
    with pytest.raises(FusionError):
        psnr(x, y, peak="max")


# --- cut, clip, masks, errors -----------------------------------------------------------------------


def test_border_cut_keeps_toolbox_rows() -> None:
    img = np.arange(50 * 60, dtype=float).reshape(1, 50, 60)
    out = border_cut(img, 21)
    assert out.shape == (1, 9, 19)
    assert out[0, 0, 0] == img[0, 20, 20] and out[0, -1, -1] == img[0, 28, 38]
    ref, fused = _pair(4, 60, 60)
    bad = ref.copy()
    bad[:, 9] += 500  # row K-2 and row H-K are cut away for K = 11 ...
    bad[:, 49] -= 300
    r = reduced_resolution(ref, bad, 4, cut=11)
    assert r["ERGAS"] == 0.0 and r["SAM"] == 0.0 and r["Q2n"] == pytest.approx(1.0)
    bad[:, 10] += 500  # ... row K-1 is kept
    assert reduced_resolution(ref, bad, 4, cut=11)["ERGAS"] > 0.0
    with pytest.raises(FusionError):
        border_cut(img, 30)


def test_clip_bits_and_masks() -> None:
    ref, fused = _pair(4, 64, 64)
    hot = fused.copy()
    hot[:, 5, 5] = 5000.0
    assert reduced_resolution(ref, hot, 4, clip_bits=11)["RMSE"] < reduced_resolution(ref, hot, 4)["RMSE"]
    mask = np.ones((64, 64), bool)
    mask[5, 5] = False
    r = reduced_resolution(ref, hot, 4, mask=mask, per_band=True)
    ok = r["SAM"] == pytest.approx(sam(ref[:, mask][:, :, None], fused[:, mask][:, :, None]), abs=1e-12)
    assert ok and r["ERGAS"] == pytest.approx(ergas(ref[:, mask][:, :, None], fused[:, mask][:, :, None], 4))
    assert len(r["per_band"]["Q"]) == 4 and r["q2n_name"] == "Q4"


def test_shape_mismatch_is_a_one_line_error() -> None:
    with pytest.raises(FusionError, match="differ in shape"):
        reduced_resolution(np.zeros((4, 32, 32)), np.zeros((4, 32, 33)), 4)


def test_identical_images_score_perfectly() -> None:
    ref, _ = _pair(8, 64, 64)
    r = reduced_resolution(ref, ref.copy(), 4)
    assert r["Q2n"] == pytest.approx(1) and r["Q"] == pytest.approx(1) and r["SCC"] == pytest.approx(1)
    assert r["SAM"] == 0.0 and r["ERGAS"] == 0.0 and r["SSIM"] == pytest.approx(1)


# --- real data --------------------------------------------------------------------------------------


def _golden(name: str) -> np.ndarray:
    return np.load(need_shared("fusionmamba_official", "golden", name)).transpose(2, 0, 1)


def test_golden_fusionmamba_wv3_matches_published_figures() -> None:
    # README of the golden tensors: Q8 0.8609, Q 0.8627, SAM 3.583 deg, ERGAS 2.263, SCC 0.904
    r = reduced_resolution(_golden("b_gt.npy"), _golden("b_out.npy"), ratio=4)
    assert round(r["Q2n"], 4) == 0.8609
    assert round(r["Q"], 4) == 0.8627
    assert round(r["SAM"], 3) == 3.583
    assert round(r["ERGAS"], 3) == 2.263
    assert round(r["SCC"], 3) == 0.904
    assert r["q2n_name"] == "Q8"


def test_golden_interpolated_ms_matches_published_figures() -> None:
    # the toolbox's interp23tap (circular borders) of the degraded MS: Q8 0.671, SAM 4.298, ERGAS 3.328
    from fusion_cli.resample import interp23

    lr = torch.from_numpy(_golden("b_ms_lr.npy").astype(np.float64))[None]
    up = interp23(lr, 4, pad_mode="circular")[0].numpy()
    gt = _golden("b_gt.npy")
    assert round(q2n(gt, up), 3) == 0.671
    assert round(sam(gt, up), 3) == 4.298
    assert round(ergas(gt, up, 4), 3) == 3.328


def _wv3_crop() -> tuple[np.ndarray, np.ndarray]:
    import rasterio

    with (
        rasterio.open(need_shared("wv3_spacenet2", "ms.tif")) as ms,
        rasterio.open(need_shared("wv3_spacenet2", "pan.tif")) as pan,
    ):
        return ms.read()[:, :128, :128], pan.read()[:, :512, :512]


def _crop(source: str) -> tuple[np.ndarray, np.ndarray, int, str]:
    """ms (C, h, w), pan (1, r h, r w), ratio r and sensor: a WV3 crop or the in-repository example."""
    if source == "wv3":
        return (*_wv3_crop(), 4, "wv3")
    ex = example_pair(128, 256)
    return ex.ms, ex.pan, ex.ratio, ex.sensor


SOURCES = ["wv3", "landsat8-example"]


@pytest.mark.parametrize("source", SOURCES)
def test_real_wv3_full_resolution_magnitudes(source: str) -> None:
    ms, pan, r, sensor = _crop(source)
    ms_up = upsample(ms, r)
    # the interpolated MS as the "fused" product: no spectral distortion by construction
    exp = full_resolution(ms_up, pan, ms, sensor=sensor, per_band=True)
    assert np.mean(exp.pop("per_band")["D_s"]) == pytest.approx(exp["D_s"], abs=1e-12)
    assert exp["D_lambda"] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < exp["D_s"] < 0.2 and 0.0 < exp["D_lambda_K"] < 0.15
    assert 0.7 < exp["HQNR"] < 1.0 and exp["QNR"] == pytest.approx(1 - exp["D_s"])
    # a crude detail injection (PAN minus the band mean, histogram-matched) distorts the spectra
    intensity = ms_up.mean(axis=0, keepdims=True)
    p = (pan - pan.mean()) / pan.std() * intensity.std() + intensity.mean()
    gihs = full_resolution(ms_up + (p - intensity), pan, ms, ratio=r, sensor=sensor)
    assert gihs["D_lambda"] > 0.02 and gihs["D_lambda_K"] > exp["D_lambda_K"]
    for v in (*exp.values(), *gihs.values()):
        assert np.isfinite(v)


@pytest.mark.parametrize("source", SOURCES)
def test_real_wv3_reduced_resolution_magnitudes(source: str) -> None:
    # Wald protocol on the real scene: MTF-degrade the MS by 4, interpolate back, compare with the MS
    from fusion_cli.mtf import degrade_ms
    from fusion_cli.sensors import nyquist_gains

    ms, _, _, sensor = _crop(source)
    gains, _ = nyquist_gains(sensor, ms.shape[0])
    up = upsample(degrade_ms(ms.astype(np.float64), gains, 4), 4)
    r = reduced_resolution(ms, up, 4, per_band=True)
    assert 0.4 < r["Q2n"] < 0.9 and 0.4 < r["Q"] < 0.9
    assert 1.0 < r["SAM"] < 8.0 and 1.0 < r["ERGAS"] < 8.0 and 0.3 < r["SCC"] < 0.95
    assert min(r["per_band"]["PSNR"]) > 20


def test_real_wv2_nodata_mask_changes_full_resolution_scores() -> None:
    """WV2 pair 2, whose unflagged zero collar covers a third of the scene; without ../shared, the
    example with such a collar over its left third."""
    import rasterio

    if have_shared("wv2_spacenet6"):
        with (
            rasterio.open(need_shared("wv2_spacenet6", "ms_2.tif")) as m,
            rasterio.open(need_shared("wv2_spacenet6", "pan_2.tif")) as p,
        ):
            ms, pan, r = m.read().astype(np.float64), p.read().astype(np.float64), 4
    else:
        ex = example_pair()
        ms, pan, r = ex.ms.copy(), ex.pan.copy(), ex.ratio
        ms[:, :, : ms.shape[2] // 3] = 0
        pan[:, :, : r * (ms.shape[2] // 3)] = 0
    ms_up = upsample(ms, r)
    valid = (pan[0] > 0) & np.repeat(np.repeat(ms.sum(axis=0) > 0, r, axis=0), r, axis=1)
    masked = d_s(ms_up, ms_up, pan, r, mask=valid)
    unmasked = d_s(ms_up, ms_up, pan, r)
    assert np.isfinite(masked) and masked != pytest.approx(unmasked, abs=1e-4)
    assert d_lambda(ms_up, ms_up, mask=valid) == 0.0
    with pytest.raises(FusionError, match="nodata"):
        d_lambda(ms_up, ms_up, mask=np.zeros(valid.shape, bool))


# --- full resolution, hand-computed ------------------------------------------------------------------


def test_d_lambda_hand_computed() -> None:
    x = np.tile(np.arange(64.0), (64, 1)) + RNG.normal(0, 3, (64, 64))
    fused = np.stack([x, x + 40])  # equal variances, cov = var: UIQI = 2 m1 m2 / (m1^2 + m2^2) per block
    ms_up = np.stack([x, x])  # identical bands: UIQI = 1
    terms = [1 - 2 * m * (m + 40) / (m**2 + (m + 40) ** 2) for m in (x[:32, :32].mean(), x[:32, 32:].mean())]
    terms += [1 - 2 * m * (m + 40) / (m**2 + (m + 40) ** 2) for m in (x[32:, :32].mean(), x[32:, 32:].mean())]
    assert d_lambda(fused, ms_up) == pytest.approx(np.mean(terms), abs=1e-12)
    # only full blocks count: a 60 x 63 crop holds the first block alone
    assert d_lambda(fused[:, :60, :63], ms_up[:, :60, :63]) == pytest.approx(terms[0], abs=1e-12)


def test_d_s_hand_computed() -> None:
    pan = (np.tile(np.arange(64.0), (64, 1)) + RNG.normal(0, 3, (64, 64)))[None] + 100
    lp = pan + RNG.normal(0, 1, pan.shape)
    fused = np.concatenate([pan, pan])  # Q(F_b, P) = 1
    # Q(M, P_lp) = 1 for M = P_lp, and 4 (2 var)(2 m) m / ((4 var + var)(4 m^2 + m^2)) = 0.64 for M = 2 P_lp
    ms_up = np.concatenate([lp, 2 * lp])
    assert d_s(fused, ms_up, pan, 4, pan_lp=lp) == pytest.approx((0 + 0.36) / 2, abs=1e-12)


def test_d_lambda_khan_is_zero_when_ms_is_the_filtered_product() -> None:
    from fusion_cli.metrics import d_lambda_khan
    from fusion_cli.mtf import mtf_filter

    _, fused = _pair(4, 64, 64)
    low = mtf_filter(torch.from_numpy(fused.astype(np.float32))[None], [0.3] * 4, 4)[0].double().numpy()
    assert d_lambda_khan(fused, low, 4, gains=[0.3] * 4) == pytest.approx(0.0, abs=1e-12)
    assert d_lambda_khan(fused, low, 4, gains=[0.15] * 4) > 0.0  # another MTF, another low-pass


def test_scc_row_strips_match_the_whole_image_formula() -> None:
    from scipy import ndimage

    ref, fused = _pair(2, 450, 40)  # several strips of rows
    sobel = np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])

    def grad(img: np.ndarray) -> np.ndarray:
        inner = img[:, 1:-1, 1:-1]
        return np.stack(
            [
                np.hypot(
                    ndimage.correlate(b, sobel, mode="constant"),
                    ndimage.correlate(b, sobel.T, mode="constant"),
                )
                for b in inner
            ]
        )

    gf, gr = grad(fused), grad(ref)
    expect = (gf * gr).sum() / np.sqrt((gf**2).sum()) / np.sqrt((gr**2).sum())
    assert scc(ref, fused) == pytest.approx(expect, abs=1e-12)


def test_q_and_ssim_row_strips_match_direct_window_statistics() -> None:
    from numpy.lib.stride_tricks import sliding_window_view

    ref, fused = _pair(1, 430, 40)  # several strips of rows
    x, y = sliding_window_view(ref[0], (32, 32)), sliding_window_view(fused[0], (32, 32))
    mx, my = x.mean(axis=(-1, -2)), y.mean(axis=(-1, -2))
    vx, vy = x.var(axis=(-1, -2)), y.var(axis=(-1, -2))
    cxy = (x * y).mean(axis=(-1, -2)) - mx * my
    assert q_index(ref, fused) == pytest.approx(
        (4 * cxy * mx * my / ((vx + vy) * (mx**2 + my**2))).mean(), abs=1e-12
    )

    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    x, y = sliding_window_view(ref[0], (11, 11)), sliding_window_view(fused[0], (11, 11))
    mx, my = (x * w).sum(axis=(-1, -2)), (y * w).sum(axis=(-1, -2))
    vx, vy = (x * x * w).sum(axis=(-1, -2)) - mx**2, (y * y * w).sum(axis=(-1, -2)) - my**2
    cxy = (x * y * w).sum(axis=(-1, -2)) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    smap = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim(ref, fused, peak=255) == pytest.approx(smap.mean(), abs=1e-10)


def test_what_nodata_pixels_hold_does_not_move_any_index() -> None:
    """A hole of nodata in product, PAN and MS: the indices must be the same whether it holds 0, 65535
    or NaN. Before, the full-resolution filters (MS interpolation, the PAN's low-pass, the MTF) carried
    the stored values into valid neighbours (on WV2: HQNR 0.374 with 0, 0.381 with 65535; HPC 0 with
    NaN), and a NaN made Q NaN through its running window sums. The example scene, its GSA product
    and a 40 x 60 PAN px hole."""
    from fusion_cli.classical import make_method

    ex = example_pair()
    r = ex.ratio
    pan_t, ms_t = torch.from_numpy(ex.pan)[None], torch.from_numpy(ex.ms)[None]
    fused = make_method("gsa", r, ex.sensor).fit(pan_t, ms_t).fuse(pan_t, ms_t)[0].double().numpy()
    valid = np.ones(fused.shape[1:], bool)
    valid[100:140, 200:260] = False
    ms_valid = valid.reshape(valid.shape[0] // r, r, -1, r).all(axis=(1, 3))

    def holed(img: np.ndarray, keep: np.ndarray, value: float) -> np.ndarray:
        out = img.astype(np.float64).copy()
        out[:, ~keep] = value
        return out

    full, reduced = [], []
    for value in (0.0, 65535.0, np.nan):
        f, p, m = holed(fused, valid, value), holed(ex.pan, valid, value), holed(ex.ms, ms_valid, value)
        full.append(full_resolution(f, p, m, r, ex.sensor, valid))
        # the MS on the PAN grid as a stand-in reference: what matters is the hole
        reduced.append(reduced_resolution(holed(upsample(ex.ms, r), valid, value), f, r, mask=valid))
    for scores in (full, reduced):
        for key, first in scores[0].items():
            if isinstance(first, float):
                assert math.isfinite(first), key
                others = [s[key] for s in scores[1:]]
                assert others == pytest.approx([first, first], rel=1e-12, abs=1e-12), key


def test_library_rounds_to_uint16_as_the_cli_decides() -> None:
    """`fusion metrics` rounds to uint16 (the toolbox's Q2n) only whole-number DN; the library
    rounded everything by default, so reflectance in 0..1 scored Q2n 0.52 there and 0.84 in the CLI.
    The library's default now decides as the CLI does (`holds_whole_dn`), True/False still force it."""
    from fusion_cli.metrics import full_resolution, holds_whole_dn, q2n, reduced_resolution

    ex = example_pair()
    ref = ex.ms[:, :128, :128].astype(np.float64)
    rng = np.random.default_rng(0)
    fused = ref + rng.normal(0, 40, ref.shape)
    assert holds_whole_dn(ref) and not holds_whole_dn(ref / 65535) and not holds_whole_dn(ref - ref.mean())
    assert q2n(ref, fused) == q2n(ref, fused, round_uint16=True)
    refl, refl_fused = ref / 65535, fused / 65535
    auto = q2n(refl, refl_fused)
    assert auto == q2n(refl, refl_fused, round_uint16=False) != q2n(refl, refl_fused, round_uint16=True)
    assert reduced_resolution(refl, refl_fused, 2)["Q2n"] == auto
    pan = ex.pan[:, :128, :128].astype(np.float64)
    ms = ex.ms[:, :64, :64].astype(np.float64)
    product = np.repeat(np.repeat(ms, 2, axis=1), 2, axis=2)
    whole = full_resolution(product, pan, ms, 2, "landsat8", block=16)
    assert whole == full_resolution(product, pan, ms, 2, "landsat8", block=16, round_uint16=True)
    scaled = full_resolution(product / 65535, pan, ms / 65535, 2, "landsat8", block=16)["D_lambda_K"]
    forced = full_resolution(product / 65535, pan, ms / 65535, 2, "landsat8", block=16, round_uint16=False)
    assert scaled == forced["D_lambda_K"]


def test_nan_outside_the_mask_is_refused_by_every_index() -> None:
    """A NaN pixel took a different way through each index: SAM left it out, ERGAS became NaN, and
    Q2n's uint16 rounding took it for 0 (a plausible, wrong score). Refused now, one message; a mask
    that leaves it out scores the rest as before."""
    from fusion_cli.metrics import d_lambda, ergas, q2n, reduced_resolution, sam

    ex = example_pair()
    ref = ex.ms[:, :64, :64].astype(np.float64)
    fused = ref + RNG.normal(0, 30, ref.shape)
    holed = fused.copy()
    holed[:, 5, 7] = np.nan
    mask = np.ones((64, 64), bool)
    mask[5, 7] = False
    indices = (
        lambda f, m: q2n(ref, f, mask=m),
        lambda f, m: sam(ref, f, m),
        lambda f, m: ergas(ref, f, 2, m),
        lambda f, m: reduced_resolution(ref, f, 2, mask=m)["Q2n"],
        lambda f, m: d_lambda(f, ref, mask=m),
    )
    for index in indices:
        with pytest.raises(FusionError, match="fused image has NaN or infinite values at 1 px"):
            index(holed, None)
        assert index(holed, mask) == pytest.approx(index(fused, mask), rel=1e-12)


StripCase = tuple[str, np.ndarray, np.ndarray, np.ndarray, int, str | None, np.ndarray | None]


def _strip_cases() -> list[StripCase]:
    """(name, product, PAN, MS, ratio, sensor, mask): GSA products of real pairs with the nodata they
    hold. WV2 pair 2 (ratio 4, its zero collar over a third of the columns), ALI PAN + 128 Hyperion bands
    over Paris (ratio 3: strips on 96 rows; reflectance, not rounded); without ../shared, the example
    (ratio 2) with a hole across a strip boundary."""
    import rasterio

    from fusion_cli.classical import make_method

    pairs: list[tuple[str, np.ndarray, np.ndarray, int, str | None]] = []
    for folder, pan_name, ms_name, sensor in (
        ("wv2_spacenet6", "pan_2.tif", "ms_2.tif", "wv2"),
        ("eo1_hyperion_ali_paris", "pan.tif", "hs.tif", None),
    ):
        if have_shared(folder):
            with (
                rasterio.open(need_shared(folder, pan_name)) as p,
                rasterio.open(need_shared(folder, ms_name)) as m,
            ):
                pan, ms = p.read().astype(np.float64), m.read().astype(np.float64)
            r = round(pan.shape[1] / ms.shape[1])
            pairs.append((folder, pan, ms, r, sensor))
    if not pairs:
        ex = example_pair()
        pairs.append(("example", ex.pan, ex.ms, ex.ratio, ex.sensor))
    cases = []
    for name, pan, ms, r, sensor in pairs:
        pan_t, ms_t = torch.from_numpy(pan)[None], torch.from_numpy(ms)[None]
        fused = make_method("gsa", r, sensor).fit(pan_t, ms_t).fuse(pan_t, ms_t)[0].numpy()
        valid = (pan[0] > 0) & np.repeat(np.repeat((ms > 0).all(axis=0), r, axis=0), r, axis=1)
        if name == "example":
            valid[120:140, 200:260] = False  # strips of 128 rows: the hole straddles the first boundary
        cases.append((name, fused, pan, ms, r, sensor, None if valid.all() else valid))
    return cases


def test_full_resolution_by_row_strips_equals_the_whole_scene() -> None:
    """The full-resolution indices filtered whole images (~52 B per pixel and band: an 8 x 8100^2
    product needed 24 GB). They now run by row strips with a halo covering the filters' reach; every
    index and per-band term must equal the whole scene computed as one strip, with nodata crossing
    the strips' boundaries and a last strip that a block joins to the one before it."""
    from fusion_cli.metrics.fullres import strips

    # rows scored on multiples of the block; read with the filters' reach (52 px at ratio 4, 20 at 3)
    # on whole MS rows
    assert [(s.top, s.bottom) for s in strips(300, 128, 32, 4)] == [(0, 128), (128, 256), (256, 300)]
    assert [(s.top, s.bottom) for s in strips(280, 128, 32, 4)] == [(0, 128), (128, 280)]
    assert [(s.read_top, s.read_bottom) for s in strips(280, 128, 32, 4)] == [(0, 180), (76, 280)]
    assert [(s.read_top, s.top, s.bottom, s.read_bottom) for s in strips(99, 32, 32, 3)] == [
        (0, 0, 32, 54),
        (12, 32, 64, 84),
        (42, 64, 99, 99),
    ]
    for name, fused, pan, ms, r, sensor, valid in _strip_cases():
        whole = full_resolution(fused, pan, ms, r, sensor, valid, per_band=True, strip_rows=10**6)
        for rows in (1, 200):  # one block (32 rows) at a time; a few strips
            streamed = full_resolution(fused, pan, ms, r, sensor, valid, per_band=True, strip_rows=rows)
            assert streamed["scored_fraction"] == whole["scored_fraction"], name
            if valid is not None:
                assert 0.3 < whole["scored_fraction"] < 0.99, name
            for key, value in whole.items():
                if key == "per_band":
                    for term, bands in value.items():
                        assert streamed[key][term] == pytest.approx(bands, rel=1e-12, abs=1e-12), (name, term)
                elif isinstance(value, float):
                    assert math.isfinite(value), (name, key)
                    assert streamed[key] == pytest.approx(value, rel=1e-12), (name, key)
