"""GDAL virtual paths as inputs of `fusion batch`, `fusion evaluate` and `fusion report`: a
`/vsizip/` member of a zip of the in-repository example scores and fuses exactly like the file it
holds (`pansharpen` and `metrics` are covered in test_cli_pansharpen)."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import EXAMPLE_MS, EXAMPLE_PAN


def run(*args: str | Path) -> tuple[int, str, str]:
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


def one_line_error(rc: int, err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("Error: "), err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def zipped(tmp_path: Path) -> dict[str, str]:
    """The example zipped into tmp_path: GDAL paths of its PAN and MS, and of the archive itself."""
    archive = tmp_path / "example.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in (EXAMPLE_PAN, EXAMPLE_MS):
            z.write(path, f"scene/{path.name}")
    root = f"/vsizip/{archive}/scene"
    assert root.startswith("/vsizip//")  # an absolute archive path keeps the `//` GDAL needs
    return {"pan": f"{root}/{EXAMPLE_PAN.name}", "ms": f"{root}/{EXAMPLE_MS.name}", "dir": root}


def test_batch_fuses_vsizip_inputs_of_a_manifest(tmp_path: Path, zipped: dict[str, str]) -> None:
    """Manifest rows may name GDAL paths (kept as written, not joined to IN_DIR): the zipped scene
    fuses to the same product as the plain files; a virtual IN_DIR is refused in one line, since
    batch does not list folders inside archives."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"pan,ms,out\n{zipped['pan']},{zipped['ms']},zip.tif\n{EXAMPLE_PAN},{EXAMPLE_MS},plain.tif\n"
    )
    out_dir = tmp_path / "out"
    rc, out, err = run("batch", tmp_path, out_dir, "--manifest", manifest, "--method", "gsa", "--json", "-q")
    assert rc == 0, err
    scenes = {Path(s["out"]).name: s for s in json.loads(out)["scenes"]}
    assert {s["status"] for s in scenes.values()} == {"done"}
    assert scenes["zip.tif"]["pan"] == zipped["pan"] and scenes["zip.tif"]["ms"] == zipped["ms"]
    with rasterio.open(out_dir / "zip.tif") as a, rasterio.open(out_dir / "plain.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.transform == b.transform and a.shape == (319, 639)
        assert a.tags()["FUSION_MS"] == zipped["ms"]  # recorded as given, so metrics reads it again
    rc, _, err = run("batch", zipped["dir"], tmp_path / "o2", "--method", "gsa")
    one_line_error(rc, err, "GDAL virtual path", "--manifest")
    assert not (tmp_path / "o2").exists()


def test_evaluate_reads_vsizip_pan_and_ms(tmp_path: Path, zipped: dict[str, str]) -> None:
    """`fusion evaluate PAN MS` with both inside a zip scores exactly as with the files (reduced and
    full resolution); a lone GDAL path is not taken for a folder."""
    tables = {}
    for name, (pan, ms) in {"zip": (zipped["pan"], zipped["ms"]), "plain": (EXAMPLE_PAN, EXAMPLE_MS)}.items():
        rc, out, err = run("evaluate", pan, ms, "--methods", "exp", "--sensor", "landsat8", "-o",
                           tmp_path / name, "--no-keep", "--json", "-q")  # fmt: skip
        assert rc == 0, err
        tables[name] = json.loads(out)["summary"][0]
    strip = {
        n: {k: v for k, v in t.items() if isinstance(v, float) and not k.startswith("time")}
        for n, t in tables.items()
    }
    assert {"Q2n", "ERGAS", "QNR"} <= set(strip["zip"])
    assert strip["zip"] == pytest.approx(strip["plain"], rel=1e-12)
    assert 0 < strip["zip"]["Q2n"] < 1 and 0 <= strip["zip"]["D_lambda"] < 0.05
    rc, _, err = run("evaluate", zipped["dir"], "--methods", "exp", "-o", tmp_path / "x")
    one_line_error(rc, err, "GDAL virtual paths are rasters")


def test_report_reads_vsizip_products_and_inputs(tmp_path: Path, zipped: dict[str, str]) -> None:
    """`fusion report` takes a product inside a zip and --pan/--ms inside another: the same scores
    as the plain files, the product named by its member name."""
    from fusion_cli.pipeline import pansharpen

    product = tmp_path / "l8_gsa.tif"
    pansharpen(EXAMPLE_PAN, EXAMPLE_MS, product, method="gsa", sensor="landsat8")
    with zipfile.ZipFile(tmp_path / "products.zip", "w") as z:
        z.write(product, product.name)
    zprod = f"/vsizip/{tmp_path / 'products.zip'}/{product.name}"
    rows = {}
    for name, args in {
        "zip": (zprod, "--pan", zipped["pan"], "--ms", zipped["ms"]),
        "plain": (product, "--pan", EXAMPLE_PAN, "--ms", EXAMPLE_MS),
    }.items():
        rc, out, err = run("report", *args, "-o", tmp_path / f"rep_{name}", "--json", "-q")
        assert rc == 0 and json.loads(out)["failed"] == 0, err
        (rows[name],) = json.loads((tmp_path / f"rep_{name}" / "metrics.json").read_text())
    assert rows["zip"]["name"] == rows["plain"]["name"] == "l8_gsa"
    assert rows["zip"]["ms"] == zipped["ms"] and rows["zip"]["mode"] == "full"
    for key in ("QNR", "D_lambda", "D_s", "HQNR"):
        assert rows["zip"][key] == pytest.approx(rows["plain"][key], rel=1e-12), key
    assert 0 < rows["zip"]["QNR"] <= 1


def test_netcdf_subdatasets_are_named_and_read(tmp_path: Path) -> None:
    """A netCDF of several variables (bands) opened with no bands: a traceback (IndexError) in
    pansharpen, simulate and metrics; a subdataset name (NETCDF:"f.nc":Band1, as gdalinfo lists it)
    was refused as a file not found (helper). The subdataset fuses as the GeoTIFF does."""
    from rasterio.shutil import copy as gdal_copy

    pan_nc, ms_nc = tmp_path / "pan.nc", tmp_path / "ms.nc"
    gdal_copy(EXAMPLE_PAN, pan_nc, driver="netCDF")
    gdal_copy(EXAMPLE_MS, ms_nc, driver="netCDF")
    rc, _, err = run("pansharpen", EXAMPLE_PAN, ms_nc, "-o", tmp_path / "a.tif", "--method", "gsa")
    one_line_error(rc, err, f"MS {ms_nc} holds 6 subdatasets, not bands; give one of them, e.g.")
    assert not (tmp_path / "a.tif").exists()
    rc, _, err = run("metrics", ms_nc)
    one_line_error(rc, err, "holds 6 subdatasets")
    outs = []
    for pan in (f'NETCDF:"{pan_nc}":Band1', EXAMPLE_PAN):
        outs.append(tmp_path / f"{len(outs)}.tif")
        rc, _, err = run("pansharpen", pan, EXAMPLE_MS, "-o", outs[-1], "--method", "gsa", "-q")
        assert rc == 0, err
    with rasterio.open(outs[0]) as a, rasterio.open(outs[1]) as b:
        assert np.array_equal(a.read(), b.read()) and a.transform == b.transform and a.crs == b.crs


def test_a_vrt_whose_source_is_gone_says_so(tmp_path: Path) -> None:
    """A VRT whose source file was moved was called damaged, with the advice to re-download it."""
    import shutil

    from rasterio.shutil import copy as gdal_copy

    source, vrt = tmp_path / "ms_source.tif", tmp_path / "ms.vrt"
    shutil.copy(EXAMPLE_MS, source)
    gdal_copy(source, vrt, driver="VRT")
    source.unlink()
    rc, _, err = run("pansharpen", EXAMPLE_PAN, vrt, "-o", tmp_path / "o.tif", "--method", "gsa")
    one_line_error(rc, err, "refers to a file that is missing", "ms_source.tif")
    assert "damaged" not in err and not (tmp_path / "o.tif").exists()


def test_local_paths_with_colons_stay_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Subdataset names are told by a GDAL driver's prefix: a manifest row relative to IN_DIR such as
    `acq_20240101T10:30:00/pan.tif` was taken for one and its scene failed (reviewer)."""
    import shutil

    from fusion_cli.raster import is_gdal_path

    folder = tmp_path / "in" / "acq_20240101T10:30:00"
    folder.mkdir(parents=True)
    shutil.copy(EXAMPLE_PAN, folder / "pan.tif")
    shutil.copy(EXAMPLE_MS, folder / "ms.tif")
    rel = "acq_20240101T10:30:00"
    (tmp_path / "m.csv").write_text(f"pan,ms,out\n{rel}/pan.tif,{rel}/ms.tif,a.tif\n")
    monkeypatch.chdir(tmp_path)  # where the rows do not exist: they are IN_DIR's
    assert not is_gdal_path(f"{rel}/pan.tif") and is_gdal_path('NETCDF:"x.nc":Band1')
    rc, _, err = run("batch", "in", "out", "--manifest", "m.csv", "--method", "gsa", "-q")
    assert rc == 0 and (tmp_path / "out" / "a.tif").exists(), err
