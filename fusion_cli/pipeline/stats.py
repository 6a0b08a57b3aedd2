"""The statistics pass: fusers with global statistics (`needs_stats`) see the scene window by window
before fusing it; each window's core counts once, read with the statistics' own context."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from fusion_cli.errors import FusionError, NoValidPixels
from fusion_cli.fusers import Fuser, SplittableStats
from fusion_cli.pipeline.engine import read_ahead, single_threaded, window_workers
from fusion_cli.pipeline.options import Progress, reporting
from fusion_cli.pipeline.readers import PairSource, Tile
from fusion_cli.signals import ThreadPool
from fusion_cli.tiling import TilePlan, Window, round_up


def gather_stats(
    fuser: Fuser,
    source: PairSource,
    plan: TilePlan,
    stats_mpx: float | None = None,
    progress: Progress | None = None,
    label: str = "statistics",
) -> None:
    """First pass for fusers with global statistics: every tile's core counted once, read with the
    fuser's `stats_halo` (else the plan's margin) of context so the method's filters see the real
    neighbours, not an artificial border at each tile edge; only the core is marked valid.

    Where windows are fused in parallel and the fuser's statistics are sums (`SplittableStats`: the
    split is exact), each worker thread accumulates every k-th window into its own copy, merged at
    the end; the split depends on the thread count only, not on timing. `progress` is told of each
    window read (a pass over a large scene takes a while before the fusion's own bar starts)."""
    # the statistics' own context (`stats_halo`) where the fuser states it, else the fusion margin
    halo = fuser.stats_halo
    m = plan.margin if halo is None else round_up(int(halo), plan.multiple)
    side = plan.tile + 2 * m
    workers = window_workers(fuser)
    windows = list(plan)
    copies: list[Fuser] = []
    if isinstance(fuser, SplittableStats):
        # only sums (a classical method's statistics) may be estimated from part of the scene (a
        # network's per-band maximum may not)
        windows = stats_windows(plan, stats_mpx)
        copies = [fuser.stats_copy() for _ in range(workers - 1)]
    with single_threaded(workers > 1), reporting(progress, len(windows), label) as advance:
        _accumulate_windows([fuser, *copies], source, plan, windows, fuser.device, m, side, advance)
    if isinstance(fuser, SplittableStats):
        for part in copies:
            fuser.merge_stats(part)
    try:
        fuser.finalize()
    except NoValidPixels:
        sampled = {(w.core_row, w.core_col) for w in windows}
        rest = [w for w in plan if (w.core_row, w.core_col) not in sampled]
        if not rest:
            raise
        # the --stats-mpx sample fell on nodata only (a hole, a collar): the rest of the scene decides
        _accumulate_windows([fuser], source, plan, rest, fuser.device, m, side)
        fuser.finalize()


def stats_windows(plan: TilePlan, stats_mpx: float | None) -> list[Window]:
    """The windows a statistics pass reads: all of them, or, when `stats_mpx` caps the PAN
    megapixels, a regular sub-grid of the tile grid (every s-th row and column of tiles, centred)."""
    windows = list(plan)
    if stats_mpx is None:
        return windows
    if stats_mpx <= 0:
        raise FusionError(f"--stats-mpx must be positive, got {stats_mpx}")
    wanted = max(1, math.ceil(stats_mpx * 1e6 / plan.tile**2))
    if wanted >= len(windows):
        return windows
    step = math.ceil(math.sqrt(len(windows) / wanted))
    rows = range(min(step // 2, plan.rows - 1), plan.rows, step)
    cols = range(min(step // 2, plan.cols - 1), plan.cols, step)
    return [windows[i * plan.cols + j] for i in rows for j in cols]


def _accumulate_windows(
    parts: list[Fuser],
    source: PairSource,
    plan: TilePlan,
    windows: list[Window],
    dev: torch.device,
    m: int,
    side: int,
    advance: Callable[[int], None] | None = None,
) -> None:
    """Window i goes to `parts[i % len(parts)]`: in this thread for one part, else one thread per part
    (a part is never shared). `advance(pixels)` once per window handed over, with its core's pixels."""

    def done(win: Window) -> None:
        if advance is not None:
            advance(math.prod(plan.core_shape(win)))

    boxes = ((w.core_row - m, w.core_col - m, side, side) for w in windows)
    if len(parts) == 1:
        with contextlib.closing(read_ahead(source, boxes)) as tiles:
            for win, t in zip(windows, tiles, strict=True):
                _accumulate_window(parts[0], plan, dev, m, win, t)
                done(win)
        return
    busy: list[Future[None] | None] = [None] * len(parts)
    with (
        ThreadPool(max_workers=len(parts), thread_name_prefix="fusion-stats") as pool,
        contextlib.closing(read_ahead(source, boxes)) as tiles,
    ):
        try:
            for i, (win, t) in enumerate(zip(windows, tiles, strict=True)):
                k = i % len(parts)
                previous = busy[k]
                if previous is not None:
                    previous.result()
                busy[k] = pool.submit(_accumulate_window, parts[k], plan, dev, m, win, t)
                done(win)
            for fut in busy:
                if fut is not None:
                    fut.result()
        finally:
            for fut in busy:
                if fut is not None:
                    fut.cancel()


def _accumulate_window(fuser: Fuser, plan: TilePlan, dev: torch.device, m: int, win: Window, t: Tile) -> None:
    """Add one window's core to the fuser's statistics (its margin is context only)."""
    core = np.zeros_like(t.valid)
    # the last tiles reach past the scene (reflect padding): those pixels must not count twice
    rows, cols = plan.core_shape(win)
    core[m : m + rows, m : m + cols] = True
    valid = t.valid & core
    if valid.any():
        fuser.accumulate(
            torch.from_numpy(t.pan)[None].to(dev),
            torch.from_numpy(t.ms)[None].to(dev),
            torch.from_numpy(valid)[None, None].to(dev),
            origin=(win.core_row - m, win.core_col - m),
        )
