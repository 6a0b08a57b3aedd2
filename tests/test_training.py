"""fusion train, target-adaptive fine-tuning and the recipes, on real Landsat-7 FuseBox pairs.

Networks here are tiny (width 4) and runs are a few steps on small crops so the file stays fast on
two cores; what is asserted is behaviour: the validation loss falls, a resumed run reproduces an
uninterrupted one exactly, the exported card loads, a band mismatch fails clearly, adaptation lowers
the reduced-resolution ERGAS of a held-out scene.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_MS, EXAMPLE_PAN, need_shared, shared_or_named_alike

from fusion_cli.errors import FusionError
from fusion_cli.training.data import (
    PatchSampler,
    Scene,
    TrainPair,
    attach_base,
    compensate_shift,
    find_pairs,
    load_h5,
    load_scene,
    read_raster,
    reduce_scene,
)
from fusion_cli.training.loop import TrainConfig, build_model, train
from fusion_cli.training.validation import evaluate_pairs

ORDER = [2, 1, 0, 3, 4, 5]  # FuseBox red, green, blue, ... -> blue, green, red, ...


def fusebox(i: int, ms_size: int = 80, y: int = 100, x: int = 100) -> Scene:
    """Pair i of the FuseBox set, shift-compensated, bands reordered, cropped to ms_size MS px."""
    d = need_shared("landsat7_etm_fusebox")
    s = load_scene(d / f"{i}_pan.tif", d / f"{i}_ms.tif", ratio=2, sensor="landsat7", pan_shift=(-1, -1))
    s = s.select_bands(ORDER)
    return replace(
        s,
        ms=s.ms[:, y : y + ms_size, x : x + ms_size],
        pan=s.pan[:, 2 * y : 2 * (y + ms_size), 2 * x : 2 * (x + ms_size)],
    )


@pytest.fixture(scope="module")
def pairs() -> dict[str, list[TrainPair]]:
    # Train on two path/rows, validate on a third, adapt/test on a fourth: split by scene.
    train_p = [reduce_scene(fusebox(i), 2) for i in (1, 8)]
    val_p = [reduce_scene(fusebox(14, 64), 2)]
    test_p = [reduce_scene(fusebox(20, 96, 150, 150), 2)]
    return {"train": train_p, "val": val_p, "test": test_p}


EX_DN = 65535.0  # the shipped example is uint16


def example_crop(y: int, x: int, ms_size: int) -> Scene:
    """The shipped Landsat-8 example (ratio 2, bands blue .. SWIR2) cropped to ms_size MS px at (y, x)."""
    s = load_scene(EXAMPLE_PAN, EXAMPLE_MS, ratio=2, sensor="landsat8")
    return replace(
        s,
        ms=s.ms[:, y : y + ms_size, x : x + ms_size],
        pan=s.pan[:, 2 * y : 2 * (y + ms_size), 2 * x : 2 * (x + ms_size)],
    )


@pytest.fixture(scope="module")
def ex_pairs() -> dict[str, list[TrainPair]]:
    """Wald pairs from disjoint parts of the shipped example scene, for the tests of the data's and
    the loop's mechanics (pair and patch alignment, resume, export, progress, errors), which hold on
    any data and so run on a fresh clone; what the network learns is judged on the FuseBox scenes
    above."""
    train_p = [reduce_scene(example_crop(0, x, 80), 2) for x in (0, 80)]
    return {
        "train": train_p,
        "val": [reduce_scene(example_crop(80, 0, 64), 2)],
        "test": [reduce_scene(example_crop(64, 160, 96), 2)],
    }


def tiny_ex(**kw: object) -> TrainConfig:
    return tiny(**{"dn_max": EX_DN, **kw})


def tiny(**kw: object) -> TrainConfig:
    base = dict(
        ratio=2, dim=4, patch=32, batch=4, lr=2e-3, epochs=3, steps_per_epoch=4, val_crop=64, dn_max=255.0
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


CARD = {
    "name": "tiny_landsat",
    "task": "pansharpening",
    "description": "test model",
    "sensor": "landsat7",
    "bands": ["blue", "green", "red", "NIR", "SWIR1", "SWIR2"],
    "pan_bands": ["PAN"],
    "ratio": 2,
    "dn_max": 255.0,
    "licence": "MIT",
    "training": {"data": [{"role": "train", "source": "landsat7_etm_fusebox", "licence": "public domain"}]},
}
EX_CARD = dict(
    CARD,
    sensor="landsat8",
    dn_max=EX_DN,
    training={"data": [{"role": "train", "source": "examples/landsat8_*.tif", "licence": "public domain"}]},
)


# ------------------------------------------------------------------------------------------ data side


def test_fusebox_shift_compensation_aligns_pan_with_ms() -> None:
    """The FuseBox PAN sits one PAN pixel up-left; after compensation the PAN correlates best with
    the MS intensity at zero shift (and before it, at the documented (-1, -1))."""
    d = need_shared("landsat7_etm_fusebox")
    raw = load_scene(d / "3_pan.tif", d / "3_ms.tif", ratio=2)
    fixed = compensate_shift(raw, (-1.0, -1.0))

    def best_shift(s: Scene) -> tuple[int, int]:
        # MS intensity on the PAN grid vs the PAN, both low-passed by 2x2 means, integer search.
        inten = np.kron(s.ms[:3].mean(0), np.ones((2, 2)))
        pan = s.pan[0]
        c = 8
        scores = {}
        for dy in (-2, -1, 0, 1):
            for dx in (-2, -1, 0, 1):
                a = inten[c:-c, c:-c]
                b = pan[c + dy : pan.shape[0] - c + dy, c + dx : pan.shape[1] - c + dx]
                scores[(dy, dx)] = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        return max(scores, key=scores.get)

    assert best_shift(raw) == (-1, -1)
    assert best_shift(fixed) == (0, 0)
    assert fixed.pan.shape[1:] == (2 * fixed.ms.shape[1], 2 * fixed.ms.shape[2])


def test_wald_pairs_and_patches_stay_aligned(ex_pairs: dict[str, list[TrainPair]]) -> None:
    p = ex_pairs["train"][0]
    assert p.pan.shape == (1, 80, 80) and p.ms.shape == (6, 40, 40) and p.ref.shape == (6, 80, 80)
    # The target is the original MS (cropped), in network units.
    ref_dn = example_crop(0, 0, 80).ms / EX_DN
    np.testing.assert_allclose(p.ref, ref_dn, atol=1e-6)
    sampler = PatchSampler([p], 32, seed=3)
    pan, ms, ref, base = sampler.batch(8)
    assert pan.shape == (8, 1, 32, 32) and ms.shape == (8, 6, 16, 16) and ref.shape == (8, 6, 32, 32)
    assert base is None  # the pairs carry no classical base
    # Augmentation rotates/flips the three crops together: the reduced MS stays the low-pass of ref.
    lp = torch.nn.functional.avg_pool2d(ref, 2)
    err = (lp - ms).abs().mean().item()
    shuffled = (lp - ms.roll(1, dims=0)).abs().mean().item()
    assert err < 0.5 * shuffled


def test_base_method_pairs_sampler_and_fresh_model(pairs: dict[str, list[TrainPair]]) -> None:
    """A model with a classical base: the pair's base is that method's product (cropped with the
    other crops), and a fresh network outputs exactly its base, so training starts from it."""
    from fusion_cli.classical import make_method
    from fusion_cli.metrics import ergas

    p = attach_base(pairs["train"][:1], "bdsd-pc", "landsat7")[0]
    pan_t, ms_t = torch.from_numpy(p.pan)[None], torch.from_numpy(p.ms)[None]
    direct = make_method("bdsd-pc", 2, sensor="landsat7").fit(pan_t, ms_t).fuse(pan_t, ms_t)[0].numpy()
    np.testing.assert_allclose(p.base, direct, atol=1e-6)
    # BDSD-PC beats plain interpolation on this real pair: the base carries PAN detail.
    exp = make_method("exp", 2).fuse(pan_t, ms_t)[0].numpy()
    assert ergas(p.ref * 255, p.base * 255, 2) < 0.9 * ergas(p.ref * 255, exp * 255, 2)

    pan, ms, ref, base = PatchSampler([p], 32, seed=3).batch(8)
    assert base is not None and base.shape == ref.shape
    shuffled = (base.roll(1, dims=0) - ref).abs().mean()
    assert (base - ref).abs().mean() < 0.5 * shuffled  # rotated and flipped with the ref

    model = build_model(tiny(base="bdsd-pc"), 6, 1).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ms, pan, base=base), base)
        with pytest.raises(FusionError, match="bdsd-pc product"):
            model(ms, pan)
    plain = build_model(tiny(), 6, 1)
    with pytest.raises(FusionError, match="no `base`"):
        plain(ms, pan, base=base)


def test_hyperion_pan_training_data_simulated_aviris_and_thin_validation_part() -> None:
    """The hyperion_pan recipe's data: Paris rows split train / validation / test without overlap; the
    ALI PAN is a linear mix of Hyperion VNIR bands (a fit on the training rows predicts the PAN of the
    other rows); AVIRIS resampled to the Hyperion bands becomes a simulated scene whose pair keeps
    its PAN on the reference grid; the thin validation part is validated across its whole width."""
    from fusion_cli.training.data import validation_crops
    from recipes.train_recipes import (
        _wavelengths,
        fit_pan_response,
        hyperion_pan_scenes,
        resample_spectra,
        synthesise_pan,
    )

    need_shared("aviris_indian_pines", "hs.tif")
    paris = need_shared("eo1_hyperion_ali_paris", "hs.tif")
    root = paris.parent.parent
    splits = hyperion_pan_scenes(root)
    (train_rows, aviris), (val_rows,), (test_rows,) = splits.train, splits.val, splits.test
    parts = (train_rows, val_rows, test_rows)
    assert [p.ms.shape[1] for p in parts] == [36, 12, 24] and [p.pan.shape[1] for p in parts] == [108, 36, 72]
    np.testing.assert_array_equal(np.concatenate([p.ms for p in parts], 1), read_raster(paris))  # a partition

    # PAN response: fitted on the training rows, it explains the PAN of the held-out rows.
    wl = _wavelengths(paris)
    response = fit_pan_response(train_rows, wl < 1000)
    held = replace(train_rows, ms=np.concatenate([val_rows.ms, test_rows.ms], 1))
    held_pan = np.concatenate([val_rows.pan, test_rows.pan], 1)[0]
    h, w = held.ms.shape[1:]
    truth = held_pan[: 3 * h, : 3 * w].reshape(h, 3, w, 3).mean(axis=(1, 3))
    predicted = synthesise_pan(held.ms, response)[0]
    r2 = 1 - np.var(truth - predicted) / np.var(truth)
    assert r2 > 0.8, r2  # 0.84 measured: the fit generalises across the scene
    assert np.all(response[np.flatnonzero(wl >= 1000)] == 0)
    # interpolating a cube to its own band centres returns it
    np.testing.assert_allclose(resample_spectra(test_rows.ms, wl, wl), test_rows.ms, rtol=1e-6)

    assert aviris.simulated and aviris.ratio == 1 and aviris.ms.shape == (128, 145, 145)
    assert aviris.pan.shape == (1, 145, 145) and "CC BY 3.0" in aviris.licence
    np.testing.assert_allclose(aviris.ms.mean(axis=(1, 2)), train_rows.ms.mean(axis=(1, 2)), rtol=1e-4)
    pair = reduce_scene(aviris, 3, "hs-pansharpening")
    assert pair.ref.shape == (128, 144, 144) and pair.ms.shape == (128, 48, 48)
    np.testing.assert_array_equal(pair.pan, aviris.pan[:, :144, :144])
    with pytest.raises(FusionError, match="simulated scene .* one grid"):
        reduce_scene(replace(aviris, ratio=3), 3, "hs-pansharpening")

    # cross-validation folds: each test third is disjoint from its fold's training and validation
    # rows (the row ranges partition part of the cube), fold 2 is the shipped split
    from recipes.train_recipes import HYPERION_PAN_FOLDS, hyperion_pan_fold

    for fold, (train_ranges, val_range, test_range) in enumerate(HYPERION_PAN_FOLDS):
        used = [r for a, b in [*train_ranges, val_range, test_range] for r in range(a, b)]
        assert len(used) == len(set(used)) and len(range(*test_range)) == 24
        s = hyperion_pan_fold(root, fold)
        assert s.test[0].ms.shape[1] == 24 and s.train[-1].simulated
        np.testing.assert_array_equal(s.test[0].ms, read_raster(paris)[:, slice(*test_range)])
    np.testing.assert_array_equal(hyperion_pan_fold(root, 2).val[0].ms, val_rows.ms)
    with pytest.raises(FusionError, match="--fold must be 0 to 2"):
        hyperion_pan_fold(root, 3)

    val = reduce_scene(val_rows, 3, "hs-pansharpening")  # ref (128, 12, 57)
    crops = validation_crops([val], 48, 2)
    assert [c.ref.shape for c in crops] == [(128, 12, 48)] * 2
    assert [c.ms.shape for c in crops] == [(128, 4, 16)] * 2
    assert {c.name.rsplit("@", 1)[1] for c in crops} == {"0,0", "0,9"}  # together: all 57 columns
    np.testing.assert_array_equal(crops[1].ref, val.ref[:, :, 9:57])


def test_find_pairs_names_and_errors(tmp_path: Path) -> None:
    """The shared FuseBox and SpaceNet-6 folders (without ../shared, empty files named alike: pairs
    are found by name) in natural order, and an empty folder refused."""
    d = shared_or_named_alike("landsat7_etm_fusebox", tmp_path / "named")
    found = find_pairs(d)
    assert len(found) == 30 and found[0] == (d / "1_pan.tif", d / "1_ms.tif")
    assert found[9] == (d / "10_pan.tif", d / "10_ms.tif")
    wv2 = find_pairs(shared_or_named_alike("wv2_spacenet6", tmp_path / "named"))
    assert [p.name for p, _ in wv2] == ["pan_1.tif", "pan_2.tif"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FusionError, match="no pansharpening pairs"):
        find_pairs(empty)


def test_hdf5_pancollection_layout(tmp_path: Path, ex_pairs: dict[str, list[TrainPair]]) -> None:
    import h5py

    p = ex_pairs["train"][0]
    gt = np.stack([p.ref[:, :32, :32], p.ref[:, 32:64, 32:64]]) * 2047
    ms = np.stack([p.ms[:, :16, :16], p.ms[:, 16:32, 16:32]]) * 2047
    pan = np.stack([p.pan[:, :32, :32], p.pan[:, 32:64, 32:64]]) * 2047
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["GT"], f["MS"], f["PAN"], f["LMS"] = gt, ms, pan, gt
    got = load_h5(tmp_path / "train.h5", 2047.0)
    assert len(got) == 2 and got[1].ratio == 2
    np.testing.assert_allclose(got[1].ref, p.ref[:, 32:64, 32:64], atol=1e-5)
    with pytest.raises(FusionError, match="ratio-2"):
        load_h5(tmp_path / "train.h5", 2047.0, ratio=4)
    # trained from HDF5 with an HDF5 --val: the card lists both files (the validation one was left out)
    from fusion_cli.training.api import train_from_inputs

    with h5py.File(tmp_path / "valid.h5", "w") as f:  # another patch: validation is not training data
        vgt = p.ref[None, :, :32, 32:64] * 2047
        f["GT"], f["MS"], f["PAN"], f["LMS"] = (
            vgt,
            p.ms[None, :, :16, 16:32] * 2047,
            p.pan[None, :, :32, 32:64] * 2047,
            vgt,
        )
    config = TrainConfig(ratio=2, dim=4, patch=16, batch=2, epochs=1, steps_per_epoch=1, val_crop=16)
    train_from_inputs([tmp_path / "train.h5"], tmp_path / "run", name="h5", config=config,
                      val_inputs=[tmp_path / "valid.h5"], dn_max=2047.0)  # fmt: skip
    card = json.loads((tmp_path / "run" / "h5.json").read_text())
    roles = {(d["role"], Path(d["scene"]).name) for d in card["training"]["data"]}
    assert roles == {("train", "train.h5"), ("validation", "valid.h5")}
    # the weights are as readable as their card (safetensors' save_file made them owner-only, 0600)
    modes = [
        (tmp_path / "run" / f"h5{suffix}").stat().st_mode & 0o777 for suffix in (".safetensors", ".json")
    ]
    assert modes[0] == modes[1] and modes[0] & 0o044, [oct(m) for m in modes]
    # an HDF5 split whose validation patches overlap its training patches (as published splits cut
    # from the same images may) trains, saying so; scenes that overlap are refused
    with h5py.File(tmp_path / "overlapping.h5", "w") as f:
        vgt = p.ref[None, :, 16:48, 16:48] * 2047
        f["GT"], f["MS"], f["PAN"], f["LMS"] = (
            vgt,
            p.ms[None, :, 8:24, 8:24] * 2047,
            p.pan[None, :, 16:48, 16:48] * 2047,
            vgt,
        )
    with pytest.warns(UserWarning, match=r"validation shares pixels with training data \(overlapping#0 at"):
        train_from_inputs([tmp_path / "train.h5"], tmp_path / "run2", name="h5", config=config,
                          val_inputs=[tmp_path / "overlapping.h5"], dn_max=2047.0)  # fmt: skip
    card = json.loads((tmp_path / "run2" / "h5.json").read_text())
    assert card["training"]["validation_overlaps_training"].startswith("overlapping#0 at ")


# ----------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(
    pairs: dict[str, list[TrainPair]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, object]:
    """One short run shared by the tests below (3 epochs of 4 steps, width 4).

    A fresh network starts as bilinear interpolation, which a width-4 network cannot beat in 12
    steps; so the run starts with the head's last conv at PyTorch's default random init (as an
    untrained network would have), giving the loop a real error to learn away in a few steps."""
    out = tmp_path_factory.mktemp("trained")
    return out, train(pairs["train"], pairs["val"], tiny(), out, CARD, init_state=random_head_start())


@pytest.fixture(scope="module")
def ex_trained(
    ex_pairs: dict[str, list[TrainPair]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, object]:
    """The same short run on the example's pairs, for the mechanics tests (resume, card, errors)."""
    out = tmp_path_factory.mktemp("ex_trained")
    return out, train(
        ex_pairs["train"], ex_pairs["val"], tiny_ex(), out, EX_CARD, init_state=random_head_start()
    )


def random_head_start() -> dict[str, torch.Tensor]:
    from fusion_cli.training.loop import build_model

    torch.manual_seed(0)
    start = build_model(tiny(), 6, 1)
    start.to_hrms[2].reset_parameters()
    return start.state_dict()


def test_short_training_lowers_validation_loss_and_exports(
    trained: tuple[Path, object], pairs: dict[str, list[TrainPair]]
) -> None:
    out, res = trained
    start = res.history[0]
    assert start["epoch"] == 0.0  # the untrained network's validation score
    print(
        f"\nvalidation L1 {start['val_l1']:.4f} -> {res.val['val_l1']:.4f}; "
        f"ERGAS {start['ergas']:.2f} -> {res.val['ergas']:.2f}"
    )
    assert res.val["val_l1"] < 0.7 * start["val_l1"]
    assert res.steps == 12 and res.weights_path is not None and res.card_path is not None
    assert (out / "loss.png").stat().st_size > 1000
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 4, 8, 12] and {"q2n", "sam", "ergas"} <= set(log[-1])

    card = json.loads(res.card_path.read_text())
    assert card["bands"] == CARD["bands"] and card["ratio"] == 2 and card["dn_max"] == 255.0
    assert card["architecture"]["dim"] == 4 and card["training"]["steps"] == 12
    assert card["metrics"]["validation"]["val_l1"] == pytest.approx(res.val["val_l1"], rel=1e-4)

    from fusion_cli.models.registry import load_model

    loaded = load_model(weights=res.weights_path, device="cpu")
    p = pairs["val"][0]
    ms, pan = torch.from_numpy(p.ms[:, :32, :32])[None], torch.from_numpy(p.pan[:, :64, :64])[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ms, pan), res.model.eval()(ms, pan))


def test_card_validation_and_band_mismatch(ex_trained: tuple[Path, object], tmp_path: Path) -> None:
    """A card without bands or DN scale is refused; a 6-band model refuses 4-band input clearly."""
    import shutil

    from fusion_cli.models.registry import load_model

    _, res = ex_trained
    card = json.loads(res.card_path.read_text())
    for field, bad in (("bands", []), ("dn_max", 0), ("ratio", 1)):
        shutil.copy(res.weights_path, tmp_path / res.weights_path.name)
        (tmp_path / res.card_path.name).write_text(json.dumps(dict(card, **{field: bad})))
        with pytest.raises(FusionError, match=field):
            load_model(weights=tmp_path / res.weights_path.name)
    # Four bands of a real scene into the six-band model, through the streaming pipeline.
    from fusion_cli.pipeline import FuseOptions, fuse_arrays, make_fuser

    fuser = make_fuser(weights=res.weights_path, device="cpu")
    s = example_crop(0, 200, 32)
    with pytest.raises(FusionError, match="6 MS bands|6 bands|bands"):
        fuse_arrays(s.pan, s.ms[:4], fuser, FuseOptions())


def test_resume_continues_exactly_where_it_stopped(
    tmp_path: Path, ex_trained: tuple[Path, object], ex_pairs: dict[str, list[TrainPair]]
) -> None:
    straight_dir, straight = ex_trained
    told: list[tuple[int, int, str]] = []
    first = train(
        ex_pairs["train"],
        ex_pairs["val"],
        tiny_ex(epochs=2),
        tmp_path,
        None,
        progress=lambda done, total, what: told.append((done, total, what)),
        init_state=random_head_start(),
    )
    # The loop reports progress through the callback (the CLI draws it): every step of 8, in order,
    # with the last epoch's loss and validation once one has ended.
    assert told[0] == (0, 8, "training") and {t for _, t, _ in told} == {8}
    steps = [d for d, _, _ in told]
    assert steps == sorted(steps) and set(steps) == set(range(9))
    assert told[-1][0] == 8 and told[-1][2].startswith("epoch 2: loss ") and "val_l1" in told[-1][2]
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 8 and ck["optimizer"]["state"]  # Adam moments are saved
    resumed = train(ex_pairs["train"], ex_pairs["val"], tiny_ex(epochs=3), tmp_path, None, resume=True)
    assert first.steps == 8 and resumed.steps == 12
    assert [h["step"] for h in resumed.history] == [0, 4, 8, 12]
    # Same weights as the uninterrupted run of the fixture: sampler, RNG and Adam state all resumed.
    a = torch.load(straight_dir / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    assert straight.val["val_l1"] == pytest.approx(resumed.val["val_l1"], rel=1e-5)
    with pytest.raises(FusionError, match="no checkpoint"):
        train(ex_pairs["train"], ex_pairs["val"], tiny_ex(), tmp_path / "c", None, resume=True)
    assert not (tmp_path / "c").exists()  # refused before the folder is made
    # Other data under --resume (same sizes, so the step count agreed) made a card that named the new
    # data only, and picked the epoch by scores on two validation sets: refused, both ways round.
    swapped = (ex_pairs["val"], ex_pairs["train"])
    with pytest.raises(FusionError, match="training inputs differ"):
        train(*swapped, tiny_ex(epochs=4, steps_per_epoch=4), tmp_path, None, resume=True)
    flipped = [replace(p, ref=p.ref[:, ::-1].copy(), pan=p.pan[:, ::-1].copy(), ms=p.ms[:, ::-1].copy())
               for p in ex_pairs["val"]]  # fmt: skip
    with pytest.raises(FusionError, match=r"validation data \(--val\) differ"):
        train(ex_pairs["train"], flipped, tiny_ex(epochs=4), tmp_path, None, resume=True)


def test_adapt_improves_reduced_resolution_ergas_on_held_out_scene(
    trained: tuple[Path, object], pairs: dict[str, list[TrainPair]]
) -> None:
    """Start from the network trained on other path/rows; adapt it on a held-out scene's own inputs
    (reduced once more); the reduced-resolution ERGAS against the never-seen reference falls."""
    from fusion_cli.metrics import ergas
    from fusion_cli.training.adapt import adapt_model

    base = trained[1].model.eval()
    p = pairs["test"][0]  # the user's "scene" is the reduced pair; its reference stays hidden
    adapted, report = adapt_model(
        base, p.pan * 255.0, p.ms * 255.0, ratio=2, dn_max=255.0, steps=20, lr=1e-3, batch=4, patch=32
    )
    assert report.loss_last < report.loss_first

    def score(model: torch.nn.Module) -> float:
        with torch.no_grad():
            out = model(torch.from_numpy(p.ms)[None], torch.from_numpy(p.pan)[None])[0].numpy()
        return ergas(p.ref * 255.0, np.clip(out, 0, None) * 255.0, 2)

    before, after = score(base), score(adapted)
    print(f"\nadapt: reduced-resolution ERGAS {before:.3f} -> {after:.3f} ({report.seconds:.1f} s)")
    assert after < 0.95 * before  # measured: 6.92 -> 6.44 (-7 %) in 20 steps
    assert score(base) == before  # the model it started from is untouched


def test_evaluate_pairs_reports_toolbox_indices(ex_pairs: dict[str, list[TrainPair]]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_ex(), 6, 1)
    scores = evaluate_pairs(model, ex_pairs["val"], torch.device("cpu"), EX_DN)
    assert {"val_l1", "q2n", "sam", "ergas", "psnr"} <= set(scores)
    assert 0 <= scores["q2n"] <= 1 and scores["sam"] > 0 and scores["ergas"] > 0


# ------------------------------------------------------------------------------------------------ CLI


def _write_crop(src: Path, dst: Path, rows: int, cols: int, row_off: int = 0, col_off: int = 0) -> None:
    """A small crop of a real raster (top-left unless offset), written to the test's temporary folder."""
    import warnings

    import rasterio
    from rasterio.windows import Window

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(src) as ds:
            data = ds.read(window=Window(col_off, row_off, cols, rows))
            profile = dict(ds.profile, width=cols, height=rows, tiled=False)
            profile.pop("blockxsize", None)
            profile.pop("blockysize", None)
            with rasterio.open(dst, "w", **profile) as out:
                out.write(data)
                out.descriptions = ds.descriptions


def test_spectral_angle_loss_term_and_selection() -> None:
    """`sam_weight` adds mean (1 - cos) of the per-pixel spectral angle: zero for a spectrum scaled
    without turning, positive for a turned one of the same L1; the epoch pick uses the same weight."""
    import math

    from fusion_cli.training.loop import training_loss, validation_objective

    ref = torch.rand(2, 4, 8, 8) + 0.5
    scaled = ref * 1.1
    assert training_loss(scaled, ref, 1.0) == pytest.approx(float(training_loss(scaled, ref)), rel=1e-6)
    turned = ref.clone()
    turned[:, 0] += 0.1 * ref.mean()
    turned[:, 1] -= 0.1 * ref.mean()  # same L1 as a uniform shift of half the size, but turned
    assert float(training_loss(turned, ref, 1.0)) > float(training_loss(turned, ref)) + 1e-5
    rec = {"val_l1": 0.02, "sam": 6.0}
    assert validation_objective(rec) == 0.02
    assert validation_objective(rec, 2.0) == pytest.approx(0.02 + 2 * (1 - math.cos(math.radians(6))))
    with pytest.raises(FusionError, match="--sam-weight"):
        TrainConfig(sam_weight=-1.0)


def test_fine_tuning_that_never_improves_exports_its_start(
    ex_pairs: dict[str, list[TrainPair]], tmp_path: Path
) -> None:
    """With a zero learning rate nothing improves on the validation set: the run exports the weights
    it started from (epoch 0), not its last or a worse epoch."""
    torch.manual_seed(1)
    start = build_model(tiny_ex(), 6, 1)
    torch.nn.init.normal_(start.to_hrms[2].weight, std=0.05)
    init = {k: v.clone() for k, v in start.state_dict().items()}
    # the run seeds the global generators: the caller's streams go on as if it had not run
    state, numpy_state = torch.get_rng_state(), np.random.get_state()
    expected, numpy_expected = torch.rand(3), np.random.rand(3)
    torch.set_rng_state(state)
    np.random.set_state(numpy_state)
    res = train(ex_pairs["train"], ex_pairs["val"], tiny_ex(lr=0.0, epochs=2), tmp_path, init_state=init)
    assert torch.equal(torch.rand(3), expected) and np.array_equal(np.random.rand(3), numpy_expected)
    assert res.best_epoch == 0
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v.cpu(), init[k])


def test_cli_train_end_to_end_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from fusion_cli.cli.main import _register, app

    # Two pairs cut from disjoint parts of the shipped example (any real pair serves the CLI path).
    data = tmp_path / "scenes"
    data.mkdir()
    for i, col in ((2, 0), (9, 160)):
        _write_crop(EXAMPLE_MS, data / f"{i}_ms.tif", 56, 56, 0, col)
        _write_crop(EXAMPLE_PAN, data / f"{i}_pan.tif", 112, 112, 0, 2 * col)
    _register()
    runner = CliRunner()
    args = ["train", str(data), "-o", str(tmp_path / "run"), "--name", "cli_tiny", "--ratio", "2"]
    args += ["--sensor", "landsat8", "--bands", "3,2,1,4,5,6", "--pan-shift=-1,-1", "--dim", "4"]
    args += ["--patch", "32", "--batch", "2", "--epochs", "2", "--steps-per-epoch", "2", "--json"]
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # stderr counts as a terminal: the CLI draws the bar
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["steps"] == 4
    # the loop reported its steps and epochs through the callback, the CLI drew them on stderr
    assert "4/4" in res.stderr and "epoch 2: loss" in res.stderr
    card = json.loads((tmp_path / "run" / "cli_tiny.json").read_text())
    # --bands 3,2,1,...: the card names the bands in the selected order (red first), DN scale from uint16
    assert card["bands"][0] == "B4 red" and card["bands"][2] == "B2 blue"
    assert card["dn_max"] == EX_DN and card["ratio"] == 2
    assert card["training"]["command"].startswith(f"fusion train {data} -o ")
    assert "--pan-shift -1,-1" in card["training"]["command"]
    assert card["architecture"]["scan_memory"] == 20  # new models are seamless by default
    # a fine-tuned card names its parent, and keeps it through a resume (which dropped it, helper)
    tune = ["train", str(data), "-o", str(tmp_path / "tuned"), "--name", "tuned", *args[6:-5]]
    tune += ["--steps-per-epoch", "2"]
    parent = ["--init", str(tmp_path / "run" / "cli_tiny.safetensors")]
    assert runner.invoke(app, [*tune, "--epochs", "1", *parent]).exit_code == 0
    other = ["--init", str(tmp_path / "tuned" / "tuned.safetensors")]
    res = runner.invoke(app, [*tune, "--epochs", "2", "--resume", *other])
    assert isinstance(res.exception, FusionError) and "--init differs" in str(
        res.exception
    )  # exit 2 in main()
    res = runner.invoke(app, [*tune, "--epochs", "2", "--resume"])
    assert res.exit_code == 0, res.output
    tuned = json.loads((tmp_path / "tuned" / "tuned.json").read_text())["training"]
    assert tuned["init"]["sha256"] == card["sha256"] and tuned["init"]["model"] == "cli_tiny"
    # its command replays the whole training as one run: the resume's --epochs, the first run's --init
    assert (
        "--epochs 2" in tuned["command"]
        and f"--init {tmp_path / 'run' / 'cli_tiny.safetensors'}" in tuned["command"]
    )
    assert "--epochs 2" in tuned["resumed"][0]
    # A missing folder is a one-line user error (FusionError -> exit 2 in main()).
    from fusion_cli.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["train", str(tmp_path / "nope"), "-o", str(tmp_path / "x"), "--ratio", "2", "--quiet"])
    assert exc.value.code == 2


def test_shipping_bar_reads_the_held_out_table() -> None:
    """A model is the default only if its card's held-out table beats every classical method: the
    shipped Landsat card does (so it is the default), and a table that loses on one index does not."""
    from fusion_cli.paths import weights_dir
    from recipes.train_recipes import clears_bar

    card = json.loads((weights_dir() / "landsat.json").read_text())
    methods = card["metrics"]["test_reduced_resolution"]["methods"]
    assert clears_bar(methods, "pansharpening") and card["default"] is True
    assert card["architecture"]["base"] == "bdsd-pc"
    worse = {k: {"mean": v["mean"]} for k, v in methods["fusionmamba"].items()}
    worse["ergas"]["mean"] = methods["bdsd-pc"]["ergas"]["mean"]  # ties BDSD-PC on ERGAS alone
    assert not clears_bar({**methods, "fusionmamba": worse}, "pansharpening")


def test_make_weights_replays_each_cards_command() -> None:
    """`make weights` (recipes/train_recipes.py shipped) retrains every shipped model with its card's command:
    one command per card, naming that card's recipe."""
    from fusion_cli.paths import weights_dir
    from recipes.train_recipes import RECIPES, shipped_commands

    commands = shipped_commands()
    cards = sorted(p.stem for p in weights_dir().glob("*.json"))
    assert sorted(c[0] for c in commands) == cards and all(c[0] in RECIPES for c in commands)
    assert ["landsat", "--dim", "8", "--batch", "8", "--max-seconds", "4200"] in commands


def test_recipe_never_replaces_a_model_in_out_unasked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out defaults to weights/: a trial run from the repository root (`train_recipes.py landsat
    --max-seconds 60`) silently replaced the shipped landsat model. A model already in --out needs
    --overwrite (`shipped`, which retrains the shipped models, passes it), and the card's command
    does not record it."""
    from recipes.train_recipes import main

    (tmp_path / "landsat.safetensors").write_bytes(b"a model someone shipped")
    assert main(["landsat", "--out", str(tmp_path), "--work", str(tmp_path / "w"), "--max-seconds", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "landsat.safetensors").read_bytes() == b"a model someone shipped"
    assert not (tmp_path / "w").exists()


def test_recipe_resume_needs_a_checkpoint_and_its_card_replays_as_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train_recipes NAME --resume` continues the run in --work (without a checkpoint there it stops
    with the loop's error, exit 2), and the card of a resumed run names one replayable command."""
    from recipes.train_recipes import main, replay_command

    need_shared("eo1_sanfrancisco", "hs.tif")
    argv = ["hyperion_hisr", "--resume", "--work", str(tmp_path), "--out", str(tmp_path), "--no-eval"]
    assert main(argv) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.safetensors"))
    cmd = "python recipes/train_recipes.py hyperion_hisr --max-seconds 1800 --resume"
    assert replay_command(cmd, 5432.4) == "python recipes/train_recipes.py hyperion_hisr --max-seconds 5432"
    assert replay_command("python x.py vhr4 --resume", 60) == "python x.py vhr4 --max-seconds 60"


@pytest.mark.parametrize("scene", [19, 23, 24])
def test_shipped_landsat_beats_bdsd_pc_on_held_out_path_row(scene: int) -> None:
    """The default model on a Landsat-7 path/row it never saw (P092R086), reduced resolution: higher
    Q2n and lower ERGAS than its own base method, BDSD-PC, on the same pair (measured on 256-px PAN
    crops: ERGAS 3.35 vs 3.69, 2.38 vs 2.48, 4.28 vs 4.56)."""
    from fusion_cli.classical import make_method
    from fusion_cli.models.registry import load_model
    from fusion_cli.training.validation import quality

    model = load_model(name="landsat", device="cpu").model
    p = reduce_scene(fusebox(scene, 256, 0, 0), 2)  # 256 x 256 reduced PAN
    pan, ms = torch.from_numpy(p.pan * 255)[None], torch.from_numpy(p.ms * 255)[None]
    bdsd = make_method("bdsd-pc", 2, sensor="landsat7").fit(pan, ms).fuse(pan, ms)[0].numpy()
    net = evaluate_pairs(model, [p], torch.device("cpu"), 255.0, sensor="landsat7")
    ref = quality(p.ref * 255, np.clip(bdsd, 0, None), 2, 255.0)
    print(
        f"\nFuseBox {scene}: net Q2n {net['q2n']:.4f} ERGAS {net['ergas']:.3f}; "
        f"BDSD-PC {ref['q2n']:.4f} {ref['ergas']:.3f}"
    )
    assert net["ergas"] < ref["ergas"] and net["q2n"] > ref["q2n"]


def test_shipped_hyperion_hisr_beats_hypersharpening_on_held_out_rows(tmp_path: Path) -> None:
    """The shipped HISR model through `fusion hisr` on the held-out last 28 % of the San Francisco
    Hyperion/ALI scene (HSI reduced by 3 with the Hyperion MTF): better PSNR, SAM and ERGAS than
    `fusion hisr --method mtf-glp-hs`, its base and the best classical method there (measured:
    SAM 1.44 vs 1.71, ERGAS 1.72 vs 2.15)."""
    import rasterio

    from fusion_cli.metrics import ergas, psnr, sam
    from fusion_cli.pipeline import hisr
    from recipes.train_recipes import RECIPES, build_pairs

    root = need_shared("eo1_sanfrancisco", "hs.tif").parents[1]
    _, _, _, test = build_pairs(RECIPES["hyperion_hisr"], root)
    p = test[0]
    h, w = p.ref.shape[1] // 12 * 12, p.ref.shape[2] // 12 * 12
    paths = {}
    for key, arr in (("msi", p.pan[:, :h, :w]), ("hsi", p.ms[:, : h // 3, : w // 3])):
        paths[key] = tmp_path / f"{key}.tif"
        a = (arr * 10000.0).astype(np.float32)
        with rasterio.open(
            paths[key],
            "w",
            driver="GTiff",
            width=a.shape[2],
            height=a.shape[1],
            count=a.shape[0],
            dtype="float32",
        ) as ds:
            ds.write(a)
    ref = p.ref[:, :h, :w] * 10000.0
    scores = {}
    for label, kw in (
        ("net", {"model": "hyperion_hisr"}),
        ("hs", {"method": "mtf-glp-hs", "sensor": "hyperion"}),
    ):
        hisr(paths["hsi"], paths["msi"], tmp_path / f"{label}.tif", device="cpu", **kw)
        with rasterio.open(tmp_path / f"{label}.tif") as ds:
            out = ds.read().astype(np.float64)
        scores[label] = (psnr(ref, out, "dnmax"), sam(ref, out), ergas(ref, out, 3))
    print(f"\nSF held out: net PSNR/SAM/ERGAS {scores['net']}, mtf-glp-hs {scores['hs']}")
    assert scores["net"][0] > scores["hs"][0]
    assert scores["net"][1] < scores["hs"][1] and scores["net"][2] < scores["hs"][2]
    # Seams: the 72 x 132 scene in 36-px tiles (seams at rows 36, columns 36, 72, 108) equals the
    # one-piece product within 1 DN at least the tiles' default halo (32 px) from the scene's edges.
    # Nearer them the one piece (as the authors run a whole image) differs: its scans wrap to the
    # scene's far side, a tile's to its own (see the Seams section of the README); for this model
    # that reaches 27 px in from the right edge (1.3 DN there; 0.4 DN at the 99th percentile inside).
    hisr(
        paths["hsi"],
        paths["msi"],
        tmp_path / "tiled.tif",
        model="hyperion_hisr",
        device="cpu",
        progress=False,
        tile=36,
        overlap=24,
    )
    with rasterio.open(tmp_path / "tiled.tif") as a, rasterio.open(tmp_path / "net.tif") as b:
        diff = np.abs(a.read().astype(np.float64) - b.read()).max(axis=0)
    edge = 32
    print(f"hyperion_hisr 36-px tiles vs one piece: max {diff.max():.2f} DN, "
          f"{diff[edge:-edge, edge:-edge].max():.2f} DN >= {edge} px from the edges")  # fmt: skip
    assert diff[edge:-edge, edge:-edge].max() <= 1.0


def test_hyperion_hisr_other_places_are_in_its_bands_and_its_card_rows_reproduce() -> None:
    """The HISR card's scenes of other places (Paris Hyperion + ALI, AVIRIS Indian Pines simulated):
    47 HSI and 6 MSI bands on one grid, each band's mean that of the San Francisco training rows; and
    the shipped card's table of each is what the shipped model and the classical methods give there."""
    from fusion_cli.models.registry import load_model
    from fusion_cli.paths import weights_dir
    from recipes.train_recipes import RECIPES, other_scenes_table

    root = need_shared("eo1_hyperion_ali_paris", "hs_for_ms.tif").parents[1]
    need_shared("aviris_indian_pines", "hs.tif")
    recipe = RECIPES["hyperion_hisr"]
    splits = recipe.scenes(root)
    sf = splits.train[0]
    paris, aviris = splits.other
    assert paris.group == "paris" and not paris.simulated and aviris.simulated
    assert paris.ms.shape == (47, 72, 72) and paris.pan.shape == (6, 72, 72)
    assert aviris.ms.shape == (47, 145, 145) and aviris.pan.shape == (6, 145, 145)
    for s in (paris, aviris):
        assert s.ratio == 1 and np.isfinite(s.ms).all() and np.isfinite(s.pan).all()
        np.testing.assert_allclose(s.ms.mean(axis=(1, 2)), sf.ms.mean(axis=(1, 2)), rtol=1e-4)
        np.testing.assert_allclose(s.pan.mean(axis=(1, 2)), sf.pan.mean(axis=(1, 2)), rtol=1e-4)
    card = json.loads((weights_dir() / "hyperion_hisr.json").read_text())
    shipped = card["metrics"]["test_other_scenes"]
    model = load_model("hyperion_hisr", device="cpu").model
    rows = other_scenes_table(model, recipe, splits.other, torch.device("cpu"))
    assert [r["scene"] for r in rows] == [r["scene"] for r in shipped] == [paris.name, aviris.name]
    for got, want in zip(rows, shipped, strict=True):
        for method, scores in want["methods"].items():
            for key, value in scores.items():
                assert got["methods"][method][key]["mean"] == pytest.approx(value["mean"], abs=2e-4), (
                    got["scene"],
                    method,
                    key,
                )


@pytest.mark.parametrize(
    "name, task, data",
    [
        ("hyperion_hisr", "hisr", ("eo1_sanfrancisco", "hs.tif")),
        ("vhr4", "pansharpening", ("wv3_spacenet2", "pan.tif")),
        ("hyperion_pan", "hs-pansharpening", ("aviris_indian_pines", "hs.tif")),
    ],
)
def test_shipped_card_table_is_what_its_weights_measure(
    tmp_path: Path, name: str, task: str, data: tuple[str, str]
) -> None:
    """`train_recipes NAME --retest` re-measures a shipped card's held-out tables from its weights as
    the card loads them (scan memory and transpose ensemble included): it reproduces the card's
    figures at reduced and at full resolution, its margins and its status, and the models beat every
    classical method at reduced resolution (the default-model rule; vhr4 only with its transpose
    ensemble)."""
    import shutil

    from fusion_cli.paths import weights_dir
    from recipes.train_recipes import clears_bar, main

    need_shared(*data)
    need_shared("eo1_hyperion_ali_paris", "hs.tif")  # hyperion_pan's test rows
    for ext in ("json", "safetensors"):
        shutil.copy(weights_dir() / f"{name}.{ext}", tmp_path)
    shipped = json.loads((weights_dir() / f"{name}.json").read_text())
    assert main([name, "--retest", "--out", str(tmp_path)]) == 0
    card = json.loads((tmp_path / f"{name}.json").read_text())
    assert card["architecture"]["scan_memory"] == 20
    # the transpose ensemble as the validation scenes chose it, again
    chosen = card["metrics"]["ensemble_validation"]["chosen"]
    assert card["architecture"]["transpose_ensemble"] is chosen
    assert chosen == shipped["architecture"]["transpose_ensemble"]
    for part in ("test_reduced_resolution", "test_full_resolution"):
        got = card["metrics"][part].get("methods", {})
        want = shipped["metrics"][part].get("methods", {})
        assert got.keys() == want.keys()
        for method, row in want.items():
            for index, value in row.items():
                assert got[method][index]["mean"] == pytest.approx(value["mean"], rel=1e-3, abs=1e-3), (
                    method,
                    index,
                )
    assert card["metrics"]["test_reduced_resolution"]["methods"]  # HISR has no full-resolution rows
    assert (
        card["status"] == shipped["status"]
        and card["bar"]["best_classical"] == shipped["bar"]["best_classical"]
    )
    assert clears_bar(card["metrics"]["test_reduced_resolution"]["methods"], task)


def test_adapt_a_base_model_trains_its_correction(ex_pairs: dict[str, list[TrainPair]]) -> None:
    """--adapt on a model with a classical base: the base is computed on the adapted scene too, the
    adapted copy moves away from the base (the head learns) and the original stays the base."""
    from fusion_cli.training.adapt import adapt_model

    torch.manual_seed(0)
    model = build_model(tiny_ex(base="bdsd-pc"), 6, 1).eval()
    p = attach_base(ex_pairs["test"][:1], "bdsd-pc", "landsat8")[0]
    adapted, report = adapt_model(
        model, p.pan * EX_DN, p.ms * EX_DN, ratio=2, dn_max=EX_DN, steps=4, lr=1e-3, batch=2, patch=32,
        sensor="landsat8",
    )  # fmt: skip
    ms, pan, base = (torch.from_numpy(a)[None] for a in (p.ms, p.pan, p.base))
    with torch.no_grad():
        torch.testing.assert_close(model(ms, pan, base=base), base)
        assert (adapted(ms, pan, base=base) - base).abs().mean() > 1e-5
    assert report.steps == 4


def test_ensemble_pays_only_beyond_the_card_resolution() -> None:
    """The transpose ensemble is kept where it moves a validation index by more than the cards treat as
    real and makes none worse: the recorded validation scores of the shipped models decide as follows."""
    from fusion_cli.training.validation import ensemble_pays

    def s(q2n: float, sam: float, ergas: float) -> dict[str, float]:
        return {"q2n": q2n, "sam": sam, "ergas": ergas}

    assert ensemble_pays(s(0.9050, 1.907, 2.970), s(0.9061, 1.896, 2.946))  # landsat: ERGAS -0.024
    assert ensemble_pays(s(0.8351, 6.992, 6.087), s(0.8370, 6.800, 6.059))  # vhr4: SAM -0.19
    assert not ensemble_pays(s(0.7046, 3.7339, 5.615), s(0.7055, 3.7332, 5.610))  # hyperion_pan: < 0.002
    assert not ensemble_pays(s(0.90, 1.494, 1.70), s(0.91, 1.521, 1.60))  # hyperion_hisr: SAM worse


def test_choose_ensemble_scores_both_and_sets_the_choice(ex_pairs: dict[str, list[TrainPair]]) -> None:
    """choose_ensemble scores a network on validation pairs in one pass and transposed-and-averaged
    (two different products), and leaves the model configured as `ensemble_pays` decides."""
    from fusion_cli.training.validation import choose_ensemble, ensemble_pays

    torch.manual_seed(0)
    cfg = TrainConfig(task="pansharpening", ratio=2, dim=4, patch=32, batch=2, dn_max=EX_DN)
    model = build_model(cfg, 6, 1)
    with torch.no_grad():  # the fresh head is zero (output = upsampled MS): give the net a say
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    chosen, scores = choose_ensemble(model, ex_pairs["val"], torch.device("cpu"), EX_DN, "landsat8")
    assert set(scores) == {"one_pass", "ensemble"}
    assert scores["one_pass"]["val_l1"] != scores["ensemble"]["val_l1"]
    assert chosen == ensemble_pays(scores["one_pass"], scores["ensemble"])
    assert model.config.transpose_ensemble is chosen and not model.training


def test_recipe_finetune_chains_the_parent_command_and_records_its_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train_recipes NAME --finetune` starts from the card already in --out: without one it stops
    (exit 2, nothing written); with one, its card records both legs as one command (`A && B`, which
    `shipped` replays in order) and the parent's sha256, steps and command under training.init."""
    from recipes.train_recipes import main, shipped_commands

    need_shared("landsat7_etm_fusebox", "1_ms.tif")
    out, work = tmp_path / "out", tmp_path / "work"
    leg = ["--out", str(out), "--work", str(work), "--no-eval", "--quiet", "--batch", "2", "--val-crop", "32"]
    assert main(["landsat", "--finetune", "--max-seconds", "1", *leg]) == 2
    assert "--finetune: no " in capsys.readouterr().err and not out.exists()

    assert main(["landsat", "--dim", "4", "--max-seconds", "1", *leg]) == 0
    parent = json.loads((out / "landsat.json").read_text())
    assert main(["landsat", "--finetune", "--init", str(out / "landsat.json"), *leg]) == 2
    assert "pass one" in capsys.readouterr().err
    assert main(["landsat", "--finetune", "--lr", "1e-5", "--max-seconds", "1", *leg]) == 0
    card = json.loads((out / "landsat.json").read_text())
    first, second = card["training"]["command"].split(" && ")
    assert first == parent["training"]["command"] and "--finetune" in second
    assert card["training"]["init"]["sha256"] == parent["sha256"]
    assert card["training"]["init"]["steps"] == parent["training"]["steps"] >= 1
    assert card["architecture"]["dim"] == 4  # the parent's width, not the recipe's
    legs = shipped_commands(out)
    assert [c[0] for c in legs] == ["landsat", "landsat"] and "--finetune" in legs[1]


def test_validation_on_training_data_and_unusable_settings_are_refused(
    tmp_path: Path, ex_pairs: dict[str, list[TrainPair]]
) -> None:
    """`--val` naming the training scenes (the card then called a training score held-out), and
    settings torch found only mid-run (--lr nan: traceback; --lr inf: untrained weights exported at
    exit 0; --patch 0: traceback; --max-seconds 0: zero steps, exported) are refused up front."""
    renamed = [replace(p, name=f"copy of {p.name}") for p in ex_pairs["train"][:1]]
    with pytest.raises(FusionError, match="is also training data"):
        train(ex_pairs["train"], renamed, tiny_ex(), tmp_path / "out", None)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    for kw, flag in (
        ({"lr": float("nan")}, "--lr"), ({"lr": float("inf")}, "--lr"), ({"lr": -1.0}, "--lr"),
        ({"lr_gamma": float("nan")}, "--lr-gamma"), ({"lr_step": 0}, "--lr-step"), ({"patch": 0}, "--patch"),
        ({"patch": -8}, "--patch"), ({"max_seconds": 0.0}, "--max-seconds"),
        ({"max_seconds": float("nan")}, "--max-seconds"), ({"steps_per_epoch": 0}, "--steps-per-epoch"),
    ):  # fmt: skip
        with pytest.raises(FusionError, match=flag):
            tiny_ex(**kw)


def test_a_damaged_checkpoint_or_weights_file_is_a_one_line_error(
    tmp_path: Path, ex_pairs: dict[str, list[TrainPair]]
) -> None:
    """--resume on a truncated checkpoint.pt was torch's traceback (exit 1), on a text file a KeyError;
    an empty .pth given as weights raised an IndexError from the code that words the error."""
    from fusion_cli.models.registry import load_model

    for content, expect in ((b"PK\x03\x04 truncated", "cannot read"), (b"", "cannot read")):
        (tmp_path / "checkpoint.pt").write_bytes(content)
        with pytest.raises(FusionError, match=expect):
            train(ex_pairs["train"], ex_pairs["val"], tiny_ex(), tmp_path, None, resume=True)
    torch.save({"something": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(FusionError, match="not a checkpoint of fusion train"):
        train(ex_pairs["train"], ex_pairs["val"], tiny_ex(), tmp_path, None, resume=True)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(FusionError, match="cannot load .*empty.pth as a PyTorch state_dict"):
        load_model(weights=tmp_path / "empty.pth")


def test_a_training_scene_with_nodata_is_refused(tmp_path: Path) -> None:
    """Declared nodata was trained on as data: a scene with a 25 % collar trained as if it were
    ground, and a 90 %-nodata scene's validation L1 looked excellent. Training needs every pixel
    valid, as it already did for NaN; the same scene without the flag reads."""
    import rasterio

    from fusion_cli.training.data import read_raster

    with rasterio.open(EXAMPLE_MS) as src:
        data, profile = src.read(), src.profile
    data[:, :, :80] = 0
    flagged, plain = tmp_path / "flagged.tif", tmp_path / "plain.tif"
    for path, nodata in ((flagged, 0), (plain, None)):
        with rasterio.open(path, "w", **{**profile, "nodata": nodata}) as dst:
            dst.write(data)
    with pytest.raises(FusionError, match=r"12800 px of nodata \(25.0%\).*crop the pair to its valid area"):
        read_raster(flagged)
    assert read_raster(plain).shape == data.shape


def test_a_run_holds_its_folder_and_its_checkpoint_survives_failures(
    tmp_path: Path, ex_pairs: dict[str, list[TrainPair]]
) -> None:
    """Two runs into one folder interleaved their logs and one died on the other's temporary; a run
    killed between an epoch's log line and its checkpoint logged that epoch twice after --resume; a
    flipped bit in the checkpoint was reported as divergence ("lower --lr"); a checkpoint of another
    network was torch's traceback; the card of a resumed run named the resume's command only, and
    said bf16 where the CPU ran fp32 (helper)."""
    import subprocess
    import sys

    from fusion_cli.batch.locking import scene_lock
    from fusion_cli.training.loop import refuse_earlier_run, write_checkpoint

    run = tmp_path / "run"
    card = dict(EX_CARD, training={**EX_CARD["training"], "command": "fusion train first"})
    args = (ex_pairs["train"], ex_pairs["val"])
    train(*args, tiny_ex(epochs=1, precision="bf16"), run, card)
    with (
        scene_lock(run / "checkpoint.pt"),
        pytest.raises(FusionError, match="another fusion train is running"),
    ):
        train(*args, tiny_ex(epochs=2), run, card, resume=True)
    with (
        scene_lock(run / "checkpoint.pt"),
        pytest.raises(FusionError, match="another fusion train is running"),
    ):
        refuse_earlier_run(run)  # the CLI's early check: not "continue it with --resume" while it runs
    with pytest.raises(FusionError, match="holds an earlier run"):
        train(*args, tiny_ex(epochs=2), run, card)
    log = run / "train_log.jsonl"
    log.write_text(log.read_text() + log.read_text().splitlines()[-1] + "\n")  # killed before its save
    resumed_card = dict(card, training={**card["training"], "command": "fusion train second"})
    import threading
    import time

    def hold_briefly() -> None:  # another process's check: the run waits for it, it does not fail
        with scene_lock(run / "checkpoint.pt"):
            time.sleep(0.5)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    time.sleep(0.1)
    res = train(*args, tiny_ex(epochs=2, precision="bf16"), run, resumed_card, resume=True)
    holder.join()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 4, 8]
    assert [h["step"] for h in res.history] == [0, 4, 8]
    from fusion_cli.training.loop import _resumed_card

    first = {
        "training": {
            "command": "fusion train d --epochs 1",
            "init": {"weights": "p s.safetensors", "sha256": "x"},
        }
    }
    again = {"name": "n", "training": {"command": "fusion train d --epochs 4 --max-seconds 1.5"}}
    # the replay trains every epoch: the last leg's time budget would cut it short (reviewer)
    assert (
        _resumed_card(first, again)["training"]["command"]
        == "fusion train d --epochs 4 --init 'p s.safetensors'"
    )
    saved = json.loads((run / "tiny_landsat.json").read_text())["training"]
    assert saved["command"] == "fusion train second" and saved["resumed"] == ["fusion train second"]
    # what the resume asks is what its card says: another --name exports another model beside the first
    renamed = dict(resumed_card, name="renamed", licence="MIT")
    first_weights = (run / "tiny_landsat.safetensors").read_bytes()
    train(*args, tiny_ex(epochs=3), run, renamed, resume=True)
    assert json.loads((run / "renamed.json").read_text())["licence"] == "MIT"
    assert (run / "tiny_landsat.safetensors").read_bytes() == first_weights
    assert saved["precision"] == "fp32"

    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    damaged = dict(ck, model={k: v.clone() for k, v in ck["model"].items()})
    next(iter(damaged["model"].values())).view(-1)[0] = float("nan")
    other = dict(ck, model=build_model(tiny_ex(dim=8), 6, 1).state_dict())
    for state, words in ((damaged, "non-finite weights"), (other, "holds another network")):
        torch.save(state, run / "checkpoint.pt")
        with pytest.raises(FusionError, match=words):
            train(*args, tiny_ex(epochs=3), run, None, resume=True)

    # a write that fails (here a file-size limit) leaves the checkpoint it replaces and no temporary
    torch.save(ck, run / "checkpoint.pt")
    before = (run / "checkpoint.pt").read_bytes()
    code = (
        "import resource, sys, torch; from pathlib import Path\n"
        "from fusion_cli.training.loop import write_checkpoint\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n write_checkpoint(Path(sys.argv[1]), {'w': torch.zeros(100_000)})\n"
        "except OSError as exc:\n print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(run / "checkpoint.pt")], capture_output=True, text=True
    )
    assert out.stdout.startswith(f"cannot write checkpoint {run / 'checkpoint.pt'}: "), (
        out.stdout + out.stderr
    )
    assert "the previous checkpoint is kept: continue with --resume" in out.stdout
    assert (run / "checkpoint.pt").read_bytes() == before and not list(run.glob(".*"))
    out = subprocess.run([sys.executable, "-c", code, str(run / "first.pt")], capture_output=True, text=True)
    assert out.stdout.strip().endswith("; no checkpoint was kept"), out.stdout + out.stderr
    write_checkpoint(run / "checkpoint.pt", ck)  # and one that succeeds replaces it
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == ck["step"]


def test_validation_sharing_pixels_with_training_data_is_refused(pairs: dict[str, list[TrainPair]]) -> None:
    """Only exact copies were refused: a crop of a training scene as --val, or FuseBox pairs 10 and 11
    (their corners are the same 29 x 40 MS px) on either side of the split, trained at exit 0 with
    training scores on the card as held-out ones (helper)."""
    from fusion_cli.training.data import shared_block

    d = need_shared("landsat7_etm_fusebox")
    ten, eleven = (
        load_scene(d / f"{i}_pan.tif", d / f"{i}_ms.tif", ratio=2, sensor="landsat7", pan_shift=(-1, -1))
        for i in (10, 11)
    )
    # the default split: pair 11's validation rows hold pair 10's first training rows
    train_p = [reduce_scene(s.crop_rows(0.0, 0.8), 2) for s in (ten, eleven)]
    val_p = [reduce_scene(s.crop_rows(0.8, 1.0), 2) for s in (ten, eleven)]
    assert (
        shared_block(val_p, train_p)
        == "11_ms[rows 0.80-1.00] at (53, 0) is 10_ms[rows 0.00-0.80] at (0, 360)"
    )
    crop = replace(pairs["train"][0], name="crop", ref=pairs["train"][0].ref[:, 20:60, 30:70].copy())
    with pytest.raises(FusionError, match=r"validation shares pixels with training data \(crop at"):
        train(pairs["train"], [crop], tiny(), Path("never-made"), None)
    assert not Path("never-made").exists()
    assert shared_block(pairs["val"], pairs["train"]) is None  # other path/rows
    assert shared_block(val_p[:1], train_p) is None  # a scene's own rows do not overlap


def test_a_validation_split_too_small_to_reduce_is_named() -> None:
    """A 30-row scene's 20 % validation rows cannot be Wald-reduced: the error named neither the scene
    nor that it was the validation split (helper)."""
    scene = fusebox(1, ms_size=30)
    with pytest.raises(FusionError, match=r"^1_ms\[rows 0\.80-1\.00\]: images too small for a ratio-2"):
        reduce_scene(scene.crop_rows(0.8, 1.0), 2)
