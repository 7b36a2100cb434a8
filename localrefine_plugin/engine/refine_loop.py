"""The iterations of a local refinement and the state carried between them.

:class:`RefinementLoop` runs the gold-standard iterations described in
:mod:`.refine` from a fresh start or from the last checkpoint, decides when to
stop, and writes the final outputs. Everything is deterministic (fixed batch
order, seeded FSC randomisation), so a continued run equals an uninterrupted one.

Under MPI every rank runs this loop on identical state (the steps sum their
partial results over the ranks, :mod:`.parallel`); only rank 0 writes
checkpoints and outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import reconstruct
from . import refine_steps as steps
from .checkpoint import (
    Checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .errors import InputError
from .filters import lowpass
from .geometry import geodesic_angle_deg, matrix_to_euler
from .parallel import SerialComm
from .refine_inputs import RefineInputs, fulcrum_px
from .refine_outputs import write_outputs

__all__ = ["RefineResult", "RefinementLoop", "PATIENCE"]

log = logging.getLogger(__name__)

#: Iterations without a better resolution before stopping.
PATIENCE = 2


@dataclass
class RefineResult:
    """What a run produced.

    Attributes
    ----------
    resolution_a : float
        Final masked, corrected FSC resolution (Angstrom, at 0.143).
    iterations : int
        Iterations completed, the final full-resolution pass included.
    n_particles : int
    output_dir : Path
    summary : dict
        Contents of ``summary.json`` (empty when stopped early).
    complete : bool
        False when the run stopped at ``stop_after_iteration``.
    """

    resolution_a: float
    iterations: int
    n_particles: int
    output_dir: Path
    summary: dict
    complete: bool = True


#: A particle whose rotation from its consensus pose is at least this fraction of
#: the rotation extent is "at the edge" (a uniform spread over the extent's ball
#: puts 1 - 0.97^3 = 8.7 % of particles there) ...
EDGE_FRACTION_OF_EXTENT = 0.97
#: ... and more than this fraction of particles at the edge is logged as a warning.
EDGE_WARNING_FRACTION = 0.3


def _fraction_at_extent(from_consensus_deg: np.ndarray, extent_deg: float) -> float:
    """Fraction of particles rotated at least 97 % of the extent (degrees) away."""
    if extent_deg <= 0 or from_consensus_deg.size == 0:
        return 0.0
    edge = from_consensus_deg >= EDGE_FRACTION_OF_EXTENT * extent_deg
    return float(np.mean(edge))


def _radius_px(resolution_a: float, box: int, pixel_size_a: float) -> float:
    """Fourier radius (cycles per box) of a resolution, at most Nyquist."""
    return float(min(box // 2, box * pixel_size_a / resolution_a))


class RefinementLoop:
    """One refinement: the state between iterations and the loop over them."""

    def __init__(
        self, inputs: RefineInputs, options, backend, output_dir, started, comm=None
    ) -> None:
        self.comm = SerialComm() if comm is None else comm
        self.inputs = inputs
        self.options = options
        self.backend = backend
        self.output_dir = output_dir
        self.started = started
        p = inputs.particles
        self.consensus_rotations = p.matrices()
        self.consensus_origins = np.asarray(p.origin_px, dtype=np.float64)
        self.fulcrum = fulcrum_px(options.fulcrum, inputs.mask)
        self.fingerprint = inputs.fingerprint()

    # -- state ------------------------------------------------------------------
    def _initial(self) -> Checkpoint:
        inp, opt = self.inputs, self.options
        starts = inp.half_maps if inp.half_maps is not None else [inp.reference] * 2
        refs = np.stack(
            [lowpass(v, inp.pixel_size_a, opt.initial_lowpass_a) for v in starts]
        ).astype(np.float32)
        log.info(
            "initial references: %s low-passed to %.2f A; fulcrum (x, y, z) = "
            "(%.2f, %.2f, %.2f) px from the box centre",
            "half maps" if inp.half_maps is not None else "reference",
            opt.initial_lowpass_a,
            *self.fulcrum,
        )
        sigma2 = steps.estimate_noise(
            inp.particles,
            refs * inp.mask,
            rotations=self.consensus_rotations,
            origins_px=self.consensus_origins,
            options=opt,
            comm=self.comm,
            backend=self.backend,
        )
        return Checkpoint(
            iteration=0,
            rotations=self.consensus_rotations.copy(),
            origins_px=self.consensus_origins.copy(),
            half_maps=refs,
            sigma2=sigma2,
            mask=inp.mask,
            state={
                "r_max_px": _radius_px(
                    opt.initial_lowpass_a, inp.box, inp.pixel_size_a
                ),
                "best_resolution_a": None,
                "stalled": 0,
                "phase": "iterating",
                "history": [],
                "wall_seconds": 0.0,
                "fingerprint": self.fingerprint,
                "options": opt.to_dict(),
            },
        )

    def _resume(self) -> Checkpoint | None:
        ckpt = load_latest_checkpoint(self.output_dir)
        found = self.comm.allgather(None if ckpt is None else ckpt.iteration)
        if len(set(found)) > 1:
            raise InputError(
                self.output_dir,
                f"the ranks found different last checkpoints {found}",
                "give every rank the same output directory (a shared file system)",
            )
        if ckpt is None:
            log.warning(
                "--continue: no checkpoint in %s; starting from the beginning",
                self.output_dir,
            )
            return None
        if ckpt.state.get("fingerprint") != self.fingerprint:
            raise InputError(
                self.output_dir,
                "the checkpoints were made from different particles, reference or mask",
                "continue with the same inputs, or start in a new output directory",
            )
        if ckpt.state.get("options") != self.options.to_dict():
            raise InputError(
                self.output_dir,
                f"the checkpoints were made with other options {ckpt.state.get('options')}",
                "continue with the same options, or start in a new output directory",
            )
        log.info(
            "continuing after iteration %d (%s)", ckpt.iteration, ckpt.state["phase"]
        )
        return ckpt

    # -- loop -------------------------------------------------------------------
    def run(self, continue_run: bool, stop_after_iteration: int | None) -> RefineResult:
        ckpt = self._resume() if continue_run else None
        if ckpt is None:
            ckpt = self._initial()
        while ckpt.state["phase"] != "done":
            final = ckpt.state["phase"] == "final"
            ckpt = self._iteration(ckpt, final=final)
            if final:
                ckpt.state["phase"] = "done"
            else:
                reason = self._converged(ckpt)
                if reason:
                    last = ckpt.state["history"][-1]
                    if last["alignment_radius_px"] >= self.inputs.box // 2:
                        # this iteration already aligned to Nyquist: it is the final pass
                        log.info("converged (%s) at full resolution", reason)
                        last["final"] = True
                        ckpt.state["phase"] = "done"
                    else:
                        log.info(
                            "converged (%s); final pass at full resolution", reason
                        )
                        ckpt.state["phase"] = "final"
                        ckpt.state["r_max_px"] = float(self.inputs.box // 2)
            ckpt.state["wall_seconds"] += time.monotonic() - self.started
            self.started = time.monotonic()
            if self.comm.is_root:
                save_checkpoint(self.output_dir, ckpt)
                prune_checkpoints(self.output_dir, keep=2)
            if (
                stop_after_iteration is not None
                and ckpt.iteration >= stop_after_iteration
            ):
                if ckpt.state["phase"] != "done":
                    log.info("stopping after iteration %d as asked", ckpt.iteration)
                    return RefineResult(
                        float("nan"),
                        ckpt.iteration,
                        self.inputs.particles.n,
                        self.output_dir,
                        {},
                        complete=False,
                    )
        return self._finish(ckpt)

    def _converged(self, ckpt: Checkpoint) -> str | None:
        """Why iterating should stop after ``ckpt``, or None to go on."""
        last = ckpt.state["history"][-1]
        if ckpt.iteration >= self.options.max_iterations:
            return "max_iterations reached"
        if ckpt.state["stalled"] >= PATIENCE:
            return f"no better resolution for {PATIENCE} iterations"
        if (
            ckpt.iteration > 1
            and last["median_rotation_change_deg"] < 1e-6
            and last["median_shift_change_a"] < 1e-6
        ):
            return "poses unchanged"
        return None

    def _iteration(self, prev: Checkpoint, *, final: bool) -> Checkpoint:
        inp, opt = self.inputs, self.options
        it = prev.iteration + 1
        r_max = float(prev.state["r_max_px"])
        t0 = time.monotonic()
        label = f"iteration {it}" + (" (final)" if final else "")
        log.info(
            "%s: aligning to %.2f A (radius %.1f px)",
            label,
            inp.box * inp.pixel_size_a / r_max,
            r_max,
        )
        refs = (prev.half_maps * prev.mask).astype(np.float32)  # masked references
        # filled during the alignment pass: the reconstruction reads no images
        accumulators = reconstruct.half_set_accumulators(
            inp.box, backprojector=self.backend.backprojector
        )
        aligned = steps.align_particles(
            inp.particles,
            refs,
            prev.sigma2,
            consensus_rotations=self.consensus_rotations,
            consensus_origins_px=self.consensus_origins,
            fulcrum_px=self.fulcrum,
            options=opt,
            r_max_px=r_max,
            score_fn=self.backend.score_fn,
            power_fn=self.backend.power_fn,
            label=label,
            signal_radius_px=steps.signal_radius_px(prev.mask, self.fulcrum),
            comm=self.comm,
            accumulators=accumulators,
        )
        t_aligned = time.monotonic()
        rec = steps.reconstruct_and_compare(
            accumulators, prev.mask, pixel_size_a=inp.pixel_size_a, options=opt,
            comm=self.comm,
        )  # fmt: skip
        halves, full = rec.halves, rec.full
        res = rec.fsc.resolution_0143
        t_reconstructed = time.monotonic()
        mask = prev.mask
        if opt.dynamic_mask:
            mask = steps.dynamic_mask(
                full,
                inp.mask,
                inp.pixel_size_a,
                threshold_fraction=opt.dynamic_mask_threshold,
                near_a=opt.dynamic_mask_near_a,
                far_a=opt.dynamic_mask_far_a,
            )
        noise_timings: dict = {}
        sigma2 = steps.estimate_noise(
            inp.particles,
            halves * mask,
            rotations=aligned.rotations,
            origins_px=aligned.origins_px,
            options=opt,
            comm=self.comm,
            backend=self.backend,
            timings=noise_timings,
        )
        rot_change = geodesic_angle_deg(aligned.rotations, prev.rotations)
        shift_change = np.linalg.norm(aligned.origins_px - prev.origins_px, axis=1)
        from_consensus = geodesic_angle_deg(aligned.rotations, self.consensus_rotations)
        at_edge = _fraction_at_extent(from_consensus, opt.rotation_extent_deg)
        t_end = time.monotonic()
        record = {
            "iteration": it,
            "final": final,
            "alignment_radius_px": r_max,
            "alignment_limit_a": inp.box * inp.pixel_size_a / r_max,
            "resolution_A": res.value_a,
            "resolution_crossed": res.crossed,
            "median_rotation_change_deg": float(np.median(rot_change)),
            "median_shift_change_a": float(np.median(shift_change) * inp.pixel_size_a),
            "median_rotation_from_consensus_deg": float(np.median(from_consensus)),
            "fraction_at_rotation_extent": at_edge,
            "poses_evaluated_per_particle": float(np.mean(aligned.poses_evaluated)),
            "seconds": t_end - t0,
            # where the time went: the pass over the images that aligns and
            # inserts, the maps and FSC from the accumulators, the noise pass
            # (with the dynamic mask, when on)
            "seconds_alignment": t_aligned - t0,
            "seconds_alignment_setup": aligned.seconds_setup,  # references' transforms
            "seconds_reconstruction": t_reconstructed - t_aligned,
            "seconds_noise": t_end - t_reconstructed,
            "seconds_noise_setup": noise_timings["setup"],  # references' transforms
        }
        state = dict(prev.state)
        state["history"] = [*prev.state["history"], record]
        best = state["best_resolution_a"]
        if not final:
            if best is None or res.value_a < best * (1.0 - 1e-3):
                state["best_resolution_a"] = res.value_a
                state["stalled"] = 0
            else:
                state["stalled"] += 1
            state["r_max_px"] = _radius_px(res.value_a, inp.box, inp.pixel_size_a)
        log.info(
            "%s: resolution %s, median pose change %.3f deg / %.3f A, "
            "%.2f deg from consensus, %.0f poses/particle, %.1f s (alignment and "
            "insertion %.1f s, maps and FSC %.1f s, noise %.1f s)",
            label,
            res,
            record["median_rotation_change_deg"],
            record["median_shift_change_a"],
            record["median_rotation_from_consensus_deg"],
            record["poses_evaluated_per_particle"],
            record["seconds"],
            record["seconds_alignment"],
            record["seconds_reconstruction"],
            record["seconds_noise"],
        )
        if at_edge > EDGE_WARNING_FRACTION:
            log.warning(
                "%s: %.0f%% of the particles ended at the edge of the rotation extent "
                "(within %.0f%% of %g deg from their consensus pose): the data do not "
                "pin the region's pose at this resolution (the search fits noise), or "
                "the region moves further than the extent. Fix: add priors "
                "(--prior-sigma-rotation 3 --prior-sigma-shift 2), or widen "
                "--rotation-extent if the region truly moves that much",
                label,
                100 * at_edge,
                100 * (1 - EDGE_FRACTION_OF_EXTENT),
                opt.rotation_extent_deg,
            )
        return Checkpoint(
            iteration=it,
            rotations=aligned.rotations,
            origins_px=aligned.origins_px,
            half_maps=halves,
            sigma2=sigma2,
            mask=mask,
            state=state,
            arrays={
                "full_map": full,
                "fsc_mask": prev.mask,
                "raw_halves": rec.raw_halves,
            },
        )

    def _with_poses(self, rotations: np.ndarray, origins_px: np.ndarray):
        rot, tilt, psi = matrix_to_euler(rotations)
        return self.inputs.particles.with_poses(rot, tilt, psi, origins_px)

    def _finish(self, ckpt: Checkpoint) -> RefineResult:
        inp, opt = self.inputs, self.options
        from .fsc import compute_fsc

        fsc_mask = ckpt.arrays.get("fsc_mask", ckpt.mask)
        raw = ckpt.arrays["raw_halves"]
        fsc = compute_fsc(
            raw[0],
            raw[1],
            mask=fsc_mask,
            pixel_size_a=inp.pixel_size_a,
            seed=opt.seed,
        )
        history = ckpt.state["history"]
        summary = {
            "resolution_A": fsc.resolution_0143.value_a,
            "resolution_crossed": fsc.resolution_0143.crossed,
            "resolution_05_A": fsc.resolution_05.value_a,
            "iterations": ckpt.iteration,
            "n_particles": inp.particles.n,
            "wall_seconds": ckpt.state["wall_seconds"],
            "poses_evaluated_per_particle": float(
                np.mean([h["poses_evaluated_per_particle"] for h in history])
            ),
            "per_iteration": history,
            "options": opt.to_dict(),
            "device": self.backend.name,
            # particles per batch (options' 0 = automatic: by device and box)
            "batch_size": opt.batch_size_for(inp.box, gpu=self.backend.name == "cuda"),
            "mpi_ranks": self.comm.size,
            "fulcrum_px": [float(v) for v in self.fulcrum],
            "box": inp.box,
            "pixel_size_a": inp.pixel_size_a,
            "inputs": inp.sources,
        }
        if self.comm.is_root:
            write_outputs(
                self.output_dir,
                particles=self._with_poses(ckpt.rotations, ckpt.origins_px),
                half_maps=ckpt.half_maps,
                full_map=ckpt.arrays["full_map"],
                fsc_result=fsc,
                pixel_size_a=inp.pixel_size_a,
                summary=summary,
            )
        self.comm.barrier()  # every rank returns once the outputs are complete
        log.info(
            "local refinement finished: %s after %d iterations (%d particles, %.1f s)",
            fsc.resolution_0143,
            ckpt.iteration,
            inp.particles.n,
            ckpt.state["wall_seconds"],
        )
        return RefineResult(
            fsc.resolution_0143.value_a,
            ckpt.iteration,
            inp.particles.n,
            self.output_dir,
            summary,
        )
