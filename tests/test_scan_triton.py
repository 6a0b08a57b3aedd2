"""The triton scan backend against the reference scan: forward and gradients in fp32, grouped B/C,
softplus on/off, D/z absent, lengths that are no multiple of the chunk, bf16 inputs, the model's
bounded-memory path, the golden single scan, and how the backend is chosen.

Without a GPU the kernels run under the Triton interpreter: every test sets ``TRITON_INTERPRET=1``
through monkeypatch (so the setting never leaks into other tests; `scan_triton` re-imports its kernels
when the setting changes). The interpreter costs a few ms per kernel statement, so CPU cases are small;
the per-position loop form is what the interpreter runs by default, and the GPU's tile form
(`tl.associative_scan`) is checked on tiny cases. On a CUDA machine the same tests compile for real.
Everything is compared in fp32: the kernels compute in fp32 whatever the input dtype (fp64 inputs too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import need_shared

GPU = torch.cuda.is_available()
if not GPU and "triton" not in sys.modules:
    # triton.jit picks interpreter or compiler when a function is defined, triton's own library (tl.sum)
    # included, so the interpreter must be on when triton is first imported. On only for that import:
    # the tests below switch it on again one by one (monkeypatch), so it does not leak into other tests.
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
    finally:
        if _before is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = _before
# The interpreter of triton < 3.9 fails on loops over run-time bounds with numpy >= 2.4 (int() of a
# 1-element array); compiled for a GPU, 3.6 works (checked with bench/triton_aot_check.py).
pytest.importorskip("triton", minversion=None if GPU else "3.9")

from fusion_cli.errors import FusionError  # noqa: E402
from fusion_cli.models import scan, scan_triton  # noqa: E402
from fusion_cli.models.fusionmamba import MultiScanMamba  # noqa: E402
from fusion_cli.models.scan import resolve_backend, selective_scan_reference  # noqa: E402
from fusion_cli.models.scan_triton import selective_scan_triton  # noqa: E402

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
DEVICE = "cuda" if GPU else "cpu"
FORMS = {"loop": {"loop": True}, "tile": {"loop": False, "chunk": 16, "block_d": 2}}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(
    b: int = 2,
    d: int = 8,
    groups: int = 2,
    n: int = 4,
    length: int = 67,
    grouped: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """fp32 scan arguments: u, delta, z `(b, d, L)`; A `(d, n)`; B, C `(b, G, n, L)` or `(b, n, L)`."""
    gen = torch.Generator().manual_seed(seed)
    bc = (b, groups, n, length) if grouped else (b, n, length)
    t = {
        "u": torch.randn(b, d, length, generator=gen),
        "delta": torch.randn(b, d, length, generator=gen) * 0.5,
        "A": -torch.exp(torch.randn(d, n, generator=gen)),
        "B": torch.randn(*bc, generator=gen),
        "C": torch.randn(*bc, generator=gen),
        "D": torch.randn(d, generator=gen),
        "z": torch.randn(b, d, length, generator=gen),
        "delta_bias": torch.randn(d, generator=gen) * 0.3,
    }
    return {k: v.to(DEVICE) for k, v in t.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to b's largest magnitude (plain difference when b is all zero)."""
    diff = float((a.float() - b.float()).abs().max())
    scale = float(b.float().abs().max())
    return diff / scale if scale > 0 else diff


def _fwd_bwd(fn, t: dict[str, torch.Tensor | None], **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the gradient of every tensor input under a non-trivial upstream gradient."""
    t = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in t.items()}
    y = fn(**t, **kw)
    w = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)
    (y.float() * w).sum().backward()
    return y.detach(), {k: v.grad for k, v in t.items() if v is not None}


# (case kwargs, drop these arguments, delta_softplus): grouped/ungrouped B and C, N no power of two,
# softplus on and off (with and without delta_bias), D and z absent.
FWD_CASES = {
    "grouped-softplus": ({}, (), True),
    "ungrouped-nosoftplus-bias": ({"grouped": False, "groups": 1, "n": 3}, ("D", "z"), False),
    # 3 channels per group: the channel block (4) is partly masked
    "softplus-nobias-noz": ({"length": 70, "d": 6, "groups": 2}, ("delta_bias", "z"), True),
}


@pytest.mark.parametrize("name", FWD_CASES)
def test_forward_matches_reference(name):
    kw, drop, softplus = FWD_CASES[name]
    t = _case(**kw)
    for k in drop:
        t[k] = None
    ref = selective_scan_reference(**t, delta_softplus=softplus)
    got = selective_scan_triton(**t, delta_softplus=softplus)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert _rel(got, ref) <= 1e-5


@pytest.mark.parametrize("name", ["grouped-softplus", "ungrouped-nosoftplus-bias"])
def test_gradients_match_reference(name):
    kw, drop, softplus = FWD_CASES[name]
    t = _case(**{**kw, "length": 37, "b": 1})
    for k in drop:
        t[k] = None
    y_ref, g_ref = _fwd_bwd(selective_scan_reference, t, delta_softplus=softplus)
    y, g = _fwd_bwd(selective_scan_triton, t, delta_softplus=softplus, chunk=16)  # 3 chunks, last short
    assert _rel(y, y_ref) <= 1e-5
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        assert g[k].shape == g_ref[k].shape, k
        assert _rel(g[k], g_ref[k]) <= 1e-5, k


@pytest.mark.parametrize(
    "kw",
    [
        {"b": 1, "d": 4, "groups": 2, "n": 2},
        # N = 3 padded to 4, 3 channels in blocks of 2, two batches
        {"b": 2, "d": 3, "groups": 1, "n": 3, "grouped": False},
    ],
)
def test_tile_form_matches_reference_forward_and_gradients(kw):
    """The GPU form (associative scan over (decay, value) tiles); tiny under the interpreter, whose
    custom-combine scan runs element by element."""
    t = _case(length=21, **kw)
    y_ref, g_ref = _fwd_bwd(selective_scan_reference, t, delta_softplus=True)
    y, g = _fwd_bwd(selective_scan_triton, t, delta_softplus=True, loop=False, chunk=8, block_d=2)
    assert _rel(y, y_ref) <= 1e-5
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) <= 1e-5, k


def test_backward_keeps_chunk_states_not_the_full_history():
    b, d, n, length = 1, 8, 4, 67
    t = {k: v.requires_grad_(True) for k, v in _case(b=b, d=d, n=n, length=length).items()}
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        selective_scan_triton(**t, delta_softplus=True, chunk=16)
    states = [s for s in saved if s.dim() == 4 and s.dtype == torch.float32 and s.shape[2:] == (d, n)]
    assert [tuple(s.shape) for s in states] == [(b, 5, d, n)]  # state entering each of 5 chunks
    assert max(s.numel() for s in saved) < b * d * n * length


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_inputs_accumulate_in_fp32(dtype, tol):
    """Half-precision inputs, read as they are: against the fp32 reference on the same rounded inputs
    only the rounding of the output remains (2^-8 for bf16, 2^-11 for fp16)."""
    t = _case(b=1, length=40)
    t16 = {k: v.to(dtype) for k, v in t.items()}
    ref = selective_scan_reference(**{k: v.float() for k, v in t16.items()}, delta_softplus=True)
    y, g = _fwd_bwd(selective_scan_triton, t16, delta_softplus=True)
    assert y.dtype == dtype and all(v.dtype == dtype for v in g.values())
    assert _rel(y, ref) <= tol
    assert all(torch.isfinite(v.float()).all() for v in g.values())


def test_bounded_memory_path_of_the_model():
    """MultiScanMamba with a scan memory floors delta itself and calls the scan with delta_softplus=False
    and no delta_bias, with B/C strided views of x_proj's output: same output and parameter gradients as
    the reference scan."""
    torch.manual_seed(0)
    # Initial steps lie in [1e-3, 0.1] and min |A| is 1: a floor of 1/100 holds some of them, not all.
    block = MultiScanMamba(4, 4, 3, 2, 4, memory=100.0).to(DEVICE)
    x = torch.randn(1, 20, 4, device=DEVICE)
    outs, grads = {}, {}
    for backend in ("reference", "triton"):
        block.scan_backend = backend
        block.zero_grad()
        y = block(x, hw=(4, 5))
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)).sum().backward()
        outs[backend] = y.detach()
        grads[backend] = {k: p.grad.clone() for k, p in block.named_parameters()}
    assert _rel(outs["triton"], outs["reference"]) <= 1e-5
    dt_grad = grads["reference"]["dt_proj.weight"].abs()
    assert 0 < int((dt_grad > 0).sum()) < dt_grad.numel()  # the floor holds some steps, not all
    for k, ref in grads["reference"].items():
        assert _rel(grads["triton"][k], ref) <= 1e-5, k


def test_golden_scan_case():
    data = np.load(need_shared("fusionmamba_official", "golden", "scan_case.npz"))
    g = {k: torch.from_numpy(data[k]).float().to(DEVICE) for k in data.files}
    y = selective_scan_triton(*(g[k] for k in ARGS), delta_softplus=True)
    np.testing.assert_allclose(y.cpu().numpy(), data["out_fp64"], rtol=1e-5, atol=1e-5)


def test_softplus_matches_torch_far_out():
    """Very negative and very positive delta: the kernel's softplus (log1p form, linear past 20)."""
    t = _case(b=1, d=2, groups=1, n=2, length=9, grouped=False)
    t["delta"] = torch.linspace(-30, 30, 18, device=DEVICE).reshape(1, 2, 9)
    t["delta_bias"] = None
    got = selective_scan_triton(**t, delta_softplus=True)
    ref = selective_scan_reference(**{**t, "delta": F.softplus(t["delta"])}, delta_softplus=False)
    assert _rel(got, ref) <= 1e-5


def test_package_imports_without_triton():
    """triton is imported on the first triton scan only: CPU installs do not need it."""
    code = (
        "import sys; import fusion_cli.models.scan, fusion_cli.models.fusionmamba, fusion_cli.cli.main; "
        "sys.exit('triton' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != scan.ENV_VAR}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


def test_dispatch_through_selective_scan(monkeypatch):
    monkeypatch.setenv(scan.ENV_VAR, "triton")
    t = _case(b=1, length=12)
    got = scan.selective_scan(**t, delta_softplus=True)
    assert _rel(got, selective_scan_reference(**t, delta_softplus=True)) <= 1e-5


def test_requested_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(FusionError, match="triton requested .* needs CUDA, or TRITON_INTERPRET=1") as err:
        resolve_backend("triton", "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(FusionError, match="needs CUDA tensors"):
        selective_scan_triton(**{k: v.cpu() for k, v in _case(b=1, length=4, d=2, groups=1).items()})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == ("triton", "requested by argument")
    assert resolve_backend(None, "cpu")[0] != "triton"  # never automatic on CPU


def test_automatic_on_cuda_after_mamba_ssm(monkeypatch):
    monkeypatch.setattr(scan, "_mamba_ssm_import", lambda: (None, "mamba_ssm is not importable"))
    name, reason = resolve_backend(None, "cuda")
    assert name == "triton" and "mamba_ssm is not importable" in reason
    monkeypatch.setattr(scan, "_mamba_ssm_import", lambda: (object(), "mamba_ssm imports"))
    assert resolve_backend(None, "cuda")[0] == "mamba_ssm"
    monkeypatch.setattr(scan_triton, "triton_import", lambda: (False, "triton is not importable (X)"))
    with pytest.raises(FusionError, match="triton requested .* triton is not importable"):
        resolve_backend("triton", "cuda")


@pytest.mark.skipif(GPU, reason="on a GPU the tests above compile and run the kernels for real")
def test_kernels_compile_for_sm90_without_spills():
    """The GPU (tile) form compiled ahead of time for an H100/H200 (triton's bundled ptxas, no GPU needed):
    catches what the interpreter cannot (types, layouts, scan lowering) and register spills of the
    launch settings the backend picks. In a subprocess: the kernels must be defined without the
    interpreter."""
    script = Path(__file__).resolve().parents[1] / "bench" / "triton_aot_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(script), "--dtypes", "fp32"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and rows, out.stdout + out.stderr[-2000:]
    for row in rows:
        assert "error" not in row, row
        if "registers" in row:  # absent only when no bundled ptxas accepts the PTX
            assert row["spill_bytes"] == 0, row
