"""One scoring stage per kernel variant, for a profiler (Nsight Compute).

Launches ``phase_table`` + ``score_tiles*`` once per variant on the benchmark's
synthetic stage (J = 512 rotations x S = 64 shifts per particle, radius 0.4 N;
``bench_gpu.py``), so that ``ncu`` can report where the scoring kernels stand
(SM and memory throughput, L1/L2 hit rates, occupancy). ``gpu_check.sh`` runs
it under ``ncu`` when the machine has it::

    ncu -k regex:score_tiles --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        python benchmarks/profile_scoring.py --box 256 --variants s64 s64_cells
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gpu  # noqa: E402

from localrefine_plugin.engine.projector import FourierProjector  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=["s64", "s64_cells"])
    args = ap.parse_args(argv)

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
