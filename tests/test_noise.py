"""Noise model (engine/noise.py): normalisation, residuals, optics groups."""

from __future__ import annotations

import numpy as np
import pytest

from localrefine_plugin.engine.fourier import image_to_fourier, radius_grid_2d
from localrefine_plugin.engine.noise import (
    Sigma2Accumulator,
    estimate_sigma2,
    inverse_sigma2_per_particle,
    noise_subset,
)


@pytest.mark.parametrize(
    "n", [pytest.param(32, id="even32"), pytest.param(33, id="odd33")]
)
def test_white_noise_gives_n_squared_variance_in_every_shell(n, rng):
    s = 0.7
    noise = rng.normal(0, s, (400, n, n))
    sigma2 = estimate_sigma2(image_to_fourier(noise))
    assert sigma2.shape == (1, n // 2 + 1)
    expected = n * n * s * s
    # shells 1.. hold >= 6 pixels x 400 images: relative error <~ 4 / sqrt(2400)
    np.testing.assert_allclose(sigma2[0, 1:], expected, rtol=0.1)
    # all shells pooled: much tighter
    assert sigma2[0, 1:].mean() == pytest.approx(expected, rel=0.01)


def test_residual_estimate_recovers_coloured_noise_under_a_strong_signal(rng):
    n, m = 32, 300
    # noise with a known radial power: filter white noise by g(k) = exp(-k / 8)
    g = np.exp(-radius_grid_2d(n) / 8.0)
    white = image_to_fourier(rng.normal(0, 1.0, (m, n, n)))
    noise_f = white * g
    signal_f = image_to_fourier(rng.normal(0, 5.0, (m, n, n)))
    sigma2 = estimate_sigma2(signal_f + noise_f, predictions_f=signal_f)
    expected = n * n * np.exp(-np.arange(n // 2 + 1) / 4.0)  # E|n|^2 = N^2 g^2
    # g varies within a shell (radius rounded): allow that, plus statistics
    np.testing.assert_allclose(sigma2[0, 1:], expected[1:], rtol=0.15)
    # without predictions: the image power (signal + noise) is an upper estimate
    upper = estimate_sigma2(signal_f + noise_f)
    assert np.all(upper[0, 1:] > 5 * sigma2[0, 1:])


def test_optics_groups_get_their_own_noise_rows(rng):
    n = 24
    groups = np.repeat([0, 2, 1], 100)  # 0-based, unsorted
    level = np.array([1.0, 2.0, 3.0])[groups]
    images = image_to_fourier(rng.normal(size=(300, n, n)) * level[:, None, None])
    sigma2 = estimate_sigma2(images, optics_groups=groups)
    assert sigma2.shape == (3, n // 2 + 1)
    np.testing.assert_allclose(
        sigma2[:, 1:].mean(axis=1), n * n * np.array([1.0, 4.0, 9.0]), rtol=0.03
    )
    inv = inverse_sigma2_per_particle(sigma2, groups)
    assert inv.shape == (300, n // 2 + 1)
    np.testing.assert_array_equal(inv[150], 1.0 / sigma2[2])


def test_streaming_batches_equal_one_batch_and_ranks_add_up(rng):
    n = 20
    images = image_to_fourier(rng.normal(size=(60, n, n)))
    pred = image_to_fourier(rng.normal(size=(60, n, n)) * 0.3)
    groups = rng.integers(0, 2, 60)
    whole = estimate_sigma2(
        images, predictions_f=pred, optics_groups=groups, n_groups=2
    )
    a, b = Sigma2Accumulator(n, 2), Sigma2Accumulator(n, 2)
    a.add(images[:25], predictions_f=pred[:25], optics_groups=groups[:25])
    b.add(images[25:], predictions_f=pred[25:], optics_groups=groups[25:])
    a.add_accumulator(b)
    np.testing.assert_allclose(a.sigma2(), whole, rtol=1e-12)


def test_noiseless_residuals_are_floored_so_inverse_is_finite(rng):
    n = 16
    images = image_to_fourier(rng.normal(size=(5, n, n)))
    sigma2 = estimate_sigma2(images, predictions_f=images)
    assert np.all(np.isfinite(1.0 / sigma2)) and np.all(sigma2 > 0)
    power = estimate_sigma2(images)
    np.testing.assert_allclose(sigma2, 1e-6 * power, rtol=1e-9)


def test_bad_group_indices_raise():
    with pytest.raises(ValueError, match="optics group"):
        inverse_sigma2_per_particle(np.ones((2, 9)), np.array([0, 2]))
    with pytest.raises(ValueError, match="0-based"):
        estimate_sigma2(
            np.ones((2, 16, 9), np.complex64), optics_groups=np.array([-1, 0])
        )


def test_noise_subset_caps_each_optics_group_and_is_reproducible():
    rows = np.repeat([0, 1, 2], [50, 7, 30])
    keep = noise_subset(rows, 10, seed=3)
    assert np.all(np.diff(keep) > 0)  # sorted, no repeats
    counts = np.bincount(rows[keep], minlength=3)
    assert counts.tolist() == [10, 7, 10]  # a group under the cap keeps every particle
    np.testing.assert_array_equal(keep, noise_subset(rows, 10, seed=3))
    assert not np.array_equal(keep, noise_subset(rows, 10, seed=4))
    np.testing.assert_array_equal(noise_subset(rows, 0), np.arange(rows.size))
    np.testing.assert_array_equal(noise_subset(rows, 50), np.arange(rows.size))
    with pytest.raises(ValueError, match="cap"):
        noise_subset(rows, -1)


@pytest.mark.parametrize(("n", "dtype"), [(16, np.complex64), (17, np.complex128)])
def test_accumulator_sums_equal_a_pixel_by_pixel_reference(n, dtype, rng):
    """Residual and image power per optics group and shell, and pixel counts,
    against a direct loop over every half-plane pixel of every image (shell =
    rounded radius, pixels beyond N//2 left out); groups 0 and 2 of 3 present."""
    m, n_groups = 7, 3
    shape = (m, n, n // 2 + 1)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    p = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    groups = np.array([0, 2, 2, 0, 2, 0, 0])
    acc = Sigma2Accumulator(n, n_groups)
    acc.add(x, predictions_f=p, optics_groups=groups)
    shells = n // 2 + 1
    sums, image_sums, counts = (np.zeros((n_groups, shells)) for _ in range(3))
    for i in range(m):
        for ky in range(n):
            for kx in range(n // 2 + 1):
                fy = ky if ky <= n // 2 else ky - n  # FFT order
                s = int(np.rint(np.hypot(kx, fy)))
                if s >= shells:
                    continue
                xi, pi = complex(x[i, ky, kx]), complex(p[i, ky, kx])
                sums[groups[i], s] += abs(xi - pi) ** 2
                image_sums[groups[i], s] += abs(xi) ** 2
                counts[groups[i], s] += 1
    rtol = 1e-6 if dtype == np.complex64 else 1e-12
    np.testing.assert_allclose(acc.sums, sums, rtol=rtol)
    np.testing.assert_allclose(acc.image_sums, image_sums, rtol=rtol)
    np.testing.assert_array_equal(acc.counts, counts)
