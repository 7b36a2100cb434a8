"""Final outputs of a local refinement, each written atomically.

Files in the output directory (see ``docs/local_refinement.md``):
``particles.star``, ``map.mrc``, ``half_map_1.mrc``, ``half_map_2.mrc``,
``fsc.csv``, ``fsc.png`` and, last of all, ``summary.json``. Every file is
written under a temporary name and renamed, and ``summary.json`` is written
only after all the others: a run that was killed never leaves a
``summary.json``, so its presence marks a complete output.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from . import fsc as fsc_mod
from . import mrc_io
from . import particles as particles_mod

__all__ = ["OUTPUT_FILES", "write_outputs", "write_json_atomic", "remove_outputs"]

log = logging.getLogger(__name__)

#: Final outputs, in the order they are written (summary.json last).
OUTPUT_FILES = (
    "particles.star",
    "half_map_1.mrc",
    "half_map_2.mrc",
    "map.mrc",
    "fsc.csv",
    "fsc.png",
    "summary.json",
)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path, data: dict) -> None:
    """Write ``data`` as indented JSON (NaN/inf as null), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_outputs(output_dir) -> None:
    """Delete final outputs left by an earlier run (``summary.json`` first)."""
    for name in reversed(OUTPUT_FILES):
        (Path(output_dir) / name).unlink(missing_ok=True)


def write_outputs(
    output_dir,
    *,
    particles,
    half_maps: np.ndarray,
    full_map: np.ndarray,
    fsc_result,
    pixel_size_a: float,
    summary: dict,
) -> None:
    """Write every final output; ``summary.json`` last.

    Parameters
    ----------
    output_dir : str or Path
    particles : Particles
        The refined particle set (same order and columns as the input).
    half_maps : ndarray, shape (2, N, N, N)
    full_map : ndarray, shape (N, N, N)
    fsc_result : FscResult
        Half-map FSC with the mask (:func:`.fsc.compute_fsc`).
    pixel_size_a : float
        Written into every map header (Angstrom).
    summary : dict
        Contents of ``summary.json``.
    """
    out = Path(output_dir)
    particles_mod.write_particles(out / "particles.star", particles)
    for i in (0, 1):
        mrc_io.write_map(
            out / f"half_map_{i + 1}.mrc", half_maps[i].astype(np.float32), pixel_size_a
        )
    mrc_io.write_map(out / "map.mrc", full_map.astype(np.float32), pixel_size_a)
    fsc_mod.write_fsc_csv(out / "fsc.csv", fsc_result)
    fsc_mod.plot_fsc(
        out / "fsc.png",
        fsc_result,
        title=f"local refinement: {fsc_result.resolution_0143}",
    )
    write_json_atomic(out / "summary.json", summary)
    log.info("outputs written to %s", out)
