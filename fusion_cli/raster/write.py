"""Writing GeoTIFFs and side files atomically: a temporary name beside the output, renamed into
place only when complete and verified (`AtomicWriter` streams windows and converts to a COG;
`write_geotiffs` whole arrays, several at once; `atomic_output` any other file)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import secrets
import socket
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import ColorInterp, Interleaving, Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from fusion_cli import jsonout
from fusion_cli.errors import FusionError, OutputWriteError
from fusion_cli.raster.bands import Encoding, is_rgb_order
from fusion_cli.raster.checks import check_not_special
from fusion_cli.raster.gdal import gdal_env, reason
from fusion_cli.raster.profile import BLOCK, cog_options, overview_factors
from fusion_cli.signals import deferred_signals

# The tag written last, just before the file is closed: a file without it was not finished.
COMPLETE_TAG = "FUSION_COMPLETE"


# Temporary names this tool writes beside an output: `.<name>.<tag>-<pid>-<8 hex><suffix>`, plus
# GDAL's own sidecars of such a file. Only names of this shape are ever removed as stale.
TEMP_TAGS = ("partial", "cog", "tmp")
# Sidecars this tool writes under a product's name (`<out>.metrics.json`): their temporaries are the
# product's too. Nothing else may stand between the name and the tag: `.x.tif.v2.tif.partial-...` is
# the live temporary of another output, `x.tif.v2.tif`.
SIDECAR_SUFFIXES = (".metrics.json",)
_TEMP_RE = re.compile(
    r"(?:" + "|".join(re.escape(s) for s in SIDECAR_SUFFIXES) + r")?\.(?:" + "|".join(TEMP_TAGS) + r")"
    r"-(?P<pid>\d+)-(?P<host>[0-9a-f]{4})[0-9a-f]{4}(?:\.[A-Za-z0-9]+)*\Z"
)
# The first 4 hex digits of a temporary's random part name the host that wrote it: its PID tells
# whether the writer still runs only on that host.
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]


def _write_target(out: str | os.PathLike[str]) -> Path:
    """The file a write to `out` replaces: `out` itself, or the file a symbolic link `out` points to.
    Renaming a temporary onto the link would replace the link with a regular file and leave its
    target unchanged; writing through it, as `open(out, "w")` does, keeps the link a link. A device,
    FIFO or socket there is refused (`check_not_special`): the rename would replace it."""
    final = Path(out)
    target = Path(os.path.realpath(final)) if final.is_symlink() else final
    check_not_special(target, str(out))
    return target


# Files GDAL keeps beside a raster and reads with it: external overviews (gdaladdo -ro, QGIS),
# statistics and metadata (.aux.xml), a mask. Left beside a replaced product they describe the old one.
GDAL_SIDECARS = (".ovr", ".aux.xml", ".msk")


def _replace(tmp: Path, target: Path, named: Path, overwrite: bool = True) -> None:
    """Rename `tmp` onto `target` (what `named`, the path given, writes to) and drop the GDAL sidecars
    of the file it replaced, under either name: a reader would take the old product's overviews or
    statistics for the new one's. Without `overwrite`, a file that appeared at `target` meanwhile (a
    second run onto the same output) is refused, not replaced: a hard link fails if it exists."""
    if overwrite:
        os.replace(tmp, target)
    else:
        appeared = FusionError(f"output {named} appeared while fusing; pass --overwrite to replace it")
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise appeared from None
        except OSError:  # no hard links on this file system: the check just before is all there is
            if target.exists():
                raise appeared from None
            os.replace(tmp, target)
        else:
            os.unlink(tmp)
    for base in {target, named}:
        for suffix in GDAL_SIDECARS:
            side = base.with_name(base.name + suffix)
            if side.is_file() or side.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    side.unlink()


def _temp_name(out: Path, tag: str, suffix: str = ".tif") -> Path:
    # Same folder as the output so the final rename is atomic (same filesystem); hidden name.
    assert tag in TEMP_TAGS
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}-{_HOST_TAG}{secrets.token_hex(2)}{suffix}")


def temporary_writer_alive(out: Path, candidate: Path, any_host: bool = True) -> bool:
    """Whether the process that named the temporary `candidate` of `out` (`_temp_name`: its PID is in
    the name) still runs on this host, another than this one: a `fusion pansharpen` writing the
    same output has no scene lock, and removing its file failed it after all its work. A temporary
    another host wrote counts as live unless `any_host` (a PID here says nothing of it)."""
    match = _TEMP_RE.match(candidate.name[len(out.name) + 1 :])
    if match is None or int(match["pid"]) == os.getpid():
        return False
    if not any_host and match["host"] != _HOST_TAG:
        return True
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # alive under another user / not a PID
        return True
    return True


def is_own_temporary(out: Path, candidate: Path) -> bool:
    """Whether `candidate` is a temporary file this tool names for `out` (`_temp_name`)."""
    prefix = f".{out.name}"
    name = candidate.name
    return (
        candidate.parent == out.parent
        and name.startswith(prefix)
        and bool(_TEMP_RE.match(name[len(prefix) :]))
    )


def remove_stale_temporaries(out: Path, any_host: bool = False) -> list[Path]:
    """Delete the temporary files a killed writer of this tool left beside `out`: only names of the
    shape this tool gives them (`is_own_temporary`), and not while the process that wrote them still
    runs here (`temporary_writer_alive`). Those another host wrote are removed only with `any_host`:
    under a batch's scene lock, where a killed array task on another node is the likely writer.
    Returns the files removed."""
    removed = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.*"):
        if (
            is_own_temporary(out, p)
            and p.is_file()
            and not p.is_symlink()
            and not temporary_writer_alive(out, p, any_host)
        ):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def _open(path: Path, mode: str = "r", **profile: Any) -> Any:
    """rasterio.open of a product or its temporary. A product of a pair without georeferencing has
    none, by design (the run reports it once); rasterio's NotGeoreferencedWarning on each open would
    only print its source lines to stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, mode, **profile)


def verify_geotiff(path: Path, complete_tag: bool = True, overviews: bool = False) -> None:
    """Raise OSError unless `path` opens, carries the completion tag and holds every block it
    indexes: a write cut short by a full disk or a file-size limit (which GDAL only prints, and
    rasterio's close does not raise) leaves a file without its directory or with blocks past its
    end. `overviews` (a file this tool just wrote, with internal overviews): also every overview's
    blocks, which a full disk left unwritten (read as zeros, and copied as such into a COG). Not for
    a finished product: a user's external .ovr (gdaladdo -ro) is not inside the file."""
    size = path.stat().st_size
    with gdal_env():
        with _open(path) as ds:
            if complete_tag and ds.tags().get(COMPLETE_TAG) != "1":
                raise OSError("the completion tag is missing")
            _check_blocks(ds, size, "")
            levels = len(ds.overviews(1)) if ds.count and overviews else 0
        for level in range(levels):
            with _open(path, overview_level=level) as ov:
                _check_blocks(ov, size, f" of overview {level + 1}")


def _check_blocks(ds: Any, size: int, where: str) -> None:
    # pixel-interleaved files share one block index for all bands
    for b in range(1, (ds.count if ds.interleaving == Interleaving.band else 1) + 1):
        for (i, j), _ in ds.block_windows(b):
            off = ds.get_tag_item(f"BLOCK_OFFSET_{j}_{i}", "TIFF", bidx=b)
            n = ds.get_tag_item(f"BLOCK_SIZE_{j}_{i}", "TIFF", bidx=b)
            if not off or not n or int(off) + int(n) > size:  # GDAL gives no offset for unwritten blocks
                raise OSError(f"block {i},{j} of band {b}{where} is missing")


@dataclass
class GeoTiff:
    """One whole `(C, H, W)` array to write as a deflate GeoTIFF (tiled when over 256 px): integer
    `dtype`s get the values rounded and clipped to their range; `transform` None writes no
    georeferencing (for an input that had none); `descriptions` name the bands; `valid (H, W)` is
    written as an internal mask (None: none); `encoding` the bands' scale, offset and unit (those of
    the DN they hold)."""

    path: Path
    data: np.ndarray  # (C, H, W)
    dtype: str
    transform: Any = None
    crs: Any = None
    nodata: float | None = None
    tags: dict[str, str] | None = None
    descriptions: Sequence[str | None] | None = None
    valid: np.ndarray | None = None
    encoding: Encoding | None = None
    band_tags: Sequence[dict[str, str]] | None = None  # per band, default domain
    imagery: Sequence[dict[str, str]] | None = None  # per band, GDAL's IMAGERY domain
    colorinterp: Sequence[ColorInterp] | None = None


def _write_band_metadata(
    dst: Any,
    descriptions: Sequence[str | None] | None,
    band_tags: Sequence[dict[str, str]] | None,
    imagery: Sequence[dict[str, str]] | None,
) -> None:
    """Each band's description, tags (default domain) and IMAGERY items (wavelengths), where given."""
    for i, d in enumerate(descriptions or (), start=1):
        if d:
            dst.set_band_description(i, d)
    for i, items in enumerate(band_tags or (), start=1):
        if items:
            dst.update_tags(i, **items)
    for i, items in enumerate(imagery or (), start=1):
        if items:
            dst.update_tags(i, ns="IMAGERY", **items)


def write_geotiffs(
    images: Sequence[GeoTiff], what: str = "image", written: Callable[[int], None] | None = None
) -> None:
    """Write GeoTIFFs that belong together (a simulated pair and its reference) all or none: each is
    written and verified under a temporary name, and they are renamed into place only once every one
    is, so a failure (a full disk, Ctrl-C) leaves the previous set whole, never a mix of two runs.
    `written(i)` is called after image i is written."""
    with contextlib.ExitStack() as stack:
        temps = [stack.enter_context(atomic_output(im.path, overwrite=True, what=what)) for im in images]
        for i, (tmp, im) in enumerate(zip(temps, images, strict=True)):
            try:
                _write_whole(tmp, im)
            except Exception as exc:
                raise OutputWriteError(f"cannot write {what} {im.path}: {reason(exc)}") from exc
            if written is not None:
                written(i)
        # the renames (each atomic_output's exit) with Ctrl-C held: one between two of them left the
        # new reference beside the old reduced pair
        with deferred_signals():
            stack.close()


def _write_whole(tmp: Path, im: GeoTiff) -> None:
    out = im.data
    if not np.issubdtype(np.dtype(im.dtype), np.floating):
        info = np.iinfo(im.dtype)
        out = np.clip(np.round(im.data), info.min, info.max)
    profile = {
        "driver": "GTiff",
        "width": im.data.shape[2],
        "height": im.data.shape[1],
        "count": im.data.shape[0],
        "dtype": im.dtype,
        "compress": "deflate",
        "predictor": 3 if im.dtype == "float32" else 2,
    }
    if im.data.shape[1] > BLOCK and im.data.shape[2] > BLOCK:
        profile.update(tiled=True, blockxsize=BLOCK, blockysize=BLOCK)
    if im.transform is not None:
        profile.update(transform=im.transform, crs=im.crs)
    if im.nodata is not None:
        profile["nodata"] = im.nodata
    profile = _photometric(profile, im.colorinterp)
    with gdal_env(), _open(tmp, "w", **profile) as ds:  # GDAL_TIFF_INTERNAL_MASK: no .msk sidecar
        ds.write(out.astype(im.dtype))
        if im.valid is not None:
            ds.write_mask(np.where(im.valid, 255, 0).astype(np.uint8))
        ds.update_tags(**(im.tags or {}))
        named = im.descriptions if im.descriptions and len(im.descriptions) == im.data.shape[0] else None
        _write_band_metadata(ds, named, im.band_tags, im.imagery)
        if im.colorinterp:
            ds.colorinterp = im.colorinterp
        if im.encoding is not None:
            im.encoding.write(ds)
    verify_geotiff(tmp, complete_tag=False)


@contextlib.contextmanager
def atomic_output(
    out: str | os.PathLike[str], overwrite: bool = False, what: str = "output"
) -> Iterator[Path]:
    """A temporary path beside `out` to write a side file (PNG, CSV, JSON, HTML) to; renamed onto
    `out` only when the body succeeds and wrote something, else removed. An existing `out` needs
    `overwrite`; a failed write is an OutputWriteError naming `out` (exit 1), never a half file.
    A symbolic link is written through, as `open(out, "w")` would: the file it points to is replaced
    (its temporary beside it, so the rename stays atomic) and the link stays a link."""
    final = Path(out)
    if final.is_dir():
        raise FusionError(f"{what} {final} is a folder; give a file name inside it")
    if final.exists() and not overwrite:
        raise FusionError(f"{what} {final} already exists; pass --overwrite to replace it")
    final = _write_target(final)
    # a killed run's temporary of this file (a quicklook, a simulated image, a CSV): cleared as the
    # product's are (`AtomicWriter`)
    with contextlib.suppress(OSError):
        remove_stale_temporaries(final)
    tmp = _temp_name(final, "tmp", final.suffix)
    try:
        yield tmp
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise OSError("nothing was written")
        _replace(tmp, final, Path(out), overwrite)  # not onto a file another run made meanwhile
    except (FusionError, OutputWriteError):  # said already (a nested output names its own file)
        raise
    except Exception as exc:  # a writer library's own error type (safetensors, matplotlib) included
        raise OutputWriteError(f"cannot write {what} {final}: {reason(exc)}") from exc
    finally:  # OSError: on a read-only filesystem the temporary never existed, and EROFS would
        # replace the error that says so
        with deferred_signals(), contextlib.suppress(OSError):
            tmp.unlink()


class AtomicWriter:
    """Streams windows to a temporary GeoTIFF beside `out`; `commit()` renames it into place.

    Use as a context manager: on any exception (including KeyboardInterrupt) before commit the
    temporary files are removed, so no partial output ever appears under the final name. A symbolic
    link `out` is written through (`_write_target`), as `atomic_output` does: the temporaries go beside
    the file it points to, which the product replaces, and the link stays a link.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        profile: dict[str, Any],
        *,
        descriptions: Sequence[str] | None = None,
        tags: dict[str, Any] | None = None,
        use_mask: bool = False,
        overwrite: bool = False,
        cog: bool = False,
        colorinterp: Sequence[ColorInterp] | None = None,
        imagery: Sequence[dict[str, str]] | None = None,
        band_tags: Sequence[dict[str, str]] | None = None,
        encoding: Encoding | None = None,
    ) -> None:
        self.out = Path(out)
        self.colorinterp = colorinterp
        self.imagery = imagery  # per band, items of GDAL's IMAGERY domain (wavelengths)
        self.band_tags = band_tags  # per band, the MS band's carried tags (`bands.carried_tags`)
        self.encoding = encoding  # the bands' scale, offset and unit
        self.profile = profile
        self.descriptions = descriptions
        self.tags = {k: _tag_text(v) for k, v in (tags or {}).items()}
        self.use_mask = use_mask
        self.overwrite = overwrite
        self.cog = cog
        self._target = _write_target(self.out)
        self._tmp = _temp_name(self._target, "partial")
        self._env: rasterio.Env | None = None
        self._dst: rasterio.io.DatasetWriter | None = None
        self._committed = False

    def __enter__(self) -> AtomicWriter:
        # a killed (out of memory, SIGKILL) run onto this output left its temporaries: a rerun clears
        # this host's; a failure to is no reason to fail this one
        with contextlib.suppress(OSError):
            remove_stale_temporaries(self._target)
        self._env = gdal_env()
        self._env.__enter__()
        try:  # __exit__ does not run when __enter__ fails (or Ctrl-C lands in it): clean up here
            try:
                self._dst = _open(self._tmp, "w", **_photometric(self.profile, self.colorinterp))
            except Exception as exc:
                raise FusionError(f"cannot write output {self.out}: {reason(exc)}") from None
            _write_band_metadata(self._dst, self.descriptions, self.band_tags, self.imagery)
            if self.colorinterp:
                self._dst.colorinterp = self.colorinterp
            if self.encoding is not None:
                self.encoding.write(self._dst)
            self._dst.update_tags(**self.tags)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, data: np.ndarray, row0: int, col0: int, valid: np.ndarray | None = None) -> None:
        """Write `(C, h, w)` at (row0, col0); `valid (h, w)` goes to the internal mask if enabled."""
        assert self._dst is not None
        win = Window(col0, row0, data.shape[-1], data.shape[-2])
        with self._failing_write():
            self._dst.write(data, window=win)
            if self.use_mask:
                m = (
                    np.full(data.shape[-2:], 255, np.uint8)
                    if valid is None
                    else np.where(valid, 255, 0).astype(np.uint8)
                )
                self._dst.write_mask(m, window=win)

    @contextlib.contextmanager
    def _failing_write(self) -> Iterator[None]:
        """Any GDAL/OS error while writing is an OutputWriteError naming the output (exit 1)."""
        try:
            yield
        except (FusionError, OutputWriteError):
            raise
        except Exception as exc:
            raise OutputWriteError(f"writing output {self.out} failed: {reason(exc)}") from exc

    def update_tags(self, **tags: Any) -> None:
        assert self._dst is not None
        self._dst.update_tags(**{k: _tag_text(v) for k, v in tags.items()})

    def commit(self, side: Callable[[Path], object] | None = None) -> Path:
        """Mark complete, close, convert to COG if asked, and rename into place. `side(finished)`
        writes a side file (the quicklook) from the finished temporary just before the rename, both
        with Ctrl-C, SIGTERM and SIGHUP held: a signal between the two left a product without its
        quicklook, which a rerun refused to add without --overwrite."""
        assert self._dst is not None
        if self.out.exists() and not self.overwrite:
            raise FusionError(f"output {self.out} appeared while fusing; pass --overwrite to replace it")
        with self._failing_write():
            out, side_error = self._finish(side)
        if side_error is not None:  # the product is in place: only the side file failed, say so
            raise side_error
        return out

    def _finish(self, side: Callable[[Path], object] | None = None) -> tuple[Path, Exception | None]:
        assert self._dst is not None
        self._dst.update_tags(**{COMPLETE_TAG: "1"})
        self._dst.close()
        verify_geotiff(self._tmp)
        final = self._tmp
        if self.cog:
            final = _temp_name(self._target, "cog")
            self._cog_tmp = final
            with _open(self._tmp, "r+") as dst:
                factors = overview_factors(dst.width, dst.height)
                if factors:
                    dst.build_overviews(factors, Resampling.average)
            verify_geotiff(self._tmp, overviews=True)  # cut short by a full disk: sparse (zeros)
            # The COG driver reuses the overviews just built and streams block by block.
            rasterio.shutil.copy(self._tmp, final, driver="COG", **cog_options(self.profile))
            self._tmp.unlink()
            verify_geotiff(final, overviews=True)
        side_error = None
        with deferred_signals():
            if side is not None:
                try:
                    side(final)
                except Exception as exc:  # a quicklook that fails must not cost the product
                    side_error = exc
            _replace(final, self._target, self.out, self.overwrite)
            self._committed = True
        return self.out, side_error

    def _cleanup(self) -> None:
        # any OSError: a temporary never made (a name too long to create) must not hide why
        for p in (self._tmp, getattr(self, "_cog_tmp", None)):
            if p is not None:
                with contextlib.suppress(OSError):
                    Path(p).unlink()
                with contextlib.suppress(OSError):
                    Path(str(p) + ".ovr").unlink()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # A second Ctrl-C (the user pressing it again while the first unwinds) waits until the
        # temporaries are gone instead of leaving them behind.
        with deferred_signals():
            try:
                if self._dst is not None and not self._dst.closed:
                    self._dst.close()
                if not self._committed:
                    self._cleanup()
            finally:
                if self._env is not None:
                    self._env.__exit__(exc_type, exc, tb)


def _photometric(profile: dict[str, Any], colorinterp: Sequence[ColorInterp] | None) -> dict[str, Any]:
    """`profile`, written PHOTOMETRIC=MINISBLACK unless the bands are red, green, blue in that order
    (or --co chose): GTiff's default for 3 or 4 Byte bands is RGB, which a B, G, R product then
    claimed in the TIFF itself. The COG driver has no such option: a 3-band Byte COG is RGB in the
    TIFF, its colour interpretation (what GDAL reports) is still written in its metadata."""
    if is_rgb_order(colorinterp) or any(k.lower() == "photometric" for k in profile):
        return profile
    return {**profile, "photometric": "MINISBLACK"}


def _tag_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return jsonout.dumps(value, sort_keys=True)


def is_complete_output(path: str | os.PathLike[str]) -> bool:
    """True if `path` is a fusion-cli product that was written to the end: completion tag present and
    every block it indexes inside the file (`verify_geotiff`). The tag alone is not enough: a COG
    keeps its tags at the start of the file, so a copy cut short still opens and carries it."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        verify_geotiff(p)
    except Exception:  # noqa: BLE001 - unreadable in any way: not complete
        return False
    return True
