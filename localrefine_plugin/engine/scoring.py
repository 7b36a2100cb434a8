"""Pose scores: Gaussian negative log-likelihood of particle images.

For one particle with image ``X`` (Fourier layout of :mod:`.fourier`), CTF
``c``, noise power ``sigma2`` per shell (:mod:`.noise`), a pose (rotation
``A``, origin ``o`` in pixels) predicts ``c(k) P_A(k) s_o(k)``. Origins follow
RELION, as :func:`.projector.forward_model` does (measured against
``relion_project``): the content is moved by ``-o``, so
``s_o(k) = exp(+2 pi i k.o / N)``. The score is::

    E(A, o) = 0.5 * sum_{|k| <= r_max} w_k (|c P_A s_o - X|^2 - |X|^2) / sigma2_k

over the half-plane pixels, with Hermitian multiplicity ``w_k`` (1 on the
columns ``kx = 0`` and, for even ``N``, ``kx = N/2``, whose conjugate mates are
in the half-plane too; 2 elsewhere): it equals half the full-plane sum, i.e.
the negative log-likelihood difference under independent complex Gaussian
noise (lower is better). The pose-independent ``|X|^2`` term is dropped::

    E = 0.5 sum w c^2 |P|^2 / sigma2  -  sum Re(P conj(G_o)),
    G_o(k) = w c X / sigma2 * exp(-2 pi i k.o / N)

so that the cross term of all (rotation, shift) pairs of a particle is one real
matrix product ``[Re P, Im P] @ [Re G, Im G].T`` (rotations x pixels times
pixels x shifts). The GPU kernels use the same layout.

Fulcrum: a rotation about a point other than the box centre adds a shift that
depends on the rotation (``geometry.fulcrum_shift``). ``rotation_shifts_px``
(m, J, 2) carries it: pair (j, s) is evaluated at origin
``shifts_px[s] + rotation_shifts_px[j]`` (the projection of rotation ``j`` is
multiplied by its own phase ``exp(+2 pi i k.r_j / N)`` before the matrix
product).
"""

from __future__ import annotations

import functools

import numpy as np

from .fourier import frequency_grid_2d, shift_phases_2d

__all__ = ["score_poses", "half_plane_pixels", "weighted_projection_power"]

#: rows of (rotation x pixel) values projected at once (bounds memory).
_CHUNK_ELEMENTS = 1 << 20


@functools.lru_cache(maxsize=64)
def half_plane_pixels(n: int, r_max_px: float):
    """Half-plane pixels with ``|k| <= r_max_px``.

    Returns
    -------
    flat : ndarray (P,), int64
        Flat indices into an (N, N//2+1) array.
    kx, ky : ndarray (P,), float64
        Frequencies (cycles per box).
    multiplicity : ndarray (P,), float64
        1 on the ``kx = 0`` column (and ``kx = N/2`` for even N), else 2.
    shell : ndarray (P,), int64
        ``rint(|k|)``.

    The arrays are read-only (cached).
    """
    kx, ky = frequency_grid_2d(n)
    kx, ky = kx.ravel(), ky.ravel()
    flat = np.flatnonzero(kx * kx + ky * ky <= float(r_max_px) ** 2)
    kx, ky = kx[flat], ky[flat]
    self_mate = (kx == 0) | ((n % 2 == 0) & (kx == n // 2))
    mult = np.where(self_mate, 1.0, 2.0)
    shell = np.rint(np.hypot(kx, ky)).astype(np.int64)
    out = (flat, kx, ky, mult, shell)
    for a in out:
        a.flags.writeable = False
    return out


def _check_common(images_f, ctf, inv_sigma2, r_max_px):
    images_f = np.asarray(images_f)
    if images_f.ndim != 3 or images_f.shape[2] != images_f.shape[1] // 2 + 1:
        raise ValueError(
            f"images_f must have shape (m, N, N//2+1); got {images_f.shape}"
        )
    m, n = images_f.shape[0], images_f.shape[1]
    ctf = np.broadcast_to(np.asarray(ctf), images_f.shape)
    inv_sigma2 = np.asarray(inv_sigma2, dtype=np.float64)
    inv_sigma2 = np.broadcast_to(inv_sigma2, (m, inv_sigma2.shape[-1]))
    if inv_sigma2.shape[-1] != n // 2 + 1:
        raise ValueError(
            f"inv_sigma2 must have N//2+1 = {n // 2 + 1} shells; got {inv_sigma2.shape}"
        )
    if not 0 < r_max_px <= n // 2:
        raise ValueError(f"r_max_px must be in (0, N//2 = {n // 2}]; got {r_max_px}")
    return images_f, ctf, inv_sigma2, m, n


def _project(projector, rotations: np.ndarray, kx, ky) -> np.ndarray:
    """Projections (rows, P) complex128 at the pixels, in chunks of rows."""
    rows = rotations.shape[0]
    # the projector's precision (complex64 for a float32 map): no upcast
    dtype = np.result_type(getattr(projector, "dtype", np.complex128), np.complex64)
    out = np.empty((rows, kx.size), dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // max(kx.size, 1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        out[start:stop] = projector.project_pixels(rotations[start:stop], kx, ky)
    return out


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
) -> np.ndarray:
    """Negative log-likelihood differences of all (rotation, shift) pairs.

    Parameters
    ----------
    projector : FourierProjector
        The reference (:class:`.projector.FourierProjector`); only its
        ``project_pixels(rotations, kx, ky)`` is used.
    images_f : ndarray, shape (m, N, N//2+1), complex
        Particle images, Fourier layout of :mod:`.fourier` (unnormalised).
    ctf : ndarray, shape (m, N, N//2+1) (or broadcastable), real
        CTF of each particle (:func:`.ctf.ctf_2d`).
    inv_sigma2 : ndarray, shape (m, N//2+1) (or broadcastable)
        ``1 / sigma2`` per shell (:mod:`.noise`).
    rotations : ndarray, shape (m, J, 3, 3)
        Candidate RELION matrices ``A`` per particle.
    shifts_px : ndarray, shape (m, S, 2)
        Candidate origins ``(x, y)`` in pixels per particle: RELION's
        rlnOriginX/Y in pixels; the content is moved by ``-origin``, as in
        :func:`.projector.forward_model`.
    r_max_px : float
        Sum over pixels with ``|k| <= r_max_px`` (cycles per box, <= N//2).
    rotation_shifts_px : ndarray, shape (m, J, 2), optional
        Extra origin per rotation (fulcrum term): pair (j, s) is scored at
        origin ``shifts_px[s] + rotation_shifts_px[j]``.

    Returns
    -------
    ndarray, shape (m, J, S), float64
        ``0.5 sum_k w_k (|c P s - X|^2 - |X|^2) / sigma2_k`` with
        ``c P s = forward_model(projector, A, origins_px=o, ctf=c)`` (module
        docstring); lower is better.
    """
    images_f, ctf, inv_sigma2, m, n = _check_common(images_f, ctf, inv_sigma2, r_max_px)
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
    n_rot = rotations.shape[1]
    if rotation_shifts_px is not None:
        rotation_shifts_px = np.asarray(rotation_shifts_px, dtype=np.float64)
        if rotation_shifts_px.shape != (m, n_rot, 2):
            raise ValueError(
                f"rotation_shifts_px must have shape ({m}, {n_rot}, 2); "
                f"got {rotation_shifts_px.shape}"
            )
    pixels = half_plane_pixels(n, float(r_max_px))
    out = np.empty((m, n_rot, shifts_px.shape[1]))
    # particles per block: bounds the (particles x rotations x pixels) arrays
    step = max(1, _CHUNK_ELEMENTS // max(n_rot * pixels[0].size, 1))
    for start in range(0, m, step):
        sl = slice(start, min(start + step, m))
        out[sl] = _score_block(
            projector,
            images_f[sl],
            ctf[sl],
            inv_sigma2[sl],
            rotations[sl],
            shifts_px[sl],
            None if rotation_shifts_px is None else rotation_shifts_px[sl],
            pixels,
            n,
        )
    return out


def _score_block(
    projector, images_f, ctf, inv_sigma2, rotations, shifts_px, rs, pixels, n
):
    """:func:`score_poses` for a block of particles (arguments validated)."""
    m, n_rot = rotations.shape[:2]
    flat, kx, ky, mult, shell = pixels
    x = images_f.reshape(m, -1)[:, flat].astype(np.complex128)  # (m, P)
    c = ctf.reshape(m, -1)[:, flat].astype(np.float64)  # (m, P)
    w = mult[None, :] * inv_sigma2[:, shell]  # (m, P)
    a = w * c * c  # (m, P)
    d = w * c * x  # (m, P)

    proj = _project(projector, rotations.reshape(m * n_rot, 3, 3), kx, ky)
    proj = proj.reshape(m, n_rot, -1)  # (m, J, P), the projector's precision
    re = proj.real.astype(np.float64)
    im = proj.imag.astype(np.float64)
    if rs is not None:
        # fulcrum phase exp(i theta) as real cos/sin (cheaper than a complex exp),
        # float64 so that a pose scores the same with or without the fulcrum term
        theta = (2 * np.pi / n) * (rs[..., 0:1] * kx + rs[..., 1:2] * ky)  # (m, J, P)
        cos, sin = np.cos(theta), np.sin(theta)
        re, im = re * cos - im * sin, re * sin + im * cos
    power = re * re + im * im  # (m, J, P)
    sq = 0.5 * np.einsum("mjp,mp->mj", power, a)  # (m, J)

    phase = np.exp(
        (-2j * np.pi / n) * (shifts_px[..., 0:1] * kx + shifts_px[..., 1:2] * ky)
    )  # (m, S, P): moves the image content by +origin
    g = d[:, None, :] * phase  # (m, S, P)
    p_cat = np.concatenate([re, im], axis=-1)  # (m, J, 2P)
    g_cat = np.concatenate([g.real, g.imag], axis=-1)  # (m, S, 2P)
    cross = np.matmul(p_cat, g_cat.transpose(0, 2, 1))  # (m, J, S)
    return sq[:, :, None] - cross


def _score_poses_reference(
    projector,
    images_f,
    ctf,
    inv_sigma2,
    rotations,
    shifts_px,
    *,
    r_max_px,
    rotation_shifts_px=None,
) -> np.ndarray:
    """Brute-force :func:`score_poses` (loops, whole images, float64) for tests."""
    images_f, ctf, inv_sigma2, m, n = _check_common(images_f, ctf, inv_sigma2, r_max_px)
    rotations = np.asarray(rotations, dtype=np.float64)
    shifts_px = np.asarray(shifts_px, dtype=np.float64)
    kx, ky = frequency_grid_2d(n)
    inside = np.hypot(kx, ky) <= r_max_px
    mult = np.where((kx == 0) | ((n % 2 == 0) & (kx == n // 2)), 1.0, 2.0)
    shell = np.minimum(np.rint(np.hypot(kx, ky)).astype(np.int64), n // 2)
    out = np.empty((m, rotations.shape[1], shifts_px.shape[1]))
    for i in range(m):
        x = images_f[i].astype(np.complex128)
        weight = np.where(inside, mult * inv_sigma2[i][shell], 0.0)
        for j in range(rotations.shape[1]):
            pred = ctf[i].astype(np.float64) * projector.project(
                rotations[i, j]
            ).astype(np.complex128)
            if rotation_shifts_px is not None:
                pred = pred * shift_phases_2d(n, -rotation_shifts_px[i, j])
            for s in range(shifts_px.shape[1]):
                model = pred * shift_phases_2d(n, -shifts_px[i, s])
                diff = model - x
                out[i, j, s] = 0.5 * np.sum(
                    weight * (np.abs(diff) ** 2 - np.abs(x) ** 2)
                )
    return out


def weighted_projection_power(
    projector,
    ctf: np.ndarray,
    inv_sigma2: np.ndarray,
    rotations: np.ndarray,
    *,
    r_max_px: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``w c^2 |P|^2 / sigma2`` per half-plane pixel: the signal power the score sees.

    Parameters
    ----------
    ctf : ndarray, shape (m, N, N//2+1)
    inv_sigma2 : ndarray, shape (m, N//2+1)
    rotations : ndarray, shape (m, 3, 3)
        One pose per particle.
    r_max_px : float

    Returns
    -------
    power : ndarray, shape (m, P), float64
        Multiplicity-weighted, so ``power.sum(-1)`` is the full-plane sum
        ``H = sum c^2 |P|^2 / sigma2`` (the noise part of the score has variance
        ``H`` under the Gaussian model).
    radius : ndarray, shape (P,)
        ``|k|`` of the pixels (cycles per box).
    """
    ctf = np.asarray(ctf)
    m, n = ctf.shape[0], ctf.shape[1]
    inv_sigma2 = np.broadcast_to(
        np.asarray(inv_sigma2, dtype=np.float64), (m, n // 2 + 1)
    )
    flat, kx, ky, mult, shell = half_plane_pixels(n, float(r_max_px))
    proj = _project(
        projector, np.asarray(rotations, dtype=np.float64).reshape(m, 3, 3), kx, ky
    )
    c = ctf.reshape(m, -1)[:, flat].astype(np.float64)
    power = (proj.real**2 + proj.imag**2) * c * c * mult * inv_sigma2[:, shell]
    return power, np.hypot(kx, ky)
