"""Autoregressive sampling with a KV cache: prefill the prompt once, then one token a step."""

from __future__ import annotations

import torch

from lmforge.nn.transformer import KVCache, Transformer


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return [1, T + n] ids; temperature 0 is greedy. Stops early at ``eos_id``."""
    cfg = model.cfg
    max_len = cfg.max_seq_len
    # Keep the most recent prompt tokens that leave room for the continuation.
    keep = max(1, max_len - max_new_tokens)
    ids = prompt_ids[:, -keep:]
    max_new_tokens = min(max_new_tokens, max_len - ids.shape[1])
    cache = KVCache(model, batch=ids.shape[0], max_len=max_len)
    logits = model(ids, kv_cache=cache).logits[:, -1]
    out = [ids]
    for _ in range(max_new_tokens):
        logits = logits[:, : cfg.vocab_size].float()  # padded ids are never produced
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                threshold = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            next_id = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
        out.append(next_id)
        if eos_id is not None and bool((next_id == eos_id).all()):
            break
        logits = model(next_id, kv_cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)
