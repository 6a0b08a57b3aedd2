"""`fusion pansharpen PAN MS -o OUT`: PAN + MS (or PAN + HSI) -> fused GeoTIFF on the PAN grid."""

from __future__ import annotations

from typing import Any

import typer

from fusion_cli.cli.common import register_fuse_command


def _run(pan: Any, ms: Any, out: Any, **kwargs: Any) -> Any:
    from fusion_cli.pipeline import pansharpen

    return pansharpen(pan, ms, out, **kwargs)


def register(app: typer.Typer) -> None:
    register_fuse_command(
        app,
        "pansharpen",
        """Fuse a PAN and an MS (or hyperspectral) image into a high-resolution product on the PAN grid.

        The pair is related through the geotransforms (same CRS, integer ratio, sub-pixel offsets
        honoured), fused in overlapping blended tiles in bounded memory, and written atomically as a
        tiled, compressed GeoTIFF over the area both inputs cover.""",
        hi_help="PAN GeoTIFF (high resolution).",
        lo_help="MS or HS GeoTIFF (low resolution).",
        run=_run,
    )
