"""Decoder-only Transformer: embeddings → pre-norm blocks (attention, MLP or MoE) → head.

Layers are global (full causal attention) or, with ``model.attention.sliding_window``, local
(the last ``sliding_window`` tokens); local layers may have their own RoPE base. Document ids
and restarted positions (``model.attention.document_mask`` / ``restart_positions``) are worked
out once per forward call from the token ids and shared by every layer.

Speedrun options (docs/speedrun.md), off by default: ``model.mlp_activation: relu2`` (nn/mlp.py);
``model.logit_softcap`` (logits ``cap * tanh(logits / cap)``, in the fused loss too);
``model.value_embeddings`` (each layer has a token embedding of its own, kv_heads * head_dim wide,
added to its attention values); ``model.skip_connections`` (U-net: block i's output is added,
times a learned scalar that starts at 1, to the input of block n_layers - 1 - i, for i below
n_layers // 2).

Context parallelism (:mod:`lmforge.parallel.context`) passes a ``sequence_shard``: the model then
runs this rank's share of each sequence (whose layout it is handed) and returns its logits and
loss only; attention gathers the other ranks' keys through the layout. The model never communicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.attention import (Attention, LayerKVCache, RingKVCache, TokenLayout, documents_of,
                                  restarted_positions)
from lmforge.nn.config import ModelConfig
from lmforge.nn.cross_entropy import linear_cross_entropy
from lmforge.nn.mlp import feed_forward
from lmforge.nn.moe import MoE
from lmforge.nn.norm import RMSNorm
from lmforge.nn.rope import RotaryEmbedding


class SequenceShard(Protocol):
    """This rank's share of each sequence under context parallelism (see the module docstring)."""

    def localize(self, input_ids: torch.Tensor, targets: torch.Tensor | None, layout: TokenLayout | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, TokenLayout, torch.Tensor | None]:
        """(local input ids, local targets, their layout, the count the summed loss is divided by or None
        for the local mean), from the whole sequences and their layout."""
        ...


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
        self.attn = Attention(cfg, window=cfg.attention.window(index))
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp: nn.Module = (MoE(cfg) if cfg.is_moe_layer(index)
                               else feed_forward(cfg.d_model, cfg.resolved_d_ff, cfg.mlp_activation))

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cache: LayerKVCache | RingKVCache | None = None,
                start_pos: int = 0, layout: TokenLayout | None = None,
                value_embedding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, start_pos, layout, value_embedding)
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """Per-layer key/value caches for incremental decoding: a global layer keeps every position
    (up to ``max_len``), a local layer only its window, in a ring. Under document masking the
    cache also keeps each position's document id and RoPE position, so a new token knows the
    document it continues."""

    def __init__(self, model: "Transformer", batch: int, max_len: int | None = None):
        cfg = model.cfg
        param = next(model.parameters())
        max_len = max_len or cfg.max_seq_len
        self.layers: list[LayerKVCache | RingKVCache] = []
        for i in range(cfg.n_layers):
            window = cfg.attention.window(i)
            if window is not None and window < max_len:
                self.layers.append(RingKVCache(batch, cfg.kv_heads, window, cfg.head_dim, param.device, param.dtype))
            else:
                self.layers.append(LayerKVCache(batch, cfg.kv_heads, max_len, cfg.head_dim, param.device, param.dtype))
        self.documents = self.positions = None
        if cfg.attention.document_mask:
            self.documents = torch.zeros(batch, max_len, dtype=torch.long, device=param.device)
            self.positions = torch.zeros_like(self.documents)
        self.length = 0

    def nbytes(self) -> int:
        """Bytes of cached keys and values (the document bookkeeping is 16 bytes a position)."""
        return sum(t.untyped_storage().nbytes() for layer in self.layers for t in (layer.k, layer.v))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, scaling=cfg.rope_scaling)
        # Local layers with their own RoPE base (Gemma 3: 10k local, 1M global) get plain RoPE:
        # they only see distances below the window, which training covered.
        theta_local = cfg.attention.rope_theta_local
        self.local_rope = None if theta_local is None else RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, theta_local)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one matrix reads and writes tokens
        kv_width = cfg.kv_heads * cfg.head_dim
        self.value_embeds = (nn.ModuleList(nn.Embedding(cfg.padded_vocab_size, kv_width) for _ in range(cfg.n_layers))
                             if cfg.value_embeddings else None)
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layers // 2)) if cfg.skip_connections else None
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
        if self.skip_weights is not None:
            nn.init.ones_(self.skip_weights)

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, sequence_shard: SequenceShard | None = None) -> ModelOutput:
        start_pos = kv_cache.length if kv_cache is not None else 0
        if start_pos + input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + input_ids.shape[1]} tokens exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        layout = self.token_layout(input_ids, start_pos, kv_cache)
        loss_tokens = None
        if sequence_shard is not None:
            if kv_cache is not None:
                raise ValueError("context parallelism splits training sequences; cached decoding runs whole")
            input_ids, targets, layout, loss_tokens = sequence_shard.localize(input_ids, targets, layout)
        x = self.embed(input_ids)
        n, skips = self.cfg.n_layers, []
        for i, block in enumerate(self.blocks):
            rope = self.local_rope if self.local_rope is not None and block.attn.window is not None else self.rope
            if self.skip_weights is not None and i >= n - n // 2:
                x = x + self.skip_weights[n - 1 - i] * skips.pop()
            value_embedding = self.value_embeds[i](input_ids) if self.value_embeds is not None else None
            x = block(x, rope, kv_cache.layers[i] if kv_cache is not None else None, start_pos, layout,
                      value_embedding)
            if self.skip_weights is not None and i < n // 2:
                skips.append(x)
        if kv_cache is not None:
            kv_cache.length = start_pos + input_ids.shape[1]
        return self.output(x, targets, loss_tokens)

    def token_layout(self, input_ids: torch.Tensor, start_pos: int, kv_cache: KVCache | None) -> TokenLayout | None:
        """Document ids and RoPE positions of ``input_ids`` (None without document masking),
        continuing the cached ones; recorded in the cache for later tokens."""
        settings = self.cfg.attention
        if not settings.document_mask:
            return None
        t = input_ids.shape[1]
        index = torch.arange(start_pos, start_pos + t, device=input_ids.device)
        cached = kv_cache is not None and start_pos > 0
        documents = documents_of(input_ids, kv_cache.documents[:, start_pos - 1] if cached else None)  # type: ignore[index]
        positions = None
        if settings.restart_positions:
            previous_start = start_pos - 1 - kv_cache.positions[:, start_pos - 1] if cached else None  # type: ignore[index]
            positions = restarted_positions(input_ids, index, previous_start)
        history = None
        if kv_cache is not None and kv_cache.documents is not None and kv_cache.positions is not None:
            kv_cache.documents[:, start_pos:start_pos + t] = documents
            kv_cache.positions[:, start_pos:start_pos + t] = index if positions is None else positions
            history = kv_cache.documents
        return TokenLayout(index=index, documents=documents, rope_positions=positions, document_history=history)

    def output(self, x: torch.Tensor, targets: torch.Tensor | None,
               loss_tokens: torch.Tensor | None = None) -> ModelOutput:
        """Final norm, LM head, the loss (fp32, when targets are given) and MoE auxiliary losses.

        The loss is the mean over targets, or their sum over ``loss_tokens`` (context parallelism).
        """
        if (self.cfg.fused_cross_entropy and targets is not None and loss_tokens is None
                and torch.is_grad_enabled()):
            # A training step: the loss without the logits (nn/cross_entropy.py); no logits come back.
            loss = linear_cross_entropy(self.norm(x), self.lm_head.weight, targets, softcap=self.cfg.logit_softcap)
            aux_loss, metrics = self._moe_losses(x.device)
            return ModelOutput(logits=x.new_empty(0), loss=loss, aux_loss=aux_loss, moe_metrics=metrics)
        logits = self.lm_head(self.norm(x))
        if self.cfg.logit_softcap is not None:
            logits = self.cfg.logit_softcap * torch.tanh(logits.float() / self.cfg.logit_softcap)
        loss = None
        if targets is not None:
            logits = logits.float()
            if loss_tokens is None:
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
            else:
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                       reduction="sum") / loss_tokens
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
