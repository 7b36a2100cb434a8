"""Rotations: RELION's ZYZ matrix, round trips, geodesic distance, fulcrum algebra."""

import numpy as np
import pytest

from localrefine_plugin.engine.geometry import (
    axis_angle_to_matrix,
    euler_to_matrix,
    fulcrum_shift,
    geodesic_angle_deg,
    matrix_to_euler,
    matrix_to_quaternion,
    quaternion_to_matrix,
)


def _random_eulers(rng, n):
    return rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)


def test_matrix_equals_relion_formula_hard_coded():
    # RELION's Euler_angles2matrix for rot=30, tilt=40, psi=50 written out from its formula:
    # A = Rz(psi) Ry(tilt) Rz(rot), passive elementary rotations.
    def rz(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    np.testing.assert_allclose(
        euler_to_matrix(30, 40, 50), rz(50) @ ry(40) @ rz(30), atol=1e-12
    )
    # tilt 90 maps the map's z axis onto the image x axis: A @ (0,0,1) = (-1, 0, 0)
    np.testing.assert_allclose(
        euler_to_matrix(0, 90, 0) @ [0, 0, 1], [-1, 0, 0], atol=1e-12
    )


def test_matrices_are_proper_rotations(rng):
    a = euler_to_matrix(*_random_eulers(rng, 500))
    np.testing.assert_allclose(
        a @ np.swapaxes(a, -1, -2), np.broadcast_to(np.eye(3), a.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(a), 1.0, atol=1e-12)


def test_euler_matrix_round_trip_to_1e6(rng):
    rot, tilt, psi = _random_eulers(rng, 2000)
    r2, t2, p2 = matrix_to_euler(euler_to_matrix(rot, tilt, psi))
    np.testing.assert_allclose(r2, rot, atol=1e-6)
    np.testing.assert_allclose(t2, tilt, atol=1e-6)
    np.testing.assert_allclose(p2, psi, atol=1e-6)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_gimbal_lock_keeps_the_matrix(tilt):
    a = euler_to_matrix(25.0, tilt, -70.0)
    rot, t2, psi = matrix_to_euler(a)
    assert rot == 0.0
    np.testing.assert_allclose(euler_to_matrix(rot, t2, psi), a, atol=1e-12)


def test_quaternion_round_trip_to_1e6(rng):
    a = euler_to_matrix(*_random_eulers(rng, 2000))
    q = matrix_to_quaternion(a)
    assert np.all(q[:, 0] >= 0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(quaternion_to_matrix(q), a, atol=1e-6)
    # near 180 degree rotations (w ~ 0) are the hard case
    flips = axis_angle_to_matrix(rng.normal(size=(200, 3)), 179.9999)
    np.testing.assert_allclose(
        quaternion_to_matrix(matrix_to_quaternion(flips)), flips, atol=1e-6
    )


def test_axis_angle_is_right_handed():
    r = axis_angle_to_matrix(np.array([0.0, 0.0, 1.0]), 90.0)
    np.testing.assert_allclose(r @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_geodesic_angle(rng):
    axes = rng.normal(size=(100, 3))
    angles = rng.uniform(0, 180, 100)
    a = euler_to_matrix(*_random_eulers(rng, 100))
    b = a @ axis_angle_to_matrix(axes, angles)
    np.testing.assert_allclose(geodesic_angle_deg(a, b), angles, atol=1e-5)


def test_fulcrum_shift_keeps_the_fulcrum_in_place(rng):
    # A map point p appears at (A p)_xy - origin (RELION); after the pose change with the
    # fulcrum shift,
    # the fulcrum f appears where it did before, and any point turns about it.
    a_old = euler_to_matrix(*_random_eulers(rng, 50))
    r = axis_angle_to_matrix(rng.normal(size=(50, 3)), rng.uniform(0, 10, 50))
    a_new = a_old @ r
    f = np.array([5.0, -7.0, 3.0])
    origin_old = rng.normal(size=(50, 2))
    origin_new = origin_old + fulcrum_shift(a_new, a_old, f)
    before = (a_old @ f)[:, :2] - origin_old
    after = (a_new @ f)[:, :2] - origin_new
    np.testing.assert_allclose(after, before, atol=1e-12)
    # a point p moved by R about f, seen at the old pose, equals p seen at the new pose
    p = np.array([1.0, 2.0, -4.0])
    moved = np.einsum("nij,nj->ni", r, np.broadcast_to(p - f, (50, 3))) + f
    seen_old = np.einsum("nij,nj->ni", a_old, moved)[:, :2] - origin_old
    seen_new = (a_new @ p)[:, :2] - origin_new
    np.testing.assert_allclose(seen_new, seen_old, atol=1e-12)
