"""Fault tolerance: preemption, supervised restarts, corrupt/unsafe checkpoints, failed
saves and the stability guard. Runs are tiny dense models in subprocesses (real signals)."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import dense_reference_run, run_cli, train_losses
from lmforge.core.checkpoint_files import list_checkpoints, sha256_file, verify_checkpoint_dir
from lmforge.core.errors import CheckpointError
from lmforge.core.metrics_file import read_metrics
from lmforge.nn.config import ModelConfig
from lmforge.optim.config import OptimConfig
from lmforge.optim.optimizers import build_optimizer
from lmforge.train import checkpoint as checkpoint_module
from lmforge.train.guard import GuardConfig, StabilityGuard

STEPS = 12


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]


losses = train_losses


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("faults")
    config = dense_reference_run(tmp, tiny_corpus, STEPS, "reference")
    return tmp, config


def copy_run(tmp: Path, name: str) -> Path:
    target = tmp / "runs" / name
    shutil.copytree(tmp / "runs" / "reference", target)
    return target


# ---- preemption ------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_and_resume_loses_nothing(base):
    tmp, config = base
    env = {**os.environ, "LMFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    long = ["--set", "name=preempted", "--set", "train.steps=400", "--set", "train.checkpoint_every=0",
            "--no-report"]
    child = subprocess.Popen([sys.executable, "-m", "lmforge", "train", str(config), *long],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp / "runs" / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if metrics.exists() and len(train_records(metrics.parent)) >= 3:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "--resume auto" in stderr
    run = tmp / "runs" / "preempted"
    last_logged = max(losses(run))
    saved = list_checkpoints(run / "checkpoints")
    assert len(saved) == 1
    assert int(saved[0].name.split("_")[1]) == last_logged  # nothing after the signal was lost
    resumed = run_cli("train", str(config), "--set", "name=preempted", "--set", "train.checkpoint_every=0",
                      "--set", f"train.steps={last_logged + 4}", "--resume", "auto", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    assert max(losses(run)) == last_logged + 4


def test_max_restarts_resumes_after_a_crash(base):
    tmp, config = base
    result = run_cli("train", str(config), "--set", "name=supervised", "--no-report", "--max-restarts", "2",
                     env={"LMFORGE_CRASH_AT_STEP": "8"})
    assert result.returncode == 0, result.stderr
    assert "restart 1 of 2" in result.stdout + result.stderr
    assert losses(tmp / "runs" / "supervised") == losses(tmp / "runs" / "reference")


def test_supervisor_does_not_restart_user_errors(base):
    tmp, config = base
    result = run_cli("train", str(config), "--set", "name=bad", "--set", "train.nonsense=1", "--max-restarts", "3")
    assert result.returncode == 2
    assert "train.nonsense" in result.stderr
    assert "restart" not in result.stdout + result.stderr


# ---- corrupt and unsafe checkpoints ------------------------------------------------------

def test_corrupt_latest_checkpoint_falls_back_to_previous(base):
    tmp, config = base
    run = copy_run(tmp, "corrupt")
    weights = run / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, different content: only the checksum can tell
    weights.write_bytes(bytes(data))
    result = run_cli("train", str(config), "--set", "name=corrupt", "--resume", "auto", "--no-report")
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    assert "checksum mismatch" in log and "skipping checkpoint" in log
    assert "step_0000008" in log  # resumed from the previous one
    assert losses(run) == losses(tmp / "runs" / "reference")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PAYLOAD_MARKER', '/tmp/lmforge_payload_ran')}",))


def test_checkpoint_with_pickled_code_is_refused(base, tmp_path, monkeypatch):
    tmp, config = base
    run = copy_run(tmp, "pickled")
    checkpoint = run / "checkpoints" / "step_0000008"
    marker = tmp_path / "payload_ran"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    state_file = checkpoint / "trainer_state.pt"
    with open(state_file, "wb") as handle:
        pickle.dump({"step": 8, "evil": _Payload()}, handle)
    # Rewrite the manifest so the checksum passes: the refusal must come from safe loading.
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["trainer_state.pt"] = {"sha256": sha256_file(state_file), "bytes": state_file.stat().st_size}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    verify_checkpoint_dir(checkpoint)
    result = run_cli("train", str(config), "--set", "name=pickled", "--resume", str(checkpoint), "--no-report")
    assert result.returncode == 2
    assert "refused or unreadable" in result.stderr and "trainer_state.pt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


# ---- failed saves ------------------------------------------------------------------------

def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    # A real failure part-way through a save (the tokenizer to copy has vanished, after the
    # weights and optimizer were written); disk-full and file-size faults are in
    # test_checkpoint_faults.py.
    cfg = ModelConfig.from_dict({"d_model": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 64, "max_seq_len": 16})
    model = cfg.build()
    optimizer = build_optimizer(model, OptimConfig())
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    folder = tmp_path / "checkpoints"
    args = (model, optimizer, {"step": 1}, "name: x\n", tokenizer, 3)
    first = checkpoint_module.save_training_checkpoint(folder, 1, *args)
    tokenizer.unlink()
    with pytest.raises(CheckpointError, match="saving step 2 failed while writing tokenizer.json.*intact"):
        checkpoint_module.save_training_checkpoint(folder, 2, *args)
    assert [p.name for p in folder.iterdir()] == [first.name]  # no half-written directory
    verify_checkpoint_dir(first)
    fresh = cfg.build()
    checkpoint_module.load_training_checkpoint(first, fresh, build_optimizer(fresh, OptimConfig()))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


# ---- stability guard ---------------------------------------------------------------------

def test_guard_zscore_rules():
    guard = StabilityGuard(GuardConfig(spike_zscore=4.0, window=20, min_history=5))
    for value in [3.0, 3.1, 2.9, 3.05, 2.95]:
        assert guard.check(value, 1.0) is None
    assert guard.check(9.0, 1.0) == "spike"
    assert guard.check(3.0, float("inf")) == "nonfinite"
    assert guard.check(float("nan"), 1.0) == "nonfinite"
    assert guard.check(3.02, 1.0) is None
    assert guard.counts == {"skipped_nonfinite": 2, "skipped_spike": 1, "rollbacks": 0}
    assert len(guard.history) == 6  # skipped losses never enter the window
    early = StabilityGuard(GuardConfig(spike_zscore=4.0, min_history=50))
    assert early.check(3.0, 1.0) is None and early.check(100.0, 1.0) is None  # too little history


def test_guard_skips_nan_and_spike_steps_and_counts_them(base):
    tmp, config = base
    result = run_cli("train", str(config), "--set", "name=guarded", "--no-report",
                     "--set", "train.guard={spike_zscore: 5.0, window: 10, min_history: 4}",
                     env={"LMFORGE_NAN_AT_STEP": "5", "LMFORGE_SPIKE_AT_STEP": "9"})
    assert result.returncode == 0, result.stderr
    records = {r["step"]: r for r in train_records(tmp / "runs" / "guarded")}
    assert records[5]["skipped"] == "nonfinite" and records[9]["skipped"] == "spike"
    assert records[STEPS]["skipped_nonfinite"] == 1 and records[STEPS]["skipped_spike"] == 1
    assert not any("skipped" in records[s] for s in records if s not in (5, 9))
    assert all(math.isfinite(r["loss"]) for s, r in records.items() if s != 5)
    # A skipped step leaves the weights untouched: steps 1-4 and the loss at step 5's batch
    # match the reference; the final weights are finite.
    reference = losses(tmp / "runs" / "reference")
    assert all(records[s]["loss"] == reference[s] for s in range(1, 5))


def test_guard_rollback_returns_to_last_checkpoint_and_skips_the_batches(base):
    tmp, config = base
    result = run_cli("train", str(config), "--set", "name=rollback", "--no-report",
                     "--set", "train.guard={rollback: true}", env={"LMFORGE_NAN_AT_STEP": "6"})
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    assert "rolling back to" in log and "step_0000004" in log
    records = train_records(tmp / "runs" / "rollback")
    steps = [r["step"] for r in records]
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and steps[6] == 5  # back to step 4, then onwards
    assert steps[-1] == STEPS and records[-1]["rollbacks"] == 1
    # After the rollback the loader kept its position: step 5 now sees a later batch.
    reference = losses(tmp / "runs" / "reference")
    assert records[6]["loss"] != reference[5]


@pytest.mark.slow
def test_chaos_script_random_sigkills_end_bit_identical(base, tmp_path):
    tmp, config = base
    script = Path(__file__).resolve().parents[1] / "bench" / "chaos.py"
    result = subprocess.run(
        [sys.executable, str(script), "--config", str(config), "--kills", "3", "--seed", "1",
         "--set", "train.steps=20", "--set", "train.checkpoint_every=2", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "LMFORGE_PROGRESS": "0"}, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "final weights bit-identical: True; every logged loss identical: True" in result.stdout
