"""Sampling from a RETRO model with fresh retrieval every ``chunk_len`` tokens.

Each time the text completes a chunk, that chunk is embedded and searched in the database,
and its neighbours become readable from the chunk's last token on. Every step re-runs the
model over the whole window (no KV cache: a new chunk's neighbours change the CCA of the
tokens that follow it, and windows are short here); the window keeps whole chunks, dropping
the oldest chunk (and its neighbours) when it would exceed ``max_seq_len``.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.nn.retro import RetroTransformer
from lmforge.retrieval.alignment import window_neighbour_tokens
from lmforge.retrieval.database import ChunkDatabase


@torch.no_grad()
def generate_with_retrieval(model: RetroTransformer, db: ChunkDatabase, prompt_ids: list[int], max_new_tokens: int,
                            k: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                            eos_id: int | None = None, generator: torch.Generator | None = None,
                            allowed: np.ndarray | None = None) -> tuple[list[int], list[list[int]]]:
    """Return (generated ids, neighbour chunk ids used per completed chunk) for one prompt."""
    m = model.retro.chunk_len
    if db.chunk_len != m:
        raise ValueError(f"database chunk_len {db.chunk_len} differs from the model's {m}")
    k = k or model.retro.n_neighbours
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len // m * m
    tokens = [int(t) for t in prompt_ids]
    offset = 0
    neighbour_ids: list[np.ndarray] = []  # per complete chunk of `tokens`, from its start

    def refresh() -> None:
        complete = len(tokens) // m
        if complete > len(neighbour_ids):
            chunks = np.array(tokens[len(neighbour_ids) * m: complete * m]).reshape(-1, m)
            neighbour_ids.extend(db.retrieve(chunks, k, allowed=allowed))

    generated: list[int] = []
    for _ in range(max_new_tokens):
        refresh()
        while len(tokens) - offset > max_len:
            offset += m
        window = tokens[offset:]
        first_chunk = offset // m
        ids = torch.tensor([window], device=device)
        nb = np.array(neighbour_ids[first_chunk:first_chunk + len(window) // m]).reshape(1, -1, k)
        nb_tokens = torch.from_numpy(window_neighbour_tokens(db, np.array([window]), nb, model.retro.align_neighbours)).to(device)
        logits = model(ids, neighbours=nb_tokens).logits[0, -1, : model.cfg.vocab_size].float()
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
            next_id = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        tokens.append(next_id)
        generated.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
    return generated, [list(map(int, n)) for n in neighbour_ids]
