"""Selective scan (the Mamba S6 recurrence) behind one interface, with three backends.

The recurrence, per batch b, channel d and state n (all backends compute exactly this):

    delta = softplus(delta + delta_bias)            (when delta_softplus)
    h[t]  = exp(delta[t] * A[d, n]) * h[t-1] + delta[t] * B[n, t] * u[t]
    y[t]  = sum_n C[n, t] * h[t, n] + D[d] * u[t]
    y[t] *= silu(z[t])                              (when z is given)

Shapes follow mamba-ssm's `selective_scan_fn`: u, delta, z `(B, D, L)`; A `(D, N)`; B, C `(B, N, L)` or
grouped `(B, G, N, L)` where the D channels are split into G equal groups that share B and C (this is how
the four scan directions of one block run as one call); D and delta_bias `(D,)`.

Backends:
- ``reference``: the plain sequential loop, float64-capable; the oracle for tests.
- ``torch``: a chunked scan in pure PyTorch. Inside each chunk of length T the recurrence runs step by
  step but vectorised over all chunks at once; a short loop then carries the state across chunks, and a
  correction adds the carried state, decayed by exp(cumulative log-decay), to every position. Every
  exponent is a sum of delta*A <= 0, so nothing overflows in float32, and the work is O(L), not O(L*T).
- ``numba``: fused CPU kernels (`fusion_cli.models.scan_numba`): one pass over L per (batch, channel)
  in parallel, with a numba backward (numba is a dependency; where it cannot load, torch runs).
- ``mamba_ssm``: mamba-ssm's CUDA kernel, used only when it imports and the tensors are on CUDA.
- ``triton``: a fused Triton kernel (scan_triton.py), forward and backward; automatic on CUDA when
  mamba_ssm does not import but triton does; on CPU only on request under ``TRITON_INTERPRET=1``.

The backend is chosen by the ``backend`` argument, else ``$FUSION_SCAN_BACKEND``, else automatically:
mamba_ssm, else triton on CUDA; numba on CPU; torch where those are missing.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import torch
import torch.nn.functional as F

from fusion_cli.errors import FusionError
from fusion_cli.models import scan_triton
from fusion_cli.models.scan_shapes import grouped_bc

BACKENDS = ("reference", "torch", "numba", "mamba_ssm", "triton")
ENV_VAR = "FUSION_SCAN_BACKEND"

# Elements (rows x channels x states x length) of one slab of the torch scan: bounds its peak memory
# (a handful of float32 tensors of this size). Each slab pays the Python loops again (T + L/T steps),
# so slabs are large: 32M elements (~0.7 GB peak) on CPU, 256M on CUDA where launches dominate.
_SLAB_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}


@lru_cache(maxsize=1)
def _mamba_ssm_import() -> tuple[object | None, str]:
    """(selective_scan_fn or None, why not)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, or a broken CUDA extension raising anything
        return None, f"mamba_ssm is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    return selective_scan_fn, "mamba_ssm imports"


@lru_cache(maxsize=1)
def _numba_import() -> tuple[object | None, str]:
    """(selective_scan_numba or None, why not): where numba cannot load, CPU scans use torch."""
    try:
        from fusion_cli.models.scan_numba import selective_scan_numba
    except Exception as exc:  # ImportError, or a numba/llvmlite that fails to load
        return None, f"numba is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    return selective_scan_numba, "numba imports"


# Set when a numba kernel failed to compile in this process: automatic choice then stays on torch.
_numba_broken: str | None = None


@lru_cache(maxsize=1)
def _causal_conv1d_import() -> object | None:
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


def resolve_backend(backend: str | None = None, device: torch.device | str | None = None) -> tuple[str, str]:
    """Which backend a scan on ``device`` will use, and why: ``(name, reason)``.

    ``backend`` (argument) wins over ``$FUSION_SCAN_BACKEND``; ``None``/"auto" means automatic:
    on CUDA mamba_ssm when it imports, else triton when it imports; on CPU numba when it imports;
    else torch.
    """
    dev = torch.device(device) if device is not None else None
    source = "argument"
    if backend is None or backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            backend, source = env, f"${ENV_VAR}"
    if backend is not None and backend != "auto":
        if backend not in BACKENDS:
            raise FusionError(
                f"unknown scan backend {backend!r} (from {source}); "
                f"choose one of {', '.join(BACKENDS)} or auto"
            )
        if backend == "mamba_ssm":
            fn, why = _mamba_ssm_import()
            if fn is None:
                raise FusionError(f"scan backend mamba_ssm requested ({source}) but {why}; use torch")
            if dev is not None and dev.type != "cuda":
                raise FusionError(
                    f"scan backend mamba_ssm requested ({source}) but the model runs on {dev}; it needs CUDA"
                )
        if backend == "numba":
            fn, why = _numba_import()
            if fn is None:
                raise FusionError(f"scan backend numba requested ({source}) but {why}; use torch")
            if dev is not None and dev.type != "cpu":
                raise FusionError(
                    f"scan backend numba requested ({source}) but the model runs on {dev}; it is CPU-only"
                )
        if backend == "triton":
            ok, why = scan_triton.triton_import()
            if not ok:
                raise FusionError(f"scan backend triton requested ({source}) but {why}; use torch")
            on_cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
            if not on_cuda and not scan_triton.interpret_enabled():
                raise FusionError(
                    f"scan backend triton requested ({source}) but the model runs on {dev or 'cpu'}; "
                    "it needs CUDA, or TRITON_INTERPRET=1 for the (slow) CPU interpreter"
                )
        return backend, f"requested by {source}"
    on_cuda = (dev.type == "cuda") if dev is not None else torch.cuda.is_available()
    if not on_cuda:
        fn, why = _numba_import()
        if fn is not None and _numba_broken is None:
            return "numba", "automatic: no CUDA device, fused numba CPU scan"
        why = _numba_broken or why
        return "torch", f"automatic: no CUDA device and {why}, chunked pure-PyTorch scan"
    fn, why = _mamba_ssm_import()
    if fn is None:
        ok, why_triton = scan_triton.triton_import()
        if ok:
            return "triton", f"automatic: {why}, {why_triton}: fused Triton scan on CUDA"
        return "torch", f"automatic: {why}, chunked pure-PyTorch scan on CUDA"
    return "mamba_ssm", "automatic: CUDA device and mamba_ssm imports"


def _prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, ...]:
    """Common argument handling: compute dtype (>= float32), delta activation, grouped B/C as 4-D."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = grouped_bc(u.shape[1], B, C)
    return u, delta, A, B, C


def _finish(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Sequential oracle: one step per position, in float64 when given float64. Returns `(B, D, L)`."""
    out_dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, length = u.shape
    g, n = B.shape[1], B.shape[2]
    # Per-channel B and C (B, D, N, L): expand the groups.
    Bx = B.repeat_interleave(d // g, dim=1)
    Cx = C.repeat_interleave(d // g, dim=1)
    h = u.new_zeros(b, d, n)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * Bx[:, :, :, t] * u[:, :, t, None]
        ys.append((h * Cx[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return _finish(y, u, D, z, out_dtype)


def _chunk_length(length: int) -> int:
    """Chunk T ~ sqrt(L) balances the in-chunk loop (T steps) and the carry loop (L/T steps)."""
    return int(min(256, max(8, 2 ** round(math.log2(max(1.0, math.sqrt(length)))))))


def _steps_first(x: torch.Tensor, T: int) -> torch.Tensor:
    """(R, X, K*T) -> (T, R, X, K): position t of every chunk is one contiguous slice. The move is one
    2-D transpose of an (R*X*K, T) matrix, which torch copies ~4x faster than the equivalent 4-D permute
    (the permuted copies were a third of a CPU forward pass)."""
    r, c, length = x.shape
    return x.reshape(-1, T).t().contiguous().view(T, r, c, length // T)


def _steps_last(y: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """(T, R, X, K) -> (R, X, K*T), the inverse of `_steps_first` (again one 2-D transpose)."""
    T = y.shape[0]
    return y.reshape(T, -1).t().contiguous().view(r, c, -1)


def _scan_rows(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Chunked scan core, no D/z. u, delta `(R, H, L)`; A `(R, H, N)`; B, C `(R, N, L)` -> y `(R, H, L)`.

    Rows R are (batch, group) pairs: all H channels of a row share B and C. This differentiable form
    keeps the state history for autograd; inference uses `_scan_rows_streaming`.
    """
    r, hch, length = u.shape
    T = chunk
    K = -(-length // T)
    pad = K * T - length
    if pad:
        # Zero log-decay and zero input past the end: the padded steps change nothing before them.
        u, delta, B, C = (F.pad(t, (0, pad)) for t in (u, delta, B, C))

    def steps_first(x: torch.Tensor) -> torch.Tensor:
        return _steps_first(x, T)

    dt = steps_first(delta).unsqueeze(3)  # (T, R, H, 1, K)
    # Contiguous in this order so that each step of the loops below reads one dense slice.
    dA = (dt * A[None, :, :, :, None]).contiguous()  # (T, R, H, N, K), <= 0
    dBu = ((dt * steps_first(u).unsqueeze(3)) * steps_first(B).unsqueeze(2)).contiguous()
    decay = torch.exp(dA)

    # unbind, not indexing: one backward node for all steps instead of a full-size zero gradient
    # per indexed step (which made the backward quadratic in T).
    dbu_steps, decay_steps = dBu.unbind(0), decay.unbind(0)
    hs_list = [dbu_steps[0]]
    for t in range(1, T):
        hs_list.append(torch.addcmul(dbu_steps[t], decay_steps[t], hs_list[-1]))
    hs = torch.stack(hs_list)

    if K > 1:
        # In-chunk cumulative log-decay (T, R, H, N, K), <= 0. A is constant along the sequence, so
        # cumsum(delta * A) = cumsum(delta) * A: the cumsum runs on an N-times smaller tensor.
        cum = torch.cumsum(dt, dim=0) * A[None, :, :, :, None]
        chunk_decay = torch.exp(cum[-1]).movedim(-1, 0)  # (K, R, H, N)
        chunk_end = hs[-1].movedim(-1, 0)  # (K, R, H, N): local state at each chunk's end
        ends, decays = chunk_end.unbind(0), chunk_decay.unbind(0)
        carries = [torch.zeros_like(ends[0])]
        for k in range(1, K):
            carries.append(torch.addcmul(ends[k - 1], decays[k - 1], carries[-1]))
        carry = torch.stack(carries, dim=-1)  # (R, H, N, K): state entering each chunk
        hs = hs + torch.exp(cum) * carry
    y = (hs * steps_first(C).unsqueeze(2)).sum(3)  # (T, R, H, K)
    y = _steps_last(y, r, hch)
    return y[..., :length] if pad else y


def _scan_rows_streaming(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Inference form of `_scan_rows`: the same chunked scan without any `(T, R, H, N, K)` tensor.

    Pass 1 runs the in-chunk recurrence from a zero state to get each chunk's end state; a short loop
    carries states across chunks; pass 2 reruns the recurrence from the carried state and contracts
    with C at every step. Decays are recomputed per step, so the state-sized work stays in cache:
    about 4x less CPU time than materialising the full state history.
    """
    r, hch, length = u.shape
    n = A.shape[-1]
    T = chunk
    K = -(-length // T)
    pad = K * T - length
    if pad:
        u, delta, B, C = (F.pad(t, (0, pad)) for t in (u, delta, B, C))

    def steps_first(x: torch.Tensor) -> torch.Tensor:
        return _steps_first(x, T)

    dt = steps_first(delta).unsqueeze(3)  # (T, R, H, 1, K)
    dtu = dt * steps_first(u).unsqueeze(3)  # (T, R, H, 1, K)
    Bs = steps_first(B).unsqueeze(2)  # (T, R, 1, N, K)
    Cs = steps_first(C).unsqueeze(2)
    Ak = A.unsqueeze(-1)  # (R, H, N, 1)
    dec = u.new_empty(r, hch, n, K)
    tmp = u.new_empty(r, hch, n, K)
    h = u.new_zeros(r, hch, n, K)
    if K > 1:
        for t in range(T):
            torch.mul(dt[t], Ak, out=dec)
            h.mul_(dec.exp_()).addcmul_(dtu[t], Bs[t])
        chunk_decay = torch.exp(dt.sum(0) * Ak).movedim(-1, 0)  # (K, R, H, N)
        ends = h.movedim(-1, 0)  # (K, R, H, N): local end state of each chunk
        carry = torch.empty_like(ends)
        carry[0] = 0
        for k in range(1, K):
            torch.addcmul(ends[k - 1], chunk_decay[k - 1], carry[k - 1], out=carry[k])
        h = carry.movedim(0, -1).contiguous()  # state entering each chunk
    y = u.new_empty(T, r, hch, K)
    for t in range(T):
        torch.mul(dt[t], Ak, out=dec)
        h.mul_(dec.exp_()).addcmul_(dtu[t], Bs[t])
        torch.sum(torch.mul(h, Cs[t], out=tmp), dim=2, out=y[t])
    y = _steps_last(y, r, hch)
    return y[..., :length] if pad else y


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """Chunked pure-PyTorch scan (CPU or GPU, differentiable). Returns `(B, D, L)`."""
    out_dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, length = u.shape
    g, n = B.shape[1], B.shape[2]
    hch = d // g
    T = chunk or _chunk_length(length)
    # Rows = (batch, group): (B*G, H, L), B/C (B*G, N, L), A per row (B*G, H, N).
    u_r = u.reshape(b * g, hch, length)
    d_r = delta.reshape(b * g, hch, length)
    A_r = A.reshape(g, hch, n).repeat(b, 1, 1)
    B_r = B.reshape(b * g, n, length)
    C_r = C.reshape(b * g, n, length)
    # Slabs of rows and channels bound memory; channels are independent given their row's B and C.
    per_channel = n * length
    slab = _SLAB_ELEMENTS.get(u.device.type, _SLAB_ELEMENTS["cpu"])
    ch_step = max(1, min(hch, slab // per_channel))
    row_step = max(1, slab // (per_channel * ch_step)) if ch_step == hch else 1
    track_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    core = _scan_rows if track_grad else _scan_rows_streaming
    if ch_step == hch and row_step >= b * g:
        y = core(u_r, d_r, A_r, B_r, C_r, T)
    else:
        rows = []
        for r0 in range(0, b * g, row_step):
            rs = slice(r0, r0 + row_step)
            parts = [
                core(
                    u_r[rs, c0 : c0 + ch_step],
                    d_r[rs, c0 : c0 + ch_step],
                    A_r[rs, c0 : c0 + ch_step],
                    B_r[rs],
                    C_r[rs],
                    T,
                )
                for c0 in range(0, hch, ch_step)
            ]
            rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        y = torch.cat(rows, dim=0)
    return _finish(y.reshape(b, d, length), u, D, z, out_dtype)


def selective_scan_mamba_ssm(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """mamba-ssm's fused CUDA kernel (grouped B/C supported natively)."""
    fn, why = _mamba_ssm_import()
    if fn is None:
        raise FusionError(f"scan backend mamba_ssm unavailable: {why}")
    if not u.is_cuda:
        raise FusionError("scan backend mamba_ssm needs CUDA tensors; use the torch backend on CPU")
    # The kernel wants contiguous inputs and fp32 A/D/delta_bias.
    return fn(  # type: ignore[operator]
        u.contiguous(),
        delta.contiguous(),
        A.float().contiguous(),
        B.contiguous(),
        C.contiguous(),
        None if D is None else D.float(),
        None if z is None else z.contiguous(),
        None if delta_bias is None else delta_bias.float(),
        delta_softplus,
    )


def selective_scan_numba(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Fused numba CPU scan (differentiable); see `fusion_cli.models.scan_numba`."""
    fn, why = _numba_import()
    if fn is None:
        raise FusionError(f"scan backend numba unavailable: {why}")
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)  # type: ignore[operator]


_IMPLS = {
    "reference": selective_scan_reference,
    "torch": selective_scan_torch,
    "numba": selective_scan_numba,
    "mamba_ssm": selective_scan_mamba_ssm,
    "triton": scan_triton.selective_scan_triton,
}


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Selective scan with the chosen backend (see module docstring). Returns `(B, D, L)`."""
    global _numba_broken
    name, why = resolve_backend(backend, u.device)
    if name != "numba":
        return _IMPLS[name](u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    try:
        return _IMPLS[name](u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    except Exception as exc:
        from numba.core.errors import NumbaError  # importable: resolve_backend chose numba

        if not isinstance(exc, NumbaError):
            raise
        reason = f"the numba kernel failed to compile ({type(exc).__name__})"
        if not why.startswith("automatic"):
            raise FusionError(f"scan backend numba: {reason}; use torch") from exc
        # Automatic choice: fall back to torch for the rest of the process, and say why in `info`.
        _numba_broken = reason
        return _IMPLS["torch"](u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """Causal depthwise conv1d: x `(B, D, L)`, weight `(D, K)`, bias `(D,)` -> `(B, D, L)`.

    Output t sees inputs t-K+1..t. Uses the causal_conv1d CUDA kernel when present and x is on CUDA.
    """
    fn = _causal_conv1d_import() if x.is_cuda else None
    if fn is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return fn(x.contiguous(), weight.contiguous(), bias, activation)  # type: ignore[operator]
    k = weight.shape[-1]
    y = F.conv1d(F.pad(x, (k - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    if activation in ("silu", "swish"):
        y = F.silu(y)
    return y
