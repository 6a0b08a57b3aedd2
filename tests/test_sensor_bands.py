"""Per-band MTF gains follow the bands fused: `--bands` subsets and reorders the MS, `--sensor-bands`
says which of the sensor's bands an MS file holds (real WorldView-3 data, whose eight bands each
have their own gain)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import need_shared
from test_cli_pansharpen import assert_one_line_error as one_line_error
from test_cli_pansharpen import run

from fusion_cli.cli.main import main
from fusion_cli.errors import FusionError
from fusion_cli.metrics import d_lambda_khan, hpc_bands
from fusion_cli.metrics.noreference import upsample
from fusion_cli.sensors import nyquist_gains

WV3 = nyquist_gains("wv3", 8)[0]  # coastal, blue, green, yellow, red, red edge, NIR1, NIR2


def test_sensor_band_numbers() -> None:
    from fusion_cli.sensors import sensor_band_numbers

    assert sensor_band_numbers("wv3", 8) == list(range(1, 9))
    assert sensor_band_numbers("wv3", 8, [5, 3, 2]) == [5, 3, 2]
    assert sensor_band_numbers("wv3", 4, [3, 2, 1, 4]) == [5, 3, 2, 7]  # a B, G, R, NIR1 file
    assert sensor_band_numbers("wv3", 6, [2, 1], stated=[2, 3, 4, 5, 6, 7]) == [3, 2]
    assert sensor_band_numbers("wv3", 6) is None  # cannot tell: nyquist_gains names --sensor-bands
    assert sensor_band_numbers("landsat8", 6, [3, 2, 1]) is None  # one gain for every band
    assert sensor_band_numbers("qb", 4, [3, 2, 1]) == [3, 2, 1]
    for stated, sensor, match in [
        ([1, 2, 3], "wv3", "names 3 band(s) but the MS holds 6"),
        ([1, 2, 3, 4, 5, 9], "wv3", "in 1..8"),
        ([1, 2, 3, 4, 5, 5], "wv3", "distinct"),
        ([1, 2, 3, 4, 5, 6], None, "give --sensor too"),
    ]:
        with pytest.raises(FusionError, match=re.escape(match)):
            sensor_band_numbers(sensor, 6, None, stated)
    with pytest.raises(FusionError, match="--sensor-bands"):
        nyquist_gains("wv3", 6)


@pytest.fixture(scope="module")
def wv3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real WV3 pair, its MTF-GLP product in file order, and a 6-band file of WV3 bands 2-7."""
    pan, ms = need_shared("wv3_spacenet2", "pan.tif"), need_shared("wv3_spacenet2", "ms.tif")
    d = tmp_path_factory.mktemp("wv3_bands")
    six = d / "ms6.tif"
    with rasterio.open(ms) as src:
        profile = src.profile | {"count": 6}
        with rasterio.open(six, "w", **profile) as dst:
            dst.write(src.read([2, 3, 4, 5, 6, 7]))
    full = d / "full.tif"
    main_ok(
        ["pansharpen", str(pan), str(ms), "-o", str(full), "--method", "mtf-glp", "--sensor", "wv3", "-q"]
    )
    return {"pan": pan, "ms": ms, "six": six, "full": full, "dir": d}


def main_ok(args: list[str]) -> None:
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code, args


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read().astype(np.int64)


@pytest.mark.parametrize("bands", ["8,7,6,5,4,3,2,1", "1,2,3,4", "5,3,2"])
def test_mtf_glp_bands_keep_their_own_gains(wv3: dict[str, Path], capsys, bands: str) -> None:
    # MTF-GLP fuses each band with its own gain: a subset or a reordering of the MS gives exactly
    # those bands of the file-order product. Before, a reversed set got the gains in table order (up
    # to 19 DN off), bands 1-4 got blue/green/red/NIR1's (9 DN), and an RGB pick was refused.
    out = wv3["dir"] / f"b{bands.replace(',', '')}.tif"
    args = ["pansharpen", str(wv3["pan"]), str(wv3["ms"]), "-o", str(out), "--method", "mtf-glp"]
    code, _, err = run(capsys, *args, "--sensor", "wv3", "--bands", bands, "-q")
    assert code == 0, err
    picked = [int(b) - 1 for b in bands.split(",")]
    np.testing.assert_array_equal(read(out), read(wv3["full"])[picked])
    with rasterio.open(out) as ds:
        params = json.loads(ds.tags()["FUSION_PARAMS"])
    assert params["sensor"] == "wv3" and params["sensor_bands"] == [p + 1 for p in picked]


def test_sensor_bands_of_a_band_subset_file(wv3: dict[str, Path], capsys) -> None:
    pan, six = str(wv3["pan"]), str(wv3["six"])
    out = wv3["dir"] / "six.tif"
    base = ["pansharpen", pan, six, "-o", str(out), "--method", "mtf-glp", "--overwrite", "-q"]
    code, _, err = run(capsys, *base, "--sensor", "wv3")
    one_line_error(code, err, "--sensor-bands")
    assert not out.exists()
    code, _, err = run(capsys, *base, "--sensor", "wv3", "--sensor-bands", "2,3,4,5,6,7")
    assert code == 0, err
    np.testing.assert_array_equal(read(out), read(wv3["full"])[1:7])
    # its bands' wavelengths come from the sensor numbers too (before: none, 6 is not WV3's 8 bands)
    with rasterio.open(out) as six_ds, rasterio.open(wv3["full"]) as full_ds:
        waves = [six_ds.tags(b, ns="IMAGERY").get("CENTRAL_WAVELENGTH_UM") for b in range(1, 7)]
        assert waves == [full_ds.tags(b, ns="IMAGERY")["CENTRAL_WAVELENGTH_UM"] for b in range(2, 8)]
    # and the refusals: a count that is not the file's, no --sensor, a network (its card names its bands)
    code, _, err = run(capsys, *base, "--sensor", "wv3", "--sensor-bands", "2,3,4,5,6")
    one_line_error(code, err, "names 5 band(s) but the MS holds 6")
    code, _, err = run(capsys, *base, "--sensor-bands", "2,3,4,5,6,7")
    one_line_error(code, err, "give --sensor too")
    net = ["pansharpen", pan, str(wv3["ms"]), "-o", str(wv3["dir"] / "net.tif"), "--model", "vhr4", "-q"]
    code, _, err = run(
        capsys, *net, "--bands", "2,3,5,7", "--sensor", "wv3", "--sensor-bands", "1,2,3,4,5,6,7,8"
    )
    one_line_error(code, err, "drop --sensor-bands")


def test_metrics_gains_follow_the_product_bands(wv3: dict[str, Path], capsys) -> None:
    # An RGB product (bands 5,3,2) scored at full resolution: D_lambda^K and HPC low-pass each band by
    # its own gain (before: refused, "the image has 3 bands").
    out = wv3["dir"] / "rgb.tif"
    args = ["pansharpen", str(wv3["pan"]), str(wv3["ms"]), "-o", str(out), "--method", "mtf-glp"]
    assert run(capsys, *args, "--sensor", "wv3", "--bands", "5,3,2", "-q", "--overwrite")[0] == 0
    code, text, err = run(
        capsys,
        "metrics",
        str(out),
        "--pan",
        str(wv3["pan"]),
        "--ms",
        str(wv3["ms"]),
        "--sensor",
        "wv3",
        "--json",
    )
    assert code == 0, err
    result = json.loads(text)
    assert result["bands_compared"] == [5, 3, 2]
    fused, pan = read(out).astype(np.float64), read(wv3["pan"]).astype(np.float64)
    ms = read(wv3["ms"]).astype(np.float64)[[4, 2, 1]]
    gains = [WV3[4], WV3[2], WV3[1]]
    ms_up = upsample(ms, 4)
    assert result["D_lambda_K"] == pytest.approx(d_lambda_khan(fused, ms_up, 4, gains=gains), abs=1e-9)
    assert result["HPC"] == pytest.approx(float(hpc_bands(fused, pan, 4, gains=gains).mean()), abs=1e-9)
    # the 6-band file's product needs --sensor-bands here too, and then scores its bands' gains
    six = wv3["dir"] / "six_m.tif"
    fuse6 = ["pansharpen", str(wv3["pan"]), str(wv3["six"]), "-o", str(six), "--method", "mtf-glp", "-q"]
    assert run(capsys, *fuse6, "--sensor", "wv3", "--sensor-bands", "2,3,4,5,6,7")[0] == 0
    score = ["metrics", str(six), "--pan", str(wv3["pan"]), "--ms", str(wv3["six"]), "--sensor", "wv3"]
    code, text, err = run(capsys, *score, "--sensor-bands", "2,3,4,5,6,7", "--json")
    assert code == 0, err
    # without the option, the numbers the product recorded when it was fused
    code, recorded, err = run(capsys, *score, "--json")
    assert code == 0 and json.loads(recorded)["D_lambda_K"] == json.loads(text)["D_lambda_K"], err
    fused6, ms6 = read(six).astype(np.float64), read(wv3["six"]).astype(np.float64)
    expected = d_lambda_khan(fused6, upsample(ms6, 4), 4, gains=WV3[1:7])
    assert json.loads(text)["D_lambda_K"] == pytest.approx(expected, abs=1e-9)


def test_simulate_and_evaluate_take_sensor_bands(wv3: dict[str, Path], capsys) -> None:
    # simulate's --bands (its old name) and --sensor-bands are one option; evaluate degrades the
    # 6-band file with WV3 bands 2-7's gains, as simulate does
    pan, six = str(wv3["pan"]), str(wv3["six"])
    d = wv3["dir"]
    for folder, option in (("s_new", "--sensor-bands"), ("s_old", "--bands")):
        args = ["simulate", pan, six, "-o", str(d / folder), "--sensor", "wv3", option, "2,3,4,5,6,7", "-q"]
        assert run(capsys, *args)[0] == 0
    np.testing.assert_array_equal(read(d / "s_new" / "ms_lr.tif"), read(d / "s_old" / "ms_lr.tif"))
    with rasterio.open(d / "s_new" / "ms_lr.tif") as ds:
        reduced = ds.read()
    full = wv3["dir"] / "s_full"
    assert run(capsys, "simulate", pan, str(wv3["ms"]), "-o", str(full), "--sensor", "wv3", "-q")[0] == 0
    with rasterio.open(full / "ms_lr.tif") as ds:
        np.testing.assert_array_equal(reduced, ds.read()[1:7])
    ev = ["evaluate", pan, six, "--sensor", "wv3", "--methods", "mtf-glp", "-o", str(d / "ev"), "-q"]
    code, _, err = run(capsys, *ev)
    one_line_error(code, err, "--sensor-bands")
    code, _, err = run(capsys, *ev, "--sensor-bands", "2,3,4,5,6,7")
    assert code == 0, err
    (made,) = (d / "ev" / "products").glob("*/reduced/ms_lr.tif")
    np.testing.assert_array_equal(read(made), reduced.astype(np.int64))


def test_training_gains_of_a_four_band_file(wv3: dict[str, Path]) -> None:
    # `fusion train --bands 3,2,1,4` on a B, G, R, NIR1 file: red, green, blue, NIR1 (WV3 5, 3, 2, 7),
    # not WV3's bands 3, 2, 1, 4 (green, blue, coastal, yellow) as before
    from fusion_cli.training.api import load_inputs

    d = wv3["dir"] / "train4"
    d.mkdir()
    with rasterio.open(wv3["ms"]) as src:
        with rasterio.open(d / "1_ms.tif", "w", **(src.profile | {"count": 4})) as dst:
            dst.write(src.read([2, 3, 5, 7]))
    (d / "1_pan.tif").symlink_to(wv3["pan"])
    kw = {"task": "pansharpening", "ratio": 4, "sensor": "wv3", "dn_max": 2047.0}
    scenes, _ = load_inputs([d], bands=[3, 2, 1, 4], **kw)
    assert scenes[0].sensor_bands == [5, 3, 2, 7]
    scenes, _ = load_inputs([d], bands=[3, 2, 1, 4], sensor_bands=[2, 3, 5, 8], **kw)
    assert scenes[0].sensor_bands == [5, 3, 2, 8]


def test_batch_refuses_sensor_bands_it_cannot_use_before_any_scene(tmp_path: Path, capsys) -> None:
    # before: every scene failed on its own (exit 1) for an option no scene could use
    from conftest import EXAMPLE_MS, EXAMPLE_PAN

    src = tmp_path / "in"
    src.mkdir()
    (src / "a_pan.tif").symlink_to(EXAMPLE_PAN)
    (src / "a_ms.tif").symlink_to(EXAMPLE_MS)
    out = tmp_path / "out"
    for extra, match in (((), "drop --sensor-bands"), (("--method", "gsa"), "give --sensor too")):
        code, _, err = run(capsys, "batch", str(src), str(out), "--sensor-bands", "2,3,4,5,6,7", *extra)
        one_line_error(code, err, match)
        assert not out.exists()


def test_a_pick_from_a_file_of_unknown_bands_is_refused_not_given_four_band_gains(
    wv3: dict[str, Path], capsys
) -> None:
    # `--bands 1,2,3,4` of the 6-band file (WV3 bands 2-7) took WV3's 4-band set (blue, green, red,
    # NIR1) for coastal... : yellow and red got red's and NIR1's gains (up to 14 DN) at exit 0, in
    # pansharpen, metrics and train alike. Refused, naming --sensor-bands; GSA (no gains) still fuses.
    pan, six = str(wv3["pan"]), str(wv3["six"])
    out = wv3["dir"] / "pick4.tif"
    base = [
        "pansharpen",
        pan,
        six,
        "-o",
        str(out),
        "--sensor",
        "wv3",
        "--bands",
        "1,2,3,4",
        "--overwrite",
        "-q",
    ]
    code, _, err = run(capsys, *base, "--method", "mtf-glp")
    one_line_error(code, err, "sensor wv3 has 8 bands but the MS holds 6: say which sensor bands it holds")
    assert run(capsys, *base, "--method", "gsa")[0] == 0
    score = ["metrics", str(out), "--pan", pan, "--ms", six, "--sensor", "wv3"]
    code, _, err = run(capsys, *score, "-q")
    one_line_error(code, err, "but the MS holds 6")
    from fusion_cli.training.api import load_inputs

    d = wv3["dir"] / "train6"
    d.mkdir(exist_ok=True)
    (d / "1_ms.tif").unlink(missing_ok=True)
    (d / "1_pan.tif").unlink(missing_ok=True)
    (d / "1_ms.tif").symlink_to(wv3["six"])
    (d / "1_pan.tif").symlink_to(wv3["pan"])
    with pytest.raises(FusionError, match="but the MS holds 6"):
        load_inputs([d], task="pansharpening", ratio=4, sensor="wv3", dn_max=2047.0, bands=[1, 2, 3, 4])


def test_metrics_read_the_sensor_bands_the_product_recorded(wv3: dict[str, Path], capsys) -> None:
    # a reversed 8-band file fused with --sensor-bands 8,...,1: `fusion metrics` without the option took
    # the file's order as WV3's and disagreed with `batch --metrics` (D_lambda^K 0.050315 vs 0.050191)
    rev = wv3["dir"] / "ms_rev.tif"
    with rasterio.open(wv3["ms"]) as src:
        with rasterio.open(rev, "w", **src.profile) as dst:
            dst.write(src.read()[::-1])
    out = wv3["dir"] / "rev_fused.tif"
    fuse = ["pansharpen", str(wv3["pan"]), str(rev), "-o", str(out), "--method", "mtf-glp", "--sensor", "wv3"]
    assert run(capsys, *fuse, "--sensor-bands", "8,7,6,5,4,3,2,1", "-q", "--overwrite")[0] == 0
    score = ["metrics", str(out), "--pan", str(wv3["pan"]), "--ms", str(rev), "--sensor", "wv3", "--json"]
    code, text, err = run(capsys, *score)
    assert code == 0, err
    stated = run(capsys, *score, "--sensor-bands", "8,7,6,5,4,3,2,1")[1]
    assert json.loads(text)["D_lambda_K"] == json.loads(stated)["D_lambda_K"]
    fused, ms = read(out).astype(np.float64), read(rev).astype(np.float64)
    expected = d_lambda_khan(fused, upsample(ms, 4), 4, gains=WV3[::-1])
    assert json.loads(text)["D_lambda_K"] == pytest.approx(expected, abs=1e-9)


def test_a_method_built_with_sensor_bands_maps_a_pick_through_them(wv3: dict[str, Path]) -> None:
    # make_method(sensor_bands=...) describes the MS it is given; a FuseOptions(bands=...) pick failed
    # after the statistics pass ("8 band numbers given for a 2-band image")
    from fusion_cli.classical import make_method
    from fusion_cli.pipeline import FuseOptions, fuse_arrays

    with rasterio.open(wv3["pan"]) as p, rasterio.open(wv3["ms"]) as m:
        pan, ms = p.read()[:, :256, :256].astype(np.float32), m.read()[:, :64, :64].astype(np.float32)
    built = make_method("mtf-glp", 4, sensor="wv3", sensor_bands=list(range(8, 0, -1)))
    picked = fuse_arrays(pan, ms[::-1].copy(), built, FuseOptions(bands=[4, 6]))  # WV3 bands 5 and 3
    whole = fuse_arrays(pan, ms, make_method("mtf-glp", 4, sensor="wv3"))
    np.testing.assert_array_equal(picked, whole[[4, 2]])


def test_metrics_without_sensor_use_the_sensor_the_product_records(wv3: dict[str, Path], capsys) -> None:
    # a product fused with --sensor wv3, scored without --sensor: D_lambda^K took the generic 0.3 gains
    # (0.134095 where batch --metrics --sensor wv3 gave 0.132193 on a 512^2 crop)
    score = ["metrics", str(wv3["full"]), "--pan", str(wv3["pan"]), "--ms", str(wv3["ms"]), "--json"]
    bare, given, generic = (
        json.loads(run(capsys, *score, *extra)[1])
        for extra in ([], ["--sensor", "wv3"], ["--sensor", "generic"])
    )
    assert bare["settings"]["sensor"] == "wv3"
    assert bare["D_lambda_K"] == given["D_lambda_K"] and bare["HPC"] == given["HPC"]
    fused, ms = read(wv3["full"]).astype(np.float64), read(wv3["ms"]).astype(np.float64)
    assert bare["D_lambda_K"] == pytest.approx(d_lambda_khan(fused, upsample(ms, 4), 4, gains=WV3), abs=1e-9)
    assert abs(generic["D_lambda_K"] - bare["D_lambda_K"]) > 1e-4  # the gains matter on this scene
