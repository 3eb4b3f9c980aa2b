"""Multi-process training on CPU (gloo, 2 processes under torchrun) against one process.

Same global batch, so the loss trajectories must agree within float tolerance (the
reduction order of gradients differs); checkpoints saved at one world size resume at the
other. Dense models for the tight comparison: an MoE's load-balancing loss is computed on
each rank's tokens, so its trajectory matches only loosely (checked separately).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import dense_reference_run, run_cli, train_losses

STEPS = 8
# Gradients summed in a different order differ in the last bits; Adam's first updates are
# ~lr·sign(g), so a component whose gradient is near zero can flip. Losses then agree to
# about 1e-5 relative, not bit for bit.
RTOL = 2e-4


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "LMFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "lmforge", *args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600)


losses = train_losses


def assert_close(a: dict[int, float], b: dict[int, float], rtol: float) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= rtol * abs(a[step]), (step, a[step], b[step])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("dist")
    config = dense_reference_run(tmp, tiny_corpus, STEPS, "single")
    return tmp, config


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, mode):
    tmp, config = setup
    result = torchrun("train", str(config), "--set", f"name=two_{mode}", "--set", f"train.data_parallel={mode}",
                      "--no-report")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(losses(tmp / "runs" / "single"), losses(tmp / "runs" / f"two_{mode}"), rtol=RTOL)
    final = load_file(str(tmp / "runs" / f"two_{mode}" / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    reference = load_file(str(tmp / "runs" / "single" / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    assert final.keys() == reference.keys()
    for key in final:
        assert (final[key] - reference[key]).abs().max() < 1e-2, key


def test_saved_with_two_ranks_resumes_with_one(setup):
    tmp, config = setup
    crashed = torchrun("train", str(config), "--set", "name=two_to_one", "--set", "train.data_parallel=fsdp",
                       "--no-report", env={"LMFORGE_CRASH_AT_STEP": "4"})
    assert crashed.returncode != 0
    run = tmp / "runs" / "two_to_one"
    assert (run / "checkpoints" / "step_0000004").is_dir()
    resumed = run_cli("train", str(config), "--set", "name=two_to_one", "--resume", "auto", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert_close(losses(tmp / "runs" / "single"), losses(run), rtol=RTOL)


def test_saved_with_one_rank_resumes_with_two(setup):
    tmp, config = setup
    crashed = run_cli("train", str(config), "--set", "name=one_to_two", "--no-report",
                      env={"LMFORGE_CRASH_AT_STEP": "4"})
    assert crashed.returncode != 0
    resumed = torchrun("train", str(config), "--set", "name=one_to_two", "--resume", "auto", "--no-report")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(losses(tmp / "runs" / "single"), losses(tmp / "runs" / "one_to_two"), rtol=RTOL)


def test_moe_two_processes_track_one(setup):
    tmp, config = setup
    moe = ["--set", "model.moe={n_experts: 4, top_k: 2}"]
    one = run_cli("train", str(config), "--set", "name=moe_one", *moe, "--no-report")
    assert one.returncode == 0, one.stderr
    two = torchrun("train", str(config), "--set", "name=moe_two", *moe, "--no-report")
    assert two.returncode == 0, two.stderr[-3000:]
    # Per-rank load-balancing statistics make the gradients differ slightly.
    assert_close(losses(tmp / "runs" / "moe_one"), losses(tmp / "runs" / "moe_two"), rtol=2e-3)


def test_global_batch_must_split_evenly(setup):
    tmp, config = setup
    result = torchrun("train", str(config), "--set", "name=odd", "--set", "train.batch_size=3", "--no-report")
    assert result.returncode != 0
    assert "train.batch_size (3) is the global batch" in result.stderr


def test_a_continued_run_with_replay_on_two_fsdp_processes_matches_one(setup):
    """--init-from (weights and optimizer) and replay under FSDP2: rank 0 reads the parent and every
    rank takes its shard; the replay rows of each global batch are split over ranks like the rest."""
    tmp, config = setup
    cont = ["--init-from", str(tmp / "runs" / "single"), "--init-optimizer", "--set", "replay.share=0.25",
            "--set", "replay.sources={prose: 1}", "--no-report"]
    one = run_cli("train", str(config), "--set", "name=cont_one", *cont)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("train", str(config), "--set", "name=cont_two", "--set", "train.data_parallel=fsdp", *cont)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_close(losses(tmp / "runs" / "cont_one"), losses(tmp / "runs" / "cont_two"), rtol=RTOL)


def test_a_time_budget_run_on_two_processes_ends_at_the_decided_length(setup):
    """The decision is broadcast from rank 0 at the same step on every rank, and the run ends there
    on both without a collective left waiting (a budget far too small for any machine, so the
    length is the shortest the schedule allows: 8 of 12 steps). The ranks' step times are alike
    here, so this checks the distributed path, not that rank 0's timing overrides another's."""
    tmp, config = setup
    result = torchrun("train", str(config), "--set", "name=budget_two", "--set", "optim.schedule=wsd",
                      "--set", "optim.decay_fraction=0.5", "--set", "train.steps=12", "--set", "train.time_budget_s=1e-6",
                      "--set", "train.time_budget_calibration_steps=4", "--no-report")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(tmp / "runs" / "budget_two")) == list(range(1, 9))
    assert (tmp / "runs" / "budget_two" / "checkpoints" / "step_0000008").is_dir()
