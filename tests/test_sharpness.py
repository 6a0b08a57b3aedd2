"""HPC, the high-pass correlation with the PAN (`fusion_cli.metrics.sharpness`), on the in-repository
Landsat-8 example: it ranks detail injection, is 1 for the PAN itself, follows the mask, and reaches
`fusion metrics`, `fusion report` and `fusion evaluate` through the metric table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE_MS, EXAMPLE_PAN, example_pair
from scipy import ndimage

from fusion_cli.errors import FusionError
from fusion_cli.metrics import full_resolution, table
from fusion_cli.metrics.sharpness import hpc, hpc_bands
from fusion_cli.pipeline import fuse_arrays, make_fuser

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _fuse(method: str, pan: np.ndarray, ms: np.ndarray) -> np.ndarray:
    fuser = make_fuser(method=method, ratio=2, sensor="landsat8", ms_bands=ms.shape[0])
    return fuse_arrays(pan.astype(np.float32), ms.astype(np.float32), fuser).astype(np.float64)


@pytest.fixture(scope="module")
def products() -> dict[str, np.ndarray]:
    """The example's PAN and MS and three products of them: EXP (interpolation), GSA, GSA blurred."""
    p = example_pair()
    gsa = _fuse("gsa", p.pan, p.ms)
    blurred = np.stack([ndimage.gaussian_filter(b, 1.5) for b in gsa])
    return {"pan": p.pan, "ms": p.ms, "exp": _fuse("exp", p.pan, p.ms), "gsa": gsa, "blurred": blurred}


def test_hpc_ranks_detail_injection_and_is_one_for_the_pan(products: dict[str, np.ndarray]) -> None:
    """GSA injects the PAN's detail: every band's HPC is above interpolation's, and blurring the GSA
    product takes it back down (measured: EXP 0.44, GSA 0.93, blurred 0.47); the PAN copied into
    every band scores 1 in every band."""
    pan = products["pan"]
    scores = {k: hpc_bands(products[k], pan, 2, "landsat8") for k in ("exp", "gsa", "blurred")}
    assert all(s.shape == (6,) and (np.abs(s) <= 1).all() for s in scores.values())
    assert (scores["gsa"] > scores["exp"] + 0.1).all()
    assert (scores["blurred"] < scores["gsa"] - 0.1).all()
    assert scores["gsa"].mean() > 0.85 and scores["exp"].mean() < 0.6
    assert hpc(products["gsa"], pan, 2, "landsat8") == pytest.approx(scores["gsa"].mean())
    np.testing.assert_allclose(hpc_bands(np.repeat(pan, 6, axis=0), pan, 2, "landsat8"), 1.0, atol=1e-12)


def test_hpc_follows_the_mask_and_refuses_bad_input(products: dict[str, np.ndarray]) -> None:
    """Pixels marked invalid do not count: garbage written into a masked block leaves the score
    within 0.01 of the clean product's (the filter's support reaches 10 px past the block), and
    drags it down unmasked."""
    pan, gsa = products["pan"], products["gsa"]
    broken = gsa.copy()
    broken[:, 100:200, 200:400] = np.random.default_rng(0).uniform(0, 30000, (6, 100, 200))
    mask = np.ones(pan.shape[1:], bool)
    mask[90:210, 190:410] = False
    clean = hpc(gsa, pan, 2, "landsat8", mask)
    assert hpc(broken, pan, 2, "landsat8", mask) == pytest.approx(clean, abs=0.01)
    assert hpc(broken, pan, 2, "landsat8") < clean - 0.1
    with pytest.raises(FusionError, match="one band on the fused grid"):
        hpc_bands(gsa, pan[:, :-2], 2)
    with pytest.raises(FusionError, match="no valid pixel"):
        hpc_bands(gsa, pan, 2, mask=np.zeros(pan.shape[1:], bool))


def test_standalone_full_resolution_indices_ignore_what_masked_pixels_hold(
    products: dict[str, np.ndarray],
) -> None:
    """d_s, d_lambda_khan, hqnr and hpc called on their own with a mask score as `full_resolution`
    does, whatever the invalid pixels hold: before, their filters carried 65535 from a 4 x 4 hole into
    the valid pixels around it (D_s 0.179 -> 0.193, HPC 0.951 -> 0.998 on a WV3 crop). A NaN in a
    valid pixel is refused, as every other index does (HPC scored its band 0)."""
    from fusion_cli.metrics import d_lambda_khan, d_s, hqnr, upsample

    pan, ms, gsa = products["pan"], products["ms"], products["gsa"]
    mask = np.ones(pan.shape[1:], bool)
    mask[100:104, 200:204] = False
    broken_gsa, broken_pan = gsa.copy(), pan.copy()
    broken_gsa[:, ~mask], broken_pan[:, ~mask] = 65535, 65535
    ms_up = upsample(ms, 2)
    whole = full_resolution(gsa, pan, ms, 2, "landsat8", mask=mask)
    for f, p in ((gsa, pan), (broken_gsa, broken_pan)):
        assert d_s(f, ms_up, p, 2, mask=mask) == pytest.approx(whole["D_s"], abs=1e-12)
        assert d_lambda_khan(f, ms_up, 2, "landsat8", mask=mask) == pytest.approx(
            whole["D_lambda_K"], abs=1e-12
        )
        assert hqnr(f, ms_up, p, 2, "landsat8", mask=mask) == pytest.approx(whole["HQNR"], abs=1e-12)
        assert hpc(f, p, 2, "landsat8", mask) == pytest.approx(whole["HPC"], abs=1e-12)
    nan = gsa.copy()
    nan[0, 50, 50] = np.nan
    with pytest.raises(FusionError, match="NaN or infinite"):
        hpc_bands(nan, pan, 2, "landsat8")


def test_hqnr_decides_the_uint16_rounding_as_full_resolution(products: dict[str, np.ndarray]) -> None:
    """Reflectance-like data (DN / 65535) given to `hqnr` and `d_lambda_khan` without saying how to
    round: scored as the DN are (HQNR was 0.07 instead of 0.71 on a WV3 product: the rounding flattened
    it to 0 and 1); DN keep the toolbox's rounding."""
    from fusion_cli.metrics import d_lambda_khan, hqnr, upsample

    pan, ms, gsa = products["pan"], products["ms"], products["gsa"]
    s = 1 / 65535
    dn = full_resolution(gsa, pan, ms, 2, "landsat8")
    assert hqnr(gsa, upsample(ms, 2), pan, 2, "landsat8") == pytest.approx(dn["HQNR"], abs=1e-12)
    refl = hqnr(gsa * s, upsample(ms * s, 2), pan * s, 2, "landsat8")
    assert refl == pytest.approx(full_resolution(gsa * s, pan * s, ms * s, 2, "landsat8")["HQNR"], abs=1e-12)
    assert refl == pytest.approx(dn["HQNR"], abs=2e-3)
    forced = d_lambda_khan(gsa * s, upsample(ms * s, 2), 2, "landsat8", round_uint16=True)
    assert abs(forced - dn["D_lambda_K"]) > 0.05


def test_hpc_is_a_full_resolution_index_of_the_table(products: dict[str, np.ndarray]) -> None:
    """Registered once: full resolution, higher is better, a `fusion evaluate` column, after HQNR;
    `full_resolution` returns it with its per-band terms, as `hpc_bands` computes them."""
    m = table.METRICS["HPC"]
    assert (m.resolution, m.higher_is_better, m.evaluate, m.validate) == ("full", True, True, False)
    assert table.evaluate_keys("full")[-2:] == ("HQNR", "HPC")
    r = full_resolution(products["gsa"], products["pan"], products["ms"], 2, "landsat8", per_band=True)
    want = hpc_bands(products["gsa"], products["pan"], 2, "landsat8")
    assert r["HPC"] == pytest.approx(want.mean()) and r["per_band"]["HPC"] == pytest.approx(want.tolist())


def test_d_lambda_k_of_float_data_skips_the_uint16_rounding(products: dict[str, np.ndarray]) -> None:
    """The example as reflectance-like floats (DN / 65535): without the rounding, D_lambda^K (and so
    HQNR) is that of the DN data, as every other index is; with it, the floats are flattened to 0 and
    1 and D_lambda^K means nothing."""
    pan, ms, gsa = products["pan"], products["ms"], products["gsa"]
    dn = full_resolution(gsa, pan, ms, 2, "landsat8")
    s = 1 / 65535
    refl = full_resolution(gsa * s, pan * s, ms * s, 2, "landsat8", round_uint16=False)
    assert refl["D_lambda_K"] == pytest.approx(dn["D_lambda_K"], abs=2e-3)
    for key in ("D_s", "HPC", "QNR"):
        assert refl[key] == pytest.approx(dn[key], abs=1e-6), key
    rounded = full_resolution(gsa * s, pan * s, ms * s, 2, "landsat8", round_uint16=True)
    assert abs(rounded["D_lambda_K"] - dn["D_lambda_K"]) > 0.05
    # by default the rounding applies to whole-number DN only, as `fusion metrics` decides
    assert full_resolution(gsa * s, pan * s, ms * s, 2, "landsat8")["D_lambda_K"] == refl["D_lambda_K"]


def test_fusion_metrics_report_and_evaluate_show_hpc(
    landsat_demo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's BDSD-PC product: `fusion metrics --per-band` shows HPC with its per-band terms,
    `fusion report` has an HPC column, and `fusion evaluate` an `HPC ↑` column where GSA scores above
    EXP on the example scene."""
    from fusion_cli.assess import EvalOptions
    from fusion_cli.cli.main import main
    from fusion_cli.evaluate import evaluate, find_scenes, parse_methods
    from fusion_cli.report import ReportItem, build_report

    try:
        main(["metrics", str(landsat_demo["product"]), "--sensor", "landsat8", "--per-band", "--json"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    got = json.loads(capsys.readouterr().out)
    assert 0.5 < got["HPC"] < 1 and len(got["per_band"]["HPC"]) == 6
    rep = build_report(
        [ReportItem(landsat_demo["product"])], tmp_path / "rep", EvalOptions(sensor="landsat8")
    )
    row = json.loads(Path(rep["json"]).read_text())[0]
    assert 0.5 < row["HPC"] < 1 and len(row["per_band"]["HPC"]) == 6
    assert "HPC" in Path(rep["csv"]).read_text().splitlines()[0]
    res = evaluate(
        find_scenes([EXAMPLE_PAN, EXAMPLE_MS]), parse_methods("exp,gsa"), tmp_path / "ev",
        sensor="landsat8", keep_products=False,
    )  # fmt: skip
    hpc_of = {s["method"]: s["HPC"] for s in res.summary}
    assert hpc_of["gsa"] > hpc_of["exp"] + 0.1
    assert "HPC ↑" in Path(res.files["markdown"]).read_text()
