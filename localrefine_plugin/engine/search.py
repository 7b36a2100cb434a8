"""Local pose search: branch and bound near the consensus poses.

What is searched
----------------
For each particle with consensus pose ``(A_cons, o_cons)`` (RELION matrix,
origin in pixels), a candidate is a rotation vector ``v`` (degrees,
``|v| <= rotation_extent_deg``) and a shift change ``t`` (pixels,
``|t| <= shift_extent_px``). The rotation pivots about the fulcrum ``f``
(pixels, map coordinates relative to the box centre, e.g. the mask centre):

* standard rotation ``A = A_cons @ R(v)`` (:func:`.local_grid.rotvec_to_matrix`);
* standard origin ``o = o_cons + t + ((A - A_cons) f)_xy``
  (:func:`.geometry.fulcrum_shift`): the fulcrum stays where the consensus pose
  put it (moved by ``-t``).

Origins follow RELION as measured by :func:`.projector.forward_model` against
``relion_project``: a map point ``p`` appears at ``(A p)_xy - o`` (content
moved by ``-o``). The fulcrum term's sign follows from that: ``(A f)_xy - o``
must equal ``(A_cons f)_xy - o_cons`` for ``t = 0``. (docs/conventions.md still
states ``+o`` and ``o - fulcrum_shift``; both flip together.)

Results are standard poses (about the box centre), ready for RELION or
cryoSPARC; :func:`candidate_poses` does the conversion.

Branch and bound (after Punjani et al., Nat. Methods 14, 290 (2017), online
methods "branch and bound")
--------------------------------------------------------------------------
The coarse lattices are offset by half a coarse cell minus half a leaf on every
axis (:func:`.local_grid.rotation_grid` ``finest_step_deg``), so that the
leaves' centres include zero: the consensus pose is a leaf, and exact poses come
back exactly. Stage ``t = 0 .. T-1`` scores rotation cells of side
``res * 2**(T-1-t)``
(``res`` = ``alignment_resolution_deg``) times shift cells of side
``shift_res * 2**(T-1-t)``, each at its (clipped) centre, with the score
(:func:`.scoring.score_poses`) summed up to the stage radius
``r_t = max(r_max / 2**(T-1-t), min_radius_px)``. After each stage but the
last, cells that may hold the best pose are kept and split into 8 (rotations)
and 4 (shifts) children. The last stage's cells (side ``res``) are the leaves:
points, not regions, so they are pre-screened at radius ``r_{T-2}`` with the
high-band bound alone (no cell margin) and the survivors get the full score
(radius ``r_max``). The best of those is the result.

Pruning compares, per particle, a lower bound of the full score within each
cell with an upper bound ``U`` of the best full score:

* ``U``: the exact full score (radius ``r_max``, priors included) of the
  stage's best candidate ``b`` (one more pose per particle). Rigorous.
* High band ``r_t < |k| <= r_max``. Write ``u = c P s / sigma``,
  ``x = X / sigma``; the band's part of the score is ``0.5 |u|^2 - Re<u, x>``
  and ``|u|^2 = H`` is the CTF^2/sigma^2-weighted power of the projection in the
  band, computed exactly for ``b`` and used for every candidate of the particle
  (*heuristic*: the band power of nearby poses differs little).

  - ``bound="gaussian"`` (default, the paper's): if the image is a prediction
    plus Gaussian noise of power sigma^2, the best the band can give is the
    true pose's ``-0.5 H - Re<u, n>``, and ``Re<u, n>`` has variance ``H``
    (normalisation of :mod:`.noise`); bound ``-0.5 H - gamma sqrt(H)``,
    ``gamma = bound_sigmas``. It holds with probability about ``Phi(gamma)``
    per candidate if the noise model is right (heuristic: trusts sigma^2,
    and the reference's scale: the truth's band power is taken to be ``H``).
  - ``bound="cauchy_schwarz"``: ``Re<u, x> <= sqrt(H X_h)`` with ``X_h`` the
    image's weighted band power gives ``0.5 H - sqrt(H X_h)``: rigorous given
    ``H``, but loose at low SNR, so it prunes little.

* Change of the low-band score within a cell (*heuristic*): the score is known
  at the centre only. Near the optimum it is quadratic:
  ``E(centre) - E(best) ~ 0.5 sum c^2 |P_centre - P_best|^2 / sigma^2``. For a
  rigid displacement of mean square ``D^2`` (in-plane, averaged over the
  density) a coefficient at radius ``|k|`` changes by
  ``|P|^2 min(4, 0.5 (2 pi |k| / N)^2 D^2)`` (the 1/2 averages the direction
  of ``k``). With the cell's half diagonals (angle ``a``, shift ``d``) and the
  signal a uniform ball of radius ``rho = signal_radius_px`` about the fulcrum
  (in-plane rms radius ``sqrt(2/5) rho``), ``D^2 = 0.4 (rho a)^2 + d^2``. The
  margin is ``M + gamma sqrt(2 M)`` (the noise term of the difference), with
  ``M`` from ``b``'s projection power in the low band.
* Priors (optional): their minimum over the cell (at the cell's point nearest
  the consensus) is used: exact.

A cell is kept when ``E_low(centre) + prior bound - margin + high-band bound
<= U`` (``U + 7`` with ``top_k > 1``, to keep poses of weight above ~1e-3);
a rotation cell is kept if some shift cell keeps it (and vice versa), so the
next stage scores a product grid (one matrix product per particle). The best
cell is always kept. ``max_rotation_cells`` / ``max_shift_cells`` (default 16
and 8) cap the survivors, keeping the lowest bounds: a heuristic that bounds
the cost at coarse stages, where the bound cannot prune much (low radius,
large cells); the rotation cap grows as ``r_max / r_next`` at the coarse stages
(:func:`_stage_caps`, measured there). Tested against exhaustive search of the leaves
(tests/test_search.py): same best pose for 10 of 10 particles with 34x fewer
poses.

Cost: about 2.5e4 poses per particle with the default extents of
``localrefine refine`` (10 deg, 3 px, 0.5 deg, 0.25 px), most of them at the
cheap coarse radii; the time goes to the projections of the rotation
candidates (``SearchResult.n_evaluated``; per-stage counts at debug level).
``benchmarks/bench_search.py`` measures particles per second.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from .cell_tree import CellLevel, cell_tree_root
from .ctf import CtfBatch
from .geometry import geodesic_angle_deg
from .local_grid import compact_rows, rotations_about_fulcrum, vector_norm
from .scoring import half_plane_pixels, score_poses, weighted_projection_power
from .search_ops import CPU_SEARCH_BATCH, batch_ops, search_threads

__all__ = [
    "SearchResult",
    "Stage",
    "search_schedule",
    "candidate_poses",
    "local_search",
]

log = logging.getLogger(__name__)

#: exponent of the rotation cap's growth at coarse stages (:func:`_stage_caps`)
_CAP_EXPONENT = 1.0


@dataclasses.dataclass(frozen=True)
class Stage:
    """One branch-and-bound stage: cell sides and the scoring radius."""

    rotation_step_deg: float
    shift_step_px: float
    radius_px: float


@dataclasses.dataclass
class SearchResult:
    """Per-particle result of :func:`local_search` (standard poses).

    Attributes
    ----------
    rotations : ndarray, shape (m, 3, 3)
        Best RELION matrices ``A``.
    origins_px : ndarray, shape (m, 2)
        Best origins (pixels, about the box centre).
    scores : ndarray, shape (m,)
        Their full score (:func:`.scoring.score_poses` at ``r_max_px``, plus
        priors); lower is better.
    n_evaluated : ndarray, shape (m,), int64
        Poses scored per particle (all stages, bound evaluations included).
    rotation_change_deg : ndarray, shape (m,)
        Geodesic angle between the best and the consensus rotation.
    shift_change_px : ndarray, shape (m,)
        ``|t|``: the searched shift about the fulcrum (not the fulcrum term).
    top_rotations, top_origins_px, top_scores, top_weights : ndarray
        Shapes (m, K, 3, 3), (m, K, 2), (m, K), (m, K): the K best poses of the
        last stage, best first, with weights ``exp(-(score - best))``
        normalised over the K (for marginalisation).
    """

    rotations: np.ndarray
    origins_px: np.ndarray
    scores: np.ndarray
    n_evaluated: np.ndarray
    rotation_change_deg: np.ndarray
    shift_change_px: np.ndarray
    top_rotations: np.ndarray
    top_origins_px: np.ndarray
    top_scores: np.ndarray
    top_weights: np.ndarray


def search_schedule(
    *,
    rotation_extent_deg: float,
    shift_extent_px: float,
    alignment_resolution_deg: float,
    shift_resolution_px: float,
    r_max_px: float,
    n_stages: int | None = None,
    min_radius_px: float = 6.0,
) -> list[Stage]:
    """The stages of the branch and bound (coarse to fine).

    The number of stages ``T`` (default) is the smallest with a coarse rotation
    cell ``res * 2**(T-1)`` of at least ``rotation_extent_deg / 2.5`` (e.g. 4
    stages, 4 deg coarse cells, for 10 deg at 0.5 deg).
    """
    res = float(alignment_resolution_deg)
    if not res > 0:
        raise ValueError(f"alignment_resolution_deg must be positive; got {res}")
    if not shift_resolution_px > 0:
        raise ValueError(
            f"shift_resolution_px must be positive; got {shift_resolution_px}"
        )
    if n_stages is None:
        n_stages = 1
        while res * 2 ** (n_stages - 1) < rotation_extent_deg / 2.5:
            n_stages += 1
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1; got {n_stages}")
    stages = []
    for t in range(n_stages):
        f = 2.0 ** (n_stages - 1 - t)
        radius = min(float(r_max_px), max(r_max_px / f, min_radius_px))
        stages.append(Stage(res * f, shift_resolution_px * f, radius))
    return stages


def candidate_poses(
    consensus_rotations: np.ndarray,
    consensus_origins_px: np.ndarray,
    fulcrum_px: np.ndarray,
    rotvecs_deg: np.ndarray,
    shifts_px: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Standard poses of region candidates (rotation about the fulcrum, shift).

    Parameters
    ----------
    consensus_rotations : ndarray, shape (m, 3, 3)
    consensus_origins_px : ndarray, shape (m, 2)
    fulcrum_px : ndarray, shape (3,)
        Map coordinates (pixels, x y z) relative to the box centre.
    rotvecs_deg : ndarray, shape (m, J, 3)
        Rotation perturbations (axis times angle, degrees).
    shifts_px : ndarray, shape (m, S, 2)
        Shift changes (pixels).

    Returns
    -------
    rotations : ndarray, shape (m, J, 3, 3)
        ``A_cons @ R(v)``.
    origins : ndarray, shape (m, J, S, 2)
        ``o_cons + t + ((A - A_cons) f)_xy`` (module docstring).
    """
    rot, fs = rotations_about_fulcrum(
        np.asarray(consensus_rotations, dtype=np.float64), rotvecs_deg, fulcrum_px
    )
    origins = (
        np.asarray(consensus_origins_px, dtype=np.float64)[:, None, None, :]
        + np.asarray(shifts_px, dtype=np.float64)[:, None, :, :]
        + fs[:, :, None, :]
    )  # (m, J, S, 2)
    return rot, origins


def _prior(
    length: np.ndarray, sigma: float | None, valid: np.ndarray | None = None
) -> np.ndarray:
    """``0.5 (length / sigma)^2`` (0 without a prior); inf where not ``valid``."""
    out = (
        np.zeros(length.shape) if sigma is None else 0.5 * (length / float(sigma)) ** 2
    )
    if valid is not None:
        out[~valid] = np.inf
    return out


def _keep(
    bound: np.ndarray,
    valid: np.ndarray,
    limit: np.ndarray,
    forced: np.ndarray,
    cap: int | None,
) -> tuple[np.ndarray, int]:
    """Cells kept per particle: ``bound <= limit`` (always ``forced``), at most ``cap``.

    Parameters
    ----------
    bound : ndarray, shape (m, K)
        Lower bounds of the cells (padding: anything, masked by ``valid``).
    valid : ndarray, shape (m, K), bool
    limit : ndarray, shape (m,)
    forced : ndarray, shape (m,), int
        The cell always kept (the stage's best).
    cap : int or None
        Above ``cap`` cells, the ``cap`` lowest bounds are kept (ties: lower
        index first); ``forced`` replaces the last of them if it is not among
        them.

    Returns
    -------
    kept : ndarray, shape (m, K), bool
    n_capped : int
        Particles whose cells the cap cut.
    """
    m, width = bound.shape
    kept = (bound <= limit[:, None]) & valid
    kept[np.arange(m), forced] = True
    if cap is None:
        return kept, 0
    rows = np.flatnonzero(kept.sum(axis=1) > cap)
    if rows.size:
        keys = np.where(kept[rows], bound[rows], np.inf)
        best = np.argsort(keys, axis=1, kind="stable")[:, :cap]
        f = forced[rows]
        missing = ~(best == f[:, None]).any(axis=1)
        best[missing, cap - 1] = f[missing]
        capped = np.zeros((rows.size, width), dtype=bool)
        np.put_along_axis(capped, best, True, axis=1)
        kept[rows] = capped
    return kept, int(rows.size)


def local_search(
    projector,
    images_f: np.ndarray,
    ctf: np.ndarray | CtfBatch,
    inv_sigma2: np.ndarray,
    *,
    consensus_rotations: np.ndarray,
    consensus_origins_px: np.ndarray,
    fulcrum_px: np.ndarray,
    rotation_extent_deg: float = 10.0,
    shift_extent_px: float = 3.0,
    alignment_resolution_deg: float = 0.5,
    r_max_px: float,
    prior_sigma_rotation_deg: float | None = None,
    prior_sigma_shift_px: float | None = None,
    top_k: int = 1,
    score_fn: Callable[..., np.ndarray] = score_poses,
    power_fn: Callable[..., tuple[np.ndarray, np.ndarray]] = weighted_projection_power,
    shift_resolution_px: float = 0.125,
    n_stages: int | None = None,
    min_radius_px: float = 6.0,
    bound: str = "gaussian",
    bound_sigmas: float = 3.0,
    signal_radius_px: float | None = None,
    max_rotation_cells: int | None = 16,
    max_shift_cells: int | None = 8,
    prescreen: bool = True,
    batch_size: int = CPU_SEARCH_BATCH,
    threads: int = 1,
    on_batch: Callable | None = None,
) -> SearchResult:
    """Best pose of each particle near its consensus pose (branch and bound).

    Parameters
    ----------
    projector : FourierProjector
        The (masked) reference.
    images_f : ndarray, shape (m, N, N//2+1), complex
        Particle images (Fourier layout of :mod:`.fourier`).
    ctf : ndarray, shape (m, N, N//2+1), or CtfBatch
        CTF per particle, or their parameters (:class:`.ctf.CtfBatch`): a
        ``score_fn`` with ``bind_batch`` evaluates them where it scores (the
        GPU's: ``kernels/cuda_ctf.py``), the host's ops once per batch.
    inv_sigma2 : ndarray, shape (m, N//2+1)
        ``1 / sigma2`` per shell (:mod:`.noise`).
    consensus_rotations : ndarray, shape (m, 3, 3)
        Consensus RELION matrices ``A``.
    consensus_origins_px : ndarray, shape (m, 2)
        Consensus origins in pixels (RELION sign: content moved by ``-o``).
    fulcrum_px : ndarray, shape (3,)
        Pivot of the rotations (pixels, map coordinates relative to the centre).
    rotation_extent_deg : float
        Largest rotation change from the consensus (degrees).
    shift_extent_px : float
        Largest shift change from the consensus about the fulcrum (pixels).
    alignment_resolution_deg : float
        Side of the finest rotation cells (degrees).
    r_max_px : float
        Scoring radius of the last stage (cycles per box, <= N//2).
    prior_sigma_rotation_deg, prior_sigma_shift_px : float, optional
        Gaussian priors on the rotation change (degrees) and shift change
        (pixels), added to the score as ``0.5 (change / sigma)^2``.
    top_k : int
        Number of best poses (with weights) returned.
    score_fn : callable
        :func:`.scoring.score_poses` or a drop-in (GPU) replacement; called
        with ``rotation_shifts_px=`` (the fulcrum term). One with a
        ``bind_batch`` method (the GPU's) is bound to each batch instead and
        keeps it on the device (:mod:`.search_ops`).
    power_fn : callable
        :func:`.scoring.weighted_projection_power` (the high-band bound's
        projection power) or a drop-in (GPU) replacement.
    shift_resolution_px : float
        Side of the finest shift cells (pixels).
    n_stages, min_radius_px : see :func:`search_schedule`.
    bound : {"gaussian", "cauchy_schwarz"}
        High-band bound (module docstring).
    bound_sigmas : float
        ``gamma``: noise standard deviations allowed in the bounds.
    signal_radius_px : float, optional
        Radius about the fulcrum holding the signal (default ``0.3 N``).
    max_rotation_cells, max_shift_cells : int or None
        Caps on the cells kept per stage (None: no cap).
    prescreen : bool
        Pre-screen the leaves at half the radius (module docstring).
    batch_size : int
        Particles scored together (:func:`.search_ops.search_batch_size`:
        the whole read batch on the GPU).
    threads : int
        Batches searched in parallel (Python threads; NumPy releases the GIL
        in the projections and products). The result does not depend on it.
        1 with a ``bind_batch`` ``score_fn`` (:func:`.search_ops.search_threads`).
    on_batch : callable, optional
        ``on_batch(ops, rows=, result=)`` after each batch is searched, before
        its batch ops (:func:`.search_ops.batch_ops`) are closed: ``rows`` the
        slice of the particles, ``result`` their :class:`SearchResult`. The
        refinement inserts the GPU's batch from its resident images here.

    Returns
    -------
    SearchResult
    """
    images_f = np.asarray(images_f)
    if images_f.ndim != 3:
        raise ValueError(
            f"images_f must have shape (m, N, N//2+1); got {images_f.shape}"
        )
    m, n = images_f.shape[0], images_f.shape[1]
    a_cons = np.asarray(consensus_rotations, dtype=np.float64).reshape(m, 3, 3)
    o_cons = np.asarray(consensus_origins_px, dtype=np.float64).reshape(m, 2)
    fulcrum = np.asarray(fulcrum_px, dtype=np.float64).reshape(3)
    if rotation_extent_deg < 0 or shift_extent_px < 0:
        raise ValueError(
            f"extents must be >= 0; got rotation {rotation_extent_deg} deg, "
            f"shift {shift_extent_px} px"
        )
    if not 0 < r_max_px <= n // 2:
        raise ValueError(f"r_max_px must be in (0, N//2 = {n // 2}]; got {r_max_px}")
    if bound not in ("gaussian", "cauchy_schwarz"):
        raise ValueError(f"bound must be 'gaussian' or 'cauchy_schwarz'; got {bound!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    stages = search_schedule(
        rotation_extent_deg=rotation_extent_deg,
        shift_extent_px=shift_extent_px,
        alignment_resolution_deg=alignment_resolution_deg,
        shift_resolution_px=shift_resolution_px,
        r_max_px=r_max_px,
        n_stages=n_stages,
        min_radius_px=min_radius_px,
    )
    settings = dict(
        fulcrum=fulcrum,
        rot_ext=float(rotation_extent_deg),
        shift_ext=float(shift_extent_px),
        r_max=float(r_max_px),
        prior_rot=prior_sigma_rotation_deg,
        prior_shift=prior_sigma_shift_px,
        top_k=int(top_k),
        score_fn=score_fn,
        power_fn=power_fn,
        bound=bound,
        gamma=float(bound_sigmas),
        rho=0.3 * n if signal_radius_px is None else float(signal_radius_px),
        caps=(max_rotation_cells, max_shift_cells),
        prescreen=bool(prescreen),
        # with top-K, keep poses whose weight may exceed ~1e-3 of the best's
        slack=0.0 if top_k == 1 else 7.0,
    )
    if isinstance(ctf, CtfBatch):  # parameters: evaluated where the batch is scored
        if ctf.shape != images_f.shape:
            raise ValueError(
                f"CTF batch of shape {ctf.shape} for images {images_f.shape}"
            )
    else:
        ctf = np.broadcast_to(np.asarray(ctf), images_f.shape)
    inv_sigma2 = np.broadcast_to(
        np.asarray(inv_sigma2, dtype=np.float64), (m, n // 2 + 1)
    )
    if m == 0:
        k = int(top_k)
        return SearchResult(
            np.zeros((0, 3, 3)),
            np.zeros((0, 2)),
            np.zeros(0),
            np.zeros(0, np.int64),
            np.zeros(0),
            np.zeros(0),
            np.zeros((0, k, 3, 3)),
            np.zeros((0, k, 2)),
            np.zeros((0, k)),
            np.zeros((0, k)),
        )
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1; got {threads}")
    threads = search_threads(score_fn, threads)

    def run(start: int) -> SearchResult:
        sl = slice(start, min(start + batch_size, m))
        return _search_batch(
            projector,
            images_f[sl],
            ctf[sl],
            inv_sigma2[sl],
            a_cons[sl],
            o_cons[sl],
            stages,
            settings,
            on_done=None if on_batch is None else partial(on_batch, rows=sl),
        )

    starts = range(0, m, batch_size)
    if int(threads) > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=int(threads)) as pool:
            parts = list(pool.map(run, starts))  # in batch order
    else:
        parts = [run(start) for start in starts]
    return SearchResult(
        *(
            np.concatenate([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(SearchResult)
        )
    )


@dataclasses.dataclass
class _Cells:
    """Per-particle cells: rows of one level of the cell tree, as padded arrays.

    The padding repeats row 0 (:func:`.local_grid.compact_rows`).
    """

    level: CellLevel
    index: np.ndarray  # (m, K) int, rows of level
    valid: np.ndarray  # (m, K) bool, a prefix of each row

    @classmethod
    def same_for_all(cls, level: CellLevel, m: int) -> _Cells:
        k = len(level)
        return cls(
            level,
            np.broadcast_to(np.arange(k, dtype=np.int32), (m, k)),
            np.ones((m, k), bool),
        )

    def count(self) -> np.ndarray:
        return self.valid.sum(axis=1)

    def subset(self, kept: np.ndarray) -> _Cells:
        """The kept cells (m, K) bool, in index order (no subdivision)."""
        return _Cells(self.level, *compact_rows(self.index, kept))

    def split(self, kept: np.ndarray, step: float) -> _Cells:
        """The children of the kept cells (m, K) bool of side ``step``."""
        return _Cells(*self.level.split(self.index, kept, step))


@dataclasses.dataclass
class _Scored:
    """Scores of a padded (rotation cells x shift cells) product grid."""

    rv_norm: np.ndarray  # (m, J) |cell centre|
    tv_norm: np.ndarray  # (m, S)
    tv_eval: np.ndarray  # (m, S, 2) centres clipped into the extent
    rv_eval: np.ndarray  # (m, J, 3) centres clipped into the extent
    grid: object  # the scores without priors (engine/search_ops.py)
    prior_r: np.ndarray  # (m, J) priors of the evaluated poses, inf on the padding
    prior_s: np.ndarray  # (m, S)
    n_valid: np.ndarray  # (m,) real poses
    jb: np.ndarray  # (m,) best rotation
    sb: np.ndarray  # (m,) best shift
    best: np.ndarray  # (m,) its score with priors


def _score_grid(ops, a_cons, o_cons, rots: _Cells, shifts: _Cells, radius, cfg):
    r_level, s_level = rots.level, shifts.level
    rv_eval = r_level.clipped[rots.index]
    tv_eval = s_level.clipped[shifts.index]
    counts = (rots.count(), shifts.count())
    grid = ops.score_local(
        a_cons,
        rv_eval,
        o_cons[:, None, :] + tv_eval,
        fulcrum_px=cfg["fulcrum"],
        r_max_px=radius,
        counts=counts,
    )  # (m, J, S)
    # priors, inf on the padding (so the padded poses drop out of every minimum)
    prior_r = _prior(r_level.clipped_norm[rots.index], cfg["prior_rot"], rots.valid)
    prior_s = _prior(
        s_level.clipped_norm[shifts.index], cfg["prior_shift"], shifts.valid
    )
    jb, sb, best = grid.best(prior_r, prior_s)
    n_valid = counts[0] * counts[1]
    return _Scored(
        r_level.norm[rots.index], s_level.norm[shifts.index], tv_eval, rv_eval, grid,
        prior_r, prior_s, n_valid, jb, sb, best,
    )  # fmt: skip


def _upper_and_high_band(
    ops, x, inv_sigma2, a_cons, o_cons, sc, radius, cfg, cell=None
):
    """Full score of the best candidate (upper bound), high-band bound and sums.

    ``cell``: ``(rotation_step_deg, shift_step_px)`` of the stage's cells, or
    None (points). Returns ``upper`` (m,), the high-band bound (m,), the
    high-band power ``h`` (m,) and the cell margin's power sum ``m_cell`` (m,)
    (0 without ``cell``): the expected score change within a cell,
    ``0.5 sum_{k <= radius} power * min(4, 0.5 (2 pi k / N)^2 d2)`` with ``d2``
    the mean square displacement (pixels^2) of the density in a half cell
    (a uniform ball of radius ``rho`` about the fulcrum: in-plane rms radius
    ``sqrt(2/5) rho``; averaged over the direction of k, factor 1/2).
    """
    m, n = x.shape[0], x.shape[1]
    rows = np.arange(m)
    # the best pose's rotation, formed once here: the full score and the power
    rot_b, term_b = rotations_about_fulcrum(
        a_cons, sc.rv_eval[rows, sc.jb][:, None], cfg["fulcrum"]
    )  # (m, 1, 3, 3), (m, 1, 2)
    no_prior = np.zeros((m, 1))
    e_full = ops.score(
        rot_b,
        o_cons[:, None, :] + sc.tv_eval[rows, sc.sb][:, None],
        r_max_px=cfg["r_max"],
        rotation_shifts_px=term_b,
        counts=(np.ones(m, np.int64), np.ones(m, np.int64)),
    ).values(no_prior, no_prior)[:, 0, 0]
    rot_b = rot_b[:, 0]
    upper = e_full + sc.prior_r[rows, sc.jb] + sc.prior_s[rows, sc.sb]  # with priors
    if cell is None:
        disp2 = None
    else:
        half_rot = np.deg2rad(np.sqrt(3) / 2 * cell[0])
        half_shift = np.sqrt(2) / 2 * cell[1]
        disp2 = 0.4 * (cfg["rho"] * half_rot) ** 2 + half_shift**2  # pixels^2

    def weights(k):
        high = k > radius
        if disp2 is None:
            return high[None].astype(np.float64)
        change = np.minimum(4.0, 0.5 * (2 * np.pi * k / n) ** 2 * disp2)
        return np.stack([high, np.where(high, 0.0, 0.5 * change)])

    sums = ops.power_sums(rot_b, weights, r_max_px=cfg["r_max"])  # (m, W)
    h = sums[:, 0]
    m_cell = np.zeros(m) if disp2 is None else sums[:, 1]
    if cfg["bound"] == "gaussian":
        high_bound = -0.5 * h - cfg["gamma"] * np.sqrt(h)
    else:
        flat, kx, ky, mult, shell = half_plane_pixels(n, cfg["r_max"])
        xhigh = np.hypot(kx, ky) > radius  # the image's own pixel order
        xh = x.reshape(m, -1)[:, flat[xhigh]]
        xpow = (np.abs(xh) ** 2 * mult[xhigh] * inv_sigma2[:, shell[xhigh]]).sum(-1)
        high_bound = 0.5 * h - np.sqrt(h * xpow)
    return upper, high_bound, h, m_cell


def _kept(minima, upper, sc, rots: _Cells, shifts: _Cells, caps):
    """Per particle: the rotation and shift cells (m, J), (m, S) that may hold the best.

    ``minima``: the lower bounds' minima over the shifts (m, J) and over the
    rotations (m, S).
    """
    kj, cj = _keep(minima[0], rots.valid, upper, sc.jb, caps[0])
    ks, cs = _keep(minima[1], shifts.valid, upper, sc.sb, caps[1])
    if cj or cs:
        log.debug(
            "cell caps (%s rotations, %s shifts) bit for %d and %d of %d particles",
            caps[0],
            caps[1],
            cj,
            cs,
            sc.jb.size,
        )
    return kj, ks


def _stage_caps(caps, r_max: float, next_radius: float):
    """Rotation cap grown at coarse stages: ``cap * (r_max / r_next)``.

    The children of the kept cells are scored at the next stage's radius
    ``r_next``, where a pose costs about ``r_next^2`` pixels, so keeping more
    cells at the coarse stages is cheap; there the low radius and the large
    cells make the bounds least selective, and a fixed cap drops the cell of
    the best leaf. Measured on the 1HZH Fab data (SNR 0.2, box 44) with the
    true map as reference, 0.5 deg leaves, 48 particles, median error to the
    truth from 3.82 deg: fixed cap 16: 3.12 deg (8.8e3 poses/particle); growth
    exponent 0.5: 2.58 (1.1e4); 1: 2.70 (1.3e4); 2: 2.68 (1.9e4). The shift
    cap is not grown: the grid is a product, so it would multiply the cost.
    """
    rot_cap, shift_cap = caps
    if rot_cap is not None:
        rot_cap = int(round(rot_cap * (r_max / next_radius) ** _CAP_EXPONENT))
    return rot_cap, shift_cap


def _search_batch(
    projector, x, ctf, inv_sigma2, a_cons, o_cons, stages, cfg, on_done=None
) -> SearchResult:
    ops = batch_ops(
        cfg["score_fn"], cfg["power_fn"], projector, x, ctf, inv_sigma2,
        r_max_px=cfg["r_max"],
    )  # fmt: skip
    try:
        result = _search_stages(ops, x, inv_sigma2, a_cons, o_cons, stages, cfg)
        if on_done is not None:
            on_done(ops, result=result)
        return result
    finally:
        close = getattr(ops, "close", None)  # e.g. frees the batch's device arrays
        if close is not None:
            close()


def _search_stages(ops, x, inv_sigma2, a_cons, o_cons, stages, cfg) -> SearchResult:
    m = x.shape[0]
    # lattices offset so that the leaves hold the consensus pose itself (zero)
    rots = _Cells.same_for_all(
        cell_tree_root(
            3, cfg["rot_ext"], stages[0].rotation_step_deg, stages[-1].rotation_step_deg
        ),
        m,
    )
    shifts = _Cells.same_for_all(
        cell_tree_root(
            2, cfg["shift_ext"], stages[0].shift_step_px, stages[-1].shift_step_px
        ),
        m,
    )
    n_eval = np.zeros(m, dtype=np.int64)
    gamma = cfg["gamma"]
    for t, stage in enumerate(stages[:-1]):
        sc = _score_grid(ops, a_cons, o_cons, rots, shifts, stage.radius_px, cfg)
        n_eval += sc.n_valid + 1  # + the upper-bound pose
        upper, high_bound, h, m_cell = _upper_and_high_band(
            ops, x, inv_sigma2, a_cons, o_cons, sc, stage.radius_px, cfg,
            cell=(stage.rotation_step_deg, stage.shift_step_px),
        )  # fmt: skip
        half_shift = np.sqrt(2) / 2 * stage.shift_step_px
        margin = m_cell + gamma * np.sqrt(2 * m_cell)
        # priors at the cells' points nearest the consensus; inf on the padding
        rv_near = np.maximum(sc.rv_norm - np.sqrt(3) / 2 * stage.rotation_step_deg, 0)
        tv_near = np.maximum(sc.tv_norm - half_shift, 0)
        prior_r = _prior(rv_near, cfg["prior_rot"], rots.valid)
        prior_r -= (margin - high_bound)[:, None]
        minima = sc.grid.minima(
            prior_r, _prior(tv_near, cfg["prior_shift"], shifts.valid)
        )  # of the lower bounds
        kj, ks = _kept(
            minima,
            upper + cfg["slack"],
            sc,
            rots,
            shifts,
            _stage_caps(cfg["caps"], cfg["r_max"], stages[t + 1].radius_px),
        )
        rots = rots.split(kj, stage.rotation_step_deg)
        shifts = shifts.split(ks, stage.shift_step_px)
        log.debug(
            "stage %d: radius %.1f px, cells %.2f deg x %.3f px, poses per particle "
            "%.0f; bound terms (means): upper - best %.1f, cell margin %.1f, "
            "high-band power %.1f; kept rotation cells %.1f, shift cells %.1f",
            t,
            stage.radius_px,
            stage.rotation_step_deg,
            stage.shift_step_px,
            sc.n_valid.mean(),
            np.mean(upper - sc.best),
            np.mean(margin),
            np.mean(h),
            kj.sum() / m,
            ks.sum() / m,
        )

    # last stage: leaves (cells of the final resolution) are points, so no cell
    # margin: pre-screen them at half the radius with the high-band bound, then
    # score the survivors fully.
    r_pre = stages[-2].radius_px if len(stages) > 1 else cfg["r_max"] / 2
    if cfg["prescreen"] and r_pre < cfg["r_max"]:
        sc = _score_grid(ops, a_cons, o_cons, rots, shifts, r_pre, cfg)
        n_eval += sc.n_valid + 1
        upper, high_bound, _, _ = _upper_and_high_band(
            ops, x, inv_sigma2, a_cons, o_cons, sc, r_pre, cfg
        )
        over_s, over_r = sc.grid.minima(sc.prior_r, sc.prior_s)  # inf on the padding
        minima = (over_s + high_bound[:, None], over_r + high_bound[:, None])
        kj, ks = _kept(minima, upper + cfg["slack"], sc, rots, shifts, (None, None))
        log.debug(
            "leaves: pre-screen at radius %.1f px, poses per particle %.0f, kept "
            "rotations %.1f, shifts %.1f",
            r_pre,
            sc.n_valid.mean(),
            kj.sum() / m,
            ks.sum() / m,
        )
        rots, shifts = rots.subset(kj), shifts.subset(ks)
    sc = _score_grid(ops, a_cons, o_cons, rots, shifts, cfg["r_max"], cfg)
    n_eval += sc.n_valid
    log.debug(
        "leaves: radius %.1f px, poses per particle %.0f; total poses per particle %.0f",
        cfg["r_max"],
        sc.n_valid.mean(),
        n_eval.mean(),
    )
    return _finish(sc, a_cons, o_cons, n_eval, cfg["top_k"], cfg["fulcrum"])


def _finish(sc: _Scored, a_cons, o_cons, n_eval, top_k, fulcrum) -> SearchResult:
    m = sc.jb.size
    if top_k == 1:
        j, s, top_scores = sc.jb[:, None], sc.sb[:, None], sc.best[:, None]
    else:
        flat = sc.grid.values(sc.prior_r, sc.prior_s).reshape(m, -1)
        k = min(top_k, flat.shape[1])
        order = np.argsort(flat, axis=1, kind="stable")[:, :k]  # (m, K)
        top_scores = np.take_along_axis(flat, order, axis=1)
        j, s = np.unravel_index(order, (sc.rv_eval.shape[1], sc.tv_eval.shape[1]))
    rows = np.arange(m)[:, None]
    top_rot, term = rotations_about_fulcrum(a_cons, sc.rv_eval[rows, j], fulcrum)
    # standard origins o_cons + t + fulcrum term (candidate_poses)
    top_orig = o_cons[:, None, :] + sc.tv_eval[rows, s] + term
    rel = np.exp(-(top_scores - top_scores[:, :1]))
    rel = np.where(np.isfinite(top_scores), rel, 0.0)
    weights = rel / rel.sum(axis=1, keepdims=True)
    best_rot = top_rot[:, 0]
    return SearchResult(
        rotations=best_rot,
        origins_px=top_orig[:, 0],
        scores=top_scores[:, 0],
        n_evaluated=n_eval,
        rotation_change_deg=geodesic_angle_deg(best_rot, a_cons),
        shift_change_px=vector_norm(sc.tv_eval[np.arange(m), s[:, 0]]),
        top_rotations=top_rot,
        top_origins_px=top_orig,
        top_scores=top_scores,
        top_weights=weights,
    )
