"""Shared fixtures: RELION programs, the shared structures, deterministic test maps."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _required(what: str) -> bool:
    """CI sets LOCALREFINE_REQUIRE=relion,structures,... so that these never skip there."""
    return what in os.environ.get("LOCALREFINE_REQUIRE", "").split(",")


def _missing(what: str, message: str):
    if _required(what):
        pytest.fail(f"{message} (required by LOCALREFINE_REQUIRE={what})")
    pytest.skip(message)


@pytest.fixture(scope="session")
def relion_bin():
    """Directory holding RELION's programs; skips (or fails in CI) when absent."""
    exe = shutil.which("relion_project")
    if exe is None:
        _missing("relion", "RELION is not installed (apt-get install relion)")
    return Path(exe).parent


@pytest.fixture(scope="session")
def structures_dir() -> Path:
    """``../shared/structures`` beside the repository (or $LOCALREFINE_STRUCTURES)."""
    path = Path(
        os.environ.get(
            "LOCALREFINE_STRUCTURES", REPO_ROOT.parent / "shared" / "structures"
        )
    )
    if not (path / "1hzh_igg1_b12.pdb").is_file():
        _missing("structures", f"real structures not found in {path}")
    return path


def blob_map(
    n: int, *, seed: int = 0, n_blobs: int = 40, sigma_px: float = 1.5
) -> np.ndarray:
    """A deterministic test map (N, N, N) float32: Gaussian blobs inside a sphere.

    Blobs lie within radius ``0.3 N`` of the centre ``N // 2``; the map is smooth
    enough to be nearly band-limited at Nyquist (sigma 1.5 px).
    """
    rng = np.random.default_rng(seed)
    c = n // 2
    centres = []
    while len(centres) < n_blobs:
        p = rng.uniform(-0.3 * n, 0.3 * n, 3)
        if np.linalg.norm(p) < 0.3 * n:
            centres.append(p)
    z, y, x = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    vol = np.zeros((n, n, n), dtype=np.float64)
    for px, py, pz in centres:
        amp = rng.uniform(0.5, 1.5)
        vol += amp * np.exp(
            -((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * sigma_px**2)
        )
    return vol.astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator: every test is reproducible."""
    return np.random.default_rng(12345)


@pytest.fixture
def benchmark_module(monkeypatch):
    """``benchmark_module(name)``: a script of ``benchmarks/`` imported as a
    module (its folder on ``sys.path`` for this test, so that spawned
    processes import it too); BLAS thread variables restored after the test
    (``bench_gpu`` sets them on import)."""
    import importlib

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    return importlib.import_module
