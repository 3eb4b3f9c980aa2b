"""Save and restore everything needed to continue a run bit-for-bit.

Files in each checkpoint: ``model.safetensors`` (weights), ``optimizer.pt`` (optimizer
state), ``trainer_state.pt`` (step, tokens, data-loader position, RNG states, callback
state), ``config.yaml`` and ``tokenizer.json`` (so a checkpoint is self-contained for
eval and generation). ``.pt`` files are plain containers loaded with weights_only=True.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from lmforge.core.checkpoint_files import (
    load_safetensors_weights,
    prune_checkpoints,
    safe_torch_load,
    verify_checkpoint_dir,
    write_checkpoint_dir,
)
from lmforge.core.errors import CheckpointError


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile / DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def save_training_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: Any,
    trainer_state: dict[str, Any],
    config_yaml: str,
    tokenizer_path: Path,
    keep: int,
) -> Path:
    plain = unwrap(model)
    writers = {
        # save_model handles tied embeddings (shared storage), which save_file refuses.
        "model.safetensors": lambda p: save_model(plain, str(p)),
        "optimizer.pt": lambda p: torch.save(optimizer.state_dict(), p),
        "trainer_state.pt": lambda p: torch.save(trainer_state, p),
        "config.yaml": lambda p: p.write_text(config_yaml),
        "tokenizer.json": lambda p: shutil.copyfile(tokenizer_path, p),
    }
    path = write_checkpoint_dir(checkpoints_dir, step, writers, {"format": "lmforge-1"})
    prune_checkpoints(checkpoints_dir, keep)
    return path


def load_training_checkpoint(checkpoint: Path, model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """Verify checksums, restore weights and optimizer in place, return the trainer state."""
    verify_checkpoint_dir(checkpoint)
    load_safetensors_weights(unwrap(model), checkpoint)
    try:
        optimizer.load_state_dict(safe_torch_load(checkpoint / "optimizer.pt"))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{checkpoint}/optimizer.pt: does not match this optimizer ({exc})") from exc
    return safe_torch_load(checkpoint / "trainer_state.pt")
