"""Continued runs: --init-from (weights, optimizer, trainer state), lineage, replay, forgetting records."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest

from conftest import run_cli, tiny_run_dict, train_losses, write_config
from lmforge.core.errors import CheckpointError, ConfigError
from lmforge.core.metrics_file import read_metrics
from lmforge.train.assembly import train_run
from lmforge.train.config import RunConfig

DENSE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32, "moe": None}


def _cfg(tmp: Path, corpus: Path, name: str, **sections) -> dict:
    train = {"steps": 8, "batch_size": 4, "seq_len": 32, "log_every": 1, "eval_every": 0,
             "checkpoint_every": 4, "keep_checkpoints": 5, "tensorboard": False, **sections.pop("train", {})}
    return tiny_run_dict(tmp, corpus, name=name, train=train, **{"model": DENSE, **sections})


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_corpus) -> tuple[Path, Path]:
    """(folder holding data/ and runs/, the parent run directory): 8 steps on both domains."""
    tmp = tmp_path_factory.mktemp("continual")
    run_dir = train_run(RunConfig.from_dict(_cfg(tmp, tiny_corpus, "parent")))
    return tmp, run_dir


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval" / "final.json").read_text())


def test_zero_learning_rate_steps_keep_the_parents_bits_per_byte_exactly(parent, tiny_corpus):
    tmp, parent_dir = parent
    child = train_run(RunConfig.from_dict(_cfg(tmp, tiny_corpus, "zero_lr", init={"path": str(parent_dir)},
                                               optim={"lr": 0.0, "warmup_steps": 0}, train={"steps": 2})))
    assert _final(child)["bpb"] == _final(parent_dir)["bpb"]
    evals = [r for r in read_metrics(child / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["bpb"] == _final(parent_dir)["bpb"]  # evaluated before step 1
    assert all(change == 0.0 for change in evals[-1]["change_from_parent"].values())

    lineage = json.loads((child / "lineage.json").read_text())
    checkpoint = parent_dir / "checkpoints" / "step_0000008"
    assert lineage["checkpoint"] == str(checkpoint.absolute())
    assert lineage["checkpoint_manifest_sha256"] == hashlib.sha256((checkpoint / "manifest.json").read_bytes()).hexdigest()
    assert lineage["parent_step"] == 8 and lineage["took"] == ["weights"]
    assert lineage["parent_data_fingerprint"] == json.loads((parent_dir / "data_manifest.json").read_text())["fingerprint"]


def test_a_changed_architecture_is_refused_naming_the_field_before_the_run_directory_exists(parent, tiny_corpus):
    tmp, parent_dir = parent
    cfg = _cfg(tmp, tiny_corpus, "wider", init={"path": str(parent_dir)}, model={**DENSE, "d_model": 64})
    with pytest.raises(ConfigError, match=r"model\.d_model: parent 32, this run 64"):
        train_run(RunConfig.from_dict(cfg))
    assert not (tmp / "runs" / "wider").exists()


def test_a_corrupt_or_missing_parent_is_one_error_before_the_run_directory_exists(parent, tiny_corpus, tmp_path):
    tmp, parent_dir = parent
    with pytest.raises(CheckpointError, match="no such run or checkpoint"):
        train_run(RunConfig.from_dict(_cfg(tmp, tiny_corpus, "orphan", init={"path": str(tmp_path / "nope")})))
    broken = tmp_path / "step_0000008"
    import shutil

    shutil.copytree(parent_dir / "checkpoints" / "step_0000008", broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="init.path .*model.safetensors"):
        train_run(RunConfig.from_dict(_cfg(tmp, tiny_corpus, "orphan", init={"path": str(broken)})))
    assert not (tmp / "runs" / "orphan").exists()


def test_a_wsd_cooldown_branched_from_a_stable_checkpoint_equals_the_uninterrupted_cooldown(parent, tiny_corpus):
    tmp, _ = parent
    wsd = {"lr": 0.003, "warmup_steps": 2, "schedule": "wsd"}
    # A long run: stable until step 16 (decay over the last 20% of 20 steps).
    long_run = train_run(RunConfig.from_dict(_cfg(tmp, tiny_corpus, "stable", optim={**wsd, "decay_fraction": 0.2},
                                                  train={"steps": 20})))
    # Uninterrupted: stable for 8 steps, then a 4-step cooldown (a third of 12 steps).
    short = {**wsd, "decay_fraction": 1 / 3}
    uninterrupted = train_run(RunConfig.from_dict(_cfg(tmp, tiny_corpus, "decay_at_8", optim=short,
                                                       train={"steps": 12})))
    branch = train_run(RunConfig.from_dict(_cfg(
        tmp, tiny_corpus, "branch_at_8", optim=short, train={"steps": 12},
        init={"path": str(long_run / "checkpoints" / "step_0000008"), "trainer_state": True})))
    expected = {step: loss for step, loss in train_losses(uninterrupted).items() if step > 8}
    assert train_losses(branch) == expected
    lrs = [r["lr"] for r in read_metrics(branch / "metrics.jsonl") if r["kind"] == "train"]
    # the cooldown from its first step (a quarter of the way to min_lr_ratio 0.1) to its end
    assert lrs[0] == pytest.approx(0.003 * 0.775) and lrs[-1] == pytest.approx(0.0003)
    assert json.loads((branch / "lineage.json").read_text())["took"] == ["weights", "optimizer", "trainer_state"]


def test_replay_share_in_the_logs_matches_the_config(parent, tiny_corpus):
    tmp, parent_dir = parent
    cfg = _cfg(tmp, tiny_corpus, "replay", init={"path": str(parent_dir)}, replay={"share": 0.25},
               train={"steps": 10})
    cfg["data"]["sources"] = [{**s, "weight": 1.0 if s["name"] == "code" else 0.0} for s in cfg["data"]["sources"]]
    run_dir = train_run(RunConfig.from_dict(cfg))
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][-1]
    drawn = last["tokens_drawn"]
    total = sum(drawn.values())
    replayed = sum(v for k, v in drawn.items() if k.startswith("replay/"))
    assert abs(replayed / total - 0.25) <= 0.01
    assert drawn.get("prose", 0) == 0 and drawn["code"] > 0  # the new data is code only
    assert {k for k in drawn if k.startswith("replay/")} == {"replay/prose", "replay/code"}  # the parent's mixture


def test_a_continued_run_killed_and_resumed_logs_the_losses_of_an_uninterrupted_one(parent, tiny_corpus):
    tmp, parent_dir = parent
    for name in ("cont_whole", "cont_killed"):
        cfg = _cfg(tmp, tiny_corpus, name, init={"path": str(parent_dir), "optimizer": True},
                   replay={"share": 0.25}, train={"steps": 10})
        write_config(tmp / f"{name}.yaml", cfg)
    assert run_cli("train", str(tmp / "cont_whole.yaml"), "--no-report").returncode == 0
    crash = run_cli("train", str(tmp / "cont_killed.yaml"), "--no-report", env={"LMFORGE_CRASH_AT_STEP": "6"})
    assert crash.returncode == -signal.SIGKILL
    resumed = run_cli("train", str(tmp / "cont_killed.yaml"), "--no-report", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    runs = tmp / "runs"
    assert train_losses(runs / "cont_killed") == train_losses(runs / "cont_whole")
    assert _final(runs / "cont_killed")["bpb"] == _final(runs / "cont_whole")["bpb"]


def test_new_data_in_its_own_directory_takes_the_parents_tokenizer_and_is_evaluated_beside_the_old(parent, tiny_corpus):
    tmp, parent_dir = parent
    cfg = _cfg(tmp, tiny_corpus, "new_data", init={"path": str(parent_dir)}, replay={"share": 0.5},
               train={"steps": 4})
    cfg["data"] = {**cfg["data"], "out_dir": str(tmp / "data_code"), "tokenizer_from": str(tmp / "data"),
                   "sources": [{"name": "code", "kind": "files", "path": str(tiny_corpus / "code")}]}
    run_dir = train_run(RunConfig.from_dict(cfg))
    final = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert set(final["bpb"]) == {"code", "parent/prose", "parent/code"}
    assert set(final["change_from_parent"]) == set(final["bpb"])
    drawn = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][-1]["tokens_drawn"]
    assert set(drawn) == {"code", "replay/prose", "replay/code"}
    assert json.loads((run_dir / "lineage.json").read_text())["heldout_documents_seen_by_parent"] == 0


def test_a_parent_with_another_tokenizer_is_refused_naming_the_fix(parent, tiny_corpus):
    tmp, parent_dir = parent
    cfg = _cfg(tmp, tiny_corpus, "other_tokenizer", init={"path": str(parent_dir)})
    cfg["data"] = {**cfg["data"], "out_dir": str(tmp / "data_other"), "vocab_size": 300,
                   "sources": [{"name": "code", "kind": "files", "path": str(tiny_corpus / "code")}]}
    with pytest.raises(ConfigError, match="another tokenizer.*data.tokenizer_from"):
        train_run(RunConfig.from_dict(cfg))
    assert not (tmp / "runs" / "other_tokenizer").exists()


def test_the_report_of_a_continued_run_shows_its_lineage_and_its_change_from_the_parent(parent, tiny_corpus):
    from lmforge.report import write_report

    tmp, parent_dir = parent
    child = train_run(RunConfig.from_dict(_cfg(tmp, tiny_corpus, "reported", init={"path": str(parent_dir)},
                                               train={"steps": 4, "eval_every": 2})))
    html = write_report(child).read_text()
    assert "<h2>Lineage</h2>" in html and str(parent_dir / "checkpoints" / "step_0000008") in html
    assert 'alt="change from the parent"' in html
