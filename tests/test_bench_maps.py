"""``benchmarks/bench_maps.py``: the maps-and-FSC and projector steps run and
report their time, peak memory and checksums (equal for equal inputs)."""

from __future__ import annotations

import numpy as np


def test_maps_and_projector_steps_report_time_memory_and_checksums(benchmark_module):
    bench = benchmark_module("bench_maps")
    first, again = bench.maps(24, repeat=1), bench.maps(24, repeat=2)
    assert first["seconds"] > 0 and first["peak_rss_gib"] > 0
    assert np.isfinite(first["checksum_full"]) and first["checksum_full"] != 0
    # the same data each time, so the same maps
    assert again["checksum_full"] == first["checksum_full"]
    assert again["checksum_halves"] == first["checksum_halves"]
    proj = bench.projector(24, repeat=1)
    assert proj["seconds"] > 0 and proj["checksum"] > 0
    assert bench.projector(24, repeat=1)["checksum"] == proj["checksum"]


def test_the_table_has_both_steps_of_each_box(benchmark_module, capsys):
    bench = benchmark_module("bench_maps")
    assert bench.main(["--boxes", "16", "20"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("16", "maps and FSC"), ("16", "projector"),
        ("20", "maps and FSC"), ("20", "projector"),
    ]  # fmt: skip
    assert all(float(r[2]) >= 0 and float(r[3]) > 0 for r in rows)
