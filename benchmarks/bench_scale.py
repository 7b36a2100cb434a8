"""Scale: one refinement iteration over a 100,000-particle stack, 1 and 2 processes.

Usage::

    python benchmarks/bench_scale.py                       # 100,000 particles, box 128
    python benchmarks/bench_scale.py --n-particles 20000 --keep --workdir /data/bench

What it does:

1. Checks the free disk space, then writes ``n`` particles of box 128 (float32,
   6.5 GB for 100,000) as ``--stacks`` MRC stacks with
   :class:`~localrefine_plugin.engine.mrc_io.StackWriter`, in batches: a few
   hundred distinct simulated projections (CTF, small shifts) of a smooth map,
   cycled, each copy with fresh Gaussian noise (SNR 0.1). The STAR file holds
   the true poses as consensus poses; half sets alternate.
2. Runs ``localrefine refine`` on it with 1 process, then with
   ``mpirun -np 2``, with the same options: the first alignment is already at
   Nyquist (``--initial-lowpass`` = 2 pixels) and ``--max-iterations 1``, so the
   run is exactly one iteration; a narrow search (``--rotation-extent``,
   ``--alignment-resolution``, ``--shift-extent`` below) keeps it feasible on
   2 CPU cores. One run streams the whole stack once (the alignment, which
   also back-projects) and, for the initial and the iteration's noise
   estimates, at most ``--noise-particles`` (default 20,000) particles twice.
   (Until the sixth session of 2026-11-28 it streamed the whole stack four
   times: initial noise, alignment, back-projection, noise.)
3. Prints, side by side: wall time, particles per second (``n`` / wall time of
   the whole command, start-up and outputs included) and memory:

   * ``maxrss_sum``: ``/usr/bin/time -v`` maximum resident set size of every
     rank, summed over ranks (an upper bound: peaks of different ranks need
     not coincide);
   * ``tree_peak``: the largest sum of VmRSS over the whole process tree,
     sampled every 0.2 s (``mpirun`` included), with its anonymous part (``anon``, heap: maps,
     accumulators, batches) and file-backed part (``file``: pages of the
     memory-mapped stacks still mapped).

``--particles-per-run M`` times the runs on the first ``M`` particles only
(same stacks); memory is then that of ``M`` particles. The stack is deleted at
the end unless ``--keep``. The machine's load average is printed: other work
on the machine slows every run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from localrefine_plugin.engine import mrc_io
from localrefine_plugin.engine.ctf import CtfParams, ctf_2d
from localrefine_plugin.engine.fourier import fourier_to_image
from localrefine_plugin.engine.geometry import euler_to_matrix
from localrefine_plugin.engine.masks import create_soft_mask
from localrefine_plugin.engine.particles import (
    make_particles,
    read_particles,
    write_particles,
)
from localrefine_plugin.engine.projector import FourierProjector, forward_model
from localrefine_plugin.engine.refine_options import RefineOptions

PIXEL_A = 1.5
LAUNCH = "import sys; from localrefine_plugin.cli import entry_point; sys.exit(entry_point())"
SEARCH = [
    "--rotation-extent", "1", "--alignment-resolution", "1",
    "--shift-extent", "0.5", "--shift-resolution", "0.5",
    "--max-iterations", "1", "--batch-size", "256", "--threads", "1",
]  # fmt: skip
GIB = 2**30


def smooth_map(n: int, seed: int = 0) -> np.ndarray:
    """Low-passed noise inside a sphere of radius 0.3 N (float32, positive mean)."""
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.normal(size=(n, n, n)), 2.0)
    z, y, x = np.ogrid[:n, :n, :n]
    c = n // 2
    vol = np.maximum(vol, 0) * (
        ((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2) < (0.3 * n) ** 2
    )
    return vol.astype(np.float32)


@contextlib.contextmanager
def scratch_folder(given: str | None, prefix: str):
    """The folder ``given`` (made if missing, kept), or a temporary one removed
    on leaving: where a benchmark writes its data."""
    folder = Path(given or tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        if not given:
            shutil.rmtree(folder, ignore_errors=True)


def write_dataset(
    folder: Path, *, n: int, box: int, distinct: int, stacks: int, seed: int
):
    """Write the map, mask, stacks and STAR file; return (star, reference, mask)."""
    rng = np.random.default_rng(seed)
    vol = smooth_map(box, seed)
    reference, mask_path = folder / "reference.mrc", folder / "mask.mrc"
    mrc_io.write_map(reference, vol, PIXEL_A)
    mask = create_soft_mask(
        vol, PIXEL_A, threshold=0.2 * vol.max(), extend_a=3, soft_edge_a=6
    )
    mrc_io.write_map(mask_path, mask, PIXEL_A)
    # a few hundred distinct clean images: poses, shifts and CTFs of templates
    rot, tilt, psi = (
        rng.uniform(0, 360, distinct),
        rng.uniform(0, 180, distinct),
        rng.uniform(0, 360, distinct),
    )
    origins = rng.uniform(-1.5, 1.5, (distinct, 2))
    defocus = rng.uniform(8000, 25000, distinct)
    ctf = CtfParams(
        defocus_u_a=defocus,
        defocus_v_a=defocus * 0.98,
        defocus_angle_deg=rng.uniform(0, 180, distinct),
    )
    clean = fourier_to_image(
        forward_model(
            FourierProjector(vol),
            euler_to_matrix(rot, tilt, psi),
            origins_px=origins,
            ctf=ctf_2d(ctf, box, PIXEL_A),
        ),
        box,
    ).astype(np.float32)  # (distinct, N, N)
    noise_sd = float(np.sqrt(clean.var() / 0.1))
    template = np.arange(n) % distinct
    per_stack = -(-n // stacks)
    refs = []
    for s in range(stacks):
        lo, hi = s * per_stack, min(n, (s + 1) * per_stack)
        path = folder / f"particles_{s:03d}.mrcs"
        with mrc_io.StackWriter(path, hi - lo, box, PIXEL_A) as writer:
            for start in range(lo, hi, 1000):
                stop = min(hi, start + 1000)
                noise = rng.standard_normal((stop - start, box, box), dtype=np.float32)
                writer.write(start - lo, clean[template[start:stop]] + noise_sd * noise)
        refs.extend((path, i) for i in range(hi - lo))
    t = template
    parts = make_particles(
        image_refs=refs,
        rot_deg=rot[t],
        tilt_deg=tilt[t],
        psi_deg=psi[t],
        origin_px=origins[t],
        ctf=CtfParams(
            defocus_u_a=ctf.defocus_u_a[t],
            defocus_v_a=ctf.defocus_v_a[t],
            defocus_angle_deg=ctf.defocus_angle_deg[t],
        ),
        pixel_size_a=PIXEL_A,
        box=box,
        random_subset=np.arange(n) % 2 + 1,
    )
    star = folder / "particles.star"
    write_particles(star, parts)
    return star, reference, mask_path, parts


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo.extend(
                int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()
            )
        except OSError:
            pass
    return out


def _rss_kib(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident KiB of one process (0, 0 when gone)."""
    anon = file = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith(("RssFile:", "RssShmem:")):
                file += int(line.split()[1])
    except OSError:
        pass
    return anon, file


def run_measured(command: list[str], time_limit_s: float | None = None) -> dict:
    """Run ``command``; wall time, summed /usr/bin/time max RSS, sampled tree peak.

    After ``time_limit_s`` the command's process group is terminated and the
    result is marked incomplete (memory figures then cover the part that ran).
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    peak = {"total": 0, "anon": 0, "file": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            sizes = [_rss_kib(p) for p in _descendants(proc.pid)]
            anon, file = sum(a for a, _ in sizes), sum(f for _, f in sizes)
            if anon + file > peak["total"]:
                peak.update(total=anon + file, anon=anon, file=file)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    complete = True
    try:
        _, err = proc.communicate(timeout=time_limit_s)
    except subprocess.TimeoutExpired:
        complete = False
        os.killpg(proc.pid, signal.SIGTERM)  # our own process group only
        _, err = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.monotonic() - t0
    if complete and proc.returncode != 0:
        sys.stderr.write(err[-5000:])
        raise SystemExit(
            f"command failed ({proc.returncode}): {' '.join(command[:6])} ..."
        )
    maxrss = [
        int(line.split(":")[1])
        for line in err.splitlines()
        if "Maximum resident set size" in line
    ]
    return {"wall_s": wall, "maxrss_kib": maxrss, "peak": peak, "complete": complete}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-particles", type=int, default=100_000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument(
        "--distinct",
        type=int,
        default=300,
        help="distinct clean images (default: %(default)s)",
    )
    parser.add_argument(
        "--stacks",
        type=int,
        default=10,
        help="stacks the particles are written to (default: %(default)s)",
    )
    parser.add_argument(
        "--particles-per-run",
        type=int,
        default=None,
        help="time the runs on the first M particles (default: all)",
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder for the data (default: a temporary one)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument(
        "--generate-only",
        action="store_true",
        help="write the data into --workdir and stop (a later run with the same "
        "--workdir, --n-particles and --box reuses them)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="stop each run after S seconds (memory figures then cover the part that "
        "ran; no rate is printed)",
    )
    args = parser.parse_args(argv)

    time_bin, mpirun = shutil.which("time") or "/usr/bin/time", shutil.which("mpirun")
    if not Path(time_bin).exists():
        raise SystemExit("/usr/bin/time is needed (apt-get install time)")
    if max(args.processes) > 1 and mpirun is None:
        raise SystemExit(
            "mpirun is needed for more than one process (apt-get install openmpi-bin)"
        )
    # Open MPI refuses to start as root (containers, CI) without these
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    workdir = args.workdir or Path(
        tempfile.mkdtemp(prefix="bench_scale_", dir=os.environ.get("TMPDIR", "/tmp"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    keep = args.keep or args.generate_only
    try:
        star, reference, mask = (
            workdir / "particles.star", workdir / "reference.mrc", workdir / "mask.mrc"
        )  # fmt: skip
        parts = read_particles(star) if star.is_file() else None
        wanted = (args.n_particles, args.box)
        if parts is not None and (parts.n, parts.box) == wanted:
            print(f"reusing the {parts.n} particles of box {parts.box} in {workdir}")
        else:
            need = args.n_particles * args.box * args.box * 4 + (1 << 20) * 200
            free = shutil.disk_usage(workdir).free
            print(
                f"data: {args.n_particles} particles, box {args.box}: "
                f"{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free in {workdir}"
            )
            if free < 1.2 * need:
                raise SystemExit(
                    "not enough free disk space; use --workdir elsewhere or fewer "
                    "--n-particles"
                )
            t0 = time.monotonic()
            star, reference, mask, parts = write_dataset(
                workdir,
                n=args.n_particles,
                box=args.box,
                distinct=args.distinct,
                stacks=args.stacks,
                seed=0,
            )
            print(f"generated in {time.monotonic() - t0:.0f} s ({args.stacks} stacks)")
        if args.generate_only:
            return 0
        m = args.particles_per_run or args.n_particles
        if m < args.n_particles:
            star = workdir / f"particles_first{m}.star"
            write_particles(star, parts.subset(np.arange(m)))
        del parts
        load_before = os.getloadavg()
        results = {}
        for k in args.processes:
            out = workdir / f"refine_np{k}"
            shutil.rmtree(out, ignore_errors=True)
            refine = [
                sys.executable, "-c", LAUNCH, "refine", "--particles", str(star),
                "--reference", str(reference), "--mask", str(mask), "--output", str(out),
                "--initial-lowpass", str(2 * PIXEL_A), *SEARCH,
            ]  # fmt: skip
            cmd = [time_bin, "-v", *refine]
            if k > 1:
                # one /usr/bin/time per rank; mpirun itself is in the sampled tree
                cmd = [mpirun, "--oversubscribe", "-np", str(k), *cmd]
            print(f"running {k} process(es) on {m} particles ...", flush=True)
            results[k] = run_measured(cmd, args.time_limit)
            log_lines = (out / "refine.log").read_text().splitlines()
            results[k]["last_log"] = log_lines[-1] if log_lines else "(empty log)"
        after = " ".join(f"{v:.1f}" for v in os.getloadavg())
        before = " ".join(f"{v:.1f}" for v in load_before)
        print(f"\nload average before the runs: {before}; after: {after}")
        print(
            "one iteration (alignment at Nyquist with back-projection, noise from "
            f"at most {RefineOptions().noise_particles} particles) over "
            f"{m} particles, box {args.box}:"
        )
        print(
            f"{'processes':>10} {'wall s':>8} {'particles/s':>12} {'maxrss_sum GiB':>15} "
            f"{'per process GiB':>22} {'tree_peak GiB':>14} {'anon GiB':>9} {'file GiB':>9}"
        )
        for k, r in results.items():
            per = " ".join(f"{v / 2**20:.2f}" for v in r["maxrss_kib"])
            pk, total = r["peak"], sum(r["maxrss_kib"]) / 2**20
            rate = f"{m / r['wall_s']:.1f}" if r["complete"] else "stopped"
            print(
                f"{k:>10} {r['wall_s']:>8.0f} {rate:>12} {total:>15.2f} "
                f"{per:>22} {pk['total'] / 2**20:>14.2f} {pk['anon'] / 2**20:>9.2f} "
                f"{pk['file'] / 2**20:>9.2f}"
            )
        for k, r in results.items():
            print(f"{k} process(es), last log line: {r['last_log']}")
        worst = (
            max(max(sum(r["maxrss_kib"]), r["peak"]["total"]) for r in results.values())
            / 2**20
        )
        verdict = "under" if worst < 4 else "OVER"
        print(
            f"peak memory (worst run, larger of both figures): {worst:.2f} GiB: {verdict} 4 GiB"
        )
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"removed {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
