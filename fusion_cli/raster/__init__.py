"""Raster I/O with rasterio: everything that touches a GeoTIFF on disk. Geometry between two grids is
`align`, windows and blending are `tiling`.

One module per job: `gdal` (environment, virtual paths, error text), `read` (opening, band selection,
DN scale, padded window reads with validity masks), `nodata` (nodata overrides and masks), `checks`
(refusals before any work), `bands` (band descriptions, colour interpretation),
`profile` (the product's GeoTIFF profile and overviews) and `write` (the atomic, verified writers).
Every name is re-exported here: callers use `raster.open_raster`, `raster.AtomicWriter`...
"""

from fusion_cli.choices import COMPRESSIONS
from fusion_cli.raster.bands import band_descriptions, rgb_colorinterp
from fusion_cli.raster.checks import (
    MAX_PIXELS,
    check_dn_max,
    check_narrowing,
    check_pixel_type,
    check_product_name,
    check_same_file,
    check_scene_size,
    check_writable,
    dtype_range,
    file_identity,
    files_read,
    refuse_non_finite,
    replaced_input,
    same_file,
    source_files,
)
from fusion_cli.raster.gdal import GDAL_ENV, gdal_env, is_gdal_path, recorded_path
from fusion_cli.raster.nodata import NodataOverride, has_mask, with_nodata
from fusion_cli.raster.profile import BLOCK, DEFLATE_LEVEL, output_profile, overview_factors
from fusion_cli.raster.read import (
    SOURCE_DTYPE_TAG,
    check_dn_range,
    damaged_input,
    detect_dn_max,
    is_warped,
    open_raster,
    pad_array,
    read_decimated,
    read_padded,
    read_whole,
    select_bands,
)
from fusion_cli.raster.write import (
    COMPLETE_TAG,
    TEMP_TAGS,
    AtomicWriter,
    GeoTiff,
    atomic_output,
    is_complete_output,
    is_own_temporary,
    remove_stale_temporaries,
    temporary_writer_alive,
    verify_geotiff,
    write_geotiffs,
)

__all__ = [
    "BLOCK",
    "COMPLETE_TAG",
    "COMPRESSIONS",
    "DEFLATE_LEVEL",
    "GDAL_ENV",
    "MAX_PIXELS",
    "SOURCE_DTYPE_TAG",
    "TEMP_TAGS",
    "AtomicWriter",
    "NodataOverride",
    "atomic_output",
    "band_descriptions",
    "check_dn_range",
    "check_dn_max",
    "check_narrowing",
    "check_pixel_type",
    "check_product_name",
    "check_same_file",
    "check_scene_size",
    "check_writable",
    "damaged_input",
    "detect_dn_max",
    "dtype_range",
    "file_identity",
    "files_read",
    "gdal_env",
    "has_mask",
    "is_complete_output",
    "is_gdal_path",
    "is_own_temporary",
    "remove_stale_temporaries",
    "temporary_writer_alive",
    "is_warped",
    "open_raster",
    "output_profile",
    "overview_factors",
    "pad_array",
    "read_decimated",
    "read_padded",
    "read_whole",
    "recorded_path",
    "refuse_non_finite",
    "replaced_input",
    "rgb_colorinterp",
    "same_file",
    "source_files",
    "select_bands",
    "verify_geotiff",
    "with_nodata",
    "GeoTiff",
    "write_geotiffs",
]
