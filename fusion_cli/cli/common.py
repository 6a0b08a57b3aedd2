"""Option helpers shared by several commands (parsing only, no numerics)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer


def echo_json(payload: dict[str, Any]) -> None:
    """Machine-readable summary on stdout (progress and messages go to stderr)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def parse_bands(text: str | None) -> list[int] | None:
    """`--bands 1,2,3,5` (1-based, as GDAL) -> [1, 2, 3, 5]."""
    if text is None:
        return None
    try:
        bands = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated band numbers like 1,2,3,5, got {text!r}")
    if not bands or min(bands) < 1:
        raise typer.BadParameter("band numbers start at 1")
    return bands
