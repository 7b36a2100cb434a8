"""`benchmarks/gather_sectors.py`: the sector counts behind the cells layout."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def sectors(benchmark_module):
    return benchmark_module("gather_sectors")


def test_a_cell_is_two_sectors_and_the_volume_more(sectors):
    """A 64-byte cell is 2 aligned sectors per sample (a warp's samples at
    padding 2 never share a cell); 8 scattered corners take more."""
    rng = np.random.default_rng(0)
    load_c, warp_c, tile_c = sectors.count(48, "raster", "cells", 1, 5.0, rng)
    rng = np.random.default_rng(0)
    load_v, warp_v, tile_v = sectors.count(48, "raster", "volume", 1, 5.0, rng)
    assert 1.95 <= warp_c <= 2.0
    assert warp_v > 3.5
    assert 0 < tile_c <= warp_c and 0 < tile_v <= warp_v  # reuse across a tile
    assert 0 < load_c <= 1.0 and 0 < load_v <= 1.0  # at most a sector per lane


def test_cell_offsets_cover_the_cell(sectors):
    q = np.array([[3.2, -1.7, 0.4]])
    offsets = sectors.sample_bytes(q, 10, "cells", 6)
    assert offsets.shape == (4, 1)
    np.testing.assert_array_equal(np.diff(offsets[:, 0]), [16, 16, 16])
    assert offsets[0, 0] % 64 == 0


def test_rotation_lanes_share_sectors_when_rotations_agree(sectors):
    """One warp load with lane -> rotation: 32 equal rotations read one address
    (1 sector); lane -> pixel reads 32 pixels' corners (many sectors)."""
    rng = np.random.default_rng(2)
    same = np.repeat(np.eye(3)[None], 32, axis=0)
    k = rng.integers(-12, 13, (64, 2)).astype(float)
    by_pixel, by_rotation = sectors.warp_load_sectors(same, k, 48)
    assert by_rotation == 1.0
    assert by_pixel > 8


def test_the_search_tiles_read_fewer_sectors_with_rotation_lanes(sectors):
    """In the tiles a real local search scores (box 48), lane -> rotation needs
    fewer sectors per warp load than lane -> pixel, at every stage."""
    rows = sectors.search_tiles(48, 1)
    assert rows, "the search scored no full tile"
    for row in rows:
        assert 1 <= row["rotation_lanes"] < row["pixel_lanes"] <= 32
