"""GPU pose scoring: the twin of :func:`.engine.scoring.score_poses`.

The score of every (rotation, shift) pair of every particle is

    ``E = 0.5 sum_p w c^2 |P|^2 / sigma2 - Re sum_p P Z_s``,
    ``Z_s = w c conj(X) / sigma2 * exp(+2 pi i k.o_s / N)``

(``w`` the Hermitian multiplicity, formulas in ``engine/scoring.py`` and
``scoring.cu``). The host folds the CTF, the multiplicity and ``1/sigma2``
into per-pixel weights (``w1``, ``Y``), kernel ``phase_table`` builds the
``Z`` tables of all shifts on the GPU, and kernel ``score_tiles`` (32 shifts
per block) or ``score_tiles_s64`` (64, used when S > 32) interpolates the
slices of 32 rotations x 32 pixels into shared memory and multiplies them with
the ``Z`` tile (a complex matrix product), all particles of a batch in one
launch. The branch-and-bound stages of :func:`.engine.search.local_search`
call this function on each stage's candidate set (``score_fn=``).

Entry points with one signature: ``_score_host`` (NumPy engine),
``_score_cuda`` and ``score_poses`` (dispatch on ``device``, logs the path).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..engine.scoring import _check_common, half_plane_pixels
from ..engine.scoring import score_poses as _engine_score_poses
from ..engine.scoring import weighted_projection_power as _engine_power
from .backend import batch_size_for, empty, load_kernels, select_device, to_device
from .cuda_projector import cells_radius, device_cells, device_volume

__all__ = [
    "weighted_projection_power",
    "score_poses",
    "get_score_fn",
    "fold_weights",
    "flop_count",
    "byte_count",
]

log = logging.getLogger(__name__)

_TILE = 32  # rotations and pixels per tile of the default kernels (LR_TJ, LR_TP)
#: scoring kernel variants: name -> (kernel, rotations per tile, shifts per tile,
#: reads cells); the host uses "s32" for S <= 32, else "s64" (variant_for)
VARIANTS = {
    "s32": ("score_tiles", 32, 32, False),
    "s64": ("score_tiles_s64", 32, 64, False),
    "j64_s64": ("score_tiles_j64_s64", 64, 64, False),
    "s64_cells": ("score_tiles_s64_cells", 32, 64, True),
    "j64_s64_cells": ("score_tiles_j64_s64_cells", 64, 64, True),
    # s64 with 4 blocks per SM (64 registers) instead of 2 (104)
    "s64_occ4": ("score_tiles_s64_occ4", 32, 64, False),
    "s64_cells_occ4": ("score_tiles_s64_cells_occ4", 32, 64, True),
    # 16-byte shared-memory reads, 4 x 8 threads per warp (scoring.cu, WIDE)
    "s64_wide": ("score_tiles_s64_wide", 32, 64, False),
    "j64_s64_wide": ("score_tiles_j64_s64_wide", 64, 64, False),
    "j64_s64_cells_wide": ("score_tiles_j64_s64_cells_wide", 64, 64, True),
    # rotation lanes: lane -> rotation while interpolating (scoring.cu, RLANES)
    "s32_rl": ("score_tiles_rl", 32, 32, False),
    "s64_rl": ("score_tiles_s64_rl", 32, 64, False),
    "j64_s64_rl": ("score_tiles_j64_s64_rl", 64, 64, False),
    "s64_cells_rl": ("score_tiles_s64_cells_rl", 32, 64, True),
    "s64_wide_rl": ("score_tiles_s64_wide_rl", 32, 64, False),
    "s32_wide": ("score_tiles_wide", 32, 32, False),
    "s32_wide_rl": ("score_tiles_wide_rl", 32, 32, False),
}
#: environment variable choosing where the scoring kernels read the slices:
#: "volume" (default: the padded volume, 8 scattered corners per sample) or
#: "cells" (``cuda_projector.device_cells``: 2 aligned sectors per sample, 8x
#: the memory within the search radius); benchmarks/bench_gpu.py measures both
SAMPLER_ENV = "LOCALREFINE_SCORE_SAMPLER"
#: environment variable naming one ``VARIANTS`` kernel for every stage of the
#: search, whatever S and the sampler (for measurements: benchmarks/bench_iteration.py)
VARIANT_ENV = "LOCALREFINE_SCORE_VARIANT"
#: environment variable choosing how the scoring kernels' warps interpolate
#: the slices: "pixels" (default: lane -> pixel) or "rotations" (lane ->
#: rotation, the ``_rl`` variants: neighbouring rotations of the local search
#: share the sectors of their trilinear corners); bench_gpu.py measures both
LANES_ENV = "LOCALREFINE_SCORE_LANES"
#: environment variable: "1" makes the search use the ``_wide`` variants
#: (16-byte shared-memory reads in the product; not with the cells sampler)
WIDE_ENV = "LOCALREFINE_SCORE_WIDE"

#: Sign of the origin phase in the model ``ctf P exp(sign 2 pi i k.o / N)`` of
#: ``engine/scoring.py`` (+1: RELION moves the projection by -origin). The CPU
#: test ``test_folded_weights_reproduce_engine_scores`` pins it to the engine.
ORIGIN_PHASE_SIGN = 1.0
_pixel_cache: dict[tuple[int, float], tuple] = {}


def flop_count(m: int, n_rot: int, n_shift: int, npix: int) -> float:
    """Floating-point operations of one ``score_tiles`` call (FMA = 2).

    Per (rotation, pixel): 28 for the slice coordinates and trilinear weights,
    32 for the 8-corner complex interpolation, 4 for ``w |P|^2``; per
    (rotation, shift, pixel): 4 for ``Re(P Z)``. Padding of partial tiles is
    not counted (useful work only).
    """
    return float(m) * n_rot * npix * (64.0 + 4.0 * n_shift)


def byte_count(
    m: int, n_rot: int, n_shift: int, npix: int, n_volume_bytes: int
) -> float:
    """Compulsory device-memory traffic of one ``score_tiles`` call (bytes).

    The volume once, per particle the weights and the ``Z`` tables read once
    per rotation tile, and the scores written: a lower bound on DRAM traffic
    (the 8-corner gathers are mostly served by L1/L2).
    """
    tiles_j = -(-n_rot // _TILE)  # Z is read once per 32-rotation tile (s32, s64)
    return (
        float(n_volume_bytes)
        + m * tiles_j * (4.0 * npix + 8.0 * n_shift * npix)
        + m * 4.0 * (n_rot * n_shift)
    )


def _pixels(n: int, r_max_px: float) -> tuple:
    """Pixel table of ``scoring.half_plane_pixels`` on the GPU (cached per n, r)."""

    key = (int(n), float(r_max_px))
    hit = _pixel_cache.get(key)
    if hit is None:
        flat, kx, ky, mult, shell = half_plane_pixels(n, float(r_max_px))
        hit = (
            flat, mult, shell,
            to_device(kx, np.float32),
            to_device(ky, np.float32),
            to_device(np.arange(flat.size), np.int32),  # identity destinations
        )  # fmt: skip
        _pixel_cache[key] = hit
    return hit


def fold_weights(
    images_f: np.ndarray,
    ctf: np.ndarray,
    inv_sigma2: np.ndarray,
    flat: np.ndarray,
    mult: np.ndarray,
    shell: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel weights of the scoring kernel (CTF, 1/sigma2, multiplicity folded in).

    Parameters
    ----------
    images_f : ndarray, shape (b, N, N//2+1), complex
    ctf : ndarray, shape (b, N, N//2+1)
    inv_sigma2 : ndarray, shape (b, N//2+1)
    flat, mult, shell : ndarray, shape (P,)
        From :func:`.engine.scoring.half_plane_pixels`.

    Returns
    -------
    w1 : ndarray, shape (b, P), float32
        ``0.5 * mult * ctf^2 / sigma2``: weight of ``|P|^2``.
    y : ndarray, shape (b, P), complex64
        ``mult * ctf / sigma2 * conj(X)``: the cross term is
        ``Re sum_p P(p) y(p) exp(ORIGIN_PHASE_SIGN 2 pi i k.o / N)``.
    """
    b = images_f.shape[0]
    x = images_f.reshape(b, -1)[:, flat]  # (b, P)
    c = ctf.reshape(b, -1)[:, flat].astype(np.float64)  # (b, P)
    w = mult[None, :] * inv_sigma2[:, shell]  # (b, P)
    w1 = np.ascontiguousarray(0.5 * w * c * c, dtype=np.float32)
    y = np.ascontiguousarray(w * c * np.conj(x), dtype=np.complex64)
    return w1, y


def _score_host(
    projector,
    images_f: np.ndarray,
    ctf: np.ndarray,
    inv_sigma2: np.ndarray,
    rotations: np.ndarray,
    shifts_px: np.ndarray,
    *,
    r_max_px: float,
    rotation_shifts_px: np.ndarray | None = None,
) -> np.ndarray:
    """The NumPy engine (:func:`.engine.scoring.score_poses`)."""
    return _engine_score_poses(
        projector, images_f, ctf, inv_sigma2, rotations, shifts_px,
        r_max_px=r_max_px, rotation_shifts_px=rotation_shifts_px,
    )  # fmt: skip


def _check(
    images_f, ctf, inv_sigma2, rotations, shifts_px, r_max_px, rotation_shifts_px
):
    images_f, ctf, inv_sigma2, m, _ = _check_common(images_f, ctf, inv_sigma2, r_max_px)
    rotations = np.asarray(rotations, dtype=np.float64)
    shifts_px = np.asarray(shifts_px, dtype=np.float64)
    if rotations.ndim != 4 or rotations.shape[0] != m or rotations.shape[2:] != (3, 3):
        raise ValueError(
            f"rotations must have shape ({m}, J, 3, 3); got {rotations.shape}"
        )
    if shifts_px.ndim != 3 or shifts_px.shape[0] != m or shifts_px.shape[2] != 2:
        raise ValueError(
            f"shifts_px must have shape ({m}, S, 2); got {shifts_px.shape}"
        )
    if rotation_shifts_px is not None:
        rotation_shifts_px = np.asarray(rotation_shifts_px, dtype=np.float64)
        if rotation_shifts_px.shape != rotations.shape[:2] + (2,):
            raise ValueError(
                f"rotation_shifts_px must have shape {rotations.shape[:2] + (2,)}; "
                f"got {rotation_shifts_px.shape}"
            )
    return images_f, ctf, inv_sigma2, rotations, shifts_px, rotation_shifts_px


def _score_cuda(
    projector,
    images_f: np.ndarray,
    ctf: np.ndarray,
    inv_sigma2: np.ndarray,
    rotations: np.ndarray,
    shifts_px: np.ndarray,
    *,
    r_max_px: float,
    rotation_shifts_px: np.ndarray | None = None,
) -> np.ndarray:
    """Scores on the GPU; arguments and result as :func:`.engine.scoring.score_poses`.

    Parameters
    ----------
    projector : FourierProjector
        Its padded volume is uploaded once (:func:`.cuda_projector.device_volume`).
    images_f : ndarray, shape (m, N, N//2+1), complex
    ctf : ndarray, shape (m, N, N//2+1) (or broadcastable), real
    inv_sigma2 : ndarray, shape (m, N//2+1) (or broadcastable)
    rotations : ndarray, shape (m, J, 3, 3)
        RELION matrices ``A``.
    shifts_px : ndarray, shape (m, S, 2)
        Origins in pixels (RELION rlnOriginX/Y; engine/scoring.py).
    r_max_px : float
        Cycles per box, <= N//2.
    rotation_shifts_px : ndarray, shape (m, J, 2), optional
        Extra origin per rotation (fulcrum term).

    Returns
    -------
    ndarray, shape (m, J, S), float64
        Computed in float32 (relative agreement with the engine ~1e-5).
    """
    images_f, ctf, inv_sigma2, rotations, shifts_px, rs = _check(
        images_f, ctf, inv_sigma2, rotations, shifts_px, r_max_px, rotation_shifts_px
    )
    m, n = images_f.shape[:2]
    n_rot, n_shift = rotations.shape[1], shifts_px.shape[1]
    vol = device_volume(projector)
    npix = half_plane_pixels(n, float(r_max_px))[0].size
    out = np.empty((m, n_rot, n_shift), dtype=np.float64)
    batch = batch_size_for(
        bytes_per_particle(npix, n_rot, n_shift), fixed_bytes=vol.nbytes, cap=65535
    )
    for start in range(0, m, batch):
        sl = slice(start, min(start + batch, m))
        launch = _ScoreLaunch(
            projector, images_f[sl], ctf[sl], inv_sigma2[sl], rotations[sl], shifts_px[sl],
            None if rs is None else rs[sl], float(r_max_px),
        )  # fmt: skip
        launch.phase_table()
        out[sl] = launch.scores().get()
    return out


def variant_for(n_shift: int) -> str:
    """The scoring kernel variant of ``VARIANTS`` the host uses for S shifts.

    ``s32`` for S <= 32, else ``s64``; with ``$LOCALREFINE_SCORE_SAMPLER=cells``
    ``s64_cells`` for every S (no 32-shift tile reads cells); with
    ``$LOCALREFINE_SCORE_WIDE=1`` the ``_wide`` twins (volume only), with
    ``$LOCALREFINE_SCORE_LANES=rotations`` the ``_rl`` twins;
    ``$LOCALREFINE_SCORE_VARIANT``, when set, for every S.
    """
    forced = os.environ.get(VARIANT_ENV)
    if forced:
        if forced not in VARIANTS:
            raise ValueError(
                f"${VARIANT_ENV} must be one of {', '.join(VARIANTS)}; got {forced!r}"
            )
        return forced
    sampler = os.environ.get(SAMPLER_ENV, "volume")
    if sampler not in ("volume", "cells"):
        raise ValueError(f"${SAMPLER_ENV} must be 'volume' or 'cells'; got {sampler!r}")
    lanes = os.environ.get(LANES_ENV, "pixels")
    if lanes not in ("pixels", "rotations"):
        raise ValueError(f"${LANES_ENV} must be 'pixels' or 'rotations'; got {lanes!r}")
    wide = os.environ.get(WIDE_ENV, "0")
    if wide not in ("0", "1"):
        raise ValueError(f"${WIDE_ENV} must be 0 or 1; got {wide!r}")
    if sampler == "cells":
        if wide == "1":
            raise ValueError(
                f"${WIDE_ENV}=1 has no variant reading the cells "
                f"(${SAMPLER_ENV}=cells); use one or the other"
            )
        variant = "s64_cells"
    else:
        variant = "s64" if n_shift > 32 else "s32"
    return (
        variant
        + ("_wide" if wide == "1" else "")
        + ("_rl" if lanes == "rotations" else "")
    )


def bytes_per_particle(npix: int, n_rot: int, n_shift: int) -> int:
    """Device bytes of one particle in a scoring launch (phase tables, weights,
    rotations with their origins, scores), for sizing batches."""
    return 8 * npix * (1 + n_shift) + 4 * npix + 4 * n_rot * (11 + n_shift)


def launch_phase_table(y_g, sh_g, kx_g, ky_g, *, b, n_shift, npix, n, z_g) -> None:
    """Kernel ``phase_table``: the Z tables (b, S, P) of ``b`` particles' shifts."""
    load_kernels("scoring.cu").get_function("phase_table")(
        y_g, sh_g, np.int32(b), np.int32(n_shift), kx_g, ky_g, np.int32(npix),
        np.int32(n), np.float32(ORIGIN_PHASE_SIGN), z_g,
        block=(128, 1, 1), grid=((npix + 127) // 128, n_shift, b),
    )  # fmt: skip


def launch_score_tiles(
    variant, projector, rot_g, rs_g, kx_g, ky_g, w1_g, z_g, out_g,
    *, b, n_rot, n_shift, npix, n, r_max_px,
) -> None:  # fmt: skip
    """Kernel ``VARIANTS[variant]``: the scores (b, J, S) into ``out_g``.

    ``rs_g``: the per-rotation origins (b, J, 2), or None. ``r_max_px``: the
    largest pixel radius of ``kx_g, ky_g`` (cycles per box; the cells variants
    read cells covering it, :func:`.cuda_projector.cells_radius`). The volume
    or its cells are the projector's cached device copies.
    """
    kernel, rot_tile, shift_tile, cells = VARIANTS[variant]
    if cells:
        rc = cells_radius(projector, r_max_px)
        head = (device_cells(projector, rc), np.int32(projector.c), np.int32(rc))
    else:
        head = (device_volume(projector), np.int32(projector.c))
    load_kernels("scoring.cu").get_function(kernel)(
        *head, np.float32(projector.padding),
        rot_g, np.intp(0) if rs_g is None else rs_g, np.int32(n),
        np.float32(ORIGIN_PHASE_SIGN), np.int32(b), np.int32(n_rot),
        kx_g, ky_g, w1_g, z_g, np.int32(n_shift), np.int32(npix), out_g,
        block=(16, 16, 1),
        grid=(-(-n_rot // rot_tile), -(-n_shift // shift_tile), b),
    )  # fmt: skip


class _ScoreLaunch:
    """Device buffers of one batch and the two kernel launches (also used by the benchmark).

    Arguments as :func:`_score_cuda` after ``_check`` (one batch of ``b`` particles).
    """

    def __init__(
        self,
        projector,
        images_f,
        ctf,
        inv_sigma2,
        rotations,
        shifts_px,
        rs,
        r_max_px,
        variant: str | None = None,
    ):

        b, n = images_f.shape[:2]
        self.b, self.n = b, n
        self.n_rot, self.n_shift = rotations.shape[1], shifts_px.shape[1]
        self.variant = variant_for(self.n_shift) if variant is None else variant
        self.projector = projector
        self.r_max_px = float(r_max_px)
        flat, mult, shell, self.kx_g, self.ky_g, _ = _pixels(n, r_max_px)
        self.npix = flat.size
        w1, y = fold_weights(images_f, ctf, inv_sigma2, flat, mult, shell)
        self.y_g = to_device(y, np.complex64)
        self.w1_g = to_device(w1, np.float32)
        self.sh_g = to_device(shifts_px, np.float32)
        self.z_g = empty((b, self.n_shift, self.npix), np.complex64)
        self.rot_g = to_device(rotations.reshape(b, self.n_rot, 9), np.float32)
        self.rs_g = None if rs is None else to_device(rs, np.float32)
        self.out_g = empty((b, self.n_rot, self.n_shift), np.float32)

    def phase_table(self) -> None:
        """Kernel ``phase_table``: the Z tables of all shifts (b, S, P)."""
        launch_phase_table(
            self.y_g, self.sh_g, self.kx_g, self.ky_g, b=self.b, n_shift=self.n_shift,
            npix=self.npix, n=self.n, z_g=self.z_g,
        )  # fmt: skip

    def scores(self):
        """Kernel ``score_tiles`` (or a variant); returns the (b, J, S) float32 GPUArray."""
        launch_score_tiles(
            self.variant, self.projector, self.rot_g, self.rs_g, self.kx_g,
            self.ky_g, self.w1_g, self.z_g, self.out_g, b=self.b, n_rot=self.n_rot,
            n_shift=self.n_shift, npix=self.npix, n=self.n, r_max_px=self.r_max_px,
        )  # fmt: skip
        return self.out_g


def score_poses(
    projector,
    images_f: np.ndarray,
    ctf: np.ndarray,
    inv_sigma2: np.ndarray,
    rotations: np.ndarray,
    shifts_px: np.ndarray,
    *,
    r_max_px: float,
    rotation_shifts_px: np.ndarray | None = None,
    device: str = "auto",
) -> np.ndarray:
    """:func:`.engine.scoring.score_poses` on ``device`` (``auto | cpu | cuda``).

    Logs (debug) which path ran. Arguments and result as the engine's.
    """
    args = (projector, images_f, ctf, inv_sigma2, rotations, shifts_px)
    kw = {"r_max_px": r_max_px, "rotation_shifts_px": rotation_shifts_px}
    if select_device(device) == "cuda":
        log.debug("score_poses: CUDA path, rotations %s", np.shape(rotations))
        return _score_cuda(*args, **kw)
    log.debug("score_poses: CPU path, rotations %s", np.shape(rotations))
    return _score_host(*args, **kw)


def get_score_fn():
    """The GPU ``score_fn`` for :func:`.engine.search.local_search`.

    A :class:`.cuda_search_ops.CudaScoreFn`: called, it is :func:`_score_cuda`;
    the search binds each batch to the device with its ``bind_batch``.

    Raises ``ImportError`` (no PyCUDA) or ``RuntimeError`` (no usable GPU),
    as ``engine/refine_device.py`` expects.
    """
    from .backend import cuda_available, ensure_context

    try:
        import pycuda.driver  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"PyCUDA is not installed ({exc}); pip install .[gpu]"
        ) from None
    ok, reason = cuda_available()
    if not ok:
        raise RuntimeError(reason)
    ensure_context()
    load_kernels("scoring.cu")
    from .cuda_search_ops import CudaScoreFn

    return _SCORE_FN.setdefault("fn", CudaScoreFn())


_SCORE_FN: dict = {}  # the one CudaScoreFn of the process


def get_power_fn():
    """The GPU ``power_fn`` of :func:`.engine.search.local_search` (the bound's power).

    Same checks and errors as :func:`get_score_fn`: ``get_score_fn().power``
    (``_power_cuda``; a bound batch computes it from its own weights).
    """
    return get_score_fn().power


def _power_host(projector, ctf, inv_sigma2, rotations, *, r_max_px):
    """The NumPy engine (:func:`.engine.scoring.weighted_projection_power`)."""
    return _engine_power(projector, ctf, inv_sigma2, rotations, r_max_px=r_max_px)


def _power_cuda(projector, ctf, inv_sigma2, rotations, *, r_max_px):
    """The bound's projection power with the slices interpolated on the GPU.

    Same arguments and result as :func:`.engine.scoring.weighted_projection_power`:
    ``power`` (m, P) float64 (``mult c^2 |P|^2 / sigma2`` per half-plane pixel)
    and ``radius`` (P,). Kernel ``project_slices`` samples the P pixels of each
    rotation; the weighting is a cheap host product.
    """

    ctf = np.asarray(ctf)
    m, n = ctf.shape[0], ctf.shape[1]
    inv_sigma2 = np.broadcast_to(
        np.asarray(inv_sigma2, dtype=np.float64), (m, n // 2 + 1)
    )
    flat, mult, shell, kx_g, ky_g, dest_g = _pixels(n, float(r_max_px))
    npix = flat.size
    kernel = load_kernels("projector.cu").get_function("project_slices")
    rot_g = to_device(np.asarray(rotations, dtype=np.float64).reshape(m, 9), np.float32)
    out_g = empty((m, npix), np.complex64)
    kernel(
        device_volume(projector), np.int32(projector.c), np.float32(projector.padding),
        rot_g, np.int32(m), kx_g, ky_g, dest_g, np.int32(npix), out_g, np.int32(npix),
        block=(128, 1, 1), grid=((npix + 127) // 128, m),
    )  # fmt: skip
    proj = out_g.get()
    c = ctf.reshape(m, -1)[:, flat].astype(np.float64)
    power = (proj.real.astype(np.float64) ** 2 + proj.imag.astype(np.float64) ** 2) * (
        c * c * mult * inv_sigma2[:, shell]
    )  # (m, P)
    _, kx, ky, _, _ = half_plane_pixels(n, float(r_max_px))
    return power, np.hypot(kx, ky)


def weighted_projection_power(
    projector, ctf, inv_sigma2, rotations, *, r_max_px, device: str = "auto"
):
    """:func:`.engine.scoring.weighted_projection_power` on ``device``; logs the path.

    A drop-in for the branch-and-bound's bound: ``local_search(power_fn=...)``,
    passed by ``--device cuda`` (:func:`get_power_fn`).
    """
    if select_device(device) == "cuda":
        log.debug("weighted_projection_power: CUDA path")
        return _power_cuda(projector, ctf, inv_sigma2, rotations, r_max_px=r_max_px)
    log.debug("weighted_projection_power: CPU path")
    return _power_host(projector, ctf, inv_sigma2, rotations, r_max_px=r_max_px)
