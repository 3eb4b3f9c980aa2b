"""One loader from a checkpoint (or a run directory) to a model, for every model family.

Evaluation, generation, export and retrieval evaluation all load through here, so a model
family is rebuilt the same way everywhere: the family named in the checkpoint's config builds
the model, the checkpoint's files are verified against their checksums, and its weights loaded.
``weights`` picks which: ``raw`` (``model.safetensors``, the trained weights) or the averages a run
with ``train.weight_averaging`` keeps beside them, ``ema`` or ``window`` (``train/averaging.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.core.checkpoint_files import (
    WEIGHT_FILES,
    list_checkpoints,
    load_safetensors_weights,
    verify_checkpoint_dir,
)
from lmforge.core.errors import CheckpointError, ConfigError
from lmforge.core.logging import get_logger
from lmforge.nn.families import family_of, model_config_from_dict


log = get_logger(__name__)
_HOW_TO_GET = {"ema": "train with train.weight_averaging.ema_decay set (e.g. 0.999)",
               "window": "train with train.weight_averaging.window set; window averages are written at the "
                         "checkpoints of the schedule (checkpoint_every, eval_every, the last step)"}


def _how_to_get(weights: str) -> str:
    return _HOW_TO_GET.get(weights, "the checkpoint is damaged")


def weights_file(weights: str) -> str:
    if weights not in WEIGHT_FILES:
        raise ConfigError(f"--weights {weights}: unknown (known: {', '.join(WEIGHT_FILES)})")
    return WEIGHT_FILES[weights]


def _holds(manifest: dict[str, Any], file_name: str) -> bool:
    return file_name in manifest.get("files", {})


def resolve_checkpoint(path: str | Path, weights: str = "raw") -> Path:
    """A checkpoint directory as given, or the newest valid one of a run directory that holds
    ``weights`` (the raw weights: its newest valid one)."""
    path, file_name = Path(path), weights_file(weights)
    if (path / "manifest.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        newest = None
        for checkpoint in reversed(list_checkpoints(path / "checkpoints")):
            try:
                manifest = verify_checkpoint_dir(checkpoint)
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s", exc)
                continue
            newest = newest or checkpoint
            if _holds(manifest, file_name):
                if checkpoint != newest:
                    log.warning("%s: the newest checkpoint holding %s weights is %s (not %s)", path, weights,
                                checkpoint.name, newest.name)
                return checkpoint
        if newest is None:
            raise CheckpointError(f"{path}: the run has no valid checkpoint")
        raise CheckpointError(f"{path}: no checkpoint of the run holds {weights} weights ({file_name}); "
                              f"{_how_to_get(weights)}")
    raise CheckpointError(f"{path}: neither a run directory nor a checkpoint")


def checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    """The run config a checkpoint was saved with (``config.yaml``), checked to have a model section."""
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{checkpoint}/config.yaml: no model section")
    return config


def load_model(path: str | Path, device: torch.device | str = "cpu", weights: str = "raw",
               max_seq_len: int | None = None) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """(model in eval mode on ``device``, the run config as a dict, the checkpoint directory).

    ``weights``: ``raw``, ``ema`` or ``window`` (see the module docstring). ``max_seq_len`` longer
    than the checkpoint's builds the model for that many positions (to evaluate beyond the trained
    length: positions are rotary, so no weight depends on it); the returned config is unchanged."""
    checkpoint = resolve_checkpoint(path, weights)
    manifest = verify_checkpoint_dir(checkpoint)
    file_name = weights_file(weights)
    if not _holds(manifest, file_name):
        raise CheckpointError(f"{checkpoint}: holds no {weights} weights ({file_name}); "
                              f"{_how_to_get(weights)}")
    config = checkpoint_config(checkpoint)
    model_cfg = model_config_from_dict(config["model"])
    if max_seq_len is not None and max_seq_len > model_cfg.max_seq_len:
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=max_seq_len)
    model = family_of(model_cfg).inference_config(model_cfg).build()
    load_safetensors_weights(model, checkpoint, file_name)
    return model.to(device).eval(), config, checkpoint
