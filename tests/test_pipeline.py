"""pipeline: real pairs in, georeferenced product out, with local test fusers (the network has its own
test at the end, driven by the official WV3 checkpoint when it is available)."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import EXAMPLE_MS, EXAMPLE_PAN, have_shared, need_shared, write_example_crop
from pipeline_fusers import DetailFuser, FailingFuser, RepeatFuser, StatsFuser
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from scipy import ndimage

from fusion_cli import raster
from fusion_cli.errors import FusionError
from fusion_cli.pipeline import FuseOptions, fuse_arrays, fuse_files


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as ds:
            return ds.read()


def _write(path, data, **kw):
    with rasterio.open(
        path, "w", driver="GTiff", count=data.shape[0], height=data.shape[1], width=data.shape[2],
        dtype=str(data.dtype), **kw,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


@dataclass(frozen=True)
class PairFiles:
    """A real PAN/MS pair on disk: its ratio, MS band count and the product's (height, width)."""

    pan: Path
    ms: Path
    ratio: int
    bands: int
    out_shape: tuple[int, int]


@pytest.fixture(params=["wv2", "landsat8-example"])
def pair(request: pytest.FixtureRequest) -> PairFiles:
    """WorldView-2 pair 1 from ../shared (ratio 4, exact grids), or the in-repository Landsat-8
    example (ratio 2; the product lacks the PAN's half-covered first row and column)."""
    if request.param == "wv2":
        pan, ms = need_shared("wv2_spacenet6", "pan_1.tif"), need_shared("wv2_spacenet6", "ms_1.tif")
        return PairFiles(pan, ms, 4, 4, (600, 600))
    return PairFiles(EXAMPLE_PAN, EXAMPLE_MS, 2, 6, (319, 639))


@pytest.mark.parametrize("source", ["landsat8_oli", "landsat8-example"])
def test_landsat8_output_is_the_pan_grid_over_the_common_area(tmp_path, source):
    """The whole Landsat-8 scene of ../shared (PAN 1207 x 1254, 4 bands) or the in-repository crop of
    another one (PAN 320 x 640, 6 bands): the half-covered first PAN row and column and any extra
    PAN row fall outside the MS."""
    if source == "landsat8_oli":
        pan, ms = need_shared("landsat8_oli", "l8_B8.tif"), need_shared("landsat8_oli", "ms.tif")
        shape = (4, 1205, 1253)
    else:
        pan, ms, shape = EXAMPLE_PAN, EXAMPLE_MS, (6, 319, 639)
    before = (_sha(pan), _sha(ms))
    out = tmp_path / "l8.tif"
    s = fuse_files(pan, ms, out, DetailFuser(2), FuseOptions())
    assert (_sha(pan), _sha(ms)) == before  # inputs untouched
    with rasterio.open(pan) as p, rasterio.open(ms) as m, rasterio.open(out) as o:
        assert o.crs == p.crs and o.res == p.res
        assert (o.count, o.height, o.width) == shape
        # The output transform is the PAN's, moved by a whole number of PAN pixels.
        col, row = ~p.transform * (o.transform.c, o.transform.f)
        assert (col, row) == (1.0, 1.0)
        assert o.dtypes == m.dtypes
        assert o.descriptions == m.descriptions
        tags = o.tags()
        assert tags["FUSION_MODEL"] == "detail" and tags["FUSION_PAN"] == str(pan.resolve())
        assert json.loads(tags["FUSION_PARAMS"])["ratio"] == 2 and "FUSION_VERSION" in tags
        assert o.block_shapes[0] == (256, 256) and o.compression is not None
        fused = o.read().astype(np.float64)
        ref = m.read().astype(np.float64)
    assert raster.is_complete_output(out)
    # Radiometry is preserved: band means within 1 % of the MS band means.
    np.testing.assert_allclose(fused.mean(axis=(1, 2)), ref.mean(axis=(1, 2)), rtol=0.01)
    assert s.shape == shape and s.ratio == 2 and s.valid_fraction == 1.0
    assert s.shift_measured is not None and not s.shift_applied
    json.dumps(s.to_dict())


def test_half_pixel_placement_follows_the_transforms(tmp_path):
    """A linear ramp in world coordinates on a Landsat-like grid (PAN offset by half a PAN pixel):
    the MS fed to the fuser at each block must equal the ramp at that block's centre."""
    x0, y0 = 452475.0, 3408645.0
    jj, ii = np.meshgrid(np.arange(60), np.arange(50))
    xw, yw = x0 + 30 * (jj + 0.5), y0 - 30 * (ii + 0.5)
    ms = np.stack([1000 + 0.5 * (xw - x0) + 0.25 * (y0 - yw), 500 + 0.1 * (xw - x0)]).astype(np.float32)
    ms_path = _write(tmp_path / "ms.tif", ms, crs="EPSG:32616", transform=from_origin(x0, y0, 30, 30))
    pan = np.random.default_rng(0).random((1, 101, 120), np.float32)  # the fuser ignores it; not constant
    pan_path = _write(
        tmp_path / "pan.tif", pan, crs="EPSG:32616", transform=from_origin(x0 - 7.5, y0 + 7.5, 15, 15)
    )
    out = tmp_path / "o.tif"
    fuse_files(pan_path, ms_path, out, RepeatFuser(2), FuseOptions(tile=32, overlap=0, measure_shift=False))
    with rasterio.open(out) as o:
        got, t = o.read(), o.transform
    r, c = np.meshgrid(np.arange(got.shape[1]), np.arange(got.shape[2]), indexing="ij")
    # Block centre of each output pixel (blocks are 2x2 from the output origin), in world coordinates.
    xc = t.c + t.a * (2 * (c // 2) + 1)
    yc = t.f + t.e * (2 * (r // 2) + 1)
    expected = np.stack([1000 + 0.5 * (xc - x0) + 0.25 * (y0 - yc), 500 + 0.1 * (xc - x0)])
    inner = (slice(None), slice(8, -8), slice(8, -8))  # away from reflect-padded edges
    np.testing.assert_allclose(got[inner], expected[inner], atol=1e-3)


def test_seam_tiled_equals_one_piece_on_real_wv2(tmp_path, pair):
    pan, ms, r = pair.pan, pair.ms, pair.ratio
    fuse_files(pan, ms, tmp_path / "tiled.tif", DetailFuser(r), FuseOptions(tile=96, overlap=16, batch=3))
    fuse_files(pan, ms, tmp_path / "one.tif", DetailFuser(r), FuseOptions(tile=4096))
    tiled = _read(tmp_path / "tiled.tif").astype(np.int64)
    one = _read(tmp_path / "one.tif").astype(np.int64)
    assert one.shape == (pair.bands, *pair.out_shape)
    diff = np.abs(tiled - one).max()
    print(f"seam test {pan.name}, tile 96 vs one piece: max |diff| = {diff} DN")
    assert diff <= 1


@pytest.mark.slow
def test_seam_default_network_tiled_equals_one_piece_on_real_landsat8(tmp_path):
    """The shipped default network (bounded scan memory, BDSD-PC base) on the real Landsat-8 example
    scene (319 x 639 PAN): 256 px tiles with a 32 px blend zone reproduce the one-piece product within
    1 DN away from the scene's outer edges. Within EDGE px of them the two differ: windows stop at the
    scene's edge (as the authors run a whole image), and there each window's row- and column-major
    scans wrap around to its own far side, which is not the one piece's far side."""
    from fusion_cli.pipeline import make_fuser

    root = Path(__file__).resolve().parent.parent / "examples"
    pan, ms = root / "landsat8_pan.tif", root / "landsat8_ms.tif"
    fuser = make_fuser(device="cpu")
    assert fuser.model.config.scan_memory is not None
    fuse_files(pan, ms, tmp_path / "tiled.tif", fuser, FuseOptions(tile=256, overlap=32))
    fuse_files(pan, ms, tmp_path / "one.tif", fuser, FuseOptions(tile=4096))
    tiled = _read(tmp_path / "tiled.tif").astype(np.int64)
    one = _read(tmp_path / "one.tif").astype(np.int64)
    diff = np.abs(tiled - one).max(axis=0)
    edge = 96  # ~5 scan memories (20 tokens) of the scene's edge
    interior = diff[edge:-edge, edge:-edge]
    print(f"seam test, default network, tile 256/32 vs one piece: interior max {interior.max()} DN, "
          f"whole scene max {diff.max()} DN")  # fmt: skip
    assert one.max() > 5000 and interior.max() <= 1
    assert diff.mean() < 2  # the edge band is a thin frame, not the scene
    with rasterio.open(tmp_path / "one.tif") as ds:
        assert json.loads(ds.tags()["FUSION_PARAMS"])["scan_memory"] == fuser.model.config.scan_memory


def test_nodata_in_ms_or_pan_is_nodata_in_output(tmp_path):
    rng = np.random.default_rng(0)
    tr = from_origin(600000, 5700000, 2.0, 2.0)
    ms = rng.integers(100, 1500, (4, 100, 100)).astype(np.uint16)
    ms[2, 20:30, 40:50] = 65535  # one band's nodata invalidates the pixel
    pan = rng.integers(100, 1500, (1, 400, 400)).astype(np.uint16)
    pan[0, 300:310, 10:30] = 0
    ms_path = _write(tmp_path / "ms.tif", ms, crs="EPSG:32631", transform=tr, nodata=65535)
    pan_path = _write(
        tmp_path / "pan.tif",
        pan,
        crs="EPSG:32631",
        transform=from_origin(600000, 5700000, 0.5, 0.5),
        nodata=0,
    )

    seen = {}

    class Spy(DetailFuser):
        def fuse(self, p, m):
            seen["ms_max"] = max(seen.get("ms_max", 0), float(m.max()))
            seen["pan_min"] = min(seen.get("pan_min", 1e9), float(p.min()))
            return super().fuse(p, m)

    out = tmp_path / "o.tif"
    s = fuse_files(pan_path, ms_path, out, Spy(4), FuseOptions(tile=128, overlap=16))
    assert seen["ms_max"] < 1600 and seen["pan_min"] >= 100  # nodata filled before inference
    got = _read(out)
    invalid = np.zeros((400, 400), bool)
    invalid[80:120, 160:200] = True
    invalid[300:310, 10:30] = True
    assert s.nodata == 65535 and not s.internal_mask
    np.testing.assert_array_equal((got == 65535).all(axis=0), invalid)
    assert not (got[:, ~invalid] == 65535).any()
    assert s.valid_fraction == pytest.approx(1 - invalid.mean())


def test_pan_nodata_without_ms_nodata_gives_an_internal_mask(tmp_path):
    rng = np.random.default_rng(1)
    ms = rng.integers(100, 1500, (3, 64, 64)).astype(np.uint16)
    pan = rng.integers(100, 1500, (1, 256, 256)).astype(np.uint16)
    pan[0, :40] = 0
    ms_path = _write(tmp_path / "ms.tif", ms, crs="EPSG:32631", transform=from_origin(0, 512, 8, 8))
    pan_path = _write(
        tmp_path / "pan.tif", pan, crs="EPSG:32631", transform=from_origin(0, 512, 2, 2), nodata=0
    )
    s = fuse_files(pan_path, ms_path, tmp_path / "o.tif", DetailFuser(4), FuseOptions())
    assert s.internal_mask and s.nodata is None
    with rasterio.open(tmp_path / "o.tif") as o:
        assert rasterio.enums.MaskFlags.per_dataset in o.mask_flag_enums[0]
        mask = o.read_masks(1)
    assert not mask[:40].any() and mask[40:].all()


def _rotated_footprint(tmp_path, pan_src=EXAMPLE_PAN, ms_src=EXAMPLE_MS) -> dict[str, Path]:
    """A real ratio-2 scene inside a footprint rotated by 15 degrees over 3/4 of its width and 2/3 of
    its height, nodata 0 outside (a Landsat scene's collar)."""
    pan, ms = _read(pan_src), _read(ms_src)
    h, w = ms.shape[1:]
    rows, cols = np.mgrid[:h, :w]
    angle = np.deg2rad(15)
    u = (cols - w / 2) * np.cos(angle) + (rows - h / 2) * np.sin(angle)
    v = -(cols - w / 2) * np.sin(angle) + (rows - h / 2) * np.cos(angle)
    inside = (np.abs(u) < 0.375 * w) & (np.abs(v) < 0.34 * h)
    ms[:, ~inside] = 0
    pan_inside = np.repeat(np.repeat(inside, 2, axis=0), 2, axis=1)
    extra = [
        (0, max(0, n - m)) for n, m in zip(pan.shape[1:], pan_inside.shape, strict=True)
    ]  # Landsat-8: 1 more row
    pan[:, ~np.pad(pan_inside, extra, mode="edge")[: pan.shape[1], : pan.shape[2]]] = 0
    paths = {}
    for name, data, src in (("pan", pan, pan_src), ("ms", ms, ms_src)):
        with rasterio.open(src) as ds:
            profile = ds.profile | {"nodata": 0}
        paths[name] = _write(
            tmp_path / f"{name}.tif", data, **{k: profile[k] for k in ("crs", "transform", "nodata")}
        )
    return paths


@pytest.mark.parametrize("method", ["gsa", "mtf-glp", "brovey", "bdsd-pc"])
def test_nodata_edge_does_not_depend_on_the_tiling(tmp_path, method):
    """Invalid pixels fill alike in every window (the nearest valid pixel, read from beyond the window,
    then the scene's band means). With each window's own means the product along a nodata edge
    stepped from tile to tile (GSA: 900 DN at tile 128)."""
    from fusion_cli.pipeline import make_fuser

    paths = _rotated_footprint(tmp_path)
    products = []
    for tile in (128, 4096):
        fuser = make_fuser(method=method, ratio=2, sensor="landsat8")
        out = tmp_path / f"{method}_{tile}.tif"
        fuse_files(paths["pan"], paths["ms"], out, fuser, FuseOptions(tile=tile, overlap=16))
        products.append(_read(out).astype(np.int64))
    valid = (products[1] != 0).all(axis=0)
    assert 0.4 < valid.mean() < 0.8
    assert np.abs(products[0] - products[1])[:, valid].max() <= 1


def test_bt_h_has_no_hot_pixels_inside_a_nodata_edge(tmp_path):
    """BT-H (the shared Landsat-8 B, G, R, NIR) divides by an intensity that is small on Landsat DN;
    with the scene's means in the collar, the upsampled MS 2-5 px inside the edge blended them in and
    the NIR doubled there (2.3x the same scene fused whole, against at most 1.1x at the scene's own
    border). The edge's own values now reach into the collar, as a border's do under replicate
    padding."""
    from fusion_cli.pipeline import make_fuser

    pan_src, ms_src = need_shared("landsat8_oli", "l8_B8.tif"), need_shared("landsat8_oli", "ms.tif")
    paths = _rotated_footprint(tmp_path, pan_src, ms_src)
    products = []
    for pan, ms in ((paths["pan"], paths["ms"]), (pan_src, ms_src)):
        out = tmp_path / f"bth_{len(products)}.tif"
        fuser = make_fuser(method="brovey", ratio=2, ms_bands=4, sensor="landsat8")
        fuse_files(pan, ms, out, fuser, FuseOptions())
        products.append(_read(out).astype(np.float64))
    valid = (products[0] != 0).all(axis=0)
    depth = ndimage.distance_transform_cdt(valid, metric="chessboard")
    rim = (depth >= 2) & (depth <= 5)
    assert rim.sum() > 1000
    ratio = products[0][:, rim] / products[1][:, rim]
    assert ratio.max() < 1.2 and ratio.min() > 0.8


def test_an_undeclared_zero_collar_is_named(tmp_path):
    """SpaceNet's WorldView-2 tile is 32 % zeros without a nodata flag: fused as data (their zeros in
    GSA's statistics moved pixels far inside by 5 % of the mean DN) without a word. The run now says
    so and names --zero-nodata; with it, or on a scene without a collar, nothing is said."""
    pan = need_shared("wv2_spacenet6", "pan_2.tif")
    ms = need_shared("wv2_spacenet6", "ms_2.tif")
    said = fuse_files(pan, ms, tmp_path / "a.tif", DetailFuser(4), FuseOptions()).warnings
    assert any(
        w.startswith("32% of the MS pixels are 0 in every band") and "--zero-nodata" in w for w in said
    )
    quiet = fuse_files(pan, ms, tmp_path / "b.tif", DetailFuser(4), FuseOptions(zero_is_nodata=True))
    assert not any("--zero-nodata" in w for w in quiet.warnings)
    example = fuse_files(EXAMPLE_PAN, EXAMPLE_MS, tmp_path / "c.tif", DetailFuser(2), FuseOptions())
    assert not any("--zero-nodata" in w for w in example.warnings)


def test_wv2_zero_collar_with_zero_nodata(tmp_path):
    pan = need_shared("wv2_spacenet6", "pan_2.tif")
    ms = need_shared("wv2_spacenet6", "ms_2.tif")
    s = fuse_files(
        pan, ms, tmp_path / "o.tif", DetailFuser(4), FuseOptions(zero_is_nodata=True, quicklook=True)
    )
    got = _read(tmp_path / "o.tif")
    p = _read(pan)[0]
    assert s.nodata == 0
    assert (got[:, p == 0] == 0).all()  # PAN collar -> nodata
    assert not (got[:, :190] != 0).any()
    assert 0.6 < s.valid_fraction < 0.7  # README: about 32 % zeros
    assert (got[:, 300:] > 0).all(axis=0).mean() > 0.95
    # The quicklook sits beside the product; the nodata collar is black, the scene is not.
    import matplotlib.image

    png = matplotlib.image.imread(s.quicklook)
    assert s.quicklook == str(tmp_path / "o.png") and png.shape[:2] == (600, 600)
    assert png[:150, :, :3].max() == 0 and png[400:, :, :3].mean() > 0.1


class _Recorder:
    """A `pipeline.Progress` that records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, total: int, label: str) -> None:
        self.calls.append(("start", total, label))

    def advance(self, pixels: int) -> None:
        self.calls.append(("advance", pixels))

    def stop(self) -> None:
        self.calls.append(("stop",))


def test_progress_is_reported_through_the_callback_and_nothing_is_drawn(tmp_path, capfd, pair):
    """The library draws nothing: a run tells its `progress` object the window count, each finished
    window's output pixels (they add up to the product) and the end, also when the run fails."""
    pan, ms, r = pair.pan, pair.ms, pair.ratio
    rec = _Recorder()
    s = fuse_files(pan, ms, tmp_path / "o.tif", DetailFuser(r), FuseOptions(tile=128, progress=rec))
    assert rec.calls[0] == ("start", s.tiles, "fusing o.tif") and rec.calls[-1] == ("stop",)
    advances = [c[1] for c in rec.calls[1:-1]]
    assert len(advances) == s.tiles > 1 and sum(advances) == s.shape[1] * s.shape[2]
    fuse_files(pan, ms, tmp_path / "quiet.tif", DetailFuser(r), FuseOptions(tile=128))
    assert capfd.readouterr().err == ""
    failed = _Recorder()
    with pytest.raises(RuntimeError):
        opts = FuseOptions(tile=128, progress=failed)
        fuse_files(pan, ms, tmp_path / "x.tif", FailingFuser(r, after=1), opts)
    assert failed.calls[0][0] == "start" and failed.calls[-1] == ("stop",)


def test_a_statistics_pass_reports_its_progress_before_the_fusion(tmp_path, pair):
    """A method with scene statistics reads the scene once before fusing (10-30 s of a 100 Mpx scene
    with nothing on screen): that pass is reported as its own phase, window by window."""
    from fusion_cli.pipeline import make_fuser

    rec = _Recorder()
    fuser = make_fuser(method="gsa", ratio=pair.ratio)
    s = fuse_files(pair.pan, pair.ms, tmp_path / "o.tif", fuser, FuseOptions(tile=128, progress=rec))
    starts = [i for i, c in enumerate(rec.calls) if c[0] == "start"]
    stops = [i for i, c in enumerate(rec.calls) if c[0] == "stop"]
    assert [rec.calls[i][2] for i in starts] == ["statistics of o.tif", "fusing o.tif"]
    assert stops[0] < starts[1]  # one phase after the other
    for begin, end in zip(starts, stops, strict=True):
        advances = [c[1] for c in rec.calls[begin + 1 : end]]
        assert len(advances) == rec.calls[begin][1] and sum(advances) == s.shape[1] * s.shape[2]


def test_make_fuser_lets_an_import_error_of_its_own_modules_through(monkeypatch):
    """A broken module of the package is a bug to see, not a "not available in this installation"."""
    import sys

    from fusion_cli.pipeline import make_fuser

    monkeypatch.setitem(sys.modules, "fusion_cli.models.fuser", None)  # importing it raises ImportError
    with pytest.raises(ImportError):
        make_fuser(device="cpu")
    monkeypatch.setitem(sys.modules, "fusion_cli.classical", None)
    with pytest.raises(ImportError):
        make_fuser(method="gsa", ratio=4)


def test_overwrite_refusal_and_atomic_write(tmp_path, pair):
    pan, ms, r = pair.pan, pair.ms, pair.ratio
    out = tmp_path / "o.tif"
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            fuse_files(pan, ms, out, FailingFuser(r, after=1, exc=exc), FuseOptions(tile=128, batch=1))
        assert list(tmp_path.iterdir()) == []  # neither output nor temporary left
    fuse_files(pan, ms, out, DetailFuser(r), FuseOptions())
    first = _sha(out)
    with pytest.raises(FusionError, match="--overwrite"):
        fuse_files(pan, ms, out, DetailFuser(r), FuseOptions())
    assert _sha(out) == first
    fuse_files(pan, ms, out, DetailFuser(r), FuseOptions(overwrite=True, out_dtype="float32"))
    with rasterio.open(out) as o:
        assert o.dtypes[0] == "float32"


def test_a_failing_write_in_the_writer_thread_leaves_nothing(tmp_path, monkeypatch, pair):
    """Writes run one strip behind in a background thread: an error there (a full disk) still stops
    the run with that error, and neither the output nor its temporary file is left."""
    pan, ms = pair.pan, pair.ms
    calls = []
    real_write = raster.AtomicWriter.write

    def write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(raster.AtomicWriter, "write", write)
    with pytest.raises(OSError, match="No space left"):
        fuse_files(pan, ms, tmp_path / "o.tif", DetailFuser(pair.ratio), FuseOptions(tile=128))
    assert len(calls) == 2  # the run stopped at the failing write
    assert list(tmp_path.iterdir()) == []


def test_band_selection_dtype_and_clip(tmp_path, pair):
    pan, ms, r = pair.pan, pair.ms, pair.ratio
    # a ceiling that a few of the MS's brightest pixels exceed (more would be refused as a wrong one)
    dn_max = float(np.floor(np.percentile(_read(ms)[[2, 1, 0]].max(axis=0), 99.5)))
    s = fuse_files(pan, ms, tmp_path / "o.tif", DetailFuser(r), FuseOptions(bands=[3, 2, 1], dn_max=dn_max))
    got = _read(tmp_path / "o.tif")
    assert s.shape == (3, *pair.out_shape) and got.max() <= dn_max and (got == dn_max).any()
    with pytest.raises(FusionError, match="exceed --dn-max"):
        fuse_files(pan, ms, tmp_path / "x.tif", DetailFuser(r), FuseOptions(dn_max=dn_max / 2))
    with pytest.raises(FusionError, match="cannot select band"):
        fuse_files(pan, ms, tmp_path / "x.tif", DetailFuser(r), FuseOptions(bands=[pair.bands + 1]))
    with pytest.raises(FusionError, match="expects 8"):
        fuse_files(pan, ms, tmp_path / "x.tif", DetailFuser(r, ms_bands=8), FuseOptions())
    with pytest.raises(FusionError, match=f"ratio is {r} but the model expects {6 - r}"):
        fuse_files(pan, ms, tmp_path / "x.tif", DetailFuser(6 - r), FuseOptions())
    assert not (tmp_path / "x.tif").exists()


def test_arrays_and_files_share_the_tiling_fusebox(tmp_path):
    """FuseBox pair 1 (uint8, 800 x 800 PAN px, no georeferencing); without ../shared, the example
    written without georeferencing (uint16, 320 x 640)."""
    if have_shared("landsat7_etm_fusebox"):
        pan = need_shared("landsat7_etm_fusebox", "1_pan.tif")
        ms = need_shared("landsat7_etm_fusebox", "1_ms.tif")
        shape, dtype = (800, 800), np.uint8
    else:
        pan, ms = write_example_crop(tmp_path, "nogeo", georef=False)
        shape, dtype = (320, 640), np.uint16
    stats = StatsFuser(2)
    s = fuse_files(pan, ms, tmp_path / "o.tif", stats, FuseOptions(tile=128))
    assert stats.sums[1] == shape[0] * shape[1]  # the statistics pass saw every pixel once
    assert s.crs is None and any("no georeferencing" in w for w in s.warnings)
    from_file = _read(tmp_path / "o.tif")
    dn_max = np.iinfo(dtype).max
    arr = fuse_arrays(_read(pan), _read(ms), DetailFuser(2), FuseOptions(tile=128, dn_max=dn_max))
    assert arr.dtype == np.float32 and arr.shape == (6, *shape)
    np.testing.assert_array_equal(np.rint(arr).astype(dtype), from_file)


def test_coregister_applies_the_measured_fusebox_shift(tmp_path):
    pan = need_shared("landsat7_etm_fusebox", "7_pan.tif")
    ms = need_shared("landsat7_etm_fusebox", "7_ms.tif")
    plain = fuse_files(pan, ms, tmp_path / "a.tif", RepeatFuser(2), FuseOptions(out_dtype="float32"))
    reg = fuse_files(
        pan, ms, tmp_path / "b.tif", RepeatFuser(2), FuseOptions(out_dtype="float32", coregister=True)
    )
    assert plain.shift_measured["dy"] == pytest.approx(-1.0, abs=0.2)
    assert plain.shift_measured["dx"] == pytest.approx(-1.05, abs=0.2)
    assert not plain.shift_applied and reg.shift_applied
    p = _read(pan)[0].astype(np.float64)

    def corr(path):
        f = _read(path).mean(axis=0)[8:-8, 8:-8]
        return np.corrcoef(f.ravel(), p[8:-8, 8:-8].ravel())[0, 1]

    assert corr(tmp_path / "b.tif") > corr(tmp_path / "a.tif") + 0.01


def test_hyperion_hs_pansharpening_float_ratio_3(tmp_path):
    pan = need_shared("eo1_hyperion_ali_paris", "pan.tif")
    hs = need_shared("eo1_hyperion_ali_paris", "hs.tif")
    s = fuse_files(pan, hs, tmp_path / "o.tif", DetailFuser(3), FuseOptions(tile=96))
    with rasterio.open(tmp_path / "o.tif") as o:
        assert (o.count, o.height, o.width) == (128, 216, 174) and o.dtypes[0] == "float32"
        assert o.crs is None and o.descriptions[0].startswith("Hyperion band")
        got = o.read()
    assert s.ratio == 3 and np.isfinite(got).all()
    ref = _read(hs)
    np.testing.assert_allclose(got.mean(axis=(1, 2)), ref.mean(axis=(1, 2)), rtol=0.02, atol=1e-3)


def test_hisr_msi_drives_the_hsi(tmp_path):
    """HISR on the Paris HSI+MSI pair, reduced by 3 (Wald): the MSI plays the high-res role."""
    ref = _read(need_shared("eo1_hyperion_ali_paris", "hs_for_ms.tif"))  # (128, 72, 72)
    msi = need_shared("eo1_hyperion_ali_paris", "ms.tif")  # (9, 72, 72)
    lr = ref.reshape(128, 24, 3, 24, 3).mean(axis=(2, 4)).astype(np.float32)
    hsi = _write(tmp_path / "hsi.tif", lr)
    s = fuse_files(
        msi, hsi, tmp_path / "o.tif", DetailFuser(3, pan_bands=9), FuseOptions(tile=48, overlap=12)
    )
    got = _read(tmp_path / "o.tif")
    assert s.shape == (128, 72, 72) and got.shape == ref.shape
    up = np.repeat(np.repeat(lr, 3, 1), 3, 2)
    assert np.abs(got - ref).mean() < np.abs(up - ref).mean()  # better than the blocky HSI
    with pytest.raises(FusionError, match="has 9 bands but detail expects 4"):
        fuse_files(msi, hsi, tmp_path / "x.tif", DetailFuser(3, pan_bands=4), FuseOptions())


OFFICIAL_SHA = "5214e111fa09db34e446a8cfc1e5a86dc97edca2bb3ce6751193e623f5e83017"


@pytest.mark.slow
def test_official_network_on_wv3(tmp_path):
    """The official FusionMamba checkpoint (8 bands, ratio 4, DN/2047) through fuse_files on a real WV3
    crop. Kept to one small window: the pure-PyTorch scan is slow on CPU (seams: see the report)."""
    weights = need_shared("fusionmamba_official", "420.pth")
    from fusion_cli.models.fuser import NetworkFuser
    from fusion_cli.models.registry import load_model

    fuser = NetworkFuser(load_model(weights=weights), device="cpu", halo=4)
    with (
        rasterio.open(need_shared("wv3_spacenet2", "pan.tif")) as p,
        rasterio.open(need_shared("wv3_spacenet2", "ms.tif")) as m,
    ):
        w_ms, w_pan = rasterio.windows.Window(150, 150, 8, 8), rasterio.windows.Window(600, 600, 32, 32)
        pan_path = _write(
            tmp_path / "pan.tif", p.read(window=w_pan), crs=p.crs, transform=p.window_transform(w_pan)
        )
        ms_path = _write(
            tmp_path / "ms.tif", m.read(window=w_ms), crs=m.crs, transform=m.window_transform(w_ms)
        )
    s = fuse_files(
        pan_path, ms_path, tmp_path / "o.tif", fuser, FuseOptions(tile=4096, overlap=0, measure_shift=False)
    )
    got = _read(tmp_path / "o.tif").astype(np.float64)
    ms = _read(ms_path).astype(np.float64)
    assert s.shape == (8, 32, 32) and s.weights_sha256 == OFFICIAL_SHA and s.fuser == "420"
    with rasterio.open(tmp_path / "o.tif") as o:
        assert o.tags()["FUSION_WEIGHTS_SHA256"] == OFFICIAL_SHA
        assert o.transform == rasterio.open(pan_path).transform
    assert got.max() <= 65535 and got.min() >= 0
    # The product follows the MS spectrally (band means within 10 %) and carries PAN structure.
    np.testing.assert_allclose(got.mean(axis=(1, 2)), ms.mean(axis=(1, 2)), rtol=0.1)
    pan = _read(pan_path)[0].astype(np.float64)
    assert np.corrcoef(got.mean(axis=0).ravel(), pan.ravel())[0, 1] > 0.5


def test_network_with_classical_base_streams_like_that_method(tmp_path):
    """A FusionMamba whose config names a base method gets that method's product through the same
    statistics pass and windows: a fresh one (zero head) writes exactly the method's output, and a
    per-scene copy (batch) owns its statistics."""
    import copy

    import torch

    from fusion_cli.models.fusionmamba import FusionMamba, FusionMambaConfig
    from fusion_cli.models.registry import ModelCard, save_model
    from fusion_cli.pipeline import make_fuser

    # a 256 x 256 PAN crop of the shipped example, without georeferencing: four 128-px tiles (the
    # CPU network is slow)
    pan, ms = write_example_crop(tmp_path, "crop", rasterio.windows.Window(0, 0, 128, 128), georef=False)
    torch.manual_seed(0)
    model = FusionMamba(FusionMambaConfig(ms_bands=6, ratio=2, dim=4, base="bdsd-pc"))
    card = ModelCard(
        name="based", task="pansharpening", description="test", sensor="landsat8",
        bands=[f"b{i}" for i in range(6)], pan_bands=["PAN"], ratio=2, dn_max=65535.0, licence="MIT",
        training={"data": [{"source": "examples/landsat8_*.tif", "licence": "public domain"}]},
    )  # fmt: skip
    weights, _ = save_model(model, card, tmp_path)
    net = make_fuser(weights=weights, device="cpu")
    assert net.needs_stats and net.halo >= net.base_fuser.halo
    twin = copy.copy(net)
    assert twin.model is net.model and twin.base_fuser is not net.base_fuser

    fuse_files(pan, ms, tmp_path / "net.tif", net, FuseOptions(tile=128))
    method = make_fuser(method="bdsd-pc", ratio=2, sensor="landsat8")
    fuse_files(pan, ms, tmp_path / "bdsd.tif", method, FuseOptions())
    a, b = _read(tmp_path / "net.tif").astype(int), _read(tmp_path / "bdsd.tif").astype(int)
    assert np.abs(a - b).max() <= 1

    with torch.no_grad():  # a network that does correct the base changes the product
        torch.nn.init.normal_(model.to_hrms[2].weight, std=0.05)
    weights, _ = save_model(model, card, tmp_path)
    fuse_files(
        pan, ms, tmp_path / "net2.tif", make_fuser(weights=weights, device="cpu"), FuseOptions(tile=128)
    )
    assert np.abs(_read(tmp_path / "net2.tif").astype(int) - b).mean() > 0.5


def test_hisr_network_with_hypersharpening_base(tmp_path):
    """HISR with a base: a fresh FusionMamba (128-band HSI, 9-band MSI, ratio 3) whose config names
    mtf-glp-hs writes what `fusion hisr --method mtf-glp-hs` writes, tile by tile, on the real Paris
    pair with the HSI reduced by 3."""
    import torch

    from fusion_cli.models.fusionmamba import FusionMamba, FusionMambaConfig
    from fusion_cli.models.registry import ModelCard, save_model
    from fusion_cli.pipeline import hisr, make_fuser

    ref = _read(need_shared("eo1_hyperion_ali_paris", "hs_for_ms.tif"))  # (128, 72, 72)
    msi = need_shared("eo1_hyperion_ali_paris", "ms.tif")  # (9, 72, 72)
    hsi = _write(tmp_path / "hsi.tif", ref.reshape(128, 24, 3, 24, 3).mean(axis=(2, 4)).astype(np.float32))
    torch.manual_seed(0)
    model = FusionMamba(FusionMambaConfig(ms_bands=128, pan_bands=9, ratio=3, dim=4, base="mtf-glp-hs"))
    card = ModelCard(
        name="hs_based", task="hisr", description="test", sensor="hyperion",
        bands=[f"b{i}" for i in range(128)], pan_bands=[f"m{i}" for i in range(9)], ratio=3, dn_max=1.0,
        licence="MIT", training={"data": [{"source": "paris", "licence": "public domain"}]},
    )  # fmt: skip
    weights, _ = save_model(model, card, tmp_path)
    net = make_fuser(weights=weights, device="cpu")
    assert net.base_fuser.pan_bands == 9
    hisr(hsi, msi, tmp_path / "net.tif", weights=weights, device="cpu", tile=36)
    hisr(hsi, msi, tmp_path / "hs.tif", method="mtf-glp-hs", sensor="hyperion")
    a, b = _read(tmp_path / "net.tif"), _read(tmp_path / "hs.tif")
    assert a.shape == b.shape == ref.shape
    assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()
    assert np.abs(b - ref).mean() < np.abs(np.repeat(np.repeat(_read(hsi), 3, 1), 3, 2) - ref).mean()


@pytest.mark.parametrize("nodata", [0, None])
def test_reproject_warps_the_ms_onto_the_pan_grid(tmp_path, nodata):
    """The real WV2 MS reprojected into the next UTM zone (grid rotated ~3 degrees): refused without
    --reproject; with it the product lies on the PAN grid, the measured PAN/MS shift is the same-CRS
    pair's (no offset introduced), and it differs from the same-CRS product by about what one cubic
    round trip through the other CRS costs (8 % of the mean at MS resolution). Without a nodata value
    the warp's alpha band masks the outside and is not fused."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    from fusion_cli.pipeline import pansharpen

    pan, src = need_shared("wv2_spacenet6", "pan_1.tif"), need_shared("wv2_spacenet6", "ms_1.tif")
    warped = tmp_path / "ms_utm32.tif"
    with rasterio.open(src) as s:
        t, w, h = calculate_default_transform(s.crs, "EPSG:32632", s.width, s.height, *s.bounds)
        profile = s.profile | {"crs": "EPSG:32632", "transform": t, "width": w, "height": h, "nodata": nodata}
        with rasterio.open(warped, "w", **profile) as d:
            for b in range(1, s.count + 1):
                reproject(rasterio.band(s, b), rasterio.band(d, b), resampling=Resampling.cubic, dst_nodata=0)
    before = _sha(warped)
    with pytest.raises(FusionError, match="--reproject"):
        pansharpen(pan, warped, tmp_path / "x.tif", method="exp")
    same = pansharpen(pan, src, tmp_path / "a.tif", method="exp")
    other = pansharpen(pan, warped, tmp_path / "b.tif", method="exp", reproject=True)
    assert _sha(warped) == before and not (tmp_path / "x.tif").exists()
    with (
        rasterio.open(tmp_path / "a.tif") as a,
        rasterio.open(tmp_path / "b.tif") as b,
        rasterio.open(pan) as p,
    ):
        assert b.transform == p.transform and b.crs == p.crs and b.shape == p.shape and b.count == 4
        assert json.loads(b.tags()["FUSION_PARAMS"])["reprojected_ms"] is True
        valid = b.dataset_mask() > 0
        x, y = a.read().astype(np.float64)[:, valid], b.read().astype(np.float64)[:, valid]
    assert valid.mean() > 0.99
    assert abs(other.shift_measured["dy"] - same.shift_measured["dy"]) < 0.1
    assert abs(other.shift_measured["dx"] - same.shift_measured["dx"]) < 0.1
    assert np.abs(x - y).mean() < 0.09 * x.mean()
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.99


def test_quicklook_bands_are_chosen_by_wavelength() -> None:
    """A 128-band Hyperion product's quicklook showed bands 4, 2, 1 (498 / 477 / 467 nm: nearly grey).
    Bands with known wavelengths (the card's, or named in nm) give the ones nearest 650 / 550 / 470
    nm; band names match whole words ("[inferred]" is not "red"); otherwise the guess by count."""
    from fusion_cli.models.fuser import NetworkFuser
    from fusion_cli.models.registry import load_model
    from fusion_cli.pipeline.output import rgb_bands

    hyperion = NetworkFuser(load_model("hyperion_pan", device="cpu"))
    r, g, b = rgb_bands(hyperion, [None] * 128, 128)
    assert [hyperion.card.bands[i].split("(")[1] for i in (r, g, b)] == [
        "650.67 nm)",
        "548.92 nm)",
        "467.52 nm)",
    ]
    gsa = DetailFuser(4)
    assert rgb_bands(gsa, ["B2 blue", "B3 green", "B4 red", "B8 nir"], 4) == (2, 1, 0)
    assert rgb_bands(gsa, ["blue", "green", "x [inferred]", "red"], 4) == (3, 1, 0)
    assert rgb_bands(gsa, ["a", "b", "c", "d", "e", "f"], 6) == (2, 1, 0)  # the count's guess
    named_nm = [f"band {i} ({400 + 20 * i} nm)" for i in range(20)]  # 400, 420, ... 780 nm
    assert rgb_bands(gsa, named_nm, 20) == (12, 7, 3)  # 640, 540, 460 nm
    # colour tags: red, green, blue on bands 1-3 of 8 (SpaceNet WorldView-3: coastal, blue, green) are
    # not taken; on 4 or 6 bands (R, G, B, NIR, ...), or elsewhere, they are
    from rasterio.enums import ColorInterp as CI

    rgb_first = [CI.red, CI.green, CI.blue] + [CI.undefined] * 5
    assert rgb_bands(gsa, [None] * 8, 8, rgb_first) == (4, 2, 1)
    assert rgb_bands(gsa, [None] * 4, 4, rgb_first[:4]) == (0, 1, 2)
    assert rgb_bands(gsa, [None] * 6, 6, rgb_first[:6]) == (0, 1, 2)  # an RGB-first stack (reviewer)
    bgr = [CI.blue, CI.green, CI.red] + [CI.undefined] * 3
    assert rgb_bands(gsa, [None] * 6, 6, bgr) == (2, 1, 0)
    assert rgb_bands(gsa, [None] * 6, 6, [CI.undefined, *rgb_first[:3], CI.undefined, CI.undefined]) == (
        1,
        2,
        3,
    )


def test_a_fuser_serves_scene_after_scene_and_the_caller_keeps_its_state(tmp_path):
    """A notebook reuses one fuser: the second scene through a classical method with statistics
    failed ("statistics are already finalized") or, with one thread, was fused with both scenes'
    statistics (GSA up to 2585 DN off); a network kept the first input's DN scale, an --adapt-ed
    copy of itself and the last thread count. Each call now works on a copy of the fuser (its
    scene's state), restores torch's threads, and building a network leaves the caller's random
    stream where it was."""
    import torch

    from fusion_cli.pipeline import make_fuser

    pan, ms = _read(EXAMPLE_PAN), _read(EXAMPLE_MS)
    scenes = [(pan[:, :160, :320], ms[:, :80, :160]), (pan[:, 160:, 320:], ms[:, 80:, 160:])]
    threads = torch.get_num_threads()
    for method in ("gsa", "mtf-glp", "bdsd-pc"):
        for opts in (FuseOptions(), FuseOptions(threads=1)):
            reused = make_fuser(method=method, ratio=2, sensor="landsat8")
            for p, m in scenes:
                got = fuse_arrays(p, m, reused, opts)
                fresh = fuse_arrays(p, m, make_fuser(method=method, ratio=2, sensor="landsat8"), opts)
                np.testing.assert_array_equal(got, fresh)
            assert torch.get_num_threads() == threads
    # the same through files, twice onto two outputs
    reused = make_fuser(method="gsa", ratio=2, sensor="landsat8")
    for name in ("a.tif", "b.tif"):
        fuse_files(EXAMPLE_PAN, EXAMPLE_MS, tmp_path / name, reused, FuseOptions(threads=1))
    assert np.array_equal(_read(tmp_path / "a.tif"), _read(tmp_path / "b.tif"))

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    network = make_fuser(model="landsat", device="cpu")
    assert torch.equal(torch.rand(3), expected)
    # a uint8 Landsat-7 scene (the card's uint8 DN scale, 255) then uint16 DN (65535): as fresh
    d = need_shared("landsat7_etm_fusebox")
    pan8 = _read(d / "19_pan.tif")[:, :128, :128]
    ms8 = _read(d / "19_ms.tif")[[2, 1, 0, 3, 4, 5], :64, :64]  # FuseBox R, G, B -> the model's B, G, R
    first = fuse_arrays(pan8, ms8, network)
    assert abs(float(first.mean()) - float(ms8.mean())) < 0.05 * float(ms8.mean())  # arrays ran at 65535: x2
    p16, m16 = scenes[0][0][:, :128, :128], scenes[0][1][:, :64, :64]
    np.testing.assert_array_equal(
        fuse_arrays(p16, m16, network), fuse_arrays(p16, m16, make_fuser(model="landsat", device="cpu"))
    )
    assert network.dn_max == 65535.0 and network.band_max is None


def test_fuse_arrays_refuses_what_fuse_files_refuses(tmp_path):
    """fuse_arrays skipped the checks of files: one NaN MS pixel made the whole network product NaN,
    a classical method failed inside torch.linalg ("please report a bug to PyTorch"), reflectance went
    through a DN model, and `bands`, `out_dtype` or `ms_nodata` were ignored. They are now applied or
    refused in one line."""
    from fusion_cli.pipeline import make_fuser

    pan, ms = _read(EXAMPLE_PAN)[:, :128, :128], _read(EXAMPLE_MS)[:, :64, :64]
    gsa = make_fuser(method="gsa", ratio=2, sensor="landsat8")
    holed = ms.astype(np.float32)
    holed[:, 10, 10] = np.nan
    with pytest.raises(FusionError, match="NaN or infinite values at 1 px that ms_valid"):
        fuse_arrays(pan, holed, gsa)
    masked = fuse_arrays(pan, holed, gsa, ms_valid=np.isfinite(holed).all(axis=0))
    assert np.isnan(masked[:, 20:22, 20:22]).all() and np.isfinite(masked[:, 40:, 40:]).all()
    network = make_fuser(model="landsat", device="cpu")
    with pytest.raises(FusionError, match="not in the units of model landsat"):
        fuse_arrays(pan, ms.astype(np.float32) / 65535 * 0.6, network)
    for option in ({"out_dtype": "uint8"}, {"ms_nodata": 0.0}, {"zero_is_nodata": True}):
        with pytest.raises(FusionError, match=f"does not apply {next(iter(option))}"):
            fuse_arrays(pan, ms, gsa, FuseOptions(**option))
    picked = fuse_arrays(pan, ms, gsa, FuseOptions(bands=[3, 2, 1]))
    np.testing.assert_array_equal(picked, fuse_arrays(pan, ms[[2, 1, 0]], gsa))
    with pytest.raises(FusionError, match=r"MS band\(s\) \[7\] out of range"):
        fuse_arrays(pan, ms, gsa, FuseOptions(bands=[7]))
    with pytest.raises(FusionError, match="pan_valid has shape"):
        fuse_arrays(pan, ms, gsa, pan_valid=np.ones((64, 64), bool))
    with pytest.raises(FusionError, match="fuser must be a Fuser"):
        fuse_arrays(pan, ms, "gsa")  # type: ignore[arg-type]


def test_the_product_does_not_depend_on_the_blas_thread_count(tmp_path: Path) -> None:
    """The example scene's MS is re-placed onto the PAN grid (Landsat's quarter-pixel offset) by a
    matrix product; in float32, numpy's OpenBLAS rounded it differently when started with one thread
    (OPENBLAS_NUM_THREADS=1, as Dask workers and many cluster jobs run): 55 of 1,223,046 DN of
    `--method exp` moved by 1. The same scene must give the same product wherever it runs."""
    import os
    import subprocess
    import sys

    from fusion_cli.classical import make_method

    here = tmp_path / "here.tif"
    fuse_files(EXAMPLE_PAN, EXAMPLE_MS, here, make_method("exp", 2))
    there = tmp_path / "one_thread.tif"
    env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    args = ["pansharpen", str(EXAMPLE_PAN), str(EXAMPLE_MS), "-o", str(there), "--method", "exp", "-q"]
    code = "from fusion_cli.cli.main import main; main()"
    res = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with rasterio.open(here) as a, rasterio.open(there) as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_overlapping_runs_leave_the_callers_thread_count():
    """Two runs that set torch's (process-wide) thread count overlap, as two fusions in two threads
    of one program do: the first ends before the second. Each restoring the count it found left the
    caller with the first run's setting (1 instead of 2, helper). The newest run's setting holds while
    it runs; the caller's returns when the last one ends."""
    import torch

    from fusion_cli.pipeline.engine import run_threads, single_threaded

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = run_threads(1), run_threads(3)
        first.__enter__()
        assert torch.get_num_threads() == 1
        second.__enter__()
        assert torch.get_num_threads() == 3
        first.__exit__(None, None, None)
        assert torch.get_num_threads() == 3
        with single_threaded(True):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_network_is_float32_whatever_the_default_dtype(tmp_path):
    """A notebook that set torch's default dtype to float64 before building the default network got a
    float64 model, which the float32 pipeline fed a raw torch error at fuse time."""
    import torch

    from fusion_cli.pipeline import make_fuser

    pan, ms = _read(EXAMPLE_PAN)[:, :128, :128], _read(EXAMPLE_MS)[:, :64, :64]
    want = fuse_arrays(pan, ms, make_fuser(device="cpu"))
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        fuser = make_fuser(device="cpu")
        got = fuse_arrays(pan, ms, fuser)
    finally:
        torch.set_default_dtype(before)
    assert next(fuser.model.parameters()).dtype == torch.float32
    np.testing.assert_array_equal(got, want)


def test_an_interrupt_while_the_quicklook_is_drawn_keeps_product_and_quicklook_together(
    tmp_path, monkeypatch
):
    """The quicklook was drawn after the product was renamed into place: a Ctrl-C, SIGTERM or SIGHUP
    then left a product without its PNG (exit 130/143/129), and a rerun refused to add it without
    --overwrite (helper, 20 timings each). It is drawn from the finished temporary and both are
    renamed with the signals held: the interrupt lands after both are in place."""
    import signal

    import fusion_cli.quicklook as quicklook

    draw = quicklook.save_quicklook

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # held until both files are in place
        return draw(*args, **kwargs)

    monkeypatch.setattr(quicklook, "save_quicklook", interrupted)
    out = tmp_path / "o.tif"
    with pytest.raises(KeyboardInterrupt):
        fuse_files(EXAMPLE_PAN, EXAMPLE_MS, out, DetailFuser(2), FuseOptions(quicklook=True))
    assert raster.is_complete_output(out) and (tmp_path / "o.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "o.tif"]


def test_fp32_network_ignores_the_callers_autocast():
    """Under a caller's `torch.autocast("cpu", torch.bfloat16)` the network ran in bf16 (221 DN off)
    while the fuser and the product's tags said fp32; fp32 now means fp32 whatever the caller set."""
    import torch

    from fusion_cli.pipeline import make_fuser

    pan, ms = _read(EXAMPLE_PAN)[:, :128, :128], _read(EXAMPLE_MS)[:, :64, :64]
    want = fuse_arrays(pan, ms, make_fuser(device="cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fuse_arrays(pan, ms, make_fuser(device="cpu"))
    np.testing.assert_array_equal(got, want)


def test_a_quicklook_that_fails_does_not_cost_the_product(tmp_path, monkeypatch):
    """The quicklook is drawn before the product's rename (so the two land together); one that failed
    there (a full disk) took the finished product with it (reviewer). The product is renamed into
    place and the quicklook's own error is raised."""
    import fusion_cli.quicklook as quicklook

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quicklook, "save_quicklook", full_disk)
    out = tmp_path / "o.tif"
    from fusion_cli.errors import OutputWriteError

    with pytest.raises(OutputWriteError, match="cannot write quicklook .*o.png.*No space left"):
        fuse_files(EXAMPLE_PAN, EXAMPLE_MS, out, DetailFuser(2), FuseOptions(quicklook=True))
    assert raster.is_complete_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.tif"]


def test_runs_asking_the_same_thread_count_release_their_own_holds():
    """Three overlapping runs asking 4, 2 and 4 threads: when the last ends, the newest run still
    going (2) sets the count; removing the first entry of the same value left 4 (reviewer)."""
    import torch

    from fusion_cli.pipeline.engine import run_threads

    before = torch.get_num_threads()
    try:
        a, b, c = run_threads(4), run_threads(2), run_threads(4)
        for run in (a, b, c):
            run.__enter__()
        c.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
        b.__exit__(None, None, None)
        assert torch.get_num_threads() == 4
        a.__exit__(None, None, None)
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def _tagged_example_ms(tmp_path: Path) -> Path:
    """The example MS with what real scenes carry: scene tags, this tool's own record (as a product
    has), TIFF file tags, per-band wavelengths (Landsat style on B2, ENVI style on B3) and GDAL's
    band statistics of the source."""
    with rasterio.open(EXAMPLE_MS) as src:
        data, profile = src.read(), src.profile
    path = tmp_path / "ms_tagged.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(
            LANDSAT_SCENE_ID="LC80200392015216LGN00",
            ACQUISITION_DATE="2015-08-04",
            FUSION_COMPLETE="1",
            FUSION_PARAMS="{}",
            TIFFTAG_DATETIME="2016:01:01 00:00:00",
        )
        dst.set_band_description(1, "B2 blue (452-512 nm)")
        dst.update_tags(1, WAVELENGTH_NM="482", STATISTICS_MEAN="10395")
        dst.update_tags(2, wavelength="0.5613", fwhm="0.0573", wavelength_units="Micrometers")
    with rasterio.open(path, "r+") as dst:  # GeoTIFF takes a new colour type only on update
        dst.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red] + [ColorInterp.undefined] * 3
    return path


def test_products_keep_the_scene_and_band_metadata_of_their_ms(tmp_path):
    """Products dropped every dataset tag of their MS (scene id, acquisition date) and every band tag
    (WAVELENGTH_NM, ENVI's wavelength/fwhm), and simulate kept only NBITS and SOURCE, with the bands'
    colour interpretation and wavelengths lost (helper). They are kept now, following --bands; what
    describes the source file rather than the scene (this tool's own record, TIFF file tags, band
    statistics) is not. ENVI's items and a description's bandpass now state wavelengths too."""
    from fusion_cli.pipeline import make_fuser
    from fusion_cli.wald import simulate_files

    ms = _tagged_example_ms(tmp_path)
    out = tmp_path / "o.tif"
    fuser = make_fuser(method="gsa", ratio=2, ms_bands=3, sensor="landsat8")
    fuse_files(EXAMPLE_PAN, ms, out, fuser, FuseOptions(bands=[3, 2, 1]))
    with rasterio.open(out) as o:
        tags = o.tags()
        assert (
            tags["LANDSAT_SCENE_ID"] == "LC80200392015216LGN00" and tags["ACQUISITION_DATE"] == "2015-08-04"
        )
        assert "TIFFTAG_DATETIME" not in tags and json.loads(tags["FUSION_PARAMS"])["bands"] == [3, 2, 1]
        assert o.tags(3)["WAVELENGTH_NM"] == "482" and "STATISTICS_MEAN" not in o.tags(3)
        assert o.tags(2)["wavelength"] == "0.5613" and "WAVELENGTH_NM" not in o.tags(2)
        assert not {k for k in o.tags(1) if not k.startswith("STATISTICS_")}
        # B2: the tag's centre, the description's width; B3: ENVI's centre and width in micrometres
        assert o.tags(3, ns="IMAGERY") == {"CENTRAL_WAVELENGTH_UM": "0.482", "FWHM_UM": "0.06"}
        assert o.tags(2, ns="IMAGERY") == {"CENTRAL_WAVELENGTH_UM": "0.5613", "FWHM_UM": "0.0573"}

    paths = simulate_files(EXAMPLE_PAN, ms, tmp_path / "sim", sensor="landsat8")
    with rasterio.open(ms) as src:
        source_interp = src.colorinterp
    assert source_interp[0] == ColorInterp.blue
    for name in ("ms", "ref"):
        with rasterio.open(getattr(paths, name)) as s:
            assert (
                s.tags()["LANDSAT_SCENE_ID"] == "LC80200392015216LGN00" and "FUSION_COMPLETE" not in s.tags()
            )
            assert s.tags(1)["WAVELENGTH_NM"] == "482" and s.colorinterp == source_interp


def test_an_undeclared_fill_at_the_type_maximum_is_named(tmp_path):
    """A block of 65535 in every band of a uint16 MS without a nodata flag moved GSA's product far
    from it by 45 % at exit 0 without a word (helper). The run names --nodata, as it names
    --zero-nodata for a zero collar; with the value declared nothing is said."""
    with rasterio.open(EXAMPLE_MS) as src:
        ms, profile = src.read(), src.profile
    ms[:, :40, :40] = 65535  # 3 % of the pixels
    path = tmp_path / "ms_fill.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(ms)
    said = fuse_files(EXAMPLE_PAN, path, tmp_path / "a.tif", DetailFuser(2), FuseOptions()).warnings
    assert any(
        w.startswith("3% of the MS pixels are 65535 (the uint16 maximum)") and "--nodata 65535" in w
        for w in said
    )
    quiet = fuse_files(EXAMPLE_PAN, path, tmp_path / "b.tif", DetailFuser(2), FuseOptions(ms_nodata=65535))
    assert not any("--nodata" in w for w in quiet.warnings)
