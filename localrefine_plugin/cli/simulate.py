"""Simulate particles of a complex whose region moves, with the ground truth beside them.

Example usage:

  localrefine simulate --output sim
  localrefine simulate --model builtin --output sim --n-particles 1000 --box 96 \\
      --pixel-size 2 --snr 0.05 --motion-rotation 5 --motion-shift 2 --seed 1
  localrefine simulate --model 1hzh_igg1_b12.pdb --region "L,H:1-230" --output sim_1hzh \\
      --box 72 --pixel-size 3

Writes DIR/particles.star + particles.mrcs (consensus poses), DIR/truth.star (the
region's true poses), map.mrc (consensus reference), body.mrc, region.mrc,
region_mask.mrc, truth.json and truth.npz. The built-in model (~250 kDa body,
~50 kDa region) reaches ~83 A from its centre: box x pixel size must exceed
~170 A (--model-scale 0.75: ~100 + ~24 kDa, ~61 A, boxes of ~140 A). SNR is
the variance of the clean CTF-modulated image over the whole box divided by the
noise variance.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..engine.errors import InputError

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``localrefine simulate`` (defaults shown)."""
    parser.add_argument(
        "--model",
        default="builtin",
        metavar="builtin|PATH",
        help="'builtin' (procedural, no download) or a PDB/mmCIF file "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--region",
        metavar="SEL",
        help='moving region of a PDB model: chains and residue ranges, e.g. "L,H:1-230"',
    )
    parser.add_argument(
        "--model-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="size of the built-in model's layout (masses go as F^3; 0.75 fits "
        "~140 A boxes) (default: %(default)s)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--n-particles",
        type=int,
        default=1000,
        metavar="N",
        help="number of particles (default: %(default)s)",
    )
    parser.add_argument(
        "--box",
        type=int,
        default=96,
        metavar="N",
        help="box in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=2.0,
        metavar="A",
        help="Angstrom per pixel (default: %(default)s)",
    )
    parser.add_argument(
        "--snr",
        type=float,
        default=0.05,
        metavar="S",
        help="clean-image variance over noise variance (default: %(default)s)",
    )
    parser.add_argument(
        "--motion-rotation",
        type=float,
        default=5.0,
        metavar="DEG",
        help="standard deviation of the region's rotation about its centre "
        "(default: %(default)s deg)",
    )
    parser.add_argument(
        "--motion-shift",
        type=float,
        default=2.0,
        metavar="A",
        help="root-mean-square 3D shift of the region (default: %(default)s A)",
    )
    parser.add_argument(
        "--defocus",
        type=float,
        nargs=2,
        default=(1.0, 2.5),
        metavar=("MIN", "MAX"),
        help="defocus range in micrometres (default: 1.0 2.5)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of every random draw of the simulation (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        metavar="N",
        help="images simulated at once (default: %(default)s)",
    )


def main(args: argparse.Namespace) -> int:
    """Build the model, simulate, log one summary line."""
    from ..engine.models import builtin_model, pdb_model
    from ..engine.simulate import simulate_dataset

    if args.model == "builtin":
        if args.region:
            raise InputError(
                None,
                "--region applies to PDB models; the built-in model has its own region",
                "leave --region out, or give --model PATH.pdb",
            )
        if not 0.3 <= args.model_scale <= 3.0:
            raise InputError(
                None, f"--model-scale is {args.model_scale}", "give 0.3 to 3"
            )
        model = builtin_model(scale=args.model_scale)
    else:
        if args.model_scale != 1.0:
            raise InputError(
                None, "--model-scale applies to the built-in model", "leave it out"
            )
        if not args.region:
            raise InputError(
                args.model,
                "a PDB model needs --region (the part that moves)",
                'add e.g. --region "L,H:1-230"',
            )
        model = pdb_model(Path(args.model), region=args.region)
    result = simulate_dataset(
        model,
        output_dir=args.output,
        n_particles=args.n_particles,
        box=args.box,
        pixel_size_a=args.pixel_size,
        snr=args.snr,
        motion_rotation_deg=args.motion_rotation,
        motion_shift_a=args.motion_shift,
        defocus_range_um=tuple(args.defocus),
        seed=args.seed,
        batch_size=args.batch_size,
    )
    cx, cy, cz = result.region_center_px * result.pixel_size_a
    log.info(
        "simulate: %d particles of %s (body %.1f kDa, region %.1f kDa at "
        "(%.1f, %.1f, %.1f) A), box %d, %.3g A/px, SNR %.3g, motion %.3g deg / %.3g A "
        "-> %s (particles.star, truth.star, map.mrc, region_mask.mrc)",
        result.n_particles, model.name, model.mass_kda("body"), model.mass_kda("region"),
        cx, cy, cz, result.box, result.pixel_size_a, args.snr, args.motion_rotation,
        args.motion_shift, result.output_dir,
    )  # fmt: skip
    return 0
