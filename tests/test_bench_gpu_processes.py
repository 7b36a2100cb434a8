"""The GPU benchmark's K-processes measurement (``benchmarks/bench_gpu.py``),
run here on the CPU path: each process searches its block of particles, and
together they find the poses one process finds; a failing process fails the
measurement at once instead of leaving the others waiting."""

from __future__ import annotations

import numpy as np
import pytest

from localrefine_plugin.engine.geometry import axis_angle_to_matrix
from localrefine_plugin.engine.projector import FourierProjector
from localrefine_plugin.engine.search import local_search


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("bench_gpu")


def _data(bench, n: int, r_max: int, m: int):
    proj = FourierProjector(bench.blob_volume(n), r_max_px=r_max + 1)
    rng = np.random.default_rng(3)
    x, ctf, inv_s2, a, o = bench.particles(proj, m, rng)
    a_cons = a @ axis_angle_to_matrix(rng.normal(size=(m, 3)), 2.0)
    return proj, (x, ctf, inv_s2, a_cons, o + 0.4)


def test_processes_find_the_poses_of_one_process(bench):
    n, r_max, m = 24, 9, 5
    proj, data = _data(bench, n, r_max, m)
    kw = dict(
        fulcrum_px=np.array([1.0, 0.0, -2.0]),
        r_max_px=float(r_max),
        rotation_extent_deg=4.0,
        shift_extent_px=1.0,
        alignment_resolution_deg=1.0,
    )
    rate, rot, org = bench.search_in_processes(
        2, "cpu", n, r_max, data, kw, batch_size=2, repeat=1, timeout_s=120
    )
    x, ctf, inv_s2, a_cons, o_cons = data
    one = local_search(
        proj, x, ctf, inv_s2, consensus_rotations=a_cons, consensus_origins_px=o_cons,
        batch_size=2, **kw,
    )  # fmt: skip
    assert np.isfinite(rate) and rate > 0
    np.testing.assert_array_equal(rot, one.rotations)
    np.testing.assert_array_equal(org, one.origins_px)
    # whole: each process searches every particle (K M in all), the same poses
    rate, rot, org = bench.search_in_processes(
        2, "cpu", n, r_max, data, kw, batch_size=2, repeat=1, timeout_s=120, whole=True
    )
    assert np.isfinite(rate) and rate > 0
    np.testing.assert_array_equal(rot, np.tile(one.rotations, (2, 1, 1)))
    np.testing.assert_array_equal(org, np.tile(one.origins_px, (2, 1)))


def test_a_failing_process_fails_the_measurement(bench):
    n, r_max = 24, 9
    _, data = _data(bench, n, r_max, 4)
    kw = dict(fulcrum_px=np.zeros(3), r_max_px=float(r_max), rotation_extent_deg=-1.0)
    with pytest.raises(RuntimeError, match="did not report"):
        bench.search_in_processes(
            2, "cpu", n, r_max, data, kw, batch_size=2, repeat=1, timeout_s=120
        )


def test_processes_script_measures_each_k_with_the_same_poses(benchmark_module):
    """`benchmarks/bench_processes.py` (run under MPS on a GPU by
    gpu_check.sh): a rate for each K, every process finding the first K's
    poses, and the JSON written; here on the CPU path with a small search."""
    script = benchmark_module("bench_processes")
    lines: list[str] = []
    res = script.measure(
        24, [1, 2], particles=3, batch=2, device="cpu", log=lines.append,
        search_kw=dict(rotation_extent_deg=3.0, shift_extent_px=1.0,
                       alignment_resolution_deg=1.5),
    )  # fmt: skip
    assert set(res["rates"]) == {1, 2} and not res["errors"]
    assert all(np.isfinite(r) and r > 0 for r in res["rates"].values())
    assert res["same_pose"] == {1: "3 of 3", 2: "6 of 6"}  # every process's
    assert len(lines) == 2 and "1 process(es)" in lines[1]
