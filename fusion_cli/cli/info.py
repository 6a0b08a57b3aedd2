"""`fusion info`: versions, torch devices, the scan backend that will be used and why, installed models."""

from __future__ import annotations

import typer

from fusion_cli.cli.common import OutputOpt, echo_json


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(
        quiet: bool = OutputOpt.quiet,
        json_out: bool = OutputOpt.json_out,
    ) -> None:
        """Show versions, devices, the selective-scan backend and the available models."""
        from fusion_cli.models.environment import environment_info

        data = environment_info()
        if json_out:  # the models' warnings are warnings of this command too, as every --json says
            echo_json({**data, "warnings": list(data["model_warnings"])})
            return
        v, t, s = data["versions"], data["torch"], data["scan_backend"]
        typer.echo("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
        gpus = ", ".join(t["cuda_devices"]) or "none"
        typer.echo(
            f"Torch devices: cpu ({t['cpu_threads']} threads); CUDA {t['cuda_version'] or '-'}: {gpus}"
        )
        typer.echo(f"Scan backend: {s['name']} on {s['device']} ({s['reason']})")
        typer.echo(f"Models in {data['weights_dir']} ({data['weights_source']}):")
        if not data["models"]:
            typer.echo(
                "  none installed (use --weights FILE, e.g. the official 420.pth, or point "
                "FUSION_WEIGHTS_DIR at a folder of cards)"
            )
        for m in data["models"]:
            mark = (" (default)" if m["default"] else "") + (f" [{m['status']}]" if m["status"] else "")
            typer.echo(
                f"  {m['name']}{mark}: {m['task']}, {m['sensor']}, ratio {m['ratio']}, "
                f"{len(m['bands'])} bands [{_names(m['bands'])}], PAN [{_names(m['pan_bands'])}]"
            )
        for w in data["model_warnings"]:
            if not quiet:
                typer.echo(f"  warning: {w}", err=True)
        typer.echo("Sensors (--sensor), MTF gain at Nyquist; --sensor-bands numbers the bands in this order:")
        for row in data["sensors"]:
            typer.echo(f"  {row['sensor']}: {_sensor_bands(row)}; PAN {row['pan_gain']}")


def _sensor_bands(row: dict) -> str:
    """ "1 coastal 0.325, 2 blue 0.355, ..." or, for one gain for every band, "1 blue, 2 green, ...: 0.3"."""
    names, gains = row["bands"], row["ms_gains"]
    if len(gains) == len(names):
        return ", ".join(f"{i} {n} {g}" for i, (n, g) in enumerate(zip(names, gains, strict=True), 1))
    listed = ", ".join(f"{i} {n}" for i, n in enumerate(names, 1))
    return f"{listed}: each {gains[0]}" if listed else f"every band {gains[0]}"


def _names(names: list[str], most: int = 8) -> str:
    """Band names for one line: hyperspectral lists are shortened to their first and last entries."""
    if len(names) <= most:
        return "; ".join(names)
    return f"{'; '.join(names[:2])}; ... ; {names[-1]}"
