"""train.time_budget_s: the run fixes its length once from measured step times, keeps the
learning rates it already used, and resumes bit for bit (also when killed before deciding)."""

from __future__ import annotations

import json
import signal

import pytest

import torch

from conftest import run_cli, tiny_run_dict, train_losses, write_config
from lmforge.core.errors import ConfigError
from lmforge.optim.config import OptimConfig
from lmforge.optim.schedules import check_schedule, cooldown_start, lr_multiplier
from lmforge.train.config import RunConfig
from lmforge.train.time_budget import TimeBudget, decide, fewest_steps

WSD = {"schedule": "wsd", "warmup_steps": 2, "decay_fraction": 0.5}


def optim(**fields) -> OptimConfig:
    return OptimConfig.from_dict({**WSD, **fields}, path="optim")  # type: ignore[return-value]


def test_the_median_step_time_sets_the_length_within_the_bounds():
    cfg = optim()
    # 0.5 s a step (the slow outlier does not move the median) into 30 s: 60 steps
    assert decide(30.0, [0.5, 0.5, 9.0, 0.5], 8, 100, cfg).total_steps == 60
    assert decide(30.0, [0.5] * 3, 8, 40, cfg).total_steps == 40  # train.steps bounds it
    short = decide(1e-6, [0.5] * 3, 8, 40, cfg)
    assert short.fitting_steps == 0 and short.total_steps == fewest_steps(8, 40, cfg) == 16
    assert "at least" in short.describe()


@pytest.mark.parametrize("fields", [WSD, {"schedule": "wsd", "warmup_steps": 30, "decay_steps": 25},
                                    {"schedule": "infinite", "warmup_steps": 3, "cooldown_steps": 4,
                                     "constant_lr_ratio": 0.5, "decay_fraction": 0.2},
                                    {"schedule": "constant", "warmup_steps": 3}])
def test_the_learning_rates_before_the_decision_are_those_of_any_allowed_length(fields):
    cfg = OptimConfig.from_dict(fields, path="optim")
    decided_at, planned = 12, 200
    fewest = fewest_steps(decided_at, planned, cfg)
    assert decided_at < fewest < planned
    for total in (fewest, fewest + 7, planned):
        check_schedule(total, cfg)
        assert [lr_multiplier(s, total, cfg) for s in range(decided_at)] == \
               [lr_multiplier(s, planned, cfg) for s in range(decided_at)]
    if cfg.schedule != "constant":  # one step shorter would not fit, or would start the decay too early
        try:
            check_schedule(fewest - 1, cfg)
        except ConfigError:
            return
        assert cooldown_start(fewest - 1, cfg) < decided_at


def test_schedules_that_depend_on_the_length_from_the_start_are_refused(tmp_path, tiny_corpus):
    for schedule in ("cosine", "linear"):
        raw = tiny_run_dict(tmp_path, tiny_corpus, optim={"schedule": schedule}, train={"time_budget_s": 60})
        with pytest.raises(ConfigError, match=f"optim.schedule '{schedule}'"):
            RunConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="positive"):
        RunConfig.from_dict(tiny_run_dict(tmp_path, tiny_corpus, optim=WSD, train={"time_budget_s": -5}))


def test_the_decision_waits_for_the_calibration_steps_and_resumes_from_its_state():
    cfg = optim()
    budget = TimeBudget(10.0, calibration_steps=5, planned_steps=100)
    for step in range(1, 5):
        assert budget.observe(step, 9.0 if step == 1 else 0.25, cfg) is None  # step 1: the warm-up, not timed
    state = budget.state_dict()
    assert state == {"budget_s": 10.0, "start_step": 0, "step_times": [0.25, 0.25, 0.25]}
    resumed = TimeBudget(10.0, calibration_steps=5, planned_steps=100)
    assert resumed.load_state_dict(state) is None
    assert resumed.observe(5, 7.0, cfg).total_steps == 40  # its own first step is not timed: 10 / 0.25
    again = TimeBudget(10.0, calibration_steps=5, planned_steps=30)  # train.steps lowered since
    assert again.load_state_dict(resumed.state_dict()).total_steps == 30
    assert TimeBudget(20.0, 5, 100).load_state_dict(resumed.state_dict()) is None  # another budget: decide anew
    # resumed right before the decision with no step timed yet: it still decides after step 5, from
    # its one (untimed) step rather than later
    late = TimeBudget(10.0, calibration_steps=5, planned_steps=100)
    late.load_state_dict({"budget_s": 10.0, "step_times": []})
    assert late.observe(5, 0.5, cfg).total_steps == 20


def test_a_run_that_took_over_a_parents_state_counts_only_its_own_steps():
    cfg = optim(decay_steps=10)  # (a fraction of a total that includes the parent's steps would need ~1800)
    child = TimeBudget(10.0, calibration_steps=5, planned_steps=2000)
    child.start_step = 900  # init.trainer_state: the parent's step
    assert [child.observe(step, 0.25, cfg) for step in range(901, 905)] == [None] * 4
    decision = child.observe(905, 0.25, cfg)
    assert decision.fitting_steps == 40 and decision.total_steps == 940  # 10 s at 0.25 s: 40 steps of its own
    assert child.state_dict()["start_step"] == 900


def test_a_window_average_for_a_last_step_moved_by_the_decision_still_closes():
    from lmforge.train.averaging import WindowAverage

    last = [20]
    window = WindowAverage(5, needed=lambda step: step == last[0])
    weights = [torch.zeros(2)]
    for step in range(1, 4):
        window.update(weights, step)
    last[0] = 6  # decided after step 3: the run ends at 6, inside the window already offered
    window.rescan(3, 6)
    for step in range(4, 7):
        window.update(weights, step)
    assert window.finished is not None and window.finished[0] == 6
    assert not window.pending  # nothing left open for the old last step


@pytest.fixture(scope="module")
def budget_runs(tmp_path_factory, tiny_corpus):
    """A run whose budget is far too small (so the decision is the shortest allowed length, whatever
    the machine's speed), uninterrupted and killed twice; and a budget that never binds."""
    tmp = tmp_path_factory.mktemp("budget")
    base = tiny_run_dict(tmp, tiny_corpus, model={"moe": None}, optim=WSD,
                         train={"steps": 20, "time_budget_s": 1e-6, "time_budget_calibration_steps": 8,
                                "eval_every": 0, "checkpoint_every": 2, "weight_averaging": {"window": 3}})
    results = {}
    for name, train in (("short", {}), ("killed", {}), ("ample", {"time_budget_s": 1e9}), ("plain", {"time_budget_s": None})):
        path = write_config(tmp / f"{name}.yaml", {**base, "name": name, "train": {**base["train"], **train}})
        if name == "killed":
            # killed at step 7 (before the decision at 8; resumed from 6, it has one step time of its
            # own before step 8, so it needs the saved ones) and at step 13 (after it)
            results["crash1"] = run_cli("train", str(path), env={"LMFORGE_CRASH_AT_STEP": "7"})
            results["crash2"] = run_cli("train", str(path), "--resume", "auto", env={"LMFORGE_CRASH_AT_STEP": "13"})
            results[name] = run_cli("train", str(path), "--resume", "auto")
        else:
            results[name] = run_cli("train", str(path))
    return tmp / "runs", results


def test_a_budget_ends_the_run_early_with_its_cooldown(budget_runs):
    runs_dir, results = budget_runs
    assert results["short"].returncode == 0, results["short"].stderr
    run = runs_dir / "short"
    decision = json.loads((run / "time_budget.json").read_text())
    assert decision["decided_at_step"] == 8 and decision["planned_steps"] == 20
    assert decision["total_steps"] == 16  # 16 - round(0.5 * 16) = 8: the cooldown starts after the decision
    assert sorted(train_losses(run)) == list(range(1, 17))
    assert (run / "checkpoints" / "step_0000016").is_dir() and (run / "eval" / "final.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r.get("kind") == "train"]
    assert lrs[7] == lrs[2] and lrs[-1] < lrs[8] < lrs[7]  # stable until the decision, then the cooldown
    assert "time budget" in (run / "report.html").read_text()
    assert (run / "eval" / "window" / "final.json").is_file()  # the window average of the decided last step


def test_fresh_deletes_a_budgeted_run_it_wrote(budget_runs, tmp_path):
    import shutil

    from lmforge.train.run_dir import remove_run_dir

    copy = tmp_path / "short"
    shutil.copytree(budget_runs[0] / "short", copy)
    assert (copy / "time_budget.json").is_file()
    assert remove_run_dir(copy) and not copy.exists()  # time_budget.json is one of lmforge's own files


def test_killed_before_and_after_the_decision_it_resumes_bit_for_bit(budget_runs):
    runs_dir, results = budget_runs
    assert results["crash1"].returncode == -signal.SIGKILL
    assert results["crash2"].returncode == -signal.SIGKILL
    assert results["killed"].returncode == 0, results["killed"].stderr
    assert train_losses(runs_dir / "killed") == train_losses(runs_dir / "short")
    assert json.loads((runs_dir / "killed" / "time_budget.json").read_text())["total_steps"] == 16


def test_a_budget_that_does_not_bind_changes_nothing(budget_runs):
    runs_dir, results = budget_runs
    assert results["ample"].returncode == 0 and results["plain"].returncode == 0
    ample = train_losses(runs_dir / "ample")
    assert sorted(ample) == list(range(1, 21))
    assert ample == train_losses(runs_dir / "plain")
    assert json.loads((runs_dir / "ample" / "time_budget.json").read_text())["total_steps"] == 20
    assert not (runs_dir / "plain" / "time_budget.json").exists()
