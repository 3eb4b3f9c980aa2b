"""Optimizer and learning-rate schedule configuration."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.core.config import Config


@dataclass
class OptimConfig(Config):
    name: str = "adamw"              # a name in optimizers.OPTIMIZERS: adamw, muon
    lr: float = 3e-3                 # peak LR for AdamW (and for the AdamW part under Muon)
    muon_lr: float = 0.02            # peak LR for Muon's 2-D hidden matrices
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"         # a name in schedules.SCHEDULES: cosine, wsd, constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2      # WSD: share of steps spent in the final decay
    min_lr_ratio: float = 0.1        # LR at the end of decay, as a fraction of the peak

    def __post_init__(self) -> None:
        # The registries fill as their modules load; both import this one, hence here.
        from lmforge.optim.optimizers import OPTIMIZERS
        from lmforge.optim.schedules import SCHEDULES

        OPTIMIZERS.check(self.name, "name")
        SCHEDULES.check(self.schedule, "schedule")
        if self.lr <= 0 or self.muon_lr <= 0:
            raise ValueError("lr and muon_lr must be positive")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError("decay_fraction must be in [0, 1]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("min_lr_ratio must be in [0, 1]")
