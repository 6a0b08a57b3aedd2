"""Batch fusion of many scene pairs: pairing, planning, sharding, resumable execution, logging.

The engine is deliberately independent of how one scene is fused: `run_batch` takes a
`process(scene) -> dict` callable (built once by `make_scene_processor`, so one fuser / model
instance serves every scene) and handles everything around it: skipping complete outputs,
per-scene failures that never stop the batch, retries, a JSON-lines log and the summary.
The Dask path (`fusion_cli.batch_dask`) reuses `execute_scene`, so both report alike.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import glob
import hashlib
import json
import os
import re
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fusion_cli.errors import FusionError

# Naming conventions tried, in order, when the user gives no --pan/--ms patterns. Matching is
# case-insensitive and `.tif` also matches `.tiff`; each `*` captures part of the shared stem.
DEFAULT_CONVENTIONS: tuple[tuple[str, str], ...] = (
    ("*_PAN.tif", "*_MS.tif"),
    ("*_P.tif", "*_MS.tif"),
    ("*_PAN.tif", "*_MUL.tif"),
    ("PAN_*.tif", "MS_*.tif"),  # wv2_spacenet6: pan_1.tif / ms_1.tif
    ("PAN_*.tif", "MUL_*.tif"),  # SpaceNet: PAN_AOI_..._img1.tif / MUL_AOI_..._img1.tif
    ("*-P?AS-*.tif", "*-M?AS-*.tif"),  # Maxar ordering: ...-P2AS-..._P001.TIF / ...-M2AS-...
    ("IMG_*_P_*.tif", "IMG_*_MS_*.tif"),  # Pleiades / SPOT DIMAP image names
    ("*_B8.tif", "*_MS.tif"),  # Landsat 7/8/9 PAN band + a stacked MS of the same product id
    ("*_B8.tif", "*_stack.tif"),
)
DEFAULT_OUT_PATTERN = "{stem}_fused.tif"
LOG_VERSION = 1


@dataclass(frozen=True)
class Scene:
    """One unit of work: a PAN (or MSI) file, its MS (or HSI) partner and the output path."""

    id: str
    pan: Path
    ms: Path
    out: Path

    def to_dict(self) -> dict[str, str]:
        return {"scene": self.id, "pan": str(self.pan), "ms": str(self.ms), "out": str(self.out)}


@dataclass(frozen=True)
class Unpaired:
    """An input that could not be turned into a scene; reported as a failure, never ignored."""

    path: Path
    reason: str


@dataclass
class Plan:
    """What a batch will do, before doing it (`--dry-run` prints it)."""

    scenes: list[Scene]
    unpaired: list[Unpaired] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)  # files matching neither pattern (listed only)
    source: str = ""  # how pairs were found: the patterns or the manifest
    shard: tuple[int, int] | None = None  # (index 0-based, count) when sharded
    total_scenes: int = 0  # before sharding

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "shard": None if self.shard is None else f"{self.shard[0]}/{self.shard[1]}",
            "total_scenes": self.total_scenes,
            "scenes": [s.to_dict() for s in self.scenes],
            "unpaired": [{"path": str(u.path), "reason": u.reason} for u in self.unpaired],
            "ignored": [str(p) for p in self.ignored],
        }


# --------------------------------------------------------------------------------------------
# Pairing


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Glob -> regex where each `*` is a capture group (the stem); `?` matches one character.

    `*` does not cross `/`, `**` does; a trailing `.tif` also accepts `.tiff`.
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append("(.*)")
            i += 2
        elif pattern[i] == "*":
            out.append("([^/]*)")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    regex = "".join(out)
    if pattern.lower().endswith(".tif"):
        regex += "f?"
    return re.compile(regex + r"\Z", re.IGNORECASE)


def _literal_length(pattern: str) -> int:
    return len(pattern.replace("*", "").replace("?", ""))


def _list_files(in_dir: Path, recursive: bool, exclude: Path | None) -> list[str]:
    """Relative posix paths of the non-hidden files in `in_dir`, sorted (stable plans)."""
    if recursive:
        paths = [p for p in in_dir.rglob("*") if p.is_file()]
    else:
        paths = [p for p in in_dir.iterdir() if p.is_file()]
    rel = []
    for p in paths:
        r = p.relative_to(in_dir)
        if any(part.startswith(".") for part in r.parts):
            continue  # hidden files and our own temporary outputs
        if exclude is not None and exclude != in_dir and exclude in p.parents:
            continue  # outputs written inside the input tree are not inputs
        rel.append(r.as_posix())
    return sorted(rel)


def escapes(out_dir: Path, out: str | Path) -> str | None:
    """Why output `out` (as the user wrote it, relative to `out_dir`) would be written outside
    `out_dir`, or None: outputs, their lock and temporary files are confined to OUT_DIR, so a
    manifest or pattern can never overwrite or clean up files elsewhere."""
    given = Path(out)
    if given.is_absolute():
        return f"output {out} is an absolute path; outputs must be relative to OUT_DIR {out_dir}"
    if ".." in given.parts:
        return f"output {out} climbs out of OUT_DIR with '..'; write it inside {out_dir}"
    root = os.path.realpath(out_dir)
    # the folder it lands in, with every symlink followed, must be OUT_DIR or below it
    if os.path.commonpath([root, os.path.realpath(Path(out_dir) / given.parent)]) != root:
        return f"output {out} leaves OUT_DIR {out_dir} through a symlink; write it elsewhere inside OUT_DIR"
    if (Path(out_dir) / given).is_symlink():
        return f"output {out} is a symlink; remove it or choose another name"
    return None


def out_path_for(out_dir: Path, stem: str, out_pattern: str = DEFAULT_OUT_PATTERN) -> Path:
    """Output of a scene: `out_pattern` with `{stem}` filled, under `out_dir`."""
    if "{stem}" not in out_pattern:
        raise FusionError(
            f"--out-pattern must contain {{stem}} (e.g. {DEFAULT_OUT_PATTERN}), got {out_pattern!r}"
        )
    name = out_pattern.replace("{stem}", stem) if stem else out_pattern.replace("{stem}", "fused").lstrip("_")
    return out_dir / name


def _match_files(
    files: Sequence[str], pan_pattern: str, ms_pattern: str
) -> tuple[dict[tuple[str, ...], list[str]], dict[tuple[str, ...], list[str]]]:
    pan_re, ms_re = _pattern_regex(pan_pattern), _pattern_regex(ms_pattern)
    pan_first = _literal_length(pan_pattern) >= _literal_length(ms_pattern)
    pans: dict[tuple[str, ...], list[str]] = {}
    mss: dict[tuple[str, ...], list[str]] = {}
    for f in files:
        mp, mm = pan_re.match(f), ms_re.match(f)
        if mp and mm:  # e.g. '*.tif' and '*_ms.tif': the more specific pattern wins
            mp, mm = (mp, None) if pan_first else (None, mm)
        if mp:
            pans.setdefault(mp.groups(), []).append(f)
        elif mm:
            mss.setdefault(mm.groups(), []).append(f)
    return pans, mss


def pair_by_patterns(
    in_dir: Path,
    out_dir: Path,
    pan_pattern: str | None = None,
    ms_pattern: str | None = None,
    out_pattern: str = DEFAULT_OUT_PATTERN,
) -> Plan:
    """Pair files of `in_dir` whose names share the stem captured by the patterns' `*`.

    Without patterns, the naming convention of `DEFAULT_CONVENTIONS` that pairs the most files
    is used. A pattern containing `/` matches paths below `in_dir` (e.g. `*/pan.tif`).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FusionError(f"input folder not found: {in_dir}")
    if (pan_pattern is None) != (ms_pattern is None):
        raise FusionError(
            "give both --pan and --ms patterns (e.g. --pan '*_PAN.tif' --ms '*_MS.tif'), or neither"
        )
    if pan_pattern is not None and ms_pattern is not None:
        for name, pat in (("--pan", pan_pattern), ("--ms", ms_pattern)):
            if "*" not in pat:
                raise FusionError(f"{name} pattern {pat!r} needs a '*' for the stem that pairs files")
        conventions: Sequence[tuple[str, str]] = [(pan_pattern, ms_pattern)]
    else:
        conventions = DEFAULT_CONVENTIONS
    recursive = any("/" in p for conv in conventions for p in conv)
    files = _list_files(in_dir, recursive, out_dir.resolve() if out_dir.exists() else None)

    best: tuple[int, str, str] | None = None
    for pan_p, ms_p in conventions:
        pans, mss = _match_files(files, pan_p, ms_p)
        n = len(set(pans) & set(mss))
        if best is None or n > best[0]:
            best = (n, pan_p, ms_p)
    assert best is not None
    n, pan_p, ms_p = best
    if n == 0 and pan_pattern is None and files:
        tried = ", ".join(f"{p}+{m}" for p, m in DEFAULT_CONVENTIONS)
        raise FusionError(
            f"no PAN/MS pairs found in {in_dir} with the default naming conventions ({tried}); "
            "pass --pan and --ms patterns or --manifest"
        )
    pans, mss = _match_files(files, pan_p, ms_p)
    scenes: list[Scene] = []
    unpaired: list[Unpaired] = []
    for key in sorted(set(pans) | set(mss)):
        p_list, m_list = pans.get(key, []), mss.get(key, [])
        stem = "_".join(k for k in key)
        if len(p_list) > 1 or len(m_list) > 1:
            for f in p_list + m_list:
                unpaired.append(
                    Unpaired(in_dir / f, f"stem {stem!r} is ambiguous: {', '.join(p_list + m_list)}")
                )
        elif not m_list:
            unpaired.append(
                Unpaired(in_dir / p_list[0], f"no MS partner matching {ms_p!r} for stem {stem!r}")
            )
        elif not p_list:
            unpaired.append(
                Unpaired(in_dir / m_list[0], f"no PAN partner matching {pan_p!r} for stem {stem!r}")
            )
        else:
            out = out_path_for(out_dir, stem, out_pattern)
            why = escapes(out_dir, out_path_for(Path(), stem, out_pattern))
            if why is not None:
                unpaired.append(Unpaired(in_dir / p_list[0], why))
            else:
                scenes.append(Scene(stem or out.stem, in_dir / p_list[0], in_dir / m_list[0], out))
    matched = {f for lst in (*pans.values(), *mss.values()) for f in lst}
    ignored = [in_dir / f for f in files if f not in matched]
    plan = Plan(scenes, unpaired, ignored, source=f"--pan {pan_p!r} --ms {ms_p!r}", total_scenes=len(scenes))
    _check_outputs(plan)
    return plan


def _stem_of(pan_name: str) -> str:
    """Scene stem of a PAN file name: what a default convention's `*` captures (`A_PAN.tif` -> `A`),
    else the name without extension."""
    for pan_p, _ in DEFAULT_CONVENTIONS:
        m = _pattern_regex(pan_p).match(pan_name)
        if m:
            return "_".join(m.groups())
    return pan_name.split(".")[0]


def read_manifest(
    manifest: Path, in_dir: Path, out_dir: Path, out_pattern: str = DEFAULT_OUT_PATTERN
) -> Plan:
    """Scenes from a CSV with a header: `pan,ms[,out][,id]`.

    Relative `pan`/`ms` paths are taken from `in_dir`, relative `out` paths from `out_dir`;
    without `out`, the output is named from the PAN file's stem and `out_pattern`.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FusionError(f"manifest not found: {manifest}")
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise FusionError(f"manifest {manifest} is not a readable CSV: {exc}") from None
    if not {"pan", "ms"} <= set(header):
        raise FusionError(
            f"manifest {manifest} needs a header with 'pan' and 'ms' columns (and optionally 'out', 'id')"
        )
    scenes: list[Scene] = []
    refused: list[Unpaired] = []
    for n, row in enumerate(rows, start=2):
        r = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not r.get("pan") or not r.get("ms"):
            raise FusionError(f"manifest {manifest} line {n}: empty 'pan' or 'ms'")
        pan, ms = in_dir / r["pan"], in_dir / r["ms"]  # absolute paths stay absolute
        stem = _stem_of(Path(r["pan"]).name)
        out = out_dir / r["out"] if r.get("out") else out_path_for(out_dir, stem, out_pattern)
        why = escapes(out_dir, r.get("out") or out_path_for(Path(), stem, out_pattern))
        if why is not None:  # this row fails with its reason; the other rows go on
            refused.append(Unpaired(Path(r.get("id") or r["out"]), f"manifest line {n}: {why}"))
            continue
        scenes.append(Scene(r.get("id") or Path(out).stem, pan, ms, out))
    plan = Plan(scenes, refused, source=f"--manifest {manifest}", total_scenes=len(scenes))
    _check_outputs(plan)
    return plan


def _check_outputs(plan: Plan) -> None:
    """Two scenes writing one file, or an output that is an input, is a bad invocation."""
    seen: dict[Path, str] = {}
    for s in plan.scenes:
        key = s.out.resolve()
        if key in seen:
            raise FusionError(
                f"scenes {seen[key]!r} and {s.id!r} would both write {s.out}; fix the names or --out-pattern"
            )
        seen[key] = s.id
    inputs = {p.resolve() for s in plan.scenes for p in (s.pan, s.ms)}
    for s in plan.scenes:
        if s.out.resolve() in inputs:
            raise FusionError(f"output {s.out} of scene {s.id!r} is an input file; choose another OUT_DIR")


# --------------------------------------------------------------------------------------------
# Sharding


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K mod N, N); `slurm` -> this array task's shard (`slurm_shard`).

    K is taken modulo N, so any N consecutive task ids select every shard exactly once:
    0-based (Kubernetes `$JOB_COMPLETION_INDEX`, `--array=0-9`) and 1-based (SLURM `--array=1-10`,
    GNU parallel `{#}`) numbering both work with `$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`.
    """
    if (text or "").strip().lower() == "slurm":
        return slurm_shard(os.environ)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise FusionError(
            f"--shard expects K/N with integers, e.g. 0/4 or $SLURM_ARRAY_TASK_ID/4, got {text!r}"
        )
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise FusionError(f"--shard K/N needs N >= 1, got {text!r}")
    return k % n, n


def slurm_shard(env: Mapping[str, str]) -> tuple[int, int]:
    """`--shard slurm`: this array task's shard from SLURM's variables, exact for any array range
    and step (`--array=5-50:5` included): index = (ID - MIN) / STEP among COUNT tasks."""
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1))
    except (KeyError, ValueError):
        raise FusionError(
            "--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT "
            "(run it inside an sbatch --array job)"
        ) from None
    index = (task - first) // max(step, 1)
    if count < 1 or not 0 <= index < count:
        raise FusionError(f"SLURM array task {task} (min {first}, step {step}) is not one of {count} tasks")
    return index, count


def shard_of(key: str, count: int) -> int:
    """Shard of a scene: a hash of its id, so the assignment of a scene never depends on which
    other files happen to be in the folder (files landing mid-array are neither lost nor doubled)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def apply_shard(plan: Plan, index: int, count: int) -> Plan:
    """The deterministic 1/N of a plan that shard `index` (0-based) processes."""
    return replace(
        plan,
        scenes=[s for s in plan.scenes if shard_of(s.id, count) == index],
        unpaired=[u for u in plan.unpaired if shard_of(u.path.name, count) == index],
        shard=(index, count),
    )


# --------------------------------------------------------------------------------------------
# Execution

SceneProcessor = Callable[[Scene], dict[str, Any]]
CompleteCheck = Callable[[Path], bool]


@dataclass
class SceneResult:
    scene: str
    pan: str
    ms: str
    out: str
    status: str  # done | skipped | failed
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
        """0: everything done or skipped; 1: some scene failed; 130: interrupted (Ctrl-C)."""
        if self.interrupted:
            return 130
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
        }


def _default_complete_check(path: Path) -> bool:
    from fusion_cli.raster import is_complete_output

    return is_complete_output(path)


def _output_mpx(path: Path) -> float:
    try:
        import rasterio

        with rasterio.open(path) as ds:
            return ds.width * ds.height / 1e6
    except Exception:  # throughput is informative; never fail a finished scene over it
        return 0.0


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def scene_lock(out: Path) -> Iterator[bool]:
    """Hold an exclusive lock on one output while it is made; yields False if another live run
    holds it (an overlapping cron run, a duplicate array task).

    flock is released by the kernel when its holder dies, so a lock we obtain proves that any
    temporary file left beside the output belongs to a killed run and may be removed.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no cross-run exclusion, nothing else changes
        yield True
        return
    lock_path = out.with_name(f".{out.name}.lock")
    fd: int | None = None
    try:  # one try from the file's creation on, so Ctrl-C at any point leaves no lock file
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            held = _try_flock(fcntl, fd, lock_path)
            if held is not None:
                break
            os.close(fd)  # the holder we waited on unlinked the file: lock the live one
            fd = None
        yield held
    finally:
        if fd is not None:
            _release_lock_file(fcntl, fd, lock_path)


def _try_flock(fcntl: Any, fd: int, lock_path: Path) -> bool | None:
    """True: `fd` holds the live lock file; False: another run holds it; None: retry."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks (some NFS mounts): no cross-run exclusion
        return True
    try:
        return True if _is_live(fd, lock_path) else None
    except FileNotFoundError:
        return None


def _is_live(fd: int, lock_path: Path) -> bool:
    """`fd` is the file now at `lock_path` (not one a previous holder unlinked)."""
    return os.fstat(fd).st_ino == os.stat(lock_path).st_ino


def _release_lock_file(fcntl: Any, fd: int, lock_path: Path) -> None:
    """Unlink the lock file unless another live run holds it, then close `fd`.

    Re-locking is a no-op for the holder; for a run that was refused (or interrupted while
    acquiring) it succeeds only when nobody holds the file, so a live run's lock is never removed.
    """
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        except OSError:  # no locks on this filesystem: nothing to protect
            pass
        with contextlib.suppress(OSError):
            if _is_live(fd, lock_path):
                lock_path.unlink()
    finally:
        os.close(fd)


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporary files a killed writer of this tool left beside `out` (call under
    `scene_lock`): only names of the shape this tool gives them (`raster.is_own_temporary`)."""
    from fusion_cli.raster import is_own_temporary

    removed = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.*"):
        if is_own_temporary(out, p) and p.is_file() and not p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def execute_scene(
    scene: Scene,
    process: SceneProcessor,
    *,
    overwrite: bool = False,
    retries: int = 0,
    is_complete: CompleteCheck | None = None,
) -> SceneResult:
    """Fuse one scene unless its output is already complete; never raises for a bad scene.

    A `FusionError` (bad input: the same on every attempt) fails at once; other exceptions (an
    I/O hiccup, a GPU out of memory) are retried up to `retries` times. KeyboardInterrupt passes.
    """
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
    with scene_lock(scene.out) as mine:
        if not mine:
            return SceneResult(status="skipped", reason="another running batch holds this scene", **base)
        remove_stale_temporaries(scene.out)
        if scene.out.exists() and not overwrite:
            if check(scene.out):
                return SceneResult(status="skipped", reason="output complete", **base)
            why = (
                f"output {scene.out} exists but is not a complete fusion-cli product "
                "(a foreign or damaged file); use --overwrite to redo it"
            )
            return SceneResult(status="failed", reason=why, **base)
        t0 = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            try:
                details = process(scene) or {}
            except FusionError as exc:
                reason, details = str(exc), {}
                break
            except Exception as exc:  # noqa: BLE001 - one corrupt scene must not stop the batch
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


class JsonlLog:
    """Append-only JSON-lines log, one line per scene, flushed at once (a killed run keeps its lines)."""

    def __init__(self, path: Path | None) -> None:
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
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
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
) -> BatchSummary:
    """Run the plan's scenes with one `process` (one model instance).

    With `io_workers > 0`, threads read the inputs of the next `io_workers` scenes ahead while the
    current one is fused, so disk or network reads overlap inference. With `scene_workers > 1`,
    that many scenes are in flight at once through the same model (one scene's reads, blending
    and writes overlap another's inference); `process` must then be thread-safe, as
    `make_scene_processor`'s is (on an H100, 2 in flight gave bit-identical outputs but no speed-up
    for the launch-bound pure-PyTorch scan: it pays off when I/O dominates). Ctrl-C stops after
    the running scenes (the pipeline removes their partial files); the summary says so.
    """
    journal = JsonlLog(log)
    results: list[SceneResult] = []
    t0 = time.perf_counter()

    def record(r: SceneResult) -> None:
        results.append(r)
        journal.write(r, plan.shard)
        if on_result is not None:
            on_result(r)

    def run_one(scene: Scene) -> SceneResult:
        return execute_scene(scene, process, overwrite=overwrite, retries=retries, is_complete=is_complete)

    for r in unpaired_results(plan):
        record(r)
    reader = ThreadPoolExecutor(io_workers, thread_name_prefix="fusion-readahead") if io_workers > 0 else None
    queued = 0  # scenes whose inputs were handed to the read-ahead threads

    def read_ahead(upto: int) -> None:
        nonlocal queued
        while reader is not None and queued < min(upto, len(plan.scenes)):
            nxt = plan.scenes[queued]
            if overwrite or not nxt.out.exists():  # finished scenes are not read at all
                reader.submit(_readahead, [nxt.pan, nxt.ms])
            queued += 1

    interrupted = False
    try:
        if scene_workers <= 1:
            for i, scene in enumerate(plan.scenes):
                read_ahead(i + 1 + io_workers)
                record(run_one(scene))
        else:
            with ThreadPoolExecutor(scene_workers, thread_name_prefix="fusion-scene") as pool:
                pending: set[Future[SceneResult]] = set()
                try:
                    for i, scene in enumerate(plan.scenes):
                        read_ahead(i + scene_workers + io_workers)
                        pending.add(pool.submit(run_one, scene))
                        if len(pending) >= scene_workers:  # bounded: never the whole plan queued
                            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for f in finished:
                                record(f.result())
                    for f in as_completed(pending):
                        record(f.result())
                except KeyboardInterrupt:
                    for f in pending:
                        f.cancel()
                    raise
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if reader is not None:
            reader.shutdown(wait=False, cancel_futures=True)
    return BatchSummary(results, time.perf_counter() - t0, plan.shard, interrupted)


# --------------------------------------------------------------------------------------------
# The real per-scene processor


@dataclass
class FuseJob:
    """Everything a worker needs to build its fuser and fuse a scene (picklable, for Dask).

    `fuser` holds the keyword arguments of `pipeline.make_fuser` (model, weights, method, sensor,
    device, precision, dn_max, ms_bands); `options` is a `pipeline.FuseOptions`.
    """

    fuser: dict[str, Any]
    options: Any
    metrics: bool = False

    def cache_key(self) -> str:
        return json.dumps(self.fuser, sort_keys=True, default=str)


def make_scene_processor(job: FuseJob) -> SceneProcessor:
    """`process(scene)` fusing with one fuser built once for the whole batch.

    A network is built once and serves every scene (a shallow copy per scene holds its statistics).
    A classical method depends on the pair's ratio (measured per scene from the geotransforms), so
    one instance is kept per ratio; a method with scene statistics (`needs_stats`) gets a fresh
    instance per scene so that no statistics leak from one scene into the next (cheap: classical
    methods have no weights).
    """
    from fusion_cli import pipeline

    # The batch already decided the scene must be (re)done, so the writer may replace the target.
    options = replace(job.options, overwrite=True)
    classical = job.fuser.get("method") is not None
    fusers: dict[int | None, Any] = {}
    # Bad model / weights / method names are a bad invocation: fail before the first scene.
    if classical:
        pipeline.make_fuser(**{**job.fuser, "ratio": 4})
    else:
        fusers[None] = pipeline.make_fuser(**job.fuser)

    def fuser_for(scene: Scene) -> Any:
        if not classical:
            # One network serves the batch; its scene statistics (band max) live in a shallow
            # per-scene copy, so scenes fused concurrently do not share them.
            return copy.copy(fusers[None])
        ratio = pipeline.measure_ratio(scene.pan, scene.ms, options.reproject)
        fuser = fusers.get(ratio)
        if fuser is None or fuser.needs_stats:
            fuser = pipeline.make_fuser(**{**job.fuser, "ratio": ratio})
            fusers[ratio] = fuser
        return fuser

    def process(scene: Scene) -> dict[str, Any]:
        fuser = fuser_for(scene)
        summary = pipeline.fuse_files(scene.pan, scene.ms, scene.out, fuser, options)
        details = summary.to_dict()
        if job.metrics:
            # The product is already complete: a metrics problem is reported, not a failed scene.
            try:
                details["metrics"] = scene_metrics(
                    scene, ratio=summary.ratio, sensor=job.fuser.get("sensor"), reproject=options.reproject
                )
            except (FusionError, ValueError, MemoryError) as exc:
                details["metrics_error"] = str(exc)
        return details

    return process


def scene_metrics(
    scene: Scene, ratio: int, sensor: str | None = None, reproject: bool = False
) -> dict[str, Any]:
    """Full-resolution indices (D_lambda, D_s, QNR, HQNR) of a finished scene, also written beside
    the output as `<out>.metrics.json` so a report can be built from the output folder alone.

    Reads the three images whole (the indices are global): memory grows with the scene.
    """
    import numpy as np

    from fusion_cli import raster
    from fusion_cli.metrics import full_resolution

    with raster.gdal_env(), raster.open_raster(scene.out, "output") as out_ds:
        fused = out_ds.read().astype(np.float32)
        valid = out_ds.dataset_mask() > 0
    from fusion_cli import pipeline

    with pipeline.open_pair(scene.pan, scene.ms, reproject, ratio) as (pan_ds, ms_ds):
        pan = pan_ds.read(1)[None].astype(np.float32)
        ms = ms_ds.read(raster.select_bands(ms_ds, None)).astype(np.float32)
    # The product covers the PAN pixels inside both inputs from the top-left: compare on the
    # largest area that is a whole number of MS pixels in all three.
    h = min(fused.shape[1], pan.shape[1], ms.shape[1] * ratio) // ratio * ratio
    w = min(fused.shape[2], pan.shape[2], ms.shape[2] * ratio) // ratio * ratio
    if h < 32 or w < 32:
        raise FusionError(f"scene {scene.id} is too small for full-resolution metrics ({h}x{w} px)")
    values = full_resolution(
        fused[:, :h, :w],
        pan[:, :h, :w],
        ms[:, : h // ratio, : w // ratio],
        ratio=ratio,
        sensor=sensor,
        mask=valid[:h, :w],
    )
    sidecar = scene.out.with_name(scene.out.name + ".metrics.json")
    payload = {"fused": str(scene.out), "pan": str(scene.pan), "ms": str(scene.ms), "metrics": values}
    with raster.atomic_output(sidecar, overwrite=True, what="metrics") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=float))
    return values
