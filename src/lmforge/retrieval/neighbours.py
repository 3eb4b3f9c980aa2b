"""Precomputed neighbours of every training chunk, for RETRO training.

For each chunk of a training source the top-k chunk ids are stored in ``neighbours.npy``
(int64 [n_train_chunks, k], -1 where the database has fewer candidates). A neighbour is
never taken from the query chunk's own document(s), nor from chunks within
``exclusion_radius`` chunks of it in the same source stream: a training window spans
several chunks, and a neighbour from later in the same window (even from the next
document) would hand the model the text it is asked to predict.

Work is split in blocks of ``block_size`` queries; each finished block leaves
``block_NNNNN.npy`` and a ``.done`` marker naming the database generation and settings,
so an interrupted run resumes where it stopped and a rerun skips everything. With
``workers > 1`` the unfinished blocks are shared among that many processes (each opens the
database and its index once and searches with one thread); the blocks and markers are the same
files, so a parallel run's result is identical to a serial one's and either resumes the other.
FAISS searches a block with all cores (OpenMP) in a serial run; worker processes help most where
the per-query filtering in Python, not the index search, is the cost (an IVF index).
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_json, atomic_write_npy, read_json
from lmforge.core.logging import RateProgress, get_logger
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.index import search_filtered

log = get_logger(__name__)
NEIGHBOURS = "neighbours.npy"
MANIFEST = "manifest.json"


def default_neighbours_dir(db_path: str | Path, k: int) -> Path:
    return Path(db_path) / f"neighbours_k{k}"


def training_chunk_sources(db: ChunkDatabase) -> tuple[int, np.ndarray]:
    """(number of training chunks, training-source index of each training chunk).

    Training chunks are the database's first rows, source after source (build order).
    """
    train = [info for info in db.sources.values() if info["kind"] == "train"]
    n_train = sum(info["n_chunks"] for info in train)
    source_of = np.zeros(n_train, dtype=np.int64)
    for s, info in enumerate(train):
        source_of[info["first_chunk"]:info["first_chunk"] + info["n_chunks"]] = s
    return n_train, source_of


def excluded_for_training(docs: np.ndarray, source_of: np.ndarray, rows: np.ndarray, ids: np.ndarray,
                          exclusion_radius: int) -> np.ndarray:
    """True where chunk ``ids`` may not serve training chunk ``rows`` (elementwise, same shape).

    The rule of this module: a chunk of one of the query's documents, or a training chunk
    of the same source within ``exclusion_radius`` chunks of it. ``docs`` is ``db.doc``,
    ``source_of`` comes from :func:`training_chunk_sources`.
    """
    rows, ids = np.broadcast_arrays(np.asarray(rows, dtype=np.int64), np.asarray(ids, dtype=np.int64))
    n_train = len(source_of)
    shared = (docs[ids][..., :, None] == docs[rows][..., None, :]).any(axis=(-2, -1))
    near = (ids < n_train) & (np.abs(ids - rows) <= exclusion_radius)
    near &= source_of[np.clip(ids, 0, max(n_train - 1, 0))] == source_of[np.clip(rows, 0, max(n_train - 1, 0))]
    return shared | near


def search_training_neighbours(db: ChunkDatabase, rows: np.ndarray, k: int, exclusion_radius: int = 8,
                               sources: tuple[int, np.ndarray] | None = None) -> np.ndarray:
    """Top-k chunk ids [len(rows), k] of training chunks ``rows`` under this module's exclusion rule.

    -1 where fewer chunks qualify. ``sources`` is :func:`training_chunk_sources`'s result,
    passed in to avoid recomputing it block after block.
    """
    rows = np.asarray(rows, dtype=np.int64)
    _, source_of = sources if sources is not None else training_chunk_sources(db)
    docs, alive = np.asarray(db.doc), np.asarray(db.alive)
    queries = np.asarray(db.embeddings[rows])

    def keep(q: int, ids: np.ndarray) -> np.ndarray:
        return ~excluded_for_training(docs, source_of, rows[q], ids, exclusion_radius) & alive[ids]

    return search_filtered(db.index, queries, k, keep)[1]


def precompute_neighbours(db: ChunkDatabase, k: int = 2, out: str | Path | None = None, block_size: int = 4096,
                          exclusion_radius: int = 8, max_blocks: int | None = None, workers: int = 1) -> Path:
    """Write ``out/neighbours.npy`` for every training chunk of ``db``; returns ``out``.

    ``workers`` > 1 searches blocks in that many processes. ``max_blocks`` stops after that
    many new blocks (for tests of resumption).
    """
    if k < 1 or block_size < 1 or exclusion_radius < 0 or workers < 1:
        raise DataError(f"neighbours: k, block_size and workers must be >= 1 and exclusion_radius >= 0 "
                        f"(got {k}, {block_size}, {workers}, {exclusion_radius})")
    out = Path(out) if out is not None else default_neighbours_dir(db.path, k)
    train = {name: info for name, info in db.sources.items() if info["kind"] == "train"}
    sources = training_chunk_sources(db)
    n_train = sources[0]
    if n_train == 0:
        raise DataError(f"{db.path}: no training chunks to compute neighbours for")
    settings = {"generation": db.generation, "k": k, "block_size": block_size,
                "exclusion_radius": exclusion_radius, "embedder": db.manifest["embedder"], "n_queries": n_train}
    out.mkdir(parents=True, exist_ok=True)
    n_blocks = -(-n_train // block_size)
    bounds = [(b * block_size, min(n_train, (b + 1) * block_size)) for b in range(n_blocks)]

    def finished(b: int) -> bool:
        marker = out / f"block_{b:05d}.done"
        return marker.is_file() and read_json(marker) == settings and (out / f"block_{b:05d}.npy").is_file()

    todo = [b for b in range(n_blocks) if not finished(b)]
    skipped = n_blocks - len(todo)
    if max_blocks is not None:
        todo = todo[:max_blocks]
    began = time.perf_counter()
    with RateProgress(f"neighbours ({workers} worker{'s' if workers > 1 else ''})", n_train, unit="chunks") as bar:
        pending = set(todo)
        bar.advance(sum(bounds[b][1] - bounds[b][0] for b in range(n_blocks) if b not in pending and finished(b)),
                    units=0)  # done by an earlier run: not part of this run's rate
        if workers == 1 or len(todo) <= 1:
            for b in todo:
                _write_block(db, out, b, bounds[b], k, exclusion_radius, settings, sources)
                bar.advance(bounds[b][1] - bounds[b][0])
        else:
            context = multiprocessing.get_context("spawn")  # no forked OpenMP state inside FAISS
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_worker_start,
                                     initargs=(str(db.path),)) as pool:
                futures = [pool.submit(_worker_block, str(out), b, bounds[b], k, exclusion_radius, settings)
                           for b in todo]
                for future in as_completed(futures):
                    bar.advance(future.result())
    seconds = time.perf_counter() - began
    searched = sum(bounds[b][1] - bounds[b][0] for b in todo)
    if skipped:
        log.info("neighbours: %d of %d blocks were done by an earlier run; skipped", skipped, n_blocks)
    if not all(finished(b) for b in range(n_blocks)):
        return out  # stopped early (max_blocks)
    blocks = [np.load(out / f"block_{b:05d}.npy") for b in range(n_blocks)]
    atomic_write_npy(out / NEIGHBOURS, np.concatenate(blocks))
    missing = int((np.concatenate(blocks) < 0).sum())
    atomic_write_json(out / MANIFEST, {**settings, "database": str(db.path), "missing": missing,
                                       "sources": {n: {"first_chunk": i["first_chunk"], "n_chunks": i["n_chunks"]}
                                                   for n, i in train.items()},
                                       "last_run": {"workers": workers, "blocks_searched": len(todo),
                                                    "blocks_skipped": skipped, "chunks_searched": searched,
                                                    "seconds": round(seconds, 3),
                                                    "chunks_per_second": round(searched / max(seconds, 1e-9), 1)}})
    log.info("neighbours: %d training chunks x k=%d -> %s (%d empty slots); searched %d chunks in %.1f s "
             "(%.0f chunks/s, %d worker%s)", n_train, k, out / NEIGHBOURS, missing, searched, seconds,
             searched / max(seconds, 1e-9), workers, "s" if workers > 1 else "")
    return out


def _write_block(db: ChunkDatabase, out: Path, b: int, bounds: tuple[int, int], k: int, exclusion_radius: int,
                 settings: dict[str, Any], sources: tuple[int, np.ndarray]) -> None:
    ids = search_training_neighbours(db, np.arange(*bounds), k, exclusion_radius, sources)
    atomic_write_npy(out / f"block_{b:05d}.npy", ids)
    atomic_write_json(out / f"block_{b:05d}.done", settings)


_WORKER: dict[str, Any] = {}


def _worker_start(db_path: str) -> None:
    """Open the database once per worker process; one search thread per process."""
    import faiss

    faiss.omp_set_num_threads(1)
    db = ChunkDatabase(db_path)
    _WORKER.update(db=db, sources=training_chunk_sources(db))


def _worker_block(out: str, b: int, bounds: tuple[int, int], k: int, exclusion_radius: int,
                  settings: dict[str, Any]) -> int:
    _write_block(_WORKER["db"], Path(out), b, bounds, k, exclusion_radius, settings, _WORKER["sources"])
    return bounds[1] - bounds[0]


def load_neighbours(path: str | Path, db: ChunkDatabase) -> tuple[np.ndarray, dict[str, Any]]:
    """(neighbour ids [n_train, k] memory-mapped, manifest); checks they belong to ``db``."""
    path = Path(path)
    if not (path / MANIFEST).is_file() or not (path / NEIGHBOURS).is_file():
        raise DataError(f"{path}: no precomputed neighbours; run `lmforge retrieval neighbours {db.path}`")
    manifest = read_json(path / MANIFEST)
    if manifest["embedder"] != db.manifest["embedder"]:
        raise DataError(f"{path}: neighbours were computed with another embedder than {db.path}'s")
    if manifest["generation"] != db.generation:
        # Chunk rows are append-only, so old neighbour ids still name the same chunks:
        # training stays exact; only chunks removed since are still used.
        log.warning("%s: neighbours are from database generation %d, the database is at %d "
                    "(recompute to drop removed chunks)", path, manifest["generation"], db.generation)
    return np.load(path / NEIGHBOURS, mmap_mode="r"), manifest
