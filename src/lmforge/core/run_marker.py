"""The marker of a run directory, and paths its config holds relative to where it ran.

``runs/<name>/.lmforge-run`` (JSON) says "this folder is an lmforge run": a random run id,
when it was created, and the working directory of the latest session, against which the
relative paths in the run's ``config.yaml`` (``data.out_dir``) were resolved. Checkpoint
manifests record the working directory too. Here in ``core`` so that every layer that loads
a run (eval, retrieval, serve) can find its data from any directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from lmforge.core.errors import DataError
from lmforge.core.io import read_json

MARKER = ".lmforge-run"
MARKER_FORMAT = "lmforge-run"


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a run directory, or None if ``path`` has no valid one."""
    try:
        marker = read_json(Path(path) / MARKER)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    return marker


def _recorded_working_dirs(target: Path) -> Iterable[Path]:
    """Working directories recorded by the checkpoint ``target`` (its manifest) and by the
    run directory holding it (the marker), nearest first."""
    manifest = target / "manifest.json"
    if manifest.is_file():
        try:
            recorded = read_json(manifest).get("working_dir")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded:
            yield Path(recorded)
    for folder in [target, *list(target.parents)[:4]]:
        marker = read_marker(folder)
        if marker is not None:
            if marker.get("working_dir"):
                yield Path(marker["working_dir"])
            return


def resolve_data_dir(target: str | Path, data_out_dir: str | Path) -> Path:
    """Where a run's prepared data is, given its (possibly relative) ``data.out_dir``.

    ``target``: the run directory or a checkpoint of it. A relative path in the saved
    config was relative to the directory the run was trained in; it is looked up there
    (recorded in the checkpoint's manifest and the run's marker), then in the current
    directory. Raises DataError naming every place tried.
    """
    data = Path(data_out_dir).expanduser()
    if data.is_absolute():
        return data
    tried: list[Path] = []
    for base in [*_recorded_working_dirs(Path(target).absolute()), Path.cwd()]:
        candidate = (base / data).absolute()
        if candidate in tried:
            continue
        if candidate.is_dir():
            return candidate
        tried.append(candidate)
    raise DataError(f"data directory {str(data_out_dir)!r} of {target} not found (tried "
                    f"{', '.join(str(p) for p in tried)}); run from the directory the run was trained in, "
                    "or prepare the data again with `lmforge data prepare`")
