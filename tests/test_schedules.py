"""LR schedules: closed-form values of every schedule and cooldown shape, today's numbers kept
bit for bit at the defaults, the WSD branch property, and the checks on every schedule key."""

from __future__ import annotations

import math

import pytest

from lmforge.core.errors import ConfigError
from lmforge.optim.config import OptimConfig
from lmforge.optim.schedules import check_schedule, cooldown_start, lr_curve, lr_multiplier


def _cfg(**changes) -> OptimConfig:
    return OptimConfig.from_dict(changes, path="optim")  # type: ignore[return-value]


# --------------------------------------------------------------------------- defaults unchanged


def _formula_before_continuation_keys(step: int, total: int, schedule: str, warmup: int,
                                      decay_fraction: float, floor: float) -> float:
    """The schedules as written before the continuation keys existed (the reference)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total - warmup - 1, 1)
        progress = min(max((step - warmup) / span, 0.0), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(int(round(decay_fraction * total)), 1)
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return 1.0 - (1.0 - floor) * progress


@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd"])
@pytest.mark.parametrize("total", [1, 7, 100, 1001])
@pytest.mark.parametrize("warmup", [0, 5, 20])
@pytest.mark.parametrize("decay_fraction,floor", [(0.2, 0.1), (0.0, 0.0), (0.35, 0.0), (1.0, 0.05)])
def test_defaults_are_bit_identical_to_the_schedules_before(schedule, total, warmup, decay_fraction, floor):
    cfg = _cfg(schedule=schedule, warmup_steps=warmup, decay_fraction=decay_fraction, min_lr_ratio=floor)
    expected = [_formula_before_continuation_keys(s, total, schedule, warmup, decay_fraction, floor)
                for s in range(total)]
    assert [lr_multiplier(s, total, cfg) for s in range(total)] == expected  # ==, not approx


def test_default_config_keeps_its_schedule():
    cfg = OptimConfig()
    assert (cfg.schedule, cfg.warmup_start_ratio, cfg.decay_steps, cfg.cooldown) == ("cosine", 0.0, None, "linear")


# --------------------------------------------------------------------------- closed forms


def test_warmup_from_a_nonzero_start():
    cfg = _cfg(schedule="constant", warmup_steps=4, warmup_start_ratio=0.2)
    # The line from 0.2 at step -1 (the parent's last step) to 1 at step 3.
    assert lr_curve(6, cfg) == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.0, 1.0])


def test_cosine_and_linear_redecay_to_the_floor():
    cosine = _cfg(schedule="cosine", warmup_steps=2, min_lr_ratio=0.2)
    linear = _cfg(schedule="linear", warmup_steps=2, min_lr_ratio=0.2)
    total = 12  # decay over steps 2..11: progress (step - 2) / 9
    for step, progress in [(2, 0.0), (5, 1 / 3), (8, 2 / 3), (11, 1.0)]:
        assert lr_multiplier(step, total, cosine) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert lr_multiplier(step, total, linear) == pytest.approx(1.0 - 0.8 * progress)
    assert lr_multiplier(11, total, linear) == pytest.approx(0.2)
    rewarm = _cfg(schedule="linear", warmup_steps=4, warmup_start_ratio=0.25, min_lr_ratio=0.0)
    assert lr_curve(8, rewarm) == pytest.approx([0.4375, 0.625, 0.8125, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])


@pytest.mark.parametrize("shape,expected", [
    ("linear", [1 - 0.9 * p for p in (0.25, 0.5, 0.75, 1.0)]),
    ("1-sqrt", [0.1 + 0.9 * (1 - math.sqrt(p)) for p in (0.25, 0.5, 0.75, 1.0)]),
    ("exponential", [0.1 ** p for p in (0.25, 0.5, 0.75, 1.0)]),
])
def test_wsd_cooldown_shapes(shape, expected):
    cfg = _cfg(schedule="wsd", warmup_steps=2, decay_steps=4, cooldown=shape, min_lr_ratio=0.1)
    curve = lr_curve(10, cfg)
    assert curve[:6] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert curve[6:] == pytest.approx(expected)
    assert curve[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(curve[5:], curve[6:]))


def test_one_minus_sqrt_values_at_chosen_steps():
    cfg = _cfg(schedule="wsd", warmup_steps=0, decay_steps=100, cooldown="1-sqrt", min_lr_ratio=0.0)
    # Cooldown from step 100 of 200; progress at step t is (t - 99) / 100.
    assert lr_multiplier(99, 200, cfg) == 1.0
    assert lr_multiplier(124, 200, cfg) == pytest.approx(1 - math.sqrt(0.25)) == pytest.approx(0.5)
    assert lr_multiplier(199, 200, cfg) == pytest.approx(0.0)


def test_decay_steps_overrides_decay_fraction():
    by_fraction = _cfg(schedule="wsd", warmup_steps=0, decay_fraction=0.5, min_lr_ratio=0.0)
    by_steps = _cfg(schedule="wsd", warmup_steps=0, decay_fraction=0.5, decay_steps=2, min_lr_ratio=0.0)
    assert lr_curve(8, by_fraction) == pytest.approx([1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0])
    assert lr_curve(8, by_steps) == pytest.approx([1, 1, 1, 1, 1, 1, 0.5, 0.0])
    assert cooldown_start(8, by_fraction) == 4 and cooldown_start(8, by_steps) == 6


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "exponential"])
def test_infinite_schedule_phases(shape):
    cfg = _cfg(schedule="infinite", warmup_steps=2, cooldown_steps=4, constant_lr_ratio=0.5, decay_steps=4,
               cooldown=shape, min_lr_ratio=0.05)
    curve = lr_curve(20, cfg)
    assert curve[:2] == [0.5, 1.0]  # warmup
    # Cosine cooldown from 1 to 0.5 over steps 2..5, progress (t - 1) / 4.
    assert curve[2:6] == pytest.approx([0.5 + 0.25 * (1 + math.cos(math.pi * q)) for q in (0.25, 0.5, 0.75, 1.0)])
    assert curve[5] == pytest.approx(0.5) and curve[6:16] == [0.5] * 10  # constant
    anneal = {"linear": [0.5 - 0.45 * p for p in (0.25, 0.5, 0.75, 1.0)],
              "1-sqrt": [0.05 + 0.45 * (1 - math.sqrt(p)) for p in (0.25, 0.5, 0.75, 1.0)],
              "exponential": [0.5 * 0.1 ** p for p in (0.25, 0.5, 0.75, 1.0)]}[shape]
    assert curve[16:] == pytest.approx(anneal)
    assert curve[-1] == pytest.approx(0.05)
    assert cooldown_start(20, cfg) == 16


def test_infinite_without_a_first_cooldown_drops_to_the_constant():
    cfg = _cfg(schedule="infinite", warmup_steps=2, cooldown_steps=0, constant_lr_ratio=0.3, decay_steps=2,
               min_lr_ratio=0.1)
    assert lr_curve(7, cfg) == pytest.approx([0.5, 1.0, 0.3, 0.3, 0.3, 0.2, 0.1])


def test_wsd_cyclic_periods_rewarm_from_the_floor():
    cfg = _cfg(schedule="wsd_cyclic", wsd_periods=3, warmup_steps=2, decay_steps=2, min_lr_ratio=0.2)
    # 3 periods of 7 steps = 21 (the last takes 1 more step: 22): warmup/re-warm 2, stable, cooldown 2.
    curve = lr_curve(22, cfg)
    assert curve[:7] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.6, 0.2])
    assert curve[7:14] == pytest.approx([0.6, 1.0, 1.0, 1.0, 1.0, 0.6, 0.2])
    assert curve[14:] == pytest.approx([0.6, 1.0, 1.0, 1.0, 1.0, 1.0, 0.6, 0.2])


def test_wsd_cyclic_with_decay_fraction_of_each_period():
    cfg = _cfg(schedule="wsd_cyclic", wsd_periods=2, warmup_steps=0, decay_fraction=0.25, min_lr_ratio=0.0,
               cooldown="1-sqrt")
    curve = lr_curve(16, cfg)  # periods of 8 steps, cooldown of 2 each
    half = [1.0] * 6 + [1 - math.sqrt(0.5), 0.0]
    assert curve == pytest.approx(half + half)


def test_lr_curve_is_the_multiplier_at_every_step():
    cfg = _cfg(schedule="wsd", warmup_steps=3, decay_steps=5, cooldown="exponential", min_lr_ratio=0.01)
    assert lr_curve(30, cfg) == [lr_multiplier(s, 30, cfg) for s in range(30)]
    assert len(lr_curve(1, OptimConfig(warmup_steps=0))) == 1


# --------------------------------------------------------------------------- branching a cooldown


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "exponential"])
@pytest.mark.parametrize("warmup,branch,decay,long_total", [(0, 10, 5, 200), (20, 20, 1, 97), (20, 137, 40, 1000),
                                                            (5, 300, 250, 1000)])
def test_wsd_cooldown_branched_from_the_stable_phase_is_the_uninterrupted_cooldown(
        shape, warmup, branch, decay, long_total):
    cfg = _cfg(schedule="wsd", warmup_steps=warmup, decay_steps=decay, cooldown=shape, min_lr_ratio=0.05)
    long_run = lr_curve(long_total, cfg)
    short_run = lr_curve(branch + decay, cfg)  # the run that decays at `branch`
    # Up to the branch point the short run is the long run's warmup + stable phase, bit for bit ...
    assert short_run[:branch] == long_run[:branch]
    assert long_run[branch - 1] == short_run[branch - 1] == 1.0 or branch <= warmup
    # ... its cooldown starts exactly at the branch step ...
    assert cooldown_start(branch + decay, cfg) == branch
    assert short_run[branch] < 1.0 and short_run[-1] == pytest.approx(0.05)
    # ... and is the long run's own cooldown, shifted, value for value.
    assert short_run[branch:] == long_run[long_total - decay:]


def test_branching_needs_decay_steps_not_a_fraction():
    # With decay_fraction the cooldown's length depends on train.steps: why decay_steps exists.
    cfg = _cfg(schedule="wsd", warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.0)
    assert cooldown_start(100, cfg) == 80 and cooldown_start(80 + 20, cfg) == 80
    assert cooldown_start(60 + 20, cfg) != 60  # a run of 80 steps decays from 64, not from 60


def test_infinite_constant_phase_branches_like_wsd():
    cfg = _cfg(schedule="infinite", warmup_steps=10, cooldown_steps=20, constant_lr_ratio=0.4, decay_steps=15,
               cooldown="exponential", min_lr_ratio=0.04)
    long_run, short_run = lr_curve(500, cfg), lr_curve(100 + 15, cfg)
    assert short_run[:100] == long_run[:100]
    assert short_run[99] == 0.4 and short_run[100] < 0.4
    assert short_run[100:] == long_run[-15:]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("changes,message", [
    ({"warmup_start_ratio": 1.5}, r"optim\.warmup_start_ratio: must be in \[0, 1\]"),
    ({"warmup_start_ratio": 0.3, "warmup_steps": 0}, r"optim\.warmup_start_ratio: has no effect without a warmup"),
    ({"schedule": "wsd", "decay_steps": 0}, r"optim\.decay_steps: must be >= 1"),
    ({"schedule": "wsd", "cooldown": "cubic"}, r"optim\.cooldown: unknown cooldown shape 'cubic' \(known: 1-sqrt, "
                                               r"exponential, linear\)"),
    ({"schedule": "wsd", "cooldown": "exponential", "min_lr_ratio": 0.0}, r"optim\.cooldown: exponential .* > 0"),
    ({"schedule": "cosine", "decay_steps": 10}, r"optim\.decay_steps: applies only to schedule wsd / wsd_cyclic / "
                                                r"infinite, not 'cosine'"),
    ({"schedule": "linear", "cooldown": "1-sqrt"}, r"optim\.cooldown: applies only to schedule"),
    ({"schedule": "wsd", "constant_lr_ratio": 0.5}, r"optim\.constant_lr_ratio: applies only to schedule infinite"),
    ({"schedule": "wsd", "cooldown_steps": 5}, r"optim\.cooldown_steps: applies only to schedule infinite"),
    ({"schedule": "wsd", "wsd_periods": 3}, r"optim\.wsd_periods: applies only to schedule wsd_cyclic"),
    ({"schedule": "infinite", "cooldown_steps": 5}, r"optim\.constant_lr_ratio: the infinite schedule needs it"),
    ({"schedule": "infinite", "constant_lr_ratio": 0.5}, r"optim\.cooldown_steps: the infinite schedule needs it"),
    ({"schedule": "infinite", "constant_lr_ratio": 0.0, "cooldown_steps": 5}, r"optim\.constant_lr_ratio: must be in"),
    ({"schedule": "infinite", "constant_lr_ratio": 0.05, "cooldown_steps": 5, "min_lr_ratio": 0.1},
     r"optim\.constant_lr_ratio: \(0\.05\) is below optim\.min_lr_ratio"),
    ({"schedule": "infinite", "constant_lr_ratio": 0.5, "cooldown_steps": -1}, r"optim\.cooldown_steps: must be >= 0"),
    ({"schedule": "wsd_cyclic"}, r"optim\.wsd_periods: the wsd_cyclic schedule needs"),
    ({"schedule": "wsd_cyclic", "wsd_periods": 0}, r"optim\.wsd_periods: must be >= 1"),
    ({"schedule": "wsd", "decay_steps": 2.5}, r"optim\.decay_steps: expected int or null"),
    ({"schedule": "step"}, r"optim\.schedule: unknown schedule 'step'"),
])
def test_bad_schedule_keys_are_refused_naming_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**changes)


@pytest.mark.parametrize("changes,total,message", [
    ({"schedule": "wsd", "warmup_steps": 10, "decay_steps": 50}, 55,
     r"optim\.warmup_steps \(10\) \+ optim\.decay_steps \(50\) exceed train\.steps \(55\)"),
    ({"schedule": "infinite", "warmup_steps": 10, "cooldown_steps": 30, "constant_lr_ratio": 0.5,
      "decay_steps": 20}, 59, r"optim\.cooldown_steps \(30\) \+ final anneal \(20 steps: optim\.decay_steps\)"),
    ({"schedule": "infinite", "warmup_steps": 10, "cooldown_steps": 30, "constant_lr_ratio": 0.5}, 45,
     r"final anneal \(9 steps: optim\.decay_fraction\) exceed train\.steps \(45\)"),
    ({"schedule": "wsd_cyclic", "wsd_periods": 4, "warmup_steps": 5, "decay_steps": 6}, 40,
     r"exceed the period length \(10 = train\.steps 40 // optim\.wsd_periods 4\)"),
    ({"schedule": "wsd_cyclic", "wsd_periods": 4, "warmup_steps": 0}, 3,
     r"optim\.wsd_periods \(4\) exceeds train\.steps \(3\)"),
])
def test_layouts_longer_than_the_run_are_refused(changes, total, message):
    cfg = _cfg(**changes)
    with pytest.raises(ConfigError, match=message):
        check_schedule(total, cfg)
    with pytest.raises(ConfigError, match=message):  # the schedule itself refuses too, not a silent curve
        lr_multiplier(total - 1, total, cfg)
    check_schedule(200, cfg)  # the same keys fit a longer run


def test_wsd_by_fraction_keeps_todays_tolerance_of_short_runs():
    # Before decay_steps, a WSD run shorter than its warmup was allowed (warmup wins); it still is.
    cfg = _cfg(schedule="wsd", warmup_steps=20)
    check_schedule(5, cfg)
    assert lr_curve(5, cfg) == [0.05, 0.1, 0.15, 0.2, 0.25]


def test_cooldown_start_only_for_schedules_with_one_final_cooldown():
    with pytest.raises(ConfigError, match=r"optim\.schedule: 'cosine' has no single final cooldown"):
        cooldown_start(100, OptimConfig())
