"""CTF: analytic values of RELION's formula (the full check is against relion_project)."""

import numpy as np
import pytest

from localrefine_plugin.engine.ctf import (
    N_COEFFICIENTS,
    CtfBatch,
    CtfParams,
    ctf_2d,
    ctf_coefficients,
    electron_wavelength_a,
)
from localrefine_plugin.engine.fourier import frequency_grid_2d


def test_wavelength_at_300_and_200_kv():
    # textbook relativistic wavelengths: 1.9687 pm at 300 kV, 2.5079 pm at 200 kV
    assert electron_wavelength_a(300) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength_a(200) == pytest.approx(0.025079, abs=2e-6)


def test_zero_frequency_equals_amplitude_contrast():
    c = ctf_2d(
        CtfParams(15000.0, 15000.0, 0.0, amplitude_contrast=0.07),
        64,
        1.0,
        dtype=np.float64,
    )
    assert c[0, 0] == pytest.approx(0.07, abs=1e-12)


def test_first_zero_of_a_pure_phase_ctf():
    # Cs = 0, Q = 0: CTF = -sin(-pi lambda dF u^2) vanishes at u^2 = 1 / (lambda dF)
    n, apix, df = 256, 1.0, 20000.0
    c = ctf_2d(
        CtfParams(df, df, 0.0, cs_mm=0.0, amplitude_contrast=0.0),
        n,
        apix,
        dtype=np.float64,
    )
    lam = electron_wavelength_a(300.0)
    u_zero = np.sqrt(1.0 / (lam * df))
    kx = np.arange(n // 2 + 1) / (n * apix)
    expected = np.sin(np.pi * lam * df * kx**2)
    np.testing.assert_allclose(c[0], expected, atol=1e-12)
    assert np.all(c[0][kx < 0.95 * u_zero] >= 0)
    assert c[0][np.searchsorted(kx, 1.05 * u_zero)] < 0


def test_astigmatism_follows_the_defocus_angle():
    # along the azimuth the defocus is dU, perpendicular to it dV
    n, apix = 128, 1.0
    params = CtfParams(10000.0, 30000.0, 90.0, cs_mm=0.0, amplitude_contrast=0.0)
    c = ctf_2d(params, n, apix, dtype=np.float64)
    kx, ky = frequency_grid_2d(n)
    lam = electron_wavelength_a(300.0)
    u2 = (kx**2 + ky**2) / (n * apix) ** 2
    along_y = (kx == 0) & (ky > 0)  # azimuth 90 degrees: defocus U along y
    along_x = (ky == 0) & (kx > 0)
    np.testing.assert_allclose(
        c[along_y], np.sin(np.pi * lam * 10000.0 * u2[along_y]), atol=1e-12
    )
    np.testing.assert_allclose(
        c[along_x], np.sin(np.pi * lam * 30000.0 * u2[along_x]), atol=1e-12
    )


def test_batched_parameters_give_one_ctf_each():
    params = CtfParams(
        np.array([10000.0, 20000.0, 30000.0]),
        np.array([10000.0, 20000.0, 30000.0]),
        0.0,
    )
    c = ctf_2d(params, 32, 1.5)
    assert c.shape == (3, 32, 17) and c.dtype == np.float32
    single = ctf_2d(CtfParams(20000.0, 20000.0, 0.0), 32, 1.5)
    np.testing.assert_allclose(c[1], single, atol=1e-7)


def test_bfactor_envelope():
    plain = ctf_2d(CtfParams(10000.0, 10000.0, 0.0), 64, 1.0, dtype=np.float64)
    damped = ctf_2d(
        CtfParams(10000.0, 10000.0, 0.0, bfactor_a2=100.0), 64, 1.0, dtype=np.float64
    )
    kx, ky = frequency_grid_2d(64)
    u2 = (kx**2 + ky**2) / 64.0**2
    np.testing.assert_allclose(damped, plain * np.exp(-25.0 * u2), atol=1e-12)


# box 48: all particles in one chunk; box 256: one particle per chunk;
# float32: the sine of the reduced phase in float32 (about the result's rounding)
@pytest.mark.parametrize(("n", "dtype", "atol"), [
    (48, np.float64, 1e-11), (256, np.float64, 1e-11), (256, np.float32, 3e-7),
])  # fmt: skip
def test_ctf_equals_relions_formula_pixel_by_pixel(n, dtype, atol):
    """Every particle's CTF (mixed B-factors, phase shifts, voltages) equals
    RELION's formula evaluated directly, cos(2 (alpha - azimuth)) and all."""
    rng = np.random.default_rng(5)
    m, apix = 7, 1.3
    d = rng.uniform(5000, 30000, m)
    params = CtfParams(
        d, d * rng.uniform(0.9, 1.0, m), rng.uniform(-180, 180, m),
        voltage_kv=rng.choice([200.0, 300.0], m), cs_mm=rng.uniform(0, 3, m),
        amplitude_contrast=rng.uniform(0.05, 0.15, m),
        phase_shift_deg=rng.uniform(0, 90, m),
        bfactor_a2=np.where(rng.random(m) < 0.5, 0.0, rng.uniform(0, 200, m)),
        scale=rng.uniform(0.5, 1.0, m),
    )  # fmt: skip
    got = ctf_2d(params, n, apix, dtype=dtype)
    assert got.shape == (m, n, n // 2 + 1) and got.dtype == dtype
    ky = np.fft.fftfreq(n) * n
    kx = np.arange(n // 2 + 1)
    sx, sy = np.meshgrid(kx / (n * apix), ky / (n * apix))  # (N, N//2+1)
    u2, alpha = sx**2 + sy**2, np.arctan2(sy, sx)
    for i in range(m):
        v = params.voltage_kv[i] * 1e3
        lam = 12.2643247 / np.sqrt(v * (1 + v * 0.978466e-6))
        du, dv = params.defocus_u_a[i], params.defocus_v_a[i]
        az = np.deg2rad(params.defocus_angle_deg[i])
        q = params.amplitude_contrast[i]
        defocus = -(du + dv) / 2 - (du - dv) / 2 * np.cos(2 * (alpha - az))
        chi = (
            np.pi * lam * defocus * u2
            + np.pi / 2 * params.cs_mm[i] * 1e7 * lam**3 * u2**2
            - np.deg2rad(params.phase_shift_deg[i])
            - np.arctan(q / np.sqrt(1 - q * q))
        )
        want = -np.sin(chi) * np.exp(-params.bfactor_a2[i] / 4 * u2) * params.scale[i]
        np.testing.assert_allclose(got[i], want, rtol=0, atol=atol)


def test_ctf_batch_is_lazy_and_indexes_like_the_values():
    """`CtfBatch` evaluates to `ctf_2d` of its parameters; rows of the batch are
    the batch of those rows' parameters (slices and index arrays), scalar
    fields stay shared, and `coefficients` gives one row per particle."""
    rng = np.random.default_rng(8)
    m, n, apix = 6, 24, 1.1
    params = CtfParams(
        rng.uniform(8000, 20000, m), rng.uniform(8000, 20000, m),
        rng.uniform(0, 180, m), bfactor_a2=rng.uniform(0, 50, m),
    )  # fmt: skip
    batch = CtfBatch(params, n, apix, m)
    values = ctf_2d(params, n, apix)
    assert len(batch) == m and batch.shape == values.shape
    assert np.array_equal(np.asarray(batch), values)
    for rows in (slice(1, 4), np.array([5, 0, 2]), slice(None, None, 2)):
        part = batch[rows]
        assert np.array_equal(np.asarray(part), values[rows])
        assert part.params.voltage_kv == 300.0  # scalar fields stay shared
    assert batch.coefficients().shape == (m, N_COEFFICIENTS)
    shared = CtfBatch(CtfParams(15000.0, 14000.0, 20.0), n, apix, 4)
    assert np.array_equal(np.asarray(shared)[3], ctf_2d(shared.params, n, apix))
    c = shared.coefficients()
    assert c.shape == (4, N_COEFFICIENTS) and np.all(c == c[:1])
    with pytest.raises(IndexError):
        batch[np.zeros((2, 2), int)]


def test_ctf_coefficients_match_the_formula_terms():
    """`ctf_coefficients` per particle: the mean and astigmatic defocus terms,
    pi lambda, pi/2 Cs lambda^3, the constant phase, -B/4 and -scale."""
    params = CtfParams(20000.0, 16000.0, 30.0, 300.0, 2.7, 0.1, 45.0, 80.0, 0.8)
    c = ctf_coefficients(params)[0]
    lam = electron_wavelength_a(300.0)
    half = -(20000.0 - 16000.0) / 2
    want = [
        -18000.0, half * np.cos(np.deg2rad(60)), half * np.sin(np.deg2rad(60)),
        np.pi * lam, np.pi / 2 * 2.7e7 * lam**3,
        -np.pi / 4 - np.arctan(0.1 / np.sqrt(0.99)), -20.0, -0.8,
    ]  # fmt: skip
    np.testing.assert_allclose(c, want, rtol=1e-14)
