"""Sharding a plan over array jobs: `--shard K/N` or `--shard slurm`, by a hash of each scene's id."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import replace

from fusion_cli.batch.pairing import Plan
from fusion_cli.errors import FusionError


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
