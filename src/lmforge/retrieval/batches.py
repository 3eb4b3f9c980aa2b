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
from lmforge.retrieval.config import gold_rate_at
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.neighbours import excluded_for_training, training_chunk_sources


class RetroLoader:
    def __init__(self, db: ChunkDatabase, neighbours: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 k: int, weights: dict[str, float] | None = None, rank: int = 0, world_size: int = 1,
                 align: bool = False, exclusion_radius: int = 8, gold_neighbour_rate: float = 0.0,
                 gold_neighbour_steps: int | None = None, gold_neighbour_schedule: str = "constant",
                 document_neighbour_rate: float = 0.0, gold_fact_rate: float = 0.0,
                 fact_chunks: tuple[np.ndarray, np.ndarray] | None = None):
        m = db.chunk_len
        if seq_len % m:
            raise DataError(f"train.seq_len ({seq_len}) must be a multiple of the database chunk_len ({m})")
        if k > neighbours.shape[1]:
            raise DataError(f"the model reads k={k} neighbours but only {neighbours.shape[1]} were precomputed; "
                            f"rerun `lmforge retrieval neighbours {db.path} -k {k}`")
        self.db, self.neighbours, self.k = db, neighbours, k
        self.align, self.exclusion_radius = align, exclusion_radius
        self.gold_neighbour_rate, self.gold_neighbour_steps = gold_neighbour_rate, gold_neighbour_steps
        self.gold_neighbour_schedule = gold_neighbour_schedule
        self.document_neighbour_rate = document_neighbour_rate
        if not 0.0 <= gold_fact_rate <= 1.0:
            raise DataError(f"retrieval.gold_fact_rate must be in [0, 1], got {gold_fact_rate}")
        if gold_fact_rate > 0 and fact_chunks is None:
            raise DataError("retrieval.gold_fact_rate > 0 needs the fact document chunks of the question chunks "
                            "(lmforge.retrieval.fact_pairs)")
        self.gold_fact_rate, self._fact_chunks = gold_fact_rate, fact_chunks
        gold_rate_at(gold_neighbour_rate, gold_neighbour_schedule, 0, gold_neighbour_steps)  # checks the schedule
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
        self._source_of = training_chunk_sources(db)[1]
        self._document_runs = _document_runs(db, self._source_of) if document_neighbour_rate > 0 else None
        total = sum(weights[n] for n in names)
        self._probs = np.array([weights[n] / total for n in names])
        self.batch_index = 0
        self._tokens_drawn = {n: 0 for n in names}

    def source_tokens(self) -> dict[str, int]:
        """Training tokens in the database per sampled source."""
        return {n: int(self._train[n]["tokens"]) for n in self._names}

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
        if self.gold_fact_rate > 0:
            self._insert_fact_neighbours(ids, starts, self.batch_index - 1)
        if self.align:
            rows = (np.asarray(starts)[:, None] + np.arange(self.n_chunks)).reshape(-1)
            queries = windows[:, : self.seq_len].reshape(len(starts), self.n_chunks, -1)
            neighbours = torch.from_numpy(self.db.neighbour_tokens(ids, queries, self._usable(rows)))
        else:
            neighbours = torch.from_numpy(self.db.neighbour_tokens(ids))
        rate = gold_rate_at(self.gold_neighbour_rate, self.gold_neighbour_schedule, self.batch_index - 1,
                            self.gold_neighbour_steps)
        if self.document_neighbour_rate > 0:
            self._insert_document_neighbours(neighbours, starts, self.batch_index - 1)
        if rate > 0:
            self._insert_gold(neighbours, starts, self.batch_index - 1, rate)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), neighbours

    def _insert_gold(self, neighbours: torch.Tensor, starts: list[int], batch_index: int, rate: float) -> None:
        """Put the text itself (chunk u and its continuation u+1) in the last neighbour slot of a
        ``rate`` share of the chunks (the scheduled ``gold_neighbour_rate``), in place.

        Real neighbours of a small, deduplicated corpus rarely repeat the text that follows, so
        a small RETRO model sees too few examples of "the neighbour continues like my text" to
        learn to copy through CCA in a laptop-sized run. A gold neighbour is such an example,
        and the model has to learn to check it: the slot also holds ordinary neighbours. It
        adds no training tokens (the continuation is the window's own next chunk) and is never
        used outside training. Drawn from (seed, batch index), so batches stay reproducible.
        """
        rng = np.random.default_rng([self.seed, batch_index, 7])
        rows = self.batch_size * self.world_size
        pick = rng.random((rows, self.n_chunks)) < rate
        pick = pick[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        for row, u in zip(*np.nonzero(pick)):
            c = starts[row] + int(u)
            neighbours[row, u, -1] = torch.from_numpy(np.asarray(self.db.tokens[c:c + 2]).reshape(-1).astype(np.int64))

    def _insert_fact_neighbours(self, ids: np.ndarray, starts: list[int], batch_index: int) -> None:
        """Put a chunk of the paired fact document in the first neighbour slot of a ``gold_fact_rate``
        share of the question chunks (:mod:`lmforge.retrieval.fact_pairs`), in place, by chunk id.

        A question chunk's own retrieved neighbours hold its answer about a third of the time with a
        lexical retriever, too rarely for a small model to learn that reading a neighbour pays. This
        hands it the document that holds the answer, in another phrasing (never a continuation of the
        question's text), as retrieval would if it were perfect. The chunk is one of the fact
        document's, drawn uniformly; being an ordinary chunk id, it is aligned with its query like
        any neighbour. The first slot, so that gold and own-document neighbours (the last slot) do
        not overwrite it when k > 1. A chunk the neighbour rule excludes for the query (one holding
        text of the query's own documents, or within the exclusion radius) is never put there: the
        retrieved neighbour stays. Drawn from (seed, batch index), so batches stay reproducible.
        """
        assert self._fact_chunks is not None
        first, count = self._fact_chunks
        rng = np.random.default_rng([self.seed, batch_index, 13])
        rows = self.batch_size * self.world_size
        pick = rng.random((rows, self.n_chunks)) < self.gold_fact_rate
        draws = rng.random((rows, self.n_chunks))
        lo = self.rank * self.batch_size
        docs = np.asarray(self.db.doc)
        for row, u in zip(*np.nonzero(pick[lo:lo + self.batch_size])):
            c = starts[row] + int(u)
            if count[c] == 0:
                continue  # not a question chunk
            j = int(first[c]) + int(draws[lo + row, u] * count[c])
            if excluded_for_training(docs, self._source_of, c, j, self.exclusion_radius):
                continue
            ids[row, u, 0] = j

    def _insert_document_neighbours(self, neighbours: torch.Tensor, starts: list[int], batch_index: int) -> None:
        """Put another chunk of the query's own document (and its continuation) in the last neighbour
        slot of a ``document_neighbour_rate`` share of the chunks, in place.

        The chunk is drawn from the same document but more than the exclusion radius away, so it is
        never the text to predict nor inside the window: it shares the document's names, identifiers
        and subject, not its next tokens. What it teaches is reading (a name in a neighbour makes that
        name likelier) rather than copying a continuation. Documents too short to have such a chunk
        keep their retrieved neighbour. Drawn from (seed, batch index), so batches stay reproducible.
        """
        assert self._document_runs is not None
        run_start, run_end = self._document_runs
        r = self.exclusion_radius
        rng = np.random.default_rng([self.seed, batch_index, 11])
        rows = self.batch_size * self.world_size
        pick = rng.random((rows, self.n_chunks)) < self.document_neighbour_rate
        draws = rng.random((rows, self.n_chunks))
        lo = self.rank * self.batch_size
        for row, u in zip(*np.nonzero(pick[lo:lo + self.batch_size])):
            c = starts[row] + int(u)
            first, last = int(run_start[c]), int(run_end[c])  # the document's chunks: [first, last)
            before, after = max(0, c - r - first), max(0, last - (c + r + 1) - 1)  # keep j + 1 in the document
            if before + after == 0:
                continue
            j = int(draws[lo + row, u] * (before + after))
            j = first + j if j < before else c + r + 1 + (j - before)
            neighbours[row, u, -1] = torch.from_numpy(np.asarray(self.db.tokens[j:j + 2]).reshape(-1).astype(np.int64))

    def _usable(self, rows: np.ndarray):
        """An aligned window may read the chunks around a neighbour, but never those that the
        neighbour precomputation excludes for the query (its own documents, its exclusion radius)."""
        docs = np.asarray(self.db.doc)

        def usable(query: np.ndarray, chunk: np.ndarray) -> np.ndarray:
            return ~excluded_for_training(docs, self._source_of, rows[query], chunk, self.exclusion_radius)

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


def _document_runs(db: ChunkDatabase, source_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every training chunk, the [first, last) rows of the run of training chunks whose last
    token lies in the same document (and source) as its own."""
    docs = np.asarray(db.doc[: len(source_of), 1])
    change = np.ones(len(docs), dtype=bool)
    change[1:] = (docs[1:] != docs[:-1]) | (source_of[1:] != source_of[:-1])
    firsts = np.flatnonzero(change)
    run = np.cumsum(change) - 1
    ends = np.append(firsts[1:], len(docs))
    return firsts[run], ends[run]
