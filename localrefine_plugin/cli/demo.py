"""Run the whole local refinement workflow in a headless Scipion project (simulated data).

Simulates a small flexible-domain dataset from the built-in model (no download,
no GPU), imports it into a new Scipion project, runs mask creation, signal
subtraction and local refinement as Scipion protocols, and prints the
resolution before and after and where the project and its outputs are.
Scipion's user folder and a default host configuration are created when missing.

Example usage:
    localrefine demo
    localrefine demo --n-particles 300 --project-name lr_demo --user-data ~/ScipionUserData
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["add_args", "main", "prepare_scipion_environment"]

log = logging.getLogger(__name__)

_HOSTS_CONF = """[localhost]
PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d %_(COMMAND)s
NAME = localhost
QUEUE_SYSTEM = False
"""


def prepare_scipion_environment(user_data=None, *, home=None) -> dict[str, str]:
    """Set the environment a headless Scipion project needs, before pyworkflow loads.

    Variables the caller already set are kept. Missing ones are set to:
    ``SCIPION_USER_DATA`` = ``user_data`` (default ``~/ScipionUserData``);
    ``SCIPION_HOME`` = ``home`` (default ``SCIPION_USER_DATA/localrefine_home``)
    holding ``config/hosts.conf`` (a ``[localhost]`` entry with ``mpirun``, no
    queue), which ``SCIPION_HOSTS`` names; ``SCIPION_DOMAIN`` = ``pwem``;
    ``SCIPION_PYTHON`` = this interpreter (protocols run in child processes that
    must import the plugin); ``SCIPION_TEST_NOSYNC`` = 1 (no dataset download).

    Parameters
    ----------
    user_data, home : str or Path, optional
        Folders (created when missing).

    Returns
    -------
    dict
        The variables this call set (name -> value).

    Notes
    -----
    pyworkflow reads these variables once, when it is first imported; call this
    before importing ``pyworkflow`` or ``pwem``.
    """
    if "pyworkflow" in sys.modules:
        log.debug("pyworkflow already imported; the environment may not take effect")
    env = os.environ
    set_now: dict[str, str] = {}

    def _set(name: str, value) -> None:
        if not env.get(name):
            env[name] = str(value)
            set_now[name] = str(value)

    _set("SCIPION_USER_DATA", Path(user_data or "~/ScipionUserData").expanduser())
    user = Path(env["SCIPION_USER_DATA"])
    user.mkdir(parents=True, exist_ok=True)
    _set("SCIPION_HOME", Path(home) if home else user / "localrefine_home")
    hosts = Path(env["SCIPION_HOME"]) / "config" / "hosts.conf"
    _set("SCIPION_HOSTS", hosts)
    hosts = Path(env["SCIPION_HOSTS"])
    if not hosts.is_file():
        hosts.parent.mkdir(parents=True, exist_ok=True)
        tmp = hosts.with_name(hosts.name + ".tmp")
        tmp.write_text(_HOSTS_CONF)
        os.replace(tmp, hosts)
        log.info("wrote a default Scipion host configuration: %s", hosts)
    _set("SCIPION_DOMAIN", "pwem")
    _set("SCIPION_PYTHON", sys.executable)
    _set("SCIPION_TEST_NOSYNC", "1")
    _set("SCIPION_NOTIFY", "False")
    return set_now


#: The workflow template the demo runs (``localrefine_plugin/templates``).
TEMPLATE_NAME = "local_refinement"

#: Object ids of the template's protocols.
_SUBTRACT_ID, _REFINE_ID = "6", "7"


def load_workflow_template(values: dict[str, object], *, subtract: bool = True) -> list:
    """The plugin's workflow template with its fields filled, as a list of protocol dicts.

    Parameters
    ----------
    values : dict
        Template field alias -> value (``particles``, ``map``, ``region``,
        ``apix``, ``soft_edge``, ``rotation_extent``, ``shift_extent``,
        ``initial_lowpass``, ``max_iterations``, ``threads``, ``prior_rotation``,
        ``prior_shift``). Paths must exist.
    subtract : bool
        Keep the signal subtraction step; without it the refinement takes the
        imported particles.
    """
    import pyworkflow as pw

    pw.Config.getDomain().getPlugins()
    import localrefine_plugin

    templates = [
        t
        for t in localrefine_plugin._pluginInstance.getTemplates()
        if t.name == TEMPLATE_NAME
    ]
    if not templates:
        raise FileNotFoundError(f"workflow template {TEMPLATE_NAME!r} not found")
    template = templates[0]
    template.replaceEnvVariables()
    template.parseContent()
    chatter = io.StringIO()  # pyworkflow prints each field it sets
    with contextlib.redirect_stdout(chatter):
        for alias, value in values.items():
            template.setParamValue(alias, str(value))
    log.debug("template fields: %s", chatter.getvalue().strip())
    for field in template.getParams().values():
        template.content[field.getIndex()] = str(field.getValue())
    protocols = json.loads("".join(template.content))
    if not subtract:
        protocols = [p for p in protocols if p["object.id"] != _SUBTRACT_ID]
        for p in protocols:
            if p["object.id"] == _REFINE_ID:
                p["inputParticles"] = "2.outputParticles"
    return protocols


def run_workflow(project, protocols: list) -> dict:
    """Load protocol dicts into ``project`` and run them in order, waiting for each.

    Returns
    -------
    dict
        Template object id -> the finished protocol (reloaded from the project).

    Raises
    ------
    RuntimeError
        A protocol did not finish (its name and last log lines in the message).
    """
    loaded = project.loadProtocols(jsonStr=json.dumps(protocols))
    done = {}
    for proto in protocols:
        prot = loaded[proto["object.id"]]
        # pyworkflow 3.11 ignores the label given to newProtocol: set it again
        prot.setObjLabel(proto.get("object.label") or prot.getClassLabel())
        project.saveProtocol(prot)
        label = prot.getObjLabel()
        errors = prot.validate()
        if errors:
            raise RuntimeError(f"protocol '{label}' is not valid: {'; '.join(errors)}")
        log.info("running protocol '%s'", label)
        project.launchProtocol(prot, wait=True)
        if not prot.isFinished():
            tail = "\n".join(prot.getLogsLastLines(20, logFile=1))
            raise RuntimeError(
                f"protocol '{label}' ended {prot.getStatus()}; last lines:\n{tail}"
            )
        done[proto["object.id"]] = prot
    return done


def run_demo_workflow(
    *,
    project_name: str,
    n_particles: int,
    box: int,
    pixel_size_a: float,
    max_iterations: int,
    seed: int,
    rotation_extent_deg: float = 8.0,
    shift_extent_px: float = 2.0,
    prior_sigma_rotation_deg: float = 3.0,
    prior_sigma_shift_a: float = 3.0,
    subtract: bool | None = None,
) -> dict:
    """Simulate a dataset, run the template workflow in a new Scipion project, evaluate.

    Returns a dict with ``project_path``, ``status``, ``resolution_before_a`` and
    ``resolution_after_a`` (map against the true region map, FSC 0.5, inside
    the mask), ``angle_error_before_deg`` / ``angle_error_after_deg`` (median,
    against the true region poses), ``gold_standard_resolution_a`` (the
    refinement's masked, corrected half-map FSC at 0.143) and ``outputs``.
    """
    import pyworkflow as pw

    pw.Config.setDomain("pwem")
    from pyworkflow.project import Manager

    from ..engine.models import builtin_model
    from ..engine.simulate import simulate_dataset
    from . import COMMANDS, entry_point

    if subtract is None:
        subtract = "subtract" in COMMANDS
        if not subtract:
            log.warning("localrefine subtract is not available: skipping subtraction")
    manager = Manager()
    if manager.hasProject(project_name):
        manager.deleteProject(project_name)
    project = manager.createProject(project_name)
    os.chdir(project.path)
    data_dir = Path(project.path) / "simulated"
    log.info(
        "simulating %d particles (box %d, %.2f A/px)", n_particles, box, pixel_size_a
    )
    data = simulate_dataset(
        builtin_model(seed=seed),
        output_dir=data_dir,
        n_particles=n_particles,
        box=box,
        pixel_size_a=pixel_size_a,
        snr=0.5,
        motion_rotation_deg=5.0,
        motion_shift_a=2.0,
        seed=seed,
    )
    protocols = load_workflow_template(
        {
            "particles": data.particles_star,
            "map": data.map,
            "region": data.region_map,
            "apix": pixel_size_a,
            "rotation_extent": rotation_extent_deg,
            "shift_extent": shift_extent_px,
            "prior_rotation": prior_sigma_rotation_deg,
            "prior_shift": prior_sigma_shift_a,
            "initial_lowpass": max(8.0, 3 * pixel_size_a),
            "max_iterations": max_iterations,
            "threads": 2,
        },
        subtract=subtract,
    )
    done = run_workflow(project, protocols)
    refine = done[_REFINE_ID]
    refine_dir = Path(refine._getExtraPath("refine"))
    mask = done["5"].outputMask.getFileName()

    # before: the consensus poses (reconstruction of the refinement's input particles)
    input_star = Path(refine._getExtraPath("input", "particles.star"))
    before_dir = Path(project.path) / "consensus_reconstruction"
    entry_point(
        ["reconstruct", "--particles", str(input_star), "--output", str(before_dir)]
    )
    before = _evaluate(input_star, data, mask, before_dir / "map.mrc")
    after = _evaluate(refine_dir / "particles.star", data, mask, refine_dir / "map.mrc")
    from ..protocols._common import read_summary, summary_resolution
    from ..viewers import write_report_png

    report = write_report_png(
        refine_dir, refine_dir / "report.png", input_star=input_star
    )
    halves = list(refine.outputVolume.getHalfMaps(asList=True))
    return {
        "project_path": project.path,
        "status": refine.getStatus(),
        "subtracted": subtract,
        "resolution_before_a": before.get("map_vs_truth_resolution_05_a"),
        "resolution_after_a": after.get("map_vs_truth_resolution_05_a"),
        "angle_error_before_deg": before["median_angle_error_deg"],
        "angle_error_after_deg": after["median_angle_error_deg"],
        "gold_standard_resolution_a": summary_resolution(
            read_summary(refine_dir / "summary.json")
        ),
        "outputs": {
            label: os.path.abspath(os.path.join(project.path, path))
            for label, path in (
                ("refined map", refine.outputVolume.getFileName()),
                ("half map 1", halves[0]),
                ("half map 2", halves[1]),
                ("refined particles (Scipion)", refine.outputParticles.getFileName()),
                ("refined particles (STAR)", str(refine_dir / "particles.star")),
                ("FSC curves", str(refine_dir / "fsc.csv")),
                ("report", str(report)),
            )
        },
    }


def _evaluate(particles_star, data, mask, map_path) -> dict:
    from argparse import Namespace

    from .evaluate import evaluate

    return evaluate(
        Namespace(
            particles=str(particles_star),
            truth=str(data.truth_star),
            mask=str(mask),
            map=str(map_path),
            truth_map=str(data.region_map),
            json=None,
        )
    )


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--project-name",
        default="localrefine_demo",
        help="Scipion project to create (replaced if it exists) (default: %(default)s)",
    )
    parser.add_argument(
        "--user-data",
        default=None,
        help="Scipion user folder when SCIPION_USER_DATA is unset "
        "(default: ~/ScipionUserData)",
    )
    parser.add_argument(
        "--n-particles",
        type=int,
        default=300,
        help="simulated particles (default: %(default)s)",
    )
    parser.add_argument(
        "--box", type=int, default=48, help="box size in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=3.5,
        help="pixel size in Angstrom; box x pixel size must hold the built-in "
        "model (>= 165 A) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-iterations",
        type=int,
        default=2,
        help="local refinement iterations at most (default: %(default)s)",
    )
    parser.add_argument(
        "--rotation-extent",
        type=float,
        default=8.0,
        help="rotation search extent in degrees (default: %(default)s)",
    )
    parser.add_argument(
        "--shift-extent",
        type=float,
        default=2.0,
        help="shift search extent in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="simulation seed (default: %(default)s)"
    )
    parser.add_argument(
        "--no-subtract",
        dest="subtract",
        action="store_false",
        default=None,
        help="skip the signal subtraction protocol",
    )


def main(args: argparse.Namespace) -> int:
    prepare_scipion_environment(args.user_data)
    t0 = time.time()
    result = run_demo_workflow(
        project_name=args.project_name,
        n_particles=args.n_particles,
        box=args.box,
        pixel_size_a=args.pixel_size,
        max_iterations=args.max_iterations,
        seed=args.seed,
        rotation_extent_deg=args.rotation_extent,
        shift_extent_px=args.shift_extent,
        subtract=args.subtract,
    )
    out = sys.stdout
    print(f"Scipion project: {result['project_path']}", file=out)
    print(
        "Region map vs truth (FSC 0.5, inside the mask): "
        f"before {_fmt(result['resolution_before_a'])}, "
        f"after local refinement {_fmt(result['resolution_after_a'])}",
        file=out,
    )
    print(
        "Median angular error of the region poses: "
        f"before {result['angle_error_before_deg']:.2f} deg, "
        f"after {result['angle_error_after_deg']:.2f} deg",
        file=out,
    )
    print(
        "Gold-standard resolution after refinement (masked, corrected, FSC 0.143): "
        f"{_fmt(result['gold_standard_resolution_a'])}",
        file=out,
    )
    for label, path in result["outputs"].items():
        print(f"  {label}: {path}", file=out)
    print(f"Done in {time.time() - t0:.0f} s.", file=out)
    return 0 if result["status"] == "finished" else 1


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f} A"
