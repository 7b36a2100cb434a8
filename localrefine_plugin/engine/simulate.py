"""Simulated particle datasets with a flexible region and known ground truth.

:func:`simulate_dataset` makes a consensus-refinement-like particle set of a
model whose region moves rigidly and independently of the body in every
particle, and writes the truth beside it:

* maps ``map.mrc`` (body + region at rest: the consensus reference),
  ``body.mrc``, ``region.mrc`` (the ground truth for region FSCs) and
  ``region_mask.mrc`` (soft mask around the region);
* ``particles.mrcs`` + ``particles.star``: images with the consensus poses
  ``(A_i, o_i)``, CTF and half sets;
* ``truth.star``: the same particles with the region's true poses
  ``(A_r, o_r)``; ``truth.npz``: the per-particle motions; ``truth.json``: the
  settings and derived numbers (noise sigma, region centre, masses).

Geometry (``docs/conventions.md``; origins in RELION's sign)
-------------------------------------------------------------
A map point ``p`` (pixels from the box centre, ``(x, y, z)``) of a particle with
pose ``(A, o)`` appears in the image at ``(A p)_xy - o``: RELION moves the
projection by **minus** ``rlnOriginX/Y`` (measured against ``relion_project``
in ``tests/test_relion_projection.py``; ``projector.forward_model`` follows it).

In particle ``i`` a region point moves to ``M_i (p - c) + c + d_i`` (``c`` the
region's centre of mass, ``M_i`` an active rotation, ``d_i`` a shift in
pixels). It then appears at ``A_i M_i p + (A_i - A_i M_i) c + A_i d_i - o_i``:
the region's own standard pose is ``A_r = A_i M_i`` with origin
``o_r = o_i + fulcrum_shift(A_r, A_i, c) - (A_i d_i)_xy``.

SNR
---
``snr`` is the ratio of the variance of the clean (CTF-modulated) image, over
all ``N^2`` pixels of the box and averaged over the first 128 particles,
to the variance of the white Gaussian noise added. One noise level serves the
whole dataset, as in one optics group of real data.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ctf import CtfParams, ctf_2d
from .errors import InputError
from .fourier import fourier_to_image
from .geometry import (
    axis_angle_to_matrix,
    euler_to_matrix,
    fulcrum_shift,
    matrix_to_euler,
    quaternion_to_matrix,
)
from .masks import center_of_mass_px, create_soft_mask
from .models import DEFAULT_BFACTOR_A2, AtomModel, model_to_map
from .mrc_io import StackWriter, write_map
from .particles import make_particles, write_particles
from .projector import FourierProjector, forward_model

__all__ = [
    "NYQUIST_MARGIN_PX",
    "SimulatedDataset",
    "MotionTruth",
    "random_rotations",
    "draw_motions",
    "region_pose",
    "simulate_dataset",
]

log = logging.getLogger(__name__)

#: Projections stop this far (pixels) inside Nyquist. ``FourierProjector`` keeps a
#: frequency at exactly radius N/2 (e.g. ``(kx, ky) = (N/2, 0)``) only if the rotated
#: point's float64 radius does not exceed the limit, which flips with 1e-7 degree pose
#: changes (e.g. Euler angles rounded in a STAR file); leaving the Nyquist ring out
#: makes images reproducible from their STAR poses.
NYQUIST_MARGIN_PX = 1e-3

#: Particles whose clean images set the noise level (see SNR in the module docstring).
_PILOT = 128


@dataclass(frozen=True)
class SimulatedDataset:
    """What :func:`simulate_dataset` wrote, and the numbers a test needs.

    Attributes
    ----------
    output_dir : Path
    particles_star, truth_star, stack, map, body_map, region_map, region_mask,
    truth_json, truth_npz : Path
        The files written.
    n_particles, box : int
    pixel_size_a : float
    region_center_px : ndarray, shape (3,)
        The region's centre of mass ``c`` (x, y, z) in pixels from the box centre.
    noise_sigma : float
        Standard deviation of the added noise (map units x pixels).
    """

    output_dir: Path
    particles_star: Path
    truth_star: Path
    stack: Path
    map: Path
    body_map: Path
    region_map: Path
    region_mask: Path
    truth_json: Path
    truth_npz: Path
    n_particles: int
    box: int
    pixel_size_a: float
    region_center_px: np.ndarray
    noise_sigma: float


@dataclass(frozen=True)
class MotionTruth:
    """Per-particle rigid motion of the region: ``p -> M (p - c) + c + d``.

    Attributes
    ----------
    rotation : ndarray, shape (n, 3, 3)
        Active rotations ``M_i`` acting on ``(x, y, z)`` map coordinates.
    angle_deg : ndarray, shape (n,)
        Rotation angle of each ``M_i`` (degrees, >= 0).
    shift_px : ndarray, shape (n, 3)
        Shifts ``d_i`` in pixels, map coordinates ``(x, y, z)``.
    """

    rotation: np.ndarray
    angle_deg: np.ndarray
    shift_px: np.ndarray


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rotations uniform on SO(3) (normalised Gaussian quaternions), shape (n, 3, 3)."""
    return quaternion_to_matrix(rng.normal(size=(n, 4)))


def draw_motions(
    rng: np.random.Generator,
    n: int,
    *,
    rotation_deg: float,
    shift_a: float,
    pixel_size_a: float,
) -> MotionTruth:
    """Random rigid motions of the region.

    The axis is uniform on the sphere; the angle is Gaussian with standard
    deviation ``rotation_deg`` (degrees; its absolute value is the rotation
    angle). The shift is an isotropic 3D Gaussian whose root-mean-square length
    is ``shift_a`` Angstrom (``shift_a / sqrt(3)`` per axis).
    """
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    angle = rng.normal(0.0, rotation_deg, n) if rotation_deg > 0 else np.zeros(n)
    shift_a3 = (
        rng.normal(0.0, shift_a / np.sqrt(3.0), (n, 3))
        if shift_a > 0
        else np.zeros((n, 3))
    )
    return MotionTruth(
        rotation=axis_angle_to_matrix(axis, angle),
        angle_deg=np.abs(angle),
        shift_px=shift_a3 / pixel_size_a,
    )


def region_pose(
    a: np.ndarray, origin_px: np.ndarray, motion: MotionTruth, center_px: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The moved region's standard pose (see the module docstring).

    Parameters
    ----------
    a : ndarray, shape (n, 3, 3)
        Consensus RELION matrices ``A_i``.
    origin_px : ndarray, shape (n, 2)
        Consensus RELION origins ``o_i`` (pixels).
    motion : MotionTruth
        ``M_i`` and ``d_i``.
    center_px : ndarray, shape (3,)
        Region centre ``c`` (pixels from the box centre, x y z).

    Returns
    -------
    a_r : ndarray, shape (n, 3, 3)
        ``A_i @ M_i``.
    origin_r : ndarray, shape (n, 2)
        ``o_i + fulcrum_shift(A_r, A_i, c) - (A_i d_i)_xy``.
    """
    a_r = a @ motion.rotation  # (n, 3, 3)
    moved_shift = np.einsum("nij,nj->ni", a, motion.shift_px)[:, :2]  # (n, 2)
    origin_r = origin_px + fulcrum_shift(a_r, a, center_px) - moved_shift
    return a_r, origin_r


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_settings(
    model, n_particles, box, pixel_size_a, snr, rot, shift, defocus, batch
):
    problems = []
    if n_particles < 1:
        problems.append(f"n_particles is {n_particles}; expected >= 1")
    if box < 16:
        problems.append(f"box is {box}; expected >= 16 pixels")
    if not pixel_size_a > 0:
        problems.append(f"pixel size is {pixel_size_a}; expected > 0 Angstrom")
    if not snr > 0:
        problems.append(
            f"snr is {snr}; expected > 0 (use a large value for nearly clean data)"
        )
    if rot < 0 or shift < 0:
        problems.append(f"motion spreads {rot} deg, {shift} A; expected >= 0")
    if not 0 < defocus[0] <= defocus[1]:
        problems.append(f"defocus range {defocus} um; expected 0 < min <= max")
    if batch < 1:
        problems.append(f"batch_size is {batch}; expected >= 1")
    if not model.in_region.any() or model.in_region.all():
        problems.append(f"model {model.name} needs both body and region atoms")
    if problems:
        raise InputError(None, "; ".join(problems), "fix the simulation settings")


def simulate_dataset(
    model: AtomModel,
    *,
    output_dir,
    n_particles: int,
    box: int,
    pixel_size_a: float,
    snr: float,
    motion_rotation_deg: float,
    motion_shift_a: float,
    defocus_range_um: tuple[float, float] = (1.0, 2.5),
    seed: int = 0,
    max_origin_px: float = 3.0,
    astigmatism_a: float = 300.0,
    bfactor_a2: float = DEFAULT_BFACTOR_A2,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    mask_lowpass_a: float = 15.0,
    mask_extend_a: float = 3.0,
    mask_soft_edge_a: float = 6.0,
    batch_size: int = 256,
) -> SimulatedDataset:
    """Simulate particles of ``model`` whose region moves rigidly per particle.

    Parameters
    ----------
    model : AtomModel
        Coordinates in Angstrom; ``in_region`` marks the moving region. The
        whole model's centre of mass goes to the box centre.
    output_dir : str or Path
        Created if needed; files listed in the module docstring.
    n_particles : int
    box : int
        Image and map size ``N`` (pixels).
    pixel_size_a : float
        Angstrom per pixel.
    snr : float
        Signal-to-noise ratio of the images (definition in the module docstring).
    motion_rotation_deg : float
        Standard deviation (degrees) of the region's rotation angle about a
        random axis through its centre of mass.
    motion_shift_a : float
        Root-mean-square length (Angstrom) of the region's 3D shift.
    defocus_range_um : (float, float)
        Mean defocus uniform in this range (micrometres, underfocus positive).
    seed : int
        Every random draw derives from it; the same seed gives the same files.
    max_origin_px : float
        Consensus origins uniform in ``[-max, max]`` pixels on x and y.
    astigmatism_a : float
        ``defocus_u - defocus_v`` uniform in ``[0, astigmatism_a]`` Angstrom;
        astigmatism angle uniform in [0, 180) degrees.
    bfactor_a2 : float
        Atomic B-factor of the maps (Angstrom^2), see :func:`model_to_map`.
    voltage_kv, cs_mm, amplitude_contrast : float
        Optics (300 kV, 2.7 mm, 0.1 by default).
    mask_lowpass_a, mask_extend_a, mask_soft_edge_a : float
        Region mask: low-pass of the true region map (Angstrom), the masks
        module's default threshold, growth and raised-cosine edge (Angstrom).
    batch_size : int
        Images simulated and written at once (memory bound).

    Returns
    -------
    SimulatedDataset
    """
    _check_settings(
        model, n_particles, box, pixel_size_a, snr, motion_rotation_deg,
        motion_shift_a, defocus_range_um, batch_size,
    )  # fmt: skip
    t0 = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    # maps: the whole model's centre of mass at the box centre
    model_center_a = model.center_of_mass_a()
    radius_a = float(np.linalg.norm(model.xyz_a - model_center_a, axis=1).max())
    if radius_a > (box // 2) * pixel_size_a:
        # the maps fit the cube, but some projections would wrap around the image edge
        log.warning(
            "model %s reaches %.1f A from its centre, beyond the %.1f A radius of the "
            "box: some images will hold wrapped-around density; use box x pixel size "
            ">= %.0f A (or a smaller model)",
            model.name, radius_a, (box // 2) * pixel_size_a, 2 * radius_a,
        )  # fmt: skip
    body = model_to_map(
        model, box=box, pixel_size_a=pixel_size_a, atoms="body", bfactor_a2=bfactor_a2
    )
    region = model_to_map(
        model, box=box, pixel_size_a=pixel_size_a, atoms="region", bfactor_a2=bfactor_a2
    )
    full = body + region
    mask = create_soft_mask(
        region,
        pixel_size_a,
        lowpass_a=mask_lowpass_a,
        extend_a=mask_extend_a,
        soft_edge_a=mask_soft_edge_a,
    )
    paths = {
        "map": out / "map.mrc",
        "body_map": out / "body.mrc",
        "region_map": out / "region.mrc",
        "region_mask": out / "region_mask.mrc",
    }
    for key, vol in zip(paths, (full, body, region, mask), strict=True):
        write_map(paths[key], vol, pixel_size_a)
    center_px = (model.center_of_mass_a("region") - model_center_a) / pixel_size_a
    log.info(
        "maps written (%.1fs): body %.1f kDa, region %.1f kDa at (%.1f, %.1f, %.1f) px; "
        "mask centre (%.1f, %.1f, %.1f) px",
        time.perf_counter() - t0, model.mass_kda("body"), model.mass_kda("region"),
        *center_px, *center_of_mass_px(mask),
    )  # fmt: skip

    # per-particle parameters, all drawn up front (small arrays)
    n = n_particles
    a = random_rotations(rng, n)
    rot, tilt, psi = matrix_to_euler(a)
    a = euler_to_matrix(rot, tilt, psi)  # exactly the matrices of the written angles
    origin = rng.uniform(-max_origin_px, max_origin_px, (n, 2))
    mean_defocus = rng.uniform(*defocus_range_um, n) * 1e4
    astig = rng.uniform(0.0, astigmatism_a, n)
    ctf = CtfParams(
        defocus_u_a=mean_defocus + astig / 2,
        defocus_v_a=mean_defocus - astig / 2,
        defocus_angle_deg=rng.uniform(0.0, 180.0, n),
        voltage_kv=voltage_kv,
        cs_mm=cs_mm,
        amplitude_contrast=amplitude_contrast,
    )
    motion = draw_motions(
        rng,
        n,
        rotation_deg=motion_rotation_deg,
        shift_a=motion_shift_a,
        pixel_size_a=pixel_size_a,
    )
    a_r, origin_r = region_pose(a, origin, motion, center_px)
    rot_r, tilt_r, psi_r = matrix_to_euler(a_r)
    subset = np.arange(n) % 2 + 1

    # images, streamed in batches
    body_proj = FourierProjector(body)
    r_max = box // 2 - NYQUIST_MARGIN_PX
    region_proj = FourierProjector(region)

    def clean_images(idx: np.ndarray) -> np.ndarray:  # (m, N, N) float32
        ctf_b = CtfParams(
            **{k: np.broadcast_to(v, (n,))[idx] for k, v in vars(ctf).items()}
        )
        f = forward_model(body_proj, a[idx], origins_px=origin[idx], r_max_px=r_max)
        f += forward_model(
            region_proj, a_r[idx], origins_px=origin_r[idx], r_max_px=r_max
        )
        f *= ctf_2d(ctf_b, box, pixel_size_a)
        return fourier_to_image(f, box)

    # one noise level for the dataset, from the first _PILOT particles (whatever
    # the batch size, so that the same seed gives the same files)
    pilot = np.arange(min(n, _PILOT))
    pilot_var = np.concatenate(
        [
            clean_images(pilot[s : s + batch_size]).astype(np.float64).var(axis=(1, 2))
            for s in range(0, len(pilot), batch_size)
        ]
    )  # (pilot,)
    noise_sigma = float(np.sqrt(pilot_var.mean() / snr))
    stack = out / "particles.mrcs"
    with StackWriter(stack, n, box, pixel_size_a) as writer:
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            noisy = clean_images(idx)
            for j, i in enumerate(idx):
                noise_rng = np.random.default_rng([seed, 1, int(i)])
                noisy[j] += noise_sigma * noise_rng.standard_normal((box, box))
            writer.write(start, noisy)
            log.info("simulated %d / %d particles", idx[-1] + 1, n)

    refs = [(stack, i) for i in range(n)]
    optics = dict(
        voltage_kv=voltage_kv, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast
    )
    consensus = make_particles(
        image_refs=refs, rot_deg=rot, tilt_deg=tilt, psi_deg=psi, origin_px=origin,
        ctf=ctf, pixel_size_a=pixel_size_a, box=box, random_subset=subset, **optics,
    )  # fmt: skip
    truth = consensus.with_poses(rot_r, tilt_r, psi_r, origin_r)
    write_particles(out / "particles.star", consensus)
    write_particles(out / "truth.star", truth)
    _write_npz(
        out / "truth.npz",
        region_rotation=motion.rotation,
        region_angle_deg=motion.angle_deg,
        region_shift_px=motion.shift_px,
        region_center_px=center_px,
    )
    settings = dict(
        model=model.name, n_particles=n, box=box, pixel_size_a=pixel_size_a, snr=snr,
        motion_rotation_deg=motion_rotation_deg, motion_shift_a=motion_shift_a,
        defocus_range_um=list(defocus_range_um), seed=seed, max_origin_px=max_origin_px,
        astigmatism_a=astigmatism_a, bfactor_a2=bfactor_a2, voltage_kv=voltage_kv,
        cs_mm=cs_mm, amplitude_contrast=amplitude_contrast, mask_lowpass_a=mask_lowpass_a,
        mask_extend_a=mask_extend_a, mask_soft_edge_a=mask_soft_edge_a,
    )  # fmt: skip
    derived = dict(
        noise_sigma=noise_sigma,
        region_center_px=center_px.tolist(),
        region_center_a=(center_px * pixel_size_a).tolist(),
        model_center_a=model_center_a.tolist(),
        mass_body_kda=model.mass_kda("body"),
        mass_region_kda=model.mass_kda("region"),
        mask_center_px=center_of_mass_px(mask).tolist(),
        region_angle_deg_rms=float(np.sqrt(np.mean(motion.angle_deg**2))),
        region_shift_a_rms=float(
            np.sqrt(np.mean(np.sum(motion.shift_px**2, axis=1))) * pixel_size_a
        ),
        origin_convention="RELION: image = projection moved by -origin",
    )
    _write_json(out / "truth.json", {"settings": settings, "derived": derived})
    log.info(
        "simulated %d particles (box %d, %.3g A/px, SNR %.3g) in %.1fs",
        n, box, pixel_size_a, snr, time.perf_counter() - t0,
    )  # fmt: skip
    return SimulatedDataset(
        output_dir=out,
        particles_star=out / "particles.star",
        truth_star=out / "truth.star",
        stack=stack,
        map=paths["map"],
        body_map=paths["body_map"],
        region_map=paths["region_map"],
        region_mask=paths["region_mask"],
        truth_json=out / "truth.json",
        truth_npz=out / "truth.npz",
        n_particles=n,
        box=box,
        pixel_size_a=pixel_size_a,
        region_center_px=center_px,
        noise_sigma=noise_sigma,
    )
