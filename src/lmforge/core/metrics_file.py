"""``metrics.jsonl``: one JSON object per line, appended as training goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one record and flush, so a killed run keeps everything logged before the kill."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def read_metrics(path: Path, all_branches: bool = False) -> list[dict[str, Any]]:
    """The records of the run's current branch (see :func:`current_branch`; ``all_branches``: every
    record ever appended); a truncated last line (from a killed run) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records if all_branches else current_branch(records)


def current_branch(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` without those of abandoned branches.

    A resumed run appends ``{"kind": "resume", "step": S, ...}``: everything logged before
    it for steps after S belongs to the history the resume abandoned (a crash's last steps,
    or the later steps of a run resumed from an older checkpoint) and is dropped. Records
    without a step are kept. Readers that keep the last record per step then see one
    consistent history.
    """
    kept: list[dict[str, Any]] = []
    for record in records:
        if record.get("kind") == "resume" and isinstance(record.get("step"), int):
            resumed = record["step"]
            kept = [r for r in kept if not (isinstance(r.get("step"), int) and r["step"] > resumed)]
        kept.append(record)
    return kept
