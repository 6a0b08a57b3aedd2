"""Finishing the product: its value range and nodata, each block clipped, rounded and masked, the
tags that record how it was made, and the quicklook PNG beside it."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.enums import ColorInterp

from fusion_cli import __version__, align, jsonout, raster
from fusion_cli.fusers import Fuser, SensorBound
from fusion_cli.pipeline.options import PRODUCT_OPTIONS, FuseOptions
from fusion_cli.tiling import TilePlan

if TYPE_CHECKING:
    from fusion_cli.wavelengths import Wavelength


def value_range(
    ms_dtype: str, dn_max: float | None, nonnegative: bool = False
) -> tuple[float | None, float | None]:
    """Valid output range: [dtype min, dn_max or dtype max] for integer MS, unbounded for floats;
    `nonnegative` (a network, which reads and writes DN from 0 up) floors it at 0 for any dtype."""
    rng = raster.dtype_range(ms_dtype)
    lo = rng[0] if rng else None
    if nonnegative:
        lo = 0.0 if lo is None else max(lo, 0.0)
    hi = dn_max if dn_max is not None else (rng[1] if rng else None)
    return lo, hi


def finish_block(
    data: np.ndarray,
    valid: np.ndarray,
    out_dtype: str,
    lo: float | None,
    hi: float | None,
    nodata: float | None,
) -> np.ndarray:
    """Clip to the valid range, round for integer outputs, and write nodata where invalid.

    `data` (C, h, w) float32 is a scratch buffer: it is clipped and rounded in place."""
    rng = raster.dtype_range(out_dtype) if np.issubdtype(np.dtype(out_dtype), np.integer) else None
    if rng is not None:  # one clip to the tighter of the valid range and the dtype's
        lo = rng[0] if lo is None else max(lo, rng[0])
        hi = rng[1] if hi is None else min(hi, rng[1])
    if lo is not None or hi is not None:
        np.clip(data, lo, hi, out=data)
    if rng is not None:
        np.rint(data, out=data)
    data = data.astype(out_dtype)
    if nodata is not None:
        nd = np.array(nodata, dtype=out_dtype)
        if not np.isnan(nd):
            # A fused value equal to the nodata value would vanish: nudge it by one step inwards.
            rng = raster.dtype_range(out_dtype)
            step = 1.0 if rng is not None else float(np.finfo(data.dtype).eps) * max(1.0, abs(float(nd)))
            bump = -step if rng is not None and float(nd) >= rng[1] else step
            data[(data == nd) & valid[None]] = data.dtype.type(float(nd) + bump)
        data[:, ~valid] = nd
    return data


def output_nodata(
    pan_ds: Any, ms_ds: Any, bands: Sequence[int], pan_bands: Sequence[int], out_dtype: str, opts: FuseOptions
) -> tuple[float | None, bool]:
    """(nodata value, use an internal mask): the MS nodata if it has one, 0 with zero_is_nodata,
    else an internal mask when either input can have invalid pixels."""
    if ms_ds.nodata is not None:
        nd = float(ms_ds.nodata)
        rng = raster.dtype_range(out_dtype)
        if np.isnan(nd) and rng is not None:
            return float(rng[0]), False
        if rng is None or rng[0] <= nd <= rng[1]:
            return nd, False
    if opts.zero_is_nodata:
        return 0.0, False
    if raster.has_mask(pan_ds, pan_bands) or raster.has_mask(ms_ds, bands):
        return None, True
    return None, False


def product_tags(
    fuser: Fuser,
    opts: FuseOptions,
    plan: TilePlan,
    geom: align.Alignment,
    *,
    bands: list[int],
    pan_bands: list[int],
    dn_max: float | None,
    out_dtype: str,
    reprojected: bool,
    pan_path: str | os.PathLike[str],
    ms_path: str | os.PathLike[str],
    shift: dict[str, float] | None,
    fingerprints: dict[str, dict[str, object] | None],
) -> dict[str, str]:
    """The dataset tags that record how a product was made. The device, precision and scan backend
    are what the fuser ran (a network asked for bf16 on a CPU runs, and records, fp32).
    `fingerprints`: the PAN's and MS's (`raster.file_fingerprint`), checked against their size and
    time before they were read."""
    params = {
        "tile": plan.tile,
        "overlap": plan.overlap,
        "margin": plan.margin,
        "batch": opts.batch,
        "bands": bands,
        "pan_bands": pan_bands,
        "dn_max": dn_max,
        "dn_scale": fuser.dn_max,
        "dtype": out_dtype,
        "zero_is_nodata": opts.zero_is_nodata,
        "input_nodata": [opts.pan_nodata, opts.ms_nodata],
        "coregister": opts.coregister,
        "shift_pan_px": [geom.dy, geom.dx],
        "ms_phase": opts.ms_phase if geom.georeferenced else "toolbox",  # no geotransform: the toolbox's
        "ratio": geom.ratio,
        "sensor": getattr(fuser, "sensor", None),  # classical methods: the MTF table and which
        "sensor_bands": getattr(fuser, "sensor_bands", None),  # of its bands the product's are
        "device": str(fuser.device),
        "precision": fuser.precision,
        "scan_backend": fuser.scan_backend,  # networks
        "adapt_steps": opts.adapt,
        "stats_mpx": opts.stats_mpx if fuser.needs_stats else None,
        "reprojected_ms": reprojected,
        "scan_memory": fuser.scan_memory,  # networks: card's or --scan-memory's
        "transpose_ensemble": fuser.transpose_ensemble,  # networks
    }
    return {
        "FUSION_MODEL": fuser.name,
        "FUSION_WEIGHTS_SHA256": fuser.weights_sha256 or "none",
        "FUSION_VERSION": __version__,
        "FUSION_PARAMS": jsonout.dumps(params, sort_keys=True),  # NaN nodata as null: strict JSON
        "FUSION_PAN": raster.recorded_path(pan_path),
        "FUSION_MS": raster.recorded_path(ms_path),
        "FUSION_SHIFT_MEASURED": jsonout.dumps(shift),
        "FUSION_REQUEST": jsonout.dumps(product_request(opts, fingerprints), sort_keys=True),
    }


def product_request(opts: FuseOptions, fingerprints: dict[str, dict[str, object] | None]) -> dict[str, Any]:
    """What a product was asked to be made of: its inputs' fingerprints (`raster.file_fingerprint`,
    checked against their size and time before they were read) and the options that change its
    content (`PRODUCT_OPTIONS`), as its FUSION_REQUEST tag records them; a batch compares it with
    what it is asked (`batch.fusion.product_differs`)."""
    return {"pan": fingerprints["pan"], "ms": fingerprints["ms"], "options": request_options(opts)}


def request_options(opts: FuseOptions) -> dict[str, Any]:
    """The options that change a product's content (`PRODUCT_OPTIONS`), as FUSION_REQUEST records them."""
    return {name: getattr(opts, name) for name in PRODUCT_OPTIONS}


def model_band_names(fuser: Fuser) -> list[str]:
    """The band names of a network's card (empty without one)."""
    return list(fuser.card.bands) if fuser.card is not None and fuser.card.bands else []


def band_imagery(
    fuser: Fuser,
    descriptions: Sequence[str],
    bands: Sequence[int],
    file_bands: int,
    stated: Sequence[Wavelength | None] = (),
) -> list[dict[str, str]] | None:
    """The product bands' wavelengths as IMAGERY-domain items: those the MS states for its bands
    (`stated`, `wavelengths.of_raster`: a reordered MS is placed by its own tags, not by position),
    and for the bands it does not, a network's from its card's band names, a classical method's from
    its sensor's band table (placed by the MS `descriptions`, or by the `bands` numbers of an MS with
    `file_bands`, all the sensor's); None when none is known."""
    from fusion_cli.wavelengths import from_names, from_sensor, imagery_metadata

    def table() -> list[Wavelength] | None:
        if fuser.card is not None:
            names = model_band_names(fuser)
            return from_names(names) if len(names) == len(bands) else None
        if isinstance(fuser, SensorBound):
            return from_sensor(fuser.sensor, descriptions, bands, file_bands, fuser.sensor_bands)
        return None

    stated = list(stated) or [None] * len(bands)
    found = None if all(stated) else table()
    waves = [s if s is not None else (found[i] if found else None) for i, s in enumerate(stated)]
    return imagery_metadata(waves) if any(waves) else None


def side_outputs(out: str | os.PathLike[str], opts: FuseOptions) -> list[Path]:
    """Files written beside the product, which obey --overwrite as it does."""
    return [Path(out).with_suffix(".png")] if opts.quicklook else []


def write_quicklook(out: Path, fuser: Fuser, overwrite: bool, product: Path | None = None) -> str:
    """A PNG beside the product `out`, from a decimated read (bounded memory) of `product` (the
    finished file not yet renamed onto `out`; default: `out`)."""
    from rasterio.windows import Window as RWindow

    from fusion_cli.quicklook import save_quicklook
    from fusion_cli.wavelengths import of_raster

    with raster.gdal_env(), raster.open_raster(product or out, "output") as ds:
        scale = max(1, math.ceil(max(ds.height, ds.width) / 1024))
        shape = (max(1, ds.height // scale), max(1, ds.width // scale))
        img = raster.read_decimated(
            ds, list(range(1, ds.count + 1)), RWindow(0, 0, ds.width, ds.height), shape
        )
        rgb = rgb_bands(
            fuser, list(ds.descriptions), ds.count, ds.colorinterp, of_raster(ds, range(1, ds.count + 1))
        )
        # Nodata stays out of the stretch percentiles (and is drawn black).
        mask = ds.dataset_mask(out_shape=shape) > 0
    png = out.with_suffix(".png")
    with raster.atomic_output(png, overwrite, "quicklook") as tmp:
        save_quicklook(tmp, img.astype(np.float32), rgb=rgb, mask=mask)
    return str(png)


def rgb_bands(
    fuser: Fuser,
    descriptions: list[str | None],
    count: int,
    colorinterp: Sequence[ColorInterp] = (),
    stated: Sequence[Wavelength | None] = (),
) -> tuple[int, int, int]:
    """0-based (r, g, b) band indexes of a product of `fuser` (`quicklook.display_bands`): its card's
    band names, else the product's `descriptions`."""
    from fusion_cli.quicklook import display_bands

    return display_bands(model_band_names(fuser) or descriptions, count, colorinterp, stated)
