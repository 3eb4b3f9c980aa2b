"""The continual experiment's table (CSV and Markdown) and plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.core.io import atomic_write, atomic_write_text
from lmforge.core.metrics_file import read_metrics

if TYPE_CHECKING:
    from lmforge.continual.experiment import PlannedRun


def _interval(value: Any) -> str:
    return f"[{value[0]:.3f}, {value[1]:.3f}]" if value else ""


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table docs/continual.md shows: one line per continued run."""
    head = ("| direction | replay | old domain: parent → end (forgetting) | new domain: parent → end (adaptation) "
            "| mean of both | union baseline (old / new / mean) |\n|---|---:|---|---|---:|---|\n")
    lines = []
    for r in rows:
        union = (f"{r['union_old_bpb']:.3f} / {r['union_new_bpb']:.3f} / {r['union_mean_bpb']:.3f}"
                 if "union_old_bpb" in r else "-")
        lines.append(
            f"| {r['direction']} | {100 * r['replay']:.0f}% "
            f"| {r['old_bpb_parent']:.3f} → {r['old_bpb']:.3f} {_interval(r['old_interval'])} (**{r['forgetting']:+.3f}**) "
            f"| {r['new_bpb_parent']:.3f} → {r['new_bpb']:.3f} {_interval(r['new_interval'])} ({r['adaptation']:+.3f}) "
            f"| {r['mean_bpb']:.3f} | {union} |")
    return head + "\n".join(lines) + "\n"


def write_results(out: Path, plans: list["PlannedRun"], run_dirs: dict[str, Path], rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    flat = [{k: (" ".join(f"{x:.4f}" for x in v) if isinstance(v, list) else v) for k, v in row.items()} for row in rows]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in flat for k in row)), restval="")
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(out / "continual.csv", text.getvalue())
    atomic_write_text(out / "continual.md", markdown_table(rows))
    plot_curves(out / "continual.png", plans, run_dirs)


def plot_curves(path: Path, plans: list["PlannedRun"], run_dirs: dict[str, Path]) -> None:
    """Per direction: the old and the new domain's held-out bpb over the continuation's steps, one
    line per replay share, with the union baseline's final value dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    continued = [p for p in plans if p.role == "continued"]
    directions = list(dict.fromkeys((p.old, p.new) for p in continued))
    union = next((p for p in plans if p.role == "union"), None)
    union_final = None
    if union is not None:
        finals = [r for r in read_metrics(run_dirs[union.name] / "metrics.jsonl") if r.get("kind") == "eval"]
        union_final = finals[-1]["bpb"] if finals else None
    fig, axes = plt.subplots(len(directions), 2, figsize=(10, 3.4 * len(directions)), squeeze=False)
    for row, (old, new) in enumerate(directions):
        for col, (domain, label) in enumerate(((old, "old domain (forgetting)"), (new, "new domain (adaptation)"))):
            ax = axes[row][col]
            for plan in (p for p in continued if (p.old, p.new) == (old, new)):
                evals = [r for r in read_metrics(run_dirs[plan.name] / "metrics.jsonl") if r.get("kind") == "eval"]
                ax.plot([r["step"] for r in evals], [r["bpb"][domain] for r in evals], marker="o", markersize=3,
                        label=f"replay {100 * (plan.replay or 0):.0f}%")
            if union_final is not None and domain in union_final:
                ax.axhline(union_final[domain], linestyle="--", color="grey", label="union baseline (end)")
            ax.set_title(f"{old} → {new}: {domain}, {label}", fontsize=9)
            ax.set_xlabel("continuation step")
            ax.set_ylabel("held-out bits per byte")
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
