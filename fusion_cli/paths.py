"""Where the project finds its shipped weights and the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def weights_dir() -> Path:
    """Shipped weights: `$FUSION_WEIGHTS_DIR`, else `weights/` beside the package."""
    return Path(os.environ.get("FUSION_WEIGHTS_DIR", REPO_DIR / "weights"))


def shared_data_dir() -> Path:
    """Real imagery for tests, training and benchmarks: `$FUSION_SHARED_DATA`, else `../shared/data`."""
    return Path(os.environ.get("FUSION_SHARED_DATA", REPO_DIR.parent / "shared" / "data"))
