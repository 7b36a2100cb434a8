"""Pose scores (engine/scoring.py) against brute force and a full-plane FFT."""

from __future__ import annotations

import numpy as np
import pytest

from localrefine_plugin.engine.ctf import CtfParams, ctf_2d
from localrefine_plugin.engine.fourier import fourier_to_image, image_to_fourier
from localrefine_plugin.engine.geometry import euler_to_matrix
from localrefine_plugin.engine.projector import FourierProjector, forward_model
from localrefine_plugin.engine.scoring import (
    _score_poses_reference,
    half_plane_pixels,
    score_poses,
    weighted_projection_power,
)

from .conftest import blob_map

BOXES = [pytest.param(32, id="even32"), pytest.param(33, id="odd33")]


def _random_rotations(rng, shape):
    rot, psi = rng.uniform(-180, 180, (2,) + shape)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, shape)))
    return euler_to_matrix(rot, tilt, psi)


def _data(n, m, rng, *, noise_sd=0.5):
    """Projector, true poses, CTF, noisy images (Fourier), 1/sigma2 per shell."""
    projector = FourierProjector(blob_map(n))
    rotations = _random_rotations(rng, (m,))
    origins = rng.uniform(-3, 3, (m, 2))
    du = rng.uniform(8000, 20000, m)
    ctf = ctf_2d(CtfParams(du, du * rng.uniform(0.9, 1.0, m), 30.0), n, 2.0)
    clean = fourier_to_image(
        forward_model(projector, rotations, origins_px=origins, ctf=ctf), n
    )
    images = clean + rng.normal(0, noise_sd, clean.shape).astype(np.float32)
    inv_sigma2 = rng.uniform(0.5, 2.0, (m, n // 2 + 1)) / (n * n * noise_sd**2)
    return projector, rotations, origins, ctf, images, inv_sigma2


@pytest.mark.parametrize("n", BOXES)
def test_score_poses_matches_brute_force(n, rng):
    m, j, s = 3, 4, 5
    projector, rotations, origins, ctf, images, inv_sigma2 = _data(n, m, rng)
    rot = _random_rotations(rng, (m, j))
    rot[:, 0] = rotations
    shifts = origins[:, None, :] + rng.uniform(-2, 2, (m, s, 2))
    rot_shifts = rng.uniform(-1.5, 1.5, (m, j, 2))
    images_f = image_to_fourier(images)
    for r_max in (7.5, n // 2):
        fast = score_poses(
            projector,
            images_f,
            ctf,
            inv_sigma2,
            rot,
            shifts,
            r_max_px=r_max,
            rotation_shifts_px=rot_shifts,
        )
        slow = _score_poses_reference(
            projector,
            images_f,
            ctf,
            inv_sigma2,
            rot,
            shifts,
            r_max_px=r_max,
            rotation_shifts_px=rot_shifts,
        )
        assert fast.shape == (m, j, s) and fast.dtype == np.float64
        np.testing.assert_allclose(
            fast, slow, rtol=1e-5, atol=1e-5 * np.abs(slow).max()
        )
    # without the fulcrum term: same as a zero term
    np.testing.assert_allclose(
        score_poses(projector, images_f, ctf, inv_sigma2, rot, shifts, r_max_px=9),
        score_poses(
            projector,
            images_f,
            ctf,
            inv_sigma2,
            rot,
            shifts,
            r_max_px=9,
            rotation_shifts_px=np.zeros((m, j, 2)),
        ),
        rtol=1e-12,
    )


@pytest.mark.parametrize("n", BOXES)
def test_true_pose_score_is_half_the_full_plane_sum_of_a_full_fft(n, rng):
    """Hermitian multiplicity: the half-plane sum equals half the full-plane sum."""
    m = 3
    projector, rotations, origins, ctf, images, inv_sigma2 = _data(n, m, rng)
    r_max = n // 2
    got = score_poses(
        projector,
        image_to_fourier(images),
        ctf,
        inv_sigma2,
        rotations[:, None],
        origins[:, None],
        r_max_px=r_max,
    )[:, 0, 0]
    # independent: real-space prediction, full complex FFT, full-plane grid
    pred = fourier_to_image(
        forward_model(projector, rotations, origins_px=origins, ctf=ctf), n
    ).astype(np.float64)
    pf = np.fft.fft2(np.fft.ifftshift(pred, axes=(-2, -1)))
    xf = np.fft.fft2(np.fft.ifftshift(images.astype(np.float64), axes=(-2, -1)))
    k = np.fft.fftfreq(n, 1.0 / n)
    radius = np.hypot(k[:, None], k[None, :])
    shell = np.minimum(np.rint(radius).astype(int), n // 2)
    inside = radius <= r_max
    for i in range(m):
        w = np.where(inside, inv_sigma2[i][shell], 0.0)
        full = 0.5 * np.sum(w * (np.abs(pf[i] - xf[i]) ** 2 - np.abs(xf[i]) ** 2))
        assert got[i] == pytest.approx(full, rel=1e-5)


def test_noiseless_true_pose_scores_lowest_among_nearby_poses(rng):
    n = 32
    projector, rotations, origins, ctf, _, inv_sigma2 = _data(n, 1, rng)
    images_f = forward_model(projector, rotations, origins_px=origins, ctf=ctf)
    near = (
        rotations[:, None]
        @ euler_to_matrix(
            rng.uniform(-3, 3, 6), rng.uniform(0, 3, 6), rng.uniform(-3, 3, 6)
        )[None]
    )
    rot = np.concatenate([rotations[:, None], near], axis=1)  # (1, 7, 3, 3)
    shifts = origins[:, None] + np.array([[0, 0], [0.5, 0], [0, -0.5], [1, 1]])[None]
    scores = score_poses(projector, images_f, ctf, inv_sigma2, rot, shifts, r_max_px=16)
    assert np.unravel_index(np.argmin(scores[0]), scores.shape[1:]) == (0, 0)
    # at the truth the residual vanishes: score = -0.5 sum w c^2 |P|^2 / sigma2
    power, _ = weighted_projection_power(
        projector, ctf, inv_sigma2, rotations, r_max_px=16
    )
    assert scores[0, 0, 0] == pytest.approx(-0.5 * power.sum(), rel=1e-5)


def test_half_plane_pixels_multiplicity_counts_every_full_plane_pixel_once():
    for n in (16, 17):
        flat, kx, ky, mult, shell = half_plane_pixels(n, n // 2)
        # the full plane inside the radius has sum(mult) pixels
        k = np.fft.fftfreq(n, 1.0 / n)
        full = (np.hypot(k[:, None], k[None, :]) <= n // 2).sum()
        assert mult.sum() == full
        assert np.all(mult[kx == 0] == 1) and np.all(
            mult[kx > 0][kx[kx > 0] < n / 2] == 2
        )
        assert not flat.flags.writeable


def test_bad_inputs_raise_value_error(rng):
    projector, rotations, origins, ctf, images, inv_sigma2 = _data(16, 1, rng)
    images_f = image_to_fourier(images)
    with pytest.raises(ValueError, match="r_max_px"):
        score_poses(
            projector,
            images_f,
            ctf,
            inv_sigma2,
            rotations[:, None],
            origins[:, None],
            r_max_px=9,
        )
    with pytest.raises(ValueError, match="rotations"):
        score_poses(
            projector,
            images_f,
            ctf,
            inv_sigma2,
            rotations,
            origins[:, None],
            r_max_px=8,
        )


def test_noise_part_of_the_true_pose_score_has_mean_minus_half_h_and_variance_h(rng):
    """The normalisation the search's Gaussian bound relies on (noise.py's sigma2).

    With ``X = c P + n``, white real-space noise of variance ``s^2`` (sigma2 =
    ``N^2 s^2``), the true pose scores ``-0.5 H - Re<u, n>`` with
    ``H = sum w c^2 |P|^2 / sigma2`` and ``Var Re<u, n> = H``.
    """
    n, trials, s = 32, 400, 0.8
    projector = FourierProjector(blob_map(n))
    rot = _random_rotations(rng, (1,))
    ctf = ctf_2d(CtfParams(15000.0, 14000.0, 20.0), n, 2.0)[None]
    clean = fourier_to_image(forward_model(projector, rot, ctf=ctf), n)
    inv_sigma2 = np.full((1, n // 2 + 1), 1.0 / (n * n * s * s))
    h = weighted_projection_power(projector, ctf, inv_sigma2, rot, r_max_px=12)[0].sum()
    scores = np.empty(trials)
    for t in range(trials):
        noisy = clean + rng.normal(0, s, clean.shape)
        scores[t] = score_poses(
            projector,
            image_to_fourier(noisy),
            ctf,
            inv_sigma2,
            rot[:, None],
            np.zeros((1, 1, 2)),
            r_max_px=12,
        )[0, 0, 0]
    assert abs(scores.mean() + 0.5 * h) < 4 * np.sqrt(h / trials)
    assert scores.var(ddof=1) / h == pytest.approx(1.0, abs=0.3)
