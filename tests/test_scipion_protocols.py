"""The protocols in a real headless Scipion project (pyworkflow's test base).

Runs under pytest (``python -m pytest tests/test_scipion_protocols.py``) and under
Scipion's own runner::

    python -m pyworkflow.apps.pw_run_tests localrefine_plugin.tests.test_scipion_protocols

Data: a small simulated flexible-domain dataset (``engine.simulate``, 100
particles, box 48) written inside the project folder.
"""

from __future__ import annotations

import os
import tempfile
import unittest
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from localrefine_plugin.cli.demo import prepare_scipion_environment

# pyworkflow reads its configuration once, at import: point it at a throw-away
# folder unless Scipion's launcher (scipion3 tests / pw_run_tests) configured it.
if not os.environ.get("SCIPION_USER_DATA"):
    prepare_scipion_environment(tempfile.mkdtemp(prefix="localrefine_scipion_"))

with warnings.catch_warnings():
    # matplotlib (imported by pwem's image readers) trips pyparsing deprecations
    warnings.simplefilter("ignore", DeprecationWarning)
    import pwem.emlib.image.image_readers  # noqa: F401
    import pwem.objects as emobj
    import pyworkflow as pw
    from pwem.protocols import ProtImportMask, ProtImportParticles, ProtImportVolumes
    from pyworkflow.tests import BaseTest, setupTestProject

import localrefine_plugin.protocols._common as common  # noqa: E402
from localrefine_plugin.protocols import (  # noqa: E402
    ProtLocalRefine,
    ProtLocalRefineCreateMask,
    ProtLocalRefineImportParticles,
    ProtLocalRefineSubtract,
)

from localrefine_plugin.cli import COMMANDS, entry_point  # noqa: E402
from localrefine_plugin.convert import StarParticles, relion_from_matrix  # noqa: E402
from localrefine_plugin.engine.mrc_io import read_map, write_map  # noqa: E402

# a real project and protocol runs in child processes: tens of seconds in all
pytestmark = pytest.mark.slow

N_PARTICLES = 100
BOX = 48
APIX = 3.5  # box x pixel size holds the built-in model (>= 165 A)


def _simulate(folder: Path):
    from localrefine_plugin.engine.models import builtin_model
    from localrefine_plugin.engine.simulate import simulate_dataset

    data = simulate_dataset(
        builtin_model(),
        output_dir=folder,
        n_particles=N_PARTICLES,
        box=BOX,
        pixel_size_a=APIX,
        snr=0.5,
        motion_rotation_deg=3.0,
        motion_shift_a=1.5,
        seed=7,
    )
    # half maps: the map plus independent smooth noise (what a consensus run gives)
    vol, _ = read_map(data.map)
    rng = np.random.default_rng(11)
    for k in (1, 2):
        noise = rng.normal(scale=0.05 * float(vol.std()), size=vol.shape)
        write_map(folder / f"half{k}.mrc", (vol + noise).astype(np.float32), APIX)
    # a mask of the wrong box and one of the wrong pixel size, for validation
    mask, _ = read_map(data.region_mask)
    write_map(folder / "mask_box40.mrc", mask[4:44, 4:44, 4:44].copy(), APIX)
    write_map(folder / "mask_apix.mrc", mask, 2.5)
    return data


def _poses(particles):
    """(n, 5) rot, tilt, psi, x, y (deg, px) and subsets of a Scipion set, by id."""
    poses, subsets = [], []
    for p in particles.iterItems(orderBy="id"):
        poses.append(relion_from_matrix(p.getTransform().getMatrix()))
        subsets.append(
            int(p._rlnRandomSubset) if p.hasAttribute("_rlnRandomSubset") else 0
        )
    return np.array(poses), np.array(subsets)


def _assert_same_poses(testcase, particles, star_path):
    star = StarParticles(star_path)
    poses, subsets = _poses(particles)
    testcase.assertEqual(len(poses), star.n)
    angles = np.stack([star.rot_deg, star.tilt_deg, star.psi_deg], axis=1)
    # compare rotations as matrices (Euler angles are not unique), origins directly
    from localrefine_plugin.engine.geometry import euler_to_matrix

    a_db = euler_to_matrix(poses[:, 0], poses[:, 1], poses[:, 2])
    a_star = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    np.testing.assert_allclose(a_db, a_star, atol=2e-6)
    np.testing.assert_allclose(poses[:, 1], angles[:, 1], atol=1e-4)
    np.testing.assert_allclose(poses[:, 3:], star.origin_px, atol=1e-4)
    if star.random_subset is not None:
        np.testing.assert_array_equal(subsets, star.random_subset)


class TestLocalRefineProtocols(BaseTest):
    """Import, create mask, subtract and local refinement in one Scipion project."""

    @classmethod
    def setUpClass(cls):
        cls._cwd = os.getcwd()
        pw.Config.setDomain("pwem")
        setupTestProject(cls)
        cls.dataDir = Path(cls.proj.path) / "simulated"
        cls.data = _simulate(cls.dataDir)

        cls.protParticles = cls._run(
            ProtLocalRefineImportParticles,
            "import particles",
            starFile=str(cls.data.particles_star),
        )
        cls.protVolume = cls._run(
            ProtImportVolumes,
            "import map",
            filesPath=str(cls.data.map),
            samplingRate=APIX,
            setHalfMaps=True,
            half1map=str(cls.dataDir / "half1.mrc"),
            half2map=str(cls.dataDir / "half2.mrc"),
        )
        cls.protMask = cls._run(
            ProtImportMask,
            "import mask",
            maskPath=str(cls.data.region_mask),
            samplingRate=APIX,
        )

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls._cwd)

    @classmethod
    def _run(cls, protClass, label, **kwargs):
        prot = cls.newProtocol(protClass, **kwargs)
        prot.setObjLabel(label)
        return cls.launchProtocol(prot)

    def _importMaskFile(self, name, apix):
        return self._run(
            ProtImportMask,
            f"import {name}",
            maskPath=str(self.dataDir / name),
            samplingRate=apix,
        ).outputMask

    # ------------------------------------------------------------ import --
    def test_import_keeps_poses_ctf_and_half_sets(self):
        parts = self.protParticles.outputParticles
        self.assertSetSize(parts, N_PARTICLES)
        self.assertTrue(parts.hasAlignmentProj())
        self.assertAlmostEqual(parts.getSamplingRate(), APIX)
        self.assertEqual(parts.getXDim(), BOX)
        _assert_same_poses(self, parts, self.data.particles_star)
        star = StarParticles(self.data.particles_star)
        defocus = [p.getCTF().getDefocusU() for p in parts.iterItems(orderBy="id")]
        np.testing.assert_allclose(defocus, star.defocus_u_a, rtol=1e-6)

    # --------------------------------------------------------------- mask --
    def test_create_mask_registers_the_engines_soft_mask(self):
        prot = self._run(
            ProtLocalRefineCreateMask,
            "create mask",
            inputVolume=self.protVolume.outputVolume,
            lowpass=12.0,
            extend=2.0,
            softEdge=6.0,
        )
        self.assertTrue(prot.isFinished())
        mask = prot.outputMask
        self.assertIsInstance(mask, emobj.VolumeMask)
        self.assertAlmostEqual(mask.getSamplingRate(), APIX)
        data, apix = read_map(mask.getFileName())
        self.assertEqual(data.shape, (BOX, BOX, BOX))
        self.assertAlmostEqual(apix, APIX, places=4)
        self.assertGreaterEqual(float(data.min()), 0.0)
        self.assertLessEqual(float(data.max()), 1.0 + 1e-6)
        soft = np.count_nonzero((data > 0.01) & (data < 0.99))
        self.assertGreater(soft, 0, "a soft mask has an edge between 0 and 1")
        # the same command run directly gives the same mask
        direct = Path(self.proj.path) / "direct_mask.mrc"
        rc = entry_point(
            ["mask", "--map", str(self.data.map), "--output", str(direct),
             "--lowpass", "12.0", "--extend", "2.0", "--soft-edge", "6.0"]
        )  # fmt: skip
        self.assertEqual(rc, 0)
        np.testing.assert_allclose(data, read_map(direct)[0], atol=1e-6)
        self.assertIn("soft edge 6 A", " ".join(prot.summary()))

    # ----------------------------------------------------------- subtract --
    @unittest.skipUnless("subtract" in COMMANDS, "localrefine subtract not there yet")
    def test_subtract_outputs_particles_with_engine_poses_and_half_sets(self):
        prot = self._run(
            ProtLocalRefineSubtract,
            "subtract",
            inputParticles=self.protParticles.outputParticles,
            inputVolume=self.protVolume.outputVolume,
            inputMask=self.protMask.outputMask,
        )
        out = prot.outputParticles
        self.assertSetSize(out, N_PARTICLES)
        self.assertTrue(out.hasAlignmentProj())
        self.assertAlmostEqual(out.getSamplingRate(), APIX)
        star = prot._getExtraPath("subtract", "particles.star")
        _assert_same_poses(self, out, star)
        _, subsets_in = _poses(self.protParticles.outputParticles)
        _, subsets_out = _poses(out)
        np.testing.assert_array_equal(subsets_out, subsets_in)
        first = out.getFirstItem()
        self.assertNotEqual(
            os.path.realpath(first.getFileName()), os.path.realpath(self.data.stack)
        )

    @unittest.skipUnless("subtract" in COMMANDS, "localrefine subtract not there yet")
    def test_subtract_recentred_and_reboxed_outputs_the_new_grid(self):
        prot = self._run(
            ProtLocalRefineSubtract,
            "subtract, re-centre and re-box",
            inputParticles=self.protParticles.outputParticles,
            inputVolume=self.protVolume.outputVolume,
            inputMask=self.protMask.outputMask,
            recenter=True,
            newBox=32,
        )
        out = prot.outputParticles
        self.assertSetSize(out, N_PARTICLES)
        self.assertEqual(out.getXDim(), 32)
        _assert_same_poses(self, out, prot._getExtraPath("subtract", "particles.star"))
        vol, mask = prot.outputVolume, prot.outputMask
        self.assertIsInstance(mask, emobj.VolumeMask)
        for obj in (vol, mask):
            self.assertAlmostEqual(obj.getSamplingRate(), APIX)
            self.assertEqual(read_map(obj.getFileName())[0].shape, (32, 32, 32))
        self.assertTrue(vol.hasHalfMaps())
        # the mask's centre of mass is now at the box centre (within a pixel)
        from localrefine_plugin.engine.masks import center_of_mass_px

        com = center_of_mass_px(read_map(mask.getFileName())[0])
        self.assertLess(float(np.abs(com).max()), 1.0, com)

    # ------------------------------------------------------ local refine --
    @pytest.mark.slow
    @unittest.skipUnless("refine" in COMMANDS, "localrefine refine not there yet")
    def test_local_refinement_outputs_map_half_maps_fscs_and_particles(self):
        parts_in = self.protParticles.outputParticles
        prot = self._run(
            ProtLocalRefine,
            "local refinement",
            inputParticles=parts_in,
            inputVolume=self.protVolume.outputVolume,
            inputMask=self.protMask.outputMask,
            rotationExtent=2.0,
            shiftExtent=1.0,
            alignmentResolution=2.0,
            maxIterations=1,
        )
        self.assertTrue(prot.isFinished())
        vol = prot.outputVolume
        self.assertIsInstance(vol, emobj.Volume)
        self.assertAlmostEqual(vol.getSamplingRate(), APIX)
        self.assertTrue(vol.hasHalfMaps())
        halves = list(vol.getHalfMaps(asList=True))
        self.assertEqual(len(halves), 2)
        for fn in [vol.getFileName(), *halves]:
            data, apix = read_map(fn)
            self.assertEqual(data.shape, (BOX, BOX, BOX))
            self.assertAlmostEqual(apix, APIX, places=4)
        # FSC objects carry fsc.csv's curves
        fscs = [f.clone() for f in prot.outputFSCs.iterItems(orderBy="id")]
        self.assertEqual(
            [f.getObjLabel() for f in fscs], ["unmasked", "masked", "corrected"]
        )
        table = common.read_fsc_csv(prot._getExtraPath("refine", "fsc.csv"))
        for fsc, column in zip(
            fscs, ("fsc_unmasked", "fsc_masked", "fsc_corrected"), strict=True
        ):
            x, y = fsc.getData()
            np.testing.assert_allclose([float(v) for v in y], table[column], atol=1e-6)
            res = np.array(table["resolution_A"][1:])
            np.testing.assert_allclose([float(v) for v in x][1:], 1.0 / res, rtol=1e-6)
        # particles: the engine's poses, the input's CTF and half sets
        out = prot.outputParticles
        self.assertSetSize(out, N_PARTICLES)
        self.assertTrue(out.hasAlignmentProj())
        _assert_same_poses(self, out, prot._getExtraPath("refine", "particles.star"))
        _, subsets_in = _poses(parts_in)
        _, subsets_out = _poses(out)
        np.testing.assert_array_equal(subsets_out, subsets_in)
        for p_in, p_out in zip(
            parts_in.iterItems(orderBy="id"), out.iterItems(orderBy="id"), strict=True
        ):
            self.assertEqual(p_in.getObjId(), p_out.getObjId())
            self.assertAlmostEqual(
                p_in.getCTF().getDefocusU(), p_out.getCTF().getDefocusU()
            )
        summary = common.read_summary(prot._getExtraPath("refine", "summary.json"))
        self.assertEqual(int(summary["n_particles"]), N_PARTICLES)
        resolution = common.summary_resolution(summary)
        self.assertTrue(2 * APIX <= resolution < 60.0, resolution)
        self.assertIn(f"{resolution:.2f} A", " ".join(prot.summary()))
        # the output is linked to its inputs in the project graph
        sources = {o.getObjId() for o in self.proj.getSourceParents(prot.outputVolume)}
        for src in (parts_in, self.protVolume.outputVolume, self.protMask.outputMask):
            self.assertIn(src.getObjId(), sources)
        self._check_viewer(prot)
        # Scipion's "Continue" resumes the engine's run (--continue), "Restart" does not
        from pyworkflow.protocol.constants import MODE_RESTART, MODE_RESUME

        for mode, expected in ((MODE_RESUME, True), (MODE_RESTART, False)):
            prot.runMode.set(mode)
            with mock.patch.object(prot, "runJob") as run_job:
                prot.refineStep(prot._getArgsLine())
            self.assertEqual("--continue" in run_job.call_args.args[1], expected)

    def _check_viewer(self, prot):
        """Every entry of the viewer gives its plots (headless) or the map views."""
        from pyworkflow.gui.plotter import Plotter

        from localrefine_plugin.viewers import LocalRefineViewer

        Plotter.setBackend("Agg")
        viewer = LocalRefineViewer(project=self.proj, protocol=prot)
        views = {k: f() for k, f in viewer._getVisualizeDict().items()}
        fsc_axes = views["showFsc"][0].getFigure().axes
        self.assertEqual(len(fsc_axes[0].lines), 4)  # three curves and the 0.143 line
        self.assertEqual(len(views["showResolution"][0].getFigure().axes[0].lines), 1)
        rot_ax, shift_ax = views["showPoseChanges"][0].getFigure().axes
        heights = [p.get_height() for p in rot_ax.patches]
        self.assertEqual(sum(heights), N_PARTICLES)
        self.assertEqual(len(views["showMap"]), 3)  # map and two half maps
        for view in views.values():
            if hasattr(view[0], "close"):
                view[0].close()

    # --------------------------------------------------------- validation --
    def _refineProt(self, **kwargs):
        kwargs.setdefault("inputParticles", self.protParticles.outputParticles)
        kwargs.setdefault("inputVolume", self.protVolume.outputVolume)
        kwargs.setdefault("inputMask", self.protMask.outputMask)
        return self.newProtocol(ProtLocalRefine, **kwargs)

    def test_valid_inputs_pass_validation(self):
        with mock.patch.object(common, "gpus_available", return_value=[]):
            self.assertEqual(self._refineProt().validate(), [])

    def test_particles_without_alignment_are_refused(self):
        imp = self._run(
            ProtImportParticles,
            "import images only",
            importFrom=ProtImportParticles.IMPORT_FROM_FILES,
            filesPath=str(self.dataDir),
            filesPattern="particles.mrcs",
            samplingRate=APIX,
        )
        errors = self._refineProt(inputParticles=imp.outputParticles).validate()
        self.assertTrue(any("no 3D alignment" in e for e in errors), errors)
        errors = self.newProtocol(
            ProtLocalRefineSubtract,
            inputParticles=imp.outputParticles,
            inputVolume=self.protVolume.outputVolume,
            inputMask=self.protMask.outputMask,
        ).validate()
        self.assertTrue(any("no 3D alignment" in e for e in errors), errors)

    def test_mask_of_another_box_or_pixel_size_is_refused(self):
        errors = self._refineProt(
            inputMask=self._importMaskFile("mask_box40.mrc", APIX)
        ).validate()
        self.assertTrue(any("box 40 px" in e for e in errors), errors)
        errors = self._refineProt(
            inputMask=self._importMaskFile("mask_apix.mrc", 2.5)
        ).validate()
        self.assertTrue(any("pixel size 2.5000 A" in e for e in errors), errors)

    def test_gpu_requested_without_gpu_is_refused_unless_fallback_allowed(self):
        with mock.patch.object(common, "gpus_available", return_value=[]):
            prot = self._refineProt(useGpu=True, gpuList="0")
            errors = prot.validate()
            self.assertTrue(any("no NVIDIA GPU" in e for e in errors), errors)
            prot = self._refineProt(useGpu=True, gpuList="0", allowCpuFallback=True)
            self.assertEqual(prot.validate(), [])
            self.assertIn("--device auto", prot._getArgsLine())
            self.assertTrue(any("CPU" in w for w in prot.warnings()))
        with mock.patch.object(common, "gpus_available", return_value=["0"]):
            prot = self._refineProt(useGpu=True, gpuList="1")
            self.assertTrue(any("GPU id(s) 1 not found" in e for e in prot.validate()))
            prot = self._refineProt(useGpu=True, gpuList="0")
            self.assertEqual(prot.validate(), [])
            self.assertIn("--device cuda", prot._getArgsLine())

    def test_mpi_without_mpi4py_is_refused(self):
        import importlib.util

        prot = self._refineProt(numberOfMpi=2)
        errors = prot.validate()
        if importlib.util.find_spec("mpi4py") is None:
            self.assertTrue(any("mpi4py" in e for e in errors), errors)
        else:
            self.assertFalse(any("mpi4py" in e for e in errors), errors)

    def test_refine_arguments_follow_the_form(self):
        prot = self._refineProt(
            rotationExtent=4.0,
            shiftExtent=1.5,
            fulcrum=2,
            fulcrumX=1.0,
            fulcrumY=-2.0,
            fulcrumZ=3.5,
            usePosePrior=True,
            priorSigmaRotation=5.0,
            priorSigmaShift=2.0,
            dynamicMask=True,
            noiseParticles=5000,
        )
        line = prot._getArgsLine()
        for part in (
            "refine ",
            "--noise-particles 5000",
            "--rotation-extent 4.0",
            "--shift-extent 1.5",
            "--fulcrum 1,-2,3.5",
            "--prior-sigma-rotation 5.0",
            "--prior-sigma-shift 2.0",
            "--dynamic-mask ",
            "--half-maps ",
            "--device cpu",
        ):
            self.assertIn(part, line)
        self.assertNotIn("--static-mask", line)
        self.assertIn("--initial-lowpass 8.0", line)
        from_fsc = self._refineProt(lowpassFromFsc=True)._getArgsLine()
        self.assertIn("--initial-lowpass fsc", from_fsc)

    def test_lowpass_from_fsc_needs_half_maps(self):
        with mock.patch.object(common, "gpus_available", return_value=[]):
            self.assertEqual(self._refineProt(lowpassFromFsc=True).validate(), [])
            errors = self._refineProt(lowpassFromFsc=True, useHalfMaps=False).validate()
        self.assertTrue(any("half maps" in e for e in errors), errors)
