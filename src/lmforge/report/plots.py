"""Matplotlib figures for the report, returned as base64 PNG strings."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmforge.core.io import atomic_write_bytes  # noqa: E402
from lmforge.report.run_data import RunData  # noqa: E402


def _encode(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _finish(fig: plt.Figure, ax: plt.Axes, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> str:
    """Labels, title, legend and grid of a one-panel plot, encoded."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    return _encode(fig)


def loss_plot(run: RunData) -> str | None:
    if not run.train:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [r["step"] for r in run.train]
    ax.plot(steps, [r["loss"] for r in run.train], label="train loss (nats/token)")
    if any(r.get("aux_loss") for r in run.train):
        ax.plot(steps, [r.get("aux_loss", 0.0) for r in run.train], label="MoE auxiliary loss")
    for domain in sorted({d for r in run.evals for d in r.get("loss", {})}):
        points = [(r["step"], r["loss"][domain]) for r in run.evals if domain in r.get("loss", {})]
        ax.plot(*zip(*points), "o--", label=f"held-out loss: {domain}")
    return _finish(fig, ax, "step", "loss", "Loss")


def bpb_plot(run: RunData) -> str | None:
    domains = sorted({d for r in run.evals for d in r.get("bpb", {})})
    if not domains:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for domain in domains:
        points = [(r["step"], r["bpb"][domain]) for r in run.evals if domain in r.get("bpb", {})]
        line, = ax.plot(*zip(*points), "o-", label=domain)
        bands = [(r["step"], *r["bpb_interval"][domain]) for r in run.evals
                 if domain in r.get("bpb_interval", {})]
        if bands:  # the bootstrap interval of each evaluation (records from before intervals have none)
            values = {step: value for step, value in points}
            steps = [step for step, _, _ in bands]
            centre = [values[step] for step in steps]
            below = [max(value - low, 0.0) for value, (_, low, _) in zip(centre, bands)]
            above = [max(high - value, 0.0) for value, (_, _, high) in zip(centre, bands)]
            ax.errorbar(steps, centre, yerr=[below, above], fmt="none", ecolor=line.get_color(), capsize=3, alpha=0.6)
    for kind in sorted({k for r in run.evals for k in r.get("averaged", {})}):
        for domain in domains:  # averaged weights (train.weight_averaging), dashed beside the raw ones
            points = [(r["step"], r["averaged"][kind]["bpb"][domain]) for r in run.evals
                      if domain in r.get("averaged", {}).get(kind, {}).get("bpb", {})]
            if points:
                ax.plot(*zip(*points), "--", alpha=0.8, label=f"{domain} ({kind} weights)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    level = next((r["interval_level"] for r in reversed(run.evals) if "interval_level" in r), None)
    band = f" (bars: {100 * level:.0f}% interval)" if level else ""
    ax.set_title(f"Held-out bits-per-byte by domain{band}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _encode(fig)


def throughput_plot(run: RunData) -> str | None:
    rows = [r for r in run.train if "tokens_per_s" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["tokens_per_s"] for r in rows], color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s", color="tab:green")
    mfu = ax.twinx()
    mfu.plot(steps, [100 * r.get("mfu", 0.0) for r in rows], color="tab:purple", alpha=0.7)
    mfu.set_ylabel("MFU (%)", color="tab:purple")
    ax.set_title("Throughput")
    ax.grid(alpha=0.3)
    return _encode(fig)


def expert_load_plot(run: RunData) -> str | None:
    rows = [r for r in run.train if r.get("moe/expert_load")]
    if not rows:
        return None
    n_experts = len(rows[0]["moe/expert_load"])
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    steps = [r["step"] for r in rows]
    for i in range(n_experts):
        ax.plot(steps, [r["moe/expert_load"][i] for r in rows], label=f"expert {i}")
    ax.axhline(1 / n_experts, color="black", linestyle=":", label="balanced")
    ax.set_xlabel("step")
    ax.set_ylabel("share of token slots")
    ax.set_title("MoE expert load (mean over MoE layers)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _encode(fig)


def lr_plot(run: RunData) -> str | None:
    """The LR each logged step used, over the whole curve the config plans (drawn even where the
    run logged sparsely, stopped early, or logged no LR)."""
    rows = [r for r in run.train if "lr" in r]
    if not rows and not run.planned_lr:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    if run.planned_lr:
        ax.plot(range(1, len(run.planned_lr) + 1), run.planned_lr, color="tab:gray", linewidth=1,
                label="planned (optim.lr x schedule)")
    if rows:
        ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], ".", markersize=3, label="logged")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    name = run.lr_schedule.split(";")[0].split(",")[0] if run.lr_schedule else None  # the summary has the rest
    ax.set_title("Learning-rate schedule" + (f": {name}" if name else ""))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _encode(fig)


def forgetting_plot(run: RunData) -> str | None:
    """A continued run: each domain's held-out bits-per-byte minus its value at the parent's
    checkpoint (above zero: forgotten; below: learned)."""
    records = [r for r in run.evals if "change_from_parent" in r]
    domains = sorted({d for r in records for d in r["change_from_parent"]})
    if not domains:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for domain in domains:
        points = [(r["step"], r["change_from_parent"][domain]) for r in records if domain in r["change_from_parent"]]
        ax.plot(*zip(*points), "o-", label=domain)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    return _finish(fig, ax, "step", "bits per byte minus the parent's", "Change from the parent (up: forgetting, down: adaptation)")


def position_loss_plot(run: RunData) -> str | None:
    """Held-out loss by position bucket, one line per domain and evaluation (final, ``lmforge eval
    --seq-len N``): a falling line means later tokens gain from the context before them."""
    records = [(name, r) for name, r in run.long_context if r.get("loss_by_position")]
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, record in records:
        for domain, buckets in sorted(record["loss_by_position"].items()):
            middle = [(s + e - 1) / 2 for s, e in zip(buckets["start"], buckets["end"])]
            ax.plot(middle, buckets["loss"], "o-", markersize=3,
                    label=f"{domain} ({name}, {record.get('eval_seq_len', '?')} tokens)")
    return _finish(fig, ax, "position in the window (bucket centre)", "held-out loss (nats/token)", "Held-out loss by position: is the context used?", legend_size=7)


def _passkey_figure(record: dict) -> plt.Figure:
    variants = dict(sorted(record["variants"].items(), key=lambda item: item[1]["pairs"]))  # single key first
    fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants) + 1.0, 0.45 * len(record["lengths"]) + 1.8),
                             squeeze=False, constrained_layout=True)
    for index, (ax, (name, variant)) in enumerate(zip(axes[0], variants.items())):
        grid = [[float("nan") if v is None else v for v in row] for row in variant["accuracy"]]  # None: too short
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
        for row, values in enumerate(variant["accuracy"]):
            for col, value in enumerate(values):
                ax.text(col, row, "-" if value is None else f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value is not None and value > 0.6 else "white")
        ax.set_xticks(range(len(record["depths"])), [f"{d:g}" for d in record["depths"]])
        ax.set_yticks(range(len(record["lengths"])), [str(n) for n in record["lengths"]])
        ax.set_xlabel("depth of the key in the filler")
        if index == 0:
            ax.set_ylabel("length (tokens)")
        ax.set_title(f"{name} ({variant['pairs']} pair{'s' if variant['pairs'] > 1 else ''})", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=f"accuracy (chance {record['chance']:.2f})")
    return fig


def passkey_heatmap(record: dict | None) -> str | None:
    """Passkey accuracy (likelihood among candidates) as a length x depth heatmap per variant."""
    if not record or not record.get("variants"):
        return None
    buffer = io.BytesIO()
    fig = _passkey_figure(record)
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_passkey_png(record: dict, path: Path) -> Path:
    """The heatmap of :func:`passkey_heatmap` as a PNG file (written atomically)."""
    return atomic_write_bytes(Path(path), base64.b64decode(passkey_heatmap(record) or ""))
