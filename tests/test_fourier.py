"""Fourier layout: centring, shift sign, shells, round trips for odd and even boxes."""

import numpy as np
import pytest

from localrefine_plugin.engine.fourier import (
    fourier_to_image,
    fourier_to_volume,
    image_to_fourier,
    resolution_of_shell_a,
    shell_index_2d,
    shell_index_3d,
    shift_images_fourier,
    shift_phases_2d,
    volume_to_fourier,
)


@pytest.mark.parametrize("n", [32, 33])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_image_round_trip_keeps_dtype(n, dtype, rng):
    img = rng.normal(size=(3, n, n)).astype(dtype)
    f = image_to_fourier(img)
    assert f.shape == (3, n, n // 2 + 1)
    back = fourier_to_image(f, n)
    assert back.dtype == dtype
    np.testing.assert_allclose(back, img, atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("n", [16, 17])
def test_volume_round_trip(n, rng):
    vol = rng.normal(size=(n, n, n))
    np.testing.assert_allclose(
        fourier_to_volume(volume_to_fourier(vol), n), vol, atol=1e-12
    )


@pytest.mark.parametrize("n", [32, 33])
def test_centre_pixel_has_flat_real_transform(n):
    img = np.zeros((n, n))
    img[n // 2, n // 2] = 1.0
    np.testing.assert_allclose(image_to_fourier(img), 1.0, atol=1e-12)


@pytest.mark.parametrize("n", [32, 33])
def test_positive_shift_moves_content_to_larger_x_and_y(n):
    img = np.zeros((n, n))
    img[n // 2, n // 2] = 1.0
    moved = fourier_to_image(
        shift_images_fourier(image_to_fourier(img), np.array([3.0, -2.0])), n
    )
    y, x = np.unravel_index(np.argmax(moved), moved.shape)
    assert (x, y) == (n // 2 + 3, n // 2 - 2)
    np.testing.assert_allclose(moved.max(), 1.0, atol=1e-9)


def test_shell_indices_match_radius():
    s2 = shell_index_2d(8)
    assert s2[0, 0] == 0 and s2[0, 4] == 4 and s2[3, 4] == 5 and s2[-3, 4] == 5
    s3 = shell_index_3d(8)
    assert s3.shape == (8, 8, 5)
    assert s3[0, 0, 3] == 3 and s3[2, -2, 1] == 3


def test_resolution_of_shell():
    res = resolution_of_shell_a(np.array([0, 1, 32]), 64, 1.5)
    assert (
        np.isinf(res[0])
        and res[1] == pytest.approx(96.0)
        and res[2] == pytest.approx(3.0)
    )


@pytest.mark.parametrize("n", [33, 64])
@pytest.mark.parametrize(
    ("dtype", "atol"), [(np.complex128, 1e-13), (np.complex64, 3e-7)]
)
def test_shift_phases_equal_the_exponential_of_the_phase_plane(n, dtype, atol):
    """The separable phases (row factor x column factor) equal
    exp(-2 pi i (kx dx + ky dy) / N) pixel by pixel, for any leading shape."""
    rng = np.random.default_rng(2)
    shifts = rng.uniform(-20, 20, (3, 4, 2))
    got = shift_phases_2d(n, shifts, dtype=dtype)
    assert got.shape == (3, 4, n, n // 2 + 1) and got.dtype == dtype
    ky, kx = np.meshgrid(np.fft.fftfreq(n) * n, np.arange(n // 2 + 1), indexing="ij")
    for idx in np.ndindex(3, 4):
        dx, dy = shifts[idx]
        want = np.exp(-2j * np.pi * (kx * dx + ky * dy) / n)
        np.testing.assert_allclose(got[idx], want, rtol=0, atol=atol)
    single = shift_phases_2d(n, shifts[1, 2], dtype=dtype)
    np.testing.assert_array_equal(single, got[1, 2])
