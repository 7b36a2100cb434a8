"""CPU-side checks of the GPU backend (no GPU needed; CI runs them).

* Every ``.cu`` file of ``localrefine_plugin/kernels`` compiles with ``nvcc``
  for sm_80 and sm_90, and every kernel starts with a bounds guard.
* The shared ``__host__ __device__`` helpers of ``localrefine_common.h``, built
  for the host by ``nvcc`` and called through ctypes, reproduce the engine's
  trilinear sampling and corner arithmetic (the GPU kernels run the same code).
* The weight folding of the scoring kernel (``fold_weights``, phase sign,
  per-rotation origins), evaluated in NumPy, equals ``engine.scoring.score_poses``.
* The device switch and the host fallbacks work without PyCUDA, and importing
  the kernels package does not import PyCUDA.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from localrefine_plugin.engine.backprojector import BackProjector
from localrefine_plugin.engine.fourier import image_to_fourier
from localrefine_plugin.engine.geometry import euler_to_matrix
from localrefine_plugin.engine.projector import (
    FourierProjector,
    forward_model,
    trilinear_corners,
)
from localrefine_plugin.engine.scoring import half_plane_pixels, score_poses
from localrefine_plugin.kernels import backend
from localrefine_plugin.kernels.backend import KERNEL_DIR

from .conftest import blob_map

CU_FILES = sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


@pytest.fixture(scope="module")
def nvcc() -> str:
    """Path of nvcc; CI (``CI`` set) must have it, elsewhere the test skips."""
    exe = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc"
        if os.path.exists("/usr/local/cuda/bin/nvcc")
        else None
    )
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc not found on CI: every .cu file must be compile-checked")
        pytest.skip("nvcc (CUDA toolkit) not found")
    return exe


def test_kernel_sources_are_found():
    assert set(CU_FILES) >= {"projector.cu", "scoring.cu", "backprojector.cu"}
    assert (KERNEL_DIR / "localrefine_common.h").is_file()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CU_FILES)
def test_cu_file_compiles_to_cubin(nvcc, tmp_path, source, arch):
    out = tmp_path / f"{source}.{arch}.cubin"
    proc = subprocess.run(
        [nvcc, "-cubin", f"-arch={arch}", "-I", str(KERNEL_DIR), "-Xptxas", "-v",
         "-o", str(out), str(KERNEL_DIR / source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0
    # no register spills to local memory in any kernel
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    assert spills and all(int(s) == 0 for s in spills), proc.stderr


@pytest.mark.parametrize("source", CU_FILES)
def test_every_kernel_starts_with_a_bounds_guard(source):
    text = (KERNEL_DIR / source).read_text()
    kernels = list(re.finditer(r"__global__[^{]*?(\w+)\s*\(([^)]*)\)\s*\{", text, re.S))
    assert kernels, f"no __global__ function in {source}"
    for match in kernels:
        body = text[match.end() :]
        # the first 'return' of the body sits in an 'if' that tests indices
        head = body[: body.index("return")]
        statements = head.count(";")
        assert statements <= 6, f"{match.group(1)}: bounds guard not at the start"
        guard = head[head.rindex("if") :]
        assert ">=" in guard, f"{match.group(1)}: first return is not a bounds guard"


HARNESS = r"""
#include "localrefine_common.h"
extern "C" {
void h_sample(const float2* vol, int c, const float* q, int n, float2* out) {
    for (int i = 0; i < n; ++i) out[i] = lr_sample(vol, c, q[3*i], q[3*i+1], q[3*i+2]);
}
void h_corners(const float* q, int c, int n, int* base, float* frac, int* conj) {
    for (int i = 0; i < n; ++i) {
        LrCorners k;
        lr_corners(q[3*i], q[3*i+1], q[3*i+2], c, false, &k);
        base[i] = k.base; conj[i] = k.conj;
        frac[3*i] = k.fx; frac[3*i+1] = k.fy; frac[3*i+2] = k.fz;
    }
}
void h_slice(const float* a, const float* kx, const float* ky, int n, float padding, float* q) {
    for (int i = 0; i < n; ++i) lr_slice_point(a, kx[i], ky[i], padding, q+3*i, q+3*i+1, q+3*i+2);
}
}
"""


@pytest.fixture(scope="module")
def host_helpers(nvcc, tmp_path_factory):
    """``localrefine_common.h`` compiled for the host by nvcc, loaded with ctypes."""
    folder = tmp_path_factory.mktemp("harness")
    src = folder / "harness.cu"
    src.write_text(HARNESS)
    lib = folder / "libharness.so"
    proc = subprocess.run(
        [nvcc, "-shared", "-Xcompiler", "-fPIC", "-I", str(KERNEL_DIR), "-o", str(lib), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(lib))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("n", [32, 33])
def test_host_build_of_common_header_samples_like_the_engine(host_helpers, rng, n):
    proj = FourierProjector(blob_map(n, seed=3))
    vol = np.ascontiguousarray(proj.data, dtype=np.complex64)
    c = proj.c
    # random points in the ball, both half-spaces, plus grid points and the rim
    q = rng.uniform(-c, c, (4000, 3))
    q = q[np.linalg.norm(q, axis=1) <= c]
    grid = rng.integers(-c // 2, c // 2, (200, 3)).astype(np.float64)
    rim = np.array([[c, 0, 0], [-c, 0, 0], [0, c, 0], [0, 0, -c], [0.0, 0.0, 0.0]])
    q = np.ascontiguousarray(np.concatenate([q, grid, rim]), dtype=np.float32)
    out = np.zeros(q.shape[0], dtype=np.complex64)
    host_helpers.h_sample(_ptr(vol), c, _ptr(q), q.shape[0], _ptr(out))
    ref = proj.sample(q.astype(np.float64) / proj.padding)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 1e-5 * scale
    # outside the ball reads zero
    far = np.array([[c + 0.5, 0, 0], [0, -(c + 0.5), 0]], dtype=np.float32)
    out2 = np.ones(2, dtype=np.complex64)
    host_helpers.h_sample(_ptr(vol), c, _ptr(far), 2, _ptr(out2))
    assert np.all(out2 == 0)


def test_host_build_of_common_header_corners_match_trilinear_corners(host_helpers, rng):
    c = 20
    shape = (2 * c + 2, 2 * c + 2, c + 2)
    q = rng.uniform(-c, c, (3000, 3))
    q = np.concatenate([q, [[c, c, c], [-c, -c, -c], [0, -c, c]]])  # clipping cases
    qf = np.ascontiguousarray(q, dtype=np.float32)
    base = np.zeros(len(q), dtype=np.int32)
    frac = np.zeros((len(q), 3), dtype=np.float32)
    conj = np.zeros(len(q), dtype=np.int32)
    host_helpers.h_corners(_ptr(qf), c, len(q), _ptr(base), _ptr(frac), _ptr(conj))
    index, weight, conj_ref = trilinear_corners(qf.astype(np.float64), c, shape)
    np.testing.assert_array_equal(base, index[0])
    np.testing.assert_array_equal(conj.astype(bool), conj_ref)
    # weight of the (0,0,0) corner from the fractions equals the engine's
    w0 = (1 - frac[:, 0]) * (1 - frac[:, 1]) * (1 - frac[:, 2])
    np.testing.assert_allclose(w0, weight[0], atol=1e-6)


def test_host_build_of_slice_point_is_a_transpose_times_k(host_helpers, rng):
    a = euler_to_matrix(*rng.uniform(-180, 180, 3))
    kx = rng.uniform(-16, 16, 50).astype(np.float32)
    ky = rng.uniform(-16, 16, 50).astype(np.float32)
    a32 = np.ascontiguousarray(a.reshape(9), dtype=np.float32)
    q = np.zeros((50, 3), dtype=np.float32)
    host_helpers.h_slice(
        _ptr(a32), _ptr(kx), _ptr(ky), 50, ctypes.c_float(2.0), _ptr(q)
    )
    ref = 2.0 * (a.T @ np.stack([kx, ky, np.zeros(50)]).astype(np.float64)).T
    np.testing.assert_allclose(q, ref, atol=1e-4)


def _scoring_problem(rng, n=32, m=3, n_rot=5, n_shift=4):
    proj = FourierProjector(blob_map(n, seed=1))
    a_true = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    o_true = rng.uniform(-2, 2, (m, 2))
    from localrefine_plugin.engine.ctf import CtfParams, ctf_2d

    ctf = ctf_2d(
        CtfParams(rng.uniform(8000, 20000, m), rng.uniform(8000, 20000, m), 30.0),
        n,
        2.0,
    )
    x = forward_model(proj, a_true, origins_px=o_true, ctf=ctf)
    x = x + image_to_fourier(rng.normal(0, 0.5, (m, n, n)).astype(np.float32))
    inv_s2 = 1.0 / rng.uniform(50, 150, (m, n // 2 + 1))
    rots = np.stack(
        [euler_to_matrix(*rng.uniform(-180, 180, (3, n_rot))) for _ in range(m)]
    )
    shifts = rng.uniform(-3, 3, (m, n_shift, 2))
    rs = rng.uniform(-1, 1, (m, n_rot, 2))
    return proj, x, ctf, inv_s2, rots, shifts, rs


@pytest.mark.parametrize("with_rotation_shifts", [False, True])
def test_folded_weights_reproduce_engine_scores(rng, with_rotation_shifts):
    """The kernels' algebra (w1, Y, phase table, ORIGIN_PHASE_SIGN) in NumPy."""
    from localrefine_plugin.kernels.cuda_scoring import ORIGIN_PHASE_SIGN, fold_weights

    proj, x, ctf, inv_s2, rots, shifts, rs = _scoring_problem(rng)
    rs = rs if with_rotation_shifts else None
    r_max = 13.0
    n = x.shape[1]
    flat, kx, ky, mult, shell = half_plane_pixels(n, r_max)
    w1, y = fold_weights(x, ctf, inv_s2, flat, mult, shell)
    m, n_rot, n_shift = rots.shape[0], rots.shape[1], shifts.shape[1]
    sign = ORIGIN_PHASE_SIGN * 2j * np.pi / n
    got = np.empty((m, n_rot, n_shift))
    for i in range(m):
        p = proj.project_pixels(rots[i], kx, ky).astype(np.complex128)  # (J, P)
        if rs is not None:
            p = p * np.exp(sign * (rs[i, :, :1] * kx + rs[i, :, 1:] * ky))
        z = y[i] * np.exp(sign * (shifts[i, :, :1] * kx + shifts[i, :, 1:] * ky))
        got[i] = (np.abs(p) ** 2 @ w1[i])[:, None] - (p @ z.T).real
    ref = score_poses(
        proj, x, ctf, inv_s2, rots, shifts, r_max_px=r_max, rotation_shifts_px=rs
    )
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_flop_and_byte_counts_scale_with_the_work():
    from localrefine_plugin.kernels.cuda_scoring import byte_count, flop_count

    assert flop_count(2, 10, 5, 100) == 2 * 10 * 100 * (64 + 4 * 5)
    assert byte_count(1, 64, 1, 10, 0) == 2 * (40 + 80) + 4 * 64


def test_select_device_without_a_gpu(monkeypatch, caplog):
    monkeypatch.setattr(backend, "cuda_available", lambda gpu=0: (False, "no GPU here"))
    assert backend.select_device("cpu") == "cpu"
    with caplog.at_level("INFO", logger=backend.__name__):
        assert backend.select_device("auto") == "cpu"
    assert "no GPU here" in caplog.text and "using the CPU" in caplog.text
    with pytest.raises(RuntimeError, match="no GPU here"):
        backend.select_device("cuda")
    with pytest.raises(RuntimeError, match="no GPU here"):
        backend.select_device("cuda:1")
    for bad in ("gpu", "cuda:x", "cpu:1", ""):
        with pytest.raises(ValueError, match="auto, cpu, cuda"):
            backend.select_device(bad)


def test_select_device_with_a_gpu_reported(monkeypatch):
    monkeypatch.setattr(
        backend, "cuda_available", lambda gpu=0: (True, f"Fake GPU {gpu}")
    )
    assert backend.select_device("auto") == "cuda"
    assert backend.select_device("cuda:2") == "cuda"
    assert backend._state["gpu"] == 2
    backend._state["gpu"] = None


def test_importing_the_gpu_backend_does_not_import_pycuda():
    code = (
        "import sys; import localrefine_plugin.kernels as k; "
        "from localrefine_plugin.kernels import backend, cuda_scoring, cuda_projector; "
        "from localrefine_plugin.kernels import cuda_backprojector; "
        "assert 'pycuda' not in sys.modules, 'pycuda imported at module level'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_host_fallbacks_equal_the_engine(monkeypatch, rng):
    from localrefine_plugin.kernels import (
        cuda_backprojector,
        cuda_projector,
        cuda_scoring,
    )

    monkeypatch.setattr(backend, "cuda_available", lambda gpu=0: (False, "no GPU here"))
    proj, x, ctf, inv_s2, rots, shifts, rs = _scoring_problem(rng)
    a = rots[0]
    np.testing.assert_array_equal(
        cuda_projector.project(proj, a, device="auto"), proj.project(a)
    )
    np.testing.assert_array_equal(
        cuda_scoring.score_poses(
            proj,
            x,
            ctf,
            inv_s2,
            rots,
            shifts,
            r_max_px=10,
            rotation_shifts_px=rs,
            device="cpu",
        ),
        score_poses(
            proj, x, ctf, inv_s2, rots, shifts, r_max_px=10, rotation_shifts_px=rs
        ),
    )
    bp1, bp2 = BackProjector(32), BackProjector(32)
    cuda_backprojector.insert(bp1, x, rots[:, 0], ctf=ctf, device="auto")
    bp2.insert(x, rots[:, 0], ctf=ctf)
    np.testing.assert_array_equal(bp1.data, bp2.data)
    np.testing.assert_array_equal(bp1.weight, bp2.weight)


def test_get_score_fn_says_why_without_pycuda():
    import importlib.util

    from localrefine_plugin import kernels

    if importlib.util.find_spec("pycuda") is not None:
        pytest.skip("PyCUDA is installed here; the GPU tests cover get_score_fn")
    with pytest.raises(ImportError, match="PyCUDA is not installed"):
        kernels.get_score_fn()
