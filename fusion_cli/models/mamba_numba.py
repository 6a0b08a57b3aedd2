"""The directional core of a `MultiScanMamba` block fused on the CPU, for inference (numba).

The generic path gathers every token into each scan order (a copy of the block's activations per
direction), transposes them to `(B, D, L)` for the depthwise conv and the scan, and gathers the
outputs back: on a CPU those copies cost more than the scan itself (bench_profile). Here the orders
are index arithmetic instead of copies:

- direction 0 reads tokens in row-major order, 1 in reverse, 2 column-major, 3 reverse column-major
  (2-direction blocks: 0 and 1 over a 1-D sequence), exactly `fusionmamba._scan_orders`;
- `conv_silu` writes the causal depthwise conv + silu of every direction in its scan order,
  `(B, G, L, E)`, channels last, so the per-direction x_proj is one batched matmul;
- `scan_directions` runs the four scans per (batch, slice of channels), computes the step from
  x_proj's dt part (dt_proj, bias, softplus, the scan-memory floor) inline, and accumulates the gated
  outputs of all directions into image order `(B, L, E)`, averaged.

Same arithmetic as the generic path in float32 (sums in another order: ~1e-6 relative). No autograd:
training keeps the generic path.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from fusion_cli.models.scan_numba import _exp, _set_threads, _sigmoid, _softplus

# Channels per work item of the scan: their states (CHANNELS x N) stay in registers/L1 and the
# exps of one step vectorise over CHANNELS x N.
CHANNELS = 32


def _njit(fn):  # type: ignore[no-untyped-def]
    from fusion_cli.models.scan_numba import _njit as njit

    return njit(fn)


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
    chunk = 1024
    nchunks = (length + chunk - 1) // chunk
    for item in prange(nb * groups * nchunks):
        b = item // (groups * nchunks)
        g = (item // nchunks) % groups
        start = (item % nchunks) * chunk
        stop = min(length, start + chunk)
        acc = np.empty(channels, dtype=u.dtype)
        for pos in range(start, stop):
            for e in range(channels):
                acc[e] = bias[g, e]
            for j in range(k):
                src = pos - (k - 1) + j
                if src >= 0:
                    tok = _token(g, src, length, height, width)
                    for e in range(channels):
                        acc[e] += weight[g, e, j] * x[b, tok, e]
            for e in range(channels):
                u[b, g, pos, e] = acc[e] * _sigmoid(acc[e])


@numba.njit(inline="always", fastmath=True, cache=False)
def _step(
    n,
    m,
    rank,
    xrow,
    urow,
    zrow,
    orow,
    e0,
    channels,
    w,
    bias,
    floor,
    a_g,
    d_g,
    softplus,
    scale,
    first,
    h,
    dt,
    dec,
):  # type: ignore[no-untyped-def]  # noqa: E501
    """One position of one direction for channels e0..e0+m: step sizes, decays, the state update and
    the gated output added into the token's output row. Called with a literal n (unrolled states)."""
    for e in range(m):
        raw = bias[e0 + e]
        for r in range(rank):
            raw += w[e0 + e, r] * xrow[r]
        step = _softplus(raw) if softplus else raw
        dt[e] = max(step, floor[e0 + e])
    for e in range(m):
        for k in range(n):
            dec[e * n + k] = dt[e] * a_g[e0 + e, k]
    for j in range(m * n):
        dec[j] = _exp(dec[j])
    for e in range(m):
        ut = urow[e0 + e]
        dtu = dt[e] * ut
        acc = d_g[e0 + e] * ut
        for k in range(n):
            hk = dec[e * n + k] * h[e * n + k] + dtu * xrow[rank + k]
            h[e * n + k] = hk
            acc += xrow[rank + n + k] * hk
        zt = zrow[channels + e0 + e]
        y = acc * zt * _sigmoid(zt) * scale
        if first:
            orow[e0 + e] = y
        else:
            orow[e0 + e] += y


def _scan_kernel(  # type: ignore[no-untyped-def]
    u, xdbl, xz, dt_w, dt_bias, floor, A, Dv, height, width, bc_by_token, softplus, out
):
    """u `(B, G, L, E)` in scan order; xdbl `(B, G, L, R + 2N)` (dt, B, C) in scan order, or in image
    order when `bc_by_token`; xz `(B, L, 2E)` (z is its second half, image order); dt_w `(G, E, R)`,
    dt_bias, floor, Dv `(G, E)`, A `(G, E, N)` -> out `(B, L, E)`: the gated scans, averaged over
    the G directions, in image order. Work items are (batch, slice of CHANNELS channels); each runs
    the G directions one after the other, so the accumulation into `out` needs no lock."""
    nb, groups, length, channels = u.shape
    rank = dt_w.shape[2]
    n = A.shape[2]
    nslices = (channels + CHANNELS - 1) // CHANNELS
    scale = u.dtype.type(1.0 / groups)
    for item in prange(nb * nslices):
        b = item // nslices
        e0 = (item % nslices) * CHANNELS
        m = min(CHANNELS, channels - e0)
        h = np.empty(CHANNELS * n, dtype=u.dtype)
        dec = np.empty(CHANNELS * n, dtype=u.dtype)
        dt = np.empty(CHANNELS, dtype=u.dtype)
        for g in range(groups):
            h[:] = 0.0
            w, bias, fl, a_g, d_g = dt_w[g], dt_bias[g], floor[g], A[g], Dv[g]
            ug, xg, first = u[b, g], xdbl[b, g], g == 0
            for pos in range(length):
                tok = _token(g, pos, length, height, width)
                xrow = xg[tok] if bc_by_token else xg[pos]
                zrow, orow, urow = xz[b, tok], out[b, tok], ug[pos]
                if n == 8:
                    _step(8, m, rank, xrow, urow, zrow, orow, e0, channels, w, bias, fl, a_g, d_g,
                          softplus, scale, first, h, dt, dec)  # fmt: skip
                else:
                    _step(n, m, rank, xrow, urow, zrow, orow, e0, channels, w, bias, fl, a_g, d_g,
                          softplus, scale, first, h, dt, dec)  # fmt: skip


_conv_silu = _njit(_conv_silu_kernel)
_scan = _njit(_scan_kernel)


def conv_silu(
    xz: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """xz `(B, L, 2E)`, weight `(G, E, K)`, bias `(G, E)` -> u `(B, G, L, E)` in each scan order."""
    b, length, _ = xz.shape
    g, e, _ = weight.shape
    u = np.empty((b, g, length, e), dtype=np.float32)
    _set_threads()
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
) -> torch.Tensor:
    """The G directions' scans, gated and averaged in image order: `(B, L, E)` (see `_scan_kernel`).
    `floor` `(G, E)`: the scan-memory floor of the step (None: unbounded, softplus only)."""
    b, _, length, e = u.shape
    out = np.empty((b, length, e), dtype=np.float32)
    softplus = True
    floor_np = np.zeros(dt_bias.shape, np.float32) if floor is None else _f32(floor)
    _set_threads()
    _scan(_f32(u), _f32(xdbl), _f32(xz), _f32(dt_w), _f32(dt_bias), floor_np, _f32(A), _f32(D),
          hw[0], hw[1], bc_by_token, softplus, out)  # fmt: skip
    return torch.from_numpy(out)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()
