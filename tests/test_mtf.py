"""MTF kernel, degradation and interpolation against the reference toolbox, on real WorldView-3 data
(../shared) and the in-repository Landsat-8 example."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from conftest import example_pair, need_shared

from fusion_cli.errors import FusionError
from fusion_cli.mtf import degrade_ms, degrade_pan, mtf_filter, mtf_filter_decimate, mtf_kernel
from fusion_cli.resample import imresize_down, interp23, upsample_bicubic, upsample_ms
from fusion_cli.sensors import SENSORS, nyquist_gains

WV3_GAINS = [0.325, 0.355, 0.360, 0.350, 0.365, 0.360, 0.335, 0.315]


def _golden(name: str) -> np.ndarray:
    return np.load(need_shared("fusionmamba_official", "golden", name)).astype(np.float64)


def _wv3() -> tuple[np.ndarray, np.ndarray]:
    with (
        rasterio.open(need_shared("wv3_spacenet2", "pan.tif")) as p,
        rasterio.open(need_shared("wv3_spacenet2", "ms.tif")) as m,
    ):
        return p.read().astype(np.float64), m.read().astype(np.float64)


SOURCES = ["wv3", "landsat8-example"]


def _scene(source: str) -> tuple[np.ndarray, np.ndarray]:
    """pan (1, H, W), ms (C, h, w) float64: WV3 (8 bands, 1300 px) or the example (6 bands, 640 px)."""
    if source == "wv3":
        return _wv3()
    ex = example_pair()
    return ex.pan, ex.ms


def test_sensor_table() -> None:
    assert nyquist_gains("WV3", 8) == (WV3_GAINS, 0.14)
    assert nyquist_gains("QuickBird", 4) == ([0.34, 0.32, 0.30, 0.22], 0.15)
    assert nyquist_gains("wv2", 8)[0][-1] == 0.27 and nyquist_gains("wv2", 8)[1] == 0.11
    # a 4-band product of an 8-band WorldView sensor is B, G, R, NIR1
    assert nyquist_gains("wv3", 4)[0] == [0.355, 0.360, 0.365, 0.335]
    assert nyquist_gains("wv3", 3, bands=[2, 3, 5])[0] == [0.355, 0.360, 0.365]
    assert nyquist_gains(None, 5) == ([0.3] * 5, 0.15)
    assert nyquist_gains("landsat8", 4)[0] == [0.3] * 4
    with pytest.raises(FusionError, match="wv3"):
        nyquist_gains("spot9", 4)
    with pytest.raises(FusionError, match="--sensor-bands"):
        nyquist_gains("wv3", 6)
    assert {"wv3", "qb", "ikonos", "geoeye1", "wv4", "wv2", "landsat8", "sentinel2", "hyperion"} <= set(
        SENSORS
    )


def test_kernel_shape_and_response() -> None:
    h = mtf_kernel(0.36, 4)
    assert h.shape == (41, 41)
    np.testing.assert_allclose(h, h.T, atol=1e-15)
    np.testing.assert_allclose(h, h[::-1, ::-1], atol=1e-15)
    # fwind1 keeps the design's DC gain (no renormalisation): the sum is just under 1
    assert 0.997 < h.sum() < 1.0
    # the toolbox samples the Gaussian response on a 1/N grid with alpha set for N - 1 samples, so the
    # response at the true Nyquist 1/(2r) is G ** ((N / (N - 1)) ** 2): slightly below the table value
    t = np.arange(41) - 20
    response = float((h.sum(0) * np.cos(2 * np.pi * t / 8)).sum())
    assert response == pytest.approx(0.36 ** ((41 / 40) ** 2), abs=1e-3)


def test_degradation_matches_golden_ms() -> None:
    gt = _golden("b_gt.npy").transpose(2, 0, 1)
    expected = _golden("b_ms_lr.npy").transpose(2, 0, 1)
    ms_lr = degrade_ms(gt, nyquist_gains("wv3", 8)[0], 4)
    assert ms_lr.shape == (8, 80, 80)
    assert np.abs(ms_lr - expected).max() < 1e-3
    # torch float32 path and the strided filter agree to float precision
    t = degrade_ms(torch.from_numpy(gt)[None].float(), WV3_GAINS, 4)[0].double().numpy()
    assert np.abs(t - expected).max() < 2e-3
    s = mtf_filter_decimate(torch.from_numpy(gt)[None], WV3_GAINS, 4)[0].numpy()
    assert np.abs(s - expected).max() < 1e-3


def test_degradation_matches_golden_pan() -> None:
    pan, _ = _wv3()
    expected = _golden("b_pan_lr.npy")
    pan_lr = degrade_pan(pan[:, :1280, :1280], 4, mode="mtf", gain=nyquist_gains("wv3", 8)[1])
    assert pan_lr.shape == (1, 320, 320)
    assert np.abs(pan_lr[0] - expected).max() < 1e-3


@pytest.mark.parametrize(("source", "ratio"), [("wv3", 4), ("landsat8-example", 4), ("landsat8-example", 2)])
def test_measured_nyquist_gain_of_simulated_ms(source: str, ratio: int) -> None:
    """The MTF applied to real MS bands, measured from their spectra, is the table's gain within 0.02."""
    _, ms = _scene(source)
    n = 160 if source != "wv3" else 320
    ms = ms[:, :n, :n]
    gains = WV3_GAINS if source == "wv3" else nyquist_gains("landsat8", 6)[0]
    filtered = mtf_filter(ms, gains, ratio)
    win = np.outer(np.hanning(n), np.hanning(n))
    f = np.fft.fftfreq(n)
    # |f| = Nyquist of the `ratio` x coarser grid
    ring = np.abs(np.hypot(f[:, None], f[None, :]) - 1 / (2 * ratio)) < 0.5 / n
    for b, gain in enumerate(gains):
        x = np.abs(np.fft.fft2((ms[b] - ms[b].mean()) * win))
        y = np.abs(np.fft.fft2((filtered[b] - filtered[b].mean()) * win))
        measured = y[ring].sum() / x[ring].sum()
        assert abs(measured - gain) < 0.02, (b, measured, gain)
        assert abs(measured - gain ** ((41 / 40) ** 2)) < 0.006


@pytest.mark.parametrize("source", SOURCES)
def test_filter_input_kinds_and_fast_rank(source: str) -> None:
    _, ms = _scene(source)
    ms = ms[:3, :96, :96]
    exact = mtf_filter(ms, [0.3, 0.25, 0.35], 4)
    as_torch = mtf_filter(torch.from_numpy(ms)[None], [0.3, 0.25, 0.35], 4)[0].numpy()
    np.testing.assert_allclose(exact, as_torch, atol=1e-9)
    fast = mtf_filter(ms, [0.3, 0.25, 0.35], 4, rank=1)
    assert np.abs(fast - exact).max() < 1e-4 * ms.max()
    # replicate borders: a constant image stays constant (times the kernel's DC gain)
    const = mtf_filter(np.full((1, 50, 60), 1000.0), 0.3, 4)
    np.testing.assert_allclose(const, 1000.0 * mtf_kernel(0.3, 4).sum(), rtol=1e-9)
    with pytest.raises(FusionError):
        mtf_filter(ms, [0.3, 0.3], 4)
    with pytest.raises(FusionError):
        mtf_kernel(1.2, 4)


def test_interp23_reproduces_published_exp_figures() -> None:
    """The golden README's EXP figures (SAM 4.298, ERGAS 3.328) need the toolbox's 23-tap kernel,
    its phase and its circular borders: recomputed here with plain SAM/ERGAS definitions."""
    gt = _golden("b_gt.npy").transpose(2, 0, 1)
    lr = torch.from_numpy(_golden("b_ms_lr.npy").transpose(2, 0, 1))[None]
    up = interp23(lr, 4, pad_mode="circular")[0].numpy()
    cos = (up * gt).sum(0) / np.sqrt((up * up).sum(0) * (gt * gt).sum(0))
    sam = np.degrees(np.arccos(np.clip(cos, -1, 1))).mean()
    ergas = 25 * np.sqrt(np.mean(((up - gt) ** 2).mean((1, 2)) / gt.mean((1, 2)) ** 2))
    assert sam == pytest.approx(4.298, abs=5e-4)
    assert ergas == pytest.approx(3.328, abs=5e-4)
    # the default border handling only changes the borders
    default = upsample_ms(lr, 4)[0].numpy()
    np.testing.assert_allclose(default[:, 48:-48, 48:-48], up[:, 48:-48, 48:-48], atol=1e-9)


@pytest.mark.parametrize("source", SOURCES)
def test_interpolators_keep_samples_and_phase(source: str) -> None:
    _, ms = _scene(source)
    x = torch.from_numpy(ms[:, :40, :40])[None]
    c = x.shape[1]
    for ratio in (2, 4):
        up = interp23(x, ratio)
        assert up.shape == (1, c, 40 * ratio, 40 * ratio)
        # the 23-tap kernel is interpolating: LR sample k lands on HR index ratio*k + ratio//2
        torch.testing.assert_close(up[..., ratio // 2 :: ratio, ratio // 2 :: ratio], x)
    up3 = upsample_bicubic(x, 3)
    assert up3.shape == (1, c, 120, 120)
    torch.testing.assert_close(up3[..., 1::3, 1::3], x)
    with pytest.raises(FusionError):
        interp23(x, 3)


@pytest.mark.parametrize("source", SOURCES)
def test_imresize_down_is_antialiased_bicubic(source: str) -> None:
    pan, _ = _scene(source)
    x = torch.from_numpy(pan[:, :300, :300])[None]  # the example: 300 x 300
    # interior equals torch's antialiased bicubic (same kernel, same phase); only the border rule
    # differs. Ratio 3 was one input pixel off: its kernel's inner zero taps were dropped.
    for ratio in (3, 4):
        small = imresize_down(x, ratio)
        assert small.shape == (1, 1, 300 // ratio, 300 // ratio)
        ref = torch.nn.functional.interpolate(x, scale_factor=1 / ratio, mode="bicubic", antialias=True)
        torch.testing.assert_close(small[..., 3:-3, 3:-3], ref[..., 3:-3, 3:-3], rtol=0, atol=1e-6)
    assert torch.allclose(
        imresize_down(torch.full((1, 1, 40, 40), 7.0, dtype=torch.float64), 4), torch.tensor(7.0).double()
    )


@pytest.mark.parametrize("decimate", [False, True])
def test_whole_images_are_filtered_band_by_band_to_the_same_result(monkeypatch, decimate: bool) -> None:
    """Above `_BAND_AT_A_TIME_BYTES` of intermediates the MTF filter runs one band at a time (the
    full-resolution indices of a 1.5 Mpx Landsat-8 product peaked at 2.0 GB RSS, now 0.8): the same
    values as all bands at once, on the real WorldView-3 MS with its eight gains."""
    from fusion_cli import mtf

    with rasterio.open(need_shared("wv3_spacenet2", "ms.tif")) as ds:
        img = torch.from_numpy(ds.read().astype(np.float64))[None]
    gains = nyquist_gains("wv3", 8)[0]
    together = mtf._filter_torch(img, gains, 4, None, 41, decimate)
    monkeypatch.setattr(mtf, "_BAND_AT_A_TIME_BYTES", 0)
    by_band = mtf._filter_torch(img, gains, 4, None, 41, decimate)
    assert by_band.shape == together.shape
    torch.testing.assert_close(by_band, together, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (3, 3)])
@pytest.mark.parametrize("ratio", [2, 4])
def test_interp23_keeps_the_level_of_images_shorter_than_its_padding(shape, ratio) -> None:
    """Reflect padding reaches side - 1 samples; the half-band stages read zeros beyond, so a 1 x 1 MS
    came out at 60 % of its value and a one-row strip 22 % below (helper). The edge value extends it
    now: a constant stays constant, and a strip keeps its mean."""
    from fusion_cli.resample import interp23

    flat = interp23(torch.full((1, 1, *shape), 238.0, dtype=torch.float64), ratio)
    torch.testing.assert_close(flat, torch.full_like(flat, 238.0))
    strip = torch.rand((1, 1, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1
    assert abs(float(interp23(strip, ratio).mean() / strip.mean()) - 1) < 0.05
