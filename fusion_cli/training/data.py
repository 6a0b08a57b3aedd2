"""Training data: real scenes -> Wald-reduced training pairs -> random augmented patches.

A *scene* is one co-registered real pair at its native resolution (PAN + MS, PAN + HSI, or MSI + HSI
for HISR). Training pairs are built once per scene with the project's Wald degradation
(`fusion_cli.wald` / `fusion_cli.mtf`), so the network trains on exactly the degradation that
`fusion simulate` and `fusion evaluate` use: the reduced inputs are the network's inputs and the
original MS (or HSI) is the target.

Validation is split by scene (or by spatially separate parts of a scene, cut *before* degradation so
no filter support crosses the cut), never by patch: patches of one scene overlap and share content.

Array conventions: a scene holds `pan (P, H, W)` and `ms (C, h, w)` in DN, float32, H = ratio * h.
A `TrainPair` holds `pan (P, H, W)`, `ms (C, H/r, W/r)` and `ref (C, H, W)` in network units
(DN / dn_max), where H, W are the *reduced* PAN grid. Batches are torch tensors `(B, C, H, W)`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fusion_cli.align import size_ratio
from fusion_cli.errors import FusionError

TASKS = ("pansharpening", "hs-pansharpening", "hisr")


@dataclass
class Scene:
    """One real pair at native resolution. `pan` is the high-resolution input (a PAN band or, for
    HISR, an MSI), `ms` the low-resolution one (MS or HSI); both float32 DN."""

    name: str
    pan: np.ndarray  # (P, H, W)
    ms: np.ndarray  # (C, h, w)
    ratio: int  # H / h; 1 for HISR scenes whose HSI and MSI share a grid
    dn_max: float  # DN that maps to 1.0 in network units
    sensor: str | None = None  # key of fusion_cli.sensors (MTF gains for the degradation)
    sensor_bands: list[int] | None = None  # 1-based sensor band numbers when `ms` holds a subset
    group: str = ""  # scenes of one group (acquisition, path/row) go to the same split
    source: str = ""
    licence: str = ""
    band_names: list[str] = field(default_factory=list)
    pan_band_names: list[str] = field(default_factory=list)
    # The high-resolution input was synthesised on the MS grid (ratio 1), e.g. a PAN made from a
    # hyperspectral cube: only the MS is reduced to build the training pair, as for HISR.
    simulated: bool = False

    def crop_rows(self, start: float, stop: float) -> Scene:
        """Rows [start, stop) as fractions of the height: a spatially separate part of the scene,
        cut on the low-resolution grid so both inputs stay aligned."""
        h = self.ms.shape[1]
        a, b = int(round(start * h)), int(round(stop * h))
        r = self.ratio
        part = f"{self.name}[rows {start:.2f}-{stop:.2f}]"
        return replace(self, name=part, ms=self.ms[:, a:b], pan=self.pan[:, a * r : b * r])

    def crop_cols(self, start: float, stop: float) -> Scene:
        """Columns [start, stop) as fractions of the width (see `crop_rows`)."""
        w = self.ms.shape[2]
        a, b = int(round(start * w)), int(round(stop * w))
        r = self.ratio
        part = f"{self.name}[cols {start:.2f}-{stop:.2f}]"
        return replace(self, name=part, ms=self.ms[:, :, a:b], pan=self.pan[:, :, a * r : b * r])

    def select_bands(self, idx: Sequence[int], names: Sequence[str] | None = None) -> Scene:
        """Keep MS bands `idx` (0-based) in that order, e.g. to reorder red, green, blue -> blue, ..."""
        new_names = list(names) if names is not None else [self.band_names[i] for i in idx]
        return replace(self, ms=self.ms[list(idx)], band_names=new_names)


@dataclass
class TrainPair:
    """Reduced-resolution inputs and the native-resolution target, in network units."""

    name: str
    pan: np.ndarray  # (P, H, W) reduced PAN (or, for HISR, the MSI at its own resolution)
    ms: np.ndarray  # (C, H/r, W/r) reduced MS / HSI
    ref: np.ndarray  # (C, H, W) the original MS / HSI: the target
    ratio: int
    base: np.ndarray | None = None  # (C, H, W) a classical base method's product (see `attach_base`)
    patch: bool = False  # one patch of an HDF5 set (PanCollection), not a scene


# --------------------------------------------------------------------------------------------- reading


def read_raster(path: str | Path) -> np.ndarray:
    """Whole raster as float32 `(bands, rows, cols)` in DN; a one-line error if it cannot be read."""
    from fusion_cli import raster

    with raster.gdal_env(), raster.open_raster(path, "training input") as ds:
        data, valid, _ = raster.read_whole(ds, "training input")  # an alpha band masks, not learned
    data = data.astype(np.float32)
    if valid is not None and not valid.all():
        # a collar would be learned as data, and scored as such in validation (a 90 %-nodata scene's
        # L1 looked excellent): the same rule as for NaN below
        raise FusionError(
            f"training input {path} has {int((~valid).sum())} px of nodata ({(~valid).mean():.1%}): training "
            "needs every pixel valid; crop the pair to its valid area"
        )
    # NaN or inf (a float nodata) turn the first loss into NaN, which then read as "training diverged"
    bad = int((~np.isfinite(data)).any(axis=0).sum())
    if bad:
        raise FusionError(
            f"training input {path} has NaN or infinite values ({bad} px, e.g. a float nodata): training "
            "needs every pixel valid; crop the pair to its valid area or fill them"
        )
    return data


def raster_dtype(path: str | Path) -> str:
    return _describe(path)[0]


def _describe(path: str | Path) -> tuple[str, list[str]]:
    """(dtype, band descriptions, "band N" where a band has none)."""
    from fusion_cli import raster

    with raster.gdal_env(), raster.open_raster(path, "training input") as ds:
        return ds.dtypes[0], raster.band_descriptions(ds, range(1, ds.count + 1))


def default_dn_max(dtype: str) -> float:
    """The DN that maps to 1.0 when nothing better is known: the full range of the integer type.

    Float data (reflectance-like) are taken as already in [0, 1] units.
    """
    return {"uint8": 255.0, "uint16": 65535.0, "int16": 32767.0, "uint32": 4294967295.0}.get(dtype, 1.0)


# Role tokens in file names: the high-resolution input is "pan" (or "msi"/"ms" for HISR), the
# low-resolution one "ms" (or "hs"/"hsi"). The rest of the name pairs the files: `3_pan.tif` with
# `3_ms.tif`, `pan_2.tif` with `ms_2.tif`, `pan.tif` with `ms.tif`.
_ROLE_TOKENS = {
    "pansharpening": (("pan", "p"), ("ms", "mul", "mss")),
    "hs-pansharpening": (("pan", "p"), ("hs", "hsi")),
    "hisr": (("ms", "msi"), ("hs", "hsi")),
}


def find_pairs(folder: str | Path, task: str = "pansharpening") -> list[tuple[Path, Path]]:
    """(high-res, low-res) GeoTIFF pairs in a folder, matched by name (see `_ROLE_TOKENS`) with the
    batch's pairing rule (`batch.pairing.group_by_role`).

    Raises a FusionError when nothing pairs, listing what was found, so a wrong folder or naming
    scheme is obvious, and when a name stem has several files of one role.
    """
    from fusion_cli.batch.pairing import group_by_role, token_key

    if task not in _ROLE_TOKENS:
        raise FusionError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file; give the folder of training pairs" if folder.exists() else "not found"
        raise FusionError(f"training folder {folder}: {what}")
    hi_tokens, lo_tokens = _ROLE_TOKENS[task]
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in {".tif", ".tiff"})
    hi, lo = group_by_role(files, token_key(hi_tokens), token_key(lo_tokens), hi_wins=True)
    keys = sorted(set(hi) & set(lo), key=_natural)
    if not keys:
        names = ", ".join(files[:8]) or "no .tif files"
        raise FusionError(
            f"no {task} pairs found in {folder} ({names}); name them like 1_pan.tif + 1_ms.tif "
            "(or hs/msi for hyperspectral data)"
        )
    for k in keys:
        if len(hi[k]) > 1 or len(lo[k]) > 1:
            raise FusionError(f"ambiguous pair in {folder}: {', '.join(hi[k] + lo[k])}; keep one of each")
    return [(folder / hi[k][0], folder / lo[k][0]) for k in keys]


def _natural(text: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def load_scene(
    pan_path: str | Path,
    ms_path: str | Path,
    *,
    ratio: int | None = None,
    dn_max: float | None = None,
    sensor: str | None = None,
    group: str | None = None,
    pan_shift: tuple[float, float] = (0.0, 0.0),
    source: str = "",
    licence: str = "",
) -> Scene:
    """Read one pair. `ratio` defaults to the size ratio of the files; `dn_max` to the MS dtype's range.

    `pan_shift` (dy, dx) is a known misregistration in PAN pixels, meaning PAN content sits dy rows
    lower and dx columns further right than the area-aligned MS; it is compensated (see
    `compensate_shift`) so the network does not learn the shift.
    """
    pan = read_raster(pan_path)
    ms = read_raster(ms_path)
    if ratio is None:
        ratio = size_ratio(pan.shape, ms.shape)
        if ratio is None:
            raise FusionError(
                f"{Path(pan_path).name} {pan.shape[1:]} is not an integer multiple of "
                f"{Path(ms_path).name} {ms.shape[1:]}; give --ratio"
            )
    dtype, names = _describe(ms_path)
    pan_names = _describe(pan_path)[1]
    scene = Scene(
        name=Path(ms_path).stem,
        pan=pan,
        ms=ms,
        ratio=int(ratio),
        dn_max=float(dn_max) if dn_max else default_dn_max(dtype),
        sensor=sensor,
        group=group if group is not None else Path(ms_path).stem,
        source=source or str(Path(ms_path).parent),
        licence=licence,
        band_names=names,
        pan_band_names=pan_names,
    )
    if pan_shift != (0.0, 0.0):
        scene = compensate_shift(scene, pan_shift)
    return trim_to_ratio(scene)


def compensate_shift(scene: Scene, shift: tuple[float, float]) -> Scene:
    """Undo a known PAN-vs-MS content offset of (dy, dx) PAN pixels.

    An integer shift is compensated exactly by
    cropping (the FuseBox case, (-1, -1): `pan[r, c]` shows MS position (r+1, c+1), so dropping one
    MS row/column and the matching PAN rows aligns them without resampling). A fractional shift (the
    Landsat-8 half PAN pixel) resamples the PAN with a cubic spline; the Wald reduction that follows
    removes the little smoothing this adds.
    """
    from scipy import ndimage

    dy, dx = shift
    r = scene.ratio
    pan, ms = scene.pan, scene.ms
    if float(dy).is_integer() and float(dx).is_integer():
        # Aligned PAN at position p is pan[p + dy]; keep MS pixels whose PAN footprint is inside.
        m = int(np.ceil(max(abs(dy), abs(dx)) / r))  # MS pixels to drop on each side
        h, w = ms.shape[1] - 2 * m, ms.shape[2] - 2 * m
        y0, x0 = m * r + int(dy), m * r + int(dx)
        pan = pan[:, y0 : y0 + h * r, x0 : x0 + w * r]
        ms = ms[:, m : m + h, m : m + w]
    else:
        # aligned[p] = pan[p + d]; ndimage.shift(x, s)[p] = x[p - s], hence s = -d.
        pan = np.stack([ndimage.shift(b, (-dy, -dx), order=3, mode="nearest") for b in pan]).astype(
            np.float32
        )
        m = int(np.ceil(max(abs(dy), abs(dx)) / r))
        if m:
            h, w = ms.shape[1] - 2 * m, ms.shape[2] - 2 * m
            pan = pan[:, m * r : (m + h) * r, m * r : (m + w) * r]
            ms = ms[:, m : m + h, m : m + w]
    return replace(scene, pan=np.ascontiguousarray(pan), ms=np.ascontiguousarray(ms))


def trim_to_ratio(scene: Scene) -> Scene:
    """Drop trailing PAN rows/columns beyond ratio * MS size (e.g. Landsat-8's extra PAN row). A PAN
    a whole MS pixel or more larger than that is another ratio (or another area): refused, as cutting
    it would train on pairs that do not show the same ground."""
    r = scene.ratio
    h, w = scene.ms.shape[1:]
    if scene.pan.shape[1] < h * r or scene.pan.shape[2] < w * r:
        raise FusionError(
            f"scene {scene.name}: PAN {scene.pan.shape[1:]} smaller than {r} x MS {scene.ms.shape[1:]}"
        )
    if scene.pan.shape[1] >= (h + 1) * r or scene.pan.shape[2] >= (w + 1) * r:
        raise FusionError(
            f"scene {scene.name}: PAN {tuple(scene.pan.shape[1:])} is more than {r} x MS "
            f"{tuple(scene.ms.shape[1:])}: the pair is not {r} apart; check --ratio, or that the two "
            "files cover the same area"
        )
    return replace(scene, pan=scene.pan[:, : h * r, : w * r])


# ------------------------------------------------------------------------------------ Wald reduction


def reduce_scene(
    scene: Scene, ratio: int, task: str = "pansharpening", pan_mode: str = "bicubic"
) -> TrainPair:
    """Build the training pair of one scene with the shared Wald degradation.

    Pansharpening and hyperspectral pansharpening: PAN and MS are both reduced by `ratio` and the
    original MS is the target (`fusion_cli.wald.simulate_arrays`). HISR scenes come with the HSI and
    the MSI on one grid (ratio 1): only the HSI is reduced (MTF filter and decimation), the MSI stays
    as the high-resolution input and the original HSI is the target; so is a `simulated` scene.
    """
    if task == "hisr" or scene.simulated:
        from fusion_cli.mtf import degrade_ms
        from fusion_cli.sensors import nyquist_gains

        if scene.ratio != 1:
            kind = "simulated" if scene.simulated else "HISR"
            raise FusionError(f"{kind} scene {scene.name} must have both inputs on one grid (ratio 1)")
        c, h, w = scene.ms.shape
        h, w = h - h % ratio, w - w % ratio
        ref = scene.ms[:, :h, :w]
        gains, _ = nyquist_gains(scene.sensor, c, scene.sensor_bands)
        ms_lr = np.asarray(degrade_ms(ref, gains, ratio), dtype=np.float32)
        pan_hr = scene.pan[:, :h, :w]
    else:
        from fusion_cli.wald import simulate_arrays

        if scene.ratio != ratio:
            raise FusionError(f"scene {scene.name} has ratio {scene.ratio}, the model {ratio}")
        # Trim so that the reduced grids are whole: MS to a multiple of the ratio.
        c, h, w = scene.ms.shape
        h, w = h - h % ratio, w - w % ratio
        ms = scene.ms[:, :h, :w]
        pan = scene.pan[:, : h * ratio, : w * ratio]
        try:
            pan_lr, ms_lr, ref = simulate_arrays(pan, ms, ratio, scene.sensor, pan_mode, scene.sensor_bands)
        except FusionError as exc:  # which scene (and which part of it: a validation split's rows)
            raise FusionError(f"{scene.name}: {exc}") from None
        pan_hr, ms_lr, ref = np.asarray(pan_lr), np.asarray(ms_lr), np.asarray(ref)
        if pan_hr.ndim == 2:
            pan_hr = pan_hr[None]
    s = 1.0 / scene.dn_max
    return TrainPair(
        name=scene.name,
        pan=np.ascontiguousarray(pan_hr, dtype=np.float32) * s,
        ms=np.ascontiguousarray(ms_lr, dtype=np.float32) * s,
        ref=np.ascontiguousarray(ref, dtype=np.float32) * s,
        ratio=ratio,
    )


def attach_base(pairs: Iterable[TrainPair], method: str, sensor: str | None = None) -> list[TrainPair]:
    """Each pair with `base`: the classical `method`'s product on its reduced inputs, the global
    residual of a model whose config names that method. Statistics are fitted on the whole pair, as
    the pipeline's statistics pass fits them on a whole scene. The methods are linear in the DN
    scale, so they run in network units directly."""
    from fusion_cli.classical import make_method
    from fusion_cli.sensors import sensor_or_generic

    out: list[TrainPair] = []
    for p in pairs:
        if p.base is None:
            pan, ms = torch.from_numpy(p.pan)[None], torch.from_numpy(p.ms)[None]
            fuser = make_method(
                method, p.ratio, sensor_or_generic(sensor), ms_bands=p.ms.shape[0], pan_bands=p.pan.shape[0]
            )
            base = fuser.fit(pan, ms).fuse(pan, ms)[0].numpy()
            p = replace(p, base=np.ascontiguousarray(base, dtype=np.float32))
        out.append(p)
    return out


# ----------------------------------------------------------------------------------------- HDF5 sets


def load_h5(path: str | Path, dn_max: float, ratio: int | None = None) -> list[TrainPair]:
    """PanCollection-style HDF5: `gt (N, C, H, W)`, `ms (N, C, h, w)`, `pan (N, 1, H, W)` (`lms` is
    not needed: the network upsamples itself). Upper-case keys (`GT`, `MS`/`LRHSI`/`HSI`, `PAN`/`RGB`/
    `HRMSI`) of the hyperspectral collections are accepted. Values are DN, divided by `dn_max`.

    Each stored patch becomes one pair; the patches of one file come from the same scenes, so the
    validation data must be a separate file (PanCollection ships `valid_*.h5`).
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FusionError(f"HDF5 training file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FusionError(f"cannot open {path} as HDF5 ({exc})") from None
    with f:
        keys = {k.lower(): k for k in f.keys()}

        def pick(*names: str) -> np.ndarray:
            for n in names:
                if n in keys:
                    return np.asarray(f[keys[n]], dtype=np.float32)
            raise FusionError(f"{path.name} has no {'/'.join(names)} dataset (found: {', '.join(f.keys())})")

        gt = pick("gt")
        ms = pick("ms", "lrhsi", "hsi", "lr_hsi")
        pan = pick("pan", "hrmsi", "rgb", "msi", "hr_msi")
    if pan.ndim == 3:
        pan = pan[:, None]
    if not (gt.ndim == ms.ndim == pan.ndim == 4) or len({len(gt), len(ms), len(pan)}) != 1:
        raise FusionError(f"{path.name}: expected (N, C, H, W) datasets of equal N")
    r = size_ratio(gt.shape, ms.shape, exact=True)
    if r is None:
        raise FusionError(f"{path.name}: gt {gt.shape[2:]} is not an integer multiple of ms {ms.shape[2:]}")
    if ratio is not None and r != ratio:
        raise FusionError(f"{path.name} holds ratio-{r} patches, not {ratio}")
    if len(gt) == 0:
        raise FusionError(f"{path.name} holds no patches")
    if pan.shape[2:] != gt.shape[2:]:
        raise FusionError(
            f"{path.name}: pan {pan.shape[2:]} and gt {gt.shape[2:]} differ in size; they share a grid"
        )
    for name, data in (("gt", gt), ("ms", ms), ("pan", pan)):
        bad = int((~np.isfinite(data)).sum())
        if bad:  # as for GeoTIFF inputs: a NaN loss would read as "training diverged"
            raise FusionError(f"{path.name}: its {name} has {bad} NaN or infinite values; fill them first")
    s = 1.0 / dn_max
    return [
        TrainPair(name=f"{path.stem}#{i}", pan=pan[i] * s, ms=ms[i] * s, ref=gt[i] * s, ratio=r, patch=True)
        for i in range(len(gt))
    ]


def pair_digest(pair: TrainPair) -> str:
    """A fingerprint of a pair's pixels (PAN, MS, target; not its name): the same scene under another
    name is the same pair."""
    h = hashlib.blake2b(digest_size=16)
    for a in (pair.pan, pair.ms, pair.ref):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


# An overlap is looked for as an exact BLOCK x BLOCK block of target pixels (every band) that both a
# validation and a training pair hold: the larger side is probed at every STEP px, the smaller indexed at
# every position, so any overlap of at least BLOCK + STEP - 1 px on a side is found.
BLOCK, STEP = 8, 8
MIN_LEVELS, MAX_CANDIDATES = 8, 64
_KEY_SAMPLES = [(u, v) for u in range(0, BLOCK, 2) for v in range(0, BLOCK, 2)]
_KEY_MULTIPLIERS = np.random.default_rng(20261206).integers(1, 2**63, len(_KEY_SAMPLES), dtype=np.uint64) | 1


def _block_keys(band: np.ndarray) -> np.ndarray:
    """Keys `(H - BLOCK + 1, W - BLOCK + 1)` uint64 of every block of a `(H, W)` band, from 16 of its
    pixels' bits: equal blocks have equal keys; unequal ones rarely do, and matches are verified."""
    bits = np.ascontiguousarray(band, dtype=np.float32).view(np.uint32).astype(np.uint64)
    h, w = band.shape[0] - BLOCK + 1, band.shape[1] - BLOCK + 1
    key = np.zeros((h, w), np.uint64)
    for (u, v), m in zip(_KEY_SAMPLES, _KEY_MULTIPLIERS, strict=True):
        key = key * np.uint64(1099511628211) ^ bits[u : u + h, v : v + w] * m  # wraps, as hashes do
    return key


def _levels(band: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """How many distinct values each probed BLOCK x BLOCK block (every STEP px, `shape` of them) of a
    `(H, W)` band holds."""
    windows = np.lib.stride_tricks.sliding_window_view(band, (BLOCK, BLOCK))[::STEP, ::STEP]
    values = np.sort(windows[: shape[0], : shape[1]].reshape(*shape, BLOCK * BLOCK), axis=-1)
    return 1 + np.count_nonzero(np.diff(values, axis=-1), axis=-1)


def shared_block(val_pairs: Sequence[TrainPair], train_pairs: Sequence[TrainPair]) -> str | None:
    """A validation pair whose target shares pixels with a training pair's (a crop of a training scene,
    two scenes cut from one image: FuseBox pairs 10 and 11 share a 29 x 40 MS-px corner), said as
    "<val> at (row, col) is <train> at (row, col)"; None when no BLOCK x BLOCK block is shared. Its
    validation scores would be training scores."""
    sides = [list(val_pairs), list(train_pairs)]
    pixels = [sum(p.ref.shape[1] * p.ref.shape[2] for p in side) for side in sides]
    indexed, probed = (0, 1) if pixels[0] <= pixels[1] else (1, 0)
    keys, starts, widths, owners = [], [0], [], []  # block n of pair owners[k] is starts[k] + n
    for i, pair in enumerate(sides[indexed]):
        if min(pair.ref.shape[1:]) >= BLOCK:
            key = _block_keys(pair.ref[0])
            keys.append(key.ravel())
            starts.append(starts[-1] + key.size)
            widths.append(key.shape[1])
            owners.append(i)
    if not keys:
        return None
    all_keys = np.concatenate(keys)
    order = np.argsort(all_keys, kind="stable")
    all_keys = all_keys[order]
    for pair in sides[probed]:
        if min(pair.ref.shape[1:]) < BLOCK:
            continue
        key = _block_keys(pair.ref[0])[::STEP, ::STEP]
        start = np.searchsorted(all_keys, key.ravel(), "left")
        stop = np.searchsorted(all_keys, key.ravel(), "right")
        # a probe tells only if it is rare: MIN_LEVELS values in its block of band 0 (saturated, dark
        # or sparse blocks of independent scenes match by chance), few blocks with its key
        levels = _levels(pair.ref[0], key.shape)
        telling = (stop > start) & (stop - start <= MAX_CANDIDATES) & (levels.ravel() >= MIN_LEVELS)
        for flat in np.flatnonzero(telling):
            r, c = divmod(int(flat), key.shape[1])
            block = pair.ref[:, r * STEP : r * STEP + BLOCK, c * STEP : c * STEP + BLOCK]
            for n in order[start[flat] : stop[flat]]:
                k = int(np.searchsorted(starts, n, "right")) - 1
                other = sides[indexed][owners[k]]
                y, x = divmod(int(n) - starts[k], widths[k])
                if np.array_equal(block, other.ref[:, y : y + BLOCK, x : x + BLOCK]):
                    spots = {probed: (pair, r * STEP, c * STEP), indexed: (other, y, x)}
                    (v, vy, vx), (t, ty, tx) = spots[0], spots[1]
                    return f"{v.name} at ({vy}, {vx}) is {t.name} at ({ty}, {tx})"
    return None


# ---------------------------------------------------------------------------------------- sampling


class PatchSampler:
    """Random patches with flips and 90-degree rotations from a set of training pairs.

    All pairs live on `device` as tensors, so on a GPU the sampling costs no host transfers. Pairs
    are drawn in proportion to their area (every pixel equally likely), positions snap to the MS
    grid so the three crops stay aligned. `gain` draws one multiplicative factor per patch in
    [lo, hi]: a radiometric augmentation for models that serve several DN scales.
    """

    def __init__(
        self,
        pairs: Sequence[TrainPair],
        patch: int,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        gain: tuple[float, float] | None = None,
    ) -> None:
        if not pairs:
            raise FusionError("no training data: give at least one scene")
        self.ratio = pairs[0].ratio
        if any(p.ratio != self.ratio for p in pairs):
            raise FusionError("training pairs mix different ratios")
        if patch % self.ratio:
            raise FusionError(f"patch size {patch} must be a multiple of the ratio {self.ratio}")
        usable = [p for p in pairs if min(p.ref.shape[1:]) >= patch]
        if not usable:
            smallest = min(min(p.ref.shape[1:]) for p in pairs)
            raise FusionError(f"patch {patch} is larger than every training scene (smallest {smallest} px)")
        self.device = torch.device(device)
        self.patch = patch
        self.gain = gain
        self.with_base = all(p.base is not None for p in usable)
        self.pairs = [
            tuple(
                torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
                for a in (p.pan, p.ms, p.ref) + ((p.base,) if self.with_base else ())
            )
            for p in usable
        ]
        areas = np.array([(p.ref.shape[1] - patch + 1) * (p.ref.shape[2] - patch + 1) for p in usable], float)
        self.weights = areas / areas.sum()
        self.rng = np.random.default_rng(seed)
        self.pixels = int(sum(p.ref.shape[1] * p.ref.shape[2] for p in usable))

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pan (B, P, H, W), ms (B, C, H/r, W/r), ref (B, C, H, W), base (B, C, H, W) or None when
        the pairs carry no base) on the sampler's device."""
        r, p = self.ratio, self.patch
        crops: list[tuple[torch.Tensor, ...]] = []
        idx = self.rng.choice(len(self.pairs), size=size, p=self.weights)
        for i in idx:
            pan, ms, *hr = self.pairs[i]  # hr: ref and, when present, base (both on the PAN grid)
            hl, wl = ms.shape[1] - p // r, ms.shape[2] - p // r
            y, x = int(self.rng.integers(0, hl + 1)), int(self.rng.integers(0, wl + 1))
            t = (pan[:, y * r : y * r + p, x * r : x * r + p], ms[:, y : y + p // r, x : x + p // r])
            t = t + tuple(a[:, y * r : y * r + p, x * r : x * r + p] for a in hr)
            k, flip = int(self.rng.integers(0, 4)), bool(self.rng.integers(0, 2))
            t = tuple(_augment(a, k, flip) for a in t)
            if self.gain is not None:
                g = float(self.rng.uniform(*self.gain))
                t = tuple(a * g for a in t)
            crops.append(t)
        stacked = [torch.stack(parts) for parts in zip(*crops, strict=True)]
        return stacked[0], stacked[1], stacked[2], stacked[3] if self.with_base else None


def _augment(a: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """The same rotation/flip for all three crops: (C, H, W) -> (C, H, W)."""
    if flip:
        a = a.flip(-1)
    return torch.rot90(a, k, dims=(-2, -1)) if k else a


def validation_crops(pairs: Iterable[TrainPair], size: int, per_pair: int = 4) -> list[TrainPair]:
    """Fixed, deterministic crops of the validation pairs (whole pairs when small): cheap enough to
    run every epoch on a CPU while still covering each validation scene."""
    out: list[TrainPair] = []
    for p in pairs:
        r = p.ratio
        H, W = p.ref.shape[1:]
        m = int(np.lcm(4, r))
        # square crops, narrowed to a strip along a side shorter than `size` (a thin held-out part)
        sh, sw = min(size, H - H % m), min(size, W - W % m)
        if sh <= 0 or sw <= 0:
            continue
        ys = np.linspace(0, H - sh, num=int(np.sqrt(per_pair)) or 1).astype(int) // r * r
        xs = np.linspace(0, W - sw, num=int(np.ceil(per_pair / max(len(ys), 1)))).astype(int) // r * r
        seen = set()
        for y in ys:
            for x in xs:
                if (y, x) in seen:
                    continue
                seen.add((y, x))
                out.append(
                    TrainPair(
                        name=f"{p.name}@{y},{x}",
                        pan=p.pan[:, y : y + sh, x : x + sw],
                        ms=p.ms[:, y // r : (y + sh) // r, x // r : (x + sw) // r],
                        ref=p.ref[:, y : y + sh, x : x + sw],
                        ratio=r,
                        base=None if p.base is None else p.base[:, y : y + sh, x : x + sw],
                    )
                )
    return out
