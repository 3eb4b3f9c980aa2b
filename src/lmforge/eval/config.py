"""Evaluation settings: held-out bits-per-byte budget and sampled generations."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.core.config import Config


@dataclass
class EvalConfig(Config):
    # Held-out tokens scored per domain: all of them when there are no more, else windows
    # spread evenly over the whole held-out split (fixed positions, so runs compare).
    max_tokens_per_domain: int = 32768
    batch_size: int = 8
    interval_level: float = 0.95        # of the bootstrap interval around each domain's bits-per-byte
    bootstrap_samples: int = 1000       # resamples of held-out documents (numpy, seeded: deterministic)
    sample_prompts: list[str] = field(
        default_factory=lambda: ["ROMEO.\n", "def fibonacci(n):\n", "Of Man's first disobedience"]
    )
    sample_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 40
    seed: int = 1234                    # sampling has its own generator: eval never moves training RNG
    task_items: int = 100               # multiple-choice items per held-out task at the end (0: no tasks)
    task_seed: int = 0                  # fixes which items and distractors the tasks use

    def __post_init__(self) -> None:
        if self.max_tokens_per_domain < 1 or self.batch_size < 1:
            raise ValueError("max_tokens_per_domain and batch_size must be >= 1")
        if not 0.0 < self.interval_level < 1.0:
            raise ValueError(f"interval_level must be in (0, 1), got {self.interval_level}")
        if self.bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples must be >= 1, got {self.bootstrap_samples}")
        if self.task_items < 0:
            raise ValueError("task_items must be >= 0")
        if not self.temperature >= 0:  # also refuses nan
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature}")
        if self.sample_tokens < 1:
            raise ValueError(f"sample_tokens must be >= 1, got {self.sample_tokens} (for no samples: sample_prompts: [])")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: all tokens), got {self.top_k}")
