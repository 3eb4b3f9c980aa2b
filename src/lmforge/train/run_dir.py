"""The run directory: resolved config, code version, data manifest, metrics, checkpoints.

``runs/<name>/`` is one folder per run. Its name is a single path component
(``validate_run_name``); it carries a marker, ``.lmforge-run`` (a random run id, when it
was created, and the working directory relative paths in its config are resolved
against), so that ``remove_run_dir`` can delete a run directory and nothing else; and one
process at a time writes into it (``lmforge.core.run_lock.RunLock`` on ``.lock``).

Run directories written before markers existed are recognised by their contents:
``config.yaml`` and ``metrics.jsonl`` present and nothing but files lmforge writes there.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.core.code_version import code_version
from lmforge.core.config import read_yaml
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.io import atomic_write_json, atomic_write_text, unreplaceable_folder_reason
from lmforge.core.logging import get_logger
from lmforge.core.metrics_file import append_metrics
from lmforge.core.run_lock import LOCK_FILE, RunLock
from lmforge.core.run_marker import MARKER, MARKER_FORMAT, read_marker, resolve_data_dir
from lmforge.nn.families import model_config_from_dict

if TYPE_CHECKING:  # train.config imports validate_run_name from here
    from lmforge.train.config import RunConfig

# Everything lmforge writes at the top of a run directory: ``--fresh`` deletes a run directory
# only if it holds nothing else. ``query_encoder`` is the default output of
# ``lmforge retrieval train-query-encoder RUN``; eval/ holds ``lmforge eval``'s results.
RUN_ENTRIES = frozenset({
    "config.yaml", "metrics.jsonl", "checkpoints", "eval", "report.html", "code_version.json",
    "code.diff", "data_manifest.json", "tokenizer.json", "model_card.json", "tensorboard",
    "query_encoder", "lineage.json", "time_budget.json", MARKER, LOCK_FILE,
})
log = get_logger(__name__)
__all__ = ["MARKER", "init_run_dir", "read_marker", "record_resume", "remove_run_dir", "resolve_data_dir",
           "run_path", "validate_run_name"]


def validate_run_name(name: object) -> str:
    """Return ``name`` if it is a usable run name, else raise ConfigError saying why.

    A run name becomes ``runs_dir/<name>``: it must be exactly one folder name, so that a
    run never writes into (or ``--fresh`` never deletes) ``runs_dir`` itself or its parent.
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is empty"
    elif name in (".", ".."):
        problem = "it names the runs folder or its parent, not a folder of its own"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        problem = "it contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "it contains a control character"
    elif name != name.strip():
        problem = "it starts or ends with whitespace"
    elif name.startswith("-"):
        problem = "it starts with '-' (it would read as a command-line option)"
    elif len(name.encode("utf-8", "surrogateescape")) > 255:
        problem = "it is longer than a file name may be (255 bytes)"
    if problem:
        raise ConfigError(f"name: {name!r} cannot name a run: {problem}; a run name is a single folder "
                          "name, e.g. --set name=my_run")
    return name  # type: ignore[return-value]


def run_path(cfg: "RunConfig") -> Path:
    return Path(cfg.runs_dir) / validate_run_name(cfg.name)


def _left_by_an_atomic_write(name: str) -> bool:
    """A temporary file of ``core.io.atomic_write`` (``.<name>.<random>.tmp``) left by a killed
    process while it rewrote one of the run directory's files."""
    return name.endswith(".tmp") and any(name.startswith(f".{entry}.") for entry in RUN_ENTRIES)


def _unexpected_entries(path: Path) -> list[str]:
    """What lmforge does not write in a run directory: at its top, and in ``checkpoints/``
    (``step_N`` folders, their temporary ``.step_N...`` copies, ``abandoned/``, write probes)."""
    found = [name for name in sorted(os.listdir(path))
             if name not in RUN_ENTRIES and not _left_by_an_atomic_write(name)]
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for name in sorted(os.listdir(checkpoints)):
            if not name.startswith(("step_", ".step_", ".write_probe.")) and name != "abandoned":
                found.append(f"checkpoints/{name}")
    return found


def _legacy_problems(path: Path) -> list[str]:
    """Why ``path`` (without a marker) does not look like a run directory; empty if it does."""
    problems = [f"no {name}" for name in ("config.yaml", "metrics.jsonl") if not (path / name).is_file()]
    return problems + [f"unexpected {name!r}" for name in _unexpected_entries(path)]


def _entries_besides_lock(path: Path) -> list[str]:
    return sorted(name for name in os.listdir(path) if name != LOCK_FILE)


def _check_target(path: Path) -> None:
    """Refuse to write a run into an existing folder that is not a run directory."""
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise LmforgeError(f"{path} exists and is not a folder; choose another name (--set name=...)")
    if read_marker(path) is not None or not _entries_besides_lock(path):
        return
    problems = _legacy_problems(path)
    if problems:
        shown = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise LmforgeError(f"{path} exists and is not an lmforge run directory ({shown}); "
                           "choose another name (--set name=...) or runs_dir")


def _marker(path: Path) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    marker = read_marker(path) or {"format": MARKER_FORMAT, "run_id": uuid.uuid4().hex, "created": now}
    # The latest session's working directory: config.yaml is rewritten by each session too.
    marker.update({"working_dir": os.getcwd(), "host": socket.gethostname(), "updated": now})
    return marker


def init_run_dir(cfg: "RunConfig", data_dir: Path, resuming: bool) -> Path:
    """Create ``runs/<name>/`` and record what this run is.

    A fresh run refuses a directory that already holds checkpoints or metrics of another
    run (pass ``--resume auto`` to continue it), so nothing already written is lost; any
    run refuses an existing folder that is not a run directory. A write that fails (disk
    full, permissions) is one LmforgeError naming the directory.
    """
    path = run_path(cfg)
    config_file = path / "config.yaml"
    _check_target(path)
    if not resuming and (path / "metrics.jsonl").exists():
        raise LmforgeError(
            f"{path} already holds a run; use --resume auto to continue it, "
            "or choose another name (--set name=...)"
        )
    if resuming and config_file.exists():
        previous = read_yaml(config_file)
        # Compared as parsed configs, so a key added since the run was written (with its
        # default value, e.g. model.family) is not a difference.
        if not isinstance(previous.get("model"), dict) or model_config_from_dict(previous["model"]) != cfg.model:
            raise LmforgeError(f"{path}: the model config differs from the run being resumed")
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / MARKER, _marker(path))
        atomic_write_text(config_file, cfg.to_yaml())
        version = code_version()
        atomic_write_json(path / "code_version.json", version)
        if version["diff"]:
            atomic_write_text(path / "code.diff", str(version["diff"]))
        shutil.copyfile(data_dir / "manifest.json", path / "data_manifest.json")
        shutil.copyfile(data_dir / "tokenizer.json", path / "tokenizer.json")
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise LmforgeError(f"{path}: cannot write the run directory: {exc.strerror or exc}{where}; "
                           "free space or choose another runs_dir") from exc
    return path


def remove_run_dir(path: str | Path) -> bool:
    """Delete the run directory ``path`` (``--fresh``); False if there was nothing to delete.

    Only a run directory that holds nothing lmforge did not write is deleted: one with
    lmforge's marker, or a run from before markers existed (``config.yaml`` and
    ``metrics.jsonl``). Refused with LmforgeError: a run holding other files (the user's
    notes, notebooks: ``RUN_ENTRIES``), a symbolic link, anything else, the filesystem root,
    the home or working directory or their parents, a git repository, lmforge's source, and a
    run that another process is training (its lock is held). The folder is renamed aside
    first, so an interrupted deletion never leaves a half-deleted run under the run's name.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return False
    reason = unreplaceable_folder_reason(path)
    if reason:
        raise LmforgeError(f"{path} is {reason}; not deleting it")
    if read_marker(path) is None:
        problems = _legacy_problems(path)
        if problems:
            shown = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise LmforgeError(f"{path} is not an lmforge run directory ({shown}); not deleting it — "
                               f"remove it by hand if you mean to (rm -r {path})")
    else:
        # A marked run may still hold the user's own files (notes, notebooks): never delete those.
        foreign = _unexpected_entries(path)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise LmforgeError(f"{path} holds files lmforge did not write ({shown}); not deleting it — move "
                               f"them out of the run directory, or delete it by hand (rm -r {path})")
    with RunLock(path, purpose="deleting the run directory"):
        doomed = path.parent / f".{path.name}.deleting.{os.getpid()}"
        try:
            os.rename(path, doomed)
        except OSError as exc:
            raise LmforgeError(f"{path}: cannot delete it ({exc.strerror or exc})") from exc
    shutil.rmtree(doomed, ignore_errors=True)
    log.info("deleted %s", path)
    return True


def record_resume(run_dir: Path, step: int, checkpoint: Path | None, retired: list[Path],
                  config_changes: list[tuple[str, Any, Any]]) -> dict[str, Any]:
    """Log a resume and append it to ``metrics.jsonl`` as ``{"kind": "resume", ...}``.

    Records logged after ``step`` before this one belong to an abandoned branch;
    ``lmforge.core.metrics_file.current_branch`` drops them. ``config_changes`` are the
    ``(field, old, new)`` settings the resolved config changed relative to the checkpoint.
    ``checkpoint`` None with ``step`` 0: ``--resume auto`` found no checkpoint, the run
    starts over and what an earlier attempt logged is abandoned.
    """
    for field, old, new in config_changes:
        log.warning("resuming with %s = %r (the checkpoint had %r)", field, new, old)
    record = {
        "kind": "resume",
        "step": int(step),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "retired": [str(p) for p in retired],
        "config_changes": [{"field": f, "old": o, "new": n} for f, o, n in config_changes],
    }
    append_metrics(Path(run_dir) / "metrics.jsonl", record)
    return record


def check_run_target(path: Path) -> None:
    """Raise LmforgeError if ``path`` exists and is not a run directory (before anything, even
    the lock file, is written into it)."""
    _check_target(Path(path))
