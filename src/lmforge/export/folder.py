"""An export folder: where one may be written, its marker, and replacing one without loss.

Every export lmforge writes holds a marker, ``lmforge_export.json``, that lists the files
written. ``overwrite`` replaces only such a folder, and only while it holds nothing but those
files, so a folder of the user's own is never deleted. The working directory (and its
parents), the home folder, the filesystem root and git repositories are refused outright.
The new export is written beside the old one and swapped in by renaming, so the path always
holds one complete export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lmforge.core.errors import LmforgeError
from lmforge.core.io import apply_default_modes, exchange_paths, fsync_dir, unreplaceable_folder_reason

MARKER = "lmforge_export.json"
MARKER_FORMAT = "lmforge-hf-export"


class ExportError(LmforgeError):
    """The model cannot be exported as asked (format, or where it would be written)."""


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Raise ExportError unless ``out_dir`` is free, or (with ``overwrite``) an lmforge export
    holding only the files lmforge wrote there."""
    if not os.path.lexists(out_dir):
        return
    refusal = unreplaceable_folder_reason(out_dir)
    if refusal:
        raise ExportError(f"--out {out_dir} is {refusal}; an export needs a folder of its own")
    if not overwrite:
        raise ExportError(f"--out {out_dir} exists; choose another --out, or pass --overwrite to replace "
                          "an earlier lmforge export")
    recorded = read_marker(out_dir)
    if recorded is None:
        raise ExportError(f"--out {out_dir} is not an lmforge export (it has no valid {MARKER}); --overwrite "
                          "only replaces a folder lmforge exported. Choose another --out")
    foreign = _unrecorded_entries(out_dir, recorded)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(f"--out {out_dir} holds files lmforge did not write ({shown}); move them out or "
                          "choose another --out")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of an lmforge export, or None if ``folder`` is not one."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    if not isinstance(marker.get("files"), list) or not all(isinstance(f, str) for f in marker["files"]):
        return None
    return marker


def _unrecorded_entries(folder: Path, marker: dict[str, Any]) -> list[str]:
    """Files and folders under ``folder`` that the marker does not account for."""
    allowed = set(marker["files"]) | {MARKER}
    allowed |= {parent.as_posix() for name in allowed for parent in Path(name).parents}
    found = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs) + sorted(files):
            relative = (Path(root) / name).relative_to(folder).as_posix()
            if relative not in allowed:
                found.append(relative)
    return sorted(found)


def new_folder_beside(out_dir: Path) -> Path:
    """An empty folder next to ``out_dir`` (same filesystem, so the final rename is atomic)."""
    for ancestor in out_dir.parents:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise ExportError(f"cannot create {out_dir}: {ancestor} is a file, not a folder")
            break
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    except OSError as exc:
        raise ExportError(f"cannot write in {out_dir.parent}: {exc.strerror or exc}") from exc


def finish(folder: Path, summary: dict[str, Any]) -> None:
    """Give the finished export the usual permissions and write its marker (last: a folder with
    a marker is complete)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    (folder / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, **summary, "files": files}, indent=2) + "\n")
    # mkdtemp makes the folder 0700 and safetensors writes weights 0600; apply the umask like
    # every other file instead.
    apply_default_modes(folder)


def install(folder: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished export ``folder`` to ``out_dir``, replacing an earlier export there.

    The target is checked again first: the export can take minutes and the folder may have
    changed since. On any error ``folder`` is left for the caller to remove and ``out_dir`` is
    unchanged.
    """
    check_target(out_dir, overwrite)
    earlier = None  # where the replaced export ends up, removed once the new one is in place
    try:
        if not os.path.lexists(out_dir):
            os.rename(folder, out_dir)  # fails if a non-empty folder appeared meanwhile
        elif exchange_paths(folder, out_dir):
            earlier = folder
        else:
            earlier = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.rename(out_dir, earlier / "export")
            try:
                os.rename(folder, out_dir)
            except BaseException:
                os.rename(earlier / "export", out_dir)
                earlier.rmdir()
                raise
    except OSError as exc:
        raise ExportError(f"cannot move the export to {out_dir}: {exc.strerror or exc}") from exc
    fsync_dir(out_dir.parent)
    if earlier is not None:
        shutil.rmtree(earlier)  # checked above to hold only lmforge's files
