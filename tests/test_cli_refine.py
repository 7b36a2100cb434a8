"""``localrefine refine`` in-process: options, help, errors, and a small run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from localrefine_plugin.cli import build_parser, entry_point
from localrefine_plugin.cli.refine import options_from_args
from localrefine_plugin.engine import mrc_io
from localrefine_plugin.engine.refine_options import RefineOptions

from .test_refine import BOX, PIXEL_A, make_dataset

REQUIRED = ["--particles", "p.star", "--reference", "r.mrc", "--mask", "m.mrc"]


def parse(*extra: str):
    return build_parser().parse_args(["refine", *REQUIRED, "--output", "out", *extra])


def test_defaults_match_refine_options():
    opts = options_from_args(parse())
    assert opts == RefineOptions()
    args = parse()
    assert (
        args.device == "cpu" and args.continue_run is False and args.half_maps is None
    )


def test_every_option_reaches_refine_options():
    args = parse(
        "--shift-extent", "2.5", "--rotation-extent", "6", "--alignment-resolution", "0.75",
        "--shift-resolution", "0.5", "--fulcrum", "40,32,35", "--initial-lowpass", "10",
        "--max-iterations", "4", "--prior-sigma-rotation", "3", "--prior-sigma-shift", "2",
        "--dynamic-mask", "--dynamic-mask-threshold", "0.3", "--dynamic-mask-near", "4",
        "--dynamic-mask-far", "10", "--marginalize-top-k", "3", "--batch-size", "32",
        "--noise-particles", "5000", "--threads", "2", "--device", "auto", "--continue",
        "--half-maps", "h1.mrc", "h2.mrc",
    )  # fmt: skip
    opts = options_from_args(args)
    assert opts == RefineOptions(
        shift_extent_px=2.5,
        rotation_extent_deg=6.0,
        alignment_resolution_deg=0.75,
        shift_resolution_px=0.5,
        fulcrum=(40.0, 32.0, 35.0),
        initial_lowpass_a=10.0,
        max_iterations=4,
        prior_sigma_rotation_deg=3.0,
        prior_sigma_shift_a=2.0,
        dynamic_mask=True,
        dynamic_mask_threshold=0.3,
        dynamic_mask_near_a=4.0,
        dynamic_mask_far_a=10.0,
        marginalize_top_k=3,
        batch_size=32,
        noise_particles=5000,
        threads=2,
    )
    assert args.device == "auto" and args.continue_run is True
    assert args.half_maps == ["h1.mrc", "h2.mrc"]
    assert options_from_args(parse("--static-mask")).dynamic_mask is False
    assert options_from_args(parse("--fulcrum", "box")).fulcrum == "box"


def test_help_shows_defaults_and_units(capsys):
    with pytest.raises(SystemExit) as exc:
        entry_point(["refine", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for piece in (
        "--shift-extent PX", "pixels (default: 3.0)",
        "--rotation-extent DEG", "degrees (default: 10.0)",
        "--alignment-resolution DEG", "(default: 0.5)",
        "--fulcrum mask|box|X,Y,Z", "(default: mask)",
        "--initial-lowpass A|fsc", "Angstrom, or 'fsc'",
        "(default: 'fsc' when either is given, else 8)", "--input-fsc FSC",
        "--max-iterations N", "--prior-sigma-rotation DEG", "--prior-sigma-shift A",
        "--dynamic-mask", "--static-mask", "--device {auto,cpu,cuda}", "--threads N",
        "--continue", "--half-maps", "--marginalize-top-k K", "--batch-size N",
        "--dynamic-mask-near A", "--dynamic-mask-far A", "Example usage",
    ):  # fmt: skip
        assert piece in text, piece


def test_bad_fulcrum_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        entry_point(["refine", *REQUIRED, "--output", "o", "--fulcrum", "1,2"])
    assert exc.value.code == 2
    assert "fulcrum" in capsys.readouterr().err


def test_bad_values_exit_2_with_field_and_fix(tmp_path, capsys):
    code = entry_point(
        [
            "refine",
            *REQUIRED,
            "--output",
            str(tmp_path / "o"),
            "--rotation-extent",
            "0.2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "rotation_extent_deg" in err and "alignment resolution" in err and "Fix:" in err
    )
    assert not (tmp_path / "o").exists()


def test_missing_particle_file_exits_2_naming_it(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=10)
    missing = tmp_path / "nothere.star"
    code = entry_point(
        ["refine", "--particles", str(missing), "--reference", str(data["reference"]),
         "--mask", str(data["mask"]), "--output", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 2
    assert "nothere.star" in capsys.readouterr().err


def test_cuda_without_gpu_exits_2(tmp_path, capsys):
    pytest.importorskip("localrefine_plugin.kernels")
    try:
        from localrefine_plugin.kernels import get_score_fn

        get_score_fn()
        pytest.skip("a GPU is present")
    except (ImportError, RuntimeError, OSError):
        pass
    code = entry_point(
        ["refine", *REQUIRED, "--output", str(tmp_path / "o"), "--device", "cuda"]
    )
    assert code == 2
    assert "cuda" in capsys.readouterr().err


@pytest.mark.slow
def test_small_run_writes_consistent_outputs(tmp_path):
    data = make_dataset(tmp_path / "data", n=60, snr=2.0, perturb_deg=2.0, seed=3)
    out = tmp_path / "out"
    code = entry_point(
        ["refine", "--particles", str(data["star"]), "--reference", str(data["reference"]),
         "--mask", str(data["mask"]), "--output", str(out), "--rotation-extent", "3",
         "--alignment-resolution", "1.5", "--shift-extent", "1", "--shift-resolution", "0.5",
         "--max-iterations", "1", "--batch-size", "32", "--threads", "2"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_particles"] == 60 and summary["iterations"] == 2
    assert summary["options"]["threads"] == 2
    lines = (out / "fsc.csv").read_text().splitlines()[1:]
    table = np.array([[float(v) for v in ln.split(",")] for ln in lines])
    # the summary's resolution is where the corrected FSC crosses 0.143
    crossing = np.flatnonzero(table[1:, 4] < 0.143)
    assert crossing.size
    shell = crossing[0] + 1
    assert table[shell, 1] <= summary["resolution_A"] <= table[shell - 1, 1]
    half1, px = mrc_io.read_map(out / "half_map_1.mrc")
    half2, _ = mrc_io.read_map(out / "half_map_2.mrc")
    full, _ = mrc_io.read_map(out / "map.mrc")
    assert px == pytest.approx(PIXEL_A, rel=1e-4) and full.shape == (BOX,) * 3
    assert np.corrcoef(half1.ravel(), half2.ravel())[0, 1] > 0.5
    assert np.corrcoef(full.ravel(), (half1 + half2).ravel())[0, 1] > 0.9
