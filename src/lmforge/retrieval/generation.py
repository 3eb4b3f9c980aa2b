"""Sampling from a RETRO model with fresh retrieval every ``chunk_len`` tokens.

Each time the text completes a chunk, that chunk is embedded and searched in the database,
and its neighbours become readable from the chunk's last token on. Every step re-runs the
model over the whole window (no KV cache: a new chunk's neighbours change the CCA of the
tokens that follow it, and windows are short here); the window slides by whole chunks,
dropping the oldest chunk (and its neighbours) when it would exceed ``max_seq_len``, so every
requested token is produced however long the prompt or the continuation.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.core.errors import ConfigError
from lmforge.nn.generation import check_sampling_options, sample_next
from lmforge.nn.retro import RetroTransformer
from lmforge.retrieval.alignment import window_neighbour_tokens
from lmforge.retrieval.database import ChunkDatabase


@torch.no_grad()
def generate_with_retrieval(model: RetroTransformer, db: ChunkDatabase, prompt_ids: list[int], max_new_tokens: int,
                            k: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                            eos_id: int | None = None, generator: torch.Generator | None = None,
                            allowed: np.ndarray | None = None) -> tuple[list[int], list[list[int]]]:
    """Return (generated ids, neighbour chunk ids used per completed chunk) for one prompt.

    Generated ids number ``max_new_tokens`` unless ``eos_id`` came first. An empty prompt
    starts from ``eos_id`` (the document separator of training), which then counts as the
    first token of the first chunk but is not among the generated ids.
    """
    check_sampling_options(max_new_tokens, temperature, top_k)
    m = model.retro.chunk_len
    if db.chunk_len != m:
        raise ConfigError(f"database chunk_len {db.chunk_len} differs from the model's {m}")
    k = k or model.retro.n_neighbours
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len // m * m
    tokens = [int(t) for t in prompt_ids]
    if not tokens:
        if eos_id is None:
            raise ConfigError("the prompt is empty and there is no end-of-text token to start from")
        tokens = [int(eos_id)]
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
        logits = model(ids, neighbours=nb_tokens).logits[:, -1, : model.cfg.vocab_size]
        next_id = int(sample_next(logits, temperature, top_k, generator))
        tokens.append(next_id)
        generated.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
    return generated, [list(map(int, n)) for n in neighbour_ids]
