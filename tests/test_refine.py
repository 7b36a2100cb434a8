"""The local refinement driver on small blob-map datasets with known poses.

Truth is known by construction: images are projections of a blob map at
chosen poses (with CTF and Gaussian noise), so poses can be compared with it.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from localrefine_plugin.engine import mrc_io
from localrefine_plugin.engine import particles as particles_mod
from localrefine_plugin.engine.checkpoint import list_checkpoints
from localrefine_plugin.engine.ctf import CtfParams, ctf_2d
from localrefine_plugin.engine.errors import InputError
from localrefine_plugin.engine.fourier import fourier_to_image
from localrefine_plugin.engine.geometry import (
    axis_angle_to_matrix,
    euler_to_matrix,
    geodesic_angle_deg,
    matrix_to_euler,
)
from localrefine_plugin.engine.masks import create_soft_mask
from localrefine_plugin.engine.projector import FourierProjector, forward_model
from localrefine_plugin.engine.refine import RefineOptions, run_local_refinement
from localrefine_plugin.engine.star import read_star

from .conftest import blob_map

BOX = 48
PIXEL_A = 3.0


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform rotations on SO(3) (normalised Gaussian quaternions) as RELION matrices."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    r = np.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        axis=1,
    ).reshape(n, 3, 3)
    return r


def make_dataset(
    folder,
    *,
    n: int = 200,
    snr: float = 0.5,
    perturb_deg: float = 0.0,
    perturb_px: float = 0.0,
    seed: int = 1,
    with_subsets: bool = True,
):
    """Write a blob-map dataset; return paths and the true/consensus poses.

    Images are ``CTF * shift(projection(A_true), origin_true)`` plus white noise of
    variance ``var(clean) / snr``. The consensus poses written to the STAR file
    are the true ones rotated by ``perturb_deg`` about a random axis and shifted
    by ``perturb_px`` in a random direction.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vol = blob_map(BOX, seed=seed)
    mrc_io.write_map(folder / "reference.mrc", vol, PIXEL_A)
    mask = create_soft_mask(
        vol, PIXEL_A, threshold=0.1 * vol.max(), extend_a=3.0, soft_edge_a=9.0
    )
    mrc_io.write_map(folder / "mask.mrc", mask, PIXEL_A)
    true_rot = random_rotations(rng, n)
    true_org = rng.uniform(-2.0, 2.0, size=(n, 2))
    defocus = rng.uniform(8000.0, 20000.0, n)
    ctf = CtfParams(
        defocus_u_a=defocus,
        defocus_v_a=defocus * 0.97,
        defocus_angle_deg=rng.uniform(0, 180, n),
    )
    ctf_arr = ctf_2d(ctf, BOX, PIXEL_A)
    clean = fourier_to_image(
        forward_model(
            FourierProjector(vol), true_rot, origins_px=true_org, ctf=ctf_arr
        ),
        BOX,
    )
    noise_sd = np.sqrt(clean.var() / snr)
    images = (clean + rng.normal(0, noise_sd, clean.shape)).astype(np.float32)
    mrc_io.write_stack(folder / "images.mrcs", images, PIXEL_A)
    # consensus = truth perturbed
    axes = rng.normal(size=(n, 3))
    cons_rot = true_rot
    if perturb_deg:
        delta = axis_angle_to_matrix(axes, np.full(n, perturb_deg))
        cons_rot = np.einsum("nij,njk->nik", true_rot, delta)
    phi = rng.uniform(0, 2 * np.pi, n)
    cons_org = true_org + perturb_px * np.stack([np.cos(phi), np.sin(phi)], axis=1)
    rot, tilt, psi = matrix_to_euler(cons_rot)
    subsets = np.arange(n) % 2 + 1
    parts = particles_mod.make_particles(
        image_refs=[(folder / "images.mrcs", i) for i in range(n)],
        rot_deg=rot,
        tilt_deg=tilt,
        psi_deg=psi,
        origin_px=cons_org,
        ctf=ctf,
        pixel_size_a=PIXEL_A,
        box=BOX,
        random_subset=subsets,
    )
    star = folder / "particles.star"
    particles_mod.write_particles(star, parts)
    doc = read_star(star)
    block = doc["particles"]
    block.set_column("rlnExtraTag", [f"tag{i}" for i in range(n)], fmt="{}")
    if not with_subsets:
        block.remove_column("rlnRandomSubset")
    from localrefine_plugin.engine.star import write_star

    write_star(star, doc)
    return {
        "star": star,
        "reference": folder / "reference.mrc",
        "mask": folder / "mask.mrc",
        "true_rot": true_rot,
        "true_org": true_org,
        "cons_rot": cons_rot,
        "cons_org": cons_org,
    }


def read_poses(star):
    parts = particles_mod.read_particles(star)
    return parts.matrices(), np.asarray(parts.origin_px)


FAST = dict(
    rotation_extent_deg=3.0,
    shift_extent_px=1.0,
    shift_resolution_px=0.5,
    alignment_resolution_deg=1.5,
    max_iterations=1,
    batch_size=64,
)


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    """One refinement from exact poses (shared by several tests)."""
    folder = tmp_path_factory.mktemp("exact")
    data = make_dataset(folder / "data", n=100, snr=1.0, with_subsets=True)
    result = run_local_refinement(
        data["star"],
        data["reference"],
        data["mask"],
        output_dir=folder / "out",
        options=RefineOptions(**FAST),
    )
    return data, result, folder / "out"


@pytest.fixture(scope="module")
def perturbed_runs(tmp_path_factory):
    """Consensus poses 4.5 deg / 0.8 px off the truth, extents 3 deg / 1 px.

    Run once uninterrupted and once stopped after iteration 1 then continued.
    """
    folder = tmp_path_factory.mktemp("perturbed")
    data = make_dataset(
        folder / "data", n=80, snr=2.0, perturb_deg=4.5, perturb_px=0.8, seed=7
    )
    options = RefineOptions(**{**FAST, "max_iterations": 2})
    args = (data["star"], data["reference"], data["mask"])
    full = run_local_refinement(*args, output_dir=folder / "full", options=options)
    stopped = run_local_refinement(
        *args, output_dir=folder / "resumed", options=options, stop_after_iteration=1
    )
    listing_after_stop = sorted(p.name for p in (folder / "resumed").iterdir())
    resumed = run_local_refinement(
        *args, output_dir=folder / "resumed", options=options, continue_run=True
    )
    return data, full, stopped, resumed, listing_after_stop, folder


@pytest.mark.slow
def test_exact_poses_do_not_drift(exact_run):
    data, result, out = exact_run
    rot, org = read_poses(out / "particles.star")
    err = geodesic_angle_deg(rot, data["true_rot"])
    shift_err = np.linalg.norm(org - data["true_org"], axis=1)
    # The finest grid holds the consensus pose. At this SNR (1.0, 100 particles,
    # ~11 A) a 1.5 deg step moves the blobs by ~1 A, far below the resolution, so
    # noise lets some particles jump one cell; drift would move most of them.
    assert np.median(err) < 0.1
    assert (err < 0.01).mean() >= 0.6 and err.mean() < 1.0
    assert (
        np.median(shift_err) < 0.05
        and shift_err.max() <= FAST["shift_extent_px"] + 1e-6
    )
    assert (
        result.summary["per_iteration"][-1]["median_rotation_from_consensus_deg"] < 0.1
    )
    assert all(
        h["fraction_at_rotation_extent"] < 0.1 for h in result.summary["per_iteration"]
    )
    assert "edge of the rotation extent" not in (out / "refine.log").read_text()


def test_poses_piling_at_the_extent_edge_are_warned_about(tmp_path, caplog):
    """Noise-dominated images: the best of many poses is mostly far from the
    consensus, at the edge of the extent; the log says so and how to fix it."""
    data = make_dataset(tmp_path / "data", n=40, snr=0.002, seed=5)
    with caplog.at_level(logging.WARNING):
        result = run_local_refinement(
            data["star"],
            data["reference"],
            data["mask"],
            output_dir=tmp_path / "out",
            options=RefineOptions(**FAST),
        )
    fractions = [
        h["fraction_at_rotation_extent"] for h in result.summary["per_iteration"]
    ]
    assert max(fractions) > 0.3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "edge of the rotation extent" in m and "--prior-sigma-rotation" in m
        for m in warned
    ), warned


@pytest.mark.slow
def test_outputs_are_complete_and_well_formed(exact_run):
    data, result, out = exact_run
    for name in (
        "particles.star",
        "map.mrc",
        "half_map_1.mrc",
        "half_map_2.mrc",
        "fsc.csv",
        "fsc.png",
        "summary.json",
        "refine.log",
    ):
        assert (out / name).is_file(), name
    # particles: same rows, same order, every input column kept, half sets unchanged
    before = read_star(data["star"])["particles"]
    after = read_star(out / "particles.star")["particles"]
    assert after.n_rows == before.n_rows
    assert set(before.columns) <= set(after.columns)
    for col in ("rlnImageName", "rlnExtraTag", "rlnRandomSubset", "rlnDefocusU"):
        assert after.column(col) == before.column(col), col
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"):
        assert after.has_column(col)
    # maps: float32, input box and pixel size
    for name in ("map.mrc", "half_map_1.mrc", "half_map_2.mrc"):
        vol, px = mrc_io.read_map(out / name)
        assert vol.shape == (BOX,) * 3 and vol.dtype == np.float32
        assert px == pytest.approx(PIXEL_A, rel=1e-4)
    # the map resembles the truth (it was made from exact poses)
    truth, _ = mrc_io.read_map(data["reference"])
    full, _ = mrc_io.read_map(out / "map.mrc")
    assert np.corrcoef(truth.ravel(), full.ravel())[0, 1] > 0.8
    # fsc.csv
    lines = (out / "fsc.csv").read_text().splitlines()
    assert lines[0] == "shell,resolution_A,fsc_unmasked,fsc_masked,fsc_corrected"
    assert len(lines) == 1 + BOX // 2 + 1
    # summary.json
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "resolution_A",
        "iterations",
        "n_particles",
        "wall_seconds",
        "poses_evaluated_per_particle",
        "per_iteration",
        "options",
    ):
        assert key in summary, key
    assert summary["n_particles"] == 100
    assert summary["iterations"] == len(summary["per_iteration"]) == 2
    assert summary["per_iteration"][-1]["final"] is True
    assert 2 * PIXEL_A <= summary["resolution_A"] < 30.0
    assert summary["resolution_A"] == pytest.approx(result.resolution_a)
    assert summary["options"]["rotation_extent_deg"] == FAST["rotation_extent_deg"]
    # the batch size used: the options' own (0 = automatic: 128 on the CPU)
    given = summary["options"]["batch_size"]
    assert summary["batch_size"] == (given or 128)
    for rec in summary["per_iteration"]:
        assert {
            "resolution_A",
            "median_rotation_change_deg",
            "median_shift_change_a",
        } <= set(rec)
        steps = [rec[f"seconds_{s}"] for s in ("alignment", "reconstruction", "noise")]
        assert min(steps) > 0 and sum(steps) == pytest.approx(rec["seconds"])
        # the passes' fixed parts (the references' transforms) lie within them
        assert 0 < rec["seconds_alignment_setup"] < rec["seconds_alignment"]
        assert 0 < rec["seconds_noise_setup"] < rec["seconds_noise"]
    assert summary["poses_evaluated_per_particle"] > 1


@pytest.mark.slow
def test_log_has_progress_lines_per_batch_and_iteration(exact_run):
    _, _, out = exact_run
    log_text = (out / "refine.log").read_text()
    # 100 particles, 50 per half, batch 64 -> 2 batches per iteration
    assert log_text.count("iteration 1: ") >= 2
    assert "100/100 particles (100%)" in log_text
    assert "particles/s" in log_text and "left" in log_text
    assert "iteration 1: resolution" in log_text and "median pose change" in log_text


@pytest.mark.slow
def test_continue_equals_uninterrupted(perturbed_runs):
    data, full, stopped, resumed, listing, folder = perturbed_runs
    assert not stopped.complete and stopped.iterations == 1
    # a stopped run leaves checkpoints and the log, never a complete-looking output
    assert "summary.json" not in listing and "map.mrc" not in listing
    assert "checkpoints" in listing
    assert resumed.iterations == full.iterations
    assert resumed.resolution_a == full.resolution_a
    a, b = folder / "full", folder / "resumed"
    # only the last two checkpoints are kept (they hold maps)
    assert [i for i, _ in list_checkpoints(a)] == [full.iterations - 1, full.iterations]
    assert read_star(a / "particles.star") == read_star(b / "particles.star")
    for name in ("map.mrc", "half_map_1.mrc", "half_map_2.mrc"):
        va, _ = mrc_io.read_map(a / name)
        vb, _ = mrc_io.read_map(b / name)
        np.testing.assert_array_equal(va, vb)
    assert (a / "fsc.csv").read_text() == (b / "fsc.csv").read_text()
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    for ra, rb in zip(sa["per_iteration"], sb["per_iteration"], strict=True):
        assert ra["resolution_A"] == rb["resolution_A"]
        assert ra["median_rotation_change_deg"] == rb["median_rotation_change_deg"]


@pytest.mark.slow
def test_search_never_leaves_its_extents_and_improves_poses(perturbed_runs):
    data, full, *_, folder = perturbed_runs
    rot, org = read_poses(folder / "full" / "particles.star")
    summary = json.loads((folder / "full" / "summary.json").read_text())
    f = np.array(summary["fulcrum_px"])
    change = geodesic_angle_deg(rot, data["cons_rot"])
    assert change.max() <= FAST["rotation_extent_deg"] + 1e-6
    # shift about the fulcrum: origin change minus the fulcrum term (RELION sign)
    t = (
        org
        - data["cons_org"]
        - np.einsum("nij,j->ni", rot - data["cons_rot"], f)[:, :2]
    )
    assert np.linalg.norm(t, axis=1).max() <= FAST["shift_extent_px"] + 1e-6
    # the truth is 4.5 deg away: the best reachable pose is at the extent
    before = np.median(geodesic_angle_deg(data["cons_rot"], data["true_rot"]))
    after = np.median(geodesic_angle_deg(rot, data["true_rot"]))
    assert after < before - 1.5


# -- validation: errors before any work -------------------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("small") / "data", n=20, snr=1.0)


def _no_work_done(out):
    assert not list_checkpoints(out)
    assert not (out / "summary.json").exists()


def test_particles_without_poses_raise_before_work(small_data, tmp_path):
    doc = read_star(small_data["star"])
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        doc["particles"].remove_column(col)
    from localrefine_plugin.engine.star import write_star

    star = small_data["star"].parent / "noposes.star"
    write_star(star, doc)
    with pytest.raises(InputError) as exc:
        run_local_refinement(
            star,
            small_data["reference"],
            small_data["mask"],
            output_dir=tmp_path / "out",
        )
    assert "noposes.star" in str(exc.value) and "rlnAngleRot" in str(exc.value)
    _no_work_done(tmp_path / "out")


def test_mask_box_mismatch_names_the_mask(small_data, tmp_path):
    bad = tmp_path / "mask40.mrc"
    mrc_io.write_map(bad, np.ones((40, 40, 40), np.float32) * 0.5, PIXEL_A)
    with pytest.raises(InputError) as exc:
        run_local_refinement(
            small_data["star"],
            small_data["reference"],
            bad,
            output_dir=tmp_path / "out",
        )
    assert "mask40.mrc" in str(exc.value) and "box" in str(exc.value)
    _no_work_done(tmp_path / "out")


def test_mask_pixel_size_mismatch_names_the_mask(small_data, tmp_path):
    mask, _ = mrc_io.read_map(small_data["mask"])
    bad = tmp_path / "mask_px.mrc"
    mrc_io.write_map(bad, mask, PIXEL_A * 1.1)
    with pytest.raises(InputError) as exc:
        run_local_refinement(
            small_data["star"],
            small_data["reference"],
            bad,
            output_dir=tmp_path / "out",
        )
    assert "mask_px.mrc" in str(exc.value) and "pixel size" in str(exc.value)


def test_empty_mask_and_mask_off_density_raise(small_data, tmp_path):
    empty = tmp_path / "empty.mrc"
    mrc_io.write_map(empty, np.zeros((BOX,) * 3, np.float32), PIXEL_A)
    with pytest.raises(InputError) as exc:
        run_local_refinement(
            small_data["star"],
            small_data["reference"],
            empty,
            output_dir=tmp_path / "out",
        )
    assert "empty.mrc" in str(exc.value)
    corner = np.zeros((BOX,) * 3, np.float32)
    corner[:6, :6, :6] = 1.0  # in the solvent corner, far from the blobs
    off = tmp_path / "corner.mrc"
    mrc_io.write_map(
        off, create_soft_mask(corner, PIXEL_A, threshold=0.5, soft_edge_a=6.0), PIXEL_A
    )
    with pytest.raises(InputError) as exc:
        run_local_refinement(
            small_data["star"],
            small_data["reference"],
            off,
            output_dir=tmp_path / "out2",
        )
    assert "corner.mrc" in str(exc.value)
    _no_work_done(tmp_path / "out2")


def test_reference_pixel_size_mismatch_names_the_particles(small_data, tmp_path):
    vol, _ = mrc_io.read_map(small_data["reference"])
    mask, _ = mrc_io.read_map(small_data["mask"])
    ref = tmp_path / "ref.mrc"
    msk = tmp_path / "mask.mrc"
    mrc_io.write_map(ref, vol, 2.0)
    mrc_io.write_map(msk, mask, 2.0)
    with pytest.raises(InputError) as exc:
        run_local_refinement(small_data["star"], ref, msk, output_dir=tmp_path / "out")
    assert "particles.star" in str(exc.value) and "pixel size" in str(exc.value)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("rotation_extent_deg", -1.0, "negative"),
        ("shift_extent_px", -0.5, "negative"),
        ("rotation_extent_deg", 0.2, "finer than the alignment resolution"),
        ("dynamic_mask_far_a", 2.0, "must exceed"),
        ("marginalize_top_k", 0, ">= 1"),
        ("noise_particles", -1, ">= 0"),
        ("batch_size", -1, ">= 0"),
    ],
)
def test_bad_options_name_the_field_before_work(
    small_data, tmp_path, field, value, words
):
    options = RefineOptions(**{field: value})
    with pytest.raises(InputError) as exc:
        run_local_refinement(
            small_data["star"],
            small_data["reference"],
            small_data["mask"],
            output_dir=tmp_path / "out",
            options=options,
        )
    assert field in str(exc.value) and words in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_automatic_batch_size_by_device_and_box():
    """`--batch-size 0`: 128 on the CPU; on the GPU the largest of 512, 256, 128
    whose complex64 transforms fit in 160 MB; a given size always wins."""
    auto = RefineOptions()
    assert auto.batch_size == 0
    assert (
        auto.batch_size_for(64, gpu=False) == auto.batch_size_for(512, gpu=False) == 128
    )
    sizes = {n: auto.batch_size_for(n, gpu=True) for n in (64, 256, 320, 384, 400, 512)}
    assert sizes == {64: 512, 256: 512, 320: 256, 384: 256, 400: 128, 512: 128}
    for n, b in sizes.items():  # the largest that fits
        assert b * 8 * n * (n // 2 + 1) <= 160e6 or b == 128
        assert b == 512 or 2 * b * 8 * n * (n // 2 + 1) > 160e6
    assert RefineOptions(batch_size=96).batch_size_for(256, gpu=True) == 96


def test_cuda_without_gpu_is_a_clear_error(small_data, tmp_path):
    with pytest.raises(InputError) as exc:
        run_local_refinement(
            small_data["star"],
            small_data["reference"],
            small_data["mask"],
            output_dir=tmp_path / "out",
            device="cuda",
        )
    assert "cuda" in str(exc.value) and "--device cpu" in str(exc.value)


def test_existing_run_without_continue_is_refused(small_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(InputError) as exc:
        run_local_refinement(
            small_data["star"],
            small_data["reference"],
            small_data["mask"],
            output_dir=out,
        )
    assert "--continue" in str(exc.value) and str(out) in str(exc.value)
    assert (out / "summary.json").read_text() == "{}"


# -- pieces of the driver (fast) --------------------------------------------------


def test_fulcrum_rotation_equals_rotation_plus_shift_about_the_box_centre():
    """A search candidate rotating about the mask centre f images the map rotated about f.

    Truth: the map moved in real space (p -> R (p - f) + f, cubic interpolation)
    and projected at the consensus pose. Candidate: the driver's search pose
    ``A_cons R`` with the origin from the fulcrum algebra, projecting the unmoved map.
    """
    from scipy import ndimage

    from localrefine_plugin.engine import search
    from localrefine_plugin.engine.local_grid import rotvec_to_matrix

    n = 48
    vol = blob_map(n, seed=3)
    f = np.array([6.0, -4.0, 3.0])
    a_cons = euler_to_matrix(30.0, 60.0, -20.0)[None]
    o_cons = np.array([[1.0, -0.5]])
    v = np.array([[[2.0, -3.0, 8.0]]])  # rotation vector, degrees
    rot, org = search.candidate_poses(a_cons, o_cons, f, v, np.zeros((1, 1, 2)))
    candidate = fourier_to_image(
        forward_model(FourierProjector(vol), rot[0], origins_px=org[0, :, 0]), n
    )[0]
    r = rotvec_to_matrix(v[0, 0])
    c = n // 2
    z, y, x = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    q = np.stack([x, y, z], -1).reshape(-1, 3).astype(np.float64)
    p = (q - f) @ r + f  # p = R^T (q - f) + f: the source of moved point q
    moved = ndimage.map_coordinates(
        vol.astype(np.float64), [p[:, 2] + c, p[:, 1] + c, p[:, 0] + c], order=3
    ).reshape(n, n, n)
    truth = fourier_to_image(
        forward_model(
            FourierProjector(moved.astype(np.float32)), a_cons, origins_px=o_cons
        ),
        n,
    )[0]
    assert np.corrcoef(candidate.ravel(), truth.ravel())[0, 1] > 0.999
    # the same rotation about the box centre (no fulcrum term) is clearly different
    plain = fourier_to_image(
        forward_model(FourierProjector(vol), rot[0], origins_px=o_cons), n
    )[0]
    assert np.corrcoef(plain.ravel(), truth.ravel())[0, 1] < 0.99


def test_dynamic_mask_never_exceeds_input_support_plus_far(rng):
    from scipy import ndimage

    from localrefine_plugin.engine.refine_steps import dynamic_mask

    vol = blob_map(BOX, seed=5)
    vol = vol + rng.normal(0, 0.02, vol.shape).astype(np.float32)
    c = BOX // 2
    z, y, x = np.meshgrid(*(np.arange(BOX) - c,) * 3, indexing="ij")
    sphere = ((x - 4) ** 2 + y**2 + z**2 <= 8**2).astype(np.float32)
    input_mask = create_soft_mask(sphere, PIXEL_A, threshold=0.5, soft_edge_a=6.0)
    far = 12.0
    m = dynamic_mask(
        vol, input_mask, PIXEL_A, threshold_fraction=0.2, near_a=3.0, far_a=far
    )
    assert (
        m.dtype == np.float32 and m.min() >= 0.0 and m.max() <= 1.0 and m.max() == 1.0
    )
    dist_a = ndimage.distance_transform_edt(input_mask <= 0) * PIXEL_A
    assert m[dist_a > far].max() == 0.0
    # it follows the density: voxels at the threshold inside the support are 1
    peak = vol[input_mask > 0].max()
    assert (m[(vol >= 0.2 * peak) & (input_mask > 0)] == 1.0).all()


def test_progress_line_counts_rate_and_time_left():
    from localrefine_plugin.engine.progress import Progress

    now = [0.0]
    p = Progress(200, "iteration 3", logging.getLogger("test"), clock=lambda: now[0])
    now[0] = 10.0
    line = p.update(50)
    assert line.startswith("iteration 3: 50/200 particles ( 25%)")
    assert "5.0 particles/s" in line and "30s left" in line


def test_checkpoint_round_trip_and_latest(tmp_path):
    from localrefine_plugin.engine.checkpoint import (
        Checkpoint,
        load_latest_checkpoint,
        save_checkpoint,
    )

    def ck(i):
        return Checkpoint(
            iteration=i,
            rotations=np.eye(3)[None].repeat(4, 0) * i,
            origins_px=np.full((4, 2), float(i)),
            half_maps=np.zeros((2, 4, 4, 4), np.float32) + i,
            sigma2=np.ones((1, 3)) * i,
            mask=np.ones((4, 4, 4), np.float32),
            state={"phase": "iterating", "history": [{"i": i}]},
            arrays={"full_map": np.full((4, 4, 4), i, np.float32)},
        )

    assert load_latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, ck(1))
    save_checkpoint(tmp_path, ck(2))
    (tmp_path / "checkpoints" / ".iteration_003.npz.123.tmp").write_bytes(b"partial")
    got = load_latest_checkpoint(tmp_path)
    assert got.iteration == 2 and got.state["history"] == [{"i": 2}]
    np.testing.assert_array_equal(
        got.arrays["full_map"], np.full((4, 4, 4), 2, np.float32)
    )
    assert [i for i, _ in list_checkpoints(tmp_path)] == [1, 2]


def test_device_auto_falls_back_to_cpu_with_a_log_line(caplog):
    from localrefine_plugin.engine import scoring
    from localrefine_plugin.engine.refine_device import select_backend

    try:
        from localrefine_plugin.kernels import get_score_fn

        get_score_fn()
        pytest.skip("a GPU is present: auto picks it (tests/test_gpu*.py cover it)")
    except (ImportError, RuntimeError, OSError):
        pass
    with caplog.at_level(logging.INFO, logger="localrefine_plugin"):
        backend = select_backend("auto")
    assert backend.name == "cpu" and backend.score_fn is scoring.score_poses
    assert "using the CPU" in caplog.text
    assert select_backend("cpu").name == "cpu"


def test_options_round_trip_through_json():
    opts = RefineOptions(fulcrum=(10.0, 20.5, 30.0), prior_sigma_rotation_deg=2.0)
    again = RefineOptions.from_dict(json.loads(json.dumps(opts.to_dict())))
    assert again == opts


@pytest.mark.slow
def test_marginalisation_dynamic_mask_priors_and_half_maps_run(tmp_path):
    """The optional paths run end to end and keep their promises."""
    data = make_dataset(tmp_path / "data", n=60, snr=2.0, perturb_deg=2.0, seed=9)
    vol, _ = mrc_io.read_map(data["reference"])
    halves = []
    for i in (1, 2):
        halves.append(tmp_path / f"h{i}.mrc")
        mrc_io.write_map(halves[-1], vol, PIXEL_A)
    options = RefineOptions(
        **{**FAST, "batch_size": 16, "threads": 2},
        marginalize_top_k=3,
        dynamic_mask=True,
        dynamic_mask_near_a=3.0,
        dynamic_mask_far_a=9.0,
        prior_sigma_rotation_deg=2.0,
        prior_sigma_shift_a=3.0,
        fulcrum="box",
    )
    result = run_local_refinement(
        data["star"],
        data["reference"],
        data["mask"],
        output_dir=tmp_path / "out",
        options=options,
        half_maps=halves,
    )
    assert result.complete and result.iterations == 2
    rot, _ = read_poses(tmp_path / "out" / "particles.star")
    assert (
        geodesic_angle_deg(rot, data["cons_rot"]).max()
        <= FAST["rotation_extent_deg"] + 1e-6
    )
    before = np.median(geodesic_angle_deg(data["cons_rot"], data["true_rot"]))
    after = np.median(geodesic_angle_deg(rot, data["true_rot"]))
    assert after < before
    assert result.summary["fulcrum_px"] == [0.0, 0.0, 0.0]
    assert result.summary["options"]["marginalize_top_k"] == 3
    assert "half maps" in (tmp_path / "out" / "refine.log").read_text()
    full, _ = mrc_io.read_map(tmp_path / "out" / "map.mrc")
    assert np.corrcoef(full.ravel(), vol.ravel())[0, 1] > 0.8


def test_missing_half_sets_are_assigned_by_row_and_logged(tmp_path, caplog):
    from localrefine_plugin.engine.refine_inputs import load_inputs

    data = make_dataset(tmp_path / "data", n=12, with_subsets=False)
    with caplog.at_level(logging.WARNING, logger="localrefine_plugin"):
        inputs = load_inputs(
            data["star"], data["reference"], data["mask"], options=RefineOptions()
        )
    np.testing.assert_array_equal(inputs.particles.random_subset, np.arange(12) % 2 + 1)
    assert "rlnRandomSubset" in caplog.text and "particles.star" in caplog.text


def test_image_index_out_of_range_raises_before_work(small_data, tmp_path):
    from localrefine_plugin.engine.star import write_star

    doc = read_star(small_data["star"])
    names = doc["particles"].column("rlnImageName")
    names[3] = names[3].replace("4@", "999@", 1)
    doc["particles"].set_column("rlnImageName", names, fmt="{}")
    star = small_data["star"].parent / "badindex.star"
    write_star(star, doc)
    with pytest.raises(InputError) as exc:
        run_local_refinement(
            star,
            small_data["reference"],
            small_data["mask"],
            output_dir=tmp_path / "out",
        )
    assert "999" in str(exc.value) or "range" in str(exc.value)
    _no_work_done(tmp_path / "out")
