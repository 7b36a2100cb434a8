"""``localrefine reconstruct`` run in-process on a small simulated particle set."""

from __future__ import annotations

import logging

import mrcfile
import numpy as np
import pytest

from localrefine_plugin.cli import entry_point
from localrefine_plugin.engine.ctf import CtfParams, ctf_2d
from localrefine_plugin.engine.fourier import fourier_to_image
from localrefine_plugin.engine.fsc import fsc_curve
from localrefine_plugin.engine.geometry import euler_to_matrix
from localrefine_plugin.engine.mrc_io import write_stack
from localrefine_plugin.engine.particles import make_particles, write_particles
from localrefine_plugin.engine.projector import FourierProjector, forward_model

from .conftest import blob_map

N, PIXEL_A, M = 32, 3.0, 600


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """600 noiseless CTF-modulated, shifted projections of a blob map + STAR."""
    folder = tmp_path_factory.mktemp("cli_reconstruct")
    rng = np.random.default_rng(99)
    vol = blob_map(N, seed=21, sigma_px=1.0)
    rot, psi = rng.uniform(-180, 180, (2, M))
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, M)))
    origins = rng.uniform(-3, 3, (M, 2))
    du = rng.uniform(8000, 20000, M)
    ctf = CtfParams(du, du - 300, rng.uniform(0, 180, M))
    f = forward_model(
        FourierProjector(vol),
        euler_to_matrix(rot, tilt, psi),
        origins_px=origins,
        ctf=ctf_2d(ctf, N, PIXEL_A),
    )
    write_stack(folder / "particles.mrcs", fourier_to_image(f, N), PIXEL_A)
    particles = make_particles(
        image_refs=[(folder / "particles.mrcs", i) for i in range(M)],
        rot_deg=rot,
        tilt_deg=tilt,
        psi_deg=psi,
        origin_px=origins,
        ctf=ctf,
        pixel_size_a=PIXEL_A,
        box=N,
        random_subset=np.arange(M) % 2 + 1,
    )
    write_particles(folder / "particles.star", particles)
    return folder, vol


def test_reconstruct_writes_half_maps_and_map_that_reproduce_the_truth(
    dataset, tmp_path, caplog
):
    folder, vol = dataset
    out = tmp_path / "recon"
    with caplog.at_level(logging.INFO):
        rc = entry_point(
            [
                "reconstruct",
                "--particles", str(folder / "particles.star"),
                "--output", str(out),
                "--batch-size", "100",
            ]
        )  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "half_map_1.mrc",
        "half_map_2.mrc",
        "map.mrc",
    ]
    maps = {}
    for name in ("half_map_1", "half_map_2", "map"):
        with mrcfile.open(out / f"{name}.mrc") as mrc:
            assert mrc.data.shape == (N, N, N) and mrc.data.dtype == np.float32
            assert float(mrc.voxel_size.x) == pytest.approx(PIXEL_A)
            maps[name] = mrc.data.astype(np.float64)
    last = int(0.8 * (N // 2))
    for name, m in maps.items():
        fsc = fsc_curve(m, vol)
        assert fsc[: last + 1].min() >= 0.95, (name, fsc.round(3))
    # noiseless halves agree to the end, so the Wiener filter barely acts
    fsc_halves = fsc_curve(maps["half_map_1"], maps["half_map_2"])
    assert fsc_halves[: last + 1].min() > 0.99
    assert float((maps["map"] * vol).sum() / (vol * vol).sum()) == pytest.approx(
        1.0, abs=0.05
    )
    summary = caplog.records[-1].getMessage()
    assert f"reconstructed {M} particles, box {N} px, pixel 3 A" in summary
    assert "FSC 0.143" in summary


def test_missing_star_file_exits_2_without_writing(tmp_path, capsys):
    rc = entry_point(
        [
            "reconstruct",
            "--particles", str(tmp_path / "absent.star"),
            "--output", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert rc == 2
    assert "absent.star" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_batch_size_exits_2(dataset, tmp_path, capsys):
    folder, _ = dataset
    rc = entry_point(
        [
            "reconstruct",
            "--particles", str(folder / "particles.star"),
            "--output", str(tmp_path / "out"),
            "--batch-size", "0",
        ]
    )  # fmt: skip
    assert rc == 2
    assert "--batch-size" in capsys.readouterr().err


# -- engine/reconstruct.py on the same data -----------------------------------------
def test_top_k_poses_with_split_weights_equal_the_single_pose(dataset):
    from localrefine_plugin.engine.particles import read_particles
    from localrefine_plugin.engine.reconstruct import reconstruct_particles

    folder, _ = dataset
    particles = read_particles(folder / "particles.star")
    idx = np.arange(0, M, 7)
    single = reconstruct_particles(particles, indices=idx, batch_size=40)
    rot = np.repeat(particles.matrices()[:, None], 2, axis=1)  # (n, 2, 3, 3)
    orig = np.repeat(particles.origin_px[:, None], 2, axis=1)  # (n, 2, 2)
    weights = np.full((M, 2), 0.5)
    split = reconstruct_particles(
        particles, indices=idx, batch_size=40, top_k_poses=(rot, orig, weights)
    )
    assert single[0].n_inserted + single[1].n_inserted == idx.size
    assert single[0].n_inserted == int((particles.random_subset[idx] == 1).sum())
    for a, b in zip(single, split, strict=True):
        np.testing.assert_allclose(b.data, a.data, atol=1e-9 * np.abs(a.data).max())
        np.testing.assert_allclose(b.weight, a.weight, atol=1e-9 * a.weight.max())
