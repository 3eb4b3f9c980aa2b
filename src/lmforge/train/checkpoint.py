"""Save and restore everything needed to continue a run bit-for-bit, at any world size.

Files in each checkpoint: ``model.safetensors`` (full weights), ``optimizer.pt`` (full
optimizer state keyed by parameter name), ``trainer_state.pt`` (step, tokens, data-loader
position, RNG states, guard and callback state), ``config.yaml`` and ``tokenizer.json`` (so
a checkpoint is self-contained for eval and generation). ``.pt`` files are plain containers
loaded with ``weights_only=True``. A callback's state may carry whole weight sets under
``weight_files`` (``{file name: state dict}``, e.g. the averaged weights of
``train/averaging.py``): each is written as its own safetensors file, checksummed in the
manifest and loadable for inference like ``model.safetensors``, and only its name stays in
``trainer_state.pt``; loading puts the tensors back into the callback's state.

State dicts go through ``torch.distributed.checkpoint.state_dict``: with DDP or FSDP2 the
full (unsharded) weights and optimizer state are gathered to rank 0, which writes them; on
load rank 0 reads and broadcasts, and each rank keeps its own shard. Because the files hold
full tensors keyed by name, a run saved with 2 ranks resumes with 1 and the other way.
Why not DCP's sharded ``FileSystemWriter``: its ``.metadata`` file is read back with
``pickle.load``, which would let a checkpoint run code; lmforge loads only safetensors and
weights-only files. Gathering to rank 0 bounds the model size by one host's memory, which
covers the models this project trains; sharded safetensors is the path beyond that.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmforge.core import distributed
from lmforge.core.checkpoint_files import (
    alias_groups,
    check_weight_names,
    prune_checkpoints,
    read_weights,
    safe_torch_load,
    save_weights,
    verify_checkpoint_dir,
    write_checkpoint_dir,
)
from lmforge.core.errors import CheckpointError
from lmforge.core.logging import get_logger

FORMAT = "lmforge-2"
WEIGHT_FILES_KEY = "weight_files"  # in a callback's state: {file name: state dict}, one safetensors file each
_OWN_FILES = {"model.safetensors", "optimizer.pt", "trainer_state.pt", "config.yaml", "tokenizer.json", "manifest.json"}
log = get_logger(__name__)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile / DDP wrappers (FSDP2 shards in place, no wrapper)."""
    model = unwrap_compiled(model)
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "optimizers", [optimizer]))


def split_weight_files(trainer_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """``trainer_state`` with each callback's ``weight_files`` replaced by their names, and the files."""
    callbacks = trainer_state.get("callbacks")
    files: dict[str, dict[str, torch.Tensor]] = {}
    if not isinstance(callbacks, dict):
        return trainer_state, files
    kept: dict[str, Any] = {}
    for name, state in callbacks.items():
        if isinstance(state, dict) and isinstance(state.get(WEIGHT_FILES_KEY), dict):
            for file_name, tensors in state[WEIGHT_FILES_KEY].items():
                if (file_name in files or file_name in _OWN_FILES or Path(file_name).name != file_name
                        or not file_name.endswith(".safetensors")):
                    # the names are the callback's constants: a clash is a programming error
                    raise ValueError(f"callback {name!r}: weight file name {file_name!r} is taken or not "
                                     "a plain NAME.safetensors")
                files[file_name] = tensors
            state = {**state, WEIGHT_FILES_KEY: sorted(state[WEIGHT_FILES_KEY])}
        kept[name] = state
    return {**trainer_state, "callbacks": kept}, files


def read_weight_files(trainer_state: dict[str, Any], checkpoint: Path, aliases: list[list[str]],
                      only: str | None = None) -> dict[str, Any]:
    """Put the weight files named in callback states back in (in place; ``only``: that callback's)."""
    callbacks = trainer_state.get("callbacks")
    if isinstance(callbacks, dict):
        for name, state in callbacks.items():
            if (only is None or name == only) and isinstance(state, dict) and isinstance(state.get(WEIGHT_FILES_KEY), list):
                state[WEIGHT_FILES_KEY] = {f: read_weights(checkpoint / f, aliases) for f in state[WEIGHT_FILES_KEY]}
    return trainer_state


def read_callback_state(checkpoint: Path, name: str, model: nn.Module) -> dict[str, Any]:
    """One callback's saved state in ``checkpoint``, its weight files read back (this process only)."""
    state = safe_torch_load(Path(checkpoint) / "trainer_state.pt")
    read_weight_files(state, Path(checkpoint), alias_groups(unwrap(model)), only=name)
    saved = state.get("callbacks", {})
    return saved.get(name, {}) if isinstance(saved, dict) else {}


def save_training_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: Any,
    trainer_state: dict[str, Any],
    config_yaml: str,
    tokenizer_path: Path,
    keep: int,
) -> Path | None:
    """Collective: every rank calls it; rank 0 writes. Returns the path on rank 0."""
    model = unwrap_compiled(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, _optimizers(optimizer), options=options)
    path, error = None, None
    if distributed.is_main_process():
        aliases = alias_groups(unwrap(model))
        trainer_state, weight_files = split_weight_files(trainer_state)
        writers = {
            "model.safetensors": lambda p: save_weights(weights, p, aliases),
            "optimizer.pt": lambda p: torch.save(optim_state, p),
            "trainer_state.pt": lambda p: torch.save(trainer_state, p),
            "config.yaml": lambda p: p.write_text(config_yaml),
            "tokenizer.json": lambda p: shutil.copyfile(tokenizer_path, p),
            **{name: (lambda p, t=t: save_weights(t, p, aliases)) for name, t in weight_files.items()},
        }
        # The working directory resolves relative paths in config.yaml (the data directory)
        # when the checkpoint is evaluated from elsewhere.
        meta = {"format": FORMAT, "world_size": distributed.world_size(), "working_dir": os.getcwd()}
        try:
            # Disk full, quota, file-size limit, I/O error: write_checkpoint_dir turns what
            # the writers raise (OSError, torch's RuntimeError, SafetensorError) into
            # CheckpointError and removes the temporary directory.
            path = write_checkpoint_dir(checkpoints_dir, step, writers, meta)
        except CheckpointError as exc:
            error = str(exc)
        else:
            try:
                prune_checkpoints(checkpoints_dir, keep)
            except OSError as exc:  # the new checkpoint is saved; older ones merely stay
                log.warning("%s: pruning old checkpoints failed (%s)", checkpoints_dir, exc)
    # Also the barrier that keeps ranks together while rank 0 writes.
    error = distributed.broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)
    return path


def load_training_checkpoint(checkpoint: Path, model: nn.Module, optimizer: Any | None) -> dict[str, Any]:
    """Collective: verify checksums, restore weights and optimizer in place, return the trainer state.

    Rank 0 reads the files and broadcasts; the other ranks receive their part. ``optimizer`` None:
    the weights only (a run started from another run's weights, ``--init-from``).
    """
    model = unwrap_compiled(model)
    main = distributed.is_main_process()
    weights: dict[str, Any] = {}
    optim_state: dict[str, Any] = {}
    error = None
    if main:
        try:
            manifest = verify_checkpoint_dir(checkpoint)
            if manifest.get("format") != FORMAT:
                raise CheckpointError(f"{checkpoint}: format {manifest.get('format')!r}, this lmforge reads {FORMAT!r}")
            weights = read_weights(checkpoint / "model.safetensors", alias_groups(unwrap(model)))
            check_weight_names(unwrap(model).state_dict().keys(), weights.keys(), checkpoint)
            if optimizer is not None:
                optim_state = safe_torch_load(checkpoint / "optimizer.pt")
        except CheckpointError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed.is_distributed(), strict=True)
    try:
        set_model_state_dict(model, weights, options=options)
        if optimizer is not None:
            set_optimizer_state_dict(model, _optimizers(optimizer), optim_state, options=options)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{checkpoint}: does not match this model or optimizer ({exc})") from exc
    state = None
    if main:
        state = read_weight_files(safe_torch_load(checkpoint / "trainer_state.pt"), checkpoint,
                                  alias_groups(unwrap(model)))
    return distributed.broadcast_object(state)  # type: ignore[return-value]
