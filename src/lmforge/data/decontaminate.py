"""N-gram decontamination: find eval items inside training documents and drop those documents.

Every eval item becomes the set of its ``ngram_size``-grams of normalized words (items
shorter than that, but with at least ``min_item_words`` words, are one n-gram of their
own length). The index is one sorted array of n-gram hashes per n-gram size, with the
item each came from; scanning a document is hashing its n-grams and a binary search, so
the cost grows with the training text, not with the number of eval items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lmforge.core.io import atomic_write, atomic_write_json, read_json
from lmforge.data.config import DecontaminationConfig
from lmforge.data.documents import Document
from lmforge.data.eval_registry import EvalSet
from lmforge.data.ngrams import ngram_hashes, normalized_words, stable_word_hashes
from lmforge.data.steps import FilterStep


@dataclass
class NgramIndex:
    """Sorted n-gram hashes of all eval items, per n-gram size, and which item each belongs to."""

    hashes: dict[int, np.ndarray]    # n -> uint64 sorted
    item_of: dict[int, np.ndarray]   # n -> int32, aligned with hashes[n]
    items: list[dict]                # {"set", "id", "sha256", "ngrams"}; position = item index
    sets: list[dict]                 # summary per eval set, with how many items could be checked

    @classmethod
    def build(cls, eval_sets: Iterable[EvalSet], cfg: DecontaminationConfig) -> "NgramIndex":
        parts: dict[int, list[tuple[np.ndarray, int]]] = {}
        items: list[dict] = []
        sets: list[dict] = []
        for eval_set in eval_sets:
            checked = too_short = 0
            for item in eval_set.items:
                words = stable_word_hashes(normalized_words(item.text))
                n = cfg.ngram_size if len(words) >= cfg.ngram_size else len(words)
                if n < cfg.min_item_words:
                    too_short += 1
                    continue
                grams = np.unique(ngram_hashes(words, n))
                parts.setdefault(n, []).append((grams, len(items)))
                items.append({"set": eval_set.name, "id": item.item_id, "sha256": item.sha256,
                              "ngrams": int(len(grams))})
                checked += 1
            sets.append({**eval_set.summary(), "checked_items": checked, "too_short_items": too_short})
        hashes, item_of = {}, {}
        for n, chunks in sorted(parts.items()):
            values = np.concatenate([grams for grams, _ in chunks])
            owners = np.concatenate([np.full(len(grams), index, dtype=np.int32) for grams, index in chunks])
            order = np.argsort(values, kind="stable")
            hashes[n], item_of[n] = values[order], owners[order]
        return cls(hashes, item_of, items, sets)

    def find(self, text: str) -> dict[int, int]:
        """{item index: number of the item's n-grams found in ``text``} (empty when clean)."""
        if not self.hashes:
            return {}
        words = stable_word_hashes(normalized_words(text))
        found: dict[int, int] = {}
        for n, table in self.hashes.items():
            grams = np.unique(ngram_hashes(words, n))
            if len(grams) == 0:
                continue
            lo = np.searchsorted(table, grams, side="left")
            hi = np.searchsorted(table, grams, side="right")
            hit = hi > lo
            if not hit.any():
                continue
            lo, hi = lo[hit], hi[hit]
            # All owners of every matched n-gram (an n-gram can belong to several items).
            spans = hi - lo
            positions = np.repeat(lo - np.concatenate([[0], np.cumsum(spans)[:-1]]), spans) + np.arange(spans.sum())
            owners, counts = np.unique(self.item_of[n][positions], return_counts=True)
            for owner, count in zip(owners.tolist(), counts.tolist()):
                found[owner] = found.get(owner, 0) + count
        return found

    def item_name(self, index: int) -> str:
        item = self.items[index]
        return f"{item['set']}:{item['id']}"

    def save(self, folder: Path) -> None:
        arrays = {f"hashes_{n}": a for n, a in self.hashes.items()}
        arrays.update({f"item_of_{n}": a for n, a in self.item_of.items()})

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)

        atomic_write(folder / "eval_index.npz", write)
        atomic_write_json(folder / "eval_index.json", {"items": self.items, "sets": self.sets,
                                                        "ngram_sizes": sorted(self.hashes)})

    @classmethod
    def load(cls, folder: Path) -> "NgramIndex":
        meta = read_json(folder / "eval_index.json")
        with np.load(folder / "eval_index.npz") as arrays:
            hashes = {n: arrays[f"hashes_{n}"] for n in meta["ngram_sizes"]}
            item_of = {n: arrays[f"item_of_{n}"] for n in meta["ngram_sizes"]}
        return cls(hashes, item_of, meta["items"], meta["sets"])


class Decontaminate(FilterStep):
    """Drop documents that contain any eval item's n-gram ("contaminated").

    The hits found are left in ``doc.meta["eval_hits"]`` ({item index: n-gram hits}) for
    the contamination report; a document that already carries them is not scanned again.
    """

    name = "decontaminate"

    def __init__(self, index: NgramIndex):
        super().__init__()
        self.index = index

    def reason(self, doc: Document) -> str | None:
        if "eval_hits" not in doc.meta:
            doc.meta["eval_hits"] = self.index.find(doc.text)
        return "contaminated" if doc.meta["eval_hits"] else None


def scan(index: NgramIndex, docs: Iterable[Document]) -> Iterator[Document]:
    """Annotate documents with their eval hits without removing any (for reporting)."""
    for doc in docs:
        doc.meta["eval_hits"] = index.find(doc.text)
        yield doc


def report(index: NgramIndex, hits: list[dict], cfg: DecontaminationConfig) -> dict:
    """The contamination report: per eval set and item, the training documents that held it.

    ``hits``: one entry per scanned document with hits — {"source", "doc_id", "sha256",
    "status" (what happened to the document), "items": {item index: n-gram hits}}.
    """
    by_item: dict[int, list[dict]] = {}
    removed = []
    for hit in hits:
        for item, count in hit["items"].items():
            by_item.setdefault(int(item), []).append({"source": hit["source"], "doc_id": hit["doc_id"],
                                                      "sha256": hit["sha256"], "ngram_hits": count,
                                                      "status": hit["status"]})
        if hit["status"] == "removed_contaminated":
            removed.append({"source": hit["source"], "doc_id": hit["doc_id"], "sha256": hit["sha256"],
                            "eval_items": sorted(index.item_name(int(i)) for i in hit["items"])})
    sets = []
    for summary in index.sets:
        hit_items = [i for i in by_item if index.items[i]["set"] == summary["name"]]
        sets.append({**summary, "items_with_hits": len(hit_items)})
    items = [{"set": index.items[i]["set"], "item_id": index.items[i]["id"], "sha256": index.items[i]["sha256"],
              "item_ngrams": index.items[i]["ngrams"], "training_documents": docs}
             for i, docs in sorted(by_item.items())]
    return {
        "method": {"ngram_size": cfg.ngram_size, "min_item_words": cfg.min_item_words,
                   "words": "lower-cased runs of letters, digits and '_'",
                   "rule": "a training document sharing any n-gram with an eval item is removed"},
        "eval_sets": sets,
        "items_with_hits": items,
        "removed_documents": removed,
        "totals": {"eval_items": sum(s["items"] for s in index.sets),
                   "items_with_hits": len(items), "documents_with_hits": len(hits),
                   "removed_documents": len(removed)},
    }


def load_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())
