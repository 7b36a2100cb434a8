"""Projection and back-projection throughput: our NumPy engine against RELION 3.1.

Usage::

    python benchmarks/bench_projection.py                  # box 128 and 256
    python benchmarks/bench_projection.py --boxes 128 --counts 1000

For each box the same work is timed on both sides: ``m`` projections of one
map at the same random poses (no CTF, no shifts), then the back-projection
of those ``m`` images (RELION's own projections) into one reconstruction.

* ``setup`` is the fixed cost (our: building the padded Fourier volume, or the
  final reconstruction; RELION: a run with one image).
* ``rate`` is the marginal throughput in images per second, excluding setup
  (RELION: ``(m - 1) / (t_m - t_1)`` from a run with ``m`` images and a run
  with one).
* ``total`` is the wall time for all ``m`` images including setup.

``relion_reconstruct`` runs with ``--skip_gridding`` unless
``--relion-gridding`` is given: our reconstruction divides by the weights
directly, as RELION does with that flag; RELION's default 10 iterations of
gridding correction take ~650 s for a single image at box 256 on a 2-core
machine. The machine's load average is printed: other work on the machine
slows both sides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
from scipy import ndimage

from localrefine_plugin.engine.backprojector import BackProjector
from localrefine_plugin.engine.fourier import image_to_fourier
from localrefine_plugin.engine.geometry import euler_to_matrix
from localrefine_plugin.engine.projector import FourierProjector

PIXEL_A = 1.5
DEFAULT_COUNTS = {128: 1000, 256: 200}


def smooth_map(n: int, seed: int = 0) -> np.ndarray:
    """Low-passed noise inside a sphere of radius 0.35 N: a quick test map."""
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.normal(size=(n, n, n)).astype(np.float32), 1.5)
    z, y, x = np.ogrid[:n, :n, :n]
    c = n // 2
    vol *= ((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2) < (0.35 * n) ** 2
    return vol


def random_angles(m: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rot, psi = rng.uniform(-180, 180, (2, m))
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, m)))
    return np.stack([rot, tilt, psi], axis=1)


def write_star(path: Path, n: int, angles: np.ndarray, image_names=None) -> None:
    """RELION 3.1 STAR: one optics group, angles, zero origins, image names."""
    lines = [
        "# version 30001", "", "data_optics", "", "loop_",
        "_rlnOpticsGroup #1", "_rlnOpticsGroupName #2", "_rlnAmplitudeContrast #3",
        "_rlnSphericalAberration #4", "_rlnVoltage #5", "_rlnImagePixelSize #6",
        "_rlnImageSize #7", "_rlnImageDimensionality #8",
        f"1 opticsGroup1 0.1 2.7 300 {PIXEL_A} {n} 2", "",
        "# version 30001", "", "data_particles", "", "loop_",
        "_rlnAngleRot #1", "_rlnAngleTilt #2", "_rlnAnglePsi #3",
        "_rlnOriginXAngst #4", "_rlnOriginYAngst #5", "_rlnOpticsGroup #6",
    ]  # fmt: skip
    if image_names is not None:
        lines.append("_rlnImageName #7")
    for i, (rot, tilt, psi) in enumerate(angles):
        row = f"{rot:.6f} {tilt:.6f} {psi:.6f} 0 0 1"
        lines.append(row + (f" {image_names[i]}" if image_names is not None else ""))
    path.write_text("\n".join(lines) + "\n")


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def relion_row(m: int, t1: float, tm: float) -> dict:
    """Setup, marginal rate and total from runs with one and ``m`` images.

    When ``tm - t1`` is under 5 % of ``tm`` (timing noise), the rate is only
    bounded from below: ``bound`` is True and ``rate`` is that bound.
    """
    dt = tm - t1
    bound = dt < 0.05 * tm
    rate = (m - 1) / (0.05 * tm if bound else dt)
    return {"setup": t1, "rate": rate, "total": tm, "bound": bound}


def bench_box(n: int, m: int, work: Path, relion_gridding: bool) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    vol = smooth_map(n)
    angles = random_angles(m)
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    with mrcfile.new(work / "map.mrc", overwrite=True) as mrc:
        mrc.set_data(vol)
        mrc.voxel_size = PIXEL_A
    write_star(work / "angles_one.star", n, angles[:1])
    write_star(work / "angles_all.star", n, angles)

    # ours: projection
    t0 = time.perf_counter()
    projector = FourierProjector(vol)
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    projector.project(rotations)
    t_work = time.perf_counter() - t0
    ours_p = {"setup": t_setup, "rate": m / t_work, "total": t_setup + t_work}
    del projector

    # RELION: projection (one image, then m)
    project = ["relion_project", "--i", "map.mrc", "--ang"]
    t1 = timed(project + ["angles_one.star", "--o", "one"], work)
    tm = timed(project + ["angles_all.star", "--o", "all"], work)  # all.mrcs, all.star
    relion_p = relion_row(m, t1, tm)

    # ours: back-projection of RELION's images, then the reconstruction
    images = mrcfile.mmap(work / "all.mrcs", mode="r").data
    t0 = time.perf_counter()
    bp = BackProjector(n)
    for start in range(0, m, 256):
        f = image_to_fourier(np.asarray(images[start : start + 256], dtype=np.float32))
        bp.insert(f, rotations[start : start + 256])
    t_work = time.perf_counter() - t0
    t0 = time.perf_counter()
    bp.reconstruct()
    t_setup = time.perf_counter() - t0
    ours_b = {"setup": t_setup, "rate": m / t_work, "total": t_setup + t_work}
    del bp

    # RELION: reconstruction from one image, then from m
    write_star(work / "one_img.star", n, angles[:1], ["000001@all.mrcs"])
    recon = ["relion_reconstruct", "--i"]
    extra = [] if relion_gridding else ["--skip_gridding"]
    t1 = timed(recon + ["one_img.star", "--o", "one_rec.mrc", *extra], work)
    tm = timed(recon + ["all.star", "--o", "all_rec.mrc", *extra], work)
    relion_b = relion_row(m, t1, tm)
    return [
        {"box": n, "m": m, "task": "project", "ours": ours_p, "relion": relion_p},
        {"box": n, "m": m, "task": "back-project", "ours": ours_b, "relion": relion_b},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    parser.add_argument(
        "--counts", type=int, nargs="+", default=None,
        help="images per box (default: 1000 at 128, 200 at 256)",
    )  # fmt: skip
    parser.add_argument("--relion-gridding", action="store_true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    if shutil.which("relion_project") is None:
        parser.error("RELION is not on PATH (relion_project)")
    counts = args.counts or [DEFAULT_COUNTS.get(n, 200) for n in args.boxes]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_projection_"))
    print(
        f"cores: {os.cpu_count()}, load average at start: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"relion_reconstruct {'default gridding' if args.relion_gridding else '--skip_gridding'}"
    )
    t_start = time.perf_counter()
    rows = []
    for n, m in zip(args.boxes, counts, strict=True):
        rows += bench_box(n, m, root / f"box{n}", args.relion_gridding)
    header = (
        f"{'box':>4} {'images':>6} {'task':<13}"
        f"{'ours setup s':>13}{'ours img/s':>11}{'ours total s':>13}"
        f"{'RELION setup s':>15}{'RELION img/s':>13}{'RELION total s':>15}"
        f"{'rate ratio':>11}{'total ratio':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        o, x = r["ours"], r["relion"]
        bound = ">" if x.get("bound") else ""
        relion_rate = bound + f"{x['rate']:.1f}"
        ratio = ("<" if bound else "") + f"{o['rate'] / x['rate']:.2f}"
        print(
            f"{r['box']:>4} {r['m']:>6} {r['task']:<13}"
            f"{o['setup']:>13.2f}{o['rate']:>11.1f}{o['total']:>13.2f}"
            f"{x['setup']:>15.2f}{relion_rate:>13}{x['total']:>15.2f}"
            f"{ratio:>11}{x['total'] / o['total']:>12.2f}"
        )
    print(
        "rate ratio = ours img/s / RELION img/s (marginal); total ratio = RELION "
        f"total / ours total (> 1: ours faster). Whole run {time.perf_counter() - t_start:.0f} s."
    )
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
