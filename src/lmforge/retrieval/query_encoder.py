"""A trainable query encoder for re-ranking an over-retrieved candidate set.

The frozen index retrieves K candidates per query chunk (K larger than the k neighbours a
RETRO model reads); a :class:`QueryEncoder` then scores each candidate by the inner product
of its own query vector with the candidate's **stored** embedding and keeps the top k
(:func:`rerank`). Only the query side learns: the database's embeddings and its index are
never rewritten, so training or replacing an encoder needs no re-embedding of the database
and no index refresh, and one database serves any number of encoders. (Atlas also freezes
the document encoder for the same reason; what it gives up is a better document side.)

The encoder starts as an exact copy of the database's frozen embedder, so re-ranking with
an untrained encoder returns the frozen ranking:

- **token-table embedders** (``bag_of_tokens``, ``model``: a chunk's vector is the L2-normalised
  sum or mean of rows of a [vocab, dim] table): a learnable weight per token id (1 at
  the start; 0, and kept 0, for the ids the embedder ignores, whose table rows are zero)
  multiplies the frozen table rows before pooling, then a learnable dim x dim linear map
  (identity at the start), then L2 normalisation. Token weights let training say which
  words of a query matter for the language model; the linear map can rotate the query
  towards what the model finds useful in a neighbour.
- **other embedders** (``minilm``): the linear map on the frozen query embedding, then L2
  normalisation (fine-tuning the transformer itself is not worth its cost here).

Saved as ``query_encoder.safetensors`` (the learnable tensors only; the table is rebuilt
from the database's embedder) plus ``query_encoder.json`` naming the embedder spec it was
trained against; loading against a database with another embedder spec is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import CheckpointError, ConfigError, DataError
from lmforge.core.io import atomic_write, atomic_write_json, read_json
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.embedders import Embedder

FORMAT = "lmforge-query-encoder-1"
WEIGHTS_FILE = "query_encoder.safetensors"
SPEC_FILE = "query_encoder.json"
# How each token-table embedder pools its rows (see lmforge.retrieval.embedders).
TABLE_POOLING = {"bag_of_tokens": "sum", "model": "mean"}


class QueryEncoder(nn.Module):
    """Query chunks -> unit vectors in the database's embedding space.

    ``kind`` is ``"token_table"`` (input: token ids [n, m]) or ``"frozen_embedding"`` (input:
    the frozen embedder's vectors [n, dim]); :meth:`features` makes the input from chunks.
    """

    def __init__(self, embedder_spec: dict[str, Any], dim: int, table: np.ndarray | None = None,
                 pooling: str | None = None):
        super().__init__()
        self.embedder_spec = dict(embedder_spec)
        self.dim = int(dim)
        self.kind = "token_table" if table is not None else "frozen_embedding"
        self.pooling = pooling if table is not None else None
        if table is not None:
            if pooling not in ("sum", "mean"):
                raise ConfigError(f"query encoder: pooling must be sum or mean, got {pooling!r}")
            table_tensor = torch.as_tensor(np.asarray(table, dtype=np.float32))
            if table_tensor.ndim != 2 or table_tensor.shape[1] != self.dim:
                raise ConfigError(f"query encoder: table {list(table_tensor.shape)} does not match dim {self.dim}")
            # Ids whose table row is zero (end-of-text, padding) carry no content in the
            # embedder; their weight is held at zero so they never start to.
            mask = (table_tensor != 0).any(dim=1).float()
            self.register_buffer("table", table_tensor, persistent=False)
            self.register_buffer("token_mask", mask, persistent=False)
            self.token_weights = nn.Parameter(mask.clone())
        self.linear = nn.Linear(self.dim, self.dim, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(self.dim))

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def for_embedder(cls, embedder: Embedder, embedder_spec: dict[str, Any] | None = None) -> "QueryEncoder":
        """An encoder that reproduces ``embedder`` exactly (before training)."""
        spec = embedder_spec if embedder_spec is not None else embedder.spec()
        table = getattr(embedder, "table", None)
        if table is not None and embedder.name in TABLE_POOLING:
            return cls(spec, embedder.dim, table, TABLE_POOLING[embedder.name])
        return cls(spec, embedder.dim)

    @classmethod
    def for_database(cls, db: ChunkDatabase) -> "QueryEncoder":
        return cls.for_embedder(db.embedder, db.manifest["embedder"])

    # ---- encoding -----------------------------------------------------------------------------
    def features(self, chunks: np.ndarray, frozen: np.ndarray | None = None,
                 embedder: Embedder | None = None) -> torch.Tensor:
        """The encoder's input for query ``chunks`` [n, m]: the token ids, or (no table) the frozen
        embeddings, taken from ``frozen`` [n, dim] when given, else computed with ``embedder``."""
        if self.kind == "token_table":
            ids = torch.as_tensor(np.asarray(chunks, dtype=np.int64))
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.table.shape[0]):
                raise DataError(f"query encoder: token ids outside [0, {self.table.shape[0]})")
            return ids
        if frozen is None:
            if embedder is None:
                raise ConfigError("query encoder without a token table needs the frozen query embeddings "
                                  "(pass frozen=... or embedder=...)")
            frozen = embedder.embed(np.asarray(chunks))
        return torch.as_tensor(np.asarray(frozen, dtype=np.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Unit query vectors [n, dim] from :meth:`features`' output."""
        if self.kind == "token_table":
            weights = (self.token_weights * self.token_mask)[features]  # [n, m]
            # A weighted sum of table rows per chunk, without materialising [n, m, dim].
            pooled = F.embedding_bag(features, self.table, per_sample_weights=weights, mode="sum")
            if self.pooling == "mean":
                pooled = pooled / features.shape[1]
        else:
            pooled = features
        return F.normalize(self.linear(pooled), dim=-1, eps=1e-12)

    @torch.no_grad()
    def encode(self, chunks: np.ndarray, frozen: np.ndarray | None = None,
               embedder: Embedder | None = None) -> np.ndarray:
        """float32 [n, dim] unit query vectors for token ``chunks`` [n, m] (numpy in, numpy out)."""
        chunks = np.asarray(chunks)
        if len(chunks) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self(self.features(chunks, frozen, embedder)).numpy().astype(np.float32)

    # ---- saving and loading -------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": self.kind, "pooling": self.pooling, "dim": self.dim,
                "embedder": self.embedder_spec}

    def save(self, out: str | Path, info: dict[str, Any] | None = None) -> Path:
        """Write ``out/query_encoder.safetensors`` and ``out/query_encoder.json`` (+ ``info``)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"linear.weight": self.linear.weight.detach().cpu().contiguous()}
        if self.kind == "token_table":
            tensors["token_weights"] = (self.token_weights * self.token_mask).detach().cpu().contiguous()
        atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        atomic_write_json(out / SPEC_FILE, {**self.spec(), **(info or {})})
        return out


def load_query_encoder(path: str | Path, db: ChunkDatabase) -> QueryEncoder:
    """The encoder saved in ``path`` (a folder, or its query_encoder.json), checked against ``db``."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path.parent if path.name == SPEC_FILE else path
    if not (folder / SPEC_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder}: not a query encoder (needs {SPEC_FILE} and {WEIGHTS_FILE}); train one with "
                              "`lmforge retrieval train-query-encoder RUN --db DB`")
    try:
        spec = read_json(folder / SPEC_FILE)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / SPEC_FILE}: unreadable ({exc})") from exc
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"{folder / SPEC_FILE}: format {spec.get('format')!r}, expected {FORMAT!r}")
    if spec.get("embedder") != db.manifest["embedder"]:
        raise DataError(f"{folder}: the query encoder was trained against embedder {spec.get('embedder')}, but "
                        f"{db.path} uses {db.manifest['embedder']}; train an encoder for this database")
    encoder = QueryEncoder.for_database(db)
    if encoder.kind != spec.get("kind") or encoder.dim != spec.get("dim"):
        raise CheckpointError(f"{folder}: a {spec.get('kind')} encoder of dim {spec.get('dim')}, but this database's "
                              f"embedder gives a {encoder.kind} encoder of dim {encoder.dim}")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: unreadable ({exc})") from exc
    expected = {"linear.weight": tuple(encoder.linear.weight.shape)}
    if encoder.kind == "token_table":
        expected["token_weights"] = tuple(encoder.token_weights.shape)
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: tensors {found}, expected {expected}")
    with torch.no_grad():
        encoder.linear.weight.copy_(tensors["linear.weight"])
        if encoder.kind == "token_table":
            encoder.token_weights.copy_(tensors["token_weights"])
    return encoder.eval()


# ---- re-ranking ----------------------------------------------------------------------------
def candidate_embeddings(db: ChunkDatabase, ids: np.ndarray) -> np.ndarray:
    """The stored (frozen) embeddings float32 [..., dim] of chunk ``ids`` [...]; zero rows for id -1."""
    ids = np.asarray(ids, dtype=np.int64)
    flat = ids.reshape(-1)
    out = np.zeros((len(flat), db.embeddings.shape[1]), dtype=np.float32)
    have = np.flatnonzero(flat >= 0)
    if len(have):
        order = have[np.argsort(flat[have], kind="stable")]  # sorted reads are kinder to memory maps
        out[order] = db.embeddings[flat[order]]
    return out.reshape(*ids.shape, -1)


def candidate_scores(db: ChunkDatabase, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Inner products [n, K] of unit ``queries`` [n, dim] with the candidates ``ids`` [n, K]; -inf for -1."""
    scores = np.einsum("nd,nkd->nk", np.asarray(queries, dtype=np.float32), candidate_embeddings(db, ids))
    return np.where(np.asarray(ids) >= 0, scores, -np.inf).astype(np.float32)


SCORE_DECIMALS = 5


def candidate_order(scores: np.ndarray) -> np.ndarray:
    """Candidate indices [n, K], best first, for ``scores`` [n, K] (-inf last).

    Scores are compared rounded to ``SCORE_DECIMALS`` places and ties keep the given order:
    the index and numpy add the same products in different orders, so equal-looking
    candidates (repeated text) differ in the last bit, and an untrained encoder must give
    back the index's order exactly. A trained encoder's preferences are far larger.
    """
    rounded = np.where(np.isfinite(scores), np.round(scores, SCORE_DECIMALS), -np.inf)
    return np.argsort(-rounded, axis=1, kind="stable")


def rerank(db: ChunkDatabase, encoder: QueryEncoder, query_chunks: np.ndarray, ids: np.ndarray, k: int,
           frozen_queries: np.ndarray | None = None) -> np.ndarray:
    """Keep the encoder's top ``k`` of the candidates ``ids`` [n, K] of ``query_chunks`` [n, m] -> [n, k].

    Ties keep the candidates' given (frozen) order, and -1 slots sort last, so an untrained
    encoder returns ``ids[:, :k]``. ``frozen_queries`` [n, dim] (the database embedder's
    vectors of the same chunks) saves re-embedding for an encoder without a token table.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise DataError(f"rerank: candidate ids must be [n, K], got {list(ids.shape)}")
    if not 1 <= k <= ids.shape[1]:
        raise ConfigError(f"rerank: cannot keep k={k} of {ids.shape[1]} candidates (need 1 <= k <= K)")
    if len(ids) != len(query_chunks):
        raise DataError(f"rerank: {len(query_chunks)} query chunks but {len(ids)} candidate rows")
    needs_embedder = encoder.kind == "frozen_embedding" and frozen_queries is None
    queries = encoder.encode(query_chunks, frozen_queries, db.embedder if needs_embedder else None)
    order = candidate_order(candidate_scores(db, queries, ids))[:, :k]
    return np.take_along_axis(ids, order, axis=1)
