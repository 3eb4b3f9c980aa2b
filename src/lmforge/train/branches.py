"""Resuming starts a branch: what the abandoned history left behind is moved aside, never lost.

A run resumed from step S (``--resume auto`` after a crash, or an explicit older checkpoint)
continues a history in which nothing after S happened. Left in place, the old history's later
checkpoints would be what ``--resume auto`` picks after the next crash, and its
``eval/final.json`` would say the run had finished (the ladder, mixture sweep and report read it).
So, on rank 0, at each resume:

- later checkpoints move to ``checkpoints/abandoned/<time>/`` (a checkpoint from outside the run:
  all of the run's checkpoints move, and the resumed one is copied in as ``step_S``, so the new
  branch has a checkpoint of its own from its first step);
- evaluation files of steps after S (``eval/step_N*.json``, ``eval/final.json``) move to
  ``abandoned/<time>/eval/``;
- ``metrics.jsonl`` gets a ``resume`` record; readers drop what was logged after S before it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lmforge.core.checkpoint_files import adopt_checkpoint, new_abandoned_folder, retire_later_checkpoints
from lmforge.core.errors import CheckpointError
from lmforge.core.io import fsync_dir
from lmforge.core.logging import get_logger
from lmforge.train.run_dir import record_resume

log = get_logger(__name__)
_STEP_FILE = re.compile(r"^step_(\d+)\.")


def _evaluation_step(path: Path) -> int | None:
    match = _STEP_FILE.match(path.name)
    if match:
        return int(match.group(1))
    if path.name == "final.json":
        try:
            return int(json.loads(path.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def retire_later_evaluations(run_dir: Path, step: int, abandoned: Path | None) -> list[Path]:
    """Move ``eval/`` files of steps after ``step`` into ``abandoned/eval/`` (a new abandoned
    folder if None is given); return their new paths."""
    eval_dir = Path(run_dir) / "eval"
    later = [p for p in sorted(eval_dir.glob("*.json")) if (s := _evaluation_step(p)) is not None and s > step]
    if not later:
        return []
    try:
        target = (abandoned or new_abandoned_folder(Path(run_dir) / "checkpoints")) / "eval"
        target.mkdir(parents=True, exist_ok=True)
        moved = []
        for path in later:
            os.replace(path, target / path.name)
            moved.append(target / path.name)
        fsync_dir(target)
    except OSError as exc:
        raise CheckpointError(f"{eval_dir}: could not move the evaluations after step {step} aside "
                              f"({exc.strerror or exc}); move {[p.name for p in later]} out by hand") from exc
    log.warning("resumed from step %d: moved %d evaluation file(s) of the abandoned branch to %s",
                step, len(moved), target)
    return moved


def start_branch(run_dir: Path, checkpoint: Path, step: int,
                 config_changes: list[tuple[str, Any, Any]]) -> Path:
    """Everything a resume from ``checkpoint`` (at ``step``) moves aside and records (module
    docstring); returns the run's own copy of the checkpoint the branch starts from."""
    checkpoints = Path(run_dir) / "checkpoints"
    retired = retire_later_checkpoints(checkpoints, checkpoint)
    own = checkpoint
    if Path(checkpoint).resolve().parent != checkpoints.resolve():
        own = adopt_checkpoint(checkpoint, checkpoints)
        log.info("copied %s into the run as %s: the new branch's first checkpoint", checkpoint, own)
    retired += retire_later_evaluations(run_dir, step, retired[0].parent if retired else None)
    record_resume(run_dir, step, checkpoint, retired, config_changes)
    return own


def _flatten(section: Any, prefix: str) -> dict[str, Any]:
    if isinstance(section, dict):
        out: dict[str, Any] = {}
        for key, value in section.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out
    return {prefix: section}


def config_differences(previous: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every setting of the data, optim, train, eval and retrieval
    sections that a resumed run changes. Keys the older config did not have (settings added to
    lmforge since) are not changes; a changed model is refused elsewhere."""
    changes = []
    for section in ("data", "optim", "train", "eval", "retrieval"):
        old, new = _flatten(previous.get(section), section), _flatten(current.get(section), section)
        changes += [(key, old[key], new[key]) for key in new if key in old and old[key] != new[key]]
    return changes
