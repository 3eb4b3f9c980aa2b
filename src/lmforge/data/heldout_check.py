"""Is each source's held-out split big enough to measure on? Warnings for prepare and eval."""

from __future__ import annotations

from typing import Any

# Fewer held-out documents than this and a domain's bits-per-byte is mostly the difficulty
# of those few texts, and no interval can show the spread between documents.
MIN_HELDOUT_DOCUMENTS = 5


def heldout_warnings(manifest: dict[str, Any]) -> list[str]:
    """One line per source whose held-out split is empty or has too few documents."""
    lines = []
    advice = "raise data.heldout_fraction, or the source's own heldout_fraction"
    for name, splits in manifest.get("sources", {}).items():
        heldout = splits.get("heldout") or {}
        documents, tokens = int(heldout.get("documents", 0)), int(heldout.get("tokens", 0))
        if documents == 0 or tokens < 2:
            lines.append(f"source {name!r} has no held-out documents: it gets no held-out bits-per-byte ({advice})")
        elif documents < MIN_HELDOUT_DOCUMENTS:
            lines.append(f"source {name!r} has only {documents} held-out document{'s' * (documents > 1)} "
                         f"({tokens} tokens): its bits-per-byte measures those texts, and its interval only the "
                         f"noise within them ({advice}; at least {MIN_HELDOUT_DOCUMENTS} documents)")
    return lines
