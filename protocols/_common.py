"""Helpers shared by the localrefine protocols (validation, GPUs, engine outputs).

No GPU library is imported here: GPUs are detected from the driver's files or
``nvidia-smi``, so the protocols load on machines without CUDA.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import subprocess
from pathlib import Path

#: Relative tolerance of "same pixel size" checks.
PIXEL_SIZE_RTOL = 1e-3


def gpus_available() -> list[str]:
    """Ids of the NVIDIA GPUs this machine has (empty list when none).

    Reads ``/proc/driver/nvidia/gpus`` and falls back to ``nvidia-smi -L``.
    """
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        found = sorted(os.listdir(proc))
        if found:
            return [str(i) for i in range(len(found))]
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return []
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("GPU ")]
    return [str(i) for i in range(len(lines))]


def parse_gpu_list(text: str) -> list[str]:
    """GPU ids from Scipion's GPU list field (``"0 1"``, ``"0,1"``)."""
    return [t for t in str(text or "").replace(",", " ").split() if t]


def gpu_errors(gpu_list: str, *, allow_cpu_fallback: bool) -> tuple[list[str], bool]:
    """Validate a GPU request: (error messages, whether to fall back to the CPU)."""
    available = gpus_available()
    wanted = parse_gpu_list(gpu_list)
    if not available:
        if allow_cpu_fallback:
            return [], True
        return (
            [
                "GPU requested (Use GPU = Yes) but this machine has no NVIDIA GPU. "
                "Set 'Use GPU' to No, or allow the CPU fallback."
            ],
            False,
        )
    missing = [g for g in wanted if g not in available]
    if missing:
        return (
            [
                f"GPU id(s) {' '.join(missing)} not found; this machine has "
                f"{len(available)} GPU(s): {' '.join(available)}."
            ],
            False,
        )
    return [], False


def same_pixel_size(a: float, b: float) -> bool:
    """Pixel sizes equal within :data:`PIXEL_SIZE_RTOL`."""
    return math.isclose(float(a), float(b), rel_tol=PIXEL_SIZE_RTOL)


def check_volume_against(
    name: str, vol, *, box: int, pixel_size_a: float, against: str
) -> list[str]:
    """Errors when ``vol`` (a Scipion volume) has another box or pixel size.

    ``box`` 0 (unknown) skips the box check.
    """
    errors = []
    if not same_pixel_size(vol.getSamplingRate(), pixel_size_a):
        errors.append(
            f"{name} pixel size {vol.getSamplingRate():.4f} A differs from the "
            f"{against} pixel size {pixel_size_a:.4f} A; resample one of them."
        )
    dim = vol.getXDim()
    if dim is not None and box and int(dim) != int(box):
        errors.append(
            f"{name} box {dim} px differs from the {against} box {box} px; "
            "resize (crop or pad) one of them."
        )
    return errors


def check_mrc(name: str, obj) -> list[str]:
    """Errors when ``obj``'s file is not MRC (the engine reads MRC only)."""
    from localrefine_plugin.convert import is_mrc_file

    fn = obj.getFileName()
    if not is_mrc_file(fn):
        return [f"{name} file {fn} is not MRC (.mrc/.mrcs); convert it to MRC first."]
    return []


def read_summary(path) -> dict:
    """``summary.json`` written by ``localrefine refine`` (empty dict when absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def read_fsc_csv(path) -> dict[str, list[float]]:
    """Columns of ``fsc.csv`` (``shell,resolution_A,fsc_unmasked,fsc_masked,
    fsc_corrected``) as lists of floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


def iteration_history(summary: dict) -> list[dict]:
    """The per-iteration records of ``summary.json`` (``per_iteration``)."""
    return list(summary.get("per_iteration", []))


def args_line(command: str, args: dict) -> str:
    """``localrefine COMMAND`` arguments from a dict built by a protocol's ``_getArgs``.

    ``None`` and ``False`` values are left out, ``True`` gives the bare flag,
    lists and tuples give space-separated values; every value is shell-quoted.
    """
    parts = [command]
    for key, value in args.items():
        if value is None or value is False:
            continue
        if value is True:
            parts.append(key)
        elif isinstance(value, list | tuple):
            parts.append(key)
            parts.extend(shlex.quote(str(v)) for v in value)
        else:
            parts.extend([key, shlex.quote(str(value))])
    return " ".join(parts)


def summary_resolution(summary: dict) -> float | None:
    """Final resolution (A, masked, corrected, FSC 0.143) of ``summary.json``.

    ``None`` when the run did not write one (stopped early).
    """
    value = summary.get("resolution_A")
    return None if value is None else float(value)


class ParticlesVolumeMaskInputs:
    """Mixin of the protocols whose inputs are particles, a volume (with half maps) and a mask.

    The protocol defines ``inputParticles``, ``inputVolume``, ``inputMask``,
    ``useHalfMaps`` and the filename templates ``input_star`` and ``input_dir``.
    """

    def convertInputStep(self, particlesId, volumeId, maskId):
        """Write the particles as RELION 3.1 STAR and link the maps for the engine.

        The object ids are arguments so that Scipion's "Continue" reruns this
        step when an input changes.
        """
        from localrefine_plugin.convert import link_mrc, write_particles_star

        self._createFilenameTemplates()
        write_particles_star(self.inputParticles.get(), self._getFileName("input_star"))
        folder = self._getFileName("input_dir")
        vol = self.inputVolume.get()
        link_mrc(vol.getFileName(), folder, name="reference.mrc")
        if self._useHalfMaps():
            h1, h2 = list(vol.getHalfMaps(asList=True))[:2]
            link_mrc(h1, folder, name="reference_half1.mrc")
            link_mrc(h2, folder, name="reference_half2.mrc")
        link_mrc(self.inputMask.get().getFileName(), folder, name="mask.mrc")

    def _useHalfMaps(self) -> bool:
        vol = self.inputVolume.get()
        return bool(self.useHalfMaps.get() and vol is not None and vol.hasHalfMaps())
