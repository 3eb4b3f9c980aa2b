"""CUDA correctness (skipped without a GPU): bf16 training step, KV cache, compile, trainer."""

from __future__ import annotations

import pytest
import torch

from lmforge.nn.config import ModelConfig, MoEConfig
from lmforge.nn.generation import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CFG = ModelConfig(vocab_size=500, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                  qk_norm=True, moe=MoEConfig(n_experts=4, top_k=2))


def test_cuda_matches_cpu_in_fp32():
    torch.manual_seed(0)
    model = CFG.build()
    ids = torch.randint(0, 500, (2, 64))
    cpu = model(ids, ids)
    gpu = model.cuda()(ids.cuda(), ids.cuda())
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, atol=2e-4, rtol=2e-4)


def test_bf16_autocast_training_step_is_finite_and_learns():
    torch.manual_seed(0)
    model = CFG.build().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 500, (4, 128), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0  # memorising one batch


def test_kv_cache_generation_on_cuda_matches_recompute():
    torch.manual_seed(0)
    model = CFG.build().cuda().eval()
    prompt = torch.randint(0, 500, (1, 9), device="cuda")
    cached = generate(model, prompt, 16, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(16):
            ids = torch.cat([ids, model(ids).logits[:, -1, :500].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = ModelConfig(vocab_size=500, d_model=128, n_layers=2, n_heads=4, max_seq_len=128).build().cuda()
    ids = torch.randint(0, 500, (2, 64), device="cuda")
    eager = model(ids).logits
    compiled = torch.compile(model)(ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)


def test_a_few_training_steps_through_the_real_trainer_on_cuda(tmp_path, tiny_corpus):
    """The assembled run on CUDA (bf16 autocast): losses finite and falling, checkpoint resumes exactly."""
    from conftest import tiny_run_dict
    from lmforge.core.metrics_file import read_metrics
    from lmforge.train.assembly import build_trainer, train_run
    from lmforge.train.config import RunConfig

    raw = tiny_run_dict(tmp_path, tiny_corpus, train={"device": "cuda", "precision": "bf16", "steps": 8,
                                                      "checkpoint_every": 4, "eval_every": 0})
    run = train_run(RunConfig.from_dict(raw))
    losses = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"}
    assert sorted(losses) == list(range(1, 9)) and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert losses[8] < losses[1]
    trainer = build_trainer(RunConfig.from_dict({**raw, "name": "resumed"}))
    assert next(trainer.model.parameters()).device.type == "cuda"
    resumed = build_trainer(RunConfig.from_dict(raw), resume=str(run / "checkpoints" / "step_0000004"))
    assert resumed.step == 4 and next(resumed.model.parameters()).is_cuda
