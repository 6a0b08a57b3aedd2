"""The GDAL environment of every read and write, GDAL virtual paths, and GDAL's error text."""

from __future__ import annotations

import os
from pathlib import Path

import rasterio
from rasterio.errors import EnvError

from fusion_cli.signals import deferred_signals

# Bounded GDAL block cache: without it GDAL may cache up to 5 % of RAM while writing, which
# grows with the scene. Internal masks keep the mask inside the GeoTIFF (no .msk sidecar).
GDAL_ENV = {"GDAL_CACHEMAX": 32, "GDAL_TIFF_INTERNAL_MASK": True}


class _GuardedEnv(rasterio.Env):
    """rasterio.Env whose entry and exit are not cut in two by Ctrl-C (see `fusion_cli.signals`),
    and whose exit never replaces an exception already on its way out with the EnvError of a
    stack that rasterio's own nested environments (`rasterio.open`) left broken."""

    def __enter__(self) -> _GuardedEnv:
        with deferred_signals():
            super().__enter__()
        return self

    def __exit__(self, exc_type: object = None, exc_val: object = None, exc_tb: object = None) -> None:
        with deferred_signals():
            try:
                super().__exit__(exc_type, exc_val, exc_tb)
            except EnvError:
                if exc_type is None:
                    raise


def gdal_env() -> rasterio.Env:
    return _GuardedEnv(**GDAL_ENV)


def is_gdal_path(path: str | os.PathLike[str]) -> bool:
    """A GDAL virtual path (`/vsizip/...`, `/vsicurl/...`, `s3://...`): not a local file to check with
    `Path.exists()`, nor to pass through `Path` (which folds the `//` these paths rely on)."""
    text = os.fspath(path)
    return text.startswith("/vsi") or "://" in text


def recorded_path(path: str | os.PathLike[str]) -> str:
    """How a product's tags name an input: absolute for a local file, a GDAL path as given."""
    return os.fspath(path) if is_gdal_path(path) else str(Path(path).resolve())


# What `file_fingerprint` hashes of a large file: its head and tail (a GeoTIFF's header and block
# offsets live there) and evenly spaced chunks between: ~0.8 MB read, so a rerun over a thousand
# finished scenes stays cheap.
_PRINT_EDGE, _PRINT_CHUNK, _PRINT_CHUNKS = 256 << 10, 16 << 10, 16


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """The size and a SHA-256 of samples of a local file: what a product records of its inputs, so a
    rerun can tell another or a rewritten input from the one it was made of, wherever the file now
    lies (a folder moved or copied keeps its fingerprints). None for a GDAL virtual path or a file
    that cannot be read (nothing to compare then)."""
    import hashlib

    if is_gdal_path(path):
        return None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest = hashlib.sha256()
            if size <= 2 * _PRINT_EDGE + _PRINT_CHUNKS * _PRINT_CHUNK:
                digest.update(f.read())
            else:
                middle = size - 2 * _PRINT_EDGE
                offsets = [0] + [
                    _PRINT_EDGE + k * (middle - _PRINT_CHUNK) // (_PRINT_CHUNKS - 1)
                    for k in range(_PRINT_CHUNKS)
                ]
                for offset in offsets:
                    f.seek(offset)
                    digest.update(f.read(_PRINT_EDGE if offset == 0 else _PRINT_CHUNK))
                f.seek(size - _PRINT_EDGE)
                digest.update(f.read(_PRINT_EDGE))
    except OSError:
        return None
    return {"size": size, "sample_sha256": digest.hexdigest()}


def reason(exc: BaseException) -> str:
    """First line of an error; rasterio's 'See previous exception' points at GDAL's own, its cause."""
    while exc.__cause__ is not None and "previous exception" in str(exc):
        exc = exc.__cause__
    return (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__
