"""Record the code that produced a run: git commit and the uncommitted diff."""

from __future__ import annotations

import subprocess
from pathlib import Path

import lmforge


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def code_version() -> dict[str, str | bool | None]:
    """Commit hash, dirty flag and diff of the lmforge source tree (None outside git)."""
    source = Path(lmforge.__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], source)
    diff = _git(["diff", "HEAD", "--", "."], source.parent.parent) if commit else None
    return {
        "version": lmforge.__version__,
        "commit": commit.strip() if commit else None,
        "dirty": bool(diff),
        "diff": diff or "",
    }
