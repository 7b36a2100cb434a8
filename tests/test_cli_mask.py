"""``localrefine mask`` in-process: exit codes and the mask written."""

from __future__ import annotations

import logging

import mrcfile
import numpy as np
import pytest

from localrefine_plugin.cli import entry_point
from localrefine_plugin.engine.mrc_io import read_map, write_map

from .conftest import blob_map


def _ball_function(n: int, radius_px: float) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    return (radius_px - np.sqrt(x**2 + y**2 + z**2)).astype(np.float32)


def test_mask_with_given_threshold_has_the_requested_soft_edge(tmp_path):
    n, px = 40, 1.25
    write_map(tmp_path / "ball.mrc", _ball_function(n, 8.5), px)
    out = tmp_path / "mask.mrc"
    code = entry_point(
        [
            "mask",
            "--map",
            str(tmp_path / "ball.mrc"),
            "--output",
            str(out),
            "--lowpass",
            "0",
            "--threshold",
            "0",
            "--extend",
            "2.5",
            "--soft-edge",
            "5",
        ]
    )
    assert code == 0
    mask, pixel_size = read_map(out)
    assert pixel_size == pytest.approx(px)
    with mrcfile.open(out) as mrc:  # the header's voxel size on all three axes
        np.testing.assert_allclose(
            [mrc.voxel_size.x, mrc.voxel_size.y, mrc.voxel_size.z], px, rtol=1e-6
        )
    assert mask.shape == (n, n, n) and mask.min() >= 0.0 and mask.max() <= 1.0
    ray = mask[n // 2, n // 2, n // 2 :]  # +x from the centre
    last_one = np.nonzero(ray == 1.0)[0].max()
    first_zero = np.argmax(ray == 0.0)
    assert last_one == 8 + 2  # ball to x = 8, extended by 2.5 A = 2 px
    assert (first_zero - last_one) * px == pytest.approx(5.0)  # 4 px edge
    d = np.arange(last_one, first_zero + 1) - last_one
    np.testing.assert_allclose(
        ray[last_one : first_zero + 1], 0.5 + 0.5 * np.cos(np.pi * d / 4.0), atol=1e-6
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ball.mrc", "mask.mrc"]


def test_mask_with_defaults_covers_the_density_and_logs_a_summary(tmp_path, caplog):
    n, px = 48, 1.5
    rng = np.random.default_rng(11)
    clean = blob_map(n)
    noisy = clean + 0.02 * rng.standard_normal((n, n, n)).astype(np.float32)
    write_map(tmp_path / "map.mrc", noisy, px)
    with caplog.at_level(logging.INFO):
        code = entry_point(
            [
                "mask",
                "--map",
                str(tmp_path / "map.mrc"),
                "--output",
                str(tmp_path / "m.mrc"),
            ]
        )
    assert code == 0
    mask, pixel_size = read_map(tmp_path / "m.mrc")
    assert pixel_size == pytest.approx(px)
    assert mask.min() >= 0.0 and mask.max() == pytest.approx(1.0)
    assert float((mask * clean).sum() / clean.sum()) > 0.95
    assert 0.02 < float(mask.mean()) < 0.5
    summary = [
        r.getMessage() for r in caplog.records if "volume fraction" in r.getMessage()
    ]
    assert len(summary) == 1
    assert "threshold" in summary[0] and "soft edge 6 A" in summary[0]
    assert f"{float(mask.mean()):.4f}" in summary[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threshold", "1e6"], "empty"),
        (["--lowpass", "2.0"], "Nyquist"),
        (["--soft-edge", "-1"], "--soft-edge"),
    ],
    ids=["threshold-too-high", "lowpass-beyond-nyquist", "negative-edge"],
)
def test_bad_values_exit_2_with_one_line(tmp_path, capsys, extra, message):
    write_map(tmp_path / "map.mrc", _ball_function(24, 5.0), 1.5)
    out = tmp_path / "m.mrc"
    code = entry_point(
        ["mask", "--map", str(tmp_path / "map.mrc"), "--output", str(out), *extra]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "localrefine mask: error:" in err and message in err
    assert not out.exists()


def test_missing_map_exits_2_naming_it(tmp_path, capsys):
    code = entry_point(
        ["mask", "--map", str(tmp_path / "nope.mrc"), "--output", "x.mrc"]
    )
    assert code == 2
    assert "nope.mrc" in capsys.readouterr().err
