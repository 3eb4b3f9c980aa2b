"""Learning-rate schedules as multipliers of the peak LR, for pretraining and continuation.

A schedule maps an optimizer step (0-based) of a run of ``total_steps`` steps to a multiplier of
the peak LR (``optim.lr``; ``optim.muon_lr`` for Muon's matrices). It is a pure function of
``(step, total_steps, optim config)``: nothing carries state, so a resumed run continues on the
same curve and a curve can be drawn before a run starts (:func:`lr_curve`).

**Warmup** (shared, in :func:`lr_multiplier`): over the first ``warmup_steps`` the multiplier
climbs on the line from ``warmup_start_ratio`` at step -1 to 1 at step ``warmup_steps - 1``:
``r + (1 - r) * (step + 1) / warmup_steps``. With the default ``r = 0`` that is
``(step + 1) / warmup_steps``. A continued run re-warms from its parent's final LR by setting
``r`` to (parent's final LR) / (new peak LR): the parent's last step is this run's step -1.

**Schedules** (``optim.schedule``, the part after warmup; ``min_lr_ratio`` is the floor):

- ``constant``: 1.
- ``cosine``: cosine from 1 at step ``warmup_steps`` to the floor at the last step.
- ``linear``: the same straight down. Warmup + cosine/linear with ``warmup_start_ratio`` is the
  re-warm + re-decay of a continued run.
- ``wsd``: warmup, stable at 1, then a cooldown to the floor over the last ``D`` steps, where
  ``D = decay_steps`` if set, else ``max(round(decay_fraction * total_steps), 1)``. The cooldown's
  progress at step ``t`` is ``p = (t - (total_steps - D) + 1) / D`` (the first cooldown step is
  already below the peak, the last is at the floor); ``optim.cooldown`` picks its shape:
  ``linear`` ``1 - (1 - floor) p``; ``1-sqrt`` ``floor + (1 - floor)(1 - sqrt p)`` (Hägele et al.
  2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations");
  ``exponential`` ``floor ** p`` (geometric, so the floor must be > 0).

  *Branching a cooldown.* The multiplier of ``wsd`` before the cooldown does not depend on
  ``total_steps``. So with an absolute ``decay_steps = D``, a run of ``s + D`` steps has exactly
  the LRs of a long run's stable phase for steps ``< s`` and cools down over ``[s, s + D)``:
  continuing a stable-phase checkpoint of step ``s`` (same step counter) with
  ``train.steps = s + D`` gives the run that decays at ``s``, LR for LR.
- ``infinite`` (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train
  Large Language Models"): warmup; a cosine cooldown from 1 to ``constant_lr_ratio`` over
  ``cooldown_steps`` (progress ``(t - warmup_steps + 1) / cooldown_steps``); constant at
  ``constant_lr_ratio``; a final anneal from ``constant_lr_ratio`` to the floor over the last
  ``D`` steps (``D`` as for ``wsd``), shaped by ``optim.cooldown``. Checkpoints of the constant
  phase branch like ``wsd``'s stable phase.
- ``wsd_cyclic``: the run is ``wsd_periods`` WSD periods of ``total_steps // wsd_periods`` steps
  (the last also takes the ``total_steps % wsd_periods`` steps left over). Each period is stable
  at 1, then a cooldown to the floor over its last ``D`` steps (``decay_steps``, else
  ``decay_fraction`` of the period's length), shaped by ``optim.cooldown``. The first period
  starts with the shared warmup; each later one re-warms linearly over ``warmup_steps`` from the
  floor, where the previous period ended (``warmup_steps: 0`` jumps back to the peak). Each
  period's end is an annealed checkpoint, e.g. one per data update.

Keys that only some schedules read (``decay_steps``, ``cooldown``, ``constant_lr_ratio``,
``cooldown_steps``, ``wsd_periods``) are refused by ``OptimConfig`` when set for another schedule.
Layouts that need the run length (warmup + cooldowns longer than the run) are checked by
:func:`check_schedule`, which each of those schedules also runs.

A new schedule is one function ``(step, total_steps, cfg) -> multiplier`` decorated with
``@SCHEDULES.register("name")``; a new cooldown shape is one ``(progress, start, end) -> value``
under ``@COOLDOWNS.register("name")``.
"""

from __future__ import annotations

import math
from typing import Callable, TypeVar

from lmforge.core.errors import ConfigError
from lmforge.core.registry import Registry
from lmforge.optim.config import OptimConfig

T = TypeVar("T", int, float)
Schedule = Callable[[int, int, OptimConfig], float]
SCHEDULES: Registry[Schedule] = Registry("schedule")

Cooldown = Callable[[float, float, float], float]
COOLDOWNS: Registry[Cooldown] = Registry("cooldown shape")


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        start = cfg.warmup_start_ratio
        if start == 0.0:
            return (step + 1) / cfg.warmup_steps
        return start + (1.0 - start) * (step + 1) / cfg.warmup_steps
    return SCHEDULES.get(cfg.schedule, key="optim.schedule")(step, total_steps, cfg)


def lr_curve(total_steps: int, cfg: OptimConfig) -> list[float]:
    """The planned multiplier at every step ``0 .. total_steps - 1`` (times ``optim.lr``: the
    AdamW LR; a train record of step ``k`` logs the LR of 0-based step ``k - 1``)."""
    check_schedule(total_steps, cfg)
    return [lr_multiplier(step, total_steps, cfg) for step in range(total_steps)]


def final_decay_steps(total_steps: int, cfg: OptimConfig) -> int:
    """Length of the final cooldown/anneal of ``wsd`` and ``infinite`` (of each ``wsd_cyclic``
    period when ``total_steps`` is that period's length)."""
    if cfg.decay_steps is not None:
        return cfg.decay_steps
    return max(int(round(cfg.decay_fraction * total_steps)), 1)


def cooldown_start(total_steps: int, cfg: OptimConfig) -> int:
    """First step (0-based) of the final cooldown of a ``wsd`` or ``infinite`` run: checkpoints
    before it are stable/constant-phase checkpoints a cooldown can branch from."""
    if cfg.schedule not in ("wsd", "infinite"):
        raise ConfigError(f"optim.schedule: {cfg.schedule!r} has no single final cooldown (wsd, infinite have)")
    return total_steps - final_decay_steps(total_steps, cfg)


def check_schedule(total_steps: int, cfg: OptimConfig) -> None:
    """Refuse layouts that do not fit in a run of ``total_steps`` steps (``train.steps``), naming
    the keys. ``OptimConfig`` checks what it can alone; this needs the run length."""
    if total_steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {total_steps}")
    warmup = cfg.warmup_steps
    if cfg.schedule == "wsd" and cfg.decay_steps is not None and warmup + cfg.decay_steps > total_steps:
        raise ConfigError(f"optim.warmup_steps ({warmup}) + optim.decay_steps ({cfg.decay_steps}) exceed "
                          f"train.steps ({total_steps}): the cooldown would overlap the warmup")
    if cfg.schedule == "infinite":
        decay = final_decay_steps(total_steps, cfg)
        cooldown = cfg.cooldown_steps or 0
        if warmup + cooldown + decay > total_steps:
            raise ConfigError(
                f"optim.warmup_steps ({warmup}) + optim.cooldown_steps ({cooldown}) + final anneal "
                f"({decay} steps: {_decay_source(cfg)}) exceed train.steps ({total_steps})")
    if cfg.schedule == "wsd_cyclic":
        periods = cfg.wsd_periods or 1
        if periods > total_steps:
            raise ConfigError(f"optim.wsd_periods ({periods}) exceeds train.steps ({total_steps})")
        length = total_steps // periods
        decay = final_decay_steps(length, cfg)
        if warmup + decay > length:
            raise ConfigError(
                f"optim.warmup_steps ({warmup}) + cooldown ({decay} steps: {_decay_source(cfg)}) exceed the "
                f"period length ({length} = train.steps {total_steps} // optim.wsd_periods {periods})")


def _required(value: T | None, key: str) -> T:
    if value is None:  # OptimConfig refuses this; a config built around its checks still gets a clear error
        raise ConfigError(f"optim.{key}: the optim.schedule chosen needs it")
    return value


def _decay_source(cfg: OptimConfig) -> str:
    return "optim.decay_steps" if cfg.decay_steps is not None else "optim.decay_fraction"


# --------------------------------------------------------------------------- cooldown shapes


@COOLDOWNS.register("linear")
def linear_cooldown(progress: float, start: float, end: float) -> float:
    return start - (start - end) * progress


@COOLDOWNS.register("1-sqrt")
def one_minus_sqrt_cooldown(progress: float, start: float, end: float) -> float:
    return end + (start - end) * (1.0 - math.sqrt(progress))


@COOLDOWNS.register("exponential")
def exponential_cooldown(progress: float, start: float, end: float) -> float:
    return start * (end / start) ** progress  # geometric: needs end > 0 (checked by OptimConfig)


def _cooldown(step: int, decay_start: int, decay_steps: int, start: float, cfg: OptimConfig) -> float:
    """The ``optim.cooldown`` shape from ``start`` to the floor, at ``step`` of a cooldown that
    begins at ``decay_start`` and lasts ``decay_steps``."""
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return COOLDOWNS.get(cfg.cooldown, key="optim.cooldown")(progress, start, cfg.min_lr_ratio)


# --------------------------------------------------------------------------- schedules


@SCHEDULES.register("constant")
def constant(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Flat at the peak after warmup."""
    return 1.0


def _decay_progress(step: int, total_steps: int, cfg: OptimConfig) -> float:
    span = max(total_steps - cfg.warmup_steps - 1, 1)
    return min(max((step - cfg.warmup_steps) / span, 0.0), 1.0)


@SCHEDULES.register("cosine")
def cosine(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Cosine from 1 down to ``min_lr_ratio`` at the last step."""
    floor = cfg.min_lr_ratio
    progress = _decay_progress(step, total_steps, cfg)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULES.register("linear")
def linear(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Straight from 1 down to ``min_lr_ratio`` at the last step."""
    return 1.0 - (1.0 - cfg.min_lr_ratio) * _decay_progress(step, total_steps, cfg)


@SCHEDULES.register("wsd")
def warmup_stable_decay(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Constant, then a cooldown to ``min_lr_ratio`` over the last ``decay_steps`` (or
    ``decay_fraction`` of the) steps. The stable phase lets one long run branch cooldowns at
    several lengths (scaling ladders, continual pretraining)."""
    if cfg.decay_steps is not None:
        check_schedule(total_steps, cfg)
    decay_steps = final_decay_steps(total_steps, cfg)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return _cooldown(step, decay_start, decay_steps, 1.0, cfg)


@SCHEDULES.register("infinite")
def infinite(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Cosine cooldown to ``constant_lr_ratio``, constant, then a final anneal to the floor."""
    check_schedule(total_steps, cfg)
    level = _required(cfg.constant_lr_ratio, "constant_lr_ratio")
    cooldown_steps = _required(cfg.cooldown_steps, "cooldown_steps")
    cooldown_end = cfg.warmup_steps + cooldown_steps
    decay_steps = final_decay_steps(total_steps, cfg)
    decay_start = total_steps - decay_steps
    if step >= decay_start:
        return _cooldown(step, decay_start, decay_steps, level, cfg)
    if step >= cooldown_end:
        return level
    progress = (step - cfg.warmup_steps + 1) / cooldown_steps
    return level + (1.0 - level) * 0.5 * (1.0 + math.cos(math.pi * progress))


@SCHEDULES.register("wsd_cyclic")
def cyclic_warmup_stable_decay(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """``wsd_periods`` WSD periods; each after the first re-warms from the floor."""
    check_schedule(total_steps, cfg)
    periods = _required(cfg.wsd_periods, "wsd_periods")
    length = total_steps // periods
    period = min(step // length, periods - 1)
    period_start = period * length
    if period == periods - 1:
        length = total_steps - period_start  # the last period takes the leftover steps
    local = step - period_start
    floor = cfg.min_lr_ratio
    if period > 0 and local < cfg.warmup_steps:
        return floor + (1.0 - floor) * (local + 1) / cfg.warmup_steps
    decay_steps = final_decay_steps(length, cfg)
    decay_start = length - decay_steps
    if local < decay_start:
        return 1.0
    return _cooldown(local, decay_start, decay_steps, 1.0, cfg)


def describe(cfg: OptimConfig) -> str:
    """One line for reports: ``wsd, 1-sqrt cooldown over the last 50 steps to 0.1 x peak; warmup 20``."""
    floor = f"{cfg.min_lr_ratio:g} x peak"
    decay = f"{cfg.decay_steps} steps" if cfg.decay_steps is not None else f"{cfg.decay_fraction:g} of the steps"
    if cfg.schedule == "constant":
        body = "constant"
    elif cfg.schedule in ("cosine", "linear"):
        body = f"{cfg.schedule} to {floor}"
    elif cfg.schedule == "wsd":
        body = f"wsd, {cfg.cooldown} cooldown over the last {decay} to {floor}"
    elif cfg.schedule == "infinite":
        body = (f"infinite, cosine cooldown to {cfg.constant_lr_ratio:g} x peak over {cfg.cooldown_steps} steps, "
                f"constant, {cfg.cooldown} anneal over the last {decay} to {floor}")
    elif cfg.schedule == "wsd_cyclic":
        body = f"wsd_cyclic, {cfg.wsd_periods} periods, each with a {cfg.cooldown} cooldown over {decay} to {floor}"
    else:  # a schedule registered elsewhere
        body = cfg.schedule
    start = f" from {cfg.warmup_start_ratio:g} x peak" if cfg.warmup_start_ratio else ""
    return f"{body}; warmup {cfg.warmup_steps} steps{start}"
