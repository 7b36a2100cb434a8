"""Scipion particle sets <-> RELION 3.1 STAR files (what ``localrefine`` reads and writes).

Pose convention
---------------
RELION stores a projection pose as ZYZ Euler angles ``(rot, tilt, psi)`` in
degrees and an origin ``(rlnOriginXAngst, rlnOriginYAngst)`` (docs/conventions.md).
Scipion stores a 4x4 ``Transform`` matrix for ``ALIGN_PROJ`` sets. The two are
linked as in Scipion's RELION and Xmipp plugins (facts, not their code):

* RELION -> Scipion: ``M = euler_matrix(-rot, -tilt, -psi, 'szyz')`` (radians,
  :mod:`pwem.convert.transformations`), translation column ``-origin_px``, and
  the stored matrix is ``inv(M)``;
* Scipion -> RELION: invert the stored matrix, ``origin_px = -translation``,
  angles ``= -euler_from_matrix(M, 'szyz')`` in degrees.

The rotation block of ``M`` is RELION's ``Euler_angles2matrix(rot, tilt, psi)``
(:func:`localrefine_plugin.engine.geometry.euler_to_matrix`); tests/test_convert.py
pins that. ``Transform.getShifts()`` / ``getEulerAngles()`` are **not** used: they
give the wrong axes and signs for projection alignments.

Half sets travel as the particle attribute ``_rlnRandomSubset`` (1 or 2).
Image stacks must be MRC (``.mrc``/``.mrcs``); they are linked, not copied,
beside the STAR file that names them (``index@stack.mrcs``, 1-based index).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .constants import RANDOM_SUBSET_ATTR
from .engine.errors import InputError
from .engine.star import StarBlock, StarDocument, format_values, read_star, write_star

__all__ = [
    "matrix_from_relion",
    "relion_from_matrix",
    "write_particles_star",
    "read_particles_star_poses",
    "update_particles_from_star",
    "particles_from_star",
    "StarParticles",
    "MRC_EXTENSIONS",
    "is_mrc_file",
    "link_mrc",
]

log = logging.getLogger(__name__)

#: File name endings the engine reads as MRC.
MRC_EXTENSIONS = (".mrc", ".mrcs", ".map", ".st")


# ------------------------------------------------------------------- poses ----
def matrix_from_relion(
    rot_deg: float,
    tilt_deg: float,
    psi_deg: float,
    origin_x_px: float,
    origin_y_px: float,
) -> np.ndarray:
    """The Scipion ``ALIGN_PROJ`` transform matrix of a RELION pose.

    Parameters
    ----------
    rot_deg, tilt_deg, psi_deg : float
        RELION ZYZ Euler angles in degrees.
    origin_x_px, origin_y_px : float
        RELION origin in pixels (``rlnOriginXAngst / pixel size``).

    Returns
    -------
    ndarray, shape (4, 4), float64
        The matrix to store with ``Transform.setMatrix``.
    """
    from pwem.convert.transformations import euler_matrix

    m = euler_matrix(*np.deg2rad([-rot_deg, -tilt_deg, -psi_deg]), axes="szyz")
    m[:3, 3] = [-origin_x_px, -origin_y_px, 0.0]
    return np.linalg.inv(m)


def relion_from_matrix(matrix: np.ndarray) -> tuple[float, float, float, float, float]:
    """The RELION pose of a Scipion ``ALIGN_PROJ`` transform matrix.

    Parameters
    ----------
    matrix : ndarray, shape (4, 4)
        ``Transform.getMatrix()`` of a particle with projection alignment.

    Returns
    -------
    rot_deg, tilt_deg, psi_deg, origin_x_px, origin_y_px : float
        RELION ZYZ Euler angles (degrees) and origin (pixels).
    """
    from pwem.convert.transformations import euler_from_matrix

    m = np.linalg.inv(np.asarray(matrix, dtype=np.float64))
    rot, tilt, psi = (-np.rad2deg(a) for a in euler_from_matrix(m, axes="szyz"))
    return float(rot), float(tilt), float(psi), float(-m[0, 3]), float(-m[1, 3])


# -------------------------------------------------------------- image files --
def is_mrc_file(path) -> bool:
    """True if ``path`` ends like an MRC map or stack (``.mrc``, ``.mrcs`` ...)."""
    return str(path).lower().endswith(MRC_EXTENSIONS)


def link_mrc(source, folder, *, name: str | None = None) -> Path:
    """Link ``source`` into ``folder`` (relative symbolic link; copy if links fail).

    Stacks get the ``.mrcs`` ending RELION expects; returns the new path.
    """
    source = Path(source).resolve()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or source.name)
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        os.symlink(os.path.relpath(source, folder.resolve()), target)
    except OSError:
        import shutil

        shutil.copyfile(source, target)
    return target


def _stack_name(filename: str) -> str:
    """A link name for a stack: the file name with the ``.mrcs`` ending."""
    base = Path(filename).name
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return f"{stem}.mrcs"


# --------------------------------------------------------- Scipion -> STAR --
def write_particles_star(particles, star_path, *, link_stacks: bool = True) -> int:
    """Write a Scipion ``SetOfParticles`` as a RELION 3.1 particle STAR file.

    Parameters
    ----------
    particles : pwem.objects.SetOfParticles
        With projection alignment (``hasAlignmentProj()``), an acquisition and,
        usually, CTF. Iterated in id order; that order is the STAR row order.
    star_path : str or Path
        Output STAR. Stacks are linked into its folder (``link_stacks``) and
        named relative to it.
    link_stacks : bool
        Link each stack beside the STAR (default); otherwise write absolute paths.

    Returns
    -------
    int
        Number of particles written.

    Raises
    ------
    InputError
        Particles without projection alignment, or stacks that are not MRC.
    """
    star_path = Path(star_path)
    folder = star_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not particles.hasAlignmentProj():
        raise InputError(
            particles.getFileName(),
            "the particles have no projection alignment (3D poses)",
            "use particles from a 3D refinement (consensus poses)",
        )
    pixel_size = float(particles.getSamplingRate())
    acq = particles.getAcquisition()
    box = 0

    links: dict[str, str] = {}
    cols: dict[str, list] = {k: [] for k in _PARTICLE_COLUMNS}
    has_ctf = bool(particles.hasCTF())
    subsets: list[int] = []
    for part in particles.iterItems(orderBy="id", direction="ASC"):
        index, filename = part.getLocation()
        if not is_mrc_file(filename):
            raise InputError(
                filename,
                "particle stacks must be MRC (.mrc/.mrcs) for localrefine",
                "convert the particles to MRC first (e.g. a Scipion 'convert' step)",
            )
        if filename not in links:
            box = _check_stack(filename, box)
            if link_stacks:
                link = link_mrc(filename, folder, name=_unique_name(filename, links))
                links[filename] = link.name
            else:
                links[filename] = str(Path(filename).resolve())
        rot, tilt, psi, ox, oy = relion_from_matrix(part.getTransform().getMatrix())
        cols["rlnImageName"].append(f"{int(index) or 1:06d}@{links[filename]}")
        cols["rlnAngleRot"].append(rot)
        cols["rlnAngleTilt"].append(tilt)
        cols["rlnAnglePsi"].append(psi)
        cols["rlnOriginXAngst"].append(ox * pixel_size)
        cols["rlnOriginYAngst"].append(oy * pixel_size)
        if has_ctf:
            ctf = part.getCTF()
            cols["rlnDefocusU"].append(float(ctf.getDefocusU()))
            cols["rlnDefocusV"].append(float(ctf.getDefocusV()))
            cols["rlnDefocusAngle"].append(float(ctf.getDefocusAngle()))
            cols["rlnPhaseShift"].append(float(ctf.getPhaseShift() or 0.0))
        cols["rlnOpticsGroup"].append(1)
        subset = getattr(part, RANDOM_SUBSET_ATTR, None)
        subsets.append(0 if subset is None else int(subset.get() or 0))

    n = len(cols["rlnImageName"])
    if not has_ctf:
        for k in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift"):
            del cols[k]
    particles_block = StarBlock(
        "particles", columns={k: format_values(v) for k, v in cols.items()}, n_rows=n
    )
    if n and all(s in (1, 2) for s in subsets):
        particles_block.set_column(
            "rlnRandomSubset", np.asarray(subsets, dtype=np.int64)
        )
    elif any(subsets):
        log.warning(
            "%d of %d particles lack %s; localrefine assigns half sets to all of them",
            sum(s not in (1, 2) for s in subsets),
            n,
            RANDOM_SUBSET_ATTR,
        )
    optics = StarBlock(
        "optics",
        columns={
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": ["1"],
            "rlnVoltage": [f"{float(acq.getVoltage()):.6f}"],
            "rlnSphericalAberration": [f"{float(acq.getSphericalAberration()):.6f}"],
            "rlnAmplitudeContrast": [f"{float(acq.getAmplitudeContrast()):.6f}"],
            "rlnImagePixelSize": [f"{pixel_size:.6f}"],
            "rlnImageSize": [str(box)],
            "rlnImageDimensionality": ["2"],
        },
    )
    write_star(star_path, StarDocument([optics, particles_block]))
    log.info("wrote %d particles to %s", n, star_path)
    return n


_PARTICLE_COLUMNS = (
    "rlnImageName",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnOpticsGroup",
)


def _check_stack(filename: str, box: int) -> int:
    """Box of an MRC stack from its header; all stacks must share one box."""
    from .engine.mrc_io import stack_info

    _, n_box, _ = stack_info(filename)
    if box and n_box != box:
        raise InputError(
            filename,
            f"box {n_box} px differs from the other stacks' {box} px",
            "use particles of one box size",
        )
    return int(n_box)


def _unique_name(filename: str, links: dict[str, str]) -> str:
    name = _stack_name(filename)
    taken = set(links.values())
    i = 1
    while name in taken:
        name = f"{Path(_stack_name(filename)).stem}_{i}.mrcs"
        i += 1
    return name


# --------------------------------------------------------- STAR -> Scipion --
class StarParticles:
    """Per-particle values read from a RELION 3.1 particle STAR (arrays of length n).

    Attributes
    ----------
    rot_deg, tilt_deg, psi_deg : ndarray
        ZYZ Euler angles in degrees.
    origin_px : ndarray, shape (n, 2)
        Origins (x, y) in pixels.
    random_subset : ndarray of int or None
        ``rlnRandomSubset`` when present.
    image_index : ndarray of int
        1-based index into the stack.
    image_path : list of str
        Stack paths, resolved against the STAR file's folder.
    pixel_size_a, box : float, int
        From the optics table.
    defocus_u_a, defocus_v_a, defocus_angle_deg, phase_shift_deg : ndarray or None
        CTF values when present.
    voltage_kv, cs_mm, amplitude_contrast : float
        Optics group 1.
    """

    def __init__(self, path) -> None:
        path = Path(path)
        doc = read_star(path)
        if "particles" not in doc or "optics" not in doc:
            raise InputError(
                path,
                "not a RELION 3.1 particle STAR (needs data_optics and data_particles)",
                "write it with RELION 3.1 or later",
            )
        optics, block = doc["optics"], doc["particles"]
        for name in ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
            if not block.has_column(name):
                raise InputError(
                    path, f"column _{name} is missing", "add poses to the STAR"
                )
        self.path = path
        self.n = block.n_rows
        self.pixel_size_a = float(optics.column_as_float("rlnImagePixelSize")[0])
        self.box = int(optics.column_as_float("rlnImageSize")[0])
        self.voltage_kv = _first(optics, "rlnVoltage", 300.0)
        self.cs_mm = _first(optics, "rlnSphericalAberration", 2.7)
        self.amplitude_contrast = _first(optics, "rlnAmplitudeContrast", 0.1)
        self.rot_deg = block.column_as_float("rlnAngleRot")
        self.tilt_deg = block.column_as_float("rlnAngleTilt")
        self.psi_deg = block.column_as_float("rlnAnglePsi")
        ox = _column(block, "rlnOriginXAngst", self.n) / self.pixel_size_a
        oy = _column(block, "rlnOriginYAngst", self.n) / self.pixel_size_a
        self.origin_px = np.stack([ox, oy], axis=1)
        self.random_subset = (
            block.column_as_int("rlnRandomSubset")
            if block.has_column("rlnRandomSubset")
            else None
        )
        has_ctf = block.has_column("rlnDefocusU")
        self.defocus_u_a = block.column_as_float("rlnDefocusU") if has_ctf else None
        self.defocus_v_a = _column(block, "rlnDefocusV", self.n) if has_ctf else None
        self.defocus_angle_deg = (
            _column(block, "rlnDefocusAngle", self.n) if has_ctf else None
        )
        self.phase_shift_deg = (
            _column(block, "rlnPhaseShift", self.n) if has_ctf else None
        )
        self.image_index = np.empty(self.n, dtype=np.int64)
        self.image_path: list[str] = []
        for i, name in enumerate(block.column("rlnImageName")):
            idx, _, stack = name.partition("@")
            if not stack:
                idx, stack = "1", idx
            self.image_index[i] = int(idx)
            p = Path(stack)
            self.image_path.append(str(p if p.is_absolute() else path.parent / p))


def _first(block: StarBlock, name: str, default: float) -> float:
    return float(block.column_as_float(name)[0]) if block.has_column(name) else default


def _column(block: StarBlock, name: str, n: int) -> np.ndarray:
    return block.column_as_float(name) if block.has_column(name) else np.zeros(n)


def read_particles_star_poses(path) -> StarParticles:
    """Read poses, origins (px), half sets, CTF and image names of a particle STAR."""
    return StarParticles(path)


def update_particles_from_star(
    input_particles,
    output_particles,
    star_path,
    *,
    keep_images: bool = False,
) -> int:
    """Fill ``output_particles`` with ``input_particles`` carrying the STAR's values.

    The STAR (``localrefine`` output) lists the same particles in the same order
    as ``input_particles`` iterated by id (what :func:`write_particles_star` wrote).
    Each output particle is a copy of its input particle (CTF, acquisition and
    every extra attribute kept) with the STAR's pose as its ``ALIGN_PROJ``
    transform, the STAR's ``rlnRandomSubset`` as ``_rlnRandomSubset`` and,
    unless ``keep_images``, the STAR's image (subtracted or re-boxed stacks).
    The CTF is the input's, unchanged.

    Returns
    -------
    int
        Number of particles written.

    Raises
    ------
    InputError
        The STAR and the input set have different numbers of particles.
    """
    import pwem.objects as emobj
    from pyworkflow.object import Integer

    star = StarParticles(star_path)
    n_in = input_particles.getSize()
    if star.n != n_in:
        raise InputError(
            star_path,
            f"{star.n} particles in the STAR, {n_in} in the input set",
            "the STAR must list the input particles in the same order",
        )
    output_particles.copyInfo(input_particles)
    output_particles.setAlignmentProj()
    if not math.isclose(
        star.pixel_size_a, input_particles.getSamplingRate(), rel_tol=1e-4
    ):
        output_particles.setSamplingRate(star.pixel_size_a)
    for i, part in enumerate(_iter_copies(input_particles)):
        matrix = matrix_from_relion(
            star.rot_deg[i],
            star.tilt_deg[i],
            star.psi_deg[i],
            star.origin_px[i, 0],
            star.origin_px[i, 1],
        )
        transform = emobj.Transform()
        transform.setMatrix(matrix)
        part.setTransform(transform)
        if star.random_subset is not None:
            setattr(part, RANDOM_SUBSET_ATTR, Integer(int(star.random_subset[i])))
        if not keep_images:
            part.setLocation(int(star.image_index[i]), star.image_path[i])
        output_particles.append(part)
    return star.n


def particles_from_star(star_path, output_particles) -> int:
    """Fill an empty ``SetOfParticles`` from a RELION 3.1 particle STAR (an import).

    Poses become ``ALIGN_PROJ`` transforms, CTF values ``CTFModel``s (when
    present), the optics group the acquisition, ``rlnRandomSubset`` the
    ``_rlnRandomSubset`` attribute. Returns the number of particles.
    """
    import pwem.objects as emobj
    from pyworkflow.object import Integer

    star = StarParticles(star_path)
    acq = emobj.Acquisition()
    acq.setVoltage(star.voltage_kv)
    acq.setSphericalAberration(star.cs_mm)
    acq.setAmplitudeContrast(star.amplitude_contrast)
    acq.setMagnification(10000.0)
    output_particles.setAcquisition(acq)
    output_particles.setSamplingRate(star.pixel_size_a)
    output_particles.setAlignmentProj()
    output_particles.setHasCTF(star.defocus_u_a is not None)
    for i in range(star.n):
        part = emobj.Particle()
        part.setLocation(int(star.image_index[i]), star.image_path[i])
        part.setAcquisition(acq.clone())
        transform = emobj.Transform()
        transform.setMatrix(
            matrix_from_relion(
                star.rot_deg[i],
                star.tilt_deg[i],
                star.psi_deg[i],
                star.origin_px[i, 0],
                star.origin_px[i, 1],
            )
        )
        part.setTransform(transform)
        if star.defocus_u_a is not None:
            ctf = emobj.CTFModel()
            ctf.setDefocusU(float(star.defocus_u_a[i]))
            ctf.setDefocusV(float(star.defocus_v_a[i]))
            ctf.setDefocusAngle(float(star.defocus_angle_deg[i]))
            ctf.setPhaseShift(float(star.phase_shift_deg[i]))
            part.setCTF(ctf)
        if star.random_subset is not None:
            setattr(part, RANDOM_SUBSET_ATTR, Integer(int(star.random_subset[i])))
        output_particles.append(part)
    return star.n


def _iter_copies(particles) -> Iterable:
    for part in particles.iterItems(orderBy="id", direction="ASC"):
        yield part.clone()
