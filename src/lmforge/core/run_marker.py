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
from lmforge.core.io import read_json, sha256_file

MARKER = ".lmforge-run"
MARKER_FORMAT = "lmforge-run"
TOKENIZER_FILE = "tokenizer.json"  # in prepared data, a run directory and each checkpoint


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


def _tokenizer_digest(folder: Path) -> str | None:
    """sha256 of ``folder/tokenizer.json``; None if there is none to read."""
    try:
        return sha256_file(folder / TOKENIZER_FILE)
    except OSError:
        return None


def resolve_data_dir(target: str | Path, data_out_dir: str | Path) -> Path:
    """Where a run's prepared data is, given its (possibly relative) ``data.out_dir``.

    ``target``: the run directory or a checkpoint of it. A relative path in the saved
    config was relative to the directory the run was trained in; it is looked up there
    (recorded in the checkpoint's manifest and the run's marker), then in the current
    directory. A folder whose ``tokenizer.json`` differs from the target's (data prepared
    again with other settings) is skipped: scored with another tokenizer, bits-per-byte
    would be wrong without any error. Raises DataError naming every place tried and why.
    An absolute path that does not exist is returned as given.
    """
    data = Path(data_out_dir).expanduser()
    target = Path(target).absolute()
    expected = _tokenizer_digest(target)  # None (a target without one): nothing to compare
    bases = [None] if data.is_absolute() else [*_recorded_working_dirs(target), Path.cwd()]
    candidates = list(dict.fromkeys(data if base is None else (base / data).absolute() for base in bases))
    tried: list[str] = []
    for candidate in candidates:
        if not candidate.is_dir():
            tried.append(f"{candidate}: not found")
            continue
        if expected is not None:
            found = _tokenizer_digest(candidate)
            if found != expected:
                tried.append(f"{candidate}: " + ("no tokenizer.json" if found is None else
                                                  f"holds another tokenizer than {target / TOKENIZER_FILE}"))
                continue
        return candidate
    if data.is_absolute() and not candidates[0].is_dir():
        return data  # the caller says what is missing there
    raise DataError(f"data directory {str(data_out_dir)!r} of {target}: no folder with the run's data (tried "
                    f"{'; '.join(tried)}); run from the directory the run was trained in, or prepare the data "
                    "again with the run's config (`lmforge data prepare`)")
