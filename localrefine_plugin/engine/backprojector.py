"""Back-projection: insert 2D image transforms into a padded 3D Fourier volume.

Layout
------
The accumulators use the padded half-space layout of
:class:`.projector.FourierProjector` (see that module's docstring):
``data[z + c, y + c, x]`` for padded integer frequencies ``x = 0 .. c``,
``y, z = -c .. c`` with ``c = padding * r_max_px``, plus one zero guard plane
on each axis. An image frequency ``(kx, ky)`` of a particle with RELION
matrix ``A`` lands at ``padding * A.T @ (kx, ky, 0)``, spread over its 8
trilinear neighbours; points with ``x < 0`` are inserted as the complex
conjugate at ``-q`` (Friedel symmetry).

Reconstruction
--------------
:meth:`BackProjector.reconstruct` follows RELION's
``BackProjector::reconstruct`` (RELION 3.1, ``src/backprojector.cpp``; Scheres,
J. Struct. Biol. 180, 519 (2012), eq. 14-17), written out here:

1. Make the ``x = 0`` plane Hermitian: add each coefficient's mirror
   ``conj(data(-y, -z))`` and ``weight(-y, -z)`` (both halves of the plane
   receive insertions).
2. Per unpadded shell ``s`` (``rint(|q| / padding)``), with the half-map FSC
   ``f_s`` clipped to [0.001, 0.999]: ``SSNR_s = tau2_fudge * f_s / (1 - f_s)``.
   RELION sets ``sigma2_s = 1 / <padding^3 w>_s`` (the inverse mean weight in
   the shell, ``<.>_s`` the average over the padded voxels of the shell),
   ``tau2_s = SSNR_s sigma2_s`` and adds ``1 / (padding^3 tau2_s)`` to every
   weight; the ``padding^3`` factors cancel, so the regulariser is
   ``<w>_s / SSNR_s`` and
   ``F(q) = data(q) / (weight(q) + <w>_s / SSNR_s)``.
   This is a Wiener filter: ``weight`` is the summed ``CTF^2`` (the data's
   inverse noise variance per coefficient, up to a common factor) and
   ``SSNR_s`` the per-coefficient signal-to-noise ratio of the full data set.
3. Without an FSC: ``F = data / max(weight, wiener_constant)``, the constant
   defaulting to ``1e-3`` times the mean weight inside ``r_max`` (only
   avoids division by ~0 where almost nothing was inserted).
4. Inverse transform on the padded box, crop to ``N``, divide by the
   transform of the trilinear kernel, ``sinc^2`` per axis
   (:func:`.projector.gridding_correction_1d`).

What RELION does that we skip: the iterative gridding / density
compensation of Pipe & Menon (1999) (``--iter 10``, blob kernel) that RELION
runs when no FSC is given, and its ``minres_map`` low-resolution exception.
Dividing by the accumulated trilinear weight is the direct estimate; the
tests show it agrees with ``relion_reconstruct``.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.fft

from . import projector as _projector  # its CHUNK_BYTES, read at each call
from .fourier import frequency_grid_2d
from .projector import (
    axis_blocks,
    fft_order_slices,
    gridding_correction_1d,
    padded_radius2,
    slice_coordinates,
    trilinear_corners,
)

__all__ = ["BackProjector", "CHUNK_ENTRIES"]

#: Trilinear entries (8 per pixel per image) processed at once by
#: :meth:`BackProjector.insert`: bounds its temporaries to ~32 MB per array,
#: which the allocator reuses without page faults.
CHUNK_ENTRIES = 1 << 22

log = logging.getLogger(__name__)


class BackProjector:
    """Accumulates CTF-weighted image transforms for a 3D reconstruction.

    Parameters
    ----------
    n : int
        Box size ``N`` of the images and the map (pixels).
    padding : int
        Oversampling factor of the Fourier grid (RELION's default 2).
    r_max_px : float, optional
        Largest frequency inserted (cycles per box, unpadded); default
        ``N // 2`` (Nyquist).

    Attributes
    ----------
    data : ndarray, shape (2 c + 2, 2 c + 2, c + 2), complex128
        Sum of ``ctf * F`` with trilinear weights (layout in the module
        docstring, ``c = ceil(padding * r_max_px)``).
    weight : ndarray, same shape, float64
        Sum of ``ctf^2`` with trilinear weights.
    n_inserted : int
        Images inserted so far.
    """

    def __init__(
        self, n: int, *, padding: int = 2, r_max_px: float | None = None
    ) -> None:
        if int(n) != n or n < 2:
            raise ValueError(f"box size must be an integer >= 2; got {n}")
        if int(padding) != padding or padding < 1:
            raise ValueError(f"padding must be a positive integer; got {padding}")
        self.n = int(n)
        self.padding = int(padding)
        self.r_max_px = float(n // 2 if r_max_px is None else min(r_max_px, n // 2))
        self.c = int(np.ceil(self.padding * self.r_max_px))
        shape = (2 * self.c + 2, 2 * self.c + 2, self.c + 2)
        self.data = np.zeros(shape, dtype=np.complex128)
        self.weight = np.zeros(shape, dtype=np.float64)
        self.n_inserted = 0
        kx, ky = frequency_grid_2d(self.n)
        inside = (kx * kx + ky * ky <= self.r_max_px**2).ravel()
        self._flat = np.flatnonzero(inside)
        self._kx = kx.ravel()[self._flat]
        self._ky = ky.ravel()[self._flat]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of :attr:`data` and :attr:`weight`."""
        return self.data.shape

    def insert(
        self,
        f_images: np.ndarray,
        rotations: np.ndarray,
        *,
        ctf: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        """Add images to the accumulators.

        Parameters
        ----------
        f_images : ndarray, shape (m, N, N//2+1), complex
            Image transforms in the layout of :mod:`.fourier`, already centred
            (RELION: shift each image by ``+origin``, see
            :func:`.projector.forward_model`).
        rotations : ndarray, shape (m, 3, 3)
            RELION matrices ``A`` of the images.
        ctf : ndarray, shape (m, N, N//2+1) or (N, N//2+1), optional
            CTF of each image (:func:`.ctf.ctf_2d`); ``data += ctf * F`` and
            ``weight += ctf^2``. Default: 1.
        weights : ndarray, shape (m,), optional
            Per-image weights multiplying both contributions (e.g. a
            figure of merit). Default: 1.
        """
        f_images = np.asarray(f_images)
        if f_images.ndim == 2:
            f_images = f_images[None]
        m = f_images.shape[0]
        n = self.n
        if f_images.shape[1:] != (n, n // 2 + 1):
            raise ValueError(
                f"f_images must have shape (m, {n}, {n // 2 + 1}); got {f_images.shape}"
            )
        rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
        if rotations.shape[0] != m:
            raise ValueError(f"{m} images but {rotations.shape[0]} rotations")
        ctf_all = (
            None
            if ctf is None
            else np.broadcast_to(np.asarray(ctf), (m, n, n // 2 + 1))
        )
        w_all = None if weights is None else np.asarray(weights, dtype=np.float64)
        if w_all is not None and w_all.shape != (m,):
            raise ValueError(f"weights must have shape ({m},); got {w_all.shape}")
        # chunks of ~CHUNK_ENTRIES trilinear entries keep the temporaries small
        step = max(1, CHUNK_ENTRIES // (8 * max(self._flat.size, 1)))
        for start in range(0, m, step):
            sl = slice(start, min(start + step, m))
            self._insert_chunk(
                f_images[sl],
                rotations[sl],
                None if ctf_all is None else ctf_all[sl],
                None if w_all is None else w_all[sl],
            )
        self.n_inserted += m

    def _insert_chunk(self, f_images, rotations, ctf, weights) -> None:
        """:meth:`insert` for one chunk of validated inputs (m, ...)."""
        m = f_images.shape[0]
        f = f_images.reshape(m, -1)[:, self._flat]  # (m, P)
        fr = f.real.astype(np.float64)
        fi = f.imag.astype(np.float64)
        ctf2 = None  # None means 1
        if ctf is not None:
            c = np.asarray(ctf, dtype=np.float64).reshape(m, -1)[:, self._flat]
            fr *= c
            fi *= c
            ctf2 = c * c
        if weights is not None:
            w = weights.reshape(m, 1)
            fr *= w
            fi *= w
            ctf2 = np.broadcast_to(w, (m, fr.shape[1])) if ctf2 is None else ctf2 * w
        q = self.padding * slice_coordinates(rotations, self._kx, self._ky)  # (m, P, 3)
        index, tri, conj = trilinear_corners(q, self.c, self.shape)
        np.negative(fi, out=fi, where=conj)  # Friedel mate: conj(F) at -q
        size = self.weight.size
        flat_index = index.reshape(-1)
        tri = tri.reshape(8, -1)  # (8, m P)
        # one weight array per accumulator: real part, imaginary part, CTF^2
        w_re = (tri * fr.reshape(1, -1)).reshape(-1)
        w_im = (tri * fi.reshape(1, -1)).reshape(-1)
        w_ctf2 = (
            tri.reshape(-1) if ctf2 is None else (tri * ctf2.reshape(1, -1)).reshape(-1)
        )
        parts = self.data.reshape(-1).view(np.float64)  # (2 size,) re, im, re, ...
        if flat_index.size >= size:
            # many entries per voxel: one pass with bincount
            parts[0::2] += np.bincount(flat_index, weights=w_re, minlength=size)
            parts[1::2] += np.bincount(flat_index, weights=w_im, minlength=size)
            self.weight.reshape(-1)[:] += np.bincount(
                flat_index, weights=w_ctf2, minlength=size
            )
        else:
            # few entries (large box, small batch): bincount's full-length
            # output dominates; numpy >= 1.25's ufunc.at fast path is cheaper
            np.add.at(parts, 2 * flat_index, w_re)
            np.add.at(parts, 2 * flat_index + 1, w_im)
            np.add.at(self.weight.reshape(-1), flat_index, w_ctf2)

    def add(self, other: BackProjector) -> None:
        """Add another back-projector's accumulators (same box, padding, r_max)."""
        if (other.n, other.padding, other.shape) != (self.n, self.padding, self.shape):
            raise ValueError(
                f"cannot add a back-projector of box {other.n}, padding "
                f"{other.padding}, shape {other.shape} to one of box {self.n}, "
                f"padding {self.padding}, shape {self.shape}"
            )
        self.data += other.data
        self.weight += other.weight
        self.n_inserted += other.n_inserted

    def copy(self) -> BackProjector:
        """An independent copy of the accumulators."""
        new = BackProjector(self.n, padding=self.padding, r_max_px=self.r_max_px)
        new.data[...] = self.data
        new.weight[...] = self.weight
        new.n_inserted = self.n_inserted
        return new

    def _hermitian_x0_plane(self) -> tuple[np.ndarray, np.ndarray]:
        """Data and weight of the x = 0 plane made Hermitian (step 1), (2c+1, 2c+1)."""
        c = self.c
        plane_d = self.data[: 2 * c + 1, : 2 * c + 1, 0]
        plane_w = self.weight[: 2 * c + 1, : 2 * c + 1, 0]
        return plane_d + np.conj(plane_d[::-1, ::-1]), plane_w + plane_w[::-1, ::-1]

    def fourier_estimate(
        self,
        *,
        fsc: np.ndarray | None = None,
        tau2_fudge: float = 1.0,
        wiener_constant: float | None = None,
    ) -> np.ndarray:
        """The map's padded transform ``data / (weight + regulariser)``.

        Steps 1 to 3 of the module docstring; arguments as :meth:`reconstruct`.

        Returns
        -------
        ndarray, shape :attr:`shape`, complex128
            In the padded layout; zero beyond ``r_max`` and where nothing was
            inserted.
        """
        block = self._estimator(fsc, tau2_fudge, wiener_constant)
        out = np.empty(self.shape, dtype=self.data.dtype)
        for zs in self._slabs():
            out[zs] = block(zs, slice(None), self.shape[2])
        return out

    def _slabs(self) -> list[slice]:
        """The layout's z planes in slabs of about ``projector.CHUNK_BYTES``."""
        nz, ny, nx = self.shape
        step = max(1, _projector.CHUNK_BYTES // (ny * nx * 16))  # complex128 planes
        return [slice(z, min(z + step, nz)) for z in range(0, nz, step)]

    def _estimator(self, fsc, tau2_fudge: float, wiener_constant):
        """``block(zs, ys, nx)``: the Fourier estimate of the layout's planes
        ``zs``, rows ``ys`` and first ``nx`` columns (z, y, x), complex128.

        The regulariser is found first (per shell, from the weights, with an
        FSC; else the floor of the weight); each block is then computed from
        ``data`` and ``weight`` alone, so the estimate is made a block at a
        time where it is needed (:meth:`reconstruct`: no array of the padded
        box's size beside the accumulators; fresh arrays of that size cost
        more in page faults than the arithmetic).
        """
        c, p = self.c, self.padding
        plane_d, plane_w = self._hermitian_x0_plane()
        lim2 = (p * self.r_max_px) ** 2
        # per squared radius (an integer): its unpadded shell and whether inside
        r2_all = np.arange(3 * (c + 1) ** 2 + 1)  # up to the corner (c+1, c+1, c+1)
        shell_of = np.rint(np.sqrt(r2_all) / p).astype(np.int32)
        inside_of = r2_all <= lim2

        def plane_rows(zs: slice, ys: slice) -> tuple[slice, slice]:
            """The block's part of the x = 0 plane ``[: 2c + 1, : 2c + 1]``."""
            z_in, y_in = range(2 * c + 1)[zs], range(2 * c + 1)[ys]
            return slice(z_in.start, z_in.stop), slice(y_in.start, y_in.stop)

        def weights(zs: slice, ys: slice = slice(None), nx: int | None = None):
            """The weights of a block, the x = 0 plane made Hermitian."""
            w = self.weight[zs, ys, :nx].copy()
            pz, py = plane_rows(zs, ys)
            w[: pz.stop - pz.start, : py.stop - py.start, 0] = plane_w[pz, py]
            return w

        slabs = self._slabs()
        if fsc is not None:
            size = int(shell_of[inside_of].max()) + 1 if inside_of.any() else 1
            w_sum, count = np.zeros(size), np.zeros(size, dtype=np.int64)
            for zs in slabs:
                r2 = padded_radius2(c, zs)
                inside = r2 <= lim2
                s = shell_of.take(r2[inside])
                w = weights(zs)[inside]
                w_sum += np.bincount(s, weights=w, minlength=size)
                count += np.bincount(s, minlength=size)
            n_shells = int(np.flatnonzero(count).max()) + 1 if count.any() else 1
            fsc = np.clip(np.asarray(fsc, dtype=np.float64), 0.001, 0.999)
            f = np.full(n_shells, 0.001)
            f[: min(n_shells, fsc.size)] = fsc[:n_shells]
            ssnr = tau2_fudge * f / (1.0 - f)
            mean_w = w_sum[:n_shells] / np.maximum(count[:n_shells], 1)
            reg = mean_w / ssnr  # RELION's 1 / tau2 per shell, see module docstring
            # the regulariser per squared radius (0 outside r_max)
            reg_of = np.where(inside_of, reg[np.minimum(shell_of, n_shells - 1)], 0.0)
        elif wiener_constant is None:
            total, count = 0.0, 0
            for zs in slabs:
                inside = padded_radius2(c, zs) <= lim2
                total += float(weights(zs)[inside].sum())
                count += int(inside.sum())
            mean_w = total / count if count else 0.0
            wiener_constant = 1e-3 * mean_w if mean_w > 0 else 1.0

        def block(zs: slice, ys: slice, nx: int) -> np.ndarray:
            r2 = padded_radius2(c, zs, ys, nx)
            pz, py = plane_rows(zs, ys)
            denom = weights(zs, ys, nx)
            if fsc is not None:
                denom += reg_of.take(r2)
            else:
                np.maximum(denom, wiener_constant, out=denom)
            ok = (r2 <= lim2) & (denom > 0)
            # data / denom as data times 1 / denom: the values of numpy's
            # complex-by-real division (which scales by the reciprocal)
            inv = np.divide(1.0, denom, out=np.zeros(denom.shape), where=ok)
            out = np.zeros(denom.shape, dtype=self.data.dtype)
            np.multiply(self.data[zs, ys, :nx], inv, out=out, where=ok)
            hz, hy = pz.stop - pz.start, py.stop - py.start
            if hz > 0 and hy > 0:  # the Hermitian x = 0 plane
                out[:hz, :hy, 0] = np.multiply(
                    plane_d[pz, py],
                    inv[:hz, :hy, 0],
                    out=np.zeros((hz, hy), dtype=plane_d.dtype),
                    where=ok[:hz, :hy, 0],
                )
            return out

        return block

    def reconstruct(
        self,
        *,
        fsc: np.ndarray | None = None,
        tau2_fudge: float = 1.0,
        wiener_constant: float | None = None,
    ) -> np.ndarray:
        """The map from the accumulated images (formulas in the module docstring).

        Parameters
        ----------
        fsc : ndarray, shape (S,), optional
            Half-map FSC per unpadded shell ``0 .. S-1`` (cycles per box). When
            given, each shell is Wiener-regularised with ``SSNR = FSC/(1-FSC)``
            (shells beyond ``S`` use FSC 0.001).
        tau2_fudge : float
            Multiplies the SSNR (RELION's ``--tau2_fudge``; > 1 sharpens).
        wiener_constant : float, optional
            Without ``fsc``: the floor of the weight in the division.
            Default ``1e-3`` times the mean weight within ``r_max``.

        Returns
        -------
        ndarray, shape (N, N, N), float32
            The map ``[z, y, x]``, centre at ``N // 2``, in the units of the
            inserted images' pixels per voxel (a map whose projections are
            the images, when the CTF is 1).
        """
        block = self._estimator(fsc, tau2_fudge, wiener_constant)
        nx = self.c + 1
        return self._to_real_space(lambda ys: block(slice(None), ys, nx))

    def _to_real_space(self, f3) -> np.ndarray:
        """Padded layout -> real map (N, N, N) float32 with the gridding correction.

        ``f3``: the padded layout (:attr:`shape`), or ``f3(ys)`` giving its
        rows ``ys`` (a slice), all planes, the first ``c + 1`` columns.

        The inverse transform of the padded ``(pN)^3`` grid, of which only the
        central ``N^3`` voxels are kept, is done one axis at a time, keeping
        the ``N`` wanted outputs after each axis (z, then y, then the real x):
        the later axes transform ``1/p`` and ``1/p^2`` of the lines, 42 % less
        work than the whole padded ``irfftn`` at ``p = 2``, with the same
        values up to rounding. Each axis is done in blocks of about
        ``projector.CHUNK_BYTES`` (rows for z, planes for y and x): the only large
        array made is the z-transformed half (N planes).
        """
        n, p, c = self.n, self.padding, self.c
        npad = p * n
        kept = fft_order_slices(n, npad)  # the N outputs kept, as blocks
        blocks = axis_blocks(c, npad, drop_alias=True)
        rows_of = f3 if callable(f3) else (lambda ys: f3[:, ys, : c + 1])
        ny_all = self.shape[1]
        line = npad * (c + 1) * 16  # bytes of one row (or plane) of lines, complex128
        step = max(1, _projector.CHUNK_BYTES // line)
        # z to FFT order, inverse, keep N planes (y stays in the layout's order)
        zt = np.empty((n, ny_all, c + 1), dtype=np.complex128)
        for y0 in range(0, ny_all, step):
            ys = slice(y0, min(y0 + step, ny_all))
            part = rows_of(ys)
            work = np.zeros((npad, ys.stop - ys.start, c + 1), dtype=np.complex128)
            for fz, lz in blocks:
                work[fz] = part[lz]
            del part
            work = scipy.fft.ifft(work, axis=0, workers=-1, overwrite_x=True)
            for to, fro in kept:
                zt[to, ys] = work[fro]
        # per block of planes: y to FFT order, inverse, keep N rows; then the
        # Hermitian x axis: real output, keep N columns; the gridding correction
        g = gridding_correction_1d(n, p)
        out = np.empty((n, n, n), dtype=np.float32)
        for z0 in range(0, n, step):
            zs = slice(z0, min(z0 + step, n))
            rows = np.zeros((zs.stop - zs.start, npad, c + 1), dtype=np.complex128)
            for fy, ly in blocks:
                rows[:, fy] = zt[zs, ly]
            rows = scipy.fft.ifft(rows, axis=1, workers=-1, overwrite_x=True)
            lines = np.empty((zs.stop - zs.start, n, c + 1), dtype=np.complex128)
            for to, fro in kept:
                lines[:, to] = rows[:, fro]
            del rows
            vol = scipy.fft.irfft(lines, n=npad, axis=2, workers=-1, overwrite_x=True)
            del lines
            corr = g[zs, None, None] * g[None, :, None]  # times g[x] below
            for to, fro in kept:
                out[zs, :, to] = vol[:, :, fro] / (corr * g[None, None, to])
        return out
