"""Perplexity distillation of a query encoder for a RETRO run (``lmforge retrieval train-query-encoder``).

Steps (each explained where it lives):

1. sample training queries, over-retrieve K candidates each with the frozen index and
   score every candidate alone with the run's RETRO model
   (:mod:`lmforge.eval.candidate_scoring`);
2. train a :class:`~lmforge.retrieval.query_encoder.QueryEncoder` on 80% of them by
   KL(LM target || retriever), validating on the other 20%
   (:mod:`lmforge.retrieval.distillation`);
3. on held-out queries, compare the frozen ranking with the encoder's re-ranking: LM loss
   given the top-1 candidate and recall@1 of the LM-best candidate, with the oracle and
   no-retrieval losses for reference;
4. write the encoder (``OUT/query_encoder.{safetensors,json}``) and ``OUT/relevance.json``.

The language model runs once per (query, candidate) pair, in batches under ``no_grad``;
everything after that is cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.core.errors import CheckpointError, ConfigError, DataError
from lmforge.core.io import atomic_write_json
from lmforge.core.logging import RateProgress, get_logger
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.candidate_scoring import (QueryWindows, context_chunks, heldout_candidates, heldout_query_windows,
                                            relevance, score_candidates, training_candidates, training_exclusion,
                                            training_query_windows)
from lmforge.core.run_marker import resolve_data_dir
from lmforge.nn.loading import load_model
from lmforge.nn.retro import RetroTransformer
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.distillation import DistillationConfig, make_distillation_set, train_query_encoder
from lmforge.retrieval.query_encoder import (QueryEncoder, candidate_embeddings, candidate_order,
                                              candidate_scores)

log = get_logger(__name__)
VALIDATION_FRACTION = 0.2


@dataclass
class QueryEncoderSettings:
    queries: int = 512              # training queries sampled (80% train, 20% validation)
    candidates: int = 8             # K: candidates over-retrieved per query
    heldout_queries: int = 256      # held-out queries for the relevance comparison
    steps: int = 300                # AdamW steps
    lr: float = 0.01
    batch_size: int = 64            # queries per distillation step
    tau_lm: float = 0.1             # temperature of the LM target softmax(-loss / tau_lm), nats
    tau_q: float = 0.05             # temperature of the retriever softmax(q . d / tau_q)
    context_chunks: int | None = None  # chunks of context before the query chunk; None: as many as fit (<= 3)
    exclusion_radius: int = 8       # training rule of `retrieval neighbours`
    score_batch_size: int = 32      # (query, candidate) pairs per forward pass
    seed: int = 0

    def check(self, model: RetroTransformer) -> None:
        k = model.retro.n_neighbours
        if self.candidates < 2:
            raise ConfigError(f"--candidates must be >= 2 (one candidate leaves nothing to rank), "
                              f"got {self.candidates}")
        if self.candidates < k:
            raise ConfigError(f"--candidates K={self.candidates} is smaller than the model's k={k} neighbours; "
                              "re-ranking keeps k of K candidates, so K must be >= k")
        if self.queries < 5:
            raise ConfigError(f"--queries must be >= 5 (20% are held out for validation), got {self.queries}")
        if self.heldout_queries < 1 or self.steps < 0 or self.exclusion_radius < 0 or self.score_batch_size < 1:
            raise ConfigError("--heldout-queries and --score-batch-size must be >= 1, --steps and "
                              "--exclusion-radius >= 0")
        if self.tau_lm <= 0 or self.tau_q <= 0 or self.lr <= 0:
            raise ConfigError("--tau-lm, --tau-q and --lr must be > 0")


def check_model_and_database(model: torch.nn.Module, db: ChunkDatabase, data_dir: Path, checkpoint: Path) -> None:
    if not isinstance(model, RetroTransformer):
        raise CheckpointError(f"{checkpoint}: not a RETRO model (its model config has no retro section)")
    if db.chunk_len != model.retro.chunk_len:
        raise DataError(f"{db.path}: chunk_len {db.chunk_len}, the model uses {model.retro.chunk_len}")
    tokenizer_file = data_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DataError(f"{data_dir}: the run's prepared data (with tokenizer.json) is not there")
    if Tokenizer.load(tokenizer_file).sha256 != db.manifest["tokenizer_sha256"]:
        raise DataError(f"{db.path}: built with another tokenizer than the run's data ({data_dir})")


def _scored(model: RetroTransformer, db: ChunkDatabase, windows: QueryWindows, candidates, forbid, settings,
            label: str) -> tuple[np.ndarray, np.ndarray]:
    total = int((candidates.query_ids >= 0).sum())
    with RateProgress(f"score {label} candidates", total, unit="pairs") as bar:
        return score_candidates(model, db, windows, candidates, forbid, settings.score_batch_size, bar.advance)


def train_encoder_for_model(model: RetroTransformer, db: ChunkDatabase, data_dir: Path,
                            settings: QueryEncoderSettings) -> tuple[QueryEncoder, dict[str, Any]]:
    """Distil a query encoder from ``model`` and compare rankings on held-out data: (encoder, result)."""
    settings.check(model)
    context = context_chunks(model, settings.context_chunks)
    K = settings.candidates

    # 1. training queries, their candidates and the LM's verdict on each
    windows = training_query_windows(db, settings.queries, context, settings.seed)
    candidates = training_candidates(db, windows, K, settings.exclusion_radius)
    losses, _ = _scored(model, db, windows, candidates, training_exclusion(db, settings.exclusion_radius), settings,
                        "training")

    # 2. distillation on 80%, validation on 20% (the sample is already in random order)
    encoder = QueryEncoder.for_database(db)
    features = encoder.features(windows.query_chunks, candidates.frozen)
    n_val = max(1, int(round(len(windows) * VALIDATION_FRACTION)))
    vectors = candidate_embeddings(db, candidates.query_ids)
    parts = {}
    for name, rows in (("train", np.arange(n_val, len(windows))), ("val", np.arange(n_val))):
        parts[name] = make_distillation_set(features[torch.as_tensor(rows)], vectors[rows],
                                            candidates.query_ids[rows], losses[rows], settings.tau_lm)
    cfg = DistillationConfig(steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size,
                             tau_q=settings.tau_q, seed=settings.seed)
    with RateProgress("distil query encoder", settings.steps, unit="steps") as bar:
        history = train_query_encoder(encoder, parts["train"], parts["val"], cfg, bar.advance)
    history.update(train_queries=len(parts["train"]), val_queries=len(parts["val"]))
    epochs = history["epochs"]
    every = max(1, len(epochs) // 10)  # about ten lines; relevance.json has every epoch
    for record in epochs:
        if record["epoch"] % every == 0 or record is epochs[-1]:
            log.info("distillation epoch %d (step %d): train KL %.4f, validation KL %.4f", record["epoch"],
                     record["step"], record["train_kl"], record.get("val_kl", float("nan")))

    # 3. held-out relevance: frozen ranking vs the encoder's re-ranking
    heldout = heldout_query_windows(db, data_dir, settings.heldout_queries, context, settings.seed + 1)
    held_candidates = heldout_candidates(db, heldout, K)
    held_losses, no_retrieval = _scored(model, db, heldout, held_candidates, None, settings, "held-out")
    queries = encoder.encode(heldout.query_chunks, held_candidates.frozen, db.embedder)
    reranked = candidate_order(candidate_scores(db, queries, held_candidates.query_ids))[:, 0]
    result = relevance(held_losses, {"before": np.zeros(len(heldout), dtype=np.int64), "after": reranked},
                       no_retrieval, heldout.domains)
    result["distillation"] = history
    result["settings"] = {**asdict(settings), "context_chunks": context, "k": model.retro.n_neighbours,
                          "align_neighbours": model.retro.align_neighbours}
    return encoder, result


def train_query_encoder_for_checkpoint(target: str | Path, db_path: str | Path,
                                       settings: QueryEncoderSettings | None = None, *,
                                       out: str | Path | None = None,
                                       device: torch.device | str = "cpu") -> dict[str, Any]:
    """Distil a query encoder from a RETRO run or checkpoint against the database at ``db_path``.

    Writes ``OUT/query_encoder.{safetensors,json}`` and ``OUT/relevance.json`` (default OUT:
    RUN/query_encoder; its path is ``result["encoder"]``) and returns the relevance result.
    """
    settings = settings or QueryEncoderSettings()
    model, config, checkpoint = load_model(target, device)
    db = ChunkDatabase(db_path)
    data_dir = resolve_data_dir(checkpoint, config["data"]["out_dir"])  # relative to where the run trained
    check_model_and_database(model, db, data_dir, checkpoint)
    assert isinstance(model, RetroTransformer)
    encoder, result = train_encoder_for_model(model, db, data_dir, settings)
    output = Path(out) if out else checkpoint.parent.parent / "query_encoder"
    result.update(checkpoint=str(checkpoint), database=str(db.path), generation=db.generation, encoder=str(output))
    encoder.save(output, info={"checkpoint": str(checkpoint), "database": str(db.path),
                               "tokenizer_sha256": db.manifest["tokenizer_sha256"], "settings": result["settings"],
                               "val_kl_before": result["distillation"]["val_kl_before"],
                               "val_kl_after": result["distillation"]["val_kl_after"]})
    atomic_write_json(output / "relevance.json", result)
    return result
