"""Training to a wall-clock budget (``train.time_budget_s``), reproducibly.

A run with a time budget treats ``train.steps`` as an upper bound. After a few calibration steps
(``train.time_budget_calibration_steps``) the trainer measures the median step time (over the later
half of those steps: the earlier ones include the process's warm-up) and fixes the run's length
once: as many steps as that median fits into the budget, never more than ``train.steps`` and never
fewer than the learning-rate schedule needs. From then on the run is an
ordinary fixed-length run: the decision is part of the checkpoint, so a resumed run keeps it and
reproduces the losses of an uninterrupted one bit for bit, and the cooldown of a WSD schedule
lands at the run's real end instead of being cut off.

Deciding once, early, instead of ending whenever the clock runs out, is what keeps this exact:
the schedules allowed here (``constant``, ``wsd``, ``infinite``) give every step before their
final decay a learning rate that does not depend on the step count, so the steps taken before
the decision are the same whatever it turns out to be. Cosine, linear and cyclic WSD schedules
depend on the step count from the first step and are refused. (The idea of a learning-rate
schedule tied to a time budget is from Geiping & Goldstein 2022, "Cramming", whose schedule
reads the clock at every step; lmforge reads it once, so runs stay reproducible.)

The budget covers the training steps (the ``step_time_s`` of the train records); evaluations,
checkpoints and data preparation come on top.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from lmforge.core.errors import ConfigError
from lmforge.optim.config import OptimConfig
from lmforge.optim.schedules import check_schedule, cooldown_start

# Schedules whose multiplier before the final decay does not depend on the run's step count.
SCHEDULES_WITH_A_FREE_END = ("constant", "wsd", "infinite")


def check_time_budget(budget_s: float | None, optim: OptimConfig) -> None:
    """Refuse a budget the schedule cannot follow (a clear error at config time)."""
    if budget_s is None:
        return
    if not budget_s > 0 or math.isinf(budget_s):
        raise ConfigError(f"train.time_budget_s must be a positive number of seconds, got {budget_s}")
    if optim.schedule not in SCHEDULES_WITH_A_FREE_END:
        raise ConfigError(
            f"train.time_budget_s fixes the step count after the first steps, but optim.schedule "
            f"{optim.schedule!r} depends on it from step 1; use one of {', '.join(SCHEDULES_WITH_A_FREE_END)} "
            f"(wsd's cooldown then lands at the run's real end)")


def fewest_steps(decided_at: int, planned: int, optim: OptimConfig) -> int:
    """The shortest run whose schedule fits and whose final decay starts after step ``decided_at``
    (so the learning rates already used stay those of the shorter run); ``planned`` if none is shorter."""
    for total in range(decided_at + 1, planned):
        try:
            check_schedule(total, optim)
        except ConfigError:
            continue
        if optim.schedule == "constant" or cooldown_start(total, optim) >= decided_at:
            return total
    return planned


@dataclass
class BudgetDecision:
    """What a time-budgeted run decided, kept in its checkpoints and in ``time_budget.json``."""
    budget_s: float
    median_step_s: float
    measured_steps: int      # step times the median was taken over
    decided_at_step: int
    planned_steps: int       # train.steps: the upper bound
    fitting_steps: int       # the steps the budget fits at the median step time (from the run's start)
    total_steps: int         # the run's length: fitting_steps clamped to [fewest, planned]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "BudgetDecision":
        return cls(**{key: state[key] for key in cls.__dataclass_fields__})

    def describe(self) -> str:
        if self.fitting_steps >= self.planned_steps:
            bound = "the budget fits more: train.steps bounds the run"
        elif self.total_steps > self.fitting_steps:
            bound = f"the budget fits {self.fitting_steps}; the schedule needs at least this many"
        else:
            bound = f"of train.steps {self.planned_steps}"
        return (f"time budget {self.budget_s:g} s at a median {self.median_step_s:.3f} s a step "
                f"(over {self.measured_steps} steps): {self.total_steps} steps ({bound})")


def decide(budget_s: float, step_times: list[float], decided_at: int, planned: int,
           optim: OptimConfig, start_step: int = 0) -> BudgetDecision:
    """Fix the run's length from the step times measured so far (the slow first step of a process,
    its warm-up, already left out by the caller): the run started at ``start_step`` and ends
    where its budget, at the median step time, runs out."""
    median = statistics.median(step_times)
    fitting = int(budget_s // median) if median > 0 else planned
    total = min(max(start_step + fitting, fewest_steps(decided_at, planned, optim)), planned)
    return BudgetDecision(budget_s=budget_s, median_step_s=median, measured_steps=len(step_times),
                          decided_at_step=decided_at, planned_steps=planned, fitting_steps=fitting,
                          total_steps=total)


class TimeBudget:
    """The trainer's side: collects step times, decides once, saves and restores both.

    The decision is made right after step ``calibration_steps``, from the step times so far (a
    process's first step is left out; if no other step was timed yet, e.g. right after a resume,
    that one is used). The step times are checkpoint state too, so a run resumed before the
    decision decides after the same step, from the same times plus its own. ``start_step``: the
    step this run's budget began at (0, or the parent's step under ``init.trainer_state``); the
    budget counts this run's steps only.
    """

    def __init__(self, budget_s: float | None, calibration_steps: int, planned_steps: int):
        self.budget_s, self.calibration_steps, self.planned_steps = budget_s, calibration_steps, planned_steps
        self.decision: BudgetDecision | None = None
        self.step_times: list[float] = []
        self.start_step = 0
        self._first_time: float | None = None  # this process's first step: allocation, caches, compilation

    @property
    def pending(self) -> bool:
        return self.budget_s is not None and self.decision is None

    def observe(self, step: int, step_time_s: float, optim: OptimConfig) -> BudgetDecision | None:
        """Record a finished step (``step`` is its 1-based number); returns the decision when this
        step makes it."""
        if not self.pending:
            return None
        if self._first_time is None:
            self._first_time = step_time_s
        else:
            self.step_times.append(step_time_s)
        if step < self.start_step + self.calibration_steps or step >= self.planned_steps:
            return None
        assert self.budget_s is not None
        # The later half of the steps timed so far: a process warms up over more than its first
        # step (the data loader's workers filling their queue, caches, allocator); on a 2-core
        # machine the quickstart's steps 2-20 took 0.25 s against 0.19-0.20 s from step 100 on.
        times = self.step_times[len(self.step_times) // 2:] or [self._first_time]
        self.decision = decide(self.budget_s, times, step, self.planned_steps, optim, self.start_step)
        return self.decision

    def state_dict(self) -> dict[str, Any]:
        if self.budget_s is None:
            return {}
        if self.decision is None:
            return {"budget_s": self.budget_s, "start_step": self.start_step, "step_times": list(self.step_times)}
        return {"budget_s": self.budget_s, "start_step": self.start_step, "decision": self.decision.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> BudgetDecision | None:
        """Take a checkpoint's decision (or its step times so far); a run without a budget now, or
        with another one, starts afresh. Returns the decision taken over, if any."""
        self.decision, self.step_times = None, []
        if not state or self.budget_s is None or state.get("budget_s") != self.budget_s:
            return None
        self.start_step = int(state.get("start_step", 0))
        if "decision" in state:
            decision = BudgetDecision.from_dict(state["decision"])
            decision.total_steps = min(decision.total_steps, self.planned_steps)
            self.decision = decision
        else:
            self.step_times = [float(t) for t in state.get("step_times", [])]
        return self.decision
