"""Low-pass and phase randomisation against analytic truth."""

from __future__ import annotations

import numpy as np
import pytest

from localrefine_plugin.engine.filters import (
    lowpass,
    raised_cosine_falloff,
    randomize_phases_beyond,
)
from localrefine_plugin.engine.fourier import volume_to_fourier


def _plane_wave(n: int, k: tuple[int, int, int]) -> np.ndarray:
    """cos(2 pi k.x / N) on the grid; its transform sits at |k| cycles per box."""
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    return np.cos(2 * np.pi * (k[0] * x + k[1] * y + k[2] * z) / n)


def test_raised_cosine_falloff_values():
    d = np.array([-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    got = raised_cosine_falloff(d, 4.0)
    want = [
        1.0,
        1.0,
        0.5 + 0.5 * np.cos(np.pi / 4),
        0.5,
        0.5 + 0.5 * np.cos(0.75 * np.pi),
        0.0,
        0.0,
    ]
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("n", [32, 33], ids=["even", "odd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lowpass_scales_plane_waves_by_the_raised_cosine(n, dtype):
    px, res = 2.0, 8.0  # cut-off shell k0 = n * px / res
    k0 = n * px / res
    for k in [(2, 1, 0), (int(k0), 0, 0), (int(k0) + 1, 0, 0), (3, 4, 5)]:
        wave = _plane_wave(n, k).astype(dtype)
        out = lowpass(wave, px, res, edge_width_shells=2)
        assert out.dtype == dtype
        r = np.linalg.norm(k)
        gain = 0.5 + 0.5 * np.cos(np.pi * np.clip((r - (k0 - 1)) / 2, 0, 1))
        tol = 1e-5 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(out, gain * wave, atol=tol)


def test_randomize_phases_keeps_amplitudes_and_low_shells(rng):
    n = 24
    vol = rng.standard_normal((n, n, n))
    out = randomize_phases_beyond(vol, 5, rng=np.random.default_rng(0))
    f0, f1 = volume_to_fourier(vol), volume_to_fourier(out)
    kz = np.fft.fftfreq(n, 1 / n)[:, None, None]
    ky = np.fft.fftfreq(n, 1 / n)[None, :, None]
    kx = np.arange(n // 2 + 1)[None, None, :]
    r = np.sqrt(kx**2 + ky**2 + kz**2)
    low = r < 5
    np.testing.assert_allclose(f1[low], f0[low], atol=1e-9)
    # away from the self-conjugate planes the amplitudes are kept exactly
    interior = (r >= 5) & (kx > 0) & (kx < n // 2)
    np.testing.assert_allclose(np.abs(f1[interior]), np.abs(f0[interior]), rtol=1e-9)
    # and the phases really changed: correlation of the high band is ~0
    c = np.vdot(f0[interior], f1[interior]).real / np.sum(np.abs(f0[interior]) ** 2)
    assert abs(c) < 0.05
