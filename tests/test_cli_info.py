"""`fusion info`: versions, devices, scan backend and why, installed models with the default marked."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from fusion_cli.models import scan
from fusion_cli.models.fusionmamba import FusionMamba, FusionMambaConfig
from fusion_cli.models.registry import ModelCard, save_model


def _fusion(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from fusion_cli.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
    )


def _env(tmp_path, **extra) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "FUSION_SCAN_BACKEND"}
    env.update(FUSION_WEIGHTS_DIR=str(tmp_path), **extra)
    return env


def _install(tmp_path, name: str, default: bool) -> None:
    model = FusionMamba(FusionMambaConfig(ms_bands=6, ratio=2, dim=8))
    card = ModelCard(
        name=name,
        task="pansharpening",
        description="test",
        sensor="landsat",
        bands=["B", "G", "R", "NIR", "SWIR1", "SWIR2"],
        pan_bands=["PAN"],
        ratio=2,
        dn_max=65535.0,
        licence="CC0-1.0",
        default=default,
    )
    save_model(model, card, tmp_path)


def test_info_text_and_json(tmp_path):
    _install(tmp_path, "landsat", True)
    _install(tmp_path, "other", False)
    res = _fusion("info", env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert f"torch {torch.__version__}" in res.stdout and "rasterio" in res.stdout and "gdal" in res.stdout
    if torch.cuda.is_available():  # a GPU machine: the scan runs there, and the GPU is listed
        assert "no CUDA" not in res.stdout and "Scan backend: " in res.stdout and " on cuda" in res.stdout
        assert torch.cuda.get_device_name(0) in res.stdout
    else:
        cpu = "numba" if scan._numba_import()[0] is not None else "torch"
        assert f"Scan backend: {cpu} on cpu" in res.stdout and "no CUDA" in res.stdout
    assert "landsat (default): pansharpening, landsat, ratio 2, 6 bands" in res.stdout
    assert "other: pansharpening" in res.stdout
    res = _fusion("info", "--json", env=_env(tmp_path))
    data = json.loads(res.stdout)
    assert data["default_model"] == "landsat"
    assert [(m["name"], m["default"]) for m in data["models"]] == [("landsat", True), ("other", False)]
    assert data["models"][0]["bands"][-1] == "SWIR2"
    assert data["versions"]["fusion-cli"] and data["versions"]["numpy"]
    assert data["torch"]["cuda_available"] == torch.cuda.is_available()


def test_info_reports_backend_override_and_no_models(tmp_path):
    res = _fusion("info", "--json", env=_env(tmp_path, FUSION_SCAN_BACKEND="reference"))
    data = json.loads(res.stdout)
    assert data["scan_backend"]["name"] == "reference"
    assert "FUSION_SCAN_BACKEND" in data["scan_backend"]["reason"]
    assert data["models"] == [] and data["default_model"] is None
    res = _fusion("info", env=_env(tmp_path, FUSION_SCAN_BACKEND="bogus"))
    assert res.returncode == 0 and "unknown scan backend 'bogus'" in res.stdout
    assert "none installed" in res.stdout


def test_info_lists_each_sensors_band_order_and_gains(tmp_path) -> None:
    """--sensor-bands numbers a sensor's bands in its own order: `fusion info` says which order, with
    each band's MTF gain (the WV3 table of the toolbox)."""
    res = _fusion("info", "--json", env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    rows = {r["sensor"]: r for r in json.loads(res.stdout)["sensors"]}
    wv3 = rows["wv3"]
    assert wv3["bands"][4] == "red" and wv3["ms_gains"][4] == 0.365 and wv3["pan_gain"] == 0.14
    assert rows["landsat8"]["bands"][1] == "blue" and rows["landsat8"]["ms_gains"] == [0.3]
    text = _fusion("info", env=_env(tmp_path)).stdout
    assert "  wv3: 1 coastal 0.325, 2 blue 0.355," in text
    assert "  landsat8: 1 coastal, 2 blue," in text and "  generic: every band 0.3; PAN 0.15" in text


def test_a_weights_folder_that_does_not_exist_is_named(tmp_path):
    # a mistyped FUSION_WEIGHTS_DIR listed no models and a run said only "no default model is installed"
    env = _env(tmp_path / "mistyped")
    info = _fusion("info", "--json", env=env)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    said = f"the weights folder {tmp_path / 'mistyped'} does not exist ($FUSION_WEIGHTS_DIR)"
    assert data["models"] == [] and said in data["model_warnings"]
    from conftest import EXAMPLE_MS, EXAMPLE_PAN

    args = ("pansharpen", str(EXAMPLE_PAN), str(EXAMPLE_MS), "-o", str(tmp_path / "o.tif"), "--model", "vhr4")
    run = _fusion(*args, env=env)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "does not exist ($FUSION_WEIGHTS_DIR)" in run.stderr


def test_info_json_lists_the_model_warnings_under_warnings(tmp_path) -> None:
    """Every --json document lists its command's warnings under `warnings` (README); `info --json`
    with a FUSION_WEIGHTS_DIR that is not there had them only under `model_warnings` (helper)."""
    res = _fusion("info", "--json", env=_env(tmp_path / "missing"))
    data = json.loads(res.stdout)
    assert res.returncode == 0 and data["model_warnings"]
    assert all(w in data["warnings"] for w in data["model_warnings"])
