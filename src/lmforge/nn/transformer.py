"""Decoder-only Transformer: embeddings → pre-norm blocks (attention, MLP or MoE) → head."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.attention import Attention, LayerKVCache
from lmforge.nn.config import ModelConfig
from lmforge.nn.mlp import SwiGLU
from lmforge.nn.moe import MoE
from lmforge.nn.norm import RMSNorm
from lmforge.nn.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    moe_metrics: dict[str, Any] = field(default_factory=dict)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(index) else SwiGLU(cfg.d_model, cfg.resolved_d_ff)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cache: LayerKVCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, start_pos)
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """Per-layer key/value caches for incremental decoding."""

    def __init__(self, model: "Transformer", batch: int, max_len: int | None = None):
        cfg = model.cfg
        param = next(model.parameters())
        max_len = max_len or cfg.max_seq_len
        self.layers = [
            LayerKVCache(batch, cfg.kv_heads, max_len, cfg.head_dim, param.device, param.dtype)
            for _ in range(cfg.n_layers)
        ]
        self.length = 0


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one matrix reads and writes tokens
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual branches add up over 2 * n_layers sublayers; scaling their output
        # projections by 1/sqrt(2 * n_layers) keeps the residual stream's variance flat in depth.
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith("o_proj") or name.endswith("down")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_out else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> ModelOutput:
        start_pos = kv_cache.length if kv_cache is not None else 0
        if start_pos + input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + input_ids.shape[1]} tokens exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, self.rope, kv_cache.layers[i] if kv_cache is not None else None, start_pos)
        if kv_cache is not None:
            kv_cache.length = start_pos + input_ids.shape[1]
        return self.output(x, targets)

    def output(self, x: torch.Tensor, targets: torch.Tensor | None) -> ModelOutput:
        """Final norm, LM head, the loss (fp32, when targets are given) and MoE auxiliary losses."""
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            logits = logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        aux_loss, metrics = self._moe_losses(logits.device)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, moe_metrics=metrics)

    def _moe_losses(self, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
        layers = self.moe_layers()
        if not layers:
            return torch.zeros((), device=device), {}
        moe = self.cfg.moe
        assert moe is not None
        balance = torch.stack([layer.last_load_balance_loss for layer in layers])
        z_loss = torch.stack([layer.last_z_loss for layer in layers])
        aux = moe.load_balance_weight * balance.sum() + moe.z_loss_weight * z_loss.sum()
        load = torch.stack([layer.last_expert_load for layer in layers]).mean(dim=0)
        metrics = {
            "moe/load_balance_loss": float(balance.detach().mean()),
            "moe/z_loss": float(z_loss.detach().mean()),
            "moe/expert_load": [round(float(v), 5) for v in load],
            "moe/max_expert_load": float(load.max()),
        }
        return aux, metrics
