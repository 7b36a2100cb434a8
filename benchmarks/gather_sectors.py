"""Memory sectors the scoring kernels' slice gathers touch, volume against cells.

Counts, without a GPU, what ``score_tiles`` reads while it interpolates the
slices of a tile of 32 rotations x 32 pixels (one warp per rotation, lane ->
pixel; ``scoring.cu``), for the two layouts ``localrefine_common.h`` samples:

* ``volume``: the padded volume, 8 corners of 8 bytes per sample (``lr_sample``);
* ``cells``: the 2x2x2 cells, 64 contiguous bytes per sample (``lr_sample_cells``),

and two pixel orders: the engine's raster order (``cuda_scoring``) and the
radius order of the bound batches (``cuda_search_ops``). Columns, per sample:

* ``sectors/load``: 32-byte sectors one warp-wide load instruction touches,
  divided by 32 lanes (the L1 request cost);
* ``warp``: distinct sectors of one warp's 32 samples (no reuse beyond the warp);
* ``tile``: distinct sectors of the whole tile (32 rotations of one local
  stage, a few degrees apart): what L2 must deliver if L1 keeps the tile.

Rotations are drawn as in ``bench_gpu.py``'s stage (a random consensus, the
tile's rotations within ``--spread`` degrees of it); radius 0.4 N, padding 2::

    python benchmarks/gather_sectors.py --boxes 128 256

``--search M`` also runs the engine's local search (defaults: 10 deg, 3 px,
0.5 deg; radius 0.4 N; the CPU path) on M particles of ``bench_gpu.py``'s map
and counts, for the tiles of 32 rotations its stages really score (each
stage's candidates of one particle, in the search's order, radius order of the
pixels), the distinct sectors of one warp-wide load of a trilinear corner with
the two lane mappings of ``scoring.cu``: lane -> pixel (the default kernels)
and lane -> rotation (the ``_rl`` variants, ``RLANES``).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_gpu

from localrefine_plugin.engine.geometry import (  # noqa: E402
    axis_angle_to_matrix,
    euler_to_matrix,
)
from localrefine_plugin.engine.projector import trilinear_corners  # noqa: E402
from localrefine_plugin.engine.scoring import half_plane_pixels  # noqa: E402

SECTOR = 32  # bytes
TILE = 32  # rotations per tile, pixels per step (LR_TJ, LR_TP)


def sample_bytes(q: np.ndarray, c: int, layout: str, rc: int) -> np.ndarray:
    """Byte offsets (k, ...) of what one sample at padded point q reads.

    ``volume``: the 8 corners (8 bytes each) of the (2c+2, 2c+2, c+2) array;
    ``cells``: the first byte of each 16-byte quarter of the 64-byte cell in
    the layout of radius ``rc``.
    """
    if layout == "volume":
        index, _, _ = trilinear_corners(q, c, (2 * c + 2, 2 * c + 2, c + 2))
        return index * 8
    index, _, _ = trilinear_corners(q, rc, (2 * rc + 2, 2 * rc + 2, rc + 2))
    return index[0][None] * 64 + 16 * np.arange(4).reshape((4,) + (1,) * (q.ndim - 1))


def _distinct(sec: np.ndarray) -> np.ndarray:
    """Distinct values along the last axis."""
    s = np.sort(sec, axis=-1)
    return 1 + np.sum(np.diff(s, axis=-1) != 0, axis=-1)


def count(n: int, order: str, layout: str, tiles: int, spread_deg: float, rng):
    """Mean (sectors per load per lane, warp sectors per sample, tile sectors per sample)."""
    padding = 2
    c = padding * n // 2
    r_max = 0.4 * n
    rc = int(min(c, np.floor(padding * r_max) + 2))
    _, kx, ky, _, _ = half_plane_pixels(n, r_max)
    if order == "radius":
        o = np.argsort(kx * kx + ky * ky, kind="stable")
        kx, ky = kx[o], ky[o]
    steps = kx.size // TILE
    k = np.stack([kx, ky], -1)[: steps * TILE]  # (P, 2)
    per_load, per_warp, per_tile = [], [], []
    for _ in range(tiles):
        a0 = euler_to_matrix(*rng.uniform(-180, 180, 3))
        axes = rng.normal(size=(TILE, 3))
        a = a0 @ axis_angle_to_matrix(
            axes, rng.uniform(0, spread_deg, TILE)
        )  # (32, 3, 3)
        q = padding * np.einsum("pi,jik->jpk", k, a[:, :2, :])  # (32 rot, P, 3)
        sec = sample_bytes(q, c, layout, rc) // SECTOR  # (k, 32 rot, P)
        sec = sec.reshape(sec.shape[0], TILE, steps, TILE)  # (k, rot, step, lane)
        # one load instruction: corner kk, one rotation's warp, 32 lanes
        per_load.append(np.mean(_distinct(sec)) / TILE)
        w = sec.transpose(1, 2, 0, 3).reshape(TILE, steps, -1)
        per_warp.append(np.mean(_distinct(w)) / TILE)
        t = sec.transpose(2, 0, 1, 3).reshape(steps, -1)
        per_tile.append(np.mean(_distinct(t)) / TILE**2)
    return float(np.mean(per_load)), float(np.mean(per_warp)), float(np.mean(per_tile))


def warp_load_sectors(
    rotations: np.ndarray, k: np.ndarray, c: int
) -> tuple[float, float]:
    """Mean distinct sectors of one warp-wide corner load of a tile, reading the volume.

    ``rotations``: (32, 3, 3) the tile's matrices; ``k``: (P, 2) its pixels
    (P a multiple of 32, in the kernels' order); ``c``: the padded volume's
    radius (padding 2). Returns (lane -> pixel, lane -> rotation).
    """
    q = 2 * np.einsum("pi,jik->jpk", k, rotations[:, :2, :])  # (32 rot, P, 3)
    sec = sample_bytes(q, c, "volume", c) // SECTOR  # (8 corners, 32 rot, P)
    by_pixel = sec.reshape(8, TILE, -1, TILE)  # one load: a rotation, 32 pixels
    by_rotation = sec.transpose(0, 2, 1)  # one load: a pixel, 32 rotations
    return float(_distinct(by_pixel).mean()), float(_distinct(by_rotation).mean())


def search_tiles(n: int, m: int, seed: int = 1) -> list[dict]:
    """Per scoring call of a real local search at box ``n`` (``m`` particles):
    its radius, candidates per particle, and the mean sectors per warp load
    with each lane mapping over its full tiles of 32 rotations."""
    import bench_gpu

    from localrefine_plugin.engine import search_ops
    from localrefine_plugin.engine.projector import FourierProjector
    from localrefine_plugin.engine.search import local_search

    calls = []
    score = search_ops.HostBatchOps.score

    def recording(self, rotations, shifts_px, **kw):
        calls.append((rotations.copy(), kw["counts"][0].copy(), kw["r_max_px"]))
        return score(self, rotations, shifts_px, **kw)

    rng = np.random.default_rng(seed)
    proj = FourierProjector(bench_gpu.blob_volume(n), r_max_px=0.4 * n + 1)
    x, ctf, inv_s2, a_cons, o_cons = bench_gpu.search_particles(proj, m, rng)
    search_ops.HostBatchOps.score = recording
    try:
        local_search(
            proj, x, ctf, inv_s2, consensus_rotations=a_cons,
            consensus_origins_px=o_cons, r_max_px=0.4 * n, fulcrum_px=np.zeros(3),
        )  # fmt: skip
    finally:
        search_ops.HostBatchOps.score = score
    rows = []
    for rotations, n_rot, radius in calls:
        if n_rot.max() < TILE:
            continue  # the stages' single best poses: no full tile
        _, kx, ky, _, _ = half_plane_pixels(n, radius)
        o_ = np.argsort(kx * kx + ky * ky, kind="stable")
        k = np.stack([kx[o_], ky[o_]], -1)[: (kx.size // TILE) * TILE]
        loads = [
            warp_load_sectors(rotations[i, j0 : j0 + TILE], k, n)
            for i in range(rotations.shape[0])
            for j0 in range(0, int(n_rot[i]) - TILE + 1, TILE)
        ]
        rows.append(dict(
            radius=float(radius), rotations=(int(n_rot.min()), int(n_rot.max())),
            pixel_lanes=float(np.mean([v[0] for v in loads])),
            rotation_lanes=float(np.mean([v[1] for v in loads])),
        ))  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    ap.add_argument(
        "--tiles", type=int, default=4, help="tiles of 32 rotations per row"
    )
    ap.add_argument(
        "--spread", type=float, default=5.0, help="tile rotations within, deg"
    )
    ap.add_argument(
        "--search", type=int, default=0, metavar="M",
        help="also count the tiles of a real local search on M particles",
    )  # fmt: skip
    args = ap.parse_args(argv)
    print(
        f"load average {os.getloadavg()[0]:.2f}; sectors of {SECTOR} bytes per sample"
    )
    print("box | order | layout | sectors/load | warp | tile | tile: volume / cells")
    for n in args.boxes:
        for order in ("raster", "radius"):
            row = {}
            for layout in ("volume", "cells"):
                rng = np.random.default_rng(n)  # the same rotations for both layouts
                row[layout] = count(n, order, layout, args.tiles, args.spread, rng)
                load, warp, tile = row[layout]
                print(
                    f"{n} | {order} | {layout} | {load:.2f} | {warp:.2f} | {tile:.2f} |",
                    end="",
                )
                print(f" {row['volume'][2] / tile:.2f}x" if layout == "cells" else "")
    if args.search:
        print(
            "\nthe local search's own tiles (volume, radius order): distinct sectors "
            "per warp-wide corner load, of 32"
        )
        print(
            "box | radius px | rotations per particle | lane -> pixel | lane -> rotation"
        )
        for n in args.boxes:
            for row in search_tiles(n, args.search):
                lo, hi = row["rotations"]
                print(
                    f"{n} | {row['radius']:.1f} | {lo}-{hi} | {row['pixel_lanes']:.1f} | "
                    f"{row['rotation_lanes']:.1f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
