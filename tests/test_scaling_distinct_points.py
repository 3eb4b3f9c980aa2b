"""Repeated measurements of one (N, D) point are not new points.

`scaling fit` on one point repeated ten times once reported a confident fit (zero-width
intervals, every start agreeing). Fits now count distinct points against their parameters,
refuse too few, warn when barely enough, and the bootstrap resamples points, not rows.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before scipy loads; see lmforge.scaling.fit

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import run_cli  # noqa: E402
from lmforge.core.errors import DataError  # noqa: E402
from lmforge.scaling.fit import LossLaw, fit_loss_law, fit_scaling  # noqa: E402
from lmforge.scaling.fit_bootstrap import resample_indices  # noqa: E402
from lmforge.scaling.ladder.predict import fit_offset_power_law  # noqa: E402
from lmforge.scaling.synthetic import isoflop_table  # noqa: E402
from lmforge.scaling.table import make_table  # noqa: E402

TRUE = LossLaw(E=1.8, A=500.0, B=2000.0, alpha=0.35, beta=0.37)


def write_csv(path, rows) -> str:
    path.write_text("N,D,loss\n" + "".join(f"{n:.6g},{d:.6g},{loss:.6f}\n" for n, d, loss in rows))
    return str(path)


def test_one_point_repeated_is_refused_by_the_command(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(1e8, 2e9, 3.1 + 0.01 * rng.normal()) for _ in range(10)]
    csv = write_csv(tmp_path / "one_point.csv", rows)
    out = tmp_path / "fit"
    result = run_cli("scaling", "fit", csv, "--out", str(out), "--bootstrap", "10")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("lmforge: error: ")
    assert "5 parameters but the data has 1 distinct (N, D) point(s) in 10 rows" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing written
    # Asking for Approach 3 by name fails the same way.
    result = run_cli("scaling", "fit", csv, "--out", str(out), "--approach", "3")
    assert result.returncode == 2 and "1 distinct (N, D) point(s)" in result.stderr


def test_barely_enough_points_fit_with_a_warning(tmp_path):
    # Seven distinct points (three sizes at two or three token counts), each measured twice.
    rng = np.random.default_rng(1)
    points = [(n, d) for n, ds in ((3e7, (6e8, 2e9, 6e9)), (1e8, (2e9, 6e9)), (3e8, (6e9, 2e10))) for d in ds]
    rows = [(n, d, TRUE.loss(n, d) * np.exp(0.005 * rng.normal())) for n, d in points for _ in range(2)]
    csv = write_csv(tmp_path / "few.csv", rows)
    out = tmp_path / "fit"
    result = run_cli("scaling", "fit", csv, "--out", str(out), "--approach", "3", "--bootstrap", "10",
                     "--starts", "4", "--no-plots")
    assert result.returncode == 0, result.stderr
    assert "lmforge: warning: Approach 3: 7 distinct (N, D) points for 5 parameters" in result.stderr
    fit = json.loads((out / "fit.json").read_text())
    assert any("7 distinct (N, D) points" in w for w in fit["warnings"])


def test_a_point_count_equal_to_the_parameters_is_refused():
    points = [(3e7, 6e8), (3e7, 2e9), (1e8, 2e9), (1e8, 6e9), (3e8, 6e9)]
    table = make_table(*zip(*[(n, d, TRUE.loss(n, d)) for n, d in points * 3]))
    with pytest.raises(DataError, match="5 parameters but the data has 5 distinct"):
        fit_loss_law(table)
    with pytest.raises(DataError, match="needs 4 or more distinct x values, got 3"):
        fit_offset_power_law([1e15, 1e15, 2e15, 4e15], [3.0, 3.01, 2.9, 2.8])


def test_resampling_keeps_the_rows_of_a_point_together():
    groups = np.array([0, 0, 1, 2, 2, 2])
    for index in resample_indices(groups, 20, seed=3):
        drawn = groups[index]
        for g in np.unique(drawn):
            # every drawn point brings all its rows (a point drawn twice brings them twice)
            assert (drawn == g).sum() % (groups == g).sum() == 0
    # One row per point: the ordinary row bootstrap, draw for draw.
    plain = np.random.default_rng(5).integers(0, 6, size=(4, 6))
    assert all((a == b).all() for a, b in zip(resample_indices(np.arange(6), 4, seed=5), plain))


def test_duplicated_rows_do_not_narrow_the_intervals():
    table = isoflop_table(TRUE, np.geomspace(1e17, 1e19, 3), n_sizes=5, noise=0.01, seed=2)
    repeated = table.take(np.repeat(np.arange(len(table)), 4))  # every measurement listed four times
    assert repeated.distinct_points() == table.distinct_points() == 15
    once = fit_scaling(table, approaches=(3,), n_bootstrap=20, seed=0, n_starts=4)["approach3"]["quantities"]
    four = fit_scaling(repeated, approaches=(3,), n_bootstrap=20, seed=0, n_starts=4)["approach3"]["quantities"]
    for name in ("alpha", "beta", "a"):
        width_once = once[name]["high"] - once[name]["low"]
        width_four = four[name]["high"] - four[name]["low"]
        assert width_once > 0
        # Rows resampled one by one would give intervals about half as wide (four times the "data").
        assert width_four == pytest.approx(width_once, rel=0.05), name
