"""Running a plan: each scene under its lock, skipped when complete, retried, never stopping the batch;
a JSON-lines log, read-ahead of the next inputs, and the summary.

Deliberately independent of how one scene is fused: `run_batch` takes a `process(scene) -> dict`
callable (`fusion.make_scene_processor` builds the real one). The Dask path (`fusion_cli.batch_dask`)
reuses `execute_scene`, so both report alike.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, as_completed, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fusion_cli import jsonout, notices
from fusion_cli.batch.locking import lock_file, remove_stale_temporaries, scene_lock
from fusion_cli.batch.pairing import Plan, Scene
from fusion_cli.errors import FusionError
from fusion_cli.raster import file_identity, same_file
from fusion_cli.signals import ThreadPool, interrupt_behind

LOG_VERSION = 1

SceneProcessor = Callable[[Scene], dict[str, Any]]


@runtime_checkable
class FinishingProcessor(Protocol):
    """A processor whose products have side files (quicklook, metrics) written after the product is
    placed (`fusion.make_scene_processor`): a complete product lacking one gets it from `finish`. A
    complete product that another fuser or pixel type made than this run asks for is not taken as
    done (`made_otherwise` says how it differs; None: as asked)."""

    def __call__(self, scene: Scene) -> dict[str, Any]: ...
    def side_files(self, out: Path) -> list[Path]: ...
    def finish(self, scene: Scene) -> dict[str, Any]: ...
    def made_otherwise(self, scene: Scene) -> str | None: ...


CompleteCheck = Callable[[Path], bool]


@dataclass
class SceneResult:
    scene: str
    pan: str
    ms: str
    out: str
    status: str  # done | skipped | failed (and busy: another run holds it, which `run_batch` waits out)
    reason: str | None = None
    seconds: float = 0.0
    pan_mpx: float = 0.0  # output (PAN-grid) megapixels, for throughput
    attempts: int = 0
    worker: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # the per-scene fusion summary / metrics

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchSummary:
    results: list[SceneResult]
    seconds: float
    shard: tuple[int, int] | None = None
    interrupted: bool = False
    signum: int = 2  # the signal that interrupted it (SIGINT: Ctrl-C; SIGTERM, SIGHUP)
    unfinished: list[str] = field(default_factory=list)  # scenes an interrupt cut short or kept from starting

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def done(self) -> int:
        return self.count("done")

    @property
    def skipped(self) -> int:
        return self.count("skipped")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def mpx_done(self) -> float:
        return sum(r.pan_mpx for r in self.results if r.status == "done")

    @property
    def mpx_per_s(self) -> float:
        """Output (PAN-grid) megapixels fused per second of wall time: the batch's throughput,
        all workers together on Dask."""
        return self.mpx_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def mpx_per_busy_s(self) -> float:
        """Megapixels per second spent fusing (one worker's speed, without skips and start-up)."""
        busy = sum(r.seconds for r in self.results if r.status == "done")
        return self.mpx_done / busy if busy > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0: everything done or skipped; 1: some scene failed; 128 + the signal when interrupted (130:
        Ctrl-C, 143: SIGTERM), as the process exits."""
        if self.interrupted:
            return 128 + self.signum
        return 1 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "pan_mpx_done": round(self.mpx_done, 3),
            "mpx_per_s": round(self.mpx_per_s, 4),
            "mpx_per_busy_s": round(self.mpx_per_busy_s, 4),
            "shard": None if self.shard is None else f"{self.shard[0]}/{self.shard[1]}",
            "interrupted": self.interrupted,
            "exit_code": self.exit_code,
            "scenes": [r.to_dict() for r in self.results],
            "unfinished": self.unfinished,
        }


def _default_complete_check(path: Path) -> bool:
    from fusion_cli.raster import is_complete_output

    return is_complete_output(path)


def planned_action(
    out: Path,
    side_files: list[Path],
    *,
    overwrite: bool = False,
    is_complete: CompleteCheck | None = None,
    made_otherwise: Callable[[Path], str | None] | None = None,
) -> str:
    """What a run does with a scene whose output is `out`, decided once for `--dry-run` and the run:

    "fuse" (no output yet), "redo" (an output exists and --overwrite), "skip" (a complete product
    with every side file), "finish" (a complete product lacking a side file: it is written from the
    product, no second fusion), "refuse" (not a complete fusion-cli product: failed without
    --overwrite, never replaced) or "other" (a complete product that another fuser or --dtype made,
    as `made_otherwise` tells: failed without --overwrite).
    """
    if not out.exists():
        return "fuse"
    if overwrite:
        return "redo"
    if not (is_complete or _default_complete_check)(out):
        return "refuse"
    if made_otherwise is not None and made_otherwise(out) is not None:
        return "other"
    return "skip" if all(side.exists() for side in side_files) else "finish"


def _output_mpx(path: Path) -> float:
    try:
        from fusion_cli.raster import open_raster

        with open_raster(path, "product") as ds:
            return ds.width * ds.height / 1e6
    except Exception:  # throughput is informative; never fail a finished scene over it
        return 0.0


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def execute_scene(
    scene: Scene,
    process: SceneProcessor,
    *,
    overwrite: bool = False,
    retries: int = 0,
    is_complete: CompleteCheck | None = None,
    wait_for_lock: float = 0.0,
) -> SceneResult:
    """Fuse one scene unless its output is already complete; never raises for a bad scene.

    A scene another live run holds is "busy", unless it lets go within `wait_for_lock` seconds: the
    scene is then done or skipped as its output then is (that run may have died without it).

    A `FusionError` (bad input: the same on every attempt) fails at once; other exceptions (an
    I/O hiccup, a GPU out of memory) are retried up to `retries` times. KeyboardInterrupt passes,
    also when it surfaces as another error raised by a cleanup step on its way out.
    """
    with notices.collected() as said:  # this scene's warnings, in its result (scenes run in threads)
        result = _execute_scene(scene, process, overwrite, retries, is_complete, wait_for_lock)
    if said:
        told = result.details.get("warnings", [])  # the fusion's own
        result.details["warnings"] = [*told, *(m for m in said if m not in told)]
    return result


def _execute_scene(
    scene: Scene,
    process: SceneProcessor,
    overwrite: bool,
    retries: int,
    is_complete: CompleteCheck | None,
    wait_for_lock: float,
) -> SceneResult:
    check = is_complete or _default_complete_check
    base = dict(
        scene=scene.id, pan=str(scene.pan), ms=str(scene.ms), out=str(scene.out), worker=_worker_name()
    )
    try:
        scene.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return SceneResult(status="failed", reason=f"cannot create the output folder: {exc}", **base)
    if not os.access(scene.out.parent, os.W_OK | os.X_OK):
        why = f"output folder {scene.out.parent} is not writable; choose another OUT_DIR"
        return SceneResult(status="failed", reason=why, **base)
    if lock_file(scene.out).is_symlink():
        why = f"{lock_file(scene.out).name}, the lock file of {scene.out.name}, is a symlink; remove it"
        return SceneResult(status="failed", reason=why, **base)
    try:
        return _execute_locked(scene, process, overwrite, retries, check, base, wait_for_lock)
    except OSError as exc:  # taking the lock or clearing stale files (no file handle left, a full disk)
        interrupt = interrupt_behind(exc)
        if interrupt is not None:  # a cleanup step failed under Ctrl-C: still Ctrl-C
            raise interrupt from None
        why = f"cannot take the scene's lock or clear its stale files: {exc}"
        return SceneResult(status="failed", reason=why, **base)


def _execute_locked(
    scene: Scene,
    process: SceneProcessor,
    overwrite: bool,
    retries: int,
    check: CompleteCheck,
    base: dict[str, Any],
    wait_for_lock: float,
) -> SceneResult:
    """`execute_scene` under the scene's lock."""
    with scene_lock(scene.out, wait=wait_for_lock) as mine:
        if not mine:
            return SceneResult(status="busy", reason="another running batch holds this scene", **base)
        remove_stale_temporaries(scene.out)
        finishing = isinstance(process, FinishingProcessor)
        sides = process.side_files(scene.out) if finishing else []
        # asked once: it opens the product (and the scene's MS), and the refusal quotes it again
        made_otherwise = functools.cache(lambda _out: process.made_otherwise(scene)) if finishing else None
        action = planned_action(
            scene.out, sides, overwrite=overwrite, is_complete=check, made_otherwise=made_otherwise
        )
        if action == "refuse":
            why = (
                f"output {scene.out} exists but is not a complete fusion-cli product "
                "(a foreign or damaged file); use --overwrite to redo it"
            )
            return SceneResult(status="failed", reason=why, **base)
        if action == "other" and made_otherwise is not None:  # --method mtf-glp kept GSA products
            why = (
                f"output {scene.out} is complete but {made_otherwise(scene.out)}; pass --overwrite to redo "
                "it as asked, or choose another OUT_DIR"
            )
            return SceneResult(status="failed", reason=why, **base)
        if action == "skip":
            return SceneResult(status="skipped", reason="output complete", **base)
        if action == "finish":
            # placed just before an interrupt, without its quicklook or metrics: those are written
            try:
                details = process.finish(scene)
            except Exception as exc:  # noqa: BLE001 - one scene must not stop the batch
                interrupt = interrupt_behind(exc)
                if interrupt is not None:
                    raise interrupt from None
                why = f"output complete, but writing its side files failed: {type(exc).__name__}: {exc}"
                return SceneResult(status="failed", reason=why, **base)
            why = "output complete; its missing side files written"
            return SceneResult(status="skipped", reason=why, details=details, **base)
        t0 = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            try:
                details = process(scene) or {}
            except Exception as exc:  # noqa: BLE001 - one corrupt scene must not stop the batch
                interrupt = interrupt_behind(exc)
                if interrupt is not None:  # a cleanup step failed under Ctrl-C: still Ctrl-C
                    raise interrupt from None
                if isinstance(exc, FusionError):
                    reason, details = str(exc), {}
                    break
                reason = f"{type(exc).__name__}: {exc}".strip()
                details = {"traceback": traceback.format_exc(limit=6)}
                if attempts <= retries:
                    continue
                break
            else:
                elapsed = time.perf_counter() - t0
                mpx = _output_mpx(scene.out)
                return SceneResult(
                    status="done", seconds=elapsed, pan_mpx=mpx, attempts=attempts, details=details, **base
                )
        elapsed = time.perf_counter() - t0
        return SceneResult(
            status="failed", reason=reason, seconds=elapsed, attempts=attempts, details=details, **base
        )


def unpaired_results(plan: Plan) -> list[SceneResult]:
    """Unpaired inputs as failed results, so they appear in the log, the summary and the exit code."""
    return [
        SceneResult(
            scene=u.path.name, pan="", ms="", out="", status="failed", reason=u.reason, worker=_worker_name()
        )
        for u in plan.unpaired
    ]


SideFiles = Callable[[Path], list[Path]]  # the files written beside an output (`FuseJob.side_files`)


def check_side_files(plan: Plan, side_files: SideFiles) -> None:
    """Refuse a plan where a scene's side file (its quicklook, its metrics) is another scene's output
    or side file: `a.tif` and `a.tiff` share `a.png`, and the second scene's quicklook replaced the
    first's at exit 0."""
    from fusion_cli.raster.checks import SIDE_TEMP_NAME_EXTRA, check_name_length

    owner: dict[tuple[object, ...], Scene] = {file_identity(s.out): s for s in plan.scenes}
    for s in plan.scenes:
        check_name_length(s.out)  # names too long for their temporaries: refused before any work
        for side in side_files(s.out):
            check_name_length(side, SIDE_TEMP_NAME_EXTRA)
            other = owner.setdefault(file_identity(side), s)
            if other is not s:  # scene ids may be equal too (`a` of both a.tif and a.tiff)
                raise FusionError(
                    f"the scenes of {other.out} and {s.out} would both write {side}; give their outputs "
                    "different names (not only another extension)"
                )


def check_log(path: Path | None, plan: Plan | None = None, side_files: SideFiles | None = None) -> None:
    """`--log` is appended to, so it must be a batch log: not a folder, not an input, output or side
    file of the plan, and, when it exists, a JSON-lines log (an image or document given by mistake
    would be modified). Refused with a FusionError before any scene runs."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise FusionError(f"--log {p} is a folder; give a file name like {p / 'batch.jsonl'}")
    for s in plan.scenes if plan is not None else ():
        for f in (s.pan, s.ms, s.out, *(side_files(s.out) if side_files else ())):
            if isinstance(f, Path) and same_file(p, f):  # a GDAL path (str) is never a local log
                raise FusionError(f"--log {p} is a file of scene {s.id!r} ({f}); choose another log file")
    if p.is_file() and p.stat().st_size > 0:
        with p.open("rb") as fh:
            first = fh.read(1 << 16).split(b"\n", 1)[0]
        try:
            record = json.loads(first)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "v" not in record:
            raise FusionError(
                f"--log {p} exists and is not a batch log (JSON lines); choose another log file"
            )


class JsonlLog:
    """Append-only JSON-lines log, one line per scene, flushed at once (a killed run keeps its lines).
    With the `plan`, the path is checked first (`check_log`)."""

    def __init__(self, path: Path | None, plan: Plan | None = None) -> None:
        check_log(path, plan)
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, result: SceneResult, shard: tuple[int, int] | None = None) -> None:
        if self.path is None:
            return
        record = {
            "v": LOG_VERSION,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
            **result.to_dict(),
        }
        # One write() of a whole line on an O_APPEND file: shards sharing a log do not interleave.
        line = jsonout.dumps(record) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.fstat(fd).st_size
                error: OSError = OSError(errno.ENOSPC, "short write (disk full?)")
                try:
                    written = os.write(fd, data)
                except OSError as exc:
                    written, error = -1, exc
                if written != len(data):
                    # a full disk or a size limit cut the record: take the half line back (unless
                    # another shard appended after it) rather than leave a line no reader can parse
                    with contextlib.suppress(OSError):
                        if os.fstat(fd).st_size == start + max(written, 0):
                            os.ftruncate(fd, start)
                    raise OSError(
                        error.errno, f"cannot append to the batch log {self.path}: {error.strerror}"
                    )
            finally:
                os.close(fd)


def _readahead(paths: Iterable[Path], chunk: int = 8 << 20) -> None:
    """Pull files into the OS page cache so the pipeline's reads of the next scene hit memory."""
    for p in paths:
        try:
            with open(p, "rb", buffering=0) as fh:
                while fh.read(chunk):
                    pass
        except OSError:
            pass  # the pipeline reports unreadable inputs itself


def run_batch(
    plan: Plan,
    process: SceneProcessor,
    *,
    overwrite: bool = False,
    retries: int = 0,
    log: Path | None = None,
    io_workers: int = 1,
    scene_workers: int = 1,
    is_complete: CompleteCheck | None = None,
    on_result: Callable[[SceneResult], None] | None = None,
    lock_timeout: float = math.inf,
) -> BatchSummary:
    """Run the plan's scenes with one `process` (one model instance).

    With `io_workers > 0`, threads read the inputs of the next `io_workers` scenes ahead while the
    current one is fused, so disk or network reads overlap inference. With `scene_workers > 1`,
    that many scenes are in flight at once through the same model (one scene's reads, blending
    and writes overlap another's inference); `process` must then be thread-safe, as
    `make_scene_processor`'s is (on an H100, 2 in flight gave bit-identical outputs but no speed-up
    for the launch-bound pure-PyTorch scan: it pays off when I/O dominates). Ctrl-C stops the
    batch: one scene in flight is interrupted (the pipeline removes its partial files); of several,
    the running ones finish and are logged, the others never start. The summary says so.

    A scene another live run holds (a duplicate array task, an overlapping cron run) is put off to
    the end, then waited for (at most `lock_timeout` seconds, then it fails): it counts as skipped
    only once that run placed its product, and is fused here if that run died first.
    """
    journal = JsonlLog(log, plan)
    results: list[SceneResult] = []
    t0 = time.perf_counter()
    by_out = {str(s.out): s for s in plan.scenes}
    busy: list[Scene] = []

    def record(r: SceneResult) -> None:
        if r.status == "busy":
            busy.append(by_out[r.out])
            return
        results.append(r)
        journal.write(r, plan.shard)
        if on_result is not None:
            on_result(r)

    def run_one(scene: Scene) -> SceneResult:
        return execute_scene(scene, process, overwrite=overwrite, retries=retries, is_complete=is_complete)

    for r in unpaired_results(plan):
        record(r)
    reader = ThreadPool(io_workers, thread_name_prefix="fusion-readahead") if io_workers > 0 else None
    queued = 0  # scenes whose inputs were handed to the read-ahead threads

    def read_ahead(upto: int) -> None:
        nonlocal queued
        while reader is not None and queued < min(upto, len(plan.scenes)):
            nxt = plan.scenes[queued]
            if overwrite or not nxt.out.exists():  # finished scenes are not read at all
                reader.submit(_readahead, [nxt.pan, nxt.ms])
            queued += 1

    interrupted, signum = False, signal.SIGINT
    try:
        if scene_workers <= 1:
            for i, scene in enumerate(plan.scenes):
                read_ahead(i + 1 + io_workers)
                record(run_one(scene))
        else:
            with ThreadPool(scene_workers, thread_name_prefix="fusion-scene") as pool:
                pending: set[Future[SceneResult]] = set()
                done: set[Future[SceneResult]] = set()  # recorded: never twice, even when interrupted
                submitted: list[Future[SceneResult]] = []  # in plan order

                def record_once(f: Future[SceneResult]) -> None:
                    if f not in done:
                        done.add(f)
                        record(f.result())

                try:
                    for i, scene in enumerate(plan.scenes):
                        read_ahead(i + scene_workers + io_workers)
                        submitted.append(pool.submit(run_one, scene))
                        pending.add(submitted[-1])
                        if len(pending) >= scene_workers:  # bounded: never the whole plan queued
                            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for f in finished:
                                record_once(f)
                    for f in as_completed(pending):
                        record_once(f)
                except KeyboardInterrupt:
                    # scenes not started never run; the running ones finish in their threads (the
                    # pool waits for them), so their rows belong in the log and the summary, as do
                    # finished ones the interrupt kept from being recorded (it can land between
                    # `wait` handing them back and their rows)
                    for f in [f for f in submitted if f not in done and not f.cancel()]:
                        try:
                            record_once(f)
                        except KeyboardInterrupt:
                            continue  # another Ctrl-C, or that scene's own interrupt: the next one
                    raise
        for scene in busy:
            notices.notify(f"waiting for {scene.id}: another running batch holds {lock_file(scene.out)}")
            r = execute_scene(
                scene, process, overwrite=overwrite, retries=retries, is_complete=is_complete,
                wait_for_lock=lock_timeout,
            )  # fmt: skip
            if r.status == "busy":  # still held: a hung or stopped run, or a slow one
                r.status = "failed"
                r.reason = (
                    f"another running batch still held it after {lock_timeout:g} s (--lock-timeout); "
                    "rerun once that batch ends"
                )
            record(r)
    except KeyboardInterrupt as exc:
        interrupted, signum = True, getattr(exc, "signum", signal.SIGINT)
    finally:
        if reader is not None:
            reader.shutdown(wait=False, cancel_futures=True)
    recorded = {r.out for r in results}
    unfinished = [s.id for s in plan.scenes if str(s.out) not in recorded]
    return BatchSummary(results, time.perf_counter() - t0, plan.shard, interrupted, signum, unfinished)
