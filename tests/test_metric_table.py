"""The metric table drives every consumer: a new entry registered at run time (a mean absolute error
that none of the consumers names) shows up in assess's rows and their column order, in `fusion
metrics`' table with its note, in the report's best-value highlighting by its direction, in `fusion
evaluate`'s columns and arrows, and in the training validation scores."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio

from fusion_cli import evaluate
from fusion_cli.assess import EvalOptions, flatten
from fusion_cli.assess import evaluate as assess_product
from fusion_cli.metrics import reduced_resolution, table
from fusion_cli.metrics.table import Inputs, Metric
from fusion_cli.report import ReportItem, build_report
from fusion_cli.training.validation import quality

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _mae(x: Inputs) -> tuple[float, np.ndarray]:
    """Mean absolute error per band and over all bands (the worked example of the README)."""
    per_band = np.abs(np.asarray(x.ref, np.float64) - x.fused).mean(axis=(1, 2))
    return float(per_band.mean()), per_band


def _register(monkeypatch: pytest.MonkeyPatch, higher_is_better: bool = False) -> Metric:
    metric = Metric(
        "MAE", _mae, "reduced", higher_is_better, "DN", "mean |F - R|, DN", evaluate=True, validate=True
    )
    monkeypatch.setitem(table.METRICS, metric.name, metric)  # removed again after the test
    return metric


def _images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.uniform(100, 1000, (4, 64, 64))
    return ref, ref + rng.normal(0, 20, ref.shape)


def _write(path: Path, arr: np.ndarray) -> Path:
    c, h, w = arr.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype="float32") as ds:
        ds.write(arr.astype(np.float32))
    return path


def test_the_shipped_table_keeps_the_published_order_and_directions() -> None:
    reduced = ("Q2n", "Q", "SAM", "ERGAS", "SCC", "PSNR", "SSIM", "RMSE")
    assert table.index_order() == (*reduced, "D_lambda", "D_s", "QNR", "D_lambda_K", "HQNR", "HPC")
    better = {name for name in table.index_order() if table.higher_is_better(name)}
    assert better == {"Q2n", "Q", "SCC", "PSNR", "SSIM", "QNR", "HQNR", "HPC"}
    assert table.evaluate_keys("reduced") == ("Q2n", "Q", "SAM", "ERGAS", "SCC")
    assert table.evaluate_keys("full") == ("D_lambda", "D_s", "QNR", "D_lambda_K", "HQNR", "HPC")
    assert table.validation_keys() == ("q2n", "sam", "ergas", "psnr")


def test_a_registered_metric_reaches_assess_and_fusion_metrics(monkeypatch, capsys) -> None:
    ref, fused = _images()
    before = reduced_resolution(ref, fused, 4, per_band=True)
    assert "MAE" not in before
    _register(monkeypatch)
    r = reduced_resolution(ref, fused, 4, per_band=True)
    want = np.abs(ref - fused).mean()
    assert r["MAE"] == pytest.approx(want) and len(r["per_band"]["MAE"]) == 4
    assert {k: r[k] for k in before if k != "per_band"} == {k: before[k] for k in before if k != "per_band"}
    cols = list(flatten(r | {"product": "p", "mode": "reduced"}))
    assert cols.index("MAE") == cols.index("RMSE") + 1  # a column after the others: the table's order

    from fusion_cli.cli.metrics import _print

    _print(r | {"product": "p.tif", "mode": "reduced"})
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "MAE" in ln)
    assert f"{want:.4f}" in line and "mean |F - R|, DN" in line


def test_a_registered_metric_reaches_report_highlighting_by_its_direction(monkeypatch, tmp_path) -> None:
    ref, fused = _images()
    gt = _write(tmp_path / "gt.tif", ref)
    close = _write(tmp_path / "close.tif", ref + (fused - ref) * 0.5)
    far = _write(tmp_path / "far.tif", fused)
    items = [ReportItem(close, ref=gt), ReportItem(far, ref=gt)]

    def best_mae(higher: bool, name: str) -> str:
        _register(monkeypatch, higher)
        summary = build_report(items, tmp_path / name, EvalOptions(ratio=4), max_side=64, zoom=32)
        rows = {r["name"]: r for r in csv.DictReader(open(summary["csv"]))}
        page = Path(summary["html"]).read_text()
        header = re.findall(r"<th>([^<]+)</th>", page)
        col = header.index("MAE") - 2  # product and mode come first
        assert set(rows) == {"close", "far"}
        for name_ in rows:
            cells = re.search(rf">{name_}</a></td><td>[^<]*</td>(.*?)</tr>", page).group(1)
            if 'class="best"' in re.findall(r"<td[^>]*>", cells)[col]:
                return name_
        raise AssertionError("no best MAE")

    assert best_mae(False, "low") == "close"  # lower error is better
    assert best_mae(True, "high") == "far"  # the entry's direction, not a list in report.py
    data = json.loads((tmp_path / "high" / "metrics.json").read_text())
    assert data[0]["MAE"] < data[1]["MAE"]


def test_a_registered_metric_reaches_evaluate_and_training(monkeypatch) -> None:
    _register(monkeypatch)
    rows = [
        {"scene": "a", "method": "m", "Q2n": 0.9, "MAE": 2.0},
        {"scene": "b", "method": "m", "Q2n": 0.8, "MAE": 4.0},
    ]
    summary = evaluate.summarise(rows)
    assert summary[0]["MAE"] == 3.0 and summary[0]["MAE_std"] == pytest.approx(np.std([2.0, 4.0], ddof=1))
    header = evaluate.markdown(summary).splitlines()[0]
    assert "MAE ↓" in header and header.index("Q2n ↑") < header.index("MAE ↓")

    ref, fused = _images()
    scores = quality(ref, fused, 4, 1023.0)
    assert scores["mae"] == pytest.approx(np.abs(ref - fused).mean())
    assert list(scores) == ["q2n", "sam", "ergas", "psnr", "mae"]


def test_assess_on_files_reports_a_registered_metric(monkeypatch, tmp_path) -> None:
    ref, fused = _images(1)
    _register(monkeypatch)
    res = assess_product(
        _write(tmp_path / "f.tif", fused), ref=_write(tmp_path / "r.tif", ref), opts=EvalOptions(ratio=4)
    )
    assert res["MAE"] == pytest.approx(
        np.abs(ref.astype(np.float32) - fused.astype(np.float32)).mean(), rel=1e-6
    )
