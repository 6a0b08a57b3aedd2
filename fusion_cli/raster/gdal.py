"""The GDAL environment of every read and write, GDAL virtual paths, and GDAL's error text."""

from __future__ import annotations

import os
from pathlib import Path

import rasterio

# Bounded GDAL block cache: without it GDAL may cache up to 5 % of RAM while writing, which
# grows with the scene. Internal masks keep the mask inside the GeoTIFF (no .msk sidecar).
GDAL_ENV = {"GDAL_CACHEMAX": 32, "GDAL_TIFF_INTERNAL_MASK": True}


def gdal_env() -> rasterio.Env:
    return rasterio.Env(**GDAL_ENV)


def is_gdal_path(path: str | os.PathLike[str]) -> bool:
    """A GDAL virtual path (`/vsizip/...`, `/vsicurl/...`, `s3://...`): not a local file to check with
    `Path.exists()`, nor to pass through `Path` (which folds the `//` these paths rely on)."""
    text = os.fspath(path)
    return text.startswith("/vsi") or "://" in text


def recorded_path(path: str | os.PathLike[str]) -> str:
    """How a product's tags name an input: absolute for a local file, a GDAL path as given."""
    return os.fspath(path) if is_gdal_path(path) else str(Path(path).resolve())


def reason(exc: BaseException) -> str:
    """First line of an error; rasterio's 'See previous exception' points at GDAL's own, its cause."""
    while exc.__cause__ is not None and "previous exception" in str(exc):
        exc = exc.__cause__
    return (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__
