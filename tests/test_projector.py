"""Properties of the Fourier projector and forward model (engine/projector.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from localrefine_plugin.engine.fourier import fourier_to_image, frequency_grid_2d
from localrefine_plugin.engine.geometry import euler_to_matrix
from localrefine_plugin.engine.projector import (
    FourierProjector,
    forward_model,
    slice_coordinates,
)

from .conftest import blob_map

BOXES = [pytest.param(32, id="even32"), pytest.param(33, id="odd33")]


def _random_rotations(rng, m):
    rot, psi = rng.uniform(-180, 180, (2, m))
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, m)))
    return euler_to_matrix(rot, tilt, psi)


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.mark.parametrize("n", BOXES)
def test_centre_voxel_projects_to_centre_under_random_rotations(n, rng):
    vol = np.zeros((n, n, n), np.float32)
    vol[n // 2, n // 2, n // 2] = 1.0
    images = fourier_to_image(
        FourierProjector(vol).project(_random_rotations(rng, 20)), n
    )
    for img in images:
        assert np.unravel_index(np.argmax(img), img.shape) == (n // 2, n // 2)
        # a delta's transform is flat: the image sum is the (corrected) voxel value
        assert img.sum() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("n", BOXES)
@pytest.mark.parametrize(
    "angles, expected_dxy",
    [
        # voxel at map (x, y, z) = (5, 0, 0); A p for hand-computed passive
        # ZYZ matrices:
        # rot 90: Rz(90) = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]] -> (0, -5)
        ((90, 0, 0), (0, -5)),
        # psi -90: Rz(-90) = [[0, -1, 0], [1, 0, 0], [0, 0, 1]] -> (0, 5)
        ((0, 0, -90), (0, 5)),
        # tilt 90: Ry(90) = [[0, 0, -1], [0, 1, 0], [1, 0, 0]] -> (0, 0):
        # on the beam axis
        ((0, 90, 0), (0, 0)),
        # rot 180 -> (-5, 0)
        ((180, 0, 0), (-5, 0)),
    ],
)
def test_single_voxel_quarter_turns_land_on_hand_computed_pixels(
    n, angles, expected_dxy
):
    vol = np.zeros((n, n, n), np.float32)
    c = n // 2
    vol[c, c, c + 5] = 1.0  # [z, y, x]: x = +5
    img = fourier_to_image(FourierProjector(vol).project(euler_to_matrix(*angles)), n)
    dx, dy = expected_dxy
    assert np.unravel_index(np.argmax(img), img.shape) == (c + dy, c + dx)


def test_voxel_on_z_axis_under_tilt_moves_to_negative_x():
    n = 32
    c = n // 2
    vol = np.zeros((n, n, n), np.float32)
    vol[c + 6, c, c] = 1.0  # z = +6
    # Ry(90) @ (0, 0, 6) = (-6, 0, 0)
    img = fourier_to_image(FourierProjector(vol).project(euler_to_matrix(0, 90, 0)), n)
    assert np.unravel_index(np.argmax(img), img.shape) == (c, c - 6)


@pytest.mark.parametrize("n", BOXES)
def test_identity_projection_is_the_sum_along_z(n):
    vol = blob_map(n, seed=3)
    img = fourier_to_image(FourierProjector(vol).project(np.eye(3)), n)
    ref = vol.sum(axis=0)
    assert _corr(img, ref) > 0.9995
    # grid points are sampled exactly: only the gridding pre-correction (< 8 %
    # inside 0.3 N) separates the two
    assert np.abs(img - ref).max() < 0.08 * ref.max()


@pytest.mark.parametrize("n", BOXES)
def test_random_projection_matches_real_space_rotation_and_sum(n, rng):
    """Brute force: rotate the map in real space (cubic spline), sum along z."""
    vol = blob_map(n, seed=4).astype(np.float64)
    proj = FourierProjector(vol)
    c = n // 2
    zz, yy, xx = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    image_xyz = np.stack([xx, yy, zz]).reshape(3, -1).astype(np.float64)
    for a in _random_rotations(rng, 3):
        # rotated map at image point x is the map at A.T @ x
        src = a.T @ image_xyz  # (3, n^3) map (x, y, z)
        rotated = ndimage.map_coordinates(
            vol, [src[2] + c, src[1] + c, src[0] + c], order=3, mode="constant"
        ).reshape(n, n, n)
        ref = rotated.sum(axis=0)
        img = fourier_to_image(proj.project(a), n)
        assert _corr(img, ref) > 0.999
        # relative L2 error ~3 % at padding 2, mostly the DC term, which is
        # sampled on the grid and so carries the gridding pre-correction
        assert np.linalg.norm(img - ref) < 0.05 * np.linalg.norm(ref)


@pytest.mark.parametrize("n", BOXES)
def test_friedel_symmetry_of_sampled_transform(n, rng):
    proj = FourierProjector(blob_map(n, seed=5))
    q = rng.uniform(-n / 3, n / 3, (200, 3))
    np.testing.assert_allclose(proj.sample(-q), np.conj(proj.sample(q)), atol=1e-4)
    # kx = 0 column of an image transform is Hermitian: F(0, -ky) = conj F(0, ky)
    f = proj.project(_random_rotations(rng, 1))[0]
    col = f[:, 0]
    ky = np.fft.fftfreq(n, 1.0 / n).astype(int)
    idx = {k: i for i, k in enumerate(ky)}
    for k in range(1, (n - 1) // 2 + 1):
        assert col[idx[-k]] == pytest.approx(np.conj(col[idx[k]]), abs=1e-4)


@pytest.mark.parametrize("n", BOXES)
def test_batch_shape_kept_and_single_matrix_gives_one_image(n, rng):
    proj = FourierProjector(blob_map(n))
    rots = _random_rotations(rng, 5)
    f = proj.project(rots, batch_size=2)
    assert f.shape == (5, n, n // 2 + 1)
    assert f.dtype == np.complex64
    np.testing.assert_allclose(proj.project(rots[3]), f[3], rtol=1e-6, atol=1e-6)


def test_float32_and_float64_maps_agree_and_keep_precision(rng):
    n = 24
    vol = blob_map(n, seed=6)
    rots = _random_rotations(rng, 4)
    f32 = FourierProjector(vol).project(rots)
    f64 = FourierProjector(vol.astype(np.float64)).project(rots)
    assert f32.dtype == np.complex64 and f64.dtype == np.complex128
    np.testing.assert_allclose(f32, f64, atol=1e-3 * np.abs(f64).max())


def test_r_max_zeroes_high_frequencies(rng):
    n = 32
    proj = FourierProjector(blob_map(n))
    f = proj.project(_random_rotations(rng, 2), r_max_px=6)
    kx, ky = frequency_grid_2d(n)
    outside = np.hypot(kx, ky) > 6
    assert np.all(f[:, outside] == 0)
    assert np.all(np.abs(f[:, ~outside]).sum(axis=1) > 0)


def test_project_pixels_matches_full_projection(rng):
    n = 32
    proj = FourierProjector(blob_map(n))
    rots = _random_rotations(rng, 3)
    kx, ky = frequency_grid_2d(n)
    pick = rng.choice(kx.size, 50, replace=False)
    part = proj.project_pixels(rots, kx.ravel()[pick], ky.ravel()[pick])
    full = proj.project(rots).reshape(3, -1)[:, pick]
    np.testing.assert_allclose(part, full, rtol=1e-6, atol=1e-6)
    assert slice_coordinates(rots, kx.ravel()[pick], ky.ravel()[pick]).shape == (
        3,
        50,
        3,
    )


@pytest.mark.parametrize("n", BOXES)
def test_forward_model_shifts_content_by_minus_origin_and_applies_ctf(n, rng):
    proj = FourierProjector(blob_map(n, seed=7))
    rots = _random_rotations(rng, 2)
    origins = np.array([[3.0, -2.0], [-4.0, 5.0]])
    centred = fourier_to_image(proj.project(rots), n)
    shifted = fourier_to_image(forward_model(proj, rots, origins_px=origins), n)
    for i, (dx, dy) in enumerate(origins.astype(int)):
        # RELION: content moves by -origin (pinned in test_relion_projection.py)
        expected = np.roll(centred[i], (-dy, -dx), axis=(0, 1))
        np.testing.assert_allclose(shifted[i], expected, atol=1e-3 * centred.max())
    ctf = rng.uniform(-1, 1, (2, n, n // 2 + 1)).astype(np.float32)
    np.testing.assert_allclose(
        forward_model(proj, rots, ctf=ctf), proj.project(rots) * ctf, rtol=1e-6
    )


def test_bad_volume_shape_raises_value_error():
    with pytest.raises(ValueError, match="cubic"):
        FourierProjector(np.zeros((8, 8, 9), np.float32))


@pytest.mark.parametrize(
    ("n", "padding", "r_max_px", "dtype"),
    [(17, 2, None, np.float32), (16, 3, 5.0, np.float64), (12, 1, None, np.float32)],
)
def test_padded_transform_in_blocks_equals_the_whole_padded_rfftn(
    n, padding, r_max_px, dtype, rng, monkeypatch
):
    """The layout from the axis-by-axis transform in blocks (down to one row or
    plane, ``CHUNK_BYTES``) against the plain recipe: the gridding-corrected map
    zero-padded in FFT order, ``scipy.fft.rfftn``, frequencies -c..c (0..c on
    x), zero beyond r_max; bit for bit (the same transforms in rfftn's order)."""
    import scipy.fft

    from localrefine_plugin.engine import projector as projector_module
    from localrefine_plugin.engine.projector import (
        axis_blocks,
        fft_order_index,
        gridding_correction_1d,
        padded_radius2,
    )

    vol = rng.normal(size=(n, n, n)).astype(dtype)
    npad = padding * n
    g = gridding_correction_1d(n, padding)
    padded = np.zeros((npad,) * 3, dtype=dtype)
    idx = fft_order_index(n, npad)
    padded[np.ix_(idx, idx, idx)] = vol / (g[:, None, None] * g[None, :, None] * g)
    f = scipy.fft.rfftn(padded)
    for chunk in (projector_module.CHUNK_BYTES, 1):
        monkeypatch.setattr(projector_module, "CHUNK_BYTES", chunk)
        proj = FourierProjector(vol, padding=padding, r_max_px=r_max_px)
        c = proj.c
        want = np.zeros(proj.data.shape, dtype=proj.dtype)
        blocks = axis_blocks(c, npad, drop_alias=False)
        for fz, lz in blocks:
            for fy, ly in blocks:
                want[lz, ly, : c + 1] = f[fz, fy, : c + 1]
        want[padded_radius2(c) > (padding * proj.r_max_px) ** 2] = 0
        assert proj.data.dtype == f.dtype
        np.testing.assert_array_equal(proj.data, want)
