"""Contrast transfer function, with RELION's parameters and sign convention.

RELION (``ctf.h``) computes, for a spatial frequency ``u`` (1/Angstrom) at angle
``alpha`` in the image plane::

    lambda  = 12.2643247 / sqrt(V * (1 + V * 0.978466e-6))     # Angstrom, V in volt
    dF      = -(dU + dV)/2 - (dU - dV)/2 * cos(2 (alpha - azimuth))
    chi     = pi * lambda * dF * u^2 + pi/2 * Cs * lambda^3 * u^4 - phase - atan(Q/sqrt(1-Q^2))
    ctf     = -sin(chi) * exp(-B u^2 / 4) * scale

with defocus ``dU``, ``dV`` (Angstrom, positive = underfocus), ``azimuth`` the
defocus angle, ``Cs`` in Angstrom (mm * 1e7) and amplitude contrast ``Q``.
The CTF is therefore positive at low frequency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fourier import frequency_grid_2d

__all__ = ["CtfParams", "electron_wavelength_a", "ctf_2d"]


@dataclass(frozen=True)
class CtfParams:
    """CTF parameters of one or many particles (arrays broadcast against each other).

    Attributes use RELION's meaning: ``defocus_u_a``/``defocus_v_a`` (Angstrom,
    positive underfocus), ``defocus_angle_deg``, ``voltage_kv``, ``cs_mm``,
    ``amplitude_contrast`` (fraction), ``phase_shift_deg``, ``bfactor_a2``
    (Angstrom^2) and ``scale``.
    """

    defocus_u_a: np.ndarray | float
    defocus_v_a: np.ndarray | float
    defocus_angle_deg: np.ndarray | float
    voltage_kv: np.ndarray | float = 300.0
    cs_mm: np.ndarray | float = 2.7
    amplitude_contrast: np.ndarray | float = 0.1
    phase_shift_deg: np.ndarray | float = 0.0
    bfactor_a2: np.ndarray | float = 0.0
    scale: np.ndarray | float = 1.0


def electron_wavelength_a(voltage_kv) -> np.ndarray:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


def ctf_2d(
    params: CtfParams, n: int, pixel_size_a: float, dtype=np.float32
) -> np.ndarray:
    """CTF on the half-plane Fourier grid (see :mod:`.fourier`).

    Parameters
    ----------
    params : CtfParams
        Each field a scalar or an array of shape ``(m,)``.
    n : int
        Box size in pixels.
    pixel_size_a : float
        Pixel size in Angstrom.

    Returns
    -------
    ndarray, shape (m, N, N//2+1) (or (N, N//2+1) for scalar parameters), ``dtype``.
    """
    fields = np.broadcast_arrays(
        *(
            np.asarray(getattr(params, name), dtype=np.float64)
            for name in (
                "defocus_u_a",
                "defocus_v_a",
                "defocus_angle_deg",
                "voltage_kv",
                "cs_mm",
                "amplitude_contrast",
                "phase_shift_deg",
                "bfactor_a2",
                "scale",
            )
        )
    )
    du, dv, ang, kv, cs, q0, phase, bfac, scale = (f[..., None, None] for f in fields)
    kx, ky = frequency_grid_2d(n)
    sx, sy = kx / (n * pixel_size_a), ky / (n * pixel_size_a)  # 1/Angstrom
    u2 = sx * sx + sy * sy
    lam = electron_wavelength_a(kv)
    defocus = -(du + dv) / 2 - (du - dv) / 2 * np.cos(
        2 * (np.arctan2(sy, sx) - np.deg2rad(ang))
    )
    chi = (
        np.pi * lam * defocus * u2
        + np.pi / 2 * (cs * 1e7) * lam**3 * u2 * u2
        - np.deg2rad(phase)
        - np.arctan(q0 / np.sqrt(1 - q0 * q0))
    )  # (m, N, N//2+1)
    ctf = -np.sin(chi) * np.exp(-bfac / 4 * u2) * scale
    return ctf.astype(dtype, copy=False)
