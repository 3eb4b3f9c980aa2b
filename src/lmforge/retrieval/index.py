"""The vector index over chunk embeddings (FAISS, inner product on unit vectors = cosine).

Index ids are chunk ids (rows of the database arrays), so a search answers chunk ids
directly and ``remove_ids`` deletes chunks. Kinds, chosen by database size unless named:

| kind    | what                                | when (``auto``)          | removal          |
|---------|-------------------------------------|--------------------------|------------------|
| flat    | exact ``IndexFlatIP`` in an IDMap    | n < 200,000              | remove_ids       |
| ivf     | ``IndexIVFFlat``, nlist ≈ 4·√n       | 200,000 ≤ n < 5,000,000  | remove_ids       |
| ivfpq   | ``IndexIVFPQ`` (compressed codes)    | n ≥ 5,000,000            | remove_ids       |
| hnsw    | ``IndexHNSWFlat`` in an IDMap        | only when asked          | tombstones only  |

An IVF index's coarse quantizer is trained on a fixed random sample (40 vectors per cell), so
its cost does not grow with the database beyond that. :func:`measure_recall` measures what the
approximation loses: recall@k of the index against exact search on sampled chunks (``retrieval
build`` stores it in the manifest).

Every search also filters by the database's ``alive`` mask, so a kind without removal
(HNSW) still never returns a removed chunk. Each kind is a builder in :data:`INDEXES`; a new
kind is one function registered there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.logging import get_logger
from lmforge.core.registry import Registry

log = get_logger(__name__)

FLAT_MAX = 200_000
TRAIN_POINTS_PER_CELL = 40     # IVF k-means trains on a sample of this many vectors per cell
IVF_MAX = 5_000_000


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError("retrieval needs faiss (pip install faiss-cpu)") from exc
    return faiss


@dataclass(frozen=True)
class IndexSettings:
    nlist: int | None = None       # IVF cells; None: about 4 * sqrt(n)
    nprobe: int = 16               # IVF cells searched per query
    pq_m: int = 16                 # IVF-PQ sub-quantizers (must divide the embedding dim)
    hnsw_m: int = 32               # HNSW neighbours per node
    seed: int = 0                  # picks the IVF training sample


# Index kind -> a function (embeddings [n, dim], settings) -> (an empty FAISS index ready for
# add_with_ids, what the database manifest must record about it beyond kind and dim).
# A new kind is one function registered here.
IndexBuilder = Callable[[np.ndarray, IndexSettings], tuple[Any, dict[str, Any]]]
INDEXES: Registry[IndexBuilder] = Registry("index kind")


def choose_kind(n: int, kind: str = "auto") -> str:
    if kind == "auto":
        return "flat" if n < FLAT_MAX else "ivf" if n < IVF_MAX else "ivfpq"
    if kind not in INDEXES.names():
        raise ConfigError(f"index_kind: unknown index kind {kind!r} (known: auto, {', '.join(INDEXES.names())})")
    return kind


def build_index(embeddings: np.ndarray, ids: np.ndarray, kind: str = "auto", nlist: int | None = None,
                nprobe: int = 16, pq_m: int = 16, hnsw_m: int = 32, seed: int = 0,
                progress: Callable[[int], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Build an index over ``embeddings`` [n, dim] (unit rows) with chunk ``ids``; return (index, spec)."""
    n, dim = embeddings.shape
    kind = choose_kind(n, kind)
    settings = IndexSettings(nlist=nlist, nprobe=nprobe, pq_m=pq_m, hnsw_m=hnsw_m, seed=seed)
    index, recorded = INDEXES.get(kind)(embeddings, settings)
    add_to_index(index, embeddings, ids, progress)
    return index, {"kind": kind, "dim": int(dim), **recorded}


@INDEXES.register("flat")
def _flat(embeddings: np.ndarray, settings: IndexSettings) -> tuple[Any, dict[str, Any]]:
    faiss = _faiss()
    return faiss.IndexIDMap2(faiss.IndexFlatIP(embeddings.shape[1])), {}


@INDEXES.register("hnsw")
def _hnsw(embeddings: np.ndarray, settings: IndexSettings) -> tuple[Any, dict[str, Any]]:
    faiss = _faiss()
    graph = faiss.IndexHNSWFlat(embeddings.shape[1], settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIDMap2(graph), {"hnsw_m": settings.hnsw_m}


@INDEXES.register("ivf")
def _ivf(embeddings: np.ndarray, settings: IndexSettings) -> tuple[Any, dict[str, Any]]:
    faiss = _faiss()
    return _trained_ivf("ivf", embeddings, settings, lambda quantizer, dim, nlist: (
        faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT), {}))


@INDEXES.register("ivfpq")
def _ivfpq(embeddings: np.ndarray, settings: IndexSettings) -> tuple[Any, dict[str, Any]]:
    faiss = _faiss()

    def make(quantizer: Any, dim: int, nlist: int) -> tuple[Any, dict[str, Any]]:
        if dim % settings.pq_m:
            raise ConfigError(f"ivfpq: embedding dim {dim} must be divisible by pq_m {settings.pq_m}")
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, settings.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        return index, {"pq_m": settings.pq_m}

    return _trained_ivf("ivfpq", embeddings, settings, make)


def _trained_ivf(kind: str, embeddings: np.ndarray, settings: IndexSettings,
                 make: Callable[[Any, int, int], tuple[Any, dict[str, Any]]]) -> tuple[Any, dict[str, Any]]:
    """An inverted-file index made by ``make(quantizer, dim, nlist)``, its coarse quantizer trained."""
    n, dim = embeddings.shape
    nlist = settings.nlist or max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39 or 1))
    index, recorded = make(_faiss().IndexFlatIP(dim), dim, nlist)
    if n < nlist:
        raise DataError(f"index kind {kind}: {n} vectors are fewer than nlist={nlist}; use kind flat")
    # Train the coarse quantizer on a fixed sample (deterministic, bounded cost).
    # FAISS wants at least 39 training points per cell; 40 keeps k-means affordable at millions of chunks
    # (a 1.3M-chunk database trains on 186k sampled vectors, not on all of them).
    sample = np.sort(np.random.default_rng(settings.seed).permutation(n)[: max(nlist * TRAIN_POINTS_PER_CELL, 10_000)])
    began = time.perf_counter()
    index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
    log.info("index %s: coarse quantizer (%d cells) trained on %d of %d vectors in %.1f s", kind, nlist,
             len(sample), n, time.perf_counter() - began)
    index.nprobe = min(settings.nprobe, nlist)
    return index, {**recorded, "nlist": int(nlist), "nprobe": int(index.nprobe), "train_sample": int(len(sample)),
                   "train_seconds": round(time.perf_counter() - began, 3)}


def measure_recall(index: Any, embeddings: np.ndarray, queries: int = 1000, k: int = 10, seed: int = 0,
                   nprobes: tuple[int, ...] = (1, 4, 16, 64), block: int = 65536) -> dict[str, Any]:
    """Recall@k of ``index`` against exact inner-product search, on ``queries`` sampled rows.

    Each query is a database chunk's own embedding; the chunk itself is left out of both
    lists (every index finds it), so this is recall of the other k nearest chunks. A returned
    chunk counts as found when its exact score is at least the k-th exact score (minus 1e-5):
    duplicated chunks tie, and any of the tied ones is a right answer. IVF indexes are also
    measured at each of ``nprobes`` (cells searched per query), then reset to their own nprobe.
    """
    n = len(embeddings)
    if n < 2 or queries < 1 or k < 1:
        return {"queries": 0, "k": k, "recall": 1.0, "recall_at_1": 1.0}
    k = min(k, n - 1)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    xq = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
    # exact: the k best scores per query (the query itself left out), block by block over the database
    best_scores = np.full((len(rows), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(rows), 0), dtype=np.int64)
    for start in range(0, n, block):
        scores = xq @ np.asarray(embeddings[start:start + block], dtype=np.float32).T
        inside = (rows >= start) & (rows < start + scores.shape[1])
        scores[np.flatnonzero(inside), rows[inside] - start] = -np.inf  # never the query itself
        both_scores = np.concatenate([best_scores, scores], axis=1)
        both_ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + scores.shape[1]),
                                                             scores.shape)], axis=1)
        top = np.argpartition(-both_scores, min(k, both_scores.shape[1] - 1), axis=1)[:, :k]
        best_scores = np.take_along_axis(both_scores, top, 1)
        best_ids = np.take_along_axis(both_ids, top, 1)
    kth = best_scores.min(axis=1)
    first = best_scores.max(axis=1)

    def score(ids: np.ndarray) -> np.ndarray:
        found = np.full(ids.shape, -np.inf, dtype=np.float32)
        have = ids >= 0
        vecs = np.asarray(embeddings[np.where(have, ids, 0).ravel()], dtype=np.float32).reshape(*ids.shape, -1)
        found[have] = np.einsum("qd,qjd->qj", xq, vecs)[have]
        return found

    def approximate() -> tuple[float, float]:
        _, ids = index.search(xq, k + 1)
        ids = _without_queries(ids, rows, k)
        found = score(ids)
        recall = float((found >= kth[:, None] - 1e-5).sum(1).mean() / k)
        at_1 = float((found[:, 0] >= first - 1e-5).mean())
        return recall, at_1

    recall, at_1 = approximate()
    result: dict[str, Any] = {"queries": int(len(rows)), "k": int(k), "recall": round(recall, 4),
                              "recall_at_1": round(at_1, 4)}
    if hasattr(index, "nprobe"):
        own = int(index.nprobe)
        result["nprobe"] = own
        by_nprobe = {}
        for probes in nprobes:
            index.nprobe = min(probes, int(getattr(index, "nlist", probes)))
            by_nprobe[str(probes)] = round(approximate()[0], 4)
        index.nprobe = own
        result["recall_by_nprobe"] = by_nprobe
    return result


def _without_queries(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each row of ``ids`` without its query's own id, cut to ``k`` (padded with -1)."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for r, (row, query) in enumerate(zip(ids, rows)):
        kept = row[row != query][:k]
        out[r, :len(kept)] = kept
    return out


def add_to_index(index: Any, embeddings: np.ndarray, ids: np.ndarray,
                 progress: Callable[[int], None] | None = None, block: int = 65536) -> None:
    for start in range(0, len(ids), block):
        vecs = np.ascontiguousarray(embeddings[start:start + block], dtype=np.float32)
        index.add_with_ids(vecs, np.ascontiguousarray(ids[start:start + block], dtype=np.int64))
        if progress is not None:
            progress(len(vecs))


def remove_from_index(index: Any, ids: np.ndarray) -> int:
    """Remove ``ids``; returns how many the index dropped (0 for HNSW, which keeps tombstones)."""
    faiss = _faiss()
    try:
        return int(index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))))
    except RuntimeError:
        return 0  # HNSW cannot remove; the alive mask filters those chunks out of every search


def save_index(index: Any, path: Path) -> None:
    """Write to a temporary name then rename (callers pick a fresh name per generation)."""
    from lmforge.core.io import atomic_write

    atomic_write(path, lambda tmp: _faiss().write_index(index, str(tmp)))


def load_index(path: Path, spec: dict[str, Any]) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: vector index missing; rebuild the database (lmforge retrieval build)")
    index = _faiss().read_index(str(path))
    if "nprobe" in spec:
        index.nprobe = int(spec["nprobe"])
    return index


def search_filtered(index: Any, queries: np.ndarray, k: int, keep: Callable[[int, np.ndarray], np.ndarray],
                    max_fetch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query among ids that ``keep(query_row, ids)`` accepts.

    Over-retrieves and filters; a query left short re-searches with twice the depth, up
    to ``max_fetch``. Missing slots are id -1, score -inf.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(queries)
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    todo = np.arange(n)
    fetch = min(max(4 * k, k + 16), max(index.ntotal, 1))
    while len(todo):
        scores, ids = index.search(queries[todo], fetch)
        short = []
        for row, q in enumerate(todo):
            valid = ids[row] >= 0
            cand, cand_scores = ids[row][valid], scores[row][valid]
            ok = keep(int(q), cand)
            cand, cand_scores = cand[ok][:k], cand_scores[ok][:k]
            out_ids[q, :len(cand)] = cand
            out_scores[q, :len(cand)] = cand_scores
            if len(cand) < k and fetch < min(max_fetch, index.ntotal):
                short.append(q)
        todo = np.array(short, dtype=np.int64)
        fetch = min(fetch * 2, max_fetch, max(index.ntotal, 1))
    return out_scores, out_ids


# The kinds --index offers (built-in ones; ``choose_kind`` also accepts kinds registered later).
INDEX_KINDS = ("auto", *INDEXES.names())
