"""Reading and checking the inputs of a local refinement, before any long work.

Every problem becomes an :class:`InputError` naming the file and field and
saying how to fix it; nothing here takes more than the time to read the maps
and the stack headers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import masks, mrc_io
from . import particles as particles_mod
from .errors import InputError
from .fsc import Resolution, compute_fsc, fsc_file_resolution
from .refine_options import RefineOptions, parse_fulcrum

__all__ = ["RefineInputs", "load_inputs", "fulcrum_px", "resolve_initial_lowpass"]

log = logging.getLogger(__name__)


@dataclass
class RefineInputs:
    """Checked inputs of a refinement.

    Attributes
    ----------
    particles : Particles
        With poses; ``random_subset`` in {1, 2}.
    reference : ndarray, shape (N, N, N), float32
    mask : ndarray, shape (N, N, N), float32, values in [0, 1]
    half_maps : ndarray, shape (2, N, N, N), float32, or None
        Optional initial references per half set.
    pixel_size_a : float
    box : int
    sources : dict
        File names, for the summary and error messages.
    input_fsc_resolution : Resolution or None
        FSC 0.143 of the input FSC file (``sources["input_fsc"]``), if given.
    """

    particles: object
    reference: np.ndarray
    mask: np.ndarray
    half_maps: np.ndarray | None
    pixel_size_a: float
    box: int
    sources: dict
    input_fsc_resolution: Resolution | None = None

    def fingerprint(self) -> str:
        """Hash of what a continued run must share with the interrupted one."""
        p = self.particles
        h = hashlib.sha256()
        for arr in (
            p.matrices(),
            p.origin_px,
            np.asarray(p.random_subset),
            np.asarray(p.optics_group),
            self.reference,
            self.mask,
        ):
            h.update(np.ascontiguousarray(arr).tobytes())
        if self.half_maps is not None:
            h.update(self.half_maps.tobytes())
        return h.hexdigest()[:16]


def _read_map(path, what: str) -> tuple[np.ndarray, float]:
    volume, pixel_size = mrc_io.read_map(path)
    return np.asarray(volume, dtype=np.float32), float(pixel_size)


def _same_grid(path, shape, pixel_size, ref_shape, ref_pixel, ref_path, what) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise InputError(
            path,
            f"{what} box {tuple(shape)} differs from the reference {ref_path} "
            f"box {tuple(ref_shape)}",
            "use maps on the same grid (same box and pixel size)",
        )
    if not math.isclose(pixel_size, ref_pixel, rel_tol=1e-3):
        raise InputError(
            path,
            f"{what} pixel size {pixel_size:.4f} A differs from the reference "
            f"{ref_path} pixel size {ref_pixel:.4f} A",
            "use maps on the same grid, or fix the pixel size in the header",
        )


def load_inputs(
    particles,
    reference,
    mask,
    *,
    half_maps=None,
    input_fsc=None,
    options: RefineOptions,
) -> RefineInputs:
    """Read and check everything a refinement needs; raise :class:`InputError` early.

    Parameters
    ----------
    particles : str, Path or Particles
        A RELION STAR file or an already read particle set.
    reference, mask : str or Path
        MRC maps (the mask: soft, values in [0, 1]).
    half_maps : pair of str or Path, optional
        Initial references for half sets 1 and 2.
    input_fsc : str or Path, optional
        The input reference's FSC (:func:`.fsc.read_fsc_file`), for
        ``initial_lowpass_a="fsc"``; read and checked here.
    options : RefineOptions
        Validated here too (extents, fulcrum inside the box).
    """
    options.validate()
    input_fsc_resolution = None if input_fsc is None else fsc_file_resolution(input_fsc)
    if options.lowpass_from_fsc and input_fsc is None and half_maps is None:
        raise InputError(
            None,
            "option initial_lowpass 'fsc' needs the input's FSC: neither an FSC file "
            "nor half maps were given",
            "give --input-fsc FSC_FILE or --half-maps H1 H2, or a resolution in A",
        )
    if isinstance(particles, str | Path):
        star_path = str(particles)
        parts = particles_mod.read_particles(particles)
    else:
        parts = particles
        star_path = str(parts.star_path) if parts.star_path is not None else None
    parts.require_poses()
    if not parts.table.has_column("rlnRandomSubset"):
        log.warning(
            "%s has no rlnRandomSubset: half sets were assigned deterministically by "
            "row (odd rows -> 1, even rows -> 2); the output keeps this assignment",
            star_path,
        )
    parts.validate_images()
    n_sub = np.asarray(parts.random_subset)
    if not np.isin(n_sub, (1, 2)).all():
        raise InputError(
            star_path,
            "rlnRandomSubset must be 1 or 2 for every particle; found values "
            f"{sorted(set(n_sub.tolist()) - {1, 2})}",
            "keep the half sets of the consensus refinement (1 and 2)",
        )
    for half in (1, 2):
        if not (n_sub == half).any():
            raise InputError(
                star_path,
                f"no particle in half set {half} (rlnRandomSubset)",
                "a gold-standard refinement needs particles in both half sets",
            )

    ref, ref_px = _read_map(reference, "reference")
    if ref.ndim != 3:
        raise InputError(reference, f"reference has shape {ref.shape}", "give a 3D map")
    m, m_px = _read_map(mask, "mask")
    masks.check_mask(
        m,
        mask_path=mask,
        mask_pixel_size_a=m_px,
        reference_shape=ref.shape,
        reference_pixel_size_a=ref_px,
        reference=ref,
    )
    if parts.box != ref.shape[0]:
        raise InputError(
            star_path,
            f"particle box {parts.box} px (rlnImageSize / stack) differs from the "
            f"reference {reference} box {ref.shape[0]} px",
            "re-box the particles or the maps so that they match",
        )
    if not math.isclose(parts.pixel_size_a, ref_px, rel_tol=1e-3):
        raise InputError(
            star_path,
            f"particle pixel size {parts.pixel_size_a:.4f} A (rlnImagePixelSize) differs "
            f"from the reference {reference} pixel size {ref_px:.4f} A",
            "rescale the reference to the particles' pixel size or fix the header",
        )
    halves = None
    if half_maps is not None:
        if len(half_maps) != 2:
            raise InputError(None, "option half_maps: give exactly two maps", "H1 H2")
        vols = []
        for i, path in enumerate(half_maps, start=1):
            vol, px = _read_map(path, f"half map {i}")
            _same_grid(
                path, vol.shape, px, ref.shape, ref_px, reference, f"half map {i}"
            )
            vols.append(vol)
        halves = np.stack(vols)
    fulcrum_px(options.fulcrum, m)  # raises for a point outside the box
    log.info(
        "inputs: %d particles (half sets %d + %d), box %d px, pixel size %.4f A",
        parts.n,
        int((n_sub == 1).sum()),
        int((n_sub == 2).sum()),
        ref.shape[0],
        ref_px,
    )
    return RefineInputs(
        particles=parts,
        reference=ref,
        mask=np.clip(m, 0.0, 1.0).astype(np.float32),
        half_maps=halves,
        pixel_size_a=float(parts.pixel_size_a),
        box=int(ref.shape[0]),
        sources={
            "particles": star_path,
            "reference": str(reference),
            "mask": str(mask),
            "half_maps": None if half_maps is None else [str(p) for p in half_maps],
            "input_fsc": None if input_fsc is None else str(input_fsc),
        },
        input_fsc_resolution=input_fsc_resolution,
    )


def resolve_initial_lowpass(
    options: RefineOptions, inputs: RefineInputs
) -> RefineOptions:
    """``options`` with ``initial_lowpass_a`` in Angstrom (``"fsc"`` resolved).

    ``"fsc"`` becomes the resolution where the input's FSC falls below 0.143:
    the FSC file's curve when one was given, otherwise the gold-standard FSC
    of the half maps inside the refinement mask (mask-corrected, seed
    ``options.seed``: deterministic, so every MPI rank and a ``--continue``
    get the same value). A number is returned unchanged.
    """
    if not options.lowpass_from_fsc:
        return dataclasses.replace(
            options, initial_lowpass_a=float(options.initial_lowpass_a)
        )
    if inputs.input_fsc_resolution is not None:
        res, source = inputs.input_fsc_resolution, inputs.sources["input_fsc"]
    else:
        res = compute_fsc(
            inputs.half_maps[0],
            inputs.half_maps[1],
            mask=inputs.mask,
            pixel_size_a=inputs.pixel_size_a,
            seed=options.seed,
        ).resolution_0143
        source = "the half maps inside the mask"
    log.info("initial low-pass from the FSC of %s (0.143): %s", source, res)
    return dataclasses.replace(options, initial_lowpass_a=res.value_a)


def fulcrum_px(fulcrum, mask: np.ndarray) -> np.ndarray:
    """The fulcrum ``(x, y, z)`` in pixels relative to the box centre ``N // 2``.

    ``"mask"``: the mask's centre of mass; ``"box"``: the box centre (zeros);
    ``(x, y, z)``: voxel indices from the box corner, which must lie inside.
    """
    fulcrum = parse_fulcrum(fulcrum)
    n = mask.shape[0]
    if fulcrum == "mask":
        return masks.center_of_mass_px(mask)
    if fulcrum == "box":
        return np.zeros(3)
    xyz = np.asarray(fulcrum, dtype=np.float64)
    if (xyz < 0).any() or (xyz > n - 1).any():
        raise InputError(
            None,
            f"option fulcrum: {tuple(xyz)} lies outside the box (voxel indices 0..{n - 1})",
            f"give voxel indices inside the box; the box centre is {n // 2},{n // 2},{n // 2}",
        )
    return xyz - n // 2
