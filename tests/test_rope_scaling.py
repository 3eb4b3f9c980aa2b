"""RoPE scaling (linear, NTK-aware, YaRN): the frequencies, validation, cached generation, and a
context-extension stage continued from a shorter-context parent with --init-from."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.nn.config import ModelConfig, RopeScalingConfig
from lmforge.nn.rope import RotaryEmbedding, ntk_theta, rope_frequencies, yarn_attention_factor

HEAD_DIM, THETA = 16, 10000.0


def _scaling(kind: str, factor: float, **extra) -> RopeScalingConfig:
    return RopeScalingConfig(kind=kind, factor=factor, **extra)  # type: ignore[arg-type]


def test_default_rope_is_bit_identical_to_plain_rope():
    rope = RotaryEmbedding(HEAD_DIM, 64, THETA)
    # the tables as lmforge computed them before scaling existed
    inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    angles = torch.outer(torch.arange(64, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    assert torch.equal(rope.cos, angles.cos()) and torch.equal(rope.sin, angles.sin())
    assert rope.attention_factor == 1.0
    assert ModelConfig().rope_scaling is None
    torch.manual_seed(0)
    plain = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16).build()
    assert torch.equal(plain.rope.cos, RotaryEmbedding(16, 16, 10000.0).cos)


def test_linear_scaling_reads_position_p_as_p_over_factor():
    plain = RotaryEmbedding(HEAD_DIM, 64, THETA)
    halved = RotaryEmbedding(HEAD_DIM, 128, THETA, scaling=_scaling("linear", 2.0))
    # factor 2 is exact in floating point: position 2q scaled is position q unscaled, bit for bit
    assert torch.equal(halved.cos[0::2], plain.cos) and torch.equal(halved.sin[0::2], plain.sin)
    thirds = RotaryEmbedding(HEAD_DIM, 90, THETA, scaling=_scaling("linear", 3.0))
    positions = torch.arange(90, dtype=torch.float64)
    inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    expected = torch.outer(positions / 3.0, inv_freq)  # unscaled RoPE at p / 3, in float64 (float32 angles: 1e-5)
    torch.testing.assert_close(thirds.cos[:, : HEAD_DIM // 2].double(), expected.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(thirds.sin[:, : HEAD_DIM // 2].double(), expected.sin(), atol=1e-5, rtol=0)


def test_ntk_scales_the_base_keeping_the_highest_frequency_and_dividing_the_lowest_by_the_factor():
    factor = 4.0
    assert ntk_theta(THETA, factor, HEAD_DIM) == pytest.approx(THETA * factor ** (HEAD_DIM / (HEAD_DIM - 2)))
    inv_freq, attention = rope_frequencies(HEAD_DIM, THETA, _scaling("ntk", factor))
    plain, _ = rope_frequencies(HEAD_DIM, THETA)
    expected = 1.0 / (THETA * factor ** (HEAD_DIM / (HEAD_DIM - 2))) ** (
        torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert inv_freq[0] == plain[0] == 1.0
    assert float(inv_freq[-1]) == pytest.approx(float(plain[-1]) / factor, rel=1e-5)
    assert attention == 1.0


def _paper_yarn(head_dim: int, theta: float, factor: float, original: int, beta_fast: float, beta_slow: float):
    """YaRN written from the paper: pair i turns r_i = L / wavelength_i times over the original
    context; r_i > beta_fast keeps the frequency, r_i < beta_slow divides it by the factor."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    turns = original * inv_freq / (2 * math.pi)
    return inv_freq, turns > beta_fast, turns < beta_slow


@pytest.mark.parametrize("factor, original, beta_fast, beta_slow", [(2.0, 32, 32.0, 1.0), (4.0, 2048, 32.0, 1.0),
                                                                    (8.0, 4096, 16.0, 2.0)])
def test_yarn_keeps_fast_pairs_interpolates_slow_ones_and_matches_transformers(factor, original, beta_fast, beta_slow):
    head_dim = 64
    scaling = _scaling("yarn", factor, original_max_seq_len=original, beta_fast=beta_fast, beta_slow=beta_slow)
    inv_freq, attention = rope_frequencies(head_dim, THETA, scaling)
    plain, fast, slow = _paper_yarn(head_dim, THETA, factor, original, beta_fast, beta_slow)
    # at a 32-token original context even the fastest pair turns fewer than 32 times: no kept pairs
    assert slow.any() and fast.any() == (original > 2 * math.pi * beta_fast)
    torch.testing.assert_close(inv_freq.double()[fast], plain[fast], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_freq.double()[slow], plain[slow] / factor, rtol=1e-6, atol=0)
    between = ~(fast | slow)
    assert ((inv_freq.double()[between] <= plain[between] * (1 + 1e-6))
            & (inv_freq.double()[between] >= plain[between] / factor * (1 - 1e-6))).all()
    assert attention == pytest.approx(0.1 * math.log(factor) + 1.0)

    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=original * int(factor),
        rope_theta=THETA, rope_scaling={"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                                        "beta_fast": beta_fast, "beta_slow": beta_slow})
    theirs, their_attention = ROPE_INIT_FUNCTIONS["yarn"](config, torch.device("cpu"))
    torch.testing.assert_close(inv_freq, theirs.float(), rtol=1e-6, atol=0)
    assert attention == pytest.approx(their_attention)


def test_linear_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, head_dim=HEAD_DIM, rope_theta=THETA,
                                      rope_scaling={"rope_type": "linear", "factor": 3.0})
    theirs, _ = ROPE_INIT_FUNCTIONS["linear"](config, torch.device("cpu"))
    assert torch.equal(rope_frequencies(HEAD_DIM, THETA, _scaling("linear", 3.0))[0], theirs)


def test_yarn_attention_factor_scales_queries_and_keys():
    scaling = _scaling("yarn", 4.0, original_max_seq_len=32)
    rope = RotaryEmbedding(HEAD_DIM, 128, THETA, scaling=scaling)
    x = torch.randn(1, 2, 128, HEAD_DIM)
    # a rotation keeps the norm: what is left is the attention factor, on queries and on keys
    ratio = rope(x).norm(dim=-1) / x.norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.1 * math.log(4.0) + 1.0))
    set_factor = _scaling("yarn", 4.0, original_max_seq_len=32, attention_factor=1.5)
    assert yarn_attention_factor(set_factor) == 1.5
    assert yarn_attention_factor(_scaling("yarn", 1.0, original_max_seq_len=32)) == 1.0


@pytest.mark.parametrize("section, message", [
    ({"kind": "yarn", "factor": 2.0}, r"model\.rope_scaling\.original_max_seq_len: is required for kind 'yarn'"),
    ({"kind": "linear", "factor": 0.5}, r"model\.rope_scaling\.factor: must be >= 1"),
    ({"kind": "linear"}, r"model\.rope_scaling\.factor: required key is missing"),
    ({"kind": "cubic", "factor": 2.0}, r"model\.rope_scaling\.kind: expected one of 'linear', 'ntk', 'yarn'"),
    ({"kind": "ntk", "factor": 2.0, "attention_factor": 1.2}, r"model\.rope_scaling\.attention_factor: is a YaRN setting"),
    ({"kind": "yarn", "factor": 2.0, "original_max_seq_len": 32, "beta_fast": 1.0, "beta_slow": 2.0},
     r"model\.rope_scaling\.beta_fast: must be greater than beta_slow"),
    ({"kind": "yarn", "factor": 2.0, "original_max_seq_len": 0}, r"model\.rope_scaling\.original_max_seq_len: must be >= 1"),
    ({"kind": "yarn", "factor": 2.0, "original_max_seq_len": 32, "attention_factor": 0.0},
     r"model\.rope_scaling\.attention_factor: must be > 0"),
    ({"kind": "linear", "factor": 2.0, "beta": 3}, r"model\.rope_scaling\.beta: unknown key"),
])
def test_invalid_rope_scaling_is_an_error_naming_the_key(section, message):
    from lmforge.nn.families import model_config_from_dict

    with pytest.raises(ConfigError, match=message):
        model_config_from_dict({"d_model": 32, "n_heads": 2, "rope_scaling": section})


def test_ntk_needs_a_head_dim_above_two():
    from lmforge.nn.families import model_config_from_dict

    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.kind: 'ntk' .* head_dim > 2, got 2"):
        model_config_from_dict({"d_model": 32, "n_heads": 16, "rope_scaling": {"kind": "ntk", "factor": 2.0}})


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_cached_generation_of_a_scaled_model_equals_the_full_forward_past_the_original_context(kind):
    from lmforge.nn.transformer import KVCache

    torch.manual_seed(0)
    extra = {"original_max_seq_len": 16} if kind == "yarn" else {}
    cfg = ModelConfig.from_dict({"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 48,
                                 "rope_scaling": {"kind": kind, "factor": 3.0, **extra}})
    model = cfg.build().eval()
    for p in model.parameters():  # sharper attention than at initialisation, so positions matter
        p.data.add_(torch.randn_like(p) * 0.2)
    ids = torch.randint(0, 64, (2, 48))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model, batch=2)
        steps = [model(ids[:, :10], kv_cache=cache).logits]
        steps += [model(ids[:, t : t + 1], kv_cache=cache).logits for t in range(10, 48)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    plain = ModelConfig.from_dict({**cfg.to_dict(), "rope_scaling": None}).build()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(ids).logits[:, 20:], full[:, 20:], atol=1e-3)  # scaling changes them


# --- context extension: a continued run at twice the context --------------------------------

DENSE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32, "moe": None}


def _run_cfg(tmp: Path, corpus: Path, name: str, **sections) -> dict:
    from conftest import tiny_run_dict

    train = {"steps": 4, "batch_size": 2, "seq_len": 32, "log_every": 1, "eval_every": 0,
             "checkpoint_every": 4, "keep_checkpoints": 1, "tensorboard": False, **sections.pop("train", {})}
    return tiny_run_dict(tmp, corpus, name=name, train=train, **{"model": DENSE, **sections})


@pytest.fixture(scope="module")
def short_parent(tmp_path_factory, tiny_corpus) -> tuple[Path, Path]:
    from lmforge.train.assembly import train_run
    from lmforge.train.config import RunConfig

    tmp = tmp_path_factory.mktemp("extension")
    return tmp, train_run(RunConfig.from_dict(_run_cfg(tmp, tiny_corpus, "parent")))


def test_a_yarn_extension_stage_trains_from_the_short_parent_and_generates_past_its_context(short_parent, tiny_corpus):
    import json

    from conftest import run_cli, train_losses, write_config
    from lmforge.serve.loading import load_for_inference

    tmp, parent_dir = short_parent
    config = write_config(tmp / "extend.yaml", _run_cfg(tmp, tiny_corpus, "extend", train={"steps": 3}))
    result = run_cli("train", str(config), "--no-report", "--init-from", str(parent_dir),
                     "--set", "model.max_seq_len=64", "--set", "train.seq_len=64",
                     "--set", "model.rope_scaling.kind=yarn", "--set", "model.rope_scaling.factor=2",
                     "--set", "model.rope_scaling.original_max_seq_len=32")
    assert result.returncode == 0, result.stderr
    run_dir = tmp / "runs" / "extend"
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert json.loads((run_dir / "lineage.json").read_text())["took"] == ["weights"]

    model, _, config_dict, _ = load_for_inference(run_dir, torch.device("cpu"))  # the checkpoint carries it
    assert config_dict["model"]["rope_scaling"]["kind"] == "yarn" and model.cfg.max_seq_len == 64
    assert model.rope.attention_factor == pytest.approx(0.1 * math.log(2.0) + 1.0)
    generated = run_cli("generate", str(run_dir), "--prompt", "the king", "--max-new-tokens", "60",
                        "--temperature", "0")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("the king") and len(generated.stdout) > len("the king\n")
    from lmforge.nn.generation import generate

    out = generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=61, temperature=0)  # no end token: 64 positions
    assert out.shape == (1, 64)


def test_an_extension_without_scaling_keeps_the_parents_logits_on_its_context(short_parent, tiny_corpus):
    from lmforge.serve.loading import load_for_inference
    from lmforge.train.assembly import train_run
    from lmforge.train.config import RunConfig

    tmp, parent_dir = short_parent
    cfg = _run_cfg(tmp, tiny_corpus, "longer_plain", init={"path": str(parent_dir)},
                   model={**DENSE, "max_seq_len": 64}, optim={"lr": 0.0, "warmup_steps": 0},
                   train={"steps": 1, "seq_len": 64, "checkpoint_every": 1})
    child_dir = train_run(RunConfig.from_dict(cfg))
    parent, _, _, _ = load_for_inference(parent_dir, torch.device("cpu"))
    child, _, _, _ = load_for_inference(child_dir, torch.device("cpu"))
    assert child.cfg.max_seq_len == 64 and child.cfg.rope_scaling is None
    ids = torch.randint(0, parent.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = parent(ids[:, :32]).logits
        ours = child(ids).logits
    torch.testing.assert_close(ours[:, :32], theirs, atol=1e-5, rtol=1e-5)
