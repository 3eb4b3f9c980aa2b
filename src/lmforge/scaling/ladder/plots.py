"""The ladder's fit (``scaling fit`` of every finished rung) and its figures.

- ``fit/``: ``fit.json`` and the usual ``scaling fit`` plots, from ``ladder.csv`` read
  with the fitter's default columns (Approaches the data cannot support are skipped).
- ``curves.png``: every rung's own training-loss segment against tokens (a WSD chain draws
  as a tree: each branch leaves its parent at the decay start), coloured by model size,
  and each rung's final held-out loss as a dot.
- ``prediction.png``: final held-out loss against compute for every rung, the law fitted
  for the held-out prediction, the predicted interval of each held-out rung and the
  measured value.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lmforge.core.code_version import code_version  # noqa: E402
from lmforge.core.errors import DataError  # noqa: E402
from lmforge.core.io import atomic_write, atomic_write_text  # noqa: E402
from lmforge.scaling.ladder.gather import CURVES_CSV, LADDER_CSV  # noqa: E402
from lmforge.scaling.ladder.plan import LadderPlan  # noqa: E402

FIT_DIR = "fit"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def _colors(plan: LadderPlan) -> dict[int, tuple]:
    sizes = sorted({r.size for r in plan.rungs})
    cmap = plt.get_cmap("viridis")
    return {s: cmap(i / max(len(sizes) - 1, 1)) for i, s in enumerate(sizes)}


def _smooth(values: list[float], width: int = 5) -> np.ndarray:
    if len(values) < width:
        return np.asarray(values, dtype=float)
    kernel = np.ones(width) / width
    padded = np.concatenate([[values[0]] * (width // 2), values, [values[-1]] * (width // 2)])
    return np.convolve(padded, kernel, mode="valid")


def plot_curves(plan: LadderPlan, path: Path) -> Path | None:
    """Each rung's own training-loss segment (a WSD branch starts at its parent's decay start,
    so a size's chain draws as a tree), and every rung's final held-out loss as a dot."""
    source = plan.ladder_dir / CURVES_CSV
    if not source.is_file():
        return None
    with open(source, newline="") as handle:
        records = [r for r in csv.DictReader(handle) if r["loss"]]
    if not records:
        return None
    colors = _colors(plan)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    labelled = set()
    for rung in plan.rungs:
        own = [r for r in records if r["rung"] == rung.name and r["source"] == rung.name]
        train = [(float(r["tokens"]), float(r["loss"])) for r in own if r["kind"] == "train"]
        evals = [(float(r["tokens"]), float(r["loss"])) for r in own if r["kind"] == "eval"]
        if train:
            x, y = zip(*train)
            label = f"d{rung.d_model}L{rung.n_layers}" if rung.size not in labelled else None
            labelled.add(rung.size)
            ax.plot(x, _smooth(list(y)), color=colors[rung.size], lw=0.9, alpha=0.85, label=label)
        if evals:
            ax.plot(*evals[-1], "o", color=colors[rung.size], ms=5, mec="black", mew=0.8 if rung.holdout else 0.3)
    ax.set_xscale("log")
    ax.set_xlabel("tokens D")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"Ladder {plan.cfg.name}: training loss (smoothed); dots: final held-out loss", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    low = min(float(r["loss"]) for r in records)
    ax.set_ylim(bottom=low - 0.1, top=low + 2.5)  # the first steps' losses would flatten the rest
    return _save(fig, path)


def plot_prediction(plan: LadderPlan, rows: list[dict], prediction: dict, path: Path) -> Path:
    colors = _colors(plan)
    by_name = {r.name: r for r in plan.rungs}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fitted = set(prediction["fitted_rungs"])
    labels = {"fitted": "fitted rungs", "held": "held out (measured)"}
    for row in rows:
        rung = by_name.get(row["rung"])
        if rung is None:
            continue
        group = "fitted" if row["rung"] in fitted else "held"
        ax.plot(row["C"], row["loss"], "o" if group == "fitted" else "*", color=colors[rung.size],
                ms=5 if group == "fitted" else 11, mec="black", mew=0.4 if group == "fitted" else 0.8,
                label=labels.pop(group, None))
    law = prediction["law"]
    if law["kind"] == "approach3":
        from lmforge.scaling.fit import LossLaw

        fitted_law = LossLaw.from_dict(law["law"])
        for size in sorted({r.size for r in plan.rungs}):
            rungs = [r for r in plan.rungs if r.size == size]
            tokens = np.geomspace(min(r.tokens for r in rungs), max(r.tokens for r in rungs), 50)
            n = rungs[0].params(plan.cfg.count)
            ax.plot(6.0 * rungs[0].counts.active * tokens, fitted_law.loss(n, tokens), color=colors[size], lw=0.8,
                    ls="--" if rungs[0].holdout else "-")
    else:
        from lmforge.scaling.ladder.predict import OffsetPowerLaw

        p = law["params"]
        curve = OffsetPowerLaw(p["E"], p["A"], p["gamma"], p["x_ref"])
        xs = np.geomspace(min(r.compute for r in plan.rungs), max(r.compute for r in plan.rungs), 100)
        ax.plot(xs, curve(xs), color="grey", lw=1, label=f"L(C) = {p['E']:.3g} + A (C/C_ref)^-{p['gamma']:.3g}")
    for entry in prediction["predictions"]:
        est = entry["loss"]
        low, high = est.get("low", est["value"]), est.get("high", est["value"])
        ax.errorbar(entry["C"], est["value"], yerr=[[est["value"] - low], [high - est["value"]]], fmt="s",
                    color="crimson", ms=4, capsize=3, lw=1,
                    label="predicted" if entry is prediction["predictions"][0] else None)
    ax.set_xscale("log")
    ax.set_xlabel("compute C = 6 N_active D (FLOPs)")
    ax.set_ylabel("final held-out loss")
    level = f"{prediction['level']:.0%}"
    ax.set_title(f"Held-out prediction ({law['kind']}; {level} bootstrap interval)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def fit_and_plot(plan: LadderPlan, rows: list[dict], prediction: dict | None) -> list[Path]:
    """``scaling fit`` of ladder.csv into fit/, plus curves.png and prediction.png."""
    from lmforge.scaling import plots
    from lmforge.scaling.fit import fit_scaling, law_from_fit, save_fit
    from lmforge.scaling.table import read_table

    written: list[Path] = []
    rule = plan.cfg.fit
    fit = None
    if plan.cfg.epochs is not None:  # an epochs sweep: R*_D at each size, not L(N, D)
        from lmforge.scaling.ladder.epochs import fit_and_plot_epochs

        written += fit_and_plot_epochs(plan, rows)
        rows = []
    if len(rows) >= 2:
        try:
            table = read_table(plan.ladder_dir / LADDER_CSV)
            fit = fit_scaling(table, approaches=(1, 2, 3), n_bootstrap=rule.bootstrap, seed=rule.seed,
                              level=rule.level, strict=False)
        except DataError as exc:  # e.g. a column left empty by an incomplete run directory
            written.append(atomic_write_text(plan.ladder_dir / FIT_DIR / "SKIPPED.txt",
                                             f"scaling fit of {LADDER_CSV} skipped: {exc}\n"))
    if fit is not None:
        fit["command"] = ["lmforge", "scaling", "fit", str(plan.ladder_dir / LADDER_CSV), "--bootstrap",
                          str(rule.bootstrap), "--level", str(rule.level)]
        version = code_version()
        fit["code_version"] = {key: version[key] for key in ("version", "commit", "dirty")}
        out = plan.ladder_dir / FIT_DIR
        written.append(save_fit(out / "fit.json", fit))
        if "approach2" in fit:
            written.append(plots.plot_isoflops(table, fit["approach2"], out / "isoflops.png"))
        if "approach3" in fit:
            law, _ = law_from_fit(fit)
            written.append(plots.plot_loss_surface(law, table, out / "loss_surface.png"))
            written.append(plots.plot_residuals(law, table, out / "residuals.png"))
    curves = plot_curves(plan, plan.ladder_dir / "curves.png")
    if curves is not None:
        written.append(curves)
    if prediction is not None:
        written.append(plot_prediction(plan, rows, prediction, plan.ladder_dir / "prediction.png"))
    return written
