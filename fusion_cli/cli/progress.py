"""Every progress display of the CLI, drawn with rich on stderr. The library only reports progress,
through a callback: a fusion through `pipeline.Progress` (drawn by `TileProgress`: windows done of
total, PAN Mpx/s of finished output, time left), everything else (evaluate, report, simulate, train)
through `progress(done, total[, what])` (drawn by `progress_bar`). `show_progress` is the one rule
for when a bar is drawn."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any


def show_progress(quiet: bool) -> bool:
    """The one rule for progress bars: drawn on stderr when it is a terminal, unless -q; --json does
    not matter (its result goes to stdout). Redirected to a file or a pipe, stderr keeps only
    messages and errors, one line each, instead of a bar's last frame."""
    from rich.console import Console

    return not quiet and Console(stderr=True).is_terminal


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool, eta: bool = False) -> Iterator[Callable[..., None] | None]:
    """A progress bar on stderr fed by a library's `progress(done, total[, what])` callback, drawn
    while the work runs and gone after (`show_progress` rules; `enabled`: not -q); `eta` adds the
    time left (long runs: training). None when not drawn, so the library skips the calls."""
    if not (enabled and show_progress(quiet=False)):
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    if eta:
        columns.append(TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int, what: str | None = None) -> None:
            bar.update(task, completed=done, total=total, description=label if what is None else what)

        yield update


class TileProgress:
    """A `pipeline.Progress` that draws a rich bar on stderr between `start` and `stop`."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._t0 = 0.0
        self._pixels = 0

    def start(self, total: int, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tiles"),
            TextColumn("{task.fields[rate]} Mpx/s"),
            TextColumn("{task.fields[eta]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=total, rate="-", eta="")
        self._t0 = time.perf_counter()
        self._pixels = 0
        self._done, self._total = 0, total

    def advance(self, pixels: int) -> None:
        if self._bar is not None:
            self._pixels += pixels
            self._done += 1
            elapsed = max(time.perf_counter() - self._t0, 1e-6)
            # from the whole run's pace: a network finishes its windows a batch at once, and rich's
            # own estimate, from the last few updates, then read 1 s left where 45 s were
            left = elapsed * max(self._total - self._done, 0) / self._done
            eta = f"{int(left) // 60}:{int(left) % 60:02d} left"
            self._bar.update(self._task, advance=1, rate=f"{self._pixels / 1e6 / elapsed:.3g}", eta=eta)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def tile_progress(enabled: bool) -> TileProgress | None:
    """A bar for a fusion run, or None (no progress) with -q / --json."""
    return TileProgress() if enabled else None
