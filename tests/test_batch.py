"""`fusion batch` on folders built from the real pairs of ../shared/data, or from crops of the
in-repository Landsat-8 example, plus deliberately broken files.

The folders live in tmp_path (copies made at test time; nothing from the shared data enters the
repository). Fusion uses the classical `exp` method so the whole file stays fast on 2 cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.windows
from conftest import (
    EXAMPLE_MS,
    EXAMPLE_PAN,
    crop_raster,
    need_shared,
    restamp,
    shared_or_named_alike,
    write_example_crop,
)
from rasterio.crs import CRS

from fusion_cli import align, batch, notices
from fusion_cli.batch import locking
from fusion_cli.errors import FusionError
from fusion_cli.raster import is_complete_output

L7 = "landsat7_etm_fusebox"
WV2 = "wv2_spacenet6"
GOOD = ["l7_1", "l7_7", "wv2_1"]
# The same roles from the example: a ratio-2 pair without georeferencing, a georeferenced ratio-2
# pair, and a georeferenced ratio-4 pair (its MS reduced once more by 2 with the Landsat MTF).
GOOD_EXAMPLE = ["ex_nogeo", "ex_top", "ex_r4"]
BAD = {  # scene (or file) -> words its failure reason must contain
    "trunc": None,  # whatever GDAL says about the cut file, it must be a failure with a reason
    "text": "not a readable raster",
    "crs": "crs",
    "lonely_pan.tif": "no ms partner",
}


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args: str, check_rc: int | None = None) -> Result:
    """The CLI entry in this process (no interpreter + torch start-up per call); exit code kept."""
    from fusion_cli.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        try:
            main(list(args))
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    res = Result(rc, out.getvalue(), err.getvalue())
    if check_rc is not None:
        assert res.returncode == check_rc, res.stderr[-3000:]
    return res


def popen_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from fusion_cli.cli.main import main; main()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def copy_pair(src_dir: str, pan: str, ms: str, dst: Path, stem: str) -> None:
    shutil.copy(need_shared(src_dir, pan), dst / f"{stem}_pan.tif")
    shutil.copy(need_shared(src_dir, ms), dst / f"{stem}_ms.tif")


def build_mixed_folder(root: Path, source: str = "shared") -> Path:
    """3 good real pairs (Landsat-7 ratio 2 without georeferencing, WorldView-2 ratio 4 in UTM; or
    the example's crops of `GOOD_EXAMPLE`) and 4 broken cases: a truncated GeoTIFF, a text file named
    .tif, mismatched CRS, no partner."""
    d = root / "in"
    d.mkdir()
    if source == "example":
        return build_example_mixed_folder(d)
    copy_pair(L7, "1_pan.tif", "1_ms.tif", d, "l7_1")
    copy_pair(L7, "7_pan.tif", "7_ms.tif", d, "l7_7")
    copy_pair(WV2, "pan_1.tif", "ms_1.tif", d, "wv2_1")
    copy_pair(L7, "19_pan.tif", "19_ms.tif", d, "trunc")
    data = (d / "trunc_ms.tif").read_bytes()
    (d / "trunc_ms.tif").write_bytes(data[: len(data) * 2 // 5])
    copy_pair(L7, "13_pan.tif", "13_ms.tif", d, "text")
    (d / "text_pan.tif").write_text("this is not a GeoTIFF\n")
    copy_pair(WV2, "pan_2.tif", "ms_2.tif", d, "crs")
    with rasterio.open(d / "crs_ms.tif", "r+") as ds:  # our temporary copy, never the shared file
        ds.crs = CRS.from_epsg(32632)
    shutil.copy(need_shared(L7, "25_pan.tif"), d / "lonely_pan.tif")
    (d / "notes.txt").write_text("a file that matches no pattern is listed, not fused\n")
    return d


def build_example_mixed_folder(d: Path) -> Path:
    """`build_mixed_folder` from the in-repository example."""
    Window = rasterio.windows.Window
    write_example_crop(d, "ex_nogeo", Window(0, 0, 160, 96), georef=False)
    write_example_crop(d, "ex_top", Window(100, 0, 128, 80))
    write_example_crop(d, "ex_r4", Window(0, 32, 320, 128), ms_reduce=2)
    write_example_crop(d, "trunc", Window(0, 0, 320, 160))
    data = (d / "trunc_ms.tif").read_bytes()
    (d / "trunc_ms.tif").write_bytes(data[: len(data) * 2 // 5])
    write_example_crop(d, "text", Window(0, 0, 64, 64))
    (d / "text_pan.tif").write_text("this is not a GeoTIFF\n")
    write_example_crop(d, "crs", Window(64, 64, 64, 64))
    with rasterio.open(d / "crs_ms.tif", "r+") as ds:
        ds.crs = CRS.from_epsg(32632)
    shutil.copy(EXAMPLE_PAN, d / "lonely_pan.tif")
    (d / "notes.txt").write_text("a file that matches no pattern is listed, not fused\n")
    return d


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module", params=["shared", "example"])
def mixed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The mixed folder fused once by the CLI (shared by the tests that inspect that run); `good`
    names its good scenes: ratio 2 without georeferencing, ratio 2 and ratio 4 georeferenced."""
    root = tmp_path_factory.mktemp("batch")
    in_dir = build_mixed_folder(root, request.param)
    out_dir, log = root / "out", root / "log.jsonl"
    res = run_cli("batch", str(in_dir), str(out_dir), "--method", "exp", "--log", str(log), "--json")
    good = GOOD if request.param == "shared" else GOOD_EXAMPLE
    return {"in": in_dir, "out": out_dir, "log": log, "res": res, "good": good}


def test_default_conventions_pair_the_real_folders(tmp_path: Path) -> None:
    """The shared folders' naming conventions (FuseBox `7_pan.tif`, SpaceNet-6 `pan_1.tif`, one
    unnumbered SpaceNet-2 pair); without ../shared, folders of empty files named alike."""
    fusebox = shared_or_named_alike(L7, tmp_path)
    plan = batch.pair_by_patterns(fusebox, Path("/nonexistent/out"))
    assert sorted(int(s.id) for s in plan.scenes) == list(range(1, 31))
    s7 = next(s for s in plan.scenes if s.id == "7")
    assert (s7.pan.name, s7.ms.name, s7.out.name) == ("7_pan.tif", "7_ms.tif", "7_fused.tif")
    assert not plan.unpaired
    assert {p.name for p in plan.ignored} == {"LICENSE", "README.txt", "locations.txt"}

    wv2 = batch.pair_by_patterns(shared_or_named_alike(WV2, tmp_path), Path("/nonexistent/out"))
    assert [(s.id, s.pan.name, s.ms.name) for s in wv2.scenes] == [
        ("1", "pan_1.tif", "ms_1.tif"),
        ("2", "pan_2.tif", "ms_2.tif"),
    ]
    with pytest.raises(FusionError, match="--pan and --ms patterns"):
        batch.pair_by_patterns(shared_or_named_alike("wv3_spacenet2", tmp_path), Path("/nonexistent/out"))


def test_pairing_leaves_no_input_out_silently(tmp_path: Path, monkeypatch) -> None:
    """Four ways a batch left inputs out at exit 0 (helper audit): a pair in another default naming
    convention than the one pairing the most files (named only in a line -q hides); an empty folder
    or patterns matching nothing ("0 scenes"); a symlinked scene folder under a recursive pattern
    (rglob does not follow it); and a rerun with relative paths and OUT_DIR inside IN_DIR, whose own
    products then failed as inputs without partners."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("A_PAN.tif", "A_MS.tif", "PAN_2.tif", "MS_2.tif", "PAN_3.tif", "MS_3.tif", "notes.txt"):
        (mixed / name).write_bytes(b"")
    plan = batch.pair_by_patterns(mixed, tmp_path / "out", check_outputs=False)
    assert sorted(s.id for s in plan.scenes) == ["2", "3"]
    reasons = {u.path.name: u.reason for u in plan.unpaired}
    assert set(reasons) == {"A_PAN.tif", "A_MS.tif"} and "give --pan and --ms" in reasons["A_PAN.tif"]
    assert [p.name for p in plan.ignored] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FusionError, match="holds no files"):
        batch.pair_by_patterns(empty, tmp_path / "out", "*_PAN.tif", "*_MS.tif")
    with pytest.raises(FusionError, match="has no file matching --pan 'x\\*_PAN.tif'"):
        batch.pair_by_patterns(mixed, tmp_path / "out", "x*_PAN.tif", "x*_MS.tif")
    res = run_cli("batch", str(empty), str(tmp_path / "o"), "--method", "gsa", check_rc=2)
    assert "holds no files" in res.stderr and not (tmp_path / "o").exists()

    real = tmp_path / "real" / "s1"
    real.mkdir(parents=True)
    for name in ("a_PAN.tif", "a_MS.tif"):
        (real / name).write_bytes(b"")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "s1").symlink_to(real)
    (linked / "loop").symlink_to(linked)  # a link back up is walked once, not forever
    (linked / "s2").mkdir()
    for name in ("b_PAN.tif", "b_MS.tif"):
        (linked / "s2" / name).write_bytes(b"")
    (linked / "latest").symlink_to(linked / "s2")  # an alias sorts first: s2 keeps its own name
    (linked / ".store" / "s3").mkdir(parents=True)  # a hidden folder is no input, a link to it is
    for name in ("c_PAN.tif", "c_MS.tif"):
        (linked / ".store" / "s3" / name).write_bytes(b"")
    (linked / "s3").symlink_to(linked / ".store" / "s3")
    plan = batch.pair_by_patterns(linked, tmp_path / "out", "*/*_PAN.tif", "*/*_MS.tif", check_outputs=False)
    assert [(s.id, s.pan) for s in plan.scenes] == [
        ("s1_a", linked / "s1" / "a_PAN.tif"),
        ("s2_b", linked / "s2" / "b_PAN.tif"),
        ("s3_c", linked / "s3" / "c_PAN.tif"),
    ]
    # a folder that cannot be listed stops the plan instead of leaving its scenes out
    real_scandir = os.scandir

    def failing_scandir(path: object) -> object:
        if str(path).endswith("s2"):
            raise OSError(5, "Input/output error", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    with pytest.raises(OSError, match="Input/output error"):
        batch.pair_by_patterns(linked, tmp_path / "out", "*/*_PAN.tif", "*/*_MS.tif", check_outputs=False)
    monkeypatch.undo()

    monkeypatch.chdir(tmp_path)
    (tmp_path / "linked" / "out").mkdir()
    (tmp_path / "linked" / "out" / "s1_a_fused_MS.tif").write_bytes(b"")  # an earlier product: */*_MS.tif
    plan = batch.pair_by_patterns(
        Path("linked"), Path("linked/out"), "*/*_PAN.tif", "*/*_MS.tif", "{stem}_fused_MS.tif", False
    )
    assert [s.id for s in plan.scenes] == ["s1_a", "s2_b", "s3_c"] and not plan.unpaired


def test_an_unknown_creation_option_stops_a_batch_once(tmp_path: Path) -> None:
    """`batch --co FOO=1` failed every scene with the same reason at exit 1 (the help says --co is
    refused before any work); it is one line at exit 2, before OUT_DIR is made."""
    from rasterio.windows import Window

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for name, col in (("a", 0), ("b", 64)):
        write_example_crop(in_dir, name, Window(col, 0, 64, 64))
    res = run_cli("batch", str(in_dir), str(out_dir), "--method", "gsa", "--co", "FOO=1", check_rc=2)
    assert "GTiff has no creation option --co FOO=1" in res.stderr and "Traceback" not in res.stderr
    assert not out_dir.exists()


def test_a_batch_refuses_names_too_long_for_a_side_files_temporary(tmp_path: Path) -> None:
    """A 219-byte product name fits its own temporary but not its metrics sidecar's (40 bytes more):
    the scene was fused, then failed on ENAMETOOLONG without metrics, on every rerun. Refused before
    any work, exit 2."""
    from rasterio.windows import Window

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    write_example_crop(in_dir, "a", Window(0, 0, 64, 64))
    long_pattern = "{stem}" + "a" * 214 + ".tif"  # a + 214 + .tif: 219 bytes
    args = ("batch", str(in_dir), str(out_dir), "--method", "gsa", "--out-pattern", long_pattern)
    res = run_cli(*args, "--metrics", check_rc=2)
    assert "its temporary file adds 27" in res.stderr and not out_dir.exists(), res.stderr
    run_cli(*args, check_rc=0)  # without --metrics it fits


def test_patterns_and_manifest(tmp_path: Path) -> None:
    d = tmp_path / "in"
    (d / "a").mkdir(parents=True)
    for name in ["X_PAN.TIF", "X_MUL.tif", "Y_PAN.tif", "Z_MUL.tiff", "a/pan.tif", "a/ms.tif"]:
        (d / name).write_bytes(b"")
    plan = batch.pair_by_patterns(d, tmp_path / "out", "*_PAN.tif", "*_MUL.tif", "{stem}.tif")
    assert [(s.id, s.pan.name, s.ms.name, s.out.name) for s in plan.scenes] == [
        ("X", "X_PAN.TIF", "X_MUL.tif", "X.tif")
    ]
    reasons = {u.path.name: u.reason for u in plan.unpaired}
    assert "no MS partner" in reasons["Y_PAN.tif"] and "no PAN partner" in reasons["Z_MUL.tiff"]
    # One folder per scene: the stem is the folder, outputs mirror it.
    nested = batch.pair_by_patterns(d, tmp_path / "out", "*/pan.tif", "*/ms.tif")
    assert [(s.id, s.out) for s in nested.scenes] == [("a", tmp_path / "out" / "a_fused.tif")]
    with pytest.raises(FusionError, match="needs a '\\*'"):
        batch.pair_by_patterns(d, tmp_path / "out", "pan.tif", "*_MUL.tif")

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"pan,ms,out\nX_PAN.TIF,X_MUL.tif,\n{d / 'a/pan.tif'},a/ms.tif,sub/a.tif\n")
    plan = batch.read_manifest(manifest, d, tmp_path / "out")
    assert [(s.pan, s.ms, s.out) for s in plan.scenes] == [
        (d / "X_PAN.TIF", d / "X_MUL.tif", tmp_path / "out" / "X_fused.tif"),
        (d / "a/pan.tif", d / "a/ms.tif", tmp_path / "out" / "sub/a.tif"),
    ]
    manifest.write_text("pan,ms,out\nX_PAN.TIF,X_MUL.tif,same.tif\na/pan.tif,a/ms.tif,same.tif\n")
    with pytest.raises(FusionError, match="would both write"):
        batch.read_manifest(manifest, d, tmp_path / "out")
    manifest.write_text("panchromatic,multispectral\nX_PAN.TIF,X_MUL.tif\n")
    with pytest.raises(FusionError, match="'pan' and 'ms' columns"):
        batch.read_manifest(manifest, d, tmp_path / "out")


def test_shards_cover_every_pair_exactly_once(tmp_path: Path) -> None:
    plan = batch.pair_by_patterns(shared_or_named_alike(L7, tmp_path), Path("/nonexistent/out"))
    ids = sorted(s.id for s in plan.scenes)
    for n in (2, 3, 7):
        parts = [
            [s.id for s in batch.apply_shard(plan, *batch.parse_shard(f"{k}/{n}")).scenes] for k in range(n)
        ]
        assert sorted(sum(parts, [])) == ids  # every pair once: no loss, no duplicate
        # SLURM's 1-based ids (1..N) select the same shards as 0-based ones (0..N-1).
        one_based = [[s.id for s in batch.apply_shard(plan, *batch.parse_shard(f"{k + 1}/{n}")).scenes]
                     for k in range(n)]  # fmt: skip
        assert sorted(map(sorted, one_based)) == sorted(map(sorted, parts))
    # A scene's shard does not depend on which other files are present.
    fewer = batch.Plan(plan.scenes[::3])
    assert {s.id for s in batch.apply_shard(fewer, 1, 3).scenes} <= {
        s.id for s in batch.apply_shard(plan, 1, 3).scenes
    }
    with pytest.raises(FusionError, match="K/N"):
        batch.parse_shard("1of2")
    # `--shard slurm` from the array variables, exact for ranges and steps like --array=5-20:5.
    tasks = [{"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5",
              "SLURM_ARRAY_TASK_STEP": "5"} for t in (5, 10, 15, 20)]  # fmt: skip
    assert [batch.slurm_shard(env) for env in tasks] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    with pytest.raises(FusionError, match="SLURM_ARRAY_TASK_ID"):
        batch.slurm_shard({})


def test_two_cli_shards_split_the_mixed_folder(mixed: dict) -> None:
    plans = []
    for k in ("1/2", "2/2"):
        res = run_cli(
            "batch", str(mixed["in"]), str(mixed["out"]), "--shard", k, "--dry-run", "--json", check_rc=0
        )
        plans.append(json.loads(res.stdout))
    scenes = [s["scene"] for p in plans for s in p["scenes"]]
    good = mixed["good"]
    assert sorted(scenes) == sorted(good + ["trunc", "text", "crs"])
    assert [u["path"] for p in plans for u in p["unpaired"]] == [str(mixed["in"] / "lonely_pan.tif")]
    assert all(s["state"] == "complete" for p in plans for s in p["scenes"] if s["scene"] in good)


def test_mixed_folder_fuses_good_scenes_and_reports_each_bad_one(mixed: dict) -> None:
    res, out_dir, good = mixed["res"], mixed["out"], mixed["good"]
    assert res.returncode == 1, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    by_scene = {r["scene"]: r for r in summary["scenes"]}
    assert (summary["done"], summary["skipped"], summary["failed"]) == (3, 0, 4)
    for name in good:
        r = by_scene[name]
        assert r["status"] == "done", r
        out = Path(r["out"])
        assert is_complete_output(out)
        with rasterio.open(out) as o, rasterio.open(mixed["in"] / f"{name}_pan.tif") as p:
            with rasterio.open(mixed["in"] / f"{name}_ms.tif") as m:
                assert (o.count, o.dtypes[0]) == (m.count, m.dtypes[0])
                g = align.relate_grids(p, m)
            # the PAN grid over the area the MS covers: the whole PAN for the shared pairs; from
            # the second row and column for the example's crops (Landsat's half-pixel offset)
            assert (g.row0, g.col0) == ((0, 0) if name in GOOD or not g.georeferenced else (1, 1))
            assert (o.width, o.height, o.crs) == (g.width, g.height, p.crs)
            assert o.transform.almost_equals(p.transform @ rasterio.Affine.translation(g.col0, g.row0))
        assert r["pan_mpx"] == pytest.approx(out_px(out) / 1e6)
    for name, words in BAD.items():
        r = by_scene[name]
        assert r["status"] == "failed" and r["reason"], r
        if words:
            assert words in r["reason"].lower(), r["reason"]
        assert not (out_dir / f"{name}_fused.tif").exists()
    assert summary["mpx_per_s"] > 0
    assert "FAILED" in res.stderr and "Traceback" not in res.stderr
    assert hidden_files(out_dir) == []  # no temporary or lock file left behind
    lines = [json.loads(x) for x in mixed["log"].read_text().splitlines()]
    assert sorted(x["scene"] for x in lines) == sorted(good + list(BAD))
    assert {x["status"] for x in lines if x["scene"] in good} == {"done"}

    # Rerun: finished scenes are validated and skipped (not rewritten), bad ones fail again.
    stamps = {n: (out_dir / f"{n}_fused.tif").stat().st_mtime_ns for n in good}
    again = run_cli(
        "batch", str(mixed["in"]), str(out_dir), "--method", "exp", "--json", "--log", str(mixed["log"])
    )
    assert again.returncode == 1
    s2 = json.loads(again.stdout)
    assert (s2["done"], s2["skipped"], s2["failed"]) == (0, 3, 4)
    assert {n: (out_dir / f"{n}_fused.tif").stat().st_mtime_ns for n in good} == stamps
    assert len(mixed["log"].read_text().splitlines()) == 2 * len(lines)


def out_px(path: Path) -> int:
    with rasterio.open(path) as ds:
        return ds.width * ds.height


def test_overwrite_redoes_and_a_foreign_output_is_not_clobbered(mixed: dict, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    manifest = tmp_path / "one.csv"
    name = mixed["good"][1]  # a ratio-2 scene
    manifest.write_text(f"pan,ms,out\n{name}_pan.tif,{name}_ms.tif,l7_7.tif\n")
    # A file that is not a complete fusion-cli product already sits at the output name.
    out_dir.mkdir()
    (out_dir / "l7_7.tif").write_text("somebody else's file")
    args = ["batch", str(mixed["in"]), str(out_dir), "--manifest", str(manifest), "--method", "exp", "--json"]
    res = run_cli(*args, check_rc=1)
    assert "not a complete fusion-cli product" in json.loads(res.stdout)["scenes"][0]["reason"]
    assert (out_dir / "l7_7.tif").read_text() == "somebody else's file"
    res = run_cli(*args, "--overwrite", "--metrics", check_rc=0)
    redone = json.loads(res.stdout)
    assert redone["done"] == 1 and is_complete_output(out_dir / "l7_7.tif")
    # --metrics: full-resolution indices in the summary and beside the product, for reports.
    metrics = redone["scenes"][0]["details"]["metrics"]
    sidecar = json.loads((out_dir / "l7_7.tif.metrics.json").read_text())
    assert sidecar["metrics"] == pytest.approx(metrics)
    assert 0 < metrics["QNR"] <= 1 and 0 <= metrics["D_s"] < 1 and metrics["ratio"] == 2
    ref = mixed["out"] / f"{name}_fused.tif"
    with rasterio.open(out_dir / "l7_7.tif") as a, rasterio.open(ref) as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_bad_invocations_exit_2(mixed: dict, tmp_path: Path) -> None:
    cases = [
        (["--manifest", "x.csv", "--pan", "*_pan.tif", "--ms", "*_ms.tif"], "either --manifest"),
        (["--pan", "*_pan.tif"], "both --pan and --ms"),
        (["--shard", "3"], "K/N"),
        (["--method", "no-such-method"], "no-such-method"),
    ]
    for extra, words in cases:
        res = run_cli("batch", str(mixed["in"]), str(tmp_path / "o"), *extra)
        assert res.returncode == 2, (extra, res.stderr)
        assert words in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_retries_and_locks_in_the_engine(tmp_path: Path) -> None:
    scene = batch.Scene("s", tmp_path / "p.tif", tmp_path / "m.tif", tmp_path / "out" / "s.tif")
    calls: list[int] = []

    def flaky(sc: batch.Scene) -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("transient read error")
        return {"ok": True}

    r = batch.execute_scene(scene, flaky, retries=1)
    assert (r.status, r.attempts, r.details) == ("done", 2, {"ok": True})

    def bad(sc: batch.Scene) -> dict:
        calls.append(1)
        raise FusionError("MS has 3 bands, the model needs 4")

    calls.clear()
    r = batch.execute_scene(scene, bad, retries=3)
    assert (r.status, r.attempts, len(calls)) == ("failed", 1, 1)  # bad input is not retried
    assert r.reason == "MS has 3 bands, the model needs 4"

    # Another live run holds the scene: it is left alone, not fused twice.
    with batch.scene_lock(scene.out) as mine:
        assert mine
        r = batch.execute_scene(scene, flaky)
        assert r.status == "busy" and "another running batch" in r.reason
        assert hidden_files(scene.out.parent) == [f".{scene.out.name}.lock"]  # the refused run left it
    # A temporary file of a killed writer is removed once we own the scene.
    stale = scene.out.with_name(f".{scene.out.name}.partial-4194399-abcd0123.tif")
    stale.write_bytes(b"half a file")
    batch.execute_scene(scene, lambda sc: {})
    assert hidden_files(scene.out.parent) == []


@pytest.mark.parametrize("holder_places_it", [False, True])
def test_a_scene_another_run_holds_is_waited_for_at_the_end(tmp_path: Path, holder_places_it: bool) -> None:
    """A scene another live run held counted as "skipped" at exit 0; when that run then died (a
    requeued array task killed), nothing was written and both runs had reported success. The scene
    is put off to the end of the batch and waited for: skipped if the holder placed its product,
    fused here if it let go without one."""
    out = tmp_path / "out"
    scenes = [batch.Scene(n, tmp_path / "p.tif", tmp_path / "m.tif", out / f"{n}.tif") for n in "ab"]
    out.mkdir()
    fused: list[str] = []

    def process(sc: batch.Scene) -> dict:
        fused.append(sc.id)
        sc.out.write_bytes(b"product")
        return {}

    held = threading.Event()

    def other_run() -> None:
        with batch.scene_lock(scenes[0].out):
            held.set()
            time.sleep(1.5)
            if holder_places_it:
                scenes[0].out.write_bytes(b"product")

    holder = threading.Thread(target=other_run)
    holder.start()
    held.wait(10)
    with notices.collected() as said:
        summary = batch.run_batch(batch.Plan(scenes), process, is_complete=lambda p: p.exists(), io_workers=0)
    holder.join()
    assert said == [f"waiting for a: another running batch holds {out / '.a.tif.lock'}"]  # not silent
    statuses = {r.scene: (r.status, r.reason) for r in summary.results}
    assert fused == (["b"] if holder_places_it else ["b", "a"])
    assert statuses["a"] == (("skipped", "output complete") if holder_places_it else ("done", None))
    assert summary.exit_code == 0 and len(summary.results) == 2


def test_a_scene_held_past_the_lock_timeout_fails(tmp_path: Path) -> None:
    """A holder that hangs or is stopped (SIGSTOP, a suspended job) kept a waiting batch forever
    (reviewer); --lock-timeout bounds the wait: the scene then fails, saying why, and the rest is done."""
    out = tmp_path / "out"
    out.mkdir()
    scenes = [batch.Scene(n, tmp_path / "p.tif", tmp_path / "m.tif", out / f"{n}.tif") for n in "ab"]
    held, release = threading.Event(), threading.Event()

    def other_run() -> None:
        with batch.scene_lock(scenes[0].out):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=other_run)
    holder.start()
    held.wait(10)
    try:
        with notices.collected():
            summary = batch.run_batch(
                batch.Plan(scenes), lambda sc: {}, is_complete=lambda p: p.exists(), io_workers=0,
                lock_timeout=0.5,
            )  # fmt: skip
    finally:
        release.set()
        holder.join()
    statuses = {r.scene: (r.status, r.reason) for r in summary.results}
    assert statuses["b"] == ("done", None) and statuses["a"][0] == "failed", statuses
    assert "still held it after 0.5 s (--lock-timeout)" in statuses["a"][1] and summary.exit_code == 1


def test_ctrl_c_while_taking_a_scene_lock_leaves_no_lock_file(tmp_path: Path, monkeypatch) -> None:
    """SIGINT lands just after the lock file is created and locked, before the scene starts (the
    moment a batch moves to its next scene): the file must still go."""
    out = tmp_path / "s_fused.tif"
    real = locking._try_flock

    def interrupted(*args: object) -> bool | None:
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(locking, "_try_flock", interrupted)
    with pytest.raises(KeyboardInterrupt), batch.scene_lock(out):
        pass
    assert hidden_files(tmp_path) == []


def test_ctrl_c_surfacing_as_a_cleanup_error_still_stops_the_batch(tmp_path: Path) -> None:
    """Ctrl-C inside rasterio's nested environments can leave GDAL's environment stack broken, and
    the next `Env.__exit__` on the way out raises EnvError instead: that scene was interrupted, not
    failed, so the batch stops with exit 130 rather than logging a failure and going on."""
    from rasterio.errors import EnvError

    out = tmp_path / "out"
    scenes = [batch.Scene(n, tmp_path / "p.tif", tmp_path / "m.tif", out / f"{n}.tif") for n in "ab"]
    seen: list[str] = []

    def process(sc: batch.Scene) -> dict:
        seen.append(sc.id)
        try:
            raise KeyboardInterrupt
        finally:
            raise EnvError("No GDAL environment exists")  # noqa: B012 - what the cleanup did

    summary = batch.run_batch(batch.Plan(scenes), process, io_workers=0)
    assert (seen, summary.interrupted, summary.exit_code, summary.failed) == (["a"], True, 130, 0)
    assert hidden_files(out) == []  # the scene's lock went with it


def test_interrupted_runs_resume_with_only_valid_outputs(tmp_path: Path) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    ids = [2, 8, 14, 20, 26]
    # five 320 x 600 PAN px crops of the example, without georeferencing (interrupting a run does
    # not depend on the scene)
    for k in ids:
        write_example_crop(in_dir, f"s{k}", rasterio.windows.Window(k, 0, 300, 160), georef=False)
    args = ["batch", str(in_dir), str(out_dir), "--method", "exp", "--tile", "128", "--json"]
    outputs = [out_dir / f"s{k}_fused.tif" for k in ids]

    def n_complete() -> int:
        return sum(is_complete_output(o) for o in outputs)

    def run_until_one_more_output(sig: int) -> tuple[subprocess.Popen, str]:
        before = n_complete()
        proc = popen_cli(*args)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and n_complete() <= before:
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        return proc, err[-2000:]

    # Ctrl-C: the run stops cleanly (exit 130), the scene being fused leaves no partial file.
    proc, err = run_until_one_more_output(signal.SIGINT)
    assert proc.returncode == 130, err
    assert hidden_files(out_dir) == [], err
    # SIGKILL: nothing can clean up; the next run must.
    proc, err = run_until_one_more_output(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, err
    present = [o for o in outputs if o.exists()]
    assert 0 < len(present) < len(outputs), "the run finished before it could be killed"
    assert all(is_complete_output(o) for o in present)  # never a half-written file under a final name

    res = run_cli(*args, check_rc=0)
    summary = json.loads(res.stdout)
    assert (summary["skipped"], summary["done"]) == (len(present), len(outputs) - len(present))
    assert all(is_complete_output(o) for o in outputs)
    assert hidden_files(out_dir) == []  # the killed run's temporary and lock files are gone


def test_scenes_in_flight_together_give_the_same_outputs(mixed: dict, tmp_path: Path) -> None:
    """Two scenes at once through one processor (one fuser per ratio) and read-ahead threads."""
    from fusion_cli.pipeline import FuseOptions

    plan = batch.pair_by_patterns(mixed["in"], tmp_path / "out")
    two = [mixed["good"][0], mixed["good"][2]]  # ratio 2 and ratio 4
    plan.scenes = [sc for sc in plan.scenes if sc.id in (*two, "text")]
    job = batch.FuseJob(fuser={"method": "exp", "device": "cpu"}, options=FuseOptions())
    summary = batch.run_batch(plan, batch.make_scene_processor(job), scene_workers=2, io_workers=2)
    assert sorted(r.scene for r in summary.results if r.status == "done") == sorted(two)
    assert (summary.failed, summary.exit_code) == (2, 1)  # "text" and the unpaired file
    for name in two:
        with rasterio.open(tmp_path / "out" / f"{name}_fused.tif") as a:
            with rasterio.open(mixed["out"] / f"{name}_fused.tif") as b:
                np.testing.assert_array_equal(a.read(), b.read())


def test_scene_workers_give_pansharpens_products_for_every_classical_method(tmp_path: Path) -> None:
    """A scene in a `--scene-workers` thread runs its windows on torch's threads, not one per thread
    as the main thread does; BDSD-PC's float32 band mixing rounded by the thread count, so 42 of the
    example's 1,223,046 DN differed by 1 from `fusion pansharpen` (the README says bit for bit)."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    for sid in ("a", "b"):
        (in_dir / f"{sid}_pan.tif").symlink_to(EXAMPLE_PAN)
        (in_dir / f"{sid}_ms.tif").symlink_to(EXAMPLE_MS)
    for method in ("bdsd-pc", "gsa", "mtf-glp-hs"):
        out = tmp_path / method
        run_cli("batch", str(in_dir), str(out), "--method", method, "--scene-workers", "2", "-q", check_rc=0)
        alone = tmp_path / f"{method}.tif"
        run_cli(
            "pansharpen", str(EXAMPLE_PAN), str(EXAMPLE_MS), "-o", str(alone), "--method", method, check_rc=0
        )
        with rasterio.open(alone) as ref:
            expected = ref.read()
        for sid in ("a", "b"):
            with rasterio.open(out / f"{sid}_fused.tif") as ds:
                np.testing.assert_array_equal(ds.read(), expected, err_msg=f"{method} scene {sid}")


def dying_factory(job: batch.FuseJob) -> batch.SceneProcessor:
    """A processor whose worker process dies on every scene, as under the kernel's OOM killer."""

    def process(scene: batch.Scene) -> dict:
        os._exit(3)

    return process


def assert_same_up_to_blas_rounding(remote: np.ndarray, local: np.ndarray) -> None:
    """Dask workers start with OMP_NUM_THREADS = MKL_NUM_THREADS = OPENBLAS_NUM_THREADS = 1
    (`distributed.nanny.pre-spawn-environ`) while this process uses every core, and a BLAS may sum a
    float32 product in another order, or with another kernel, for another thread count: on some
    CPUs a value lands on the other side of a rounding boundary (2 of 1,440,000 WV2 values by 1 DN
    were seen; the MS re-placement's float32 GEMM in numpy's OpenBLAS changed 55 of the example
    scene's 1,223,046 under OPENBLAS/OMP_NUM_THREADS=1 until it ran in float64). So: at most 1 DN
    apart, on at most 1 value in 100,000; anything more is a real difference between the two paths."""
    diff = np.abs(remote.astype(np.int64) - local.astype(np.int64))
    assert diff.max() <= 1, f"outputs differ by up to {diff.max()} DN"
    assert np.count_nonzero(diff) <= max(1, local.size // 100_000), f"{np.count_nonzero(diff)} values differ"


def test_dask_cluster_gives_the_local_outputs(mixed: dict, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    import dask

    from fusion_cli.batch_dask import run_batch_dask

    out_dir, log = tmp_path / "out", tmp_path / "log.jsonl"
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),  # one death is enough here
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as lc,
        distributed.Client(lc) as client,
    ):
        client.wait_for_workers(2)
        args = ["batch", str(mixed["in"]), str(out_dir), "--method", "exp", "--dask", lc.scheduler_address]
        res = run_cli(*args, "--json", "--log", str(log))
        # A scene that kills its worker is a failed scene with a reason, not a hung or crashed batch.
        pan, ms = mixed["in"] / f"{mixed['good'][0]}_pan.tif", mixed["in"] / f"{mixed['good'][0]}_ms.tif"
        plan = batch.Plan([batch.Scene("boom", pan, ms, tmp_path / "boom.tif")])
        job = batch.FuseJob(fuser={"method": "exp"}, options=None)
        died = run_batch_dask(plan, job, client, factory=dying_factory)
    assert died.exit_code == 1 and "KilledWorker" in (died.results[0].reason or "")
    assert not (tmp_path / "boom.tif").exists()
    assert res.returncode == 1, res.stderr[-3000:]
    local = {r["scene"]: r for r in json.loads(mixed["res"].stdout)["scenes"]}
    remote = {r["scene"]: r for r in json.loads(res.stdout)["scenes"]}
    assert {k: r["status"] for k, r in remote.items()} == {k: r["status"] for k, r in local.items()}
    assert {k: r["reason"] for k, r in remote.items()} == {k: r["reason"] for k, r in local.items()}
    # The scenes ran in the worker processes, each with its own fuser, not in this one.
    workers = {r["worker"] for r in remote.values() if r["status"] == "done"}
    assert workers and all(not w.endswith(f":{os.getpid()}") for w in workers)
    for name in mixed["good"]:
        with (
            rasterio.open(out_dir / f"{name}_fused.tif") as a,
            rasterio.open(mixed["out"] / f"{name}_fused.tif") as b,
        ):
            assert_same_up_to_blas_rounding(a.read(), b.read())
            assert (a.profile, a.transform, a.crs) == (b.profile, b.transform, b.crs)
    assert len(log.read_text().splitlines()) == len(mixed["good"]) + len(BAD)


def test_batch_passes_creation_options(tmp_path: Path, landsat_demo: dict[str, Path]) -> None:
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    for role in ("pan", "ms"):
        shutil.copy(landsat_demo[role], in_dir / f"l8_{role}.tif")
    out_dir = tmp_path / "out"
    co = ["--co", "BLOCKXSIZE=128", "--co", "BLOCKYSIZE=128"]
    run_cli("batch", str(in_dir), str(out_dir), "--method", "gsa", "--quiet", *co, check_rc=0)
    with rasterio.open(out_dir / "l8_fused.tif") as ds:
        assert ds.block_shapes[0] == (128, 128)


def test_a_dask_worker_reuses_a_processor_only_for_the_same_options() -> None:
    """A Dask worker caches its scene processor between batches: keyed by the fuser alone, a second
    batch on the same cluster ran with the first one's --dtype, --cog, --quicklook and --metrics."""
    from fusion_cli.batch_dask import worker_processor
    from fusion_cli.pipeline import FuseOptions

    built: list[batch.FuseJob] = []

    def factory(job: batch.FuseJob) -> batch.SceneProcessor:
        built.append(job)
        return lambda scene: {}

    def job(**kw: object) -> batch.FuseJob:
        metrics = bool(kw.pop("metrics", False))
        return batch.FuseJob(fuser={"method": "exp"}, options=FuseOptions(**kw), metrics=metrics)

    first = worker_processor(job(), factory)
    assert worker_processor(job(), factory) is first and len(built) == 1
    for other in (job(out_dtype="float32"), job(cog=True), job(quicklook=True), job(metrics=True)):
        assert worker_processor(other, factory) is not first
    assert len(built) == 5 and built[1].options.out_dtype == "float32" and built[4].metrics


def test_manifest_and_scheduler_file_mistakes_are_one_line_errors(mixed: dict, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    pan = next(mixed["in"].glob("*_pan.tif"))
    manifest.write_text(f"pan,ms\n{pan.name},{pan.name.replace('_pan', '_ms')}\n")
    # a row without an 'out' whose --out-pattern leaves OUT_DIR: was a KeyError traceback, then a
    # failed scene; the pattern itself is refused now, once
    res = run_cli("batch", str(mixed["in"]), str(tmp_path / "o"), "--manifest", str(manifest),
                  "--method", "exp", "--out-pattern", "../{stem}.tif", "--json")  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "--out-pattern" in res.stderr and "OUT_DIR" in res.stderr
    not_a_scheduler = tmp_path / "sched.json"
    not_a_scheduler.write_text("{}")
    res = run_cli(
        "batch", str(mixed["in"]), str(tmp_path / "o"), "--method", "exp", "--dask", str(not_a_scheduler)
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("Error: --dask") and "scheduler file" in res.stderr


def test_dask_bad_invocations_are_refused_before_any_task(mixed: dict, tmp_path: Path) -> None:
    """With --dask an unknown model or an OUT_DIR that is a file failed every scene on the workers
    (exit 1, each logged, a retrying job scheduler retried); as without --dask, it is exit 2 now,
    before the cluster is asked (none listens at this address) and before anything is written."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    log = tmp_path / "log.jsonl"
    for out, extra, words in (
        (tmp_path / "o", ["--model", "nosuchmodel"], "unknown model"),
        (a_file, ["--method", "exp"], "is a file"),
    ):
        res = run_cli(
            "batch", str(mixed["in"]), str(out), *extra, "--dask", "tcp://127.0.0.1:9", "--log", str(log)
        )
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert words in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists() and not log.exists() and a_file.read_text() == "x"


def test_manifest_errors_name_the_file_line(mixed: dict, tmp_path: Path) -> None:
    """Line numbers counted parsed rows: with a BOM and blank lines an empty row on line 6 was
    reported as line 4."""
    pan = next(mixed["in"].glob("*_pan.tif"))
    manifest = tmp_path / "m.csv"
    ms = pan.name.replace("_pan", "_ms")
    manifest.write_bytes(f"\ufeffpan,ms\n\n{pan.name},{ms}\n\n{pan.name},{ms}\n,\n".encode())
    res = run_cli(
        "batch", str(mixed["in"]), str(tmp_path / "o"), "--manifest", str(manifest), "--method", "exp"
    )
    assert res.returncode == 2 and "line 6: empty 'pan' or 'ms'" in res.stderr, res.stderr


def test_batch_metrics_are_those_of_fusion_metrics(tmp_path: Path) -> None:
    """batch --metrics cropped product, PAN and MS from their top-left corners, but a Landsat product
    lacks the half-covered first PAN row and column: pixels one PAN pixel apart were compared (HPC
    0.024 instead of 0.948, HQNR 0.770 instead of 0.838 for GSA on the example scene), and a product
    fused with --bands was compared with the MS in file order. It now reads and lines them up as
    `fusion metrics` does."""
    from conftest import EXAMPLES

    from fusion_cli.assess import evaluate

    src = tmp_path / "in"
    src.mkdir()
    (src / "a_PAN.tif").symlink_to(EXAMPLES / "landsat8_pan.tif")
    (src / "a_MS.tif").symlink_to(EXAMPLES / "landsat8_ms.tif")
    got = {}
    for name, extra in (("natural", []), ("reordered", ["--bands", "3,2,1,4,5,6"])):
        out_dir = tmp_path / name
        args = ["batch", str(src), str(out_dir), "--method", "gsa", "--sensor", "landsat8", "--metrics"]
        run_cli(*args, *extra, check_rc=0)
        got[name] = json.loads((out_dir / "a_fused.tif.metrics.json").read_text())["metrics"]
    want = evaluate(tmp_path / "natural" / "a_fused.tif")  # its tags name the PAN and MS
    for key in ("D_lambda", "D_s", "QNR", "HQNR", "HPC"):
        assert got["natural"][key] == pytest.approx(want[key], rel=1e-9), key
        assert got["reordered"][key] == pytest.approx(want[key], rel=1e-4), key
    assert got["natural"]["HPC"] > 0.9 and got["natural"]["ratio"] == 2


def test_ctrl_c_with_scenes_in_flight_logs_the_ones_that_finish(tmp_path: Path) -> None:
    """With two scenes in flight, Ctrl-C lets the running two finish in their threads: both are in the
    log and the summary as done (they were missing, though their products were written), and the
    scenes not started never run."""
    out = tmp_path / "out"
    scenes = [batch.Scene(n, tmp_path / "p.tif", tmp_path / "m.tif", out / f"{n}.tif") for n in "abcd"]
    both_running = threading.Barrier(2)
    seen: list[str] = []

    def process(sc: batch.Scene) -> dict:
        seen.append(sc.id)
        both_running.wait(timeout=30)
        if sc.id == "a":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches the main thread, waiting on both
        time.sleep(0.5)
        return {"fused": sc.id}

    log = tmp_path / "batch.jsonl"
    summary = batch.run_batch(batch.Plan(scenes), process, scene_workers=2, io_workers=0, log=log)
    assert sorted(seen) == ["a", "b"]
    assert (summary.interrupted, summary.exit_code) == (True, 130)
    assert sorted((r.scene, r.status) for r in summary.results) == [("a", "done"), ("b", "done")]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted((r["scene"], r["status"], r["details"]["fused"]) for r in rows) == [
        ("a", "done", "a"),
        ("b", "done", "b"),
    ]


def test_an_interrupt_between_finished_scenes_rows_loses_none(tmp_path: Path, monkeypatch) -> None:
    """Two scenes in flight finish together; Ctrl-C lands after the first one's row: the second,
    finished and written, was left out of the log and the summary (seen once on a loaded machine)."""
    from concurrent import futures

    from fusion_cli.batch import execution

    # `wait` hands both back finished, as it does when both end before the main thread looks
    monkeypatch.setattr(execution, "wait", lambda fs, return_when: futures.wait(fs))
    out = tmp_path / "out"
    scenes = [batch.Scene(n, tmp_path / "p.tif", tmp_path / "m.tif", out / f"{n}.tif") for n in "abcd"]
    rows: list[str] = []

    def on_result(r: batch.SceneResult) -> None:
        rows.append(r.scene)
        if len(rows) == 1:
            raise KeyboardInterrupt

    log = tmp_path / "batch.jsonl"
    summary = batch.run_batch(
        batch.Plan(scenes), lambda sc: {"fused": sc.id}, scene_workers=2, io_workers=0, log=log,
        on_result=on_result,
    )  # fmt: skip
    assert summary.interrupted and sorted(r.scene for r in summary.results) == ["a", "b"]
    assert sorted(json.loads(line)["scene"] for line in log.read_text().splitlines()) == ["a", "b"]


@pytest.mark.parametrize(
    "bad",
    [
        ["--tile", "0"],
        ["--tile", "1"],
        ["--batch", "0"],
        ["--threads", "0"],
        ["--out-pattern", "../x_{stem}.tif"],
    ],
)
def test_bad_options_stop_the_batch_before_its_first_scene(tmp_path: Path, bad: list[str]) -> None:
    """These failed every scene one by one, exit 1 (a batch's scene failure), where a bad invocation is
    exit 2 by the batch's own help; --tile 1 ran for minutes on one small scene. Now refused once,
    before OUT_DIR is made."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    write_example_crop(in_dir, "s", rasterio.windows.Window(0, 0, 300, 160), georef=False)
    res = run_cli("batch", str(in_dir), str(tmp_path / "out"), "--method", "exp", *bad)
    assert res.returncode == 2 and "Error:" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_an_interrupt_while_recording_records_no_scene_twice(tmp_path: Path) -> None:
    """Ctrl-C while the batch records finished scenes: the interrupt handler went over `pending`,
    which still held futures already recorded, and logged them again (s2 twice in the summary)."""
    scenes = [
        batch.Scene(f"s{i}", tmp_path / "p.tif", tmp_path / "m.tif", tmp_path / f"o{i}.tif") for i in range(4)
    ]
    delays = {"s0": 0.05, "s1": 0.05, "s2": 0.3, "s3": 0.6}

    def process(sc: batch.Scene) -> dict:
        time.sleep(delays[sc.id])
        return {}

    seen: list[str] = []

    def on_result(r: batch.SceneResult) -> None:
        seen.append(r.scene)
        if len(seen) == 3:  # Ctrl-C arrives while the third result is being recorded
            raise KeyboardInterrupt

    summary = batch.run_batch(batch.Plan(scenes), process, scene_workers=4, io_workers=0, on_result=on_result)
    assert summary.interrupted and sorted(r.scene for r in summary.results) == ["s0", "s1", "s2", "s3"]


def test_default_model_batch_names_the_model_for_a_pair_it_cannot_fuse(tmp_path: Path) -> None:
    """`fusion batch` without --model over a folder holding a small Landsat pair and a Hyperion PAN +
    128-band HSI crop of the Paris pair (ratio 3): the Landsat scene is fused by the default model,
    the Hyperion one fails with the reason naming --model hyperion_pan (it said "the model expects
    2"), and the batch exits 1."""
    from rasterio.windows import Window

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    write_example_crop(in_dir, "landsat", Window(0, 0, 64, 64))
    for role, name, side in (("pan", "pan", 96), ("ms", "hs", 32)):
        with rasterio.open(need_shared("eo1_hyperion_ali_paris", f"{name}.tif")) as src:
            win = Window(0, 0, side, side)
            data, profile = src.read(window=win), src.profile
            profile.update(width=side, height=side, transform=src.window_transform(win))
        with rasterio.open(in_dir / f"paris_{role}.tif", "w", **profile) as dst:
            dst.write(data)
    res = run_cli("batch", str(in_dir), str(out_dir), "--json", check_rc=1)
    by_scene = {r["scene"]: r for r in json.loads(res.stdout)["scenes"]}
    assert by_scene["landsat"]["status"] == "done"
    assert by_scene["paris"]["status"] == "failed"
    assert "default model landsat fuses 6 MS bands at ratio 2" in by_scene["paris"]["reason"]
    assert "--model hyperion_pan" in by_scene["paris"]["reason"]


def test_a_product_without_its_side_files_gets_them_on_the_rerun(tmp_path: Path) -> None:
    """The quicklook and <out>.metrics.json are written after the product is placed: an interrupt in
    between left a complete product that every rerun skipped, its PNG and metrics never written.
    A rerun now writes the missing side files from the product as it is (not fused again, not
    replaced); a scene with its side files (a metrics failure included, recorded in the sidecar) is
    skipped."""
    from rasterio.windows import Window

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    write_example_crop(in_dir, "a", Window(0, 0, 64, 64))
    args = ("batch", str(in_dir), str(out_dir), "--method", "gsa", "--quicklook", "--metrics", "--json")
    first = json.loads(run_cli(*args, check_rc=0).stdout)
    assert first["done"] == 1
    png, sidecar = out_dir / "a_fused.png", out_dir / "a_fused.tif.metrics.json"
    assert png.exists() and "HQNR" in json.loads(sidecar.read_text())["metrics"]
    assert json.loads(run_cli(*args, check_rc=0).stdout)["skipped"] == 1
    product = out_dir / "a_fused.tif"
    stamp = product.stat().st_mtime_ns
    for side in (png, sidecar):
        side.unlink()  # as an interrupt after the product's rename leaves it
        again = json.loads(run_cli(*args, check_rc=0).stdout)
        assert (again["done"], again["skipped"]) == (0, 1) and png.exists() and sidecar.exists()
        assert "side files written" in again["scenes"][0]["reason"]
    assert product.stat().st_mtime_ns == stamp and "HQNR" in json.loads(sidecar.read_text())["metrics"]
    # metrics that cannot be computed (a --reproject run) are recorded as such: the rerun skips
    out2 = tmp_path / "out2"
    args2 = ("batch", str(in_dir), str(out2), "--method", "gsa", "--metrics", "--reproject", "--json")
    assert json.loads(run_cli(*args2, check_rc=0).stdout)["done"] == 1
    assert "reproject" in json.loads((out2 / "a_fused.tif.metrics.json").read_text())["metrics_error"]
    assert json.loads(run_cli(*args2, check_rc=0).stdout)["skipped"] == 1


def test_dry_run_says_what_the_run_then_does(tmp_path: Path) -> None:
    """`--dry-run` showed "complete, skip" for a product lacking its side files (the run writes
    them) and for any product under --overwrite (the run fuses it again). Each state is checked
    against what the following real run reports."""
    from rasterio.windows import Window

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for name, col in (("a", 0), ("b", 64), ("c", 128)):
        write_example_crop(in_dir, name, Window(col, 0, 64, 64))
    args = ("batch", str(in_dir), str(out_dir), "--method", "gsa", "--quicklook")

    def plan(*extra: str) -> dict[str, str]:
        res = run_cli(*args, *extra, "--dry-run", "--json", check_rc=0)
        return {s["scene"]: s["action"] for s in json.loads(res.stdout)["scenes"]}

    def run(*extra: str, rc: int = 0) -> dict[str, str]:
        res = run_cli(*args, *extra, "--json", check_rc=rc)
        return {r["scene"]: r for r in json.loads(res.stdout)["scenes"]}

    assert plan() == {"a": "fuse", "b": "fuse", "c": "fuse"}
    assert {k: r["status"] for k, r in run().items()} == {"a": "done", "b": "done", "c": "done"}
    (out_dir / "b_fused.png").unlink()  # a product placed just before an interrupt
    (out_dir / "c_fused.tif").write_bytes(b"not a product")  # a foreign file at the output path
    assert plan() == {"a": "skip", "b": "finish", "c": "refuse"}
    text = run_cli(*args, "--dry-run", check_rc=0).stdout
    assert "[complete, write its missing side files]" in text and "[complete, skip]" in text
    assert plan("--overwrite") == {"a": "redo", "b": "redo", "c": "redo"}
    results = run(rc=1)
    assert results["a"]["reason"] == "output complete" and results["a"]["status"] == "skipped"
    assert results["b"]["status"] == "skipped" and "side files written" in results["b"]["reason"]
    assert results["c"]["status"] == "failed" and "--overwrite" in results["c"]["reason"]
    assert {k: r["status"] for k, r in run("--overwrite").items()} == {"a": "done", "b": "done", "c": "done"}


def test_scenes_sharing_a_side_file_and_a_log_on_a_side_file_are_refused(tmp_path: Path) -> None:
    """Outputs `a.tif` and `a.tiff` share the quicklook `a.png`: the second scene's replaced the
    first's at exit 0. And `--log` on a scene's quicklook or metrics sidecar appended the log to it
    (the JSON stopped parsing). Both are refused before any scene, exit 2, nothing written."""
    from rasterio.windows import Window

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for name, col in (("s1", 0), ("s2", 64)):
        write_example_crop(in_dir, name, Window(col, 0, 64, 64))
    manifest = tmp_path / "m.csv"
    manifest.write_text("pan,ms,out\ns1_pan.tif,s1_ms.tif,a.tif\ns2_pan.tif,s2_ms.tif,a.tiff\n")
    args = ("batch", str(in_dir), str(out_dir), "--manifest", str(manifest), "--method", "gsa")
    res = run_cli(*args, "--quicklook", check_rc=2)
    assert "would both write" in res.stderr and "a.png" in res.stderr and not out_dir.exists()
    # without quicklooks the two do not meet; the dry run tells their actions apart (one id, "a")
    run_cli(*args, check_rc=0)
    (out_dir / "a.tiff").unlink()
    plan = json.loads(run_cli(*args, "--dry-run", "--json", check_rc=0).stdout)
    assert [s["action"] for s in plan["scenes"]] == ["skip", "fuse"]
    shutil.rmtree(out_dir)
    patterns = ("batch", str(in_dir), str(out_dir), "--method", "gsa", "--quicklook", "--metrics")
    for side in ("s1_fused.png", "s2_fused.tif.metrics.json"):
        res = run_cli(*patterns, "--log", str(out_dir / side), check_rc=2)
        assert "is a file of scene" in res.stderr and not out_dir.exists()


def test_a_rerun_asking_for_another_method_or_dtype_does_not_skip_the_old_products(tmp_path: Path) -> None:
    """A rerun into the same OUT_DIR with `--method mtf-glp --dtype float32` skipped every scene as
    "output complete" at exit 0, the products still GSA's uint16. Such a scene now fails, saying what
    made it; the same settings still skip, and --overwrite redoes it as asked."""
    from rasterio.windows import Window

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    write_example_crop(in_dir, "a", Window(0, 0, 64, 64))
    base = ("batch", str(in_dir), str(out_dir), "--json")

    def run(*extra: str, rc: int = 0) -> dict:
        return json.loads(run_cli(*base, *extra, check_rc=rc).stdout)["scenes"][0]

    assert run("--method", "gsa")["status"] == "done"
    assert run("--method", "gsa")["reason"] == "output complete"
    dry = json.loads(run_cli(*base, "--method", "mtf-glp", "--dry-run", check_rc=0).stdout)
    assert dry["scenes"][0]["action"] == "other"  # the dry run says what the run then does
    other = run("--method", "mtf-glp", rc=1)
    assert other["status"] == "failed" and "was made by gsa, not mtf-glp" in other["reason"]
    assert "--overwrite" in other["reason"]
    dtype = run("--method", "gsa", "--dtype", "float32", rc=1)
    assert "is uint16, not the --dtype float32 asked" in dtype["reason"]
    assert run("--method", "gsa", "--dtype", "uint16")["status"] == "skipped"
    assert run("--method", "mtf-glp", "--overwrite")["status"] == "done"
    with rasterio.open(out_dir / "a_fused.tif") as ds:
        assert ds.tags()["FUSION_MODEL"] == "mtf-glp"
    # an MTF method's gains come from --sensor: generic gains are not the Landsat-8 product asked for
    sensor = run("--method", "mtf-glp", "--sensor", "landsat8", rc=1)
    assert "was made with --sensor generic, not landsat8" in sensor["reason"]
    assert run("--method", "mtf-glp", "--sensor", "landsat8", "--overwrite")["status"] == "done"
    assert run("--method", "mtf-glp", "--sensor", "l8")["status"] == "skipped"  # an alias is the same


def test_a_rerun_asking_for_other_sensor_bands_does_not_skip_the_old_products(tmp_path: Path) -> None:
    """A WorldView-3 folder fused with --sensor-bands 8,...,1 (a reversed file), then run again
    without it: the products, whose MTF gains are reversed against what is asked, were skipped as
    complete. The scene now fails, naming both; the dry run says `other`; the same ask skips."""
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    with rasterio.open(need_shared("wv3_spacenet2", "ms.tif")) as src:
        profile = src.profile
        data = src.read()[::-1, :64, :64]
        profile.update(
            width=64, height=64, transform=src.window_transform(rasterio.windows.Window(0, 0, 64, 64))
        )
    with rasterio.open(in_dir / "a_ms.tif", "w", **profile) as dst:
        dst.write(data)
    crop_raster(
        need_shared("wv3_spacenet2", "pan.tif"), in_dir / "a_pan.tif", rasterio.windows.Window(0, 0, 256, 256)
    )
    base = ("batch", str(in_dir), str(out_dir), "--method", "mtf-glp", "--sensor", "wv3", "--json")
    reversed_bands = ("--sensor-bands", "8,7,6,5,4,3,2,1")

    def run(*extra: str, rc: int = 0) -> dict:
        return json.loads(run_cli(*base, *extra, check_rc=rc).stdout)["scenes"][0]

    assert run(*reversed_bands)["status"] == "done"
    assert run(*reversed_bands)["status"] == "skipped"
    dry = json.loads(run_cli(*base, "--dry-run", check_rc=0).stdout)
    assert dry["scenes"][0]["action"] == "other"
    other = run(rc=1)
    assert "was made for wv3 bands [8, 7, 6, 5, 4, 3, 2, 1], not [1, 2, 3, 4, 5, 6, 7, 8]" in other["reason"]


def test_hisr_folder_with_a_classical_method_and_pan_bands(tmp_path: Path) -> None:
    """HISR in batch (the MSI as "pan"): a classical method was built for a 1-band PAN, so every scene
    failed naming --pan-bands, which batch did not have. Each scene equals `fusion hisr`; a product
    made from other MSI bands than asked fails a rerun instead of being skipped as done."""
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    with rasterio.open(need_shared("eo1_hyperion_ali_paris", "hs_for_ms.tif")) as ds:
        ref = ds.read().astype(np.float32)
    with rasterio.open(
        in_dir / "a_HSI.tif", "w", driver="GTiff", width=24, height=24, count=128, dtype="float32"
    ) as dst:
        dst.write(ref.reshape(128, 24, 3, 24, 3).mean(axis=(2, 4)))  # the Paris HSI reduced by 3
    shutil.copy(need_shared("eo1_hyperion_ali_paris", "ms.tif"), in_dir / "a_MSI.tif")  # 9 ALI bands
    base = ("batch", str(in_dir), str(out_dir), "--pan", "*_MSI.tif", "--ms", "*_HSI.tif", "--json")
    six = ("--pan-bands", "1,2,3,4,5,6")

    def run(*extra: str, rc: int = 0) -> dict:
        return json.loads(run_cli(*base, *extra, check_rc=rc).stdout)["scenes"][0]

    for method in ("mtf-glp-hs", "gsa"):
        scene = run("--method", method, *six, "--overwrite")
        assert scene["status"] == "done", scene
        single = tmp_path / f"{method}.tif"
        hisr = ("hisr", str(in_dir / "a_HSI.tif"), str(in_dir / "a_MSI.tif"), "-o", str(single))
        run_cli(*hisr, "--method", method, *six, "-q", check_rc=0)
        with rasterio.open(out_dir / "a_fused.tif") as a, rasterio.open(single) as b:
            assert a.count == 128 and np.array_equal(a.read(), b.read())
    assert run("--method", "gsa", *six)["status"] == "skipped"
    other = run("--method", "gsa", rc=1)
    assert "was made from PAN bands [1, 2, 3, 4, 5, 6], not [1, 2, 3, 4, 5, 6, 7, 8, 9]" in other["reason"]
    assert run("--method", "gsa", "--overwrite")["status"] == "done"  # all nine: fuses now


def test_a_rerun_asking_for_another_ms_phase_does_not_skip_the_old_products(tmp_path: Path) -> None:
    """Products placed in the toolbox's phase are not what --ms-phase geometric asks for (their MS
    content sits half a PAN pixel off): the scene fails, naming both, until --overwrite redoes it."""
    from rasterio.windows import Window

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    write_example_crop(in_dir, "a", Window(0, 0, 64, 64))
    base = ("batch", str(in_dir), str(out_dir), "--method", "gsa", "--json")

    def run(*extra: str, rc: int = 0) -> dict:
        return json.loads(run_cli(*base, *extra, check_rc=rc).stdout)["scenes"][0]

    assert run()["status"] == "done"
    assert run("--ms-phase", "toolbox")["status"] == "skipped"
    assert "was made with --ms-phase toolbox, not geometric" in run("--ms-phase", "geometric", rc=1)["reason"]
    assert run("--ms-phase", "geometric", "--overwrite")["status"] == "done"
    assert run("--ms-phase", "geometric")["status"] == "skipped"


def test_a_rerun_over_products_of_other_inputs_or_options_does_not_skip_them(tmp_path: Path) -> None:
    """Only model, sensor, --dtype, PAN bands and --ms-phase were compared: an OUT_DIR holding another
    folder's products (same stems), an input rewritten since, or a rerun with --bands 3,2,1 or --cog
    skipped every scene as "output complete" at exit 0, the old products left in place. A product
    records its inputs' fingerprints and content options (FUSION_REQUEST); such a scene fails, saying
    what differs. A copy of the same inputs elsewhere still skips (the fingerprint is the content)."""
    from rasterio.windows import Window

    in_dir, other_dir, out_dir = tmp_path / "in", tmp_path / "other", tmp_path / "out"
    in_dir.mkdir()
    other_dir.mkdir()
    write_example_crop(in_dir, "a", Window(0, 0, 64, 64))
    write_example_crop(other_dir, "a", Window(64, 0, 64, 64))  # same stem, other pixels

    def run(folder: Path, *extra: str, rc: int = 0) -> dict:
        args = ("batch", str(folder), str(out_dir), "--method", "gsa", "--json", *extra)
        return json.loads(run_cli(*args, check_rc=rc).stdout)["scenes"][0]

    assert run(in_dir)["status"] == "done"
    copied = tmp_path / "copied"
    shutil.copytree(in_dir, copied)  # moved or copied inputs are the same inputs
    assert run(copied)["reason"] == "output complete"
    foreign = run(other_dir, rc=1)
    assert "was made from another PAN" in foreign["reason"] and str(in_dir / "a_pan.tif") in foreign["reason"]
    bands = run(in_dir, "--bands", "3,2,1", rc=1)
    assert "was made from MS bands [1, 2, 3, 4, 5, 6], not [3, 2, 1]" in bands["reason"], bands
    assert run(in_dir, "--bands", "1,2,3,4,5,6")["status"] == "skipped"  # all of them: what was made
    assert "was made with --cog off, and this run has on" in run(in_dir, "--cog", rc=1)["reason"]
    # storage and the ceiling as it resolves do not make another product (reviewer: these failed)
    for same in (
        ("--compress", "zstd"),
        ("--co", "NUM_THREADS=2"),
        ("--dn-max", "65535"),
        ("--stats-mpx", "4"),
    ):
        assert run(in_dir, *same)["reason"] == "output complete", same
    clipped = run(in_dir, "--dn-max", "4000", rc=1)["reason"]
    assert "was clipped to DN 65535, and this run clips to 4000" in clipped, clipped
    # a float32 product of the uint16 MS is clipped to the MS type's range: 65535 asks the same
    wide = ("--dtype", "float32", "--overwrite")
    assert run(in_dir, *wide)["status"] == "done"
    assert run(in_dir, "--dtype", "float32", "--dn-max", "65535")["reason"] == "output complete"
    assert run(in_dir, "--bands", "3,2,1", "--overwrite")["status"] == "done"
    assert run(in_dir, "--bands", "3,2,1")["status"] == "skipped"
    with rasterio.open(out_dir / "a_fused.tif") as ds:
        assert ds.count == 3
    write_example_crop(in_dir, "a", Window(0, 64, 64, 64))  # rewritten in place since
    assert "or the file changed since" in run(in_dir, "--bands", "3,2,1", rc=1)["reason"]
    # one byte changed in place, same size (reviewer: a sampled hash missed it), against a copy
    from fusion_cli import raster

    pan = in_dir / "a_pan.tif"
    made = raster.file_fingerprint(pan)
    shutil.copy(pan, tmp_path / "copy.tif")  # another time stamp, the same bytes
    assert raster.same_input(made, tmp_path / "copy.tif") is True
    assert raster.same_input({"size": made["size"], "sample_sha256": "0"}, pan) is None  # another form
    edited = bytearray(pan.read_bytes())
    edited[len(edited) // 2] ^= 1
    pan.write_bytes(bytes(edited))
    assert raster.same_input(made, pan) is False


def test_a_redo_removes_the_old_products_side_files_it_does_not_rewrite(tmp_path: Path) -> None:
    """`--metrics --quicklook`, then `--method brovey --overwrite` without them: the GSA quicklook and
    metrics sidecar stayed beside the brovey product, and a later `--metrics --quicklook` run skipped
    the scene as complete with GSA's QNR in the sidecar. The redo removes them; the next run writes
    the brovey product's."""
    from rasterio.windows import Window

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    write_example_crop(in_dir, "a", Window(0, 0, 64, 64))
    base = ("batch", str(in_dir), str(out_dir), "--json")
    sides = (out_dir / "a_fused.png", out_dir / "a_fused.tif.metrics.json")

    def run(*extra: str) -> dict:
        return json.loads(run_cli(*base, *extra, check_rc=0).stdout)["scenes"][0]

    assert run("--method", "gsa", "--metrics", "--quicklook")["status"] == "done"
    gsa_metrics = json.loads(sides[1].read_text())
    assert run("--method", "brovey", "--overwrite")["status"] == "done"
    assert not any(side.exists() for side in sides)
    finished = run("--method", "brovey", "--metrics", "--quicklook")
    assert finished["reason"] == "output complete; its missing side files written", finished
    assert all(side.exists() for side in sides)
    assert json.loads(sides[1].read_text()) != gsa_metrics


def test_metrics_out_of_memory_does_not_fail_a_finished_scene(tmp_path: Path, monkeypatch) -> None:
    """`--metrics` reads the images whole: torch's "can't allocate memory" (a RuntimeError) escaped
    the metrics step and failed a scene whose product was complete; it is the scene's metrics_error."""
    from rasterio.windows import Window

    from fusion_cli.batch import fusion as batch_fusion

    def scene_metrics(*args: object, **kwargs: object) -> dict:
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 9071969760 bytes"
        )

    monkeypatch.setattr(batch_fusion, "scene_metrics", scene_metrics)
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    write_example_crop(in_dir, "a", Window(0, 0, 64, 64))
    res = run_cli("batch", str(in_dir), str(out_dir), "--method", "gsa", "--metrics", "--json", check_rc=0)
    scene = json.loads(res.stdout)["scenes"][0]
    assert scene["status"] == "done" and scene["details"]["metrics_error"].startswith("out of memory: ")
    sidecar = json.loads((out_dir / "a_fused.tif.metrics.json").read_text())
    assert sidecar["metrics_error"] == scene["details"]["metrics_error"]


def test_a_rerun_into_the_input_folder_does_not_take_its_products_for_inputs(tmp_path: Path) -> None:
    """OUT_DIR = IN_DIR with `--out-pattern '{stem}_fused_ms.tif'`: the rerun took the first run's
    products for MS files (they match `*_ms.tif`) without a PAN and failed them, exit 1."""
    from rasterio.windows import Window

    folder = tmp_path / "in"
    folder.mkdir()
    write_example_crop(folder, "a", Window(0, 0, 64, 64))
    args = ("batch", str(folder), str(folder), "--method", "gsa", "--out-pattern", "{stem}_fused_ms.tif")
    first = json.loads(run_cli(*args, "--json", check_rc=0).stdout)
    assert first["done"] == 1 and (folder / "a_fused_ms.tif").exists()
    again = json.loads(run_cli(*args, "--json", check_rc=0).stdout)
    assert (again["done"], again["skipped"], again["failed"]) == (0, 1, 0)
    (folder / "b_fused_ms.tif").write_bytes(b"not a product")  # not ours: still reported as unpaired
    res = json.loads(run_cli(*args, "--json", check_rc=1).stdout)
    assert res["failed"] == 1 and any("b_fused" in s["scene"] or "b_fused" in str(s) for s in res["scenes"])


def test_a_product_named_like_an_input_is_not_taken_for_one(tmp_path: Path) -> None:
    """`batch in in --out-pattern '{stem}_PAN.tif'` wrote a_PAN.tif beside a_pan.tif; every later batch
    of that folder into another one failed the scene as ambiguous (helper). A complete product of this
    tool in an ambiguous group is not an input: the scene pairs its real PAN and MS."""
    from rasterio.windows import Window

    folder = tmp_path / "in"
    folder.mkdir()
    pan, _ = write_example_crop(folder, "a", Window(0, 0, 64, 64))
    run_cli(
        "batch", str(folder), str(folder), "--method", "gsa", "--out-pattern", "{stem}_PAN.tif", check_rc=0
    )
    assert (folder / "a_PAN.tif").exists()
    res = json.loads(
        run_cli("batch", str(folder), str(tmp_path / "out"), "--method", "gsa", "--json", check_rc=0).stdout
    )
    assert (res["done"], res["failed"]) == (1, 0)
    with rasterio.open(tmp_path / "out" / "a_fused.tif") as ds:
        assert Path(ds.tags()["FUSION_PAN"]).name == pan.name


def test_a_metrics_sidecar_linked_while_fusing_is_not_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`<out>.metrics.json` was checked for a symlink only before the scene was fused: a link made
    meanwhile (here to the scene's own PAN) was written through and replaced the input with JSON at
    exit 0. The sidecar is checked again when it is written; the input is untouched."""
    from rasterio.windows import Window

    from fusion_cli import pipeline

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    pan, _ = write_example_crop(in_dir, "a", Window(0, 0, 64, 64))
    before = pan.read_bytes()
    real = pipeline.fuse_files

    def fuse_then_link(pan_path, ms_path, out, *args, **kwargs):
        summary = real(pan_path, ms_path, out, *args, **kwargs)
        Path(str(out) + ".metrics.json").symlink_to(Path(pan_path).resolve())
        return summary

    monkeypatch.setattr(pipeline, "fuse_files", fuse_then_link)
    res = run_cli("batch", str(in_dir), str(out_dir), "--method", "gsa", "--metrics", "--json")
    (scene,) = json.loads(res.stdout)["scenes"]
    assert pan.read_bytes() == before
    assert "symlink" in (scene.get("reason") or scene["details"].get("metrics_error", ""))


def test_batch_fails_only_the_scene_whose_pan_and_ms_differ_in_scale_offset(tmp_path: Path) -> None:
    """One refusal for pansharpen and batch (`fuse_files`): the scene whose PAN is stored with another
    offset fails with the reason; the other, both in Collection-2 DN, is fused and keeps their
    scale, offset and unit."""
    d = tmp_path / "in"
    d.mkdir()
    c2 = {"scales": [2.75e-05], "offsets": [-0.2], "units": ["reflectance"]}
    for stem in ("c2", "mixed"):
        pan, ms = write_example_crop(d, stem, rasterio.windows.Window(0, 0, 64, 64))
        restamp(ms, ms, **{k: v * 6 for k, v in c2.items()})  # its 6 bands
        restamp(pan, pan, **(c2 if stem == "c2" else {"offsets": [5000.0]}))
    res = run_cli("batch", str(d), str(tmp_path / "out"), "--method", "gsa", "--json", check_rc=1)
    by_scene = {r["scene"]: r for r in json.loads(res.stdout)["scenes"]}
    assert by_scene["c2"]["status"] == "done" and by_scene["mixed"]["status"] == "failed"
    assert (
        "store their values with different scale/offset (PAN 1 / 5000, MS 2.75e-05 / -0.2)"
        in (by_scene["mixed"]["reason"])
    )
    with rasterio.open(by_scene["c2"]["out"]) as ds:
        assert ds.scales == (2.75e-05,) * 6 and ds.offsets == (-0.2,) * 6 and ds.units == ("reflectance",) * 6
