"""Model configuration: a dense or mixture-of-experts decoder-only Transformer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmforge.core.config import Config

if TYPE_CHECKING:
    from lmforge.nn.transformer import Transformer


@dataclass
class MoEConfig(Config):
    n_experts: int = 4
    top_k: int = 2
    d_expert: int | None = None        # hidden size of each expert; None -> the dense d_ff. Smaller = fine-grained experts
    n_shared_experts: int = 0          # experts every token passes through (DeepSeekMoE-style)
    load_balance_weight: float = 0.01  # weight of the Switch load-balancing loss
    z_loss_weight: float = 0.001       # weight of the router z-loss
    every_n_layers: int = 1            # MoE in layers i with i % every_n_layers == every_n_layers - 1

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ValueError("moe.n_experts must be >= 1")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"moe.top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.d_expert is not None and self.d_expert < 1:
            raise ValueError("moe.d_expert must be >= 1")
        if self.n_shared_experts < 0 or self.every_n_layers < 1:
            raise ValueError("moe.n_shared_experts must be >= 0 and moe.every_n_layers >= 1")


@dataclass
class ModelConfig(Config):
    family: str = "transformer"        # the model family (nn/families.py): transformer (dense/MoE), retro, ...
    vocab_size: int = 4096
    pad_vocab_to_multiple: int = 64    # embedding rows padded up for matmul efficiency; padded ids are never targets
    max_seq_len: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None      # grouped-query attention; None -> n_heads (plain multi-head)
    d_ff: int | None = None            # SwiGLU hidden size; None -> 8/3 d_model rounded up to a multiple of 64
    qk_norm: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        built_here = type(self).__dataclass_fields__["family"].default  # type: ignore[attr-defined]
        if self.family != built_here:
            raise ValueError(f"family {self.family!r} is not built by {type(self).__name__} (family {built_here!r}); "
                             "load model configs through lmforge.nn.families.model_config_from_dict")
        for key in ("vocab_size", "pad_vocab_to_multiple", "max_seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (d_model / n_heads = {self.head_dim}) must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to_multiple) * self.pad_vocab_to_multiple

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return math.ceil(8 * self.d_model / 3 / 64) * 64

    @property
    def d_expert(self) -> int:
        return (self.moe.d_expert if self.moe and self.moe.d_expert else None) or self.resolved_d_ff

    def is_moe_layer(self, index: int) -> bool:
        return self.moe is not None and index % self.moe.every_n_layers == self.moe.every_n_layers - 1

    def build(self) -> "Transformer":
        from lmforge.nn.transformer import Transformer

        return Transformer(self)
