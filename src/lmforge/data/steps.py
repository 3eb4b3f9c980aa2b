"""The one shape every pipeline step has: documents in, documents out, stats recorded.

A step is called as ``step(docs, rank, world_size)`` and returns a generator of the
documents it keeps — the calling convention of datatrove's executors, so a step (or a
chain of them) can also run under datatrove. ``rank`` / ``world_size`` say which slice
of a larger job this call is; most steps do not need them, a few use them to name
their outputs. Every step counts documents in, documents out and removals by reason,
per source, so nothing is dropped silently: the counts end up in the manifest.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from lmforge.data.documents import Document


def _per_source() -> defaultdict[str, Counter]:
    return defaultdict(Counter)


@dataclass
class StepStats:
    """Counts for one step, per source: documents in / out and removals by reason."""

    name: str
    docs_in: Counter = field(default_factory=Counter)
    docs_out: Counter = field(default_factory=Counter)
    removed: defaultdict[str, Counter] = field(default_factory=_per_source)
    flagged: defaultdict[str, Counter] = field(default_factory=_per_source)  # kept, with a note
    seconds: float = 0.0

    def merge(self, other: "StepStats") -> "StepStats":
        self.docs_in.update(other.docs_in)
        self.docs_out.update(other.docs_out)
        for source, reasons in other.removed.items():
            self.removed[source].update(reasons)
        for source, notes in other.flagged.items():
            self.flagged[source].update(notes)
        self.seconds += other.seconds
        return self

    def removed_total(self, source: str | None = None) -> int:
        sources = [source] if source is not None else list(self.removed)
        return sum(sum(self.removed[s].values()) for s in sources if s in self.removed)

    def to_dict(self) -> dict:
        sources = sorted(set(self.docs_in) | set(self.docs_out) | set(self.removed))
        by_source = {}
        for s in sources:
            by_source[s] = {"in": self.docs_in[s], "out": self.docs_out[s],
                            "removed": dict(sorted(self.removed[s].items()))}
            if self.flagged.get(s):
                by_source[s]["flagged"] = dict(sorted(self.flagged[s].items()))
        return {"name": self.name, "seconds": round(self.seconds, 3), "by_source": by_source}

    @classmethod
    def from_dict(cls, data: dict) -> "StepStats":
        stats = cls(data["name"], seconds=float(data.get("seconds", 0.0)))
        for source, counts in data.get("by_source", {}).items():
            stats.docs_in[source] = counts["in"]
            stats.docs_out[source] = counts["out"]
            stats.removed[source].update(counts["removed"])
            stats.flagged[source].update(counts.get("flagged", {}))
        return stats

    def summary(self) -> dict:
        """Totals over sources, for the manifest's ``steps`` list."""
        removed: Counter = Counter()
        flagged: Counter = Counter()
        for reasons in self.removed.values():
            removed.update(reasons)
        for notes in self.flagged.values():
            flagged.update(notes)
        summary = {"name": self.name, "documents_in": sum(self.docs_in.values()),
                   "documents_out": sum(self.docs_out.values()), "removed": dict(sorted(removed.items())),
                   "seconds": round(self.seconds, 3)}
        if flagged:
            summary["flagged"] = dict(sorted(flagged.items()))
        return summary


class PipelineStep:
    """Base class: override :meth:`run`; call the step to get counted output."""

    name = "step"

    def __init__(self) -> None:
        self.stats = StepStats(self.name)

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document] | None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in self.run(self._count_in(docs or ()), rank, world_size):
            self.stats.docs_out[doc.source] += 1
            yield doc

    def _count_in(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            self.stats.docs_in[doc.source] += 1
            yield doc

    def remove(self, doc: Document, reason: str) -> None:
        """Record that ``doc`` was dropped and why (call instead of yielding it)."""
        self.stats.removed[doc.source][reason] += 1
        doc.meta["removed"] = reason


class FilterStep(PipelineStep):
    """A step that keeps or drops each document on its own: override :meth:`reason`."""

    def reason(self, doc: Document) -> str | None:
        """Why ``doc`` should be removed, or None to keep it."""
        raise NotImplementedError

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in docs:
            why = self.reason(doc)
            if why is None:
                yield doc
            else:
                self.remove(doc, why)


def run_steps(docs: Iterable[Document], steps: list[PipelineStep], rank: int = 0,
              world_size: int = 1) -> Iterator[Document]:
    """Chain steps: the output of each is the input of the next."""
    for step in steps:
        docs = step(docs, rank, world_size)
    return iter(docs)
