"""`fusion batch IN_DIR OUT_DIR`: fuse every PAN/MS pair of a folder, resumably, locally or on Dask."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from fusion_cli import batch as lib
from fusion_cli.cli.common import (
    FuseOpt,
    OutputOpt,
    echo_json,
    input_nodata,
    pan_bands_option,
    parse_bands,
    parse_creation_options,
    table_console,
)
from fusion_cli.errors import FusionError
from fusion_cli.raster import check_output_folder, make_output_folder
from fusion_cli.sensors import check_sensor_bands_use

_EPILOG = (
    "Pairing: files whose names share the stem matched by '*' (e.g. --pan '*_PAN.tif' --ms '*_MS.tif'; "
    "case-insensitive, .tif also matches .tiff). Without patterns the one of these conventions that pairs "
    "the most files is used (on a tie, the first): "
    + ", ".join(f"{pan} + {ms}" for pan, ms in lib.pairing.DEFAULT_CONVENTIONS)
    + ". "
    "For HISR give the high-resolution MSI as --pan and the low-resolution HSI as --ms. "
    "Exit codes: 0 all scenes done or skipped, 1 some scene failed, 2 bad invocation, 130 interrupted."
)


def _console() -> Console:
    # soft_wrap: a reason is one line in a log file or a CI console, whatever the terminal width;
    # the summary table keeps its columns when stderr goes to a file.
    return table_console(stderr=True)


# How `--dry-run` shows each `execution.planned_action`.
_ACTION_TEXT = {
    "fuse": "todo",
    "redo": "exists, redo (--overwrite)",
    "skip": "complete, skip",
    "finish": "complete, write its missing side files",
    "refuse": "exists, not a complete product: fails without --overwrite",
    "other": "complete, made otherwise than asked: fails without --overwrite",
}

# The output's state in `--dry-run --json` (kept for scripts written before "action").
_ACTION_STATE = {
    "fuse": "todo",
    "redo": "exists",
    "skip": "complete",
    "finish": "complete",
    "refuse": "exists",
    "other": "complete",
}


def _show_plan(plan: lib.Plan, job: lib.FuseJob, overwrite: bool, as_json: bool) -> None:
    """`--dry-run`: every scene with what the run would do with it, then unpaired and ignored files."""
    asked = job.asked_fuser()  # a complete product another fuser made is not done (a bad name: exit 2)

    def action(scene: lib.Scene) -> str:
        def made_otherwise(out: Path) -> str | None:
            return lib.product_differs(out, asked, job.options, scene)

        return lib.planned_action(
            scene.out, job.side_files(scene.out), overwrite=overwrite, made_otherwise=made_otherwise
        )

    actions = [action(s) for s in plan.scenes]  # in plan order: `a` of a.tif and a.tiff share an id
    if as_json:
        payload = plan.to_dict()
        for s, action in zip(payload["scenes"], actions, strict=True):
            s["action"], s["state"] = action, _ACTION_STATE[action]
        echo_json(payload)
        return
    shard = f" (shard {plan.shard[0]}/{plan.shard[1]} of {plan.total_scenes} scenes)" if plan.shard else ""
    typer.echo(f"Plan: {len(plan.scenes)} scene(s) paired by {plan.source}{shard}")
    for s, action in zip(plan.scenes, actions, strict=True):
        typer.echo(f"  {s.id}\t{s.pan} + {s.ms} -> {s.out}\t[{_ACTION_TEXT[action]}]")
    for u in plan.unpaired:
        typer.echo(f"  UNPAIRED {u.path}: {u.reason}")
    if plan.ignored:
        typer.echo(f"  ignored (match neither pattern): {', '.join(p.name for p in plan.ignored)}")


def _announce(plan: lib.Plan, quiet: bool) -> None:
    if not quiet:
        shard = f", shard {plan.shard[0]}/{plan.shard[1]}" if plan.shard else ""
        extra = f", {len(plan.unpaired)} unpaired file(s)" if plan.unpaired else ""
        if plan.ignored:
            extra += f", ignored (match no pattern): {', '.join(p.name for p in plan.ignored)}"
        _console().print(f"fusion batch: {len(plan.scenes)} scene(s) by {plan.source}{shard}{extra}")


def _print_result(r: lib.SceneResult) -> None:
    style = {"done": "green", "skipped": "dim", "failed": "bold red"}[r.status]
    what = f"{r.seconds:.1f} s, {r.pan_mpx:.2f} Mpx" if r.status == "done" else (r.reason or "")
    _console().print(f"[{style}]{r.status:>7}[/] {escape(r.scene)}: {escape(what)}", markup=True)
    for message in r.details.get("warnings", []):  # the scene's own (a zero collar, an alpha band)
        _console().print(f"         warning: {escape(message)}", markup=True)


def _show_summary(summary: lib.BatchSummary) -> None:
    from rich.table import Table

    table = Table(title="fusion batch" + (" (interrupted)" if summary.interrupted else ""))
    for col in ("done", "skipped", "failed", "time (s)", "PAN Mpx/s"):
        table.add_column(col, justify="right")
    table.add_row(
        str(summary.done), str(summary.skipped), str(summary.failed),
        f"{summary.seconds:.1f}", f"{summary.mpx_per_s:.3f}",
    )  # fmt: skip
    con = _console()
    con.print(table)
    for r in summary.results:
        if r.status == "failed":
            con.print(f"[bold red]FAILED[/] {escape(r.scene)}: {escape(r.reason or '')}", markup=True)


def register(app: typer.Typer) -> None:
    @app.command("batch", epilog=_EPILOG)
    def batch(
        in_dir: Path = typer.Argument(..., help="Folder holding the input pairs."),
        out_dir: Path = typer.Argument(..., help="Folder for the fused products (created if needed)."),
        pan: str | None = typer.Option(
            None, "--pan", help="Glob of the PAN (or MSI) files, e.g. '*_PAN.tif'."
        ),
        ms: str | None = typer.Option(None, "--ms", help="Glob of the MS (or HSI) files, e.g. '*_MS.tif'."),
        manifest: Path | None = typer.Option(
            None, "--manifest", help="CSV with columns pan,ms[,out][,id]; relative to IN_DIR / OUT_DIR."
        ),
        out_pattern: str = typer.Option(
            "{stem}_fused.tif", "--out-pattern", help="Output file name; {stem} is the shared stem."
        ),
        model: str | None = FuseOpt.model,
        weights: Path | None = FuseOpt.weights,
        method: str | None = FuseOpt.method,
        sensor: str | None = FuseOpt.sensor,
        tile: int | None = FuseOpt.tile,
        overlap: int | None = FuseOpt.overlap,
        batch_size: int = FuseOpt.batch,
        device: str = FuseOpt.device,
        precision: str = FuseOpt.precision,
        threads: int | None = FuseOpt.threads,
        dn_max: float | None = FuseOpt.dn_max,
        bands: str | None = FuseOpt.bands,
        sensor_bands: str | None = FuseOpt.sensor_bands,
        pan_bands: str | None = pan_bands_option("PAN (or MSI)"),
        dtype: str | None = FuseOpt.dtype,
        cog: bool = FuseOpt.cog,
        coregister: bool = FuseOpt.coregister,
        ms_phase: str = FuseOpt.ms_phase,
        compress: str = FuseOpt.compress,
        co: list[str] | None = FuseOpt.co,
        zero_nodata: bool = FuseOpt.zero_nodata,
        nodata: float | None = FuseOpt.nodata,
        pan_nodata: float | None = FuseOpt.pan_nodata,
        ms_nodata: float | None = FuseOpt.ms_nodata,
        quicklook: bool = FuseOpt.quicklook,
        stats_mpx: float | None = FuseOpt.stats_mpx,
        reproject: bool = FuseOpt.reproject,
        scan_memory: float | None = FuseOpt.scan_memory,
        ensemble: bool | None = FuseOpt.ensemble,
        max_pixels: float | None = FuseOpt.max_pixels,
        metrics: bool = typer.Option(
            False, "--metrics", help="Full-resolution QNR/HQNR per output (log, --json, <out>.metrics.json)."
        ),
        shard: str | None = typer.Option(
            None,
            "--shard",
            help="K/N: process a deterministic 1/N of the pairs (by a hash of the scene id); K is taken "
            "modulo N, so 0-based (Kubernetes $JOB_COMPLETION_INDEX) and 1-based ids both work. "
            "'slurm' reads the array task variables (any --array range and step).",
        ),
        dask: str | None = typer.Option(
            None, "--dask", help="Dask scheduler address (tcp://host:8786) or scheduler file: run there."
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit; fuse nothing."),
        log: Path | None = typer.Option(None, "--log", help="Append one JSON line per scene to this file."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Redo scenes whose output is complete."),
        io_workers: int = typer.Option(
            1, "--io-workers", help="Threads reading the next scenes' inputs ahead of inference (0: off)."
        ),
        scene_workers: int = typer.Option(
            1,
            "--scene-workers",
            help="Scenes in flight at once through the one model, so one scene's I/O overlaps another's "
            "inference. Helps when reading/writing dominates (slow storage, --cog); no gain measured "
            "when the GPU is launch-bound. Memory grows with N.",
        ),
        retries: int = typer.Option(
            0, "--retries", help="Retries of a scene after an unexpected error (bad input is not retried)."
        ),
        lock_timeout: float | None = typer.Option(
            None,
            "--lock-timeout",
            help="Seconds to wait, at the end of the run, for a scene another running batch holds; then it "
            "fails. Default: until that batch lets go (it is fused here if that batch died without it).",
        ),
        quiet: bool = OutputOpt.quiet,
        json_out: bool = OutputOpt.json_out,
    ) -> None:
        """Fuse every PAN/MS pair of IN_DIR into OUT_DIR with one model instance: finished scenes are
        skipped (validated, not just present), a failing scene is logged and the batch goes on,
        and an interrupted run resumes where it stopped. Scale out with --shard (SLURM arrays,
        Kubernetes indexed Jobs, GNU parallel) or --dask."""
        from rasterio.errors import NotGeoreferencedWarning

        from fusion_cli.pipeline import FuseOptions

        # Inputs without georeferencing are legitimate (size-related pairs); the pipeline reports
        # them in each scene's summary, so rasterio's per-open warning is only noise here.
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
        if io_workers < 0 or retries < 0 or scene_workers < 1:
            raise FusionError("--io-workers and --retries must be 0 or more, --scene-workers 1 or more")
        if lock_timeout is not None and not lock_timeout >= 0:
            raise FusionError(f"--lock-timeout is seconds, 0 or more; got {lock_timeout}")
        if manifest is not None and (pan or ms):
            raise FusionError("give either --manifest or --pan/--ms patterns, not both")
        if method is not None and (model is not None or weights is not None):
            raise FusionError("give either --method or --model/--weights, not both")
        if manifest is not None:
            plan = lib.read_manifest(manifest, in_dir, out_dir, out_pattern)
        else:
            plan = lib.pair_by_patterns(in_dir, out_dir, pan, ms, out_pattern)
        if shard is not None:
            plan = lib.apply_shard(plan, *lib.parse_shard(shard))
        band_list = parse_bands(bands)
        sensor_band_list = parse_bands(sensor_bands, "--sensor-bands")
        check_sensor_bands_use(sensor_band_list, sensor, method is not None)  # once, not per scene
        options = FuseOptions(
            tile=tile, overlap=overlap, batch=batch_size,
            threads=threads, dn_max=dn_max, bands=band_list, out_dtype=dtype, cog=cog,
            sensor_bands=sensor_band_list, pan_bands=parse_bands(pan_bands),
            coregister=coregister, ms_phase=ms_phase, zero_is_nodata=zero_nodata, compress=compress,
            quicklook=quicklook,
            creation_options=parse_creation_options(co), **input_nodata(nodata, pan_nodata, ms_nodata),
            stats_mpx=stats_mpx, reproject=reproject,
            max_pixels=max_pixels,
        )  # fmt: skip
        fuser_kwargs = {
            "model": model, "weights": None if weights is None else str(weights), "method": method,
            "sensor": sensor, "device": device, "precision": precision, "dn_max": dn_max,
            "ms_bands": len(band_list) if band_list else None, "scan_memory": scan_memory,
            "ensemble": ensemble,
        }  # fmt: skip
        job = lib.FuseJob(fuser=fuser_kwargs, options=options, metrics=metrics)
        lib.check_side_files(plan, job.side_files)
        lib.check_log(log, plan, job.side_files)  # before the model loads: an input as --log is refused
        if dry_run:
            _show_plan(plan, job, overwrite, json_out)
            return
        on_result = None if quiet else _print_result
        if dask is not None:
            from fusion_cli.batch_dask import connect, run_batch_dask

            job.check_fuser()  # bad names exit 2 here, as without --dask (workers fail each scene)
            check_output_folder(out_dir, "OUT_DIR")
            client = connect(dask)  # before OUT_DIR is made: an unreachable scheduler leaves none
            try:
                make_output_folder(out_dir, "OUT_DIR")
                _announce(plan, quiet)
                summary = run_batch_dask(
                    plan, job, client, overwrite=overwrite, retries=retries, log=log, on_result=on_result
                )
            finally:
                client.close()
        else:
            process = lib.make_scene_processor(job)  # a bad model or method fails here, exit 2
            make_output_folder(out_dir, "OUT_DIR")
            _announce(plan, quiet)
            summary = lib.run_batch(
                plan, process, overwrite=overwrite, retries=retries, log=log, io_workers=io_workers,
                scene_workers=scene_workers, on_result=on_result,
                lock_timeout=math.inf if lock_timeout is None else lock_timeout,
            )  # fmt: skip
        if not quiet or summary.failed:  # -q: the summary only to list failures
            _show_summary(summary)
        if json_out:
            echo_json(summary.to_dict())
        raise typer.Exit(summary.exit_code)
