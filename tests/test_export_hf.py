"""Hugging Face export: every supported lmforge architecture reloads in transformers with
the same logits, and unsupported ones get a clear error."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from lmforge.export.hf import ExportError, export_hf  # noqa: E402
from lmforge.nn.config import ModelConfig  # noqa: E402

BASE = {"vocab_size": 120, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32}


def _tokenizer(tmp_path):
    from lmforge.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["the king and the queen\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)
    return tok.save(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("extra, architecture", [
    ({}, "LlamaForCausalLM"),
    ({"qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    ({"moe": {"n_experts": 4, "top_k": 2, "d_expert": 24}}, "MixtralForCausalLM"),
    ({"qk_norm": True, "moe": {"n_experts": 4, "top_k": 2, "every_n_layers": 2}}, "Qwen3MoeForCausalLM"),
])
def test_export_reloads_with_identical_logits(tmp_path, extra, architecture):
    import transformers

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**BASE, **extra})
    model = cfg.build()
    for p in model.parameters():  # non-trivial norms, so a mapping mistake shows
        p.data.add_(torch.randn_like(p) * 0.05)
    summary = export_hf(model, cfg, _tokenizer(tmp_path), tmp_path / "hf")
    assert summary["architecture"] == architecture
    assert summary["max_logit_difference"] < 1e-4
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok("the king")["input_ids"]) == "the king"


def test_unsupported_and_existing_targets_are_clear_errors(tmp_path):
    cfg = ModelConfig.from_dict({**BASE, "moe": {"n_experts": 4, "top_k": 2, "n_shared_experts": 1}})
    with pytest.raises(ExportError, match="shared experts"):
        export_hf(cfg.build(), cfg, _tokenizer(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    dense = ModelConfig.from_dict(BASE)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="exists"):
        export_hf(dense.build(), dense, _tokenizer(tmp_path), tmp_path / "taken")


def test_export_command_on_a_trained_run(tmp_path, tiny_corpus):
    from conftest import run_cli, tiny_run_dict, write_config

    cfg = tiny_run_dict(tmp_path, tiny_corpus, train={"steps": 2, "batch_size": 2, "seq_len": 16, "log_every": 1,
                                                      "eval_every": 0, "checkpoint_every": 0, "tensorboard": False})
    config = write_config(tmp_path / "run.yaml", cfg)
    assert run_cli("train", str(config), "--no-report").returncode == 0
    result = run_cli("export", str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "MixtralForCausalLM" in result.stdout and (tmp_path / "hf" / "config.json").is_file()
    again = run_cli("export", str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "hf"))
    assert again.returncode == 2 and "exists" in again.stderr
