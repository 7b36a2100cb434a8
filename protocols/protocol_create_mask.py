"""Soft mask from a map: ``localrefine mask`` as a Scipion protocol."""

from __future__ import annotations

import enum

import pyworkflow.protocol.params as params
from pwem.objects import VolumeMask
from pwem.protocols import ProtCreateMask3D
from pyworkflow import BETA

from localrefine_plugin.convert import link_mrc

from ._common import args_line, check_mrc


class CreateMaskOutputs(enum.Enum):
    outputMask = VolumeMask


class ProtLocalRefineCreateMask(ProtCreateMask3D):
    """Soft mask (values 0-1, raised-cosine edge) around the density of a map.

    The map is low-passed, binarised at a density threshold, extended by a
    distance and given a soft edge, as ``localrefine mask`` does. Use it to
    mark the region to refine locally (e.g. a map of that region alone, or a
    segment of the consensus map).
    """

    _label = "create soft mask"
    _devStatus = BETA
    _possibleOutputs = CreateMaskOutputs

    # --------------------------- DEFINE param functions ---------------------
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam(
            "inputVolume",
            params.PointerParam,
            pointerClass="Volume",
            label="Input map",
            important=True,
            help="Map whose density the mask covers (MRC).",
        )
        form.addParam(
            "threshold",
            params.FloatParam,
            default=None,
            allowsNull=True,
            label="Threshold (density)",
            help="Density level of the low-passed map that becomes the mask's "
            "inside. Leave empty for localrefine's default rule (logged in the "
            "run's output). Rule of thumb: the level at which the region looks "
            "solid in a 3D viewer.",
        )
        form.addParam(
            "lowpass",
            params.FloatParam,
            default=15.0,
            label="Low-pass before threshold (A)",
            help="Resolution to which the map is filtered before thresholding "
            "(0 = none). 10-20 A gives smooth masks.",
        )
        form.addParam(
            "extend",
            params.FloatParam,
            default=3.0,
            label="Extend (A)",
            help="Grow the thresholded region by this distance.",
        )
        form.addParam(
            "softEdge",
            params.FloatParam,
            default=6.0,
            label="Soft edge width (A)",
            help="Width of the raised-cosine edge. 5-10 A avoids the mask-edge "
            "artefacts of sharp masks.",
        )

    # --------------------------- INSERT steps functions ---------------------
    def _createFilenameTemplates(self):
        self._updateFilenamesDict(
            {
                "input_map": self._getExtraPath("input_map.mrc"),
                "mask": self._getExtraPath("mask.mrc"),
            }
        )

    def _insertAllSteps(self):
        self._createFilenameTemplates()
        self._insertFunctionStep(
            self.convertInputStep, self.inputVolume.get().getObjId(), needsGPU=False
        )
        self._insertFunctionStep(self.createMaskStep, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS functions ----------------------------
    def convertInputStep(self, volumeId):
        self._createFilenameTemplates()
        link_mrc(
            self.inputVolume.get().getFileName(),
            self._getExtraPath(),
            name="input_map.mrc",
        )

    def createMaskStep(self):
        self._createFilenameTemplates()
        from localrefine_plugin import Plugin

        self.runJob(Plugin.getProgram(), self._getArgsLine(), env=Plugin.getEnviron())

    def createOutputStep(self):
        self._createFilenameTemplates()
        vol = self.inputVolume.get()
        mask = VolumeMask()
        mask.setFileName(self._getFileName("mask"))
        mask.setSamplingRate(vol.getSamplingRate())
        self._defineOutputs(**{CreateMaskOutputs.outputMask.name: mask})
        self._defineSourceRelation(self.inputVolume, mask)

    # --------------------------- INFO functions -----------------------------
    def _validate(self):
        errors = []
        vol = self.inputVolume.get()
        if vol is None:
            return ["Give an input map."]
        errors += check_mrc("Input map", vol)
        for name, label in (
            ("lowpass", "Low-pass"),
            ("extend", "Extend"),
            ("softEdge", "Soft edge"),
        ):
            value = getattr(self, name).get()
            if value is None or value < 0:
                errors.append(f"{label} must be >= 0 A (got {value}).")
        return errors

    def _summary(self):
        threshold = self.threshold.get()
        lines = [
            f"Threshold: {'default rule' if threshold is None else threshold}, "
            f"low-pass {self.lowpass.get():g} A, extend {self.extend.get():g} A, "
            f"soft edge {self.softEdge.get():g} A."
        ]
        if self.hasAttribute(CreateMaskOutputs.outputMask.name):
            lines.append(f"Mask: {self.outputMask.getFileName()}")
        else:
            lines.append("Output not ready yet.")
        return lines

    def _methods(self):
        threshold = self.threshold.get()
        return [
            "A soft mask was made with localrefine: the map was low-passed to "
            f"{self.lowpass.get():g} A, binarised at "
            f"{'the default threshold' if threshold is None else f'{threshold:g}'}, "
            f"extended by {self.extend.get():g} A and given a "
            f"{self.softEdge.get():g} A raised-cosine edge."
        ]

    # --------------------------- UTILS functions ----------------------------
    def _getArgs(self) -> dict:
        args = {
            "--map": self._getFileName("input_map"),
            "--output": self._getFileName("mask"),
            "--lowpass": self.lowpass.get(),
            "--extend": self.extend.get(),
            "--soft-edge": self.softEdge.get(),
        }
        if self.threshold.get() is not None:
            args["--threshold"] = self.threshold.get()
        return args

    def _getArgsLine(self) -> str:
        return args_line("mask", self._getArgs())
