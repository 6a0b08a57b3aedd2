"""Device check for `fusion batch` (run on a GPU machine): one network instance (random FusionMamba
weights, WV3-like 8 bands, ratio 4) over N synthetic scenes, one at a time vs two in flight
(`--scene-workers 2`): throughput, bit equality of the outputs, and a resumed run that skips all.

    python bench/bench_batch_gpu.py /tmp/dc 4 1024 cuda

H100 (2026-11-26, pure-PyTorch scan): 0.049 PAN Mpx/s with 1 in flight, 0.040 with 2; max diff 0 DN.
"""

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

from fusion_cli import batch
from fusion_cli.cli.main import bound_heap
from fusion_cli.models.fusionmamba import FusionMamba, FusionMambaConfig
from fusion_cli.pipeline import FuseOptions

warnings.filterwarnings("ignore")
root, n, side, device = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
root.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
wpath = root / "rand_wv3.pth"  # random weights: speed and plumbing only, no shared checkpoint
torch.save(FusionMamba(FusionMambaConfig(ms_bands=8)).state_dict(), wpath)
rng = np.random.default_rng(0)
ind = root / "in"
ind.mkdir(exist_ok=True)
for k in range(n + 1):
    lo = side // 4
    base = rng.normal(size=(8, lo // 8, lo // 8)).repeat(8, 1).repeat(8, 2)
    ms = np.clip(600 + 300 * base + rng.normal(0, 20, (8, lo, lo)), 1, 2047).astype("uint16")
    pan = np.clip(ms.mean(0).repeat(4, 0).repeat(4, 1) + rng.normal(0, 30, (side, side)), 1, 2047).astype(
        "uint16"
    )
    common = dict(driver="GTiff", crs="EPSG:32631", tiled=True, compress="deflate")
    name = "warm" if k == n else f"s{k}"
    with rasterio.open(
        ind / f"{name}_ms.tif",
        "w",
        width=lo,
        height=lo,
        count=8,
        dtype="uint16",
        transform=from_origin(500000, 5700000, 1.2, 1.2),
        **common,
    ) as d:
        d.write(ms)
    with rasterio.open(
        ind / f"{name}_pan.tif",
        "w",
        width=side,
        height=side,
        count=1,
        dtype="uint16",
        transform=from_origin(500000, 5700000, 0.3, 0.3),
        **common,
    ) as d:
        d.write(pan[None])
bound_heap()  # as the `fusion` entry point does
opts = FuseOptions(batch=8, measure_shift=False)
job = batch.FuseJob({"weights": str(wpath), "device": device}, opts)
t0 = time.perf_counter()
process = batch.make_scene_processor(job)  # the one model instance
res = {
    "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
    "scenes": n,
    "pan_side": side,
    "model_load_s": round(time.perf_counter() - t0, 2),
}
full = batch.pair_by_patterns(ind, root / "warm_out")
warm = batch.Plan([s for s in full.scenes if s.id == "warm"])
s = batch.run_batch(warm, process)
res["warmup_s"] = round(s.seconds, 2)
print(json.dumps(res), flush=True)
assert s.done == 1, s.results
outs = {}
for sw in (1, 2):
    plan = batch.pair_by_patterns(ind, root / f"out{sw}")
    plan.scenes = [x for x in plan.scenes if x.id != "warm"]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    s = batch.run_batch(plan, process, scene_workers=sw)
    assert s.done == n, [r.reason for r in s.results if r.status == "failed"]
    res[f"scene_workers={sw}"] = {"seconds": round(s.seconds, 2), "pan_mpx_per_s": round(s.mpx_per_s, 3)}
    outs[sw] = plan
    print(json.dumps(res), flush=True)
diffs = []
for a, b in zip(outs[1].scenes, outs[2].scenes, strict=True):
    with rasterio.open(a.out) as x, rasterio.open(b.out) as y:
        diffs.append(int(np.abs(x.read().astype(np.int32) - y.read().astype(np.int32)).max()))
res["max_abs_dn_diff_sw1_vs_sw2"] = max(diffs)
s = batch.run_batch(outs[1], process)
res["resume_skipped"] = s.skipped
print(json.dumps(res, indent=2))
