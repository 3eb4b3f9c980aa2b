"""What the model-collapse experiment measures on each generation's model and samples.

- Held-out *real* bits-per-byte: ``eval.heldout.evaluate_heldout`` on the real data directory's
  held-out split, the same windows for every generation.
- The rare-token set: the rarest ``rare_fraction`` of the token types that occur in the real
  training split (by count; end-of-text excluded). Its share of the real training tokens is the
  reference; each model's *probability mass* on the set is its softmax probability summed over
  the set, averaged over every position of the held-out real windows (a model that has lost
  the tail puts less mass there); each generation's samples give the set's share of their tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.data.shards import ShardSet
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.heldout import evaluate_heldout, heldout_eval_windows


@dataclass
class RareTokens:
    ids: np.ndarray            # token ids of the set
    real_share: float          # share of the real training tokens they make up
    types_seen: int            # token types that occur in the real training split


def rare_tokens(data_dir: Path, source: str, fraction: float) -> RareTokens:
    tokenizer = Tokenizer.load(Path(data_dir) / "tokenizer.json")
    stream = ShardSet(data_dir, "train", source)
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for shard in stream.shards:
        counts += np.bincount(np.asarray(shard, dtype=np.int64), minlength=tokenizer.vocab_size)[:tokenizer.vocab_size]
    counts[tokenizer.eos_id] = 0
    seen = np.flatnonzero(counts)
    order = seen[np.lexsort((seen, counts[seen]))]          # rarest first, ties by id
    ids = np.sort(order[:max(1, math.ceil(fraction * len(seen)))])
    return RareTokens(ids, float(counts[ids].sum() / counts.sum()), int(len(seen)))


@torch.no_grad()
def model_rare_mass(model: torch.nn.Module, data_dir: Path, source: str, rare: RareTokens, seq_len: int,
                    max_tokens: int, batch_size: int = 8) -> float:
    """Mean over the held-out real positions of the model's probability on the rare set."""
    device = next(model.parameters()).device
    vocab = model.cfg.vocab_size
    ids = torch.as_tensor(rare.ids, device=device)
    total, positions = 0.0, 0
    for inputs, _ in heldout_eval_windows(Path(data_dir), source, seq_len, max_tokens, batch_size):
        logits = model(inputs.to(device)).logits[..., :vocab].float()
        total += float(logits.softmax(dim=-1)[..., ids].sum())
        positions += inputs.numel()
    return total / max(positions, 1)


def heldout_real_bpb(model: torch.nn.Module, data_dir: Path, source: str, seq_len: int, max_tokens: int) -> dict:
    result = evaluate_heldout(model, Path(data_dir), seq_len, max_tokens)
    if source not in result["bpb"]:
        raise ValueError(f"{data_dir}: no held-out tokens of source {source!r}")
    return {"bpb": result["bpb"][source], "bpb_interval": result["bpb_interval"][source],
            "tokens": result["tokens"][source]}


def sample_rare_share(texts: list[str], tokenizer: Tokenizer, rare: RareTokens) -> tuple[float, int]:
    """(share of the rare set among the samples' tokens, tokens) under the real data's tokenizer."""
    ids = np.fromiter((t for row in tokenizer.encode_batch(texts) for t in row), dtype=np.int64)
    if len(ids) == 0:
        return 0.0, 0
    return float(np.isin(ids, rare.ids).mean()), int(len(ids))
