"""The one device resolver: a `--device` value (auto, cpu, cuda, cuda:N) -> `torch.device`, checked.

Fusion (`pipeline`), the network fuser (`models.fuser`) and training (`training.loop`) all resolve
their device here, so the same name means the same device and a bad one the same one-line error.
"""

from __future__ import annotations

import torch

from fusion_cli.errors import FusionError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> the first CUDA device when torch sees one, else the CPU; `cuda[:N]` without CUDA,
    a GPU index that does not exist or an unknown name is a FusionError (bad input)."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("cpu", "cpu:0"):  # torch's name for the CPU of a tensor's device (str(t.device))
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FusionError(f"--device {device} requested but CUDA is not available; use --device cpu")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise FusionError(f"--device {device}: no such GPU ({torch.cuda.device_count()} visible)")
        if device not in ("cuda", f"cuda:{index}"):  # e.g. "cudax"
            raise FusionError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
        return torch.device(device)
    raise FusionError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
