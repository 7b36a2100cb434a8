"""Compare poses (and a map) with a known ground truth, e.g. from `localrefine simulate`.

Example usage:

  localrefine evaluate --particles refined/particles.star --truth sim/truth.star \\
      --mask sim/region_mask.mrc
  localrefine evaluate --particles refined/particles.star --truth sim/truth.star \\
      --mask sim/region_mask.mrc --map refined/map.mrc --truth-map sim/region.mrc

Angular error: geodesic angle between each particle's rotation and the true one
(degrees). Position error: distance between the image positions of the mask's
centre of mass under the two poses (pixels and Angstrom). Map: FSC against the
true map inside the mask, read at 0.5.
"""

from __future__ import annotations

import argparse
import logging

from ..engine.errors import InputError
from ..engine.evaluate import compare_map_to_truth, pose_errors
from ..engine.masks import center_of_mass_px
from ..engine.mrc_io import read_map
from ..engine.particles import read_particles

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``localrefine evaluate``."""
    parser.add_argument(
        "--particles", required=True, metavar="P.star", help="poses to judge"
    )
    parser.add_argument(
        "--truth",
        required=True,
        metavar="T.star",
        help="true poses of the same particles",
    )
    parser.add_argument(
        "--mask",
        metavar="MASK.mrc",
        help="region mask: its centre of mass is where positions are compared, and the "
        "map FSC is computed inside it (default: box centre, no mask)",
    )
    parser.add_argument(
        "--map", metavar="MAP.mrc", help="map to compare with --truth-map"
    )
    parser.add_argument("--truth-map", metavar="TRUE.mrc", help="the true map")
    parser.add_argument(
        "--json", metavar="OUT.json", help="also write the figures as JSON"
    )


def evaluate(args: argparse.Namespace) -> dict:
    """Compute the figures of ``localrefine evaluate`` as a dict (Angstrom, degrees, pixels)."""
    if (args.map is None) != (args.truth_map is None):
        raise InputError(
            None, "--map and --truth-map go together", "give both or neither"
        )
    refined = read_particles(args.particles)
    truth = read_particles(args.truth)
    refined.require_poses()
    truth.require_poses()
    if refined.n != truth.n:
        raise InputError(
            args.truth,
            f"{truth.n} particles, but {args.particles} has {refined.n}",
            "compare the same particle set, in the same order",
        )
    mask = None
    point = None
    if args.mask:
        mask, _ = read_map(args.mask)
        point = center_of_mass_px(mask)
    errors = pose_errors(
        refined.matrices(),
        refined.origin_px,
        truth.matrices(),
        truth.origin_px,
        point_px=point,
    )
    apix = refined.pixel_size_a
    result = {
        "n_particles": refined.n,
        "median_angle_error_deg": errors.median_angle_deg,
        "median_position_error_px": errors.median_position_px,
        "median_position_error_a": errors.median_position_px * apix,
    }
    if args.map:
        volume, map_apix = read_map(args.map)
        true_map, _ = read_map(args.truth_map)
        if volume.shape != true_map.shape:
            raise InputError(
                args.truth_map,
                f"box {true_map.shape[0]} differs from {args.map}'s {volume.shape[0]}",
                "compare maps on the same grid",
            )
        cmp = compare_map_to_truth(volume, true_map, pixel_size_a=map_apix, mask=mask)
        result["map_vs_truth_resolution_05_a"] = cmp.resolution_05.value_a
        result["map_vs_truth_crossed_05"] = cmp.resolution_05.crossed
        result["map_vs_truth_mean_fsc"] = cmp.mean_fsc
    return result


def main(args: argparse.Namespace) -> int:
    """Run ``localrefine evaluate``: log the figures, one summary line, optional JSON."""
    result = evaluate(args)
    if args.json:
        from ..engine.refine_outputs import write_json_atomic

        write_json_atomic(args.json, result)
    line = (
        f"evaluate: {result['n_particles']} particles, median angular error "
        f"{result['median_angle_error_deg']:.2f} deg, median position error "
        f"{result['median_position_error_a']:.2f} A"
    )
    if "map_vs_truth_resolution_05_a" in result:
        line += (
            f", map vs truth FSC=0.5 at {result['map_vs_truth_resolution_05_a']:.2f} A"
        )
    print(line)
    return 0
