"""align: grid relations from real geotransforms, MS placement, and the PAN/MS shift estimate."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rasterio
import rasterio.control
from conftest import EXAMPLE_MS, EXAMPLE_PAN, example_pair, have_shared, need_shared, write_example_crop
from rasterio.transform import from_origin

from fusion_cli import align
from fusion_cli.errors import FusionError


def _pair(*parts_pan, parts_ms):
    return rasterio.open(need_shared(*parts_pan)), rasterio.open(need_shared(*parts_ms))


def test_landsat8_half_pixel_offset_and_odd_pan():
    """PAN 1207 x 1254 offset by half a PAN pixel: the output is the PAN grid over the MS area."""
    pan, ms = _pair("landsat8_oli", "l8_B8.tif", parts_ms=("landsat8_oli", "ms.tif"))
    with pan, ms:
        g = align.relate_grids(pan, ms, expected_ratio=2)
        assert g.ratio == 2 and g.georeferenced and g.crs == pan.crs
        # The half-covered first row/column of the PAN and its extra row fall outside the MS.
        assert (g.row0, g.col0, g.height, g.width) == (1, 1, 1205, 1253)
        assert g.out_transform == pan.transform @ rasterio.Affine.translation(1, 1)
        left, top = g.out_transform * (0, 0)
        right, bottom = g.out_transform * (g.width, g.height)
        assert ms.bounds.left <= left and right <= ms.bounds.right
        assert ms.bounds.bottom <= bottom and top <= ms.bounds.top
        # Sample centres land a quarter MS pixel off the MS centres: placed by the transforms.
        uy = g.ms_centres(g.row0, 4, axis=0)
        ux = g.ms_centres(g.col0, 4, axis=1)
        np.testing.assert_allclose(uy - np.floor(uy), 0.25)
        np.testing.assert_allclose(ux - np.floor(ux), 0.25)
        # World position of a low-res sample centre == world position of that MS coordinate.
        x_world = pan.transform.c + pan.transform.a * (g.col0 + 2 * 3 + 1)
        x_ms = ms.transform.c + ms.transform.a * (ux[3] + 0.5)
        assert x_world == pytest.approx(x_ms)


def test_example_half_pixel_offset_follows_the_transforms():
    """The in-repository example (a crop of a Landsat-8 scene) keeps the half-PAN-pixel offset: the
    output is the PAN grid from its second row and column, 319 x 639 inside the MS area."""
    with rasterio.open(EXAMPLE_PAN) as pan, rasterio.open(EXAMPLE_MS) as ms:
        g = align.relate_grids(pan, ms, expected_ratio=2)
        assert g.ratio == 2 and g.georeferenced and g.crs == pan.crs
        assert (g.row0, g.col0, g.height, g.width) == (1, 1, 319, 639)
        assert g.out_transform == pan.transform @ rasterio.Affine.translation(1, 1)
        left, top = g.out_transform * (0, 0)
        right, bottom = g.out_transform * (g.width, g.height)
        assert (left, top) == (ms.bounds.left + 7.5, ms.bounds.top - 7.5)
        assert ms.bounds.left <= left and right <= ms.bounds.right
        assert ms.bounds.bottom <= bottom and top <= ms.bounds.top
        uy, ux = g.ms_centres(g.row0, 4, axis=0), g.ms_centres(g.col0, 4, axis=1)
        np.testing.assert_allclose(uy, [0.25, 1.25, 2.25, 3.25])
        np.testing.assert_allclose(ux, [0.25, 1.25, 2.25, 3.25])
        y_world = pan.transform.f + pan.transform.e * (g.row0 + 2 * 2 + 1)
        y_ms = ms.transform.f + ms.transform.e * (uy[2] + 0.5)
        assert y_world == pytest.approx(y_ms)


def test_wv2_non_exact_ratio_passes():
    pan, ms = _pair("wv2_spacenet6", "pan_1.tif", parts_ms=("wv2_spacenet6", "ms_1.tif"))
    with pan, ms:
        g = align.relate_grids(pan, ms, expected_ratio=4)
    assert g.ratio == 4 and g.ratio_measured[1] == pytest.approx(4.00025, abs=1e-5)
    assert g.shape == (600, 600) and (g.row0, g.col0) == (0, 0)


def test_wv3_exact_grid_resamples_to_an_exact_copy(tmp_path):
    """Grids with a common corner (the WV3 pair; without ../shared, the example's MS under a PAN grid
    put on its corner): the MS at the PAN blocks' centres is the MS itself, sample for sample."""
    if have_shared("wv3_spacenet2"):
        pan, ms = _pair("wv3_spacenet2", "pan.tif", parts_ms=("wv3_spacenet2", "ms.tif"))
        r, shape = 4, (1300, 1300)
    else:
        ms = rasterio.open(EXAMPLE_MS)
        pan_tf = ms.transform * rasterio.Affine.scale(0.5)
        pan, r, shape = _synthetic(tmp_path, "pan.tif", ms.crs, pan_tf, (320, 640)), 2, (320, 640)
    with pan, ms:
        g = align.relate_grids(pan, ms, expected_ratio=r)
        data = ms.read(window=rasterio.windows.Window(0, 0, 40, 40)).astype(np.float32)
    assert g.shape == shape
    uy = g.ms_centres(32, 8, 0)  # PAN row 32 = MS row 32 / r
    ux = g.ms_centres(16, 8, 1)
    (y0, y1), (x0, x1) = align.support(uy), align.support(ux)
    out = align.resample(
        data[:, y0:y1, x0:x1], align.cubic_matrix(uy, y0, y1 - y0), align.cubic_matrix(ux, x0, x1 - x0)
    )
    np.testing.assert_array_equal(out, data[:, 32 // r : 32 // r + 8, 16 // r : 16 // r + 8])


def _synthetic(tmp_path, name, crs, transform, shape, count=1):
    path = tmp_path / name
    with rasterio.open(
        path, "w", driver="GTiff", width=shape[1], height=shape[0], count=count, dtype="uint16",
        crs=crs, transform=transform,
    ) as dst:  # fmt: skip
        dst.write(np.ones((count, *shape), np.uint16))
    return rasterio.open(path)


def test_bad_pairs_raise_one_line_errors(tmp_path):
    pan = _synthetic(tmp_path, "p.tif", "EPSG:32631", from_origin(0, 1000, 1, 1), (400, 400))
    cases = {
        "CRS mismatch": _synthetic(tmp_path, "a.tif", "EPSG:32632", from_origin(0, 1000, 4, 4), (100, 100)),
        "not an integer": _synthetic(
            tmp_path, "b.tif", "EPSG:32631", from_origin(0, 1000, 3.7, 3.7), (100, 100)
        ),
        "do not overlap": _synthetic(
            tmp_path, "c.tif", "EPSG:32631", from_origin(5000, 1000, 4, 4), (100, 100)
        ),
        "no CRS": _synthetic(tmp_path, "d.tif", None, from_origin(0, 1000, 4, 4), (100, 100)),
        "ratios differ": _synthetic(tmp_path, "e.tif", "EPSG:32631", from_origin(0, 1000, 4, 2), (100, 100)),
        "MS grid is rotated or sheared": _synthetic(
            tmp_path,
            "s.tif",
            "EPSG:32631",
            from_origin(0, 1000, 4, 4) * rasterio.Affine.shear(5, 0),
            (100, 100),
        ),
    }
    for message, ms in cases.items():
        with pytest.raises(FusionError, match=message) as e:
            align.relate_grids(pan, ms, expected_ratio=4)
        assert "\n" not in str(e.value)
    # an MS without any georeferencing beside a georeferenced PAN was "not north-up" (its identity
    # transform), and one with GCPs only "has no CRS"
    bare = _synthetic(tmp_path, "f.tif", None, rasterio.Affine.identity(), (100, 100))
    with pytest.raises(FusionError, match="the MS has no geotransform but the other input has one; give"):
        align.relate_grids(pan, bare)
    with rasterio.open(tmp_path / "h.tif", "w", **bare.profile) as dst:
        dst.write(np.ones((1, 100, 100), np.uint16))
        dst.gcps = ([rasterio.control.GroundControlPoint(0, 0, 0, 1000)], pan.crs)
    with rasterio.open(tmp_path / "h.tif") as gcp_only, pytest.raises(FusionError, match="ground control"):
        align.relate_grids(pan, gcp_only)
    good = _synthetic(tmp_path, "g.tif", "EPSG:32631", from_origin(0, 1000, 2, 2), (200, 200))
    with pytest.raises(FusionError, match="ratio is 2 but the model expects 4"):
        align.relate_grids(pan, good, expected_ratio=4)
    assert align.relate_grids(pan, good).ratio == 2


def test_no_georef_pairs_by_exact_size_ratio(tmp_path):
    """The example written without georeferencing (as the FuseBox pairs are): paired by sizes."""
    pan_path, ms_path = write_example_crop(tmp_path, "nogeo", georef=False)
    pan, ms = rasterio.open(pan_path), rasterio.open(ms_path)
    with pan, ms, pytest.warns(UserWarning, match="no georeferencing"):
        g = align.relate_grids(pan, ms, expected_ratio=2)
    assert not g.georeferenced and g.crs is None and g.shape == (320, 640)
    assert (g.row0, g.col0, g.height, g.width) == (0, 0, 320, 640)  # the whole PAN, not the grid's offset
    with pytest.raises(FusionError, match="not an exact integer ratio"):
        align.relate_shapes((801, 800), (400, 400))
    with pytest.raises(FusionError, match="expects 4"):
        align.relate_shapes((800, 800), (400, 400), expected_ratio=4)


@pytest.mark.parametrize("source", ["wv3", "landsat8-example"])
def test_phase_correlation_recovers_a_known_subpixel_shift(source):
    img = need_shared("wv3_spacenet2", "pan.tif") if source == "wv3" else EXAMPLE_PAN
    with rasterio.open(img) as ds:
        base = ds.read(1, window=rasterio.windows.Window(0, 0, 512, 512)).astype(np.float64)
    n, m = base.shape  # the example: 320 x 512
    # Shift by (+1.5, -2.25) px with an exact Fourier shift.
    ky, kx = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(m), indexing="ij")
    moved = np.fft.ifft2(np.fft.fft2(base) * np.exp(-2j * np.pi * (ky * 1.5 + kx * -2.25))).real
    dy, dx, peak = align.phase_correlation(base, moved, upsample=20)
    assert (dy, dx) == pytest.approx((1.5, -2.25), abs=0.05)
    assert peak > 0.5


@pytest.mark.parametrize("pair", [1, 7, 19, 25])
def test_shift_estimate_on_fusebox_known_one_pixel_offset(pair):
    """FuseBox PAN sits one PAN pixel up-left of the MS (README: -1.0 / -1.05 in every pair)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pan = rasterio.open(need_shared("landsat7_etm_fusebox", f"{pair}_pan.tif")).read(1)
        ms = rasterio.open(need_shared("landsat7_etm_fusebox", f"{pair}_ms.tif")).read()
    dy, dx, _ = align.estimate_shift(pan.astype(np.float64), ms.astype(np.float64), 2)
    assert dy == pytest.approx(-1.0, abs=0.2)
    assert dx == pytest.approx(-1.05, abs=0.2)


def test_shift_estimate_on_the_example_sees_the_grid_offset_and_known_shifts():
    """Indexed by array position, the example's PAN content sits half a PAN pixel down-right of the
    MS (its geotransforms say so): the estimate is within 0.25 px of it, and rolling the PAN by whole
    pixels moves the estimate by exactly those pixels."""
    ex = example_pair()
    pan, ms = ex.pan[0], ex.ms[:, 4:-4, 4:-4]
    dy, dx, peak = align.estimate_shift(pan[8:-8, 8:-8], ms, 2)
    assert (dy, dx) == pytest.approx((0.5, 0.5), abs=0.25) and peak > 0.5  # measured 0.3, 0.4
    for sy, sx in ((2, 0), (0, -2), (4, 2)):
        moved = np.roll(pan, (sy, sx), axis=(0, 1))[8:-8, 8:-8]
        my, mx, _ = align.estimate_shift(moved, ms, 2)
        assert (my - dy, mx - dx) == pytest.approx((sy, sx), abs=0.15), (sy, sx)


def test_shift_estimate_on_wv3():
    """WV3: README measures (+1.9, -0.2) PAN px, consistent over the quadrants."""
    pan = rasterio.open(need_shared("wv3_spacenet2", "pan.tif")).read(1).astype(np.float64)
    ms = rasterio.open(need_shared("wv3_spacenet2", "ms.tif")).read().astype(np.float64)
    dy, dx, _ = align.estimate_shift(pan, ms, 4)
    assert dy == pytest.approx(1.9, abs=0.3)
    assert dx == pytest.approx(-0.2, abs=0.3)
    # Masking a quarter of the scene as invalid does not move the estimate much.
    valid = np.ones_like(pan, bool)
    valid[:650, :650] = False
    dy2, dx2, _ = align.estimate_shift(pan, ms, 4, valid)
    assert (dy2, dx2) == pytest.approx((dy, dx), abs=0.5)


@pytest.mark.parametrize("featureless", ["PAN", "MS"])
def test_shift_estimate_refuses_a_featureless_image(featureless):
    """A constant PAN once gave 0/0 in the phase correlation (numpy's RuntimeWarning) and an arbitrary
    peak reported as a shift of (-6, -6) px; a constant image has no shift to measure."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    pan = 400 + 300 * np.sin(6 * yy) * np.cos(5 * xx) + rng.random((64, 64))
    ms = np.stack([pan.reshape(16, 4, 16, 4).mean(axis=(1, 3)) * (0.8 + 0.1 * b) for b in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw numpy warning either
        dy, dx, _ = align.estimate_shift(pan, ms, 4)  # the textured pair: measured, aligned
        assert (dy, dx) == pytest.approx((0, 0), abs=0.5)
        if featureless == "PAN":
            pan = np.full_like(pan, 700.0)
        else:
            ms = np.full_like(ms, 500.0)
        with pytest.raises(align.ShiftNotMeasurable, match=f"{featureless} is featureless"):
            align.estimate_shift(pan, ms, 4)
        with pytest.raises(align.ShiftNotMeasurable):
            align.phase_correlation(np.full((16, 16), 3.0), rng.random((16, 16)))


def test_too_few_valid_pixels_is_a_shift_that_cannot_be_measured():
    """The intensity fit on under 16 valid pixels is a ShiftNotMeasurable like the other cases, so a
    run without --coregister fuses on (with a warning) instead of stopping."""
    rng = np.random.default_rng(4)
    ms, target = rng.random((3, 8, 8)), rng.random((8, 8))
    valid = np.zeros((8, 8), dtype=bool)
    valid[0, :5] = True
    with pytest.raises(align.ShiftNotMeasurable, match="too few valid pixels"):
        align.fit_intensity(ms, target, valid)
    assert align.fit_intensity(ms, target, np.ones((8, 8), dtype=bool)).shape == (8, 8)


def _grid(transform: rasterio.Affine, shape: tuple[int, int], crs: str | None = "EPSG:32616"):
    from types import SimpleNamespace

    return SimpleNamespace(
        transform=transform, crs=rasterio.crs.CRS.from_string(crs) if crs else None,
        height=shape[0], width=shape[1],
    )  # fmt: skip


def test_block_windows_line_grids_up_by_their_transforms():
    """The one rule metrics, report and simulate compare grids by: the ratio from the pixel sizes, the
    coarse grid's corner to the nearest fine pixel (ties to the earlier one), the common area."""
    ms = _grid(from_origin(475, 1000, 30, 30), (160, 320))
    pan = _grid(from_origin(467.5, 1007.5, 15, 15), (320, 640))  # Landsat: half a PAN pixel off
    product = _grid(from_origin(482.5, 992.5, 15, 15), (319, 639))  # what pansharpen writes
    r, win, (p_win,) = align.block_windows(ms, [pan])
    assert r == 2 and (win.row_off, win.col_off, win.height, win.width) == (0, 0, 160, 320)
    assert (p_win.row_off, p_win.col_off, p_win.height, p_win.width) == (0, 0, 320, 640)
    r, win, (f_win, p_win) = align.block_windows(ms, [product, pan], 2, ("MS", "product", "PAN"))
    assert (win.row_off, win.col_off, win.height, win.width) == (1, 1, 159, 319)
    assert (f_win.row_off, f_win.col_off, f_win.height, f_win.width) == (1, 1, 318, 638)
    assert (p_win.row_off, p_win.col_off) == (2, 2)  # the same ground as product pixel (1, 1)
    # same pixel size, a quarter pixel apart (a simulated Landsat pair): nearest pixel, common area
    ref = _grid(from_origin(475, 1000, 30, 30), (160, 320))
    fused = _grid(from_origin(497.5, 977.5, 30, 30), (159, 319))
    _, win, (f_win,) = align.block_windows(ref, [fused], 1, ("reference", "product"))
    assert (win.row_off, win.col_off, win.height, win.width) == (1, 1, 159, 319)
    assert (f_win.row_off, f_win.col_off) == (0, 0)
    with pytest.raises(FusionError, match="ratio is 2, not 1"):
        align.block_windows(ms, [pan], 1)
    with pytest.raises(FusionError, match="do not overlap"):
        align.block_windows(ms, [_grid(from_origin(99475, 1000, 15, 15), (320, 640))])
    with pytest.raises(FusionError, match="CRS mismatch"):
        align.block_windows(ms, [_grid(pan.transform, (320, 640), "EPSG:32617")])
    # without georeferencing: shared top-left corner, fewer than r extra fine pixels
    bare = rasterio.Affine.identity()
    r, win, (p_win,) = align.block_windows(_grid(bare, (603, 627), None), [_grid(bare, (1207, 1254), None)])
    assert r == 2 and (p_win.height, p_win.width) == (1206, 1254)
    with pytest.raises(FusionError, match="by other than an integer ratio"):
        align.block_windows(_grid(bare, (100, 100), None), [_grid(bare, (99, 100), None)], 1)
    # a reference without georeferencing (made from a .mat) pairs with a georeferenced product by size
    r, win, _ = align.block_windows(_grid(bare, (159, 319), None), [fused], 1, bare_pairs_by_size=True)
    assert r == 1 and (win.height, win.width) == (159, 319)
    # a PAN/MS pair with one side georeferenced is refused, as pansharpen refuses it (simulate paired
    # them from the top-left corner, away from Landsat's half-pixel offset, at exit 0)
    with pytest.raises(FusionError, match="the MS has no geotransform but the other input has one"):
        align.block_windows(_grid(bare, (160, 320), None), [pan])


def test_crs_told_in_another_axis_order_is_the_same_crs(tmp_path):
    """The WorldView-3 MS described as OGC:CRS84 (a VRT; an ESRI .prj of WGS 84 reads alike) beside its
    EPSG:4326 PAN was refused as a CRS mismatch, though --reproject gave the identical product (helper):
    GDAL rasters are always x = longitude. Another datum (NAD83) is still refused, and a CRS without
    an EPSG code is named, not printed as 500 characters of WKT."""
    import re
    import subprocess
    import sys

    from rasterio.crs import CRS
    from rasterio.shutil import copy as gdal_copy

    from fusion_cli.align import crs_name, same_crs

    pan, ms = need_shared("wv3_spacenet2", "pan.tif"), need_shared("wv3_spacenet2", "ms.tif")
    vrt = tmp_path / "ms.vrt"
    gdal_copy(ms, vrt, driver="VRT")
    text = re.sub(r"<SRS[^>]*>.*?</SRS>", "<SRS>{}</SRS>", vrt.read_text(), flags=re.S)
    outs = {}
    for name, srs in (("crs84", "OGC:CRS84"), ("nad83", "EPSG:4269")):
        (tmp_path / f"{name}.vrt").write_text(text.format(srs))
        outs[name] = tmp_path / f"{name}.tif"
        args = [
            "pansharpen",
            str(pan),
            str(tmp_path / f"{name}.vrt"),
            "-o",
            str(outs[name]),
            "--method",
            "gsa",
        ]
        code = "import sys; from fusion_cli.cli.main import main; main(sys.argv[1:])"
        outs[name] = (
            outs[name],
            subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True),
        )
    assert outs["crs84"][1].returncode == 0, outs["crs84"][1].stderr
    assert (
        outs["nad83"][1].returncode == 2
        and "CRS mismatch: PAN is EPSG:4326 but MS is EPSG:4269" in outs["nad83"][1].stderr
    )
    assert same_crs(CRS.from_epsg(4326), CRS.from_string("OGC:CRS84"))
    assert not same_crs(CRS.from_epsg(4326), CRS.from_epsg(4322))  # WGS 72
    assert not same_crs(CRS.from_epsg(28355), CRS.from_epsg(7855))  # GDA94 / GDA2020: one PROJ string
    esri = 'GEOGCS["GCS_WGS_1984",DATUM["D_WGS_1984",SPHEROID["WGS_1984",6378137.0,298.257223563]],'
    esri += 'PRIMEM["Greenwich",0.0],UNIT["Degree",0.0174532925199433]]'
    assert same_crs(CRS.from_epsg(4326), CRS.from_wkt(esri))
    proj = "+proj=tmerc +lat_0=0 +lon_0=13.37 +k=0.9996 +x_0=500000 +y_0=0 +datum=WGS84 +units=m"
    assert crs_name(CRS.from_wkt(CRS.from_proj4(proj).to_wkt())) == proj
