"""Make a soft mask (values 0-1, raised-cosine edge) around the density of a map.

Example usage:

  localrefine mask --map map.mrc --output mask.mrc
  localrefine mask --map map.mrc --output mask.mrc --lowpass 15 --threshold 0.02 \\
      --extend 3 --soft-edge 6

Without --threshold the map (low-passed to --lowpass) is binarised at
solvent + max(5 sigma, 0.1 x (peak - solvent)), the solvent being the box
corners outside the sphere of radius N/2; the threshold used is logged.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from ..engine.errors import InputError

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``localrefine mask`` (lengths in Angstrom; defaults shown)."""
    parser.add_argument(
        "--map", required=True, metavar="M.mrc", help="map to mask (cubic MRC)"
    )
    parser.add_argument(
        "--output", required=True, metavar="MASK.mrc", help="mask to write (MRC)"
    )
    parser.add_argument(
        "--lowpass",
        type=float,
        default=15.0,
        metavar="A",
        help="low-pass the map to this resolution before thresholding; 0 = no "
        "low-pass (default: %(default)s A)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="T",
        help="density threshold of the (low-passed) map; default: the rule below",
    )
    parser.add_argument(
        "--extend",
        type=float,
        default=3.0,
        metavar="A",
        help="grow the thresholded region by this distance (default: %(default)s A)",
    )
    parser.add_argument(
        "--soft-edge",
        type=float,
        default=6.0,
        metavar="A",
        help="width of the raised-cosine edge (default: %(default)s A)",
    )


def _validate(args: argparse.Namespace, pixel_size_a: float) -> float | None:
    """Check the numbers against the map; return the low-pass (None = off)."""
    if args.extend < 0:
        raise InputError(None, f"--extend is {args.extend} A", "give a value >= 0")
    if args.soft_edge < 0:
        raise InputError(
            None, f"--soft-edge is {args.soft_edge} A", "give a value >= 0"
        )
    if args.lowpass < 0:
        raise InputError(None, f"--lowpass is {args.lowpass} A", "give 0 (off) or > 0")
    if args.lowpass == 0:
        return None
    nyquist = 2.0 * pixel_size_a
    if args.lowpass <= nyquist:
        raise InputError(
            None,
            f"--lowpass {args.lowpass} A is at or beyond Nyquist ({nyquist:.3f} A "
            f"for pixel size {pixel_size_a:.4f} A)",
            f"give a resolution above {nyquist:.3f} A, or 0 for no low-pass",
        )
    return args.lowpass


def main(args: argparse.Namespace) -> int:
    """Read the map, make the mask, write it with the map's pixel size."""
    from ..engine.filters import lowpass
    from ..engine.masks import center_of_mass_px, create_soft_mask, default_threshold
    from ..engine.mrc_io import read_map, write_map

    start = time.perf_counter()
    volume, pixel_size_a = read_map(args.map)
    lowpass_a = _validate(args, pixel_size_a)
    n = volume.shape[0]
    log.info(
        "map %s: box %d, pixel size %.4f A; low-pass %s",
        args.map,
        n,
        pixel_size_a,
        f"{lowpass_a:g} A" if lowpass_a else "off",
    )
    if lowpass_a is not None:
        volume = lowpass(volume, pixel_size_a, lowpass_a)
    threshold = args.threshold
    if threshold is None:
        threshold = default_threshold(volume)
        log.info("threshold %.4g from the default rule", threshold)
    try:
        mask = create_soft_mask(
            volume,
            pixel_size_a,
            threshold=threshold,
            extend_a=args.extend,
            soft_edge_a=args.soft_edge,
        )
    except ValueError as exc:
        raise InputError(
            args.map, str(exc), "give a lower --threshold (or none)"
        ) from None
    write_map(args.output, mask, pixel_size_a)
    com_a = center_of_mass_px(mask) * pixel_size_a
    log.info(
        "mask %s: threshold %.4g, volume fraction %.4f (%.0f A^3), centre of mass "
        "(x, y, z) = (%.1f, %.1f, %.1f) A from the box centre, extend %g A, soft "
        "edge %g A (%.2fs)",
        args.output,
        threshold,
        float(mask.mean()),
        float(mask.sum(dtype=np.float64)) * pixel_size_a**3,
        *com_a,
        args.extend,
        args.soft_edge,
        time.perf_counter() - start,
    )
    return 0
