"""Shared fixtures: real imagery from ../shared/data, read at run time (never copied in)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fusion_cli.paths import shared_data_dir

SHARED = shared_data_dir()
# The repository root, so that tests import the build-time scripts as `recipes.train_recipes` (they
# are not in the installed package).
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def need_shared(*parts: str) -> Path:
    """Path inside the shared data folder, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared real data not found: {path} (the ../shared/data folder is missing)")
    return path


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared real data folder not found: {SHARED}")
    return SHARED


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def landsat_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`make demo` on the shipped Landsat-8 example with BDSD-PC (fast; the demo's network runs the
    same pipeline): its PAN, MS and product (319 x 639: the half-covered first PAN row and column
    lie outside the MS)."""
    from fusion_cli.pipeline import pansharpen

    pan, ms = EXAMPLES / "landsat8_pan.tif", EXAMPLES / "landsat8_ms.tif"
    out = tmp_path_factory.mktemp("demo") / "landsat8_bdsd_pc.tif"
    pansharpen(pan, ms, out, method="bdsd-pc", sensor="landsat8")
    return {"pan": pan, "ms": ms, "product": out}
