"""Back-projection and reconstruction (engine/backprojector.py) against analytic truth.

The truth is a map of Gaussian blobs: its projection along z at rotation ``A``
is, exactly up to negligible aliasing, the 2D Gaussian of the same blobs at
``(A p)_xy`` with amplitude times ``sqrt(2 pi) sigma`` (the line integral).
"""

from __future__ import annotations

import numpy as np
import pytest

from localrefine_plugin.engine.backprojector import BackProjector
from localrefine_plugin.engine.ctf import CtfParams, ctf_2d
from localrefine_plugin.engine.fourier import (
    image_to_fourier,
    shell_index_3d,
    volume_to_fourier,
)
from localrefine_plugin.engine.geometry import euler_to_matrix
from localrefine_plugin.engine.projector import FourierProjector

BOXES = [pytest.param(32, id="even32"), pytest.param(33, id="odd33")]
SIGMA_PX = 1.0  # signal up to Nyquist (sigma 1.5 px leaves ~1e-4 of it there)


def gaussian_model(n, rng, *, k=40):
    """Blob centres (k, 3) as (x, y, z) pixels from the centre, amplitudes (k,)."""
    centres = rng.uniform(-0.3 * n, 0.3 * n, (4 * k, 3))
    centres = centres[np.linalg.norm(centres, axis=1) < 0.3 * n][:k]
    return centres, rng.uniform(0.5, 1.5, len(centres))


def gaussian_map(n, centres, amps, sigma=SIGMA_PX):
    ax = np.arange(n) - n // 2
    vol = np.zeros((n, n, n))
    for (px, py, pz), a in zip(centres, amps, strict=True):
        gx = np.exp(-((ax - px) ** 2) / (2 * sigma**2))
        gy = np.exp(-((ax - py) ** 2) / (2 * sigma**2))
        gz = np.exp(-((ax - pz) ** 2) / (2 * sigma**2))
        vol += a * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return vol


def gaussian_projections(n, centres, amps, rotations, sigma=SIGMA_PX):
    """Exact line integrals along z of the rotated blob map, (m, N, N) float64."""
    ax = np.arange(n) - n // 2
    q = np.einsum("mij,kj->mki", rotations, centres)  # (m, k, 3) image coordinates
    gx = np.exp(-((ax[None, None, :] - q[..., 0:1]) ** 2) / (2 * sigma**2))  # (m, k, N)
    gy = np.exp(-((ax[None, None, :] - q[..., 1:2]) ** 2) / (2 * sigma**2))
    scale = amps * np.sqrt(2 * np.pi) * sigma
    return np.einsum("mky,mkx,k->myx", gy, gx, scale)


def random_rotations(rng, m):
    rot, psi = rng.uniform(-180, 180, (2, m))
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, m)))
    return euler_to_matrix(rot, tilt, psi)


def fsc_per_shell(a, b):
    """Plain FSC per integer shell 0 .. N//2."""
    n = a.shape[0]
    fa, fb = (
        volume_to_fourier(a.astype(np.float64)),
        volume_to_fourier(b.astype(np.float64)),
    )
    s = shell_index_3d(n).ravel()
    num = np.bincount(s, (fa * np.conj(fb)).real.ravel())
    den = np.sqrt(
        np.bincount(s, (np.abs(fa) ** 2).ravel())
        * np.bincount(s, (np.abs(fb) ** 2).ravel())
    )
    return (num / den)[: n // 2 + 1]


@pytest.fixture(scope="module", params=BOXES)
def noiseless_set(request):
    """(n, map, rotations, image transforms) for 2,000 random poses."""
    n = request.param
    rng = np.random.default_rng(7 + n)
    centres, amps = gaussian_model(n, rng)
    rotations = random_rotations(rng, 2000)
    images = gaussian_projections(n, centres, amps, rotations)
    return n, gaussian_map(n, centres, amps), rotations, image_to_fourier(images)


def test_reconstruction_from_2000_noiseless_projections_reproduces_the_map(
    noiseless_set,
):
    n, vol, rotations, f = noiseless_set
    bp = BackProjector(n)
    for start in range(0, len(f), 500):
        bp.insert(f[start : start + 500], rotations[start : start + 500])
    assert bp.n_inserted == 2000
    rec = bp.reconstruct()
    assert rec.shape == (n, n, n) and rec.dtype == np.float32
    fsc = fsc_per_shell(rec, vol)
    last = int(0.9 * (n // 2))
    assert fsc[: last + 1].min() >= 0.95, fsc.round(4)
    # a map whose projections are the images: same scale as the truth
    assert float((rec * vol).sum() / (vol * vol).sum()) == pytest.approx(1.0, abs=0.01)


def test_project_then_backproject_round_trip_gives_fsc_close_to_one(noiseless_set):
    n, vol, rotations, _ = noiseless_set
    rotations = rotations[:1000]
    f = FourierProjector(vol.astype(np.float32)).project(rotations)
    bp = BackProjector(n)
    bp.insert(f, rotations)
    fsc = fsc_per_shell(bp.reconstruct(), vol)
    assert fsc[: int(0.9 * (n // 2)) + 1].min() >= 0.95, fsc.round(4)


def test_ctf_modulated_images_are_ctf_corrected(noiseless_set):
    n, vol, rotations, f = noiseless_set
    rng = np.random.default_rng(3)
    m = len(f)
    du = rng.uniform(5000, 20000, m)
    ctf = ctf_2d(CtfParams(du, du - 500, rng.uniform(0, 180, m)), n, 2.0)
    bp = BackProjector(n)
    bp.insert(f * ctf, rotations, ctf=ctf)
    fsc = fsc_per_shell(bp.reconstruct(), vol)
    assert fsc[: int(0.9 * (n // 2)) + 1].min() >= 0.95, fsc.round(4)
    # the weight is the sum of CTF^2: at the DC every image has CTF^2 = sin^2(atan(Q/..))
    c = bp.c
    assert bp.weight[c, c, 0] == pytest.approx(m * float(ctf[0, 0, 0]) ** 2, rel=1e-9)


def test_identity_insert_lands_on_grid_points_of_the_central_plane(rng):
    n, p = 16, 2
    f = rng.normal(size=(n, n // 2 + 1)) + 1j * rng.normal(size=(n, n // 2 + 1))
    bp = BackProjector(n, padding=p)
    bp.insert(f[None], np.eye(3)[None])
    c = bp.c
    for ky, kx in [(0, 1), (3, 2), (-4, 5), (-7, 0), (2, 7)]:
        # image frequency (kx, ky) -> padded (2 kx, 2 ky, 0): data[z + c, y + c, x]
        assert bp.data[c, c + p * ky, p * kx] == pytest.approx(f[ky % n, kx])
        assert bp.weight[c, c + p * ky, p * kx] == pytest.approx(1.0)
    # nothing off the z = 0 plane
    assert np.abs(bp.data[np.arange(bp.shape[0]) != c]).max() == 0


@pytest.mark.parametrize("n", BOXES)
def test_friedel_mates_rotated_image_with_psi_plus_180_gives_same_accumulators(n, rng):
    img = rng.normal(size=(n, n))
    # 180 degree in-plane rotation about the centre N//2 (exact on the grid)
    idx = (2 * (n // 2) - np.arange(n)) % n
    img180 = img[np.ix_(idx, idx)]
    rot, tilt, psi = 30.0, 70.0, 10.0
    a = euler_to_matrix(rot, tilt, psi)[None]
    b = euler_to_matrix(rot, tilt, psi + 180.0)[None]
    bp1, bp2 = BackProjector(n), BackProjector(n)
    bp1.insert(image_to_fourier(img)[None], a)
    bp2.insert(image_to_fourier(img180)[None], b)
    np.testing.assert_allclose(bp1.weight, bp2.weight, atol=1e-9)
    np.testing.assert_allclose(bp1.data, bp2.data, atol=1e-8 * np.abs(bp1.data).max())


def test_add_equals_inserting_everything_in_one(noiseless_set):
    """Also compares the two accumulation paths: 60 images at box 32/33 use
    bincount, 25 and 35 images use ufunc.at (fewer entries than voxels)."""
    n, _, rotations, f = noiseless_set
    whole, part1, part2 = BackProjector(n), BackProjector(n), BackProjector(n)
    whole.insert(f[:60], rotations[:60], weights=np.linspace(0.5, 1.5, 60))
    part1.insert(f[:25], rotations[:25], weights=np.linspace(0.5, 1.5, 60)[:25])
    part2.insert(f[25:60], rotations[25:60], weights=np.linspace(0.5, 1.5, 60)[25:])
    part1.add(part2)
    assert part1.n_inserted == 60
    np.testing.assert_allclose(
        part1.data, whole.data, atol=1e-9 * np.abs(whole.data).max()
    )
    np.testing.assert_allclose(
        part1.weight, whole.weight, atol=1e-12 * whole.weight.max()
    )
    with pytest.raises(ValueError, match="cannot add"):
        part1.add(BackProjector(n + 2))


def test_complex64_images_are_accepted_and_accumulate_in_float64(noiseless_set):
    n, _, rotations, f = noiseless_set
    bp64, bp32 = BackProjector(n), BackProjector(n)
    bp64.insert(f[:20], rotations[:20])
    bp32.insert(f[:20].astype(np.complex64), rotations[:20])
    assert bp32.data.dtype == np.complex128 and bp32.weight.dtype == np.float64
    np.testing.assert_allclose(
        bp32.data, bp64.data, atol=1e-5 * np.abs(bp64.data).max()
    )


def test_fsc_regularisation_is_a_wiener_filter(noiseless_set):
    n, vol, rotations, f = noiseless_set
    bp = BackProjector(n)
    bp.insert(f, rotations)
    plain = bp.reconstruct().astype(np.float64)
    shells = n // 2 + 1
    # FSC 0.999 (SSNR ~ 1000): almost no change
    near = bp.reconstruct(fsc=np.full(shells, 0.999)).astype(np.float64)
    assert np.linalg.norm(near - plain) < 0.01 * np.linalg.norm(plain)
    # FSC 0.5 (SSNR 1): coefficient w / (w + <w>_shell): about half the amplitude
    half = bp.reconstruct(fsc=np.full(shells, 0.5)).astype(np.float64)
    assert 0.35 < float((half * plain).sum() / (plain * plain).sum()) < 0.65
    # in Fourier space, per padded voxel: F_reg = F_plain * w / (w + <w>_s / SSNR_s)
    f_plain = bp.fourier_estimate()
    f_half = bp.fourier_estimate(fsc=np.full(shells, 0.5))
    c = bp.c
    k = np.arange(-c, c + 2)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(c + 2) ** 2)
    inside = r <= c
    shell = np.rint(r / bp.padding).astype(int)
    w = bp.weight.copy()
    w[: 2 * c + 1, : 2 * c + 1, 0] += w[: 2 * c + 1, : 2 * c + 1, 0][::-1, ::-1]
    checked = 0
    for sh in (3, 8, 12):
        sel = inside & (shell == sh)
        mean_w = w[sel].mean()
        well = sel & (w > 0.1 * mean_w) & (np.arange(c + 2) > 0)
        expected = f_plain[well] * w[well] / (w[well] + mean_w)
        np.testing.assert_allclose(f_half[well], expected, rtol=1e-9, atol=1e-12)
        checked += well.sum()
    assert checked > 1000
    # FSC ~0 beyond shell 6 (SSNR 0.001): those coefficients shrink ~1000-fold
    f_low = bp.fourier_estimate(fsc=np.where(np.arange(shells) <= 6, 0.999, 0.0))
    sel = inside & (shell >= 7) & (w > 0.1 * w[inside].mean())
    assert np.abs(f_low[sel]).sum() < 2e-3 * np.abs(f_plain[sel]).sum()
    assert (
        fsc_per_shell(
            bp.reconstruct(fsc=np.where(np.arange(shells) <= 6, 0.999, 0.0)), vol
        )[:6].min()
        > 0.99
    )


def test_wrong_image_shape_raises_value_error():
    bp = BackProjector(16)
    with pytest.raises(ValueError, match="shape"):
        bp.insert(np.zeros((2, 16, 16), np.complex64), np.tile(np.eye(3), (2, 1, 1)))
    with pytest.raises(ValueError, match="rotations"):
        bp.insert(np.zeros((2, 16, 9), np.complex64), np.eye(3)[None])


@pytest.mark.parametrize(
    ("n", "padding", "r_max_px"),
    [(16, 2, None), (17, 2, None), (16, 2, 5.0), (12, 1, None), (10, 3, 4.0)],
)
def test_real_space_equals_the_whole_padded_inverse_transform_cropped(
    n, padding, r_max_px, rng
):
    """The axis-by-axis pruned inverse (``_to_real_space``) against the plain
    recipe: the whole padded half-space in FFT order, ``irfftn``, the central
    ``N^3`` voxels, the gridding correction."""
    from localrefine_plugin.engine.backprojector import gridding_correction_1d
    from localrefine_plugin.engine.projector import axis_blocks, fft_order_index

    bp = BackProjector(n, padding=padding, r_max_px=r_max_px)
    f3 = rng.normal(size=bp.shape) + 1j * rng.normal(size=bp.shape)
    got = bp._to_real_space(f3)
    npad, c = padding * n, bp.c
    full = np.zeros((npad, npad, npad // 2 + 1), dtype=np.complex128)
    blocks = axis_blocks(c, npad, drop_alias=True)
    for fz, lz in blocks:
        for fy, ly in blocks:
            full[fz, fy, : c + 1] = f3[lz, ly, : c + 1]
    idx = fft_order_index(n, npad)
    want = np.fft.irfftn(full, s=(npad,) * 3)[np.ix_(idx, idx, idx)]
    g = gridding_correction_1d(n, padding)
    want /= g[:, None, None] * g[None, :, None] * g[None, None, :]
    assert got.shape == (n, n, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize(("n", "padding", "r_max_px"), [(17, 2, None), (16, 2, 5.0)])
def test_reconstruction_in_blocks_equals_the_whole_box_at_once(
    n, padding, r_max_px, rng, monkeypatch
):
    """``reconstruct`` makes the estimate block by block inside the transform
    (``projector.CHUNK_BYTES``): down to one row or plane per block it
    gives the two-step result (the whole estimate, then the whole transform)
    bit for bit, with an FSC, with the default floor and with a given one."""
    from localrefine_plugin.engine import projector as projector_module

    bp = BackProjector(n, padding=padding, r_max_px=r_max_px)
    bp.data[...] = rng.normal(size=bp.shape) + 1j * rng.normal(size=bp.shape)
    bp.weight[...] = rng.uniform(0.0, 2.0, bp.shape)
    bp.weight[rng.uniform(size=bp.shape) < 0.1] = 0.0  # nothing inserted there
    cases = [dict(fsc=np.linspace(1.0, 0.0, n // 2 + 1), tau2_fudge=1.5), {},
             dict(wiener_constant=0.3)]  # fmt: skip
    whole = [bp._to_real_space(bp.fourier_estimate(**kw)) for kw in cases]
    estimates = [bp.fourier_estimate(**kw) for kw in cases]
    monkeypatch.setattr(projector_module, "CHUNK_BYTES", 1)
    for kw, want, f3 in zip(cases, whole, estimates, strict=True):
        np.testing.assert_array_equal(bp.reconstruct(**kw), want)
        np.testing.assert_array_equal(bp._to_real_space(f3), want)
        np.testing.assert_allclose(bp.fourier_estimate(**kw), f3, rtol=1e-12, atol=0)
