"""Quicklooks and `fusion report` on real rasters (golden WV3 products of ../shared, the shipped
Landsat-8 example) written to tmp_path."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import EXAMPLES, example_pair, need_shared

from fusion_cli.assess import EvalOptions
from fusion_cli.errors import FusionError
from fusion_cli.metrics import upsample
from fusion_cli.quicklook import save_quicklook, stretch_limits, stretch_rgb
from fusion_cli.report import ReportItem, build_report, collect_items, read_manifest

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _write(path: Path, arr: np.ndarray, tags: dict[str, str] | None = None) -> Path:
    c, h, w = arr.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=arr.dtype) as ds:
        ds.write(arr)
        if tags:
            ds.update_tags(**tags)
    return path


# --- quicklook --------------------------------------------------------------------------------------


def test_stretch_rgb_percentiles_mask_and_shared_limits() -> None:
    img = np.stack([np.tile(np.arange(100.0), (10, 1)) * k for k in (1, 2, 3)])  # (3, 10, 100)
    mask = np.ones((10, 100), bool)
    mask[:, :10] = False
    out = stretch_rgb(img, (0, 1, 2), pct=(0, 100), mask=mask)
    assert out.shape == (10, 100, 3) and out.dtype == np.uint8
    assert (out[:, :10] == 0).all()  # masked pixels are black
    assert out[0, 10, 0] == 0 and out[0, 99, 0] == 255  # stretched over the valid range 10..99
    limits = stretch_limits(img, pct=(0, 100))
    brighter = stretch_rgb(img * 0.5, (0, 1, 2), limits=limits)
    assert brighter[0, 99, 0] == round(255 * (49.5 / 99))  # the same stretch keeps images comparable
    with pytest.raises(FusionError):
        stretch_rgb(img, (0, 1, 5))


def test_save_quicklook_subsamples_and_keeps_input(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    ms = example_pair().ms.astype(np.uint16)  # (6, 160, 320)
    before = ms.copy()
    path = save_quicklook(tmp_path / "q" / "ms.png", ms, max_side=100)
    png = plt.imread(path)
    assert png.shape[:2] == (40, 80)  # 320 px, stride 4
    assert png[..., :3].std() > 0.05  # a real scene, not a blank
    np.testing.assert_array_equal(ms, before)
    # a library caller's mistakes are said, not a ZeroDivisionError or a two-level image (helper)
    for kwargs, words in (
        ({"max_side": 0}, "max_side must be at least 1"),
        ({"pct": (98.0, 2.0)}, "0 <= low < high <= 100"),
        ({"pct": (-5.0, 120.0)}, "0 <= low < high <= 100"),
    ):
        with pytest.raises(FusionError, match=words):
            save_quicklook(tmp_path / "bad.png", ms, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(FusionError, match="ending in .png"):
        save_quicklook(tmp_path / "noext", ms)
    assert save_quicklook(tmp_path / "list.png", ms.tolist()).is_file()  # type: ignore[arg-type]


# --- report -----------------------------------------------------------------------------------------


@pytest.fixture
def golden(tmp_path: Path) -> dict[str, Path]:
    import torch

    from fusion_cli.resample import interp23

    g = need_shared("fusionmamba_official", "golden")
    gt = np.load(g / "b_gt.npy").transpose(2, 0, 1).astype(np.float32)
    out = np.load(g / "b_out.npy").transpose(2, 0, 1).astype(np.float32)
    lr = torch.from_numpy(np.load(g / "b_ms_lr.npy").transpose(2, 0, 1).astype(np.float64))[None]
    exp = interp23(lr, 4)[0].numpy().astype(np.float32)
    d = tmp_path / "products"
    d.mkdir()
    return {
        "gt": _write(tmp_path / "gt.tif", gt),
        "mamba": _write(d / "fusionmamba.tif", out),
        "exp": _write(d / "exp.tif", exp),
        "bad": _write(d / "wrong_size.tif", out[:, :300, :300]),
        "dir": d,
    }


def test_report_reduced_resolution_folder(golden: dict[str, Path], tmp_path: Path) -> None:
    items = collect_items([golden["dir"]], ref=golden["gt"])
    assert [i.product.name for i in items] == ["exp.tif", "fusionmamba.tif", "wrong_size.tif"]
    summary = build_report(items, tmp_path / "rep", EvalOptions(ratio=4))
    assert summary["products"] == 3 and summary["failed"] == 1
    rows = {r["name"]: r for r in csv.DictReader(open(summary["csv"]))}
    assert round(float(rows["fusionmamba"]["Q2n"]), 4) == 0.8609
    assert float(rows["exp"]["Q2n"]) < float(rows["fusionmamba"]["Q2n"])
    assert "differ" in rows["wrong_size"]["error"]
    data = json.loads(Path(summary["json"]).read_text())
    assert len(data[1]["per_band"]["ERGAS"]) == 8
    page = Path(summary["html"]).read_text()
    images = re.findall(r"src='img/([^']+)'", page)
    assert len(images) >= 14 and all((tmp_path / "rep" / "img" / n).stat().st_size > 1000 for n in images)
    for kind in ("error", "sam", "bands", "ref_zoom", "product_zoom"):
        assert any(kind in n for n in images)
    # the best Q8 is the network's, shown in bold
    best = re.findall(r'<td class="best">([0-9.]+)</td>', page)
    assert "0.8609" in best


def test_report_full_resolution_from_tags_and_manifest(tmp_path: Path) -> None:
    ex = example_pair(64, 64)  # inputs found from tags or a manifest: any scene shows it
    ms, pan = ex.ms.astype(np.uint16), ex.pan.astype(np.uint16)
    ms_path, pan_path = _write(tmp_path / "ms.tif", ms), _write(tmp_path / "pan.tif", pan)
    tags = {"FUSION_PAN": str(pan_path), "FUSION_MS": str(ms_path)}
    prod = _write(tmp_path / "exp.tif", upsample(ms, ex.ratio).astype(np.float32), tags)
    manifest = tmp_path / "m.csv"
    manifest.write_text("product,pan,ms,label\nexp.tif,pan.tif,ms.tif,interpolated\n")
    assert read_manifest(manifest)[0] == ReportItem(prod, None, pan_path, ms_path, "interpolated")
    for items, name in (([ReportItem(prod)], "exp"), (read_manifest(manifest), "interpolated")):
        summary = build_report(items, tmp_path / f"rep_{name}", EvalOptions(sensor=ex.sensor))
        row = json.loads(Path(summary["json"]).read_text())[0]
        assert summary["failed"] == 0 and row["name"] == name and row["mode"] == "full"
        assert row["ratio"] == ex.ratio
        assert row["D_lambda"] == pytest.approx(0.0, abs=1e-6) and 0 < row["HQNR"] <= 1
        page = Path(summary["html"]).read_text()
        assert "pan_zoom" in page and "ms_zoom" in page and "sam" in page


@pytest.fixture
def example_products(tmp_path: Path) -> dict[str, Path]:
    """The shipped Landsat example's MS (6, 160, 320) as the reference, and a folder of three
    products of it: noisy, interpolated from half resolution and one of the wrong size."""
    ms = example_pair().ms.astype(np.float32)
    noisy = ms + np.random.default_rng(0).normal(0, 50, ms.shape).astype(np.float32)
    d = tmp_path / "products"
    d.mkdir()
    return {
        "gt": _write(tmp_path / "gt.tif", ms),
        "noisy": _write(d / "noisy.tif", noisy),
        "exp": _write(d / "exp.tif", upsample(ms[:, ::2, ::2], 2).astype(np.float32)),
        "bad": _write(d / "wrong_size.tif", noisy[:, :100, :100]),
        "dir": d,
    }


def test_report_refuses_to_write_among_inputs(example_products: dict[str, Path]) -> None:
    p = example_products
    with pytest.raises(FusionError, match="holds inputs"):
        build_report([ReportItem(p["noisy"], ref=p["gt"])], p["dir"], EvalOptions(ratio=2))
    with pytest.raises(FusionError, match="no products"):
        collect_items([], ref=p["gt"])


def test_cli_report_exit_code_and_summary(example_products: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli_rep"
    p = example_products
    res = subprocess.run(
        [sys.executable, "-c", "from fusion_cli.cli.main import main; main()", "report", str(p["dir"]),
         "--ref", str(p["gt"]), "--ratio", "2", "-o", str(out), "--json", "--rgb", "3,2,1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr  # wrong_size.tif fails, the rest is reported
    summary = json.loads(res.stdout)
    assert summary["products"] == 3 and summary["failed"] == 1 and (out / "index.html").exists()


def test_cli_report_on_the_demo_product(landsat_demo: dict[str, Path], tmp_path: Path) -> None:
    """`fusion report` scores the demo's own product (319 x 639 on 160 x 320 MS pixels) from its tags."""
    out = tmp_path / "rep"
    res = subprocess.run(
        [sys.executable, "-c", "from fusion_cli.cli.main import main; main()", "report",
         str(landsat_demo["product"]), "-o", str(out), "--sensor", "landsat8", "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["failed"] == 0
    (row,) = json.loads((out / "metrics.json").read_text())
    assert row["mode"] == "full" and row["ratio"] == 2 and 0.8 < row["QNR"] <= 1
    assert row["ms"] == str(landsat_demo["ms"])
    page = (out / "index.html").read_text()
    assert "pan_zoom" in page and "ms_zoom" in page


def test_an_overwritten_report_keeps_no_figure_of_the_old_one(
    example_products: dict[str, Path], tmp_path: Path
) -> None:
    """--overwrite with other products left the old report's quicklooks in img/ beside the new ones."""
    p, out = example_products, tmp_path / "rep"
    build_report(
        [ReportItem(p["noisy"], ref=p["gt"]), ReportItem(p["exp"], ref=p["gt"])], out, EvalOptions(ratio=2)
    )
    assert any(f.name.startswith("001_exp") for f in (out / "img").iterdir())
    (out / "img" / "mine.png").write_bytes(b"x")  # not the report's: kept
    (out / "img" / "1000_mine.png").write_bytes(b"x")  # not the report's either (its index.html says)
    build_report([ReportItem(p["noisy"], ref=p["gt"])], out, EvalOptions(ratio=2), overwrite=True)
    names = {f.name for f in (out / "img").iterdir()}
    assert {"mine.png", "1000_mine.png"} <= names and not any(n.startswith("001_") for n in names)
    assert any(n.startswith("000_noisy") for n in names)


def test_an_interrupted_overwrite_keeps_the_old_report_whole(
    example_products: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while `report --overwrite` drew its first figure left the old index.html with every
    figure it shows deleted. The new figures are staged and swapped in at the end: the old report
    stays whole, every image it names present, nothing staged left behind."""
    import re

    from fusion_cli import report as report_module

    p, out = example_products, tmp_path / "rep"
    build_report([ReportItem(p["exp"], ref=p["gt"])], out, EvalOptions(ratio=2))
    before = {f.name: f.read_bytes() for f in out.rglob("*") if f.is_file()}

    def interrupted(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "_save_rgb", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_report([ReportItem(p["noisy"], ref=p["gt"])], out, EvalOptions(ratio=2), overwrite=True)
    assert {f.name: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    images = re.findall(r"src='img/([^']+)'", (out / "index.html").read_text())
    assert images and all((out / "img" / n).is_file() for n in images)
    assert [d for d in (out / "img").iterdir() if d.is_dir()] == []


def test_a_report_replaces_none_of_its_files_without_overwrite_and_a_failed_write_keeps_the_old_one(
    example_products: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only index.html was checked: a metrics.csv kept in the folder (`fusion metrics --csv`) was
    replaced without --overwrite. And the CSV, JSON and HTML were written after the new figures had
    replaced the old ones: a failed write (a full disk) left the old index.html naming deleted
    figures (helper). All three are checked first and written before any rename."""
    import re

    from fusion_cli import report as report_module
    from fusion_cli.errors import OutputWriteError

    p, out = example_products, tmp_path / "rep"
    out.mkdir()
    (out / "metrics.csv").write_text("precious\n")
    with pytest.raises(FusionError, match="metrics.csv already exists; pass --overwrite"):
        build_report([ReportItem(p["exp"], ref=p["gt"])], out, EvalOptions(ratio=2))
    assert (out / "metrics.csv").read_text() == "precious\n" and not (out / "img").exists()
    build_report([ReportItem(p["exp"], ref=p["gt"])], out, EvalOptions(ratio=2), overwrite=True)
    before = {f.name: f.read_bytes() for f in out.rglob("*") if f.is_file()}

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OutputWriteError("cannot write report index.html: No space left on device")

    monkeypatch.setattr(report_module, "_write_html", full_disk)
    with pytest.raises(OutputWriteError):
        build_report([ReportItem(p["noisy"], ref=p["gt"])], out, EvalOptions(ratio=2), overwrite=True)
    assert {f.name: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    images = re.findall(r"src='img/([^']+)'", (out / "index.html").read_text())
    assert images and all((out / "img" / n).is_file() for n in images)
    (out / "metrics.json").unlink()
    (out / "metrics.json").mkdir()
    with pytest.raises(FusionError, match="metrics.json is a folder"):
        build_report([ReportItem(p["noisy"], ref=p["gt"])], out, EvalOptions(ratio=2), overwrite=True)


def test_a_product_too_big_to_score_is_one_row_and_a_stopped_report_leaves_no_folder(
    example_products: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The indices read images whole: torch's "can't allocate memory" on one big product aborted the
    whole report (exit 1) and left an empty report folder; it is now that product's one-line error.
    A report that stops (Ctrl-C) before it is written leaves none of the folders it made."""
    from fusion_cli import report as report_module

    p = example_products
    real_score = report_module.score

    def score(case, opts):  # type: ignore[no-untyped-def]
        if "noisy" in str(case.fused.path):
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory"
            )
        return real_score(case, opts)

    monkeypatch.setattr(report_module, "score", score)
    items = [ReportItem(p["exp"], ref=p["gt"]), ReportItem(p["noisy"], ref=p["gt"])]
    summary = build_report(items, tmp_path / "rep", EvalOptions(ratio=2))
    assert (summary["products"], summary["failed"]) == (2, 1)
    rows = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert "ERGAS" in rows[0] and rows[1]["error"].startswith("out of memory (")
    monkeypatch.setattr(report_module, "score", lambda case, opts: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_report(items, tmp_path / "new" / "rep", EvalOptions(ratio=2))
    assert not (tmp_path / "new").exists()


def test_the_report_shows_the_bands_the_product_names_red_green_and_blue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report chose its display bands by band count alone (6 bands: 3, 2, 1): a product in the
    order red, green, blue, ... (Landsat-7 FuseBox) was drawn with red and blue swapped, while its
    quicklook was right (helper). It now reads the names, wavelengths and colours as the quicklook
    does: here the example MS reordered to R, G, B, NIR, SWIR1, SWIR2."""
    import rasterio

    from fusion_cli import report as report_module
    from fusion_cli.pipeline import pansharpen

    with rasterio.open(EXAMPLES / "landsat8_ms.tif") as src:
        order = [3, 2, 1, 4, 5, 6]
        profile, data = src.profile, src.read(order)
        names = [src.descriptions[b - 1] for b in order]
    ms = tmp_path / "rgb_ms.tif"
    with rasterio.open(ms, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = names
    product = tmp_path / "p.tif"
    pansharpen(EXAMPLES / "landsat8_pan.tif", ms, product, method="gsa")
    shown: list[tuple[int, int, int]] = []
    save_rgb = report_module._save_rgb

    def recording(path: Path, img: np.ndarray, rgb: tuple[int, int, int], *args: object) -> str:
        shown.append(rgb)
        return save_rgb(path, img, rgb, *args)

    monkeypatch.setattr(report_module, "_save_rgb", recording)
    build_report([ReportItem(product)], tmp_path / "rep", EvalOptions())
    assert set(shown) - {(0, 0, 0)} == {(0, 1, 2)}  # (0, 0, 0): the PAN, grey


def test_a_folder_of_a_product_beside_its_inputs_and_a_one_band_product(tmp_path: Path) -> None:
    """`report FOLDER` scored the PAN and MS lying beside the product made of them (the README's
    layout) as products, which failed: exit 1 (helper). What a folder's products name as their
    inputs is left out. And a 1-band product (--bands 3) could not be reported: "D_lambda needs at
    least two bands" failed every index; D_lambda and QNR are now left empty (NaN) with a warning,
    the other indices scored."""
    import math
    import shutil
    import warnings

    from fusion_cli.pipeline import pansharpen

    folder = tmp_path / "scene"
    folder.mkdir()
    pan, ms = folder / "pan.tif", folder / "ms.tif"
    shutil.copy(EXAMPLES / "landsat8_pan.tif", pan)
    shutil.copy(EXAMPLES / "landsat8_ms.tif", ms)
    pansharpen(pan, ms, folder / "fused.tif", method="gsa")
    pansharpen(pan, ms, folder / "red.tif", method="gsa", bands=[3])
    items = collect_items([folder])
    assert sorted(Path(i.product).name for i in items) == ["fused.tif", "red.tif"]
    assert [Path(i.product).name for i in collect_items([pan])] == ["pan.tif"]  # asked for: scored
    calls: list[tuple[int, int]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = build_report(
            items, tmp_path / "rep", EvalOptions(), progress=lambda i, n, _: calls.append((i, n))
        )
    assert summary["failed"] == 0, summary["errors"]
    assert calls == [(0, 2), (1, 2), (2, 2)]  # a caller's bar reaches its end (it stopped at 1 of 2)
    scores = {Path(r["product"]).name: r for r in json.loads((tmp_path / "rep" / "metrics.json").read_text())}
    one = scores["red.tif"]
    assert one["bands"] == 1 and one["D_lambda"] is None and one["QNR"] is None
    assert 0 < one["HQNR"] < 1 and 0 < one["D_s"] < 1 and 0 < one["HPC"] <= 1
    assert math.isfinite(scores["fused.tif"]["QNR"])
    assert any(
        "red.tif has one band: D_lambda and QNR compare band pairs and are NaN" in str(w.message)
        for w in caught
    )


def test_the_summary_ranks_only_products_scored_against_the_same_data_on_the_same_bands() -> None:
    """A product fused from 4 of 8 bands had its Q4 under a "Q8" column, bolded as the best of the
    8-band products' Q8 (helper); products of other scenes were ranked together too. Best values are
    now marked within each group (mode, reference or PAN + MS, bands compared), the band count is a
    column, and mixed Q2n names are said per cell."""
    import re

    from fusion_cli.report import _summary_table

    def result(name: str, q2n: float, sam: float, bands: int, ref: str = "ref.tif") -> dict:
        compared = list(range(1, bands + 1)) if bands == 8 else [2, 3, 5, 7]
        return {"name": name, "product": f"{name}.tif", "mode": "reduced", "reference": ref, "Q2n": q2n,
                "SAM": sam, "bands": bands, "bands_compared": compared, "q2n_name": f"Q{bands}"}  # fmt: skip

    rows = [result("gsa", 0.80, 4.0, 8), result("glp", 0.85, 3.5, 8), result("sub", 0.95, 1.0, 4)]
    rows.append(result("other_scene", 0.99, 0.5, 8, ref="other_ref.tif"))
    table = _summary_table(rows, [f"p{i}" for i in range(len(rows))])
    cells = {n: re.findall(r'<td class="(\w*)">([^<]*)</td>', row) for n, row in zip(
        ["gsa", "glp", "sub", "other_scene"], table.split("<tr>")[2:], strict=True)}  # fmt: skip
    assert cells["glp"] == [("best", "0.8500 (Q8)"), ("best", "3.5000")]
    assert cells["gsa"] == [("", "0.8000 (Q8)"), ("", "4.0000")]
    assert cells["sub"] == [("", "0.9500 (Q4)"), ("", "1.0000")]  # alone in its group: nothing to rank
    assert cells["other_scene"] == [("", "0.9900 (Q8)"), ("", "0.5000")]
    assert "<th>bands</th><th>Q2n</th>" in table and "<td>4</td>" in table


def test_per_band_charts_of_many_bands_stay_readable(tmp_path: Path) -> None:
    """A 128-band product's per-band chart was 7260 px wide (one bar pair per band), shown 360 px
    wide in the report (helper). Beyond 24 bands the bands are lines on a chart of fixed width: here
    the example MS stacked five times (30 bands)."""
    import rasterio
    from matplotlib.image import imread

    from fusion_cli.pipeline import pansharpen

    with rasterio.open(EXAMPLES / "landsat8_ms.tif") as src:
        profile, data = src.profile, src.read()
    ms = tmp_path / "ms30.tif"
    with rasterio.open(ms, "w", **(profile | {"count": 30})) as dst:
        dst.write(np.concatenate([data] * 5))
    product = tmp_path / "p30.tif"
    pansharpen(EXAMPLES / "landsat8_pan.tif", ms, product, method="gsa")
    summary = build_report([ReportItem(product)], tmp_path / "rep", EvalOptions())
    assert summary["failed"] == 0, summary["errors"]
    charts = [f for f in (tmp_path / "rep" / "img").glob("*.png") if "band" in f.name]
    assert charts and all(imread(f).shape[1] <= 1000 for f in charts), [imread(f).shape for f in charts]


def test_report_keeps_a_product_that_is_another_ones_input_and_a_users_images(tmp_path: Path) -> None:
    """Review of this session's changes: a folder's rasters named as inputs were left out even when
    they were products themselves (a reduced product fused again); `--overwrite` removed any
    img/NNN_*.png, a user's 2024_map.png too; --rgb counted an alpha band as a band (IndexError)."""
    import shutil

    import rasterio

    from fusion_cli.pipeline import pansharpen

    folder = tmp_path / "prods"
    folder.mkdir()
    pan, ms = tmp_path / "pan.tif", tmp_path / "ms.tif"
    shutil.copy(EXAMPLES / "landsat8_pan.tif", pan)
    shutil.copy(EXAMPLES / "landsat8_ms.tif", ms)
    first = folder / "a_first.tif"
    pansharpen(pan, ms, first, method="exp")
    with rasterio.open(first) as src:  # the product, brought back to the MS grid, fused again
        profile, data = src.profile, src.read(out_shape=(src.count, src.height // 2, src.width // 2))
        profile.update(
            height=data.shape[1], width=data.shape[2], transform=src.transform * src.transform.scale(2)
        )
    reduced = folder / "b_reduced_product.tif"
    with rasterio.open(reduced, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(FUSION_PARAMS='{"ratio": 2}')  # a product of its own
    pansharpen(pan, reduced, folder / "c_second.tif", method="gsa")
    names = sorted(Path(i.product).name for i in collect_items([folder]))
    assert names == ["a_first.tif", "b_reduced_product.tif", "c_second.tif"]
    out = tmp_path / "rep"
    build_report([ReportItem(first)], out, EvalOptions())
    (out / "img" / "2024_map.png").write_bytes(b"x")  # the user's, beside the report's
    build_report([ReportItem(first)], out, EvalOptions(), overwrite=True)
    assert (out / "img" / "2024_map.png").exists()
    alpha = tmp_path / "alpha.tif"
    with rasterio.open(first) as src:
        profile, data = src.profile, src.read()
    rgba = profile | {"count": 4, "nodata": None, "photometric": "RGB", "alpha": "YES"}
    with rasterio.open(alpha, "w", **rgba) as dst:
        dst.write(np.concatenate([data[:3], np.full_like(data[:1], 65535)]))  # band 4: GDAL's alpha
    with pytest.raises(FusionError, match="asks for band 4, but alpha has 3"):
        build_report([ReportItem(alpha)], tmp_path / "rep_alpha", EvalOptions(), rgb=(3, 1, 0))
