"""Learning-rate schedules as multipliers of the peak LR: warmup+cosine and WSD."""

from __future__ import annotations

import math

from lmforge.optim.config import OptimConfig


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based) of ``total_steps``.

    - cosine: linear warmup, then cosine from 1 down to ``min_lr_ratio`` at the last step.
    - wsd (warmup-stable-decay): warmup, constant, then a linear decay to ``min_lr_ratio``
      over the last ``decay_fraction`` of steps. A stable phase lets one long run branch
      decays at several lengths (used by scaling ladders).
    - constant: warmup then flat.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(total_steps - cfg.warmup_steps - 1, 1)
        progress = min(max((step - cfg.warmup_steps) / span, 0.0), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return 1.0 - (1.0 - floor) * progress
