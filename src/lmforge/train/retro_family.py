"""The RETRO model family's training parts: neighbours in every batch, held-out bpb with retrieval.

Batches come from :class:`~lmforge.retrieval.batches.RetroLoader` (chunk-aligned windows and
their precomputed neighbours, a pure function of seed and batch index), handed to the model as
its ``neighbours`` argument; checkpoints and exact resume work as for any family. Evaluation
reports held-out bits-per-byte both without and with retrieval.

The model is ``model:`` with ``family: retro`` and a ``retro:`` section
(:class:`~lmforge.nn.retro.RetroModelConfig`); ``retro.base_checkpoint`` + ``retro.freeze_decoder``
retrofit a trained dense or MoE model. The run config's ``retrieval:`` section names the database
and its neighbours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.logging import get_logger
from lmforge.core.metrics_file import append_metrics
from lmforge.eval.retrieval_eval import HeldoutRetrieval, evaluate_retrieval
from lmforge.nn.retro import RetroModelConfig, RetroTransformer, count_retro_parameters
from lmforge.retrieval.batches import RetroLoader
from lmforge.retrieval.config import RetrievalConfig
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.fact_pairs import fact_chunks_of_training_chunks, question_fact_documents
from lmforge.retrieval.neighbours import default_neighbours_dir, load_neighbours
from lmforge.train.callbacks import HeldoutEvaluator
from lmforge.train.checkpoint import unwrap
from lmforge.train.families import TRAINING_FAMILIES, FamilyParts, ModelBatches, RunSetup, TrainingFamily

if TYPE_CHECKING:
    from lmforge.train.config import RunConfig
    from lmforge.train.trainer import Trainer

log = get_logger(__name__)


class RetroEvaluator(HeldoutEvaluator):
    """Held-out bpb without retrieval (as usual) and with it, as ``bpb_retrieval``."""

    def __init__(self, db: ChunkDatabase, retrieval: RetrievalConfig) -> None:
        super().__init__()
        self.db, self.retrieval = db, retrieval
        self.heldout: HeldoutRetrieval | None = None

    def _evaluate(self, trainer: "Trainer") -> dict[str, Any]:
        record = super()._evaluate(trainer)
        if not self.retrieval.eval_with_retrieval or not trainer.is_main:
            return record
        if self.heldout is None:  # the database is frozen during training: embed held-out chunks once
            self.heldout = HeldoutRetrieval(self.db, trainer.data_dir, trainer.cfg.train.seq_len,
                                            trainer.cfg.eval.max_tokens_per_domain, trainer.cfg.eval.batch_size)
        result = evaluate_retrieval(unwrap(trainer.model), self.heldout, buckets=False)  # type: ignore[arg-type]
        guard = result["guard"]
        extra = {"kind": "eval_retrieval", "step": trainer.step, "tokens": trainer.tokens,
                 "bpb": result["bpb"]["db_1"], "loss": result["loss"]["db_1"], "bpb_without": result["bpb"]["none"],
                 "retrieval_hurts": guard["retrieval_hurts"]}
        append_metrics(trainer.run_dir / "metrics.jsonl", extra)
        log.info("step %d held-out bits-per-byte with retrieval: %s", trainer.step,
                 ", ".join(f"{k} {v:.3f}" for k, v in extra["bpb"].items()))
        for line in guard["message"].splitlines():
            (log.warning if line.startswith("WARNING") else log.info)("step %d %s", trainer.step, line)
        record["bpb_retrieval"] = extra["bpb"]
        record["retrieval_guard"] = guard
        return record


def _check_run(cfg: "RunConfig") -> None:
    if cfg.retrieval is None:
        cfg.retrieval = RetrievalConfig()  # the resolved config records the database actually read
    assert isinstance(cfg.model, RetroModelConfig)
    retrieval = cfg.retrieval
    if retrieval.gold_fact_rate > 0:  # the source whose question documents read their fact documents
        facts = [s.name for s in cfg.data.sources if s.kind == "invented_facts"]
        if retrieval.gold_fact_source is None:
            if len(facts) != 1:
                raise ValueError(f"retrieval.gold_fact_rate needs one data source of kind invented_facts, found "
                                 f"{len(facts)} ({', '.join(facts) or 'none'}); name it in retrieval.gold_fact_source")
            retrieval.gold_fact_source = facts[0]  # the resolved config records it
        elif retrieval.gold_fact_source not in facts:
            raise ValueError(f"retrieval.gold_fact_source: {retrieval.gold_fact_source!r} is no data source of kind "
                             f"invented_facts (those: {', '.join(facts) or 'none'})")
    if (cfg.train.time_budget_s is not None and retrieval.gold_neighbour_schedule != "constant"
            and retrieval.gold_neighbour_steps is None):
        raise ValueError("retrieval.gold_neighbour_schedule 'linear' decays over train.steps, which "
                         "train.time_budget_s may shorten; set retrieval.gold_neighbour_steps")
    m = cfg.model.retro.chunk_len
    if cfg.train.seq_len % m:
        raise ValueError(f"train.seq_len ({cfg.train.seq_len}) must be a multiple of model.retro.chunk_len ({m})")


def _fact_chunks(cfg: "RunConfig", db: ChunkDatabase):
    """The paired fact document chunks of every training chunk when ``retrieval.gold_fact_rate`` > 0."""
    retrieval = cfg.retrieval
    assert retrieval is not None
    if retrieval.gold_fact_rate <= 0:
        return None
    assert retrieval.gold_fact_source is not None  # resolved by _check_run
    return fact_chunks_of_training_chunks(db, question_fact_documents(db, retrieval.gold_fact_source))


def _build(setup: RunSetup, model: torch.nn.Module) -> FamilyParts:
    cfg = setup.cfg
    assert isinstance(cfg.model, RetroModelConfig) and cfg.retrieval is not None
    retro, retrieval = cfg.model.retro, cfg.retrieval
    db = ChunkDatabase(retrieval.db)
    if db.chunk_len != retro.chunk_len:
        raise ConfigError(f"model.retro.chunk_len ({retro.chunk_len}) differs from {db.path}'s chunk_len "
                          f"({db.chunk_len})")
    if setup.tokenizer.sha256 != db.manifest["tokenizer_sha256"]:
        raise DataError(f"{db.path} was built with another tokenizer than {cfg.data.out_dir}'s")
    nb_dir = retrieval.neighbours or str(default_neighbours_dir(db.path, retro.n_neighbours))
    neighbours, nb_manifest = load_neighbours(nb_dir, db)
    loader = RetroLoader(
        db, neighbours, cfg.train.seq_len, setup.local_batch_size, cfg.train.seed,
        k=retro.n_neighbours, weights={s.name: s.weight for s in cfg.data.sources},
        rank=setup.rank, world_size=setup.world_size, align=retro.align_neighbours,
        exclusion_radius=int(nb_manifest.get("exclusion_radius", 8)),
        gold_neighbour_rate=retrieval.gold_neighbour_rate,
        gold_neighbour_steps=(retrieval.gold_neighbour_steps if retrieval.gold_neighbour_steps is not None
                              or retrieval.gold_neighbour_schedule == "constant" else cfg.train.steps),
        gold_neighbour_schedule=retrieval.gold_neighbour_schedule,
        document_neighbour_rate=retrieval.document_neighbour_rate,
        gold_fact_rate=retrieval.gold_fact_rate, fact_chunks=_fact_chunks(cfg, db))
    inner = unwrap(model)
    assert isinstance(inner, RetroTransformer)
    counts = count_retro_parameters(inner)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    description = (f"RETRO: decoder {counts['decoder'] / 1e6:.2f}M, encoder {counts['encoder'] / 1e6:.2f}M, "
                   f"CCA {counts['cca'] / 1e6:.2f}M parameters (layers {inner.cca_layers}); "
                   f"{trainable / 1e6:.2f}M trainable")
    return FamilyParts(ModelBatches(loader, ("neighbours",)), {"heldout_eval": RetroEvaluator(db, retrieval)},
                       description)


TRAINING_FAMILIES.register("retro")(TrainingFamily("retro", build=_build, check_run=_check_run))
