"""The terms of the full-resolution indices (D_lambda, D_s, D_lambda^K, HPC), computed by row strips.

Each index is a mean over blocks or a correlation over pixels, so it adds up from strips of rows: the
interpolated MS, the PAN's low-pass and the MTF filters are made for one strip at a time, with a halo
of rows around it that covers their reach, and the strip's blocks and pixels are summed. The work
arrays (float64 copies, filtered images) then take about `STRIP_BYTES` (at least one block of rows)
whatever the scene size; before, they were made for the whole scene, and an 8 x 8100^2 product
needed 24 GB. Strips start on multiples of the block, so their blocks are the scene's blocks, and
are read on whole MS rows; the figures equal the whole-scene ones to rounding (1e-13 relative).

Arrays: `fused (C, H, W)` and `pan (1, H, W)` on the PAN grid, `ms (C, H/r, W/r)`, any real dtype (the
product is not copied whole); masks `(H, W)` and `(H/r, W/r)` bool, True = valid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fusion_cli.errors import FusionError
from fusion_cli.metrics._common import clip_to_bits, fill_invalid, refuse_non_finite
from fusion_cli.metrics.noreference import (
    d_lambda_from_sums,
    d_lambda_sums,
    d_s_from_sums,
    d_s_sums,
    full_resolution_reach,
    mtf_lowpass,
    nodata_safe,
    pan_lowpass,
    upsample,
)
from fusion_cli.metrics.q2n import q2n_map
from fusion_cli.metrics.sharpness import hpc_from_moments, hpc_moments, merge_moments

# Work memory of a strip per pixel read: ~52 B per band (float64 copies, the interpolated MS, the
# MTF-filtered product) and ~140 B for the PAN's own (its copy, low-pass and high-pass, the masks),
# measured on 1-, 2-, 4- and 8-band WorldView-3 products (reviewer). A strip holds `STRIP_BYTES`.
STRIP_BYTES = 2**30
WORK_BYTES_PER_BAND = 52
WORK_BYTES_PER_PIXEL = 140


@dataclass(frozen=True)
class Strip:
    """Rows `[top, bottom)` scored, read with their halo `[read_top, read_bottom)` (PAN grid)."""

    read_top: int
    top: int
    bottom: int
    read_bottom: int

    @property
    def core(self) -> slice:
        """The scored rows within the rows read."""
        return slice(self.top - self.read_top, self.bottom - self.read_top)


def strip_rows(bands: int, width: int, block: int) -> int:
    """Rows scored per strip: `STRIP_BYTES` of work, a multiple of the block (at least one)."""
    rows = STRIP_BYTES // max(1, (WORK_BYTES_PER_BAND * bands + WORK_BYTES_PER_PIXEL) * width)
    return max(block, rows // block * block)


def strips(height: int, rows: int, block: int, ratio: int) -> Iterator[Strip]:
    """Strips of `rows` (a multiple of the block, so that their blocks are the scene's) covering
    `height`, each read with the filters' reach above and below, widened to whole MS rows (multiples
    of the ratio). A last strip shorter than a block joins the one before it, so that Q2n's mirrored
    padding at the bottom reads the scene's last rows, as on the whole scene."""
    reach = full_resolution_reach(ratio)
    tops = list(range(0, height, rows))
    if len(tops) > 1 and height - tops[-1] < block:
        tops.pop()
    for i, top in enumerate(tops):
        bottom = tops[i + 1] if i + 1 < len(tops) else height
        read_top = max(0, top - reach) // ratio * ratio
        read_bottom = min(height, -(-(bottom + reach) // ratio) * ratio)
        yield Strip(read_top, top, bottom, read_bottom)


def work_bytes(bands: int, height: int, width: int, block: int = 32, ratio: int = 8) -> int:
    """The work memory of the largest strip (`strips` at `strip_rows`), for a memory check before
    reading (ratio 8: the widest halo of the usual ratios)."""
    rows = strip_rows(bands, width, block)
    read = max(s.read_bottom - s.read_top for s in strips(height, rows, block, ratio))
    return (WORK_BYTES_PER_BAND * bands + WORK_BYTES_PER_PIXEL) * width * read


@dataclass
class _Sums:
    """What the strips add up: D_lambda's and D_s's block sums (the same blocks: one count), the
    D_lambda^K blocks' Q2n moduli, HPC's moments, and the pixels scored."""

    qf: np.ndarray
    qm: np.ndarray
    hi: np.ndarray
    lo: np.ndarray
    blocks: int = 0
    khan: float = 0.0
    khan_blocks: int = 0
    moments: np.ndarray | None = None
    scored: int = 0


@dataclass(frozen=True)
class _Scene:
    """A product with its PAN and MS, and the settings it is scored with (see `full_resolution_terms`)."""

    fused: np.ndarray
    pan: np.ndarray
    ms: np.ndarray
    ratio: int
    gains: Sequence[float]
    round_uint16: bool
    mask: np.ndarray | None
    ms_valid: np.ndarray | None
    block: int
    clip_bits: int | None

    def add(self, sums: _Sums, strip: Strip) -> None:
        """Add one strip's blocks and pixels to `sums`."""
        r, block, rows, core = self.ratio, self.block, slice(strip.read_top, strip.read_bottom), strip.core
        f, p = self.fused[:, rows], self.pan[:, rows]
        ms_rows = slice(strip.read_top // r, strip.read_bottom // r)
        ms = self.ms[:, ms_rows]
        m = None if self.mask is None else self.mask[rows]
        if m is not None and not m.all():
            if not m.any():
                return  # nodata throughout
            # what nodata pixels hold must not reach a scored pixel: filled with the strip's band means,
            # and only the pixels whose filters read valid data are scored
            (f, p), m = nodata_safe([("product", f), ("PAN", p)], m, r)
            assert m is not None
            if not m[core].any():
                return
            ms = fill_invalid(ms, None if self.ms_valid is None else self.ms_valid[ms_rows], "MS")
        f = clip_to_bits(f, self.clip_bits)
        ms_up, lp, low = upsample(ms, r), pan_lowpass(p, r), mtf_lowpass(f, self.gains, r)
        m_core = None if m is None else m[core]
        qf, qm, n = d_lambda_sums(f[:, core], ms_up[:, core], block, m_core)
        hi, lo, _ = d_s_sums(f[:, core], ms_up[:, core], p[:, core], lp[:, core], block, m_core)
        sums.qf += qf
        sums.qm += qm
        sums.hi += hi
        sums.lo += lo
        sums.blocks += n
        qmap, ok = q2n_map(ms_up[:, core], low[:, core], block, block, self.round_uint16, m_core)
        sums.khan += float(qmap[ok].sum())
        sums.khan_blocks += int(ok.sum())
        moments = hpc_moments(f, p, r, self.gains, m, core)
        sums.moments = moments if sums.moments is None else merge_moments(sums.moments, moments)
        sums.scored += (
            (strip.bottom - strip.top) * self.fused.shape[2] if m_core is None else int(m_core.sum())
        )


def full_resolution_terms(
    fused: np.ndarray,
    pan: np.ndarray,
    ms: np.ndarray,
    ratio: int,
    gains: Sequence[float],
    round_uint16: bool,
    mask: np.ndarray | None = None,
    ms_valid: np.ndarray | None = None,
    block: int = 32,
    clip_bits: int | None = None,
    rows: int | None = None,
) -> dict[str, float | np.ndarray]:
    """`D_lambda` (NaN for one band), `D_s` and `HPC` (per band), `D_lambda_K` and `scored_fraction`.

    Where `mask` has invalid pixels, each strip's are filled (`fill_invalid`) and only the pixels whose
    filters read valid data are scored (`nodata_safe`'s erosion by `full_resolution_reach`); `ms_valid`
    marks the MS pixels to fill from. `rows`: rows scored per strip (default `strip_rows`; rounded up
    to a multiple of the block).
    """
    c, height, width = fused.shape
    rows = strip_rows(c, width, block) if rows is None else max(block, -(-rows // block) * block)
    masked = mask is not None and not mask.all()
    if masked and not mask.any():
        raise FusionError("the product has no valid pixel: nothing to evaluate")
    # on the whole scene, before the strips: a count of one strip's would be wrong
    refuse_non_finite([("product", fused), ("PAN", pan)], mask)
    kept = mask if masked else None
    scene = _Scene(fused, pan, ms, ratio, gains, round_uint16, kept, ms_valid, block, clip_bits)
    sums = _Sums(np.zeros((c, c)), np.zeros((c, c)), np.zeros(c), np.zeros(c))
    for strip in strips(height, rows, block, ratio):
        scene.add(sums, strip)
    if masked and sums.blocks == 0:
        reach = full_resolution_reach(ratio)
        raise FusionError(
            f"no {block}x{block} block lies {reach} PAN px inside the valid data, the reach of the "
            "full-resolution indices' filters (a narrower valid area would be scored on what its "
            "nodata holds): evaluate a larger valid area, or at reduced resolution"
        )
    if sums.khan_blocks == 0:
        raise FusionError(f"no {block}x{block} block is free of nodata: Q2n cannot be computed")
    assert sums.moments is not None
    return {
        # band pairs: none in a 1-band product (--bands 3), whose other indices still hold
        "D_lambda": d_lambda_from_sums(sums.qf, sums.qm, sums.blocks, block) if c > 1 else math.nan,
        "D_s": d_s_from_sums(sums.hi, sums.lo, sums.blocks, block),
        "D_lambda_K": 1.0 - sums.khan / sums.khan_blocks,
        "HPC": hpc_from_moments(sums.moments),
        "scored_fraction": sums.scored / (height * width),
    }
