"""The ``retrieval:`` section of a run config: which database and neighbours a RETRO run reads."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.core.config import Config


@dataclass
class RetrievalConfig(Config):
    db: str = "data/demo/retrieval"     # chunk database (lmforge retrieval build)
    neighbours: str | None = None       # precomputed neighbours; None -> DB/neighbours_k{retro.n_neighbours}
    eval_with_retrieval: bool = True    # held-out bpb with retrieval at every evaluation
    gold_neighbour_rate: float = 0.0    # training only: chance that a chunk's last neighbour slot holds the text
                                        # itself (chunk + continuation), which teaches copying (see batches.py)
    gold_neighbour_steps: int | None = None  # only in the first N steps (None: all of training)

    def __post_init__(self) -> None:
        if not 0.0 <= self.gold_neighbour_rate <= 1.0:
            raise ValueError(f"retrieval.gold_neighbour_rate must be in [0, 1], got {self.gold_neighbour_rate}")
        if self.gold_neighbour_steps is not None and self.gold_neighbour_steps < 0:
            raise ValueError(f"retrieval.gold_neighbour_steps must be >= 0, got {self.gold_neighbour_steps}")
