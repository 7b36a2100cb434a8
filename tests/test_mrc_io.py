"""MRC maps and stacks: round trips, memory maps, atomic writes, clear errors."""

from __future__ import annotations

import re
import subprocess

import mrcfile
import numpy as np
import pytest

from localrefine_plugin.engine.errors import InputError
from localrefine_plugin.engine.mrc_io import (
    StackWriter,
    open_stack,
    read_map,
    stack_info,
    write_map,
    write_stack,
)

from .conftest import blob_map


def _only_file(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("n", [15, 16], ids=["odd", "even"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_map_round_trip_keeps_data_and_pixel_size(tmp_path, n, dtype):
    vol = blob_map(n, seed=n).astype(dtype)
    path = tmp_path / "map.mrc"
    write_map(path, vol, 1.37)
    back, pixel_size = read_map(path)
    assert back.dtype == np.float32 and back.shape == (n, n, n)
    np.testing.assert_array_equal(back, vol.astype(np.float32))
    assert pixel_size == pytest.approx(1.37, rel=1e-6)
    assert _only_file(tmp_path) == ["map.mrc"]  # no temporary left behind
    # axis order: mrcfile (independent reader) sees nx along the last index
    with mrcfile.open(path) as mrc:
        np.testing.assert_array_equal(mrc.data, vol.astype(np.float32))
        assert mrc.header.cella.z == pytest.approx(1.37 * n, rel=1e-6)


def test_write_map_replaces_existing_file_atomically(tmp_path):
    path = tmp_path / "map.mrc"
    write_map(path, np.zeros((8, 8, 8)), 1.0)
    write_map(path, np.ones((8, 8, 8)), 2.0)
    vol, pixel_size = read_map(path)
    assert vol.min() == 1.0 and pixel_size == 2.0
    assert _only_file(tmp_path) == ["map.mrc"]


def test_missing_map(tmp_path):
    with pytest.raises(InputError, match="file not found") as err:
        read_map(tmp_path / "absent.mrc")
    assert err.value.path == str(tmp_path / "absent.mrc")


def test_truncated_map_is_reported_before_reading(tmp_path):
    path = tmp_path / "map.mrc"
    write_map(path, blob_map(16), 1.0)
    data = path.read_bytes()
    cut = tmp_path / "cut.mrc"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="truncated") as err:
        read_map(cut)
    assert err.value.path == str(cut)
    assert (
        str(len(data) - 100) in err.value.problem
        and str(len(data)) in err.value.problem
    )
    short = tmp_path / "short.mrc"
    short.write_bytes(data[:300])  # not even a whole header
    with pytest.raises(InputError, match="not a readable MRC file"):
        read_map(short)


def test_not_an_mrc_file(tmp_path):
    path = tmp_path / "text.mrc"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="not an MRC file") as err:
        read_map(path)
    assert err.value.path == str(path)


def test_non_cubic_map(tmp_path):
    path = tmp_path / "box.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((8, 10, 10), dtype=np.float32))
        mrc.voxel_size = 1.0
    with pytest.raises(
        InputError, match=re.escape("(nz, ny, nx) = (8, 10, 10)")
    ) as err:
        read_map(path)
    assert "not a cubic volume" in err.value.problem and err.value.fix


def test_nan_in_map(tmp_path):
    vol = blob_map(12)
    vol[3, 4, 5] = np.nan
    vol[0, 0, 0] = np.inf
    path = tmp_path / "nan.mrc"
    with pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile warns when writing it
        write_map(path, vol, 1.0)
    with pytest.raises(InputError, match="2 NaN or infinite values") as err:
        read_map(path)
    assert err.value.path == str(path)


def test_zero_pixel_size_in_header(tmp_path):
    path = tmp_path / "zero.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((8, 8, 8), dtype=np.float32))
        mrc.voxel_size = 0.0
    with pytest.raises(InputError, match="pixel size in the header is 0") as err:
        read_map(path)
    assert "--force_header_angpix" in err.value.fix


def test_open_stack_is_a_read_only_memmap(tmp_path):
    images = np.random.default_rng(3).normal(size=(7, 12, 12)).astype(np.float32)
    path = tmp_path / "stack.mrcs"
    write_stack(path, images, 2.5)
    assert stack_info(path) == (7, 12, pytest.approx(2.5))
    stack = open_stack(path)
    assert isinstance(stack, np.memmap) and stack.shape == (7, 12, 12)
    assert not stack.flags.writeable
    np.testing.assert_array_equal(stack[[4, 1]], images[[4, 1]])
    with mrcfile.open(path) as mrc:  # written as an image stack
        assert mrc.is_image_stack()


def test_single_image_counts_as_stack_of_one(tmp_path):
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    path = tmp_path / "one.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(image)
        mrc.voxel_size = 1.5
    assert stack_info(path) == (1, 10, pytest.approx(1.5))
    np.testing.assert_array_equal(open_stack(path)[0], image)


def test_integer_stack_keeps_its_values(tmp_path):
    images = np.arange(2 * 6 * 6, dtype=np.int16).reshape(2, 6, 6) - 30
    path = tmp_path / "int.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(images)
    stack = open_stack(path)
    assert stack.dtype == np.int16
    np.testing.assert_array_equal(stack, images)


def test_truncated_and_non_square_stacks(tmp_path):
    path = tmp_path / "stack.mrcs"
    write_stack(path, np.zeros((5, 8, 8)), 1.0)
    cut = tmp_path / "cut.mrcs"
    cut.write_bytes(path.read_bytes()[:-8])
    for func in (stack_info, open_stack):
        with pytest.raises(InputError, match="truncated"):
            func(cut)
    rect = tmp_path / "rect.mrcs"
    with mrcfile.new(rect) as mrc:
        mrc.set_data(np.zeros((2, 8, 6), dtype=np.float32))
    with pytest.raises(InputError, match="not square"):
        stack_info(rect)


def test_stack_writer_streams_batches(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.normal(size=(10, 8, 8)).astype(np.float32)
    path = tmp_path / "big.mrcs"
    with StackWriter(path, 10, 8, 1.2) as writer:
        assert not path.exists()  # only the temporary exists while writing
        for start in (6, 0, 3):  # any order
            stop = {0: 3, 3: 6, 6: 10}[start]
            writer.write(start, images[start:stop])
    np.testing.assert_array_equal(open_stack(path), images)
    with mrcfile.open(path) as mrc:
        assert mrc.voxel_size.x == pytest.approx(1.2)
        assert mrc.header.dmin == pytest.approx(images.min())
        assert mrc.header.dmax == pytest.approx(images.max())
        assert mrc.header.dmean == pytest.approx(
            images.mean(dtype=np.float64), abs=1e-6
        )
        assert mrc.header.rms == pytest.approx(images.std(dtype=np.float64), rel=1e-5)
    assert _only_file(tmp_path) == ["big.mrcs"]


def test_stack_writer_leaves_nothing_after_an_exception(tmp_path):
    path = tmp_path / "big.mrcs"
    with pytest.raises(RuntimeError, match="simulated failure"):
        with StackWriter(path, 4, 8, 1.0) as writer:
            writer.write(0, np.ones((2, 8, 8)))
            raise RuntimeError("simulated failure")
    assert _only_file(tmp_path) == []


def test_stack_writer_rejects_an_incomplete_stack(tmp_path):
    path = tmp_path / "big.mrcs"
    with pytest.raises(RuntimeError, match="2 of 4 images were never written"):
        with StackWriter(path, 4, 8, 1.0) as writer:
            writer.write(0, np.ones((2, 8, 8)))
    assert _only_file(tmp_path) == []
    with pytest.raises(ValueError, match="outside the stack"):
        with StackWriter(path, 4, 8, 1.0) as writer:
            writer.write(3, np.ones((2, 8, 8)))
    assert _only_file(tmp_path) == []


@pytest.mark.relion
def test_relion_reads_our_files_and_we_read_relions(tmp_path, relion_bin):
    vol = np.arange(6**3, dtype=np.float32).reshape(6, 6, 6)
    write_map(tmp_path / "m.mrc", vol, 1.25)
    write_stack(tmp_path / "s.mrcs", vol[:3], 1.25)
    handler = str(relion_bin / "relion_image_handler")

    def stats(name):
        out = subprocess.run(
            [handler, "--i", name, "--stats"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        return [line for line in out.splitlines() if "avg=" in line]

    (line,) = stats("m.mrc")
    assert "6 x 6 x 6 x 1" in line and "angpix = 1.25" in line
    assert float(re.search(r"avg= (\S+)", line).group(1)) == pytest.approx(vol.mean())
    lines = stats("s.mrcs")
    assert len(lines) == 3 and all("6 x 6 x 1 x 1" in s for s in lines)
    avgs = [float(re.search(r"avg= (\S+)", s).group(1)) for s in lines]
    np.testing.assert_allclose(avgs, vol[:3].mean(axis=(1, 2)), rtol=1e-5)
    subprocess.run(
        [handler, "--i", "m.mrc", "--o", "m2.mrc", "--multiply_constant", "2"],
        cwd=tmp_path,
        capture_output=True,
        check=True,
        timeout=60,
    )
    back, pixel_size = read_map(tmp_path / "m2.mrc")
    np.testing.assert_array_equal(back, 2 * vol)
    assert pixel_size == pytest.approx(1.25)


def test_written_files_get_the_usual_permissions(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    usual = plain.stat().st_mode & 0o777  # what the umask gives an ordinary file
    write_map(tmp_path / "m.mrc", np.zeros((4, 4, 4)), 1.0)
    write_stack(tmp_path / "s.mrcs", np.zeros((2, 4, 4)), 1.0)
    with StackWriter(tmp_path / "w.mrcs", 1, 4, 1.0) as writer:
        writer.write(0, np.zeros((1, 4, 4)))
    for name in ("m.mrc", "s.mrcs", "w.mrcs"):
        assert (tmp_path / name).stat().st_mode & 0o777 == usual, name
