"""Checkpoint directories: atomic, checksummed, safe to load.

A checkpoint is a directory ``step_000123/`` holding files plus ``manifest.json`` (sha256
and size of every file), written last. The directory is first written under a temporary
name, every file fsynced, then renamed into place: a reader sees either the whole
checkpoint or nothing, and a failed save (disk full, kill) leaves older checkpoints intact.

Tensors are stored with safetensors or ``torch.save`` of plain containers; loading uses
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.core.errors import CheckpointError
from lmforge.core.io import atomic_write_json, fsync_dir, read_json, sha256_file
from lmforge.core.logging import get_logger

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
log = get_logger(__name__)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def write_checkpoint_dir(
    checkpoints_dir: Path, step: int, writers: dict[str, Callable[[Path], None]], meta: dict[str, Any]
) -> Path:
    """Write files by calling ``writers[name](path)``, then the manifest, then rename."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=checkpoints_dir))
    try:
        files = {}
        for name, write in writers.items():
            path = tmp / name
            write(path)
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        atomic_write_json(tmp / MANIFEST, {"step": step, "files": files, **meta})
        fsync_dir(tmp)
        if final.exists():
            # Same step saved twice (e.g. final save right after a periodic one): replace.
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_checkpoint_dir(path: Path) -> dict[str, Any]:
    """Return the manifest if every listed file is present with its checksum; else raise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete or not a checkpoint)")
    try:
        manifest = read_json(manifest_path)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    for name, entry in files.items():
        file_path = path / name
        if not file_path.is_file():
            raise CheckpointError(f"{path}: missing file {name}")
        size = file_path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{file_path}: truncated or altered ({size} bytes, manifest says {entry['bytes']})"
            )
        if sha256_file(file_path) != entry["sha256"]:
            raise CheckpointError(f"{file_path}: checksum mismatch (corrupt checkpoint)")
    return manifest


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoint directories, oldest first (temporary directories are ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_valid_checkpoint(checkpoints_dir: Path) -> Path | None:
    """Newest checkpoint that verifies; corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint_dir(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
            continue
        return path
    return None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; remove leftovers of interrupted saves too."""
    for stale in checkpoints_dir.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    existing = list_checkpoints(checkpoints_dir)
    for old in existing[: max(len(existing) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (no pickled code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError and others for unsafe/corrupt files
        raise CheckpointError(f"{path}: refused or unreadable ({type(exc).__name__}: {exc})") from exc


def alias_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (e.g. tied embedding and output head), in model order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, aliases: list[list[str]]) -> None:
    """Write a full state dict as safetensors, storing each shared tensor once (first name)."""
    from safetensors.torch import save_file

    skip = {name for names in aliases for name in names[1:]}
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items() if k not in skip}
    save_file(tensors, str(path), metadata={"format": "pt"})


def read_weights(path: Path, aliases: list[list[str]]) -> dict[str, torch.Tensor]:
    """Read a safetensors weights file (no code can run) and fill in shared-tensor aliases."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for bad headers
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from exc
    for names in aliases:
        present = [n for n in names if n in tensors]
        if present:
            for name in names:
                tensors.setdefault(name, tensors[present[0]])
    return tensors


def load_safetensors_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load ``checkpoint/model.safetensors`` into a plain model; any mismatch is a CheckpointError."""
    tensors = read_weights(checkpoint / "model.safetensors", alias_groups(model))
    check_weight_names(model.state_dict().keys(), tensors.keys(), checkpoint)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{checkpoint}: weights do not fit the model ({exc})") from exc


def check_weight_names(expected: Any, found: Any, checkpoint: Path) -> None:
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint}: weights do not match the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
