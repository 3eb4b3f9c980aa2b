"""Training batches for RETRO: chunk-aligned windows with their precomputed neighbours.

Like :class:`lmforge.data.loader.MixtureLoader`, batch ``i`` is a pure function of
``(seed, i)`` and the loader's whole position is that one integer, so a resumed run reads
exactly the same tokens and neighbours. Windows start at a chunk boundary of the
database (chunk c of a source is its training tokens [c·m, (c+1)·m)), which makes window
chunk u database chunk c+u, whose neighbours were precomputed with the same text — no
retrieval at training time, nothing that depends on a live index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmforge.core.errors import DataError
from lmforge.retrieval.database import ChunkDatabase


class RetroLoader:
    def __init__(self, db: ChunkDatabase, neighbours: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 k: int, weights: dict[str, float] | None = None, rank: int = 0, world_size: int = 1,
                 align: bool = False, exclusion_radius: int = 8):
        m = db.chunk_len
        if seq_len % m:
            raise DataError(f"train.seq_len ({seq_len}) must be a multiple of the database chunk_len ({m})")
        if k > neighbours.shape[1]:
            raise DataError(f"the model reads k={k} neighbours but only {neighbours.shape[1]} were precomputed; "
                            f"rerun `lmforge retrieval neighbours {db.path} -k {k}`")
        self.db, self.neighbours, self.k = db, neighbours, k
        self.align, self.exclusion_radius = align, exclusion_radius
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.n_chunks = seq_len // m
        train = {n: i for n, i in db.sources.items() if i["kind"] == "train"}
        weights = weights if weights is not None else {n: float(i["tokens"]) for n, i in train.items()}
        names = sorted(n for n, w in weights.items() if w > 0 and n in train)
        if not names:
            raise DataError(f"{db.path}: no training source of the database has positive weight ({weights})")
        for n in names:
            if train[n]["n_chunks"] < self.n_chunks + 1:
                raise DataError(f"source {n!r} has {train[n]['n_chunks']} chunks, fewer than a window of "
                                f"{self.n_chunks + 1}")
        self._names, self._train = names, train
        self._source_of = np.full(len(db), -1, dtype=np.int64)  # training source of each chunk row
        for s, info in enumerate(train.values()):
            self._source_of[info["first_chunk"]:info["first_chunk"] + info["n_chunks"]] = s
        total = sum(weights[n] for n in names)
        self._probs = np.array([weights[n] / total for n in names])
        self.batch_index = 0
        self._tokens_drawn = {n: 0 for n in names}

    def domains(self) -> list[str]:
        return list(self._names)

    def weights(self) -> dict[str, float]:
        return {n: float(p) for n, p in zip(self._names, self._probs)}

    def window_starts(self, batch_index: int) -> list[int]:
        """Database chunk id of each of this rank's rows in batch ``batch_index``."""
        rng = np.random.default_rng([self.seed, batch_index])
        rows = self.batch_size * self.world_size
        choices = rng.choice(len(self._names), size=rows, p=self._probs)
        positions = rng.random(rows)
        starts = []
        for row in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size):
            info = self._train[self._names[choices[row]]]
            valid = info["n_chunks"] - self.n_chunks  # chunk c + n_chunks supplies the last target
            starts.append(info["first_chunk"] + int(positions[row] * valid))
        return starts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets) [B, seq_len] and neighbours [B, seq_len / m, k, 2m], all int64."""
        rng = np.random.default_rng([self.seed, self.batch_index])
        choices = rng.choice(len(self._names), size=self.batch_size * self.world_size, p=self._probs)
        for s, count in zip(*np.unique(choices, return_counts=True)):
            self._tokens_drawn[self._names[s]] += int(count) * self.seq_len
        starts = self.window_starts(self.batch_index)
        self.batch_index += 1
        windows = np.stack([np.asarray(self.db.tokens[c:c + self.n_chunks + 1]).reshape(-1)[: self.seq_len + 1]
                            for c in starts]).astype(np.int64)
        ids = np.stack([np.asarray(self.neighbours[c:c + self.n_chunks, : self.k]) for c in starts])
        batch = torch.from_numpy(windows)
        if self.align:
            rows = (np.asarray(starts)[:, None] + np.arange(self.n_chunks)).reshape(-1)
            queries = windows[:, : self.seq_len].reshape(len(starts), self.n_chunks, -1)
            neighbours = torch.from_numpy(self.db.neighbour_tokens(ids, queries, self._usable(rows)))
        else:
            neighbours = torch.from_numpy(self.db.neighbour_tokens(ids))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), neighbours

    def _usable(self, rows: np.ndarray):
        """An aligned window may read the chunks around a neighbour: never those of the query's own
        documents or within ``exclusion_radius`` of it in its source (the precomputation's rule)."""
        docs, source_of = np.asarray(self.db.doc), self._source_of

        def usable(query: np.ndarray, chunk: np.ndarray) -> np.ndarray:
            row = rows[query]
            near = (source_of[chunk] == source_of[row]) & (np.abs(chunk - row) <= self.exclusion_radius)
            shared = (docs[chunk][:, :, None] == docs[row][:, None, :]).any(axis=(1, 2))
            return ~near & ~shared

        return usable

    def epochs_consumed(self) -> dict[str, float]:
        return {n: self._tokens_drawn[n] / max(self._train[n]["tokens"], 1) for n in self._names}

    def state_dict(self) -> dict[str, Any]:
        # The same keys as MixtureLoader's, so the trainer's restore path reads either.
        return {"batch_index": self.batch_index, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "tokens_drawn": dict(self._tokens_drawn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_index = int(state["batch_index"])
        drawn = state.get("tokens_drawn", {})
        self._tokens_drawn = {n: int(drawn.get(n, 0)) for n in self._names}
