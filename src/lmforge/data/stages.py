"""Preparation as stages of work units that leave completion markers, so reruns skip them.

A stage is a list of units (a source, a chunk of documents, or one global unit); each
unit reads what earlier stages wrote under ``<out_dir>/work/`` and writes its output
and, last, a ``.done`` marker holding a key: a hash of everything the output depends on
(config, input digests, upstream keys). A unit whose marker holds the key it would
compute now is finished and skipped, so an interrupted run resumes where it stopped and
a changed setting redoes only the work it affects.

    read/<source>/chunk_NNNNN.arrow   normalized documents (doc_id, text, sha256), ~chunk_bytes each
    read/<source>.done                counts, input problems, chunk list with digests
    filter/<source>/NNNNN.done        quality removals; NNNNN.minhash.npz signatures
    dedup.done                        exact and near-duplicate removals, clusters
    eval_sets.json, eval_index.*      registered eval sets (snapshot) and their n-gram index
    decontaminate/<source>/NNNNN.done eval n-gram hits and removals

Stages: read (per source) → filter (per chunk) → dedup (global) → eval_index (global) →
decontaminate (per chunk); then prepare.py trains the tokenizer and writes shards.
Every unit is a pure function of files, so any process can run it: a local process
pool, or a Slurm array task (see executors.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write, atomic_write_json, read_json
from lmforge.core.logging import get_logger
from lmforge.data.config import DataConfig
from lmforge.data.decontaminate import Decontaminate, NgramIndex
from lmforge.data.documents import Document, content_hash
from lmforge.data.eval_registry import EvalItem, EvalSet
from lmforge.data.near_dedup import EMPTY, DropNearDuplicates, MinHashSignatures, find_clusters
from lmforge.data.pipeline import ExactDedup, Normalize, split_by_hash
from lmforge.data.quality import QualityFilter
from lmforge.data.sources import InputProblems, iter_documents, source_signature
from lmforge.data.steps import StepStats

log = get_logger(__name__)
WORK = "work"
STAGE_VERSION = 1
PLAN = "plan.json"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([STAGE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()


def _load_marker(path: Path, key: str | None) -> dict | None:
    if key is None or not path.is_file():
        return None
    try:
        record = read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def write_chunk(path: Path, doc_ids: list[str], texts: list[str], hashes: list[str]) -> None:
    import pyarrow as pa

    table = pa.table({"doc_id": pa.array(doc_ids, pa.string()), "text": pa.array(texts, pa.large_string()),
                      "sha256": pa.array(hashes, pa.string())})

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    atomic_write(path, write)


def read_chunk(path: Path, columns: tuple[str, ...] = ("doc_id", "text", "sha256")) -> dict[str, list[str]]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: unreadable work file ({exc}); rerun with --overwrite") from exc
    return {name: table.column(name).to_pylist() for name in columns}


class Context:
    """The config, the output folder, and the stage records read so far (finished ones only)."""

    def __init__(self, cfg: DataConfig, out: Path, run_id: str = ""):
        self.cfg, self.out, self.run_id = cfg, Path(out), run_id
        self.work = self.out / WORK
        self.sources = {s.name: s for s in cfg.sources}
        self._records: dict[tuple[str, str], dict] = {}
        self._signatures: dict[str, str | None] = {}

    def signature(self, source: str) -> str | None:
        """The source's input signature, computed once per run (listing files is not free)."""
        if source not in self._signatures:
            self._signatures[source] = source_signature(self.sources[source])
        return self._signatures[source]

    @classmethod
    def create(cls, cfg: DataConfig, out: Path) -> "Context":
        """Write the plan every worker reads (config and a run id) and return the context."""
        ctx = cls(cfg, out, uuid.uuid4().hex)
        atomic_write_json(ctx.work / PLAN, {"run_id": ctx.run_id, "config": cfg.to_dict()})
        return ctx

    @classmethod
    def load(cls, out: Path) -> "Context":
        plan = read_json(Path(out) / WORK / PLAN)
        return cls(DataConfig.from_dict(plan["config"]), Path(out), plan["run_id"])

    def record(self, stage: "Stage", unit: str) -> dict:
        """The finished record of ``unit``; an error if it has not finished."""
        found = self.done(stage, unit)
        if found is None:
            raise DataError(f"{self.out}: stage {stage.name!r} has not finished {unit!r}")
        return found

    def done(self, stage: "Stage", unit: str) -> dict | None:
        cached = self._records.get((stage.name, unit))
        if cached is not None:
            return cached
        found = _load_marker(stage.marker(self, unit), stage.key(self, unit))
        if found is not None and stage.outputs_exist(self, unit):
            self._records[(stage.name, unit)] = found
            return found
        return None

    # ---- views over finished stages -------------------------------------------------
    def chunks(self) -> list[tuple[str, int]]:
        return [(name, i) for name in self.sources for i in range(len(self.record(READ, name)["chunks"]))]

    def chunk_path(self, source: str, index: int) -> Path:
        return self.work / "read" / source / f"chunk_{index:05d}.arrow"

    def removed(self, source: str, index: int, upto: str = "decontaminate") -> dict[int, str]:
        """{document index: reason} for one chunk, through stage ``upto``."""
        out = {int(i): why for i, why in self.record(FILTER, f"{source}/{index:05d}")["removed"].items()}
        if upto in ("dedup", "decontaminate"):
            out.update({int(i): why for i, why in
                        self.record(DEDUP, "all")["removed"].get(source, {}).get(str(index), {}).items()})
        if upto == "decontaminate" and self.cfg.decontamination.enabled:
            for i in self.record(DECONTAMINATE, f"{source}/{index:05d}")["removed"]:
                out[int(i)] = "contaminated"
        return out

    def final_documents(self, upto: str = "decontaminate") -> Iterator[tuple[str, str, str, str, str]]:
        """(source, split, doc_id, text, sha256) of every kept document, in reading order."""
        heldout = self.cfg.heldout_fraction
        for source, index in self.chunks():
            removed = self.removed(source, index, upto)
            chunk = read_chunk(self.chunk_path(source, index))
            for i, (doc_id, text, digest) in enumerate(zip(chunk["doc_id"], chunk["text"], chunk["sha256"])):
                if i not in removed:
                    split = split_by_hash(Document(text, source, doc_id), heldout, digest=digest)
                    yield source, split, doc_id, text, digest


class Stage:
    name = ""
    single = False  # one global unit ("all"), run in one process

    def units(self, ctx: Context) -> list[str]:
        return ["all"] if self.single else [f"{s}/{i:05d}" for s, i in ctx.chunks()]

    def marker(self, ctx: Context, unit: str) -> Path:
        return ctx.work / self.name / f"{unit}.done"

    def key(self, ctx: Context, unit: str) -> str | None:
        raise NotImplementedError

    def outputs_exist(self, ctx: Context, unit: str) -> bool:
        return True

    def run(self, ctx: Context, unit: str) -> dict:
        """Do the unit's work, write its outputs and marker; return the record."""
        started = time.perf_counter()
        key = self.key(ctx, unit)
        record = self.compute(ctx, unit)
        record.update(key=key, seconds=round(time.perf_counter() - started, 3))
        atomic_write_json(self.marker(ctx, unit), record)
        return record

    def compute(self, ctx: Context, unit: str) -> dict:
        raise NotImplementedError


def _split_unit(unit: str) -> tuple[str, int]:
    source, index = unit.rsplit("/", 1)
    return source, int(index)


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
        # Settings that only later stages or the loader use do not force a re-read.
        spec = {k: v for k, v in source.to_dict().items()
                if k not in ("weight", "quality", "near_dedup_threshold", "content")}
        return _key("read", spec, ctx.cfg.min_doc_chars, ctx.cfg.chunk_bytes, signature)

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


class FilterStage(Stage):
    """Quality rules and MinHash signatures for one chunk."""

    name = "filter"

    def key(self, ctx: Context, unit: str) -> str | None:
        source, index = _split_unit(unit)
        digest = ctx.record(READ, source)["chunks"][index]["digest"]
        near = ctx.cfg.near_dedup
        config = ctx.sources[source]
        return _key("filter", digest, ctx.cfg.quality_for(config).to_dict(), config.resolved_content(),
                    [near.enabled, near.shingle_size, near.num_hashes, near.seed])

    def signatures_path(self, ctx: Context, unit: str) -> Path:
        return ctx.work / self.name / f"{unit}.minhash.npz"

    def outputs_exist(self, ctx: Context, unit: str) -> bool:
        return not ctx.cfg.near_dedup.enabled or self.signatures_path(ctx, unit).is_file()

    def compute(self, ctx: Context, unit: str) -> dict:
        source, index = _split_unit(unit)
        config = ctx.sources[source]
        chunk = read_chunk(ctx.chunk_path(source, index), ("doc_id", "text"))
        docs = [Document(t, source, d, {"index": i}) for i, (d, t) in enumerate(zip(chunk["doc_id"], chunk["text"]))]
        quality = QualityFilter(ctx.cfg.quality_for(config), config.resolved_content())
        started = time.perf_counter()
        kept = list(quality(docs))  # one step at a time, so each one's time is known
        quality.stats.seconds = time.perf_counter() - started
        near = ctx.cfg.near_dedup
        signer = MinHashSignatures(near)
        if near.enabled:
            started = time.perf_counter()
            signatures = np.full((len(docs), near.num_hashes), EMPTY, dtype=np.uint32)
            sizes = np.zeros(len(docs), dtype=np.int64)
            for doc in signer(kept):
                if doc.meta["minhash"] is not None:
                    signatures[doc.meta["index"]] = doc.meta["minhash"]
                    sizes[doc.meta["index"]] = doc.meta["shingles"]

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as handle:
                    np.savez(handle, signatures=signatures, shingles=sizes)

            atomic_write(self.signatures_path(ctx, unit), write)
            signer.stats.seconds = time.perf_counter() - started
        removed = {str(doc.meta["index"]): doc.meta["removed"] for doc in docs if "removed" in doc.meta}
        return {"removed": removed, "quality": quality.stats.to_dict(), "minhash": signer.stats.to_dict()}


class DedupStage(Stage):
    """Exact dedup by content hash, then MinHash-LSH near-dedup, over all sources in order."""

    name = "dedup"
    single = True

    def marker(self, ctx: Context, unit: str) -> Path:
        return ctx.work / "dedup.done"

    def key(self, ctx: Context, unit: str) -> str | None:
        filters = [ctx.record(FILTER, f"{s}/{i:05d}")["key"] for s, i in ctx.chunks()]
        thresholds = {s.name: ctx.cfg.near_dedup_threshold_for(s) for s in ctx.cfg.sources}
        return _key("dedup", filters, ctx.cfg.near_dedup.to_dict(), thresholds)

    def compute(self, ctx: Context, unit: str) -> dict:
        cfg = ctx.cfg.near_dedup
        docs: list[Document] = []
        for source, index in ctx.chunks():
            removed = ctx.removed(source, index, upto="filter")
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


def _gather_signatures(ctx: Context, docs: list[Document]) -> tuple[np.ndarray, np.ndarray]:
    cfg = ctx.cfg.near_dedup
    """(signatures uint32 [n, num_hashes], distinct shingles int64 [n]; 0 = too short) of ``docs``."""
    signatures = np.full((len(docs), cfg.num_hashes), EMPTY, dtype=np.uint32)
    sizes = np.zeros(len(docs), dtype=np.int64)
    loaded: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for row, doc in enumerate(docs):
        where = (doc.source, doc.meta["chunk"])
        if where not in loaded:
            with np.load(FILTER.signatures_path(ctx, f"{where[0]}/{where[1]:05d}")) as data:
                loaded = {where: (data["signatures"], data["shingles"])}  # chunks come in order: keep one
        chunk_signatures, chunk_sizes = loaded[where]
        signatures[row] = chunk_signatures[doc.meta["index"]]
        sizes[row] = chunk_sizes[doc.meta["index"]]
    return signatures, sizes


class EvalIndexStage(Stage):
    """The n-gram index of every eval set: the registered snapshot plus the held-out split."""

    name = "eval_index"
    single = True

    def marker(self, ctx: Context, unit: str) -> Path:
        return ctx.work / "eval_index.done"

    def key(self, ctx: Context, unit: str) -> str | None:
        snapshot = ctx.work / "eval_sets.json"
        digest = hashlib.sha256(snapshot.read_bytes()).hexdigest() if snapshot.is_file() else None
        return _key("eval_index", digest, ctx.record(DEDUP, "all")["key"], ctx.cfg.decontamination.to_dict(),
                    ctx.cfg.heldout_fraction)

    def outputs_exist(self, ctx: Context, unit: str) -> bool:
        return (ctx.work / "eval_index.npz").is_file() and (ctx.work / "eval_index.json").is_file()

    def compute(self, ctx: Context, unit: str) -> dict:
        sets = [EvalSet.from_dict(s) for s in read_json(ctx.work / "eval_sets.json")["sets"]]
        if ctx.cfg.decontamination.enabled and ctx.cfg.decontamination.heldout_split:
            heldout: dict[str, list[EvalItem]] = {name: [] for name in ctx.sources}
            for source, split, doc_id, text, _ in ctx.final_documents(upto="dedup"):
                if split == "heldout":
                    heldout[source].append(EvalItem(doc_id, text))
            sets += [EvalSet(f"heldout/{name}", "heldout", items) for name, items in heldout.items()]
        index = NgramIndex.build(sets, ctx.cfg.decontamination)
        index.save(ctx.work)
        return {"sets": index.sets, "items": len(index.items)}


class DecontaminateStage(Stage):
    """Scan one chunk for eval n-grams: report every hit in the raw (non-held-out) text,
    remove the training documents that still stood."""

    name = "decontaminate"

    def key(self, ctx: Context, unit: str) -> str | None:
        source, index = _split_unit(unit)
        return _key("decontaminate", ctx.record(READ, source)["chunks"][index]["digest"],
                    ctx.record(EVAL_INDEX, "all")["key"])

    def compute(self, ctx: Context, unit: str) -> dict:
        source, index = _split_unit(unit)
        if not ctx.cfg.decontamination.enabled:
            return {"removed": [], "hits": [], "scanned": 0, "step": StepStats(self.name).to_dict()}
        eval_index = _load_index(ctx)
        removed_before = ctx.removed(source, index, upto="dedup")
        chunk = read_chunk(ctx.chunk_path(source, index))
        step = Decontaminate(eval_index)
        hits, removed, scanned = [], [], 0
        for i, (doc_id, text, digest) in enumerate(zip(chunk["doc_id"], chunk["text"], chunk["sha256"])):
            doc = Document(text, source, doc_id)
            split = split_by_hash(doc, ctx.cfg.heldout_fraction, digest=digest)
            if split == "heldout" and i not in removed_before:
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


_INDEX_CACHE: dict[tuple[str, str], NgramIndex] = {}


def _load_index(ctx: Context) -> NgramIndex:
    key = (str(ctx.work), ctx.record(EVAL_INDEX, "all")["key"])
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = NgramIndex.load(ctx.work)
    return _INDEX_CACHE[key]


READ = ReadStage()
FILTER = FilterStage()
DEDUP = DedupStage()
EVAL_INDEX = EvalIndexStage()
DECONTAMINATE = DecontaminateStage()
STAGES: dict[str, Stage] = {s.name: s for s in (READ, FILTER, DEDUP, EVAL_INDEX, DECONTAMINATE)}


def merged_stats(ctx: Context, stage: Stage, field: str) -> StepStats:
    """One step's stats summed over the stage's units."""
    total = StepStats(field)
    for unit in stage.units(ctx):
        total.merge(StepStats.from_dict(ctx.record(stage, unit)[field]))
    return total


_CONTEXTS: dict[str, Context] = {}


def run_unit(stage_name: str, out_dir: str, unit: str) -> dict:
    """Run one unit in this process (a pool worker or a cluster task) unless it is finished."""
    plan = read_json(Path(out_dir) / WORK / PLAN)
    ctx = _CONTEXTS.get(out_dir)
    if ctx is None or ctx.run_id != plan["run_id"]:
        ctx = _CONTEXTS[out_dir] = Context.load(Path(out_dir))
    stage = STAGES[stage_name]
    return ctx.done(stage, unit) or stage.run(ctx, unit)
