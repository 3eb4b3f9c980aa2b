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
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.core.errors import CheckpointError
from lmforge.core.io import (
    apply_default_modes,
    atomic_write_json,
    default_file_mode,
    exchange_paths,
    fsync_dir,
    make_temp_dir,
    read_json,
    sha256_file,
)
from lmforge.core.logging import get_logger

MANIFEST = "manifest.json"
ABANDONED = "abandoned"  # checkpoints of branches left by resuming from an older step
STEP_DIR = re.compile(r"^step_(\d+)$")
log = get_logger(__name__)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# What the writers really raise when a write fails: OSError from Python file I/O,
# RuntimeError from torch.save ("PytorchStreamWriter failed writing file", "unexpected pos"
# on ENOSPC/EFBIG), SafetensorError from safetensors ("I/O error: No space left on device").
def _write_errors() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return (OSError, RuntimeError)
    return (OSError, RuntimeError, SafetensorError)


def write_checkpoint_dir(
    checkpoints_dir: Path, step: int, writers: dict[str, Callable[[Path], None]], meta: dict[str, Any]
) -> Path:
    """Write files by calling ``writers[name](path)``, then the manifest, then rename.

    A failed write (disk full, quota, file-size limit, I/O error) raises CheckpointError
    naming the file; the temporary directory is removed and earlier checkpoints are intact.
    """
    final = checkpoints_dir / step_dir_name(step)
    errors = _write_errors()
    current = "the temporary directory"
    tmp: Path | None = None
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(final)
        files = {}
        for name, write in writers.items():
            current = name
            path = tmp / name
            write(path)
            os.chmod(path, default_file_mode())  # safetensors writes 0600
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        current = MANIFEST
        atomic_write_json(tmp / MANIFEST, {"step": step, "files": files, **meta})
        fsync_dir(tmp)
        current = "the final rename"
        if final.exists() and exchange_paths(tmp, final):
            # Same step saved twice (e.g. the final save right after a periodic one): the new
            # folder takes the name in one step, so step N exists at every moment.
            fsync_dir(checkpoints_dir)
            shutil.rmtree(tmp, ignore_errors=True)  # now the replaced copy
            tmp = None
        else:
            if final.exists():  # no atomic exchange on this system: the old copy goes first
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(checkpoints_dir)
    except errors as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{checkpoints_dir}: saving step {step} failed while writing {current} "
            f"({_describe_error(exc)}); earlier checkpoints are intact"
        ) from exc
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror if exc.errno is None else f"{exc.strerror} [errno {exc.errno}]"
    return f"{type(exc).__name__}: {exc}"


def check_writable(directory: Path, needed_bytes: int = 0) -> None:
    """Fail now, not after the whole run, if checkpoints cannot be written to ``directory``.

    Creates the directory, writes, fsyncs and removes a small probe file. With
    ``needed_bytes`` (an estimate of one checkpoint's size), too little free space is
    logged as a warning: space may be freed before the first save.
    """
    directory = Path(directory)
    probe = directory / f".write_probe.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"lmforge write probe\n" * 64)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise CheckpointError(
            f"{directory}: checkpoints cannot be written there ({_describe_error(exc)}); "
            "free space, fix permissions or choose another runs_dir"
        ) from exc
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    if needed_bytes > 0:
        free = shutil.disk_usage(directory).free
        if free < needed_bytes:
            log.warning("%s: %.1f MB free, one checkpoint needs about %.1f MB; saves will fail "
                        "unless space is freed", directory, free / 1e6, needed_bytes / 1e6)


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
    """Checkpoint directories, oldest first (temporary directories and ``abandoned/`` are ignored)."""
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
    """Keep the newest ``keep`` checkpoints; remove leftovers of interrupted saves too.

    Only ``step_N`` and ``.step_N.*`` folders directly under ``checkpoints_dir`` are
    considered: retired branches under ``abandoned/`` are never deleted.
    """
    for stale in checkpoints_dir.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    existing = list_checkpoints(checkpoints_dir)
    for old in existing[: max(len(existing) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint was saved at: from its manifest, else from its ``step_N`` name."""
    checkpoint = Path(checkpoint)
    try:
        return int(read_json(checkpoint / MANIFEST)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = STEP_DIR.match(checkpoint.name)
        if match is None:
            raise CheckpointError(f"{checkpoint}: cannot tell its step (no manifest, not named step_N)") from None
        return int(match.group(1))


def new_abandoned_folder(checkpoints_dir: Path) -> Path:
    """A new, empty ``checkpoints/abandoned/<UTC time>[_n]/`` for what a branch leaves behind."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = Path(checkpoints_dir) / ABANDONED / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = Path(checkpoints_dir) / ABANDONED / f"{stamp}_{suffix}"
    target.mkdir(parents=True)
    return target


def adopt_checkpoint(checkpoint: Path, checkpoints_dir: Path) -> Path:
    """Copy a checkpoint from outside the run (a backup, another run, ``abandoned/``) into
    ``checkpoints_dir/step_N``, verified, under a temporary name renamed into place.

    A branch started from it then has its first checkpoint inside the run, so a crash or a
    preemption before the next save resumes the branch (``--resume auto``) instead of finding
    nothing and starting over.
    """
    checkpoint = Path(checkpoint)
    final = Path(checkpoints_dir) / step_dir_name(checkpoint_step(checkpoint))
    tmp: Path | None = None
    try:
        tmp = make_temp_dir(final)
        shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
        verify_checkpoint_dir(tmp)
        apply_default_modes(tmp)
        fsync_dir(tmp)
        os.replace(tmp, final)  # the branch retired every checkpoint of the run: final is free
        fsync_dir(Path(checkpoints_dir))
    except _write_errors() as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{checkpoints_dir}: copying {checkpoint} into the run failed "
                              f"({_describe_error(exc)})") from exc
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def retire_later_checkpoints(checkpoints_dir: Path, checkpoint: Path) -> list[Path]:
    """Move the checkpoints of an abandoned branch out of the way; return their new paths.

    A run resumed from ``checkpoint`` starts a new branch of history. If ``checkpoint``
    lies directly in ``checkpoints_dir``, the ones saved after it belong to the old
    branch; if it lies elsewhere (another run, a backup, ``abandoned/``), none of the
    checkpoints in ``checkpoints_dir`` is on the new branch. Left in place, ``--resume
    auto`` after a crash would jump back to them. They are moved — never deleted — to
    ``abandoned/<UTC time>/`` with a ``retired.json`` note; ``list_checkpoints``,
    ``latest_valid_checkpoint`` and pruning look only at ``step_N`` folders directly under
    ``checkpoints_dir``, so they never touch them.
    """
    checkpoints_dir, checkpoint = Path(checkpoints_dir), Path(checkpoint)
    step = checkpoint_step(checkpoint)
    same = checkpoint.resolve()
    inside = same.parent == checkpoints_dir.resolve()
    later = [
        p for p in list_checkpoints(checkpoints_dir)
        if p.resolve() != same and (not inside or checkpoint_step_from_name(p) > step)
    ]
    if not later:
        return []
    try:
        target = new_abandoned_folder(checkpoints_dir)
        stamp = target.name
        atomic_write_json(target / "retired.json", {
            "resumed_from": str(checkpoint), "resumed_step": step,
            "retired": [p.name for p in later], "time": stamp,
        })
        moved = []
        for path in later:
            destination = target / path.name
            os.replace(path, destination)  # same filesystem: a rename, nothing is copied
            moved.append(destination)
        fsync_dir(target)
        fsync_dir(checkpoints_dir)
    except OSError as exc:
        raise CheckpointError(
            f"{checkpoints_dir}: could not move the checkpoints after step {step} aside "
            f"({_describe_error(exc)}); move {[p.name for p in later]} out of {checkpoints_dir} by hand"
        ) from exc
    log.warning("resumed from step %d: moved %d checkpoint(s) of the abandoned branch (%s) to %s",
                step, len(moved), ", ".join(p.name for p in later), target)
    return moved


def checkpoint_step_from_name(path: Path) -> int:
    match = STEP_DIR.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name (step_N)")
    return int(match.group(1))


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


# The weights a checkpoint may hold, by the name ``--weights`` gives them: the trained weights,
# and the averages of train/averaging.py (written only by runs that keep them).
WEIGHT_FILES = {"raw": "model.safetensors", "ema": "ema.safetensors", "window": "window.safetensors"}


def load_safetensors_weights(model: torch.nn.Module, checkpoint: Path, file_name: str = "model.safetensors") -> None:
    """Load ``checkpoint/file_name`` into a plain model; any mismatch is a CheckpointError."""
    tensors = read_weights(checkpoint / file_name, alias_groups(model))
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
