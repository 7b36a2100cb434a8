"""Checkpoints of a refinement: one file per completed iteration.

Each checkpoint is ``DIR/checkpoints/iteration_NNN.npz`` holding every array
the next iteration needs (poses, half maps, noise model, mask) and a JSON
``state`` (history, alignment radius, convergence counters, options,
fingerprint of the inputs). It is written under a temporary name and renamed,
so a file with the final name is always complete; ``--continue`` loads the one
with the highest iteration number.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "checkpoint_dir",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^iteration_(\d{3,})\.npz$")


@dataclass
class Checkpoint:
    """The state of a refinement after a completed iteration.

    Attributes
    ----------
    iteration : int
        Iterations completed (1-based; the final full-resolution pass counts).
    rotations : ndarray, shape (n, 3, 3), float64
        Current RELION matrices ``A`` of every particle (file order).
    origins_px : ndarray, shape (n, 2), float64
        Current origins ``(x, y)`` in pixels (standard poses, box centre).
    half_maps : ndarray, shape (2, N, N, N), float32
        Current half-set reconstructions (unmasked).
    sigma2 : ndarray, shape (n_groups, N//2+1), float64
        Noise power per optics group and shell.
    mask : ndarray, shape (N, N, N), float32
        Mask used for alignment and FSC in the next iteration.
    state : dict
        JSON-serialisable bookkeeping (history, counters, options, fingerprint).
    arrays : dict
        Further named arrays (e.g. the best score of every particle).
    """

    iteration: int
    rotations: np.ndarray
    origins_px: np.ndarray
    half_maps: np.ndarray
    sigma2: np.ndarray
    mask: np.ndarray
    state: dict
    arrays: dict = field(default_factory=dict)


def checkpoint_dir(output_dir) -> Path:
    """``output_dir/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically as ``checkpoints/iteration_NNN.npz``; return its path."""
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"iteration_{ckpt.iteration:03d}.npz"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    extra = {f"extra_{k}": np.asarray(v) for k, v in ckpt.arrays.items()}
    try:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                iteration=np.int64(ckpt.iteration),
                rotations=np.asarray(ckpt.rotations, dtype=np.float64),
                origins_px=np.asarray(ckpt.origins_px, dtype=np.float64),
                half_maps=np.asarray(ckpt.half_maps, dtype=np.float32),
                sigma2=np.asarray(ckpt.sigma2, dtype=np.float64),
                mask=np.asarray(ckpt.mask, dtype=np.float32),
                state=np.array(json.dumps(ckpt.state, sort_keys=True)),
                **extra,
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.debug("checkpoint written: %s", path)
    return path


def _read(path: Path) -> Checkpoint:
    with np.load(path, allow_pickle=False) as z:
        return Checkpoint(
            iteration=int(z["iteration"]),
            rotations=z["rotations"],
            origins_px=z["origins_px"],
            half_maps=z["half_maps"],
            sigma2=z["sigma2"],
            mask=z["mask"],
            state=json.loads(str(z["state"])),
            arrays={k[6:]: z[k] for k in z.files if k.startswith("extra_")},
        )


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Completed checkpoints ``(iteration, path)``, in increasing iteration order."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_latest_checkpoint(output_dir) -> Checkpoint | None:
    """The checkpoint of the last complete iteration, or None when there is none.

    A file that cannot be read (e.g. a disk error) is skipped with a warning and
    the one before it is used.
    """
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            return _read(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping unreadable checkpoint %s (%s)", path, exc)
    return None


def prune_checkpoints(output_dir, *, keep: int = 2) -> None:
    """Delete all but the ``keep`` most recent checkpoints (maps make them large)."""
    for _, path in list_checkpoints(output_dir)[:-keep]:
        path.unlink(missing_ok=True)
