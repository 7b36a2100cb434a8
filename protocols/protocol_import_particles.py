"""Import particles with poses, CTF and half sets from a RELION 3.1 STAR file."""

from __future__ import annotations

import enum
import os

import pyworkflow.protocol.params as params
from pwem.objects import SetOfParticles
from pwem.protocols import ProtImport
from pyworkflow import BETA

from localrefine_plugin.convert import StarParticles, is_mrc_file, particles_from_star
from localrefine_plugin.engine.errors import InputError


class ImportParticlesOutputs(enum.Enum):
    outputParticles = SetOfParticles


class ProtLocalRefineImportParticles(ProtImport):
    """Import particles from a RELION 3.1 STAR (poses, origins, CTF, half sets).

    What ``localrefine simulate`` or a RELION/cryoSPARC consensus refinement
    writes: ``data_optics`` plus ``data_particles`` with ``rlnAngleRot/Tilt/Psi``,
    ``rlnOriginXAngst/YAngst``, CTF columns and ``rlnRandomSubset``. The stacks
    (MRC) are referenced where they are, not copied.
    """

    _label = "import particles (RELION STAR)"
    _devStatus = BETA
    _possibleOutputs = ImportParticlesOutputs

    # --------------------------- DEFINE param functions ---------------------
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam(
            "starFile",
            params.PathParam,
            label="Particle STAR file",
            important=True,
            help="RELION 3.1+ particle STAR with poses (e.g. run_data.star).",
        )

    # --------------------------- INSERT steps functions ---------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.importStep, self.starFile.get(), needsGPU=False)

    # --------------------------- STEPS functions ----------------------------
    def importStep(self, starFile):
        parts = self._createSetOfParticles()
        n = particles_from_star(os.path.abspath(starFile), parts)
        self.info(f"Imported {n} particles from {starFile}")
        self._defineOutputs(**{ImportParticlesOutputs.outputParticles.name: parts})

    # --------------------------- INFO functions -----------------------------
    def _validate(self):
        path = self.starFile.get()
        if not path or not os.path.isfile(path):
            return [f"STAR file not found: {path}"]
        try:
            star = StarParticles(path)
        except (InputError, ValueError) as exc:
            return [str(exc)]
        errors = []
        missing = sorted({p for p in star.image_path if not os.path.exists(p)})
        if missing:
            errors.append(f"{len(missing)} stack(s) not found, e.g. {missing[0]}")
        not_mrc = sorted({p for p in star.image_path if not is_mrc_file(p)})
        if not_mrc:
            errors.append(f"Stacks must be MRC (.mrcs): {not_mrc[0]}")
        return errors

    def _summary(self):
        if self.hasAttribute(ImportParticlesOutputs.outputParticles.name):
            p = self.outputParticles
            return [
                f"{p.getSize()} particles at {p.getSamplingRate():g} A/px from "
                f"{self.starFile.get()}"
            ]
        return ["Output not ready yet."]

    def _methods(self):
        return [
            f"Particles with consensus poses were imported from {self.starFile.get()}."
        ]
