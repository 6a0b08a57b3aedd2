"""Shared mechanics of the quality indices: input checks, border cut, masks, window and block moments.

Images are numpy `(C, H, W)` arrays in DN (any real dtype); masks are `(H, W)` bool, True = valid.
All statistics are computed in float64.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from fusion_cli.errors import FusionError

# Elements of float64 work arrays per chunk in block-wise code (~32 MB): memory stays proportional to
# the image, not to blocks x image, whatever the scene size.
CHUNK_ELEMENTS = 4_000_000

T = TypeVar("T")


def as_chw(img: np.ndarray, what: str = "image") -> np.ndarray:
    """Accept `(H, W)` or `(C, H, W)`; return `(C, H, W)` without copying."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise FusionError(f"{what} must be (bands, rows, cols), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise FusionError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    return arr


def refuse_non_finite(images: Sequence[tuple[str, np.ndarray]], mask: np.ndarray | None) -> None:
    """NaN or inf where `mask` counts (everywhere without one) took a different way through each
    index: SAM left the pixel out, ERGAS became NaN, Q2n's uint16 rounding took it for 0. Refused,
    naming the image; a mask that leaves them out is the way to score the rest."""
    from fusion_cli.raster.checks import non_finite_pixels

    for name, img in images:
        bad = non_finite_pixels(img, mask)
        if bad is not None and bad.any():
            raise FusionError(
                f"the {name} image has NaN or infinite values at {int(bad.sum())} px; pass a mask that "
                "is False there to score the other pixels"
            )


def check_pair(ref: np.ndarray, fused: np.ndarray, names: tuple[str, str] = ("reference", "fused")) -> None:
    if ref.shape != fused.shape:
        raise FusionError(
            f"{names[0]} {ref.shape} and {names[1]} {fused.shape} differ in shape (bands, rows, cols): "
            "compare images on the same grid"
        )


def as_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """`None` or an `(H, W)` bool mask (True = valid) of the given spatial shape."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.shape != tuple(shape):
        raise FusionError(f"mask shape {m.shape} does not match the image rows/cols {tuple(shape)}")
    return m.astype(bool, copy=False)


def fill_invalid(img: np.ndarray, mask: np.ndarray | None, what: str = "image") -> np.ndarray:
    """`img (C, H, W)` with its invalid pixels (mask False) set to each band's mean over the valid
    ones (float64 copy; `img` itself when nothing is invalid). What a nodata pixel holds (0, 65535,
    -9999, NaN) must not reach an index: the windowed sums and filters run over whole rows, so a NaN
    would poison every later window and a large value its neighbours' sums."""
    if mask is None or mask.all():
        return img
    if not mask.any():
        raise FusionError(f"the {what} has no valid pixel: nothing to evaluate")
    out = np.array(img, dtype=np.float64)
    for band in out:
        band[~mask] = band[mask].mean()
    return out


def erode(mask: np.ndarray | None, radius: int) -> np.ndarray | None:
    """Valid pixels whose `(2 radius + 1)^2` neighbourhood is valid: those a filter of that reach computes
    from valid data only. The image's own edges do not erode (the filters pad there, as the toolbox)."""
    if mask is None or mask.all() or radius <= 0:
        return mask
    return ndimage.minimum_filter(mask, size=2 * radius + 1, mode="nearest")


def border_cut(img: np.ndarray, cut: int) -> np.ndarray:
    """The toolbox's asymmetric cut: keep rows/cols `[cut-1, H-cut)` of `(..., H, W)` (no-op for 0)."""
    if cut < 0:
        raise FusionError(f"--cut must be >= 0, got {cut}")
    if cut == 0:
        return img
    h, w = img.shape[-2:]
    if h - cut <= cut - 1 or w - cut <= cut - 1:
        raise FusionError(f"a border cut of {cut} leaves nothing of a {h}x{w} image: use a smaller --cut")
    return img[..., cut - 1 : h - cut, cut - 1 : w - cut]


def clip_to_bits(img: np.ndarray, bits: int | None) -> np.ndarray:
    """The toolbox's `th_values`: clip to `[0, 2^bits]` (note: 2^L, not 2^L - 1)."""
    if bits is None:
        return img
    if not 1 <= bits <= 32:
        raise FusionError(f"--clip-bits must be between 1 and 32, got {bits}")
    return np.clip(img, 0, 2.0**bits)


def holds_whole_dn(x: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """Whether `x (C, H, W)` (where `mask` is True) holds DN that uint16 keeps as they are: whole
    numbers (an integer dtype, or floats that are all integral: DN saved as float) within [0, 65535].
    Q2n rounds such data to uint16 as the toolbox does; reflectance would keep two or three grey
    levels, and signed DN (int16 with negative values) would be clipped to 0."""
    values = x[:, mask] if mask is not None else np.asarray(x).reshape(len(x), -1)
    if not values.size or values.min() < 0 or values.max() > np.iinfo(np.uint16).max:
        return False
    return bool(np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)))


def round_uint16(x: np.ndarray) -> np.ndarray:
    """MATLAB `uint16(x)`: round half away from zero, saturate to [0, 65535], NaN -> 0 (float64 out)."""
    out = np.add(x, 0.5, dtype=np.float64)
    np.floor(out, out=out)
    np.clip(out, 0.0, 65535.0, out=out)  # negatives (and -inf) saturate to 0, +inf to 65535
    out[np.isnan(out)] = 0.0
    return out


def uiqi_from_moments(
    mx: np.ndarray,
    my: np.ndarray,
    vx: np.ndarray,
    vy: np.ndarray,
    cxy: np.ndarray,
    tiny: float | np.ndarray = 0.0,
) -> np.ndarray:
    """Wang-Bovik UIQI 4 cov mx my / ((vx + vy)(mx^2 + my^2)) with the guards of the toolbox's `img_qi.m`.

    Where both variances vanish (`vx + vy <= tiny`, `tiny` absorbs rounding) the index is the mean term
    2 mx my / (mx^2 + my^2); where the means vanish it is 1.
    """
    vsum = vx + vy
    msq = mx * mx + my * my
    with np.errstate(divide="ignore", invalid="ignore"):
        q = 4 * cxy * mx * my / (vsum * msq)
    flat = vsum <= tiny
    bad = flat | (msq == 0)
    if bad.any():  # rare (constant windows, nodata): fix those entries only
        q = np.broadcast_to(q, bad.shape).copy()
        mx, my, msq = (np.broadcast_to(a, bad.shape) for a in (mx, my, msq))
        q[bad] = 1.0
        mean_only = flat & (msq != 0)
        q[mean_only] = 2 * mx[mean_only] * my[mean_only] / msq[mean_only]
    return q


def box_mean_valid(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over every k x k window fully inside `(H, W)` ('valid' positions), float64.

    Separable running sums (scipy's uniform_filter1d, O(1) per pixel), anchored so that output (i, j)
    is the window starting at (i, j). Callers pass strips of rows (cache-sized) centred on a global
    offset, so the running sums stay small and exact to ~1e-13 relative.
    """
    out = np.asarray(a, dtype=np.float64)
    h, w = out.shape
    out = ndimage.uniform_filter1d(out, k, axis=1, origin=-(k // 2), mode="constant")
    out = ndimage.uniform_filter1d(out, k, axis=0, origin=-(k // 2), mode="constant")
    return out[: h - k + 1, : w - k + 1]


def windows_all_valid(mask: np.ndarray | None, k: int) -> np.ndarray | None:
    """`(H-k+1, W-k+1)` bool: True where a k x k window holds only valid pixels (None: all valid)."""
    if mask is None:
        return None
    return box_mean_valid((~mask).astype(np.float64), k) < 0.5 / (k * k)


def valid_map(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    return np.ones(shape, bool) if mask is None else mask


def symmetric_index(n: int, length: int) -> np.ndarray:
    """Indices 0..length-1 folded into 0..n-1 by mirroring that repeats the edge sample (MATLAB padding)."""
    idx = np.arange(length) % (2 * n)
    return np.where(idx < n, idx, 2 * n - 1 - idx)


def block_grid(size: int, block: int, shift: int, pad: bool) -> tuple[int, np.ndarray]:
    """Number of block positions along one axis and the (possibly padded) sample indices they read.

    `pad=True`: the toolbox's q2n rule: ceil(size / shift) positions, the axis extended by symmetric
    mirroring to `(n - 1) * shift + block` samples. `pad=False`: full blocks only, the rest dropped.
    """
    # padding mirrors the image once at most (the toolbox's 31-px image in a 32-px block); a block
    # far beyond it would be mirrored many times over (--block 100000 on 318 px asked for 112 GiB)
    if block > (2 * size if pad else size):
        raise FusionError(
            f"the image ({size} pixels) is smaller than the {block}-pixel block; pass a smaller --block"
        )
    n = max(1, -(-size // shift)) if pad else (size - block) // shift + 1
    return n, symmetric_index(size, (n - 1) * shift + block)


def iter_blocks(
    arrays: Sequence[np.ndarray],
    block: int,
    shift: int | None = None,
    pad: bool = False,
    mask: np.ndarray | None = None,
    transform=None,
) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """Walk `(C, H, W)` arrays block-row by block-row, yielding float64 blocks `(nb, C, block*block)`.

    Chunks hold several rows of blocks so that the work arrays stay near `CHUNK_ELEMENTS`; each yield
    also gives `(nb,)` bool, True where the block holds only valid pixels. `transform` (float64 array ->
    array) is applied to each chunk before cutting blocks (e.g. the uint16 rounding of q2n).
    """
    shift = block if shift is None else shift
    h, w = arrays[0].shape[-2:]
    ny, rows = block_grid(h, block, shift, pad)
    nx, cols = block_grid(w, block, shift, pad)
    width = len(cols) * max(a.shape[0] for a in arrays)
    per_row = max(1, CHUNK_ELEMENTS // max(1, width * block))
    for y0 in range(0, ny, per_row):
        y1 = min(ny, y0 + per_row)
        r = rows[y0 * shift : (y1 - 1) * shift + block]
        out = []
        for a in arrays:
            chunk = np.asarray(a[:, _as_slice(r)][:, :, _as_slice(cols)], dtype=np.float64)
            if transform is not None:
                chunk = transform(chunk)
            out.append(_cut_blocks(chunk, block, shift))
        if mask is None:
            ok = np.ones(out[0].shape[0], bool)
        else:
            m = mask[_as_slice(r)][:, _as_slice(cols)][None].astype(np.float64)
            ok = _cut_blocks(m, block, shift)[:, 0].min(axis=-1) > 0.5
        yield out, ok
    _ = nx


def _as_slice(idx: np.ndarray) -> slice | np.ndarray:
    """A plain slice for a run of consecutive indices (a view, no copy), else the index array."""
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and (np.diff(idx) == 1).all():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def parallel_map(fn: Callable[[int], T], n: int) -> list[T]:
    """`[fn(0), ..., fn(n-1)]` on a few threads: per-band work in numpy/scipy releases the GIL.

    At most 4 threads (each band's temporaries are ~10 image-sized float64 planes).
    """
    workers = min(n, os.cpu_count() or 1, 4)
    if workers <= 1:
        return [fn(i) for i in range(n)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(n)))


STRIP_ROWS = 192  # output rows per strip of window maps: work arrays stay cache-sized


def window_means(
    n_bands: int,
    h: int,
    k: int,
    ok: np.ndarray | None,
    map_fn: Callable[[int, int, int], np.ndarray],
    what: str,
) -> np.ndarray:
    """Per-band mean `(C,)` of a k x k window index map, computed strip by strip on a few threads.

    `map_fn(b, o0, o1)` returns band b's map for window rows o0..o1-1 (it reads input rows o0..o1+k-2);
    `ok` `(H-k+1, W-k+1)` marks the windows to average (None: all).
    """
    n_out = h - k + 1
    items = [
        (b, o0, min(o0 + STRIP_ROWS, n_out)) for b in range(n_bands) for o0 in range(0, n_out, STRIP_ROWS)
    ]

    def one(i: int) -> tuple[float, int]:
        b, o0, o1 = items[i]
        q = map_fn(b, o0, o1)
        if ok is None:
            return float(q.sum()), q.size
        sel = ok[o0:o1]
        return float(q[sel].sum()), int(sel.sum())

    sums, counts = np.zeros(n_bands), np.zeros(n_bands)
    for (b, _, _), (total, count) in zip(items, parallel_map(one, len(items)), strict=True):
        sums[b] += total
        counts[b] += count
    if (counts == 0).any():
        raise FusionError(f"no {k}x{k} window free of nodata is left for {what}: check the mask and the cut")
    return sums / counts


def _cut_blocks(chunk: np.ndarray, block: int, shift: int) -> np.ndarray:
    """`(C, rows, cols)` -> `(nb, C, block*block)` blocks at steps of `shift`, row-major block order."""
    c = chunk.shape[0]
    if shift == block:
        ny, nx = chunk.shape[1] // block, chunk.shape[2] // block
        v = chunk[:, : ny * block, : nx * block].reshape(c, ny, block, nx, block).transpose(1, 3, 0, 2, 4)
    else:
        v = sliding_window_view(chunk, (block, block), axis=(1, 2))[:, ::shift, ::shift]
        v = v.transpose(1, 2, 0, 3, 4)
    return v.reshape(-1, c, block * block)
