"""The PyCUDA host code and the real CUDA kernels, run on the CPU (no GPU; CI runs this).

A stand-in ``pycuda`` package (driver, gpuarray, compiler) keeps device arrays
in host memory *as PyCUDA does*: the bytes as they lie in memory (an F-ordered
NumPy array arrives F-ordered), pointers passed raw. Its ``SourceModule``
compiles the real ``.cu`` source with ``g++`` against a small shim that runs
each CUDA block as one ``std::thread`` per CUDA thread (``__syncthreads`` a
``std::barrier``, ``__shfl_down_sync`` / ``__shfl_sync`` through shared memory, ``atomicAdd``
with ``std::atomic_ref``); every launch is checked against the kernel's C
signature (pointer / int32 / float32 per parameter, block and grid limits).
So the kernels' index arithmetic, tiling, shared memory and reductions and the
host code's argument order, dtypes, memory layouts and batching are all
exercised, composed into the engine's answers. (A first GPU run found an
F-ordered upload that the earlier NumPy-contract emulation hid; this one
catches it.) What only a GPU shows (timing, float rounding of the hardware,
races the barrier schedule hides) is left to ``test_gpu_kernels.py``.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from localrefine_plugin.engine.backprojector import BackProjector
from localrefine_plugin.engine.ctf import CtfParams, ctf_2d
from localrefine_plugin.engine.geometry import euler_to_matrix
from localrefine_plugin.engine.projector import FourierProjector, forward_model
from localrefine_plugin.engine.scoring import score_poses
from localrefine_plugin.kernels import backend
from localrefine_plugin.kernels.backend import KERNEL_DIR

from .conftest import blob_map
from .test_gpu_kernels import NEAR_TWINS, TWINS

SHIM = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <functional>
#include <thread>
#include <vector>
struct float2 { float x, y; };
static inline float2 make_float2(float a, float b) { float2 r; r.x = a; r.y = b; return r; }
struct float3 { float x, y, z; };
static inline float3 make_float3(float a, float b, float c) {
    float3 r; r.x = a; r.y = b; r.z = c; return r;
}
struct alignas(16) float4 { float x, y, z, w; };
static inline float4 make_float4(float a, float b, float c, float d) {
    float4 r; r.x = a; r.y = b; r.z = c; r.w = d; return r;
}
struct emu_dim3 { unsigned x, y, z; };
static emu_dim3 blockIdx, blockDim, gridDim;
static thread_local emu_dim3 threadIdx;
static std::barrier<>* emu_barrier;
static float emu_shfl[1024];
#define __global__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __forceinline__ inline
#define __host__
#define __device__
static inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
static inline float __shfl_down_sync(unsigned, float v, int off) {
    const int t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    emu_shfl[t] = v;
    emu_barrier->arrive_and_wait();
    const float r = (t & 31) + off < 32 ? emu_shfl[t + off] : v;
    emu_barrier->arrive_and_wait();
    return r;
}
static inline int min(int a, int b) { return a < b ? a : b; }  // CUDA's integer min/max
static inline int max(int a, int b) { return a > b ? a : b; }
static inline float __shfl_sync(unsigned, float v, int src) {
    const int t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    emu_shfl[t] = v;
    emu_barrier->arrive_and_wait();
    const float r = emu_shfl[(t & ~31) + (src & 31)];
    emu_barrier->arrive_and_wait();
    return r;
}
static inline void sincospif(float x, float* s, float* c) {
    *s = (float)std::sin(M_PI * (double)x);
    *c = (float)std::cos(M_PI * (double)x);
}
template <typename T> static inline T atomicAdd(T* a, T v) {
    return std::atomic_ref<T>(*a).fetch_add(v);
}
struct emu_ptr {  // a raw device pointer converts to the kernel's pointer type
    void* p;
    template <typename T> operator T*() const { return static_cast<T*>(p); }
};
static void emu_launch(emu_dim3 grid, emu_dim3 block, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = block;
    const unsigned n = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                std::barrier<> bar(n);
                emu_barrier = &bar;
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < n; ++t)
                    threads.emplace_back([&, t] {
                        threadIdx = {t % block.x, (t / block.x) % block.y,
                                     t / (block.x * block.y)};
                        body();
                        bar.arrive_and_drop();  // an exited thread leaves the barrier
                    });
                for (auto& th : threads) th.join();
            }
}
"""

_SIG = re.compile(
    r'extern "C" __global__ void(?: __launch_bounds__\([^)]*\))?\s+(\w+)\(([^)]*)\)',
    re.S,
)
_CTYPES = {
    "ptr": ctypes.c_void_p,
    "int": ctypes.c_int,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}
#: the NumPy scalar type a launch must pass for each scalar kind (as PyCUDA packs it)
_SCALARS = {"int": np.int32, "float": np.float32, "double": np.float64}
_BUILD: list[Path] = []  # the session's build folder (under pytest's tmp_path_factory)
_LIBS: dict[str, ctypes.CDLL] = {}


def _parse_params(params: str) -> list[tuple[str, str]]:
    out = []
    for p in params.split(","):
        p = " ".join(p.split())
        name = p.split()[-1].lstrip("*")
        if "*" in p:
            kind = "ptr"
        else:
            kind = next((k for k in ("int", "double") if p.startswith(k)), "float")
        out.append((kind, name))
    return out


def _emulator(source: str, kernels: dict) -> ctypes.CDLL:
    """The .cu source plus launch wrappers, compiled for the CPU (cached per source)."""
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    if key not in _LIBS:
        wrappers = []
        for name, params in kernels.items():
            decl = ", ".join(
                f"{'void*' if k == 'ptr' else k} a{i}"
                for i, (k, _) in enumerate(params)
            )
            call = ", ".join(
                f"emu_ptr{{a{i}}}" if k == "ptr" else f"a{i}"
                for i, (k, _) in enumerate(params)
            )
            wrappers.append(
                f'extern "C" void emu_{name}(unsigned gx, unsigned gy, unsigned gz, '
                f"unsigned bx, unsigned by, unsigned bz, {decl}) {{\n"
                f"    emu_launch({{gx, gy, gz}}, {{bx, by, bz}}, [&] {{ {name}({call}); }});\n}}"
            )
        src = _BUILD[0] / f"emu_{key}.cpp"
        src.write_text(SHIM + "\n" + source + "\n" + "\n".join(wrappers) + "\n")
        lib = _BUILD[0] / f"emu_{key}.so"
        proc = subprocess.run(
            ["g++", "-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC",
             "-w", "-I", str(KERNEL_DIR), "-o", str(lib), str(src)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        _LIBS[key] = ctypes.CDLL(str(lib))
    return _LIBS[key]


# -- emulated PyCUDA ---------------------------------------------------------------

_MEMORY: dict[int, np.ndarray] = {}
#: the emulator's block state is global: launches from several host threads would
#: corrupt it (and hang), so they run one after another; the GPU search launches
#: from one thread, and a regression to threaded launches then fails its test
#: (test_cuda_backend_hands_both_gpu_functions_to_the_search) instead of hanging
_LAUNCH_LOCK = threading.Lock()


class FakeGPUArray:
    """``pycuda.gpuarray.GPUArray`` stand-in: the bytes in their memory order."""

    def __init__(self, array: np.ndarray):
        if not (array.flags.c_contiguous or array.flags.f_contiguous):
            array = np.array(array, order="K")  # PyCUDA compacts strides too
        self.ary = np.array(array, copy=True, order="K")
        self.gpudata = self.ary.ctypes.data
        _MEMORY[self.gpudata] = self.ary

    shape = property(lambda self: self.ary.shape)
    dtype = property(lambda self: self.ary.dtype)
    nbytes = property(lambda self: self.ary.nbytes)

    def get(self, ary=None):
        if ary is None:
            return self.ary.copy(order="K")
        assert ary.shape == self.ary.shape and ary.dtype == self.ary.dtype
        assert ary.flags.c_contiguous == self.ary.flags.c_contiguous
        ary[...] = self.ary
        return ary


#: bytes allocated per allocator ("pool" or "direct"), as PyCUDA asks its allocator
_ALLOCATED: dict[str, int] = {}


class FakeMemoryPool:
    """``pycuda.tools.DeviceMemoryPool``: counts what it serves."""

    managed_bytes = active_bytes = 0

    def allocate(self, nbytes):
        _ALLOCATED["pool"] = _ALLOCATED.get("pool", 0) + int(nbytes)

    def stop_holding(self):
        pass


def _mem_alloc(nbytes):
    _ALLOCATED["direct"] = _ALLOCATED.get("direct", 0) + int(nbytes)


def _to_gpu(a, allocator=None):
    out = FakeGPUArray(np.asarray(a))
    (allocator or _mem_alloc)(out.nbytes)
    return out


def _empty(shape, dtype, allocator=None):
    rng = np.random.default_rng(0)  # garbage, as cudaMalloc gives
    out = FakeGPUArray(rng.normal(size=shape).astype(dtype))
    (allocator or _mem_alloc)(out.nbytes)
    return out


class FakeFunction:
    def __init__(self, lib, name, params, launches):
        self.name, self.params, self.launches = name, params, launches
        self.fn = getattr(lib, f"emu_{name}")
        self.fn.argtypes = [ctypes.c_uint] * 6 + [_CTYPES[k] for k, _ in params]
        self.fn.restype = None

    def __call__(self, *args, block, grid):
        assert len(args) == len(self.params), f"{self.name}: {len(args)} args"
        values = []
        for (kind, pname), arg in zip(self.params, args, strict=True):
            if kind == "ptr":
                if isinstance(arg, np.integer):
                    assert int(arg) == 0, (
                        f"{self.name}.{pname}: non-null integer pointer"
                    )
                    values.append(None)
                else:
                    assert isinstance(arg, FakeGPUArray), (
                        f"{self.name}.{pname}: {type(arg)}"
                    )
                    values.append(arg.gpudata)
            else:
                assert isinstance(arg, _SCALARS[kind]), (
                    f"{self.name}.{pname}: {type(arg)} for a {kind}"
                )
                values.append(int(arg) if kind == "int" else float(arg))
        block = tuple(block)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        assert len(block) == 3 and np.prod(block) <= 1024
        assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:])
        self.launches.append((self.name, block, grid))
        with _LAUNCH_LOCK:  # one kernel at a time, as on one CUDA stream
            self.fn(*grid, *block, *values)


class FakeModule:
    def __init__(self, source, no_extern_c=False, include_dirs=(), **_):
        assert no_extern_c, "the .cu files declare extern C themselves"
        assert include_dirs and '#include "localrefine_common.h"' in source
        self.kernels = {
            m.group(1): _parse_params(m.group(2)) for m in _SIG.finditer(source)
        }
        assert self.kernels
        self.lib = _emulator(source, self.kernels)
        self.launches: list = []

    def get_function(self, name):
        return FakeFunction(self.lib, name, self.kernels[name], self.launches)


class _FakeEvent:
    """``pycuda.driver.Event``: launches are synchronous here, so host time."""

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def time_since(self, earlier) -> float:
        return (self.t - earlier.t) * 1e3  # milliseconds, as CUDA events


def _memset_d8(ptr, value, nbytes):
    a = _MEMORY[ptr]
    assert a.nbytes == nbytes
    a.view(np.uint8).reshape(-1)[...] = value


@pytest.fixture(scope="session")
def emulator_dir(tmp_path_factory) -> Path:
    """Where the CPU builds of the kernels go (one per session)."""
    return tmp_path_factory.mktemp("kernel_emu")


@pytest.fixture
def fake_pycuda(monkeypatch, emulator_dir):
    """Install the emulated PyCUDA and a fresh backend state."""
    if not _BUILD:
        _BUILD.append(emulator_dir)
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to run the kernels on the CPU")
    drv = types.ModuleType("pycuda.driver")
    dev = types.SimpleNamespace(name=lambda: "Emulated GPU")
    pushed_in: list[int] = []  # threads that made the context current
    ctx = types.SimpleNamespace(
        push=lambda: pushed_in.append(threading.get_ident()), pushed_in=pushed_in
    )
    dev.retain_primary_context = lambda: ctx
    drv.init = lambda: None
    drv.Device = lambda i=0: dev
    drv.Device.count = lambda: 1
    drv.Context = types.SimpleNamespace(
        pop=lambda: None, get_device=lambda: dev, synchronize=lambda: None
    )
    drv.Event = _FakeEvent
    drv.mem_get_info = lambda: (2**24, 2**25)  # 16 MiB free: forces several batches
    drv.memset_d8 = _memset_d8
    drv.mem_alloc = _mem_alloc
    drv.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)
    _ALLOCATED.clear()
    ga = types.ModuleType("pycuda.gpuarray")
    ga.to_gpu, ga.empty, ga.GPUArray = _to_gpu, _empty, FakeGPUArray
    comp = types.ModuleType("pycuda.compiler")
    comp.SourceModule = FakeModule
    tools = types.ModuleType("pycuda.tools")
    tools.DeviceMemoryPool = FakeMemoryPool
    pkg = types.ModuleType("pycuda")
    pkg.driver, pkg.gpuarray, pkg.compiler, pkg.tools = drv, ga, comp, tools
    for name, mod in (("pycuda", pkg), ("pycuda.driver", drv), ("pycuda.gpuarray", ga),
                      ("pycuda.compiler", comp), ("pycuda.tools", tools)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(
        backend, "_state", {"context": None, "gpu": None, "modules": {}}
    )
    from localrefine_plugin.kernels import (
        cuda_projector,
        cuda_scoring,
        cuda_search_ops,
        host_staging,
    )

    monkeypatch.setattr(host_staging, "_cache", {})
    monkeypatch.setattr(cuda_projector, "_volumes", {})
    monkeypatch.setattr(cuda_projector, "_cells", {})
    monkeypatch.setattr(cuda_projector, "_pixels", {})
    monkeypatch.setattr(cuda_scoring, "_pixel_cache", {})
    monkeypatch.setattr(cuda_search_ops, "_sorted_cache", {})
    return backend._state


# -- tests --------------------------------------------------------------------------


def test_every_kernel_is_found_by_the_emulator():
    names = {
        m.group(1)
        for f in KERNEL_DIR.glob("*.cu")
        for m in _SIG.finditer(f.read_text())
    }
    expected = {
        "project_slices",
        "phase_table",
        "score_tiles",
        "score_tiles_s64",
        "score_tiles_j64_s64",
        "backproject_f32",
        "backproject_f32x4",
        "backproject_f64",
        "backproject_gather_f32",
        "build_cells",
        "score_tiles_s64_cells",
        "score_tiles_j64_s64_cells",
        "score_tiles_s64_occ4",
        "score_tiles_s64_cells_occ4",
        "score_tiles_s64_wide",
        "score_tiles_j64_s64_wide",
        "score_tiles_j64_s64_cells_wide",
        "score_tiles_rl",
        "score_tiles_s64_rl",
        "score_tiles_j64_s64_rl",
        "score_tiles_s64_cells_rl",
        "score_tiles_s64_wide_rl",
        "score_tiles_wide",
        "score_tiles_wide_rl",
        "grid_min_over_shifts",
        "grid_min_over_rotations",
        "fold_weights",
        "projection_power",
        "power_weighted_sums",
        "candidate_rotations",
        "ctf_half_plane",
        "grid_best",
    }
    assert names == expected


def test_select_device_and_get_score_fn_with_pycuda(fake_pycuda):
    from localrefine_plugin import kernels

    assert backend.select_device("auto") == "cuda"
    from localrefine_plugin.kernels.cuda_search_ops import CudaScoreFn

    fn = kernels.get_score_fn()
    assert callable(fn) and isinstance(fn, CudaScoreFn)
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


@pytest.mark.parametrize(
    ("with_rotation_shifts", "n_shift"),
    [
        (False, 33),
        (True, 33),
        (True, 20),
        pytest.param(False, 70, marks=pytest.mark.slow),
    ],
)  # 70 shifts: two 64-shift tiles (about 10 s on 2 cores: slow)
def test_host_code_scores_like_the_engine(
    fake_pycuda, rng, with_rotation_shifts, n_shift
):
    from localrefine_plugin.kernels.cuda_scoring import score_poses as gpu_score

    n, m, n_rot = 24, 7, 35
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


@pytest.mark.parametrize(
    ("accumulator", "scheme"),
    [("float32", "atomic"), ("float32x4", "atomic"), ("float64", "atomic"),
     ("float32", "gather")],
)  # fmt: skip
def test_host_code_back_projects_like_the_engine(fake_pycuda, rng, accumulator, scheme):
    """Every accumulator of the atomic scheme, and the gather scheme (one thread
    per voxel), fill the accumulators as the engine's insertion does."""
    from localrefine_plugin.kernels.cuda_backprojector import CudaBackProjector

    n, m = 24, 40
    proj = FourierProjector(blob_map(n, seed=4))
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    ctf = ctf_2d(CtfParams(rng.uniform(8000, 20000, m), 15000.0, 0.0), n, 2.0)
    f = forward_model(proj, rots, ctf=ctf)
    w = rng.uniform(0.5, 1, m)
    cpu = BackProjector(n)
    cpu.insert(f, rots, ctf=ctf, weights=w)
    dev = CudaBackProjector(n, accumulator=accumulator, scheme=scheme)
    dev.insert(f[:25], rots[:25], ctf=ctf[:25], weights=w[:25])
    partial = dev.weight.sum()  # reading flushes the device accumulators
    dev.insert(f[25:], rots[25:], ctf=ctf[25:], weights=w[25:])
    assert 0 < partial < dev.weight.sum()
    assert dev.n_inserted == m and dev.shape == cpu.shape
    assert np.abs(dev.data - cpu.data).max() <= 1e-5 * np.abs(cpu.data).max()
    assert np.abs(dev.weight - cpu.weight).max() <= 1e-5 * cpu.weight.max()
    # no CTF, no weights: NULL pointers
    plain = CudaBackProjector(n, accumulator=accumulator, scheme=scheme)
    ref = BackProjector(n)
    plain.insert(f[:5], rots[:5])
    ref.insert(f[:5], rots[:5])
    assert np.abs(plain.data - ref.data).max() <= 1e-5 * np.abs(ref.data).max()
    np.testing.assert_allclose(plain.reconstruct(), ref.reconstruct(), atol=1e-4)


@pytest.mark.parametrize(("n", "r_max"), [(21, None), (20, 6.5)])
def test_the_gather_scheme_inserts_as_the_engine_at_any_box_and_radius(
    fake_pycuda, rng, n, r_max
):
    """The gather (one thread per voxel) at an odd box and Nyquist, and at a
    radius below Nyquist, against the engine's insertion; a wrong scheme or a
    gather into other than float32 accumulators is refused."""
    from localrefine_plugin.kernels.cuda_backprojector import CudaBackProjector

    m = 12
    proj = FourierProjector(blob_map(n, seed=7))
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    ctf = ctf_2d(CtfParams(rng.uniform(8000, 20000, m), 15000.0, 0.0), n, 2.0)
    f = forward_model(proj, rots, ctf=ctf)
    cpu = BackProjector(n, r_max_px=r_max)
    cpu.insert(f, rots, ctf=ctf)
    dev = CudaBackProjector(n, r_max_px=r_max, scheme="gather")
    dev.insert(f, rots, ctf=ctf)
    assert np.abs(dev.data - cpu.data).max() <= 1e-5 * np.abs(cpu.data).max()
    assert np.abs(dev.weight - cpu.weight).max() <= 1e-5 * cpu.weight.max()
    with pytest.raises(ValueError, match="scheme must be one of atomic, gather"):
        CudaBackProjector(n, scheme="sort")
    with pytest.raises(ValueError, match="the gather scheme accumulates in float32"):
        CudaBackProjector(n, accumulator="float64", scheme="gather")


@pytest.mark.parametrize(
    ("k", "shared_ctf", "scheme"),
    [(1, False, "atomic"), (3, False, "atomic"), (2, True, "atomic"), (3, False, "gather")],
)  # fmt: skip
def test_resident_insertion_equals_shifting_and_uploading(
    fake_pycuda, rng, k, shared_ctf, scheme
):
    """`CudaBatchOps.insert_at_poses` (the search's resident images and CTFs,
    shifted on the "GPU") fills the accumulators as `reconstruct.insert_at_poses`
    does (shifted on the host, uploaded): K poses per image with weights, a
    CTF per image or one for all, and without CTF."""
    from localrefine_plugin.engine.reconstruct import insert_at_poses
    from localrefine_plugin.kernels.cuda_backprojector import CudaBackProjector
    from localrefine_plugin.kernels.cuda_scoring import get_score_fn

    n, m = 20, 5
    proj = FourierProjector(blob_map(n, seed=11))
    a = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    ctf = ctf_2d(CtfParams(rng.uniform(8000, 20000, m), 15000.0, 10.0), n, 2.0)
    if shared_ctf:
        ctf = np.broadcast_to(ctf[0], ctf.shape)
    x = forward_model(proj, a, ctf=ctf)
    x = (x + rng.normal(0, 1, x.shape) + 1j * rng.normal(0, 1, x.shape)).astype(
        np.complex64
    )
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, m, k)))
    origins = rng.uniform(-3, 3, (m, k, 2))
    weights = rng.dirichlet(np.ones(k), m) if k > 1 else None
    poses = (rots, origins, weights) if k > 1 else (rots[:, 0], origins[:, 0], None)
    ops = get_score_fn().bind_batch(proj, x, ctf, np.ones(n // 2 + 1), r_max_px=8.0)
    for with_ctf in (True, False):
        resident, uploaded = CudaBackProjector(n, scheme=scheme), CudaBackProjector(n)
        ops.insert_at_poses(resident, *poses, ctf=with_ctf)
        insert_at_poses(uploaded, x, *poses, ctf=np.asarray(ctf) if with_ctf else None)
        assert resident.n_inserted == uploaded.n_inserted == m * k
        scale = np.abs(uploaded.data).max()
        assert np.abs(resident.data - uploaded.data).max() <= 1e-5 * scale
        np.testing.assert_allclose(resident.weight, uploaded.weight, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="images_g must have shape"):
        CudaBackProjector(n + 2).insert_resident(ops.images_g, None, 0, *poses[:2])


@pytest.mark.parametrize("ctf_at", ["device", "host"])
def test_gpu_alignment_pass_inserts_from_the_resident_batch(
    fake_pycuda, tmp_path, monkeypatch, ctf_at
):
    """With GPU accumulators and the GPU search, `align_particles` inserts each
    batch from the search's device copies (no host insertion), and the maps
    equal a separate reconstruction pass at the poses it returned (host
    CTFs). By default the CTFs are evaluated on the device from their
    parameters and no CTF is computed on the host, and the next batches'
    transforms are written into page-locked buffers; `$LOCALREFINE_GPU_CTF=host`
    computes and uploads them (here with `$LOCALREFINE_GPU_PINNED=0`)."""
    from localrefine_plugin.engine import ctf as ctf_mod
    from localrefine_plugin.engine import mrc_io, reconstruct, refine_steps
    from localrefine_plugin.engine.geometry import matrix_to_euler
    from localrefine_plugin.engine.particles import read_particles
    from localrefine_plugin.engine.refine_options import RefineOptions
    from localrefine_plugin.kernels import host_staging
    from localrefine_plugin.kernels.cuda_backprojector import CudaBackProjector
    from localrefine_plugin.kernels.cuda_ctf import CTF_ENV
    from localrefine_plugin.kernels.cuda_scoring import get_power_fn, get_score_fn
    from localrefine_plugin.kernels.host_staging import PINNED_ENV

    from .test_refine import BOX, make_dataset

    data = make_dataset(tmp_path / "data", n=10, snr=2.0, perturb_deg=2.0)
    particles = read_particles(data["star"])
    mask, _ = mrc_io.read_map(data["mask"])
    reference, _ = mrc_io.read_map(data["reference"])
    refs = np.stack([reference * mask] * 2).astype(np.float32)
    options = RefineOptions(
        batch_size=4, rotation_extent_deg=1.5, alignment_resolution_deg=1.0,
        shift_extent_px=0.5,
    )  # fmt: skip
    host_inserts = []
    real_insert = CudaBackProjector.insert

    def counting_insert(self, *args, **kw):
        host_inserts.append(len(args[0]))
        return real_insert(self, *args, **kw)

    monkeypatch.setattr(CudaBackProjector, "insert", counting_insert)
    monkeypatch.setenv(CTF_ENV, ctf_at)
    host_ctfs = []
    real_ctf_2d = ctf_mod.ctf_2d

    def counting_ctf_2d(params, *args, **kw):
        host_ctfs.append(np.size(params.defocus_u_a))
        return real_ctf_2d(params, *args, **kw)

    monkeypatch.setattr(ctf_mod, "ctf_2d", counting_ctf_2d)
    monkeypatch.setenv(PINNED_ENV, "1" if ctf_at == "device" else "0")
    accumulators = reconstruct.half_set_accumulators(
        particles.box, backprojector=CudaBackProjector
    )
    aligned = refine_steps.align_particles(
        particles,
        refs,
        np.ones((1, BOX // 2 + 1)),
        consensus_rotations=particles.matrices(),
        consensus_origins_px=particles.origin_px,
        fulcrum_px=np.zeros(3),
        options=options,
        r_max_px=BOX / 4,
        score_fn=get_score_fn(),
        power_fn=get_power_fn(),
        label="test",
        accumulators=accumulators,
    )
    assert not host_inserts  # every image came from the search's device copies
    assert sum(bp.n_inserted for bp in accumulators) == particles.n
    on_device = "ctf.cu" in fake_pycuda["modules"]
    assert on_device == (ctf_at == "device")
    assert sum(host_ctfs) == (0 if on_device else particles.n)
    # the transforms were written into the page-locked buffers (every batch
    # of both halves; $LOCALREFINE_GPU_PINNED=0 in the other run: none)
    staging = host_staging._cache.get("staging")
    halves = np.asarray(particles.random_subset)
    n_batches = sum(-(-int(np.sum(halves == h)) // options.batch_size) for h in (1, 2))
    if ctf_at == "device":
        assert n_batches >= 3
        assert staging.lent == n_batches and staging.fallbacks == 0
    else:
        assert staging is None
    fused = refine_steps.reconstruct_and_compare(
        accumulators, mask, pixel_size_a=particles.pixel_size_a, options=options
    )
    moved = particles.with_poses(
        *matrix_to_euler(aligned.rotations), aligned.origins_px
    )
    separate = refine_steps.reconstruct_and_compare(
        reconstruct.reconstruct_particles(moved, batch_size=options.batch_size),
        mask,
        pixel_size_a=particles.pixel_size_a,
        options=options,
    )
    scale = np.abs(separate.raw_halves).max()
    assert np.abs(fused.raw_halves - separate.raw_halves).max() <= 1e-4 * scale


@pytest.mark.parametrize("n", [20, 21])
def test_ctfs_evaluated_on_the_device_equal_the_engine(fake_pycuda, rng, n):
    """Kernel `ctf_half_plane` (`cuda_ctf.ctf_on_device` of a `CtfBatch`) equals
    `ctf_2d` in float64 to 1e-6: per-particle defoci, astigmatism, voltages,
    phase shifts, B-factors and scales, even and odd boxes, and a defocus of
    5 um at 0.6 A/px (|chi| of hundreds of radians); one set of parameters for
    all is evaluated once (stride 0), as is a stride-0 array."""
    from localrefine_plugin.engine.ctf import CtfBatch
    from localrefine_plugin.kernels.cuda_ctf import ctf_on_device

    m, px = 5, 0.6
    params = CtfParams(
        defocus_u_a=rng.uniform(5000, 50000, m),
        defocus_v_a=rng.uniform(5000, 50000, m),
        defocus_angle_deg=rng.uniform(-180, 180, m),
        voltage_kv=rng.choice([200.0, 300.0], m),
        cs_mm=2.7,
        amplitude_contrast=0.07,
        phase_shift_deg=rng.uniform(0, 90, m),
        bfactor_a2=np.array([0.0, 50.0, 0.0, 120.0, 10.0]),
        scale=rng.uniform(0.5, 1.0, m),
    )
    want = ctf_2d(params, n, px, dtype=np.float64)
    chi_max = np.pi * 0.0251 * 50000 * (0.5 / px) ** 2  # about 1300 rad at 200 kV
    assert chi_max > 500
    ctf_g, stride = ctf_on_device(CtfBatch(params, n, px, m), m, n)
    assert stride == n * (n // 2 + 1)
    got = ctf_g.get().reshape(m, n, n // 2 + 1)
    assert np.abs(got - want).max() <= 1e-6
    # shared parameters: one CTF, stride 0
    one = CtfParams(21000.0, 19000.0, 35.0, bfactor_a2=40.0)
    ctf_g, stride = ctf_on_device(CtfBatch(one, n, px, m), m, n)
    assert stride == 0 and ctf_g.shape == (1, n * (n // 2 + 1))
    assert (
        np.abs(ctf_g.get().reshape(n, -1) - ctf_2d(one, n, px, np.float64)).max()
        <= 1e-6
    )
    host = np.broadcast_to(ctf_2d(one, n, px), (m, n, n // 2 + 1))
    ctf_g, stride = ctf_on_device(host, m, n)
    assert stride == 0 and np.array_equal(ctf_g.get().reshape(n, -1), host[0])
    with pytest.raises(ValueError, match="CTF batch of shape"):
        ctf_on_device(CtfBatch(params, n, px, m), m + 1, n)


def test_bound_batch_with_ctf_parameters_scores_and_inserts_as_with_values(
    fake_pycuda, rng
):
    """`bind_batch` given a `CtfBatch` (CTFs evaluated on the device) scores,
    and inserts from its resident images, as given the host's CTF values (to
    the float32 rounding of the CTF)."""
    from localrefine_plugin.engine.ctf import CtfBatch
    from localrefine_plugin.kernels.cuda_backprojector import CudaBackProjector
    from localrefine_plugin.kernels.cuda_scoring import get_score_fn

    n, m, n_rot, n_shift = 20, 3, 4, 5
    proj = FourierProjector(blob_map(n, seed=11))
    a = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    params = CtfParams(rng.uniform(8000, 20000, m), 15000.0, 10.0, bfactor_a2=30.0)
    batch = CtfBatch(params, n, 2.0, m)
    ctf = np.asarray(batch)
    x = forward_model(proj, a, ctf=ctf)
    x = x + rng.normal(0, 3, x.shape) + 1j * rng.normal(0, 3, x.shape)
    inv_s2 = rng.uniform(0.5, 2.0, (m, n // 2 + 1))
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, m, n_rot)))
    shifts = rng.uniform(-3, 3, (m, n_shift, 2))
    zeros_r, zeros_s = np.zeros((m, n_rot)), np.zeros((m, n_shift))
    fn = get_score_fn()
    with_values = fn.bind_batch(proj, x, ctf, inv_s2, r_max_px=9.0)
    with_params = fn.bind_batch(proj, x, batch, inv_s2, r_max_px=9.0)
    assert "ctf.cu" in fake_pycuda["modules"]
    assert with_params.kx_g is with_values.kx_g  # pixel tables made once per (n, r)
    want = with_values.score(rots, shifts, r_max_px=9.0, rotation_shifts_px=None)
    got = with_params.score(rots, shifts, r_max_px=9.0, rotation_shifts_px=None)
    want, got = want.values(zeros_r, zeros_s), got.values(zeros_r, zeros_s)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    accumulators = []
    origins = rng.uniform(-2, 2, (m, 2))
    for ops in (with_values, with_params):
        bp = CudaBackProjector(n, padding=2)
        ops.insert_at_poses(bp, a, origins)
        accumulators.append((bp.data, bp.weight))
    for got_acc, want_acc in zip(accumulators[1], accumulators[0], strict=True):
        assert np.abs(got_acc - want_acc).max() <= 1e-5 * np.abs(want_acc).max()


def test_page_locked_buffers_are_lent_until_every_view_is_gone(
    fake_pycuda, monkeypatch, caplog
):
    """`HostStaging.lend`: arrays in the buffers while one is free and the
    array fits, ordinary memory otherwise; a buffer comes back only when the
    loan and every view of it are gone (a slice outliving its array keeps
    it); loans from other threads; `$LOCALREFINE_GPU_PINNED=0`, batches over
    the limit and a failing allocation give no buffers."""
    from localrefine_plugin.kernels import host_staging as hs

    staging = hs.host_staging(1000, count=2)
    assert hs.host_staging(800, count=2) is staging  # kept for the process
    a = staging.lend((10, 12), np.complex64)  # 960 bytes
    assert a.shape == (10, 12) and a.dtype == np.complex64 and a.flags.c_contiguous
    b = staging.lend((5,), np.float64)
    c = staging.lend((3,), np.float64)  # none free: ordinary memory
    big = staging.lend((200,), np.float64)  # 1600 bytes: does not fit
    assert (staging.lent, staging.fallbacks, staging.free) == (2, 2, 0)
    a[...] = 1 + 2j
    part = a[3:5].reshape(-1)  # a view that outlives its array
    del a, b, c, big
    assert staging.free == 1  # b's buffer; a's is held by the view
    assert np.all(part == 1 + 2j)
    del part
    assert staging.free == 2
    with ThreadPoolExecutor(2) as pool:  # lent from threads without the context
        loans = list(pool.map(lambda _: staging.lend((4,), np.float32), range(2)))
    assert staging.free == 0 and all(x.shape == (4,) for x in loans)
    del loans
    assert staging.free == 2
    assert hs.host_staging(2000, count=2) is not staging  # grown
    assert hs.host_staging(hs.MAX_PINNED_BYTES, count=3) is None
    monkeypatch.setenv(hs.PINNED_ENV, "0")
    assert hs.host_staging(1000) is None
    # an allocation that fails: ordinary memory, with a warning, not an error
    monkeypatch.setenv(hs.PINNED_ENV, "1")

    def no_memory(*_):
        raise MemoryError("cuMemHostAlloc failed: out of memory")

    monkeypatch.setattr(sys.modules["pycuda.driver"], "pagelocked_empty", no_memory)
    with caplog.at_level("WARNING"):
        assert hs.host_staging(4000, count=2) is None
    assert "ordinary memory" in caplog.text


def test_host_code_projection_power_like_the_engine(fake_pycuda, rng):
    from localrefine_plugin.engine.scoring import weighted_projection_power
    from localrefine_plugin.kernels.cuda_scoring import (
        weighted_projection_power as gpu_power,
    )

    n, m = 25, 6
    proj = FourierProjector(blob_map(n, seed=3))
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    ctf = ctf_2d(CtfParams(rng.uniform(8000, 20000, m), 12000.0, 0.0), n, 2.0)
    inv_s2 = rng.uniform(0.5, 2.0, (m, n // 2 + 1))
    cpu, k_cpu = weighted_projection_power(proj, ctf, inv_s2, rots, r_max_px=10.0)
    got, k_got = gpu_power(proj, ctf, inv_s2, rots, r_max_px=10.0, device="cuda")
    np.testing.assert_array_equal(k_got, k_cpu)
    assert got.shape == cpu.shape
    assert np.abs(got - cpu).max() <= 1e-5 * np.abs(cpu).max()


def test_cuda_backend_hands_both_gpu_functions_to_the_search(fake_pycuda, rng):
    """`--device cuda` gives the search the GPU score and the GPU bound power, and a
    local search run with both finds the CPU search's poses."""
    from localrefine_plugin.engine.refine_device import select_backend
    from localrefine_plugin.engine.search import local_search
    from localrefine_plugin.kernels.cuda_search_ops import CudaScoreFn

    gpu = select_backend("cuda")
    assert gpu.name == "cuda" and isinstance(gpu.score_fn, CudaScoreFn)
    assert gpu.power_fn == gpu.score_fn.power  # so bound batches compute it
    n, m = 24, 3
    proj = FourierProjector(blob_map(n, seed=4))
    a = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    ctf = ctf_2d(CtfParams(rng.uniform(8000, 20000, m), 12000.0, 0.0), n, 2.0)
    x = forward_model(proj, a, origins_px=rng.uniform(-1, 1, (m, 2)), ctf=ctf)
    inv_s2 = np.ones((m, n // 2 + 1))
    kw = dict(
        consensus_rotations=a,
        consensus_origins_px=np.zeros((m, 2)),
        fulcrum_px=np.array([2.0, -1.0, 1.0]),
        rotation_extent_deg=3.0,
        shift_extent_px=1.5,
        alignment_resolution_deg=1.5,
        shift_resolution_px=0.5,
        r_max_px=8.0,
    )
    cpu = local_search(proj, x, ctf, inv_s2, **kw)
    got = local_search(
        proj, x, ctf, inv_s2, score_fn=gpu.score_fn, power_fn=gpu.power_fn, **kw
    )
    np.testing.assert_allclose(got.rotations, cpu.rotations, atol=1e-9)
    np.testing.assert_allclose(got.origins_px, cpu.origins_px, atol=1e-9)
    np.testing.assert_allclose(got.scores, cpu.scores, rtol=1e-4, atol=1e-6)
    # priors and the top-K poses (the last grid's values come back to the host)
    kw.update(top_k=3, prior_sigma_rotation_deg=2.0, prior_sigma_shift_px=1.0)
    cpu = local_search(proj, x, ctf, inv_s2, **kw)
    got = local_search(
        proj, x, ctf, inv_s2, score_fn=gpu.score_fn, power_fn=gpu.power_fn, **kw
    )
    np.testing.assert_allclose(got.top_rotations, cpu.top_rotations, atol=1e-9)
    np.testing.assert_allclose(got.top_origins_px, cpu.top_origins_px, atol=1e-9)
    np.testing.assert_allclose(got.top_weights, cpu.top_weights, atol=1e-3)
    np.testing.assert_array_equal(got.n_evaluated, cpu.n_evaluated)
    # --threads with the GPU: the batches run one at a time in this thread (the
    # one holding the CUDA context), with the same result
    ctx = fake_pycuda["context"]
    before = list(ctx.pushed_in)
    threaded = local_search(
        proj, x, ctf, inv_s2, score_fn=gpu.score_fn, power_fn=gpu.power_fn,
        batch_size=1, threads=3, **kw,
    )  # fmt: skip
    assert ctx.pushed_in == before  # no worker thread needed a context
    np.testing.assert_array_equal(threaded.top_rotations, got.top_rotations)
    np.testing.assert_array_equal(threaded.top_scores, got.top_scores)


def test_device_arrays_come_from_the_memory_pool(fake_pycuda, rng, monkeypatch):
    """Every device array of a GPU search comes from the process's memory pool
    (freeing a plain allocation waits for the GPU); `$LOCALREFINE_GPU_POOL=0`
    allocates directly and gives the same poses; the blocks the pool holds count
    as free memory when batches are sized."""
    from localrefine_plugin.engine.refine_device import select_backend
    from localrefine_plugin.engine.search import local_search

    gpu = select_backend("cuda")
    n, m = 20, 2
    proj = FourierProjector(blob_map(n, seed=5))
    a = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    x = forward_model(proj, a, origins_px=rng.uniform(-1, 1, (m, 2)))
    ctf, inv_s2 = np.ones(x.shape), np.ones((m, n // 2 + 1))
    kw = dict(
        consensus_rotations=a, consensus_origins_px=np.zeros((m, 2)),
        fulcrum_px=np.zeros(3), rotation_extent_deg=3.0, shift_extent_px=1.0,
        alignment_resolution_deg=1.5, shift_resolution_px=0.5, r_max_px=6.0,
    )  # fmt: skip
    search = dict(score_fn=gpu.score_fn, power_fn=gpu.power_fn, **kw)
    _ALLOCATED.clear()
    pooled = local_search(proj, x, ctf, inv_s2, **search)
    assert _ALLOCATED.get("pool", 0) > 0 and "direct" not in _ALLOCATED
    monkeypatch.setenv(backend.POOL_ENV, "0")
    _ALLOCATED.clear()
    direct = local_search(proj, x, ctf, inv_s2, **search)
    assert _ALLOCATED.get("direct", 0) > 0 and "pool" not in _ALLOCATED
    np.testing.assert_array_equal(direct.rotations, pooled.rotations)
    np.testing.assert_array_equal(direct.scores, pooled.scores)
    monkeypatch.delenv(backend.POOL_ENV)
    pool = backend.memory_pool()
    monkeypatch.setattr(pool, "managed_bytes", 5000, raising=False)
    monkeypatch.setattr(pool, "active_bytes", 1000, raising=False)
    assert backend.free_memory() == 2**24 + 4000  # the fake card's free + held


@pytest.mark.parametrize(
    ("variant", "r_max"),
    [("s32", 7.0), ("s64", 7.0), ("j64_s64", 7.0), ("s64_cells", 7.0),
     ("j64_s64_cells", 7.0), ("s64_cells", 10.0), ("s64_occ4", 7.0),
     ("s64_cells_occ4", 7.0), ("s64_wide", 7.0), ("j64_s64_wide", 7.0),
     ("j64_s64_cells_wide", 7.0), ("j64_s64_cells_wide", 10.0), ("s32_rl", 7.0),
     ("s64_rl", 7.0), ("j64_s64_rl", 7.0), ("s64_cells_rl", 10.0), ("s64_wide_rl", 7.0),
     ("s32_wide", 7.0), ("s32_wide_rl", 7.0)],
)  # fmt: skip
def test_every_scoring_kernel_variant_scores_like_the_engine(
    fake_pycuda, rng, variant, r_max
):
    """Every variant gives the engine's scores; the cells variants give exactly
    their volume twin's (cells cropped to the radius at 7 px; at 10 px = N/2 the
    cells cover the whole volume, rim samples and clipping included)."""
    from localrefine_plugin.kernels.cuda_projector import cells_radius
    from localrefine_plugin.kernels.cuda_scoring import VARIANTS, _check, _ScoreLaunch

    n, m, n_rot, n_shift = 20, 2, 70, 40  # crosses the 64-rotation tile too
    proj = FourierProjector(blob_map(n, seed=6))
    a = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    ctf = ctf_2d(CtfParams(rng.uniform(8000, 20000, m), 15000.0, 10.0), n, 2.0)
    x = forward_model(proj, a, ctf=ctf)
    x = x + rng.normal(0, 3, x.shape) + 1j * rng.normal(0, 3, x.shape)
    inv_s2 = rng.uniform(0.5, 2.0, (m, n // 2 + 1))
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, m, n_rot)))
    shifts = rng.uniform(-3, 3, (m, n_shift, 2))
    rs = rng.uniform(-1, 1, (m, n_rot, 2))
    cpu = score_poses(
        proj, x, ctf, inv_s2, rots, shifts, r_max_px=r_max, rotation_shifts_px=rs
    )
    args = _check(x, ctf, inv_s2, rots, shifts, r_max, rs)

    def scores(name):
        launch = _ScoreLaunch(proj, *args, r_max, name)
        launch.phase_table()
        return launch.scores().get()

    got = scores(variant)
    assert np.abs(got - cpu).max() <= 1e-5 * np.abs(cpu).max()
    if variant in TWINS:  # the same arithmetic: bit for bit
        np.testing.assert_array_equal(got, scores(TWINS[variant]))
    if variant in NEAR_TWINS:  # the |P|^2 term summed in another order
        twin = scores(NEAR_TWINS[variant])
        assert np.abs(got - twin).max() <= 1e-6 * np.abs(twin).max()
    if VARIANTS[variant][3]:
        assert cells_radius(proj, r_max) == (16 if r_max == 7.0 else proj.c)


def test_grid_reductions_equal_the_host_grid(fake_pycuda, rng):
    """`grid_min_over_shifts` / `_over_rotations` give the host's minima, first
    arg-minima (ties included) and inf on the padding, over several chunks."""
    from localrefine_plugin.engine.search_ops import HostGrid
    from localrefine_plugin.kernels.backend import to_device
    from localrefine_plugin.kernels.cuda_search_ops import CudaGrid

    m, n_rot, n_shift = 5, 70, 9
    e = rng.normal(0, 100, (m, n_rot, n_shift)).astype(np.float32)
    e[1, 3, 4] = e[1, 2, 4] = e[1].min() - 1000  # a tie between rotations
    e[2, 4, 5] = e[2, 4, 2] = e[2].min() - 1000  # a tie between shifts
    add_r = rng.normal(0, 10, (m, n_rot))
    add_s = rng.normal(0, 10, (m, n_shift))
    add_r[:, 60:] = np.inf  # padded rotations
    add_s[3, 7:] = np.inf  # padded shifts of one particle
    add_r[1] = add_r[1, 2]
    add_s[2] = 0.0
    chunks = [
        (0, 2, to_device(e[:2], np.float32)),
        (2, 5, to_device(e[2:], np.float32)),
    ]
    gpu, host = CudaGrid(chunks, m, n_rot, n_shift), HostGrid(e.astype(np.float64))
    for got, want in zip(gpu.best(add_r, add_s), host.best(add_r, add_s), strict=True):
        np.testing.assert_array_equal(got, want)
    j, s, _ = gpu.best(add_r, add_s)
    assert (j[1], s[1], j[2], s[2]) == (2, 4, 4, 2)  # the first of the tied minima
    for got, want in zip(
        gpu.minima(add_r, add_s), host.minima(add_r, add_s), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(gpu.values(add_r, add_s), host.values(add_r, add_s))
    # `grid_best` (128 threads per particle, each scanning every 128th
    # rotation) over more rotations than threads: ties within one thread's
    # rotations (2, 130), across threads (5, 200), a particle whose every pose
    # is padding (all inf: the first), and each particle's own minimum
    m, n_rot, n_shift = 4, 300, 3
    e = rng.normal(0, 100, (m, n_rot, n_shift)).astype(np.float32)
    e[0, 130, 1] = e[0, 2, 1] = e[0].min() - 1000
    e[1, 200, 0] = e[1, 5, 2] = e[1].min() - 1000
    add_r = np.zeros((m, n_rot))
    add_s = np.zeros((m, n_shift))
    add_r[2] = np.inf
    chunks = [
        (0, 3, to_device(e[:3], np.float32)),
        (3, 4, to_device(e[3:], np.float32)),
    ]
    gpu, host = CudaGrid(chunks, m, n_rot, n_shift), HostGrid(e.astype(np.float64))
    got, want = gpu.best(add_r, add_s), host.best(add_r, add_s)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert [(int(got[0][i]), int(got[1][i])) for i in range(3)] == [
        (2, 1),
        (5, 2),
        (0, 0),
    ]
    assert got[2][2] == np.inf


@pytest.mark.parametrize("shared", [False, True])
def test_bound_batch_scores_and_power_like_the_engine(fake_pycuda, rng, shared):
    """`CudaScoreFn.bind_batch`: scores at a smaller radius (a prefix of the
    radius-sorted pixels) and the bound's power equal the engine's, with a CTF
    and noise model per particle or one shared by all (uploaded once); the
    power's weighted sums, and scores of rotations formed on the device."""
    from localrefine_plugin.engine.local_grid import rotations_about_fulcrum
    from localrefine_plugin.engine.scoring import weighted_projection_power
    from localrefine_plugin.engine.search_ops import HostGrid
    from localrefine_plugin.kernels.cuda_scoring import get_score_fn

    n, m, n_rot, n_shift = 20, 3, 5, 4
    proj = FourierProjector(blob_map(n, seed=7))
    a = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    ctf = ctf_2d(CtfParams(rng.uniform(8000, 20000, m), 15000.0, 10.0), n, 2.0)
    inv_s2 = rng.uniform(0.5, 2.0, (m, n // 2 + 1))
    if shared:
        ctf, inv_s2 = ctf[:1], inv_s2[:1]
    x = forward_model(proj, a, ctf=np.broadcast_to(ctf, (m,) + ctf.shape[1:]))
    x = x + rng.normal(0, 3, x.shape) + 1j * rng.normal(0, 3, x.shape)
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, m, n_rot)))
    shifts = rng.uniform(-3, 3, (m, n_shift, 2))
    rs = rng.uniform(-1, 1, (m, n_rot, 2))
    ops = get_score_fn().bind_batch(proj, x, ctf, inv_s2, r_max_px=9.0)
    assert (ops.ctf_stride == 0) == shared and (ops.sigma_stride == 0) == shared
    zeros_r, zeros_s = np.zeros((m, n_rot)), np.zeros((m, n_shift))
    for radius in (4.5, 9.0):
        cpu = score_poses(
            proj, x, ctf, inv_s2, rots, shifts, r_max_px=radius, rotation_shifts_px=rs
        )
        grid = ops.score(rots, shifts, r_max_px=radius, rotation_shifts_px=rs)
        got = grid.values(zeros_r, zeros_s)
        assert np.abs(got - cpu).max() <= 1e-5 * np.abs(cpu).max()
        j, s, _ = grid.best(zeros_r, zeros_s)
        np.testing.assert_array_equal((j, s), HostGrid(cpu).best(zeros_r, zeros_s)[:2])
    with pytest.raises(ValueError, match="exceeds"):
        ops.score(rots, shifts, r_max_px=9.5, rotation_shifts_px=rs)
    want, k_want = weighted_projection_power(
        proj, np.broadcast_to(ctf, x.shape), inv_s2, a, r_max_px=9.0
    )
    got, k_got = ops.power(a, r_max_px=9.0)
    order = np.argsort(k_want, kind="stable")  # the bound batch's radius order
    np.testing.assert_allclose(k_got, k_want[order])
    assert np.abs(got - want[:, order]).max() <= 1e-5 * np.abs(want).max()

    # the sums the search takes (power_sums): high band and a radius-weighted
    # sum, added on the device in double
    def weights(k):
        return np.stack([k > 4.5, np.where(k > 4.5, 0.0, 0.3 * k * k)])

    sums = ops.power_sums(a, weights, r_max_px=9.0)
    assert sums.shape == (m, 2)
    np.testing.assert_allclose(sums, want @ weights(k_want).T, rtol=1e-5)
    with pytest.raises(ValueError, match="weights must have shape"):
        ops.power_sums(a, lambda k: np.ones((2, k.size + 1)), r_max_px=9.0)
    # rotations about a fulcrum formed on the device (score_local) score as
    # the same rotations formed on the host; v = 0 is the consensus itself
    v = rng.normal(0, 3, (m, n_rot, 3))
    v[:, 0] = 0.0
    f = np.array([2.0, -3.0, 1.5])
    rot_h, term_h = rotations_about_fulcrum(a, v, f)
    assert np.array_equal(rot_h[:, 0], a) and not term_h[:, 0].any()
    for radius in (4.5, 9.0):
        want = ops.score(rot_h, shifts, r_max_px=radius, rotation_shifts_px=term_h)
        got = ops.score_local(a, v, shifts, fulcrum_px=f, r_max_px=radius)
        np.testing.assert_allclose(
            got.values(zeros_r, zeros_s), want.values(zeros_r, zeros_s), rtol=1e-6
        )


def _bound_batch_case(rng, *, seed: int, m: int, n_rot: int, n: int = 20):
    """``m`` CTF-modulated projections of a blob map (box ``n``) with random
    noise weights, and ``n_rot`` random candidate rotations per particle:
    ``(projector, images_f, ctf, inv_sigma2, rotations)``."""
    proj = FourierProjector(blob_map(n, seed=seed))
    a = euler_to_matrix(*rng.uniform(-180, 180, (3, m)))
    ctf = ctf_2d(CtfParams(rng.uniform(8000, 20000, m), 15000.0, 10.0), n, 2.0)
    x = forward_model(proj, a, ctf=ctf)
    inv_s2 = rng.uniform(0.5, 2.0, (m, n // 2 + 1))
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, m, n_rot)))
    return proj, x, ctf, inv_s2, rots


def test_bound_batch_reading_cells_scores_exactly_as_reading_the_volume(
    fake_pycuda, rng, monkeypatch
):
    """`$LOCALREFINE_SCORE_SAMPLER=cells`: the bound batch's stages score with
    the cells variant (one set of cells for the batch's largest radius) and get
    the volume variant's scores bit for bit; an unknown sampler is refused."""
    from localrefine_plugin.kernels import cuda_projector
    from localrefine_plugin.kernels.cuda_scoring import SAMPLER_ENV, get_score_fn

    m, n_rot, n_shift = 2, 6, 40
    proj, x, ctf, inv_s2, rots = _bound_batch_case(rng, seed=9, m=m, n_rot=n_rot)
    shifts = rng.uniform(-3, 3, (m, n_shift, 2))
    zeros_r, zeros_s = np.zeros((m, n_rot)), np.zeros((m, n_shift))
    grids = {}
    for sampler in ("volume", "cells"):
        monkeypatch.setenv(SAMPLER_ENV, sampler)
        ops = get_score_fn().bind_batch(proj, x, ctf, inv_s2, r_max_px=8.0)
        for radius in (4.5, 8.0):
            grid = ops.score(rots, shifts, r_max_px=radius, rotation_shifts_px=None)
            grids[sampler, radius] = grid.values(zeros_r, zeros_s)
    for radius in (4.5, 8.0):
        np.testing.assert_array_equal(grids["cells", radius], grids["volume", radius])
    assert list(cuda_projector._cells) == [(id(proj), 18)]  # floor(2 * 8) + 2
    monkeypatch.setenv(SAMPLER_ENV, "texture")
    with pytest.raises(ValueError, match="LOCALREFINE_SCORE_SAMPLER must be"):
        ops.score(rots, shifts, r_max_px=4.5, rotation_shifts_px=None)


def _stages_under(monkeypatch, rng, seed: int, settings: list[dict]):
    """One bound batch (2 particles, 70 rotations) scored for 40 and 20 shifts
    under each setting (environment variable -> value). Returns the variants
    launched in order, the scores ``{(setting index, S): (m, J, S)}``, and the
    last batch ops with its rotations and shifts."""
    from localrefine_plugin.kernels import cuda_search_ops
    from localrefine_plugin.kernels.cuda_scoring import get_score_fn

    m, n_rot = 2, 70
    proj, x, ctf, inv_s2, rots = _bound_batch_case(rng, seed=seed, m=m, n_rot=n_rot)
    used = []
    launch = cuda_search_ops.launch_score_tiles

    def spy(variant, *args, **kw):
        used.append(variant)
        return launch(variant, *args, **kw)

    monkeypatch.setattr(cuda_search_ops, "launch_score_tiles", spy)
    shifts = {s: rng.uniform(-3, 3, (m, s, 2)) for s in (40, 20)}
    values = {}
    for i, setting in enumerate(settings):
        for name, value in setting.items():
            monkeypatch.setenv(name, value)
        ops = get_score_fn().bind_batch(proj, x, ctf, inv_s2, r_max_px=8.0)
        for n_shift in (40, 20):
            grid = ops.score(
                rots, shifts[n_shift], r_max_px=8.0, rotation_shifts_px=None
            )
            values[i, n_shift] = grid.values(
                np.zeros((m, n_rot)), np.zeros((m, n_shift))
            )
    return used, values, (ops, rots, shifts[40])


def test_a_forced_scoring_variant_serves_every_stage_with_the_same_scores(
    fake_pycuda, rng, monkeypatch
):
    """`$LOCALREFINE_SCORE_VARIANT` (for measurements) puts one kernel variant
    under every stage, whatever S (here 40 and 20 shifts), with the default
    variants' scores to float32 rounding; an unknown variant is refused."""
    from localrefine_plugin.kernels.cuda_scoring import VARIANT_ENV

    used, values, (ops, rots, shifts) = _stages_under(
        monkeypatch, rng, 10, [{VARIANT_ENV: ""}, {VARIANT_ENV: "j64_s64_cells"}]
    )
    assert used == ["s64", "s32", "j64_s64_cells", "j64_s64_cells"]
    for n_shift in (40, 20):
        want, got = values[0, n_shift], values[1, n_shift]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    monkeypatch.setenv(VARIANT_ENV, "s128")
    with pytest.raises(ValueError, match="LOCALREFINE_SCORE_VARIANT must be one of"):
        ops.score(rots, shifts, r_max_px=8.0, rotation_shifts_px=None)


def test_rotation_lanes_serve_the_stages_with_their_rl_twins(
    fake_pycuda, rng, monkeypatch
):
    """`$LOCALREFINE_SCORE_LANES=rotations` scores each stage with the `_rl` twin
    of its default variant (s64 for 40 shifts, s32 for 20; s64_cells with the
    cells sampler), `$LOCALREFINE_SCORE_WIDE=1` with the `_wide` twin, both
    with the same scores to float32 rounding; other values, and wide tiles
    reading the cells, are refused."""
    from localrefine_plugin.kernels.cuda_scoring import LANES_ENV, SAMPLER_ENV, WIDE_ENV

    settings = [
        {LANES_ENV: "pixels", SAMPLER_ENV: "volume", WIDE_ENV: "0"},
        {LANES_ENV: "rotations", SAMPLER_ENV: "volume", WIDE_ENV: "0"},
        {LANES_ENV: "rotations", SAMPLER_ENV: "cells", WIDE_ENV: "0"},
        {LANES_ENV: "rotations", SAMPLER_ENV: "volume", WIDE_ENV: "1"},
        {LANES_ENV: "pixels", SAMPLER_ENV: "volume", WIDE_ENV: "1"},
    ]
    used, values, (ops, rots, shifts) = _stages_under(monkeypatch, rng, 11, settings)
    assert used == [
        "s64", "s32", "s64_rl", "s32_rl", "s64_cells_rl", "s64_cells_rl",
        "s64_wide_rl", "s32_wide_rl", "s64_wide", "s32_wide",
    ]  # fmt: skip
    for n_shift in (40, 20):
        want = values[0, n_shift]
        for i in range(1, len(settings)):
            got = values[i, n_shift]
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    monkeypatch.setenv(SAMPLER_ENV, "cells")
    with pytest.raises(ValueError, match="LOCALREFINE_SCORE_WIDE=1 has no variant"):
        ops.score(rots, shifts, r_max_px=8.0, rotation_shifts_px=None)
    monkeypatch.setenv(LANES_ENV, "diagonal")
    with pytest.raises(ValueError, match="LOCALREFINE_SCORE_LANES must be"):
        ops.score(rots, shifts, r_max_px=8.0, rotation_shifts_px=None)


def test_bound_batch_too_large_for_the_card_says_which_batch_size_fits(
    fake_pycuda, rng, monkeypatch
):
    """A batch whose images cannot fit in half the free device memory fails
    before it is uploaded, naming the batch size that fits."""
    import pycuda.driver as drv

    from localrefine_plugin.kernels.cuda_scoring import get_score_fn

    n, m = 20, 6
    proj = FourierProjector(blob_map(n, seed=8))
    x = np.zeros((m, n, n // 2 + 1), np.complex64)
    ctf = np.ones((m, n, n // 2 + 1))
    per_particle = n * (n // 2 + 1) * 12  # complex64 image + float32 CTF
    monkeypatch.setattr(drv, "mem_get_info", lambda: (4 * per_particle, 2**30))
    with pytest.raises(RuntimeError, match="give --batch-size 2 or less"):
        get_score_fn().bind_batch(proj, x, ctf, np.ones(n // 2 + 1), r_max_px=8.0)


def test_cuda_backend_reconstructs_and_estimates_noise_like_the_cpu(
    fake_pycuda, tmp_path
):
    """`--device cuda` inserts with `CudaBackProjector` and projects the noise
    pass's predictions with `CudaProjector`: the half maps, their FSC and
    sigma^2 equal the CPU backend's."""
    from localrefine_plugin.engine import mrc_io, refine_steps
    from localrefine_plugin.engine.particles import read_particles
    from localrefine_plugin.engine.reconstruct import reconstruct_particles
    from localrefine_plugin.engine.refine_device import select_backend
    from localrefine_plugin.engine.refine_options import RefineOptions
    from localrefine_plugin.kernels.cuda_backprojector import CudaBackProjector
    from localrefine_plugin.kernels.cuda_projector import CudaProjector

    from .test_refine import make_dataset

    data = make_dataset(tmp_path / "data", n=12, snr=2.0)
    particles = read_particles(data["star"])
    mask, _ = mrc_io.read_map(data["mask"])
    gpu, cpu = select_backend("cuda"), select_backend("cpu")
    assert gpu.backprojector is CudaBackProjector
    assert isinstance(gpu.projector(FourierProjector(blob_map(24))), CudaProjector)
    options = RefineOptions(batch_size=5)  # several batches
    rec = {
        b.name: refine_steps.reconstruct_and_compare(
            reconstruct_particles(
                particles, batch_size=options.batch_size, backprojector=b.backprojector
            ),
            mask,
            pixel_size_a=particles.pixel_size_a,
            options=options,
        )
        for b in (cpu, gpu)
    }
    scale = np.abs(rec["cpu"].raw_halves).max()
    assert np.abs(rec["cuda"].raw_halves - rec["cpu"].raw_halves).max() <= 1e-4 * scale
    got, want = rec["cuda"].fsc.resolution_0143, rec["cpu"].fsc.resolution_0143
    assert got.value_a == pytest.approx(want.value_a, rel=1e-4)
    launches = fake_pycuda["modules"]["backprojector.cu"].launches
    assert {name for name, _, _ in launches} == {"backproject_f32"}
    refs = rec["cpu"].halves * mask
    sigma2 = {
        b.name: refine_steps.estimate_noise(
            particles,
            refs,
            rotations=particles.matrices(),
            origins_px=particles.origin_px,
            options=options,
            backend=b,
        )  # fmt: skip
        for b in (cpu, gpu)
    }
    np.testing.assert_allclose(sigma2["cuda"], sigma2["cpu"], rtol=1e-4)
    assert fake_pycuda["modules"]["projector.cu"].launches


@pytest.mark.slow
def test_refinement_with_the_cuda_backend_equals_the_cpu_one(
    fake_pycuda, tmp_path, monkeypatch
):
    """`run_local_refinement(device="cuda")` end to end on the emulated GPU
    (search, insertion and noise pass on the "device"; about 40 s): the CPU
    run's poses, and its resolution within 1 %. The GPU searches each read
    batch whole, the CPU a few particles at a time."""
    from localrefine_plugin.engine import search
    from localrefine_plugin.engine.refine import RefineOptions, run_local_refinement
    from localrefine_plugin.engine.search_ops import CPU_SEARCH_BATCH

    from .test_refine import FAST, make_dataset, read_poses

    searched = []  # (particles read, particles searched together) per batch
    real_search = search.local_search

    def spy(projector, images_f, *args, **kw):
        searched.append((images_f.shape[0], kw["batch_size"]))
        return real_search(projector, images_f, *args, **kw)

    monkeypatch.setattr(search, "local_search", spy)
    data = make_dataset(tmp_path / "data", n=6, snr=2.0, perturb_deg=1.0)
    options = RefineOptions(**dict(FAST, rotation_extent_deg=1.5, batch_size=4))
    runs, searched_by = {}, {}
    for device in ("cpu", "cuda"):
        searched.clear()
        runs[device] = run_local_refinement(
            data["star"],
            data["reference"],
            data["mask"],
            output_dir=tmp_path / device,
            options=options,
            device=device,
        )  # fmt: skip
        searched_by[device] = list(searched)
    assert {b for _, b in searched_by["cpu"]} == {CPU_SEARCH_BATCH}
    assert searched_by["cuda"] and all(b == m for m, b in searched_by["cuda"])
    launched = {
        name for module in fake_pycuda["modules"].values()
        for name, _, _ in module.launches
    }  # fmt: skip
    assert {"backproject_f32", "project_slices", "fold_weights"} <= launched
    assert any(name.startswith("score_tiles") for name in launched)
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert gpu.summary["device"] == "cuda" and cpu.summary["device"] == "cpu"
    assert gpu.summary["batch_size"] == cpu.summary["batch_size"] == 4  # as given
    assert gpu.resolution_a == pytest.approx(cpu.resolution_a, rel=0.01)
    rot_c, org_c = read_poses(tmp_path / "cpu" / "particles.star")
    rot_g, org_g = read_poses(tmp_path / "cuda" / "particles.star")
    np.testing.assert_allclose(rot_g, rot_c, atol=1e-6)
    np.testing.assert_allclose(org_g, org_c, atol=1e-6)
