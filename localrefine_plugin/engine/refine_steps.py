"""The steps of one refinement iteration, each a thin call into its engine module.

* :func:`align_particles` - the local search (``search.local_search``) of every
  particle against its own half set's masked reference, in batches, around the
  consensus poses; given the half sets' accumulators
  (:func:`.reconstruct.half_set_accumulators`) it also inserts each batch at its
  new poses while its images are in memory, so the reconstruction needs no
  pass over the images of its own;
* :func:`reconstruct_and_compare` - half maps from those accumulators and
  their masked, corrected FSC (``fsc.py``);
* :func:`estimate_noise` - sigma^2 per optics group and shell (``noise.py``);
* :func:`dynamic_mask` - the mask recomputed from the current map.

Nothing here is random, and batches are processed in a fixed order, so a run
continued from a checkpoint reproduces an uninterrupted one.

Under MPI (``comm``, :mod:`.parallel`) each rank takes its share of the same
batches and the partial results are summed over the ranks at the end of each
step, so every rank returns the same poses, maps and noise model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import fsc as fsc_mod
from . import masks, noise, reconstruct, search
from .backprojector import BackProjector
from .parallel import SerialComm
from .progress import Progress
from .projector import FourierProjector, forward_model
from .reconstruct import batch_ctf, insert_at_poses, read_batch
from .refine_device import Backend
from .search_ops import search_batch_size, search_threads

__all__ = [
    "AlignmentResult",
    "align_particles",
    "prefetched",
    "Reconstruction",
    "reconstruct_and_compare",
    "estimate_noise",
    "dynamic_mask",
    "group_rows",
    "signal_radius_px",
]

log = logging.getLogger(__name__)


@dataclass
class AlignmentResult:
    """Poses found by one alignment pass (all particles, file order).

    Attributes
    ----------
    rotations : ndarray, shape (n, 3, 3)
        Best RELION matrices ``A`` (standard poses about the box centre).
    origins_px : ndarray, shape (n, 2)
        Best origins ``(x, y)`` in pixels.
    scores : ndarray, shape (n,)
        Best scores (negative log-likelihood differences; lower is better).
    poses_evaluated : ndarray, shape (n,)
        Poses scored per particle.
    top_rotations, top_origins_px, top_weights : ndarray or None
        With marginalisation (K > 1): (n, K, 3, 3), (n, K, 2) and (n, K).
    seconds_setup : float
        Seconds spent on the two references' padded transforms (the pass's
        cost that does not grow with the number of particles).
    """

    rotations: np.ndarray
    origins_px: np.ndarray
    scores: np.ndarray
    poses_evaluated: np.ndarray
    top_rotations: np.ndarray | None = None
    top_origins_px: np.ndarray | None = None
    top_weights: np.ndarray | None = None
    seconds_setup: float = 0.0


def signal_radius_px(
    mask: np.ndarray, fulcrum_px: np.ndarray, *, level: float = 0.01
) -> float:
    """Largest distance (pixels) from the fulcrum to a voxel where ``mask > level``."""
    n = mask.shape[0]
    z, y, x = np.nonzero(mask > level)
    c = n // 2
    d = np.sqrt(
        (x - c - fulcrum_px[0]) ** 2
        + (y - c - fulcrum_px[1]) ** 2
        + (z - c - fulcrum_px[2]) ** 2
    )
    return float(d.max()) if d.size else 0.3 * n


def group_rows(optics_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optics group ids -> (sorted distinct ids, row of each particle in sigma^2)."""
    ids, rows = np.unique(np.asarray(optics_group), return_inverse=True)
    return ids, rows


def prefetched(prepare: Callable, work: Callable, items: list) -> Iterator:
    """``work(*prepare(item))`` for each item, in order, with ``prepare`` of the
    next item running in a second thread while ``work`` runs on this one.

    So a batch's reading, FFTs and CTFs (NumPy and SciPy release the GIL) overlap
    the previous batch's search; results and their order are those of the plain
    loop. ``work`` stays on the calling thread (the GPU's context lives there).
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(prepare, items[0]) if items else None
        for i in range(len(items)):
            ready = ahead.result()
            ahead = pool.submit(prepare, items[i + 1]) if i + 1 < len(items) else None
            yield work(*ready)


def _insertion_poses(result, k: int) -> tuple:
    """``(rotations, origins_px, weights)`` to insert a batch at: its K best
    poses with their weights when marginalising (K > 1), else its best."""
    if k > 1:
        return result.top_rotations, result.top_origins_px, result.top_weights
    return result.rotations, result.origins_px, None


def _batches(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [indices[i : i + batch_size] for i in range(0, indices.size, batch_size)]


def align_particles(
    particles,
    references: np.ndarray,
    sigma2: np.ndarray,
    *,
    consensus_rotations: np.ndarray,
    consensus_origins_px: np.ndarray,
    fulcrum_px: np.ndarray,
    options,
    r_max_px: float,
    score_fn,
    power_fn,
    label: str,
    signal_radius_px: float | None = None,
    comm=None,
    accumulators: tuple[BackProjector, BackProjector] | None = None,
) -> AlignmentResult:
    """Local search of every particle against its half set's masked reference.

    Parameters
    ----------
    particles : Particles
    references : ndarray, shape (2, N, N, N), float32
        Masked references of half sets 1 and 2.
    sigma2 : ndarray, shape (n_groups, N//2+1)
        Noise power per optics group (rows in :func:`group_rows` order).
    consensus_rotations : ndarray, shape (n, 3, 3)
    consensus_origins_px : ndarray, shape (n, 2)
        The input poses: the search extents bound the change from these.
    fulcrum_px : ndarray, shape (3,)
        Pivot of the rotations, pixels from the box centre (x, y, z).
    options : RefineOptions
    r_max_px : float
        Fourier radius used for scoring (cycles per box).
    score_fn : callable
        ``scoring.score_poses`` or the GPU replacement (:mod:`.refine_device`).
    power_fn : callable
        ``scoring.weighted_projection_power`` or the GPU replacement.
    label : str
        Prefix of the progress lines.
    signal_radius_px : float, optional
        Radius about the fulcrum holding the masked signal (pixels), for the
        search's bounds (:func:`signal_radius_px`).
    comm : SerialComm or MpiComm, optional
        Ranks sharing the batches (:mod:`.parallel`); default one process.
    accumulators : (BackProjector, BackProjector), optional
        Half sets 1 and 2 (:func:`.reconstruct.half_set_accumulators`): each batch is inserted
        into its half's accumulator at its new poses (the K best, weighted,
        when marginalising) with its CTF, as
        :func:`.reconstruct.reconstruct_particles` would insert it, right after
        its search and from the same images. Not summed over the ranks here
        (:func:`reconstruct_and_compare` does). GPU accumulators
        (``insert_resident``) with one batch searched at a time take each
        batch from the search's device copies of its images and CTFs, shifted
        on the GPU, before the search frees them.
    """
    comm = SerialComm() if comm is None else comm
    n, px = particles.n, particles.pixel_size_a
    if accumulators is not None and particles.ctf is None:
        log.warning(
            "no CTF in the particle set: images inserted without CTF correction"
        )
    _, rows = group_rows(particles.optics_group)
    k = int(options.marginalize_top_k)
    prior_shift_px = (
        None
        if options.prior_sigma_shift_a is None
        else options.prior_sigma_shift_a / px
    )
    # zeros: under MPI each particle's entries are filled on one rank and summed
    out = AlignmentResult(
        rotations=np.zeros((n, 3, 3)),
        origins_px=np.zeros((n, 2)),
        scores=np.zeros(n),
        poses_evaluated=np.zeros(n, dtype=np.int64),
    )
    if k > 1:
        out.top_rotations = np.zeros((n, k, 3, 3))
        out.top_origins_px = np.zeros((n, k, 2))
        out.top_weights = np.zeros((n, k))
    subsets = np.asarray(particles.random_subset)
    batch = options.batch_size_for(particles.box, gpu=hasattr(score_fn, "bind_batch"))
    if not options.batch_size:
        log.info(
            "%s: batches of %d particles (--batch-size 0: automatic)", label, batch
        )
    shares = {
        half: comm.share(_batches(np.flatnonzero(subsets == half), batch))
        for half in (1, 2)
    }
    progress = Progress(sum(b.size for h in (1, 2) for b in shares[h]), label, log)
    threads = search_threads(score_fn, options.threads)  # 1 on the GPU
    # one batch searched at a time (the GPU's way, or --threads 1): the next
    # batch is prepared meanwhile with --threads threads; batches searched in
    # parallel (the CPU's --threads N) prepare their own in one thread each
    prep_workers = int(options.threads) if threads == 1 else 1
    has_ctf = particles.ctf is not None
    # the GPU's search (its batch ops keep the images and CTFs on the device)
    # and GPU accumulators: each batch is inserted from those device copies (no
    # second upload, shifts on the GPU) while the search still holds them
    resident = (
        accumulators is not None
        and hasattr(score_fn, "bind_batch")
        and all(hasattr(a, "insert_resident") for a in accumulators)
    )
    # a search that evaluates CTFs where it scores (the GPU's) gets their
    # parameters: no host CTFs, and none uploaded
    lazy_ctf = has_ctf and getattr(score_fn, "evaluates_ctf", False)
    # the GPU's page-locked buffers for the transforms of the next batches,
    # made here in the context's thread and filled by the preparing threads
    staging = getattr(score_fn, "upload_buffers", None)
    allocate = None
    if staging is not None and threads == 1:
        n = particles.box
        allocate = staging(batch * n * (n // 2 + 1) * 8)  # complex64
    for half in (1, 2):
        t0 = time.monotonic()
        projector = FourierProjector(references[half - 1], padding=2, r_max_px=r_max_px)
        out.seconds_setup += time.monotonic() - t0

        def prepare(idx: np.ndarray):
            read = dict(workers=prep_workers, allocate=allocate)
            if not lazy_ctf:
                return idx, *read_batch(particles, idx, **read)
            images_f, _ = read_batch(particles, idx, ctf=False, **read)
            return idx, images_f, batch_ctf(particles, idx)

        def align(idx, images_f, ctf, projector=projector, half=half):
            on_batch = None
            if resident:  # insert each searched batch before its device copies go

                def on_batch(ops, *, rows, result, acc=accumulators[half - 1]):
                    ops.insert_at_poses(acc, *_insertion_poses(result, k), ctf=has_ctf)

            result = search.local_search(
                projector,
                images_f,
                ctf,
                noise.inverse_sigma2_per_particle(sigma2, rows[idx]),  # (m, N//2+1)
                consensus_rotations=consensus_rotations[idx],
                consensus_origins_px=consensus_origins_px[idx],
                fulcrum_px=fulcrum_px,
                rotation_extent_deg=options.rotation_extent_deg,
                shift_extent_px=options.shift_extent_px,
                alignment_resolution_deg=options.alignment_resolution_deg,
                r_max_px=r_max_px,
                prior_sigma_rotation_deg=options.prior_sigma_rotation_deg,
                prior_sigma_shift_px=prior_shift_px,
                top_k=k,
                score_fn=score_fn,
                power_fn=power_fn,
                signal_radius_px=signal_radius_px,
                shift_resolution_px=options.shift_resolution_px,
                batch_size=search_batch_size(score_fn, idx.size),
                on_batch=on_batch,
            )
            return idx, result, images_f, ctf

        batches = shares[half]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            if threads > 1:  # whole batches in parallel
                results = pool.map(lambda idx: align(*prepare(idx)), batches)
            else:  # the next batch is read and transformed while this one aligns
                results = prefetched(prepare, align, batches)
            # in batch order, whatever the threads; this thread alone inserts
            for idx, res, images_f, ctf in results:
                if accumulators is not None and not resident:
                    insert_at_poses(
                        accumulators[half - 1],
                        images_f,
                        *_insertion_poses(res, k),
                        ctf=np.asarray(ctf) if has_ctf else None,
                    )
                out.rotations[idx] = res.rotations
                out.origins_px[idx] = res.origins_px
                out.scores[idx] = res.scores
                out.poses_evaluated[idx] = res.n_evaluated
                if k > 1:
                    out.top_rotations[idx] = res.top_rotations
                    out.top_origins_px[idx] = res.top_origins_px
                    out.top_weights[idx] = res.top_weights
                progress.update(idx.size)
    for name in (
        "rotations",
        "origins_px",
        "scores",
        "poses_evaluated",
        "top_rotations",
        "top_origins_px",
        "top_weights",
    ):
        if getattr(out, name) is not None:
            comm.allreduce_sum(getattr(out, name))  # exact: x + 0 = x
    return out


@dataclass
class Reconstruction:
    """Maps and FSC at the particles' current poses.

    Attributes
    ----------
    raw_halves : ndarray, shape (2, N, N, N), float32
        Half maps without regularisation (their FSC is the resolution).
    halves : ndarray, shape (2, N, N, N), float32
        Half maps Wiener-regularised with their own unmasked FSC: the next
        iteration's references and the written half maps.
    full : ndarray, shape (N, N, N), float32
        Both halves together, regularised with the full-set FSC ``2F/(1+F)``.
    fsc : FscResult
        Masked, phase-randomisation corrected FSC of the raw halves.
    """

    raw_halves: np.ndarray
    halves: np.ndarray
    full: np.ndarray
    fsc: object


def reconstruct_and_compare(
    accumulators: tuple[BackProjector, BackProjector],
    mask: np.ndarray,
    *,
    pixel_size_a: float,
    options,
    comm=None,
) -> Reconstruction:
    """Half maps, full map and masked FSC from the half sets' accumulators.

    ``accumulators`` hold this rank's insertions (:func:`align_particles`
    fills them; or :func:`.reconstruct.reconstruct_particles`); under MPI
    (``comm``) they are summed over the ranks first (:mod:`.parallel`). The
    Wiener regularisation is :meth:`.backprojector.BackProjector.reconstruct`
    with the half-map FSC (:func:`.reconstruct.half_map_fsc`), as RELION does.
    """
    comm = SerialComm() if comm is None else comm
    bp1, bp2 = accumulators
    for bp in (bp1, bp2):  # the same batches as one process, summed over ranks
        comm.allreduce_sum(bp.data)
        comm.allreduce_sum(bp.weight)
        counted = np.array([bp.n_inserted], dtype=np.int64)
        bp.n_inserted = int(comm.allreduce_sum(counted)[0])
    raw = np.stack([bp1.reconstruct(), bp2.reconstruct()]).astype(np.float32)
    curve = reconstruct.half_map_fsc(raw[0], raw[1])
    halves = np.stack([bp1.reconstruct(fsc=curve), bp2.reconstruct(fsc=curve)])
    c = np.clip(curve, 0.0, 1.0)
    bp1.add(bp2)
    full = bp1.reconstruct(fsc=2 * c / (1 + c))
    result = fsc_mod.compute_fsc(
        raw[0],
        raw[1],
        mask=mask,
        pixel_size_a=pixel_size_a,
        seed=options.seed,
    )
    return Reconstruction(
        raw_halves=raw,
        halves=halves.astype(np.float32),
        full=np.asarray(full, dtype=np.float32),
        fsc=result,
    )


def estimate_noise(
    particles,
    references: np.ndarray,
    *,
    rotations: np.ndarray,
    origins_px: np.ndarray,
    options,
    comm=None,
    backend: Backend | None = None,
    timings: dict | None = None,
) -> np.ndarray:
    """sigma^2 (n_groups, N//2+1) from the residuals against the masked references.

    Each particle of :func:`.noise.noise_subset` (at most
    ``options.noise_particles`` per optics group; all when 0) is compared with
    ``CTF * shift(projection)`` of its own half
    set's reference at the given pose (:func:`.projector.forward_model`); the
    residual power is accumulated per optics group and shell
    (:class:`.noise.Sigma2Accumulator`), summed over the MPI ranks (``comm``).
    ``backend`` (:class:`.refine_device.Backend`) chooses where the
    projections run (CPU or GPU). ``timings``, when given, gets ``"setup"``:
    the seconds spent on the references' padded transforms (the pass's cost
    that does not grow with the number of particles).
    """
    comm = SerialComm() if comm is None else comm
    box = particles.box
    ids, rows = group_rows(particles.optics_group)
    acc = noise.Sigma2Accumulator(box, len(ids))
    subsets = np.asarray(particles.random_subset)
    chosen = np.zeros(particles.n, dtype=bool)
    chosen[noise.noise_subset(rows, options.noise_particles, seed=options.seed)] = True
    if not chosen.all():
        log.info(
            "noise model from %d of %d particles (at most %d per optics group, "
            "--noise-particles)",
            chosen.sum(),
            particles.n,
            options.noise_particles,
        )
    batch = options.batch_size_for(
        box, gpu=backend is not None and backend.name == "cuda"
    )
    setup = 0.0

    def prepare(idx: np.ndarray):
        return idx, *read_batch(particles, idx, workers=options.threads)

    for half in (1, 2):
        t0 = time.monotonic()
        projector = FourierProjector(references[half - 1], padding=2)
        if backend is not None:
            projector = backend.projector(projector)
        setup += time.monotonic() - t0

        def residuals(idx, images_f, ctf, projector=projector) -> None:
            pred = forward_model(
                projector, rotations[idx], origins_px=origins_px[idx], ctf=ctf
            )
            acc.add(images_f, predictions_f=pred, optics_groups=rows[idx])

        # the next batch is read and transformed while this one is projected
        # and accumulated (in this thread: the GPU's context lives here)
        batches = comm.share(
            _batches(np.flatnonzero((subsets == half) & chosen), batch)
        )
        for _ in prefetched(prepare, residuals, batches):
            pass
    for total in (acc.sums, acc.counts, acc.image_sums):
        comm.allreduce_sum(total)
    if timings is not None:
        timings["setup"] = setup
    return acc.sigma2()


def dynamic_mask(
    volume: np.ndarray,
    input_mask: np.ndarray,
    pixel_size_a: float,
    *,
    threshold_fraction: float,
    near_a: float,
    far_a: float,
) -> np.ndarray:
    """A mask recomputed from the current map, never beyond the input mask's support + far.

    The density is thresholded at ``threshold_fraction`` of the map's maximum
    inside the input mask's support (voxels with mask > 0), grown by ``near_a``
    and given a raised-cosine edge reaching 0 at ``far_a`` from the density
    (:func:`.masks.create_soft_mask`); voxels farther than ``far_a`` from the
    input mask's support are set to 0.

    Returns
    -------
    ndarray, shape (N, N, N), float32 in [0, 1]
        The input mask when the map has no positive density in the support.
    """
    support = input_mask > 0
    allowed = ndimage.distance_transform_edt(~support) * pixel_size_a <= far_a
    peak = float(volume[support].max()) if support.any() else 0.0
    if not peak > 0:
        log.warning("dynamic mask: no positive density inside the mask; keeping it")
        return input_mask.astype(np.float32)
    floor = float(volume.min())
    m = masks.create_soft_mask(
        np.where(allowed, volume, floor),
        pixel_size_a,
        threshold=threshold_fraction * peak,
        extend_a=near_a,
        soft_edge_a=far_a - near_a,
    )
    return (m * allowed).astype(np.float32)
