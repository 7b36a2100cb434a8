"""Soft masks: creation from a map, centre of mass, and checks before any work.

A mask is a float32 map ``(N, N, N)`` ``[z, y, x]`` with values in [0, 1]
(1 = region of interest), on the grid of the reference map, with a raised-cosine
soft edge. Distances are Euclidean, from voxel centre to voxel centre.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage

from .errors import InputError
from .filters import lowpass, raised_cosine_falloff

__all__ = [
    "DEFAULT_THRESHOLD_FRACTION",
    "DEFAULT_THRESHOLD_SIGMAS",
    "OUTSIDE_DENSITY_FRACTION",
    "default_threshold",
    "create_soft_mask",
    "center_of_mass_px",
    "check_mask",
]

log = logging.getLogger(__name__)

#: Default threshold: this fraction of the map's peak above the solvent level ...
DEFAULT_THRESHOLD_FRACTION = 0.1
#: ... but at least this many solvent standard deviations above the solvent level.
DEFAULT_THRESHOLD_SIGMAS = 5.0
#: check_mask: a mask holding less than this fraction of the reference's strong
#: density lies outside it.
OUTSIDE_DENSITY_FRACTION = 2e-3
#: check_mask judges the reference's density on the map low-passed to this
#: resolution (Angstrom; ``localrefine mask``'s default low-pass), so that noise
#: spikes of an unfiltered reconstruction are not taken for density.
DENSITY_CHECK_LOWPASS_A = 15.0


def default_threshold(volume: np.ndarray) -> float:
    """The binarisation threshold used when the user gives none.

    The solvent is estimated from the voxels outside the sphere of radius
    ``N / 2`` about the centre (the box corners, ~48 % of a cube): mean
    ``m`` and standard deviation ``s``. The threshold is
    ``m + max(5 s, 0.1 (max - m))``: a tenth of the way from the solvent to the
    map's peak, and never within 5 sigma of the solvent noise. Apply it to a
    low-passed map (``localrefine mask`` low-passes to 15 Angstrom by default)
    so that the peak and the noise are those of the envelope, not of single
    voxels.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N)
        Map ``[z, y, x]`` centred at ``N // 2``.

    Returns
    -------
    float
        Density threshold, in the map's units.
    """
    volume = np.asarray(volume)
    n = volume.shape[0]
    c = (np.arange(n, dtype=np.int32) - n // 2) ** 2
    corners = (c[:, None, None] + c[None, :, None] + c[None, None, :]) > (n / 2) ** 2
    solvent = volume[corners]
    m = float(solvent.mean(dtype=np.float64))
    s = float(solvent.std(dtype=np.float64))
    return m + max(
        DEFAULT_THRESHOLD_SIGMAS * s,
        DEFAULT_THRESHOLD_FRACTION * (float(volume.max()) - m),
    )


def create_soft_mask(
    volume: np.ndarray,
    pixel_size_a: float,
    *,
    threshold: float | None = None,
    lowpass_a: float | None = None,
    extend_a: float = 0.0,
    soft_edge_a: float = 6.0,
) -> np.ndarray:
    """A soft mask around the density of a map.

    Steps (as ``relion_mask_create --lowpass --ini_threshold --extend_inimask
    --width_soft_edge``, with lengths in Angstrom): optional low-pass; binarise
    at ``threshold`` (voxels ``>= threshold`` are inside); grow the binary
    region by ``extend_a`` (voxels within that Euclidean distance of it);
    then a raised-cosine edge: a voxel at distance ``d`` from the grown region
    gets ``0.5 + 0.5 cos(pi d / soft_edge)`` for ``d < soft_edge``, else 0.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N), float32 or float64
        Map ``[z, y, x]``.
    pixel_size_a : float
        Pixel size in Angstrom.
    threshold : float, optional
        Density threshold (after low-pass); default :func:`default_threshold`.
    lowpass_a : float, optional
        Low-pass the map to this resolution (Angstrom) before thresholding.
    extend_a : float
        Growth of the binary region in Angstrom (>= 0).
    soft_edge_a : float
        Width of the raised-cosine edge in Angstrom (>= 0; 0 gives a binary
        mask).

    Returns
    -------
    ndarray, shape (N, N, N), float32, values in [0, 1]

    Notes
    -----
    Equals ``relion_mask_create`` (3.1) to 1e-5 (tested) except in two details:
    RELION grows the region to distances ``< extend`` (here ``<=``, so an
    extension of 3 px reaches 3 px along the axes), and RELION rounds the
    low-pass cut-off to a whole Fourier shell (here it is not rounded).

    Raises
    ------
    ValueError
        For negative lengths, or a threshold above the map's maximum (empty
        mask).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a map (N, N, N), got shape {volume.shape}")
    if not pixel_size_a > 0:
        raise ValueError(f"pixel size {pixel_size_a} A must be positive")
    if extend_a < 0 or soft_edge_a < 0:
        raise ValueError(
            f"extend {extend_a} A and soft edge {soft_edge_a} A must be >= 0"
        )
    work = volume.astype(np.float64, copy=False)
    if lowpass_a is not None:
        work = lowpass(work, pixel_size_a, lowpass_a)
    if threshold is None:
        threshold = default_threshold(work)
        log.info("mask threshold (default rule) %.4g", threshold)
    inside = work >= threshold
    if not inside.any():
        raise ValueError(
            f"threshold {threshold:.4g} is above the map's maximum "
            f"{work.max():.4g}: the mask would be empty"
        )
    extend_px = extend_a / pixel_size_a
    edge_px = soft_edge_a / pixel_size_a
    # distances matter only up to extend + edge: work in the bounding box of the
    # region grown by that margin (Euclidean distance transforms are costly)
    box = _grown_bounding_box(inside, int(np.ceil(extend_px + edge_px)) + 1)
    region = inside[box]
    if extend_px > 0:
        region = ndimage.distance_transform_edt(~region) <= extend_px
    if edge_px > 0:
        dist = ndimage.distance_transform_edt(~region)  # px to the region, 0 inside
        soft = raised_cosine_falloff(dist, edge_px)
    else:
        soft = region.astype(np.float64)
    mask = np.zeros(volume.shape, dtype=np.float32)
    mask[box] = soft
    return mask


def _grown_bounding_box(inside: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of ``inside`` grown by ``margin`` voxels, clipped.

    Where the grown box is clipped by the array's border, the distance
    transform inside it still sees every voxel that matters: voxels past the
    border do not exist.
    """
    slices = []
    for axis in range(inside.ndim):
        other = tuple(a for a in range(inside.ndim) if a != axis)
        occupied = np.nonzero(inside.any(axis=other))[0]
        lo = max(int(occupied[0]) - margin, 0)
        hi = min(int(occupied[-1]) + margin + 1, inside.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)


def center_of_mass_px(mask: np.ndarray) -> np.ndarray:
    """Centre of mass of a mask in pixels, relative to the box centre.

    Parameters
    ----------
    mask : ndarray, shape (Nz, Ny, Nx)
        Non-negative weights ``[z, y, x]``.

    Returns
    -------
    ndarray, shape (3,), float64
        ``(x, y, z)`` in pixels relative to the centre ``N // 2`` of each axis.
    """
    mask = np.asarray(mask, dtype=np.float64)
    total = mask.sum()
    if not total > 0:
        raise ValueError("the mask is empty: no centre of mass")
    com = []
    for axis in (2, 1, 0):  # x, y, z
        n = mask.shape[axis]
        other = tuple(a for a in range(3) if a != axis)
        profile = mask.sum(axis=other)  # (n,)
        com.append(float(profile @ (np.arange(n) - n // 2)) / total)
    return np.array(com)


def check_mask(
    mask: np.ndarray,
    *,
    mask_path,
    mask_pixel_size_a: float,
    reference_shape: tuple[int, ...],
    reference_pixel_size_a: float,
    reference: np.ndarray | None = None,
) -> None:
    """Check a user's mask against the reference map before any work.

    Raises :class:`InputError` naming ``mask_path`` for: a box differing from
    the reference's, a pixel size differing by more than 0.1 %, non-finite
    values, values outside [0, 1] (beyond 1e-3 rounding), an empty mask
    (maximum <= 0 or total weight below one voxel), and, if ``reference`` is
    given, a mask that lies outside the reference's density. Logs a WARNING for
    a binary mask (hard edge).

    The "outside the density" test: the reference's strong density is the
    voxels of the reference low-passed to :data:`DENSITY_CHECK_LOWPASS_A` (or
    Nyquist, if coarser) at or above :func:`default_threshold` (at least 5
    solvent standard deviations, and a tenth of the way from the solvent to
    the peak); a noise-dominated reference then has none and passes. The mask
    must hold (mask-weighted) at least :data:`OUTSIDE_DENSITY_FRACTION` of
    them. A mask on solvent holds none; a loose mask around a small region of
    a large complex still holds that region's.

    Parameters
    ----------
    mask : ndarray
        The mask as read from ``mask_path``.
    mask_path : str or Path
        File the mask came from (for the messages).
    mask_pixel_size_a, reference_pixel_size_a : float
        Pixel sizes in Angstrom.
    reference_shape : tuple of int
        Shape ``(N, N, N)`` of the reference map.
    reference : ndarray, optional
        The reference map, for the density test.
    """
    mask = np.asarray(mask)
    if tuple(mask.shape) != tuple(reference_shape):
        raise InputError(
            mask_path,
            f"mask box {mask.shape} differs from the reference map's "
            f"{tuple(reference_shape)}",
            "make the mask on the reference map's grid (localrefine mask --map "
            "REFERENCE) or resample it",
        )
    if not math.isclose(mask_pixel_size_a, reference_pixel_size_a, rel_tol=1e-3):
        raise InputError(
            mask_path,
            f"mask pixel size {mask_pixel_size_a:.4f} A differs from the "
            f"reference map's {reference_pixel_size_a:.4f} A",
            "make the mask from the reference map, or fix the pixel size in the "
            "mask's header if it is only mislabelled",
        )
    if not np.isfinite(mask).all():
        raise InputError(
            mask_path, "mask contains NaN or infinite values", "recreate the mask"
        )
    lo, hi = float(mask.min()), float(mask.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise InputError(
            mask_path,
            f"mask values span [{lo:.4g}, {hi:.4g}], outside [0, 1]",
            "use a mask with 1 = region and 0 = solvent (localrefine mask makes one)",
        )
    total = float(mask.sum(dtype=np.float64))
    if hi <= 0 or total < 1.0:
        raise InputError(
            mask_path,
            f"mask is empty (maximum {hi:.4g}, total weight {total:.4g} voxels)",
            "lower the threshold used to make it, or pick the right file",
        )
    if reference is not None:
        smooth = lowpass(
            np.asarray(reference, dtype=np.float32),
            reference_pixel_size_a,
            max(DENSITY_CHECK_LOWPASS_A, 2 * reference_pixel_size_a),
        )
        strong = smooth >= default_threshold(smooth)
        n_strong = int(np.count_nonzero(strong))
        captured = float(mask[strong].sum(dtype=np.float64))
        if n_strong and captured < OUTSIDE_DENSITY_FRACTION * n_strong:
            raise InputError(
                mask_path,
                "mask lies outside the reference's density: it holds "
                f"{captured:.1f} of the reference's {n_strong} voxels of strong "
                "density (above its default mask threshold)",
                "check that the mask belongs to this reference (same box origin "
                "and hand) and covers the region to refine",
            )
    intermediate = np.count_nonzero((mask > 1e-3) & (mask < 1.0 - 1e-3))
    if intermediate == 0:
        log.warning(
            "%s: the mask is binary (hard edge), which causes artefacts in "
            "refinement and FSC; soften it, e.g. localrefine mask --soft-edge 6",
            mask_path,
        )
