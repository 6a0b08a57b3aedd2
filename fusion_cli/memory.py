"""How much memory this process may still allocate: the kernel's estimate and the cgroup limits
(containers, cluster jobs) above it. Used where a command must read data whole (scoring) to refuse a
run the kernel would kill."""

from __future__ import annotations

import contextlib
from pathlib import Path


def available_memory() -> int | None:
    """Bytes this process may still allocate: the kernel's MemAvailable, or less under a cgroup limit
    (a container, a cluster job: the tightest limit of this process's cgroup and its parents, v2 or
    v1; a Slurm job's limit sits above its task's group), the limit less what is used but for page
    cache the kernel reclaims (a run that just wrote large files sits near its limit); None where
    none of it is known (not Linux)."""
    free: list[int] = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as fh:
            free.append(1024 * int(next(line for line in fh if line.startswith("MemAvailable:")).split()[1]))
    with contextlib.suppress(OSError):
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        for line in lines:
            _, controllers, where = (line.split(":", 2) + ["", ""])[:3]
            if controllers == "":  # v2
                for group in _cgroup_chain(Path("/sys/fs/cgroup"), where):
                    free.extend(_cgroup_room(group, "memory.max", "memory.current", "inactive_file"))
            elif "memory" in controllers.split(","):  # v1
                for group in _cgroup_chain(Path("/sys/fs/cgroup/memory"), where):
                    files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
                    free.extend(_cgroup_room(group, *files))
    return min(free) if free else None


def _cgroup_chain(root: Path, where: str) -> list[Path]:
    """The mounted folders of cgroup `where` and of its parents up to `root` (inside a cgroup
    namespace `where` is "/" and `root` is this process's own group)."""
    parts = [p for p in where.strip().split("/") if p and p != ".."]
    return [g for n in range(len(parts), -1, -1) if (g := root.joinpath(*parts[:n])).is_dir()]


def _cgroup_room(group: Path, limit_file: str, usage_file: str, cache_key: str) -> list[int]:
    """[limit - usage + reclaimable cache] of a cgroup's memory files; [] without a limit."""
    try:
        limit = (group / limit_file).read_text().strip()
    except OSError:
        return []
    if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # v1: "no limit" is a huge number
        return []
    cache = 0
    with contextlib.suppress(OSError, ValueError, StopIteration):
        stat = (group / "memory.stat").read_text().splitlines()
        cache = int(next(line for line in stat if line.startswith(cache_key + " ")).split()[1])
    with contextlib.suppress(OSError, ValueError):
        return [int(limit) - int((group / usage_file).read_text()) + cache]
    return []
