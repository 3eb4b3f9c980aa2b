"""The ladder config: which models, how many tokens each, and the rules for batch and LR.

A ladder is a set of training runs ("rungs") made from one base run config by two rules,
kept apart as OLMo's ladders do: **size → model** (:class:`SizeRule`) and
**model → batch, duration, learning rate** (:class:`GridRule` or :class:`IsoFlopRule`,
:class:`BatchRule`, :class:`LRRule`, :class:`ScheduleRule`). ``lmforge.scaling.ladder.plan``
turns a :class:`LadderConfig` into rungs and their resolved run configs.

Numbers (token counts, compute budgets) may be written ``2e6``, ``2M``, ``1.5e15``: YAML
reads ``2e6`` (no dot) as a string, so every such field accepts strings and parses them
with the magnitude suffixes of ``scaling.table.parse_number``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.core.config import Config, apply_overrides, read_yaml
from lmforge.core.errors import ConfigError
from lmforge.scaling.shape import ShapeRule
from lmforge.scaling.table import parse_number

Number = float | str


def _number(value: Number, what: str) -> float:
    """A positive finite float from a YAML number or a string like ``2e6`` / ``2M``."""
    if isinstance(value, str):
        try:
            value = parse_number(value)
        except ValueError:
            raise ValueError(f"{what}: expected a number like 2e6 or 2M, got {value!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what}: expected a positive number, got {value!r}")
    return float(value)


@dataclass
class SizeRule(ShapeRule):
    """Model shapes: ``n_layers`` under the shared size rule (:class:`~lmforge.scaling.shape.ShapeRule`:
    d_model from the aspect ratio, heads, SwiGLU and expert widths), or explicit ``shapes``.

    The rule is the one ``scaling plan`` proposes shapes with, default aspect ratio included.
    Other model settings (vocabulary, QK-norm, tied embeddings, the MoE's expert count and
    top-k) come from the base config.
    """

    n_layers: list[int] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)   # explicit [d_model, n_layers] pairs

    def __post_init__(self) -> None:
        if bool(self.n_layers) == bool(self.shapes):
            raise ValueError("give either n_layers (with aspect_ratio) or shapes ([d_model, n_layers] pairs)")
        super().__post_init__()
        if any(n < 1 for n in self.n_layers):
            raise ValueError(f"n_layers: every value must be >= 1, got {self.n_layers}")
        for shape in self.shapes:
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"shapes: each entry must be [d_model, n_layers] with positive values, got {shape}")
            if shape[0] % self.head_dim:
                raise ValueError(f"shapes: d_model {shape[0]} is not a multiple of head_dim {self.head_dim}")

    def dims(self) -> list[tuple[int, int]]:
        """(d_model, n_layers) of every size, in the order given."""
        if self.shapes:
            return [(int(d), int(n)) for d, n in self.shapes]
        return [(self.d_model(n), n) for n in self.n_layers]


@dataclass
class GridRule(Config):
    """Every size × every token budget: absolute ``tokens`` D, or ``tokens_per_param`` r (D = r·N_active)."""

    tokens: list[Number] = field(default_factory=list)
    tokens_per_param: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if bool(self.tokens) == bool(self.tokens_per_param):
            raise ValueError("give either tokens (D per rung) or tokens_per_param (D = r·N_active)")
        self.tokens = [_number(v, "tokens") for v in self.tokens]
        if any(r <= 0 for r in self.tokens_per_param):
            raise ValueError(f"tokens_per_param: values must be positive, got {self.tokens_per_param}")


@dataclass
class IsoFlopRule(Config):
    """IsoFLOP profiles: for each budget C, every size N with D = C / (6·N_active) whose
    tokens per parameter D/N lies in [min_tokens_per_param, max_tokens_per_param]."""

    compute: list[Number] = field(default_factory=list)
    min_tokens_per_param: float = 2.0
    max_tokens_per_param: float = 200.0

    def __post_init__(self) -> None:
        if not self.compute:
            raise ValueError("compute: give at least one budget in FLOPs, e.g. [1e15, 3e15]")
        self.compute = [_number(v, "compute") for v in self.compute]
        if not 0 < self.min_tokens_per_param < self.max_tokens_per_param:
            raise ValueError("need 0 < min_tokens_per_param < max_tokens_per_param")


@dataclass
class EpochsRule(Config):
    """An epochs sweep (data-limited regime): a fixed budget of ``unique_tokens`` U repeated R times
    for every R in ``repetitions``, each against a run on R·U tokens of fresh data (the first R·U
    tokens of the training split, seen once). Both arms train D = R·U tokens; R = 1 is one run.
    U is rounded down to whole optimizer steps, so R epochs are exactly R·U tokens."""

    unique_tokens: Number = 0
    repetitions: list[float] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    fresh: bool = True      # also train the fresh-data arm (without it, only the repeated runs)

    def __post_init__(self) -> None:
        self.unique_tokens = _number(self.unique_tokens, "unique_tokens")
        if not self.repetitions or any(not (math.isfinite(r) and r >= 1) for r in self.repetitions):
            raise ValueError(f"repetitions: give epochs >= 1, e.g. [1, 2, 4, 8, 16], got {self.repetitions}")
        if len(set(self.repetitions)) != len(self.repetitions):
            raise ValueError(f"repetitions: repeated values in {self.repetitions}")


@dataclass
class ScheduleRule(Config):
    """LR schedule matched to each rung's length.

    ``cosine``: warmup then cosine to ``min_lr_ratio`` at the rung's own last step — one
    full run per (N, D) point. ``wsd``: warmup, constant, then linear decay over the last
    ``decay_fraction`` of the steps; the rungs of one size form a chain in which each rung
    resumes the stable phase of the previous one at its decay start, so the longest rung
    of a size costs a full run and every shorter one only its decay.
    """

    kind: Literal["cosine", "wsd"] = "cosine"
    warmup_steps: int | None = None   # fixed warmup; null: warmup_fraction
    warmup_fraction: float = 0.05     # of the rung's steps (cosine) or of the chain's shortest rung (wsd)
    decay_fraction: float = 0.2       # wsd only
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 < self.decay_fraction < 0.5:
            raise ValueError(f"decay_fraction must be in (0, 0.5) for WSD branching, got {self.decay_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LRRule(Config):
    """Peak LR = ``base`` · (``base_d_model`` / d_model) ^ ``width_exponent``.

    Exponent 1 is the μP rule for Adam on hidden matrices (LR ∝ 1/width); 0 is one fixed
    LR for every rung. Muon's own LR (``optim.muon_lr``) is left as the base config sets it.
    """

    base: float = 3e-3
    base_d_model: int = 256
    width_exponent: float = 1.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.base_d_model < 1:
            raise ValueError("base must be positive and base_d_model >= 1")

    def lr(self, d_model: int) -> float:
        return self.base * (self.base_d_model / d_model) ** self.width_exponent


@dataclass
class BatchRule(Config):
    """Global batch in sequences = ``sequences`` · (C / ``base_compute``) ^ ``compute_exponent``.

    With exponent 0 (the default) every rung uses ``sequences``. Otherwise the result is
    rounded to a multiple of ``multiple_of`` (so it divides over GPUs) and capped at
    ``max_sequences``. Under WSD the chain's largest C decides, since a chain shares one batch.
    """

    sequences: int = 16
    compute_exponent: float = 0.0
    base_compute: Number | None = None
    multiple_of: int = 8
    max_sequences: int | None = None

    def __post_init__(self) -> None:
        if self.sequences < 1 or self.multiple_of < 1:
            raise ValueError("sequences and multiple_of must be >= 1")
        if self.compute_exponent != 0.0:
            if self.base_compute is None:
                raise ValueError("compute_exponent != 0 needs base_compute (the C at which batch = sequences)")
            self.base_compute = _number(self.base_compute, "base_compute")

    def sequences_for(self, compute: float) -> int:
        if self.compute_exponent == 0.0:
            return self.sequences
        raw = self.sequences * (compute / float(self.base_compute)) ** self.compute_exponent  # type: ignore[arg-type]
        batch = max(self.multiple_of, self.multiple_of * round(raw / self.multiple_of))
        return min(batch, self.max_sequences) if self.max_sequences else batch


@dataclass
class FitRule(Config):
    """How the held-out rung is predicted (see ``ladder.predict``)."""

    law: Literal["auto", "approach3", "power_law"] = "auto"
    bootstrap: int = 200
    level: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.bootstrap}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {self.level}")


@dataclass
class LaunchRule(Config):
    """What ``--print-commands`` writes for a cluster."""

    nproc_per_node: int = 1          # torchrun processes (GPUs) per rung
    slurm_time: str = "24:00:00"
    slurm_partition: str = ""
    slurm_cpus_per_task: int = 8
    venv: str = ".venv"              # torchrun is called as <venv>/bin/torchrun

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.slurm_cpus_per_task < 1:
            raise ValueError("nproc_per_node and slurm_cpus_per_task must be >= 1")


@dataclass
class LadderConfig(Config):
    name: str
    base: str | dict[str, Any]                    # run config: a path or an inline mapping
    sizes: SizeRule
    overrides: list[str] = field(default_factory=list)   # dotted overrides of the base, e.g. train.seq_len=256
    out_dir: str = "runs/ladders"                 # the ladder lives in out_dir/name
    grid: GridRule | None = None
    isoflop: IsoFlopRule | None = None
    epochs: EpochsRule | None = None              # an epochs sweep: repeated vs fresh data (data-limited regime)
    schedule: ScheduleRule = field(default_factory=ScheduleRule)
    lr: LRRule = field(default_factory=LRRule)
    batch: BatchRule = field(default_factory=BatchRule)
    fit: FitRule = field(default_factory=FitRule)
    launch: LaunchRule = field(default_factory=LaunchRule)
    # Which parameter count the N column (and every fit) uses: all active parameters
    # (embedding included; with tied embeddings these are exactly the parameters the 6·N
    # FLOPs count, the output head being the embedding), or active without embedding/head.
    count: Literal["active", "active_non_embedding"] = "active"
    evals_per_run: int = 8                        # held-out evaluations along each run (plus the final one)
    checkpoint_every: int | None = None           # steps; null: the base config's train.checkpoint_every

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty directory name, got {self.name!r}")
        if sum(rule is not None for rule in (self.grid, self.isoflop, self.epochs)) != 1:
            raise ValueError("give exactly one of grid (sizes × token budgets), isoflop (compute budgets) or "
                             "epochs (a unique-token budget repeated vs fresh data)")
        if self.epochs is not None and self.schedule.kind != "cosine":
            raise ValueError("epochs: the sweep needs schedule.kind: cosine (a WSD chain would resume one arm's "
                             "checkpoint, trained on other data, in another)")
        if self.evals_per_run < 1:
            raise ValueError(f"evals_per_run must be >= 1, got {self.evals_per_run}")
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, path: str = "") -> "LadderConfig":
        # The optional sections are parsed here: a bad value inside ``grid`` would otherwise
        # surface as "grid: expected mapping or null", losing the key that was wrong.
        if isinstance(data, dict):
            data = dict(data)
            prefix = f"{path}." if path else ""
            for key, rule in (("grid", GridRule), ("isoflop", IsoFlopRule), ("epochs", EpochsRule)):
                if isinstance(data.get(key), dict):
                    data[key] = rule.from_dict(data[key], path=f"{prefix}{key}")
        return super().from_dict(data, path)  # type: ignore[return-value]

    @property
    def ladder_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def load_ladder_config(path: str | Path, overrides: list[str] | None = None) -> tuple[LadderConfig, dict[str, Any]]:
    """The ladder config at ``path`` (or ``configs/<name>`` of the source checkout) and its base
    run config as a plain dict (overrides applied).

    A base given as a path is looked up relative to the ladder file, then the working
    directory. Errors name the ladder file and the offending key.
    """
    path = Path(path)
    if not path.is_file():  # like `lmforge train`: a bare name is also looked up in the checkout's configs/
        candidate = Path(__file__).resolve().parents[4] / "configs" / path.name
        path = candidate if candidate.is_file() else path
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        cfg = LadderConfig.from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg, resolve_base(cfg, path.parent)


def resolve_base(cfg: LadderConfig, relative_to: Path) -> dict[str, Any]:
    if isinstance(cfg.base, dict):
        base = cfg.base
    else:
        candidates = [relative_to / cfg.base, Path(cfg.base)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"base: run config {cfg.base!r} not found (looked in {relative_to} and the "
                              "working directory)")
        base = read_yaml(found)
    try:
        return apply_overrides(base, cfg.overrides)
    except ConfigError as exc:
        raise ConfigError(f"overrides: {exc}") from None
