"""The one CPU/GPU switch of the refinement: which ``score_fn`` the search uses,
and where the reconstruction's insertion and the noise pass's projections run.

``device="cpu"`` uses :func:`localrefine_plugin.engine.scoring.score_poses`.
``"cuda"`` and ``"auto"`` ask :mod:`localrefine_plugin.kernels` (imported only
here, only on the GPU path, because PyCUDA may be missing) for a scoring
function with the same signature:

``localrefine_plugin.kernels.get_score_fn() -> callable``
    returns a drop-in replacement of ``scoring.score_poses``, or raises
    ``ImportError`` (no PyCUDA) or ``RuntimeError`` (no usable GPU) saying why.

``"cuda"`` turns either failure into an :class:`InputError`; ``"auto"`` logs
it and falls back to the CPU. The GPU backend also inserts with
``kernels.cuda_backprojector.CudaBackProjector`` and projects the noise
pass's predictions with ``kernels.cuda_projector.CudaProjector``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .backprojector import BackProjector
from .errors import InputError

__all__ = ["Backend", "select_backend", "DEVICES"]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Backend:
    """The scoring backend chosen for a run.

    Attributes
    ----------
    name : str
        ``"cpu"`` or ``"cuda"``.
    score_fn : callable
        Same signature as :func:`.scoring.score_poses`.
    power_fn : callable
        Same signature as :func:`.scoring.weighted_projection_power` (the
        branch-and-bound's bound).
    backprojector : callable
        ``backprojector(n, padding=, r_max_px=)``: the reconstruction's
        accumulator (:class:`.backprojector.BackProjector` or its GPU twin).
    projector : callable
        ``projector(fourier_projector)``: what the noise pass projects with
        (the projector itself, or its GPU twin with the same ``.project``).
    """

    name: str
    score_fn: Callable
    power_fn: Callable
    backprojector: Callable = field(default=BackProjector)
    projector: Callable = field(default=lambda projector: projector)


def _cpu() -> Backend:
    from . import scoring

    return Backend("cpu", scoring.score_poses, scoring.weighted_projection_power)


def _cuda() -> Backend:
    from .. import kernels  # PyCUDA is imported inside, never at engine import

    get = getattr(kernels, "get_score_fn", None)
    if get is None:
        raise ImportError("this installation has no GPU scoring kernels")
    from ..kernels.cuda_backprojector import CudaBackProjector
    from ..kernels.cuda_projector import CudaProjector

    return Backend(
        "cuda",
        get(),
        kernels.get_power_fn(),
        backprojector=CudaBackProjector,
        projector=CudaProjector,
    )


def select_backend(device: str) -> Backend:
    """The backend for ``device`` in ``auto | cpu | cuda``.

    Raises
    ------
    InputError
        For an unknown device, or ``"cuda"`` when PyCUDA or a GPU is missing.
    """
    if device not in DEVICES:
        raise InputError(
            None,
            f"option device: {device!r} is not one of {DEVICES}",
            "use auto, cpu or cuda",
        )
    if device == "cpu":
        return _cpu()
    try:
        backend = _cuda()
    except (ImportError, RuntimeError, OSError) as exc:
        if device == "cuda":
            raise InputError(
                None,
                f"option device: cuda requested but the GPU path is unavailable ({exc})",
                "install the GPU extra (pip install .[gpu]) on a machine with an NVIDIA "
                "GPU, or use --device cpu / --device auto",
            ) from None
        log.info("device auto: GPU path unavailable (%s); using the CPU", exc)
        return _cpu()
    log.info("device %s: scoring on the GPU", device)
    return backend
