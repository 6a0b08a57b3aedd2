"""A built wheel installed outside the repository works on its own: it carries the shipped models
(package data found with importlib.resources), its LICENSE, `python -m fusion_cli`, and fuses the
example scene with a classical method and with the default network, from any working directory."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

from fusion_cli.paths import REPO_DIR

SHIPPED = {"landsat", "vhr4", "hyperion_pan", "hyperion_hisr"}
# Build-time only (it retrains the shipped models from the shared data): never in the wheel.
BUILD_ONLY = ("recipes", "fusion_cli.train_recipes")

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, site folder it is installed in). Built from a copy of the source tree, so no build/ or
    egg-info lands in the repository and no stale build output gets into the wheel."""
    root = tmp_path_factory.mktemp("install")
    src, dist, site = root / "src", root / "dist", root / "site"
    skip = shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "demo_out", ".*_cache", "tests"
    )
    shutil.copytree(REPO_DIR, src, ignore=skip)
    pip = [sys.executable, "-m", "pip"]
    # Offline and fast: the setuptools of this environment builds it (pyproject needs >= 77).
    _run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)], root)
    (wheel,) = dist.glob("fusion_cli-*.whl")
    _run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)], root)
    return wheel, site


def test_wheel_contents(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO_DIR).as_posix() for p in (REPO_DIR / "fusion_cli").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    build_only = [n for n in names if n.startswith("recipes/") or n.endswith("train_recipes.py")]
    assert not build_only, f"build-time scripts in the wheel: {build_only}"
    for model in SHIPPED:
        assert {f"fusion_cli/weights/{model}.json", f"fusion_cli/weights/{model}.safetensors"} <= names
    licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert licence, "LICENSE is not in the wheel"
    assert "fusion-cli contributors" in zipfile.ZipFile(wheel).read(licence[0]).decode()
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: MIT" in zipfile.ZipFile(wheel).read(meta).decode()


def test_nothing_imports_train_recipes(installed: tuple[Path, Path]) -> None:
    """The recipes live outside the package (`recipes/`, for `make weights`): no module imports them."""
    _, site = installed
    assert not (site / "recipes").exists() and not (site / "fusion_cli" / "train_recipes.py").exists()
    importers = []
    for path in (site / "fusion_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == b or n.startswith(b + ".") for n in names for b in BUILD_ONLY):
                importers.append(path.name)
    assert not importers, f"{importers} import {BUILD_ONLY}"


def _crop(src: Path, dst: Path, window: Window) -> Path:
    """A window of `src` with its own geotransform (the grids keep their real relation)."""
    with rasterio.open(src) as ds:
        profile = ds.profile | {
            "width": window.width,
            "height": window.height,
            "transform": ds.transform @ Affine.translation(window.col_off, window.row_off),
            "tiled": False,
        }
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        with rasterio.open(dst, "w", **profile) as out:
            out.write(ds.read(window=window))
            out.descriptions = ds.descriptions
    return dst


def test_installed_wheel_runs_outside_the_repository(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, site = installed
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSION_")}
    env["PYTHONPATH"] = str(site)  # not the repository
    py = [sys.executable]

    where = _run([*py, "-c", "import fusion_cli, sys; print(fusion_cli.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(site)

    info = json.loads(_run([*py, "-m", "fusion_cli", "info", "--json"], work, env).stdout)
    assert {m["name"] for m in info["models"]} == SHIPPED
    assert Path(info["weights_dir"]).is_relative_to(site)
    assert info["weights_source"] == "installed package data"
    assert info["default_model"] == "landsat"

    # A small crop of the example (the network is slow on CPU): 16 x 16 MS pixels and their PAN.
    examples = REPO_DIR / "examples"
    pan = _crop(examples / "landsat8_pan.tif", work / "pan.tif", Window(0, 0, 32, 32))
    ms = _crop(examples / "landsat8_ms.tif", work / "ms.tif", Window(0, 0, 16, 16))
    fuse = [*py, "-m", "fusion_cli", "pansharpen", str(pan), str(ms), "--json"]
    runs = {"gsa": ["--method", "gsa"], "landsat": ["--tile", "32", "--overlap", "0", "--no-ensemble"]}
    for fuser, options in runs.items():
        summary = json.loads(_run([*fuse, "-o", f"{fuser}.tif", *options], work, env).stdout)
        assert summary["fuser"] == fuser
        with rasterio.open(work / f"{fuser}.tif") as ds:
            assert (ds.count, ds.height, ds.width) == (6, 31, 31)  # the half-pixel offset drops one
            assert ds.read().max() > 0


def test_weights_location_in_a_source_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fusion_cli.paths import weights_location

    monkeypatch.delenv("FUSION_WEIGHTS_DIR", raising=False)
    assert weights_location() == (REPO_DIR / "weights", "source checkout")
    monkeypatch.setenv("FUSION_WEIGHTS_DIR", str(tmp_path))
    assert weights_location() == (tmp_path, "$FUSION_WEIGHTS_DIR")
