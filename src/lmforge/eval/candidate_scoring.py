"""How useful is each retrieved candidate to a RETRO model? Query windows, over-retrieval, LM scoring.

A query is a chunk u whose next chunk u + 1 is known. Its **window** is ``c`` chunks of
preceding context, chunk u and chunk u + 1 ((c + 2) · m tokens, c as many as the model's
``max_seq_len`` allows, up to a cap). K candidates are over-retrieved for chunk u with the
frozen index, and each is scored **alone**: the model reads the window with that one
candidate as chunk u's neighbour (k = 1), and its score is the mean cross-entropy (nats per
token) on the m tokens of chunk u + 1, exactly the tokens whose predictions attend chunk
u's neighbours through chunked cross-attention.

The context chunks get their frozen top-1 neighbour, the same for every candidate of the
query, so the model reads the window as it would in use and differences between
candidates come from the candidate only.

Two kinds of queries:

- **training queries** (:func:`training_query_windows`): training chunks of the database.
  Their candidates obey the training rule of :mod:`lmforge.retrieval.neighbours` (not from
  the query's own documents nor within the exclusion radius in its source stream), and so
  do the segments an aligned neighbour window may read; otherwise chunk u + 1 itself, the
  text to be predicted, would be the best candidate.
- **held-out queries** (:func:`heldout_query_windows`): chunks of the prepared data's
  held-out split, which the database does not hold, searched without exclusions (as
  :class:`lmforge.eval.retrieval_eval.HeldoutRetrieval` does).

:func:`relevance` compares rankings by the LM loss their top-1 candidate gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.shards import ShardSet, load_manifest
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.heldout import heldout_domains
from lmforge.nn.retro import RetroTransformer
from lmforge.retrieval.alignment import window_neighbour_tokens
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.neighbours import excluded_for_training, search_training_neighbours, training_chunk_sources

MAX_CONTEXT_CHUNKS = 3  # more context costs more per forward pass and rarely changes the ranking


@dataclass
class QueryWindows:
    """Query chunks with their context and their next chunk."""

    tokens: np.ndarray            # int64 [n, (c + 2) * m]: c context chunks, chunk u, chunk u + 1
    domains: np.ndarray           # str [n]: the source of each query
    context: int                  # c
    chunk_len: int                # m
    rows: np.ndarray | None = None  # int64 [n, c + 1]: database rows of the context chunks and u (training)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def chunks(self) -> np.ndarray:
        """The context chunks and chunk u: [n, c + 1, m] (the chunks that retrieve)."""
        m, c = self.chunk_len, self.context
        return self.tokens[:, : (c + 1) * m].reshape(len(self), c + 1, m)

    @property
    def query_chunks(self) -> np.ndarray:
        """Chunk u of each query: [n, m]."""
        return self.chunks[:, self.context]

    def subset(self, index: np.ndarray) -> "QueryWindows":
        return QueryWindows(self.tokens[index], self.domains[index], self.context, self.chunk_len,
                            None if self.rows is None else self.rows[index])


def context_chunks(model: RetroTransformer, requested: int | None = None) -> int:
    """Context chunks c for windows of (c + 2) · m tokens: as many as fit, at most ``MAX_CONTEXT_CHUNKS``."""
    m = model.retro.chunk_len
    fit = (model.cfg.max_seq_len + 1) // m - 2  # the model reads (c + 2) · m - 1 input tokens
    if fit < 0:
        raise ConfigError(f"the model's max_seq_len ({model.cfg.max_seq_len}) is shorter than two chunks of {m} "
                          "tokens minus one; it cannot read a chunk and predict the next")
    if requested is None:
        return min(fit, MAX_CONTEXT_CHUNKS)
    if not 0 <= requested <= fit:
        raise ConfigError(f"--context-chunks must be in [0, {fit}] for max_seq_len {model.cfg.max_seq_len}, "
                          f"got {requested}")
    return requested


# ---- query windows ---------------------------------------------------------------------------
def training_query_windows(db: ChunkDatabase, n_queries: int, context: int, seed: int = 0) -> QueryWindows:
    """A seeded random sample of training chunks u with u + 1 and c chunks before u in the same stream."""
    if n_queries < 1:
        raise ConfigError(f"need at least one query, got {n_queries}")
    n_train, source_of = training_chunk_sources(db)
    names = [name for name, info in db.sources.items() if info["kind"] == "train"]
    nxt, alive = np.asarray(db.next[:n_train]), np.asarray(db.alive[:n_train])
    u = np.arange(context, n_train, dtype=np.int64)
    ok = (nxt[u] == u + 1) & (source_of[u - context] == source_of[u])
    for offset in range(-context, 2):
        ok &= alive[np.minimum(u + offset, n_train - 1)]
    eligible = u[ok]
    if len(eligible) == 0:
        raise DataError(f"{db.path}: no training chunk has {context} chunks before it and one after it in its source")
    chosen = np.random.default_rng(seed).choice(eligible, size=min(n_queries, len(eligible)), replace=False)
    rows = chosen[:, None] + np.arange(-context, 2)  # [n, c + 2]
    order = np.argsort(rows.reshape(-1), kind="stable")  # sorted reads are kinder to memory maps
    tokens = np.empty((rows.size, db.chunk_len), dtype=np.int64)
    tokens[order] = db.tokens[rows.reshape(-1)[order]]
    return QueryWindows(tokens.reshape(len(chosen), -1), np.array([names[s] for s in source_of[chosen]]),
                        context, db.chunk_len, rows[:, : context + 1])


def heldout_query_windows(db: ChunkDatabase, data_dir: str | Path, n_queries: int, context: int,
                          seed: int = 0) -> QueryWindows:
    """A seeded random sample of chunk-aligned windows of the held-out split, spread evenly over domains.

    Chunks sit on the same grid as :func:`lmforge.data.loader.heldout_windows` cuts (multiples
    of m from each domain's first held-out token), the grid that ``retrieval eval`` uses.
    """
    data_dir = Path(data_dir)
    data_tok = Tokenizer.load(data_dir / "tokenizer.json")
    if data_tok.sha256 != db.manifest["tokenizer_sha256"]:
        raise DataError(f"{db.path}: built with another tokenizer than {data_dir}'s")
    if n_queries < 1:
        raise ConfigError(f"need at least one held-out query, got {n_queries}")
    manifest = load_manifest(data_dir)
    domains = heldout_domains(data_dir)
    m, span = db.chunk_len, (context + 2) * db.chunk_len
    streams = {d: ShardSet(data_dir, "heldout", d, manifest) for d in domains}
    starts = {d: np.arange(0, len(s) - span + 1, m, dtype=np.int64) for d, s in streams.items()}
    domains = [d for d in domains if len(starts[d])]
    if not domains:
        raise DataError(f"{data_dir}: no held-out domain has {span} tokens (a window of {context + 2} chunks)")
    tokens, names = [], []
    share = [n_queries // len(domains) + (1 if i < n_queries % len(domains) else 0) for i in range(len(domains))]
    for i, (domain, count) in enumerate(zip(domains, share)):
        rng = np.random.default_rng([seed, i])
        chosen = np.sort(rng.choice(starts[domain], size=min(count, len(starts[domain])), replace=False))
        tokens += [streams[domain].get(int(p), span).astype(np.int64) for p in chosen]
        names += [domain] * len(chosen)
    return QueryWindows(np.stack(tokens), np.array(names), context, m)


# ---- over-retrieval ------------------------------------------------------------------------------
@dataclass
class Candidates:
    """K frozen-index candidates of every chunk of each window (context chunks and chunk u)."""

    ids: np.ndarray      # int64 [n, c + 1, K], in frozen order, -1 where fewer exist
    frozen: np.ndarray   # float32 [n, dim]: the frozen embedder's vector of chunk u

    @property
    def query_ids(self) -> np.ndarray:
        """Chunk u's candidates [n, K]."""
        return self.ids[:, -1]

    @property
    def context_ids(self) -> np.ndarray:
        """The frozen top-1 of each context chunk [n, c]."""
        return self.ids[:, :-1, 0]

    def subset(self, index: np.ndarray) -> "Candidates":
        return Candidates(self.ids[index], self.frozen[index])


def training_candidates(db: ChunkDatabase, windows: QueryWindows, k: int, exclusion_radius: int) -> Candidates:
    """Candidates of training windows under the training exclusion rule (own documents, radius)."""
    if windows.rows is None:
        raise DataError("training candidates need training query windows (with database rows)")
    rows = windows.rows.reshape(-1)
    ids = search_training_neighbours(db, rows, k, exclusion_radius)
    query_rows = windows.rows[:, -1]
    order = np.argsort(query_rows, kind="stable")
    frozen = np.empty((len(query_rows), db.embeddings.shape[1]), dtype=np.float32)
    frozen[order] = db.embeddings[query_rows[order]]
    return Candidates(ids.reshape(len(windows), windows.context + 1, k), frozen)


def heldout_candidates(db: ChunkDatabase, windows: QueryWindows, k: int) -> Candidates:
    """Candidates of held-out windows (the database holds no held-out text: no exclusions)."""
    chunks = windows.chunks.reshape(-1, windows.chunk_len)
    vectors = db.embedder.embed(chunks)
    ids = db.search(vectors, k)
    n, c1 = len(windows), windows.context + 1
    return Candidates(ids.reshape(n, c1, k), vectors.reshape(n, c1, -1)[:, -1].astype(np.float32))


def training_exclusion(db: ChunkDatabase, exclusion_radius: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """forbid(query rows, chunk ids) -> bool: the training rule, for the segments of aligned windows."""
    _, source_of = training_chunk_sources(db)
    docs = np.asarray(db.doc)
    return lambda rows, ids: excluded_for_training(docs, source_of, rows, ids, exclusion_radius)


# ---- LM scoring ---------------------------------------------------------------------------------
@torch.no_grad()
def score_candidates(model: RetroTransformer, db: ChunkDatabase, windows: QueryWindows, candidates: Candidates,
                     forbid: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, batch_size: int = 32,
                     progress: Callable[..., None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(losses [n, K] with each candidate alone, NaN for a missing one; loss without retrieval [n]).

    Losses are mean cross-entropy in nats per token over the m tokens of chunk u + 1.
    ``forbid`` (training windows) keeps aligned neighbour windows off the query's own
    documents and exclusion radius. ``progress(n_pairs)`` after each batch.
    """
    m, c = windows.chunk_len, windows.context
    if model.retro.chunk_len != m:
        raise DataError(f"the model's chunk_len {model.retro.chunk_len} differs from the windows' {m}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    inputs_all, targets_all = windows.tokens[:, :-1], windows.tokens[:, 1:]
    span = slice((c + 1) * m - 1, (c + 2) * m - 1)  # targets that are the tokens of chunk u + 1
    query_ids = candidates.query_ids
    losses = np.full(query_ids.shape, np.nan, dtype=np.float64)

    def span_loss(logits: torch.Tensor, rows: np.ndarray) -> np.ndarray:
        targets = torch.from_numpy(targets_all[rows][:, span]).to(device)
        nll = F.cross_entropy(logits[:, span].float().flatten(0, 1), targets.flatten(), reduction="none")
        return nll.view(len(rows), m).mean(dim=1).double().cpu().numpy()

    pairs = np.argwhere(query_ids >= 0)  # (query, candidate), query-major
    for start in range(0, len(pairs), batch_size):
        pair = pairs[start:start + batch_size]
        q = pair[:, 0]
        ids = np.concatenate([candidates.context_ids[q], query_ids[q, pair[:, 1]][:, None]], axis=1)[:, :, None]
        inputs = inputs_all[q]
        usable = None
        if forbid is not None and windows.rows is not None:
            chunk_rows = windows.rows[q].reshape(-1)  # the window chunk behind each flattened query

            def usable(query: np.ndarray, chunk: np.ndarray, _rows: np.ndarray = chunk_rows) -> np.ndarray:
                return ~forbid(_rows[query], chunk)
        neighbours = window_neighbour_tokens(db, inputs, ids, model.retro.align_neighbours, usable)
        logits = model(torch.from_numpy(inputs).to(device), neighbours=torch.from_numpy(neighbours).to(device)).logits
        losses[q, pair[:, 1]] = span_loss(logits, q)
        if progress is not None:
            progress(len(pair))
    no_retrieval = np.zeros(len(windows), dtype=np.float64)
    for start in range(0, len(windows), batch_size):
        q = np.arange(start, min(start + batch_size, len(windows)))
        no_retrieval[q] = span_loss(model(torch.from_numpy(inputs_all[q]).to(device)).logits, q)
    model.train(was_training)
    return losses, no_retrieval


# ---- comparing rankings ----------------------------------------------------------------------------
def relevance(losses: np.ndarray, choices: dict[str, np.ndarray], no_retrieval: np.ndarray,
              domains: np.ndarray | None = None) -> dict[str, Any]:
    """LM loss given each ranking's top-1 candidate, and its recall@1 of the LM-best candidate.

    ``choices[name]`` [n] is the candidate index (into the K columns of ``losses``) that
    ranking puts first. A choice counts as a hit when its loss equals the best one (so
    duplicate candidates are not held against a ranking). Queries without any scored
    candidate are left out. References: ``oracle_loss`` (always the LM-best candidate),
    ``mean_candidate_loss`` (a random candidate), ``no_retrieval_loss`` (the decoder alone).
    Per domain too, when ``domains`` [n] is given.
    """
    scored = ~np.isnan(losses).all(axis=1)

    def summary(rows: np.ndarray) -> dict[str, Any]:
        sub = losses[rows]
        best = np.nanmin(sub, axis=1)
        out: dict[str, Any] = {"queries": int(len(sub))}
        for name, choice in choices.items():
            top1 = sub[np.arange(len(sub)), choice[rows]]
            out[name] = {"top1_loss": float(np.mean(top1)), "recall_at_1": float(np.mean(top1 <= best + 1e-6))}
        out.update(oracle_loss=float(best.mean()), mean_candidate_loss=float(np.nanmean(sub, axis=1).mean()),
                   no_retrieval_loss=float(np.mean(no_retrieval[rows])))
        return out

    rows = np.flatnonzero(scored)
    if len(rows) == 0:
        raise DataError("relevance: no query has a scored candidate")
    result = summary(rows)
    if domains is not None:
        result["domains"] = {d: summary(rows[domains[rows] == d]) for d in sorted(set(domains[rows].tolist()))}
    return result
