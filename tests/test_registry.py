"""Model registry and NetworkFuser: official .pth, safetensors + card round trip, default model, clear
errors for unknown names, tampered or mismatched weights and bad cards; the fuser on real WV3 DN."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import need_shared

from fusion_cli.device import resolve_device
from fusion_cli.errors import FusionError
from fusion_cli.fusers import Fuser
from fusion_cli.models.fuser import NetworkFuser
from fusion_cli.models.fusionmamba import FusionMamba, FusionMambaConfig
from fusion_cli.models.registry import (
    ModelCard,
    default_model_mismatch,
    default_model_name,
    list_models,
    load_model,
    save_model,
)


def _tiny_card(name: str = "tiny", default: bool = False, **kw) -> tuple[FusionMamba, ModelCard]:
    torch.manual_seed(0)
    model = FusionMamba(FusionMambaConfig(ms_bands=4, ratio=2, dim=8))
    card = ModelCard(
        name=name,
        task="pansharpening",
        description="tiny test model",
        sensor="test",
        bands=["blue", "green", "red", "nir"],
        pan_bands=["pan"],
        ratio=2,
        dn_max=255.0,
        licence="CC0-1.0",
        default=default,
        training={"data": "none"},
        **kw,
    )
    return model, card


@pytest.fixture
def wdir(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_WEIGHTS_DIR", str(tmp_path))
    return tmp_path


def test_official_pth_loads_with_inferred_config_and_wv3_card():
    path = need_shared("fusionmamba_official", "420.pth")
    lm = load_model(weights=path)
    cfg, card = lm.model.config, lm.card
    assert (cfg.ms_bands, cfg.pan_bands, cfg.ratio, cfg.dim, cfg.d_state) == (8, 1, 4, 32, 8)
    assert card.sensor == "WorldView-3" and card.dn_max == 2047 and card.ratio == 4
    assert card.bands[0].startswith("coastal") and card.bands[-1].startswith("NIR2") and len(card.bands) == 8
    assert "not redistributable" in card.licence
    assert card.sha256 == "5214e111fa09db34e446a8cfc1e5a86dc97edca2bb3ce6751193e623f5e83017"
    card.validate()
    assert not lm.model.training


def test_save_and_load_round_trip_with_default(wdir):
    model, card = _tiny_card(default=True)
    wpath, cpath = save_model(model, card, wdir)
    assert wpath.name == "tiny.safetensors" and cpath.name == "tiny.json"
    header_len = int.from_bytes(wpath.read_bytes()[:8], "little")  # safetensors: JSON header, no pickle
    assert json.loads(wpath.read_bytes()[8 : 8 + header_len])["__metadata__"]["name"] == "tiny"
    saved = json.loads(cpath.read_text())
    assert saved["architecture"]["ms_bands"] == 4 and len(saved["sha256"]) == 64
    assert [c.name for c in list_models()] == ["tiny"] and default_model_name() == "tiny"
    for loaded in (load_model(), load_model("tiny"), load_model(weights=wpath), load_model(weights=cpath)):
        assert loaded.card.name == "tiny"
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[k], v), k


def test_missing_default_and_unknown_name(wdir):
    with pytest.raises(FusionError, match="no default model"):
        default_model_name()
    with pytest.raises(FusionError, match="no default model"):
        load_model()
    save_model(*_tiny_card(), wdir)
    with pytest.raises(FusionError, match=r"unknown model 'landsat' \(available: tiny\)"):
        load_model("landsat")


def test_tampered_weights_are_refused(wdir):
    wpath, _ = save_model(*_tiny_card(), wdir)
    data = bytearray(wpath.read_bytes())
    data[-1] ^= 0xFF
    wpath.write_bytes(bytes(data))
    with pytest.raises(FusionError, match="does not match the sha256"):
        load_model("tiny")


def test_checkpoint_that_does_not_fit_the_named_model(wdir):
    """A `.pth` of the 8-band WV3 architecture (random weights: the check reads shapes) into a 4-band
    model: the error names the tensor and the band counts."""
    save_model(*_tiny_card(), wdir)
    path = wdir / "wv3.pth"
    torch.save(FusionMamba(FusionMambaConfig(ms_bands=8)).state_dict(), path)
    with pytest.raises(
        FusionError,
        match=r"does not fit the model: tensor upsample.upsamle.0.weight .* for 8 MS bands, the model for 4",
    ):
        load_model("tiny", weights=path)


def test_card_validation_errors(wdir):
    model, card = _tiny_card()
    card.bands = ["blue", "green", "red"]
    with pytest.raises(FusionError, match="MS bands 3 disagree with the architecture's 4"):
        save_model(model, card, wdir)
    _, card = _tiny_card()
    card.task = "denoising"
    with pytest.raises(FusionError, match="task must be one of"):
        save_model(model, card, wdir)
    _, card = _tiny_card()
    card.licence = ""
    with pytest.raises(FusionError, match="'licence' is missing"):
        save_model(model, card, wdir)
    (wdir / "broken.json").write_text(json.dumps({"name": "broken", "task": "pansharpening"}))
    with pytest.warns(UserWarning, match="missing field"):
        assert list_models() == []
    with pytest.raises(FusionError, match="missing field"):
        load_model("broken")
    with pytest.raises(FusionError, match="not found"):
        load_model(weights=wdir / "nothing.pth")


def test_unknown_card_fields_are_kept_under_training(wdir):
    model, card = _tiny_card()
    _, cpath = save_model(model, card, wdir)
    data = json.loads(cpath.read_text())
    data["calibration"] = {"gain": 2}
    cpath.write_text(json.dumps(data))
    assert load_model("tiny").card.training["extra"] == {"calibration": {"gain": 2}}


def test_network_fuser_on_real_wv3_dn():
    lm = load_model(weights=need_shared("fusionmamba_official", "420.pth"))
    fuser = NetworkFuser(lm, device="cpu", batch_size=1)
    assert isinstance(fuser, Fuser)
    assert (fuser.ratio, fuser.ms_bands, fuser.pan_bands, fuser.tile_multiple) == (4, 8, 1, 4)
    assert fuser.halo % fuser.tile_multiple == 0 and 16 <= fuser.halo <= 32 and fuser.needs_stats
    g = need_shared("fusionmamba_official", "golden")
    ms = torch.from_numpy(np.load(g / "b_ms_lr.npy")).float().permute(2, 0, 1)[None, :, :16, :16]
    pan = torch.from_numpy(np.load(g / "b_pan_lr.npy")).float()[None, None, :64, :64]
    ms2, pan2 = torch.cat([ms, ms.flip(-1)]), torch.cat([pan, pan.flip(-1)])
    out = fuser.fuse(pan2, ms2)
    assert out.dtype == torch.float32 and out.shape == (2, 8, 64, 64)
    with torch.inference_mode():
        expect = lm.model(ms2 / 2047, pan2 / 2047) * 2047
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-2)
    # DN in, DN out: band means follow the MS within 5 %
    np.testing.assert_allclose(out[0].mean((1, 2)).numpy(), ms[0].mean((1, 2)).numpy(), rtol=0.05)


@pytest.mark.parametrize(
    ("name", "tile"), [("landsat", 768), ("vhr4", 768), ("hyperion_pan", 512), ("hyperion_hisr", 512)]
)
def test_cpu_default_tile_follows_the_network_size(name: str, tile: int) -> None:
    """On a CPU, narrow networks with few bands (d <= 16, <= 16 bands) take 768-px tiles (the halo is
    a large share of a 512 tile, their windows are small); wide ones or many bands keep 512."""
    fuser = NetworkFuser(load_model(name), device="cpu")
    cfg = fuser.model.config
    assert (cfg.dim <= 16 and cfg.ms_bands <= 16) == (tile == 768)
    assert fuser.preferred_tile == tile


def test_paper_width_network_keeps_512_px_cpu_tiles() -> None:
    """The paper's d = 32 (random weights, 4 bands): 512 on a CPU."""
    from fusion_cli.models.registry import LoadedModel

    _, card = _tiny_card()
    wide = FusionMamba(FusionMambaConfig(ms_bands=4, ratio=2, dim=32))
    card.architecture = wide.config.to_dict()
    lm = LoadedModel(model=wide, card=card, weights_path=None, device=torch.device("cpu"))
    assert NetworkFuser(lm, device="cpu").preferred_tile == 512


def test_fuser_options_and_devices():
    model, card = _tiny_card()
    card.architecture = model.config.to_dict()
    from fusion_cli.models.registry import LoadedModel

    lm = LoadedModel(model=model, card=card, weights_path=None, device=torch.device("cpu"))
    with pytest.raises(FusionError, match="unknown precision"):
        NetworkFuser(lm, device="cpu", precision="int8")
    with pytest.warns(UserWarning, match="CUDA only"):
        assert NetworkFuser(lm, device="cpu", precision="bf16").precision == "fp32"
    assert NetworkFuser(lm, device="cpu", dn_max=4095).dn_max == 4095
    assert resolve_device("cpu") == torch.device("cpu")
    # a tensor's device as torch names it (str(t.device) of a CPU tensor placed with "cpu:0"), and
    # a method name in any case, as make_method reads it, were refused (helper)
    assert resolve_device("cpu:0") == resolve_device(torch.device("cpu", 0)) == torch.device("cpu")
    from fusion_cli.pipeline import make_fuser

    assert make_fuser(method="GSA", ratio=4).name == "gsa"
    with pytest.raises(FusionError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(FusionError, match="CUDA is not available"):
            resolve_device("cuda:0")
        assert resolve_device("auto") == torch.device("cpu")


def test_the_registry_lists_only_models_that_load(wdir):
    """`fusion info` listed models that --model then refused: a card whose name is not its file's
    (listed as 'zzz', unknown to --model zzz), weights '../x' outside the folder (loaded from there),
    missing weights, weights that do not match the card's sha256. Each is skipped with the reason."""
    import warnings

    model, card = _tiny_card()
    save_model(model, card, wdir)
    good = json.loads((wdir / "tiny.json").read_text())
    variants = {
        "renamed": {**good, "name": "zzz"},
        "escape": {**good, "name": "escape", "weights": "../tiny.safetensors"},
        "nost": {**good, "name": "nost", "weights": "nost.safetensors"},
        "badsha": {**good, "name": "badsha", "weights": "badsha.safetensors"},
    }
    for name, fields in variants.items():
        (wdir / f"{name}.json").write_text(json.dumps(fields))
    (wdir / "badsha.safetensors").write_bytes((wdir / "tiny.safetensors").read_bytes() + b" ")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listed = [c.name for c in list_models(check_weights=True)]
    assert listed == ["tiny"]
    reasons = " | ".join(str(w.message) for w in caught)
    for words in ("'zzz' is not its file name", "not a file beside it", "are missing", "sha256"):
        assert words in reasons, reasons
    with pytest.raises(FusionError, match="not a file beside it"):
        load_model("escape")


def test_default_model_hint_for_an_hisr_pair_names_the_hisr_model() -> None:
    """A pair whose high-resolution image has several bands (an MSI: HISR) was told that no installed
    model fits (47 Hyperion bands beside 6 ALI bands at ratio 3, which hyperion_hisr fuses), or to
    pass the single-PAN hyperion_pan (200 AVIRIS bands) (batch, helper)."""
    exact = default_model_mismatch(47, 3, pan_bands=6)
    assert (
        exact is not None
        and "beside a 6-band high-resolution image (HISR); pass --model hyperion_hisr (" in exact
    )
    subset = default_model_mismatch(200, 3, pan_bands=6)
    assert subset is not None and "pass --model hyperion_hisr with --bands choosing its 47 bands" in subset
    assert "hyperion_pan" not in subset
    single_pan = default_model_mismatch(128, 3)  # a PAN beside an HSI: the PAN model, not the HISR one
    assert (
        single_pan is not None and "--model hyperion_pan" in single_pan and "hyperion_hisr" not in single_pan
    )
    assert default_model_mismatch(6, 2, pan_bands=6) is not None  # landsat takes a one-band PAN
    nine = default_model_mismatch(47, 3, pan_bands=9)  # an ALI MSI's nine bands: six of them
    assert nine is not None and "pass --model hyperion_hisr with --pan-bands choosing its 6 (" in nine
    assert default_model_mismatch(8, 2) is None  # more MS bands: landsat's own check names --bands
