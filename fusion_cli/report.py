"""Evaluation reports over many products: `metrics.csv`, `metrics.json` and a static `index.html`
(quicklooks, zoom crops, error and SAM maps, per-band charts) that opens in a browser without a server.

Which product is judged against what (`collect_items`), in order of precedence:

1. a manifest CSV with a `product` column and either `ref` or `pan` + `ms` columns (optional `label`);
   relative paths are taken from the manifest's folder;
2. `--ref GT` (reduced resolution, every product against the same reference: e.g. several methods on
   one scene) or `--pan P --ms M` (full resolution, same inputs for all);
3. the product's own `FUSION_PAN` / `FUSION_MS` tags, which `fusion` writes (full resolution).
"""

from __future__ import annotations

import contextlib
import csv
import html
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fusion_cli import jsonout
from fusion_cli.assess import Case, EvalOptions, flatten, load_case, score, with_product_bands, write_csv
from fusion_cli.errors import FusionError, is_out_of_memory
from fusion_cli.metrics.table import higher_is_better, index_order
from fusion_cli.quicklook import raster_display_bands, stretch_limits, stretch_rgb
from fusion_cli.raster import atomic_output, gdal_env, is_gdal_path, open_raster, source_files
from fusion_cli.raster.nodata import alpha_band
from fusion_cli.signals import deferred_signals

RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".jp2"}


# A raster: a local file, or a GDAL virtual path (/vsizip/..., s3://...) kept as the string given
# (a Path would fold the `//` such paths need).
Source = Path | str


def as_source(path: str | os.PathLike[str]) -> Source:
    """`path` as a report input: a GDAL virtual path stays a string, anything else is a Path."""
    return os.fspath(path) if is_gdal_path(path) else Path(path)


def _local_key(path: Source) -> Path | str:
    """What identifies an input for "is it one of the inputs" checks: local files resolved."""
    return path.resolve() if isinstance(path, Path) else path


@dataclass
class ReportItem:
    """One product and what it is judged against (None: taken from the product's tags)."""

    product: Source
    ref: Source | None = None
    pan: Source | None = None
    ms: Source | None = None
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or Path(os.path.basename(os.fspath(self.product))).stem


def _rasters_in(folder: Path) -> list[Path]:
    """The folder's rasters; hidden names are left out (a killed run's temporaries, `.NAME.partial-*`)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES and not p.name.startswith(".")
    )


def read_manifest(path: str | Path) -> list[ReportItem]:
    """Items from a CSV with columns `product` and `ref`, or `pan` and `ms` (and optionally `label`)."""
    p = Path(path)
    if not p.is_file():
        raise FusionError(f"manifest not found: {p}")
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise FusionError(f"manifest {p} is not a readable CSV: {exc}") from None
    if not rows or "product" not in rows[0]:
        raise FusionError(f"manifest {p} needs a header with a 'product' column and 'ref' or 'pan','ms'")

    def resolve(v: str | None) -> Source | None:
        if not v or not v.strip():
            return None
        return v.strip() if is_gdal_path(v.strip()) else p.parent / v.strip()

    items = []
    for i, row in enumerate(rows, start=2):
        prod = resolve(row.get("product"))
        if prod is None:
            raise FusionError(f"manifest {p} line {i}: empty product")
        items.append(
            ReportItem(
                prod,
                resolve(row.get("ref")),
                resolve(row.get("pan")),
                resolve(row.get("ms")),
                row.get("label") or "",
            )
        )
    return items


def _tags(path: Source) -> dict[str, str]:
    """A raster's dataset tags ({} when it cannot be read: its own error is reported when scored)."""
    try:
        with gdal_env(), open_raster(path, "product") as ds:
            return dict(ds.tags())
    except (FusionError, OSError):
        return {}


def _tagged_inputs(item: ReportItem, tags: dict[str, str] | None = None) -> list[str]:
    """The PAN and MS a product's tags name, where the item gives none (`assess.load_case` reads them)."""
    if item.pan is not None and item.ms is not None:
        return []
    tags = _tags(item.product) if tags is None else tags
    return [tags[k] for k in ("FUSION_PAN", "FUSION_MS") if tags.get(k)]


def collect_items(
    inputs: list[str | Path],
    ref: str | Path | None = None,
    pan: str | Path | None = None,
    ms: str | Path | None = None,
    manifest: Path | None = None,
) -> list[ReportItem]:
    """Products to evaluate: files given, rasters of folders given (not recursive), or a manifest.
    GDAL virtual paths (/vsizip/..., /vsicurl/...) are taken as raster files: GDAL opens them, but
    they are not listed as folders."""
    if manifest is not None:
        if inputs or ref or pan or ms:
            raise FusionError("a manifest says everything: do not also give products, --ref, --pan or --ms")
        items = read_manifest(manifest)
    else:
        ref_, pan_, ms_ = (None if v is None else as_source(v) for v in (ref, pan, ms))
        if (pan_ is None) != (ms_ is None):  # every product failed with it, at exit 1
            raise FusionError("give --pan and --ms together (full-resolution indices need both)")
        for flag, source in (("--ref", ref_), ("--pan", pan_), ("--ms", ms_)):
            if isinstance(source, Path) and not source.is_file():  # GDAL paths: told when read
                raise FusionError(f"{flag} {source}: file not found")
        inputs_used = {_local_key(p) for p in (ref_, pan_, ms_) if p is not None}
        found: list[tuple[Source, bool]] = []  # (raster, listed from a folder)
        for given in inputs:
            p = as_source(given)
            if isinstance(p, str):
                found.append((p, False))  # GDAL says whether it exists when the product is read
            elif p.is_dir():
                found += [(f, True) for f in _rasters_in(p)]
            elif p.is_file():
                found.append((p, False))
            else:
                raise FusionError(f"not a file or folder: {p}")
        # a folder's PAN and MS beside the product made of them (the README's layout) were scored as
        # products and failed, exit 1: what a folder's products name as their inputs is left out,
        # unless it is a product itself (a reduced product fused again at full resolution)
        tags = {p: _tags(p) for p, _ in found}
        named = {_local_key(as_source(t)) for p, _ in found for t in _tagged_inputs(ReportItem(p), tags[p])}
        products = [
            p
            for p, listed in found
            if not (listed and _local_key(p) in named and "FUSION_PARAMS" not in tags[p])
        ]
        products = [p for p in products if _local_key(p) not in inputs_used]
        items = [ReportItem(p, ref_, pan_, ms_) for p in products]
    if not items:
        raise FusionError("no products to evaluate: give raster files, a folder of them, or --manifest")
    return items


# --- figures ---------------------------------------------------------------------------------------


def _step(shape: tuple[int, ...], max_side: int) -> int:
    return max(1, math.ceil(max(shape[-2:]) / max_side))


def _zoom_window(h: int, w: int, side: int) -> tuple[slice, slice]:
    """A centred square of `side` pixels (the whole image if smaller)."""
    sh, sw = min(side, h), min(side, w)
    r0, c0 = (h - sh) // 2, (w - sw) // 2
    return slice(r0, r0 + sh), slice(c0, c0 + sw)


def _save_rgb(path: Path, img: np.ndarray, rgb: tuple[int, int, int], mask: np.ndarray, limits) -> str:
    from matplotlib.image import imsave

    imsave(path, stretch_rgb(img, rgb, mask=mask, limits=limits))
    return path.name


def _save_map(path: Path, data: np.ndarray, title: str, cmap: str, unit: str) -> str:
    from matplotlib.figure import Figure  # a figure of its own: the process's backend is left alone

    finite = data[np.isfinite(data)]
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    h, w = data.shape
    fig = Figure(figsize=(5.0, 5.0 * h / max(w, 1) + 0.4), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(data, cmap=cmap, vmin=0, vmax=max(vmax, 1e-12), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=unit)
    fig.tight_layout()
    fig.savefig(path)
    return path.name


# Up to this many bands a chart shows one bar (and tick) per band; a hyperspectral cube's are lines:
# 128 bars made a 7260-px-wide chart, shown 360 px wide
BARS_UP_TO = 24


def _band_axis(ax: Any, n: int) -> None:
    """Label the x axis of a per-band chart: every band number up to BARS_UP_TO, else a few."""
    ax.set_xlabel("band", fontsize=8)
    if n <= BARS_UP_TO:
        ax.set_xticks(np.arange(1, n + 1))
    ax.tick_params(labelsize=7)


def _save_bars(path: Path, series: dict[str, list[float]], title: str) -> str:
    from matplotlib.figure import Figure  # a figure of its own: the process's backend is left alone

    fig = Figure(figsize=(3.6 * len(series), 2.8), dpi=110)
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items(), strict=True):
        x = np.arange(1, len(values) + 1)
        if len(values) <= BARS_UP_TO:
            ax.bar(x, values, color="#4477aa")
        else:
            ax.plot(x, values, color="#4477aa", linewidth=1)
        ax.set_title(name, fontsize=9)
        _band_axis(ax, len(values))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path.name


def _save_grouped(path: Path, a: np.ndarray, b: np.ndarray, labels: tuple[str, str], title: str) -> str:
    from matplotlib.figure import Figure  # a figure of its own: the process's backend is left alone

    many = len(a) > BARS_UP_TO
    fig = Figure(figsize=(8.0 if many else max(4.0, 0.5 * len(a) + 2), 2.8), dpi=110)
    ax = fig.subplots()
    x = np.arange(1, len(a) + 1)
    if many:
        ax.plot(x, a, label=labels[0], color="#999999", linewidth=1)
        ax.plot(x, b, label=labels[1], color="#4477aa", linewidth=1)
    else:
        ax.bar(x - 0.2, a, 0.4, label=labels[0], color="#999999")
        ax.bar(x + 0.2, b, 0.4, label=labels[1], color="#4477aa")
    _band_axis(ax, len(a))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path.name


def _figures(
    case: Case, result: dict[str, Any], img_dir: Path, stem: str, rgb: tuple[int, int, int] | None, opts: dict
) -> list[tuple[str, str]]:
    """Write the PNGs of one product; returns `(file name, caption)` pairs in display order."""
    from fusion_cli.metrics import sam_map

    f = case.fused
    rgb = rgb or raster_display_bands(f.path)  # a given rgb was checked before scoring
    step = _step(f.data.shape, opts["max_side"])
    zr, zc = _zoom_window(*f.data.shape[1:], opts["zoom"])
    sub = (slice(None), slice(None, None, step), slice(None, None, step))
    out: list[tuple[str, str]] = []

    def rgb_pair(other: np.ndarray, other_valid: np.ndarray, other_name: str, tag: str) -> None:
        # the product is shown with the stretch of what it is compared to, so colours compare
        limits = stretch_limits(other[list(rgb)][sub], mask=other_valid[sub[1:]])
        out.append(
            (
                _save_rgb(img_dir / f"{stem}_{tag}.png", other[sub], rgb, other_valid[sub[1:]], limits),
                other_name,
            )
        )
        out.append(
            (
                _save_rgb(img_dir / f"{stem}_product.png", f.data[sub], rgb, f.valid[sub[1:]], limits),
                "product",
            )
        )
        z = (slice(None), zr, zc)
        out.append(
            (
                _save_rgb(img_dir / f"{stem}_{tag}_zoom.png", other[z], rgb, other_valid[zr, zc], limits),
                f"{other_name}, zoom",
            )
        )
        out.append(
            (
                _save_rgb(img_dir / f"{stem}_product_zoom.png", f.data[z], rgb, f.valid[zr, zc], limits),
                "product, zoom",
            )
        )

    if case.ref is not None:
        r = case.ref
        valid = f.valid & r.valid
        rgb_pair(r.data, r.valid, "reference", "ref")
        err = np.sqrt(
            np.mean(
                [
                    (r.data[b][sub[1:]].astype(np.float64) - f.data[b][sub[1:]]) ** 2
                    for b in range(r.data.shape[0])
                ],
                axis=0,
            )
        )
        err[~valid[sub[1:]]] = np.nan
        out.append(
            (
                _save_map(img_dir / f"{stem}_error.png", err, "RMS error over bands", "magma", "DN"),
                "error map",
            )
        )
        angles = sam_map(r.data[sub], f.data[sub], valid[sub[1:]])
        out.append(
            (
                _save_map(img_dir / f"{stem}_sam.png", angles, "spectral angle", "viridis", "degrees"),
                "SAM map",
            )
        )
        pb = result.get("per_band", {})
        series = {k: pb[k] for k in ("Q", "ERGAS", "PSNR", "SCC") if k in pb}
        if series:
            out.append((_save_bars(img_dir / f"{stem}_bands.png", series, "per band"), "per-band indices"))
        return out
    assert case.pan is not None and case.ms is not None
    ratio = int(result["ratio"])
    h, w = ratio * case.ms.data.shape[1], ratio * case.ms.data.shape[2]
    ms_near = np.repeat(np.repeat(case.ms.data, ratio, axis=1), ratio, axis=2)  # display only
    ms_valid = np.repeat(np.repeat(case.ms.valid, ratio, axis=0), ratio, axis=1)
    pan = case.pan.data[:, :h, :w]
    out.append(
        (
            _save_rgb(
                img_dir / f"{stem}_pan.png", pan[sub], (0, 0, 0), case.pan.valid[:h, :w][sub[1:]], None
            ),
            "PAN",
        )
    )
    out.append(
        (
            _save_rgb(
                img_dir / f"{stem}_pan_zoom.png", pan[:, zr, zc], (0, 0, 0), case.pan.valid[zr, zc], None
            ),
            "PAN, zoom",
        )
    )
    if ms_near.shape[0] == f.data.shape[0]:
        fused = f.data[:, :h, :w]
        rgb_pair(ms_near, ms_valid, "MS (pixel replication)", "ms")
        valid = f.valid[:h, :w] & ms_valid
        angles = sam_map(ms_near[sub], fused[sub], valid[sub[1:]])
        out.append(
            (
                _save_map(
                    img_dir / f"{stem}_sam.png", angles, "spectral angle to the MS", "viridis", "degrees"
                ),
                "SAM map vs MS",
            )
        )
        means = [
            np.array([float(img[b][v].mean()) if v.any() else np.nan for b in range(img.shape[0])])
            for img, v in ((ms_near, valid), (fused, valid))
        ]
        out.append(
            (
                _save_grouped(img_dir / f"{stem}_bands.png", *means, ("MS", "product"), "band means (DN)"),
                "per-band means",
            )
        )
    ds = result.get("per_band", {}).get("D_s")
    if ds:
        out.append(
            (
                _save_bars(img_dir / f"{stem}_ds.png", {"D_s": ds}, "spatial distortion per band"),
                "per-band D_s",
            )
        )
    return out


# --- HTML ------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:0.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
.best{font-weight:bold;background:#e6f2e6}
.err{color:#a00}
figure{display:inline-block;margin:6px;vertical-align:top}
figure img{max-width:360px;max-height:360px;border:1px solid #ddd;image-rendering:pixelated}
figcaption{font-size:0.8em;color:#555;text-align:center}
section{margin-top:2em;border-top:1px solid #ddd}
.small{font-size:0.8em;color:#666}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else ("" if math.isnan(v) else f"{v:.4f}")
    return html.escape(str(v))


def _compared(r: dict[str, Any]) -> tuple[Any, ...]:
    """What a result was scored against: only products scored against the same data, on the same
    bands, are ranked together (a 4-band product's Q4 was bolded as the best of 8-band products'
    Q8, products of other scenes ranked against each other)."""

    def where(path: str | None) -> str | None:  # one file however it was named (tag, manifest, CLI)
        return path if path is None or is_gdal_path(path) else os.path.realpath(path)

    against = where(r.get("reference")) or (where(r.get("pan")), where(r.get("ms")))
    return r.get("mode"), against, r.get("bands"), tuple(r.get("bands_compared") or ())


def _summary_table(results: list[dict[str, Any]], anchors: list[str]) -> str:
    cols = [k for k in index_order() if any(k in r for r in results)]
    best: dict[tuple[Any, ...], float] = {}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault(_compared(r), []).append(r)
    for group, members in groups.items():
        for k in cols:
            vals = [r[k] for r in members if isinstance(r.get(k), float) and math.isfinite(r[k])]
            if len(vals) > 1:
                best[(*group, k)] = max(vals) if higher_is_better(k) else min(vals)
    q2n_names = {r["q2n_name"] for r in results if "q2n_name" in r}
    names = {"Q2n": q2n_names.pop() if len(q2n_names) == 1 else "Q2n"}
    head = "".join(f"<th>{html.escape(names.get(k, k))}</th>" for k in cols)
    rows = []
    for r, a in zip(results, anchors, strict=True):
        link = f'<a href="#{a}">{html.escape(r["name"])}</a>'
        if "error" in r:
            err = html.escape(r["error"])
            rows.append(f'<tr><td>{link}</td><td class="err" colspan="{len(cols) + 2}">{err}</td></tr>')
            continue
        cells = []
        for k in cols:
            value = _fmt(r.get(k, ""))
            if k == "Q2n" and names["Q2n"] == "Q2n" and "q2n_name" in r:
                value += f" ({html.escape(r['q2n_name'])})"
            mark = "best" if r.get(k) == best.get((*_compared(r), k)) else ""
            cells.append(f'<td class="{mark}">{value}</td>')
        mode, bands = html.escape(r["mode"]), r.get("bands", "")
        rows.append(f"<tr><td>{link}</td><td>{mode}</td><td>{bands}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>product</th><th>mode</th><th>bands</th>{head}</tr>{''.join(rows)}</table>"


def _evaluate_items(
    items: Sequence[Any],
    opts: EvalOptions,
    img_dir: Path,
    rgb: tuple[int, int, int] | None,
    fig_opts: dict[str, Any],
    progress: Any,
) -> tuple[list[dict[str, Any]], list[list[tuple[str, str]]]]:
    """Each item's indices and figures (written to `img_dir`); a product that cannot be evaluated
    gets its one-line error instead."""
    results: list[dict[str, Any]] = []
    figs: list[list[tuple[str, str]]] = []
    for i, item in enumerate(items):
        if progress is not None:
            progress(i, len(items), item.name)
        stem = f"{i:03d}_{''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in item.name)[:60]}"
        try:
            case = load_case(item.product, item.ref, item.pan, item.ms, opts.nodata, opts.ratio, opts.block)
            result = score(case, opts)
            result["name"] = item.name
            shown = _figures(with_product_bands(case, opts.bands), result, img_dir, stem, rgb, fig_opts)
            results.append(result)  # after the figures: one entry per item, whichever step fails
            figs.append(shown)
        except (FusionError, MemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not is_out_of_memory(exc):
                raise
            error = str(exc)
            if not isinstance(exc, FusionError):  # the indices read the images whole
                error = f"out of memory ({exc}); score a crop of it"
            results.append({"name": item.name, "product": str(item.product), "error": error})
            figs.append([])
    if progress is not None:
        progress(len(items), len(items), "report")  # done: a caller's bar reaches its end
    return results, figs


def _write_html(
    path: Path, results: list[dict[str, Any]], figs: list[list[tuple[str, str]]], opts: EvalOptions
) -> None:
    from fusion_cli import __version__

    anchors = [f"p{i}" for i in range(len(results))]
    rounding = {None: "uint16 rounding of whole-number DN", True: "uint16 rounding", False: "no rounding"}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fusion report</title>",
        f"<style>{_CSS}</style></head><body><h1>Fusion quality report</h1>",
        f"<p class='small'>fusion-cli {html.escape(__version__)}, "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Settings: "
        f"{html.escape(json.dumps(opts.to_dict()))}. Toolbox conventions (Vivone et al.): Q2n on "
        f"{opts.block}x{opts.block} blocks with {rounding[opts.round_uint16]}, SAM in degrees, ERGAS with "
        "100/ratio; HQNR is what DLPan tables call QNR. Best value per column in bold, among products "
        "scored against the same data on the same bands. "
        "Data: <a href='metrics.csv'>metrics.csv</a>, "
        "<a href='metrics.json'>metrics.json</a>.</p>",
        _summary_table(results, anchors),
    ]
    for r, a, fs in zip(results, anchors, figs, strict=True):
        against = r.get("reference") or (f"PAN {r.get('pan')} + MS {r.get('ms')}" if "pan" in r else "")
        parts.append(f"<section id='{a}'><h2>{html.escape(r['name'])}</h2>")
        parts.append(
            f"<p class='small'>{html.escape(r['product'])}<br>against {html.escape(str(against))}</p>"
        )
        if "error" in r:
            parts.append(f"<p class='err'>{html.escape(r['error'])}</p>")
        for name, caption in fs:
            src, cap = html.escape(name), html.escape(caption)
            parts.append(f"<figure><img src='img/{src}' alt='{cap}'><figcaption>{cap}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    with atomic_output(path, overwrite=True, what="report") as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")


def _figures_of(html_path: Path) -> list[str]:
    """The img/ files a report's index.html shows (none when there is no report)."""
    try:
        text = html_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [n for n in re.findall(r"src='img/([^'/]+)'", text) if not n.startswith(".")]


def _check_display_bands(items: Sequence[ReportItem], rgb: tuple[int, int, int]) -> None:
    """Refuse display bands that a product lacks before scoring anything (it was told per product,
    after all the scoring)."""
    for item in items:
        try:
            with gdal_env(), open_raster(item.product, "product") as ds:
                count = ds.count - (alpha_band(ds) is not None)  # an alpha band masks, it is not shown
        except (FusionError, OSError):
            continue  # the product's own error is reported when it is scored
        if max(rgb) >= count:
            asked = ",".join(str(b + 1) for b in rgb)
            raise FusionError(
                f"--rgb {asked} asks for band {max(rgb) + 1}, but {item.name} has {count}; choose display "
                f"bands within 1..{count}"
            )


def build_report(
    items: list[ReportItem],
    out_dir: str | Path,
    opts: EvalOptions | None = None,
    rgb: tuple[int, int, int] | None = None,
    zoom: int = 256,
    max_side: int = 1024,
    progress=None,
    overwrite: bool = False,
    sources: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Evaluate every item and write `metrics.csv`, `metrics.json`, `index.html` and `img/*.png`.
    The report folder may hold none of the inputs: the items' files, those a product's tags name
    (read when an item gives no PAN/MS) and `sources` (the manifest the items came from).

    A product that cannot be evaluated gets its one-line error in the report instead of stopping it.
    `rgb` are 0-based display bands (default: those each product names red, green and blue, or their
    wavelengths, `quicklook.raster_display_bands`), `zoom` the crop side (PAN px),
    `max_side` the largest side of the overview PNGs. `progress(i, n, name)` is called before product
    i, and `progress(n, n, "report")` when all are scored.
    Returns `{"products", "failed", "errors" (name and error of each failed product), "csv", "json",
    "html"}`.
    """
    opts = replace(opts or EvalOptions(), per_band=True)
    out = Path(out_dir)
    html_path, csv_path, json_path = out / "index.html", out / "metrics.csv", out / "metrics.json"
    if rgb is not None:
        _check_display_bands(items, rgb)
    given = [p for it in items for p in (it.product, it.ref, it.pan, it.ms) if p is not None]
    read = given + [p for it in items for p in _tagged_inputs(it)]
    local = {Path(f).resolve() for p in [*read, *sources] for f in source_files(p)}
    if out.resolve() in local or any(out.resolve() in f.parents for f in local):
        raise FusionError(f"the report folder {out} holds inputs: choose an empty folder")
    for path in (html_path, csv_path, json_path):  # a report is replaced whole or not at all
        if path.is_dir():
            raise FusionError(f"{path} is a folder; give the report a folder without it")
        if (path.exists() or path.is_symlink()) and not overwrite:
            # a metrics.csv kept there by `fusion metrics --csv` was replaced without --overwrite
            raise FusionError(
                f"{path} already exists; pass --overwrite to replace it, or choose another folder"
            )
    img_dir = out / "img"
    # (--overwrite): the old report's figures go, those its index.html shows (not a user's 2024_map.png)
    old_figures = _figures_of(html_path)
    # folders this run makes: removed again (when empty) if it stops before the report is written
    made = [d for d in (img_dir, *img_dir.parents) if not d.exists()][::-1]
    img_dir.mkdir(parents=True, exist_ok=True)
    # The figures are made in a staging folder and the report is swapped in at the end, with Ctrl-C
    # held: an interrupted --overwrite had already deleted the old report's figures.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=img_dir))
    try:
        results, figs = _evaluate_items(
            items, opts, staging, rgb, {"zoom": zoom, "max_side": max_side}, progress
        )
        # every file is written in the staging folder first: a failed write (a full disk) leaves the
        # old report whole; only renames follow, with Ctrl-C held
        write_csv(
            [
                {"name": r["name"], **flatten(r), **({"error": r["error"]} if "error" in r else {})}
                for r in results
            ],
            staging / csv_path.name,
        )
        with atomic_output(staging / json_path.name, what="report") as tmp:
            tmp.write_text(jsonout.dumps(results, indent=2), encoding="utf-8")
        _write_html(staging / html_path.name, results, figs, opts)
        documents = [staging / p.name for p in (csv_path, json_path, html_path)]
        with deferred_signals():
            for name in old_figures:  # the old report's, as its index.html names them: a user's stay
                with contextlib.suppress(OSError):
                    (img_dir / name).unlink()
            for fig in staging.iterdir():
                if fig not in documents:
                    os.replace(fig, img_dir / fig.name)
            for doc in documents:  # the HTML last: it is what says a report is there
                os.replace(doc, out / doc.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not html_path.exists():
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty
    return {
        "products": len(results),
        "failed": sum("error" in r for r in results),
        "errors": [{"name": r["name"], "error": r["error"]} for r in results if "error" in r],
        "csv": str(csv_path),
        "json": str(json_path),
        "html": str(html_path),
    }
