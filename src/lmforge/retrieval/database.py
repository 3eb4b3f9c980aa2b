"""The chunk database: token chunks, their continuations, documents, embeddings, an index.

Layout of a database directory (arrays are ``.npy`` files read through memory maps)::

    manifest.json          written last of all, atomically: what is in the database and
                           which file holds each array (a "generation")
    tokenizer.json         the tokenizer the chunks are in (from the prepared data)
    tokens.gN.npy          uint16/uint32 [n_chunks, chunk_len] token ids
    next.gN.npy            int64 [n_chunks]: the chunk that continues this one, -1 if none
    doc.gN.npy             int64 [n_chunks, 2]: document of the chunk's first and last token
    alive.gN.npy           bool  [n_chunks]: False once removed
    embeddings.gN.npy      float32 [n_chunks, dim], unit rows
    index.gN.faiss         FAISS index over the embeddings, ids = chunk rows

Chunks from a prepared data directory (``build``) cut each source's training token stream
at multiples of ``chunk_len`` (as a training window is cut), so a chunk can span the end of
one document and the start of the next; ``doc`` records both, and neighbour search
excludes either. The final partial chunk of a source is dropped. Chunks from ``add`` are
cut per document, the last one padded with end-of-text.

``build`` takes one prepared data directory or several: the first one's sources are the
``train`` chunks (RETRO training samples them, neighbours are precomputed for them), later
ones' are ``extra`` chunks, retrieved from but never trained on (a large database such as the
installed packages' source, prepared with the first directory's tokenizer). A build is
resumable: its finished parts leave markers in ``.build/`` (chunk arrays, each block of
embeddings, the index, the recall measurement) and a rerun skips them; the manifest, written
last, records build time, memory per chunk and the index's recall against exact search.

Updates never modify a file in place: they write the changed arrays under a new
generation number, then the manifest, then delete files no manifest names. A reader holds
the old generation's memory maps until it reopens; a crash mid-update leaves the old
database intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write, atomic_write_json, read_json
from lmforge.core.logging import RateProgress, get_logger
from lmforge.data.shards import ShardSet, load_manifest, token_dtype
from lmforge.data.tokenizer import Tokenizer
from lmforge.retrieval.alignment import aligned_windows
from lmforge.retrieval.embedders import Embedder, build_embedder, summarised_spec
from lmforge.retrieval.index import (add_to_index, build_index, load_index, measure_recall, remove_from_index,
                                     save_index, search_filtered)

log = get_logger(__name__)
FORMAT = "lmforge-chunkdb-1"
MANIFEST = "manifest.json"
ARRAYS = ("tokens", "next", "doc", "alive", "embeddings")
_GENERATION_FILE = re.compile(r"^(tokens|next|doc|alive|embeddings|index)\.g(\d+)\.(npy|faiss)$")


# ---- writing arrays ---------------------------------------------------------------------
def _write_array(path: Path, shape: tuple[int, ...], dtype: Any, pieces: Iterator[np.ndarray]) -> None:
    """Fill a new .npy memory map from ``pieces`` (in order), atomically."""

    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        pos = 0
        for piece in pieces:
            out[pos:pos + len(piece)] = piece
            pos += len(piece)
        if pos != shape[0]:
            raise DataError(f"{path.name}: wrote {pos} rows, expected {shape[0]}")
        out.flush()
        del out

    atomic_write(path, write)


def _blocks(array: np.ndarray, size: int = 1 << 16) -> Iterator[np.ndarray]:
    for start in range(0, len(array), size):
        yield np.asarray(array[start:start + size])


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[None]:
    """One writer at a time per database (readers never lock). ``wait=False``: a database that
    another process is writing is refused at once instead of waited for (a build)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise DataError(f"{path}: another lmforge process is writing this database (a build, add or "
                            "remove); wait for it to finish, then rerun") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ChunkDatabase:
    """A read-only view of one database generation (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{self.path}: not a chunk database (no {MANIFEST}); build one with "
                            "`lmforge retrieval build DATA_DIR --out DIR`")
        try:
            self.manifest = read_json(manifest_path)
        except (OSError, ValueError) as exc:
            raise DataError(f"{manifest_path}: unreadable ({exc})") from exc
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        files = self.manifest["files"]
        try:
            arrays = {name: np.load(self.path / files[name], mmap_mode="r") for name in ARRAYS}
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{self.path}: missing or corrupt array ({exc}); rebuild the database") from exc
        self.tokens, self.next, self.doc = arrays["tokens"], arrays["next"], arrays["doc"]
        self.alive, self.embeddings = arrays["alive"], arrays["embeddings"]
        n = self.manifest["n_chunks"]
        if any(len(a) != n for a in arrays.values()):
            raise DataError(f"{self.path}: arrays disagree with the manifest's {n} chunks; rebuild the database")
        self.tokenizer = Tokenizer.load(self.path / "tokenizer.json")
        self._index: Any = None
        self._embedder: Embedder | None = None

    # ---- facts about the database -------------------------------------------------------
    @property
    def chunk_len(self) -> int:
        return int(self.manifest["chunk_len"])

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    def __len__(self) -> int:
        return int(self.manifest["n_chunks"])

    @property
    def sources(self) -> dict[str, dict[str, Any]]:
        return self.manifest["sources"]

    @property
    def documents(self) -> list[dict[str, Any]]:
        return self.manifest["documents"]

    @property
    def index(self) -> Any:
        if self._index is None:
            self._index = load_index(self.path / self.manifest["files"]["index"], self.manifest["index"])
        return self._index

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = build_embedder(self.manifest["embedder"], self.tokenizer)
        return self._embedder

    def set_embedder(self, embedder: Embedder) -> None:
        """Reuse an already loaded embedder (it must match the database's spec)."""
        if embedder.spec() != self.manifest["embedder"]:
            raise DataError(f"{self.path}: embedder {summarised_spec(embedder.spec())} differs from the database's "
                            f"{summarised_spec(self.manifest['embedder'])}")
        self._embedder = embedder

    # ---- reading chunks ----------------------------------------------------------------
    def neighbour_tokens(self, ids: np.ndarray, queries: np.ndarray | None = None,
                         usable: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Chunk tokens followed by their continuation: int64 [..., k, 2 * chunk_len] for ``ids`` [..., k].

        Id -1 (no neighbour) and a missing continuation read as end-of-text tokens. With
        ``queries`` [..., chunk_len] (the chunks that retrieved ``ids``), each window is moved
        along the database's token stream to line up with its query (see
        :mod:`lmforge.retrieval.alignment`); removed chunks never enter a moved window, and
        ``usable(query_index, chunk_ids)`` (over the flattened queries) can forbid more.
        """
        if queries is None:
            return self._plain_neighbour_tokens(ids)
        ids = np.asarray(ids, dtype=np.int64)
        queries = np.asarray(queries, dtype=np.int64)
        lead, k, m = ids.shape[:-1], ids.shape[-1], self.chunk_len
        if queries.shape != (*lead, m):
            raise DataError(f"aligned neighbours: queries {list(queries.shape)} do not match ids {list(ids.shape)} "
                            f"and chunk_len {m}")
        alive = np.asarray(self.alive)

        def allowed(q: np.ndarray, rows: np.ndarray) -> np.ndarray:
            ok = alive[rows]
            return ok & usable(q, rows) if usable is not None else ok

        windows, _ = aligned_windows(self.tokens, self.next, ids.reshape(-1, k), queries.reshape(-1, m),
                                     self.tokenizer.eos_id, allowed)
        return windows.reshape(*lead, k, 2 * m)

    def _plain_neighbour_tokens(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        m, eos = self.chunk_len, self.tokenizer.eos_id
        out = np.full((len(flat), 2 * m), eos, dtype=np.int64)
        have = flat >= 0
        if have.any():
            rows = flat[have]
            order = np.argsort(rows, kind="stable")  # sorted reads are kinder to memory maps
            first = np.empty((len(rows), m), dtype=np.int64)
            first[order] = self.tokens[rows[order]]
            nxt = np.asarray(self.next[rows])
            second = np.full((len(rows), m), eos, dtype=np.int64)
            has_next = nxt >= 0
            if has_next.any():
                second[has_next] = self.tokens[nxt[has_next]]
            out[have] = np.concatenate([first, second], axis=1)
        return out.reshape(*ids.shape, 2 * m)

    def search(self, queries: np.ndarray, k: int, exclude_docs: np.ndarray | None = None,
               allowed: np.ndarray | None = None) -> np.ndarray:
        """Chunk ids [n, k] nearest to unit ``queries`` [n, dim]; -1 where fewer exist.

        ``exclude_docs`` [n, j]: document ids each query must not retrieve from (-1 = none).
        ``allowed``: optional bool mask over chunks (e.g. a fraction of the database).
        """
        alive = np.asarray(self.alive)
        mask = alive if allowed is None else alive & allowed
        docs = np.asarray(self.doc)

        def keep(q: int, ids: np.ndarray) -> np.ndarray:
            ok = mask[ids]
            if exclude_docs is not None:
                bad = exclude_docs[q][exclude_docs[q] >= 0]
                if len(bad):
                    ok &= ~np.isin(docs[ids], bad).any(axis=1)
            return ok

        return search_filtered(self.index, queries, k, keep)[1]

    def retrieve(self, chunks: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Embed token ``chunks`` [n, chunk_len] and return their top-k chunk ids [n, k]."""
        chunks = np.asarray(chunks)
        if chunks.ndim != 2 or chunks.shape[1] != self.chunk_len:
            raise DataError(f"retrieve: expected chunks of shape [n, {self.chunk_len}], got {list(chunks.shape)}")
        if len(chunks) == 0:
            return np.zeros((0, k), dtype=np.int64)
        return self.search(self.embedder.embed(chunks), k, allowed=allowed)

    def document_mask(self, fraction: float, seed: int = 0) -> np.ndarray:
        """Chunks of a fixed random ``fraction`` of the documents (for growing-database curves)."""
        if not 0 < fraction <= 1:
            raise DataError(f"database fraction must be in (0, 1], got {fraction}")
        n_docs = len(self.documents)
        chosen = np.random.default_rng(seed).random(n_docs) < fraction
        docs = np.asarray(self.doc)
        return chosen[docs[:, 0]] & chosen[docs[:, 1]]


# ---- building from prepared data directories ----------------------------------------------
BUILD_DIR = ".build"          # a build's unfinished work, removed once the manifest is written
EMBED_BLOCK = 65536           # chunks per resumable embedding block
AUTO_EMBEDDER_MAX = 200_000   # embedder "auto": minilm below this many chunks, bag_of_tokens:128 from it
LARGE_EMBEDDER = "bag_of_tokens:128"


def _plan_chunks(data_dirs: list[Path], chunk_len: int, sources: list[str] | None,
                 max_tokens_per_source: int | None) -> tuple[list[tuple], list[dict[str, Any]], int]:
    """Cut each source of each data directory into chunks (no tokens read yet).

    Returns (plan rows ``(name, kind, data_dir, tokens, n, doc, first)``, documents, n_total).
    The first directory's sources are ``train`` chunks (the model's own training data: neighbours
    are precomputed for them and RETRO training samples them); later directories' sources are
    ``extra``: retrieved from, never trained on.
    """
    manifests = [load_manifest(d) for d in data_dirs]
    seen: dict[str, Path] = {}
    for data_dir, manifest in zip(data_dirs, manifests):
        for name in manifest["sources"]:
            if name in seen:
                raise DataError(f"source {name!r} is in both {seen[name]} and {data_dir}; a database needs "
                                "distinct source names (rename one in its data config)")
            seen[name] = data_dir
    unknown = [s for s in (sources or []) if s not in seen]
    if unknown:
        raise DataError(f"{', '.join(map(str, data_dirs))}: no source {unknown[0]!r} (sources: {', '.join(seen)})")
    plan, documents, n_total, doc_base = [], [], 0, 0
    for d, (data_dir, manifest) in enumerate(zip(data_dirs, manifests)):
        kind = "train" if d == 0 else "extra"
        for name in sorted(manifest["sources"]):
            if sources is not None and name not in sources:
                continue
            tokens = ShardSet(data_dir, "train", name, manifest)
            usable = len(tokens) if max_tokens_per_source is None else min(len(tokens), max_tokens_per_source)
            n = usable // chunk_len
            offsets = tokens.doc_offsets[tokens.doc_offsets < max(usable, 1)]
            if n == 0:
                log.warning("source %r: %d training tokens, fewer than one chunk of %d; skipped", name, usable,
                            chunk_len)
                continue
            starts = np.arange(n, dtype=np.int64) * chunk_len
            doc = np.stack([np.searchsorted(offsets, starts, side="right") - 1,
                            np.searchsorted(offsets, starts + chunk_len - 1, side="right") - 1], axis=1) + doc_base
            chunk_doc_first = np.searchsorted(doc[:, 1], np.arange(doc_base, doc_base + len(offsets)), side="left")
            chunk_doc_last = np.searchsorted(doc[:, 0], np.arange(doc_base, doc_base + len(offsets)), side="right")
            for j in range(len(offsets)):
                first, last = int(chunk_doc_first[j]), int(chunk_doc_last[j])
                documents.append({"id": doc_base + j, "source": name, "name": f"{name}:{j}",
                                  "first_chunk": n_total + first, "n_chunks": max(last - first, 0), "alive": True})
            plan.append((name, kind, data_dir, tokens, n, doc, n_total))
            n_total += n
            doc_base += len(offsets)
    return plan, documents, n_total


def _resolve_embedder(embedder: str | Embedder, tokenizer: Tokenizer, n_chunks: int) -> Embedder:
    if not isinstance(embedder, str):
        return embedder
    if embedder == "auto":
        embedder = "minilm" if n_chunks < AUTO_EMBEDDER_MAX else LARGE_EMBEDDER
        log.info("embedder auto: %s for %d chunks (minilm below %d chunks, %s from there: MiniLM embeds "
                 "about 50 chunks/s on a CPU core)", embedder, n_chunks, AUTO_EMBEDDER_MAX, LARGE_EMBEDDER)
    return build_embedder(embedder, tokenizer)


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class _BuildState:
    """Markers of a resumable build in ``out/.build``: each finished stage or block leaves a file.

    ``plan.json`` holds the build's settings; a rerun with other settings stops with a clear
    error (or, with ``overwrite``, starts over) instead of mixing two builds' parts.
    """

    def __init__(self, out: Path, settings: dict[str, Any], overwrite: bool):
        self.dir = out / BUILD_DIR
        plan = self.dir / "plan.json"
        if plan.is_file():
            previous = read_json(plan)
            if previous != settings:
                if not overwrite:
                    changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                    raise DataError(f"{out} holds an unfinished build with other settings ({', '.join(changed)} "
                                    "differ); rerun with the same arguments to resume it, or pass --overwrite "
                                    "to start over")
                shutil.rmtree(self.dir)
        self.resumed = plan.is_file()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(plan, settings)

    def done(self, name: str) -> dict[str, Any] | None:
        path = self.dir / f"{name}.done"
        return read_json(path) if path.is_file() else None

    def finish(self, name: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.dir / f"{name}.done", record)

    def seconds(self) -> dict[str, float]:
        """Seconds each stage took (summed over the runs that did its parts)."""
        out: dict[str, float] = {}
        for path in sorted(self.dir.glob("*.done")):
            record = read_json(path)
            stage = record.get("stage", path.stem)
            out[stage] = round(out.get(stage, 0.0) + float(record.get("seconds", 0.0)), 3)
        return out


def build_database(data_dir: str | Path | list[str | Path], out: str | Path, chunk_len: int = 64,
                   embedder: str | Embedder = "minilm", index_kind: str = "auto", sources: list[str] | None = None,
                   max_tokens_per_source: int | None = None, overwrite: bool = False,
                   recall_queries: int = 1000, recall_k: int = 10, embed_block: int = EMBED_BLOCK) -> ChunkDatabase:
    """Chunk the training split of ``data_dir`` (one prepared data directory or several), embed, index.

    Several directories make one database: the first one's sources are its ``train`` chunks,
    the others' are ``extra`` chunks (retrieved from, never trained on; all must share the
    first one's tokenizer). The build is resumable: chunk arrays, each block of
    ``embed_block`` embeddings, the trained index and the recall measurement leave markers in
    ``out/.build``, and a rerun after a crash or kill skips what they name. The manifest
    (written last) records build time, memory per chunk and the index's recall@``recall_k``
    against exact search on ``recall_queries`` sampled chunks.
    """
    data_dirs = [Path(d) for d in (data_dir if isinstance(data_dir, (list, tuple)) else [data_dir])]
    out = Path(out)
    if chunk_len < 1:
        raise DataError(f"chunk_len must be >= 1, got {chunk_len}")
    if not data_dirs:
        raise DataError("retrieval build: no prepared data directory given")
    if (out / MANIFEST).exists() and not overwrite:
        raise DataError(f"{out} already holds a database; pass --overwrite to replace it")
    tokenizer = Tokenizer.load(data_dirs[0] / "tokenizer.json")
    for other in data_dirs[1:]:
        if Tokenizer.load(other / "tokenizer.json").sha256 != tokenizer.sha256:
            raise DataError(f"{other}: its tokenizer differs from {data_dirs[0]}'s; prepare it with "
                            f"data.tokenizer_from: {data_dirs[0]} (one database holds one tokenizer's chunks)")
    plan, documents, n_total = _plan_chunks(data_dirs, chunk_len, sources, max_tokens_per_source)
    if n_total == 0:
        raise DataError(f"{', '.join(map(str, data_dirs))}: no training tokens to chunk")
    embedder = _resolve_embedder(embedder, tokenizer, n_total)
    dtype = token_dtype(tokenizer.vocab_size)
    settings = {"data_dirs": [str(d.resolve()) for d in data_dirs],
                "shards": [load_manifest(d)["sources"] for d in data_dirs], "chunk_len": chunk_len,
                "embedder": embedder.spec(), "index_kind": index_kind, "sources": sources,
                "max_tokens_per_source": max_tokens_per_source, "n_chunks": n_total, "embed_block": embed_block,
                "recall_queries": recall_queries, "recall_k": recall_k}
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out, wait=False):
        if (out / MANIFEST).exists():  # overwrite: the old database goes first
            if not overwrite:  # (finished by another build since the check above)
                raise DataError(f"{out} already holds a database; pass --overwrite to replace it")
            _remove_database_files(out)
        state = _BuildState(out, settings, overwrite)
        gen = 0
        files = {name: f"{name}.g{gen}.npy" for name in ARRAYS} | {"index": f"index.g{gen}.faiss"}
        _write_chunk_arrays(out, state, files, plan, n_total, chunk_len, dtype, data_dirs[0])
        chunks = np.load(out / files["tokens"], mmap_mode="r")
        if embedder.needs_fit:     # corpus statistics (the idf embedders): deterministic, so
            embedder.fit(chunks)   # a resumed build fits the same weights again
        skipped_blocks = _write_embeddings(out, state, files, embedder, chunks, embed_block)
        embeddings = np.load(out / files["embeddings"], mmap_mode="r")
        index_spec = _write_index(out, state, files, embeddings, index_kind)
        recall = state.done("recall")
        if recall is None:
            began = time.perf_counter()
            index = load_index(out / files["index"], index_spec)
            recall = measure_recall(index, embeddings, queries=recall_queries, k=recall_k)
            recall_record = {"stage": "recall", "seconds": time.perf_counter() - began, "recall": recall}
            state.finish("recall", recall_record)
            recall = recall_record
        recall = recall["recall"]
        sources_info = {name: {"kind": kind, "first_chunk": first, "n_chunks": n, "tokens": n * chunk_len,
                               "data_dir": str(source_dir)}
                        for name, kind, source_dir, _, n, _, first in plan}
        disk = {name: os.path.getsize(out / f) for name, f in files.items()}
        stage_seconds = state.seconds()
        build = {"seconds_this_run": round(time.perf_counter() - started, 3),
                 "seconds_by_stage": stage_seconds, "seconds": round(sum(stage_seconds.values()), 3),
                 "resumed": state.resumed, "embed_blocks_skipped": skipped_blocks, "bytes_on_disk": sum(disk.values()),
                 "bytes_on_disk_per_chunk": round(sum(disk.values()) / n_total, 1),
                 "peak_rss_bytes": _peak_rss_bytes(), "peak_rss_bytes_per_chunk": round(_peak_rss_bytes() / n_total, 1),
                 "embed_chunks_per_second": round(n_total / max(stage_seconds.get("embed", 0.0), 1e-9), 1)}
        atomic_write_json(out / MANIFEST, {
            "format": FORMAT, "generation": gen, "chunk_len": chunk_len, "n_chunks": n_total,
            "dtype": np.dtype(dtype).name, "data_dir": str(data_dirs[0]), "data_dirs": [str(d) for d in data_dirs],
            "tokenizer_sha256": tokenizer.sha256, "embedder": embedder.spec(), "index": index_spec, "files": files,
            "sources": sources_info, "documents": documents, "removed_documents": 0, "build": build,
            "recall": recall,
        })
        shutil.rmtree(state.dir, ignore_errors=True)
    log.info("chunk database %s: %d chunks of %d tokens from %s, %s index, %s embedder; built in %.1f s "
             "(%.0f bytes on disk and %.0f bytes of peak memory per chunk); recall@%d against exact search %.4f",
             out, n_total, chunk_len, ", ".join(sources_info), index_spec["kind"], embedder.name, build["seconds"],
             build["bytes_on_disk_per_chunk"], build["peak_rss_bytes_per_chunk"], recall["k"], recall["recall"])
    db = ChunkDatabase(out)
    db.set_embedder(embedder)
    return db


def _write_chunk_arrays(out: Path, state: _BuildState, files: dict[str, str], plan: list[tuple], n_total: int,
                        chunk_len: int, dtype: Any, tokenizer_dir: Path) -> None:
    if state.done("chunks") and all((out / files[n]).is_file() for n in ("tokens", "next", "doc", "alive")):
        return
    began = time.perf_counter()
    shutil.copyfile(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")

    def token_pieces() -> Iterator[np.ndarray]:
        with RateProgress("chunks", n_total, unit="chunks") as bar:
            for _, _, _, tokens, n, _, _ in plan:
                for start in range(0, n, 65536):
                    stop = min(n, start + 65536)
                    bar.advance(stop - start)
                    yield tokens.get(start * chunk_len, (stop - start) * chunk_len).reshape(-1, chunk_len)

    _write_array(out / files["tokens"], (n_total, chunk_len), dtype, token_pieces())
    nexts = [np.where(np.arange(n) + 1 < n, np.arange(n) + 1 + first, -1) for *_, n, _, first in plan]
    _write_array(out / files["next"], (n_total,), np.int64, iter(nexts))
    _write_array(out / files["doc"], (n_total, 2), np.int64, iter([row[5] for row in plan]))
    _write_array(out / files["alive"], (n_total,), np.bool_, iter([np.ones(n_total, dtype=bool)]))
    state.finish("chunks", {"stage": "chunks", "seconds": time.perf_counter() - began})


def _write_embeddings(out: Path, state: _BuildState, files: dict[str, str], embedder: Embedder, chunks: np.ndarray,
                      block: int) -> int:
    """Embed ``chunks`` block by block into a memory map; each finished block leaves a marker.

    Returns how many blocks an earlier run had finished (skipped here)."""
    final = out / files["embeddings"]
    n_blocks = -(-len(chunks) // block)
    if state.done("embeddings") and final.is_file():
        return n_blocks
    n = len(chunks)
    partial = state.dir / "embeddings.npy"
    if not partial.is_file():
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, embedder.dim)).flush()
        for old in state.dir.glob("embed_*.done"):  # blocks of an array that no longer exists
            old.unlink()
    vectors_out = np.lib.format.open_memmap(partial, mode="r+")
    size = embedder.batch_size()
    skipped = 0
    with RateProgress(f"embed ({embedder.name})", n, unit="chunks") as bar:
        for b in range(n_blocks):
            start, stop = b * block, min(n, (b + 1) * block)
            if state.done(f"embed_{b:05d}"):
                bar.advance(stop - start, units=0)  # done by an earlier run: not part of this run's rate
                skipped += 1
                continue
            began = time.perf_counter()
            for s in range(start, stop, size):
                piece = np.asarray(chunks[s:min(stop, s + size)])
                vectors_out[s:s + len(piece)] = embedder.embed(piece)
                bar.advance(len(piece))
            vectors_out.flush()
            state.finish(f"embed_{b:05d}", {"stage": "embed", "seconds": time.perf_counter() - began})
    if skipped:
        log.info("embed: %d of %d blocks were done by an earlier run; skipped", skipped, n_blocks)
    del vectors_out
    os.replace(partial, final)
    state.finish("embeddings", {"stage": "embed_assemble", "seconds": 0.0})
    return skipped


def _write_index(out: Path, state: _BuildState, files: dict[str, str], embeddings: np.ndarray,
                 index_kind: str) -> dict[str, Any]:
    done = state.done("index")
    if done and (out / files["index"]).is_file():
        return done["spec"]
    began = time.perf_counter()
    n = len(embeddings)
    with RateProgress("index", n, unit="chunks") as bar:
        index, index_spec = build_index(embeddings, np.arange(n, dtype=np.int64), index_kind, progress=bar.advance)
    save_index(index, out / files["index"])
    state.finish("index", {"stage": "index", "seconds": time.perf_counter() - began, "spec": index_spec})
    return index_spec


SCRATCH_MARKER = ".lmforge-scratch-database"


def mark_scratch_database(path: str | Path, made_by: str) -> None:
    """Mark ``path`` as a scratch database that ``made_by`` (a benchmark) created and may delete."""
    atomic_write_json(Path(path) / SCRATCH_MARKER, {"made_by": made_by})


def remove_database_folder(path: str | Path) -> None:
    """Delete a benchmark's scratch database folder, only if it proves it is one: an lmforge
    chunk-database manifest and the scratch marker that :func:`mark_scratch_database` wrote when
    the folder was made. Any other folder (a user's database included) is refused."""
    path = Path(path)
    manifest = path / MANIFEST
    try:
        ours = (manifest.is_file() and read_json(manifest).get("format") == FORMAT
                and (path / SCRATCH_MARKER).is_file())
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise DataError(f"{path} exists but is not a scratch database a benchmark made ({MANIFEST} and "
                        f"{SCRATCH_MARKER}); not deleting it: choose another folder or remove it yourself")
    shutil.rmtree(path)


def _remove_database_files(out: Path) -> None:
    for path in out.iterdir():
        if _GENERATION_FILE.match(path.name) or path.name == MANIFEST:
            path.unlink()


def _commit_generation(db: ChunkDatabase, manifest: dict[str, Any]) -> None:
    """Write the new manifest, then delete files that no longer belong to any generation."""
    atomic_write_json(db.path / MANIFEST, manifest)
    keep = set(manifest["files"].values())
    for path in db.path.iterdir():
        if _GENERATION_FILE.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


# ---- updates ------------------------------------------------------------------------------
def add_documents(path: str | Path, documents: list[tuple[str, str]], source: str = "added",
                  embedder: Embedder | None = None) -> dict[str, Any]:
    """Add ``(name, text)`` documents under ``source``; returns what was added."""
    path = Path(path)
    if not documents:
        raise DataError("retrieval add: no documents given")
    with _locked(path):
        db = ChunkDatabase(path)
        if embedder is not None:
            db.set_embedder(embedder)
        if db.sources.get(source, {}).get("kind") == "train":
            raise DataError(f"source {source!r} is a training source of {path}; add documents under another name")
        m, tok = db.chunk_len, db.tokenizer
        empty = [name for name, text in documents if not text.strip()]
        if empty:
            raise DataError(f"retrieval add: document {empty[0]!r} is empty")
        ids = tok.encode_batch([text for _, text in documents])
        n_old, doc_base = len(db), len(db.documents)
        new_tokens, new_next, new_doc, new_docs = [], [], [], []
        position = n_old
        for j, ((name, _), doc_ids) in enumerate(zip(documents, ids)):
            seq = np.array(doc_ids + [tok.eos_id], dtype=np.int64)
            n = -(-len(seq) // m)
            padded = np.full(n * m, tok.eos_id, dtype=np.int64)
            padded[:len(seq)] = seq
            new_tokens.append(padded.reshape(n, m))
            new_next.append(np.where(np.arange(n) + 1 < n, position + np.arange(n) + 1, -1))
            new_doc.append(np.full((n, 2), doc_base + j, dtype=np.int64))
            new_docs.append({"id": doc_base + j, "source": source, "name": name, "first_chunk": position,
                             "n_chunks": n, "alive": True})
            position += n
        tokens = np.concatenate(new_tokens).astype(db.tokens.dtype)
        n_new = len(tokens)
        vectors = db.embedder.embed(tokens)
        gen = db.generation + 1
        files = {name: f"{name}.g{gen}.npy" for name in ARRAYS} | {"index": f"index.g{gen}.faiss"}
        total = n_old + n_new
        _write_array(path / files["tokens"], (total, m), db.tokens.dtype, iter([*_blocks(db.tokens), tokens]))
        _write_array(path / files["next"], (total,), np.int64, iter([*_blocks(db.next), *new_next]))
        _write_array(path / files["doc"], (total, 2), np.int64, iter([*_blocks(db.doc), *new_doc]))
        _write_array(path / files["alive"], (total,), np.bool_, iter([*_blocks(db.alive), np.ones(n_new, bool)]))
        _write_array(path / files["embeddings"], (total, vectors.shape[1]), np.float32,
                     iter([*_blocks(db.embeddings), vectors]))
        index = db.index
        add_to_index(index, vectors, np.arange(n_old, total, dtype=np.int64))
        save_index(index, path / files["index"])
        manifest = dict(db.manifest)
        info = dict(manifest["sources"].get(source, {"kind": "added", "first_chunk": n_old, "n_chunks": 0, "tokens": 0}))
        info["n_chunks"] += n_new
        info["tokens"] += int(sum(len(d) + 1 for d in ids))
        manifest.update(generation=gen, n_chunks=total, files=files, sources={**manifest["sources"], source: info},
                        documents=manifest["documents"] + new_docs)
        _commit_generation(db, manifest)
    return {"documents": len(new_docs), "chunks": n_new, "generation": gen, "document_ids": [d["id"] for d in new_docs]}


def remove_documents(path: str | Path, doc_ids: list[int] | None = None, source: str | None = None) -> dict[str, Any]:
    """Remove documents by id and/or every document of ``source``; returns what was removed."""
    path = Path(path)
    if not doc_ids and source is None:
        raise DataError("retrieval remove: give document ids (--doc) or a source (--source)")
    with _locked(path):
        db = ChunkDatabase(path)
        docs = [dict(d) for d in db.documents]
        if source is not None and source not in db.sources:
            raise DataError(f"{path}: no source {source!r} (sources: {', '.join(db.sources)})")
        bad = [i for i in (doc_ids or []) if not 0 <= i < len(docs)]
        if bad:
            raise DataError(f"{path}: no document id {bad[0]} (ids run 0..{len(docs) - 1})")
        chosen = set(doc_ids or []) | {d["id"] for d in docs if source is not None and d["source"] == source}
        chosen = {i for i in chosen if docs[i]["alive"]}
        if not chosen:
            raise DataError(f"{path}: nothing to remove (the documents are already removed)")
        doc = np.asarray(db.doc)
        dead = np.isin(doc, np.fromiter(chosen, dtype=np.int64)).any(axis=1)
        alive = np.asarray(db.alive) & ~dead
        removed_ids = np.flatnonzero(np.asarray(db.alive) & dead).astype(np.int64)
        gen = db.generation + 1
        files = dict(db.manifest["files"], alive=f"alive.g{gen}.npy", index=f"index.g{gen}.faiss")
        _write_array(path / files["alive"], alive.shape, np.bool_, iter([alive]))
        index = db.index
        remove_from_index(index, removed_ids)
        save_index(index, path / files["index"])
        for i in chosen:
            docs[i]["alive"] = False
        manifest = dict(db.manifest, generation=gen, files=files, documents=docs,
                        removed_documents=int(db.manifest.get("removed_documents", 0)) + len(chosen))
        _commit_generation(db, manifest)
    return {"documents": len(chosen), "chunks": int(len(removed_ids)), "generation": gen}


def read_text_documents(paths: list[str | Path]) -> list[tuple[str, str]]:
    """Text files as (name, text) documents; a folder contributes its *.txt and *.md files."""
    out: list[tuple[str, str]] = []
    for item in paths:
        p = Path(item)
        files = sorted([*p.rglob("*.txt"), *p.rglob("*.md")]) if p.is_dir() else [p]
        if not p.exists():
            raise DataError(f"retrieval add: {p} does not exist")
        for f in files:
            try:
                out.append((str(f), f.read_text(encoding="utf-8")))
            except UnicodeDecodeError as exc:
                raise DataError(f"retrieval add: {f} is not UTF-8 text ({exc})") from exc
    if not out:
        raise DataError(f"retrieval add: no .txt/.md files under {', '.join(map(str, paths))}")
    return out


def database_info(path: str | Path) -> dict[str, Any]:
    db = ChunkDatabase(path)
    alive_docs = sum(d["alive"] for d in db.documents)
    sizes = {name: os.path.getsize(db.path / f) for name, f in db.manifest["files"].items()}
    return {"path": str(db.path), "generation": db.generation, "chunk_len": db.chunk_len, "chunks": len(db),
            "alive_chunks": int(np.asarray(db.alive).sum()), "documents": len(db.documents),
            "alive_documents": alive_docs, "index": db.manifest["index"],
            "embedder": summarised_spec(db.manifest["embedder"]),
            "sources": db.sources, "bytes": sizes, "build": db.manifest.get("build"),
            "recall": db.manifest.get("recall")}
