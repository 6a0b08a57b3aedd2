"""`NetworkFuser`: a loaded FusionMamba behind the `Fuser` protocol of `fusion_cli.fusers`.

The pipeline hands DN tiles; this divides by the card's dn_max (the units the network was trained on),
runs the network on its device in batches, and returns DN float32 on the caller's device. A model
whose config names a classical `base` method gets that method's product on the same windows (the
method's scene statistics come from the same statistics pass).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fusion_cli.device import resolve_device
from fusion_cli.errors import FusionError
from fusion_cli.models.registry import LoadedModel
from fusion_cli.models.scan import resolve_backend
from fusion_cli.notices import notify

if TYPE_CHECKING:
    from fusion_cli.classical import ClassicalFuser

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NetworkFuser:
    """Fuser for a FusionMamba model. `halo` defaults to 32 PAN px (or the base method's context, if
    larger) rounded up to `tile_multiple`.

    The statistics pass gathers the scene's per-band MS max over valid pixels: the network's spectral
    attention reads it, and per-tile maxima would give each tile different band weights (a seam).
    Without that pass (`fuse` called directly) each window uses its own max, as in training.
    A classical base method uses the MTF gains of the card's sensor, as training did.
    """

    needs_stats = True
    preferred_overlap: int | None = None  # the pipeline's blend zone
    parallel_windows = False  # one window at a time: its torch ops use every thread

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        dn_max: float | None = None,
        halo: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise FusionError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
        if dn_max is not None and not dn_max > 0:
            raise FusionError(f"dn_max must be positive, got {dn_max}")
        if batch_size is not None and batch_size < 1:
            raise FusionError(f"batch size must be >= 1, got {batch_size}")
        self.loaded = loaded
        self.card = loaded.card
        self.weights_sha256: str | None = loaded.card.sha256 or None
        self.weights_files = _weights_files(loaded.weights_path)
        self.device = resolve_device(device)
        self.model = loaded.model.to(self.device).eval()
        if self.device.type == "cpu":
            # oneDNN's convolutions run channels-last without reordering: official checkpoint's 512^2
            # window 6.1-6.5 -> 5.4-5.6 CPU-s, landsat's 2.27-2.33 -> 2.18-2.21 (fuse passes NHWC in)
            self.model = self.model.to(memory_format=torch.channels_last)
        cfg = self.model.config
        self.name = loaded.card.name
        self.ratio = cfg.ratio
        self.ms_bands: int | None = cfg.ms_bands
        self.pan_bands = cfg.pan_bands
        self.tile_multiple = cfg.multiple
        self.base_method = cfg.base
        self.base_sensor = loaded.card.sensor
        self.base_fuser = self._new_base_fuser()
        # Context: 32 px, or the base method's if larger, counting its statistics' context too. A
        # bounded scan still reaches past 32 px: `landsat` (base BDSD-PC, whose statistics need 66 px
        # at ratio 2) tiles within 1 DN of one piece with 66 px of context, and reaches 7 DN with 32
        # (bench_seam). The shipped models' seams were measured with this geometry.
        base = self.base_fuser
        base_halo = max(int(base.halo), int(base.stats_halo)) if base is not None else 0
        default_halo = self.tile_multiple * math.ceil(max(32, base_halo) / self.tile_multiple)
        self.halo = halo if halo is not None else default_halo
        self.stats_halo: int | None = self.halo
        self.dn_max = float(dn_max if dn_max is not None else loaded.card.dn_max)
        self.nonnegative_dn = (
            "a network reads DN from 0 up to its scale; offset the data to non-negative DN or use a "
            "classical --method"
        )
        # windows per network call: batching pays on a GPU (fewer launches); on a CPU it only
        # multiplies the memory of a call
        self.batch_size = batch_size or (1 if self.device.type == "cpu" else 8)
        self.precision = precision
        self.band_max: torch.Tensor | None = None  # (C,) DN, from the statistics pass
        self._running_max: torch.Tensor | None = None
        if precision != "fp32" and self.device.type != "cuda":
            # Reduced precision only pays on GPUs; CPU autocast would be slower and less accurate.
            notify(f"precision {precision} applies on CUDA only; running fp32 on the CPU")
            self.precision = "fp32"

    @property
    def preferred_tile(self) -> int:
        """Output tile side (PAN px) when the user gives none. On a CPU a window's cost is its area
        (no fixed per-call cost to amortise) while the halo and blend zone around every tile are paid
        again (256 px tiles compute 1.9-2.7x their area, bench_profile). For the paper's width
        (d = 32) windows larger than 512 px cost more per pixel again, with twice the memory (official
        checkpoint, 1024^2 WV3 crop, 2 cores, vec16 kernels: 16.0 s at 512, 17.8 s at 768, 18.5 s at
        1024, 2.3 / 3.4 / 5.0 GB peak; page faults grow with the window). Narrow networks with few
        bands (d <= 16, <= 16 bands: `landsat`, `vhr4`) take 768: their windows are a fraction of that
        memory, and the halo (66 px for a BDSD-PC base) is a large share of a 512 tile (Landsat-8
        1254 x 1207 crop, 2 cores: 15.3 s at 512, 12.8 s at 768, bench_network). One window at a time
        (`batch_size` 1). On a GPU, 256 (batched)."""
        if self.device.type != "cpu":
            return 256
        cfg = self.model.config
        return 768 if cfg.dim <= 16 and cfg.ms_bands <= 16 else 512

    @property
    def scan_backend(self) -> str:
        """The selective-scan backend the network runs on its device (recorded with each product)."""
        return resolve_backend(self.model.config.scan_backend, self.device)[0]

    @property
    def scan_memory(self) -> float | None:
        """The network's scan memory in tokens (None: unbounded); it changes the output, so it is
        recorded with each product."""
        return self.model.config.scan_memory

    @property
    def transpose_ensemble(self) -> bool:
        """Whether each window is also fused transposed and the two averaged (recorded with the
        product, as it changes the output)."""
        return self.model.config.transpose_ensemble

    def _new_base_fuser(self) -> ClassicalFuser | None:
        if self.base_method is None:
            return None
        from fusion_cli.classical import make_method
        from fusion_cli.sensors import sensor_or_generic

        sensor = sensor_or_generic(self.base_sensor)  # as `training.data.attach_base` resolves it
        return make_method(
            self.base_method, self.ratio, sensor=sensor, ms_bands=self.ms_bands, pan_bands=self.pan_bands
        )

    def __copy__(self) -> NetworkFuser:
        """A per-scene copy: shares the network, owns its statistics (and base method)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.band_max, new._running_max = None, None
        new.base_fuser = self._new_base_fuser()
        return new

    def accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int] = (0, 0)
    ) -> None:
        """Running per-band max of the MS over MS pixels whose whole PAN block is valid."""
        invalid = torch.nn.functional.max_pool2d((~valid).float(), self.ratio) > 0  # (1, 1, h, w)
        masked = ms.float().masked_fill(invalid, float("-inf"))
        tile_max = torch.amax(masked, dim=(0, 2, 3)).cpu()
        self._running_max = (
            tile_max if self._running_max is None else torch.maximum(self._running_max, tile_max)
        )
        if self.base_fuser is not None and self.base_fuser.needs_stats:
            self.base_fuser.accumulate(pan, ms, valid, origin)

    def finalize(self) -> None:
        """The scene's band max; a band with no valid pixel leaves the per-window max in use."""
        m = self._running_max
        self.band_max = m if m is not None and bool(torch.isfinite(m).all()) else None
        self._running_max = None
        if self.base_fuser is not None and self.base_fuser.needs_stats:
            self.base_fuser.finalize()

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            if self.device.type == "cuda":
                # cuDNN convolutions default to TF32, which moved the golden WV3 case by 2e-4 on an H200:
                # fp32 means fp32.
                return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def _base(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        """The base method's product in DN; without a statistics pass, fitted on these windows."""
        assert self.base_fuser is not None
        method = self.base_fuser if self.base_fuser.fitted else self._new_base_fuser().fit(pan, ms)
        return method.fuse(pan, ms)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs in the network's memory layout (channels-last on a CPU, see __init__)."""
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cpu" else x

    def fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        """pan `(B, P, H, W)`, ms `(B, C, H/r, W/r)` in DN -> `(B, C, H, W)` DN float32."""
        out_device = pan.device
        scale = 1.0 / self.dn_max
        band_max = None if self.band_max is None else self.band_max.to(self.device) * scale
        outs = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, pan.shape[0], self.batch_size):
                p = self._layout(pan[i : i + self.batch_size].to(self.device, torch.float32) * scale)
                m = self._layout(ms[i : i + self.batch_size].to(self.device, torch.float32) * scale)
                base = None
                if self.base_fuser is not None:
                    b = self._base(pan[i : i + self.batch_size], ms[i : i + self.batch_size])
                    base = b.to(self.device, torch.float32) * scale
                out = self.model(m, p, band_max, base)
                outs.append((out.float() * self.dn_max).to(out_device).contiguous())
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def _weights_files(path: Path | None) -> tuple[Path, ...]:
    """The weights file and, for a .safetensors, the card beside it (both are read)."""
    if path is None:
        return ()
    card = path.with_suffix(".json")
    return (path, card) if path.suffix == ".safetensors" and card.is_file() else (path,)
