"""`fusion batch --dask ADDRESS`: the scenes of a plan as tasks on an existing Dask cluster.

No home-made scheduler: Dask places the tasks, reschedules them when a worker dies and reports
what failed. Each worker thread builds its fuser once (cached below) and reuses it for every
scene it receives; every task runs `execute_scene`, so skipping, locking, retries and the result
records are exactly those of the local path. Workers must see IN_DIR and OUT_DIR at the same
paths (a shared filesystem), as with any file-based cluster job.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusion_cli.batch import (
    BatchSummary,
    FuseJob,
    JsonlLog,
    Plan,
    Scene,
    SceneProcessor,
    SceneResult,
    execute_scene,
    make_scene_processor,
    unpaired_results,
)
from fusion_cli.errors import FusionError

ProcessorFactory = Callable[[FuseJob], SceneProcessor]

# Per worker thread: a model is not shared between threads (fusers that accumulate scene
# statistics are stateful), and a GPU worker normally runs one thread anyway.
_LOCAL = threading.local()


def worker_processor(job: FuseJob, factory: ProcessorFactory = make_scene_processor) -> SceneProcessor:
    """The processor for `job` in this worker thread, built on first use and then reused."""
    cache: dict[str, SceneProcessor] = getattr(_LOCAL, "cache", None) or {}
    _LOCAL.cache = cache
    key = f"{getattr(factory, '__module__', '')}.{getattr(factory, '__qualname__', '')}:{job.cache_key()}"
    if key not in cache:
        cache[key] = factory(job)
    return cache[key]


def fuse_scene_task(
    scene: Scene,
    job: FuseJob,
    overwrite: bool,
    retries: int,
    factory: ProcessorFactory = make_scene_processor,
) -> SceneResult:
    """What one Dask task runs. A fuser that cannot be built fails the scene, not the worker."""
    try:
        process = worker_processor(job, factory)
    except FusionError as exc:
        return SceneResult(scene.id, str(scene.pan), str(scene.ms), str(scene.out), "failed", reason=str(exc))
    # a scene another run holds is waited for here: the task is the scene's only try
    return execute_scene(scene, process, overwrite=overwrite, retries=retries, wait_for_lock=math.inf)


def connect(address: str) -> Any:
    """A `distributed.Client` for a scheduler address (`tcp://host:8786`) or a scheduler file."""
    try:
        from distributed import Client
    except ImportError:
        raise FusionError("--dask needs dask.distributed: pip install 'fusion-cli[dask]'") from None
    scheduler_file = Path(address).is_file()  # dask-jobqueue / dask-mpi write one on HPC
    if scheduler_file:
        _check_scheduler_file(Path(address))
    try:
        if scheduler_file:
            return Client(scheduler_file=address, timeout="15s")
        return Client(address, timeout="15s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise FusionError(f"cannot connect to the Dask scheduler at {address}: {exc}") from None


def _check_scheduler_file(path: Path) -> None:
    """A scheduler file is the JSON a Dask scheduler writes, with its "address": anything else made
    `distributed` fail with an AssertionError traceback."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("address"), str):
        raise FusionError(
            f'--dask {path} is not a Dask scheduler file (JSON with an "address"); give the file '
            "`dask scheduler --scheduler-file` wrote, or an address like tcp://host:8786"
        )


def _failure_reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return (
            "the Dask worker holding this scene died (KilledWorker, after the scheduler's allowed "
            "retries): this scene or another one on that worker likely ran out of memory"
        )
    return f"{name}: {exc}".strip()


def run_batch_dask(
    plan: Plan,
    job: FuseJob,
    address: str | Any,
    *,
    overwrite: bool = False,
    retries: int = 0,
    log: Path | None = None,
    on_result: Callable[[SceneResult], None] | None = None,
    factory: ProcessorFactory = make_scene_processor,
) -> BatchSummary:
    """Submit every scene of `plan` to the cluster at `address` (or an existing Client) and
    collect the results as they finish, logging each like the local path."""
    from distributed import as_completed

    client = connect(address) if isinstance(address, str) else address
    journal = JsonlLog(log, plan)
    results: list[SceneResult] = []
    t0 = time.perf_counter()

    def record(r: SceneResult) -> None:
        results.append(r)
        journal.write(r, plan.shard)
        if on_result is not None:
            on_result(r)

    for r in unpaired_results(plan):
        record(r)
    run_id = uuid.uuid4().hex[:8]
    futures = {}
    for i, scene in enumerate(plan.scenes):
        fut = client.submit(
            fuse_scene_task, scene, job, overwrite, retries, factory, key=f"fusion-{run_id}-{i}", pure=False
        )
        futures[fut.key] = (fut, scene)
    interrupted = False
    try:
        for fut in as_completed([f for f, _ in futures.values()]):
            scene = futures[fut.key][1]
            if fut.status == "finished":
                record(fut.result())
            else:
                exc = fut.exception()
                r = SceneResult(scene.id, str(scene.pan), str(scene.ms), str(scene.out), "failed")
                r.reason = _failure_reason(exc) if exc is not None else f"task {fut.status}"
                record(r)
    except KeyboardInterrupt:
        interrupted = True
        client.cancel([f for f, _ in futures.values()])
    finally:
        if isinstance(address, str):
            client.close()
    return BatchSummary(results, time.perf_counter() - t0, plan.shard, interrupted)
