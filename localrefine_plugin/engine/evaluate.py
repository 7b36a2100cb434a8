"""Compare refined poses and maps with a known ground truth (simulated data).

Pose errors are measured where they matter for a region: the angle between the
refined and the true rotation (geodesic, degrees), and the distance between the
image positions of the region's centre ``c`` under the two poses (pixels). With
RELION's origins a map point ``c`` appears in the image at ``(A c)_xy - origin``
(``docs/conventions.md``), so this position error does not depend on whether a
pose was found by rotating about the box centre or about the region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fsc import Resolution, fsc_curve, resolution_at
from .geometry import geodesic_angle_deg

__all__ = ["PoseErrors", "pose_errors", "MapTruthComparison", "compare_map_to_truth"]


@dataclass(frozen=True)
class PoseErrors:
    """Per-particle pose errors against the truth.

    Attributes
    ----------
    angle_deg : ndarray, shape (n,)
        Geodesic angle between refined and true rotations (degrees).
    position_px : ndarray, shape (n,)
        Distance between the image positions of the reference point (pixels).
    """

    angle_deg: np.ndarray
    position_px: np.ndarray

    @property
    def median_angle_deg(self) -> float:
        """Median angular error (degrees)."""
        return float(np.median(self.angle_deg))

    @property
    def median_position_px(self) -> float:
        """Median position error of the reference point (pixels)."""
        return float(np.median(self.position_px))


def pose_errors(
    rotations: np.ndarray,
    origins_px: np.ndarray,
    true_rotations: np.ndarray,
    true_origins_px: np.ndarray,
    *,
    point_px: np.ndarray | None = None,
) -> PoseErrors:
    """Pose errors of ``(rotations, origins_px)`` against the truth.

    Parameters
    ----------
    rotations, true_rotations : ndarray, shape (n, 3, 3)
        RELION matrices ``A`` (``geometry.euler_to_matrix``).
    origins_px, true_origins_px : ndarray, shape (n, 2)
        RELION origins in pixels (x, y).
    point_px : ndarray, shape (3,), optional
        The reference point (x, y, z) in pixels from the box centre, e.g. the
        region's centre of mass; default the box centre.
    """
    c = np.zeros(3) if point_px is None else np.asarray(point_px, dtype=np.float64)
    seen = np.einsum("nij,j->ni", np.asarray(rotations), c)[:, :2] - origins_px
    seen_true = (
        np.einsum("nij,j->ni", np.asarray(true_rotations), c)[:, :2] - true_origins_px
    )
    return PoseErrors(
        angle_deg=geodesic_angle_deg(rotations, true_rotations),
        position_px=np.linalg.norm(seen - seen_true, axis=1),
    )


@dataclass(frozen=True)
class MapTruthComparison:
    """A map against the true map, both multiplied by the same mask.

    Attributes
    ----------
    fsc : ndarray, shape (N//2 + 1,)
        Masked FSC against the truth over shells ``0 .. N//2``.
    resolution_05 : Resolution
        Where that FSC first falls below 0.5 (never extrapolated).
    mean_fsc : float
        Mean of the FSC over shells ``1 .. N//2`` (a single number that rises as
        a map gets closer to the truth at any resolution).
    """

    fsc: np.ndarray
    resolution_05: Resolution
    mean_fsc: float


def compare_map_to_truth(
    volume: np.ndarray,
    truth: np.ndarray,
    *,
    pixel_size_a: float,
    mask: np.ndarray | None = None,
) -> MapTruthComparison:
    """FSC of ``volume`` against ``truth`` (both (N, N, N)), inside ``mask`` if given.

    Against a noise-free truth the 0.5 threshold is the one to read
    (Rosenthal and Henderson 2003), not the half-map threshold 0.143.
    """
    n = volume.shape[0]
    m = 1.0 if mask is None else mask
    fsc = fsc_curve(volume * m, truth * m)
    return MapTruthComparison(
        fsc=fsc,
        resolution_05=resolution_at(fsc, 0.5, n=n, pixel_size_a=pixel_size_a),
        mean_fsc=float(np.mean(fsc[1:])),
    )
