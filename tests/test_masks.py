"""Soft masks: edge profile, extension, centre of mass and input checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from localrefine_plugin.engine.errors import InputError
from localrefine_plugin.engine.masks import (
    center_of_mass_px,
    check_mask,
    create_soft_mask,
    default_threshold,
)

from .conftest import blob_map


def _ball_function(n: int, radius_px: float, centre=(0, 0, 0)) -> np.ndarray:
    """radius - distance from ``centre`` (x, y, z px from N//2): >= 0 inside the ball."""
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    return (radius_px - r).astype(np.float32)


@pytest.mark.parametrize("extend_a, soft_edge_a", [(0.0, 6.0), (3.0, 6.0), (4.5, 9.0)])
def test_soft_edge_is_a_raised_cosine_of_the_requested_width(extend_a, soft_edge_a):
    n, px, r0 = 48, 1.5, 8
    vol = _ball_function(
        n, r0 + 0.5
    )  # inside: voxels with r <= 8.5, last on-axis x = 8
    mask = create_soft_mask(
        vol, px, threshold=0.0, extend_a=extend_a, soft_edge_a=soft_edge_a
    )
    assert mask.dtype == np.float32 and mask.shape == (n, n, n)
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    c = n // 2
    ray = mask[c, c, c:]  # along +x from the centre
    edge_start = r0 + extend_a / px  # last voxel at full weight
    d = np.arange(ray.size) - edge_start
    width = soft_edge_a / px
    want = np.where(
        d <= 0, 1.0, np.where(d >= width, 0.0, 0.5 + 0.5 * np.cos(np.pi * d / width))
    )
    np.testing.assert_allclose(ray, want, atol=1e-6)
    # the measured width: first zero minus last one along the ray
    assert np.argmax(ray == 0) - np.nonzero(ray == 1)[0].max() == pytest.approx(width)


def test_extension_matches_brute_force_euclidean_distance():
    n, px = 24, 2.0
    vol = _ball_function(n, 4.0, (1, 0, -2))
    mask = create_soft_mask(vol, px, threshold=0.0, extend_a=7.0, soft_edge_a=0.0)
    assert set(np.unique(mask)) == {0.0, 1.0}
    grid = np.stack(np.meshgrid(*(np.arange(n),) * 3, indexing="ij"), -1).reshape(-1, 3)
    inside = grid[vol.ravel() >= 0]  # (m, 3)
    d2 = ((grid[:, None, :] - inside[None, :, :]) ** 2).sum(-1).min(1)  # (N^3,)
    want = (d2 <= 3.5**2).reshape(n, n, n)  # 7 A = 3.5 px
    np.testing.assert_array_equal(mask == 1.0, want)
    assert want.sum() > 2 * (vol >= 0).sum()  # the growth really happened


@pytest.mark.parametrize("centre", [(3, -5, 7), (-6, 0, 2)])
def test_center_of_mass_of_a_shifted_sphere_is_exact(centre):
    n, px = 40, 1.2
    mask = create_soft_mask(
        _ball_function(n, 6.0, centre), px, threshold=0.0, soft_edge_a=4.0
    )
    np.testing.assert_allclose(center_of_mass_px(mask), centre, atol=1e-9)


def test_center_of_mass_uses_the_n_over_2_origin_for_odd_boxes():
    mask = np.zeros((5, 5, 5))
    mask[2, 2, 4] = 1.0  # x = 4 - 2
    np.testing.assert_allclose(center_of_mass_px(mask), [2.0, 0.0, 0.0])


def test_default_threshold_covers_the_density_of_a_noisy_map():
    n, px = 64, 1.5
    rng = np.random.default_rng(7)
    vol = blob_map(n) + 0.02 * rng.standard_normal((n, n, n)).astype(np.float32)
    mask = create_soft_mask(vol, px, lowpass_a=15.0, extend_a=3.0, soft_edge_a=6.0)
    clean = blob_map(n)
    captured = float((mask * clean).sum() / clean.sum())
    fraction = float(mask.mean())
    assert captured > 0.95  # the density is inside
    assert fraction < 0.4  # the solvent mostly outside
    assert default_threshold(vol) > 5 * 0.02  # above the noise


def test_threshold_above_the_maximum_is_an_error():
    vol = _ball_function(16, 3.0)
    with pytest.raises(ValueError, match="empty"):
        create_soft_mask(vol, 1.0, threshold=100.0)


# ---- check_mask -------------------------------------------------------------


def _good_mask():
    return create_soft_mask(
        _ball_function(24, 6.0), 1.5, threshold=0.0, soft_edge_a=4.5
    )


def _check(mask, **kw):
    args = dict(
        mask_path="/data/my_mask.mrc",
        mask_pixel_size_a=1.5,
        reference_shape=(24, 24, 24),
        reference_pixel_size_a=1.5,
    )
    args.update(kw)
    check_mask(mask, **args)


def test_check_mask_accepts_a_good_mask(caplog):
    ref = np.clip(_ball_function(24, 5.0), 0, None)
    with caplog.at_level(logging.WARNING):
        _check(_good_mask(), reference=ref)
    assert not caplog.records


@pytest.mark.parametrize(
    "mask, kw, problem",
    [
        (np.ones((24, 24, 20), np.float32), {}, "box"),
        (None, {"mask_pixel_size_a": 1.52}, "pixel size"),
        (np.zeros((24, 24, 24), np.float32), {}, "empty"),
        (np.full((24, 24, 24), 1e-7, np.float32), {}, "empty"),
        (None, {"scale": 255.0}, "outside \\[0, 1\\]"),
        (None, {"scale": -1.0}, "outside \\[0, 1\\]"),
        (None, {"nan": True}, "NaN"),
    ],
    ids=["box", "pixel-size", "zero", "tiny", "above-one", "negative", "nan"],
)
def test_check_mask_errors_name_the_file(mask, kw, problem):
    if mask is None:
        mask = _good_mask()
    if "scale" in kw:
        mask = mask * kw.pop("scale")
    if kw.pop("nan", False):
        mask = mask.copy()
        mask[0, 0, 0] = np.nan
    with pytest.raises(InputError, match=problem) as err:
        _check(mask, **kw)
    assert "/data/my_mask.mrc" in str(err.value) and err.value.fix


def test_check_mask_tolerates_rounding_and_close_pixel_sizes():
    _check(_good_mask() * np.float32(1.0005), mask_pixel_size_a=1.501)


def test_check_mask_rejects_a_mask_outside_the_density():
    n = 24
    ref = np.clip(_ball_function(n, 4.0, (6, 6, 6)), 0, None)  # density in one corner
    away = create_soft_mask(_ball_function(n, 4.0, (-6, -6, -6)), 1.5, threshold=0.0)
    with pytest.raises(InputError, match="outside the reference's density") as err:
        _check(away, reference=ref)
    assert "/data/my_mask.mrc" in str(err.value)
    on = create_soft_mask(_ball_function(n, 4.0, (6, 6, 6)), 1.5, threshold=0.0)
    _check(on, reference=ref)


def test_check_mask_ignores_noise_spikes_of_an_unfiltered_reference():
    """A noisy unfiltered reconstruction: a few spikes in the solvent far above
    the weak region's density must not be taken for the density (seen on a
    1,000-particle consensus map at SNR 0.05), while a mask off the density
    is still refused."""
    n = 24
    rng = np.random.default_rng(0)
    ref = 0.02 * np.clip(_ball_function(n, 4.0, (6, 6, 6)), 0, None)
    ref += rng.normal(0, 0.01, ref.shape).astype(np.float32)
    on = create_soft_mask(_ball_function(n, 4.0, (6, 6, 6)), 1.5, threshold=0.0)
    solvent = np.flatnonzero(on.ravel() == 0)
    ref.ravel()[rng.choice(solvent, 12, replace=False)] = 1.0  # 12x the peak density
    assert on[ref >= default_threshold(ref)].sum() < 1  # the raw map: spikes only
    _check(on, reference=ref)
    away = create_soft_mask(_ball_function(n, 3.0, (-4, 6, -4)), 1.5, threshold=0.0)
    with pytest.raises(InputError, match="outside the reference's density"):
        _check(away, reference=ref)


def test_check_mask_accepts_a_loose_mask_around_a_small_region_of_a_large_complex():
    n = 48
    big = np.clip(_ball_function(n, 12.0, (-6, 0, 0)), 0, None)  # the complex
    small = np.clip(_ball_function(n, 2.5, (14, 0, 0)), 0, None)  # a small domain
    ref = big + 3 * small
    loose = create_soft_mask(
        _ball_function(n, 2.5, (14, 0, 0)), 1.5, threshold=0.0, extend_a=12.0
    )
    assert loose.sum() > 20 * (small > 0).sum()  # mostly solvent
    _check(
        loose,
        reference_shape=ref.shape,
        reference=ref,
    )


def test_check_mask_warns_about_a_hard_edge(caplog):
    binary = (_ball_function(24, 6.0) >= 0).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        _check(binary)
    assert any(
        r.levelno == logging.WARNING and "--soft-edge" in r.getMessage()
        for r in caplog.records
    )


# ---- against relion_mask_create ---------------------------------------------


@pytest.mark.relion
@pytest.mark.parametrize(
    "lowpass_a, extend_px, edge_px",
    [
        (None, 0.0, 4.0),
        (None, 3.1, 5.0),
        (None, 2.5, 4.3),
        (16.0, 3.1, 5.0),
        (8.0, 1.6, 6.5),
    ],
)
def test_mask_equals_relion_mask_create(
    relion_bin, tmp_path, lowpass_a, extend_px, edge_px
):
    """Same threshold, extension and soft edge (in pixels for RELION).

    Where the two definitions differ the cases avoid the difference:
    RELION grows the region to distances ``< extend`` (ours ``<=``), so the
    extensions are not distances between voxel centres (sqrt of integers);
    RELION rounds the low-pass cut-off to a whole shell, so the low-pass
    resolutions put it on one (64 * 1.5 / 16 = 6, / 8 = 12).
    """
    import subprocess

    from localrefine_plugin.engine.mrc_io import read_map, write_map

    n, px, threshold = 64, 1.5, 0.1
    vol = blob_map(n)
    write_map(tmp_path / "map.mrc", vol, px)
    cmd = [
        str(relion_bin / "relion_mask_create"),
        "--i", "map.mrc",
        "--o", "relion_mask.mrc",
        "--ini_threshold", str(threshold),
        "--extend_inimask", str(extend_px),
        "--width_soft_edge", str(edge_px),
    ]  # fmt: skip
    if lowpass_a is not None:
        cmd += ["--lowpass", str(lowpass_a), "--angpix", str(px)]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    relion, _ = read_map(tmp_path / "relion_mask.mrc")
    ours = create_soft_mask(
        vol,
        px,
        threshold=threshold,
        lowpass_a=lowpass_a,
        extend_a=extend_px * px,
        soft_edge_a=edge_px * px,
    )
    assert 0.02 < ours.mean() < 0.5  # a real mask, neither empty nor full
    np.testing.assert_allclose(ours, relion, atol=1e-5)
