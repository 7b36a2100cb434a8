"""Scipion <-> RELION STAR conversion: pose convention, round trips, sets with CTF and half sets."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import pytest

from localrefine_plugin.cli.demo import prepare_scipion_environment

# pyworkflow reads its configuration once, at import: point it at a throw-away
# folder unless Scipion's own launcher already configured it.
if not os.environ.get("SCIPION_USER_DATA"):
    prepare_scipion_environment(tempfile.mkdtemp(prefix="localrefine_scipion_"))

with warnings.catch_warnings():
    # matplotlib (imported by pwem's image readers) trips pyparsing deprecations
    warnings.simplefilter("ignore", DeprecationWarning)
    import pwem.emlib.image.image_readers  # noqa: E402, F401

from localrefine_plugin.convert import (  # noqa: E402
    matrix_from_relion,
    relion_from_matrix,
    update_particles_from_star,
    write_particles_star,
)
from localrefine_plugin.engine.errors import InputError  # noqa: E402
from localrefine_plugin.engine.geometry import euler_to_matrix  # noqa: E402
from localrefine_plugin.engine.star import read_star  # noqa: E402


def _random_poses(rng, n):
    rot = rng.uniform(-180, 180, n)
    tilt = rng.uniform(1, 179, n)
    psi = rng.uniform(-180, 180, n)
    origin = rng.uniform(-6, 6, (n, 2))
    return rot, tilt, psi, origin


def test_scipion_rotation_is_transpose_of_relion_matrix_and_shift_is_rotated_origin(
    rng,
):
    # RELION's Euler_angles2matrix (engine.geometry) is the independent truth: the
    # Scipion ALIGN_PROJ matrix is [[A^T, A^T o], [0, 1]] with o = (ox, oy, 0) px.
    rot, tilt, psi, origin = _random_poses(rng, 20)
    for i in range(20):
        m = matrix_from_relion(rot[i], tilt[i], psi[i], *origin[i])
        a = euler_to_matrix(rot[i], tilt[i], psi[i])
        np.testing.assert_allclose(m[:3, :3], a.T, atol=1e-12)
        o = np.array([origin[i, 0], origin[i, 1], 0.0])
        np.testing.assert_allclose(m[:3, 3], a.T @ o, atol=1e-12)
        np.testing.assert_allclose(m[3], [0, 0, 0, 1], atol=1e-15)


def test_relion_pose_round_trips_through_scipion_matrix(rng):
    rot, tilt, psi, origin = _random_poses(rng, 500)
    for i in range(500):
        back = relion_from_matrix(
            matrix_from_relion(rot[i], tilt[i], psi[i], *origin[i])
        )
        np.testing.assert_allclose(
            back[:3], (rot[i], tilt[i], psi[i]), atol=1e-6, rtol=0
        )
        np.testing.assert_allclose(back[3:], origin[i], atol=1e-4, rtol=0)


def test_scipion_matrix_round_trips_through_relion_pose_including_small_tilt(rng):
    # Euler angles are ambiguous at tilt 0; the pose (matrix) must still survive.
    rot, tilt, psi, origin = _random_poses(rng, 100)
    tilt[:10] = rng.uniform(0, 1e-3, 10)
    for i in range(100):
        m = matrix_from_relion(rot[i], tilt[i], psi[i], *origin[i])
        m2 = matrix_from_relion(*relion_from_matrix(m))
        np.testing.assert_allclose(m2, m, atol=1e-9)


# ----------------------------------------------------------------- sets --
def _make_set(tmp_path, rng, n=12, *, alignment=True, subsets=True, box=16, apix=1.7):
    import mrcfile
    import pwem.objects as emobj
    from pyworkflow.object import Integer

    stack = tmp_path / "images.mrcs"
    with mrcfile.new(stack, overwrite=True) as mrc:
        mrc.set_data(rng.normal(size=(n, box, box)).astype(np.float32))
        mrc.voxel_size = apix
    parts = emobj.SetOfParticles(filename=str(tmp_path / "particles.sqlite"))
    acq = emobj.Acquisition(
        voltage=300.0, sphericalAberration=2.7, amplitudeContrast=0.1, magnification=1e4
    )
    parts.setAcquisition(acq)
    parts.setSamplingRate(apix)
    parts.setHasCTF(True)
    if alignment:
        parts.setAlignmentProj()
    rot, tilt, psi, origin = _random_poses(rng, n)
    truth = []
    for i in range(n):
        p = emobj.Particle()
        p.setLocation(i + 1, str(stack))
        p.setAcquisition(acq.clone())
        ctf = emobj.CTFModel()
        du, dv, ang = 15000.0 + 100 * i, 14500.0 + 100 * i, 10.0 + i
        ctf.setDefocusU(du)
        ctf.setDefocusV(dv)
        ctf.setDefocusAngle(ang)
        ctf.setPhaseShift(0.0)
        p.setCTF(ctf)
        if alignment:
            t = emobj.Transform()
            t.setMatrix(matrix_from_relion(rot[i], tilt[i], psi[i], *origin[i]))
            p.setTransform(t)
        if subsets:
            p._rlnRandomSubset = Integer(2 - i % 2 if i % 3 else 2)
        parts.append(p)
        truth.append((rot[i], tilt[i], psi[i], *origin[i], du, dv, ang))
    parts.write()
    return parts, np.array(truth), stack


def test_set_written_as_relion31_star_with_poses_ctf_half_sets_and_linked_stack(
    tmp_path, rng
):
    parts, truth, stack = _make_set(tmp_path, rng)
    star = tmp_path / "conv" / "particles.star"
    assert write_particles_star(parts, star) == 12
    doc = read_star(star)
    optics, block = doc["optics"], doc["particles"]
    assert float(optics.column_as_float("rlnImagePixelSize")[0]) == pytest.approx(1.7)
    assert int(optics.column_as_float("rlnImageSize")[0]) == 16
    assert float(optics.column_as_float("rlnVoltage")[0]) == pytest.approx(300.0)
    for col, j in (("rlnAngleRot", 0), ("rlnAngleTilt", 1), ("rlnAnglePsi", 2)):
        np.testing.assert_allclose(block.column_as_float(col), truth[:, j], atol=1e-5)
    np.testing.assert_allclose(
        block.column_as_float("rlnOriginXAngst"), truth[:, 3] * 1.7, atol=1e-5
    )
    np.testing.assert_allclose(
        block.column_as_float("rlnOriginYAngst"), truth[:, 4] * 1.7, atol=1e-5
    )
    np.testing.assert_allclose(
        block.column_as_float("rlnDefocusU"), truth[:, 5], atol=1e-5
    )
    np.testing.assert_allclose(block.column_as_float("rlnDefocusAngle"), truth[:, 7])
    subsets = [int(p._rlnRandomSubset) for p in parts.iterItems(orderBy="id")]
    assert block.column_as_int("rlnRandomSubset").tolist() == subsets
    names = block.column("rlnImageName")
    assert names[0] == "000001@images.mrcs" and names[-1] == "000012@images.mrcs"
    linked = star.parent / "images.mrcs"
    assert linked.is_symlink() and linked.resolve() == stack.resolve()


def test_engine_star_back_into_scipion_keeps_ctf_subsets_and_takes_new_poses(
    tmp_path, rng
):
    import pwem.objects as emobj

    parts, truth, _ = _make_set(tmp_path, rng)
    star = tmp_path / "conv" / "particles.star"
    write_particles_star(parts, star)
    # what an engine run would do: change the poses, keep the rest
    doc = read_star(star)
    block = doc["particles"]
    new_rot = block.column_as_float("rlnAngleRot") + 3.0
    new_ox = block.column_as_float("rlnOriginXAngst") - 1.25
    block.set_column("rlnAngleRot", new_rot)
    block.set_column("rlnOriginXAngst", new_ox)
    from localrefine_plugin.engine.star import write_star

    write_star(star, doc)
    out = emobj.SetOfParticles(filename=str(tmp_path / "out.sqlite"))
    assert update_particles_from_star(parts, out, star) == 12
    out.write()
    assert out.getSize() == 12 and out.hasAlignmentProj()
    assert out.getSamplingRate() == pytest.approx(1.7)
    for i, (p_in, p_out) in enumerate(
        zip(parts.iterItems(orderBy="id"), out.iterItems(orderBy="id"), strict=True)
    ):
        assert p_out.getObjId() == p_in.getObjId()
        rot, tilt, psi, ox, oy = relion_from_matrix(p_out.getTransform().getMatrix())
        assert rot == pytest.approx(truth[i, 0] + 3.0, abs=1e-4)
        assert tilt == pytest.approx(truth[i, 1], abs=1e-4)
        assert ox == pytest.approx(truth[i, 3] - 1.25 / 1.7, abs=1e-4)
        assert oy == pytest.approx(truth[i, 4], abs=1e-4)
        assert int(p_out._rlnRandomSubset) == int(p_in._rlnRandomSubset)
        assert p_out.getCTF().getDefocusU() == pytest.approx(truth[i, 5])
        assert p_out.getCTF().getDefocusAngle() == pytest.approx(truth[i, 7])


def test_particles_without_alignment_are_refused(tmp_path, rng):
    parts, _, _ = _make_set(tmp_path, rng, alignment=False)
    with pytest.raises(InputError, match="no projection alignment"):
        write_particles_star(parts, tmp_path / "x" / "particles.star")


def test_missing_half_sets_leave_the_column_out(tmp_path, rng):
    parts, _, _ = _make_set(tmp_path, rng, subsets=False)
    star = tmp_path / "c" / "particles.star"
    write_particles_star(parts, star)
    assert not read_star(star)["particles"].has_column("rlnRandomSubset")
