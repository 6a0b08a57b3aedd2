"""The full-resolution terms of the training loss (fusion_cli/training/fullres.py) on the shipped
Landsat-8 example at its original resolution: the detail shortfall against the base, the spectral
consistency with the MS, and the loop's use of both (half of each batch, the validation objective)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import EX_DN, example_crop, tiny_ex

from fusion_cli.errors import FusionError
from fusion_cli.mtf import mtf_filter
from fusion_cli.sensors import nyquist_gains
from fusion_cli.training.data import reduce_scene
from fusion_cli.training.fullres import full_resolution_pairs, full_resolution_terms
from fusion_cli.training.loop import train, validation_objective

GAINS = list(nyquist_gains("landsat8", 6)[0])


@pytest.fixture(scope="module")
def full() -> list:
    """Two parts of the example at their original resolution with their GSA product."""
    return full_resolution_pairs([example_crop(0, 0, 64), example_crop(64, 96, 64)], "gsa", "landsat8")


def _batch(pair) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a))[None] for a in (pair.pan, pair.ms, pair.base))


def test_pairs_are_the_original_grids_in_network_units_with_the_base(full) -> None:
    s = example_crop(0, 0, 64)
    p = full[0]
    assert p.ratio == 2 and p.pan.shape == (1, 128, 128) and p.ms.shape == (6, 64, 64)
    np.testing.assert_allclose(p.pan * EX_DN, s.pan, rtol=1e-6)
    np.testing.assert_allclose(p.ms * EX_DN, s.ms, rtol=1e-6)
    assert p.base.shape == (6, 128, 128) and p.ref is p.base  # no reference at this scale
    # a scene whose PAN was synthesised on the MS grid has no original-resolution pair
    assert full_resolution_pairs([replace(s, ratio=1, simulated=True)], "gsa", "landsat8") == []


def test_detail_is_the_shortfall_of_pan_correlation_against_the_base(full) -> None:
    """The base itself and the sharpest product (the PAN in every band: HPC 1) fall short by nothing;
    the base blurred falls short, the more the blurrier."""
    pan, ms, base = _batch(full[0])
    _, detail = full_resolution_terms(base, pan, ms, base, GAINS, 2)
    assert float(detail) == 0.0
    sharpest = pan.expand(-1, 6, -1, -1)
    assert float(full_resolution_terms(sharpest, pan, ms, base, GAINS, 2)[1]) == 0.0
    soft = [
        float(full_resolution_terms(mtf_filter(base, [g] * 6, 2), pan, ms, base, GAINS, 2)[1])
        for g in (0.5, 0.2)
    ]
    assert 0.05 < soft[0] < soft[1], soft


def test_spectral_term_is_the_l1_of_the_degraded_product_against_the_ms(full) -> None:
    """GSA keeps the MS at its scale closely; a product offset by 1 % of full scale is off by that
    much (the term is an L1 of the degraded product minus the MS)."""
    pan, ms, base = _batch(full[0])
    spectral, _ = full_resolution_terms(base, pan, ms, base, GAINS, 2)
    shifted, _ = full_resolution_terms(base + 0.01, pan, ms, base, GAINS, 2)
    assert float(spectral) < 0.003
    assert abs(float(shifted) - 0.01) <= float(spectral) + 1e-7  # |e + 0.01| is 0.01 +- |e|
    assert float(shifted) > 3 * float(spectral)


def test_the_loop_trains_with_both_terms_and_picks_the_epoch_on_them(tmp_path: Path, full) -> None:
    train_p = [reduce_scene(example_crop(0, x, 80), 2) for x in (0, 80)]
    val_p = [reduce_scene(example_crop(80, 0, 64), 2)]
    cfg = tiny_ex(base="gsa", sensor="landsat8", full_res_weight=1.0, detail_weight=0.1, epochs=2)
    res = train(train_p, val_p, cfg, tmp_path, full_pairs=full[:1], full_val_pairs=full[1:])
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 4, 8]
    for rec in log:
        assert rec["full_spectral"] > 0 and rec["full_detail"] >= 0
    objective = [validation_objective(r, 0.0, 1.0, 0.1) for r in log]
    best = log[int(np.argmin(objective))]
    assert res.best_epoch == best["epoch"] and res.val["full_detail"] == best["full_detail"]
    assert validation_objective(log[0], 0.0, 1.0, 0.1) == pytest.approx(
        log[0]["val_l1"] + log[0]["full_spectral"] + 0.1 * log[0]["full_detail"]
    )


def test_the_terms_need_a_base_and_the_scenes(full, tmp_path: Path) -> None:
    with pytest.raises(FusionError, match="--full-res-weight must be 0 or more"):
        tiny_ex(base="gsa", full_res_weight=-1.0)
    cfg = tiny_ex(base="gsa", sensor="landsat8", detail_weight=0.1)
    with pytest.raises(FusionError, match="original resolution"):
        train([reduce_scene(example_crop(0, 0, 80), 2)], [], cfg, tmp_path)
    with pytest.raises(FusionError, match="need a base method"):
        train([reduce_scene(example_crop(0, 0, 80), 2)], [], tiny_ex(detail_weight=0.1), tmp_path)


def test_fusion_train_takes_the_full_resolution_weights(tmp_path: Path) -> None:
    """`fusion train --base gsa --full-res-weight 1 --detail-weight 0.1` trains with both terms on the
    folder's scenes at their original resolution (the log scores them); without a base it is a
    one-line error, exit 2."""
    from conftest import EXAMPLE_MS, EXAMPLE_PAN
    from test_training import _write_crop

    from fusion_cli.cli.main import main

    data = tmp_path / "scenes"
    data.mkdir()
    for i, col in ((2, 0), (9, 160)):
        _write_crop(EXAMPLE_MS, data / f"{i}_ms.tif", 56, 56, 0, col)
        _write_crop(EXAMPLE_PAN, data / f"{i}_pan.tif", 112, 112, 0, 2 * col)
    args = ["train", str(data), "--ratio", "2", "--sensor", "landsat8", "--dim", "4", "--patch", "32"]
    args += ["--batch", "2", "--epochs", "1", "--steps-per-epoch", "2", "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main(
            [
                *args,
                "-o",
                str(tmp_path / "run"),
                "--base",
                "gsa",
                "--full-res-weight",
                "1",
                "--detail-weight",
                "0.1",
            ]
        )
    assert exc.value.code == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["full_spectral"] > 0 and "full_detail" in log[-1]
    # the card says which loss made the weights
    (card,) = [json.loads(p.read_text()) for p in (tmp_path / "run").glob("*.json")]
    loss = card["training"]["loss"]
    assert loss.startswith("L1 + 1 * full-resolution spectral") and "0.1 * full-resolution detail" in loss
    with pytest.raises(SystemExit) as exc:
        main([*args, "-o", str(tmp_path / "run2"), "--detail-weight", "0.1"])
    assert exc.value.code == 2
