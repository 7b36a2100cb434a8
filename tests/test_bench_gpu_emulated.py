"""`benchmarks/bench_gpu.py` end to end on the emulated GPU (no GPU; CI runs it).

A GPU session is scarce, and a benchmark that breaks there wastes it: this
runs every measurement of the benchmark at a tiny box through the emulated
PyCUDA of ``test_gpu_host_emulated.py`` (the real kernels compiled for the
CPU), with a smaller stage and search, and the K-process measurement on the
CPU path (spawned processes do not see the emulator).
"""

from __future__ import annotations

import functools
import importlib
import time

import pytest

from .test_gpu_host_emulated import emulator_dir, fake_pycuda  # noqa: F401 (fixtures)


@pytest.fixture
def bench(benchmark_module, monkeypatch):
    """The benchmark module, with a one-block stage (the emulator runs a
    256-thread block in about 0.2 s)."""
    module = benchmark_module("bench_gpu")
    monkeypatch.setattr(module, "J_STAGE", 32)
    monkeypatch.setattr(module, "S_STAGE", 32)
    return module


@pytest.mark.slow  # about 60 s: each emulated launch takes a fraction of a second
@pytest.mark.usefixtures("fake_pycuda")
def test_gpu_benchmark_runs_through_on_the_emulator(bench, monkeypatch):
    """`benchmarks/bench_gpu.py` end to end at a tiny box (smaller stage and
    search, K processes on the CPU path): every measurement runs, the GPU
    search finds the CPU's poses whether the kernels read the volume or its
    cells, with rotation lanes and without the memory pool, with the CTFs
    evaluated on the device and the images in page-locked memory, and the summary
    with the 10^6-particle estimate prints. A GPU session is scarce; a
    benchmark that breaks there wastes it."""
    monkeypatch.setattr(bench, "QUICK", dict(
        score_gpu=1, score_cpu=1, search_gpu=2, search_cpu=1, search_batch=1,
        project_gpu=4, project_cpu=2, processes=(2,),
    ))  # fmt: skip
    small = dict(
        rotation_extent_deg=1.0, alignment_resolution_deg=1.0, shift_extent_px=0.5
    )
    monkeypatch.setattr(
        bench, "local_search", functools.partial(bench.local_search, **small)
    )
    real_processes = bench.search_in_processes

    def cpu_processes(k, device, n, r_max, data, kw, **opts):
        return real_processes(k, "cpu", n, r_max, data, dict(kw, **small), **opts)

    monkeypatch.setattr(bench, "search_in_processes", cpu_processes)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)
        lines.append(msg)

    res = bench.bench_box(20, True, (66.9, 3.35), log)
    for key in ("kernel_s_by_variant", "gpu_particles_per_s_bound_batch128_cells",
                "gpu_particles_per_s_variant_j64_s64", "upload_pageable_gb_per_s",
                "gpu_insert_float32x4_per_s", "gpu_insert_upload_s",
                "gpu_insert_resident_per_s", "gpu_insert_gather_per_s",
                "gpu_insert_resident_gather_per_s",
                "gpu_particles_per_s_processes2", "fp32_fraction",
                "kernel_s_by_variant_clustered", "fp32_fraction_clustered",
                "gpu_particles_per_s_bound_batch128_rlanes",
                "gpu_particles_per_s_bound_batch128_nopool",
                "gpu_particles_per_s_bound_batch128_wide_rl",
                "kernel_s_by_variant_clustered_s32",
                "host_fft_ms_per_particle", "host_ctf_ms_per_particle"):  # fmt: skip
        assert key in res, key
    assert set(res["kernel_s_by_variant"]) == set(
        importlib.import_module("localrefine_plugin.kernels.cuda_scoring").VARIANTS
    )
    assert res["same_pose_as_cpu"] == "1 of 1"
    assert res["cells_same_pose"] == "2 of 2"
    for v in bench.SEARCH_VARIANTS:
        assert res[f"variant_{v}_same_pose"] == "2 of 2", v
    assert set(res["kernel_s_by_variant_clustered"]) == set(bench.CLUSTERED_VARIANTS)
    for key in ("rlanes", "wide", "wide_rl", "nopool", "ctfparams", "pinned",
                "ctfparams_pinned"):  # fmt: skip
        assert res[f"{key}_same_pose"] == "2 of 2", key
    assert res["processes_ctf"] in ("values", "parameters")
    assert res["processes_pinned"] in (True, False)
    assert res["processes2_same_pose"] == "4 of 4"  # each process all 2
    assert res["gather_max_rel_diff"] <= 1e-5
    results = {"boxes": [dict(res, box=256)]}
    bench.report(results, log)
    assert results["million_particles_box256_s"] > 0
    assert results["million_particles_box256_host_prep_core_s"] > 0
    assert any(line.startswith("\n10^6 particles at box 256") for line in lines)


@pytest.mark.usefixtures("fake_pycuda")
def test_upload_rates_measure_pageable_and_page_locked_copies(bench, monkeypatch):
    """`upload_rates`: with a driver that has page-locked buffers (stood in for
    by host arrays and a memmove here) all three rates, each copy the whole batch."""
    import ctypes

    import numpy as np
    import pycuda.driver as drv

    landed = []

    def memcpy_htod(dest, src):
        ctypes.memmove(dest, src.ctypes.data, src.nbytes)
        landed.append(src.nbytes)

    monkeypatch.setattr(drv, "pagelocked_empty", np.empty, raising=False)
    monkeypatch.setattr(drv, "memcpy_htod", memcpy_htod, raising=False)
    rates = bench.upload_rates(8, drv, m=4)
    assert set(rates) == {
        "upload_pageable_gb_per_s", "upload_pinned_gb_per_s",
        "upload_host_copy_gb_per_s",
    }  # fmt: skip
    assert all(v > 0 for v in rates.values())
    assert landed and set(landed) == {4 * 8 * 5 * 8}  # 4 images of 8 x 5 complex64


@pytest.mark.usefixtures("fake_pycuda")
def test_profile_script_launches_each_variant_once(bench, benchmark_module, capsys):
    """`benchmarks/profile_scoring.py` (run under ncu by gpu_check.sh)."""
    profile = benchmark_module("profile_scoring")
    argv = ["--box", "20", "--particles", "1", "--variants", "s64", "s64_cells"]
    assert profile.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split()[0] for line in out] == ["s64", "s64_cells"]
    assert all("J 32 x S 32" in line for line in out)
    with pytest.raises(SystemExit):
        profile.main(["--variants", "s128"])
