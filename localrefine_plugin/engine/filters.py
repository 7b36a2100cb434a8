"""Fourier filters of maps: raised-cosine low-pass and phase randomisation.

Frequencies follow ``docs/conventions.md``: cycles per box, shell ``k`` has
resolution ``N * pixel_size / k`` Angstrom; maps are ``(N, N, N)`` ``[z, y, x]``
centred at ``N // 2``.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from .fourier import radius_grid_3d

__all__ = [
    "raised_cosine_falloff",
    "lowpass",
    "randomize_phases_beyond",
]


def raised_cosine_falloff(distance: np.ndarray, width: float) -> np.ndarray:
    """A raised-cosine edge: 1 up to distance 0, falling to 0 at ``width``.

    Parameters
    ----------
    distance : ndarray
        Distance past the edge's start (any unit; <= 0 means inside).
    width : float
        Width of the edge, same unit as ``distance``; ``width <= 0`` gives a
        hard step (1 for ``distance <= 0``, else 0).

    Returns
    -------
    ndarray, float64, same shape as ``distance``
        ``1`` for ``d <= 0``, ``0.5 + 0.5 cos(pi d / width)`` for
        ``0 < d < width``, ``0`` for ``d >= width``.
    """
    d = np.asarray(distance, dtype=np.float64)
    out = (d <= 0).astype(np.float64)
    if width > 0:
        band = (d > 0) & (d < width)
        out[band] = 0.5 + 0.5 * np.cos((np.pi / width) * d[band])
    return out


def _check_cube(volume: np.ndarray) -> int:
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"expected a cubic map (N, N, N), got shape {volume.shape}")
    return volume.shape[0]


def lowpass(
    volume: np.ndarray,
    pixel_size_a: float,
    resolution_a: float,
    *,
    edge_width_shells: float = 2.0,
) -> np.ndarray:
    """Low-pass filter a map with a raised-cosine edge in Fourier space.

    The filter is 1 below shell ``k0 - w/2`` and 0 above ``k0 + w/2``, with
    ``k0 = N * pixel_size_a / resolution_a`` (cycles per box) and a raised
    cosine of width ``w = edge_width_shells`` shells in between (as RELION's
    ``--filter_edge_width``).

    Parameters
    ----------
    volume : ndarray, shape (N, N, N), float32 or float64
        Map ``[z, y, x]`` centred at ``N // 2``.
    pixel_size_a : float
        Pixel size in Angstrom.
    resolution_a : float
        Cut-off resolution in Angstrom (> 0).
    edge_width_shells : float
        Width of the raised-cosine edge in Fourier shells.

    Returns
    -------
    ndarray, shape (N, N, N), same dtype as ``volume``
    """
    volume = np.asarray(volume)
    n = _check_cube(volume)
    if resolution_a <= 0 or pixel_size_a <= 0:
        raise ValueError(
            f"resolution {resolution_a} A and pixel size {pixel_size_a} A "
            "must be positive"
        )
    k0 = n * pixel_size_a / resolution_a
    weight = raised_cosine_falloff(
        radius_grid_3d(n) - (k0 - 0.5 * edge_width_shells), edge_width_shells
    )  # (N, N, N//2+1)
    # A real radial weight commutes with the centring phase factor: no ifftshift
    # needed; scipy keeps float32 -> complex64 (faster, half the memory).
    f = scipy.fft.rfftn(volume)  # (N, N, N//2+1), layout of fourier.volume_to_fourier
    f *= weight
    return scipy.fft.irfftn(f, s=volume.shape).astype(volume.dtype, copy=False)


def randomize_phases_beyond(
    volume: np.ndarray, shell: float, *, rng: np.random.Generator
) -> np.ndarray:
    """Replace the phases of all Fourier components with ``|k| >= shell`` by random ones.

    Amplitudes are kept; new phases are uniform in ``[0, 2 pi)``. Used for the
    phase-randomisation test of masked FSCs (Chen et al. 2013,
    Ultramicroscopy 135:24-35); like RELION, components at radius ``>= shell``
    (cycles per box) are randomised.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N), float32 or float64
        Map ``[z, y, x]`` centred at ``N // 2``.
    shell : float
        First randomised frequency radius, cycles per box.
    rng : numpy.random.Generator
        Source of the random phases (seed it for reproducible results).

    Returns
    -------
    ndarray, shape (N, N, N), same dtype as ``volume``
    """
    volume = np.asarray(volume)
    n = _check_cube(volume)
    # The map's centring only shifts every phase deterministically and the new
    # phases are uniform, so the transform is taken without ifftshift (scipy
    # keeps float32 -> complex64: faster, half the memory).
    f = scipy.fft.rfftn(volume)  # (N, N, N//2+1), layout of fourier.volume_to_fourier
    beyond = radius_grid_3d(n) >= shell  # (N, N, N//2+1)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=int(beyond.sum()))
    f[beyond] = np.abs(f[beyond]) * np.exp(1j * phases)
    return scipy.fft.irfftn(f, s=volume.shape).astype(volume.dtype, copy=False)
