"""``model_card.json``: what the model is, how big, how much compute per token."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.core.io import atomic_write_json
from lmforge.nn.counting import ParameterCounts
from lmforge.train.config import RunConfig


def describe_architecture(cfg: RunConfig) -> str:
    m = cfg.model
    kv = m.n_kv_heads or m.n_heads
    parts = [
        f"decoder-only Transformer, {m.n_layers} layers, d_model {m.d_model}, "
        f"{m.n_heads} heads ({kv} key/value heads), RMSNorm, RoPE, SwiGLU"
    ]
    if m.qk_norm:
        parts.append("QK-norm")
    parts.append("tied embeddings" if m.tie_embeddings else "untied embeddings")
    if m.moe is not None:
        parts.append(
            f"MoE: {m.moe.n_experts} experts, top-{m.moe.top_k}, {m.moe.n_shared_experts} shared, "
            f"every {m.moe.every_n_layers} layer(s)"
        )
    return "; ".join(parts)


DECODER_FLOPS_FORMULA = "6*N_active(non-embedding + lm head) + 12*n_layers*n_heads*head_dim*seq_len"


def _flops_formula(family: str) -> str:
    """How flops_per_token was counted: the decoder's formula, plus what a family adds (its own counting)."""
    if family == "transformer":
        return DECODER_FLOPS_FORMULA
    return f"{DECODER_FLOPS_FORMULA}, plus the {family!r} family's own modules (its registered FLOP counting)"


def write_model_card(
    run_dir: Path,
    cfg: RunConfig,
    counts: ParameterCounts,
    flops_per_token: int,
    device: torch.device,
    peak: float,
    peak_source: str,
    tokens_trained: int,
) -> None:
    atomic_write_json(run_dir / "model_card.json", {
        "name": cfg.name,
        "architecture": describe_architecture(cfg),
        "params": {
            "total": counts.total,
            "active": counts.active,
            "embedding": counts.embedding,
            "non_embedding": counts.non_embedding,
        },
        "flops_per_token": flops_per_token,
        "flops_per_token_formula": _flops_formula(cfg.model.family),
        "seq_len": cfg.train.seq_len,
        "vocab_size": cfg.model.vocab_size,
        "moe": cfg.model.moe.to_dict() if cfg.model.moe else None,
        "tokens_planned": cfg.train.steps * cfg.train.tokens_per_step,
        "tokens_trained": tokens_trained,
        "device": str(device),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
    })
