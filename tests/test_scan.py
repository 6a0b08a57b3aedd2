"""Selective-scan backends: the golden single scan, torch and numba vs reference (forward and gradients),
the automatic backend choice and its overrides, and the causal depthwise conv."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import need_shared

from fusion_cli.errors import FusionError
from fusion_cli.models import scan
from fusion_cli.models.scan import (
    causal_conv1d,
    resolve_backend,
    selective_scan,
    selective_scan_reference,
    selective_scan_torch,
)

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
FAST = ["torch", "numba"]  # the backends checked against the reference


def _impl(name: str):
    """The backend's scan function; skips the numba cases where numba (optional) is not installed."""
    if name == "numba":
        pytest.importorskip("numba")
        assert scan._numba_import()[0] is not None, scan._numba_import()[1]
    return scan._IMPLS[name]


def _golden() -> dict[str, torch.Tensor]:
    data = np.load(need_shared("fusionmamba_official", "golden", "scan_case.npz"))
    return {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.mark.parametrize("name", ["reference", *FAST])
def test_golden_scan_case(name):
    fn = _impl(name)
    g = _golden()
    y64 = fn(*(g[k] for k in ARGS), delta_softplus=True)
    assert y64.dtype == torch.float64
    np.testing.assert_allclose(y64.numpy(), g["out_fp64"].numpy(), rtol=0, atol=1e-12)
    y32 = fn(*(g[k].float() for k in ARGS), delta_softplus=True)
    assert y32.dtype == torch.float32
    np.testing.assert_allclose(y32.numpy(), g["out_fp64"].numpy(), rtol=1e-5, atol=1e-5)


def _random_case(dtype: torch.dtype, length: int = 203, groups: int = 2, requires_grad: bool = False):
    """A grouped scan (2 groups of 6 channels sharing B/C) with a length that is no multiple of the chunk."""
    gen = torch.Generator().manual_seed(1)
    b, d, n = 2, 12, 4
    t = {
        "u": torch.randn(b, d, length, generator=gen),
        "delta": torch.randn(b, d, length, generator=gen) * 0.5,
        "A": -torch.exp(torch.randn(d, n, generator=gen)),
        "B": torch.randn(b, groups, n, length, generator=gen),
        "C": torch.randn(b, groups, n, length, generator=gen),
        "D": torch.randn(d, generator=gen),
        "z": torch.randn(b, d, length, generator=gen),
        "delta_bias": torch.randn(d, generator=gen) * 0.3,
    }
    return {k: v.to(dtype).requires_grad_(requires_grad) for k, v in t.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("chunk", [8, 16, 64, 256])
def test_torch_matches_reference_forward_fp64(chunk):
    t = _random_case(torch.float64)
    ref = selective_scan_reference(**t, delta_softplus=True)
    got = selective_scan_torch(**t, delta_softplus=True, chunk=chunk)
    assert _rel(got, ref) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_torch_matches_reference_gradients(dtype, tol):
    grads = {}
    outs = {}
    for name, fn in (("ref", selective_scan_reference), ("torch", selective_scan_torch)):
        t = _random_case(dtype, requires_grad=True)
        kwargs = {"chunk": 16} if name == "torch" else {}
        y = fn(**t, delta_softplus=True, **kwargs)
        w = torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)  # a non-trivial upstream grad
        (y * w).sum().backward()
        outs[name] = y.detach()
        grads[name] = {k: v.grad for k, v in t.items()}
    assert _rel(outs["torch"], outs["ref"]) < tol
    for k in ARGS:
        assert _rel(grads["torch"][k], grads["ref"][k]) < tol, k


@pytest.mark.parametrize("name", FAST)
def test_fp32_scan_agrees_with_fp64_oracle_on_long_sequence(name):
    """Long sequences with strong decay: the scan must stay finite and accurate in fp32."""
    fn = _impl(name)
    t = _random_case(torch.float64, length=4096, groups=1)
    t["delta"] = t["delta"] * 4  # some steps forget almost everything, others keep state for long
    ref = selective_scan_reference(**t, delta_softplus=True)
    got = fn(**{k: v.float() for k, v in t.items()}, delta_softplus=True)
    assert torch.isfinite(got).all()
    assert _rel(got.double(), ref) < 1e-5


@pytest.mark.parametrize(
    "groups,length,softplus,drop",
    [
        (2, 203, True, ()),
        (1, 203, True, ()),  # B/C shared by all channels, given 3-D
        (12, 37, True, ()),  # one channel per group
        (3, 1, True, ()),  # a single step
        (2, 1001, False, ()),
        (2, 203, True, ("D", "z")),
        (4, 130, False, ("D", "z", "delta_bias")),
    ],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_numba_matches_reference_forward(groups, length, softplus, drop, dtype, tol):
    fn = _impl("numba")
    t = _random_case(torch.float64, length=length, groups=groups)
    if groups == 1:
        t["B"], t["C"] = t["B"][:, 0], t["C"][:, 0]
    if not softplus:  # a positive step, as the model's floored one: no blow-up
        t["delta"], t["delta_bias"] = t["delta"].abs(), t["delta_bias"].abs()
    for k in drop:
        t[k] = None
    ref = selective_scan_reference(**t, delta_softplus=softplus)
    got = fn(**{k: None if v is None else v.to(dtype) for k, v in t.items()}, delta_softplus=softplus)
    assert got.dtype == dtype and got.shape == ref.shape
    assert _rel(got.double(), ref) < tol


@pytest.mark.parametrize("groups,softplus,drop", [(2, True, ()), (1, False, ("D", "z")), (3, True, ("z",))])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_numba_matches_reference_gradients(groups, softplus, drop, dtype, tol):
    """Every input's gradient, in the input's own dtype; fp32 against the fp64 oracle."""
    fn = _impl("numba")
    grads = {}
    for name, f, dt in (("ref", selective_scan_reference, torch.float64), ("numba", fn, dtype)):
        t = _random_case(dt, groups=groups, requires_grad=True)
        if groups == 1:
            t["B"], t["C"] = (x[:, 0].detach().requires_grad_() for x in (t["B"], t["C"]))
        if not softplus:
            for k in ("delta", "delta_bias"):
                t[k] = t[k].detach().abs().requires_grad_()
        for k in drop:
            t[k] = None
        y = f(**t, delta_softplus=softplus)
        w = torch.linspace(-1, 1, y.numel(), dtype=dt).reshape(y.shape)
        (y * w).sum().backward()
        grads[name] = {k: v.grad for k, v in t.items() if v is not None}
    assert grads["numba"].keys() == grads["ref"].keys()
    for k, g in grads["numba"].items():
        assert g.dtype == dtype and g.shape == grads["ref"][k].shape, k
        assert _rel(g.double(), grads["ref"][k]) < tol, k


def test_numba_gradients_only_where_asked():
    fn = _impl("numba")
    t = _random_case(torch.float64, length=50)
    t["u"].requires_grad_()
    fn(**t, delta_softplus=True).sum().backward()
    assert t["u"].grad is not None and all(t[k].grad is None for k in ARGS if k != "u")


def test_numba_scan_in_inference_mode():
    fn = _impl("numba")
    t = _random_case(torch.float32, length=64)
    with torch.inference_mode():
        got = fn(**t, delta_softplus=True)
    assert _rel(got, selective_scan_reference(**t, delta_softplus=True)) < 1e-5


def test_auto_backend_on_cpu_is_numba_when_it_imports(monkeypatch):
    _impl("numba")
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    name, reason = resolve_backend(None, "cpu")
    assert name == "numba" and "no CUDA" in reason
    monkeypatch.setenv(scan.ENV_VAR, "torch")  # the override still forces torch
    assert resolve_backend(None, "cpu") == ("torch", f"requested by ${scan.ENV_VAR}")


def test_auto_backend_on_cpu_is_torch_without_numba(monkeypatch):
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    monkeypatch.setattr(scan, "_numba_import", lambda: (None, "numba is not importable (ImportError)"))
    name, reason = resolve_backend(None, "cpu")
    assert name == "torch" and "no CUDA" in reason and "numba is not importable" in reason
    with pytest.raises(
        FusionError, match=r"^scan backend numba requested \(argument\) but numba is not"
    ) as e:
        resolve_backend("numba", "cpu")
    assert "\n" not in str(e.value)
    t = _random_case(torch.float32, length=8)
    with pytest.raises(FusionError, match="numba unavailable"):
        scan.selective_scan_numba(**t)


def test_numba_backend_is_cpu_only(monkeypatch):
    monkeypatch.setattr(scan, "_numba_import", lambda: (object(), "numba imports"))
    with pytest.raises(FusionError, match="CPU-only"):
        resolve_backend("numba", "cuda")


def test_numba_compile_failure_falls_back_to_torch_when_automatic(monkeypatch):
    errors = pytest.importorskip("numba.core.errors")

    def broken(*args, **kwargs):
        raise errors.TypingError("simulated")

    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    monkeypatch.setattr(scan, "_numba_import", lambda: (broken, "numba imports"))
    monkeypatch.setitem(scan._IMPLS, "numba", broken)
    monkeypatch.setattr(scan, "_numba_broken", None)
    t = _random_case(torch.float64, length=20)
    with pytest.raises(FusionError, match="numba kernel failed to compile"):
        selective_scan(**t, backend="numba")
    got = selective_scan(**t)  # automatic: torch, and from now on resolve says why
    assert _rel(got, selective_scan_reference(**t)) < 1e-12
    name, reason = resolve_backend(None, "cpu")
    assert name == "torch" and "failed to compile" in reason


def test_mamba_ssm_absent_auto_picks_torch_with_reason(monkeypatch):
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    monkeypatch.setattr(
        scan, "_mamba_ssm_import", lambda: (None, "mamba_ssm is not importable (ImportError)")
    )
    # triton, when it imports, would come before torch (tests/test_scan_triton.py)
    monkeypatch.setattr(scan.scan_triton, "triton_import", lambda: (False, "triton is not importable"))
    name, reason = resolve_backend(None, "cuda")
    assert name == "torch" and "mamba_ssm is not importable" in reason
    with pytest.raises(FusionError, match="mamba_ssm requested .* not importable"):
        resolve_backend("mamba_ssm", "cuda")


def test_mamba_ssm_present_is_chosen_on_cuda_only(monkeypatch):
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    monkeypatch.setattr(scan, "_mamba_ssm_import", lambda: (object(), "mamba_ssm imports"))
    assert resolve_backend(None, "cuda")[0] == "mamba_ssm"
    assert resolve_backend(None, "cpu")[0] in ("torch", "numba")
    with pytest.raises(FusionError, match="needs CUDA"):
        resolve_backend("mamba_ssm", "cpu")


def test_backend_overrides_argument_beats_env(monkeypatch):
    monkeypatch.setenv(scan.ENV_VAR, "reference")
    assert resolve_backend(None, "cpu") == ("reference", f"requested by ${scan.ENV_VAR}")
    assert resolve_backend("torch", "cpu") == ("torch", "requested by argument")
    monkeypatch.setenv(scan.ENV_VAR, "fastest")
    with pytest.raises(FusionError, match="unknown scan backend 'fastest'"):
        resolve_backend(None, "cpu")


def test_dispatch_uses_the_env_backend(monkeypatch):
    calls = []
    monkeypatch.setitem(scan._IMPLS, "reference", lambda *a: calls.append("reference") or a[0])
    monkeypatch.setenv(scan.ENV_VAR, "reference")
    t = _random_case(torch.float32, length=8)
    selective_scan(**t)
    assert calls == ["reference"]


def test_causal_conv1d_is_causal_and_matches_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 30, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    y = causal_conv1d(x, w, b, activation="silu")
    xp = F.pad(x, (3, 0))
    expect = sum(w[None, :, k, None] * xp[:, :, k : k + 30] for k in range(4)) + b[None, :, None]
    torch.testing.assert_close(y, F.silu(expect))
    x2 = x.clone()
    x2[..., 20:] += 1.0  # changing the future must not change the past
    torch.testing.assert_close(causal_conv1d(x2, w, b)[..., :20], causal_conv1d(x, w, b)[..., :20])


def test_numba_scan_keeps_torchs_thread_count():
    """numba's OpenMP layer shares torch's OpenMP runtime; its first launch must not raise torch's
    thread count (a `--threads 1` run computed torch's ops on every core). Fresh process: the reset
    happened on numba's first parallel launch."""
    import subprocess
    import sys

    pytest.importorskip("numba")
    probe = (
        "import torch; torch.set_num_threads(1)\n"
        "from fusion_cli.models import scan\n"
        "u = torch.randn(1, 32, 256); A = -torch.rand(32, 8); B = torch.randn(1, 8, 256)\n"
        "scan.selective_scan(u, u.abs(), A, B, B, backend='numba')\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "1"


def test_library_calls_leave_the_callers_threads_and_plot_backend(tmp_path) -> None:
    """A library user's settings are theirs: a numba scan left numba's thread count at torch's (the
    caller had set 1), and a quicklook (or report, or training plot) switched matplotlib to Agg with
    `matplotlib.use`, which turned a notebook's inline backend off (helper)."""
    import matplotlib
    import numba

    from fusion_cli.quicklook import save_quicklook

    backend, numba_threads, torch_threads = (
        matplotlib.get_backend(),
        numba.get_num_threads(),
        torch.get_num_threads(),
    )
    try:
        matplotlib.use("svg")
        numba.set_num_threads(1)
        torch.set_num_threads(2)
        scan.selective_scan_numba(**_random_case(torch.float32, length=64))
        assert numba.get_num_threads() == 1 and torch.get_num_threads() == 2
        save_quicklook(tmp_path / "q.png", np.random.default_rng(0).random((3, 40, 40)))
        assert matplotlib.get_backend() == "svg" and (tmp_path / "q.png").stat().st_size > 0
    finally:
        matplotlib.use(backend)
        numba.set_num_threads(numba_threads)
        torch.set_num_threads(torch_threads)
