"""`fusion metrics FUSED --ref GT --ratio 4` / `fusion metrics FUSED --pan PAN --ms MS`: quality indices."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fusion_cli.cli.common import MetricOpt, OutputOpt, echo_json, parse_bands, table_console

HELP = """Quality indices of a fused product, with the conventions of the MATLAB toolbox of Vivone et al.
(the version in DLPan-Toolbox), so the numbers compare with published tables.

\b
Reduced resolution (--ref GT, a reference on the product's grid; --ratio when the product does
not record it):
  Images are evaluated in DN, not rescaled. --cut K keeps rows/cols [K-1, H-K) of both images (the
  toolbox's asymmetric cut; 21 reproduces DLPan tables, 11 older ones). --clip-bits L clips the
  product to [0, 2^L] first.
  Q2n (shown as Q4/Q8): hypercomplex UIQI on 32x32 blocks (block = shift), bottom/right padded by
    symmetric mirroring, both images rounded to uint16 (half away from zero, saturating) when the
    reference holds whole-number DN within 0..65535 (--uint16/--no-uint16 decide otherwise;
    fractional data such as reflectance and signed DN with negative values are not rounded, a
    deviation from the toolbox that keeps them meaningful), zero
    bands up to a power of two, mean over all blocks.
  Q: band mean of the Wang-Bovik UIQI on a 32x32 sliding window, 'valid' positions.
  SAM: degrees, mean over pixels; pixels where either spectrum has zero norm are left out.
  ERGAS: (100/ratio) sqrt(mean_b MSE_b / mean(GT_b)^2), ratio = PAN/MS pixel-size ratio (4, not 1/4).
  SCC: Sobel gradient magnitudes of the image without its 1-pixel frame (zero padding), correlated
    over all pixels and bands without mean removal.
  PSNR, SSIM (HISR convention): per band, averaged; peak --psnr-peak: a number (1, 255, 2047 ...),
    dnmax (the reference's maximum) or band-max (each band's maximum); SSIM Gaussian 11 / 1.5,
    K = (0.01, 0.03). RMSE in DN.

\b
Full resolution (--pan PAN --ms MS, or nothing for a product written by fusion: its FUSION_PAN /
FUSION_MS tags name them; the ratio is taken from the pixel sizes):
  The MS is interpolated to the PAN grid (23-tap for power-of-two ratios, bicubic otherwise).
  D_lambda, D_s (QNR): UIQI on non-overlapping 32x32 blocks (full blocks only), p = q = 1; D_s
    compares UIQI(fused band, PAN) with UIQI(MS band, PAN degraded by bicubic 1/ratio and back).
    QNR = (1 - D_lambda)(1 - D_s).
  D_lambda^K (Khan) = 1 - Q2n(interpolated MS, product low-passed by the sensor MTF); --sensor picks
    the Nyquist gains (without it: the sensor a fusion product records it was fused for, else the
    generic 0.3; --sensor generic forces those). HQNR = (1 - D_lambda^K)(1 - D_s).
  Published "QNR" columns of DLPan tables are HQNR.
  HPC (sharpness): per band, the correlation of the product's high-pass with the PAN's, the
    high-pass being the image minus its low-pass by that band's sensor MTF at the ratio (the detail
    the MS does not have); band mean. PAN copied into every band scores 1; higher is sharper.

\b
Nodata: pixels invalid in any input (raster masks/nodata, --nodata V for unflagged values such as
zero borders) are left out: of SAM/ERGAS/PSNR/RMSE pixel means, of Q/SSIM windows and Q2n/QNR blocks
that touch them, of SCC sums near them; at full resolution also every pixel whose filters (MS
interpolation, the PAN's low-pass, the MTF) reach one. What they hold never matters. The toolbox
itself has no masks.

\b
Bands: a product fused with --bands 3,2,1,4 is compared with those bands of the reference (or MS),
in that order; --bands here says otherwise. JSON writes a NaN or infinite index as null.
"""


def register(app: typer.Typer) -> None:
    @app.command("metrics", help=HELP)
    def metrics(
        # str, not Path: GDAL paths (/vsizip//a.zip/x.tif, /vsicurl/https://...) need their `//`
        fused: str = typer.Argument(..., help="Fused product (GeoTIFF or any raster GDAL reads)."),
        ref: str | None = typer.Option(None, "--ref", help="Reference (ground truth) on the product's grid."),
        pan: str | None = typer.Option(
            None, "--pan", help="PAN the product was made from (full resolution)."
        ),
        ms: str | None = typer.Option(None, "--ms", help="Low-resolution MS the product was made from."),
        ratio: int | None = MetricOpt.ratio,
        cut: int = MetricOpt.cut,
        clip_bits: int | None = MetricOpt.clip_bits,
        uint16: bool | None = MetricOpt.uint16,
        per_band: bool = typer.Option(False, "--per-band", help="Also show per-band values."),
        psnr_peak: str = MetricOpt.psnr_peak,
        sensor: str | None = MetricOpt.sensor,
        sensor_bands: str | None = MetricOpt.sensor_bands,
        nodata: float | None = MetricOpt.nodata,
        bands: str | None = typer.Option(
            None,
            "--bands",
            help="1-based bands of the reference (or MS) that the product's bands are, in its order, "
            "e.g. 3,2,1,4. Default: the --bands the product was fused with (its FUSION_PARAMS tag), "
            "so a reference in the MS's own order; give 1,2,3,4 for one already in the product's order.",
        ),
        block: int = typer.Option(32, "--block", min=4, help="Block / window size of Q2n, Q and QNR."),
        quiet: bool = OutputOpt.quiet,
        as_json: bool = OutputOpt.json_out,
        csv: Path | None = typer.Option(None, "--csv", help="Append the result as a row to this CSV file."),
    ) -> None:
        from fusion_cli.assess import EvalOptions, check_csv, evaluate, flatten, write_csv
        from fusion_cli.metrics import parse_peak

        peak = parse_peak(psnr_peak)
        opts = EvalOptions(
            ratio=ratio,
            cut=cut,
            clip_bits=clip_bits,
            round_uint16=uint16,
            per_band=per_band,
            block=block,
            psnr_peak=peak,
            sensor=sensor,
            sensor_bands=parse_bands(sensor_bands, "--sensor-bands"),
            nodata=nodata,
            bands=parse_bands(bands),
        )
        if csv is not None:
            check_csv(csv, (fused, ref, pan, ms))
        result = evaluate(fused, ref, pan, ms, opts)
        if csv is not None:
            write_csv([flatten(result)], csv, append=True)
        if as_json:
            echo_json(result)
        else:
            _print(result)


def _print(result: dict) -> None:
    from fusion_cli.metrics.table import metrics

    console = table_console()
    mode = "reduced resolution" if result["mode"] == "reduced" else "full resolution (no reference)"
    table = Table(title=f"{Path(result['product']).name}: {mode}")
    table.add_column("index")
    table.add_column("value", justify="right")
    table.add_column("convention", style="dim")
    block = result.get("settings", {}).get("block")
    for m in metrics():
        if m.name in result:
            label = result.get("q2n_name", m.name) if m.name == "Q2n" else m.name
            table.add_row(label, f"{result[m.name]:.4f}", m.note.format(block=block))
    console.print(table)
    per_band = result.get("per_band")
    if per_band:
        bands = Table(title="per band")
        bands.add_column("band", justify="right")
        names = list(per_band)
        for n in names:
            bands.add_column(n, justify="right")
        for i in range(len(per_band[names[0]])):
            bands.add_row(str(i + 1), *(f"{per_band[n][i]:.4f}" for n in names))
        console.print(bands)
    compared = result.get("bands_compared")
    if compared and compared != list(range(1, len(compared) + 1)):
        what = "reference" if result["mode"] == "reduced" else "MS"
        console.print(
            f"compared with bands {','.join(map(str, compared))} of the {what}, in that order "
            "(the product's bands; --bands says otherwise)"
        )
    if result.get("valid_fraction", 1.0) < 1.0:
        console.print(f"valid pixels: {100 * result['valid_fraction']:.1f} % (nodata left out)")
    if result.get("scored_fraction", 1.0) < result.get("valid_fraction", 1.0):
        share = 100 * result["scored_fraction"]
        console.print(f"scored pixels: {share:.1f} % (those whose filters reach nodata left out)")
