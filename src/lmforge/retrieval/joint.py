"""End-to-end retrieval training: a query encoder and a document encoder taught by the language model.

:mod:`lmforge.retrieval.distillation` trains only the query side against the database's
frozen embeddings. Here both sides learn (Atlas' perplexity distillation with the document
encoder trained too, and the index refreshed):

- **encoders.** The document encoder has the same structure as the query encoder
  (:class:`~lmforge.retrieval.query_encoder.QueryEncoder`): for token-table embedders
  (``bag_of_tokens``, ``model``) a learnable weight per token id times the frozen table rows,
  pooled, a learnable dim x dim map and L2 normalisation; for ``minilm`` a learnable map on
  the frozen MiniLM vector. Two separate instances (no shared parameters): a query ("Who was
  born in ...?") and the document that answers it use words differently, and separate
  token weights let each side say which of its words matter. Both start as exact copies of
  the database's frozen embedder, so step 0 retrieves what the frozen index retrieves.
- **one step.** A batch of training queries is encoded (no gradient) and searched in the
  current index for K candidates; the frozen language model's loss on each query's target
  with each candidate alone as its neighbour gives the target ``softmax(-loss / tau_lm)``
  (``scorer``; losses are cached per (query, chunk), as the model does not change); the
  retriever's distribution is ``softmax(q . d_j / tau_q)`` with q from the query encoder and
  d_j from the document encoder applied to the candidates' tokens *now* (both with
  gradient); the loss is KL(target || retriever), minimised by AdamW.
- **index refresh.** The index is stale between refreshes (Atlas' choice): every
  ``refresh_every`` steps every live chunk of the database is re-embedded by the document
  encoder and a new exact (flat inner-product) FAISS index built. Generations are written in
  the run folder (``RUN/index/g{N}/embeddings.npy``); the database itself is never touched
  (its files belong to :mod:`lmforge.retrieval.database`). Each refresh's cost (seconds,
  chunks re-embedded) is logged and kept.
- **random negatives** (``random_negatives``, off by default): the loss sees only the K
  candidates, but the document encoder's token weights and map move *every* chunk's vector;
  R random live chunks per query, taken as irrelevant (target 0, no LM call), hold the
  unseen rest of the database down.
- **resumable.** A checkpoint (``RUN/checkpoints/step_{N}.pt``, written atomically) holds
  both encoders, the optimizer, the batch sampler's RNG, the step, the index generation it
  is at and the LM-loss cache; resuming loads the generation's saved embeddings rather
  than recomputing them, so a killed and resumed run logs the same losses bit for bit.

With ``train_documents=False`` the same trainer trains only the query side against the
frozen document embeddings (no refresh): the query-only baseline of the same recipe.
The scorer is any callable ``(query rows [p], chunk ids [p]) -> losses [p]``, so this
module needs no language model (see :mod:`lmforge.eval.distractor_facts` for the RETRO one).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.core.errors import CheckpointError, ConfigError, DataError
from lmforge.core.io import atomic_write, atomic_write_json, atomic_write_npy
from lmforge.core.run_lock import RunLock
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.distillation import lm_target
from lmforge.retrieval.index import build_index
from lmforge.retrieval.query_encoder import QueryEncoder

PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
CHECKPOINT_FORMAT = "lmforge-joint-retriever-1"
EMBED_BATCH = 4096


@dataclass
class JointConfig:
    steps: int = 300
    lr: float = 0.01
    batch_size: int = 32            # queries per step
    candidates: int = 16            # K: candidates retrieved per query from the current index
    tau_lm: float = 0.1             # temperature of the LM target softmax(-loss / tau_lm)
    tau_q: float = 0.05             # temperature of the retriever softmax(q . d / tau_q)
    refresh_every: int = 50         # steps between index refreshes (document side trained only)
    checkpoint_every: int = 50      # steps between checkpoints (0: only at the end)
    train_documents: bool = True    # False: query-only (documents keep the frozen embeddings)
    random_negatives: int = 0       # random live chunks added to each query's candidates with target 0
    seed: int = 0

    def check(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.candidates < 2 or self.lr <= 0:
            raise ConfigError(f"joint retriever: steps >= 0, batch_size >= 1, candidates >= 2, lr > 0 needed, got {self}")
        if self.tau_lm <= 0 or self.tau_q <= 0:
            raise ConfigError(f"joint retriever: tau_lm and tau_q must be > 0, got {self.tau_lm}, {self.tau_q}")
        if self.random_negatives < 0:
            raise ConfigError(f"joint retriever: random_negatives must be >= 0, got {self.random_negatives}")
        if self.refresh_every < 1 or self.checkpoint_every < 0:
            raise ConfigError(f"joint retriever: refresh_every >= 1 and checkpoint_every >= 0 needed, got "
                              f"{self.refresh_every}, {self.checkpoint_every}")


# ---- document features and the refreshed index ---------------------------------------------------
def document_features(db: ChunkDatabase, encoder: QueryEncoder, ids: np.ndarray) -> torch.Tensor:
    """The document encoder's input for chunk ``ids`` [p]: their tokens, or their frozen vectors."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")  # sorted reads are kinder to memory maps
    if encoder.kind == "token_table":
        out = np.empty((len(ids), db.chunk_len), dtype=np.int64)
        out[order] = db.tokens[ids[order]]
        return torch.from_numpy(out)
    out = np.empty((len(ids), db.embeddings.shape[1]), dtype=np.float32)
    out[order] = db.embeddings[ids[order]]
    return torch.from_numpy(out)


@torch.no_grad()
def embed_documents(db: ChunkDatabase, encoder: QueryEncoder, ids: np.ndarray) -> np.ndarray:
    """float32 [p, dim] document vectors of chunk ``ids`` under ``encoder``."""
    out = np.empty((len(ids), encoder.dim), dtype=np.float32)
    for start in range(0, len(ids), EMBED_BATCH):
        part = ids[start:start + EMBED_BATCH]
        out[start:start + len(part)] = encoder(document_features(db, encoder, part)).numpy()
    return out


class RefreshedIndex:
    """Every live chunk's vector under one document-encoder state, with an exact FAISS index over them."""

    def __init__(self, generation: int, ids: np.ndarray, embeddings: np.ndarray, step: int):
        self.generation, self.step = int(generation), int(step)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.index, _ = build_index(self.embeddings, self.ids, kind="flat")

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Chunk ids [n, k] with the largest inner product with unit ``queries`` [n, dim]."""
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return ids.astype(np.int64)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of chunk ``ids`` (any shape; -1 gives a zero row)."""
        ids = np.asarray(ids, dtype=np.int64)
        row = np.full(int(self.ids.max()) + 2 if len(self.ids) else 1, -1, dtype=np.int64)
        row[self.ids] = np.arange(len(self.ids))
        flat = row[np.where(ids.reshape(-1) >= 0, ids.reshape(-1), len(row) - 1)]
        out = np.where((flat >= 0)[:, None], self.embeddings[np.maximum(flat, 0)], 0.0).astype(np.float32)
        return out.reshape(*ids.shape, -1)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_npy(folder / "ids.npy", self.ids)
        atomic_write_npy(folder / "embeddings.npy", self.embeddings)
        atomic_write_json(folder / "generation.json", {"generation": self.generation, "step": self.step,
                                                       "chunks": int(len(self.ids))})

    @classmethod
    def load(cls, folder: Path) -> "RefreshedIndex":
        try:
            info = json.loads((folder / "generation.json").read_text())
            ids = np.load(folder / "ids.npy")
            embeddings = np.load(folder / "embeddings.npy")
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{folder}: index generation missing or damaged ({exc})") from exc
        return cls(info["generation"], ids, embeddings, info["step"])


def refresh_index(db: ChunkDatabase, encoder: QueryEncoder, generation: int, step: int) -> tuple[RefreshedIndex, dict]:
    """Re-embed every live chunk with ``encoder``; return the new index and its cost."""
    start = time.perf_counter()
    ids = np.flatnonzero(np.asarray(db.alive)).astype(np.int64)
    if len(ids) == 0:
        raise DataError(f"{db.path}: no live chunk to index")
    vectors = embed_documents(db, encoder, ids)
    embedded = time.perf_counter()
    index = RefreshedIndex(generation, ids, vectors, step)
    done = time.perf_counter()
    return index, {"generation": generation, "step": step, "chunks": int(len(ids)),
                   "embed_s": round(embedded - start, 4), "index_s": round(done - embedded, 4),
                   "seconds": round(done - start, 4)}


# ---- a retriever made of a query encoder and an index ------------------------------------------------
class EncoderRetriever:
    """Retrieval with a (trained) query encoder against a (refreshed) index: ``retrieve(chunks, k)``."""

    def __init__(self, db: ChunkDatabase, query_encoder: QueryEncoder, index: RefreshedIndex):
        self.db, self.query_encoder, self.index = db, query_encoder, index

    def query_vectors(self, chunks: np.ndarray) -> np.ndarray:
        needs = self.query_encoder.kind == "frozen_embedding"
        return self.query_encoder.encode(np.asarray(chunks), embedder=self.db.embedder if needs else None)

    def retrieve(self, chunks: np.ndarray, k: int) -> np.ndarray:
        chunks = np.asarray(chunks)
        if len(chunks) == 0:
            return np.zeros((0, k), dtype=np.int64)
        return self.index.search(self.query_vectors(chunks), k)


# ---- the trainer -------------------------------------------------------------------------------------------
class JointRetrieverTrainer:
    """Perplexity distillation of a query and a document encoder with periodic index refresh (module docs).

    ``queries`` [n, m] are the training queries' token chunks; ``scorer(rows, chunk_ids)``
    the frozen LM's losses. Everything is written under ``run_dir``: ``metrics.jsonl`` (one
    record per step and per refresh), ``checkpoints/``, ``index/g{N}/``, and at the end
    ``query_encoder/`` and ``document_encoder/``.
    """

    def __init__(self, db: ChunkDatabase, queries: np.ndarray, scorer: PairScorer, cfg: JointConfig,
                 run_dir: str | Path, progress: Callable[..., None] | None = None, log: Callable[[str], None] | None = None):
        cfg.check()
        self.db, self.cfg, self.scorer = db, cfg, scorer
        self.run_dir = Path(run_dir)
        self.progress, self.log = progress, log or (lambda _msg: None)
        queries = np.asarray(queries, dtype=np.int64)
        if queries.ndim != 2 or queries.shape[1] != db.chunk_len or len(queries) == 0:
            raise DataError(f"joint retriever: queries must be [n >= 1, {db.chunk_len}] token chunks, "
                            f"got {list(queries.shape)}")
        self.queries = queries
        torch.manual_seed(cfg.seed)
        self.query_encoder = QueryEncoder.for_database(db)
        self.document_encoder = QueryEncoder.for_database(db)
        if not cfg.train_documents:
            self.document_encoder.requires_grad_(False)
        self.query_features = self.query_encoder.features(
            queries, embedder=db.embedder if self.query_encoder.kind == "frozen_embedding" else None)
        self.optimizer = torch.optim.AdamW(self._groups(), lr=cfg.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step, self.cache = 0, {}
        self.refreshes: list[dict[str, Any]] = []
        self.index: RefreshedIndex | None = None

    def _groups(self) -> list[dict[str, Any]]:
        # As in distillation.py: the dim x dim map gets lr / sqrt(dim), the token weights lr.
        groups = []
        encoders = [self.query_encoder] + ([self.document_encoder] if self.cfg.train_documents else [])
        for encoder in encoders:
            groups.append({"params": [encoder.linear.weight], "lr": self.cfg.lr / math.sqrt(encoder.dim)})
            if encoder.kind == "token_table":
                groups.append({"params": [encoder.token_weights], "lr": self.cfg.lr})
        return groups

    # ---- files ----
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _generation_dir(self, generation: int) -> Path:
        return self.run_dir / "index" / f"g{generation}"

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- index refresh ----
    def refresh(self) -> dict[str, Any]:
        generation = 0 if self.index is None else self.index.generation + 1
        self.index, cost = refresh_index(self.db, self.document_encoder, generation, self.step)
        self.index.save(self._generation_dir(generation))
        self.refreshes.append(cost)
        self._append_metrics({"kind": "refresh", **cost})
        self.log(f"index refresh g{generation} at step {self.step}: {cost['chunks']} chunks re-embedded in "
                 f"{cost['embed_s']:.2f} s, index built in {cost['index_s']:.2f} s")
        return cost

    # ---- checkpoints ----
    def save_checkpoint(self) -> Path:
        keys = np.array(sorted(self.cache), dtype=np.int64).reshape(-1, 2)
        state = {"format": CHECKPOINT_FORMAT, "config": asdict(self.cfg), "step": self.step,
                 "generation": self.index.generation if self.index is not None else None,
                 "query_encoder": self.query_encoder.state_dict(), "document_encoder": self.document_encoder.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                 "cache_keys": torch.from_numpy(keys),
                 "cache_values": torch.tensor([self.cache[(int(a), int(b))] for a, b in keys], dtype=torch.float64),
                 "refreshes": self.refreshes}
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step_{self.step:07d}.pt"
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        for old in sorted(self.checkpoint_dir.glob("step_*.pt"))[:-1]:
            old.unlink()
        # Index generations older than the checkpoint's are no longer needed to resume.
        for folder in (self.run_dir / "index").glob("g*"):
            if folder.name[1:].isdigit() and self.index is not None and int(folder.name[1:]) < self.index.generation:
                shutil.rmtree(folder, ignore_errors=True)
        return path

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir.glob("step_*.pt")) if self.checkpoint_dir.is_dir() else []
        return found[-1] if found else None

    def load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a damaged file raises pickle/zip errors of several kinds
            raise CheckpointError(f"{path}: unreadable joint-retriever checkpoint ({exc})") from exc
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        if state["config"] != asdict(self.cfg):
            changed = {k: (v, asdict(self.cfg)[k]) for k, v in state["config"].items() if asdict(self.cfg).get(k) != v}
            raise CheckpointError(f"{path}: written with other settings {changed} (checkpoint, now); resume with the "
                                  "same settings or start a new run folder")
        self.query_encoder.load_state_dict(state["query_encoder"])
        self.document_encoder.load_state_dict(state["document_encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        keys, values = state["cache_keys"].numpy(), state["cache_values"].numpy()
        self.cache = {(int(a), int(b)): float(v) for (a, b), v in zip(keys, values)}
        self.refreshes = list(state["refreshes"])
        self.index = RefreshedIndex.load(self._generation_dir(int(state["generation"])))
        # Records the killed run wrote after this checkpoint are dropped: they are redone.
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines() if line.strip()
                    and _record_step(line) <= self.step]
            atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(x + "\n" for x in kept)))

    # ---- training ----
    def lm_losses(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Losses [b, K] for query ``rows`` [b] and candidates ``ids`` [b, K]; NaN for -1; cached."""
        out = np.full(ids.shape, np.nan, dtype=np.float64)
        missing = [(int(r), int(c)) for r, row_ids in zip(rows, ids) for c in row_ids
                   if c >= 0 and (int(r), int(c)) not in self.cache]
        missing = sorted(set(missing))
        if missing:
            pairs = np.array(missing, dtype=np.int64)
            losses = np.asarray(self.scorer(pairs[:, 0], pairs[:, 1]), dtype=np.float64)
            if losses.shape != (len(pairs),):
                raise DataError(f"joint retriever: the scorer returned {list(losses.shape)} losses for {len(pairs)} pairs")
            self.cache.update({pair: float(v) for pair, v in zip(missing, losses)})
        for i, r in enumerate(rows):
            for j, c in enumerate(ids[i]):
                if c >= 0:
                    out[i, j] = self.cache[(int(r), int(c))]
        return out

    def train_step(self) -> float:
        cfg = self.cfg
        rows = torch.randperm(len(self.queries), generator=self.generator)[:cfg.batch_size].numpy()
        features = self.query_features[torch.from_numpy(rows)]
        with torch.no_grad():
            ids = self.index.search(self.query_encoder(features).numpy(), cfg.candidates)
        losses = self.lm_losses(rows, ids)
        valid = (ids >= 0) & ~np.isnan(losses)
        keep = valid.sum(axis=1) >= 2
        if not keep.any():
            raise DataError("joint retriever: no query of the batch has two scored candidates")
        rows, ids, losses, valid = rows[keep], ids[keep], losses[keep], valid[keep]
        target = lm_target(np.where(valid, losses, np.nan), cfg.tau_lm)
        if cfg.random_negatives:
            # Chunks the index does not return for this query are never seen by the loss, yet the
            # document encoder moves them too; random ones, taken as irrelevant (target 0), hold them down.
            picks = torch.randint(len(self.index.ids), (len(rows), cfg.random_negatives), generator=self.generator)
            extra = self.index.ids[picks.numpy()]
            fresh = ~(extra[:, :, None] == ids[:, None, :]).any(-1)
            ids = np.concatenate([ids, extra], axis=1)
            valid = np.concatenate([valid, fresh], axis=1)
            target = np.concatenate([target, np.zeros(extra.shape, dtype=target.dtype)], axis=1)
        target = torch.from_numpy(target)
        self.query_encoder.train()
        self.document_encoder.train()
        queries = self.query_encoder(self.query_features[torch.from_numpy(rows)])
        if cfg.train_documents:
            flat = np.where(ids >= 0, ids, 0).reshape(-1)
            docs = self.document_encoder(document_features(self.db, self.document_encoder, flat))
            docs = docs.view(*ids.shape, -1)
        else:
            docs = torch.from_numpy(self.index.vectors(ids))
        mask = torch.from_numpy(valid)
        scores = torch.einsum("nd,nkd->nk", queries, docs) / cfg.tau_q
        log_q = F.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - log_q.clamp_min(-1e30)),
                            torch.zeros_like(target))
        loss = terms.sum(dim=-1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.query_encoder.eval()
        self.document_encoder.eval()
        self.step += 1
        return float(loss.item())

    def train(self, resume: str = "auto") -> dict[str, Any]:
        """Run to ``cfg.steps`` (resuming from the newest checkpoint when ``resume`` is auto); one
        writer per ``run_dir`` (a second process is refused, naming the first)."""
        if resume not in ("auto", "never"):
            raise ConfigError(f"resume must be auto or never, got {resume!r}")
        with RunLock(self.run_dir, purpose="lmforge retrieval train-retriever"):
            return self._train_locked(resume)

    def _discard_unfinished_metrics(self) -> None:
        """A run killed before its first checkpoint leaves metrics of steps no checkpoint holds;
        a fresh start drops them, after checking every line is a record this trainer writes."""
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.is_file():
            return
        lines = [x for x in metrics.read_text().splitlines() if x.strip()]
        for i, line in enumerate(lines):
            try:
                ours = json.loads(line).get("kind") in ("train", "refresh")
            except ValueError:
                ours = i == len(lines) - 1  # the last line may be torn by the kill
            except AttributeError:
                ours = False
            if not ours:
                raise CheckpointError(f"{metrics} holds lines this trainer did not write; not replacing it: "
                                      "choose another --out folder")
        metrics.unlink()

    def _train_locked(self, resume: str) -> dict[str, Any]:
        latest = self.latest_checkpoint()
        if latest is not None and resume == "auto":
            self.load_checkpoint(latest)
            self.log(f"resumed from {latest} (step {self.step}, index generation {self.index.generation})")
        else:
            if latest is not None:
                raise CheckpointError(f"{self.run_dir} already holds checkpoints; use --resume auto or another folder")
            if self.index is None:  # (a caller may have refreshed already)
                self._discard_unfinished_metrics()
                self.refresh()
        cfg = self.cfg
        while self.step < cfg.steps:
            loss = self.train_step()
            self._append_metrics({"kind": "train", "step": self.step, "kl": loss, "cached_pairs": len(self.cache),
                                  "generation": self.index.generation})
            if self.progress is not None:
                self.progress(1, kl=f"{loss:.4f}", gen=self.index.generation)
            if cfg.train_documents and self.step % cfg.refresh_every == 0 and self.step < cfg.steps:
                self.refresh()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        if cfg.train_documents and (self.index.step != self.step):
            self.refresh()  # the final index matches the final document encoder
        self.save_checkpoint()
        self.query_encoder.save(self.run_dir / "query_encoder", {"trained_by": "joint retriever", "step": self.step})
        self.document_encoder.save(self.run_dir / "document_encoder",
                                   {"trained_by": "joint retriever", "step": self.step,
                                    "side": "documents" if cfg.train_documents else "frozen copy"})
        return {"steps": self.step, "refreshes": self.refreshes, "final_generation": self.index.generation,
                "cached_pairs": len(self.cache)}

    def retriever(self) -> EncoderRetriever:
        return EncoderRetriever(self.db, self.query_encoder, self.index)


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:
        return 1 << 62  # a torn last line: drop it


def read_losses(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, KL) of every training record in ``run_dir/metrics.jsonl``."""
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["kl"]) for r in records if r.get("kind") == "train"]
