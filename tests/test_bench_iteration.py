"""``benchmarks/bench_iteration.py``: one iteration of the refine command's own code,
its steps' times, and the 10^6-particle estimate made from them."""

from __future__ import annotations

import json

import pytest


def test_one_iteration_reports_its_steps_and_the_million_estimate(
    benchmark_module, tmp_path, capsys
):
    bench = benchmark_module("bench_iteration")
    out = tmp_path / "figures.json"
    args = ["--device", "cpu", "--box", "32", "--n-particles", "24", "--distinct", "6"]
    assert (
        bench.main(
            [
                *args,
                "--workdir",
                str(tmp_path / "w"),
                "--json",
                str(out),
                "--profile",
                str(tmp_path / "profile.txt"),
            ]
        )  # fmt: skip
        == 0
    )
    assert "run_local_refinement" in (tmp_path / "profile.txt").read_text()
    figures = json.loads(out.read_text())
    rec, est = figures["record"], figures["million_particles"]
    assert rec["seconds_alignment"] > 0 and rec["poses_evaluated_per_particle"] > 100
    # alignment scales with the particles, maps and FSC do not, the noise pass
    # reads all 24 here and at most noise_particles of 10^6
    # (each pass's fixed part, the references' transforms, counted once)
    a0, n0 = rec["seconds_alignment_setup"], rec["seconds_noise_setup"]
    assert 0 < a0 < rec["seconds_alignment"] and 0 < n0 < rec["seconds_noise"]
    assert est["alignment_s"] == pytest.approx(
        a0 + (rec["seconds_alignment"] - a0) / 24 * 1e6
    )
    assert est["maps_and_fsc_s"] == rec["seconds_reconstruction"]
    assert est["noise_s"] == pytest.approx(
        n0 + (rec["seconds_noise"] - n0) / 24 * 20000
    )
    assert est["total_s"] == pytest.approx(
        est["alignment_s"] + est["maps_and_fsc_s"] + est["noise_s"]
    )
    assert "10^6 particles, one iteration" in capsys.readouterr().out


def test_estimate_reads_every_particle_for_the_noise_when_uncapped(benchmark_module):
    bench = benchmark_module("bench_iteration")
    record = {
        "seconds_alignment": 2.0,
        "seconds_reconstruction": 5.0,
        "seconds_noise": 1.0,
        "seconds_alignment_setup": 0.5,
        "seconds_noise_setup": 0.25,
    }
    est = bench.estimate(record, 100, 0)
    assert est == pytest.approx(
        {
            "alignment_s": 0.5 + 1.5e4,
            "maps_and_fsc_s": 5.0,
            "noise_s": 0.25 + 7.5e3,
            "total_s": 0.5 + 1.5e4 + 5.0 + 0.25 + 7.5e3,
        }
    )
