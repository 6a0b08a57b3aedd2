"""The pipeline's statistics pass sees each tile with its halo: tiled and one-window fusion agree.

Before the fix the first pass read only each tile's core, so the methods' filters saw an artificial
border at every tile edge and the global statistics moved (up to 17 DN for MTF-GLP on WV2 with
128-px tiles). Each check fuses the real WorldView-2 pair (../shared) and the in-repository Landsat-8
example (ratio 2) with 128-px tiles and as one window.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from conftest import example_pair, have_shared, need_shared

from fusion_cli import align
from fusion_cli.classical import METHODS, make_method
from fusion_cli.pipeline import FuseOptions, fuse_arrays
from fusion_cli.pipeline.engine import plan_for
from fusion_cli.pipeline.readers import PairSource, array_reader
from fusion_cli.pipeline.stats import gather_stats

SOURCES = ["wv2", "landsat8-example", "landsat8-example-r4"]


def _wv2(size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    with (
        rasterio.open(need_shared("wv2_spacenet6", "pan_1.tif")) as p,
        rasterio.open(need_shared("wv2_spacenet6", "ms_1.tif")) as m,
    ):
        pan = p.read(1)[:size, :size].astype(np.float32)
        ms = m.read()[:, : size // 4, : size // 4].astype(np.float32)
    return pan, ms


def _pair(source: str, size: int) -> tuple[np.ndarray, np.ndarray, int, str]:
    """pan (size, size), ms (C, size / r, size / r) float32, ratio r and sensor: the WV2 pair, or the
    example (at most 320 PAN px square; `-r4`: its MS reduced to ratio 4)."""
    if source == "wv2":
        return (*_wv2(size), 4, "wv2")
    side = min(size, 320) // 2
    ex = example_pair(side, side, ratio=4 if source.endswith("r4") else 2)
    return ex.pan[0].astype(np.float32), ex.ms.astype(np.float32), ex.ratio, ex.sensor


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", ["mtf-glp", "gsa", "brovey", "bdsd-pc", "mtf-glp-fs", "mtf-glp-hs"])
def test_tiled_statistics_equal_one_window(name: str, source: str) -> None:
    pan, ms, r, sensor = _pair(source, 512)
    geom = align.relate_shapes(pan.shape, ms.shape[-2:], r)
    pair = PairSource(geom, array_reader(pan[None], None), array_reader(ms, None))
    fits = []
    for tile in (128, 1024):
        f = make_method(name, r, sensor)
        gather_stats(f, pair, plan_for(f, geom, FuseOptions(tile=tile)))
        fits.append(f)
    tiled, whole = fits
    # every scene pixel is counted once in both
    n_t = tiled._hr if name == "gsa" else tiled._moments
    n_w = whole._hr if name == "gsa" else whole._moments
    lr = name in ("bdsd-pc", "mtf-glp-hs")  # statistics on the MS grid
    assert n_t.n == n_w.n == (pan.size // r**2 if lr else pan.size)
    np.testing.assert_allclose(n_t.s.numpy(), n_w.s.numpy(), rtol=1e-6)
    np.testing.assert_allclose(n_t.ss.numpy(), n_w.ss.numpy(), rtol=1e-6)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", list(METHODS))
def test_tiled_output_matches_one_window(name: str, source: str) -> None:
    """Default tiling (no blend zone for classical methods, each pass with its own halo) against one
    window: every pixel of a tile sees the context its filters need."""
    pan, ms, r, sensor = _pair(source, 512)
    out = []
    for tile in (128, 1024):
        fuser = make_method(name, r, sensor)
        out.append(fuse_arrays(pan, ms, fuser, FuseOptions(tile=tile)))
    assert fuser.preferred_overlap == 0
    # the statistics are identical; what is left is float32 rounding of the per-tile arithmetic
    # (amplified by the ratio methods where they divide by a small low-pass)
    assert (np.abs(out[0] - out[1]) <= 0.05 + 1e-4 * np.abs(out[1])).all(), name
    assert np.abs(out[1]).max() > 100  # a real fused image, not an empty one


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", ["mtf-glp-hpm", "mtf-glp-fs", "gsa", "pca", "brovey", "bdsd-pc"])
def test_parallel_windows_equal_sequential(name: str, source: str) -> None:
    """Classical windows fused concurrently (one single-threaded window per torch thread, statistics
    accumulated by per-thread copies and merged) match one thread doing everything in order: the
    merged sums differ by float64 rounding only."""
    pan, ms, r, sensor = _pair(source, 384)
    previous = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 3):  # 3: an uneven split of the 9 windows
            torch.set_num_threads(threads)
            opts = FuseOptions(tile=128)
            out.append(fuse_arrays(pan, ms, make_method(name, r, sensor), opts))
    finally:
        torch.set_num_threads(previous)
    # float32 rounding (the sequential run fuses windows in batches of 4): 0.01 DN, or 1e-4 relative
    # where a ratio method amplifies it (HPM divides by a low-pass near its floor on dark pixels: 5
    # pixels differ by 2e-5, up to 0.08 DN at 10 868 DN); a miscounted window moves whole bands by %
    assert (np.abs(out[0] - out[1]) <= 0.01 + 1e-4 * np.abs(out[0])).all()
    assert np.abs(out[0]).max() > 100
    assert torch.get_num_threads() == previous


def test_quantile_sample_merge_is_a_sample_of_the_union() -> None:
    """Two bounded samples pooled keep `capacity` rows drawn from both, and percentiles stay exact
    while the union fits."""
    from fusion_cli.classical.base import QuantileSample

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 1000, (3000, 2)), rng.integers(5000, 6000, (3000, 2))
    big = QuantileSample(capacity=10_000)
    big.add(torch.from_numpy(a))
    other = QuantileSample(capacity=10_000)
    other.add(torch.from_numpy(b))
    big.merge(other)
    both = np.concatenate([a, b]).astype(np.float64)
    pos = 0.5 * 6000 / 100 * 100 - 0.5  # the median by prctile's rule
    lo = int(np.floor(pos))
    expect = np.sort(both, 0)[lo] + (pos - lo) * (np.sort(both, 0)[lo + 1] - np.sort(both, 0)[lo])
    np.testing.assert_allclose(big.percentile(50).numpy(), expect)
    small = QuantileSample(capacity=1000)
    small.add(torch.from_numpy(a))
    other = QuantileSample(capacity=1000)
    other.add(torch.from_numpy(b))
    small.merge(other)
    assert small.values is not None and small.values.shape[0] == 1000
    from_b = int((small.values[:, 0] >= 5000).sum())
    assert 350 < from_b < 650  # about half of the pooled sample comes from each part


def test_stats_windows_is_a_spread_subgrid() -> None:
    """--stats-mpx reads a regular sub-grid of tiles (every s-th tile row and column), all of them
    when the cap covers the scene, and refuses a non-positive cap."""
    from fusion_cli.errors import FusionError
    from fusion_cli.pipeline import stats_windows
    from fusion_cli.tiling import plan_tiles

    plan = plan_tiles(2048, 2048, tile=256, overlap=32, halo=32, multiple=4)  # 8 x 8 tiles
    assert len(stats_windows(plan, None)) == 64
    assert len(stats_windows(plan, 100.0)) == 64
    sub = stats_windows(plan, 0.3)  # 5 tiles wanted: every 4th row and column from the 2nd
    assert [(w.core_row, w.core_col) for w in sub] == [(r, c) for r in (512, 1536) for c in (512, 1536)]
    with pytest.raises(FusionError, match="--stats-mpx must be positive"):
        stats_windows(plan, 0.0)


@pytest.mark.parametrize("name", ["gsa", "mtf-glp-fs", "bdsd-pc"])
def test_sampled_statistics_approximate_the_exact_ones(name: str) -> None:
    """A quarter of a real WorldView-3 scene's tiles (1024 px, 256-px tiles, --stats-mpx 0.3) gives
    statistics within 1 % mean absolute difference of the whole-scene ones in the fused product; without
    ../shared, a fifth of the example's (320 x 640 px, 64-px tiles, --stats-mpx 0.05: 10 of 50)."""
    if have_shared("wv3_spacenet2"):
        with (
            rasterio.open(need_shared("wv3_spacenet2", "pan.tif")) as p,
            rasterio.open(need_shared("wv3_spacenet2", "ms.tif")) as m,
        ):
            pan = p.read(1)[:1024, :1024].astype(np.float32)
            ms = m.read()[:, :256, :256].astype(np.float32)
        r, sensor, tile, mpx = 4, "wv3", 256, 0.3
    else:
        ex = example_pair()
        pan, ms, r, sensor = ex.pan[0].astype(np.float32), ex.ms.astype(np.float32), ex.ratio, ex.sensor
        tile, mpx = 64, 0.05
    exact, sampled = (
        fuse_arrays(pan, ms, make_method(name, r, sensor), FuseOptions(tile=tile, stats_mpx=cap))
        for cap in (None, mpx)
    )
    rel = np.abs(exact - sampled).mean() / np.abs(exact).mean()
    assert 0 < rel < 0.01  # different (a sample), close (a representative one)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("ratio", [4, 3])
def test_axis_matrices_reproduce_the_interpolators(ratio: int, source: str) -> None:
    """`axis_matrix` is the interpolator itself along one axis, borders included: A_h m A_w^T equals
    upsample_ms(m), and with `down=True` imresize_down(upsample_ms(m)), on real MS bands."""
    from fusion_cli.resample import axis_matrix, imresize_down, upsample_ms

    _, ms, _, _ = _pair(source, 256)
    m = torch.from_numpy(ms[:2, :40, :52]).double()[None]  # a non-square window
    up = upsample_ms(m, ratio)[0]
    assert torch.allclose(axis_matrix(40, ratio) @ m[0] @ axis_matrix(52, ratio).T, up, atol=1e-9)
    back = imresize_down(upsample_ms(m, ratio), ratio)[0]
    a_h, a_w = axis_matrix(40, ratio, down=True), axis_matrix(52, ratio, down=True)
    assert torch.allclose(a_h @ m[0] @ a_w.T, back, atol=1e-9)
    assert (up - up.mean()).abs().max() > 100  # real texture, not a flat test image


@pytest.mark.parametrize("source", SOURCES)
def test_interp_moments_equal_the_direct_sums(source: str) -> None:
    """Moments of [interpolated MS, PAN features] from the MS-grid products equal those summed over
    the interpolated window: on a window whose valid box is a core, and (direct path) with holes."""
    from fusion_cli.classical.base import add_interp_moments, add_moments
    from fusion_cli.resample import upsample_ms

    pan, ms, r, _ = _pair(source, 256)
    p = torch.from_numpy(pan)[None, None]
    m = torch.from_numpy(ms)[None]
    valid = torch.zeros_like(p, dtype=torch.bool)
    valid[..., 44:212, 40:200] = True
    holed = valid.clone()
    holed[..., 100:110, 90:95] = False
    for v in (valid, holed):
        for full in (True, False):
            fast = add_interp_moments(None, m, [p, p.sqrt()], v, r, full=full)
            direct = add_moments(None, [upsample_ms(m, r), p, p.sqrt()], v, full=full)
            assert fast.n == direct.n == int(v.sum())
            torch.testing.assert_close(fast.s, direct.s, rtol=1e-6, atol=0)
            torch.testing.assert_close(fast.ss, direct.ss, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("height", "width", "default", "tile_512"), [(320, 640, 1, 2), (640, 640, 1, 4), (644, 300, 2, 2)]
)
def test_default_plan_fuses_a_scene_slightly_larger_than_the_tile_in_one_window(
    height: int, width: int, default: int, tile_512: int
) -> None:
    """With no --tile, a scene up to 1.25x the fuser's preferred tile (512 for the classical methods)
    is one window (the 320 x 640 example: a quarter fewer pixels computed than 512 + a 128-px sliver);
    beyond it, the preferred tile is kept; an explicit --tile is always obeyed."""
    r = 2
    geom = align.relate_shapes((height, width), (height // r, width // r), r)
    f = make_method("gsa", r, "landsat8")
    assert f.preferred_tile == 512
    assert plan_for(f, geom, FuseOptions()).count == default
    assert plan_for(f, geom, FuseOptions(tile=512)).count == tile_512


def test_bt_h_haze_does_not_depend_on_the_tiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """BT-H's haze is a percentile of a bounded pixel sample; keyed by scene position, the sample is the
    same for 64-px tiles and one window, so the products are identical. The example's B, G, R, NIR
    (204 800 PAN px) with the sample bounded at 20 000 rows, as a large scene is at 500 000: with keys
    drawn in window order the two hazes differed by up to 1.8 DN and the products by up to 11.7 DN."""
    from fusion_cli.classical import base

    monkeypatch.setattr(base, "SAMPLE_CAPACITY", 20_000)
    # the haze is read from the fuser the pipeline fitted (by default it fits a copy, `scene_fuser`)
    monkeypatch.setattr("fusion_cli.pipeline.api.scene_fuser", lambda fuser: fuser)
    ex = example_pair()
    pan, ms = ex.pan[0].astype(np.float32), ex.ms[:4].astype(np.float32)
    hazes, products = [], []
    for tile in (64, 320):
        fuser = make_method("brovey", ex.ratio, ex.sensor)
        products.append(fuse_arrays(pan, ms, fuser, FuseOptions(tile=tile)))
        assert fuser._quant.values is not None and fuser._quant.values.shape[0] == 20_000  # a sample
        hazes.append(fuser.haze)
    torch.testing.assert_close(hazes[0], hazes[1], rtol=1e-9, atol=0)
    np.testing.assert_array_equal(products[0], products[1])


def test_a_stats_sample_on_nodata_falls_back_to_the_scene() -> None:
    """`--stats-mpx` estimates a method's statistics from a sub-grid of windows; when those fell in a
    hole of the MS, the run failed with "no valid pixel to fuse: the inputs are all nodata" though 96 %
    of the scene was valid. The rest of the scene now gives the statistics."""
    ex = example_pair()
    valid = np.ones(ex.ms.shape[1:], bool)
    valid[120:, 120:170] = False  # MS px: the sampled window (PAN rows/cols 256-320) lies in it
    for method in ("gsa", "bdsd-pc", "mtf-glp-fs"):
        fused = [
            fuse_arrays(ex.pan, ex.ms, make_method(method, ex.ratio, ex.sensor),
                        FuseOptions(tile=64, stats_mpx=mpx), ms_valid=valid)
            for mpx in (0.004, None)
        ]  # fmt: skip
        np.testing.assert_allclose(fused[0], fused[1], rtol=1e-5, atol=1e-2)
