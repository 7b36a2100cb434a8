"""The local search's batch ops on the GPU (``engine/search_ops.py`` protocol).

:func:`.engine.search.local_search` with the GPU ``score_fn`` (a
:class:`CudaScoreFn`) binds each batch of particles once
(:meth:`CudaScoreFn.bind_batch`):

* the images and ``1/sigma2`` are uploaded once, and the CTFs too, or
  evaluated on the device from their parameters (:mod:`.cuda_ctf`, when the
  caller passes an :class:`.engine.ctf.CtfBatch`); kernel ``fold_weights``
  (``search_prep.cu``) folds them into the scoring weights over the half-plane
  pixels sorted by radius, so every stage's radius is a prefix of one table
  (folded once per radius);
* each stage's rotations ``A_cons R(v)`` and fulcrum terms are formed on the
  device from the rotation vectors (kernel ``candidate_rotations``,
  ``score_local``);
* each stage's grid is scored by ``phase_table`` + ``score_tiles`` into device
  memory and reduced there by ``grid_min_over_shifts`` /
  ``grid_min_over_rotations`` (``grid_reduce.cu``): only the (m, J) and
  (m, S) minima come back, not the (m, J, S) scores;
* the bound's projection power is kernel ``projection_power`` on the same
  sorted pixels, weighted by the folded weights on the device; only its
  weighted sums come back (kernel ``power_weighted_sums``, ``power_sums``).

Scores are float32 (as :mod:`.cuda_scoring`); the reductions add the float64
priors in double, in the host's order.
"""

from __future__ import annotations

import numpy as np

from ..engine.ctf import CtfBatch
from ..engine.scoring import _check_common, half_plane_pixels
from ..engine.search_ops import HostGrid
from .backend import batch_size_for, empty, free_memory, load_kernels, to_device
from .cuda_ctf import ctf_on_device, device_ctf_enabled
from .cuda_projector import device_volume
from .cuda_scoring import (
    _power_cuda,
    _score_cuda,
    bytes_per_particle,
    launch_phase_table,
    launch_score_tiles,
    variant_for,
)
from .host_staging import host_staging

__all__ = ["CudaScoreFn", "CudaBatchOps", "CudaGrid"]

_REDUCE_BLOCK = 64  # threads per block of the grid reductions
_BEST_THREADS = 128  # BEST_THREADS of grid_reduce.cu
_POWER_SUM_THREADS = 128  # POWER_SUM_THREADS of search_prep.cu


class CudaScoreFn:
    """The GPU ``score_fn``: :func:`.cuda_scoring._score_cuda` plus ``bind_batch``.

    ``power`` is the GPU ``power_fn`` (:func:`.cuda_scoring._power_cuda`); pass
    it as ``power_fn`` so that bound batches compute it from their own weights.
    """

    @property
    def evaluates_ctf(self) -> bool:
        """True: ``bind_batch`` takes CTF parameters (:class:`.engine.ctf.CtfBatch`)
        and evaluates them on the device, so callers need not compute the CTFs
        (``$LOCALREFINE_GPU_CTF=host``: False; :mod:`.cuda_ctf`)."""
        return device_ctf_enabled()

    def upload_buffers(self, nbytes: int):
        """``allocate(shape, dtype)`` for batches of up to ``nbytes`` of images, or None.

        Arrays in page-locked host memory (:mod:`.host_staging`), which the
        threads preparing the next batches may fill (no CUDA call) and which
        ``bind_batch`` then uploads without the driver's staging copy. Call it
        in the thread that searches (it allocates the buffers there once).
        None without buffers (:func:`.host_staging.host_staging`:
        ``$LOCALREFINE_GPU_PINNED=0``, batches over its limit, or a failed
        allocation).
        """
        staging = host_staging(nbytes)
        return None if staging is None else staging.lend

    def __call__(self, *args, **kwargs):
        return _score_cuda(*args, **kwargs)

    def power(self, projector, ctf, inv_sigma2, rotations, *, r_max_px):
        return _power_cuda(projector, ctf, inv_sigma2, rotations, r_max_px=r_max_px)

    def bind_batch(self, projector, images_f, ctf, inv_sigma2, *, r_max_px):
        return CudaBatchOps(projector, images_f, ctf, inv_sigma2, r_max_px=r_max_px)


class CudaGrid:
    """Scores of a padded pose grid in device memory, in particle chunks.

    ``chunks``: list of ``(start, stop, e)`` with ``e`` a (b, J, S) float32
    GPUArray for particles ``start:stop``.
    """

    def __init__(self, chunks, m: int, n_rot: int, n_shift: int):
        self.chunks, self.m, self.n_rot, self.n_shift = chunks, m, n_rot, n_shift
        module = load_kernels("grid_reduce.cu")
        self._over_shifts = module.get_function("grid_min_over_shifts")
        self._over_rotations = module.get_function("grid_min_over_rotations")
        self._best = module.get_function("grid_best")

    def _reduced(self, add_r, add_s):
        """Per chunk ``(start, stop, e_g, a_g, b_g, min_g, arg_g)``: the addends
        uploaded and the minima over the shifts (b, J) with their first
        arg-minima, on the device (kernel ``grid_min_over_shifts``)."""
        add_r = np.asarray(add_r, dtype=np.float64)
        add_s = np.asarray(add_s, dtype=np.float64)
        j_n, s_n = self.n_rot, self.n_shift
        for start, stop, e_g in self.chunks:
            b = stop - start
            a_g = to_device(add_r[start:stop], np.float64)
            b_g = to_device(add_s[start:stop], np.float64)
            min_g = empty((b, j_n), np.float64)
            arg_g = empty((b, j_n), np.int32)
            self._over_shifts(
                e_g, a_g, b_g, np.int32(b), np.int32(j_n), np.int32(s_n), min_g, arg_g,
                block=(_REDUCE_BLOCK, 1, 1), grid=(-(-j_n // _REDUCE_BLOCK), b),
            )  # fmt: skip
            yield start, stop, e_g, a_g, b_g, min_g, arg_g

    def best(self, add_r, add_s):
        """Per particle ``(j, s, value)`` of the first minimum (search_ops protocol).

        Reduced on the device (kernel ``grid_best`` over the minima over the
        shifts): only three numbers per particle come back.
        """
        j = np.empty(self.m, dtype=np.int64)
        s = np.empty(self.m, dtype=np.int64)
        value = np.empty(self.m)
        for start, stop, _, _, _, min_g, arg_g in self._reduced(add_r, add_s):
            b = stop - start
            j_g, s_g = empty(b, np.int32), empty(b, np.int32)
            v_g = empty(b, np.float64)
            self._best(
                min_g, arg_g, np.int32(b), np.int32(self.n_rot), j_g, s_g, v_g,
                block=(_BEST_THREADS, 1, 1), grid=(b, 1),
            )  # fmt: skip
            j[start:stop], s[start:stop] = j_g.get(), s_g.get()
            value[start:stop] = v_g.get()
        return j, s, value

    def minima(self, add_r, add_s):
        """Minima over the shifts (m, J) and over the rotations (m, S)."""
        j_n, s_n = self.n_rot, self.n_shift
        mins_j = np.empty((self.m, j_n))
        mins_s = np.empty((self.m, s_n))
        for start, stop, e_g, a_g, b_g, min_g, _ in self._reduced(add_r, add_s):
            b = stop - start
            out_g = empty((b, s_n), np.float64)
            self._over_rotations(
                e_g, a_g, b_g, np.int32(b), np.int32(j_n), np.int32(s_n), out_g,
                block=(_REDUCE_BLOCK, 1, 1), grid=(-(-s_n // _REDUCE_BLOCK), b),
            )  # fmt: skip
            mins_j[start:stop] = min_g.get()
            mins_s[start:stop] = out_g.get()
        return mins_j, mins_s

    def values(self, add_r, add_s):
        """All values (m, J, S) (downloads the scores)."""
        e = np.concatenate([e_g.get() for _, _, e_g in self.chunks])
        return HostGrid(e).values(np.asarray(add_r), np.asarray(add_s))


_sorted_cache: dict[tuple[int, float], tuple] = {}


def _sorted_pixels(n: int, r_max_px: float) -> tuple:
    """The half-plane pixels within ``r_max_px`` sorted by radius (cached per n, r).

    ``(k2, radius, kx_g, ky_g, flat_g, mult_g, shell_g)``: squared radii and
    radii (host, pixels) and the device tables of ``scoring.half_plane_pixels``
    in radius order, so that any smaller radius is a prefix. The same for
    every batch of a search (1.1 ms of host work and five uploads per batch
    at box 256 when made each time).
    """
    key = (int(n), float(r_max_px))
    hit = _sorted_cache.get(key)
    if hit is None:
        flat, kx, ky, mult, shell = half_plane_pixels(n, float(r_max_px))
        k2 = kx * kx + ky * ky
        order = np.argsort(k2, kind="stable")  # radius order: prefixes are discs
        k2 = k2[order]
        hit = _sorted_cache[key] = (
            k2, np.sqrt(k2),
            to_device(kx[order], np.float32), to_device(ky[order], np.float32),
            to_device(flat[order], np.int32), to_device(mult[order], np.float32),
            to_device(shell[order], np.int32),
        )  # fmt: skip
    return hit


def _check_room(m: int, n: int, nbytes_per_particle: int) -> None:
    """Fail clearly, before the batch is uploaded, when it cannot fit on the card.

    The batch's images and CTFs must fit in half the free device memory (the
    rest holds the volume, the weights and each stage's phase tables).
    """
    free = free_memory()
    need = m * nbytes_per_particle
    if need > free // 2:
        fit = max(1, (free // 2) // max(1, nbytes_per_particle))
        raise RuntimeError(
            f"a batch of {m} particles at box {n} needs {need / 2**30:.2f} GiB on "
            f"the GPU for its images and CTFs; {free / 2**30:.2f} GiB are free: "
            f"give --batch-size {fit} or less"
        )


class CudaBatchOps:
    """One batch of particles on the device (``engine/search_ops.py`` batch ops).

    Arguments as :func:`.cuda_scoring._score_cuda`'s first four; ``r_max_px`` is
    the search's largest radius (every scoring radius must be at most this).
    The images, CTFs and ``1/sigma2`` are uploaded once (float32); kernel
    ``fold_weights`` (``search_prep.cu``) folds them for each scoring radius.
    ``ctf`` may be a :class:`.engine.ctf.CtfBatch`: evaluated on the device
    (:func:`.cuda_ctf.ctf_on_device`), nothing computed or uploaded per pixel.
    """

    def __init__(self, projector, images_f, ctf, inv_sigma2, *, r_max_px: float):
        lazy = isinstance(ctf, CtfBatch)  # parameters, evaluated on the device
        images_f, ctf_values, inv_sigma2, self.m, self.n = _check_common(
            images_f, 1.0 if lazy else ctf, inv_sigma2, r_max_px
        )
        self.projector = projector
        self.r_max = float(r_max_px)
        self.vol = device_volume(projector)
        (self.k2, self.radius, self.kx_g, self.ky_g, self.flat_g, self.mult_g,
         self.shell_g) = _sorted_pixels(self.n, self.r_max)  # fmt: skip
        self.image_size = self.n * (self.n // 2 + 1)
        # a CTF / noise model shared by every particle is held once (stride 0)
        shared_ctf = not lazy and ctf_values.strides[0] == 0
        _check_room(self.m, self.n, self.image_size * (8 + (0 if shared_ctf else 4)))
        self.images_g = to_device(images_f.reshape(self.m, -1), np.complex64)
        self.ctf_g, self.ctf_stride = ctf_on_device(
            ctf if lazy else ctf_values, self.m, self.n
        )
        shared_sigma = inv_sigma2.strides[0] == 0
        self.sigma_stride = 0 if shared_sigma else inv_sigma2.shape[1]
        self.sigma_g = to_device(
            inv_sigma2[:1] if shared_sigma else inv_sigma2, np.float32
        )
        self._cache: dict = {}
        prep = load_kernels("search_prep.cu")
        self._fold = prep.get_function("fold_weights")
        self._power = prep.get_function("projection_power")
        self._power_sums = prep.get_function("power_weighted_sums")
        self._rotations = prep.get_function("candidate_rotations")

    def insert_at_poses(self, bp, rotations, origins_px, weights=None, *, ctf=True):
        """Insert this batch's resident images into ``bp`` at their poses.

        :func:`.reconstruct.insert_at_poses` on the device for a
        :class:`.cuda_backprojector.CudaBackProjector`: the images and CTFs
        uploaded for the search are inserted (``ctf=False``: without CTF),
        shifted by ``origins_px`` on the GPU; nothing is uploaded again.
        ``rotations`` (m, 3, 3) or (m, k, 3, 3), ``origins_px`` (m, 2) or
        (m, k, 2), ``weights`` (m, k) or None.
        """
        bp.insert_resident(
            self.images_g, self.ctf_g if ctf else None, self.ctf_stride,
            rotations, origins_px, weights,
        )  # fmt: skip

    def close(self) -> None:
        """Free the batch's device arrays (the search calls it when the batch is done)."""
        self._cache.clear()
        for name in ("images_g", "ctf_g", "sigma_g", "kx_g", "ky_g", "flat_g",
                     "mult_g", "shell_g"):  # fmt: skip
            setattr(self, name, None)

    def _npix(self, r_max_px: float) -> int:
        """Pixels within ``r_max_px`` (the same set as ``half_plane_pixels``)."""
        if float(r_max_px) > self.r_max:
            raise ValueError(
                f"scoring radius {r_max_px} exceeds the bound batch's {self.r_max}"
            )
        return int(np.searchsorted(self.k2, float(r_max_px) ** 2, side="right"))

    def _weights(self, npix: int, start: int, stop: int):
        """``(Y, w1)`` of particles ``start:stop`` over the first ``npix`` pixels (cached)."""

        key = (npix, start, stop)
        hit = self._cache.get(key)
        if hit is None:
            b = stop - start
            y_g = empty((b, npix), np.complex64)
            w1_g = empty((b, npix), np.float32)
            self._fold(
                self.images_g, self.ctf_g, np.int32(self.ctf_stride), self.sigma_g,
                np.int32(self.sigma_stride), self.flat_g, self.mult_g, self.shell_g,
                np.int32(start), np.int32(b), np.int32(npix), np.int32(self.image_size),
                w1_g, y_g, block=(128, 1, 1), grid=((npix + 127) // 128, b),
            )  # fmt: skip
            hit = self._cache[key] = (y_g, w1_g)
        return hit

    def score(self, rotations, shifts_px, *, r_max_px, rotation_shifts_px, counts=None):
        """Score the padded grid of the given poses; returns a :class:`CudaGrid`."""
        n_rot = rotations.shape[1]

        def poses(start, stop):
            b = stop - start
            rot_g = to_device(rotations[start:stop].reshape(b, n_rot, 9), np.float32)
            rs_g = None
            if rotation_shifts_px is not None:
                rs_g = to_device(rotation_shifts_px[start:stop], np.float32)
            return rot_g, rs_g

        return self._score(poses, n_rot, shifts_px, r_max_px)

    def score_local(
        self, a_cons, rotvecs_deg, shifts_px, *, fulcrum_px, r_max_px, counts=None
    ):
        """Score the padded grid of rotations ``A_cons R(v)`` about the fulcrum.

        The rotations and the fulcrum term are formed on the device (kernel
        ``candidate_rotations``, in double) from the (m, 3, 3) consensus
        matrices and the (m, J, 3) rotation vectors: only those are uploaded.
        """

        n_rot = rotvecs_deg.shape[1]
        a_cons = np.asarray(a_cons, dtype=np.float64)
        rotvecs_deg = np.asarray(rotvecs_deg, dtype=np.float64)
        f_g = to_device(np.asarray(fulcrum_px, dtype=np.float64).reshape(3), np.float64)

        def poses(start, stop):
            b = stop - start
            rot_g = empty((b, n_rot, 9), np.float32)
            rs_g = empty((b, n_rot, 2), np.float32)
            self._rotations(
                to_device(a_cons[start:stop].reshape(b, 9), np.float64),
                to_device(rotvecs_deg[start:stop], np.float64), np.int32(b),
                np.int32(n_rot), f_g, rot_g, rs_g,
                block=(128, 1, 1), grid=((n_rot + 127) // 128, b),
            )  # fmt: skip
            return rot_g, rs_g

        return self._score(poses, n_rot, shifts_px, r_max_px)

    def _score(self, poses, n_rot: int, shifts_px, r_max_px) -> CudaGrid:
        """Score on the device, in particle chunks that fit; ``poses(start, stop)``
        gives the chunk's device rotations (b, J, 9) and fulcrum terms (or None)."""

        m = self.m
        n_shift = shifts_px.shape[1]
        npix = self._npix(r_max_px)
        batch = batch_size_for(
            bytes_per_particle(npix, n_rot, n_shift),
            fixed_bytes=self.vol.nbytes,
            cap=65535,
        )
        chunks = []
        for start in range(0, m, batch):
            stop = min(start + batch, m)
            b = stop - start
            y_g, w1_g = self._weights(npix, start, stop)
            z_g = empty((b, n_shift, npix), np.complex64)
            launch_phase_table(
                y_g, to_device(shifts_px[start:stop], np.float32), self.kx_g, self.ky_g,
                b=b, n_shift=n_shift, npix=npix, n=self.n, z_g=z_g,
            )  # fmt: skip
            rot_g, rs_g = poses(start, stop)
            e_g = empty((b, n_rot, n_shift), np.float32)
            launch_score_tiles(
                variant_for(n_shift), self.projector, rot_g, rs_g,
                self.kx_g, self.ky_g, w1_g, z_g, e_g,
                b=b, n_rot=n_rot, n_shift=n_shift, npix=npix, n=self.n,
                r_max_px=self.r_max,  # one set of cells serves every stage
            )  # fmt: skip
            chunks.append((start, stop, e_g))
        return CudaGrid(chunks, m, n_rot, n_shift)

    def _power_g(self, rotations, npix: int):
        """The bound's power (m, npix) float32 on the device (kernel ``projection_power``)."""

        m = self.m
        _, w1_g = self._weights(npix, 0, m)
        rot_g = to_device(
            np.asarray(rotations, dtype=np.float64).reshape(m, 9), np.float32
        )
        out_g = empty((m, npix), np.float32)
        self._power(
            self.vol, np.int32(self.projector.c), np.float32(self.projector.padding),
            rot_g, np.int32(m), self.kx_g, self.ky_g, w1_g, np.int32(npix), out_g,
            block=(128, 1, 1), grid=((npix + 127) // 128, m),
        )  # fmt: skip
        return out_g

    def power(self, rotations, *, r_max_px):
        """The bound's power (m, P) and ``|k|`` (P,), pixels in radius order.

        ``mult c^2 |P|^2 / sigma2`` per pixel (:func:`.scoring.weighted_projection_power`,
        whose pixel order differs; the search uses only sums over radius masks),
        computed in float32 by kernel ``projection_power``.
        """
        npix = self._npix(r_max_px)
        power_g = self._power_g(rotations, npix)
        return power_g.get().astype(np.float64), self.radius[:npix]

    def power_sums(self, rotations, weights, *, r_max_px):
        """Weighted sums of the bound's power (m, W) (``engine/search_ops.py``).

        The power stays on the device; kernel ``power_weighted_sums`` adds
        ``power * weights(|k|)`` over the pixels in float64, and only the (m, W)
        sums come back.
        """

        npix = self._npix(r_max_px)
        w = np.ascontiguousarray(weights(self.radius[:npix]), dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != npix:
            raise ValueError(f"weights must have shape (W, {npix}); got {w.shape}")
        power_g = self._power_g(rotations, npix)
        out_g = empty((self.m, w.shape[0]), np.float64)
        self._power_sums(
            power_g, np.int32(self.m), np.int32(npix), to_device(w, np.float64),
            np.int32(w.shape[0]), out_g,
            block=(_POWER_SUM_THREADS, 1, 1), grid=(self.m, w.shape[0]),
        )  # fmt: skip
        return out_g.get()
