"""Particle signal subtraction: ``localrefine subtract`` as a Scipion protocol."""

from __future__ import annotations

import enum
import os

import pyworkflow.protocol.params as params
from pwem.objects import SetOfParticles, Volume, VolumeMask
from pwem.protocols import ProtOperateParticles
from pyworkflow import BETA

from localrefine_plugin.convert import (
    update_particles_from_star,
)

from ._common import (
    ParticlesVolumeMaskInputs,
    args_line,
    check_mrc,
    check_volume_against,
)


class SubtractOutputs(enum.Enum):
    outputParticles = SetOfParticles
    outputVolume = Volume
    outputMask = VolumeMask


class ProtLocalRefineSubtract(ParticlesVolumeMaskInputs, ProtOperateParticles):
    """Subtract the reference's signal outside a mask from each particle.

    For each particle the projection (at its pose, origin and CTF) of the
    reference times (1 - mask) is scaled to the particle and subtracted, each
    particle against its own half map when the reference has half maps.
    Optionally the images are re-centred on the mask's centre of mass and
    re-boxed; poses are adjusted so the region still projects correctly, and
    the re-boxed reference and mask are output too.
    """

    _label = "subtract signal outside mask"
    _devStatus = BETA
    _possibleOutputs = SubtractOutputs

    # --------------------------- DEFINE param functions ---------------------
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam(
            "inputParticles",
            params.PointerParam,
            pointerClass="SetOfParticles",
            pointerCondition="hasAlignmentProj",
            label="Particles (with consensus poses)",
            important=True,
        )
        form.addParam(
            "inputVolume",
            params.PointerParam,
            pointerClass="Volume",
            label="Reference map",
            important=True,
            help="Consensus map; its half maps are used when present.",
        )
        form.addParam(
            "useHalfMaps",
            params.BooleanParam,
            default=True,
            expertLevel=params.LEVEL_ADVANCED,
            label="Use the reference's half maps?",
            help="Subtract each particle's own half map (by _rlnRandomSubset).",
        )
        form.addParam(
            "inputMask",
            params.PointerParam,
            pointerClass="VolumeMask",
            label="Mask (region to keep)",
            important=True,
            help="Signal outside this soft mask is subtracted.",
        )
        form.addParam(
            "recenter",
            params.BooleanParam,
            default=False,
            label="Re-centre on the mask?",
            help="Shift each image so the mask's centre of mass is at its centre.",
        )
        form.addParam(
            "newBox",
            params.IntParam,
            default=None,
            allowsNull=True,
            label="New box size (px)",
            help="Crop the (re-centred) images to this box; empty = keep the box. "
            "Rule of thumb: about 1.5x the region's diameter.",
        )

    # --------------------------- INSERT steps functions ---------------------
    def _createFilenameTemplates(self):
        out = self._getExtraPath("subtract")
        self._updateFilenamesDict(
            {
                "input_star": self._getExtraPath("input", "particles.star"),
                "input_dir": self._getExtraPath("input"),
                "reference": self._getExtraPath("input", "reference.mrc"),
                "half1": self._getExtraPath("input", "reference_half1.mrc"),
                "half2": self._getExtraPath("input", "reference_half2.mrc"),
                "mask": self._getExtraPath("input", "mask.mrc"),
                "output_dir": out,
                "output_star": os.path.join(out, "particles.star"),
                "output_reference": os.path.join(out, "reference.mrc"),
                "output_mask": os.path.join(out, "mask.mrc"),
                "output_half1": os.path.join(out, "reference_half1.mrc"),
                "output_half2": os.path.join(out, "reference_half2.mrc"),
            }
        )

    def _insertAllSteps(self):
        self._createFilenameTemplates()
        self._insertFunctionStep(
            self.convertInputStep,
            self.inputParticles.get().getObjId(),
            self.inputVolume.get().getObjId(),
            self.inputMask.get().getObjId(),
            needsGPU=False,
        )
        self._insertFunctionStep(self.subtractStep, self._getArgsLine(), needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS functions ----------------------------
    def subtractStep(self, argsLine):
        from localrefine_plugin import Plugin

        self.runJob(Plugin.getProgram(), argsLine, env=Plugin.getEnviron())

    def createOutputStep(self):
        self._createFilenameTemplates()
        particles = self.inputParticles.get()
        out = self._createSetOfParticles()
        update_particles_from_star(particles, out, self._getFileName("output_star"))
        outputs = {SubtractOutputs.outputParticles.name: out}
        if self._reboxed():
            apix = out.getSamplingRate()
            if os.path.exists(self._getFileName("output_reference")):
                vol = Volume()
                vol.setFileName(self._getFileName("output_reference"))
                vol.setSamplingRate(apix)
                halves = [
                    self._getFileName(k) for k in ("output_half1", "output_half2")
                ]
                if all(os.path.exists(h) for h in halves):
                    vol.setHalfMaps(halves)
                outputs[SubtractOutputs.outputVolume.name] = vol
            if os.path.exists(self._getFileName("output_mask")):
                mask = VolumeMask()
                mask.setFileName(self._getFileName("output_mask"))
                mask.setSamplingRate(apix)
                outputs[SubtractOutputs.outputMask.name] = mask
        self._defineOutputs(**outputs)
        self._defineTransformRelation(self.inputParticles, out)
        self._defineSourceRelation(self.inputVolume, out)
        self._defineSourceRelation(self.inputMask, out)

    # --------------------------- INFO functions -----------------------------
    def _validate(self):
        parts = self.inputParticles.get()
        vol = self.inputVolume.get()
        mask = self.inputMask.get()
        if parts is None or vol is None or mask is None:
            return ["Give particles, a reference map and a mask."]
        errors = []
        if not parts.hasAlignmentProj():
            errors.append(
                "The particles have no 3D alignment (projection poses); "
                "subtraction projects the reference at each particle's pose."
            )
        first = parts.getFirstItem()
        if first is not None:
            errors += check_mrc("Particle stack", first)
        errors += check_mrc("Reference map", vol) + check_mrc("Mask", mask)
        box, apix = int(parts.getXDim() or 0), parts.getSamplingRate()
        errors += check_volume_against(
            "Reference map", vol, box=box, pixel_size_a=apix, against="particles'"
        )
        errors += check_volume_against(
            "Mask", mask, box=box, pixel_size_a=apix, against="particles'"
        )
        new_box = self.newBox.get()
        if new_box is not None and not 0 < new_box <= box:
            errors.append(f"New box {new_box} px must be between 1 and {box} px.")
        return errors

    def _summary(self):
        new_box = self.newBox.get()
        lines = [
            f"Half maps: {'yes' if self._useHalfMaps() else 'no'}; re-centred: "
            f"{'yes' if self.recenter.get() else 'no'}; box: "
            f"{new_box if new_box else 'unchanged'}."
        ]
        if self.hasAttribute(SubtractOutputs.outputParticles.name):
            lines.append(f"{self.outputParticles.getSize()} subtracted particles.")
        else:
            lines.append("Output not ready yet.")
        return lines

    def _methods(self):
        return [
            "The reference's signal outside the mask was subtracted from each "
            "particle with localrefine (projection at the particle's pose and CTF, "
            "least-squares scaled to the particle"
            f"{', own half map per half set' if self._useHalfMaps() else ''})"
            f"{'; images re-centred on the mask' if self.recenter.get() else ''}"
            f"{f' and re-boxed to {self.newBox.get()} px' if self.newBox.get() else ''}."
        ]

    # --------------------------- UTILS functions ----------------------------
    def _getArgs(self) -> dict:
        self._createFilenameTemplates()
        return {
            "--particles": self._getFileName("input_star"),
            "--reference": self._getFileName("reference"),
            "--half-maps": (
                [self._getFileName("half1"), self._getFileName("half2")]
                if self._useHalfMaps()
                else None
            ),
            "--mask": self._getFileName("mask"),
            "--output": self._getFileName("output_dir"),
            "--recenter": bool(self.recenter.get()),
            "--new-box": self.newBox.get(),
        }

    def _getArgsLine(self) -> str:
        return args_line("subtract", self._getArgs())

    def _reboxed(self) -> bool:
        return bool(self.recenter.get() or self.newBox.get())
