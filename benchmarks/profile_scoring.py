"""One scoring stage per kernel variant, for a profiler (Nsight Compute).

Launches ``phase_table`` + ``score_tiles*`` once per variant on the benchmark's
synthetic stage (J = 512 rotations x S = 64 shifts per particle, radius 0.4 N;
``bench_gpu.py``), so that ``ncu`` can report where the scoring kernels stand
(SM and memory throughput, L1/L2 hit rates, occupancy). ``gpu_check.sh`` runs
it under ``ncu`` when the machine has it::

    ncu -k regex:score_tiles --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        python benchmarks/profile_scoring.py --box 256 --variants s64 s64_cells

``--search M`` instead runs one whole GPU local search (``bench_gpu.py``'s
search: defaults 10 deg, 3 px, 0.5 deg; radius 0.4 N; one batch of M
particles), so that ``ncu --csv --metrics gpu__time_duration.sum`` times every
kernel it launches; ``--summarise CSV`` turns that output into the device
time per kernel and per particle (``gpu_check.sh`` does both). Set against the
search's particles per second in ``bench_gpu.txt`` (no profiler), it says
how much of the search's time is the device's::

    ncu --csv --metrics gpu__time_duration.sum python benchmarks/profile_scoring.py \\
        --box 256 --search 256 > search.csv
    python benchmarks/profile_scoring.py --summarise search.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gpu  # noqa: E402

from localrefine_plugin.engine.projector import FourierProjector  # noqa: E402

#: milliseconds per unit of ncu's duration metrics (long and short spellings)
_MS_PER_UNIT = {
    "nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3,
    "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3,
}  # fmt: skip


def summarise(text: str, top: int = 20) -> str:
    """Device time per kernel from ``ncu --csv --metrics gpu__time_duration.sum``.

    Lines before the CSV header (the script's own output, ncu's notes) are
    skipped. Returns two tables: per kernel (launches, total ms, share), then
    the ``top`` launch shapes (kernel and grid, i.e. one stage's launches)
    by total time; then the total and, when the script printed
    ``particles: M``, the microseconds per particle.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError('no ncu CSV header (a line starting with "ID") in the input')
    by_name: dict[str, list] = {}
    by_shape: dict[tuple, list] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row.get("Metric Unit", "nsecond")
        scale = _MS_PER_UNIT.get(unit)
        if scale is None:
            raise ValueError(f"unknown time unit {unit!r} in the ncu output")
        value = float(row["Metric Value"].replace(",", "")) * scale
        name = row["Kernel Name"].split("(")[0]
        for table, key in (
            (by_name, name),
            (by_shape, (name, row.get("Grid Size", ""))),
        ):
            entry = table.setdefault(key, [0, 0.0])
            entry[0] += 1
            entry[1] += value
    if not by_name:
        raise ValueError("no gpu__time_duration.sum rows in the input")
    all_ms = sum(v[1] for v in by_name.values())
    out = ["kernel | launches | device ms | share"]
    for name, (count, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        out.append(f"{name} | {count} | {ms:.3f} | {100 * ms / all_ms:.1f}%")
    out.append(
        f"all kernels | {sum(v[0] for v in by_name.values())} | {all_ms:.3f} | 100%"
    )
    out.append("")
    out.append(f"kernel | grid | launches | device ms | share (the {top} largest)")
    shapes = sorted(by_shape.items(), key=lambda kv: -kv[1][1])[:top]
    for (name, grid), (count, ms) in shapes:
        out.append(f"{name} | {grid} | {count} | {ms:.3f} | {100 * ms / all_ms:.1f}%")
    particles = [
        int(line.split(":")[1])
        for line in lines[:start]
        if line.startswith("particles:")
    ]
    if particles:
        out.append(
            f"per particle: {1e3 * all_ms / particles[-1]:.1f} us of kernels "
            f"({particles[-1]} particles in the profiled search)"
        )
    return "\n".join(out)


def profiled_search(n: int, m: int) -> None:
    """One GPU local search of ``m`` particles at box ``n`` (bench_gpu's data),
    after a warm-up search of 4; prints ``particles: m`` for :func:`summarise`."""
    import numpy as np

    from localrefine_plugin.engine.search import local_search
    from localrefine_plugin.kernels import get_power_fn, get_score_fn

    r_max = round(0.4 * n)
    rng = np.random.default_rng(n)
    proj = FourierProjector(bench_gpu.blob_volume(n), r_max_px=r_max + 1)
    x, ctf, inv_s2, a_cons, o_cons = bench_gpu.search_particles(proj, m, rng)
    fns = dict(score_fn=get_score_fn(), power_fn=get_power_fn())
    kw = dict(fulcrum_px=np.zeros(3), r_max_px=float(r_max), batch_size=m)
    local_search(
        proj, x[:4], ctf[:4], inv_s2[:4], consensus_rotations=a_cons[:4],
        consensus_origins_px=o_cons[:4], **fns, **kw,
    )  # fmt: skip
    t0 = time.perf_counter()
    local_search(
        proj, x, ctf, inv_s2, consensus_rotations=a_cons,
        consensus_origins_px=o_cons, **fns, **kw,
    )  # fmt: skip
    print(f"particles: {m}")
    print(
        f"box {n}: search of {m} particles in one batch, "
        f"{time.perf_counter() - t0:.2f} s (host clock, profiler included)",
        flush=True,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=["s64", "s64_cells"])
    ap.add_argument(
        "--search", type=int, default=0, metavar="M",
        help="run one GPU local search of M particles instead of the stages",
    )  # fmt: skip
    ap.add_argument(
        "--summarise", metavar="CSV",
        help="print the device time per kernel of an ncu --csv output and exit",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.summarise:
        with open(args.summarise) as fh:
            print(summarise(fh.read()))
        return 0
    if args.search:
        from localrefine_plugin.kernels.backend import ensure_context

        ensure_context()
        profiled_search(args.box, args.search)
        return 0

    import numpy as np
    import pycuda.driver as cuda

    from localrefine_plugin.kernels.backend import ensure_context
    from localrefine_plugin.kernels.cuda_scoring import VARIANTS, _ScoreLaunch

    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    ensure_context()
    n = args.box
    r_max = round(0.4 * n)
    rng = np.random.default_rng(n)
    proj = FourierProjector(bench_gpu.blob_volume(n), r_max_px=r_max + 1)
    x, ctf, inv_s2, a, o = bench_gpu.particles(proj, args.particles, rng)
    rots, shifts = bench_gpu.stage_candidates(a, o, rng)
    for variant in args.variants:
        launch = _ScoreLaunch(
            proj, x, ctf, inv_s2, rots, shifts, None, float(r_max), variant
        )
        launch.phase_table()
        t0 = time.perf_counter()
        launch.scores()
        cuda.Context.synchronize()
        print(
            f"box {n}, {args.particles} particles, J {rots.shape[1]} x S {shifts.shape[1]}: "
            f"{variant} "
            f"{(time.perf_counter() - t0) * 1e3:.2f} ms (host clock, profiler included)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
