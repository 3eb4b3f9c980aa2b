"""Long-context attention (model.attention): document masks, sliding-window local layers with a
ring-buffer KV cache, per-layer RoPE base; checked against a plain softmax reference with
explicit masks, documents packed against documents alone, and the export to transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.core.errors import ConfigError
from lmforge.nn.attention import (END_OF_TEXT_ID, attention_mask, documents_of, local_attention,
                                  restarted_positions, rotate_at)
from lmforge.nn.config import AttentionConfig, ModelConfig
from lmforge.nn.counting import flops_per_token
from lmforge.nn.generation import generate
from lmforge.nn.rope import RotaryEmbedding
from lmforge.nn.transformer import KVCache

VOCAB = 97
BASE = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64}


def _model(attention: dict | None = None, **extra):
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**BASE, **extra, "attention": attention or {}})
    model = cfg.build().eval()
    with torch.no_grad():  # non-trivial norms, so a wrong mask or rotation shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ids(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random ids without end-of-text tokens (tests place those themselves)."""
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _reference_documents(ids: torch.Tensor) -> torch.Tensor:
    """Document ids the slow way: a counter bumped at each end-of-text token."""
    out = torch.zeros_like(ids)
    for row in range(ids.shape[0]):
        doc = 0
        for t in range(ids.shape[1]):
            doc += int(ids[row, t] == END_OF_TEXT_ID)
            out[row, t] = doc
    return out


def reference_logits(model, ids: torch.Tensor, document_mask: bool = False) -> torch.Tensor:
    """The model computed with a plain softmax over explicitly masked scores: causal, the band
    |i - j| < window for local layers, the same document when ``document_mask``."""
    b, t = ids.shape
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    docs = _reference_documents(ids)
    x = model.embed(ids)
    for block in model.blocks:
        attn = block.attn
        allowed = (j <= i).expand(b, t, t)
        if attn.window is not None:
            allowed = allowed & (i - j < attn.window)
        if document_mask:
            allowed = allowed & (docs[:, :, None] == docs[:, None, :])
        h = block.attn_norm(x)
        q = attn.q_proj(h).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        rope = model.local_rope if model.local_rope is not None and attn.window is not None else model.rope
        q, k = rope(q), rope(k)
        groups = attn.n_heads // attn.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
        weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
        x = x + attn.o_proj((weights @ v).transpose(1, 2).reshape(b, t, -1))
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm(x))


# --- defaults -------------------------------------------------------------------------------

def test_defaults_take_the_plain_causal_path_bit_for_bit():
    """No model.attention section (or an empty one) computes exactly what lmforge always did:
    SDPA with is_causal in every layer, no masks built."""
    implicit = _model()
    explicit = ModelConfig.from_dict({**BASE, "attention": {"document_mask": False, "sliding_window": None}})
    assert explicit.attention == AttentionConfig() == implicit.cfg.attention
    ids = _ids(2, 40)
    ids[:, 7] = END_OF_TEXT_ID  # an end-of-text token changes nothing without document_mask
    x = implicit.embed(ids)
    for block in implicit.blocks:  # the code lmforge had before model.attention existed
        attn, h = block.attn, block.attn_norm(x)
        b, t, _ = h.shape
        q = implicit.rope(attn.q_proj(h).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2), 0)
        k = implicit.rope(attn.k_proj(h).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2), 0)
        v = attn.v_proj(h).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        x = x + block.mlp(block.mlp_norm(x))
    with torch.no_grad():
        assert torch.equal(implicit(ids).logits, implicit.lm_head(implicit.norm(x)))
    assert implicit.local_rope is None and all(block.attn.window is None for block in implicit.blocks)
    assert flops_per_token(implicit.cfg, 64) == flops_per_token(ModelConfig.from_dict(BASE), 64)


# --- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("attention, message", [
    ({"restart_positions": True}, "model.attention.restart_positions: needs document_mask"),
    ({"sliding_window": 0}, "model.attention.sliding_window: must be >= 1"),
    ({"sliding_window": 8, "global_every": 0}, "model.attention.global_every: must be >= 1"),
    ({"global_every": 6}, "model.attention.global_every: applies to local layers"),
    ({"rope_theta_local": 10000.0}, "model.attention.rope_theta_local: applies to local layers"),
    ({"sliding_window": 8, "rope_theta_local": -1.0}, "model.attention.rope_theta_local: must be > 0"),
    ({"sliding_window": "wide"}, "model.attention.sliding_window: expected int or null"),
    ({"window": 8}, "model.attention.window: unknown key"),
])
def test_bad_attention_settings_name_their_key(attention, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**BASE, "attention": attention}, path="model")


def test_layer_pattern_and_rope_base_per_layer():
    model = _model({"sliding_window": 8, "global_every": 3, "rope_theta_local": 100.0}, n_layers=6)
    assert [block.attn.window for block in model.blocks] == [8, 8, None, 8, 8, None]
    assert model.local_rope is not None and model.rope is not model.local_rope
    assert not torch.allclose(model.local_rope.cos, model.rope.cos)
    all_local = _model({"sliding_window": 8})
    assert [block.attn.window for block in all_local.blocks] == [8, 8, 8] and all_local.local_rope is None
    # FLOPs: a local layer counts min(window, seq_len) keys a query sees
    cfg, plain = model.cfg, ModelConfig.from_dict({**BASE, "n_layers": 6})
    head = 12 * cfg.n_heads * cfg.head_dim
    assert flops_per_token(plain, 64) - flops_per_token(cfg, 64) == head * 4 * (64 - 8)
    assert flops_per_token(cfg, 4) == flops_per_token(plain, 4)


def test_retro_refuses_attention_settings():
    from lmforge.nn.retro import RetroModelConfig

    with pytest.raises(ConfigError, match="model.attention: .* transformer family; RETRO"):
        RetroModelConfig.from_dict({**BASE, "retro": {"chunk_len": 8}, "attention": {"sliding_window": 8}},
                                   path="model")


# --- masks, documents, positions ------------------------------------------------------------

def test_documents_and_restarted_positions_without_loops_match_the_slow_way():
    ids = _ids(3, 30, seed=4)
    ids[0, [0, 9, 10, 25]] = END_OF_TEXT_ID
    ids[1, 29] = END_OF_TEXT_ID
    index = torch.arange(30)
    docs = documents_of(ids)
    assert torch.equal(docs, _reference_documents(ids))
    positions = restarted_positions(ids, index)
    for row in range(3):
        start = 0
        for t in range(30):
            start = t if ids[row, t] == END_OF_TEXT_ID else start
            assert int(positions[row, t]) == t - start
    # Continuing a cached part: the tail's ids and positions are those of the whole.
    tail_docs = documents_of(ids[:, 12:], docs[:, 11])
    tail_positions = restarted_positions(ids[:, 12:], index[12:], 11 - positions[:, 11])
    assert torch.equal(tail_docs, docs[:, 12:]) and torch.equal(tail_positions, positions[:, 12:])


def test_mask_of_a_query_shard_at_an_offset_is_those_rows_of_the_full_mask():
    """What context parallelism needs: a rank's queries at an offset against all keys."""
    ids = _ids(2, 24)
    ids[:, [5, 17]] = END_OF_TEXT_ID
    docs, index = documents_of(ids), torch.arange(24)
    full = attention_mask(index, index, docs, docs, window=6)
    shard = attention_mask(index[8:16], index, docs[:, 8:16], docs, window=6)
    assert torch.equal(shard, full[:, 8:16])
    assert full.diagonal(dim1=1, dim2=2).all()  # every token sees itself
    assert not full[0, 10, 3] and not full[0, 4, 5] and full[0, 10, 6]  # other document / future / same


def test_rotation_at_explicit_positions_is_ropes_own():
    """rotate_at reads RotaryEmbedding's cos/sin tables; this holds for scaled RoPE too."""
    from lmforge.nn.config import RopeScalingConfig

    x = torch.randn(2, 4, 10, 8)
    for scaling in (None, RopeScalingConfig(kind="yarn", factor=4.0, original_max_seq_len=16)):
        rope = RotaryEmbedding(8, 64, 500.0, scaling=scaling)
        positions = torch.arange(5, 15).expand(2, 10)
        torch.testing.assert_close(rotate_at(rope, x, positions), rope(x, 5), rtol=0, atol=0)


@pytest.mark.parametrize("window, t, with_documents", [(4, 37, False), (5, 40, True), (8, 64, True), (3, 7, False)])
def test_blocked_local_attention_equals_the_band_mask_forward_and_backward(window, t, with_documents):
    torch.manual_seed(0)
    q = torch.randn(2, 4, t, 8, requires_grad=True)
    k = torch.randn(2, 2, t, 8, requires_grad=True)
    v = torch.randn(2, 2, t, 8, requires_grad=True)
    index = torch.arange(t)
    documents = None
    if with_documents:
        ids = _ids(2, t)
        ids[0, [3, t // 2]] = END_OF_TEXT_ID
        documents = documents_of(ids)
    blocked = local_attention(q, k, v, index, window, documents)
    mask = attention_mask(index, index, documents, documents, window)
    mask = mask.unsqueeze(1) if mask.dim() == 3 else mask
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(blocked, full, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(full)
    grads = torch.autograd.grad((blocked * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((full * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- the model: training ----------------------------------------------------------------------

@pytest.mark.parametrize("attention, t", [
    ({"sliding_window": 5}, 40),                       # blocked local attention (t > 2 W)
    ({"sliding_window": 5}, 9),                        # one mask over the sequence
    ({"sliding_window": 6, "global_every": 3, "rope_theta_local": 100.0}, 40),
    ({"document_mask": True}, 40),
    ({"document_mask": True, "sliding_window": 4, "global_every": 2}, 40),
])
def test_masked_layers_equal_plain_attention_with_explicit_masks_in_training(attention, t):
    model = _model(attention, qk_norm=True).train()
    ids = _ids(2, t)
    ids[0, [6, t // 2]] = END_OF_TEXT_ID
    ids[1, 0] = END_OF_TEXT_ID
    targets = _ids(2, t, seed=7)
    out = model(ids, targets)
    out.loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected = reference_logits(model, ids, document_mask=attention.get("document_mask", False))
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    F.cross_entropy(expected.flatten(0, 1), targets.flatten()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", [
    {"document_mask": True},
    {"document_mask": True, "restart_positions": True},
    {"document_mask": True, "restart_positions": True, "sliding_window": 4, "global_every": 2},
])
def test_a_packed_batch_gives_each_document_the_loss_it_gets_alone(attention):
    """Packed like the shards: every document followed by end-of-text, which then starts the next
    one; the first row begins mid-document, the second with a whole one."""
    model = _model(attention)
    pieces = [_ids(1, n, seed=n)[0] for n in (7, 11, 9, 5, 13)]
    eos = torch.tensor([END_OF_TEXT_ID])
    row0 = [pieces[0], torch.cat([eos, pieces[1]]), torch.cat([eos, pieces[2]]), eos]
    row1 = [torch.cat([eos, pieces[3]]), torch.cat([eos, pieces[4]]), torch.cat([eos, pieces[2]])]
    packed = torch.stack([torch.cat(row0), torch.cat(row1)])
    targets = torch.cat([packed[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        token_loss = F.cross_entropy(model(packed).logits.flatten(0, 1), targets.flatten(),
                                     ignore_index=-100, reduction="none").view(2, -1)
        plain = _model()  # the same weights with no document mask: a control that must differ
        leaked = F.cross_entropy(plain(packed).logits.flatten(0, 1), targets.flatten(),
                                 ignore_index=-100, reduction="none").view(2, -1)
    differs = 0
    for row, docs in enumerate((row0, row1)):
        start = 0
        for doc in docs:
            end = start + len(doc)
            alone_targets = targets[row, start:end]
            with torch.no_grad():
                alone = F.cross_entropy(model(doc[None]).logits[0], alone_targets, ignore_index=-100,
                                        reduction="none")
            valid = alone_targets != -100
            if valid.any():
                packed_loss = token_loss[row, start:end][valid].mean()
                assert abs(float(packed_loss) - float(alone[valid].mean())) < 1e-5
                torch.testing.assert_close(token_loss[row, start:end][valid], alone[valid], atol=1e-5, rtol=1e-5)
                differs += int(start > 0 and abs(float(leaked[row, start:end][valid].mean() - packed_loss)) > 1e-3)
            start = end
    assert differs >= 3  # without the mask, later documents do see the earlier ones


# --- the model: cached generation -------------------------------------------------------------

@pytest.mark.parametrize("attention", [
    {"sliding_window": 5},
    {"sliding_window": 6, "global_every": 3, "rope_theta_local": 100.0},
    {"document_mask": True, "restart_positions": True, "sliding_window": 4, "global_every": 3},
])
def test_cached_decoding_equals_the_uncached_forward_with_explicit_masks(attention):
    model = _model(attention)
    ids = _ids(2, 60)
    ids[0, [9, 30]] = END_OF_TEXT_ID
    ids[1, 44] = END_OF_TEXT_ID
    document_mask = attention.get("document_mask", False)
    cache = KVCache(model, batch=2)
    with torch.no_grad():
        parts = [model(ids[:, :17], kv_cache=cache).logits]     # a prompt longer than 2 windows
        parts += [model(ids[:, i:i + 1], kv_cache=cache).logits for i in range(17, 40)]  # one token a step
        parts.append(model(ids[:, 40:47], kv_cache=cache).logits)  # a chunk against a full ring
        parts += [model(ids[:, i:i + 1], kv_cache=cache).logits for i in range(47, 60)]
        expected = reference_logits(model, ids, document_mask)
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt_len, n", [(6, 40), (30, 60)])
def test_greedy_generation_with_windows_is_the_uncached_greedy_choice(prompt_len, n):
    """Past max_seq_len (64) the generation window slides as for any model (the cache is rebuilt
    from the most recent tokens); up to it every token is the reference's argmax."""
    from lmforge.nn.generation import sliding_window_keep

    model = _model({"sliding_window": 5, "global_every": 3, "document_mask": True})
    prompt = _ids(1, prompt_len)
    prompt[0, prompt_len // 2] = END_OF_TEXT_ID
    out = generate(model, prompt, n, temperature=0)
    ids, start = prompt[0].tolist(), 0
    max_len, keep = model.cfg.max_seq_len, sliding_window_keep(model.cfg.max_seq_len)
    with torch.no_grad():
        for _ in range(n):
            logits = reference_logits(model, torch.tensor([ids[start:]]), document_mask=True)[0, -1, :VOCAB]
            ids.append(int(logits.argmax()))
            if len(ids) - start > max_len:
                start = len(ids) - keep
    assert out[0].tolist() == ids


def test_kv_cache_of_a_5_to_1_model_is_the_formula_of_a_global_only_one():
    window, max_len, batch = 16, 128, 3
    local = _model({"sliding_window": window, "global_every": 6}, n_layers=6, max_seq_len=max_len)
    dense = _model(n_layers=6, max_seq_len=max_len)
    cache, full = KVCache(local, batch), KVCache(dense, batch)
    per_position = 2 * batch * local.cfg.kv_heads * local.cfg.head_dim * 4  # K and V, fp32
    assert full.nbytes() == 6 * max_len * per_position
    assert cache.nbytes() == (5 * window + max_len) * per_position
    assert cache.nbytes() / full.nbytes() == pytest.approx((5 * window + max_len) / (6 * max_len), rel=1e-12)
    with torch.no_grad():  # and it does not grow while generating
        local(_ids(batch, 100), kv_cache=cache)
        local(_ids(batch, 1), kv_cache=cache)
    assert cache.nbytes() == (5 * window + max_len) * per_position


# --- training through the real trainer --------------------------------------------------------

def test_training_runs_with_document_mask_and_sliding_windows(tmp_path, tiny_corpus):
    import yaml

    from conftest import run_cli, tiny_run_dict, train_losses, write_config
    from lmforge.core.metrics_file import read_metrics

    attention = {"document_mask": True, "restart_positions": True, "sliding_window": 8, "global_every": 2}
    cfg = tiny_run_dict(tmp_path, tiny_corpus,
                        model={"attention": attention},
                        train={"steps": 6, "batch_size": 2, "seq_len": 32, "log_every": 1, "eval_every": 3,
                               "checkpoint_every": 6, "tensorboard": False})
    result = run_cli("train", str(write_config(tmp_path / "run.yaml", cfg)), "--no-report")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "tiny"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["attention"] == {**attention,
                                                                                     "rope_theta_local": None,
                                                                                     "kernel": "auto"}
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(x) for x in losses.values())
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "eval"]
    assert evals and all(math.isfinite(v) for r in evals for v in r["loss"].values())
    generated = run_cli("generate", str(run), "--prompt", "the king", "--max-new-tokens", "40")
    assert generated.returncode == 0, generated.stderr


def test_a_tokenizer_with_end_of_text_elsewhere_is_refused_under_document_masking(tmp_path, tiny_corpus):
    """Documents are told apart by id 0; a reused tokenizer with <|endoftext|> at id 1 would
    silently mask nothing, so the run stops with the key and the file named."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from conftest import run_cli, tiny_run_dict, write_config
    from lmforge.data.tokenizer import EOS

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the king and the queen"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|pad|>", EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "foreign.json"))
    assert tok.token_to_id(EOS) == 1
    cfg = tiny_run_dict(tmp_path, tiny_corpus, data={"tokenizer_from": str(tmp_path / "foreign.json")},
                        model={"attention": {"document_mask": True}}, train={"steps": 2})
    result = run_cli("train", str(write_config(tmp_path / "run.yaml", cfg)), "--no-report")
    assert result.returncode == 2, result.stderr
    assert "model.attention.document_mask" in result.stderr and "at id 1" in result.stderr, result.stderr
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


# --- export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, architecture", [
    ({"attention": {"sliding_window": 4, "global_every": 3}}, "MinistralForCausalLM"),
    ({"qk_norm": True, "attention": {"sliding_window": 4, "global_every": 3, "document_mask": True}},
     "Qwen3ForCausalLM"),
    ({"moe": {"n_experts": 4, "top_k": 2, "d_expert": 24}, "attention": {"sliding_window": 5}}, "MixtralForCausalLM"),
    ({"qk_norm": True, "moe": {"n_experts": 4, "top_k": 2, "every_n_layers": 2}, "attention": {"sliding_window": 5}},
     "Qwen3MoeForCausalLM"),
])
def test_export_writes_sliding_windows_that_transformers_applies(tmp_path, extra, architecture):
    transformers = pytest.importorskip("transformers")
    from lmforge.export.hf import export_hf

    from test_export_hf import _tokenizer

    model = _model(extra.pop("attention"), **{**extra, "max_seq_len": 32})
    summary = export_hf(model, model.cfg, _tokenizer(tmp_path), tmp_path / "hf")
    assert summary["architecture"] == architecture and summary["max_logit_difference"] < 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["sliding_window"] == model.cfg.attention.sliding_window
    if "layer_types" in config:
        expected = ["full_attention" if b.attn.window is None else "sliding_attention" for b in model.blocks]
        assert config["layer_types"] == expected
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(2, 30)
    with torch.no_grad():
        theirs = reloaded(ids).logits
        torch.testing.assert_close(theirs, model(ids).logits[..., :VOCAB], atol=1e-4, rtol=1e-4)
        plain = ModelConfig.from_dict({**model.cfg.to_dict(), "attention": {}}).build().eval()
        plain.load_state_dict(model.state_dict())
        assert (plain(ids).logits[..., :VOCAB] - theirs).abs().max() > 1e-3  # the window did take effect


@pytest.mark.parametrize("extra, message", [
    ({"attention": {"sliding_window": 4, "global_every": 2, "rope_theta_local": 100.0}},
     "model.attention.rope_theta_local"),
    ({"moe": {"n_experts": 4, "top_k": 2}, "attention": {"sliding_window": 4, "global_every": 2}},
     "model.attention.global_every"),
])
def test_export_refuses_attention_it_cannot_write(tmp_path, extra, message):
    pytest.importorskip("transformers")
    from lmforge.export.hf import ExportError, export_hf

    from test_export_hf import _tokenizer

    model = _model(extra.pop("attention"), **extra)
    with pytest.raises(ExportError, match=message):
        export_hf(model, model.cfg, _tokenizer(tmp_path), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
