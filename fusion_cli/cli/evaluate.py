"""`fusion evaluate`: reduced- and full-resolution comparison of methods on one or many scenes."""

from __future__ import annotations

from pathlib import Path

import typer

from fusion_cli.cli.common import (
    Choices,
    OutputOpt,
    echo_json,
    parse_bands,
    sensor_bands_option,
    table_console,
)
from fusion_cli.cli.progress import progress_bar


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        # str, not Path: GDAL paths (/vsizip//a.zip/x.tif, /vsicurl/https://...) need their `//`
        inputs: list[str] = typer.Argument(
            ...,
            help="PAN MS (two rasters: files or GDAL paths such as /vsizip/a.zip/pan.tif), a folder of "
            "PAN/MS pairs, or a CSV manifest (pan,ms[,id]).",
        ),
        methods: str = typer.Option(
            ...,
            "--methods",
            help="Comma-separated: fusionmamba:MODEL (registry name or weights file, e.g. the official "
            ".pth), classical names (exp, brovey, gsa, pca, mtf-glp, mtf-glp-hpm, mtf-glp-fs, bdsd-pc, "
            "mtf-glp-hs) "
            "or 'classical' for all of them.",
        ),
        out: Path = typer.Option(..., "-o", "--out", help="Output folder for the tables and the products."),
        sensor: str = Choices.sensor.option(
            "generic", "--sensor", help="Sensor MTF table for the Wald protocol and HQNR."
        ),
        ratio: int | None = typer.Option(
            None, "--ratio", min=2, help="PAN/MS ratio, 2 or more (default: from the image sizes)."
        ),
        pan_mtf: bool = typer.Option(
            False, "--pan-mtf", help="Degrade a one-band PAN with its MTF, not bicubic."
        ),
        cut: int = typer.Option(0, "--cut", help="Toolbox border cut K for reduced-resolution indices."),
        clip_bits: int | None = typer.Option(None, "--clip-bits", help="Clip products to [0, 2^L] first."),
        no_full: bool = typer.Option(False, "--no-full", help="Skip the full-resolution indices."),
        device: str = Choices.device.option("auto", "--device", help="Where networks run."),
        tile: int = typer.Option(512, "--tile", help="Pipeline tile side (PAN px); larger = fewer windows."),
        block: int = typer.Option(
            32, "--block", min=4, help="Q2n, Q and QNR block size (toolbox: 32; less for small scenes)."
        ),
        bands: str | None = typer.Option(
            None,
            "--bands",
            help="1-based MS bands every method fuses, in model order (e.g. 3,2,1,4,5,6); the reference "
            "and full-resolution MS follow.",
        ),
        sensor_bands: str | None = sensor_bands_option(),
        keep: bool = typer.Option(
            True, "--keep/--no-keep", help="Keep the fused products under OUT/products."
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace an earlier evaluation's tables in OUT (and its products)."
        ),
        quiet: bool = OutputOpt.quiet,
        json_out: bool = OutputOpt.json_out,
    ) -> None:
        """Compare methods the way published tables do. For each scene: Wald's protocol (MS and PAN
        degraded by the ratio with the sensor MTF, as `fusion simulate`), every method fuses the reduced
        pair and is scored against the original MS (Q2n, Q, SAM, ERGAS, SCC); then every method fuses the
        original pair and gets the no-reference indices (D_lambda, D_s, QNR, D_lambda^K, HQNR) and the
        sharpness index HPC (high-pass correlation with the PAN). Writes
        results.csv (per scene), summary.csv, results.json and results.md (mean ± std over scenes) into
        OUT, with wall-clock seconds per fusion."""
        from rich.table import Table

        from fusion_cli.evaluate import evaluate as run
        from fusion_cli.evaluate import find_scenes, parse_methods, table_cells

        specs = parse_methods(methods)
        band_list = parse_bands(bands)
        scenes = find_scenes(inputs)
        with progress_bar("evaluate (fusions)", not quiet) as update:
            res = run(
                scenes, specs, out, sensor=sensor, ratio=ratio, pan_mtf=pan_mtf, cut=cut,
                clip_bits=clip_bits, full_resolution=not no_full, device=device, keep_products=keep,
                tile=tile, bands=band_list, block=block, progress=update, sources=inputs,
                sensor_bands=parse_bands(sensor_bands, "--sensor-bands"),
                overwrite=overwrite,
            )  # fmt: skip
        if json_out:
            echo_json({"summary": res.summary, "files": res.files})
            return
        header, cells = table_cells(res.summary)
        table = Table(title=f"fusion evaluate: {len(scenes)} scene(s), sensor {sensor}")
        for h in header:
            table.add_column(h, justify="left" if h == "Method" else "right")
        for line in cells:
            table.add_row(*line)
        table_console().print(table)
        if not quiet:
            typer.echo(
                f"wrote {res.files['markdown']}, {res.files['summary_csv']}, {res.files['json']}", err=True
            )
