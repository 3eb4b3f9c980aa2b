"""Held-out bits-per-byte of a RETRO model with and without retrieval.

Three views, all on the same held-out windows (``heldout_eval_windows``, chunk-aligned because
``seq_len`` is a multiple of ``chunk_len``):

- **with vs without retrieval**: the same model, neighbours from the database or none;
- **growing database**: neighbours only from a fixed random fraction of the database's
  documents (10%, 30%, 100% by default) — more data to retrieve from should help;
- **paired guard**: per held-out document, the loss with and without retrieval; the paired
  bootstrap interval of the bpb difference says plainly when retrieval makes a domain worse
  beyond the noise (:mod:`lmforge.eval.retrieval_guard`, ``result["guard"]``);
- **overlap buckets**: each evaluated chunk C_u (u >= 1) is read with the neighbours of
  C_{u-1}; its overlap is the longest run of tokens it shares with any of those
  neighbours (chunk + continuation), as a fraction of chunk_len. Bits-per-byte per bucket
  shows how much of the gain is copying versus generalising (RETRO paper, §4).
- **chunk overlap with the database** (``result["chunk_overlap"]``, the RETRO paper's leakage
  analysis, §2.6 and its figure of bpb against chunk overlap): each evaluated chunk C_u (u >= 1)
  is itself a query for its ``OVERLAP_NEIGHBOURS`` = 10 nearest database chunks (same embedder
  and index, each read with its continuation, 2·chunk_len tokens); r(C_u) = the longest run of
  consecutive tokens C_u shares with any of them, over chunk_len. It measures how much of the
  chunk the database repeats, whether or not the model got to read it (the model reads the
  neighbours of C_{u-1}). bpb with and without retrieval per bucket of r, and over the chunks
  with r <= alpha (the paper's cumulative filter).

With a trained query encoder (``--query-encoder``, see
:mod:`lmforge.retrieval.query_encoder`), each chunk's neighbours are the encoder's top k of
the frozen index's top ``--candidates``; without it nothing changes.

Held-out documents are not in the database (the database is built from the training
split), so no neighbour is the evaluated text itself.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.core.errors import CheckpointError, ConfigError, DataError
from lmforge.core.io import atomic_write_json
from lmforge.core.run_marker import resolve_data_dir
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.shards import ShardSet
from lmforge.eval.heldout import eval_windows, heldout_domains, heldout_eval_windows
from lmforge.eval.retrieval_guard import retrieval_guard
from lmforge.nn.loading import load_model
from lmforge.nn.retro import RetroTransformer
from lmforge.retrieval.alignment import window_neighbour_tokens
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.query_encoder import QueryEncoder, load_query_encoder, rerank

BUCKETS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.01)
OVERLAP_NEIGHBOURS = 10  # database chunks searched per evaluated chunk for its overlap r(C) (RETRO §2.6)


def longest_common_run(chunks: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Longest run of consecutive tokens shared by chunks [P, m] and neighbours [P, r] -> int [P]."""
    equal = chunks[:, :, None] == neighbours[:, None, :]
    run = np.zeros((chunks.shape[0], neighbours.shape[1]), dtype=np.int64)
    best = np.zeros(chunks.shape[0], dtype=np.int64)
    for i in range(chunks.shape[1]):
        shifted = np.zeros_like(run)
        shifted[:, 1:] = run[:, :-1]
        run = (shifted + 1) * equal[:, i, :]
        best = np.maximum(best, run.max(axis=1))
    return best


def _bucket_names() -> list[str]:
    return [f"{lo:.3g}-{min(hi, 1):.3g}" for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:])]


class HeldoutRetrieval:
    """Held-out windows of every domain with their chunk embeddings computed once."""

    def __init__(self, db: ChunkDatabase, data_dir: Path, seq_len: int, max_tokens: int, batch_size: int = 8,
                 only_domains: list[str] | None = None):
        """``only_domains``: evaluate these held-out domains only (default: all of them)."""
        m = db.chunk_len
        if seq_len % m:
            raise DataError(f"seq_len ({seq_len}) must be a multiple of the database chunk_len ({m})")
        data_tok = Tokenizer.load(Path(data_dir) / "tokenizer.json")
        if data_tok.sha256 != db.manifest["tokenizer_sha256"]:
            raise DataError(f"{db.path}: built with another tokenizer than {data_dir}'s")
        self.db, self.m = db, m
        self.byte_lengths = data_tok.token_byte_lengths()
        self.domains: dict[str, list[tuple[torch.Tensor, torch.Tensor, np.ndarray]]] = {}
        # the held-out document of every target token [b, n] per batch, for the paired guard
        self.target_documents: dict[str, list[np.ndarray]] = {}
        available = heldout_domains(Path(data_dir))
        missing = sorted(set(only_domains or []) - set(available))
        if missing:
            raise DataError(f"{data_dir}: no held-out domain {missing[0]!r} (domains: {', '.join(available)})")
        for domain in [d for d in available if only_domains is None or d in only_domains]:
            windows, documents = [], []
            stream = ShardSet(Path(data_dir), "heldout", domain)
            # heldout_eval_windows yields these windows in this order (full ones batched, a partial one alone)
            starts = [start for start, _ in eval_windows(len(stream), seq_len, max_tokens)]
            done = 0
            # the windows the plain held-out evaluation scores, so bpb and bpb_retrieval compare like for like
            for inputs, targets in heldout_eval_windows(Path(data_dir), domain, seq_len, max_tokens, batch_size):
                n_complete = inputs.shape[1] // m
                chunks = inputs[:, : n_complete * m].numpy().reshape(-1, m)
                vectors = db.embedder.embed(chunks) if len(chunks) else np.zeros((0, db.embedder.dim), np.float32)
                windows.append((inputs, targets, vectors.reshape(inputs.shape[0], n_complete, db.embedder.dim)))
                first = np.asarray(starts[done:done + inputs.shape[0]], dtype=np.int64)
                done += inputs.shape[0]
                positions = first[:, None] + 1 + np.arange(targets.shape[1])
                documents.append(np.searchsorted(stream.doc_offsets, positions, side="right"))
            self.domains[domain] = windows
            self.target_documents[domain] = documents

    def neighbours(self, vectors: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray:
        b, n_chunks, dim = vectors.shape
        ids = self.db.search(vectors.reshape(-1, dim), k, allowed=allowed) if n_chunks else np.zeros((0, k), np.int64)
        return ids.reshape(b, n_chunks, k)


@torch.no_grad()
def evaluate_retrieval(model: RetroTransformer, heldout: HeldoutRetrieval, k: int | None = None,
                       fractions: tuple[float, ...] = (1.0,), buckets: bool = True, seed: int = 0,
                       query_encoder: QueryEncoder | None = None, candidates: int = 8,
                       per_document: bool = False) -> dict[str, Any]:
    """bpb per domain without retrieval and with retrieval at each database fraction (+ overlap buckets).

    With ``query_encoder``, each chunk's ``candidates`` nearest chunks under the frozen
    index are re-ranked by the encoder and its top k are the neighbours. With ``per_document``,
    ``result["per_document"][domain]`` holds each held-out document's id, bytes and summed loss
    without and with retrieval (largest fraction), to pair evaluations run separately
    (bench/retro_db_size.py pairs one model over several databases and against dense models).
    """
    device = next(model.parameters()).device
    k = k or model.retro.n_neighbours
    m, db = heldout.m, heldout.db
    if query_encoder is not None:
        _check_candidates(candidates, k)
    was_training = model.training
    model.eval()
    conditions: dict[str, np.ndarray | None] = {"none": None}
    for fraction in fractions:
        conditions[f"db_{fraction:g}"] = db.document_mask(fraction, seed) if fraction < 1 else None
    result: dict[str, Any] = {"bpb": {c: {} for c in conditions}, "loss": {c: {} for c in conditions}, "k": k}
    if query_encoder is not None:
        result["reranking"] = {"candidates": candidates, "encoder": query_encoder.kind}
    bucket_stats: dict[str, dict[str, list[float]]] = {c: {b: [0.0, 0.0, 0] for b in _bucket_names()}
                                                       for c in ("none", "retrieval")}
    overlap_stats = _overlap_stats()
    full = f"db_{max(fractions):g}"
    paired: dict[str, dict[str, np.ndarray]] = {}
    for domain, windows in heldout.domains.items():
        sums = {c: [0.0, 0] for c in conditions}
        n_bytes = 0
        per_window: dict[str, list[np.ndarray]] = {"none": [], full: [], "bytes": [], "docs": []}
        for (inputs, targets, vectors), docs in zip(windows, heldout.target_documents[domain]):
            nbytes = heldout.byte_lengths[targets.numpy()]
            n_bytes += int(nbytes.sum())
            per_window["bytes"].append(nbytes)
            per_window["docs"].append(docs)
            for cond, allowed in conditions.items():
                if cond == "none":
                    logits = model(inputs.to(device)).logits
                    ids = None
                else:
                    ids = _neighbour_ids(heldout, inputs.numpy(), vectors, k, allowed, query_encoder, candidates)
                    nb = torch.from_numpy(window_neighbour_tokens(db, inputs.numpy(), ids, model.retro.align_neighbours)).to(device)
                    logits = model(inputs.to(device), neighbours=nb).logits
                nll = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(),
                                      reduction="none").view(targets.shape).cpu().numpy()
                sums[cond][0] += float(nll.sum())
                sums[cond][1] += targets.numel()
                if cond in per_window:
                    per_window[cond].append(nll)
                if buckets and cond in ("none", full):
                    if cond == "none":
                        none_nll = nll
                    else:
                        _bucket(bucket_stats, inputs.numpy(), nb.cpu().numpy(), none_nll, nll, nbytes, m)
                        _chunk_overlap(overlap_stats, db, inputs.numpy(), vectors, none_nll, nll, nbytes, m, allowed)
        for cond, (nll_sum, count) in sums.items():
            result["loss"][cond][domain] = nll_sum / max(count, 1)
            result["bpb"][cond][domain] = nll_sum / (math.log(2) * max(n_bytes, 1))
        if per_window["bytes"]:
            paired[domain] = _paired_sums(per_window, full)
    result["guard"] = retrieval_guard(paired, seed=seed)
    if per_document:
        result["per_document"] = {domain: {key: sums[key].tolist() for key in ("doc_ids", "doc_bytes", "doc_without",
                                                                                 "doc_with")}
                                  for domain, sums in paired.items()}
    result["guard"]["condition"] = full
    if buckets:
        result["overlap_buckets"] = {
            name: {"tokens": int(bucket_stats["none"][name][2]),
                   "bpb_without": _ratio(bucket_stats["none"][name]), "bpb_with": _ratio(bucket_stats["retrieval"][name])}
            for name in _bucket_names()}
        result["chunk_overlap"] = _overlap_result(overlap_stats)
    model.train(was_training)
    return result


def sums_by_document(docs: list[np.ndarray], **values: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-token ``values`` (lists of arrays shaped like ``docs``, the held-out document id of each
    target token) summed per document: ``doc_ids`` (sorted) and ``doc_NAME`` for each value."""
    ids, inverse = np.unique(np.concatenate([d.ravel() for d in docs]), return_inverse=True)
    out = {f"doc_{key}": np.bincount(inverse, weights=np.concatenate([a.ravel() for a in parts]), minlength=len(ids))
           for key, parts in values.items()}
    out["doc_ids"] = ids
    return out


def _paired_sums(per_window: dict[str, list[np.ndarray]], full: str) -> dict[str, np.ndarray]:
    """Summed loss without / with retrieval and bytes, per held-out document and per window."""
    conditions = {"without": per_window["none"], "with": per_window[full], "bytes": per_window["bytes"]}
    out = sums_by_document(per_window["docs"], **conditions)
    out.update({f"window_{key}": np.concatenate([a.reshape(a.shape[0], -1).sum(1) for a in parts])
                for key, parts in conditions.items()})
    return out


def _check_candidates(candidates: int, k: int) -> None:
    if candidates < k:
        raise ConfigError(f"--candidates ({candidates}) must be >= k ({k}): re-ranking keeps k of the candidates")


def _neighbour_ids(heldout: HeldoutRetrieval, inputs: np.ndarray, vectors: np.ndarray, k: int,
                   allowed: np.ndarray | None, query_encoder: QueryEncoder | None, candidates: int) -> np.ndarray:
    """Neighbour ids [b, l, k]: the frozen top k, or the encoder's top k of the frozen top ``candidates``."""
    if query_encoder is None:
        return heldout.neighbours(vectors, k, allowed)
    b, n_chunks, dim = vectors.shape
    over = heldout.neighbours(vectors, candidates, allowed).reshape(-1, candidates)
    chunks = inputs[:, : n_chunks * heldout.m].reshape(-1, heldout.m)
    return rerank(heldout.db, query_encoder, chunks, over, k, vectors.reshape(-1, dim)).reshape(b, n_chunks, k)


def _ratio(stat: list[float]) -> float | None:
    return stat[0] / (math.log(2) * stat[1]) if stat[1] else None


def _bucket(stats: dict, inputs: np.ndarray, neighbours: np.ndarray, nll_none: np.ndarray, nll_with: np.ndarray,
            nbytes: np.ndarray, m: int) -> None:
    """``neighbours`` [b, l, k, 2m]: the tokens the model read for each complete chunk."""
    b, n = inputs.shape
    n_complete = neighbours.shape[1]
    names = _bucket_names()
    for u in range(1, n // m + (1 if n % m else 0)):
        if u - 1 >= n_complete:
            break
        chunk = inputs[:, u * m:(u + 1) * m]
        if chunk.shape[1] < m:
            chunk = np.pad(chunk, ((0, 0), (0, m - chunk.shape[1])), constant_values=-1)
        nb = neighbours[:, u - 1]  # [b, k, 2m]
        runs = np.stack([longest_common_run(chunk, nb[:, j]) for j in range(nb.shape[1])], 1).max(1) / m
        positions = slice(u * m - 1, min(u * m + m - 1, n))  # targets that are tokens of C_u
        for row in range(b):
            which = int(np.searchsorted(BUCKETS, runs[row], side="right") - 1)
            name = names[min(which, len(names) - 1)]
            stats["none"][name][0] += float(nll_none[row, positions].sum())
            stats["retrieval"][name][0] += float(nll_with[row, positions].sum())
            for cond in ("none", "retrieval"):
                stats[cond][name][1] += int(nbytes[row, positions].sum())
            stats["none"][name][2] += len(range(*positions.indices(n)))


def _overlap_stats() -> dict[str, Any]:
    return {"r": [], "without": [], "with": [], "bytes": [], "tokens": []}


def database_overlap(db: ChunkDatabase, chunks: np.ndarray, vectors: np.ndarray, allowed: np.ndarray | None = None,
                     k: int = OVERLAP_NEIGHBOURS) -> np.ndarray:
    """r(C) per chunk [P]: longest token run each chunk [P, m] shares with its k nearest database
    chunks (embeddings ``vectors`` [P, dim] as queries; each neighbour with its continuation), over m."""
    if len(chunks) == 0:
        return np.zeros(0)
    neighbours = db.neighbour_tokens(db.search(vectors, k, allowed=allowed))  # [P, k, 2m]
    runs = np.stack([longest_common_run(chunks, neighbours[:, j]) for j in range(neighbours.shape[1])], 1)
    return runs.max(1) / chunks.shape[1]


def _chunk_overlap(stats: dict[str, Any], db: ChunkDatabase, inputs: np.ndarray, vectors: np.ndarray,
                   nll_none: np.ndarray, nll_with: np.ndarray, nbytes: np.ndarray, m: int,
                   allowed: np.ndarray | None) -> None:
    """Per evaluated complete chunk C_u (u >= 1): r(C_u), and its summed loss without / with retrieval and bytes."""
    b, n_complete = vectors.shape[:2]
    if n_complete < 2:
        return
    chunks = inputs[:, m:n_complete * m].reshape(b, n_complete - 1, m).reshape(-1, m).astype(np.int64)
    r = database_overlap(db, chunks, vectors[:, 1:].reshape(-1, vectors.shape[-1]), allowed)
    # the targets that are C_u's tokens: positions u*m - 1 .. u*m + m - 2

    def cut(a: np.ndarray) -> np.ndarray:
        return a[:, m - 1:n_complete * m - 1].reshape(b, n_complete - 1, m).reshape(-1, m)

    stats["r"].append(r)
    stats["without"].append(cut(nll_none).sum(1))
    stats["with"].append(cut(nll_with).sum(1))
    stats["bytes"].append(cut(nbytes).sum(1))
    stats["tokens"].append(np.full(len(r), m))


def _overlap_result(stats: dict[str, Any]) -> dict[str, Any]:
    """bpb with and without retrieval per bucket of r(C) and over the chunks with r(C) <= alpha."""
    if not stats["r"]:
        return {"chunks": 0}
    r, without, with_, nbytes = (np.concatenate(stats[key]) for key in ("r", "without", "with", "bytes"))
    rng = np.random.default_rng(0)

    def entry(chosen: np.ndarray) -> dict[str, Any]:
        n_bytes = float(nbytes[chosen].sum())
        out = {"chunks": int(chosen.sum()), "bytes": int(n_bytes),
               "bpb_without": float(without[chosen].sum() / (math.log(2) * n_bytes)) if n_bytes else None,
               "bpb_with": float(with_[chosen].sum() / (math.log(2) * n_bytes)) if n_bytes else None}
        if chosen.sum() >= 2:  # 95% bootstrap interval of the gain, chunks resampled with their bytes
            rows = np.flatnonzero(chosen)
            draws = rows[rng.integers(0, len(rows), size=(1000, len(rows)))]
            gains = (without[draws] - with_[draws]).sum(1) / (math.log(2) * nbytes[draws].sum(1))
            out["gain_interval"] = [float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))]
        return out

    names = _bucket_names()
    which = np.clip(np.searchsorted(BUCKETS, r, side="right") - 1, 0, len(names) - 1)
    return {"definition": f"r(C) = longest run of tokens C shares with its {OVERLAP_NEIGHBOURS} nearest database "
                          "chunks (each with its continuation), over chunk_len; C_u for u >= 1 of each window",
            "interval": "95% bootstrap over the bucket's chunks (chunks of one document are not independent: "
                        "a lower bound on the real spread)",
            "neighbours": OVERLAP_NEIGHBOURS, "chunks": int(len(r)),
            "buckets": {name: entry(which == j) for j, name in enumerate(names)},
            "cumulative": {f"<={alpha:g}": entry(r <= alpha + 1e-9) for alpha in (0.125, 0.25, 0.5, 0.75, 1.0)}}


def evaluate_retrieval_for_checkpoint(target: str | Path, db_path: str | Path, *, k: int | None = None,
                                      max_tokens: int = 16384, fractions: tuple[float, ...] = (0.1, 0.3, 1.0),
                                      query_encoder: str | Path | None = None, candidates: int = 8,
                                      out: str | Path | None = None,
                                      domains: list[str] | None = None) -> dict[str, Any]:
    """Score a RETRO run or checkpoint on held-out data with and without retrieval from ``db_path``
    (the held-out ``domains`` only, when given; default all).

    Writes the result to ``out`` (default RUN/eval/retrieval.json; its path is ``result["output"]``)
    and returns it. Arguments are checked before the held-out data is embedded.
    """
    if k is not None and k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ConfigError(f"database fractions must be in (0, 1], got {list(fractions)}")
    if domains is not None and not domains:
        raise ConfigError("domains: name at least one held-out domain (or leave it out for all)")
    model, config, checkpoint = load_model(target)
    if not isinstance(model, RetroTransformer):
        raise CheckpointError(f"{checkpoint}: not a RETRO model (its model config has no retro section)")
    db = ChunkDatabase(db_path)
    if db.chunk_len != model.retro.chunk_len:
        raise DataError(f"{db_path}: chunk_len {db.chunk_len}, the model uses {model.retro.chunk_len}")
    encoder = load_query_encoder(query_encoder, db) if query_encoder else None
    if encoder is not None:
        _check_candidates(candidates, k or model.retro.n_neighbours)
    data_dir = resolve_data_dir(checkpoint, config["data"]["out_dir"])  # relative to where the run trained
    heldout = HeldoutRetrieval(db, data_dir, int(config["train"]["seq_len"]), max_tokens, only_domains=domains)
    result = evaluate_retrieval(model, heldout, k, tuple(fractions), query_encoder=encoder, candidates=candidates)
    output = Path(out) if out else checkpoint.parent.parent / "eval" / "retrieval.json"
    result.update(checkpoint=str(checkpoint), database=str(db.path), generation=db.generation, output=str(output),
                  domains=list(heldout.domains), max_tokens=max_tokens)
    if query_encoder:
        result["reranking"]["path"] = str(query_encoder)
    atomic_write_json(output, result)
    return result
