"""STAR document model: lossless round trips, syntax corners, errors, RELION reads it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from localrefine_plugin.engine.errors import InputError
from localrefine_plugin.engine.star import (
    StarBlock,
    StarDocument,
    read_star,
    star_text,
    write_star,
)

DATA = Path(__file__).parent / "data"
SAMPLE_31 = DATA / "relion31_particles.star"


def _tokens_by_block(path: Path) -> dict[str, list[list[str]]]:
    """Independent reader for the sample: whitespace tokens of each block's lines."""
    blocks: dict[str, list[list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("data_"):
            current = blocks.setdefault(line[5:], [])
        elif not line.startswith(("_", "loop_")):
            current.append(line.split())
    return blocks


def test_relion31_round_trip_is_lossless(tmp_path):
    doc = read_star(SAMPLE_31)
    assert doc.names == ["optics", "particles", "notes"]
    particles = doc["particles"]
    assert particles.n_rows == 4 and len(particles.columns) == 26
    # values are the file's tokens, verbatim (independent whitespace split)
    truth = _tokens_by_block(SAMPLE_31)
    assert particles.rows() == truth["particles"]
    assert doc["optics"].rows() == truth["optics"]
    assert doc["notes"].pairs == {
        "rlnComment": "written by hand for localrefine tests",
        "rlnCurrentIteration": "25",
    }
    out = tmp_path / "copy.star"
    write_star(out, doc)
    again = read_star(out)
    assert again == doc  # every block, column name, order and string value
    assert again["particles"].column("rlnLogLikeliContribution") == [
        "1.137632e+05",
        "1.137998e+05",
        "1.136512e+05",
        "1.137201e+05",
    ]
    # writing is deterministic: a second round trip gives the same text
    out2 = tmp_path / "copy2.star"
    write_star(out2, again)
    assert out2.read_text() == out.read_text()
    assert out.read_text().count("# version 30001") == 3


def test_typed_access_matches_text():
    block = read_star(SAMPLE_31)["particles"]
    np.testing.assert_array_equal(
        block.column_as_float("rlnOriginXAngst"), [3.54, -0.885, 0.0, -2.655]
    )
    np.testing.assert_array_equal(block.column_as_int("rlnRandomSubset"), [1, 2, 1, 2])
    assert block.column_as_int("rlnRandomSubset").dtype == np.int64
    assert read_star(SAMPLE_31)["notes"].value_as_float("rlnCurrentIteration") == 25.0


def test_set_add_and_remove_columns():
    block = StarBlock("particles", columns={"rlnA": ["1", "2", "3"]})
    block.set_column("rlnB", np.array([0.5, -1.25, 2.0]))
    block.set_column("rlnC", np.array([1, 2, 3]))
    block.set_column("rlnA", ["x", "y", "z"])  # replaced in place, keeps its position
    assert block.columns == ["rlnA", "rlnB", "rlnC"]
    assert block.column("rlnB") == ["0.500000", "-1.250000", "2.000000"]
    assert block.column("rlnC") == ["1", "2", "3"]
    block.remove_column("rlnA")
    assert block.columns == ["rlnB", "rlnC"]
    with pytest.raises(ValueError, match="2 values; the loop has 3 rows"):
        block.set_column("rlnD", [1.0, 2.0])
    sub = block.select_rows([2, 0])
    assert sub.column("rlnC") == ["3", "1"] and block.n_rows == 3


def test_quotes_empty_lines_nameless_block_and_no_trailing_newline(tmp_path):
    text = (
        "data_\n\n\nloop_\n_rlnImageName #1\n_rlnMicrographName #2\n"
        "1@a.mrcs 'my micrograph.mrc'\n\n"
        '2@a.mrcs "b.mrc"\n'
        "data_general\n_rlnComment \"two words\"\n_rlnEmpty ''\n_rlnNumber 3"
    )  # no newline at the end
    path = tmp_path / "q.star"
    path.write_text(text)
    doc = read_star(path)
    assert doc.names == ["", "general"]
    assert doc[""].column("rlnMicrographName") == ["my micrograph.mrc", "b.mrc"]
    assert doc["general"].pairs == {
        "rlnComment": "two words",
        "rlnEmpty": "",
        "rlnNumber": "3",
    }
    out = tmp_path / "q2.star"
    write_star(out, doc)
    assert read_star(out) == doc
    assert '"my micrograph.mrc"' in out.read_text()


def test_malformed_loop_names_file_and_line(tmp_path):
    lines = SAMPLE_31.read_text().splitlines()
    row = next(i for i, s in enumerate(lines) if s.startswith(" 1538.000000"))
    lines[row] = " ".join(lines[row].split()[:-1])  # drop the last value
    bad = tmp_path / "bad.star"
    bad.write_text("\n".join(lines))
    with pytest.raises(InputError) as err:
        read_star(bad)
    assert err.value.path == str(bad)
    assert f"line {row + 1}" in err.value.problem
    assert "25 values, expected 26" in err.value.problem


def test_missing_file_and_missing_column_errors(tmp_path):
    with pytest.raises(InputError, match="not found") as err:
        read_star(tmp_path / "nothing.star")
    assert err.value.path == str(tmp_path / "nothing.star")
    block = read_star(SAMPLE_31)["particles"]
    with pytest.raises(InputError, match="no column _rlnAngleNope") as err:
        block.column("rlnAngleNope")
    assert err.value.path == str(SAMPLE_31)
    with pytest.raises(InputError, match="no data_nope block"):
        read_star(SAMPLE_31)["nope"]


def test_non_numeric_value_is_reported_with_row(tmp_path):
    block = StarBlock("t", columns={"rlnX": ["1.0", "abc"]}, source="f.star")
    with pytest.raises(InputError, match="row 2: 'abc' is not a number"):
        block.column_as_float("rlnX")


def test_document_set_block_replaces_in_place():
    doc = StarDocument(
        [StarBlock("a", pairs={"k": "1"}), StarBlock("b", pairs={"k": "2"})]
    )
    doc.set_block(StarBlock("a", pairs={"k": "3"}))
    doc.set_block(StarBlock("c", pairs={"k": "4"}))
    assert doc.names == ["a", "b", "c"] and doc["a"].value("k") == "3"
    assert "data_a" in star_text(doc)


@pytest.mark.relion
def test_relion_reads_what_we_write(tmp_path, relion_bin):
    doc = read_star(SAMPLE_31)
    doc["particles"].set_column("rlnAngleTilt", np.array([1.5, 2.25, 3.0, 4.125]))
    out = tmp_path / "written.star"
    write_star(out, doc)
    result = subprocess.run(
        [
            str(relion_bin / "relion_star_printtable"),
            str(out),
            "data_particles",
            "rlnImageName",
            "rlnAngleTilt",
            "rlnOriginYAngst",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    assert [r[0] for r in rows] == doc["particles"].column("rlnImageName")
    np.testing.assert_array_equal([float(r[1]) for r in rows], [1.5, 2.25, 3.0, 4.125])
    np.testing.assert_array_equal(
        [float(r[2]) for r in rows], doc["particles"].column_as_float("rlnOriginYAngst")
    )
    optics = subprocess.run(
        [
            str(relion_bin / "relion_star_printtable"),
            str(out),
            "data_optics",
            "rlnVoltage",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert [float(v) for v in optics.stdout.split()] == [200.0, 300.0]


def test_values_that_need_quotes_survive_a_round_trip(tmp_path):
    tricky = [
        "",
        "_x",
        "data_y",
        "#c",
        "a b",
        "plain",
        "1.5",
        "x'y",
        "loop_",
        ";z",
        "$v",
        'q"r',
        '"start',
    ]
    doc = StarDocument(
        [
            StarBlock("pairs", pairs={f"rlnKey{i}": v for i, v in enumerate(tricky)}),
            StarBlock(
                "loop",
                columns={"rlnTricky": tricky, "rlnPlain": [str(i) for i in range(13)]},
            ),
        ]
    )
    path = tmp_path / "tricky.star"
    write_star(path, doc)
    assert read_star(path) == doc
    text = path.read_text()
    assert "\nplain" not in text and " plain" in text  # plain values stay unquoted
    assert '"a b"' in text and '"_x"' in text and "'\"start'" in text
    assert ' q"r ' in text  # a quote inside a value needs no quoting


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "p.star"
    good = StarDocument([StarBlock("a", pairs={"rlnKey": "1"})])
    write_star(path, good)
    before = path.read_text()
    bad = StarDocument([StarBlock("a", pairs={"rlnKey": "both ' and \" quotes"})])
    with pytest.raises(ValueError, match="both quote characters"):
        write_star(path, bad)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.star"]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
