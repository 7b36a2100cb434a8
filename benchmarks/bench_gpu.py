"""GPU benchmark of the local-refinement kernels against the 2-core CPU path.

At each box (default 128 and 256) it measures, on the same synthetic data:

* pose scoring (one branch-and-bound stage at its cap: J = 512 rotations x
  S = 64 shifts per particle, radius 0.4 N): poses scored per second on the GPU
  (end to end: host weight folding, transfers, both kernels) and on the CPU
  (``engine.scoring.score_poses``, fewer particles);
* the ``score_tiles`` + ``phase_table`` kernels alone (CUDA events): FLOP/s and
  compulsory DRAM bytes/s as fractions of the card's FP32 peak and memory
  bandwidth, and which of the two bounds it;
* a whole local search (``engine.search.local_search`` with the defaults:
  10 deg, 3 px, 0.5 deg, radius 0.4 N) with the GPU ``score_fn`` and with the
  CPU one: particles per second per iteration (the search part of an iteration);
* slice extraction (images/s) and back-projection (images/s, float32,
  float32x4 and float64 atomic accumulators, against the CPU
  ``BackProjector.insert``; and how much of it the uploads take).

Scoring kernels and searches are measured reading the slices from the padded
volume and from its 2x2x2 cells (``$LOCALREFINE_SCORE_SAMPLER``, docs/gpu.md).

The CPU path runs with 2 BLAS/OpenMP threads (the 2-core development
machine's configuration; ``--cpu-threads``) and on fewer particles than the
GPU (stated in the output). Results are printed as a table and written as
JSON (``--json``). Example::

    python benchmarks/bench_gpu.py --json results.json
    python benchmarks/bench_gpu.py --boxes 128 --quick
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


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--cpu-threads", type=int, default=2, help="threads of the CPU path")
    p.add_argument("--quick", action="store_true", help="small counts (a dry run)")
    p.add_argument("--peak-tflops", type=float, default=None, help="FP32 peak, TFLOP/s")
    p.add_argument(
        "--peak-tbps", type=float, default=None, help="memory bandwidth, TB/s"
    )
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.cpu_threads)  # before NumPy loads its BLAS

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from localrefine_plugin.engine.backprojector import BackProjector  # noqa: E402
from localrefine_plugin.engine.ctf import CtfBatch, CtfParams, ctf_2d  # noqa: E402
from localrefine_plugin.engine.fourier import image_to_fourier  # noqa: E402
from localrefine_plugin.engine.geometry import (  # noqa: E402
    axis_angle_to_matrix,
    euler_to_matrix,
    geodesic_angle_deg,
)
from localrefine_plugin.engine.projector import FourierProjector, forward_model  # noqa: E402
from localrefine_plugin.engine.refine_options import (  # noqa: E402
    RefineOptions,
    auto_batch_size,
)
from localrefine_plugin.engine.scoring import half_plane_pixels, score_poses  # noqa: E402
from localrefine_plugin.engine.search import local_search  # noqa: E402
from localrefine_plugin.kernels.cuda_ctf import device_ctf_enabled  # noqa: E402

#: (name substring, FP32 TFLOP/s, memory TB/s): vendor peaks (H100 SXM5: 67
#: TFLOP/s FP32, 3.35 TB/s HBM3; PCIe: 51, 2.0; H200: 67, 4.8; A100 SXM: 19.5, 2.04)
PEAKS = [("H100 PCIe", 51.2, 2.0), ("H100", 66.9, 3.35), ("H200", 66.9, 4.8),
         ("A100", 19.5, 2.04)]  # fmt: skip

J_STAGE, S_STAGE = 512, 64
#: particle counts of --quick (a dry run): scoring GPU / CPU, search GPU / CPU
#: (batches of at most search_batch), projection GPU / CPU, K processes
QUICK = dict(
    score_gpu=16, score_cpu=1, search_gpu=16, search_cpu=1, search_batch=128,
    project_gpu=64, project_cpu=8, processes=(2,),
)  # fmt: skip


#: kernel variants also timed in a whole search (batches of 128), each at every
#: stage, to decide the search's default (``cuda_scoring.variant_for``)
SEARCH_VARIANTS = ("s64_wide", "j64_s64", "j64_s64_cells")
#: kernel variants timed alone on rotations clustered as in the search, with
#: and without rotation lanes (``_rl``: lane -> rotation while interpolating)
CLUSTERED_VARIANTS = (
    "s64", "s64_rl", "j64_s64", "j64_s64_rl", "s64_wide", "s64_wide_rl",
    "s64_cells", "s64_cells_rl", "j64_s64_cells",
)  # fmt: skip
#: the same for the 32-shift tiles, on the first 32 shifts (the search's
#: stages after the first score 32 shifts per particle at box 128 and 256)
CLUSTERED_VARIANTS_S32 = ("s32", "s32_rl", "s32_wide", "s32_wide_rl")


def counts(n: int, quick: bool) -> dict:
    """Particle counts of the measurements at box ``n`` (``QUICK`` for a dry run)."""
    if quick:
        return QUICK
    small = n <= 128
    return dict(
        score_gpu=256 if small else 96, score_cpu=2 if small else 1,
        search_gpu=512, search_cpu=8 if small else 4,
        search_batch=128, project_gpu=512, project_cpu=32, processes=(2, 4, 8),
        # the refine command's automatic batch on the GPU (512 up to box 256)
        processes_batch=auto_batch_size(n, gpu=True),
    )  # fmt: skip


def blob_volume(
    n: int, seed: int = 0, n_blobs: int = 40, sigma_px: float = 1.5
) -> np.ndarray:
    """Gaussian blobs in a sphere of radius 0.3 N (separable: fast at box 256)."""
    rng = np.random.default_rng(seed)
    ax = np.arange(n, dtype=np.float64) - n // 2
    vol = np.zeros((n, n, n), dtype=np.float32)
    placed = 0
    while placed < n_blobs:
        p = rng.uniform(-0.3 * n, 0.3 * n, 3)
        if np.linalg.norm(p) >= 0.3 * n:
            continue
        gx, gy, gz = (np.exp(-((ax - c) ** 2) / (2 * sigma_px**2)) for c in p)
        vol += (
            rng.uniform(0.5, 1.5) * gz[:, None, None] * gy[None, :, None] * gx
        ).astype(np.float32)
        placed += 1
    return vol


def particles(proj, m: int, rng, *, snr: float = 0.3, ctf_params: bool = False):
    """m noisy CTF-modulated images of the map at random poses (Fourier layout).

    Returns ``(images, ctf, inv_sigma2, rotations, origins)``; ``ctf_params``:
    the CTFs as their parameters (an ``engine.ctf.CtfBatch``, which
    ``np.asarray`` evaluates to the same values), as the refine command hands
    them to the GPU search.
    """
    n = proj.n
    a = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    o = rng.uniform(-2, 2, (m, 2))
    d = rng.uniform(8000, 20000, m)
    batch = CtfBatch(CtfParams(d, 0.97 * d, rng.uniform(0, 180, m)), n, 1.5, m)
    ctf = np.asarray(batch)
    clean = forward_model(proj, a, origins_px=o, ctf=ctf)
    sd = float(np.sqrt(np.mean(np.abs(clean) ** 2) / (n * n) / snr))
    x = clean + image_to_fourier(rng.normal(0, sd, (m, n, n)).astype(np.float32))
    inv_s2 = np.full((m, n // 2 + 1), 1.0 / (sd * sd * n * n))
    return x.astype(np.complex64), batch if ctf_params else ctf, inv_s2, a, o


def search_particles(proj, m: int, rng, *, ctf_params: bool = False):
    """``m`` particles (:func:`particles`) for a local search, with consensus poses
    off their true ones: rotations 3 deg away about random axes, origins 0.7 px
    further. Returns ``(images, ctf, inv_sigma2, consensus_rotations,
    consensus_origins_px)``."""
    x, ctf, inv_s2, a, o = particles(proj, m, rng, ctf_params=ctf_params)
    a_cons = np.einsum(
        "mij,mjk->mik", a, axis_angle_to_matrix(rng.normal(size=(m, 3)), 3.0)
    )
    return x, ctf, inv_s2, a_cons, o + 0.7


def stage_candidates(a, o, rng):
    """J_STAGE rotations within 10 deg and S_STAGE shifts within 3 px of each pose."""
    m = a.shape[0]
    axes = rng.normal(size=(m, J_STAGE, 3))
    delta = axis_angle_to_matrix(axes, rng.uniform(0, 10, (m, J_STAGE)))
    rots = np.einsum("mij,mnjk->mnik", a, delta)
    shifts = o[:, None, :] + rng.uniform(-3, 3, (m, S_STAGE, 2))
    return rots, shifts


def clustered_candidates(a, rng, parents: int = 64):
    """J_STAGE rotations as the search's stages form them: ``parents`` cells
    within 10 deg of each pose, each split into its 8 children 0.5 deg from its
    centre (rotation vectors, degrees), children of a parent next to each other."""
    m = a.shape[0]
    axes = rng.normal(size=(m, parents, 3))
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    centres = axes * rng.uniform(0, 10, (m, parents, 1))
    corners = 0.5 * np.array(
        [[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
    ) / np.sqrt(3)  # fmt: skip
    v = (centres[:, :, None, :] + corners).reshape(m, -1, 3)[:, :J_STAGE]
    angle = np.linalg.norm(v, axis=-1)
    delta = axis_angle_to_matrix(v / angle[..., None], angle)
    return np.einsum("mij,mnjk->mnik", a, delta)


def same_poses(rot_a, org_a, rot_b, org_b) -> str:
    """ "K of M": particles whose poses agree (rotation within 1e-3 deg, origin
    within 1e-3 px)."""
    same = (geodesic_angle_deg(rot_a, rot_b) < 1e-3) & np.all(
        np.abs(org_a - org_b) < 1e-3, axis=1
    )
    return f"{int(same.sum())} of {same.size}"


def timed(fn, repeat: int = 1):
    """Best wall time (s) of ``repeat`` calls (the GPU is synchronised by .get())."""
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def pinned_copy(a: np.ndarray) -> np.ndarray:
    """``a`` copied into page-locked host memory (``kernels/host_staging.py``), as
    the refine command's preparing threads write each batch's transforms."""
    from localrefine_plugin.kernels.host_staging import HostStaging

    out = HostStaging(a.nbytes, 1).lend(a.shape, a.dtype)
    out[...] = a
    return out


def _search_process(
    rank, device, n, r_max, data, kw, batch_size, repeat, barrier, queue, pinned=False
):
    """One of K processes sharing the GPU (as ``mpirun -np K`` ranks on one GPU).

    Builds its own projector (and, with ``device="cuda"``, its own CUDA
    context), searches its share of the particles ``repeat`` times, each
    start aligned with the other processes by ``barrier``, and puts
    ``(rank, [(start, stop), ...], rotations, origins)`` (``time.monotonic``,
    comparable across processes) on ``queue``. ``pinned``: the images are
    first copied into page-locked memory (:func:`pinned_copy`).
    """
    fns = {}
    x, c, s, a, o = data
    if device == "cuda":
        from localrefine_plugin.kernels import get_power_fn, get_score_fn
        from localrefine_plugin.kernels.backend import ensure_context

        ensure_context()
        fns = dict(score_fn=get_score_fn(), power_fn=get_power_fn())
        if pinned:
            x = pinned_copy(x)
    proj = FourierProjector(blob_volume(n), r_max_px=r_max + 1)
    args = dict(kw, **fns, batch_size=batch_size)
    local_search(
        proj, x[:2], c[:2], s[:2], consensus_rotations=a[:2],
        consensus_origins_px=o[:2], **args,
    )  # warm (compiles)  # fmt: skip
    spans = []
    for _ in range(repeat):
        barrier.wait()
        t0 = time.monotonic()
        found = local_search(
            proj, x, c, s, consensus_rotations=a, consensus_origins_px=o, **args
        )
        spans.append((t0, time.monotonic()))
    queue.put((rank, spans, found.rotations, found.origins_px))


def search_in_processes(
    k: int, device: str, n: int, r_max: int, data, kw, *, batch_size: int,
    repeat: int = 2, timeout_s: float = 300.0, whole: bool = False,
    pinned: bool = False,
):  # fmt: skip
    """Particles/s of K processes sharing the device, each searching a block.

    ``data = (images, ctf, inv_sigma2, consensus_rotations, consensus_origins)``
    for all M particles, dealt in contiguous blocks (as MPI ranks get them);
    with ``whole``, every process searches all M (K M particles in all: each
    process keeps its batch size whatever K, as ranks of a large data set
    do). ``kw``: the other ``local_search`` arguments. Rate: the particles
    searched over the span from the first start to the last stop, best of
    ``repeat``. ``pinned``: each process searches its images from page-locked
    memory (``device="cuda"``). Returns ``(rate, rotations, origins)``, the poses in particle
    order (with ``whole``, the K processes' in rank order). A process that
    does not report within ``timeout_s`` fails the measurement.
    """
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")  # a fresh process: its own CUDA context
    m = data[0].shape[0]
    bounds = np.linspace(0, m, k + 1).astype(int)
    blocks = [
        data if whole else tuple(d[bounds[r] : bounds[r + 1]] for d in data)
        for r in range(k)
    ]
    barrier, out = ctx.Barrier(k), ctx.Queue()
    procs = [
        ctx.Process(
            target=_search_process,
            args=(
                r,
                device,
                n,
                r_max,
                blocks[r],
                kw,
                batch_size,
                repeat,
                barrier,
                out,
                pinned,
            ),
        )
        for r in range(k)
    ]
    for p in procs:
        p.start()
    got: dict = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < k:
            try:
                rank, spans, rot, org = out.get(timeout=2.0)
            except queue_mod.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{k} search processes: {k - len(got)} did not report "
                        f"(exit codes of the failed ones: {failed}; limit "
                        f"{timeout_s:.0f} s)"
                    ) from None
                continue
            got[rank] = (spans, rot, org)
    finally:
        for p in procs:
            if len(got) < k:  # a failure: the others may wait at the barrier
                p.kill()
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{k} search processes: exit codes {bad}")
    searched = k * m if whole else m
    rate = max(
        searched
        / (max(got[r][0][i][1] for r in got) - min(got[r][0][i][0] for r in got))
        for i in range(repeat)
    )
    rot = np.concatenate([got[r][1] for r in range(k)])
    org = np.concatenate([got[r][2] for r in range(k)])
    return rate, rot, org


def upload_rates(n: int, cuda, m: int = 128) -> dict:
    """GB/s of host-to-device copies of ``m`` complex64 images at box ``n``:
    ``to_device`` from pageable memory (a device allocation each time, as the
    code uploads), and ``memcpy_htod`` from a reused page-locked buffer, with the
    host copy into that buffer timed apart. The page-locked figures only where
    the driver module has ``pagelocked_empty`` (not on the CPU emulator)."""
    from pycuda import gpuarray

    from localrefine_plugin.kernels.backend import to_device

    host = np.ones((m, n, n // 2 + 1), np.complex64)  # touched, contiguous
    gb = host.nbytes / 1e9

    def pageable():
        to_device(host, np.complex64)
        cuda.Context.synchronize()

    pageable()
    out = {"upload_pageable_gb_per_s": gb / timed(pageable, repeat=3)}
    if hasattr(cuda, "pagelocked_empty") and hasattr(cuda, "memcpy_htod"):
        pinned = cuda.pagelocked_empty(host.shape, host.dtype)
        dev = gpuarray.empty(host.shape, host.dtype)

        def from_pinned():
            cuda.memcpy_htod(dev.gpudata, pinned)
            cuda.Context.synchronize()

        out["upload_host_copy_gb_per_s"] = gb / timed(
            lambda: np.copyto(pinned, host), repeat=3
        )
        from_pinned()
        out["upload_pinned_gb_per_s"] = gb / timed(from_pinned, repeat=3)
    return out


def bench_box(n: int, quick: bool, peaks, log) -> dict:
    import pycuda.driver as cuda

    from localrefine_plugin.kernels import get_power_fn, get_score_fn
    from localrefine_plugin.kernels.backend import POOL_ENV, to_device
    from localrefine_plugin.kernels.cuda_backprojector import CudaBackProjector
    from localrefine_plugin.kernels.cuda_projector import (
        _project_cuda,
        cells_radius,
        device_cells,
        device_volume,
    )
    from localrefine_plugin.kernels.cuda_scoring import (
        LANES_ENV,
        SAMPLER_ENV,
        VARIANT_ENV,
        VARIANTS,
        WIDE_ENV,
        _power_cuda,
        _score_cuda,
        _ScoreLaunch,
        byte_count,
        flop_count,
    )

    rng = np.random.default_rng(n)
    r_max = round(0.4 * n)
    t0 = time.perf_counter()
    proj = FourierProjector(blob_volume(n), r_max_px=r_max + 1)
    log(
        f"box {n}: projector ready in {time.perf_counter() - t0:.1f} s (r_max {r_max} px)"
    )
    res: dict = {"box": n, "r_max_px": r_max, "J": J_STAGE, "S": S_STAGE}
    count = counts(n, quick)
    m_gpu, m_cpu = count["score_gpu"], count["score_cpu"]
    x, ctf, inv_s2, a, o = particles(proj, m_gpu, rng)
    rots, shifts = stage_candidates(a, o, rng)
    npix = half_plane_pixels(n, float(r_max))[0].size
    res["pixels"] = npix

    # -- pose scoring, end to end ------------------------------------------------------
    score_fn = get_score_fn()
    score_fn(
        proj, x[:2], ctf[:2], inv_s2[:2], rots[:2], shifts[:2], r_max_px=r_max
    )  # warm
    t_gpu = timed(
        lambda: _score_cuda(proj, x, ctf, inv_s2, rots, shifts, r_max_px=r_max),
        repeat=3,
    )
    t_cpu = timed(
        lambda: score_poses(
            proj, x[:m_cpu], ctf[:m_cpu], inv_s2[:m_cpu], rots[:m_cpu], shifts[:m_cpu],
            r_max_px=r_max,
        )
    )  # fmt: skip
    poses = J_STAGE * S_STAGE
    res["gpu_poses_per_s"] = m_gpu * poses / t_gpu
    res["cpu_poses_per_s"] = m_cpu * poses / t_cpu
    res["gpu_particles_scoring"], res["cpu_particles_scoring"] = m_gpu, m_cpu
    log(
        f"  scoring: GPU {res['gpu_poses_per_s']:.3g} poses/s ({m_gpu} particles), "
        f"CPU {res['cpu_poses_per_s']:.3g} poses/s ({m_cpu}), "
        f"ratio {res['gpu_poses_per_s'] / res['cpu_poses_per_s']:.0f}x"
    )

    # -- the kernels alone -------------------------------------------------------------
    start, stop = cuda.Event(), cuda.Event()

    def kernel_times(variants, candidates, stage_shifts=shifts) -> dict:
        """Median seconds of phase_table + score_tiles per variant (5 runs)."""
        out = {}
        for variant in variants:
            launch = _ScoreLaunch(
                proj, x, ctf, inv_s2, candidates, stage_shifts, None, float(r_max),
                variant,
            )  # fmt: skip
            launch.scores()  # warm: compiles, and builds the cells of a cells variant
            times = []
            for _ in range(5):
                start.record()
                launch.phase_table()
                launch.scores()
                stop.record()
                stop.synchronize()
                times.append(stop.time_since(start) * 1e-3)
            out[variant] = float(np.median(times))
            del launch
        return out

    tile_times = kernel_times(VARIANTS, rots)  # every variant on the same data
    res["kernel_s_by_variant"] = tile_times
    best = min(tile_times, key=tile_times.get)
    res["kernel_variant"] = best
    times = [tile_times[best]]
    t_k = float(np.median(times))
    flops = flop_count(m_gpu, J_STAGE, S_STAGE, npix)
    source = (  # what the fastest variant reads the slices from
        device_cells(proj, cells_radius(proj, r_max))
        if VARIANTS[best][3]
        else device_volume(proj)
    )
    nbytes = byte_count(m_gpu, J_STAGE, S_STAGE, npix, source.nbytes)
    nbytes += m_gpu * (
        8.0 * npix + 8.0 * S_STAGE * npix
    )  # phase_table: read Y, write Z
    res["kernel_s"] = t_k
    res["kernel_tflops"] = flops / t_k / 1e12
    res["kernel_tbps"] = nbytes / t_k / 1e12
    res["kernel_poses_per_s"] = m_gpu * poses / t_k
    if peaks:
        res["fp32_fraction"] = res["kernel_tflops"] / peaks[0]
        res["bandwidth_fraction"] = res["kernel_tbps"] / peaks[1]
        res["bound"] = (
            "compute (FP32)"
            if res["fp32_fraction"] >= res["bandwidth_fraction"]
            else "memory"
        )
    log(
        "  kernels alone ("
        + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in tile_times.items())
        + f"); fastest {best}: {t_k * 1e3:.2f} ms,"
        f" {res['kernel_tflops']:.2f} TFLOP/s"
        + (f" ({100 * res['fp32_fraction']:.1f}% of FP32 peak)" if peaks else "")
        + f", {res['kernel_tbps']:.3f} TB/s"
        + (
            f" ({100 * res['bandwidth_fraction']:.1f}% of bandwidth): {res['bound']}-bound"
            if peaks
            else ""
        )  # fmt: skip
    )

    # the same stage with the rotations clustered as the search's stages form
    # them (children of cells next to each other): what the rotation lanes
    # (the _rl variants) are for; same FLOP count
    rots_c = clustered_candidates(a, rng)
    for suffix, variants, n_shift in (
        ("clustered", CLUSTERED_VARIANTS, S_STAGE),
        ("clustered_s32", CLUSTERED_VARIANTS_S32, 32),
    ):
        times = kernel_times(variants, rots_c, shifts[:, :n_shift])
        fastest = min(times, key=times.get)
        tflops = flop_count(m_gpu, J_STAGE, n_shift, npix) / times[fastest] / 1e12
        res[f"kernel_s_by_variant_{suffix}"] = times
        res[f"kernel_variant_{suffix}"] = fastest
        res[f"kernel_tflops_{suffix}"] = tflops
        if peaks:
            res[f"fp32_fraction_{suffix}"] = tflops / peaks[0]
        log(
            f"  kernels alone, rotations clustered as in the search (64 cells x 8 "
            f"children), {n_shift} shifts ("
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items())
            + f"); fastest {fastest}: {times[fastest] * 1e3:.2f} ms, {tflops:.2f} TFLOP/s"
            + (f" ({100 * tflops / peaks[0]:.1f}% of FP32 peak)" if peaks else "")
        )

    # -- a whole local search (the search part of one iteration) -----------------------
    # --device cuda: the GPU score_fn binds each batch to the device (folded
    # weights once, grids reduced on the GPU); "per call": the same kernels
    # called stage by stage through the plain score_fn/power_fn interface
    # (weights folded and scores downloaded at every call), as before the
    # bound batches; the CPU path: engine score_poses.
    m_s_gpu, m_s_cpu, batch = (
        count["search_gpu"],
        count["search_cpu"],
        count["search_batch"],
    )
    xs, cs_params, ss, a_cons, o_cons = search_particles(
        proj, m_s_gpu, rng, ctf_params=True
    )
    cs = np.asarray(cs_params)  # the CTFs computed on the host, to be uploaded
    xs_pinned = pinned_copy(xs)
    kw = dict(
        consensus_rotations=a_cons, consensus_origins_px=o_cons,
        fulcrum_px=np.zeros(3), r_max_px=float(r_max),
    )  # fmt: skip
    power_fn = get_power_fn()
    # the search's knobs (environment variables the GPU path reads) and defaults
    knobs = {
        "sampler": (SAMPLER_ENV, "volume"), "variant": (VARIANT_ENV, ""),
        "lanes": (LANES_ENV, "pixels"), "wide": (WIDE_ENV, "0"), "pool": (POOL_ENV, "1"),
    }  # fmt: skip

    def set_knobs(**given) -> None:
        """Every knob set: the ``given`` values, the others at their defaults."""
        for key, (var, default) in knobs.items():
            os.environ[var] = given.get(key, default)

    def batch128(**given) -> dict:
        """A bound search in batches of 128 with the ``given`` knobs."""
        return dict(score_fn=score_fn, power_fn=power_fn, batch_size=batch, **given)

    configs = {
        "bound": dict(score_fn=score_fn, power_fn=power_fn, batch_size=m_s_gpu),
        "bound_batch128": batch128(),
        # the same, the scoring kernels reading the cells ($LOCALREFINE_SCORE_SAMPLER)
        "bound_batch128_cells": batch128(sampler="cells"),
        # rotation lanes: the _rl twins of s32 / s64 ($LOCALREFINE_SCORE_LANES);
        # 16-byte shared-memory reads: the _wide twins ($LOCALREFINE_SCORE_WIDE)
        "bound_batch128_rlanes": batch128(lanes="rotations"),
        "bound_batch128_wide": batch128(wide="1"),
        "bound_batch128_wide_rl": batch128(wide="1", lanes="rotations"),
        # device arrays allocated directly, without the memory pool
        # ($LOCALREFINE_GPU_POOL=0: every free waits for the GPU)
        "bound_batch128_nopool": batch128(pool="0"),
        # the CTFs' parameters, evaluated on the GPU (kernels/cuda_ctf.py), as
        # the refine command passes them, instead of uploading host values
        "bound_batch128_ctfparams": batch128(ctf_params=True),
        # the images in page-locked memory (kernels/host_staging.py: the refine
        # command's preparing threads write the transforms there), so their
        # upload needs no staging copy; alone, and with the CTFs' parameters
        # (the refine command's default)
        "bound_batch128_pinned": batch128(pinned=True),
        "bound_batch128_ctfparams_pinned": batch128(ctf_params=True, pinned=True),
        "per_call": dict(
            score_fn=lambda *a, **k: _score_cuda(*a, **k),  # no bind_batch
            power_fn=lambda *a, **k: _power_cuda(*a, **k),
            batch_size=m_s_gpu,
        ),
    }
    # the same with one kernel variant at every stage ($LOCALREFINE_SCORE_VARIANT;
    # SEARCH_VARIANTS, faster alone than the default s64 / s32): not in the
    # 10^6 estimate (report), which takes the supported configurations
    for v in SEARCH_VARIANTS:
        configs[f"variant_{v}"] = batch128(variant=v)
    found = {}
    warm = {k: (v[:4] if k.startswith("consensus") else v) for k, v in kw.items()}
    for key, cfg in configs.items():
        cfg = dict(cfg)
        set_knobs(**{k: cfg.pop(k) for k in knobs if k in cfg})
        ctf_in = cs_params if cfg.pop("ctf_params", False) else cs
        x_in = xs_pinned if cfg.pop("pinned", False) else xs
        local_search(proj, x_in[:4], ctf_in[:4], ss[:4], **warm, **cfg)  # warm

        def gpu_search(cfg=cfg, key=key, ctf_in=ctf_in, x_in=x_in):
            found[key] = local_search(proj, x_in, ctf_in, ss, **kw, **cfg)

        res[f"gpu_particles_per_s_{key}"] = m_s_gpu / timed(gpu_search, repeat=2)
    set_knobs()
    res["gpu_particles_per_s"] = res["gpu_particles_per_s_bound"]
    cells, volume = found["bound_batch128_cells"], found["bound_batch128"]
    res["cells_same_pose"] = same_poses(
        cells.rotations, cells.origins_px, volume.rotations, volume.origins_px
    )
    for v in SEARCH_VARIANTS:
        got = found[f"variant_{v}"]
        res[f"variant_{v}_same_pose"] = same_poses(
            got.rotations, got.origins_px, volume.rotations, volume.origins_px
        )
    for key in ("rlanes", "wide", "wide_rl", "nopool", "ctfparams", "pinned",
                "ctfparams_pinned"):  # fmt: skip
        got = found[f"bound_batch128_{key}"]
        res[f"{key}_same_pose"] = same_poses(
            got.rotations, got.origins_px, volume.rotations, volume.origins_px
        )
    profile = cProfile.Profile()
    profile.enable()
    local_search(proj, xs, cs, ss, **kw, **configs["bound"])
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(14)
    log(
        f"  where the GPU local search spends its time (box {n}, {m_s_gpu} particles, "
        "cProfile, by own time):"
    )
    log("\n".join("    " + line for line in text.getvalue().splitlines()[4:24]))
    # the same run by cumulative time of the search's steps: time in a grid
    # reduction or a download is mostly the wait for the kernels before it
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(
        r"search\.py|search_ops\.py|cell_tree\.py|cuda_scoring\.py", 16
    )
    log("  the same, by cumulative time (the search's steps and the batch ops):")
    log("\n".join("    " + line for line in text.getvalue().splitlines()[4:28]))
    sub = {k: (v[:m_s_cpu] if k.startswith("consensus") else v) for k, v in kw.items()}

    def cpu_search():
        found["cpu"] = local_search(
            proj, xs[:m_s_cpu], cs[:m_s_cpu], ss[:m_s_cpu], **sub
        )

    t_sc = timed(cpu_search)
    res["cpu_particles_per_s"] = m_s_cpu / t_sc
    res["poses_per_particle"] = float(np.mean(found["cpu"].n_evaluated))
    res["gpu_poses_per_particle"] = float(np.mean(found["bound"].n_evaluated))
    res["gpu_particles_search"], res["cpu_particles_search"] = m_s_gpu, m_s_cpu
    res["same_pose_as_cpu"] = same_poses(
        found["bound"].rotations[:m_s_cpu], found["bound"].origins_px[:m_s_cpu],
        found["cpu"].rotations, found["cpu"].origins_px,
    )  # fmt: skip
    cpu_rate = res["cpu_particles_per_s"]
    log(
        f"  local search: GPU {res['gpu_particles_per_s']:.4g} particles/s "
        f"({m_s_gpu} particles in one batch), CPU {cpu_rate:.3g} particles/s "
        f"({m_s_cpu}), ratio {res['gpu_particles_per_s'] / cpu_rate:.0f}x; "
        f"batches of 128: {res['gpu_particles_per_s_bound_batch128']:.4g} "
        f"({res['gpu_particles_per_s_bound_batch128'] / cpu_rate:.0f}x); per-call "
        f"scoring (no bound batch): {res['gpu_particles_per_s_per_call']:.4g} "
        f"({res['gpu_particles_per_s_per_call'] / cpu_rate:.0f}x); batches of 128 "
        f"reading cells: {res['gpu_particles_per_s_bound_batch128_cells']:.4g} "
        f"({res['gpu_particles_per_s_bound_batch128_cells'] / cpu_rate:.0f}x, same "
        f"pose as reading the volume for {res['cells_same_pose']}); "
        f"{res['poses_per_particle']:.0f} poses/particle (GPU "
        f"{res['gpu_poses_per_particle']:.0f}); same best pose as the CPU for "
        f"{res['same_pose_as_cpu']} particles"
    )
    log(
        "  local search, batches of 128: rotation lanes ($LOCALREFINE_SCORE_LANES="
        f"rotations) {res['gpu_particles_per_s_bound_batch128_rlanes']:.4g} particles/s "
        f"(same pose for {res['rlanes_same_pose']}); wide tiles ($LOCALREFINE_SCORE_"
        f"WIDE=1) {res['gpu_particles_per_s_bound_batch128_wide']:.4g} (same pose "
        f"for {res['wide_same_pose']}); both "
        f"{res['gpu_particles_per_s_bound_batch128_wide_rl']:.4g} (same pose for "
        f"{res['wide_rl_same_pose']}); without the memory pool "
        f"($LOCALREFINE_GPU_POOL=0) {res['gpu_particles_per_s_bound_batch128_nopool']:.4g}"
        f" (same pose for {res['nopool_same_pose']}); default "
        f"{res['gpu_particles_per_s_bound_batch128']:.4g}"
    )
    log(
        "  local search, batches of 128, the CTFs and images (default above: host "
        "CTFs uploaded, images in pageable memory): CTFs evaluated on the GPU from "
        f"their parameters {res['gpu_particles_per_s_bound_batch128_ctfparams']:.4g}"
        f" particles/s (same pose for {res['ctfparams_same_pose']}); images in "
        f"page-locked memory {res['gpu_particles_per_s_bound_batch128_pinned']:.4g} "
        f"(same pose for {res['pinned_same_pose']}); both, as the refine command "
        f"does {res['gpu_particles_per_s_bound_batch128_ctfparams_pinned']:.4g} "
        f"(same pose for {res['ctfparams_pinned_same_pose']})"
    )
    log(
        "  local search, batches of 128, one kernel variant at every stage "
        "($LOCALREFINE_SCORE_VARIANT): "
        + "; ".join(
            f"{v} {res[f'gpu_particles_per_s_variant_{v}']:.4g} particles/s (same pose "
            f"as the default kernels for {res[f'variant_{v}_same_pose']})"
            for v in SEARCH_VARIANTS
        )
    )

    # -- K processes sharing the GPU, as `mpirun -np K` ranks on one GPU ----------------
    # (each with its own CUDA context; the host work of one overlaps the
    # kernels of the others); each process searches all the particles above
    # in the refine command's automatic GPU batches (512 up to box 256), as
    # each rank of a large data set does whatever K
    # the CTFs and images as the fastest of the four ways (the refine command
    # evaluates the CTFs on the GPU unless $LOCALREFINE_GPU_CTF=host, and
    # stages the images in page-locked memory unless $LOCALREFINE_GPU_PINNED=0)
    ways = ("bound_batch128", "bound_batch128_ctfparams", "bound_batch128_pinned",
            "bound_batch128_ctfparams_pinned")  # fmt: skip
    way = configs[max(ways, key=lambda k: res[f"gpu_particles_per_s_{k}"])]
    ctf_way = "parameters" if way.get("ctf_params") else "values"
    pinned = bool(way.get("pinned"))
    res["processes_ctf"], res["processes_pinned"] = ctf_way, pinned
    data = (xs, cs_params if ctf_way == "parameters" else cs, ss, a_cons, o_cons)
    kw_p = dict(fulcrum_px=np.zeros(3), r_max_px=float(r_max))
    ref = found["bound_batch128"]
    sampler = (
        "cells"
        if res["gpu_particles_per_s_bound_batch128_cells"]
        > res["gpu_particles_per_s_bound_batch128"]
        else "volume"
    )
    # the fastest tiles of the search (lanes, wide; none of them read the cells)
    tiles = ("bound_batch128", "bound_batch128_rlanes", "bound_batch128_wide",
             "bound_batch128_wide_rl")  # fmt: skip
    fastest = max(tiles, key=lambda k: res[f"gpu_particles_per_s_{k}"])
    tile = configs[fastest] if sampler == "volume" else {}
    lanes, wide = (tile.get(k, knobs[k][1]) for k in ("lanes", "wide"))
    res["processes_sampler"], res["processes_lanes"] = sampler, lanes
    res["processes_wide"] = wide
    set_knobs(sampler=sampler, lanes=lanes, wide=wide)  # the processes inherit them
    p_batch = count.get("processes_batch", batch)
    res["processes_batch"] = p_batch
    for k in count["processes"]:
        try:  # a failure here is reported, and the rest of the benchmark still runs
            rate, rot_k, org_k = search_in_processes(
                k, "cuda", n, r_max, data, kw_p, batch_size=p_batch, timeout_s=120.0,
                whole=True, pinned=pinned,
            )  # fmt: skip
        except RuntimeError as exc:
            res[f"processes{k}_error"] = str(exc)
            log(f"  local search, {k} processes sharing the GPU: FAILED: {exc}")
            continue
        res[f"gpu_particles_per_s_processes{k}"] = rate
        res[f"processes{k}_same_pose"] = same_poses(
            rot_k,
            org_k,
            np.tile(ref.rotations, (k, 1, 1)),
            np.tile(ref.origins_px, (k, 1)),
        )
        log(
            f"  local search, {k} processes sharing the GPU (each all {m_s_gpu} "
            f"particles in batches of {p_batch}, reading the {sampler}, lanes -> {lanes}, "
            f"wide {wide}, CTF {ctf_way}, images {'page-locked' if pinned else 'pageable'}): "
            f"{rate:.4g} particles/s ({rate / cpu_rate:.0f}x the CPU); same pose as "
            f"one process for {res[f'processes{k}_same_pose']} particles"
        )
    set_knobs()

    # -- projection and back-projection -------------------------------------------------
    m_p = count["project_gpu"]
    ap = euler_to_matrix(*rng.uniform(-180, 180, (3, m_p)))
    _project_cuda(proj, ap[:4])
    t_pg = timed(lambda: _project_cuda(proj, ap), repeat=2)
    m_pc = count["project_cpu"]
    t_pc = timed(lambda: proj.project(ap[:m_pc]))
    res["gpu_projections_per_s"] = m_p / t_pg
    res["cpu_projections_per_s"] = m_pc / t_pc
    f_img = _project_cuda(proj, ap)
    ctf_p = ctf_2d(CtfParams(15000.0, 15000.0, 0.0), n, 1.5)
    for acc in ("float32", "float32x4", "float64"):
        bp = CudaBackProjector(n, accumulator=acc)
        bp.insert(f_img[:4], ap[:4], ctf=ctf_p)
        bp.flush()

        def run(bp=bp):
            bp.insert(f_img, ap, ctf=ctf_p)
            bp.synchronize()

        res[f"gpu_insert_{acc}_per_s"] = m_p / timed(run, repeat=2)
    # the gather scheme (one thread per voxel, no atomics; float32), uploading
    bp_g = CudaBackProjector(n, scheme="gather")
    bp_g.insert(f_img[:4], ap[:4], ctf=ctf_p)
    bp_g.flush()

    def run_gather(bp=bp_g):
        bp.insert(f_img, ap, ctf=ctf_p)
        bp.synchronize()

    res["gpu_insert_gather_per_s"] = m_p / timed(run_gather, repeat=2)
    # the uploads alone (images, and the CTF once per image as insert sends it)
    ctf_m = np.broadcast_to(np.asarray(ctf_p, dtype=np.float32), (m_p,) + ctf_p.shape)

    def uploads():
        to_device(f_img, np.complex64)
        to_device(ctf_m, np.float32)
        cuda.Context.synchronize()

    res["gpu_insert_upload_s"] = timed(uploads, repeat=2)
    # as the refine command inserts on the GPU: from the search's resident images
    # and CTFs, shifted on the device (CudaBatchOps.insert_at_poses), float32
    resident_ops = score_fn.bind_batch(
        proj, f_img, ctf_m, np.ones(n // 2 + 1), r_max_px=float(r_max)
    )
    origins = rng.uniform(-3, 3, (m_p, 2))
    bp = CudaBackProjector(n)

    def resident(bp=bp):
        resident_ops.insert_at_poses(bp, ap, origins)
        bp.synchronize()

    resident()
    res["gpu_insert_resident_per_s"] = m_p / timed(resident, repeat=2)
    bp_rg = CudaBackProjector(n, scheme="gather")

    def resident_gather(bp=bp_rg):
        resident_ops.insert_at_poses(bp, ap, origins)
        bp.synchronize()

    resident_gather()
    res["gpu_insert_resident_gather_per_s"] = m_p / timed(resident_gather, repeat=2)
    # the same insertions (3 runs each): the two schemes' accumulators agree
    res["gather_max_rel_diff"] = float(
        max(
            np.abs(bp_rg.data - bp.data).max() / np.abs(bp.data).max(),
            np.abs(bp_rg.weight - bp.weight).max() / bp.weight.max(),
        )
    )
    resident_ops.close()
    cpu_bp = BackProjector(n)
    res["cpu_insert_per_s"] = m_pc / timed(
        lambda: cpu_bp.insert(f_img[:m_pc], ap[:m_pc], ctf=ctf_p)
    )
    log(
        f"  projection: GPU {res['gpu_projections_per_s']:.3g} images/s, CPU "
        f"{res['cpu_projections_per_s']:.3g}; insertion: GPU float32 "
        f"{res['gpu_insert_float32_per_s']:.3g}, float32x4 "
        f"{res['gpu_insert_float32x4_per_s']:.3g}, float64 "
        f"{res['gpu_insert_float64_per_s']:.3g}, gather (one thread per voxel, no "
        f"atomics) {res['gpu_insert_gather_per_s']:.3g}, float32 from the search's "
        f"resident images, shifted on the GPU (as the refine command inserts) "
        f"{res['gpu_insert_resident_per_s']:.3g}, the same by the gather "
        f"{res['gpu_insert_resident_gather_per_s']:.3g} (accumulators equal to "
        f"{res['gather_max_rel_diff']:.1e} relative), CPU {res['cpu_insert_per_s']:.3g} "
        f"images/s (of the GPU's {m_p / res['gpu_insert_float32_per_s']:.3f} s for "
        f"{m_p} images, uploading images and CTFs takes {res['gpu_insert_upload_s']:.3f} s)"
    )

    # -- host-to-device copy rates: the uploads above are pageable copies of fresh
    #    arrays; a reused page-locked staging buffer is the alternative
    res.update(upload_rates(n, cuda))
    if "upload_pinned_gb_per_s" in res:
        log(
            f"  uploads of 128 images (complex64, box {n}): pageable (as the code "
            f"uploads) {res['upload_pageable_gb_per_s']:.2f} GB/s, from a page-locked "
            f"buffer {res['upload_pinned_gb_per_s']:.2f} GB/s (host copy into it "
            f"{res['upload_host_copy_gb_per_s']:.2f} GB/s)"
        )

    # -- the host's preparation of each particle in each pass (not in the rates above)
    real = rng.normal(size=(m_p, n, n)).astype(np.float32)
    d = rng.uniform(8000, 20000, m_p)
    params = CtfParams(d, 0.97 * d, rng.uniform(0, 180, m_p))
    t_fft = timed(lambda: image_to_fourier(real), repeat=2)
    t_ctf = timed(lambda: ctf_2d(params, n, 1.5), repeat=2)
    res["host_fft_ms_per_particle"] = 1e3 * t_fft / m_p
    res["host_ctf_ms_per_particle"] = 1e3 * t_ctf / m_p
    log(
        f"  host preparation per particle and pass (one core): image FFT "
        f"{res['host_fft_ms_per_particle']:.3f} ms, CTF {res['host_ctf_ms_per_particle']:.3f} ms"
    )
    return res


def report(results: dict, log) -> None:
    """The summary table and the 10^6-particle estimate (box 256) of ``results``;
    the estimate is also stored as ``results["million_particles_box256_s"]``."""
    log("\nbox | GPU poses/s | CPU poses/s | ratio | GPU particles/s | CPU particles/s | ratio "
        "| kernel TFLOP/s (FP32 %) | kernel TB/s (BW %)")  # fmt: skip
    for r in results["boxes"]:
        log(
            f"{r['box']} | {r['gpu_poses_per_s']:.3g} | {r['cpu_poses_per_s']:.3g} | "
            f"{r['gpu_poses_per_s'] / r['cpu_poses_per_s']:.0f}x | "
            f"{r['gpu_particles_per_s']:.3g} | {r['cpu_particles_per_s']:.3g} | "
            f"{r['gpu_particles_per_s'] / r['cpu_particles_per_s']:.0f}x | "
            f"{r['kernel_tflops']:.2f} ({100 * r.get('fp32_fraction', np.nan):.1f}%) | "
            f"{r['kernel_tbps']:.3f} ({100 * r.get('bandwidth_fraction', np.nan):.1f}%)"
        )
    for r in results["boxes"]:
        cpu = r["cpu_particles_per_s"]
        log(
            f"box {r['box']}: local search particles/s: GPU bound batch of "
            f"{r['gpu_particles_search']} {r['gpu_particles_per_s']:.4g} "
            f"({r['gpu_particles_per_s'] / cpu:.0f}x), batches of 128 "
            f"{r['gpu_particles_per_s_bound_batch128']:.4g} "
            f"({r['gpu_particles_per_s_bound_batch128'] / cpu:.0f}x), per-call "
            f"{r['gpu_particles_per_s_per_call']:.4g} "
            f"({r['gpu_particles_per_s_per_call'] / cpu:.0f}x), "
            + "".join(
                f"{k[len('gpu_particles_per_s_processes') :]} processes {v:.4g} "
                f"({v / cpu:.0f}x), "
                for k, v in r.items()
                if k.startswith("gpu_particles_per_s_processes")
            )
            + f"CPU {cpu:.3g}; same pose as the CPU for {r['same_pose_as_cpu']}"
        )
    big = [r for r in results["boxes"] if r["box"] == 256]
    if big:
        r = big[0]
        rates = {  # the supported configurations: one process, K ranks on one GPU
            k: v
            for k, v in r.items()
            if k.startswith(
                ("gpu_particles_per_s_bound", "gpu_particles_per_s_processes")
            )
        }
        best = max(rates, key=rates.get)
        t_search = 1e6 / rates[best]
        log(f"\n(search rate used below: {best}, {rates[best]:.4g} particles/s)")
        # the refine command inserts from the search's resident images (float32),
        # by atomics (its default) or by the gather, whichever was faster
        scheme = max(
            ("atomic", "gather"),
            key=lambda k: r[
                "gpu_insert_resident_per_s"
                if k == "atomic"
                else "gpu_insert_resident_gather_per_s"
            ],
        )
        key = "gpu_insert_resident_per_s" if scheme == "atomic" else (
            "gpu_insert_resident_gather_per_s"
        )  # fmt: skip
        log(
            "(insertion rate used below: from the search's resident images, float32, "
            f"{scheme} scheme)"
        )
        t_insert = 1e6 / r[key]
        results["million_particles_box256_s"] = t_search + t_insert
        log(
            f"\n10^6 particles at box 256, one iteration on this GPU (from the rates above): "
            f"search {t_search / 60:.1f} min + insertion {t_insert / 60:.1f} min = "
            f"{(t_search + t_insert) / 60:.1f} min (image reading not included)"
        )
        # an iteration transforms every image once in the alignment pass (which
        # also inserts; its CTFs are evaluated on the GPU unless
        # $LOCALREFINE_GPU_CTF=host), plus the noise pass's particles with their
        # CTFs on the host: at most RefineOptions.noise_particles per optics
        # group (one group here)
        fft_ms, ctf_ms = r["host_fft_ms_per_particle"], r["host_ctf_ms_per_particle"]
        ctf_on_gpu = device_ctf_enabled()
        n_noise = min(1e6, RefineOptions().noise_particles or 1e6)
        prep = (1e6 * (fft_ms + (0 if ctf_on_gpu else ctf_ms))
                + n_noise * (fft_ms + ctf_ms)) / 1e3  # fmt: skip
        cores = os.cpu_count() or 1
        results["million_particles_box256_host_prep_core_s"] = prep
        ctf_where = (
            "the noise pass only: the alignment pass evaluates them on the GPU"
            if ctf_on_gpu
            else "10^6 images"
        )
        log(
            f"plus the host's image FFTs (10^6 images) and CTFs ({ctf_where}; "
            f"{n_noise:.0f} images again for the noise): {prep / 60:.1f} "
            f"core-minutes, {prep / 60 / cores:.1f} min on this machine's {cores} cores "
            f"(ranks prepare their particles while others use the GPU)"
        )


def main() -> int:
    from localrefine_plugin.kernels.backend import (
        cuda_available,
        device_name,
        ensure_context,
    )

    ok, reason = cuda_available()
    if not ok:
        print(f"bench_gpu: no GPU: {reason}", file=sys.stderr)
        return 2
    ensure_context()
    name = device_name()
    peaks = None
    if ARGS.peak_tflops and ARGS.peak_tbps:
        peaks = (ARGS.peak_tflops, ARGS.peak_tbps)
    else:
        for key, tf, tb in PEAKS:
            if key in name:
                peaks = (tf, tb)
                break

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"GPU: {name}; peaks used: {peaks} (FP32 TFLOP/s, TB/s); CPU path: "
        f"{ARGS.cpu_threads} threads; numpy {np.__version__}")  # fmt: skip
    results = {"gpu": name, "peaks": peaks, "cpu_threads": ARGS.cpu_threads,
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "boxes": []}  # fmt: skip

    def save() -> None:  # after each box too: a run stopped by a timeout keeps those
        if ARGS.json:
            tmp = ARGS.json + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(results, fh, indent=1)
            os.replace(tmp, ARGS.json)

    for n in ARGS.boxes:
        results["boxes"].append(bench_box(n, ARGS.quick, peaks, log))
        save()
    report(results, log)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
