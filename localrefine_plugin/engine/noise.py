"""Noise model: per-shell noise power sigma^2 per optics group.

Normalisation (matches :mod:`.fourier`'s unnormalised ``rfft2``)
---------------------------------------------------------------
``sigma2[g, k]`` is the expected power ``E |n(kx, ky)|^2`` of one half-plane
Fourier coefficient of the noise in shell ``k = rint(|(kx, ky)|)``, for images
of optics group ``g``. White real-space noise of variance ``s^2`` per pixel
gives ``sigma2 = N^2 s^2`` in every shell (every coefficient, including the
purely real ones on the ``kx = 0`` and ``kx = N/2`` columns, has
``E |n|^2 = N^2 s^2``), so ``sigma2`` is the plain mean of ``|X - CTF P|^2``
over the half-plane pixels of the shell, with no multiplicity weights.

With this normalisation the Gaussian negative log-likelihood of an image is
``0.5 * sum over the full plane of |X - CTF P|^2 / sigma2`` (up to a constant),
which is what :func:`.scoring.score_poses` computes.

Estimates
---------
* From residuals ``X - CTF * shift(P)`` at the current poses
  (``predictions_f`` given): the usual estimate once the reference is trusted.
* From the image power spectra alone (``predictions_f=None``): an upper
  estimate (signal plus noise) for the first iteration.

Shells beyond ``N // 2`` (the corners of the square) are not estimated.
Shells with no power (noiseless data, empty bands) are floored so that
``1 / sigma2`` stays finite (see :func:`estimate_sigma2`).
"""

from __future__ import annotations

import logging

import numpy as np

from .fourier import shell_index_2d

__all__ = [
    "Sigma2Accumulator",
    "estimate_sigma2",
    "inverse_sigma2_per_particle",
    "noise_subset",
]

log = logging.getLogger(__name__)


def _group_indices(
    optics_groups, m: int, n_groups: int | None
) -> tuple[np.ndarray, int]:
    if optics_groups is None:
        groups = np.zeros(m, dtype=np.int64)
    else:
        groups = np.asarray(optics_groups).reshape(-1)
        if groups.shape[0] != m:
            raise ValueError(
                f"optics_groups has {groups.shape[0]} entries for {m} images"
            )
        if not np.issubdtype(groups.dtype, np.integer):
            raise TypeError(
                f"optics_groups must be integers (0-based); got {groups.dtype}"
            )
        groups = groups.astype(np.int64)
        if m and groups.min() < 0:
            raise ValueError(
                f"optics_groups must be 0-based indices; got {groups.min()}"
            )
    needed = int(groups.max()) + 1 if m else 1
    if n_groups is None:
        n_groups = needed
    elif needed > n_groups:
        raise ValueError(f"optics group index {needed - 1} >= n_groups {n_groups}")
    return groups, int(n_groups)


class Sigma2Accumulator:
    """Streaming sums of residual power per optics group and shell.

    Parameters
    ----------
    n : int
        Box size (pixels).
    n_groups : int
        Number of optics groups (0-based indices).

    Attributes
    ----------
    sums : ndarray, shape (n_groups, N//2+1), float64
        Sum of ``|X - CTF P|^2`` over half-plane pixels of each shell.
    counts : ndarray, shape (n_groups, N//2+1), float64
        Number of pixels summed. Both can be summed across MPI ranks.
    image_sums : ndarray, shape (n_groups, N//2+1), float64
        Sum of ``|X|^2`` (used to floor empty shells).
    """

    def __init__(self, n: int, n_groups: int = 1) -> None:
        self.n = int(n)
        self.n_groups = int(n_groups)
        shells = self.n // 2 + 1
        self.sums = np.zeros((self.n_groups, shells))
        self.counts = np.zeros((self.n_groups, shells))
        self.image_sums = np.zeros((self.n_groups, shells))
        # every half-plane pixel's shell; pixels beyond N//2 go to a last,
        # dropped bin (so that whole images are summed, without a gather)
        self._shell = np.minimum(shell_index_2d(self.n).ravel(), shells)
        self._pixels_per_shell = np.bincount(self._shell, minlength=shells + 1)[:shells]

    def add(
        self,
        images_f: np.ndarray,
        *,
        predictions_f: np.ndarray | None = None,
        optics_groups: np.ndarray | None = None,
    ) -> None:
        """Accumulate a batch.

        Parameters
        ----------
        images_f : ndarray, shape (m, N, N//2+1), complex
            Particle images in the Fourier layout of :mod:`.fourier`.
        predictions_f : ndarray, shape (m, N, N//2+1), optional
            ``CTF * shift(projection, +origin)`` at the current poses
            (:func:`.projector.forward_model`); None for image power spectra.
        optics_groups : ndarray of int, shape (m,), optional
            0-based optics group of each image (default all 0).
        """
        images_f = np.asarray(images_f)
        if images_f.ndim != 3 or images_f.shape[1:] != (self.n, self.n // 2 + 1):
            raise ValueError(
                f"images_f must have shape (m, {self.n}, {self.n // 2 + 1}); "
                f"got {images_f.shape}"
            )
        m = images_f.shape[0]
        groups, _ = _group_indices(optics_groups, m, self.n_groups)
        x = images_f.reshape(m, -1)
        image_power = x.real**2 + x.imag**2  # (m, pixels), the images' precision
        if predictions_f is None:
            power = image_power
        else:
            predictions_f = np.asarray(predictions_f)
            if predictions_f.shape != images_f.shape:
                raise ValueError(
                    f"predictions_f shape {predictions_f.shape} != images_f shape "
                    f"{images_f.shape}"
                )
            r = x - predictions_f.reshape(m, -1)
            power = r.real**2 + r.imag**2
        shells = self.n // 2 + 1
        present = np.unique(groups)
        for g in present:
            rows = slice(None) if present.size == 1 else groups == g  # no copy
            # sum over the group's images first (in float64), then bin by shell once
            for total, pw in ((self.sums, power), (self.image_sums, image_power)):
                per_pixel = pw[rows].sum(axis=0, dtype=np.float64)
                total[g] += np.bincount(self._shell, per_pixel, shells + 1)[:shells]
            self.counts[g] += np.count_nonzero(groups == g) * self._pixels_per_shell

    def add_accumulator(self, other: Sigma2Accumulator) -> None:
        """Add another accumulator's sums (e.g. from another MPI rank)."""
        if (other.n, other.n_groups) != (self.n, self.n_groups):
            raise ValueError("accumulators differ in box size or number of groups")
        self.sums += other.sums
        self.counts += other.counts
        self.image_sums += other.image_sums

    def sigma2(self, *, floor_fraction: float = 1e-6) -> np.ndarray:
        """Per-shell noise power, shape (n_groups, N//2+1), float64.

        Shells whose residual power is below ``floor_fraction`` times the image
        power of the shell are raised to it; shells still zero (no data, or
        images that are zero there) take the smallest positive value of the
        group (1.0 when the group has none).
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            sigma2 = np.where(self.counts > 0, self.sums / self.counts, 0.0)
            image = np.where(self.counts > 0, self.image_sums / self.counts, 0.0)
        sigma2 = np.maximum(sigma2, floor_fraction * image)
        for g in range(self.n_groups):
            row = sigma2[g]
            positive = row[row > 0]
            fill = positive.min() if positive.size else 1.0
            empty = row <= 0
            if empty.any():
                log.debug(
                    "sigma2: group %d: %d empty shells set to %g", g, empty.sum(), fill
                )
            row[empty] = fill
        return sigma2


def estimate_sigma2(
    images_f: np.ndarray,
    *,
    predictions_f: np.ndarray | None = None,
    optics_groups: np.ndarray | None = None,
    n_groups: int | None = None,
    floor_fraction: float = 1e-6,
) -> np.ndarray:
    """Per-shell noise power sigma^2 per optics group, from one batch of images.

    Parameters
    ----------
    images_f : ndarray, shape (m, N, N//2+1), complex
        Particle images in the Fourier layout of :mod:`.fourier` (unnormalised).
    predictions_f : ndarray, shape (m, N, N//2+1), optional
        ``CTF * shift(projection, +origin)`` at the current poses; the estimate is
        the mean residual power ``|X - prediction|^2`` per shell. None: the mean
        image power per shell (signal plus noise; initial estimate).
    optics_groups : ndarray of int, shape (m,), optional
        0-based optics group of each image (default all 0).
    n_groups : int, optional
        Number of groups (default ``max(optics_groups) + 1``).
    floor_fraction : float
        See :meth:`Sigma2Accumulator.sigma2`.

    Returns
    -------
    ndarray, shape (n_groups, N//2+1), float64
        ``E |n(k)|^2`` per half-plane coefficient of shell ``k`` (module
        docstring): white noise of variance ``s^2`` per pixel gives ``N^2 s^2``.
    """
    images_f = np.asarray(images_f)
    if images_f.ndim != 3:
        raise ValueError(
            f"images_f must have shape (m, N, N//2+1); got {images_f.shape}"
        )
    groups, n_groups = _group_indices(optics_groups, images_f.shape[0], n_groups)
    acc = Sigma2Accumulator(images_f.shape[1], n_groups)
    acc.add(images_f, predictions_f=predictions_f, optics_groups=groups)
    return acc.sigma2(floor_fraction=floor_fraction)


def inverse_sigma2_per_particle(
    sigma2: np.ndarray, optics_groups: np.ndarray | None, m: int | None = None
) -> np.ndarray:
    """``1 / sigma2`` of each particle's optics group, shape (m, N//2+1), float64.

    Parameters
    ----------
    sigma2 : ndarray, shape (n_groups, N//2+1)
        From :func:`estimate_sigma2`.
    optics_groups : ndarray of int, shape (m,), or None
        0-based groups; None means group 0 for ``m`` particles.
    """
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    if optics_groups is None:
        if m is None:
            raise ValueError("give optics_groups or m")
        optics_groups = np.zeros(m, dtype=np.int64)
    groups = np.asarray(optics_groups, dtype=np.int64).reshape(-1)
    if groups.size and (groups.min() < 0 or groups.max() >= sigma2.shape[0]):
        raise ValueError(
            f"optics group indices must be in 0..{sigma2.shape[0] - 1}; "
            f"got {groups.min()}..{groups.max()}"
        )
    return 1.0 / sigma2[groups]


def noise_subset(optics_rows: np.ndarray, cap: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of the particles whose residuals estimate sigma^2.

    sigma^2 has ``N//2 + 1`` values per optics group, each a mean over every
    pixel of its shell in every image: tens of thousands of images fix it to
    a fraction of a percent, so a large set need not be read for it.

    Parameters
    ----------
    optics_rows : ndarray of int, shape (n,)
        Optics group row of each particle (0-based).
    cap : int
        Most particles per optics group; a group with at most ``cap`` keeps
        all of its particles, a larger one ``cap`` drawn without replacement.
        ``0`` keeps every particle.
    seed : int
        Seed of the draw (the same subset in every iteration and on every rank).
    """
    rows = np.asarray(optics_rows).reshape(-1)
    if cap < 0:
        raise ValueError(f"cap must be >= 0; got {cap}")
    if cap == 0:
        return np.arange(rows.size)
    rng = np.random.default_rng(seed)
    keep = []
    for g in np.unique(rows):
        members = np.flatnonzero(rows == g)
        if members.size > cap:
            members = rng.choice(members, size=cap, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
