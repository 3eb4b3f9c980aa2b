"""Export an lmforge checkpoint as a Hugging Face ``transformers`` model folder.

The lmforge Transformer was built to match standard architectures (RMSNorm, rotate-half
RoPE, SwiGLU, GQA, Mixtral-style renormalised top-k routing), so a checkpoint maps onto
an existing ``transformers`` class with no custom code:

| lmforge model                      | transformers class      |
|------------------------------------|-------------------------|
| dense                              | ``LlamaForCausalLM``    |
| dense, QK-norm                     | ``Qwen3ForCausalLM``    |
| MoE in every layer                 | ``MixtralForCausalLM``  |
| MoE with QK-norm (any MoE spacing) | ``Qwen3MoeForCausalLM`` |
| dense, sliding windows             | ``MinistralForCausalLM`` (``Qwen3ForCausalLM`` with QK-norm) |

Shared experts have no equivalent there and are refused, as are the speedrun options that
these classes cannot represent (``model.mlp_activation: relu2``, ``logit_softcap``,
``value_embeddings``, ``skip_connections``: :func:`unsupported_options`). Sliding windows
(``model.attention``) are written as transformers' ``sliding_window`` and per-layer
``layer_types`` (``sliding_attention`` / ``full_attention``), which mask as lmforge does (a
query sees the ``sliding_window`` most recent tokens, itself included); Mixtral and Qwen3-MoE
take one window for every layer, so an MoE model exports with windows only when every layer is
local. A separate RoPE base for local layers (``rope_theta_local``) has no equivalent in these
classes and is refused. Document masking does not change inference on one document (a prompt
with no end-of-text token after its first token), which is what transformers computes; on
packed inputs transformers attends across documents, so the probe that checks the export
holds no end-of-text token. The exported folder holds
``config.json``, safetensors weights and the tokenizer (``PreTrainedTokenizerFast``), loads
with ``AutoModelForCausalLM.from_pretrained``, and is checked after writing: its logits on a
probe batch must match lmforge's. It also holds ``lmforge_export.json``, the marker that lets
a later export with ``overwrite`` replace it (and nothing else).

The export is the model lmforge evaluates and samples from, token for token:

- Its vocabulary is the tokenizer's. lmforge pads its embedding rows for matmul speed but
  never scores or samples a padded id; the padded rows are left out, so a softmax over the
  exported logits (what ``transformers``, lm-evaluation-harness and servers compute) equals
  lmforge's.
- ``<|endoftext|>`` is the end-of-sequence token in ``config.json``, ``generation_config.json``
  and the tokenizer, so ``generate`` stops at the end of a document as ``lmforge generate``
  does. It is also the beginning-of-sequence token (in training every document follows one,
  and lmforge starts an empty prompt from it) and, in ``generation_config.json`` and the
  tokenizer only, the padding token: in ``config.json`` a ``pad_token_id`` would become the
  embedding's ``padding_idx``, whose row never receives a gradient when the export is
  fine-tuned.
- The tokenizer encodes ``<|endoftext|>`` written in text as plain characters, as lmforge's
  does (``split_special_tokens``): text cannot inject a document boundary.
- RoPE scaling (``model.rope_scaling``) is written as transformers' ``rope_parameters``
  (``rope_scaling`` in transformers 4): ``linear`` and ``yarn`` as those RoPE types (YaRN with
  its attention factor written out), and static NTK-aware scaling, which transformers has no
  type for (its ``dynamic`` type changes with the sequence length), as the larger
  ``rope_theta`` it amounts to. The probe then covers up to 64 positions, past the original
  context, so the check sees the scaled frequencies where they matter.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmforge.data.tokenizer import EOS, Tokenizer
from lmforge.export.folder import ExportError, check_target, finish, install, new_folder_beside
from lmforge.nn.attention import END_OF_TEXT_ID
from lmforge.nn.config import ModelConfig
from lmforge.nn.rope import ntk_theta, yarn_attention_factor

__all__ = ["ExportError", "export_hf", "hf_config", "hf_rope", "hf_sliding_window", "hf_state_dict",
           "unsupported_options"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # optional dependency
        raise ExportError("exporting to Hugging Face needs transformers: pip install 'lmforge[hf]'") from exc
    return transformers


def hf_config(cfg: ModelConfig, eos_id: int | None = None) -> Any:
    """The ``transformers`` config object for ``cfg`` (raises ExportError if none fits);
    ``eos_id``, the tokenizer's end-of-text id, is its beginning and end of sequence."""
    tf = _transformers()
    refused = unsupported_options(cfg)
    if refused:
        raise ExportError("no transformers Llama-family class represents " + "; ".join(refused)
                          + ": train without these options to export to Hugging Face")
    common = dict(
        vocab_size=cfg.vocab_size, bos_token_id=eos_id, eos_token_id=eos_id,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, **hf_rope(cfg),
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
    )
    moe = cfg.moe
    window, layer_types = hf_sliding_window(cfg)
    qwen_window = dict(use_sliding_window=window is not None, sliding_window=window)
    if moe is None:
        if cfg.qk_norm:
            return tf.Qwen3Config(intermediate_size=cfg.resolved_d_ff, layer_types=layer_types, **qwen_window,
                                  **common)
        if window is not None:
            return tf.MinistralConfig(intermediate_size=cfg.resolved_d_ff, sliding_window=window,
                                      layer_types=layer_types, **common)
        return tf.LlamaConfig(intermediate_size=cfg.resolved_d_ff, mlp_bias=False, **common)
    if window is not None and "full_attention" in layer_types:
        raise ExportError("model.attention.global_every: Mixtral and Qwen3-MoE take one sliding window for "
                          "every layer; an MoE model with global and local layers has no transformers equivalent")
    if moe.n_shared_experts:
        raise ExportError("MoE with shared experts has no transformers equivalent; export supports "
                          "Mixtral-style and Qwen3-MoE-style layers only")
    routing = dict(num_experts_per_tok=moe.top_k)
    if cfg.qk_norm:
        return tf.Qwen3MoeConfig(
            num_experts=moe.n_experts, moe_intermediate_size=cfg.d_expert, intermediate_size=cfg.resolved_d_ff,
            decoder_sparse_step=moe.every_n_layers, mlp_only_layers=[], norm_topk_prob=True,
            router_aux_loss_coef=moe.load_balance_weight, **qwen_window, **routing, **common,
        )
    if moe.every_n_layers != 1:
        raise ExportError("Mixtral has MoE in every layer; models with dense layers in between export "
                          "only with qk_norm (as Qwen3-MoE)")
    return tf.MixtralConfig(num_local_experts=moe.n_experts, intermediate_size=cfg.d_expert, sliding_window=window,
                            router_aux_loss_coef=moe.load_balance_weight, **routing, **common)


def unsupported_options(cfg: ModelConfig) -> list[str]:
    """The model options set in ``cfg`` that Llama, Qwen3, Ministral, Mixtral and Qwen3-MoE lack,
    as ``key (why)``; empty when the model exports."""
    refused = []
    if cfg.mlp_activation != "swiglu":
        refused.append(f"model.mlp_activation {cfg.mlp_activation!r} (their MLPs are gated SwiGLU)")
    if cfg.logit_softcap is not None:
        refused.append("model.logit_softcap (their logits are not capped)")
    if cfg.value_embeddings:
        refused.append("model.value_embeddings (their attention values come from the hidden state alone)")
    if cfg.skip_connections:
        refused.append("model.skip_connections (their blocks have no skips between layers)")
    return refused


def hf_sliding_window(cfg: ModelConfig) -> tuple[int | None, list[str] | None]:
    """``(sliding_window, layer_types)`` for transformers, or ``(None, None)`` without windows."""
    attention = cfg.attention
    if attention.sliding_window is None:
        return None, None
    if attention.rope_theta_local is not None:
        raise ExportError("model.attention.rope_theta_local: transformers' Llama-family classes have one RoPE base "
                          "for every layer; a model with a separate local base has no equivalent there")
    types = ["full_attention" if attention.window(i) is None else "sliding_attention" for i in range(cfg.n_layers)]
    return attention.sliding_window, types


def hf_rope(cfg: ModelConfig) -> dict[str, Any]:
    """The RoPE arguments of a transformers config: ``rope_theta`` and, for linear and YaRN
    scaling, ``rope_scaling`` (stored as ``rope_parameters`` by transformers 5)."""
    scaling = cfg.rope_scaling
    if scaling is None:
        return {"rope_theta": cfg.rope_theta}
    if scaling.kind == "ntk":  # static NTK-aware scaling is exactly a larger base
        return {"rope_theta": ntk_theta(cfg.rope_theta, scaling.factor, cfg.head_dim)}
    if scaling.kind == "linear":
        return {"rope_theta": cfg.rope_theta, "rope_scaling": {"rope_type": "linear", "factor": scaling.factor}}
    if scaling.kind == "yarn":
        return {"rope_theta": cfg.rope_theta, "rope_scaling": {
            "rope_type": "yarn", "factor": scaling.factor,
            "original_max_position_embeddings": scaling.original_max_seq_len,
            "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow,
            "attention_factor": float(yarn_attention_factor(scaling)),
        }}
    raise ExportError(f"model.rope_scaling.kind {scaling.kind!r} has no transformers equivalent")


def hf_state_dict(model: torch.nn.Module, cfg: ModelConfig, target_keys: set[str]) -> dict[str, torch.Tensor]:
    """lmforge tensors renamed (and, for fused expert layouts, stacked) to ``target_keys``;
    embedding and output rows cut to the real vocabulary (padded ids are never used)."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": ours["embed.weight"][: cfg.vocab_size],
                                    "model.norm.weight": ours["norm.weight"]}
    if "lm_head.weight" in target_keys:
        out["lm_head.weight"] = ours["lm_head.weight"][: cfg.vocab_size]
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = ours[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = ours[src + "mlp_norm.weight"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[dst + f"self_attn.{name}.weight"] = ours[src + f"attn.{name}.weight"]
        if cfg.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = ours[src + "attn.q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = ours[src + "attn.k_norm.weight"]
        if not cfg.is_moe_layer(i):
            for ours_name, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                out[dst + f"mlp.{hf_name}.weight"] = ours[src + f"mlp.{ours_name}.weight"]
            continue
        experts = range(cfg.moe.n_experts)  # type: ignore[union-attr]
        expert = lambda j, part: ours[src + f"mlp.experts.{j}.{part}.weight"]  # noqa: E731
        if dst + "mlp.experts.gate_up_proj" in target_keys:  # transformers >= 5: fused experts
            out[dst + "mlp.gate.weight"] = ours[src + "mlp.router.weight"]
            out[dst + "mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([expert(j, "gate"), expert(j, "up")]) for j in experts])
            out[dst + "mlp.experts.down_proj"] = torch.stack([expert(j, "down") for j in experts])
        elif dst + "block_sparse_moe.gate.weight" in target_keys:  # Mixtral, transformers 4
            out[dst + "block_sparse_moe.gate.weight"] = ours[src + "mlp.router.weight"]
            for j in experts:
                for part, w in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
                    out[dst + f"block_sparse_moe.experts.{j}.{w}.weight"] = expert(j, part)
        else:  # Qwen3-MoE, transformers 4
            out[dst + "mlp.gate.weight"] = ours[src + "mlp.router.weight"]
            for j in experts:
                for part in ("gate", "up", "down"):
                    out[dst + f"mlp.experts.{j}.{part}_proj.weight"] = expert(j, part)
    return out


def _wrap_tokenizer(tokenizer_json: Path, max_len: int) -> Any:
    tf = _transformers()
    return tf.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOS, bos_token=EOS,
                                      pad_token=EOS, split_special_tokens=True, model_max_length=max_len)


@torch.no_grad()
def export_hf(model: torch.nn.Module, cfg: ModelConfig, tokenizer_json: Path, out_dir: Path,
              overwrite: bool = False, atol: float = 1e-4) -> dict[str, Any]:
    """Write ``out_dir`` as a transformers model folder and verify it; return a summary.

    The folder is written under a temporary name beside ``out_dir`` and moved into place only
    after the reloaded model reproduces lmforge's logits, so a failed export leaves nothing
    behind. ``overwrite`` replaces only an earlier lmforge export (see :mod:`.folder`).
    """
    if cfg.family == "multimodal":
        raise ExportError("model family 'multimodal': the Hugging Face exporter supports text-only families (the "
                          "transformer family); a multimodal model's image vocabulary, patch projection or image "
                          "encoder has no transformers equivalent here. Use it with lmforge generate / lmforge eval")
    if cfg.family != "transformer":
        raise ExportError(f"model family {cfg.family!r} has no transformers equivalent; export writes the "
                          "transformer family (dense: Llama/Qwen3, MoE: Mixtral/Qwen3-MoE)")
    tf = _transformers()
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)  # before minutes of work, and again before the swap
    eos_id = Tokenizer.load(tokenizer_json).eos_id  # a missing or broken file is a DataError naming it
    config = hf_config(cfg, eos_id)
    hf = tf.AutoModelForCausalLM.from_config(config)
    hf.generation_config = tf.GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    target = hf.state_dict()
    tensors = hf_state_dict(model, cfg, set(target))
    missing, unexpected = set(target) - set(tensors), set(tensors) - set(target)
    if cfg.tie_embeddings:
        missing.discard("lm_head.weight")
    if missing or unexpected:
        raise ExportError(f"weight names do not line up with {type(hf).__name__} "
                          f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    hf.load_state_dict(tensors, strict=False)
    if cfg.tie_embeddings:
        hf.tie_weights()
    tmp = new_folder_beside(out_dir)
    try:
        with _quiet_progress(tf):
            hf.save_pretrained(tmp, safe_serialization=True)
            _wrap_tokenizer(tokenizer_json, cfg.max_seq_len).save_pretrained(tmp)
            reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp).eval()
        probe_len = min(16 if cfg.rope_scaling is None else 64, cfg.max_seq_len)
        if cfg.attention.sliding_window is not None:  # long enough to slide the window
            probe_len = min(max(probe_len, 2 * cfg.attention.sliding_window + 1), cfg.max_seq_len)
        probe = torch.randint(0, cfg.vocab_size, (2, probe_len), generator=torch.Generator().manual_seed(0))
        if cfg.attention.document_mask:  # one document: transformers attends across end-of-text tokens
            probe[probe == END_OF_TEXT_ID] = (END_OF_TEXT_ID + 1) % cfg.vocab_size
        ours = model.eval()(probe).logits[..., : cfg.vocab_size].float()
        theirs = reloaded(probe).logits.float()
        max_diff = float((ours - theirs).abs().max())
        if not max_diff <= atol:
            raise ExportError(f"exported {type(hf).__name__} does not reproduce lmforge's logits "
                              f"(max difference {max_diff:.3g} > {atol})")
        summary = {"architecture": type(hf).__name__, "max_logit_difference": max_diff,
                   "parameters": sum(p.numel() for p in reloaded.parameters())}
        if cfg.rope_scaling is not None:
            summary["rope"] = hf_rope(cfg)  # what model.rope_scaling became in config.json
        if cfg.attention.document_mask:
            summary["document_mask"] = ("not in config.json: transformers attends across end-of-text tokens; "
                                        "the same logits on one document")
        finish(tmp, summary)
        install(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "out_dir": str(out_dir)}


@contextlib.contextmanager
def _quiet_progress(tf: Any) -> Iterator[None]:
    """No progress bars from transformers while saving and reloading: logs stay one line per record."""
    was_enabled = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            tf.utils.logging.enable_progress_bar()
