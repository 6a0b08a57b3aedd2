"""`train_from_inputs`: what `fusion train` does, callable from Python.

Inputs are folders of GeoTIFF pairs (see `data.find_pairs`) or PanCollection-style HDF5 files.
Validation comes from `val_inputs` (other scenes) or, when none are given, from the last `val_frac`
of the rows of every training scene, cut before the Wald reduction (spatially separate parts).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusion_cli.errors import FusionError
from fusion_cli.paths import sha256_file
from fusion_cli.sensors import nyquist_gains, sensor_band_numbers
from fusion_cli.training.data import Scene, TrainPair, find_pairs, load_h5, load_scene, reduce_scene
from fusion_cli.training.loop import StepProgress, TrainConfig, TrainResult, train


def _is_h5(path: Path) -> bool:
    return path.suffix.lower() in {".h5", ".hdf5", ".mat"} and path.is_file()


def load_inputs(
    inputs: Sequence[str | Path],
    *,
    task: str,
    ratio: int | None,
    sensor: str | None,
    dn_max: float | None,
    pan_shift: tuple[float, float] = (0.0, 0.0),
    bands: Sequence[int] | None = None,
    sensor_bands: Sequence[int] | None = None,
) -> tuple[list[Scene], list[TrainPair]]:
    """Scenes from folders (not yet reduced) and ready pairs from HDF5 files. `bands` picks MS bands
    (1-based, in model order); `sensor_bands` says which of the sensor's bands the MS files hold
    (`sensors.sensor_band_numbers`), for the MTF gains of the Wald reduction."""
    scenes: list[Scene] = []
    h5_pairs: list[TrainPair] = []
    for item in inputs:
        path = Path(item)
        if _is_h5(path):
            if dn_max is None:
                raise FusionError(f"{path.name}: HDF5 patches carry no DN scale; give --dn-max (e.g. 2047)")
            h5_pairs += load_h5(path, dn_max, ratio)
            continue
        for hi, lo in find_pairs(path, task):
            s = load_scene(
                hi,
                lo,
                ratio=1 if task == "hisr" else ratio,
                dn_max=dn_max,
                sensor=sensor,
                group=str(path),
                pan_shift=pan_shift,
                source=f"{lo} + {hi}",
            )
            # the sensor's numbers of the bands used: their MTF gains (a --bands 3,2,1,4 of a B, G, R,
            # NIR1 file is red, green, blue, NIR1, not WV3's bands 3, 2, 1, 4)
            numbers = sensor_band_numbers(sensor, s.ms.shape[0], bands, sensor_bands)
            # the Wald reduction gives each band its gain: a pick it cannot place is refused now
            nyquist_gains(sensor, len(bands) if bands else s.ms.shape[0], numbers, s.ms.shape[0])
            if bands:
                s = s.select_bands([b - 1 for b in bands])
            s.sensor_bands = numbers
            scenes.append(s)
    return scenes, h5_pairs


def train_from_inputs(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    name: str,
    config: TrainConfig,
    val_inputs: Sequence[str | Path] = (),
    val_frac: float = 0.2,
    sensor: str | None = None,
    dn_max: float | None = None,
    pan_shift: tuple[float, float] = (0.0, 0.0),
    bands: Sequence[int] | None = None,
    sensor_bands: Sequence[int] | None = None,
    description: str = "",
    licence: str = "",
    resume: bool = False,
    init_weights: str | Path | None = None,
    progress: StepProgress | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train on the inputs and export `<out_dir>/<name>.safetensors` + `<name>.json`; `progress` is
    told the steps done (`loop.StepProgress`)."""
    task, ratio = config.task, config.ratio
    kw: dict[str, Any] = dict(task=task, ratio=ratio, sensor=sensor, dn_max=dn_max, pan_shift=pan_shift)
    scenes, h5_train = load_inputs(inputs, bands=bands, sensor_bands=sensor_bands, **kw)
    val_scenes, h5_val = load_inputs(val_inputs, bands=bands, sensor_bands=sensor_bands, **kw)
    if h5_train and not (val_inputs or scenes):
        raise FusionError(
            "HDF5 patches of one file share scenes: give a separate validation file with --val "
            "(PanCollection ships valid_*.h5)"
        )
    if not val_inputs:
        if not 0.0 < val_frac < 0.9:
            raise FusionError(f"--val-frac must be between 0 and 0.9, got {val_frac}")
        val_scenes = [s.crop_rows(1.0 - val_frac, 1.0) for s in scenes]
        scenes = [s.crop_rows(0.0, 1.0 - val_frac) for s in scenes]
    train_pairs = [reduce_scene(s, ratio, task) for s in scenes] + h5_train
    val_pairs = [reduce_scene(s, ratio, task) for s in val_scenes] + h5_val
    if not val_pairs:
        raise FusionError("no validation data: give --val or keep --val-frac above 0")

    first = scenes[0] if scenes else None
    scale = dn_max or (first.dn_max if first else 1.0)
    config.dn_max = scale
    init_state = None
    if init_weights is not None:
        from fusion_cli.models.registry import load_model

        init_loaded = load_model(weights=init_weights, device="cpu")
        init_model = init_loaded.model
        _check_init_architecture(init_weights, init_model.config, config, train_pairs[0])
        init_base = getattr(init_model.config, "base", None)
        if config.base not in (None, init_base):
            raise FusionError(f"--base {config.base}: the --init weights correct {init_base or 'no base'}")
        config.base = init_base
        init_state = init_model.state_dict()
    card: dict[str, Any] = {
        "name": name,
        "task": task,
        "description": description or f"FusionMamba trained with fusion train ({task}, ratio {ratio})",
        "sensor": sensor or "unknown",
        "bands": list(first.band_names)
        if first
        else [f"band {i + 1}" for i in range(train_pairs[0].ms.shape[0])],
        "pan_bands": list(first.pan_band_names) if first else ["PAN"],
        "ratio": ratio,
        "dn_max": scale,
        "licence": licence or "as the training data",
        "training": {
            "data": [{"role": "train", "scene": s.name, "source": s.source} for s in scenes]
            + [{"role": "validation", "scene": s.name, "source": s.source} for s in val_scenes]
            + [{"role": "train", "scene": str(p)} for p in inputs if _is_h5(Path(p))]
            + [{"role": "validation", "scene": str(p)} for p in val_inputs if _is_h5(Path(p))],
            "split": "validation from --val" if val_inputs else f"last {val_frac:.0%} of rows of each scene",
            "command": command or " ".join(sys.argv),
        },
    }
    if init_weights is not None:  # the parent model: provenance the weights inherit
        parent = init_loaded.card
        card["training"]["init"] = {
            "weights": str(init_weights),
            "sha256": parent.sha256
            or (sha256_file(init_loaded.weights_path) if init_loaded.weights_path else ""),
            "model": parent.name,
            "licence": parent.licence,
        }
    full_pairs, full_val_pairs = [], []
    if config.full_resolution and config.base is not None:
        from fusion_cli.training.fullres import full_resolution_pairs

        # the scenes at their original resolution (HDF5 patches have none)
        full_pairs = full_resolution_pairs(scenes, config.base, sensor)
        full_val_pairs = full_resolution_pairs(val_scenes, config.base, sensor)
    return train(
        train_pairs,
        val_pairs,
        config,
        out_dir,
        card,
        resume=resume,
        progress=progress,
        init_state=init_state,
        full_pairs=full_pairs,
        full_val_pairs=full_val_pairs,
    )


def _check_init_architecture(path: Any, init: Any, config: TrainConfig, pair: TrainPair) -> None:
    """Fine-tuning keeps the --init network's shape: a different width, state size, ratio or band
    count would fail deep in torch's state-dict loading (a size-mismatch traceback)."""
    asked = {"dim": config.dim, "d_state": config.d_state, "ratio": config.ratio}
    asked |= {"ms_bands": pair.ms.shape[0], "pan_bands": pair.pan.shape[0]}
    differ = [f"{k} {getattr(init, k)} (here {v})" for k, v in asked.items() if getattr(init, k) != v]
    if differ:
        raise FusionError(
            f"--init {path} is a network of {', '.join(differ)}: fine-tuning keeps its architecture; give "
            f"--dim {init.dim} --d-state {init.d_state} --ratio {init.ratio} and pairs with its bands"
        )
