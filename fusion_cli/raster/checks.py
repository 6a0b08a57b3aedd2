"""Refusals before any work: pixel types, sizes, value ranges, NaN outside nodata, the same file
given twice, and an output that cannot be written where asked."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp

from fusion_cli.errors import FusionError, short_list
from fusion_cli.raster.bands import Encoding

# Default ceiling on a product's pixels (PAN grid): 10 Gpx, far above real scenes (a WorldView
# strip is ~1.5 Gpx), far below what a sparse or mistaken header can declare (10^12 px = 12 TB).
MAX_PIXELS = 1e10


# Smallest MS side (pixels, where PAN and MS overlap) a fusion takes: its filters and statistics
# need that much context. Below it the products drifted from the MS (band means: MTF-GLP-HPM 1.98x
# on 5 x 7 MS px, BDSD-PC 1.41x on 4 x 4; within 5 % from 8 x 8 on, WorldView-2 crops).
MIN_MS_SIDE = 8


def check_scene_size(height: int, width: int, max_pixels: float | None, ratio: int = 1) -> None:
    """Refuse a product larger than `max_pixels` (None: MAX_PIXELS), or one whose MS part (`ratio`
    PAN px per MS px) is under MIN_MS_SIDE on a side, before any work."""
    ms_h, ms_w = height // ratio, width // ratio
    if min(ms_h, ms_w) < MIN_MS_SIDE:
        raise FusionError(
            f"PAN and MS overlap on {ms_h} x {ms_w} MS pixels: fusion needs at least {MIN_MS_SIDE} x "
            f"{MIN_MS_SIDE} (its filters and statistics need the context); give a larger scene"
        )
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if height * width > limit:
        raise FusionError(
            f"the product would be {height} x {width} = {height * width / 1e9:.3g} Gpx, over the "
            f"limit of {limit / 1e9:.3g} Gpx; check the inputs' sizes, or raise --max-pixels"
        )


def check_dn_max(dn_max: float | None) -> None:
    """--dn-max is the largest valid DN: a positive finite number (0 or NaN clip everything to 0)."""
    if dn_max is not None and not (math.isfinite(dn_max) and dn_max > 0):
        raise FusionError(f"--dn-max must be a positive number like 2047 or 65535, got {dn_max}")


def check_pixel_type(ds: rasterio.io.DatasetReader, what: str) -> None:
    """Complex pixels would lose their imaginary part: refuse them (and anything not numeric). A
    paletted band (a colour table: a class map) holds class indices, which fused as numbers made a
    product of meaningless values at exit 0: refused too."""
    for dt in set(ds.dtypes):
        kind = np.dtype(dt).kind
        if kind not in "uif":
            raise FusionError(
                f"{what} {ds.name} has {dt} pixels; fusion needs real-valued integer or float "
                "bands (convert it, e.g. gdal_translate -ot Float32 on the amplitude)"
            )
    paletted = [b for b, c in enumerate(ds.colorinterp, start=1) if c == ColorInterp.palette]
    if paletted:
        bands = f"band {paletted[0]} is" if len(paletted) == 1 else f"bands {short_list(paletted)} are"
        raise FusionError(
            f"{what} {ds.name} {bands} paletted (a colour table): it holds class indices, not "
            "intensities; expand it with gdal_translate -expand rgb if it is an image"
        )


def check_one_type(ds: rasterio.io.DatasetReader, bands: Sequence[int], what: str) -> None:
    """A VRT may give its bands different types; every read here is one array of one type, so the
    `bands` read together must share theirs (numpy's "more than one 'dtype' found" was a traceback)."""
    kinds = sorted({ds.dtypes[b - 1] for b in bands})
    if len(kinds) > 1:
        raise FusionError(
            f"{what} {ds.name} mixes pixel types across the bands read ({', '.join(kinds)}); give it one "
            f"type (gdal_translate -ot {_widest(kinds)}) or pick bands of one type"
        )


def _widest(dtypes: Sequence[str]) -> str:
    """The GDAL name of a type that holds every value of `dtypes` (numpy's promotion)."""
    widest = str(np.result_type(*dtypes))
    if widest == "uint8":
        return "Byte"
    return widest.replace("uint", "UInt").replace("int", "Int").replace("float", "Float")


# What to do about two rasters that encode their values differently (`check_same_encoding`)
UNSCALE_HINT = "write both in the same units first (gdal_translate -unscale -ot Float32)"


def check_same_encoding(
    first: tuple[str, Encoding], second: tuple[str, Encoding], works_on: str, per_band: bool = False
) -> None:
    """Refuse two rasters whose bands store their values with different scale/offset (`Encoding`):
    what is compared or combined is the stored DN, so a PAN kept as DN - 5000 with offset 5000 fused
    with a plain MS was off by thousands of DN at exit 0. `per_band`: band i of one against band i of
    the other (a product and its reference), else every band of both must agree (a PAN and its MS:
    the fusion mixes them all). `works_on`: why that matters, e.g. "fusion works on stored DN"."""
    (a_name, a), (b_name, b) = first, second
    if per_band:
        differ = len(a.pairs) != len(b.pairs) or not all(map(_same_pair, a.pairs, b.pairs))
    else:
        every = [*a.pairs, *b.pairs]
        differ = not all(_same_pair(every[0], p) for p in every[1:])
    if differ:
        raise FusionError(
            f"{a_name} and {b_name} store their values with different scale/offset ({a_name} "
            f"{a.describe()}, {b_name} {b.describe()}): {works_on}; {UNSCALE_HINT}"
        )
    # units where both state one (an unset unit says nothing): radiance is not reflectance
    units = {u for u in (*a.units, *b.units) if u}
    if per_band:  # same band count here: the pairs above agree
        clash = any(ua and ub and ua != ub for ua, ub in zip(a.units, b.units, strict=True))
    else:
        clash = len(units) > 1
    if clash:
        raise FusionError(
            f"{a_name} and {b_name} state different units ({', '.join(sorted(units))}): {works_on}; "
            "bring them to the same units first"
        )


def _same_pair(p: tuple[float, float], q: tuple[float, float]) -> bool:
    """One scale/offset to float32 precision: a scale stored as float32 (2.75e-05 read back as
    2.750000021e-05, as NetCDF often keeps it) is the same scale."""
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12) for x, y in zip(p, q, strict=True))


def check_same_file(pan: str | os.PathLike[str], ms: str | os.PathLike[str]) -> None:
    """The two inputs of a fusion must be two files: one given twice 'fuses' with itself."""
    with contextlib.suppress(OSError):
        if os.path.samefile(pan, ms):
            raise FusionError(f"the PAN and MS are the same file ({ms}); give the two images of the pair")


def check_narrowing(in_dtype: str, out_dtype: str, lo: float | None, hi: float | None) -> None:
    """Refuse an integer --dtype that cannot hold the input's value range [lo, hi] (every value past
    it would be clipped: int8 output of uint16 data is 127 everywhere)."""
    rng = dtype_range(out_dtype)
    if rng is None or lo is None or hi is None:
        return
    if lo < rng[0] or hi > rng[1]:
        # --dn-max lowers the ceiling only; a floor under the output's is the data's own (the
        # pipeline raises lo to the output's floor when a sample of the data stays above it)
        ceiling = ", or state the real ceiling with --dn-max" if hi > rng[1] else ""
        raise FusionError(
            f"--dtype {out_dtype} holds {rng[0]:g}..{rng[1]:g} but the {in_dtype} input's values reach "
            f"{lo:g}..{hi:g}; use {in_dtype} or float32{ceiling}"
        )


def dtype_range(dtype: str | np.dtype) -> tuple[float, float] | None:
    """Representable range of an integer dtype; None for floats (no clipping)."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return float(info.min), float(info.max)
    return None


def non_finite_pixels(data: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray | None:
    """Where `data (C, H, W)` holds NaN or inf in some band, among the pixels `valid (H, W)` counts
    (all without one): an `(H, W)` bool map, None for integer data (which cannot)."""
    if data.dtype.kind != "f":
        return None
    bad = ~np.isfinite(data).all(axis=0)
    if valid is not None:
        bad &= valid
    return bad


def refuse_non_finite(
    name: str, data: np.ndarray, valid: np.ndarray | None = None, bands: Sequence[int] | None = None
) -> None:
    """NaN or inf outside the declared nodata (`valid`: where data counts; None: everywhere) would
    spread through every filter and regression (a singular matrix, NaN statistics, a failed
    assert in a metric): refuse them, saying how to declare them, or, for a band that is NaN at
    every pixel (a dead band: declaring NaN nodata would mask the whole image), to leave it out.
    `bands`: the file's band numbers of `data` (1-based)."""
    bad = non_finite_pixels(data, valid)
    if bad is not None and bad.any():
        finite = np.isfinite(data)
        counted = finite[:, valid] if valid is not None else finite.reshape(len(finite), -1)
        numbers = bands or range(1, len(data) + 1)
        dead = [b for b, ok in zip(numbers, counted.any(axis=1), strict=True) if not ok]
        if dead and len(dead) < len(data):
            raise FusionError(
                f"{name} band(s) {short_list(dead)} are NaN or infinite at every pixel of a "
                f"{data.shape[1]}x{data.shape[2]} window (dead bands?); leave "
                "them out (--bands lists the bands to fuse; gdal_translate -b drops bands from a file) "
                "or fill them"
            )
        found = data[:, bad]
        kinds = [k for k, hit in (("nan", np.isnan(found).any()), ("inf", np.isposinf(found).any()),
                                  ("-inf", np.isneginf(found).any())) if hit]  # fmt: skip
        # a nodata value masks one value: declaring NaN leaves the infinities
        if len(kinds) == 1:
            flags = f"--ms-nodata/--pan-nodata {kinds[0]}"  # --nodata would also apply to the other input
            todo = f"declare them nodata (gdal_edit.py -a_nodata {kinds[0]} FILE, or {flags}) or fill them"
        else:
            todo = f"fill them (they are of several kinds: {', '.join(kinds)}; one nodata value masks one)"
        raise FusionError(
            f"{name} has NaN or infinite values that are not its nodata ({int(bad.sum())} px); {todo}"
        )


def refuse_constant(value: np.ndarray | None, what: str, name: str) -> None:
    """A constant PAN (`value`: its bands' one values, from `constant_value`; None: not constant)
    holds no detail: the methods that match or divide by its contrast gave NaN (written as 0 at exit
    0) or zeroed pixels, and a full-resolution score came out near perfect."""
    if value is None:
        return
    shown = ", ".join(f"{v:g}" for v in value)
    raise FusionError(
        f"the {what} {name} is {shown} on every valid pixel: a constant image holds no detail to fuse "
        "or score; check that it is the right file (or band: --pan-bands)"
    )


def check_not_special(path: Path, named: str | None = None) -> None:
    """Refuse an output path that exists and is neither a regular file nor a folder: `--overwrite -o
    /dev/null` renamed a product onto the system's /dev/null, a FIFO became a file."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise FusionError(
            f"output {named or path} exists and is not a regular file (a device, FIFO or socket); "
            "choose another output path"
        )


def check_writable(
    out_path: str | os.PathLike[str],
    overwrite: bool,
    inputs: Sequence[str | os.PathLike[str]],
    side_outputs: Sequence[Path] = (),
) -> Path:
    """Fail early (before any work) if the output, or a side file written with it (a quicklook),
    cannot be written where asked."""
    out = Path(out_path)
    if os.fspath(out_path).endswith(("/", os.sep)):  # Path() drops the slash: a file `newname` was written
        raise FusionError(f"output {out_path} names a folder; give a file name like {out / 'fused.tif'}")
    check_product_name(out)
    check_name_length(out)
    read = files_read(inputs)
    for side in side_outputs:
        if replaced_input(side, read) is not None:
            raise FusionError(f"{side}, written beside output {out}, is an input; choose another output name")
        if side.is_dir():  # found only after the product was written, which then stayed
            raise FusionError(f"{side}, written beside output {out}, is a folder; choose another output name")
        check_not_special(side)
        if side.exists() and not overwrite:
            raise FusionError(f"{side} already exists; pass --overwrite to replace it")
    hit = replaced_input(out, read)
    if hit is not None:
        src, given = hit
        via = "" if same_file(src, given) else f" (read through {given})"
        raise FusionError(f"output {out} is one of the inputs{via}; choose another output path")
    if out.is_dir():
        raise FusionError(f"output {out} is a folder; give a file name like {out / 'fused.tif'}")
    check_not_special(out)
    if out.exists() and not overwrite:
        raise FusionError(f"output {out} already exists; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FusionError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FusionError(f"output folder {parent} is not writable; choose another output path")
    return out


# GDAL's archive file systems: the path goes on inside the archive, a local file (or another /vsi path)
_ARCHIVES = ("/vsizip/", "/vsitar/", "/vsigzip/", "/vsi7z/", "/vsirar/")
# rasterio's URL form of the same: zip://archive.zip!/inner.tif
_ARCHIVE_SCHEMES = ("zip://", "tar://", "gzip://")
# one file each (GeoTIFFs, model files, manifests): not opened just to list what they read
_NOT_LISTED = (".tif", ".tiff", ".json", ".safetensors", ".pth", ".pt", ".csv")


def files_read(inputs: Sequence[str | os.PathLike[str]]) -> list[tuple[str, str]]:
    """(local file, input as given) for every file GDAL reads for `inputs` (`source_files`): what an
    output may never replace. Computed once per run, then checked with `replaced_input`."""
    return [(f, os.fspath(src)) for src in inputs for f in source_files(src)]


def replaced_input(path: str | os.PathLike[str], read: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """The (file, input as given) of `files_read` that writing `path` would replace, or None."""
    return next(((f, given) for f, given in read if same_file(path, f)), None)


def source_files(path: str | os.PathLike[str]) -> list[str]:
    """The local files GDAL reads to open input `path`, for the checks that an output never
    overwrites an input: the file itself, or the archive a `/vsizip/` (`zip://`) path reads from,
    and for a VRT (or any format GDAL lists several files for) its sources too. Remote paths
    (/vsicurl/, s3://) have no local file: []. A path GDAL cannot open is returned as it is."""
    text = os.fspath(path)
    local = _local_file(text)
    files = [] if local is None else [local]
    if local is None and not text.startswith(_ARCHIVES + _ARCHIVE_SCHEMES):
        return files
    if text.lower().endswith(_NOT_LISTED):
        return files
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning: the run reports that once
            with rasterio.Env(), rasterio.open(text) as ds:
                listed = ds.files
    except Exception:  # noqa: BLE001 - not a raster (a weights file), or unreadable: the name alone
        return files
    for f in listed:
        found = _local_file(f)
        if found is not None and found not in files:
            files.append(found)
    return files


def _local_file(path: str) -> str | None:
    """The local file a path reads: itself, or for an archive path the archive file; None for a
    remote path."""
    for scheme in _ARCHIVE_SCHEMES:
        if path.startswith(scheme):
            return _local_file(path[len(scheme) :].split("!", 1)[0])
    for prefix in _ARCHIVES:
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            if rest.startswith("{") and "}" in rest:  # /vsizip/{/path/a.zip}/inner.tif
                return _local_file(rest[1 : rest.index("}")])
            if rest.startswith("/vsi"):
                return _local_file(rest)
            parts = Path(rest).parts  # the archive is the first prefix of the path that is a file
            for i in range(1, len(parts) + 1):
                candidate = Path(*parts[:i])
                if candidate.is_file():
                    return str(candidate)
            return rest
    if path.startswith("/vsi") or "://" in path:
        return None
    return path


def check_output_folder(folder: Path, what: str = "output folder") -> None:
    """Refuse a `folder` that exists as a file (one line of bad input), before anything is made."""
    if folder.exists() and not folder.is_dir():
        raise FusionError(f"{what} {folder} is a file; give a folder")


def make_output_folder(folder: Path, what: str = "output folder") -> None:
    """Create `folder` (and its parents) unless it exists as a folder; a file there, or a path that
    cannot be made, is one line of bad input (FusionError), not the OS's "[Errno 17] File exists"."""
    check_output_folder(folder, what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FusionError(f"cannot create {what} {folder}: {exc.strerror}") from None


# What a product's temporary adds to its name (`write._temp_name`: ".", ".partial-", a PID of up to 7
# digits, "-", the host tag and 4 hex digits, ".tif"; ".ovr" for its overviews).
TEMP_NAME_EXTRA = 34
# ... and a side file's (a quicklook, a metrics sidecar: ".", ".tmp-", the PID, "-", 8 hex, ".json").
SIDE_TEMP_NAME_EXTRA = 27


def check_name_length(out: Path, extra: int = TEMP_NAME_EXTRA) -> None:
    """Refuse an output name too long for its temporary beside it (`extra` bytes longer): a
    240-character name failed after the whole fusion with "[Errno 36] File name too long" on the
    temporary (exit 1)."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(out.name)) + extra > name_max:
        raise FusionError(
            f"output name {out.name[:40]}... is {len(os.fsencode(out.name))} bytes; its temporary file "
            f"adds {extra} and the folder allows {name_max}: choose a name of at most {name_max - extra} "
            "bytes"
        )


def check_product_name(out: str | os.PathLike[str], what: str = "output") -> None:
    """A product is always a GeoTIFF: refuse a name whose extension GDAL maps to another format
    (.png, .jpg, .vrt ...), which would hold a TIFF under a PNG's name. `out` may be a name pattern
    (`{stem}.png` of batch's --out-pattern): only its extension counts."""
    name = Path(out)
    other = _other_format(name)
    if other is not None:
        raise FusionError(
            f"{what} {out}: the product is a GeoTIFF, but {name.suffix} names GDAL's {other} format; "
            f"name it {name.stem}.tif"
        )


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two local paths name one file: the same path, a symlink or a hard link to it."""
    return file_identity(a) == file_identity(b)


def file_identity(path: str | os.PathLike[str]) -> tuple[object, ...]:
    """What `same_file` compares, as a key for a set or dict (many paths checked at once): an existing
    file's device and inode (as os.path.samefile: symlinks and hard links too), else the path it
    would have with every symlink followed."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return ("path", str(p.resolve()))
    return ("file", st.st_dev, st.st_ino)


def _other_format(out: Path) -> str | None:
    """The GDAL driver other than GeoTIFF that the output's extension names (.png, .jpg, .vrt, .img
    ...), or None (.tif, .tiff, no extension or one GDAL does not know)."""
    from rasterio.drivers import driver_from_extension

    try:
        driver = driver_from_extension(out)
    except ValueError:
        return None
    return None if driver in ("GTiff", "COG") else driver
