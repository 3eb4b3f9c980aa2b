"""Rotary position embeddings (RoPE), in the "rotate half" layout.

Each head's vector is split into a first and a second half that rotate as pairs
(x_i, x_{i + d/2}). This is the layout Hugging Face Llama uses, so weights move between
the two without permuting query/key projections.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [T, head_dim]
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotate ``x`` of shape [B, heads, T, head_dim] for positions start_pos..start_pos+T-1."""
        t = x.shape[-2]
        cos = self.cos[start_pos : start_pos + t].to(x.dtype)
        sin = self.sin[start_pos : start_pos + t].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
        return x * cos + rotated * sin
