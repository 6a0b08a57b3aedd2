"""Batch fusion of many scene pairs, one module per job:

* `pairing`: which files make a scene (name patterns, a manifest) and where its output goes: `Plan`;
* `sharding`: the deterministic 1/N of a plan an array task processes;
* `locking`: one writer per output across concurrent runs;
* `execution`: running a plan resumably (skip complete outputs, retries, a JSON-lines log, summary)
  with any `process(scene)` callable;
* `fusion`: the real `process`, one fuser for the whole batch (`make_scene_processor`).

The names below are the public API (`fusion batch`, `fusion_cli.batch_dask` and `fusion evaluate` use
them).
"""

from fusion_cli.batch.execution import (
    LOG_VERSION,
    BatchSummary,
    CompleteCheck,
    JsonlLog,
    SceneProcessor,
    SceneResult,
    check_log,
    check_side_files,
    execute_scene,
    planned_action,
    run_batch,
    unpaired_results,
)
from fusion_cli.batch.fusion import FuseJob, make_scene_processor, product_differs, scene_metrics
from fusion_cli.batch.locking import remove_stale_temporaries, scene_lock
from fusion_cli.batch.pairing import (
    DEFAULT_CONVENTIONS,
    DEFAULT_OUT_PATTERN,
    Plan,
    Scene,
    Unpaired,
    escapes,
    group_by_role,
    out_path_for,
    pair_by_patterns,
    pattern_key,
    read_manifest,
    token_key,
)
from fusion_cli.batch.sharding import apply_shard, parse_shard, shard_of, slurm_shard

__all__ = [
    "DEFAULT_CONVENTIONS",
    "DEFAULT_OUT_PATTERN",
    "LOG_VERSION",
    "BatchSummary",
    "CompleteCheck",
    "FuseJob",
    "JsonlLog",
    "Plan",
    "Scene",
    "SceneProcessor",
    "SceneResult",
    "Unpaired",
    "apply_shard",
    "check_log",
    "check_side_files",
    "escapes",
    "execute_scene",
    "planned_action",
    "product_differs",
    "group_by_role",
    "make_scene_processor",
    "out_path_for",
    "pair_by_patterns",
    "parse_shard",
    "pattern_key",
    "read_manifest",
    "remove_stale_temporaries",
    "run_batch",
    "scene_lock",
    "scene_metrics",
    "shard_of",
    "slurm_shard",
    "token_key",
    "unpaired_results",
]
