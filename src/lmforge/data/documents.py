"""The unit every data step passes along: one document of text and where it came from."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    text: str
    source: str   # the source (domain) name from the config, e.g. "literature"
    doc_id: str   # stable id inside the source, e.g. a relative file path or "file.jsonl:12"
    meta: dict[str, Any] = field(default_factory=dict)  # what steps learn about it (sha256, position...)


def content_hash(text: str) -> str:
    """sha256 hex of the NFC-normalized text: the identity used for dedup and split isolation.

    NFC first so that the same text written with composed or decomposed accents is one
    document, not two that could land on both sides of the train/held-out split.
    """
    return hashlib.sha256(unicodedata.normalize("NFC", text).encode("utf-8")).hexdigest()
