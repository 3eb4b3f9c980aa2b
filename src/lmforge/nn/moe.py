"""Mixture-of-experts feed-forward: token-choice top-k routing, dropless.

Each token picks its k highest-scoring experts; every token reaches all k of them (no
capacity factor, so nothing is dropped). The router's softmax runs in fp32 because
small logit differences decide routing and bf16 rounds them away.

Auxiliary losses (their weights live in MoEConfig):
- Switch load balancing: n_experts * sum_i f_i * P_i, with f_i the share of token-slots
  sent to expert i and P_i the mean router probability of expert i. It equals 1 when
  routing is perfectly uniform and grows as load concentrates.
- Router z-loss (ST-MoE): mean(logsumexp(logits)^2), which keeps router logits small.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.nn.config import ModelConfig
from lmforge.nn.mlp import SwiGLU


def load_balance_loss(slot_fraction: torch.Tensor, mean_probability: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss; 1.0 for uniform routing."""
    return slot_fraction.numel() * (slot_fraction * mean_probability).sum()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.moe is not None
        self.n_experts, self.top_k = cfg.moe.n_experts, cfg.moe.top_k
        self.router = nn.Linear(cfg.d_model, self.n_experts, bias=False)
        # A list of 2-D weight matrices (not one 3-D tensor) so Muon can orthogonalise each.
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.d_expert) for _ in range(self.n_experts))
        self.shared_experts = nn.ModuleList(
            SwiGLU(cfg.d_model, cfg.d_expert) for _ in range(cfg.moe.n_shared_experts)
        )
        self.last_expert_load = torch.zeros(self.n_experts)
        self.last_tokens_per_expert = torch.zeros(self.n_experts, dtype=torch.long)
        self.last_load_balance_loss = torch.zeros(())
        self.last_z_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens).float()
        probs = logits.softmax(dim=-1)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)
        # Renormalise over the chosen k so each token's expert outputs are a weighted average.
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)

        out = torch.zeros_like(tokens)
        flat_experts = top_experts.flatten()                    # [N*k]
        flat_tokens = torch.arange(tokens.shape[0], device=x.device).repeat_interleave(self.top_k)
        flat_weights = top_probs.flatten()
        order = flat_experts.argsort(stable=True)               # group token-slots by expert
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        for expert, idx in zip(self.experts, order.split(counts.tolist())):
            if idx.numel() == 0:
                continue
            token_idx = flat_tokens[idx]
            expert_out = expert(tokens[token_idx]) * flat_weights[idx, None].to(tokens.dtype)
            out.index_add_(0, token_idx, expert_out)
        for shared in self.shared_experts:
            out = out + shared(tokens)

        slot_fraction = counts.float() / flat_experts.numel()
        self.last_load_balance_loss = load_balance_loss(slot_fraction, probs.mean(dim=0))
        self.last_z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.last_expert_load = slot_fraction.detach()
        self.last_tokens_per_expert = counts.detach()
        return out.view(shape)
