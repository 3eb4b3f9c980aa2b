"""Fit the half-life of repeated data, R*_D, from an epochs sweep at one model size (numpy + scipy).

**The law (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models").** D tokens
drawn from U_D = min(U, D) unique ones are worth the effective data

    D' = U_D + U_D·R*_D·(1 − exp(−R_D/R*_D)),    R_D = D/U_D − 1 (repetitions beyond the first epoch),

so a few repetitions are almost as good as fresh data and the value of further ones decays
with "half-life" R*_D (their fit: R*_D ≈ 15.4). At a fixed model size N the parameter term
A/N^α of L(N, D) is a constant, absorbed into E, and the law of a sweep is

    L(D, U) = E + B / D'^β.

Fresh-data runs (U = D, D' = D) pin E, B and β; repeated runs (U < D) pin R*_D. Like
Approach 3 (``scaling.fit``) it is fitted in log space, ln L̂ = LSE(b − β·ln D', e) with
b = ln B, e = ln E, by minimising Σ Huber_δ(ln L̂ − ln L) with L-BFGS-B from the best points
of a grid; R*_D is fitted as ln R*_D within :data:`lmforge.scaling.fit.BOUNDS`.

**Intervals.** The distinct (D, U) points are resampled with replacement
(``scaling.fit_bootstrap``) and refitted; a resample without a repeated point (or with no
more distinct points than the law has parameters) cannot be fitted and is counted as failed.
A fit whose R*_D ends at a bound (repeated data measured as good as fresh, or worthless) is
flagged: the data then only bounds R*_D from one side.

:func:`fit_repetition` returns a JSON-ready dict (format :data:`FORMAT`), which ``scaling
plan --r-star-fit`` reads through :func:`load_r_star`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_json
from lmforge.scaling.fit import (BOUNDS, FORMAT as LAW_FIT_FORMAT, HUBER_DELTA, effective_data, read_fit_json,
                                 single_threaded_blas)
from lmforge.scaling.fit_bootstrap import bootstrap, summarize
from lmforge.scaling.table import ScalingTable

FORMAT = "lmforge.scaling.repetition_fit/1"
PARAMETERS = ("b", "e", "beta", "log_r_star")
GRID = {
    "b": (0.0, 2.5, 5.0, 10.0, 20.0),
    "e": (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.05, 0.15, 0.3, 0.6, 1.0),
    "log_r_star": (math.log(0.5), math.log(2.0), math.log(5.0), math.log(15.0), math.log(60.0), math.log(500.0)),
}
FIT_BOUNDS = [(-30.0, 120.0), (-10.0, 10.0), (1e-4, 4.0), BOUNDS["log_r_star"]]


def repetition_loss(tokens, unique_tokens, E: float, B: float, beta: float, r_star: float) -> np.ndarray:
    """L(D, U) = E + B / D'^β with D' the effective data of D tokens from U unique ones."""
    return E + B * effective_data(tokens, unique_tokens, r_star) ** -beta


def _check(table: ScalingTable) -> None:
    if table.unique_tokens is None:
        raise DataError(f"{table.source}: an epochs-sweep fit needs a unique_tokens (U) column")
    sizes = np.unique(table.params)
    if len(sizes) != 1:
        raise DataError(f"{table.source}: an epochs-sweep fit is for one model size, the rows have "
                        f"{len(sizes)} ({', '.join(f'{n:.4g}' for n in sizes)}); fit each size on its own")
    if not np.any(table.tokens > table.unique_tokens):
        raise DataError(f"{table.source}: no row repeats data (D > U), so R*_D cannot be fitted")
    points = table.distinct_points()
    if points <= len(PARAMETERS):
        raise DataError(f"{table.source}: the law has {len(PARAMETERS)} parameters but the rows hold {points} "
                        "distinct (D, U) point(s); it needs more")


def _objective(theta: np.ndarray, log_l: np.ndarray, tokens: np.ndarray, unique: np.ndarray,
               delta: float) -> float:
    b, e, beta, log_r_star = theta
    log_d = np.log(effective_data(tokens, unique, math.exp(log_r_star)))
    pred = np.logaddexp(b - beta * log_d, e)
    return float(huber(delta, pred - log_l).sum()) / delta


def _fit_once(table: ScalingTable, delta: float, n_starts: int, extra_starts=()) -> tuple[np.ndarray, float]:
    _check(table)
    log_l, tokens, unique = np.log(table.loss), table.tokens, table.unique_tokens
    grid = np.array(list(itertools.product(*(GRID[name] for name in PARAMETERS))))
    # The objective at every grid point at once (grid rows against data columns).
    log_d = np.log(effective_data(tokens[None, :], unique[None, :], np.exp(grid[:, 3:4])))
    pred = np.logaddexp(grid[:, 0:1] - grid[:, 2:3] * log_d, grid[:, 1:2])
    values = huber(delta, pred - log_l[None, :]).sum(axis=1)
    starts = [*extra_starts, *grid[np.argsort(values, kind="stable")[:n_starts]]]
    best = None
    with single_threaded_blas():
        for x0 in starts:
            res = minimize(_objective, np.asarray(x0, dtype=float), args=(log_l, tokens, unique, delta),
                           method="L-BFGS-B", bounds=FIT_BOUNDS, options={"maxiter": 2000, "ftol": 1e-14})
            if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
                best = res
    if best is None:
        raise DataError(f"{table.source}: the repetition fit did not converge from any start")
    return best.x, float(best.fun) * delta


def _quantities(theta: np.ndarray) -> dict[str, float]:
    b, e, beta, log_r_star = theta
    return {"r_star": math.exp(log_r_star), "E": math.exp(e), "B": math.exp(b), "beta": float(beta)}


def paired_runs(table: ScalingTable) -> list[dict]:
    """Each repeated point (D > U) beside the fresh point of the same D (U = D), when measured:
    the sweep's direct comparison, before any fit."""
    out = []
    for tokens in np.unique(table.tokens):
        at = table.tokens == tokens
        fresh = table.loss[at & (table.unique_tokens >= table.tokens)]
        for unique in np.unique(table.unique_tokens[at & (table.unique_tokens < table.tokens)]):
            repeated = table.loss[at & (table.unique_tokens == unique)]
            entry = {"tokens": float(tokens), "unique_tokens": float(unique), "epochs": float(tokens / unique),
                     "loss_repeated": float(repeated.mean())}
            if len(fresh):
                entry["loss_fresh"] = float(fresh.mean())
                entry["relative"] = entry["loss_repeated"] / entry["loss_fresh"] - 1.0
            out.append(entry)
    return out


def fit_repetition(table: ScalingTable, n_bootstrap: int = 200, seed: int = 0, level: float = 0.9,
                   huber_delta: float = HUBER_DELTA, n_starts: int = 8) -> dict:
    """Fit L(D, U) = E + B/D'^β (one model size) and R*_D, with percentile bootstrap intervals."""
    theta, objective = _fit_once(table, huber_delta, n_starts)
    point = _quantities(theta)
    boot = None
    if n_bootstrap:
        def refit(sample: ScalingTable):
            fitted, _ = _fit_once(sample, huber_delta, 2, extra_starts=[theta])
            return _quantities(fitted), None

        boot = bootstrap(table, refit, n_bootstrap, seed)
    predicted = repetition_loss(table.tokens, table.unique_tokens, point["E"], point["B"], point["beta"],
                                point["r_star"])
    low, high = (math.exp(v) for v in FIT_BOUNDS[3])
    at_bound = not (low * 1.01 < point["r_star"] < high / 1.01)
    result = {
        "format": FORMAT,
        "source": {"path": table.source, "rows": len(table)},
        "settings": {"bootstrap": n_bootstrap, "seed": seed, "level": level, "huber_delta": huber_delta},
        "params": float(table.params[0]),
        "law": {"form": "L(D, U) = E + B / D'^beta, D' = U + U R* (1 - exp(-(D/U - 1)/R*))", **point},
        "quantities": summarize(point, boot, level),
        "fit": {"objective": objective, "points": table.distinct_points(),
                "residual_rms": float(np.sqrt(np.mean((np.log(table.loss) - np.log(predicted)) ** 2))),
                "r_star_at_bound": at_bound},
        "comparison": paired_runs(table),
        "warnings": [],
    }
    if at_bound:
        result["warnings"].append(f"R*_D = {point['r_star']:.4g} is at the fit's bound [{low:g}, {high:g}]: the runs "
                                  "only bound it from one side")
    if boot is not None:
        result["bootstrap"] = {"requested": boot.n_requested, "ok": boot.n_ok, "failed": boot.n_failed,
                               "r_star_samples": [float(v) for v in boot.samples.get("r_star", [])]}
        if boot.n_failed > 0.1 * boot.n_requested:
            result["warnings"].append(f"{boot.n_failed} of {boot.n_requested} bootstrap resamples could not be fitted "
                                      "(no repeated point, or too few distinct points, left in them)")
    return result


def save_repetition_fit(path: str | Path, fit: dict) -> Path:
    return atomic_write_json(path, fit)


def load_r_star(path: str | Path) -> tuple[float, list[float]]:
    """R*_D and its bootstrap values from an epochs-sweep fit (:data:`FORMAT`) or from a ``scaling
    fit`` whose Approach-3 law fitted R* (``--r-star fit``)."""
    fit = read_fit_json(path, "R*_D fit")
    if isinstance(fit, dict) and fit.get("format") == FORMAT:
        return float(fit["law"]["r_star"]), [float(v) for v in fit.get("bootstrap", {}).get("r_star_samples", [])]
    if isinstance(fit, dict) and fit.get("format") == LAW_FIT_FORMAT:
        law = fit.get("approach3", {}).get("law", {})
        if law.get("r_star") is None:
            raise DataError(f"{path}: this scaling fit has no fitted R* (fit it with --r-star fit, or run an "
                            "epochs sweep)")
        boot = fit["approach3"].get("bootstrap", {})
        columns = boot.get("columns", [])
        samples = [float(row[columns.index("r_star")]) for row in boot.get("samples", []) if "r_star" in columns]
        return float(law["r_star"]), samples
    raise DataError(f"{path}: not an epochs-sweep fit ({FORMAT!r}) or a scaling fit ({LAW_FIT_FORMAT!r})")
