"""Scipion finds the plugin: protocols, protocols.conf, viewer, template, bibtex; no pycuda.

Fast (no protocol runs). ``TestScipionDiscovery`` also runs under Scipion's own
runner (checked below in a child process)::

    python -m pyworkflow.apps.pw_run_tests localrefine_plugin.tests.test_scipion_discovery
"""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import tempfile
import unittest
import warnings
from pathlib import Path

import numpy as np
import pytest

from localrefine_plugin.cli.demo import prepare_scipion_environment

if not os.environ.get("SCIPION_USER_DATA"):
    prepare_scipion_environment(tempfile.mkdtemp(prefix="localrefine_scipion_"))

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import pwem.emlib.image.image_readers  # noqa: F401
    import pyworkflow as pw
    from pyworkflow.viewer import DESKTOP_TKINTER

import localrefine_plugin  # noqa: E402
from localrefine_plugin.cli.demo import TEMPLATE_NAME, load_workflow_template  # noqa: E402

PLUGIN = "localrefine_plugin"
PROTOCOLS = {
    "ProtLocalRefine",
    "ProtLocalRefineCreateMask",
    "ProtLocalRefineImportParticles",
    "ProtLocalRefineSubtract",
}
PACKAGE_DIR = Path(localrefine_plugin.__file__).parent


def _domain():
    pw.Config.setDomain("pwem")
    domain = pw.Config.getDomain()
    domain.getPlugins()
    return domain


def _conf_protocols() -> set[str]:
    cp = configparser.ConfigParser()
    cp.optionxform = str
    cp.read(PACKAGE_DIR / "protocols.conf")
    found = set()

    def walk(items):
        for item in items:
            if item.get("tag") == "protocol":
                found.add(item["value"])
            walk(item.get("children", []))

    for menu in cp.options("PROTOCOLS"):
        walk(json.loads(cp.get("PROTOCOLS", menu)))
    return found


class TestScipionDiscovery(unittest.TestCase):
    def test_domain_lists_every_protocol_of_the_plugin(self):
        protocols = _domain().getProtocols()
        ours = {k for k, v in protocols.items() if v.__module__.startswith(PLUGIN)}
        self.assertEqual(ours, PROTOCOLS)
        for name in PROTOCOLS:
            self.assertEqual(protocols[name]._plugin.getName(), PLUGIN)
            self.assertTrue(protocols[name].getClassLabel().startswith(PLUGIN))

    def test_protocols_conf_names_exactly_the_discovered_protocols(self):
        self.assertEqual(_conf_protocols(), PROTOCOLS)

    def test_gui_protocol_tree_shows_every_protocol(self):
        domain = _domain()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import pyworkflow.gui.project.viewprotocols  # noqa: F401  (GUI import order)
            from pyworkflow.gui.project.viewprotocols_extra import ProtocolTreeConfig

        menus = ProtocolTreeConfig.load(domain, pw.Config.SCIPION_PROTOCOLS)
        shown = {}

        def walk(node, path):
            for child in node.childs:
                where = f"{path}/{child.text}"
                if child.value in PROTOCOLS and child.visible:
                    shown[child.value] = where
                walk(child, where)

        walk(menus["Protocols SPA"], "")
        self.assertEqual(set(shown), PROTOCOLS)
        self.assertTrue(shown["ProtLocalRefine"].startswith("/3D/Refine"))

    def test_plugin_class_name_path_version_bibtex_and_logo(self):
        _domain()
        plugin = localrefine_plugin._pluginInstance
        self.assertEqual(plugin.getName(), PLUGIN)
        self.assertEqual(Path(plugin.getPath()), PACKAGE_DIR)
        self.assertIn(localrefine_plugin.__version__, plugin.getSupportedVersions())
        with warnings.catch_warnings():  # bibtexparser trips pyparsing deprecations
            warnings.simplefilter("ignore", DeprecationWarning)
            keys = set(localrefine_plugin._bibtex.keys())
        self.assertEqual(
            keys, {"Punjani2017", "Punjani2020", "Scheres2012", "Chen2013"}
        )
        self.assertTrue(set(localrefine_plugin._references) <= keys)
        self.assertIn(
            "Ultramicroscopy", localrefine_plugin._bibtex["Chen2013"]["journal"]
        )
        logo = PACKAGE_DIR / localrefine_plugin._logo
        self.assertEqual(logo.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
        self.assertTrue(
            Path(localrefine_plugin.Plugin.getProgram()).name == "localrefine"
        )

    def test_viewer_is_found_for_the_local_refinement_protocol(self):
        domain = _domain()
        from localrefine_plugin.protocols import ProtLocalRefine

        viewers = domain.findViewers(ProtLocalRefine.getClassName(), DESKTOP_TKINTER)
        self.assertIn("LocalRefineViewer", [v.__name__ for v in viewers])

    def test_no_gpu_library_is_imported_by_protocols_or_viewers(self):
        _domain().getProtocols()
        import localrefine_plugin.viewers  # noqa: F401

        self.assertNotIn("pycuda", sys.modules)
        sources = [*(PACKAGE_DIR.parent / "protocols").glob("*.py")]
        sources += [PACKAGE_DIR / "viewers.py", PACKAGE_DIR / "convert.py"]
        for path in sources:
            self.assertNotIn("import pycuda", path.read_text(), path)

    def test_template_is_found_and_its_fields_parse(self):
        _domain()
        templates = localrefine_plugin._pluginInstance.getTemplates()
        self.assertEqual([t.name for t in templates], [TEMPLATE_NAME])
        t = templates[0]
        t.replaceEnvVariables()
        t.parseContent()
        aliases = {p.getAlias() for p in t.getParams().values()}
        self.assertTrue(
            {"particles", "map", "region", "apix", "max_iterations"} <= aliases
        )


# ----------------------------------------------------------- pytest only --
def test_filled_template_chains_import_mask_subtract_and_refine(tmp_path):
    domain = _domain()
    for name in ("p.star", "m.mrc", "r.mrc"):
        (tmp_path / name).write_text("x")
    values = {
        "particles": tmp_path / "p.star",
        "map": tmp_path / "m.mrc",
        "region": tmp_path / "r.mrc",
        "apix": 1.5,
        "max_iterations": 3,
    }
    protocols = load_workflow_template(values)
    classes = [p["object.className"] for p in protocols]
    assert classes == [
        "ProtLocalRefineImportParticles",
        "ProtImportVolumes",
        "ProtImportVolumes",
        "ProtLocalRefineCreateMask",
        "ProtLocalRefineSubtract",
        "ProtLocalRefine",
    ]
    assert all(c in domain.getProtocols() for c in classes)
    by_id = {p["object.id"]: p for p in protocols}
    assert by_id["2"]["starFile"] == str(tmp_path / "p.star")
    assert float(by_id["3"]["samplingRate"]) == 1.5 == float(by_id["4"]["samplingRate"])
    assert by_id["5"]["inputVolume"] == "4.outputVolume"
    assert by_id["6"]["inputParticles"] == "2.outputParticles"
    assert by_id["7"]["inputParticles"] == "6.outputParticles"
    assert by_id["7"]["inputMask"] == "5.outputMask"
    assert int(by_id["7"]["maxIterations"]) == 3
    skipped = load_workflow_template(values, subtract=False)
    assert "ProtLocalRefineSubtract" not in [p["object.className"] for p in skipped]
    assert skipped[-1]["inputParticles"] == "2.outputParticles"


def _write_refine_outputs(folder: Path, rng) -> tuple[Path, Path]:
    """Files like ``localrefine refine`` writes, with known content."""
    from localrefine_plugin.engine.star import StarBlock, StarDocument, write_star

    folder.mkdir(parents=True)
    n, box, apix = 40, 32, 2.0
    shells = np.arange(box // 2 + 1)
    res = np.where(shells > 0, box * apix / np.maximum(shells, 1), np.inf)
    fsc = 1.0 / (1.0 + np.exp((shells - 8.0) / 1.5))
    lines = ["shell,resolution_A,fsc_unmasked,fsc_masked,fsc_corrected"]
    lines += [
        f"{s},{r:.4f},{f * 0.9:.6f},{f:.6f},{f:.6f}"
        for s, r, f in zip(shells, res, fsc, strict=True)
    ]
    (folder / "fsc.csv").write_text("\n".join(lines) + "\n")
    per_it = [{"iteration": i + 1, "resolution_A": 9.0 - i} for i in range(3)]
    (folder / "summary.json").write_text(
        json.dumps({"resolution_A": 7.0, "per_iteration": per_it})
    )

    def star(path, rot, origin_a):
        optics = StarBlock("optics", columns={
            "rlnOpticsGroup": ["1"], "rlnImagePixelSize": [str(apix)], "rlnImageSize": [str(box)],
        })  # fmt: skip
        parts = StarBlock("particles", columns={
            "rlnImageName": [f"{i + 1}@s.mrcs" for i in range(n)],
            "rlnAngleRot": [f"{v:.6f}" for v in rot],
            "rlnAngleTilt": ["90.0"] * n,
            "rlnAnglePsi": ["0.0"] * n,
            "rlnOriginXAngst": [f"{v:.6f}" for v in origin_a],
            "rlnOriginYAngst": ["0.0"] * n,
        })  # fmt: skip
        write_star(path, StarDocument([optics, parts]))

    rot = rng.uniform(-180, 180, n)
    star(folder / "input.star", rot, np.zeros(n))
    change = rng.uniform(0, 4, n)
    star(folder / "particles.star", rot + change, np.full(n, 1.0))
    return folder / "input.star", folder / "particles.star"


def test_pose_changes_are_the_geodesic_angles_and_shift_lengths(tmp_path, rng):
    from localrefine_plugin.viewers import pose_changes

    a, b = _write_refine_outputs(tmp_path / "refine", rng)
    from localrefine_plugin.engine.star import read_star

    expected = np.abs(
        read_star(b)["particles"].column_as_float("rlnAngleRot")
        - read_star(a)["particles"].column_as_float("rlnAngleRot")
    )
    angle, shift = pose_changes(a, b)
    # rotations about z by different rot at tilt 90: the geodesic angle is the rot change
    np.testing.assert_allclose(angle, expected, atol=1e-4)
    np.testing.assert_allclose(shift, 1.0, atol=1e-6)


def test_report_plot_image_is_written(tmp_path, rng):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import matplotlib.image

    from localrefine_plugin.viewers import write_report_png

    a, _ = _write_refine_outputs(tmp_path / "refine", rng)
    png = write_report_png(tmp_path / "refine", tmp_path / "report.png", input_star=a)
    image = matplotlib.image.imread(png)
    assert image.shape[0] >= 300 and image.shape[1] >= 4 * 300
    assert float(image[..., :3].std()) > 0.05  # curves and bars, not a blank canvas
    assert not list(tmp_path.glob("*.tmp.png"))


def test_scipion_test_runner_finds_and_passes_the_plugin_tests(tmp_path):
    env = dict(os.environ)
    runner = [sys.executable, "-m", "pyworkflow.apps.pw_run_tests"]
    out = subprocess.run(
        [
            *runner,
            "localrefine_plugin.tests.test_scipion_discovery.TestScipionDiscovery",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "PASSED" in text and "run 7 tests" in text, text[-3000:]


@pytest.fixture
def display(monkeypatch):
    """An X display: the current one, or a private Xvfb started for the test."""
    import shutil

    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("no display and no Xvfb (apt-get install xvfb)")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            xvfb,
            "-displayfd",
            str(write_fd),
            "-screen",
            "0",
            "1280x1024x24",
            "-nolisten",
            "tcp",
        ],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        number = f.readline().strip()
    try:
        if not number:
            pytest.skip("Xvfb did not start")
        monkeypatch.setenv("DISPLAY", f":{number}")
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_local_refinement_form_opens_in_the_gui(display):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import pyworkflow.gui.project.viewprotocols  # noqa: F401  (import order of the GUI)
        from pyworkflow.gui.form import FormWindow
        from pyworkflow.project import Manager

    from localrefine_plugin.protocols import ProtLocalRefine

    _domain()
    manager = Manager()
    if manager.hasProject("localrefine_form_check"):
        manager.deleteProject("localrefine_form_check")
    project = manager.createProject("localrefine_form_check")
    prot = project.newProtocol(ProtLocalRefine)
    window = FormWindow("local refinement", prot, lambda *a, **k: None)
    try:
        window.root.update()
        for name in (
            "inputParticles",
            "rotationExtent",
            "shiftExtent",
            "fulcrum",
            "gpuList",
        ):
            assert name in window.widgetDict, name
    finally:
        window.root.destroy()
