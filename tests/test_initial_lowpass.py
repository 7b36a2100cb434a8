"""Initial low-pass from the input's FSC: ``--initial-lowpass fsc``, ``--input-fsc``."""

from __future__ import annotations

import numpy as np
import pytest

from localrefine_plugin.cli import build_parser, entry_point
from localrefine_plugin.cli.refine import options_from_args
from localrefine_plugin.engine import mrc_io
from localrefine_plugin.engine.errors import InputError
from localrefine_plugin.engine.fsc import compute_fsc, write_fsc_csv
from localrefine_plugin.engine.refine_inputs import load_inputs, resolve_initial_lowpass
from localrefine_plugin.engine.refine_options import RefineOptions

from .test_refine import PIXEL_A, make_dataset

REQUIRED = ["--particles", "p.star", "--reference", "r.mrc", "--mask", "m.mrc"]


def parse(*extra: str):
    return build_parser().parse_args(["refine", *REQUIRED, "--output", "out", *extra])


def test_default_lowpass_is_8_a_without_and_fsc_with_an_fsc_source():
    assert options_from_args(parse()).initial_lowpass_a == 8.0
    assert options_from_args(parse("--half-maps", "a", "b")).initial_lowpass_a == "fsc"
    assert options_from_args(parse("--input-fsc", "f.csv")).initial_lowpass_a == "fsc"
    assert (
        options_from_args(parse("--initial-lowpass", "FSC")).initial_lowpass_a == "fsc"
    )
    given = parse("--half-maps", "a", "b", "--initial-lowpass", "12")
    assert options_from_args(given).initial_lowpass_a == 12.0


def test_a_word_other_than_fsc_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse("--initial-lowpass", "auto")
    assert exc.value.code == 2
    assert "'fsc'" in capsys.readouterr().err


def test_fsc_without_a_source_fails_before_work(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=10)
    out = tmp_path / "o"
    code = entry_point(
        ["refine", "--particles", str(data["star"]), "--reference", str(data["reference"]),
         "--mask", str(data["mask"]), "--output", str(out), "--initial-lowpass", "fsc"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "--input-fsc" in err and "--half-maps" in err
    assert not (out / "summary.json").exists()


def test_a_missing_fsc_file_fails_naming_it(tmp_path):
    data = make_dataset(tmp_path / "data", n=10)
    with pytest.raises(InputError, match="nothere.csv"):
        load_inputs(
            data["star"],
            data["reference"],
            data["mask"],
            input_fsc=tmp_path / "nothere.csv",
            options=RefineOptions(initial_lowpass_a="fsc"),
        )


@pytest.fixture(scope="module")
def noisy_halves(tmp_path_factory):
    """A dataset and two noisy half maps of its reference (known, finite resolution)."""
    folder = tmp_path_factory.mktemp("lowpass")
    data = make_dataset(folder / "data", n=10)
    ref, px = mrc_io.read_map(data["reference"])
    rng = np.random.default_rng(4)
    sd = 0.5 * float(ref.std())
    halves = [ref + rng.normal(0, sd, ref.shape).astype(np.float32) for _ in range(2)]
    paths = [folder / "h1.mrc", folder / "h2.mrc"]
    for path, vol in zip(paths, halves, strict=True):
        mrc_io.write_map(path, vol, px)
    return data, paths, halves


def test_fsc_from_half_maps_is_their_masked_corrected_resolution(noisy_halves):
    data, paths, halves = noisy_halves
    options = RefineOptions(initial_lowpass_a="fsc", seed=3)
    inputs = load_inputs(
        data["star"], data["reference"], data["mask"], half_maps=paths, options=options
    )
    resolved = resolve_initial_lowpass(options, inputs)
    expected = compute_fsc(
        halves[0], halves[1], mask=inputs.mask, pixel_size_a=PIXEL_A, seed=3
    ).resolution_0143
    assert expected.crossed  # the test needs a finite resolution
    assert resolved.initial_lowpass_a == pytest.approx(expected.value_a)
    assert 2 * PIXEL_A < resolved.initial_lowpass_a < 40
    # everything else is unchanged; a number passes through as a float
    assert resolved == RefineOptions(initial_lowpass_a=expected.value_a, seed=3)
    kept = resolve_initial_lowpass(RefineOptions(initial_lowpass_a=12), inputs)
    assert kept.initial_lowpass_a == 12.0


def test_an_fsc_file_wins_over_the_half_maps(noisy_halves, tmp_path):
    data, paths, halves = noisy_halves
    # a curve of another resolution than the half maps'
    other = compute_fsc(halves[0], 0.3 * halves[0] + halves[1], pixel_size_a=PIXEL_A)
    write_fsc_csv(tmp_path / "fsc.csv", other)
    options = RefineOptions(initial_lowpass_a="fsc")
    inputs = load_inputs(
        data["star"],
        data["reference"],
        data["mask"],
        half_maps=paths,
        input_fsc=tmp_path / "fsc.csv",
        options=options,
    )
    resolved = resolve_initial_lowpass(options, inputs)
    assert resolved.initial_lowpass_a == pytest.approx(
        other.resolution_0143.value_a, rel=1e-3
    )
    from_halves = resolve_initial_lowpass(
        options,
        load_inputs(
            data["star"],
            data["reference"],
            data["mask"],
            half_maps=paths,
            options=options,
        ),
    )
    assert abs(from_halves.initial_lowpass_a / resolved.initial_lowpass_a - 1) > 0.05
