"""tiling: plans, partition-of-unity blending, and the bounded row-strip accumulator."""

from __future__ import annotations

import numpy as np
import pytest

from fusion_cli.errors import FusionError
from fusion_cli.tiling import (
    StripAccumulator,
    blend_weights,
    core_region,
    plan_tiles,
    ramp,
    weighted_region,
)


def test_plan_rounds_to_multiples_and_covers_the_scene():
    plan = plan_tiles(1205, 1253, tile=250, overlap=31, halo=5, multiple=4)
    assert plan.tile == 252 and plan.overlap == 32 and plan.margin == 8  # halo 5 -> 8
    assert plan.window % 4 == 0 and plan.rows == 5 and plan.cols == 5 and plan.count == 25
    cores = {(w.core_row, w.core_col) for w in plan}
    assert len(cores) == 25 and max(r for r, _ in cores) + plan.tile >= 1205
    one = plan_tiles(300, 200, tile=4096, overlap=32, halo=8, multiple=4)
    assert one.count == 1 and one.tile == 300
    with pytest.raises(FusionError):
        plan_tiles(100, 100, tile=0, overlap=0, halo=0, multiple=1)


def test_ramp_is_a_partition_of_unity():
    r = ramp(32)
    assert (r > 0).all() and (r < 1).all() and np.all(np.diff(r) > 0)
    np.testing.assert_allclose(r + r[::-1], 1.0, atol=1e-6)


def _blend(plan, data_fn, bands=2):
    out = np.zeros((bands, plan.height, plan.width), np.float32)
    wsum_check = []
    acc = StripAccumulator(bands, plan.height, plan.width, plan.tile + plan.overlap + 256)
    for i in range(plan.rows):
        for win in plan.strip(i):
            fused = data_fn(win)
            acc.add(
                weighted_region(plan, win, fused),
                blend_weights(plan, win),
                win.core_row,
                win.core_col,
            )
            acc.set_valid(
                core_region(plan, win, np.ones((win.height, win.width), bool)), win.core_row, win.core_col
            )
        final = plan.final_row_after(i)
        final = final if final == plan.height else final // 256 * 256
        rows_before = acc.start

        def sink(row0, col0, data, valid, rows_before=rows_before):
            assert row0 == rows_before  # rows arrive once, in order
            out[:, row0 : row0 + data.shape[1], col0 : col0 + data.shape[2]] = data
            assert valid.all()

        n = acc.flush(final, sink, chunk=200)
        wsum_check.append(n)
    assert sum(wsum_check) == plan.height
    return out


def test_blending_reproduces_a_global_image_exactly():
    """If every window returns its crop of one global image, blending returns that image."""
    rng = np.random.default_rng(0)
    plan = plan_tiles(700, 530, tile=128, overlap=32, halo=8, multiple=4)
    glob = rng.normal(size=(2, plan.height + 2 * plan.window, plan.width + 2 * plan.window)).astype(
        np.float32
    )
    off = plan.window

    def crop(win):
        return glob[:, off + win.row : off + win.row + win.height, off + win.col : off + win.col + win.width]

    out = _blend(plan, crop)
    np.testing.assert_allclose(out, glob[:, off : off + 700, off : off + 530], atol=1e-5)


def test_blending_weights_sum_to_one_and_smooth_a_step():
    """Windows returning different constants blend with a smooth transition (no step at a seam)."""
    plan = plan_tiles(512, 512, tile=128, overlap=32, halo=0, multiple=1)
    out = _blend(
        plan, lambda win: np.full((1, win.height, win.width), float(win.core_col // 128), np.float32), 1
    )
    row = out[0, 200]
    assert row[0] == 0 and row[-1] == 3
    assert np.all(np.diff(row) >= -1e-6) and np.abs(np.diff(row)).max() < 0.06  # ramps over 32 px


def test_accumulator_memory_does_not_depend_on_height():
    small = StripAccumulator(4, 2048, 1024, 512)
    tall = StripAccumulator(4, 65536, 1024, 512)
    assert small.acc.nbytes == tall.acc.nbytes


def test_windows_stay_inside_the_scene():
    """Windows are cropped at the scene's edges (never reflect-padded context), their sides stay
    multiples of the plan's multiple, and a scene that fits in one tile is one window of its size."""
    plan = plan_tiles(1205, 1253, tile=250, overlap=31, halo=5, multiple=4)
    for win in plan:
        assert win.row >= 0 and win.col >= 0
        assert win.height % 4 == 0 and win.width % 4 == 0
        # past the scene only by the rounding of a side that is no multiple of 4
        assert win.row + win.height < 1205 + 4 and win.col + win.width < 1253 + 4
        assert win.row <= win.core_row and win.col <= win.core_col
        # interior windows keep their full context
        if win.core_row >= plan.margin and win.core_row + plan.tile + plan.overlap + plan.margin <= 1205:
            assert win.height == plan.window and win.core_row - win.row == plan.margin
    one = plan_tiles(320, 320, tile=320, overlap=0, halo=32, multiple=4)
    (win,) = list(one)
    assert (win.row, win.col, win.height, win.width) == (0, 0, 320, 320)
    odd = plan_tiles(319, 639, tile=1024, overlap=32, halo=68, multiple=4)
    (win,) = list(odd)
    assert (win.row, win.col, win.height, win.width) == (0, 0, 320, 640)
