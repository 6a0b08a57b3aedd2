"""The library API of fusion: one streaming pipeline for files and arrays, every fuser.

    from fusion_cli.pipeline import pansharpen, hisr, fuse_files, fuse_arrays, make_fuser, FuseOptions

`fuse_files` reads a PAN/MS pair window by window (`raster`), places the MS on the PAN grid
(`align`), fuses overlapping windows in batches, blends them (`tiling`) and streams the result to an
atomically written GeoTIFF. `fuse_arrays` runs the same tiling on in-memory arrays. For HISR the
high-resolution MSI plays the "pan" role (P > 1 bands) and the low-resolution HSI the "ms" role.

The modules follow the data flow:

- `factory`: what fuser to build (`FuserSpec`) and building it (`build_fuser`, `make_fuser`)
- `options`: how to run it (`FuseOptions`), the `Progress` callback, the run's `FuseSummary`
- `readers`: opening a pair, reading windows (PAN tile + MS on its grid + validity), the shift
- `engine`: the tile plan, read-ahead and window threads, fusing and blending strip by strip
- `stats`: the statistics pass of fusers with global statistics
- `writer`: the background writer
- `output`: value range, nodata, block finishing, the product's tags, the quicklook
- `api`: `fuse_files`, `fuse_arrays`, `pansharpen`, `hisr`
"""

from fusion_cli.pipeline.api import check_default_model_fits, fuse_arrays, fuse_files, hisr, pansharpen
from fusion_cli.pipeline.factory import FuserSpec, build_fuser, make_fuser
from fusion_cli.pipeline.options import FuseOptions, FuseSummary, Progress
from fusion_cli.pipeline.readers import band_count, measure_ratio, open_pair
from fusion_cli.pipeline.stats import stats_windows

__all__ = [
    "FuseOptions",
    "FuseSummary",
    "FuserSpec",
    "Progress",
    "band_count",
    "build_fuser",
    "check_default_model_fits",
    "fuse_arrays",
    "fuse_files",
    "hisr",
    "make_fuser",
    "measure_ratio",
    "open_pair",
    "pansharpen",
    "stats_windows",
]
