"""The local refinement driver: gold-standard iterations around consensus poses.

Algorithm (cryoSPARC's published local refinement; ``docs/local_refinement.md``):

1. Check every input before any work (:mod:`.refine_inputs`).
2. Half set ``h`` (``rlnRandomSubset``) starts from the input reference (or
   its own half map) low-passed to ``initial_lowpass_a``; the Fourier radius for
   alignment starts at that resolution.
3. Each iteration: mask the two half references with the (soft) mask, search
   every particle near its **consensus** pose (:func:`.search.local_search`;
   the extents bound the change from the input pose, not per iteration),
   reconstruct the halves at the new poses, compute their masked, corrected
   FSC; the resolution at 0.143 sets the next Fourier radius; sigma^2 per
   optics group is re-estimated; the dynamic mask (optional) is recomputed.
4. Stop when the resolution has not improved for 2 iterations, when the
   poses no longer change (median change 0), or after ``max_iterations``; then
   one final pass aligns to Nyquist (skipped when the last iteration already
   did: its FSC never fell below 0.143 before Nyquist).
5. Write the outputs atomically (:mod:`.refine_outputs`), ``summary.json`` last.

Every completed iteration is saved (:mod:`.checkpoint`); ``continue_run``
resumes from the last one and reproduces the uninterrupted result.

``mpirun -np K`` runs K ranks that share the particles and sum their partial
results each step (:mod:`.parallel`); rank 0 writes the log file, the
checkpoints and the outputs; each rank uses its own GPU.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

from .checkpoint import list_checkpoints
from .errors import InputError
from .parallel import assign_gpu, get_comm
from .refine_device import select_backend
from .refine_inputs import load_inputs, resolve_initial_lowpass
from .refine_loop import RefinementLoop, RefineResult
from .refine_options import RefineOptions
from .refine_outputs import remove_outputs

__all__ = ["RefineOptions", "RefineResult", "run_local_refinement", "LOG_NAME"]

log = logging.getLogger(__name__)

#: The run's log file inside the output directory.
LOG_NAME = "refine.log"


class _LogToFile:
    """Copy the package's log records (INFO and up) into ``DIR/refine.log``."""

    def __init__(self, path: Path) -> None:
        self.logger = logging.getLogger("localrefine_plugin")
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"
            )
        )

    def __enter__(self):
        self.old_level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
        self.logger.setLevel(self.old_level)


def _prepare_output_dir(output_dir: Path, continue_run: bool) -> None:
    has_run = (
        bool(list_checkpoints(output_dir)) or (output_dir / "summary.json").exists()
    )
    if has_run and not continue_run:
        raise InputError(
            output_dir,
            "the output directory already holds a refinement (checkpoints or summary.json)",
            "add --continue to resume it, or choose a new output directory",
        )
    output_dir.mkdir(parents=True, exist_ok=True)


def run_local_refinement(
    particles,
    reference,
    mask,
    *,
    output_dir,
    options: RefineOptions | None = None,
    device: str = "cpu",
    half_maps=None,
    input_fsc=None,
    continue_run: bool = False,
    stop_after_iteration: int | None = None,
    comm=None,
) -> RefineResult:
    """Refine particle poses locally around their consensus poses (gold standard).

    Parameters
    ----------
    particles : str, Path or Particles
        RELION STAR file (or a read set) with consensus poses and half sets.
    reference, mask : str or Path
        MRC maps on the particles' grid: the consensus map and a soft mask (0-1)
        around the region.
    output_dir : str or Path
        Outputs, log and checkpoints (see :mod:`.refine_outputs`).
    options : RefineOptions, optional
        Defaults: :class:`RefineOptions` ().
    device : {"cpu", "auto", "cuda"}
        Scoring backend (:func:`.refine_device.select_backend`).
    half_maps : pair of str or Path, optional
        Initial references of half sets 1 and 2 instead of the reference.
    input_fsc : str or Path, optional
        The input's FSC curve (``fsc.csv``, ``postprocess.star``,
        ``run_model.star``) for ``options.initial_lowpass_a == "fsc"``.
    continue_run : bool
        Resume from the last complete iteration saved in ``output_dir``.
    stop_after_iteration : int, optional
        Stop (without final outputs) once this iteration is saved: a test hook
        standing for a killed run.
    comm : SerialComm or MpiComm, optional
        The ranks of this run (:mod:`.parallel`); default
        :func:`.parallel.get_comm` (MPI when started by ``mpirun``).

    Returns
    -------
    RefineResult

    Raises
    ------
    InputError
        For any bad input, before work starts.
    """
    started = time.monotonic()
    options = RefineOptions() if options is None else options
    options.validate()
    comm = get_comm() if comm is None else comm
    if device != "cpu":
        assign_gpu(comm)
    backend = select_backend(device)
    output_dir = Path(output_dir)
    _prepare_output_dir(output_dir, continue_run)
    comm.barrier()  # every rank has checked the directory before rank 0 clears it
    log_file = _LogToFile(output_dir / LOG_NAME) if comm.is_root else nullcontext()
    with log_file:
        if comm.size > 1:
            log.info("MPI: %d ranks; this is rank %d", comm.size, comm.rank)
        inputs = load_inputs(
            particles,
            reference,
            mask,
            half_maps=half_maps,
            input_fsc=input_fsc,
            options=options,
        )
        options = resolve_initial_lowpass(options, inputs)
        if comm.is_root:
            remove_outputs(output_dir)
        loop = RefinementLoop(inputs, options, backend, output_dir, started, comm)
        try:
            return loop.run(continue_run, stop_after_iteration)
        except Exception:
            if comm.size > 1:  # the other ranks would wait for this one forever
                log.exception("rank %d failed; stopping every rank", comm.rank)
                comm.abort(1)
            raise
