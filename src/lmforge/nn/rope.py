"""Rotary position embeddings (RoPE), in the "rotate half" layout, with optional scaling.

Each head's vector is split into a first and a second half that rotate as pairs
(x_i, x_{i + d/2}). This is the layout Hugging Face Llama uses, so weights move between
the two without permuting query/key projections.

Pair i turns by ``position * inv_freq[i]`` with ``inv_freq[i] = theta^(-2i/d)``. RoPE scaling
(``model.rope_scaling``, :class:`~lmforge.nn.config.RopeScalingConfig`) changes those
frequencies so that a model trained at ``original_max_seq_len`` tokens runs at ``factor``
times that; the formulas are those of ``transformers`` (its "linear" and "yarn" RoPE types),
so an exported model computes the same angles:

- linear (position interpolation): ``inv_freq / factor``, i.e. position p is read as p / factor;
- ntk (NTK-aware, static): the base becomes ``theta * factor^(d / (d - 2))``, which keeps the
  highest frequency and divides the lowest by ``factor``;
- yarn: pairs that turn more than ``beta_fast`` times over the original context keep their
  frequency, pairs that turn fewer than ``beta_slow`` times are interpolated (``/ factor``),
  with a linear ramp over the pair index between; cos and sin are multiplied by the attention
  factor (0.1 ln(factor) + 1 by default), which multiplies attention logits by its square.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.nn.config import RopeScalingConfig


def default_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """``theta^(-2i/d)`` for the ``head_dim / 2`` rotating pairs (float32)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
    """The base of NTK-aware scaling: ``theta * factor^(d / (d - 2))``."""
    return theta * factor ** (head_dim / (head_dim - 2))


def yarn_attention_factor(scaling: RopeScalingConfig) -> float:
    """YaRN's cos/sin multiplier: the configured one, else 0.1 ln(factor) + 1 (1 at factor 1)."""
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


def yarn_ramp(head_dim: int, theta: float, original_max_seq_len: int, beta_fast: float,
              beta_slow: float) -> torch.Tensor:
    """Per pair: 0 keeps the frequency (extrapolation), 1 interpolates it, linear between.

    Pair i turns ``L / (2π) · theta^(-2i/d)`` times over the original context L; it turns
    ``r`` times at ``i(r) = d · ln(L / (2π r)) / (2 ln theta)``. The ramp runs from
    ``floor(i(beta_fast))`` to ``ceil(i(beta_slow))``, as in transformers.
    """
    def pair_turning(rotations: float) -> float:
        return head_dim * math.log(original_max_seq_len / (2 * math.pi * rotations)) / (2 * math.log(theta))

    low = max(math.floor(pair_turning(beta_fast)), 0)
    high = min(math.ceil(pair_turning(beta_slow)), head_dim - 1)
    if high == low:
        high += 0.001  # a one-step ramp instead of a division by zero
    pairs = torch.arange(head_dim // 2, dtype=torch.float32)
    return ((pairs - low) / (high - low)).clamp(0.0, 1.0)


def rope_frequencies(head_dim: int, theta: float,
                     scaling: RopeScalingConfig | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2], attention_factor)`` for plain or scaled RoPE."""
    if scaling is None:
        return default_inverse_frequencies(head_dim, theta), 1.0
    if scaling.kind == "linear":
        return default_inverse_frequencies(head_dim, theta) / scaling.factor, 1.0
    if scaling.kind == "ntk":
        if head_dim <= 2:
            raise ValueError(f"rope_scaling.kind 'ntk' needs head_dim > 2, got {head_dim}")
        return default_inverse_frequencies(head_dim, ntk_theta(theta, scaling.factor, head_dim)), 1.0
    if scaling.kind == "yarn":
        if scaling.original_max_seq_len is None:
            raise ValueError("rope_scaling.original_max_seq_len is required for kind 'yarn'")
        kept = default_inverse_frequencies(head_dim, theta)
        ramp = yarn_ramp(head_dim, theta, scaling.original_max_seq_len, scaling.beta_fast, scaling.beta_slow)
        inv_freq = kept * (1.0 - ramp) + (kept / scaling.factor) * ramp
        return inv_freq, yarn_attention_factor(scaling)
    raise ValueError(f"rope_scaling.kind: unknown kind {scaling.kind!r} (known: linear, ntk, yarn)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..max_seq_len-1; ``scaling`` None is plain RoPE."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0,
                 scaling: RopeScalingConfig | None = None):
        super().__init__()
        inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling)
        self.attention_factor = attention_factor
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [T, head_dim]
        cos, sin = angles.cos(), angles.sin()
        if attention_factor != 1.0:
            cos, sin = cos * attention_factor, sin * attention_factor
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotate ``x`` of shape [B, heads, T, head_dim] for positions start_pos..start_pos+T-1."""
        t = x.shape[-2]
        cos = self.cos[start_pos : start_pos + t].to(x.dtype)
        sin = self.sin[start_pos : start_pos + t].to(x.dtype)
        return apply_rotary(x, cos, sin)


class _RotaryFunction(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` in two passes over ``x``, forward and backward.

    Written out because autograd of the textbook form (negate a half, concatenate, two products,
    a sum) takes about five passes each way over q and k and keeps their copies; the backward of a
    rotation is the rotation the other way, so this one keeps nothing but the tables. Both halves
    of ``sin`` are equal (each angle serves a pair), which the half-wise updates rely on.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1.0), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """Rotate each pair (x1, x2) by +angle (``sign`` 1) or -angle (-1)."""
    half = x.shape[-1] // 2
    out = x * cos
    first, second, sin_half = x[..., :half], x[..., half:], sin[..., :half]
    out[..., :half].addcmul_(second, sin_half, value=-sign)
    out[..., half:].addcmul_(first, sin_half, value=sign)
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: ``x`` [..., T, head_dim] rotated by the angles whose ``cos`` / ``sin`` tables
    broadcast against it (rows = positions; both halves of a row equal, as the tables here are)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _RotaryFunction.apply(x, cos, sin)
    return _rotate(x, cos, sin, sign=1.0)
