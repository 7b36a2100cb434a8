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

import dataclasses
from dataclasses import dataclass

import numpy as np

from .fourier import frequency_grid_2d

__all__ = [
    "CtfParams",
    "CtfBatch",
    "electron_wavelength_a",
    "ctf_2d",
    "ctf_coefficients",
    "ctf_subset",
    "N_COEFFICIENTS",
]


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


_CHUNK_ELEMENTS = 1 << 16  # pixels x particles per step: temporaries stay in cache
_geometry_cache: dict[tuple[int, float], tuple[np.ndarray, ...]] = {}


def _ctf_geometry(n: int, pixel_size_a: float) -> tuple[np.ndarray, ...]:
    """Per-pixel terms of the half-plane grid, cached per (n, pixel size).

    ``u2`` (1/Angstrom^2), ``u4 = u2^2`` and ``cos 2 alpha``, ``sin 2 alpha``
    of the frequency's angle ``alpha``, each flat (N * (N//2+1),) float64.
    """
    key = (int(n), float(pixel_size_a))
    hit = _geometry_cache.get(key)
    if hit is None:
        kx, ky = frequency_grid_2d(n)
        sx, sy = kx / (n * pixel_size_a), ky / (n * pixel_size_a)  # 1/Angstrom
        u2 = (sx * sx + sy * sy).ravel()
        alpha = np.arctan2(sy, sx).ravel()
        hit = (u2, u2 * u2, np.cos(2 * alpha), np.sin(2 * alpha))
        for a in hit:
            a.flags.writeable = False
        _geometry_cache[key] = hit
    return hit


_FIELDS = (
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

#: per-particle coefficients of :func:`ctf_coefficients`, in this order
N_COEFFICIENTS = 8


def ctf_coefficients(params: CtfParams) -> np.ndarray:
    """Per-particle coefficients of the CTF, (m, 8) float64 (m = 1 for scalars).

    With ``u2`` the squared spatial frequency (1/Angstrom^2) and ``alpha`` its
    angle in the image plane, the module docstring's CTF is::

        defocus = c[0] + c[1] cos 2alpha + c[2] sin 2alpha       # -dF, Angstrom
        chi     = c[3] defocus u2 + c[4] u2^2 + c[5]             # radians
        ctf     = c[7] sin(chi) exp(c[6] u2)

    ``c = (-(dU + dV)/2, -(dU - dV)/2 cos 2az, -(dU - dV)/2 sin 2az, pi lambda,
    pi/2 Cs lambda^3, -phase - atan(Q / sqrt(1 - Q^2)), -B/4, -scale)``. The
    host (:func:`ctf_2d`) and the GPU (``kernels/ctf.cu``) both evaluate it.
    """
    fields = np.broadcast_arrays(
        *(np.asarray(getattr(params, name), dtype=np.float64) for name in _FIELDS)
    )
    du, dv, ang, kv, cs, q0, phase, bfac, scale = (f.reshape(-1) for f in fields)
    lam = electron_wavelength_a(kv)
    half = -(du - dv) / 2
    az2 = 2 * np.deg2rad(ang)
    return np.stack(
        [
            -(du + dv) / 2,
            half * np.cos(az2),
            half * np.sin(az2),
            np.pi * lam,
            np.pi / 2 * (cs * 1e7) * lam**3,
            -np.deg2rad(phase) - np.arctan(q0 / np.sqrt(1 - q0 * q0)),
            -bfac / 4,
            -scale,
        ],
        axis=1,
    )


def ctf_subset(ctf: CtfParams, indices, n: int) -> CtfParams:
    """The CTF parameters of particles ``indices`` out of ``n``.

    Fields of length ``n`` are indexed (by an index array or a slice); scalar
    fields, shared by all particles, are kept.
    """
    changes = {}
    for field in dataclasses.fields(ctf):
        value = np.asarray(getattr(ctf, field.name))
        if value.ndim >= 1 and value.shape[0] == n:
            changes[field.name] = value[indices]
    return dataclasses.replace(ctf, **changes)


@dataclass(frozen=True)
class CtfBatch:
    """The CTFs of ``m`` particles on the (N, N//2+1) grid, not yet evaluated.

    What :func:`ctf_2d` would return for ``params`` (fields scalar or (m,)),
    box ``n`` pixels and ``pixel_size_a`` Angstrom, kept as parameters so that
    a GPU search can evaluate it where it scores (``kernels/ctf.cu``) instead
    of computing and uploading (m, N, N//2+1) values. ``np.asarray(batch)``
    evaluates it on the host (float32); ``batch[rows]`` is the batch of those
    particles (a slice or an index array).
    """

    params: CtfParams
    n: int
    pixel_size_a: float
    m: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.m, self.n, self.n // 2 + 1)

    def __len__(self) -> int:
        return self.m

    def __getitem__(self, rows) -> CtfBatch:
        picked = np.arange(self.m)[rows]
        if picked.ndim != 1:
            raise IndexError(f"CtfBatch takes a slice or 1-D rows; got {rows!r}")
        return CtfBatch(
            ctf_subset(self.params, picked, self.m),
            self.n,
            self.pixel_size_a,
            int(picked.size),
        )

    def coefficients(self) -> np.ndarray:
        """(m, 8) float64: :func:`ctf_coefficients` for every particle."""
        c = ctf_coefficients(self.params)
        return np.ascontiguousarray(np.broadcast_to(c, (self.m, N_COEFFICIENTS)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = ctf_2d(self.params, self.n, self.pixel_size_a)
        if out.shape != self.shape:  # one CTF for all: a stride-0 view
            out = np.broadcast_to(out, self.shape)
        return np.asarray(out, dtype=dtype)


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

    Notes
    -----
    Computed in float64 from :func:`ctf_coefficients`, with
    ``cos(2 (alpha - azimuth)) = cos 2alpha cos 2az + sin 2alpha sin 2az`` so
    that per particle and pixel only ``sin(chi)`` (and the B-factor's ``exp``
    when B != 0) is transcendental; particles in chunks of about 65536
    values, so the temporaries stay in cache. For a float32 result, ``chi``
    is reduced to [-pi, pi] in float64 and its sine taken in float32 (NumPy's
    vectorised float32 sine is ~10x faster than float64's): within 2e-7 of
    the float64 value, about the float32 rounding of the result itself.
    """
    lead = np.broadcast_shapes(*(np.shape(getattr(params, name)) for name in _FIELDS))
    coef = ctf_coefficients(params)
    mean, c2, s2, a_term, b_term, k_term, bq, neg_scale = (
        coef[:, i : i + 1] for i in range(N_COEFFICIENTS)
    )
    u2, u4, cos2, sin2 = _ctf_geometry(n, pixel_size_a)
    m, size = coef.shape[0], u2.size
    out = np.empty((m, size), dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // size)
    for i in range(0, m, step):
        j = slice(i, min(i + step, m))
        defocus = mean[j] + c2[j] * cos2 + s2[j] * sin2  # (k, P)
        chi = a_term[j] * defocus * u2 + b_term[j] * u4 + k_term[j]
        if out.dtype == np.float32:
            chi -= np.rint(chi * (0.5 / np.pi)) * (2 * np.pi)  # into [-pi, pi]
            ctf = np.sin(chi.astype(np.float32)).astype(np.float64)
        else:
            ctf = np.sin(chi)
        ctf *= neg_scale[j]
        if np.any(bq[j]):
            ctf *= np.exp(bq[j] * u2)
        out[j] = ctf
    return out.reshape(lead + (n, n // 2 + 1))
