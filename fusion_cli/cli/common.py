"""Option helpers shared by several commands (parsing only, no numerics)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from fusion_cli import choices, jsonout, notices
from fusion_cli.cli.progress import show_progress, tile_progress
from fusion_cli.errors import FusionError
from fusion_cli.sensors import canonical_sensor


def echo_json(payload: dict[str, Any]) -> None:
    """Machine-readable summary on stdout (progress and messages go to stderr), with every warning the
    command gave in its `warnings` (those of a fusion run are in its summary already)."""
    said = payload.get("warnings", [])
    payload = {**payload, "warnings": [*said, *(m for m in notices.so_far() if m not in said)]}
    sys.stdout.write(jsonout.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


def _hold_messages(value: bool) -> bool:
    """-q: warnings are not printed as they come (a --json document lists them either way)."""
    if value:
        notices.hold()
    return value


class OutputOpt:
    """`-q` and `--json`, the same on every command: --json puts the result on stdout and leaves the
    progress on stderr (a pipe reads stdout only); -q silences progress and messages."""

    quiet = typer.Option(
        False,
        "--quiet",
        "-q",
        help="No progress or messages on stderr (errors still print).",
        callback=_hold_messages,
    )
    json_out = typer.Option(
        False, "--json", help="Print the result as JSON on stdout (progress stays on stderr; -q hides it)."
    )


def table_console(stderr: bool = False) -> Any:
    """A rich console for tables: a terminal's own width; piped or redirected, wide enough that no
    column is cut (rich assumes 80 columns there and would print `0.…` for numbers)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        tty = False
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=None if tty else 4096)


def parse_creation_options(items: list[str] | None) -> dict[str, str] | None:
    """`--co ZLEVEL=9 --co BLOCKXSIZE=512` -> {"ZLEVEL": "9", "BLOCKXSIZE": "512"} (GDAL's syntax)."""
    if not items:
        return None
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key.strip()) or not value.strip():
            raise FusionError(f"--co expects KEY=VALUE, a GTiff creation option like ZLEVEL=9, got {item!r}")
        options[key.strip().upper()] = value.strip()
    return options


def parse_bands(text: str | None, option: str = "--bands") -> list[int] | None:
    """`--bands 1,2,3,5` (1-based, as GDAL) -> [1, 2, 3, 5]; `option` names it in errors."""
    if text is None:
        return None
    try:  # an empty item ("1,,3") is refused: it may be a band left out by a typo
        bands = [int(t) for t in text.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{option}: expected comma-separated band numbers like 1,2,3,5, got {text!r}"
        ) from None
    if not bands or min(bands) < 1:
        raise typer.BadParameter(f"{option}: band numbers start at 1")
    return bands


class Choice:
    """A fixed set of values of an option: `--help` shows them as the metavar, shell completion lists
    them, and a value outside them is a usage error (one line, exit 2) before any work. The value
    reaches the library as the user typed it (the library normalises case and aliases itself)."""

    def __init__(
        self,
        what: str,
        values: Sequence[str],
        *,
        fold_case: bool = False,
        also: Callable[[str], bool] | None = None,
        shown: Sequence[str] | None = None,
        completions: Sequence[str] | None = None,
    ) -> None:
        self.what = what  # the error says "unknown <what>"
        self.values = tuple(values)
        self.fold_case = fold_case
        self.also = also  # accepts values beyond the list (cuda:N, sensor aliases)
        self.shown = tuple(shown or values)
        self.completions = tuple(completions or self.shown)

    def parse(self, text: str) -> str:
        key = text.strip().lower() if self.fold_case else text
        if key in self.values or (self.also is not None and self.also(text)):
            return text
        raise typer.BadParameter(f"unknown {self.what} {text!r}: use one of {', '.join(self.shown)}")

    def complete(self, incomplete: str) -> list[str]:
        start = incomplete.lower() if self.fold_case else incomplete
        return [v for v in self.completions if v.startswith(start)]

    def option(self, default: Any, *decls: str, help: str, **kwargs: Any) -> Any:
        return typer.Option(
            default, *decls, help=help, parser=self.parse, autocompletion=self.complete,
            metavar="[" + "|".join(self.shown) + "]", **kwargs,
        )  # fmt: skip


def _known_sensor(text: str) -> bool:
    try:
        canonical_sensor(text)
    except FusionError:
        return False
    return True


class Choices:
    """Every enumerated option's value set, defined once from the library's registries."""

    method = Choice("method", choices.METHODS, fold_case=True)
    # canonical names in the help; aliases (WorldView-3, l8, quickbird ...) accepted and completed
    sensor = Choice(
        "sensor", choices.SENSORS, also=_known_sensor,
        completions=choices.SENSORS + choices.sensor_aliases(),
    )  # fmt: skip
    device = Choice(
        "device", choices.DEVICES, also=lambda t: re.fullmatch(r"cuda:\d+", t) is not None,
        shown=(*choices.DEVICES, "cuda:N"), completions=(*choices.DEVICES, "cuda:0"),
    )  # fmt: skip
    precision = Choice("precision", choices.PRECISIONS)
    compress = Choice("compression", choices.COMPRESSIONS, fold_case=True)
    ms_phase = Choice("MS phase", choices.MS_PHASES)
    task = Choice("task", choices.TASKS)
    simulate_dtype = Choice("dtype", choices.SIMULATE_DTYPES)


SENSOR_BANDS_HELP = (
    "Which of --sensor's bands the MS file holds, one number per MS band in file order (1-based, in the "
    "sensor's order, which `fusion info` lists: WV3 2,3,5,7 = blue, green, red, NIR1); picks each band's "
    "MTF gain. Default: all the sensor's bands in order, or blue, green, red, NIR1 for a 4-band MS of an "
    "8-band sensor."
)


def sensor_bands_option(*decls: str) -> Any:
    """The --sensor-bands option (`simulate` also accepts its old name, --bands)."""
    return typer.Option(None, "--sensor-bands", *decls, help=SENSOR_BANDS_HELP, show_default=False)


class MetricOpt:
    """Index conventions shared by `fusion metrics` and `fusion report` (one definition each)."""

    ratio = typer.Option(
        None,
        "--ratio",
        min=1,
        help="PAN/MS pixel-size ratio (e.g. 4). Default: the ratio the product's FUSION_PARAMS tag "
        "records, else the pixel sizes; required with a reference for a product without that tag.",
    )
    cut = typer.Option(0, "--cut", min=0, help="Border cut K: keep rows/cols [K-1, H-K).")
    clip_bits = typer.Option(None, "--clip-bits", min=1, max=32, help="Clip products to [0, 2^L] first.")
    uint16 = typer.Option(
        None,
        "--uint16/--no-uint16",
        help="Round both images to uint16 for Q2n and D_lambda^K, as the toolbox does. Default: when "
        "the reference (full resolution: the MS) holds whole-number DN within 0..65535 (an integer "
        "type, or floats that are all integral); reflectance would keep two or three grey levels, "
        "negative DN would be clipped to 0.",
        show_default=False,
    )
    psnr_peak = typer.Option("dnmax", "--psnr-peak", help="PSNR/SSIM peak: a number, dnmax or band-max.")
    sensor = Choices.sensor.option(
        None,
        "--sensor",
        help="Sensor MTF for D_lambda^K and HPC (without it: the sensor the product records it was fused "
        "for, else generic gains; --sensor generic forces those).",
    )
    sensor_bands = sensor_bands_option()
    nodata = typer.Option(None, "--nodata", help="Extra nodata value (all bands equal to it).")


class FuseOpt:
    """The fusion options shared by `pansharpen`, `hisr` and `batch`: one definition each (Typer
    option objects are plain metadata, so several commands can use the same one as a default)."""

    model = typer.Option(None, "--model", help="Shipped model name (`fusion info` lists them).")
    weights = typer.Option(
        None, "--weights", help="Weights file: card + .safetensors, or an official .pth state_dict."
    )
    method = Choices.method.option(
        None, "--method", help="Classical method instead of a network (each is listed below with its paper)."
    )
    sensor = Choices.sensor.option(
        None, "--sensor", help="Sensor (MTF table) for classical methods and metrics."
    )
    bands = typer.Option(
        None, "--bands", help="1-based bands of the low-resolution input to use, in model order: 1,2,3,5."
    )
    sensor_bands = sensor_bands_option()
    dn_max = typer.Option(
        None, "--dn-max", help="Largest valid DN (e.g. 2047 for 11-bit); default from the model/NBITS."
    )
    tile = typer.Option(
        None,
        "--tile",
        help="Tile side in output pixels (default: 512 for classical methods; for networks 256 on a GPU, "
        "on a CPU 768 for narrow models such as landsat and vhr4, else 512; a scene up to 1.25x that is "
        "one window).",
    )
    overlap = typer.Option(
        None,
        "--overlap",
        help="Blend zone between tiles, output pixels [default: 32 for networks, 0 for classical methods, "
        "whose tiles agree where they meet].",
    )
    batch = typer.Option(
        4,
        "--batch",
        help="Tiles gathered per fuser call (a network runs them 1 per pass on a CPU, up to 8 on a GPU).",
    )
    device = Choices.device.option("auto", "--device", help="Where the network runs.")
    precision = Choices.precision.option("fp32", "--precision", help="Network arithmetic (bf16, fp16: GPU).")
    threads = typer.Option(None, "--threads", help="CPU threads for inference.")
    dtype = typer.Option(None, "--dtype", help="Output dtype (default: the input's, e.g. uint16).")
    compress = Choices.compress.option("deflate", "--compress", help="GTiff compression of the product.")
    co = typer.Option(
        None,
        "--co",
        help="GTiff creation option KEY=VALUE, repeatable (e.g. --co ZLEVEL=9 --co BLOCKXSIZE=512); "
        "replaces the default of that name. An option GTiff does not know (a misspelt name), or a setting "
        "of the product itself (DTYPE, NODATA, CRS...: see --dtype, --nodata), is refused before any work.",
    )
    cog = typer.Option(False, "--cog", help="Write a Cloud-Optimized GeoTIFF with overviews.")
    overwrite = typer.Option(False, "--overwrite", help="Replace an existing output.")
    coregister = typer.Option(
        False, "--coregister", help="Apply the measured sub-pixel shift (always measured and reported)."
    )
    ms_phase = Choices.ms_phase.option(
        "toolbox",
        "--ms-phase",
        help="Where the upsampled MS sits at even ratios: toolbox (the reference toolbox's and published "
        "tables' convention: its content half a PAN pixel right of and below the geotransform) or "
        "geometric (on the geotransform, as GDAL places it; one cubic resampling of the MS more). Inputs "
        "without georeferencing are always taken in the toolbox's phase.",
    )
    zero_nodata = typer.Option(False, "--zero-nodata", help="Treat 0 as nodata (unflagged collars).")
    nodata = typer.Option(
        None,
        "--nodata",
        help="Input nodata value of both inputs, on top of their own (GDAL's meaning: a band equal to it "
        "is invalid); the product gets it as its nodata. For files without a nodata flag.",
        show_default=False,
    )
    pan_nodata = typer.Option(
        None, "--pan-nodata", help="Nodata value of the PAN (hisr: the MSI) only; overrides --nodata."
    )
    ms_nodata = typer.Option(
        None, "--ms-nodata", help="Nodata value of the MS (hisr: the HSI) only; overrides --nodata."
    )
    quicklook = typer.Option(False, "--quicklook", help="Also write a true-colour PNG beside each output.")
    reproject = typer.Option(
        False, "--reproject", help="Warp an MS in another CRS onto the PAN's CRS and grid (GDAL, cubic)."
    )
    stats_mpx = typer.Option(
        None,
        "--stats-mpx",
        help="Classical methods: estimate their global statistics from at most N PAN megapixels of "
        "tiles spread evenly over the scene (faster on big scenes; default: the whole scene, exact).",
    )
    scan_memory = typer.Option(
        None,
        "--scan-memory",
        help="Networks: how many tokens a scan remembers (default: the model card's; the shipped "
        "models use 20, so tiles match the one-piece product within 1-2 DN 96 px or more from the scene's "
        "edges; nearer, each window's scans wrap differently). 0: unbounded, as trained "
        "by the paper and in the official checkpoint.",
    )
    ensemble = typer.Option(
        None,
        "--ensemble/--no-ensemble",
        help="Networks: also fuse each window transposed and average the two (better quality, twice "
        "the time). Default: the model card's (on for landsat and vhr4).",
        show_default=False,
    )
    max_pixels = typer.Option(
        None,
        "--max-pixels",
        help="Largest product in PAN-grid pixels, checked before any work [default: 1e10]; a guard "
        "against a mistaken or sparse input heading for a terabyte product.",
        show_default=False,
    )
    quiet = OutputOpt.quiet
    json_out = OutputOpt.json_out


def input_nodata(nodata: float | None, pan: float | None, ms: float | None) -> dict[str, float | None]:
    """`--nodata` for both inputs, `--pan-nodata` / `--ms-nodata` for one: FuseOptions fields."""
    return {"pan_nodata": nodata if pan is None else pan, "ms_nodata": nodata if ms is None else ms}


def classical_methods_help() -> str:
    """The epilog of the fusion commands: every `--method` with what it does and its paper
    (`classical.describe`), one paragraph each (click rewraps paragraphs, keeps the breaks)."""
    from fusion_cli.classical import METHODS, describe

    items = "\n\n".join(f"{name}: {describe(name)}" for name in METHODS)
    return f"Classical methods (--method NAME):\n\n{items}"


def lazy_epilog(source: Callable[[], str]) -> type[TyperCommand]:
    """A command class whose epilog is `source()`, built only when the help is shown (the methods'
    descriptions import torch, which `fusion` does not load to start up)."""

    class Command(TyperCommand):
        @property  # type: ignore[override]
        def epilog(self) -> str:
            return source()

        @epilog.setter
        def epilog(self, value: str | None) -> None:
            pass  # click's constructor sets it; the source is what counts

    return Command


def pan_bands_option(high_res: str) -> Any:
    """The --pan-bands option of `pansharpen`, `hisr` and `batch` (`high_res`: what the high-resolution
    input is called there)."""
    return typer.Option(
        None,
        "--pan-bands",
        help=f"1-based bands of the {high_res} to use, in the order a model expects (default: "
        "all but an alpha band), e.g. six of an ALI MSI's nine for hyperion_hisr.",
    )


def register_fuse_command(
    app: typer.Typer,
    name: str,
    doc: str,
    hi_help: str,
    lo_help: str,
    run: Callable[..., Any],
    hi_first: bool = True,
    metavars: tuple[str, str] = ("PAN", "MS"),
) -> None:
    """Register a fusion command (`pansharpen`, `hisr`) with the options they share.

    The command takes two positional inputs (help texts `hi_help`, `lo_help` in command-line order
    as given by `hi_first`) and calls `run(first, second, out, model=, weights=, method=, sensor=,
    **FuseOptions fields)`, which returns a `FuseSummary`.
    """
    first_help, second_help = (hi_help, lo_help) if hi_first else (lo_help, hi_help)
    high_res = metavars[0] if hi_first else metavars[1]  # the PAN, or HISR's MSI

    # Inputs stay strings: GDAL paths such as /vsizip//data/a.zip/pan.tif need their `//`, which Path folds.
    def command(
        first: str = typer.Argument(..., help=first_help, show_default=False, metavar=metavars[0]),
        second: str = typer.Argument(..., help=second_help, show_default=False, metavar=metavars[1]),
        # a string too: "-o newname/" keeps the slash that says a folder was meant (Path drops it)
        out: str = typer.Option(..., "-o", "--out", help="Output GeoTIFF (on the high-resolution grid)."),
        model: str | None = FuseOpt.model,
        weights: Path | None = FuseOpt.weights,
        method: str | None = FuseOpt.method,
        sensor: str | None = FuseOpt.sensor,
        bands: str | None = FuseOpt.bands,
        sensor_bands: str | None = FuseOpt.sensor_bands,
        pan_bands: str | None = pan_bands_option(high_res),
        dn_max: float | None = FuseOpt.dn_max,
        tile: int | None = FuseOpt.tile,
        overlap: int | None = FuseOpt.overlap,
        batch: int = FuseOpt.batch,
        device: str = FuseOpt.device,
        precision: str = FuseOpt.precision,
        threads: int | None = FuseOpt.threads,
        dtype: str | None = FuseOpt.dtype,
        compress: str = FuseOpt.compress,
        co: list[str] | None = FuseOpt.co,
        cog: bool = FuseOpt.cog,
        overwrite: bool = FuseOpt.overwrite,
        coregister: bool = FuseOpt.coregister,
        ms_phase: str = FuseOpt.ms_phase,
        zero_nodata: bool = FuseOpt.zero_nodata,
        nodata: float | None = FuseOpt.nodata,
        pan_nodata: float | None = FuseOpt.pan_nodata,
        ms_nodata: float | None = FuseOpt.ms_nodata,
        quicklook: bool = FuseOpt.quicklook,
        stats_mpx: float | None = FuseOpt.stats_mpx,
        reproject: bool = FuseOpt.reproject,
        scan_memory: float | None = FuseOpt.scan_memory,
        ensemble: bool | None = FuseOpt.ensemble,
        adapt: int = typer.Option(
            0,
            "--adapt",
            help="Target-adaptive fine-tuning: N training steps on this scene at reduced "
            "resolution before fusing it (network models).",
        ),
        max_pixels: float | None = FuseOpt.max_pixels,
        quiet: bool = FuseOpt.quiet,
        json_out: bool = FuseOpt.json_out,
    ) -> None:
        summary = run(
            first,
            second,
            out,
            model=model,
            weights=weights,
            method=method,
            sensor=sensor,
            bands=parse_bands(bands),
            sensor_bands=parse_bands(sensor_bands, "--sensor-bands"),
            pan_bands=parse_bands(pan_bands),
            dn_max=dn_max,
            tile=tile,
            overlap=overlap,
            batch=batch,
            device=device,
            precision=precision,
            threads=threads,
            out_dtype=dtype,
            compress=compress,
            creation_options=parse_creation_options(co),
            cog=cog,
            overwrite=overwrite,
            coregister=coregister,
            ms_phase=ms_phase,
            zero_is_nodata=zero_nodata,
            **input_nodata(nodata, pan_nodata, ms_nodata),
            quicklook=quicklook,
            stats_mpx=stats_mpx,
            reproject=reproject,
            scan_memory=scan_memory,
            ensemble=ensemble,
            adapt=adapt,
            max_pixels=max_pixels,
            progress=tile_progress(show_progress(quiet)),
        )
        if json_out:
            echo_json(summary.to_dict())
        elif not quiet:
            typer.echo(describe_summary(summary), err=True)

    command.__doc__ = doc  # click rewraps each paragraph to the terminal
    app.command(name, cls=lazy_epilog(classical_methods_help))(command)


def describe_summary(s: Any) -> str:
    """One human line about a finished fusion run (a FuseSummary)."""
    c, h, w = s.shape
    line = f"wrote {s.output}: {c}x{h}x{w} {s.dtype}, {s.fuser} on {s.device}, "
    line += f"{s.seconds:.1f} s ({s.mpx_per_s:.3g} Mpx/s)"
    if s.shift_measured:
        state = "applied" if s.shift_applied else "not applied; --coregister applies it"
        line += (
            f"; PAN/MS shift dy={s.shift_measured['dy']:+.2f} dx={s.shift_measured['dx']:+.2f} px ({state})"
        )
    for w_ in s.warnings:
        if w_ not in notices.so_far():  # printed already, as it came
            line += f"\nwarning: {w_}"
    return line
