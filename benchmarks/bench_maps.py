"""The iteration's fixed costs on the host: the maps and FSC, and a projector.

    python benchmarks/bench_maps.py [--boxes 128 256] [--repeat 1]

Per box, in one process each (so that the peak memory is the step's own):

* **maps and FSC**: ``refine_steps.reconstruct_and_compare`` on two half-set
  accumulators filled with random data and weights (what the refine command
  does once per iteration whatever the number of particles: five
  reconstructions, the half-map FSC and the masked FSC with phase
  randomisation), box ``N`` with padding 2;
* **projector**: ``FourierProjector`` of a random ``N^3`` float32 map, padding 2
  (the refine command makes four per iteration: each half's reference for the
  alignment and for the noise pass).

Prints the seconds (best of ``--repeat``), the process's peak RSS, and a
checksum of the maps (equal checksums: equal maps, e.g. before and after a
change of how they are computed; run the script on both commits).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from localrefine_plugin.engine import refine_steps  # noqa: E402
from localrefine_plugin.engine.backprojector import BackProjector  # noqa: E402
from localrefine_plugin.engine.projector import FourierProjector  # noqa: E402
from localrefine_plugin.engine.refine_options import RefineOptions  # noqa: E402


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def maps(n: int, repeat: int) -> dict:
    """Seconds and checksums of ``reconstruct_and_compare`` at box ``n``."""
    rng = np.random.default_rng(0)
    best = np.inf
    for _ in range(repeat):
        halves = []
        for _half in range(2):
            bp = BackProjector(n, padding=2)
            bp.data[...] = rng.normal(size=bp.shape) + 1j * rng.normal(size=bp.shape)
            bp.weight[...] = rng.uniform(0.5, 2.0, bp.shape)
            bp.n_inserted = 100
            halves.append(bp)
        mask = np.zeros((n, n, n), np.float32)
        mask[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 1
        t0 = time.perf_counter()
        rec = refine_steps.reconstruct_and_compare(
            tuple(halves), mask, pixel_size_a=1.0, options=RefineOptions()
        )
        best = min(best, time.perf_counter() - t0)
        rng = np.random.default_rng(0)  # the same data each repeat
    return {
        "seconds": best,
        "checksum_full": float(rec.full.astype(np.float64).sum()),
        "checksum_halves": float(rec.halves.astype(np.float64).sum()),
        "peak_rss_gib": _peak_rss_gib(),
    }


def projector(n: int, repeat: int) -> dict:
    """Seconds and a checksum of ``FourierProjector`` at box ``n``."""
    vol = np.random.default_rng(0).normal(size=(n, n, n)).astype(np.float32)
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        proj = FourierProjector(vol, padding=2)
        best = min(best, time.perf_counter() - t0)
    return {
        "seconds": best,
        # plane by plane: no temporary of the layout's size (the peak is the step's)
        "checksum": float(
            sum(np.abs(plane).sum(dtype=np.float64) for plane in proj.data)
        ),
        "peak_rss_gib": _peak_rss_gib(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--step", choices=("maps", "projector"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:  # one measurement in this process (its own peak memory)
        fn = maps if args.step == "maps" else projector
        print(json.dumps(fn(args.boxes[0], args.repeat)))
        return 0
    print("box | step | seconds | peak RSS (GiB) | checksum")
    for n in args.boxes:
        for step in ("maps", "projector"):
            cmd = [sys.executable, os.path.abspath(__file__), "--step", step,
                   "--boxes", str(n), "--repeat", str(args.repeat)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            check = (
                f"{r['checksum_full']:.10e} {r['checksum_halves']:.10e}"
                if step == "maps"
                else f"{r['checksum']:.10e}"
            )
            label = "maps and FSC" if step == "maps" else "projector"
            print(
                f"{n} | {label} | {r['seconds']:.2f} | {r['peak_rss_gib']:.2f} | {check}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
