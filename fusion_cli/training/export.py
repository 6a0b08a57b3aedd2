"""Exporting a trained network: the card fields only the run knows (epochs, steps, optimizer, time,
device, validation metrics, architecture) and the weights + card through the model registry."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fusion_cli.training.loop import TrainConfig


def export(
    model: nn.Module,
    config: TrainConfig,
    card: dict[str, Any],
    history: Sequence[dict[str, Any]],
    best: dict[str, Any],
    seconds: float,
    device: torch.device,
    steps: int,
    spe: int,
    out_dir: Path,
) -> tuple[Path, Path]:
    """Fill in what the run knows and write safetensors + card through the registry."""
    fields = dict(card)
    training = dict(fields.get("training", {}))
    training.update(
        {
            "epochs": round(steps / spe, 2),
            "steps": steps,
            "steps_per_epoch": spe,
            "best_epoch": best["epoch"],
            "batch": config.batch,
            "patch": config.patch,
            "optimizer": f"Adam lr {config.lr} x{config.lr_gamma} every {config.lr_step} epochs",
            "loss": loss_description(config),
            "seed": config.seed,
            "precision": config.precision,
            "gain_augmentation": list(config.gain_aug) if config.gain_aug else None,
            "time_s": round(seconds, 1),
            "device": _device_name(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    )
    fields["training"] = training
    metrics = dict(fields.get("metrics", {}))
    metrics["validation"] = {k: round(v, 6) for k, v in best["metrics"].items()}
    fields["metrics"] = metrics
    fields["architecture"] = _arch_dict(model)
    try:
        from fusion_cli.models.registry import ModelCard, save_model
    except ImportError:
        return _save_plain(model.cpu(), fields, out_dir)
    valid = set(getattr(ModelCard, "__dataclass_fields__", {}))
    extra = {k: v for k, v in fields.items() if valid and k not in valid}
    if extra:
        # Fields the card does not define are kept under `training` rather than lost.
        fields = {k: v for k, v in fields.items() if k in valid}
        fields.setdefault("training", {}).update({"extra": extra})
    return save_model(model.cpu(), ModelCard(**fields), out_dir)


def _save_plain(model: nn.Module, fields: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Only for an installation without the model registry: safetensors + the card as JSON, with the
    sha256 the registry would record, so a long run is never lost for want of it."""
    from safetensors.torch import save_file

    from fusion_cli.paths import sha256_file
    from fusion_cli.raster import make_output_folder

    make_output_folder(out_dir)
    weights = out_dir / f"{fields['name']}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    fields = dict(fields, weights=weights.name, sha256=sha256_file(weights))
    card = out_dir / f"{fields['name']}.json"
    card.write_text(json.dumps(fields, indent=2, default=str))
    return weights, card


def _arch_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return asdict(cfg)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def loss_description(config: TrainConfig) -> str:
    """The training loss in words, for the card: which terms, with which weights."""
    terms = ["L1"]
    if config.sam_weight:
        terms.append(f"{config.sam_weight:g} * (1 - cos spectral angle)")
    if config.full_res_weight:
        terms.append(
            f"{config.full_res_weight:g} * full-resolution spectral consistency "
            "(L1 of the MTF-decimated product vs MS)"
        )
    if config.detail_weight:
        terms.append(f"{config.detail_weight:g} * full-resolution detail shortfall (HPC below the base's)")
    return " + ".join(terms)
