"""Scaling-law fitters recover known laws from noisy synthetic data.

Every data set here is drawn from a known L(N, D) (lmforge.scaling.synthetic); nothing is
measured. Tolerances are loose enough for the noise, tight enough to catch a wrong formula.
"""

from __future__ import annotations

import os

# Before scipy's OpenBLAS loads: L-BFGS-B's tiny LAPACK calls are far slower multi-threaded
# on a busy 2-core machine (see lmforge.scaling.fit.single_threaded_blas).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lmforge.core.errors import DataError  # noqa: E402
from lmforge.scaling.fit import (  # noqa: E402
    LossLaw,
    effective_data,
    fit_loss_law,
    fit_scaling,
    law_from_fit,
    load_fit,
    save_fit,
)
from lmforge.scaling.fit_isoflop import fit_envelope, fit_isoflops, group_budgets  # noqa: E402
from lmforge.scaling.synthetic import isoflop_table, noisy_losses, training_curves  # noqa: E402
from lmforge.scaling.table import make_table  # noqa: E402

TRUE = LossLaw(E=1.8, A=500.0, B=2000.0, alpha=0.35, beta=0.37)
BUDGETS = np.geomspace(1e17, 1e21, 9)


def test_derived_quantities_match_a_numeric_optimum():
    assert TRUE.a == pytest.approx(0.37 / 0.72)
    assert TRUE.b == pytest.approx(0.35 / 0.72)
    compute = 1e21
    n_opt, d_opt = TRUE.compute_optimal(compute)
    assert 6 * n_opt * d_opt == pytest.approx(compute)
    sizes = n_opt * np.geomspace(0.5, 2.0, 2001)
    losses = TRUE.loss(sizes, compute / (6 * sizes))
    assert sizes[np.argmin(losses)] == pytest.approx(n_opt, rel=2e-3)


def test_approach3_recovers_known_parameters():
    table = isoflop_table(TRUE, BUDGETS, n_sizes=12, noise=0.005, seed=1)
    fit = fit_loss_law(table, n_starts=8)
    law = fit.law
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.02)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.02)
    assert law.E == pytest.approx(TRUE.E, abs=0.05)
    assert law.a == pytest.approx(TRUE.a, abs=0.01)
    assert np.log(law.A) == pytest.approx(np.log(TRUE.A), abs=0.4)
    assert np.log(law.B) == pytest.approx(np.log(TRUE.B), abs=0.4)
    assert fit.residual_rms == pytest.approx(0.005, rel=0.3)
    assert fit.n_agree >= 2  # more than one start found the same optimum


def test_huber_is_robust_to_outliers():
    """6% of runs with a 30% higher loss barely move the Huber fit; least squares moves."""
    table = isoflop_table(TRUE, BUDGETS, n_sizes=12, noise=0.005, seed=0, outlier_fraction=0.06)
    huber = fit_loss_law(table, n_starts=8).law
    squares = fit_loss_law(table, n_starts=8, huber_delta=10.0).law  # δ far above every residual
    assert huber.alpha == pytest.approx(TRUE.alpha, abs=0.02)
    assert huber.beta == pytest.approx(TRUE.beta, abs=0.02)
    assert huber.E == pytest.approx(TRUE.E, abs=0.05)
    assert abs(huber.alpha - TRUE.alpha) < abs(squares.alpha - TRUE.alpha)
    assert abs(huber.E - TRUE.E) < abs(squares.E - TRUE.E)


def test_effective_data():
    unique = 1e9
    tokens = np.array([5e8, 1e9, 2e9, 1e12])
    d_eff = effective_data(tokens, unique, r_star=15.0)
    assert d_eff[0] == pytest.approx(5e8)            # less than one epoch: all fresh
    assert d_eff[1] == pytest.approx(1e9)
    assert 1.9e9 < d_eff[2] < 2e9                     # one repeat is worth almost as much as fresh data
    assert d_eff[3] == pytest.approx(unique * 16.0, rel=1e-6)  # saturates at U·(1 + R*)
    np.testing.assert_allclose(effective_data(tokens, unique, r_star=1e12), np.maximum(tokens, 5e8), rtol=1e-6)


def test_data_constrained_fit_recovers_r_star():
    law = LossLaw(E=1.8, A=500.0, B=2000.0, alpha=0.35, beta=0.37, r_star=15.0)
    grid = np.array([(n, u, u * epochs) for n in np.geomspace(1e7, 3e9, 6) for u in np.geomspace(1e8, 1e10, 4)
                     for epochs in (1, 2, 4, 8, 16, 32, 64)])
    params, unique, tokens = grid.T
    loss = noisy_losses(law, params, tokens, 0.005, np.random.default_rng(0), unique_tokens=unique)
    table = make_table(params, tokens, loss, unique_tokens=unique)
    fit = fit_loss_law(table, r_star="fit", n_starts=8)
    assert fit.law.r_star == pytest.approx(15.0, rel=0.25)
    assert fit.law.beta == pytest.approx(0.37, abs=0.02)
    plain = fit_loss_law(table, n_starts=8)  # ignoring repetition fits worse
    assert plain.residual_rms > 2 * fit.residual_rms
    with pytest.raises(DataError, match="unique_tokens column"):
        fit_loss_law(make_table(params, tokens, loss), r_star="fit")


def test_approach2_isoflops_recover_the_exponent():
    # Designs centred off the optimum (offset 2x) still find it: the parabola's vertex moves.
    table = isoflop_table(TRUE, BUDGETS, n_sizes=9, noise=0.005, seed=0, offset=2.0)
    result = fit_isoflops(table)
    assert len(result.compute) == len(BUDGETS) and not result.skipped
    assert result.params_law.exponent == pytest.approx(TRUE.a, abs=0.01)
    assert result.tokens_law.exponent == pytest.approx(TRUE.b, abs=0.01)
    assert result.params_law.exponent + result.tokens_law.exponent == pytest.approx(1.0)
    n_true, _ = TRUE.compute_optimal(result.compute)
    np.testing.assert_allclose(result.params, n_true, rtol=0.15)


def test_approach2_skips_budgets_it_cannot_trust():
    table = isoflop_table(TRUE, BUDGETS[:3], n_sizes=5, noise=0.0, offset=30.0)  # optimum left of every size
    with pytest.raises(DataError, match="outside the model sizes"):
        fit_isoflops(table)
    assert list(group_budgets(np.array([1e18, 1.05e18, 1e19, 0.98e19]))) == [0, 0, 1, 1]


def test_approach1_envelope_recovers_the_exponent():
    table = training_curves(TRUE, np.geomspace(1e7, 1e10, 25), points_per_curve=40)
    result = fit_envelope(table)
    assert len(set(result.params.tolist())) >= 5
    assert result.params_law.exponent == pytest.approx(TRUE.a, abs=0.02)
    assert result.tokens_law.exponent == pytest.approx(TRUE.b, abs=0.02)


def _coverage(reps: int, n_bootstrap: int, level: float) -> tuple[float, float]:
    """Fraction of (draw, quantity) pairs whose interval holds the truth; mean width of α's."""
    truth = TRUE.quantities()
    hits, widths = [], []
    for rep in range(reps):
        table = isoflop_table(TRUE, np.geomspace(1e17, 1e21, 7), n_sizes=8, noise=0.01, seed=100 + rep)
        q = fit_scaling(table, approaches=(3,), n_bootstrap=n_bootstrap, seed=rep, level=level, n_starts=4,
                        bootstrap_starts=1)["approach3"]["quantities"]
        hits += [q[k]["low"] <= truth[k] <= q[k]["high"] for k in ("E", "alpha", "beta", "a")]
        widths.append(q["alpha"]["high"] - q["alpha"]["low"])
    return float(np.mean(hits)), float(np.mean(widths))


def test_bootstrap_intervals_cover_the_truth_roughly_at_their_level():
    coverage, width = _coverage(reps=10, n_bootstrap=20, level=0.8)
    assert 0.55 <= coverage <= 1.0
    assert width < 0.1  # and are not trivially wide


@pytest.mark.slow
def test_bootstrap_coverage_thorough():
    coverage, _ = _coverage(reps=40, n_bootstrap=60, level=0.8)
    assert 0.65 <= coverage <= 0.95


def test_isoflop_bootstrap_coverage():
    truth, hits = TRUE.a, []
    for rep in range(30):
        table = isoflop_table(TRUE, BUDGETS, n_sizes=7, noise=0.01, seed=200 + rep)
        q = fit_scaling(table, approaches=(2,), n_bootstrap=40, seed=rep, level=0.8)["approach2"]["quantities"]["a"]
        hits.append(q["low"] <= truth <= q["high"])
    assert 0.6 <= np.mean(hits) <= 0.97


def test_fit_scaling_json_round_trip(tmp_path):
    table = isoflop_table(TRUE, BUDGETS, n_sizes=8, noise=0.005, seed=3)
    fit = fit_scaling(table, approaches=(1, 2, 3), n_bootstrap=6, seed=1, n_starts=4, strict=False)
    assert "approach1" in fit["skipped"]  # one point per curve: no envelope
    assert set(fit["approach3"]["quantities"]) == {"E", "A", "B", "alpha", "beta", "a", "b", "G"}
    for q in fit["approach3"]["quantities"].values():
        assert q["low"] <= q["high"]
    path = save_fit(tmp_path / "fit.json", fit)
    law, samples = law_from_fit(load_fit(path))
    assert law.alpha == fit["approach3"]["law"]["alpha"]
    assert len(samples) == fit["approach3"]["bootstrap"]["ok"] == 6
    again = fit_scaling(table, approaches=(3,), n_bootstrap=6, seed=1, n_starts=4)
    assert again["approach3"]["quantities"] == fit["approach3"]["quantities"]  # seeded: reproducible
    with pytest.raises(DataError, match="Approach 1 needs two or more training curves"):
        fit_scaling(table, approaches=(1,), n_bootstrap=0)
    (tmp_path / "bad.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(DataError, match="not an lmforge scaling fit"):
        load_fit(tmp_path / "bad.json")


def test_fit_module_needs_no_torch():
    code = ("import sys, lmforge.scaling.fit, lmforge.scaling.fit_isoflop, lmforge.scaling.fit_bootstrap, "
            "lmforge.scaling.table, lmforge.scaling.synthetic; assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
