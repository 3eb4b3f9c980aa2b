"""Fit scaling laws to (parameters N, tokens D, loss L) measurements (numpy + scipy, no torch).

**Approach 3 (Hoffmann et al. 2022).** The parametric loss

    L(N, D) = E + A / N^α + B / D^β

is fitted in log space with a = ln A, b = ln B, e = ln E, so the prediction is

    ln L̂ = LSE(a − α·ln N,  b − β·ln D,  e)        (LSE = log-sum-exp)

and the objective is Σ_i Huber_δ(ln L̂_i − ln L_i) with δ = 1e-3: quadratic for residuals
below δ, linear above, so a few outlying runs cannot drag the fit. It is minimised with
scipy's L-BFGS-B (analytic gradient) from the best points of a grid of initialisations;
the lowest objective wins.

**Derived quantities.** Minimising L under C = 6·N·D gives

    N_opt(C) = G·(C/6)^a,   D_opt(C) = G⁻¹·(C/6)^b,
    a = β/(α+β),  b = α/(α+β),  G = (α·A / (β·B))^(1/(α+β)).

**Data-constrained variant (Muennighoff et al. 2023).** When D tokens were drawn from U
unique ones, repeated data is worth less than fresh data. With U_D = min(U, D) and
R = D/U_D − 1 repetitions, the effective data is

    D' = U_D + U_D·R*·(1 − exp(−R/R*)),

which is D for R ≪ R* and saturates at U_D·(1 + R*); D' replaces D in L(N, D). R* is
given or fitted with the other parameters (as ln R*).

:func:`fit_scaling` runs the requested approaches with bootstrap intervals and returns a
JSON-ready dict; :func:`save_fit` / :func:`load_fit` write and read it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_json, read_json, sha256_file
from lmforge.scaling.fit_bootstrap import BootstrapResult, bootstrap, summarize
from lmforge.scaling.fit_isoflop import ComputeOptima, fit_envelope, fit_isoflops
from lmforge.scaling.table import ScalingTable

try:  # optional: keeps L-BFGS-B's tiny LAPACK calls off a multi-threaded OpenBLAS
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - depends on the environment
    threadpool_limits = None

FORMAT = "lmforge.scaling.fit/1"
HUBER_DELTA = 1e-3
LAW_PARAMS = ("E", "A", "B", "alpha", "beta")
DERIVED = ("a", "b", "G")

# Initialisation grid (a = ln A, b = ln B, e = ln E, α, β, and ln R* when R* is fitted).
GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.1, 0.25, 0.5, 1.0, 2.0),
    "beta": (0.1, 0.25, 0.5, 1.0, 2.0),
    "log_r_star": (math.log(3.0), math.log(15.0), math.log(60.0)),
}
BOUNDS = {"a": (-30.0, 120.0), "b": (-30.0, 120.0), "e": (-10.0, 10.0),
          "alpha": (1e-4, 4.0), "beta": (1e-4, 4.0), "log_r_star": (math.log(0.1), math.log(1e4))}


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A/N^α + B/D'^β, with D' = D unless ``r_star`` is set (data-constrained)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    r_star: float | None = None

    def loss(self, params, tokens, unique_tokens=None) -> np.ndarray:
        """Predicted loss; ``unique_tokens`` only matters for a data-constrained law."""
        params = np.asarray(params, dtype=float)
        tokens = np.asarray(tokens, dtype=float)
        if self.r_star is not None and unique_tokens is not None:
            tokens = effective_data(tokens, unique_tokens, self.r_star)
        return self.E + self.A * params ** -self.alpha + self.B * tokens ** -self.beta

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a: β/(α+β)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ∝ C^b: α/(α+β)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """G = (αA/(βB))^(1/(α+β)), so that N_opt = G·(C/6)^a and D_opt = (C/6)^b / G."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def compute_optimal(self, compute):
        """(N_opt, D_opt) minimising L(N, D) subject to 6·N·D = C, unlimited unique data."""
        scaled = np.asarray(compute, dtype=float) / 6.0
        return self.G * scaled ** self.a, scaled ** self.b / self.G

    def quantities(self) -> dict[str, float]:
        out = {name: getattr(self, name) for name in LAW_PARAMS}
        if self.r_star is not None:
            out["r_star"] = self.r_star
        out.update(a=self.a, b=self.b, G=self.G)
        return out

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "LossLaw":
        try:
            values = {name: float(data[name]) for name in LAW_PARAMS}
            r_star = data.get("r_star")
            return cls(**values, r_star=None if r_star is None else float(r_star))
        except (TypeError, ValueError, KeyError) as exc:
            raise DataError(f"not a loss law (need {', '.join(LAW_PARAMS)}): {data!r}") from exc


# The published Approach-3 fits (for planning without a fit of one's own, and for checks).
PUBLISHED_LAWS = {
    "hoffmann2022": LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "besiroglu2024": LossLaw(E=1.82, A=482.01, B=2085.43, alpha=0.35, beta=0.37),
}


def effective_data(tokens, unique_tokens, r_star: float) -> np.ndarray:
    """Muennighoff et al. (2023): D' = U_D + U_D·R*·(1 − exp(−R/R*)), U_D = min(U, D), R = D/U_D − 1."""
    tokens = np.asarray(tokens, dtype=float)
    unique = np.minimum(np.asarray(unique_tokens, dtype=float), tokens)
    repeats = tokens / unique - 1.0
    return unique - unique * r_star * np.expm1(-repeats / r_star)


# --------------------------------------------------------------------------- Approach 3


def single_threaded_blas():
    """A context in which BLAS runs on one thread (a no-op without threadpoolctl).

    Since scipy 1.15, L-BFGS-B calls LAPACK (DPOTRF, DTRTRS) on matrices a few rows
    wide; a multi-threaded OpenBLAS spends far longer waking its threads than computing,
    which made these fits ~30x slower on a busy 2-core machine (scipy issue #22438).
    """
    if threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@dataclass
class _Data:
    log_n: np.ndarray
    log_d: np.ndarray
    log_l: np.ndarray
    unique: np.ndarray | None = None   # U_D, for fitting R*
    repeats: np.ndarray | None = None  # R


def _prepare(table: ScalingTable, r_star) -> _Data:
    tokens = table.tokens
    data = _Data(np.log(table.params), np.log(tokens), np.log(table.loss))
    if r_star is None:
        return data
    if table.unique_tokens is None:
        raise DataError(f"{table.source}: a data-constrained fit needs a unique_tokens column")
    unique = np.minimum(table.unique_tokens, tokens)
    if r_star == "fit":
        if not np.any(tokens > unique):
            raise DataError(f"{table.source}: no row repeats data (tokens > unique_tokens), so R* cannot be fitted")
        data.unique, data.repeats = unique, tokens / unique - 1.0
    else:
        data.log_d = np.log(effective_data(tokens, unique, float(r_star)))
    return data


def _objective(theta: np.ndarray, data: _Data, delta: float) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(ln L̂ − ln L) / δ and its gradient (the 1/δ only rescales for the optimiser)."""
    a, b, e, alpha, beta = theta[:5]
    log_d, dlogd_drho = data.log_d, None
    if data.repeats is not None:
        r_star = math.exp(theta[5])
        x = data.repeats / r_star
        saturation = -np.expm1(-x)
        d_eff = data.unique * (1.0 + r_star * saturation)
        log_d = np.log(d_eff)
        dlogd_drho = data.unique * r_star * (saturation - x * np.exp(-x)) / d_eff
    t = np.stack([a - alpha * data.log_n, b - beta * log_d, np.full_like(log_d, e)])
    top = t.max(axis=0)
    w = np.exp(t - top)
    total = w.sum(axis=0)
    w /= total
    r = top + np.log(total) - data.log_l
    value = float(huber(delta, r).sum()) / delta
    g = np.clip(r, -delta, delta) / delta
    grad = [np.dot(g, w[0]), np.dot(g, w[1]), np.dot(g, w[2]),
            -np.dot(g, w[0] * data.log_n), -np.dot(g, w[1] * log_d)]
    if dlogd_drho is not None:
        grad.append(-beta * np.dot(g, w[1] * dlogd_drho))
    return value, np.asarray(grad)


def _grid(fit_r_star: bool) -> np.ndarray:
    names = ["a", "b", "e", "alpha", "beta"] + (["log_r_star"] if fit_r_star else [])
    return np.array(list(itertools.product(*(GRID[n] for n in names))))


def _grid_objective(grid: np.ndarray, data: _Data, delta: float) -> np.ndarray:
    """The objective at every grid point at once (rows of ``grid``), in chunks."""
    out = np.empty(len(grid))
    for start in range(0, len(grid), 512):
        g = grid[start:start + 512, :, None]
        log_d = data.log_d[None, :]
        if data.repeats is not None:
            r_star = np.exp(g[:, 5])
            log_d = np.log(data.unique * (1.0 - r_star * np.expm1(-data.repeats / r_star)))
        t1, t2 = g[:, 0] - g[:, 3] * data.log_n, g[:, 1] - g[:, 4] * log_d
        pred = np.logaddexp(np.logaddexp(t1, t2), g[:, 2])
        out[start:start + 512] = huber(delta, pred - data.log_l).sum(axis=1) / delta
    return out


@dataclass
class LawFit:
    """Result of :func:`fit_loss_law`."""

    law: LossLaw
    theta: np.ndarray           # (a, b, e, α, β[, ln R*]) at the optimum
    objective: float            # Σ Huber_δ of the log residuals (not divided by δ)
    n_points: int
    n_starts: int
    n_agree: int                # starts that ended within 1e-6 (relative) of the best objective
    residual_rms: float         # root mean square of ln L − ln L̂

    def quantities(self) -> dict[str, float]:
        return self.law.quantities()


def approach3_parameters(r_star: float | str | None) -> int:
    """E, A, B, α, β — and R* when it is fitted."""
    return 5 + (r_star == "fit")


def check_enough_points(table: ScalingTable, r_star: float | str | None = None) -> int:
    """The number of distinct (N, D) points — (N, D, U) for a data-constrained law — after
    raising :class:`DataError` unless there are more than Approach 3 has parameters.

    Rows, not points, were counted once: one (N, D) measured ten times then gave a
    "confident" fit (every start agreeing, zero-width intervals) of a law it cannot pin down.
    """
    n_params = approach3_parameters(r_star)
    points = table.distinct_points(with_unique_tokens=r_star is not None)
    if points <= n_params:
        raise DataError(f"{table.source}: Approach 3 fits {n_params} parameters but the data has {points} distinct "
                        f"(N, D) point(s) in {len(table)} rows; it needs more distinct points than parameters "
                        "(repeated measurements of one point do not count)")
    return points


def approach3_warnings(table: ScalingTable, r_star: float | str | None = None) -> list[str]:
    """Data that Approach 3 can fit but barely pins down: fewer than two distinct points per
    parameter, or fewer than three distinct N (or D) values for a power law in N (or D) with
    an offset."""
    n_params = approach3_parameters(r_star)
    points = table.distinct_points(with_unique_tokens=r_star is not None)
    out = []
    if points < 2 * n_params:
        out.append(f"Approach 3: {points} distinct (N, D) points for {n_params} parameters (fewer than two per "
                   "parameter): the fit is barely determined and its intervals are unreliable")
    for name, values in (("N", table.params), ("D", table.tokens)):
        distinct = len(np.unique(values))
        if distinct < 3:
            out.append(f"Approach 3: {distinct} distinct {name} value(s): the {name} term (its exponent and "
                       "coefficient, apart from E) is not identified; measure 3 or more")
    return out


def best_grid_starts(table: ScalingTable, n_starts: int = 16, r_star=None,
                     huber_delta: float = HUBER_DELTA) -> np.ndarray:
    """The ``n_starts`` grid initialisations with the lowest objective."""
    data = _prepare(table, r_star)
    grid = _grid(r_star == "fit")
    values = _grid_objective(grid, data, huber_delta)
    return grid[np.argsort(values, kind="stable")[:n_starts]]


def fit_loss_law(
    table: ScalingTable,
    huber_delta: float = HUBER_DELTA,
    r_star: float | str | None = None,
    n_starts: int = 16,
    starts: Sequence[Sequence[float]] | None = None,
) -> LawFit:
    """Approach 3: fit L(N, D) = E + A/N^α + B/D^β by Huber regression of ln L.

    ``r_star``: None for the plain law; a number to use the data-constrained D' with that
    R*; ``"fit"`` to fit R* too (needs rows with tokens > unique_tokens). L-BFGS-B runs
    from ``starts`` if given, else from the ``n_starts`` best points of :data:`GRID`.
    """
    check_enough_points(table, r_star)
    data = _prepare(table, r_star)
    names = ["a", "b", "e", "alpha", "beta"] + (["log_r_star"] if r_star == "fit" else [])
    bounds = [BOUNDS[n] for n in names]
    if starts is None:
        grid = _grid(r_star == "fit")
        starts = grid[np.argsort(_grid_objective(grid, data, huber_delta), kind="stable")[:n_starts]]
    results = []
    with single_threaded_blas():
        for x0 in starts:
            x0 = np.clip(np.asarray(x0, dtype=float), [b[0] for b in bounds], [b[1] for b in bounds])
            res = minimize(_objective, x0, args=(data, huber_delta), jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10})
            if np.isfinite(res.fun):
                results.append(res)
    if not results:
        raise DataError(f"{table.source}: Approach 3 did not converge from any initialisation")
    best = min(results, key=lambda res: res.fun)
    agree = sum(res.fun <= best.fun * (1 + 1e-6) + 1e-12 for res in results)
    theta = best.x
    a, b, e, alpha, beta = theta[:5]
    law = LossLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta),
                  r_star=(math.exp(theta[5]) if r_star == "fit" else (None if r_star is None else float(r_star))))
    residual = data.log_l - np.log(law.loss(table.params, table.tokens, table.unique_tokens))
    return LawFit(law=law, theta=theta, objective=float(best.fun) * huber_delta, n_points=len(table),
                  n_starts=len(results), n_agree=int(agree), residual_rms=float(np.sqrt(np.mean(residual ** 2))))


# --------------------------------------------------------------------------- all approaches


def _approach_entry(point: dict[str, float], boot: BootstrapResult | None, level: float) -> dict:
    entry = {"quantities": summarize(point, boot, level)}
    if boot is not None:
        entry["bootstrap"] = {"requested": boot.n_requested, "ok": boot.n_ok, "failed": boot.n_failed}
    return entry


def _optima_entry(result: ComputeOptima, boot: BootstrapResult | None, level: float) -> dict:
    entry = _approach_entry(result.quantities(), boot, level)
    entry["optima"] = [{"compute": c, "params": n, "tokens": d, "loss": loss}
                       for c, n, d, loss in zip(*(v.tolist() for v in (result.compute, result.params,
                                                                         result.tokens, result.loss)))]
    entry["budgets"] = result.details
    entry["skipped"] = result.skipped
    return entry


def fit_scaling(
    table: ScalingTable,
    approaches: Iterable[int] = (1, 2, 3),
    n_bootstrap: int = 100,
    seed: int = 0,
    level: float = 0.95,
    huber_delta: float = HUBER_DELTA,
    r_star: float | str | None = None,
    budget_tolerance: float = 0.05,
    n_starts: int = 16,
    bootstrap_starts: int = 2,
    strict: bool = True,
) -> dict:
    """Run the requested approaches on ``table`` with ``n_bootstrap`` resamples each.

    Returns a JSON-ready dict: ``approach{1,2,3}`` each with ``quantities`` (``{name:
    {value, low, high}}`` at confidence ``level``), Approach 3 also with its ``law`` and
    the bootstrap ``samples`` (law parameters per resample, for the planner's intervals).
    Bootstrap refits of Approach 3 start from the full-data optimum plus the
    ``bootstrap_starts − 1`` best grid points. With ``strict=False`` an approach the data
    does not support is listed under ``skipped`` instead of raising.
    """
    result: dict = {"format": FORMAT, "source": {"path": table.source, "rows": len(table), "columns": table.columns},
                    "settings": {"approaches": sorted(set(approaches)), "bootstrap": n_bootstrap, "seed": seed,
                                 "level": level, "huber_delta": huber_delta, "r_star": r_star,
                                 "budget_tolerance_decades": budget_tolerance},
                    "skipped": {}}
    warnings: list[str] = []
    if Path(table.source).is_file():
        result["source"]["sha256"] = sha256_file(table.source)
    for approach in sorted(set(approaches)):
        if approach not in (1, 2, 3):
            raise DataError(f"unknown approach {approach} (choose from 1, 2, 3)")
        try:
            if approach == 3:
                result["approach3"] = _fit_approach3(table, n_bootstrap, seed, level, huber_delta, r_star,
                                                     n_starts, bootstrap_starts)
                warnings += approach3_warnings(table, r_star)
            else:
                result[f"approach{approach}"] = _fit_optima(table, approach, n_bootstrap, seed, level,
                                                            budget_tolerance)
        except DataError as exc:
            if strict:
                raise
            result["skipped"][f"approach{approach}"] = str(exc)
            continue
        boot = result[f"approach{approach}"].get("bootstrap")
        if boot and boot["failed"] > 0.1 * boot["requested"]:
            warnings.append(f"Approach {approach}: {boot['failed']} of {boot['requested']} bootstrap resamples could "
                            "not be fitted (too few distinct points or budgets left in them); the intervals come "
                            "from the rest and are too narrow")
    if warnings:
        result["warnings"] = warnings
    return result


def _fit_optima(table, approach, n_bootstrap, seed, level, budget_tolerance) -> dict:
    def fitter(sample: ScalingTable) -> ComputeOptima:
        if approach == 1:
            return fit_envelope(sample)
        return fit_isoflops(sample, tolerance_decades=budget_tolerance)

    full = fitter(table)
    boot = None
    if n_bootstrap:
        boot = bootstrap(table, lambda sample: (fitter(sample).quantities(), None), n_bootstrap, seed)
    return _optima_entry(full, boot, level)


def _fit_approach3(table, n_bootstrap, seed, level, huber_delta, r_star, n_starts, bootstrap_starts) -> dict:
    full = fit_loss_law(table, huber_delta=huber_delta, r_star=r_star, n_starts=n_starts)
    boot = None
    if n_bootstrap:
        grid_starts = best_grid_starts(table, max(bootstrap_starts - 1, 0), r_star, huber_delta)
        starts = [full.theta, *grid_starts]

        def refit(sample: ScalingTable):
            fitted = fit_loss_law(sample, huber_delta=huber_delta, r_star=r_star, starts=starts)
            return fitted.quantities(), fitted.law

        boot = bootstrap(table, refit, n_bootstrap, seed)
    entry = _approach_entry(full.quantities(), boot, level)
    entry["law"] = full.law.to_dict()
    entry["fit"] = {"objective": full.objective, "points": full.n_points, "starts": full.n_starts,
                    "starts_agreeing": full.n_agree, "residual_rms": full.residual_rms}
    if boot is not None:
        columns = list(full.law.to_dict())
        entry["bootstrap"]["columns"] = columns
        entry["bootstrap"]["samples"] = [[getattr(law, c) for c in columns] for law in boot.extras]
    return entry


def law_from_fit(fit: dict) -> tuple[LossLaw, list[LossLaw]]:
    """The Approach-3 law of a fit dict and its bootstrap laws (empty without a bootstrap)."""
    entry = fit.get("approach3")
    if entry is None:
        raise DataError("the fit has no Approach 3 result (run `scaling fit` with --approach 3)")
    law = LossLaw.from_dict(entry["law"])
    boot = entry.get("bootstrap", {})
    columns = boot.get("columns", [])
    samples = [LossLaw.from_dict(dict(zip(columns, row))) for row in boot.get("samples", [])]
    return law, samples


def save_fit(path: str | Path, fit: dict) -> Path:
    """Write a fit dict as JSON atomically (a crash never leaves half a file)."""
    return atomic_write_json(path, fit)


def read_fit_json(path: str | Path, what: str = "fit") -> object:
    """The parsed JSON of a fit file; a missing file or bad JSON is a DataError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        return read_json(path)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc


def load_fit(path: str | Path) -> dict:
    """Read a fit JSON written by :func:`save_fit`, checking its format tag."""
    fit = read_fit_json(path)
    if not isinstance(fit, dict) or fit.get("format") != FORMAT:
        raise DataError(f"{path}: not an lmforge scaling fit (expected format {FORMAT!r})")
    return fit
