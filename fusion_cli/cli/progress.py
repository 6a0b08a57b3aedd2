"""The fusion progress bar: the library reports progress through `pipeline.Progress`; this draws
it with rich on stderr (windows done of total, PAN Mpx/s of finished output, time left)."""

from __future__ import annotations

import time
from typing import Any


class TileProgress:
    """A `pipeline.Progress` that draws a rich bar on stderr between `start` and `stop`."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._t0 = 0.0
        self._pixels = 0

    def start(self, total: int, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tiles"),
            TextColumn("{task.fields[rate]} Mpx/s"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=total, rate="-")
        self._t0 = time.perf_counter()
        self._pixels = 0

    def advance(self, pixels: int) -> None:
        if self._bar is not None:
            self._pixels += pixels
            rate = self._pixels / 1e6 / max(time.perf_counter() - self._t0, 1e-6)
            self._bar.update(self._task, advance=1, rate=f"{rate:.3g}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def tile_progress(enabled: bool) -> TileProgress | None:
    """A bar for a fusion run, or None (no progress) with -q / --json."""
    return TileProgress() if enabled else None
