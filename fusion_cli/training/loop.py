"""The training loop: L1 on Wald-reduced patches, Adam with a step decay, validation, checkpoints.

`train(train_pairs, val_pairs, config, out_dir, card)` trains a FusionMamba and exports it with
`fusion_cli.models.registry.save_model` (safetensors + JSON card). Everything a run needs to continue
is in `out_dir/checkpoint.pt` (model, optimizer, step, sampler RNG), written at every epoch end and at
the time budget, so `resume=True` continues exactly where the run stopped.

Files written to `out_dir`: `checkpoint.pt`, `train_log.jsonl` (one JSON line per epoch), `loss.png`
(training and validation L1), and the exported `<name>.safetensors` + `<name>.json`; while a run
goes on, `.checkpoint.pt.lock` (one run per folder).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fusion_cli.batch.locking import scene_lock
from fusion_cli.device import resolve_device
from fusion_cli.errors import FusionError, OutputWriteError
from fusion_cli.metrics.table import validation_keys
from fusion_cli.notices import notify
from fusion_cli.raster import atomic_output, make_output_folder
from fusion_cli.raster.gdal import reason
from fusion_cli.training.data import (
    PatchSampler,
    TrainPair,
    attach_base,
    pair_digest,
    shared_block,
    validation_crops,
)
from fusion_cli.training.export import export
from fusion_cli.training.history import append_log, plot_history, status, write_log
from fusion_cli.training.validation import autocast, evaluate_pairs

# Told how far a run is: `progress(step, total_steps, what)` after each optimizer step, `what` a short
# line about the last epoch (loss, speed, validation); the caller draws it (the CLI: a bar on stderr).
StepProgress = Callable[[int, int, str], None]


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults are the FusionMamba paper's recipe (L1, Adam 5e-4 halved every
    200 epochs, 64 x 64 PAN patches)."""

    task: str = "pansharpening"
    ratio: int = 4
    dim: int = 32  # network width d
    d_state: int = 8
    patch: int = 64  # PAN-side patch size (reduced grid), a multiple of lcm(4, ratio)
    batch: int = 16
    lr: float = 5e-4
    lr_step: int = 200  # epochs between learning-rate decays
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # global norm; None disables
    epochs: int = 400
    steps_per_epoch: int | None = None  # default: one epoch sees every training pixel about once
    max_seconds: float | None = None  # wall-clock budget; stops cleanly and exports
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, CUDA only)
    val_every: int = 1  # epochs
    val_interval_s: float = 0.0  # and at least this many seconds apart (cheap epochs on a GPU)
    val_crop: int = 128  # PAN-side size of the fixed validation crops
    val_crops_per_scene: int = 4
    gain_aug: tuple[float, float] | None = None  # random radiometric gain per patch
    dn_max: float = 1.0  # for metrics in DN units (validation data are in network units)
    scan_backend: str | None = None
    base: str | None = None  # classical method whose product the network corrects (FusionMambaConfig.base)
    sensor: str | None = None  # MTF gains of the base method (a free-text sensor means generic)
    scan_memory: float | None = None  # bounded scan memory in tokens (FusionMambaConfig.scan_memory)
    # weight of a spectral-angle term, mean (1 - cos) between fused and reference pixel spectra, added
    # to the L1 loss (and to the validation L1 that picks the exported epoch); 0: L1 only, the paper's
    sam_weight: float = 0.0
    # weights of the full-resolution terms (`training.fullres`): the product's spectral consistency
    # with the MS and its detail shortfall against the base; either > 0 gives half of each batch to
    # patches of the training scenes at their original resolution. 0: reduced resolution only.
    full_res_weight: float = 0.0
    detail_weight: float = 0.0

    @property
    def full_resolution(self) -> bool:
        return self.full_res_weight > 0 or self.detail_weight > 0

    def __post_init__(self) -> None:
        m = math.lcm(4, self.ratio)
        if self.patch < m or self.patch % m:
            raise FusionError(
                f"--patch {self.patch} must be a positive multiple of {m} for ratio {self.ratio}"
            )
        # checked here, not by torch mid-run: --lr nan was a traceback, --lr inf exported untrained
        # weights at exit 0, --lr-gamma nan logged NaN learning rates
        if not (math.isfinite(self.lr) and self.lr >= 0):  # 0: the weights stay as given (a probe)
            raise FusionError(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.lr_gamma) and self.lr_gamma > 0):
            raise FusionError(f"--lr-gamma must be a positive number, got {self.lr_gamma}")
        if self.lr_step < 1:
            raise FusionError(f"--lr-step must be at least 1 epoch, got {self.lr_step}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise FusionError(
                f"--steps-per-epoch must be at least 1 (or left out), got {self.steps_per_epoch}"
            )
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise FusionError(f"--max-seconds must be a positive number of seconds, got {self.max_seconds}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise FusionError(f"weight_decay must be 0 or more, got {self.weight_decay}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise FusionError(f"--precision must be fp32, bf16 or fp16, not {self.precision!r}")
        if self.batch < 1 or self.epochs < 1:
            raise FusionError("--batch and --epochs must be at least 1")
        if not (math.isfinite(self.sam_weight) and self.sam_weight >= 0):
            raise FusionError(f"--sam-weight must be 0 or more, got {self.sam_weight}")
        for flag, value in (
            ("--full-res-weight", self.full_res_weight),
            ("--detail-weight", self.detail_weight),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise FusionError(f"{flag} must be 0 or more, got {value}")
        if self.full_resolution and self.batch < 2:
            raise FusionError(
                "--full-res-weight/--detail-weight need a batch of at least 2 (half is full resolution)"
            )


@dataclass
class TrainResult:
    weights_path: Path | None
    card_path: Path | None
    steps: int
    epochs: float
    seconds: float
    best_epoch: int
    val: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = "epochs"
    model: nn.Module | None = None  # holding the best-validated weights
    steps_per_epoch: int = 0


def build_model(config: TrainConfig, ms_bands: int, pan_bands: int) -> nn.Module:
    from fusion_cli.models.fusionmamba import FusionMamba, FusionMambaConfig

    cfg = FusionMambaConfig(
        ms_bands=ms_bands,
        pan_bands=pan_bands,
        ratio=config.ratio,
        dim=config.dim,
        d_state=config.d_state,
        base=config.base,
        scan_memory=config.scan_memory,
    )
    if config.scan_backend is not None and hasattr(cfg, "scan_backend"):
        cfg.scan_backend = config.scan_backend
    return FusionMamba(cfg)


# What a resumed run may change: how long it goes on, where and how it runs, how often it validates.
# Anything else (width, loss, learning rate, data scale...) would make one card describe two runs.
RESUMABLE_CHANGES = (
    "epochs",
    "max_seconds",
    "device",
    "scan_backend",
    "val_every",
    "val_interval_s",
    "precision",
)


def _check_resumed_config(saved: Any, config: TrainConfig) -> None:
    """Refuse --resume with settings the checkpoint was not trained with (a changed --dim failed in
    torch's state-dict loading; a changed --lr or loss went into the card as the whole run's)."""
    if not isinstance(saved, dict):
        return  # a checkpoint from before configs were saved: nothing to compare
    now = asdict(config)
    changed = [
        f"{k} {saved[k]!r} -> {now[k]!r}"
        for k in now
        if k in saved and k not in RESUMABLE_CHANGES and _plain(saved[k]) != _plain(now[k])
    ]
    if changed:
        raise FusionError(
            f"--resume: {'; '.join(changed)} since the checkpoint; resume with the settings it was "
            "trained with (only --epochs, --max-seconds and --device may change), or train into a new --out"
        )


# A run waits this long for its folder's lock: another process's check (`refuse_earlier_run`, the
# recipes' scratch clean-up) holds it for a moment, and a genuine run failed on that (reviewer).
LOCK_WAIT_S = 3.0


def refuse_earlier_run(out_dir: Path) -> None:
    """A fresh run into a folder holding a checkpoint would replace it at its first epoch: hours of an
    interrupted run lost. Refused before any data is read (the CLI); a run still going there is said
    to be running, not told to --resume (`train` checks both again under its lock)."""
    checkpoint = Path(out_dir) / "checkpoint.pt"
    if checkpoint.exists():
        with scene_lock(checkpoint) as held:
            if not held:
                raise _running(out_dir)
        raise _earlier_run(out_dir)


def _earlier_run(out_dir: Path) -> FusionError:
    return FusionError(
        f"{Path(out_dir) / 'checkpoint.pt'} holds an earlier run; continue it with --resume, or choose "
        "another --out (delete the checkpoint to start over)"
    )


def _running(out_dir: Path) -> FusionError:
    return FusionError(
        f"another fusion train is running into {out_dir}; wait for it to end, or choose another -o"
    )


def _read_checkpoint(
    path: Path, device: torch.device, config: TrainConfig, spe: int, data_ids: dict[str, list[str]]
) -> dict[str, Any]:
    """The checkpoint a --resume continues, refused in one line when it is not one, is damaged
    (unreadable, or non-finite weights or optimizer moments: a flipped bit read as NaN and was
    reported as divergence, "lower --lr"), or was trained with other settings or data."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated (killed mid-copy), not a checkpoint, a pickle with code
        raise FusionError(
            f"--resume: cannot read {path} ({reason(exc)[:160]}); it is damaged: use a new --out"
        ) from None
    if not isinstance(ck, dict) or not {"model", "optimizer", "step"} <= set(ck):
        raise FusionError(f"--resume: {path} is not a checkpoint of fusion train; train into a new --out")
    _check_resumed_config(ck.get("config"), config)
    if int(ck.get("steps_per_epoch", spe)) != spe:
        raise FusionError("--resume: the training data or batch changed since the checkpoint")
    for part, ids in data_ids.items():  # checkpoints from before this was saved have no "data"
        if ck.get("data", {}).get(part, ids) != ids:
            what = "training inputs" if part == "train" else "validation data (--val)"
            raise FusionError(
                f"--resume: the {what} differ from the checkpoint's (its card would describe data it was "
                "not trained or chosen on); resume with the same inputs and --val, or use a new --out"
            )
    saved = [ck["model"], ck["optimizer"].get("state", {}), ck.get("best_state") or {}]
    if not all(_finite(part) for part in saved):
        raise FusionError(f"--resume: {path} holds non-finite weights; it is damaged: use a new --out")
    return ck


def _finite(tree: Any) -> bool:
    """Whether every floating tensor in nested dicts/lists is finite."""
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_finite(v) for v in tree)
    return True


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """`torch.save(state)` to `path` through a temporary renamed over it (`atomic_output`): a full
    disk, a size limit or Ctrl-C leaves the previous checkpoint and no temporary (torch.save failed
    with a C++ traceback and left a partial `checkpoint.tmp`)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    had = path.exists()
    try:
        with atomic_output(path, overwrite=True, what="checkpoint") as tmp, open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename: a crash must not leave an empty one
    except OSError as exc:  # the run can go on from the previous checkpoint, if there is one
        then = "the previous checkpoint is kept: continue with --resume" if had else "no checkpoint was kept"
        raise OutputWriteError(f"{exc}; {then}") from None


def _resumed_card(saved: dict[str, Any] | None, asked: dict[str, Any] | None) -> dict[str, Any] | None:
    """The card of a resumed run: what this run asks (name, description, licence...) with the first
    run's provenance, which a resume without --init dropped: its --init, and a command that replays the
    whole training as one run (this one's --epochs, the first run's --init), each resume's command
    listed. A resume that names other --init weights is refused: the checkpoint's weights came from
    the first."""
    if not saved or not asked:
        return asked
    first, now = saved.get("training", {}), asked.get("training", {})
    init_now, init_first = now.get("init") or {}, first.get("init") or {}
    if init_now and init_now.get("sha256") != init_first.get("sha256"):
        raise FusionError(
            "--resume: --init differs from the run's first --init (the checkpoint continues from that); "
            "resume without --init, or use a new --out"
        )
    command = now.get("command") or first.get("command")
    if command:  # the replay trains all --epochs: a --max-seconds of the last leg would cut it short
        words = shlex.split(command)
        at = [i for i, w in enumerate(words) if w == "--max-seconds"]
        words = [w for i, w in enumerate(words) if i not in at and i - 1 not in at]
        if init_first and "--init" not in words:
            words += ["--init", str(init_first["weights"])]
        command = shlex.join(words)
    training = {**now, "command": command, "resumed": [*first.get("resumed", []), now.get("command")]}
    if init_first:
        training["init"] = init_first
    return {**asked, "training": training}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _lr_at(config: TrainConfig, epoch: int) -> float:
    # Step decay as a pure function of the epoch, so a resumed run needs no scheduler state.
    return config.lr * config.lr_gamma ** (epoch // max(config.lr_step, 1))


def _caller_random_state_kept(fn: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """A run seeds torch's and numpy's generators (reproducible training) and allows TF32 on CUDA:
    the caller's generators and flags come back afterwards, as a library call must leave them."""

    @functools.wraps(fn)
    def kept(*args: Any, **kwargs: Any) -> TrainResult:
        numpy_state = np.random.get_state()
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=cuda):
                return fn(*args, **kwargs)
        finally:
            np.random.set_state(numpy_state)
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    return kept


@_caller_random_state_kept
def train(
    train_pairs: Sequence[TrainPair],
    val_pairs: Sequence[TrainPair],
    config: TrainConfig,
    out_dir: str | Path,
    card: dict[str, Any] | None = None,
    *,
    resume: bool = False,
    progress: StepProgress | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    full_pairs: Sequence[TrainPair] = (),
    full_val_pairs: Sequence[TrainPair] = (),
) -> TrainResult:
    """Train a FusionMamba on reduced-resolution pairs and export it.

    `card` holds the model card fields the loop cannot know (name, task, sensor, band names, DN
    scale, training data with sources and licences, command, ...); the loop adds the architecture,
    epochs, steps, validation metrics, time and device, then calls `registry.save_model`. Without a
    `card["name"]` nothing is exported (the checkpoint still is). `init_state` starts from given
    weights (fine-tuning) instead of a random initialisation. `progress` is told the steps done
    (`StepProgress`); `on_epoch` gets each epoch's log record. `full_pairs` / `full_val_pairs`: the
    training / validation scenes at their original resolution with their base product
    (`fullres.full_resolution_pairs`), used when the config weighs the full-resolution terms.
    """
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if not train_pairs:
        raise FusionError("no training pairs: check the training folders and the split")
    ms_bands, pan_bands = train_pairs[0].ms.shape[0], train_pairs[0].pan.shape[0]
    for p in list(train_pairs) + list(val_pairs):
        if p.ms.shape[0] != ms_bands or p.pan.shape[0] != pan_bands:
            raise FusionError(
                f"{p.name} has {p.ms.shape[0]}+{p.pan.shape[0]} bands, the first scene {ms_bands}+{pan_bands}"
            )
    # the pixels trained and validated on: a resumed run must use the same, and validation must not
    # be training data (the card would call a training score held-out)
    train_ids, val_ids = [pair_digest(p) for p in train_pairs], [pair_digest(p) for p in val_pairs]
    data_ids = {"train": sorted(train_ids), "val": sorted(val_ids)}
    shared = set(train_ids) & set(val_ids)
    if shared:
        names = sorted(p.name for p, d in zip(val_pairs, val_ids, strict=True) if d in shared)
        raise FusionError(
            f"validation {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} is also training data: its "
            "score would say nothing about held-out quality; give --val other scenes"
        )
    overlap = shared_block(val_pairs, train_pairs)
    if overlap:
        said = f"validation shares pixels with training data ({overlap}, in target pixels)"
        if all(p.patch for p in [*val_pairs, *train_pairs]):  # an HDF5 split as published (PanCollection)
            notify(f"{said}: its scores are not held out")
            if card is not None:  # and the card says so beside them
                training = {**card.get("training", {}), "validation_overlaps_training": overlap}
                card = {**card, "training": training}
        else:
            raise FusionError(
                f"{said}: its scores would not be held out; give --val scenes that do not overlap the "
                "training scenes, or leave one of the two scenes out"
            )
    if config.base is not None:
        # The base product of each pair, once: patches and validation crops are cut from it.
        train_pairs = attach_base(train_pairs, config.base, config.sensor)
        val_pairs = attach_base(val_pairs, config.base, config.sensor)
    model = build_model(config, ms_bands, pan_bands).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = PatchSampler(train_pairs, config.patch, device=device, seed=config.seed, gain=config.gain_aug)
    full_sampler: PatchSampler | None = None
    full_val: list[TrainPair] = []
    gains: list[float] = []
    if config.full_resolution:
        from fusion_cli.sensors import nyquist_gains, sensor_or_generic

        if config.base is None:
            raise FusionError(
                "--full-res-weight/--detail-weight need a base method (--base): detail is measured against it"
            )

        if not full_pairs or not full_val_pairs:
            raise FusionError(
                "the full-resolution terms need training and validation scenes at their original resolution"
            )
        full_sampler = PatchSampler(
            full_pairs, config.patch, device=device, seed=config.seed + 1, gain=config.gain_aug
        )
        full_val = validation_crops(full_val_pairs, config.val_crop, config.val_crops_per_scene)
        gains = list(nyquist_gains(sensor_or_generic(config.sensor), ms_bands)[0])
    spe = config.steps_per_epoch or max(1, round(sampler.pixels / (config.patch**2 * config.batch)))
    total = spe * config.epochs
    val_set = validation_crops(val_pairs, config.val_crop, config.val_crops_per_scene)

    if resume and not (out_dir / "checkpoint.pt").exists():
        raise FusionError(f"--resume: no checkpoint in {out_dir}; start without --resume")
    make_output_folder(out_dir, "-o")  # after the checks above: a refused run leaves no folder
    # one run per folder: two runs interleaved their logs and one lost its checkpoint's temporary
    with scene_lock(out_dir / "checkpoint.pt", wait=LOCK_WAIT_S) as held:
        if not held:
            raise _running(out_dir)
        ckpt_path = out_dir / "checkpoint.pt"
        log_path = out_dir / "train_log.jsonl"
        step, elapsed_before, history = 0, 0.0, []
        best: dict[str, Any] = {"val_l1": math.inf, "epoch": -1, "state": None, "metrics": {}}
        precision = config.precision
        if resume:
            ck = _read_checkpoint(ckpt_path, device, config, spe, data_ids)
            try:
                model.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:  # another network's (bands, width)
                raise FusionError(
                    f"--resume: {ckpt_path} holds another network ({reason(exc).splitlines()[0][:120]}); "
                    "resume with the inputs and settings it was trained with, or use a new --out"
                ) from None
            sampler.set_state(ck["sampler_rng"])
            if full_sampler is not None and ck.get("full_sampler_rng") is not None:
                full_sampler.set_state(ck["full_sampler_rng"])
            torch.set_rng_state(ck["torch_rng"].cpu())
            step, elapsed_before = int(ck["step"]), float(ck["elapsed"])
            history = list(ck.get("history", []))
            if (ck.get("config") or {}).get("precision", precision) == precision:
                precision = ck.get("precision", precision)  # the run's own, fp32 after an overflow
            if ck.get("best_state") is not None:
                best = {
                    "val_l1": ck["best_val_l1"],
                    "epoch": ck["best_epoch"],
                    "state": ck["best_state"],
                    "metrics": ck.get("best_metrics", {}),
                }
            card = _resumed_card(ck.get("card"), card)
            # the log as the checkpoint has it: a run killed between an epoch's log line and its
            # checkpoint logged that epoch, which the resumed run logs again
            write_log(log_path, history)
        else:
            if ckpt_path.exists():  # again, now that this run holds the folder
                raise _earlier_run(out_dir)
            log_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
        (out_dir / "checkpoint.tmp").unlink(missing_ok=True)  # a killed earlier version's temporary

        def save_checkpoint() -> None:
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "sampler_rng": sampler.state(),
                "full_sampler_rng": None if full_sampler is None else full_sampler.state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "steps_per_epoch": spe,
                "elapsed": elapsed_before + (time.perf_counter() - t0),
                "history": history,
                "precision": precision,
                "best_val_l1": best["val_l1"],
                "best_epoch": best["epoch"],
                "best_state": best["state"],
                "best_metrics": best["metrics"],
                "config": asdict(config),
                "data": data_ids,
                "card": card,
            }
            write_checkpoint(ckpt_path, state)

        def validate() -> dict[str, float]:
            scores = evaluate_pairs(model, val_set, device, config.dn_max, precision, config.sensor)
            if full_val:
                from fusion_cli.training.fullres import full_resolution_scores

                scores.update(full_resolution_scores(model, full_val, device, gains))
            return scores

        t0 = time.perf_counter()
        if step == 0 and val_set:
            # The starting point of the validation curve (and what a fine-tuning run must beat).
            rec0 = {"epoch": 0.0, "step": 0, **validate()}
            history.append(rec0)
            # A fine-tuning run that never improves exports its starting weights, not a worse epoch.
            _track_best(best, rec0, model, config)
            append_log(log_path, rec0)
        what = "training"
        if progress is not None:
            progress(step, total, what)
        last_val = time.perf_counter()
        model.train()
        epoch_loss, epoch_n, seen, t_epoch = 0.0, 0, 0, time.perf_counter()
        stopped_by = "epochs"
        batch = config.batch
        t_budget = time.perf_counter()  # the budget is for training: the initial validation is not in it
        while step < total:
            if config.max_seconds is not None and time.perf_counter() - t_budget >= config.max_seconds:
                stopped_by = "time budget"
                break
            epoch = step // spe
            for g in opt.param_groups:
                g["lr"] = _lr_at(config, epoch)
            full_batch = batch // 2 if full_sampler is not None else 0
            pan, ms, ref, base = sampler.batch(batch - full_batch)
            try:
                with autocast(device, precision):
                    out = model(ms, pan, base=base)
                loss = training_loss(out.float(), ref, config.sam_weight)
                if full_sampler is not None and full_batch:
                    from fusion_cli.training.fullres import full_resolution_terms

                    f_pan, f_ms, _, f_base = full_sampler.batch(full_batch)
                    with autocast(device, precision):
                        f_out = model(f_ms, f_pan, base=f_base)
                    spectral, detail = full_resolution_terms(
                        f_out.float(), f_pan, f_ms, f_base, gains, config.ratio
                    )
                    loss = loss + config.full_res_weight * spectral + config.detail_weight * detail
                if torch.isfinite(loss):
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
            except torch.OutOfMemoryError:
                # The pure-PyTorch scan keeps every step for backward: halve the batch rather than die.
                del pan, ms, ref, base
                out = loss = None
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                if batch == 1:
                    raise FusionError(
                        "out of GPU memory even with a batch of 1; lower --patch or --dim"
                    ) from None
                batch //= 2
                print(f"out of memory: batch lowered to {batch}", file=sys.stderr)
                continue
            if not torch.isfinite(loss):
                if precision != "fp32":
                    # Reduced precision overflowed: continue in fp32 rather than lose the run.
                    precision = "fp32"
                    opt.zero_grad(set_to_none=True)
                    continue
                raise FusionError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            step += 1
            epoch_loss += loss.item()
            epoch_n += 1
            seen += batch
            if progress is not None:
                progress(step, total, what)
            if step % spe == 0 or step == total:
                rec = _end_epoch(step, spe, epoch_loss / max(epoch_n, 1), seen, time.perf_counter() - t_epoch)
                rec["lr"] = _lr_at(config, epoch)
                due = (step // spe) % config.val_every == 0
                if step == total or (due and time.perf_counter() - last_val >= config.val_interval_s):
                    rec.update(validate())
                    _track_best(best, rec, model, config)
                    last_val = time.perf_counter()
                rec["elapsed_s"] = round(elapsed_before + time.perf_counter() - t0, 2)
                history.append(rec)
                append_log(log_path, rec)
                what = f"epoch {rec['epoch']:g}: {status(rec)}"
                if progress is not None:
                    progress(step, total, what)
                save_checkpoint()
                if on_epoch:
                    on_epoch(rec)
                epoch_loss, epoch_n, seen, t_epoch = 0.0, 0, 0, time.perf_counter()

        if epoch_n:  # a partial epoch at the time budget: log and validate it too
            rec = _end_epoch(step, spe, epoch_loss / epoch_n, seen, time.perf_counter() - t_epoch)
            rec.update(validate())
            _track_best(best, rec, model, config)
            rec["elapsed_s"] = round(elapsed_before + time.perf_counter() - t0, 2)
            history.append(rec)
            append_log(log_path, rec)
        save_checkpoint()
        seconds = elapsed_before + time.perf_counter() - t0
        plot_history(history, out_dir / "loss.png")

        if best["state"] is not None:
            model.load_state_dict(best["state"])  # export the weights that validated best
        weights_path = card_path = None
        if card and card.get("name"):
            ran = replace(config, precision=precision if device.type == "cuda" else "fp32")  # CPU: fp32
            weights_path, card_path = export(
                model, ran, card, history, best, seconds, device, step, spe, out_dir
            )
        return TrainResult(
            weights_path=weights_path,
            card_path=card_path,
            steps=step,
            epochs=step / spe,
            seconds=seconds,
            best_epoch=best["epoch"],
            val=best["metrics"],
            history=history,
            stopped_by=stopped_by,
            model=model,
            steps_per_epoch=spe,
        )


def _end_epoch(step: int, spe: int, loss: float, seen: int, dt: float) -> dict[str, Any]:
    return {
        "epoch": round(step / spe, 3),
        "step": step,
        "loss": round(loss, 6),
        "patches_per_s": round(seen / max(dt, 1e-9), 2),
    }


def training_loss(out: torch.Tensor, ref: torch.Tensor, sam_weight: float = 0.0) -> torch.Tensor:
    """L1 between `(B, C, H, W)` batches, plus `sam_weight` times the mean (1 - cos) of the angle
    between fused and reference spectra (a smooth stand-in for SAM, which acos makes steep near 0)."""
    loss = torch.nn.functional.l1_loss(out, ref)
    if sam_weight:
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=1, eps=1e-8)
        loss = loss + sam_weight * (1.0 - cos).mean()
    return loss


def validation_objective(
    rec: dict[str, Any], sam_weight: float = 0.0, full_res_weight: float = 0.0, detail_weight: float = 0.0
) -> float:
    """What picks the exported epoch: validation L1, plus the angle term at the validation SAM and
    the weighted full-resolution terms of the validation scenes, as the training loss weighs them."""
    value = rec.get("val_l1", math.inf)
    if sam_weight and "sam" in rec:
        value += sam_weight * (1.0 - math.cos(math.radians(rec["sam"])))
    if full_res_weight:
        value += full_res_weight * rec.get("full_spectral", math.inf)
    if detail_weight:
        value += detail_weight * rec.get("full_detail", math.inf)
    return value


def _track_best(best: dict[str, Any], rec: dict[str, Any], model: nn.Module, config: TrainConfig) -> None:
    objective = validation_objective(rec, config.sam_weight, config.full_res_weight, config.detail_weight)
    if objective < best["val_l1"]:
        best["val_l1"] = objective  # (the objective: plain validation L1 unless the loss has more terms)
        best["epoch"] = rec["epoch"]
        best["state"] = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        keys = ("val_l1", *validation_keys(), "full_spectral", "full_detail")
        best["metrics"] = {k: rec[k] for k in keys if k in rec}
