"""Replay: a continued run's batches mix its new data with a fixed share of the old.

    replay: {share: 0.05}                      # 5% of rows from the parent's data (init.path)
    replay: {share: 0.25, data_dir: data/old, sources: {literature: 1}}

Continued pretraining forgets less when a few percent of the old distribution is mixed back in
(Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train Large Language
Models": 5% replay for a weak shift, more for a strong one). The share is held exactly rather
than sampled: of the first ``n`` global rows, ``floor(share * n)`` come from the replay data (a
quota per batch, the rows placed at random), so the tokens drawn per source match the requested
shares to within one row at every step. Which replay source each row comes from is sampled as in
:class:`~lmforge.data.loader.MixtureLoader`, by ``sources`` weights or by token counts.

Replay sources are named ``replay/<source>`` in logs and metrics, so a source that is both new
and old data keeps two counts. Every batch is still a pure function of ``(seed, batch index)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.core.config import Config
from lmforge.data.loader import MixtureLoader, windows_to_batch

PREFIX = "replay/"


@dataclass
class ReplayConfig(Config):
    share: float = 0.05                       # fraction of training rows drawn from the replay data
    data_dir: str | None = None               # prepared data of the old domains; None: the parent's (init.path)
    sources: dict[str, float] | None = None   # replay sources and weights; None: all, by token count

    def __post_init__(self) -> None:
        if not 0.0 <= self.share < 1.0:
            raise ValueError(f"share must be in [0, 1), got {self.share}")
        if self.sources is not None and (not self.sources or any(w < 0 for w in self.sources.values())):
            raise ValueError(f"sources: weights must be >= 0 and at least one source named, got {self.sources}")


def replay_rows(share: float, global_rows: int, batch_index: int) -> int:
    """Rows of global batch ``batch_index`` drawn from the replay data: the quota that keeps the
    replayed rows of the first ``b`` batches at ``floor(share * b * global_rows)``."""
    def upto(batches: int) -> int:
        # round() first: share * rows in binary floating point may land just under an integer
        return math.floor(round(share * global_rows * batches, 9))
    return upto(batch_index + 1) - upto(batch_index)


class ReplayLoader:
    """New data (``main``) and replay data (``replay``) in one stream with an exact replay share."""

    def __init__(self, main: MixtureLoader, replay: MixtureLoader, share: float):
        self.main, self.replay, self.share = main, replay, share
        self.seed, self.batch_size = main.seed, main.batch_size
        self.rank, self.world_size = main.rank, main.world_size
        self.batch_index = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        index, global_rows = self.batch_index, self.batch_size * self.world_size
        n_replay = replay_rows(self.share, global_rows, index)
        new = self.main.draw_rows(np.random.default_rng([self.seed, index]), global_rows - n_replay)
        old = self.replay.draw_rows(np.random.default_rng([self.seed, index, 1]), n_replay)
        is_replay = np.zeros(global_rows, dtype=bool)
        is_replay[np.random.default_rng([self.seed, index, 2]).permutation(global_rows)[:n_replay]] = True
        # The k-th new (replay) row of the global batch is the k-th row drawn from its loader.
        order = np.where(is_replay, np.cumsum(is_replay) - 1, np.cumsum(~is_replay) - 1)
        windows = []
        for row in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size):
            loader, (sources, positions) = (self.replay, old) if is_replay[row] else (self.main, new)
            windows.append(loader.window(sources[order[row]], positions[order[row]]))
        self.batch_index += 1
        return windows_to_batch(windows)

    def _both(self, main: dict[str, Any], replay: dict[str, Any]) -> dict[str, Any]:
        return {**main, **{PREFIX + name: value for name, value in replay.items()}}

    def domains(self) -> list[str]:
        return list(self._both(dict.fromkeys(self.main.domains()), dict.fromkeys(self.replay.domains())))

    def source_tokens(self) -> dict[str, int]:
        return self._both(self.main.source_tokens(), self.replay.source_tokens())

    def weights(self) -> dict[str, float]:
        return self._both({n: p * (1 - self.share) for n, p in self.main.weights().items()},
                          {n: p * self.share for n, p in self.replay.weights().items()})

    def epochs_consumed(self) -> dict[str, float]:
        return self._both(self.main.epochs_consumed(), self.replay.epochs_consumed())

    def tokens_drawn(self) -> dict[str, int]:
        return self._both(self.main.tokens_drawn(), self.replay.tokens_drawn())

    def state_dict(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index, "share": self.share,
                "main": self.main.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_index = int(state["batch_index"])
        self.main.load_state_dict(state["main"])
        self.replay.load_state_dict(state["replay"])


def drawn_shares(tokens_drawn: dict[str, int]) -> dict[str, float]:
    """Share of all drawn training tokens per source (what the logs show beside the request)."""
    total = sum(tokens_drawn.values())
    return {name: count / total for name, count in tokens_drawn.items()} if total else {}


def replay_loader(main: MixtureLoader, cfg: ReplayConfig, replay_dir: Path) -> ReplayLoader:
    replay = MixtureLoader(replay_dir, main.seq_len, main.batch_size, main.seed, weights=cfg.sources,
                           rank=main.rank, world_size=main.world_size)
    return ReplayLoader(main, replay, cfg.share)
