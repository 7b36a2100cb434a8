"""GPU back-projection: the twin of :class:`.engine.backprojector.BackProjector`.

Kernel ``backproject_f32`` (or ``_f64``, ``_f32x4``) in ``backprojector.cu`` inserts every
pixel of a batch of images with one thread per (pixel, image) and
``atomicAdd`` into the 8 trilinear corners of the padded accumulators (layout
of :class:`~localrefine_plugin.engine.backprojector.BackProjector`). Atomics
rather than a gather scheme: neighbouring pixels of one image land on
neighbouring voxels, images of a batch rarely collide on the same voxel at
the same time, and a gather has to test, for every voxel, every image of the
batch. ``scheme="gather"`` (kernel ``backproject_gather_f32``: one thread per
voxel, no atomics, float32) is that alternative, for the measurement:
``benchmarks/bench_gpu.py`` times the insertion with float32, float32x4 and
float64 atomics and with the gather (docs/gpu.md).

:class:`CudaBackProjector` subclasses the engine's class: ``insert`` runs on
the GPU, and reading ``data`` or ``weight`` (as ``reconstruct``, ``add`` and
``copy`` do) first adds the device accumulators into the float64 host arrays.
Entry points with one signature: ``_insert_host``, ``_insert_cuda`` and
``insert`` (dispatch on ``device``, logs which path ran).
"""

from __future__ import annotations

import logging

import numpy as np

from ..engine.backprojector import BackProjector
from .backend import batch_size_for, load_kernels, select_device, to_device, zeros

__all__ = ["CudaBackProjector", "insert"]

log = logging.getLogger(__name__)

_THREADS = 128
#: accumulator kind -> insertion kernel (backprojector.cu)
_KERNELS = {
    "float32": "backproject_f32",
    "float32x4": "backproject_f32x4",
    "float64": "backproject_f64",
}
#: insertion schemes: atomics (one thread per pixel and image) or a gather (one
#: thread per voxel; float32 accumulators)
SCHEMES = ("atomic", "gather")


class CudaBackProjector(BackProjector):
    """:class:`BackProjector` whose insertions run on the GPU.

    Parameters
    ----------
    n : int
        Box size ``N`` (pixels).
    padding : int
        Oversampling factor (RELION's default 2).
    r_max_px : float, optional
        Largest frequency inserted (cycles per box); default ``N // 2``.
    accumulator : {"float32", "float32x4", "float64"}
        Precision and layout of the device accumulators (the host copies are
        float64). float32 halves the memory and uses the fast native float
        atomics; float32x4 keeps (re, im, weight, unused) of a voxel in one
        16-byte float4, added by one vector atomic per corner on sm_90 (three
        scalar ones on older cards), a third more memory than float32.
    scheme : {"atomic", "gather"}
        ``atomic``: one thread per (pixel, image) adds into the pixel's 8
        corners; ``gather``: one thread per voxel sums what the images of a
        launch add there (float32 accumulators only; the same sums in
        another order).

    Attributes
    ----------
    data, weight
        As in :class:`BackProjector` (reading them synchronises with the GPU).
    """

    def __init__(
        self,
        n: int,
        *,
        padding: int = 2,
        r_max_px: float | None = None,
        accumulator: str = "float32",
        scheme: str = "atomic",
    ) -> None:
        if accumulator not in _KERNELS:
            raise ValueError(
                f"accumulator must be one of {', '.join(_KERNELS)}; got {accumulator!r}"
            )
        if scheme not in SCHEMES:
            raise ValueError(
                f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}"
            )
        if scheme == "gather" and accumulator != "float32":
            raise ValueError(
                f"the gather scheme accumulates in float32; got accumulator={accumulator!r}"
            )
        self.accumulator, self.scheme = accumulator, scheme
        # device accumulators: (data (2 size,), weight (size,)) or (acc (4 size,),)
        self._dev = None
        super().__init__(n, padding=padding, r_max_px=r_max_px)

    # reading data/weight flushes the device accumulators into the host arrays
    @property
    def data(self) -> np.ndarray:
        self.flush()
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value

    @property
    def weight(self) -> np.ndarray:
        self.flush()
        return self._weight

    @weight.setter
    def weight(self, value: np.ndarray) -> None:
        self._weight = value

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of :attr:`data` and :attr:`weight`."""
        return self._weight.shape

    def flush(self) -> None:
        """Add the device accumulators into the host arrays and zero them."""
        if self._dev is None:
            return
        # added in place, widened element by element (no float64 or complex
        # copies of the box: fresh arrays of its size cost more than the adds)
        if not (self._data.flags.c_contiguous and self._weight.flags.c_contiguous):
            raise RuntimeError("the host accumulators must be C-contiguous arrays")
        data = self._data.reshape(-1).view(np.float64).reshape(-1, 2)  # re, im views
        weight = self._weight.reshape(-1)
        if self.accumulator == "float32x4":
            a = self._dev[0].get().reshape(-1, 4)  # re, im, weight, (unused)
            d, w = a[:, :2], a[:, 2]
        else:
            data_g, weight_g = self._dev
            d, w = data_g.get().reshape(-1, 2), weight_g.get().reshape(-1)
        np.add(data, d, out=data)
        np.add(weight, w, out=weight)
        self._dev = None  # fresh zeroed buffers at the next insert

    def _device_accumulators(self) -> tuple:
        """The device accumulators, zeroed at first use (the kernel's last arguments)."""
        if self._dev is None:
            size = self._weight.size
            if self.accumulator == "float32x4":
                self._dev = (zeros(4 * size, np.float32),)
            else:
                dtype = np.dtype(self.accumulator)
                self._dev = (zeros(2 * size, dtype), zeros(size, dtype))
        return self._dev

    @staticmethod
    def synchronize() -> None:
        """Wait until the insertions queued so far are done (for timing)."""
        import pycuda.driver as cuda

        cuda.Context.synchronize()

    def insert(
        self,
        f_images: np.ndarray,
        rotations: np.ndarray,
        *,
        ctf: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        """As :meth:`BackProjector.insert`, on the GPU (float32 arithmetic).

        Parameters
        ----------
        f_images : ndarray, shape (m, N, N//2+1), complex
            Centred image transforms (Fourier layout of ``engine/fourier.py``).
        rotations : ndarray, shape (m, 3, 3)
            RELION matrices ``A``.
        ctf : ndarray, shape (m, N, N//2+1) or (N, N//2+1), optional
        weights : ndarray, shape (m,), optional
        """
        f_images = np.asarray(f_images)
        if f_images.ndim == 2:
            f_images = f_images[None]
        m, n = f_images.shape[0], self.n
        if f_images.shape[1:] != (n, n // 2 + 1):
            raise ValueError(
                f"f_images must have shape (m, {n}, {n // 2 + 1}); got {f_images.shape}"
            )
        rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
        if rotations.shape[0] != m:
            raise ValueError(f"{m} images but {rotations.shape[0]} rotations")
        stride = n * (n // 2 + 1)
        if ctf is not None:
            ctf = np.broadcast_to(np.asarray(ctf, dtype=np.float32), (m, n, n // 2 + 1))
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32).reshape(m)
        batch = batch_size_for(stride * 12 + 64, fixed_bytes=0, cap=65535)
        for start in range(0, m, batch):
            sl = slice(start, min(start + batch, m))
            self._launch(
                to_device(f_images[sl], np.complex64),
                None if ctf is None else to_device(ctf[sl], np.float32),
                stride,
                rotations[sl],
                weights=None if weights is None else weights[sl],
            )
        self.n_inserted += m

    def insert_resident(
        self,
        images_g,
        ctf_g,
        ctf_stride: int,
        rotations: np.ndarray,
        shifts_px: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> None:
        """Insert images already on the GPU at one or ``k`` poses each, shifting
        them on the way (no upload of images or CTFs).

        Parameters
        ----------
        images_g : GPUArray, shape (m, N * (N//2+1)), complex64
            Image transforms in the Fourier layout of ``engine/fourier.py``, not
            yet centred (e.g. the search's batch, ``CudaBatchOps.images_g``).
        ctf_g : GPUArray, float32, or None
            CTFs, ``ctf_stride`` values apart (0: one CTF for every image);
            None inserts without CTF.
        rotations : ndarray, shape (m, 3, 3) or (m, k, 3, 3)
            RELION matrices ``A``.
        shifts_px : ndarray, shape (m, 2) or (m, k, 2)
            Origins ``(x, y)`` in pixels, RELION's sign: as
            :func:`.reconstruct.insert_at_poses`, the content is shifted by
            ``+origin`` (the phase factor in float32 on the GPU).
        weights : ndarray, shape (m, k), optional
            Pose weights (marginalisation); without them one pose per image.
        """
        n = self.n
        rotations = np.asarray(rotations, dtype=np.float64)
        m = rotations.shape[0]
        k = 1 if rotations.ndim == 3 else rotations.shape[1]
        if images_g.shape != (m, n * (n // 2 + 1)):
            raise ValueError(
                f"images_g must have shape ({m}, {n * (n // 2 + 1)}); "
                f"got {images_g.shape}"
            )
        rotations = rotations.reshape(m * k, 3, 3)
        shifts = np.asarray(shifts_px, dtype=np.float64).reshape(m * k, 2)
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32).reshape(m * k)
        image_of = np.repeat(np.arange(m, dtype=np.int32), k)  # pose-major per image
        batch = 65535  # the grid's y extent; nothing is uploaded per image
        for start in range(0, m * k, batch):
            sl = slice(start, min(start + batch, m * k))
            self._launch(
                images_g,
                ctf_g,
                ctf_stride,
                rotations[sl],
                weights=None if weights is None else weights[sl],
                image_of=image_of[sl],
                shifts=shifts[sl],
            )
        self.n_inserted += m * k  # insertions, as insert_at_poses counts them

    def _launch(
        self, f_g, c_g, ctf_stride, rotations, *, weights=None, image_of=None,
        shifts=None,
    ) -> None:  # fmt: skip
        """One launch of the insertion kernel: ``len(rotations)`` insertions of
        the images of ``f_g`` (image ``image_of[i]``, else ``i``), shifted by
        ``shifts`` (pixels) when given."""
        n = self.n
        b = len(rotations)
        acc_g = self._device_accumulators()
        kx_g, ky_g, src_g, npix = self._pixel_table()

        def optional(a, dtype):
            return np.intp(0) if a is None else to_device(a, dtype)

        # the arguments both schemes take first (the kernels' shared inputs)
        head = (
            f_g, np.intp(0) if c_g is None else c_g, np.int32(ctf_stride),
            optional(weights, np.float32), optional(image_of, np.int32),
            optional(shifts, np.float32), np.int32(n),
            to_device(np.asarray(rotations).reshape(b, 9), np.float32), np.int32(b),
        )  # fmt: skip
        module = load_kernels("backprojector.cu")
        if self.scheme == "gather":
            # voxels within padding r_max + 2 >= the farthest corner (sqrt(3) out)
            rv = int(np.floor(self.padding * self.r_max_px)) + 2
            n_vox = (rv + 1) * (2 * rv + 1) ** 2
            module.get_function("backproject_gather_f32")(
                *head, kx_g, ky_g, self._pixel_index(), np.int32(n * (n // 2 + 1)),
                np.int32(self.c), np.float32(self.padding), np.int32(rv), *acc_g,
                block=(_THREADS, 1, 1), grid=((n_vox + _THREADS - 1) // _THREADS, 1),
            )  # fmt: skip
        else:
            module.get_function(_KERNELS[self.accumulator])(
                *head, kx_g, ky_g, src_g, np.int32(npix), np.int32(n * (n // 2 + 1)),
                np.int32(self.c), np.float32(self.padding), *acc_g,
                block=(_THREADS, 1, 1), grid=((npix + _THREADS - 1) // _THREADS, b),
            )  # fmt: skip

    def _pixel_index(self):
        """(N, N//2+1) int32 on the GPU: each half-plane pixel's index in the
        insertion list (:meth:`_pixel_table`), -1 where it is not inserted."""
        index = getattr(self, "_pixel_index_g", None)
        if index is None:
            n = self.n
            table = np.full(n * (n // 2 + 1), -1, dtype=np.int32)
            table[self._flat] = np.arange(self._flat.size, dtype=np.int32)
            index = self._pixel_index_g = to_device(table, np.int32)
        return index

    def _pixel_table(self):
        """The engine's insertion pixels (``kx^2 + ky^2 <= r_max^2``) on the GPU."""
        table = getattr(self, "_pixels_g", None)
        if table is None:
            table = (
                to_device(self._kx, np.float32),
                to_device(self._ky, np.float32),
                to_device(self._flat, np.int32),
                int(self._flat.size),
            )
            self._pixels_g = table
        return table


def _insert_host(
    bp: BackProjector, f_images, rotations, *, ctf=None, weights=None
) -> None:
    """Insert with the NumPy engine (``BackProjector.insert`` of the CPU class)."""
    BackProjector.insert(bp, f_images, rotations, ctf=ctf, weights=weights)


def _insert_cuda(
    bp: CudaBackProjector, f_images, rotations, *, ctf=None, weights=None
) -> None:
    """Insert on the GPU (``bp`` must be a :class:`CudaBackProjector`)."""
    CudaBackProjector.insert(bp, f_images, rotations, ctf=ctf, weights=weights)


def insert(
    bp: BackProjector,
    f_images,
    rotations,
    *,
    ctf=None,
    weights=None,
    device: str = "auto",
) -> None:
    """Insert images into ``bp`` on ``device`` (``auto | cpu | cuda``); logs the path.

    The GPU path needs a :class:`CudaBackProjector` (the CPU path accepts either).
    """
    if isinstance(bp, CudaBackProjector) and select_device(device) == "cuda":
        log.debug("insert: CUDA path (%d images)", np.shape(rotations)[0])
        _insert_cuda(bp, f_images, rotations, ctf=ctf, weights=weights)
    else:
        log.debug("insert: CPU path (%d images)", np.shape(rotations)[0])
        _insert_host(bp, f_images, rotations, ctf=ctf, weights=weights)
