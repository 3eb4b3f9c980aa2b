"""Load a model and its tokenizer from a run directory or a checkpoint, for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.loading import load_model


def load_for_inference(path: str | Path, device: torch.device, weights: str = "raw",
                       max_seq_len: int | None = None) -> tuple[torch.nn.Module, Tokenizer, dict[str, Any], Path]:
    """Return (model in eval mode, tokenizer, run config as a dict, checkpoint path); any model family.
    ``weights``: raw, ema or window; ``max_seq_len``: see :func:`lmforge.nn.loading.load_model`."""
    model, config, checkpoint = load_model(path, device, weights, max_seq_len)
    return model, Tokenizer.load(checkpoint / "tokenizer.json"), config, checkpoint
