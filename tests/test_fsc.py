"""FSC against analytic truth: identical maps, independent noise, known crossings."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from localrefine_plugin.engine.errors import InputError
from localrefine_plugin.engine.fourier import shell_index_3d
from localrefine_plugin.engine.fsc import (
    Resolution,
    compute_fsc,
    fsc_curve,
    fsc_file_resolution,
    mask_corrected_fsc,
    plot_fsc,
    read_fsc_file,
    resolution_at,
    write_fsc_csv,
)
from localrefine_plugin.engine.masks import create_soft_mask

from .conftest import blob_map


@pytest.mark.parametrize("n", [32, 33], ids=["even", "odd"])
def test_identical_maps_have_fsc_one(n, rng):
    vol = rng.standard_normal((n, n, n)).astype(np.float32)
    fsc = fsc_curve(vol, vol)
    assert fsc.shape == (n // 2 + 1,)
    np.testing.assert_allclose(fsc, 1.0, atol=1e-6)


def test_fsc_is_scale_invariant_and_sign_sensitive(rng):
    vol = rng.standard_normal((24, 24, 24))
    np.testing.assert_allclose(fsc_curve(vol, 3.0 * vol), 1.0, atol=1e-12)
    np.testing.assert_allclose(fsc_curve(vol, -vol), -1.0, atol=1e-12)


def test_independent_noise_fsc_is_within_its_standard_error(rng):
    n = 48
    a = rng.standard_normal((n, n, n))
    b = rng.standard_normal((n, n, n))
    fsc = fsc_curve(a, b)
    counts = np.bincount(shell_index_3d(n).ravel(), minlength=n)[: n // 2 + 1]
    # half-space shells hold each independent coefficient about once
    sigma = 1.0 / np.sqrt(counts[2:])
    z = fsc[2:] / sigma
    assert np.all(np.abs(z) < 4.5)
    assert 0.6 < np.std(z) < 1.5  # really noise of that size, not zero


def test_fsc_of_signal_plus_noise_matches_expected_snr(rng):
    """Signal power S, noise power N per half: FSC = S / (S + N)."""
    n = 48
    signal = rng.standard_normal((n, n, n))
    h1 = signal + 0.5 * rng.standard_normal((n, n, n))
    h2 = signal + 0.5 * rng.standard_normal((n, n, n))
    fsc = fsc_curve(h1, h2)
    rho = 1.0 / 1.25
    counts = np.bincount(shell_index_3d(n).ravel(), minlength=n)[: n // 2 + 1]
    sigma = (1.0 - rho**2) / np.sqrt(counts[2:])  # standard error of a correlation
    assert np.all(np.abs(fsc[2:] - rho) < 4.5 * sigma)
    assert abs(np.mean(fsc[8:]) - rho) < 0.01


def test_resolution_at_interpolates_between_the_shells_around_the_crossing():
    fsc = np.array([1.0, 0.9, 0.6, 0.3, 0.1, 0.05, 0.0, 0.0, 0.0])  # n = 16
    res = resolution_at(fsc, 0.143, n=16, pixel_size_a=2.0)
    shell = 3 + (0.3 - 0.143) / (0.3 - 0.1)
    assert res.crossed
    assert res.shell == pytest.approx(shell)
    assert res.value_a == pytest.approx(16 * 2.0 / shell)
    assert resolution_at(fsc, 0.5, n=16, pixel_size_a=2.0).shell == pytest.approx(
        1 + (0.9 - 0.5) / (0.9 - 0.6)
    )


def test_resolution_at_never_extrapolates_a_curve_that_never_crosses():
    fsc = np.linspace(1.0, 0.5, 9)  # never below 0.143
    res = resolution_at(fsc, 0.143, n=16, pixel_size_a=1.5)
    assert res == Resolution(value_a=3.0, crossed=False, shell=8.0, threshold=0.143)
    assert "better than 3.00 A" in str(res)


def test_resolution_at_ignores_shell_zero():
    fsc = np.array([-0.2, 0.9, 0.8, 0.1, 0.0])
    res = resolution_at(fsc, 0.143, n=8, pixel_size_a=1.0)
    assert res.crossed and 2 < res.shell < 3


def noisy_half_maps(n: int, noise: float, seed: int):
    """``blob_map`` plus independent noise that grows as ``|k|^2`` in each half.

    Returns ``(clean_map, [half1, half2])``; with ``noise=1`` the FSC crosses
    0.143 mid-range (about shell 0.45 N).
    """
    rng = np.random.default_rng(seed)
    vol = blob_map(n).astype(np.float64)
    k = np.fft.fftfreq(n, 1 / n)
    kz, ky, kx = np.meshgrid(k, k, np.arange(n // 2 + 1), indexing="ij")
    ramp = (kx**2 + ky**2 + kz**2) / (n / 2) ** 2  # (N, N, N//2+1)
    out = []
    for _ in range(2):
        f = np.fft.rfftn(rng.standard_normal((n, n, n))) * ramp * noise
        out.append((vol + np.fft.irfftn(f, s=(n, n, n))).astype(np.float32))
    return vol, out


def test_compute_fsc_without_mask_has_equal_curves():
    _, (h1, h2) = noisy_half_maps(32, 1.0, seed=3)
    res = compute_fsc(h1, h2, pixel_size_a=1.5)
    np.testing.assert_array_equal(res.fsc_masked, res.fsc_unmasked)
    np.testing.assert_array_equal(res.fsc_corrected, res.fsc_unmasked)
    assert np.isnan(res.fsc_randomised).all()
    assert res.resolution_a[0] == np.inf
    assert res.resolution_a[-1] == pytest.approx(3.0)


def test_compute_fsc_randomised_curve_equals_masked_below_the_randomisation_shell():
    vol, (h1, h2) = noisy_half_maps(48, 1.0, seed=4)
    mask = create_soft_mask(vol, 1.5, threshold=0.05, extend_a=3.0, soft_edge_a=6.0)
    res = compute_fsc(h1, h2, mask=mask, pixel_size_a=1.5, seed=1)
    s = res.randomize_shell
    assert res.fsc_unmasked[s] < 0.8 <= res.fsc_unmasked[1:s].min()
    # masking couples neighbouring shells: compare well below the randomisation edge
    np.testing.assert_allclose(
        res.fsc_randomised[: s - 4], res.fsc_masked[: s - 4], atol=2e-3
    )
    np.testing.assert_allclose(
        res.fsc_corrected,
        mask_corrected_fsc(res.fsc_masked, res.fsc_randomised, s),
    )
    # same seed, same result; the correction stays close to the masked curve here
    again = compute_fsc(h1, h2, mask=mask, pixel_size_a=1.5, seed=1)
    np.testing.assert_array_equal(again.fsc_corrected, res.fsc_corrected)
    assert res.resolution_0143.crossed and res.resolution_05.crossed
    assert res.resolution_05.value_a > res.resolution_0143.value_a


def test_mask_corrected_fsc_formula():
    t = np.array([1.0, 0.9, 0.8, 0.6, 0.4, 0.2])
    r = np.array([1.0, 0.9, 0.5, 0.2, 0.1, -0.1])
    out = mask_corrected_fsc(t, r, 2)
    np.testing.assert_allclose(out[:4], t[:4])
    np.testing.assert_allclose(out[4:], [(0.4 - 0.1) / 0.9, (0.2 + 0.1) / 1.1])


def test_csv_and_png_outputs(tmp_path):
    vol, (h1, h2) = noisy_half_maps(32, 1.0, seed=5)
    mask = create_soft_mask(vol, 1.5, threshold=0.05, soft_edge_a=4.5)
    res = compute_fsc(h1, h2, mask=mask, pixel_size_a=1.5)
    path = tmp_path / "fsc.csv"
    write_fsc_csv(path, res)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "shell",
        "resolution_A",
        "fsc_unmasked",
        "fsc_masked",
        "fsc_corrected",
    ]
    assert len(rows) == 17
    assert float(rows[8]["resolution_A"]) == pytest.approx(32 * 1.5 / 8)
    np.testing.assert_allclose(
        [float(r["fsc_corrected"]) for r in rows], res.fsc_corrected, atol=1e-6
    )
    png = tmp_path / "fsc.png"
    plot_fsc(png, res, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsc.csv", "fsc.png"]


def test_compute_fsc_never_below_randomisation_level_is_reported_uncrossed(tmp_path):
    clean = blob_map(32)
    rng = np.random.default_rng(8)
    h1 = clean + 1e-6 * rng.standard_normal(clean.shape).astype(np.float32)
    h2 = clean + 1e-6 * rng.standard_normal(clean.shape).astype(np.float32)
    mask = create_soft_mask(clean, 2.0, threshold=0.05, soft_edge_a=6.0)
    res = compute_fsc(h1, h2, mask=mask, pixel_size_a=2.0)
    assert res.randomize_shell == 17  # past Nyquist: nothing randomised
    np.testing.assert_array_equal(res.fsc_corrected, res.fsc_masked)
    assert res.fsc_corrected.min() > 0.8
    assert res.resolution_0143 == Resolution(4.0, False, 16.0, 0.143)
    png = tmp_path / "fsc.png"
    plot_fsc(png, res)  # the "better than" label renders too
    assert png.stat().st_size > 10_000


def test_fsc_file_round_trip_gives_the_same_resolution(tmp_path):
    """Our fsc.csv read back gives the curve and the resolution it was written from."""
    vol, (h1, h2) = noisy_half_maps(32, 1.0, seed=5)
    mask = create_soft_mask(vol, 1.5, threshold=0.05, soft_edge_a=4.5)
    res = compute_fsc(h1, h2, mask=mask, pixel_size_a=1.5)
    write_fsc_csv(tmp_path / "fsc.csv", res)
    resolution_a, curve, column = read_fsc_file(tmp_path / "fsc.csv")
    assert column == "fsc_corrected" and np.isinf(resolution_a[0])
    np.testing.assert_allclose(curve, res.fsc_corrected, atol=1e-6)
    got = fsc_file_resolution(tmp_path / "fsc.csv")
    assert got.value_a == pytest.approx(res.resolution_0143.value_a, rel=1e-3)
    assert got.crossed == res.resolution_0143.crossed


@pytest.mark.parametrize(
    "text, problem",
    [
        ("shell,resolution_A\n0,inf\n", "fsc_corrected"),
        ("resolution_A,fsc_corrected\ninf,1\n10,x\n5,0.1\n", "not a number"),
        ("resolution_A,fsc_corrected\ninf,1\n5,0.9\n10,0.1\n", "decreasing"),
        ("data_fsc\nloop_\n_rlnSpectralIndex #1\n0\n", "rlnAngstromResolution"),
    ],
)
def test_bad_fsc_files_are_refused_naming_the_file(tmp_path, text, problem):
    path = tmp_path / ("bad.star" if text.startswith("data_") else "bad.csv")
    path.write_text(text)
    with pytest.raises(InputError) as exc:
        fsc_file_resolution(path)
    assert path.name in str(exc.value) and problem in str(exc.value)
    with pytest.raises(InputError, match="not found"):
        read_fsc_file(tmp_path / "missing.csv")
