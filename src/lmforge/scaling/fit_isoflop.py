"""Hoffmann et al. (2022) Approaches 1 and 2: where is the loss lowest for each compute budget?

Both approaches estimate the compute-optimal model size N_opt(C) and data D_opt(C)
directly, without assuming a form for L(N, D), and summarise them as power laws

    N_opt = k_N · C^a,    D_opt = k_D · C^b,

fitted by least squares on log N_opt = a·log C + log k_N (and likewise for D).
With D_opt = C / (6·N_opt) the exponents satisfy a + b = 1.

**Approach 1 — minimum-loss envelope.** Every row is a point (N, D, L) on some training
curve. For a grid of compute values C, each curve's loss at C is read off by linear
interpolation of L against log C along the curve, and the curve with the lowest loss wins:
(N_opt, D_opt) is that curve's model size and its tokens at C.

**Approach 2 — IsoFLOP profiles.** Rows are grouped into compute budgets (equal C within
a tolerance). Within a budget, L is fitted by a parabola in x = ln N,

    L ≈ p2·x² + p1·x + p0,    N_opt = exp(−p1 / (2·p2)),

and D_opt = C / (6·N_opt). A budget whose parabola opens downwards, or whose minimum lies
outside the model sizes tried there, gives no trustworthy N_opt and is skipped (listed
with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmforge.core.errors import DataError
from lmforge.scaling.table import ScalingTable


@dataclass
class PowerLaw:
    """y = coefficient · C^exponent, from least squares in log–log space."""

    exponent: float
    coefficient: float

    def __call__(self, compute):
        return self.coefficient * np.asarray(compute, dtype=float) ** self.exponent


def fit_power_law(compute: np.ndarray, values: np.ndarray) -> PowerLaw:
    """Least-squares fit of ln y = exponent·ln C + ln coefficient."""
    x, y = np.log(compute), np.log(values)
    if len(np.unique(x)) < 2:
        raise DataError("need optima at two or more compute values to fit a power law")
    slope, intercept = np.polyfit(x, y, 1)
    return PowerLaw(exponent=float(slope), coefficient=float(np.exp(intercept)))


@dataclass
class ComputeOptima:
    """Optimal (N, D) found at several compute values, and their power laws."""

    approach: int
    compute: np.ndarray
    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    params_law: PowerLaw
    tokens_law: PowerLaw
    details: list[dict] = field(default_factory=list)   # per budget (Approach 2)
    skipped: list[dict] = field(default_factory=list)   # budgets or bins left out, with reasons

    def quantities(self) -> dict[str, float]:
        """The fitted numbers the bootstrap gives intervals for."""
        return {
            "a": self.params_law.exponent,
            "b": self.tokens_law.exponent,
            "params_coefficient": self.params_law.coefficient,
            "tokens_coefficient": self.tokens_law.coefficient,
        }


def _finish(approach: int, compute, params, tokens, loss, details, skipped) -> ComputeOptima:
    compute, params, tokens, loss = (np.asarray(v, dtype=float) for v in (compute, params, tokens, loss))
    if len(compute) < 2:
        raise DataError(f"Approach {approach}: found optima at {len(compute)} compute value(s); need 2 or more"
                        + (f" ({len(skipped)} left out: {skipped[0]['reason']}, ...)" if skipped else ""))
    return ComputeOptima(
        approach=approach, compute=compute, params=params, tokens=tokens, loss=loss,
        params_law=fit_power_law(compute, params), tokens_law=fit_power_law(compute, tokens),
        details=details, skipped=skipped,
    )


def group_budgets(compute: np.ndarray, tolerance_decades: float = 0.05) -> np.ndarray:
    """Label rows with a budget index: sorted log10 C values within ``tolerance_decades``
    of the first value of their group share a label."""
    log_c = np.log10(np.asarray(compute, dtype=float))
    order = np.argsort(log_c, kind="stable")
    labels = np.empty(len(log_c), dtype=int)
    label, start = -1, -np.inf
    for i in order:
        if log_c[i] - start > tolerance_decades:
            label, start = label + 1, log_c[i]
        labels[i] = label
    return labels


def fit_isoflops(table: ScalingTable, tolerance_decades: float = 0.05, min_sizes: int = 3) -> ComputeOptima:
    """Approach 2: a parabola in ln N per compute budget; power laws through the minima.

    Rows are grouped with :func:`group_budgets`; a budget's C is the geometric mean of its
    rows' C. Budgets with fewer than ``min_sizes`` distinct N are skipped.
    """
    labels = group_budgets(table.compute, tolerance_decades)
    compute, params, tokens, loss, details, skipped = [], [], [], [], [], []
    for label in np.unique(labels):
        rows = labels == label
        budget = float(np.exp(np.mean(np.log(table.compute[rows]))))
        x = np.log(table.params[rows])
        y = table.loss[rows]
        if len(np.unique(x)) < min_sizes:
            skipped.append({"compute": budget, "reason": f"{len(np.unique(x))} model size(s), need {min_sizes}"})
            continue
        p2, p1, p0 = np.polyfit(x, y, 2)
        if not p2 > 0:
            skipped.append({"compute": budget, "reason": "parabola opens downwards (no minimum)"})
            continue
        x_opt = -p1 / (2.0 * p2)
        if not x.min() <= x_opt <= x.max():
            skipped.append({"compute": budget, "reason": "minimum outside the model sizes tried"})
            continue
        n_opt = float(np.exp(x_opt))
        l_opt = float(p0 - p1 * p1 / (4.0 * p2))
        compute.append(budget)
        params.append(n_opt)
        tokens.append(budget / (6.0 * n_opt))
        loss.append(l_opt)
        details.append({"compute": budget, "n_points": int(rows.sum()), "parabola": [float(p2), float(p1), float(p0)],
                        "params_opt": n_opt, "tokens_opt": budget / (6.0 * n_opt), "loss_opt": l_opt,
                        "log_params_range": [float(x.min()), float(x.max())]})
    return _finish(2, compute, params, tokens, loss, details, skipped)


def _curves(table: ScalingTable) -> list[dict]:
    """Each curve's points sorted by ln C, duplicate C values averaged."""
    ids = table.curve_ids()
    curves = []
    for curve in np.unique(ids):
        rows = ids == curve
        log_c = np.log(table.compute[rows])
        unique_c, inverse = np.unique(log_c, return_inverse=True)
        if len(unique_c) < 2:
            continue
        counts = np.bincount(inverse)
        curves.append({
            "params": float(np.exp(np.mean(np.log(table.params[rows])))),
            "log_compute": unique_c,
            "loss": np.bincount(inverse, weights=table.loss[rows]) / counts,
            "log_tokens": np.bincount(inverse, weights=np.log(table.tokens[rows])) / counts,
        })
    return curves


def fit_envelope(table: ScalingTable, n_points: int = 60, drop_edge_sizes: bool = True) -> ComputeOptima:
    """Approach 1: the minimum-loss envelope of the training curves.

    ``n_points`` compute values, evenly spaced in log C over the range the curves cover,
    each get the curve with the lowest interpolated loss there (at least two curves must
    cover it). With ``drop_edge_sizes``, values won by the smallest or the largest model
    are left out: the true optimum may lie beyond the sizes that were trained.
    """
    curves = _curves(table)
    if len(curves) < 2:
        raise DataError("Approach 1 needs two or more training curves (rows grouped by run, or by N), "
                        "each with two or more compute values")
    sizes = np.array([c["params"] for c in curves])
    low = min(c["log_compute"][0] for c in curves)
    high = max(c["log_compute"][-1] for c in curves)
    compute, params, tokens, loss, skipped = [], [], [], [], []
    for log_c in np.linspace(low, high, n_points):
        best, best_loss, best_tokens, covering = None, np.inf, np.nan, 0
        for i, curve in enumerate(curves):
            xs = curve["log_compute"]
            if not xs[0] <= log_c <= xs[-1]:
                continue
            covering += 1
            value = float(np.interp(log_c, xs, curve["loss"]))
            if value < best_loss:
                best, best_loss = i, value
                best_tokens = float(np.exp(np.interp(log_c, xs, curve["log_tokens"])))
        if covering < 2:
            continue
        if drop_edge_sizes and sizes[best] in (sizes.min(), sizes.max()):
            skipped.append({"compute": float(np.exp(log_c)), "reason": "won by the smallest or largest model"})
            continue
        compute.append(float(np.exp(log_c)))
        params.append(sizes[best])
        tokens.append(best_tokens)
        loss.append(best_loss)
    if len(set(params)) < 2:
        raise DataError(f"Approach 1: the envelope is won by {len(set(params))} model size(s) away from the "
                        "edges; need 2 or more (train more sizes, or longer)")
    return _finish(1, compute, params, tokens, loss, [], skipped)
