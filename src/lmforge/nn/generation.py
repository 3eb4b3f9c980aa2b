"""Autoregressive sampling with a KV cache: prefill the prompt once, then one token a step.

The model sees at most ``max_seq_len`` tokens. When the cache is full, the window slides:
the cache is rebuilt from the most recent tokens (positions restart at 0, as in training,
where every sequence starts at 0) and generation goes on, so every requested token is
produced, however long the prompt or the continuation. A model with sliding-window layers
(``model.attention``) keeps only each local layer's window in its cache (a ring), but its
context is still ``max_seq_len``: the global layers and the RoPE tables end there.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from lmforge.core.errors import ConfigError
from lmforge.nn.transformer import KVCache, Transformer


def check_sampling_options(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """Raise ConfigError naming the first option that is out of range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 0):
        raise ConfigError(f"top_k must be a whole number >= 1, or 0 or None for all tokens, got {top_k!r}")


def start_ids(prompt_ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """The ids generation starts from: the prompt, or for an empty prompt the end-of-text token,
    which in training separates documents, so the model begins a new one."""
    if prompt_ids.dim() != 2:
        raise ConfigError(f"prompt_ids must be [batch, tokens], got shape {list(prompt_ids.shape)}")
    if prompt_ids.shape[1] > 0:
        return prompt_ids
    if eos_id is None:
        raise ConfigError("the prompt is empty and there is no end-of-text token to start from")
    return torch.full((prompt_ids.shape[0], 1), eos_id, dtype=torch.long, device=prompt_ids.device)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None, top_p: float | None = None) -> torch.Tensor:
    """[batch, vocab] logits -> [batch, 1] ids; temperature 0 is greedy, top_k 0/None keeps all;
    top_p < 1 keeps the smallest set of most likely tokens whose probability reaches top_p
    (nucleus sampling, Holtzman et al. 2020)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probabilities = ordered.softmax(dim=-1)
        before = probabilities.cumsum(dim=-1) - probabilities  # the mass of the more likely tokens
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))  # the most likely token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def sliding_window_keep(max_len: int) -> int:
    """How many recent tokens the rebuilt cache holds when the window slides.

    Rebuilding costs a forward pass over the kept tokens; keeping three quarters of the
    context rebuilds once every max_len/4 tokens, so the model always sees at least 3/4 of
    its context while the rebuilds cost about three cached steps per generated token.
    """
    return max(1, max_len - max(1, max_len // 4))


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Return [batch, T + n]: the whole prompt (T tokens) followed by the n generated ones.

    n is ``max_new_tokens`` unless every row produced ``eos_id`` earlier. Temperature 0 is
    greedy; ``top_p`` below 1 samples from the nucleus (see :func:`sample_next`). An empty
    prompt starts from ``eos_id`` (which is not part of the result).
    """
    check_sampling_options(max_new_tokens, temperature, top_k)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    max_len = model.cfg.max_seq_len
    vocab = model.cfg.vocab_size
    tokens = start_ids(prompt_ids, eos_id)
    batch = tokens.shape[0]
    cache = KVCache(model, batch=batch, max_len=max_len)
    logits = model(tokens[:, -max_len:], kv_cache=cache).logits[:, -1]
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        next_id = sample_next(logits[:, :vocab], temperature, top_k, generator, top_p)  # padded ids never come out
        generated.append(next_id)
        if step == max_new_tokens - 1 or (eos_id is not None and bool((next_id == eos_id).all())):
            break
        if cache.length < max_len:
            logits = model(next_id, kv_cache=cache).logits[:, -1]
        else:  # window full: rebuild the cache from the most recent tokens
            recent = torch.cat([tokens, *generated], dim=1)[:, -sliding_window_keep(max_len):]
            cache.length = 0
            logits = model(recent, kv_cache=cache).logits[:, -1]
    return torch.cat([prompt_ids, *generated], dim=1)
