"""The library API of fusion: one streaming pipeline for files and arrays, every fuser.

    from fusion_cli.pipeline import pansharpen, hisr, fuse_files, fuse_arrays, make_fuser, FuseOptions

`fuse_files` reads a PAN/MS pair window by window (`raster`), places the MS on the PAN grid
(`align`), fuses overlapping windows in batches, blends them (`tiling`) and streams the result to an
atomically written GeoTIFF. `fuse_arrays` runs the same tiling on in-memory arrays. For HISR the
high-resolution MSI plays the "pan" role (P > 1 bands) and the low-resolution HSI the "ms" role.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_cli import __version__, align, raster
from fusion_cli.errors import FusionError
from fusion_cli.fusers import Fuser
from fusion_cli.tiling import (
    StripAccumulator,
    TilePlan,
    Window,
    blend_weights,
    core_region,
    plan_tiles,
    round_up,
    weighted_region,
)

# Largest window side (PAN px) used to measure the PAN/MS shift: bounded memory and time.
SHIFT_WINDOW = 1024
# Tile side (PAN px) for fusers that state no `preferred_tile`.
DEFAULT_TILE = 256
# Blend zone (PAN px) for fusers that state no `preferred_overlap` (the networks).
DEFAULT_OVERLAP = 32


@dataclass
class FuseOptions:
    """Everything that controls a run apart from the inputs, the output and the fuser."""

    # output tile side, PAN px (rounded up to a multiple of the ratio/fuser multiple); None: the fuser's
    # `preferred_tile` (classical methods: larger tiles, less halo re-read), else DEFAULT_TILE
    tile: int | None = None
    # blend-zone width between neighbouring tiles, PAN px; None: the fuser's `preferred_overlap`
    # (classical methods: 0, nothing to blend), else DEFAULT_OVERLAP
    overlap: int | None = None
    batch: int = 4  # windows per fuser call
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (network on GPU)
    threads: int | None = None  # torch CPU threads
    dn_max: float | None = None  # clip ceiling / DN scale override (else NBITS, else the dtype range)
    bands: list[int] | None = None  # 1-based MS (HSI) bands to use, in the order the fuser expects
    pan_bands: list[int] | None = None  # 1-based PAN (MSI) bands; all by default
    out_dtype: str | None = None  # default: the MS dtype
    compress: str = "deflate"
    creation_options: dict[str, str] | None = None  # --co KEY=VALUE: more GTiff creation options
    cog: bool = False
    overwrite: bool = False
    coregister: bool = False  # apply the measured PAN/MS shift (it is always measured and reported)
    measure_shift: bool = True
    zero_is_nodata: bool = False  # treat 0 (all-zero MS pixels, zero PAN) as nodata
    # input nodata values on top of the files' own (--pan-nodata / --ms-nodata; raster.NodataOverride)
    pan_nodata: float | None = None
    ms_nodata: float | None = None
    quicklook: bool = False  # also write OUT.png
    progress: bool = True
    adapt: int = 0  # --adapt N: N target-adaptive training steps on this scene first (networks only)
    # classical methods' global statistics from at most this many PAN Mpx of windows spread evenly over
    # the scene (a regular sub-grid of tiles); None: every window (exact whole-scene statistics)
    stats_mpx: float | None = None
    reproject: bool = False  # an MS in another CRS is warped (GDAL, cubic) onto the PAN's CRS and grid
    # network scan memory in tokens (FusionMambaConfig.scan_memory); None: the model card's, 0: unbounded
    scan_memory: float | None = None
    # network transpose self-ensemble (FusionMambaConfig.transpose_ensemble); None: the model card's
    ensemble: bool | None = None
    max_pixels: float | None = None  # largest product (PAN-grid pixels); None: raster.MAX_PIXELS


@dataclass
class FuseSummary:
    """What a run did; `to_dict()` is the `--json` output."""

    output: str
    shape: tuple[int, int, int]  # (C, H, W)
    dtype: str
    crs: str | None
    transform: list[float] | None
    fuser: str
    weights_sha256: str | None
    device: str
    precision: str
    ratio: int
    tiles: int
    tile: int
    overlap: int
    seconds: float
    mpx_per_s: float  # PAN megapixels per second, whole run
    nodata: float | None
    internal_mask: bool
    valid_fraction: float
    shift_measured: dict[str, float] | None  # {"dy", "dx", "peak"} in PAN px
    shift_applied: bool
    bytes: int
    pan: str | None = None
    ms: str | None = None
    quicklook: str | None = None
    warnings: list[str] = field(default_factory=list)
    adapt: dict[str, Any] | None = None  # the target-adaptive fine-tuning report, with --adapt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Fusers


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu; a CUDA request without CUDA is a user error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FusionError(f"--device {device} requested but CUDA is not available; use --device cpu")
        idx = device.partition(":")[2]
        if idx and (not idx.isdigit() or int(idx) >= torch.cuda.device_count()):
            raise FusionError(f"--device {device}: no such GPU ({torch.cuda.device_count()} visible)")
        return device
    if device != "cpu":
        raise FusionError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def make_fuser(
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    method: str | None = None,
    ratio: int | None = None,
    sensor: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    dn_max: float | None = None,
    ms_bands: int | None = None,
    pan_bands: int = 1,
    scan_memory: float | None = None,
    ensemble: bool | None = None,
) -> Fuser:
    """A network (`model` name or `weights` file; the default shipped model when both are None)
    or a classical `method` (needs `ratio`; `pan_bands > 1` for HISR: an MSI in place of the PAN).
    `scan_memory` overrides the network's (tokens; 0 = unbounded, as the official checkpoint);
    `ensemble` switches its transpose self-ensemble on or off (None: as its card says)."""
    if method is not None and (model is not None or weights is not None):
        raise FusionError("give either --method or --model/--weights, not both")
    if scan_memory is not None and method is not None:
        raise FusionError("--scan-memory applies to networks, not to classical methods")
    if ensemble is not None and method is not None:
        raise FusionError("--ensemble/--no-ensemble applies to networks, not to classical methods")
    if scan_memory is not None and scan_memory < 0:
        raise FusionError(
            f"--scan-memory must be a number of tokens > 0, or 0 for unbounded; got {scan_memory}"
        )
    if precision not in {"fp32", "bf16", "fp16"}:
        raise FusionError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    raster.check_dn_max(dn_max)
    dev = resolve_device(device)
    if method is not None:
        try:
            from fusion_cli.classical import METHODS, make_method
        except ImportError:
            raise FusionError("classical methods are not available in this installation") from None
        if method not in METHODS:
            raise FusionError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
        if ratio is None:
            raise FusionError("a classical method needs the resolution ratio (measured from the inputs)")
        return make_method(method, ratio, sensor=sensor, ms_bands=ms_bands, pan_bands=pan_bands)
    try:
        from fusion_cli.models.fuser import NetworkFuser
        from fusion_cli.models.registry import load_model
    except ImportError:
        raise FusionError("no network models in this installation; use --method NAME") from None
    loaded = load_model(name=model, weights=None if weights is None else str(weights), device=dev)
    if scan_memory is not None:
        loaded.model.set_scan_memory(scan_memory or None)
    if ensemble is not None:
        loaded.model.config = replace(loaded.model.config, transpose_ensemble=ensemble)
    kwargs: dict[str, Any] = {"device": dev, "precision": precision}
    if dn_max is not None:
        kwargs["dn_max"] = dn_max
    return NetworkFuser(loaded, **kwargs)


def fuser_label(fuser: Fuser) -> tuple[str, str | None]:
    """(name, weights sha256) for tags and summaries, whatever kind of fuser."""
    card = getattr(fuser, "card", None) or getattr(getattr(fuser, "loaded", None), "card", None)
    sha = (
        getattr(fuser, "weights_sha256", None)
        or getattr(card, "sha256", None)
        or getattr(card, "weights_sha256", None)
    )
    return str(getattr(fuser, "name", type(fuser).__name__)), sha


def _fuser_device(fuser: Fuser) -> torch.device:
    dev = getattr(fuser, "device", "cpu")
    return torch.device(dev if dev != "auto" else "cpu")


# ---------------------------------------------------------------------------------------------
# Sources: PAN tile + MS resampled onto the tile's area-aligned grid + validity, for files or arrays


@dataclass
class _Tile:
    pan: np.ndarray  # (P, h, w) float32, nodata filled
    ms: np.ndarray  # (C, h/r, w/r) float32, nodata filled, area-aligned to pan
    valid: np.ndarray  # (h, w) bool


def _fill(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace invalid pixels by the band means of the valid ones, so a fuser never sees nodata."""
    data = data.astype(np.float32, copy=True)
    if valid.all():
        return data
    if not valid.any():
        data[:] = 0.0
        return data
    means = data[:, valid].mean(axis=1)
    data[:, ~valid] = means[:, None]
    return data


class _PairSource:
    """Reads output windows (output pixel coordinates) from a PAN/MS pair.

    `pan_reader(row, col, h, w)` and `ms_reader(row, col, h, w)` return (data, valid) in their own
    pixel coordinates, reflect-padded; `geom` maps output rows/cols to MS coordinates.
    """

    def __init__(
        self,
        geom: align.Alignment,
        pan_reader: Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]],
        ms_reader: Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]],
    ) -> None:
        self.geom = geom
        self.pan_reader = pan_reader
        self.ms_reader = ms_reader

    def read(self, row: int, col: int, size_h: int, size_w: int) -> _Tile:
        g, r = self.geom, self.geom.ratio
        pan, pvalid = self.pan_reader(g.row0 + row, g.col0 + col, size_h, size_w)
        uy = g.ms_centres(g.row0 + row, size_h // r, 0)
        ux = g.ms_centres(g.col0 + col, size_w // r, 1)
        (y0, y1), (x0, x1) = align.support(uy), align.support(ux)
        ms, mvalid = self.ms_reader(y0, x0, y1 - y0, x1 - x0)
        ms_lr = align.resample(
            _fill(ms, mvalid), align.cubic_matrix(uy, y0, y1 - y0), align.cubic_matrix(ux, x0, x1 - x0)
        )
        # MS validity at each low-resolution sample: that of the MS pixel under its centre.
        v_lr = mvalid[np.ix_(align.nearest_index(uy, y0, y1 - y0), align.nearest_index(ux, x0, x1 - x0))]
        valid = pvalid & np.repeat(np.repeat(v_lr, r, axis=0), r, axis=1)
        return _Tile(_fill(pan, pvalid), ms_lr.astype(np.float32), valid)


def _array_reader(
    arr: np.ndarray, valid: np.ndarray | None
) -> Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]]:
    v = np.ones(arr.shape[-2:], bool) if valid is None else valid.astype(bool)

    def read(row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        return raster.pad_array(arr, v, row, col, h, w)

    return read


def _file_reader(
    ds: Any, bands: Sequence[int], zero_is_nodata: bool
) -> Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]]:
    def read(row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        return raster.read_padded(ds, row, col, h, w, bands, zero_is_nodata)

    return read


# ---------------------------------------------------------------------------------------------
# The streaming engine shared by files and arrays


def _check_fuser(fuser: Fuser, pan_count: int, ms_count: int, ms_names: Sequence[str] | None = None) -> None:
    if fuser.ms_bands is not None and ms_count != fuser.ms_bands:
        expected = getattr(getattr(fuser, "card", None), "bands", None)
        hint = f" ({', '.join(map(str, expected))})" if expected else ""
        raise FusionError(
            f"the MS has {ms_count} bands but {fuser.name} expects {fuser.ms_bands}{hint}; "
            "select them in that order with --bands, e.g. --bands 1,2,3,5"
        )
    if pan_count != fuser.pan_bands:
        raise FusionError(
            f"the high-resolution input (PAN, or MSI for HISR) has {pan_count} bands but {fuser.name} "
            f"expects {fuser.pan_bands}; pick a model or method for this pair"
        )


def _measure_shift(source: _PairSource) -> dict[str, float] | None:
    """PAN/MS content shift on a central window of at most SHIFT_WINDOW PAN px (bounded memory)."""
    g = source.geom
    side_h = min(g.height, SHIFT_WINDOW) // g.ratio * g.ratio
    side_w = min(g.width, SHIFT_WINDOW) // g.ratio * g.ratio
    if min(side_h, side_w) < 16 * g.ratio:
        return None
    row, col = (g.height - side_h) // 2, (g.width - side_w) // 2
    t = source.read(row, col, side_h, side_w)
    if t.valid.mean() < 0.2:
        return None
    pan = t.pan.mean(axis=0) if t.pan.shape[0] > 1 else t.pan[0]
    dy, dx, peak = align.estimate_shift(pan, t.ms, g.ratio, t.valid)
    return {"dy": round(dy + g.dy, 3), "dx": round(dx + g.dx, 3), "peak": round(peak, 3)}


def _gather_stats(fuser: Fuser, source: _PairSource, plan: TilePlan, stats_mpx: float | None = None) -> None:
    """First pass for fusers with global statistics: every tile's core counted once, read with the
    fuser's `stats_halo` (else the plan's margin) of context so the method's filters see the real
    neighbours, not an artificial border at each tile edge; only the core is marked valid.

    Where windows are fused in parallel and the fuser can merge statistics (`stats_copy`,
    `merge_stats`: sums, so the split is exact), each worker thread accumulates every k-th window into
    its own copy, merged at the end; the split depends on the thread count only, not on timing."""
    dev = _fuser_device(fuser)
    # the statistics' own context (`stats_halo`) where the fuser states it, else the fusion margin
    halo = getattr(fuser, "stats_halo", None)
    m = plan.margin if halo is None else round_up(int(halo), plan.multiple)
    side = plan.tile + 2 * m
    workers = _window_workers(fuser)
    mergeable = hasattr(fuser, "stats_copy") and hasattr(fuser, "merge_stats")
    # only sums of a classical method's statistics may be estimated from part of the scene (a
    # network's per-band maximum may not)
    windows = stats_windows(plan, stats_mpx) if mergeable else list(plan)
    parts = [fuser]
    if workers > 1 and mergeable:
        parts += [fuser.stats_copy() for _ in range(workers - 1)]  # type: ignore[attr-defined]
    with _single_threaded(workers > 1):
        _accumulate_windows(parts, source, plan, windows, dev, m, side)
    for part in parts[1:]:
        fuser.merge_stats(part)  # type: ignore[attr-defined]
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
    parts: list[Any],
    source: _PairSource,
    plan: TilePlan,
    windows: list[Window],
    dev: torch.device,
    m: int,
    side: int,
) -> None:
    """Window i goes to `parts[i % len(parts)]`: in this thread for one part, else one thread per part
    (a part is never shared)."""
    boxes = ((w.core_row - m, w.core_col - m, side, side) for w in windows)
    if len(parts) == 1:
        with contextlib.closing(_read_ahead(source, boxes)) as tiles:
            for win, t in zip(windows, tiles, strict=True):
                _accumulate_window(parts[0], plan, dev, m, win, t)
        return
    busy: list[Future[None] | None] = [None] * len(parts)
    with (
        ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="fusion-stats") as pool,
        contextlib.closing(_read_ahead(source, boxes)) as tiles,
    ):
        try:
            for i, (win, t) in enumerate(zip(windows, tiles, strict=True)):
                k = i % len(parts)
                if busy[k] is not None:
                    busy[k].result()  # type: ignore[union-attr]
                busy[k] = pool.submit(_accumulate_window, parts[k], plan, dev, m, win, t)
            for fut in busy:
                if fut is not None:
                    fut.result()
        finally:
            for fut in busy:
                if fut is not None:
                    fut.cancel()


@contextlib.contextmanager
def _single_threaded(enabled: bool) -> Iterator[None]:
    """torch intra-op threads set to 1 meanwhile (restored after) when `enabled`."""
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _read_ahead(
    source: _PairSource, boxes: Iterable[tuple[int, int, int, int]], depth: int = 2
) -> Iterator[_Tile]:
    """`source.read(*box)` for each box, in order, read by one background thread up to `depth` boxes
    ahead: GDAL decodes (releasing the GIL) while the caller fuses or writes. Only that thread touches
    the input datasets meanwhile; the generator must be exhausted or closed before anything else does."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusion-read") as pool:
        ahead: deque[Future[_Tile]] = deque()
        it = iter(boxes)
        try:
            for box in it:
                ahead.append(pool.submit(source.read, *box))
                if len(ahead) > depth:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for fut in ahead:
                fut.cancel()


def _accumulate_window(
    fuser: Fuser, plan: TilePlan, dev: torch.device, m: int, win: Window, t: _Tile
) -> None:
    """Add one window's core to the fuser's statistics (its margin is context only)."""
    core = np.zeros_like(t.valid)
    # the last tiles reach past the scene (reflect padding): those pixels must not count twice
    core[
        m : m + min(plan.tile, plan.height - win.core_row),
        m : m + min(plan.tile, plan.width - win.core_col),
    ] = True
    valid = t.valid & core
    if valid.any():
        fuser.accumulate(
            torch.from_numpy(t.pan)[None].to(dev),
            torch.from_numpy(t.ms)[None].to(dev),
            torch.from_numpy(valid)[None, None].to(dev),
        )


def _window_workers(fuser: Fuser) -> int:
    """Windows fused concurrently: CPU fusers that declare `parallel_windows` (the classical methods:
    small element-wise ops, where torch's intra-op threads mostly wait on each other, and badly so on
    a busy machine) run one single-threaded window per torch thread instead."""
    if not getattr(fuser, "parallel_windows", False) or _fuser_device(fuser).type != "cpu":
        return 1
    # torch's thread count is process-wide: only the main thread may change it (a batch run fusing
    # scenes in worker threads already keeps the cores busy)
    if threading.current_thread() is not threading.main_thread():
        return 1
    return max(1, torch.get_num_threads())


@contextlib.contextmanager
def _window_threads(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """A pool of `workers` threads with torch intra-op threads set to 1 meanwhile (restored after)."""
    if workers <= 1:
        yield None
        return
    with _single_threaded(True), ThreadPoolExecutor(max_workers=workers) as pool:
        yield pool


def _run(
    fuser: Fuser,
    source: _PairSource,
    plan: TilePlan,
    bands: int,
    sink: Callable[[int, int, np.ndarray, np.ndarray], None],
    batch: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Fuse every window of `plan`, blend, and pass finished blocks to `sink(row0, col0, data, valid)`.
    `progress(pixels)` is called once per window when its result is blended, with its core's output
    pixels."""
    dev = _fuser_device(fuser)
    # One strip plus its blend zone; tiles that are not a multiple of the output block leave up to
    # a block of finished rows waiting for block-aligned writing.
    capacity = plan.tile + plan.overlap + (0 if plan.tile % raster.BLOCK == 0 else raster.BLOCK)
    acc = StripAccumulator(bands, plan.height, plan.width, capacity)
    workers = _window_workers(fuser)
    if workers > 1:
        batch = 1  # one window per worker: the parallelism is across windows

    def fuse_batch(items: list[tuple[Window, _Tile]]) -> list[np.ndarray]:
        """One fuser call per window shape (windows cropped at the scene's edges differ in size)."""
        out: list[np.ndarray | None] = [None] * len(items)
        shapes: dict[tuple[int, ...], list[int]] = {}
        for i, (_, t) in enumerate(items):
            shapes.setdefault(t.pan.shape, []).append(i)
        for idx in shapes.values():
            pan = torch.from_numpy(np.stack([items[i][1].pan for i in idx])).to(dev)
            ms = torch.from_numpy(np.stack([items[i][1].ms for i in idx])).to(dev)
            with torch.inference_mode():
                fused = fuser.fuse(pan, ms).float().cpu().numpy()
            for i, f in zip(idx, fused, strict=True):
                out[i] = f
        return out  # type: ignore[return-value]

    def blend(items: list[tuple[Window, _Tile]], out: list[np.ndarray]) -> None:
        for (win, _), fused in zip(items, out, strict=True):
            region = weighted_region(plan, win, fused)
            if plan.overlap:
                acc.add(region, blend_weights(plan, win), win.core_row, win.core_col)
            else:  # no blend zone: each pixel comes from one tile
                acc.put(region, win.core_row, win.core_col)

    # Windows go through one FIFO in plan order, a group per fuser call: (every window of the
    # group, the ones with data, their result). Results are blended in that order, and a strip's rows
    # are flushed when the first window of a later strip comes out, so the workers go on with the
    # next strip meanwhile instead of idling at every strip's end.
    queue: deque[
        tuple[list[tuple[Window, _Tile]], list[tuple[Window, _Tile]], Future[list[np.ndarray]] | None]
    ]
    queue = deque()
    flushed = 0  # strips [0, flushed) are written

    def flush_before(strip: int) -> None:
        nonlocal flushed
        while flushed < strip:
            final = plan.final_row_after(flushed)
            if final < plan.height:
                final = final // raster.BLOCK * raster.BLOCK
            acc.flush(final, sink)
            flushed += 1

    def take() -> None:
        group, work, fut = queue.popleft()
        out = fut.result() if fut is not None else None
        flush_before(group[0][0].strip)
        for win, t in group:
            acc.set_valid(core_region(plan, win, t.valid), win.core_row, win.core_col)
        if out is not None:
            blend(work, out)
        if progress is not None:
            for win, _ in group:  # output pixels of each finished core, inside the scene
                progress(
                    (min(plan.tile, plan.height - win.core_row)) * (min(plan.tile, plan.width - win.core_col))
                )

    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(_window_threads(workers))
        depth = 2 * workers if pool is not None else 0  # results waiting: bounded memory

        def submit(group: list[tuple[Window, _Tile]], work: list[tuple[Window, _Tile]]) -> None:
            fut: Future[list[np.ndarray]] | None = None
            if work:
                if pool is not None:
                    fut = pool.submit(fuse_batch, work)
                else:
                    fut = Future()
                    fut.set_result(fuse_batch(work))
            queue.append((group, work, fut))
            while len(queue) > depth:
                take()

        windows = list(plan)  # strip by strip, as `plan.strip(i)` lists them
        boxes = ((w.row, w.col, w.height, w.width) for w in windows)
        tiles = stack.enter_context(contextlib.closing(_read_ahead(source, boxes)))
        group: list[tuple[Window, _Tile]] = []  # every window since the last fuser call
        work: list[tuple[Window, _Tile]] = []  # those with data (an all-nodata window needs no inference)
        for win in windows:
            t = next(tiles)
            group.append((win, t))
            if t.valid.any():
                work.append((win, t))
            if len(work) >= batch or win.last_col:  # a fuser call never spans two strips
                submit(group, work)
                group, work = [], []
        while queue:
            take()
        flush_before(plan.rows)


class _WriteBehind:
    """Runs write calls in order in one background thread, at most `depth` behind, so that GDAL
    compresses and writes one strip while the next is fused. Only that thread touches the output
    meanwhile; leaving the context waits for every write and re-raises the first error."""

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self.pending: deque[Future[None]] = deque()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusion-write")
        self.failed = False  # after a failed write the queued ones are skipped, not attempted

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except BaseException:
            self.failed = True
            raise

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.pending.append(self.pool.submit(self._call, fn, *args))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def __enter__(self) -> _WriteBehind:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            while self.pending:
                fut = self.pending.popleft()
                if exc_type is None:
                    fut.result()
                else:  # already failing: just let the queued writes finish or be dropped
                    fut.cancel()
        finally:
            self.pool.shutdown(wait=True)


def _adapt_dn_scale(fuser: Fuser, ms_dtype: str, override: float | None) -> None:
    """A model trained on several bit depths names its DN scale per input dtype in its card
    (`dn_max_by_dtype`, e.g. uint8 255 / uint16 65535); --dn-max, given to the fuser, wins."""
    table = getattr(getattr(fuser, "card", None), "dn_max_by_dtype", None)
    if override is None and table and ms_dtype in table and hasattr(fuser, "dn_max"):
        fuser.dn_max = float(table[ms_dtype])  # type: ignore[attr-defined]


def _value_range(ms_dtype: str, dn_max: float | None) -> tuple[float | None, float | None]:
    """Valid output range: [dtype min, dn_max or dtype max] for integer MS, unbounded for floats."""
    rng = raster.dtype_range(ms_dtype)
    lo = rng[0] if rng else None
    hi = dn_max if dn_max is not None else (rng[1] if rng else None)
    return lo, hi


def _finish(
    data: np.ndarray,
    valid: np.ndarray,
    out_dtype: str,
    lo: float | None,
    hi: float | None,
    nodata: float | None,
) -> np.ndarray:
    """Clip to the valid range, round for integer outputs, and write nodata where invalid.

    `data` (float32) is a scratch buffer: it is clipped and rounded in place."""
    rng = raster.dtype_range(out_dtype) if np.issubdtype(np.dtype(out_dtype), np.integer) else None
    if rng is not None:  # one clip to the tighter of the valid range and the dtype's
        lo = rng[0] if lo is None else max(lo, rng[0])
        hi = rng[1] if hi is None else min(hi, rng[1])
    if lo is not None or hi is not None:
        np.clip(data, lo, hi, out=data)
    if rng is not None:
        np.rint(data, out=data)
    data = data.astype(out_dtype)
    if nodata is not None:
        nd = np.array(nodata, dtype=out_dtype)
        if not np.isnan(nd):
            # A fused value equal to the nodata value would vanish: nudge it by one step inwards.
            rng = raster.dtype_range(out_dtype)
            step = 1.0 if rng is not None else float(np.finfo(data.dtype).eps) * max(1.0, abs(float(nd)))
            bump = -step if rng is not None and float(nd) >= rng[1] else step
            data[(data == nd) & valid[None]] = data.dtype.type(float(nd) + bump)
        data[:, ~valid] = nd
    return data


# ---------------------------------------------------------------------------------------------
# Public API


def fuse_arrays(
    pan: np.ndarray,
    ms: np.ndarray,
    fuser: Fuser,
    options: FuseOptions | None = None,
    *,
    pan_valid: np.ndarray | None = None,
    ms_valid: np.ndarray | None = None,
    shift: tuple[float, float] | None = None,
) -> np.ndarray:
    """Fuse in-memory arrays with the same tiling as `fuse_files`.

    pan `(P, H, W)` (or `(H, W)`), ms `(C, H/r, W/r)` area-aligned (sample (i, j) covers PAN
    [r*i, r*(i+1)) x [r*j, r*(j+1))). Optional validity masks `(H, W)` / `(H/r, W/r)`; `shift`
    (dy, dx) PAN px re-places the MS. Returns float32 `(C, H, W)` in DN, clipped to
    `[0, options.dn_max]` when given, NaN where invalid.
    """
    opts = options or FuseOptions(progress=False)
    pan = pan[None] if pan.ndim == 2 else pan
    if pan.ndim != 3 or ms.ndim != 3:
        raise FusionError("fuse_arrays expects pan (P, H, W) and ms (C, h, w) arrays")
    geom = align.relate_shapes(pan.shape[-2:], ms.shape[-2:], fuser.ratio)
    if shift is not None:
        geom = geom.with_shift(*shift)
    _check_fuser(fuser, pan.shape[0], ms.shape[0])
    source = _PairSource(geom, _array_reader(pan, pan_valid), _array_reader(ms, ms_valid))
    plan = _plan(fuser, geom, opts)
    if fuser.needs_stats:
        _gather_stats(fuser, source, plan, opts.stats_mpx)
    out = np.empty((ms.shape[0], *geom.shape), np.float32)
    valid_all = np.empty(geom.shape, bool)

    def sink(row0: int, col0: int, data: np.ndarray, valid: np.ndarray) -> None:
        out[:, row0 : row0 + data.shape[1], col0 : col0 + data.shape[2]] = data
        valid_all[row0 : row0 + data.shape[1], col0 : col0 + data.shape[2]] = valid

    _set_threads(opts.threads)
    _run(fuser, source, plan, ms.shape[0], sink, opts.batch)
    if opts.dn_max is not None:
        np.clip(out, 0.0, opts.dn_max, out=out)
    if pan_valid is not None or ms_valid is not None:
        out[:, ~valid_all] = np.nan
    return out


def _plan(fuser: Fuser, geom: align.Alignment, opts: FuseOptions) -> TilePlan:
    multiple = math.lcm(geom.ratio, max(1, int(fuser.tile_multiple)))
    if opts.batch < 1:
        raise FusionError("--batch must be at least 1")
    tile = opts.tile if opts.tile is not None else int(getattr(fuser, "preferred_tile", DEFAULT_TILE))
    overlap = opts.overlap
    if overlap is None:
        overlap = int(getattr(fuser, "preferred_overlap", DEFAULT_OVERLAP))
    return plan_tiles(geom.height, geom.width, tile, overlap, int(fuser.halo), multiple)


def _bound_heap() -> None:
    """Fixed glibc malloc thresholds for the run. Left dynamic, glibc raises its mmap threshold after
    large frees and keeps ever more freed memory, so peak RSS drifts with the run's length. Fixed at
    32 MiB (mmap) and 64 MiB (trim), tile-sized arrays (a few MB) are reused from the heap instead of
    being mapped, zero-filled by page faults and unmapped on every call (that cost a 4 Mpx classical
    run ~0.9 M page faults and a third of its time), while the memory kept is bounded by the trim
    threshold: 8k-scene peak +18 % over 2k (BENCHMARKS.md; 1 MiB / default trim gave +12 %)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not name.startswith("libc.so"):
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise FusionError("--threads must be at least 1")
        torch.set_num_threads(threads)


def measure_ratio(
    pan_path: str | os.PathLike[str], ms_path: str | os.PathLike[str], reproject: bool = False
) -> int:
    """Resolution ratio of a pair from its geotransforms (or sizes, without georeferencing)."""
    with open_pair(pan_path, ms_path, reproject) as (p, m), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return align.relate_grids(p, m).ratio


@contextlib.contextmanager
def open_pair(
    pan_path: str | os.PathLike[str],
    ms_path: str | os.PathLike[str],
    reproject: bool = False,
    expected_ratio: int | None = None,
    pan_nodata: float | None = None,
    ms_nodata: float | None = None,
) -> Iterator[tuple[Any, Any]]:
    """(pan, ms) datasets, read-only; with `reproject`, an MS in another CRS than the PAN's comes as a
    warped VRT on the PAN's CRS and grid (`align.warp_to_pan_crs`). `pan_nodata` / `ms_nodata`: nodata
    values added to the files' own (`raster.with_nodata`; the warp leaves the MS's out)."""
    with contextlib.ExitStack() as stack:
        pan_ds = stack.enter_context(raster.open_raster(pan_path, "PAN"))
        ms_ds = stack.enter_context(raster.open_raster(ms_path, "MS"))
        raster.check_same_file(pan_path, ms_path)
        raster.check_pixel_type(pan_ds, "PAN")
        raster.check_pixel_type(ms_ds, "MS")
        if reproject and pan_ds.crs is not None and ms_ds.crs is not None and pan_ds.crs != ms_ds.crs:
            ms_ds = stack.enter_context(align.warp_to_pan_crs(ms_ds, pan_ds, expected_ratio, ms_nodata))
        yield raster.with_nodata(pan_ds, pan_nodata), raster.with_nodata(ms_ds, ms_nodata)


def _sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Progress:
    """rich progress on stderr: tiles, PAN Mpx/s of finished output, ETA. A no-op when disabled."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total = enabled, total
        self.label = label
        self._p: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tiles"),
                TextColumn("{task.fields[rate]} Mpx/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=self.total, rate="-")
            self._t0 = time.perf_counter()
            self._pixels = 0
        return self

    def advance(self, pixels: int) -> None:
        """One more window done, with `pixels` output pixels."""
        if self._p is not None:
            self._pixels += pixels
            rate = self._pixels / 1e6 / max(time.perf_counter() - self._t0, 1e-6)
            self._p.update(self._task, advance=1, rate=f"{rate:.3g}")

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)


def _output_nodata(
    pan_ds: Any, ms_ds: Any, bands: Sequence[int], pan_bands: Sequence[int], out_dtype: str, opts: FuseOptions
) -> tuple[float | None, bool]:
    """(nodata value, use an internal mask): the MS nodata if it has one, 0 with zero_is_nodata,
    else an internal mask when either input can have invalid pixels."""
    if ms_ds.nodata is not None:
        nd = float(ms_ds.nodata)
        rng = raster.dtype_range(out_dtype)
        if np.isnan(nd) and rng is not None:
            return float(rng[0]), False
        if rng is None or rng[0] <= nd <= rng[1]:
            return nd, False
    if opts.zero_is_nodata:
        return 0.0, False
    if raster.has_mask(pan_ds, pan_bands) or raster.has_mask(ms_ds, bands):
        return None, True
    return None, False


def fuse_files(
    pan_path: str | os.PathLike[str],
    ms_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    fuser: Fuser,
    options: FuseOptions | None = None,
) -> FuseSummary:
    """Fuse a georeferenced (or size-related) PAN/MS pair into a GeoTIFF on the PAN grid.

    The output covers the PAN pixels inside both inputs; it appears atomically at `out_path`.
    """
    opts = options or FuseOptions()
    t0 = time.perf_counter()
    _bound_heap()
    out = raster.check_writable(out_path, opts.overwrite, [pan_path, ms_path], _side_outputs(out_path, opts))
    caught: list[str] = []
    with (
        raster.gdal_env(),
        open_pair(pan_path, ms_path, opts.reproject, fuser.ratio, opts.pan_nodata, opts.ms_nodata) as (
            pan_ds,
            ms_ds,
        ),
    ):
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            geom = align.relate_grids(pan_ds, ms_ds, fuser.ratio)
        raster.check_scene_size(geom.height, geom.width, opts.max_pixels)
        caught += [str(w.message) for w in wlist if "NotGeoreferenced" not in type(w.message).__name__]
        bands = raster.select_bands(ms_ds, opts.bands, "MS")
        pan_bands = raster.select_bands(pan_ds, opts.pan_bands, "PAN")
        _check_fuser(fuser, len(pan_bands), len(bands))
        ms_dtype = ms_ds.dtypes[bands[0] - 1]
        out_dtype = opts.out_dtype or ms_dtype
        try:
            np.dtype(out_dtype)
        except TypeError:
            raise FusionError(f"unknown output dtype {out_dtype!r}; use e.g. uint16 or float32") from None
        raster.check_dn_max(opts.dn_max)
        dn_max = opts.dn_max if opts.dn_max is not None else raster.detect_dn_max(ms_ds)
        # a Wald-reduced float MS (fusion simulate) names the dtype its DN came from
        _adapt_dn_scale(fuser, ms_ds.tags().get(raster.SOURCE_DTYPE_TAG, ms_dtype), opts.dn_max)
        lo, hi = _value_range(ms_dtype, dn_max)
        raster.check_narrowing(ms_dtype, out_dtype, lo, hi)
        nodata, use_mask = _output_nodata(pan_ds, ms_ds, bands, pan_bands, out_dtype, opts)

        source = _PairSource(
            geom,
            _file_reader(pan_ds, pan_bands, opts.zero_is_nodata),
            _file_reader(ms_ds, bands, opts.zero_is_nodata),
        )
        shift = _measure_shift(source) if (opts.measure_shift or opts.coregister) else None
        if opts.coregister and shift is not None:
            geom = geom.with_shift(shift["dy"], shift["dx"])
            source.geom = geom
        plan = _plan(fuser, geom, opts)
        _set_threads(opts.threads)
        adapted = _adapt(fuser, source, geom, opts)
        if fuser.needs_stats:
            _gather_stats(fuser, source, plan, opts.stats_mpx)

        name, sha = fuser_label(fuser)
        params = {
            "tile": plan.tile,
            "overlap": plan.overlap,
            "margin": plan.margin,
            "batch": opts.batch,
            "bands": bands,
            "pan_bands": pan_bands,
            "dn_max": dn_max,
            "dn_scale": getattr(fuser, "dn_max", None),
            "dtype": out_dtype,
            "zero_is_nodata": opts.zero_is_nodata,
            "input_nodata": [opts.pan_nodata, opts.ms_nodata],
            "coregister": opts.coregister,
            "shift_pan_px": [geom.dy, geom.dx],
            "ratio": geom.ratio,
            "precision": opts.precision,
            "adapt_steps": opts.adapt,
            "stats_mpx": opts.stats_mpx if fuser.needs_stats else None,
            "reprojected_ms": raster.is_warped(ms_ds),
            "scan_memory": getattr(fuser, "scan_memory", None),  # networks: card's or --scan-memory's
            "transpose_ensemble": getattr(fuser, "transpose_ensemble", None),  # networks
        }
        tags = {
            "FUSION_MODEL": name,
            "FUSION_WEIGHTS_SHA256": sha or "none",
            "FUSION_VERSION": __version__,
            "FUSION_PARAMS": json.dumps(params, sort_keys=True),
            "FUSION_PAN": raster.recorded_path(pan_path),
            "FUSION_MS": raster.recorded_path(ms_path),
            "FUSION_SHIFT_MEASURED": json.dumps(shift),
        }
        profile = raster.output_profile(
            width=geom.width,
            height=geom.height,
            count=len(bands),
            dtype=out_dtype,
            crs=geom.crs,
            transform=geom.out_transform,
            nodata=nodata,
            compress=opts.compress,
            creation_options=opts.creation_options,
        )
        n_valid = 0
        descriptions = raster.band_descriptions(ms_ds, bands)
        with (
            raster.AtomicWriter(
                out,
                profile,
                descriptions=descriptions,
                tags=tags,
                use_mask=use_mask,
                overwrite=opts.overwrite,
                cog=opts.cog,
                # RGB by the MS's band descriptions, else by the model card's band names
                colorinterp=raster.rgb_colorinterp(
                    len(bands), descriptions, getattr(getattr(fuser, "card", None), "bands", None) or []
                ),
            ) as writer,
            _Progress(opts.progress, plan.count, f"fusing {out.name}") as bar,
        ):

            def sink(row0: int, col0: int, data: np.ndarray, valid: np.ndarray) -> None:
                nonlocal n_valid
                n_valid += int(valid.sum())
                block = _finish(data, valid, out_dtype, lo, hi, nodata)  # a new array: `data` is reused
                behind.submit(writer.write, block, row0, col0, valid.copy() if use_mask else None)

            with _WriteBehind() as behind:
                _run(fuser, source, plan, len(bands), sink, opts.batch, bar.advance)
            if n_valid == 0:  # all nodata: an empty product is no product
                raise FusionError(
                    f"no valid pixel where {pan_path} and {ms_path} overlap (all nodata or masked); "
                    "check the inputs and their nodata"
                )
            writer.commit()

    quick = None
    if opts.quicklook:
        quick = _write_quicklook(out, fuser, opts.overwrite)
    seconds = time.perf_counter() - t0
    return FuseSummary(
        output=str(out),
        shape=(len(bands), geom.height, geom.width),
        dtype=out_dtype,
        crs=geom.crs.to_string() if geom.crs is not None else None,
        transform=list(geom.out_transform)[:6] if geom.out_transform is not None else None,
        fuser=name,
        weights_sha256=sha,
        device=str(_fuser_device(fuser)),
        precision=opts.precision,
        ratio=geom.ratio,
        tiles=plan.count,
        tile=plan.tile,
        overlap=plan.overlap,
        seconds=round(seconds, 3),
        mpx_per_s=round(geom.height * geom.width / 1e6 / max(seconds, 1e-9), 4),
        nodata=nodata,
        internal_mask=use_mask,
        valid_fraction=round(n_valid / (geom.height * geom.width), 6),
        shift_measured=shift,
        shift_applied=bool(opts.coregister and shift is not None),
        bytes=out.stat().st_size,
        pan=str(pan_path),
        ms=str(ms_path),
        quicklook=quick,
        warnings=caught,
        adapt=adapted,
    )


def _adapt(
    fuser: Fuser, source: _PairSource, geom: align.Alignment, opts: FuseOptions
) -> dict[str, Any] | None:
    """`--adapt N`: fine-tune the network on the central part of this scene before fusing it
    (target-adaptive, `fusion_cli.training.adapt`); the weights on disk are not changed."""
    if not opts.adapt:
        return None
    from fusion_cli.training.adapt import adapt_fuser

    m = math.lcm(geom.ratio, max(1, int(fuser.tile_multiple)))
    h, w = min(geom.height, 1024) // m * m, min(geom.width, 1024) // m * m
    row, col = (geom.height - h) // 2 // m * m, (geom.width - w) // 2 // m * m
    window = source.read(row, col, h, w)
    return asdict(adapt_fuser(fuser, window.pan, window.ms, opts.adapt))


def _side_outputs(out: str | os.PathLike[str], opts: FuseOptions) -> list[Path]:
    """Files written beside the product, which obey --overwrite as it does."""
    return [Path(out).with_suffix(".png")] if opts.quicklook else []


def _write_quicklook(out: Path, fuser: Fuser, overwrite: bool) -> str | None:
    """A PNG beside the product, from a decimated read (bounded memory)."""
    try:
        from fusion_cli.quicklook import save_quicklook
    except ImportError:
        return None
    from rasterio.windows import Window as RWindow

    with raster.gdal_env(), raster.open_raster(out, "output") as ds:
        scale = max(1, math.ceil(max(ds.height, ds.width) / 1024))
        shape = (max(1, ds.height // scale), max(1, ds.width // scale))
        img = raster.read_decimated(
            ds, list(range(1, ds.count + 1)), RWindow(0, 0, ds.width, ds.height), shape
        )
        rgb = _rgb_bands(fuser, list(ds.descriptions), ds.count)
        # Nodata stays out of the stretch percentiles (and is drawn black).
        mask = ds.dataset_mask(out_shape=shape) > 0
    png = out.with_suffix(".png")
    with raster.atomic_output(png, overwrite, "quicklook") as tmp:
        save_quicklook(tmp, img.astype(np.float32), rgb=rgb, mask=mask)
    return str(png)


def _rgb_bands(fuser: Fuser, descriptions: list[str | None], count: int) -> tuple[int, int, int]:
    """0-based (r, g, b) band indexes: from the fuser's card or band names, else a common guess."""
    names = [
        str(n or "").lower() for n in (getattr(getattr(fuser, "card", None), "bands", None) or descriptions)
    ]

    def find(*keys: str) -> int | None:
        for i, n in enumerate(names):
            if any(k in n for k in keys):
                return i
        return None

    r, g, b = find("red", "b4"), find("green", "b3"), find("blue", "b2")
    if r is not None and g is not None and b is not None:
        return r, g, b
    if count >= 3:
        return (2, 1, 0) if count <= 4 else (4, 2, 1)  # BGR(N) order; WV3 8-band: red, green, blue
    return 0, 0, 0


def _resolve_fuser(
    pan: str | os.PathLike[str],
    ms: str | os.PathLike[str],
    out: str | os.PathLike[str],
    model: str | None,
    weights: str | os.PathLike[str] | None,
    method: str | None,
    opts: FuseOptions,
    sensor: str | None,
) -> Fuser:
    # Fail on bad inputs or an unwritable output before loading a model (which takes time).
    raster.check_writable(out, opts.overwrite, [pan, ms], _side_outputs(out, opts))
    ratio = measure_ratio(pan, ms, opts.reproject)
    n_bands = len(opts.bands) if opts.bands else None
    pan_count = len(opts.pan_bands) if opts.pan_bands else _band_count(pan, "PAN")
    return make_fuser(
        model=model,
        weights=weights,
        method=method,
        ratio=ratio if method is not None else None,
        sensor=sensor,
        device=opts.device,
        precision=opts.precision,
        dn_max=opts.dn_max,
        ms_bands=n_bands,
        pan_bands=pan_count,
        scan_memory=opts.scan_memory,
        ensemble=opts.ensemble,
    )


def _band_count(path: str | os.PathLike[str], what: str) -> int:
    with raster.open_raster(path, what) as ds:
        return int(ds.count)


def _options(opts: dict[str, Any]) -> FuseOptions:
    valid = set(FuseOptions.__dataclass_fields__)
    bad = sorted(set(opts) - valid)
    if bad:
        raise TypeError(f"unknown option(s): {', '.join(bad)}")
    return FuseOptions(**opts)


def pansharpen(
    pan: str | os.PathLike[str],
    ms: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    method: str | None = None,
    sensor: str | None = None,
    **opts: Any,
) -> FuseSummary:
    """PAN + MS (or PAN + HSI with a hyperspectral model) -> fused GeoTIFF; options as FuseOptions."""
    options = _options(opts)
    raster.check_same_file(pan, ms)
    # a classical method would silently treat a multi-band "PAN" as an MSI (HISR)
    pan_count = _band_count(pan, "PAN") if method is not None and options.pan_bands is None else 1
    if pan_count > 1:
        raise FusionError(
            f"the PAN {pan} has {pan_count} bands; pansharpening needs a single-band PAN "
            "(for a multispectral high-resolution image use `fusion hisr`)"
        )
    return _fuse(pan, ms, out, model, weights, method, options, sensor)


def _fuse(
    pan: str | os.PathLike[str],
    ms: str | os.PathLike[str],
    out: str | os.PathLike[str],
    model: str | None,
    weights: str | os.PathLike[str] | None,
    method: str | None,
    options: FuseOptions,
    sensor: str | None,
) -> FuseSummary:
    fuser = _resolve_fuser(pan, ms, out, model, weights, method, options, sensor)
    return fuse_files(pan, ms, out, fuser, options)


def hisr(
    hsi: str | os.PathLike[str],
    msi: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    method: str | None = None,
    sensor: str | None = None,
    **opts: Any,
) -> FuseSummary:
    """Low-resolution HSI + high-resolution MSI -> HSI at the MSI resolution (the MSI is the "pan")."""
    return _fuse(msi, hsi, out, model, weights, method, _options(opts), sensor)


def iter_windows(plan: TilePlan) -> Iterator[Window]:
    """All windows of a plan, row strip by row strip (for callers that drive their own loop)."""
    return iter(plan)
