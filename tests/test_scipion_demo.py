"""``localrefine demo``: the workflow template runs headless to the end in a new project."""

from __future__ import annotations

import os
import re
import tempfile
import warnings

import pytest

from localrefine_plugin.cli.demo import prepare_scipion_environment

if not os.environ.get("SCIPION_USER_DATA"):
    prepare_scipion_environment(tempfile.mkdtemp(prefix="localrefine_scipion_"))

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import pwem.emlib.image.image_readers  # noqa: F401
    import pyworkflow as pw

from localrefine_plugin.cli import COMMANDS, entry_point  # noqa: E402
from localrefine_plugin.engine.mrc_io import read_map  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(
    not {"subtract", "refine", "mask", "demo"} <= set(COMMANDS),
    reason="needs localrefine subtract, refine, mask and demo",
)
def test_demo_runs_the_template_workflow_to_the_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo moves into the project folder
    rc = entry_point(
        ["demo", "--project-name", "localrefine_demo_test", "--n-particles", "80",
         "--box", "40", "--pixel-size", "4.5", "--max-iterations", "1"]
    )  # fmt: skip
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out + captured.err[-2000:]
    project_path = re.search(r"Scipion project: (\S+)", out).group(1)
    resolutions = re.findall(r"(before|after local refinement) ([0-9.]+) A", out)
    assert [r[0] for r in resolutions] == ["before", "after local refinement"], out
    for _, value in resolutions:
        assert 2 * 4.5 <= float(value) <= 40 * 4.5
    assert re.search(
        r"median angular error .*before [0-9.]+ deg, after [0-9.]+ deg", out, re.I
    )

    from pyworkflow.project import Manager

    pw.Config.setDomain("pwem")
    project = Manager().loadProject("localrefine_demo_test")
    try:
        assert os.path.samefile(project.path, project_path)
        runs = list(project.getRuns())
        names = sorted(r.getClassName() for r in runs)
        assert names == sorted(
            ["ProtLocalRefineImportParticles", "ProtImportVolumes", "ProtImportVolumes",
             "ProtLocalRefineCreateMask", "ProtLocalRefineSubtract", "ProtLocalRefine"]
        )  # fmt: skip
        assert all(r.isFinished() for r in runs)
        refine = next(r for r in runs if r.getClassName() == "ProtLocalRefine")
        assert refine.getObjLabel() == "local refinement"
        vol = refine.outputVolume
        assert read_map(vol.getFileName())[0].shape == (40, 40, 40)
        assert len(list(vol.getHalfMaps(asList=True))) == 2
        assert refine.outputParticles.getSize() == 80
        report = re.search(r"report: (\S+)", out).group(1)
        assert os.path.getsize(report) > 10_000
    finally:
        project.closeMapper()
