"""Windows over the output grid, seamless blending, and a row-strip accumulator whose memory does
not grow with the scene.

Each output tile (the "core", `tile` PAN pixels square) is fused inside a larger window: the core
plus `overlap` pixels of blend zone after it (right and below), plus the fuser's `halo` of pure
context on every side. Windows never reach past the scene: at its edges a window is cropped to the
real data (its sides still multiples of the plan's `multiple`, so only a scene side that is no such
multiple gets up to `multiple - 1` padded pixels), so a scene that fits in one tile is fused in one
piece, exactly as a network's authors run it, and no work is spent on invented context.
Across an internal tile boundary b the two neighbours' results are mixed
with complementary raised-cosine ramps (sin^2 + cos^2 = 1) over [b, b + overlap), so there is no
seam; weights are additionally normalised on accumulation. Putting the blend zone after the
boundary makes every row above the next tile row final once a tile row is done: tiles are
processed one row strip at a time and finished rows go to the writer in whole output blocks, so the
buffer holds one strip (tile + overlap rows) of the scene width, whatever the scene height.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from fusion_cli.errors import FusionError


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple) if multiple > 1 else int(value)


@dataclass(frozen=True)
class Window:
    """One fusion window, in output pixel coordinates: the box read and fused, and its core."""

    row: int  # top-left of the box: core - margin, or 0 at the scene's first row/column
    col: int
    height: int  # box sides, multiples of the plan's `multiple`; past the scene only by the rounding
    width: int
    core_row: int
    core_col: int
    strip: int  # index of the tile row this window belongs to
    first_row: bool
    last_row: bool
    first_col: bool
    last_col: bool


@dataclass(frozen=True)
class TilePlan:
    """How an output of `height x width` PAN pixels is cut into windows."""

    height: int
    width: int
    tile: int  # core side
    overlap: int  # blend-zone width across each internal boundary
    margin: int  # window = [core - margin, core + tile + overlap + margin); margin >= halo
    multiple: int

    @property
    def window(self) -> int:
        return self.tile + self.overlap + 2 * self.margin

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.tile)

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def _span(self, core: int, extent: int) -> tuple[int, int]:
        """(start, length) of a window along one axis: the core with its blend zone and margin,
        cropped to [0, extent) and rounded up to `multiple` (starts stay on the multiple's grid)."""
        start = max(0, core - self.margin)
        stop = min(extent, core + self.tile + self.overlap + self.margin)
        return start, round_up(stop - start, self.multiple)

    def strip(self, i: int) -> list[Window]:
        """The windows of tile row i, left to right."""
        out = []
        r = i * self.tile
        row, height = self._span(r, self.height)
        for j in range(self.cols):
            c = j * self.tile
            col, width = self._span(c, self.width)
            out.append(
                Window(
                    row=row,
                    col=col,
                    height=height,
                    width=width,
                    core_row=r,
                    core_col=c,
                    strip=i,
                    first_row=i == 0,
                    last_row=i == self.rows - 1,
                    first_col=j == 0,
                    last_col=j == self.cols - 1,
                )
            )
        return out

    def __iter__(self) -> Iterator[Window]:
        for i in range(self.rows):
            yield from self.strip(i)

    def core_shape(self, win: Window) -> tuple[int, int]:
        """Rows and columns of `win`'s core inside the scene (the last tiles reach past it)."""
        return min(self.tile, self.height - win.core_row), min(self.tile, self.width - win.core_col)

    def final_row_after(self, strip: int) -> int:
        """Output rows above this one can no longer change once tile row `strip` is done."""
        if strip >= self.rows - 1:
            return self.height
        return min(self.height, (strip + 1) * self.tile)


def plan_tiles(height: int, width: int, tile: int, overlap: int, halo: int, multiple: int) -> TilePlan:
    """Tile plan with sides rounded up to `multiple` (lcm of the ratio and the fuser's tile multiple).

    A tile larger than the scene gives one window: the one-piece reference for seam checks.
    """
    if tile < 1 or overlap < 0 or halo < 0:
        raise FusionError("--tile must be positive and --overlap non-negative")
    tile = round_up(min(tile, max(height, width)), multiple)
    overlap = min(round_up(overlap, multiple), tile)  # windows stay multiples of `multiple`
    margin = round_up(halo, multiple)
    return TilePlan(height, width, tile, overlap, margin, multiple)


def ramp(n: int) -> np.ndarray:
    """Rising raised-cosine ramp of n samples, strictly between 0 and 1; ramp + ramp[::-1] == 1."""
    return (np.sin(0.5 * np.pi * (np.arange(n) + 0.5) / n) ** 2).astype(np.float32)


def blend_weights(plan: TilePlan, win: Window) -> np.ndarray:
    """Weights `(tile + overlap, tile + overlap)` over the core and the blend zone after it.

    Outer scene edges get weight 1 (no neighbour to blend with)."""
    n = plan.tile + plan.overlap

    def axis(first: bool, last: bool) -> np.ndarray:
        w = np.ones(n, np.float32)
        if plan.overlap:
            r = ramp(plan.overlap)
            if not first:
                w[: plan.overlap] = r
            if not last:
                w[n - plan.overlap :] = r[::-1]
        return w

    return np.outer(axis(win.first_row, win.last_row), axis(win.first_col, win.last_col))


def weighted_region(plan: TilePlan, win: Window, fused: np.ndarray) -> np.ndarray:
    """Crop a window's result `(C, height, width)` to its weighted region [core, core + tile + overlap)
    (smaller where the window stops at the scene's edge; the weights are indexed from the core)."""
    n = plan.tile + plan.overlap
    r, c = win.core_row - win.row, win.core_col - win.col
    return fused[..., r : r + n, c : c + n]


def core_region(plan: TilePlan, win: Window, data: np.ndarray) -> np.ndarray:
    """Crop a window-sized array `(..., height, width)` to the window's core `(..., <= tile, <= tile)`."""
    r, c = win.core_row - win.row, win.core_col - win.col
    return data[..., r : r + plan.tile, c : c + plan.tile]


class StripAccumulator:
    """Weighted sum of overlapping tile results over a band of rows of the full output width.

    `add` accumulates a tile; `flush(upto, sink)` hands finished rows [start, upto) (normalised by
    the weights) to the sink and drops them from the buffer. Memory: `capacity` rows x width x bands.
    """

    def __init__(self, bands: int, height: int, width: int, capacity: int) -> None:
        self.bands, self.height, self.width, self.capacity = bands, height, width, capacity
        self.start = 0  # output row held in buffer row 0
        self.acc = np.zeros((bands, capacity, width), np.float32)
        self.wsum = np.zeros((capacity, width), np.float32)
        self.valid = np.zeros((capacity, width), bool)

    def _clip(self, row: int, col: int, h: int, w: int) -> tuple[slice, slice, slice, slice] | None:
        r0, r1 = max(row, self.start, 0), min(row + h, self.height, self.start + self.capacity)
        c0, c1 = max(col, 0), min(col + w, self.width)
        if r1 <= r0 or c1 <= c0:
            return None
        if min(row + h, self.height) > self.start + self.capacity or (row < self.start and row + h > 0):
            if row + h > 0 and max(row, 0) < self.start:
                raise RuntimeError("tile overlaps rows already flushed (flush later)")
            if min(row + h, self.height) > self.start + self.capacity:
                raise RuntimeError("tile beyond the accumulator capacity (flush earlier or grow capacity)")
        dst = (slice(r0 - self.start, r1 - self.start), slice(c0, c1))
        src = (slice(r0 - row, r1 - row), slice(c0 - col, c1 - col))
        return dst[0], dst[1], src[0], src[1]

    def add(self, data: np.ndarray, weight: np.ndarray, row: int, col: int) -> None:
        """Accumulate `weight * data`; data `(C, h, w)` placed at output (row, col)."""
        s = self._clip(row, col, data.shape[-2], data.shape[-1])
        if s is None:
            return
        dr, dc, sr, sc = s
        w = weight[sr, sc]
        self.acc[:, dr, dc] += data[:, sr, sc] * w
        self.wsum[dr, dc] += w

    def put(self, data: np.ndarray, row: int, col: int) -> None:
        """Place `data` `(C, h, w)` at output (row, col) with weight 1, replacing what is there: for
        plans without blend zones, where every output pixel comes from exactly one tile."""
        s = self._clip(row, col, data.shape[-2], data.shape[-1])
        if s is None:
            return
        dr, dc, sr, sc = s
        self.acc[:, dr, dc] = data[:, sr, sc]
        self.wsum[dr, dc] = 1.0

    def set_valid(self, valid: np.ndarray, row: int, col: int) -> None:
        """Validity of a tile core (each output pixel lies in exactly one core: no blending)."""
        s = self._clip(row, col, valid.shape[-2], valid.shape[-1])
        if s is not None:
            dr, dc, sr, sc = s
            self.valid[dr, dc] = valid[sr, sc]

    def flush(
        self, upto: int, sink: Callable[[int, int, np.ndarray, np.ndarray], None], chunk: int = 1024
    ) -> int:
        """Pass finished rows [start, upto) to `sink(row0, col0, data (C, n, w), valid (n, w))` in column
        chunks of `chunk` (views into the buffer, normalised in place: no scene-width temporaries),
        then drop them. Returns the number of rows flushed."""
        n = min(upto, self.height) - self.start
        if n <= 0:
            return 0
        w = self.wsum[:n]
        self.valid[:n] &= w > 0
        np.maximum(w, np.float32(1e-12), out=w)
        for c in range(0, self.width, chunk):
            cs = slice(c, min(c + chunk, self.width))
            block = self.acc[:, :n, cs]
            block /= w[None, :, cs]
            sink(self.start, c, block, self.valid[:n, cs])
        # Shift the unfinished rows up, one row at a time (a whole-array overlapping copy would
        # allocate a temporary as large as the buffer).
        for i in range(self.capacity - n):
            self.acc[:, i] = self.acc[:, i + n]
            self.wsum[i] = self.wsum[i + n]
            self.valid[i] = self.valid[i + n]
        self.acc[:, self.capacity - n :] = 0.0
        self.wsum[self.capacity - n :] = 0.0
        self.valid[self.capacity - n :] = False
        self.start += n
        return n
