"""Model layer: MoE routing and losses, parameter counts, causality, KV cache, Llama parity."""

from __future__ import annotations

import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.nn.config import ModelConfig, MoEConfig
from lmforge.nn.counting import count_parameters, flops_per_token
from lmforge.nn.generation import generate
from lmforge.nn.moe import MoE, load_balance_loss

TINY = dict(vocab_size=200, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


def _moe_cfg(**moe) -> ModelConfig:
    return ModelConfig(**TINY, moe=MoEConfig(**{"n_experts": 4, "top_k": 2, **moe}))


@pytest.mark.parametrize("bias_to_one_expert", [False, True])
def test_moe_is_dropless_every_token_reaches_exactly_k_experts(bias_to_one_expert):
    torch.manual_seed(0)
    layer = MoE(_moe_cfg(expert_rows_multiple=1))  # no padding rows (tests/test_speed_options.py covers them)
    if bias_to_one_expert:
        with torch.no_grad():  # send (almost) everything to expert 0: no capacity limit may drop tokens
            layer.router.weight.zero_()
            layer.router.weight[0] += 1.0
    x = torch.randn(3, 10, 32).abs()
    rows_seen: list[torch.Tensor] = []
    for expert in layer.experts:  # record which token vectors each expert actually processed
        expert.register_forward_hook(lambda m, inp, out: rows_seen.append(inp[0].detach()))
    layer(x)
    assert int(layer.last_tokens_per_expert.sum()) == 30 * 2
    processed = torch.cat(rows_seen)
    assert processed.shape[0] == 30 * 2
    # every token vector appears exactly k=2 times among the rows the experts processed
    tokens = x.reshape(-1, 32)
    matches = (processed[:, None, :] == tokens[None, :, :]).all(-1).sum(0)
    assert matches.tolist() == [2] * 30
    if bias_to_one_expert:
        assert int(layer.last_tokens_per_expert[0]) == 30


def test_moe_output_equals_weighted_sum_of_chosen_experts():
    torch.manual_seed(1)
    layer = MoE(_moe_cfg(n_shared_experts=1))
    x = torch.randn(5, 32)
    out = layer(x)
    probs = layer.router(x).float().softmax(-1)
    top, idx = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    for t in range(5):
        expected = layer.shared_experts[0](x[t])
        for w, e in zip(top[t], idx[t]):
            expected = expected + w * layer.experts[int(e)](x[t])
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


def test_load_balance_loss_is_one_for_uniform_routing():
    uniform = torch.full((8,), 1 / 8)
    assert float(load_balance_loss(uniform, uniform)) == pytest.approx(1.0)
    skewed = torch.tensor([1.0, 0, 0, 0])
    assert float(load_balance_loss(skewed, skewed)) == pytest.approx(4.0)
    # Through the layer: a zero router gives equal probabilities; with top_k == n_experts
    # every expert gets every token, so slot fractions are uniform too.
    layer = MoE(_moe_cfg(top_k=4))
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(2, 7, 32))
    assert float(layer.last_load_balance_loss.detach()) == pytest.approx(1.0)
    assert float(layer.last_z_loss.detach()) == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2, rel=1e-5)


def test_auxiliary_losses_match_their_formulas_for_uneven_routing():
    # the layer routes on [experts, tokens] logits; the losses are those of the usual [tokens, experts] view
    torch.manual_seed(2)
    layer = MoE(_moe_cfg())
    x = torch.randn(3, 9, 32)
    layer(x)
    logits = layer.router(x.reshape(-1, 32)).float()
    probs = logits.softmax(-1)
    chosen = probs.topk(2, dim=-1).indices.flatten()
    slot_fraction = torch.bincount(chosen, minlength=4).float() / chosen.numel()
    assert layer.last_tokens_per_expert.tolist() == torch.bincount(chosen, minlength=4).tolist()
    assert torch.equal(layer.last_top_experts, probs.topk(2, dim=-1).indices)  # [tokens, k], as eval/captions.py reads it
    torch.testing.assert_close(layer.last_load_balance_loss, 4 * (slot_fraction * probs.mean(0)).sum())
    torch.testing.assert_close(layer.last_z_loss, torch.logsumexp(logits, -1).pow(2).mean())


def test_router_runs_in_fp32_under_bf16_autocast():
    """Small logit differences decide routing: under autocast the router's matmul stays fp32, so its
    choices and losses are those of the fp32 logits (bf16 logits would move the z-loss by ~1e-3)."""
    torch.manual_seed(3)
    layer = MoE(_moe_cfg())
    x = torch.randn(2, 40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    logits = x.reshape(-1, 32) @ layer.router.weight.t()
    assert torch.equal(layer.last_top_experts, logits.topk(2, dim=-1).indices)
    torch.testing.assert_close(layer.last_z_loss, torch.logsumexp(logits, -1).pow(2).mean(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [
    ModelConfig(**TINY),
    ModelConfig(**TINY, n_kv_heads=2, qk_norm=True, tie_embeddings=False),
    _moe_cfg(),
    _moe_cfg(n_shared_experts=1, d_expert=16, every_n_layers=2),
    ModelConfig(**{**TINY, "n_layers": 3}, tie_embeddings=False, moe=MoEConfig(n_experts=8, top_k=1)),
])
def test_parameter_counts_are_exact(cfg):
    model = cfg.build()
    counts = count_parameters(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.embedding == model.embed.weight.numel()
    assert counts.non_embedding == counts.total - counts.embedding - counts.lm_head
    if cfg.moe is None:
        assert counts.active == counts.total
    else:
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        idle = (cfg.moe.n_experts - cfg.moe.top_k) * 3 * cfg.d_model * cfg.d_expert * moe_layers
        assert counts.active == counts.total - idle
    n = counts.active - counts.embedding - counts.lm_head + cfg.d_model * cfg.padded_vocab_size
    assert flops_per_token(cfg, 64) == 6 * n + 12 * cfg.n_layers * cfg.d_model * 64


@pytest.mark.parametrize("cfg", [ModelConfig(**TINY, n_kv_heads=2, qk_norm=True), _moe_cfg()])
def test_causality_future_tokens_do_not_change_past_logits(cfg):
    torch.manual_seed(0)
    model = cfg.build().eval()
    ids = torch.randint(0, 200, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_generation_matches_full_recompute():
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, n_kv_heads=2, moe=MoEConfig(n_experts=4, top_k=2))
    model = cfg.build().eval()
    prompt = torch.randint(0, 200, (1, 7))
    cached = generate(model, prompt, 12, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            next_id = model(ids).logits[:, -1, :200].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(cached, ids)


def test_padded_vocab_is_never_sampled():
    cfg = ModelConfig(**{**TINY, "vocab_size": 130})  # padded to 192
    model = cfg.build().eval()
    with torch.no_grad():
        model.lm_head.weight[130:] = 10.0  # padded rows would win every time if allowed
    out = generate(model, torch.tensor([[1, 2, 3]]), 20, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert int(out.max()) < 130


def test_tied_embeddings_share_storage_and_init_is_seeded():
    torch.manual_seed(3)
    a = ModelConfig(**TINY).build()
    torch.manual_seed(3)
    b = ModelConfig(**TINY).build()
    assert a.lm_head.weight.data_ptr() == a.embed.weight.data_ptr()
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_bf16_autocast_forward_runs_on_cpu():
    model = _moe_cfg().build()
    ids = torch.randint(0, 200, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, ids)
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.float32


@pytest.mark.parametrize("data, message", [
    ({"d_model": 30, "n_heads": 4}, "divisible by n_heads"),
    ({"n_heads": 4, "n_kv_heads": 3}, "divisible by n_kv_heads"),
    ({"moe": {"n_experts": 2, "top_k": 3}}, "top_k"),
    ({"n_layer": 2}, "n_layer: unknown key"),
])
def test_model_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data, path="model")


def test_dense_forward_matches_huggingface_llama():
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      tie_embeddings=False, d_ff=128)
    torch.manual_seed(0)
    ours = cfg.build().eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    mapping = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "lm_head.weight": "lm_head.weight"}
    for i in range(2):
        for ours_name, hf_name in [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
                                   ("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                                   ("attn.v_proj", "self_attn.v_proj"), ("attn.o_proj", "self_attn.o_proj"),
                                   ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj")]:
            mapping[f"blocks.{i}.{ours_name}.weight"] = f"model.layers.{i}.{hf_name}.weight"
    hf_state = hf.state_dict()
    with torch.no_grad():
        for ours_name, tensor in ours.state_dict().items():
            hf_state[mapping[ours_name]].copy_(tensor)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
