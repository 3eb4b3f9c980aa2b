"""Architecture options of the speedrun ledger (docs/speedrun.md): ReLU² feed-forwards, logit
soft-capping, value embeddings, U-net skip connections — what each computes, that counting stays
exact, that bad settings are refused by key, and that the Hugging Face export refuses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.core.config import ConfigError
from lmforge.nn.config import ModelConfig
from lmforge.nn.counting import count_parameters, flops_per_token
from lmforge.nn.cross_entropy import linear_cross_entropy
from lmforge.nn.families import model_config_from_dict
from lmforge.nn.mlp import ReLUSquared

BASE = {"vocab_size": 100, "d_model": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32}
OPTIONS = [{"mlp_activation": "relu2"}, {"logit_softcap": 15.0}, {"value_embeddings": True},
           {"skip_connections": True}, {"mlp_activation": "relu2", "logit_softcap": 15.0, "value_embeddings": True,
                                        "skip_connections": True, "tie_embeddings": False}]


def _model(**options):
    torch.manual_seed(0)
    return ModelConfig.from_dict({**BASE, **options}).build()


def test_relu_squared_computes_down_of_squared_relu():
    layer = ReLUSquared(8, 12)
    x = torch.randn(3, 8)
    expected = layer.down.weight @ (torch.clamp(layer.up.weight @ x.T, min=0) ** 2)
    torch.testing.assert_close(layer(x), expected.T)
    assert ModelConfig.from_dict({**BASE, "mlp_activation": "relu2"}).resolved_d_ff == 4 * 32


@pytest.mark.parametrize("options", OPTIONS)
def test_counts_match_the_built_model_and_it_trains(options):
    cfg = ModelConfig.from_dict({**BASE, **options})
    model = cfg.build()
    counts = count_parameters(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    if cfg.value_embeddings:  # lookups: in the embedding count, out of the FLOPs
        assert counts.embedding == (1 + 4 * 2 / 4) * cfg.padded_vocab_size * 32
        assert flops_per_token(cfg, 32) == flops_per_token(ModelConfig.from_dict(
            {**BASE, **options, "value_embeddings": False}), 32)
    ids = torch.randint(0, 100, (2, 16))
    out = model(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters())


def test_softcap_bounds_the_logits_and_the_fused_loss_matches_the_plain_one():
    torch.manual_seed(0)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = (3 * torch.randn(70, 16)).requires_grad_()
    targets = torch.randint(0, 70, (40,))
    targets[3] = -100
    logits = 5.0 * torch.tanh(hidden @ weight.T / 5.0)
    plain = F.cross_entropy(logits, targets, ignore_index=-100)
    plain.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=16, softcap=5.0)
    fused.backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(hidden.grad, expected[0])
    torch.testing.assert_close(weight.grad, expected[1])
    model = _model(logit_softcap=2.0)
    assert model(torch.randint(0, 100, (1, 8))).logits.abs().max() < 2.0


def test_fused_and_plain_training_losses_agree_with_every_option_on():
    options = OPTIONS[-1]
    ids = torch.randint(0, 100, (2, 17))
    plain, fused = _model(**options), _model(**options, fused_cross_entropy=True)
    fused.load_state_dict(plain.state_dict())
    a, b = plain(ids[:, :-1], ids[:, 1:]).loss, fused(ids[:, :-1], ids[:, 1:]).loss
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_value_embeddings_and_skips_change_the_model_and_decode_as_the_whole_sequence():
    from lmforge.nn.transformer import KVCache

    ids = torch.randint(0, 100, (1, 12))
    base = _model()
    for options in ({"value_embeddings": True}, {"skip_connections": True}):
        model = _model(**options).eval()
        assert not torch.allclose(model(ids).logits, base.eval()(ids).logits)
        cache = KVCache(model, 1)
        with torch.no_grad():
            whole = model(ids).logits
            steps = [model(ids[:, :6], kv_cache=cache).logits]
            steps += [model(ids[:, i:i + 1], kv_cache=cache).logits for i in range(6, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-4, atol=1e-5)
    skip = _model(skip_connections=True)
    assert skip.skip_weights.shape == (2,) and torch.equal(skip.skip_weights, torch.ones(2))


@pytest.mark.parametrize("raw, key", [
    ({"mlp_activation": "gelu"}, "mlp_activation"),
    ({"mlp_activation": "relu2", "moe": {"n_experts": 4, "top_k": 2}}, "mlp_activation"),
    ({"logit_softcap": 0.0}, "logit_softcap"),
    ({"logit_softcap": -3.0}, "logit_softcap"),
    ({"skip_connections": True, "n_layers": 1}, "skip_connections"),
])
def test_bad_settings_are_refused_naming_the_key(raw, key):
    with pytest.raises((ConfigError, ValueError), match=key):
        ModelConfig.from_dict({**BASE, **raw}, path="model")


def test_other_families_refuse_value_embeddings_and_skips():
    with pytest.raises((ConfigError, ValueError), match="value_embeddings"):
        model_config_from_dict({**BASE, "family": "retro", "value_embeddings": True})


@pytest.mark.parametrize("options", OPTIONS)
def test_hf_export_refuses_what_llama_cannot_represent(options):
    pytest.importorskip("transformers")
    from lmforge.export.hf import ExportError, hf_config

    key = next(k for k in ("mlp_activation", "logit_softcap", "value_embeddings", "skip_connections") if k in options)
    with pytest.raises(ExportError, match=f"model.{key}"):
        hf_config(ModelConfig.from_dict({**BASE, **options}), eos_id=0)
    assert type(hf_config(ModelConfig.from_dict({**BASE, "tie_embeddings": False}), eos_id=0)).__name__ == "LlamaConfig"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_explicit_attention_equals_sdpa_forward_and_backward(dtype, tolerance):
    from lmforge.nn.attention import explicit_causal_attention

    torch.manual_seed(0)
    q = torch.randn(2, 4, 24, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 24, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    upstream = torch.randn(2, 4, 24, 8, dtype=dtype)
    grads = []
    for attend in (explicit_causal_attention,
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)):
        out = attend(q, k, v)
        out.backward(upstream)
        grads.append([out.detach().float()] + [t.grad.float() for t in (q, k, v)])
        q.grad = k.grad = v.grad = None
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


def test_attention_kernel_auto_is_explicit_only_for_bf16_on_cpu_and_models_agree():
    from lmforge.nn.attention import explicit_kernel_applies

    assert explicit_kernel_applies("auto", torch.zeros(1, 1, 4, 2, dtype=torch.bfloat16))
    assert not explicit_kernel_applies("auto", torch.zeros(1, 1, 4, 2))
    assert explicit_kernel_applies("explicit", torch.zeros(1, 1, 4, 2))
    assert not explicit_kernel_applies("sdpa", torch.zeros(1, 1, 4, 2, dtype=torch.bfloat16))
    ids = torch.randint(0, 100, (2, 20))
    explicit, sdpa = _model(attention={"kernel": "explicit"}), _model(attention={"kernel": "sdpa"})
    torch.testing.assert_close(explicit(ids).logits, sdpa(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises((ConfigError, ValueError), match="kernel"):
        ModelConfig.from_dict({**BASE, "attention": {"kernel": "flash"}}, path="model")
