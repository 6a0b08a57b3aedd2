"""`fusion evaluate`: method parsing, scene discovery and a real reduced + full resolution run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import EXAMPLE_MS, EXAMPLE_PAN, need_shared, write_example_ms_with_hole

from fusion_cli.cli.main import main
from fusion_cli.errors import FusionError
from fusion_cli.evaluate import (
    MethodSpec,
    evaluate,
    find_scenes,
    markdown,
    parse_methods,
    summarise,
    table_cells,
)


def test_parse_methods(tmp_path: Path) -> None:
    assert parse_methods("gsa, MTF-GLP-HPM") == [
        MethodSpec("gsa", method="gsa"),
        MethodSpec("mtf-glp-hpm", method="mtf-glp-hpm"),
    ]
    assert [s.label for s in parse_methods("classical")][:2] == ["exp", "brovey"]
    weights = tmp_path / "420.pth"
    weights.write_bytes(b"")
    spec = parse_methods(f"fusionmamba:{weights},exp")[0]
    assert spec.weights == str(weights) and spec.label == "fusionmamba:420"
    assert parse_methods("fusionmamba:wv3")[0].model == "wv3"
    for bad, msg in (
        ("gsa,gsa", "twice"),
        ("ihs", "unknown method"),
        ("", "no methods"),
        ("mamba:x", "fusionmamba"),
    ):
        with pytest.raises(FusionError, match=msg):
            parse_methods(bad)
    with pytest.raises(FusionError, match="not found"):
        parse_methods("fusionmamba:/nonexistent/w.pth")


def test_summary_mean_and_std() -> None:
    rows = [
        {"scene": "a", "method": "gsa", "SAM": 2.0, "ERGAS": 1.0},
        {"scene": "b", "method": "gsa", "SAM": 4.0, "ERGAS": 3.0},
        {"scene": "a", "method": "exp", "SAM": 5.0, "ERGAS": 4.0},
    ]
    s = summarise(rows)
    assert [r["method"] for r in s] == ["gsa", "exp"]
    assert s[0]["SAM"] == 3.0 and s[0]["SAM_std"] == pytest.approx(2**0.5) and s[0]["scenes"] == 2
    assert s[1]["SAM_std"] == 0.0
    # exp, scored on one scene of two (left out of the other), must not pass for the best of both
    _, cells = table_cells(s)
    assert [c[0] for c in cells] == ["gsa", "exp (1 of 2 scenes)"]
    assert "exp (1 of 2 scenes)" in markdown(s)
    # an index that is NaN on a scene (a dead band) is averaged over the others, and says so
    rows[1]["ERGAS"] = float("nan")
    s = summarise(rows)
    header, cells = table_cells(s)
    assert cells[0][header.index("ERGAS")] == "1.0000 ± 0.0000 (1 of 2 scenes)"
    assert cells[0][header.index("SAM")] == "3.0000 ± 1.4142"


# (PAN, MS, sensor, --clip-bits): WorldView-2 pair 1 of ../shared (11-bit DN), or a 96 x 192 MS px
# corner of the in-repository Landsat-8 example (16-bit L1 DN)
PAIRS = {
    "wv2": (("wv2_spacenet6", "pan_1.tif"), ("wv2_spacenet6", "ms_1.tif"), "wv2", 11),
    "landsat8-example": (None, None, "landsat8", 16),
}


@pytest.fixture(scope="module")
def example_corner(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The example's top-left 96 x 192 MS pixels and the PAN over them, georeferenced as cropped."""
    import rasterio
    from rasterio.windows import Window

    d = tmp_path_factory.mktemp("example_corner")
    out = []
    for src, win in ((EXAMPLE_PAN, Window(0, 0, 384, 192)), (EXAMPLE_MS, Window(0, 0, 192, 96))):
        with rasterio.open(src) as ds:
            data, profile = ds.read(window=win), ds.profile
            profile.update(width=win.width, height=win.height, transform=ds.window_transform(win))
        out.append(d / f"l8_{src.stem.split('_')[-1]}.tif")
        with rasterio.open(out[-1], "w", **profile) as dst:
            dst.write(data)
    return out[0], out[1]


def _pair(source: str, request: pytest.FixtureRequest, whole: bool = False) -> tuple[Path, Path, str, int]:
    """The pair of `source`; for the example its corner, or with `whole` the whole scene."""
    pan, ms, sensor, bits = PAIRS[source]
    if source == "wv2":
        pan, ms = need_shared(*pan), need_shared(*ms)
    elif whole:
        pan, ms = EXAMPLE_PAN, EXAMPLE_MS
    else:
        pan, ms = request.getfixturevalue("example_corner")
    return pan, ms, sensor, bits


@pytest.mark.parametrize("source", PAIRS)
def test_evaluate_real_pair(tmp_path: Path, source: str, request: pytest.FixtureRequest) -> None:
    # the whole example: on its corner interpolation happens to have a lower D_s than MTF-GLP-FS
    pan, ms, sensor, bits = _pair(source, request, whole=True)
    assert find_scenes([pan, ms]) == [(pan, ms, pan.stem)]
    res = evaluate(
        find_scenes([pan, ms]), parse_methods("exp,mtf-glp-fs"), tmp_path, sensor=sensor, clip_bits=bits
    )
    by = {r["method"]: r for r in res.rows}
    assert set(by) == {"exp", "mtf-glp-fs"}
    # injecting PAN detail beats interpolation at reduced resolution, as in every published table
    assert by["mtf-glp-fs"]["ERGAS"] < by["exp"]["ERGAS"]
    assert by["mtf-glp-fs"]["Q2n"] > by["exp"]["Q2n"]
    for r in res.rows:
        assert 0 < r["Q2n"] <= 1 and 0 < r["SAM"] < 20 and r["time_rr_s"] > 0 and r["time_fr_s"] > 0
        assert 0 <= r["D_lambda"] < 1 and 0 <= r["D_s"] < 1 and 0 < r["HQNR"] <= 1
    # interpolation adds no spatial detail: the largest spatial distortion at full resolution
    assert by["exp"]["D_s"] > by["mtf-glp-fs"]["D_s"]
    md = Path(res.files["markdown"]).read_text()
    assert "| exp |" in md and "SAM ↓" in md and "Q2n ↑" in md
    with open(res.files["results_csv"]) as fh:
        assert len(list(csv.DictReader(fh))) == 2
    payload = json.loads(Path(res.files["json"]).read_text())
    assert payload["settings"]["sensor"] == sensor and len(payload["summary"]) == 2


def test_evaluate_leaves_the_ms_hole_out(tmp_path: Path) -> None:
    """The audit's case: the example MS with a 40 x 80 px hole (65535 under an internal mask, or 0 as
    nodata) scored at reduced resolution as the whole MS is, over fewer pixels. Before, the hole was
    fused and scored as data: ERGAS 9.16 / Q2n 0.57 (mask) and 4.86 / 0.74 (nodata) against 2.53 /
    0.889; now 2.54 / 0.883 for both."""
    rows = {}
    for how in ("clean", "mask", "nodata"):
        ms = EXAMPLE_MS if how == "clean" else write_example_ms_with_hole(tmp_path / f"{how}.tif", how)
        out = tmp_path / how
        with pytest.raises(SystemExit) as exc:
            main(["evaluate", str(EXAMPLE_PAN), str(ms), "--methods", "gsa", "--sensor", "landsat8",
                  "--no-full", "-q", "-o", str(out)])  # fmt: skip
        assert exc.value.code == 0
        rows[how] = json.loads((out / "results.json").read_text())["rows"][0]
    for how in ("mask", "nodata"):
        assert rows[how]["ERGAS"] == pytest.approx(rows["clean"]["ERGAS"], abs=0.1), how
        assert rows[how]["Q2n"] == pytest.approx(rows["clean"]["Q2n"], abs=0.02), how
        assert rows[how]["SAM"] == pytest.approx(rows["clean"]["SAM"], abs=0.1), how


@pytest.mark.parametrize("source", PAIRS)
def test_evaluate_bands_select_and_reorder(
    tmp_path: Path, source: str, request: pytest.FixtureRequest
) -> None:
    """--bands: every method fuses the selected bands in the given order and the reference and the
    full-resolution MS follow them, so order-free indices (SAM, ERGAS, D_lambda, D_s, HPC) of the WV2
    pair with its bands reversed equal those of the pair as stored, and a subset scores only its bands."""
    pan, ms, sensor, bits = _pair(source, request)
    scenes = find_scenes([pan, ms])
    kw = {"sensor": sensor, "clip_bits": bits, "keep_products": False}
    stored = evaluate(scenes, parse_methods("gsa"), tmp_path / "a", **kw).rows[0]
    backwards = list(range(6 if source != "wv2" else 4, 0, -1))
    reversed_ = evaluate(scenes, parse_methods("gsa"), tmp_path / "b", bands=backwards, **kw).rows[0]
    for key in ("SAM", "ERGAS", "D_lambda", "D_s", "HPC"):
        assert reversed_[key] == pytest.approx(stored[key], rel=1e-4, abs=1e-6), key
    kw["sensor"] = "generic"  # the WV2 MTF table names 4 or 8 bands, not a 2-band subset
    subset = evaluate(scenes, parse_methods("exp"), tmp_path / "c", bands=[2, 3], **kw).rows[0]
    assert subset["Q2n_name"] != stored["Q2n_name"] and 0 < subset["ERGAS"] < 50


@pytest.mark.parametrize("source", PAIRS)
def test_evaluate_cli_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, request: pytest.FixtureRequest
) -> None:
    pan, ms = (str(p) for p in _pair(source, request)[:2])
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", pan, ms, "--methods", "gsa,magic", "-o", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method 'magic'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", pan, "--methods", "gsa", "-o", str(tmp_path)])
    assert exc.value.code == 2


def test_evaluate_small_float_scene_and_shipped_hyperion_pan(tmp_path: Path) -> None:
    """`fusion evaluate` on the held-out last third of the Paris Hyperion/ALI pair (24 x 58 HS px,
    float reflectance): `--block 24` scores a scene under 32 px, Q2n does not round float data to
    uint16 (it would leave a few grey levels), and the shipped `hyperion_pan` beats BDSD-PC, the best
    classical method there, on Q2n, SAM and ERGAS (measured 2026-12-05: 0.767 / 3.599 / 4.975
    against 0.758 / 3.667 / 5.017)."""
    import numpy as np
    import rasterio

    from fusion_cli.assess import holds_whole_dn, read_image

    paths = {}
    for name, rows in (("pan", slice(144, 216)), ("hs", slice(48, 72))):
        src = need_shared("eo1_hyperion_ali_paris", f"{name}.tif")
        with rasterio.open(src) as ds:
            data, profile = ds.read()[:, rows], ds.profile
        profile.update(height=data.shape[1], width=data.shape[2])
        paths[name] = tmp_path / f"{name}.tif"
        with rasterio.open(paths[name], "w", **profile) as ds:
            ds.write(data)
    assert not holds_whole_dn(read_image(paths["hs"], "HSI"))  # reflectance: Q2n does not round it
    assert holds_whole_dn(read_image(need_shared("wv2_spacenet6", "ms_1.tif"), "MS"))
    scenes = [(paths["pan"], paths["hs"], "paris_test")]
    methods = parse_methods("fusionmamba:hyperion_pan,exp,bdsd-pc")
    with pytest.raises(FusionError, match="32x32"):
        evaluate(scenes, methods[1:2], tmp_path / "b32", sensor="hyperion", full_resolution=False)
    res = evaluate(scenes, methods, tmp_path / "ev", sensor="hyperion", block=24, full_resolution=False)
    by = {r["method"]: r for r in res.rows}
    net, bdsd = by["fusionmamba:hyperion_pan"], by["bdsd-pc"]
    print(f"\nParis held out: net {net['Q2n']:.4f}/{net['SAM']:.3f}/{net['ERGAS']:.3f}, BDSD-PC {bdsd}")
    assert net["Q2n"] > bdsd["Q2n"] and net["SAM"] < bdsd["SAM"] and net["ERGAS"] < bdsd["ERGAS"]
    # unrounded Q2n of float data: rounding reflectance to integers would drop EXP's Q2n to ~0.2
    assert by["exp"]["Q2n"] > 0.4 and np.isfinite(by["exp"]["Q2n"])
    assert json.loads(Path(res.files["json"]).read_text())["settings"]["block"] == 24


def test_signed_dn_are_not_rounded_to_uint16(tmp_path: Path) -> None:
    """Q2n's uint16 rounding is chosen only for DN that uint16 holds as they are: the WorldView-2 MS
    as int16 is rounded, the same DN less 300 (signed, many negative) are not, because uint16 would
    clip every negative DN to 0 and score a different image (Q2n differs by more than 0.01)."""
    import numpy as np
    import rasterio

    from fusion_cli.assess import holds_whole_dn, read_image
    from fusion_cli.metrics import q2n

    with rasterio.open(need_shared("wv2_spacenet6", "ms_1.tif")) as ds:
        dn, profile = ds.read().astype(np.int16), ds.profile
    profile.update(dtype="int16")
    paths = {}
    for name, data in (("dn", dn), ("signed", dn - 300)):
        paths[name] = tmp_path / f"{name}.tif"
        with rasterio.open(paths[name], "w", **profile) as out:
            out.write(data)
    assert holds_whole_dn(read_image(paths["dn"], "MS"))
    signed = read_image(paths["signed"], "MS")
    assert (signed.data < 0).mean() > 0.2 and not holds_whole_dn(signed)
    ref = signed.data.astype(np.float64)
    fused = ref + np.random.default_rng(0).normal(0, 40, ref.shape)
    assert abs(q2n(ref, fused, 32, 32, True) - q2n(ref, fused, 32, 32, False)) > 0.01


def test_evaluate_scores_a_hisr_pair(tmp_path: Path) -> None:
    """`fusion evaluate MSI HSI` (a 6-band ALI MSI as the high-resolution input, San Francisco):
    classical methods failed with "use fusion hisr" and the no-reference indices with "QNR needs a
    single PAN band" after the reduced-resolution fusions. The pair is fused as `fusion hisr` does
    and scored at reduced resolution only; mtf-glp-hs, which regresses on every MSI band, beats
    plain interpolation."""
    import numpy as np
    import rasterio

    paths = {}
    for name, reduce in (("ms", 1), ("hs", 3)):
        with rasterio.open(need_shared("eo1_sanfrancisco", f"{name}.tif")) as src:
            data = src.read()[:, :144, :132].astype(np.float32)
        c = data.shape[0]
        data = data.reshape(c, 144 // reduce, reduce, 132 // reduce, reduce).mean(axis=(2, 4))
        paths[name] = tmp_path / f"{name}.tif"
        profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": c,
                   "dtype": "float32"}  # fmt: skip
        with rasterio.open(paths[name], "w", **profile) as dst:
            dst.write(data)
    scenes = [(paths["ms"], paths["hs"], "sf")]
    res = evaluate(scenes, parse_methods("exp,mtf-glp-hs,gsa"), tmp_path / "ev", sensor="hyperion", block=8)
    by = {r["method"]: r for r in res.rows}
    assert set(by) == {"exp", "mtf-glp-hs", "gsa"} and "HQNR" not in by["exp"]
    assert by["mtf-glp-hs"]["SAM"] < by["exp"]["SAM"] and by["mtf-glp-hs"]["ERGAS"] < by["exp"]["ERGAS"]
    # PSNR, which the HISR cards rank by, is a column of HISR tables (it was missing)
    assert by["mtf-glp-hs"]["PSNR"] > by["exp"]["PSNR"] > 20
    assert "PSNR" in (tmp_path / "ev" / "results.md").read_text().splitlines()[0]


def test_evaluate_runs_vhr4_on_the_four_bands_of_the_wv3_pair(tmp_path: Path) -> None:
    """The 4-band `vhr4` on the 8-band WorldView-3 pair (docs/evaluation.md): without --bands the
    network refuses the 8-band MS in one line naming --bands; with --bands 2,3,5,7 (B, G, R, NIR1)
    it and the classical methods fuse and are scored on those four bands (Q4), at both resolutions,
    HPC included, and the network beats interpolation on every reduced-resolution index."""
    import rasterio
    from rasterio.windows import Window

    paths = {}
    # the bottom-left 256 x 256 PAN px (64 x 64 MS px), inside vhr4's held-out rows
    for name, row, side in (("pan", 1044, 256), ("ms", 261, 64)):
        src = need_shared("wv3_spacenet2", f"{name}.tif")
        with rasterio.open(src) as ds:
            win = Window(0, row, side, side)
            profile = ds.profile | {"height": side, "width": side, "transform": ds.window_transform(win)}
            data = ds.read(window=win)
        paths[name] = tmp_path / f"{name}.tif"
        with rasterio.open(paths[name], "w", **profile) as out:
            out.write(data)
    scenes = [(paths["pan"], paths["ms"], "wv3_corner")]
    methods = parse_methods("fusionmamba:vhr4,exp,brovey")
    with pytest.raises(FusionError, match="expects 4 .*--bands"):
        evaluate(scenes, methods[:1], tmp_path / "all", sensor="wv3", device="cpu")
    res = evaluate(
        scenes, methods, tmp_path / "ev", sensor="wv3", bands=[2, 3, 5, 7], clip_bits=11, device="cpu"
    )
    by = {r["method"]: r for r in res.rows}
    assert set(by) == {"fusionmamba:vhr4", "exp", "brovey"}
    assert {r["Q2n_name"] for r in res.rows} == {"Q4"}
    net, exp = by["fusionmamba:vhr4"], by["exp"]
    assert net["Q2n"] > exp["Q2n"] and net["SAM"] < exp["SAM"] and net["ERGAS"] < exp["ERGAS"]
    assert all(0 < r["HQNR"] <= 1 and -1 <= r["HPC"] <= 1 for r in res.rows)
    assert net["HPC"] > exp["HPC"] + 0.3  # the network injects PAN detail, interpolation none
    assert json.loads(Path(res.files["json"]).read_text())["settings"]["bands"] == [2, 3, 5, 7]


@pytest.mark.parametrize(
    "bad", [["--tile", "0"], ["--bands", "9"], ["--methods", "fusionmamba:hyperion_hisr"], ["--cut", "10000"]]
)
def test_a_refused_evaluation_leaves_nothing_behind(tmp_path: Path, bad: list[str]) -> None:
    """These were found only after the Wald pair (and for --cut a product) was written: OUT was left
    with products/<scene>/reduced/{pan_lr,ms_lr,ms_ref}.tif and no results. Now what the run created
    goes with it, and a folder that held something before keeps exactly that."""
    args = ["evaluate", str(EXAMPLE_PAN), str(EXAMPLE_MS), "--methods", "exp", "--no-full", *bad]
    with pytest.raises(SystemExit) as exc:
        main([*args, "-o", str(tmp_path / "new")])
    assert exc.value.code == 2 and not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    (kept / "products").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main([*args, "-o", str(kept)])
    assert exc.value.code == 2
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*")) == ["notes.txt", "products"]


def test_a_failure_midway_keeps_the_finished_scenes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk error (or Ctrl-C) at the second scene removes that scene's half-written folder only: the
    first scene's products stay (they removed everything the run had made, finished work included)."""
    import errno

    from fusion_cli import evaluate as ev

    real, calls = ev.evaluate_scene, []

    def second_fails(pan: object, ms: object, methods: object, work_dir: Path, **kw: object) -> list:
        calls.append(work_dir)
        if len(calls) == 2:
            (work_dir / "reduced").mkdir(parents=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(pan, ms, methods, work_dir, **kw)

    monkeypatch.setattr(ev, "evaluate_scene", second_fails)
    out = tmp_path / "out"
    scenes = [(EXAMPLE_PAN, EXAMPLE_MS, "a"), (EXAMPLE_PAN, EXAMPLE_MS, "b")]
    with pytest.raises(OSError, match="No space"):
        evaluate(scenes, parse_methods("exp"), out, sensor="landsat8", full_resolution=False)
    assert (out / "products" / "a" / "reduced" / "exp.tif").is_file()
    assert not (out / "products" / "b").exists()


def test_scenes_whose_ids_share_a_products_folder_are_refused(tmp_path: Path) -> None:
    """Scene ids `site/x` and `site:x` both keep their products in `products/site_x`: the second
    scene's replaced the first's at exit 0. Refused before any work."""
    out = tmp_path / "ev"
    scenes = [(EXAMPLE_PAN, EXAMPLE_MS, "site/x"), (EXAMPLE_PAN, EXAMPLE_MS, "site:x")]
    specs = parse_methods("gsa")
    with pytest.raises(FusionError, match="'site/x' and 'site:x' would keep their products in one folder"):
        evaluate(scenes, specs, out, sensor="landsat8")
    assert not out.exists()
    with pytest.raises(FusionError, match="one folder"):  # a case-insensitive disk: one folder too
        evaluate(
            [(EXAMPLE_PAN, EXAMPLE_MS, "A"), (EXAMPLE_PAN, EXAMPLE_MS, "a")], specs, out, sensor="landsat8"
        )
    # a manifest of two pan.tif rows without ids: told to give ids, not batch's "--out-pattern"
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for src, name in ((EXAMPLE_PAN, "pan.tif"), (EXAMPLE_MS, "ms.tif")):
            (tmp_path / sub / name).symlink_to(src)
    manifest = tmp_path / "m.csv"
    manifest.write_text("pan,ms\na/pan.tif,a/ms.tif\nb/pan.tif,b/ms.tif\n")
    scenes = find_scenes([manifest])
    with pytest.raises(FusionError, match="id column") as err:
        evaluate(scenes, specs, out, sensor="landsat8")
    assert "--out-pattern" not in str(err.value)


def test_evaluate_bands_leave_a_dead_nan_band_out(tmp_path: Path) -> None:
    """An MS with a dead band (all NaN, as a hyperspectral cube's water band) and --bands without it:
    the Wald step read every band and refused the file (the advice it gave was --bands); the reduced
    pair now holds the bands asked for, and the table equals that of a copy of the MS without the band."""
    import numpy as np
    import rasterio

    with rasterio.open(EXAMPLE_MS) as ds:
        data, profile = ds.read().astype(np.float32), ds.profile | {"dtype": "float32", "predictor": 3}
        names = list(ds.descriptions)
    dead, clean = tmp_path / "dead_ms.tif", tmp_path / "clean_ms.tif"
    with rasterio.open(clean, "w", **profile | {"count": 5}) as dst:
        dst.write(data[:5])
        dst.descriptions = tuple(names[:5])
    data[5] = np.nan
    with rasterio.open(dead, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = tuple(names)
    kw = {"sensor": "landsat8", "keep_products": False}
    methods = parse_methods("gsa,mtf-glp")
    got = evaluate(find_scenes([EXAMPLE_PAN, dead]), methods, tmp_path / "a", bands=[1, 2, 3, 4, 5], **kw)
    want = evaluate(find_scenes([EXAMPLE_PAN, clean]), methods, tmp_path / "b", **kw)
    for row, ref in zip(got.rows, want.rows, strict=True):
        for key in ("Q2n", "SAM", "ERGAS", "HQNR", "HPC"):
            assert row[key] == pytest.approx(ref[key], rel=1e-6), (row["method"], key)
