"""bench/speedrun.py on a tiny corpus: equal-token and equal-time budgets, the Hugging Face row,
and the proposed quickstart recipe parsing with the speed options it adopts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_bench, tiny_run_dict, write_config
from lmforge.core.config import read_yaml
from lmforge.train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _speedrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "speedrun.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_speedrun_equal_tokens_and_equal_time(tmp_path, tiny_corpus):
    run = tiny_run_dict(tmp_path, tiny_corpus, optim={"lr": 0.003, "warmup_steps": 1})
    config = write_config(tmp_path / "tiny.yaml", run)
    out = tmp_path / "tokens"
    result = _speedrun(f"a={config}", f"b={config}+optim.name=muon+model.fused_cross_entropy=true",
                       "--tokens", "1024", "--evals", "2", "--eval-tokens", "128", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "result.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["a", "b", "hf_mixtral"]
    for row in rows:
        assert row["steps"] == 1024 // 128  # batch 4 x seq 32
        assert set(row["bpb"]) == {"prose", "code"} and all(0 < v < 20 for v in row["bpb"].values())
        assert len(row["evals"]) == 2
    assert rows[0]["bpb_vs_baseline"] == {"prose": 0.0, "code": 0.0}

    out = tmp_path / "seconds"
    result = _speedrun(str(config), f"{config}+train.batch_size=2", "--seconds", "2", "--calibration-rounds", "2",
                       "--no-hf", "--evals", "1", "--target-bpb", "50", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "result.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["steps"] >= 1 for r in rows)
    for row in rows:  # the budget: steps x tokens per step at the planned rate
        assert row["budget_seconds"] == pytest.approx(row["tokens"] / row["planned_tokens_per_s"], rel=0.01)
        assert all(v is not None for v in row["seconds_to_target"].values())  # 50 bpb: reached at once


def test_speedrun_refuses_two_configs_with_one_label(tmp_path, tiny_corpus):
    config = write_config(tmp_path / "tiny.yaml", tiny_run_dict(tmp_path, tiny_corpus))
    result = _speedrun(f"x={config}", f"x={config}+optim.lr=0.001", "--tokens", "128", "--out", str(tmp_path))
    assert result.returncode != 0 and "labels must differ" in result.stderr


def test_quickstart_uses_the_kept_options_of_the_ledger():
    fast = RunConfig.from_dict(read_yaml(ROOT / "configs" / "quickstart.yaml"))
    base = RunConfig.from_dict(read_yaml(ROOT / "configs" / "quickstart_moe.yaml"))
    assert fast.model.fused_cross_entropy and fast.optim.name == "muon" and fast.train.precision == "fast"
    assert fast.model.moe is None and base.model.moe is not None
    # the evening rows of the ledger: learning rates, untied embeddings, the explicit bf16 attention (auto)
    assert (fast.optim.lr, fast.optim.muon_lr, fast.model.tie_embeddings) == (0.015, 0.01, False)
    assert fast.model.attention.kernel == "auto"
    assert fast.data == base.data  # the same corpus and held-out split: bpb comparable
    assert (fast.model.d_model, fast.train.seq_len) == (base.model.d_model, base.train.seq_len)
    # the shape rows (races 1-3): a smaller model on bigger batches, the same tokens per second of work
    assert (fast.model.n_layers, fast.model.d_ff, fast.train.batch_size) == (3, 512, 32)


def test_an_equal_time_row_whose_calibration_missed_is_flagged(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the bench extends sys.path when imported: undone after
    bench = load_bench("speedrun")
    assert bench.unequal_budget(1.30, 1.25) is None                # 4% off: within the tolerance
    slow = bench.unequal_budget(1.30, 1.00)                       # ran slower than planned: more time
    fast = bench.unequal_budget(1.00, 1.20)                       # ran faster than planned: less time
    assert "23% more time" in slow and "1.30x" in slow and "1.00x" in slow
    assert "20% less time" in fast
    assert bench.unequal_budget(1.0, 1.05, tolerance=0.01) is not None
