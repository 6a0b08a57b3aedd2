"""The directional core of a `MultiScanMamba` block fused on the CPU, for inference (numba).

The generic path gathers every token into each scan order (a copy of the block's activations per
direction), transposes them to `(B, D, L)` for the depthwise conv and the scan, and gathers the
outputs back: on a CPU those copies cost more than the scan itself (bench_profile). Here the kernels
read and write through the order tables of `fusionmamba._scan_orders` instead (direction 0 row-major,
1 reversed, 2 column-major, 3 reversed column-major; 2-direction blocks: 0 and 1 over a 1-D sequence):

- `conv_silu` writes the causal depthwise conv + silu of every direction in its scan order,
  `(B, G, L, E)`, channels last;
- `project` is x_proj of every position, `(B, G, R + 2N, L)` (a kernel at E = 8, where MKL's thin
  matmul is slow; MKL above);
- `scan_directions` runs each direction's scan per (batch, direction, slice of channels), computing
  the step from x_proj's dt part (dt_proj, bias, softplus, the scan-memory floor) inline and writing
  the outputs in scan order (at E = N = 8, the d = 8 networks' full-resolution blocks, two directions
  per work item with x_proj computed inside: `_pair_scan_kernel`), then averages the directions in
  image order, applies the silu(z) gate once (it is the same token's for every direction) and the
  block's LayerNorm in one pass: `(B, L, E)`;
- `layer_norm` is the same LayerNorm pass for the blocks' input norms.

The inner loops hold 16 lanes as one `simd.vec16` value (channels, or two positions of 8 channels).
Same arithmetic as the generic path in float32 (sums in another order: ~1e-6 relative). No autograd:
training keeps the generic path.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import numba
import numpy as np
import torch
from numba import prange

from fusion_cli.models.scan_numba import (
    _LOCAL,
    _LOG2E,
    LANE_BLOCK,
    LANES,
    _lane_recurrence,
    _njit,
    _sigmoid,
    _threads,
)
from fusion_cli.models.simd import (
    WIDTH,
    prefetch,
    vadd,
    vexp2,
    vfma,
    vload,
    vload_halves,
    vmax,
    vmul,
    vpair,
    vpick,
    vrsqrt,
    vsilu,
    vsoftplus,
    vsplat,
    vstore,
    vstore_halves,
    vsub,
    vsum_all,
    vsum_halves,
)

# Channels per work item of the scan are SIMD lanes, positions go in blocks (see scan_numba.LANES).
BLOCK = LANE_BLOCK
HALF = LANES // 2


def _conv_silu_kernel(x, weight, bias, orders, u):  # type: ignore[no-untyped-def]
    """x `(B, L, 2E)` (the in_proj output; its first E channels are convolved), weight `(G, E, K)`,
    bias `(G, E)` -> u `(B, G, L, E)`: silu(causal conv along each scan order). Sixteen outputs per
    `simd.vec16`: 16 channels of a position, or, at E = 8, two positions' 8; other E take the scalar
    path (`_conv_silu_scalar`)."""
    nb, length, _ = x.shape
    groups, channels, k = weight.shape
    chunk = 2048
    nchunks = (length + chunk - 1) // chunk
    stride = x.shape[2]
    paired = channels == HALF
    for item in prange(nb * groups * nchunks):
        b = item // (groups * nchunks)
        g = (item // nchunks) % groups
        start = (item % nchunks) * chunk
        stop = min(length, start + chunk)
        xb, ub, order = x[b], u[b, g], orders[g]
        # column orders read a token a row apart: no hardware prefetcher follows, so the kernel asks
        # for the rows AHEAD positions early (rows in order stream without it, and slower with it)
        scattered = length > 1 and abs(order[1] - order[0]) != 1
        span = max(channels, LANES)  # weights per tap: the channels (twice at E = 8: two positions)
        wt = np.empty(k * span, dtype=np.float32)  # taps first
        bias_l = np.empty(span, dtype=np.float32)
        for e in range(span):
            bias_l[e] = bias[g, e % channels]
            for j in range(k):
                wt[j * span + e] = weight[g, e % channels, j]
        if paired:
            for pos in range(start, stop, 2):
                if pos + 1 == stop:  # an odd last position: the scalar path
                    _conv_silu_scalar(xb, weight[g], bias[g], order, ub, pos, pos + 1)
                    continue
                if scattered and pos + AHEAD + 1 < stop:
                    prefetch(xb, order[pos + AHEAD] * stride)
                    prefetch(xb, order[pos + AHEAD + 1] * stride)
                acc = vload(bias_l, 0)
                for j in range(k):
                    src = pos - (k - 1) + j  # the tap's position for the pair's first one
                    if src >= 0:
                        v = vload_halves(xb, order[src] * stride, order[src + 1] * stride)
                        acc = vfma(vload(wt, j * LANES), v, acc)
                    elif src + 1 >= 0:  # before the start for the first position only
                        v = vload_halves(xb, order[src + 1] * stride, order[src + 1] * stride)
                        acc = vfma(vload(wt, j * LANES), vmul(v, vload(_UPPER, 0)), acc)
                vstore(ub, pos * channels, vsilu(acc))
        elif channels % LANES == 0:
            for pos in range(start, stop):
                if scattered and pos + AHEAD < stop:
                    ahead = order[pos + AHEAD] * stride
                    for c0 in range(0, channels, LANES):
                        prefetch(xb, ahead + c0)
                for c0 in range(0, channels, LANES):
                    acc = vload(bias_l, c0)
                    for j in range(k):
                        src = pos - (k - 1) + j
                        if src >= 0:
                            v = vload(xb, order[src] * stride + c0)
                            acc = vfma(vload(wt, j * channels + c0), v, acc)
                    vstore(ub, pos * channels + c0, vsilu(acc))
        else:
            _conv_silu_scalar(xb, weight[g], bias[g], order, ub, start, stop)


# Positions ahead whose input rows the conv asks the caches for: enough to cover a DRAM access at the
# kernel's rate (~10 ns per position and 16 channels).
AHEAD = 16

# 0 in the lower 8 lanes, 1 in the upper 8: masks the first position of a pair out of a tap
_UPPER = np.array([0.0] * HALF + [1.0] * HALF, dtype=np.float32)


@numba.njit(inline="always", **_LOCAL)
def _conv_silu_scalar(xb, weight, bias, order, ub, start, stop):  # type: ignore[no-untyped-def]
    """Positions [start, stop) of one direction, channel by channel: xb `(L, 2E)`, weight `(E, K)`,
    bias `(E,)`, order `(L,)` -> ub `(L, E)`."""
    channels, k = weight.shape
    for pos in range(start, stop):
        for e in range(channels):
            acc = bias[e]
            for j in range(k):
                src = pos - (k - 1) + j
                if src >= 0:
                    acc += weight[e, j] * xb[order[src], e]
            ub[pos, e] = acc * _sigmoid(acc)


# Positions per block of `_project_kernel`: a block's inputs, transposed, stay in L1.
PROJECT_BLOCK = 64


def _project_kernel(src, weight, out):  # type: ignore[no-untyped-def]
    """out[b, g] = weight[g] @ src[b, s].T for src `(B, S, L, E)` (S sources, each read by G / S
    consecutive groups: s = g * S // G), weight `(G, J, E)` -> out `(B, G, J, L)`: x_proj for every
    position, J = R + 2N outputs of E = 8-64 channels. MKL runs this thin product at ~7 GFLOP/s; here
    each block of positions is transposed into L1 and its outputs are 16 positions per FMA."""
    nb, nsrc, length, channels = src.shape
    groups, nout, _ = weight.shape
    chunk = 4096
    nchunks = (length + chunk - 1) // chunk
    for item in prange(nb * groups * nchunks):
        b = item // (groups * nchunks)
        g = (item // nchunks) % groups
        start = (item % nchunks) * chunk
        stop = min(length, start + chunk)
        rows = src[b, g * nsrc // groups]
        w = weight[g]
        tile = np.empty(channels * PROJECT_BLOCK, dtype=np.float32)  # (E, block) positions last
        for t0 in range(start, stop, PROJECT_BLOCK):
            mt = min(PROJECT_BLOCK, stop - t0)
            for i in range(mt):
                row = rows[t0 + i]
                for c in range(channels):
                    tile[c * PROJECT_BLOCK + i] = row[c]
            full = mt - mt % WIDTH
            for j in range(nout):
                wj = w[j]
                dst = out[b, g, j]
                for i0 in range(0, full, WIDTH):
                    acc = vmul(vsplat(wj[0]), vload(tile, i0))
                    for c in range(1, channels):
                        acc = vfma(vsplat(wj[c]), vload(tile, c * PROJECT_BLOCK + i0), acc)
                    vstore(dst, t0 + i0, acc)
                for i in range(full, mt):  # the block's last positions, fewer than a vector
                    total = np.float32(0.0)
                    for c in range(channels):
                        total += wj[c] * tile[c * PROJECT_BLOCK + i]
                    dst[t0 + i] = total


@numba.njit(inline="always", cache=False)
def _normalize(row, weight, bias, eps, out):  # type: ignore[no-untyped-def]
    """out = LayerNorm(row) over its E channels, with weight and bias `(E,)`."""
    channels = row.shape[0]
    mean = 0.0
    for e in range(channels):
        mean += row[e]
    mean /= channels
    var = 0.0
    for e in range(channels):
        d = row[e] - mean
        var += d * d
    rstd = 1.0 / np.sqrt(var / channels + eps)
    for e in range(channels):
        out[e] = (row[e] - mean) * rstd * weight[e] + bias[e]


# Image tokens per work item of the directions' mean: TILE x TILE. Orders that walk the image by
# columns store a tile's outputs as TILE runs of TILE positions; they are copied run by run into a
# local tile first (each run a contiguous read the hardware prefetches), instead of being gathered
# token by token along the tile's rows, where every token of those orders was a cache miss (a whole
# column apart): 4x slower than contiguous reads at E = 8.
TILE = 32


@numba.njit(inline="always", **_LOCAL)
def _mean_norm_lanes(yb, inverse, xzb, weight, bias, eps, width, by_column, tile, r0, c0, rows, cols, ob):  # type: ignore[no-untyped-def]  # noqa: E501
    """One tile of `_mean_norm_kernel` on 16-lane values, for E = 8 (two tokens of a row per value;
    an odd last column alone, its upper lanes a copy of it) or a multiple of 16 (channels). Every
    access is a flat offset: an array view per token and direction (its bounds and reference count)
    cost as much as the arithmetic."""
    groups, length, channels = yb.shape
    inv_e = np.float32(1.0 / channels)
    inv_g = vsplat(1.0 / groups)
    eps_v = vsplat(eps)
    if channels == HALF:
        w_v = vload_halves(weight, 0, 0)
        b_v = vload_halves(bias, 0, 0)
        for r in range(rows):
            for c in range(0, cols, 2):
                pos = (r0 + r) * width + c0 + c
                nxt = pos + 1 if c + 1 < cols else pos  # the pair's second token
                acc = vsplat(0.0)
                for g in range(groups):
                    if by_column[g]:  # tile (G, TILE, TILE, E): tokens c and c + 1 side by side
                        at = ((g * TILE + r) * TILE + c) * HALF
                        acc = vadd(acc, vload_halves(tile, at, at + (nxt - pos) * HALF))
                    else:
                        at = g * length
                        acc = vadd(
                            acc,
                            vload_halves(yb, (at + inverse[g, pos]) * HALF, (at + inverse[g, nxt]) * HALF),
                        )
                z = vload_halves(xzb, pos * 2 * channels + channels, nxt * 2 * channels + channels)
                acc = vmul(vmul(acc, inv_g), vsilu(z))
                mean = vmul(vsum_halves(acc), vsplat(inv_e))
                d = vsub(acc, mean)
                rstd = vrsqrt(vfma(vsum_halves(vmul(d, d)), vsplat(inv_e), eps_v))
                res = vfma(vmul(d, rstd), w_v, b_v)
                if nxt == pos + 1:
                    vstore(ob, pos * channels, res)
                else:  # one token: both halves are its values, stored over each other
                    vstore_halves(ob, pos * channels, pos * channels, res)
        return
    row = np.empty(channels, dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            pos = (r0 + r) * width + c0 + c
            total = vsplat(0.0)
            for e0 in range(0, channels, LANES):
                acc = vsplat(0.0)
                for g in range(groups):
                    if by_column[g]:
                        acc = vadd(acc, vload(tile, ((g * TILE + r) * TILE + c) * channels + e0))
                    else:
                        acc = vadd(acc, vload(yb, (g * length + inverse[g, pos]) * channels + e0))
                acc = vmul(vmul(acc, inv_g), vsilu(vload(xzb, (2 * pos + 1) * channels + e0)))
                vstore(row, e0, acc)
                total = vadd(total, acc)
            mean = vmul(vsum_all(total), vsplat(inv_e))
            var = vsplat(0.0)
            for e0 in range(0, channels, LANES):
                d = vsub(vload(row, e0), mean)
                var = vfma(d, d, var)
            rstd = vrsqrt(vfma(vsum_all(var), vsplat(inv_e), eps_v))
            for e0 in range(0, channels, LANES):
                d = vsub(vload(row, e0), mean)
                vstore(ob, pos * channels + e0, vfma(vmul(d, rstd), vload(weight, e0), vload(bias, e0)))


def _mean_norm_kernel(y, inverse, xz, weight, bias, eps, width, out):  # type: ignore[no-untyped-def]
    """y `(B, G, L, E)` in scan orders, inverse `(G, L)` (the position of each image token in each
    order), xz `(B, L, 2E)` -> out `(B, L, E)` in image order: the mean over the G directions, gated
    by silu(z) (z: xz's second half), LayerNormed over E (weight, bias `(E,)`), in one pass. Every
    direction's gate is the same token's silu(z), so it applies once to the mean. The L tokens are an
    image of `width` columns."""
    nb, groups, length, channels = y.shape
    height = length // width
    nty = (height + TILE - 1) // TILE
    ntx = (width + TILE - 1) // TILE
    inv_g = 1.0 / groups
    # orders whose consecutive positions step down a column (column-major, either way)
    by_column = np.zeros(groups, dtype=np.bool_)
    if height > 1 and width > 1:
        for g in range(groups):
            by_column[g] = abs(inverse[g, width] - inverse[g, 0]) == 1
    for item in prange(nb * nty * ntx):
        b = item // (nty * ntx)
        r0 = ((item // ntx) % nty) * TILE
        c0 = (item % ntx) * TILE
        rows = min(height, r0 + TILE) - r0
        cols = min(width, c0 + TILE) - c0
        row = np.empty(channels, dtype=np.float32)
        tile = np.empty((groups, TILE, TILE, channels), dtype=np.float32)
        for g in range(groups):
            if by_column[g]:
                for c in range(cols):
                    for r in range(rows):
                        src = y[b, g, inverse[g, (r0 + r) * width + c0 + c]]
                        dst = tile[g, r, c]
                        for e in range(channels):
                            dst[e] = src[e]
        if channels == HALF or channels % LANES == 0:
            _mean_norm_lanes(y[b], inverse, xz[b], weight, bias, eps, width, by_column, tile, r0, c0, rows,
                             cols, out[b])  # fmt: skip
            continue
        for r in range(rows):
            for c in range(cols):
                pos = (r0 + r) * width + c0 + c
                # one loop per step, each over contiguous channels, so that each vectorises
                for e in range(channels):
                    row[e] = 0.0
                for g in range(groups):
                    yr = tile[g, r, c] if by_column[g] else y[b, g, inverse[g, pos]]
                    for e in range(channels):
                        row[e] += yr[e]
                zr = xz[b, pos, channels:]
                for e in range(channels):
                    zt = zr[e]
                    row[e] *= inv_g * zt * _sigmoid(zt)
                _normalize(row, weight, bias, eps, out[b, pos])


def _linear_kernel(x, wt, bias, out):  # type: ignore[no-untyped-def]
    """out = x @ W.T + bias for x `(R, K)`, wt `(K, N)` (W transposed), bias `(N,)`, N = 8 (two rows
    per 16-lane value) or a multiple of 16: K FMAs of a broadcast input per value."""
    rows, k = x.shape
    n = wt.shape[1]
    chunk = 4096
    for item in prange((rows + chunk - 1) // chunk):
        start = item * chunk
        stop = min(rows, start + chunk)
        if n == HALF:
            w2 = np.empty(k * LANES, dtype=np.float32)  # each input's weights twice: two rows
            b2 = np.empty(LANES, dtype=np.float32)
            for e in range(LANES):
                b2[e] = bias[e % HALF]
                for c in range(k):
                    w2[c * LANES + e] = wt[c, e % HALF]
            last = stop - (stop - start) % 2
            for r in range(start, last, 2):
                acc = vload(b2, 0)
                for c in range(k):
                    acc = vfma(vpair(x[r, c], x[r + 1, c], HALF), vload(w2, c * LANES), acc)
                vstore(out, r * HALF, acc)
            for r in range(last, stop):  # an odd last row
                for e in range(n):
                    total = bias[e]
                    for c in range(k):
                        total += x[r, c] * wt[c, e]
                    out[r, e] = total
        else:
            wflat = wt.reshape(k * n)
            for r in range(start, stop):
                for e0 in range(0, n, LANES):
                    acc = vload(bias, e0)
                    for c in range(k):
                        acc = vfma(vsplat(x[r, c]), vload(wflat, c * n + e0), acc)
                    vstore(out, r * n + e0, acc)


def _layer_norm_kernel(x, weight, bias, eps, out):  # type: ignore[no-untyped-def]
    """LayerNorm over the last axis of x `(R, E)` -> out: torch's is ~10 ns per element when E is a
    handful of channels (the d = 8 networks), this one pass per row ~1."""
    rows = x.shape[0]
    chunk = 4096
    for item in prange((rows + chunk - 1) // chunk):
        for r in range(item * chunk, min(rows, (item + 1) * chunk)):
            _normalize(x[r], weight, bias, eps, out[r])


@numba.njit(inline="always", **_LOCAL)
def _load_u(half, cnt, mt, t0, e0, ug0, ug1, us):  # type: ignore[no-untyped-def]
    """us[i, :cnt] = u of positions t0 + i, channels e0.. of the first direction (ug0 `(L, E)`);
    with two directions (half < LANES), us[i, half:] those of the second (ug1)."""
    for i in range(mt):
        src = ug0[t0 + i, e0:]
        dst = us[i]
        for e in range(cnt):
            dst[e] = src[e]
        if half < LANES:
            src = ug1[t0 + i, e0:]
            for e in range(half):
                dst[half + e] = src[e]


@numba.njit(inline="always", **_LOCAL)
def _steps(rank, half, mt, xs0, xs1, w_t, bias, floor, dts):  # type: ignore[no-untyped-def]
    """dts[i] = max(softplus(dt_proj(x_proj's dt part of position i) + bias), floor), per lane (xs
    `(BLOCK, R + 2N)`, dt part first; lanes from `half` on: the second direction's, xs1)."""
    bias_v = vload(bias, 0)
    floor_v = vload(floor, 0)
    for i in range(mt):
        d = bias_v
        for r in range(rank):
            d = vfma(vload(w_t, r * LANES), vpair(xs0[i, r], xs1[i, r], half), d)
        vstore(dts, i * LANES, vmax(vsoftplus(d), floor_v))


@numba.njit(inline="always", **_LOCAL)
def _store(half, cnt, mt, t0, e0, og0, og1, ys):  # type: ignore[no-untyped-def]
    """og0[t0 + i, e0:e0 + cnt] = ys[i, :cnt] (and og1 the lanes from `half` with two directions):
    outputs stay in scan order, contiguous (scattering them to image order here wrote a cache line
    per position; `_mean_norm_kernel` gathers them instead)."""
    for i in range(mt):
        dst = og0[t0 + i, e0:]
        yi = ys[i]
        for e in range(cnt):
            dst[e] = yi[e]
        if half < LANES:
            dst = og1[t0 + i, e0:]
            for e in range(half):
                dst[e] = yi[half + e]


@numba.njit(inline="always", **_LOCAL)
def _load_rows(mt, rows, xg, xs):  # type: ignore[no-untyped-def]
    """xs[i, j] = xg[j, rows[i]]: a block's dt, B and C from x_proj's `(R + 2N, L)` rows, position
    by position, read one row at a time."""
    for j in range(xg.shape[0]):
        src = xg[j]
        for i in range(mt):
            xs[i, j] = src[rows[i]]


@numba.njit(inline="always", **_LOCAL)
def _scan_block(half, cnt, rank, n, blk):  # type: ignore[no-untyped-def]
    """One block of positions of one work item: loads, steps, recurrence, stores. Called with literal
    half, cnt (lanes used) and n where they are the common ones, so each loop has a constant trip
    count and vectorises. blk: (mt, t0, e0, rows0, xg0, ug0, og0, rows1, xg1, ug1, og1, params, state)."""
    mt, t0, e0, rows0, xg0, ug0, og0, rows1, xg1, ug1, og1, params, state = blk
    a_t, w_t, bias, fl, d_l = params
    h, us, dts, ys, xs0, xs1, local = state
    _load_u(half, cnt, mt, t0, e0, ug0, ug1, us)
    _load_rows(mt, rows0, xg0, xs0)
    if half < LANES:
        _load_rows(mt, rows1, xg1, xs1)
    _steps(rank, half, mt, xs0, xs1, w_t, bias, fl, dts)
    bt0, ct0 = xs0[:, rank : rank + n], xs0[:, rank + n :]  # (BLOCK, N) views
    bt1, ct1 = xs1[:, rank : rank + n], xs1[:, rank + n :]
    _lane_recurrence(n, half, mt, local, bt0, ct0, local, bt1, ct1, us, dts, a_t, d_l, h, ys)
    _store(half, cnt, mt, t0, e0, og0, og1, ys)


def _scan_kernel(  # type: ignore[no-untyped-def]
    u, xdbl, dt_w, dt_bias, floor, A, Dv, bc_index, bc_by_token, out
):
    """u `(B, G, L, E)` in scan order; xdbl `(B, G, R + 2N, L)` (dt, B, C) in scan order, or, when
    `bc_by_token`, read at position i of order g from column bc_index[g, i] (`(G, L)`); dt_w
    `(G, E, R)`, dt_bias, floor, Dv `(G, E)`, A `(G, E, N)` -> out `(B, G, L, E)`: each direction's
    scan (before the gate, see `_mean_norm_kernel`), in its scan order.

    Work items are (batch, direction, LANES channels); a slice with fewer channels pads its lanes with
    zeros (they stay zero), except that blocks of exactly LANES / 2 channels put two directions side
    by side in the lanes instead of leaving half of them idle (`scan_directions` sends those with
    N = 8, the d = 8 networks' full-resolution blocks, to `_pair_scan_kernel`). Positions go in
    blocks of BLOCK: u and the block's dt, B and C are copied into L1, then steps and recurrence run
    on 16-lane values (`simd`), and the outputs are stored."""
    nb, groups, length, channels = u.shape
    rank = dt_w.shape[2]
    n = A.shape[2]
    pair = channels == HALF and groups % 2 == 0
    per = 2 if pair else 1  # directions per item
    width = HALF if pair else LANES  # lanes per direction
    nslices = (channels + width - 1) // width
    ngroups = groups // per
    for item in prange(nb * ngroups * nslices):
        b = item // (ngroups * nslices)
        g0 = ((item // nslices) % ngroups) * per
        g1 = g0 + per - 1
        e0 = (item % nslices) * width
        m = min(width, channels - e0)
        a_t = np.zeros((n, LANES), dtype=np.float32)
        w_t = np.zeros((rank, LANES), dtype=np.float32)
        bias = np.zeros(LANES, dtype=np.float32)
        fl = np.zeros(LANES, dtype=np.float32)
        d_l = np.zeros(LANES, dtype=np.float32)
        for p in range(per):
            g = g0 + p
            for e in range(m):
                j = p * width + e
                for k in range(n):
                    a_t[k, j] = A[g, e0 + e, k] * _LOG2E  # see _lane_recurrence
                for r in range(rank):
                    w_t[r, j] = dt_w[g, e0 + e, r]
                bias[j] = dt_bias[g, e0 + e]
                fl[j] = floor[g, e0 + e]
                d_l[j] = Dv[g, e0 + e]
        params = (a_t, w_t, bias, fl, d_l)
        state = (
            np.zeros((n, LANES), dtype=np.float32),
            np.zeros((BLOCK, LANES), dtype=np.float32),
            np.zeros((BLOCK, LANES), dtype=np.float32),
            np.zeros((BLOCK, LANES), dtype=np.float32),
            np.zeros((BLOCK, xdbl.shape[2]), dtype=np.float32),
            np.zeros((BLOCK, xdbl.shape[2]), dtype=np.float32),
            np.arange(BLOCK),
        )
        rows0 = np.empty(BLOCK, dtype=np.int64)
        rows1 = np.empty(BLOCK, dtype=np.int64)
        xg0, ug0, og0, order0 = xdbl[b, g0], u[b, g0], out[b, g0], bc_index[g0]
        xg1, ug1, og1, order1 = xdbl[b, g1], u[b, g1], out[b, g1], bc_index[g1]
        for t0 in range(0, length, BLOCK):
            mt = min(BLOCK, length - t0)
            for i in range(mt):
                rows0[i] = order0[t0 + i] if bc_by_token else t0 + i
                rows1[i] = order1[t0 + i] if bc_by_token else t0 + i
            blk = (mt, t0, e0, rows0, xg0, ug0, og0, rows1, xg1, ug1, og1, params, state)
            # literal lane counts and N = 8 (every shipped network's) where they apply, so that the
            # state loop unrolls; the rank may vary (1, 2, 4, 8 at the paper's width, by level)
            if pair and n == 8:
                _scan_block(HALF, HALF, rank, 8, blk)
            elif pair:
                _scan_block(HALF, HALF, rank, n, blk)
            elif m == LANES and n == 8:
                _scan_block(LANES, LANES, rank, 8, blk)
            else:
                _scan_block(LANES, m, rank, n, blk)


@numba.njit(inline="always", **_LOCAL)
def _pair_input(c, sv, wb, wc, wd, x):  # type: ignore[no-untyped-def]
    """Input channel c's terms of both directions' B, C and step: x = (B, C, step) values."""
    v = vpick(sv, c)
    return (
        vfma(v, vload(wb, c * LANES), x[0]),
        vfma(v, vload(wc, c * LANES), x[1]),
        vfma(v, vload(wd, c * LANES), x[2]),
    )


@numba.njit(inline="always", **_LOCAL)
def _pair_state(k, h, dt, du, bv, cv, a_t, acc):  # type: ignore[no-untyped-def]
    """State k of both directions: h = exp(dt A_k) h + dt u B_k; returns (h, acc + C_k h)."""
    h = vfma(vexp2(vmul(dt, vload(a_t, k * LANES))), h, vmul(du, vpick(bv, k)))
    return h, vfma(vpick(cv, k), h, acc)


def _pair_scan_kernel(u, src, self_source, bc_index, by_token, weights, a_l, consts, out):  # type: ignore[no-untyped-def]  # noqa: E501
    """`_scan_kernel` with x_proj, for blocks of E = N = LANES / 2 (the d = 8 networks' full-resolution
    blocks): two directions per work item, side by side in the lanes, and per position one 16-lane
    value each of their inputs u, their B, their C and their steps.

    u `(B, G, L, E)` in scan order; x_proj reads u itself (self_source) or src `(B, S, L, E)` (group g
    reads source g * S // G, position i of order g its row bc_index[g, i] when by_token, else row i).
    Per pair of directions p (groups 2p, 2p + 1; lanes: the first's 8 channels, then the second's):
    weights[p] `(3, E, LANES)` x_proj's B rows, its C rows and dt_proj composed with its dt rows, each
    transposed (one value per input channel: the weights of both directions' outputs); a_l[p] `(N,
    LANES)` A times log2(e) (see `_lane_recurrence`); consts[p] `(3, LANES)` dt_proj's bias, the step
    floor, D. -> out `(B, G, L, E)`, in scan order (may be u: each position is read before written).

    The per-direction path computed x_proj into 32 lanes per direction (17 used) and broadcast each
    B and C from memory into the recurrence; here B, C and the steps are 24 FMAs of both directions'
    outputs per position, and each state's B and C one permute (`simd.vpick`) of them."""
    nb, groups, length, channels = u.shape
    npairs = groups // 2
    nsrc = src.shape[1]
    for item in prange(nb * npairs):
        b = item // npairs
        p = item % npairs
        g0, g1 = 2 * p, 2 * p + 1
        wb, wc, wd = weights[p, 0], weights[p, 1], weights[p, 2]
        a_t = a_l[p]
        bias_v, floor_v, d_v = vload(consts[p, 0], 0), vload(consts[p, 1], 0), vload(consts[p, 2], 0)
        ub, ob, sb = u[b], out[b], src[b]
        base0, base1 = g0 * length * HALF, g1 * length * HALF
        src0, src1 = (g0 * nsrc // groups) * length * HALF, (g1 * nsrc // groups) * length * HALF
        index0, index1 = bc_index[g0], bc_index[g1]
        # the eight states as eight values (registers); every index into a value is a constant, so
        # each `vpick` is one permute: the loops over states and channels are written out
        h0 = h1 = h2 = h3 = h4 = h5 = h6 = h7 = vsplat(0.0)
        for t in range(length):
            uv = vload_halves(ub, base0 + t * HALF, base1 + t * HALF)
            if self_source:
                sv = uv
            else:
                r0 = index0[t] if by_token else t
                r1 = index1[t] if by_token else t
                sv = vload_halves(sb, src0 + r0 * HALF, src1 + r1 * HALF)
            x = (vsplat(0.0), vsplat(0.0), bias_v)  # B, C, step before softplus
            x = _pair_input(0, sv, wb, wc, wd, x)
            x = _pair_input(1, sv, wb, wc, wd, x)
            x = _pair_input(2, sv, wb, wc, wd, x)
            x = _pair_input(3, sv, wb, wc, wd, x)
            x = _pair_input(4, sv, wb, wc, wd, x)
            x = _pair_input(5, sv, wb, wc, wd, x)
            x = _pair_input(6, sv, wb, wc, wd, x)
            x = _pair_input(7, sv, wb, wc, wd, x)
            bv, cv, dv = x
            dt = vmax(vsoftplus(dv), floor_v)
            du = vmul(dt, uv)
            acc = vmul(d_v, uv)
            h0, acc = _pair_state(0, h0, dt, du, bv, cv, a_t, acc)
            h1, acc = _pair_state(1, h1, dt, du, bv, cv, a_t, acc)
            h2, acc = _pair_state(2, h2, dt, du, bv, cv, a_t, acc)
            h3, acc = _pair_state(3, h3, dt, du, bv, cv, a_t, acc)
            h4, acc = _pair_state(4, h4, dt, du, bv, cv, a_t, acc)
            h5, acc = _pair_state(5, h5, dt, du, bv, cv, a_t, acc)
            h6, acc = _pair_state(6, h6, dt, du, bv, cv, a_t, acc)
            h7, acc = _pair_state(7, h7, dt, du, bv, cv, a_t, acc)
            vstore_halves(ob, base0 + t * HALF, base1 + t * HALF, acc)


def _direction_scan_kernel(
    u, src, self_source, bc_index, by_token, w_bc, w_dt, dt_w, consts, a_l, parts, out
):  # type: ignore[no-untyped-def]  # noqa: E501
    """`_scan_kernel` with x_proj, for blocks of E a multiple of LANES and N = LANES / 2 (the paper's
    width, d = 32, at every level): one work item per (batch, direction), all its channels, so that
    x_proj runs once per position from the row of u (or of the source) in L1 instead of through a
    matmul whose `(B, G, R + 2N, L)` output is written, read back and transposed.

    u `(B, G, L, E)` in scan order; x_proj reads u itself (self_source) or src `(B, S, L, E)` (group g
    reads source g * S // G, position i of order g its row bc_index[g, i] when by_token, else row i).
    Per direction g: w_bc[g] `(E, 2N)` x_proj's B and C rows transposed (one value per input channel);
    w_dt[g] `(R, E)` its dt rows; dt_w[g] `(R, E)` dt_proj transposed; consts[g] `(3, E)` dt_proj's
    bias, the step floor and D; a_l[g] `(N, E)` A times log2(e) (see `_lane_recurrence`). -> out
    `(B, G, L, E)` in scan order (may be u: each position's row is read before it is written).
    With more threads than (batch, direction) items, each direction's channels go in `parts` items
    (slices of LANES channels), each computing x_proj itself."""
    nb, groups, length, channels = u.shape
    rank = w_dt.shape[1]
    n = a_l.shape[1]
    nsrc = src.shape[1]
    nslices = channels // LANES
    for item in prange(nb * groups * parts):
        b = item // (groups * parts)
        g = (item // parts) % groups
        first = (item % parts) * nslices // parts * LANES  # this item's channels
        last = (item % parts + 1) * nslices // parts * LANES
        ug, og, sg, index = u[b, g], out[b, g], src[b, g * nsrc // groups], bc_index[g]
        wbc, wdt, dtw, bias, floor, dv, at = (
            w_bc[g],
            w_dt[g],
            dt_w[g],
            consts[g, 0],
            consts[g, 1],
            consts[g, 2],
            a_l[g],
        )
        h = np.zeros(channels * n, dtype=np.float32)  # (E / LANES, N, LANES)
        bc = np.empty(LANES, dtype=np.float32)  # this position's B (first N) and C
        raw = np.empty(rank * LANES, dtype=np.float32)  # its dt rows, each in every lane
        for t in range(length):
            row = ug[t] if self_source else sg[index[t] if by_token else t]
            acc = vsplat(0.0)
            for c in range(channels):
                acc = vfma(vsplat(row[c]), vload(wbc, c * LANES), acc)
            vstore(bc, 0, acc)
            for r in range(rank):
                part = vmul(vload(row, 0), vload(wdt[r], 0))
                for c0 in range(LANES, channels, LANES):
                    part = vfma(vload(row, c0), vload(wdt[r], c0), part)
                vstore(raw, r * LANES, vsum_all(part))
            urow, orow = ug[t], og[t]
            for e0 in range(first, last, LANES):
                d = vload(bias, e0)
                for r in range(rank):
                    d = vfma(vload(raw, r * LANES), vload(dtw[r], e0), d)
                dt = vmax(vsoftplus(d), vload(floor, e0))
                uv = vload(urow, e0)
                du = vmul(dt, uv)
                y = vmul(vload(dv, e0), uv)
                hs = e0 * n  # this slice's states
                for k in range(n):
                    hk = vfma(
                        vexp2(vmul(dt, vload(at[k], e0))), vload(h, hs + k * LANES), vmul(du, vsplat(bc[k]))
                    )
                    vstore(h, hs + k * LANES, hk)
                    y = vfma(vsplat(bc[n + k]), hk, y)
                vstore(orow, e0, y)


_conv_silu = _njit(_conv_silu_kernel)
_project = _njit(_project_kernel)
_scan = _njit(_scan_kernel)
_pair_scan = _njit(_pair_scan_kernel)
_direction_scan = _njit(_direction_scan_kernel)
_mean_norm = _njit(_mean_norm_kernel)
_layer_norm = _njit(_layer_norm_kernel)
_linear = _njit(_linear_kernel)


_local = threading.local()


@contextlib.contextmanager
def scratch() -> Iterator[None]:
    """While open (in this thread), the fused path's largest arrays (each block's u, which its
    directions' outputs then overwrite, its x_proj output, and their normed mean, 0.15-0.6 GB each
    for a 1024-px window) are kept, one per name, and reused by the next block that asks for as much
    or less, instead of being allocated anew: above glibc's mmap threshold every new array is mapped
    and zero-filled by page faults, which cost a third of a 1024-px run's CPU time. Reused arrays are
    only valid until the next block: the caller (`FusionMamba`'s CPU inference pass) keeps none of
    them past it. Released on exit; nested use joins the outer pool."""
    if getattr(_local, "pool", None) is not None:
        yield
        return
    _local.pool = {}
    try:
        yield
    finally:
        _local.pool = None


def _buffer(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of `shape`: while `scratch` is open, a view of the pool's array for `name`
    (grown when too small), else a new one."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        return np.empty(shape, dtype=np.float32)
    size = math.prod(shape)
    if name not in pool or pool[name].size < size:
        pool.pop(name, None)  # the old one is freed before the larger one is mapped
        pool[name] = np.empty(size, dtype=np.float32)
    return pool[name][:size].reshape(shape)


def conv_silu(
    xz: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, orders: torch.Tensor
) -> torch.Tensor:
    """xz `(B, L, 2E)`, weight `(G, E, K)`, bias `(G, E)`, orders `(G, L)` -> u `(B, G, L, E)` in
    each scan order."""
    b, length, _ = xz.shape
    g, e, _ = weight.shape
    u = _buffer("u", (b, g, length, e))
    with _threads():
        _conv_silu(_f32(xz), _f32(weight), _f32(bias), orders.numpy(), u)
    return torch.from_numpy(u)


def project(src: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x_proj of every position: src `(B, S, L, E)`, weight `(G, J, E)` (G a multiple of S; group g
    reads source g * S // G) -> `(B, G, J, L)`. At E = 8 by `_project_kernel` (MKL: 42 ms for a
    512^2 level, this: 19); wider, MKL is as fast or faster (E = 16 at L = 65 536: 3.4 ms against 5.8)."""
    b, nsrc, length, e = src.shape
    g, j, _ = weight.shape
    out = torch.from_numpy(_buffer("x_dbl", (b, g, j, length)))
    if e <= HALF:
        with _threads():
            _project(_f32(src), _f32(weight), out.numpy())
    elif nsrc == g:
        torch.matmul(weight, src.transpose(2, 3), out=out)
    else:
        per = g // nsrc
        for k in range(nsrc):
            group = slice(k * per, (k + 1) * per)
            out[:, group] = torch.matmul(weight[group], src[:, k].transpose(1, 2).unsqueeze(1))
    return out


def cross_sources(
    src: torch.Tensor, order: torch.Tensor, hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a cross block's dt, B and C come from: its other input, src `(B, L, E)` in image order.
    Returns (sources `(B, S, L, E)`, bc_index `(G, L)`: the source row that position i of order g
    reads; `order`: the scan orders, `fusionmamba._scan_orders`). Per-token projections, so computed
    once per token, not per position: the row orders read image-order tokens (forwards, backwards);
    on an image with four directions the column orders read them from a transposed copy of src,
    forwards and backwards too, instead of a column apart at every position (a cache miss each: the
    cross blocks' scans ran 70 % slower than the others')."""
    b, length, e = src.shape
    h, w = hw
    if order.shape[0] != 4 or h == 1 or w == 1:
        return src.unsqueeze(1), order
    both = torch.from_numpy(_buffer("cross_src", (b, 2, length, e)))
    both[:, 0] = src
    both[:, 1].view(b, w, h, e).copy_(src.view(b, h, w, e).transpose(1, 2))
    forward = torch.arange(length, device=src.device)
    return both, torch.stack([forward, forward.flip(0)] * 2)  # rows (0, 1), columns (2, 3)


def scan_directions(
    u: torch.Tensor,
    sources: torch.Tensor | None,
    x_w: torch.Tensor,
    xz: torch.Tensor,
    dt_w: torch.Tensor,
    dt_bias: torch.Tensor,
    floor: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor,
    bc_index: torch.Tensor | None,
    inverse: torch.Tensor,
    norm: torch.nn.LayerNorm,
    width: int,
) -> torch.Tensor:
    """The G directions' scans, gated, averaged in image order and LayerNormed by `norm`: `(B, L, E)`
    (see `_scan_kernel`), for an image of `width` columns (1-D sequences: their length); overwrites u
    (float32 CPU `(B, G, L, E)`) with the directions' outputs.
    x_proj (weights x_w `(G, R + 2N, E)`) reads u itself (sources None) or a cross block's sources
    (`cross_sources`), row bc_index[g, i] `(G, L)` for position i of order g. With N = 8 it runs
    inside the scan (`_pair_scan_kernel` at E = 8, `_direction_scan_kernel` at multiples of 16: its
    `(B, G, R + 2N, L)` output, written and read back, cost as much as the rest of the scan's loads);
    otherwise first, by `project`.
    `floor` `(G, E)`: the scan-memory floor of the step (None: unbounded); `inverse` `(G, L)` the
    position of each image token in each order (`fusionmamba._scan_orders`)."""
    # Each work item reads a position of u before it writes the same position's outputs, so the
    # outputs go over u in place (u is not needed after the scan): one (B, G, L, E) array less.
    b, g, length, e = u.shape
    n = A.shape[2]
    src = u if sources is None else sources
    u_np = _f32(u)
    out = u_np
    floor_np = np.zeros(dt_bias.shape, np.float32) if floor is None else _f32(floor)
    by_token = bc_index is not None
    index = bc_index.numpy() if by_token else inverse.numpy()  # (unread without bc_index)
    if n == HALF and ((e == HALF and g % 2 == 0) or e % LANES == 0):
        params = _direction_parameters(x_w, dt_w, dt_bias, floor_np, A, D)
        with _threads():
            if e == HALF:
                _pair_scan(u_np, _f32(src), sources is None, index, by_token, *_pair_parameters(*params), out)
            else:
                # a direction per item where that keeps every thread busy, else its channels split too
                parts = min(e // LANES, -(-numba.get_num_threads() // (b * g)))
                _direction_scan(u_np, _f32(src), sources is None, index, by_token, *params, parts, out)
    else:
        xdbl = project(src, x_w).numpy()
        with _threads():
            _scan(u_np, xdbl, _f32(dt_w), _f32(dt_bias), floor_np, _f32(A), _f32(D), index, by_token, out)
    # the directions' mean (here rather than in the scan kernel, so that directions run in parallel)
    normed = _buffer("normed", (b, length, e))
    with _threads():
        weight, bias = _f32(norm.weight), _f32(norm.bias)
        _mean_norm(out, inverse.numpy(), _f32(xz), weight, bias, float(norm.eps), width, normed)
    return torch.from_numpy(normed)


def _direction_parameters(
    x_w: torch.Tensor,
    dt_w: torch.Tensor,
    dt_bias: torch.Tensor,
    floor: np.ndarray,
    A: torch.Tensor,
    D: torch.Tensor,
) -> tuple[np.ndarray, ...]:
    """`_direction_scan_kernel`'s w_bc, w_dt, dt_w, consts and a_l from x_w `(G, R + 2N, E)`, dt_w
    `(G, E, R)`, dt_bias, floor, D `(G, E)`, A `(G, E, N)`."""
    rank = dt_w.shape[2]
    x_w = x_w.detach().float()
    consts = torch.stack([dt_bias.detach().float(), torch.from_numpy(floor), D.detach().float()], 1)
    a_l = (A.detach().float() * float(_LOG2E)).transpose(1, 2)  # as `_scan_kernel` forms it
    parts = (x_w[:, rank:].transpose(1, 2), x_w[:, :rank], dt_w.detach().float().transpose(1, 2), consts, a_l)
    return tuple(np.ascontiguousarray(t.numpy()) for t in parts)


def _pair_parameters(
    w_bc: np.ndarray, w_dt: np.ndarray, dt_w: np.ndarray, consts: np.ndarray, a_l: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_pair_scan_kernel`'s weights, a_l and consts from `_direction_parameters`' (E = N): each pair
    of directions' lanes side by side, and dt_proj composed with x_proj's dt rows, so that the
    weights are B's, C's and the step's per input channel, `(G / 2, 3, E, 2E)`."""
    g, e, _ = w_bc.shape
    n = a_l.shape[1]
    dt_x = np.einsum("grc,gro->gco", w_dt.astype(np.float64), dt_w.astype(np.float64))  # (G, in, out)
    # (G, 3 in, out): B's rows, C's, the step's
    weights = np.concatenate([w_bc[:, :, :n], w_bc[:, :, n:], dt_x.astype(np.float32)], axis=1)
    return _side_by_side(weights).reshape(g // 2, 3, e, 2 * n), _side_by_side(a_l), _side_by_side(consts)


def _side_by_side(a: np.ndarray) -> np.ndarray:
    """`(G, K, E)` -> `(G / 2, K, 2E)`: directions 2p and 2p + 1 side by side along the last axis (a
    pair's 16 lanes)."""
    g, k, e = a.shape
    return np.ascontiguousarray(a.reshape(g // 2, 2, k, e).transpose(0, 2, 1, 3).reshape(g // 2, k, 2 * e))


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """`layer(x)` for float32 CPU x `(..., K)`: by `_linear_kernel` where K <= 16 and the outputs are
    8 or a multiple of 16 (MKL runs those thin products at 4-40 GFLOP/s: 28 -> ~6 ms for the d = 8
    networks' in_proj of a 900^2 window), else by torch."""
    k, n = layer.in_features, layer.out_features
    if k > 2 * HALF or not (n == HALF or n % LANES == 0):
        return layer(x)
    flat = _f32(x).reshape(-1, k)
    out = np.empty((flat.shape[0], n), dtype=np.float32)
    bias = np.zeros(n, np.float32) if layer.bias is None else _f32(layer.bias)
    with _threads():
        _linear(flat, np.ascontiguousarray(_f32(layer.weight).T), bias, out)
    return torch.from_numpy(out).view(*x.shape[:-1], n)


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """`norm(x)` for float32 CPU x `(..., E)`, one pass per row (see `_layer_norm_kernel`)."""
    flat = _f32(x).reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    with _threads():
        _layer_norm(flat, _f32(norm.weight), _f32(norm.bias), float(norm.eps), out)
    return torch.from_numpy(out).view(x.shape)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()
