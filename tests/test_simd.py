"""The 16-lane kernels of the fused CPU path (`models.simd`, `models.mamba_numba`) against plain
numpy/torch arithmetic: the vector exp/softplus/silu, the depthwise conv in each of its three forms
(16 channels per vector, two positions of 8 channels, scalar) and the x_proj kernel, on lengths that
are no multiple of a vector or a block."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

numba = pytest.importorskip("numba")

from fusion_cli.models import mamba_numba  # noqa: E402
from fusion_cli.models.fusionmamba import _scan_orders  # noqa: E402
from fusion_cli.models.simd import (  # noqa: E402
    vexp,
    vexp2,
    vload,
    vload_halves,
    vpick,
    vsilu,
    vsoftplus,
    vstore,
    vstore_halves,
)


def _lanewise(op):  # type: ignore[no-untyped-def]
    @numba.njit
    def apply(x, out):  # type: ignore[no-untyped-def]
        for i in range(0, x.shape[0], 16):
            vstore(out, i, op(vload(x, i)))

    return apply


@pytest.mark.parametrize(
    "op,reference,tol",
    [
        (vexp, np.exp, 3e-7),
        (vexp2, np.exp2, 3e-7),
        (vsoftplus, lambda x: np.logaddexp(0.0, x), 3e-7),
        (vsilu, lambda x: x / (1.0 + np.exp(-x)), 5e-7),
    ],
)
def test_vector_functions_match_float64(op, reference, tol):  # type: ignore[no-untyped-def]
    x = np.linspace(-80.0, 80.0, 16 * 4001, dtype=np.float32)  # 2^80: within vexp2's range too
    out = np.empty_like(x)
    _lanewise(op)(x, out)
    expected = reference(x.astype(np.float64))
    rel = np.abs(out - expected) / np.maximum(np.abs(expected), 1e-30)
    assert float(rel.max()) < tol


def test_vexp_clamps_like_the_scalar_exp():
    x = np.array([-1000.0, -88.0, -87.0, 0.0, 88.0, 89.0, 1e6, -0.0] * 2, dtype=np.float32)
    out = np.empty_like(x)
    _lanewise(vexp)(x, out)
    assert np.all(np.isfinite(out))
    assert out[0] == out[2] and out[5] == out[4] and out[6] == out[4]  # clamped to [-87, 88]
    assert out[3] == 1.0


def test_vexp2_underflows_to_at_most_the_smallest_normal():
    """The decays' exp2 takes y <= 0 of any size: far below -126 it gives 0 or at most 2^-126, never
    a wrapped exponent."""
    low = [-1e30, -1e6, -1000.0, -200.0, -150.0, -127.5]
    x = np.array(low + [-126.0, -125.5, -60.25, -7.3, -1.0, -0.5, -1e-3, -1e-9, -0.0, 0.0], np.float32)
    out = np.empty_like(x)
    _lanewise(vexp2)(x, out)
    assert np.all(out[: len(low)] >= 0.0) and np.all(out[: len(low)] <= np.float32(2.0**-126))
    rest = slice(len(low), None)
    np.testing.assert_allclose(out[rest], np.exp2(x[rest].astype(np.float64)), rtol=3e-7, atol=0)


def test_vexp2_without_avx512():
    """The portable vexp2 (exponent bits, y clamped at -126), compiled for a CPU without AVX-512 in a
    child process (numba's target is per process): same values as on this CPU."""
    code = (
        "import numpy as np, numba\n"
        "from fusion_cli.models.simd import vexp2, vload, vstore, _has_avx512\n"
        "from numba.core.registry import cpu_target\n"
        "assert not _has_avx512(cpu_target.target_context)\n"
        "@numba.njit\n"
        "def f(x, o):\n"
        "    vstore(o, 0, vexp2(vload(x, 0)))\n"
        "x = np.array([-1e30, -1000, -150, -126, -125.5, -60.25, -7.3, -1, -0.5, -1e-3, -1e-9, 0,"
        " -3, -20, -100, -2.5], np.float32)\n"
        "o = np.empty_like(x); f(x, o)\n"
        "assert np.all(o[:3] >= 0) and np.all(o[:3] <= np.float32(2.0**-126)), o\n"
        "np.testing.assert_allclose(o[3:], np.exp2(x[3:].astype(np.float64)), rtol=3e-7, atol=0)\n"
    )
    haswell = "+avx,+avx2,+fma,+f16c,+popcnt,+sse4.1,+sse4.2,+ssse3,+bmi,+bmi2,+lzcnt,+movbe"
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": haswell}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_pick_and_half_stores():
    @numba.njit
    def apply(x, picked, halves):  # type: ignore[no-untyped-def]
        v = vload(x, 0)
        for k in range(8):
            vstore(picked, 16 * k, vpick(v, k))
        vstore_halves(halves, 20, 4, vload_halves(x, 8, 0))  # halves swapped, then stored apart

    x = np.arange(16, dtype=np.float32)
    picked, halves = np.zeros(128, np.float32), np.zeros(28, np.float32)
    apply(x, picked, halves)
    expected = np.concatenate([np.r_[[k] * 8, [k + 8] * 8] for k in range(8)]).astype(np.float32)
    np.testing.assert_array_equal(picked, expected)
    np.testing.assert_array_equal(halves[20:28], x[8:])
    np.testing.assert_array_equal(halves[4:12], x[:8])
    assert not halves[:4].any() and not halves[12:20].any()


@pytest.mark.parametrize(
    "channels,rank,groups,cross",
    [(8, 1, 4, False), (8, 1, 4, True), (8, 1, 2, False), (8, 1, 2, True), (16, 1, 4, True),
     (32, 2, 4, False), (32, 2, 4, True), (64, 4, 2, False), (64, 4, 2, True)],
)  # fmt: skip
def test_scans_with_x_proj_inside_equal_the_per_slice_scan(channels, rank, groups, cross):  # type: ignore[no-untyped-def]  # noqa: E501
    """N = 8 with x_proj inside the scan: E = 8 two directions per work item (`_pair_scan_kernel`),
    E a multiple of 16 a direction per work item (`_direction_scan_kernel`), against the per-slice
    kernel reading x_proj's output (`_scan_kernel` after `project`), for self blocks (x_proj of u)
    and cross blocks (a source row per position through bc_index), 2 and 4 directions."""
    rng = np.random.default_rng(2)
    b, e, n, length = 2, channels, 8, 777
    u = rng.standard_normal((b, groups, length, e)).astype(np.float32)
    x_w = torch.from_numpy(rng.standard_normal((groups, rank + 2 * n, e)).astype(np.float32) * 0.3)
    dt_w = torch.from_numpy(rng.standard_normal((groups, e, rank)).astype(np.float32))
    dt_bias = torch.from_numpy(rng.standard_normal((groups, e)).astype(np.float32) - 2)
    A = -torch.from_numpy(rng.random((groups, e, n)).astype(np.float32) * 8 + 0.5)
    D = torch.from_numpy(rng.standard_normal((groups, e)).astype(np.float32))
    floor = (1.0 / (20.0 * A.abs().amin(dim=2))).numpy()
    if cross:
        src = rng.standard_normal((b, groups // 2, length, e)).astype(np.float32)
        index = np.stack([rng.permutation(length) for _ in range(groups)])
    else:
        src, index = u, np.zeros((groups, length), np.int64)
    xdbl = mamba_numba.project(torch.from_numpy(src), x_w).numpy()
    expected = np.empty_like(u)
    mamba_numba._scan(u, xdbl, dt_w.numpy(), dt_bias.numpy(), floor, A.numpy(), D.numpy(), index, cross,
                      expected)  # fmt: skip
    got = np.full_like(u, np.nan)
    if channels == 8:
        weights, a_l, consts = mamba_numba._pair_parameters(
            *mamba_numba._direction_parameters(x_w, dt_w, dt_bias, floor, A, D)
        )
        mamba_numba._pair_scan(u, src, not cross, index, cross, weights, a_l, consts, got)
    else:
        params = mamba_numba._direction_parameters(x_w, dt_w, dt_bias, floor, A, D)
        mamba_numba._direction_scan(u, src, not cross, index, cross, *params, 1, got)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
        got[:] = np.nan  # each direction's channels in slices, as with more threads than directions
        mamba_numba._direction_scan(u, src, not cross, index, cross, *params, channels // 16, got)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def _conv_reference(x, weight, bias, orders):  # type: ignore[no-untyped-def]
    """silu(causal depthwise conv along each order), in float64 torch."""
    b, length, _ = x.shape
    g, e, k = weight.shape
    out = np.empty((b, g, length, e), np.float32)
    for gi in range(g):
        xs = torch.from_numpy(x[:, orders[gi], :e]).double().transpose(1, 2)  # (B, E, L)
        w, bi = torch.from_numpy(weight[gi]).double().unsqueeze(1), torch.from_numpy(bias[gi]).double()
        y = torch.nn.functional.conv1d(xs, w, bi, padding=k - 1, groups=e)
        out[:, gi] = torch.nn.functional.silu(y[..., :length]).transpose(1, 2).float().numpy()
    return out


@pytest.mark.parametrize(
    "channels,hw,groups",
    [(8, (7, 5), 4), (8, (33, 1), 2), (16, (6, 10), 4), (32, (5, 3), 4), (12, (9, 11), 4)],
)
def test_conv_silu_every_path(channels, hw, groups):  # type: ignore[no-untyped-def]
    """E = 8 (two positions per vector; an odd length ends on the scalar path), 16 and 32 (channels
    per vector) and 12 (scalar), along row and column orders, with batch 2."""
    rng = np.random.default_rng(0)
    length = hw[0] * hw[1]
    x = rng.standard_normal((2, length, 2 * channels)).astype(np.float32)
    weight = rng.standard_normal((groups, channels, 4)).astype(np.float32)
    bias = rng.standard_normal((groups, channels)).astype(np.float32)
    orders = _scan_orders(*hw, groups, torch.device("cpu"))[0]
    got = mamba_numba.conv_silu(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), orders)
    expected = _conv_reference(x, weight, bias, orders.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("channels,sources", [(8, 4), (8, 2), (8, 1), (16, 4), (32, 2)])
def test_project_equals_matmul(channels, sources):  # type: ignore[no-untyped-def]
    """x_proj of every position: the E = 8 kernel (length 1000: a block and a vector tail) and the
    MKL path, with as many sources as groups (self blocks) or fewer (cross blocks)."""
    torch.manual_seed(0)
    src = torch.randn(2, sources, 1000, channels)
    weight = torch.randn(4, 17, channels)
    got = mamba_numba.project(src, weight)
    per = 4 // sources
    expected = torch.stack([weight[g] @ src[:, g // per].transpose(1, 2) for g in range(4)], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "channels,hw,groups",
    [(8, (40, 37), 4), (8, (33, 1), 2), (16, (6, 10), 4), (64, (5, 3), 4), (12, (9, 11), 4)],
)
def test_directions_mean_gate_and_norm_every_path(channels, hw, groups):  # type: ignore[no-untyped-def]
    """The directions' mean, silu(z) gate and LayerNorm: E = 8 (two tokens per value; 37 columns end
    tiles on an odd token), 16 and 64 (channels per value), 12 (scalar), against numpy in float64."""
    rng = np.random.default_rng(1)
    length = hw[0] * hw[1]
    y = rng.standard_normal((2, groups, length, channels)).astype(np.float32)
    xz = rng.standard_normal((2, length, 2 * channels)).astype(np.float32)
    weight, bias = rng.random(channels).astype(np.float32), rng.random(channels).astype(np.float32)
    inverse = _scan_orders(*hw, groups, torch.device("cpu"))[1].numpy()
    got = np.empty((2, length, channels), np.float32)
    mamba_numba._mean_norm(y, inverse, xz, weight, bias, 1e-5, hw[1], got)
    tokens = np.arange(length)
    mean = np.mean([y[:, g, inverse[g, tokens]].astype(np.float64) for g in range(groups)], axis=0)
    z = xz[..., channels:].astype(np.float64)
    gated = mean * z / (1.0 + np.exp(-z))
    centred = gated - gated.mean(-1, keepdims=True)
    expected = centred / np.sqrt(centred.var(-1, keepdims=True) + 1e-5) * weight + bias
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "k,n,rows", [(8, 8, 101), (8, 16, 64), (16, 32, 33), (4, 8, 1), (8, 12, 10), (32, 16, 5)]
)
def test_linear_equals_torch(k, n, rows):  # type: ignore[no-untyped-def]
    """The thin in/out projections: 8 outputs (two rows per value; an odd row count ends on the
    scalar path), multiples of 16, and the shapes left to torch (12 outputs, 32 inputs)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(k, n, bias=n != 16)
    x = torch.randn(2, rows, k)
    with torch.inference_mode():
        torch.testing.assert_close(mamba_numba.linear(x, layer), layer(x), rtol=1e-5, atol=1e-5)


def test_kernel_caches_go_stale_with_any_kernel_source():
    """numba stamps a kernel's cache with its own file only; the fused kernels inline helpers from
    simd.py and scan_numba.py, so their caches carry the stamps of all three files."""
    from fusion_cli.models import scan_numba

    cache_file = getattr(getattr(mamba_numba._scan, "_cache", None), "_cache_file", None)
    if cache_file is None:
        pytest.skip("numba keeps no cache in this installation (no writable cache location)")
    assert set(scan_numba.KERNEL_SOURCES) == {"scan_numba.py", "mamba_numba.py", "simd.py"}
    assert cache_file._source_stamp[1] == scan_numba.kernel_sources_stamp()
