"""`fusion simulate`: Wald-protocol reduced-resolution pair from a PAN/MS pair."""

from __future__ import annotations

from pathlib import Path

import typer

from fusion_cli.cli.common import Choices, OutputOpt, echo_json, parse_bands, sensor_bands_option
from fusion_cli.cli.progress import progress_bar


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate(
        # str, not Path: GDAL paths (/vsizip//a.zip/x.tif) need their `//`
        pan: str = typer.Argument(..., help="PAN GeoTIFF."),
        ms: str = typer.Argument(..., help="MS (or HS) GeoTIFF at its own resolution."),
        out: Path = typer.Option(
            ..., "-o", "--out", help="Output folder for pan_lr.tif, ms_lr.tif, ms_ref.tif."
        ),
        sensor: str = Choices.sensor.option("generic", "--sensor", help="Sensor of the MTF table."),
        ratio: int | None = typer.Option(
            None, "--ratio", min=2, help="PAN/MS ratio, 2 or more (default: from the image sizes)."
        ),
        pan_mtf: bool = typer.Option(
            False,
            "--pan-mtf",
            help="Degrade a one-band PAN with its MTF gain instead of bicubic (imresize) reduction.",
        ),
        dtype: str = Choices.simulate_dtype.option(
            "float32", "--dtype", help="float32 (unrounded DN, as the toolbox) or source (the input's type)."
        ),
        sensor_bands: str | None = sensor_bands_option("--bands"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
        quiet: bool = OutputOpt.quiet,
        json_out: bool = OutputOpt.json_out,
    ) -> None:
        """Degrade PAN and MS by the ratio with the sensor's MTF (Wald protocol) and write the reduced
        pair plus the original MS as the reference: MS bands Gaussian-filtered to the sensor's Nyquist
        gain and sampled [r//2::r]; PAN reduced by bicubic imresize (or its MTF with --pan-mtf).
        Geotransforms keep the origin with pixel sizes times the ratio, so `fusion pansharpen` and
        `fusion metrics --ref` run on the outputs unchanged."""
        from fusion_cli.wald import simulate_files

        with progress_bar("simulate", not quiet) as update:
            res = simulate_files(
                pan, ms, out, sensor=sensor, ratio=ratio, pan_mtf=pan_mtf, dtype=dtype,  # type: ignore[arg-type]
                overwrite=overwrite, sensor_bands=parse_bands(sensor_bands, "--sensor-bands"),
                progress=update,
            )  # fmt: skip
        summary = {
            "pan_lr": str(res.pan), "ms_lr": str(res.ms), "ref": str(res.ref),
            "ratio": res.ratio, "sensor": res.sensor, "pan_mode": res.pan_mode,
        }  # fmt: skip
        if json_out:
            echo_json(summary)
        elif not quiet:
            typer.echo(
                f"wrote {res.pan}, {res.ms}, {res.ref} (ratio {res.ratio}, sensor {res.sensor})", err=True
            )
