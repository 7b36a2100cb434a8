"""How the local search reaches the images: scores of pose grids and the bound's power.

:func:`.search.local_search` touches the particle images only through a *batch
ops* object, made once per batch of particles:

``ops.score(rotations, shifts_px, *, r_max_px, rotation_shifts_px, counts) -> grid``
    Scores ``e`` (:func:`.scoring.score_poses`) of a padded product grid:
    rotations (m, J, 3, 3) (RELION matrices), origins (m, S, 2) and the
    per-rotation fulcrum term (m, J, 2) in pixels; ``counts = (n_rot, n_shift)``
    (m,) are the real rows of each particle (the rest is padding).
``ops.score_local(a_cons, rotvecs_deg, shifts_px, *, fulcrum_px, r_max_px, counts) -> grid``
    The same for the rotations ``A_cons R(v)`` about the fulcrum and their
    fulcrum term (:func:`.local_grid.rotations_about_fulcrum`): consensus
    matrices (m, 3, 3), rotation vectors (m, J, 3) in degrees, fulcrum (3,)
    in pixels. What the search scores its grids with; the ops may form the
    rotations where they score them (the GPU's do, on the device).
``ops.power_sums(rotations, weights, *, r_max_px) -> (m, W)``
    Weighted sums over the pixels of the bound's power
    (:func:`.scoring.weighted_projection_power` of one rotation per particle):
    ``sum_p power[i, p] * weights(k)[w, p]``, with ``weights`` a function of
    the pixels' radii ``k`` (P,) (pixels) returning (W, P). The search needs
    only such sums (high-band power, cell margin), so the power itself can
    stay where it was computed.
``ops.power(rotations, *, r_max_px) -> (power (m, P), radius (P,))``
    The power itself (pixel order up to the ops; for checks and diagnostics).

and the grid only through three reductions, each of ``(e + add_r) + add_s``
(``add_r`` (m, J) and ``add_s`` (m, S) in float64, summed in that order; the
search puts inf on the padding there, so padded poses drop out):

``grid.best(add_r, add_s) -> (j, s, value)``
    Per particle the first minimum in (rotation, shift) row-major order.
``grid.minima(add_r, add_s) -> (over_shifts (m, J), over_rotations (m, S))``
``grid.values(add_r, add_s) -> (m, J, S)``
    All of them (the top-K poses of the last stage).

An ops object may have ``close()``: the search calls it when the batch is done,
after the batch's grids are freed (the GPU's releases its device memory there).

Batches of a ``score_fn`` with ``bind_batch`` are searched one at a time in the
calling thread (:func:`search_threads`): PyCUDA's context is current in one
thread, and a GPU search with batches in three worker threads, each pushing
and popping the context, hung on an H100 (2026-11-28) although the same scheme
ran in the benchmark.

:class:`HostBatchOps` implements this with the engine's NumPy functions; a
``score_fn`` with a ``bind_batch(projector, images_f, ctf, inv_sigma2,
r_max_px=)`` method (the GPU's, ``kernels/cuda_search_ops.py``) returns its own
object, which keeps the batch on the device across the stages and reduces the
grids there, so only the small reductions come back to the host.
"""

from __future__ import annotations

import logging

import numpy as np

from .local_grid import rotations_about_fulcrum
from .scoring import score_poses

log = logging.getLogger(__name__)

__all__ = ["HostGrid", "HostBatchOps", "batch_ops", "search_threads"]

#: padded / real poses of a batch above which the CPU scores particles one by one
MAX_PADDING = 1.25


class HostGrid:
    """Scores of a padded pose grid held as a NumPy array ``e`` (m, J, S)."""

    def __init__(self, e: np.ndarray):
        self.e = np.asarray(e, dtype=np.float64)

    def values(self, add_r: np.ndarray, add_s: np.ndarray) -> np.ndarray:
        """``(e + add_r[:, :, None]) + add_s[:, None, :]``, shape (m, J, S)."""
        out = self.e + add_r[:, :, None]
        out += add_s[:, None, :]
        return out

    def best(self, add_r: np.ndarray, add_s: np.ndarray):
        """Indices ``(j, s)`` (m,) and value (m,) of each particle's first minimum."""
        values = self.values(add_r, add_s)
        m = values.shape[0]
        flat = np.argmin(values.reshape(m, -1), axis=1)
        j, s = np.unravel_index(flat, values.shape[1:])
        return j, s, values.reshape(m, -1)[np.arange(m), flat]

    def minima(self, add_r: np.ndarray, add_s: np.ndarray):
        """Minima over the shifts (m, J) and over the rotations (m, S)."""
        values = self.values(add_r, add_s)
        return values.min(axis=2), values.min(axis=1)


class HostBatchOps:
    """Batch ops (module docstring) from a ``score_fn`` and a ``power_fn``.

    With the engine's :func:`.scoring.score_poses` and a grid padded by more
    than :data:`MAX_PADDING`, each particle's own grid is scored separately.
    """

    def __init__(self, score_fn, power_fn, projector, images_f, ctf, inv_sigma2):
        self.score_fn, self.power_fn = score_fn, power_fn
        self.args = (projector, images_f, ctf, inv_sigma2)

    def score(self, rotations, shifts_px, *, r_max_px, rotation_shifts_px, counts):
        m, width_j, width_s = rotations.shape[0], rotations.shape[1], shifts_px.shape[1]
        n_rot, n_shift = counts
        padded = m * width_j * width_s / max(int((n_rot * n_shift).sum()), 1)
        if self.score_fn is not score_poses or padded <= MAX_PADDING:
            return HostGrid(
                self.score_fn(
                    *self.args,
                    rotations,
                    shifts_px,
                    r_max_px=r_max_px,
                    rotation_shifts_px=rotation_shifts_px,
                )
            )
        # uneven cell counts (typically the leaves): score each particle's own
        # grid rather than the padded product (one call per particle costs little
        # at these sizes); the padding keeps 0, masked by the search's inf
        projector, x, ctf, inv_sigma2 = self.args
        e = np.zeros((m, width_j, width_s))
        for i in range(m):
            j, k = int(n_rot[i]), int(n_shift[i])
            e[i, :j, :k] = score_poses(
                projector,
                x[i : i + 1],
                ctf[i : i + 1],
                inv_sigma2[i : i + 1],
                rotations[i : i + 1, :j],
                shifts_px[i : i + 1, :k],
                r_max_px=r_max_px,
                rotation_shifts_px=rotation_shifts_px[i : i + 1, :j],
            )[0]
        return HostGrid(e)

    def score_local(
        self, a_cons, rotvecs_deg, shifts_px, *, fulcrum_px, r_max_px, counts
    ):
        rot, term = rotations_about_fulcrum(a_cons, rotvecs_deg, fulcrum_px)
        return self.score(
            rot, shifts_px, r_max_px=r_max_px, rotation_shifts_px=term, counts=counts
        )

    def power(self, rotations, *, r_max_px):
        projector, _, ctf, inv_sigma2 = self.args
        return self.power_fn(projector, ctf, inv_sigma2, rotations, r_max_px=r_max_px)

    def power_sums(self, rotations, weights, *, r_max_px):
        power, k = self.power(rotations, r_max_px=r_max_px)
        return power @ np.asarray(weights(k), dtype=np.float64).T


def batch_ops(score_fn, power_fn, projector, images_f, ctf, inv_sigma2, *, r_max_px):
    """The batch ops of one batch: the ``score_fn``'s own (``bind_batch``) or the host's.

    A bound object's ``power`` and ``power_sums`` are used only when
    ``power_fn`` is ``score_fn.power``; another ``power_fn`` is kept as given.
    ``ctf`` may be an :class:`.ctf.CtfBatch` (parameters): the bound object
    takes it as it is; the host's ops evaluate it once here.
    """
    bind = getattr(score_fn, "bind_batch", None)
    host_args = (score_fn, power_fn, projector, images_f)
    if bind is None:
        return HostBatchOps(*host_args, np.asarray(ctf), inv_sigma2)
    ops = bind(projector, images_f, ctf, inv_sigma2, r_max_px=r_max_px)
    if power_fn != getattr(score_fn, "power", None):
        host = HostBatchOps(*host_args, np.asarray(ctf), inv_sigma2)
        ops.power, ops.power_sums = host.power, host.power_sums
    return ops


#: particles a CPU search scores together (``search.local_search``'s default):
#: its stages hold J x P complex projections per particle (about 0.2 GB at box
#: 256 and Nyquist), so a few particles at a time
CPU_SEARCH_BATCH = 8


def search_batch_size(score_fn, batch: int) -> int:
    """Particles searched together out of a batch of ``batch`` read ones.

    A ``score_fn`` with ``bind_batch`` (the GPU's) takes the whole batch: one
    upload and one launch per stage for all of them (the GPU's rate grows
    with the batch: ``benchmarks/bench_gpu.py``); the CPU's takes
    :data:`CPU_SEARCH_BATCH` at a time. The poses do not depend on it.
    """
    if hasattr(score_fn, "bind_batch"):
        return max(1, int(batch))
    return CPU_SEARCH_BATCH


def search_threads(score_fn, threads: int) -> int:
    """Threads to search batches with: ``threads``, or 1 for a device ``score_fn``.

    A ``score_fn`` with ``bind_batch`` (the GPU's) runs its batches in the
    calling thread (module docstring); asking for more threads logs why not.
    """
    threads = int(threads)
    if threads > 1 and hasattr(score_fn, "bind_batch"):
        log.info(
            "GPU search: batches searched one at a time in one thread; "
            "--threads %d prepare the next batch (reading, FFTs)",
            threads,
        )
        return 1
    return threads
