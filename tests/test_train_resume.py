"""Kill-and-resume bit-exactness, checkpoint integrity and run-directory contents."""

from __future__ import annotations

import json
import signal

import pytest
from safetensors.torch import load_file

from conftest import run_cli, tiny_run_dict, train_losses, write_config


_losses = train_losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("resume")
    base = tiny_run_dict(tmp, tiny_corpus, optim={"name": "muon", "lr": 0.003, "warmup_steps": 2})
    uninterrupted = write_config(tmp / "a.yaml", {**base, "name": "a"})
    killed = write_config(tmp / "b.yaml", {**base, "name": "b"})
    result_a = run_cli("train", str(uninterrupted))
    assert result_a.returncode == 0, result_a.stderr
    crash = run_cli("train", str(killed), env={"LMFORGE_CRASH_AT_STEP": "10"})
    resumed = run_cli("train", str(killed), "--resume", "auto")
    return tmp / "runs", crash, resumed


def test_sigkill_then_resume_reproduces_every_loss(runs):
    runs_dir, crash, resumed = runs
    assert crash.returncode == -signal.SIGKILL
    assert resumed.returncode == 0, resumed.stderr
    a, b = _losses(runs_dir / "a"), _losses(runs_dir / "b")
    assert sorted(a) == list(range(1, 13))
    assert a == b  # exact float equality at every step, including steps 9-12 after the resume
    assert "resumed from" in resumed.stderr + resumed.stdout


def test_resumed_final_weights_equal_uninterrupted(runs):
    runs_dir = runs[0]
    wa = load_file(str(runs_dir / "a" / "checkpoints" / "step_0000012" / "model.safetensors"))
    wb = load_file(str(runs_dir / "b" / "checkpoints" / "step_0000012" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert (wa[key] == wb[key]).all(), key


def test_run_dir_records_what_the_run_was(runs):
    run = runs[0] / "a"
    for name in ("config.yaml", "code_version.json", "data_manifest.json", "model_card.json",
                 "metrics.jsonl", "eval/final.json", "report.html", "tokenizer.json"):
        assert (run / name).is_file(), name
    # keep_checkpoints=2: only the two newest remain
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000008", "step_0000012"]
    final = json.loads((run / "eval" / "final.json").read_text())
    assert set(final["bpb"]) == {"prose", "code"}
    assert final["isolation"]["overlap"] == 0
    card = json.loads((run / "model_card.json").read_text())
    assert card["params"]["active"] < card["params"]["total"]


def test_truncated_checkpoint_gets_clear_error_and_auto_resume_falls_back(runs, tmp_path):
    runs_dir = runs[0]
    import shutil

    run = tmp_path / "runs" / "b"
    shutil.copytree(runs_dir / "b", run)
    latest = run / "checkpoints" / "step_0000012" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    result = run_cli("eval", str(run / "checkpoints" / "step_0000012"))
    assert result.returncode == 2
    assert "truncated" in result.stderr and "model.safetensors" in result.stderr
    assert "Traceback" not in result.stderr
    # the run directory as a whole still evaluates, from the previous valid checkpoint
    result = run_cli("eval", str(run))
    assert result.returncode == 0, result.stderr
    assert "step_0000008" in result.stdout


def test_generate_and_report_commands(runs):
    run = runs[0] / "a"
    result = run_cli("generate", str(run), "--prompt", "the king", "--max-new-tokens", "5", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the king")
    (run / "report.html").unlink()
    result = run_cli("report", str(run))
    assert result.returncode == 0, result.stderr
    assert (run / "report.html").is_file()


def test_fresh_run_refuses_existing_run_dir(runs):
    config = runs[0].parent / "a.yaml"
    result = run_cli("train", str(config))
    assert result.returncode == 2
    assert "already holds a run" in result.stderr
