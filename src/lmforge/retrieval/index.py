"""The vector index over chunk embeddings (FAISS, inner product on unit vectors = cosine).

Index ids are chunk ids (rows of the database arrays), so a search answers chunk ids
directly and ``remove_ids`` deletes chunks. Kinds, chosen by database size unless named:

| kind    | what                                | when (``auto``)          | removal          |
|---------|-------------------------------------|--------------------------|------------------|
| flat    | exact ``IndexFlatIP`` in an IDMap    | n < 200,000              | remove_ids       |
| ivf     | ``IndexIVFFlat``, nlist ≈ 4·√n       | 200,000 ≤ n < 5,000,000  | remove_ids       |
| ivfpq   | ``IndexIVFPQ`` (compressed codes)    | n ≥ 5,000,000            | remove_ids       |
| hnsw    | ``IndexHNSWFlat`` in an IDMap        | only when asked          | tombstones only  |

Every search also filters by the database's ``alive`` mask, so a kind without removal
(HNSW) still never returns a removed chunk. Each kind is a builder in :data:`INDEXES`; a new
kind is one function registered there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.registry import Registry

FLAT_MAX = 200_000
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
    sample = np.random.default_rng(settings.seed).permutation(n)[: max(nlist * 64, 10_000)]
    index.train(np.ascontiguousarray(embeddings[np.sort(sample)], dtype=np.float32))
    index.nprobe = min(settings.nprobe, nlist)
    return index, {**recorded, "nlist": int(nlist), "nprobe": int(index.nprobe)}


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
