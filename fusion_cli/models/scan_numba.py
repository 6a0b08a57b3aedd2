"""Fused CPU selective scan in numba: forward and backward kernels, and the autograd wrapper.

Computes exactly the recurrence of `fusion_cli.models.scan` (see its docstring). The torch backend runs
the scan as thousands of small tensor ops per call; on a shared CPU each pays OpenMP start/stop costs.
Here each sequential pass over L keeps the N-dim states in small local arrays, and passes run in
parallel (`prange`): in float32 the forward takes LANES channels of a group per pass as SIMD lanes
(`_forward_lanes_kernel`, `_lane_recurrence`, shared with `mamba_numba`), float64 one channel per
pass. delta_bias + softplus, the D skip and the silu(z) gate are fused, so no `(B, D, N, L)` tensor
ever exists.

Backward (`SelectiveScanNumba`): per (batch, channel) the forward states are recomputed into a
per-work-item `(L, N)` buffer, then a reverse-time pass gives the gradients of u, delta (before the
softplus, hence also delta_bias), A, B, C, D and z. Work items are (batch, group, slice of the group's
channels) so that the B/C gradients of a group are accumulated without races; the slices' partial
sums are added in torch.

The kernels compute in the input's floating dtype (float32 or float64); the per-channel A/D/bias
gradients, sums over the whole sequence, accumulate in float64. In float32, exp and log1p are
polynomials that LLVM vectorises (~1 ulp and 1.5e-8 relative); float64 uses libm.

Threads: as many as torch uses, items handed out one at a time (see `_threads`). numba's OpenMP
layer is used when present; its idle threads do not spin against torch's for long, and two processes
scanning at once on shared cores slow each other about 2x (bench/bench_scan.py), not more.

Importing this module needs numba; `scan._numba_import` guards it. `cache=True` stores the compiled
kernels beside this file or, when that is read-only, in numba's user cache dir; where neither is
writable, the kernels are compiled without a cache (each process pays the compile once).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numba
import numpy as np
import torch
from numba import prange, types
from numba.extending import overload

from fusion_cli.models.scan_shapes import grouped_bc
from fusion_cli.models.simd import (
    EXP_POLY,
    EXP_RANGE,
    EXP_REDUCTION,
    LOG1P_SERIES,
    WIDTH,
    vexp2,
    vfma,
    vload,
    vmul,
    vpair,
    vstore,
)

# fastmath without nnan/ninf: lets LLVM vectorise the per-state loops and reorder their sums, and keeps
# inf/nan semantics (an overflowing scan still shows as inf, as in the other backends).
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Steps per block: the block's decays (BLOCK x N) stay in L1 between the exp pass and the recurrence.
BLOCK = 256


def _njit(fn: Callable[..., Any]) -> Any:
    """`njit(parallel, cache)`, without the cache where numba finds no writable cache location
    (a read-only install with an unwritable home): numba raises at decoration time then."""
    opts: dict[str, Any] = {"parallel": True, "nogil": True, "fastmath": _FASTMATH, "error_model": "numpy"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", numba.NumbaWarning)
            kernel = numba.njit(cache=True, **opts)(fn)
    except RuntimeError:
        return numba.njit(cache=False, **opts)(fn)
    _stamp_with_kernel_sources(kernel)
    return kernel


# The files whose code the kernels compile in (they inline each other's helpers)
KERNEL_SOURCES = ("scan_numba.py", "mamba_numba.py", "simd.py")


def kernel_sources_stamp() -> tuple[tuple[float, int], ...]:
    """(mtime, size) of each of KERNEL_SOURCES."""
    folder = os.path.dirname(os.path.abspath(__file__))
    stats = [os.stat(os.path.join(folder, name)) for name in KERNEL_SOURCES]
    return tuple((st.st_mtime, st.st_size) for st in stats)


def _stamp_with_kernel_sources(kernel: Any) -> None:
    """numba marks a kernel's cache stale when the kernel's own file changes, not when a helper it
    inlines from another file does: in a source checkout, a pull that changed only simd.py would load
    the old compiled kernels. The cache's stamp gets every kernel source's (numba's internals; where
    they differ, numba's own stamp stays)."""
    cache_file = getattr(getattr(kernel, "_cache", None), "_cache_file", None)
    if cache_file is not None and hasattr(cache_file, "_source_stamp"):
        cache_file._source_stamp = (cache_file._source_stamp, kernel_sources_stamp())


# float32 exp and log1p as plain arithmetic, so LLVM vectorises them (libm's expf is a scalar call,
# and numba has no vector math library without Intel SVML): 8-16 exps per instruction instead of one.
# exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Cephes' degree-7 polynomial (~1 ulp), 2^n put
# into the exponent bits. Inputs are clamped to [-87, 88]: below, the true value is < 1.7e-38 (a state
# that has forgotten everything either way). log1p(v) for v in [0, 1]: 2 atanh(v / (2 + v)), series to
# s^13 (relative error 1.5e-8).
# The constants live in `simd`, whose 16-lane versions compute the same.
_F = np.float32
_LOG2E, _LN2_HI, _LN2_LO = EXP_REDUCTION
_E0, _E1, _E2, _E3, _E4, _E5 = EXP_POLY
_LO, _HI = EXP_RANGE
_HALF, _ONE, _TWO, _ZERO = _F(0.5), _F(1.0), _F(2.0), _F(0.0)
_L3, _L5, _L7, _L9, _L11, _L13 = LOG1P_SERIES


@numba.njit(inline="always", fastmath=_FASTMATH, cache=False)
def _exp32(x: float) -> float:
    x = min(max(x, _LO), _HI)
    k = np.floor(x * _LOG2E + _HALF)
    r = x - k * _LN2_HI - k * _LN2_LO
    p = ((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5
    p = p * r * r + r + _ONE
    return p * np.int32((np.int32(k) + np.int32(127)) << np.int32(23)).view(np.float32)


@numba.njit(inline="always", fastmath=_FASTMATH, cache=False)
def _log1p32(v: float) -> float:
    s = v / (_TWO + v)
    s2 = s * s
    return _TWO * s * (_ONE + s2 * (_L3 + s2 * (_L5 + s2 * (_L7 + s2 * (_L9 + s2 * (_L11 + s2 * _L13))))))


def _exp(x: float) -> float:  # typed per dtype below
    return math.exp(x)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@overload(_exp, inline="always", jit_options={"fastmath": _FASTMATH})
def _exp_impl(x):  # type: ignore[no-untyped-def]  # numba compares signatures: no hints
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(x)


@overload(_softplus, inline="always", jit_options={"fastmath": _FASTMATH})
def _softplus_impl(x):  # type: ignore[no-untyped-def]
    # max(x, 0) + log1p(exp(-|x|)): no overflow for large x, and branch-free for the vectoriser.
    if x == types.float32:
        return lambda x: max(x, _ZERO) + _log1p32(_exp32(-abs(x)))
    return lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@overload(_sigmoid, inline="always", jit_options={"fastmath": _FASTMATH})
def _sigmoid_impl(x):  # type: ignore[no-untyped-def]
    if x == types.float32:
        return lambda x: _ONE / (_ONE + _exp32(-x))
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@numba.njit(inline="always", fastmath=_FASTMATH, cache=False)
def _steps(raw, bias, softplus, dts, dec, a_d):  # type: ignore[no-untyped-def]
    """One block: step sizes dts[i] = (softplus)(raw[i] + bias) and decays dec[i, k] = exp(dts[i] a_d[k])
    (dec flat, `(m * N,)`), each as a flat loop that vectorises."""
    m = raw.shape[0]
    n = a_d.shape[0]
    for i in range(m):
        dts[i] = raw[i] + bias
    if softplus:  # in place: a loop from one array into another may alias and would not vectorise
        for i in range(m):
            dts[i] = _softplus(dts[i])
    for i in range(m):
        for k in range(n):
            dec[i * n + k] = dts[i] * a_d[k]
    for j in range(m * n):
        dec[j] = _exp(dec[j])


@numba.njit(inline="always", fastmath=_FASTMATH, cache=False)
def _block_forward(n, m, t0, dts, dec, h, u_row, bt, ct, dv, y_row):  # type: ignore[no-untyped-def]
    """m steps of the recurrence from state h (updated), y_row[t0 + i] = C h + D u. Called with a
    literal n where possible: a constant trip count lets LLVM unroll the state loop into SIMD lanes."""
    for i in range(m):
        t = t0 + i
        ut = u_row[t]
        dtu = dts[i] * ut
        acc = dv * ut
        for k in range(n):
            hk = dec[i * n + k] * h[k] + dtu * bt[t, k]
            h[k] = hk
            acc += ct[t, k] * hk
        y_row[t] = acc


@numba.njit(inline="always", fastmath=_FASTMATH, cache=False)
def _block_forward8(m, t0, dts, dec, h, u_row, bt, ct, dv, y_row):  # type: ignore[no-untyped-def]
    """`_block_forward` for N=8 with the state in eight scalars: LLVM cannot prove that the output
    row does not alias the state array, so an array state goes through memory at every step (~25%
    slower)."""
    h0, h1, h2, h3, h4, h5, h6, h7 = h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]
    for i in range(m):
        t = t0 + i
        ut = u_row[t]
        dtu = dts[i] * ut
        j = i * 8
        h0 = dec[j] * h0 + dtu * bt[t, 0]
        h1 = dec[j + 1] * h1 + dtu * bt[t, 1]
        h2 = dec[j + 2] * h2 + dtu * bt[t, 2]
        h3 = dec[j + 3] * h3 + dtu * bt[t, 3]
        h4 = dec[j + 4] * h4 + dtu * bt[t, 4]
        h5 = dec[j + 5] * h5 + dtu * bt[t, 5]
        h6 = dec[j + 6] * h6 + dtu * bt[t, 6]
        h7 = dec[j + 7] * h7 + dtu * bt[t, 7]
        c = ct[t]
        lo = (c[0] * h0 + c[1] * h1) + (c[2] * h2 + c[3] * h3)
        y_row[t] = dv * ut + (lo + ((c[4] * h4 + c[5] * h5) + (c[6] * h6 + c[7] * h7)))
    h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7] = h0, h1, h2, h3, h4, h5, h6, h7


def _forward_kernel(u, delta, A, Bt, Ct, Dv, z, bias, softplus, has_z, y):  # type: ignore[no-untyped-def]
    """u, delta, z, y `(B, D, L)`; A `(D, N)`; Bt, Ct `(B, G, L, N)` (state last: one cache line per
    step); Dv, bias `(D,)`. Writes y."""
    nb, nd, length = u.shape
    groups = Bt.shape[1]
    n = A.shape[1]
    hch = nd // groups
    for item in prange(nb * nd):
        b = item // nd
        d = item % nd
        g = d // hch
        h = np.zeros(n, dtype=u.dtype)
        dts = np.empty(BLOCK, dtype=u.dtype)
        dec = np.empty(BLOCK * n, dtype=u.dtype)
        gate = np.empty(BLOCK, dtype=u.dtype)
        a_d = A[d]
        bt = Bt[b, g]
        ct = Ct[b, g]
        u_row = u[b, d]
        y_row = y[b, d]
        for t0 in range(0, length, BLOCK):
            m = min(BLOCK, length - t0)
            _steps(delta[b, d, t0 : t0 + m], bias[d], softplus, dts, dec, a_d)
            if n == 8:  # the model's d_state
                _block_forward8(m, t0, dts, dec, h, u_row, bt, ct, Dv[d], y_row)
            elif n == 16:
                _block_forward(16, m, t0, dts, dec, h, u_row, bt, ct, Dv[d], y_row)
            else:
                _block_forward(n, m, t0, dts, dec, h, u_row, bt, ct, Dv[d], y_row)
            if has_z:
                # silu(z) in place in a local buffer first: a loop reading z and writing y may alias
                # as far as LLVM knows, and would not vectorise.
                for i in range(m):
                    gate[i] = z[b, d, t0 + i]
                for i in range(m):
                    gate[i] = gate[i] * _sigmoid(gate[i])
                for i in range(m):
                    y_row[t0 + i] *= gate[i]


@numba.njit(inline="always", fastmath=_FASTMATH, cache=False)
def _recompute(n, length, dts, dec, hs, u_row, bt):  # type: ignore[no-untyped-def]
    """States of one channel, hs[(t + 1) * n + k] = h[t, k] (flat; hs[:n] = 0 is the state before
    t = 0, so the reverse pass needs no branch for it)."""
    for k in range(n):
        hs[k] = 0.0
    for t in range(length):
        dtu = dts[t] * u_row[t]
        for k in range(n):
            hs[(t + 1) * n + k] = dec[t * n + k] * hs[t * n + k] + dtu * bt[t, k]


@numba.njit(inline="always", fastmath=_FASTMATH, cache=False)
def _reverse(
    n,
    length,
    a_d,
    dv,
    dts,
    dec,
    hs,
    u_row,
    dy_row,
    gate,
    ds_row,
    bt,
    ct,
    dct,
    dbt,
    gs,
    da_blk,
    da_acc,
    du_row,
    dd_row,
):  # type: ignore[no-untyped-def]  # noqa: E501
    """Reverse-time pass of one channel. gate[t]: dy -> d(pre-gate y) factor (silu(z) or 1); ds_row[t]:
    d softplus / d raw (or 1). gs carries dL/dh[t+1] * dec[t+1] into step t. Writes du_row, dd_row
    (gradient of the raw delta), adds into dct, dbt and da_acc (float64, through per-block partials in
    the compute dtype); returns the channel's (dL/dD, dL/d delta_bias) sums."""
    for k in range(n):
        gs[k] = 0.0
        da_blk[k] = 0.0
    dd_acc = 0.0
    db_acc = 0.0
    for t in range(length - 1, -1, -1):
        ut = u_row[t]
        dt = dts[t]
        g_out = dy_row[t] * gate[t]
        dd_acc += g_out * ut
        du_t = g_out * dv
        ddt = ut * 0.0
        dtu = dt * ut
        for k in range(n):
            gk = gs[k] + g_out * ct[t, k]  # dL/dh[t, k]
            e = dec[t * n + k]
            dh = gk * hs[t * n + k] * e  # dL/d(delta * A[k]) at step t, times 1/delta
            da_blk[k] += dh * dt
            ddt += dh * a_d[k] + gk * bt[t, k] * ut
            dct[t, k] += g_out * hs[(t + 1) * n + k]
            dbt[t, k] += gk * dtu
            du_t += gk * dt * bt[t, k]
            gs[k] = gk * e
        du_row[t] = du_t
        ddt *= ds_row[t]
        dd_row[t] = ddt
        db_acc += ddt
        if t % BLOCK == 0:
            for k in range(n):
                da_acc[k] += da_blk[k]
                da_blk[k] = 0.0
    return dd_acc, db_acc


def _backward_kernel(  # type: ignore[no-untyped-def]
    u, delta, A, Bt, Ct, Dv, z, bias, softplus, has_z, dy, nsplit, du, ddelta, dz, dA, dD, dbias, dBt, dCt
):
    """Gradients of the scan. Inputs as `_forward_kernel`, dy `(B, D, L)`. Writes du, ddelta, dz
    `(B, D, L)` (ddelta is with respect to the delta before bias and softplus); per batch dA `(B, D, N)`,
    dD and dbias `(B, D)`; per channel slice dBt, dCt `(B, G, S, L, N)` (S = nsplit, zero on entry)."""
    nb, nd, length = u.shape
    groups = Bt.shape[1]
    n = A.shape[1]
    hch = nd // groups
    per = (hch + nsplit - 1) // nsplit
    for item in prange(nb * groups * nsplit):
        b = item // (groups * nsplit)
        g = (item // nsplit) % groups
        s = item % nsplit
        bt = Bt[b, g]
        ct = Ct[b, g]
        dbt = dBt[b, g, s]
        dct = dCt[b, g, s]
        # Per-item buffers: one channel's state history and decays (flat), reused for every channel of
        # the slice; the per-step gate and softplus factors, computed in vectorised passes.
        hs = np.empty((length + 1) * n, dtype=u.dtype)
        dec = np.empty(length * n, dtype=u.dtype)
        dts = np.empty(length, dtype=u.dtype)
        gate = np.ones(length, dtype=u.dtype)
        ds = np.ones(length, dtype=u.dtype)
        gs = np.empty(n, dtype=u.dtype)
        da_blk = np.empty(n, dtype=u.dtype)
        da_acc = np.empty(n, dtype=np.float64)
        d0 = g * hch + s * per
        d1 = min(d0 + per, (g + 1) * hch)
        for d in range(d0, d1):
            a_d = A[d]
            u_row = u[b, d]
            for t0 in range(0, length, BLOCK):
                m = min(BLOCK, length - t0)
                _steps(delta[b, d, t0 : t0 + m], bias[d], softplus, dts[t0:], dec[t0 * n :], a_d)
            if softplus:  # sigmoids in place (vectorises, see `_steps`)
                for t in range(length):
                    ds[t] = delta[b, d, t] + bias[d]
                for t in range(length):
                    ds[t] = _sigmoid(ds[t])
            if n == 8:
                _recompute(8, length, dts, dec, hs, u_row, bt)
            else:
                _recompute(n, length, dts, dec, hs, u_row, bt)
            dv = Dv[d]
            if has_z:
                # y = pre * silu(z): dz = dy * pre * silu'(z), d pre = dy * silu(z).
                for t in range(length):
                    gate[t] = z[b, d, t]
                for t in range(length):
                    gate[t] = _sigmoid(gate[t])
                for t in range(length):
                    pre = dv * u_row[t]
                    for k in range(n):
                        pre += ct[t, k] * hs[(t + 1) * n + k]
                    zt = z[b, d, t]
                    sg = gate[t]
                    dz[b, d, t] = dy[b, d, t] * pre * sg * (1.0 + zt * (1.0 - sg))
                    gate[t] = zt * sg
            da_acc[:] = 0.0
            if n == 8:
                dd_acc, db_acc = _reverse(8, length, a_d, dv, dts, dec, hs, u_row, dy[b, d], gate, ds, bt, ct,
                                          dct, dbt, gs, da_blk, da_acc, du[b, d], ddelta[b, d])  # fmt: skip
            else:
                dd_acc, db_acc = _reverse(n, length, a_d, dv, dts, dec, hs, u_row, dy[b, d], gate, ds, bt, ct,
                                          dct, dbt, gs, da_blk, da_acc, du[b, d], ddelta[b, d])  # fmt: skip
            for k in range(n):
                dA[b, d, k] = da_acc[k]
            dD[b, d] = dd_acc
            dbias[b, d] = db_acc


# float32 forward with channels as SIMD lanes: LANES channels of one group per work item, so B_k and
# C_k are broadcast, each state is one LANES-wide vector (`simd.vec16`), and y needs no horizontal
# sum. Loops over LANES elsewhere (loads, steps, stores) use the literal 16 so that they vectorise
# with no remainder. LANE_BLOCK positions x LANES floats per block buffer stay in L1.
LANES = WIDTH  # 16
LANE_BLOCK = 64
_LOCAL = {"fastmath": _FASTMATH, "error_model": "numpy", "cache": False}


@numba.njit(inline="always", **_LOCAL)
def _lane_recurrence(n, half, mt, rows0, bt0, ct0, rows1, bt1, ct1, us, dts, a_t, d_l, h, ys):  # type: ignore[no-untyped-def]  # noqa: E501
    """One block of positions, LANES channels at once: h = exp(dt A) h + dt u B, y = C h + D u.
    us, dts, ys `(LANE_BLOCK, LANES)`; a_t, h `(N, LANES)` (a_t: A times log2(e), so that the decays
    are `simd.vexp2`s); d_l `(LANES,)`, all C-contiguous. Lanes
    below `half` take B and C of position i from bt0[rows0[i]], ct0[rows0[i]] `(N,)`, the others from
    bt1/ct1 at rows1[i] (two scan directions sharing the lanes; half = LANES: one source). The lanes
    are one `simd.vec16` value (see there for why); a literal `half` folds the source choice."""
    d_v = vload(d_l, 0)
    for i in range(mt):
        r0 = rows0[i]
        r1 = rows1[i]
        u = vload(us, i * LANES)
        dt = vload(dts, i * LANES)
        du = vmul(dt, u)
        acc = vmul(d_v, u)
        for k in range(n):
            decay = vexp2(vmul(dt, vload(a_t, k * LANES)))
            v = vfma(decay, vload(h, k * LANES), vmul(du, vpair(bt0[r0, k], bt1[r1, k], half)))
            vstore(h, k * LANES, v)
            acc = vfma(vpair(ct0[r0, k], ct1[r1, k], half), v, acc)
        vstore(ys, i * LANES, acc)


@numba.njit(inline="always", **_LOCAL)
def _load_lanes(lanes, mt, src, t0, shift, dst):  # type: ignore[no-untyped-def]
    """dst[i, e] = src[e, t0 + i] + shift[e] for e < lanes: `(channels, L)` rows into a lane block."""
    for e in range(lanes):
        row = src[e, t0:]
        s = shift[e]
        for i in range(mt):
            dst[i, e] = row[i] + s


def _forward_lanes_kernel(u, delta, A, Bt, Ct, Dv, z, bias, softplus, has_z, y):  # type: ignore[no-untyped-def]
    """`_forward_kernel` for float32, LANES channels per work item (see LANES)."""
    nb, nd, length = u.shape
    groups = Bt.shape[1]
    n = A.shape[1]
    hch = nd // groups
    nslices = (hch + LANES - 1) // LANES
    for item in prange(nb * groups * nslices):
        b = item // (groups * nslices)
        g = (item // nslices) % groups
        c0 = (item % nslices) * LANES
        d0 = g * hch + c0
        m = min(LANES, hch - c0)
        h = np.zeros((n, LANES), dtype=np.float32)
        a_t = np.zeros((n, LANES), dtype=np.float32)
        d_l = np.zeros(LANES, dtype=np.float32)
        bias_l = np.zeros(LANES, dtype=np.float32)
        zero = np.zeros(LANES, dtype=np.float32)
        for e in range(m):
            for k in range(n):
                a_t[k, e] = A[d0 + e, k] * _LOG2E  # decays as powers of 2 (see _lane_recurrence)
            d_l[e] = Dv[d0 + e]
            bias_l[e] = bias[d0 + e]
        us = np.zeros((LANE_BLOCK, LANES), dtype=np.float32)
        dts = np.zeros((LANE_BLOCK, LANES), dtype=np.float32)
        ys = np.zeros((LANE_BLOCK, LANES), dtype=np.float32)
        zs = np.zeros((LANE_BLOCK, LANES), dtype=np.float32)
        rows = np.empty(LANE_BLOCK, dtype=np.int64)
        bt, ct = Bt[b, g], Ct[b, g]
        ub, db, yb = u[b, d0 : d0 + m], delta[b, d0 : d0 + m], y[b, d0 : d0 + m]
        zb = z[b, d0 : d0 + m] if has_z else z[0, 0:0]  # z is a 1-element dummy without a gate
        for t0 in range(0, length, LANE_BLOCK):
            mt = min(LANE_BLOCK, length - t0)
            for i in range(mt):
                rows[i] = t0 + i
            _load_lanes(m, mt, ub, t0, zero, us)
            _load_lanes(m, mt, db, t0, bias_l, dts)
            if softplus:
                for i in range(mt):
                    di = dts[i]
                    for e in range(LANES):
                        di[e] = _softplus(di[e])
            if n == 8:
                _lane_recurrence(8, LANES, mt, rows, bt, ct, rows, bt, ct, us, dts, a_t, d_l, h, ys)
            elif n == 16:
                _lane_recurrence(16, LANES, mt, rows, bt, ct, rows, bt, ct, us, dts, a_t, d_l, h, ys)
            else:
                _lane_recurrence(n, LANES, mt, rows, bt, ct, rows, bt, ct, us, dts, a_t, d_l, h, ys)
            if has_z:
                _load_lanes(m, mt, zb, t0, zero, zs)
                for i in range(mt):
                    for e in range(LANES):
                        zt = zs[i, e]
                        ys[i, e] *= zt * _sigmoid(zt)
            for e in range(m):
                row = yb[e, t0:]
                for i in range(mt):
                    row[i] = ys[i, e]


_forward = _njit(_forward_kernel)
_forward_lanes = _njit(_forward_lanes_kernel)
_backward = _njit(_backward_kernel)


@contextlib.contextmanager
def _threads() -> Iterator[None]:
    """As many numba threads as torch uses (which follows the user's and the machine's limits), and
    work items handed out one at a time: on shared cores a descheduled thread then delays only its
    current (batch, channel) item instead of a static share of them. Restores numba's thread count and
    chunk size after, and torch's thread count: numba's OpenMP layer shares torch's OpenMP runtime,
    and its first launch set that runtime's count to all cores (a `--threads 1` run then ran torch on
    2)."""
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
    before = numba.set_parallel_chunksize(1)  # per calling thread; each item is a whole pass over L
    # numba's fallback threading layer (workqueue, where neither OpenMP nor TBB loads) aborts the
    # process when two threads launch kernels at once (batch --scene-workers): one at a time then.
    lock = _launch_lock if _layer_is_unsafe() else contextlib.nullcontext()
    try:
        with lock:
            yield
    finally:
        numba.set_parallel_chunksize(before)
        numba.set_num_threads(numba_threads)  # a library call leaves the caller's count as it was
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


_launch_lock = threading.Lock()


def _layer_is_unsafe() -> bool:
    """Whether concurrent kernel launches could hit the workqueue layer (unknown until the first
    parallel kernel has run, so the first launches are serialised too)."""
    try:
        return numba.threading_layer() == "workqueue"
    except ValueError:  # no parallel kernel has run yet
        return True


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _arrays(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> tuple[np.ndarray, ...]:
    """Kernel arguments in one compute dtype (>= float32): B/C as `(B, G, L, N)`, absent D/bias as
    zeros, absent z as a 1-element dummy."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    d = u.shape[1]
    B, C = grouped_bc(d, B, C)
    zeros = torch.zeros(d, dtype=dtype)
    return (
        _np(u.to(dtype)),
        _np(delta.to(dtype)),
        _np(A.to(dtype)),
        _np(B.to(dtype).transpose(-1, -2)),
        _np(C.to(dtype).transpose(-1, -2)),
        _np(zeros if D is None else D.to(dtype)),
        _np(torch.zeros(1, 1, 1, dtype=dtype) if z is None else z.to(dtype)),
        _np(zeros if delta_bias is None else delta_bias.to(dtype)),
    )


def scan_forward(
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
    """The fused forward, no autograd. Returns `(B, D, L)` in the compute dtype (>= float32)."""
    args = _arrays(u, delta, A, B, C, D, z, delta_bias)
    y = np.empty(args[0].shape, dtype=args[0].dtype)
    kernel = _forward_lanes if y.dtype == np.float32 else _forward
    with _threads():
        kernel(*args[:7], args[7], bool(delta_softplus), z is not None, y)
    return torch.from_numpy(y)


def _splits(batch: int, groups: int, channels: int) -> int:
    """Channel slices per group in the backward: enough work items for every thread (x2 for balance)
    without more partial B/C gradient buffers than needed."""
    want = 2 * numba.get_num_threads()
    return max(1, min(channels // groups, -(-want // (batch * groups))))


class SelectiveScanNumba(torch.autograd.Function):
    """Autograd wrapper: forward keeps only the inputs, backward recomputes the states per channel."""

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
    ) -> torch.Tensor:
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        return scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus).to(u.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        args = _arrays(u, delta, A, B, C, D, z, delta_bias)
        dtype = args[0].dtype
        nb, nd, length = u.shape
        groups, n = args[3].shape[1], args[2].shape[1]
        with _threads():
            nsplit = _splits(nb, groups, nd)
            du = np.empty((nb, nd, length), dtype=dtype)
            ddelta = np.empty_like(du)
            dz = np.empty_like(du) if z is not None else np.empty((1, 1, 1), dtype=dtype)
            dA = np.empty((nb, nd, n), dtype=dtype)
            dD = np.empty((nb, nd), dtype=dtype)
            dbias = np.empty((nb, nd), dtype=dtype)
            dBt = np.zeros((nb, groups, nsplit, length, n), dtype=dtype)
            dCt = np.zeros_like(dBt)
            dy_np = _np(dy.to(torch.from_numpy(du).dtype))
            _backward(*args[:7], args[7], bool(ctx.delta_softplus), z is not None, dy_np, nsplit,
                      du, ddelta, dz, dA, dD, dbias, dBt, dCt)  # fmt: skip

        def back(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(x).to(like.dtype)

        def bc(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
            g = torch.from_numpy(x).sum(2).transpose(-1, -2)  # (B, G, N, L)
            return (g.squeeze(1) if like.dim() == 3 else g).to(like.dtype)

        need = ctx.needs_input_grad
        return (
            back(du, u) if need[0] else None,
            back(ddelta, delta) if need[1] else None,
            back(dA.sum(0), A) if need[2] else None,
            bc(dBt, B) if need[3] else None,
            bc(dCt, C) if need[4] else None,
            back(dD.sum(0), D) if D is not None and need[5] else None,
            back(dz, z) if z is not None and need[6] else None,
            back(dbias.sum(0), delta_bias) if delta_bias is not None and need[7] else None,
            None,
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
    """Fused numba scan on CPU tensors, differentiable. Returns `(B, D, L)` in u's dtype."""
    if u.device.type != "cpu":
        raise ValueError(f"the numba scan runs on CPU tensors, got {u.device}")
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return SelectiveScanNumba.apply(*tensors, delta_softplus)
    return scan_forward(*tensors, delta_softplus).to(u.dtype)
