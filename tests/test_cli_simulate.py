"""``localrefine simulate`` and ``localrefine subtract`` run in-process."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

from localrefine_plugin.cli import entry_point
from localrefine_plugin.engine.ctf import ctf_2d
from localrefine_plugin.engine.fourier import fourier_to_image
from localrefine_plugin.engine.geometry import geodesic_angle_deg
from localrefine_plugin.engine.masks import center_of_mass_px
from localrefine_plugin.engine.mrc_io import read_map, write_map
from localrefine_plugin.engine.particles import read_particles
from localrefine_plugin.engine.projector import FourierProjector, forward_model
from localrefine_plugin.engine.subtract import recenter_map

BOX, PIXEL_A = 64, 3.0


def _corr(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_sim") / "sim"
    code = entry_point(
        [
            "simulate", "--output", str(out), "--n-particles", "16", "--box", str(BOX),
            "--pixel-size", str(PIXEL_A), "--snr", "1e9", "--motion-rotation", "6",
            "--motion-shift", "3", "--defocus", "0.6", "0.9", "--seed", "4",
        ]
    )  # fmt: skip
    assert code == 0
    return out


def test_simulate_writes_consistent_files(simulated):
    for name in ("particles.star", "truth.star", "particles.mrcs", "map.mrc", "body.mrc",
                 "region.mrc", "region_mask.mrc", "truth.json", "truth.npz"):  # fmt: skip
        assert (simulated / name).is_file(), name
    info = json.loads((simulated / "truth.json").read_text())
    assert info["settings"]["n_particles"] == 16 and info["settings"]["snr"] == 1e9
    assert info["settings"]["defocus_range_um"] == [0.6, 0.9]
    assert 220 <= info["derived"]["mass_body_kda"] <= 280
    particles = read_particles(simulated / "particles.star")
    truth = read_particles(simulated / "truth.star")
    assert particles.n == truth.n == 16 and particles.box == BOX
    assert particles.pixel_size_a == pytest.approx(PIXEL_A)
    mean_defocus = (particles.ctf.defocus_u_a + particles.ctf.defocus_v_a) / 2
    assert mean_defocus.min() >= 6000 - 1 and mean_defocus.max() <= 9000 + 1
    angles = geodesic_angle_deg(particles.matrices(), truth.matrices())
    np.testing.assert_allclose(angles, np.load(simulated / "truth.npz")["region_angle_deg"],
                               atol=1e-3)  # fmt: skip
    assert 1.0 < np.sqrt(np.mean(angles**2)) < 15.0  # spread 6 deg requested
    with mrcfile.open(simulated / "particles.mrcs") as f:
        assert f.data.shape == (16, BOX, BOX) and f.data.dtype == np.float32
        assert f.voxel_size.x == pytest.approx(PIXEL_A)
    region, px = read_map(simulated / "region.mrc")
    assert px == pytest.approx(PIXEL_A) and region.shape == (BOX,) * 3


def test_subtract_cli_leaves_the_region_and_recentres(simulated, tmp_path):
    out = tmp_path / "sub"
    code = entry_point(
        [
            "subtract", "--particles", str(simulated / "particles.star"),
            "--reference", str(simulated / "map.mrc"),
            "--half-maps", str(simulated / "map.mrc"), str(simulated / "map.mrc"),
            "--mask", str(simulated / "region_mask.mrc"), "--output", str(out),
            "--recenter", "--new-box", "48",
        ]
    )  # fmt: skip
    assert code == 0
    for name in ("particles.star", "particles_subtracted.mrcs", "reference.mrc", "mask.mrc",
                 "reference_half1.mrc", "reference_half2.mrc"):  # fmt: skip
        assert (out / name).is_file(), name
    sub = read_particles(out / "particles.star")
    assert sub.n == 16 and sub.box == 48
    assert np.abs(sub.origin_px).max() <= 0.5 + 1e-5
    ref, px = read_map(out / "reference.mrc")
    mask, _ = read_map(out / "mask.mrc")
    assert ref.shape == (48,) * 3 and px == pytest.approx(PIXEL_A)
    # what remains is the moved region: the true region map, re-boxed about the same
    # voxel F, at the true region poses re-centred by the same integer image shifts
    consensus = read_particles(simulated / "particles.star")
    truth = read_particles(simulated / "truth.star")
    full_mask, _ = read_map(simulated / "region_mask.mrc")
    region, _ = read_map(simulated / "region.mrc")
    f = np.rint(center_of_mass_px(full_mask))
    a, a_r = consensus.matrices(), truth.matrices()
    t_int = consensus.origin_px - np.einsum("nij,j->ni", a, f)[:, :2] - sub.origin_px
    np.testing.assert_allclose(t_int, np.rint(t_int), atol=1e-4)  # integer image shifts
    origin_r = truth.origin_px - np.einsum("nij,j->ni", a_r, f)[:, :2] - t_int
    images = sub.load_images(np.arange(sub.n))
    ctf = ctf_2d(sub.ctf, 48, PIXEL_A)

    def predict(volume, rotations, origins):
        f_img = forward_model(
            FourierProjector(volume), rotations, origins_px=origins, ctf=ctf
        )
        return fourier_to_image(f_img, 48)

    moved = predict(recenter_map(region, f.astype(int), 48), a_r, origin_r)
    at_rest = predict(ref * mask, sub.matrices(), sub.origin_px)
    c_moved = [_corr(i, p) for i, p in zip(images, moved, strict=True)]
    c_rest = [_corr(i, p) for i, p in zip(images, at_rest, strict=True)]
    assert np.median(c_moved) > 0.95
    assert np.median(c_moved) > np.median(c_rest) + 0.02  # the truth explains it better


def test_cli_errors_exit_2_with_one_line(simulated, tmp_path, capsys):
    code = entry_point(["simulate", "--output", str(tmp_path / "x"), "--region", "A"])
    assert code == 2
    assert "--region applies to PDB models" in capsys.readouterr().err
    code = entry_point(["simulate", "--output", str(tmp_path / "y"), "--box", "32"])
    assert code == 2
    assert "larger box" in capsys.readouterr().err
    code = entry_point(
        ["simulate", "--output", str(tmp_path / "w"), "--model", "x.pdb", "--region", "A",
         "--model-scale", "0.5"]
    )  # fmt: skip
    assert code == 2
    assert "--model-scale applies to the built-in model" in capsys.readouterr().err
    # a mask with another pixel size is refused before any work
    mask, _ = read_map(simulated / "region_mask.mrc")
    write_map(tmp_path / "bad_mask.mrc", mask, 2.0)
    code = entry_point(
        [
            "subtract", "--particles", str(simulated / "particles.star"),
            "--reference", str(simulated / "map.mrc"), "--mask", str(tmp_path / "bad_mask.mrc"),
            "--output", str(tmp_path / "z"),
        ]
    )  # fmt: skip
    assert code == 2
    assert "bad_mask.mrc" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_simulate_compact_builtin_fits_a_small_box(tmp_path):
    out = tmp_path / "small"
    code = entry_point(
        ["simulate", "--output", str(out), "--model-scale", "0.75", "--n-particles", "4",
         "--box", "48", "--pixel-size", "3", "--snr", "1"]
    )  # fmt: skip
    assert code == 0
    info = json.loads((out / "truth.json").read_text())
    assert info["settings"]["model"] == "builtin(seed=0, scale=0.75)"
    assert 85 <= info["derived"]["mass_body_kda"] <= 115
    assert read_particles(out / "particles.star").box == 48
