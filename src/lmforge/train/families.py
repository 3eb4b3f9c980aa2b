"""The training side of the model families: how each family's batches and extra callbacks are built.

:mod:`lmforge.nn.families` registers a family's config class, inference rebuild and counting
(below this layer, so eval/serve/export can load any family). Here the same name registers what
training needs beyond the shared loop:

- ``build``: given the assembled run (config, data directory, tokenizer, this process's rank),
  the batch stream the trainer reads — ``next_batch()`` returns ``(inputs, targets, extra model
  keyword arguments)``, a pure function of seed and batch index so resume stays exact — and the
  family's callbacks, keyed by name (a name already among the defaults replaces that default);
- ``check_run``: checks of the whole run config that involve the family (e.g. RETRO's
  ``train.seq_len`` must be a multiple of its chunk length), run when the config is parsed.

Adding a family: one ``TRAINING_FAMILIES.register`` call (see :mod:`lmforge.train.retro_family`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from lmforge.core.errors import ConfigError
from lmforge.core.registry import Registry
from lmforge.data.loader import MixtureLoader
from lmforge.data.replay import replay_loader
from lmforge.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lmforge.train.callbacks import Callback
    from lmforge.train.config import RunConfig


class ModelBatches:
    """A loader as the trainer reads it: ``(inputs, targets, extra)`` per micro-batch, where a loader
    that yields more tensors than inputs and targets names them (e.g. ``("neighbours",)``)."""

    def __init__(self, loader: Any, extra_names: tuple[str, ...] = ()):
        self.loader, self.extra_names = loader, extra_names

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets, *extra = self.loader.next_batch()
        return inputs, targets, dict(zip(self.extra_names, extra, strict=True))

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def epochs_consumed(self) -> dict[str, float]:
        return self.loader.epochs_consumed()

    def source_tokens(self) -> dict[str, int]:
        return self.loader.source_tokens()

    def weights(self) -> dict[str, float]:
        return self.loader.weights()

    def tokens_drawn(self) -> dict[str, int]:
        return self.loader.tokens_drawn() if hasattr(self.loader, "tokens_drawn") else {}


@dataclass
class RunSetup:
    """What a family's ``build`` receives: the run as assembled so far."""
    cfg: "RunConfig"
    data_dir: Path
    tokenizer: Tokenizer
    rank: int
    world_size: int
    replay_data_dir: Path | None = None   # the old data a continued run replays (cfg.replay), resolved

    @property
    def data_parallel_rank(self) -> int:
        """This rank's data-parallel group: the ranks of one context-parallel group read the same rows."""
        return self.rank // self.cfg.train.context_parallel

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.cfg.train.context_parallel

    @property
    def local_batch_size(self) -> int:
        return self.cfg.train.batch_size // self.data_parallel_size


@dataclass
class FamilyParts:
    batches: ModelBatches
    callbacks: dict[str, "Callback"] = field(default_factory=dict)
    description: str | None = None   # logged once at start (e.g. RETRO's encoder/CCA sizes)


@dataclass(frozen=True)
class TrainingFamily:
    name: str
    build: Callable[[RunSetup, torch.nn.Module], FamilyParts]
    check_run: Callable[["RunConfig"], None] = lambda cfg: None


TRAINING_FAMILIES: Registry[TrainingFamily] = Registry("model family")


def _no_retrieval_section(cfg: "RunConfig") -> None:
    if cfg.retrieval is not None:
        raise ConfigError(f"retrieval: only a model of family 'retro' reads a database (model.family is "
                          f"{cfg.model.family!r})")


def _build_transformer(setup: RunSetup, model: torch.nn.Module) -> FamilyParts:
    cfg = setup.cfg
    loader = MixtureLoader(
        setup.data_dir, cfg.train.seq_len, setup.local_batch_size, cfg.train.seed,
        weights={s.name: s.weight for s in cfg.data.sources},
        rank=setup.data_parallel_rank, world_size=setup.data_parallel_size, temperature=cfg.data.mixture_temperature,
        unique_tokens=cfg.data.unique_tokens,
    )
    if cfg.replay is not None and setup.replay_data_dir is not None:
        loader = replay_loader(loader, cfg.replay, setup.replay_data_dir)
    return FamilyParts(ModelBatches(loader))


TRAINING_FAMILIES.register("transformer")(
    TrainingFamily("transformer", build=_build_transformer, check_run=_no_retrieval_section))


def training_family(name: str) -> TrainingFamily:
    import lmforge.train.retro_family  # noqa: F401  (registers "retro")
    import lmforge.train.multimodal_family  # noqa: F401  (registers "multimodal")

    try:
        return TRAINING_FAMILIES.get(name)
    except ConfigError as exc:
        raise ConfigError(f"model.family: {exc}") from None
