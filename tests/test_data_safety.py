"""The data-safety catalogue of issue 17: each probe that once gave exit 0 with a corrupt or silently
wrong product, a traceback, or a file touched outside the output folder, kept as a test.

Everything here is tiny synthetic GeoTIFFs and the classical `gsa` / `exp` methods: the whole file
runs in seconds of CPU. Limits (`ulimit -f`) and signals need a real process, so those cases run
the CLI in a subprocess; the others call it in-process.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import need_shared
from rasterio.transform import from_origin

from fusion_cli import batch, raster
from fusion_cli.errors import FusionError, OutputWriteError
from fusion_cli.evaluate import scene_folder

CRS = "EPSG:32631"
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Helpers


def write_tif(path: Path, data: np.ndarray, pixel: float = 1.0, **profile: object) -> Path:
    """A georeferenced GeoTIFF of `(C, H, W)` `data` with pixel size `pixel` (m), origin (0, 0)."""
    c, h, w = data.shape
    base = {"driver": "GTiff", "width": w, "height": h, "count": c, "dtype": str(data.dtype)}
    base.update(crs=CRS, transform=from_origin(500000, 0, pixel, pixel))
    with rasterio.open(path, "w", **{**base, **profile}) as dst:
        dst.write(data)
    return path


def make_pair(
    folder: Path, n: int = 64, dtype: str = "uint16", stem: str = "", noise: bool = False
) -> tuple[Path, Path]:
    """A ratio-4 PAN/MS pair of side `n` (PAN px): smooth content, or incompressible noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:n, 0:n] / n
    pan = 400 + 300 * np.sin(6 * yy) * np.cos(5 * xx) + (rng.random((n, n)) * 600 if noise else 0)
    ms = np.stack([pan[2::4, 2::4] * (0.8 + 0.1 * b) for b in range(4)])
    pan_p = write_tif(folder / f"{stem}pan.tif", pan[None].astype(dtype), 1.0)
    ms_p = write_tif(folder / f"{stem}ms.tif", ms.astype(dtype), 4.0)
    return pan_p, ms_p


def cli(*args: str | Path) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    from fusion_cli.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main([str(a) for a in args])
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return rc, out.getvalue(), err.getvalue()


def cli_process(
    *args: str | Path, fsize: int | None = None, vmem: int | None = None, files: int | None = None
) -> subprocess.Popen:
    """The CLI in a child process, optionally under a file-size limit (`ulimit -f`, bytes), an
    address-space limit (`ulimit -v`, bytes) or an open-files limit (`ulimit -n`)."""

    def limit() -> None:
        for kind, value in (
            (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_AS, vmem), (resource.RLIMIT_NOFILE, files)
        ):  # fmt: skip
            if value is not None:
                resource.setrlimit(kind, (value, value))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", "from fusion_cli.cli.main import main; main()", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
        env=env,
        cwd=REPO,
    )


def error_line(rc: int, err: str, code: int, *words: str) -> str:
    """The last non-empty stderr line, checked: exit `code`, `Error: ...` holding `words`, no traceback."""
    assert rc == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("Error: "), err[-3000:]
    for w in words:
        assert w.lower() in lines[-1].lower(), lines[-1]
    return lines[-1]


def one_line_error(rc: int, err: str, *words: str) -> None:
    """Bad input: exit 2 and exactly one `Error:` line."""
    error_line(rc, err, 2, *words)
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return make_pair(tmp_path)


@pytest.fixture
def fused(tmp_path: Path, pair: tuple[Path, Path]) -> tuple[Path, Path, Path]:
    """The pair and its EXP product `o.tif`, for the commands that score or report a product."""
    pan, ms = pair
    out = tmp_path / "o.tif"
    assert cli("pansharpen", pan, ms, "-o", out, "--method", "exp", "-q")[0] == 0
    return pan, ms, out


# ---------------------------------------------------------------------------------------------
# 1. Write errors are errors


@pytest.mark.parametrize("cog", [False, True], ids=["gtiff", "cog"])
def test_file_size_limit_is_an_error_not_a_corrupt_product(tmp_path: Path, cog: bool) -> None:
    pan, ms = make_pair(tmp_path, n=512, noise=True)  # ~2 MB of incompressible product
    out = tmp_path / "out" / "x.tif"
    out.parent.mkdir()
    args = ["pansharpen", pan, ms, "-o", out, "--method", "gsa", "--json", *(["--cog"] if cog else [])]
    proc = cli_process(*args, fsize=256 << 10)
    stdout, stderr = proc.communicate(timeout=300)
    line = error_line(proc.returncode, stderr, 1, str(out))
    assert "fail" in line
    # libtiff's own per-block complaints do not reach the terminal: one line, ours
    assert [ln for ln in stderr.splitlines() if ln.strip()] == [line], stderr[-3000:]
    # no JSON summary of a product that does not exist: the error, as --json gives every failure
    assert json.loads(stdout) == {"error": line[len("Error: ") :], "exit_code": 1, "warnings": []}
    assert not out.exists() and hidden(out.parent) == []


def test_cog_overviews_cut_short_by_a_full_disk_are_an_error(tmp_path: Path) -> None:
    """A size limit that the full-resolution temporary fits under but its overviews do not: GDAL
    only printed the failed overview writes, the unwritten (sparse, zero) overview blocks were copied
    into the COG, and the product passed as complete at exit 0 (on a Landsat-8 crop: overviews 96 to
    100 % zeros). Now exit 1, naming the missing overview block, and nothing left behind."""
    pan, ms = make_pair(tmp_path, n=1024, noise=True)
    plain = tmp_path / "plain.tif"
    rc, _, err = cli("pansharpen", pan, ms, "-o", plain, "--method", "gsa", "-q")
    assert rc == 0, err
    out = tmp_path / "out" / "x.tif"
    out.parent.mkdir()
    proc = cli_process("pansharpen", pan, ms, "-o", out, "--method", "gsa", "--cog",
                       fsize=plain.stat().st_size + (64 << 10))  # fmt: skip
    _, stderr = proc.communicate(timeout=300)
    line = error_line(proc.returncode, stderr, 1, str(out))
    assert "overview" in line, line
    assert not out.exists() and hidden(out.parent) == []
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "gsa", "--cog", "-q")
    assert rc == 0 and raster.is_complete_output(out), err
    # a user's external overviews (gdaladdo -ro, QGIS pyramids; uncompressed, larger than the
    # deflated product) are not the product's: it is still complete
    (tmp_path / "smooth").mkdir()
    smooth = tmp_path / "smooth.tif"
    rc, _, err = cli(
        "pansharpen", *make_pair(tmp_path / "smooth", n=1024), "-o", smooth, "--method", "gsa", "-q"
    )
    assert rc == 0, err
    with rasterio.Env(TIFF_USE_OVR=True), rasterio.open(smooth, "r+") as ds:
        ds.build_overviews([2, 4, 8])
    assert smooth.with_name(smooth.name + ".ovr").stat().st_size > smooth.stat().st_size
    assert raster.is_complete_output(smooth)


def test_out_of_memory_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A 4096^2 scene in one 4096-px window under a 1.5 GB address-space limit: numpy's MemoryError
    printed a 72-line traceback. Now one line saying what to lower, exit 1, nothing left behind."""
    pan, ms = make_pair(tmp_path, n=4096)
    out = tmp_path / "out" / "x.tif"
    out.parent.mkdir()
    args = ("pansharpen", pan, ms, "-o", out, "--method", "gsa", "--tile", "4096", "-q")
    proc = cli_process(*args, vmem=1500 << 20)
    _, stderr = proc.communicate(timeout=300)
    line = error_line(proc.returncode, stderr, 1, "out of memory")
    assert "--tile" in line and "Traceback" not in stderr
    assert not out.exists() and hidden(out.parent) == []


def test_a_batch_log_cut_by_a_size_limit_keeps_only_whole_lines(tmp_path: Path) -> None:
    """A log append cut short by a full disk left half a JSON line (a log no reader parses). The half
    line is taken back and the batch stops with one line naming the log, exit 1."""
    src, out_dir = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    make_pair(src, n=64, stem="a_")
    os.rename(src / "a_pan.tif", src / "a_PAN.tif")
    os.rename(src / "a_ms.tif", src / "a_MS.tif")
    log = tmp_path / "b.jsonl"
    limit = 256 << 10
    record = json.dumps({"v": 1, "scene": "earlier", "status": "done"}) + "\n"
    log.write_text(record * ((limit - 200) // len(record)))
    before = log.read_text()
    proc = cli_process("batch", src, out_dir, "--method", "gsa", "--log", log, fsize=limit)
    _, stderr = proc.communicate(timeout=300)
    error_line(proc.returncode, stderr, 1, "batch log")
    assert log.read_text() == before  # every line whole: the cut record is taken back


def test_a_scene_that_cannot_take_its_lock_fails_alone(tmp_path: Path) -> None:
    """Under `ulimit -n 10` with two scenes in flight, opening a scene's lock file or listing its
    stale temporaries failed with EMFILE outside the per-scene handling: the whole batch stopped
    with one error, no summary, half the scenes unlogged. Now each scene fails or finishes on its
    own and the summary accounts for all four."""
    src = tmp_path / "in"
    src.mkdir()
    for stem in "abcd":
        make_pair(src, n=64, stem=f"{stem}_")
        os.rename(src / f"{stem}_pan.tif", src / f"{stem}_PAN.tif")
        os.rename(src / f"{stem}_ms.tif", src / f"{stem}_MS.tif")
    args = ("batch", src, tmp_path / "out", "--method", "gsa", "--scene-workers", "2", "--json")
    proc = cli_process(*args, files=10)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode in (0, 1) and "Traceback" not in stderr, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["done"] + summary["failed"] == 4 and len(summary["scenes"]) == 4


def test_batch_under_a_size_limit_fails_the_scene(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    make_pair(src, n=512, noise=True, stem="a_")
    os.rename(src / "a_pan.tif", src / "a_PAN.tif")
    os.rename(src / "a_ms.tif", src / "a_MS.tif")
    out_dir = tmp_path / "out"
    proc = cli_process("batch", src, out_dir, "--method", "gsa", "--json", fsize=256 << 10)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    scenes = json.loads(stdout)["scenes"]
    assert [s["status"] for s in scenes] == ["failed"], scenes
    assert "a_fused.tif" in scenes[0]["reason"]
    assert not (out_dir / "a_fused.tif").exists()
    assert not raster.is_complete_output(out_dir / "a_fused.tif")


def test_simulate_under_a_size_limit_leaves_nothing(tmp_path: Path) -> None:
    pan, ms = make_pair(tmp_path, n=512, noise=True)
    out = tmp_path / "sim"
    proc = cli_process("simulate", pan, ms, "-o", out, fsize=16 << 10)
    _, stderr = proc.communicate(timeout=300)
    error_line(proc.returncode, stderr, 1, str(out))
    assert [p.name for p in out.iterdir() if p.stat().st_size > 0 and raster.is_complete_output(p)] == []
    assert hidden(out) == []


def test_a_failed_side_file_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    with pytest.raises(OutputWriteError, match="report.json"), raster.atomic_output(target) as tmp:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    assert not target.exists() and hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 2. Outputs confined to OUT_DIR; cleanup removes only this tool's temporaries


def test_manifest_cannot_write_or_clean_outside_out_dir(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    make_pair(src, stem="a_")
    make_pair(src, stem="b_")
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("important.txt", ".important.txt.bak", ".important.txt.partial-1-abcdef12.tif"):
        (victim / name).write_text("keep me")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "link").symlink_to(victim, target_is_directory=True)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "pan,ms,out,id\n"
        "a_pan.tif,a_ms.tif,../victim/important.txt,dots\n"
        f"a_pan.tif,a_ms.tif,{victim / 'important.txt'},absolute\n"
        "a_pan.tif,a_ms.tif,link/important.txt,symlink\n"
        "b_pan.tif,b_ms.tif,good.tif,good\n"
    )
    rc, out, err = cli("batch", src, out_dir, "--manifest", manifest, "--method", "gsa", "--json")
    assert rc == 1, err
    status = {s["scene"]: (s["status"], s["reason"]) for s in json.loads(out)["scenes"]}
    assert status["good"] == ("done", None)
    for bad in ("dots", "absolute", "symlink"):
        assert status[bad][0] == "failed" and "OUT_DIR" in status[bad][1], status[bad]
    assert sorted(p.name for p in victim.iterdir()) == sorted(
        ["important.txt", ".important.txt.bak", ".important.txt.partial-1-abcdef12.tif"]
    )
    assert all(p.read_text() == "keep me" for p in victim.iterdir())


def test_out_pattern_cannot_leave_out_dir(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    make_pair(src, stem="a_")
    with pytest.raises(FusionError, match="writes outside OUT_DIR"):
        batch.pair_by_patterns(src, tmp_path / "out", "*_pan.tif", "*_ms.tif", "../{stem}.tif")


def test_stale_cleanup_removes_only_own_temporaries(tmp_path: Path) -> None:
    """Killed writers' temporaries (PIDs above any pid_max: no such process) go; a user's files and
    other outputs' stay, and so does the temporary of a writer that still runs (a `fusion pansharpen`
    onto the same output takes no scene lock: removing its file failed it after all its work)."""
    out = tmp_path / "x_fused.tif"
    own = [".x_fused.tif.partial-4194400-0123abcd.tif", ".x_fused.tif.cog-4194401-deadbeef.tif.ovr"]
    own.append(".x_fused.tif.metrics.json.tmp-4194402-00ff00ff.json")
    foreign = [".x_fused.tif.lock", ".x_fused.tif.notes", ".x_fused.tif.partial", ".x_fused.tif.bak.tif"]
    # another output's live temporary (`x_fused.tif.v2.tif`), a user's file shaped almost like ours
    foreign += [".x_fused.tif.v2.tif.partial-12-0123abcd.tif", ".x_fused.tif.notes.tmp-2024-12.txt"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        foreign.append(f".x_fused.tif.partial-{live.pid}-0123abcd.tif")
        for name in own + foreign:
            (tmp_path / name).write_text("x")
        removed = batch.remove_stale_temporaries(out)
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in removed) == sorted(own)
    assert hidden(tmp_path) == sorted(foreign)


def test_a_rerun_clears_what_a_killed_pansharpen_left(tmp_path: Path) -> None:
    """A `fusion pansharpen` killed by the OOM killer leaves its (scene-sized) hidden temporary; a
    rerun onto the same output used to keep it forever outside `batch`. Now any write of the output
    removes this host's temporaries whose writer is gone, and keeps another host's (its PID says
    nothing here) and a live writer's."""
    from fusion_cli.raster.write import _HOST_TAG

    pan, ms = make_pair(tmp_path)
    out = tmp_path / "o.tif"
    mine = [f".o.tif.partial-4194400-{_HOST_TAG}beef.tif", f".o.tif.cog-4194401-{_HOST_TAG}0a0a.tif.ovr"]
    other_host = "0000" if _HOST_TAG != "0000" else "ffff"
    kept = [f".o.tif.partial-4194402-{other_host}beef.tif", ".o.tif.notes"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept.append(f".o.tif.partial-{live.pid}-{_HOST_TAG}1234.tif")
        for name in mine + kept:
            (tmp_path / name).write_text("x")
        assert cli("pansharpen", pan, ms, "-o", out, "--method", "gsa", "-q")[0] == 0
    finally:
        live.kill()
        live.wait()
    assert raster.is_complete_output(out)
    assert hidden(tmp_path) == sorted(kept)


def test_a_rerun_clears_what_a_killed_run_left_of_its_side_files(tmp_path: Path) -> None:
    """The temporaries of a quicklook, of `fusion simulate`'s three images and of a metrics CSV that
    a killed run left stayed after every rerun (only the product's own were cleared, helper); each
    side file's write now clears its own, this host's dead writers' only."""
    from fusion_cli.raster.write import _HOST_TAG

    pan, ms = make_pair(tmp_path)
    out, sim = tmp_path / "o.tif", tmp_path / "sim"
    sim.mkdir()
    left = [
        tmp_path / f".o.png.tmp-4194400-{_HOST_TAG}beef.png",
        tmp_path / f".m.csv.tmp-4194401-{_HOST_TAG}0a0a.csv",
    ]
    left += [
        sim / f".{name}.tmp-4194402-{_HOST_TAG}1234.tif" for name in ("pan_lr.tif", "ms_lr.tif", "ms_ref.tif")
    ]
    for path in left:
        path.write_text("x")
    assert cli("pansharpen", pan, ms, "-o", out, "--method", "gsa", "--quicklook", "-q")[0] == 0
    assert cli("metrics", out, "--csv", tmp_path / "m.csv", "-q")[0] == 0
    assert cli("simulate", pan, ms, "-o", sim, "-q")[0] == 0
    assert not [p for p in left if p.exists()]
    assert hidden(tmp_path) == [] and hidden(sim) == []


# ---------------------------------------------------------------------------------------------
# 3. Bad values are input errors


def _float_pair(tmp_path: Path, nodata: float | None = None) -> tuple[Path, Path, np.ndarray]:
    pan, ms = make_pair(tmp_path, dtype="float32")
    with rasterio.open(ms) as ds:
        data = ds.read()
    return pan, ms, data


def test_nan_and_inf_outside_nodata_are_refused(tmp_path: Path) -> None:
    pan, ms, data = _float_pair(tmp_path)
    for value in (np.nan, np.inf):
        bad = data.copy()
        bad[:, 3, 5] = value
        write_tif(ms, bad, 4.0)
        rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "gsa", "-q")
        one_line_error(rc, err, "NaN or infinite", str(ms))
        assert not (tmp_path / "o.tif").exists()


def test_nan_declared_as_nodata_is_masked(tmp_path: Path) -> None:
    pan, ms, data = _float_pair(tmp_path)
    data[:, 3, 5] = np.nan
    write_tif(ms, data, 4.0, nodata=float("nan"))
    out = tmp_path / "o.tif"
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "gsa", "-q")
    assert rc == 0, err
    with rasterio.open(out) as ds:
        fused, valid = ds.read(), ds.dataset_mask() > 0
    assert np.isfinite(fused[:, valid]).all() and not valid.all()


def test_inf_with_nan_nodata_is_refused(tmp_path: Path) -> None:
    pan, ms, data = _float_pair(tmp_path)
    data[:, 3, 5], data[:, 7, 7] = np.nan, np.inf
    write_tif(ms, data, 4.0, nodata=float("nan"))
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "gsa", "-q")
    one_line_error(rc, err, "NaN or infinite")


def test_all_nodata_ms_is_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    pan, ms = pair
    with rasterio.open(ms) as ds:
        shape = (ds.count, ds.height, ds.width)
    write_tif(ms, np.zeros(shape, np.uint16), 4.0, nodata=0)
    for method in ("gsa", "exp"):  # with and without scene statistics
        rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", method, "-q")
        one_line_error(rc, err, "no valid pixel")
        assert not (tmp_path / "o.tif").exists()


@pytest.mark.parametrize("value", ["0", "nan", "-5", "inf"])
def test_dn_max_must_be_positive_and_finite(tmp_path: Path, pair: tuple[Path, Path], value: str) -> None:
    pan, ms = pair
    out = tmp_path / "o.tif"
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "gsa", f"--dn-max={value}", "-q")
    one_line_error(rc, err, "--dn-max")
    assert not out.exists()


def test_complex_input_is_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    pan, ms = pair
    with rasterio.open(ms) as ds:
        data = ds.read().astype(np.complex64) * (1 + 1j)
    write_tif(ms, data, 4.0)
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "gsa", "-q")
    one_line_error(rc, err, "complex")


def test_same_file_as_pan_and_ms_is_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    _, ms = pair
    rc, _, err = cli("pansharpen", ms, ms, "-o", tmp_path / "o.tif", "--method", "gsa", "-q")
    one_line_error(rc, err, "same file")


def test_multiband_pan_is_not_silently_hisr(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    pan, ms = pair
    with rasterio.open(pan) as ds:
        data = ds.read()
    write_tif(pan, np.concatenate([data] * 3), 1.0)
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "gsa", "-q")
    one_line_error(rc, err, "3 bands", "fusion hisr")
    rc, _, err = cli("hisr", ms, pan, "-o", tmp_path / "h.tif", "--method", "gsa", "-q")
    assert rc == 0, err  # the same files as HISR, asked for by name, still work


def test_lossy_dtype_narrowing_is_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    pan, ms = pair
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "gsa", "--dtype", "int8")
    one_line_error(rc, err, "--dtype int8", "uint16")
    # stating the real ceiling makes a narrower type safe (8-bit content in a 16-bit file), and a
    # ceiling the content exceeds is refused (it would clip the product)
    args = ["--dtype", "uint8", "--dn-max", "1023", "-q"]
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "gsa", *args)
    one_line_error(rc, err, "--dtype uint8", "1023")
    with rasterio.open(pan) as p, rasterio.open(ms) as m:
        pan8 = write_tif(tmp_path / "pan8.tif", p.read() // 4, 1.0)
        ms8 = write_tif(tmp_path / "ms8.tif", m.read() // 4, 4.0)
    args = ["--dtype", "uint8", "--dn-max", "255", "-q"]
    rc, _, err = cli("pansharpen", pan8, ms8, "-o", tmp_path / "o.tif", "--method", "gsa", *args)
    assert rc == 0, err
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o2.tif", "--method", "gsa", *args)
    assert rc == 2 and "exceed --dn-max 255" in err, err


def test_signed_data_above_zero_may_be_written_unsigned(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """Non-negative DN stored as int16 (Hyperion) fused with --dtype uint16 were refused by the type's
    range (-32768..32767) with advice (--dn-max) that could not help; they are written now, the same
    product as in int16 with negative undershoots at 0. Data that do go negative are still refused,
    without the --dn-max advice."""
    pan, ms = pair
    signed = []
    for path, ratio in ((pan, 1.0), (ms, 4.0)):
        with rasterio.open(path) as ds:
            signed.append(write_tif(tmp_path / f"s_{path.name}", (ds.read() // 2).astype(np.int16), ratio))
    outs = {}
    for dtype in ("int16", "uint16"):
        outs[dtype] = tmp_path / f"{dtype}.tif"
        rc, _, err = cli("pansharpen", *signed, "-o", outs[dtype], "--method", "gsa", "--dtype", dtype, "-q")
        assert rc == 0, err
    with rasterio.open(outs["int16"]) as a, rasterio.open(outs["uint16"]) as b:
        assert b.dtypes[0] == "uint16"
        np.testing.assert_array_equal(np.clip(a.read(), 0, None), b.read())
    with rasterio.open(signed[1]) as ds:
        data = ds.read()
    data[:, :4, :4] = -5
    negative = write_tif(tmp_path / "neg_ms.tif", data, 4.0)
    rc, _, err = cli(
        "pansharpen", signed[0], negative, "-o", tmp_path / "n.tif", "--method", "gsa", "--dtype", "uint16"
    )
    one_line_error(rc, err, "--dtype uint16 holds 0..65535", "use int16 or float32")
    assert "--dn-max" not in err


def _card(tmp_path: Path, **architecture: object) -> Path:
    card = {
        "name": "probe", "task": "pansharpening", "description": "d", "sensor": "s", "licence": "l",
        "bands": ["b1", "b2", "b3", "b4"], "pan_bands": ["p"], "ratio": 4, "dn_max": 2047,
        "architecture": {"ms_bands": 4, "pan_bands": 1, "ratio": 4, **architecture},
    }  # fmt: skip
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(card))
    (tmp_path / "probe.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "kind", ["huge_dim", "deep_nesting", "huge_file"], ids=["dim", "nesting", "file-size"]
)
def test_absurd_model_cards_are_refused_before_allocation(
    tmp_path: Path, pair: tuple[Path, Path], kind: str
) -> None:
    pan, ms = pair
    card = _card(tmp_path, dim=200000)
    if kind == "deep_nesting":
        card.write_text('{"name": ' + "[" * 100000 + "]" * 100000 + "}")
    elif kind == "huge_file":  # a valid card but for its 2 MB description
        card.write_text(
            card.read_text().replace('"description": "d"', '"description": "' + "x" * (2 << 20) + '"')
        )
        card.write_text(card.read_text().replace('"dim": 200000', '"dim": 8'))
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--weights", card, "--device", "cpu")
    one_line_error(rc, err, "probe.json" if kind != "huge_dim" else "dim")


def test_absurd_scene_size_is_refused(tmp_path: Path) -> None:
    # 1,000,000 x 1,000,000 px declared, no block written: a few hundred KB on disk
    n = 1_000_000
    common = {"driver": "GTiff", "dtype": "uint16", "crs": CRS, "tiled": True, "sparse_ok": True}
    with rasterio.open(
        tmp_path / "pan.tif", "w", width=n, height=n, count=1,
        transform=from_origin(500000, 0, 1, 1), BIGTIFF="YES", **common,
    ):  # fmt: skip
        pass
    with rasterio.open(
        tmp_path / "ms.tif", "w", width=n // 4, height=n // 4, count=4,
        transform=from_origin(500000, 0, 4, 4), BIGTIFF="YES", **common,
    ):  # fmt: skip
        pass
    out = tmp_path / "o.tif"
    # a child process: without the guard this run heads for a 12 TB product and must be stopped
    proc = cli_process("pansharpen", tmp_path / "pan.tif", tmp_path / "ms.tif", "-o", out, "--method", "exp")
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    one_line_error(proc.returncode, err, "Gpx", "--max-pixels")
    assert not out.exists() and hidden(tmp_path) == []


def test_max_pixels_option(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    pan, ms = pair
    out = tmp_path / "o.tif"
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "exp", "--max-pixels", "1000")
    one_line_error(rc, err, "--max-pixels")
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "exp", "--max-pixels", "5000", "-q")
    assert rc == 0, err


def test_evaluate_with_nan_is_an_input_error(tmp_path: Path) -> None:
    pan, ms, data = _float_pair(tmp_path)
    data[:, 3, 5] = np.nan
    write_tif(ms, data, 4.0)
    rc, _, err = cli("evaluate", pan, ms, "--methods", "exp", "-o", tmp_path / "ev", "--no-full")
    one_line_error(rc, err, "NaN or infinite", str(ms))


def test_evaluate_keeps_an_earlier_evaluation_unless_overwrite(tmp_path: Path) -> None:
    """A second `fusion evaluate -o OUT` replaced the first one's tables without a word (every other
    command keeps an existing output unless --overwrite). Now refused with one line, tables kept;
    --overwrite replaces them."""
    pan, ms = make_pair(tmp_path, n=128)  # its reduced MS: 8 x 8, the least a fusion takes
    out = tmp_path / "ev"
    args = ("evaluate", pan, ms, "-o", out, "--no-full", "--block", "8", "-q", "--methods")
    rc, _, err = cli(*args, "exp")
    assert rc == 0, err
    before = (out / "results.csv").read_bytes()
    rc, _, err = cli(*args, "gsa")
    one_line_error(rc, err, "earlier evaluation", "--overwrite")
    assert (out / "results.csv").read_bytes() == before
    rc, _, err = cli(*args, "gsa", "--overwrite")
    assert rc == 0, err
    with (out / "results.csv").open() as fh:
        assert [row["method"] for row in csv.DictReader(fh)] == ["gsa"]


# ---------------------------------------------------------------------------------------------
# 4. SIGTERM and SIGHUP behave like Ctrl-C


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_termination_signal_leaves_no_partial_file(tmp_path: Path, sig: signal.Signals) -> None:
    pan, ms = make_pair(tmp_path, n=3072)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # tiny tiles: thousands of windows, so the signal lands while the product is being written
    proc = cli_process("pansharpen", pan, ms, "-o", out_dir / "x.tif", "--method", "exp", "--tile", "32")
    deadline = time.monotonic() + 240
    while not any(p.name.startswith(".x.tif.partial") for p in out_dir.iterdir()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr
    said = "Interrupted." if sig == signal.SIGINT else f"Terminated by signal {int(sig)}."
    assert stderr.strip().splitlines()[-1] == said, stderr[-3000:]
    assert list(out_dir.iterdir()) == []


def test_sigterm_stops_a_batch_like_ctrl_c(tmp_path: Path) -> None:
    src, out_dir = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    make_pair(src, n=3072, stem="a_")
    make_pair(src, n=256, stem="b_")
    for stem in "ab":
        for role in ("pan", "ms"):
            os.rename(src / f"{stem}_{role}.tif", src / f"{stem}_{role.upper()}.tif")
    proc = cli_process("batch", src, out_dir, "--method", "exp", "--tile", "32", "--json")
    deadline = time.monotonic() + 240
    while not (out_dir.is_dir() and any(".partial" in p.name for p in out_dir.iterdir())):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"Terminated by signal {int(signal.SIGTERM)}.", stderr[-3000:]
    summary = json.loads(stdout)
    # the summary tells a script the code the process exits with (it said 130) and what is left to do
    assert summary["interrupted"] is True and summary["exit_code"] == 128 + signal.SIGTERM
    assert summary["unfinished"] == ["a", "b"] and summary["scenes"] == []
    assert not (out_dir / "a_fused.tif").exists() and hidden(out_dir) == []


# ---------------------------------------------------------------------------------------------
# 5. Damaged inputs are named as damaged


def test_truncated_uncompressed_tiff_is_named_damaged(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    pan, ms = pair
    data = pan.read_bytes()
    pan.write_bytes(data[: len(data) // 2])  # the header opens; half of the pixels are missing
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "gsa", "-q")
    line = error_line(rc, err, 2, str(pan))
    assert "damaged" in line or "not a readable raster" in line
    assert "disk space" not in line


def test_corrupted_compressed_blocks_are_named_damaged(tmp_path: Path) -> None:
    pan, ms = make_pair(tmp_path, n=1024, noise=True)
    with rasterio.open(pan) as ds:
        data = ds.read()
    write_tif(pan, data, 1.0, compress="deflate", tiled=True, blockxsize=256, blockysize=256)
    raw = bytearray(pan.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 4096] = b"\xab" * 4096
    pan.write_bytes(bytes(raw))
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "gsa", "-q")
    line = error_line(rc, err, 2, str(pan), "damaged")
    assert "disk space" not in line
    assert not (tmp_path / "o.tif").exists()


# ---------------------------------------------------------------------------------------------
# 6. Side outputs obey --overwrite


def test_quicklook_obeys_overwrite(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    pan, ms = pair
    png = tmp_path / "o.png"
    png.write_bytes(b"my own picture")
    args = ["pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "exp", "--quicklook", "-q"]
    rc, _, err = cli(*args)
    one_line_error(rc, err, "o.png", "--overwrite")
    assert png.read_bytes() == b"my own picture" and not (tmp_path / "o.tif").exists()
    rc, _, err = cli(*args, "--overwrite")
    assert rc == 0, err
    assert png.read_bytes().startswith(b"\x89PNG")


def test_metrics_csv_refuses_a_foreign_csv(tmp_path: Path, fused: tuple[Path, Path, Path]) -> None:
    pan, ms, out = fused
    foreign = tmp_path / "people.csv"
    foreign.write_text("name,age\nada,36\n")
    rc, _, err = cli("metrics", out, "--pan", pan, "--ms", ms, "--csv", foreign)
    one_line_error(rc, err, "people.csv", "not a metrics CSV")
    assert foreign.read_text() == "name,age\nada,36\n"
    own = tmp_path / "m.csv"
    for _ in range(2):  # its own CSV is appended to
        assert cli("metrics", out, "--pan", pan, "--ms", ms, "--csv", own)[0] == 0
    with own.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:2] == ["product", "mode"] and len(rows) == 3


def test_report_obeys_overwrite(tmp_path: Path, fused: tuple[Path, Path, Path]) -> None:
    pan, ms, out = fused
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "index.html").write_text("mine")
    rc, _, err = cli("report", out, "-o", rep)
    one_line_error(rc, err, "index.html", "--overwrite")
    assert (rep / "index.html").read_text() == "mine"


def test_a_signal_in_a_deferred_section_arrives_when_it_ends() -> None:
    """The lock file's removal and GDAL's environment bookkeeping run to their end under Ctrl-C;
    the interrupt is delivered right after, and the handler is the previous one again."""
    from fusion_cli.signals import deferred_signals

    before = signal.getsignal(signal.SIGINT)
    steps: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # without deferral, KeyboardInterrupt is raised in here
            steps.append("finished")
        steps.append("after")  # never reached: the signal lands as the block ends
    assert steps == ["finished"]
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_in_a_callback_from_c_or_an_exit_handler_is_neither_lost_nor_printed(tmp_path: Path) -> None:
    """Python "ignores" a KeyboardInterrupt raised in a callback from C (numba's compiler calls
    llvmlite through ctypes) or in an exit handler (torch registers some), printing a traceback:
    a Ctrl-C landing in the first let the run go on, and rapid Ctrl-Cs printed screens of the
    second after "Interrupted.". In the `fusion` process the first is raised again in the main
    flow, and the second is dropped once the run has unwound. (`__del__` is "ignored" the same way.)"""
    pan, ms = make_pair(tmp_path)
    script = f"""
import atexit, sys, time
import fusion_cli.pipeline as pipeline
from fusion_cli.cli.main import main

class FromC:
    def __del__(self):
        raise KeyboardInterrupt  # a Ctrl-C landing in the callback

def fuse(*args, **kwargs):
    FromC()
    for _ in range(300):  # the run goes on after the callback (numba compiles, then fuses)
        time.sleep(0.01)
    print("went on", flush=True)

def exit_handler():
    raise KeyboardInterrupt  # a Ctrl-C landing in an exit handler

atexit.register(exit_handler)
pipeline.pansharpen = fuse
sys.argv = ["fusion", "pansharpen", {str(pan)!r}, {str(ms)!r}, "-o", {str(tmp_path / "o.tif")!r}]
main()
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 130, res.stderr
    assert "went on" not in res.stdout
    assert res.stderr.strip() == "Interrupted.", res.stderr
    assert not (tmp_path / "o.tif").exists()


def test_ctrl_c_is_not_replaced_by_a_broken_gdal_environment_error() -> None:
    """Ctrl-C cut a nested rasterio.Env's exit between clearing its environment and restoring the
    parent's: the outer `gdal_env()` must let the interrupt through, not raise EnvError over it."""
    import rasterio.env

    with pytest.raises(KeyboardInterrupt):
        with raster.gdal_env():
            rasterio.env.delenv()  # the state such a cut leaves behind
            raise KeyboardInterrupt
    with raster.gdal_env():  # and the next environment starts cleanly
        assert rasterio.env.getenv()["GDAL_CACHEMAX"] == 32


def test_a_second_ctrl_c_during_cleanup_still_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C pressed again while the first one unwinds (the writer closing and removing its
    temporary): the second interrupt waits for the cleanup instead of cutting it short."""
    from fusion_cli.raster import write

    real_cleanup = write.AtomicWriter._cleanup

    def pressed_again(self: write.AtomicWriter) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # undeferred, the second KeyboardInterrupt is raised in here
        real_cleanup(self)

    monkeypatch.setattr(write.AtomicWriter, "_cleanup", pressed_again)
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "uint16"}
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with raster.AtomicWriter(tmp_path / "x.tif", profile) as writer:
            writer.write(np.ones((1, 32, 64), np.uint16), 0, 0)
            raise KeyboardInterrupt  # the first Ctrl-C, mid-product
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 7. Nothing but the tool's own files is written or removed


def test_evaluate_no_keep_removes_only_its_own_products(tmp_path: Path) -> None:
    """--no-keep once removed OUT/products whole: with the inputs in it (or earlier results), they
    were deleted. Only the products this run wrote go."""
    inputs = tmp_path / "products"
    inputs.mkdir()
    pan, ms = make_pair(inputs, n=128)
    (inputs / "notes.txt").write_text("mine")
    args = ["evaluate", pan, ms, "--methods", "exp", "-o", tmp_path, "--no-keep", "--no-full", "--block", "8"]
    rc, _, err = cli(*args, "-q")
    assert rc == 0, err
    assert sorted(p.name for p in inputs.iterdir()) == ["ms.tif", "notes.txt", "pan.tif"]
    assert hidden(tmp_path) == [] and (tmp_path / "results.csv").is_file()


def test_batch_log_is_never_an_input_or_a_foreign_file(tmp_path: Path) -> None:
    """--log appends JSON lines: given an input (or any file that is not a batch log) it once appended
    them to that file and reported success; given a folder it failed mid-batch with exit 1."""
    folder = tmp_path / "in"
    folder.mkdir()
    pan, _ = make_pair(folder, stem="a_")  # a_pan.tif + a_ms.tif: a scene by the default conventions
    elsewhere = tmp_path / "elsewhere.tif"
    elsewhere.write_bytes(pan.read_bytes())
    before = {p: p.read_bytes() for p in (pan, elsewhere)}
    out = tmp_path / "out"
    for log, words in ((pan, "a_pan.tif"), (elsewhere, "not a batch log"), (tmp_path, "folder")):
        rc, _, err = cli("batch", folder, out, "--method", "exp", "--log", log, "-q")
        one_line_error(rc, err, "--log", words)
        assert not out.exists() or not list(out.iterdir())
    assert {p: p.read_bytes() for p in before} == before
    log = tmp_path / "batch.jsonl"
    for _ in range(2):  # its own log is appended to
        assert cli("batch", folder, out, "--method", "exp", "--log", log, "-q")[0] == 0
    assert [json.loads(x)["status"] for x in log.read_text().splitlines()] == ["done", "skipped"]


@pytest.mark.parametrize("name", ["o.png", "o.jpg", "o.vrt"])
def test_an_output_named_for_another_format_is_refused(
    tmp_path: Path, pair: tuple[Path, Path], name: str
) -> None:
    """The product is always a GeoTIFF: `-o o.png` once wrote a TIFF named .png, and with --quicklook
    --overwrite the quicklook then replaced the product while the summary reported it written."""
    pan, ms = pair
    rc, _, err = cli(
        "pansharpen", pan, ms, "-o", tmp_path / name, "--method", "exp", "--quicklook", "--overwrite"
    )
    one_line_error(rc, err, name, ".tif")
    assert not (tmp_path / name).exists() and hidden(tmp_path) == []


def _png_pair(folder: Path, pan_name: str = "pan.png") -> tuple[Path, Path]:
    """A PAN/MS pair without georeferencing, related by their sizes (ratio 4): the MS a PNG, the PAN
    a PNG or, named .tif, a GeoTIFF."""
    rng = np.random.default_rng(1)
    pan, ms = folder / pan_name, folder / "ms.png"
    pan_driver = "GTiff" if pan.suffix == ".tif" else "PNG"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(pan, "w", driver=pan_driver, width=64, height=64, count=1, dtype="uint16") as dst:
            dst.write((rng.random((1, 64, 64)) * 1000 + 100).astype("uint16"))
        with rasterio.open(ms, "w", driver="PNG", width=16, height=16, count=3, dtype="uint16") as dst:
            dst.write((rng.random((3, 16, 16)) * 1000 + 100).astype("uint16"))
    return pan, ms


def test_a_quicklook_never_replaces_an_input(tmp_path: Path) -> None:
    """`pansharpen pan.tif ms.png -o ms.tif --quicklook --overwrite`: the quicklook ms.png is the MS."""
    pan, ms = _png_pair(tmp_path, pan_name="pan.tif")
    before = ms.read_bytes()
    rc, _, err = cli(
        "pansharpen", pan, ms, "-o", tmp_path / "ms.tif", "--method", "exp", "--quicklook", "--overwrite"
    )
    one_line_error(rc, err, "ms.png", "input")
    assert ms.read_bytes() == before and not (tmp_path / "ms.tif").exists()


def test_an_output_hard_linked_to_an_input_is_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    pan, ms = pair
    link = tmp_path / "link.tif"
    os.link(ms, link)
    rc, _, err = cli("pansharpen", pan, ms, "-o", link, "--method", "exp", "--overwrite")
    one_line_error(rc, err, "link.tif", "one of the inputs")
    assert os.path.samefile(link, ms)


@pytest.mark.parametrize("co", ["COMPRESS=JPEG", "COMPRESS=WEBP"])
def test_creation_options_gtiff_cannot_encode_are_bad_input(
    tmp_path: Path, pair: tuple[Path, Path], co: str
) -> None:
    """GTiff creates a 16-bit JPEG/WEBP file, then drops every block: the scene was fused and failed
    at the end with exit 1 and 'check the disk space'. Refused before any work, with GDAL's reason."""
    pan, ms = pair
    out = tmp_path / "out" / "o.tif"
    out.parent.mkdir()
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "exp", "--co", co)
    one_line_error(rc, err, co, "uint16")
    assert list(out.parent.iterdir()) == []


def test_metrics_csv_naming_a_folder_is_bad_input(tmp_path: Path, fused: tuple[Path, Path, Path]) -> None:
    """--csv DIR once failed with exit 1, Errno 21 and advice to check the disk space."""
    pan, ms, out = fused
    folder = tmp_path / "tables"
    folder.mkdir()
    rc, _, err = cli("metrics", out, "--pan", pan, "--ms", ms, "--csv", folder)
    one_line_error(rc, err, "tables", "folder")
    assert list(folder.iterdir()) == []


def test_metrics_csv_through_a_symlink_appends_to_its_target(
    tmp_path: Path, fused: tuple[Path, Path, Path]
) -> None:
    """--csv LINK once replaced the link with a regular file (old rows plus the new one) and left the
    CSV it pointed to unchanged: the rows go to the target, atomically, and the link stays a link."""
    pan, ms, out = fused
    tables = tmp_path / "tables"
    tables.mkdir()
    target = tables / "all.csv"
    assert cli("metrics", out, "--pan", pan, "--ms", ms, "--csv", target)[0] == 0
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    rc, _, err = cli("metrics", out, "--pan", pan, "--ms", ms, "--csv", link)
    assert rc == 0, err
    assert link.is_symlink() and link.resolve() == target.resolve()
    with target.open(newline="") as fh:
        assert len(list(csv.reader(fh))) == 3
    assert hidden(tmp_path) == [] and hidden(tables) == []


def test_metrics_csv_hard_linked_to_an_input_is_refused(
    tmp_path: Path, fused: tuple[Path, Path, Path]
) -> None:
    """The --csv "is an input" check compared resolved paths, so a hard link to an input passed it
    (and the scene was scored before any refusal). The library's check_csv counts hard links."""
    from fusion_cli.assess import check_csv
    from fusion_cli.errors import FusionError

    pan, ms, out = fused
    link = tmp_path / "link.csv"
    os.link(pan, link)
    before = pan.read_bytes()
    rc, _, err = cli("metrics", out, "--pan", pan, "--ms", ms, "--csv", link)
    one_line_error(rc, err, "link.csv", "input")
    assert pan.read_bytes() == before and os.path.samefile(link, pan)
    with pytest.raises(FusionError, match="input"):
        check_csv(link, [out, None, pan, ms])
    assert check_csv(tmp_path / "new.csv", [out, pan, ms]) == tmp_path / "new.csv"


@pytest.mark.parametrize("co", ["FOO=BAR", "ZLEVLE=9"])
def test_creation_options_gtiff_does_not_know_are_refused(
    tmp_path: Path, pair: tuple[Path, Path], co: str
) -> None:
    """--co FOO=BAR (or a misspelt ZLEVLE=9) was accepted silently and the product written without it,
    although the help said GDAL warns: GDAL's warning went to a logger that prints nothing."""
    pan, ms = pair
    out = tmp_path / "out" / "o.tif"
    out.parent.mkdir()
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "exp", "--co", co)
    one_line_error(rc, err, f"--co {co}", "GTiff")
    assert list(out.parent.iterdir()) == []
    assert cli("pansharpen", pan, ms, "-o", out, "--method", "exp", "-q", "--co", "ZLEVEL=9")[0] == 0


@pytest.mark.parametrize(
    ("co", "words"),
    [("ZLEVEL=abc", "1 to 12"), ("ZSTD_LEVEL=40", "1 to 22"), ("PREDICTOR=7", "3 (floating point)")],
)
def test_creation_option_values_gdal_cannot_read_are_refused(
    tmp_path: Path, pair: tuple[Path, Path], co: str, words: str
) -> None:
    """`--co ZLEVEL=abc` wrote at exit 0 with some other level (GDAL reads "abc" as 0 and takes its
    default, without a word), as BLOCKXSIZE=abc once did: refused before any work."""
    pan, ms = pair
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "exp", "--co", co)
    one_line_error(rc, err, f"--co {co}", words)
    assert not (tmp_path / "o.tif").exists()


def test_a_pair_without_georeferencing_prints_no_rasterio_warning(tmp_path: Path) -> None:
    """PNG inputs (supported, no georeferencing) printed rasterio's NotGeoreferencedWarning with its
    source lines, twice, beside the tool's own one-line warning that says the same."""
    pan, ms = _png_pair(tmp_path)
    proc = cli_process("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "exp", "--cog")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "NotGeoreferencedWarning" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("wrote ") and "no georeferencing" in lines[1], err


@pytest.mark.parametrize("pattern", ["{stem}.png", "{stem}_fused.vrt"])
def test_batch_out_pattern_for_another_format_is_refused_up_front(tmp_path: Path, pattern: str) -> None:
    """--out-pattern '{stem}.png' let every scene fail one by one with the 'another format' message
    (exit 1): refused before any scene runs, by the rule pansharpen's -o follows."""
    folder = tmp_path / "in"
    folder.mkdir()
    for stem in ("a_", "b_"):
        make_pair(folder, stem=stem)
    out = tmp_path / "out"
    rc, _, err = cli("batch", folder, out, "--method", "exp", "--out-pattern", pattern)
    one_line_error(rc, err, "--out-pattern", pattern, "{stem}")
    assert not out.exists() or not list(out.iterdir())


def test_a_featureless_pan_has_no_shift_to_measure_or_apply(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """A constant PAN printed numpy's divide RuntimeWarning and reported (and with --coregister
    applied) a meaningless shift of dy = dx = -6 px. Such a PAN is refused before any shift is
    measured (`test_a_constant_pan_is_refused_everywhere`); `align.estimate_shift` says featureless
    for an image flat where it is measured (test_align)."""
    _, ms = pair
    pan = write_tif(tmp_path / "flat.tif", np.full((1, 64, 64), 700, np.uint16), 1.0)
    proc = cli_process("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "exp")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "RuntimeWarning" not in err and "PAN/MS shift dy" not in err, err
    assert "is 700 on every valid pixel" in err, err
    out = tmp_path / "co.tif"
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "exp", "--coregister")
    one_line_error(rc, err, "700 on every valid pixel")
    assert not out.exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("command", ["pansharpen", "hisr"])
def test_a_product_through_a_symlink_replaces_its_target(tmp_path: Path, command: str) -> None:
    """-o LINK --overwrite (LINK a symlink to an earlier product) replaced the link with a regular
    file and left the product it pointed to unchanged. The product goes to the link's target,
    atomically, and the link stays a link; a link to an input is still refused."""
    folder = tmp_path / "in"
    folder.mkdir()
    if command == "hisr":  # HSI (8 bands, low resolution) then MSI (3 bands, high resolution)
        rng = np.random.default_rng(2)
        msi = write_tif(folder / "msi.tif", (rng.random((3, 64, 64)) * 900 + 100).astype("uint16"), 1.0)
        hsi = write_tif(folder / "hsi.tif", (rng.random((8, 16, 16)) * 900 + 100).astype("uint16"), 4.0)
        inputs = (hsi, msi)
    else:
        inputs = make_pair(folder)
    products = tmp_path / "products"
    products.mkdir()
    target = products / "fused.tif"
    target.write_bytes(b"an earlier product")
    link = tmp_path / "link.tif"
    link.symlink_to(target)
    for cog in ([], ["--cog"]):
        rc, _, err = cli(command, *inputs, "-o", link, "--method", "exp", "--overwrite", "-q", *cog)
        assert rc == 0, err
        assert link.is_symlink() and link.resolve() == target.resolve()
        assert raster.is_complete_output(target)
        assert hidden(tmp_path) == [] and hidden(products) == []
    link.unlink()
    link.symlink_to(inputs[1])
    before = inputs[1].read_bytes()
    rc, _, err = cli(command, *inputs, "-o", link, "--method", "exp", "--overwrite")
    one_line_error(rc, err, "link.tif", "one of the inputs")
    assert inputs[1].read_bytes() == before and link.is_symlink()


def test_a_batch_output_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    """batch writes nothing outside OUT_DIR: an output name that is a symlink (to a file anywhere) is
    refused for its scene, through the same writer's path as pansharpen, and the link's target kept."""
    folder = tmp_path / "in"
    folder.mkdir()
    make_pair(folder, stem="a_")
    target = tmp_path / "elsewhere.tif"
    target.write_bytes(b"not ours")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "a_fused.tif").symlink_to(target)
    rc, _, err = cli("batch", folder, out_dir, "--method", "exp", "--overwrite", "-q")
    assert rc == 1 and "a_fused.tif is a symlink" in err, err
    assert (out_dir / "a_fused.tif").is_symlink() and target.read_bytes() == b"not ours"


def test_a_batch_output_hard_linked_to_an_input_is_refused_up_front(tmp_path: Path) -> None:
    """The plan's 'output is an input' check compared resolved paths: an OUT_DIR name hard-linked to
    an input passed it, and the scene ran into pansharpen's check one by one (exit 1). Refused while
    the plan is made, by raster.same_file's rule (hard links too), before any scene runs."""
    folder = tmp_path / "in"
    folder.mkdir()
    _, ms = make_pair(folder, stem="a_")
    out = tmp_path / "out"
    out.mkdir()
    os.link(ms, out / "a_fused.tif")
    before = ms.read_bytes()
    rc, _, err = cli("batch", folder, out, "--method", "exp", "--overwrite")
    one_line_error(rc, err, "a_fused.tif", "is an input")
    assert ms.read_bytes() == before and os.path.samefile(out / "a_fused.tif", ms)
    assert raster.same_file(out / "a_fused.tif", ms) and not raster.same_file(out / "new.tif", ms)


@pytest.mark.parametrize(
    ("co", "hint"),
    [
        ("NODATA=5", "--nodata"),
        ("DTYPE=uint8", "--dtype"),
        ("DRIVER=PNG", "GeoTIFF"),
        ("COUNT=1", "--bands"),
        ("WIDTH=3", "PAN grid"),
        ("CRS=EPSG:4326", "PAN's grid"),
        ("TRANSFORM=1,0,0,0,-1,0", "PAN's grid"),
        # GTiff's own, but they change the pixels or drop the tags: a constant 4095 image (NBITS=12),
        # uint8 read as signed (PIXELTYPE), tags and CRS left in a stray sidecar (PROFILE), at exit 0
        ("NBITS=12", "--dtype"),
        ("PIXELTYPE=SIGNEDBYTE", "--dtype"),
        ("PROFILE=BASELINE", "tags"),
    ],
)
def test_creation_options_that_are_the_products_own_settings_are_refused(
    tmp_path: Path, pair: tuple[Path, Path], co: str, hint: str
) -> None:
    """rasterio takes --co NODATA=5, DTYPE=uint8, CRS=... as the dataset's own settings, not GTiff's:
    the product silently got another nodata, pixel type or CRS (COUNT=1: a traceback after the
    fusion). Refused before any work, naming the key and the option that sets it; batch too, before
    its first scene."""
    pan, ms = pair
    out = tmp_path / "out" / "o.tif"
    out.parent.mkdir()
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "exp", "--co", co.lower())
    one_line_error(rc, err, f"--co {co.split('=')[0]}=", "what the product itself is", hint)
    assert list(out.parent.iterdir()) == []
    if co == "NODATA=5":
        folder = tmp_path / "in"
        folder.mkdir()
        make_pair(folder, stem="a_")
        rc, _, err = cli("batch", folder, tmp_path / "bout", "--method", "exp", "--co", co)
        one_line_error(rc, err, "--co NODATA=5", "--nodata")
        assert not (tmp_path / "bout").exists()


def test_an_integer_dtype_for_float_reflectance_is_refused(tmp_path: Path) -> None:
    """A float MS in reflectance (0.49..0.99) with `--dtype uint16` kept 0 and 1 at exit 0: float data
    had no range to check. Refused now when the values would round to a few levels (or mostly clip);
    float DN of thousands still round to the integer product they should."""
    (tmp_path / "dn").mkdir()
    pan_u, ms_u = make_pair(tmp_path / "dn")
    with rasterio.open(pan_u) as p, rasterio.open(ms_u) as m:
        pan, ms = p.read().astype(np.float32), m.read().astype(np.float32)
    refl = (
        write_tif(tmp_path / "pan_r.tif", pan / 1500, 1.0),
        write_tif(tmp_path / "ms_r.tif", ms / 1500, 4.0),
    )
    rc, _, err = cli("pansharpen", *refl, "-o", tmp_path / "r.tif", "--method", "gsa", "--dtype", "uint16")
    one_line_error(rc, err, "--dtype uint16", "level(s)", "float --dtype")
    assert not (tmp_path / "r.tif").exists()
    assert cli("pansharpen", *refl, "-o", tmp_path / "rf.tif", "--method", "gsa")[0] == 0  # float32
    dn = (write_tif(tmp_path / "pan_f.tif", pan, 1.0), write_tif(tmp_path / "ms_f.tif", ms, 4.0))
    assert cli("pansharpen", *dn, "-o", tmp_path / "f.tif", "--method", "gsa", "--dtype", "uint16")[0] == 0
    assert cli("pansharpen", pan_u, ms_u, "-o", tmp_path / "u.tif", "--method", "gsa")[0] == 0
    # float DN of an 8-bit range (here a quarter of the DN: about 25..175) still round to uint8
    dn8 = (write_tif(tmp_path / "pan_8.tif", pan / 4, 1.0), write_tif(tmp_path / "ms_8.tif", ms / 4, 4.0))
    assert cli("pansharpen", *dn8, "-o", tmp_path / "8.tif", "--method", "gsa", "--dtype", "uint8")[0] == 0
    with rasterio.open(tmp_path / "f.tif") as a, rasterio.open(tmp_path / "u.tif") as b:
        assert np.abs(a.read().astype(int) - b.read().astype(int)).max() <= 1


def test_cog_with_compress_none_is_uncompressed(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """`--cog --compress none` wrote an LZW COG: "none" set no COMPRESS, and the COG driver's default
    is LZW."""
    pan, ms = pair
    for cog in ([], ["--cog"]):
        out = tmp_path / f"o{len(cog)}.tif"
        assert cli("pansharpen", pan, ms, "-o", out, "--method", "exp", "--compress", "none", *cog)[0] == 0
        with rasterio.open(out) as ds:
            assert ds.compression is None, (cog, ds.compression)


def test_coregister_refuses_a_scene_too_small_or_empty_to_measure(tmp_path: Path) -> None:
    """--coregister on a scene under 64 PAN px per side (ratio 4), or one whose centre is mostly
    nodata, applied no shift and said nothing: the user asked for a registration that never happened.
    Refused as a featureless scene is; without --coregister such scenes fuse as before, silently."""
    small = make_pair(tmp_path, n=48, stem="small_")
    pan, ms = make_pair(tmp_path, n=128, stem="big_")
    with rasterio.open(pan) as ds:
        data = ds.read()
    data[:, :60] = data[:, 68:] = 0  # a strip of 8 rows valid: 6 % of the scene
    empty = (write_tif(tmp_path / "strip_pan.tif", data, 1.0, nodata=0), ms)
    for (p, m), words in ((small, ("48 x 48", "64 px")), (empty, ("6%", "valid"))):
        out = tmp_path / "co.tif"
        rc, _, err = cli("pansharpen", p, m, "-o", out, "--method", "exp", "--coregister")
        one_line_error(rc, err, "--coregister", "cannot measure", *words, "fuse without --coregister")
        assert not out.exists() and hidden(tmp_path) == []
        rc, _, err = cli("pansharpen", p, m, "-o", tmp_path / "plain.tif", "--method", "exp", "--overwrite")
        assert rc == 0 and [ln for ln in err.splitlines() if ln.strip()][1:] == [], err


# ---------------------------------------------------------------------------------------------
# 8. What GDAL reads is an input too: VRT sources, archives, weights, manifests, product tags


EXAMPLE_PAN, EXAMPLE_MS = REPO / "examples" / "landsat8_pan.tif", REPO / "examples" / "landsat8_ms.tif"


def _unchanged(*paths: Path) -> Callable[[], None]:
    """A check that `paths` still hold the bytes they hold now."""
    before = {p: p.read_bytes() for p in paths}

    def check() -> None:
        for p, data in before.items():
            assert p.read_bytes() == data, f"{p} was modified"

    return check


def test_output_onto_a_file_read_through_a_vrt_or_an_archive_is_refused(tmp_path: Path) -> None:
    """-o naming the file a VRT input reads, or the zip a /vsizip/ input reads, replaced it
    (the check compared the paths as typed)."""
    import zipfile

    import rasterio.shutil

    pan, ms = make_pair(tmp_path)
    vrt = tmp_path / "pan.vrt"
    rasterio.shutil.copy(pan, vrt, driver="VRT")
    archive = tmp_path / "pair.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(pan, "pan.tif")
        z.write(ms, "ms.tif")
    kept = _unchanged(pan, ms, archive)
    rc, _, err = cli("pansharpen", vrt, ms, "-o", pan, "--method", "gsa", "--overwrite")
    one_line_error(rc, err, "one of the inputs", "read through", "pan.vrt")
    zipped = [f"/vsizip/{archive}/pan.tif", f"/vsizip/{archive}/ms.tif"]
    rc, _, err = cli("pansharpen", *zipped, "-o", archive, "--method", "gsa", "--overwrite")
    one_line_error(rc, err, "one of the inputs", "/vsizip/")
    kept()
    assert raster.source_files(f"/vsizip/{{{archive}}}/ms.tif") == [str(archive)]
    assert raster.source_files("/vsicurl/https://example.com/a.tif") == []
    rc, _, err = cli("pansharpen", vrt, ms, "-o", tmp_path / "ok.tif", "--method", "gsa", "-q")
    assert rc == 0, err  # a VRT input itself still works


def test_weights_are_never_the_output(tmp_path: Path) -> None:
    """`--weights w/landsat.safetensors -o w/landsat.safetensors --overwrite` replaced the weights
    (and its card, named the same way) with a GeoTIFF."""
    w = tmp_path / "w"
    w.mkdir()
    for suffix in (".safetensors", ".json"):
        (w / f"landsat{suffix}").write_bytes((REPO / "weights" / f"landsat{suffix}").read_bytes())
    kept = _unchanged(w / "landsat.safetensors", w / "landsat.json")
    for target in ("landsat.safetensors", "landsat.json"):
        args = ["--weights", w / "landsat.safetensors", "-o", w / target, "--overwrite"]
        rc, _, err = cli("pansharpen", EXAMPLE_PAN, EXAMPLE_MS, *args)
        one_line_error(rc, err, "one of the inputs", target)
    kept()


def test_evaluate_keeps_its_manifest_and_its_products_inside_out(tmp_path: Path) -> None:
    """A manifest named results.csv in -o was replaced by the results; a manifest id that is an
    absolute path (or climbs with ..) wrote the scene's products there, and --no-keep left them."""
    for name in ("pan.tif", "ms.tif"):
        (tmp_path / name).write_bytes((EXAMPLE_PAN if name == "pan.tif" else EXAMPLE_MS).read_bytes())
    manifest = tmp_path / "results.csv"
    manifest.write_text("pan,ms,id\npan.tif,ms.tif,s1\n")
    kept = _unchanged(manifest)
    rc, _, err = cli("evaluate", manifest, "--methods", "gsa", "--no-full", "--block", "16", "-o", tmp_path)
    one_line_error(rc, err, "results.csv", "input")
    kept()
    victim = tmp_path / "victim"
    (victim / "reduced").mkdir(parents=True)
    (victim / "reduced" / "pan_lr.tif").write_text("keep me")
    listing = tmp_path / "m.csv"
    listing.write_text(f"pan,ms,id\npan.tif,ms.tif,{victim}\n")
    out = tmp_path / "ev"
    rc, _, err = cli("evaluate", listing, "--methods", "gsa", "--no-full", "--block", "16", "-o", out, "-q")
    assert rc == 0, err
    assert sorted(p.name for p in victim.rglob("*")) == ["pan_lr.tif", "reduced"]
    assert (victim / "reduced" / "pan_lr.tif").read_text() == "keep me"
    (folder,) = (out / "products").iterdir()  # one folder name, inside OUT
    assert folder.name == scene_folder(str(victim)) and folder.name.endswith("_victim")
    assert (folder / "reduced" / "gsa.tif").is_file()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["scene"] for r in rows] == [str(victim)]  # the table keeps the id as given


def test_batch_side_files_are_not_written_through_symlinks(tmp_path: Path) -> None:
    """`<out>.png` (--quicklook) or `<out>.metrics.json` (--metrics) as a symlink to a file outside
    OUT_DIR: batch replaced that file (it forces --overwrite on side files of a scene it redoes)."""
    src, out_dir = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out_dir.mkdir()
    make_pair(src, stem="a_")
    victim = tmp_path / "keep.png"
    victim.write_text("keep me")
    for side, flag in (("a_fused.png", "--quicklook"), ("a_fused.tif.metrics.json", "--metrics")):
        link = out_dir / side
        link.symlink_to(victim)
        rc, out, err = cli("batch", src, out_dir, "--method", "gsa", flag, "--json")
        assert rc == 1, err
        (scene,) = json.loads(out)["scenes"]
        assert scene["status"] == "failed" and "symlink" in scene["reason"] and side in scene["reason"]
        assert victim.read_text() == "keep me" and link.is_symlink()
        link.unlink()
    rc, out, err = cli("batch", src, out_dir, "--method", "gsa", "--quicklook", "--metrics", "--json")
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "a_fused.png",
        "a_fused.tif",
        "a_fused.tif.metrics.json",
    ]


def test_a_truncated_cog_is_not_a_complete_product(tmp_path: Path) -> None:
    """A COG keeps its tags in the header, so a copy cut in half still opened with the completion
    tag and batch skipped the scene as done."""
    src, out_dir = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    make_pair(src, n=512, stem="a_", noise=True)
    rc, _, err = cli("batch", src, out_dir, "--method", "gsa", "--cog", "-q")
    assert rc == 0, err
    product = out_dir / "a_fused.tif"
    assert raster.is_complete_output(product)
    data = product.read_bytes()
    product.write_bytes(data[: len(data) // 2])
    with rasterio.open(product) as ds:  # the header (and the tag) is still there
        assert ds.tags().get(raster.COMPLETE_TAG) == "1"
    assert not raster.is_complete_output(product)
    rc, out, err = cli("batch", src, out_dir, "--method", "gsa", "--cog", "--json")
    assert rc == 1, err
    (scene,) = json.loads(out)["scenes"]
    assert scene["status"] == "failed" and "not a complete fusion-cli product" in scene["reason"]
    rc, _, err = cli("batch", src, out_dir, "--method", "gsa", "--cog", "--overwrite", "-q")
    assert rc == 0 and raster.is_complete_output(product), err


def test_report_keeps_out_of_folders_holding_its_inputs(
    tmp_path: Path, fused: tuple[Path, Path, Path]
) -> None:
    """The report folder may not hold the manifest, nor the PAN/MS a product's tags name (only
    --pan/--ms given on the command line were checked); a refusal leaves no img/ behind; a manifest
    that is not text is a one-line error."""
    pan, ms, product = fused
    rep = tmp_path / "rep"
    rep.mkdir()
    manifest = rep / "metrics.csv"
    manifest.write_text(f"product,pan,ms\n{product},{pan},{ms}\n")
    kept = _unchanged(manifest)
    rc, _, err = cli("report", "--manifest", manifest, "-o", rep)
    one_line_error(rc, err, "holds inputs")
    kept()
    assert sorted(p.name for p in rep.iterdir()) == ["metrics.csv"]
    rc, _, err = cli("report", product, "-o", tmp_path)  # the tags name tmp_path/pan.tif, ms.tif
    one_line_error(rc, err, "holds inputs")
    assert not (tmp_path / "img").exists() and not (tmp_path / "index.html").exists()
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    rc, _, err = cli("report", "--manifest", binary, "-o", tmp_path / "r")
    one_line_error(rc, err, "not a readable CSV")


def test_simulate_into_a_file_is_refused_before_reading(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    pan, ms = pair
    kept = _unchanged(pan)
    rc, _, err = cli("simulate", pan, ms, "-o", pan)
    one_line_error(rc, err, "is a file", "folder")
    kept()
    folder = tmp_path / "sim"
    folder.mkdir()
    os.link(pan, folder / "pan_lr.tif")  # a hard link to the input under an output's name
    rc, _, err = cli("simulate", pan, ms, "-o", folder, "--overwrite")
    one_line_error(rc, err, "overwrite an input")
    kept()


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--dtype", "complex64"], ["complex64", "real-valued"]),
        (["--dtype", "bool"], ["bool", "real-valued"]),
        # failed only at the write, "cannot write output o.tif: invalid dtype", naming no valid type
        (["--dtype", "float16"], ["--dtype float16: products are written in uint8,", "float32"]),
        (["--co", "BLOCKYSIZE=abc"], ["BLOCKYSIZE=abc", "whole number"]),
        # GDAL leaves empty tiles unwritten: such a complete product failed the completeness check
        (["--co", "SPARSE_OK=TRUE"], ["SPARSE_OK", "every block"]),
    ],
    ids=["complex", "bool", "float16", "block-size", "sparse"],
)
def test_output_types_and_blocks_gdal_would_take_silently_are_refused(
    tmp_path: Path, pair: tuple[Path, Path], option: list[str], words: list[str]
) -> None:
    pan, ms = pair
    out = tmp_path / "o.tif"
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "gsa", *option)
    one_line_error(rc, err, *words)
    assert not out.exists() and hidden(tmp_path) == []


def test_a_fresh_training_run_does_not_replace_an_earlier_checkpoint(tmp_path: Path) -> None:
    """`fusion train -o DIR` without --resume over an interrupted run's DIR deleted its log at once
    and replaced its checkpoint at the first epoch end: hours of training lost to a missing flag."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"an earlier run's state")
    (out / "train_log.jsonl").write_text('{"epoch": 0}\n')
    kept = _unchanged(out / "checkpoint.pt", out / "train_log.jsonl")
    rc, _, err = cli("train", EXAMPLE_PAN.parent, "--name", "m", "-o", out, "--epochs", "1")
    one_line_error(rc, err, "checkpoint.pt", "--resume")
    kept()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "train_log.jsonl"]


def test_a_symlinked_lock_file_creates_nothing_through_it(tmp_path: Path) -> None:
    """The per-output lock file was opened with O_CREAT through a symlink: the link's target was
    created wherever it pointed."""
    src, out_dir = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out_dir.mkdir()
    make_pair(src, stem="a_")
    (out_dir / ".a_fused.tif.lock").symlink_to(tmp_path / "created_elsewhere")
    rc, out, err = cli("batch", src, out_dir, "--method", "gsa", "--json")
    assert rc == 1, err
    (scene,) = json.loads(out)["scenes"]
    assert scene["status"] == "failed" and "lock file" in scene["reason"] and "symlink" in scene["reason"]
    assert not (tmp_path / "created_elsewhere").exists()


def test_overwrite_drops_the_old_products_gdal_sidecars(tmp_path: Path) -> None:
    """External overviews (gdaladdo -ro, QGIS) and .aux.xml statistics of a replaced product stayed
    beside the new one, and GDAL served them as its overviews and statistics."""
    pan, ms = make_pair(tmp_path, n=512, noise=True)
    out = tmp_path / "o.tif"
    assert cli("pansharpen", pan, ms, "-o", out, "--method", "gsa", "-q")[0] == 0
    with rasterio.Env(TIFF_USE_OVR=True), rasterio.open(out, "r+") as ds:  # external .ovr, as gdaladdo -ro
        ds.build_overviews([2, 4])
    (tmp_path / "o.tif.aux.xml").write_text(
        "<PAMDataset><Metadata><MDI key='STALE'>1</MDI></Metadata></PAMDataset>"
    )
    assert (tmp_path / "o.tif.ovr").is_file()
    dark = tmp_path / "dark"
    dark.mkdir()
    pan2, ms2 = make_pair(dark, n=512)
    for p in (pan2, ms2):  # another scene: a tenth of the brightness
        with rasterio.open(p, "r+") as ds:
            ds.write((ds.read() // 10).astype(ds.dtypes[0]))
    for cog in ([], ["--cog"]):
        rc, _, err = cli("pansharpen", pan2, ms2, "-o", out, "--method", "gsa", "--overwrite", "-q", *cog)
        assert rc == 0, err
        assert not (tmp_path / "o.tif.ovr").exists() and not (tmp_path / "o.tif.aux.xml").exists()
        with rasterio.open(out) as ds:
            assert "STALE" not in ds.tags()
            full = ds.read(1).astype(float).mean()
            factor = ds.overviews(1)[0] if ds.overviews(1) else None
        if factor is not None:  # the COG's own overviews: of the new product
            with rasterio.open(out, overview_level=0) as ov:
                assert abs(ov.read(1).astype(float).mean() - full) < 0.05 * full


@pytest.mark.parametrize(
    "option", [["--stats-mpx", "nan"], ["--stats-mpx", "inf"], ["--max-pixels", "nan"], ["--max-pixels", "0"]]
)
def test_non_finite_sizes_are_one_line_errors(
    tmp_path: Path, pair: tuple[Path, Path], option: list[str]
) -> None:
    """--stats-mpx nan/inf was a ValueError/OverflowError traceback; --max-pixels nan switched the
    size guard off (every comparison with NaN is false)."""
    pan, ms = pair
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "o.tif", "--method", "gsa", *option)
    one_line_error(rc, err, option[0], "must be positive")
    assert not (tmp_path / "o.tif").exists()


def _example_as_uint8(folder: Path) -> tuple[Path, Path]:
    """The example pair (6 MS bands) rescaled to 8 bits, for the codecs that need them (JPEG)."""
    paths = []
    for src in (EXAMPLE_PAN, EXAMPLE_MS):
        with rasterio.open(src) as ds:
            data, profile = ds.read(), ds.profile
        profile.update(dtype="uint8", nodata=None)
        dst = folder / src.name
        with rasterio.open(dst, "w", **profile) as out:
            out.write((data // 256).astype("uint8"))
        paths.append(dst)
    return paths[0], paths[1]


def test_cog_creation_options_are_carried_over_or_refused_before_any_work(tmp_path: Path) -> None:
    """--cog converts the product at the end with the COG driver, which got only the compression
    and its level: --co BLOCKXSIZE/BLOCKYSIZE were dropped silently (256 px tiles), and
    COMPRESS=JPEG on 6 bytes-per-pixel bands failed after the whole scene was fused (exit 1, 'check
    the disk space'). Options are translated to the COG driver's names, or refused up front."""
    pan, ms = _example_as_uint8(tmp_path)
    out = tmp_path / "o.tif"
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "gsa", "--cog", "--co", "COMPRESS=JPEG")
    one_line_error(rc, err, "COMPRESS=JPEG", "COG")
    assert not out.exists() and hidden(tmp_path) == []
    # the same option without --cog: GTiff encodes the bands one by one
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "gsa", "--co", "COMPRESS=JPEG", "-q")
    assert rc == 0, err
    args = ["--cog", "--co", "BLOCKXSIZE=128", "--co", "BLOCKYSIZE=128", "--co", "ZLEVEL=9", "--overwrite"]
    rc, _, err = cli("pansharpen", EXAMPLE_PAN, EXAMPLE_MS, "-o", out, "--method", "gsa", "-q", *args)
    assert rc == 0, err
    with rasterio.open(out) as ds:
        assert ds.block_shapes[0] == (128, 128) and ds.profile["compress"] == "deflate"
    for option, words in (("BLOCKXSIZE=128", ["square"]), ("INTERLEAVE=BAND", ["INTERLEAVE", "COG"])):
        rc, _, err = cli("pansharpen", EXAMPLE_PAN, EXAMPLE_MS, "-o", tmp_path / "x.tif", "--method", "gsa",
                         "--cog", "--co", option)  # fmt: skip
        one_line_error(rc, err, *words)


def test_simulate_replaces_its_three_files_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """simulate --overwrite wrote pan_lr, ms_lr and ms_ref one after another: a failure at the third
    (a full disk, Ctrl-C, a folder in its place) left the new scene's reduced pair beside the old
    scene's reference, a set that scores nonsense without a word."""
    from fusion_cli.raster import write as write_module
    from fusion_cli.wald import simulate_files

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    out = tmp_path / "sim"
    simulate_files(*make_pair(first), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = write_module._write_whole, []

    def full_disk_at_the_third(tmp: Path, image: object) -> None:
        calls.append(tmp)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(tmp, image)

    monkeypatch.setattr(write_module, "_write_whole", full_disk_at_the_third)
    with pytest.raises(OutputWriteError, match="ms_ref.tif"):
        simulate_files(*make_pair(second, noise=True), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old set, whole; no temporaries


def test_ctrl_c_between_simulate_renames_keeps_one_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C right after the first of simulate --overwrite's three renames left the new reference
    beside the old reduced pair (exit 130). The renames now run with the signal held: the interrupt
    comes after them, and the folder holds the new set whole."""
    from fusion_cli.raster import write as write_module
    from fusion_cli.wald import simulate_files

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    out = tmp_path / "sim"
    simulate_files(*make_pair(first), out)
    real, calls = write_module._replace, []

    def interrupted_after_the_first(tmp: Path, target: Path, *args: object) -> None:
        real(tmp, target, *args)
        calls.append(target)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(write_module, "_replace", interrupted_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        simulate_files(*make_pair(second, noise=True), out, overwrite=True)
    assert len(calls) == 3 and hidden(out) == []
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(write_module, "_replace", real)
    simulate_files(*make_pair(second, noise=True), fresh)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        p.name: p.read_bytes() for p in fresh.iterdir()
    }


def test_a_product_another_run_wrote_meanwhile_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --overwrite, the output's absence was checked before the last steps of the write
    (close, verify, COG conversion: seconds on a large scene); a second run's product written in that
    window was replaced at exit 0. Now the product is placed by a hard link, which refuses an
    existing file: one line naming --overwrite, the other product kept, no temporary left."""
    from fusion_cli.raster import write as write_module

    pan, ms = make_pair(tmp_path)
    out = tmp_path / "out" / "x.tif"
    out.parent.mkdir()
    real = write_module.verify_geotiff

    def other_run_finishes_first(path: Path, *args: object) -> None:
        if not out.exists():
            out.write_bytes(b"the other run's product")
        real(path, *args)

    monkeypatch.setattr(write_module, "verify_geotiff", other_run_finishes_first)
    rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "gsa")
    one_line_error(rc, err, "appeared while fusing", "--overwrite")
    assert out.read_bytes() == b"the other run's product" and hidden(out.parent) == []


def test_coregister_refuses_a_shift_from_a_weak_correlation_peak(tmp_path: Path) -> None:
    """--coregister applied whatever shift phase correlation returned: on two unrelated images
    (peak 0.27) it moved the product by 12.8 and 4 PAN px. The real pairs here peak at 0.46-0.75;
    under MIN_SHIFT_PEAK the shift is refused, and without --coregister it is still reported."""
    from fusion_cli.align import MIN_SHIFT_PEAK

    rng = np.random.default_rng(2)
    msi = write_tif(tmp_path / "msi.tif", (rng.random((3, 64, 64)) * 900 + 100).astype("uint16"), 1.0)
    hsi = write_tif(tmp_path / "hsi.tif", (rng.random((8, 16, 16)) * 900 + 100).astype("uint16"), 4.0)
    out = tmp_path / "o.tif"
    rc, _, err = cli("hisr", hsi, msi, "-o", out, "--method", "gsa", "--coregister")
    one_line_error(rc, err, "--coregister", "correlation peak", "fuse without --coregister")
    assert not out.exists()
    rc, stdout, err = cli("hisr", hsi, msi, "-o", out, "--method", "gsa", "--json")
    assert rc == 0, err
    assert json.loads(stdout)["shift_measured"]["peak"] < MIN_SHIFT_PEAK
    rc, stdout, err = cli("pansharpen", EXAMPLE_PAN, EXAMPLE_MS, "-o", tmp_path / "l8.tif", "--method", "gsa",
                          "--coregister", "--json")  # fmt: skip
    assert rc == 0 and json.loads(stdout)["shift_applied"], err
    assert json.loads(stdout)["shift_measured"]["peak"] > MIN_SHIFT_PEAK


def test_a_quicklook_path_that_is_a_folder_is_refused_before_the_product(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    """`-o q.tif --quicklook` with a folder q.png: the product was written, then the run failed on
    the PNG (exit 2 with a complete product left behind)."""
    pan, ms = pair
    (tmp_path / "q.png").mkdir()
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "q.tif", "--method", "gsa", "--quicklook")
    one_line_error(rc, err, "q.png", "is a folder")
    assert not (tmp_path / "q.tif").exists()


def test_report_rgb_beyond_the_bands_and_a_binary_card_are_reported_not_raised(
    tmp_path: Path, fused: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--rgb 9,3,2 on a 4-band product was an IndexError traceback with an empty img/ left (then a
    failed row, after all the scoring: it is refused before any now); a card that is not UTF-8 in the
    weights folder was a UnicodeDecodeError in `fusion info` and in every default-model lookup."""
    pan, ms, product = fused
    rc, out, err = cli("report", product, "-o", tmp_path / "rep", "--rgb", "9,3,2", "--json")
    one_line_error(rc, err, "--rgb 9,3,2 asks for band 9", "has 4")
    assert not (tmp_path / "rep").exists()
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "broken.json").write_bytes(b"\xff\xfe")
    for suffix in (".json", ".safetensors"):
        (weights / f"vhr4{suffix}").write_bytes((REPO / "weights" / f"vhr4{suffix}").read_bytes())
    monkeypatch.setenv("FUSION_WEIGHTS_DIR", str(weights))
    rc, out, err = cli("info")
    assert rc == 0 and "Traceback" not in err and "vhr4" in out + err and "broken.json" in out + err


def test_training_refuses_a_bad_name_and_a_pair_of_another_ratio_before_any_work(tmp_path: Path) -> None:
    """--name "my model" was refused only when the trained model was exported; a PAN four times the
    MS trained with --ratio 2 was cut to its top-left quarter and trained on (pairs that do not show
    the same ground)."""
    rc, _, err = cli("train", EXAMPLE_PAN.parent, "-o", tmp_path / "a", "--name", "my model", "--ratio", "2")
    one_line_error(rc, err, "--name", "my model")
    assert not (tmp_path / "a").exists()
    data = tmp_path / "pairs"
    data.mkdir()
    (data / "1_pan.tif").symlink_to(EXAMPLE_PAN)
    with rasterio.open(EXAMPLE_MS) as ds:  # the MS at half its resolution: the pair is 4 apart
        profile = ds.profile | {"width": ds.width // 2, "height": ds.height // 2}
        half = ds.read(out_shape=(ds.count, ds.height // 2, ds.width // 2))
    with rasterio.open(data / "1_ms.tif", "w", **profile) as dst:
        dst.write(half)
    rc, _, err = cli("train", data, "-o", tmp_path / "b", "--ratio", "2", "--epochs", "1")
    one_line_error(rc, err, "not 2 apart", "--ratio")


def test_fine_tuning_weights_of_another_architecture_is_a_one_line_error(tmp_path: Path) -> None:
    """`fusion train --init weights/landsat.safetensors` with the default --dim 32 (landsat is d = 8)
    ended in torch's state-dict size-mismatch traceback."""
    data = tmp_path / "pairs"
    data.mkdir()
    (data / "1_pan.tif").symlink_to(EXAMPLE_PAN)
    (data / "1_ms.tif").symlink_to(EXAMPLE_MS)
    init = REPO / "weights" / "landsat.safetensors"
    rc, _, err = cli("train", data, "-o", tmp_path / "o", "--ratio", "2", "--epochs", "1", "--init", init)
    one_line_error(rc, err, "--init", "dim 8 (here 32)", "--dim 8")


def test_resume_refuses_settings_the_checkpoint_was_not_trained_with(tmp_path: Path) -> None:
    """--resume with another --dim ended in a state-dict traceback; with another --lr or loss it ran,
    and the card stated the new settings for the whole run."""
    data = tmp_path / "pairs"
    data.mkdir()
    (data / "1_pan.tif").symlink_to(EXAMPLE_PAN)
    (data / "1_ms.tif").symlink_to(EXAMPLE_MS)
    out = tmp_path / "run"
    tiny = ["--ratio", "2", "--dim", "4", "--patch", "32", "--batch", "2", "--steps-per-epoch", "2", "-q"]
    rc, _, err = cli("train", data, "-o", out, *tiny, "--epochs", "1")
    assert rc == 0, err
    for changed, words in ((["--dim", "8"], ["dim 4 -> 8"]), (["--lr", "0.1"], ["lr", "-> 0.1"])):
        rc, _, err = cli("train", data, "-o", out, *tiny, "--epochs", "2", "--resume", *changed)
        one_line_error(rc, err, "--resume", *words)
    rc, _, err = cli("train", data, "-o", out, *tiny, "--epochs", "2", "--resume")
    assert rc == 0, err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 2, 4]  # the baseline, then each epoch's end
    # the card's command replays the training: --resume, which needs the checkpoint, is not in it
    (card,) = [p for p in out.glob("*.json") if p.name != "train_log.jsonl"]
    command = json.loads(card.read_text())["training"]["command"]
    assert "--resume" not in command and "--epochs 2" in command


def test_training_inputs_with_nan_are_named_not_reported_as_divergence(tmp_path: Path) -> None:
    """A float MS with NaN nodata made the first loss NaN: 'training diverged at step 0; lower --lr',
    and a log of bare NaN tokens (not JSON)."""
    data = tmp_path / "pairs"
    data.mkdir()
    (data / "1_pan.tif").symlink_to(EXAMPLE_PAN)
    with rasterio.open(EXAMPLE_MS) as ds:
        ms, profile = ds.read().astype("float32"), ds.profile | {"dtype": "float32", "nodata": float("nan")}
    ms[:, :, :40] = np.nan
    with rasterio.open(data / "1_ms.tif", "w", **profile) as dst:
        dst.write(ms)
    rc, _, err = cli("train", data, "-o", tmp_path / "o", "--ratio", "2", "--epochs", "1")
    one_line_error(rc, err, "1_ms.tif", "NaN")
    assert not (tmp_path / "o" / "train_log.jsonl").exists()


def test_outputs_never_replace_a_device_or_a_fifo(tmp_path: Path) -> None:
    """`-o X --overwrite` renames the product onto X: with X a device node (the audit's was /dev/null
    itself) or a FIFO, exit 0 left a regular file in its place. Refused before any work, also through
    a link, for a quicklook beside the product and for `metrics --csv` (whose append reads it first)."""
    fifo = tmp_path / "fifo.tif"
    os.mkfifo(fifo)
    link = tmp_path / "link.tif"
    link.symlink_to(fifo)
    pan, ms = str(EXAMPLE_PAN), str(EXAMPLE_MS)
    for out in (fifo, link):
        rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "exp", "--overwrite")
        assert rc == 2 and "not a regular file" in err, err
    quicklook = tmp_path / "q.png"
    os.mkfifo(quicklook)
    rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / "q.tif", "--method", "exp", "--quicklook")
    assert rc == 2 and "not a regular file" in err, err
    assert not (tmp_path / "q.tif").exists()
    rc, _, err = cli("metrics", pan, "--ref", pan, "--ratio", "2", "--csv", fifo)
    assert rc == 2 and "not a regular file" in err, err
    assert all(stat.S_ISFIFO(p.stat().st_mode) for p in (fifo, quicklook))


def test_grids_the_alignment_cannot_place_are_refused(tmp_path: Path) -> None:
    """A south-up copy of the example pair (rows flipped, geotransform to match: the same pixels at
    the same places) was fused at exit 0 about one PAN pixel off its north-up product (82 DN mean
    difference); a pair georeferenced by GCPs only was fused as if ungeoreferenced, losing the
    half-pixel offset the GCPs carry. Both are refused with what to do."""
    from rasterio.control import GroundControlPoint
    from rasterio.transform import Affine

    def rewrite(src_path: Path, path: Path, south_up: bool) -> Path:
        with rasterio.open(src_path) as src:
            data, profile, t, crs = src.read(), src.profile, src.transform, src.crs
        if south_up:
            profile["transform"] = Affine(t.a, 0, t.c, 0, -t.e, t.f + t.e * data.shape[1])
            data = data[:, ::-1]
        else:
            profile.pop("transform")
            profile.pop("crs")
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.ascontiguousarray(data))
            if not south_up:
                gcps = [
                    GroundControlPoint(row, col, *(t * (col, row))) for row, col in ((0, 0), (0, 9), (9, 0))
                ]
                dst.gcps = (gcps, crs)
        return path

    for south_up, expect in ((True, "not north-up"), (False, "ground control points")):
        tag = "su" if south_up else "gcp"
        pan = rewrite(EXAMPLE_PAN, tmp_path / f"{tag}_pan.tif", south_up)
        ms = rewrite(EXAMPLE_MS, tmp_path / f"{tag}_ms.tif", south_up)
        rc, _, err = cli("pansharpen", pan, ms, "-o", tmp_path / f"{tag}.tif", "--method", "exp")
        assert rc == 2 and expect in err, err
        assert not (tmp_path / f"{tag}.tif").exists()
        # the Wald protocol and a reference read the same grids: simulate paired the GCP-only pair
        # by size at exit 0, and metrics scored a GCP-only reference placed anywhere pixel by pixel
        rc, _, err = cli("simulate", pan, ms, "-o", tmp_path / f"{tag}_sim", "--sensor", "landsat8")
        assert rc == 2 and expect in err, err
        assert not (tmp_path / f"{tag}_sim").exists()
        rc, _, err = cli("metrics", EXAMPLE_MS, "--ref", ms, "--ratio", "2")
        assert rc == 2 and expect in err, err
    # one input georeferenced, the other not: simulate paired them from the top-left corner
    bare = tmp_path / "bare_ms.tif"
    with rasterio.open(EXAMPLE_MS) as src:
        profile = {k: v for k, v in src.profile.items() if k not in ("crs", "transform")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(bare, "w", **profile) as dst:
                dst.write(src.read())
    rc, _, err = cli("simulate", EXAMPLE_PAN, bare, "-o", tmp_path / "half_sim", "--sensor", "landsat8")
    assert rc == 2 and "the MS has no geotransform but the other input has one" in err, err
    assert not (tmp_path / "half_sim").exists()


def test_an_alpha_band_masks_the_other_bands(tmp_path: Path) -> None:
    """An MS with a seventh band labelled alpha, 0 over a zero collar: the alpha band was left out of
    the fusion but its transparency ignored (GDAL masks by it only when the TIFF declares it an extra
    sample), so the collar was fused as data (values up to 39 723) and skewed GSA's statistics by
    ~8 % elsewhere. Now the product is the one fused with the collar declared nodata, masked alike,
    and the metrics read the alpha band as a mask, not as a band."""
    from rasterio.enums import ColorInterp

    with rasterio.open(EXAMPLE_MS) as src:
        ms, profile = src.read(), src.profile
    ms[:, :, :40] = 0
    alpha = np.zeros_like(ms[:1])
    alpha[..., 40:] = 65535
    with_alpha = tmp_path / "ms_alpha.tif"
    with rasterio.open(with_alpha, "w", **{**profile, "count": 7, "nodata": None}) as dst:
        dst.write(np.concatenate([ms, alpha]))
    with rasterio.open(with_alpha, "r+") as dst:  # GeoTIFF takes a new colour type only on update
        dst.colorinterp = [ColorInterp.gray] + [ColorInterp.undefined] * 5 + [ColorInterp.alpha]
    flagged = tmp_path / "ms_nodata.tif"
    with rasterio.open(flagged, "w", **{**profile, "nodata": 0}) as dst:
        dst.write(ms)
    products = []
    for ms_path in (with_alpha, flagged):
        out = tmp_path / f"{ms_path.stem}_gsa.tif"
        rc, _, err = cli(
            "pansharpen", EXAMPLE_PAN, ms_path, "-o", out, "--method", "gsa", "--sensor", "landsat8"
        )
        assert rc == 0, err
        with rasterio.open(out) as ds:
            products.append((ds.read(), ds.read_masks(1) > 0, ds.count))
    (a, a_valid, a_count), (b, b_valid, _) = products
    assert a_count == 6 and not a_valid[:, :78].any() and a_valid[:, 82:].all()
    np.testing.assert_array_equal(a_valid, b_valid)
    np.testing.assert_array_equal(a[:, a_valid], b[:, b_valid])
    rc, out, err = cli("metrics", with_alpha, "--ref", flagged, "--ratio", "1", "--json")
    assert rc == 0 and json.loads(out)["bands"] == 6, err
    # what the transparent pixels hold does not count against --dn-max either
    with rasterio.open(with_alpha, "r+") as dst:
        filled = dst.read(1)
        filled[:, :40] = 65535
        dst.write(filled, 1)
    out = tmp_path / "dn.tif"
    rc, _, err = cli("pansharpen", EXAMPLE_PAN, with_alpha, "-o", out, "--method", "gsa", "--dn-max", "30000")
    assert rc == 0, err


def test_a_dn_ceiling_below_the_data_is_refused(tmp_path: Path) -> None:
    """`--dn-max 100` on the 16-bit example clipped every product pixel to 100 (a constant image, exit 0,
    for a classical method and for the network alike); a wrong NBITS tag does the same silently."""
    out = tmp_path / "o.tif"
    for method in (["--method", "gsa"], []):  # a classical method and the default network
        rc, _, err = cli("pansharpen", EXAMPLE_PAN, EXAMPLE_MS, "-o", out, "--dn-max", "100", *method)
        assert rc == 2 and "exceed --dn-max 100" in err and not out.exists(), err
    rc, _, err = cli("pansharpen", EXAMPLE_PAN, EXAMPLE_MS, "-o", out, "--method", "gsa", "--dn-max", "65535")
    assert rc == 0 and out.exists(), err


def test_a_nodata_value_the_pixels_cannot_hold_is_refused(tmp_path: Path) -> None:
    """`--nodata nan` on uint16 inputs masked nothing and wrote a product whose nodata was 0 (neither
    the value given nor any input's); -1, inf and 1e30 masked nothing either. All exit 0 before."""
    out = tmp_path / "o.tif"
    for value in ("nan", "-1", "inf", "1e30", "0.5"):
        rc, _, err = cli(
            "pansharpen", EXAMPLE_PAN, EXAMPLE_MS, "-o", out, "--method", "exp", "--nodata", value
        )
        assert rc == 2 and "cannot occur in the PAN's uint16 pixels" in err and not out.exists(), (value, err)
    rc, _, err = cli(
        "pansharpen", EXAMPLE_PAN, EXAMPLE_MS, "-o", out, "--method", "exp", "--ms-nodata", "65535"
    )
    assert rc == 0, err


def test_a_network_refuses_negative_dn(tmp_path: Path) -> None:
    """A network reads DN from 0 up to its scale: the example shifted to signed DN (most pixels
    negative) came out of the default model with its sign lost (int8 data: band means -46 -> +57,
    exit 0). Refused for the network, before it runs; a classical method fuses such data."""
    shifted = []
    for src_path, name in ((EXAMPLE_PAN, "pan.tif"), (EXAMPLE_MS, "ms.tif")):
        with rasterio.open(src_path) as src:
            data, profile = src.read().astype(np.int32) - 20000, src.profile
        with rasterio.open(tmp_path / name, "w", **{**profile, "dtype": "int16"}) as dst:
            dst.write(data.astype(np.int16))
        shifted.append(tmp_path / name)
    rc, _, err = cli("pansharpen", *shifted, "-o", tmp_path / "net.tif")
    assert rc == 2 and "negative" in err and not (tmp_path / "net.tif").exists(), err
    rc, _, err = cli("pansharpen", *shifted, "-o", tmp_path / "gsa.tif", "--method", "gsa", "-q")
    assert rc == 0, err


@pytest.mark.parametrize(
    ("error", "code"),
    [(errno.EROFS, 2), (errno.EACCES, 2), (errno.ENOSPC, 1), (errno.EIO, 1)],
    ids=["read-only", "denied", "disk-full", "io-error"],
)
def test_an_unusable_path_is_bad_input_a_failing_system_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, code: int
) -> None:
    """`fusion simulate/report/evaluate -o` on a read-only mount exited 1 as if the system had failed;
    a path the user chose and cannot use is bad input (exit 2), a full disk or an I/O error stays 1.
    Also when the OS error is the cause of an OutputWriteError."""
    from fusion_cli import wald

    def raising(exc: BaseException) -> Callable[..., None]:
        def simulate_files(*args: object, **kwargs: object) -> None:
            raise exc

        return simulate_files

    os_error = OSError(error, os.strerror(error), str(tmp_path / "sim"))
    wrapped = OutputWriteError(f"cannot write {tmp_path / 'sim'}: {os.strerror(error)}")
    wrapped.__cause__ = os_error
    for exc in (os_error, wrapped):
        monkeypatch.setattr(wald, "simulate_files", raising(exc))
        rc, _, err = cli("simulate", EXAMPLE_PAN, EXAMPLE_MS, "-o", tmp_path / "sim", "--sensor", "landsat8")
        assert rc == code and err.startswith("Error:") and "Traceback" not in err, err


def test_a_dead_band_is_named_with_how_to_leave_it_out(tmp_path: Path) -> None:
    """A float MS with one band NaN everywhere (a dead band) was told to declare NaN nodata, which then
    masked every pixel ("no valid pixel to fuse"). Now the band is named with --bands as the way out,
    and fusing the other bands works."""
    with rasterio.open(EXAMPLE_MS) as src:
        ms, profile = src.read().astype(np.float32), src.profile
    ms[3] = np.nan
    dead = tmp_path / "ms_dead.tif"
    with rasterio.open(dead, "w", **{**profile, "dtype": "float32"}) as dst:
        dst.write(ms)
    out = tmp_path / "o.tif"
    rc, _, err = cli("pansharpen", EXAMPLE_PAN, dead, "-o", out, "--method", "gsa")
    assert rc == 2 and "band(s) 4 are NaN or infinite at every pixel" in err and "--bands" in err, err
    rc, _, err = cli("pansharpen", EXAMPLE_PAN, dead, "-o", out, "--method", "gsa", "--bands", "1,2,3,5,6")
    assert rc == 0 and out.exists(), err


def test_a_ctrl_c_while_a_pool_starts_its_thread_still_waits_for_it(monkeypatch) -> None:
    """Ctrl-C landing while `submit` started a worker thread (Thread.start waits for it to run) left
    the thread unknown to the pool: its shutdown did not wait, the queued write went on after the
    output was closed, and GDAL crashed the exiting process (SIGSEGV/SIGABRT, about 1 interrupted
    batch in 60 on a loaded machine). The pools the pipeline and batch use hold Ctrl-C over it."""
    import os
    import signal
    import threading
    import time

    from fusion_cli.signals import ThreadPool

    start = threading.Thread.start

    def start_then_ctrl_c(self: threading.Thread) -> None:
        start(self)
        if threading.current_thread() is threading.main_thread():
            os.kill(os.getpid(), signal.SIGINT)  # lands in the wait for the new thread

    monkeypatch.setattr(threading.Thread, "start", start_then_ctrl_c)
    finished: list[str] = []

    def write() -> None:
        time.sleep(0.3)
        finished.append("write")

    with pytest.raises(KeyboardInterrupt):
        with ThreadPool(max_workers=1) as pool:
            pool.submit(write)
    assert finished == ["write"]  # the pool's exit waited for it before the interrupt went on


def test_a_constant_pan_is_refused_everywhere(tmp_path: Path) -> None:
    """A constant PAN (a dead band, the wrong file): BT-H and the networks wrote an all-zero product
    at exit 0 (NaN cast to uint16), MTF-GLP-HPM zeroed 6 % of the pixels, `evaluate` blamed the
    reference, and `metrics --pan` scored D_s 0 / QNR 0.9999 (helper). Each now refuses it, naming
    the file, before any output exists."""
    with rasterio.open(EXAMPLE_PAN) as src:
        profile = src.profile
    flat = tmp_path / "flat_pan.tif"
    with rasterio.open(flat, "w", **profile) as dst:
        dst.write(np.full((1, profile["height"], profile["width"]), 9000, np.uint16))
    expect = "flat_pan.tif is 9000 on every valid pixel"
    for method in (["--method", "brovey"], ["--method", "mtf-glp-hpm"], []):
        rc, _, err = cli("pansharpen", flat, EXAMPLE_MS, "-o", tmp_path / "o.tif", *method)
        assert rc == 2 and expect in err, err
        assert not (tmp_path / "o.tif").exists()
    rc, _, err = cli("evaluate", flat, EXAMPLE_MS, "--methods", "gsa", "-o", tmp_path / "ev")
    assert rc == 2 and expect in err, err
    rc, _, err = cli("pansharpen", EXAMPLE_PAN, EXAMPLE_MS, "-o", tmp_path / "real.tif", "--method", "gsa")
    assert rc == 0, err
    rc, _, err = cli("metrics", tmp_path / "real.tif", "--pan", flat, "--ms", EXAMPLE_MS)
    assert rc == 2 and expect in err, err
    with rasterio.open(EXAMPLE_PAN) as src:
        pan = src.read().astype(np.float32)
    with rasterio.open(EXAMPLE_MS) as src:
        ms = src.read().astype(np.float32)
    from fusion_cli.pipeline import fuse_arrays, make_fuser

    with pytest.raises(FusionError, match="PAN array is 9000 on every valid pixel"):
        fuse_arrays(np.full_like(pan, 9000), ms, make_fuser(method="gsa", ratio=2, ms_bands=6))
    # a PAN constant but for one pixel is no constant PAN (the whole-file check after a flat sample)
    with rasterio.open(flat, "r+") as dst:
        dst.write(np.full((1, 1, 1), 9001, np.uint16), window=rasterio.windows.Window(5, 3, 1, 1))
    rc, _, err = cli("pansharpen", flat, EXAMPLE_MS, "-o", tmp_path / "o.tif", "--method", "gsa")
    assert rc == 0, err


def test_non_finite_fused_values_are_an_error_not_zeros(tmp_path: Path) -> None:
    """Whatever makes a method give NaN, the product must not hold it as 0 at exit 0."""
    import torch
    from pipeline_fusers import DetailFuser

    from fusion_cli.pipeline import FuseOptions, fuse_files

    class NaNFuser(DetailFuser):
        def fuse(self, pan: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
            out = super().fuse(pan, ms)
            out[:, :, 5, 5] = float("nan")
            return out

    with pytest.raises(FusionError, match="gave 6 non-finite values"):
        fuse_files(EXAMPLE_PAN, EXAMPLE_MS, tmp_path / "o.tif", NaNFuser(2), FuseOptions())
    assert not (tmp_path / "o.tif").exists()


def test_ratio_methods_refuse_dn_crossing_zero(tmp_path: Path) -> None:
    """int16 DN offset below 0 (calibrated data with a negative offset): BT-H, MTF-GLP-HPM and
    MTF-GLP-HS divide by intensities and multiply by PAN ratios, and ran to the type's limits at exit 0
    (ERGAS 472, 600, 531 against GSA's 24.5, helper). They refuse such data, as the networks do;
    `evaluate --methods classical` leaves them out with a warning and scores the others."""
    paths = {}
    for name, src in (("pan", EXAMPLE_PAN), ("ms", EXAMPLE_MS)):
        with rasterio.open(src) as ds:
            data, profile = ds.read().astype(np.int32) - 12000, ds.profile
        paths[name] = tmp_path / f"signed_{name}.tif"
        with rasterio.open(paths[name], "w", **{**profile, "dtype": "int16"}) as dst:
            dst.write(data.astype(np.int16))
    for method in ("brovey", "mtf-glp-hpm", "mtf-glp-hs"):
        out = tmp_path / "o.tif"
        rc, _, err = cli("pansharpen", paths["pan"], paths["ms"], "-o", out, "--method", method)
        assert rc == 2 and "values are negative" in err and "additive --method" in err, err
        assert not (tmp_path / "o.tif").exists()
    rc, _, err = cli("pansharpen", paths["pan"], paths["ms"], "-o", tmp_path / "o.tif", "--method", "gsa")
    assert rc == 0, err
    rc, _, err = cli("evaluate", paths["pan"], paths["ms"], "--methods", "brovey,gsa", "-o", tmp_path / "e1")
    assert rc == 2 and "values are negative" in err, err
    # (--no-full: the offset PAN is no longer in the MS's units, which the full-resolution step checks)
    proc = cli_process(
        "evaluate", paths["pan"], paths["ms"], "--methods", "classical", "--no-full", "-o", tmp_path / "e2"
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "brovey left out" in err and "mtf-glp-hpm left out" in err
    with open(tmp_path / "e2" / "summary.csv", newline="") as f:
        methods = {row["method"] for row in csv.DictReader(f)}
    assert {"gsa", "mtf-glp", "bdsd-pc"} <= methods and not methods & {"brovey", "mtf-glp-hpm", "mtf-glp-hs"}


def test_ratio_methods_take_round_off_below_zero_beside_a_zero_collar(tmp_path: Path) -> None:
    """The Wald-reduced MS of WorldView-2 pair 2 (uint16, 32 % zero collar) rings to -7.5e-9 beside
    the collar on 2 % of its values: float round-off, not an offset. `evaluate --methods gsa,brovey`
    failed on it with "offset the data to non-negative DN" (and `classical` left out BT-H,
    MTF-GLP-HPM and MTF-GLP-HS); it scores both."""
    pan, ms = need_shared("wv2_spacenet6", "pan_2.tif"), need_shared("wv2_spacenet6", "ms_2.tif")
    rc, _, err = cli(
        "evaluate", pan, ms, "--methods", "gsa,brovey", "--sensor", "wv2", "--no-full", "-o", tmp_path / "e"
    )
    assert rc == 0, err
    with open(tmp_path / "e" / "summary.csv", newline="") as f:
        ergas = {row["method"]: float(row["ERGAS"]) for row in csv.DictReader(f)}
    assert set(ergas) == {"gsa", "brovey"} and all(0 < v < 30 for v in ergas.values()), ergas


def test_a_symlink_loop_or_a_file_for_a_folder_is_one_line_of_bad_input(tmp_path: Path) -> None:
    """Python 3.11's Path.resolve() raises RuntimeError on a symlink loop: pansharpen, simulate and
    batch's --log printed 60 lines of traceback at exit 1. `evaluate -o` / `train -o` naming a file
    said "[Errno 17] File exists ... (check the disk space)" at exit 1."""
    loop = tmp_path / "loop1"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    for args in (
        ("pansharpen", EXAMPLE_PAN, loop, "-o", tmp_path / "x.tif", "--method", "gsa"),
        ("simulate", loop, EXAMPLE_MS, "-o", tmp_path / "sim"),
    ):
        rc, _, err = cli(*args)
        one_line_error(rc, err, "Symlink loop")
    (tmp_path / "afile.tif").write_bytes(b"not a folder")
    rc, _, err = cli("evaluate", EXAMPLE_PAN, EXAMPLE_MS, "--methods", "gsa", "-o", tmp_path / "afile.tif")
    one_line_error(rc, err, "is a file; give a folder")
    assert (tmp_path / "afile.tif").read_bytes() == b"not a folder"
    assert not (tmp_path / "x.tif").exists() and not (tmp_path / "sim").exists()


def test_output_names_a_folder_or_is_too_long_for_its_temporary(tmp_path: Path) -> None:
    """`-o newname/` (no such folder) wrote a file named `newname` at exit 0: Path drops the slash.
    A 240-character name (legal: NAME_MAX is 255) failed after the whole fusion with "[Errno 36] File
    name too long" on its temporary, at exit 1, blaming the disk. Both are refused before any work."""
    base = ("pansharpen", EXAMPLE_PAN, EXAMPLE_MS, "--method", "gsa", "-o")
    rc, _, err = cli(*base, f"{tmp_path / 'newname'}/")
    one_line_error(rc, err, "names a folder")
    rc, _, err = cli(*base, tmp_path / ("a" * 240 + ".tif"))
    one_line_error(rc, err, "is 244 bytes", "at most 221 bytes")
    assert list(tmp_path.iterdir()) == []
    rc, _, err = cli(*base, tmp_path / ("a" * 217 + ".tif"), "--cog")  # the longest: its .ovr too
    assert rc == 0, err


def test_every_command_lists_its_warnings_in_json_and_holds_them_under_q(tmp_path: Path) -> None:
    """`metrics` and `evaluate` printed their warnings under -q, and their JSON had no warnings list;
    evaluate dropped the pipeline's zero-collar warning (WorldView-2 pair 2: a 32 % collar scored as
    data) and advised --zero-nodata, which evaluate lacks."""
    rc, stdout, err = cli("metrics", EXAMPLE_MS, "--ref", EXAMPLE_MS, "--ratio", "2", "--json", "-q")
    assert rc == 0 and err == "", err
    assert [w for w in json.loads(stdout)["warnings"] if w.startswith("PSNR is inf")], stdout
    pan, ms = need_shared("wv2_spacenet6", "pan_2.tif"), need_shared("wv2_spacenet6", "ms_2.tif")
    args = ("evaluate", pan, ms, "--methods", "gsa", "--sensor", "wv2", "--no-full", "-o", tmp_path / "e")
    rc, stdout, err = cli(*args, "--json", "-q")
    assert rc == 0 and err == "", err
    said = json.loads(stdout)["warnings"]
    assert len(said) == 1 and "pan_2 at reduced resolution: 19% of the MS pixels are 0" in said[0], said
    assert "gdal_translate -a_nodata 0" in said[0]
    rc, _, err = cli(*args, "--overwrite")
    assert rc == 0 and err.count("Warning: pan_2 at reduced resolution") == 1, err


def test_report_refuses_missing_inputs_and_names_each_failed_product(tmp_path: Path) -> None:
    """`report b.tif --ref nope.tif -q` exited 1 with nothing printed (the reason only in the report's
    metrics.json); `--pan` without `--ms` the same. Both are one line at exit 2, nothing written. A
    product that fails alone is named with its reason on stderr, -q or not, and in the JSON."""
    product = tmp_path / "prod.tif"
    product.write_bytes(EXAMPLE_MS.read_bytes())
    for args, words in (
        (("--ref", tmp_path / "nope.tif"), "file not found"),
        (("--pan", EXAMPLE_PAN), "give --pan and --ms together"),
    ):
        rc, _, err = cli("report", product, *args, "-o", tmp_path / "r", "-q")
        one_line_error(rc, err, words)
        assert not (tmp_path / "r").exists()
    rc, stdout, err = cli("report", product, "--ref", EXAMPLE_MS, "-o", tmp_path / "r", "-q", "--json")
    assert (
        rc == 1
        and err.strip()
        == "Error: prod: reduced-resolution metrics need --ratio (PAN/MS pixel-size ratio, e.g. 4)"
    ), err
    assert json.loads(stdout)["errors"] == [{"name": "prod", "error": err.strip()[len("Error: prod: ") :]}]


def test_an_overlap_over_the_tile_and_a_file_for_a_training_folder_are_said(tmp_path: Path) -> None:
    """`--overlap 9999` was cut to the tile without a word (the JSON said 640); `train FILE` said
    "training folder not found" of a file that exists."""
    args = ("pansharpen", EXAMPLE_PAN, EXAMPLE_MS, "-o", tmp_path / "o.tif", "--method", "gsa")
    rc, stdout, err = cli(*args, "--overlap", "9999", "--json", "-q")
    assert rc == 0, err
    summary = json.loads(stdout)
    said = f"--overlap 9999 is over the tile ({summary['tile']} PAN px); blending {summary['overlap']}"
    assert summary["warnings"] == [said] and summary["overlap"] == summary["tile"], summary
    rc, _, err = cli("train", EXAMPLE_PAN, "-o", tmp_path / "t")
    one_line_error(rc, err, "is a file; give the folder of training pairs")


def test_a_refused_json_run_still_prints_one_json_document(tmp_path: Path) -> None:
    """With --json, a refused run (exit 2) left stdout empty: a script parsing it failed on no JSON at
    all. It gets the error and the exit code as JSON; stderr keeps its one line."""
    for extra in (("--method", "gsa"), ("--method", "nosuch")):
        rc, stdout, err = cli(
            "pansharpen", tmp_path / "nope.tif", EXAMPLE_MS, "-o", tmp_path / "o.tif", *extra, "--json"
        )
        one_line_error(rc, err)
        doc = json.loads(stdout)
        assert doc["exit_code"] == 2 and f"Error: {doc['error']}" == err.strip() and doc["warnings"] == []


def test_a_band_labelled_alpha_that_holds_data_is_fused(tmp_path: Path) -> None:
    """GDAL labels band 4 of every 4-band Byte GeoTIFF alpha (RGBA), so an 8-bit B, G, R, NIR MS
    written with GDAL's defaults lost its NIR to a mask at exit 0 (3 bands out; vhr4 said "the MS has
    3 bands", helper). Such a band is fused as a band, with a warning; a real alpha (0 or 255 on
    most pixels) still masks."""
    from fusion_cli.raster.nodata import alpha_band

    with rasterio.open(EXAMPLE_MS) as src:
        ms, profile = src.read(), src.profile
    scaled = np.clip(ms[[0, 1, 2, 3]] / 120, 1, 254).astype(np.uint8)  # B, G, R, NIR as 8-bit DN
    rgba = tmp_path / "ms_u8.tif"
    with rasterio.open(rgba, "w", **{**profile, "count": 4, "dtype": "uint8", "nodata": None}) as dst:
        dst.write(scaled)
    with rasterio.open(rgba) as ds:
        assert ds.colorinterp[3] == rasterio.enums.ColorInterp.alpha  # GDAL's default, not ours
    with rasterio.open(EXAMPLE_PAN) as src:
        pan, pan_profile = src.read(), src.profile
    pan8 = tmp_path / "pan_u8.tif"
    with rasterio.open(pan8, "w", **{**pan_profile, "dtype": "uint8"}) as dst:
        dst.write(np.clip(pan / 120, 1, 254).astype(np.uint8))
    out = tmp_path / "o.tif"
    proc = cli_process("pansharpen", pan8, rgba, "-o", out, "--method", "gsa")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.count("band 4 of") == 1 and "labelled alpha but holds data" in err
    # -q holds it back and --json lists it (it printed under -q, and the JSON's list was empty)
    rc, stdout, err = cli(
        "pansharpen", pan8, rgba, "-o", out, "--method", "gsa", "--overwrite", "-q", "--json"
    )
    assert rc == 0 and err == "", err
    assert [w for w in json.loads(stdout)["warnings"] if "labelled alpha but holds data" in w], stdout
    with rasterio.open(out) as o:
        assert o.count == 4 and o.colorinterp[3] != rasterio.enums.ColorInterp.alpha
        assert abs(float(o.read(4).mean()) / float(scaled[3].mean()) - 1) < 0.05
        assert not (o.read_masks(1) == 0).any()
    # data with a zero collar over most of the scene (a tile at a scene's edge) stay data (reviewer)
    collared = scaled.copy()
    collared[:, :, :200] = 0
    with rasterio.open(rgba, "w", **{**profile, "count": 4, "dtype": "uint8", "nodata": None}) as dst:
        dst.write(collared)
    with rasterio.open(rgba) as ds:
        assert alpha_band(ds) is None
    # a transparency band (0 over a collar, 255 elsewhere) is still an alpha band
    alpha = np.full(scaled.shape[1:], 255, np.uint8)
    alpha[:, :40] = 0
    with rasterio.open(rgba, "w", **{**profile, "count": 4, "dtype": "uint8", "nodata": None}) as dst:
        dst.write(np.concatenate([scaled[:3], alpha[None]]))
    with rasterio.open(rgba) as ds:
        assert alpha_band(ds) == 4


def test_scenes_too_small_to_fuse_are_refused(tmp_path: Path) -> None:
    """A few MS pixels were fused at exit 0 with products far off the MS (band means: MTF-GLP-HPM
    1.98x on 5 x 7 MS px, BDSD-PC 1.41x on 4 x 4, helper): under 8 x 8 MS pixels of overlap the
    fusion refuses, naming the size; 8 x 8 is fused."""
    from conftest import write_example_crop
    from rasterio.windows import Window

    for size, expect in ((7, 2), (9, 0)):  # Landsat's half-pixel offset: one MS row and column less
        pan, ms = write_example_crop(tmp_path, f"s{size}", Window(100, 60, 40, size))
        out = tmp_path / f"s{size}.tif"
        rc, _, err = cli("pansharpen", pan, ms, "-o", out, "--method", "mtf-glp-hpm")
        assert rc == expect, err
        if expect:
            assert "overlap on 6 x 39 MS pixels: fusion needs at least 8 x 8" in err and not out.exists()


def test_an_input_replaced_while_it_is_fused_leaves_no_product(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The product's FUSION_REQUEST fingerprints were taken from the paths after the statistics
    pass: an MS replaced by another process meanwhile was recorded as the input of a product fused
    from the old one, and a rerun of the batch skipped that stale product as up to date; `metrics`
    then scored it against the replacement (helper: HQNR 0.079 at exit 0). The fingerprints are now
    taken before anything is read, and a product whose input changed during the run is not written."""
    import shutil

    from fusion_cli.paths import sha256_file
    from fusion_cli.pipeline import api, pansharpen

    pan, ms = tmp_path / "pan.tif", tmp_path / "ms.tif"
    shutil.copy(REPO / "examples" / "landsat8_pan.tif", pan)
    shutil.copy(REPO / "examples" / "landsat8_ms.tif", ms)
    gather, fuse_tiles = api.gather_stats, api.run

    def flip() -> None:  # another process writes a new MS, as `cp other ms.tif.new && mv ... ms.tif`
        new = tmp_path / ".ms_new.tif"
        shutil.copy(ms, new)
        with rasterio.open(new, "r+") as ds:
            ds.write(ds.read()[:, ::-1])
        new.replace(ms)

    def after_the_statistics(*args: object, **kwargs: object) -> None:
        gather(*args, **kwargs)
        flip()

    def after_the_tiles(*args: object, **kwargs: object) -> None:  # the tags made, the blocks written
        fuse_tiles(*args, **kwargs)
        flip()

    for name, step in (("gather_stats", after_the_statistics), ("run", after_the_tiles)):
        monkeypatch.setattr(api, name, step)
        with pytest.raises(FusionError, match="the MS .*ms.tif changed while it was fused"):
            pansharpen(pan, ms, tmp_path / "out.tif", method="gsa")
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []
        monkeypatch.undo()
    summary = pansharpen(pan, ms, tmp_path / "out.tif", method="gsa")  # the new MS, settled: fused
    with rasterio.open(summary.output) as ds:
        assert json.loads(ds.tags()["FUSION_REQUEST"])["ms"]["sha256"] == sha256_file(ms)


def test_simulate_and_evaluate_take_two_files_and_name_the_scene_that_fails(tmp_path: Path) -> None:
    """With --ratio, `simulate` and `evaluate` took one file given twice (evaluate scored Q2n 0.99 at
    exit 0) where pansharpen and hisr refuse it. A scene of several that fails stopped evaluate with a
    message naming no scene. And fusing simulate's pair by hand without --sensor used generic gains
    silently (ERGAS 3.40 against evaluate's 3.38): it is said (helper)."""
    ms = REPO / "examples" / "landsat8_ms.tif"
    pan = REPO / "examples" / "landsat8_pan.tif"
    rc, _, err = cli("simulate", ms, ms, "-o", tmp_path / "sim_same", "--ratio", "2")
    one_line_error(rc, err, "the PAN and MS are the same file")
    rc, _, err = cli("evaluate", ms, ms, "--ratio", "2", "--methods", "exp", "-o", tmp_path / "ev")
    one_line_error(rc, err, "the PAN and MS are the same file")
    assert not (tmp_path / "sim_same").exists() and not (tmp_path / "ev").exists()
    bad = tmp_path / "bad_ms.tif"
    with rasterio.open(ms) as src:
        profile, data = src.profile, src.read()
    profile.pop("crs")
    profile.pop("transform")  # no georeferencing beside a georeferenced PAN: refused
    with warnings.catch_warnings(), rasterio.open(bad, "w", **profile) as dst:
        warnings.simplefilter("ignore")
        dst.write(data)
    manifest = tmp_path / "scenes.csv"
    manifest.write_text(f"pan,ms,id\n{pan},{ms},good\n{pan},{bad},broken\n")
    rc, _, err = cli("evaluate", manifest, "--methods", "exp", "--no-full", "-o", tmp_path / "ev2")
    error_line(rc, err, 2, "scene broken (")
    rc, _, err = cli("simulate", pan, ms, "-o", tmp_path / "sim", "--sensor", "landsat8")
    assert rc == 0, err
    sim = tmp_path / "sim"
    from fusion_cli.pipeline import pansharpen

    summary = pansharpen(sim / "pan_lr.tif", sim / "ms_lr.tif", tmp_path / "by_hand.tif", method="mtf-glp")
    assert any("simulated for landsat8" in w and "--sensor landsat8" in w for w in summary.warnings)
    # GSA's product does not depend on the MTF gains: nothing to say (reviewer)
    summary = pansharpen(sim / "pan_lr.tif", sim / "ms_lr.tif", tmp_path / "gsa.tif", method="gsa")
    assert not any("simulated for" in w for w in summary.warnings)
