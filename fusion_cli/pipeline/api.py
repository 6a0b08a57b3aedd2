"""The public entry points: `fuse_files` (a PAN/MS pair of files -> GeoTIFF), `fuse_arrays` (the
same tiling on in-memory arrays), and `pansharpen` / `hisr`, which build the fuser from keyword
options (a `FuserSpec` and `FuseOptions` in one flat set) and fuse files."""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusion_cli import align, notices, raster, wavelengths
from fusion_cli.errors import FusionError
from fusion_cli.fusers import Fuser
from fusion_cli.pipeline.engine import (
    caller_autocast_off,
    check_band_wavelengths,
    check_fuser,
    fit_sensor_bands,
    plan_for,
    run,
    run_threads,
)
from fusion_cli.pipeline.factory import FuserSpec, adapt_dn_scale, build_fuser, scene_fuser
from fusion_cli.pipeline.options import FuseOptions, FuseSummary, reporting
from fusion_cli.pipeline.output import (
    band_imagery,
    finish_block,
    model_band_names,
    output_nodata,
    product_tags,
    side_outputs,
    value_range,
    write_quicklook,
)
from fusion_cli.pipeline.readers import (
    PairSource,
    array_reader,
    band_count,
    file_reader,
    measure_ratio,
    measure_shift,
    open_pair,
    valid_means,
)
from fusion_cli.pipeline.stats import gather_stats
from fusion_cli.pipeline.writer import WriteBehind

PathLike = str | os.PathLike[str]


# FuseOptions that change the values of a product but have no meaning for arrays: refused, not ignored
_FILE_ONLY_OPTIONS = (
    "out_dtype",
    "zero_is_nodata",
    "pan_nodata",
    "ms_nodata",
    "coregister",
    "reproject",
    "ms_phase",
)


def fuse_arrays(
    pan: np.ndarray,
    ms: np.ndarray,
    fuser: Fuser,
    options: FuseOptions | None = None,
    *,
    pan_valid: np.ndarray | None = None,
    ms_valid: np.ndarray | None = None,
    shift: tuple[float, float] | None = None,
) -> np.ndarray:
    """Fuse in-memory arrays with the same tiling and checks as `fuse_files`.

    pan `(P, H, W)` (or `(H, W)`), ms `(C, H/r, W/r)` area-aligned (sample (i, j) covers PAN
    [r*i, r*(i+1)) x [r*j, r*(j+1))), in DN. Optional validity masks `(H, W)` / `(H/r, W/r)`, where
    NaN or inf must be excluded; `shift` (dy, dx) PAN px re-places the MS. Of the options, `bands` and
    `pan_bands` select (1-based) bands, and tiling, threads, `dn_max`, `stats_mpx`, `adapt`,
    `max_pixels` and `progress` apply as for files; options of a file's nodata, dtype or grid are
    refused (give masks, convert the result), those of writing a file unused. Returns float32
    `(C, H, W)` in DN, clipped to `[0, options.dn_max]` when given, NaN where invalid. `fuser` is not
    changed: the scene's statistics live in a copy (`scene_fuser`).
    """
    opts = options or FuseOptions()
    if not isinstance(opts, FuseOptions):
        raise FusionError(f"options must be a FuseOptions, got {type(opts).__name__}")
    if not isinstance(fuser, Fuser):
        raise FusionError(f"fuser must be a Fuser (pipeline.make_fuser), got {type(fuser).__name__}")
    given = [k for k in _FILE_ONLY_OPTIONS if getattr(opts, k) != getattr(FuseOptions(), k)]
    if given:
        raise FusionError(
            f"fuse_arrays does not apply {', '.join(given)}: give validity masks (pan_valid, ms_valid) "
            "and convert the float32 result yourself"
        )
    pan, ms = (_as_image(a, name) for a, name in ((pan, "pan"), (ms, "ms")))
    pan = pan[None] if pan.ndim == 2 else pan
    if pan.ndim != 3 or ms.ndim != 3:
        raise FusionError("fuse_arrays expects pan (P, H, W) and ms (C, h, w) arrays")
    pan = _pick_bands(pan, opts.pan_bands, "PAN")
    file_bands = ms.shape[0]
    ms = _pick_bands(ms, opts.bands, "MS")
    pan_valid = _valid_mask(pan_valid, pan, "pan")
    ms_valid = _valid_mask(ms_valid, ms, "ms")
    fuser = scene_fuser(fuser)
    fit_sensor_bands(fuser, file_bands, opts.bands, opts.sensor_bands)
    geom = align.relate_shapes(pan.shape[-2:], ms.shape[-2:], fuser.ratio)
    raster.check_scene_size(geom.height, geom.width, opts.max_pixels, geom.ratio)
    if shift is not None:
        geom = geom.with_shift(*shift)
    check_fuser(fuser, pan.shape[0], ms.shape[0])
    raster.refuse_constant(raster.constant_value(pan, pan_valid), "PAN", "array")
    raster.check_dn_max(opts.dn_max)
    adapt_dn_scale(fuser, str(ms.dtype), opts.dn_max)
    network = fuser.dn_max is not None
    # a network divides the PAN by the MS's scale too; a ratio method divides by the PAN's low-pass
    checked = [("MS", ms, ms_valid)] + ([("PAN", pan, pan_valid)] if fuser.nonnegative_dn else [])
    for what, image, valid in checked:
        values = image[:, valid] if valid is not None else image.reshape(len(image), -1)
        step = max(1, values.shape[1] // raster.DN_CHECK_SAMPLES)
        raster.check_dn_values(
            values[:, ::step], opts.dn_max if what == "MS" else None, True, nonnegative=fuser.nonnegative_dn,
            what=what,
            scale=(fuser.name, fuser.dn_max) if network and (opts.dn_max is None or what == "PAN") else None,
        )  # fmt: skip
    source = PairSource(
        geom,
        array_reader(pan, pan_valid),
        array_reader(ms, ms_valid),
        valid_means(pan, pan_valid),
        valid_means(ms, ms_valid),
    )
    plan = plan_for(fuser, geom, opts)
    out = np.empty((ms.shape[0], *geom.shape), np.float32)
    valid_all = np.empty(geom.shape, bool)

    def sink(row0: int, col0: int, data: np.ndarray, valid: np.ndarray) -> None:
        out[:, row0 : row0 + data.shape[1], col0 : col0 + data.shape[2]] = data
        valid_all[row0 : row0 + data.shape[1], col0 : col0 + data.shape[2]] = valid

    with run_threads(opts.threads), caller_autocast_off():
        _adapt(fuser, source, geom, opts)
        if fuser.needs_stats:
            gather_stats(fuser, source, plan, opts.stats_mpx, opts.progress)
        with reporting(opts.progress, plan.count, "fusing arrays") as advance:
            run(fuser, source, plan, ms.shape[0], sink, opts.batch, advance)
    if opts.dn_max is not None:
        np.clip(out, 0.0, opts.dn_max, out=out)
    if pan_valid is not None or ms_valid is not None:
        out[:, ~valid_all] = np.nan
    return out


def _as_image(a: Any, name: str) -> np.ndarray:
    """A numpy array of real numbers (a torch tensor is taken from the CPU as numpy)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # a torch tensor
        a = a.detach().cpu().numpy()
    if not isinstance(a, np.ndarray):
        raise FusionError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype.kind not in "uif":
        raise FusionError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return a


def _pick_bands(image: np.ndarray, bands: Sequence[int] | None, what: str) -> np.ndarray:
    """The 1-based `bands` of `image (C, H, W)`, in that order; all when None."""
    if bands is None:
        return image
    bad = [b for b in bands if not 1 <= int(b) <= len(image)]
    if bad:
        raise FusionError(f"{what} band(s) {bad} out of range: the {what} array has {len(image)} bands")
    return image[[int(b) - 1 for b in bands]]


def _valid_mask(valid: np.ndarray | None, image: np.ndarray, name: str) -> np.ndarray | None:
    """`valid` checked against `image (C, H, W)`: its shape, and no NaN or inf where it counts."""
    if valid is not None:
        valid = np.asarray(valid)
        if valid.shape != image.shape[-2:]:
            raise FusionError(
                f"{name}_valid has shape {valid.shape}, the {name} array's pixels {image.shape[-2:]}"
            )
        valid = valid.astype(bool)
    bad = raster.non_finite_pixels(image, valid)
    if bad is not None and bad.any():
        raise FusionError(
            f"the {name} array has NaN or infinite values at {int(bad.sum())} px that {name}_valid "
            f"does not exclude; pass {name}_valid=np.isfinite({name}).all(axis=0) or fill them"
        )
    return valid


def fuse_files(
    pan_path: PathLike,
    ms_path: PathLike,
    out_path: PathLike,
    fuser: Fuser,
    options: FuseOptions | None = None,
) -> FuseSummary:
    """Fuse a georeferenced (or size-related) PAN/MS pair into a GeoTIFF on the PAN grid.

    The output covers the PAN pixels inside both inputs; it appears atomically at `out_path`. What
    the run warns about (a zero collar, an alpha band read as data) is in the summary's `warnings`.
    """
    with notices.collected() as said:
        summary = _fuse_files(pan_path, ms_path, out_path, fuser, options or FuseOptions())
    summary.warnings += [m for m in said if m not in summary.warnings]
    return summary


def check_inputs_unchanged(
    fingerprints: dict[str, dict[str, object] | None], paths: dict[str, PathLike]
) -> None:
    """Refuse to finish a product whose PAN or MS was rewritten or replaced while it was fused (its
    tags would name a file it was not made of, or one it was made of only in part)."""
    for role in raster.changed_inputs(fingerprints, paths):
        _changed_while_fused(role, paths[role])


def _changed_while_fused(role: str, path: PathLike) -> None:
    raise FusionError(
        f"the {role.upper()} {path} changed while it was fused (another process wrote or replaced it): "
        "no product was written; fuse it again once that is done"
    )


def _fingerprints(
    before: dict[str, tuple[int, int] | None], paths: dict[str, PathLike]
) -> dict[str, dict[str, object] | None]:
    """The inputs' `raster.file_fingerprint`s, taken now (after the statistics pass: hashing them
    first made every early refusal pay ~1 s per GB), refused where the size or time moved since
    `before` (`raster.file_stat`, taken before anything was read)."""
    prints = {role: raster.file_fingerprint(path) for role, path in paths.items()}
    for role, made in prints.items():
        if made is not None and before[role] not in (None, (made["size"], made["mtime_ns"])):
            _changed_while_fused(role, paths[role])
    return prints


def _fuse_files(
    pan_path: PathLike, ms_path: PathLike, out_path: PathLike, fuser: Fuser, opts: FuseOptions
) -> FuseSummary:
    t0 = time.perf_counter()
    fuser = scene_fuser(fuser)  # the scene's statistics, DN scale and adapted network stay in here
    inputs = [pan_path, ms_path, *fuser.weights_files]
    out = raster.check_writable(out_path, opts.overwrite, inputs, side_outputs(out_path, opts))
    # size and time before anything is read (`_fingerprints` checks against them): taken after the
    # statistics pass, the fingerprints described an MS that another process had replaced meanwhile,
    # and a batch then skipped a product of the old one as up to date
    inputs_by_role = {"pan": pan_path, "ms": ms_path}
    before = {role: raster.file_stat(path) for role, path in inputs_by_role.items()}
    caught: list[str] = []
    with (
        contextlib.ExitStack() as threads,
        raster.gdal_env(),
        open_pair(pan_path, ms_path, opts.reproject, fuser.ratio, opts.pan_nodata, opts.ms_nodata) as (
            pan_ds,
            ms_ds,
        ),
    ):
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            geom = align.relate_grids(pan_ds, ms_ds, fuser.ratio)
            if opts.ms_phase == "geometric" and geom.georeferenced:
                if "WALD_RATIO" in ms_ds.tags():  # decimated in the toolbox's phase: it is that phase's
                    raise FusionError(
                        f"{ms_path} was reduced by fusion simulate, which samples in the toolbox's phase; "
                        "fuse it with --ms-phase toolbox (the default), or its product sits half a PAN "
                        "pixel off the reference"
                    )
                geom = replace(geom, phase=align.sampling_phase(geom.ratio))
            simulated_for = ms_ds.tags().get("WALD_SENSOR")
            generic = getattr(fuser, "uses_mtf_gains", False) and getattr(fuser, "sensor", None) == "generic"
            if generic and simulated_for not in (None, "generic"):
                # fusing `fusion simulate`'s pair by hand then gave other figures than evaluate's
                notices.notify(
                    f"{ms_path} was simulated for {simulated_for} (its WALD_SENSOR tag) and is fused with "
                    f"generic MTF gains: pass --sensor {simulated_for} to fuse it as fusion evaluate does"
                )
        raster.check_scene_size(geom.height, geom.width, opts.max_pixels, geom.ratio)
        caught += [str(w.message) for w in wlist if "NotGeoreferenced" not in type(w.message).__name__]
        bands = raster.select_bands(ms_ds, opts.bands, "MS")
        pan_bands = raster.select_bands(pan_ds, opts.pan_bands, "PAN")
        raster.refuse_constant(
            raster.constant_band_value(pan_ds, pan_bands, opts.zero_is_nodata), "PAN", pan_path
        )
        # the product holds MS DN: it keeps their scale, offset and unit, which the PAN must share
        encoding = raster.Encoding.of(ms_ds, bands)
        raster.check_same_encoding(
            ("PAN", raster.Encoding.of(pan_ds, pan_bands)), ("MS", encoding), "fusion works on stored DN"
        )
        check_fuser(fuser, len(pan_bands), len(bands))
        fit_sensor_bands(fuser, *raster.data_band_positions(ms_ds, bands), opts.sensor_bands)
        check_band_wavelengths(fuser, ms_ds, bands, pan_ds, pan_bands)
        ms_dtype = ms_ds.dtypes[bands[0] - 1]
        out_dtype = opts.out_dtype or ms_dtype  # --dtype is checked when the options are made
        raster.check_dn_max(opts.dn_max)
        dn_max = opts.dn_max if opts.dn_max is not None else raster.detect_dn_max(ms_ds)
        # a Wald-reduced float MS (fusion simulate) names the dtype its DN came from
        adapt_dn_scale(fuser, ms_ds.tags().get(raster.SOURCE_DTYPE_TAG, ms_dtype), opts.dn_max)
        network = fuser.dn_max is not None
        raster.check_dn_range(
            ms_ds, bands, dn_max, opts.dn_max is not None, nonnegative=fuser.nonnegative_dn,
            scale=(fuser.name, fuser.dn_max) if network and opts.dn_max is None else None,
        )  # fmt: skip
        if network:  # it divides the PAN by the MS's scale too
            raster.check_same_bit_depth(pan_ds, ms_ds, f"network {fuser.name} reads both on one DN scale")
        if fuser.nonnegative_dn:
            scale = (fuser.name, fuser.dn_max) if network else None
            raster.check_dn_range(
                pan_ds, pan_bands, None, False, nonnegative=fuser.nonnegative_dn, what="PAN", scale=scale
            )
        lo, hi = value_range(ms_dtype, dn_max, nonnegative=network)
        out_range = raster.dtype_range(out_dtype)
        if lo is not None and out_range is not None and lo < out_range[0]:
            # a signed type whose data stay above the output's floor (non-negative int16 DN as
            # uint16): the floor clips what a method undershoots, as the ceiling does
            sample = raster.sample_values(ms_ds, bands)
            if sample.size and sample.min() >= out_range[0]:
                lo = out_range[0]
        raster.check_narrowing(ms_dtype, out_dtype, lo, hi)
        raster.check_integer_output(ms_ds, bands, out_dtype)
        nodata, use_mask = output_nodata(pan_ds, ms_ds, bands, pan_bands, out_dtype, opts)
        # before the shift, --adapt and the statistics: bad creation options are refused before any
        # work (a shift moves the MS, not the product's grid)
        profile = raster.output_profile(
            width=geom.width,
            height=geom.height,
            count=len(bands),
            dtype=out_dtype,
            crs=geom.crs,
            transform=geom.out_transform,
            nodata=nodata,
            compress=opts.compress,
            creation_options=opts.creation_options,
            cog=opts.cog,
        )

        source = PairSource(
            geom,
            file_reader(pan_ds, pan_bands, opts.zero_is_nodata),
            file_reader(ms_ds, bands, opts.zero_is_nodata),
            raster.scene_fill(pan_ds, pan_bands, opts.zero_is_nodata),
            raster.scene_fill(ms_ds, bands, opts.zero_is_nodata),
        )
        if not opts.zero_is_nodata:
            collar = raster.fill_share(ms_ds, bands)
            if collar >= raster.ZERO_COLLAR_SHARE:
                caught.append(
                    f"{collar:.0%} of the MS pixels are 0 in every band and it declares no nodata: if they "
                    "are a fill collar, pass --zero-nodata (fused as data, they enter the method's "
                    "statistics and the product)"
                )
        top = raster.dtype_range(ms_dtype)
        if top is not None and np.dtype(ms_dtype).itemsize > 1:  # 8-bit data saturate at 255 (clouds)
            filled = raster.fill_share(ms_ds, bands, top[1])
            if filled >= raster.ZERO_COLLAR_SHARE:
                caught.append(
                    f"{filled:.0%} of the MS pixels are {top[1]:g} (the {ms_dtype} maximum) in every "
                    f"band and it declares no nodata: if they are a fill, pass --nodata {top[1]:g} (or "
                    "--ms-nodata for the MS alone; fused as data, they enter the method's statistics and "
                    "the product)"
                )
        shift = None
        if opts.measure_shift or opts.coregister:
            try:
                shift = measure_shift(source, required=opts.coregister)
            except align.ShiftNotMeasurable as exc:
                if opts.coregister:  # applying an arbitrary shift would misplace the product
                    raise FusionError(f"--coregister: {exc}; fuse without --coregister") from None
                caught.append(f"{exc}; none reported")
        if opts.coregister and shift is not None:
            geom = geom.with_shift(shift["dy"], shift["dx"])
            source.geom = geom
        plan = plan_for(fuser, geom, opts)
        threads.enter_context(run_threads(opts.threads))
        threads.enter_context(caller_autocast_off())
        adapted = _adapt(fuser, source, geom, opts)
        if fuser.needs_stats:
            gather_stats(fuser, source, plan, opts.stats_mpx, opts.progress, f"statistics of {out.name}")

        fingerprints = _fingerprints(before, inputs_by_role)
        tags = raster.carried_tags(ms_ds.tags()) | product_tags(
            fuser,
            opts,
            plan,
            geom,
            bands=bands,
            pan_bands=pan_bands,
            dn_max=dn_max,
            out_dtype=out_dtype,
            reprojected=raster.is_warped(ms_ds),
            pan_path=pan_path,
            ms_path=ms_path,
            shift=shift,
            fingerprints=fingerprints,
        )
        n_valid = 0
        descriptions = raster.band_descriptions(ms_ds, bands)
        stated = wavelengths.of_raster(ms_ds, bands)
        with (
            raster.AtomicWriter(
                out,
                profile,
                descriptions=descriptions,
                tags=tags,
                use_mask=use_mask,
                overwrite=opts.overwrite,
                cog=opts.cog,
                colorinterp=raster.product_colorinterp(
                    [ms_ds.colorinterp[b - 1] for b in bands], descriptions, model_band_names(fuser)
                ),
                imagery=band_imagery(fuser, descriptions, bands, ms_ds.count, stated),
                band_tags=raster.carried_band_tags(ms_ds, bands),
                encoding=encoding,
            ) as writer,
            reporting(opts.progress, plan.count, f"fusing {out.name}") as advance,
        ):

            def sink(row0: int, col0: int, data: np.ndarray, valid: np.ndarray) -> None:
                nonlocal n_valid
                n_valid += int(valid.sum())
                block = finish_block(data, valid, out_dtype, lo, hi, nodata)  # new array: `data` is reused
                behind.submit(writer.write, block, row0, col0, valid.copy() if use_mask else None)

            with WriteBehind() as behind:
                run(fuser, source, plan, len(bands), sink, opts.batch, advance)
            if n_valid == 0:  # all nodata: an empty product is no product
                raise FusionError(
                    f"no valid pixel where {pan_path} and {ms_path} overlap (all nodata or masked); "
                    "check the inputs and their nodata"
                )
            check_inputs_unchanged(fingerprints, inputs_by_role)
            quick: str | None = None

            def quicklook(product: Path) -> None:
                nonlocal quick
                quick = write_quicklook(out, fuser, opts.overwrite, product)

            writer.commit(quicklook if opts.quicklook else None)

    seconds = time.perf_counter() - t0
    return FuseSummary(
        output=str(out),
        shape=(len(bands), geom.height, geom.width),
        dtype=out_dtype,
        crs=geom.crs.to_string() if geom.crs is not None else None,
        transform=list(geom.out_transform)[:6] if geom.out_transform is not None else None,
        fuser=fuser.name,
        weights_sha256=fuser.weights_sha256,
        device=str(fuser.device),
        precision=fuser.precision,
        scan_backend=fuser.scan_backend,
        ratio=geom.ratio,
        tiles=plan.count,
        tile=plan.tile,
        overlap=plan.overlap,
        seconds=round(seconds, 3),
        mpx_per_s=round(geom.height * geom.width / 1e6 / max(seconds, 1e-9), 4),
        nodata=nodata,
        internal_mask=use_mask,
        valid_fraction=round(n_valid / (geom.height * geom.width), 6),
        shift_measured=shift,
        shift_applied=bool(opts.coregister and shift is not None),
        bytes=out.stat().st_size,
        pan=str(pan_path),
        ms=str(ms_path),
        quicklook=quick,
        warnings=caught,
        adapt=adapted,
    )


def _adapt(
    fuser: Fuser, source: PairSource, geom: align.Alignment, opts: FuseOptions
) -> dict[str, Any] | None:
    """`--adapt N`: fine-tune the network on the central part of this scene before fusing it
    (target-adaptive, `fusion_cli.training.adapt`); the weights on disk are not changed."""
    if not opts.adapt:
        return None
    from fusion_cli.training.adapt import adapt_fuser

    m = math.lcm(geom.ratio, max(1, int(fuser.tile_multiple)))
    h, w = min(geom.height, 1024) // m * m, min(geom.width, 1024) // m * m
    row, col = (geom.height - h) // 2 // m * m, (geom.width - w) // 2 // m * m
    window = source.read(row, col, h, w)
    return asdict(adapt_fuser(fuser, window.pan, window.ms, opts.adapt))


def _split_options(names: dict[str, Any], opts: dict[str, Any]) -> tuple[FuserSpec, FuseOptions]:
    """`names` (model, weights, method, sensor) and flat keyword options -> (FuserSpec, FuseOptions).
    `dn_max` goes to both: the network's DN scale and the product's clip ceiling."""
    spec_keys = FuserSpec.field_names()
    run_keys = set(FuseOptions.__dataclass_fields__)
    bad = sorted(set(opts) - spec_keys - run_keys)
    if bad:
        raise TypeError(f"unknown option(s): {', '.join(bad)}")
    spec = FuserSpec(**names, **{k: v for k, v in opts.items() if k in spec_keys})
    return spec, FuseOptions(**{k: v for k, v in opts.items() if k in run_keys})


def check_default_model_fits(
    ms: PathLike, ratio: int, bands: Sequence[int] | None = None, pan_bands: int = 1
) -> None:
    """Refuse, naming the installed models that fit, a pair (its MS, or `bands` of it, at `ratio`,
    beside a high-resolution image of `pan_bands` bands) that the default model, used when no model,
    weights or method is given, cannot fuse."""
    from fusion_cli.models.registry import default_model_mismatch

    mismatch = default_model_mismatch(band_count(ms, "MS", bands), ratio, pan_bands=pan_bands)
    if mismatch:
        raise FusionError(mismatch)


def _resolve_fuser(pan: PathLike, ms: PathLike, out: PathLike, spec: FuserSpec, opts: FuseOptions) -> Fuser:
    # Fail on bad inputs or an unwritable output before loading a model (which takes time).
    raster.check_writable(out, opts.overwrite, [pan, ms], side_outputs(out, opts))
    ratio = measure_ratio(pan, ms, opts.reproject)
    # a pick beyond a file is named as such before any model is chosen or loaded
    ms_count, pan_count = band_count(ms, "MS", opts.bands), band_count(pan, "PAN", opts.pan_bands)
    if spec.model is None and spec.weights is None and spec.method is None:
        check_default_model_fits(ms, ratio, opts.bands, pan_count)
    return build_fuser(
        spec,
        ratio=ratio if spec.method is not None else None,
        ms_bands=ms_count if opts.bands else None,
        pan_bands=pan_count,
    )


def _fuse(
    pan: PathLike,
    ms: PathLike,
    out: PathLike,
    spec: FuserSpec,
    options: FuseOptions,
) -> FuseSummary:
    fuser = _resolve_fuser(pan, ms, out, spec, options)
    return fuse_files(pan, ms, out, fuser, options)


def pansharpen(
    pan: PathLike,
    ms: PathLike,
    out: PathLike,
    *,
    model: str | None = None,
    weights: PathLike | None = None,
    method: str | None = None,
    sensor: str | None = None,
    **opts: Any,
) -> FuseSummary:
    """PAN + MS (or PAN + HSI with a hyperspectral model) -> fused GeoTIFF. `opts`: the fields of
    `FuserSpec` (device, precision, dn_max, scan_memory, ensemble) and of `FuseOptions`."""
    names = {"model": model, "weights": weights, "method": method, "sensor": sensor}
    spec, options = _split_options(names, opts)
    raster.check_same_file(pan, ms)
    # a classical method would silently treat a multi-band "PAN" as an MSI (HISR)
    pan_count = (len(options.pan_bands) if options.pan_bands else band_count(pan, "PAN")) if method else 1
    if pan_count > 1:
        raise FusionError(
            f"the PAN {pan} {'--pan-bands selects' if options.pan_bands else 'has'} {pan_count} bands; "
            "pansharpening needs a single-band PAN (pick one with --pan-bands N; for a multispectral "
            "high-resolution image use `fusion hisr`)"
        )
    return _fuse(pan, ms, out, spec, options)


def hisr(
    hsi: PathLike,
    msi: PathLike,
    out: PathLike,
    *,
    model: str | None = None,
    weights: PathLike | None = None,
    method: str | None = None,
    sensor: str | None = None,
    **opts: Any,
) -> FuseSummary:
    """Low-resolution HSI + high-resolution MSI -> HSI at the MSI resolution (the MSI is the "pan").
    `opts` as for `pansharpen`. Without a model, weights or method: the shipped HISR model."""
    if model is None and weights is None and method is None:
        from fusion_cli.models.registry import default_model_name

        model = default_model_name(task="hisr")
    names = {"model": model, "weights": weights, "method": method, "sensor": sensor}
    spec, options = _split_options(names, opts)
    try:
        return _fuse(msi, hsi, out, spec, options)
    except FusionError as exc:  # the pipeline names the pair's roles as pansharpening does
        exc.args = (in_hisr_terms(str(exc), [hsi, msi, out, *([weights] if weights else [])]),)
        raise


# The pansharpening roles as HISR names them: the MSI plays the PAN, the HSI the MS
_HISR_TERMS = (
    (re.compile(r"\bPAN/MS\b"), "MSI/HSI"),
    (re.compile(r"\bPAN\b"), "MSI"),
    (re.compile(r"\bMS\b"), "HSI"),
)


def in_hisr_terms(message: str, paths: Sequence[PathLike] = ()) -> str:
    """A pipeline message with the pansharpening roles renamed for HISR ("the MS has 46 bands" ->
    "the HSI has 46 bands"). The `paths` it may quote are left as they are (a folder named PAN/)."""
    quoted = sorted({os.fspath(p) for p in paths if os.fspath(p)}, key=len, reverse=True)
    pieces = re.split("(" + "|".join(map(re.escape, quoted)) + ")", message) if quoted else [message]
    for i in range(0, len(pieces), 2):  # the even pieces are the text between the paths
        for pattern, name in _HISR_TERMS:
            pieces[i] = pattern.sub(name, pieces[i])
    return "".join(pieces)
