"""Particle sets: RELION 3.0/3.1 reading, lossless 3.1 writing, images, errors, RELION."""

from __future__ import annotations

import logging
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from localrefine_plugin.engine.ctf import CtfParams
from localrefine_plugin.engine.errors import InputError
from localrefine_plugin.engine.mrc_io import read_map, write_map, write_stack
from localrefine_plugin.engine.particles import (
    make_particles,
    read_particles,
    write_particles,
)
from localrefine_plugin.engine.star import StarDocument, read_star, write_star

DATA = Path(__file__).parent / "data"
SAMPLE_31 = DATA / "relion31_particles.star"
SAMPLE_30 = DATA / "relion30_particles.star"
STACK_31 = [
    "Extract/job007/Movies/20170629_00021_frameImage.mrcs",
    "Extract/job007/Movies/20170629_00022_frameImage.mrcs",
]


def _stacks_for_sample_31(
    folder: Path, *, n_images: int = 2, box: int = 16
) -> list[np.ndarray]:
    """Write the two stacks the 3.1 sample refers to, with distinct random images."""
    rng = np.random.default_rng(7)
    out = []
    for name in STACK_31:
        images = rng.normal(size=(n_images, box, box)).astype(np.float32)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_stack(folder / name, images, 1.77)
        out.append(images)
    return out


def test_reads_relion31_poses_origins_ctf_optics_and_half_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = read_particles(SAMPLE_31)
    assert p.n == 4 and p.box == 16 and p.pixel_size_a == 1.77 and p.has_poses
    np.testing.assert_array_equal(
        p.rot_deg, [-96.48734, 140.63471, 12.00002, -33.91115]
    )
    np.testing.assert_array_equal(
        p.tilt_deg, [77.314205, 102.50139, 44.90812, 166.70273]
    )
    np.testing.assert_array_equal(
        p.psi_deg, [36.868591, -158.12344, 91.557136, -179.99821]
    )
    # Angstrom -> pixels with the optics group's pixel size 1.77 A
    np.testing.assert_allclose(
        p.origin_px, [[2, -1], [-0.5, 3], [0, 0], [-1.5, -2]], atol=1e-12
    )
    np.testing.assert_array_equal(p.optics_group, [1, 1, 2, 2])
    np.testing.assert_array_equal(p.random_subset, [1, 2, 1, 2])
    c = p.ctf
    np.testing.assert_array_equal(
        c.defocus_u_a, [10864.146484] * 2 + [12871.007812] * 2
    )
    np.testing.assert_array_equal(
        c.defocus_v_a, [10575.793945] * 2 + [12486.335938] * 2
    )
    np.testing.assert_array_equal(c.defocus_angle_deg, [77.995003] * 2 + [-5.42315] * 2)
    np.testing.assert_array_equal(
        c.voltage_kv, [200, 200, 300, 300]
    )  # per optics group
    np.testing.assert_array_equal(c.cs_mm, [1.4, 1.4, 2.7, 2.7])
    np.testing.assert_array_equal(c.amplitude_contrast, [0.1, 0.1, 0.07, 0.07])
    np.testing.assert_array_equal(c.bfactor_a2, [0, 0, 15, 15])
    np.testing.assert_array_equal(c.scale, [1, 1, 0.95, 0.95])
    np.testing.assert_array_equal(c.phase_shift_deg, [0, 0, 0, 0])
    # relative names are resolved against the current directory first
    assert p.image_refs == [
        (tmp_path / STACK_31[0], 0),
        (tmp_path / STACK_31[0], 1),
        (tmp_path / STACK_31[1], 0),
        (tmp_path / STACK_31[1], 1),
    ]
    a = p.matrices()
    assert a.shape == (4, 3, 3)
    np.testing.assert_allclose(
        a @ a.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (4, 3, 3)), atol=1e-12
    )
    with pytest.raises(ValueError):
        p.rot_deg[0] = 1.0  # read-only: use with_poses


def test_relion31_write_is_lossless(tmp_path):
    p = read_particles(SAMPLE_31)
    out = tmp_path / "out.star"
    write_particles(out, p)
    assert read_star(out) == read_star(SAMPLE_31)  # every block, column and string


def test_relion30_reads_pixel_origins_and_writes_relion31(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = np.random.default_rng(2).normal(size=(3, 16, 16)).astype(np.float32)
    (tmp_path / "Particles").mkdir()
    write_stack(
        tmp_path / "Particles/mic1.mrcs", images, 1.0
    )  # header differs on purpose
    p = read_particles(SAMPLE_30)
    assert p.pixel_size_a == pytest.approx(2.0)  # 20 um * 1e4 / 100000
    assert p.box == 16
    np.testing.assert_array_equal(p.origin_px, [[2, -1], [-0.5, 3], [0, 0]])
    np.testing.assert_array_equal(p.optics_group, [1, 1, 1])
    np.testing.assert_array_equal(p.ctf.voltage_kv, [300, 300, 300])
    np.testing.assert_array_equal(p.load_images([2, 0]), images[[2, 0]])

    out = tmp_path / "out" / "converted.star"
    write_particles(out, p)
    doc = read_star(out)
    assert doc.names == ["optics", "particles"]
    optics = doc["optics"]
    assert optics.column("rlnVoltage") == ["300.000000"]
    np.testing.assert_array_equal(optics.column_as_float("rlnImagePixelSize"), [2.0])
    np.testing.assert_array_equal(optics.column_as_int("rlnImageSize"), [16])
    block = doc["particles"]
    for gone in (
        "rlnOriginX",
        "rlnOriginY",
        "rlnVoltage",
        "rlnMagnification",
        "rlnDetectorPixelSize",
    ):
        assert not block.has_column(gone)
    np.testing.assert_allclose(block.column_as_float("rlnOriginXAngst"), [4, -1, 0])
    np.testing.assert_allclose(block.column_as_float("rlnOriginYAngst"), [-2, 6, 0])
    source = read_star(SAMPLE_30)[""]
    for kept in (
        "rlnCoordinateX",
        "rlnImageName",
        "rlnNormCorrection",
        "rlnAnglePsi",
        "rlnDefocusU",
    ):
        assert block.column(kept) == source.column(kept)
    again = read_particles(out)
    np.testing.assert_allclose(again.origin_px, p.origin_px, atol=1e-12)
    assert again.pixel_size_a == 2.0 and again.box == 16
    np.testing.assert_array_equal(again.ctf.defocus_u_a, p.ctf.defocus_u_a)


def _without_columns(src: Path, dst: Path, *names: str) -> Path:
    doc = read_star(src)
    for block in doc:
        for name in names:
            block.remove_column(name)
    write_star(dst, doc)
    return dst


def test_relion30_pixel_size_fallbacks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Particles").mkdir()
    write_stack(tmp_path / "Particles/mic1.mrcs", np.zeros((3, 16, 16)), 1.5)
    star = _without_columns(
        SAMPLE_30, tmp_path / "p.star", "rlnMagnification", "rlnDetectorPixelSize"
    )
    assert read_particles(star, pixel_size_a=1.1).pixel_size_a == 1.1  # the argument
    p = read_particles(star)  # else the stack header
    assert p.pixel_size_a == pytest.approx(1.5)
    np.testing.assert_array_equal(
        p.origin_px, [[2, -1], [-0.5, 3], [0, 0]]
    )  # pixels anyway


def test_missing_half_sets_are_assigned_by_row_with_a_warning(tmp_path, caplog):
    star = _without_columns(SAMPLE_31, tmp_path / "p.star", "rlnRandomSubset")
    with caplog.at_level(logging.WARNING):
        p = read_particles(star)
    np.testing.assert_array_equal(p.random_subset, [1, 2, 1, 2])
    assert "rlnRandomSubset" in caplog.text and "assigned" in caplog.text
    out = tmp_path / "out.star"
    write_particles(out, p)
    assert read_star(out)["particles"].column("rlnRandomSubset") == ["1", "2", "1", "2"]


def test_load_images_reads_the_right_images_in_the_asked_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stacks = _stacks_for_sample_31(tmp_path)
    p = read_particles(SAMPLE_31)
    p.validate_images()
    order = [3, 0, 2, 1, 3]
    expected = np.stack([stacks[i // 2][i % 2] for i in order])
    got = p.load_images(order)
    assert got.dtype == np.float32 and got.shape == (5, 16, 16)
    np.testing.assert_array_equal(got, expected)
    assert all(isinstance(m, np.memmap) for m in p._cache.values())
    sub = p.subset([2, 1])
    np.testing.assert_array_equal(sub.load_images([0, 1]), expected[[2, 3]])


def test_relative_names_fall_back_to_the_star_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    stacks = _stacks_for_sample_31(folder)
    shutil.copy(SAMPLE_31, folder / "run_data.star")
    monkeypatch.chdir(tmp_path)  # the names are not relative to here
    p = read_particles(folder / "run_data.star")
    assert p.stack_paths == (folder / STACK_31[0], folder / STACK_31[1])
    np.testing.assert_array_equal(p.load_images([1]), stacks[0][1:2])


def test_validate_images_errors_name_the_stack(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = read_particles(SAMPLE_31)
    with pytest.raises(InputError, match="particle stack not found") as err:
        p.validate_images()
    assert err.value.path == str(tmp_path / STACK_31[0])
    _stacks_for_sample_31(tmp_path, n_images=1)  # index 2 (1-based) is out of range
    with pytest.raises(InputError, match="image index 2 is out of range") as err:
        p.validate_images()
    assert err.value.path == str(tmp_path / STACK_31[0])
    assert "holds 1 images" in err.value.problem
    _stacks_for_sample_31(tmp_path, box=20)
    with pytest.raises(
        InputError, match="images are 20 px; the particle set says 16 px"
    ):
        p.validate_images()
    _stacks_for_sample_31(tmp_path)
    data = (tmp_path / STACK_31[1]).read_bytes()
    (tmp_path / STACK_31[1]).write_bytes(data[:-100])
    with pytest.raises(InputError, match="truncated") as err:
        p.validate_images()
    assert err.value.path == str(tmp_path / STACK_31[1])


def test_star_without_required_columns(tmp_path):
    star = _without_columns(SAMPLE_31, tmp_path / "p.star", "rlnImageName")
    with pytest.raises(InputError, match="no column _rlnImageName") as err:
        read_particles(star)
    assert err.value.path == str(star)
    star30 = _without_columns(SAMPLE_30, tmp_path / "q.star", "rlnImageName")
    with pytest.raises(InputError, match="no particle table") as err:
        read_particles(star30)
    assert err.value.path == str(star30)
    with pytest.raises(InputError, match="not found"):
        read_particles(tmp_path / "absent.star")


def test_particles_without_poses(tmp_path):
    star = _without_columns(
        SAMPLE_31, tmp_path / "p.star", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"
    )
    p = read_particles(star)
    assert not p.has_poses
    with pytest.raises(InputError, match="no poses") as err:
        p.require_poses()
    assert err.value.path == str(star)
    with pytest.raises(InputError):
        p.matrices()
    p.with_poses(np.zeros(4), np.ones(4), np.zeros(4), np.zeros((4, 2))).require_poses()


def test_several_pixel_sizes_or_boxes_must_be_split(tmp_path):
    doc = read_star(SAMPLE_31)
    doc["optics"].set_column("rlnImagePixelSize", ["1.770000", "1.060000"])
    write_star(tmp_path / "ps.star", doc)
    with pytest.raises(InputError, match="several pixel sizes") as err:
        read_particles(tmp_path / "ps.star")
    assert "split" in err.value.fix
    doc = read_star(SAMPLE_31)
    doc["optics"].set_column("rlnImageSize", ["16", "32"])
    write_star(tmp_path / "box.star", doc)
    with pytest.raises(InputError, match="several box sizes"):
        read_particles(tmp_path / "box.star")


def test_bad_half_set_numbers(tmp_path):
    doc = read_star(SAMPLE_31)
    doc["particles"].set_column("rlnRandomSubset", ["1", "2", "3", "1"])
    write_star(tmp_path / "p.star", doc)
    with pytest.raises(InputError, match="row 3 has 3"):
        read_particles(tmp_path / "p.star")


def test_with_poses_and_subset_keep_everything_else(tmp_path):
    p = read_particles(SAMPLE_31)
    rng = np.random.default_rng(11)
    rot, tilt, psi = (
        rng.uniform(-180, 180, 4),
        rng.uniform(0, 180, 4),
        rng.uniform(-180, 180, 4),
    )
    origin = rng.uniform(-3, 3, (4, 2))
    moved = p.with_poses(rot, tilt, psi, origin)
    np.testing.assert_array_equal(p.rot_deg[0], -96.48734)  # original untouched
    out = tmp_path / "moved.star"
    write_particles(out, moved.subset([3, 1]))
    back = read_particles(out)
    np.testing.assert_allclose(back.rot_deg, rot[[3, 1]], atol=1e-6)
    np.testing.assert_allclose(back.tilt_deg, tilt[[3, 1]], atol=1e-6)
    np.testing.assert_allclose(back.psi_deg, psi[[3, 1]], atol=1e-6)
    np.testing.assert_allclose(back.origin_px, origin[[3, 1]], atol=1e-6 / 1.77)
    np.testing.assert_array_equal(back.random_subset, [2, 2])
    np.testing.assert_array_equal(back.optics_group, [2, 1])
    source = read_star(SAMPLE_31)["particles"]
    written = read_star(out)["particles"]
    assert written.columns == source.columns
    for name in (
        "rlnImageName",
        "rlnCoordinateX",
        "rlnLogLikeliContribution",
        "rlnDefocusU",
    ):
        assert written.column(name) == [source.column(name)[i] for i in (3, 1)]
    assert read_star(out)["notes"] == read_star(SAMPLE_31)["notes"]
    with pytest.raises(ValueError, match="expected \\(4, 2\\)"):
        p.with_poses(rot, tilt, psi, origin[:3])


def test_make_particles_writes_names_relative_to_the_star_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    images = rng.normal(size=(5, 12, 12)).astype(np.float32)
    write_stack(tmp_path / "Stacks" / "sim.mrcs", images, 1.5)
    n = 5
    ctf = CtfParams(
        defocus_u_a=rng.uniform(1e4, 2e4, n),
        defocus_v_a=rng.uniform(1e4, 2e4, n),
        defocus_angle_deg=rng.uniform(0, 180, n),
    )
    p = make_particles(
        image_refs=[(tmp_path / "Stacks" / "sim.mrcs", i) for i in (4, 3, 2, 1, 0)],
        rot_deg=rng.uniform(-180, 180, n),
        tilt_deg=rng.uniform(0, 180, n),
        psi_deg=rng.uniform(-180, 180, n),
        origin_px=rng.uniform(-2, 2, (n, 2)),
        ctf=ctf,
        pixel_size_a=1.5,
        box=12,
        random_subset=[1, 2, 1, 2, 1],
        voltage_kv=200.0,
        cs_mm=1.4,
        amplitude_contrast=0.07,
    )
    out = tmp_path / "Simulate" / "job001" / "particles.star"
    write_particles(out, p)
    names = read_star(out)["particles"].column("rlnImageName")
    assert names == [f"00000{k}@../../Stacks/sim.mrcs" for k in (5, 4, 3, 2, 1)]
    monkeypatch.chdir(tmp_path / "Simulate")  # neither the project nor the STAR folder
    back = read_particles(out)
    back.validate_images()
    np.testing.assert_array_equal(back.load_images(range(5)), images[::-1])
    np.testing.assert_allclose(back.rot_deg, p.rot_deg, atol=1e-6)
    np.testing.assert_allclose(back.origin_px, p.origin_px, atol=1e-6)
    np.testing.assert_allclose(back.ctf.defocus_u_a, ctf.defocus_u_a, atol=1e-6)
    np.testing.assert_array_equal(back.ctf.voltage_kv, [200.0] * 5)
    np.testing.assert_array_equal(back.ctf.cs_mm, [1.4] * 5)
    np.testing.assert_array_equal(back.ctf.amplitude_contrast, [0.07] * 5)
    np.testing.assert_array_equal(back.random_subset, [1, 2, 1, 2, 1])
    assert back.box == 12 and back.pixel_size_a == 1.5


def _gaussian_images(origin_px: np.ndarray, box: int, sigma_px: float) -> np.ndarray:
    """Projections of a centred 3D Gaussian (a 2D Gaussian at any pose), moved by ``origin_px``."""
    y, x = np.mgrid[:box, :box] - box // 2
    dx = x[None] - origin_px[:, 0, None, None]  # (n, N, N)
    dy = y[None] - origin_px[:, 1, None, None]
    return np.exp(-(dx**2 + dy**2) / (2 * sigma_px**2)).astype(np.float32)


@pytest.mark.relion
def test_relion_reconstruct_reads_our_poses_and_origins(tmp_path, relion_bin):
    """relion_reconstruct of images of a centred Gaussian blob moved by -origin.

    The blob projects to the same 2D Gaussian at every pose, so only correct
    origins (units, sign, Angstrom conversion) give a sharp, centred blob;
    the opposite sign (negative control) smears it.
    """
    rng = np.random.default_rng(8)
    n, box, pixel_a = 24, 32, 2.0
    origin = rng.uniform(-4, 4, (n, 2))
    write_stack(
        tmp_path / "Stacks" / "blob.mrcs", _gaussian_images(-origin, box, 2.0), pixel_a
    )
    rot, psi = rng.uniform(-180, 180, (2, n))
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))

    def reconstruct(origin_px, name):
        p = make_particles(
            image_refs=[(tmp_path / "Stacks" / "blob.mrcs", i) for i in range(n)],
            rot_deg=rot,
            tilt_deg=tilt,
            psi_deg=psi,
            origin_px=origin_px,
            ctf=None,
            pixel_size_a=pixel_a,
            box=box,
            random_subset=np.arange(n) % 2 + 1,
        )
        write_particles(tmp_path / "out" / f"{name}.star", p)
        subprocess.run(
            [
                str(relion_bin / "relion_reconstruct"),
                "--i",
                f"{name}.star",
                "--o",
                f"{name}.mrc",
            ],
            cwd=tmp_path / "out",
            capture_output=True,
            check=True,
            timeout=120,
        )
        return read_map(tmp_path / "out" / f"{name}.mrc")

    vol, pixel_size = reconstruct(origin, "right")
    assert vol.shape == (box, box, box) and pixel_size == pytest.approx(pixel_a)
    assert np.unravel_index(np.argmax(vol), vol.shape) == (box // 2,) * 3
    weights = np.clip(vol, 0, None)
    com = [
        (weights * i).sum() / weights.sum() - box // 2 for i in np.indices(vol.shape)
    ]
    np.testing.assert_allclose(com, 0, atol=0.1)
    wrong, _ = reconstruct(-origin, "wrong_sign")
    assert wrong.max() < 0.5 * vol.max()


@pytest.mark.relion
def test_relion_written_star_reads_and_round_trips_losslessly(tmp_path, relion_bin):
    """relion_project reads our STAR (poses, origins) and writes its own, which we read."""
    rng = np.random.default_rng(9)
    n, box, pixel_a = 3, 32, 2.0
    z, y, x = np.indices((box, box, box)) - box // 2
    blob = np.exp(-(x**2 + y**2 + z**2) / (2 * 2.0**2)).astype(np.float32)
    write_map(tmp_path / "blob.mrc", blob, pixel_a)
    write_stack(tmp_path / "dummy.mrcs", np.zeros((n, box, box)), pixel_a)
    origin = np.array([[3.0, -1.0], [-2.0, 2.0], [0.5, 0.0]])
    ours = make_particles(
        image_refs=[(tmp_path / "dummy.mrcs", i) for i in range(n)],
        rot_deg=rng.uniform(-180, 180, n),
        tilt_deg=rng.uniform(0, 180, n),
        psi_deg=rng.uniform(-180, 180, n),
        origin_px=origin,
        ctf=None,
        pixel_size_a=pixel_a,
        box=box,
        random_subset=[1, 2, 1],
    )
    write_particles(tmp_path / "ours.star", ours)
    subprocess.run(
        [
            str(relion_bin / "relion_project"),
            "--i",
            "blob.mrc",
            "--o",
            "proj",
            "--ang",
            "ours.star",
        ],
        cwd=tmp_path,
        capture_output=True,
        check=True,
        timeout=120,
    )
    theirs = read_particles(tmp_path / "proj.star")
    theirs.validate_images()
    assert theirs.n == n and theirs.box == box and theirs.pixel_size_a == pixel_a
    np.testing.assert_allclose(theirs.rot_deg, ours.rot_deg, atol=1e-5)
    np.testing.assert_allclose(theirs.tilt_deg, ours.tilt_deg, atol=1e-5)
    np.testing.assert_allclose(theirs.psi_deg, ours.psi_deg, atol=1e-5)
    np.testing.assert_allclose(theirs.origin_px, origin, atol=1e-5)
    images = theirs.load_images(range(n))
    peaks = [np.unravel_index(np.argmax(im), im.shape) for im in images]  # (y, x)
    expected = [(box // 2 - int(oy), box // 2 - int(ox)) for ox, oy in origin[:2]]
    assert peaks[:2] == expected  # RELION moves the content by -origin
    write_particles(tmp_path / "again.star", theirs)
    again = read_star(tmp_path / "again.star")
    source = read_star(tmp_path / "proj.star")
    assert again["optics"] == source["optics"]
    for name in source["particles"].columns:  # RELION's columns kept verbatim
        assert again["particles"].column(name) == source["particles"].column(name)
    assert again["particles"].column("rlnRandomSubset") == ["1", "2", "1"]


def test_box_from_the_stack_header_when_the_star_lacks_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _stacks_for_sample_31(tmp_path, box=16)
    star = _without_columns(SAMPLE_31, tmp_path / "p.star", "rlnImageSize")
    assert read_particles(star).box == 16
    (tmp_path / "Particles").mkdir()
    with pytest.raises(InputError, match="particle stack not found") as err:
        read_particles(SAMPLE_30)  # RELION 3.0: the box comes from the stack header
    assert err.value.path == str(tmp_path / "Particles" / "mic1.mrcs")


def test_load_images_from_threads_with_few_open_stacks(tmp_path, monkeypatch):
    import localrefine_plugin.engine.particles as particles_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        particles_module, "_MAX_OPEN_STACKS", 1
    )  # evict on every switch
    stacks = _stacks_for_sample_31(tmp_path)
    p = read_particles(SAMPLE_31)
    rng = np.random.default_rng(6)
    batches = [rng.integers(0, 4, 6) for _ in range(40)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(p.load_images, batches))
    for idx, got in zip(batches, results, strict=True):
        np.testing.assert_array_equal(
            got, np.stack([stacks[i // 2][i % 2] for i in idx])
        )
    assert len(p._cache.values()) == 1


def test_missing_optional_ctf_columns_take_relion_defaults(tmp_path):
    star = _without_columns(
        SAMPLE_31,
        tmp_path / "p.star",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnCtfBFactor",
        "rlnCtfScalefactor",
        "rlnPhaseShift",
    )
    c = read_particles(star).ctf
    np.testing.assert_array_equal(c.defocus_v_a, c.defocus_u_a)  # no astigmatism
    np.testing.assert_array_equal(c.defocus_angle_deg, 0.0)
    np.testing.assert_array_equal(c.bfactor_a2, 0.0)
    np.testing.assert_array_equal(c.scale, 1.0)
    np.testing.assert_array_equal(c.phase_shift_deg, 0.0)
    no_ctf = _without_columns(SAMPLE_31, tmp_path / "q.star", "rlnDefocusU")
    assert read_particles(no_ctf).ctf is None


def test_optics_group_column_needed_with_several_groups(tmp_path):
    doc = read_star(SAMPLE_31)
    doc["particles"].remove_column("rlnOpticsGroup")
    write_star(tmp_path / "p.star", doc)
    with pytest.raises(
        InputError, match="data_particles has no column _rlnOpticsGroup"
    ):
        read_particles(tmp_path / "p.star")
    # one optics group: the column may be absent
    write_star(
        tmp_path / "one.star",
        StarDocument([doc["optics"].select_rows([0]), doc["particles"]]),
    )
    np.testing.assert_array_equal(
        read_particles(tmp_path / "one.star").optics_group, [1, 1, 1, 1]
    )
    doc = read_star(SAMPLE_31)
    doc["particles"].set_column("rlnOpticsGroup", ["1", "1", "3", "3"])
    write_star(tmp_path / "q.star", doc)
    with pytest.raises(InputError, match=r"optics groups \[3\] missing"):
        read_particles(tmp_path / "q.star")
