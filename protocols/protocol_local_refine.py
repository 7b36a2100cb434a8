"""Local refinement of a masked region: ``localrefine refine`` as a Scipion protocol."""

from __future__ import annotations

import enum
import importlib.util
import os

import pyworkflow.protocol.params as params
from pwem.objects import FSC, SetOfFSCs, SetOfParticles, Volume
from pwem.protocols import ProtRefine3D
from pyworkflow import BETA
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU

from localrefine_plugin.constants import (
    FSC_CHOICES_LABELS,
    FSC_THRESHOLD,
    FULCRUM_BOX,
    FULCRUM_CHOICES,
    FULCRUM_CUSTOM,
    FULCRUM_MASK,
)
from localrefine_plugin.convert import (
    update_particles_from_star,
)

from ._common import (
    ParticlesVolumeMaskInputs,
    args_line,
    check_mrc,
    check_volume_against,
    gpu_errors,
    iteration_history,
    parse_gpu_list,
    read_fsc_csv,
    read_summary,
    summary_resolution,
)


class LocalRefineOutputs(enum.Enum):
    outputVolume = Volume
    outputFSCs = SetOfFSCs
    outputParticles = SetOfParticles


class ProtLocalRefine(ParticlesVolumeMaskInputs, ProtRefine3D):
    """Local refinement of a masked region (cryoSPARC-style, branch and bound).

    Every particle is re-aligned only near its consensus pose (within the
    rotation and shift extents) against references masked to the region, with
    gold-standard half sets (``_rlnRandomSubset`` kept from the consensus
    refinement). Rotations pivot about a fulcrum (default: the mask's centre of
    mass). Outputs: the refined map with its half maps, the FSC curves
    (unmasked, masked, corrected) and the particles with refined poses.
    """

    _label = "local refinement"
    _devStatus = BETA
    _possibleOutputs = LocalRefineOutputs

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
            help="Particles with 3D poses from a consensus refinement, usually "
            "after signal subtraction. Their half-set labels "
            "(_rlnRandomSubset) are kept.",
        )
        form.addParam(
            "inputVolume",
            params.PointerParam,
            pointerClass="Volume",
            label="Reference map",
            important=True,
            help="Consensus map (same box and pixel size as the particles). If it "
            "has half maps, each half set starts from its own half map.",
        )
        form.addParam(
            "useHalfMaps",
            params.BooleanParam,
            default=True,
            expertLevel=params.LEVEL_ADVANCED,
            label="Use the reference's half maps?",
            help="Start each half set from its own half map (gold standard) when "
            "the reference has half maps.",
        )
        form.addParam(
            "inputMask",
            params.PointerParam,
            pointerClass="VolumeMask",
            label="Mask (region to refine)",
            important=True,
            help="Soft mask (0-1, 5-10 A raised-cosine edge) around the region.",
        )

        form.addSection(label="Local search")
        form.addParam(
            "rotationExtent",
            params.FloatParam,
            default=10.0,
            label="Rotation search extent (deg)",
            help="Largest rotation away from the consensus pose. cryoSPARC's "
            "default 10 deg; narrow it (3-5 deg) for small regions.",
        )
        form.addParam(
            "shiftExtent",
            params.FloatParam,
            default=3.0,
            label="Shift search extent (px)",
            help="Largest shift away from the consensus origin, in pixels "
            "(cryoSPARC's extent in A divided by the pixel size).",
        )
        form.addParam(
            "alignmentResolution",
            params.FloatParam,
            default=0.5,
            expertLevel=params.LEVEL_ADVANCED,
            label="Final alignment resolution (deg)",
            help="Rotation step at which the branch-and-bound search stops.",
        )
        form.addParam(
            "fulcrum",
            params.EnumParam,
            choices=FULCRUM_CHOICES,
            default=FULCRUM_MASK,
            display=params.EnumParam.DISPLAY_COMBO,
            label="Fulcrum",
            help="Point the local rotations pivot about: the mask's centre of "
            "mass (default, best for a domain), the box centre, or a point.",
        )
        line = form.addLine(
            "Fulcrum (px from box centre)",
            condition=f"fulcrum == {FULCRUM_CUSTOM}",
            help="x, y, z in pixels relative to the box centre N//2.",
        )
        line.addParam("fulcrumX", params.FloatParam, default=0.0, label="x")
        line.addParam("fulcrumY", params.FloatParam, default=0.0, label="y")
        line.addParam("fulcrumZ", params.FloatParam, default=0.0, label="z")
        form.addParam(
            "usePosePrior",
            params.BooleanParam,
            default=False,
            label="Use pose/shift gaussian prior?",
            help="Penalise pose changes away from the consensus (Gaussian priors).",
        )
        form.addParam(
            "priorSigmaRotation",
            params.FloatParam,
            default=15.0,
            condition="usePosePrior",
            label="Rotation prior sigma (deg)",
        )
        form.addParam(
            "priorSigmaShift",
            params.FloatParam,
            default=7.0,
            condition="usePosePrior",
            label="Shift prior sigma (A)",
        )
        form.addParam(
            "marginalizeTopK",
            params.IntParam,
            default=1,
            expertLevel=params.LEVEL_ADVANCED,
            label="Poses to marginalise over",
            help="1 = best pose only (cryoSPARC's behaviour); K > 1 weights the "
            "K best poses (closer to RELION's).",
        )

        form.addSection(label="Iterations and masks")
        form.addParam(
            "lowpassFromFsc",
            params.BooleanParam,
            default=False,
            label="Initial lowpass from the half maps' FSC?",
            help="Low-pass the reference to the resolution (FSC 0.143, inside the "
            "mask, corrected for it) of the reference's half maps, as cryoSPARC "
            "does. Needs a reference with half maps.",
        )
        form.addParam(
            "initialLowpass",
            params.FloatParam,
            default=8.0,
            condition="not lowpassFromFsc",
            label="Initial lowpass resolution (A)",
            help="The reference is low-passed to this resolution before the "
            "first iteration (RELION: --ini_high).",
        )
        form.addParam(
            "maxIterations",
            params.IntParam,
            default=8,
            label="Maximum number of iterations",
            help="Refinement stops earlier when the resolution has not improved "
            "for 2 iterations.",
        )
        form.addParam(
            "dynamicMask",
            params.BooleanParam,
            default=False,
            label="Use dynamic mask?",
            help="Recompute the mask from the current map each iteration "
            "(never larger than the input mask plus the far distance).",
        )
        form.addParam(
            "dynamicMaskThreshold",
            params.FloatParam,
            default=0.2,
            condition="dynamicMask",
            expertLevel=params.LEVEL_ADVANCED,
            label="Dynamic mask threshold (fraction of max)",
        )
        form.addParam(
            "dynamicMaskNear",
            params.FloatParam,
            default=6.0,
            condition="dynamicMask",
            expertLevel=params.LEVEL_ADVANCED,
            label="Dynamic mask near (A)",
        )
        form.addParam(
            "dynamicMaskFar",
            params.FloatParam,
            default=14.0,
            condition="dynamicMask",
            expertLevel=params.LEVEL_ADVANCED,
            label="Dynamic mask far (A)",
        )

        form.addSection(label="Compute")
        form.addHidden(
            USE_GPU,
            params.BooleanParam,
            default=False,
            label="Use GPU?",
            help="Score poses on NVIDIA GPUs (PyCUDA). No GPU: set to No.",
        )
        form.addHidden(
            GPU_LIST,
            params.StringParam,
            default="0",
            label="GPU ids",
            help="GPUs to use, e.g. '0' or '0 1' (one per MPI process).",
        )
        form.addParam(
            "allowCpuFallback",
            params.BooleanParam,
            default=False,
            expertLevel=params.LEVEL_ADVANCED,
            label="Fall back to the CPU when no GPU?",
            help="With GPU requested on a machine without one: No = refuse to "
            "start (default); Yes = run on the CPU.",
        )
        form.addParam(
            "batchSize",
            params.IntParam,
            default=0,
            expertLevel=params.LEVEL_ADVANCED,
            label="Particles per batch",
            help="Particles read and searched at once (--batch-size); 0 = "
            "automatic: 128 on the CPU, on the GPU 512 up to box 256, 256 up to "
            "box 384, else 128 (the GPU searches each batch at once, and larger "
            "batches run faster there).",
        )
        form.addParam(
            "noiseParticles",
            params.IntParam,
            default=20000,
            expertLevel=params.LEVEL_ADVANCED,
            label="Particles for the noise model",
            help="Most particles per optics group whose residuals estimate the "
            "noise power in each iteration (a fixed random draw); 0 = all. "
            "20,000 fix it to a fraction of a percent.",
        )
        form.addParallelSection(threads=1, mpi=1)

    # --------------------------- INSERT steps functions ---------------------
    def _createFilenameTemplates(self):
        out = self._getExtraPath("refine")
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
                "map": os.path.join(out, "map.mrc"),
                "out_half1": os.path.join(out, "half_map_1.mrc"),
                "out_half2": os.path.join(out, "half_map_2.mrc"),
                "fsc_csv": os.path.join(out, "fsc.csv"),
                "fsc_png": os.path.join(out, "fsc.png"),
                "summary": os.path.join(out, "summary.json"),
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
        self._insertFunctionStep(
            self.refineStep, self._getArgsLine(), needsGPU=self._wantsGpu()
        )
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS functions ----------------------------
    def refineStep(self, argsLine):
        self._createFilenameTemplates()
        from localrefine_plugin import Plugin

        if self.isContinued() and os.path.isdir(self._getFileName("output_dir")):
            # Scipion's "Continue": resume from the engine's last checkpoint (kept
            # out of the step arguments so a finished step is not rerun)
            argsLine += " --continue"

        env = Plugin.getEnviron()
        if self._wantsGpu() and not self._cpuFallback():
            env["CUDA_VISIBLE_DEVICES"] = ",".join(parse_gpu_list(self.gpuList.get()))
        self.runJob(Plugin.getProgram(), argsLine, env=env)

    def createOutputStep(self):
        self._createFilenameTemplates()
        particles = self.inputParticles.get()
        pixel_size = particles.getSamplingRate()

        vol = Volume()
        vol.setFileName(self._getFileName("map"))
        vol.setSamplingRate(pixel_size)
        vol.setHalfMaps(
            [self._getFileName("out_half1"), self._getFileName("out_half2")]
        )

        fscs = self._createSetOfFSCs()
        for label, column in zip(
            FSC_CHOICES_LABELS,
            ("fsc_unmasked", "fsc_masked", "fsc_corrected"),
            strict=True,
        ):
            fscs.append(self._fscObject(label, column))
        fscs.write()

        out = self._createSetOfParticles()
        update_particles_from_star(
            particles, out, self._getFileName("output_star"), keep_images=True
        )

        self._defineOutputs(
            **{
                LocalRefineOutputs.outputVolume.name: vol,
                LocalRefineOutputs.outputFSCs.name: fscs,
                LocalRefineOutputs.outputParticles.name: out,
            }
        )
        for src in (self.inputParticles, self.inputVolume, self.inputMask):
            self._defineSourceRelation(src, vol)
        self._defineSourceRelation(self.inputParticles, fscs)
        self._defineTransformRelation(self.inputParticles, out)

    # --------------------------- INFO functions -----------------------------
    def _validate(self):
        errors = []
        parts = self.inputParticles.get()
        vol = self.inputVolume.get()
        mask = self.inputMask.get()
        if parts is None or vol is None or mask is None:
            return ["Give particles, a reference map and a mask."]
        if not parts.hasAlignmentProj():
            errors.append(
                "The particles have no 3D alignment (projection poses); local "
                "refinement starts from consensus poses. Use particles from a 3D "
                "refinement."
            )
        first = parts.getFirstItem()
        if first is not None:
            errors += check_mrc("Particle stack", first)
        box, apix = int(parts.getXDim() or 0), parts.getSamplingRate()
        errors += check_mrc("Reference map", vol)
        errors += check_mrc("Mask", mask)
        errors += check_volume_against(
            "Reference map", vol, box=box, pixel_size_a=apix, against="particles'"
        )
        errors += check_volume_against(
            "Mask", mask, box=box, pixel_size_a=apix, against="particles'"
        )
        if self._useHalfMaps():
            for fn in vol.getHalfMaps(asList=True):
                if not os.path.exists(fn):
                    errors.append(f"Half map {fn} of the reference does not exist.")
        rot, shift = self.rotationExtent.get(), self.shiftExtent.get()
        res = self.alignmentResolution.get()
        if rot is None or rot < 0 or shift is None or shift < 0:
            errors.append("Search extents must be >= 0.")
        if res is None or res <= 0:
            errors.append("Final alignment resolution must be > 0 deg.")
        elif rot is not None and 0 < rot < res:
            errors.append(
                f"Rotation extent {rot:g} deg is finer than the alignment "
                f"resolution {res:g} deg; widen the extent or refine the resolution."
            )
        if self.lowpassFromFsc.get():
            if not self._useHalfMaps():
                errors.append(
                    "Initial lowpass from the half maps' FSC needs a reference with "
                    "half maps (and 'Use the reference's half maps?' on); otherwise "
                    "give the initial lowpass resolution in A."
                )
        elif self.initialLowpass.get() is None or self.initialLowpass.get() <= 0:
            errors.append("Initial lowpass resolution must be > 0 A.")
        if self.maxIterations.get() is None or self.maxIterations.get() < 1:
            errors.append("Maximum number of iterations must be >= 1.")
        if self.numberOfMpi.get() > 1 and importlib.util.find_spec("mpi4py") is None:
            errors.append(
                "MPI processes > 1 need mpi4py (pip install "
                "'scipion-em-localrefine[mpi]'); or set MPI to 1 and use threads."
            )
        if self._wantsGpu():
            errors += gpu_errors(
                self.gpuList.get(), allow_cpu_fallback=self.allowCpuFallback.get()
            )[0]
        return errors

    def _warnings(self):
        warnings = []
        if self._wantsGpu() and self._cpuFallback():
            warnings.append("No GPU on this machine: local refinement runs on the CPU.")
        parts = self.inputParticles.get()
        first = parts.getFirstItem() if parts is not None else None
        if first is not None and not first.hasAttribute("_rlnRandomSubset"):
            warnings.append(
                "The particles have no half-set labels (_rlnRandomSubset): "
                "localrefine assigns them by row (odd -> 1, even -> 2)."
            )
        return warnings

    def _lowpassText(self) -> str:
        """The initial low-pass in words (resolved from the run once it has one)."""
        if not self.lowpassFromFsc.get():
            return f"{self.initialLowpass.get():g} A"
        used = (self._readSummary() or {}).get("options", {}).get("initial_lowpass_a")
        if isinstance(used, int | float):
            return f"{used:.2f} A (the half maps' FSC)"
        return "the half maps' FSC resolution"

    def _summary(self):
        lines = [
            f"Extents: rotation {self.rotationExtent.get():g} deg, shift "
            f"{self.shiftExtent.get():g} px; fulcrum: {self._fulcrumText()}; "
            f"initial low-pass {self._lowpassText()}; "
            f"at most {self.maxIterations.get()} iterations; "
            f"{'dynamic' if self.dynamicMask.get() else 'static'} mask."
        ]
        summary = self._readSummary()
        if summary:
            res = summary_resolution(summary)
            its = iteration_history(summary)
            n_it = len(its) if its else summary.get("iterations")
            lines.append(
                f"Resolution (masked, corrected, FSC {FSC_THRESHOLD}): "
                f"{_fmt_res(res)} after {n_it} iterations "
                f"({summary.get('n_particles', '?')} particles, "
                f"{float(summary.get('wall_seconds', 0.0)):.0f} s)."
            )
        else:
            lines.append("Output not ready yet.")
        return lines

    def _methods(self):
        text = (
            "Particles were locally refined with localrefine (a cryoSPARC-style "
            "branch-and-bound local search [Punjani2017] with gold-standard half "
            "sets [Scheres2012]), within "
            f"{self.rotationExtent.get():g} deg and {self.shiftExtent.get():g} px "
            f"of the consensus poses, rotations about the {self._fulcrumText()}, "
            f"starting from the reference low-passed to {self._lowpassText()}."
        )
        summary = self._readSummary()
        if summary_resolution(summary) is not None:
            text += (
                f" The masked, phase-randomisation-corrected [Chen2013] FSC fell "
                f"below {FSC_THRESHOLD} at {_fmt_res(summary_resolution(summary))}."
            )
        return [text]

    def _citations(self):
        return ["Punjani2017", "Punjani2020", "Scheres2012", "Chen2013"]

    # --------------------------- UTILS functions ----------------------------
    def _getArgs(self) -> dict:
        self._createFilenameTemplates()
        fulcrum = {
            FULCRUM_MASK: "mask",
            FULCRUM_BOX: "box",
            FULCRUM_CUSTOM: (
                f"{self.fulcrumX.get():g},{self.fulcrumY.get():g},"
                f"{self.fulcrumZ.get():g}"
            ),
        }[self.fulcrum.get()]
        args = {
            "--particles": self._getFileName("input_star"),
            "--reference": self._getFileName("reference"),
            "--half-maps": (
                [self._getFileName("half1"), self._getFileName("half2")]
                if self._useHalfMaps()
                else None
            ),
            "--mask": self._getFileName("mask"),
            "--output": self._getFileName("output_dir"),
            "--rotation-extent": self.rotationExtent.get(),
            "--shift-extent": self.shiftExtent.get(),
            "--alignment-resolution": self.alignmentResolution.get(),
            "--fulcrum": fulcrum,
            "--initial-lowpass": (
                "fsc" if self.lowpassFromFsc.get() else self.initialLowpass.get()
            ),
            "--max-iterations": self.maxIterations.get(),
            "--marginalize-top-k": self.marginalizeTopK.get(),
            "--device": self._device(),
            "--threads": self.numberOfThreads.get(),
            "--batch-size": self.batchSize.get(),
            "--noise-particles": self.noiseParticles.get(),
        }
        if self.usePosePrior.get():
            args["--prior-sigma-rotation"] = self.priorSigmaRotation.get()
            args["--prior-sigma-shift"] = self.priorSigmaShift.get()
        if self.dynamicMask.get():
            args["--dynamic-mask"] = True
            args["--dynamic-mask-threshold"] = self.dynamicMaskThreshold.get()
            args["--dynamic-mask-near"] = self.dynamicMaskNear.get()
            args["--dynamic-mask-far"] = self.dynamicMaskFar.get()
        else:
            args["--static-mask"] = True
        return args

    def _getArgsLine(self) -> str:
        return args_line("refine", self._getArgs())

    def _wantsGpu(self) -> bool:
        return bool(getattr(self, USE_GPU).get())

    def _cpuFallback(self) -> bool:
        return gpu_errors(self.gpuList.get(), allow_cpu_fallback=True)[1]

    def _device(self) -> str:
        if not self._wantsGpu():
            return "cpu"
        return "auto" if self._cpuFallback() else "cuda"

    def _fulcrumText(self) -> str:
        if self.fulcrum.get() == FULCRUM_CUSTOM:
            return (
                f"point ({self.fulcrumX.get():g}, {self.fulcrumY.get():g}, "
                f"{self.fulcrumZ.get():g}) px"
            )
        return FULCRUM_CHOICES[self.fulcrum.get()]

    def _readSummary(self) -> dict:
        self._createFilenameTemplates()
        return read_summary(self._getFileName("summary"))

    def _fscObject(self, label: str, column: str) -> FSC:
        """An FSC object (x: spatial frequency in 1/A, y: FSC) from ``fsc.csv``."""
        data = read_fsc_csv(self._getFileName("fsc_csv"))
        freq = [
            0.0 if r == float("inf") or r <= 0 else 1.0 / r
            for r in data["resolution_A"]
        ]
        fsc = FSC(objLabel=label)
        fsc.setData(freq, data[column])
        return fsc


def _fmt_res(value) -> str:
    return "n/a" if value is None else f"{float(value):.2f} A"
