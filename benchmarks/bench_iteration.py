"""One refinement iteration end to end, and from its steps the time for 10^6 particles.

Usage::

    python benchmarks/bench_iteration.py --device cuda --box 256 --n-particles 2000
    python benchmarks/bench_iteration.py --device cpu --box 64 --n-particles 100

What it does: writes ``--n-particles`` particles of box ``--box`` with
``bench_scale.write_dataset`` (a few distinct CTF-modulated projections of a
smooth map, each copy with fresh noise, the true poses as consensus poses),
then runs the refine command's own code (``run_local_refinement``) for one
iteration with the default local search (10 deg / 3 px / 0.5 deg), aligned at
Nyquist (the initial low-pass is 2 pixels, ``max_iterations`` 1), on
``--device``. The run records where the iteration's time went
(``summary.json``: ``seconds_alignment``: reading, FFTs, CTFs, the search and
the insertion, per particle; ``seconds_reconstruction``: the maps and the FSC
from the accumulators, once per iteration whatever the number of particles;
``seconds_noise``: the noise pass over at most ``noise_particles`` particles).

It prints those figures, per particle where they scale with the particles,
and the time of one iteration over 10^6 particles on this machine (one
process, one GPU): alignment per particle x 10^6 + maps and FSC + the noise
pass's per-particle time x min(10^6, noise_particles). What the estimate leaves
out: reading 10^6 images from a file system slower than this machine's page
cache (the benchmark's stacks are fresh in memory), and MPI reductions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scale import PIXEL_A, scratch_folder, write_dataset  # noqa: E402

from localrefine_plugin.engine.refine import run_local_refinement  # noqa: E402
from localrefine_plugin.engine.refine_options import RefineOptions  # noqa: E402

MILLION = 1_000_000


def estimate(record: dict, n_particles: int, noise_particles: int) -> dict:
    """Seconds per step of one iteration over 10^6 particles, from a run's ``record``
    (``summary.json``'s ``per_iteration`` entry) over ``n_particles``.

    The alignment and noise passes each cost a fixed part (the references'
    padded transforms, ``seconds_alignment_setup`` / ``seconds_noise_setup``)
    and a part per particle read; the maps and FSC cost the same whatever the
    number of particles.
    """
    align_setup = record["seconds_alignment_setup"]
    noise_setup = record["seconds_noise_setup"]
    per_particle = (record["seconds_alignment"] - align_setup) / n_particles
    noise_read = (
        n_particles if noise_particles == 0 else min(n_particles, noise_particles)
    )
    noise_million = MILLION if noise_particles == 0 else min(MILLION, noise_particles)
    out = {
        "alignment_s": align_setup + per_particle * MILLION,
        "maps_and_fsc_s": record["seconds_reconstruction"],
        "noise_s": noise_setup
        + (record["seconds_noise"] - noise_setup) / noise_read * noise_million,
    }
    out["total_s"] = sum(out.values())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--n-particles", type=int, default=2000)
    parser.add_argument(
        "--distinct", type=int, default=100, help="distinct clean images"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="as the refine command's (0: automatic)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the refine command's --threads (GPU path: threads preparing the "
        "next batch)",
    )
    parser.add_argument(
        "--workdir", help="folder for the data (default: a temporary one)"
    )
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument(
        "--profile",
        help="write a cProfile table of the refine command (its main thread: the "
        "search, insertion, maps; the next batch's reading runs in a second thread "
        "and shows as waits) to this file",
    )
    args = parser.parse_args(argv)

    with scratch_folder(args.workdir, "lr_iteration_") as workdir:
        t0 = time.perf_counter()
        star, reference, mask, _ = write_dataset(
            workdir, n=args.n_particles, box=args.box, distinct=args.distinct,
            stacks=1, seed=0,
        )  # fmt: skip
        print(
            f"data: {args.n_particles} particles of box {args.box} written in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        options = RefineOptions(
            initial_lowpass_a=2 * PIXEL_A,
            max_iterations=1,
            batch_size=args.batch_size,
            threads=args.threads,
        )
        out = workdir / "refine"
        profiler = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        run_local_refinement(
            star, reference, mask, output_dir=out, options=options, device=args.device
        )
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - t0
        if profiler:
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text).strip_dirs()
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(40)
            Path(args.profile).write_text(text.getvalue())
        summary = json.loads((out / "summary.json").read_text())
    record = summary["per_iteration"][0]
    n = args.n_particles
    est = estimate(record, n, options.noise_particles)
    batch = summary["batch_size"]
    print(
        f"\none iteration over {n} particles, box {args.box}, device {args.device}, "
        f"{args.threads} thread(s), batches of {batch} "
        f"(default search, {record['poses_evaluated_per_particle']:.0f} poses/particle, "
        f"resolution {summary['resolution_A']:.2f} A):"
    )
    print(
        f"  whole command {wall:.1f} s, of which the iteration {record['seconds']:.1f} s:\n"
        f"  alignment with insertion {record['seconds_alignment']:.1f} s "
        f"({n / record['seconds_alignment']:.1f} particles/s), maps and FSC "
        f"{record['seconds_reconstruction']:.1f} s, noise pass "
        f"{record['seconds_noise']:.1f} s"
    )
    print(
        "10^6 particles, one iteration on this machine (one process): alignment "
        f"{est['alignment_s'] / 60:.1f} min + maps and FSC {est['maps_and_fsc_s'] / 60:.1f} "
        f"min + noise {est['noise_s'] / 60:.1f} min = {est['total_s'] / 60:.1f} min "
        "(reading from a file system slower than the page cache not included)"
    )
    if args.json:
        figures = {
            "device": args.device, "box": args.box, "n_particles": n, "wall_s": wall,
            "batch_size": batch, "record": record, "million_particles": est,
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
