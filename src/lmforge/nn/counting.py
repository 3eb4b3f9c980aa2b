"""Exact parameter and FLOP counts from a ModelConfig alone (no model is built).

These feed the model card, MFU and scaling-law fits. Tests check them against
``sum(p.numel())`` of built models.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.nn.config import ModelConfig


@dataclass(frozen=True)
class ParameterCounts:
    total: int          # every stored parameter (a tied embedding counted once)
    active: int         # parameters one token passes through: shared + its top_k routed experts
    embedding: int      # token embedding rows, padding included (with value embeddings: their tables too)
    lm_head: int        # output head when untied (0 when tied: it is the embedding)
    non_embedding: int  # total - embedding - lm_head


def _swiglu(d_model: int, d_hidden: int) -> int:
    return 3 * d_model * d_hidden


def _dense_feed_forward(cfg: ModelConfig) -> int:
    matrices = 2 if cfg.mlp_activation == "relu2" else 3  # ReLU²: up, down; SwiGLU: gate, up, down
    return matrices * cfg.d_model * cfg.resolved_d_ff


def _layer_counts(cfg: ModelConfig, index: int) -> tuple[int, int]:
    """(total, active) parameters of block ``index``."""
    attention = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    if cfg.qk_norm:
        attention += 2 * cfg.head_dim
    norms = 2 * cfg.d_model
    if not cfg.is_moe_layer(index):
        dense = attention + norms + _dense_feed_forward(cfg)
        return dense, dense
    moe = cfg.moe
    assert moe is not None
    expert = _swiglu(cfg.d_model, cfg.d_expert)
    shared = attention + norms + cfg.d_model * moe.n_experts + moe.n_shared_experts * expert
    return shared + moe.n_experts * expert, shared + moe.top_k * expert


def count_parameters(cfg: ModelConfig) -> ParameterCounts:
    embedding = cfg.padded_vocab_size * cfg.d_model
    lm_head = 0 if cfg.tie_embeddings else embedding
    # Value embeddings are lookups (no matmul), so they count with the embedding, out of the FLOPs.
    embedding += cfg.n_layers * cfg.padded_vocab_size * cfg.kv_heads * cfg.head_dim if cfg.value_embeddings else 0
    layers = [_layer_counts(cfg, i) for i in range(cfg.n_layers)]
    skips = cfg.n_layers // 2 if cfg.skip_connections else 0  # one learned weight per skip
    body_total = sum(t for t, _ in layers) + cfg.d_model + skips  # + final norm
    body_active = sum(a for _, a in layers) + cfg.d_model + skips
    total = embedding + lm_head + body_total
    return ParameterCounts(
        total=total,
        active=embedding + lm_head + body_active,
        embedding=embedding,
        lm_head=lm_head,
        non_embedding=body_total,
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward).

        FLOPs/token = 6 * N + 12 * n_layers * n_heads * head_dim * seq_len

    N is the active non-embedding parameter count plus the LM-head matrix
    (d_model * padded_vocab, counted even when tied, because its matmul is real compute;
    the embedding lookup is not). The router counts in N. The second term is attention's
    QK^T and AV matmuls (2 matmuls * 2 FLOPs per multiply-add * 3 for forward+backward),
    without discounting the causal mask, as in PaLM (Chowdhery et al. 2022, appendix B).
    A local layer (``model.attention.sliding_window`` W) counts min(W, seq_len) keys instead of
    seq_len, the same convention for a query that sees at most W keys.
    """
    counts = count_parameters(cfg)
    n = counts.active - counts.embedding - counts.lm_head + cfg.d_model * cfg.padded_vocab_size
    keys = sum(min(cfg.attention.window(i) or seq_len, seq_len) for i in range(cfg.n_layers))
    return 6 * n + 12 * cfg.n_heads * cfg.head_dim * keys
