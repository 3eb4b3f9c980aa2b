"""Bootstrap confidence intervals for any fitted quantity (numpy only).

Resample the distinct (N, D) points of the table with replacement — each drawn point
brings all its rows, so repeated measurements of one point (seeds, duplicated rows) move
together instead of counting as independent evidence — refit, and collect every quantity
the refit returns. When every row is its own point this is the ordinary case bootstrap of
rows. The interval at level ``q`` is the percentile interval

    [ P_{(1-q)/2}(samples), P_{(1+q)/2}(samples) ]

of the refitted values (Efron's percentile bootstrap). Derived quantities (a = β/(α+β),
G, ...) get intervals the same way, from their values in each refit, so their
correlations with the fitted parameters are kept. Resamples on which the fit fails (too
few compute budgets left, say) are counted and left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from lmforge.core.errors import DataError
from lmforge.scaling.table import ScalingTable


@dataclass
class BootstrapResult:
    """Refitted values per quantity (one entry per successful resample)."""

    samples: dict[str, np.ndarray]
    n_requested: int
    n_failed: int
    seed: int | None
    extras: list = field(default_factory=list)  # whatever else each refit returned (e.g. a law)

    @property
    def n_ok(self) -> int:
        return self.n_requested - self.n_failed

    def interval(self, name: str, level: float) -> tuple[float, float]:
        return percentile_interval(self.samples[name], level)


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Central ``level`` percentile interval of ``values`` (NaNs ignored; (nan, nan) if empty)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def resample_indices(groups: np.ndarray, n_samples: int, seed: int | None) -> list[np.ndarray]:
    """``n_samples`` row-index arrays, each made of as many groups as there are, drawn with
    replacement (seeded); ``groups`` labels every row with its group 0 … G−1. With one row
    per group this is the plain row resample."""
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    members = [np.flatnonzero(groups == g) for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_samples, n_groups))
    return [np.concatenate([members[g] for g in draw]) for draw in draws]


def bootstrap(
    table: ScalingTable,
    refit: Callable[[ScalingTable], tuple[Mapping[str, float], object]],
    n_samples: int,
    seed: int | None = 0,
) -> BootstrapResult:
    """Refit ``n_samples`` resamples of ``table``'s distinct points (:meth:`ScalingTable.point_ids`).

    ``refit(resampled_table)`` returns ``(quantities, extra)``: a mapping of named floats
    and any object to keep alongside (e.g. the refitted law). A refit that raises
    :class:`DataError` or ``LinAlgError`` counts as failed.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    collected: dict[str, list[float]] = {}
    extras: list = []
    failed = 0
    for index in resample_indices(table.point_ids(), n_samples, seed):
        try:
            quantities, extra = refit(table.take(index))
        except (DataError, np.linalg.LinAlgError):
            failed += 1
            continue
        for name, value in quantities.items():
            collected.setdefault(name, []).append(float(value))
        extras.append(extra)
    return BootstrapResult(
        samples={name: np.asarray(v) for name, v in collected.items()},
        n_requested=n_samples, n_failed=failed, seed=seed, extras=extras,
    )


def summarize(point: Mapping[str, float], boot: BootstrapResult | None, level: float) -> dict[str, dict]:
    """``{name: {"value": v, "low": lo, "high": hi}}``; no bounds without a bootstrap."""
    out: dict[str, dict] = {}
    for name, value in point.items():
        entry = {"value": float(value)}
        if boot is not None and name in boot.samples:
            entry["low"], entry["high"] = boot.interval(name, level)
        out[name] = entry
    return out
