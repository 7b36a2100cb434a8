"""Particle sets from RELION STAR files: poses, origins, CTF, half sets, images.

Conventions (see ``docs/conventions.md``)
-----------------------------------------
* Poses are RELION ZYZ Euler angles ``(rot, tilt, psi)`` in degrees.
* Origins are held in pixels, ``origin_px[:, 0] = x``, ``origin_px[:, 1] = y``;
  RELION 3.1+ stores them in Angstrom (``rlnOriginXAngst/YAngst``, converted
  with the optics group's ``rlnImagePixelSize``), RELION 3.0 in pixels
  (``rlnOriginX/Y``).
* Image references ``N@stack.mrcs`` are 1-based in the file and 0-based here.
  A relative stack path is looked up in the current directory first (RELION
  resolves it against the project directory), then beside the STAR file.
* Half sets are ``rlnRandomSubset`` (1 or 2); when absent, row ``i`` (0-based)
  gets ``i % 2 + 1`` and a warning says so.
* :func:`write_particles` always writes RELION 3.1 format (``data_optics`` and
  ``data_particles``), keeping every other column and block of the input; a
  column whose values did not change keeps its original text.

One box size and one pixel size are required across all optics groups.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .ctf import CtfParams
from .errors import InputError
from .geometry import euler_to_matrix
from .mrc_io import open_stack, stack_info
from .star import StarBlock, StarDocument, read_star, write_star

__all__ = ["Particles", "read_particles", "write_particles", "make_particles"]

log = logging.getLogger(__name__)

_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
#: Per-particle optics columns of RELION 3.0 that move to the optics table.
_OPTICS_30 = (
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnMagnification",
    "rlnDetectorPixelSize",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
)
#: Memory-mapped stacks kept open at once by :meth:`Particles.load_images`.
_MAX_OPEN_STACKS = 64
_SPLIT_FIX = (
    "split the particle set by optics group (e.g. relion_star_handler --split_by_optics) "
    "and process each part separately"
)


class _StackCache:
    """Open memory-mapped stacks, least recently used dropped first; thread-safe.

    Copies made by :meth:`Particles.subset` and :meth:`Particles.with_poses`
    share one cache. At most ``_MAX_OPEN_STACKS`` maps stay open (one file
    descriptor each).
    """

    def __init__(self) -> None:
        self._maps: OrderedDict[Path, np.memmap] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> np.memmap:
        with self._lock:
            mm = self._maps.get(path)
            if mm is not None:
                self._maps.move_to_end(path)
                return mm
        mm = open_stack(path)  # header read outside the lock
        with self._lock:
            mm = self._maps.setdefault(path, mm)
            while len(self._maps) > _MAX_OPEN_STACKS:
                self._maps.popitem(last=False)
        return mm

    def values(self) -> list[np.memmap]:
        with self._lock:
            return list(self._maps.values())

    def release_pages(self) -> None:
        """Drop the read pages of every open map from this process's resident set.

        Pages of a memory-mapped file that were read stay resident (``RssFile``)
        while the map is open, so streaming a 6.5 GB stack would show 6.5 GB of
        RSS. ``MADV_DONTNEED`` on a read-only file map drops them from this
        process (the kernel's page cache keeps them; the next read maps them
        again), so resident memory stays bounded by the batch size.
        """
        for mm in self.values():
            handle = getattr(mm, "_mmap", None)  # numpy keeps the mmap object here
            if handle is not None and hasattr(handle, "madvise"):
                handle.madvise(mmap.MADV_DONTNEED)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


class Particles:
    """A set of ``n`` particle images with poses, origins, CTF and half sets.

    Build one with :func:`read_particles` or :func:`make_particles`; derive new
    ones with :meth:`with_poses` and :meth:`subset`. Arrays are read-only.

    Attributes
    ----------
    n : int
        Number of particles.
    rot_deg, tilt_deg, psi_deg : ndarray, shape (n,), float64
        RELION ZYZ Euler angles in degrees (zeros when ``has_poses`` is False).
    origin_px : ndarray, shape (n, 2), float64
        Origins ``(x, y)`` in pixels, RELION's sign: the particle is the
        centred projection moved by ``-origin`` (checked against
        ``relion_reconstruct`` and ``relion_project`` in the tests).
    ctf : CtfParams or None
        Per-particle arrays (n,) of every field; None when the STAR file has
        no ``rlnDefocusU``.
    optics_group : ndarray, shape (n,), int64
        ``rlnOpticsGroup`` of each particle.
    random_subset : ndarray, shape (n,), int64
        Half set, 1 or 2.
    stack_paths : tuple of Path
        The distinct stack files (resolved; see the module docstring).
    stack_id : ndarray, shape (n,), int64
        Index into ``stack_paths`` of each particle's stack.
    stack_index : ndarray, shape (n,), int64
        0-based image index of each particle in its stack.
    box : int
        Image size in pixels.
    pixel_size_a : float
        Pixel size in Angstrom.
    has_poses : bool
        Whether the input had ``rlnAngleRot/Tilt/Psi`` (or poses were set).
    star_path : Path or None
        The STAR file read, if any.
    """

    def __init__(
        self,
        *,
        rot_deg,
        tilt_deg,
        psi_deg,
        origin_px,
        ctf: CtfParams | None,
        optics_group,
        random_subset,
        stack_paths: Sequence[Path],
        stack_id,
        stack_index,
        box: int,
        pixel_size_a: float,
        has_poses: bool,
        optics: StarBlock,
        block: StarBlock,
        layout: Sequence[StarBlock | str],
        star_path: Path | None = None,
        from_relion30: bool = False,
        names_from_refs: bool = False,
        _cache: _StackCache | None = None,
    ) -> None:
        self.rot_deg = _readonly(np.asarray(rot_deg, dtype=np.float64))
        self.n = self.rot_deg.shape[0]
        self.tilt_deg = _readonly(np.asarray(tilt_deg, dtype=np.float64))
        self.psi_deg = _readonly(np.asarray(psi_deg, dtype=np.float64))
        self.origin_px = _readonly(
            np.asarray(origin_px, dtype=np.float64).reshape(self.n, 2)
        )
        self.ctf = ctf
        self.optics_group = _readonly(np.asarray(optics_group, dtype=np.int64))
        self.random_subset = _readonly(np.asarray(random_subset, dtype=np.int64))
        self.stack_paths = tuple(Path(p) for p in stack_paths)
        self.stack_id = _readonly(np.asarray(stack_id, dtype=np.int64))
        self.stack_index = _readonly(np.asarray(stack_index, dtype=np.int64))
        self.box = int(box)
        self.pixel_size_a = float(pixel_size_a)
        self.has_poses = bool(has_poses)
        self.star_path = None if star_path is None else Path(star_path)
        self._optics = optics
        self._block = block
        self._layout = list(layout)
        self._from_relion30 = from_relion30
        self._names_from_refs = names_from_refs
        self._cache = _StackCache() if _cache is None else _cache
        for name in (
            "tilt_deg",
            "psi_deg",
            "optics_group",
            "random_subset",
            "stack_id",
            "stack_index",
        ):
            if getattr(self, name).shape != (self.n,):
                raise ValueError(
                    f"{name} has shape {getattr(self, name).shape}; expected ({self.n},)"
                )
        if block.n_rows != self.n:
            raise ValueError(f"STAR table has {block.n_rows} rows; expected {self.n}")

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (
            f"Particles(n={self.n}, box={self.box}, pixel_size_a={self.pixel_size_a:g}, "
            f"has_poses={self.has_poses}, stacks={len(self.stack_paths)})"
        )

    @property
    def image_refs(self) -> list[tuple[Path, int]]:
        """``(stack path, 0-based index)`` of every particle."""
        return [
            (self.stack_paths[s], int(i))
            for s, i in zip(self.stack_id, self.stack_index, strict=True)
        ]

    @property
    def table(self) -> StarBlock:
        """A copy of the underlying particle table (all input columns, as strings)."""
        return self._block.copy()

    @property
    def optics_table(self) -> StarBlock:
        """A copy of the optics table (built from the particle rows for RELION 3.0 input)."""
        return self._optics.copy()

    def _where(self) -> str | None:
        return None if self.star_path is None else str(self.star_path)

    # -- poses -------------------------------------------------------------
    def require_poses(self) -> None:
        """Raise :class:`InputError` unless the particles have ``rlnAngleRot/Tilt/Psi``."""
        if not self.has_poses:
            raise InputError(
                self._where(),
                "particles have no poses (columns _rlnAngleRot, _rlnAngleTilt, _rlnAnglePsi)",
                "give particles from a consensus 3D refinement",
            )

    def matrices(self) -> np.ndarray:
        """Rotation matrices ``A`` (n, 3, 3), float64, of the poses (see geometry)."""
        self.require_poses()
        return euler_to_matrix(self.rot_deg, self.tilt_deg, self.psi_deg)

    def _replace(self, **changes) -> Particles:
        fields = dict(
            rot_deg=self.rot_deg,
            tilt_deg=self.tilt_deg,
            psi_deg=self.psi_deg,
            origin_px=self.origin_px,
            ctf=self.ctf,
            optics_group=self.optics_group,
            random_subset=self.random_subset,
            stack_paths=self.stack_paths,
            stack_id=self.stack_id,
            stack_index=self.stack_index,
            box=self.box,
            pixel_size_a=self.pixel_size_a,
            has_poses=self.has_poses,
            optics=self._optics,
            block=self._block,
            layout=self._layout,
            star_path=self.star_path,
            from_relion30=self._from_relion30,
            names_from_refs=self._names_from_refs,
            _cache=self._cache,
        )
        fields.update(changes)
        return Particles(**fields)

    def with_poses(self, rot_deg, tilt_deg, psi_deg, origin_px) -> Particles:
        """A copy with new poses.

        Parameters
        ----------
        rot_deg, tilt_deg, psi_deg : array_like, shape (n,)
            RELION ZYZ Euler angles in degrees.
        origin_px : array_like, shape (n, 2)
            Origins ``(x, y)`` in pixels.
        """
        arrays = [np.asarray(a, dtype=np.float64) for a in (rot_deg, tilt_deg, psi_deg)]
        origin = np.asarray(origin_px, dtype=np.float64)
        for name, a in zip(("rot_deg", "tilt_deg", "psi_deg"), arrays, strict=True):
            if a.shape != (self.n,):
                raise ValueError(f"{name} has shape {a.shape}; expected ({self.n},)")
        if origin.shape != (self.n, 2):
            raise ValueError(
                f"origin_px has shape {origin.shape}; expected ({self.n}, 2)"
            )
        return self._replace(
            rot_deg=arrays[0],
            tilt_deg=arrays[1],
            psi_deg=arrays[2],
            origin_px=origin,
            has_poses=True,
        )

    def subset(self, indices) -> Particles:
        """The particles ``indices`` (0-based, in that order), with their table rows."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"particle indices must be in 0..{self.n - 1}")
        ctf = None
        if self.ctf is not None:
            ctf = CtfParams(
                **{k: np.asarray(v)[idx] for k, v in vars(self.ctf).items()}
            )
        return self._replace(
            rot_deg=self.rot_deg[idx],
            tilt_deg=self.tilt_deg[idx],
            psi_deg=self.psi_deg[idx],
            origin_px=self.origin_px[idx],
            ctf=ctf,
            optics_group=self.optics_group[idx],
            random_subset=self.random_subset[idx],
            stack_id=self.stack_id[idx],
            stack_index=self.stack_index[idx],
            block=self._block.select_rows(idx),
        )

    # -- images --------------------------------------------------------------
    def validate_images(self) -> None:
        """Check every referenced stack from its header only, before any work.

        Raises
        ------
        InputError
            A stack is missing, not a readable MRC file, has the wrong box size,
            or holds fewer images than a particle refers to.
        """
        used = np.unique(self.stack_id)
        highest = np.full(len(self.stack_paths), -1, dtype=np.int64)
        np.maximum.at(highest, self.stack_id, self.stack_index)
        for s in used:
            path = self.stack_paths[s]
            if not path.is_file():
                raise InputError(
                    path,
                    f"particle stack not found "
                    f"(referenced by {self._where() or 'the particle set'})",
                    "run from the project directory the image names are relative to, "
                    "or fix _rlnImageName",
                )
            n_images, box, _ = stack_info(path)
            if box != self.box:
                raise InputError(
                    path,
                    f"images are {box} px; the particle set says {self.box} px",
                    "re-extract the particles or fix _rlnImageSize",
                )
            if highest[s] >= n_images:
                bad = int(
                    np.count_nonzero(
                        (self.stack_id == s) & (self.stack_index >= n_images)
                    )
                )
                raise InputError(
                    path,
                    f"image index {highest[s] + 1} is out of range: the stack holds {n_images} "
                    f"images ({bad} particles refer beyond its end)",
                    "check _rlnImageName in the STAR file against the stack (re-extract?)",
                )

    def _stack(self, s: int) -> np.memmap:
        return self._cache.get(self.stack_paths[s])

    def release_pages(self) -> None:
        """Keep resident memory bounded while streaming: see ``_StackCache.release_pages``.

        Call after each batch of :meth:`load_images`; the images already returned
        are copies and stay valid.
        """
        self._cache.release_pages()

    def load_images(self, indices) -> np.ndarray:
        """Read particle images from the memory-mapped stacks.

        Parameters
        ----------
        indices : array_like of int, shape (m,)
            0-based particle numbers.

        Returns
        -------
        ndarray, shape (m, N, N), float32
            Images ``[i, y, x]`` in the order asked; only these images are read.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"particle indices must be in 0..{self.n - 1}")
        out = np.empty((idx.size, self.box, self.box), dtype=np.float32)
        sid = self.stack_id[idx]
        for s in np.unique(sid):
            sel = np.flatnonzero(sid == s)  # positions in the output
            rows = self.stack_index[idx[sel]]
            mm = self._stack(int(s))
            if mm.shape[1:] != (self.box, self.box):
                raise InputError(
                    self.stack_paths[s],
                    f"images are {mm.shape[1]} px; the particle set says {self.box} px",
                    "re-extract the particles or fix _rlnImageSize",
                )
            if rows.max() >= mm.shape[0]:
                raise InputError(
                    self.stack_paths[s],
                    f"image index {rows.max() + 1} is out of range: "
                    f"the stack holds {mm.shape[0]} images",
                    "check _rlnImageName in the STAR file against the stack",
                )
            order = np.argsort(rows, kind="stable")  # read in file order
            out[sel[order]] = mm[rows[order]]
        return out


# -- reading ---------------------------------------------------------------------
def _parse_image_names(names: list[str], star_path: Path, block: StarBlock):
    """``N@stack`` strings -> (stack paths, stack id per particle, 0-based index)."""
    star_dir = Path(os.path.abspath(star_path)).parent
    cwd = Path.cwd()
    ids: dict[str, int] = {}
    stack_id = np.empty(len(names), dtype=np.int64)
    stack_index = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        number, at, stack = name.partition("@")
        if not at:
            number, stack = "1", name
        try:
            k = int(number)
        except ValueError:
            k = 0
        if k < 1:
            raise InputError(
                star_path,
                f"data_{block.name} row {i + 1}: bad image name {name!r} "
                "(expected N@stack.mrcs, N >= 1)",
                "fix _rlnImageName",
            )
        stack_index[i] = k - 1
        stack_id[i] = ids.setdefault(stack, len(ids))
    paths = []
    for stack in ids:
        p = Path(stack)
        if not p.is_absolute():
            candidates = [cwd / p, star_dir / p]
            p = next((c for c in candidates if c.exists()), candidates[0])
        paths.append(Path(os.path.normpath(p)))
    return paths, stack_id, stack_index


def _single_value(
    values: np.ndarray, what: str, path: Path, rtol: float = 1e-4
) -> float:
    values = np.asarray(values, dtype=np.float64)
    if not np.allclose(values, values[0], rtol=rtol, atol=0):
        raise InputError(
            path,
            f"the particles have several {what}s: {sorted({float(v) for v in np.unique(values)})}",
            _SPLIT_FIX,
        )
    return float(values[0])


def _header_of_first_stack(paths: list[Path], star_path: Path) -> tuple[int, float]:
    first = paths[0]
    if not first.is_file():
        raise InputError(
            first,
            f"particle stack not found (referenced by {star_path}); it is needed for the box size",
            "run from the project directory the image names are relative to, or fix _rlnImageName",
        )
    _, box, pixel_size = stack_info(first)
    return box, pixel_size


def read_particles(path, *, pixel_size_a: float | None = None) -> Particles:
    """Read a RELION particle STAR file (3.0, 3.1, 4 or 5 format).

    Parameters
    ----------
    path : str or Path
        ``data_optics`` + ``data_particles`` (RELION 3.1+), or a single table
        with ``_rlnImageName`` (RELION 3.0).
    pixel_size_a : float, optional
        Pixel size in Angstrom, used when the STAR file does not give one
        (RELION 3.0 without ``rlnDetectorPixelSize``/``rlnMagnification``, or a
        3.1 optics table without ``rlnImagePixelSize``); the first stack's
        header is the last resort.

    Returns
    -------
    Particles

    Raises
    ------
    InputError
        Missing file or required columns, several box or pixel sizes, bad
        half-set numbers, no usable pixel size.
    """
    path = Path(path)
    doc = read_star(path)
    if "optics" in doc:
        return _read_relion31(doc, path, pixel_size_a)
    block = next((b for b in doc if b.is_loop and b.has_column("rlnImageName")), None)
    if block is None:
        raise InputError(
            path,
            "no particle table: no data_optics/data_particles blocks "
            "and no table with _rlnImageName",
            "give a RELION particle STAR file (e.g. run_data.star of a 3D refinement)",
        )
    return _read_relion30(doc, block, path, pixel_size_a)


def _poses(block: StarBlock, n: int):
    has = all(block.has_column(c) for c in _ANGLES)
    if not has:
        missing = [c for c in _ANGLES if block.has_column(c)]
        if missing:
            log.warning(
                "%s: only some angle columns present (%s); poses ignored",
                block.source,
                missing,
            )
        return False, [np.zeros(n)] * 3
    return True, [block.column_as_float(c) for c in _ANGLES]


def _half_sets(block: StarBlock, path: Path) -> np.ndarray:
    n = block.n_rows
    if block.has_column("rlnRandomSubset"):
        subset = block.column_as_int("rlnRandomSubset")
        bad = np.flatnonzero((subset != 1) & (subset != 2))
        if bad.size:
            raise InputError(
                path,
                f"_rlnRandomSubset must be 1 or 2; row {bad[0] + 1} has {subset[bad[0]]}",
                "fix the half-set assignment or remove the column",
            )
        return subset
    log.warning(
        "%s: no _rlnRandomSubset; half sets assigned by row (odd rows -> 1, even rows -> 2)",
        path,
    )
    return np.arange(n) % 2 + 1


def _ctf_from(block: StarBlock, voltage, cs, q0, path: Path) -> CtfParams | None:
    if not block.has_column("rlnDefocusU"):
        return None
    n = block.n_rows
    du = block.column_as_float("rlnDefocusU")

    def col(name, default):
        if block.has_column(name):
            return block.column_as_float(name)
        return np.array(np.broadcast_to(default, (n,)), dtype=np.float64)

    for what, value in (
        ("_rlnVoltage", voltage),
        ("_rlnSphericalAberration", cs),
        ("_rlnAmplitudeContrast", q0),
    ):
        if value is None:
            raise InputError(
                path,
                f"particles have _rlnDefocusU but no {what}",
                f"add {what} (optics table)",
            )
    return CtfParams(
        defocus_u_a=du,
        defocus_v_a=col("rlnDefocusV", du),  # V = U when absent
        defocus_angle_deg=col("rlnDefocusAngle", 0.0),
        voltage_kv=np.asarray(voltage, dtype=np.float64),
        cs_mm=np.asarray(cs, dtype=np.float64),
        amplitude_contrast=np.asarray(q0, dtype=np.float64),
        phase_shift_deg=col("rlnPhaseShift", 0.0),
        bfactor_a2=col("rlnCtfBFactor", 0.0),
        scale=col("rlnCtfScalefactor", 1.0),
    )


def _read_relion31(doc: StarDocument, path: Path, pixel_size_arg) -> Particles:
    optics = doc["optics"]
    block = doc["particles"]
    n = block.n_rows
    if not optics.is_loop or optics.n_rows == 0:
        raise InputError(
            path,
            "data_optics has no optics groups",
            "give a complete RELION 3.1+ STAR file",
        )
    names = block.column("rlnImageName")
    group_ids = optics.column_as_int("rlnOpticsGroup")
    if block.has_column("rlnOpticsGroup") or optics.n_rows > 1:
        group = block.column_as_int("rlnOpticsGroup")  # InputError when absent
    else:
        group = np.full(n, group_ids[0], dtype=np.int64)
    row_of_group = {int(g): i for i, g in enumerate(group_ids)}
    unknown = sorted(set(np.unique(group).tolist()) - set(row_of_group))
    if unknown:
        raise InputError(
            path,
            f"particles refer to optics groups {unknown} missing from data_optics",
            "fix _rlnOpticsGroup",
        )
    row = np.array([row_of_group[int(g)] for g in group], dtype=np.int64)  # (n,)
    stack_paths, stack_id, stack_index = _parse_image_names(names, path, block)

    header = None
    if optics.has_column("rlnImagePixelSize"):
        pixel_size = _single_value(
            optics.column_as_float("rlnImagePixelSize")[np.unique(row)],
            "pixel size",
            path,
        )
    elif pixel_size_arg is not None:
        pixel_size = float(pixel_size_arg)
    else:
        header = _header_of_first_stack(stack_paths, path)
        pixel_size = header[1]
    if pixel_size_arg is not None and not np.isclose(
        pixel_size, pixel_size_arg, rtol=1e-4
    ):
        log.warning(
            "%s: pixel size %g A from the STAR file, not %g A as given",
            path,
            pixel_size,
            pixel_size_arg,
        )
    if optics.has_column("rlnImageSize"):
        box = int(
            _single_value(
                optics.column_as_int("rlnImageSize")[np.unique(row)], "box size", path
            )
        )
    else:
        box = (header or _header_of_first_stack(stack_paths, path))[0]
    _check_pixel_size(pixel_size, path)

    def optics_col(name):
        return optics.column_as_float(name)[row] if optics.has_column(name) else None

    voltage, cs, q0 = (
        optics_col(c)
        for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
    )
    has_poses, (rot, tilt, psi) = _poses(block, n)
    origin = np.zeros((n, 2))
    for axis, name in enumerate(("rlnOriginXAngst", "rlnOriginYAngst")):
        if block.has_column(name):
            origin[:, axis] = block.column_as_float(name) / pixel_size
    return Particles(
        rot_deg=rot,
        tilt_deg=tilt,
        psi_deg=psi,
        origin_px=origin,
        ctf=_ctf_from(block, voltage, cs, q0, path),
        optics_group=group,
        random_subset=_half_sets(block, path),
        stack_paths=stack_paths,
        stack_id=stack_id,
        stack_index=stack_index,
        box=box,
        pixel_size_a=pixel_size,
        has_poses=has_poses,
        optics=optics,
        block=block,
        layout=[
            "optics" if b is optics else "particles" if b is block else b for b in doc
        ],
        star_path=path,
    )


def _check_pixel_size(pixel_size: float, path: Path) -> None:
    if not (np.isfinite(pixel_size) and pixel_size > 0):
        raise InputError(
            path,
            f"no usable pixel size ({pixel_size:g} A)",
            "pass the pixel size (pixel_size_a= / --angpix) or fix the stack header",
        )


def _read_relion30(
    doc: StarDocument, block: StarBlock, path: Path, pixel_size_arg
) -> Particles:
    n = block.n_rows
    names = block.column("rlnImageName")
    stack_paths, stack_id, stack_index = _parse_image_names(names, path, block)
    box, header_pixel_size = _header_of_first_stack(stack_paths, path)
    if block.has_column("rlnDetectorPixelSize") and block.has_column(
        "rlnMagnification"
    ):
        per_particle = (
            block.column_as_float("rlnDetectorPixelSize")
            * 1e4
            / block.column_as_float("rlnMagnification")
        )
        pixel_size = _single_value(per_particle, "pixel size", path)
    elif block.has_column("rlnImagePixelSize"):
        pixel_size = _single_value(
            block.column_as_float("rlnImagePixelSize"), "pixel size", path
        )
    elif pixel_size_arg is not None:
        pixel_size = float(pixel_size_arg)
    else:
        pixel_size = header_pixel_size
        log.info(
            "%s: pixel size %g A taken from the header of %s",
            path,
            pixel_size,
            stack_paths[0],
        )
    _check_pixel_size(pixel_size, path)

    def col(name):
        return block.column_as_float(name) if block.has_column(name) else None

    voltage, cs, q0 = (
        col(c) for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
    )
    # optics groups: one per distinct (voltage, Cs, Q0), in order of first appearance
    keys = np.stack(
        [np.full(n, -1.0) if v is None else v for v in (voltage, cs, q0)], axis=1
    )  # (n, 3)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # group number by first appearance
    group = rank[inverse.reshape(-1)] + 1
    n_groups = len(first)
    reps = np.sort(first)
    optics_cols: dict[str, list[str]] = {
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, n_groups + 1)],
        "rlnOpticsGroup": [str(g) for g in range(1, n_groups + 1)],
    }
    for name in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        if block.has_column(name):
            values = block.column(name)
            optics_cols[name] = [values[i] for i in reps]
    optics = StarBlock("optics", columns=optics_cols, source=path)
    optics.set_column("rlnImagePixelSize", np.full(n_groups, pixel_size))
    optics.set_column("rlnImageSize", np.full(n_groups, box, dtype=np.int64))
    optics.set_column("rlnImageDimensionality", np.full(n_groups, 2, dtype=np.int64))
    has_poses, (rot, tilt, psi) = _poses(block, n)
    origin = np.zeros((n, 2))
    for axis, name in enumerate(("rlnOriginX", "rlnOriginY")):
        if block.has_column(name):
            origin[:, axis] = block.column_as_float(name)
    return Particles(
        rot_deg=rot,
        tilt_deg=tilt,
        psi_deg=psi,
        origin_px=origin,
        ctf=_ctf_from(block, voltage, cs, q0, path),
        optics_group=group,
        random_subset=_half_sets(block, path),
        stack_paths=stack_paths,
        stack_id=stack_id,
        stack_index=stack_index,
        box=box,
        pixel_size_a=pixel_size,
        has_poses=has_poses,
        optics=optics,
        block=block,
        layout=["optics", "particles"] + [b for b in doc if b is not block],
        star_path=path,
        from_relion30=True,
    )


# -- building and writing ----------------------------------------------------------
def make_particles(
    *,
    image_refs: Sequence[tuple[str | Path, int]],
    rot_deg,
    tilt_deg,
    psi_deg,
    origin_px,
    ctf: CtfParams | None,
    pixel_size_a: float,
    box: int,
    random_subset,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
) -> Particles:
    """A new particle set (one optics group) from arrays, e.g. for simulated data.

    Parameters
    ----------
    image_refs : sequence of (stack path, 0-based index), length n
        Written by :func:`write_particles` as ``index+1@stack`` relative to
        the STAR file's folder (RELION resolves names against its working
        directory: run RELION programs from that folder).
    rot_deg, tilt_deg, psi_deg : array_like, shape (n,)
        RELION ZYZ Euler angles in degrees.
    origin_px : array_like, shape (n, 2)
        Origins ``(x, y)`` in pixels.
    ctf : CtfParams or None
        Per-particle defocus (Angstrom), angle (degrees), and optional phase
        shift, B-factor, scale; its voltage/Cs/Q0 are replaced by the
        arguments below.
    pixel_size_a : float
        Pixel size in Angstrom.
    box : int
        Image size in pixels.
    random_subset : array_like of int (1 or 2), shape (n,)
    voltage_kv, cs_mm, amplitude_contrast : float
        The optics group's voltage (kV), spherical aberration (mm) and
        amplitude contrast (fraction).
    """
    n = len(image_refs)
    ids: dict[Path, int] = {}
    stack_id = np.empty(n, dtype=np.int64)
    stack_index = np.empty(n, dtype=np.int64)
    for i, (stack, index) in enumerate(image_refs):
        stack_id[i] = ids.setdefault(Path(stack).absolute(), len(ids))
        stack_index[i] = int(index)
    if n and stack_index.min() < 0:
        raise ValueError("image indices are 0-based and must be >= 0")
    if ctf is not None:
        full = np.broadcast_arrays(
            *(
                np.asarray(getattr(ctf, f), dtype=np.float64)
                for f in (
                    "defocus_u_a",
                    "defocus_v_a",
                    "defocus_angle_deg",
                    "phase_shift_deg",
                    "bfactor_a2",
                    "scale",
                )
            ),
            np.zeros(n),
        )
        ctf = CtfParams(
            defocus_u_a=full[0].copy(),
            defocus_v_a=full[1].copy(),
            defocus_angle_deg=full[2].copy(),
            voltage_kv=np.full(n, float(voltage_kv)),
            cs_mm=np.full(n, float(cs_mm)),
            amplitude_contrast=np.full(n, float(amplitude_contrast)),
            phase_shift_deg=full[3].copy(),
            bfactor_a2=full[4].copy(),
            scale=full[5].copy(),
        )
    subset = np.asarray(random_subset, dtype=np.int64)
    if np.any((subset != 1) & (subset != 2)):
        raise ValueError("random_subset values must be 1 or 2")
    optics = StarBlock(
        "optics",
        columns={"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": ["1"]},
    )
    optics.set_column("rlnVoltage", [float(voltage_kv)])
    optics.set_column("rlnSphericalAberration", [float(cs_mm)])
    optics.set_column("rlnAmplitudeContrast", [float(amplitude_contrast)])
    optics.set_column("rlnImagePixelSize", [float(pixel_size_a)])
    optics.set_column("rlnImageSize", np.array([box], dtype=np.int64))
    optics.set_column("rlnImageDimensionality", np.array([2], dtype=np.int64))
    return Particles(
        rot_deg=rot_deg,
        tilt_deg=tilt_deg,
        psi_deg=psi_deg,
        origin_px=origin_px,
        ctf=ctf,
        optics_group=np.ones(n, dtype=np.int64),
        random_subset=subset,
        stack_paths=list(ids),
        stack_id=stack_id,
        stack_index=stack_index,
        box=box,
        pixel_size_a=pixel_size_a,
        has_poses=True,
        optics=optics,
        block=StarBlock("particles", columns={}, n_rows=n),
        layout=["optics", "particles"],
        names_from_refs=True,
    )


def _put(block: StarBlock, name: str, values: np.ndarray, fmt: str = "{:.6f}") -> None:
    """Set a column unless it already holds these values (then its text is kept)."""
    values = np.asarray(values)
    if block.has_column(name):
        if values.dtype.kind in "iu":
            same = np.array_equal(block.column_as_int(name), values)
        else:
            old = block.column_as_float(name)
            same = np.allclose(old, values, rtol=1e-12, atol=1e-9)
        if same:
            return
    block.set_column(name, values, fmt=fmt)


def write_particles(path, particles: Particles) -> None:
    """Write a particle set as a RELION 3.1 STAR file, atomically.

    The ``data_optics`` table and ``data_particles`` table are written with
    the current poses (``rlnAngleRot/Tilt/Psi``), origins in Angstrom
    (``rlnOriginXAngst/YAngst``), optics groups, CTF and ``rlnRandomSubset``;
    every other column and block of the input is kept, in the same particle
    order. RELION 3.0 pixel origins (``rlnOriginX/Y``) and per-particle optics
    columns are dropped (they move to the optics table).

    Parameters
    ----------
    path : str or Path
        Destination STAR file.
    particles : Particles
    """
    path = Path(path)
    p = particles
    block = p._block.copy()
    block.name = "particles"
    for name in ("rlnOriginX", "rlnOriginY") + (_OPTICS_30 if p._from_relion30 else ()):
        block.remove_column(name)
    if p._names_from_refs:
        folder = path.parent.absolute()
        rel = [os.path.relpath(s, folder) for s in p.stack_paths]
        block.set_column(
            "rlnImageName",
            [
                f"{i + 1:06d}@{rel[s]}"
                for s, i in zip(p.stack_id, p.stack_index, strict=True)
            ],
        )
    _put(block, "rlnOpticsGroup", p.optics_group)
    if p.has_poses:
        for name, values in zip(
            _ANGLES, (p.rot_deg, p.tilt_deg, p.psi_deg), strict=True
        ):
            _put(block, name, values)
        _put(block, "rlnOriginXAngst", p.origin_px[:, 0] * p.pixel_size_a)
        _put(block, "rlnOriginYAngst", p.origin_px[:, 1] * p.pixel_size_a)
    _put(block, "rlnRandomSubset", p.random_subset)
    if p.ctf is not None:
        c = p.ctf
        for name, values, default in (
            ("rlnDefocusU", c.defocus_u_a, None),
            ("rlnDefocusV", c.defocus_v_a, None),
            ("rlnDefocusAngle", c.defocus_angle_deg, None),
            ("rlnPhaseShift", c.phase_shift_deg, 0.0),
            ("rlnCtfBFactor", c.bfactor_a2, 0.0),
            ("rlnCtfScalefactor", c.scale, 1.0),
        ):
            values = np.broadcast_to(np.asarray(values, dtype=np.float64), (p.n,))
            if default is None or block.has_column(name) or np.any(values != default):
                _put(block, name, values)
    optics = p._optics.copy()
    optics.name = "optics"
    groups = optics.n_rows
    _put(optics, "rlnImagePixelSize", np.full(groups, p.pixel_size_a))
    _put(optics, "rlnImageSize", np.full(groups, p.box, dtype=np.int64))
    if not optics.has_column("rlnImageDimensionality"):
        optics.set_column("rlnImageDimensionality", np.full(groups, 2, dtype=np.int64))
    blocks = [
        b if not isinstance(b, str) else optics if b == "optics" else block
        for b in p._layout
    ]
    write_star(path, StarDocument(blocks))
