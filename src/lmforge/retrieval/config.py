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
    gold_neighbour_schedule: str = "constant"  # "constant", or "linear": the rate falls linearly to 0 at
                                               # gold_neighbour_steps (None: at the last training step)
    document_neighbour_rate: float = 0.0  # training only: chance that a chunk's last neighbour slot holds another
                                          # chunk of its own document, beyond the exclusion radius (never its
                                          # continuation): related text to read, not text to copy (see batches.py)
    gold_fact_rate: float = 0.0   # training only: chance that a question chunk of an invented_facts source reads a
                                  # chunk of its person's fact document in its first neighbour slot (fact_pairs.py)
    gold_fact_source: str | None = None  # the invented_facts source whose question documents get them (None: the
                                         # data config's one source of kind invented_facts)

    def __post_init__(self) -> None:
        if not 0.0 <= self.gold_neighbour_rate <= 1.0:
            raise ValueError(f"retrieval.gold_neighbour_rate must be in [0, 1], got {self.gold_neighbour_rate}")
        if self.gold_neighbour_steps is not None and self.gold_neighbour_steps < 0:
            raise ValueError(f"retrieval.gold_neighbour_steps must be >= 0, got {self.gold_neighbour_steps}")
        if not 0.0 <= self.document_neighbour_rate <= 1.0:
            raise ValueError(f"retrieval.document_neighbour_rate must be in [0, 1], got {self.document_neighbour_rate}")
        if not 0.0 <= self.gold_fact_rate <= 1.0:
            raise ValueError(f"retrieval.gold_fact_rate must be in [0, 1], got {self.gold_fact_rate}")
        if self.gold_neighbour_schedule not in GOLD_SCHEDULES:
            raise ValueError(f"retrieval.gold_neighbour_schedule: unknown schedule {self.gold_neighbour_schedule!r} "
                             f"(known: {', '.join(GOLD_SCHEDULES)})")


GOLD_SCHEDULES = ("constant", "linear")


def gold_rate_at(rate: float, schedule: str, batch_index: int, steps: int | None) -> float:
    """Chance of a gold neighbour in batch ``batch_index`` (0-based): ``rate`` until ``steps`` batches
    (``constant``), or ``rate`` falling linearly to 0 at ``steps`` (``linear``); 0 from ``steps`` on.
    ``steps`` None: no end (``constant`` only; the loader resolves ``linear`` to the run's steps)."""
    if steps is not None and batch_index >= steps:
        return 0.0
    if schedule == "linear":
        if steps is None:
            raise ValueError("retrieval.gold_neighbour_schedule 'linear' needs a number of steps to decay over")
        return rate * (1.0 - batch_index / max(steps, 1))
    return rate
