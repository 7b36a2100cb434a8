"""Local search grids (engine/local_grid.py): coverage, subdivision, extents."""

from __future__ import annotations

import numpy as np
import pytest

from localrefine_plugin.engine.geometry import axis_angle_to_matrix, geodesic_angle_deg
from localrefine_plugin.engine.local_grid import (
    clip_to_extent,
    finest_grid,
    rotation_grid,
    rotvec_to_matrix,
    shift_grid,
    subdivide_rotations,
    subdivide_shifts,
)


def _random_in_ball(rng, n, radius, dim):
    v = rng.normal(size=(n, dim))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v * radius * rng.uniform(0, 1, (n, 1)) ** (1 / dim)


def _covered(points, centres, step):
    """True for points inside some cell (cube of side ``step``) of ``centres``.

    The centres lie on one lattice of spacing ``step``; the cell holding a
    point is found by rounding, then looked up.
    """
    offset = np.mod(centres[0], step)
    keys = {tuple(k) for k in np.rint((centres - offset) / step).astype(int)}
    cell = np.rint((points - offset) / step).astype(int)
    return np.array([tuple(c) in keys for c in cell])


@pytest.mark.parametrize(
    "grid, extent, step, dim",
    [
        pytest.param(rotation_grid, 10.0, 4.0, 3, id="rotations"),
        pytest.param(shift_grid, 3.0, 1.0, 2, id="shifts"),
    ],
)
def test_coarse_grid_covers_the_extent_ball_with_cells_that_meet_it(
    grid, extent, step, dim, rng
):
    centres = grid(extent, step)
    assert centres.shape[1] == dim
    np.testing.assert_array_equal(centres[0], np.zeros(dim))  # consensus first
    # centres on the lattice of multiples of step
    np.testing.assert_allclose(centres / step, np.rint(centres / step), atol=1e-12)
    # every cell meets the ball: its nearest point is inside
    nearest = np.maximum(np.abs(centres) - step / 2, 0)
    assert np.all(np.linalg.norm(nearest, axis=1) < extent)
    # every point of the ball lies in a cell
    assert _covered(_random_in_ball(rng, 3000, extent, dim), centres, step).all()
    # symmetric under v -> -v
    as_set = {tuple(np.round(c / step).astype(int)) for c in centres}
    assert as_set == {tuple(-np.array(c)) for c in as_set}


def test_subdivided_rotations_are_eight_children_inside_their_parent(rng):
    parents = rotation_grid(10.0, 4.0)
    children = subdivide_rotations(parents, 4.0)
    assert children.shape == (8 * parents.shape[0], 3)
    grouped = children.reshape(-1, 8, 3)
    offsets = grouped - parents[:, None, :]
    np.testing.assert_allclose(np.abs(offsets), 1.0)  # step / 4 on each axis
    # the 8 children tile the parent: a point of the parent is in a child
    points = parents[5] + rng.uniform(-2, 2, (500, 3))
    assert _covered(points, grouped[5], 2.0).all()


def test_subdivision_with_extent_drops_children_outside_but_keeps_coverage(rng):
    extent = 10.0
    cells, step = rotation_grid(extent, 4.0), 4.0
    for _ in range(3):
        full = subdivide_rotations(cells, step)
        cells = subdivide_rotations(cells, step, extent_deg=extent)
        step /= 2
        assert cells.shape[0] < full.shape[0]
        nearest = np.maximum(np.abs(cells) - step / 2, 0)
        assert np.all(np.linalg.norm(nearest, axis=1) < extent)
    assert step == 0.5
    assert _covered(_random_in_ball(rng, 2000, extent, 3), cells, step).all()
    # leaves of the whole tree: the finest (exhaustive) grid
    np.testing.assert_array_equal(finest_grid(extent, 4.0, 3, dim=3), cells)


def test_subdivided_shifts_are_four_children():
    parents = shift_grid(3.0, 2.0)
    children = subdivide_shifts(parents, 2.0)
    assert children.shape == (4 * parents.shape[0], 2)
    offsets = children.reshape(-1, 4, 2) - parents[:, None, :]
    np.testing.assert_allclose(np.abs(offsets), 0.5)


def test_zero_extent_gives_only_the_consensus():
    np.testing.assert_array_equal(rotation_grid(0.0, 1.0), np.zeros((1, 3)))
    np.testing.assert_array_equal(shift_grid(0.0, 1.0), np.zeros((1, 2)))
    np.testing.assert_array_equal(
        subdivide_shifts(np.zeros((1, 2)), 1.0, extent_px=0.0), np.zeros((1, 2))
    )


def test_clip_to_extent_pulls_outside_points_onto_the_sphere_only():
    v = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [6.0, 8.0, 0.0]])
    out = clip_to_extent(v, 5.0)
    np.testing.assert_array_equal(out[:2], v[:2])
    np.testing.assert_allclose(out[2], [3.0, 4.0, 0.0])


def test_rotvec_to_matrix_is_the_axis_angle_rotation(rng):
    v = rng.normal(size=(50, 3)) * 5
    mats = rotvec_to_matrix(v)
    angle = np.linalg.norm(v, axis=1)
    np.testing.assert_allclose(
        mats, axis_angle_to_matrix(v / angle[:, None], angle), atol=1e-12
    )
    np.testing.assert_allclose(geodesic_angle_deg(mats, np.eye(3)), angle, atol=1e-9)
    np.testing.assert_array_equal(rotvec_to_matrix(np.zeros(3)), np.eye(3))
    # right-handed: +90 deg about z turns x into y
    np.testing.assert_allclose(
        rotvec_to_matrix([0, 0, 90.0]) @ [1, 0, 0], [0, 1, 0], atol=1e-12
    )


def test_bad_steps_raise_value_error():
    with pytest.raises(ValueError, match="step"):
        rotation_grid(10.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        subdivide_rotations(np.zeros((3, 2)), 1.0)


@pytest.mark.parametrize("n_sub", [1, 2, 3])
@pytest.mark.parametrize(
    ("dim", "extent", "coarse"),
    [
        pytest.param(3, 10.0, 4.0, id="rotations"),
        pytest.param(2, 3.0, 1.0, id="shifts"),
    ],
)
def test_centred_tree_has_zero_as_a_leaf_and_covers_the_ball(
    dim, extent, coarse, n_sub, rng
):
    leaves = finest_grid(extent, coarse, n_sub, dim=dim, centred=True)
    leaf = coarse / 2**n_sub
    # zero (the consensus pose) is a leaf centre, exactly
    assert np.min(np.linalg.norm(leaves, axis=1)) < 1e-12
    # leaves lie on the lattice of multiples of the leaf side through zero
    np.testing.assert_allclose(leaves / leaf, np.rint(leaves / leaf), atol=1e-9)
    assert _covered(_random_in_ball(rng, 2000, extent, dim), leaves, leaf).all()
    # without centring no leaf is at zero (children sit at +-step/4)
    plain = finest_grid(extent, coarse, n_sub, dim=dim)
    assert np.min(np.linalg.norm(plain, axis=1)) >= leaf / 2 - 1e-12


def test_finest_step_must_divide_the_coarse_step_by_a_power_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        rotation_grid(10.0, 4.0, finest_step_deg=1.5)
