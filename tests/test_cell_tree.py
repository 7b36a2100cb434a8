"""The search's cell tree (engine/cell_tree.py) against per-particle subdivision."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from localrefine_plugin.engine.cell_tree import cell_tree_root
from localrefine_plugin.engine.local_grid import (
    clip_to_extent,
    compact_rows,
    rotation_grid,
    shift_grid,
    subdivide_rotations,
    subdivide_shifts,
    vector_norm,
)


def _reference_split(centres, valid, kept, step, extent, dim):
    """Per particle: ``subdivide_*`` of its kept cells (the definition)."""
    split = subdivide_rotations if dim == 3 else subdivide_shifts
    key = "extent_deg" if dim == 3 else "extent_px"
    return [
        split(centres[i][valid[i] & kept[i]], step, **{key: extent})
        for i in range(centres.shape[0])
    ]


@pytest.mark.parametrize(
    "dim, extent, steps",
    [(3, 10.0, (4.0, 2.0, 1.0, 0.5)), (2, 3.0, (2.0, 1.0, 0.5)), (3, 7.5, (5.0, 2.5))],
)
def test_split_gives_each_particles_children_in_order(rng, dim, extent, steps):
    m = 7
    root = cell_tree_root(dim, extent, steps[0], steps[-1])
    grid = rotation_grid if dim == 3 else shift_grid
    key = "finest_step_deg" if dim == 3 else "finest_step_px"
    np.testing.assert_array_equal(
        root.centres, grid(extent, steps[0], **{key: steps[-1]})
    )
    level = root
    index = np.broadcast_to(np.arange(len(root)), (m, len(root)))
    valid = np.ones(index.shape, bool)
    for step in steps[:-1]:
        kept = rng.uniform(size=index.shape) < rng.uniform(0.1, 0.9, (m, 1))
        kept[:, 0] = True  # at least one per particle
        kept[3] = False  # a particle whose only kept cell is its first...
        kept[3, 0] = True
        kept &= valid
        expected = _reference_split(
            level.centres[index], valid, kept, step, extent, dim
        )
        level, index, valid = level.split(index, kept, step)
        got = level.centres[index]
        for i in range(m):
            count = expected[i].shape[0]
            assert valid[i].sum() == count and valid[i, :count].all()
            np.testing.assert_array_equal(got[i, :count], expected[i])  # bit for bit
            np.testing.assert_array_equal(got[i, count:], got[i, :1].repeat(
                index.shape[1] - count, axis=0))  # fmt: skip
    # the level's derived values are the engine's functions of its centres
    np.testing.assert_array_equal(level.clipped, clip_to_extent(level.centres, extent))
    np.testing.assert_array_equal(level.norm, vector_norm(level.centres))
    np.testing.assert_array_equal(level.clipped_norm, vector_norm(level.clipped))
    assert np.all(vector_norm(level.clipped) <= extent * (1 + 1e-12))


def test_zero_extent_keeps_the_single_zero_cell():
    root = cell_tree_root(2, 0.0, 1.0, 0.5)
    np.testing.assert_array_equal(root.centres, np.zeros((1, 2)))
    level, index, valid = root.split(np.zeros((4, 1), int), np.ones((4, 1), bool), 1.0)
    np.testing.assert_array_equal(level.centres[index], np.zeros((4, 1, 2)))
    assert valid.all()


def test_threads_splitting_at_once_share_one_consistent_tree(rng):
    extent, steps = 9.0, (3.0, 1.5, 0.75)
    root = cell_tree_root(3, extent, steps[0], steps[-1])
    assert cell_tree_root(3, extent, steps[0], steps[-1]) is root
    assert cell_tree_root(3, extent, steps[0], 1.5) is not root
    m = 5
    cases = []
    for _ in range(8):  # each thread its own particles and kept cells
        kept1 = rng.uniform(size=(m, len(root))) < 0.3
        kept1[:, 0] = True
        cases.append((kept1, rng.uniform(size=(m, 1000)) < 0.3))
    index0 = np.broadcast_to(np.arange(len(root)), (m, len(root)))
    found = [None] * len(cases)

    def search(k):
        kept1, draws = cases[k]
        level1, index1, valid1 = root.split(index0, kept1, steps[0])
        kept2 = draws[:, : index1.shape[1]] & valid1
        kept2[:, 0] = True
        level2, index2, valid2 = level1.split(index1, kept2, steps[1])
        found[k] = (
            level1.centres[index1],
            valid1,
            kept2,
            level2.centres[index2],
            valid2,
        )

    threads = [threading.Thread(target=search, args=(k,)) for k in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (kept1, _), (c1, v1, kept2, c2, v2) in zip(cases, found, strict=True):
        ref1 = _reference_split(root.centres[index0], np.ones_like(kept1), kept1,
                                steps[0], extent, 3)  # fmt: skip
        ref2 = _reference_split(c1, v1, kept2, steps[1], extent, 3)
        for i in range(m):
            np.testing.assert_array_equal(c1[i, : v1[i].sum()], ref1[i])
            np.testing.assert_array_equal(c2[i, : v2[i].sum()], ref2[i])
    # the deeper levels hold only the children of split cells, each cell once
    level1 = root.split(index0[:1], np.ones((1, len(root)), bool), steps[0])[0]
    full = subdivide_rotations(root.centres, steps[0], extent_deg=extent)
    assert len(level1) == len(full)
    assert len(np.unique(level1.centres[: len(level1)], axis=0)) == len(level1)
    split = {tuple(c) for f in found for c in f[0][f[2]]}  # level-1 cells split
    level2 = level1.split(np.zeros((1, 1), int), np.ones((1, 1), bool), steps[1])[0]
    split.add(tuple(level1.centres[0]))
    children = subdivide_rotations(np.array(sorted(split)), steps[1], extent_deg=extent)
    assert {tuple(c) for c in level2.centres} == {tuple(c) for c in children}
    assert len(level2) == len(children)
    assert len(level2) < len(subdivide_rotations(full, steps[1], extent_deg=extent))


def test_compact_rows_matches_a_row_by_row_loop(rng):
    values = rng.normal(size=(6, 9, 2))
    keep = rng.uniform(size=(6, 9)) < 0.4
    keep[2] = False  # a row with nothing kept repeats its first entry
    keep[4] = True
    for vals in (values, rng.integers(0, 100, (6, 9)).astype(np.int32)):
        compact, valid = compact_rows(vals, keep)
        assert compact.dtype == vals.dtype
        assert compact.shape[1] == max(keep.sum(1).max(), 1) == valid.shape[1]
        for i in range(6):
            kept = vals[i][keep[i]]
            np.testing.assert_array_equal(compact[i, : len(kept)], kept)
            assert valid[i].sum() == len(kept) and valid[i, : len(kept)].all()
            first = kept[0] if len(kept) else vals[i, 0]
            np.testing.assert_array_equal(
                compact[i, len(kept):], np.broadcast_to(first, compact[i, len(kept):].shape)
            )  # fmt: skip


def test_a_level_that_grows_after_its_children_were_split(rng):
    extent, steps = 6.0, (2.0, 1.0, 0.5)
    root = cell_tree_root(2, extent, steps[0], steps[-1])
    index0 = np.arange(len(root))[None]
    for part in (slice(0, 3), slice(3, None), slice(None)):  # level 1 grows twice
        kept = np.zeros(index0.shape, bool)
        kept[0, part] = True
        level1, index1, valid1 = root.split(index0, kept, steps[0])
        kept1 = valid1 & (rng.uniform(size=valid1.shape) < 0.5)
        kept1[0, 0] = True
        level2, index2, valid2 = level1.split(index1, kept1, steps[1])
        expected = subdivide_shifts(
            level1.centres[index1[kept1]], steps[1], extent_px=extent
        )
        np.testing.assert_array_equal(level2.centres[index2[valid2]], expected)
    assert len(level1) == len(
        subdivide_shifts(root.centres, steps[0], extent_px=extent)
    )
