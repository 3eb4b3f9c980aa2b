"""Stability guard: skip optimizer steps whose loss or gradient is non-finite or spikes.

A spike is a loss whose z-score against the recent window of accepted losses exceeds
``spike_zscore``: z = (loss - mean) / std over the last ``window`` accepted steps, checked
once ``min_history`` losses are known. A skipped step consumes its batch but leaves the
weights and optimizer state untouched. With ``rollback`` the trainer also returns to the
last checkpoint while the data loader keeps its position, so the batches between that
checkpoint and the spike are skipped (the remedy PaLM describes for persistent spikes).
The window is checkpoint state, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from lmforge.core.config import Config


@dataclass
class GuardConfig(Config):
    enabled: bool = True
    skip_nonfinite: bool = True      # skip steps with a NaN/inf loss or gradient norm
    spike_zscore: float = 6.0        # skip steps whose loss z-score exceeds this; 0 disables
    window: int = 100                # accepted losses the z-score is computed over
    min_history: int = 50            # no spike decisions before this many accepted losses
    rollback: bool = False           # on a skip, also reload the last checkpoint (data position kept)
    max_rollbacks: int = 5           # give up (raise) after this many rollbacks in one run

    def __post_init__(self) -> None:
        if self.spike_zscore < 0:
            raise ValueError(f"spike_zscore must be >= 0, got {self.spike_zscore}")
        if self.window < 2 or self.min_history < 2:
            raise ValueError("window and min_history must be >= 2")
        if self.max_rollbacks < 0:
            raise ValueError("max_rollbacks must be >= 0")


class StabilityGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.counts = {"skipped_nonfinite": 0, "skipped_spike": 0, "rollbacks": 0}

    def zscore(self, loss: float) -> float:
        if len(self.history) < max(self.cfg.min_history, 2):
            return 0.0
        mean = sum(self.history) / len(self.history)
        var = sum((x - mean) ** 2 for x in self.history) / (len(self.history) - 1)
        return (loss - mean) / math.sqrt(var) if var > 0 else 0.0

    def check(self, loss: float, grad_norm: float) -> str | None:
        """None to take the step, else the reason to skip it: ``nonfinite`` or ``spike``."""
        if not self.cfg.enabled:
            return None
        if self.cfg.skip_nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.counts["skipped_nonfinite"] += 1
            return "nonfinite"
        if self.cfg.spike_zscore > 0 and self.zscore(loss) > self.cfg.spike_zscore:
            self.counts["skipped_spike"] += 1
            return "spike"
        if math.isfinite(loss):
            self.history.append(loss)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state.get("history", []), maxlen=self.cfg.window)
        self.counts.update(state.get("counts", {}))
