"""The epochs sweep's fit and figure: R*_D from the finished runs of a ladder with ``epochs:``.

A ladder with an ``epochs`` section (``configs/epochs_cpu.yaml``) trains, per model size, a
unique-token budget U repeated R times and R·U fresh tokens seen once, for every R (see
``ladder.plan.epochs_targets``; the loader's ``data.unique_tokens`` restricts and repeats
the data). After the runs, this module fits the data-constrained law at each size
(``scaling.fit_repetition``) and writes into the ladder directory:

- ``fit/repetition_fit.json`` (one size; ``repetition_fit_<d..L..>.json`` per size when several),
  the input ``scaling plan --r-star-fit`` takes;
- ``epochs.png``: held-out loss against epochs, repeated vs fresh data, with the fitted law,
  and the repeated arm's loss relative to fresh data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.core.code_version import code_version
from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write, atomic_write_text
from lmforge.scaling.fit_repetition import fit_repetition, repetition_loss, save_repetition_fit
from lmforge.scaling.ladder.gather import LADDER_CSV
from lmforge.scaling.ladder.plan import LadderPlan
from lmforge.scaling.table import make_table

FIT_DIR = "fit"


def size_label(row: dict) -> str:
    return f"d{int(row['d_model'])}L{int(row['n_layers'])}"


def fit_path(plan: LadderPlan, label: str, several: bool) -> Path:
    return plan.ladder_dir / FIT_DIR / (f"repetition_fit_{label}.json" if several else "repetition_fit.json")


def fit_sizes(plan: LadderPlan, rows: list[dict]) -> dict[str, dict]:
    """The repetition fit of each model size's finished runs (sizes that cannot be fitted yet are
    left out, with the reason in ``fit/SKIPPED_<size>.txt``)."""
    rule = plan.cfg.fit
    labels = sorted({size_label(row) for row in rows})
    fits = {}
    for label in labels:
        mine = [row for row in rows if size_label(row) == label]
        path = fit_path(plan, label, len(labels) > 1)
        try:
            table = make_table([r["N"] for r in mine], [r["D"] for r in mine], [r["loss"] for r in mine],
                               unique_tokens=[r["U"] for r in mine], run=[r["rung"] for r in mine],
                               source=str(plan.ladder_dir / LADDER_CSV))
            fit = fit_repetition(table, n_bootstrap=rule.bootstrap, seed=rule.seed, level=rule.level)
        except DataError as exc:
            atomic_write_text(path.with_name(f"SKIPPED_{label}.txt"), f"repetition fit of {label} skipped: {exc}\n")
            continue
        fit["size"] = label
        fit["runs"] = [{"rung": r["rung"], "D": r["D"], "U": r["U"], "loss": r["loss"], "bpb": r.get("bpb"),
                        "epochs_logged": r.get("epochs")} for r in mine]
        fit["command"] = ["lmforge", "scaling", "ladder", "--gather", str(plan.ladder_dir / "ladder_plan.json")]
        version = code_version()
        fit["code_version"] = {key: version[key] for key in ("version", "commit", "dirty")}
        save_repetition_fit(path, fit)
        fits[label] = fit
    return fits


def plot_epochs(fits: dict[str, dict], path: Path) -> Path:
    """Loss against epochs (repeated: U fixed; fresh: U = D) with each size's fitted law, and the
    repeated arm relative to fresh data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, rel) = plt.subplots(1, 2, figsize=(10, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, (label, fit) in enumerate(sorted(fits.items())):
        color = cmap(i / max(len(fits) - 1, 1))
        runs = fit["runs"]
        unique = min(r["U"] for r in runs)
        repeated = sorted((r["D"] / unique, r["loss"]) for r in runs if r["U"] == unique)
        fresh = sorted((r["D"] / unique, r["loss"]) for r in runs if r["U"] >= r["D"])
        ax.plot(*zip(*repeated), "o", color=color, label=f"{label} repeated U = {unique:,.0f}")
        if fresh:
            ax.plot(*zip(*fresh), "s", mfc="none", color=color, label=f"{label} fresh data (U = D)")
        law = fit["law"]
        epochs = np.geomspace(1.0, max(e for e, _ in repeated), 60)
        tokens = epochs * unique
        fit_repeat = repetition_loss(tokens, unique, law["E"], law["B"], law["beta"], law["r_star"])
        fit_fresh = repetition_loss(tokens, tokens, law["E"], law["B"], law["beta"], law["r_star"])
        q = fit["quantities"]["r_star"]
        interval = f" [{q['low']:.3g}, {q['high']:.3g}]" if "low" in q else ""
        ax.plot(epochs, fit_repeat, "-", color=color, lw=1, label=f"fit: R*_D = {q['value']:.3g}{interval}")
        ax.plot(epochs, fit_fresh, "--", color=color, lw=1)
        measured = [(c["epochs"], 100 * c["relative"]) for c in fit["comparison"] if "relative" in c]
        if measured:
            rel.plot(*zip(*sorted(measured)), "o", color=color, label=f"{label} measured")
        rel.plot(epochs, 100 * (fit_repeat / fit_fresh - 1), "-", color=color, lw=1, label=f"{label} fit")
    for axis in (ax, rel):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("epochs R = D / U (same total tokens D for both arms)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    ax.set_ylabel("final held-out loss (nats/token)")
    ax.set_title("Repeated vs fresh data (solid: repeated fit, dashed: fresh)", fontsize=10)
    rel.axhline(0, color="grey", lw=0.8)
    rel.set_ylabel("repeated loss / fresh loss − 1 (%)")
    rel.set_title("Cost of repetition at equal tokens", fontsize=10)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def fit_and_plot_epochs(plan: LadderPlan, rows: list[dict]) -> list[Path]:
    """Fit every size of an epochs sweep and draw ``epochs.png``; returns the written paths."""
    fits = fit_sizes(plan, rows)
    several = len(fits) > 1
    written = [fit_path(plan, label, several) for label in fits]
    if fits:
        written.append(plot_epochs(fits, plan.ladder_dir / "epochs.png"))
    return written


def print_epochs(plan: LadderPlan, rows: list[dict], console) -> None:
    """One line per size: R*_D with its interval, and every measured repeated-vs-fresh gap."""
    labels = sorted({size_label(row) for row in rows})
    for label in labels:
        path = fit_path(plan, label, len(labels) > 1)
        if not path.is_file():
            continue
        import json

        fit = json.loads(path.read_text())
        q = fit["quantities"]["r_star"]
        level = f"{fit['settings']['level']:.0%}"
        interval = f", {level} bootstrap interval [{q['low']:.3g}, {q['high']:.3g}]" if "low" in q else ""
        console.print(f"{label}: R*_D = {q['value']:.3g}{interval} ({fit['fit']['points']} points)", highlight=False)
        for c in fit["comparison"]:
            if "relative" in c:
                console.print(f"  {c['epochs']:g} epochs of U = {c['unique_tokens']:,.0f}: held-out loss "
                              f"{c['loss_repeated']:.4f} vs fresh {c['loss_fresh']:.4f} ({c['relative']:+.2%})",
                              highlight=False)
        for warning in fit.get("warnings", []):
            console.print(f"[yellow]warning[/yellow]: {warning}", highlight=False)
