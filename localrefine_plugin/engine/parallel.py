"""Processes of one refinement: the MPI communicator and its single-process twin.

``mpirun -np K localrefine refine ...`` starts K copies of the same run. Each
copy (a *rank*) reads the same inputs, takes its share of the particle batches,
and the partial sums (back-projector accumulators, noise power, pose arrays) are
added over all ranks after each step, so every rank holds identical maps and
poses. Only rank 0 writes files (checkpoints, outputs, the log).

How particles are split
    The particles of each half set are cut into batches exactly as one process
    cuts them (``batch_size``, file order), and the list of batches is dealt out
    in contiguous blocks (:meth:`SerialComm.share`). Every rank gets batches
    of both half sets: the load stays balanced whatever the sizes of the halves
    and for any K (ranks per half would idle half of the ranks when the halves
    differ in size and would need an even K), and each rank needs both half
    references anyway (a few MB). Since the batches are the same as in one
    process, every particle's search sees the same inputs for any K.

Deterministic sums
    :meth:`MpiComm.allreduce_sum` adds the ranks' arrays in float64 in rank order
    (``((x_0 + x_1) + x_2) + ...``) on rank 0, in chunks, and broadcasts the
    result: the same K gives bit-identical results run after run, whatever MPI's
    own reduction algorithm would choose. Different K associate the additions
    differently, so maps differ from one process's in the last bits (relative
    1e-16); pose arrays are exact (each particle's entry is non-zero on one rank
    only, and ``x + 0 = x``).

MPI is detected from the launcher's environment (``OMPI_COMM_WORLD_SIZE``,
``PMI_SIZE``, ``PMIX_RANK``, ...) so that ``mpirun -np K`` (Scipion's
``runJob``) needs no option; ``mpi4py`` is imported only then (or when
``get_comm("mpi")`` asks for it).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

__all__ = [
    "SerialComm",
    "MpiComm",
    "get_comm",
    "launched_by_mpi",
    "share_indices",
    "assign_gpu",
    "REDUCE_CHUNK_BYTES",
]

log = logging.getLogger(__name__)

#: Largest piece of an array reduced at once (bounds the extra memory per rank).
REDUCE_CHUNK_BYTES = 16 * 2**20

#: Environment variables set by MPI launchers: (world size, world rank, local rank).
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")


def launched_by_mpi(environ=None) -> bool:
    """Whether this process was started by an MPI launcher (``mpirun``, ``srun``).

    True when any of the launchers' rank or size variables is set, even for
    ``mpirun -np 1`` (mpi4py then still initialises MPI, harmlessly).
    """
    env = os.environ if environ is None else environ
    return any(v in env for v in (*_SIZE_VARS, *_RANK_VARS))


def share_indices(n_items: int, rank: int, size: int) -> slice:
    """The contiguous block ``[start, stop)`` of ``n_items`` items that ``rank`` takes.

    Blocks differ in length by at most one; the first ``n_items % size`` ranks
    take the longer ones. Contiguous blocks keep each rank's reads sequential
    in the stacks.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in 0..{size - 1}")
    base, extra = divmod(int(n_items), size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class SerialComm:
    """One process: the interface of :class:`MpiComm` with nothing to exchange.

    Attributes
    ----------
    rank, size, local_rank : int
        0, 1 and 0.
    is_root : bool
        True: this process writes the outputs.
    """

    rank = 0
    size = 1
    local_rank = 0
    is_root = True
    name = "serial"

    def share(self, items: list) -> list:
        """This rank's contiguous block of ``items`` (all of them here)."""
        return list(items)[share_indices(len(items), self.rank, self.size)]

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Sum of ``array`` over all ranks, in place (here: ``array`` itself)."""
        return array

    def bcast(self, obj, root: int = 0):
        """``obj`` from rank ``root`` (here: ``obj``)."""
        return obj

    def allgather(self, obj) -> list:
        """One ``obj`` per rank, in rank order."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for here)."""

    def abort(self, code: int = 1) -> None:
        """Stop every rank (here: nothing beyond this process's own exit)."""


class MpiComm(SerialComm):
    """Ranks of ``MPI.COMM_WORLD`` (mpi4py).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    """

    name = "mpi"

    def __init__(self, comm=None) -> None:
        from mpi4py import MPI  # only under MPI: mpi4py is an optional extra

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_root = self.rank == 0
        self.local_rank = _local_rank(MPI, self.comm, self.rank)

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Sum ``array`` over all ranks in rank order (deterministic), in place.

        Parameters
        ----------
        array : ndarray, C-contiguous, float64, complex128 or int64
            Same shape and dtype on every rank. Float64 and complex128 are
            added as float64; integers exactly.

        Returns
        -------
        ndarray
            ``array``, now holding the sum (identical on every rank).
        """
        if not array.flags.c_contiguous:
            raise ValueError("allreduce_sum needs a C-contiguous array")
        if array.dtype not in (np.float64, np.complex128, np.int64):
            raise ValueError(
                f"allreduce_sum sums float64, complex128 or int64; got {array.dtype}"
            )
        if self.size == 1 or array.size == 0:
            return array
        flat = array.reshape(-1)
        if flat.dtype == np.complex128:
            flat = flat.view(np.float64)
        step = max(1, REDUCE_CHUNK_BYTES // flat.itemsize)
        incoming = np.empty(min(step, flat.size), dtype=flat.dtype)
        for start in range(0, flat.size, step):
            part = flat[start : start + step]  # a view: results land in ``array``
            if self.is_root:
                buf = incoming[: part.size]
                for src in range(1, self.size):  # fixed order: rank 1, 2, ...
                    self.comm.Recv(buf, source=src, tag=7)
                    part += buf
            else:
                self.comm.Send(np.ascontiguousarray(part), dest=0, tag=7)
            self.comm.Bcast(part, root=0)
        return array

    def bcast(self, obj, root: int = 0):
        """``obj`` from rank ``root`` to every rank (pickled)."""
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj) -> list:
        """One ``obj`` per rank, in rank order (pickled)."""
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        """Wait for every rank."""
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """Stop every rank: a rank failing alone would leave the others waiting."""
        self.comm.Abort(code)


def _local_rank(mpi, comm, rank: int) -> int:
    """This rank's number among the ranks on its node (launcher's variable first)."""
    for var in _LOCAL_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    try:  # ranks sharing this node's memory, numbered from 0
        node = comm.Split_type(mpi.COMM_TYPE_SHARED)
        local = node.Get_rank()
        node.Free()
        return local
    except (AttributeError, NotImplementedError, mpi.Exception):
        return rank


def get_comm(mode: str = "auto") -> SerialComm:
    """The communicator of this run.

    Parameters
    ----------
    mode : {"auto", "mpi", "serial"}
        ``auto``: MPI when launched by an MPI launcher (see
        :func:`launched_by_mpi`), else one process. ``mpi`` forces mpi4py.

    Raises
    ------
    RuntimeError
        Under an MPI launcher (or ``mode="mpi"``) without mpi4py: K copies
        would each refine every particle and overwrite each other's outputs.
    """
    if mode not in ("auto", "mpi", "serial"):
        raise ValueError(f"mode {mode!r} is not one of auto, mpi, serial")
    if mode == "serial" or (mode == "auto" and not launched_by_mpi()):
        return SerialComm()
    try:
        comm = MpiComm()
    except ImportError as exc:
        raise RuntimeError(
            f"started under MPI but mpi4py cannot be imported ({exc}); install the "
            "MPI extra (pip install 'scipion-em-localrefine[mpi]') or run without "
            "mpirun"
        ) from exc
    log.info(
        "MPI: rank %d of %d (local rank %d, pid %d)",
        comm.rank,
        comm.size,
        comm.local_rank,
        os.getpid(),
    )
    return comm


def _visible_gpus() -> int:
    """Number of NVIDIA GPUs this process may use (without importing PyCUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip() not in ("", "-1")])
    return len(
        [p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    )


def assign_gpu(comm: SerialComm, *, n_gpus: int | None = None) -> int | None:
    """One GPU per rank: GPU ``local_rank % n_gpus`` of this node.

    Sets ``LOCALREFINE_GPU`` (read by :mod:`localrefine_plugin.kernels.backend`)
    unless the user set it; with one process nothing changes.

    Returns
    -------
    int or None
        The GPU index chosen, or None when nothing was changed.
    """
    if comm.size == 1 or "LOCALREFINE_GPU" in os.environ:
        return None
    n = _visible_gpus() if n_gpus is None else int(n_gpus)
    if n == 0:
        return None
    gpu = comm.local_rank % n
    os.environ["LOCALREFINE_GPU"] = str(gpu)
    if comm.local_rank >= n:
        log.warning(
            "rank %d shares GPU %d: %d ranks on this node for %d GPUs",
            comm.rank,
            gpu,
            comm.local_rank + 1,
            n,
        )
    log.info("rank %d uses GPU %d", comm.rank, gpu)
    return gpu
