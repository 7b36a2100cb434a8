"""GPU backend: CUDA C kernels (``*.cu``, ``localrefine_common.h``) and their PyCUDA host code.

Nothing here imports PyCUDA at module level (PyCUDA is the optional ``gpu``
extra); the submodules import it inside the functions that launch kernels.

* :mod:`.backend` - ``select_device("auto" | "cpu" | "cuda" | "cuda:K")``,
  context, lazy once-per-process kernel compilation, memory-sized batches.
* :mod:`.cuda_projector` - slice extraction (``CudaProjector``, ``project``).
* :mod:`.cuda_scoring` - pose scoring (``score_poses``; the ``score_fn`` of the
  local search and its branch-and-bound stages).
* :mod:`.cuda_backprojector` - insertion (``CudaBackProjector``, ``insert``).

See ``docs/gpu.md``.
"""

from __future__ import annotations

__all__ = ["get_score_fn", "get_power_fn"]


def get_score_fn():
    """A drop-in GPU replacement of ``engine.scoring.score_poses``.

    Raises
    ------
    ImportError
        PyCUDA is not installed.
    RuntimeError
        PyCUDA found no usable GPU.
    """
    from .cuda_scoring import get_score_fn as _get

    return _get()


def get_power_fn():
    """A drop-in GPU replacement of ``engine.scoring.weighted_projection_power``.

    Raises ``ImportError`` / ``RuntimeError`` as :func:`get_score_fn`.
    """
    from .cuda_scoring import get_power_fn as _get

    return _get()
