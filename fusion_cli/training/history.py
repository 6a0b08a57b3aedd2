"""What a training run records as it goes: the JSON-lines log, the loss plot, and the few words its
progress callback is given."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusion_cli import jsonout


def append_log(path: Path, rec: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(jsonout.dumps(rec) + "\n")  # a diverged epoch's NaN loss as null: JSON that parses


def write_log(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """The log holding exactly `history`, one line per record (replaced whole, through a temporary)."""
    from fusion_cli.raster import atomic_output

    if not history:  # atomic_output writes something or nothing
        path.unlink(missing_ok=True)
        return
    with atomic_output(path, overwrite=True, what="training log") as tmp:
        tmp.write_text("".join(jsonout.dumps(rec) + "\n" for rec in history))


def status(rec: dict[str, Any]) -> str:
    """A few words about an epoch record for a progress display, short enough to leave a terminal's
    width to the bar: training L1 and validation L1 (every index is in the log)."""
    text = f"loss {rec['loss']:.4f}"
    return text + (f", val_l1 {rec['val_l1']:.4f}" if "val_l1" in rec else "")


def plot_history(history: Sequence[dict[str, Any]], png: Path) -> None:
    """Training and validation L1 against epochs (log scale), as a PNG."""
    if not history:
        return
    from matplotlib.figure import Figure  # a figure of its own: the process's backend is left alone

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    tr = [(h["epoch"], h["loss"]) for h in history if "loss" in h]
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train L1")
    val = [(h["epoch"], h["val_l1"]) for h in history if "val_l1" in h]
    if val:
        ax.plot(*zip(*val, strict=True), label="validation L1", marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("L1 (network units)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
