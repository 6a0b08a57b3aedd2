"""Shared mechanics of the classical methods: the `Fuser` plumbing, streaming statistics and the
low-pass operators every family uses. Tiles arrive in DN as torch tensors: pan `(B, 1, H, W)`, ms
`(B, C, H/r, W/r)` on the area-aligned grid (see `fusion_cli.fusers`).

Statistics (`needs_stats = True`) are gathered by `accumulate()` over streamed windows and solved in
`finalize()`: every method reduces its global estimates (means, covariances, regressions) to sums
of products, so tiled accumulation equals whole-image accumulation up to float rounding. A window
counts the pixels where `valid` is True; the derived images (interpolated MS, low-passed PAN) are
computed on the whole window first, so a pipeline that marks only each window's core as valid (and
gives `halo` pixels of context) counts every scene pixel once with full filter support.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fusion_cli.errors import FusionError
from fusion_cli.fusers import FuserDefaults
from fusion_cli.mtf import KERNEL_SIZE, mtf_filter, mtf_filter_decimate
from fusion_cli.resample import MIN_AXIS, axis_matrix, interp_support, upsample_ms
from fusion_cli.sensors import GENERIC_MS_GAIN, canonical_sensor, nyquist_gains
from fusion_cli.tiling import round_up

STATS_DTYPE = torch.float64  # sums over whole scenes
MTF_HALF = KERNEL_SIZE // 2  # half-width of the MTF kernels: PAN px of context a low-pass needs
FUSE_DTYPE = torch.float32  # per-tile arithmetic (fuse and the statistics' derived images)
EPS = 1e-9  # guards a division by a (near) zero low-pass, as MATLAB's `+ eps`
# Why a ratio method (BT-H, MTF-GLP-HPM, MTF-GLP-HS: divides by an intensity or a low-passed PAN,
# multiplies by PAN ratios) needs DN >= 0: with DN crossing 0 (int16 offset by -300) they ran to the
# type's limits at exit 0 (ERGAS 472, 600 and 531 against GSA's 24.5)
RATIO_METHOD_DN = (
    "BT-H (brovey), MTF-GLP-HPM and MTF-GLP-HS divide by band intensities and multiply by PAN ratios; "
    "offset the data to non-negative DN or use an additive --method (gsa, mtf-glp, bdsd-pc)"
)
# Rows a `QuantileSample` keeps: the 1st percentile from 500 k random pixels is within ~0.15 % of
# rank of the exact one (BT-H's haze moved by <= 0.3 DN against 2 M on the 4 Mpx benchmark scene),
# and selecting from 4x fewer rows took 0.25 s off that scene's 1.3 s run.
SAMPLE_CAPACITY = 500_000


class Moments:
    """Streaming first and second moments of D features: n, sum x, sum x x^T (float64).

    `full=False` keeps only the sums of squares (means and variances), for many bands.
    """

    def __init__(self, dim: int, full: bool = True) -> None:
        self.n = 0
        self.full = full
        self.s = torch.zeros(dim, dtype=STATS_DTYPE)
        self.ss = torch.zeros((dim, dim) if full else (dim,), dtype=STATS_DTYPE)

    def add_pixels(self, feats: Sequence[torch.Tensor], valid: torch.Tensor) -> None:
        """Add the valid pixels of feature images: feats `(B, D_i, H, W)` (concatenated along D),
        valid `(B, 1, H, W)` bool.

        The images are cropped to the valid box first; invalid pixels inside it are zeroed, which
        adds nothing to the sums, so no per-pixel gather is needed (a window's core is a box)."""
        box = valid_box(valid)
        if box is None:
            return
        rows, cols = box
        valid = valid[..., rows, cols]
        x = torch.cat([f[..., rows, cols].to(STATS_DTYPE) for f in feats], dim=1)
        if bool(valid.all()):
            n = valid.numel()
        else:
            x = x * valid
            n = int(valid.sum())
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (D, N)
        self.n += n
        self.s += flat.sum(1)
        self.ss += flat @ flat.T if self.full else (flat * flat).sum(1)

    def merge(self, other: Moments) -> Moments:
        """Add another accumulator's sums (the same features over other pixels)."""
        self.n += other.n
        self.s += other.s
        self.ss += other.ss
        return self

    @property
    def std(self) -> torch.Tensor:
        """Per-feature sample standard deviation (N - 1), as MATLAB's std2."""
        if self.n < 2:
            raise FusionError("not enough valid pixels to estimate the method's statistics")
        m = self.mean
        sq = torch.diagonal(self.ss) if self.full else self.ss
        return torch.sqrt(torch.clamp((sq - self.n * m * m) / (self.n - 1), min=0.0))

    @property
    def mean(self) -> torch.Tensor:
        return self.s / max(self.n, 1)

    @property
    def cov(self) -> torch.Tensor:
        """Sample covariance (N - 1), as MATLAB's cov/std2."""
        if self.n < 2:
            raise FusionError("not enough valid pixels to estimate the method's statistics")
        if not self.full:
            raise RuntimeError("covariance needs Moments(full=True)")
        m = self.mean
        return (self.ss - self.n * torch.outer(m, m)) / (self.n - 1)

    @property
    def gram(self) -> torch.Tensor:
        return self.ss


class QuantileSample:
    """A uniform random subsample of each band's values (fixed seed), for global percentiles in bounded
    memory; exact while the scene has fewer valid pixels than `capacity`. Values keep the dtype they
    come in (the order statistics of float32 pixels need no float64 copy)."""

    def __init__(self, capacity: int | None = None, seed: int = 0) -> None:
        self.capacity = SAMPLE_CAPACITY if capacity is None else capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.values: torch.Tensor | None = None  # (N, C), after `_trim`
        self.keys: torch.Tensor | None = None
        self._chunks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, keys) not merged yet
        self._held = 0  # rows held in values + chunks
        self._bound = math.inf  # no key at or above this can enter the sample

    def add(self, rows: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """Offer rows `(N, C)` to the sample. `keys` `(N,)` in [0, 1) decide which rows stay (the
        smallest); by default random in arrival order, so the sample depends on how the pixels were
        split into calls. Keys derived from each pixel's position (`position_keys`) make it the same
        sample however the scene is cut into windows."""
        if keys is None:
            keys = torch.rand(rows.shape[0], generator=self.gen, dtype=STATS_DTYPE)
        if self._bound < math.inf:
            # the sample keeps the `capacity` smallest keys: a row above a key that already has
            # `capacity` smaller ones can never enter it, so drop those now (same sample, less work)
            keep = keys < self._bound
            rows, keys = rows[keep], keys[keep]
        self._chunks.append((rows, keys))
        self._held += rows.shape[0]
        if self._held > 2 * self.capacity:  # merge and trim lazily: one top-k per `capacity` new rows
            self._trim()

    def merge(self, other: QuantileSample) -> QuantileSample:
        """Pool another sample (other pixels): the union keeps the `capacity` smallest keys of both."""
        other._trim()
        if other.values is not None:
            self._chunks.append((other.values, other.keys))
            self._held += other.values.shape[0]
        self._trim()
        return self

    def _trim(self) -> None:
        if not self._chunks:
            return
        parts = ([(self.values, self.keys)] if self.values is not None else []) + self._chunks
        self.values = torch.cat([v for v, _ in parts])
        self.keys = torch.cat([k for _, k in parts])
        self._chunks = []
        if self.values.shape[0] > self.capacity:
            # the `capacity` smallest keys by selection (~6x cheaper than topk); random float64 keys
            # do not tie, and `[: capacity]` bounds the sample even if they did
            bound = torch.kthvalue(self.keys, self.capacity).values
            keep = torch.nonzero(self.keys <= bound)[: self.capacity, 0]
            self.values, self.keys = self.values[keep], self.keys[keep]
            self._bound = float(bound)
        self._held = self.values.shape[0]

    def percentile(self, q: float) -> torch.Tensor:
        """Per band, MATLAB `prctile` (midpoint interpolation of the sorted sample)."""
        self._trim()
        if self.values is None or self.values.shape[0] == 0:
            raise FusionError("no valid pixels to estimate percentiles from")
        v = self.values
        n = v.shape[0]
        pos = min(max(q / 100 * n - 0.5, 0.0), n - 1.0)  # prctile: sample i at (i - 0.5)/n
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        # order statistics lo and hi per band: a partial sort from the nearer end of each band
        bands = v.T.contiguous()  # (C, N)
        if hi < n // 2:
            ends = torch.topk(bands, hi + 1, dim=1, largest=False, sorted=True).values
            v_lo, v_hi = ends[:, lo], ends[:, hi]
        else:
            ends = torch.topk(bands, n - lo, dim=1, largest=True, sorted=True).values
            v_lo, v_hi = ends[:, n - 1 - lo], ends[:, n - 1 - hi]
        return v_lo + (pos - lo) * (v_hi - v_lo)


def position_keys(valid: torch.Tensor, origin: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A pseudo-random key in [0, 1) per valid pixel of `(B, 1, H, W)`, in `rows_where` order, that
    depends only on the pixel's scene position (`origin` + its index; and its batch item) and `seed`:
    a sample of the smallest keys is then the same for any split of a scene into windows."""
    b, row, col = torch.nonzero(valid[:, 0]).T.numpy()
    low32 = np.int64(0xFFFFFFFF)  # two's complement low words: exact for any int32 position
    row = ((row + origin[0]) & low32).astype(np.uint64)
    col = ((col + origin[1]) & low32).astype(np.uint64)
    z = (row << np.uint64(32)) | col
    z ^= (b.astype(np.uint64) + (np.uint64(seed) << np.uint64(16))) * np.uint64(0xD1B54A32D192ED03)
    # splitmix64's finaliser: a bijection of 64-bit words that mixes every input bit into every output
    # bit (uint64 products wrap, as the algorithm needs)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def valid_box(valid: torch.Tensor) -> tuple[slice, slice] | None:
    """The smallest row and column slices holding every valid pixel of `(B, 1, H, W)` (None: none)."""
    rows = torch.nonzero(valid.any(dim=3).flatten(0, 1).any(dim=0))[:, 0]
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(valid.any(dim=2).flatten(0, 1).any(dim=0))[:, 0]
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def add_moments(
    acc: Moments | None, feats: Sequence[torch.Tensor], valid: torch.Tensor, full: bool = True
) -> Moments:
    """`acc` (a new `Moments` when None) with the valid pixels of `feats` added (`Moments.add_pixels`)."""
    if acc is None:
        acc = Moments(sum(f.shape[1] for f in feats), full=full)
    acc.add_pixels(feats, valid)
    return acc


def gauss_lowpass_on_box(pan: torch.Tensor, box: tuple[slice, slice], ratio: int) -> torch.Tensor:
    """`gauss_lowpass(pan)[..., rows, cols]`, filtering only the box and the kernel's reach around it
    (the same values: the filter sees the same neighbours, and the image edges where it reaches them)."""
    rows, cols = box
    r0, c0 = max(rows.start - MTF_HALF, 0), max(cols.start - MTF_HALF, 0)
    r1, c1 = min(rows.stop + MTF_HALF, pan.shape[-2]), min(cols.stop + MTF_HALF, pan.shape[-1])
    low = gauss_lowpass(pan[..., r0:r1, c0:c1], ratio)
    return low[..., rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0]


def upsample_on_box(ms: torch.Tensor, box: tuple[slice, slice], ratio: int) -> torch.Tensor:
    """`upsample_ms(ms)[..., rows, cols]`, `(B, C, Hb, Wb)`: by `axis_matrix` products for the box
    alone where the window allows it, else by interpolating the window and cropping."""
    rows, cols = box
    h, w = ms.shape[-2:]
    if min(h, w) < MIN_AXIS:
        return upsample_ms(ms, ratio)[..., rows, cols]
    a_h = axis_matrix(h, ratio)[rows].to(ms)
    a_w = axis_matrix(w, ratio)[cols].to(ms)
    return a_h @ ms @ a_w.T


def add_interp_moments(
    acc: Moments | None,
    ms: torch.Tensor,
    hr_feats: Sequence[torch.Tensor],
    valid: torch.Tensor,
    ratio: int,
    full: bool = True,
) -> Moments:
    """`add_moments(acc, [upsample_ms(ms), *hr_feats], valid, full)`, without interpolating the MS.

    With X = A_h M A_w^T (`axis_matrix`) over the valid box, every sum the moments need is one on the
    MS grid: sum X = (A_h^T 1)^T M (A_w^T 1), sum X_k X_j = <M_k, G_h M_j G_w> with G = A^T A, and
    sum X_k F = <M_k, A_h^T F A_w> for a PAN-grid feature F, all in float64. `hr_feats` are
    window-sized or already cropped to the valid box. Windows with invalid pixels inside the box,
    batches or sides under MIN_AXIS take the direct path.
    """
    box = valid_box(valid)
    if box is None:
        return acc if acc is not None else Moments(ms.shape[1] + sum(f.shape[1] for f in hr_feats), full)
    rows, cols = box
    valid = valid[..., rows, cols]
    hr_feats = [f if f.shape[-2:] == valid.shape[-2:] else f[..., rows, cols] for f in hr_feats]
    h, w = ms.shape[-2:]
    if ms.shape[0] != 1 or min(h, w) < MIN_AXIS or not bool(valid.all()):
        return add_moments(acc, [upsample_on_box(ms, box, ratio), *hr_feats], valid, full)
    a_h = axis_matrix(h, ratio)[rows].to(ms.device)  # (Hb, h)
    a_w = axis_matrix(w, ratio)[cols].to(ms.device)  # (Wb, w)
    m = ms[0].to(STATS_DTYPE)  # (C, h, w)
    c = m.shape[0]
    sum_x = torch.einsum("chw,h,w->c", m, a_h.sum(0), a_w.sum(0))
    t = (a_h.T @ a_h) @ m @ (a_w.T @ a_w)  # (C, h, w)
    n = (rows.stop - rows.start) * (cols.stop - cols.start)
    box_shape = valid.shape[-2:]
    f = torch.cat([x[0].to(STATS_DTYPE) for x in hr_feats]) if hr_feats else m.new_zeros((0, *box_shape))
    flat = f.reshape(f.shape[0], n)  # (D, N)
    if full:
        xx = torch.einsum("chw,dhw->cd", m, t)
        xf = torch.einsum("chw,dhw->cd", m, a_h.T @ f @ a_w)  # (C, D)
        ss = torch.cat([torch.cat([xx, xf], 1), torch.cat([xf.T, flat @ flat.T], 1)])
    else:
        ss = torch.cat([(m * t).sum((1, 2)), torch.linalg.vecdot(flat, flat)])
    if acc is None:
        acc = Moments(c + f.shape[0], full=full)
    acc.n += n
    acc.s += torch.cat([sum_x, flat.sum(1)])
    acc.ss += ss
    return acc


def merged(a: Moments | None, b: Moments | None) -> Moments | None:
    """`a` with `b`'s sums added; either may be None (no valid pixel seen yet)."""
    if a is None or b is None:
        return a if b is None else b
    return a.merge(b)


def rows_where(img: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """img `(B, D, H, W)`, valid `(B, 1, H, W)` bool -> `(N, D)` of the valid pixels."""
    d = img.shape[1]
    rows = img.permute(0, 2, 3, 1).reshape(-1, d)
    return rows if bool(valid.all()) else rows[valid.reshape(-1)]


def lr_valid(valid: torch.Tensor, ratio: int) -> torch.Tensor:
    """PAN-grid validity `(B, 1, H, W)` -> MS-grid `(B, 1, H/r, W/r)`: an MS pixel counts only if every
    PAN pixel it covers does."""
    return (-F.max_pool2d(-valid.to(torch.float32), ratio, ratio)) > 0.5


class ClassicalFuser(FuserDefaults):
    """Base of the classical methods: `Fuser` attributes, dtype handling and default no-op statistics.
    They run on the CPU, in float32 tiles with float64 statistics (`precision` "fp32"), whatever device
    or precision a run asks for (`FuserDefaults`)."""

    name: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = False
    # whether the product depends on the sensor's MTF gains (--sensor); EXP, BT-H, GSA and PCA do not
    uses_mtf_gains: ClassVar[bool] = False
    # True: the method uses every band of a multi-band high-resolution input (HISR's MSI) itself;
    # False: it sees their band mean as one PAN
    multiband_pan: ClassVar[bool] = False
    pan_bands: int = 1
    # Pipeline tile side when the user gives none: a classical window costs little memory per pixel
    # and its halo (up to ~90 PAN px) is re-read and re-filtered around every tile, so 256-px tiles
    # would process ~2.6x the scene; 512 px bring that to ~1.7x at ~70 MB per window.
    preferred_tile: ClassVar[int] = 512
    # the halo covers every operator's support, so neighbouring windows compute the same values on
    # shared pixels (to float rounding): there is nothing to blend, and no blend zone to fuse twice
    preferred_overlap: ClassVar[int] = 0
    # the pipeline fuses windows concurrently, one single-threaded window per CPU thread
    parallel_windows: ClassVar[bool] = True

    def __init__(
        self,
        ratio: int,
        sensor: str | None = None,
        ms_bands: int | None = None,
        pan_bands: int = 1,
        sensor_bands: Sequence[int] | None = None,
    ) -> None:
        if ratio < 1 or ratio != int(ratio):  # 2.5 was taken as 2
            raise FusionError(f"ratio must be a positive integer, got {ratio}")
        if pan_bands < 1:
            raise FusionError(f"pan_bands must be a positive integer, got {pan_bands}")
        self.ratio = int(ratio)
        # HISR: a high-resolution MSI stands in for the PAN through its band mean (the intensity)
        self.pan_bands = int(pan_bands)
        self.sensor = canonical_sensor(sensor)
        # which of the sensor's bands the MS bands are (1-based, `sensors.sensor_band_numbers`): their
        # MTF gains; None: the sensor's bands in order (or its 4-band set)
        self.sensor_bands = None if sensor_bands is None else list(sensor_bands)
        self.ms_file_bands: int | None = None  # the MS file's band count, when a scene sets it
        self.ms_bands = ms_bands
        self.tile_multiple = self.ratio
        self.halo = round_up(self.support(), self.ratio)
        self.stats_halo = round_up(self.stats_support(), self.ratio)
        self._finalized = not self.needs_stats
        self._init_state()

    def _init_state(self) -> None:
        """A method's own statistics and fitted values, empty (set up for each new scene's copy)."""

    # ---- geometry -------------------------------------------------------------------------
    def support(self) -> int:
        """PAN pixels of context each output pixel depends on (the `halo`)."""
        return interp_support(self.ratio)

    def stats_support(self) -> int:
        """PAN pixels of context the statistics of a pixel depend on (`stats_halo`): the statistics
        pass reads its windows with this margin, which may differ from the fusion's."""
        return self.support()

    # ---- Fuser protocol --------------------------------------------------------------------
    def accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int] = (0, 0)
    ) -> None:
        if not self.needs_stats:
            return
        pan = self._intensity(pan)
        self._check(pan, ms)
        # derived images (interpolation, MTF filters) in float32: float64 convolutions cost ~10x more on
        # CPU; the sums themselves are float64 (`Moments`), so the statistics keep ~1e-6 relative accuracy
        self._accumulate(pan.to(FUSE_DTYPE), ms.to(FUSE_DTYPE), valid.bool(), origin)

    def finalize(self) -> None:
        if self.needs_stats:
            self._finalize()
        self._finalized = True

    def fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        pan = self._intensity(pan)
        self._check(pan, ms)
        if not self._finalized:
            raise FusionError(f"method {self.name} needs a statistics pass (accumulate, finalize) first")
        return self._fuse(pan.to(FUSE_DTYPE), ms.to(FUSE_DTYPE))

    @property
    def fitted(self) -> bool:
        """Whether `fuse` may run: the statistics pass is done (or the method needs none)."""
        return self._finalized

    # ---- statistics in parallel -------------------------------------------------------------
    def stats_copy(self) -> ClassicalFuser:
        """A fresh, unfitted fuser of the same configuration, to accumulate part of a scene in another
        thread; `merge_stats` adds its statistics back (sums commute, so the split is exact)."""
        copy = type(self)(
            self.ratio, sensor=self.sensor, ms_bands=self.ms_bands, pan_bands=self.pan_bands,
            sensor_bands=self.sensor_bands,
        )  # fmt: skip
        copy.ms_file_bands = self.ms_file_bands
        return copy

    def merge_stats(self, other: ClassicalFuser) -> None:
        """Add the statistics `other` (a `stats_copy`) accumulated; before `finalize`."""
        if self._finalized and self.needs_stats:
            raise FusionError(f"{self.name}: statistics are already finalized")
        if self.needs_stats:
            self._merge(other)

    # ---- convenience for arrays ------------------------------------------------------------
    def fit(self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor | None = None) -> ClassicalFuser:
        """Whole-image statistics pass in one call (what the pipeline does tile by tile)."""
        if self.needs_stats:
            if valid is None:
                valid = torch.ones_like(pan[:, :1], dtype=torch.bool)
            self.accumulate(pan, ms, valid)
        self.finalize()
        return self

    # ---- to implement ----------------------------------------------------------------------
    def _accumulate(
        self, pan: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, origin: tuple[int, int]
    ) -> None:
        """Add one window's valid pixels; `origin` is the scene (row, col) of its top-left PAN pixel."""
        raise NotImplementedError

    def _finalize(self) -> None:
        raise NotImplementedError

    def _merge(self, other: ClassicalFuser) -> None:
        raise NotImplementedError

    def _fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- helpers ---------------------------------------------------------------------------
    def _intensity(self, pan: torch.Tensor) -> torch.Tensor:
        """`(B, P, H, W)` -> `(B, 1, H, W)`: the band mean of an MSI given as the PAN (HISR)."""
        if pan.ndim == 4 and pan.shape[1] != self.pan_bands:
            raise FusionError(f"{self.name} was set up for {self.pan_bands} PAN band(s), got {pan.shape[1]}")
        if self.pan_bands == 1 or self.multiband_pan:
            return pan
        return pan.to(FUSE_DTYPE).mean(1, keepdim=True)

    def _check(self, pan: torch.Tensor, ms: torch.Tensor) -> None:
        p = self.pan_bands if self.multiband_pan else 1
        if pan.ndim != 4 or ms.ndim != 4 or pan.shape[1] != p:
            raise FusionError(f"expected pan (B, {p}, H, W) and ms (B, C, h, w), got {pan.shape}, {ms.shape}")
        if pan.shape[-2] != ms.shape[-2] * self.ratio or pan.shape[-1] != ms.shape[-1] * self.ratio:
            raise FusionError(
                f"{self.name}: PAN tile {tuple(pan.shape[-2:])} is not {self.ratio} x "
                f"MS tile {tuple(ms.shape[-2:])}"
            )
        if self.ms_bands is not None and ms.shape[1] != self.ms_bands:
            raise FusionError(f"{self.name} was set up for {self.ms_bands} MS bands, got {ms.shape[1]}")

    def gains(self, n_bands: int) -> list[float]:
        return nyquist_gains(self.sensor, n_bands, self.sensor_bands, self.ms_file_bands)[0]

    def pan_gain(self, n_bands: int) -> float:
        return nyquist_gains(self.sensor, n_bands, self.sensor_bands, self.ms_file_bands)[1]

    def upsample(self, ms: torch.Tensor) -> torch.Tensor:
        """MS `(B, C, h, w)` -> `(B, C, rh, rw)` on the PAN grid (23-tap or bicubic, toolbox phase)."""
        return upsample_ms(ms, self.ratio)


def mix_bands(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-pixel linear combinations of bands: x `(B, D, H, W)`, weights `(D, C)` -> `(B, C, H, W)`
    in x's dtype. Summed in float64: a float32 GEMM rounds by the thread count it runs on (BDSD-PC in
    a `batch --scene-workers` thread moved 42 of 1.2M example DN by 1 against `pansharpen`). The
    weights are rounded to x's dtype first: the statistics they come from are summed window by window,
    and their last float64 bits (1e-10) must not make the product depend on the tiling."""
    w = weights.to(device=x.device, dtype=x.dtype).double()
    return torch.einsum("bdhw,dc->bchw", x.double(), w).to(x.dtype)


def pan_lowpass_per_band(
    pan: torch.Tensor, gains: list[float], ratio: int, interpolate: bool = True
) -> torch.Tensor:
    """The GLP low-pass of the PAN for each band: MTF-filter (band gain), decimate, 23-tap interpolate.

    pan `(B, 1, H, W)` -> `(B, C, H, W)`, or `(B, C, H/r, W/r)` before interpolation with
    `interpolate=False`. Bands with equal gains share one computation.
    """
    uniq = sorted(set(gains))
    lp = mtf_filter_decimate(pan.expand(-1, len(uniq), -1, -1), uniq, ratio, rank=1)
    if interpolate:
        lp = upsample_ms(lp, ratio)
    if len(uniq) == 1:
        return lp.expand(-1, len(gains), -1, -1)  # one low-pass for every band: a view, no copies
    index = torch.as_tensor([uniq.index(g) for g in gains], device=pan.device)
    return lp.index_select(1, index)


def gauss_lowpass(img: torch.Tensor, ratio: int) -> torch.Tensor:
    """The toolbox's `LPfilterGauss`: Gaussian MTF with gain 0.3 at Nyquist, full resolution. Its
    width is that of the MTF filters (`mtf.mtf_kernel`, N - 1 = 40 in the width formula), where
    `LPfilterGauss.m` puts N = 41: a 0.37 % narrower PAN std, products within 0.3 DN on average
    (4.8 DN at most on a 512^2 WorldView-3 crop); a documented convention, see the README."""
    return mtf_filter(img, GENERIC_MS_GAIN, ratio, rank=1)


def kernel_sums(gains: list[float], ratio: int) -> torch.Tensor:
    """Sum of each band's MTF kernel (~0.999: the toolbox's kernels are not renormalised)."""
    from fusion_cli.mtf import mtf_kernel

    return torch.as_tensor([float(np.sum(mtf_kernel(g, ratio))) for g in gains], dtype=STATS_DTYPE)
