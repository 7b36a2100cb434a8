"""Simulated flexible-domain datasets: truth poses, images, noise level, files."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

from localrefine_plugin.engine.ctf import ctf_2d
from localrefine_plugin.engine.errors import InputError
from localrefine_plugin.engine.fourier import (
    fourier_to_image,
    image_to_fourier,
    shell_index_2d,
)
from localrefine_plugin.engine.geometry import geodesic_angle_deg
from localrefine_plugin.engine.models import builtin_model, model_to_map, pdb_model
from localrefine_plugin.engine.particles import read_particles
from localrefine_plugin.engine.projector import FourierProjector, forward_model
from localrefine_plugin.engine.simulate import NYQUIST_MARGIN_PX, simulate_dataset

BOX, PIXEL_A = 64, 3.0  # the builtin model reaches ~84 A from its centre


def _corr(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.fixture(scope="module")
def builtin():
    return builtin_model()


@pytest.fixture(scope="module")
def clean_dataset(builtin, tmp_path_factory):
    """12 nearly noiseless particles with large region motions."""
    out = tmp_path_factory.mktemp("sim_clean")
    result = simulate_dataset(
        builtin,
        output_dir=out,
        n_particles=12,
        box=BOX,
        pixel_size_a=PIXEL_A,
        snr=1e12,
        motion_rotation_deg=10.0,
        motion_shift_a=6.0,
        seed=3,
        batch_size=5,
    )
    return result


def test_truth_pose_reproduces_the_image_of_the_moved_region(builtin, clean_dataset):
    """Project the moved atoms at the consensus pose; compare with the region map at truth."""
    ds = clean_dataset
    consensus = read_particles(ds.particles_star)
    truth = read_particles(ds.truth_star)
    motions = np.load(ds.truth_npz)
    with mrcfile.open(ds.region_map) as f:
        region = f.data.copy()
    region_proj = FourierProjector(region)
    center_a = builtin.center_of_mass_a("region")
    a_i, a_r = consensus.matrices(), truth.matrices()
    angles = geodesic_angle_deg(a_i, a_r)
    assert angles.max() > 5.0  # the motions are large enough to matter
    np.testing.assert_allclose(angles, motions["region_angle_deg"], atol=1e-3)
    for i in range(4):
        moved = builtin.moved(
            motions["region_rotation"][i],
            center_a=center_a,
            shift_a=motions["region_shift_px"][i] * PIXEL_A,
        )
        moved_map = model_to_map(
            moved, box=BOX, pixel_size_a=PIXEL_A, center_a=builtin.center_of_mass_a(),
            atoms="region",
        )  # fmt: skip
        expected = fourier_to_image(
            forward_model(FourierProjector(moved_map), a_i[i : i + 1],
                          origins_px=consensus.origin_px[i : i + 1]), BOX,
        )[0]  # fmt: skip
        at_truth = fourier_to_image(
            forward_model(
                region_proj, a_r[i : i + 1], origins_px=truth.origin_px[i : i + 1]
            ),
            BOX,
        )[0]
        at_consensus = fourier_to_image(
            forward_model(
                region_proj, a_i[i : i + 1], origins_px=consensus.origin_px[i : i + 1]
            ),
            BOX,
        )[0]
        c_truth, c_consensus = _corr(expected, at_truth), _corr(expected, at_consensus)
        assert c_truth > 0.999, (i, c_truth)
        # the region really moved: the consensus pose misses by far more
        assert 1 - c_consensus > 20 * (1 - c_truth), (i, c_truth, c_consensus)
        # and the same amplitude (least-squares scale 1: no scale error)
        e, t = expected.astype(np.float64).ravel(), at_truth.astype(np.float64).ravel()
        assert (e @ t) / (t @ t) == pytest.approx(1.0, abs=0.01)


def test_images_are_ctf_times_body_at_consensus_plus_region_at_truth(clean_dataset):
    ds = clean_dataset
    consensus = read_particles(ds.particles_star)
    truth = read_particles(ds.truth_star)
    maps = {}
    for key in ("body_map", "region_map", "map"):
        with mrcfile.open(getattr(ds, key)) as f:
            maps[key] = f.data.copy()
            assert f.voxel_size.x == pytest.approx(PIXEL_A)
    np.testing.assert_allclose(
        maps["body_map"] + maps["region_map"], maps["map"], atol=1e-6
    )
    idx = np.arange(consensus.n)
    ctf = ctf_2d(consensus.ctf, BOX, PIXEL_A)
    r_max = BOX // 2 - NYQUIST_MARGIN_PX  # simulate leaves the exact Nyquist ring out
    f = forward_model(FourierProjector(maps["body_map"]), consensus.matrices(),
                      origins_px=consensus.origin_px, r_max_px=r_max)  # fmt: skip
    f += forward_model(FourierProjector(maps["region_map"]), truth.matrices(),
                       origins_px=truth.origin_px, r_max_px=r_max)  # fmt: skip
    expected = fourier_to_image(f * ctf, BOX)
    images = consensus.load_images(idx)
    assert images.dtype == np.float32
    for i in idx:
        assert _corr(images[i], expected[i]) > 0.99999
    # rigid consensus model explains the images worse than body + moved region
    rigid = fourier_to_image(
        forward_model(FourierProjector(maps["map"]), consensus.matrices(),
                      origins_px=consensus.origin_px) * ctf, BOX,
    )  # fmt: skip
    assert np.mean([_corr(images[i], rigid[i]) for i in idx]) < 0.995
    # half sets alternate, CTF and optics as requested
    np.testing.assert_array_equal(consensus.random_subset, idx % 2 + 1)
    np.testing.assert_array_equal(truth.random_subset, consensus.random_subset)
    du, dv = consensus.ctf.defocus_u_a, consensus.ctf.defocus_v_a
    assert np.all((du + dv) / 2 >= 1e4 - 1) and np.all((du + dv) / 2 <= 2.5e4 + 1)
    assert np.all((du - dv >= 0) & (du - dv <= 300.0 + 1e-6))
    np.testing.assert_allclose(consensus.ctf.voltage_kv, 300.0)
    np.testing.assert_allclose(consensus.ctf.cs_mm, 2.7)
    np.testing.assert_allclose(consensus.ctf.amplitude_contrast, 0.1)
    assert np.abs(consensus.origin_px).max() <= 3.0 + 1e-6


def test_region_mask_covers_the_region(clean_dataset):
    ds = clean_dataset
    with mrcfile.open(ds.region_mask) as f:
        mask = f.data.copy()
    with mrcfile.open(ds.region_map) as f:
        region = f.data.astype(np.float64)
    with mrcfile.open(ds.body_map) as f:
        body = f.data.astype(np.float64)
    assert mask.min() >= 0 and mask.max() <= 1
    soft = np.mean((mask > 0.01) & (mask < 0.99)) / np.mean(mask > 0.01)
    assert soft > 0.1  # a soft edge, not a binary mask
    # nearly all of the region's density is inside, little of the body's
    assert (mask * region).sum() / region.sum() > 0.97
    assert (mask * body).sum() / body.sum() < 0.1
    info = json.loads(ds.truth_json.read_text())
    np.testing.assert_allclose(
        info["derived"]["mask_center_px"], ds.region_center_px, atol=1.0
    )


def test_same_seed_same_images_and_snr_as_requested(builtin, tmp_path):
    """Noisy minus clean (same seed) is the noise: measured SNR matches the request."""
    common = dict(n_particles=40, box=BOX, pixel_size_a=PIXEL_A, motion_rotation_deg=4.0,
                  motion_shift_a=2.0, seed=11)  # fmt: skip
    clean = simulate_dataset(builtin, output_dir=tmp_path / "clean", snr=1e12, **common)
    noisy = simulate_dataset(builtin, output_dir=tmp_path / "noisy", snr=0.05, **common)
    again = simulate_dataset(
        builtin, output_dir=tmp_path / "again", snr=0.05, batch_size=7, **common
    )
    with mrcfile.open(clean.stack) as f:
        s = f.data.astype(np.float64)
    with mrcfile.open(noisy.stack) as f:
        x = f.data.astype(np.float64)
    with mrcfile.open(again.stack) as f:
        np.testing.assert_array_equal(f.data, x.astype(np.float32))  # batch-independent
    noise = x - s
    snr = s.var(axis=(1, 2)).mean() / noise.var()
    assert snr == pytest.approx(0.05, rel=0.02)
    assert abs(noise.mean()) < 3 * noise.std() / np.sqrt(noise.size)
    # white: the noise power is flat across frequency shells
    power = np.abs(image_to_fourier(noise)) ** 2
    shells = shell_index_2d(BOX)
    per_shell = np.bincount(shells.ravel(), power.mean(0).ravel())[1 : BOX // 2]
    per_shell /= np.bincount(shells.ravel())[1 : BOX // 2]
    assert per_shell.std() / per_shell.mean() < 0.1


def test_bad_settings_raise_input_error_before_work(builtin, tmp_path):
    with pytest.raises(InputError, match="snr"):
        simulate_dataset(builtin, output_dir=tmp_path / "x", n_particles=10, box=BOX,
                         pixel_size_a=PIXEL_A, snr=0.0, motion_rotation_deg=1,
                         motion_shift_a=1)  # fmt: skip
    assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="larger box"):
        simulate_dataset(builtin, output_dir=tmp_path / "y", n_particles=10, box=32,
                         pixel_size_a=PIXEL_A, snr=1.0, motion_rotation_deg=1,
                         motion_shift_a=1)  # fmt: skip


def test_model_beyond_the_box_radius_is_warned_about(caplog, tmp_path):
    """Density beyond radius N/2 would wrap around in some projections: say so."""
    import logging

    model = builtin_model(scale=0.75)  # reaches 60.5 A; 40 px x 3 A: radius 60 A
    with caplog.at_level(logging.WARNING, logger="localrefine_plugin.engine.simulate"):
        simulate_dataset(model, output_dir=tmp_path / "a", n_particles=2, box=40,
                         pixel_size_a=3.0, snr=1.0, motion_rotation_deg=1,
                         motion_shift_a=1)  # fmt: skip
    assert "wrapped-around density" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="localrefine_plugin.engine.simulate"):
        simulate_dataset(model, output_dir=tmp_path / "b", n_particles=2, box=48,
                         pixel_size_a=3.0, snr=1.0, motion_rotation_deg=1,
                         motion_shift_a=1)  # fmt: skip
    assert "wrapped-around" not in caplog.text


def test_1hzh_fab_arm_dataset(structures_dir, tmp_path):
    """A real antibody (1HZH) through gemmi, one Fab arm moving."""
    model = pdb_model(structures_dir / "1hzh_igg1_b12.pdb", region="L,H:1-230")
    ds = simulate_dataset(
        model, output_dir=tmp_path, n_particles=60, box=72, pixel_size_a=3.0, snr=0.2,
        motion_rotation_deg=6.0, motion_shift_a=3.0, seed=5,
    )  # fmt: skip
    info = json.loads(ds.truth_json.read_text())["derived"]
    assert 90 <= info["mass_body_kda"] <= 100  # Fc + the other Fab, heavy atoms
    assert 43 <= info["mass_region_kda"] <= 48  # one Fab arm
    expected_c = (model.center_of_mass_a("region") - model.center_of_mass_a()) / 3.0
    np.testing.assert_allclose(ds.region_center_px, expected_c, atol=1e-9)
    assert np.linalg.norm(ds.region_center_px) * 3.0 > 35  # the arm is off-centre
    with mrcfile.open(ds.region_map) as f:
        region = f.data.astype(np.float64)
    z, y, x = np.meshgrid(*(np.arange(72) - 36,) * 3, indexing="ij")
    centroid = np.array([(region * c).sum() for c in (x, y, z)]) / region.sum()
    np.testing.assert_allclose(centroid, ds.region_center_px, atol=0.5)
    with mrcfile.open(ds.region_mask) as f:
        mask = f.data.astype(np.float64)
    assert (mask * region).sum() / region.sum() > 0.97
    # image statistics: noise sigma from the requested SNR, images float32
    particles = read_particles(ds.particles_star)
    images = particles.load_images(np.arange(particles.n)).astype(np.float64)
    assert images.var(axis=(1, 2)).mean() == pytest.approx(
        ds.noise_sigma**2 * (1 + 0.2), rel=0.05
    )


@pytest.mark.relion
def test_relion_project_of_body_and_region_at_star_poses_reproduces_the_images(
    relion_bin, clean_dataset, tmp_path
):
    """RELION reads our STAR files as we mean them: its projections of body.mrc at
    particles.star plus region.mrc at truth.star (with --ctf) equal our images."""
    import shutil
    import subprocess

    ds = clean_dataset
    for name in ("particles.star", "truth.star", "body.mrc", "region.mrc"):
        shutil.copy(ds.output_dir / name, tmp_path / name)

    def project(volume, star, out):
        subprocess.run(
            [str(relion_bin / "relion_project"), "--i", volume, "--o", out, "--ang", star,
             "--ctf"],
            cwd=tmp_path, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return mrcfile.read(tmp_path / f"{out}.mrcs").astype(np.float64)

    theirs = project("body.mrc", "particles.star", "body_proj") + project(
        "region.mrc", "truth.star", "region_proj"
    )
    with mrcfile.open(ds.stack) as f:
        ours = f.data.astype(np.float64)
    corr = [_corr(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert min(corr) > 0.99, corr
    # and the consensus poses alone (no region motion) fit RELION's images worse
    rigid = project("body.mrc", "particles.star", "b2") + project(
        "region.mrc", "particles.star", "r2"
    )
    assert np.mean([_corr(a, b) for a, b in zip(ours, rigid, strict=True)]) < np.mean(
        corr
    )


@pytest.mark.slow
def test_thousand_particles_at_box_96_in_well_under_a_minute(builtin, tmp_path):
    import time

    t0 = time.perf_counter()
    simulate_dataset(builtin, output_dir=tmp_path, n_particles=1000, box=96,
                     pixel_size_a=2.0, snr=0.05, motion_rotation_deg=5.0,
                     motion_shift_a=2.0, seed=0)  # fmt: skip
    elapsed = time.perf_counter() - t0
    with mrcfile.open(tmp_path / "particles.mrcs", header_only=True) as f:
        assert int(f.header.nz) == 1000
    assert elapsed < 45.0, elapsed
