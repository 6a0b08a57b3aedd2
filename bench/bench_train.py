"""Training step time on the CPU (the shipped recipes' network shapes, random data of the same shape):
`hyperion_hisr` (d = 16, 47 + 6 bands, ratio 3, 48-px patches, batch 16) and `landsat` (d = 8, 6 + 1
bands, ratio 2, 64-px patches, batch 8), Adam and the L1 loss as the training loop runs them, each in a
fresh process under the entry point's OpenMP setting (idle threads spin 1,000 times, then sleep) and
under the earlier one (OMP_WAIT_POLICY=PASSIVE: they sleep at once). Two warm-up steps (the kernels'
compilation or cache load), then the mean of six; the 2048^2 matmul rate of the same run beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

# The entry point's process settings (share_cores fills only what the environment leaves unset), then
# the training loop's network, loss and optimiser on random patches.
CHILD = r"""
import json, sys, time
from fusion_cli.cli.main import bound_heap, share_cores
bound_heap()
share_cores()
import torch
from fusion_cli.training.loop import TrainConfig, build_model, training_loss
ms_bands, pan_bands, ratio, dim, patch, batch = (int(v) for v in sys.argv[1:7])
torch.manual_seed(0)
model = build_model(TrainConfig(ratio=ratio, dim=dim, patch=patch, batch=batch), ms_bands, pan_bands)
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
pan = torch.rand(batch, pan_bands, patch, patch)
ms = torch.rand(batch, ms_bands, patch // ratio, patch // ratio)
ref = torch.rand(batch, ms_bands, patch, patch)

def step():
    loss = training_loss(model(ms, pan), ref)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

for _ in range(2):
    step()
t, c = time.perf_counter(), time.process_time()
for _ in range(6):
    step()
print(json.dumps({"wall": (time.perf_counter() - t) / 6, "cpu": (time.process_time() - c) / 6}))
"""

SHAPES = {
    "hyperion_hisr": (47, 6, 3, 16, 48, 16),
    "landsat": (6, 1, 2, 8, 64, 8),
}
SETTINGS = {
    "entry point (GOMP_SPINCOUNT=1000)": {},
    "OMP_WAIT_POLICY=PASSIVE (before)": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def _step(shape: tuple[int, ...], env_extra: dict[str, str]) -> dict[str, float]:
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    env = {k: v for k, v in os.environ.items() if k not in names} | env_extra
    cmd = [sys.executable, "-c", CHILD, *map(str, shape)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run() -> list[dict[str, Any]]:
    from bench_scan import bench_matmul

    rows: list[dict[str, Any]] = [bench_matmul()]
    for name, shape in SHAPES.items():
        for setting, env in SETTINGS.items():
            t = _step(shape, env)
            batch = shape[5]
            rows.append({
                "bench": f"train step {name}",
                "openmp": setting,
                "s/step": round(t["wall"], 3),
                "CPU-s/step": round(t["cpu"], 3),
                "patches/s": round(batch / t["wall"], 2),
            })  # fmt: skip
    return rows
