"""Local search grids: rotation and shift cells around a consensus pose.

A local search explores pose *changes* from the consensus pose:

* a rotation perturbation is a rotation vector ``v`` (axis times angle, in
  degrees); the perturbed pose is ``A = A_cons @ R(v)`` (see
  :func:`rotvec_to_matrix`), so the geodesic change of pose is ``|v|`` degrees;
* a shift change is a 2D vector ``t`` in pixels added to the consensus origin.

Both live on cubic (square) grids of *cells*: a cell is the cube of side
``step`` around its centre, centres at integer multiples of the coarse step.
Branch and bound subdivides a rotation cell into its 8 children (centres at
``c +- step/4`` on each axis, spacing halved) and a shift cell into 4.

Extents: the search region is the ball ``|v| <= extent_deg`` (disc
``|t| <= extent_px``). A grid keeps every cell that meets the open ball, so
the cells cover the whole region; a cell centre may lie just outside it, so a
pose is always *evaluated* at the centre pulled back into the ball
(:func:`clip_to_extent`). Evaluated poses therefore never leave the extents.
"""

from __future__ import annotations

import itertools

import numpy as np

from .geometry import fulcrum_shift

__all__ = [
    "rotation_grid",
    "subdivide_rotations",
    "shift_grid",
    "subdivide_shifts",
    "child_centres",
    "compact_rows",
    "clip_to_extent",
    "vector_norm",
    "rotvec_to_matrix",
    "rotvec_matrix_entries",
    "rotations_about_fulcrum",
    "finest_grid",
]

_ROT_OFFSETS = np.array(list(itertools.product((-1, 1), repeat=3)), dtype=np.float64)
_SHIFT_OFFSETS = np.array(list(itertools.product((-1, 1), repeat=2)), dtype=np.float64)


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number; got {value}")
    return value


def vector_norm(v: np.ndarray) -> np.ndarray:
    """Euclidean norm over the last (short) axis: ``np.linalg.norm(v, axis=-1)``.

    The components are summed in order, as NumPy does for a short axis, so the
    result is the same, several times faster on large stacks of 2- or 3-vectors.
    """
    v = np.asarray(v, dtype=np.float64)
    total = v[..., 0] * v[..., 0]
    for i in range(1, v.shape[-1]):
        total += v[..., i] * v[..., i]
    return np.sqrt(total)


def _meets_ball(centres: np.ndarray, step: float, extent: float) -> np.ndarray:
    """True for cells (cubes of side ``step``) that meet the open ball of radius extent."""
    gap = np.maximum(np.abs(centres) - step / 2, 0.0)  # nearest point of the cell
    return vector_norm(gap) < extent * (1 - 1e-12)


def _lattice_offset(step: float, finest_step: float | None) -> float:
    """Offset of the coarse centres that puts zero on the finest lattice."""
    if finest_step is None:
        return 0.0
    finest_step = _check_positive("finest step", finest_step)
    ratio = step / finest_step
    if ratio < 1 - 1e-9 or abs(np.log2(ratio) - np.rint(np.log2(ratio))) > 1e-9:
        raise ValueError(
            f"step {step} must be the finest step {finest_step} times a power of 2"
        )
    return (step - finest_step) / 2


def _cubic_grid(
    extent: float, step: float, dim: int, finest_step: float | None = None
) -> np.ndarray:
    if extent == 0:
        return np.zeros((1, dim))
    extent = _check_positive("extent", extent)
    step = _check_positive("step", step)
    offset = _lattice_offset(step, finest_step)
    half = int(np.ceil(extent / step + 0.5)) + (offset > 0)
    axis = np.arange(-half, half + 1, dtype=np.float64) * step + offset
    centres = np.stack(np.meshgrid(*(axis,) * dim, indexing="ij"), -1).reshape(-1, dim)
    keep = _meets_ball(centres, step, extent)
    centres = centres[keep]
    # nearest cells first (the consensus pose's own cell at index 0)
    order = np.argsort(np.linalg.norm(centres, axis=-1), kind="stable")
    return centres[order]


def child_centres(
    centres: np.ndarray, step: float, extent: float | None, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Children ``c + offsets * step / 4`` (..., c, d) of cells of side ``step``,
    and which of them meet the open extent ball (..., c) (all with ``extent`` None)."""
    children = centres[..., None, :] + offsets * (step / 4)
    if extent is None:
        return children, np.ones(children.shape[:-1], dtype=bool)
    return children, _meets_ball(children, step / 2, float(extent))


def _subdivide(
    centres: np.ndarray, step: float, extent: float | None, offsets: np.ndarray
) -> np.ndarray:
    centres = np.asarray(centres, dtype=np.float64)
    dim = offsets.shape[1]
    if centres.ndim != 2 or centres.shape[1] != dim:
        raise ValueError(f"centres must have shape (n, {dim}); got {centres.shape}")
    step = _check_positive("step", step)
    if extent is not None and extent == 0:
        return np.zeros((1, dim))
    children, inside = child_centres(centres, step, extent, offsets)
    return children[inside]


def rotation_grid(
    extent_deg: float, step_deg: float, *, finest_step_deg: float | None = None
) -> np.ndarray:
    """Centres of the rotation cells of side ``step_deg`` that meet the extent ball.

    Parameters
    ----------
    extent_deg : float
        Largest rotation change from the consensus pose (degrees); 0 gives the
        single identity perturbation.
    step_deg : float
        Grid spacing (degrees) of the rotation-vector components.
    finest_step_deg : float, optional
        Side of the leaves the grid will be subdivided to (``step_deg`` over a
        power of 2). Given, the lattice is offset by ``(step_deg -
        finest_step_deg) / 2`` on every axis so that the leaves' centres
        include zero: the consensus pose is a leaf, reached exactly
        (subdivision puts children at ``+-step/4``, so a lattice through zero
        at the coarse stage has no leaf at zero). None: no offset.

    Returns
    -------
    ndarray, shape (n, 3), float64
        Rotation vectors (axis times angle, degrees) at integer multiples of
        ``step_deg`` (plus the offset), nearest first (the cell holding the
        identity, i.e. the consensus pose, is row 0). Centres may lie up to half
        a cell diagonal outside the ball: evaluate at :func:`clip_to_extent` of
        them.
    """
    return _cubic_grid(float(extent_deg), float(step_deg), 3, finest_step_deg)


def subdivide_rotations(
    centres: np.ndarray, step_deg: float, *, extent_deg: float | None = None
) -> np.ndarray:
    """Split rotation cells of side ``step_deg`` into their 8 children.

    Parameters
    ----------
    centres : ndarray, shape (n, 3)
        Rotation-vector cell centres (degrees).
    step_deg : float
        Side of the parent cells; the children have side ``step_deg / 2``.
    extent_deg : float, optional
        Drop children whose cell does not meet the extent ball.

    Returns
    -------
    ndarray, shape (8 n, 3) (fewer when ``extent_deg`` drops some)
        Child centres ``c + (+-1, +-1, +-1) * step_deg / 4``, grouped by parent.
    """
    return _subdivide(centres, step_deg, extent_deg, _ROT_OFFSETS)


def shift_grid(
    extent_px: float, step_px: float, *, finest_step_px: float | None = None
) -> np.ndarray:
    """Centres of the square shift cells of side ``step_px`` that meet the extent disc.

    Parameters
    ----------
    extent_px : float
        Largest shift change from the consensus origin (pixels); 0 gives the
        single zero shift.
    step_px : float
        Grid spacing (pixels).
    finest_step_px : float, optional
        As ``finest_step_deg`` of :func:`rotation_grid`: offset the lattice so
        that the leaves of this side include the zero shift.

    Returns
    -------
    ndarray, shape (n, 2), float64
        Shift changes ``(dx, dy)`` in pixels, nearest first (the cell holding
        zero at row 0).
    """
    return _cubic_grid(float(extent_px), float(step_px), 2, finest_step_px)


def subdivide_shifts(
    centres: np.ndarray, step_px: float, *, extent_px: float | None = None
) -> np.ndarray:
    """Split shift cells of side ``step_px`` into their 4 children (side ``step_px / 2``).

    Returns
    -------
    ndarray, shape (4 n, 2) (fewer when ``extent_px`` drops some)
    """
    return _subdivide(centres, step_px, extent_px, _SHIFT_OFFSETS)


def compact_rows(values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the kept entries first (in order), padded with the row's first.

    Parameters
    ----------
    values : ndarray, shape (m, K, ...)
    keep : ndarray, shape (m, K), bool

    Returns
    -------
    compact : ndarray, shape (m, K', ...)
        ``K'`` is the largest count of kept entries of a row (at least 1).
    valid : ndarray, shape (m, K'), bool
        True for the kept entries (a prefix of each row).
    """
    values = np.asarray(values)
    keep = np.asarray(keep, dtype=bool)
    m = keep.shape[0]
    count = keep.sum(axis=1)
    width = max(int(count.max()), 1) if m else 1
    valid = np.arange(width) < count[:, None]
    compact = np.empty((m, width) + values.shape[2:], dtype=values.dtype)
    compact[valid] = values[keep]  # both in row-major order: kept ones first
    # padding: a row without kept entries repeats its own first entry
    empty = count == 0
    if empty.any():
        compact[empty, 0] = values[empty, 0]
    compact[~valid] = np.repeat(compact[:, 0], width - count, axis=0)
    return compact, valid


def clip_to_extent(vectors: np.ndarray, extent: float) -> np.ndarray:
    """Pull vectors (..., d) longer than ``extent`` back onto the ball (radial clip)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norm = vector_norm(vectors)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norm > extent, extent / norm, 1.0)
    return vectors * scale


def rotvec_matrix_entries(rotvec_deg: np.ndarray) -> list[list[np.ndarray]]:
    """Entries ``R[k][l]`` (each of shape ``...``) of :func:`rotvec_to_matrix`.

    Rotation vectors (..., 3) (axis times angle, degrees). The entries come as
    separate arrays so that a product with other matrices can be formed entry
    by entry over large stacks (:func:`.search.candidate_poses`) without
    the (..., 3, 3) layout.
    """
    v = np.deg2rad(np.asarray(rotvec_deg, dtype=np.float64))
    vx, vy, vz = v[..., 0], v[..., 1], v[..., 2]
    half = np.sqrt(vx * vx + vy * vy + vz * vz) / 2
    # unit quaternion (w, x, y, z): sin(half) * v / |v| = v / 2 * sinc(half / pi),
    # np.sinc(x) = sin(pi x) / (pi x); the zero vector gives exactly (1, 0, 0, 0)
    w = np.cos(half)
    scale = 0.5 * np.sinc(half / np.pi)
    x, y, z = vx * scale, vy * scale, vz * scale
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    return [
        [1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy)],
        [2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx)],
        [2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy)],
    ]


def rotvec_to_matrix(rotvec_deg: np.ndarray) -> np.ndarray:
    """Rotation vectors (..., 3) (axis times angle, degrees) -> matrices (..., 3, 3).

    Active right-handed rotation (as :func:`.geometry.axis_angle_to_matrix`),
    exact identity for the zero vector.
    """
    r = rotvec_matrix_entries(rotvec_deg)
    return np.stack([np.stack(row, axis=-1) for row in r], axis=-2)


#: (m, J) elements formed per step by :func:`rotations_about_fulcrum`: each
#: temporary (128 KiB) stays in the cache and the allocator's free list; over
#: the whole (512, 600) stack at once, every temporary is fresh memory whose
#: page faults cost more than the arithmetic (130 ms against 40 ms, measured)
ROTATION_CHUNK = 16384


def rotations_about_fulcrum(a_cons, rotvecs_deg, fulcrum_px):
    """Rotations about a fulcrum: ``A = A_cons R(v)`` and ``((A - A_cons) f)_xy``.

    Parameters
    ----------
    a_cons : ndarray, shape (m, 3, 3)
        Consensus RELION matrices.
    rotvecs_deg : ndarray, shape (m, J, 3)
        Rotation perturbations ``v`` (axis times angle, degrees).
    fulcrum_px : ndarray, shape (3,)
        Map coordinates (pixels, x y z) relative to the box centre.

    Returns
    -------
    rotations : ndarray, shape (m, J, 3, 3)
    fulcrum_term : ndarray, shape (m, J, 2)
        Pixels (:func:`.geometry.fulcrum_shift`); the origin change that
        keeps the fulcrum in place (:func:`.search.candidate_poses`).

    Formed entry by entry, a few particles at a time (the search's main host
    cost otherwise); ``v = 0`` gives ``A_cons`` and a zero term exactly.
    """
    a_cons = np.asarray(a_cons, dtype=np.float64)
    rotvecs_deg = np.asarray(rotvecs_deg, dtype=np.float64)
    m, width = rotvecs_deg.shape[:2]
    rot = np.empty((m, width, 3, 3))
    term = np.empty((m, width, 2))
    step = max(1, ROTATION_CHUNK // max(width, 1))
    for start in range(0, m, step):
        part = slice(start, start + step)
        r = rotvec_matrix_entries(rotvecs_deg[part])  # r[k][l]: (b, J)
        a = a_cons[part, None, :, :]  # (b, 1, 3, 3)
        for i in range(3):
            for col in range(3):
                rot[part, :, i, col] = (
                    a[..., i, 0] * r[0][col] + a[..., i, 1] * r[1][col]
                ) + a[..., i, 2] * r[2][col]
        term[part] = fulcrum_shift(rot[part], a, fulcrum_px)
    return rot, term


def finest_grid(
    extent: float,
    coarse_step: float,
    n_subdivisions: int,
    *,
    dim: int,
    centred: bool = False,
) -> np.ndarray:
    """Leaves of the full (unpruned) subdivision tree: the exhaustive-search grid.

    Parameters
    ----------
    extent : float
        Extent (degrees for ``dim=3`` rotations, pixels for ``dim=2`` shifts).
    coarse_step : float
        Side of the coarse cells.
    n_subdivisions : int
        Number of halvings; the leaves have side ``coarse_step / 2**n``.
    dim : int
        3 (rotation vectors) or 2 (shifts).
    centred : bool
        Offset the coarse lattice so that zero is a leaf (``finest_step_*`` of
        :func:`rotation_grid` / :func:`shift_grid`), as :func:`.search.local_search`
        does.
    """
    leaf = float(coarse_step) / 2**n_subdivisions if centred else None
    if dim == 3:
        cells = rotation_grid(extent, coarse_step, finest_step_deg=leaf)
        split = subdivide_rotations
    elif dim == 2:
        cells = shift_grid(extent, coarse_step, finest_step_px=leaf)
        split = subdivide_shifts
    else:
        raise ValueError(f"dim must be 2 or 3; got {dim}")
    step = float(coarse_step)
    for _ in range(n_subdivisions):
        cells = split(
            cells, step, **{("extent_deg" if dim == 3 else "extent_px"): extent}
        )
        step /= 2
    return cells
