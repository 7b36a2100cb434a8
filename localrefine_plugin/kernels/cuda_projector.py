"""GPU slice extraction: the twin of :meth:`.engine.projector.FourierProjector.project`.

Kernel ``project_slices`` in ``projector.cu`` reads the padded half-space
Fourier volume of :class:`~localrefine_plugin.engine.projector.FourierProjector`
(same array, uploaded once as complex64) with plain loads and trilinear
interpolation; one thread per (pixel, image), all images of a batch in one
launch. Layout and conventions: ``localrefine_common.h`` and
``engine/projector.py``.

Three entry points with one signature (STYLE.md, GPU kernels):
``_project_host`` (the NumPy engine), ``_project_cuda`` and ``project``, which
dispatches on ``device`` and logs which path ran. :class:`CudaProjector` is a
drop-in for ``FourierProjector`` where only ``.project`` is needed.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from ..engine.projector import FourierProjector, _pixels_within
from .backend import (
    batch_size_for,
    empty,
    load_kernels,
    select_device,
    to_device,
    zeros,
)

__all__ = [
    "CudaProjector",
    "project",
    "device_volume",
    "device_cells",
    "cells_radius",
    "device_pixels",
]

log = logging.getLogger(__name__)

_THREADS = 128
_volumes: dict[int, object] = {}
_cells: dict[tuple[int, int], object] = {}
_pixels: dict[tuple[int, float], tuple] = {}


def device_volume(projector: FourierProjector):
    """The projector's padded volume on the GPU (complex64), uploaded once per projector.

    The upload is cached while ``projector`` lives (keyed by its identity; its
    ``data`` is read-only, so the copy cannot go stale).
    """

    def upload():
        load_kernels("projector.cu")  # makes the context current
        return to_device(projector.data, np.complex64)

    return _per_projector(_volumes, id(projector), projector, upload)


def _per_projector(cache: dict, key, projector: FourierProjector, make):
    """``cache[key]``, made by ``make()`` at first use and dropped with ``projector``."""
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = make()
        weakref.finalize(projector, cache.pop, key, None)
    return hit


def cells_radius(projector: FourierProjector, r_max_px: float) -> int:
    """Radius (padded voxels) of the cells that serve samples within ``r_max_px``.

    ``floor(padding * r_max_px) + 2``, at most the volume's ``c``: every
    sample of a pixel with ``|k| <= r_max_px`` (cycles per box) then lies at
    ``|q| <= rc - 1`` (padded voxels), where ``lr_sample_cells`` equals
    ``lr_sample`` (``localrefine_common.h``).
    """
    return int(min(projector.c, np.floor(projector.padding * float(r_max_px)) + 2))


def device_cells(projector: FourierProjector, rc: int):
    """The projector's volume as 2x2x2 cells of radius ``rc`` on the GPU (cached).

    Kernel ``build_cells`` (``projector.cu``) gathers, for every voxel of the
    padded layout of radius ``rc`` (shape (2rc+2, 2rc+2, rc+2)), its 8
    trilinear corners into 64 contiguous bytes (float32 (..., 16)): a sample
    then reads 2 aligned sectors (``lr_sample_cells``). Eight times the bytes
    of the volume's part within ``rc``; cached while ``projector`` lives, per
    ``rc`` (:func:`cells_radius`).
    """
    rc = int(rc)
    if not 1 <= rc <= projector.c:
        raise ValueError(f"cells radius must be in [1, {projector.c}]; got {rc}")

    def build():
        vol = device_volume(projector)
        n_cells = (2 * rc + 2) ** 2 * (rc + 2)
        cells = empty((n_cells, 16), np.float32)
        load_kernels("projector.cu").get_function("build_cells")(
            vol, np.int32(projector.c), np.int32(rc), cells,
            block=(_THREADS, 1, 1), grid=(-(-n_cells // _THREADS), 1),
        )  # fmt: skip
        return cells

    return _per_projector(_cells, (id(projector), rc), projector, build)


def device_pixels(n: int, r_max_px: float) -> tuple:
    """Pixels of the half-plane within ``r_max_px`` on the GPU, cached per (n, r).

    Returns ``(kx, ky, flat, count)``: float32 frequencies (cycles per box),
    int32 flat indices into the (N, N//2+1) layout, and the pixel count. The
    set is the engine's (``projector._pixels_within``): ``kx^2 + ky^2 <= r^2``.
    """

    key = (int(n), float(r_max_px))
    hit = _pixels.get(key)
    if hit is None:
        flat, kx, ky = _pixels_within(n, r_max_px)
        hit = (
            to_device(kx, np.float32),
            to_device(ky, np.float32),
            to_device(flat, np.int32),
            int(flat.size),
        )
        _pixels[key] = hit
    return hit


def _radius(projector: FourierProjector, r_max_px: float | None) -> float:
    return (
        projector.r_max_px
        if r_max_px is None
        else min(float(r_max_px), projector.r_max_px)
    )


def _project_host(
    projector: FourierProjector, rotations: np.ndarray, *, r_max_px: float | None = None
) -> np.ndarray:
    """The NumPy engine's ``projector.project`` (reference for the GPU path)."""
    return projector.project(rotations, r_max_px=r_max_px)


def _project_cuda(
    projector: FourierProjector, rotations: np.ndarray, *, r_max_px: float | None = None
) -> np.ndarray:
    """Projections on the GPU; same arguments and result as :func:`_project_host`.

    Parameters
    ----------
    projector : FourierProjector
        Holds the padded volume (uploaded once, see :func:`device_volume`).
    rotations : ndarray, shape (m, 3, 3) or (3, 3)
        RELION matrices ``A``.
    r_max_px : float, optional
        Zero beyond this radius (cycles per box); default the projector's.

    Returns
    -------
    ndarray, shape (m, N, N//2+1) (or (N, N//2+1)), ``projector.dtype``
        Computed in float32 on the GPU.
    """

    rotations = np.asarray(rotations, dtype=np.float64)
    single = rotations.ndim == 2
    rot = rotations.reshape(-1, 9).astype(np.float32)
    m, n = rot.shape[0], projector.n
    stride = n * (n // 2 + 1)
    module = load_kernels("projector.cu")
    kernel = module.get_function("project_slices")
    vol = device_volume(projector)
    kx, ky, flat, npix = device_pixels(n, _radius(projector, r_max_px))
    out = np.empty((m, stride), dtype=np.complex64)
    batch = batch_size_for(stride * 8 + 36, fixed_bytes=0, cap=65535)
    for start in range(0, m, batch):
        stop = min(start + batch, m)
        rot_g = to_device(rot[start:stop], np.float32)
        out_g = zeros((stop - start, stride), np.complex64)
        grid = ((npix + _THREADS - 1) // _THREADS, stop - start)
        kernel(
            vol, np.int32(projector.c), np.float32(projector.padding),
            rot_g, np.int32(stop - start), kx, ky, flat, np.int32(npix),
            out_g, np.int32(stride),
            block=(_THREADS, 1, 1), grid=grid,
        )  # fmt: skip
        out_g.get(ary=out[start:stop])
    out = out.reshape(m, n, n // 2 + 1).astype(projector.dtype, copy=False)
    return out[0] if single else out


def project(
    projector: FourierProjector,
    rotations: np.ndarray,
    *,
    r_max_px: float | None = None,
    device: str = "auto",
) -> np.ndarray:
    """Central slices on ``device`` (``auto | cpu | cuda``); logs which path ran.

    Same arguments and result as :meth:`FourierProjector.project`.
    """
    if select_device(device) == "cuda":
        log.debug("project: CUDA path (%d images)", np.asarray(rotations).size // 9)
        return _project_cuda(projector, rotations, r_max_px=r_max_px)
    log.debug("project: CPU path (%d images)", np.asarray(rotations).size // 9)
    return _project_host(projector, rotations, r_max_px=r_max_px)


class CudaProjector:
    """GPU twin of :class:`FourierProjector` for ``.project`` (same signature).

    Parameters
    ----------
    source : FourierProjector or ndarray (N, N, N)
        A projector, or a map from which one is made (``padding``,
        ``r_max_px`` as in :class:`FourierProjector`).

    Attributes
    ----------
    host : FourierProjector
        The CPU projector whose volume lives on the GPU.
    n, padding, r_max_px, c, data, dtype
        As in :class:`FourierProjector`.
    """

    def __init__(
        self, source, *, padding: int = 2, r_max_px: float | None = None
    ) -> None:
        if isinstance(source, FourierProjector):
            self.host = source
        else:
            self.host = FourierProjector(source, padding=padding, r_max_px=r_max_px)
        for name in ("n", "padding", "r_max_px", "c", "data", "dtype"):
            setattr(self, name, getattr(self.host, name))
        device_volume(self.host)

    def sample(self, freqs: np.ndarray) -> np.ndarray:
        """CPU :meth:`FourierProjector.sample` (arbitrary points stay on the host)."""
        return self.host.sample(freqs)

    def project(
        self,
        rotations: np.ndarray,
        *,
        r_max_px: float | None = None,
        batch_size: int = 0,
    ) -> np.ndarray:
        """As :meth:`FourierProjector.project`, on the GPU (``batch_size`` is ignored:
        batches are sized to the card's memory)."""
        return _project_cuda(self.host, rotations, r_max_px=r_max_px)
