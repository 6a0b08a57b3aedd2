"""Classical methods: each one's defining property, on real WorldView-2/3 pairs from ../shared/data and
on the in-repository Landsat-8 example (ratio 2, six bands, half a PAN pixel of misregistration)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import rasterio
import torch
from conftest import example_pair, need_shared

from fusion_cli.classical import METHODS, describe, make_method
from fusion_cli.errors import FusionError
from fusion_cli.fusers import Fuser
from fusion_cli.mtf import degrade_ms
from fusion_cli.resample import upsample_ms
from fusion_cli.sensors import nyquist_gains

STATS_METHODS = [name for name, cls in METHODS.items() if cls.needs_stats]


@pytest.mark.parametrize("command", ["pansharpen", "hisr"])
def test_fusion_help_cites_each_methods_paper(command: str, capsys, monkeypatch) -> None:
    """`fusion pansharpen --help` (and hisr's) lists every --method with its description and paper."""
    from fusion_cli.cli.main import main

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # click rewraps to the terminal, also at hyphens
    assert "Classicalmethods(--methodNAME):" in text
    for name in METHODS:
        assert "".join(f"{name}: {describe(name)}".split()) in text, name


@dataclass(frozen=True)
class Scene:
    """pan (1, 1, H, W), ms (1, C, H / ratio, W / ratio) float64 DN, the ratio and the sensor."""

    pan: torch.Tensor
    ms: torch.Tensor
    ratio: int
    sensor: str

    def method(self, name: str) -> Fuser:
        return make_method(name, self.ratio, self.sensor)


@pytest.fixture(scope="module", params=["wv2", "landsat8-example", "landsat8-example-r4"])
def scene(request: pytest.FixtureRequest) -> Scene:
    """WorldView-2 pair 1 (no nodata) cropped to 384 PAN px (pan 384 x 384, ms 4 x 96 x 96), or the
    in-repository Landsat-8 example's left half (pan 320 x 320, ms 6 x 160 x 160, ratio 2; or its MS
    reduced to 6 x 80 x 80, ratio 4)."""
    if request.param == "wv2":
        with (
            rasterio.open(need_shared("wv2_spacenet6", "pan_1.tif")) as p,
            rasterio.open(need_shared("wv2_spacenet6", "ms_1.tif")) as m,
        ):
            pan = p.read(window=((100, 484), (100, 484))).astype(np.float64)
            ms = m.read(window=((25, 121), (25, 121))).astype(np.float64)
        return Scene(torch.from_numpy(pan)[None], torch.from_numpy(ms)[None], 4, "wv2")
    ex = example_pair(160, 160, ratio=4 if request.param.endswith("r4") else 2)
    return Scene(torch.from_numpy(ex.pan)[None], torch.from_numpy(ex.ms)[None], ex.ratio, ex.sensor)


@pytest.fixture(scope="module")
def fused(scene: Scene) -> dict[str, np.ndarray]:
    pan, ms = scene.pan, scene.ms
    return {name: scene.method(name).fit(pan, ms).fuse(pan, ms)[0].double().numpy() for name in METHODS}


def test_registry() -> None:
    assert set(METHODS) == {
        "exp", "brovey", "gsa", "pca", "mtf-glp", "mtf-glp-hpm", "mtf-glp-fs", "bdsd-pc", "mtf-glp-hs"
    }  # fmt: skip
    for name in METHODS:
        f = make_method(name, 4, "wv3", ms_bands=8)
        assert isinstance(f, Fuser)
        assert f.ratio == 4 and f.pan_bands == 1 and f.ms_bands == 8
        assert f.halo % 4 == 0 and f.halo >= 44 and f.tile_multiple == 4
        text = describe(name)
        assert any(str(year) in text for year in range(1985, 2025)), text  # cites its paper
    with pytest.raises(FusionError, match="gsa"):
        make_method("ihs-magic", 4)
    with pytest.raises(FusionError, match="sensor"):
        make_method("gsa", 4, sensor="nosuch")
    f = make_method("gsa", 4)
    with pytest.raises(FusionError, match="statistics"):
        f.fuse(torch.zeros(1, 1, 64, 64), torch.zeros(1, 4, 16, 16))
    with pytest.raises(FusionError, match="not 4 x"):
        make_method("exp", 4).fuse(torch.zeros(1, 1, 64, 64), torch.zeros(1, 4, 15, 16))


def test_exp_is_the_interpolated_ms(scene: Scene, fused: dict[str, np.ndarray]) -> None:
    ms, r = scene.ms, scene.ratio
    # (float32 products: rounding is relative, 1e-3 DN of the example's ~10 000 DN would be 1e-7)
    np.testing.assert_allclose(fused["exp"], upsample_ms(ms, r)[0].numpy(), atol=1e-3, rtol=1e-6)
    # and interpolation keeps every MS sample on its PAN-grid position
    np.testing.assert_allclose(fused["exp"][:, r // 2 :: r, r // 2 :: r], ms[0].numpy(), atol=1e-3, rtol=1e-6)


# Mean injected detail against the interpolated MS's mean: ratio 2 leaves half the frequencies to
# inject, over Landsat's large dark level (measured 0.015-0.046 on the example; 0.12-0.28 on WV2).
DETAIL_RANGE = {"wv2": (0.05, 0.6), "landsat8": (0.01, 0.1)}


def test_every_method_injects_pan_detail(scene: Scene, fused: dict[str, np.ndarray]) -> None:
    exp = fused["exp"]
    lo, hi = DETAIL_RANGE[scene.sensor]
    for name, out in fused.items():
        assert out.shape == exp.shape and np.isfinite(out).all(), name
        if name != "exp":
            detail = np.abs(out - exp).mean()
            assert lo * exp.mean() < detail < hi * exp.mean(), (name, detail)


@pytest.mark.parametrize("name", ["mtf-glp", "mtf-glp-fs", "mtf-glp-hpm", "mtf-glp-hs"])
def test_mra_methods_keep_the_low_pass_content(name: str, scene: Scene, fused: dict[str, np.ndarray]) -> None:
    """MTF-filtering and decimating the product gives back (about) the input MS: the injected detail
    lives above the MS band, so the product is no further from the MS than plain interpolation."""
    ms, r = scene.ms[0].numpy(), scene.ratio
    gains = nyquist_gains(scene.sensor, ms.shape[0])[0]
    inner = (slice(None), slice(8, -8), slice(8, -8))
    err_method = np.abs(degrade_ms(fused[name], gains, r) - ms)[inner].mean()
    err_exp = np.abs(degrade_ms(fused["exp"], gains, r) - ms)[inner].mean()
    assert err_method < 1.25 * err_exp, (err_method, err_exp)
    assert err_method < 0.15 * ms.mean()
    # most of the injected detail is removed by the sensor MTF (it is high-pass)
    detail = fused[name] - fused["exp"]
    low_detail = degrade_ms(detail, gains, r)
    assert np.sqrt((low_detail[inner] ** 2).mean() / (detail[:, 32:-32, 32:-32] ** 2).mean()) < 0.4


def test_brovey_preserves_haze_corrected_band_ratios(scene: Scene) -> None:
    pan, ms = scene.pan, scene.ms
    f = scene.method("brovey").fit(pan, ms)
    x = upsample_ms(ms, scene.ratio)[0].numpy()
    out = f.fuse(pan, ms)[0].double().numpy()
    haze = f.haze.numpy()[:, None, None]
    assert (haze > 0).all() and (haze[:, 0, 0] < ms[0].numpy().mean((1, 2))).all()
    # 5 DN above the haze level, or 1 % of it: float32 products of ~10 000 DN (Landsat) round by
    # 1e-3 DN, which a difference of a few DN would blow up past the tolerance
    ok = (x > haze + max(5.0, 0.01 * float(haze.max()))).all(0)
    assert ok.mean() > 0.9
    src = (x - haze)[:, ok]
    dst = (out - haze)[:, ok]
    # every band is scaled by the same factor per pixel: ratios between bands are unchanged
    np.testing.assert_allclose(dst[1:] / dst[0], src[1:] / src[0], rtol=1e-4)


@pytest.mark.parametrize("scene", ["wv2"], indirect=True)
def test_hpm_modulates_instead_of_adding(fused: dict[str, np.ndarray]) -> None:
    """HPM multiplies each band by P / P_low: spectral angles to the interpolated MS stay smaller than
    with additive injection of the same detail. (WV2 only: over the example's Landsat dark level of
    ~7000 DN a modulation and an addition of the same small detail turn the angles alike.)"""

    def median_sam(a: np.ndarray, b: np.ndarray) -> float:
        cos = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
        return float(np.median(np.degrees(np.arccos(np.clip(cos, -1, 1)))))

    assert median_sam(fused["mtf-glp-hpm"], fused["exp"]) < 0.7 * median_sam(fused["mtf-glp"], fused["exp"])


@pytest.mark.parametrize("name", ["gsa", "pca", "brovey"])
def test_component_substitution_with_pan_equal_to_intensity(name: str, scene: Scene) -> None:
    """With the PAN replaced by the MS's own intensity component there is nothing to inject."""
    pan, ms = scene.pan, scene.ms
    f = scene.method(name).fit(pan, ms)
    x = upsample_ms(ms, scene.ratio)
    out = f.fuse(f.intensity(x), ms)[0].double()
    x = x[0]
    keep = torch.ones_like(x[0], dtype=torch.bool)
    if name == "brovey":  # BT-H clamps bands below their haze level; compare where it does not
        keep = (x > f.haze.view(-1, 1, 1)).all(0)
    assert (out - x).abs()[:, keep].max() < 1e-3 * x.mean()


@pytest.mark.parametrize("name", ["gsa", "pca", "brovey"])
def test_a_constant_band_changes_no_other_band(name: str) -> None:
    """Constant bands (Hyperion's uncalibrated bands are zeros; a saturated or fill band is another
    value) carry no intensity: the other bands fuse as without them. GSA's regression went singular
    and its product became the interpolated MS (exit 0, no warning)."""
    ex = example_pair(160, 160, ratio=2)
    pan, ms = torch.from_numpy(ex.pan)[None], torch.from_numpy(ex.ms)[None]
    flat = torch.ones_like(ms[:, :1])
    padded = torch.cat([0 * flat, ms, 5000 * flat], dim=1)
    plain = make_method(name, ex.ratio, ex.sensor).fit(pan, ms).fuse(pan, ms)[0]
    with_flat = make_method(name, ex.ratio, ex.sensor).fit(pan, padded).fuse(pan, padded)[0]
    assert (with_flat[1:-1] - plain).abs().max() < 1e-3 * plain.mean()
    assert with_flat[0].abs().max() == 0 and (with_flat[-1] - 5000).abs().max() < 0.01


def _tiled_stats(scene: Scene, name: str, size: int, tile: int) -> tuple[object, object]:
    """The scene's top-left `size` PAN px, padded, accumulated whole and as non-overlapping tiles with
    `halo` of context."""
    r = scene.ratio
    pan, ms = scene.pan[..., :size, :size], scene.ms[..., : size // r, : size // r]
    whole, tiled = scene.method(name), scene.method(name)
    h = whole.stats_halo
    pp = torch.nn.functional.pad(pan, (h, h, h, h), mode="reflect")
    mp = torch.nn.functional.pad(ms, (h // r,) * 4, mode="reflect")
    valid = torch.zeros_like(pp, dtype=torch.bool)
    valid[..., h : h + size, h : h + size] = True
    whole.accumulate(pp, mp, valid)
    for y in range(0, size, tile):
        for x in range(0, size, tile):
            pw = pp[..., y : y + tile + 2 * h, x : x + tile + 2 * h]
            mw = mp[..., y // r : (y + tile + 2 * h) // r, x // r : (x + tile + 2 * h) // r]
            v = torch.zeros_like(pw, dtype=torch.bool)
            v[..., h : h + tile, h : h + tile] = True
            tiled.accumulate(pw, mw, v, origin=(y, x))
    whole.finalize()
    tiled.finalize()
    return whole, tiled


@pytest.mark.parametrize("name", STATS_METHODS)
def test_streamed_statistics_equal_whole_image(name: str, scene: Scene) -> None:
    pan, ms = scene.pan[..., :256, :256], scene.ms[..., : 256 // scene.ratio, : 256 // scene.ratio]
    whole, tiled = _tiled_stats(scene, name, 256, tile=128)
    a = whole.fuse(pan, ms).double()
    b = tiled.fuse(pan, ms).double()
    assert (a - b).abs().max() < 1e-3 * a.abs().mean(), name


def test_reduced_resolution_quality_on_wv3() -> None:
    """Wald protocol on the golden WV3 case: every detail-injection method beats interpolation on
    ERGAS (PCA is the known exception for 8-band WorldView-3: PC1 is a poor match of the PAN)."""
    from fusion_cli.metrics import ergas, sam

    golden = need_shared("fusionmamba_official", "golden")
    # a 192 x 192 corner keeps the test quick; the whole 320 x 320 case ranks the methods the same way
    gt = np.load(golden / "b_gt.npy").astype(np.float64).transpose(2, 0, 1)[:, :192, :192]
    ms = torch.from_numpy(np.load(golden / "b_ms_lr.npy").astype(np.float64).transpose(2, 0, 1))[None]
    ms = ms[..., :48, :48]
    pan = torch.from_numpy(np.load(golden / "b_pan_lr.npy").astype(np.float64))[None, None, :192, :192]
    scores = {}
    for name in METHODS:
        out = make_method(name, 4, "wv3").fit(pan, ms).fuse(pan, ms)[0].double().numpy()
        scores[name] = (ergas(gt, out, 4), sam(gt, out))
    for name, (e, s) in scores.items():
        if name not in {"exp", "pca"}:
            assert e < 0.9 * scores["exp"][0], (name, e)
            assert s < scores["exp"][1] + 0.2, (name, s)


def test_hypersharpening_uses_every_msi_band() -> None:
    """HISR on the real Paris Hyperion (128 bands) + ALI MSI (9 bands) pair, the HSI reduced by 3 with
    the Hyperion MTF: a synthetic PAN regressed per band from the nine MSI bands (mtf-glp-hs) beats
    the same injection driven by the MSI band mean (mtf-glp-hpm) on SAM and ERGAS, and both beat
    interpolation."""
    from fusion_cli.metrics import ergas, sam

    with (
        rasterio.open(need_shared("eo1_hyperion_ali_paris", "hs_for_ms.tif")) as h,
        rasterio.open(need_shared("eo1_hyperion_ali_paris", "ms.tif")) as m,
    ):
        ref = h.read().astype(np.float64)  # (128, 72, 72)
        msi = torch.from_numpy(m.read().astype(np.float64))[None]  # (1, 9, 72, 72)
    hs = torch.from_numpy(degrade_ms(ref, nyquist_gains("hyperion", 128)[0], 3))[None]
    scores = {}
    for name in ("exp", "mtf-glp-hpm", "mtf-glp-hs"):
        f = make_method(name, 3, "hyperion", pan_bands=9)
        out = np.clip(f.fit(msi, hs).fuse(msi, hs)[0].double().numpy(), 0, None)
        scores[name] = (sam(ref, out), ergas(ref, out, 3))
    assert scores["mtf-glp-hs"][0] < 0.9 * scores["mtf-glp-hpm"][0], scores
    assert scores["mtf-glp-hs"][1] < 0.9 * scores["mtf-glp-hpm"][1], scores
    assert scores["mtf-glp-hpm"][1] < scores["exp"][1], scores


def test_brovey_haze_on_a_small_hyperspectral_scene_keeps_a_positive_intensity() -> None:
    """BT-H on thirds of the Paris Hyperion/ALI pair at reduced resolution (128 bands on 8 x 16 MS
    px): the free least-squares intensity weights are ill-posed there (weights of +-200, an intensity
    within one std of zero, ERGAS 273 and 391); the non-negative fit keeps BT-H within reach of
    interpolation (a ratio method injects the visible PAN's detail into the SWIR bands too), and it
    equals SciPy's NNLS on the same normal equations."""
    from scipy.optimize import nnls

    from fusion_cli.classical.component import nonneg_lstsq
    from fusion_cli.metrics import ergas
    from fusion_cli.training.data import load_scene, reduce_scene

    d = need_shared("eo1_hyperion_ali_paris")
    scene = load_scene(d / "pan.tif", d / "hs.tif", ratio=3, dn_max=1.0, sensor="hyperion")
    for third in (0, 1):
        p = reduce_scene(scene.crop_rows(third / 3, (third + 1) / 3), 3, "hs-pansharpening")
        pan = torch.from_numpy(p.pan[:, :, :48].astype(np.float64))[None]
        ms = torch.from_numpy(p.ms[:, :, :16].astype(np.float64))[None]
        ref = p.ref[:, :, :48]
        f = make_method("brovey", 3, "hyperion").fit(pan, ms)
        assert f.mean_i > 0 and bool((f.alpha >= 0).all())  # the non-negative fit took over
        out = f.fuse(pan, ms)[0].numpy()
        e = ergas(ref, np.clip(out, 0, None), 3)
        e_exp = ergas(ref, make_method("exp", 3).fuse(pan, ms)[0].numpy(), 3)
        assert np.isfinite(out).all() and e < 1.2 * e_exp, (third, e, e_exp)  # 5.85 / 5.18, 6.14 / 5.90

    rng = np.random.default_rng(0)
    x = rng.random((300, 40))
    y = x @ np.abs(rng.normal(size=40)) + rng.normal(size=300)
    a = nonneg_lstsq(torch.from_numpy(x.T @ x), torch.from_numpy(x.T @ y)).numpy()
    np.testing.assert_allclose(a, nnls(x, y)[0], atol=1e-8)


@pytest.fixture(scope="module")
def example_reduced() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Wald's protocol on the in-repository example: pan (1, 1, 160, 320), ms (1, 6, 80, 160) reduced
    by 2 with the Landsat-8 MTF, and the original MS (6, 160, 320) as the reference."""
    from fusion_cli.wald import simulate_arrays

    ex = example_pair()
    pan_lr, ms_lr, ref = simulate_arrays(ex.pan, ex.ms, ex.ratio, ex.sensor)
    return torch.from_numpy(pan_lr)[None], torch.from_numpy(ms_lr)[None], ref


@pytest.mark.parametrize("name", ["mtf-glp", "mtf-glp-hpm", "mtf-glp-fs", "bdsd-pc", "mtf-glp-hs"])
def test_mra_and_bdsd_beat_interpolation_at_reduced_resolution_on_the_example(
    name: str, example_reduced: tuple[torch.Tensor, torch.Tensor, np.ndarray]
) -> None:
    """MTF-matched injection (and BDSD's per-band least squares) beats plain interpolation on ERGAS
    and SAM at reduced resolution, also with the SWIR bands the PAN does not cover (measured ERGAS
    2.05-2.25 against 2.38). Brovey and PCA, which inject the one PAN intensity into SWIR too, do not
    on this scene, which is why they are not listed."""
    from fusion_cli.metrics import ergas, sam

    pan, ms, ref = example_reduced
    exp = make_method("exp", 2).fuse(pan, ms)[0].double().numpy()
    out = make_method(name, 2, "landsat8").fit(pan, ms).fuse(pan, ms)[0].double().numpy()
    assert ergas(ref, out, 2) < 0.97 * ergas(ref, exp, 2)
    assert sam(ref, out) < sam(ref, exp)


def test_bdsd_nnls_equals_scipy() -> None:
    """BDSD-PC's own NNLS (no scipy.optimize import at start-up) finds scipy's solution: square upper
    triangular systems like its Cholesky factors, and tall ones, with active and inactive bounds."""
    from scipy.optimize import nnls as scipy_nnls

    from fusion_cli.classical.bdsd import nnls

    rng = np.random.default_rng(0)
    bound = 0
    for trial in range(300):
        n = int(rng.integers(2, 30))
        a = rng.standard_normal((n if trial % 2 else 2 * n, n))
        if trial % 3 == 0:
            a = np.triu(a[:n]) + np.eye(n)
        b = rng.standard_normal(a.shape[0]) * 10.0 ** rng.integers(-3, 4)
        got, expected = nnls(a, b), scipy_nnls(a, b)[0]
        assert (got >= 0).all()
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
        bound += int((expected == 0).any())
    assert bound > 100  # the bounds were active in many of them
