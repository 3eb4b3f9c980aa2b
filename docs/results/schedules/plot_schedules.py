"""Draw docs/results/schedules/schedules.png: every LR schedule of lmforge.optim.schedules.

    .venv/bin/python docs/results/schedules/plot_schedules.py

The curves are ``lr_curve(total_steps, OptimConfig(...))``: the multipliers the trainer uses.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmforge.optim.config import OptimConfig  # noqa: E402
from lmforge.optim.schedules import lr_curve  # noqa: E402

OUT = Path(__file__).with_name("schedules.png")
T = 1000


def panel(ax, title: str, curves: list[tuple[str, int, OptimConfig]]) -> None:
    for label, total, cfg in curves:
        ax.plot(range(total), lr_curve(total, cfg), label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("x peak LR", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def main() -> None:
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    panel(axes[0, 0], "cosine / linear (re-warm from 0.3, re-decay)", [
        ("cosine", T, OptimConfig(schedule="cosine", warmup_steps=50)),
        ("linear", T, OptimConfig(schedule="linear", warmup_steps=50)),
        ("cosine, warmup_start_ratio 0.3", T, OptimConfig(schedule="cosine", warmup_steps=100, warmup_start_ratio=0.3)),
    ])
    panel(axes[0, 1], "wsd cooldown shapes (decay_steps 300, floor 0.02)", [
        (shape, T, OptimConfig(schedule="wsd", warmup_steps=50, decay_steps=300, cooldown=shape, min_lr_ratio=0.02))
        for shape in ("linear", "1-sqrt", "exponential")
    ])
    branch = OptimConfig(schedule="wsd", warmup_steps=50, decay_steps=200, cooldown="1-sqrt", min_lr_ratio=0.0)
    panel(axes[0, 2], "wsd branches: train.steps = s + decay_steps", [
        (f"cooldown from s = {s}", s + 200, branch) for s in (300, 550, 800)
    ])
    panel(axes[1, 0], "infinite (Ibrahim et al. 2024)", [
        ("anneal: " + shape, T, OptimConfig(schedule="infinite", warmup_steps=50, cooldown_steps=150,
                                           constant_lr_ratio=0.4, decay_steps=150, cooldown=shape, min_lr_ratio=0.04))
        for shape in ("linear", "exponential")
    ])
    panel(axes[1, 1], "wsd_cyclic (3 periods, re-warm from the floor)", [
        ("1-sqrt cooldowns", T, OptimConfig(schedule="wsd_cyclic", wsd_periods=3, warmup_steps=30, decay_fraction=0.25,
                                            cooldown="1-sqrt", min_lr_ratio=0.05)),
    ])
    # A continued run: the parent decays to 0.1 x peak; the child (same peak LR) re-warms from there.
    parent = lr_curve(600, OptimConfig(schedule="cosine", warmup_steps=50, min_lr_ratio=0.1))
    child = lr_curve(400, OptimConfig(schedule="cosine", warmup_steps=50, warmup_start_ratio=parent[-1],
                                      min_lr_ratio=0.1))
    ax = axes[1, 2]
    ax.plot(range(600), parent, label="parent run (cosine)")
    ax.plot(range(600, 1000), child, label=f"continued run: warmup_start_ratio {parent[-1]:g}")
    panel(ax, "continuation: re-warm from the parent's last LR", [])
    fig.tight_layout()
    fig.savefig(OUT, dpi=80)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
