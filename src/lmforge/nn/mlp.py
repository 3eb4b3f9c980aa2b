"""Dense feed-forward blocks (``model.mlp_activation``).

- ``swiglu``: ``down(silu(gate(x)) * up(x))`` (Shazeer 2020), three matrices; Llama's MLP.
- ``relu2``: ``down(relu(up(x))²)`` (So et al. 2021, "Primer"; the modded-nanogpt speedrun), two
  matrices: at equal parameters it is 1.5x as wide as SwiGLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_hidden, bias=False)
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ReLUSquared(nn.Module):
    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


def feed_forward(d_model: int, d_hidden: int, activation: str) -> nn.Module:
    """The dense feed-forward block ``model.mlp_activation`` names."""
    if activation == "swiglu":
        return SwiGLU(d_model, d_hidden)
    if activation == "relu2":
        return ReLUSquared(d_model, d_hidden)
    raise ValueError(f"model.mlp_activation: unknown {activation!r} (known: swiglu, relu2)")

