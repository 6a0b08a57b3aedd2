"""The one table of quality indices: what each is called, how it is computed, at which resolution,
which way is better, its unit and its one-line convention.

Everything that lists indices reads this table when it runs: `reduced_resolution` / `full_resolution`
(hence `fusion metrics` and `fusion report`, with their column order and best-value highlighting),
`fusion evaluate`'s comparison columns and arrows, and the validation scores of `fusion train`
(lowercase keys: `q2n`, `sam`, ...). Adding an index is its function plus one `register(Metric(...))`
line below; nothing else names it. Full-resolution indices read `Inputs.terms`, which `fullres` sums
over row strips: a new one adds its sums there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fusion_cli.errors import FusionError
from fusion_cli.metrics._common import as_mask, border_cut, clip_to_bits, holds_whole_dn
from fusion_cli.metrics.fullres import full_resolution_terms
from fusion_cli.metrics.noreference import qnr
from fusion_cli.metrics.q2n import q2n, q2n_label
from fusion_cli.metrics.reference import (
    _prepare,
    _scc,
    ergas_bands,
    psnr_bands,
    q_index_bands,
    rmse_bands,
    sam,
    ssim_bands,
)
from fusion_cli.sensors import nyquist_gains

Resolution = Literal["reduced", "full"]
# An index's value, or its value and its per-band terms `(C,)` (shown by --per-band)
Score = float | tuple[float, np.ndarray]


@dataclass
class Inputs:
    """What the indices of one evaluation are computed from, in DN.

    Reduced resolution: `ref` and `fused` `(C, H, W)`, `mask (H, W)` True = valid. Full resolution:
    `fused (C, H, W)` and `pan (1, H, W)`, and `terms`, what its indices are made of (`D_lambda`,
    `D_s` and `HPC` per band, `D_lambda_K`), computed by row strips (`metrics.fullres`) so that
    scoring a large scene does not hold its filtered images whole.
    """

    fused: np.ndarray
    ratio: float
    ref: np.ndarray | None = None
    pan: np.ndarray | None = None
    mask: np.ndarray | None = None
    block: int = 32  # Q2n / Q / QNR block (and Q2n shift)
    round_uint16: bool | None = True  # Q2n's (and D_lambda^K's) uint16 rounding
    psnr_peak: float | str = "dnmax"
    terms: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Metric:
    """One quality index."""

    name: str  # its key in results and its column (training validation uses name.lower())
    function: Callable[[Inputs], Score]
    resolution: Resolution  # "reduced": against a reference; "full": from the PAN and MS
    higher_is_better: bool
    unit: str  # "" for a dimensionless index
    note: str  # the convention in one line (the third column of `fusion metrics`); {block}: the block
    evaluate: bool = False  # a column of `fusion evaluate`'s comparison table
    validate: bool = False  # scored on `fusion train`'s validation pairs


# In display order: the column order of `fusion metrics`, `fusion report` and CSV rows.
METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add an index to the table (after the others; the same name replaces it)."""
    METRICS[metric.name] = metric
    return metric


def metrics(resolution: Resolution | None = None) -> list[Metric]:
    """The indices of the table, in display order; of one resolution if given."""
    return [m for m in METRICS.values() if resolution is None or m.resolution == resolution]


def index_order() -> tuple[str, ...]:
    """Every index name in display order."""
    return tuple(METRICS)


def higher_is_better(name: str) -> bool:
    return METRICS[name].higher_is_better


def evaluate_keys(resolution: Resolution) -> tuple[str, ...]:
    """The indices `fusion evaluate` tabulates at that resolution."""
    return tuple(m.name for m in metrics(resolution) if m.evaluate)


def validation_keys() -> tuple[str, ...]:
    """The lowercase keys of the validation scores `fusion train` records (e.g. in a card)."""
    return tuple(m.name.lower() for m in METRICS.values() if m.validate)


def _rms(terms: np.ndarray) -> tuple[float, np.ndarray]:
    """An index over bands as the root mean square of its per-band terms (ERGAS, RMSE)."""
    return float(np.sqrt((terms**2).mean())), terms


def _mean(terms: np.ndarray) -> tuple[float, np.ndarray]:
    """An index over bands as the mean of its per-band terms (Q, PSNR, SSIM, D_s)."""
    return float(terms.mean()), terms


# --- full-resolution terms shared by several indices ------------------------------------------------


def _d_s_terms(x: Inputs) -> np.ndarray:
    return x.terms["D_s"]


def _hpc_terms(x: Inputs) -> np.ndarray:
    return x.terms["HPC"]


def _d_lambda(x: Inputs) -> float:
    return x.terms["D_lambda"]


def _d_lambda_k(x: Inputs) -> float:
    return x.terms["D_lambda_K"]


# --- the table ------------------------------------------------------------------------------------

R, F = "reduced", "full"
# fmt: off
register(Metric("Q2n", lambda x: q2n(x.ref, x.fused, x.block, x.block, x.round_uint16, x.mask), R, True, "",
                "hypercomplex, {block}x{block} blocks", evaluate=True, validate=True))
register(Metric("Q", lambda x: _mean(q_index_bands(x.ref, x.fused, x.block, x.mask)), R, True, "",
                "UIQI, {block}x{block} sliding window", evaluate=True))
register(Metric("SAM", lambda x: sam(x.ref, x.fused, x.mask), R, False, "degrees",
                "degrees", evaluate=True, validate=True))
register(Metric("ERGAS", lambda x: _rms(ergas_bands(x.ref, x.fused, x.ratio, x.mask)), R, False, "",
                "100/ratio scaling", evaluate=True, validate=True))
register(Metric("SCC", lambda x: _scc(x.ref, x.fused, x.mask), R, True, "",
                "Sobel magnitudes", evaluate=True))
register(Metric("PSNR", lambda x: _mean(psnr_bands(x.ref, x.fused, x.psnr_peak, x.mask)), R, True, "dB",
                "dB, band mean", validate=True))
register(Metric("SSIM", lambda x: _mean(ssim_bands(x.ref, x.fused, x.psnr_peak, x.mask)), R, True, "",
                "band mean"))
register(Metric("RMSE", lambda x: _rms(rmse_bands(x.ref, x.fused, x.mask)), R, False, "DN", "DN"))
register(Metric("D_lambda", _d_lambda, F, False, "", "QNR spectral", evaluate=True))
register(Metric("D_s", lambda x: _mean(_d_s_terms(x)), F, False, "", "QNR spatial", evaluate=True))
register(Metric("QNR", lambda x: qnr(_d_lambda(x), float(_d_s_terms(x).mean())), F, True, "",
                "(1-D_lambda)(1-D_s)", evaluate=True))
register(Metric("D_lambda_K", _d_lambda_k, F, False, "", "Khan, sensor MTF", evaluate=True))
register(Metric("HQNR", lambda x: qnr(_d_lambda_k(x), float(_d_s_terms(x).mean())), F, True, "",
                "DLPan's published 'QNR'", evaluate=True))
register(Metric("HPC", lambda x: _mean(_hpc_terms(x)), F, True, "", "high-pass corr. with PAN, sensor MTF",
                evaluate=True))
# fmt: on


# --- everything at once ---------------------------------------------------------------------------


def score(inputs: Inputs, resolution: Resolution, per_band: bool = False) -> dict[str, Any]:
    """Every index of the table at `resolution`: values keyed by name, and with `per_band` a
    `per_band` dict of the per-band terms of the indices that have them."""
    out: dict[str, Any] = {}
    bands: dict[str, list[float]] = {}
    for m in metrics(resolution):
        value = m.function(inputs)
        if isinstance(value, tuple):
            value, terms = value
            bands[m.name] = terms.tolist()
        out[m.name] = float(value)
    if per_band:
        out["per_band"] = bands
    return out


def reduced_resolution(
    ref: np.ndarray,
    fused: np.ndarray,
    ratio: float,
    cut: int = 0,
    clip_bits: int | None = None,
    mask: np.ndarray | None = None,
    per_band: bool = False,
    block: int = 32,
    round_uint16: bool | None = None,
    psnr_peak: float | str = "dnmax",
) -> dict[str, Any]:
    """All reduced-resolution indices of `fused` against `ref` (both `(C, H, W)` DN) in one call.

    Order of operations as the toolbox's `indexes_evaluation.m`: border cut of both images (and the
    mask), then clipping of the fused image to [0, 2^clip_bits], then the indices. Returns floats keyed
    by the table's reduced-resolution names (`Q2n, Q, SAM, ERGAS, SCC, PSNR, SSIM, RMSE`), plus
    `q2n_name` ("Q8" for 8 bands ...), `bands`, and with `per_band=True` a `per_band` dict of lists
    (`Q, ERGAS, SCC, PSNR, SSIM, RMSE`).
    """
    ref, fused, m = _prepare(ref, fused, mask)
    if round_uint16 is None:  # as `fusion metrics` decides: whole-number DN only, not reflectance
        round_uint16 = holds_whole_dn(ref, m)
    ref, fused = border_cut(ref, cut), border_cut(fused, cut)
    m = None if m is None else border_cut(m, cut)
    fused = clip_to_bits(fused, clip_bits)
    x = Inputs(fused, ratio, ref=ref, mask=m, block=block, round_uint16=round_uint16, psnr_peak=psnr_peak)
    values = score(x, "reduced", per_band)
    terms = values.pop("per_band", None)
    out: dict[str, Any] = {**values, "q2n_name": q2n_label(ref.shape[0]), "bands": int(ref.shape[0])}
    if terms is not None:
        out["per_band"] = terms
    return out


def full_resolution(
    fused: np.ndarray,
    pan: np.ndarray,
    ms: np.ndarray,
    ratio: int | None = None,
    sensor: str | None = None,
    mask: np.ndarray | None = None,
    block: int = 32,
    clip_bits: int | None = None,
    per_band: bool = False,
    round_uint16: bool | None = None,
    sensor_bands: Sequence[int] | None = None,
    file_bands: int | None = None,
    strip_rows: int | None = None,
) -> dict[str, Any]:
    """All full-resolution indices of `fused (C, H, W)` from `pan (1, H, W)` and the low-res `ms (C, h, w)`.

    `ratio` defaults to H / h. The fused image is clipped to [0, 2^clip_bits] first if asked (toolbox
    `th_values`); D_lambda^K rounds to uint16 as the toolbox does when the MS holds whole-number DN
    (`round_uint16` None; True or False forces it). `sensor_bands`: which of the `sensor`'s bands
    (1-based, `sensors.sensor_band_numbers`) the bands are, for their MTF gains; where not known,
    `file_bands` is the band count of the MS file they were picked from (`nyquist_gains`). Returns floats
    keyed by the table's full-resolution names (`D_lambda, D_s, QNR, D_lambda_K, HQNR, HPC`), plus
    `bands`, `ratio`, `scored_fraction`, and with `per_band=True` a `per_band` dict holding the D_s and
    HPC terms of each band. The terms are computed by row strips of `strip_rows` (default: as memory
    allows, `metrics.fullres.strip_rows`); the images are not copied whole.
    """
    from fusion_cli.align import size_ratio
    from fusion_cli.metrics._common import as_chw

    fused, pan, ms = as_chw(fused, "fused"), as_chw(pan, "PAN"), as_chw(ms, "MS")
    if ms.shape[0] != fused.shape[0]:
        raise FusionError(
            f"fused has {fused.shape[0]} bands but the MS has {ms.shape[0]}: pass the matching MS"
        )
    h, w = fused.shape[1:]
    if ratio is None:
        ratio = size_ratio((h, w), ms.shape[1:], exact=True)
        if ratio is None:
            raise FusionError(
                f"MS {ms.shape[1]}x{ms.shape[2]} and fused {h}x{w} are not an integer ratio apart: "
                "check that PAN, MS and fused cover the same area"
            )
    if ratio < 1 or (ms.shape[1] * ratio, ms.shape[2] * ratio) != (h, w):
        raise FusionError(
            f"MS {ms.shape[1]}x{ms.shape[2]} times ratio {ratio} does not give the fused grid {h}x{w}: "
            "check --ratio and that PAN, MS and fused cover the same area"
        )
    if pan.shape[1:] != (h, w):
        raise FusionError(
            f"PAN {pan.shape[1:]} and fused {(h, w)} differ in size: use the PAN that was fused"
        )
    mask = as_mask(mask, (h, w))
    # an MS pixel counts as valid only if its whole PAN block is
    ms_valid = None if mask is None else mask.reshape(h // ratio, ratio, w // ratio, ratio).all(axis=(1, 3))
    if round_uint16 is None:  # as `fusion metrics` decides, on the MS as it was given
        round_uint16 = holds_whole_dn(ms, ms_valid)
    numbers = None if sensor_bands is None else list(sensor_bands)
    gains = nyquist_gains(sensor, fused.shape[0], numbers, file_bands)[0]
    # what nodata pixels hold must not matter: filled, and only the pixels whose every filter (MS
    # interpolation, the PAN's low-pass for D_s, the MTF for D_lambda^K and HPC) read valid data scored
    terms = full_resolution_terms(
        fused, pan, ms, ratio, gains, round_uint16, mask, ms_valid, block, clip_bits, strip_rows
    )
    x = Inputs(fused, ratio, pan=pan, mask=mask, block=block, round_uint16=round_uint16, terms=terms)
    values = score(x, "full", per_band)
    terms_per_band = values.pop("per_band", None)
    out: dict[str, Any] = {**values, "bands": int(fused.shape[0]), "ratio": int(ratio)}
    out["scored_fraction"] = terms["scored_fraction"]  # after leaving out the reach
    if terms_per_band is not None:
        out["per_band"] = terms_per_band
    return out
