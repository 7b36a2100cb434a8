"""Pose errors and map-vs-truth figures (engine/evaluate.py, `localrefine evaluate`)."""

import numpy as np
import pytest

from localrefine_plugin.engine.evaluate import compare_map_to_truth, pose_errors
from localrefine_plugin.engine.geometry import (
    axis_angle_to_matrix,
    euler_to_matrix,
    fulcrum_shift,
)

from .conftest import blob_map


def _poses(rng, n):
    a = euler_to_matrix(
        rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)
    )
    return a, rng.normal(size=(n, 2))


def test_identical_poses_have_no_error(rng):
    a, o = _poses(rng, 20)
    e = pose_errors(a, o, a, o, point_px=np.array([3.0, 4.0, 5.0]))
    assert e.median_angle_deg == pytest.approx(0.0, abs=1e-5)
    assert e.median_position_px == pytest.approx(0.0, abs=1e-12)


def test_rotation_about_the_point_moves_only_the_angle(rng):
    a, o = _poses(rng, 30)
    c = np.array([6.0, -2.0, 4.0])
    r = axis_angle_to_matrix(rng.normal(size=(30, 3)), 7.0)
    a_new = a @ r
    o_new = o + fulcrum_shift(a_new, a, c)
    e = pose_errors(a_new, o_new, a, o, point_px=c)
    np.testing.assert_allclose(e.angle_deg, 7.0, atol=1e-6)
    np.testing.assert_allclose(e.position_px, 0.0, atol=1e-9)
    # seen from the box centre the same change is also a shift
    assert np.median(pose_errors(a_new, o_new, a, o).position_px) > 0.1


def test_pure_origin_change_is_a_position_error(rng):
    a, o = _poses(rng, 10)
    e = pose_errors(a, o + np.array([3.0, 4.0]), a, o)
    np.testing.assert_allclose(e.position_px, 5.0, atol=1e-12)
    np.testing.assert_allclose(e.angle_deg, 0.0, atol=1e-5)


def test_map_vs_truth_fsc_falls_with_noise(rng):
    truth = blob_map(32, seed=3)
    same = compare_map_to_truth(truth, truth, pixel_size_a=2.0)
    assert not same.resolution_05.crossed and same.mean_fsc == pytest.approx(1.0)
    noisy = truth + rng.normal(scale=0.3, size=truth.shape).astype(np.float32)
    worse = compare_map_to_truth(noisy, truth, pixel_size_a=2.0)
    assert worse.resolution_05.crossed
    assert 4.0 < worse.resolution_05.value_a < 64.0
    assert worse.mean_fsc < same.mean_fsc
