"""Load a model and its tokenizer from a run directory or a checkpoint, for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.core.checkpoint_files import (
    latest_valid_checkpoint,
    load_safetensors_weights,
    verify_checkpoint_dir,
)
from lmforge.core.errors import CheckpointError
from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.config import ModelConfig


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the newest valid one of a run directory."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = latest_valid_checkpoint(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"{path}: the run has no valid checkpoint")
        return found
    raise CheckpointError(f"{path}: neither a run directory nor a checkpoint")


def load_for_inference(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Tokenizer, dict[str, Any], Path]:
    """Return (model in eval mode, tokenizer, run config as a dict, checkpoint path)."""
    checkpoint = resolve_checkpoint(path)
    verify_checkpoint_dir(checkpoint)
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    model_cfg = config["model"]
    if "retro" in model_cfg:  # a RETRO model: rebuild it without its training-time base/freeze settings
        from lmforge.nn.retro import RetroModelConfig

        retro = {**model_cfg["retro"], "base_checkpoint": None, "freeze_decoder": False}
        model = RetroModelConfig.from_dict({**model_cfg, "retro": retro}, path="model").build()
    else:
        model = ModelConfig.from_dict(model_cfg, path="model").build()
    load_safetensors_weights(model, checkpoint)
    tokenizer = Tokenizer.load(checkpoint / "tokenizer.json")
    return model.to(device).eval(), tokenizer, config, checkpoint
