"""Rotations in RELION's convention: ZYZ Euler angles, matrices, quaternions.

Conventions (see ``docs/conventions.md``)
-----------------------------------------
* Euler angles are RELION's ``(rot, tilt, psi)`` in degrees, ZYZ.
* :func:`euler_to_matrix` returns RELION's matrix ``A`` (``Euler_angles2matrix``):
  ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with the *passive* elementary matrices
  ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and
  ``Ry(a) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``.
  ``A`` maps map coordinates to image coordinates: a particle image is the
  projection along z of the map sampled at ``A.T @ (x, y, z)``; in Fourier space
  the 2D frequency ``(kx, ky)`` of the image is the 3D frequency
  ``A.T @ (kx, ky, 0)`` of the map.
* Vectors are ``(x, y, z)`` column vectors; arrays of rotations have shape
  ``(..., 3, 3)``.
* Quaternions are ``(w, x, y, z)`` with ``w >= 0``, representing the same matrix
  ``A`` (unit quaternion ``q`` -> ``A = R(q)`` in the usual Hamilton form).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "quaternion_to_matrix",
    "geodesic_angle_deg",
    "axis_angle_to_matrix",
    "fulcrum_shift",
]


def euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION ZYZ Euler angles (degrees) -> rotation matrices ``A``, shape (..., 3, 3).

    Inputs broadcast against each other; the result is float64.
    """
    rot, tilt, psi = np.broadcast_arrays(
        *(
            np.deg2rad(np.asarray(a, dtype=np.float64))
            for a in (rot_deg, tilt_deg, psi_deg)
        )
    )
    ca, sa = np.cos(rot), np.sin(rot)
    cb, sb = np.cos(tilt), np.sin(tilt)
    cg, sg = np.cos(psi), np.sin(psi)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    a = np.empty(rot.shape + (3, 3), dtype=np.float64)
    a[..., 0, 0] = cg * cc - sg * sa
    a[..., 0, 1] = cg * cs + sg * ca
    a[..., 0, 2] = -cg * sb
    a[..., 1, 0] = -sg * cc - cg * sa
    a[..., 1, 1] = -sg * cs + cg * ca
    a[..., 1, 2] = sg * sb
    a[..., 2, 0] = sc
    a[..., 2, 1] = ss
    a[..., 2, 2] = cb
    return a


def matrix_to_euler(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation matrices ``A`` (..., 3, 3) -> RELION ``(rot, tilt, psi)`` in degrees.

    Tilt is in [0, 180]; at tilt 0 or 180 (gimbal lock) rot is set to 0 and the
    whole in-plane angle is carried by psi, as RELION does.
    """
    a = np.asarray(a, dtype=np.float64)
    sb = np.hypot(a[..., 2, 0], a[..., 2, 1])
    tilt = np.arctan2(sb, a[..., 2, 2])
    regular = sb > 16 * np.finfo(np.float64).eps
    rot = np.where(regular, np.arctan2(a[..., 2, 1], a[..., 2, 0]), 0.0)
    psi = np.where(
        regular,
        np.arctan2(a[..., 1, 2], -a[..., 0, 2]),
        # gimbal lock: A = Rz(psi) Ry(0 or 180) with rot = 0
        np.arctan2(
            -a[..., 1, 0] * np.sign(a[..., 2, 2]), a[..., 0, 0] * np.sign(a[..., 2, 2])
        ),
    )
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def matrix_to_quaternion(a: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) as (w, x, y, z), w >= 0.

    Bar-Itzhack's method (J. Guid. Control Dyn. 23, 1085, 2000): the quaternion is
    the eigenvector of the largest eigenvalue of a symmetric 4x4 matrix built
    from ``a``; robust near 180 degree rotations.
    """
    a = np.asarray(a, dtype=np.float64)
    r = {(i, j): a[..., i, j] for i in range(3) for j in range(3)}
    k = (
        np.stack(
            [
                np.stack(
                    [
                        r[0, 0] - r[1, 1] - r[2, 2],
                        r[1, 0] + r[0, 1],
                        r[2, 0] + r[0, 2],
                        r[2, 1] - r[1, 2],
                    ],
                    -1,
                ),
                np.stack(
                    [
                        r[1, 0] + r[0, 1],
                        r[1, 1] - r[0, 0] - r[2, 2],
                        r[2, 1] + r[1, 2],
                        r[0, 2] - r[2, 0],
                    ],
                    -1,
                ),
                np.stack(
                    [
                        r[2, 0] + r[0, 2],
                        r[2, 1] + r[1, 2],
                        r[2, 2] - r[0, 0] - r[1, 1],
                        r[1, 0] - r[0, 1],
                    ],
                    -1,
                ),
                np.stack(
                    [
                        r[2, 1] - r[1, 2],
                        r[0, 2] - r[2, 0],
                        r[1, 0] - r[0, 1],
                        r[0, 0] + r[1, 1] + r[2, 2],
                    ],
                    -1,
                ),
            ],
            axis=-2,
        )
        / 3.0
    )  # (..., 4, 4), eigenvector ordered (x, y, z, w)
    _, vecs = np.linalg.eigh(k)
    xyzw = vecs[..., :, -1]
    q = np.concatenate([xyzw[..., 3:], xyzw[..., :3]], axis=-1)
    return np.where(q[..., :1] < 0, -q, q)


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """Quaternions (..., 4) as (w, x, y, z) -> rotation matrices (..., 3, 3); q is normalised."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    r = np.empty(q.shape[:-1] + (3, 3), dtype=np.float64)
    r[..., 0, 0] = 1 - 2 * (y * y + z * z)
    r[..., 0, 1] = 2 * (x * y - w * z)
    r[..., 0, 2] = 2 * (x * z + w * y)
    r[..., 1, 0] = 2 * (x * y + w * z)
    r[..., 1, 1] = 1 - 2 * (x * x + z * z)
    r[..., 1, 2] = 2 * (y * z - w * x)
    r[..., 2, 0] = 2 * (x * z - w * y)
    r[..., 2, 1] = 2 * (y * z + w * x)
    r[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return r


def geodesic_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees of the rotation ``a @ b.T`` (the geodesic distance on SO(3))."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    trace = np.einsum("...ij,...ij->...", a, b)  # trace(a @ b.T)
    return np.rad2deg(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))


def axis_angle_to_matrix(axis: np.ndarray, angle_deg) -> np.ndarray:
    """Active rotation by ``angle_deg`` (degrees) about unit ``axis`` (..., 3) -> (..., 3, 3).

    Right-handed (Rodrigues): ``R @ v`` turns ``v`` counter-clockwise about ``axis``.
    """
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis, axis=-1, keepdims=True)
    half = np.deg2rad(np.asarray(angle_deg, dtype=np.float64)) / 2
    half, axis = np.broadcast_arrays(half[..., None], axis)
    half = half[..., 0]
    q = np.concatenate(
        [np.cos(half)[..., None], np.sin(half)[..., None] * axis], axis=-1
    )
    return quaternion_to_matrix(q)


def fulcrum_shift(
    a_new: np.ndarray, a_old: np.ndarray, fulcrum_px: np.ndarray
) -> np.ndarray:
    """Image shift (pixels, x and y) that makes a pose change pivot about a fulcrum.

    Parameters
    ----------
    a_new, a_old : ndarray, shape (..., 3, 3)
        RELION matrices ``A`` of the new and the old pose.
    fulcrum_px : ndarray, shape (3,)
        The fulcrum in map coordinates (pixels, x y z) relative to the box centre
        (``N // 2`` along each axis).

    Returns
    -------
    ndarray, shape (..., 2)
        ``((A_new - A_old) @ f)_xy``. With RELION's origins a map point ``p``
        appears in the image at ``(A p)_xy - origin``, so the fulcrum stays where
        it was when the origin changes by this amount: the pose change "rotate
        to ``a_new`` about ``f``" is the standard pose ``a_new`` with origin
        ``origin_old + fulcrum_shift(a_new, a_old, f)``.
    """
    f = np.asarray(fulcrum_px, dtype=np.float64)
    d = np.asarray(a_new)[..., :2, :] - np.asarray(a_old)[..., :2, :]  # rows x, y
    return (d[..., 0] * f[0] + d[..., 1] * f[1]) + d[..., 2] * f[2]
