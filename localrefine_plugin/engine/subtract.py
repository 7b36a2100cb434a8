"""Signal subtraction: remove the reference's signal outside a mask from each particle.

For particle ``i`` with pose ``A_i``, RELION origin ``o_i`` and CTF ``C_i``
(``docs/conventions.md``; the projection is moved by ``-o_i``, as
:func:`.projector.forward_model` does)::

    P_i   = C_i * shift(project(reference, A_i), -o_i)              (Fourier)
    Q_i   = C_i * shift(project(reference * (1 - mask), A_i), -o_i)
    s_i   = sum_w Re(conj(P_i) X_i) / sum_w |P_i|^2                 (scale)
    X'_i  = X_i - s_i Q_i

``X_i`` is the particle's transform. The sums run over the full Fourier plane
(half-plane coefficients with ``kx > 0`` counted twice) restricted to the band
of resolutions from ``scale_band_a[0]`` (default 50 Angstrom, excluding the
lowest frequencies where background and ice dominate) to ``scale_band_a[1]``
(default Nyquist): ``s_i`` is the least-squares scale of the full reference's
projection to the particle, for white noise. With ``half_maps`` each particle
uses the half map of its own ``rlnRandomSubset`` for both ``P`` and ``Q``, so
that the two half sets stay independent.

Re-centring and re-boxing
-------------------------
With ``recenter``, ``F`` is the mask's centre of mass rounded to the nearest
voxel (pixels from the box centre, ``x, y, z``). It appears in particle ``i`` at
``(A_i F)_xy - o_i``; the image is moved by the integer part ``t_int`` of
``t_i = o_i - (A_i F)_xy`` (an exact circular shift), and the remainder is
kept as the new origin ``o'_i = t_i - t_int`` (|o'| <= 0.5 px). The maps are
re-boxed about voxel ``N // 2 + F``, so a point ``p'`` of the new map (the old
point ``p' + F``) appears at ``(A_i p')_xy - o'_i``: the rotations are
unchanged. ``new_box`` then crops images and maps about their centres.
Cropping a particle loses the part of the region's signal that the CTF
delocalises beyond the new box (about ``wavelength * defocus / d``, e.g.
120 Angstrom for 2.5 um defocus at 4 Angstrom): keep the box generous at
high defocus.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ctf import CtfParams, ctf_2d
from .errors import InputError
from .fourier import fourier_to_image, image_to_fourier, radius_grid_2d
from .masks import center_of_mass_px
from .mrc_io import StackWriter, write_map
from .particles import Particles, write_particles
from .projector import FourierProjector, forward_model
from .simulate import NYQUIST_MARGIN_PX
from .star import read_star, write_star

__all__ = [
    "SubtractionResult",
    "scale_weights",
    "recenter_map",
    "recenter_images",
    "subtract_particles",
]

log = logging.getLogger(__name__)

#: Default band of the per-particle scale fit (Angstrom): 50 A to Nyquist.
DEFAULT_SCALE_BAND_A = (50.0, None)


@dataclass(frozen=True)
class SubtractionResult:
    """What :func:`subtract_particles` wrote.

    Attributes
    ----------
    particles_star, stack : Path
        ``DIR/particles.star`` and ``DIR/particles_subtracted.mrcs``.
    reference, mask : Path or None
        ``DIR/reference.mrc`` and ``DIR/mask.mrc`` (re-centred and/or re-boxed;
        written when ``recenter`` or ``new_box`` is used).
    half_maps : tuple of Path or None
        ``DIR/reference_half1.mrc``, ``DIR/reference_half2.mrc`` likewise.
    box : int
        Output box (pixels).
    shift_voxels : ndarray, shape (3,), int
        ``F``, the voxel (x, y, z from the old centre) that is the new centre
        (zeros without ``recenter``).
    scales : ndarray, shape (n,)
        Per-particle scale ``s_i``.
    origin_px : ndarray, shape (n, 2)
        The output origins (RELION sign, pixels).
    """

    particles_star: Path
    stack: Path
    reference: Path | None
    mask: Path | None
    half_maps: tuple[Path, Path] | None
    box: int
    shift_voxels: np.ndarray
    scales: np.ndarray
    origin_px: np.ndarray


def scale_weights(
    n: int, pixel_size_a: float, band_a=DEFAULT_SCALE_BAND_A
) -> np.ndarray:
    """Weights of the half-plane coefficients in the scale fit, shape (N, N//2+1).

    2 for ``kx > 0`` (the coefficient and its Friedel mate), 1 for ``kx = 0`` and,
    for even ``N``, ``kx = N/2``; 0 outside the band ``band_a = (low, high)``
    (Angstrom; None: no limit) and at frequency 0.
    """
    radius = radius_grid_2d(n)
    w = np.full(radius.shape, 2.0)
    w[:, 0] = 1.0
    if n % 2 == 0:
        w[:, -1] = 1.0
    low_a, high_a = band_a
    inside = radius > 0
    with np.errstate(divide="ignore"):
        res_a = np.where(
            radius > 0, n * pixel_size_a / np.maximum(radius, 1e-300), np.inf
        )
    if low_a is not None:
        inside &= res_a <= low_a
    if high_a is not None:
        inside &= res_a >= high_a
    inside &= radius <= n // 2
    return np.where(inside, w, 0.0)


def recenter_map(volume: np.ndarray, shift_voxels, new_box: int) -> np.ndarray:
    """Re-box a map about voxel ``N // 2 + F``: ``new[p' + new_box // 2] = old[p' + F + N // 2]``.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N), ``[z, y, x]``
    shift_voxels : array_like of int, shape (3,)
        ``F`` as ``(x, y, z)`` voxels from the old centre.
    new_box : int

    Returns
    -------
    ndarray, shape (new_box,) * 3, float32; zero where the window leaves the old box.
    """
    volume = np.asarray(volume)
    n = volume.shape[0]
    fx, fy, fz = (int(v) for v in shift_voxels)
    out = np.zeros((new_box,) * 3, dtype=np.float32)
    src, dst = [], []
    for f in (fz, fy, fx):  # array axes z, y, x
        start = n // 2 + f - new_box // 2  # old index of new index 0
        lo, hi = max(start, 0), min(start + new_box, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def recenter_images(
    images: np.ndarray, shifts_px: np.ndarray, new_box: int
) -> np.ndarray:
    """Move images by integer pixels (circularly) and crop them about the centre.

    Parameters
    ----------
    images : ndarray, shape (m, N, N), ``[i, y, x]``
    shifts_px : ndarray of int, shape (m, 2)
        ``(dx, dy)``: content moves to larger x, y.
    new_box : int

    Returns
    -------
    ndarray, shape (m, new_box, new_box), float32
    """
    n = images.shape[-1]
    start = n // 2 - new_box // 2
    out = np.empty((len(images), new_box, new_box), dtype=np.float32)
    for j, (dx, dy) in enumerate(np.asarray(shifts_px, dtype=np.int64)):
        moved = np.roll(images[j], (int(dy), int(dx)), axis=(0, 1))
        out[j] = moved[start : start + new_box, start : start + new_box]
    return out


def _check_inputs(particles, reference, mask, half_maps, new_box, output_dir):
    where = None if particles.star_path is None else str(particles.star_path)
    particles.require_poses()
    n = particles.box
    maps = {"reference": reference, "mask": mask}
    if half_maps is not None:
        if len(half_maps) != 2:
            raise InputError(
                None, f"{len(half_maps)} half maps given", "give exactly two"
            )
        maps.update(half_map_1=half_maps[0], half_map_2=half_maps[1])
    for name, vol in maps.items():
        if np.shape(vol) != (n, n, n):
            raise InputError(
                where,
                f"the {name} is {np.shape(vol)} voxels but the particles are {n} px",
                "use maps on the particles' box and pixel size",
            )
    if new_box is not None and not 16 <= new_box <= n:
        raise InputError(None, f"new box {new_box} px", f"choose 16 to {n} px")
    out = Path(output_dir).absolute()
    inputs = set(particles.stack_paths)
    if particles.star_path is not None:
        inputs.add(Path(particles.star_path).absolute())
    for name in ("particles.star", "particles_subtracted.mrcs"):
        if (out / name).absolute() in {Path(os.path.abspath(p)) for p in inputs}:
            raise InputError(
                out / name,
                "the output would overwrite an input file",
                "choose another --output",
            )


def _write_star(path: Path, particles: Particles, stack: Path, box: int) -> None:
    """``write_particles``, then point ``rlnImageName`` at the new stack and set the box.

    The input's image names move to ``rlnImageOriginalName`` (kept if present).
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_particles(tmp, particles)
        doc = read_star(tmp)
        block = doc["particles"]
        if not block.has_column("rlnImageOriginalName"):  # as RELION's subtraction
            block.set_column("rlnImageOriginalName", block.column("rlnImageName"))
        rel = os.path.relpath(stack.absolute(), path.parent.absolute())
        block.set_column(
            "rlnImageName", [f"{i + 1:06d}@{rel}" for i in range(particles.n)]
        )
        optics = doc["optics"]
        optics.set_column("rlnImageSize", np.full(optics.n_rows, box, dtype=np.int64))
        write_star(path, doc)
    finally:
        if tmp.exists():
            tmp.unlink()


def subtract_particles(
    particles: Particles,
    reference: np.ndarray,
    mask: np.ndarray,
    *,
    output_dir,
    half_maps: tuple[np.ndarray, np.ndarray] | None = None,
    recenter: bool = False,
    new_box: int | None = None,
    batch_size: int = 256,
    scale_band_a: tuple[float | None, float | None] = DEFAULT_SCALE_BAND_A,
) -> SubtractionResult:
    """Subtract the reference's projection outside ``mask`` from every particle.

    Parameters
    ----------
    particles : Particles
        With poses (RELION matrices, origins in pixels) and, normally, CTF.
        The input files are only read.
    reference : ndarray, shape (N, N, N), float32
        The consensus map ``[z, y, x]`` on the particles' box and pixel size.
    mask : ndarray, shape (N, N, N)
        Soft mask in [0, 1] around the region to keep.
    output_dir : str or Path
        Receives ``particles.star``, ``particles_subtracted.mrcs`` and, with
        ``recenter`` or ``new_box``, ``reference.mrc``, ``mask.mrc`` (and
        ``reference_half1/2.mrc``) on the new grid. Every write is atomic.
    half_maps : (ndarray, ndarray), optional
        Half maps; particle ``i`` uses the one of its ``random_subset``.
    recenter : bool
        Move the mask's centre of mass to the image centre (module docstring).
    new_box : int, optional
        Crop the output images and maps to this box (pixels).
    batch_size : int
        Particles processed at once.
    scale_band_a : (float or None, float or None)
        Resolution band (Angstrom) of the scale fit; None: no limit.

    Returns
    -------
    SubtractionResult
    """
    _check_inputs(particles, reference, mask, half_maps, new_box, output_dir)
    t0 = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_img, n, px = particles.n, particles.box, particles.pixel_size_a
    box = n if new_box is None else int(new_box)
    mask = np.asarray(mask, dtype=np.float32)
    maps = [np.asarray(reference, np.float32)] if half_maps is None else [
        np.asarray(h, np.float32) for h in half_maps
    ]  # fmt: skip
    projectors = [
        (FourierProjector(m), FourierProjector(m * (1.0 - mask))) for m in maps
    ]
    half_of = (
        np.zeros(n_img, dtype=np.int64)
        if half_maps is None
        else particles.random_subset - 1
    )
    rotations = particles.matrices()  # (n, 3, 3)
    origins = particles.origin_px
    weights = scale_weights(n, px, scale_band_a)  # (N, N//2+1)
    r_max = n // 2 - NYQUIST_MARGIN_PX

    shift_voxels = np.zeros(3, dtype=np.int64)
    if recenter:
        shift_voxels = np.rint(center_of_mass_px(mask)).astype(np.int64)
        t = (
            origins
            - np.einsum("nij,j->ni", rotations, shift_voxels.astype(np.float64))[:, :2]
        )
        t_int = np.rint(t).astype(np.int64)  # (n, 2) integer image shifts
        new_origins = t - t_int
        log.info(
            "re-centring on mask voxel (%d, %d, %d) from the box centre", *shift_voxels
        )
    else:
        t_int = np.zeros((n_img, 2), dtype=np.int64)
        new_origins = origins.copy()
    if new_box is not None:
        kept = recenter_map(mask, shift_voxels, box).sum() / max(
            float(mask.sum()), 1e-30
        )
        if kept < 0.99:
            log.warning(
                "new box %d px keeps only %.1f%% of the mask: choose a larger --new-box",
                box, 100 * kept,
            )  # fmt: skip

    stack = out / "particles_subtracted.mrcs"
    scales = np.empty(n_img)
    with StackWriter(stack, n_img, box, px) as writer:
        for start in range(0, n_img, batch_size):
            idx = np.arange(start, min(start + batch_size, n_img))
            x = image_to_fourier(particles.load_images(idx))  # (m, N, N//2+1) complex64
            ctf = None
            if particles.ctf is not None:
                sub = {
                    k: np.broadcast_to(v, (n_img,))[idx]
                    for k, v in vars(particles.ctf).items()
                }
                ctf = ctf_2d(CtfParams(**sub), n, px)
            for h, (full_proj, out_proj) in enumerate(projectors):
                sel = np.flatnonzero(half_of[idx] == h)
                if sel.size == 0:
                    continue
                c = None if ctf is None else ctf[sel]
                a, o = rotations[idx[sel]], origins[idx[sel]]
                p = forward_model(full_proj, a, origins_px=o, ctf=c, r_max_px=r_max)
                num = np.einsum("kl,mkl->m", weights, (np.conj(p) * x[sel]).real)
                den = np.einsum("kl,mkl->m", weights, np.abs(p) ** 2)
                s = num / np.maximum(den, 1e-30)
                scales[idx[sel]] = s
                q = forward_model(out_proj, a, origins_px=o, ctf=c, r_max_px=r_max)
                x[sel] -= s[:, None, None].astype(np.float32) * q
            images = fourier_to_image(x, n)
            if recenter or box != n:
                images = recenter_images(images, t_int[idx], box)
            writer.write(start, images)
            log.info("subtracted %d / %d particles", idx[-1] + 1, n_img)

    result_particles = particles.with_poses(
        particles.rot_deg, particles.tilt_deg, particles.psi_deg, new_origins
    )
    _write_star(out / "particles.star", result_particles, stack, box)
    ref_path = mask_path = halves = None
    if recenter or new_box is not None:
        ref_path, mask_path = out / "reference.mrc", out / "mask.mrc"
        write_map(ref_path, recenter_map(reference, shift_voxels, box), px)
        write_map(mask_path, recenter_map(mask, shift_voxels, box), px)
        if half_maps is not None:
            halves = (out / "reference_half1.mrc", out / "reference_half2.mrc")
            for path, vol in zip(halves, half_maps, strict=True):
                write_map(path, recenter_map(vol, shift_voxels, box), px)
    log.info(
        "subtracted %d particles (box %d -> %d px%s) in %.1fs; scale median %.3f "
        "(5-95%%: %.3f-%.3f)",
        n_img, n, box, ", re-centred" if recenter else "", time.perf_counter() - t0,
        np.median(scales), *np.percentile(scales, [5, 95]),
    )  # fmt: skip
    return SubtractionResult(
        particles_star=out / "particles.star",
        stack=stack,
        reference=ref_path,
        mask=mask_path,
        half_maps=halves,
        box=box,
        shift_voxels=shift_voxels,
        scales=scales,
        origin_px=new_origins,
    )
