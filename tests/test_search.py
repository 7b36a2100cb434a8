"""Local pose search (engine/search.py): fulcrum algebra, recovery, extents, pruning."""

from __future__ import annotations

import numpy as np
import pytest

from localrefine_plugin.engine import scoring
from localrefine_plugin.engine.ctf import CtfParams, ctf_2d
from localrefine_plugin.engine.fourier import (
    fourier_to_image,
    frequency_grid_2d,
    image_to_fourier,
)
from localrefine_plugin.engine.geometry import (
    euler_to_matrix,
    fulcrum_shift,
    geodesic_angle_deg,
)
from localrefine_plugin.engine.local_grid import (
    clip_to_extent,
    finest_grid,
    rotvec_to_matrix,
)
from localrefine_plugin.engine.noise import estimate_sigma2, inverse_sigma2_per_particle
from localrefine_plugin.engine.projector import FourierProjector, forward_model
from localrefine_plugin.engine.search import (
    candidate_poses,
    local_search,
    search_schedule,
)

from .conftest import blob_map

# ---------------------------------------------------------------- helpers


def _random_rotations(rng, m):
    rot, psi = rng.uniform(-180, 180, (2, m))
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, m)))
    return euler_to_matrix(rot, tilt, psi)


def _random_vectors(rng, m, dim, length):
    v = rng.normal(size=(m, dim))
    return v * (
        np.asarray(length, dtype=float).reshape(-1, 1)
        / np.linalg.norm(v, axis=1)[:, None]
    )


def _simulate(n, m, snr, rng):
    """Blob-map particles at known poses with CTF and white noise.

    SNR = variance of the clean image / variance of the noise (per pixel, box).
    """
    projector = FourierProjector(blob_map(n))
    rotations = _random_rotations(rng, m)
    origins = rng.uniform(-2, 2, (m, 2))
    du = rng.uniform(8000, 20000, m)
    ctf = ctf_2d(CtfParams(du, du * 0.95, 30.0), n, 2.0)
    clean = fourier_to_image(
        forward_model(projector, rotations, origins_px=origins, ctf=ctf), n
    )
    noise = rng.normal(0, clean.std() / np.sqrt(snr), clean.shape).astype(np.float32)
    inv_sigma2 = inverse_sigma2_per_particle(
        estimate_sigma2(image_to_fourier(noise)), None, m
    )
    return (
        projector,
        rotations,
        origins,
        ctf,
        image_to_fourier(clean + noise),
        inv_sigma2,
    )


def _perturb(rng, rotations, origins, fulcrum, angle_deg, shift_px):
    """Consensus poses ``angle_deg`` / ``shift_px`` away from the truth (about f).

    Inverts :func:`candidate_poses`: the truth is the candidate ``(v, t)`` of the
    returned consensus, with ``|v| = angle_deg`` and ``|t| = shift_px``.
    """
    m = rotations.shape[0]
    v = _random_vectors(rng, m, 3, angle_deg)
    t = _random_vectors(rng, m, 2, shift_px)
    cons = rotations @ np.swapaxes(rotvec_to_matrix(v), -1, -2)  # A = A_cons R(v)
    cons_origins = origins - t - fulcrum_shift(rotations, cons, fulcrum)
    return cons, cons_origins, v, t


def _shift_change(result, cons, cons_origins, fulcrum):
    """|t| of the returned standard poses (independent of the search's own value)."""
    t = (
        result.origins_px
        - cons_origins
        - fulcrum_shift(result.rotations, cons, fulcrum)
    )
    return np.linalg.norm(t, axis=1)


# ---------------------------------------------------------------- fulcrum algebra


def _blob_image_f(n, positions_xy, amplitudes, sigma_px):
    """Analytic transform (Fourier layout) of projected 3D Gaussian blobs.

    A 3D Gaussian ``a exp(-|x|^2 / 2 s^2)`` projects to a 2D Gaussian of
    integral ``a (2 pi)^(3/2) s^3``; a blob at image position ``x`` contributes
    ``exp(-2 pi^2 s^2 |k|^2 / N^2) exp(-2 pi i k.x / N)``.
    """
    kx, ky = frequency_grid_2d(n)
    env = (
        (2 * np.pi) ** 1.5
        * sigma_px**3
        * np.exp(-2 * np.pi**2 * sigma_px**2 * (kx**2 + ky**2) / n**2)
    )
    phase = np.exp(
        -2j
        * np.pi
        / n
        * (positions_xy[:, 0, None, None] * kx + positions_xy[:, 1, None, None] * ky)
    )
    return env * np.tensordot(amplitudes, phase, axes=1)


def _blob_volume(n, centres, amplitudes, sigma_px):
    c = n // 2
    z, y, x = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    vol = np.zeros((n, n, n))
    for (px, py, pz), a in zip(centres, amplitudes, strict=True):
        vol += a * np.exp(
            -((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * sigma_px**2)
        )
    return vol.astype(np.float32)


def test_rotation_about_the_fulcrum_equals_the_standard_pose_exactly(rng):
    n, sigma = 48, 1.5
    centres = rng.uniform(-10, 10, (12, 3))
    amps = rng.uniform(0.5, 1.5, 12)
    fulcrum = np.array([6.0, -4.0, 3.0])
    cons = _random_rotations(rng, 5)
    cons_origins = rng.uniform(-3, 3, (5, 2))
    v = rng.normal(size=(5, 4, 3)) * 4  # degrees
    t = rng.normal(size=(5, 3, 2))  # pixels
    rot, origins = candidate_poses(cons, cons_origins, fulcrum, v, t)
    for i in range(5):
        for j in range(4):
            r = rotvec_to_matrix(v[i, j])
            # region picture: the map turned by R about f, seen at the consensus
            # pose with the origin moved by t (content at (A p)_xy - origin)
            moved = fulcrum + (centres - fulcrum) @ r.T
            for s in range(3):
                region_xy = (moved @ cons[i].T)[:, :2] - (cons_origins[i] + t[i, s])
                standard_xy = (centres @ rot[i, j].T)[:, :2] - origins[i, j, s]
                np.testing.assert_allclose(standard_xy, region_xy, atol=1e-12)
                np.testing.assert_allclose(
                    _blob_image_f(n, standard_xy, amps, sigma),
                    _blob_image_f(n, region_xy, amps, sigma),
                    rtol=0,
                    atol=1e-10 * amps.sum() * (2 * np.pi) ** 1.5 * sigma**3,
                )
    # with t = 0 the fulcrum stays where the consensus pose put it
    f_std = np.einsum("mjab,b->mja", rot, fulcrum)[..., :2]  # (m, J, 2)
    np.testing.assert_allclose(
        f_std - origins[:, :, 0] + t[:, None, 0],
        np.broadcast_to(((cons @ fulcrum)[:, :2] - cons_origins)[:, None], f_std.shape),
        atol=1e-12,
    )


def test_projector_image_of_standard_pose_matches_analytic_rotation_about_fulcrum(rng):
    n, sigma = 48, 1.5
    centres = rng.uniform(-10, 10, (12, 3))
    amps = rng.uniform(0.5, 1.5, 12)
    projector = FourierProjector(_blob_volume(n, centres, amps, sigma))
    fulcrum = np.array([6.0, -4.0, 3.0])
    cons = _random_rotations(rng, 3)
    cons_origins = rng.uniform(-3, 3, (3, 2))
    v = rng.normal(size=(3, 1, 3)) * 6
    t = rng.normal(size=(3, 1, 2))
    rot, origins = candidate_poses(cons, cons_origins, fulcrum, v, t)
    images = forward_model(projector, rot[:, 0], origins_px=origins[:, 0, 0])
    for i in range(3):
        moved = fulcrum + (centres - fulcrum) @ rotvec_to_matrix(v[i, 0]).T
        xy = (moved @ cons[i].T)[:, :2] - (cons_origins[i] + t[i, 0])
        expected = fourier_to_image(_blob_image_f(n, xy, amps, sigma), n)
        got = fourier_to_image(images[i], n)
        assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.999


# ---------------------------------------------------------------- search


def test_schedule_halves_cells_and_doubles_radius():
    st = search_schedule(
        rotation_extent_deg=10,
        shift_extent_px=3,
        alignment_resolution_deg=0.5,
        shift_resolution_px=0.125,
        r_max_px=48,
        min_radius_px=6,
    )
    assert [s.rotation_step_deg for s in st] == [4.0, 2.0, 1.0, 0.5]
    assert [s.shift_step_px for s in st] == [1.0, 0.5, 0.25, 0.125]
    assert [s.radius_px for s in st] == [6.0, 12.0, 24.0, 48.0]


def test_exact_consensus_poses_do_not_drift(rng):
    n, m = 64, 6
    projector, rot, orig, ctf, images_f, inv_sigma2 = _simulate(n, m, 1.0, rng)
    res = local_search(
        projector,
        images_f,
        ctf,
        inv_sigma2,
        consensus_rotations=rot,
        consensus_origins_px=orig,
        fulcrum_px=np.array([4.0, -2.0, 1.0]),
        r_max_px=n // 2,
    )
    angle = geodesic_angle_deg(res.rotations, rot)
    shift = np.linalg.norm(res.origins_px - orig, axis=1)
    # the consensus pose is a leaf of the search tree (centred grid): the pose
    # found scores at least as well as it, and is the consensus itself unless the
    # noise favours a neighbouring leaf (0.5 deg); before the centring no leaf
    # was nearer than 0.43 deg
    at_consensus = scoring.score_poses(
        projector, images_f, ctf, inv_sigma2, rot[:, None], orig[:, None],
        r_max_px=n // 2,
    )[:, 0, 0]  # fmt: skip
    assert np.all(res.scores <= at_consensus + 1e-9), res.scores - at_consensus
    assert angle.max() <= 0.5 + 1e-6, angle
    assert shift.max() <= 0.25, shift
    assert np.sum(angle < 1e-6) >= m // 2, angle
    assert np.all(res.n_evaluated > 1000)


def test_perturbed_consensus_poses_are_recovered(rng):
    n, m = 64, 8
    projector, rot, orig, ctf, images_f, inv_sigma2 = _simulate(n, m, 1.0, rng)
    fulcrum = np.array([3.0, 2.0, -2.0])
    cons, cons_orig, _, _ = _perturb(rng, rot, orig, fulcrum, 4.0, 1.5)
    assert np.allclose(geodesic_angle_deg(cons, rot), 4.0)
    res = local_search(
        projector,
        images_f,
        ctf,
        inv_sigma2,
        consensus_rotations=cons,
        consensus_origins_px=cons_orig,
        fulcrum_px=fulcrum,
        r_max_px=n // 2,
    )
    angle = geodesic_angle_deg(res.rotations, rot)
    shift = np.linalg.norm(res.origins_px - orig, axis=1)
    assert angle.max() <= 1.0, angle
    assert shift.max() <= 0.5, shift
    # the rotation change found is the perturbation
    np.testing.assert_allclose(res.rotation_change_deg, 4.0, atol=1.0)
    # the score reported is the score of the pose returned
    again = scoring.score_poses(
        projector,
        images_f,
        ctf,
        inv_sigma2,
        res.rotations[:, None],
        res.origins_px[:, None],
        r_max_px=n // 2,
    )[:, 0, 0]
    np.testing.assert_allclose(res.scores, again, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize(
    "n", [pytest.param(48, id="even48"), pytest.param(49, id="odd49")]
)
def test_search_never_leaves_its_extents(n, rng):
    m = 6
    projector, rot, orig, ctf, images_f, inv_sigma2 = _simulate(n, m, 2.0, rng)
    fulcrum = np.array([5.0, 0.0, -3.0])
    # the truth is 8 deg and 3 px away; the extents are 3 deg and 1 px
    cons, cons_orig, _, _ = _perturb(rng, rot, orig, fulcrum, 8.0, 3.0)
    res = local_search(
        projector,
        images_f,
        ctf,
        inv_sigma2,
        consensus_rotations=cons,
        consensus_origins_px=cons_orig,
        fulcrum_px=fulcrum,
        rotation_extent_deg=3.0,
        shift_extent_px=1.0,
        r_max_px=n // 2,
        top_k=5,
    )
    angle = geodesic_angle_deg(res.rotations, cons)
    assert np.all(angle <= 3.0 + 1e-9), angle
    assert np.all(_shift_change(res, cons, cons_orig, fulcrum) <= 1.0 + 1e-9)
    np.testing.assert_allclose(res.rotation_change_deg, angle, atol=1e-9)
    # pushed towards the truth: it ends near the boundary
    assert np.all(angle > 2.0), angle
    for k in range(5):
        assert np.all(geodesic_angle_deg(res.top_rotations[:, k], cons) <= 3.0 + 1e-9)


def _exhaustive(
    projector,
    images_f,
    ctf,
    inv_sigma2,
    cons,
    cons_orig,
    fulcrum,
    *,
    ext_r,
    ext_s,
    r_max,
):
    """Best score of every particle over the whole finest grid (no pruning)."""
    st = search_schedule(
        rotation_extent_deg=ext_r,
        shift_extent_px=ext_s,
        alignment_resolution_deg=0.5,
        shift_resolution_px=0.125,
        r_max_px=r_max,
    )
    rv = clip_to_extent(
        finest_grid(ext_r, st[0].rotation_step_deg, len(st) - 1, dim=3, centred=True),
        ext_r,
    )
    tv = clip_to_extent(
        finest_grid(ext_s, st[0].shift_step_px, len(st) - 1, dim=2, centred=True),
        ext_s,
    )
    best = np.empty(images_f.shape[0])
    for i in range(images_f.shape[0]):
        rot, orig = candidate_poses(
            cons[i : i + 1], cons_orig[i : i + 1], fulcrum, rv[None], tv[None]
        )
        rs = orig[:, :, 0] - tv[0] - cons_orig[i]
        best[i] = min(
            scoring.score_poses(
                projector,
                images_f[i : i + 1],
                ctf[i : i + 1],
                inv_sigma2[i : i + 1],
                rot[:, a : a + 400],
                cons_orig[i : i + 1, None] + tv[None],
                r_max_px=r_max,
                rotation_shifts_px=rs[:, a : a + 400],
            ).min()
            for a in range(0, rv.shape[0], 400)
        )
    return best, rv.shape[0] * tv.shape[0]


@pytest.mark.slow
def test_branch_and_bound_finds_the_exhaustive_best_with_far_fewer_poses(rng):
    n, m = 48, 10
    projector, rot, orig, ctf, images_f, inv_sigma2 = _simulate(n, m, 0.3, rng)
    fulcrum = np.array([2.0, -3.0, 1.0])
    cons, cons_orig, _, _ = _perturb(
        rng, rot, orig, fulcrum, rng.uniform(0, 3, m), rng.uniform(0, 1, m)
    )
    kw = dict(ext_r=3.0, ext_s=1.0, r_max=n // 2)
    res = local_search(
        projector,
        images_f,
        ctf,
        inv_sigma2,
        consensus_rotations=cons,
        consensus_origins_px=cons_orig,
        fulcrum_px=fulcrum,
        rotation_extent_deg=kw["ext_r"],
        shift_extent_px=kw["ext_s"],
        r_max_px=kw["r_max"],
    )
    best, n_full = _exhaustive(
        projector, images_f, ctf, inv_sigma2, cons, cons_orig, fulcrum, **kw
    )
    same = np.isclose(res.scores, best, rtol=0, atol=1e-6 * np.abs(best).max())
    assert np.all(
        res.scores >= best - 1e-6 * np.abs(best).max()
    )  # never below the grid's best
    ratio = n_full / res.n_evaluated.mean()
    print(
        f"B&B = exhaustive for {same.sum()}/{m}; "
        f"poses {res.n_evaluated.mean():.0f} vs {n_full} ({ratio:.0f}x)"
    )
    assert same.sum() >= m - 1
    assert ratio >= 20


def test_top_k_weights_and_priors(rng):
    n, m = 48, 3
    projector, rot, orig, ctf, images_f, inv_sigma2 = _simulate(n, m, 0.5, rng)
    fulcrum = np.zeros(3)
    cons, cons_orig, _, _ = _perturb(rng, rot, orig, fulcrum, 2.0, 0.8)
    common = dict(
        consensus_rotations=cons,
        consensus_origins_px=cons_orig,
        fulcrum_px=fulcrum,
        rotation_extent_deg=4.0,
        shift_extent_px=1.5,
        r_max_px=n // 2,
    )
    res = local_search(projector, images_f, ctf, inv_sigma2, top_k=6, **common)
    assert res.top_rotations.shape == (m, 6, 3, 3) and res.top_weights.shape == (m, 6)
    np.testing.assert_allclose(res.top_weights.sum(axis=1), 1.0)
    assert np.all(np.diff(res.top_scores, axis=1) >= 0)
    np.testing.assert_allclose(res.top_scores[:, 0], res.scores)
    np.testing.assert_allclose(
        res.top_weights / res.top_weights[:, :1],
        np.exp(-(res.top_scores - res.scores[:, None])),
    )
    # strong priors hold the poses at the consensus and are added to the score
    tight = local_search(
        projector,
        images_f,
        ctf,
        inv_sigma2,
        prior_sigma_rotation_deg=0.05,
        prior_sigma_shift_px=0.01,
        **common,
    )
    assert np.all(geodesic_angle_deg(tight.rotations, cons) < 0.5)
    plain = scoring.score_poses(
        projector,
        images_f,
        ctf,
        inv_sigma2,
        tight.rotations[:, None],
        tight.origins_px[:, None],
        r_max_px=n // 2,
    )[:, 0, 0]
    prior = (
        0.5 * (tight.rotation_change_deg / 0.05) ** 2
        + 0.5 * (tight.shift_change_px / 0.01) ** 2
    )
    np.testing.assert_allclose(tight.scores, plain + prior, rtol=1e-6)


def test_injected_score_function_is_used(rng):
    n, m = 32, 2
    projector, rot, orig, ctf, images_f, inv_sigma2 = _simulate(n, m, 1.0, rng)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["r_max_px"])
        return scoring.score_poses(*args, **kwargs)

    common = dict(
        consensus_rotations=rot,
        consensus_origins_px=orig,
        fulcrum_px=np.zeros(3),
        rotation_extent_deg=3.0,
        shift_extent_px=1.0,
        r_max_px=n // 2,
    )
    a = local_search(projector, images_f, ctf, inv_sigma2, score_fn=spy, **common)
    b = local_search(projector, images_f, ctf, inv_sigma2, **common)
    assert calls and max(calls) == n // 2 and min(calls) < n // 2
    np.testing.assert_array_equal(a.rotations, b.rotations)


def test_bad_arguments_raise_value_error(rng):
    projector, rot, orig, ctf, images_f, inv_sigma2 = _simulate(16, 1, 1.0, rng)
    common = dict(
        consensus_rotations=rot, consensus_origins_px=orig, fulcrum_px=np.zeros(3)
    )
    with pytest.raises(ValueError, match="r_max_px"):
        local_search(projector, images_f, ctf, inv_sigma2, r_max_px=20, **common)
    with pytest.raises(ValueError, match="extents"):
        local_search(
            projector,
            images_f,
            ctf,
            inv_sigma2,
            r_max_px=8,
            rotation_extent_deg=-1,
            **common,
        )
    with pytest.raises(ValueError, match="bound"):
        local_search(
            projector, images_f, ctf, inv_sigma2, r_max_px=8, bound="x", **common
        )


def test_cauchy_schwarz_bound_prunes_less_and_finds_at_least_as_good(rng):
    n, m = 32, 4
    projector, rot, orig, ctf, images_f, inv_sigma2 = _simulate(n, m, 0.3, rng)
    fulcrum = np.zeros(3)
    cons, cons_orig, _, _ = _perturb(rng, rot, orig, fulcrum, 1.5, 0.5)
    common = dict(
        consensus_rotations=cons,
        consensus_origins_px=cons_orig,
        fulcrum_px=fulcrum,
        rotation_extent_deg=3.0,
        shift_extent_px=1.0,
        r_max_px=n // 2,
    )
    gauss = local_search(projector, images_f, ctf, inv_sigma2, **common)
    rigorous = local_search(
        projector, images_f, ctf, inv_sigma2, bound="cauchy_schwarz", **common
    )
    # both bounds rank cells alike (the high-band term is one number per
    # particle); Cauchy-Schwarz is the looser, so it keeps more cells
    assert np.all(rigorous.n_evaluated >= gauss.n_evaluated)
    assert np.all(rigorous.scores <= gauss.scores + 1e-9 * np.abs(gauss.scores).max())


def _six_particles_about_a_fulcrum(rng):
    """Six particles (box 40) 2 deg / 0.5 px from their consensus poses about a
    fulcrum off the centre: ``(projector, images_f, ctf, inv_sigma2, true
    rotations, local_search keywords)``."""
    n, m = 40, 6
    projector, rot, orig, ctf, images_f, inv_sigma2 = _simulate(n, m, 0.5, rng)
    fulcrum = np.array([2.0, 1.0, -1.0])
    cons, cons_orig, _, _ = _perturb(rng, rot, orig, fulcrum, 2.0, 0.5)
    kw = dict(
        consensus_rotations=cons,
        consensus_origins_px=cons_orig,
        fulcrum_px=fulcrum,
        rotation_extent_deg=4.0,
        shift_extent_px=1.0,
        alignment_resolution_deg=1.0,
        r_max_px=12.0,
    )
    return projector, images_f, ctf, inv_sigma2, rot, kw


def test_threads_give_the_same_result(rng):
    projector, images_f, ctf, inv_sigma2, rot, kw = _six_particles_about_a_fulcrum(rng)
    kw["batch_size"] = 2
    one = local_search(projector, images_f, ctf, inv_sigma2, **kw)
    two = local_search(projector, images_f, ctf, inv_sigma2, threads=2, **kw)
    np.testing.assert_array_equal(one.rotations, two.rotations)
    np.testing.assert_array_equal(one.origins_px, two.origins_px)
    np.testing.assert_array_equal(one.scores, two.scores)
    np.testing.assert_array_equal(one.n_evaluated, two.n_evaluated)
    assert np.median(geodesic_angle_deg(one.rotations, rot)) < 1.5


def test_the_poses_do_not_depend_on_how_many_particles_are_searched_together(rng):
    """The GPU searches a whole read batch at once, the CPU 8 particles at a
    time (``search_ops.search_batch_size``): each particle's cells, bounds and
    caps are its own, so batches of 1, 4 and all 6 give the same poses."""
    projector, images_f, ctf, inv_sigma2, _, kw = _six_particles_about_a_fulcrum(rng)
    kw["top_k"] = 2
    runs = [
        local_search(projector, images_f, ctf, inv_sigma2, batch_size=b, **kw)
        for b in (1, 4, 6)
    ]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.rotations, runs[0].rotations)
        np.testing.assert_array_equal(other.origins_px, runs[0].origins_px)
        np.testing.assert_allclose(other.scores, runs[0].scores, rtol=1e-12)
        np.testing.assert_array_equal(other.n_evaluated, runs[0].n_evaluated)
        np.testing.assert_allclose(other.top_weights, runs[0].top_weights, rtol=1e-9)


def test_search_batch_size_is_the_read_batch_on_the_gpu_only():
    from localrefine_plugin.engine.search_ops import CPU_SEARCH_BATCH, search_batch_size

    class DeviceScore:  # a score_fn that binds batches, as the GPU's does
        def bind_batch(self, *args, **kw):
            raise AssertionError("not called")

    assert search_batch_size(DeviceScore(), 128) == 128
    assert search_batch_size(DeviceScore(), 0) == 1
    assert search_batch_size(lambda *a, **k: None, 128) == CPU_SEARCH_BATCH
