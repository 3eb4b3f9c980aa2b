"""Size → shape: the one rule that turns a depth into a model shape.

Shared by the ladder (the ``sizes:`` section of a ladder config) and ``scaling plan`` (the
shape proposed for a planned parameter count), so the two cannot disagree:

    d_model  = head_dim · max(1, round(aspect_ratio · n_layers / head_dim)),
    n_heads  = d_model / head_dim,   n_kv_heads = n_heads / kv_group,
    d_ff     = ffn_ratio · d_model rounded up to a multiple of ffn_multiple   (SwiGLU hidden),
    d_expert = expert_ratio · d_model, same rounding (mixture of experts; unset: a ladder keeps
               its base config's d_expert, a plan uses d_ff).

The default aspect ratio d_model / n_layers = 128 is that of GPT-3 175B (12288 / 96) and
Llama 2 7B (4096 / 32). Kaplan et al. (2020, Fig. 5) found the loss at a fixed parameter
count changes only a few percent over a wide range of aspect ratios, so the rule matters
less than using the same rule everywhere. The default SwiGLU width 8/3·d_model rounded up
to a multiple of 64 is ``ModelConfig``'s own default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lmforge.core.config import Config
from lmforge.core.errors import ConfigError

DEFAULT_ASPECT_RATIO = 128.0


@dataclass
class ShapeRule(Config):
    """d_model from n_layers at a fixed aspect ratio, and the widths that follow from d_model."""

    aspect_ratio: float = DEFAULT_ASPECT_RATIO
    head_dim: int = 64
    ffn_ratio: float = 8.0 / 3.0
    ffn_multiple: int = 64
    kv_group: int = 1                     # query heads per key/value head (1: plain multi-head)
    expert_ratio: float | None = None     # MoE expert hidden size / d_model (see above)

    def __post_init__(self) -> None:
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2 (RoPE), got {self.head_dim}")
        if self.aspect_ratio <= 0 or self.ffn_ratio <= 0 or self.ffn_multiple < 1 or self.kv_group < 1:
            raise ValueError("aspect_ratio and ffn_ratio must be positive, ffn_multiple and kv_group >= 1")
        if self.expert_ratio is not None and self.expert_ratio <= 0:
            raise ValueError(f"expert_ratio must be positive, got {self.expert_ratio}")

    def d_model(self, n_layers: int) -> int:
        """The width that goes with ``n_layers`` under the aspect ratio (a multiple of head_dim)."""
        return self.head_dim * max(1, round(self.aspect_ratio * n_layers / self.head_dim))

    def round_hidden(self, d_model: int, ratio: float) -> int:
        """ratio·d_model rounded up to a multiple of ffn_multiple. The quotient is rounded to 6
        decimals first: 2.6666667·48 = 128.0000016 must give 128, not 144."""
        return math.ceil(round(ratio * d_model / self.ffn_multiple, 6)) * self.ffn_multiple

    def model_fields(self, d_model: int, n_layers: int) -> dict[str, Any]:
        """The ``ModelConfig`` fields this rule sets for a (d_model, n_layers) shape."""
        if d_model % self.head_dim:
            raise ConfigError(f"d_model {d_model} is not a multiple of head_dim {self.head_dim}")
        n_heads = d_model // self.head_dim
        if n_heads % self.kv_group:
            raise ConfigError(f"d_model {d_model} gives {n_heads} heads, not divisible by kv_group {self.kv_group}")
        return {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
                "n_kv_heads": n_heads // self.kv_group if self.kv_group > 1 else None,
                "d_ff": self.round_hidden(d_model, self.ffn_ratio)}

    def expert_hidden(self, d_model: int) -> int | None:
        """``MoEConfig.d_expert`` for this width; None without expert_ratio."""
        return None if self.expert_ratio is None else self.round_hidden(d_model, self.expert_ratio)
