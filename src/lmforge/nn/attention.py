"""Causal self-attention with grouped-query heads, RoPE, optional QK-norm, document masks and
sliding windows.

Attention itself is ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
where available). With grouped-query attention (GQA) several query heads share one
key/value head, which shrinks the KV cache by n_heads / n_kv_heads at inference.

Which keys a query sees is one function of token indices and document ids,
:func:`attention_mask`: causal, within ``window`` tokens for a local layer, within the same
document under ``model.attention.document_mask``. Queries and keys carry their absolute index
in the sequence, so the same function serves a whole sequence, a decoding step against a KV
cache, a block of a sliding-window layer, or a shard of the queries at an offset whose keys and
values were gathered from elsewhere (context parallelism; this module never communicates).
With the default settings (no document mask, no window) attention takes the code path it always
had (``is_causal``), so existing models compute bit for bit what they did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.config import ModelConfig
from lmforge.nn.norm import RMSNorm
from lmforge.nn.rope import RotaryEmbedding, apply_rotary

# The end-of-text token: the shards put one after every document, so in a packed sequence it
# starts the next document (and the model learns to begin a document after it, as generation
# does from an empty prompt). lmforge's tokenizers give it id 0 (their first special token).
END_OF_TEXT_ID = 0


@dataclass
class TokenLayout:
    """Documents and positions of the tokens of one forward call (shared by every layer).

    ``index`` [T]: each token's absolute index in its sequence (``start_pos + i``);
    ``documents`` [B, T]: document ids under document masking, else None;
    ``rope_positions`` [B, T]: RoPE positions when they restart per document, else None (the
    index is the position); ``document_history`` [B, max_len]: with a KV cache, the document id
    of every index processed so far, so cached keys find theirs. ``masks`` keeps the masks built
    in this call, so layers of one kind (same window, same cache kind) build theirs once.

    Context parallelism (:mod:`lmforge.parallel.context`): the tokens are this rank's share of
    each sequence; ``gather`` returns the keys/values of the whole sequence ([..., T_local, D]
    → [..., T, D], differentiable: the communication lives outside ``nn``), whose indices are
    ``gathered_index`` [T] and documents ``gathered_documents`` [B, T].
    """
    index: torch.Tensor
    documents: torch.Tensor | None = None
    rope_positions: torch.Tensor | None = None
    document_history: torch.Tensor | None = None
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    gathered_index: torch.Tensor | None = None
    gathered_documents: torch.Tensor | None = None

    def key_documents(self, key_index: torch.Tensor) -> torch.Tensor | None:
        """Document ids [B, S] of keys at ``key_index`` [S] (None without document masking)."""
        if self.documents is None:
            return None
        if self.document_history is None:
            return self.documents  # no cache: the keys are the queries
        return self.document_history[:, key_index]


def documents_of(input_ids: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] document id of each token: an end-of-text token starts a new document.

    ``previous`` [B]: the document of the token before ``input_ids`` (a KV cache's last one).
    A running count, so no loop over documents.
    """
    ids = (input_ids == END_OF_TEXT_ID).cumsum(dim=1)
    return ids if previous is None else ids + previous[:, None]


def restarted_positions(input_ids: torch.Tensor, index: torch.Tensor,
                        previous_start: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] each token's distance from the start of its document (its end-of-text token, or
    ``previous_start`` [B], the index where the cached part's last document began; 0 if None)."""
    fill = torch.zeros_like(input_ids) if previous_start is None else previous_start[:, None].expand_as(input_ids)
    starts = torch.where(input_ids == END_OF_TEXT_ID, index.expand_as(input_ids), fill)
    return index - starts.cummax(dim=1).values


def attention_mask(q_index: torch.Tensor, k_index: torch.Tensor, q_documents: torch.Tensor | None = None,
                   k_documents: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Boolean mask [..., Tq, Tk], True where query i may attend to key j.

    ``q_index`` [..., Tq] and ``k_index`` [..., Tk] are absolute token indices in the sequence
    (a query shard at an offset passes its own); a negative key index marks padding. The key
    must not lie after the query, must lie less than ``window`` tokens before it (when given),
    and must be in the same document (when document ids [B, ...] are given).
    """
    queries, keys = q_index[..., :, None], k_index[..., None, :]
    allowed = keys <= queries  # comparisons only: no [Tq, Tk] integer matrix at long lengths
    allowed &= keys >= 0
    if window is not None:
        allowed &= keys > queries - window
    if q_documents is not None and k_documents is not None:
        allowed = allowed & (q_documents[..., :, None] == k_documents[..., None, :])
    return allowed


def rotate_at(rope: RotaryEmbedding, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE for per-token positions [B, T] (restarting per document): ``rope``'s own cos/sin
    tables read at those rows, so scaling and attention factors are the same as ``rope(x, s)``."""
    cos = rope.cos[positions].to(x.dtype)[:, None]  # [B, 1, T, head_dim]
    sin = rope.sin[positions].to(x.dtype)[:, None]
    return apply_rotary(x, cos, sin)


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over a whole sequence as plain matmuls: ``softmax(q kᵀ / sqrt(d) + causal
    mask) v``, the softmax in fp32 (``model.attention.kernel: explicit``).

    On CPU in bf16, SDPA's flash kernel is ~2.5x slower forward + backward than these matmuls for
    short sequences (docs/speedrun.md); the scores [B, H, T, T] are materialised, so this is for
    sequences of a few hundred tokens.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves ``groups`` query heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def explicit_kernel_applies(kernel: str, q: torch.Tensor) -> bool:
    """Whether ``model.attention.kernel`` picks :func:`explicit_causal_attention` for ``q``:
    ``explicit`` always, ``auto`` for bf16 on CPU at up to 1024 tokens (where it is faster)."""
    if kernel == "explicit":
        return True
    return kernel == "auto" and q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= 1024


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, window: int,
                    documents: torch.Tensor | None = None) -> torch.Tensor:
    """Sliding-window attention in blocks: each block of ``window`` queries attends to the
    ``2 * window`` keys that can reach it, so memory and work grow as T * window instead of T^2.

    q [B, H, T, D], k/v [B, Hkv, T, D] (the same tokens), ``index`` [T]; returns [B, H, T, D],
    equal to attention over the whole sequence with the band mask.
    """
    b, h, t, d = q.shape
    blocks = math.ceil(t / window)
    pad = blocks * window - t
    # Blocks become batch rows: queries [B * blocks, H, W, D], so SDPA sees plain 4-d inputs.
    q_blocks = F.pad(q, (0, 0, 0, pad)).view(b, h, blocks, window, d).transpose(1, 2).reshape(-1, h, window, d)

    def key_blocks(x: torch.Tensor) -> torch.Tensor:
        # `window` slots of padding in front, so block j's keys are tokens jW - W ... jW + W - 1.
        x = F.pad(x, (0, 0, window, pad)).unfold(2, 2 * window, window).permute(0, 2, 1, 4, 3)
        return x.reshape(-1, x.shape[2], 2 * window, d)
    q_index = torch.cat([index, index[-1] + 1 + torch.arange(pad, device=index.device)]).view(blocks, window)
    padding = torch.full((window,), -1, dtype=index.dtype, device=index.device)
    k_index = torch.cat([padding, index, padding[:pad]]).unfold(0, 2 * window, window)
    q_docs = k_docs = None
    if documents is not None:
        # Padded queries belong to the last document, so each of them still sees a real key.
        q_docs = torch.cat([documents, documents[:, -1:].expand(b, pad)], dim=1).view(b, blocks, window)
        k_docs = F.pad(documents, (window, pad), value=-1).unfold(1, 2 * window, window)
    mask = attention_mask(q_index, k_index, q_docs, k_docs, window)  # [(B,) blocks, W, 2W]
    mask = mask.expand(b, blocks, window, 2 * window).reshape(b * blocks, 1, window, 2 * window)
    y = F.scaled_dot_product_attention(q_blocks, key_blocks(k), key_blocks(v), attn_mask=mask,
                                       enable_gqa=k.shape[1] != h)
    return y.view(b, blocks, h, window, d).transpose(1, 2).reshape(b, h, blocks * window, d)[:, :, :t]


class LayerKVCache:
    """Keys and values of one global layer for positions already processed, preallocated."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k.shape[-2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def key_index(self, start_pos: int, t: int, device) -> torch.Tensor:
        """Absolute indices of the keys ``update`` returned."""
        return torch.arange(start_pos + t, device=device)


class RingKVCache:
    """Keys and values of one local layer: only the last ``window`` positions, in a ring
    (index i lives in slot i % window), so its memory does not grow with the context."""

    def __init__(self, batch: int, n_kv_heads: int, window: int, head_dim: int, device, dtype):
        self.window = window
        self.k = torch.zeros(batch, n_kv_heads, window, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values; return the cached ones (in slot order) followed by the new."""
        t, stored = k.shape[-2], min(start_pos, self.window)
        keys = torch.cat([self.k[:, :, :stored], k], dim=2)
        values = torch.cat([self.v[:, :, :stored], v], dim=2)
        kept = min(t, self.window)  # older new tokens fall out of every later query's window
        slots = torch.arange(start_pos + t - kept, start_pos + t, device=k.device) % self.window
        self.k[:, :, slots] = k[:, :, t - kept:]
        self.v[:, :, slots] = v[:, :, t - kept:]
        return keys, values

    def append_one(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: the new key/value replaces the one ``window`` tokens back (which the
        new query cannot see); every key held is then in the query's window, so no mask is needed."""
        slot = start_pos % self.window
        self.k[:, :, slot] = k[:, :, 0]
        self.v[:, :, slot] = v[:, :, 0]
        held = min(start_pos + 1, self.window)
        return self.k[:, :, :held], self.v[:, :, :held]

    def key_index(self, start_pos: int, t: int, device) -> torch.Tensor:
        """Absolute indices of the keys ``update`` returned: slot s held the latest index
        before ``start_pos`` that is s modulo the window, then come the new tokens."""
        slots = torch.arange(min(start_pos, self.window), device=device)
        held = start_pos - 1 - (start_pos - 1 - slots) % self.window
        return torch.cat([held, torch.arange(start_pos, start_pos + t, device=device)])


def add_projections(module: nn.Module, cfg: ModelConfig) -> None:
    """Give ``module`` the q/k/v/o projections of grouped-query attention (no biases), under
    the parameter names checkpoints and the Hugging Face export rely on."""
    module.n_heads, module.n_kv_heads, module.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    module.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
    module.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
    module.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
    module.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        add_projections(self, cfg)
        self.window = window  # None: a global layer; else the tokens a local layer sees
        self.kernel = cfg.attention.kernel
        # QK-norm keeps attention logits bounded, a common fix for loss spikes at scale.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cache: LayerKVCache | RingKVCache | None = None,
                start_pos: int = 0, layout: TokenLayout | None = None,
                value_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """``value_embedding`` [B, T, n_kv_heads * head_dim]: added to the values
        (``model.value_embeddings``)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x)
        if value_embedding is not None:
            v = v + value_embedding.to(v.dtype)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if layout is not None and layout.rope_positions is not None:
            q, k = rotate_at(rope, q, layout.rope_positions), rotate_at(rope, k, layout.rope_positions)
        else:
            q, k = rope(q, start_pos), rope(k, start_pos)
        if self.window is None and (layout is None or (layout.documents is None and layout.gather is None)):
            y = self._causal(q, k, v, cache, start_pos)
        else:
            y = self._masked(q, k, v, cache, start_pos, layout)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache | RingKVCache | None,
                start_pos: int) -> torch.Tensor:
        """Full causal attention (the default settings): SDPA's own causal kernels."""
        t = q.shape[-2]
        mask, causal = None, True
        if cache is None and explicit_kernel_applies(self.kernel, q):
            return explicit_causal_attention(q, k, v)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
            if start_pos > 0:
                causal = False
                if t > 1:
                    # Query i sits at absolute position start_pos + i and may see keys <= it.
                    q_pos = torch.arange(start_pos, start_pos + t, device=q.device)[:, None]
                    mask = torch.arange(k.shape[-2], device=q.device)[None, :] <= q_pos
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.n_kv_heads != self.n_heads)

    def _masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache | RingKVCache | None,
                start_pos: int, layout: TokenLayout | None) -> torch.Tensor:
        """Attention under a document mask and/or a sliding window, from :func:`attention_mask`.

        The keys and values are this call's, the cache's followed by this call's, or under context
        parallelism the whole sequence's, gathered by ``layout.gather`` (one call for both).
        """
        t = q.shape[-2]
        index = layout.index if layout is not None else torch.arange(start_pos, start_pos + t, device=q.device)
        documents = layout.documents if layout is not None else None
        gathered = layout is not None and layout.gather is not None
        if self.window is not None and t > 2 * self.window and (cache is None or start_pos == 0) and not gathered:
            if cache is not None:
                cache.update(k, v, start_pos)  # a long prompt: the ring keeps its last window
            return local_attention(q, k, v, index, self.window, documents)
        if isinstance(cache, RingKVCache) and t == 1 and documents is None:
            k, v = cache.append_one(k, v, start_pos)
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_kv_heads != self.n_heads)
        if gathered:
            k, v = layout.gather(torch.stack((k, v))).unbind(0)  # type: ignore[union-attr,misc]
            k_index, k_documents = layout.gathered_index, layout.gathered_documents  # type: ignore[union-attr]
        elif cache is None:
            k_index, k_documents = index, documents
        else:
            k_index = cache.key_index(start_pos, t, q.device)
            k, v = cache.update(k, v, start_pos)
            k_documents = layout.key_documents(k_index) if layout is not None else None
        key = (self.window, type(cache).__name__)
        mask = layout.masks.get(key) if layout is not None else None
        if mask is None:
            mask = attention_mask(index, k_index, documents, k_documents, self.window)
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)  # [B, 1, T, S]: the same for every head
            if layout is not None:
                layout.masks[key] = mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
