"""The PyCUDA host code, run against an emulated PyCUDA (no GPU; CI runs this).

A stand-in ``pycuda`` package (driver, gpuarray, compiler) keeps device arrays
in host memory. Its ``SourceModule`` parses the real ``.cu`` files: every
launch is checked against the kernel's C signature (argument count, pointer /
int32 / float32 per parameter, block and grid limits), then the kernel's
documented contract (the comment above it in the ``.cu`` file) is executed in
NumPy. This pins what the GPU cannot be asked about here: argument order,
dtypes, layouts, batching and the reshaping of results, composed into the
engine's answers. The CUDA arithmetic itself is covered by
``test_kernels_compile.py`` (host build of the shared header) and by the GPU
tests (``test_gpu_kernels.py``) on a GPU.
"""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest

from localrefine_plugin.engine.backprojector import BackProjector
from localrefine_plugin.engine.ctf import CtfParams, ctf_2d
from localrefine_plugin.engine.geometry import euler_to_matrix
from localrefine_plugin.engine.projector import (
    FourierProjector,
    forward_model,
    trilinear_corners,
)
from localrefine_plugin.engine.scoring import score_poses
from localrefine_plugin.kernels import backend

from .conftest import blob_map

# -- emulated PyCUDA ---------------------------------------------------------------

_MEMORY: dict[int, np.ndarray] = {}


class FakeGPUArray:
    """Host-memory stand-in for ``pycuda.gpuarray.GPUArray``."""

    def __init__(self, array: np.ndarray):
        self.ary = np.ascontiguousarray(array)
        self.gpudata = id(self.ary)
        _MEMORY[self.gpudata] = self.ary

    shape = property(lambda self: self.ary.shape)
    dtype = property(lambda self: self.ary.dtype)
    nbytes = property(lambda self: self.ary.nbytes)

    def get(self, ary=None):
        if ary is None:
            return self.ary.copy()
        assert ary.shape == self.ary.shape and ary.dtype == self.ary.dtype
        ary[...] = self.ary
        return ary


def _to_gpu(a):
    return FakeGPUArray(np.array(a, copy=True))


def _empty(shape, dtype):
    rng = np.random.default_rng(0)  # garbage, as cudaMalloc gives
    return FakeGPUArray(rng.normal(size=shape).astype(dtype))


_SIG = re.compile(
    r'extern "C" __global__ void(?: __launch_bounds__\(\w+\))?\s+(\w+)\(([^)]*)\)', re.S
)


def _parse_params(params: str) -> list[tuple[str, str]]:
    out = []
    for p in params.split(","):
        p = " ".join(p.split())
        name = p.split()[-1].lstrip("*")
        kind = "ptr" if "*" in p else ("int" if p.startswith("int") else "float")
        out.append((kind, name))
    return out


class FakeFunction:
    def __init__(self, name, params, launches):
        self.name, self.params, self.launches = name, params, launches

    def __call__(self, *args, block, grid):
        assert len(args) == len(self.params), f"{self.name}: {len(args)} args"
        values = {}
        for (kind, pname), arg in zip(self.params, args, strict=True):
            if kind == "ptr":
                if isinstance(arg, np.intp):
                    assert int(arg) == 0, (
                        f"{self.name}.{pname}: non-null integer pointer"
                    )
                    values[pname] = None
                else:
                    assert isinstance(arg, FakeGPUArray), (
                        f"{self.name}.{pname}: {type(arg)}"
                    )
                    values[pname] = arg.ary.reshape(-1)
            elif kind == "int":
                assert isinstance(arg, np.int32), f"{self.name}.{pname}: {type(arg)}"
                values[pname] = int(arg)
            else:
                assert isinstance(arg, np.float32), f"{self.name}.{pname}: {type(arg)}"
                values[pname] = float(arg)
        assert len(block) == 3 and np.prod(block) <= 1024
        assert (
            len(grid) in (2, 3)
            and grid[0] < 2**31
            and all(g <= 65535 for g in grid[1:])
        )
        self.launches.append((self.name, block, grid))
        EMULATIONS[self.name](values, block, grid)


class FakeModule:
    def __init__(self, source, no_extern_c=False, include_dirs=(), **_):
        assert no_extern_c, "the .cu files declare extern C themselves"
        assert include_dirs and '#include "localrefine_common.h"' in source
        self.kernels = {
            m.group(1): _parse_params(m.group(2)) for m in _SIG.finditer(source)
        }
        assert self.kernels
        self.launches: list = []

    def get_function(self, name):
        return FakeFunction(name, self.kernels[name], self.launches)


def _memset_d8(ptr, value, nbytes):
    a = _MEMORY[ptr]
    assert a.nbytes == nbytes
    a.view(np.uint8)[...] = value


@pytest.fixture
def fake_pycuda(monkeypatch):
    """Install the emulated PyCUDA and a fresh backend state."""
    drv = types.ModuleType("pycuda.driver")
    dev = types.SimpleNamespace(name=lambda: "Emulated GPU")
    ctx = types.SimpleNamespace(push=lambda: None)
    dev.retain_primary_context = lambda: ctx
    drv.init = lambda: None
    drv.Device = lambda i=0: dev
    drv.Device.count = lambda: 1
    drv.Context = types.SimpleNamespace(pop=lambda: None, get_device=lambda: dev)
    drv.mem_get_info = lambda: (2**24, 2**25)  # 16 MiB free: forces several batches
    drv.memset_d8 = _memset_d8
    ga = types.ModuleType("pycuda.gpuarray")
    ga.to_gpu, ga.empty, ga.GPUArray = _to_gpu, _empty, FakeGPUArray
    comp = types.ModuleType("pycuda.compiler")
    comp.SourceModule = FakeModule
    pkg = types.ModuleType("pycuda")
    pkg.driver, pkg.gpuarray, pkg.compiler = drv, ga, comp
    for name, mod in (("pycuda", pkg), ("pycuda.driver", drv), ("pycuda.gpuarray", ga),
                      ("pycuda.compiler", comp)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(
        backend, "_state", {"context": None, "gpu": None, "modules": {}}
    )
    from localrefine_plugin.kernels import cuda_projector, cuda_scoring

    monkeypatch.setattr(cuda_projector, "_volumes", {})
    monkeypatch.setattr(cuda_projector, "_pixels", {})
    monkeypatch.setattr(cuda_scoring, "_pixel_cache", {})
    return backend._state


# -- the kernels' contracts in NumPy ----------------------------------------------


def _sample(vol, c, q, reject=True):
    shape = (2 * c + 2, 2 * c + 2, c + 2)
    outside = np.einsum("...i,...i->...", q, q) > c * c
    index, weight, conj = trilinear_corners(
        np.where(outside[..., None], 0.0, q), c, shape
    )
    v = (vol[index] * weight).sum(0)
    v = np.where(conj, np.conj(v), v)
    return np.where(outside & reject, 0, v)


def _q(rot, m, kx, ky, padding):
    a = rot.reshape(m, -1, 9)  # (m, J, 9)
    return padding * (
        kx[None, None, :, None] * a[..., None, 0:3]
        + ky[None, None, :, None] * a[..., None, 3:6]
    )


def _project_slices(v, block, grid):
    m, npix = v["m"], v["npix"]
    assert grid[1] == m and grid[0] * block[0] >= npix
    vol = v["vol"].view(np.complex64)
    q = _q(v["rot"], m, v["kx"], v["ky"], v["padding"])[:, 0]  # (m, P, 3)
    out = v["out"].view(np.complex64).reshape(m, v["out_stride"])
    out[:, v["dest"]] = _sample(vol, v["c"], q)


def _phase_table(v, block, grid):
    m, s, npix, n = v["m"], v["S"], v["npix"], v["n"]
    assert tuple(grid) == (-(-npix // block[0]), s, m)
    sh = v["shifts"].reshape(m, s, 2)
    y = v["y"].view(np.complex64).reshape(m, 1, npix)
    ph = v["sign"] * 2 * np.pi / n * (sh[..., :1] * v["kx"] + sh[..., 1:] * v["ky"])
    v["z"].view(np.complex64)[:] = (y * np.exp(1j * ph)).reshape(-1)


def _score_tiles(v, block, grid):
    m, j, s, npix, n = v["m"], v["J"], v["S"], v["npix"], v["n"]
    assert tuple(block) == (16, 16, 1) and tuple(grid) == (-(-j // 32), -(-s // 32), m)
    p = _sample(
        v["vol"].view(np.complex64),
        v["c"],
        _q(v["rot"], m, v["kx"], v["ky"], v["padding"]),
    )
    if v["rshift"] is not None:
        r = v["rshift"].reshape(m, j, 1, 2)
        p = p * np.exp(
            1j * v["sign"] * 2 * np.pi / n * (r[..., 0] * v["kx"] + r[..., 1] * v["ky"])
        )
    w1 = v["w1"].reshape(m, 1, npix)
    z = v["z"].view(np.complex64).reshape(m, s, npix)
    score = (np.abs(p) ** 2 * w1).sum(-1)[..., None] - np.einsum(
        "mjp,msp->mjs", p, z
    ).real
    v["out"][:] = score.reshape(-1)


def _backproject(v, block, grid):
    m, npix, c = v["m"], v["npix"], v["c"]
    assert grid[1] == m and grid[0] * block[0] >= npix
    at = v["src"][None, :] + v["img_stride"] * np.arange(m)[:, None]  # (m, P)
    f = v["f"].view(np.complex64)[at]
    cf = 1.0 if v["ctf"] is None else v["ctf"][at]
    wi = 1.0 if v["img_w"] is None else v["img_w"][:, None]
    q = _q(v["rot"], m, v["kx"], v["ky"], v["padding"])[:, 0]
    index, tri, conj = trilinear_corners(q, c, (2 * c + 2, 2 * c + 2, c + 2))
    val = np.where(conj, np.conj(cf * wi * f), cf * wi * f)
    size = v["weight"].size
    np.add.at(
        v["data"].reshape(size, 2)[:, 0],
        index,
        (tri * val.real).astype(v["data"].dtype),
    )
    np.add.at(
        v["data"].reshape(size, 2)[:, 1],
        index,
        (tri * val.imag).astype(v["data"].dtype),
    )
    np.add.at(v["weight"], index, (tri * cf * cf * wi).astype(v["weight"].dtype))


EMULATIONS = {
    "project_slices": _project_slices,
    "phase_table": _phase_table,
    "score_tiles": _score_tiles,
    "backproject_f32": _backproject,
    "backproject_f64": _backproject,
}


# -- tests --------------------------------------------------------------------------


def test_every_kernel_has_an_emulated_contract():
    from localrefine_plugin.kernels.backend import KERNEL_DIR

    names = {
        m.group(1)
        for f in KERNEL_DIR.glob("*.cu")
        for m in _SIG.finditer(f.read_text())
    }
    assert names == set(EMULATIONS)


def test_select_device_and_get_score_fn_with_pycuda(fake_pycuda):
    from localrefine_plugin import kernels

    assert backend.select_device("auto") == "cuda"
    fn = kernels.get_score_fn()
    assert callable(fn) and fn.__name__ == "_score_cuda"
    assert set(fake_pycuda["modules"]) == {"scoring.cu"}


@pytest.mark.parametrize("n", [24, 25])
def test_host_code_projects_like_the_engine(fake_pycuda, rng, n):
    from localrefine_plugin.kernels.cuda_projector import CudaProjector, project

    proj = FourierProjector(blob_map(n, seed=2))
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, 30)))
    for r_max in (None, 7.0):
        cpu = proj.project(rots, r_max_px=r_max)
        got = project(proj, rots, r_max_px=r_max, device="cuda")
        assert got.shape == cpu.shape and got.dtype == cpu.dtype
        assert np.abs(got - cpu).max() <= 1e-5 * np.abs(cpu).max()
    single = CudaProjector(proj).project(rots[3])
    assert np.abs(single - proj.project(rots[3])).max() <= 1e-5 * np.abs(cpu).max()
    # 16 MiB "free": batches of the 30 images
    assert len(fake_pycuda["modules"]["projector.cu"].launches) >= 2


@pytest.mark.parametrize("with_rotation_shifts", [False, True])
def test_host_code_scores_like_the_engine(fake_pycuda, rng, with_rotation_shifts):
    from localrefine_plugin.kernels.cuda_scoring import score_poses as gpu_score

    n, m, n_rot, n_shift = 24, 7, 35, 33
    proj = FourierProjector(blob_map(n, seed=1))
    a = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    d = rng.uniform(8000, 20000, m)
    ctf = ctf_2d(CtfParams(d, 0.9 * d, 20.0), n, 2.0)
    x = forward_model(proj, a, origins_px=rng.uniform(-2, 2, (m, 2)), ctf=ctf)
    x = x + rng.normal(0, 5, x.shape) + 1j * rng.normal(0, 5, x.shape)
    inv_s2 = rng.uniform(0.5, 2.0, (m, n // 2 + 1))
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, m, n_rot)))
    shifts = rng.uniform(-3, 3, (m, n_shift, 2))
    rs = rng.uniform(-1, 1, (m, n_rot, 2)) if with_rotation_shifts else None
    kw = dict(r_max_px=9.0, rotation_shifts_px=rs)
    cpu = score_poses(proj, x, ctf, inv_s2, rots, shifts, **kw)
    got = gpu_score(proj, x, ctf, inv_s2, rots, shifts, device="cuda", **kw)
    assert got.shape == cpu.shape and got.dtype == np.float64
    assert np.abs(got - cpu).max() <= 1e-5 * np.abs(cpu).max()


@pytest.mark.parametrize("accumulator", ["float32", "float64"])
def test_host_code_back_projects_like_the_engine(fake_pycuda, rng, accumulator):
    from localrefine_plugin.kernels.cuda_backprojector import CudaBackProjector

    n, m = 24, 40
    proj = FourierProjector(blob_map(n, seed=4))
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    ctf = ctf_2d(CtfParams(rng.uniform(8000, 20000, m), 15000.0, 0.0), n, 2.0)
    f = forward_model(proj, rots, ctf=ctf)
    w = rng.uniform(0.5, 1, m)
    cpu = BackProjector(n)
    cpu.insert(f, rots, ctf=ctf, weights=w)
    dev = CudaBackProjector(n, accumulator=accumulator)
    dev.insert(f[:25], rots[:25], ctf=ctf[:25], weights=w[:25])
    partial = dev.weight.sum()  # reading flushes the device accumulators
    dev.insert(f[25:], rots[25:], ctf=ctf[25:], weights=w[25:])
    assert 0 < partial < dev.weight.sum()
    assert dev.n_inserted == m and dev.shape == cpu.shape
    assert np.abs(dev.data - cpu.data).max() <= 1e-5 * np.abs(cpu.data).max()
    assert np.abs(dev.weight - cpu.weight).max() <= 1e-5 * cpu.weight.max()
    # no CTF, no weights: NULL pointers
    plain, ref = CudaBackProjector(n, accumulator=accumulator), BackProjector(n)
    plain.insert(f[:5], rots[:5])
    ref.insert(f[:5], rots[:5])
    assert np.abs(plain.data - ref.data).max() <= 1e-5 * np.abs(ref.data).max()
    np.testing.assert_allclose(plain.reconstruct(), ref.reconstruct(), atol=1e-4)
