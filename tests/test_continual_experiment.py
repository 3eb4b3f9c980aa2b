"""`lmforge continual`: parent, continuations with replay, union baseline → table and plot."""

from __future__ import annotations

import csv

import pytest

from conftest import run_cli, tiny_run_dict, write_config
from lmforge.continual.experiment import ContinualConfig, plan_runs
from lmforge.core.errors import ConfigError


def _config(tmp_path, corpus) -> dict:
    cfg = tiny_run_dict(tmp_path, corpus, name="cl",
                        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32, "moe": None},
                        train={"batch_size": 4, "seq_len": 32, "log_every": 1, "eval_every": 3,
                               "checkpoint_every": 0, "keep_checkpoints": 1, "tensorboard": False},
                        eval={"max_tokens_per_domain": 256, "sample_tokens": 4, "sample_prompts": ["the "], "task_items": 0})
    cfg["continual"] = {"domains": ["prose", "code"], "directions": "forward", "parent_steps": 6,
                        "continue_steps": 6, "replay_shares": [0.0, 0.25],
                        "continue_optim": {"warmup_steps": 1}}
    return cfg


def test_the_plan_has_a_parent_its_continuations_and_a_union_baseline(tmp_path, tiny_corpus):
    cfg = _config(tmp_path, tiny_corpus)
    plans = plan_runs(cfg, ContinualConfig.from_dict({**cfg["continual"], "directions": "both"}))
    assert [p.name for p in plans] == ["cl_prose", "cl_prose_to_code_replay0", "cl_prose_to_code_replay25",
                                       "cl_code", "cl_code_to_prose_replay0", "cl_code_to_prose_replay25", "cl_union"]
    continued = plans[2].config
    assert continued["init"]["path"].endswith("cl_prose") and continued["replay"] == {"share": 0.25}
    assert {s["name"]: s["weight"] for s in continued["data"]["sources"]} == {"prose": 0.0, "code": 1.0}
    assert plans[-1].config["train"]["steps"] == 12  # union: the same total steps from scratch
    with pytest.raises(ConfigError, match="continual.domains"):
        plan_runs(cfg, ContinualConfig.from_dict({**cfg["continual"], "domains": ["prose", "poetry"]}))


def test_the_experiment_writes_forgetting_and_adaptation_per_replay_share(tmp_path, tiny_corpus):
    config = write_config(tmp_path / "continual.yaml", _config(tmp_path, tiny_corpus))
    result = run_cli("continual", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "cl_continual"
    rows = list(csv.DictReader(open(out / "continual.csv")))
    assert [(r["direction"], float(r["replay"])) for r in rows] == [("prose -> code", 0.0), ("prose -> code", 0.25)]
    for row in rows:
        # the start of every continuation is its parent's end, on the same held-out windows
        assert float(row["forgetting"]) == pytest.approx(float(row["old_bpb"]) - float(row["old_bpb_parent"]))
        assert float(row["adaptation"]) < 0  # training on code lowers code bits-per-byte
    assert rows[0]["old_bpb_parent"] == rows[1]["old_bpb_parent"]
    assert (out / "continual.png").stat().st_size > 0 and "| prose -> code | 25% |" in (out / "continual.md").read_text()
    # rerun: every run finished, nothing is trained again
    again = run_cli("continual", str(config), cwd=tmp_path)
    assert again.returncode == 0 and again.stderr.count("reused") == 4
