"""Ground-truth atomic models and their density maps.

Two sources of models, both returned as :class:`AtomModel` (coordinates in
Angstrom, one element and one "body"/"region" label per atom):

* :func:`builtin_model` builds a deterministic pseudo-atomic complex with no
  download: a ~250 kDa body of four domains and a ~50 kDa region domain hanging
  on a short hinge, made of pseudo-residues along alpha-helix and beta-strand
  paths packed near protein density, so its maps have real high-resolution
  texture (helix pitch, strand spacing, side-chain bumps).
* :func:`pdb_model` reads a PDB/mmCIF file with gemmi and marks a region by a
  chain/residue selection such as ``"L,H:1-230"``.

:func:`model_to_map` turns a model (or the body or region alone) into a map with
gemmi's electron-scattering density calculator.

Conventions (``docs/conventions.md``): maps are float32 ``[z, y, x]`` with the
centre at voxel ``N // 2``; model coordinates are ``(x, y, z)`` in Angstrom. A
model point ``center_a`` lands on the map centre, so the model point ``p``
lands at map coordinates ``(p - center_a) / pixel_size_a`` pixels from it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from .errors import InputError
from .fourier import fourier_to_volume, volume_to_fourier

__all__ = [
    "AtomModel",
    "builtin_model",
    "pdb_model",
    "parse_region",
    "model_to_map",
    "DEFAULT_BFACTOR_A2",
]

log = logging.getLogger(__name__)

#: B-factor (Angstrom^2) given to every atom by :func:`model_to_map` by default.
DEFAULT_BFACTOR_A2 = 30.0


@cache
def _element_mass_da(symbol: str) -> float:
    import gemmi

    return float(gemmi.Element(symbol).weight)


@dataclass(frozen=True)
class AtomModel:
    """An atomic model with a moving region.

    Attributes
    ----------
    xyz_a : ndarray, shape (n, 3), float64
        Atom coordinates ``(x, y, z)`` in Angstrom.
    element : ndarray, shape (n,), str
        Element symbols (``"C"``, ``"N"``, ``"O"``, ``"S"``, ...).
    in_region : ndarray, shape (n,), bool
        True for atoms of the moving region, False for the body.
    name : str
        A label for logs and ``truth.json``.
    """

    xyz_a: np.ndarray
    element: np.ndarray
    in_region: np.ndarray
    name: str = "model"
    _mass: np.ndarray = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        xyz = np.asarray(self.xyz_a, dtype=np.float64)
        element = np.asarray(self.element, dtype=str)
        in_region = np.asarray(self.in_region, dtype=bool)
        if xyz.ndim != 2 or xyz.shape[1] != 3:
            raise ValueError(f"xyz_a has shape {xyz.shape}; expected (n, 3)")
        if element.shape != (len(xyz),) or in_region.shape != (len(xyz),):
            raise ValueError(
                f"element {element.shape} and in_region {in_region.shape} must "
                f"both have shape ({len(xyz)},)"
            )
        lookup = {s: _element_mass_da(s) for s in np.unique(element)}
        mass = np.array([lookup[s] for s in element], dtype=np.float64)
        for name, value in (
            ("xyz_a", xyz),
            ("element", element),
            ("in_region", in_region),
            ("_mass", mass),
        ):
            value.flags.writeable = False
            object.__setattr__(self, name, value)

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return len(self.xyz_a)

    @property
    def mass_da(self) -> np.ndarray:
        """Atomic masses in Dalton, shape (n,) (no hydrogens unless the model has them)."""
        return self._mass

    @property
    def labels(self) -> np.ndarray:
        """``"body"`` or ``"region"`` per atom, shape (n,)."""
        return np.where(self.in_region, "region", "body")

    def select(self, atoms="all") -> np.ndarray:
        """Boolean atom selection from ``"all"``, ``"body"``, ``"region"`` or a mask (n,)."""
        if isinstance(atoms, str):
            if atoms == "all":
                return np.ones(self.n_atoms, dtype=bool)
            if atoms == "body":
                return ~self.in_region
            if atoms == "region":
                return self.in_region.copy()
            raise ValueError(f"atoms={atoms!r}; expected 'all', 'body' or 'region'")
        sel = np.asarray(atoms, dtype=bool)
        if sel.shape != (self.n_atoms,):
            raise ValueError(
                f"atom mask has shape {sel.shape}; expected ({self.n_atoms},)"
            )
        return sel

    def mass_kda(self, atoms="all") -> float:
        """Total mass in kDa of the selected atoms (see :meth:`select`)."""
        return float(self._mass[self.select(atoms)].sum() / 1e3)

    def center_of_mass_a(self, atoms="all") -> np.ndarray:
        """Centre of mass ``(x, y, z)`` in Angstrom of the selected atoms."""
        sel = self.select(atoms)
        if not sel.any():
            raise ValueError("the selection holds no atoms")
        w = self._mass[sel]
        return (self.xyz_a[sel] * w[:, None]).sum(0) / w.sum()

    def moved(self, rotation, *, center_a, shift_a=(0.0, 0.0, 0.0), atoms="region"):
        """A copy with the selected atoms moved rigidly: ``p -> R (p - c) + c + d``.

        Parameters
        ----------
        rotation : ndarray, shape (3, 3)
            Active rotation ``R`` acting on ``(x, y, z)`` column vectors.
        center_a : ndarray, shape (3,)
            Centre ``c`` of the rotation, Angstrom.
        shift_a : ndarray, shape (3,)
            Translation ``d`` in Angstrom.
        atoms : str or ndarray
            Which atoms move (default the region).
        """
        sel = self.select(atoms)
        c = np.asarray(center_a, dtype=np.float64)
        xyz = self.xyz_a.copy()
        xyz[sel] = (
            (xyz[sel] - c) @ np.asarray(rotation, dtype=np.float64).T + c + shift_a
        )
        return AtomModel(xyz, self.element, self.in_region, name=self.name)


# --------------------------------------------------------------------------- builtin

#: Pseudo-residue geometry (Angstrom, degrees): alpha helix and beta strand.
_HELIX_RISE_A, _HELIX_RADIUS_A, _HELIX_TURN_DEG = 1.5, 2.3, 100.0
_STRAND_RISE_A, _STRAND_PLEAT_A = 3.3, 0.9
_LAYER_SPACING_A, _HELIX_SPACING_A, _STRAND_SPACING_A = 10.0, 10.0, 4.8
_SIDECHAIN_ELEMENTS = np.array(["C", "C", "C", "N", "O", "C", "S"])

#: The builtin complex: (centre, semi-axes, Euler-like frame angles, fold, region?).
#: Four body domains (~60 kDa each) and one region domain (~50 kDa) 6 A away.
_DOMAINS = (
    ((-25.0, -15.0, -7.0), (30.0, 27.0, 34.0), (10.0, 20.0, 0.0), "alpha", False),
    ((26.0, -17.0, -2.0), (28.0, 28.0, 33.0), (80.0, 60.0, 30.0), "beta", False),
    ((0.0, 26.0, -9.0), (30.0, 27.0, 33.0), (40.0, 100.0, 10.0), "ab", False),
    ((1.0, -2.0, 35.0), (28.0, 26.0, 28.0), (120.0, 30.0, 70.0), "alpha", False),
    ((-35.0, 35.0, 45.0), (25.0, 27.0, 33.0), (30.0, 75.0, 20.0), "ab", True),
)


def _frame(angles_deg) -> np.ndarray:
    """A rotation matrix from three angles (z, y, z active rotations), shape (3, 3)."""
    a, b, c = np.deg2rad(angles_deg)

    def rz(t):
        return np.array(
            [[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]
        )

    def ry(t):
        return np.array(
            [[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]]
        )

    return rz(a) @ ry(b) @ rz(c)


def _sse_paths(rng, semi_axes, fold: str):
    """Secondary-structure elements filling an ellipsoid, in its local frame.

    Returns a list of ``(ca (m, 3), tangent (m, 3), outward (m, 3))`` per element:
    CA positions, the chain direction and the side-chain direction. Elements run
    along local z; helices on a 10 A lattice, strands 4.8 A apart in sheets 10 A
    apart; fold ``"ab"`` alternates helix and sheet layers.
    """
    a, b, c = semi_axes
    shrink = 1.0  # pseudo-residue centres fill the envelope
    paths = []
    x_layers = np.arange(-a, a + 1e-9, _LAYER_SPACING_A)
    x_layers = x_layers - x_layers.mean() + rng.uniform(-1, 1)
    for li, x0 in enumerate(x_layers):
        helix_layer = fold == "alpha" or (fold == "ab" and li % 2 == 0)
        step = _HELIX_SPACING_A if helix_layer else _STRAND_SPACING_A
        y_off = (li % 2) * step / 2 if helix_layer else 0.0  # hexagonal helix packing
        ys = np.arange(-b, b + 1e-9, step) + y_off
        for si, y0 in enumerate(ys):
            q = 1.0 - (x0 / (a * shrink)) ** 2 - (y0 / (b * shrink)) ** 2
            if q <= 0:
                continue
            half = c * shrink * np.sqrt(q)
            rise = _HELIX_RISE_A if helix_layer else _STRAND_RISE_A
            m = int(2 * half / rise)
            if m < (5 if helix_layer else 3):
                continue
            direction = 1.0 if si % 2 == 0 else -1.0  # antiparallel neighbours
            z = direction * (-half + rise * np.arange(m) + rng.uniform(0, rise))
            tangent = np.tile([0.0, 0.0, direction], (m, 1))
            if helix_layer:
                theta = np.deg2rad(rng.uniform(0, 360) + _HELIX_TURN_DEG * np.arange(m))
                radial = np.stack([np.cos(theta), np.sin(theta), np.zeros(m)], -1)
                ca = np.stack([np.full(m, x0), np.full(m, y0), z], -1) + (
                    _HELIX_RADIUS_A * radial
                )
                outward = radial
            else:
                side = np.where(np.arange(m) % 2 == 0, 1.0, -1.0)
                outward = np.stack([side, np.zeros(m), np.zeros(m)], -1)
                ca = np.stack([x0 + _STRAND_PLEAT_A * side, np.full(m, y0), z], -1)
            paths.append((ca, tangent, outward))
    return paths


def _residue_atoms(rng, ca, tangent, outward):
    """Pseudo-atoms of residues with CA ``ca`` (m, 3): backbone N, C, O, CB and 0-5 more.

    Returns ``(xyz (k, 3), element (k,))``. Side chains point along ``outward``
    with random length and jitter so that residues differ, as in a protein.
    """
    w = np.cross(tangent, outward)  # (m, 3), third direction of the local frame
    atoms = [
        (ca, "C"),
        (ca - 1.0 * tangent + 0.8 * w, "N"),
        (ca + 1.0 * tangent + 0.8 * w, "C"),
        (ca + 1.4 * tangent + 1.9 * w, "O"),
        (ca + 1.5 * outward - 0.3 * w, "C"),
    ]
    xyz = [p for p, _ in atoms]
    elements = [np.full(len(ca), e) for _, e in atoms]
    n_extra = rng.integers(0, 5, len(ca))  # side-chain heavy atoms beyond CB
    for k in range(4):
        has = n_extra > k
        if not has.any():
            break
        reach = 2.5 + 1.0 * (k // 2)  # distance from CA along outward
        lateral = 1.2 if k % 2 == 0 else -1.2  # along the chain
        p = ca + reach * outward + lateral * tangent + rng.normal(0, 0.25, ca.shape)
        xyz.append(p[has])
        elements.append(rng.choice(_SIDECHAIN_ELEMENTS, has.sum()))
    return np.concatenate(xyz), np.concatenate(elements)


def builtin_model(seed: int = 0, *, scale: float = 1.0) -> AtomModel:
    """A deterministic pseudo-atomic complex: ~250 kDa body, ~50 kDa region on a hinge.

    The body is four domains (two all-alpha, one beta-sandwich, one alpha/beta
    layered) packed together; the region is an alpha/beta domain about 6 A from
    the body, joined to it by a short pseudo-residue linker (the hinge, labelled
    body). Pseudo-residues follow helix (1.5 A rise, 100 deg turn, 2.3 A radius)
    and strand (3.3 A rise, pleated) paths on 10 A / 4.8 A lattices, which packs
    them near protein density (about 0.8 Da/A^3 with the hydrogens a real protein
    would carry; the model itself holds heavy atoms only, so its mass counts
    those). Each residue has backbone N, CA, C, O, a CB and 0 to 4 side-chain
    atoms of random element.

    Parameters
    ----------
    seed : int
        Seed of the pseudo-random details (side chains, helix phases, lattice
        offsets). The same seed gives the same model, atom for atom.
    scale : float
        Linear size of the domain layout (centres and envelopes; the helix and
        strand geometry is unchanged), so masses go as ``scale**3``. The default
        model reaches ~83 A from its centre of mass (box x pixel size >= ~170 A);
        ``scale=0.75`` gives a ~100 kDa body and ~24 kDa region reaching ~61 A,
        for boxes of ~130-150 A in quick tests.

    Returns
    -------
    AtomModel
        Coordinates in Angstrom, centred near the origin; ``in_region`` marks
        the region domain.
    """
    if not 0.3 <= scale <= 3.0:
        raise ValueError(f"scale {scale}; expected 0.3 to 3")
    rng = np.random.default_rng(seed)
    centres = scale * np.array([d[0] for d in _DOMAINS])
    semi = scale * np.array([d[1] for d in _DOMAINS])
    frames = np.array([_frame(d[2]) for d in _DOMAINS])

    def level(points):  # (k, 3) -> (k, n_domains) normalised ellipsoid radius
        local = np.einsum("dji,kdj->kdi", frames, points[:, None, :] - centres)
        return np.linalg.norm(local / semi, axis=-1)

    xyz, elements, region = [], [], []
    for d, (_, _, _, fold, is_region) in enumerate(_DOMAINS):
        for ca_l, t_l, o_l in _sse_paths(rng, semi[d], fold):
            ca, t, o = (v @ frames[d].T for v in (ca_l, t_l, o_l))
            ca = ca + centres[d]
            keep = (
                np.argmin(level(ca), axis=1) == d
            )  # overlapping domains: nearest wins
            if keep.sum() < 3:
                continue
            p, e = _residue_atoms(rng, ca[keep], t[keep], o[keep])
            xyz.append(p)
            elements.append(e)
            region.append(np.full(len(p), is_region))
    # the hinge: a pseudo-residue chain between the closest surface points
    body_all = np.concatenate([p for p, r in zip(xyz, region, strict=True) if not r[0]])
    region_all = np.concatenate([p for p, r in zip(xyz, region, strict=True) if r[0]])
    rc = region_all.mean(0)
    start = body_all[np.argmin(np.linalg.norm(body_all - rc, axis=1))]
    end = region_all[np.argmin(np.linalg.norm(region_all - start, axis=1))]
    m = max(int(np.linalg.norm(end - start) / 3.5), 2)
    frac = (np.arange(m) + 0.5) / m
    ca = start + frac[:, None] * (end - start) + rng.normal(0, 0.8, (m, 3))
    t = np.tile((end - start) / np.linalg.norm(end - start), (m, 1))
    o = np.cross(t, [0.0, 0.0, 1.0])
    o /= np.linalg.norm(o, axis=1, keepdims=True)
    p, e = _residue_atoms(rng, ca, t, o)
    xyz.append(p)
    elements.append(e)
    region.append(np.zeros(len(p), dtype=bool))

    xyz = np.concatenate(xyz)
    model = AtomModel(
        xyz, np.concatenate(elements), np.concatenate(region), name="builtin"
    )
    com = model.center_of_mass_a()
    return AtomModel(
        xyz - com,
        model.element,
        model.in_region,
        name=f"builtin(seed={seed}, scale={scale:g})",
    )


# --------------------------------------------------------------------------- PDB

_REGION_ITEM = re.compile(r"^\s*([A-Za-z0-9]+)\s*(?::\s*(-?\d+)\s*-\s*(-?\d+))?\s*$")


def parse_region(selection: str) -> list[tuple[str, int | None, int | None]]:
    """Parse a region selection ``"L,H:1-230"`` -> ``[("L", None, None), ("H", 1, 230)]``.

    Items are separated by commas; each is a chain id, optionally followed by
    ``:first-last``, an inclusive range of residue sequence numbers (insertion
    codes ignored).
    """
    items = []
    for part in selection.split(","):
        match = _REGION_ITEM.match(part)
        if match is None:
            raise InputError(
                None,
                f"region selection item {part!r} of {selection!r} is not CHAIN or "
                "CHAIN:FIRST-LAST",
                'write e.g. "L,H:1-230" (light chain L and heavy chain H residues 1 to 230)',
            )
        chain, first, last = match.groups()
        items.append(
            (
                chain,
                None if first is None else int(first),
                None if last is None else int(last),
            )
        )
    return items


def pdb_model(path, *, region: str | None = None) -> AtomModel:
    """Read a PDB or mmCIF model with gemmi; mark the moving region.

    Waters are removed, only the first model and the first alternative
    conformation are kept; ligands and hydrogens present in the file stay.

    Parameters
    ----------
    path : str or Path
        A ``.pdb``, ``.cif``/``.mmcif`` (optionally gzipped) file.
    region : str, optional
        Selection of the moving region, see :func:`parse_region`, e.g.
        ``"L,H:1-230"`` for one Fab arm of 1HZH (light chain L and heavy chain H
        residues 1-230, VH + CH1 up to the hinge cysteine). None: no region.

    Returns
    -------
    AtomModel
        Coordinates in Angstrom as in the file.
    """
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found", "check the path")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as exc:
        raise InputError(
            path,
            f"gemmi cannot read it as PDB/mmCIF ({exc})",
            "pass a PDB or mmCIF file",
        ) from exc
    if len(st) == 0:
        raise InputError(
            path, "the file holds no model", "pass a file with coordinates"
        )
    st.remove_waters()
    st.remove_alternative_conformations()
    items = parse_region(region) if region else []
    chains_in_file = {ch.name for ch in st[0]}
    for chain, _, _ in items:
        if chain not in chains_in_file:
            raise InputError(
                path,
                f"region chain {chain!r} is not in the model "
                f"(chains: {', '.join(sorted(chains_in_file))})",
                "use a chain id from the file",
            )
    xyz, element, in_region = [], [], []
    for ch in st[0]:
        ranges = [(lo, hi) for c, lo, hi in items if c == ch.name]
        for res in ch:
            num = res.seqid.num
            selected = any(lo is None or lo <= num <= hi for lo, hi in ranges)
            for atom in res:
                xyz.append(atom.pos.tolist())
                element.append(atom.element.name)
                in_region.append(selected)
    if not xyz:
        raise InputError(
            path, "the model holds no atoms", "pass a file with coordinates"
        )
    model = AtomModel(
        np.array(xyz), np.array(element), np.array(in_region), name=path.name
    )
    if items and not model.in_region.any():
        raise InputError(
            path,
            f"region {region!r} selects no atom",
            "check chain ids and residue numbers",
        )
    log.info(
        "%s: %d atoms, %.1f kDa; region %s: %.1f kDa",
        path.name,
        model.n_atoms,
        model.mass_kda(),
        region,
        model.mass_kda("region"),
    )
    return model


# --------------------------------------------------------------------------- maps


def _gemmi_structure(
    xyz_a: np.ndarray, element: np.ndarray, bfactor_a2: float, cell_a: float
):
    """A one-residue-per-atom gemmi Structure in a cubic P1 cell of edge ``cell_a``."""
    import gemmi

    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(cell_a, cell_a, cell_a, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    residue = gemmi.Residue()
    residue.name = "UNK"
    residue.seqid = gemmi.SeqId(1, " ")
    elements = {e: gemmi.Element(e) for e in np.unique(element)}
    for (x, y, z), e in zip(xyz_a.tolist(), element, strict=True):
        atom = gemmi.Atom()
        atom.name = e
        atom.element = elements[e]
        atom.pos = gemmi.Position(x, y, z)
        atom.b_iso = bfactor_a2
        atom.occ = 1.0
        residue.add_atom(atom)
    chain.add_residue(residue)
    model.add_chain(chain)
    st.add_model(model)
    return st


def model_to_map(
    model: AtomModel,
    *,
    box: int,
    pixel_size_a: float,
    center_a=None,
    atoms="all",
    bfactor_a2: float = DEFAULT_BFACTOR_A2,
    oversample: int = 2,
) -> np.ndarray:
    """Density map of (part of) a model: gemmi ``DensityCalculatorE``, band-limited.

    The electron-scattering (Mott-Bethe) density of the atoms, each with
    isotropic B-factor ``bfactor_a2``, is sampled on a grid ``oversample`` times
    finer than the output, then Fourier-cropped to ``box``: the map is the
    density low-passed at the output Nyquist frequency, without the aliasing
    of sampling sharp atoms directly at the output pixel size.

    Parameters
    ----------
    model : AtomModel
        Coordinates in Angstrom.
    box : int
        Map size ``N`` (pixels).
    pixel_size_a : float
        Pixel size in Angstrom.
    center_a : ndarray, shape (3,), optional
        Model point ``(x, y, z)`` (Angstrom) put at the map centre ``N // 2``.
        Default: the centre of mass of the *whole* model (not of ``atoms``), so
        that maps of the body and the region of one model add up to the full
        map.
    atoms : {"all", "body", "region"} or ndarray of bool
        Which atoms contribute.
    bfactor_a2 : float
        B-factor of every atom (Angstrom^2); the file's B-factors are not used.
    oversample : int
        Fine-grid factor (1 samples directly, 2 is the default).

    Returns
    -------
    ndarray, shape (N, N, N), float32, ``[z, y, x]``
        Atom at model point ``p`` is centred at pixel
        ``N // 2 + (p - center_a) / pixel_size_a`` (x on the last axis).

    Raises
    ------
    InputError
        When selected atoms lie outside the box (the density would wrap around).
    """
    import gemmi

    if box < 2 or pixel_size_a <= 0 or oversample < 1:
        raise ValueError(
            f"box={box}, pixel_size_a={pixel_size_a}, oversample={oversample}: "
            "expected box >= 2, pixel size > 0, oversample >= 1"
        )
    sel = model.select(atoms)
    center = (
        model.center_of_mass_a() if center_a is None else np.asarray(center_a, float)
    )
    rel = model.xyz_a[sel] - center  # (k, 3) Angstrom from the map centre
    half_extent_a = min(box // 2, box - 1 - box // 2) * pixel_size_a
    if len(rel) and np.abs(rel).max() > half_extent_a:
        raise InputError(
            None,
            f"model {model.name} reaches {np.abs(rel).max():.1f} A from the map centre but "
            f"box {box} x {pixel_size_a:g} A reaches only {half_extent_a:.1f} A",
            "use a larger box or pixel size",
        )
    fine_n = box * oversample
    fine_px = pixel_size_a / oversample
    cell = fine_n * fine_px
    # put the centre on fine voxel fine_n // 2 (grid index 0 is at cell coordinate 0)
    st = _gemmi_structure(
        rel + (fine_n // 2) * fine_px, model.element[sel], bfactor_a2, cell
    )
    dc = gemmi.DensityCalculatorE()
    dc.grid.set_unit_cell(st.cell)
    dc.grid.set_size(fine_n, fine_n, fine_n)
    dc.blur = 0.0
    if len(rel):
        dc.put_model_density_on_grid(st[0])
    fine = np.array(dc.grid, copy=True).transpose(
        2, 1, 0
    )  # gemmi [x, y, z] -> [z, y, x]
    if oversample == 1:
        return np.ascontiguousarray(fine, dtype=np.float32)
    # Fourier crop about frequency 0 (both transforms centred at index n // 2)
    f = volume_to_fourier(fine.astype(np.float64))
    k = np.fft.fftfreq(box, d=1.0 / box).astype(int)  # coarse kz, ky in cycles per box
    cropped = f[np.ix_(k % fine_n, k % fine_n, np.arange(box // 2 + 1))]
    # even box: the Nyquist rows take the fine grid's -N/2 coefficients; irfftn keeps
    # their Hermitian part, so the map stays real
    vol = fourier_to_volume(cropped, box) / oversample**3
    return vol.astype(np.float32)
