"""Smoke tests of ``benchmarks/compare_relion.py``: its truth frame and its RELION side."""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from localrefine_plugin.engine.evaluate import compare_map_to_truth
from localrefine_plugin.engine.mrc_io import read_map
from localrefine_plugin.engine.particles import read_particles
from localrefine_plugin.engine.reconstruct import reconstruct_halves
from localrefine_plugin.engine.star import read_star

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_relion.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_relion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_args(bench, n_particles: int, snr: float):
    # Built-in model at 4 A/px: a 192 A box holds it, 128 A holds the region's mask.
    return bench.parse_args(
        [
            "--n-particles", str(n_particles), "--box", "48", "--new-box", "32",
            "--pixel-size", "4", "--snr", str(snr), "--seed", "3",
        ]
    )  # fmt: skip


def _mean_fsc_to_truth(particles, data) -> float:
    _, _, full = reconstruct_halves(particles)
    truth, apix = read_map(data["truth_map"])
    mask, _ = read_map(data["mask"])
    return compare_map_to_truth(full, truth, pixel_size_a=apix, mask=mask).mean_fsc


@pytest.mark.slow
def test_recentred_truth_poses_reconstruct_the_recentred_truth_map(bench, tmp_path):
    """The subtracted images at the carried-over true poses rebuild the true region map.

    Independent truth: the region map re-boxed about the mask centre. At the
    consensus poses (off by the simulated motion) the same images match it
    less well; pose errors measured in either frame agree.
    """
    args = _tiny_args(bench, 300, 1.0)
    data = bench.prepare_dataset(args, tmp_path)
    truth = read_particles(data["truth"])
    consensus = read_particles(data["particles"])
    assert truth.image_refs == consensus.image_refs
    fsc_truth = _mean_fsc_to_truth(truth, data)
    fsc_consensus = _mean_fsc_to_truth(consensus, data)
    assert fsc_truth > 0.8
    assert fsc_truth > fsc_consensus + 0.05

    sim = tmp_path / "sim"
    before = bench.evaluate(
        argparse.Namespace(
            particles=str(sim / "particles.star"), truth=str(sim / "truth.star"),
            mask=str(sim / "region_mask.mrc"), map=None, truth_map=None, json=None,
        )
    )  # fmt: skip
    after = bench.evaluate_run(data["particles"], None, None, None, data)
    assert after["median_angle_error_deg"] == pytest.approx(
        before["median_angle_error_deg"], abs=1e-6
    )
    assert after["median_position_error_a"] == pytest.approx(
        before["median_position_error_a"], abs=0.05
    )


def test_particle_diameter_holds_the_mask(bench):
    """RELION's circular mask reaches the mask's farthest voxel from the centre."""
    n, apix = 32, 2.0
    mask = np.zeros((n, n, n), dtype=np.float32)
    mask[n // 2, n // 2, n // 2 + 5] = 1.0  # 5 px from the centre on x
    assert math.isclose(bench.particle_diameter_a(mask, apix), (2 * 5 + 1) * apix)


@pytest.mark.slow
@pytest.mark.relion
def test_relion_accepts_the_command_and_its_outputs_are_read(
    bench, relion_bin, tmp_path
):
    """A tiny RELION auto-refine with the benchmark's parameters runs to the end.

    Its outputs are parsed back: particles in the input order with the input's
    half sets kept, a finite resolution no better than Nyquist, and the same
    evaluation as ours.
    """
    args = _tiny_args(bench, 60, 0.5)
    data = bench.prepare_dataset(args, tmp_path)
    (data["dir"] / "relion").mkdir()
    mask, apix = read_map(data["mask"])
    cmd = bench.relion_command(
        particles=data["particles"].name,
        reference=data["reference"].name,
        mask=data["mask"].name,
        out_root="relion/run",
        diameter_a=bench.particle_diameter_a(mask, apix),
        gridding=False,
    )
    cmd[cmd.index("relion_refine_mpi")] = str(relion_bin / "relion_refine_mpi")
    seconds, finished = bench.run_timed(
        cmd, cwd=data["dir"], log_path=tmp_path / "relion.log", env=bench.relion_env()
    )
    assert seconds > 0 and finished
    files = bench.relion_outputs(data["dir"] / "relion" / "run", data["particles"])
    refined = read_particles(files["data_input_order"])
    given = read_particles(data["particles"])
    # image names as written (RELION resolves them against its working directory)
    names = read_star(files["data_input_order"])["particles"].column("rlnImageName")
    assert names == read_star(data["particles"])["particles"].column("rlnImageName")
    np.testing.assert_array_equal(refined.random_subset, given.random_subset)
    assert 2 * apix <= files["own_resolution_a"] < 100
    assert files["iterations"] >= 2
    r = bench.evaluate_run(
        files["data_input_order"], files["map"], files["half1"], files["half2"], data
    )
    assert r["n_particles"] == 60
    assert 0 <= r["median_angle_error_deg"] < 30
    assert 2 * apix <= r["gold_standard_resolution_a"]
    assert np.isfinite(r["map_vs_truth_mean_fsc"])
    # The fallback for a run stopped at its time limit: the last complete
    # iteration's particles and half maps, their average as the map.
    last = bench.relion_outputs(
        data["dir"] / "relion" / "run", data["particles"], finished=False
    )
    assert last["iterations"] == files["iterations"]
    assert last["data"].name == f"run_it{files['iterations']:03d}_data.star"
    h1, _ = read_map(last["half1"])
    h2, _ = read_map(last["half2"])
    np.testing.assert_allclose(read_map(last["map"])[0], 0.5 * (h1 + h2), atol=1e-6)


def test_run_timed_stops_a_program_at_its_time_limit(bench, tmp_path):
    """A program past ``time_limit_s`` is terminated and reported as not finished."""
    seconds, finished = bench.run_timed(
        ["sleep", "60"], cwd=tmp_path, log_path=tmp_path / "sleep.log", time_limit_s=1
    )
    assert not finished
    assert 1 <= seconds < 30
    seconds, finished = bench.run_timed(
        ["true"], cwd=tmp_path, log_path=tmp_path / "true.log", time_limit_s=30
    )
    assert finished and seconds < 30
