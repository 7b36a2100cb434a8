"""GPU kernels against the NumPy engine (needs PyCUDA and an NVIDIA GPU).

Skipped, with the reason, where PyCUDA or a GPU is missing; with
``LOCALREFINE_REQUIRE=gpu`` (``benchmarks/gpu_check.sh`` sets it) a missing GPU
fails instead, so a GPU run never passes by skipping.

Agreement demanded: projections and scores to 1e-4 relative (of the largest
magnitude), the same best poses, reconstructions with FSC >= 0.999 against the
CPU's at every shell, and a small local refinement reaching the CPU's
resolution.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from localrefine_plugin.engine.backprojector import BackProjector
from localrefine_plugin.engine.ctf import CtfBatch, CtfParams, ctf_2d
from localrefine_plugin.engine.fourier import image_to_fourier
from localrefine_plugin.engine.fsc import fsc_curve
from localrefine_plugin.engine.geometry import (
    axis_angle_to_matrix,
    euler_to_matrix,
    geodesic_angle_deg,
)
from localrefine_plugin.engine.projector import FourierProjector, forward_model
from localrefine_plugin.engine.scoring import score_poses
from localrefine_plugin.engine.search import local_search

from .conftest import blob_map

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore:The CUDA compiler succeeded:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pycuda.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pytools.*"),
]


@pytest.fixture(scope="module")
def gpu():
    """The GPU's name; skips (or fails under LOCALREFINE_REQUIRE=gpu) without one."""
    from localrefine_plugin.kernels.backend import cuda_available, ensure_context

    ok, reason = cuda_available()
    if not ok:
        if "gpu" in os.environ.get("LOCALREFINE_REQUIRE", "").split(","):
            pytest.fail(f"GPU required but unavailable: {reason}")
        pytest.skip(f"GPU path unavailable: {reason}")
    ensure_context()
    return reason


def _random_rotations(rng, m):
    return euler_to_matrix(*rng.uniform(-180, 180, (3, m)))


@pytest.mark.parametrize("n", [64, 65])
@pytest.mark.parametrize("r_max", [None, 20.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_projections_match_the_cpu(gpu, rng, n, r_max, dtype):
    from localrefine_plugin.kernels.cuda_projector import CudaProjector, project

    proj = FourierProjector(blob_map(n, seed=2).astype(dtype))
    rots = _random_rotations(rng, 40)
    cpu = proj.project(rots, r_max_px=r_max)
    gpu_out = project(proj, rots, r_max_px=r_max, device="cuda")
    assert gpu_out.shape == cpu.shape and gpu_out.dtype == cpu.dtype
    assert np.abs(gpu_out - cpu).max() <= 1e-4 * np.abs(cpu).max()
    # the drop-in object gives the same, single matrix keeps the shape
    twin = CudaProjector(proj)
    single = twin.project(rots[0], r_max_px=r_max)
    assert single.shape == cpu.shape[1:]
    assert np.abs(single - cpu[0]).max() <= 1e-4 * np.abs(cpu).max()


def _particles(rng, n, m, *, snr=1.0, ctf_params=False):
    """Noisy CTF-modulated projections; ``ctf_params``: the CTFs as a `CtfBatch`."""
    proj = FourierProjector(blob_map(n, seed=5))
    a_true = _random_rotations(rng, m)
    o_true = rng.uniform(-2, 2, (m, 2))
    d = rng.uniform(8000, 20000, m)
    params = CtfParams(d, 0.97 * d, rng.uniform(0, 180, m))
    ctf = ctf_2d(params, n, 2.0)
    clean = forward_model(proj, a_true, origins_px=o_true, ctf=ctf)
    sd = np.sqrt(np.mean(np.abs(clean) ** 2) / (n * n) / snr)
    x = clean + image_to_fourier(rng.normal(0, sd, (m, n, n)).astype(np.float32))
    inv_s2 = np.full((m, n // 2 + 1), 1.0 / (sd * sd * n * n))
    if ctf_params:
        ctf = CtfBatch(params, n, 2.0, m)
    return proj, x.astype(np.complex64), ctf, inv_s2, a_true, o_true


@pytest.mark.parametrize("n", [64, 65])
@pytest.mark.parametrize(
    ("with_rotation_shifts", "n_shift"),
    [(False, 37), (True, 37), (True, 20), (False, 70)],
)
def test_scores_match_the_cpu(gpu, rng, n, with_rotation_shifts, n_shift):
    from localrefine_plugin.kernels.cuda_scoring import score_poses as gpu_score

    m, n_rot = 5, 70  # crosses the 32-wide tiles; 20 shifts: 32-wide kernel, else 64
    proj, x, ctf, inv_s2, a_true, o_true = _particles(rng, n, m)
    axes = rng.normal(size=(m, n_rot, 3))
    delta = axis_angle_to_matrix(axes, rng.uniform(0, 6, (m, n_rot)))
    rots = np.einsum("mij,mnjk->mnik", a_true, delta)
    rots[:, 0] = a_true
    shifts = o_true[:, None, :] + rng.uniform(-2, 2, (m, n_shift, 2))
    shifts[:, 0] = o_true
    rs = rng.uniform(-1, 1, (m, n_rot, 2)) if with_rotation_shifts else None
    kw = dict(r_max_px=n // 2 - 2, rotation_shifts_px=rs)
    cpu = score_poses(proj, x, ctf, inv_s2, rots, shifts, **kw)
    got = gpu_score(proj, x, ctf, inv_s2, rots, shifts, device="cuda", **kw)
    assert got.shape == cpu.shape == (m, n_rot, n_shift)
    assert np.abs(got - cpu).max() <= 1e-4 * np.abs(cpu).max()
    # same best pose for every particle
    best_cpu = cpu.reshape(m, -1).argmin(1)
    best_gpu = got.reshape(m, -1).argmin(1)
    np.testing.assert_array_equal(best_gpu, best_cpu)


@pytest.mark.parametrize(
    "setting",
    ["score_fn", "score_and_power_priors_top3", "cells_priors_top3",
     "rlanes_priors_top3", "widerl_priors_top3", "nopool_priors_top3",
     "ctfparams_priors_top3"],
)  # fmt: skip
def test_local_search_with_the_gpu_score_fn_finds_the_cpu_poses(
    gpu, rng, setting, monkeypatch
):
    """The GPU score_fn (bound batches: grids scored and reduced on the device)
    alone, and with the GPU bound power, priors, a fulcrum and the top 3 poses
    (the scoring kernels reading the volume, or its cells; with rotation lanes,
    and wide tiles too; device arrays allocated without the memory pool; CTFs
    given as parameters, evaluated on the device and on the host)."""
    from localrefine_plugin.kernels import get_power_fn, get_score_fn
    from localrefine_plugin.kernels.backend import POOL_ENV
    from localrefine_plugin.kernels.cuda_scoring import LANES_ENV, SAMPLER_ENV, WIDE_ENV

    monkeypatch.setenv(
        SAMPLER_ENV, "cells" if setting.startswith("cells") else "volume"
    )
    rotation_lanes = setting.startswith(("rlanes", "widerl"))
    monkeypatch.setenv(LANES_ENV, "rotations" if rotation_lanes else "pixels")
    monkeypatch.setenv(WIDE_ENV, "1" if setting.startswith("widerl") else "0")
    monkeypatch.setenv(POOL_ENV, "0" if setting.startswith("nopool") else "1")

    n, m = 64, 24
    proj, x, ctf, inv_s2, a_true, o_true = _particles(
        rng, n, m, snr=0.5, ctf_params=setting.startswith("ctfparams")
    )
    axes = rng.normal(size=(m, 3))
    a_cons = np.einsum(
        "mij,mjk->mik", a_true, axis_angle_to_matrix(axes, np.full(m, 3.0))
    )
    o_cons = o_true + rng.uniform(-1, 1, (m, 2))
    kw = dict(
        consensus_rotations=a_cons, consensus_origins_px=o_cons,
        fulcrum_px=np.zeros(3), rotation_extent_deg=6.0, shift_extent_px=2.0,
        alignment_resolution_deg=0.5, r_max_px=24.0, batch_size=24,
    )  # fmt: skip
    gpu_fns = {"score_fn": get_score_fn()}
    if setting != "score_fn":
        kw.update(
            fulcrum_px=np.array([3.0, -2.0, 4.0]), prior_sigma_rotation_deg=3.0,
            prior_sigma_shift_px=1.5, top_k=3,
        )  # fmt: skip
        gpu_fns["power_fn"] = get_power_fn()
    cpu = local_search(proj, x, ctf, inv_s2, **kw)
    got = local_search(proj, x, ctf, inv_s2, **gpu_fns, **kw)
    same = (geodesic_angle_deg(cpu.rotations, got.rotations) < 1e-3) & (
        np.abs(cpu.origins_px - got.origins_px).max(-1) < 1e-3
    )
    print(f"same best pose for {same.sum()} of {m} particles")  # in the gpu_check log
    assert same.all(), f"best poses differ for particles {np.flatnonzero(~same)}"
    np.testing.assert_allclose(
        got.scores, cpu.scores, rtol=1e-4, atol=1e-4 * np.abs(cpu.scores).max()
    )


@pytest.mark.parametrize("accumulator", ["float32", "float32x4", "float64", "gather"])
@pytest.mark.parametrize("n", [64, 65])
def test_back_projection_matches_the_cpu(gpu, rng, n, accumulator):
    """Atomic insertion with each accumulator, and the gather scheme ("gather":
    one thread per voxel, float32), against the CPU's."""
    from localrefine_plugin.kernels.cuda_backprojector import CudaBackProjector, insert

    m = 400
    proj = FourierProjector(blob_map(n, seed=4))
    rots = _random_rotations(rng, m)
    d = rng.uniform(8000, 20000, m)
    ctf = ctf_2d(CtfParams(d, d, 0.0), n, 2.0)
    f = forward_model(proj, rots, ctf=ctf)
    weights = rng.uniform(0.5, 1.0, m)
    cpu = BackProjector(n)
    cpu.insert(f, rots, ctf=ctf, weights=weights)
    if accumulator == "gather":
        dev = CudaBackProjector(n, scheme="gather")
    else:
        dev = CudaBackProjector(n, accumulator=accumulator)
    insert(
        dev, f[:150], rots[:150], ctf=ctf[:150], weights=weights[:150], device="cuda"
    )
    dev.insert(f[150:], rots[150:], ctf=ctf[150:], weights=weights[150:])
    assert dev.n_inserted == m
    scale_d, scale_w = np.abs(cpu.data).max(), cpu.weight.max()
    assert np.abs(dev.data - cpu.data).max() <= 1e-4 * scale_d
    assert np.abs(dev.weight - cpu.weight).max() <= 1e-4 * scale_w
    fsc = fsc_curve(dev.reconstruct(), cpu.reconstruct())
    print(
        f"box {n} {accumulator}: min FSC GPU vs CPU reconstruction {fsc[1:].min():.6f}"
    )
    assert fsc[1:].min() >= 0.999


@pytest.mark.parametrize(
    ("k", "scheme", "ctf_at"),
    [(1, "atomic", "host"), (3, "atomic", "host"), (3, "gather", "host"),
     (3, "atomic", "device")],
)  # fmt: skip
def test_resident_insertion_matches_the_cpu(gpu, rng, k, scheme, ctf_at):
    """Insertion from the search's device copies (`CudaBatchOps.insert_at_poses`:
    images and CTFs uploaded once, or the CTFs evaluated on the device from
    their parameters, shifted on the GPU) equals the CPU's `insert_at_poses`
    (shifted on the host), K weighted poses per image."""
    from localrefine_plugin.engine.reconstruct import insert_at_poses
    from localrefine_plugin.kernels.cuda_backprojector import CudaBackProjector
    from localrefine_plugin.kernels.cuda_scoring import get_score_fn

    n, m = 64, 200
    proj = FourierProjector(blob_map(n, seed=5))
    d = rng.uniform(8000, 20000, m)
    params = CtfParams(d, 0.95 * d, rng.uniform(0, 180, m), bfactor_a2=20.0)
    ctf = ctf_2d(params, n, 2.0)
    f = forward_model(proj, _random_rotations(rng, m), ctf=ctf).astype(np.complex64)
    rots = _random_rotations(rng, m * k).reshape(m, k, 3, 3)
    origins = rng.uniform(-4, 4, (m, k, 2))
    weights = rng.dirichlet(np.ones(k), m) if k > 1 else None
    poses = (rots, origins, weights) if k > 1 else (rots[:, 0], origins[:, 0], None)
    cpu = BackProjector(n)
    insert_at_poses(cpu, f, *poses, ctf=ctf)
    bound_ctf = CtfBatch(params, n, 2.0, m) if ctf_at == "device" else ctf
    ops = get_score_fn().bind_batch(
        proj, f, bound_ctf, np.ones(n // 2 + 1), r_max_px=20.0
    )
    dev = CudaBackProjector(n, scheme=scheme)
    ops.insert_at_poses(dev, *poses)
    ops.close()
    assert dev.n_inserted == m * k
    assert np.abs(dev.data - cpu.data).max() <= 1e-4 * np.abs(cpu.data).max()
    assert np.abs(dev.weight - cpu.weight).max() <= 1e-4 * cpu.weight.max()
    fsc = fsc_curve(dev.reconstruct(), cpu.reconstruct())
    print(
        f"resident insertion ({scheme}, CTFs from the {ctf_at}), K = {k}: "
        f"min FSC GPU vs CPU {fsc[1:].min():.6f}"
    )
    assert fsc[1:].min() >= 0.999


@pytest.mark.parametrize("n", [64, 65, 256])
def test_ctfs_evaluated_on_the_gpu_match_the_cpu(gpu, rng, n):
    """Kernel `ctf_half_plane` against `ctf_2d` in float64: to 1e-6 for per-
    particle defoci, astigmatism, voltages, phase shifts, B-factors and scales
    (0.8 A/px, defoci to 4 um)."""
    from localrefine_plugin.kernels.cuda_ctf import ctf_on_device

    m = 9
    params = CtfParams(
        rng.uniform(5000, 40000, m), rng.uniform(5000, 40000, m),
        rng.uniform(-180, 180, m), voltage_kv=rng.choice([200.0, 300.0], m),
        phase_shift_deg=rng.uniform(0, 90, m), bfactor_a2=rng.uniform(0, 150, m),
        scale=rng.uniform(0.5, 1.0, m),
    )  # fmt: skip
    ctf_g, stride = ctf_on_device(CtfBatch(params, n, 0.8, m), m, n)
    got = ctf_g.get().reshape(m, n, n // 2 + 1)
    err = np.abs(got - ctf_2d(params, n, 0.8, dtype=np.float64)).max()
    print(f"box {n}: CTFs on the GPU vs the CPU's float64, max |difference| {err:.2e}")
    assert stride == n * (n // 2 + 1) and err <= 1e-6


def test_refine_device_switch_picks_the_gpu(gpu):
    from localrefine_plugin.engine.refine_device import select_backend

    backend = select_backend("cuda")
    assert backend.name == "cuda"
    assert select_backend("auto").name == "cuda"


@pytest.mark.slow
def test_local_refinement_on_the_gpu_reaches_the_cpu_resolution(gpu, tmp_path):
    from localrefine_plugin.engine.refine import RefineOptions, run_local_refinement

    from .test_refine import FAST, make_dataset

    data = make_dataset(
        tmp_path / "data", n=160, snr=1.0, perturb_deg=2.0, perturb_px=0.5
    )
    results = {}
    for device in ("cpu", "cuda"):
        results[device] = run_local_refinement(
            data["star"], data["reference"], data["mask"],
            output_dir=tmp_path / device, options=RefineOptions(**FAST), device=device,
        )  # fmt: skip
    cpu, cuda = results["cpu"].resolution_a, results["cuda"].resolution_a
    print(f"local refinement resolution: CPU {cpu:.2f} A, GPU {cuda:.2f} A")
    assert results["cuda"].summary.get("device", "cuda") == "cuda"
    assert cuda <= cpu * 1.02


def test_projection_power_matches_the_cpu(gpu, rng):
    from localrefine_plugin.engine.scoring import weighted_projection_power
    from localrefine_plugin.kernels.cuda_scoring import (
        weighted_projection_power as gpu_power,
    )

    proj, x, ctf, inv_s2, a_true, o_true = _particles(rng, 64, 12)
    cpu, k_cpu = weighted_projection_power(proj, ctf, inv_s2, a_true, r_max_px=28.0)
    got, k_got = gpu_power(proj, ctf, inv_s2, a_true, r_max_px=28.0, device="cuda")
    np.testing.assert_array_equal(k_got, k_cpu)
    assert np.abs(got - cpu).max() <= 1e-4 * np.abs(cpu).max()


def _stage_poses(rng, a_true, o_true, n_rot, n_shift):
    """A stage's candidates around each particle's true pose: ``n_rot``
    rotations within 6 deg, ``n_shift`` origins within 2 px, and a per-rotation
    origin (fulcrum term) in [-1, 1] px."""
    m = a_true.shape[0]
    delta = axis_angle_to_matrix(
        rng.normal(size=(m, n_rot, 3)), rng.uniform(0, 6, (m, n_rot))
    )
    rots = np.einsum("mij,mnjk->mnik", a_true, delta)
    shifts = o_true[:, None, :] + rng.uniform(-2, 2, (m, n_shift, 2))
    rs = rng.uniform(-1, 1, (m, n_rot, 2))
    return rots, shifts, rs


#: variants with the same arithmetic as another (cells: the same corners and
#: sums; occ4: the same kernel body with more blocks per SM; wide: the same
#: sums in the same order, other threads)
TWINS = {"s64_cells": "s64", "j64_s64_cells": "j64_s64", "s64_occ4": "s64",
         "s64_cells_occ4": "s64_cells", "s64_wide": "s64", "j64_s64_wide": "j64_s64",
         "j64_s64_cells_wide": "j64_s64_cells", "s32_wide": "s32"}  # fmt: skip
#: rotation lanes: the same products in the same order, the |P|^2 term summed
#: in another order (equal to rounding, not bit for bit)
NEAR_TWINS = {"s32_rl": "s32", "s64_rl": "s64", "j64_s64_rl": "j64_s64",
              "s64_cells_rl": "s64_cells", "s64_wide_rl": "s64_wide",
              "s32_wide_rl": "s32_wide"}  # fmt: skip


@pytest.mark.parametrize(
    "variant",
    [
        "s32",
        "s64",
        "j64_s64",
        "s64_cells",
        "j64_s64_cells",
        "s64_occ4",
        "s64_cells_occ4",
        "s64_wide",
        "j64_s64_wide",
        "j64_s64_cells_wide",
        "s32_wide",
        *NEAR_TWINS,
    ],
)
def test_every_scoring_kernel_variant_matches_the_cpu(gpu, rng, variant):
    """Scores of every variant to 1e-4 of the CPU's, and to 1e-6 of its twin
    of the same arithmetic (bit for bit on the emulator)."""
    from localrefine_plugin.kernels.cuda_scoring import _check, _ScoreLaunch

    m, n_rot, n_shift = 4, 130, 70  # crosses the 64-wide tiles in both directions
    proj, x, ctf, inv_s2, a_true, o_true = _particles(rng, 64, m)
    rots, shifts, rs = _stage_poses(rng, a_true, o_true, n_rot, n_shift)
    cpu = score_poses(
        proj, x, ctf, inv_s2, rots, shifts, r_max_px=30, rotation_shifts_px=rs
    )
    args = _check(x, ctf, inv_s2, rots, shifts, 30, rs)

    def scores(name):
        launch = _ScoreLaunch(proj, *args, 30.0, name)
        launch.phase_table()
        return launch.scores().get()

    got = scores(variant)
    assert np.abs(got - cpu).max() <= 1e-4 * np.abs(cpu).max()
    twin = TWINS.get(variant) or NEAR_TWINS.get(variant)
    if twin:
        twin = scores(twin)
        assert np.abs(got - twin).max() <= 1e-6 * np.abs(twin).max()


def test_grid_reductions_match_the_host(gpu, rng):
    """`grid_reduce.cu` on the GPU: the host's minima and first arg-minima
    (float64 sums in the host's order), inf padding, several chunks."""
    from localrefine_plugin.engine.search_ops import HostGrid
    from localrefine_plugin.kernels.backend import to_device
    from localrefine_plugin.kernels.cuda_search_ops import CudaGrid

    m, n_rot, n_shift = 40, 700, 45
    e = rng.normal(0, 1e4, (m, n_rot, n_shift)).astype(np.float32)
    e[1, 3, 4] = e[1, 2, 4] = e[1].min() - 1e5  # tied minima: the first wins
    add_r = rng.normal(0, 10, (m, n_rot))
    add_s = rng.normal(0, 10, (m, n_shift))
    add_r[:, 650:] = np.inf
    add_s[3, 40:] = np.inf
    add_r[1] = 0.0
    add_s[1] = 0.0
    chunks = [
        (0, 25, to_device(e[:25], np.float32)),
        (25, m, to_device(e[25:], np.float32)),
    ]
    grid, host = CudaGrid(chunks, m, n_rot, n_shift), HostGrid(e.astype(np.float64))
    for got, want in zip(grid.best(add_r, add_s), host.best(add_r, add_s), strict=True):
        np.testing.assert_array_equal(got, want)
    assert grid.best(add_r, add_s)[0][1] == 2
    for got, want in zip(
        grid.minima(add_r, add_s), host.minima(add_r, add_s), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_bound_batch_scores_and_power_match_the_cpu(gpu, rng):
    """`CudaScoreFn.bind_batch`: a stage radius (prefix of the radius-sorted
    pixels) and the full radius score as the engine; the bound's power and its
    weighted sums too; rotations about a fulcrum formed on the device."""
    from localrefine_plugin.engine.local_grid import rotations_about_fulcrum
    from localrefine_plugin.engine.scoring import weighted_projection_power
    from localrefine_plugin.kernels import get_score_fn

    m, n_rot, n_shift = 6, 150, 40
    proj, x, ctf, inv_s2, a_true, o_true = _particles(rng, 64, m)
    rots, shifts, rs = _stage_poses(rng, a_true, o_true, n_rot, n_shift)
    ops = get_score_fn().bind_batch(proj, x, ctf, inv_s2, r_max_px=30.0)
    zr, zs = np.zeros((m, n_rot)), np.zeros((m, n_shift))
    for radius in (12.0, 30.0):
        cpu = score_poses(
            proj, x, ctf, inv_s2, rots, shifts, r_max_px=radius, rotation_shifts_px=rs
        )
        grid = ops.score(rots, shifts, r_max_px=radius, rotation_shifts_px=rs)
        assert np.abs(grid.values(zr, zs) - cpu).max() <= 1e-4 * np.abs(cpu).max()
    want, k_want = weighted_projection_power(proj, ctf, inv_s2, a_true, r_max_px=30.0)
    got, k_got = ops.power(a_true, r_max_px=30.0)
    order = np.argsort(k_want, kind="stable")
    np.testing.assert_allclose(k_got, k_want[order])
    assert np.abs(got - want[:, order]).max() <= 1e-4 * np.abs(want).max()
    # the sums the search takes (power_sums), added on the device in double

    def weights(k):
        return np.stack([k > 12.0, np.where(k > 12.0, 0.0, 0.3 * k * k)])

    sums = ops.power_sums(a_true, weights, r_max_px=30.0)
    np.testing.assert_allclose(sums, want @ weights(k_want).T, rtol=1e-4)
    # rotations about a fulcrum formed on the device (score_local, kernel
    # candidate_rotations) score as the same rotations formed on the host
    v = rng.normal(0, 3, (m, n_rot, 3))
    v[:, 0] = 0.0
    f = np.array([4.0, -6.0, 3.0])
    rot_h, term_h = rotations_about_fulcrum(a_true, v, f)
    want = ops.score(rot_h, shifts, r_max_px=30.0, rotation_shifts_px=term_h)
    got = ops.score_local(a_true, v, shifts, fulcrum_px=f, r_max_px=30.0)
    np.testing.assert_allclose(got.values(zr, zs), want.values(zr, zs), rtol=1e-5)
