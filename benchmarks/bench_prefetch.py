"""The alignment pass's reading, FFTs and CTFs overlapped with the device's work.

Usage::

    python benchmarks/bench_prefetch.py [--box 256] [--n-particles 1024]
        [--batch-size 128] [--device-ms-per-particle 0.5] [--workers 1 2]

On the GPU path a batch's host preparation (``reconstruct.read_batch``: read
the images, FFT them, compute their CTFs) used to run between the device's
searches. ``refine_steps.prefetched`` prepares the next batch in a second
thread meanwhile. This benchmark needs no GPU: it writes a stack
(``bench_scale.write_dataset``) and times, per batch, ``read_batch`` followed
by a stand-in for the device's work (``time.sleep`` of the given milliseconds
per particle: the host waiting on the GPU with the GIL released, as PyCUDA
waits), once in turn (as before) and once prefetched, and the preparation
alone. The default 0.5 ms per particle is about the H200's search time at box
256 in batches of 128 (bench_gpu.py, seventh session: 2077 particles/s, its
host work included). Each of ``--workers`` is a number of threads preparing
a batch (``read_batch(workers=)``: the refine command's ``--threads`` on the
GPU path).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scale import scratch_folder, write_dataset  # noqa: E402

from localrefine_plugin.engine.particles import read_particles  # noqa: E402
from localrefine_plugin.engine.reconstruct import read_batch  # noqa: E402
from localrefine_plugin.engine.refine_steps import prefetched  # noqa: E402


def measure(star: Path, batch_size: int, device_ms: float, workers: int = 1) -> dict:
    """Milliseconds per particle: preparation alone (``workers`` threads per
    batch), in turn with the stand-in device work, and prefetched."""
    particles = read_particles(star)
    batches = [
        list(range(i, min(i + batch_size, particles.n)))
        for i in range(0, particles.n, batch_size)
    ]

    def prepare(idx):
        return (len(idx), *read_batch(particles, idx, workers=workers))

    def device(m, images_f, ctf):
        time.sleep(m * device_ms / 1e3)
        return images_f.shape[0]

    out = {}
    read_batch(particles, batches[0])  # warm the page cache and the FFT plans
    for name, run in (
        ("prepare_only", lambda: [prepare(b) for b in batches]),
        ("in_turn", lambda: [device(*prepare(b)) for b in batches]),
        ("prefetched", lambda: list(prefetched(prepare, device, batches))),
    ):
        t0 = time.perf_counter()
        run()
        out[name] = 1e3 * (time.perf_counter() - t0) / particles.n
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--n-particles", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device-ms-per-particle", type=float, default=0.5)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2],
        help="threads preparing each batch, one measurement per value",
    )  # fmt: skip
    parser.add_argument(
        "--workdir", help="folder for the data (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    d = args.device_ms_per_particle
    print(
        f"box {args.box}, {args.n_particles} particles in batches of {args.batch_size}, "
        f"stand-in device work {d:.2f} ms/particle; ms per particle:"
    )
    with scratch_folder(args.workdir, "lr_prefetch_") as workdir:
        star, *_ = write_dataset(
            workdir, n=args.n_particles, box=args.box, distinct=8, stacks=1, seed=0
        )
        for workers in args.workers:
            r = measure(star, args.batch_size, d, workers)
            print(
                f"  {workers} preparing thread(s):\n"
                f"    preparation alone (read, FFT, CTF) {r['prepare_only']:.3f}\n"
                f"    in turn with the device            {r['in_turn']:.3f}\n"
                f"    prefetched                         {r['prefetched']:.3f}"
                f"  ({r['in_turn'] / r['prefetched']:.2f}x; the floor is "
                f"max({r['prepare_only']:.3f}, {d:.3f}))",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
