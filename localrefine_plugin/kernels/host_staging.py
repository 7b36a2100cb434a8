"""Page-locked host buffers for the next batches' images (uploads without staging).

An upload from ordinary (pageable) host memory makes the driver copy the data
through its own page-locked buffers, chunk by chunk, in the calling thread;
from page-locked memory the copy engine reads it directly. The search thread
uploads every batch's images (264 KB per particle at box 256), so the refine
command has the threads that read and transform the next batch write the
transforms into page-locked buffers (:func:`.engine.reconstruct.read_batch`'s
``allocate``): that copy happens beside the search, and the search's upload
is a plain DMA.

Page-locked memory must be allocated in a thread where the CUDA context is
current, and the preparing threads hold none (the GPU's context lives in the
search thread: ``engine/search_ops.py``). So :class:`HostStaging` allocates a
few buffers once, in that thread, and *lends* them to any thread without a
CUDA call: :meth:`HostStaging.lend` returns an array in a free buffer, which
goes back to the pool when every view of that array is gone; when none is
free, or the array would not fit, it returns ordinary memory (correct, only
slower). ``$LOCALREFINE_GPU_PINNED=0`` turns the buffers off (for
measurements).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import weakref

import numpy as np

from .backend import ensure_context

__all__ = ["PINNED_ENV", "HostStaging", "host_staging"]

log = logging.getLogger(__name__)

#: environment variable: ``0`` gives the preparing threads ordinary memory
PINNED_ENV = "LOCALREFINE_GPU_PINNED"
#: page-locked bytes the buffers may take in all (the rest of the host's
#: memory stays pageable; larger batches get ordinary memory)
MAX_PINNED_BYTES = 1 << 30

_lock = threading.Lock()
_cache: dict = {}


class HostStaging:
    """``count`` page-locked host buffers of ``nbytes`` each, lent to any thread.

    Create it in the thread that holds the CUDA context (it allocates with
    ``pycuda.driver.pagelocked_empty``); :meth:`lend` may be called from any.
    ``lent`` and ``fallbacks`` count the arrays served from the buffers and
    from ordinary memory.
    """

    def __init__(self, nbytes: int, count: int):
        import pycuda.driver as cuda

        ensure_context()
        self.nbytes, self.count = int(nbytes), int(count)
        self._free = [
            cuda.pagelocked_empty(self.nbytes, np.uint8) for _ in range(self.count)
        ]
        self._lock = threading.Lock()
        self.lent = self.fallbacks = 0

    def lend(self, shape, dtype) -> np.ndarray:
        """An uninitialised C-ordered array of ``shape`` and ``dtype``.

        In a free page-locked buffer when one is free and the array fits (the
        buffer returns to the pool when the array and all its views are gone),
        else in ordinary memory. No CUDA call: any thread may ask.
        """
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        with self._lock:
            fits = size * dtype.itemsize <= self.nbytes
            buf = self._free.pop() if fits and self._free else None
            if buf is None:
                self.fallbacks += 1
            else:
                self.lent += 1
        if buf is None:
            return np.empty(shape, dtype)
        # a fresh owner object per loan: NumPy views keep it alive, so its
        # finaliser runs only when the last view of this loan is gone
        owner = (ctypes.c_char * self.nbytes).from_address(buf.ctypes.data)
        weakref.finalize(owner, self._give_back, buf)
        return np.frombuffer(owner, dtype=dtype, count=size).reshape(shape)

    def _give_back(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)

    @property
    def free(self) -> int:
        """Buffers not lent out now."""
        with self._lock:
            return len(self._free)


def _enabled() -> bool:
    return os.environ.get(PINNED_ENV, "1").strip() != "0"


def host_staging(nbytes: int, count: int = 3) -> HostStaging | None:
    """The process's page-locked buffers for arrays of up to ``nbytes`` (or None).

    Kept for the process and grown when a larger batch asks (the old buffers
    are dropped once no loan holds them). None with ``$LOCALREFINE_GPU_PINNED=0``
    or when ``count`` buffers would exceed :data:`MAX_PINNED_BYTES`. Call it
    in the thread that holds the CUDA context. Three buffers serve the refine
    command: the batch being searched, the next one being prepared, and the
    previous one, whose arrays its caller may still hold.
    """
    if not _enabled():
        return None
    if int(nbytes) * int(count) > MAX_PINNED_BYTES:
        log.info(
            "batches of %.0f MB: images staged in ordinary memory (page-locked "
            "buffers limited to %.0f MB in all)",
            nbytes / 1e6,
            MAX_PINNED_BYTES / 1e6,
        )
        return None
    with _lock:
        staging = _cache.get("staging")
        if staging is None or staging.nbytes < nbytes or staging.count < count:
            if not _cache:
                import atexit

                # free the buffers while the context is still current (atexit
                # runs in reverse order; ensure_context registered its pop first)
                atexit.register(_cache.clear)
            try:
                staging = HostStaging(nbytes, count)
            except Exception as exc:  # e.g. the host's page-locked memory exhausted
                log.warning(
                    "no page-locked buffers (%s): the images are uploaded from "
                    "ordinary memory",
                    exc,
                )
                return None
            _cache["staging"] = staging
        return staging
