"""Training a RETRO model: the Trainer with neighbours in every batch.

:class:`RetroTrainer` changes two things of :class:`~lmforge.train.trainer.Trainer`:

- batches come from :class:`~lmforge.retrieval.batches.RetroLoader` (chunk-aligned windows
  and their precomputed neighbours, a pure function of seed and batch index), fed to the
  model through ``next_batch``'s extra kwargs. Its state has the loader's keys, so
  checkpoints and exact resume work unchanged;
- evaluation reports held-out bits-per-byte both without and with retrieval.

The model is ``model:`` with a ``retro:`` section (:class:`~lmforge.nn.retro.RetroModelConfig`);
``retro.base_checkpoint`` + ``retro.freeze_decoder`` retrofit a trained dense or MoE model.
The run config's ``retrieval:`` section names the database and its neighbours.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.core.config import Config, apply_overrides, read_yaml
from lmforge.core.errors import ConfigError, DataError
from lmforge.core.logging import get_logger
from lmforge.core.metrics_file import append_metrics
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.retrieval_eval import HeldoutRetrieval, evaluate_retrieval
from lmforge.nn.retro import RetroModelConfig, count_retro_parameters
from lmforge.retrieval.batches import RetroLoader
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.neighbours import default_neighbours_dir, load_neighbours
from lmforge.train.callbacks import (Callback, Checkpointer, HeldoutEvaluator, MetricsLogger, ProgressBar,
                                     ThroughputMonitor)
from lmforge.train.checkpoint import unwrap
from lmforge.train.config import RunConfig
from lmforge.train.trainer import Trainer

log = get_logger(__name__)


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


@dataclass
class RetroRunConfig(RunConfig):
    model: RetroModelConfig = field(default_factory=RetroModelConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.model.retro.chunk_len
        if self.train.seq_len % m:
            raise ValueError(f"train.seq_len ({self.train.seq_len}) must be a multiple of model.retro.chunk_len ({m})")


class RetroEvaluator(HeldoutEvaluator):
    """Held-out bpb without retrieval (as usual) and with it, as ``bpb_retrieval``."""

    def __init__(self) -> None:
        self.heldout: HeldoutRetrieval | None = None

    def _evaluate(self, trainer: "Trainer") -> dict[str, Any]:
        record = super()._evaluate(trainer)
        assert isinstance(trainer, RetroTrainer)
        if not trainer.cfg.retrieval.eval_with_retrieval or not trainer.is_main:
            return record
        if self.heldout is None:  # the database is frozen during training: embed held-out chunks once
            self.heldout = HeldoutRetrieval(trainer.db, trainer.data_dir, trainer.cfg.train.seq_len,
                                            trainer.cfg.eval.max_tokens_per_domain, trainer.cfg.eval.batch_size)
        result = evaluate_retrieval(unwrap(trainer.model), self.heldout, buckets=False)
        extra = {"kind": "eval_retrieval", "step": trainer.step, "tokens": trainer.tokens,
                 "bpb": result["bpb"]["db_1"], "loss": result["loss"]["db_1"], "bpb_without": result["bpb"]["none"]}
        append_metrics(trainer.run_dir / "metrics.jsonl", extra)
        log.info("step %d held-out bits-per-byte with retrieval: %s", trainer.step,
                 ", ".join(f"{k} {v:.3f}" for k, v in extra["bpb"].items()))
        record["bpb_retrieval"] = extra["bpb"]
        return record


def retro_callbacks() -> list[Callback]:
    return [ThroughputMonitor(), MetricsLogger(), ProgressBar(), Checkpointer(), RetroEvaluator()]


class RetroTrainer(Trainer):
    cfg: RetroRunConfig

    def __init__(self, cfg: RetroRunConfig, resume: str | None = None, callbacks: list[Callback] | None = None):
        if not isinstance(cfg, RetroRunConfig):
            raise ConfigError("RetroTrainer needs a RetroRunConfig (a model with a retro: section)")
        db = ChunkDatabase(cfg.retrieval.db)
        retro = cfg.model.retro
        if db.chunk_len != retro.chunk_len:
            raise ConfigError(f"model.retro.chunk_len ({retro.chunk_len}) differs from {db.path}'s chunk_len "
                              f"({db.chunk_len})")
        tok = Tokenizer.load(Path(cfg.data.out_dir) / "tokenizer.json")
        if tok.sha256 != db.manifest["tokenizer_sha256"]:
            raise DataError(f"{db.path} was built with another tokenizer than {cfg.data.out_dir}'s")
        nb_dir = cfg.retrieval.neighbours or str(default_neighbours_dir(db.path, retro.n_neighbours))
        neighbours, nb_manifest = load_neighbours(nb_dir, db)
        self.db = db
        super().__init__(cfg, resume, callbacks if callbacks is not None else retro_callbacks())
        state = self.loader.state_dict()  # restored from the checkpoint when resuming
        self.loader = RetroLoader(  # type: ignore[assignment]
            db, neighbours, cfg.train.seq_len, cfg.train.batch_size // self.world_size, cfg.train.seed,
            k=retro.n_neighbours, weights={s.name: s.weight for s in cfg.data.sources},
            rank=self.rank, world_size=self.world_size, align=retro.align_neighbours,
            exclusion_radius=int(nb_manifest.get("exclusion_radius", 8)),
            gold_neighbour_rate=cfg.retrieval.gold_neighbour_rate, gold_neighbour_steps=cfg.retrieval.gold_neighbour_steps)
        self.loader.load_state_dict(state)
        counts = count_retro_parameters(unwrap(self.model))  # type: ignore[arg-type]
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("RETRO: decoder %.2fM, encoder %.2fM, CCA %.2fM parameters (layers %s); %.2fM trainable",
                 counts["decoder"] / 1e6, counts["encoder"] / 1e6, counts["cca"] / 1e6,
                 unwrap(self.model).cca_layers, trainable / 1e6)  # type: ignore[union-attr]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        inputs, targets, neighbours = self.loader.next_batch()  # type: ignore[misc]
        return inputs.to(self.device), targets.to(self.device), {"neighbours": neighbours.to(self.device)}


def load_retro_run_config(path: str, overrides: list[str]) -> RetroRunConfig:
    raw = apply_overrides(read_yaml(path), overrides)
    cfg = RetroRunConfig.from_dict(raw)
    return cfg  # type: ignore[return-value]


def train_retro(cfg: RetroRunConfig, resume: str | None = None) -> Path:
    from lmforge.core import distributed

    try:
        return RetroTrainer(cfg, resume=resume).fit()
    finally:
        distributed.shutdown()


def run_retro_command(args: argparse.Namespace) -> int:
    """Every ``lmforge retrieval`` verb: train / eval / facts / train-query-encoder here, the database verbs
    in retrieval.cli."""
    verb = args.retrieval_verb
    if verb == "train":
        run_dir = train_retro(load_retro_run_config(args.config, args.overrides), args.resume)
        print(f"run: {run_dir}")
        return 0
    if verb == "eval":
        from lmforge.eval.retrieval_eval import run_retrieval_eval

        return run_retrieval_eval(args)
    if verb == "facts":
        from lmforge.eval.facts import run_facts

        return run_facts(args)
    if verb == "train-query-encoder":
        from lmforge.train.query_encoder_trainer import run_train_query_encoder

        return run_train_query_encoder(args)
    from lmforge.retrieval.cli import run_retrieval

    return run_retrieval(args)

