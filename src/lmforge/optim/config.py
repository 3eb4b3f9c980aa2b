"""Optimizer and learning-rate schedule configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmforge.core.config import Config, FieldValueError


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
    adamw_fused: bool = True         # torch's fused AdamW kernel (one pass per tensor) on CPU and CUDA; false: torch's default
    # The LR schedule, as multipliers of the peak LR: optim/schedules.py and docs/schedules.md.
    schedule: str = "cosine"         # in schedules.SCHEDULES: constant, cosine, linear, wsd, infinite, wsd_cyclic
    warmup_steps: int = 20
    warmup_start_ratio: float = 0.0  # warmup rises from this (at step -1) to 1; continued run: parent's last LR / peak
    # The final cooldown of wsd, wsd_cyclic (each period) and infinite; other schedules ignore decay_fraction.
    decay_fraction: float = 0.2      # share of the steps (of a period) in the final cooldown
    decay_steps: int | None = None   # the final cooldown's length in steps; overrides decay_fraction
    cooldown: str = "linear"         # its shape, in schedules.COOLDOWNS: linear, 1-sqrt, exponential
    min_lr_ratio: float = 0.1        # LR at the end of decay, as a fraction of the peak (constant ignores it)
    constant_lr_ratio: float | None = None  # infinite (required): the level after the first cooldown
    cooldown_steps: int | None = None       # infinite (required): steps of the cosine cooldown to that level
    wsd_periods: int | None = None          # wsd_cyclic (required): number of equal WSD periods in the run
    # Peak-LR multipliers by parameter-name prefix, e.g. {"encoder.": 0.1} (a RETRO neighbour encoder's
    # blocks): a parameter takes the multiplier of the longest prefix its name starts with, else 1.
    # Plain string prefixes: end one with "." to mean a module ("blocks.0.attn" also takes attn_norm).
    lr_multipliers: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The registries fill as their modules load; both import this one, hence here.
        from lmforge.optim.optimizers import OPTIMIZERS
        from lmforge.optim.schedules import COOLDOWNS, SCHEDULES

        OPTIMIZERS.check(self.name, "name")
        SCHEDULES.check(self.schedule, "schedule")
        COOLDOWNS.check(self.cooldown, "cooldown")
        # 0 is allowed: steps that change nothing (a continued run checked against its parent)
        if self.lr < 0 or self.muon_lr < 0:
            raise ValueError("lr and muon_lr must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        for prefix, multiplier in self.lr_multipliers.items():
            if not prefix or ":" in prefix:
                raise FieldValueError("lr_multipliers", f"{prefix!r} is no parameter-name prefix (non-empty, no ':')")
            if not (math.isfinite(multiplier) and multiplier >= 0.0):
                raise FieldValueError("lr_multipliers", f"{prefix!r}: the multiplier must be finite and >= 0, "
                                                        f"got {multiplier}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError("decay_fraction must be in [0, 1]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("min_lr_ratio must be in [0, 1]")
        self._check_schedule_keys()

    def _check_schedule_keys(self) -> None:
        """The schedule keys added for continuation: ranges, what each schedule needs, and keys set
        for a schedule that would ignore them (refused, so a setting never silently does nothing)."""
        if not 0.0 <= self.warmup_start_ratio <= 1.0:
            raise FieldValueError("warmup_start_ratio", f"must be in [0, 1], got {self.warmup_start_ratio}")
        if self.warmup_start_ratio > 0 and self.warmup_steps == 0:
            raise FieldValueError("warmup_start_ratio", "has no effect without a warmup (set optim.warmup_steps > 0)")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise FieldValueError("decay_steps", f"must be >= 1 (null: use decay_fraction), got {self.decay_steps}")
        if self.constant_lr_ratio is not None and not 0.0 < self.constant_lr_ratio <= 1.0:
            raise FieldValueError("constant_lr_ratio", f"must be in (0, 1], got {self.constant_lr_ratio}")
        if self.cooldown_steps is not None and self.cooldown_steps < 0:
            raise FieldValueError("cooldown_steps", f"must be >= 0, got {self.cooldown_steps}")
        if self.wsd_periods is not None and self.wsd_periods < 1:
            raise FieldValueError("wsd_periods", f"must be >= 1, got {self.wsd_periods}")
        final_cooldown = ("wsd", "wsd_cyclic", "infinite")
        only_for = {
            "decay_steps": (self.decay_steps is not None, final_cooldown),
            "cooldown": (self.cooldown != "linear", final_cooldown),
            "constant_lr_ratio": (self.constant_lr_ratio is not None, ("infinite",)),
            "cooldown_steps": (self.cooldown_steps is not None, ("infinite",)),
            "wsd_periods": (self.wsd_periods is not None, ("wsd_cyclic",)),
        }
        for key, (is_set, schedules) in only_for.items():
            if is_set and self.schedule not in schedules:
                raise FieldValueError(key, f"applies only to schedule {' / '.join(schedules)}, "
                                           f"not {self.schedule!r} (remove it, or change optim.schedule)")
        if self.schedule == "infinite":
            for key in ("constant_lr_ratio", "cooldown_steps"):
                if getattr(self, key) is None:
                    raise FieldValueError(key, "the infinite schedule needs it (see docs/schedules.md)")
            if self.constant_lr_ratio is not None and self.constant_lr_ratio < self.min_lr_ratio:
                raise FieldValueError("constant_lr_ratio", f"({self.constant_lr_ratio}) is below optim.min_lr_ratio "
                                                           f"({self.min_lr_ratio}): the final anneal would rise")
        if self.schedule == "wsd_cyclic" and self.wsd_periods is None:
            raise FieldValueError("wsd_periods", "the wsd_cyclic schedule needs the number of periods")
        if self.cooldown == "exponential" and self.min_lr_ratio <= 0.0:
            raise FieldValueError("cooldown", "exponential decays geometrically to optim.min_lr_ratio, which must "
                                              f"then be > 0 (got {self.min_lr_ratio})")
