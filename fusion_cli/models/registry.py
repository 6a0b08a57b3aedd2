"""The one registry of named models: `weights/<name>.safetensors` + `weights/<name>.json` (the card).

A card says what the weights are for (task, sensor, band order, ratio, DN scale), how they were made
(data, sources, licences, command, time), how good they are (metrics), their licence and the sha256 of the
weights file. The authors' official `.pth` state_dict also loads (`weights_only=True`), with its config
inferred from the tensor shapes and a card describing the WorldView-3 model it is.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fusion_cli import jsonout
from fusion_cli.errors import FusionError, short_list
from fusion_cli.models.fusionmamba import FusionMamba, FusionMambaConfig
from fusion_cli.notices import notify
from fusion_cli.paths import sha256_file, weights_dir
from fusion_cli.raster import atomic_output
from fusion_cli.raster.gdal import reason

TASKS = ("pansharpening", "hs-pansharpening", "hisr")
STATUSES = ("", "stable", "experimental")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_model_name(name: object, where: str = "--name") -> None:
    """A model name is a file stem and a registry key: letters, digits, '_', '-', '.'."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise FusionError(f"{where}: name must be letters, digits, '_', '-', '.' (got {name!r})")


WV3_BANDS = [
    "coastal (400-450 nm)",
    "blue (450-510 nm)",
    "green (510-580 nm)",
    "yellow (585-625 nm)",
    "red (630-690 nm)",
    "red edge (705-745 nm)",
    "NIR1 (770-895 nm)",
    "NIR2 (860-1040 nm)",
]
WV3_PAN = ["PAN (450-800 nm)"]


@dataclass
class ModelCard:
    """Everything a user needs to know before trusting a set of weights."""

    name: str
    task: str
    description: str
    sensor: str
    bands: list[str]  # MS bands in the order the model expects, with wavelengths where known
    pan_bands: list[str]
    ratio: int
    dn_max: float  # inputs are divided by this before the network (the [0, 1] units it was trained on)
    architecture: dict[str, Any] = field(default_factory=dict)  # FusionMambaConfig.to_dict()
    training: dict[str, Any] = field(default_factory=dict)  # data, sources, licences, epochs, command, time
    metrics: dict[str, Any] = field(default_factory=dict)
    licence: str = ""
    weights: str = ""  # file name of the safetensors beside the card
    sha256: str = ""
    default: bool = False
    dn_max_by_dtype: dict[str, float] | None = None  # e.g. {"uint8": 255, "uint16": 65535}
    # "stable" when the held-out tables clear every criterion of `bar`, "experimental" when one is
    # missed, "" when not measured (e.g. the official checkpoint)
    status: str = ""
    bar: dict[str, Any] = field(default_factory=dict)  # the criteria, their values and pass/fail

    def config(self) -> FusionMambaConfig:
        return FusionMambaConfig.from_dict(dict(self.architecture))

    def validate(self) -> None:
        """Raise FusionError naming the first missing or invalid field."""
        where = f"model card {self.name!r}"
        check_model_name(self.name, where)
        if self.task not in TASKS:
            raise FusionError(f"{where}: task must be one of {', '.join(TASKS)} (got {self.task!r})")
        for name in ("description", "sensor", "licence"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise FusionError(f"{where}: field '{name}' is missing or empty")
        for name in ("bands", "pan_bands"):
            value = getattr(self, name)
            if not isinstance(value, list) or not value or not all(isinstance(b, str) for b in value):
                raise FusionError(f"{where}: field '{name}' must be a non-empty list of band names")
        if not isinstance(self.ratio, int) or self.ratio < 2:
            raise FusionError(f"{where}: ratio must be an integer >= 2 (got {self.ratio!r})")
        if not isinstance(self.dn_max, (int, float)) or not math.isfinite(self.dn_max) or self.dn_max <= 0:
            raise FusionError(f"{where}: dn_max must be a positive number (got {self.dn_max!r})")
        if not self.architecture:
            raise FusionError(f"{where}: field 'architecture' is missing")
        cfg = self.config()
        checks = (
            ("MS bands", len(self.bands), cfg.ms_bands),
            ("PAN bands", len(self.pan_bands), cfg.pan_bands),
            ("ratio", self.ratio, cfg.ratio),
        )
        for what, card_value, arch_value in checks:
            if card_value != arch_value:
                raise FusionError(
                    f"{where}: {what} {card_value} disagree with the architecture's {arch_value}"
                )
        for name in ("training", "metrics", "bar"):
            if not isinstance(getattr(self, name), dict):
                raise FusionError(f"{where}: field '{name}' must be a mapping")
        if self.status not in STATUSES:
            raise FusionError(f"{where}: status must be one of {', '.join(map(repr, STATUSES))}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "card") -> ModelCard:
        known = {f.name for f in fields(cls)}
        required = ["name", "task", "description", "sensor", "bands", "pan_bands", "ratio", "dn_max"]
        missing = [k for k in required if k not in data]
        if missing:
            raise FusionError(f"{source}: missing field(s) {', '.join(missing)}")
        card = cls(**{k: v for k, v in data.items() if k in known})
        extra = {k: v for k, v in data.items() if k not in known}
        if extra:  # keep unknown fields instead of dropping them
            card.training = dict(card.training, extra=dict(card.training.get("extra", {}), **extra))
        return card


@dataclass
class LoadedModel:
    model: FusionMamba  # in eval mode, on `device`
    card: ModelCard
    weights_path: Path | None
    device: torch.device


# A card is a few KiB of JSON; anything far larger is not a card (and is not read into memory).
MAX_CARD_BYTES = 1 << 20


def _read_card(path: Path) -> ModelCard:
    try:
        if path.stat().st_size > MAX_CARD_BYTES:
            raise FusionError(f"model card {path} is over {MAX_CARD_BYTES >> 20} MiB: not a model card")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FusionError(f"cannot read model card {path}: {exc}") from None
    except RecursionError:  # a deeply nested document
        raise FusionError(f"model card {path} is nested too deeply: not a model card") from None
    if not isinstance(data, dict):
        raise FusionError(f"model card {path} is not a JSON object")
    card = ModelCard.from_dict(data, source=str(path))
    card.validate()
    return card


def list_models(directory: Path | None = None, check_weights: bool = False) -> list[ModelCard]:
    """Valid cards in the weights folder, sorted by name (broken cards are skipped with a warning).

    A card is a registry entry only as `NAME.json` naming `NAME` and weights in the same folder (a
    card named otherwise was listed but unknown to --model; weights '../x' loaded from outside).
    `check_weights` (fusion info) also skips cards whose weights are missing or differ from the
    card's sha256, which --model would refuse: a listing should show what runs."""
    folder = Path(directory) if directory is not None else weights_dir()
    if not folder.is_dir():  # `fusion info` says so (`missing_folder`); a run's error names it
        return []
    cards = []
    for path in sorted(folder.glob("*.json")):
        try:
            card = _read_card(path)
            if card.name != path.stem:
                raise FusionError(f"its name {card.name!r} is not its file name; rename one of them")
            weights = card.weights or f"{card.name}.safetensors"
            if Path(weights).name != weights:
                raise FusionError(f"its weights {weights!r} are not a file beside it")
            if check_weights:
                if not (folder / weights).is_file():
                    raise FusionError(f"its weights {weights} are missing")
                if card.sha256 and sha256_file(folder / weights) != card.sha256:
                    raise FusionError(f"{weights} does not match the card's sha256 (changed or damaged)")
            cards.append(card)
        except FusionError as exc:
            notify(f"skipping {path.name}: {exc}")
    return cards


def missing_folder(folder: Path) -> str:
    """What is wrong with a weights folder that is not a folder (a mistyped $FUSION_WEIGHTS_DIR)."""
    source = " ($FUSION_WEIGHTS_DIR)" if os.environ.get("FUSION_WEIGHTS_DIR") == str(folder) else ""
    return f"is not a folder{source}" if folder.exists() else f"does not exist{source}"


def default_model_name(directory: Path | None = None, task: str | None = None) -> str:
    """Name of the card marked `"default": true`; for a `task` (e.g. "hisr"), the default card of that
    task, else its only card: a pansharpening model is no default for another task."""
    cards = list_models(directory)
    if task is not None:
        mine = [c for c in cards if c.task == task]
        cards = [c for c in mine if c.default] or (mine if len(mine) == 1 else [])
    defaults = [c.name for c in cards if c.default or task is not None]
    if not defaults:
        folder = directory or weights_dir()
        what = "default model" if task is None else f"default {task} model"
        missing = "" if folder.is_dir() else f", which {missing_folder(folder)}"
        raise FusionError(
            f"no {what} is installed in {folder}{missing} (point FUSION_WEIGHTS_DIR at a folder of cards, or "
            "pass --weights FILE or --model NAME, or a classical --method; `fusion info` lists the models)"
        )
    return "landsat" if "landsat" in defaults else defaults[0]


def default_model_mismatch(
    ms_bands: int, ratio: int, directory: Path | None = None, pan_bands: int = 1
) -> str | None:
    """Why the default pansharpening model cannot fuse an MS of `ms_bands` bands at `ratio` beside a
    high-resolution image of `pan_bands` bands (more than one: an MSI, HISR), and which installed
    models can (None when it can, also from a choice of the bands: its band check names --bands
    then): run before loading it, so that a user who left out --model learns which one to pass rather
    than that "the model" expects another ratio."""
    cards = {c.name: c for c in list_models(directory)}
    card = cards.get(default_model_name(directory))

    def picks(c: ModelCard) -> list[str] | None:
        """The band choices that make the pair fit card `c` ([] as it is), None where none does: more
        MS bands by --bands, more MSI bands by --pan-bands (an HISR model's; a PAN is one band)."""
        pan_ok = len(c.pan_bands) == pan_bands or 1 < len(c.pan_bands) < pan_bands
        if c.ratio != ratio or len(c.bands) > ms_bands or not pan_ok:
            return None
        said = []
        if len(c.bands) != ms_bands:
            said.append(f"--bands choosing its {len(c.bands)} bands ({short_list(c.bands)})")
        if len(c.pan_bands) != pan_bands:
            said.append(f"--pan-bands choosing its {len(c.pan_bands)} ({short_list(c.pan_bands)})")
        return said

    if card is None or (picks(card) is not None and len(card.pan_bands) == pan_bands):
        return None  # its band check names --bands where the MS has more
    fitting = {c.name: said for c in cards.values() if (said := picks(c)) is not None}
    exact = [name for name, said in fitting.items() if not said]
    if exact:
        hint = "pass " + " or ".join(f"--model {name}" for name in exact)
    elif fitting:
        hint = "pass " + " or ".join(
            f"--model {name} with {' and '.join(said)}" for name, said in fitting.items()
        )
    else:
        hint = (
            "no installed model fits it: pass a classical --method, or --weights for a model trained "
            "on such data"
        )
    high = f" beside a {pan_bands}-band high-resolution image (HISR)" if pan_bands > 1 else ""
    return (
        f"the default model {card.name} fuses {len(card.bands)} MS bands at ratio {card.ratio}, but this "
        f"pair has {ms_bands} bands at ratio {ratio}{high}; {hint} (`fusion info` lists them)"
    )


# ---------------------------------------------------------------------------------------------
# Official checkpoints


def infer_config(state: dict[str, torch.Tensor], source: str = "checkpoint") -> FusionMambaConfig:
    """FusionMambaConfig from the tensor shapes of a FusionMamba state_dict."""
    keys = {
        "up": "upsample.upsamle.0.weight",
        "pan": "raise_pan_dim.0.weight",
        "A": "stage0.fm.spa_mamba_layers.0.block.A_log",
        "conv": "stage0.fm.spa_mamba_layers.0.block.conv1d.weight",
        "in": "stage0.fm.spa_mamba_layers.0.block.in_proj.weight",
        "attn": "spe_attn.block.0.weight",
    }
    missing = [k for k in keys.values() if k not in state]
    if missing:
        raise FusionError(f"{source} is not a FusionMamba state_dict (no tensor {missing[0]})")
    up = state[keys["up"]].shape
    ms_bands = int(up[1])
    ratio = math.isqrt(int(up[0]) // ms_bands)
    dim = int(state[keys["pan"]].shape[0])
    return FusionMambaConfig(
        ms_bands=ms_bands,
        pan_bands=int(state[keys["pan"]].shape[1]),
        ratio=ratio,
        dim=dim,
        d_state=int(state[keys["A"]].shape[1]),
        d_conv=int(state[keys["conv"]].shape[-1]),
        expand=int(state[keys["in"]].shape[0]) // (2 * dim),
        attn_dim=int(state[keys["attn"]].shape[0]),
    )


def _official_card(path: Path, cfg: FusionMambaConfig, sha: str) -> ModelCard:
    wv3 = cfg.ms_bands == 8 and cfg.ratio == 4 and cfg.pan_bands == 1
    return ModelCard(
        name=re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem) or "checkpoint",
        task="pansharpening" if cfg.pan_bands == 1 else "hisr",
        description=f"official FusionMamba checkpoint {path.name} (PSRben/FusionMamba)",
        sensor="WorldView-3" if wv3 else "unknown",
        bands=list(WV3_BANDS) if wv3 else [f"band {i + 1}" for i in range(cfg.ms_bands)],
        pan_bands=list(WV3_PAN) if wv3 else [f"pan {i + 1}" for i in range(cfg.pan_bands)],
        ratio=cfg.ratio,
        dn_max=2047.0 if wv3 else 1.0,
        architecture=cfg.to_dict(),
        training={"source": "authors' release, trained on the PanCollection WV3 data (DN / 2047)"},
        licence="none stated by the authors; not redistributable",
        weights=path.name,
        sha256=sha,
    )


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle errors, truncated files, non-tensor payloads refused by weights_only
        raise FusionError(f"cannot load {path} as a PyTorch state_dict: {reason(exc)[:160]}") from None
    while isinstance(obj, dict) and (
        key := next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
    ):
        obj = obj[key]  # {"state_dict": {"model": ...}} nests them
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FusionError(f"{path} does not hold a state_dict of tensors")
    return _unwrapped_names(obj)


# Where training scripts keep the weights in a checkpoint dict (beside the optimizer, epoch...)
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "network", "ema")
# Prefixes a wrapper adds to every name: DataParallel/DistributedDataParallel, torch.compile
_NAME_PREFIXES = ("module.", "_orig_mod.")


def _unwrapped_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the prefix a training wrapper put on every tensor name taken off (a FusionMamba
    fine-tuned under DistributedDataParallel saves `module.stem...`), repeatedly for stacked ones."""
    while state:
        prefix = next((p for p in _NAME_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# Loading and saving


def build_model(
    state: dict[str, torch.Tensor], cfg: FusionMambaConfig, source: str, scan_backend: str | None = None
) -> FusionMamba:
    """A FusionMamba with `cfg` and the tensors of `state`; a FusionError names any mismatch."""
    if scan_backend is not None:
        cfg = FusionMambaConfig.from_dict(dict(cfg.to_dict(), scan_backend=scan_backend))
    with torch.random.fork_rng(devices=[]):  # the random init, replaced below, draws from the caller's RNG
        # float32 whatever the caller's default dtype: the pipeline feeds float32 (a float64 default
        # made a model that failed at fuse time on a raw torch dtype error)
        model = FusionMamba(cfg).float()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        k, got, want = wrong[0]
        hint = ""
        if k == "upsample.upsamle.0.weight":
            hint = f" (the checkpoint is for {got[1]} MS bands, the model for {want[1]})"
        raise FusionError(
            f"{source} does not fit the model: tensor {k} is {got} but the model needs {want}{hint}; "
            f"{len(wrong)} tensor(s) differ"
        )
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise FusionError(
            f"{source} does not fit the model: {len(missing)} tensor(s) missing, "
            f"{len(unexpected)} unexpected (first: {name})"
        )
    model.load_state_dict(state, strict=True)
    return model


def load_model(
    name: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    scan_backend: str | None = None,
) -> LoadedModel:
    """Load a model by registry name, by file, or the default one.

    `weights`: a card + safetensors pair (path to either file) or an official `.pth`/`.pt` state_dict.
    With both `name` and a `.pth`, the named card's architecture is used and the file must fit it.
    """
    dev = torch.device(device)
    card: ModelCard | None = None
    if name is not None:
        card_path = weights_dir() / f"{name}.json"
        if not card_path.is_file():
            folder = weights_dir()
            names = ", ".join(c.name for c in list_models()) or (
                "none installed" if folder.is_dir() else f"none: {folder} {missing_folder(folder)}"
            )
            raise FusionError(f"unknown model {name!r} (available: {names}); `fusion info` lists them")
        card = _read_card(card_path)
    if weights is None:
        if card is None:
            return load_model(default_model_name(), device=dev, scan_backend=scan_backend)
        file = card.weights or f"{card.name}.safetensors"
        if Path(file).name != file:  # a registry model's weights live beside its card
            raise FusionError(f"model {card.name}: its card names weights {file!r}, not a file beside it")
        path = weights_dir() / file
    else:
        path = Path(weights)
    if not path.exists():
        raise FusionError(f"weights file not found: {path}")
    if path.suffix in (".pth", ".pt"):
        state = _torch_load(path)
        sha = sha256_file(path)
        if card is None:
            card = _official_card(path, infer_config(state, str(path)), sha)
    elif path.suffix in (".safetensors", ".json"):
        card_path, st_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        for p in (card_path, st_path):
            if not p.is_file():
                raise FusionError(
                    f"{p} not found: a model is a .safetensors file with its .json card beside it"
                )
        card = _read_card(card_path)  # a pair describes itself
        sha = sha256_file(st_path)
        if card.sha256 and card.sha256 != sha:
            raise FusionError(
                f"{st_path} does not match the sha256 in its card {card_path.name}: file changed?"
            )
        from safetensors.torch import load_file

        try:
            state = load_file(str(st_path))
        except Exception as exc:
            raise FusionError(f"cannot read {st_path}: {reason(exc)[:160]}") from None
        path = st_path
    else:
        raise FusionError(
            f"unsupported weights file {path.name}: use a .safetensors (with its .json card) or .pth"
        )
    model = build_model(state, card.config(), str(path), scan_backend)
    model.to(dev).eval()
    return LoadedModel(model=model, card=card, weights_path=path, device=dev)


def save_model(model: FusionMamba, card: ModelCard, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.safetensors` (no pickle) and `<name>.json` with the weights' sha256."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["scan_backend"] = None  # a run-time choice, not part of the architecture
    if card.architecture:
        # from_dict fills fields older cards lack (base, scan_memory) with their defaults
        declared = FusionMambaConfig.from_dict({**card.architecture, "scan_backend": None}).to_dict()
        if declared != cfg:
            raise FusionError(f"card {card.name!r} architecture {declared} differs from the model's {cfg}")
    card.architecture = cfg
    card.weights = f"{card.name}.safetensors"
    card.sha256 = ""
    card.validate()
    weights_path, card_path = out / card.weights, out / f"{card.name}.json"
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_output(weights_path, overwrite=True, what="weights") as tmp:
        # bytes written by open(): the umask's mode, as the card's (save_file made it owner-only, 0600,
        # so a model trained on a shared machine could not be read by the colleagues it was for)
        tmp.write_bytes(save(state, metadata={"name": card.name, "format": "fusion-cli FusionMamba"}))
        card.sha256 = sha256_file(tmp)
    write_card(card_path, card.to_dict())
    return weights_path, card_path


def write_card(path: str | os.PathLike[str], card: dict[str, Any]) -> None:
    """Write a card's JSON atomically (temporary file, then rename): a reader never sees half a card."""
    with atomic_output(path, overwrite=True, what="model card") as tmp:
        tmp.write_text(jsonout.dumps(card, indent=2) + "\n")  # a NaN figure as null: strict JSON
