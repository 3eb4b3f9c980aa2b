"""Held-out isolation: no held-out document's content hash may appear in training data."""

from __future__ import annotations

from pathlib import Path

from lmforge.core.errors import DataError
from lmforge.data.shards import check_isolation


def isolation_report(data_dir: Path) -> dict:
    """Check and return the overlap report; the evaluator includes it in every result."""
    return check_isolation(Path(data_dir))


def require_isolation(data_dir: Path) -> dict:
    """Refuse a data configuration whose held-out documents appear in its training split."""
    report = isolation_report(data_dir)
    if report["overlap"]:
        raise DataError(
            f"{data_dir}: {report['overlap']} of {report['heldout_docs']} held-out documents "
            f"also appear in the training split (e.g. {report['overlapping_hashes'][:3]}); "
            "refusing to train on a contaminated split"
        )
    return report
