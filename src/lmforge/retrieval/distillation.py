"""Perplexity distillation: train a :class:`QueryEncoder` to rank candidates as the language model does.

As in Atlas (Izacard et al., 2022, "perplexity distillation"): each training query comes
with K candidates and, for each, the language model's loss on the text that follows the
query when that candidate alone is its neighbour. The target distribution over the
candidates is ``softmax(-loss / tau_lm)`` (a candidate that lowers the loss gets more
mass); the retriever's is ``softmax(q . d_j / tau_q)`` with the encoder's query vector q
and the candidates' frozen embeddings d_j. Training minimises KL(target || retriever).

The language model is run once, before training (see
:mod:`lmforge.eval.candidate_scoring`); this module only sees the cached triples
(query features, candidate embeddings, target), so a few hundred AdamW steps take seconds.

Regularisation is early stopping: the parameters kept are those with the lowest
validation KL seen at the end of any epoch, *including the untrained encoder*, so a
failed training run returns the frozen ranking rather than a worse one. (Weight decay
would do little here: the output is L2-normalised, so shrinking the token weights or the
linear map uniformly does not change it.)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.core.errors import ConfigError, DataError
from lmforge.retrieval.query_encoder import QueryEncoder


@dataclass
class DistillationSet:
    """Cached training material for ``n`` queries with ``K`` candidates each."""

    features: torch.Tensor      # the encoder's input (QueryEncoder.features): ids [n, m] or vectors [n, dim]
    candidates: torch.Tensor    # float32 [n, K, dim]: the candidates' stored embeddings
    valid: torch.Tensor         # bool [n, K]: False for a missing candidate (id -1)
    target: torch.Tensor        # float32 [n, K]: the language model's distribution (0 where not valid)

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def subset(self, rows: np.ndarray) -> "DistillationSet":
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return DistillationSet(self.features[index], self.candidates[index], self.valid[index], self.target[index])


def lm_target(losses: np.ndarray, tau_lm: float) -> np.ndarray:
    """softmax(-loss / tau_lm) over each row of ``losses`` [n, K]; NaN (missing candidate) gets 0."""
    if tau_lm <= 0:
        raise ConfigError(f"tau_lm must be > 0, got {tau_lm}")
    losses = np.asarray(losses, dtype=np.float64)
    logits = np.where(np.isnan(losses), -np.inf, -losses / tau_lm)
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def make_distillation_set(features: torch.Tensor, candidate_vectors: np.ndarray,
                          candidate_ids: np.ndarray, losses: np.ndarray, tau_lm: float) -> DistillationSet:
    """Queries with at least two scored candidates (one gives nothing to rank), as a DistillationSet."""
    valid = (np.asarray(candidate_ids) >= 0) & ~np.isnan(losses)
    keep = np.flatnonzero(valid.sum(axis=1) >= 2)
    if len(keep) == 0:
        raise DataError("perplexity distillation: no query has two or more scored candidates")
    target = lm_target(np.where(valid, losses, np.nan)[keep], tau_lm)
    vectors = torch.as_tensor(candidate_vectors[keep], dtype=torch.float32)
    return DistillationSet(features[torch.as_tensor(keep)], vectors, torch.as_tensor(valid[keep]),
                           torch.as_tensor(target))


def retriever_log_probs(encoder: QueryEncoder, data: DistillationSet, tau_q: float) -> torch.Tensor:
    """log softmax(q . d_j / tau_q) over the valid candidates: [n, K] (-inf where not valid)."""
    queries = encoder(data.features)
    scores = torch.einsum("nd,nkd->nk", queries, data.candidates) / tau_q
    return F.log_softmax(scores.masked_fill(~data.valid, float("-inf")), dim=-1)


def kl_loss(encoder: QueryEncoder, data: DistillationSet, tau_q: float) -> torch.Tensor:
    """Mean over queries of KL(target || retriever)."""
    log_q = retriever_log_probs(encoder, data, tau_q)
    p = data.target
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q.clamp_min(-1e30)), torch.zeros_like(p))
    return terms.sum(dim=-1).mean()


@dataclass
class DistillationConfig:
    steps: int = 300
    lr: float = 0.01
    batch_size: int = 64
    tau_q: float = 0.05
    seed: int = 0

    def check(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.tau_q <= 0:
            raise ConfigError(f"distillation: steps >= 0, batch_size >= 1, lr > 0 and tau_q > 0 needed, got {self}")


def train_query_encoder(encoder: QueryEncoder, train: DistillationSet, val: DistillationSet | None,
                        cfg: DistillationConfig, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Minimise KL(target || retriever) with AdamW; keep the best-validation parameters (in place).

    Returns the history: KL before training, per epoch (train mean over the epoch's
    batches, validation at its end), and the step whose parameters were kept.
    ``progress(steps_done, **fields)`` is called after every step.
    """
    cfg.check()
    if len(train) == 0:
        raise DataError("perplexity distillation: no training queries")
    generator = torch.Generator().manual_seed(cfg.seed)
    # Adam moves every entry by about lr per step, so the dim x dim map (whose entries all add
    # into each output) gets lr / sqrt(dim): a step then changes a query vector about as much
    # as a step on the token weights does, whatever the dimension.
    groups = [{"params": [encoder.linear.weight], "lr": cfg.lr / math.sqrt(encoder.dim)}]
    if encoder.kind == "token_table":
        groups.append({"params": [encoder.token_weights], "lr": cfg.lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    watch = val if val is not None and len(val) else train

    def evaluate(data: DistillationSet) -> float:
        encoder.eval()
        with torch.no_grad():
            return float(kl_loss(encoder, data, cfg.tau_q))

    history: dict[str, Any] = {"train_kl_before": evaluate(train), "val_kl_before": evaluate(watch) if val else None,
                               "epochs": []}
    best = (evaluate(watch), 0, copy.deepcopy(encoder.state_dict()))
    batch = min(cfg.batch_size, len(train))
    steps_per_epoch = math.ceil(len(train) / batch)
    step, epoch = 0, 0
    while step < cfg.steps:
        epoch += 1
        order = torch.randperm(len(train), generator=generator)
        total, count = 0.0, 0
        encoder.train()
        for start in range(0, steps_per_epoch * batch, batch):
            if step >= cfg.steps:
                break
            rows = order[start:start + batch]
            if len(rows) == 0:
                break
            loss = kl_loss(encoder, train.subset(rows.numpy()), cfg.tau_q)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            value = loss.item()
            total, count = total + value * len(rows), count + len(rows)
            if progress is not None:
                progress(1, kl=f"{value:.4f}")
        record = {"epoch": epoch, "step": step, "train_kl": total / max(count, 1)}
        if val is not None and len(val):
            record["val_kl"] = evaluate(val)
        history["epochs"].append(record)
        score = record.get("val_kl", evaluate(train))
        if score < best[0]:
            best = (score, step, copy.deepcopy(encoder.state_dict()))
    encoder.load_state_dict(best[2])
    encoder.eval()
    history.update(best_step=best[1], best_kl=best[0], steps=step, train_kl_after=evaluate(train),
                   val_kl_after=evaluate(val) if val is not None and len(val) else None)
    return history
