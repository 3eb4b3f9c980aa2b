"""Mixture sweep: one short run per mixture, a table of held-out bpb per domain, a plot."""

from __future__ import annotations

import pytest

from conftest import run_cli, tiny_run_dict, write_config
from lmforge.core.errors import ConfigError
from lmforge.scaling.mixtures import mixture_configs, parse_mixture, read_sweep


def test_parse_and_apply_mixtures():
    assert parse_mixture("prose=3, code=1") == {"prose": 3.0, "code": 1.0}
    for bad in ("prose", "prose=x", "prose=-1", "prose=0,code=0", ""):
        with pytest.raises(ConfigError, match="--mixture"):
            parse_mixture(bad)
    base = {"name": "b", "data": {"sources": [{"name": "prose"}, {"name": "code"}]}}
    configs = mixture_configs(base, [{"prose": 1.0}, {"prose": 1.0, "code": 2.0}])
    assert [c["name"] for c in configs] == ["b_mix0", "b_mix1"]
    assert [s["weight"] for s in configs[0]["data"]["sources"]] == [1.0, 0.0]
    assert [s["weight"] for s in configs[1]["data"]["sources"]] == [1.0, 2.0]
    assert "weight" not in base["data"]["sources"][0]  # the base is not modified
    with pytest.raises(ConfigError, match="unknown sources"):
        mixture_configs(base, [{"poetry": 1.0}])


def test_sweep_command_trains_each_mixture_and_tabulates(tmp_path, tiny_corpus):
    cfg = tiny_run_dict(tmp_path, tiny_corpus, train={"steps": 4, "batch_size": 4, "seq_len": 32, "log_every": 1,
                                                      "eval_every": 0, "checkpoint_every": 0, "tensorboard": False},
                        eval={"max_tokens_per_domain": 256, "sample_tokens": 2, "sample_prompts": ["the "],
                              "task_items": 0})
    config = write_config(tmp_path / "run.yaml", cfg)
    out = tmp_path / "sweep"
    args = ["mixture-sweep", str(config), "--mixture", "prose=1,code=1", "--mixture", "prose=1,code=0",
            "--out", str(out)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    rows = read_sweep(out / "sweep.csv")
    assert [r["mixture"] for r in rows] == ["prose=1,code=1", "prose=1,code=0"]
    for row in rows:
        assert float(row["bpb_prose"]) > 0 and float(row["bpb_code"]) > 0
    assert float(rows[1]["epochs_prose"]) > float(rows[0]["epochs_prose"])  # all tokens from prose
    assert "epochs_code" not in rows[1] or rows[1]["epochs_code"] == ""
    assert (out / "sweep.png").stat().st_size > 1000
    again = run_cli(*args)  # finished runs are reused, not retrained
    assert again.returncode == 0 and "resumed" not in again.stdout + again.stderr
