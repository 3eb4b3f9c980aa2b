"""Predict a held-out rung from the others, before it trains; later, score the prediction.

**Which law.** With ``law: auto``:

- **Approach 3**, L(N, D) = E + A/N^α + B/D^β (``scaling.fit``), when the fitted rungs
  vary N and D independently — at least 3 sizes, some size at 2 or more token counts,
  and 8 or more rungs (5 parameters need well over 5 points). This extrapolates in N at
  the held-out size's own D, which is the question a ladder asks.
- Otherwise an **offset power law in compute**, L(C) = E + A·(C/C_ref)^−γ (3 parameters,
  C_ref the geometric mean of the fitted C for conditioning). A ladder with one D per size
  (fixed tokens per parameter, or one size per budget) is a one-parameter family: N and D
  cannot be separated, and fitting five parameters to it would be arbitrary.

**Intervals.** Approach 3: the case bootstrap of ``fit_scaling`` (rungs resampled with
replacement, law refitted; the prediction recomputed under each refit). Power law: a
residual bootstrap (fitted values plus resampled residuals, inflated by √(n/(n−3))),
because resampling 4–6 rungs case-wise leaves too few distinct points to refit. Either
interval covers fit noise only, not a law of the wrong form.

**Two-step (downstream) variant.** The second step maps the predicted loss to metrics
measured on the same rungs, each through a straight line metric = a + b·loss fitted on the
fitted rungs: every domain's held-out bits-per-byte (``bpb_<domain>``), and, when the runs
scored lmforge's held-out multiple-choice tasks (``eval.task_items`` > 0), each task's
``acc_norm_<task>`` (a line is a local approximation; accuracy saturates, so a sigmoid
link is the better choice over a wide range). Each bootstrap draw pairs one loss
prediction with a line refitted on resampled rungs.

The prediction is written with a UTC timestamp before the held-out rungs start, copied to
``prediction_before_training.json`` (never rewritten), and its SHA-256 kept when
:func:`score_prediction` later adds the measured values and the relative errors
(predicted − actual) / actual.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize_scalar, nnls

from lmforge.core.errors import DataError
from lmforge.scaling.fit import BOUNDS, fit_scaling, law_from_fit
from lmforge.scaling.fit_bootstrap import percentile_interval
from lmforge.scaling.table import make_table

FORMAT = "lmforge.scaling.ladder_prediction/1"
MIN_APPROACH3_ROWS = 8


def utc_now() -> tuple[str, float]:
    now = time.time()
    return datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"), now


# --------------------------------------------------------------------------- L(C) = E + A·(C/C_ref)^-γ


@dataclass(frozen=True)
class OffsetPowerLaw:
    E: float
    A: float
    gamma: float
    x_ref: float

    def __call__(self, x) -> np.ndarray:
        return self.E + self.A * (np.asarray(x, dtype=float) / self.x_ref) ** -self.gamma

    def to_dict(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "gamma": self.gamma, "x_ref": self.x_ref}


def _solve_linear(z: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(E, A, SSE) of y ≈ E + A·z with E, A ≥ 0 (non-negative least squares)."""
    coef, residual = nnls(np.stack([np.ones_like(z), z], axis=1), y)
    return float(coef[0]), float(coef[1]), float(residual ** 2)


def fit_offset_power_law(x: Sequence[float], y: Sequence[float]) -> OffsetPowerLaw:
    """Least squares L = E + A·(x/x_ref)^−γ with E, A ≥ 0, γ in [1e-3, 3].

    For fixed γ the model is linear in (E, A), solved exactly; γ is then found by a grid
    over log γ and a bounded Brent refinement around the best grid point.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(x)) < 4:  # 3 parameters: 3 points are fitted exactly, with nothing left to judge the fit by
        raise DataError(f"a power law with an offset (3 parameters) needs 4 or more distinct x values, "
                        f"got {len(np.unique(x))}")
    x_ref = float(np.exp(np.mean(np.log(x))))
    log_x = np.log(x / x_ref)

    def sse(log_gamma: float) -> float:
        return _solve_linear(np.exp(-math.exp(log_gamma) * log_x), y)[2]

    grid = np.linspace(math.log(1e-3), math.log(3.0), 61)
    values = [sse(g) for g in grid]
    best = int(np.argmin(values))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    res = minimize_scalar(sse, bounds=(low, high), method="bounded", options={"xatol": 1e-8})
    log_gamma = float(res.x) if res.fun <= values[best] else float(grid[best])
    gamma = math.exp(log_gamma)
    e, a, _ = _solve_linear(np.exp(-gamma * log_x), y)
    return OffsetPowerLaw(E=e, A=a, gamma=gamma, x_ref=x_ref)


# --------------------------------------------------------------------------- choosing and fitting


def choose_law(rows: list[dict[str, Any]], requested: str = "auto") -> tuple[str, str]:
    """(``approach3`` or ``power_law``, the reason) for these fitted rows."""
    sizes: dict[float, set[float]] = {}
    for row in rows:
        sizes.setdefault(float(row["N"]), set()).add(float(row["D"]))
    multi_d = any(len(ds) > 1 for ds in sizes.values())
    separable = len(sizes) >= 3 and multi_d and len(rows) >= MIN_APPROACH3_ROWS
    if requested == "approach3":
        if not separable:
            raise DataError(f"Approach 3 needs 3+ sizes, some size at 2+ token counts and {MIN_APPROACH3_ROWS}+ "
                            f"rungs; the fitted rungs have {len(sizes)} sizes and {len(rows)} rungs")
        return "approach3", "requested in the ladder config (fit.law: approach3)"
    if requested == "power_law":
        return "power_law", "requested in the ladder config (fit.law: power_law)"
    if separable:
        return "approach3", (f"{len(rows)} rungs over {len(sizes)} sizes with several token counts per size: "
                             "N and D vary independently, so L(N, D) = E + A/N^alpha + B/D^beta is identifiable")
    return "power_law", (f"{len(rows)} rungs over {len(sizes)} sizes, "
                         f"{'several' if multi_d else 'one'} token count(s) per size: too few, or N and D move "
                         "together, for the 5-parameter L(N, D); fitting L(C) = E + A (C/C_ref)^-gamma")


def fit_warnings(kind: str, params: dict[str, Any]) -> list[str]:
    """Signs that the fitted law is degenerate (a parameter at its bound), which the numbers alone hide."""
    value = {k: (v["value"] if isinstance(v, dict) else v) for k, v in params.items()}
    out = []
    if kind == "approach3":
        for name in ("alpha", "beta"):
            low, high = BOUNDS[name]
            if not low * 1.01 < value[name] < high * 0.99:
                out.append(f"{name} = {value[name]:.3g} is at its bound: the fitted rungs barely constrain the "
                           f"{'N' if name == 'alpha' else 'D'} dependence, so the prediction rests on the other term")
        if value["E"] < 1e-3:
            out.append("E (irreducible loss) fitted as ~0: the rungs are far from the loss floor, so E is not identified")
    else:
        if not 1.01e-3 < value["gamma"] < 2.99:
            out.append(f"gamma = {value['gamma']:.3g} is at its bound")
        if value["E"] <= 0.0:
            out.append("E (irreducible loss) fitted as 0: a plain power law fits the rungs as well")
    return out


def _estimate(value: float, samples: Sequence[float], level: float) -> dict[str, float]:
    out = {"value": float(value)}
    finite = [s for s in samples if np.isfinite(s)]
    if finite:
        out["low"], out["high"] = percentile_interval(np.asarray(finite), level)
    return out


def _fit_approach3(rows, targets, n_bootstrap, seed, level):
    table = make_table([r["N"] for r in rows], [r["D"] for r in rows], [r["loss"] for r in rows],
                       run=[r["rung"] for r in rows], source="ladder.csv (fitted rungs)")
    fit = fit_scaling(table, approaches=(3,), n_bootstrap=n_bootstrap, seed=seed, level=level)
    law, samples = law_from_fit(fit)
    point = [float(law.loss(t["N"], t["D"])) for t in targets]
    draws = [[float(s.loss(t["N"], t["D"])) for s in samples] for t in targets]
    info = {"params": fit["approach3"]["quantities"], "law": law.to_dict(), "fit": fit["approach3"]["fit"],
            "bootstrap": {k: v for k, v in fit["approach3"].get("bootstrap", {}).items() if k != "samples"},
            "fitted_values": [float(law.loss(r["N"], r["D"])) for r in rows],
            "warnings": fit.get("warnings", [])}
    return point, draws, info


def _fit_power_law(rows, targets, n_bootstrap, seed, level):
    x = np.array([r["C"] for r in rows], dtype=float)
    y = np.array([r["loss"] for r in rows], dtype=float)
    law = fit_offset_power_law(x, y)
    fitted = law(x)
    residuals = (y - fitted) * math.sqrt(len(y) / max(len(y) - 3, 1))
    rng = np.random.default_rng(seed)
    draws: list[list[float]] = [[] for _ in targets]
    failed = 0
    for _ in range(n_bootstrap):
        try:
            refit = fit_offset_power_law(x, fitted + rng.choice(residuals, size=len(y), replace=True))
        except DataError:
            failed += 1
            continue
        for i, t in enumerate(targets):
            draws[i].append(float(refit(t["C"])))
    point = [float(law(t["C"])) for t in targets]
    info = {"params": law.to_dict(), "x": "C = 6 N_active D",
            "fit": {"residual_rms": float(np.sqrt(np.mean((y - fitted) ** 2))), "points": len(y)},
            "bootstrap": {"kind": "residual", "requested": n_bootstrap, "ok": n_bootstrap - failed,
                          "failed": failed},
            "fitted_values": fitted.tolist()}
    return point, draws, info


def _downstream(rows, loss_point: float, loss_draws: Sequence[float], columns: list[str], seed: int,
                level: float) -> dict[str, dict]:
    """metric = a + b·loss fitted on ``rows`` for each column; mapped predictions with paired bootstrap draws."""
    loss = np.array([r["loss"] for r in rows], dtype=float)
    out = {}
    rng = np.random.default_rng(seed + 1)
    for column in columns:
        target = np.array([r[column] for r in rows], dtype=float)
        slope, intercept = np.polyfit(loss, target, 1)
        draws = []
        for sample in loss_draws:
            index = rng.integers(0, len(rows), size=len(rows))
            if len(np.unique(loss[index])) < 2:
                continue
            b, a = np.polyfit(loss[index], target[index], 1)
            draws.append(float(a + b * sample))
        entry = _estimate(intercept + slope * loss_point, draws, level)
        entry["map"] = {"intercept": float(intercept), "slope": float(slope),
                        "residual_rms": float(np.sqrt(np.mean((target - intercept - slope * loss) ** 2)))}
        out[column] = entry
    return out


def downstream_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Second-step targets present in every row: ``bpb_<domain>`` and, when the runs scored
    the held-out tasks, ``acc_norm_<task>``."""
    names = [k for k in rows[0] if k.startswith(("bpb_", "acc_norm_"))] if rows else []
    return [c for c in names if all(r.get(c) is not None for r in rows)]


def make_prediction(ladder: str, rows: list[dict[str, Any]], targets: list[dict[str, Any]], law: str = "auto",
                    n_bootstrap: int = 200, seed: int = 0, level: float = 0.9, count: str = "active") -> dict:
    """Fit ``rows`` (ladder.csv rows of the trained rungs) and predict every target rung.

    ``targets``: dicts with ``rung``, ``N`` (same count as the rows), ``D``, ``C`` — the
    planned values of the held-out rungs. Returns the JSON-ready prediction.
    """
    if not rows:
        raise DataError("no finished rungs to fit: train the smaller rungs first")
    if not targets:
        raise DataError("no held-out rungs to predict")
    kind, reason = choose_law(rows, law)
    fitter = _fit_approach3 if kind == "approach3" else _fit_power_law
    point, draws, info = fitter(rows, targets, n_bootstrap, seed, level)
    columns = downstream_columns(rows)
    written_at, unix = utc_now()
    predictions = []
    for t, value, samples in zip(targets, point, draws):
        predictions.append({
            "rung": t["rung"], "N": t["N"], "D": t["D"], "C": t["C"],
            "loss": _estimate(value, samples, level),
            "downstream": _downstream(rows, value, samples, columns, seed, level),
        })
    headline = max(targets, key=lambda t: t["C"])["rung"]
    return {
        "format": FORMAT, "ladder": ladder, "written_at": written_at, "written_unix": unix,
        "post_hoc": False, "count": count, "level": level,
        "law": {"kind": kind, "reason": reason, **info},
        "warnings": fit_warnings(kind, info["params"]) + info.pop("warnings", []),
        "fitted_rungs": [r["rung"] for r in rows],
        "downstream_note": "two-step: the predicted held-out loss is mapped to each second-step metric by a "
                           "line fitted on the same rungs: every domain's bits-per-byte, and each held-out "
                           "task's acc_norm when the runs scored tasks (eval.task_items > 0)",
        "predictions": predictions, "headline": headline,
    }


def score_prediction(prediction: dict, rows: list[dict[str, Any]], started: dict[str, float] | None = None) -> dict:
    """Add measured values, relative errors (predicted − actual)/actual and interval hits."""
    by_rung = {r["rung"]: r for r in rows}
    scored = copy.deepcopy(prediction)
    errors = []
    for entry in scored["predictions"]:
        row = by_rung.get(entry["rung"])
        if row is None:
            entry.pop("actual", None)
            continue
        actual = {"loss": row["loss"], **{k: row.get(k) for k in entry["downstream"]}}
        entry["actual"] = actual
        entry["relative_error"], entry["inside_interval"] = {}, {}
        for key, estimate in [("loss", entry["loss"]), *entry["downstream"].items()]:
            if actual.get(key) is None:
                continue
            entry["relative_error"][key] = estimate["value"] / actual[key] - 1.0
            if "low" in estimate:
                entry["inside_interval"][key] = bool(estimate["low"] <= actual[key] <= estimate["high"])
        errors.append(abs(entry["relative_error"]["loss"]))
    scored["scored_at"] = utc_now()[0]
    if started:
        first = min(started.values())
        scored["order_check"] = {
            "first_holdout_start_unix": first,
            "first_holdout_start": datetime.fromtimestamp(first, timezone.utc).isoformat(timespec="milliseconds"),
            "prediction_written_before_training": bool(prediction["written_unix"] < first),
        }
    head = next((e for e in scored["predictions"] if e["rung"] == scored["headline"]), None)
    scored["summary"] = {
        "headline_rung": scored["headline"],
        "loss_relative_error": head.get("relative_error", {}).get("loss") if head else None,
        "mean_abs_loss_relative_error": float(np.mean(errors)) if errors else None,
        "scored_rungs": len(errors),
    }
    return scored
