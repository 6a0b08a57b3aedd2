"""`fusion hisr HSI MSI -o OUT`: low-resolution HSI + high-resolution MSI -> HSI on the MSI grid."""

from __future__ import annotations

from typing import Any

import typer

from fusion_cli.cli.common import register_fuse_command


def _run(hsi: Any, msi: Any, out: Any, **kwargs: Any) -> Any:
    from fusion_cli.pipeline import hisr

    return hisr(hsi, msi, out, **kwargs)


def register(app: typer.Typer) -> None:
    register_fuse_command(
        app,
        "hisr",
        """Hyperspectral super-resolution: fuse a low-resolution HSI with a high-resolution MSI.

        The output has the HSI's bands on the MSI grid (over the area both cover); tiling, nodata,
        alignment and output options are those of `fusion pansharpen`. Without --model, --weights
        or --method it runs the shipped HISR model (hyperion_hisr). mtf-glp-hs regresses each HSI
        band on all MSI bands; the other classical methods use the MSI's band mean as their PAN.""",
        hi_help="MSI GeoTIFF (high resolution).",
        lo_help="HSI GeoTIFF (low resolution).",
        run=_run,
        hi_first=False,
        metavars=("HSI", "MSI"),
    )
