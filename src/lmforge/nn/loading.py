"""One loader from a checkpoint (or a run directory) to a model, for every model family.

Evaluation, generation, export and retrieval evaluation all load through here, so a model
family is rebuilt the same way everywhere: the family named in the checkpoint's config builds
the model, the checkpoint's files are verified against their checksums, and its weights loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.core.checkpoint_files import latest_valid_checkpoint, load_safetensors_weights, verify_checkpoint_dir
from lmforge.core.errors import CheckpointError
from lmforge.nn.families import family_of, model_config_from_dict


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


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """(model in eval mode on ``device``, the run config as a dict, the checkpoint directory)."""
    checkpoint = resolve_checkpoint(path)
    verify_checkpoint_dir(checkpoint)
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{checkpoint}/config.yaml: no model section")
    model_cfg = model_config_from_dict(config["model"])
    model = family_of(model_cfg).inference_config(model_cfg).build()
    load_safetensors_weights(model, checkpoint)
    return model.to(device).eval(), config, checkpoint
