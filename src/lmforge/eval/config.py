"""Evaluation settings: held-out bits-per-byte budget, loss by position, passkey grid, sampled generations."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.core.config import Config, FieldValueError


@dataclass
class PasskeyConfig(Config):
    """Passkey retrieval over a length x depth grid (lmforge/eval/passkey.py; docs/long_context.md)."""

    lengths: list[int] = field(default_factory=list)  # tokens per item; [] = seq_len / 4, / 2 and seq_len
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # of the filler before the key
    items: int = 20                     # per cell of the grid and variant
    multi_key_pairs: int = 4            # pairs stated in the multi-key variant (1: no multi-key variant)
    candidates: int = 10                # the true value and distractors, ranked by likelihood (chance 1/candidates)
    filler: str = "words"               # "words" (as the kv_recall source) or a domain: its held-out text
    value_digits: int | None = None     # null: the data's kv_recall source's, else 3
    seed: int = 0

    def __post_init__(self) -> None:
        if any(n < 8 for n in self.lengths):
            raise FieldValueError("lengths", f"each length must be >= 8 tokens, got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise FieldValueError("depths", f"must be fractions in [0, 1], got {self.depths}")
        for key, least in (("items", 1), ("multi_key_pairs", 1), ("candidates", 2)):
            if getattr(self, key) < least:
                raise FieldValueError(key, f"must be >= {least}, got {getattr(self, key)}")
        if self.value_digits is not None and not 2 <= self.value_digits <= 9:
            raise FieldValueError("value_digits", f"must be in 2..9, got {self.value_digits}")


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
    # Held-out loss by position in the window, in buckets of this many positions (0: off).
    position_bucket: int = 64
    passkey: PasskeyConfig | None = None  # passkey retrieval grid at the end of a run (null: off)

    def __post_init__(self) -> None:
        if self.max_tokens_per_domain < 1 or self.batch_size < 1:
            raise ValueError("max_tokens_per_domain and batch_size must be >= 1")
        if not 0.0 < self.interval_level < 1.0:
            raise ValueError(f"interval_level must be in (0, 1), got {self.interval_level}")
        if self.bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples must be >= 1, got {self.bootstrap_samples}")
        if self.position_bucket < 0:
            raise FieldValueError("position_bucket", f"must be >= 0 (0: off), got {self.position_bucket}")
        if self.task_items < 0:
            raise ValueError("task_items must be >= 0")
        if not self.temperature >= 0:  # also refuses nan
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature}")
        if self.sample_tokens < 1:
            raise ValueError(f"sample_tokens must be >= 1, got {self.sample_tokens} (for no samples: sample_prompts: [])")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: all tokens), got {self.top_k}")
