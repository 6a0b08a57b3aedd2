"""`NetworkFuser`: a loaded FusionMamba behind the `Fuser` protocol of `fusion_cli.fusers`.

The pipeline hands DN tiles; this divides by the card's dn_max (the units the network was trained on),
runs the network on its device in batches, and returns DN float32 on the caller's device.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from fusion_cli.errors import FusionError
from fusion_cli.models.registry import LoadedModel

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> first CUDA device when present, else CPU; "cuda[:N]" without CUDA is a FusionError."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FusionError(f"device {device} requested but CUDA is not available here; use cpu")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise FusionError(f"device {device}: no such GPU ({torch.cuda.device_count()} visible)")
        return torch.device(device)
    raise FusionError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


class NetworkFuser:
    """Fuser for a FusionMamba model. `halo` defaults to 32 PAN px rounded up to `tile_multiple`."""

    needs_stats = False

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        dn_max: float | None = None,
        halo: int | None = None,
        batch_size: int = 8,
    ) -> None:
        if precision not in PRECISIONS:
            raise FusionError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
        if dn_max is not None and not dn_max > 0:
            raise FusionError(f"dn_max must be positive, got {dn_max}")
        if batch_size < 1:
            raise FusionError(f"batch size must be >= 1, got {batch_size}")
        self.loaded = loaded
        self.card = loaded.card
        self.weights_sha256 = loaded.card.sha256
        self.device = resolve_device(device)
        self.model = loaded.model.to(self.device).eval()
        cfg = self.model.config
        self.name = loaded.card.name
        self.ratio = cfg.ratio
        self.ms_bands: int | None = cfg.ms_bands
        self.pan_bands = cfg.pan_bands
        self.tile_multiple = cfg.multiple
        self.halo = halo if halo is not None else self.tile_multiple * math.ceil(32 / self.tile_multiple)
        self.dn_max = float(dn_max if dn_max is not None else loaded.card.dn_max)
        self.batch_size = batch_size
        self.precision = precision
        if precision != "fp32" and self.device.type != "cuda":
            # Reduced precision only pays on GPUs; CPU autocast would be slower and less accurate.
            warnings.warn(
                f"precision {precision} applies on CUDA only; running fp32 on the CPU", stacklevel=2
            )
            self.precision = "fp32"

    def accumulate(self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor) -> None:
        """No scene statistics needed."""

    def finalize(self) -> None:
        """No scene statistics needed."""

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            if self.device.type == "cuda":
                # cuDNN convolutions default to TF32, which moved the golden WV3 case by 2e-4 on an H200:
                # fp32 means fp32.
                return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        """pan `(B, P, H, W)`, ms `(B, C, H/r, W/r)` in DN -> `(B, C, H, W)` DN float32."""
        out_device = pan.device
        scale = 1.0 / self.dn_max
        outs = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, pan.shape[0], self.batch_size):
                p = pan[i : i + self.batch_size].to(self.device, torch.float32) * scale
                m = ms[i : i + self.batch_size].to(self.device, torch.float32) * scale
                outs.append((self.model(m, p).float() * self.dn_max).to(out_device))
        return torch.cat(outs) if len(outs) > 1 else outs[0]
