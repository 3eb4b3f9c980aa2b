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


# torch's fused RMSNorm forward (one pass, and it returns 1/rms); on CPU torch has no fused
# backward, and autograd differentiates F.rms_norm through its composite formula instead.
_FUSED_FORWARD = getattr(torch.ops.aten, "_fused_rms_norm", None)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dimension with a hand-written backward (CPU).

    torch 2.13 has no CPU kernel for ``_fused_rms_norm_backward``, so autograd runs the composite
    formula's backward: about a dozen passes over the activations (pow, mean, rsqrt, div, ...).
    This backward takes six, keeping only the input and 1/rms from the forward:
    with x̂ = x / rms and g' = g * w: dx = (g' - x̂ * mean(g' * x̂)) / rms, dw = Σ g * x̂.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        y, inverse_rms = _FUSED_FORWARD(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, inverse_rms)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, inverse_rms = ctx.saved_tensors
        normalized = x * inverse_rms
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normalized).reshape(-1, x.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            scaled = grad * weight
            mean = (scaled * normalized).mean(-1, keepdim=True)
            grad_x = scaled.addcmul_(normalized, mean, value=-1).mul_(inverse_rms)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm`` over the last dimension; on CPU, when it trains, with the faster backward of
    :class:`_RMSNormFunction` (same function: tests/test_speed_options.py)."""
    if (x.device.type == "cpu" and _FUSED_FORWARD is not None and x.dtype == weight.dtype
            and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _RMSNormFunction.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
