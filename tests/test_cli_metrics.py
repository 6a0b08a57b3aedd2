"""`fusion metrics` and the file-level evaluation behind it, on real rasters written to tmp_path."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import EXAMPLES, example_pair, have_shared, need_shared

from fusion_cli.assess import EvalOptions, evaluate, flatten, write_csv
from fusion_cli.errors import FusionError
from fusion_cli.metrics import upsample

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from fusion_cli.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
    )


def _write(
    path: Path, arr: np.ndarray, tags: dict[str, str] | None = None, nodata: float | None = None
) -> Path:
    c, h, w = arr.shape
    with rasterio.open(
        path, "w", driver="GTiff", width=w, height=h, count=c, dtype=arr.dtype, nodata=nodata
    ) as ds:
        ds.write(arr)
        if tags:
            ds.update_tags(**tags)
    return path


@pytest.fixture
def golden_tifs(tmp_path: Path) -> tuple[Path, Path]:
    g = need_shared("fusionmamba_official", "golden")
    gt = np.load(g / "b_gt.npy").transpose(2, 0, 1).astype(np.float32)
    out = np.load(g / "b_out.npy").transpose(2, 0, 1).astype(np.float32)
    return _write(tmp_path / "gt.tif", gt), _write(tmp_path / "out.tif", out)


@dataclass(frozen=True)
class Crop:
    """A PAN/MS crop written without georeferencing (the ratio comes from the sizes), as arrays too."""

    ms_path: Path
    pan_path: Path
    ms: np.ndarray
    pan: np.ndarray
    ratio: int
    sensor: str


@pytest.fixture
def wv3_crop(tmp_path: Path) -> Crop:
    """A WV3 corner of ../shared (ms 8 x 96 x 96, pan 384 x 384); without it, the shipped example's
    (ms 6 x 96 x 96, pan 192 x 192, ratio 2): reading a product's inputs does not depend on the scene."""
    if have_shared("wv3_spacenet2"):
        with (
            rasterio.open(need_shared("wv3_spacenet2", "ms.tif")) as m,
            rasterio.open(need_shared("wv3_spacenet2", "pan.tif")) as p,
        ):
            ms, pan, r, sensor = m.read()[:, :96, :96], p.read()[:, :384, :384], 4, "wv3"
    else:
        ex = example_pair(96, 96)
        ms, pan, r, sensor = ex.ms.astype(np.uint16), ex.pan.astype(np.uint16), ex.ratio, ex.sensor
    return Crop(_write(tmp_path / "ms.tif", ms), _write(tmp_path / "pan.tif", pan), ms, pan, r, sensor)


def test_cli_reduced_resolution_json_and_csv(golden_tifs: tuple[Path, Path], tmp_path: Path) -> None:
    gt, out = golden_tifs
    table = tmp_path / "m.csv"
    res = run_cli(
        "metrics", str(out), "--ref", str(gt), "--ratio", "4", "--json", "--csv", str(table), "--per-band"
    )
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert round(r["Q2n"], 4) == 0.8609 and round(r["SAM"], 3) == 3.583 and round(r["ERGAS"], 3) == 2.263
    assert r["q2n_name"] == "Q8" and len(r["per_band"]["PSNR"]) == 8
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 1 and float(rows[0]["Q"]) == pytest.approx(r["Q"]) and "SCC_b8" in rows[0]


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    # The shipped example's MS (6, 160, 320) as the reference and a noisy copy as the product.
    ms = example_pair().ms.astype(np.float32)
    gt = _write(tmp_path / "gt.tif", ms)
    out = _write(
        tmp_path / "out.tif", ms + np.random.default_rng(0).normal(0, 50, ms.shape).astype(np.float32)
    )
    res = run_cli("metrics", str(out), "--ref", str(gt))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--ratio" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    small = _write(tmp_path / "small.tif", np.zeros((6, 64, 64), np.float32))
    res = run_cli("metrics", str(small), "--ref", str(gt), "--ratio", "2")
    assert res.returncode == 2 and "differ" in res.stderr and "Traceback" not in res.stderr
    # a block far beyond the image: Q2n's mirror padding asked for 112 GiB (MemoryError traceback)
    res = run_cli("metrics", str(out), "--ref", str(gt), "--ratio", "2", "--block", "100000")
    assert res.returncode == 2 and "smaller --block" in res.stderr and "Traceback" not in res.stderr


def test_cli_full_resolution_from_product_tags(wv3_crop: Crop, tmp_path: Path) -> None:
    c = wv3_crop
    up = upsample(c.ms, c.ratio).astype(np.float32)
    product = _write(tmp_path / "exp.tif", up, {"FUSION_PAN": str(c.pan_path), "FUSION_MS": str(c.ms_path)})
    res = run_cli("metrics", str(product), "--sensor", c.sensor, "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["mode"] == "full" and r["ratio"] == c.ratio and r["pan"] == str(c.pan_path)
    assert r["D_lambda"] == pytest.approx(0.0, abs=1e-6)  # the interpolated MS itself (stored as float32)
    assert 0 < r["D_s"] < 0.25 and 0.6 < r["HQNR"] < 1.0


def test_evaluate_full_resolution_explicit_inputs_and_errors(wv3_crop: Crop, tmp_path: Path) -> None:
    c = wv3_crop
    product = _write(tmp_path / "p.tif", upsample(c.ms, c.ratio).astype(np.float32))
    r = evaluate(product, pan=c.pan_path, ms=c.ms_path, opts=EvalOptions(sensor=c.sensor))
    assert r["D_lambda"] == pytest.approx(0.0, abs=1e-6) and r["QNR"] == pytest.approx(1 - r["D_s"])
    with pytest.raises(FusionError, match="FUSION_PAN"):
        evaluate(product)
    with pytest.raises(FusionError, match="both --pan and --ms"):
        evaluate(product, pan=c.pan_path)
    other = 6 - c.ratio
    with pytest.raises(FusionError, match=f"ratio is {c.ratio}, not {other}"):  # the grids say c.ratio
        evaluate(product, pan=c.pan_path, ms=c.ms_path, opts=EvalOptions(ratio=other))


def test_evaluate_nodata_on_real_wv2_pair(tmp_path: Path) -> None:
    # SpaceNet-6 pair 2: a third of the scene is unflagged zeros; --nodata 0 leaves it out. Without
    # ../shared, the example's MS with such a collar over its left third.
    if have_shared("wv2_spacenet6"):
        with rasterio.open(need_shared("wv2_spacenet6", "ms_2.tif")) as m:
            ms, r = m.read(), 4
    else:
        ex = example_pair()
        ms, r = ex.ms.astype(np.uint16), ex.ratio
        ms[:, :, : ms.shape[2] // 3] = 0
    gt = _write(tmp_path / "gt.tif", ms)
    noisy = (ms + np.where(ms > 0, 25, 0)).astype(np.uint16)  # a bias on valid pixels only
    prod = _write(tmp_path / "p.tif", noisy)
    plain = evaluate(prod, ref=gt, opts=EvalOptions(ratio=r))
    masked = evaluate(prod, ref=gt, opts=EvalOptions(ratio=r, nodata=0))
    assert masked["valid_fraction"] < 0.75 and plain["valid_fraction"] == 1.0
    # zero pixels are a perfect match, so leaving them out makes the score worse and honest
    assert masked["RMSE"] > plain["RMSE"] and masked["ERGAS"] != pytest.approx(plain["ERGAS"])
    assert masked["RMSE"] == pytest.approx(25.0, abs=1e-9)


def test_csv_append_keeps_header(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    write_csv([flatten({"product": "a", "mode": "reduced", "Q": 0.5})], p, append=True)
    write_csv([flatten({"product": "b", "mode": "reduced", "Q": 0.7, "SAM": 3.0})], p, append=True)
    rows = list(csv.DictReader(p.open()))
    assert [r["product"] for r in rows] == ["a", "b"] and rows[1]["Q"] == "0.7"
    # a new column (SAM) joins the header instead of being dropped; old rows leave it empty
    assert rows[1]["SAM"] == "3.0" and rows[0]["SAM"] == ""
    # a file whose last line has no newline (hand-edited, cut by an editor): the next row is its own
    p.write_bytes(p.read_bytes().rstrip(b"\r\n"))
    write_csv([flatten({"product": "c", "mode": "full", "HQNR": 0.9})], p, append=True)
    rows = list(csv.DictReader(p.open()))
    assert [(r["product"], r["mode"]) for r in rows] == [("a", "reduced"), ("b", "reduced"), ("c", "full")]
    assert rows[2]["HQNR"] == "0.9" and rows[1]["SAM"] == "3.0"
    assert len({len(line.split(",")) for line in p.read_text().splitlines()}) == 1
    # saved again by Excel as "CSV UTF-8": a byte-order mark in front of the header
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    write_csv([flatten({"product": "d", "mode": "full", "HQNR": 0.8})], p, append=True)
    assert [r["product"] for r in csv.DictReader(p.open(encoding="utf-8-sig"))] == ["a", "b", "c", "d"]


def test_cli_metrics_scores_the_demo_product(landsat_demo: dict[str, Path]) -> None:
    """The demo's product lacks the half-covered first PAN row and column (319 x 639, not 2 x MS):
    lined up by the geotransforms, product pixels [1, 639) and PAN pixels [2, 640) lie over MS
    pixels [1, 320) (the half-PAN-pixel tie goes to the earlier pixel), and the indices are those of
    these crops (the product's tags name its PAN and MS)."""
    from fusion_cli.metrics import full_resolution

    res = run_cli("metrics", str(landsat_demo["product"]), "--sensor", "landsat8", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["mode"] == "full" and got["ratio"] == 2
    with (
        rasterio.open(landsat_demo["product"]) as f,
        rasterio.open(landsat_demo["pan"]) as p,
        rasterio.open(landsat_demo["ms"]) as m,
    ):
        assert f.shape == (319, 639)
        fused, pan, ms = f.read()[:, 1:, 1:], p.read()[:, 2:, 2:], m.read()[:, 1:, 1:]
    want = full_resolution(fused, pan, ms, 2, "landsat8")
    for key in ("D_lambda", "D_s", "QNR", "HQNR", "HPC"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert 0.8 < got["QNR"] <= 1
    # a ratio that contradicts the grids is refused in one line
    res = run_cli("metrics", str(landsat_demo["product"]), "--ratio", "4")
    assert res.returncode == 2 and "ratio is 2, not 4" in res.stderr and res.stderr.count("\n") == 1


def test_a_product_fused_with_reordered_bands_is_scored_against_the_same_bands(tmp_path: Path) -> None:
    """`--bands 3,2,1,4,5,6` (red first, as the landsat card orders them) made a product whose band k
    is MS band bands[k]; with equal band counts the metrics compared it with the MS and reference in
    file order: SAM 4.64 against 1.42, HQNR 0.70 against 0.85 for the same fusion. The product's
    recorded bands map them, at both resolutions, and the report's figures show the same bands."""
    from fusion_cli.pipeline import pansharpen
    from fusion_cli.report import build_report, collect_items
    from fusion_cli.wald import simulate_files

    sim = simulate_files(
        EXAMPLES / "landsat8_pan.tif", EXAMPLES / "landsat8_ms.tif", tmp_path / "sim", "landsat8"
    )
    natural, reordered = tmp_path / "natural.tif", tmp_path / "reordered.tif"
    pansharpen(sim.pan, sim.ms, natural, method="gsa", sensor="landsat8")
    pansharpen(sim.pan, sim.ms, reordered, method="gsa", sensor="landsat8", bands=[3, 2, 1, 4, 5, 6])
    with rasterio.open(natural) as a, rasterio.open(reordered) as b:
        # the same fusion, reordered (float32: the band sums of GSA's intensity round differently)
        np.testing.assert_allclose(a.read()[[2, 1, 0, 3, 4, 5]], b.read(), rtol=1e-5)
    for extra in (["--ref", str(sim.ref)], []):
        got = [json.loads(run_cli("metrics", str(p), "--sensor", "landsat8", "--json", *extra).stdout)
               for p in (natural, reordered)]  # fmt: skip
        keys = ("Q2n", "SAM", "ERGAS") if extra else ("D_lambda", "D_s", "HQNR")
        for k in keys:
            assert got[1][k] == pytest.approx(got[0][k], rel=1e-4), k  # Q2n: band order, 2e-6
    summary = build_report(collect_items([reordered], ref=sim.ref), tmp_path / "report")
    assert summary["failed"] == 0
    images = {p.name for p in (tmp_path / "report" / "img").iterdir()}
    assert {"000_reordered_sam.png", "000_reordered_error.png", "000_reordered_bands.png"} <= images


def test_metrics_bands_ratio_rounding_and_json_say_what_was_compared(tmp_path: Path) -> None:
    """Four ways `fusion metrics` gave a wrong or unreadable number without a word, on a GSA product
    of the example's Wald pair fused with --bands 3,2,1,4,5,6:
    - a reference already in the product's order was reordered once more (SAM tripled): `--bands
      1,2,3,4,5,6` now says so, and the bands compared are printed and in the JSON;
    - `--ratio 1` against a product fused at ratio 2 halved nothing but doubled ERGAS: refused;
    - float reflectance was rounded to uint16 (Q2n 0.58 for a product of 0.89): only integer DN are;
    - PSNR of identical images was written as bare `Infinity`, which strict JSON parsers reject."""
    from fusion_cli.pipeline import pansharpen
    from fusion_cli.wald import simulate_files

    sim = simulate_files(
        EXAMPLES / "landsat8_pan.tif", EXAMPLES / "landsat8_ms.tif", tmp_path / "sim", "landsat8"
    )
    order = [3, 2, 1, 4, 5, 6]
    product = tmp_path / "reordered.tif"
    pansharpen(sim.pan, sim.ms, product, method="gsa", sensor="landsat8", bands=order)

    def rewrite(src_path: Path, path: Path, arr: np.ndarray) -> Path:
        """`arr` on `src_path`'s grid, with its tags (a product keeps its FUSION_PARAMS)."""
        with rasterio.open(src_path) as src:
            profile, tags = {**src.profile, "dtype": arr.dtype.name, "nodata": None}, src.tags()
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(arr)
            ds.update_tags(**tags)
        return path

    with rasterio.open(sim.ref) as src:
        ref = src.read()
    with rasterio.open(product) as src:
        fused = src.read()
    in_product_order = rewrite(sim.ref, tmp_path / "ref_product_order.tif", ref[[b - 1 for b in order]])

    def metrics(*args: str, fused: Path = product) -> dict:
        res = run_cli("metrics", str(fused), "--json", *args)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    reference = metrics("--ref", str(sim.ref))
    assert reference["bands_compared"] == order and reference["ratio"] == 2
    override = metrics("--ref", str(in_product_order), "--bands", "1,2,3,4,5,6")
    assert override["bands_compared"] == [1, 2, 3, 4, 5, 6]
    for k in ("Q2n", "SAM", "ERGAS"):
        assert override[k] == pytest.approx(reference[k], rel=1e-9), k
    res = run_cli("metrics", str(product), "--ref", str(in_product_order))
    assert res.returncode == 0 and "compared with bands 3,2,1,4,5,6 of the reference" in res.stdout

    res = run_cli("metrics", str(product), "--ref", str(sim.ref), "--ratio", "1")
    assert res.returncode == 2 and "contradicts the ratio 2" in res.stderr and "Traceback" not in res.stderr

    # the same product and reference as float reflectance: not rounded unless asked
    scale = np.float32(1 / 30000)
    refl_product = rewrite(product, tmp_path / "refl.tif", fused.astype(np.float32) * scale)
    refl_ref = rewrite(sim.ref, tmp_path / "refl_ref.tif", ref.astype(np.float32) * scale)
    refl = metrics("--ref", str(refl_ref), fused=refl_product)
    assert refl["settings"]["round_uint16"] is False
    assert refl["Q2n"] == pytest.approx(reference["Q2n"], abs=0.01)
    assert metrics("--ref", str(refl_ref), "--uint16", fused=refl_product)["Q2n"] < 0.7 * refl["Q2n"]

    same = run_cli("metrics", str(sim.ref), "--ref", str(sim.ref), "--ratio", "2", "--json")
    assert "Infinity" not in same.stdout and "NaN" not in same.stdout
    assert json.loads(same.stdout)["PSNR"] is None


def test_full_resolution_needs_a_valid_area_beyond_the_filters_reach(tmp_path: Path) -> None:
    """The indices leave out pixels whose filters reach nodata (52 PAN px at ratio 4); a valid area
    narrower than that said 'no 32x32 block is free of nodata' although one was. Now the message says
    why, and a result reports the share of pixels scored beside the valid share. --nodata that no
    input can hold (NaN in uint16 data) masked nothing, silently."""
    from fusion_cli.assess import evaluate as score_files

    ex = example_pair()
    r = ex.ratio
    pan = ex.pan.astype(np.uint16)
    ms = ex.ms.astype(np.uint16)
    fused = np.repeat(np.repeat(ms, r, axis=1), r, axis=2)
    paths = {
        "pan": _write(tmp_path / "pan.tif", pan, nodata=0),
        "ms": _write(tmp_path / "ms.tif", ms, nodata=0),
    }
    wide = fused.copy()
    wide[:, :, :100] = 0  # a third of the scene is nodata
    result = score_files(_write(tmp_path / "wide.tif", wide, nodata=0), pan=paths["pan"], ms=paths["ms"])
    assert 0 < result["scored_fraction"] < result["valid_fraction"] < 1
    # the MS's nodata counts too, not only the product's (it said 1.0 beside a third of it scored)
    holed = ms.copy()
    holed[:, :, : ms.shape[2] // 3] = 0
    result = score_files(
        _write(tmp_path / "full.tif", fused),
        pan=paths["pan"],
        ms=_write(tmp_path / "holed.tif", holed, nodata=0),
    )
    assert result["valid_fraction"] == pytest.approx(1 - (ms.shape[2] // 3) / ms.shape[2], abs=1e-6)
    narrow = np.zeros_like(fused)
    narrow[:, 100:160, 200:260] = fused[:, 100:160, 200:260]  # 60 px: narrower than twice the reach
    with pytest.raises(FusionError, match="lies 26 PAN px inside the valid data"):
        score_files(_write(tmp_path / "narrow.tif", narrow, nodata=0), pan=paths["pan"], ms=paths["ms"])
    with pytest.raises(FusionError, match="cannot occur in any input"):
        score_files(
            tmp_path / "wide.tif", pan=paths["pan"], ms=paths["ms"], opts=EvalOptions(nodata=float("nan"))
        )


def _encoded(path: Path, arr: np.ndarray, scale: float, offset: float) -> Path:
    """`arr` written with the band scale and offset GDAL applies to unscale it."""
    _write(path, arr)
    with rasterio.open(path, "r+") as ds:
        ds.scales, ds.offsets = [scale] * ds.count, [offset] * ds.count
    return path


def test_a_product_and_reference_in_other_scale_offset_are_refused(tmp_path: Path) -> None:
    """The indices compare stored DN: a product of reflectance (DN * 2.75e-05 - 0.2, stored as is)
    against its reference in Collection-2 DN scored ERGAS in the thousands, and the same DN under
    another scale scored perfect. Both refused in one line; one encoding on both is scored."""
    dn = example_pair(64, 64).ms.astype(np.uint16)
    gt = _encoded(tmp_path / "gt_c2.tif", dn, 2.75e-05, -0.2)
    reflectance = _write(tmp_path / "refl.tif", (dn * 2.75e-05 - 0.2).astype(np.float32))
    res = run_cli("metrics", str(reflectance), "--ref", str(gt), "--ratio", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (
        "product and reference store their values with different scale/offset (product 1 / 0, reference "
        "2.75e-05 / -0.2): the indices compare stored DN; write both in the same units first" in res.stderr
    )
    plain = _write(tmp_path / "gt.tif", dn)
    doubled = _encoded(tmp_path / "doubled.tif", dn, 2.0, 0.0)
    with pytest.raises(FusionError, match=r"\(product 2 / 0, reference 1 / 0\)"):
        evaluate(doubled, ref=plain, opts=EvalOptions(ratio=2))
    same = _encoded(tmp_path / "same.tif", dn, 2.75e-05, -0.2)
    assert evaluate(same, ref=gt, opts=EvalOptions(ratio=2))["ERGAS"] == pytest.approx(0.0, abs=1e-9)


def test_full_resolution_indices_refuse_a_product_or_pan_in_other_scale_offset(tmp_path: Path) -> None:
    """Full resolution skipped the check the reference makes: a Collection-2 scaled product scored
    against a plain-DN MS gave D_lambda^K 1.000 and HQNR 0.000 at exit 0. The product and the PAN
    must store their values as the MS does."""
    pair = example_pair(64, 64)
    ms_plain = _write(tmp_path / "ms.tif", pair.ms.astype(np.uint16))
    pan_plain = _write(tmp_path / "pan.tif", pair.pan.astype(np.uint16))
    fused = upsample(pair.ms.astype(np.float64), 2).round()
    scaled = _encoded(tmp_path / "fused_c2.tif", fused.astype(np.uint16), 2.75e-05, -0.2)
    res = run_cli("metrics", str(scaled), "--pan", str(pan_plain), "--ms", str(ms_plain), "--ratio", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (
        "product and MS store their values with different scale/offset (product 2.75e-05 / -0.2, MS 1 / 0)"
        in (res.stderr)
    )
    pan_c2 = _encoded(tmp_path / "pan_c2.tif", pair.pan.astype(np.uint16), 2.75e-05, -0.2)
    plain = _write(tmp_path / "fused.tif", fused.astype(np.uint16))
    with pytest.raises(FusionError, match=r"PAN and MS store their values with different scale/offset"):
        evaluate(plain, pan=pan_c2, ms=ms_plain, opts=EvalOptions())
    assert 0 < evaluate(plain, pan=pan_plain, ms=ms_plain, opts=EvalOptions())["HQNR"] <= 1


def test_full_resolution_indices_refuse_a_pan_in_other_units_than_the_ms(tmp_path: Path) -> None:
    """A uint8 PAN beside a uint16 MS (or a reflectance PAN beside DN): D_s fell to 0 and QNR rose
    from 0.85 to 0.94 at exit 0, ranking a product by its inputs' units. Refused in one line."""
    pair = example_pair(64, 64)
    ms = _write(tmp_path / "ms.tif", pair.ms.astype(np.uint16))
    pan = _write(tmp_path / "pan.tif", pair.pan.astype(np.uint16))
    pan8 = _write(tmp_path / "pan8.tif", np.round(pair.pan / 257).astype(np.uint8))
    fused = _write(tmp_path / "fused.tif", upsample(pair.ms.astype(np.float64), 2).round().astype(np.uint16))
    res = run_cli("metrics", str(fused), "--pan", str(pan8), "--ms", str(ms), "--ratio", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (
        "PAN pan8.tif (99th percentile" in res.stderr
        and "are not in the same units or bit depth" in res.stderr
    )
    assert 0 < evaluate(fused, pan=pan, ms=ms, opts=EvalOptions())["QNR"] < 1


def test_a_hyperspectral_product_of_dim_bands_is_scored_against_its_own_pan(tmp_path: Path) -> None:
    """The PAN/MS level check compares the PAN with the whole MS: the Paris Hyperion SWIR bands alone
    sit up to 18x below the ALI PAN, and a product of bands 120-128 was refused as "not in the same
    units" against the very PAN and HSI it was fused from (HQNR 0.933 before the check)."""
    pan = str(need_shared("eo1_hyperion_ali_paris", "pan.tif"))
    hs = str(need_shared("eo1_hyperion_ali_paris", "hs.tif"))
    out = tmp_path / "swir.tif"
    bands = ",".join(str(b) for b in range(120, 129))
    fused = run_cli(
        "pansharpen",
        pan,
        hs,
        "-o",
        str(out),
        "--method",
        "mtf-glp",
        "--sensor",
        "hyperion",
        "--bands",
        bands,
        "-q",
    )
    assert fused.returncode == 0, fused.stderr
    res = run_cli("metrics", str(out), "--pan", pan, "--ms", hs, "--sensor", "hyperion", "--json")
    assert res.returncode == 0, res.stderr
    assert 0.9 < json.loads(res.stdout)["HQNR"] < 1


def test_an_unfinished_product_is_refused_and_a_report_skips_temporaries(
    landsat_demo: dict[str, Path], tmp_path: Path
) -> None:
    """A product of this tool without its completion tag (what a killed run leaves, under a hidden
    `.NAME.partial-PID-*` name) was scored at exit 0 (HQNR 0 on an all-zero leftover), and `fusion
    report FOLDER` listed such temporaries as products."""
    import shutil

    from fusion_cli.report import collect_items

    partial = tmp_path / f".{landsat_demo['product'].name}.partial-123-0a7c1234.tif"
    shutil.copy(landsat_demo["product"], partial)
    with rasterio.open(partial, "r+") as ds:
        ds.update_tags(FUSION_COMPLETE="0")
    res = run_cli("metrics", str(partial), "--sensor", "landsat8")
    assert res.returncode == 2 and "unfinished product" in res.stderr and res.stderr.count("\n") == 1
    shutil.copy(landsat_demo["product"], tmp_path / "done.tif")
    assert [Path(i.product).name for i in collect_items([tmp_path])] == ["done.tif"]


def test_a_dead_nan_band_left_out_of_the_product_does_not_void_the_reference(tmp_path: Path) -> None:
    """A reference (or MS) with one band all NaN, a dead band, and a product fused without it
    (--bands): NaN counted in every band of the file, so every pixel was invalid and `fusion metrics`
    refused ("the reference has no valid pixel"). The bands compared decide now: the scores equal
    those against the clean reference."""
    sim = tmp_path / "sim"
    res = run_cli(
        "simulate", str(EXAMPLES / "landsat8_pan.tif"), str(EXAMPLES / "landsat8_ms.tif"), "-o", str(sim)
    )
    assert res.returncode == 0, res.stderr
    with rasterio.open(sim / "ms_ref.tif") as ds:
        ref, profile = ds.read().astype(np.float32), ds.profile
    ref[5] = np.nan
    dead = tmp_path / "ref_dead.tif"
    with rasterio.open(dead, "w", **{**profile, "dtype": "float32", "predictor": 1, "nodata": None}) as dst:
        dst.write(ref)
    product = tmp_path / "p.tif"
    args = [
        "pansharpen",
        str(sim / "pan_lr.tif"),
        str(sim / "ms_lr.tif"),
        "-o",
        str(product),
        "--method",
        "gsa",
    ]
    res = run_cli(*args, "--bands", "1,2,3,4,5", "--sensor", "landsat8", "-q")
    assert res.returncode == 0, res.stderr
    scores = []
    for reference in (dead, sim / "ms_ref.tif"):
        res = run_cli("metrics", str(product), "--ref", str(reference), "--json")
        assert res.returncode == 0, res.stderr
        scores.append(json.loads(res.stdout))
    assert scores[0]["bands_compared"] == [1, 2, 3, 4, 5]
    for key in ("Q2n", "SAM", "ERGAS", "PSNR"):
        assert scores[0][key] == pytest.approx(scores[1][key], rel=1e-9), key


def test_nan_in_a_product_is_refused_unless_declared_nodata(tmp_path: Path) -> None:
    """A product with NaN outside its nodata (a fusion that failed there) was scored around them at
    exit 0 (helper: Q2n 0.787077 against 0.787483 clean); a reference's NaN (dead bands) still is."""
    sim = tmp_path / "sim"
    pan, ms = str(EXAMPLES / "landsat8_pan.tif"), str(EXAMPLES / "landsat8_ms.tif")
    assert run_cli("simulate", pan, ms, "-o", str(sim)).returncode == 0
    product = tmp_path / "p.tif"
    args = [str(sim / "pan_lr.tif"), str(sim / "ms_lr.tif"), "-o", str(product), "--method", "gsa"]
    assert run_cli("pansharpen", *args, "--dtype", "float32", "-q").returncode == 0
    with rasterio.open(product, "r+") as ds:
        data = ds.read()
        data[:, 40:50, 60:70] = np.nan
        ds.write(data)
    res = run_cli("metrics", str(product), "--ref", str(sim / "ms_ref.tif"), "--json")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "has NaN or infinite values at 100 px outside its nodata" in res.stderr
    with rasterio.open(product, "r+") as ds:
        ds.nodata = float("nan")
    res = run_cli("metrics", str(product), "--ref", str(sim / "ms_ref.tif"), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert 0 < 1 - json.loads(res.stdout)["valid_fraction"] < 0.01


def _float_tif(path: Path, data: np.ndarray) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype="float32") as dst:  # fmt: skip
        dst.write(data.astype(np.float32))
    return path


def test_a_dead_band_that_makes_ergas_or_psnr_infinite_is_named(tmp_path: Path) -> None:
    """A reference band at 0 (a dead band of a hyperspectral cube) made ERGAS NaN and the band
    reproduced exactly made PSNR inf, null in the JSON without a word (helper, San Francisco
    Hyperion); a warning now names the band and why. A pair without such a band says nothing."""
    ms = example_pair().ms
    ref, fused = ms.copy(), ms + 3
    ref[4] = fused[4] = 0
    args = ["--ratio", "2", "--json"]
    res = run_cli(
        "metrics",
        str(_float_tif(tmp_path / "f.tif", fused)),
        "--ref",
        str(_float_tif(tmp_path / "r.tif", ref)),
        *args,
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["ERGAS"] is None and got["PSNR"] is None
    assert "ERGAS is nan: band(s) 5 of the product average 0 in the reference" in res.stderr
    assert "PSNR is inf: band(s) 5 of the product equal the reference exactly" in res.stderr
    res = run_cli(
        "metrics",
        str(_float_tif(tmp_path / "f2.tif", ms + 3)),
        "--ref",
        str(_float_tif(tmp_path / "r2.tif", ms)),
        *args,
    )
    assert res.returncode == 0 and "Warning" not in res.stderr, res.stderr
    assert json.loads(res.stdout)["ERGAS"] > 0


def test_the_pan_ms_level_check_runs_beside_a_dead_band(tmp_path: Path) -> None:
    """The PAN/MS units check looked at the MS pixels valid in every band: with one band all NaN (dead)
    none was, and a PAN 1000x off its MS was scored without a word (reviewer). The dead band is left
    out of the check; the same files with the right PAN are scored."""
    with rasterio.open(EXAMPLES / "landsat8_ms.tif") as ds:
        ms, profile = ds.read().astype(np.float32), ds.profile | {"dtype": "float32", "predictor": 3}
    ms[5] = np.nan
    dead = tmp_path / "dead_ms.tif"
    with rasterio.open(dead, "w", **profile) as dst:
        dst.write(ms)
    with rasterio.open(EXAMPLES / "landsat8_pan.tif") as ds:
        pan, pan_profile = ds.read().astype(np.float32), ds.profile | {"dtype": "float32", "predictor": 3}
    pans = {}
    for name, scale in (("pan", 1.0), ("pan_x1000", 1000.0)):
        pans[name] = tmp_path / f"{name}.tif"
        with rasterio.open(pans[name], "w", **pan_profile) as dst:
            dst.write(pan * scale)
    product = tmp_path / "p.tif"
    fuse = ["pansharpen", str(pans["pan"]), str(dead), "-o", str(product), "--method", "gsa", "-q"]
    res = run_cli(*fuse, "--bands", "1,2,3,4,5", "--sensor", "landsat8")
    assert res.returncode == 0, res.stderr
    res = run_cli("metrics", str(product), "--pan", str(pans["pan_x1000"]), "--ms", str(dead))
    assert res.returncode == 2 and "not in the same units" in res.stderr, res.stderr
    res = run_cli("metrics", str(product), "--pan", str(pans["pan"]), "--ms", str(dead), "--json")
    assert res.returncode == 0 and 0 < json.loads(res.stdout)["HQNR"] <= 1, res.stderr


def test_scoring_beyond_the_available_memory_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full-resolution scoring of an 8 x 8100^2 product needed ~28 GB and the kernel killed it on a
    24 GB machine with no message (helper). The need is estimated from the product's header and
    compared with what the machine (or the cgroup) has left: here the example product at full
    resolution against a machine with 50 MB free."""
    from fusion_cli import assess, memory

    assert (memory.available_memory() or 1) > 0
    product = tmp_path / "p.tif"
    pan, ms = str(EXAMPLES / "landsat8_pan.tif"), str(EXAMPLES / "landsat8_ms.tif")
    assert run_cli("pansharpen", pan, ms, "-o", str(product), "--method", "gsa", "-q").returncode == 0
    monkeypatch.setattr(assess, "available_memory", lambda: 50 * 2**20)
    with pytest.raises(
        FusionError,
        match=r"\(6 x 319 x 639\) at full resolution needs about 0\.1 GiB of memory, 0\.0 GiB is avail",
    ):
        assess.evaluate(product)
    monkeypatch.setattr(assess, "available_memory", lambda: 2**30)
    assert assess.evaluate(product)["mode"] == "full"
    # a container near its cgroup limit with page cache the kernel reclaims is not full (reviewer)
    group = tmp_path / "cgroup"
    group.mkdir()
    (group / "memory.max").write_text("8000000000\n")
    (group / "memory.current").write_text("7900000000\n")
    (group / "memory.stat").write_text("anon 2900000000\ninactive_file 5000000000\n")
    assert memory._cgroup_room(group, "memory.max", "memory.current", "inactive_file") == [5_100_000_000]
    (group / "memory.max").write_text("max\n")
    assert memory._cgroup_room(group, "memory.max", "memory.current", "inactive_file") == []
    # a Slurm job's limit sits above its task's group, which says "max": the parents count too
    task = group / "job_5" / "step_0"
    task.mkdir(parents=True)
    (task / "memory.max").write_text("max\n")
    (group / "job_5" / "memory.max").write_text(str(4 * 2**30))
    (group / "job_5" / "memory.current").write_text(str(2**30))
    chain = memory._cgroup_chain(group, "/job_5/step_0/task_0")
    assert chain == [task, group / "job_5", group]
    rooms = [
        r for g in chain for r in memory._cgroup_room(g, "memory.max", "memory.current", "inactive_file")
    ]
    assert min(rooms) == 3 * 2**30


def test_inputs_changed_since_the_fusion_are_refused(tmp_path: Path) -> None:
    """`metrics` and `report` read the PAN and MS a product's tags name; an MS rewritten after the
    fusion (here its rows flipped) was scored at exit 0 (helper: QNR 0.848 became 0.264). The product
    records its inputs' size, time and SHA-256 (FUSION_REQUEST): such an input is refused, and given
    explicitly with --pan and --ms it is scored as it is. A missing one is named with its tag."""
    import shutil

    pan, ms = tmp_path / "pan.tif", tmp_path / "ms.tif"
    shutil.copy(EXAMPLES / "landsat8_pan.tif", pan)
    shutil.copy(EXAMPLES / "landsat8_ms.tif", ms)
    product = tmp_path / "p.tif"
    fused = run_cli("pansharpen", str(pan), str(ms), "-o", str(product), "--method", "gsa", "-q")
    assert fused.returncode == 0, fused.stderr
    before = run_cli("metrics", str(product), "--json")
    assert before.returncode == 0, before.stderr
    with rasterio.open(ms, "r+") as ds:
        ds.write(ds.read()[:, ::-1])
    for cmd in (("metrics", str(product)), ("report", str(product), "-o", str(tmp_path / "rep"))):
        res = run_cli(*cmd)
        assert res.returncode in (1, 2) and "is not the file it was fused from" in res.stderr + res.stdout
    explicit = run_cli("metrics", str(product), "--pan", str(pan), "--ms", str(ms), "--json")
    assert explicit.returncode == 0, explicit.stderr
    assert json.loads(explicit.stdout)["HQNR"] < json.loads(before.stdout)["HQNR"] - 0.1
    # inputs moved away: "PAN file not found" said nothing of the tag or of --pan/--ms
    pan.rename(tmp_path / "moved_pan.tif")
    res = run_cli("metrics", str(product))
    assert res.returncode == 2 and "(its FUSION_PAN tag) is not there: pass --pan and --ms" in res.stderr
