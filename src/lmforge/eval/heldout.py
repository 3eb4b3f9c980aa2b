"""Held-out loss and bits-per-byte per domain.

Bits-per-byte divides the summed negative log-likelihood (in bits) by the number of UTF-8
bytes the scored tokens stand for, so models with different tokenizers can be compared:
bpb = sum(nll_nats) / (ln 2 * sum(bytes)). Per-token loss (nats) is reported alongside.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.device import autocast_context
from lmforge.data.loader import heldout_windows
from lmforge.data.shards import load_manifest
from lmforge.data.tokenizer import Tokenizer


def heldout_domains(data_dir: Path) -> list[str]:
    manifest = load_manifest(data_dir)
    return sorted(
        name for name, splits in manifest["sources"].items()
        if splits.get("heldout", {}).get("tokens", 0) > 1
    )


@torch.no_grad()
def evaluate_heldout(
    model: nn.Module,
    data_dir: Path,
    seq_len: int,
    max_tokens_per_domain: int,
    batch_size: int = 8,
    device: torch.device | None = None,
    precision: str = "auto",
) -> dict[str, dict[str, float]]:
    """Return ``{"loss": {domain: nats/token}, "bpb": {...}, "tokens": {...}, "bytes": {...}}``."""
    device = device or next(model.parameters()).device
    byte_lengths = torch.from_numpy(
        Tokenizer.load(Path(data_dir) / "tokenizer.json").token_byte_lengths().astype(np.int64)
    )
    was_training = model.training
    model.eval()
    result: dict[str, dict[str, float]] = {"loss": {}, "bpb": {}, "tokens": {}, "bytes": {}}
    for domain in heldout_domains(data_dir):
        nll_sum, token_count, byte_count = 0.0, 0, 0
        windows = heldout_windows(
            data_dir, domain, seq_len, max_tokens=max_tokens_per_domain, batch_size=batch_size
        )
        for inputs, targets in windows:
            with autocast_context(device, precision):
                logits = model(inputs.to(device)).logits
            nll = F.cross_entropy(
                logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum"
            )
            nll_sum += nll.item()
            token_count += targets.numel()
            byte_count += int(byte_lengths[targets.flatten()].sum())
        if token_count == 0:
            continue
        result["loss"][domain] = nll_sum / token_count
        # Special tokens (end-of-text) stand for zero bytes; their loss still counts, as the
        # model must predict document ends.
        result["bpb"][domain] = nll_sum / (math.log(2) * max(byte_count, 1))
        result["tokens"][domain] = token_count
        result["bytes"][domain] = byte_count
    model.train(was_training)
    return result
