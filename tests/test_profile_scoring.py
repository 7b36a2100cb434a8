"""`benchmarks/profile_scoring.py`: the per-kernel summary of an ncu CSV, and
the profiled search run on the emulated GPU."""

from __future__ import annotations

import functools

import pytest

from .test_gpu_host_emulated import emulator_dir, fake_pycuda  # noqa: F401 (fixtures)

_HEADER = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
    '"Block Size","Grid Size","Device","CC","Section Name","Metric Name",'
    '"Metric Unit","Metric Value"'
)


def _row(i: int, kernel: str, unit: str, value: str) -> str:
    return (
        f'"{i}","1","python3","127.0.0.1","{kernel}","1","7","(256, 1, 1)",'
        f'"(4, 1, 2)","0","9.0","Command line profiler metrics",'
        f'"gpu__time_duration.sum","{unit}","{value}"'
    )


@pytest.fixture
def profile(benchmark_module):
    return benchmark_module("profile_scoring")


def test_summary_adds_the_device_time_per_kernel(profile):
    text = "\n".join([
        "==PROF== Connected to process 1",
        "particles: 4",
        _HEADER,
        _row(0, "score_tiles_s64", "usecond", "1,500.00"),
        _row(1, "phase_table", "nsecond", "250000"),
        _row(2, "score_tiles_s64", "msecond", "0.5"),
    ])  # fmt: skip
    out = profile.summarise(text).splitlines()
    assert out[1] == "score_tiles_s64 | 2 | 2.000 | 88.9%"
    assert out[2] == "phase_table | 1 | 0.250 | 11.1%"
    assert out[3] == "all kernels | 3 | 2.250 | 100%"
    assert (
        out[6] == "score_tiles_s64 | (4, 1, 2) | 2 | 2.000 | 88.9%"
    )  # by launch shape
    assert out[-1].startswith("per particle: 562.5 us of kernels (4 particles")


def test_summary_refuses_text_without_ncu_rows(profile):
    with pytest.raises(ValueError, match="no ncu CSV header"):
        profile.summarise("particles: 4\nno profile here")


@pytest.mark.usefixtures("fake_pycuda")
def test_the_profiled_search_runs_on_the_emulator(profile, monkeypatch, capsys):
    """What `gpu_check.sh` runs under ncu: a warm-up and one whole GPU search
    (a small search here), then the particle count for the summary."""
    import localrefine_plugin.engine.search as search

    small = dict(
        rotation_extent_deg=1.0, alignment_resolution_deg=1.0, shift_extent_px=0.5
    )
    monkeypatch.setattr(
        search, "local_search", functools.partial(search.local_search, **small)
    )
    profile.profiled_search(20, 2)
    out = capsys.readouterr().out
    assert "particles: 2" in out and "search of 2 particles in one batch" in out
