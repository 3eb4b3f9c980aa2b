"""The first and last steps: normalize, exact dedup, and the train/held-out split by hash.

:class:`Normalize` and :class:`ExactDedup` are :class:`~lmforge.data.steps.PipelineStep`s
(documents in, documents out, told rank and world size, counting removals by reason).
The functions ``normalize`` / ``exact_dedup`` / ``count_read`` are the same steps with
counts kept in a shared :class:`PipelineStats`, for callers that want one object per run.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal

from lmforge.data.documents import Document, content_hash
from lmforge.data.steps import PipelineStep

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


class Normalize(PipelineStep):
    """Normalize text (see :func:`normalize_text`); drop documents left shorter than
    ``min_doc_chars`` (ignoring whitespace), counted as "empty"."""

    name = "normalize"

    def __init__(self, min_doc_chars: int = 1):
        super().__init__()
        self.min_doc_chars = min_doc_chars

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in docs:
            text = normalize_text(doc.text)
            if len(text.strip()) < self.min_doc_chars:
                self.remove(doc, "empty")
                continue
            yield Document(text=text, source=doc.source, doc_id=doc.doc_id, meta=doc.meta)


class ExactDedup(PipelineStep):
    """Keep the first document of each content hash, across all sources ("exact_duplicate").

    Global rather than per source: a text in two sources must still never reach both
    the training and the held-out split, and must not be trained on twice. Uses
    ``doc.meta["sha256"]`` when an earlier step computed it.
    """

    name = "exact_dedup"

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Document] = {}

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in docs:
            digest = doc.meta.get("sha256") or content_hash(doc.text)
            first = self.seen.get(digest)
            if first is not None:
                doc.meta["duplicate_of"] = f"{first.source}:{first.doc_id}"
                self.remove(doc, "exact_duplicate")
                continue
            self.seen[digest] = doc
            yield doc


def normalize(docs: Iterable[Document], *, min_doc_chars: int = 1, stats: PipelineStats | None = None,
              rank: int = 0, world_size: int = 1) -> Iterator[Document]:
    """:class:`Normalize` as a function; removals are counted in ``stats.removed_empty``."""
    step = Normalize(min_doc_chars)
    yield from step(docs, rank, world_size)
    if stats is not None:
        for source, reasons in step.stats.removed.items():
            stats.removed_empty[source] += reasons["empty"]


def exact_dedup(docs: Iterable[Document], *, stats: PipelineStats | None = None,
                rank: int = 0, world_size: int = 1) -> Iterator[Document]:
    """:class:`ExactDedup` as a function; removals are counted in ``stats.removed_duplicates``."""
    step = ExactDedup()
    for doc in step(docs, rank, world_size):
        yield doc
    if stats is not None:
        for source, reasons in step.stats.removed.items():
            stats.removed_duplicates[source] += reasons["exact_duplicate"]


def split_by_hash(doc: Document, heldout_fraction: float, digest: str | None = None) -> Split:
    """"train" or "heldout", decided by the content hash alone (pass ``digest`` if known).

    A pure function of the text, so identical text always lands on the same side, and
    adding or removing other documents never moves a document across the split.
    """
    digest = digest or content_hash(doc.text)
    return "heldout" if int(digest[:16], 16) / 2**64 < heldout_fraction else "train"
