"""K processes searching on one GPU: particles per second against one process.

``mpirun -np K`` ranks sharing one GPU each hold a CUDA context. Without the
Multi-Process Service (MPS) the GPU time-slices between contexts, so the
kernels of one rank never run beside another's; the seventh session's H200
run found 2 processes 1.5 times as fast as one at box 256, and 4 and 8
slower than 2. Under MPS the ranks' kernels share the GPU at once.
``benchmarks/gpu_check.sh`` runs this script with an MPS control daemon of
its own where ``nvidia-cuda-mps-control`` exists (step ``mps``), to measure
what MPS changes.

Each process searches all M particles (``bench_gpu.search_particles``, the
search's defaults: 10 deg, 3 px, 0.5 deg, radius 0.4 N) in batches of 128,
as a rank of a large data set does (``bench_gpu.search_in_processes`` with
``whole``), with the CTFs as parameters and the images in page-locked
memory, as the refine command searches; K = 1 is one such process under the
same conditions. Prints one line per K and writes JSON (``--json``)::

    python benchmarks/bench_processes.py --box 256 --processes 1 2 4 8 --label MPS
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gpu  # noqa: E402

from localrefine_plugin.engine.projector import FourierProjector  # noqa: E402


def measure(
    box: int, processes: list[int], *, particles: int, batch: int, device: str,
    log=print, timeout_s: float = 120.0, search_kw: dict | None = None,
) -> dict:  # fmt: skip
    """Particles/s of each K in ``processes`` (each process all ``particles``).

    ``search_kw``: extra ``local_search`` arguments (smaller searches in the
    tests). Returns ``{"box", "particles", "rates": {K: particles/s},
    "same_pose": {K: "a of b"}, "errors": {K: message}}``; the poses of every
    process of every K are compared with those of the first process measured.
    """
    r_max = round(0.4 * box)
    proj = FourierProjector(bench_gpu.blob_volume(box), r_max_px=r_max + 1)
    rng = np.random.default_rng(0)
    data = bench_gpu.search_particles(proj, particles, rng, ctf_params=True)
    kw = dict(fulcrum_px=np.zeros(3), r_max_px=float(r_max), **(search_kw or {}))
    out: dict = {"box": box, "particles": particles, "rates": {}, "same_pose": {},
                 "errors": {}}  # fmt: skip
    first = None
    for k in processes:
        try:
            rate, rot, org = bench_gpu.search_in_processes(
                k, device, box, r_max, data, kw, batch_size=batch,
                timeout_s=timeout_s, whole=True, pinned=device == "cuda",
            )  # fmt: skip
        except RuntimeError as exc:
            out["errors"][k] = str(exc)
            log(f"box {box}, {k} processes: FAILED: {exc}")
            continue
        if first is None:  # the first process's poses
            first = (rot[:particles], org[:particles])
        out["rates"][k] = rate
        # every process's poses (in rank order) against the first's
        out["same_pose"][k] = bench_gpu.same_poses(
            rot, org, np.tile(first[0], (k, 1, 1)), np.tile(first[1], (k, 1))
        )
        base = out["rates"].get(processes[0])
        ratio = f", {rate / base:.2f}x {processes[0]} process(es)" if base else ""
        log(
            f"box {box}, {k} processes (each all {particles} particles in batches "
            f"of {batch}): {rate:.4g} particles/s{ratio}; same pose as the first "
            f"process measured for {out['same_pose'][k]}"
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--particles", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--label", default="", help="printed with the results, e.g. MPS")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.label:
        print(f"K processes on one GPU: {args.label}", flush=True)
    res = measure(
        args.box, args.processes, particles=args.particles, batch=args.batch,
        device=args.device, log=lambda msg: print(msg, flush=True),
    )  # fmt: skip
    res["label"] = args.label
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(tmp, args.json)
    return 0 if res["rates"] else 1


if __name__ == "__main__":
    sys.exit(main())
