"""MPI runs of the refinement (``mpirun -np 2``) against one process.

Truth here is the single-process run on the same data: two ranks must give the
same poses (1e-3 deg) and maps (FSC >= 0.999), and a two-rank run whose rank 0
is killed after iteration 1 and resumed with ``--continue`` must end where an
uninterrupted run ends. Skips without ``mpirun`` or ``mpi4py`` (fails instead
under ``LOCALREFINE_REQUIRE=mpi``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from localrefine_plugin.engine import mrc_io
from localrefine_plugin.engine import particles as particles_mod
from localrefine_plugin.engine.fsc import fsc_curve
from localrefine_plugin.engine.geometry import geodesic_angle_deg
from localrefine_plugin.engine.parallel import (
    SerialComm,
    get_comm,
    launched_by_mpi,
    share_indices,
)
from localrefine_plugin.engine.refine import RefineOptions, run_local_refinement
from localrefine_plugin.engine.star import read_star, write_star

from .conftest import _missing
from .test_refine import make_dataset

OPTIONS = dict(
    rotation_extent_deg=3.0,
    shift_extent_px=1.0,
    shift_resolution_px=0.5,
    alignment_resolution_deg=1.5,
    max_iterations=2,
    batch_size=32,
)
CLI_OPTIONS = [
    "--rotation-extent", "3", "--shift-extent", "1", "--shift-resolution", "0.5",
    "--alignment-resolution", "1.5", "--max-iterations", "2", "--batch-size", "32",
]  # fmt: skip
LAUNCH = "import sys; from localrefine_plugin.cli import entry_point; sys.exit(entry_point())"


# -- without MPI -------------------------------------------------------------------
def test_share_indices_cover_every_item_once_in_order():
    for n in (0, 1, 5, 7, 64):
        for size in (1, 2, 3, 8):
            parts = [list(range(n))[share_indices(n, r, size)] for r in range(size)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        share_indices(4, 2, 2)


def test_serial_comm_is_the_identity():
    comm = get_comm("auto") if not launched_by_mpi() else SerialComm()
    assert isinstance(comm, SerialComm) and comm.size == 1 and comm.is_root
    a = np.arange(5.0)
    assert comm.allreduce_sum(a) is a and np.array_equal(a, np.arange(5.0))
    assert comm.share([1, 2, 3]) == [1, 2, 3] and comm.allgather(4) == [4]


def test_launcher_detection():
    assert launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "2"})
    assert launched_by_mpi({"PMI_SIZE": "4"}) and launched_by_mpi({"PMIX_RANK": "0"})
    assert not launched_by_mpi({"HOME": "/root"})


# -- with mpirun ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpirun():
    exe = shutil.which("mpirun")
    if exe is None:
        _missing("mpi", "mpirun is not installed (apt-get install openmpi-bin)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        _missing("mpi", "mpi4py is not installed (pip install .[mpi])")
    return exe


def _mpi_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        PYTHONUNBUFFERED="1",
    )
    for var in list(env):  # a test run itself under mpirun must not leak its rank
        if var.startswith(("OMPI_COMM_WORLD", "PMI_", "PMIX_")):
            del env[var]
    return env


def _mpi_command(mpirun: str, ranks: int, *args: str) -> list[str]:
    return [mpirun, "--oversubscribe", "-np", str(ranks), sys.executable, *args]


def test_allreduce_sums_in_rank_order(mpirun, tmp_path):
    """Sums equal NumPy's rank-order sums bit for bit, in chunks smaller than the array."""
    script = tmp_path / "reduce.py"
    script.write_text(
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from localrefine_plugin.engine import parallel\n"
        "parallel.REDUCE_CHUNK_BYTES = 1000\n"
        "comm = parallel.get_comm()\n"
        "def part(r):\n"
        "    g = np.random.default_rng(r)\n"
        "    return g.normal(size=(301,)) * 10.0 ** g.integers(-8, 8, 301)"
        " + 1j * g.normal(size=301)\n"
        "x = comm.allreduce_sum(part(comm.rank).copy())\n"
        "want = part(0)\n"
        "for r in range(1, comm.size):\n"
        "    want = want + part(r)\n"
        "k = comm.allreduce_sum(np.array([comm.rank + 1], dtype=np.int64))\n"
        "ok = np.array_equal(x, want) and k[0] == comm.size * (comm.size + 1) // 2\n"
        "out = Path(sys.argv[1]) / f'rank{comm.rank}.txt'\n"
        "out.write_text(f'rank {comm.rank} of {comm.size} ok={ok}')\n"
    )
    run = subprocess.run(
        _mpi_command(mpirun, 3, str(script), str(tmp_path)),
        env=_mpi_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in range(3)]
    assert lines == [f"rank {r} of 3 ok=True" for r in range(3)], run.stderr[-3000:]


def _two_stacks(data: dict) -> None:
    """Split the dataset's one stack into two and point the STAR file at them."""
    folder = data["star"].parent
    images = np.array(mrc_io.open_stack(folder / "images.mrcs"))  # (n, N, N)
    px = mrc_io.stack_info(folder / "images.mrcs")[2]
    half = images.shape[0] // 2 + 7
    mrc_io.write_stack(folder / "first.mrcs", images[:half], px)
    mrc_io.write_stack(folder / "second.mrcs", images[half:], px)
    (folder / "images.mrcs").unlink()
    doc = read_star(data["star"])
    names = [
        f"{i + 1:06d}@first.mrcs" if i < half else f"{i - half + 1:06d}@second.mrcs"
        for i in range(images.shape[0])
    ]
    doc["particles"].set_column("rlnImageName", names, fmt="{}")
    write_star(data["star"], doc)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mpi")
    data = make_dataset(
        folder / "data", n=240, snr=2.0, perturb_deg=2.5, perturb_px=0.6, seed=11
    )
    _two_stacks(data)
    return data, folder


@pytest.fixture(scope="module")
def serial_run(dataset):
    data, folder = dataset
    out = folder / "serial"
    run_local_refinement(
        data["star"],
        data["reference"],
        data["mask"],
        output_dir=out,
        options=RefineOptions(**OPTIONS),
        comm=SerialComm(),
    )
    return out


def _refine_args(data: dict, out: Path, *extra: str) -> list[str]:
    return [
        "-c", LAUNCH, "refine", "--particles", str(data["star"]),
        "--reference", str(data["reference"]), "--mask", str(data["mask"]),
        "--output", str(out), *CLI_OPTIONS, *extra,
    ]  # fmt: skip


def _assert_same_run(out: Path, ref: Path) -> dict:
    """Poses within 1e-3 deg and 1e-3 px, every map at FSC >= 0.999; return figures."""
    a = particles_mod.read_particles(out / "particles.star")
    b = particles_mod.read_particles(ref / "particles.star")
    angle = geodesic_angle_deg(a.matrices(), b.matrices())
    shift = np.abs(np.asarray(a.origin_px) - np.asarray(b.origin_px))
    assert angle.max() < 1e-3 and shift.max() < 1e-3
    figures = {"max_angle_deg": float(angle.max()), "max_shift_px": float(shift.max())}
    for name in ("map.mrc", "half_map_1.mrc", "half_map_2.mrc"):
        m1, _ = mrc_io.read_map(out / name)
        m2, _ = mrc_io.read_map(ref / name)
        fsc = fsc_curve(m1, m2)
        assert fsc[1:].min() >= 0.999, (name, fsc.min())
        figures[name] = float(np.abs(m1 - m2).max() / np.abs(m2).max())
    s1 = json.loads((out / "summary.json").read_text())
    s2 = json.loads((ref / "summary.json").read_text())
    assert s1["iterations"] == s2["iterations"]
    assert s1["resolution_A"] == pytest.approx(s2["resolution_A"], rel=1e-6)
    return figures


@pytest.fixture(scope="module")
def two_rank_run(mpirun, dataset):
    data, folder = dataset
    out = folder / "two_ranks"
    run = subprocess.run(
        _mpi_command(mpirun, 2, *_refine_args(data, out)),
        env=_mpi_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return out, run.stderr


@pytest.mark.slow
def test_two_ranks_match_one_process(two_rank_run, serial_run, record_property):
    out, log_text = two_rank_run
    assert "rank 0 of 2" in log_text and "rank 1 of 2" in log_text
    figures = _assert_same_run(out, serial_run)
    record_property("two_ranks_vs_serial", figures)
    # only rank 0 wrote: one log, no stray temporary files
    assert json.loads((out / "summary.json").read_text())["mpi_ranks"] == 2
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    assert "MPI: 2 ranks" in (out / "refine.log").read_text()


def _rank_pids(parent: int) -> dict[int, int]:
    """MPI rank -> pid of the rank processes started by ``mpirun`` (pid ``parent``)."""
    found = {}
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in map(int, children):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                found[int(item.split(b"=")[1])] = pid
    return found


@pytest.mark.slow
def test_killed_rank_then_continue_ends_like_an_uninterrupted_run(
    mpirun, dataset, two_rank_run, record_property
):
    data, folder = dataset
    out = folder / "killed"
    first = out / "checkpoints" / "iteration_001.npz"
    proc = subprocess.Popen(
        _mpi_command(mpirun, 2, *_refine_args(data, out)),
        env=_mpi_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not first.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 600 s"
            time.sleep(0.05)
        ranks = _rank_pids(proc.pid)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[0], signal.SIGKILL)  # the writing rank, mid-iteration 2
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code != 0
    assert not (out / "summary.json").exists()  # it died before finishing
    resumed = subprocess.run(
        _mpi_command(mpirun, 2, *_refine_args(data, out, "--continue")),
        env=_mpi_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "continuing after iteration" in resumed.stderr
    figures = _assert_same_run(out, two_rank_run[0])
    record_property("resumed_vs_uninterrupted", figures)


# -- bounded memory --------------------------------------------------------------------
def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status (not Linux)")


def test_streamed_stack_pages_do_not_stay_resident(tmp_path):
    """Reading a 64 MiB stack batch by batch leaves < 8 MiB of it mapped in this process."""
    n, box = 1024, 128  # 64 MiB of float32
    path = tmp_path / "big.mrcs"
    with mrc_io.StackWriter(path, n, box, 2.0) as writer:
        for start in range(0, n, 256):
            writer.write(start, np.full((256, box, box), start, dtype=np.float32))
    parts = particles_mod.make_particles(
        image_refs=[(path, i) for i in range(n)],
        rot_deg=np.zeros(n),
        tilt_deg=np.zeros(n),
        psi_deg=np.zeros(n),
        origin_px=np.zeros((n, 2)),
        ctf=None,
        pixel_size_a=2.0,
        box=box,
        random_subset=np.arange(n) % 2 + 1,
    )

    def stream(release: bool) -> int:
        before = _rss_file_kib()
        for start in range(0, n, 64):
            images = parts.load_images(np.arange(start, start + 64))
            assert images[0, 0, 0] == start // 256 * 256  # the right images came back
            if release:
                parts.release_pages()
        return _rss_file_kib() - before

    grown_released = stream(True)
    grown_kept = stream(False)  # control: without the release the pages stay mapped
    assert grown_released < 8 * 1024
    assert grown_kept > 48 * 1024
