"""Figures for scaling fits (matplotlib, Agg backend), written as PNG files atomically.

- :func:`plot_isoflops`: loss against N for each compute budget, with the Approach-2
  parabola through each and its minimum marked.
- :func:`plot_loss_surface`: contours of the fitted L(N, D) over (log N, log D), the data
  points, lines of constant compute C = 6·N·D, and the compute-optimal frontier
  N_opt(C), D_opt(C).
- :func:`plot_residuals`: ln L − ln L̂ of the Approach-3 fit against N, coloured by D.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lmforge.core.io import atomic_write  # noqa: E402
from lmforge.scaling.fit import LossLaw  # noqa: E402
from lmforge.scaling.fit_isoflop import group_budgets  # noqa: E402
from lmforge.scaling.table import ScalingTable  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_isoflops(table: ScalingTable, approach2: dict | None, path: str | Path,
                  tolerance_decades: float = 0.05) -> Path:
    """Loss vs N per compute budget; ``approach2`` is the fit dict's ``approach2`` entry."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = group_budgets(table.compute, tolerance_decades)
    n_groups = int(labels.max()) + 1
    centers = np.array([np.mean(np.log(table.compute[labels == g])) for g in range(n_groups)])
    cmap = plt.get_cmap("viridis")

    def color(group: int):
        return cmap(group / max(n_groups - 1, 1))

    for group in range(n_groups):
        rows = labels == group
        ax.scatter(table.params[rows], table.loss[rows], s=14, color=color(group),
                   label=f"C = {np.exp(centers[group]):.1e}")
    for budget in (approach2 or {}).get("budgets", []):
        group = int(np.argmin(np.abs(centers - np.log(budget["compute"]))))
        p2, p1, p0 = budget["parabola"]
        x = np.linspace(*budget["log_params_range"], 100)
        ax.plot(np.exp(x), p2 * x * x + p1 * x + p0, color=color(group), lw=1)
        ax.plot(budget["params_opt"], budget["loss_opt"], "v", color=color(group), ms=8, mec="black")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss")
    ax.set_title("IsoFLOP profiles (Approach 2: parabola in log N, minimum marked)")
    if n_groups <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_loss_surface(law: LossLaw, table: ScalingTable | None, path: str | Path) -> Path:
    """Contours of L(N, D) with iso-compute lines and the compute-optimal frontier."""
    if table is not None and len(table):
        log_n = np.log10(table.params)
        log_d = np.log10(table.tokens)
        n_range = (log_n.min() - 0.5, log_n.max() + 1.0)
        d_range = (log_d.min() - 0.5, log_d.max() + 1.0)
    else:
        n_range, d_range = (7.0, 11.0), (9.0, 13.0)
    grid_n, grid_d = np.meshgrid(np.linspace(*n_range, 200), np.linspace(*d_range, 200))
    loss = law.loss(10.0 ** grid_n, 10.0 ** grid_d)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    levels = np.quantile(loss, np.linspace(0.02, 0.98, 15))
    contours = ax.contour(grid_n, grid_d, loss, levels=np.unique(levels), cmap="viridis", linewidths=0.8)
    ax.clabel(contours, fontsize=6, fmt="%.2f")
    log_c_low = np.log10(6.0) + n_range[0] + d_range[0]
    log_c_high = np.log10(6.0) + n_range[1] + d_range[1]
    for log_c in np.arange(np.ceil(log_c_low), np.floor(log_c_high) + 1):
        ax.plot(grid_n[0], log_c - np.log10(6.0) - grid_n[0], color="grey", lw=0.5, ls=":")
    compute = 10.0 ** np.linspace(log_c_low, log_c_high, 200)
    n_opt, d_opt = law.compute_optimal(compute)
    ax.plot(np.log10(n_opt), np.log10(d_opt), color="crimson", lw=2,
            label=f"compute-optimal: N ∝ C^{law.a:.3f}, D ∝ C^{law.b:.3f}")
    if table is not None and len(table):
        ax.scatter(log_n, log_d, s=10, color="black", label="runs")
    ax.set_xlim(*n_range)
    ax.set_ylim(*d_range)
    ax.set_xlabel("log10 parameters N")
    ax.set_ylabel("log10 tokens D")
    ax.set_title("Fitted loss L(N, D); dotted: constant compute 6ND")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_residuals(law: LossLaw, table: ScalingTable, path: str | Path) -> Path:
    """ln L − ln L̂ for every row against N, coloured by log10 D."""
    predicted = law.loss(table.params, table.tokens, table.unique_tokens)
    residual = np.log(table.loss) - np.log(predicted)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    points = ax.scatter(table.params, residual, c=np.log10(table.tokens), s=12, cmap="plasma")
    fig.colorbar(points, ax=ax, label="log10 tokens D")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("ln L − ln L̂")
    ax.set_title(f"Approach 3 residuals (RMS {np.sqrt(np.mean(residual ** 2)):.4f})")
    ax.grid(alpha=0.3)
    return _save(fig, path)
