"""Half-set reconstructions of a particle set, streamed in batches.

Each batch: ``particles.load_images(idx)`` (memory-mapped, never the whole
stack) -> :func:`.fourier.image_to_fourier` -> centre by shifting the content
by ``+origin`` (RELION's sign, see :func:`.projector.forward_model`) ->
:meth:`.backprojector.BackProjector.insert` with the particle's CTF
(:func:`.ctf.ctf_2d`) and rotation into the half given by
``particles.random_subset``.

The full map is regularised with the FSC of the two unregularised half maps:
the whole data set has twice the half-set SSNR,
``SSNR_full = 2 FSC / (1 - FSC)``, which is passed to
:meth:`.backprojector.BackProjector.reconstruct` as the FSC-equivalent
``2 FSC / (1 + FSC)`` (Spearman-Brown; RELION instead uses
``sqrt(2 FSC / (1 + FSC))``, Rosenthal & Henderson's ``C_ref``, for
``--join_random_halves``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backprojector import BackProjector
from .ctf import CtfBatch, ctf_subset
from .errors import InputError
from .fourier import image_to_fourier, shift_images_fourier

__all__ = [
    "batch_ctf",
    "half_set_accumulators",
    "insert_at_poses",
    "read_batch",
    "reconstruct_particles",
    "reconstruct_halves",
    "half_map_fsc",
]

log = logging.getLogger(__name__)


def read_batch(
    particles,
    idx: np.ndarray,
    *,
    workers: int = 1,
    ctf: bool = True,
    allocate: Callable[[tuple, np.dtype], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Transforms and CTFs of particles ``idx``, as every pass over the images needs them.

    Returns ``(images_f, ctf)``, each (m, N, N//2+1): the images read from
    their stacks (whose streamed pages are then dropped,
    ``Particles.release_pages``) and transformed (:func:`.fourier.image_to_fourier`),
    and their CTFs (:func:`.ctf.ctf_2d`; ones when the set has none, one
    read-only image viewed for all with stride 0, which a GPU search uploads
    once; None with ``ctf=False``). ``workers`` > 1 splits the transforms and CTFs over
    that many threads (SciPy's FFTs and NumPy release the GIL); the values do
    not depend on it. ``allocate(shape, dtype)``, if given, provides the
    array ``images_f`` is written into (e.g. page-locked host memory for the
    GPU's upload: ``kernels/host_staging.py``).
    """
    idx = np.asarray(idx)
    images = particles.load_images(idx)
    particles.release_pages()

    box = particles.box
    # without CTF parameters: one image of ones for all (a stride-0 view, so
    # that a GPU search uploads it once)
    ones = particles.ctf is None
    per_part = ctf and not ones

    def one(rows) -> tuple[np.ndarray, np.ndarray | None]:
        return (
            image_to_fourier(images[rows]),
            np.asarray(batch_ctf(particles, idx[rows])) if per_part else None,
        )

    parts = np.array_split(np.arange(idx.size), max(1, min(int(workers), idx.size)))
    if len(parts) == 1:
        done = [one(slice(None))]
    else:
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            done = list(pool.map(one, parts))
    transforms = [f for f, _ in done]
    if allocate is not None:
        images_f = allocate((idx.size,) + transforms[0].shape[1:], transforms[0].dtype)
        np.concatenate(transforms, out=images_f)
    elif len(transforms) == 1:
        images_f = transforms[0]
    else:
        images_f = np.concatenate(transforms)
    if not ctf:
        return images_f, None
    if ones:
        shape = (idx.size, box, box // 2 + 1)
        return images_f, np.broadcast_to(np.ones(shape[1:], np.float32), shape)
    return images_f, done[0][1] if len(done) == 1 else np.concatenate(
        [c for _, c in done]
    )


def batch_ctf(particles, idx: np.ndarray) -> CtfBatch:
    """The CTFs of particles ``idx`` as parameters, not yet evaluated.

    A :class:`.ctf.CtfBatch` of the set's CTF parameters for those particles,
    at its box and pixel size: ``np.asarray`` gives their (m, N, N//2+1) CTFs
    (:func:`.ctf.ctf_2d`), and a GPU search evaluates it on the device.
    """
    idx = np.asarray(idx)
    return CtfBatch(
        ctf_subset(particles.ctf, idx, particles.n),
        particles.box,
        particles.pixel_size_a,
        idx.size,
    )


def half_set_accumulators(
    box: int,
    *,
    padding: int = 2,
    r_max_px: float | None = None,
    backprojector: Callable[..., BackProjector] = BackProjector,
) -> tuple[BackProjector, BackProjector]:
    """Empty accumulators of half sets 1 and 2 (box ``N`` pixels).

    ``backprojector(box, padding=, r_max_px=)`` makes each:
    :class:`.backprojector.BackProjector` or its GPU twin
    (``refine_device.Backend.backprojector``); ``r_max_px`` defaults to
    Nyquist.
    """
    return (
        backprojector(box, padding=padding, r_max_px=r_max_px),
        backprojector(box, padding=padding, r_max_px=r_max_px),
    )


def insert_at_poses(
    bp: BackProjector,
    f_images: np.ndarray,
    rotations: np.ndarray,
    origins_px: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    ctf: np.ndarray | None = None,
) -> None:
    """Centre and insert ``m`` images at one pose each, or at ``k`` weighted poses each.

    Parameters
    ----------
    bp : BackProjector
        The accumulator (or its GPU twin).
    f_images : ndarray, shape (m, N, N//2+1), complex
        Image transforms (:func:`.fourier.image_to_fourier`), not yet centred.
    rotations : ndarray, shape (m, 3, 3) or (m, k, 3, 3)
        RELION matrices ``A``.
    origins_px : ndarray, shape (m, 2) or (m, k, 2)
        Origins ``(x, y)`` in pixels, RELION's sign: the content is shifted by
        ``+origin`` before insertion (:func:`.fourier.shift_images_fourier`).
    weights : ndarray, shape (m, k), optional
        Pose weights for ``k`` poses per image (marginalisation); without
        them, one pose per image with weight 1.
    ctf : ndarray, shape (m, N, N//2+1), optional
        CTF of each image (CTF-weighted insertion); ``None`` inserts without.
    """
    if weights is None:
        bp.insert(shift_images_fourier(f_images, origins_px), rotations, ctf=ctf)
        return
    for j in range(np.shape(weights)[1]):
        centred = shift_images_fourier(f_images, origins_px[:, j])
        bp.insert(centred, rotations[:, j], ctf=ctf, weights=weights[:, j])


def _check(particles, top_k_poses) -> None:
    where = getattr(particles, "star_path", None)
    if particles.n == 0:
        raise InputError(where, "the particle set is empty", "select some particles")
    if not particles.has_poses and top_k_poses is None:
        raise InputError(
            where,
            "particles have no poses (rlnAngleRot/Tilt/Psi)",
            "run a consensus refinement first and pass its particles STAR file",
        )
    halves = set(np.unique(particles.random_subset).tolist())
    if not halves <= {1, 2}:
        raise InputError(
            where,
            f"rlnRandomSubset must be 1 or 2; found {sorted(halves)}",
            "fix the column or remove it (then halves are assigned by row)",
        )


def reconstruct_particles(
    particles,
    *,
    batch_size: int = 256,
    padding: int = 2,
    r_max_px: float | None = None,
    indices: np.ndarray | None = None,
    top_k_poses: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    apply_ctf: bool = True,
    backprojector: Callable[..., BackProjector] = BackProjector,
) -> tuple[BackProjector, BackProjector]:
    """Back-project every particle into the accumulator of its half set.

    Parameters
    ----------
    particles : Particles
        From :func:`.particles.read_particles` (poses, ``origin_px``, ``ctf``,
        ``random_subset``, ``load_images``).
    batch_size : int
        Images read and inserted at once.
    padding : int
        Fourier oversampling (2, as RELION).
    r_max_px : float, optional
        Largest frequency inserted, cycles per box (default Nyquist).
    indices : ndarray of int, optional
        Only these particles (0-based); default all.
    top_k_poses : (rotations, origins_px, weights), optional
        Several poses per particle, shapes ``(n, k, 3, 3)``, ``(n, k, 2)``
        (pixels, RELION sign) and ``(n, k)``: each image is inserted ``k``
        times with these weights instead of once at the particle's pose.
    apply_ctf : bool
        Use ``particles.ctf`` (when present) for CTF-weighted insertion.
    backprojector : callable
        ``backprojector(box, padding=, r_max_px=)`` makes each half's
        accumulator: :class:`.backprojector.BackProjector` (default) or its
        GPU twin (``refine_device.Backend.backprojector``).

    Returns
    -------
    half1, half2 : BackProjector
        Accumulators of half sets 1 and 2.
    """
    _check(particles, top_k_poses)
    n, box = particles.n, particles.box
    idx_all = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    halves = half_set_accumulators(
        box, padding=padding, r_max_px=r_max_px, backprojector=backprojector
    )
    rotations = particles.matrices() if top_k_poses is None else None
    use_ctf = apply_ctf and particles.ctf is not None
    if apply_ctf and particles.ctf is None:
        log.warning(
            "no CTF in the particle set: images inserted without CTF correction"
        )
    t0 = time.monotonic()
    done, next_report = 0, 0.0
    for start in range(0, idx_all.size, batch_size):
        idx = idx_all[start : start + batch_size]
        f, ctf = read_batch(particles, idx, ctf=use_ctf)  # (m, N, N//2+1) each
        subset = particles.random_subset[idx]
        for half in (1, 2):
            sel = np.flatnonzero(subset == half)
            if sel.size == 0:
                continue
            rows = idx[sel]
            if top_k_poses is None:
                poses = (rotations[rows], particles.origin_px[rows], None)
            else:
                poses = tuple(a[rows] for a in top_k_poses)
            insert_at_poses(
                halves[half - 1], f[sel], *poses, ctf=None if ctf is None else ctf[sel]
            )
        done += idx.size
        elapsed = time.monotonic() - t0
        if elapsed >= next_report or done == idx_all.size:
            log.info(
                "back-projected %d / %d particles (%.0f images/s)",
                done,
                idx_all.size,
                done / max(elapsed, 1e-9),
            )
            next_report = elapsed + 10.0
    return halves


def half_map_fsc(half1: np.ndarray, half2: np.ndarray) -> np.ndarray:
    """Plain (unmasked) FSC per shell ``0 .. N//2`` of two half maps.

    Uses :func:`.fsc.fsc_curve`.
    """
    from .fsc import fsc_curve

    return fsc_curve(half1, half2)


def reconstruct_halves(
    particles,
    *,
    batch_size: int = 256,
    padding: int = 2,
    r_max_px: float | None = None,
    half_fsc: np.ndarray | None = None,
    tau2_fudge: float = 1.0,
    top_k_poses: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    apply_ctf: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half maps and the FSC-regularised full map.

    Parameters
    ----------
    particles, batch_size, padding, r_max_px, top_k_poses, apply_ctf
        As :func:`reconstruct_particles`.
    half_fsc : ndarray, shape (N//2+1,), optional
        An FSC (e.g. from the previous iteration) to regularise each half map
        with; default: half maps are not regularised (``wiener_constant``
        floor only).
    tau2_fudge : float
        Multiplies the SSNR of every regularised reconstruction.

    Returns
    -------
    half1, half2, full : ndarray, shape (N, N, N), float32
        ``full`` is reconstructed from both halves' accumulators, Wiener
        regularised with the FSC of ``half1`` and ``half2`` (see the module
        docstring).
    """
    bp1, bp2 = reconstruct_particles(
        particles,
        batch_size=batch_size,
        padding=padding,
        r_max_px=r_max_px,
        top_k_poses=top_k_poses,
        apply_ctf=apply_ctf,
    )
    for half, bp in ((1, bp1), (2, bp2)):
        if bp.n_inserted == 0:
            raise InputError(
                getattr(particles, "star_path", None),
                f"half set {half} is empty (rlnRandomSubset)",
                "use a particle set with both half sets",
            )
    half1 = bp1.reconstruct(fsc=half_fsc, tau2_fudge=tau2_fudge)
    half2 = bp2.reconstruct(fsc=half_fsc, tau2_fudge=tau2_fudge)
    fsc = half_map_fsc(half1, half2)
    fsc_full = 2 * np.clip(fsc, 0.0, 1.0) / (1 + np.clip(fsc, 0.0, 1.0))
    bp1.add(bp2)
    full = bp1.reconstruct(fsc=fsc_full, tau2_fudge=tau2_fudge)
    return half1, half2, full
