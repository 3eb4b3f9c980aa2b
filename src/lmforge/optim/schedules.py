"""Learning-rate schedules as multipliers of the peak LR: warmup+cosine, WSD, constant.

Every schedule starts with the same linear warmup over ``warmup_steps``; a schedule is what
follows it. ``optim.schedule`` names one in :data:`SCHEDULES`; a new schedule is one function
``(step, total_steps, cfg) -> multiplier`` decorated with ``@SCHEDULES.register("name")``.
"""

from __future__ import annotations

import math
from typing import Callable

from lmforge.core.registry import Registry
from lmforge.optim.config import OptimConfig

Schedule = Callable[[int, int, OptimConfig], float]
SCHEDULES: Registry[Schedule] = Registry("schedule")


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return SCHEDULES.get(cfg.schedule, key="optim.schedule")(step, total_steps, cfg)


@SCHEDULES.register("constant")
def constant(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Flat at the peak after warmup."""
    return 1.0


@SCHEDULES.register("cosine")
def cosine(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Cosine from 1 down to ``min_lr_ratio`` at the last step."""
    floor = cfg.min_lr_ratio
    span = max(total_steps - cfg.warmup_steps - 1, 1)
    progress = min(max((step - cfg.warmup_steps) / span, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULES.register("wsd")
def warmup_stable_decay(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Constant, then a linear decay to ``min_lr_ratio`` over the last ``decay_fraction`` of
    steps. The stable phase lets one long run branch decays at several lengths (used by
    scaling ladders)."""
    floor = cfg.min_lr_ratio
    decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return 1.0 - (1.0 - floor) * progress
