"""`fusion report DIR_OR_FILES -o report/`: evaluate many products into CSV, JSON and a static HTML page."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fusion_cli.cli.common import MetricOpt, OutputOpt, echo_json, parse_bands
from fusion_cli.cli.progress import progress_bar
from fusion_cli.errors import FusionError

HELP = """Evaluate many fused products at once and write REPORT/metrics.csv, REPORT/metrics.json and
REPORT/index.html (open it in a browser, no server needed): a summary table with the best value of each
index in bold, then per product true-colour quicklooks of the inputs and the product side by side (the
product shown with the stretch of its reference or MS, so colours compare), a centred zoom crop,
error and SAM maps, and per-band charts.

\b
What each product is judged against, in order of precedence:
  --manifest M.csv   columns: product, then ref (reduced resolution) or pan, ms (full resolution);
                     optional label; relative paths are read from the manifest's folder.
  --ref GT           every product against this reference (e.g. several methods on one scene).
  --pan P --ms M     every product in full resolution against these inputs.
  (nothing)          the product's FUSION_PAN / FUSION_MS tags, written by `fusion` (full resolution).
Folders are scanned for rasters (.tif, .tiff, .vrt, .img, .jp2; not recursive); the reference, PAN and
MS files themselves are skipped. Any raster may be a GDAL virtual path (/vsizip/a.zip/x.tif,
/vsicurl/https://...; a folder inside an archive is not listed: name its files). Index conventions
are those of `fusion metrics` (see its --help); DLPan's published "QNR" is HQNR. A product that fails
gets its one-line reason in the report; the exit code is then 1.
"""


def register(app: typer.Typer) -> None:
    @app.command("report", help=HELP)
    def report(
        # str, not Path: GDAL paths (/vsizip//a.zip/x.tif, /vsicurl/https://...) need their `//`
        inputs: list[str] = typer.Argument(
            None, help="Products (files, GDAL paths such as /vsizip/...) or folders of products."
        ),
        out: Path = typer.Option(..., "-o", "--out", help="Report folder (created)."),
        manifest: Path | None = typer.Option(None, "--manifest", help="CSV: product,ref or product,pan,ms."),
        ref: str | None = typer.Option(
            None, "--ref", help="Reference for every product (reduced resolution)."
        ),
        pan: str | None = typer.Option(None, "--pan", help="PAN for every product (full resolution)."),
        ms: str | None = typer.Option(None, "--ms", help="Low-resolution MS for every product."),
        ratio: int | None = MetricOpt.ratio,
        cut: int = MetricOpt.cut,
        clip_bits: int | None = MetricOpt.clip_bits,
        uint16: bool | None = MetricOpt.uint16,
        psnr_peak: str = MetricOpt.psnr_peak,
        sensor: str | None = MetricOpt.sensor,
        sensor_bands: str | None = MetricOpt.sensor_bands,
        nodata: float | None = MetricOpt.nodata,
        rgb: str | None = typer.Option(
            None,
            "--rgb",
            help="Display bands, 1-based, e.g. 5,3,2 (default: the bands the product names red, green and "
            "blue, or their wavelengths; else by band count).",
        ),
        zoom: int = typer.Option(256, "--zoom", min=16, help="Side of the centred zoom crop (pixels)."),
        quiet: bool = OutputOpt.quiet,
        as_json: bool = OutputOpt.json_out,
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report."),
    ) -> None:
        from fusion_cli.assess import EvalOptions
        from fusion_cli.report import build_report, collect_items

        bands = parse_bands(rgb, "--rgb")
        if bands is not None and len(bands) != 3:
            raise FusionError(f"--rgb needs three band numbers like 5,3,2, got {rgb}")
        from fusion_cli.metrics import parse_peak

        peak = parse_peak(psnr_peak)
        opts = EvalOptions(
            ratio=ratio,
            cut=cut,
            clip_bits=clip_bits,
            round_uint16=uint16,
            psnr_peak=peak,
            sensor=sensor,
            sensor_bands=parse_bands(sensor_bands, "--sensor-bands"),
            nodata=nodata,
        )
        items = collect_items(list(inputs or []), ref, pan, ms, manifest)
        display = None if bands is None else (bands[0] - 1, bands[1] - 1, bands[2] - 1)
        with progress_bar("report", not quiet) as update:
            # build_report calls progress(i, n, name) before product i: i products are done
            progress = None if update is None else (lambda i, n, name: update(i, n, f"report: {name}"))
            summary = build_report(
                items, out, opts, rgb=display, zoom=zoom, progress=progress, overwrite=overwrite,
                sources=[manifest] if manifest is not None else [],
            )  # fmt: skip
        for failed in summary["errors"]:  # errors print whatever -q says; the report holds them too
            typer.echo(f"Error: {failed['name']}: {failed['error']}", err=True)
        if as_json:
            echo_json(summary)
        elif not quiet:
            console = Console(stderr=True, highlight=False)
            console.print(
                f"{summary['products']} product(s), {summary['failed']} failed: open {summary['html']}"
            )
        if summary["failed"]:
            raise typer.Exit(1)
