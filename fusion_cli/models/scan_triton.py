"""The ``triton`` selective-scan backend: a fused Triton kernel, forward and backward.

Same recurrence and argument shapes as `scan.py` (u, delta, z `(B, D, L)`; A `(D, N)`; B, C `(B, N, L)`
or grouped `(B, G, N, L)`; D, delta_bias `(D,)`); the kernels and their math are in
`_scan_triton_kernels.py`. Everything is computed in float32 whatever the input dtype (bf16/fp16 inputs
are read as they are and the output is written in u's dtype); float64 inputs are computed in float32 too.

The backward pass does not keep the `(B, D, N, L)` state history: the forward pass stores the state at
the start of every chunk (`(B, L / chunk, D, N)`) and the backward kernel recomputes each chunk's
states from there while it walks the adjoint recurrence from the end of the sequence.

triton is imported lazily (first scan), so the package imports and runs without it. On CPU the kernels
run only under the Triton interpreter (``TRITON_INTERPRET=1``), which is read when the kernels are
defined: `_kernels` re-imports them if the setting changed since.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch

from fusion_cli.errors import FusionError
from fusion_cli.models.scan_shapes import grouped_bc

_KERNELS = "fusion_cli.models._scan_triton_kernels"
# Programs wanted in flight before a block holds several channels (~2 per SM on an H100/H200).
_TARGET_PROGRAMS = 256
# Elements of one (BLOCK_D, BLOCK_N, CHUNK) tile of the GPU form: a dozen such tiles are live in the
# backward kernel, so this bounds its registers per thread.
_TILE_ELEMENTS = 2048


@lru_cache(maxsize=1)
def triton_import() -> tuple[bool, str]:
    """(whether triton imports, why / its version)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"triton is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    return True, f"triton {triton.__version__} imports"


def interpret_enabled() -> bool:
    """Whether ``$TRITON_INTERPRET`` asks for the Triton interpreter (kernels then run on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


_loaded: tuple[bool, ModuleType] | None = None


def _kernels() -> ModuleType:
    """The kernel module, (re)imported when the interpreter setting differs from the one it was built
    with (triton.jit picks interpreter or compiler when a kernel is defined)."""
    global _loaded
    ok, why = triton_import()
    if not ok:
        raise FusionError(f"scan backend triton unavailable: {why}")
    interp = interpret_enabled()
    if interp and not _library_interpreted():
        raise FusionError(
            "TRITON_INTERPRET=1 was set after triton was imported; set it before the first import"
        )
    if _loaded is None or _loaded[0] != interp:
        mod = sys.modules.get(_KERNELS)
        mod = importlib.reload(mod) if mod is not None else importlib.import_module(_KERNELS)
        _loaded = (interp, mod)
    return _loaded[1]


def _library_interpreted() -> bool:
    """Whether triton's own jit library (tl.sum) was defined for the interpreter: it is built once, when
    triton is imported, and a kernel run by the interpreter cannot call the compiled versions."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # a triton without these names: let the launch report what is wrong
        return True
    return isinstance(getattr(tl.standard, "sum", None), InterpretedFunction)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def choose_blocks(
    batch: int, groups: int, per_group: int, n: int, length: int, loop: bool
) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, CHUNK) for a scan of `batch` rows of `groups` x `per_group` channels.

    Loop form (interpreter): all channels of a group in one program (fewer Python-level steps), chunks of
    64 (only the checkpoint spacing). Tile form (GPU): few channels per program so that even B=1 fills
    the GPU, and the chunk as long as the tile budget allows.
    """
    block_n = _next_pow2(n)
    if loop:
        return min(_next_pow2(per_group), 64), block_n, 64
    block_d = 1
    for cand in (4, 2):
        if cand <= per_group and batch * groups * -(-per_group // cand) >= _TARGET_PROGRAMS:
            block_d = cand
            break
    chunk = max(16, _TILE_ELEMENTS // (block_d * block_n))
    chunk = min(chunk, max(16, _next_pow2(length)))
    return block_d, block_n, chunk


class _Config:
    """Launch settings shared by the forward and backward kernels (the chunk must match).

    The backward kernel holds about three times the forward's live tiles: with 4 warps it needs 255
    registers and spills at 2048-element tiles (ptxas for sm_90), with 8 warps it does not.
    """

    def __init__(self, block_d: int, block_n: int, chunk: int, loop: bool, num_warps: int | None) -> None:
        self.block_d, self.block_n, self.chunk, self.loop = block_d, block_n, chunk, loop
        self.warps_fwd = num_warps or 4
        self.warps_bwd = num_warps or 8


def _on_device(t: torch.Tensor) -> Any:
    """Launch on t's GPU (triton launches on the current device), a no-op on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        z: torch.Tensor | None,
        delta_bias: torch.Tensor | None,
        delta_softplus: bool,
        cfg: _Config,
    ) -> torch.Tensor:
        k = _kernels()
        b, dt, length = u.shape
        g, n = B.shape[1], B.shape[2]
        h = dt // g
        n_chunks = -(-length // cfg.chunk)
        store = any(ctx.needs_input_grad[:8])
        y = torch.empty_like(u)
        states = torch.empty(
            (b, n_chunks, dt, n) if store else (1,), device=u.device, dtype=torch.float32
        )  # (B, chunks, D, N): state entering each chunk
        dummy = u  # never read: the constexpr flags switch those loads off
        grid = (b * g, -(-h // cfg.block_d))
        with _on_device(u):
            k.scan_fwd_kernel[grid](
                u,
                delta,
                A,
                B,
                C,
                dummy if D is None else D,
                dummy if z is None else z,
                dummy if delta_bias is None else delta_bias,
                y,
                states,
                length,
                n_chunks,
                *_strides(B),
                *_strides(C),
                G=g,
                H=h,
                N=n,
                HAS_D=D is not None,
                HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(delta_softplus),
                STORE_STATES=store,
                LOOP=cfg.loop,
                BLOCK_D=cfg.block_d,
                BLOCK_N=cfg.block_n,
                CHUNK=cfg.chunk,
                num_warps=cfg.warps_fwd,
            )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        k = _kernels()
        b, dt, length = u.shape
        g, n = B.shape[1], B.shape[2]
        h = dt // g
        n_chunks = states.shape[1]
        n_dblocks = -(-h // cfg.block_d)
        dout = dout.contiguous()
        f32 = dict(device=u.device, dtype=torch.float32)
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.empty(b, dt, n, **f32)  # per-batch partial sums, reduced below
        dD = torch.empty(b, dt, **f32)
        dbias = torch.empty(b, dt, **f32)
        dB = torch.empty(b * g * n_dblocks, n, length, **f32)  # per channel-block partial sums
        dC = torch.empty(b * g * n_dblocks, n, length, **f32)
        scratch = torch.empty(
            (b * g * n_dblocks, cfg.block_d, cfg.block_n, cfg.chunk) if cfg.loop else (1,), **f32
        )
        dummy = u
        with _on_device(u):
            k.scan_bwd_kernel[(b * g, n_dblocks)](
                u,
                delta,
                A,
                B,
                C,
                dummy if D is None else D,
                dummy if z is None else z,
                dummy if delta_bias is None else delta_bias,
                dout,
                states,
                du,
                ddelta,
                dummy if dz is None else dz,
                dA,
                dD,
                dbias,
                dB,
                dC,
                scratch,
                length,
                n_chunks,
                *_strides(B),
                *_strides(C),
                G=g,
                H=h,
                N=n,
                HAS_D=D is not None,
                HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None,
                SOFTPLUS=ctx.delta_softplus,
                LOOP=cfg.loop,
                BLOCK_D=cfg.block_d,
                BLOCK_N=cfg.block_n,
                CHUNK=cfg.chunk,
                num_warps=cfg.warps_bwd,
            )

        def blocks_sum(x: torch.Tensor) -> torch.Tensor:  # (B*G*blocks, N, L) -> (B, G, N, L)
            return x.view(b, g, n_dblocks, n, length).sum(2)

        return (
            du,
            ddelta,
            dA.sum(0).to(A.dtype),
            blocks_sum(dB).to(B.dtype),
            blocks_sum(dC).to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype),
            dz,
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
            None,
            None,
        )


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    block_d: int | None = None,
    chunk: int | None = None,
    loop: bool | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Fused Triton selective scan (differentiable). Returns `(B, D, L)` in u's dtype.

    ``block_d``/``chunk``/``num_warps`` override the launch settings (``chunk`` a power of two; default
    warps: 4 forward, 8 backward);
    ``loop`` picks the per-position form (default: only under the interpreter, see the kernels module).
    """
    interp = interpret_enabled()
    if not u.is_cuda and not interp:
        raise FusionError(
            "scan backend triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    b, dt, length = u.shape
    B, C = grouped_bc(dt, B, C)
    g, n = B.shape[1], B.shape[2]
    if A.shape != (dt, n):
        raise ValueError(f"scan shapes: u {tuple(u.shape)} needs A of ({dt}, {n}), got {tuple(A.shape)}")
    loop = interp if loop is None else loop
    bd, bn, ch = choose_blocks(b, g, dt // g, n, length, loop)
    if chunk is not None and chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    cfg = _Config(block_d or bd, bn, chunk or ch, loop, num_warps)
    # The kernels index u/delta/z/A/D/bias as contiguous; B and C go by their strides.
    u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
    z = None if z is None else z.contiguous()
    D = None if D is None else D.contiguous()
    delta_bias = None if delta_bias is None else delta_bias.contiguous()
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cfg)
