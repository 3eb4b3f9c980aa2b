"""Causal self-attention with grouped-query heads, RoPE and optional QK-norm.

Attention itself is ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
where available). With grouped-query attention (GQA) several query heads share one
key/value head, which shrinks the KV cache by n_heads / n_kv_heads at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.config import ModelConfig
from lmforge.nn.norm import RMSNorm
from lmforge.nn.rope import RotaryEmbedding


class LayerKVCache:
    """Keys and values of one layer for positions already processed, preallocated."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k.shape[-2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def add_projections(module: nn.Module, cfg: ModelConfig) -> None:
    """Give ``module`` the q/k/v/o projections of grouped-query attention (no biases), under
    the parameter names checkpoints and the Hugging Face export rely on."""
    module.n_heads, module.n_kv_heads, module.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    module.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
    module.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
    module.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
    module.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        add_projections(self, cfg)
        # QK-norm keeps attention logits bounded, a common fix for loss spikes at scale.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding, cache: LayerKVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, start_pos), rope(k, start_pos)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
            if start_pos > 0:
                causal = False
                if t > 1:
                    # Query i sits at absolute position start_pos + i and may see keys <= it.
                    q_pos = torch.arange(start_pos, start_pos + t, device=x.device)[:, None]
                    mask = torch.arange(k.shape[-2], device=x.device)[None, :] <= q_pos
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
