"""The CPU/GPU switch (``--device auto|cpu|cuda``) and the PyCUDA plumbing.

PyCUDA is optional (``pip install .[gpu]``) and imported only inside the
functions of this module that need it, never at import time: a failing
top-level import would make Scipion drop every protocol of the plugin.

* :func:`select_device` turns ``auto | cpu | cuda`` (or ``cuda:K`` for GPU
  ``K``) into ``"cpu"`` or ``"cuda"``.
* :func:`cuda_available` says whether PyCUDA imports and sees a GPU, and why
  not.
* :func:`load_kernels` compiles a ``.cu`` file of this folder once per process
  (``include_dirs=[this folder]``, ``no_extern_c=True`` because the sources
  declare ``extern "C"`` themselves).
* :func:`batch_size_for` sizes particle batches to the card's free memory.
* :func:`to_device`, :func:`empty` and :func:`zeros` allocate every device
  array from one memory pool per process (:func:`memory_pool`): freeing a
  plain PyCUDA allocation calls ``cuMemFree``, which waits for the GPU, and
  the search frees its temporaries at every stage. A pooled block goes back to
  the pool instead and serves the next allocation of its size class (kernels
  run in order on the one stream, so reusing a block is safe).
  ``$LOCALREFINE_GPU_POOL=0`` allocates directly (for measurements).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np

__all__ = [
    "DEVICES",
    "KERNEL_DIR",
    "select_device",
    "cuda_available",
    "ensure_context",
    "load_kernels",
    "batch_size_for",
    "device_name",
    "to_device",
    "empty",
    "zeros",
    "memory_pool",
    "free_memory",
]

log = logging.getLogger(__name__)

#: Accepted values of ``--device`` (``cuda:K`` selects GPU ``K``).
DEVICES = ("auto", "cpu", "cuda")

#: Folder holding the ``.cu`` and ``.h`` sources.
KERNEL_DIR = Path(__file__).resolve().parent

_lock = threading.Lock()
_state: dict = {"context": None, "gpu": None, "modules": {}}

#: environment variable: ``0`` allocates device arrays without the pool
POOL_ENV = "LOCALREFINE_GPU_POOL"


def _parse(name: str) -> tuple[str, int]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``"auto"`` -> ``("auto", 0)``."""
    base, _, index = str(name).partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise ValueError(
            f"device {name!r} is not one of auto, cpu, cuda or cuda:K (K a GPU number)"
        )
    return base, int(index or os.environ.get("LOCALREFINE_GPU", "0"))


def cuda_available(gpu: int = 0) -> tuple[bool, str]:
    """Whether the GPU path can run here.

    Parameters
    ----------
    gpu : int
        Index of the GPU that would be used.

    Returns
    -------
    ok : bool
    reason : str
        Why not (PyCUDA missing, no driver, no such GPU), or the GPU's name.
    """
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        return False, f"PyCUDA is not installed ({exc}); pip install .[gpu]"
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda raises its own LogicError/RuntimeError types
        return False, f"the CUDA driver is not usable ({exc})"
    if count == 0:
        return False, "PyCUDA found no CUDA device"
    if gpu >= count:
        return False, f"GPU {gpu} requested but only {count} CUDA device(s) found"
    return True, cuda.Device(gpu).name()


def select_device(name: str) -> str:
    """Resolve ``--device`` to the backend that will run.

    Parameters
    ----------
    name : str
        ``"auto"`` (the GPU if PyCUDA imports and a device exists, else the
        CPU, with a log line), ``"cpu"``, ``"cuda"`` or ``"cuda:K"``.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda"``.

    Raises
    ------
    ValueError
        For an unknown name.
    RuntimeError
        For ``"cuda"`` when PyCUDA or a GPU is missing (the message says which
        and how to fix it).
    """
    base, gpu = _parse(name)
    if base == "cpu":
        return "cpu"
    ok, reason = cuda_available(gpu)
    if ok:
        log.info("device %s: GPU %d (%s)", name, gpu, reason)
        _state["gpu"] = gpu
        return "cuda"
    if base == "cuda":
        raise RuntimeError(
            f"device {name}: the GPU path is unavailable: {reason}. Install the GPU "
            "extra (pip install .[gpu]) on a machine with an NVIDIA GPU and driver, "
            "or use --device cpu / auto"
        )
    log.info("device auto: GPU path unavailable (%s); using the CPU", reason)
    return "cpu"


def ensure_context(gpu: int | None = None):
    """Make the primary context of ``gpu`` current (once per process).

    Returns the PyCUDA context. The GPU is ``gpu``, else the one chosen by
    :func:`select_device`, else ``$LOCALREFINE_GPU``, else 0. The context is
    pushed in the thread that first calls this: the GPU path runs in that
    thread (:func:`.engine.search_ops.search_threads`).
    """
    import pycuda.driver as cuda

    with _lock:
        if _state["context"] is None:
            cuda.init()
            if gpu is None:
                gpu = _state["gpu"]
            if gpu is None:
                gpu = int(os.environ.get("LOCALREFINE_GPU", "0"))
            ctx = cuda.Device(gpu).retain_primary_context()
            ctx.push()
            _state["context"], _state["gpu"] = ctx, gpu

            import atexit

            def _pop() -> None:
                try:
                    cuda.Context.pop()
                except Exception:  # already popped or driver shut down at exit
                    pass

            atexit.register(_pop)
            log.debug("CUDA context on GPU %d (%s)", gpu, cuda.Device(gpu).name())
        return _state["context"]


def load_kernels(filename: str):
    """Compile (once) and return the PyCUDA module of ``KERNEL_DIR / filename``."""
    ensure_context()
    with _lock:
        module = _state["modules"].get(filename)
        if module is None:
            from pycuda.compiler import SourceModule

            source = (KERNEL_DIR / filename).read_text()
            with warnings.catch_warnings(record=True) as caught:
                # PyCUDA warns with the compiler's remarks; log them instead
                warnings.simplefilter("always")
                module = SourceModule(
                    source,
                    no_extern_c=True,
                    include_dirs=[str(KERNEL_DIR)],
                )
            for w in caught:
                log.info("compiling %s: %s", filename, w.message)
            _state["modules"][filename] = module
            log.debug("compiled %s", filename)
        return module


def _pool_enabled() -> bool:
    return os.environ.get(POOL_ENV, "1").strip() != "0"


def memory_pool():
    """The process's ``pycuda.tools.DeviceMemoryPool`` (None with ``$LOCALREFINE_GPU_POOL=0``).

    Created on first use in the context of :func:`ensure_context`. Blocks freed
    by the engine stay in the pool for reuse; when an allocation finds the card
    full, PyCUDA's pool releases the blocks it holds and retries.
    """
    if not _pool_enabled():
        return None
    ensure_context()
    with _lock:
        pool = _state.get("pool")
        if pool is None:
            import atexit

            from pycuda.tools import DeviceMemoryPool

            pool = _state["pool"] = DeviceMemoryPool()
            # at exit, before the context is popped (atexit runs in reverse
            # order): release the held blocks, and free later ones at once
            atexit.register(pool.stop_holding)
        return pool


def _allocator():
    pool = memory_pool()
    if pool is not None:
        return pool.allocate
    import pycuda.driver as cuda

    return cuda.mem_alloc


def to_device(array, dtype):
    """Upload ``array`` as a C-contiguous GPUArray of ``dtype`` (pooled memory).

    PyCUDA copies the host buffer as it lies in memory and keeps its strides, but
    the kernels index C order: NumPy results can be F-ordered (fancy indexing of
    broadcast views, ``astype`` keeps the layout), so every upload goes through here.
    """
    from pycuda import gpuarray

    ensure_context()
    return gpuarray.to_gpu(
        np.ascontiguousarray(array, dtype=dtype), allocator=_allocator()
    )


def empty(shape, dtype):
    """An uninitialised C-ordered GPUArray of ``shape`` and ``dtype`` (pooled memory)."""
    from pycuda import gpuarray

    ensure_context()
    return gpuarray.empty(shape, dtype=dtype, allocator=_allocator())


def zeros(shape, dtype):
    """A zero-filled GPUArray, cleared with ``memset`` (no runtime-compiled fill kernel)."""
    import pycuda.driver as cuda

    out = empty(shape, dtype)
    if out.nbytes:
        cuda.memset_d8(out.gpudata, 0, out.nbytes)
    return out


def free_memory() -> int:
    """Bytes the engine can still allocate: the card's free memory plus the
    blocks the pool holds for reuse (:func:`memory_pool`; the pool's managed
    bytes less its active ones, which also counts the rounding of the active
    blocks to the pool's size classes: a slight overestimate)."""
    import pycuda.driver as cuda

    ensure_context()
    free, _total = cuda.mem_get_info()
    pool = _state.get("pool") if _pool_enabled() else None
    held = 0 if pool is None else int(pool.managed_bytes) - int(pool.active_bytes)
    return int(free) + max(held, 0)


def device_name() -> str:
    """Name of the GPU in use (``ensure_context`` first)."""
    import pycuda.driver as cuda

    ensure_context()
    return cuda.Context.get_device().name()


def batch_size_for(
    bytes_per_item: int, *, fixed_bytes: int = 0, fraction: float = 0.5, cap: int = 4096
) -> int:
    """How many items fit in ``fraction`` of the GPU's free memory.

    Parameters
    ----------
    bytes_per_item : int
        Device bytes one item (particle) needs.
    fixed_bytes : int
        Bytes needed once (volume, tables) on top of the items.
    fraction : float
        Share of the free memory to use.
    cap : int
        Upper limit (launch sizes beyond this gain nothing).
    """
    free = free_memory()
    room = int(free * fraction) - int(fixed_bytes)
    return int(max(1, min(cap, room // max(1, int(bytes_per_item)))))
