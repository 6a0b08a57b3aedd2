"""The directional core of a `MultiScanMamba` block fused on the CPU, for inference (numba).

The generic path gathers every token into each scan order (a copy of the block's activations per
direction), transposes them to `(B, D, L)` for the depthwise conv and the scan, and gathers the
outputs back: on a CPU those copies cost more than the scan itself (bench_profile). Here the orders
are index arithmetic instead of copies:

- direction 0 reads tokens in row-major order, 1 in reverse, 2 column-major, 3 reverse column-major
  (2-direction blocks: 0 and 1 over a 1-D sequence), exactly `fusionmamba._scan_orders`;
- `conv_silu` writes the causal depthwise conv + silu of every direction in its scan order,
  `(B, G, L, E)`, channels last, so the per-direction x_proj is one batched matmul;
- `scan_directions` runs each direction's scan per (batch, direction, slice of channels), computing
  the step from x_proj's dt part (dt_proj, bias, softplus, the scan-memory floor) inline, writes the
  gated outputs in image order, then averages the directions and applies the block's LayerNorm in
  one pass: `(B, L, E)`;
- `layer_norm` is the same LayerNorm pass for the blocks' input norms.

Same arithmetic as the generic path in float32 (sums in another order: ~1e-6 relative). No autograd:
training keeps the generic path.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from fusion_cli.models.scan_numba import _exp, _njit, _sigmoid, _softplus, _threads

# Channels per work item of the scan (their states, CHANNELS x N, stay in L1), and positions per
# block (its steps and decays, BLOCK x CHANNELS x N floats, stay in L2).
CHANNELS = 16
BLOCK = 64


@numba.njit(inline="always", cache=False)
def _token(direction, pos, length, height, width):  # type: ignore[no-untyped-def]
    """Image token (row-major index) read at position `pos` of scan order `direction`."""
    if direction == 1 or direction == 3:
        pos = length - 1 - pos
    if direction >= 2:  # column-major: pos walks down a column, then to the next column
        return (pos % height) * width + pos // height
    return pos


def _conv_silu_kernel(x, weight, bias, height, width, u):  # type: ignore[no-untyped-def]
    """x `(B, L, 2E)` (the in_proj output; its first E channels are convolved), weight `(G, E, K)`,
    bias `(G, E)` -> u `(B, G, L, E)`: silu(causal conv along each scan order)."""
    nb, length, _ = x.shape
    groups, channels, k = weight.shape
    chunk = 2048
    nchunks = (length + chunk - 1) // chunk
    for item in prange(nb * groups * nchunks):
        b = item // (groups * nchunks)
        g = (item // nchunks) % groups
        start = (item % nchunks) * chunk
        stop = min(length, start + chunk)
        acc = np.empty(channels, dtype=u.dtype)
        wt = np.empty((k, channels), dtype=u.dtype)  # taps first: each tap's weights contiguous
        for j in range(k):
            for e in range(channels):
                wt[j, e] = weight[g, e, j]
        toks = np.full(k, -1, dtype=np.int64)  # tokens of the last k positions (-1: before the start)
        for j in range(k - 1):
            src = start - (k - 1) + j
            if src >= 0:
                toks[j] = _token(g, src, length, height, width)
        for pos in range(start, stop):
            toks[k - 1] = _token(g, pos, length, height, width)
            for e in range(channels):
                acc[e] = bias[g, e]
            for j in range(k):
                if toks[j] >= 0:
                    xr = x[b, toks[j]]
                    for e in range(channels):
                        acc[e] += wt[j, e] * xr[e]
            ur = u[b, g, pos]
            for e in range(channels):
                ur[e] = acc[e] * _sigmoid(acc[e])
            for j in range(k - 1):
                toks[j] = toks[j + 1]


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


def _mean_norm_kernel(y, weight, bias, eps, out):  # type: ignore[no-untyped-def]
    """y `(B, G, L, E)` -> out `(B, L, E)`: the mean over the G directions, LayerNormed over E
    (weight, bias `(E,)`), in one pass instead of a sum, a division and a LayerNorm over the block."""
    nb, groups, length, channels = y.shape
    chunk = 4096
    nchunks = (length + chunk - 1) // chunk
    inv_g = 1.0 / groups
    for item in prange(nb * nchunks):
        b = item // nchunks
        start = (item % nchunks) * chunk
        row = np.empty(channels, dtype=np.float32)
        for pos in range(start, min(length, start + chunk)):
            for e in range(channels):
                v = y[b, 0, pos, e]
                for g in range(1, groups):
                    v += y[b, g, pos, e]
                row[e] = v * inv_g
            _normalize(row, weight, bias, eps, out[b, pos])


def _layer_norm_kernel(x, weight, bias, eps, out):  # type: ignore[no-untyped-def]
    """LayerNorm over the last axis of x `(R, E)` -> out: torch's is ~10 ns per element when E is a
    handful of channels (the d = 8 networks), this one pass per row ~1."""
    rows = x.shape[0]
    chunk = 4096
    for item in prange((rows + chunk - 1) // chunk):
        for r in range(item * chunk, min(rows, (item + 1) * chunk)):
            _normalize(x[r], weight, bias, eps, out[r])


@numba.njit(inline="always", cache=False)
def _recurrence(n, mt, m, rank, rows, xg, ug, t0, e0, h, dts, dec, a_g, d_g, ys):  # type: ignore[no-untyped-def]
    """The state update of one block of `mt` positions for channels e0..e0+m (dts, dec, ys flat
    `(mt, m)` / `(mt, m, n)`): h = dec h + dt u B, y = C h + D u. Called with a literal n, so the
    state loop unrolls into SIMD lanes."""
    for i in range(mt):
        xr = xg[rows[i]]
        ur = ug[t0 + i]
        for e in range(m):
            j = i * m + e
            ut = ur[e0 + e]
            dtu = dts[j] * ut
            acc = d_g[e0 + e] * ut
            for k in range(n):
                hk = dec[j * n + k] * h[e * n + k] + dtu * xr[rank + k]
                h[e * n + k] = hk
                acc += xr[rank + n + k] * hk
            ys[j] = acc


def _scan_kernel(  # type: ignore[no-untyped-def]
    u, xdbl, xz, dt_w, dt_bias, floor, A, Dv, height, width, bc_by_token, out
):
    """u `(B, G, L, E)` in scan order; xdbl `(B, G, L, R + 2N)` (dt, B, C) in scan order, or in image
    order when `bc_by_token`; xz `(B, L, 2E)` (z is its second half, image order); dt_w `(G, E, R)`,
    dt_bias, floor, Dv `(G, E)`, A `(G, E, N)` -> out `(B, G, L, E)`: each direction's gated scan, in
    image order. Work items are (batch, direction, slice of CHANNELS channels). Positions go in blocks
    of BLOCK: the steps, decays and gates of a block are flat loops that vectorise (exp included), and
    only the recurrence itself runs position by position."""
    nb, groups, length, channels = u.shape
    rank = dt_w.shape[2]
    n = A.shape[2]
    nslices = (channels + CHANNELS - 1) // CHANNELS
    for item in prange(nb * groups * nslices):
        b = item // (groups * nslices)
        g = (item // nslices) % groups
        e0 = (item % nslices) * CHANNELS
        m = min(CHANNELS, channels - e0)
        h = np.zeros(CHANNELS * n, dtype=u.dtype)
        dts = np.empty(BLOCK * CHANNELS, dtype=u.dtype)
        zs = np.empty(BLOCK * CHANNELS, dtype=u.dtype)
        ys = np.empty(BLOCK * CHANNELS, dtype=u.dtype)
        dec = np.empty(BLOCK * CHANNELS * n, dtype=u.dtype)
        toks = np.empty(BLOCK, dtype=np.int64)
        rows = np.empty(BLOCK, dtype=np.int64)
        w, bias, fl, a_g, d_g = dt_w[g], dt_bias[g], floor[g], A[g], Dv[g]
        ug, xg, og = u[b, g], xdbl[b, g], out[b, g]
        for t0 in range(0, length, BLOCK):
            mt = min(BLOCK, length - t0)
            for i in range(mt):
                tok = _token(g, t0 + i, length, height, width)
                toks[i] = tok
                rows[i] = tok if bc_by_token else t0 + i
            for i in range(mt):  # steps: dt_proj of x_proj's dt part, bias
                xr = xg[rows[i]]
                zr = xz[b, toks[i]]
                for e in range(m):
                    raw = bias[e0 + e]
                    for r in range(rank):
                        raw += w[e0 + e, r] * xr[r]
                    dts[i * m + e] = raw
                    zs[i * m + e] = zr[channels + e0 + e]
            for j in range(mt * m):
                dts[j] = _softplus(dts[j])
            for i in range(mt):  # the scan-memory floor (zero when unbounded)
                for e in range(m):
                    dts[i * m + e] = max(dts[i * m + e], fl[e0 + e])
            for j in range(mt * m):
                for k in range(n):
                    dec[j * n + k] = dts[j] * a_g[e0 + j % m, k]
            for j in range(mt * m * n):
                dec[j] = _exp(dec[j])
            if n == 8:
                _recurrence(8, mt, m, rank, rows, xg, ug, t0, e0, h, dts, dec, a_g, d_g, ys)
            elif n == 16:
                _recurrence(16, mt, m, rank, rows, xg, ug, t0, e0, h, dts, dec, a_g, d_g, ys)
            else:
                _recurrence(n, mt, m, rank, rows, xg, ug, t0, e0, h, dts, dec, a_g, d_g, ys)
            for j in range(mt * m):  # the silu(z) gate
                zt = zs[j]
                ys[j] *= zt * _sigmoid(zt)
            for i in range(mt):
                orow = og[toks[i]]
                for e in range(m):
                    orow[e0 + e] = ys[i * m + e]


_conv_silu = _njit(_conv_silu_kernel)
_scan = _njit(_scan_kernel)
_mean_norm = _njit(_mean_norm_kernel)
_layer_norm = _njit(_layer_norm_kernel)


def conv_silu(
    xz: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """xz `(B, L, 2E)`, weight `(G, E, K)`, bias `(G, E)` -> u `(B, G, L, E)` in each scan order."""
    b, length, _ = xz.shape
    g, e, _ = weight.shape
    u = np.empty((b, g, length, e), dtype=np.float32)
    with _threads():
        _conv_silu(_f32(xz), _f32(weight), _f32(bias), hw[0], hw[1], u)
    return torch.from_numpy(u)


def scan_directions(
    u: torch.Tensor,
    xdbl: torch.Tensor,
    xz: torch.Tensor,
    dt_w: torch.Tensor,
    dt_bias: torch.Tensor,
    floor: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor,
    hw: tuple[int, int],
    bc_by_token: bool,
    norm: torch.nn.LayerNorm,
) -> torch.Tensor:
    """The G directions' scans, gated, averaged in image order and LayerNormed by `norm`: `(B, L, E)`
    (see `_scan_kernel`). `floor` `(G, E)`: the scan-memory floor of the step (None: unbounded)."""
    b, g, length, e = u.shape
    out = np.empty((b, g, length, e), dtype=np.float32)
    floor_np = np.zeros(dt_bias.shape, np.float32) if floor is None else _f32(floor)
    with _threads():
        _scan(_f32(u), _f32(xdbl), _f32(xz), _f32(dt_w), _f32(dt_bias), floor_np, _f32(A), _f32(D),
              hw[0], hw[1], bc_by_token, out)  # fmt: skip
    # the directions' mean (here rather than in the scan kernel, so that directions run in parallel)
    normed = np.empty((b, length, e), dtype=np.float32)
    with _threads():
        _mean_norm(out, _f32(norm.weight), _f32(norm.bias), float(norm.eps), normed)
    return torch.from_numpy(normed)


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """`norm(x)` for float32 CPU x `(..., E)`, one pass per row (see `_layer_norm_kernel`)."""
    flat = _f32(x).reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    with _threads():
        _layer_norm(flat, _f32(norm.weight), _f32(norm.bias), float(norm.eps), out)
    return torch.from_numpy(out).view(x.shape)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()
