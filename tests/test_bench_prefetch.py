"""``benchmarks/bench_prefetch.py`` runs (its figures are timings, so only their
presence and sense are checked, not their values)."""

from __future__ import annotations


def test_prefetch_benchmark_reports_three_rates(benchmark_module, tmp_path, capsys):
    bench = benchmark_module("bench_prefetch")
    args = ["--box", "32", "--n-particles", "40", "--batch-size", "8"]
    assert (
        bench.main(
            [*args, "--device-ms-per-particle", "0.1", "--workdir", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    for label in ("preparation alone", "in turn with the device", "prefetched"):
        assert out.count(label) == 2  # one block per --workers value (1 and 2)
    assert "1 preparing thread(s)" in out and "2 preparing thread(s)" in out
