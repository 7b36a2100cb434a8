"""Viewer of the local refinement protocol: FSC curves, resolution per iteration,
pose changes, and the maps in Scipion's standard viewers.

The drawing functions (``draw_*``, :func:`write_report_png`) need only
matplotlib and the files ``localrefine refine`` writes (``fsc.csv``,
``summary.json``, the input and output ``particles.star``), so tests and the
demo use them without a display.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyworkflow.protocol.params as params
from pwem.viewers import DataView, EmProtocolViewer
from pwem.viewers.plotter import EmPlotter
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO

from .constants import FSC_THRESHOLD
from .protocols import ProtLocalRefine
from .protocols._common import iteration_history, read_fsc_csv, read_summary

__all__ = [
    "LocalRefineViewer",
    "draw_fsc",
    "draw_resolution_per_iteration",
    "draw_pose_changes",
    "pose_changes",
    "write_report_png",
]


# ------------------------------------------------------------- drawing --
def draw_fsc(ax, fsc_csv) -> None:
    """FSC curves (unmasked, masked, corrected) against 1/resolution, 0.143 line."""
    table = read_fsc_csv(fsc_csv)
    res = np.asarray(table["resolution_A"], dtype=float)
    with np.errstate(divide="ignore"):
        freq = np.where(np.isfinite(res) & (res > 0), 1.0 / res, 0.0)
    for column, label in (
        ("fsc_unmasked", "unmasked"),
        ("fsc_masked", "masked"),
        ("fsc_corrected", "corrected"),
    ):
        ax.plot(freq, table[column], label=label)
    ax.axhline(
        FSC_THRESHOLD, color="k", lw=0.8, ls="--", label=f"FSC = {FSC_THRESHOLD}"
    )
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(loc="upper right", fontsize="small")


def draw_resolution_per_iteration(ax, summary_json) -> None:
    """Resolution (A) of each iteration from ``summary.json``."""
    its = iteration_history(read_summary(summary_json))
    x = [int(it.get("iteration", i + 1)) for i, it in enumerate(its)]
    y = [_resolution_of(it) for it in its]
    ax.plot(x, y, "o-")
    ax.set_xlabel("iteration")
    ax.set_ylabel("resolution (A)")
    ax.invert_yaxis()


def _resolution_of(item: dict) -> float:
    value = item.get("resolution_A")
    return float("nan") if value is None else float(value)


def pose_changes(input_star, output_star) -> tuple[np.ndarray, np.ndarray]:
    """Per-particle change from the consensus: rotation (deg) and shift (A)."""
    from .convert import StarParticles
    from .engine.geometry import euler_to_matrix, geodesic_angle_deg

    a, b = StarParticles(input_star), StarParticles(output_star)
    ra = euler_to_matrix(a.rot_deg, a.tilt_deg, a.psi_deg)
    rb = euler_to_matrix(b.rot_deg, b.tilt_deg, b.psi_deg)
    angle = np.asarray(geodesic_angle_deg(ra, rb), dtype=float)
    shift = np.linalg.norm(b.origin_px - a.origin_px, axis=1) * b.pixel_size_a
    return angle, shift


def draw_pose_changes(ax_rot, ax_shift, input_star, output_star) -> None:
    """Histograms of the rotation (deg) and shift (A) changes from the consensus."""
    angle, shift = pose_changes(input_star, output_star)
    ax_rot.hist(angle, bins=30)
    ax_rot.set_xlabel("rotation change from consensus (deg)")
    ax_rot.set_ylabel("particles")
    ax_shift.hist(shift, bins=30)
    ax_shift.set_xlabel("shift change from consensus (A)")
    ax_shift.set_ylabel("particles")


def write_report_png(refine_dir, png, *, input_star=None) -> Path:
    """One PNG with the FSC curves, resolution per iteration and pose changes.

    Parameters
    ----------
    refine_dir : str or Path
        Output folder of ``localrefine refine``.
    png : str or Path
        Image to write (atomically).
    input_star : str or Path, optional
        The refinement's input particles (consensus poses); without it the pose
        panels are left out.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    refine_dir = Path(refine_dir)
    panels = 4 if input_star else 2
    fig = Figure(figsize=(4.0 * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels)
    draw_fsc(axes[0], refine_dir / "fsc.csv")
    axes[0].set_title("FSC")
    draw_resolution_per_iteration(axes[1], refine_dir / "summary.json")
    axes[1].set_title("resolution per iteration")
    if input_star:
        draw_pose_changes(axes[2], axes[3], input_star, refine_dir / "particles.star")
        axes[2].set_title("rotation changes")
        axes[3].set_title("shift changes")
    png = Path(png)
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, png)
    return png


# -------------------------------------------------------------- viewer --
class LocalRefineViewer(EmProtocolViewer):
    """FSC curves, resolution per iteration, pose changes and maps of a local refinement."""

    _label = "viewer local refinement"
    _targets = [ProtLocalRefine]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("showFsc", params.LabelParam, label="FSC curves")
        form.addParam(
            "showResolution", params.LabelParam, label="Resolution per iteration"
        )
        form.addParam("showPoseChanges", params.LabelParam, label="Pose changes")
        form.addParam("showMap", params.LabelParam, label="Map and half maps")

    def _getVisualizeDict(self):
        return {
            "showFsc": self._showFsc,
            "showResolution": self._showResolution,
            "showPoseChanges": self._showPoseChanges,
            "showMap": self._showMap,
        }

    def _refineDir(self) -> Path:
        return Path(self.protocol._getExtraPath("refine"))

    def _showFsc(self, param=None):
        return [
            self._plot("FSC", lambda ax: draw_fsc(ax, self._refineDir() / "fsc.csv"))
        ]

    def _showResolution(self, param=None):
        return [
            self._plot(
                "Resolution per iteration",
                lambda ax: draw_resolution_per_iteration(
                    ax, self._refineDir() / "summary.json"
                ),
            )
        ]

    def _showPoseChanges(self, param=None):
        plotter = EmPlotter(x=1, y=2, windowTitle="Pose changes")
        ax1 = plotter.createSubPlot("Rotation", "deg", "particles")
        ax2 = plotter.createSubPlot("Shift", "A", "particles")
        draw_pose_changes(
            ax1,
            ax2,
            self.protocol._getExtraPath("input", "particles.star"),
            self._refineDir() / "particles.star",
        )
        return [plotter]

    def _showMap(self, param=None):
        vol = getattr(self.protocol, "outputVolume", None)
        if vol is None:
            return []
        files = [vol.getFileName(), *list(vol.getHalfMaps(asList=True))]
        return [DataView(fn) for fn in files]

    def _plot(self, title, draw):
        plotter = EmPlotter(x=1, y=1, windowTitle=title)
        ax = plotter.createSubPlot(title, "", "")
        draw(ax)
        return plotter
