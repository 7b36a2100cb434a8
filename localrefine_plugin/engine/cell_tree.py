"""The local search's cells as one tree shared by all particles, indexed by integers.

The rotation and shift cells of :func:`.search.local_search` lie on lattices
fixed relative to each particle's consensus pose (:func:`.local_grid.rotation_grid`,
:func:`.local_grid.shift_grid`), and a cell's children (:func:`.local_grid.subdivide_rotations`)
depend only on the cell. So the cells of every particle are nodes of one tree:
level 0 is the coarse grid, level ``L + 1`` the children, inside the extent,
of the cells of level ``L`` split so far. A particle's cells at a stage are then integer
indices into one level, and splitting its kept cells is a table look-up
instead of forming and testing ``8 K`` child centres per particle (which was
the search's largest host cost on the GPU path: 26 of 42 ms per batch of 256
particles at box 256, ``benchmarks/bench_search_host.py``; with the tree the
whole batch's host work took 17.5-25 ms).

Every value a level holds (centres, the centres clipped into the extent and
the norms of both) is computed by the same expressions as before, element by
element, so a search gives the same poses and scores bit for bit. Deeper
levels hold only the cells some search has reached (they are added when a
particle's kept cell is split for the first time), so the tree stays small
for fine samplings too.

Units: degrees (rotation vectors, ``d = 3``) or pixels (shifts, ``d = 2``).
Levels are shared between batches and threads (a lock guards each level's growth).
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
    """The cells of one level of the tree (extent ``extent``).

    Level 0 holds the whole coarse grid; a deeper level holds only the
    children of the cells that some particle kept and split (added as
    searches reach them: a level of leaves at 0.25 deg within 20 deg would
    hold 2.2 million cells, of which a search visits few).

    Attributes (``n = len(level)`` cells; ``d`` = 3 rotations or 2 shifts)
    ----------
    centres : ndarray (n, d)
        Cell centres (degrees or pixels).
    clipped : ndarray (n, d)
        The centres pulled into the extent ball (:func:`.local_grid.clip_to_extent`):
        where a cell's pose is evaluated.
    norm, clipped_norm : ndarray (n,)
        ``|centres|`` and ``|clipped|`` (:func:`.local_grid.vector_norm`).

    Rows are only ever appended (under the lock of the split that adds them),
    and the arrays are replaced, never shrunk or rewritten, when they grow: an
    index that a split returned stays valid in any thread.
    """

    def __init__(self, centres: np.ndarray, extent: float):
        centres = np.asarray(centres, dtype=np.float64)
        self.extent = float(extent)
        self._n = 0
        dim = centres.shape[1]
        self._rows = [np.empty((0, dim)), np.empty((0, dim)), np.empty(0), np.empty(0)]
        self._append(centres)
        self._next: dict[float, _Children] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    @property
    def centres(self) -> np.ndarray:
        return self._rows[0][: self._n]

    @property
    def clipped(self) -> np.ndarray:
        return self._rows[1][: self._n]

    @property
    def norm(self) -> np.ndarray:
        return self._rows[2][: self._n]

    @property
    def clipped_norm(self) -> np.ndarray:
        return self._rows[3][: self._n]

    def _append(self, centres: np.ndarray) -> None:
        """Add rows (the caller holds the lock that guards this level's growth)."""
        start, stop = self._n, self._n + centres.shape[0]
        rows = self._rows
        if stop > rows[0].shape[0]:  # grow (doubling): new arrays, old rows copied
            size = max(stop, 2 * rows[0].shape[0], 64)
            grown = []
            for a in rows:
                b = np.empty((size,) + a.shape[1:])
                b[:start] = a[:start]
                grown.append(b)
            rows = grown
        clipped = clip_to_extent(centres, self.extent)
        rows[0][start:stop] = centres
        rows[1][start:stop] = clipped
        rows[2][start:stop] = vector_norm(centres)
        rows[3][start:stop] = vector_norm(clipped)
        self._rows = rows  # publish the (possibly new) arrays, then the count
        self._n = stop

    def _children_of(self, step: float) -> _Children:
        step = float(step)
        with self._lock:
            kids = self._next.get(step)
            if kids is None:
                kids = self._next[step] = _Children(self, step)
            return kids

    def split(
        self, index: np.ndarray, kept: np.ndarray, step: float
    ) -> tuple[CellLevel, np.ndarray, np.ndarray]:
        """Children of each particle's kept cells, by table look-up.

        The cells of :func:`.local_grid.subdivide_rotations` (or
        ``subdivide_shifts``) with this level's extent, per particle.

        Parameters
        ----------
        index : ndarray (m, K) int
            Each particle's cells (rows of this level).
        kept : ndarray (m, K) bool
            The cells to split (at least one per particle).
        step : float
            Side of this level's cells; the children have side ``step / 2``.

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
        return self._children_of(step).split(index, kept)


_UNSEEN = -2  # children table: parent not split yet (-1: child outside the extent)


class _Children:
    """The children (side ``step / 2``) of the cells of ``parent``, added as needed."""

    def __init__(self, parent: CellLevel, step: float):
        self.parent, self.step = parent, float(step)
        dim = parent.centres.shape[1]
        self.offsets = {3: _ROT_OFFSETS, 2: _SHIFT_OFFSETS}[dim]
        if parent.extent == 0:  # the zero cell only, and its only child is zero
            self.level = CellLevel(np.zeros((1, dim)), 0.0)
        else:
            _check_positive("step", step)
            self.level = CellLevel(np.zeros((0, dim)), parent.extent)
        # (parent row, child) -> row of self.level, -1 outside, _UNSEEN
        self.table = np.full((0, len(self.offsets)), _UNSEEN, dtype=np.int32)
        self._lock = threading.Lock()

    def _add(self, rows: np.ndarray) -> None:
        """Form the children of the parent ``rows`` (unseen, distinct) and number them."""
        kids, inside = child_centres(
            self.parent.centres[rows], self.step, self.parent.extent, self.offsets
        )
        first = len(self.level)
        number = np.full(inside.shape, -1, dtype=np.int32)
        number[inside] = first + np.arange(int(inside.sum()), dtype=np.int32)
        self.level._append(kids[inside])
        self.table[rows] = number

    def split(self, index, kept):
        m = index.shape[0]
        if self.parent.extent == 0:
            return self.level, np.zeros((m, 1), np.int32), np.ones((m, 1), bool)
        parents, real = compact_rows(index, kept)
        with self._lock:
            n_parent = len(self.parent)
            if self.table.shape[0] < n_parent:  # the parent level grew
                grown = np.full((n_parent, self.table.shape[1]), _UNSEEN, np.int32)
                grown[: self.table.shape[0]] = self.table
                self.table = grown
            kids = self.table[parents]  # (m, K, c)
            unseen = real & (kids[:, :, 0] == _UNSEEN)
            if unseen.any():
                self._add(np.unique(parents[unseen]))
                kids = self.table[parents]
        ok = real[:, :, None] & (kids >= 0)
        index, valid = compact_rows(kids.reshape(m, -1), ok.reshape(m, -1))
        return self.level, index, valid


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
