"""Target-adaptive fine-tuning: a few training steps on the scene about to be fused.

The idea of target-adaptive PNN (Scarpa et al., TGRS 2018): the input scene itself, reduced once more
by Wald's protocol, is a training pair whose target (the input MS) is real. N steps of L1 training on
it adapt the network to the sensor, the season and the radiometry of this scene before it fuses the
scene at full resolution. No ground truth is needed, so a user with a sensor that no shipped model
covers still gets a network-quality product.

`adapt_model` works on arrays; the pipeline's `--adapt N` calls `adapt_fuser` with a window of the
scene it is fusing.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fusion_cli.errors import FusionError
from fusion_cli.fusers import Fuser
from fusion_cli.models.fuser import NetworkFuser
from fusion_cli.training.data import PatchSampler, Scene, attach_base, reduce_scene
from fusion_cli.training.validation import model_base


@dataclass
class AdaptReport:
    steps: int
    seconds: float
    loss_first: float  # mean L1 of the first 10% of the steps (network units)
    loss_last: float  # mean L1 of the last 10%
    window: tuple[int, int]  # PAN rows, cols of the scene part used


def adapt_model(
    model: nn.Module,
    pan: np.ndarray,
    ms: np.ndarray,
    *,
    ratio: int,
    dn_max: float,
    steps: int,
    sensor: str | None = None,
    task: str = "pansharpening",
    lr: float = 1e-4,
    batch: int = 8,
    patch: int | None = None,
    max_side: int = 1024,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[nn.Module, AdaptReport]:
    """Fine-tune a copy of `model` on the scene itself at reduced resolution.

    pan `(P, H, W)` and ms `(C, H/ratio, W/ratio)` are the scene's inputs in DN, area-aligned. The
    central part of the scene (at most `max_side` PAN px a side) is reduced by `ratio` with the
    shared Wald degradation; random patches of it train the copy for `steps` Adam steps (L1, `lr`).
    The original model is left untouched. Returns the adapted copy (eval mode) and a report.
    """
    if steps < 1:
        raise FusionError(f"--adapt needs a positive number of steps, got {steps}")
    pan = np.asarray(pan, dtype=np.float32)
    ms = np.asarray(ms, dtype=np.float32)
    if pan.ndim == 2:
        pan = pan[None]
    h_side = min(ms.shape[1], max_side // ratio)
    w_side = min(ms.shape[2], max_side // ratio)
    y0, x0 = (ms.shape[1] - h_side) // 2, (ms.shape[2] - w_side) // 2
    ms_c = ms[:, y0 : y0 + h_side, x0 : x0 + w_side]
    pan_c = pan[:, y0 * ratio : (y0 + h_side) * ratio, x0 * ratio : (x0 + w_side) * ratio]
    scene = Scene(name="adapt", pan=pan_c, ms=ms_c, ratio=ratio, dn_max=dn_max, sensor=sensor)
    pair = reduce_scene(scene, ratio, task)
    method = model_base(model)
    if method is not None:
        pair = attach_base([pair], method, sensor)[0]
    m = math.lcm(4, ratio)
    side = min(pair.ref.shape[1], pair.ref.shape[2])
    patch = patch or min(64 // m * m or m, side // m * m)
    if patch < m:
        raise FusionError(
            f"scene too small to adapt on: its reduced size {side} px is below one {m}-px patch"
        )
    dev = torch.device(device)
    adapted = copy.deepcopy(model).to(dev).train()
    sampler = PatchSampler([pair], patch, device=dev, seed=seed)
    opt = torch.optim.Adam(adapted.parameters(), lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    # seeded for a reproducible adaptation, in a fork: the caller's random stream goes on untouched
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(steps):
            p, s, r, b = sampler.batch(batch)
            loss = torch.nn.functional.l1_loss(adapted(s, p, base=b), r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    k = max(1, steps // 10)
    report = AdaptReport(
        steps=steps,
        seconds=time.perf_counter() - t0,
        loss_first=float(np.mean(losses[:k])),
        loss_last=float(np.mean(losses[-k:])),
        window=(pan_c.shape[1], pan_c.shape[2]),
    )
    return adapted.eval(), report


def adapt_fuser(
    fuser: Fuser,
    pan: np.ndarray,
    ms: np.ndarray,
    steps: int,
    *,
    sensor: str | None = None,
    lr: float = 1e-4,
    batch: int = 8,
    max_side: int = 1024,
    seed: int = 0,
) -> AdaptReport:
    """`--adapt N` for the pipeline: adapt a network fuser's model on a window of the scene it is
    about to fuse (pan `(P, H, W)`, ms `(C, H/r, W/r)` in DN, area-aligned, nodata already filled),
    and swap the adapted copy in. Classical methods have nothing to adapt: a clear error."""
    if not isinstance(fuser, NetworkFuser):
        raise FusionError("--adapt applies to network models only, not to classical --method fusers")
    model, task, dn_max, device = fuser.model, fuser.card.task, float(fuser.dn_max), fuser.device
    adapted, report = adapt_model(
        model,
        pan,
        ms,
        ratio=int(fuser.ratio),
        dn_max=dn_max,
        steps=steps,
        sensor=sensor,
        task="pansharpening" if task == "hisr" else task,  # the MSI is reduced like a PAN here
        lr=lr,
        batch=batch,
        max_side=max_side,
        device=device,
        seed=seed,
    )
    fuser.model = adapted
    return report
