"""Options of a local refinement (units in the names) and their validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import InputError

__all__ = ["RefineOptions", "parse_fulcrum"]


@dataclass(frozen=True)
class RefineOptions:
    """Settings of :func:`~localrefine_plugin.engine.refine.run_local_refinement`.

    Every field names its unit; ``docs/local_refinement.md`` explains each one and
    its nearest cryoSPARC and RELION setting.

    Attributes
    ----------
    shift_extent_px : float
        Largest change of the origin from the consensus pose (pixels, radius).
    rotation_extent_deg : float
        Largest rotation away from the consensus pose (degrees, geodesic).
    alignment_resolution_deg : float
        Finest rotation step of the branch-and-bound search (degrees).
    shift_resolution_px : float
        Finest shift step of the search (pixels).
    fulcrum : "mask", "box" or (x, y, z)
        Point the rotations pivot about: the mask's centre of mass, the box
        centre, or voxel indices ``(x, y, z)`` (pixels from the box corner; the box
        centre is ``N // 2``).
    initial_lowpass_a : float or "fsc"
        Low-pass of the input reference for the first iteration (Angstrom), or
        ``"fsc"``: the resolution (FSC 0.143) of the input's FSC, from an FSC
        file or the half maps given (:func:`.refine_inputs.resolve_initial_lowpass`).
    max_iterations : int
        Most iterations before the final full-resolution pass.
    prior_sigma_rotation_deg, prior_sigma_shift_a : float or None
        Gaussian priors on the rotation change (degrees) and the shift change
        (Angstrom) from the consensus pose; None = no prior.
    dynamic_mask : bool
        Recompute the mask from the current map every iteration.
    dynamic_mask_threshold : float
        Threshold of the dynamic mask as a fraction of the map's maximum inside
        the input mask (0-1).
    dynamic_mask_near_a, dynamic_mask_far_a : float
        The dynamic mask is 1 within ``near`` of the thresholded density and falls
        to 0 (raised cosine) at ``far`` (Angstrom); it never extends beyond the
        input mask's support plus ``far``.
    marginalize_top_k : int
        1 = point estimate (best pose, the default); K > 1 = each particle is
        inserted at its K best poses with posterior weights.
    batch_size : int
        Particles read and searched at once (memory versus speed); 0 (the
        default) = automatic (:func:`auto_batch_size`: 128 on the CPU, up to
        512 on the GPU).
    noise_particles : int
        Most particles per optics group whose residuals estimate the noise
        power sigma^2 in each iteration (a seeded draw, the same in every
        iteration; :func:`.noise.noise_subset`); 0 = all. Each optics group's
        sigma^2 is a mean over every pixel of a shell in every image, so
        20,000 images fix it to a fraction of a percent while a set of 10^6
        is not read for it.
    threads : int
        CPU path: batches searched in parallel (Python threads; NumPy
        releases the GIL). GPU path, which searches one batch at a time:
        threads reading and transforming the next batch meanwhile (the GPU
        evaluates its CTFs). Both: threads of the noise pass's FFTs and CTFs.
    fsc_threshold : float
        FSC value defining the resolution (gold standard: 0.143).
    seed : int
        Seed of the FSC phase randomisation (everything else is deterministic).
    """

    shift_extent_px: float = 3.0
    rotation_extent_deg: float = 10.0
    alignment_resolution_deg: float = 0.5
    shift_resolution_px: float = 0.25
    fulcrum: str | tuple[float, float, float] = "mask"
    initial_lowpass_a: float | str = 8.0
    max_iterations: int = 8
    prior_sigma_rotation_deg: float | None = None
    prior_sigma_shift_a: float | None = None
    dynamic_mask: bool = False
    dynamic_mask_threshold: float = 0.2
    dynamic_mask_near_a: float = 6.0
    dynamic_mask_far_a: float = 14.0
    marginalize_top_k: int = 1
    batch_size: int = 0
    noise_particles: int = 20000
    threads: int = 1
    fsc_threshold: float = 0.143
    seed: int = 0

    def batch_size_for(self, box: int, *, gpu: bool) -> int:
        """Particles per batch: ``batch_size``, or :func:`auto_batch_size` when 0."""
        return int(self.batch_size) or auto_batch_size(box, gpu=gpu)

    def to_dict(self) -> dict:
        """JSON-ready dict (the fulcrum tuple becomes a list)."""
        d = dataclasses.asdict(self)
        if isinstance(d["fulcrum"], tuple):
            d["fulcrum"] = list(d["fulcrum"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RefineOptions:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        d = dict(d)
        if isinstance(d.get("fulcrum"), list):
            d["fulcrum"] = tuple(float(v) for v in d["fulcrum"])
        return cls(**d)

    @property
    def lowpass_from_fsc(self) -> bool:
        """True when ``initial_lowpass_a`` is ``"fsc"`` (any case)."""
        lp = self.initial_lowpass_a
        return isinstance(lp, str) and lp.lower() == "fsc"

    def validate(self) -> None:
        """Raise :class:`InputError` naming the option for any value out of range."""

        def bad(name: str, problem: str, fix: str) -> InputError:
            return InputError(None, f"option {name}: {problem}", fix)

        def finite(name: str, value) -> float:
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise bad(name, f"{value!r} is not a number", "give a number") from None
            if not math.isfinite(v):
                raise bad(name, f"{value!r} is not finite", "give a finite number")
            return v

        res = finite("alignment_resolution_deg", self.alignment_resolution_deg)
        if res <= 0:
            raise bad(
                "alignment_resolution_deg",
                f"{res} deg must be positive",
                "use e.g. 0.5 (cryoSPARC's default)",
            )
        rot = finite("rotation_extent_deg", self.rotation_extent_deg)
        if rot < 0:
            raise bad(
                "rotation_extent_deg", f"{rot} deg is negative", "use e.g. 10 (degrees)"
            )
        if rot < res:
            raise bad(
                "rotation_extent_deg",
                f"{rot} deg is finer than the alignment resolution {res} deg",
                "make the rotation extent at least the alignment resolution",
            )
        if rot > 180:
            raise bad("rotation_extent_deg", f"{rot} deg exceeds 180", "use <= 180")
        shift = finite("shift_extent_px", self.shift_extent_px)
        if shift < 0:
            raise bad(
                "shift_extent_px", f"{shift} px is negative", "use e.g. 3 (pixels)"
            )
        if not self.lowpass_from_fsc:
            lp = finite("initial_lowpass_a", self.initial_lowpass_a)
            if lp <= 0:
                raise bad(
                    "initial_lowpass_a", f"{lp} A must be positive", "use e.g. 8 (A)"
                )
        if int(self.max_iterations) != self.max_iterations or self.max_iterations < 1:
            raise bad(
                "max_iterations",
                f"{self.max_iterations} must be an integer >= 1",
                "use 1+",
            )
        for name in ("prior_sigma_rotation_deg", "prior_sigma_shift_a"):
            value = getattr(self, name)
            if value is not None and finite(name, value) <= 0:
                raise bad(
                    name, f"{value} must be positive", "omit it to disable the prior"
                )
        thr = finite("dynamic_mask_threshold", self.dynamic_mask_threshold)
        if not 0 < thr < 1:
            raise bad(
                "dynamic_mask_threshold", f"{thr} is not in (0, 1)", "use e.g. 0.2"
            )
        near = finite("dynamic_mask_near_a", self.dynamic_mask_near_a)
        far = finite("dynamic_mask_far_a", self.dynamic_mask_far_a)
        if near < 0:
            raise bad("dynamic_mask_near_a", f"{near} A is negative", "use e.g. 6 (A)")
        if far <= near:
            raise bad(
                "dynamic_mask_far_a",
                f"{far} A must exceed dynamic_mask_near_a ({near} A)",
                "use e.g. near 6 A and far 14 A",
            )
        for name, low in (
            ("marginalize_top_k", 1),
            ("batch_size", 0),
            ("noise_particles", 0),
            ("threads", 1),
        ):
            value = getattr(self, name)
            if int(value) != value or value < low:
                raise bad(
                    name, f"{value} must be an integer >= {low}", f"use {low} or more"
                )
        fsc = finite("fsc_threshold", self.fsc_threshold)
        if not 0 < fsc < 1:
            raise bad("fsc_threshold", f"{fsc} is not in (0, 1)", "use 0.143")
        parse_fulcrum(self.fulcrum)


#: bytes of one batch's transforms (complex64) that the automatic GPU batch
#: may take: three such batches stay in page-locked host memory while the
#: next one is prepared (``kernels/host_staging.py``)
GPU_BATCH_BYTES = 160e6


def auto_batch_size(box: int, *, gpu: bool) -> int:
    """``--batch-size 0``: particles per batch at box ``box`` (pixels).

    128 on the CPU (which searches 8 at a time within a batch anyway). On the
    GPU, which searches each batch at once, the largest of 512, 256 and 128
    whose transforms (``N (N/2+1)`` complex64 each) take at most
    :data:`GPU_BATCH_BYTES`: 512 up to box 256, 256 up to box 384, else 128.
    The GPU's per-batch costs (launches, synchronisations, host bookkeeping)
    do not grow with the batch: on an H200 (2026-11-28, ``bench_gpu.py``) one
    batch of 512 searched 1.36-1.48 times as fast as batches of 128 at box
    128, and one of 256 1.22-1.27 times at box 256.
    """
    if not gpu:
        return 128
    per_particle = 8 * box * (box // 2 + 1)
    return next((b for b in (512, 256) if b * per_particle <= GPU_BATCH_BYTES), 128)


def parse_fulcrum(value) -> str | tuple[float, float, float]:
    """``"mask"``, ``"box"``, ``"X,Y,Z"`` or a 3-sequence -> a valid fulcrum option.

    Raises :class:`InputError` for anything else.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("mask", "box"):
            return text
        parts = text.split(",")
    else:
        try:
            parts = list(value)
        except TypeError:
            parts = []
    try:
        xyz = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        xyz = ()
    if len(xyz) != 3 or not all(math.isfinite(v) for v in xyz):
        raise InputError(
            None,
            f"option fulcrum: {value!r} is not 'mask', 'box' or three numbers X,Y,Z",
            "use --fulcrum mask, --fulcrum box or e.g. --fulcrum 40,32,35 (voxel indices)",
        )
    return xyz
