"""Local pose search throughput and accuracy (engine/search.py, CPU).

Simulates particles of a random Gaussian-blob map (random poses, CTF, white
noise at the given SNR), perturbs their poses about a fulcrum by a few degrees
and pixels (the "consensus"), and runs :func:`local_search` with the default
settings of ``localrefine refine`` (extents 10 deg / 3 px, 0.5 deg and 0.25 px
leaves) at box 64, 96 and 128. Prints, per box: particles per second, poses per
particle, and the median angular and shift errors to the true poses before
(consensus) and after the search; plus the load average at the time.

Example usage::

    python benchmarks/bench_search.py
    python benchmarks/bench_search.py --boxes 64 --n-particles 64 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import numpy as np

from localrefine_plugin.engine.ctf import CtfParams, ctf_2d
from localrefine_plugin.engine.fourier import fourier_to_image, image_to_fourier
from localrefine_plugin.engine.geometry import fulcrum_shift, geodesic_angle_deg
from localrefine_plugin.engine.local_grid import rotvec_to_matrix
from localrefine_plugin.engine.noise import (
    estimate_sigma2,
    inverse_sigma2_per_particle,
)
from localrefine_plugin.engine.projector import FourierProjector, forward_model
from localrefine_plugin.engine.search import local_search
from localrefine_plugin.engine.simulate import random_rotations


def blob_volume(n: int, rng: np.random.Generator, n_blobs: int = 40) -> np.ndarray:
    """Sum of Gaussian blobs (sigma 1.5 px at box 64, scaled) within 0.3 N."""
    c = n // 2
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) - c,) * 3, indexing="ij")
    vol = np.zeros((n, n, n), dtype=np.float32)
    sigma = 1.5 * n / 64
    for _ in range(n_blobs):
        p = rng.normal(size=3)
        p *= 0.3 * n * rng.uniform() ** (1 / 3) / np.linalg.norm(p)
        r2 = (x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2
        vol += np.exp(-r2 / (2 * sigma**2)).astype(np.float32)
    return vol


def simulate(n: int, m: int, snr: float, seed: int):
    """Particles, truth and perturbed consensus poses (about a fulcrum)."""
    rng = np.random.default_rng(seed)
    projector = FourierProjector(blob_volume(n, rng))
    truth = random_rotations(rng, m)
    origins = rng.uniform(-2, 2, (m, 2))
    du = rng.uniform(8000, 20000, m)
    ctf = ctf_2d(CtfParams(du, du * 0.95, 30.0), n, 2.0).astype(np.float32)
    clean = fourier_to_image(
        forward_model(projector, truth, origins_px=origins, ctf=ctf), n
    )
    noise = rng.normal(0, clean.std() / np.sqrt(snr), clean.shape).astype(np.float32)
    images_f = image_to_fourier(clean + noise)
    inv_sigma2 = inverse_sigma2_per_particle(
        estimate_sigma2(image_to_fourier(noise)), None, m
    )
    fulcrum = np.array([0.1 * n, -0.05 * n, 0.05 * n])
    v = rng.normal(size=(m, 3))
    v *= rng.uniform(1, 5, (m, 1)) / np.linalg.norm(v, axis=1, keepdims=True)
    t = rng.normal(size=(m, 2))
    t *= rng.uniform(0, 1.5, (m, 1)) / np.linalg.norm(t, axis=1, keepdims=True)
    cons = truth @ np.swapaxes(rotvec_to_matrix(v), -1, -2)  # truth = cons R(v)
    cons_origins = origins - t - fulcrum_shift(truth, cons, fulcrum)
    return (
        projector,
        images_f,
        ctf,
        inv_sigma2,
        truth,
        origins,
        cons,
        cons_origins,
        fulcrum,
    )


def run_box(
    n: int, m: int, *, snr: float, seed: int, r_max_fraction: float, threads: int
) -> dict:
    projector, x, ctf, inv, truth, origins, cons, cons_o, fulcrum = simulate(
        n, m, snr, seed
    )
    r_max = float(int(n // 2 * r_max_fraction))
    kw = dict(
        consensus_rotations=cons,
        consensus_origins_px=cons_o,
        fulcrum_px=fulcrum,
        rotation_extent_deg=10.0,
        shift_extent_px=3.0,
        alignment_resolution_deg=0.5,
        shift_resolution_px=0.25,
        r_max_px=r_max,
    )
    if threads > 1:
        kw["threads"] = threads  # (absent from older versions, for comparisons)
    local_search(
        projector,
        x[:2],
        ctf[:2],
        inv[:2],
        **{k: (v[:2] if k.startswith("consensus") else v) for k, v in kw.items()},
    )  # warm-up (caches)
    load = os.getloadavg()
    t0 = time.perf_counter()
    res = local_search(projector, x, ctf, inv, **kw)
    dt = time.perf_counter() - t0
    return {
        "box": n,
        "r_max_px": r_max,
        "particles_per_s": m / dt,
        "poses_per_particle": float(res.n_evaluated.mean()),
        "angle_before_deg": float(np.median(geodesic_angle_deg(cons, truth))),
        "angle_after_deg": float(np.median(geodesic_angle_deg(res.rotations, truth))),
        "shift_before_px": float(np.median(np.linalg.norm(cons_o - origins, axis=1))),
        "shift_after_px": float(
            np.median(np.linalg.norm(res.origins_px - origins, axis=1))
        ),
        "load_1min": load[0],
        "seconds": dt,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--n-particles", type=int, default=48)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--r-max-fraction",
        type=float,
        default=0.6,
        help="scoring radius as a fraction of Nyquist (default: %(default)s)",
    )
    p.add_argument("--profile", action="store_true", help="cProfile each box")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="local_search threads, one run each (default: %(default)s)",
    )
    args = p.parse_args(argv)
    print(
        "box  threads  r_max  particles/s  poses/particle  angle err deg (before -> after)"
        "  shift err px (before -> after)  load(1 min)"
    )
    for n, threads in ((n, t) for n in args.boxes for t in args.threads):
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        r = run_box(
            n, args.n_particles, snr=args.snr, seed=args.seed,
            r_max_fraction=args.r_max_fraction, threads=threads,
        )  # fmt: skip
        if prof:
            prof.disable()
        print(
            f"{r['box']:4d} {threads:8d} {r['r_max_px']:5.0f} {r['particles_per_s']:12.2f} "
            f"{r['poses_per_particle']:15.0f}   {r['angle_before_deg']:.2f} -> "
            f"{r['angle_after_deg']:.2f}                  {r['shift_before_px']:.2f} -> "
            f"{r['shift_after_px']:.2f}                   {r['load_1min']:.1f}",
            flush=True,
        )
        if prof:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
