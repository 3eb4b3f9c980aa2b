"""RMSNorm: scale by the root-mean-square, no mean subtraction and no bias."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

# Under bf16 autocast the QK-norm's input is bf16 and its weight fp32; torch then takes its
# composite RMSNorm instead of the fused kernel (the same function) and prints a UserWarning on
# every run, which a user can do nothing about.
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
