"""Ladders with real training on the tiny synthetic corpus: a WSD branch resumed from its
parent's checkpoint is the same run as training that length from scratch, and a whole
micro ladder runs end to end (worker processes, gather, held-out prediction)."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before scipy loads; see lmforge.scaling.fit

import json  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from conftest import tiny_run_dict  # noqa: E402
from lmforge.core.errors import LmforgeError  # noqa: E402
from lmforge.core.metrics_file import read_metrics  # noqa: E402
from lmforge.scaling.ladder import run_ladder  # noqa: E402
from lmforge.scaling.ladder.config import LadderConfig  # noqa: E402
from lmforge.scaling.ladder.gather import read_rows  # noqa: E402
from lmforge.scaling.ladder.plan import build_plan  # noqa: E402
from lmforge.scaling.ladder.runner import resume_argument  # noqa: E402
from lmforge.train.config import RunConfig  # noqa: E402

TOKENS_PER_STEP = 4 * 32  # tiny_run_dict: batch 4, seq_len 32


def micro_ladder(tmp_path, corpus, **changes) -> dict:
    base = tiny_run_dict(tmp_path, corpus, train={"eval_every": 0, "checkpoint_every": 0},
                         eval={"max_tokens_per_domain": 256, "sample_tokens": 8, "sample_prompts": ["the "],
                               "task_items": 4})
    base["model"].pop("moe")
    cfg = {
        "name": "micro", "out_dir": str(tmp_path / "ladders"), "base": base,
        "sizes": {"shapes": [[16, 1], [32, 1], [32, 2]], "head_dim": 8, "ffn_multiple": 16},
        "grid": {"tokens": [12 * TOKENS_PER_STEP, 20 * TOKENS_PER_STEP]},
        "schedule": {"kind": "wsd", "warmup_steps": 2, "decay_fraction": 0.25},
        "lr": {"base": 0.01, "base_d_model": 32, "width_exponent": 1.0},
        "batch": {"sequences": 4},
        "fit": {"bootstrap": 20},
        "evals_per_run": 2,
    }
    cfg.update(changes)
    return cfg


def _train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"}


def test_wsd_branch_equals_the_run_trained_from_scratch(tmp_path, tiny_corpus, capsys):
    from lmforge.train.assembly import train_run

    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(micro_ladder(tmp_path, tiny_corpus, sizes={"shapes": [[32, 1]], "head_dim": 8})))
    assert run_ladder(path, dry_run=True) == 0  # writes the rung configs
    cfg = LadderConfig.from_dict(yaml.safe_load(path.read_text()))
    plan = build_plan(cfg, cfg.base)
    parent, branch = plan.rungs
    assert branch.parent == parent.name and branch.branch_step == parent.decay_start == 9
    # `--rung` (what the printed torchrun commands run) refuses a branch before its parent's checkpoint ...
    with pytest.raises(LmforgeError, match="does not exist yet"):
        run_ladder(path, rung=branch.name)
    assert run_ladder(path, rung=parent.name) == 0
    assert resume_argument(plan, branch).endswith("step_0000009")
    assert run_ladder(path, rung=branch.name) == 0  # ... then resumes it
    assert run_ladder(path, rung=branch.name) == 0 and "nothing to do" in capsys.readouterr().out
    scratch = {**plan.run_configs[branch.name], "name": "scratch"}
    train_run(RunConfig.from_dict(scratch))

    branched, direct = _train_losses(plan.runs_dir / branch.name), _train_losses(plan.runs_dir / "scratch")
    assert sorted(branched) == list(range(10, 21)) and sorted(direct) == list(range(1, 21))
    assert all(branched[s] == direct[s] for s in branched)  # bit for bit after the branch point
    final_b = json.loads((plan.runs_dir / branch.name / "eval" / "final.json").read_text())
    final_d = json.loads((plan.runs_dir / "scratch" / "eval" / "final.json").read_text())
    assert final_b["loss"] == final_d["loss"] and final_b["tokens"] == final_d["tokens"] == 20 * TOKENS_PER_STEP


@pytest.mark.slow
def test_micro_ladder_end_to_end(tmp_path, tiny_corpus, capsys):
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(micro_ladder(tmp_path, tiny_corpus)))
    assert run_ladder(path, workers=2, holdout=True, poll_seconds=0.2) == 0
    ladder_dir = tmp_path / "ladders" / "micro"
    rows = read_rows(ladder_dir / "ladder.csv")
    assert len(rows) == 6 and {r["D"] for r in rows} == {12 * TOKENS_PER_STEP, 20 * TOKENS_PER_STEP}
    assert all(r["C"] == 6 * r["n_active"] * r["D"] for r in rows)
    tasks = [k for k in rows[0] if k.startswith("acc_norm_")]  # the runs scored the held-out tasks
    assert tasks and all(0 <= r[k] <= 1 for r in rows for k in tasks)
    prediction = json.loads((ladder_dir / "prediction.json").read_text())
    assert prediction["law"]["kind"] == "power_law"  # 4 fitted rungs: too few for Approach 3
    assert prediction["order_check"]["prediction_written_before_training"] is True
    assert set(prediction["fitted_rungs"]) == {r["rung"] for r in rows if not r["holdout"]}
    assert all("relative_error" in p for p in prediction["predictions"])
    assert set(tasks) <= set(prediction["predictions"][0]["downstream"])  # two-step: loss -> task accuracy
    curves = read_rows(ladder_dir / "curves.csv")
    assert {c["rung"] for c in curves} == {r["rung"] for r in rows}
    assert any(c["kind"] == "eval" for c in curves)
    # A rerun finds every rung finished and trains nothing.
    events = len(read_metrics(ladder_dir / "ladder_events.jsonl"))
    assert run_ladder(path, workers=2, holdout=True, poll_seconds=0.2) == 0
    assert len(read_metrics(ladder_dir / "ladder_events.jsonl")) == events
    assert "predicted loss is off by" in capsys.readouterr().out
