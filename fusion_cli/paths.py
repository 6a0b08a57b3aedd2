"""Where the project finds its shipped weights and the shared real data."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
# The top-level `weights/` folder is installed as the package `fusion_cli.weights` (pyproject's
# package-dir), so an installed wheel carries its cards and weights inside this package; a source
# checkout (or an editable install, which maps that package onto it) has them beside the package.


def weights_location() -> tuple[Path, str]:
    """The shipped-weights folder and how it was found: `$FUSION_WEIGHTS_DIR`, else the package data
    installed in this package, else `weights/` of the source checkout the package is in."""
    env = os.environ.get("FUSION_WEIGHTS_DIR")
    if env:
        return Path(env), "$FUSION_WEIGHTS_DIR"
    from importlib import resources

    # Anchored on this very package, not by importing fusion_cli.weights: another installation's
    # import hooks (an editable install of another checkout) could answer that import.
    folder = resources.files(__package__) / "weights"
    # Installed as files (not from a zip) it is a real folder, which the registry globs and opens.
    if isinstance(folder, Path) and folder.is_dir():
        return folder, "installed package data"
    return REPO_DIR / "weights", "source checkout"


def weights_dir() -> Path:
    """Shipped weights folder (see `weights_location`)."""
    return weights_location()[0]


def shared_data_dir() -> Path:
    """Real imagery for tests, training and benchmarks: `$FUSION_SHARED_DATA`, else `../shared/data`."""
    return Path(os.environ.get("FUSION_SHARED_DATA", REPO_DIR.parent / "shared" / "data"))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (weights files and input scenes are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
