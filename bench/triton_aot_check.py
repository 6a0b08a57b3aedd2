"""Compile the triton scan kernels for a GPU that is not there (default sm_90: H100/H200) and report the
registers and spills ptxas gives them, for the launch settings the backend picks.

No GPU and no driver needed: triton builds the PTX, its bundled ptxas assembles it. This catches
compile errors and register spills on a CPU-only machine, before a device run. Run it without
TRITON_INTERPRET (the kernels must be defined for the compiler):

    python bench/triton_aot_check.py            # JSON lines, one per kernel and configuration
    python bench/triton_aot_check.py --arch 100

Exit status 1 if a kernel fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusion_cli.models import _scan_triton_kernels as kernels  # noqa: E402
from fusion_cli.models.scan_triton import choose_blocks  # noqa: E402

# (label, batch, groups, channels per group, d_state, length): the bench shape and a training batch.
SHAPES = [
    ("bench L=65536 B=1 D=128 G=4 N=8", 1, 4, 32, 8, 65536),
    ("bench N=16", 1, 4, 32, 16, 65536),
    ("train 64x64 B=16 D=128 G=4 N=8", 16, 4, 32, 8, 4096),
]


def _signature(fn, constexprs: dict, dtype: str) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            # Sequence tensors in the input dtype; states, partial sums and per-channel vectors in fp32.
            fp32 = name.startswith(("states", "dA", "dD", "dbias", "dB", "dC", "scratch", "A_", "D_", "bias"))
            sig[name] = "*fp32" if fp32 else f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_report(ptx: str, arch: int) -> dict[str, int] | str:
    """Registers and spill bytes from the first bundled ptxas that accepts this PTX version."""
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        errors = []
        for exe in ("ptxas", "ptxas-blackwell"):
            if not (bindir / exe).exists():
                continue
            gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            out = subprocess.run(
                [str(bindir / exe), "-v", "--gpu-name", gpu, f.name, "-o", os.devnull],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0:
                regs = re.search(r"Used (\d+) registers", out.stderr)
                spill = re.search(r"(\d+) bytes spill stores", out.stderr)
                return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": int(spill.group(1))}
            errors.append(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else exe)
        return "ptxas unavailable: " + "; ".join(errors)
    finally:
        os.unlink(f.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, b, g, h, n, length in SHAPES:
        block_d, block_n, chunk = choose_blocks(b, g, h, n, length, loop=False)
        for dtype in args.dtypes.split(","):
            for fn, warps, extra in (
                (kernels.scan_fwd_kernel, 4, {"STORE_STATES": True}),
                (kernels.scan_bwd_kernel, 8, {}),
            ):
                constexprs = dict(
                    G=g, H=h, N=n, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, LOOP=False,
                    BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, **extra,
                )  # fmt: skip
                row = {"shape": label, "kernel": fn.__name__, "dtype": dtype, "arch": args.arch}
                row.update(block_d=block_d, chunk=chunk, num_warps=warps)
                t0 = time.perf_counter()
                try:
                    # positional: the keyword was `constants` before triton 3.3
                    src = ASTSource(fn, _signature(fn, constexprs, dtype), constexprs)
                    compiled = triton.compile(src, target=target, options={"num_warps": warps})
                except Exception as exc:
                    failed += 1
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                else:
                    row["compile_s"] = round(time.perf_counter() - t0, 2)
                    report = _ptxas_report(compiled.asm["ptx"], args.arch)
                    row.update(report if isinstance(report, dict) else {"ptxas": report})
                print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
