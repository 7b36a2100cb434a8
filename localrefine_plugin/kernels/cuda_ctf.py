"""A batch's CTFs on the device: uploaded, or evaluated there (kernel ``ctf_half_plane``).

The GPU search needs each particle's CTF on the (N, N//2+1) half-plane grid
in device memory (``fold_weights`` folds it into the scoring weights, and the
resident insertion multiplies by it). Given an array, it is uploaded as
float32; given an :class:`.engine.ctf.CtfBatch` (parameters, not values), the
8 coefficients per particle (:func:`.engine.ctf.ctf_coefficients`) are
uploaded and kernel ``ctf_half_plane`` (``ctf.cu``) evaluates the formula on
the device, in double: no host time and 8 doubles instead of 4 N (N/2+1)
bytes per particle (132 KB at box 256). A CTF shared by every particle (a
stride-0 array, or coefficients equal for all) is held once, with stride 0.

``$LOCALREFINE_GPU_CTF=host`` makes :attr:`.cuda_search_ops.CudaScoreFn.evaluates_ctf`
False, so that the refine command computes the CTFs on the host and uploads
them, as before (for measurements).
"""

from __future__ import annotations

import os

import numpy as np

from ..engine.ctf import N_COEFFICIENTS, CtfBatch
from .backend import empty, load_kernels, to_device

__all__ = ["CTF_ENV", "ctf_on_device", "device_ctf_enabled"]

#: environment variable: "device" (default) evaluates a batch's CTFs on the
#: GPU from their parameters; "host" computes and uploads them
CTF_ENV = "LOCALREFINE_GPU_CTF"
_THREADS = 128


def device_ctf_enabled() -> bool:
    """Whether the GPU search takes CTF parameters (``$LOCALREFINE_GPU_CTF``)."""
    value = os.environ.get(CTF_ENV, "device").strip().lower()
    if value not in ("device", "host"):
        raise ValueError(f"${CTF_ENV} must be 'device' or 'host'; got {value!r}")
    return value == "device"


def ctf_on_device(ctf, m: int, n: int):
    """``(ctf_g, stride)``: the CTFs of ``m`` particles at box ``n`` in device memory.

    ``ctf``: a (m, N, N//2+1) array (a stride-0 view for one CTF shared by
    all) or a :class:`.engine.ctf.CtfBatch`. ``ctf_g`` is float32,
    (m or 1, N, N//2+1) flattened per particle; ``stride`` is N (N//2+1), or
    0 when one CTF serves every particle.
    """
    size = n * (n // 2 + 1)
    if isinstance(ctf, CtfBatch):
        if ctf.shape != (m, n, n // 2 + 1):
            raise ValueError(
                f"CTF batch of shape {ctf.shape} for {m} images of box {n}"
            )
        coef = ctf.coefficients()
        shared = bool(np.all(coef == coef[:1]))
        coef = coef[:1] if shared else coef
        rows = coef.shape[0]
        out_g = empty((rows, size), np.float32)
        kernel = load_kernels("ctf.cu").get_function("ctf_half_plane")
        kernel(
            to_device(coef.reshape(rows, N_COEFFICIENTS), np.float64), np.int32(rows),
            np.int32(n), np.float64(1.0 / (n * ctf.pixel_size_a)), out_g,
            block=(_THREADS, 1, 1), grid=(-(-size // _THREADS), rows),
        )  # fmt: skip
        return out_g, 0 if shared else size
    shared = ctf.strides[0] == 0
    return to_device(ctf[:1] if shared else ctf, np.float32), 0 if shared else size
