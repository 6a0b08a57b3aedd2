"""`fusion pansharpen` / `fusion hisr` end to end: every bad input is one line and exit code 2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
from conftest import EXAMPLE_MS, EXAMPLE_PAN, crop_raster, need_shared, restamp, tiff_photometric
from rasterio.transform import from_origin

from fusion_cli import raster
from fusion_cli.cli.main import main
from fusion_cli.errors import FusionError


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, match: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err and match in lines[0], lines[0]


def _write(path, shape, crs, transform, count=1):
    with rasterio.open(
        path, "w", driver="GTiff", width=shape[1], height=shape[0], count=count, dtype="uint16",
        crs=crs, transform=transform,
    ) as dst:  # fmt: skip
        dst.write(np.full((count, *shape), 100, np.uint16))
    return str(path)


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    # The shipped example pair (UTM 16N, PAN 15 m, MS 30 m): the errors do not depend on the scene.
    pan, ms = str(EXAMPLE_PAN), str(EXAMPLE_MS)
    text = tmp_path / "notes.tif"
    text.write_text("hello")
    # The example's PAN footprint in another UTM zone: same numbers, another CRS.
    other_crs = _write(
        tmp_path / "crs.tif", (320, 640), "EPSG:32631", from_origin(461467.5, 3395362.5, 15, 15)
    )
    far = _write(tmp_path / "far.tif", (150, 150), "EPSG:32616", from_origin(0, 0, 30, 30))
    odd = _write(tmp_path / "odd.tif", (100, 100), "EPSG:32616", from_origin(461467.5, 3395362.5, 25.5, 25.5))
    out = str(tmp_path / "o.tif")
    cases = [
        ((pan, str(tmp_path / "missing.tif")), "not found"),
        ((pan, str(text)), "not a readable raster"),
        ((other_crs, ms), "CRS mismatch"),
        ((pan, far), "do not overlap"),
        ((pan, odd), "not an integer"),
    ]
    for (p, m), match in cases:
        code, _, err = run(capsys, "pansharpen", p, m, "-o", out, "--method", "exp")
        assert_one_line_error(code, err, match)
    code, _, err = run(
        capsys, "pansharpen", pan, ms, "-o", str(tmp_path / "nowhere" / "o.tif"), "--method", "exp"
    )
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", str(tmp_path), "--method", "exp")
    assert_one_line_error(code, err, "is a folder")
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", out, "--method", "exp", "--bands", "1,2,9")
    assert_one_line_error(code, err, "cannot select band")
    # an empty item was dropped: "1,,3" fused bands 1 and 3, the 2 typed as nothing
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", out, "--method", "exp", "--bands", "1,,3")
    assert_one_line_error(code, err, "comma-separated band numbers like 1,2,3,5, got '1,,3'")
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", out, "--method", "no-such-method")
    assert_one_line_error(code, err, "unknown method")
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", out, "--method", "exp", "--device", "tpu")
    assert_one_line_error(code, err, "unknown device")
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", out, "--method", "gsa", "--stats-mpx", "0")
    assert_one_line_error(code, err, "--stats-mpx must be positive")
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", out, "--method", "exp", "--scan-memory", "20")
    assert_one_line_error(code, err, "--scan-memory applies to networks")
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", out, "--scan-memory", "-1")
    assert_one_line_error(code, err, "--scan-memory must be")
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", out, "--method", "exp", "--no-ensemble")
    assert_one_line_error(code, err, "--ensemble/--no-ensemble applies to networks")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crs.tif", "far.tif", "notes.tif", "odd.tif"]


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(raster.AtomicWriter, "write", full)
    out = str(tmp_path / "o.tif")
    pan, ms = str(EXAMPLE_PAN), str(EXAMPLE_MS)
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", out, "--method", "exp", "--quiet")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def _example_crop(tmp_path) -> dict[str, str]:
    """A 128 x 128 PAN-px crop of the in-repo Landsat example (PAN and MS, georeferencing kept)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "examples"
    with rasterio.open(root / "landsat8_pan.tif") as p, rasterio.open(root / "landsat8_ms.tif") as m:
        w_pan, w_ms = rasterio.windows.Window(80, 40, 128, 128), rasterio.windows.Window(40, 20, 64, 64)
        crops = {}
        for name, ds, win in (("pan", p, w_pan), ("ms", m, w_ms)):
            prof = {**ds.profile, "width": win.width, "height": win.height}
            prof["transform"] = ds.window_transform(win)
            crops[name] = str(tmp_path / f"{name}.tif")
            with rasterio.open(crops[name], "w", **prof) as dst:
                dst.write(ds.read(window=win))
    return crops


def test_ensemble_switch_follows_the_card_and_is_recorded(tmp_path, capsys):
    """The default model's card turns its transpose ensemble on; --no-ensemble fuses one pass (a
    different product, recorded in FUSION_PARAMS)."""
    crops = _example_crop(tmp_path)
    products = {}
    for flag in ("", "--ensemble", "--no-ensemble"):
        out = str(tmp_path / f"o{flag}.tif")
        args = ["pansharpen", crops["pan"], crops["ms"], "-o", out, "--quiet"] + ([flag] if flag else [])
        code, _, err = run(capsys, *args)
        assert code == 0, err
        with rasterio.open(out) as ds:
            products[flag] = ds.read().astype(np.int64)
            assert json.loads(ds.tags()["FUSION_PARAMS"])["transpose_ensemble"] == (flag != "--no-ensemble")
    assert np.array_equal(products[""], products["--ensemble"])  # the card's choice: on
    diff = np.abs(products["--ensemble"] - products["--no-ensemble"])
    assert 0 < diff.max() < 0.05 * products["--ensemble"].max()


def test_tags_and_json_record_the_precision_that_ran(tmp_path, capsys):
    """`--precision bf16 --device cpu`: the network runs fp32 (reduced precision is CUDA-only), and
    the product's FUSION_PARAMS and the --json summary say fp32, with the device and scan backend
    that ran; the product is the fp32 one. A classical method computes in fp32 whatever is asked."""
    crops = _example_crop(tmp_path)
    products = {}
    for precision in ("bf16", "fp32"):
        out = str(tmp_path / f"{precision}.tif")
        args = ["pansharpen", crops["pan"], crops["ms"], "-o", out, "--device", "cpu", "--json"]
        code, stdout, err = run(capsys, *args, "--precision", precision)
        assert code == 0, err
        summary = json.loads(stdout)
        with rasterio.open(out) as ds:
            params = json.loads(ds.tags()["FUSION_PARAMS"])
            products[precision] = ds.read()
        assert summary["precision"] == params["precision"] == "fp32"
        assert summary["device"] == params["device"] == "cpu"
        assert summary["scan_backend"] == params["scan_backend"] in {"numba", "torch"}
    np.testing.assert_array_equal(products["bf16"], products["fp32"])
    out = str(tmp_path / "gsa.tif")
    code, stdout, err = run(
        capsys, "pansharpen", crops["pan"], crops["ms"], "-o", out, "--method", "gsa", "--sensor",
        "landsat8", "--precision", "bf16", "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err
    with rasterio.open(out) as ds:
        params = json.loads(ds.tags()["FUSION_PARAMS"])
    assert json.loads(stdout)["precision"] == params["precision"] == "fp32"
    assert params["scan_backend"] is None


def test_network_band_count_and_ratio_mismatch(tmp_path, capsys):
    """A `.pth` state_dict whose bands or ratio do not fit the inputs: randomly initialised networks
    (the checks read the architecture, not the weights) on the shipped 6-band ratio-2 example, one of
    the official WV3 shape (8 bands, ratio 4) and one with 4 bands at ratio 2."""
    from fusion_cli.models.fusionmamba import FusionMamba, FusionMambaConfig

    pan, ms = str(EXAMPLE_PAN), str(EXAMPLE_MS)
    torch.manual_seed(0)
    for name, cfg, words in (
        ("wv3.pth", FusionMambaConfig(ms_bands=8), "ratio is 2 but the model expects 4"),
        ("four.pth", FusionMambaConfig(ms_bands=4, ratio=2, dim=8), "the MS has 6 bands but"),
    ):
        torch.save(FusionMamba(cfg).state_dict(), tmp_path / name)
        out = str(tmp_path / "o.tif")
        code, _, err = run(capsys, "pansharpen", pan, ms, "-o", out, "--weights", str(tmp_path / name))
        assert_one_line_error(code, err, words)
    assert not (tmp_path / "o.tif").exists()


def test_json_summary_overwrite_and_cog(tmp_path, capsys):
    # The shipped example: the product is the PAN grid less its half-covered first row and column.
    pan, ms = str(EXAMPLE_PAN), str(EXAMPLE_MS)
    out = tmp_path / "o.tif"
    code, stdout, err = run(
        capsys, "pansharpen", pan, ms, "-o", str(out), "--method", "exp", "--json", "--tile", "128"
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["output"] == str(out) and summary["shape"] == [6, 319, 639]
    assert summary["fuser"] == "exp" and summary["device"] == "cpu" and summary["seconds"] > 0
    assert set(summary["shift_measured"]) == {"dy", "dx", "peak"} and summary["shift_applied"] is False
    assert raster.is_complete_output(out)
    before = out.read_bytes()
    code, _, err = run(capsys, "pansharpen", pan, ms, "-o", str(out), "--method", "exp", "--quiet")
    assert_one_line_error(code, err, "--overwrite")
    assert out.read_bytes() == before
    code, _, err = run(
        capsys, "pansharpen", pan, ms, "-o", str(out), "--method", "exp", "--overwrite", "--cog", "--quiet"
    )
    assert code == 0 and err == ""
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and ds.overviews(1)
        with rasterio.open(pan) as p:
            inner = rasterio.windows.Window(1, 1, p.width - 1, p.height - 1)
            assert ds.transform == p.window_transform(inner) and ds.crs == p.crs and ds.shape == (319, 639)


def test_hisr_command_reads_hsi_then_msi(tmp_path, capsys):
    """`fusion hisr HSI MSI`: the MSI is the high-resolution input; a classical method takes its band
    mean as the PAN and sharpens the 128-band HSI (Paris pair reduced by 3) beyond plain upsampling."""
    ref_path = need_shared("eo1_hyperion_ali_paris", "hs_for_ms.tif")
    msi = str(need_shared("eo1_hyperion_ali_paris", "ms.tif"))
    with rasterio.open(ref_path) as ds:
        ref = ds.read().astype(np.float32)
    lr = ref.reshape(128, 24, 3, 24, 3).mean(axis=(2, 4))
    hsi = tmp_path / "hsi.tif"
    with rasterio.open(hsi, "w", driver="GTiff", width=24, height=24, count=128, dtype="float32") as dst:
        dst.write(lr)
    out = tmp_path / "o.tif"
    # MTF-GLP-FS (0.89 of upsampling's error; BDSD-PC 0.95 since its ratio-3 fit is no longer one
    # PAN pixel off; mtf-glp-hs, which regresses on every MSI band, 0.80)
    code, _, err = run(capsys, "hisr", str(hsi), msi, "-o", str(out), "--method", "mtf-glp-fs", "--quiet")
    assert code == 0 and err == ""
    with rasterio.open(out) as ds:
        got = ds.read()
    assert got.shape == ref.shape
    up = np.repeat(np.repeat(lr, 3, 1), 3, 2)
    assert np.abs(got - ref).mean() < 0.9 * np.abs(up - ref).mean()
    # A method set up for a 1-band PAN refuses a 4-band one in one line.
    from fusion_cli.classical import make_method

    with pytest.raises(FusionError, match="set up for 1 PAN band"):
        make_method("gsa", 3).fuse(torch.zeros(1, 4, 6, 6), torch.zeros(1, 2, 2, 2))
    # Swapped arguments put the 24x24 HSI in the high-resolution role: said so, in HISR's roles.
    code, _, err = run(capsys, "hisr", msi, str(hsi), "-o", str(tmp_path / "o2.tif"), "--method", "exp")
    assert_one_line_error(
        code, err, "the MSI (24x24) is smaller than the HSI (72x72): are the two inputs swapped?"
    )
    # Without a model or method, hisr takes the shipped HISR model (it took the pansharpening default,
    # landsat, and refused the pair for landsat's ratio)
    code, _, err = run(capsys, "hisr", str(hsi), msi, "-o", str(tmp_path / "o3.tif"))
    assert_one_line_error(code, err, "hyperion_hisr")


@pytest.mark.slow
def test_official_checkpoint_reproduces_its_authors_output_through_the_cli(tmp_path, capsys):
    """Golden case b (a 320 x 320 WV3 scene, float DN, no georeferencing) through `fusion pansharpen
    --weights 420.pth`: with one window covering the scene (no invented context around it) the
    product is the authors' `b_out` within 0.25 DN, at --tile 320 and at the default tile."""
    golden = need_shared("fusionmamba_official", "golden")
    weights = str(need_shared("fusionmamba_official", "420.pth"))
    inputs = {
        "pan": np.load(golden / "b_pan_lr.npy").astype(np.float32)[None],
        "ms": np.load(golden / "b_ms_lr.npy").astype(np.float32).transpose(2, 0, 1),
    }
    paths = {}
    for name, data in inputs.items():
        paths[name] = str(tmp_path / f"{name}.tif")
        with (
            pytest.warns(rasterio.errors.NotGeoreferencedWarning),
            rasterio.open(
                paths[name], "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                count=data.shape[0], dtype="float32",
            ) as dst,
        ):  # fmt: skip
            dst.write(data)
    expected = np.load(golden / "b_out.npy").transpose(2, 0, 1).astype(np.float64)
    for extra in (["--tile", "320", "--overlap", "0"], []):
        out = tmp_path / f"o{len(extra)}.tif"
        code, _, err = run(capsys, "pansharpen", paths["pan"], paths["ms"], "-o", str(out), "--weights",
                           weights, "--quiet", *extra)  # fmt: skip
        assert code == 0, err
        with rasterio.open(out) as ds:
            got = ds.read().astype(np.float64)
            assert json.loads(ds.tags()["FUSION_PARAMS"])["tile"] >= 320  # one window
        assert np.abs(got - expected).max() <= 0.25


def test_gdal_virtual_paths_are_inputs(tmp_path, capsys, landsat_demo):
    """Inputs are handed to GDAL as given: a `/vsizip/` member of a zip of the example and a VRT of
    its MS fuse like the files themselves; the product's tags name the virtual paths, so `fusion
    metrics` reads them again; a missing member is one line and exit 2."""
    import zipfile

    archive = tmp_path / "example.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for key in ("pan", "ms"):
            z.write(landsat_demo[key], landsat_demo[key].name)
    zpan, zms = (f"/vsizip/{archive}/{landsat_demo[k].name}" for k in ("pan", "ms"))
    assert zpan.startswith("/vsizip//")  # an absolute archive path: the `//` GDAL needs
    with rasterio.open(landsat_demo["ms"]) as ms:
        bands = "".join(
            f'<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource>'
            f'<SourceFilename relativeToVRT="0">{landsat_demo["ms"]}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
            for b in range(1, ms.count + 1)
        )
        vrt = tmp_path / "ms.vrt"
        vrt.write_text(
            f'<VRTDataset rasterXSize="{ms.width}" rasterYSize="{ms.height}">'
            f"<SRS>{ms.crs.to_wkt()}</SRS><GeoTransform>{', '.join(map(str, ms.transform.to_gdal()))}"
            f"</GeoTransform>{bands}</VRTDataset>"
        )
    base = ["--method", "gsa", "-q"]
    cases = {
        "plain": (str(landsat_demo["pan"]), str(landsat_demo["ms"])),
        "zip": (zpan, zms),
        "vrt": (zpan, str(vrt)),
    }
    products = {}
    for name, (pan, ms) in cases.items():
        out = tmp_path / f"{name}.tif"
        code, _, err = run(capsys, "pansharpen", pan, ms, "-o", str(out), *base)
        assert code == 0, err
        with rasterio.open(out) as ds:
            products[name] = ds.read()
            tags = ds.tags()
        assert tags["FUSION_MS"] == (ms if name != "plain" else str(landsat_demo["ms"].resolve()))
    np.testing.assert_array_equal(products["zip"], products["plain"])
    np.testing.assert_array_equal(products["vrt"], products["plain"])
    code, out, err = run(capsys, "metrics", str(tmp_path / "zip.tif"), "--json")
    assert code == 0, err
    assert json.loads(out)["ms"] == zms
    missing = f"/vsizip/{archive}/nosuch.tif"
    code, _, err = run(capsys, "pansharpen", zpan, missing, "-o", str(tmp_path / "x.tif"), *base)
    assert_one_line_error(code, err, "MS cannot be opened by GDAL")
    assert raster.is_gdal_path("/vsicurl/https://example.com/a.tif") and raster.is_gdal_path("s3://b/a.tif")
    assert not raster.is_gdal_path(tmp_path / "a.tif")


def test_creation_options_and_rgb_colour_interpretation(tmp_path, capsys, landsat_demo):
    """`--co KEY=VALUE` reaches the GTiff writer (replacing the default of that name); products
    mark the bands their MS descriptions (or model card) name red, green, blue."""
    from rasterio.enums import ColorInterp

    from fusion_cli.models.registry import WV3_BANDS

    out = tmp_path / "co.tif"
    inputs = [str(landsat_demo["pan"]), str(landsat_demo["ms"]), "--method", "gsa", "-q"]
    co = ["--co", "BLOCKXSIZE=128", "--co", "blockysize=128", "--co", "COMPRESS=ZSTD"]
    code, _, err = run(capsys, "pansharpen", *inputs, "-o", str(out), *co)
    assert code == 0, err
    rgb = [ColorInterp.blue, ColorInterp.green, ColorInterp.red] + [ColorInterp.undefined] * 3
    with rasterio.open(out) as ds, rasterio.open(landsat_demo["product"]) as default:
        assert ds.block_shapes[0] == (128, 128) and default.block_shapes[0] == (256, 256)
        assert ds.compression.name == "zstd" and default.compression.name == "deflate"
        assert list(ds.colorinterp) == rgb and list(default.colorinterp) == rgb
    code, _, err = run(capsys, "pansharpen", *inputs, "-o", str(tmp_path / "bad.tif"), "--co", "ZLEVEL")
    assert_one_line_error(code, err, "--co expects KEY=VALUE")
    assert not (tmp_path / "bad.tif").exists()
    # the card's names when the MS has no descriptions; "red edge" is not red
    names = [f"band {b}" for b in range(1, 9)]
    assert raster.rgb_colorinterp(8, names, WV3_BANDS)[1:5] == rgb[:2] + [ColorInterp.undefined, rgb[2]]
    assert raster.rgb_colorinterp(8, names) is None
    assert raster.rgb_colorinterp(3, ["red", "red edge", "green"]) is None  # no blue


def _imagery(path: str) -> list[tuple[float, float | None]]:
    """(CENTRAL_WAVELENGTH_UM, FWHM_UM) of each band, from GDAL's IMAGERY domain."""
    with rasterio.open(path) as ds:
        tags = [ds.tags(b, ns="IMAGERY") for b in range(1, ds.count + 1)]
    return [
        (float(t["CENTRAL_WAVELENGTH_UM"]), float(t["FWHM_UM"]) if "FWHM_UM" in t else None) for t in tags
    ]


def test_products_carry_band_wavelengths(tmp_path, capsys, landsat_demo):
    """A network product has its card's wavelengths in the IMAGERY domain (the landsat card names
    ETM+ and OLI bandpasses: their common part, the OLI ones), a classical one its sensor table's
    (the example's MS descriptions place the bands: B2 blue ... B7 swir2); without a sensor, none."""
    from fusion_cli.models.registry import load_model
    from fusion_cli.wavelengths import BANDS, from_names

    crops = _example_crop(tmp_path)
    code, _, err = run(capsys, "pansharpen", crops["pan"], crops["ms"], "-o", str(tmp_path / "net.tif"), "-q")
    assert code == 0, err
    card = load_model(device="cpu").card
    assert card.name == "landsat"
    expected = [(0.482, 0.060), (0.5615, 0.057), (0.6545, 0.037), (0.865, 0.028), (1.6085, 0.085)]
    assert _imagery(str(tmp_path / "net.tif")) == [*expected, (2.2005, 0.187)]
    assert [(w.centre_um, w.fwhm_um) for w in from_names(card.bands)] == _imagery(str(tmp_path / "net.tif"))
    # bdsd-pc --sensor landsat8 on the example: OLI bands 2-7 (Barsi et al. 2014)
    oli = BANDS["landsat8"]
    table = [(oli[b].centre_um, oli[b].fwhm_um) for b in ("blue", "green", "red", "nir", "swir1", "swir2")]
    assert _imagery(str(landsat_demo["product"])) == table
    assert table[0] == (0.482, 0.060) and table[3] == (0.865, 0.028)
    inputs = [str(landsat_demo["pan"]), str(landsat_demo["ms"]), "--method", "exp", "-q"]
    code, _, err = run(capsys, "pansharpen", *inputs, "-o", str(tmp_path / "generic.tif"))
    assert code == 0, err
    with rasterio.open(tmp_path / "generic.tif") as ds:
        assert ds.tags(1, ns="IMAGERY") == {}


def test_wavelengths_from_card_names_and_sensor_bands() -> None:
    """Card band names: a bandpass gives centre and width, one value a centre only, disjoint
    bandpasses nothing; sensor bands are placed by name, else by number for a full-band MS."""
    from fusion_cli.wavelengths import Wavelength, from_names, from_sensor, imagery_metadata

    assert from_names(["red (630-690 nm)", "Hyperion band 11 (457.34 nm) [inferred]"]) == [
        Wavelength(0.66, 0.06),
        Wavelength(0.45734),
    ]
    assert from_names(["red (630-690 nm)", "NIR"]) is None
    assert from_names(["A 400-450 nm / B 500-550 nm"]) is None
    assert imagery_metadata([Wavelength(0.66, 0.06), Wavelength(0.45734)]) == [
        {"CENTRAL_WAVELENGTH_UM": "0.66", "FWHM_UM": "0.06"},
        {"CENTRAL_WAVELENGTH_UM": "0.45734"},
    ]
    wv3 = from_sensor("WorldView-3", ["band 1"] * 2, [5, 6], 8)  # by number: red, red edge
    assert wv3 == [Wavelength(0.66, 0.06), Wavelength(0.725, 0.04)]
    assert from_sensor("wv3", ["Red Edge", "red"], [1, 2], 2) == wv3[::-1]  # by name; red edge is not red
    assert from_sensor("wv2", ["band 1"] * 4, [1, 2, 3, 4], 4)[3] == Wavelength(0.8325, 0.125)  # NIR1
    assert from_sensor("landsat8", ["band 1"] * 6, list(range(1, 7)), 6) is None  # OLI has 7
    assert from_sensor(None, ["blue"], [1], 1) is None and from_sensor("sentinel2", ["blue"], [1], 1) is None


def test_input_nodata_masks_an_unflagged_collar(tmp_path, capsys, landsat_demo):
    """A copy of the example with a zero collar over its first 40 PAN rows (20 MS rows) and no nodata
    flag: plain, the collar is fused as data and the product has no nodata; `--nodata 0` masks it
    (the product's nodata is 0, its collar invalid, the rest valid); `--ms-nodata` overrides
    --nodata for the MS alone while the PAN keeps 0, which still masks the collar."""
    paths = {}
    for key, rows in (("pan", 40), ("ms", 20)):
        with rasterio.open(landsat_demo[key]) as src:
            profile, data = src.profile, src.read()
        assert src.nodata is None and data.min() > 0
        data[:, :rows] = 0
        paths[key] = str(tmp_path / f"{key}.tif")
        with rasterio.open(paths[key], "w", **profile) as dst:
            dst.write(data)
    base = [paths["pan"], paths["ms"], "--method", "gsa", "-q"]
    masks, nodata = {}, {}
    for name, flags in {
        "plain": [],
        "nodata": ["--nodata", "0"],
        "ms_own": ["--nodata", "0", "--ms-nodata", "65535"],
    }.items():
        out = tmp_path / f"{name}.tif"
        code, _, err = run(capsys, "pansharpen", *base, "-o", str(out), *flags)
        assert code == 0, err
        with rasterio.open(out) as ds:
            nodata[name], masks[name] = ds.nodata, ds.dataset_mask() > 0
            assert ds.height == 319  # the demo's grid: the half-covered first PAN row is left out
    assert nodata == {"plain": None, "nodata": 0.0, "ms_own": 65535.0}
    assert masks["plain"].all()
    # product row r is PAN row r + 1 (the demo's half-pixel offset): the PAN collar is product rows
    # 0..38; row 39 also lies half over the last collar row of the MS, masked only while MS 0 is nodata
    for name, first_valid in (("nodata", 40), ("ms_own", 39)):
        assert not masks[name][:first_valid].any() and masks[name][first_valid:].all(), name


def test_nodata_override_adds_to_the_file_mask(tmp_path):
    """raster.with_nodata: pixels equal to the value are invalid on top of the file's own nodata."""
    path = tmp_path / "a.tif"
    data = np.array([[[0, 5, 7], [9, 9, 5]]], np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=3, height=2, count=1, dtype="uint16", nodata=9) as d:
        d.write(data)
    with raster.open_raster(path) as ds, raster.with_nodata(raster.open_raster(path), 5) as wrapped:
        assert raster.with_nodata(ds, None) is ds and wrapped.nodata == 5.0
        assert raster.has_mask(wrapped) and wrapped.count == 1
        np.testing.assert_array_equal(wrapped.read_masks(1) > 0, [[True, False, True], [False, False, False]])
        _, valid = raster.read_padded(wrapped, 0, 0, 2, 3, [1])
        np.testing.assert_array_equal(valid, [[True, False, True], [False, False, False]])


def test_hisr_role_names_leave_the_paths_they_quote_alone() -> None:
    """HISR messages rename the pipeline's roles (PAN -> MSI, MS -> HSI), but not inside the paths a
    message quotes: a SpaceNet-style PAN/ folder read 'MSI/out.tif already exists'."""
    from fusion_cli.pipeline.api import in_hisr_terms

    got = in_hisr_terms(
        "output PAN/out.tif already exists; the PAN/MS ratio is 3 and the MS has 6 bands", ["PAN/out.tif"]
    )
    assert got == "output PAN/out.tif already exists; the MSI/HSI ratio is 3 and the HSI has 6 bands"
    assert (
        in_hisr_terms("MS file not found: MS data/x.tif", ["MS data/x.tif"])
        == "HSI file not found: MS data/x.tif"
    )


def test_without_model_a_pair_the_default_cannot_fuse_names_the_model_that_can(tmp_path, capsys):
    """No --model on a Hyperion PAN + 128-band HSI (ratio 3) crop of the Paris pair: instead of "the
    model expects ratio 2", one line saying the default (landsat, 6 bands at ratio 2) does not fit and
    naming --model hyperion_pan; an 8-band WorldView-3 crop (ratio 4) is pointed to vhr4 with --bands
    for its four bands, and its first three bands alone (no model takes three) learn that no
    installed model fits. A PAN with an alpha band is one PAN band (the alpha masks it), as the
    readers take it."""
    from rasterio.enums import ColorInterp
    from rasterio.windows import Window

    def crop(src, dst, side, alpha=False):
        with rasterio.open(src) as ds:
            win = Window(0, 0, side, side)
            data, profile = ds.read(window=win), ds.profile
            profile.update(width=side, height=side, transform=ds.window_transform(win))
        if alpha:
            data = np.concatenate([data, np.full_like(data[:1], 255)])
            profile.update(count=data.shape[0])
        with rasterio.open(dst, "w", **profile) as out:
            out.write(data)
        if alpha:
            with rasterio.open(dst, "r+") as out:  # GeoTIFF takes a new colour type only on update
                out.colorinterp = [ColorInterp.gray, ColorInterp.alpha]
        return str(dst)

    paris = [crop(need_shared("eo1_hyperion_ali_paris", f"{n}.tif"), tmp_path / f"p_{n}.tif", s)
             for n, s in (("pan", 96), ("hs", 32))]  # fmt: skip
    code, _, err = run(capsys, "pansharpen", *paris, "-o", str(tmp_path / "o.tif"))
    assert_one_line_error(
        code, err, "the default model landsat fuses 6 MS bands at ratio 2, but this pair has 128"
    )
    assert "--model hyperion_pan" in err
    wv3 = [crop(need_shared("wv3_spacenet2", "pan.tif"), tmp_path / "w_pan.tif", 128, alpha=True),
           crop(need_shared("wv3_spacenet2", "ms.tif"), tmp_path / "w_ms.tif", 32)]  # fmt: skip
    code, _, err = run(capsys, "pansharpen", *wv3, "-o", str(tmp_path / "o.tif"))
    assert_one_line_error(code, err, "this pair has 8 bands at ratio 4; pass --model vhr4 with --bands")
    code, _, err = run(capsys, "pansharpen", *wv3, "-o", str(tmp_path / "o.tif"), "--bands", "2,3,5")
    assert_one_line_error(code, err, "this pair has 3 bands at ratio 4; no installed model fits it")
    # a pick beyond the file is named as such, not as a pair no model fits (default model or named)
    for model in ([], ["--model", "vhr4"]):
        code, _, err = run(
            capsys, "pansharpen", *wv3, "-o", str(tmp_path / "o.tif"), "--bands", "2,3,9", *model
        )
        assert_one_line_error(code, err, "MS has 8 bands, cannot select band(s) [9]; use --bands 1..8")
    assert not (tmp_path / "o.tif").exists()
    code, _, err = run(capsys, "pansharpen", *wv3, "-o", str(tmp_path / "gsa.tif"), "--method", "gsa", "-q")
    assert code == 0, err


def test_a_network_refuses_data_in_other_units_than_its_card(tmp_path, capsys) -> None:
    """`hyperion_pan` divides by 1 (reflectance); the same Paris crop as reflectance x 10000 (int16 DN)
    reached it as values near 6000 and came out as its BDSD-PC base at exit 0 (hyperion_hisr's mirror
    case, reflectance under its 10000 scale, gave SAM 97 degrees). Refused naming --dn-max; with
    --dn-max 10000 the DN product is the reflectance product x 10000, within the int16 rounding.
    HSI band 11 is zeroed (a dead band): the network's correction pushed it below 0 (-0.018, 4963
    values); a network's products are floored at 0 DN, float and int16 alike."""
    from rasterio.windows import Window

    paths = {}
    for name, side in (("pan", 96), ("hs", 32)):
        with rasterio.open(need_shared("eo1_hyperion_ali_paris", f"{name}.tif")) as src:
            win = Window(0, 0, side, side)
            refl, profile = src.read(window=win), src.profile
            profile.update(width=side, height=side, transform=src.window_transform(win))
        if name == "hs":
            refl[10] = 0
        for units, data, dtype in (("refl", refl, "float32"), ("dn", np.round(refl * 10000), "int16")):
            paths[f"{name}_{units}"] = str(tmp_path / f"{name}_{units}.tif")
            with rasterio.open(paths[f"{name}_{units}"], "w", **{**profile, "dtype": dtype}) as dst:
                dst.write(data.astype(dtype))
    dn_inputs, refl_inputs = (paths["pan_dn"], paths["hs_dn"]), (paths["pan_refl"], paths["hs_refl"])
    model = ("--model", "hyperion_pan", "-q")
    rc, _, err = run(capsys, "pansharpen", *dn_inputs, "-o", str(tmp_path / "dn.tif"), *model)
    assert rc == 2 and "not in the units of model hyperion_pan" in err and "--dn-max" in err, err
    assert not (tmp_path / "dn.tif").exists()
    rc, _, err = run(
        capsys, "pansharpen", *dn_inputs, "-o", str(tmp_path / "dn.tif"), *model, "--dn-max", "10000"
    )
    assert rc == 0, err
    rc, _, err = run(capsys, "pansharpen", *refl_inputs, "-o", str(tmp_path / "refl.tif"), *model)
    assert rc == 0, err
    with rasterio.open(tmp_path / "dn.tif") as dn, rasterio.open(tmp_path / "refl.tif") as refl:
        dn_product, refl_product = dn.read().astype(np.float64), refl.read().astype(np.float64)
    diff = np.abs(dn_product - np.minimum(refl_product * 10000, 10000))  # --dn-max is also the ceiling
    p99, worst = float(np.percentile(diff, 99)), float(diff.max())
    assert p99 < 3.0 and worst < 30, (p99, worst)
    assert dn_product.min() >= 0 and refl_product.min() >= 0


def test_bands_in_another_order_than_the_model_are_refused_by_wavelength(tmp_path, capsys):
    """The Paris HSI crop with its bands reversed (each still named with its wavelength) went
    through hyperion_pan at exit 0, its product's wavelength tags contradicting its band names. Where
    the MS names its bands' wavelengths, each must be the card's band (within the card band's
    half-width + 5 nm: Hyperion bands are 10 nm apart, so one band off is refused too)."""
    from rasterio.windows import Window

    with rasterio.open(need_shared("eo1_hyperion_ali_paris", "hs.tif")) as src:
        win = Window(0, 0, 32, 32)
        data, profile, names = src.read(window=win), src.profile, list(src.descriptions)
        profile.update(width=32, height=32, transform=src.window_transform(win))
    with rasterio.open(need_shared("eo1_hyperion_ali_paris", "pan.tif")) as src:
        win = Window(0, 0, 96, 96)
        pan_data, pan_profile = src.read(window=win), src.profile
        pan_profile.update(width=96, height=96, transform=src.window_transform(win))
    pan = str(tmp_path / "pan.tif")
    with rasterio.open(pan, "w", **pan_profile) as dst:
        dst.write(pan_data)
    reversed_hs = str(tmp_path / "hs_reversed.tif")
    with rasterio.open(reversed_hs, "w", **profile) as dst:
        dst.write(data[::-1])
        dst.descriptions = tuple(names[::-1])
    args = ["pansharpen", pan, reversed_hs, "--model", "hyperion_pan", "-q"]
    code, _, err = run(capsys, *args, "-o", str(tmp_path / "o.tif"))
    assert_one_line_error(code, err, "MS band 1 is at 2345 nm but band 1 of hyperion_pan is Hyperion band 8")
    # one band off: bands 2..128 and 127 in the model's places 1..127 and 128
    off = ",".join(map(str, range(127, 0, -1))) + ",1"
    code, _, err = run(capsys, *args, "-o", str(tmp_path / "o.tif"), "--bands", off)
    assert_one_line_error(code, err, "but band 1 of hyperion_pan is Hyperion band 8")
    back = ",".join(str(b) for b in range(128, 0, -1))  # the reversed file in the model's order
    code, _, err = run(capsys, *args, "-o", str(tmp_path / "ok.tif"), "--bands", back)
    assert code == 0, err


def test_a_card_naming_two_sensors_takes_either_sensors_bands(tmp_path, capsys):
    """`landsat` names ETM+ and OLI bandpasses; the default model refused the real Landsat-7 FuseBox
    scenes (its own training data) with the README's --bands 3,2,1,4,5,6: their NIR states 760-900
    nm (830 nm), outside OLI's 851-879 nm, the common part it was checked against. A band within any
    of the card's bandpasses passes; a swapped NIR/SWIR1 is still refused."""
    from rasterio.windows import Window

    pan = crop_raster(
        need_shared("landsat7_etm_fusebox", "19_pan.tif"), tmp_path / "pan.tif", Window(0, 0, 256, 256)
    )
    ms = crop_raster(
        need_shared("landsat7_etm_fusebox", "19_ms.tif"), tmp_path / "ms.tif", Window(0, 0, 128, 128)
    )
    with (
        rasterio.open(need_shared("landsat7_etm_fusebox", "19_ms.tif")) as src,
        rasterio.open(ms, "r+") as ds,
    ):
        ds.descriptions = src.descriptions  # the band names state the wavelengths
    with rasterio.open(ms) as ds:
        assert ds.descriptions[3] == "NIR (ETM+ B4, 760-900 nm)"
    args = ["pansharpen", str(pan), str(ms), "-q"]
    code, _, err = run(capsys, *args, "-o", str(tmp_path / "ok.tif"), "--bands", "3,2,1,4,5,6")
    assert code == 0, err
    code, _, err = run(capsys, *args, "-o", str(tmp_path / "no.tif"), "--bands", "3,2,1,5,4,6")
    assert_one_line_error(code, err, "MS band 5 is at 1650 nm but band 4 of landsat is NIR")


def test_pan_bands_select_the_msi_bands_of_a_hisr_pair(tmp_path, capsys):
    """`--pan-bands` picks bands of the high-resolution input (there was no way to give
    hyperion_hisr six of an ALI MSI's nine bands): the Paris pair fused with --pan-bands 1,...,6 of
    the 9-band MSI equals the fusion with a 6-band copy of the MSI."""
    with rasterio.open(need_shared("eo1_hyperion_ali_paris", "hs_for_ms.tif")) as ds:
        ref = ds.read().astype(np.float32)
    lr = ref.reshape(128, 24, 3, 24, 3).mean(axis=(2, 4))
    hsi = str(tmp_path / "hsi.tif")
    with rasterio.open(hsi, "w", driver="GTiff", width=24, height=24, count=128, dtype="float32") as dst:
        dst.write(lr)
    msi9 = str(need_shared("eo1_hyperion_ali_paris", "ms.tif"))
    with rasterio.open(msi9) as ds:
        six, profile = ds.read()[:6], ds.profile
    msi6 = str(tmp_path / "msi6.tif")
    with rasterio.open(msi6, "w", **{**profile, "count": 6}) as dst:
        dst.write(six)
    products = []
    for msi, extra in ((msi9, ["--pan-bands", "1,2,3,4,5,6"]), (msi6, [])):
        out = str(tmp_path / f"o{len(products)}.tif")
        code, _, err = run(capsys, "hisr", hsi, msi, "-o", out, "--method", "mtf-glp-hs", "-q", *extra)
        assert code == 0, err
        with rasterio.open(out) as ds:
            products.append(ds.read())
    np.testing.assert_array_equal(products[0], products[1])
    # --pan-bands beyond the MSI is named by its option; pansharpening refuses three "PAN" bands
    code, _, err = run(capsys, "hisr", hsi, msi9, "-o", str(tmp_path / "x.tif"), "--pan-bands", "10")
    assert_one_line_error(code, err, "MSI has 9 bands, cannot select band(s) [10]; use --pan-bands 1..9")
    args = ["pansharpen", msi9, hsi, "-o", str(tmp_path / "x.tif"), "--method", "gsa", "--pan-bands", "1,2,3"]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, "--pan-bands selects 3 bands; pansharpening needs a single-band PAN")


def test_a_model_refuses_msi_bands_whose_wavelengths_are_not_its_own(tmp_path, capsys):
    """hyperion_hisr's card states its six ALI bands' wavelengths, and so does the MSI: --pan-bands
    6,5,4,3,2,1 or 1,1,1,1,1,1 fused at exit 0 (ERGAS 1.77 -> 1.94 and 3.32 on the San Francisco test
    rows), as --bands of the HSI never did; the bands in order pass."""
    with rasterio.open(need_shared("eo1_sanfrancisco", "hs.tif")) as ds:
        hs = ds.read(window=rasterio.windows.Window(0, 0, 48, 48)).astype(np.float32)
    hsi = str(tmp_path / "hsi.tif")
    with rasterio.open(hsi, "w", driver="GTiff", width=16, height=16, count=47, dtype="float32") as dst:
        dst.write(hs.reshape(47, 16, 3, 16, 3).mean(axis=(2, 4)))
    msi = str(
        crop_raster(
            need_shared("eo1_sanfrancisco", "ms.tif"),
            tmp_path / "msi.tif",
            rasterio.windows.Window(0, 0, 48, 48),
        )
    )
    with rasterio.open(need_shared("eo1_sanfrancisco", "ms.tif")) as src, rasterio.open(msi, "r+") as ds:
        ds.descriptions = src.descriptions  # the band names state the wavelengths
    args = ["hisr", hsi, msi, "--model", "hyperion_hisr", "-q"]
    code, _, err = run(capsys, *args, "-o", str(tmp_path / "ok.tif"))
    assert code == 0, err
    code, _, err = run(capsys, *args, "-o", str(tmp_path / "no.tif"), "--pan-bands", "6,5,4,3,2,1")
    assert_one_line_error(
        code, err, "MSI band 6 is at 868 nm but MSI band 1 of hyperion_hisr is at 433-453 nm"
    )
    code, _, err = run(capsys, *args, "-o", str(tmp_path / "no.tif"), "--pan-bands", "1,1,1,1,1,1")
    assert_one_line_error(
        code, err, "MSI band 1 is at 443 nm but MSI band 2 of hyperion_hisr is at 450-515 nm"
    )
    assert not (tmp_path / "no.tif").exists()


# a classical method's fuser, as `rgb_bands` sees it: no model card
NO_CARD = SimpleNamespace(card=None)
# Landsat Collection-2 surface reflectance: value = DN * 2.75e-05 - 0.2
C2_SCALE, C2_OFFSET = 2.75e-05, -0.2


def test_the_product_keeps_the_ms_scale_offset_and_units(tmp_path, capsys):
    """A product holds MS DN, whatever --dtype: it keeps the MS bands' scale, offset and unit (it
    had 1 / 0: a GIS unscaling the product read 8246 where the MS reads 0.027). The pixels are
    those of the same DN without them; --cog keeps them too."""
    crops = _example_crop(tmp_path)
    scaled = {
        role: str(restamp(path, tmp_path / f"c2_{role}.tif", scales=[C2_SCALE] * n, offsets=[C2_OFFSET] * n,
                          units=["reflectance"] * n))
        for role, path, n in (("pan", crops["pan"], 1), ("ms", crops["ms"], 6))
    }  # fmt: skip
    plain, out = tmp_path / "plain.tif", tmp_path / "c2.tif"
    for pair, dst in (((crops["pan"], crops["ms"]), plain), ((scaled["pan"], scaled["ms"]), out)):
        code, _, err = run(capsys, "pansharpen", *pair, "-o", str(dst), "--method", "gsa", "-q")
        assert code == 0, err
    with rasterio.open(out) as ds, rasterio.open(plain) as ref, rasterio.open(scaled["ms"]) as ms:
        assert ds.scales == (C2_SCALE,) * 6 and ds.offsets == (C2_OFFSET,) * 6
        assert ds.units == ("reflectance",) * 6
        np.testing.assert_array_equal(ds.read(), ref.read())  # the same DN, fused as before
        assert ref.scales == (1.0,) * 6 and ref.offsets == (0.0,) * 6 and ref.units == (None,) * 6
        # one physical value: the product's pixel over an MS pixel reads as the MS's does, unscaled
        product = ds.read(1, masked=False)[64, 64] * ds.scales[0] + ds.offsets[0]
        assert abs(product - (ms.read(1)[32, 32] * C2_SCALE + C2_OFFSET)) < 0.02
    cog = tmp_path / "c2_cog.tif"
    code, _, err = run(
        capsys, "pansharpen", scaled["pan"], scaled["ms"], "-o", str(cog), "--method", "gsa", "-q",
        "--cog", "--dtype", "float32", "--bands", "3,2",
    )  # fmt: skip
    assert code == 0, err
    with rasterio.open(cog) as ds:
        assert ds.scales == (C2_SCALE,) * 2 and ds.offsets == (C2_OFFSET,) * 2 and ds.dtypes[0] == "float32"


def test_a_pan_and_ms_in_other_scale_offset_are_refused(tmp_path, capsys):
    """The PAN stored as DN - 5000 with offset +5000 (the same physical values) was fused as raw DN:
    Brovey off by thousands of DN at exit 0. Refused before any work, in one line, in HISR's roles
    for `fusion hisr`; the same scale/offset on both is fused as DN (above)."""
    crops = _example_crop(tmp_path)
    with rasterio.open(crops["pan"]) as ds:
        shifted = ds.read().astype(np.int32) - 5000
    pan = str(restamp(crops["pan"], tmp_path / "pan_offset.tif", shifted, offsets=[5000.0]))
    out = tmp_path / "o.tif"
    code, _, err = run(capsys, "pansharpen", pan, crops["ms"], "-o", str(out), "--method", "brovey")
    assert_one_line_error(
        code, err, "PAN and MS store their values with different scale/offset (PAN 1 / 5000, MS 1 / 0): "
        "fusion works on stored DN; write both in the same units first (gdal_translate -unscale",
    )  # fmt: skip
    assert not out.exists()
    code, _, err = run(capsys, "hisr", crops["ms"], pan, "-o", str(out), "--method", "gsa")
    assert_one_line_error(
        code, err, "MSI and HSI store their values with different scale/offset (MSI 1 / 5000"
    )
    assert not out.exists()
    # a scale kept as float32 (2.750000021e-05, as NetCDF stores it) is the same scale as 2.75e-05
    pan32 = str(
        restamp(crops["pan"], tmp_path / "pan32.tif", scales=[float(np.float32(2.75e-05))], offsets=[-0.2])
    )
    ms64 = str(restamp(crops["ms"], tmp_path / "ms64.tif", scales=[2.75e-05] * 6, offsets=[-0.2] * 6))
    code, _, err = run(capsys, "pansharpen", pan32, ms64, "-o", str(out), "--method", "gsa", "-q")
    assert code == 0, err
    # units both state, and differ: radiance is not reflectance (was fused, the product "reflectance")
    radiance = str(restamp(crops["pan"], tmp_path / "pan_rad.tif", units=["W/m2/sr/um"]))
    refl = str(restamp(crops["ms"], tmp_path / "ms_refl.tif", units=["reflectance"] * 6))
    other = tmp_path / "units.tif"
    code, _, err = run(capsys, "pansharpen", radiance, refl, "-o", str(other), "--method", "gsa")
    assert_one_line_error(code, err, "PAN and MS state different units (W/m2/sr/um, reflectance)")
    assert not other.exists()


def test_a_paletted_input_is_refused(tmp_path, capsys):
    """A class map (a colour table) fused as numbers gave a product of meaningless values at exit 0."""
    crops = _example_crop(tmp_path)
    with rasterio.open(crops["pan"]) as ds:
        classes = (ds.read() // 4096).astype(np.uint8)  # 16 classes
    pan = tmp_path / "classes.tif"
    restamp(crops["pan"], pan, classes)
    with rasterio.open(pan, "r+") as ds:
        ds.write_colormap(1, {k: (16 * k, 255 - 16 * k, 0, 255) for k in range(16)})
    out = tmp_path / "o.tif"
    code, _, err = run(capsys, "pansharpen", str(pan), crops["ms"], "-o", str(out), "--method", "gsa")
    assert_one_line_error(code, err, "band 1 is paletted (a colour table): it holds class indices, not")
    assert "gdal_translate -expand rgb" in err and not out.exists()


def test_the_product_colours_follow_the_ms_colour_interpretation(tmp_path, capsys):
    """An MS in B, G, R order tagged blue, green, red (no band names): a uint8 product came out red,
    green, blue (GTiff's default PHOTOMETRIC=RGB for 3 Byte bands), a uint16 one grey/undefined.
    The product follows the MS, its TIFF says min-is-black, and its quicklook shows band 3 as red."""
    from rasterio.enums import ColorInterp

    from fusion_cli.pipeline.output import rgb_bands

    crops = _example_crop(tmp_path)
    bgr = [ColorInterp.blue, ColorInterp.green, ColorInterp.red]
    with rasterio.open(crops["ms"]) as ds:
        ms = ds.read([1, 2, 3])  # the example's B2 blue, B3 green, B4 red
    for dtype, data in (("uint8", (ms // 128).astype(np.uint8)), ("uint16", ms)):
        src = restamp(crops["ms"], tmp_path / f"bgr_{dtype}.tif", data, colorinterp=bgr)
        out = tmp_path / f"o_{dtype}.tif"
        args = [crops["pan"], str(src), "-o", str(out), "--method", "gsa", "-q", "--quicklook"]
        code, _, err = run(capsys, "pansharpen", *args)
        assert code == 0, err
        with rasterio.open(out) as ds:
            assert ds.dtypes[0] == dtype and list(ds.colorinterp) == bgr
            assert rgb_bands(NO_CARD, list(ds.descriptions), 3, ds.colorinterp) == (2, 1, 0)
        assert tiff_photometric(out) == 1  # min-is-black, not RGB
    # an MS tagged red, green, blue (GTiff's default for 3 Byte bands) gives an RGB TIFF, as it did
    rgb_src = restamp(crops["ms"], tmp_path / "rgb.tif", (ms[::-1] // 128).astype(np.uint8),
                      colorinterp=bgr[::-1])  # fmt: skip
    code, _, err = run(capsys, "pansharpen", crops["pan"], str(rgb_src), "-o", str(tmp_path / "rgb_o.tif"),
                       "--method", "gsa", "-q")  # fmt: skip
    assert code == 0, err
    with rasterio.open(tmp_path / "rgb_o.tif") as ds:
        assert list(ds.colorinterp) == bgr[::-1] and tiff_photometric(tmp_path / "rgb_o.tif") == 2


def test_product_wavelengths_are_the_ms_own(tmp_path, capsys):
    """A WV2 MS reordered R, G, B, NIR with WAVELENGTH_NM tags: the product's IMAGERY domain said
    band 1 = 0.48 um (the sensor table by position). It carries the MS's own; the table fills in only
    the bands the MS says nothing of; the quicklook shows band 1 as red."""
    from fusion_cli.pipeline.output import rgb_bands
    from fusion_cli.wavelengths import of_raster

    win = rasterio.windows.Window
    pan = crop_raster(need_shared("wv2_spacenet6", "pan_1.tif"), tmp_path / "pan.tif", win(0, 0, 256, 256))
    wv2 = crop_raster(need_shared("wv2_spacenet6", "ms_1.tif"), tmp_path / "wv2.tif", win(0, 0, 64, 64))
    with rasterio.open(wv2) as ds:
        rgbn = ds.read([3, 2, 1, 4])  # the WV2 4-band B, G, R, NIR1, reordered
    ms = restamp(wv2, tmp_path / "rgbn.tif", rgbn, descriptions=False)
    with rasterio.open(ms, "r+") as ds:
        for b, nm in enumerate((660, 545, 480, None), start=1):
            if nm:
                ds.update_tags(b, WAVELENGTH_NM=str(nm))
    out = tmp_path / "o.tif"
    code, _, err = run(capsys, "pansharpen", str(pan), str(ms), "-o", str(out), "--method", "gsa",
                       "--sensor", "wv2", "-q")  # fmt: skip
    assert code == 0, err
    # bands 1-3 by the MS's tags; band 4 (no tag) by the sensor table's fourth 4-band WV2 band, NIR1
    assert _imagery(str(out)) == [(0.66, None), (0.545, None), (0.48, None), (0.8325, 0.125)]
    with rasterio.open(out) as ds:
        stated = of_raster(ds, [1, 2, 3, 4])
        assert rgb_bands(NO_CARD, list(ds.descriptions), 4, ds.colorinterp, stated) == (0, 1, 2)


def test_an_ms_mixing_pixel_types_is_refused_in_one_line(tmp_path, capsys):
    """A VRT may give its bands different types (Byte beside UInt16): reading it raised numpy's
    "more than one 'dtype' found" as a traceback in pansharpen, metrics and simulate."""
    with rasterio.open(EXAMPLE_MS) as src:
        profile, data = src.profile, src.read()
        srs, gt = src.crs.to_wkt(), ", ".join(map(str, src.transform.to_gdal()))
    sources = []
    for b in range(data.shape[0]):
        path = tmp_path / f"b{b}.tif"
        dtype = "uint8" if b == 0 else "uint16"
        with rasterio.open(path, "w", **{**profile, "count": 1, "dtype": dtype}) as dst:
            dst.write((data[b : b + 1] // (257 if b == 0 else 1)).astype(dtype))
        gdal_type = "Byte" if b == 0 else "UInt16"
        sources.append(
            f'<VRTRasterBand dataType="{gdal_type}" band="{b + 1}"><SimpleSource><SourceFilename '
            f'relativeToVRT="0">{path}</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>'
        )
    vrt = tmp_path / "mixed.vrt"
    vrt.write_text(
        f'<VRTDataset rasterXSize="{profile["width"]}" rasterYSize="{profile["height"]}"><SRS>{srs}</SRS>'
        f"<GeoTransform>{gt}</GeoTransform>{''.join(sources)}</VRTDataset>"
    )
    out = tmp_path / "o.tif"
    for args in (
        ("pansharpen", str(EXAMPLE_PAN), str(vrt), "-o", str(out), "--method", "gsa"),
        ("metrics", str(EXAMPLE_MS), "--ref", str(vrt), "--ratio", "2"),
        ("simulate", str(EXAMPLE_PAN), str(vrt), "-o", str(tmp_path / "sim")),
    ):
        code, _, err = run(capsys, *args, "-q")
        assert_one_line_error(code, err, "mixes pixel types across the bands read (uint16, uint8)")
    assert not out.exists() and not (tmp_path / "sim").exists()
    # bands of one type picked from it fuse, as before (they are read together)
    code, _, err = run(
        capsys,
        "pansharpen",
        str(EXAMPLE_PAN),
        str(vrt),
        "-o",
        str(out),
        "--method",
        "gsa",
        "--bands",
        "2,3,4",
        "-q",
    )
    assert code == 0, err


def test_a_network_refuses_inputs_off_its_scale_or_a_pan_in_other_units(tmp_path, capsys):
    """8-bit DN in a 16-bit file went through `landsat` at its uint16 scale (1/257 of it: ERGAS 101
    against 2.4 at exit 0); a uint16 PAN beside a uint8 MS, or a reflectance PAN beside DN, reached the
    network at the MS's scale (it divides both by one number, and the PAN was never checked); a 12-bit
    PAN beside an 11-bit MS at twice it. Each is refused in one line; the classical methods, which
    match the PAN to each band, still fuse the mixed pair."""
    crops = _example_crop(tmp_path)
    with rasterio.open(crops["pan"]) as p, rasterio.open(crops["ms"]) as m:
        pan16, ms16 = p.read(), m.read()
    pan8, ms8 = (np.round(a / 257).astype(np.uint8) for a in (pan16, ms16))
    ms8in16 = str(restamp(crops["ms"], tmp_path / "ms_8in16.tif", ms8.astype(np.uint16)))
    pan8in16 = str(restamp(crops["pan"], tmp_path / "pan_8in16.tif", pan8.astype(np.uint16)))
    out = tmp_path / "o.tif"
    code, _, err = run(capsys, "pansharpen", pan8in16, ms8in16, "-o", str(out))
    assert_one_line_error(code, err, "the MS's values (99th percentile")
    assert "which divides them by 65535" in err and "255 for 8-bit DN in a 16-bit file" in err
    code, _, err = run(capsys, "pansharpen", pan8in16, ms8in16, "-o", str(out), "--dn-max", "255", "-q")
    assert code == 0, err
    pan_u8 = str(restamp(crops["pan"], tmp_path / "pan_u8.tif", pan8))
    ms_u8 = str(restamp(crops["ms"], tmp_path / "ms_u8.tif", ms8))
    as_u8 = tmp_path / "as_u8.tif"
    assert run(capsys, "pansharpen", pan_u8, ms_u8, "-o", str(as_u8), "-q")[0] == 0
    with rasterio.open(out) as a, rasterio.open(as_u8) as b:  # the product of its uint8 copy
        assert np.abs(a.read().astype(int) - b.read().astype(int)).max() <= 1
    code, _, err = run(capsys, "pansharpen", crops["pan"], ms_u8, "-o", str(tmp_path / "mixed.tif"))
    assert_one_line_error(code, err, "the PAN's values (99th percentile")
    assert "give a PAN in the MS's units and bit depth" in err
    reflectance = str(restamp(crops["pan"], tmp_path / "pan_refl.tif", (pan16 / 65535).astype(np.float32)))
    code, _, err = run(capsys, "pansharpen", reflectance, crops["ms"], "-o", str(tmp_path / "refl.tif"))
    assert_one_line_error(code, err, "the PAN's values (99th percentile")
    code, _, err = run(
        capsys, "pansharpen", crops["pan"], ms_u8, "-o", str(tmp_path / "gsa.tif"), "--method", "gsa"
    )
    assert code == 0, err
    # NBITS 12 on the PAN, 11 on the MS
    pan12, ms11 = tmp_path / "pan12.tif", tmp_path / "ms11.tif"
    for src, dst, data, bits in ((crops["pan"], pan12, pan16 // 16, 12), (crops["ms"], ms11, ms16 // 32, 11)):
        with rasterio.open(src) as ds:
            profile = {**ds.profile, "nbits": bits}
        with rasterio.open(dst, "w", **profile) as ds:
            ds.write(data.astype(np.uint16))
    args = ["pansharpen", str(pan12), str(ms11), "-o", str(tmp_path / "bits.tif"), "--dn-max", "2047"]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, "the PAN is 12-bit and the MS 11-bit (their NBITS tags)")
    assert run(capsys, *args, "--method", "gsa", "-q")[0] == 0


def test_inputs_with_a_geotransform_but_no_crs_keep_it_in_the_product(tmp_path, capsys):
    # the grids were related through their transforms, but the product was written without one
    # (identity) while --json reported the transform: a crop's offset was lost
    from rasterio.windows import Window

    files = {}
    for name, window in (("pan_1", Window(40, 80, 256, 256)), ("ms_1", Window(0, 0, 150, 150))):
        with rasterio.open(need_shared("wv2_spacenet6", f"{name}.tif")) as src:
            profile = src.profile | {"crs": None, "width": window.width, "height": window.height}
            profile["transform"] = src.window_transform(window)
            data = src.read(window=window)
        files[name] = tmp_path / f"{name}.tif"
        with rasterio.open(files[name], "w", **profile) as dst:
            dst.write(data)
    out = tmp_path / "o.tif"
    code, text, err = run(capsys, "pansharpen", str(files["pan_1"]), str(files["ms_1"]), "-o", str(out),
                          "--method", "gsa", "--json")  # fmt: skip
    assert code == 0, err
    with rasterio.open(files["pan_1"]) as pan, rasterio.open(out) as ds:
        assert ds.crs is None and ds.transform == pan.transform and ds.shape == pan.shape
        assert list(ds.transform)[:6] == json.loads(text)["transform"]


def test_ms_phase_geometric_puts_the_product_on_its_geotransform(tmp_path, capsys):
    """On the real WorldView-3 PAN grid with an MS that is a linear ramp on the real MS grid (every
    interpolator reproduces a ramp, so any offset is placement): the default, toolbox phase puts
    the MS content half a PAN pixel right of and below the geotransform, as the reference toolbox
    and the published tables do; --ms-phase geometric puts it on the geotransform."""
    with rasterio.open(need_shared("wv3_spacenet2", "ms.tif")) as src:
        profile, h, w = src.profile | {"count": 2, "dtype": "float32"}, src.height, src.width
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    ms = tmp_path / "ramp_ms.tif"
    with rasterio.open(ms, "w", **profile) as dst:  # DN = 1000 + 100 x (MS column / row index)
        dst.write(np.stack([1000 + 100 * cols, 1000 + 100 * rows]).astype(np.float32))
    pan = str(need_shared("wv3_spacenet2", "pan.tif"))
    offsets = {}
    for phase in ("toolbox", "geometric"):
        out = tmp_path / f"{phase}.tif"
        args = ["pansharpen", pan, str(ms), "-o", str(out), "--method", "exp", "--ms-phase", phase, "-q"]
        assert run(capsys, *args)[0] == 0
        with rasterio.open(out) as ds:
            got, t = ds.read().astype(np.float64), ds.transform
            assert json.loads(ds.tags()["FUSION_PARAMS"])["ms_phase"] == phase
        # the ramp at each product pixel centre, through the transforms (MS pixel size 4 PAN px)
        m, centre = profile["transform"], np.arange(200, 1100) + 0.5
        x_ms = (t.c + t.a * centre - m.c) / m.a - 0.5  # MS centre-index coordinates
        y_ms = (t.f + t.e * centre - m.f) / m.e - 0.5
        offsets[phase] = (
            -np.mean(got[0, 650, 200:1100] - (1000 + 100 * x_ms)) / 25,  # PAN px to the right
            -np.mean(got[1, 200:1100, 650] - (1000 + 100 * y_ms)) / 25,  # PAN px down
        )
    np.testing.assert_allclose(offsets["toolbox"], (0.5, 0.5), atol=1e-3)
    np.testing.assert_allclose(offsets["geometric"], (0.0, 0.0), atol=1e-3)
    # fusion simulate decimates in the toolbox's phase: its pairs are refused the other one
    sim = tmp_path / "sim"
    assert run(capsys, "simulate", pan, str(ms), "-o", str(sim), "-q")[0] == 0
    args = ["pansharpen", str(sim / "pan_lr.tif"), str(sim / "ms_lr.tif"), "-o", str(tmp_path / "s.tif")]
    code, _, err = run(capsys, *args, "--method", "exp", "--ms-phase", "geometric")
    assert_one_line_error(code, err, "was reduced by fusion simulate, which samples in the toolbox's phase")
    # arrays carry no geotransform: the option has nothing to place by
    from fusion_cli import pipeline

    with pytest.raises(FusionError, match="fuse_arrays does not apply ms_phase"):
        pipeline.fuse_arrays(
            np.ones((1, 64, 64), np.float32), np.ones((2, 16, 16), np.float32),
            pipeline.make_fuser(method="exp", ratio=4), pipeline.FuseOptions(ms_phase="geometric"),
        )  # fmt: skip
