"""Training batches from a mixture of sources, and fixed held-out windows for evaluation.

Batch ``i`` is a pure function of ``(seed, i)``: the loader's whole position is one
integer, so resuming from a checkpoint continues the exact same token stream, and each
rank takes its own slice of one global batch so ranks never draw the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lmforge.core.errors import DataError
from lmforge.core.logging import get_logger
from lmforge.data.mixture import EPOCH_WARNING, mixture_probabilities
from lmforge.data.shards import ShardSet, load_manifest

log = get_logger(__name__)


class MixtureLoader:
    """Each row: pick a source by weight, then a random window of ``seq_len + 1`` of its tokens.

    ``weights=None`` samples sources in proportion to their token counts (the natural mix);
    sources given weight 0 or left out of ``weights`` are not sampled. With a
    ``temperature`` T, source i is drawn with probability ∝ weight_i · tokens_i^(1/T)
    (see :mod:`lmforge.data.mixture`); without one the weights are the mix.

    ``unique_tokens``: train on a fixed budget of unique tokens, in epochs (module docstring).
    """

    def __init__(self, data_dir: str | Path, seq_len: int, batch_size: int, seed: int,
                 weights: dict[str, float] | None = None, split: str = "train",
                 rank: int = 0, world_size: int = 1, temperature: float | None = None,
                 unique_tokens: int | None = None):
        if seq_len < 1 or batch_size < 1 or seed < 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader arguments: seq_len={seq_len}, batch_size={batch_size}, "
                             f"seed={seed}, rank={rank}, world_size={world_size}")
        manifest = load_manifest(data_dir)
        sets = {name: ShardSet(data_dir, split, name, manifest) for name in manifest["sources"]}
        if weights is None:
            weights = {name: float(len(s)) for name, s in sets.items()}
        unknown = sorted(set(weights) - set(sets))
        if unknown:
            raise DataError(f"{data_dir}: mixture weights name unknown sources {unknown} "
                            f"(prepared sources: {', '.join(sets)})")
        if any(w < 0 for w in weights.values()):
            raise DataError(f"mixture weights must be >= 0, got {weights}")
        self._names = sorted(name for name, w in weights.items() if w > 0)
        if not self._names:
            raise DataError(f"mixture weights select no source: {weights}")
        for name in self._names:
            if len(sets[name]) < seq_len + 1:
                raise DataError(f"source {name!r} has {len(sets[name])} {split} tokens, fewer than "
                                f"seq_len + 1 = {seq_len + 1}; lower its weight to 0 or add data")
        if temperature is not None:
            probs = mixture_probabilities({n: len(sets[n]) for n in sets}, weights, temperature)
            self._probs = np.array([probs[n] for n in self._names])
        else:
            total = sum(weights[n] for n in self._names)
            self._probs = np.array([weights[n] / total for n in self._names])
        self._sets = {n: sets[n] for n in self._names}
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batch_index = 0
        self._tokens_drawn = {n: 0 for n in self._names}
        self._warned: set[str] = set()
        self.unique_tokens = unique_tokens
        self._epoch_windows: tuple[np.ndarray, np.ndarray] | None = None
        self._permutation: tuple[int, np.ndarray] | None = None
        if unique_tokens is not None:
            self._epoch_windows = self._unique_windows(unique_tokens, split)

    def _unique_windows(self, unique_tokens: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(source index, start token) of every window of the unique-token budget: the first
        ``floor(U·p_i / seq_len)`` non-overlapping windows of source i (its first U·p_i + 1 tokens:
        the last window's final target is one token past its inputs)."""
        if unique_tokens < 1:
            raise DataError(f"data.unique_tokens must be >= 1, got {unique_tokens}")
        sources, starts = [], []
        for index, (name, p) in enumerate(zip(self._names, self._probs)):
            budget = int(unique_tokens * p)
            count = budget // self.seq_len
            available = len(self._sets[name])
            if count < 1:
                raise DataError(f"data.unique_tokens = {unique_tokens}: source {name!r} gets {budget} tokens "
                                f"(probability {p:.3g}), less than one window of seq_len = {self.seq_len}")
            if count * self.seq_len + 1 > available:
                raise DataError(f"data.unique_tokens = {unique_tokens}: source {name!r} would need "
                                f"{count * self.seq_len + 1} {split} tokens but has {available}")
            sources.append(np.full(count, index, dtype=np.int64))
            starts.append(np.arange(count, dtype=np.int64) * self.seq_len)
        return np.concatenate(sources), np.concatenate(starts)

    def pool_tokens(self) -> dict[str, int]:
        """Tokens each sampled source can give: all of its split, or its share of ``unique_tokens``
        (whole windows)."""
        if self._epoch_windows is None:
            return {n: len(self._sets[n]) for n in self._names}
        counts = np.bincount(self._epoch_windows[0], minlength=len(self._names))
        return {n: int(c) * self.seq_len for n, c in zip(self._names, counts)}

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if self._permutation is None or self._permutation[0] != epoch:
            n_windows = len(self._epoch_windows[0])  # type: ignore[index]
            self._permutation = (epoch, np.random.default_rng([self.seed, 1 << 20, epoch]).permutation(n_windows))
        return self._permutation[1]

    def _window_index(self, row: int) -> int:
        """Index (into the budget's windows) that global row ``row`` reads in epoch order."""
        n_windows = len(self._epoch_windows[0])  # type: ignore[index]
        return int(self._epoch_permutation(row // n_windows)[row % n_windows])

    def epoch_rows(self, first_row: int, count: int) -> list[np.ndarray]:
        """Windows of global rows ``first_row`` … ``first_row + count − 1`` in epoch order."""
        assert self._epoch_windows is not None
        sources, starts = self._epoch_windows
        windows = []
        for row in range(first_row, first_row + count):
            k = self._window_index(row)
            windows.append(self._sets[self._names[int(sources[k])]].get(int(starts[k]), self.seq_len + 1))
        return windows

    def domains(self) -> list[str]:
        return list(self._names)

    def source_tokens(self) -> dict[str, int]:
        """Tokens available per sampled source (this split; its unique-token share when restricted)."""
        return self.pool_tokens()

    def weights(self) -> dict[str, float]:
        return {n: float(p) for n, p in zip(self._names, self._probs)}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), LongTensors [batch_size, seq_len]; targets are inputs shifted by one."""
        global_batch = self.batch_size * self.world_size
        if self._epoch_windows is not None:
            first = self.batch_index * global_batch
            windows = self.epoch_rows(first + self.rank * self.batch_size, self.batch_size)
            # Count every rank's rows, as draw_rows does.
            sources = self._epoch_windows[0]
            for row in range(first, first + global_batch):
                self._tokens_drawn[self._names[int(sources[self._window_index(row)])]] += self.seq_len
            self.batch_index += 1
            self._warn_repeats()
            return windows_to_batch(windows)
        rng = np.random.default_rng([self.seed, self.batch_index])
        # Every rank draws the whole global batch (cheap) and keeps its own slice.
        choices, positions = self.draw_rows(rng, global_batch)
        rows = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        windows = [self.window(choices[row], positions[row]) for row in rows]
        self.batch_index += 1
        self._warn_repeats()
        return windows_to_batch(windows)

    def draw_rows(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` rows of a global batch: the source of each (an index into :meth:`domains`) and
        where its window starts (a fraction of the source); counted as drawn."""
        if self._epoch_windows is not None:
            raise DataError("data.unique_tokens (a fixed unique-token budget visited in epochs) cannot be combined "
                            "with replay, which draws random windows")
        choices = rng.choice(len(self._names), size=count, p=self._probs)
        positions = rng.random(count)
        for k, n in zip(*np.unique(choices, return_counts=True)):
            self._tokens_drawn[self._names[k]] += int(n) * self.seq_len
        return choices, positions

    def window(self, source: int, position: float) -> np.ndarray:
        """``seq_len + 1`` tokens of source ``source`` starting at ``position`` (a fraction)."""
        tokens = self._sets[self._names[source]]
        return tokens.get(int(position * (len(tokens) - self.seq_len)), self.seq_len + 1)

    def tokens_drawn(self) -> dict[str, int]:
        """Training tokens drawn so far per source, by all ranks."""
        return dict(self._tokens_drawn)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def epochs_consumed(self) -> dict[str, float]:
        """Tokens drawn so far (by all ranks) over tokens available (the unique-token share when
        restricted), per source."""
        pool = self.pool_tokens()
        return {n: self._tokens_drawn[n] / pool[n] for n in self._names}

    def _warn_repeats(self) -> None:
        for name, epochs in self.epochs_consumed().items():
            if epochs > EPOCH_WARNING and name not in self._warned:
                self._warned.add(name)
                log.warning("source %r has been repeated %.1f times: beyond ~%g epochs extra repeats "
                            "add little; consider more data or a lower weight", name, epochs, EPOCH_WARNING)

    def state_dict(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "tokens_drawn": dict(self._tokens_drawn), "unique_tokens": self.unique_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The stream depends on the global batch only, so a different world size with the
        # same global batch continues it exactly.
        saved = dict(state)
        if "batch_size" in saved:
            saved["global_batch"] = saved.pop("batch_size") * saved.pop("world_size", 1)
        now = {"seed": self.seed, "seq_len": self.seq_len, "global_batch": self.batch_size * self.world_size,
               "unique_tokens": self.unique_tokens}
        for key, value in now.items():
            if key in saved and saved[key] != value:
                log.warning("loader state was saved with %s=%s, now %s: the batch stream will differ "
                            "from the original run", key, saved[key], value)
        self.batch_index = int(state["batch_index"])
        drawn = state.get("tokens_drawn", {})
        self._tokens_drawn = {n: int(drawn.get(n, 0)) for n in self._names}
        self._warned = {n for n, e in self.epochs_consumed().items() if e > EPOCH_WARNING}


def windows_to_batch(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``seq_len + 1`` tokens → (inputs, targets), targets shifted by one."""
    batch = torch.from_numpy(np.stack(windows).astype(np.int64))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def heldout_windows(data_dir: str | Path, source: str, seq_len: int, max_tokens: int | None = None,
                    batch_size: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous windows over the first ``max_tokens`` held-out tokens of ``source``.

    Window k covers tokens [k*seq_len, (k+1)*seq_len + 1), so every token after the first
    is a target exactly once. Full windows come in batches of up to ``batch_size``; the
    final partial window (fewer than seq_len targets) is kept, as a last batch [1, r].
    """
    tokens = ShardSet(data_dir, "heldout", source)
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        return
    data = torch.from_numpy(tokens.get(0, n).astype(np.int64))
    n_full = (n - 1) // seq_len
    for first in range(0, n_full, batch_size):
        rows = range(first, min(first + batch_size, n_full))
        batch = torch.stack([data[k * seq_len:(k + 1) * seq_len + 1] for k in rows])
        yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    start = n_full * seq_len
    if start < n - 1:
        tail = data[start:n]
        yield tail[:-1].unsqueeze(0), tail[1:].unsqueeze(0)
