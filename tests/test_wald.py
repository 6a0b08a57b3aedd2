"""Wald protocol on real pairs (../shared and the in-repository Landsat-8 example): arrays, GeoTIFF
products and the simulate -> pansharpen -> metrics chain."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import (
    EXAMPLE_HOLE,
    EXAMPLE_MS,
    EXAMPLE_PAN,
    example_pair,
    have_shared,
    need_shared,
    restamp,
    write_example_crop,
    write_example_ms_with_hole,
)
from rasterio.enums import MaskFlags
from rasterio.transform import Affine
from rasterio.windows import Window

from fusion_cli.align import shape_ratio
from fusion_cli.cli.main import main
from fusion_cli.errors import FusionError
from fusion_cli.mtf import degrade_ms, degrade_pan
from fusion_cli.sensors import nyquist_gains
from fusion_cli.wald import simulate_arrays, simulate_files


def _read(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            return ds.read()


def _valid(path: Path) -> np.ndarray:
    """Where every band of a raster is valid, by its own nodata or mask."""
    with rasterio.open(path) as ds:
        return (ds.read_masks() > 0).all(axis=0)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_simulate_arrays_wv3() -> None:
    pan = _read(need_shared("wv3_spacenet2", "pan.tif")).astype(np.float64)
    ms = _read(need_shared("wv3_spacenet2", "ms.tif")).astype(np.float64)
    pan_lr, ms_lr, ref = simulate_arrays(pan, ms, 4, "wv3")
    # 325 MS px -> 324 (a whole number of reduced pixels); the three products tile each other
    assert ref.shape == (8, 324, 324) and ms_lr.shape == (8, 81, 81) and pan_lr.shape == (1, 324, 324)
    np.testing.assert_array_equal(ref, ms[:, :324, :324])
    np.testing.assert_allclose(ms_lr, degrade_ms(ref, nyquist_gains("wv3", 8)[0], 4), atol=1e-9)
    # bicubic (antialiased) reduction keeps the PAN's radiometry and lands on the reference grid:
    # the reduced PAN matches the MS intensity better in place than shifted by one pixel
    assert pan_lr.mean() == pytest.approx(pan[:, :1296, :1296].mean(), rel=2e-3)
    intensity = ref[1:7].mean(0)
    in_place = _corr(pan_lr[0, 4:-4, 4:-4], intensity[4:-4, 4:-4])
    assert in_place > 0.85
    # (columns only: the README measures a real +1.9 PAN px vertical content offset in this pair)
    assert in_place > _corr(pan_lr[0, 4:-4, 5:-3], intensity[4:-4, 4:-4]) + 0.02
    assert in_place > _corr(pan_lr[0, 4:-4, 3:-5], intensity[4:-4, 4:-4]) + 0.02
    # PAN by its own MTF is a different (sharper-cut) degradation of the same image
    pan_mtf, _, _ = simulate_arrays(pan, ms, 4, "wv3", pan_mode="mtf")
    assert pan_mtf.shape == pan_lr.shape
    assert 0 < np.abs(pan_mtf - pan_lr).mean() < 0.05 * pan_lr.mean()
    # A HISR pair's MSI was degraded with the one PAN gain in every band: refused, named
    msi = np.concatenate([pan, pan, pan])
    with pytest.raises(FusionError, match="3 bands.*leave --pan-mtf off"):
        simulate_arrays(msi, ms, 4, "wv3", pan_mode="mtf")


def test_simulate_arrays_example() -> None:
    """The example (PAN 320 x 640, MS 160 x 320, ratio 2) reduces to a 160 x 320 reference, its MTF-
    degraded 80 x 160 MS and a bicubic 160 x 320 PAN that lines up with the reference in place (the
    half-PAN-pixel offset of Landsat's grids is a quarter of a reduced pixel)."""
    ex = example_pair()
    pan_lr, ms_lr, ref = simulate_arrays(ex.pan, ex.ms, 2, "landsat8")
    assert ref.shape == (6, 160, 320) and ms_lr.shape == (6, 80, 160) and pan_lr.shape == (1, 160, 320)
    np.testing.assert_array_equal(ref, ex.ms)
    np.testing.assert_allclose(ms_lr, degrade_ms(ref, nyquist_gains("landsat8", 6)[0], 2), atol=1e-9)
    assert pan_lr.mean() == pytest.approx(ex.pan.mean(), rel=1e-3)
    visible = ref[:3].mean(0)[4:-4, 4:-4]  # B, G, R: what Landsat's PAN band sees
    in_place = _corr(pan_lr[0, 4:-4, 4:-4], visible)
    assert in_place > 0.9  # measured 0.946; one pixel off: 0.78-0.89
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        moved = pan_lr[0, 4 + dy : 156 + dy, 4 + dx : 316 + dx]
        assert in_place > _corr(moved, visible) + 0.04, (dy, dx)


def test_simulate_arrays_carries_validity() -> None:
    """A hole in the example MS (65535 under a mask) and one in its PAN (0): the result is the cropped
    MS as given, its validity that of the MS, and a reduced sample is invalid exactly where the filter
    reads a hole pixel (where it carries an impulse placed there); every valid sample equals the run
    without holes (the holes were filled, and reach no further). Without masks nothing changes."""
    ex = example_pair()
    gains, pan_gain = nyquist_gains("landsat8", 6)
    ms_valid = np.ones(ex.ms.shape[1:], bool)
    ms_valid[EXAMPLE_HOLE] = False
    pan_valid = np.ones(ex.pan.shape[1:], bool)
    pan_valid[10:50, 300:400] = False
    ms, pan = np.where(ms_valid, ex.ms, 65535.0), np.where(pan_valid, ex.pan, 0.0)
    for mode in ("bicubic", "mtf"):
        clean = simulate_arrays(ex.pan, ex.ms, 2, "landsat8", mode)
        assert clean.pan_valid is None and clean.ms_valid is None and clean.ref_valid is None
        red = simulate_arrays(pan, ms, 2, "landsat8", mode, pan_valid=pan_valid, ms_valid=ms_valid)
        pan_lr, ms_lr, ref = red  # unpacks as the three arrays, as before
        np.testing.assert_array_equal(ref, ms)
        np.testing.assert_array_equal(red.ref_valid, ms_valid)
        ms_reach = degrade_ms((~ms_valid)[None].astype(np.float64), gains[0], 2)[0] != 0
        pan_reach = degrade_pan((~pan_valid)[None].astype(np.float64), 2, mode, pan_gain)[0] != 0
        np.testing.assert_array_equal(red.ms_valid, ~ms_reach)
        np.testing.assert_array_equal(red.pan_valid, ~pan_reach)
        # ms_lr sample i sits on MS pixel 2i+1; the 41-tap kernel reads 20 px each side of it
        bad_rows, bad_cols = np.flatnonzero(~red.ms_valid.all(1)), np.flatnonzero(~red.ms_valid.all(0))
        assert (bad_rows.min(), bad_rows.max(), bad_cols.min(), bad_cols.max()) == (20, 59, 50, 109)
        np.testing.assert_array_equal(ms_lr[:, red.ms_valid], clean.ms[:, red.ms_valid])
        np.testing.assert_array_equal(pan_lr[:, red.pan_valid], clean.pan[:, red.pan_valid])
    with pytest.raises(FusionError, match="ms_valid"):
        simulate_arrays(ex.pan, ex.ms, 2, "landsat8", ms_valid=pan_valid)


def _reach(centres: np.ndarray, hole: slice, half: int) -> np.ndarray:
    """Which reduced samples (on MS pixels `centres`) a filter of half-width `half` reads `hole` from."""
    return (centres + half >= hole.start) & (centres - half < hole.stop)


@pytest.mark.parametrize("how", ["mask", "nodata"])
def test_simulate_files_keeps_the_ms_validity(tmp_path: Path, how: str) -> None:
    """The audit's case, the example MS with a 40 x 80 px hole: 65535 under an internal mask, or 0 as
    nodata. Before, ms_ref.tif had no mask (3200 px of 65535 counted valid) and ms_lr.tif counted 740
    blurred px >= 60000 valid; with nodata 0, the float32 ms_lr.tif had nodata 0 and 521 blurred
    ramps 0 < v < 4000 counted valid. Now the reference is invalid exactly over the hole, the reduced
    MS wherever its filter reads it (20 MS px each side), as the input said it (an internal mask, or
    nodata: NaN in float32, where a blurred DN may take any other value), and every valid pixel of the
    three equals the run on the MS without the hole."""
    clean = simulate_files(EXAMPLE_PAN, EXAMPLE_MS, tmp_path / "clean", sensor="landsat8")
    ms_path = write_example_ms_with_hole(tmp_path / "ms.tif", how)
    res = simulate_files(EXAMPLE_PAN, ms_path, tmp_path / "holed", sensor="landsat8")
    hole = np.zeros((160, 320), bool)
    hole[EXAMPLE_HOLE] = True
    centres = [np.arange(n) * 2 + 1 for n in (80, 160)]
    reach = np.outer(*(_reach(c, h, 20) for c, h in zip(centres, EXAMPLE_HOLE, strict=True)))
    for path, expected in ((res.ref, ~hole), (res.ms, ~reach), (res.pan, np.ones((160, 320), bool))):
        valid = _valid(path)
        np.testing.assert_array_equal(valid, expected, err_msg=path.name)
        got, want = _read(path), _read(Path(clean.ref).parent / path.name)
        np.testing.assert_array_equal(got[:, valid], want[:, valid], err_msg=path.name)
    with rasterio.open(res.ms) as lr, rasterio.open(res.ref) as ref:
        if how == "mask":
            assert lr.nodata is None and lr.mask_flag_enums[0] == [MaskFlags.per_dataset]
            assert ref.nodata is None and ref.mask_flag_enums[0] == [MaskFlags.per_dataset]
            assert (ref.read()[:, hole] == 65535).all()  # the original DN, kept under the mask
        else:
            assert np.isnan(lr.nodata) and np.isnan(lr.read()[:, reach]).all()
            assert ref.nodata == 0 and (ref.read()[:, hole] == 0).all()


def test_simulate_files_pan_nodata_and_nan_ms(tmp_path: Path) -> None:
    """A PAN with nodata 0 over a block and a float32 MS with NaN nodata over the hole, reduced to the
    source types. Before, the NaN were refused as 'not its nodata' and the PAN's nodata filtered with
    the data. Now pan_lr (uint16, nodata 0) is invalid where the bicubic reduction reads the block, its
    valid pixels those of the run without it; the MS keeps NaN as nodata."""
    with rasterio.open(EXAMPLE_PAN) as src:
        pan, profile = src.read(), src.profile
    pan[:, 10:50, 300:400] = 0
    pan_path = tmp_path / "pan.tif"
    with rasterio.open(pan_path, "w", **(profile | {"nodata": 0})) as dst:
        dst.write(pan)
    ms_path = write_example_ms_with_hole(tmp_path / "ms.tif", "nan")
    clean = simulate_files(EXAMPLE_PAN, EXAMPLE_MS, tmp_path / "clean", sensor="landsat8", dtype="source")
    res = simulate_files(pan_path, ms_path, tmp_path / "holed", sensor="landsat8", dtype="source")
    # imresize by 1/2: pan_lr pixel i (PAN centre 2i + 0.5) reads PAN pixels 2i-3 .. 2i+4
    centres = np.arange(160) * 2 + 0.5, np.arange(320) * 2 + 0.5
    reach = np.outer(
        *(_reach(c, h, 3.5) for c, h in zip(centres, (slice(10, 50), slice(300, 400)), strict=True))
    )
    with rasterio.open(res.pan) as lr:
        assert lr.dtypes[0] == "uint16" and lr.nodata == 0
        assert (lr.read()[:, reach] == 0).all()
    np.testing.assert_array_equal(_valid(res.pan), ~reach)
    np.testing.assert_array_equal(_read(res.pan)[:, ~reach], _read(clean.pan)[:, ~reach])
    with rasterio.open(res.ms) as lr, rasterio.open(res.ref) as ref:
        assert lr.dtypes[0] == ref.dtypes[0] == "float32" and np.isnan(lr.nodata) and np.isnan(ref.nodata)
        assert (~_valid(res.ms)).sum() == 40 * 60 and (~_valid(res.ref)).sum() == 40 * 80


def test_simulate_arrays_rejects_bad_input() -> None:
    ms = np.zeros((4, 10, 10))
    with pytest.raises(FusionError, match="too small"):
        simulate_arrays(np.zeros((1, 40, 40)), ms, 4)
    with pytest.raises(FusionError, match="ratio"):
        simulate_arrays(np.zeros((1, 40, 40)), ms, 1)
    with pytest.raises(FusionError, match="unknown sensor"):
        simulate_arrays(np.zeros((1, 400, 400)), np.zeros((4, 100, 100)), 4, "spot42")
    # an unmasked NaN spread through the filters into 64 NaN samples of ms_lr; masked, it is filled
    pair = example_pair()
    ms_nan = pair.ms.copy()
    ms_nan[2, 40, 40] = np.nan
    with pytest.raises(FusionError, match="the ms has NaN or infinite values at 1 px; pass ms_valid"):
        simulate_arrays(pair.pan, ms_nan, 2, "landsat8")
    valid = np.ones(ms_nan.shape[1:], bool)
    valid[40, 40] = False
    assert np.isfinite(simulate_arrays(pair.pan, ms_nan, 2, "landsat8", ms_valid=valid).ms).all()
    names = ("MS", "PAN")
    assert shape_ratio((1, 1207, 1254), (4, 603, 627), names) == 2  # Landsat's extra PAN row
    with pytest.raises(FusionError, match="by other than an integer ratio"):
        shape_ratio((1, 100, 150), (4, 100, 100), names)


def test_simulate_files_georeferenced(tmp_path: Path) -> None:
    pan_path = need_shared("wv3_spacenet2", "pan.tif")
    ms_path = need_shared("wv3_spacenet2", "ms.tif")
    res = simulate_files(pan_path, ms_path, tmp_path, sensor="wv3")
    assert res.ratio == 4 and res.sensor == "wv3" and res.pan_mode == "bicubic"
    with rasterio.open(pan_path) as p, rasterio.open(ms_path) as m:
        pan_tf, ms_tf, crs, ms_data = p.transform, m.transform, m.crs, m.read()
    with rasterio.open(res.pan) as a, rasterio.open(res.ms) as b, rasterio.open(res.ref) as c:
        # pixel sizes times the ratio, same origin: the reduced PAN sits on the reference's grid
        assert a.transform.almost_equals(pan_tf @ Affine.scale(4))
        assert a.transform.almost_equals(c.transform)
        assert b.transform.almost_equals(ms_tf @ Affine.scale(4))
        assert c.transform == ms_tf
        assert a.crs == b.crs == c.crs == crs
        assert (a.width, b.width, c.width) == (324, 81, 324)
        assert a.dtypes[0] == b.dtypes[0] == "float32" and c.dtypes[0] == "uint16"
        np.testing.assert_array_equal(c.read(), ms_data[:, :324, :324])
        assert b.tags()["WALD_SENSOR"] == "wv3" and b.tags()["WALD_RATIO"] == "4"
    with pytest.raises(FusionError, match="--overwrite"):
        simulate_files(pan_path, ms_path, tmp_path, sensor="wv3")


def test_simulate_files_georeferenced_example(tmp_path: Path) -> None:
    """The example's reduced files keep each input's origin and double its pixel size, so the reduced
    PAN keeps Landsat's half-pixel offset to the reference; the reference is the MS as stored."""
    res = simulate_files(EXAMPLE_PAN, EXAMPLE_MS, tmp_path, sensor="landsat8")
    assert res.ratio == 2 and res.sensor == "landsat8" and res.pan_mode == "bicubic"
    with rasterio.open(EXAMPLE_PAN) as p, rasterio.open(EXAMPLE_MS) as m:
        pan_tf, ms_tf, crs, ms_data = p.transform, m.transform, m.crs, m.read()
    with rasterio.open(res.pan) as a, rasterio.open(res.ms) as b, rasterio.open(res.ref) as c:
        assert a.transform.almost_equals(pan_tf @ Affine.scale(2))
        assert b.transform.almost_equals(ms_tf @ Affine.scale(2)) and c.transform == ms_tf
        # reduced PAN and reference: same pixel size, origins a quarter of that pixel apart
        assert (a.transform.c - c.transform.c, a.transform.f - c.transform.f) == (-7.5, 7.5)
        assert a.crs == b.crs == c.crs == crs
        assert (a.shape, b.shape, c.shape) == ((160, 320), (80, 160), (160, 320))
        assert a.dtypes[0] == b.dtypes[0] == "float32" and c.dtypes[0] == "uint16"
        np.testing.assert_array_equal(c.read(), ms_data)
        assert b.tags()["WALD_SENSOR"] == "landsat8" and b.tags()["WALD_RATIO"] == "2"
    with pytest.raises(FusionError, match="--overwrite"):
        simulate_files(EXAMPLE_PAN, EXAMPLE_MS, tmp_path, sensor="landsat8")


def test_simulate_files_without_georeferencing(tmp_path: Path) -> None:
    """FuseBox pair 1 (uint8, 800 x 800 PAN px); without ../shared, the example written without
    georeferencing (uint16, 320 x 640)."""
    if have_shared("landsat7_etm_fusebox"):
        pan_path = need_shared("landsat7_etm_fusebox", "1_pan.tif")
        ms_path = need_shared("landsat7_etm_fusebox", "1_ms.tif")
        sensor, (h, w), dtype = "landsat7", (400, 400), "uint8"
    else:
        pan_path, ms_path = write_example_crop(tmp_path, "nogeo", georef=False)
        sensor, (h, w), dtype = "landsat8", (160, 320), "uint16"
    res = simulate_files(pan_path, ms_path, tmp_path / "out", sensor=sensor, dtype="source")
    assert res.ratio == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        for path, shape in ((res.pan, (1, h, w)), (res.ms, (6, h // 2, w // 2)), (res.ref, (6, h, w))):
            with rasterio.open(path) as ds:
                assert ds.crs is None and ds.transform.is_identity
                assert (ds.count, ds.height, ds.width) == shape
                assert ds.dtypes[0] == dtype
    # never writes over an input
    with pytest.raises(FusionError, match="overwrite an input"):
        simulate_files(res.pan, res.ms, tmp_path / "out", sensor=sensor, overwrite=True)


@pytest.mark.parametrize(
    ("source", "sensor", "ratio"), [("wv2", "wv2", 4), ("landsat8-example", "landsat8", 2)]
)
def test_simulate_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, sensor: str, ratio: int
) -> None:
    if source == "wv2":
        pan, ms = (str(need_shared("wv2_spacenet6", f"{k}_1.tif")) for k in ("pan", "ms"))
    else:
        pan, ms = str(EXAMPLE_PAN), str(EXAMPLE_MS)
    with pytest.raises(SystemExit) as exc:
        main(["simulate", pan, ms, "-o", str(tmp_path), "--sensor", "nosuch"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown sensor" in err and "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["simulate", pan, ms, "-o", str(tmp_path), "--sensor", sensor, "--pan-mtf", "--json"])
    assert exc.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ratio"] == ratio and summary["pan_mode"] == "mtf"
    assert Path(summary["ms_lr"]).exists()


def test_simulate_then_pansharpen_then_metrics(tmp_path: Path) -> None:
    """The simulated pair runs through `pansharpen` unchanged and its product lands on the reference grid."""
    from fusion_cli.metrics import ergas, sam
    from fusion_cli.pipeline import pansharpen

    res = simulate_files(
        need_shared("wv3_spacenet2", "pan.tif"),
        need_shared("wv3_spacenet2", "ms.tif"),
        tmp_path,
        sensor="wv3",
    )
    out = tmp_path / "exp.tif"
    pansharpen(res.pan, res.ms, out, method="exp", sensor="wv3", out_dtype="float32")
    with rasterio.open(out) as f, rasterio.open(res.ref) as r:
        assert f.transform.almost_equals(r.transform) and f.shape == r.shape and f.crs == r.crs
        fused, ref = f.read().astype(np.float64), r.read().astype(np.float64)
    # interpolation alone: a few degrees of SAM, ERGAS ~3-4 on this scene (golden README: 4.30 / 3.33)
    assert 3.0 < sam(ref, fused) < 6.0
    assert 2.0 < ergas(ref, fused, 4) < 5.0


def test_simulate_landsat_example_then_metrics_ref(
    tmp_path: Path, landsat_demo: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The example's reduced PAN grid sits a quarter pixel off the MS (reference) grid and the product
    lacks its half-covered first row and column (159 x 319 against 160 x 320): `fusion metrics --ref`
    lines them up to the nearest pixel (product (0, 0) over reference (1, 1)), with the ratio the
    product records."""
    from fusion_cli.metrics import ergas, sam
    from fusion_cli.pipeline import pansharpen

    sim = tmp_path / "sim"
    with pytest.raises(SystemExit) as exc:
        main(["simulate", str(landsat_demo["pan"]), str(landsat_demo["ms"]), "-o", str(sim), "--sensor",
              "landsat8", "--json"])  # fmt: skip
    assert exc.value.code == 0 and json.loads(capsys.readouterr().out)["ratio"] == 2
    out = tmp_path / "x.tif"
    pansharpen(sim / "pan_lr.tif", sim / "ms_lr.tif", out, method="bdsd-pc", sensor="landsat8")
    with pytest.raises(SystemExit) as exc:
        main(["metrics", str(out), "--ref", str(sim / "ms_ref.tif"), "--json"])
    assert exc.value.code == 0, capsys.readouterr().err
    got = json.loads(capsys.readouterr().out)
    with rasterio.open(out) as f, rasterio.open(sim / "ms_ref.tif") as r:
        assert (f.shape, r.shape) == ((159, 319), (160, 320))
        fused, ref = f.read().astype(np.float64), r.read()[:, 1:, 1:].astype(np.float64)
    assert got["ERGAS"] == pytest.approx(ergas(ref, fused, 2), rel=1e-6)
    assert got["SAM"] == pytest.approx(sam(ref, fused), rel=1e-6)
    assert got["ERGAS"] < 4 and got["Q2n"] > 0.85


def test_reduced_uint8_pair_keeps_the_dn_scale_of_its_source(tmp_path):
    """`fusion simulate` writes float32 DN; a model with a DN scale per dtype (the default landsat
    model: uint8 255, uint16 65535) must still scale a reduced uint8 scene by 255 (before this, the
    evaluate table of FuseBox scenes had the network at ERGAS ~45)."""
    from fusion_cli import raster
    from fusion_cli.assess import EvalOptions
    from fusion_cli.assess import evaluate as score_product
    from fusion_cli.pipeline import FuseOptions, fuse_files, make_fuser
    from fusion_cli.wald import simulate_files

    d = need_shared("landsat7_etm_fusebox")
    crop = {}
    for kind, side in (("pan", 256), ("ms", 128)):
        with rasterio.open(d / f"19_{kind}.tif") as src:
            data = src.read(window=((0, side), (0, side)))
        if kind == "ms":
            data = data[[2, 1, 0, 3, 4, 5]]  # FuseBox R, G, B, ... -> the model's B, G, R, ...
        crop[kind] = tmp_path / f"{kind}.tif"
        with rasterio.open(
            crop[kind], "w", driver="GTiff", count=data.shape[0], height=side, width=side, dtype="uint8"
        ) as dst:
            dst.write(data)
    sim = simulate_files(crop["pan"], crop["ms"], tmp_path / "sim", sensor="landsat7")
    with rasterio.open(sim.ms) as ds:
        assert ds.dtypes[0] == "float32" and ds.tags()[raster.SOURCE_DTYPE_TAG] == "uint8"
    fuser = make_fuser(model="landsat", device="cpu")
    out = tmp_path / "fused.tif"
    fuse_files(sim.pan, sim.ms, out, fuser, FuseOptions())
    with rasterio.open(out) as ds:  # the network ran in the units it was trained in
        assert json.loads(ds.tags()["FUSION_PARAMS"])["dn_scale"] == 255.0
    scores = score_product(out, ref=sim.ref, opts=EvalOptions(ratio=2, sensor="landsat7"))
    print(f"\nreduced FuseBox 19 crop, landsat model: Q2n {scores['Q2n']:.3f} ERGAS {scores['ERGAS']:.2f}")
    assert scores["ERGAS"] < 6.0 and scores["Q2n"] > 0.8  # measured 3.9 / 0.90 on this crop


def test_simulated_images_keep_the_scale_offset_of_their_dn(tmp_path: Path) -> None:
    """The reduced pair and the reference hold the inputs' DN: they keep their scale, offset and unit
    (ms_ref.tif, "the original DN, unchanged", lost its Collection-2 scaling)."""
    c2 = {"scales": [2.75e-05], "offsets": [-0.2], "units": ["reflectance"]}
    pan, ms = write_example_crop(tmp_path, "c2", Window(0, 0, 64, 64))
    restamp(ms, ms, **{k: v * 6 for k, v in c2.items()})
    restamp(pan, pan, **c2)
    res = simulate_files(pan, ms, tmp_path / "sim", sensor="landsat8")
    for path, n in ((res.pan, 1), (res.ms, 6), (res.ref, 6)):
        with rasterio.open(path) as ds:
            assert (ds.scales, ds.offsets, ds.units) == ((2.75e-05,) * n, (-0.2,) * n, ("reflectance",) * n)


def test_simulate_a_hisr_pair_on_one_grid(tmp_path: Path) -> None:
    """An HSI and an MSI on one grid (the San Francisco Hyperion + ALI pair) had no Wald protocol on
    the command line ("pixel-size ratio is 1, not 3"), though the HISR cards are measured that way:
    `--ratio 3` now reduces the HSI only (its MTF, decimation) and keeps the MSI as it is, as the
    recipes' pairs; `fusion evaluate` then scores HISR methods on it. A one-band image on one grid
    is still refused."""
    from fusion_cli.training.data import load_scene, reduce_scene

    msi, hsi = need_shared("eo1_sanfrancisco", "ms.tif"), need_shared("eo1_sanfrancisco", "hs.tif")
    sim = simulate_files(msi, hsi, tmp_path / "sim", sensor="hyperion", ratio=3)
    assert sim.pan_mode == "keep" and sim.ratio == 3
    with rasterio.open(sim.pan) as p, rasterio.open(sim.ms) as m, rasterio.open(sim.ref) as r:
        pan_lr, ms_lr, ref = p.read(), m.read(), r.read()
        assert m.tags()["WALD_PAN_MODE"] == "keep"
    with rasterio.open(msi) as a, rasterio.open(hsi) as b:
        h, w = b.height // 3 * 3, b.width // 3 * 3
        np.testing.assert_array_equal(pan_lr, a.read()[:, :h, :w])
        np.testing.assert_array_equal(ref, b.read()[:, :h, :w])
    assert ms_lr.shape == (47, h // 3, w // 3)
    scene = load_scene(msi, hsi, ratio=1, sensor="hyperion")
    recipe_pair = reduce_scene(scene, 3, task="hisr")
    np.testing.assert_allclose(ms_lr, recipe_pair.ms * scene.dn_max, atol=1e-2)
    with pytest.raises(FusionError, match="ratio is 1, not 3"):
        simulate_files(_one_band(msi, tmp_path), hsi, tmp_path / "bad", sensor="hyperion", ratio=3)


def _one_band(path: Path, tmp_path: Path) -> Path:
    with rasterio.open(path) as ds:
        data, profile = ds.read(1)[None], ds.profile | {"count": 1}
    out = tmp_path / "one.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(data)
    return out
