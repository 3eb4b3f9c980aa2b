"""Pipeline steps in datatrove's shape: a generator of documents in, a generator out.

Each step takes ``rank`` / ``world_size`` so it can run over one slice of a larger job
(here everything runs as rank 0 of 1). Counts go into a shared :class:`PipelineStats`,
so what each step removed is reported, not silent.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal

from lmforge.data.documents import Document, content_hash

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, Split] = ("train", "heldout")


def _counter() -> defaultdict[str, int]:
    return defaultdict(int)


@dataclass
class PipelineStats:
    """Per-source document counts at each step."""

    read: defaultdict[str, int] = field(default_factory=_counter)
    removed_empty: defaultdict[str, int] = field(default_factory=_counter)   # shorter than min_doc_chars
    removed_duplicates: defaultdict[str, int] = field(default_factory=_counter)
    train_docs: defaultdict[str, int] = field(default_factory=_counter)
    heldout_docs: defaultdict[str, int] = field(default_factory=_counter)

    def by_source(self) -> dict[str, dict[str, int]]:
        sources = sorted(set(self.read) | set(self.train_docs) | set(self.heldout_docs))
        return {
            s: {"read": self.read[s], "removed_empty": self.removed_empty[s],
                "removed_duplicates": self.removed_duplicates[s],
                "train_docs": self.train_docs[s], "heldout_docs": self.heldout_docs[s]}
            for s in sources
        }


def count_read(docs: Iterable[Document], stats: PipelineStats, *, rank: int = 0,
               world_size: int = 1) -> Iterator[Document]:
    for doc in docs:
        stats.read[doc.source] += 1
        yield doc


def normalize_text(text: str) -> str:
    """NFC, '\\n' line endings, no trailing whitespace per line, no byte-order mark."""
    text = unicodedata.normalize("NFC", text.lstrip("\ufeff"))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    # One final newline, so concatenated documents read as separate blocks.
    return "\n".join(lines).strip("\n") + "\n" if any(lines) else ""


def normalize(docs: Iterable[Document], *, min_doc_chars: int = 1, stats: PipelineStats | None = None,
              rank: int = 0, world_size: int = 1) -> Iterator[Document]:
    """Normalize text; drop documents left shorter than ``min_doc_chars`` (ignoring whitespace)."""
    for doc in docs:
        text = normalize_text(doc.text)
        if len(text.strip()) < min_doc_chars:
            if stats is not None:
                stats.removed_empty[doc.source] += 1
            continue
        yield Document(text=text, source=doc.source, doc_id=doc.doc_id)


def exact_dedup(docs: Iterable[Document], *, stats: PipelineStats | None = None,
                rank: int = 0, world_size: int = 1) -> Iterator[Document]:
    """Keep the first document of each content hash, across all sources.

    Global rather than per source: a text in two sources must still never reach both
    the training and the held-out split, and must not be trained on twice.
    """
    seen: set[str] = set()
    for doc in docs:
        digest = content_hash(doc.text)
        if digest in seen:
            if stats is not None:
                stats.removed_duplicates[doc.source] += 1
            continue
        seen.add(digest)
        yield doc


def split_by_hash(doc: Document, heldout_fraction: float, digest: str | None = None) -> Split:
    """"train" or "heldout", decided by the content hash alone (pass ``digest`` if known).

    A pure function of the text, so identical text always lands on the same side, and
    adding or removing other documents never moves a document across the split.
    """
    digest = digest or content_hash(doc.text)
    return "heldout" if int(digest[:16], 16) / 2**64 < heldout_fraction else "train"
