"""raster: opening errors, padded window reads and masks, DN scale, atomic and COG writing."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from conftest import EXAMPLE_MS, have_shared, need_shared
from rasterio.transform import from_origin

from fusion_cli import raster
from fusion_cli.errors import FusionError


def _write(path, data, **kw):
    profile = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2]}
    profile.update(dtype=str(data.dtype), **kw)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def test_open_errors_are_one_line(tmp_path):
    with pytest.raises(FusionError, match="not found"):
        raster.open_raster(tmp_path / "missing.tif", "PAN")
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    with pytest.raises(FusionError, match="not a readable raster") as e:
        raster.open_raster(text, "MS")
    assert "\n" not in str(e.value)
    with pytest.raises(FusionError, match="folder"):
        raster.open_raster(tmp_path, "MS")


def test_read_padded_matches_read_inside_and_reflects_outside():
    with rasterio.open(EXAMPLE_MS) as ds:  # uint16, 6 bands; reading does not depend on the scene
        full = ds.read([1, 2, 3, 4])
        data, valid = raster.read_padded(ds, -3, -5, 40, 50, [1, 2, 3, 4])
        assert data.shape == (4, 40, 50) and data.dtype == np.uint16 and valid.all()
        np.testing.assert_array_equal(data[:, 3:, 5:], full[:, :37, :45])
        # Reflect padding mirrors without repeating the edge row/column.
        np.testing.assert_array_equal(data[:, 2, 5:], full[:, 1, :45])
        np.testing.assert_array_equal(data[:, 3:, 4], full[:, :37, 1])
        edge, _ = raster.read_padded(ds, ds.height - 2, ds.width - 2, 4, 4, [2])
        np.testing.assert_array_equal(edge[0, :2, :2], full[1, -2:, -2:])
        np.testing.assert_array_equal(edge[0, 2, :2], full[1, -2, -2:])


def test_zero_nodata_on_wv2_pair_2():
    """WV2 pair 2 has unflagged zero collars (about 32 % of the PAN): only the option masks them."""
    pan_path = need_shared("wv2_spacenet6", "pan_2.tif")
    with rasterio.open(pan_path) as ds:
        _, plain = raster.read_padded(ds, 0, 0, ds.height, ds.width, [1])
        pan, valid = raster.read_padded(ds, 0, 0, ds.height, ds.width, [1], zero_is_nodata=True)
    assert plain.all()
    assert not valid[:190].any()
    np.testing.assert_array_equal(valid, pan[0] != 0)
    assert 0.30 < 1 - valid.mean() < 0.35


def test_masks_from_nodata_value(tmp_path):
    data = np.arange(2 * 20 * 30, dtype=np.uint16).reshape(2, 20, 30) + 1
    data[1, 5:8, 10:12] = 0
    path = _write(tmp_path / "nd.tif", data, nodata=0)
    with rasterio.open(path) as ds:
        assert raster.has_mask(ds)
        _, valid = raster.read_padded(ds, 0, 0, 20, 30, [1, 2])
        _, valid1 = raster.read_padded(ds, 0, 0, 20, 30, [1])
    assert valid1.all()  # band 1 alone has no nodata
    assert (~valid).sum() == 6 and not valid[5:8, 10:12].any()


def test_dn_max_from_nbits(tmp_path):
    data = np.full((1, 8, 8), 100, np.uint16)
    path = _write(tmp_path / "nbits.tif", data, NBITS=11)
    with rasterio.open(path) as ds:
        assert raster.detect_dn_max(ds) == 2047
    # SpaceNet files carry no NBITS, nor does the example
    plain = need_shared("wv3_spacenet2", "ms.tif") if have_shared("wv3_spacenet2") else EXAMPLE_MS
    with rasterio.open(plain) as ds:
        assert raster.detect_dn_max(ds) is None


def _profile(n=2, h=300, w=280, dtype="uint16", **kw):
    return raster.output_profile(
        width=w, height=h, count=n, dtype=dtype, crs="EPSG:32631",
        transform=from_origin(500000, 5700000, 0.5, 0.5), nodata=kw.get("nodata"),
        compress=kw.get("compress", "deflate"),
    )  # fmt: skip


def test_atomic_writer_commits_complete_file_with_tags(tmp_path):
    out = tmp_path / "o.tif"
    data = np.random.default_rng(0).integers(0, 2047, (2, 300, 280)).astype(np.uint16)
    with raster.AtomicWriter(out, _profile(), descriptions=["blue", "red"], tags={"FUSION_MODEL": "x"}) as w:
        w.write(data[:, :256], 0, 0)
        assert not out.exists()  # nothing under the final name until commit
        w.write(data[:, 256:], 256, 0)
        w.commit()
    assert raster.is_complete_output(out)
    assert [p.name for p in tmp_path.iterdir()] == ["o.tif"]
    with rasterio.open(out) as ds:
        np.testing.assert_array_equal(ds.read(), data)
        assert ds.descriptions == ("blue", "red")
        assert ds.profile["tiled"] and ds.block_shapes[0] == (256, 256)
        assert ds.compression.name.lower() == "deflate"
        assert ds.tags()["FUSION_MODEL"] == "x"


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_writer_leaves_nothing_on_error(tmp_path, exc):
    out = tmp_path / "o.tif"
    with pytest.raises(exc), raster.AtomicWriter(out, _profile()) as w:
        w.write(np.ones((2, 256, 280), np.uint16), 0, 0)
        raise exc("boom")
    assert list(tmp_path.iterdir()) == []


class _InterruptedNames(list):
    """Band names whose reading is interrupted: Ctrl-C lands while the writer is still opening."""

    def __iter__(self):
        raise KeyboardInterrupt


def test_atomic_writer_interrupted_while_opening_leaves_nothing(tmp_path):
    out = tmp_path / "o.tif"
    with (
        pytest.raises(KeyboardInterrupt),
        raster.AtomicWriter(out, _profile(), descriptions=_InterruptedNames("ab")),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


def test_is_complete_output_rejects_foreign_and_broken_files(tmp_path):
    plain = _write(tmp_path / "plain.tif", np.ones((1, 4, 4), np.uint8))
    assert not raster.is_complete_output(plain)
    assert not raster.is_complete_output(tmp_path / "missing.tif")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00garbage")
    assert not raster.is_complete_output(broken)


def test_check_writable(tmp_path):
    existing = _write(tmp_path / "e.tif", np.ones((1, 4, 4), np.uint8))
    with pytest.raises(FusionError, match="--overwrite"):
        raster.check_writable(existing, False, [])
    assert raster.check_writable(existing, True, []) == existing
    with pytest.raises(FusionError, match="one of the inputs"):
        raster.check_writable(existing, True, [existing])
    with pytest.raises(FusionError, match="does not exist"):
        raster.check_writable(tmp_path / "no" / "o.tif", False, [])
    with pytest.raises(FusionError, match="folder"):
        raster.check_writable(tmp_path, False, [])


def test_cog_output_has_overviews_and_cog_layout(tmp_path):
    out = tmp_path / "c.tif"
    rng = np.random.default_rng(1)
    data = rng.integers(1, 4000, (2, 600, 520)).astype(np.uint16)
    with raster.AtomicWriter(out, _profile(h=600, w=520, compress="zstd"), cog=True) as w:
        w.write(data, 0, 0)
        w.commit()
    assert raster.is_complete_output(out)
    assert [p.name for p in tmp_path.iterdir()] == ["c.tif"]
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.overviews(1) == [2, 4]
        assert ds.compression.name.lower() == "zstd"
        np.testing.assert_array_equal(ds.read(), data)


def test_non_finite_values_are_refused_with_the_nodata_that_would_mask_them() -> None:
    """The advice said `-a_nodata nan` whatever the values were; infinities stayed after following it."""
    from fusion_cli.raster.checks import refuse_non_finite

    data = np.ones((2, 4, 4), np.float32)
    for value, advice in ((np.nan, "-a_nodata nan"), (np.inf, "-a_nodata inf"), (-np.inf, "-a_nodata -inf")):
        bad = data.copy()
        bad[0, 1, 1] = value
        with pytest.raises(FusionError, match=advice):
            refuse_non_finite("x.tif", bad)
    bad[1, 2, 2] = np.nan
    with pytest.raises(FusionError, match="several kinds: nan, -inf"):
        refuse_non_finite("x.tif", bad)
    refuse_non_finite("x.tif", bad, valid=np.isfinite(bad).all(axis=0))  # declared: no error
