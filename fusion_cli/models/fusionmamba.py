"""FusionMamba (TGRS version) in pure PyTorch, any input size decided at forward time.

Parameter names follow the authors' checkpoint (e.g. `stage0.fm.spa_mamba_layers.0.block.A_b_log`), so
their `420.pth` state_dict loads with `strict=True`. Differences from the authors' code: no CUDA-only
dependency (the selective scan comes from `fusion_cli.models.scan`), the four scan directions of a block
run as one grouped scan, and the image size is taken from the input instead of fixed at construction.

Data flow, `(B, C, h, w)` MS and `(B, P, H, W)` PAN with H = ratio*h, in [0, 1] units:
    up = PixelShuffle(conv3x3(ms))                       learned upsampling, also the global residual
    pan, ms = stems(pan), stems(up)                      (B, d, H, W)
    two encoder stages (FusionMamba module, then a shared stride-2 conv) -> d, 2d, 4d channels
    two decoder stages (module, shared transposed conv, + own skip, depthwise-separable conv)
    final module -> fused map (B, d, H, W)
    out = head(fused) * spectral_attention(ms) + up

With `config.base` (a classical method's name) the caller also passes that method's product `base`
`(B, C, H, W)`: it replaces `up` as the MS-branch input and as the global residual, so the network
learns a correction of a strong classical result instead of a whole fusion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Any

import torch
import torch.nn as nn

from fusion_cli.errors import FusionError
from fusion_cli.models.scan import causal_conv1d, resolve_backend, selective_scan

# Checkpoint names of the per-direction tensors: direction k uses suffix _SUFFIX[k].
_SUFFIX = ("", "_b", "_c", "_d")


_CONFIG_LIMITS = {
    "ms_bands": 1024,
    "pan_bands": 1024,
    "ratio": 64,
    "dim": 1024,
    "d_state": 256,
    "d_conv": 16,
    "expand": 16,
    "attn_dim": 1024,
}


@dataclass
class FusionMambaConfig:
    """Everything that defines the network's shape. `scan_backend` None = automatic (see scan.py)."""

    ms_bands: int
    pan_bands: int = 1
    ratio: int = 4
    dim: int = 32
    d_state: int = 8
    d_conv: int = 4
    expand: int = 1
    attn_dim: int = 32  # width of the spectral-attention Mamba over the band sequence
    scan_backend: str | None = None
    # A classical method (fusion_cli.classical) whose product is the global residual instead of the
    # learned upsampling: the network then learns a correction of that method's output. None = paper.
    base: str | None = None
    # Longest memory of a spatial scan's state, in tokens: every state decays by at least e over this
    # many tokens, so an output pixel depends on a bounded neighbourhood and tiled inference reproduces
    # the whole image (see `MultiScanMamba`). None = unbounded, as in the paper and its checkpoint.
    scan_memory: float | None = None
    # At inference (eval mode), average the output with that of the transposed inputs, transposed back:
    # a two-member geometric self-ensemble (Lim et al., "Enhanced deep residual networks for single
    # image super-resolution", CVPRW 2017). A transpose, unlike a flip, keeps the toolbox's MS/PAN
    # sampling phase. Set per model where it improves its validation rows; doubles inference time.
    transpose_ensemble: bool = False

    def __post_init__(self) -> None:
        # Upper bounds far above any trained model, checked before anything is allocated: a card
        # with dim=200000 would otherwise try to allocate terabytes.
        for name, most in _CONFIG_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                raise FusionError(
                    f"FusionMamba config: {name} must be an integer from 1 to {most}, got {value!r}"
                )
        if self.ratio < 2:
            raise FusionError(f"FusionMamba config: ratio must be >= 2, got {self.ratio}")
        if self.base is not None and not (isinstance(self.base, str) and self.base):
            raise FusionError(f"FusionMamba config: base must be a method name or null, got {self.base!r}")
        if not isinstance(self.transpose_ensemble, bool):
            got = self.transpose_ensemble
            raise FusionError(f"FusionMamba config: transpose_ensemble must be true or false, got {got!r}")
        if self.scan_memory is not None and not (
            isinstance(self.scan_memory, (int, float))
            and math.isfinite(self.scan_memory)
            and self.scan_memory > 0
        ):
            raise FusionError(
                f"FusionMamba config: scan_memory must be a positive number of tokens or null, "
                f"got {self.scan_memory!r}"
            )

    @property
    def multiple(self) -> int:
        """PAN sides must be multiples of this: ratio (MS grid) and 4 (two 2x downsamplings)."""
        return math.lcm(4, self.ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionMambaConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FusionError(f"FusionMamba config: unknown field(s) {', '.join(unknown)}")
        if "ms_bands" not in data:
            raise FusionError("FusionMamba config: ms_bands is required")
        return cls(**data)


@lru_cache(maxsize=64)
def _scan_orders(h: int, w: int, directions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices of the scan orders of an h x w image (or a 1-D sequence of length h*w).

    Returns ``(order, inverse)``, both `(G, L)` int64: position j of scan order k reads image token
    ``order[k, j]`` (row-major, reversed, column-major, reversed column-major; 2 directions: the first
    two), and image token p sits at position ``inverse[k, p]`` of order k. One index replaces the
    flip/transpose/cat copies per direction. Built outside inference mode so that the cached tensors
    are also usable where autograd saves them (training).
    """
    with torch.inference_mode(False):
        row = torch.arange(h * w, device=device)
        orders = [row, row.flip(0)]
        if directions == 4:
            col = row.view(h, w).t().flatten()
            orders += [col, col.flip(0)]
        order = torch.stack(orders)
        # the inverse permutation by one scatter (argsort took 0.4 s of a 4-window Landsat-8 run)
        inverse = torch.empty_like(order).scatter_(1, order, row.expand(order.shape[0], -1))
        return order, inverse


class MultiScanMamba(nn.Module):
    """Mamba block scanning its input in 2 (forward/backward 1-D) or 4 (2-D cross-scan) orders.

    Each order has its own conv1d, x_proj, dt_proj, A and D; outputs are put back in input order, averaged,
    LayerNormed and projected. `cross=True`: dt, B and C come from a second input through `in_proj_b`
    (no conv, no activation) while x and z come from the main input.

    `memory` (tokens) bounds how far back a state remembers: the step size delta is floored at
    1 / (memory * min_n |A[d, n]|), so each step decays every state by at least exp(-1 / memory). A
    trained scan keeps channels with tiny delta that carry a whole window's (or row's) content; on
    a tile that content differs from the whole image's, which shows as seams. Bounded at 20 tokens,
    tiles with the default 32 px halo reproduce the one-piece output within 1 DN (16-bit Landsat,
    bench/bench_seam.py).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        d_conv: int,
        expand: int,
        directions: int,
        cross: bool = False,
        scan_backend: str | None = None,
        memory: float | None = None,
    ) -> None:
        super().__init__()
        if directions not in (2, 4):
            raise ValueError("directions must be 2 or 4")
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.directions = directions
        self.cross = cross
        self.scan_backend = scan_backend
        self.memory = memory
        e, n, r = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        if cross:
            self.in_proj_b = nn.Linear(d_model, e, bias=False)
        for k in range(directions):
            s = _SUFFIX[k]
            self.add_module(f"conv1d{s}", nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1))
            self.add_module(f"x_proj{s}", nn.Linear(e, r + 2 * n, bias=False))
            dt_proj = nn.Linear(r, e)
            self.add_module(f"dt_proj{s}", dt_proj)
            # Mamba's initialisation: S4D-real A, unit D, dt bias = softplus^-1 of dt in [1e-3, 1e-1].
            self.register_parameter(
                f"A{s}_log", nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32).repeat(e, 1)))
            )
            self.register_parameter(f"D{s}", nn.Parameter(torch.ones(e)))
            with torch.no_grad():
                std = r**-0.5
                dt_proj.weight.uniform_(-std, std)
                dt = torch.exp(torch.rand(e) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(
                    min=1e-4
                )
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.out_proj = nn.Linear(e, d_model, bias=False)
        self.norm = nn.LayerNorm(e)

    def _stacked(self, attr: str) -> torch.Tensor:
        return torch.cat([self.get_parameter(attr.format(s=_SUFFIX[k])) for k in range(self.directions)])

    def forward(
        self, x: torch.Tensor, extra: torch.Tensor | None = None, hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """x, extra `(B, L, d_model)` tokens (row-major H*W when hw=(H, W)) -> `(B, L, d_model)`."""
        if self.directions == 4 and hw is None:
            raise ValueError("a 4-direction scan needs the image size hw")
        if self._fused_inference(x):
            return self._forward_fused(x, extra, hw or (x.shape[1], 1))
        g, e, n, r = self.directions, self.d_inner, self.d_state, self.dt_rank
        b, length, _ = x.shape
        order, inverse = _scan_orders(*(hw or (length, 1)), g, x.device)
        # All directions side by side: one token gather (B, G*L, 2E) -> (B, G, 2E, L), group k = order k.
        xz = self.in_proj(x).index_select(1, order.flatten()).view(b, g, length, 2 * e).transpose(2, 3)
        xs = xz[:, :, :e].reshape(b, g * e, length)  # (B, G*E, L), contiguous for the conv
        zs = xz[:, :, e:].reshape(b, g * e, length)
        conv_w = self._stacked("conv1d{s}.weight")[:, 0]  # (G*E, K)
        xs = causal_conv1d(xs, conv_w, self._stacked("conv1d{s}.bias"), activation="silu")
        if self.cross:
            src = self.in_proj_b(extra).index_select(1, order.flatten()).view(b, g, length, e)
        else:
            src = xs.view(b, g, e, length).transpose(2, 3)  # (B, G, L, E)
        # Per-direction x_proj and dt_proj as one batched matmul each, weights stacked (G, out, in).
        x_w = self._stacked("x_proj{s}.weight").view(g, r + 2 * n, e)
        # (G, R+2N, E) @ (B, G, E, L): the long L as the output's columns (as (L, E) @ (E, R+2N) MKL
        # runs a K = E <= 32 product 1.5-4x slower on a CPU)
        x_dbl = torch.matmul(x_w, src.transpose(2, 3))  # (B, G, R+2N, L)
        dt_w = self._stacked("dt_proj{s}.weight").view(g, e, r)
        delta = torch.matmul(dt_w, x_dbl[:, :, :r]).view(b, g * e, length)  # (B, G*E, L)
        A = -torch.exp(self._stacked("A{s}_log").float())  # (G*E, N)
        delta_bias: torch.Tensor | None = self._stacked("dt_proj{s}.bias").float()
        if self.memory is not None:
            # Activate here to floor the step: exp(delta * A) <= exp(-1 / memory) for every state.
            delta = nn.functional.softplus(delta.float() + delta_bias[:, None])
            delta = torch.maximum(delta, (1.0 / (self.memory * A.abs().amin(dim=1)))[:, None])
            delta_bias = None
        y = selective_scan(
            xs,
            delta,
            A,
            x_dbl[:, :, r : r + n],
            x_dbl[:, :, r + n :],
            self._stacked("D{s}").float(),
            zs,
            delta_bias,
            delta_softplus=delta_bias is not None,
            backend=self.scan_backend,
        )
        # Back to image order (one gather with the inverse index), averaged over directions: (B, E, L).
        index = inverse.view(1, g, 1, length).expand(b, g, e, length)
        y = torch.gather(y.view(b, g, e, length), 3, index).sum(1).div_(g)
        return self.out_proj(self.norm(y.transpose(1, 2).to(x.dtype)))

    def _fused_inference(self, x: torch.Tensor) -> bool:
        """The fused CPU path (`mamba_numba`) serves float32 inference where the scan backend is numba;
        training, other dtypes and devices take the generic path."""
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            return False
        return resolve_backend(self.scan_backend, x.device)[0] == "numba"

    def _forward_fused(
        self, x: torch.Tensor, extra: torch.Tensor | None, hw: tuple[int, int]
    ) -> torch.Tensor:
        """`forward` without token gathers: the kernels read and write through the order tables."""
        from fusion_cli.models import mamba_numba

        g, e, n, r = self.directions, self.d_inner, self.d_state, self.dt_rank
        order, inverse = _scan_orders(*hw, g, x.device)
        xz = mamba_numba.linear(x, self.in_proj)  # (B, L, 2E), image order
        conv_w = self._stacked("conv1d{s}.weight").view(g, e, -1)
        conv_b = self._stacked("conv1d{s}.bias").view(g, e)
        u = mamba_numba.conv_silu(xz, conv_w, conv_b, order)  # (B, G, L, E), scan orders
        x_w = self._stacked("x_proj{s}.weight").view(g, r + 2 * n, e)  # (G, R+2N, E)
        sources, bc_index = None, None  # x_proj reads u, in scan order
        if self.cross:
            sources, bc_index = mamba_numba.cross_sources(
                mamba_numba.linear(extra, self.in_proj_b), order, hw
            )
        A = -torch.exp(self._stacked("A{s}_log").float()).view(g, e, n)
        floor = None if self.memory is None else 1.0 / (self.memory * A.abs().amin(dim=2))
        y = mamba_numba.scan_directions(
            u,
            sources,
            x_w,
            xz,
            self._stacked("dt_proj{s}.weight").view(g, e, r),
            self._stacked("dt_proj{s}.bias").view(g, e),
            floor,
            A,
            self._stacked("D{s}").view(g, e),
            bc_index,
            inverse,
            norm=self.norm,
            width=hw[1],
        )
        return mamba_numba.linear(y, self.out_proj)


def _norm(norm: nn.LayerNorm, x: torch.Tensor, block: MultiScanMamba) -> torch.Tensor:
    """`norm(x)`, by the fused CPU kernel where `block` runs fused (torch's LayerNorm is slow over a
    few channels)."""
    if block._fused_inference(x):
        from fusion_cli.models import mamba_numba

        return mamba_numba.layer_norm(x, norm)
    return norm(x)


class SingleMambaBlock(nn.Module):
    """Pre-LayerNorm four-direction Mamba with a residual, on tokens `(B, L, C)`."""

    def __init__(self, dim: int, cfg: FusionMambaConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.block = MultiScanMamba(
            dim, cfg.d_state, cfg.d_conv, cfg.expand, 4, False, cfg.scan_backend, cfg.scan_memory
        )

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return self.block(_norm(self.norm, x, self.block), hw=hw) + x


class CrossMambaBlock(nn.Module):
    """Main input gives x and z, the other modality gives dt, B, C; residual on the main input."""

    def __init__(self, dim: int, cfg: FusionMambaConfig) -> None:
        super().__init__()
        self.norm0 = nn.LayerNorm(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.block = MultiScanMamba(
            dim, cfg.d_state, cfg.d_conv, cfg.expand, 4, True, cfg.scan_backend, cfg.scan_memory
        )

    def forward(self, main: torch.Tensor, other: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return (
            self.block(_norm(self.norm0, main, self.block), _norm(self.norm1, other, self.block), hw=hw)
            + main
        )


class FusionMambaModule(nn.Module):
    """One FusionMamba module on two maps `(B, C, H, W)`.

    Each branch through its own Mamba block, then PAN->MS and MS->PAN cross blocks, averaged and projected.
    Non-final modules average that fused map back into both branches; the final one returns it alone.
    """

    def __init__(self, dim: int, cfg: FusionMambaConfig, final: bool = False) -> None:
        super().__init__()
        self.final = final
        self.spa_mamba_layers = nn.ModuleList([SingleMambaBlock(dim, cfg)])
        self.spe_mamba_layers = nn.ModuleList([SingleMambaBlock(dim, cfg)])
        self.spa_cross_mamba = CrossMambaBlock(dim, cfg)
        self.spe_cross_mamba = CrossMambaBlock(dim, cfg)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, pan: torch.Tensor, ms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        h, w = pan.shape[-2:]
        pan_t = pan.flatten(2).transpose(1, 2)  # (B, H*W, C), row-major tokens
        ms_t = ms.flatten(2).transpose(1, 2)
        for spa, spe in zip(self.spa_mamba_layers, self.spe_mamba_layers, strict=True):
            pan_t = spa(pan_t, (h, w))
            ms_t = spe(ms_t, (h, w))
        spa_fused = self.spa_cross_mamba(pan_t, ms_t, (h, w))
        spe_fused = self.spe_cross_mamba(ms_t, pan_t, (h, w))
        fused = self.out_proj((spa_fused + spe_fused) / 2)

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).unflatten(2, (h, w))

        if self.final:
            return to_map(fused)
        return to_map((pan_t + fused) / 2), to_map((ms_t + fused) / 2)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 2, 2), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)


class Up(nn.Module):
    """2x transposed conv, add the skip, depthwise 3x3 + pointwise 1x1."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2), nn.LeakyReLU())
        self.conv = nn.Sequential(
            nn.Conv2d(cout, cout, 3, 1, 1, groups=cout), nn.Conv2d(cout, cout, 1), nn.LeakyReLU()
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x) + skip)


class Stage(nn.Module):
    """A FusionMamba module followed by a resampling shared by both branches."""

    def __init__(self, cin: int, cout: int, cfg: FusionMambaConfig, mode: str) -> None:
        super().__init__()
        self.fm = FusionMambaModule(cin, cfg)
        self.sample = Down(cin, cout) if mode == "down" else Up(cin, cout)

    def forward(
        self, pan: torch.Tensor, ms: torch.Tensor, skips: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ...]:
        pan, ms = self.fm(pan, ms)
        if skips is None:
            return self.sample(pan), self.sample(ms), pan, ms
        return self.sample(pan, skips[0]), self.sample(ms, skips[1])


class PixelShuffleUp(nn.Module):
    def __init__(self, bands: int, ratio: int) -> None:
        super().__init__()
        self.upsamle = nn.Sequential(
            nn.Conv2d(bands, bands * ratio**2, 3, 1, 1, bias=False), nn.PixelShuffle(ratio)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsamle(x)

    @torch.no_grad()
    def init_bilinear(self) -> None:
        """Start as bilinear interpolation on the area-aligned grid, so a fresh network's residual is
        already a sensible upsampled MS and training only has to learn the detail to inject."""
        conv = self.upsamle[0]
        bands, r = conv.in_channels, int(round((conv.out_channels // conv.in_channels) ** 0.5))
        taps = torch.zeros(r, 3, dtype=conv.weight.dtype)  # (sub-pixel offset, 3 taps at -1, 0, +1)
        for a in range(r):
            delta = (a + 0.5) / r - 0.5  # low-res coordinate of sub-pixel a, relative to its pixel
            taps[a, 1] = 1.0 - abs(delta)
            taps[a, 2 if delta > 0 else 0] = abs(delta)
        kernel = taps[:, None, :, None] * taps[None, :, None, :]  # (r, r, 3, 3), separable
        conv.weight.zero_()
        for c in range(bands):  # PixelShuffle reads channel c*r^2 + a*r + b for sub-pixel (a, b)
            conv.weight[c * r * r : (c + 1) * r * r, c] = kernel.reshape(r * r, 3, 3)


class SpectralAttention(nn.Module):
    """Band weights from the low-res MS: per-band max, Linear 1->a, LayerNorm, bidirectional Mamba over the
    band sequence, Linear a->1, sigmoid. `(B, C, h, w)` -> `(B, C, 1, 1)`.

    The per-band max is a statistic of the whole input; a tiled run passes the scene's (`band_max`) so
    that every tile gets the band weights the whole scene would get in one piece (no seams)."""

    def __init__(self, cfg: FusionMambaConfig) -> None:
        super().__init__()
        a = cfg.attn_dim
        self.block = nn.Sequential(
            nn.Linear(1, a),
            nn.LayerNorm(a),
            MultiScanMamba(a, cfg.d_state, cfg.d_conv, cfg.expand, 2, False, cfg.scan_backend),
            nn.Linear(a, 1),
            nn.Sigmoid(),
        )

    def forward(self, ms: torch.Tensor, band_max: torch.Tensor | None = None) -> torch.Tensor:
        """ms `(B, C, h, w)`; band_max `(B, C)` or `(C,)`, default the max of `ms` itself."""
        if band_max is None:
            band_max = torch.amax(ms, dim=(-2, -1))
        pooled = band_max.to(ms.dtype).expand(ms.shape[0], ms.shape[1]).unsqueeze(-1)  # (B, C, 1)
        return self.block(pooled).unsqueeze(-1)


class FusionMamba(nn.Module):
    """`forward(ms (B, C, h, w), pan (B, P, H, W)) -> (B, C, H, W)`, inputs and output in [0, 1] units."""

    def __init__(self, config: FusionMambaConfig) -> None:
        super().__init__()
        self.config = config
        c, p, d = config.ms_bands, config.pan_bands, config.dim
        self.upsample = PixelShuffleUp(c, config.ratio)
        self.raise_pan_dim = nn.Sequential(nn.Conv2d(p, d, 3, 1, 1), nn.LeakyReLU())
        self.raise_ms_dim = nn.Sequential(nn.Conv2d(c, d, 3, 1, 1), nn.LeakyReLU())
        self.to_hrms = nn.Sequential(nn.Conv2d(d, d, 3, 1, 1), nn.LeakyReLU(), nn.Conv2d(d, c, 3, 1, 1))
        self.stage0 = Stage(d, 2 * d, config, "down")
        self.stage1 = Stage(2 * d, 4 * d, config, "down")
        self.stage2 = Stage(4 * d, 2 * d, config, "up")
        self.stage3 = Stage(2 * d, d, config, "up")
        self.stage4 = FusionMambaModule(d, config, final=True)
        self.spe_attn = SpectralAttention(config)
        self.init_residual()

    def set_scan_memory(self, memory: float | None) -> None:
        """Bound (or unbound, None) the memory of every spatial scan, e.g. on a network trained
        unbounded; the spectral attention's scan over the band sequence is never tiled and keeps its own."""
        self.config = replace(self.config, scan_memory=memory)  # validated by __post_init__
        for name, module in self.named_modules():
            if isinstance(module, MultiScanMamba) and not name.startswith("spe_attn."):
                module.memory = memory

    @torch.no_grad()
    def init_residual(self) -> None:
        """A fresh network outputs the bilinearly upsampled MS: the upsampler starts as interpolation and
        the head's last conv at zero. Training then starts from an interpolation baseline instead of
        noise, which matters on CPU budgets. (Loading a checkpoint overwrites all of this.)"""
        self.upsample.init_bilinear()
        nn.init.zeros_(self.to_hrms[2].weight)
        nn.init.zeros_(self.to_hrms[2].bias)

    def check_inputs(self, ms: torch.Tensor, pan: torch.Tensor) -> None:
        """Clear errors for inputs that do not fit this network."""
        cfg = self.config
        if ms.dim() != 4 or pan.dim() != 4:
            raise FusionError(
                f"FusionMamba expects 4-D (B, C, H, W) inputs, got ms {tuple(ms.shape)}, "
                f"pan {tuple(pan.shape)}"
            )
        if ms.shape[1] != cfg.ms_bands:
            raise FusionError(
                f"this model expects {cfg.ms_bands} MS bands but the input has {ms.shape[1]}; "
                "choose a model trained for this sensor (fusion info lists them) or select bands"
            )
        if pan.shape[1] != cfg.pan_bands:
            raise FusionError(
                f"this model expects {cfg.pan_bands} PAN band(s) but the input has {pan.shape[1]}"
            )
        H, W = pan.shape[-2:]
        h, w = ms.shape[-2:]
        if (H, W) != (cfg.ratio * h, cfg.ratio * w):
            raise FusionError(
                f"PAN {H}x{W} is not {cfg.ratio} x MS {h}x{w}: the model's resolution ratio is {cfg.ratio}"
            )
        if H % 4 or W % 4:
            raise FusionError(f"PAN size {H}x{W} must be a multiple of {cfg.multiple} on each side")
        if ms.shape[0] != pan.shape[0]:
            raise FusionError(f"batch sizes differ: ms {ms.shape[0]}, pan {pan.shape[0]}")

    def forward(
        self,
        ms: torch.Tensor,
        pan: torch.Tensor,
        band_max: torch.Tensor | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`band_max` `(B, C)` or `(C,)`: per-band max of the whole scene for the spectral attention,
        when `ms` is one tile of it (default: the max of `ms`). `base` `(B, C, H, W)`: the product of
        `config.base` on the same inputs, required exactly when the config names one."""
        self.check_inputs(ms, pan)
        if (base is None) != (self.config.base is None):
            need = f"the {self.config.base} product as `base`" if self.config.base else "no `base`"
            raise FusionError(f"this FusionMamba takes {need}")
        if base is not None and base.shape != (*ms.shape[:2], *pan.shape[-2:]):
            raise FusionError(f"base {tuple(base.shape)} must be (B, C, H, W) of the PAN grid")
        if self.config.transpose_ensemble and not self.training:

            def t(x: torch.Tensor | None) -> torch.Tensor | None:
                return None if x is None else x.transpose(-1, -2)

            transposed = t(self._fuse(t(ms), t(pan), band_max, t(base)))
            return 0.5 * (self._fuse(ms, pan, band_max, base) + transposed)
        return self._fuse(ms, pan, band_max, base)

    def _fuse(
        self, ms: torch.Tensor, pan: torch.Tensor, band_max: torch.Tensor | None, base: torch.Tensor | None
    ) -> torch.Tensor:
        """One pass of the network on checked inputs (`forward` without the ensemble)."""
        up = self.upsample(ms) if base is None else base
        if not torch.is_grad_enabled() and pan.device.type == "cpu":
            # Channels-last maps: the modules' (B, C, H, W) <-> (B, H*W, C) token views are then free
            # instead of a strided copy per block (a few channels over a whole window, slow on a CPU).
            pan, up = (t.contiguous(memory_format=torch.channels_last) for t in (pan, up))
            if resolve_backend(self.config.scan_backend, pan.device)[0] == "numba":
                from fusion_cli.models import mamba_numba

                with mamba_numba.scratch():  # the fused blocks reuse their largest arrays
                    return self._stages(ms, pan, up, band_max)
        return self._stages(ms, pan, up, band_max)

    def _stages(
        self, ms: torch.Tensor, pan: torch.Tensor, up: torch.Tensor, band_max: torch.Tensor | None
    ) -> torch.Tensor:
        pan_f = self.raise_pan_dim(pan)
        ms_f = self.raise_ms_dim(up)
        pan_f, ms_f, pan_skip0, ms_skip0 = self.stage0(pan_f, ms_f)
        pan_f, ms_f, pan_skip1, ms_skip1 = self.stage1(pan_f, ms_f)
        pan_f, ms_f = self.stage2(pan_f, ms_f, (pan_skip1, ms_skip1))
        pan_f, ms_f = self.stage3(pan_f, ms_f, (pan_skip0, ms_skip0))
        fused = self.stage4(pan_f, ms_f)
        return self.to_hrms(fused) * self.spe_attn(ms, band_max) + up
