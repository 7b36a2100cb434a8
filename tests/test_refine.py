"""The local refinement driver on small blob-map datasets with known poses.

Truth is known by construction: images are projections of a blob map at
chosen poses (with CTF and Gaussian noise), so poses can be compared with it.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from localrefine_plugin.engine import mrc_io, particles as particles_mod
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
from tests.conftest import blob_map

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
    rotation_extent_deg=4.0,
    shift_extent_px=2.0,
    alignment_resolution_deg=1.0,
    max_iterations=1,
    batch_size=64,
)


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    """One refinement from exact poses (shared by several tests)."""
    folder = tmp_path_factory.mktemp("exact")
    data = make_dataset(folder / "data", n=160, snr=1.0)
    result = run_local_refinement(
        data["star"],
        data["reference"],
        data["mask"],
        output_dir=folder / "out",
        options=RefineOptions(**FAST),
    )
    return data, result, folder / "out"


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


def test_existing_run_without_continue_is_refused(exact_run, small_data):
    _, _, out = exact_run
    with pytest.raises(InputError) as exc:
        run_local_refinement(
            small_data["star"],
            small_data["reference"],
            small_data["mask"],
            output_dir=out,
        )
    assert "--continue" in str(exc.value)
