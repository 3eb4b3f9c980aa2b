"""Mixture-of-experts feed-forward: token-choice top-k routing, dropless.

Each token picks its k highest-scoring experts; every token reaches all k of them (no
capacity factor, so nothing is dropped). The router runs in fp32, its matmul too (outside
autocast), because small logit differences decide routing and bf16 rounds them away.

The router's logits are computed as [experts, tokens]; the token-slots are sorted by expert once,
gathered once, and weighted and scattered back to their tokens by one hand-written node
(:class:`WeightedCombine`); in between, ``moe.expert_compute`` picks how the experts' contiguous
runs of rows are multiplied:

- ``grouped_mm``: ``torch._grouped_mm``, all experts in one call (the grouped kernel MoE training
  uses on recent GPUs; on CPU torch 2.13 runs it as a slow reference, ~15x slower here);
- ``batched``: every expert's run padded to the longest (:func:`run_lengths`), so the gathered
  rows are one [experts, rows, d_model] block: one ``torch.bmm`` each for gate, up and down,
  forward and backward; padding rows read token 0 with weight 0;
- ``loop``: each run through its expert's ``SwiGLU`` (one matmul call per expert and weight, on
  a contiguous slice: no per-expert gather or scatter);
- ``auto``: ``grouped_mm`` for bf16 on CUDA; on CPU ``batched`` in bf16/fp16 for small experts
  (``BATCHED_MAX_MATRIX``; ``loop`` for a step whose load is too uneven to pad every run to the
  longest, :func:`auto_layout`), ``loop`` for larger experts and in fp32. A CPU bf16 matmul call
  has a fixed cost before any arithmetic (oneDNN's), which 4 experts' 9 calls each pay 4 times
  and ``batched``'s 9 calls once: the whole layer 6-10% faster than ``loop`` at 4 experts of
  128 x 192 in bf16, 18-25% at 16 and 64 experts; at 512 x 768 the calls are large, the padding
  costs more than they do and ``loop`` is faster; in fp32 ``loop`` is ~4% faster.
  ``bench/moe_layer.py --kernel``, docs/benchmarks.md.

On CPU in bf16, each expert's run is padded to a multiple of ``moe.expert_rows_multiple`` rows
(64 by default) so that the matmul shapes repeat from step to step: see :func:`padded_runs`.

The weights stay one ``SwiGLU`` (three 2-D matrices) per expert, so checkpoints, the Hugging
Face export and Muon (which orthogonalises each 2-D matrix) see the same parameters whatever
the kernel; the grouped kernels stack them per call (a copy of the expert weights, small
next to the activations).

Auxiliary losses (their weights live in MoEConfig):
- Switch load balancing: n_experts * sum_i f_i * P_i, with f_i the share of token-slots
  sent to expert i and P_i the mean router probability of expert i. It equals 1 when
  routing is perfectly uniform and grows as load concentrates.
- Router z-loss (ST-MoE): mean(logsumexp(logits)^2), which keeps router logits small.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.config import ModelConfig
from lmforge.nn.mlp import SwiGLU


def load_balance_loss(slot_fraction: torch.Tensor, mean_probability: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss; 1.0 for uniform routing."""
    return slot_fraction.numel() * (slot_fraction * mean_probability).sum()


# The largest expert matrix (d_model x d_expert) for which ``auto`` batches the experts on CPU in bf16:
# each call's fixed cost matters while the matmuls are small, the padding to the longest run once
# they are large (bench/moe_layer.py --kernel loop, batched / loop: 0.91-0.94 at 128 x 192, 0.96 at
# 256 x 384, 1.11 at 512 x 768; docs/benchmarks.md).
BATCHED_MAX_MATRIX = 2**17


def expert_kernel(choice: str, device: torch.device, dtype: torch.dtype = torch.float32,
                  widths: tuple[int, ...] = ()) -> str:
    """The kernel ``moe.expert_compute`` resolves to: ``auto`` is ``grouped_mm`` for bf16 on CUDA
    with every width a multiple of 16 (the kernel's alignment), ``batched`` on CPU in bf16/fp16
    for experts of at most ``BATCHED_MAX_MATRIX`` weights per matrix (``widths``: d_model and
    d_expert; fewer matmul calls, each with a fixed cost, see the module), else ``loop``."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and dtype == torch.bfloat16 and all(w % 16 == 0 for w in widths):
        return "grouped_mm"
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and math.prod(widths) <= BATCHED_MAX_MATRIX:
        return "batched"
    return "loop"


def row_multiple(choice: int | None, device: torch.device, kernel: str, dtype: torch.dtype = torch.float32) -> int:
    """The multiple ``moe.expert_rows_multiple`` resolves to (the ``loop`` and ``batched`` kernels;
    ``grouped_mm`` takes runs of any length): None is 64 on CPU in bf16/fp16 (where a new shape
    costs a kernel build), 1 (no padding) elsewhere; an fp32 matmul of a new shape costs nothing
    extra here (bench/matmul_shapes.py)."""
    if kernel not in ("loop", "batched"):
        return 1
    if choice is not None:
        return choice
    return 64 if device.type == "cpu" and dtype != torch.float32 else 1


def padded_runs(slot_tokens: torch.Tensor, slot_weights: torch.Tensor, slot_experts: torch.Tensor,
                counts: torch.Tensor, run_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's run of sorted slots padded from ``counts`` to ``run_lengths`` rows.

    On CPU, oneDNN builds (and caches by shape) a kernel for every new bf16 matrix shape: a matmul
    whose row count was not seen before costs ~20x one that was (1.34 ms against 0.065 ms for
    1,024 x 128 @ 128 x 192 on an AMX Xeon, bench/matmul_shapes.py), and each expert's row count
    changes every step. Padded to a multiple (:func:`run_lengths`), the shapes repeat and stay
    cached. The padding slots read token 0 and carry weight 0, so they add exact zeros to its
    output and pass zero gradients to the experts' weights. ``slot_experts``: the expert of each
    sorted slot. Returns the padded slot tokens and slot weights.
    """
    starts = counts.cumsum(0) - counts
    padded_starts = run_lengths.cumsum(0) - run_lengths
    destination = (torch.arange(slot_tokens.numel(), device=counts.device) - starts[slot_experts]
                   + padded_starts[slot_experts])
    total = int(run_lengths.sum())
    tokens = slot_tokens.new_zeros(total).index_copy_(0, destination, slot_tokens)
    weights = slot_weights.new_zeros(total, *slot_weights.shape[1:]).index_copy(0, destination, slot_weights)
    return tokens, weights


def run_lengths(counts: torch.Tensor, multiple: int, kernel: str) -> torch.Tensor:
    """Rows of each expert's run: its slots rounded up to ``multiple``; for the ``batched`` kernel
    every run as long as the longest (the experts' rows as one [experts, rows, d_model] block)."""
    lengths = counts if multiple == 1 else (counts + multiple - 1) // multiple * multiple
    return torch.full_like(counts, int(lengths.max())) if kernel == "batched" else lengths


# What ``auto``'s batched block may add, in rows per expert, over the loop's padded runs before the
# step falls back to the loop: about what one expert's 9 separate bf16 matmul calls cost on the
# CPU measured (batched pays for its padding rows, the loop for its calls; bench/moe_layer.py
# --kernel loop: batched faster at 4, 16 and 64 experts with the block 1.03-2x the slots).
BATCHED_ALLOWANCE_ROWS = 256
# Fewer slots than this per expert on average (a few tokens: decoding, a tiny batch) and ``auto``
# takes the loop: the block would be mostly padding, and stacking every expert's weights for it
# costs more than the few small calls it saves.
BATCHED_MIN_SLOTS_PER_EXPERT = 64


def auto_layout(counts: torch.Tensor, multiple: int) -> tuple[str, torch.Tensor]:
    """``auto``'s CPU bf16 choice for one step: ``batched`` unless the step has few slots per expert
    or the router's load is so uneven that padding every run to the longest would cost more rows
    than the loop's calls (a router sending most tokens to a few experts: early in training, or
    collapsing), then ``loop``."""
    loop = run_lengths(counts, multiple, "loop")
    if int(counts.sum()) < BATCHED_MIN_SLOTS_PER_EXPERT * counts.numel():
        return "loop", loop
    batched = run_lengths(counts, multiple, "batched")
    if int(batched.sum()) <= int(loop.sum()) + BATCHED_ALLOWANCE_ROWS * counts.numel():
        return "batched", batched
    return "loop", loop


class WeightedCombine(torch.autograd.Function):
    """``out[t] = sum of weights[s] * rows[s]`` over the slots ``s`` of token ``t``: the experts'
    outputs weighted and scattered back to their tokens, forward and backward by hand.

    ``runs``: the experts' outputs, one tensor per run of sorted slots (``slot_tokens``, ``weights``:
    those slots' tokens and fp32 router weights, in the same order). Written by hand, not left to
    autograd, because autograd of ``cat(runs) * weights`` and ``index_add_`` concatenates the runs, and
    under bf16 autocast multiplies bf16 rows by fp32 weights into an fp32 copy of all slots, casts
    its gradient back and computes the router weights' gradient as a mixed-precision product and a
    sum: here the runs stay separate and in their own dtype, and each slot's weight gradient is one
    multiply-and-sum (``bench/moe_layer.py``, with the router on [experts, tokens]: routing, dispatch
    and combine ~40% cheaper in bf16, ~20% in fp32; docs/benchmarks.md).

    Precision under bf16 autocast: the combined output is bf16, as a dense feed-forward's down
    projection is, so its incoming gradient arrives in bf16 too, and the weight gradient multiplies
    it with the bf16 run in bf16 and sums in fp32. That rounds the router's gradient at bf16's
    ~0.2%, the size of the error the experts' bf16 matmuls already put in the outputs it multiplies
    (keeping that gradient in fp32 gave back most of the bf16 gain in a scratch A/B); the layer's
    gradients against a float64 reference are tested in tests/test_speed_options.py.
    """

    @staticmethod
    def forward(ctx, slot_tokens: torch.Tensor, weights: torch.Tensor, n_tokens: int,  # type: ignore[override]
                *runs: torch.Tensor) -> torch.Tensor:
        cast = weights.to(runs[0].dtype)[:, None]
        sizes = [run.shape[0] for run in runs]
        out = runs[0].new_zeros(n_tokens, runs[0].shape[1])
        for tokens, weight, run in zip(slot_tokens.split(sizes), cast.split(sizes), runs):
            out.index_add_(0, tokens, run * weight)
        ctx.save_for_backward(slot_tokens, cast, *runs)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        slot_tokens, cast, *runs = ctx.saved_tensors
        slot_grads = grad.to(cast.dtype).index_select(0, slot_tokens).split(ctx.sizes)
        weight_grad = None
        if ctx.needs_input_grad[1]:
            weight_grad = torch.cat([(g * run).sum(dim=-1, dtype=torch.float32) for g, run in zip(slot_grads, runs)])
        run_grads = [g * weight if ctx.needs_input_grad[3 + i] else None
                     for i, (g, weight) in enumerate(zip(slot_grads, cast.split(ctx.sizes)))]
        return None, weight_grad, None, *run_grads


class SlotLayout(NamedTuple):
    """Where :meth:`MoE.route` sends the token-slots, sorted by expert."""

    slot_tokens: torch.Tensor    # the token of each sorted slot (padding slots: token 0)
    slot_weights: torch.Tensor   # its router weight, fp32 (padding slots: 0)
    counts: torch.Tensor         # real slots per expert
    run_lengths: torch.Tensor    # rows of each expert's run (``counts``, padded where asked)
    kernel: str                  # what ``moe.expert_compute`` resolved to
    compute_dtype: torch.dtype   # the experts' dtype (autocast's where it is on)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.moe is not None
        self.n_experts, self.top_k = cfg.moe.n_experts, cfg.moe.top_k
        self.expert_compute = cfg.moe.expert_compute
        self.expert_rows_multiple = cfg.moe.expert_rows_multiple
        self.router = nn.Linear(cfg.d_model, self.n_experts, bias=False)
        # A list of 2-D weight matrices (not one 3-D tensor) so Muon can orthogonalise each.
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.d_expert) for _ in range(self.n_experts))
        self.shared_experts = nn.ModuleList(
            SwiGLU(cfg.d_model, cfg.d_expert) for _ in range(cfg.moe.n_shared_experts)
        )
        self.last_expert_load = torch.zeros(self.n_experts)
        self.last_tokens_per_expert = torch.zeros(self.n_experts, dtype=torch.long)
        self.last_top_experts = torch.zeros(0, self.top_k, dtype=torch.long)  # [tokens, k] of the last forward
        self.last_load_balance_loss = torch.zeros(())
        self.last_z_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        return self.compute(tokens, self.route(tokens)).view(shape)

    def route(self, tokens: torch.Tensor) -> SlotLayout:
        """Router, top-k and the slots sorted by expert (padded where ``moe.expert_rows_multiple``
        asks, and for ``batched`` every run to the longest); sets the auxiliary losses and the
        routing statistics of this forward."""
        n_tokens = tokens.shape[0]
        # The router's logits as [experts, tokens]: the softmax, top-k and logsumexp then reduce across
        # contiguous rows of tokens instead of over a last dimension of a few experts, where torch's CPU
        # kernels are slow (docs/benchmarks.md, "the MoE's router and combine by hand").
        with torch.autocast(tokens.device.type, enabled=False):
            logits = torch.mm(self.router.weight.float(), tokens.float().t())
        log_normaliser = torch.logsumexp(logits, dim=0)
        top_logits, top_experts = logits.topk(self.top_k, dim=0)         # [k, tokens]
        # The k chosen experts' weights, renormalised to sum to 1: the softmax over their logits alone.
        top_weights = top_logits.softmax(dim=0)

        flat_experts = top_experts.flatten()                    # slot j * tokens + t: token t's j-th choice
        order = flat_experts.argsort(stable=True)               # group token-slots by expert
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        slot_tokens = order % n_tokens                          # the token of each sorted slot
        slot_weights = top_weights.flatten()[order]
        autocast = torch.is_autocast_enabled(tokens.device.type)
        compute_dtype = torch.get_autocast_dtype(tokens.device.type) if autocast else tokens.dtype
        kernel = expert_kernel(self.expert_compute, tokens.device, compute_dtype,
                               (tokens.shape[-1], self.experts[0].gate.out_features))
        multiple = row_multiple(self.expert_rows_multiple, tokens.device, kernel, compute_dtype)
        if kernel == "batched" and self.expert_compute == "auto":
            kernel, lengths = auto_layout(counts, multiple)
        else:
            lengths = run_lengths(counts, multiple, kernel)
        if kernel == "batched" or multiple > 1:  # (no comparison of lengths and counts: a host sync on GPU)
            slot_experts = flat_experts[order]                  # the expert of each sorted slot
            slot_tokens, slot_weights = padded_runs(slot_tokens, slot_weights, slot_experts, counts, lengths)

        slot_fraction = counts.float() / flat_experts.numel()
        mean_probability = (logits - log_normaliser).exp().mean(dim=1)
        self.last_load_balance_loss = load_balance_loss(slot_fraction, mean_probability)
        self.last_z_loss = log_normaliser.pow(2).mean()
        self.last_expert_load = slot_fraction.detach()
        self.last_tokens_per_expert = counts.detach()
        self.last_top_experts = top_experts.t()
        return SlotLayout(slot_tokens, slot_weights, counts, lengths, kernel, compute_dtype)

    def compute(self, tokens: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
        """The routed tokens through their experts, weighted and combined back (plus the shared
        experts): [tokens, d_model] in the tokens' dtype."""
        # index_select, not tensor[index]: its backward is index_add_, not a slower accumulating
        # index_put_. Under autocast the tokens are cast once, before the gather (half the bytes
        # gathered; the experts' matmuls then need no cast of their own).
        rows = tokens.to(layout.compute_dtype).index_select(0, layout.slot_tokens)
        if layout.kernel == "loop":
            runs = [expert(run) for expert, run in zip(self.experts, rows.split(layout.run_lengths.tolist()))]
        elif layout.kernel == "batched":
            runs = [self._batched(rows, layout.compute_dtype)]
        else:
            runs = [self._grouped(rows, layout.counts, layout.kernel, layout.compute_dtype)]
        out = WeightedCombine.apply(layout.slot_tokens, layout.slot_weights, tokens.shape[0], *runs).to(tokens.dtype)
        for shared in self.shared_experts:
            out = out + shared(tokens)
        return out

    def _stacked(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate and up [E, d_model, d_expert], down [E, d_expert, d_model], in ``dtype`` (autocast
        does not reach the weights of a stacked, hand-called matmul)."""
        return tuple(torch.stack([getattr(e, name).weight for e in self.experts]).transpose(1, 2).to(dtype)
                     for name in ("gate", "up", "down"))  # type: ignore[return-value]

    def _batched(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The runs, all of one length (:func:`run_lengths`), as one [experts, rows, d_model] block:
        one ``torch.bmm`` for gate, up and down each, forward and backward, in ``dtype``."""
        gate, up, down = self._stacked(dtype)
        block = rows.view(self.n_experts, rows.shape[0] // self.n_experts, rows.shape[-1])  # no -1: 0 rows too
        out = torch.bmm(F.silu(torch.bmm(block, gate)) * torch.bmm(block, up), down)
        return out.view(rows.shape[0], rows.shape[-1])

    def _grouped(self, rows: torch.Tensor, counts: torch.Tensor, kernel: str, dtype: torch.dtype) -> torch.Tensor:
        """Sorted rows [N*k, d] through their experts with ``torch._grouped_mm``, computed in ``dtype``
        (the autocast dtype when autocast is on)."""
        if kernel != "grouped_mm":
            raise ValueError(f"moe.expert_compute: unknown kernel {kernel!r} (known: auto, batched, grouped_mm, loop)")
        gate, up, down = self._stacked(dtype)
        offsets = counts.cumsum(0).to(torch.int32)
        hidden = F.silu(torch._grouped_mm(rows, gate, offs=offsets)) * torch._grouped_mm(rows, up, offs=offsets)
        return torch._grouped_mm(hidden, down, offs=offsets)
