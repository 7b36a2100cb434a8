"""Local refinement of a masked region: re-align particles near their consensus poses.

Example usage:

  localrefine refine --particles subtracted/particles.star --reference map.mrc \\
      --mask region_mask.mrc --output refine_region
  localrefine refine --particles P.star --reference map.mrc --mask mask.mrc \\
      --output out --rotation-extent 6 --shift-extent 2 --prior-sigma-rotation 3
  localrefine refine ... --output out --continue   # resume after a kill

Writes DIR/particles.star, map.mrc, half_map_1.mrc, half_map_2.mrc, fsc.csv,
fsc.png, summary.json and refine.log. See docs/local_refinement.md for every
parameter and its cryoSPARC / RELION counterpart.
"""

from __future__ import annotations

import argparse

from ..engine.refine_options import RefineOptions, parse_fulcrum

_DEFAULTS = RefineOptions()


def _fulcrum(text: str):
    from ..engine.errors import InputError

    try:
        return parse_fulcrum(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``localrefine refine`` (units in the help; defaults shown)."""
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument(
        "--particles",
        required=True,
        metavar="P.star",
        help="RELION 3.0/3.1+ STAR with consensus poses (e.g. after signal subtraction)",
    )
    io.add_argument(
        "--reference",
        required=True,
        metavar="REF.mrc",
        help="consensus map (same box and pixel size as the particles)",
    )
    io.add_argument(
        "--mask",
        required=True,
        metavar="MASK.mrc",
        help="soft mask (0-1) around the region to refine, same box and pixel size",
    )
    io.add_argument(
        "--half-maps",
        nargs=2,
        metavar=("H1.mrc", "H2.mrc"),
        default=None,
        help="optional initial references per half set (rlnRandomSubset 1 and 2) "
        "instead of the low-passed --reference",
    )
    io.add_argument(
        "--input-fsc",
        default=None,
        metavar="FSC",
        help="the reference's FSC curve (our fsc.csv, RELION's postprocess.star or "
        "run_model.star), for the initial low-pass",
    )
    io.add_argument("--output", required=True, metavar="DIR", help="output directory")
    io.add_argument(
        "--continue",
        dest="continue_run",
        action="store_true",
        help="resume from the last complete iteration saved in DIR",
    )

    search = parser.add_argument_group("local search")
    search.add_argument(
        "--shift-extent",
        type=float,
        default=_DEFAULTS.shift_extent_px,
        metavar="PX",
        help="largest shift change from the consensus pose, pixels (default: %(default)s)",
    )
    search.add_argument(
        "--rotation-extent",
        type=float,
        default=_DEFAULTS.rotation_extent_deg,
        metavar="DEG",
        help="largest rotation away from the consensus pose, degrees "
        "(default: %(default)s)",
    )
    search.add_argument(
        "--alignment-resolution",
        type=float,
        default=_DEFAULTS.alignment_resolution_deg,
        metavar="DEG",
        help="finest rotation step of the search, degrees (default: %(default)s)",
    )
    search.add_argument(
        "--shift-resolution",
        type=float,
        default=_DEFAULTS.shift_resolution_px,
        metavar="PX",
        help="finest shift step of the search, pixels (default: %(default)s)",
    )
    search.add_argument(
        "--fulcrum",
        type=_fulcrum,
        default=_DEFAULTS.fulcrum,
        metavar="mask|box|X,Y,Z",
        help="rotation pivot: mask centre of mass, box centre, or voxel indices X,Y,Z "
        "in pixels (box centre = N//2) (default: %(default)s)",
    )
    search.add_argument(
        "--prior-sigma-rotation",
        type=float,
        default=None,
        metavar="DEG",
        help="Gaussian prior on the rotation change from the consensus, sigma in "
        "degrees (default: no prior)",
    )
    search.add_argument(
        "--prior-sigma-shift",
        type=float,
        default=None,
        metavar="A",
        help="Gaussian prior on the shift change from the consensus, sigma in "
        "Angstrom (default: no prior)",
    )
    search.add_argument(
        "--marginalize-top-k",
        type=int,
        default=_DEFAULTS.marginalize_top_k,
        metavar="K",
        help="insert each particle at its K best poses with posterior weights; "
        "1 = best pose only (default: %(default)s)",
    )

    it = parser.add_argument_group("iterations and masks")
    it.add_argument(
        "--initial-lowpass",
        type=_lowpass_arg,
        default=None,
        metavar="A|fsc",
        help="low-pass of the reference for the first iteration, Angstrom, or 'fsc': "
        "the resolution (FSC 0.143) of --input-fsc or, without it, of --half-maps "
        "inside the mask (default: 'fsc' when either is given, else "
        f"{_DEFAULTS.initial_lowpass_a:g})",
    )
    it.add_argument(
        "--max-iterations",
        type=int,
        default=_DEFAULTS.max_iterations,
        metavar="N",
        help="most iterations before the final full-resolution pass; the run stops "
        "earlier when the resolution has not improved for 2 iterations "
        "(default: %(default)s)",
    )
    masks = it.add_mutually_exclusive_group()
    masks.add_argument(
        "--dynamic-mask",
        dest="dynamic_mask",
        action="store_true",
        default=_DEFAULTS.dynamic_mask,
        help="recompute the mask from the current map each iteration (never beyond "
        "the input mask's support plus the far distance)",
    )
    masks.add_argument(
        "--static-mask",
        dest="dynamic_mask",
        action="store_false",
        help="keep the input mask (the default)",
    )
    it.add_argument(
        "--dynamic-mask-threshold",
        type=float,
        default=_DEFAULTS.dynamic_mask_threshold,
        metavar="FRACTION",
        help="dynamic mask threshold, fraction of the map's maximum inside the "
        "input mask (default: %(default)s)",
    )
    it.add_argument(
        "--dynamic-mask-near",
        type=float,
        default=_DEFAULTS.dynamic_mask_near_a,
        metavar="A",
        help="dynamic mask: distance from the density kept at 1, Angstrom "
        "(default: %(default)s)",
    )
    it.add_argument(
        "--dynamic-mask-far",
        type=float,
        default=_DEFAULTS.dynamic_mask_far_a,
        metavar="A",
        help="dynamic mask: distance where the soft edge reaches 0, Angstrom "
        "(default: %(default)s)",
    )

    run = parser.add_argument_group("computing")
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="auto = GPU if PyCUDA and a GPU are present, else CPU "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=_DEFAULTS.threads,
        metavar="N",
        help="CPU path: batches searched in parallel; GPU path (one batch searched "
        "at a time): threads preparing the next batch (reading, FFTs; the GPU "
        "evaluates the CTFs) (default: %(default)s)",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULTS.batch_size,
        metavar="N",
        help="particles read and searched at once; 0 = automatic: 128 on the CPU, "
        "on the GPU 512 up to box 256, 256 up to box 384, else 128 "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--noise-particles",
        type=int,
        default=_DEFAULTS.noise_particles,
        metavar="N",
        help="most particles per optics group whose residuals estimate the noise "
        "power in each iteration (a fixed seeded draw); 0 = all (default: "
        "%(default)s)",
    )


def _lowpass_arg(text: str) -> float | str:
    """``--initial-lowpass``: a resolution in Angstrom or the word ``fsc``."""
    if text.strip().lower() == "fsc":
        return "fsc"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a resolution in Angstrom (e.g. 8) or 'fsc'"
        ) from None


def options_from_args(args: argparse.Namespace) -> RefineOptions:
    """The :class:`RefineOptions` given on the command line (validated).

    Without ``--initial-lowpass``, the initial low-pass comes from the input's
    FSC when an FSC file or half maps are given, else the default (8 A).
    """
    lowpass = args.initial_lowpass
    if lowpass is None:
        given = args.input_fsc is not None or args.half_maps is not None
        lowpass = "fsc" if given else _DEFAULTS.initial_lowpass_a
    options = RefineOptions(
        shift_extent_px=args.shift_extent,
        rotation_extent_deg=args.rotation_extent,
        alignment_resolution_deg=args.alignment_resolution,
        shift_resolution_px=args.shift_resolution,
        fulcrum=args.fulcrum,
        initial_lowpass_a=lowpass,
        max_iterations=args.max_iterations,
        prior_sigma_rotation_deg=args.prior_sigma_rotation,
        prior_sigma_shift_a=args.prior_sigma_shift,
        dynamic_mask=args.dynamic_mask,
        dynamic_mask_threshold=args.dynamic_mask_threshold,
        dynamic_mask_near_a=args.dynamic_mask_near,
        dynamic_mask_far_a=args.dynamic_mask_far,
        marginalize_top_k=args.marginalize_top_k,
        batch_size=args.batch_size,
        noise_particles=args.noise_particles,
        threads=args.threads,
    )
    options.validate()
    return options


def main(args: argparse.Namespace) -> int:
    """Validate the options, run the refinement, log one summary line."""
    import logging

    from ..engine.refine import run_local_refinement

    options = options_from_args(args)
    result = run_local_refinement(
        args.particles,
        args.reference,
        args.mask,
        output_dir=args.output,
        options=options,
        device=args.device,
        half_maps=args.half_maps,
        input_fsc=args.input_fsc,
        continue_run=args.continue_run,
    )
    logging.getLogger(__name__).info(
        "done: %d particles, %d iterations, resolution %.2f A (masked, corrected, "
        "FSC %.3f), outputs in %s",
        result.n_particles,
        result.iterations,
        result.resolution_a,
        options.fsc_threshold,
        args.output,
    )
    return 0
