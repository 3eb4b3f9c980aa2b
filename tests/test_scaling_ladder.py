"""Scaling ladders without training: the plan follows the size, batch, LR and schedule rules
(C = 6·N_active·D), reruns skip finished rungs and resume the others, results gather from run
directories, and the held-out prediction is written before the held-out rungs start."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before scipy loads; see lmforge.scaling.fit

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from lmforge.core.checkpoint_files import step_dir_name  # noqa: E402
from lmforge.core.errors import ConfigError  # noqa: E402
from lmforge.nn.config import ModelConfig  # noqa: E402
from lmforge.nn.counting import count_parameters  # noqa: E402
from lmforge.optim.config import OptimConfig  # noqa: E402
from lmforge.optim.schedules import lr_multiplier  # noqa: E402
from lmforge.scaling.fit import LossLaw  # noqa: E402
from lmforge.scaling.ladder import run_ladder  # noqa: E402
from lmforge.scaling.ladder.config import LadderConfig, load_ladder_config  # noqa: E402
from lmforge.scaling.ladder.gather import LADDER_CSV, read_rows, write_results  # noqa: E402
from lmforge.scaling.ladder.plan import build_plan, decay_start  # noqa: E402
from lmforge.scaling.ladder.predict import choose_law, fit_offset_power_law, make_prediction  # noqa: E402
from lmforge.scaling.ladder.runner import branch_checkpoint, is_finished, is_ready, resume_argument  # noqa: E402
from lmforge.scaling.table import read_table  # noqa: E402

LAW = LossLaw(E=1.5, A=60.0, B=400.0, alpha=0.35, beta=0.4)
BASE = {
    "name": "base",
    "data": {"out_dir": "unused", "vocab_size": 512, "sources": [{"name": "prose", "kind": "demo_literature"}]},
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64, "qk_norm": True},
    "optim": {"lr": 0.003},
    "train": {"seq_len": 64, "batch_size": 8, "checkpoint_every": 0, "log_every": 5, "tensorboard": False},
}


def ladder_dict(tmp_path: Path, **changes) -> dict:
    cfg = {
        "name": "lad", "out_dir": str(tmp_path / "ladders"), "base": copy.deepcopy(BASE),
        "sizes": {"n_layers": [1, 2, 3], "aspect_ratio": 32, "head_dim": 16, "ffn_ratio": 2.5, "ffn_multiple": 32},
        "grid": {"tokens": ["20K", 40000, "8e4"]},
        "schedule": {"kind": "cosine", "warmup_fraction": 0.1},
        "lr": {"base": 0.004, "base_d_model": 64, "width_exponent": 1.0},
        "batch": {"sequences": 8},
        "fit": {"bootstrap": 20},
    }
    cfg.update(changes)
    return cfg


def plan_of(tmp_path: Path, vocab: int = 512, **changes):
    cfg = LadderConfig.from_dict(ladder_dict(tmp_path, **changes))
    return build_plan(cfg, copy.deepcopy(cfg.base), vocab)


# --------------------------------------------------------------------------- plan


def test_sizes_follow_the_rule_and_compute_is_6_n_active_d(tmp_path):
    plan = plan_of(tmp_path)
    assert len(plan.rungs) == 9
    for rung in plan.rungs:
        model = plan.run_configs[rung.name]["model"]
        assert model["d_model"] == 16 * max(1, round(32 * model["n_layers"] / 16))
        assert model["n_heads"] == model["d_model"] // 16
        assert model["d_ff"] == math.ceil(2.5 * model["d_model"] / 32) * 32
        assert model["qk_norm"] is True and model["vocab_size"] == 512  # the rest comes from the base
        counts = count_parameters(ModelConfig.from_dict(model))
        assert rung.counts == counts
        train = plan.run_configs[rung.name]["train"]
        tokens = train["steps"] * train["batch_size"] * train["seq_len"]
        assert rung.tokens == tokens and abs(tokens - rung.target_tokens) <= train["batch_size"] * train["seq_len"] / 2
        assert rung.compute == 6 * counts.active * tokens
        assert plan.run_configs[rung.name]["optim"]["lr"] == pytest.approx(0.004 * 64 / model["d_model"])
        assert plan.run_configs[rung.name]["optim"]["schedule"] == "cosine"
    assert [r.name for r in plan.rungs if r.holdout] == ["d96L3_D20K", "d96L3_D40K", "d96L3_D80K"]


def test_hidden_size_rounding_ignores_float_noise(tmp_path):
    plan = plan_of(tmp_path, sizes={"n_layers": [1, 3], "aspect_ratio": 16, "head_dim": 16,
                                    "ffn_ratio": 2.6666667, "ffn_multiple": 16})
    assert [plan.run_configs[r.name]["model"]["d_ff"] for r in plan.rungs[::3]] == [48, 128]  # 8/3·48 = 128


def test_explicit_shapes_and_tokens_per_param(tmp_path):
    plan = plan_of(tmp_path, sizes={"shapes": [[32, 2], [64, 2]], "head_dim": 16},
                   grid={"tokens_per_param": [2, 4]})
    assert [(r.d_model, r.n_layers) for r in plan.rungs] == [(32, 2)] * 2 + [(64, 2)] * 2
    for rung in plan.rungs:
        ratio = float(rung.name.rsplit("tpp", 1)[1])
        assert rung.tokens / rung.counts.active == pytest.approx(ratio, rel=0.02)


def test_isoflop_budgets_spend_their_compute(tmp_path):
    budgets = [2e11, 6e11, 2e12]
    plan = plan_of(tmp_path, grid=None, isoflop={"compute": budgets, "min_tokens_per_param": 1,
                                                "max_tokens_per_param": 100})
    for rung in plan.rungs:
        assert rung.budget in budgets
        step_compute = 6 * rung.counts.active * rung.tokens_per_step
        assert abs(rung.compute - rung.budget) <= step_compute / 2 + 1  # D = C/(6N) up to one step
        assert 1 <= rung.target_tokens / rung.counts.active <= 100
    assert {r.budget for r in plan.rungs if r.holdout} == {2e12}
    assert len({r.budget for r in plan.rungs}) == 3


def _saves(rung) -> list[int]:
    """Steps at which the trainer saves: multiples of checkpoint_every after the start, and the last step."""
    start = rung.branch_step or 0
    every = rung.checkpoint_every
    periodic = [s for s in range(start + 1, rung.steps + 1) if every and s % every == 0]
    return sorted(set(periodic + [rung.steps]))


@pytest.mark.parametrize("checkpoint_every", [0, 4])
def test_wsd_chains_branch_at_the_trainers_decay_start(tmp_path, checkpoint_every):
    plan = plan_of(tmp_path, schedule={"kind": "wsd", "warmup_steps": 3, "decay_fraction": 0.25},
                   checkpoint_every=checkpoint_every)
    chains = plan.chains()
    assert len(chains) == 3 and all(len(c) == 3 for c in chains)
    for chain in chains:
        assert chain[0].parent is None
        for parent, child in zip(chain, chain[1:]):
            assert child.parent == parent.name and child.branch_step == parent.decay_start
            assert child.batch_size == parent.batch_size and child.warmup_steps == parent.warmup_steps
            optim = OptimConfig(schedule="wsd", warmup_steps=3, decay_fraction=0.25, min_lr_ratio=0.1)
            # Up to the branch point the child's schedule is exactly the parent's: resuming is exact.
            for step in range(child.branch_step):
                assert lr_multiplier(step, child.steps, optim) == lr_multiplier(step, parent.steps, optim)
            # The parent saves a checkpoint at its decay start, and keeps it until the end.
            saves = _saves(parent)
            assert parent.decay_start in saves
            assert parent.decay_start in saves[-parent.keep_checkpoints:]
        for rung in chain:
            optim = OptimConfig(schedule="wsd", warmup_steps=3, decay_fraction=0.25, min_lr_ratio=0.1)
            assert rung.decay_start == decay_start(rung.steps, optim)
            assert lr_multiplier(rung.decay_start - 1, rung.steps, optim) == 1.0
            assert lr_multiplier(rung.decay_start, rung.steps, optim) < 1.0
            if checkpoint_every:
                assert rung.decay_start % checkpoint_every == 0
            config = plan.run_configs[rung.name]
            assert config["optim"]["schedule"] == "wsd" and config["train"]["steps"] == rung.steps


def test_batch_rule_scales_with_compute(tmp_path):
    plan = plan_of(tmp_path, batch={"sequences": 8, "compute_exponent": 0.5, "base_compute": "1e11",
                                    "multiple_of": 4})
    for rung in plan.rungs:
        expected = max(4, 4 * round(8 * (6 * rung.counts.active * rung.target_tokens / 1e11) ** 0.5 / 4))
        assert rung.batch_size == expected
    assert len({r.batch_size for r in plan.rungs}) > 1


@pytest.mark.parametrize("changes, message", [
    ({"isoflop": {"compute": [1e12]}}, "exactly one of grid"),
    ({"sizes": {"n_layers": [1], "aspect": 3}}, "sizes.aspect: unknown key"),
    ({"grid": {"tokens": ["lots"]}}, "tokens: expected a number like 2e6"),
    ({"grid": {"tokens": [1e5], "tokens_per_param": [20]}}, "either tokens"),
    ({"sizes": {"shapes": [[40, 2]], "head_dim": 16}}, "not a multiple of head_dim 16"),
    ({"schedule": {"kind": "linear"}}, "schedule.kind: expected one of 'cosine', 'wsd'"),
])
def test_bad_ladder_configs_name_the_key(tmp_path, changes, message):
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(ladder_dict(tmp_path, **changes)))
    with pytest.raises(ConfigError, match=message) as info:
        load_ladder_config(path)
    assert str(path) in str(info.value)


def test_bad_base_and_too_close_budgets(tmp_path):
    cfg = LadderConfig.from_dict(ladder_dict(tmp_path))
    bad = copy.deepcopy(cfg.base)
    bad["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match="base: train.stepz: unknown key"):
        build_plan(cfg, bad, 512)
    with pytest.raises(ConfigError, match="too close"):
        plan_of(tmp_path, grid={"tokens": [20000, 20100]}, schedule={"kind": "wsd", "warmup_steps": 2})


def test_base_config_from_a_path_with_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump({**ladder_dict(tmp_path), "base": "base.yaml", "overrides": ["train.seq_len=32"]}))
    cfg, base = load_ladder_config(path)
    assert base["train"]["seq_len"] == 32
    plan = build_plan(cfg, base, 512)
    assert all(r.seq_len == 32 and r.tokens_per_step == 8 * 32 for r in plan.rungs)


# --------------------------------------------------------------------------- fake run directories


def fake_run(plan, rung, loss: float | None = None, finished: bool = True, checkpoints=()) -> Path:
    """A run directory as the trainer leaves it: config, metrics, checkpoints, final eval."""
    run = plan.runs_dir / rung.name
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(plan.run_configs[rung.name]))
    (run / "data_manifest.json").write_text(json.dumps(
        {"sources": {"prose": {"train": {"tokens": 10**6}}, "code": {"train": {"tokens": 5 * 10**5}}}}))
    if loss is None:  # the law, with a little noise that is fixed per rung
        noise = np.random.default_rng(sum(map(ord, rung.name))).normal(0.0, 0.003)
        loss = float(LAW.loss(rung.counts.active, rung.tokens)) * (1.0 + noise)
    start = rung.branch_step or 0
    records = []
    for step in range(start + 1, rung.steps + 1):
        if step % 5 == 0 or step == rung.steps:
            records.append({"kind": "train", "step": step, "tokens": step * rung.tokens_per_step,
                            "loss": loss + 1.0 / step, "lr": 0.001, "epochs": {"prose": 0.1, "code": 0.2}})
    losses = {"prose": loss + 0.1, "code": loss - 0.1}
    evaluation = {"kind": "eval", "step": rung.steps, "tokens": rung.tokens, "loss": losses,
                  "bpb": {d: v / math.log(2) / 3 for d, v in losses.items()},
                  "eval_tokens": {"prose": 100, "code": 100}, "eval_bytes": {"prose": 300, "code": 300}}
    if finished:
        records.append(evaluation)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in checkpoints:
        folder = run / "checkpoints" / step_dir_name(step)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text(json.dumps({"step": step, "files": {}}))
    if finished:
        (run / "eval").mkdir(exist_ok=True)
        tasks = {"next_line": {"acc": 0.2 + 1 / loss, "acc_norm": 0.25 + 1 / loss, "chance": 0.25, "items": 10}}
        (run / "eval" / "final.json").write_text(json.dumps({**evaluation, "tasks": tasks}))
    return run


def test_rerun_skips_finished_and_resumes_the_rest(tmp_path):
    plan = plan_of(tmp_path, schedule={"kind": "wsd", "warmup_steps": 3})
    root, branch, last = plan.chains()[0]
    assert not is_ready(plan, branch) and is_ready(plan, root)
    assert resume_argument(plan, root) == "auto"                      # fresh, or whatever it left
    fake_run(plan, root, finished=False, checkpoints=[root.decay_start])
    assert not is_finished(plan, root) and is_ready(plan, branch)
    assert resume_argument(plan, branch) == str(branch_checkpoint(plan, branch))  # from the parent
    assert branch_checkpoint(plan, branch).name == step_dir_name(root.decay_start)
    fake_run(plan, branch, finished=False, checkpoints=[branch.decay_start])
    assert resume_argument(plan, branch) == "auto"                    # its own checkpoint now
    fake_run(plan, root)
    assert is_finished(plan, root) and not is_finished(plan, last)


def test_results_gather_into_csvs_the_fitter_reads(tmp_path):
    plan = plan_of(tmp_path, schedule={"kind": "wsd", "warmup_steps": 3})
    for rung in plan.rungs[:-1]:
        fake_run(plan, rung, checkpoints=[rung.decay_start])
    rows, paths = write_results(plan)
    assert len(rows) == len(plan.rungs) - 1  # the unfinished rung is left out
    header = paths[0].read_text().splitlines()[0].split(",")
    for column in ("rung", "N", "n_total", "n_active", "n_active_non_embedding", "D", "C", "loss", "bpb",
                   "bpb_code", "bpb_prose", "acc_norm_next_line", "schedule", "steps", "lr", "warmup_steps",
                   "decay_start_step"):
        assert column in header
    table = read_table(paths[0])  # the fitter's default column names
    rungs = {r.name: r for r in plan.rungs}
    for row, n, d, c, loss in zip(rows, table.params, table.tokens, table.compute, table.loss):
        rung = rungs[row["rung"]]
        assert (n, d, c) == (rung.counts.active, rung.tokens, rung.compute)
        assert loss == pytest.approx(float(LAW.loss(rung.counts.active, rung.tokens)), rel=0.02)  # domain mean
        assert row["U"] == 1.5e6 and row["epochs"] == 0.2 and row["branch_of"] == rung.parent
    assert table.run is None  # rows with equal N form one curve (Approach 1)
    curves = read_rows(paths[1])
    branch = plan.chains()[0][1]
    mine = [c for c in curves if c["rung"] == branch.name]
    sources = {c["source"] for c in mine}
    assert sources == {branch.parent, branch.name}  # stitched to the parent up to the branch step
    assert max(c["step"] for c in mine if c["source"] == branch.parent) <= branch.branch_step
    assert [c for c in mine if c["kind"] == "eval"][-1]["bpb"] > 0


# --------------------------------------------------------------------------- prediction


def test_power_law_with_offset_is_recovered():
    compute = np.geomspace(1e12, 1e15, 6)
    loss = 2.0 + 3.0 * (compute / 1e13) ** -0.2
    law = fit_offset_power_law(compute, loss)
    assert law.E == pytest.approx(2.0, rel=1e-3) and law.gamma == pytest.approx(0.2, rel=1e-3)
    assert float(law(1e16)) == pytest.approx(2.0 + 3.0 * 1e3 ** -0.2, rel=1e-4)


def test_the_law_is_chosen_by_the_design():
    grid = [{"N": n, "D": d, "loss": 3.0} for n in (1e5, 2e5, 4e5) for d in (1e6, 2e6, 4e6)]
    assert choose_law(grid)[0] == "approach3"
    line = [{"N": n, "D": 20 * n, "loss": 3.0} for n in (1e5, 2e5, 4e5, 8e5, 1.6e6)]
    assert choose_law(line)[0] == "power_law"
    assert choose_law(grid, "power_law")[0] == "power_law"


class FakeTrainer:
    """Stands in for a rung's process: writes the run directory a finished run leaves, from LAW."""

    calls: list[tuple[str, float, bool]] = []

    def __init__(self, plan, rung, resume, threads, log_path):
        prediction = plan.ladder_dir / "prediction.json"
        FakeTrainer.calls.append((rung.name, time.time(), prediction.is_file()))
        checkpoints = [rung.decay_start] if rung.decay_start else []
        fake_run(plan, rung, checkpoints=checkpoints)

    def poll(self):
        return 0

    def terminate(self):
        pass

    def wait(self, timeout=None):
        return 0


def test_prediction_is_written_before_the_held_out_rungs_train(tmp_path, capsys, monkeypatch):
    import lmforge.scaling.ladder.driver as ladder_module

    # Data preparation is not what this test is about: plan with the base vocabulary.
    monkeypatch.setattr(ladder_module, "prepared_vocab_size", lambda base, prepare: 512)
    FakeTrainer.calls = []
    path = tmp_path / "ladder.yaml"
    cfg = ladder_dict(tmp_path, sizes={"n_layers": [1, 2, 3, 4], "aspect_ratio": 32, "head_dim": 16},
                      schedule={"kind": "wsd", "warmup_steps": 3}, fit={"bootstrap": 8})
    path.write_text(yaml.safe_dump(cfg))
    code = run_ladder(path, workers=2, holdout=True, launcher=FakeTrainer, poll_seconds=0.0)
    assert code == 0
    ladder_dir = tmp_path / "ladders" / "lad"
    prediction = json.loads((ladder_dir / "prediction.json").read_text())
    held = [name for name, _, _ in FakeTrainer.calls if name.startswith("d128L4")]
    assert len(held) == 3 and FakeTrainer.calls[-3:] == [c for c in FakeTrainer.calls if c[0] in held]
    assert all(existed for name, _, existed in FakeTrainer.calls if name in held)
    assert not any(existed for name, _, existed in FakeTrainer.calls if name not in held)
    first_start = min(t for name, t, _ in FakeTrainer.calls if name in held)
    assert prediction["written_unix"] < first_start
    assert prediction["order_check"]["prediction_written_before_training"] is True
    assert prediction["law"]["kind"] == "approach3" and len(prediction["fitted_rungs"]) == 9
    # The fake runs follow LAW up to 0.3% noise, so Approach 3 extrapolates to the held-out size closely.
    assert abs(prediction["summary"]["loss_relative_error"]) < 0.02
    head = next(p for p in prediction["predictions"] if p["rung"] == prediction["headline"])
    assert head["loss"]["low"] <= head["loss"]["value"] <= head["loss"]["high"]
    assert set(head["downstream"]) == {"bpb_code", "bpb_prose", "acc_norm_next_line"}
    assert "bpb_code" in head["relative_error"] and "acc_norm_next_line" in head["relative_error"]
    before = json.loads((ladder_dir / "prediction_before_training.json").read_text())
    assert before["predictions"][0]["loss"] == prediction["predictions"][0]["loss"] and "actual" not in before
    for name in ("ladder.csv", "curves.csv", "fit/fit.json", "curves.png", "prediction.png", "ladder_plan.json"):
        assert (ladder_dir / name).stat().st_size > 0, name
    assert len(read_rows(ladder_dir / LADDER_CSV)) == 12
    out = capsys.readouterr().out
    assert "predicted loss is off by" in out
    # A rerun trains nothing and keeps the prediction made before the held-out rungs started.
    FakeTrainer.calls = []
    assert run_ladder(path, workers=2, holdout=True, launcher=FakeTrainer, poll_seconds=0.0) == 0
    assert FakeTrainer.calls == []
    again = json.loads((ladder_dir / "prediction.json").read_text())
    assert again["written_at"] == prediction["written_at"]


def test_local_runner_off_a_terminal_prints_one_line_status(tmp_path, capsys, monkeypatch):
    from lmforge.scaling.ladder.runner import LocalRunner

    monkeypatch.setenv("LMFORGE_PROGRESS", "1")
    monkeypatch.setenv("LMFORGE_PROGRESS_SECONDS", "0")  # a status line at every poll
    plan = plan_of(tmp_path)
    FakeTrainer.calls = []
    outcomes = LocalRunner(plan, workers=2, launcher=FakeTrainer, poll_seconds=0.0).run(plan.rungs[:2])
    assert {o.status for o in outcomes.values()} == {"done"}
    err = capsys.readouterr().err  # stderr is captured here: not a terminal
    status = [line for line in err.splitlines() if line.startswith("running ")]
    assert len(status) == 2 and all(re.fullmatch(r"running d\d+L\d+_D\w+: step \d+/\d+, loss [\d.]+ .* s", line)
                                    for line in status), err
    assert "\x1b[" not in err and "━" not in err  # no colours, no live bars


def test_prediction_with_too_few_rungs_uses_the_power_law():
    rows = [{"rung": f"r{i}", "N": n, "D": 20 * n, "C": 120 * n * n, "loss": 2 + 50 * n ** -0.3,
             "bpb_code": 1 + 20 * n ** -0.3} for i, n in enumerate([1e4, 2e4, 4e4, 8e4])]
    target = {"rung": "big", "N": 1.6e5, "D": 3.2e6, "C": 120 * 1.6e5 ** 2}
    prediction = make_prediction("x", rows, [target], n_bootstrap=50)
    assert prediction["law"]["kind"] == "power_law"
    entry = prediction["predictions"][0]
    assert entry["loss"]["value"] == pytest.approx(2 + 50 * 1.6e5 ** -0.3, rel=1e-3)
    assert entry["downstream"]["bpb_code"]["value"] == pytest.approx(1 + 20 * 1.6e5 ** -0.3, rel=1e-3)


def test_print_commands_and_slurm_scripts(tmp_path, capsys):
    path = tmp_path / "ladder.yaml"
    cfg = ladder_dict(tmp_path, schedule={"kind": "wsd", "warmup_steps": 3}, launch={"nproc_per_node": 4})
    cfg["base"]["data"]["out_dir"] = str(tmp_path / "no_data")
    path.write_text(yaml.safe_dump(cfg))
    assert run_ladder(path, print_commands=True, holdout=True) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("torchrun")]
    assert len(lines) == 9 and all("--nproc-per-node=4 -m lmforge scaling ladder" in line for line in lines)
    assert "--holdout-largest --predict" in out
    ladder_dir = tmp_path / "ladders" / "lad"
    script = (ladder_dir / "slurm_ladder.sh").read_text()
    assert "#SBATCH --array=0-1" in script and "d32L1_D20K d32L1_D40K d32L1_D80K" in script
    assert "--holdout-largest --predict" in (ladder_dir / "slurm_holdout.sh").read_text()
    assert len(list((ladder_dir / "configs").glob("*.yaml"))) == 9


def test_cli_dry_run_and_conflicting_modes(tmp_path, capsys):
    import argparse

    from lmforge.cli.scaling import add_ladder_parser, add_scaling_parser, run_scaling

    parser = argparse.ArgumentParser(prog="lmforge")
    verbs = parser.add_subparsers(dest="verb", required=True)
    add_scaling_parser(verbs)
    add_ladder_parser(verbs)  # the top-level `lmforge ladder` alias
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(ladder_dict(tmp_path)))
    assert run_scaling(parser.parse_args(["scaling", "ladder", str(path), "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "Ladder lad: 9 rungs" in out and "d96L3_D80K" in out
    assert run_scaling(parser.parse_args(["ladder", str(path), "--dry-run", "--set", "grid.tokens=[3e4]"])) == 0
    assert "Ladder lad: 3 rungs" in capsys.readouterr().out
    assert run_scaling(parser.parse_args(["ladder", str(path), "--dry-run", "--print-commands"])) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert run_scaling(parser.parse_args(["ladder", str(path), "--set", "sizes.head_dim=3"])) == 2
    assert "sizes: head_dim must be even" in capsys.readouterr().err
