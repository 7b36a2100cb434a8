"""Reconstruct half maps and the full map from particles with poses (RELION STAR).

Example usage:

  localrefine reconstruct --particles run_data.star --output recon/
  localrefine reconstruct --particles run_data.star --output recon/ --batch-size 512

Writes DIR/half_map_1.mrc, DIR/half_map_2.mrc (unregularised, one per
rlnRandomSubset) and DIR/map.mrc (both halves, Wiener-regularised with the
half-map FSC), and logs the unmasked half-map FSC = 0.143 resolution.
Images are CTF-corrected (CTF-weighted insertion, RELION's convention) and
centred with their rlnOriginX/YAngst before back-projection.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..engine.errors import InputError

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``localrefine reconstruct`` (defaults shown in --help)."""
    parser.add_argument(
        "--particles",
        required=True,
        metavar="P.star",
        help="RELION 3.0 or 3.1+ particle STAR file with poses (and CTF)",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder for map.mrc, half_map_1.mrc, half_map_2.mrc (created)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        metavar="N",
        help="images read and back-projected at once (default: %(default)s)",
    )
    parser.add_argument(
        "--angpix",
        type=float,
        default=None,
        metavar="A",
        help="pixel size in Angstrom, only for RELION 3.0 files that lack it",
    )
    parser.add_argument(
        "--no-ctf",
        action="store_true",
        help="ignore the CTF columns (images inserted without CTF correction)",
    )


def main(args: argparse.Namespace) -> int:
    """Validate the inputs, reconstruct, write the three maps; return 0."""
    from ..engine import mrc_io
    from ..engine.fsc import resolution_at
    from ..engine.particles import read_particles
    from ..engine.reconstruct import half_map_fsc, reconstruct_halves

    if args.batch_size < 1:
        raise InputError(None, f"--batch-size is {args.batch_size}", "give N >= 1")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(
            out_dir, "--output exists and is not a folder", "give a folder"
        )
    t0 = time.monotonic()
    particles = read_particles(args.particles, pixel_size_a=args.angpix)
    particles.require_poses()
    particles.validate_images()
    n, box, apix = particles.n, particles.box, particles.pixel_size_a
    log.info(
        "%d particles, box %d px, pixel %.4g A; half sets: %d / %d",
        n,
        box,
        apix,
        int((particles.random_subset == 1).sum()),
        int((particles.random_subset == 2).sum()),
    )
    half1, half2, full = reconstruct_halves(
        particles, batch_size=args.batch_size, apply_ctf=not args.no_ctf
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    mrc_io.write_map(out_dir / "half_map_1.mrc", half1, apix)
    mrc_io.write_map(out_dir / "half_map_2.mrc", half2, apix)
    mrc_io.write_map(out_dir / "map.mrc", full, apix)
    summary = (
        f"reconstructed {n} particles, box {box} px, pixel {apix:.4g} A "
        f"in {time.monotonic() - t0:.1f} s -> {out_dir}"
    )
    res = resolution_at(half_map_fsc(half1, half2), 0.143, n=box, pixel_size_a=apix)
    bound = "" if res.crossed else " (never crossed: Nyquist)"
    summary += f"; unmasked half-map FSC 0.143 at {res.value_a:.2f} A{bound}"
    log.info(summary)
    return 0
