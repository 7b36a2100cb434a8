"""The local search's cells as one tree shared by all particles, indexed by integers.

The rotation and shift cells of :func:`.search.local_search` lie on lattices
fixed relative to each particle's consensus pose (:func:`.local_grid.rotation_grid`,
:func:`.local_grid.shift_grid`), and a cell's children (:func:`.local_grid.subdivide_rotations`)
depend only on the cell. So the cells of every particle are nodes of one tree:
level 0 is the coarse grid, level ``L + 1`` the children, inside the extent,
of all cells of level ``L``. A particle's cells at a stage are then integer
indices into one level, and splitting its kept cells is a table look-up
instead of forming and testing ``8 K`` child centres per particle (which was
the search's largest host cost on the GPU path: 26 of 42 ms per batch of 256
particles at box 256, ``benchmarks/bench_search_host.py``; with the tree the
whole batch's host work took 17.5-25 ms).

Every value a level holds (centres, the centres clipped into the extent and
the norms of both) is computed by the same expressions as before, element by
element, so a search gives the same poses and scores bit for bit.

Units: degrees (rotation vectors, ``d = 3``) or pixels (shifts, ``d = 2``).
Levels are built on first use and shared between threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .local_grid import (
    _ROT_OFFSETS,
    _SHIFT_OFFSETS,
    _check_positive,
    child_centres,
    clip_to_extent,
    compact_rows,
    rotation_grid,
    shift_grid,
    vector_norm,
)

__all__ = ["CellLevel", "cell_tree_root"]

_lock = threading.Lock()
_roots: OrderedDict = OrderedDict()
#: search configurations whose trees are kept (a few per run)
_MAX_ROOTS = 16


class CellLevel:
    """The cells of one level of the tree (side ``step``, extent ``extent``).

    Attributes (``n`` cells, ``d`` = 3 rotations or 2 shifts)
    ----------
    centres : ndarray (n, d)
        Cell centres (degrees or pixels).
    clipped : ndarray (n, d)
        The centres pulled into the extent ball (:func:`.local_grid.clip_to_extent`):
        where a cell's pose is evaluated.
    norm, clipped_norm : ndarray (n,)
        ``|centres|`` and ``|clipped|`` (:func:`.local_grid.vector_norm`).
    """

    def __init__(self, centres: np.ndarray, extent: float):
        self.centres = np.ascontiguousarray(centres, dtype=np.float64)
        self.extent = float(extent)
        self.clipped = clip_to_extent(self.centres, self.extent)
        self.norm = vector_norm(self.centres)
        self.clipped_norm = vector_norm(self.clipped)
        self._next: dict[float, tuple[CellLevel, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.centres.shape[0]

    def children(self, step: float) -> tuple[CellLevel, np.ndarray]:
        """The next level and the table (n, c) of each cell's children in it.

        ``step``: side of this level's cells; children have side ``step / 2``
        and are those of :func:`.local_grid.subdivide_rotations` (or
        ``subdivide_shifts``) with this extent, in the same order; the table
        holds -1 for a child outside the extent. With extent 0 the only cell
        is zero, and so is its only child.
        """
        step = float(step)
        with self._lock:
            hit = self._next.get(step)
            if hit is None:
                hit = self._next[step] = self._build_children(step)
            return hit

    def _build_children(self, step: float) -> tuple[CellLevel, np.ndarray]:
        dim = self.centres.shape[1]
        offsets = {3: _ROT_OFFSETS, 2: _SHIFT_OFFSETS}[dim]
        if self.extent == 0:
            table = np.full((len(self), len(offsets)), -1, dtype=np.int32)
            table[:, 0] = 0
            return CellLevel(np.zeros((1, dim)), 0.0), table
        step = _check_positive("step", step)
        kids, inside = child_centres(self.centres, step, self.extent, offsets)
        table = np.full(inside.shape, -1, dtype=np.int32)
        table[inside] = np.arange(int(inside.sum()), dtype=np.int32)
        return CellLevel(kids[inside], self.extent), table

    def split(
        self, index: np.ndarray, kept: np.ndarray, step: float
    ) -> tuple[CellLevel, np.ndarray, np.ndarray]:
        """Children of each particle's kept cells, by table look-up.

        Parameters
        ----------
        index : ndarray (m, K) int
            Each particle's cells (rows of this level).
        kept : ndarray (m, K) bool
            The cells to split (at least one per particle).
        step : float
            Side of this level's cells.

        Returns
        -------
        level : CellLevel
            The children's level.
        index : ndarray (m, K') int32
            Per particle the children of its kept cells, grouped by parent in
            the order of ``index``, each parent's in the order of the offsets;
            the padding repeats the row's first child.
        valid : ndarray (m, K') bool
            True for the real children (a prefix of each row).
        """
        level, table = self.children(step)
        if level.extent == 0:
            m = index.shape[0]
            return level, np.zeros((m, 1), np.int32), np.ones((m, 1), bool)
        parents, real = compact_rows(index, kept)
        kids = table[parents]  # (m, K, c)
        ok = real[:, :, None] & (kids >= 0)
        m = kids.shape[0]
        index, valid = compact_rows(kids.reshape(m, -1), ok.reshape(m, -1))
        return level, index, valid


def cell_tree_root(
    dim: int, extent: float, step: float, finest_step: float
) -> CellLevel:
    """Level 0 of the tree of a search's rotation (``dim`` 3) or shift (2) cells.

    The coarse grid of :func:`.local_grid.rotation_grid` (or ``shift_grid``)
    with ``finest_step`` (the leaves' side, so that zero is a leaf); kept for
    reuse by later batches and threads with the same configuration.
    """
    key = (int(dim), float(extent), float(step), float(finest_step))
    with _lock:
        root = _roots.get(key)
        if root is not None:
            _roots.move_to_end(key)
            return root
    if int(dim) == 3:
        centres = rotation_grid(extent, step, finest_step_deg=finest_step)
    else:
        centres = shift_grid(extent, step, finest_step_px=finest_step)
    root = CellLevel(centres, extent)
    with _lock:
        root = _roots.setdefault(key, root)
        _roots.move_to_end(key)
        while len(_roots) > _MAX_ROOTS:
            _roots.popitem(last=False)
    return root
