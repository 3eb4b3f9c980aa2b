"""The built-in document steps: read, minhash, dedup, eval_index, decontaminate.

(The quality rules register their step in quality.py; the tokenizer and shards in
output_steps.py; the framework, and what a step is, in stages.py.)
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write, atomic_write_json, read_json, sha256_file
from lmforge.core.logging import get_logger
from lmforge.data.decontaminate import Decontaminate, NgramIndex, report as contamination_report
from lmforge.data.documents import Document, content_hash
from lmforge.data.eval_registry import EvalItem, EvalSet, eval_sets_digest
from lmforge.data.near_dedup import EMPTY, DropNearDuplicates, MinHashSignatures, find_clusters
from lmforge.data.pipeline import ExactDedup, Normalize
from lmforge.data.sources import InputProblems, iter_documents
from lmforge.data.stages import Context, Stage, key_of, merged_stats, read_chunk, register_step, split_unit, write_chunk
from lmforge.data.steps import StepStats

log = get_logger(__name__)
CONTAMINATION_REPORT = "contamination.json"
DEDUP_REPORT = "dedup_report.json"


@register_step
class ReadStage(Stage):
    """Read one source, normalize, drop empty documents, write chunks of ~chunk_bytes."""

    name = "read"

    def units(self, ctx: Context) -> list[str]:
        return list(ctx.sources)

    def marker(self, ctx: Context, unit: str) -> Path:
        return ctx.work / "read" / f"{unit}.done"

    def key(self, ctx: Context, unit: str) -> str | None:
        source = ctx.sources[unit]
        signature = ctx.signature(unit)
        if signature is None:
            return None  # a remote dataset: always read again
        # Settings that only later steps or the loader use do not force a re-read.
        spec = {k: v for k, v in source.to_dict().items()
                if k not in ("weight", "quality", "near_dedup_threshold", "content", "heldout_fraction")}
        return key_of("read", spec, ctx.cfg.min_doc_chars, ctx.cfg.chunk_bytes, signature)

    def outputs_exist(self, ctx: Context, unit: str) -> bool:
        return all(ctx.chunk_path(unit, i).is_file() for i in range(len(read_json(self.marker(ctx, unit))["chunks"])))

    def compute(self, ctx: Context, unit: str) -> dict:
        source = ctx.sources[unit]
        folder = ctx.work / "read" / unit
        if folder.exists():
            shutil.rmtree(folder)
        problems = InputProblems()
        step = Normalize(ctx.cfg.min_doc_chars)
        chunks: list[dict] = []
        ids: list[str] = []
        texts: list[str] = []
        hashes: list[str] = []
        size = 0

        def flush() -> None:
            nonlocal ids, texts, hashes, size
            if not ids:
                return
            write_chunk(ctx.chunk_path(unit, len(chunks)), ids, texts, hashes)
            digest = hashlib.sha256("\n".join(f"{i}\t{h}" for i, h in zip(ids, hashes)).encode()).hexdigest()
            chunks.append({"documents": len(ids), "bytes": size, "digest": digest})
            ids, texts, hashes, size = [], [], [], 0

        for doc in step(iter_documents(source, problems)):
            ids.append(doc.doc_id)
            texts.append(doc.text)
            hashes.append(content_hash(doc.text))
            size += len(doc.text.encode("utf-8"))
            if size >= ctx.cfg.chunk_bytes:
                flush()
        flush()
        read = step.stats.docs_in[unit]
        if read == 0:
            where = f"path {source.path!r}" if source.path else "the demo corpus"
            raise DataError(f"source {unit!r} ({source.kind}, {where}) yielded no documents"
                            f" (input problems: {problems.describe()})")
        return {"chunks": chunks, "read": read, "removed_empty": step.stats.removed[unit]["empty"],
                "problem_counts": dict(sorted(problems.counts.items())), "problems": problems.listed(),
                "normalize": step.stats.to_dict()}

    def step_stats(self, ctx: Context) -> list[StepStats]:
        normalize = StepStats("normalize")
        for name in ctx.sources:
            normalize.merge(StepStats.from_dict(ctx.record(self, name)["normalize"]))
            normalize.seconds += ctx.record(self, name)["seconds"]  # reading the source included
        normalize.name = "normalize"
        return [normalize]

    def pipeline_fields(self, ctx: Context, source: str) -> dict[str, Any]:
        read = ctx.record(self, source)
        return {"read": read["read"], "removed_empty": read["removed_empty"], "input_problems": read["problem_counts"]}

    def report(self, ctx: Context, manifest: dict) -> None:
        manifest["input_problems"] = {name: ctx.record(self, name)["problems"] for name in ctx.sources
                                      if ctx.record(self, name)["problems"]}


@register_step
class MinHashStage(Stage):
    """MinHash signatures of one chunk's remaining documents, for near-dedup."""

    name = "minhash"
    per_chunk = True

    def key(self, ctx: Context, unit: str) -> str | None:
        near = ctx.cfg.near_dedup
        settings = [near.enabled, near.shingle_size, near.num_hashes, near.seed]
        return key_of(self.name, ctx.upstream(self, unit), settings)

    def signatures_path(self, ctx: Context, unit: str) -> Path:
        return ctx.work / self.name / f"{unit}.minhash.npz"

    def outputs_exist(self, ctx: Context, unit: str) -> bool:
        return not ctx.cfg.near_dedup.enabled or self.signatures_path(ctx, unit).is_file()

    def compute(self, ctx: Context, unit: str) -> dict:
        near = ctx.cfg.near_dedup
        signer = MinHashSignatures(near)
        if not near.enabled:
            return {"minhash": signer.stats.to_dict()}
        source, index = split_unit(unit)
        chunk = read_chunk(ctx.chunk_path(source, index), ("doc_id", "text"))
        removed = ctx.removed(source, index, before=self.name)
        kept = [Document(t, source, d, {"index": i}) for i, (d, t) in enumerate(zip(chunk["doc_id"], chunk["text"]))
                if i not in removed]
        started = time.perf_counter()
        signatures = np.full((len(chunk["doc_id"]), near.num_hashes), EMPTY, dtype=np.uint32)
        sizes = np.zeros(len(chunk["doc_id"]), dtype=np.int64)
        for doc in signer(kept):
            if doc.meta["minhash"] is not None:
                signatures[doc.meta["index"]] = doc.meta["minhash"]
                sizes[doc.meta["index"]] = doc.meta["shingles"]

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, signatures=signatures, shingles=sizes)

        atomic_write(self.signatures_path(ctx, unit), write)
        signer.stats.seconds = time.perf_counter() - started
        return {"minhash": signer.stats.to_dict()}


@register_step
class DedupStage(Stage):
    """Exact dedup by content hash, then MinHash-LSH near-dedup, over all sources in order."""

    name = "dedup"
    single = True
    after = ("minhash",)
    removes_documents = True

    def marker(self, ctx: Context, unit: str) -> Path:
        return ctx.work / "dedup.done"

    def key(self, ctx: Context, unit: str) -> str | None:
        thresholds = {s.name: ctx.cfg.near_dedup_threshold_for(s) for s in ctx.cfg.sources}
        return key_of(self.name, ctx.upstream(self, unit), ctx.cfg.near_dedup.to_dict(), thresholds)

    def compute(self, ctx: Context, unit: str) -> dict:
        cfg = ctx.cfg.near_dedup
        docs: list[Document] = []
        for source, index in ctx.chunks():
            removed = ctx.removed(source, index, before=self.name)
            chunk = read_chunk(ctx.chunk_path(source, index), ("doc_id", "sha256"))
            for i, (doc_id, digest) in enumerate(zip(chunk["doc_id"], chunk["sha256"])):
                if i not in removed:
                    docs.append(Document("", source, doc_id, {"sha256": digest, "chunk": index, "index": i}))
        exact = ExactDedup()
        survivors = list(exact(docs))
        near = DropNearDuplicates()
        clusters_out: list[dict] = []
        lsh: dict = {"enabled": cfg.enabled}
        if cfg.enabled and survivors:
            signatures, sizes = _gather_signatures(ctx, survivors)
            thresholds = np.array([ctx.cfg.near_dedup_threshold_for(ctx.sources[d.source]) for d in survivors])
            clusters, lsh_stats = find_clusters(signatures, sizes > 0, thresholds, sizes, cfg)
            lsh.update(lsh_stats)
            for cluster in clusters:
                kept = survivors[cluster.members[0]]
                for member in cluster.members[1:]:
                    survivors[member].meta["near_duplicate_of"] = f"{kept.source}:{kept.doc_id}"
                clusters_out.append({"kept": {"source": kept.source, "doc_id": kept.doc_id},
                                     "members": [{"source": survivors[m].source, "doc_id": survivors[m].doc_id,
                                                  "similarity": s}
                                                 for m, s in zip(cluster.members, cluster.similarity)]})
        final = list(near(survivors))
        removed: dict[str, dict[str, dict[str, str]]] = {}
        exact_pairs = []
        for doc in docs:
            reason = doc.meta.get("removed")
            if reason:
                removed.setdefault(doc.source, {}).setdefault(str(doc.meta["chunk"]), {})[str(doc.meta["index"])] = reason
            if "duplicate_of" in doc.meta:
                exact_pairs.append({"source": doc.source, "doc_id": doc.doc_id, "duplicate_of": doc.meta["duplicate_of"]})
        return {"removed": removed, "clusters": clusters_out, "exact_duplicates": exact_pairs, "lsh": lsh,
                "exact_dedup": exact.stats.to_dict(), "near_dedup": near.stats.to_dict(), "kept": len(final)}

    def removals(self, ctx: Context, source: str, index: int) -> dict[int, str]:
        by_chunk = ctx.record(self, "all")["removed"].get(source, {}).get(str(index), {})
        return {int(i): why for i, why in by_chunk.items()}

    def step_stats(self, ctx: Context) -> list[StepStats]:
        dedup = ctx.record(self, "all")
        exact = StepStats.from_dict(dedup["exact_dedup"])
        near = StepStats.from_dict(dedup["near_dedup"])
        # Near-dedup's time: the MinHash signatures (minhash step) plus clustering (this step).
        near.seconds = merged_stats(ctx, ctx.step("minhash"), "minhash").seconds + dedup["seconds"]
        return [exact, near]

    def pipeline_fields(self, ctx: Context, source: str) -> dict[str, Any]:
        exact, near = self.step_stats(ctx)
        return {"removed_duplicates": exact.removed[source]["exact_duplicate"],
                "removed_near_duplicates": near.removed[source]["near_duplicate"]}

    def report(self, ctx: Context, manifest: dict) -> None:
        dedup = ctx.record(self, "all")
        near = ctx.cfg.near_dedup
        thresholds = {s.name: ctx.cfg.near_dedup_threshold_for(s) for s in ctx.cfg.sources}
        lowest = min(thresholds.values())
        summary = {
            "enabled": near.enabled, "shingle_size": near.shingle_size, "num_bands": near.num_bands,
            "rows_per_band": near.rows_per_band, "threshold": near.threshold, "thresholds_by_source": thresholds,
            # Chance that a pair right at the (lowest) threshold is even compared.
            "candidate_probability_at_threshold": round(near.candidate_probability(lowest), 4),
            **{k: v for k, v in dedup["lsh"].items() if k != "enabled"},
            "clusters": len(dedup["clusters"]),
            "documents_in_clusters": sum(len(c["members"]) for c in dedup["clusters"]),
            "removed": sum(len(c["members"]) - 1 for c in dedup["clusters"]),
            "exact_duplicates_removed": len(dedup["exact_duplicates"]),
        }
        if near.enabled and summary["candidate_probability_at_threshold"] < 0.9:
            log.warning("near-dedup: a pair at similarity %.2f is compared with probability %.2f only; raise "
                        "num_bands (or lower rows_per_band) to find more near-duplicates", lowest,
                        summary["candidate_probability_at_threshold"])
        atomic_write_json(ctx.out / DEDUP_REPORT, {"summary": summary, "clusters": dedup["clusters"],
                                                   "exact_duplicates": dedup["exact_duplicates"]})
        manifest["near_dedup"] = {**summary, "report": DEDUP_REPORT}


def _gather_signatures(ctx: Context, docs: list[Document]) -> tuple[np.ndarray, np.ndarray]:
    """(signatures uint32 [n, num_hashes], distinct shingles int64 [n]; 0 = too short) of ``docs``."""
    cfg = ctx.cfg.near_dedup
    minhash = ctx.step("minhash")
    signatures = np.full((len(docs), cfg.num_hashes), EMPTY, dtype=np.uint32)
    sizes = np.zeros(len(docs), dtype=np.int64)
    loaded: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for row, doc in enumerate(docs):
        where = (doc.source, doc.meta["chunk"])
        if where not in loaded:
            with np.load(minhash.signatures_path(ctx, f"{where[0]}/{where[1]:05d}")) as data:
                loaded = {where: (data["signatures"], data["shingles"])}  # chunks come in order: keep one
        chunk_signatures, chunk_sizes = loaded[where]
        signatures[row] = chunk_signatures[doc.meta["index"]]
        sizes[row] = chunk_sizes[doc.meta["index"]]
    return signatures, sizes


@register_step
class EvalIndexStage(Stage):
    """The n-gram index of every eval set: the registered snapshot plus the held-out split."""

    name = "eval_index"
    single = True

    def marker(self, ctx: Context, unit: str) -> Path:
        return ctx.work / "eval_index.done"

    def key(self, ctx: Context, unit: str) -> str | None:
        snapshot = ctx.work / "eval_sets.json"
        digest = hashlib.sha256(snapshot.read_bytes()).hexdigest() if snapshot.is_file() else None
        return key_of(self.name, digest, ctx.upstream(self, unit), ctx.cfg.decontamination.to_dict(),
                      ctx.split_settings())

    def outputs_exist(self, ctx: Context, unit: str) -> bool:
        return (ctx.work / "eval_index.npz").is_file() and (ctx.work / "eval_index.json").is_file()

    def compute(self, ctx: Context, unit: str) -> dict:
        sets = [EvalSet.from_dict(s) for s in ctx.eval_sets_snapshot()]
        if ctx.cfg.decontamination.enabled and ctx.cfg.decontamination.heldout_split:
            heldout: dict[str, list[EvalItem]] = {name: [] for name in ctx.sources}
            for source, split, doc_id, text, _ in ctx.final_documents(before=self.name):
                if split == "heldout":
                    heldout[source].append(EvalItem(doc_id, text))
            sets += [EvalSet(f"heldout/{name}", "heldout", items) for name, items in heldout.items()]
        index = NgramIndex.build(sets, ctx.cfg.decontamination)
        index.save(ctx.work)
        return {"sets": index.sets, "items": len(index.items)}


@register_step
class DecontaminateStage(Stage):
    """Scan one chunk for eval n-grams: report every hit in the raw (non-held-out) text,
    remove the training documents that still stood."""

    name = "decontaminate"
    per_chunk = True
    after = ("eval_index",)
    removes_documents = True

    def compute(self, ctx: Context, unit: str) -> dict:
        source, index = split_unit(unit)
        if not ctx.cfg.decontamination.enabled:
            return {"removed": [], "hits": [], "scanned": 0, "step": StepStats(self.name).to_dict()}
        eval_index = _load_index(ctx)
        removed_before = ctx.removed(source, index, before=self.name)
        chunk = read_chunk(ctx.chunk_path(source, index))
        step = Decontaminate(eval_index)
        hits, removed, scanned = [], [], 0
        for i, (doc_id, text, digest) in enumerate(zip(chunk["doc_id"], chunk["text"], chunk["sha256"])):
            doc = Document(text, source, doc_id)
            if ctx.split_of(source, doc_id, text, digest) == "heldout" and i not in removed_before:
                continue  # held-out text is evaluation data, not training data
            scanned += 1
            found = eval_index.find(text)
            doc.meta["eval_hits"] = found
            if i in removed_before:
                status = f"already_removed:{removed_before[i]}"
            else:
                status = "kept" if list(step([doc])) else "removed_contaminated"
                if status == "removed_contaminated":
                    removed.append(i)
            if found:
                hits.append({"index": i, "source": source, "doc_id": doc_id, "sha256": digest, "status": status,
                             "items": {str(k): v for k, v in sorted(found.items())}})
        return {"removed": removed, "hits": hits, "scanned": scanned, "step": step.stats.to_dict()}

    def removals(self, ctx: Context, source: str, index: int) -> dict[int, str]:
        return {int(i): "contaminated" for i in ctx.record(self, f"{source}/{index:05d}")["removed"]}

    def _stats(self, ctx: Context) -> StepStats:
        stats = merged_stats(ctx, self, "step")
        stats.name = self.name
        return stats

    def step_stats(self, ctx: Context) -> list[StepStats]:
        if not ctx.cfg.decontamination.enabled:
            return []
        stats = self._stats(ctx)
        stats.seconds = (sum(ctx.record(self, u)["seconds"] for u in self.units(ctx))
                         + ctx.record("eval_index", "all")["seconds"])
        return [stats]

    def pipeline_fields(self, ctx: Context, source: str) -> dict[str, Any]:
        return {"removed_contaminated": self._stats(ctx).removed[source]["contaminated"]}

    def report(self, ctx: Context, manifest: dict) -> None:
        cfg = ctx.cfg.decontamination
        digest = eval_sets_digest([EvalSet.from_dict(s) for s in ctx.eval_sets_snapshot()])
        if not cfg.enabled:
            manifest["contamination"] = {"enabled": False, "eval_sets_digest": digest}
            return
        index = NgramIndex.load(ctx.work)
        units = self.units(ctx)
        hits = [hit for unit in units for hit in ctx.record(self, unit)["hits"]]
        full = contamination_report(index, hits, cfg)
        full["documents_scanned"] = sum(ctx.record(self, u)["scanned"] for u in units)
        atomic_write_json(ctx.out / CONTAMINATION_REPORT, full)
        manifest["contamination"] = {
            "enabled": True, "report": CONTAMINATION_REPORT, "ngram_size": cfg.ngram_size, "eval_sets_digest": digest,
            "eval_sets": {s["name"]: {"role": s["role"], "sha256": s["sha256"], "items": s["items"],
                                      "items_with_hits": s["items_with_hits"]} for s in full["eval_sets"]},
            "documents_scanned": full["documents_scanned"], **full["totals"],
            "sha256": sha256_file(ctx.out / CONTAMINATION_REPORT)}


_INDEX_CACHE: dict[tuple[str, str], NgramIndex] = {}


def _load_index(ctx: Context) -> NgramIndex:
    key = (str(ctx.work), ctx.record("eval_index", "all")["key"])
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = NgramIndex.load(ctx.work)
    return _INDEX_CACHE[key]
