"""Subtract the reference's signal outside a mask from every particle.

Example usage:

  localrefine subtract --particles run_data.star --reference map.mrc \\
      --mask region_mask.mrc --output subtracted
  localrefine subtract --particles run_data.star --reference map.mrc \\
      --half-maps half1.mrc half2.mrc --mask region_mask.mrc --output subtracted \\
      --recenter --new-box 64

Each particle loses the projection (at its pose, origin and CTF) of
reference x (1 - mask), scaled by the least-squares scale of the full
reference's projection to the particle (50 A to Nyquist); with --half-maps each
particle uses the half map of its rlnRandomSubset. --recenter moves the mask's
centre of mass to the image centre (integer shift, remainder kept in the
origins); --new-box crops. Writes DIR/particles.star, particles_subtracted.mrcs
and, when re-centred or re-boxed, reference.mrc and mask.mrc (and
reference_half1/2.mrc) on the new grid for local refinement.
"""

from __future__ import annotations

import argparse
import logging
import math

import numpy as np

from ..engine.errors import InputError

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``localrefine subtract`` (defaults shown)."""
    parser.add_argument(
        "--particles",
        required=True,
        metavar="P.star",
        help="particles with poses and CTF",
    )
    parser.add_argument(
        "--reference", required=True, metavar="REF.mrc", help="consensus map"
    )
    parser.add_argument(
        "--half-maps",
        nargs=2,
        metavar=("H1.mrc", "H2.mrc"),
        help="half maps: each particle is subtracted with its own half's map",
    )
    parser.add_argument(
        "--mask",
        required=True,
        metavar="MASK.mrc",
        help="soft mask of the region to keep",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--recenter",
        action="store_true",
        help="move the mask's centre of mass to the image centre",
    )
    parser.add_argument(
        "--new-box",
        type=int,
        default=None,
        metavar="N",
        help="crop images and maps to this box in pixels (0 or absent: keep the box)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        metavar="N",
        help="particles processed at once (default: %(default)s)",
    )


def _read_checked(path, what: str, pixel_size_a: float, box: int) -> np.ndarray:
    from ..engine.mrc_io import read_map

    volume, apix = read_map(path)
    if not math.isclose(apix, pixel_size_a, rel_tol=1e-3):
        raise InputError(
            path,
            f"{what} pixel size {apix:.4f} A differs from the particles' {pixel_size_a:.4f} A",
            "resample the map to the particles' pixel size (or fix its header)",
        )
    if volume.shape[0] != box:
        raise InputError(
            path,
            f"{what} box {volume.shape[0]} px differs from the particles' {box} px",
            "use a map on the particles' box",
        )
    return volume


def main(args: argparse.Namespace) -> int:
    """Validate every input (headers, masks, stacks) first, then subtract."""
    from ..engine.masks import check_mask
    from ..engine.mrc_io import read_map
    from ..engine.particles import read_particles
    from ..engine.subtract import subtract_particles

    particles = read_particles(args.particles)
    particles.require_poses()
    particles.validate_images()
    if args.batch_size < 1:
        raise InputError(
            None, f"--batch-size is {args.batch_size}", "give a value >= 1"
        )
    px, box = particles.pixel_size_a, particles.box
    reference = _read_checked(args.reference, "reference", px, box)
    mask, mask_px = read_map(args.mask)
    check_mask(
        mask,
        mask_path=args.mask,
        mask_pixel_size_a=mask_px,
        reference_shape=reference.shape,
        reference_pixel_size_a=px,
        reference=reference,
    )
    half_maps = None
    if args.half_maps:
        half_maps = tuple(
            _read_checked(path, f"half map {k}", px, box)
            for k, path in enumerate(args.half_maps, start=1)
        )
    new_box = args.new_box or None
    if particles.ctf is None:
        log.warning("%s has no CTF columns: subtracting without CTF", args.particles)
    result = subtract_particles(
        particles,
        reference,
        mask,
        output_dir=args.output,
        half_maps=half_maps,
        recenter=args.recenter,
        new_box=new_box,
        batch_size=args.batch_size,
    )
    centre = ""
    if args.recenter:
        fx, fy, fz = result.shift_voxels * px
        centre = f", re-centred on ({fx:.1f}, {fy:.1f}, {fz:.1f}) A"
    log.info(
        "subtract: %d particles, box %d -> %d px%s, %s, scale median %.3f -> %s",
        particles.n, box, result.box, centre,
        "half maps by random subset" if half_maps else "one reference",
        float(np.median(result.scales)), result.particles_star,
    )  # fmt: skip
    return 0
