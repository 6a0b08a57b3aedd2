"""What a run is given and what it reports: the run options (`FuseOptions`), the progress callback
(`Progress`) and the summary (`FuseSummary`). What fuser to build is a `factory.FuserSpec`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from fusion_cli.choices import MS_PHASES
from fusion_cli.errors import FusionError

# Tile side (PAN px) for fusers that state no `preferred_tile`.
DEFAULT_TILE = 256
# Blend zone (PAN px) for fusers that state no `preferred_overlap` (the networks).
DEFAULT_OVERLAP = 32
# Smallest tile side (PAN px): below it the halo dwarfs the tile (--tile 1 ran for minutes on a
# 0.2 Mpx scene without finishing).
MIN_TILE = 32


class Progress(Protocol):
    """Told how far a file run is; the caller draws it (the CLI: a bar on stderr). `start` comes once
    the tiles are planned, `advance` once per finished window, `stop` always at the end (also on
    errors)."""

    def start(self, total: int, label: str) -> None:
        """`total` windows to fuse; `label` says what (e.g. "fusing out.tif")."""

    def advance(self, pixels: int) -> None:
        """One more window done, with `pixels` output pixels (its core inside the scene)."""

    def stop(self) -> None:
        """The run is over (finished or failed)."""


@contextlib.contextmanager
def reporting(progress: Progress | None, total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """`progress.advance` between `start` and `stop` (stopped on errors too); None without progress
    (None, or False: the boolean this option once was)."""
    if not progress:
        yield None
        return
    progress.start(total, label)
    try:
        yield progress.advance
    finally:
        progress.stop()


# Pixel types a GeoTIFF product is written in (GDAL's GTiff; float16 needs GDAL 3.11 and most readers
# lack it)
_INTEGERS = tuple(f"{kind}{bits}" for kind in ("uint", "int") for bits in (8, 16, 32, 64))
PRODUCT_DTYPES = (*_INTEGERS, "float32", "float64")


def product_dtype(name: str) -> str:
    """--dtype as numpy names it ("f4" -> "float32"), refused in one line unless a product can be
    written in it (a bad name failed only at the write, blaming the output path)."""
    try:
        dt = np.dtype(name)
    except TypeError:
        raise FusionError(f"unknown --dtype {name!r}; use one of {', '.join(PRODUCT_DTYPES)}") from None
    if dt.kind not in "uif":  # complex or boolean pixels are no product of real-valued bands
        raise FusionError(
            f"--dtype {name} is not a real-valued pixel type; use one of {', '.join(PRODUCT_DTYPES)}"
        )
    if dt.name not in PRODUCT_DTYPES:
        raise FusionError(f"--dtype {name}: products are written in {', '.join(PRODUCT_DTYPES)}")
    return dt.name


# FuseOptions fields that change what a product holds or is (its pixels; a COG or not), not how it is
# stored or how fast it is made (compression, --co, tiles, statistics sampling), with the option that
# sets each: a product records them (`output.product_request`), and a batch takes a complete product
# made with other values for another product, not a finished scene.
PRODUCT_OPTIONS = {
    "bands": "--bands",
    "pan_bands": "--pan-bands",
    "sensor_bands": "--sensor-bands",
    "dn_max": "--dn-max",
    "out_dtype": "--dtype",
    "cog": "--cog",
    "coregister": "--coregister",
    "zero_is_nodata": "--zero-nodata",
    "pan_nodata": "--pan-nodata",
    "ms_nodata": "--ms-nodata",
    "adapt": "--adapt",
    "reproject": "--reproject",
    "ms_phase": "--ms-phase",
}


@dataclass
class FuseOptions:
    """How to run a fuser over a scene and write the product: tiling, threads, inputs' bands and
    nodata, output format. What fuser to build (model, device, precision...) is a `FuserSpec`."""

    # output tile side, PAN px (rounded up to a multiple of the ratio/fuser multiple); None: the fuser's
    # `preferred_tile` (classical methods: larger tiles, less halo re-read), else DEFAULT_TILE
    tile: int | None = None
    # blend-zone width between neighbouring tiles, PAN px; None: the fuser's `preferred_overlap`
    # (classical methods: 0, nothing to blend), else DEFAULT_OVERLAP
    overlap: int | None = None
    batch: int = 4  # windows per fuser call
    threads: int | None = None  # torch CPU threads
    # clip ceiling of the product (else NBITS, else the dtype range); given, it also overrides a
    # model card's per-dtype DN scale (the fuser's own DN scale is `FuserSpec.dn_max`)
    dn_max: float | None = None
    bands: list[int] | None = None  # 1-based MS (HSI) bands to use, in the order the fuser expects
    pan_bands: list[int] | None = None  # 1-based PAN (MSI) bands; all by default
    # which of the sensor's bands (1-based, its order) the MS file's bands are, one per file band:
    # a classical method's MTF gains once --bands subsets or reorders them (`sensors.sensor_band_numbers`)
    sensor_bands: list[int] | None = None
    out_dtype: str | None = None  # default: the MS dtype
    compress: str = "deflate"
    creation_options: dict[str, str] | None = None  # --co KEY=VALUE: more GTiff creation options
    cog: bool = False
    overwrite: bool = False
    coregister: bool = False  # apply the measured PAN/MS shift (it is always measured and reported)
    measure_shift: bool = True
    zero_is_nodata: bool = False  # treat 0 (all-zero MS pixels, zero PAN) as nodata
    # input nodata values on top of the files' own (--pan-nodata / --ms-nodata; raster.NodataOverride)
    pan_nodata: float | None = None
    ms_nodata: float | None = None
    quicklook: bool = False  # also write OUT.png
    progress: Progress | None = None  # told how far a file run is; None: nothing reported
    adapt: int = 0  # --adapt N: N target-adaptive training steps on this scene first (networks only)
    # classical methods' global statistics from at most this many PAN Mpx of windows spread evenly over
    # the scene (a regular sub-grid of tiles); None: every window (exact whole-scene statistics)
    stats_mpx: float | None = None
    reproject: bool = False  # an MS in another CRS is warped (GDAL, cubic) onto the PAN's CRS and grid
    max_pixels: float | None = None  # largest product (PAN-grid pixels); None: raster.MAX_PIXELS
    # where a georeferenced MS is sampled (`MS_PHASES`): "toolbox", as the reference toolbox and the
    # published tables (its content half a PAN px right/below the geotransform at even ratios), or
    # "geometric", exactly on the geotransform (`align.sampling_phase`)
    ms_phase: str = "toolbox"

    def __post_init__(self) -> None:
        if self.out_dtype is not None:  # refused before any work (a batch: before its first scene)
            self.out_dtype = product_dtype(self.out_dtype)
        # --co DTYPE=uint8 or NODATA=5 would change the product itself: refused when the options are
        # made, so a batch stops before its first scene (output_profile checks again for direct use)
        from fusion_cli.raster.profile import check_creation_options, check_known_options

        check_creation_options(self.creation_options)
        check_known_options(self.creation_options)
        # checked when the options are made, so that a batch refuses them once (exit 2), not per scene
        if self.tile is not None and self.tile < MIN_TILE:
            raise FusionError(f"--tile must be at least {MIN_TILE} PAN px, got {self.tile}")
        if self.overlap is not None and self.overlap < 0:
            raise FusionError(f"--overlap must be 0 or more, got {self.overlap}")
        if self.batch < 1:
            raise FusionError(f"--batch must be 1 or more windows per call, got {self.batch}")
        if self.threads is not None and self.threads < 1:
            raise FusionError(f"--threads must be 1 or more, got {self.threads}")
        if self.stats_mpx is not None and not (math.isfinite(self.stats_mpx) and self.stats_mpx > 0):
            raise FusionError(
                f"--stats-mpx must be positive: a number of PAN megapixels like 20, got {self.stats_mpx}"
            )
        if self.ms_phase not in MS_PHASES:
            raise FusionError(f"--ms-phase must be one of {', '.join(MS_PHASES)}, got {self.ms_phase!r}")
        if self.max_pixels is not None and not self.max_pixels > 0:  # NaN too; inf: no ceiling
            raise FusionError(
                f"--max-pixels must be positive: a number of pixels like 2e9, got {self.max_pixels}"
            )


@dataclass
class FuseSummary:
    """What a run did; `to_dict()` is the `--json` output. `device`, `precision` and `scan_backend`
    are what the fuser ran, not what was asked for."""

    output: str
    shape: tuple[int, int, int]  # (C, H, W)
    dtype: str
    crs: str | None
    transform: list[float] | None
    fuser: str
    weights_sha256: str | None
    device: str
    precision: str
    ratio: int
    tiles: int
    tile: int
    overlap: int
    seconds: float
    mpx_per_s: float  # PAN megapixels per second, whole run
    nodata: float | None
    internal_mask: bool
    valid_fraction: float
    shift_measured: dict[str, float] | None  # {"dy", "dx", "peak"} in PAN px
    shift_applied: bool
    bytes: int
    pan: str | None = None
    ms: str | None = None
    quicklook: str | None = None
    warnings: list[str] = field(default_factory=list)
    adapt: dict[str, Any] | None = None  # the target-adaptive fine-tuning report, with --adapt
    scan_backend: str | None = None  # a network's selective-scan backend

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
