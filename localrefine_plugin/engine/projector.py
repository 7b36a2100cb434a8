"""Forward model: central slices of a padded 3D Fourier transform.

Conventions (``docs/conventions.md``)
-------------------------------------
* Maps are ``(N, N, N)`` arrays ``[z, y, x]`` with the centre at ``N // 2``.
* Image frequency ``(kx, ky)`` (cycles per box) of a particle at rotation ``A``
  samples the map's transform at ``A.T @ (kx, ky, 0)``, i.e. at
  ``kx * A[0] + ky * A[1]`` (rows of ``A``).
* Projections come out in the image Fourier layout of :mod:`.fourier`
  (``rfft2(ifftshift(img))``, unnormalised), equal to the transform of the
  real-space projection that sums voxels along z.

Padded Fourier volume layout (mirrored by the GPU kernels)
----------------------------------------------------------
``FourierProjector.data`` is a complex64 array (complex128 for a float64
map) of shape ``(2 c + 2, 2 c + 2, c + 2)`` with
``c = ceil(padding * r_max_px)``. Element
``data[z + c, y + c, x]`` holds the transform of the zero-padded map (box
``padding * N``) at the padded integer frequency ``(x, y, z)``, for
``x = 0 .. c`` and ``y, z = -c .. c``; the last index on every axis
(``2 c + 1`` or ``c + 1``) is a zero guard so that the ``+1`` neighbour of
trilinear interpolation never leaves the array. Coefficients beyond radius
``padding * r_max_px`` are zero. Points with ``x < 0`` are read as the complex conjugate at
``-q`` (Friedel symmetry of a real map).

A padded-grid frequency ``q`` is ``padding`` times the unpadded frequency
``k``; the transform of the padded map at ``q = padding * k`` equals the
transform of the unpadded map at ``k`` (same phase ``k . x / N``), so no
normalisation is needed.

Gridding correction
-------------------
Trilinear interpolation in Fourier space multiplies the real-space map by the
transform of the tent kernel, ``sinc^2(x / Np) sinc^2(y / Np) sinc^2(z / Np)``
(``Np = padding * N``, ``sinc(t) = sin(pi t) / (pi t)``). The map is divided by
this before the transform, as RELION's ``Projector::computeFourierTransformMap``
does for trilinear interpolation (RELION divides by the radial
``sinc^2(r / Np)``; we use the separable product, which is the exact transform
of the trilinear kernel).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.fft

from .fourier import frequency_grid_2d, shift_phases_2d

__all__ = [
    "FourierProjector",
    "forward_model",
    "axis_blocks",
    "fft_order_index",
    "gridding_correction_1d",
    "padded_radius2",
    "CHUNK_BYTES",
    "fft_order_slices",
    "slice_coordinates",
    "trilinear_corners",
]

log = logging.getLogger(__name__)


#: bytes of the blocks in which :class:`FourierProjector` transforms the map and
#: :meth:`.backprojector.BackProjector.reconstruct` the accumulators back (small
#: enough that the allocator reuses them instead of fresh pages)
CHUNK_BYTES = 16 << 20


def gridding_correction_1d(n: int, padding: int) -> np.ndarray:
    """``sinc^2((i - n // 2) / (padding * n))`` for ``i = 0 .. n - 1`` (float64).

    The transform of the 1D tent kernel of linear interpolation on a Fourier
    grid of ``padding * n`` points, at real-space pixel ``i`` of an ``n`` box
    centred at ``n // 2``. The 3D correction is the outer product over axes.
    """
    x = (np.arange(n) - n // 2) / float(padding * n)
    return np.sinc(x) ** 2  # np.sinc(t) = sin(pi t) / (pi t)


def fft_order_index(n: int, npad: int) -> np.ndarray:
    """Indices in an FFT-ordered box of ``npad`` of the pixels ``0 .. n-1`` of a box
    centred at ``n // 2``: pixel ``i`` sits at ``(i - n // 2) mod npad``."""
    return (np.arange(n) - n // 2) % npad


def fft_order_slices(n: int, npad: int) -> tuple[tuple[slice, slice], ...]:
    """:func:`fft_order_index` as contiguous ``(map slice, FFT-order slice)`` pairs:
    pixels ``0 .. n//2 - 1`` at ``npad - n//2 ..``, pixels ``n//2 ..`` at ``0 ..``
    (block copies instead of a fancy index)."""
    h = n // 2
    return (slice(0, h), slice(npad - h, npad)), (slice(h, n), slice(0, n - h))


def axis_blocks(c: int, npad: int, *, drop_alias: bool) -> list[tuple[slice, slice]]:
    """Contiguous ``(FFT-order slice, layout slice)`` pairs along a y or z axis.

    They map frequencies ``k = -c .. c`` between an FFT-ordered axis of
    ``npad`` points (``k mod npad``) and the layout's centred axis
    (``k + c``). With ``drop_alias``, ``k = -c`` is left out where it is the
    same FFT index as ``+c`` (``2 c + 1 > npad``), so that writes are unique.
    """
    lo = -c + 1 if drop_alias and 2 * c + 1 > npad else -c
    blocks = [(slice(0, c + 1), slice(c, 2 * c + 1))]  # k = 0 .. c
    if lo < 0:
        blocks.append((slice(npad + lo, npad), slice(c + lo, c)))  # k = lo .. -1
    return blocks


def padded_radius2(
    c: int, zs: slice = slice(None), ys: slice = slice(None), nx: int | None = None
) -> np.ndarray:
    """Squared padded radius of every element of the layout, int32, shape
    ``(2 c + 2, 2 c + 2, c + 2)`` (the guard planes included); or of the block
    of planes ``zs``, rows ``ys`` and first ``nx`` columns."""
    k2 = np.arange(-c, c + 2, dtype=np.int32) ** 2
    kx2 = np.arange(c + 2, dtype=np.int32) ** 2
    return k2[zs, None, None] + k2[None, ys, None] + kx2[None, None, :nx]


def slice_coordinates(
    rotations: np.ndarray, kx: np.ndarray, ky: np.ndarray
) -> np.ndarray:
    """3D frequencies ``A.T @ (kx, ky, 0)`` of image pixels, in cycles per box.

    Parameters
    ----------
    rotations : ndarray, shape (m, 3, 3)
        RELION matrices ``A`` (ZYZ Euler convention, docs/conventions.md).
    kx, ky : ndarray, shape (P,)
        Image frequencies of the pixels (cycles per box).

    Returns
    -------
    ndarray, shape (m, P, 3), float64
        ``(x, y, z)`` frequency of the map sampled by each pixel.
    """
    a = np.asarray(rotations, dtype=np.float64)
    kx = np.asarray(kx, dtype=np.float64)
    ky = np.asarray(ky, dtype=np.float64)
    # A.T @ (kx, ky, 0) = kx * A[0, :] + ky * A[1, :]
    return (
        kx[None, :, None] * a[:, None, 0, :] + ky[None, :, None] * a[:, None, 1, :]
    )  # (m, P, 3)


def trilinear_corners(
    q: np.ndarray, c: int, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices and weights of the 8 trilinear neighbours in the padded layout.

    Parameters
    ----------
    q : ndarray, shape (..., 3), float64
        Padded-grid frequencies ``(x, y, z)``, ``|q| <= c``.
    c : int
        Radius of the layout (see the module docstring).
    shape : tuple
        Shape of the padded array ``(2 c + 2, 2 c + 2, c + 2)``.

    Returns
    -------
    index : ndarray, shape (8, ...), int64
        Flat indices into the padded array (points with ``x < 0`` mirrored).
    weight : ndarray, shape (8, ...), float64
        Trilinear weights (sum to 1 over the 8 corners).
    conj : ndarray, shape (...), bool
        True where the point was mirrored (``x < 0``): read or write the
        complex conjugate there.
    """
    conj = q[..., 0] < 0
    q = q * np.where(conj, -1.0, 1.0)[..., None]  # mirror x < 0 to -q
    fl = np.floor(q)
    f = q - fl  # fractional parts, (..., 3)
    i0 = fl.astype(np.int64)
    # guard against |q| slightly above c from rounding: clip into the array
    ix = np.clip(i0[..., 0], 0, shape[2] - 2)
    iy = np.clip(i0[..., 1] + c, 0, shape[1] - 2)
    iz = np.clip(i0[..., 2] + c, 0, shape[0] - 2)
    sy, sz = shape[2], shape[1] * shape[2]
    base = iz * sz + iy * sy + ix
    # corner j = 4 bz + 2 by + bx sits at base + bz sz + by sy + bx
    offsets = np.array([0, 1, sy, sy + 1, sz, sz + 1, sz + sy, sz + sy + 1])
    index = base[None] + offsets.reshape((8,) + (1,) * base.ndim)  # (8, ...)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    wx = np.stack([1.0 - fx, fx])  # (2, ...)
    wy = np.stack([1.0 - fy, fy])
    wz = np.stack([1.0 - fz, fz])
    wzy = (wz[:, None] * wy[None, :]).reshape((4,) + base.shape)  # (4, ...)
    weight = (wzy[:, None] * wx[None, :]).reshape((8,) + base.shape)  # (8, ...)
    return index, weight, conj


def _pixels_within(
    n: int, r_max_px: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices and frequencies of half-plane pixels with radius <= r_max_px."""
    kx, ky = frequency_grid_2d(n)
    inside = (kx * kx + ky * ky <= r_max_px * r_max_px).ravel()
    flat = np.flatnonzero(inside)
    return flat, kx.ravel()[flat], ky.ravel()[flat]


class FourierProjector:
    """Central-slice projector of a real map with padding and trilinear interpolation.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N), float32 or float64
        The map ``[z, y, x]``, centre at ``N // 2``, in any density unit.
    padding : int
        Oversampling factor of the Fourier grid (RELION's default 2).
    r_max_px : float, optional
        Largest frequency kept (cycles per box, unpadded). Default ``N // 2``
        (Nyquist). A smaller value shrinks :attr:`data`.

    Attributes
    ----------
    n : int
        Box size ``N``.
    padding : int
    r_max_px : float
    c : int
        ``ceil(padding * r_max_px)``: radius of the padded layout.
    data : ndarray, shape (2 c + 2, 2 c + 2, c + 2), complex64
        Padded half-space transform, layout in the module docstring. Read-only.
    dtype : numpy dtype
        complex64 for float32 maps, complex128 for float64 maps.
    """

    def __init__(
        self, volume: np.ndarray, *, padding: int = 2, r_max_px: float | None = None
    ) -> None:
        volume = np.asarray(volume)
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise ValueError(
                f"volume must be a cubic (N, N, N) array; got shape {volume.shape}"
            )
        if not np.issubdtype(volume.dtype, np.floating):
            raise TypeError(f"volume must be float32 or float64; got {volume.dtype}")
        if int(padding) != padding or padding < 1:
            raise ValueError(f"padding must be a positive integer; got {padding}")
        n = volume.shape[0]
        self.n = n
        self.padding = int(padding)
        self.r_max_px = float(n // 2 if r_max_px is None else min(r_max_px, n // 2))
        self.c = int(np.ceil(self.padding * self.r_max_px))
        self.dtype = np.result_type(volume.dtype, np.complex64)
        self.data = self._padded_transform(volume)
        self.data.flags.writeable = False

    def _padded_transform(self, volume: np.ndarray) -> np.ndarray:
        """The layout of the gridding-corrected map's zero-padded transform.

        The ``(pN)^3`` real-to-complex transform, one axis at a time in the
        order of ``scipy.fft.rfftn`` (x, then z, then y; the same values), of
        the ``N^3`` nonzero voxels only: x lines of the map's rows, then only
        the ``c + 1`` kept x frequencies, and each axis in blocks of about
        :data:`CHUNK_BYTES`. The padded box itself is never formed (at box 256
        it was 0.5 GB of input and 1 GB of output, fresh, per projector).
        """
        n, p, c = self.n, self.padding, self.c
        npad = p * n
        real = np.float32 if self.dtype == np.complex64 else np.float64
        g = gridding_correction_1d(n, p)
        corrected = volume / (g[:, None, None] * g[None, :, None] * g[None, None, :])
        order = fft_order_slices(n, npad)  # the map's voxels in the padded FFT order
        blocks = axis_blocks(c, npad, drop_alias=False)
        itemsize = np.dtype(self.dtype).itemsize
        step = max(1, CHUNK_BYTES // (npad * max(n, c + 1) * itemsize))
        # x: the real lines of the map, zero-padded, frequencies 0 .. c
        fx = np.empty((n, n, c + 1), dtype=self.dtype)
        for z0 in range(0, n, step):
            zs = slice(z0, min(z0 + step, n))
            lines = np.zeros((zs.stop - zs.start, n, npad), dtype=real)
            for v, f in order:
                lines[:, :, f] = corrected[zs, :, v]
            fx[zs] = scipy.fft.rfft(lines, axis=2, workers=-1)[:, :, : c + 1]
        del corrected
        # z: frequencies -c .. c into the layout's order (y still the map's rows)
        fz = np.zeros((2 * c + 2, n, c + 1), dtype=self.dtype)
        for y0 in range(0, n, step):
            ys = slice(y0, min(y0 + step, n))
            work = np.zeros((npad, ys.stop - ys.start, c + 1), dtype=self.dtype)
            for v, f in order:
                work[f] = fx[v, ys]
            work = scipy.fft.fft(work, axis=0, workers=-1, overwrite_x=True)
            for f, lay in blocks:
                fz[lay, ys] = work[f]
        del fx
        # y: frequencies -c .. c; zero beyond r_max
        out = np.zeros((2 * c + 2, 2 * c + 2, c + 2), dtype=self.dtype)
        lim2 = (p * self.r_max_px) ** 2
        for z0 in range(0, 2 * c + 2, step):
            zs = slice(z0, min(z0 + step, 2 * c + 2))
            work = np.zeros((zs.stop - zs.start, npad, c + 1), dtype=self.dtype)
            for v, f in order:
                work[:, f] = fz[zs, v]
            work = scipy.fft.fft(work, axis=1, workers=-1, overwrite_x=True)
            for f, lay in blocks:
                out[zs, lay, : c + 1] = work[:, f]
            out[zs][padded_radius2(c, zs) > lim2] = 0
        return out

    def sample(self, freqs: np.ndarray) -> np.ndarray:
        """Trilinear interpolation of the map's transform at 3D frequencies.

        Parameters
        ----------
        freqs : ndarray, shape (..., 3), float64
            ``(x, y, z)`` frequencies in cycles per (unpadded) box, e.g. from
            :func:`slice_coordinates`. Points beyond ``r_max_px`` read zero.

        Returns
        -------
        ndarray, shape (...), complex64 (complex128 for a float64 map)
        """
        q = np.asarray(freqs, dtype=np.float64) * self.padding
        limit2 = (self.padding * self.r_max_px) ** 2 * (1 + 1e-9)  # rounding slack
        outside = np.einsum("...i,...i->...", q, q) > limit2
        q = np.where(outside[..., None], 0.0, q)
        value = self._interpolate(q)
        value[outside] = 0
        return value

    def project_pixels(
        self, rotations: np.ndarray, kx: np.ndarray, ky: np.ndarray
    ) -> np.ndarray:
        """Central-slice values at chosen image frequencies only.

        Parameters
        ----------
        rotations : ndarray, shape (m, 3, 3)
            RELION matrices ``A``.
        kx, ky : ndarray, shape (P,)
            Image frequencies (cycles per box) of the pixels wanted.

        Returns
        -------
        ndarray, shape (m, P), complex64 (complex128 for a float64 map)
        """
        rotations = np.asarray(rotations)
        kx = np.asarray(kx, dtype=np.float64)
        ky = np.asarray(ky, dtype=np.float64)
        if kx.size and np.max(kx * kx + ky * ky) > self.r_max_px**2:
            return self.sample(slice_coordinates(rotations, kx, ky))
        # fast path (every pixel within r_max, so every slice point is too, the
        # rotations being orthogonal): padded coordinates straight from the
        # rotation rows (float64), no outside test
        a = rotations.astype(np.float64, copy=False).reshape(-1, 3, 3)
        k = np.stack([kx, ky], axis=-1) * self.padding  # (P, 2)
        q = np.matmul(k, a[:, :2, :])  # (m, P, 3): kx A[0] + ky A[1]
        return self._interpolate(q)  # (m, P)

    def _interpolate(self, q: np.ndarray) -> np.ndarray:
        """Trilinear values at padded coordinates ``q`` (..., 3), ``|q| <= c``.

        The same interpolation as :func:`trilinear_corners` (clipped corners,
        Friedel mirror for ``x < 0``), as nested linear interpolations on x,
        then y, then z, with int32 indices; coordinates in float64, the
        fractions and values in the map's precision.
        """
        shape = self.data.shape
        c = self.c
        conj = q[..., 0] < 0
        q = np.where(conj[..., None], -q, q)
        fl = np.floor(q)
        real = np.float32 if self.dtype == np.complex64 else np.float64
        f = (q - fl).astype(real)  # (..., 3)
        i = fl.astype(np.int32)
        ix = np.clip(i[..., 0], 0, shape[2] - 2)
        iy = np.clip(i[..., 1] + c, 0, shape[1] - 2)
        iz = np.clip(i[..., 2] + c, 0, shape[0] - 2)
        sy, sz = shape[2], shape[1] * shape[2]
        base = iz * np.int32(sz) + iy * np.int32(sy) + ix
        flat = self.data.reshape(-1)
        fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]

        def along_x(offset: int) -> np.ndarray:
            v0 = flat.take(base + np.int32(offset))
            v1 = flat.take(base + np.int32(offset + 1))
            v1 -= v0
            v1 *= fx
            v1 += v0
            return v1

        def lerp(v0: np.ndarray, v1: np.ndarray, t: np.ndarray) -> np.ndarray:
            v1 -= v0
            v1 *= t
            v1 += v0
            return v1

        v = lerp(
            lerp(along_x(0), along_x(sy), fy),
            lerp(along_x(sz), along_x(sz + sy), fy),
            fz,
        )
        np.conjugate(v, out=v, where=conj)
        return v

    def project(
        self,
        rotations: np.ndarray,
        *,
        r_max_px: float | None = None,
        batch_size: int = 64,
    ) -> np.ndarray:
        """Projections along z of the map rotated by ``rotations``, in Fourier space.

        Parameters
        ----------
        rotations : ndarray, shape (m, 3, 3) or (3, 3)
            RELION matrices ``A`` (map -> image coordinates).
        r_max_px : float, optional
            Zero beyond this radius (cycles per box). Default and upper limit:
            the projector's ``r_max_px``.
        batch_size : int
            Images interpolated at once (memory versus speed).

        Returns
        -------
        ndarray, shape (m, N, N//2+1) (or (N, N//2+1) for one matrix)
            ``image_to_fourier`` of the real-space projection (sum along z, pixel
            units, centre at ``N // 2``). complex64 for a float32 map.
        """
        rotations = np.asarray(rotations, dtype=np.float64)
        single = rotations.ndim == 2
        rotations = rotations.reshape(-1, 3, 3)
        n = self.n
        r = self.r_max_px if r_max_px is None else min(float(r_max_px), self.r_max_px)
        flat, kx, ky = _pixels_within(n, r)
        m = rotations.shape[0]
        out = np.zeros((m, n * (n // 2 + 1)), dtype=self.dtype)
        for start in range(0, m, batch_size):
            stop = min(start + batch_size, m)
            out[start:stop, flat] = self.project_pixels(rotations[start:stop], kx, ky)
        out = out.reshape(m, n, n // 2 + 1)
        return out[0] if single else out


def forward_model(
    projector: FourierProjector,
    rotations: np.ndarray,
    *,
    origins_px: np.ndarray | None = None,
    ctf: np.ndarray | None = None,
    r_max_px: float | None = None,
) -> np.ndarray:
    """Particle images predicted by the map: ``CTF * shift(project(A), -origin)``.

    Shift sign, measured against RELION 3.1.3 (``tests/test_relion_projection.py``):
    ``relion_project`` moves the projection by **minus** the origin
    (``rlnOriginXAngst / pixel size``), and ``relion_reconstruct`` shifts each
    image by **plus** its origin before inserting it. A particle whose centre
    sits at ``(+3, 0)`` pixels from the box centre therefore has
    ``rlnOriginX = -3``. (``docs/conventions.md`` states the opposite sign.)

    Parameters
    ----------
    projector : FourierProjector
    rotations : ndarray, shape (m, 3, 3)
        RELION matrices ``A``.
    origins_px : ndarray, shape (m, 2), optional
        RELION origins ``(rlnOriginX, rlnOriginY)`` in pixels (Angstrom values
        divided by the pixel size). The content is moved by ``-origins_px``.
    ctf : ndarray, shape (m, N, N//2+1) or (N, N//2+1), optional
        CTF on the half-plane grid (:func:`.ctf.ctf_2d`), multiplied in.
    r_max_px : float, optional
        Zero beyond this radius (cycles per box).

    Returns
    -------
    ndarray, shape (m, N, N//2+1)
        In the image Fourier layout; ``fourier_to_image(result, N)`` gives the
        real-space images. Normalised as ``relion_project`` (ratio 1.0000).
    """
    f = projector.project(np.asarray(rotations).reshape(-1, 3, 3), r_max_px=r_max_px)
    if origins_px is not None:
        origins = np.asarray(origins_px, dtype=np.float64).reshape(-1, 2)
        f *= shift_phases_2d(projector.n, -origins, dtype=f.dtype)
    if ctf is not None:
        f *= np.asarray(ctf).astype(f.real.dtype, copy=False)
    return f
