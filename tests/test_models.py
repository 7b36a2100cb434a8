"""Ground-truth models: builtin complex, PDB reading with a region, density maps."""

from __future__ import annotations

import time

import numpy as np
import pytest

from localrefine_plugin.engine.errors import InputError
from localrefine_plugin.engine.geometry import axis_angle_to_matrix
from localrefine_plugin.engine.models import (
    AtomModel,
    builtin_model,
    model_to_map,
    parse_region,
    pdb_model,
)


def _one_atom(xyz_a, element="C") -> AtomModel:
    return AtomModel(np.array([xyz_a], float), np.array([element]), np.array([False]))


@pytest.mark.parametrize("box", [32, 33], ids=["even", "odd"])
@pytest.mark.parametrize("oversample", [1, 2])
def test_one_atom_lands_on_the_voxel_of_its_offset_x_last(box, oversample):
    px = 1.5
    offset_px = np.array([5, -3, 7])  # x, y, z
    center = np.array([10.0, 20.0, 30.0])
    model = AtomModel(
        np.array([center + offset_px * px, center + [40.0, 0, 0]]),
        np.array(["S", "C"]),
        np.array([False, True]),
    )
    vol = model_to_map(
        model,
        box=box,
        pixel_size_a=px,
        center_a=center,
        atoms="body",
        oversample=oversample,
    )
    assert vol.shape == (box, box, box) and vol.dtype == np.float32
    peak = np.unravel_index(np.argmax(vol), vol.shape)
    c = box // 2
    assert peak == (c + 7, c - 3, c + 5)  # [z, y, x]
    # the density is centred on that voxel: the centroid of the peak's
    # neighbourhood is the voxel itself within a small fraction of a pixel
    z, y, x = peak
    cube = vol[z - 2 : z + 3, y - 2 : y + 3, x - 2 : x + 3].astype(np.float64)
    grid = np.arange(-2, 3)
    for axis in range(3):
        profile = cube.sum(axis=tuple(a for a in range(3) if a != axis))
        assert abs((profile * grid).sum() / profile.sum()) < 0.02


def test_map_integral_equals_the_analytic_scattering_factor_sum():
    """Integral of the map = sum of the atoms' electron form factors at s = 0.

    gemmi's ``DensityCalculatorE`` uses the Peng (1996) 5-Gaussian electron
    scattering factors ``f(s) = sum a_i exp(-b_i s^2 / 4)``; the real-space integral
    of one atom's density is ``f(0) = sum a_i``. The oversampled, Fourier-cropped map
    keeps it at any pixel size; direct sampling at a coarse pixel aliases.
    """
    import gemmi

    xyz = np.array([[0.0, 0, 0], [6.0, 1, -2], [-5.0, 3, 2]])
    model = AtomModel(xyz, np.array(["C", "O", "S"]), np.zeros(3, bool))
    expected = sum(sum(gemmi.Element(e).c4322.a) for e in ("C", "O", "S"))
    for px in (0.8, 1.2):
        vol = model_to_map(model, box=40, pixel_size_a=px, center_a=np.zeros(3))
        assert vol.sum() * px**3 == pytest.approx(expected, rel=1e-3)
    one = model_to_map(
        model, box=40, pixel_size_a=1.2, center_a=np.zeros(3), atoms=[1, 0, 0]
    )
    assert one.sum() * 1.2**3 == pytest.approx(
        sum(gemmi.Element("C").c4322.a), rel=1e-3
    )


def test_atoms_outside_the_box_raise_input_error():
    with pytest.raises(InputError, match="larger box"):
        model_to_map(
            _one_atom([30.0, 0, 0]), box=32, pixel_size_a=1.5, center_a=np.zeros(3)
        )


def test_builtin_model_mass_and_shape():
    t0 = time.perf_counter()
    model = builtin_model()
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0
    assert 220 <= model.mass_kda("body") <= 280
    assert 40 <= model.mass_kda("region") <= 60
    assert set(np.unique(model.labels)) == {"body", "region"}
    np.testing.assert_allclose(model.center_of_mass_a(), 0.0, atol=1e-9)
    # protein-like: no two atoms closer than a bond would allow on average
    from scipy.spatial import cKDTree

    tree = cKDTree(model.xyz_a)
    nearest, _ = tree.query(model.xyz_a, k=2)
    assert np.median(nearest[:, 1]) > 1.0
    # the region is a separate domain: its atoms are mostly > 4 A from the body
    # (only the hinge touches it)
    body = cKDTree(model.xyz_a[~model.in_region])
    gap, _ = body.query(model.xyz_a[model.in_region])
    assert np.mean(gap < 4.0) < 0.02
    # packed near protein density: heavy-atom mass within the convex hull
    from scipy.spatial import ConvexHull

    hull = ConvexHull(model.xyz_a[model.in_region])
    density = model.mass_kda("region") * 1e3 / hull.volume
    assert 0.5 < density < 1.0  # Da / A^3 (heavy atoms only, hull includes surface)


def test_builtin_model_scale_shrinks_the_layout_not_the_residues():
    small = builtin_model(scale=0.75)
    assert 85 <= small.mass_kda("body") <= 115  # ~0.75^3 of the default
    assert 18 <= small.mass_kda("region") <= 30
    assert np.linalg.norm(small.xyz_a, axis=1).max() < 66.0  # fits 48 px x 3 A
    default = builtin_model()
    assert np.linalg.norm(default.xyz_a, axis=1).max() < 88.0  # fits 96 px x 2 A
    # same local (protein) geometry: nearest-neighbour distances alike
    from scipy.spatial import cKDTree

    def median_nn(m):
        return np.median(cKDTree(m.xyz_a).query(m.xyz_a, k=2)[0][:, 1])

    assert median_nn(small) == pytest.approx(median_nn(default), rel=0.05)
    with pytest.raises(ValueError, match="scale"):
        builtin_model(scale=10.0)


def test_builtin_model_is_deterministic_and_seeded():
    a, b, c = builtin_model(0), builtin_model(0), builtin_model(1)
    np.testing.assert_array_equal(a.xyz_a, b.xyz_a)
    np.testing.assert_array_equal(a.element, b.element)
    np.testing.assert_array_equal(a.in_region, b.in_region)
    assert a.n_atoms != c.n_atoms or not np.array_equal(a.xyz_a, c.xyz_a)


def test_builtin_map_has_high_resolution_texture():
    """Helices and side chains put real power near Nyquist (4 A at 2 A pixels)."""
    from localrefine_plugin.engine.fourier import shell_index_3d, volume_to_fourier

    model = builtin_model()
    vol = model_to_map(model, box=96, pixel_size_a=2.0, bfactor_a2=30.0)
    power = np.abs(volume_to_fourier(vol.astype(np.float64))) ** 2
    shells = shell_index_3d(96)
    per_shell = np.bincount(shells.ravel(), power.ravel()) / np.bincount(shells.ravel())
    # 8 A (shell 24) and 4.4 A (shell 44) carry power well above the numerical floor
    assert per_shell[24] > 1e-4 * per_shell[2]
    assert per_shell[44] > 1e-6 * per_shell[2]


def test_body_and_region_maps_add_up_and_center_default_is_whole_model():
    model = builtin_model()
    full = model_to_map(model, box=96, pixel_size_a=2.0)
    body = model_to_map(model, box=96, pixel_size_a=2.0, atoms="body")
    region = model_to_map(model, box=96, pixel_size_a=2.0, atoms="region")
    np.testing.assert_allclose(body + region, full, atol=1e-5 * full.max())
    # the region map's first moment sits at the region atoms' centre weighted by
    # their scattering power f(0) (gemmi's Peng coefficients), in model coordinates
    import gemmi

    z, y, x = np.meshgrid(*(np.arange(96) - 48,) * 3, indexing="ij")
    w = region.astype(np.float64)
    centre_px = np.array([(w * x).sum(), (w * y).sum(), (w * z).sum()]) / w.sum()
    sel = model.in_region
    f0 = np.array([sum(gemmi.Element(e).c4322.a) for e in model.element[sel]])
    expected_a = (model.xyz_a[sel] * f0[:, None]).sum(0) / f0.sum()  # model COM is 0
    np.testing.assert_allclose(centre_px * 2.0, expected_a, atol=0.1)


def test_moved_rotates_the_region_about_its_centre():
    model = builtin_model()
    c = model.center_of_mass_a("region")
    r = axis_angle_to_matrix(np.array([0.0, 0.0, 1.0]), 90.0)
    moved = model.moved(r, center_a=c, shift_a=np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(
        moved.xyz_a[~model.in_region], model.xyz_a[~model.in_region]
    )
    np.testing.assert_allclose(
        moved.center_of_mass_a("region"), c + [1, 2, 3], atol=1e-9
    )
    p, q = (
        model.xyz_a[model.in_region][0] - c,
        moved.xyz_a[model.in_region][0] - c - [1, 2, 3],
    )
    np.testing.assert_allclose(q, [-p[1], p[0], p[2]], atol=1e-9)  # +90 deg about z


def test_parse_region():
    assert parse_region("L,H:1-230") == [("L", None, None), ("H", 1, 230)]
    with pytest.raises(InputError, match="CHAIN:FIRST-LAST"):
        parse_region("H:1")


def test_pdb_model_1hzh_fab_arm(structures_dir):
    model = pdb_model(structures_dir / "1hzh_igg1_b12.pdb", region="L,H:1-230")
    # 1HZH: intact IgG1 (~147 kDa with glycans; heavy atoms only here), one Fab ~48 kDa
    assert 135 <= model.mass_kda() <= 150
    assert 44 <= model.mass_kda("region") <= 50
    # the Fab arm's centre lies far from the whole antibody's centre (a moving arm)
    d = np.linalg.norm(model.center_of_mass_a("region") - model.center_of_mass_a())
    assert 35 < d < 70


def test_pdb_model_errors(structures_dir, tmp_path):
    with pytest.raises(InputError, match="not found"):
        pdb_model(tmp_path / "missing.pdb")
    with pytest.raises(InputError, match="chain 'Z'"):
        pdb_model(structures_dir / "1hzh_igg1_b12.pdb", region="Z")
    with pytest.raises(InputError, match="selects no atom"):
        pdb_model(structures_dir / "1hzh_igg1_b12.pdb", region="L:900-950")
