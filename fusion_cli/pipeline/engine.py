"""The streaming engine shared by files and arrays: plan the tiles, read windows ahead in a
background thread, fuse them in batches (CPU fusers: one single-threaded window per torch thread),
blend the results strip by strip and hand finished blocks to a sink."""

from __future__ import annotations

import contextlib
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from fusion_cli import align, raster
from fusion_cli.errors import FusionError, short_list
from fusion_cli.fusers import Fuser, SensorBound
from fusion_cli.notices import notify
from fusion_cli.pipeline.options import DEFAULT_OVERLAP, DEFAULT_TILE, FuseOptions
from fusion_cli.pipeline.readers import PairSource, Tile
from fusion_cli.signals import ThreadPool, deferred_signals
from fusion_cli.tiling import (
    StripAccumulator,
    TilePlan,
    Window,
    blend_weights,
    core_region,
    plan_tiles,
    weighted_region,
)

# (row0, col0, data (C, h, w) float32, valid (h, w) bool) of a finished output block
Sink = Callable[[int, int, np.ndarray, np.ndarray], None]


def fit_sensor_bands(
    fuser: Fuser, file_bands: int, selected: Sequence[int] | None, stated: Sequence[int] | None
) -> list[int] | None:
    """Tell a classical method (a `SensorBound`: the per-scene copy `scene_fuser` made) which of its
    sensor's bands the fused MS bands are, so each gets its own MTF gain: `selected` (1-based of the
    `file_bands` MS bands, None: all) mapped through `stated` (--sensor-bands) or the sensor's own
    order. Returns the numbers (None: not known, or the sensor has one gain for all bands). A method
    built with `sensor_bands` (the library's `make_method`) takes them as the MS's own, as `stated`.
    Where the numbers are not known, the method's gains refuse a pick from the file (`ms_file_bands`)."""
    from fusion_cli.sensors import check_sensor_bands_use, sensor_band_numbers

    check_sensor_bands_use(stated, getattr(fuser, "sensor", None), isinstance(fuser, SensorBound))
    if not isinstance(fuser, SensorBound):
        return None
    given = stated if stated is not None else fuser.sensor_bands
    fuser.sensor_bands = sensor_band_numbers(fuser.sensor, file_bands, selected, given)
    fuser.ms_file_bands = file_bands
    return fuser.sensor_bands


def check_fuser(fuser: Fuser, pan_count: int, ms_count: int) -> None:
    """The pair's band counts against what the fuser expects (one-line errors that say what to do)."""
    if fuser.ms_bands is not None and ms_count != fuser.ms_bands:
        expected = list(fuser.card.bands) if fuser.card is not None and fuser.card.bands else []
        hint = f" ({short_list(expected)})" if expected else ""
        todo = (
            "select the MS bands that are these, in this order, with --bands (1-based MS band numbers)"
            if ms_count > fuser.ms_bands
            else "it cannot run on fewer; pick a model or method for this input"
        )
        raise FusionError(
            f"the MS has {ms_count} bands but {fuser.name} expects {fuser.ms_bands}{hint}; {todo}"
        )
    if pan_count != fuser.pan_bands:
        raise FusionError(
            f"the high-resolution input has {pan_count} bands but {fuser.name} "
            f"expects {fuser.pan_bands}; select them (--pan-bands), or pick a model or method for this "
            "pair"
        )


# How far (um) an MS band's stated centre may lie from the model band's, beyond its half-width:
# Hyperion's bands are ~10 nm apart, so one band off is refused
WAVELENGTH_SLACK_UM = 0.005


def check_band_wavelengths(
    fuser: Fuser, ms_ds: Any, bands: Sequence[int], pan_ds: Any = None, pan_bands: Sequence[int] = ()
) -> None:
    """Where the MS (or the PAN: HISR's MSI) states a band's wavelength and the fuser's card gives its
    own, refuse bands in another order or one band off: a reversed Hyperion cube fused at exit 0 with
    the product's wavelength tags contradicting its band names, an off-by-one --bands fed a dead band,
    and --pan-bands 6,5,4,3,2,1 or 1,1,1,1,1,1 of an ALI MSI fused at exit 0 (ERGAS 1.77 -> 3.32).
    Bands that state no wavelength are not compared."""
    if fuser.card is None:
        return
    _check_wavelengths(fuser, fuser.card.bands, ms_ds, bands, "MS", "--bands")
    if pan_ds is not None:
        _check_wavelengths(fuser, fuser.card.pan_bands, pan_ds, pan_bands, "PAN", "--pan-bands")


def _check_wavelengths(
    fuser: Fuser, names: Sequence[str], ds: Any, bands: Sequence[int], what: str, option: str
) -> None:
    from fusion_cli.wavelengths import bandpasses_of_names, of_raster

    expected = bandpasses_of_names(names)
    given = of_raster(ds, bands)
    if expected is None or len(expected) != len(given):
        return
    for i, (passes, got) in enumerate(zip(expected, given, strict=True)):
        if got is None:
            continue
        # within any of the sensors' bandpasses the card names (landsat: an ETM+ NIR at 830 nm is
        # outside OLI's 851-879 nm); the card's band width only: Hyperion's own FWHM (~10 nm) would
        # let one band off pass
        if all(
            abs(want.centre_um - got.centre_um) > WAVELENGTH_SLACK_UM + (want.fwhm_um or 0) / 2
            for want in passes
        ):
            # the PAN's band by its wavelengths: `fusion hisr` renames PAN/MS in messages, and would
            # in an ALI card name too
            theirs = f"band {i + 1} of {fuser.name} is {names[i]}"
            if what == "PAN":
                span = " or ".join(_nm(w) for w in passes)
                theirs = f"PAN band {i + 1} of {fuser.name} is at {span}"
            advice = f"pass {option} with the {what} bands in the model's order (`fusion info` lists them)"
            if len(raster.select_bands(ds, None, what, read=False)) == 1:  # nothing to pick from
                advice = "this model was made for another sensor's bands (`fusion info` lists them)"
            nm = got.centre_um * 1000
            raise FusionError(f"{what} band {bands[i]} is at {nm:.0f} nm but {theirs}; {advice}")


def _nm(w: Any) -> str:
    """A bandpass as text, `433-453 nm` (or its centre, `590 nm`, without a width)."""
    if not w.fwhm_um:
        return f"{w.centre_um * 1000:.0f} nm"
    return f"{(w.centre_um - w.fwhm_um / 2) * 1000:.0f}-{(w.centre_um + w.fwhm_um / 2) * 1000:.0f} nm"


# How much larger than the default tile a scene may be and still be fused in one window (its area:
# up to 1.56x a default window's memory).
ONE_WINDOW_SLACK = 1.25


def plan_for(fuser: Fuser, geom: align.Alignment, opts: FuseOptions) -> TilePlan:
    """The tile plan of a scene: the options' tile and overlap, else the fuser's preferred ones."""
    multiple = math.lcm(geom.ratio, max(1, int(fuser.tile_multiple)))
    if opts.batch < 1:
        raise FusionError("--batch must be at least 1")
    tile = opts.tile
    if tile is None:
        tile = fuser.preferred_tile if fuser.preferred_tile is not None else DEFAULT_TILE
        side = max(geom.height, geom.width)
        if side <= tile * ONE_WINDOW_SLACK:
            # A scene a little larger than the default tile is fused in one window: splitting it
            # pays the halo twice for a sliver (the 319 x 639 example at 512: 26 % more pixels).
            tile = side
    overlap = opts.overlap
    if overlap is None:
        overlap = fuser.preferred_overlap if fuser.preferred_overlap is not None else DEFAULT_OVERLAP
    plan = plan_tiles(geom.height, geom.width, int(tile), int(overlap), int(fuser.halo), multiple)
    if opts.overlap is not None and plan.overlap < opts.overlap:  # it cannot exceed the tile
        notify(f"--overlap {opts.overlap} is over the tile ({plan.tile} PAN px); blending {plan.overlap}")
    return plan


# torch's thread count is process-wide: runs that set it at once (two fusions in two threads of one
# program) share it. Each holds its setting here; the newest holder's applies, and the count from
# before the first returns when the last one ends (each restoring what it found left two overlapping
# runs' caller with the other's count).
_THREADS_LOCK = threading.Lock()
_THREADS_HELD: list[tuple[object, int]] = []  # (holder, count), oldest first
_THREADS_BEFORE: list[int] = []


@contextlib.contextmanager
def _holding_threads(count: int) -> Iterator[None]:
    holder = object()  # its own entry: two runs may ask for the same count
    with _THREADS_LOCK:
        if not _THREADS_HELD:
            _THREADS_BEFORE[:] = [torch.get_num_threads()]
        _THREADS_HELD.append((holder, count))
        torch.set_num_threads(count)
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_HELD[:] = [entry for entry in _THREADS_HELD if entry[0] is not holder]
            torch.set_num_threads(_THREADS_HELD[-1][1] if _THREADS_HELD else _THREADS_BEFORE[0])


@contextlib.contextmanager
def run_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads for the run, when given: process-wide meanwhile (torch has no other
    setting), the caller's count restored after (a library call must not leave it changed)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise FusionError("--threads must be at least 1")
    with _holding_threads(threads):
        yield


@contextlib.contextmanager
def caller_autocast_off() -> Iterator[None]:
    """A run in the precision its fusers state: a caller's own `torch.autocast` (thread-local, so
    the windows fused in worker threads never saw it) ran the statistics pass and the fusion on this
    thread in bf16 (221 DN off under a notebook's CPU autocast, tags saying fp32). A network with
    --precision bf16/fp16 enters its own autocast inside."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


@contextlib.contextmanager
def single_threaded(enabled: bool) -> Iterator[None]:
    """torch intra-op threads set to 1 meanwhile (restored after) when `enabled`."""
    if not enabled:
        yield
        return
    with _holding_threads(1):
        yield


def read_ahead(
    source: PairSource, boxes: Iterable[tuple[int, int, int, int]], depth: int = 2
) -> Iterator[Tile]:
    """`source.read(*box)` for each box, in order, read by one background thread up to `depth` boxes
    ahead: GDAL decodes (releasing the GIL) while the caller fuses or writes. Only that thread touches
    the input datasets meanwhile; the generator must be exhausted or closed before anything else does."""
    with ThreadPool(max_workers=1, thread_name_prefix="fusion-read") as pool:
        ahead: deque[Future[Tile]] = deque()
        it = iter(boxes)
        try:
            for box in it:
                ahead.append(pool.submit(source.read, *box))
                if len(ahead) > depth:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            # the inputs are closed next: the reading thread must be done with them first, whatever
            # Ctrl-C comes meanwhile (a second one abandoned the wait, and GDAL crashed the process)
            with deferred_signals():
                for fut in ahead:
                    fut.cancel()
                pool.shutdown(wait=True)


def window_workers(fuser: Fuser) -> int:
    """Windows fused concurrently: CPU fusers that declare `parallel_windows` (the classical methods:
    small element-wise ops, where torch's intra-op threads mostly wait on each other, and badly so on
    a busy machine) run one single-threaded window per torch thread instead."""
    if not fuser.parallel_windows or fuser.device.type != "cpu":
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
    with single_threaded(True), ThreadPool(max_workers=workers) as pool:
        yield pool


def run(
    fuser: Fuser,
    source: PairSource,
    plan: TilePlan,
    bands: int,
    sink: Sink,
    batch: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Fuse every window of `plan`, blend, and pass finished blocks to `sink(row0, col0, data, valid)`.
    `progress(pixels)` is called once per window when its result is blended, with its core's output
    pixels."""
    dev = fuser.device
    # One strip plus its blend zone; tiles that are not a multiple of the output block leave up to
    # a block of finished rows waiting for block-aligned writing.
    capacity = plan.tile + plan.overlap + (0 if plan.tile % raster.BLOCK == 0 else raster.BLOCK)
    acc = StripAccumulator(bands, plan.height, plan.width, capacity)
    workers = window_workers(fuser)
    if workers > 1:
        batch = 1  # one window per worker: the parallelism is across windows

    def fuse_batch(items: list[tuple[Window, Tile]]) -> list[np.ndarray]:
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
            if not np.isfinite(fused).all():  # cast to an integer type, NaN wrote 0s at exit 0
                raise FusionError(
                    f"{fuser.name} gave {int((~np.isfinite(fused)).sum())} non-finite values (NaN or inf): "
                    "these inputs are degenerate for it (a PAN of almost no contrast, or DN at or below 0 "
                    "for a method that divides by them?); check them, or try another --method"
                )
            for i, f in zip(idx, fused, strict=True):
                out[i] = f
        return out  # type: ignore[return-value]

    def blend(items: list[tuple[Window, Tile]], out: list[np.ndarray]) -> None:
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
    queue: deque[tuple[list[tuple[Window, Tile]], list[tuple[Window, Tile]], Future[list[np.ndarray]] | None]]
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
                progress(math.prod(plan.core_shape(win)))

    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(_window_threads(workers))
        depth = 2 * workers if pool is not None else 0  # results waiting: bounded memory

        def submit(group: list[tuple[Window, Tile]], work: list[tuple[Window, Tile]]) -> None:
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
        tiles = stack.enter_context(contextlib.closing(read_ahead(source, boxes)))
        group: list[tuple[Window, Tile]] = []  # every window since the last fuser call
        work: list[tuple[Window, Tile]] = []  # those with data (an all-nodata window needs no inference)
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
