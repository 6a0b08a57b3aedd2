"""The evaluation harness behind `fusion evaluate`: every method on every scene, at reduced and at
full resolution, one table.

Per scene: Wald's protocol (`fusion_cli.wald.simulate_files`: MTF-degraded MS and PAN, the original MS
as reference), each method fuses the reduced pair through the same streaming pipeline as `fusion
pansharpen` and is scored with the toolbox's reduced-resolution indices (Q2n, Q, SAM, ERGAS, SCC);
then each method fuses the original pair and is scored with the no-reference indices (D_lambda,
D_s, QNR, D_lambda^K, HQNR) and the sharpness index HPC. Times are wall-clock seconds of each fusion
(statistics pass, I/O and writing included). Several scenes give mean and standard deviation per
method, as published tables. The inputs' nodata and masks carry through the simulation into the
reference and the reduced pair, and from there into each product: the scores leave out every pixel
either marks invalid (`fusion_cli.assess`).

Methods are classical names (`gsa`, `mtf-glp-hpm`, ...) or `fusionmamba:MODEL` where MODEL is a
registry name or a weights file (a card + safetensors pair or the official `.pth`).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusion_cli import jsonout
from fusion_cli.errors import FusionError, NegativeDN
from fusion_cli.metrics.table import evaluate_keys, higher_is_better
from fusion_cli.notices import notify
from fusion_cli.raster import atomic_output, check_same_file, make_output_folder
from fusion_cli.sensors import canonical_sensor
from fusion_cli.signals import deferred_signals

TIME_KEYS = ("time_rr_s", "time_fr_s")


# HISR rows add the index the HISR literature and the HISR cards rank by
HISR_KEYS = ("PSNR",)


def _index_keys() -> tuple[str, ...]:
    """The indices of the comparison table (the metric table's `evaluate` entries), reduced (and
    HISR's) then full."""
    reduced = evaluate_keys("reduced")
    return (*reduced, *(k for k in HISR_KEYS if k not in reduced), *evaluate_keys("full"))


@dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: a classical method or a network."""

    label: str
    method: str | None = None
    model: str | None = None
    weights: str | None = None
    implied: bool = False  # one of `classical`, not named: left out (warning) where it refuses the data


def parse_methods(text: str) -> list[MethodSpec]:
    """`fusionmamba:MODEL,gsa,mtf-glp-hpm` -> specs; `classical` expands to every classical method."""
    from fusion_cli.classical import METHODS

    specs: list[MethodSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item.lower() in {"classical", "all-classical"}:
            specs += [MethodSpec(name, method=name, implied=True) for name in METHODS]
        elif ":" in item:
            kind, _, ref = item.partition(":")
            if kind.lower() != "fusionmamba" or not ref:
                raise FusionError(f"network methods are written fusionmamba:MODEL_OR_WEIGHTS, got {item!r}")
            if Path(ref).suffix.lower() in {".pth", ".pt", ".safetensors", ".json"} or Path(ref).exists():
                if not Path(ref).is_file():
                    raise FusionError(f"weights file not found: {ref}")
                specs.append(MethodSpec(f"fusionmamba:{Path(ref).stem}", weights=ref))
            else:
                specs.append(MethodSpec(f"fusionmamba:{ref}", model=ref))
        elif item.lower() in METHODS:
            specs.append(MethodSpec(item.lower(), method=item.lower()))
        else:
            raise FusionError(
                f"unknown method {item!r}: use fusionmamba:MODEL or one of {', '.join(METHODS)} "
                "(or 'classical' for all of them)"
            )
    if not specs:
        raise FusionError("no methods given: e.g. --methods fusionmamba:wv3,gsa,mtf-glp-hpm")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise FusionError(f"a method is listed twice in {text!r}")
    return specs


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]  # one per (scene, method)
    summary: list[dict[str, Any]]  # one per method: mean (and std over scenes)
    files: dict[str, str] = field(default_factory=dict)


def _fuse(
    spec: MethodSpec,
    pan: Path,
    ms: Path,
    out: Path,
    sensor: str,
    device: str,
    tile: int,
    bands: list[int] | None,
    sensor_bands: list[int] | None = None,
    where: str = "",
) -> float:
    """Seconds fusing `pan` and `ms` into `out` with `spec`; the run's warnings are said as `where`'s."""
    from fusion_cli.pipeline import hisr, pansharpen

    t0 = time.perf_counter()
    kwargs = dict(
        model=spec.model, weights=spec.weights, method=spec.method, sensor=sensor,
        device=device, overwrite=True, measure_shift=False, tile=tile, bands=bands,
        # a classical method's MTF gains; a network's card names its bands
        sensor_bands=sensor_bands if spec.method is not None else None,
    )  # fmt: skip
    # HISR: the classical methods take the MSI as a multi-band "PAN" there
    summary = hisr(ms, pan, out, **kwargs) if _is_msi(pan) else pansharpen(pan, ms, out, **kwargs)
    for message in summary.warnings:  # a zero collar fused as data (each said once per evaluation)
        if "--zero-nodata" in message or "--nodata" in message:  # options evaluate does not have
            message += "; evaluate takes the inputs' declared nodata (gdal_translate -a_nodata 0 IN OUT)"
        notify(f"{where}: {message}")
    return time.perf_counter() - t0


def _is_msi(path: str | Path) -> bool:
    """Whether the high-resolution input has several bands (an MSI: a HISR pair)."""
    from fusion_cli.pipeline.readers import band_count

    return band_count(path, "PAN") > 1


def evaluate_scene(
    pan: str | Path,
    ms: str | Path,
    methods: list[MethodSpec],
    work_dir: str | Path,
    sensor: str | None = None,
    ratio: int | None = None,
    pan_mtf: bool = False,
    cut: int = 0,
    clip_bits: int | None = None,
    full_resolution: bool = True,
    device: str = "auto",
    scene_id: str | None = None,
    tile: int = 512,
    bands: list[int] | None = None,
    block: int = 32,
    progress: Callable[[int, int], None] | None = None,
    sensor_bands: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Score every method on one PAN/MS pair; products are written under `work_dir`. `bands`: the
    1-based MS bands every method fuses, in the order a model expects (the references follow);
    `sensor_bands`: which of the sensor's bands the MS file's bands are (`sensors.sensor_band_numbers`);
    `block`: the Q2n / Q / QNR block size (the toolbox's 32; smaller for scenes under 32 px);
    `progress(done, total)` is called after each fusion."""
    from fusion_cli.assess import EvalOptions
    from fusion_cli.assess import evaluate as score_product
    from fusion_cli.wald import simulate_files

    # pan and ms stay as given: GDAL virtual paths (/vsizip/...) are strings that Path would fold
    work_dir = Path(work_dir)
    key = canonical_sensor(sensor)
    scene_id = scene_id or _stem(pan)
    # the reduced pair holds the `bands` only (a cube's dead NaN band left out is not read), in their
    # order: its fusions take all of it, with those bands' sensor numbers for the MTF gains
    sim = simulate_files(
        pan,
        ms,
        work_dir / "reduced",
        sensor=key,
        ratio=ratio,
        pan_mtf=pan_mtf,
        overwrite=True,
        sensor_bands=sensor_bands,
        bands=bands,
    )
    reduced_sensor_bands = sim.sensor_bands
    opts = EvalOptions(
        ratio=sim.ratio, cut=cut, clip_bits=clip_bits, sensor=key, bands=bands, block=block,
        sensor_bands=sensor_bands,
        round_uint16=None,  # as fusion metrics: when the reference holds whole-number DN
    )  # fmt: skip
    reduced_opts = replace(opts, bands=None, sensor_bands=reduced_sensor_bands)
    rows = []
    refused: FusionError | None = None
    # the no-reference indices need a single-band PAN: a HISR pair (an MSI) is scored at reduced
    # resolution only, with PSNR beside the table's indices
    hisr = _is_msi(pan)
    full_resolution = full_resolution and not hisr
    reduced_keys = (*evaluate_keys("reduced"), *(HISR_KEYS if hisr else ()))
    per = 2 if full_resolution else 1  # fusions per method
    total = per * len(methods)
    for i, spec in enumerate(methods):
        row: dict[str, Any] = {"scene": scene_id, "method": spec.label}
        safe = spec.label.replace(":", "_").replace("/", "_")
        out = work_dir / "reduced" / f"{safe}.tif"
        try:
            row["time_rr_s"] = _fuse(
                spec, sim.pan, sim.ms, out, key, device, tile, None, reduced_sensor_bands,
                f"{scene_id} at reduced resolution",
            )  # fmt: skip
        except NegativeDN as exc:
            if not spec.implied:  # named by the user: the run fails, as pansharpen would
                raise
            # signed DN: the ratio methods refuse what the additive ones fuse; the table goes on
            notify(f"{spec.label} left out of {scene_id}: {exc}")
            refused = refused or exc
            continue
        rr = score_product(out, ref=sim.ref, opts=reduced_opts)
        if progress is not None:
            progress(per * i + 1, total)
        row["Q2n_name"] = rr.get("q2n_name", "Q2n")
        row.update({k: float(rr[k]) for k in reduced_keys})
        if full_resolution:
            out = work_dir / "full" / f"{safe}.tif"
            out.parent.mkdir(parents=True, exist_ok=True)
            row["time_fr_s"] = _fuse(
                spec, pan, ms, out, key, device, tile, bands, sensor_bands, f"{scene_id} at full resolution"
            )
            fr = score_product(out, pan=pan, ms=ms, opts=opts)
            if progress is not None:
                progress(per * i + 2, total)
            row.update({k: float(fr[k]) for k in evaluate_keys("full")})
        rows.append(row)
    if not rows and refused is not None:
        raise refused
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over scenes per method, in first-seen method order."""
    order: list[str] = []
    for r in rows:
        if r["method"] not in order:
            order.append(r["method"])
    out = []
    for m in order:
        mine = [r for r in rows if r["method"] == m]
        s: dict[str, Any] = {"method": m, "scenes": len(mine)}
        for k in (*_index_keys(), *TIME_KEYS):
            vals = [r[k] for r in mine if k in r and r[k] is not None and not math.isnan(r[k])]
            if vals:
                s[k] = float(np.mean(vals))
                s[f"{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
            if vals and len(vals) < len(mine):  # NaN on some scenes (a dead band): the mean is of the rest
                s[f"{k}_scenes"] = len(vals)
        out.append(s)
    return out


def _fmt(value: float, key: str) -> str:
    return f"{value:.2f}" if key in TIME_KEYS else f"{value:.4f}"


def table_cells(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table ("mean ± std" with several scenes; a method scored on
    fewer scenes than others says on how many)."""
    keys = [k for k in (*_index_keys(), *TIME_KEYS) if any(k in s for s in summary)]
    many = any(s["scenes"] > 1 for s in summary)
    most = max((s["scenes"] for s in summary), default=0)
    header = ["Method", *keys]
    cells = []
    for s in summary:
        # a method left out of some scenes is averaged over the others: said, or it may look best
        fewer = f" ({s['scenes']} of {most} scenes)" if s["scenes"] < most else ""
        line = [s["method"] + fewer]
        for k in keys:
            if k not in s:
                line.append("")
            else:
                cell = f"{_fmt(s[k], k)} ± {_fmt(s[k + '_std'], k)}" if many else _fmt(s[k], k)
                scored = s.get(f"{k}_scenes")
                line.append(cell if scored is None else f"{cell} ({scored} of {s['scenes']} scenes)")
        cells.append(line)
    return header, cells


def markdown(summary: list[dict[str, Any]], note: str = "") -> str:
    header, cells = table_cells(summary)
    plain = ("Method", *TIME_KEYS)
    arrows = [h if h in plain else h + (" ↑" if higher_is_better(h) else " ↓") for h in header]
    lines = ["| " + " | ".join(arrows) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def evaluate(
    scenes: list[tuple[Path, Path, str]],
    methods: list[MethodSpec],
    out_dir: str | Path,
    sensor: str | None = None,
    ratio: int | None = None,
    pan_mtf: bool = False,
    cut: int = 0,
    clip_bits: int | None = None,
    full_resolution: bool = True,
    device: str = "auto",
    keep_products: bool = True,
    tile: int = 512,
    bands: list[int] | None = None,
    block: int = 32,
    progress: Callable[[int, int], None] | None = None,
    sources: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    sensor_bands: list[int] | None = None,
) -> EvalResult:
    """Evaluate `methods` on `scenes` (pan, ms, id) and write `results.csv` (per scene),
    `summary.csv`, `results.json` and `results.md` into `out_dir`. `progress(done, total)` is
    called after each fusion (methods x scenes, twice with `full_resolution`). `sources`: files the
    scenes were listed from (a manifest), which the results must not replace, as the scenes' inputs.
    An earlier run's tables in `out_dir` are replaced only with `overwrite` (its products of methods
    not run again stay under OUT/products)."""
    out_dir = Path(out_dir)
    if not scenes:
        raise FusionError("no scenes to evaluate")
    files = result_files(out_dir)
    _check_results(files, [*sources, *(p for pan, ms, _ in scenes for p in (pan, ms))])
    earlier = [Path(p).name for p in files.values() if Path(p).exists()]
    if earlier and not overwrite:
        raise FusionError(
            f"{out_dir} holds an earlier evaluation ({', '.join(earlier)}); pass --overwrite to replace "
            "it, or choose another output folder"
        )
    if tile <= 0:
        raise FusionError(f"--tile must be positive, got {tile}")
    _check_scene_folders([sid for _, _, sid in scenes])
    for pan, ms, _ in scenes:  # with --ratio, one file given twice scored Q2n 0.99 at exit 0
        check_same_file(pan, ms)
    created = [d for d in (out_dir, out_dir / "products") if not d.exists()]  # emptied ones go on failure
    make_output_folder(out_dir, "-o")
    rows: list[dict[str, Any]] = []
    # Products not kept go to a hidden folder this run creates, and only that folder is removed: an
    # OUT/products that already exists (earlier results, the inputs themselves) is never deleted.
    products = (
        out_dir / "products" if keep_products else Path(tempfile.mkdtemp(prefix=".products-", dir=out_dir))
    )
    current: Path | None = None  # the folder of the scene being evaluated, when this run made it
    try:
        for k, (pan, ms, sid) in enumerate(scenes):
            # a scene's steps, offset by the scenes before it
            step = None if progress is None else (lambda d, n, k=k: progress(k * n + d, len(scenes) * n))
            folder = products / scene_folder(sid)
            current = None if folder.exists() else folder
            try:
                rows += evaluate_scene(
                    pan, ms, methods, folder, sensor=sensor, ratio=ratio, pan_mtf=pan_mtf,
                    cut=cut, clip_bits=clip_bits, full_resolution=full_resolution, device=device,
                    scene_id=sid, tile=tile, bands=bands, block=block, progress=step,
                    sensor_bands=sensor_bands,
                )  # fmt: skip
            except FusionError as exc:  # one scene of many: say which (it was not named)
                raise FusionError(f"scene {sid} ({pan}, {ms}): {exc}") from exc
            current = None
    except BaseException:
        # no half-evaluated scene is left: the folder this run made for the scene that failed goes;
        # finished scenes' products stay, and OUT (and OUT/products) only if this run made them and
        # nothing else is in them
        with deferred_signals():
            for scratch in (current, None if keep_products else products):
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise
    finally:
        if not keep_products:
            with deferred_signals():
                shutil.rmtree(products, ignore_errors=True)
    summary = summarise(rows)
    settings = {
        "sensor": canonical_sensor(sensor), "ratio": ratio,
        "pan_degradation": "mtf" if pan_mtf else "bicubic", "cut": cut, "clip_bits": clip_bits,
        "scenes": [s[2] for s in scenes], "bands": bands, "sensor_bands": sensor_bands, "block": block,
    }  # fmt: skip
    _write_csv(Path(files["results_csv"]), rows)
    _write_csv(Path(files["summary_csv"]), summary)
    _write_text(
        Path(files["json"]), jsonout.dumps({"settings": settings, "summary": summary, "rows": rows}, indent=2)
    )
    note = (
        f"Reduced resolution: Wald protocol (sensor {settings['sensor']}, "
        f"PAN {settings['pan_degradation']}), "
        f"border cut {cut}, clip {'none' if clip_bits is None else f'[0, 2^{clip_bits}]'}, "
        f"Q2n/Q/QNR blocks {block} px (Q2n rounds whole-number DN to uint16, not reflectance); "
        + (
            "full resolution: D_lambda^K/HQNR with the sensor MTF, HPC = high-pass correlation with "
            "the PAN (high-pass: minus the sensor-MTF low-pass). "
            if full_resolution
            else ""
        )
        + "Times: wall-clock seconds per fusion."
    )
    _write_text(Path(files["markdown"]), markdown(summary, note))
    return EvalResult(rows, summary, files)


def result_files(out_dir: Path) -> dict[str, str]:
    """The tables `evaluate` writes into `out_dir`, by key."""
    names = {
        "results_csv": "results.csv",
        "summary_csv": "summary.csv",
        "json": "results.json",
        "markdown": "results.md",
    }
    return {k: str(out_dir / n) for k, n in names.items()}


def _check_results(files: dict[str, str], inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Before any work: no result table may replace an input (a manifest kept in OUT, a scene's
    PAN or MS named like a table), nor be a folder."""
    from fusion_cli.raster import files_read, replaced_input

    read = files_read(inputs)
    for path in files.values():
        if Path(path).is_dir():
            raise FusionError(f"{path} is a folder; choose another output folder")
        hit = replaced_input(path, read)
        if hit is not None:
            raise FusionError(f"{path} would replace input {hit[0]}; choose another output folder")


def _check_scene_folders(ids: Sequence[str]) -> None:
    """Each scene keeps its products in its own folder: ids that map to one (`site/x` and `site:x`,
    or `A` and `a` on a case-insensitive disk) had the second scene's products replace the first's."""
    seen: dict[str, int] = {}
    for i, sid in enumerate(ids):
        first = seen.setdefault(scene_folder(sid).casefold(), i)
        if first != i:
            raise FusionError(
                f"scenes {ids[first]!r} and {sid!r} would keep their products in one folder "
                f"(products/{scene_folder(sid)}); give them ids that differ in letters or digits (a "
                "manifest's id column)"
            )


def scene_folder(scene_id: str) -> str:
    """A scene id as one folder name under OUT/products: ids come from manifests and may hold path
    separators, '..' or an absolute path, which must never lead a write outside OUT."""
    name = re.sub(r"[\\/:]+", "_", scene_id).strip()
    return name if name and not name.startswith(".") else "scene_" + name.lstrip(".")


def _write_text(path: Path, text: str) -> None:
    """Results replace the previous ones whole, or not at all (a full disk leaves no half file)."""
    with atomic_output(path, overwrite=True, what="evaluation result") as tmp:
        tmp.write_text(text)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with (
        atomic_output(path, overwrite=True, what="evaluation result") as tmp,
        tmp.open("w", newline="") as fh,
    ):
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)


def _stem(path: str | Path) -> str:
    return Path(os.path.basename(os.fspath(path))).stem


def find_scenes(paths: list[str | Path]) -> list[tuple[Path | str, Path | str, str]]:
    """Scenes from `PAN MS` (two rasters: files or GDAL virtual paths such as /vsizip/a.zip/pan.tif),
    a folder (paired by the batch naming conventions) or a CSV manifest (`pan,ms[,out][,id]`, whose
    paths may be GDAL paths too). A GDAL path is a raster, never a folder to list."""
    from fusion_cli.batch import pair_by_patterns, read_manifest
    from fusion_cli.raster import is_gdal_path

    given = [os.fspath(p) if is_gdal_path(p) else Path(p) for p in paths]
    rasters = [isinstance(p, str) or (p.is_file() and p.suffix.lower() != ".csv") for p in given]
    if len(given) == 2 and all(rasters):
        return [(given[0], given[1], _stem(given[0]))]
    if any(isinstance(p, str) for p in given):
        raise FusionError(
            "GDAL virtual paths are rasters: give PAN MS (two of them), or list them in a CSV manifest "
            "(pan,ms[,id]); a folder inside an archive or bucket is not listed"
        )
    paths = [Path(p) for p in given]
    if len(paths) == 1 and paths[0].is_dir():
        plan = pair_by_patterns(paths[0], paths[0], check_outputs=False)  # scenes only: no batch outputs
    elif len(paths) == 1 and paths[0].suffix.lower() == ".csv":
        plan = read_manifest(paths[0], paths[0].parent, paths[0].parent, check_outputs=False)
    else:
        raise FusionError("give PAN MS (two files), a folder of pairs, or a CSV manifest (pan,ms[,id])")
    if not plan.scenes:
        raise FusionError(f"no PAN/MS pairs found in {paths[0]}")
    return [(s.pan, s.ms, s.id) for s in plan.scenes]
