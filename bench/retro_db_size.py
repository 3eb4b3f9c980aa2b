"""Grow the database at inference, not the model: one trained RETRO model, databases of growing size.

The same RETRO checkpoint is scored on the held-out windows of its data (as ``lmforge retrieval
eval`` scores them) with neighbours from nested databases cut out of one large database:

- ``1x`` is the large database's ``train`` chunks alone (the model's own training data: the
  database it was trained with), ``4x``, ``16x``, ... add documents of the other sources (e.g. the
  installed packages' Python source) in one fixed, seeded random order until the database holds
  that multiple of the 1x chunk count, and ``full`` is the large database itself. Each size's
  documents are a prefix of the same order, so every smaller database is inside every larger one.
  A chunk is kept when both documents it touches are kept (as ``document_mask`` does).
- Each subset is written as an ordinary database (chunks, continuations, documents, the stored
  embeddings, a fresh index of the kind ``retrieval build`` would choose for its size), so its
  search latency is that of a database of that size, not of a filtered larger one.

Per size: held-out bits-per-byte per domain with retrieval, the paired per-document interval of
the difference with minus without retrieval (the eval's guard), and retrieval latency per query
chunk (search + neighbour fetch, batched as the eval does and one query at a time as generation
does; sizes measured in interleaved rounds, medians reported). Beside them: dense models (e.g. 1x
and 2x RETRO's parameters, trained on the same tokens) on the same windows, with bootstrap
intervals over documents and the paired difference RETRO minus dense. Writes ``OUT/results.json``,
``OUT/table.md`` and ``OUT/db_size.png``.

    python bench/retro_db_size.py --run RETRO_RUN --large LARGE_DB --work /tmp/retro_size/subsets \\
        --dense dense_1x=DENSE_RUN --dense dense_2x=DENSE2_RUN --multiples 1,4,16 \\
        --check-direct DEMO_DB --out docs/results/retro_db_size

``--check-direct DB``: a database built directly from the model's data directory; the 1x subset
must hold the same chunks, continuations, documents and embeddings and give the same bits-per-byte.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_json
from lmforge.core.run_marker import resolve_data_dir
from lmforge.eval.bootstrap import bpb_interval
from lmforge.eval.retrieval_eval import HeldoutRetrieval, evaluate_retrieval, sums_by_document
from lmforge.eval.retrieval_guard import paired_difference_interval
from lmforge.nn.loading import load_model
from lmforge.retrieval.database import ARRAYS, ChunkDatabase, mark_scratch_database, remove_database_folder
from lmforge.retrieval.index import build_index, measure_recall, save_index


# ---- nested subsets ------------------------------------------------------------------------------
def base_documents(db: ChunkDatabase) -> np.ndarray:
    """Bool [n_documents]: documents of the database's ``train`` sources (the model's own data)."""
    train = {name for name, info in db.sources.items() if info.get("kind") == "train"}
    if not train:
        raise DataError(f"{db.path}: no source of kind 'train'; the 1x database is the model's training chunks, "
                        "so the large database must be built with the model's data directory first")
    return np.array([d["source"] in train for d in db.documents], dtype=bool)


def document_order(db: ChunkDatabase, seed: int = 0) -> np.ndarray:
    """Rank of every document in the order they join the database: -1 for the 1x (train) documents,
    then 0, 1, ... for the others in a seeded random order; removed documents never join (a huge rank)."""
    base = base_documents(db)
    alive = np.array([d["alive"] for d in db.documents], dtype=bool)
    extra = np.flatnonzero(~base & alive)
    rank = np.full(len(base), np.iinfo(np.int64).max, dtype=np.int64)
    rank[base] = -1
    rank[np.random.default_rng(seed).permutation(extra)] = np.arange(len(extra))
    return rank


def train_chunks(db: ChunkDatabase) -> int:
    """Chunks of the database's train sources (the 1x database)."""
    return int((document_order(db)[np.asarray(db.doc)].max(axis=1) == -1).sum())


def nested_subsets(db: ChunkDatabase, multiples: list[float], seed: int = 0) -> list[dict[str, Any]]:
    """For each multiple of the 1x chunk count: the smallest prefix of :func:`document_order` whose
    chunks reach it, as ``{"multiple", "chunk_mask", "document_mask", "chunks", "documents"}``.

    Multiples at or beyond the whole database are dropped (the whole database is its own size).
    """
    rank = document_order(db, seed)
    doc = np.asarray(db.doc)
    alive = np.asarray(db.alive)
    # a chunk joins with the later of its (at most two) documents
    key = np.where(alive, np.maximum(rank[doc[:, 0]], rank[doc[:, 1]]), np.iinfo(np.int64).max)
    n_base = int((key == -1).sum())
    if n_base == 0:
        raise DataError(f"{db.path}: its train sources hold no chunk")
    ordered = np.sort(key)
    reachable = int((key < np.iinfo(np.int64).max).sum())
    out = []
    for multiple in sorted(set(multiples)):
        if multiple < 1:
            raise DataError(f"database multiples must be >= 1 (1 = the training chunks alone), got {multiple}")
        target = int(round(multiple * n_base))
        if target >= reachable:
            continue
        cut = int(ordered[target - 1]) + 1  # documents with rank < cut
        chunk_mask = key < cut
        document_mask = rank < cut
        out.append({"multiple": multiple, "chunk_mask": chunk_mask, "document_mask": document_mask,
                    "chunks": int(chunk_mask.sum()), "documents": int(document_mask.sum())})
    return out


def write_subset(db: ChunkDatabase, chunk_mask: np.ndarray, document_mask: np.ndarray, out: str | Path,
                 index_kind: str = "auto", note: dict[str, Any] | None = None,
                 recall_queries: int = 500) -> ChunkDatabase:
    """Write the chunks of ``chunk_mask`` (and the documents of ``document_mask``) as a database at ``out``.

    Rows keep their order; continuations and document ids are renumbered (a continuation left out
    becomes -1); embeddings are copied, the index is built afresh. Rewrites ``out`` if it exists.
    """
    out = Path(out)
    rows = np.flatnonzero(chunk_mask)
    if len(rows) == 0:
        raise DataError("write_subset: the subset holds no chunk")
    position = np.full(len(db), -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    kept_docs = np.flatnonzero(document_mask)
    doc_id = np.full(len(db.documents), -1, dtype=np.int64)
    doc_id[kept_docs] = np.arange(len(kept_docs))
    old_next = np.asarray(db.next[rows])
    arrays = {
        "tokens": np.asarray(db.tokens[rows]),
        "next": np.where(old_next >= 0, position[np.maximum(old_next, 0)], -1),
        "doc": doc_id[np.asarray(db.doc[rows])],
        "alive": np.asarray(db.alive[rows]),
        "embeddings": np.ascontiguousarray(db.embeddings[rows], dtype=np.float32),
    }
    if (arrays["doc"] < 0).any():
        raise DataError("write_subset: a kept chunk touches a document that is not kept")
    if out.exists():
        remove_database_folder(out)
    out.mkdir(parents=True)
    mark_scratch_database(out, "bench/retro_db_size.py")
    files = {name: f"{name}.g0.npy" for name in ARRAYS} | {"index": "index.g0.faiss"}
    for name, array in arrays.items():
        np.save(out / files[name], array)
    index, spec = build_index(arrays["embeddings"], np.arange(len(rows), dtype=np.int64), index_kind)
    save_index(index, out / files["index"])
    shutil.copyfile(db.path / "tokenizer.json", out / "tokenizer.json")
    documents = []
    for new, old in enumerate(kept_docs):
        first = int(np.searchsorted(arrays["doc"][:, 1], new, side="left"))
        last = int(np.searchsorted(arrays["doc"][:, 0], new, side="right"))
        documents.append({**db.documents[old], "id": new, "first_chunk": first, "n_chunks": max(last - first, 0)})
    sources = {}
    for name, info in db.sources.items():
        first, stop = int(info["first_chunk"]), int(info["first_chunk"]) + int(info["n_chunks"])
        inside = rows[(rows >= first) & (rows < stop)]
        if len(inside):
            sources[name] = {**info, "first_chunk": int(position[inside[0]]), "n_chunks": int(len(inside)),
                             "tokens": int(len(inside)) * db.chunk_len}
    manifest = {key: value for key, value in db.manifest.items() if key not in ("build", "recall")}
    if spec["kind"] != "flat" and recall_queries > 0:  # an exact index needs no measuring
        manifest["recall"] = measure_recall(index, arrays["embeddings"], queries=recall_queries)
    manifest.update(generation=0, n_chunks=int(len(rows)), files=files, index=spec, sources=sources,
                    documents=documents, removed_documents=0,
                    subset_of={"path": str(db.path), "generation": db.generation, **(note or {})})
    atomic_write_json(out / "manifest.json", manifest)
    return ChunkDatabase(out)


# ---- scoring ----------------------------------------------------------------------------------
def dense_per_document(model: torch.nn.Module, heldout: HeldoutRetrieval) -> dict[str, dict[str, np.ndarray]]:
    """A model without retrieval on the held-out windows: per document ids, bytes, summed loss (nats)."""
    out = {}
    with torch.no_grad():
        for domain, windows in heldout.domains.items():
            nll_parts, bytes_parts, doc_parts = [], [], []
            for (inputs, targets, _), docs in zip(windows, heldout.target_documents[domain]):
                logits = model(inputs).logits
                nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
                nll_parts.append(nll.view(targets.shape).numpy())
                bytes_parts.append(heldout.byte_lengths[targets.numpy()])
                doc_parts.append(docs)
            out[domain] = sums_by_document(doc_parts, bytes=bytes_parts, nll=nll_parts)
    return out


def _bpb(nll: np.ndarray, n_bytes: np.ndarray) -> float:
    return float(np.sum(nll) / (math.log(2) * max(float(np.sum(n_bytes)), 1.0)))


def _query_chunks(heldout: HeldoutRetrieval) -> tuple[np.ndarray, np.ndarray]:
    """Every complete held-out chunk (tokens [n, m]) and its embedding [n, dim], as the eval queries them."""
    tokens, vectors = [], []
    for windows in heldout.domains.values():
        for inputs, _, vecs in windows:
            n_complete = vecs.shape[1]
            tokens.append(inputs[:, : n_complete * heldout.m].numpy().reshape(-1, heldout.m))
            vectors.append(vecs.reshape(-1, vecs.shape[-1]))
    return np.concatenate(tokens).astype(np.int64), np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32)


def _time_retrieval(db: ChunkDatabase, vectors: np.ndarray, chunks: np.ndarray, k: int, align: bool) -> tuple[float, float]:
    began = time.perf_counter()
    ids = db.search(vectors, k)
    searched = time.perf_counter()
    db.neighbour_tokens(ids, chunks if align else None)
    return searched - began, time.perf_counter() - searched


def measure_latency(dbs: dict[str, ChunkDatabase], vectors: np.ndarray, chunks: np.ndarray, k: int, align: bool,
                    rounds: int = 5, single_queries: int = 64) -> dict[str, dict[str, float]]:
    """Milliseconds per query chunk (search, fetch, total), batched and one query at a time.

    One warm-up round (loads indexes, pages in memory maps), then ``rounds`` rounds that visit
    every database in turn, so load from other jobs falls on all sizes alike; medians reported.
    """
    samples: dict[str, dict[str, list[float]]] = {name: {key: [] for key in (
        "batched_search", "batched_fetch", "single_search", "single_fetch")} for name in dbs}
    n_single = min(single_queries, len(vectors))
    for round_index in range(rounds + 1):
        for name, db in dbs.items():
            search_s, fetch_s = _time_retrieval(db, vectors, chunks, k, align)
            single = [_time_retrieval(db, vectors[i:i + 1], chunks[i:i + 1], k, align) for i in range(n_single)]
            if round_index == 0:
                continue
            samples[name]["batched_search"].append(1000 * search_s / len(vectors))
            samples[name]["batched_fetch"].append(1000 * fetch_s / len(vectors))
            samples[name]["single_search"].append(1000 * sum(s for s, _ in single) / n_single)
            samples[name]["single_fetch"].append(1000 * sum(f for _, f in single) / n_single)
    out = {}
    for name, series in samples.items():
        med = {key: float(np.median(values)) for key, values in series.items()}
        med["batched_total"] = med["batched_search"] + med["batched_fetch"]
        med["single_total"] = med["single_search"] + med["single_fetch"]
        out[name] = {key: round(value, 4) for key, value in med.items()}
        out[name]["queries_batched"], out[name]["queries_single"], out[name]["rounds"] = len(vectors), n_single, rounds
    return out


def check_same_database(a: ChunkDatabase, b: ChunkDatabase) -> dict[str, bool]:
    """Which arrays (and the document list) of two databases are equal."""
    same = {name: bool(np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))) for name in ARRAYS}
    keys = ("id", "source", "first_chunk", "n_chunks", "alive")
    same["documents"] = [{k: d[k] for k in keys} for d in a.documents] == [{k: d[k] for k in keys} for d in b.documents]
    return same


def _parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def run_curve(run: str | Path, large: str | Path, work: str | Path, multiples: list[float],
              dense: dict[str, str | Path] | None = None, max_tokens: int = 16384, seed: int = 0,
              index_kind: str = "auto", latency_rounds: int = 5, single_queries: int = 64,
              check_direct: str | Path | None = None, include_full: bool = True,
              exact_check: bool = False, recall_queries: int = 500) -> dict[str, Any]:
    """The whole curve as one JSON-ready dict (see the module docstring)."""
    torch.manual_seed(seed)
    model, config, checkpoint = load_model(run)
    data_dir = resolve_data_dir(checkpoint, config["data"]["out_dir"])
    seq_len = int(config["train"]["seq_len"])
    large_db = ChunkDatabase(large)
    k, align = model.retro.n_neighbours, model.retro.align_neighbours
    work = Path(work)
    dbs: dict[str, ChunkDatabase] = {}
    sizes: list[dict[str, Any]] = []
    for subset in nested_subsets(large_db, multiples, seed):
        name = f"{subset['multiple']:g}x"
        note = {"multiple": subset["multiple"], "seed": seed, "index_kind": index_kind}
        dbs[name] = _reusable(work / name, large_db, note, subset["chunks"])
        if dbs[name] is None:
            log(f"writing the {name} database ({subset['chunks']} chunks, {subset['documents']} documents)")
            dbs[name] = write_subset(large_db, subset["chunk_mask"], subset["document_mask"], work / name,
                                     index_kind, note=note, recall_queries=recall_queries)
        sizes.append({"name": name, "multiple": subset["multiple"], "path": str(work / name)})
    if include_full:
        dbs["full"] = large_db
        sizes.append({"name": "full", "multiple": None, "path": str(large_db.path)})
    if not sizes:
        raise DataError(f"no database size to score: every multiple in {multiples} reaches the whole of {large_db.path} "
                        "and --no-full leaves the whole database out")
    n_base = train_chunks(large_db)
    result: dict[str, Any] = {
        "run": str(run), "checkpoint": str(checkpoint), "retro_parameters": _parameters(model),
        "large_database": str(large_db.path), "large_generation": large_db.generation, "data_dir": str(data_dir),
        "seq_len": seq_len, "k": k, "aligned_neighbours": align, "max_tokens_per_domain": max_tokens, "seed": seed,
        "index_kind": index_kind, "train_chunks": n_base, "sizes": [], "dense": {},
        "hardware": hardware(),
    }
    per_doc: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    without: dict[str, float] | None = None
    heldout = None
    for size in sizes:
        db = dbs[size["name"]]
        log(f"scoring with the {size['name']} database ({len(db)} chunks)")
        heldout = HeldoutRetrieval(db, data_dir, seq_len, max_tokens)
        scored = evaluate_retrieval(model, heldout, fractions=(1.0,), buckets=False, seed=seed, per_document=True)
        none = scored["bpb"]["none"]
        if without is None:
            without = none
        elif any(abs(none[d] - without[d]) > 1e-9 for d in none):
            raise DataError(f"bpb without retrieval differs between databases ({none} vs {without}): the held-out "
                            "windows are not the same")
        per_doc[size["name"]] = {d: {key: np.asarray(v) for key, v in sums.items()}
                                 for d, sums in scored["per_document"].items()}
        guard = scored["guard"]["domains"]
        exact = _exact_bpb(model, heldout, seed) if exact_check else None
        size["neighbours_from_other_sources"] = neighbour_source_share(heldout, k)
        size.update(chunks=len(db), documents=len(db.documents), bpb_exact_search=exact,
                    multiple_measured=round(len(db) / n_base, 3),
                    index=db.manifest["index"], recall=db.manifest.get("recall"),
                    bytes_on_disk=sum(os.path.getsize(db.path / f) for f in db.manifest["files"].values()),
                    sources={name: info["n_chunks"] for name, info in db.sources.items()},
                    bpb=scored["bpb"]["db_1"],
                    difference={d: {"bpb": g["difference"], "interval": g["interval"], "unit": g["unit"],
                                    "units": g["units"], "helps": g["retrieval_helps"], "hurts": g["retrieval_hurts"]}
                                for d, g in guard.items()})
        result["sizes"].append(size)
    result["without_retrieval"] = without
    chunks, vectors = _query_chunks(heldout)
    log(f"latency: {len(vectors)} held-out query chunks, {latency_rounds} rounds over {len(dbs)} databases")
    latency = measure_latency(dbs, vectors, chunks, k, align, latency_rounds, single_queries)
    for size in result["sizes"]:
        size["latency_ms_per_chunk"] = latency[size["name"]]
    for label, dense_run in (dense or {}).items():
        log(f"scoring dense model {label} ({dense_run})")
        dense_model, dense_config, dense_ckpt = load_model(dense_run)
        sums = dense_per_document(dense_model, heldout)
        entry: dict[str, Any] = {"run": str(dense_run), "checkpoint": str(dense_ckpt),
                                 "parameters": _parameters(dense_model),
                                 "parameter_ratio": round(_parameters(dense_model) / result["retro_parameters"], 3),
                                 "train": {key: dense_config["train"].get(key) for key in ("steps", "batch_size", "seq_len", "seed")},
                                 "bpb": {}, "interval": {}, "retro_minus_dense": {}}
        for domain, s in sums.items():
            entry["bpb"][domain] = _bpb(s["doc_nll"], s["doc_bytes"])
            interval, unit = bpb_interval(s["doc_nll"], s["doc_bytes"], s["doc_nll"], s["doc_bytes"], seed=seed)
            entry["interval"][domain] = list(interval)
            for size_name, retro in per_doc.items():
                r = retro[domain]
                if not np.array_equal(r["doc_ids"], s["doc_ids"]):
                    raise DataError(f"{domain}: dense and RETRO evaluations scored different documents")
                diff, low, high = paired_difference_interval(s["doc_nll"], r["doc_with"], s["doc_bytes"], seed=seed)
                entry["retro_minus_dense"].setdefault(size_name, {})[domain] = {"bpb": diff, "interval": [low, high]}
            r = next(iter(per_doc.values()))[domain]
            diff, low, high = paired_difference_interval(s["doc_nll"], r["doc_without"], s["doc_bytes"], seed=seed)
            entry["retro_minus_dense"].setdefault("without_retrieval", {})[domain] = {"bpb": diff,
                                                                                      "interval": [low, high]}
        result["dense"][label] = entry
    if check_direct is not None:
        result["check_direct"] = _check_direct(ChunkDatabase(check_direct), dbs, result, model, data_dir, seq_len,
                                               max_tokens, seed)
    return result


def neighbour_source_share(heldout: HeldoutRetrieval, k: int) -> dict[str, float]:
    """Per domain: the share of held-out chunks' top-k neighbours that come from sources other than
    the database's ``train`` sources (what the larger database contributes to what is read)."""
    db = heldout.db
    train_rows = np.zeros(len(db), dtype=bool)
    for info in db.sources.values():
        if info.get("kind") == "train":
            train_rows[int(info["first_chunk"]):int(info["first_chunk"]) + int(info["n_chunks"])] = True
    out = {}
    for domain, windows in heldout.domains.items():
        vectors = np.concatenate([v.reshape(-1, v.shape[-1]) for _, _, v in windows])
        ids = db.search(vectors, k)
        found = ids[ids >= 0]
        out[domain] = round(float((~train_rows[found]).mean()) if len(found) else 0.0, 4)
    return out


def _reusable(path: Path, large: ChunkDatabase, note: dict[str, Any], chunks: int) -> ChunkDatabase | None:
    """A subset written by an earlier run of this bench from the same large database generation, or None."""
    try:
        db = ChunkDatabase(path)
    except DataError:
        return None
    made = db.manifest.get("subset_of", {})
    same = (made.get("path") == str(large.path) and made.get("generation") == large.generation and len(db) == chunks
            and all(made.get(key) == value for key, value in note.items()))
    if same:
        log(f"reusing the subset database {path} ({chunks} chunks)")
    return db if same else None


def _exact_bpb(model: Any, heldout: HeldoutRetrieval, seed: int) -> dict[str, float] | None:
    """bpb with an inverted-file index searching every cell (exact search), or None for exact indexes."""
    spec = heldout.db.manifest["index"]
    if spec["kind"] not in ("ivf", "ivfpq") or "nlist" not in spec:
        return None
    index = heldout.db.index
    index.nprobe = int(spec["nlist"])
    try:
        scored = evaluate_retrieval(model, heldout, fractions=(1.0,), buckets=False, seed=seed)
    finally:
        index.nprobe = int(spec["nprobe"])
    return scored["bpb"]["db_1"]


def _check_direct(direct: ChunkDatabase, dbs: dict[str, ChunkDatabase], result: dict[str, Any], model: Any,
                  data_dir: Path, seq_len: int, max_tokens: int, seed: int) -> dict[str, Any]:
    """The 1x subset against a database built directly from the model's data: same arrays, same bpb."""
    if "1x" not in dbs:
        return {"checked": False, "why": "no 1x size"}
    same = check_same_database(dbs["1x"], direct)
    scored = evaluate_retrieval(model, HeldoutRetrieval(direct, data_dir, seq_len, max_tokens), fractions=(1.0,),
                                buckets=False, seed=seed)
    subset_bpb = next(s for s in result["sizes"] if s["name"] == "1x")["bpb"]
    return {"checked": True, "direct_database": str(direct.path), "same_arrays": same,
            "direct_bpb": scored["bpb"]["db_1"], "subset_bpb": subset_bpb,
            "same_bpb": all(abs(scored["bpb"]["db_1"][d] - subset_bpb[d]) < 1e-9 for d in subset_bpb)}


def hardware() -> dict[str, Any]:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "note": "CPU shared with other jobs: wall times are upper bounds"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- outputs ----------------------------------------------------------------------------------
def _fmt_interval(d: dict[str, Any]) -> str:
    return f"{d['bpb']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]"


def _index_cell(size: dict[str, Any]) -> str:
    kind = size["index"]["kind"]
    if kind == "flat":
        return "flat (exact)"
    recall = size.get("recall") or {}
    nprobe = size["index"].get("nprobe")
    return f"{kind}, nprobe {nprobe}" + (f", recall@10 {recall['recall']:.2f}" if "recall" in recall else "")


def table(result: dict[str, Any]) -> str:
    domains = sorted(result["without_retrieval"])
    lines = ["| database | chunks | " + " | ".join(f"{d} bpb (with − without, 95% paired)" for d in domains)
             + " | neighbours from other sources | search + fetch, ms/chunk batched | ms/query alone | index |",
             "|---|---:|" + "---|" * len(domains) + "---|---:|---:|---|"]
    lines.append("| none (RETRO without retrieval) | 0 | "
                 + " | ".join(f"{result['without_retrieval'][d]:.4f}" for d in domains) + " | | | | |")
    for s in result["sizes"]:
        lat = s["latency_ms_per_chunk"]
        cells = [f"{s['bpb'][d]:.4f} ({_fmt_interval(s['difference'][d])})" for d in domains]
        share = ", ".join(f"{d} {100 * v:.0f}%" for d, v in sorted(s.get("neighbours_from_other_sources", {}).items()))
        lines.append(f"| {s['name']} | {s['chunks']:,} | " + " | ".join(cells) + f" | {share}"
                     + f" | {lat['batched_total']:.3f} | {lat['single_total']:.3f} | {_index_cell(s)} |")
    for label, dense in result["dense"].items():
        cells = [f"{dense['bpb'][d]:.4f} [{dense['interval'][d][0]:.4f}, {dense['interval'][d][1]:.4f}]"
                 for d in domains]
        lines.append(f"| dense {label} ({dense['parameters'] / 1e6:.2f}M params, {dense['parameter_ratio']:.2f}× RETRO) "
                     "| | " + " | ".join(cells) + " | | | | |")
    lines.append("")
    exact = [s for s in result["sizes"] if s.get("bpb_exact_search")]
    for s in exact:
        lines.append(f"{s['name']} with every IVF cell searched (exact neighbours): "
                     + ", ".join(f"{d} {s['bpb_exact_search'][d]:.4f}" for d in domains) + " bpb.")
    if exact:
        lines.append("")
    if result["dense"]:
        lines.append("RETRO with each database minus each dense model, bpb per domain [95% paired interval over "
                     "documents]:")
        lines.append("")
        lines.append("| RETRO database | " + " | ".join(f"{d} − dense {label}" for label in result["dense"]
                                                       for d in domains) + " |")
        lines.append("|---|" + "---|" * (len(domains) * len(result["dense"])))
        for size_name in ["without_retrieval", *[s["name"] for s in result["sizes"]]]:
            cells = [_fmt_interval(dense["retro_minus_dense"][size_name][d]) for dense in result["dense"].values()
                     for d in domains]
            lines.append(f"| {size_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(result["without_retrieval"])
    fig, axes = plt.subplots(1, len(domains) + 1, figsize=(5 * (len(domains) + 1), 4.2))
    chunks = [s["chunks"] for s in result["sizes"]]
    styles = ["--", "-."]
    for ax, domain in zip(axes, domains):
        bpb = [s["bpb"][domain] for s in result["sizes"]]
        low = [s["bpb"][domain] - (s["difference"][domain]["bpb"] - s["difference"][domain]["interval"][0])
               for s in result["sizes"]]
        high = [s["bpb"][domain] + (s["difference"][domain]["interval"][1] - s["difference"][domain]["bpb"])
                for s in result["sizes"]]
        ax.fill_between(chunks, low, high, alpha=0.2, color="C0", label="95% paired interval of the gain")
        ax.plot(chunks, bpb, "o-", color="C0", label="RETRO with retrieval")
        for s, x, y in zip(result["sizes"], chunks, bpb):
            ax.annotate(s["name"], (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.axhline(result["without_retrieval"][domain], color="C0", ls=":", label="RETRO without retrieval")
        for i, (label, dense) in enumerate(result["dense"].items()):
            ax.axhline(dense["bpb"][domain], color=f"C{i + 1}", ls=styles[i % 2],
                       label=f"dense {label} ({dense['parameter_ratio']:.2f}× params)")
        ax.set_xscale("log")
        ax.set_xlabel("database size (chunks of 64 tokens)")
        ax.set_ylabel("held-out bits per byte")
        ax.set_title(f"held-out {domain}")
        ax.legend(fontsize=7)
    ax = axes[-1]
    ax.plot(chunks, [s["latency_ms_per_chunk"]["batched_total"] for s in result["sizes"]], "o-",
            label="batched (eval): search + fetch")
    ax.plot(chunks, [s["latency_ms_per_chunk"]["single_total"] for s in result["sizes"]], "s-",
            label="one query at a time: search + fetch")
    for s, x in zip(result["sizes"], chunks):
        ax.annotate(f"{s['name']}: {s['index']['kind']}", (x, s["latency_ms_per_chunk"]["single_total"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("database size (chunks of 64 tokens)")
    ax.set_ylabel("ms per query chunk (shared CPU: upper bound)")
    ax.set_title("retrieval latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    (out / "table.md").write_text(table(result))
    plot(result, out / "db_size.png")


def _multiples(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"multiples must be >= 1, got {text!r}")
    return values


def _dense(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=RUN, got {text!r}")
    return label, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the trained RETRO run or checkpoint")
    parser.add_argument("--large", required=True, help="the large database (its train sources are the 1x database)")
    parser.add_argument("--work", required=True, help="folder for the subset databases")
    parser.add_argument("--out", required=True, help="folder for results.json, table.md, db_size.png")
    parser.add_argument("--multiples", type=_multiples, default=[1.0, 4.0, 16.0],
                        help="sizes as multiples of the training chunks (default 1,4,16; the full database is added)")
    parser.add_argument("--no-full", action="store_true", help="leave the full large database out")
    parser.add_argument("--dense", type=_dense, action="append", default=[], metavar="LABEL=RUN",
                        help="a dense run scored on the same windows (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens per domain (default 16384)")
    parser.add_argument("--seed", type=int, default=0, help="document order and bootstrap seed (default 0)")
    parser.add_argument("--index", default="auto", help="index kind of the subset databases (default auto)")
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--single-queries", type=int, default=64, help="queries timed one at a time (default 64)")
    parser.add_argument("--exact-check", action="store_true",
                        help="also score inverted-file (IVF) databases with every cell searched (exact neighbours)")
    parser.add_argument("--recall-queries", type=int, default=500,
                        help="sampled chunks for the recall of an approximate subset index (default 500; 0: skip)")
    parser.add_argument("--check-direct", default=None, metavar="DB",
                        help="a database built directly from the model's data: the 1x subset must equal it")
    args = parser.parse_args(argv)
    result = run_curve(args.run, args.large, args.work, args.multiples, dict(args.dense), args.max_tokens, args.seed,
                       args.index, args.latency_rounds, args.single_queries, args.check_direct,
                       include_full=not args.no_full, exact_check=args.exact_check,
                       recall_queries=args.recall_queries)
    result["command"] = " ".join(["python", "bench/retro_db_size.py", *(argv if argv is not None else sys.argv[1:])])
    write_outputs(result, args.out)
    print(table(result))
    if "check_direct" in result:
        print(json.dumps(result["check_direct"], indent=1))
    print(f"written: {Path(args.out) / 'results.json'}, table.md, db_size.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
