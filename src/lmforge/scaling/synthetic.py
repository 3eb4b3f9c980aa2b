"""Synthetic scaling data drawn from a known law, for tests, demos and checking the fitters.

Nothing here is measured: every loss is L(N, D) of a :class:`LossLaw` times
exp(ε), ε ~ Normal(0, noise), i.e. Gaussian noise on ln L.

- :func:`isoflop_design`: for each compute budget C, ``n_sizes`` model sizes spread
  evenly in log N over ``span_decades`` either side of the law's N_opt(C) (times
  ``offset``), with D = C / (6·N) — the shape of Hoffmann et al.'s IsoFLOP runs.
- :func:`training_curves`: model sizes, each observed at many token counts, as
  Approach 1 expects (each curve is a model's loss as it trains, with the schedule's
  effect ignored).
"""

from __future__ import annotations

import numpy as np

from lmforge.scaling.fit import LossLaw
from lmforge.scaling.table import ScalingTable, make_table


def noisy_losses(law: LossLaw, params, tokens, noise: float, rng: np.random.Generator,
                 unique_tokens=None) -> np.ndarray:
    """L(N, D) · exp(ε), ε ~ Normal(0, noise)."""
    clean = law.loss(params, tokens, unique_tokens)
    return clean * np.exp(rng.normal(0.0, noise, size=np.shape(clean)))


def isoflop_design(law: LossLaw, budgets, n_sizes: int = 9, span_decades: float = 0.8, offset: float = 1.0):
    """(N, D, C) arrays for an IsoFLOP design around each budget's compute-optimal N."""
    params, tokens, compute = [], [], []
    for budget in np.asarray(budgets, dtype=float):
        n_opt, _ = law.compute_optimal(budget)
        for shift in np.linspace(-span_decades, span_decades, n_sizes):
            n = float(n_opt) * offset * 10.0 ** shift
            params.append(n)
            tokens.append(budget / (6.0 * n))
            compute.append(budget)
    return np.array(params), np.array(tokens), np.array(compute)


def isoflop_table(law: LossLaw, budgets, n_sizes: int = 9, span_decades: float = 0.8, noise: float = 0.01,
                  seed: int = 0, offset: float = 1.0, outlier_fraction: float = 0.0,
                  outlier_factor: float = 1.3) -> ScalingTable:
    """An IsoFLOP data set with noisy losses; ``outlier_fraction`` of rows (chosen at
    random) have their loss multiplied by ``outlier_factor`` (a diverged or buggy run)."""
    rng = np.random.default_rng(seed)
    params, tokens, compute = isoflop_design(law, budgets, n_sizes, span_decades, offset)
    loss = noisy_losses(law, params, tokens, noise, rng)
    n_bad = int(round(outlier_fraction * len(loss)))
    if n_bad:
        loss[rng.choice(len(loss), n_bad, replace=False)] *= outlier_factor
    return make_table(params, tokens, loss, compute=compute, source="<synthetic isoflop>")


def training_curves(law: LossLaw, sizes, tokens_range=(1e8, 1e12), points_per_curve: int = 40,
                    noise: float = 0.0, seed: int = 0) -> ScalingTable:
    """One curve per model size: loss at ``points_per_curve`` token counts spaced evenly
    in log D over ``tokens_range``."""
    rng = np.random.default_rng(seed)
    params, tokens, runs = [], [], []
    for i, size in enumerate(np.asarray(sizes, dtype=float)):
        for d in np.geomspace(*tokens_range, points_per_curve):
            params.append(size)
            tokens.append(d)
            runs.append(f"run{i}")
    params, tokens = np.array(params), np.array(tokens)
    loss = noisy_losses(law, params, tokens, noise, rng)
    return make_table(params, tokens, loss, run=runs, source="<synthetic curves>")
