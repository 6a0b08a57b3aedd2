"""The GeoTIFF a product is written as: tiling, compression and predictor, creation options, and
its overview levels."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from affine import Affine

from fusion_cli.choices import COMPRESSIONS
from fusion_cli.errors import FusionError

BLOCK = 256
# DEFLATE level of the outputs: with the horizontal predictor, real 16-bit products barely compress
# further at higher levels (GSA on the WV3 pair: 14 267 KiB at level 1, 14 242 at 3, 14 379 at 6; the
# Landsat-8 example: 1 876 / 1 921 / 1 931 KiB), while level 1 costs the least CPU: EXP on the
# 2048-px benchmark scene runs at 6.2 PAN Mpx/s end to end against 5.3 at level 3.
DEFLATE_LEVEL = 1

# Keywords rasterio.open takes as the dataset's own settings, not as GTiff creation options: given
# as --co they would replace the product's driver, size, band count, pixel type, georeferencing or
# nodata (or break the open itself). Each with what sets that instead.
RESERVED_OPTIONS = {
    "DRIVER": "the product is always a GeoTIFF",
    "WIDTH": "the product's size is the PAN grid's; crop the inputs for a smaller one",
    "HEIGHT": "the product's size is the PAN grid's; crop the inputs for a smaller one",
    "COUNT": "its bands are the MS bands fused; choose them with --bands",
    "DTYPE": "use --dtype",
    "NODATA": "use --nodata",
    "CRS": "the product is on the PAN's grid; warp the PAN first (gdalwarp) for another one",
    "TRANSFORM": "the product is on the PAN's grid; warp the PAN first (gdalwarp) for another one",
    "GCPS": "the product is georeferenced as the PAN",
    "RPCS": "the product is georeferenced as the PAN",
    "SHARING": "it is not a creation option",
    "OPENER": "it is not a creation option",
    "FP": "it is not a creation option",
    "PATH": "it is not a creation option",
    "MODE": "it is not a creation option",
    # GTiff options that change what the pixels or tags are: the product's values and metadata are
    # the tool's (a constant 4095 image, uint8 read as signed, tags left in a sidecar at exit 0)
    "NBITS": "the product keeps every bit of its pixel type; choose that with --dtype",
    "PIXELTYPE": "use --dtype (int8 for signed bytes)",
    "PROFILE": "the product's georeferencing and tags live in the TIFF itself",
}


def output_profile(
    *,
    width: int,
    height: int,
    count: int,
    dtype: str,
    crs: Any,
    transform: Any,
    nodata: float | None,
    compress: str = "deflate",
    creation_options: dict[str, str] | None = None,
    cog: bool = False,
) -> dict[str, Any]:
    """Tiled, compressed GeoTIFF profile; predictor 2 for integers, 3 for floats. `creation_options`
    (GTiff's, e.g. {"ZLEVEL": "9", "BLOCKXSIZE": "512"}) replace the defaults of the same name. With
    `cog`, the product is converted to a COG at the end: options the COG driver cannot take are
    refused now (`cog_options`), and the probe block goes through that driver too."""
    check_creation_options(creation_options)
    compress = compress.lower()
    if compress not in COMPRESSIONS:
        raise FusionError(f"unknown compression {compress!r}; use {', '.join(COMPRESSIONS)}")
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype,
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "interleave": "pixel" if count <= 4 else "band",
        "BIGTIFF": "IF_SAFER",
    }
    if compress == "none":
        profile["compress"] = "none"  # said, so that a COG is not compressed by its driver's default (LZW)
    else:
        profile["num_threads"] = "ALL_CPUS"  # GDAL compresses blocks in worker threads
        profile["compress"] = compress
        profile["predictor"] = 3 if np.issubdtype(np.dtype(dtype), np.floating) else 2
        if compress == "deflate":
            profile["zlevel"] = DEFLATE_LEVEL
    if crs is not None:
        profile["crs"] = crs
    if transform is not None and (crs is not None or not transform.almost_equals(Affine.identity())):
        profile["transform"] = transform  # a geotransform without a CRS is kept too (GDAL writes it)
    if nodata is not None:
        profile["nodata"] = nodata
    for key, value in (creation_options or {}).items():
        # lower case, as the keys above: one entry per option, and the COG step finds compress/zlevel
        profile = {k: v for k, v in profile.items() if k.lower() != key.lower()}
        profile[key.lower()] = value
    if cog:
        cog_options(profile, creation_options)
    if creation_options:
        probe_profile(profile, creation_options, cog)
    return profile


# GTiff creation options and the COG driver's name for the same setting; None: what a COG implies
# (tiles, whose side is BLOCKSIZE). Any other --co has no COG counterpart.
_COG_NAMES: dict[str, str | None] = {
    "COMPRESS": "COMPRESS", "PREDICTOR": "PREDICTOR", "ZLEVEL": "LEVEL", "ZSTD_LEVEL": "LEVEL",
    "LZMA_PRESET": "LEVEL", "JPEG_QUALITY": "QUALITY", "WEBP_LEVEL": "QUALITY", "MAX_Z_ERROR": "MAX_Z_ERROR",
    "NUM_THREADS": "NUM_THREADS", "NBITS": "NBITS", "BIGTIFF": "BIGTIFF",
    "GEOTIFF_VERSION": "GEOTIFF_VERSION", "TILED": None, "BLOCKXSIZE": None, "BLOCKYSIZE": None,
}  # fmt: skip


def cog_options(profile: dict[str, Any], creation_options: dict[str, str] | None = None) -> dict[str, str]:
    """The COG driver's options for a product written with GTiff `profile`: its compression, level,
    predictor, threads and block side carried over (the COG driver names some differently: ZLEVEL is
    LEVEL, JPEG_QUALITY is QUALITY, BLOCKXSIZE/BLOCKYSIZE one BLOCKSIZE). A user option
    (`creation_options`) with no COG counterpart is refused: it would be dropped at the conversion."""
    extra = sorted(k.upper() for k in creation_options or {} if k.upper() not in _COG_NAMES)
    if extra:
        raise FusionError(
            f"--co {', '.join(extra)} has no COG counterpart and would be dropped by --cog; drop it, or "
            "write a plain GeoTIFF"
        )
    opts = {name: str(v) for k, v in profile.items() if (name := _COG_NAMES.get(k.upper())) is not None}
    if str(profile.get("tiled", True)).strip().upper() in ("NO", "FALSE", "OFF", "0"):
        raise FusionError("--cog is always tiled: drop --co TILED=NO")
    side_x, side_y = int(profile.get("blockxsize", BLOCK)), int(profile.get("blockysize", BLOCK))
    if side_x != side_y:
        raise FusionError(
            f"--cog writes square tiles: give BLOCKXSIZE and BLOCKYSIZE one value, not {side_x}/{side_y}"
        )
    opts["BLOCKSIZE"] = str(side_x)
    return opts


# Creation options GDAL reads as whole numbers, with their range and what they are: a value it cannot
# read ("abc") it takes as 0, and writes with its default instead, without a word.
_WHOLE_NUMBER_OPTIONS: dict[str, tuple[int, int | None, str]] = {
    "BLOCKXSIZE": (1, None, "a block side is a whole number of pixels, like 512"),
    "BLOCKYSIZE": (1, None, "a block side is a whole number of pixels, like 512"),
    "ZLEVEL": (1, 12, "the DEFLATE level is a whole number from 1 to 12"),
    "ZSTD_LEVEL": (1, 22, "the ZSTD level is a whole number from 1 to 22"),
    "LZMA_PRESET": (0, 9, "the LZMA preset is a whole number from 0 to 9"),
    "PREDICTOR": (1, 3, "the predictor is 1 (none), 2 (horizontal) or 3 (floating point)"),
    "JPEG_QUALITY": (1, 100, "the JPEG quality is a whole number from 1 to 100"),
    "WEBP_LEVEL": (1, 100, "the WEBP level is a whole number from 1 to 100"),
}


def check_creation_options(creation_options: dict[str, str] | None) -> None:
    """Refuse a creation option that rasterio would take as the dataset's own setting (DRIVER, DTYPE,
    NODATA, CRS... `RESERVED_OPTIONS`) rather than pass to GTiff: `--co NODATA=5` silently gave the
    product another nodata, `--co COUNT=1` failed with a traceback after the fusion."""
    for key, value in (creation_options or {}).items():
        bounds = _WHOLE_NUMBER_OPTIONS.get(key.upper())
        if bounds is not None:
            lo, hi, what = bounds
            # GDAL reads "abc" as 0 and quietly writes its default (blocks, level...)
            if not (value.isdigit() and lo <= int(value) <= (hi or int(value))):
                raise FusionError(f"--co {key.upper()}={value}: {what}")
        if key.upper() == "SPARSE_OK":  # unwritten blocks tell a file cut short by a full disk
            raise FusionError(
                f"--co {key.upper()}={value}: every block of a product is written, so that a file cut "
                "short by a full disk is told from a complete one (a product with an empty tile failed "
                "that check); leave it out"
            )
        why = RESERVED_OPTIONS.get(key.upper())
        if why is not None:
            raise FusionError(
                f"--co {key.upper()}={value} would change what the product itself is, which --co "
                f"cannot: {why}"
            )


def probe_profile(profile: dict[str, Any], creation_options: dict[str, str], cog: bool = False) -> None:
    """Write one block with `profile` to memory and read it back. GTiff accepts some creation options
    at creation that it cannot encode (COMPRESS=JPEG for 16-bit data, WEBP for more than 4 bands):
    the blocks are then dropped with only a message, and the product failed after the whole scene was
    fused, as a write error. Refused here, before any work, with GDAL's reason (bad input, exit 2).
    An option GTiff does not know (a misspelt ZLEVLE=9, another driver's option) is refused too:
    GDAL only warns about it (on rasterio's logger, which prints nothing) and writes without it."""
    import secrets
    import warnings

    import rasterio
    import rasterio.shutil
    from rasterio.errors import NotGeoreferencedWarning

    from fusion_cli.raster.gdal import gdal_env, reason

    def flag(key: str) -> bool:
        return str(profile.get(key, False)).strip().upper() in ("TRUE", "YES", "ON", "1")

    try:
        if flag("tiled"):
            w, h = int(profile.get("blockxsize", BLOCK)), int(profile.get("blockysize", BLOCK))
        else:
            w, h = min(int(profile["width"]), BLOCK), min(int(profile["height"]), BLOCK)
    except (TypeError, ValueError):
        w = h = BLOCK  # an unreadable block size: GDAL's own error comes from the open below
    path = f"/vsimem/fusion-probe-{secrets.token_hex(4)}.tif"
    probe = {k: v for k, v in profile.items() if k not in ("crs", "transform", "nodata")}
    probe.update(width=w, height=h)
    data = np.ones((int(profile["count"]), h, w), dtype=profile["dtype"])
    try:
        with gdal_env(), warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with _unknown_options() as unknown, rasterio.open(path, "w", **probe) as dst:
                dst.write(data)
            _refuse_unknown(unknown, creation_options)
            with rasterio.open(path) as src:
                if not src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1):
                    raise OSError("the block was not written")
                src.read(1)
            if cog:  # the end of a --cog run: the COG driver re-encodes (pixel-interleaved) blocks
                cog_path = path.replace(".tif", ".cog.tif")
                try:
                    rasterio.shutil.copy(path, cog_path, driver="COG", **cog_options(profile))
                    with rasterio.open(cog_path) as src:
                        src.read(1)
                finally:
                    with contextlib.suppress(Exception):
                        rasterio.shutil.delete(cog_path)
    except FusionError:
        raise
    except Exception as exc:
        given = " ".join(f"--co {k}={v}" for k, v in creation_options.items())
        raise FusionError(
            f"{'GTiff or COG' if cog else 'GTiff'} cannot write this {profile['dtype']} product of "
            f"{profile['count']} band(s) with {given}: {reason(exc)}; change or drop these options"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            rasterio.shutil.delete(path)


def check_known_options(creation_options: dict[str, str] | None) -> None:
    """Refuse creation options GTiff does not know (a misspelt ZLEVLE=9), from a one-block probe of any
    pixel type: a batch refuses them once, before its first scene, rather than fail every scene. What
    depends on the product (JPEG on 16-bit data) is `probe_profile`'s, per product."""
    if not creation_options:
        return
    import secrets

    import rasterio
    import rasterio.shutil

    from fusion_cli.raster.gdal import gdal_env

    path = f"/vsimem/fusion-options-{secrets.token_hex(4)}.tif"
    options = {k.lower(): v for k, v in creation_options.items()}
    size = {"width": BLOCK, "height": BLOCK, "count": 1, "dtype": "uint8"}
    with gdal_env(), _unknown_options() as unknown:
        try:
            with rasterio.open(path, "w", driver="GTiff", **size, **options) as dst:
                dst.write(np.ones((1, BLOCK, BLOCK), np.uint8))
        except Exception:  # noqa: BLE001 - what the product's own probe reports, with its type
            pass
        finally:
            with contextlib.suppress(Exception):
                rasterio.shutil.delete(path)
    _refuse_unknown(unknown, creation_options)


def _refuse_unknown(unknown: list[str], creation_options: dict[str, str]) -> None:
    if unknown:
        values = {k.upper(): v for k, v in creation_options.items()}
        given = " ".join(f"--co {k}={values[k]}" if k in values else k for k in unknown)
        raise FusionError(
            f"GTiff has no creation option {given}: GDAL would write the product without it; "
            "check the name (gdalinfo --format GTiff lists them) or drop it"
        )


@contextlib.contextmanager
def _unknown_options() -> Iterator[list[str]]:
    """The creation options GDAL reports as unknown to the driver while the block runs: its
    CPLE_NotSupported warnings, which rasterio passes to the `rasterio` logger."""
    unknown: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"does not support creation option (\S+)", record.getMessage())
            if found and found.group(1).upper() not in unknown:
                unknown.append(found.group(1).upper())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("rasterio")
    logger.addHandler(handler)
    try:
        yield unknown
    finally:
        logger.removeHandler(handler)


def overview_factors(width: int, height: int, min_size: int = BLOCK) -> list[int]:
    """Powers of two until the smaller side fits in one block."""
    factors, f = [], 2
    while min(width, height) / f >= min_size / 2 and f <= 1024:
        factors.append(f)
        f *= 2
    return factors
