"""Context parallelism on CPU (gloo): each sequence split over 2 ranks equals one process.

The forward/backward check runs this file as a script under torchrun (``__main__`` below): both
ranks build the same model, compute the one-process reference themselves, then the context-
parallel forward/backward (plain, and through DDP), and rank 0 writes the worst relative
differences of logits, loss and gradients for full attention, a document-masked model (with
unevenly ignored targets, so the token-count weighting of the loss matters) and a model of
sliding-window and global layers. The training check compares 20 steps of ``lmforge train
--set train.context_parallel=2`` with one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.nn.config import AttentionConfig, ModelConfig
from lmforge.parallel.context import (ContextParallel, build_context_parallel, check_process_layout,
                                      zigzag_index)
from lmforge.train.config import RunConfig, TrainConfig

SEQ_LEN, BATCH, VOCAB = 32, 2, 64
CASES = {
    "full": {},
    "documents": {"document_mask": True, "restart_positions": True},
    "window": {"sliding_window": 5, "global_every": 2, "rope_theta_local": 1000.0},
}
# Logits and gradients: the keys are summed in another order (gathered, masked SDPA instead of the
# causal kernel), so they agree to rounding, far below 1e-5 relative in fp32.
FORWARD_RTOL = 1e-5
# Training: as tests/test_distributed.py, Adam's first updates are ~lr·sign(g), so a component
# whose gradient is near zero may flip under rounding; 20 steps then agree to ~1e-5, not bit for bit.
TRAIN_STEPS, TRAIN_RTOL = 20, 2e-4


def torchrun(*args: str, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "LMFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600)


# ---- without processes ---------------------------------------------------------------------


def test_zigzag_covers_every_token_once_and_balances_causal_work():
    for size in (1, 2, 3, 4):
        parts = [zigzag_index(48, size, rank) for rank in range(size)]
        assert sorted(torch.cat(parts).tolist()) == list(range(48))
        # causal work of a query at index i: i + 1 keys; every rank gets the same total
        work = {int((part + 1).sum()) for part in parts}
        assert len(work) == 1, (size, work)
    assert zigzag_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_index(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="2 x 2 equal chunks"):
        zigzag_index(10, 2, 0)


def run_config(**train) -> dict:
    return {"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
            "train": {"seq_len": 32, "batch_size": 4, **train}}


def test_config_validation():
    assert RunConfig.from_dict(run_config(context_parallel=2)).train.context_parallel == 2
    assert RunConfig.from_dict(run_config(seq_len=30)).train.context_parallel == 1  # no constraint without CP
    with pytest.raises(ConfigError, match=r"train.context_parallel: splits each sequence into 2 x 4 equal chunks.*"
                                          r"seq_len 36 is not divisible by 8"):
        RunConfig.from_dict(run_config(context_parallel=4, seq_len=36))
    with pytest.raises(ConfigError, match="train.context_parallel: must be >= 1"):
        RunConfig.from_dict(run_config(context_parallel=0))
    with pytest.raises(ConfigError, match="train.context_parallel_impl"):
        RunConfig.from_dict(run_config(context_parallel=2, context_parallel_impl="ring"))
    retro = run_config(context_parallel=2)
    retro["model"] = {"family": "retro", "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64}
    with pytest.raises(ConfigError, match="train.context_parallel: the 'retro' family runs whole sequences"):
        RunConfig.from_dict(retro)


def test_process_layout_checks():
    train = TrainConfig(context_parallel=2, batch_size=4, seq_len=32)
    assert check_process_layout(train, 2) == 1
    assert check_process_layout(train, 4) == 2
    with pytest.raises(ConfigError, match=r"train.context_parallel \(2\) must divide the number of processes \(3\)"):
        check_process_layout(train, 3)
    with pytest.raises(ConfigError, match=r"train.batch_size \(4\) is the global batch and must be divisible by "
                                          r"the number of data-parallel groups \(16 processes"):
        check_process_layout(train, 16)
    with pytest.raises(ConfigError, match=r"train.batch_size \(4\) .* the number of processes \(3\)"):
        check_process_layout(TrainConfig(batch_size=4), 3)
    with pytest.raises(ConfigError, match=r"needs 2 processes per data-parallel group; this run has 1"):
        build_context_parallel(train, ModelConfig(), torch.device("cpu"))


def test_torch_implementation_is_refused_where_it_cannot_run(monkeypatch):
    from lmforge.parallel import context

    monkeypatch.setattr(context.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(context.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(context.dist, "get_rank", lambda group=None: 0)
    train = TrainConfig(context_parallel=2, context_parallel_impl="torch", batch_size=4, seq_len=32)
    model = ModelConfig(n_heads=4, n_kv_heads=2, attention=AttentionConfig(document_mask=True))
    with pytest.raises(ConfigError, match=r"context_parallel_impl: torch: it runs on CUDA only .*document_mask"
                                          r".*as many key/value heads"):
        build_context_parallel(train, model, torch.device("cpu"))


# ---- two processes ---------------------------------------------------------------------------


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _inputs(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(1, VOCAB, (BATCH, SEQ_LEN), generator=generator)
    targets = torch.randint(1, VOCAB, (BATCH, SEQ_LEN), generator=generator)
    if case == "documents":
        inputs[0, [5, 14, 20]] = 0  # end-of-text: documents across the chunk boundaries
        inputs[1, [9, 27]] = 0
        targets[0, :6] = -100       # ignored targets, all on rank 0: uneven token counts
    return inputs, targets


def _check_case(case: str, shard: ContextParallel) -> dict[str, float]:
    import torch.distributed as dist

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=SEQ_LEN,
                      attention=AttentionConfig(**CASES[case]))
    model = cfg.build()
    inputs, targets = _inputs(case)
    reference = model(inputs, targets)
    reference.loss.backward()
    ref_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    out = model(inputs, targets, sequence_shard=shard)
    assert out.logits.shape == (BATCH, SEQ_LEN // shard.size, cfg.padded_vocab_size)
    out.loss.backward()
    parts = [torch.empty_like(out.logits) for _ in range(shard.size)]
    dist.all_gather(parts, out.logits.detach().contiguous(), group=shard.group)
    order = torch.cat([zigzag_index(SEQ_LEN, shard.size, r) for r in range(shard.size)])
    logits = torch.empty_like(reference.logits)
    logits[:, order] = torch.cat(parts, dim=1)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=shard.group)
    grads = {}
    for name, p in model.named_parameters():  # what DDP does: the mean over ranks
        dist.all_reduce(p.grad, group=shard.group)
        grads[name] = p.grad / shard.size
    model.zero_grad()

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp(inputs, targets, sequence_shard=shard).loss.backward()
    return {
        "logits": relative(logits, reference.logits.detach()),
        "loss": relative(loss / shard.size, reference.loss.detach()),
        "grads": max(relative(grads[name], ref_grads[name]) for name in ref_grads),
        "ddp_grads": max(relative(p.grad, ref_grads[name]) for name, p in ddp.module.named_parameters()),
        "grad_norm": float(torch.stack([g.norm() for g in ref_grads.values()]).norm()),
    }


def _worker(out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    train = TrainConfig(context_parallel=dist.get_world_size(), batch_size=BATCH, seq_len=SEQ_LEN)
    shard = build_context_parallel(train, ModelConfig(), torch.device("cpu"))
    assert isinstance(shard, ContextParallel)
    results = {case: _check_case(case, shard) for case in CASES}
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_give_the_logits_and_gradients_of_one_process(tmp_path):
    out = tmp_path / "differences.json"
    result = torchrun(__file__, str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    differences = json.loads(out.read_text())
    assert sorted(differences) == sorted(CASES)
    for case, worst in differences.items():
        assert worst["grad_norm"] > 0.01, case  # gradients that could differ
        for key in ("logits", "loss", "grads", "ddp_grads"):
            assert worst[key] <= FORWARD_RTOL, (case, key, worst)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_corpus):
    from conftest import dense_reference_run

    tmp = tmp_path_factory.mktemp("context_parallel")
    return tmp, dense_reference_run(tmp, tiny_corpus, TRAIN_STEPS, "single")


def assert_same_training(tmp: Path, name: str) -> None:
    from conftest import train_losses

    one, two = train_losses(tmp / "runs" / "single"), train_losses(tmp / "runs" / name)
    assert sorted(one) == sorted(two) == list(range(1, TRAIN_STEPS + 1))
    for step in one:
        assert abs(one[step] - two[step]) <= TRAIN_RTOL * abs(one[step]), (step, one[step], two[step])
    # held-out evaluation at the end (rank 0, whole sequences) sees the same model
    bpb_one = json.loads((tmp / "runs" / "single" / "eval" / "final.json").read_text())["bpb"]
    bpb_two = json.loads((tmp / "runs" / name / "eval" / "final.json").read_text())["bpb"]
    assert bpb_one.keys() == bpb_two.keys()
    for domain in bpb_one:
        assert abs(bpb_one[domain] - bpb_two[domain]) <= 1e-3 * bpb_one[domain], (domain, bpb_one, bpb_two)


def test_twenty_training_steps_with_context_parallel_match_one_process(single):
    tmp, config = single
    result = torchrun("-m", "lmforge", "train", str(config), "--set", "name=cp2", "--set", "train.context_parallel=2",
                      "--no-report")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "context parallelism: each sequence split over 2 ranks" in result.stderr + result.stdout
    assert_same_training(tmp, "cp2")


@pytest.mark.slow
def test_context_parallel_with_fsdp_matches_one_process(single):
    tmp, config = single
    result = torchrun("-m", "lmforge", "train", str(config), "--set", "name=cp2_fsdp", "--set",
                      "train.context_parallel=2", "--set", "train.data_parallel=fsdp", "--no-report")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(tmp, "cp2_fsdp")


@pytest.mark.slow
def test_context_parallel_times_data_parallel_on_four_ranks_matches_one_process(single):
    """world 4 = 2 data-parallel groups x 2 context-parallel ranks: each group takes half the rows."""
    tmp, config = single
    result = torchrun("-m", "lmforge", "train", str(config), "--set", "name=dp2_cp2", "--set",
                      "train.context_parallel=2", "--no-report", nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 data-parallel group(s)" in result.stderr + result.stdout
    assert_same_training(tmp, "dp2_cp2")


if __name__ == "__main__":  # one rank of the forward/backward check, under torchrun
    _worker(sys.argv[1])
