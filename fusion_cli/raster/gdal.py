"""The GDAL environment of every read and write, GDAL virtual paths, and GDAL's error text."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import rasterio
from rasterio.errors import EnvError

from fusion_cli.paths import sha256_file
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


# A GDAL subdataset name: a prefix and at least one more colon (NETCDF:"file.nc":var, netcdf:f.nc:var
# as gdalinfo lists them, HDF5:"file.h5"://ms, GTIFF_DIR:2:file.tif, HDF4_SDS:..., NITF_IM:0:...)
_SUBDATASET = re.compile(r"([A-Za-z][A-Za-z0-9]*)(_[A-Za-z0-9_]+)?:.*:")


@functools.cache
def _gdal_drivers() -> frozenset[str]:
    with rasterio.Env() as env:
        return frozenset(name.upper() for name in env.drivers())


def is_gdal_path(path: str | os.PathLike[str]) -> bool:
    """A GDAL virtual path (`/vsizip/...`, `/vsicurl/...`, `s3://...`) or subdataset name whose
    prefix is a GDAL driver's (`NETCDF:"f.nc":var`, which was refused as a file not found; a local
    `acq_20240101T10:30:00/pan.tif` is not one): not a local file to check with `Path.exists()`,
    nor to pass through `Path` (which folds the `//` these paths rely on)."""
    text = os.fspath(path)
    if text.startswith("/vsi") or "://" in text:
        return True
    match = _SUBDATASET.match(text)
    return match is not None and match.group(1).upper() in _gdal_drivers()


def recorded_path(path: str | os.PathLike[str]) -> str:
    """How a product's tags name an input: absolute for a local file, a GDAL path as given."""
    return os.fspath(path) if is_gdal_path(path) else str(Path(path).resolve())


def file_stat(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """A local file's size and modification time (ns); None for a GDAL virtual path or a file that
    cannot be read."""
    if is_gdal_path(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """What a product records of an input: its size, modification time and SHA-256, so a rerun can
    tell another or a rewritten input from the one it was made of (`same_input`), wherever the file
    now lies. None for a GDAL virtual path or a file that cannot be read (nothing to compare then)."""
    stat = file_stat(path)
    if stat is None:
        return None
    try:
        return {"size": stat[0], "mtime_ns": stat[1], "sha256": sha256_file(path)}
    except OSError:
        return None


def same_input(made: dict[str, object], path: str | os.PathLike[str]) -> bool | None:
    """Whether `path` holds the input a product recorded as `made` (`file_fingerprint`): the same size
    and modification time (no read), else the same SHA-256 (a copied or moved file: read once); None
    when it cannot be told (a GDAL path, an unreadable file)."""
    if is_gdal_path(path) or "sha256" not in made:  # a record of another form: nothing to compare
        return None
    try:
        st = os.stat(path)
        if made.get("size") != st.st_size:
            return False
        return made.get("mtime_ns") == st.st_mtime_ns or made.get("sha256") == sha256_file(path)
    except OSError:
        return None


def changed_inputs(made: object, paths: dict[str, str | os.PathLike[str]]) -> list[str]:
    """The roles ("pan", "ms": the keys of `paths`) whose file is not the one a product recorded
    (`made`, its FUSION_REQUEST: `file_fingerprint`s by role; `same_input` says False); roles it
    recorded nothing for, or that cannot be told, are not listed."""
    if not isinstance(made, dict):
        return []
    return [
        role
        for role, path in paths.items()
        if isinstance(made.get(role), dict) and same_input(made[role], path) is False
    ]


def reason(exc: BaseException) -> str:
    """First line of an error; rasterio's 'See previous exception' points at GDAL's own, its cause."""
    while exc.__cause__ is not None and "previous exception" in str(exc):
        exc = exc.__cause__
    return (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__
