"""The real per-scene processor: one fuser built once for the batch, `pipeline.fuse_files` per scene,
and optional full-resolution metrics written beside each output."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusion_cli import jsonout
from fusion_cli.batch.execution import SceneProcessor
from fusion_cli.batch.pairing import Scene
from fusion_cli.errors import FusionError, is_out_of_memory


@dataclass
class FuseJob:
    """Everything a worker needs to build its fuser and fuse a scene (picklable, for Dask).

    `fuser` holds the keyword arguments of `pipeline.make_fuser` (model, weights, method, sensor,
    device, precision, dn_max, ms_bands); `options` is a `pipeline.FuseOptions`.
    """

    fuser: dict[str, Any]
    options: Any
    metrics: bool = False

    def cache_key(self) -> str:
        """Jobs with equal keys can share one scene processor (a Dask worker keeps it between
        batches): the same fuser and the same options and metrics, which the processor holds too."""
        options = (
            {} if self.options is None else {k: v for k, v in vars(self.options).items() if k != "progress"}
        )
        return json.dumps(
            {"fuser": self.fuser, "options": options, "metrics": self.metrics}, sort_keys=True, default=str
        )

    def asked_fuser(self) -> Any:
        """The fuser this job asks for (a classical method at ratio 4: what it is, not the ratio each
        scene measures): what a complete product must have been made by to count as done."""
        from fusion_cli import pipeline

        ratio = {"ratio": 4} if self.fuser.get("method") is not None else {}
        return pipeline.make_fuser(**self.fuser, **ratio)

    def check_fuser(self) -> None:
        """Build the fuser this job asks for on the CPU and drop it: a bad model, method, weights file
        or option is a FusionError here, once, rather than every scene's failure on the workers (a
        Dask client). The workers check the device, which may exist only there; what the CPU build
        says, e.g. that a precision applies on CUDA only, is not said to the client."""
        from fusion_cli import notices

        with notices.collected():
            replace(self, fuser={**self.fuser, "device": "cpu"}).asked_fuser()

    def side_files(self, out: Path) -> list[Path]:
        """Files written beside a product after it is placed: a scene lacking one is not done."""
        from fusion_cli.pipeline.output import side_outputs

        quicklook = side_outputs(out, self.options) if self.options is not None else []
        return quicklook + ([metrics_path(out)] if self.metrics else [])


def make_scene_processor(job: FuseJob) -> SceneProcessor:
    """`process(scene)` fusing with one fuser built once for the whole batch.

    A network is built once and serves every scene (a shallow copy per scene holds its statistics).
    A classical method depends on the pair's ratio (measured per scene from the geotransforms) and
    on its PAN band count (an MSI's for HISR), so one instance is kept per both; a method with scene
    statistics (`needs_stats`) gets a fresh instance per scene so that no statistics leak from one
    scene into the next (cheap: classical methods have no weights).
    """
    from fusion_cli import pipeline
    from fusion_cli.pipeline.output import write_quicklook

    # The batch already decided the scene must be (re)done, so the writer may replace the target.
    options = replace(job.options, overwrite=True)
    classical = job.fuser.get("method") is not None
    default_model = not any(job.fuser.get(k) is not None for k in ("model", "weights", "method"))
    fusers: dict[tuple[int, int] | None, Any] = {}
    asked = job.asked_fuser()  # bad model / weights / method names fail here, before the first scene
    if not classical:
        fusers[None] = asked

    def fuser_for(scene: Scene) -> Any:
        if not classical and not default_model:
            # One network serves the batch; its scene statistics (band max) live in a shallow
            # per-scene copy, so scenes fused concurrently do not share them.
            return copy.copy(fusers[None])
        ratio = pipeline.measure_ratio(scene.pan, scene.ms, options.reproject)
        # HISR: the MSI's bands (or --pan-bands') are the "PAN" bands
        pan_count = pipeline.band_count(scene.pan, "PAN", options.pan_bands)
        if not classical:  # the default model: a pair it cannot fuse is told which model can
            pipeline.check_default_model_fits(scene.ms, ratio, options.bands, pan_count)
            return copy.copy(fusers[None])
        fuser = fusers.get((ratio, pan_count))
        if fuser is None or fuser.needs_stats:
            fuser = pipeline.make_fuser(**{**job.fuser, "ratio": ratio, "pan_bands": pan_count})
            fusers[ratio, pan_count] = fuser
        return fuser

    def refuse_linked_side_files(scene: Scene) -> None:
        # Side files are replaced as the product is (a redo), but never through a link: the product
        # itself is refused as a symlink when the plan is made (`pairing.escapes`).
        for side in job.side_files(scene.out):
            refuse_linked_side_file(side, scene.out)

    def add_metrics(scene: Scene, ratio: int, details: dict[str, Any]) -> None:
        # The product is already complete: a metrics problem is reported, not a failed scene.
        try:
            details["metrics"] = scene_metrics(
                scene, ratio=ratio, sensor=job.fuser.get("sensor"), reproject=options.reproject,
                bands=options.bands, sensor_bands=options.sensor_bands,
            )  # fmt: skip
        except (FusionError, ValueError, MemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not is_out_of_memory(exc):
                raise
            details["metrics_error"] = f"out of memory: {exc}" if is_out_of_memory(exc) else str(exc)
            # written too, so that a rerun sees the scene finished rather than redo it
            write_metrics_sidecar(scene, {"metrics_error": details["metrics_error"]})

    def process(scene: Scene) -> dict[str, Any]:
        refuse_linked_side_files(scene)
        fuser = fuser_for(scene)
        redo = scene.out.exists()
        summary = pipeline.fuse_files(scene.pan, scene.ms, scene.out, fuser, options)
        details = summary.to_dict()
        if redo:
            remove_stale_side_files(scene.out, job)
        if job.metrics:
            add_metrics(scene, summary.ratio, details)
        return details

    def finish(scene: Scene) -> dict[str, Any]:
        """Write the side files a complete product lacks (an interrupt came after it was placed),
        from the product as it is: no second fusion, and no product replaced."""
        refuse_linked_side_files(scene)
        details: dict[str, Any] = {}
        if options.quicklook and not scene.out.with_suffix(".png").exists():
            details["quicklook"] = write_quicklook(scene.out, fuser_for(scene), True)
        if job.metrics and not metrics_path(scene.out).exists():
            add_metrics(scene, pipeline.measure_ratio(scene.pan, scene.ms, options.reproject), details)
        return details

    def made_otherwise(scene: Scene) -> str | None:
        return product_differs(scene.out, asked, options, scene)

    process.side_files = job.side_files  # type: ignore[attr-defined]
    process.made_otherwise = made_otherwise  # type: ignore[attr-defined]
    process.finish = finish  # type: ignore[attr-defined]
    return process


def product_differs(out: Path, asked: Any, options: Any = None, scene: Scene | None = None) -> str | None:
    """How a complete product's tags differ from what a batch asks for: another model, method or
    weights than the fuser `asked`, a classical method's other --sensor or sensor bands (its MTF
    gains: those `options` give the `scene`'s MS), other PAN bands (an MSI's, HISR: --pan-bands),
    another --ms-phase, or another pixel type than `options.out_dtype` (when given); None when they
    agree."""
    from fusion_cli.raster import open_raster, recorded_params

    with open_raster(out, "product") as ds:
        tags, dtype = ds.tags(), ds.dtypes[0]
        georeferenced = ds.crs is not None or not ds.transform.is_identity
    made = (tags.get("FUSION_MODEL"), tags.get("FUSION_WEIGHTS_SHA256", "none"))
    if made != (asked.name, asked.weights_sha256 or "none"):
        weights = "" if made[0] != asked.name else " with other weights"
        return f"was made by {made[0]}{weights}, not {asked.name}"
    params = recorded_params(tags)
    sensor, recorded = params.get("sensor"), params.get("sensor_bands")
    wanted = getattr(asked, "sensor", None)
    if sensor is not None and wanted is not None and sensor != wanted:  # older products record none
        return f"was made with --sensor {sensor}, not {wanted}"
    ms, pan = (None, None) if scene is None else (scene.ms, scene.pan)
    expected = _asked_sensor_bands(wanted, options, ms) if recorded is not None else None
    if expected is not None and expected != recorded:
        return f"was made for {sensor} bands {recorded}, not {expected}"
    for role, path, made_bands, asked_bands in (
        ("PAN", pan, params.get("pan_bands"), getattr(options, "pan_bands", None)),
        ("MS", ms, params.get("bands"), getattr(options, "bands", None)),
    ):
        asked_list = _asked_bands(path, asked_bands, role)
        if isinstance(made_bands, list) and asked_list is not None and made_bands != asked_list:
            return f"was made from {role} bands {made_bands}, not {asked_list}"
    made_phase, asked_phase = params.get("ms_phase"), getattr(options, "ms_phase", None)
    if georeferenced and made_phase is not None and asked_phase is not None and made_phase != asked_phase:
        return f"was made with --ms-phase {made_phase}, not {asked_phase}"
    out_dtype = getattr(options, "out_dtype", None)
    if out_dtype is not None and dtype != out_dtype:
        return f"is {dtype}, not the --dtype {out_dtype} asked"
    # the DN ceiling the product was clipped to against this run's, each as it resolves (--dn-max, else
    # the MS's NBITS, else the type's range): --dn-max 4095 asks what NBITS=12 gave
    if "dn_max" in params and options is not None and ms is not None:
        nbits_max, ms_dtype = _ms_ceiling(ms)
        if ms_dtype is not None:  # (the clip range is the MS type's, whatever --dtype writes)
            made_max = _ceiling(params["dn_max"], ms_dtype)
            asked_max = _ceiling(options.dn_max if options.dn_max is not None else nbits_max, ms_dtype)
            if made_max != asked_max:
                return f"was clipped to DN {made_max:g}, and this run clips to {asked_max:g} (--dn-max)"
    if "FUSION_REQUEST" in tags and options is not None and scene is not None:  # older products: none
        return _request_differs(json.loads(tags["FUSION_REQUEST"]), options, scene, tags)
    return None


# Options `product_differs` compares as they resolved (the bands used, the pixel type written, the DN
# ceiling clipped to): --bands 1,2,3,4 asks for what leaving it out asks for on a 4-band MS.
_COMPARED_RESOLVED = {"bands", "pan_bands", "sensor_bands", "out_dtype", "ms_phase", "dn_max"}


def _request_differs(made: dict[str, Any], options: Any, scene: Scene, tags: dict[str, str]) -> str | None:
    """How the inputs and content options a product records (FUSION_REQUEST) differ from the scene's
    and the batch's: an OUT_DIR of another folder's products, an input rewritten since, or --bands
    changed were skipped as complete at exit 0."""
    from fusion_cli.pipeline.options import PRODUCT_OPTIONS
    from fusion_cli.pipeline.output import request_options
    from fusion_cli.raster import changed_inputs

    for role in changed_inputs(made, {"pan": scene.pan, "ms": scene.ms}):
        tag = tags.get(f"FUSION_{role.upper()}")
        return f"was made from another {role.upper()} ({tag}), or the file changed since"
    asked = json.loads(jsonout.dumps(request_options(options), sort_keys=True))
    for name, flag in PRODUCT_OPTIONS.items():
        if name in _COMPARED_RESOLVED:
            continue
        if name in made.get("options", {}) and made["options"][name] != asked[name]:
            was, now = _shown(made["options"][name]), _shown(asked[name])
            return f"was made with {flag} {was}, and this run has {now}"
    return None


def _shown(value: Any) -> str:
    """An option's value as the user writes it: 1,2,3 for a band list, on/off for a switch, and
    'none' for an option not given."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


def _asked_sensor_bands(sensor: str | None, options: Any, ms: Path | None) -> list[int] | None:
    """The sensor band numbers a classical method fusing `ms` with `options` would record, as
    `fuse_files` finds them; None where they cannot be told here (the run says why)."""
    if sensor is None or ms is None or options is None:
        return None
    from fusion_cli.raster import data_band_positions, open_raster
    from fusion_cli.sensors import sensor_band_numbers

    try:
        with open_raster(ms, "MS") as ds:
            file_bands, positions = data_band_positions(ds, options.bands)
        return sensor_band_numbers(sensor, file_bands, positions, options.sensor_bands)
    except FusionError:
        return None


def _ceiling(dn_max: float | None, dtype: str) -> float:
    """A DN ceiling, None being the MS type's own range (integers) or none (floats: inf)."""
    if dn_max is not None:
        return float(dn_max)
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else math.inf


def _ms_ceiling(ms: Path | str) -> tuple[float | None, str | None]:
    """The MS's NBITS ceiling (None without the tag) and its pixel type (None: unreadable here)."""
    from fusion_cli.raster import detect_dn_max, open_raster

    try:
        with open_raster(ms, "MS") as ds:
            return detect_dn_max(ds), ds.dtypes[0]
    except FusionError:
        return None, None


def _asked_bands(path: Path | str | None, bands: list[int] | None, role: str) -> list[int] | None:
    """The bands of `path` (the PAN, an MSI's for HISR, or the MS) that `bands` (--pan-bands,
    --bands) select, as `fuse_files` records them; None where they cannot be told here (the run
    says why)."""
    if path is None:
        return None
    from fusion_cli.raster import open_raster, select_bands

    try:
        with open_raster(path, role) as ds:
            return select_bands(ds, bands, role, read=False)
    except FusionError:
        return None


def remove_stale_side_files(out: Path, job: FuseJob) -> None:
    """After a redo placed a new product at `out`: remove the quicklook and metrics sidecar the old
    product had that this run does not write (it replaces the others). They described the old product,
    and a later run with --quicklook/--metrics took them for the new one's and skipped the scene."""
    written = set(job.side_files(out))
    for side in (out.with_suffix(".png"), metrics_path(out)):
        if side not in written and side.is_file() and not side.is_symlink():
            side.unlink()


def refuse_linked_side_file(side: Path, out: Path) -> None:
    """A file written beside output `out` must not be a symlink (writing it would replace the link's
    target, an input in the audit)."""
    if side.is_symlink():
        raise FusionError(
            f"{side.name}, written beside output {out.name}, is a symlink; remove it or choose another "
            "output name"
        )


def metrics_path(out: Path) -> Path:
    """Where `--metrics` writes a product's full-resolution indices: `<out>.metrics.json`."""
    return out.with_name(out.name + ".metrics.json")


def scene_metrics(
    scene: Scene,
    ratio: int,
    sensor: str | None = None,
    reproject: bool = False,
    bands: list[int] | None = None,
    sensor_bands: list[int] | None = None,
) -> dict[str, Any]:
    """Full-resolution indices (D_lambda, D_s, QNR, HQNR) of a finished scene, also written beside
    the output as `<out>.metrics.json` so a report can be built from the output folder alone.
    `bands`: the MS bands the product was fused from, in its order (--bands), all by default;
    `sensor_bands`: which of the sensor's bands the MS file's are (--sensor-bands).

    Reads the three images whole in their own type (the filters run by row strips). The same
    reading and line-up as `fusion metrics` (`assess.load_case`): the product lies on the PAN grid
    over the area both inputs cover (a Landsat product lacks the half-covered first PAN row and
    column), so cropping all three from their top-left corners compared pixels one PAN pixel apart.
    """
    from fusion_cli.assess import EvalOptions, load_case, score
    from fusion_cli.metrics.table import metrics

    if reproject:  # the MS is on another grid: the line-up by geotransforms does not hold
        raise FusionError("full-resolution metrics of a --reproject run: score it with `fusion metrics`")
    result = score(
        load_case(scene.out, None, scene.pan, scene.ms, None, ratio),
        EvalOptions(sensor=sensor, bands=bands, sensor_bands=sensor_bands),
    )
    keys = [m.name for m in metrics("full")] + ["bands", "ratio", "scored_fraction"]  # as full_resolution
    values = {k: result[k] for k in keys if k in result}
    write_metrics_sidecar(scene, {"metrics": values})
    return values


def write_metrics_sidecar(scene: Scene, content: dict[str, Any]) -> None:
    """`<out>.metrics.json`: the scene's inputs and `content` (its indices, or why there are none)."""
    from fusion_cli import raster

    payload = {"fused": str(scene.out), "pan": str(scene.pan), "ms": str(scene.ms), **content}
    sidecar = metrics_path(scene.out)
    # again here: a link made while the scene was fused was written through, replacing its target
    refuse_linked_side_file(sidecar, scene.out)
    with raster.atomic_output(sidecar, overwrite=True, what="metrics") as tmp:
        tmp.write_text(jsonout.dumps(payload, indent=2))
