"""Host work of the GPU local search, measured without a GPU.

``--device cuda`` runs the branch and bound's bookkeeping on the host and the
scoring, reductions, candidate rotations and bound power on the device
(``engine/search_ops.py``). Where the device is fast, the host part bounds the
particles per second of one process. This benchmark runs the real
``engine.search.local_search`` with a stand-in for the device's batch ops: its
scores are synthetic (a quadratic bowl about a hidden true pose plus noise, so
that the bounds prune as in a real search), and every piece of work that the
GPU path does on the device is timed apart and left out. What remains is the
host time per batch, and ``particles / host time`` is the most one process can
reach, whatever the GPU.

    python benchmarks/bench_search_host.py [--boxes 128 256] [--particles 512 256]
        [--profile]

Prints, per box: host milliseconds per batch, the host-limited particles per
second, the device-side time of the stand-in (NumPy on this CPU, for scale
only), and the poses scored per particle (defaults of the search: 10 deg,
3 px, 0.5 deg; radius 0.4 N; fulcrum off-centre); and, beside the search,
the host time of the batch's CTFs (``engine.ctf.ctf_2d``, per-particle
defoci), which an iteration computes once, in the alignment pass that also
inserts (and again for the noise pass's particles).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from localrefine_plugin.engine.ctf import CtfParams, ctf_2d  # noqa: E402
from localrefine_plugin.engine.geometry import (  # noqa: E402
    axis_angle_to_matrix,
    geodesic_angle_deg,
)
from localrefine_plugin.engine.local_grid import rotations_about_fulcrum  # noqa: E402
from localrefine_plugin.engine.scoring import half_plane_pixels  # noqa: E402
from localrefine_plugin.engine.search import local_search  # noqa: E402
from localrefine_plugin.engine.search_ops import HostGrid  # noqa: E402


class _Clock:
    """Seconds spent in what the GPU path does on the device."""

    def __init__(self):
        self.device = 0.0

    def run(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.device += time.perf_counter() - t0
        return out


class _Grid:
    def __init__(self, clock, e):
        self.clock, self.host = clock, HostGrid(e)

    def best(self, add_r, add_s):
        return self.clock.run(self.host.best, add_r, add_s)

    def minima(self, add_r, add_s):
        return self.clock.run(self.host.minima, add_r, add_s)

    def values(self, add_r, add_s):
        return self.clock.run(self.host.values, add_r, add_s)


class StandInOps:
    """Batch ops (``engine/search_ops.py``) with synthetic scores, device work timed.

    Score of a pose: ``r^2 (5e3 |A - A_true|^2 + 2 |o - o_true|^2) + r * noise``
    with ``r`` the scoring radius (pixels), so that the lower stages are less
    selective, as with real images.
    """

    def __init__(self, clock, a_true, o_true, radius_sorted, noise):
        self.clock, self.a_true, self.o_true = clock, a_true, o_true
        self.k, self.noise = radius_sorted, noise

    def _scores(self, rot, shifts, r_max_px):
        m, width_j, width_s = rot.shape[0], rot.shape[1], shifts.shape[1]
        d_r = ((rot - self.a_true[:m, None]) ** 2).sum((-1, -2))
        d_s = ((shifts - self.o_true[:m, None]) ** 2).sum(-1)
        size = m * width_j * width_s
        noise = self.noise[:size].reshape(m, width_j, width_s)
        e = r_max_px**2 * (5e3 * d_r[:, :, None] + 2.0 * d_s[:, None, :])
        return _Grid(self.clock, e + noise * r_max_px)

    def score(self, rotations, shifts_px, *, r_max_px, rotation_shifts_px, counts):
        return self.clock.run(self._scores, rotations, shifts_px, r_max_px)

    def score_local(
        self, a_cons, rotvecs_deg, shifts_px, *, fulcrum_px, r_max_px, counts
    ):
        rot, _ = self.clock.run(
            rotations_about_fulcrum, a_cons, rotvecs_deg, fulcrum_px
        )
        return self.clock.run(self._scores, rot, shifts_px, r_max_px)

    def _power_sums(self, rotations, weights, r_max_px):
        npix = int(np.searchsorted(self.k, r_max_px, side="right"))
        power = np.full((rotations.shape[0], npix), 1e-3)
        return power @ np.asarray(weights(self.k[:npix]), dtype=np.float64).T

    def power_sums(self, rotations, weights, *, r_max_px):
        return self.clock.run(self._power_sums, rotations, weights, r_max_px)


class StandInScoreFn:
    """A ``score_fn`` with ``bind_batch``, as the GPU's: the search binds each batch."""

    def __init__(self, clock, a_true, o_true, n, r_max):
        kx, ky = half_plane_pixels(n, float(r_max))[1:3]
        self.args = (clock, a_true, o_true, np.sort(np.hypot(kx, ky)))
        self.noise = np.random.default_rng(1).normal(size=40_000_000)

    def __call__(self, *args, **kwargs):
        raise AssertionError("a bound search calls the batch ops only")

    def power(self, *args, **kwargs):
        raise AssertionError("a bound search calls the batch ops only")

    def bind_batch(self, projector, images_f, ctf, inv_sigma2, *, r_max_px):
        return StandInOps(*self.args, self.noise)


class _Projector:  # the search reads only these of the projector
    def __init__(self, n):
        self.c, self.padding = n // 2, 2.0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(n: int, m: int, *, repeat: int, profile: bool) -> dict:
    rng = np.random.default_rng(0)
    r_max = round(0.4 * n)
    a_true = axis_angle_to_matrix(rng.normal(size=(m, 3)), rng.uniform(0, 180, m))
    o_true = rng.normal(size=(m, 2))
    a_cons = a_true @ axis_angle_to_matrix(rng.normal(size=(m, 3)), 3.0)
    clock = _Clock()
    score_fn = StandInScoreFn(clock, a_true, o_true, n, r_max)
    x = np.zeros((m, n, n // 2 + 1), np.complex64)
    ctf = np.ones((1, n, n // 2 + 1), np.float32)
    inv_s2 = np.ones((1, n // 2 + 1))
    kw = dict(
        consensus_rotations=a_cons, consensus_origins_px=o_true + 0.7,
        fulcrum_px=np.array([3.0, -2.0, 5.0]), r_max_px=float(r_max),
        score_fn=score_fn, power_fn=score_fn.power, batch_size=m,
    )  # fmt: skip
    d = rng.uniform(8000, 20000, m)
    params = CtfParams(d, 0.97 * d, rng.uniform(0, 180, m))
    ctf_s = min(_timed(lambda: ctf_2d(params, n, 1.0)) for _ in range(max(1, repeat)))
    best = None
    for _ in range(repeat):
        clock.device = 0.0
        t0 = time.perf_counter()
        found = local_search(_Projector(n), x, ctf, inv_s2, **kw)
        total = time.perf_counter() - t0
        if best is None or total - clock.device < best[0]:
            best = (total - clock.device, clock.device)
    out = {
        "box": n,
        "particles": m,
        "host_ms": 1e3 * best[0],
        "host_limited_particles_per_s": m / best[0],
        "stand_in_device_ms": 1e3 * best[1],
        "poses_per_particle": float(found.n_evaluated.mean()),
        "ctf_ms": 1e3 * ctf_s,
        # the stand-in scores lead the search to the hidden poses (a check that
        # it prunes and converges as a real search does)
        "median_error_deg_consensus": float(
            np.median(geodesic_angle_deg(a_cons, a_true))
        ),
        "median_error_deg_found": float(
            np.median(geodesic_angle_deg(found.rotations, a_true))
        ),
    }
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        local_search(_Projector(n), x, ctf, inv_s2, **kw)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
        out["profile"] = text.getvalue()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--particles", type=int, nargs="+", default=[512, 256])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    if len(args.particles) != len(args.boxes):
        p.error("give one --particles count per box")
    print("box | particles (one batch) | host ms | host-limited particles/s | "
          "stand-in device ms (this CPU) | poses/particle | median error to the "
          "hidden pose, consensus -> found (deg) | CTFs of the batch ms")  # fmt: skip
    for n, m in zip(args.boxes, args.particles, strict=True):
        r = bench(n, m, repeat=args.repeat, profile=args.profile)
        print(
            f"{n} | {m} | {r['host_ms']:.1f} | {r['host_limited_particles_per_s']:.0f} | "
            f"{r['stand_in_device_ms']:.1f} | {r['poses_per_particle']:.0f} | "
            f"{r['median_error_deg_consensus']:.2f} -> {r['median_error_deg_found']:.2f} | "
            f"{r['ctf_ms']:.1f}",
            flush=True,
        )
        if args.profile:
            print(r["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
