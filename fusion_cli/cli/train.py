"""`fusion train`: train (or fine-tune) FusionMamba on real scenes through Wald's protocol."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from fusion_cli.cli.common import Choices, OutputOpt, echo_json, parse_bands, sensor_bands_option
from fusion_cli.cli.progress import progress_bar
from fusion_cli.errors import FusionError
from fusion_cli.models import SEAMLESS_SCAN_MEMORY


def _pair(text: str | None, what: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        a, b = (float(t) for t in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{what}: expected two numbers like 0.5,1.5, got {text!r}") from None
    return a, b


def _command_line(ctx: typer.Context) -> str:
    """The command as the user gave it (options not left at their defaults), for the model card;
    without --resume, which continues the same training and cannot replay it into a fresh folder."""
    parts = ["fusion", "train"]
    for param in ctx.command.params:
        if "--resume" in param.opts:
            continue
        value = ctx.params.get(param.name)
        source = ctx.get_parameter_source(param.name)
        # Typer bundles its own click: compare by name, not with click's enum and classes.
        if getattr(source, "name", "") == "DEFAULT" or value in (None, [], False):
            continue
        values = value if isinstance(value, list) else [value]
        if param.param_type_name == "argument":
            parts += [str(v) for v in values]
        elif value is True:
            parts.append(param.opts[0])
        else:
            for v in values:
                parts += [param.opts[0], str(v)]
    return shlex.join(parts)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        ctx: typer.Context,
        inputs: list[Path] = typer.Argument(
            ...,
            help="Folders of GeoTIFF pairs (1_pan.tif + 1_ms.tif, pan_2.tif + ms_2.tif; hs/msi for "
            "hyperspectral tasks) or PanCollection-style HDF5 files (gt, ms, pan).",
        ),
        out: Path = typer.Option(..., "-o", "--out", help="Output folder: weights, card, checkpoint, log."),
        name: str = typer.Option("custom", "--name", help="Model name (file names and card)."),
        task: str = Choices.task.option("pansharpening", "--task", help="What the network learns."),
        ratio: int = typer.Option(4, help="Resolution ratio (HISR: the simulated ratio, e.g. 3)."),
        sensor: str = Choices.sensor.option(
            None, "--sensor", help="Sensor for the MTF gains of the degradation (generic without it)."
        ),
        dn_max: float = typer.Option(None, "--dn-max", help="DN mapped to 1.0 (default: the dtype's range)."),
        bands: str = typer.Option(None, help="MS bands to use, 1-based, in model order (e.g. 3,2,1,4)."),
        sensor_bands: str | None = sensor_bands_option(),
        pan_shift: str = typer.Option(
            None, "--pan-shift", help="Known PAN-vs-MS content offset 'dy,dx' in PAN px to compensate."
        ),
        val: list[Path] = typer.Option(
            [], "--val", help="Validation folders/HDF5 (other scenes). Default: the last rows of each scene."
        ),
        val_frac: float = typer.Option(0.2, "--val-frac", help="Fraction of rows held out when no --val."),
        dim: int = typer.Option(32, help="Network width d (paper: 32)."),
        d_state: int = typer.Option(8, "--d-state", help="Mamba state size."),
        patch: int = typer.Option(64, help="PAN patch size on the reduced grid."),
        batch: int = typer.Option(16, help="Patches per step."),
        lr: float = typer.Option(5e-4, help="Adam learning rate."),
        lr_step: int = typer.Option(200, "--lr-step", help="Epochs between learning-rate decays."),
        lr_gamma: float = typer.Option(0.5, "--lr-gamma", help="Learning-rate decay factor."),
        epochs: int = typer.Option(400, help="Epochs (see --steps-per-epoch)."),
        steps_per_epoch: int = typer.Option(
            None, "--steps-per-epoch", help="Default: enough patches to cover the training pixels once."
        ),
        max_seconds: float = typer.Option(None, "--max-seconds", help="Wall-clock budget; stops cleanly."),
        seed: int = typer.Option(0, help="Random seed."),
        device: str = Choices.device.option("auto", "--device", help="Where the network trains."),
        precision: str = Choices.precision.option(
            "fp32", "--precision", help="Arithmetic (bf16, fp16: autocast, CUDA only)."
        ),
        gain_aug: str = typer.Option(None, "--gain-aug", help="Random radiometric gain per patch 'lo,hi'."),
        base: str = Choices.method.option(
            None,
            "--base",
            help="Classical method (e.g. bdsd-pc) whose product the network learns to correct, "
            "instead of the paper's learned upsampling.",
        ),
        scan_memory: float = typer.Option(
            SEAMLESS_SCAN_MEMORY,
            "--scan-memory",
            help="Tokens a spatial scan remembers (bounded: tiled fusion matches the one-piece product "
            "within 1-2 DN 96 px or more from the scene's edges); 0: unbounded, as in the paper.",
        ),
        sam_weight: float = typer.Option(
            0.0,
            "--sam-weight",
            help="Add this weight times the mean (1 - cos) of the spectral angle to the L1 loss and to "
            "the validation score that picks the exported epoch (0: L1 only, the paper's).",
        ),
        full_res_weight: float = typer.Option(
            0.0,
            "--full-res-weight",
            help="Weight of a full-resolution term: the product, MTF-filtered and decimated, gives back "
            "the MS (needs --base; half of each batch then comes from the scenes at their original "
            "resolution).",
        ),
        detail_weight: float = typer.Option(
            0.0,
            "--detail-weight",
            help="Weight of a full-resolution term: each band's high-pass correlation with the PAN (HPC) "
            "at least the base product's, so the network does not smooth its base (needs --base).",
        ),
        init: Path = typer.Option(None, "--init", help="Start from these weights (fine-tuning)."),
        resume: bool = typer.Option(False, help="Continue from OUT/checkpoint.pt."),
        description: str = typer.Option("", help="Card description."),
        licence: str = typer.Option("", help="Card licence of the weights/training data."),
        quiet: bool = OutputOpt.quiet,
        json_out: bool = OutputOpt.json_out,
    ) -> None:
        """Train FusionMamba on real pairs: Wald-reduced inputs, the original MS as target.

        Writes OUT/NAME.safetensors + OUT/NAME.json (model card), OUT/checkpoint.pt (resumable),
        OUT/train_log.jsonl and OUT/loss.png.
        """
        from fusion_cli.models.registry import check_model_name
        from fusion_cli.training.api import train_from_inputs
        from fusion_cli.training.loop import TrainConfig, refuse_earlier_run

        check_model_name(name)  # before any data is read: the name is only used at export
        shift = _pair(pan_shift, "--pan-shift") or (0.0, 0.0)
        if (out / f"{name}.safetensors").exists() and not resume:
            raise FusionError(f"{out / name}.safetensors exists; choose another --name/--out or --resume")
        if not resume:
            refuse_earlier_run(out)  # before any data is read; the run checks again under its lock
        config = TrainConfig(
            task=task,
            ratio=ratio,
            dim=dim,
            d_state=d_state,
            patch=patch,
            batch=batch,
            lr=lr,
            lr_step=lr_step,
            lr_gamma=lr_gamma,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            max_seconds=max_seconds,
            seed=seed,
            device=device,
            precision=precision,
            gain_aug=_pair(gain_aug, "--gain-aug"),
            base=base,
            sensor=sensor,
            scan_memory=scan_memory or None,
            sam_weight=sam_weight,
            full_res_weight=full_res_weight,
            detail_weight=detail_weight,
        )
        with progress_bar("training", not quiet, eta=True) as update:
            res = train_from_inputs(
                inputs,
                out,
                name=name,
                config=config,
                val_inputs=val,
                val_frac=val_frac,
                sensor=sensor,
                dn_max=dn_max,
                pan_shift=shift,
                bands=parse_bands(bands),
                sensor_bands=parse_bands(sensor_bands, "--sensor-bands"),
                description=description,
                licence=licence,
                resume=resume,
                init_weights=init,
                progress=update,
                command=_command_line(ctx),
            )
        summary = {
            "weights": res.weights_path,
            "card": res.card_path,
            "steps": res.steps,
            "epochs": round(res.epochs, 2),
            "seconds": round(res.seconds, 1),
            "stopped_by": res.stopped_by,
            "best_epoch": res.best_epoch,
            "validation": res.val,
        }
        if json_out:
            echo_json(summary)
        elif not quiet:
            typer.echo(
                f"{res.weights_path}: {res.steps} steps ({res.epochs:.1f} epochs, {res.seconds:.0f} s, "
                f"{res.stopped_by}); best validation {res.val}",
                err=True,
            )
