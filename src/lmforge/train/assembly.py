"""A run assembled in one place: everything the trainer needs, built in order, then handed over.

    trainer = build_trainer(cfg, resume="auto")   # or: train_run(cfg, resume) -> run directory
    trainer.fit()

Order, and why:

1. device and process group (under torchrun each rank takes its GPU);
2. data prepared on rank 0 (resumable, a no-op when done), held-out isolation checked, the
   tokenizer loaded — it decides the vocabulary, recorded in the resolved config;
3. the run directory locked (one writer at a time), the checkpoint to resume from
   (``--resume auto|PATH``), then the run directory written (marker, resolved config, code
   version, data manifest) — refused if it holds another run — and checked writable;
   A continued run (``init.path``, ``--init-from``) checks its parent checkpoint first, before
   anything is written, and records its lineage;
4. seed, then the model of the config's family (``model.family``, :mod:`lmforge.nn.families`),
   parameter and FLOP counts, parallelism applied (DDP/FSDP2/compile/checkpointing), and the
   optimizer built after wrapping (FSDP2 replaces parameters with sharded DTensors);
5. the family's batch stream and callbacks (:mod:`lmforge.train.families`) over the defaults,
   keyed by name;
6. the trainer, restored from the checkpoint if resuming (else initialised from the parent, if
   any), and the model card.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from lmforge.core import distributed
from lmforge.core.checkpoint_files import check_writable, latest_valid_checkpoint
from lmforge.core.config import read_yaml
from lmforge.core.cpu_memory import keep_freed_memory
from lmforge.core.device import resolve_device
from lmforge.core.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.core.logging import get_logger
from lmforge.core.run_lock import RunLock
from lmforge.core.seeding import seed_everything
from lmforge.data.mixture import planned_epochs, warn_repeats
from lmforge.data.prepare import prepare_data
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.isolation import require_isolation
from lmforge.nn.attention import END_OF_TEXT_ID
from lmforge.nn.families import family_of
from lmforge.optim.optimizers import build_optimizer
from lmforge.parallel.apply import apply_parallelism
from lmforge.parallel.context import build_context_parallel, check_process_layout
from lmforge.train.callbacks import Callback, default_callbacks
from lmforge.train.config import RunConfig
from lmforge.train.families import RunSetup, training_family
from lmforge.train.init_from import Parent, check_parent, initialise_from_parent, write_lineage
from lmforge.train.continuation import evaluation_data_dirs, replay_data_dir, with_parent_replay_sources
from lmforge.train.model_card import write_model_card
from lmforge.train.branches import config_differences
from lmforge.train.run_dir import check_run_target, init_run_dir, record_resume, run_path
from lmforge.train.throughput import peak_flops
from lmforge.train.trainer import Trainer

log = get_logger(__name__)


def device_for_rank(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and distributed.world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())
    return device


def find_checkpoint(cfg: RunConfig, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` is the run's newest valid one (None if there is none)."""
    if resume is None:
        return None
    if resume == "auto":
        found = None
        if distributed.is_main_process():
            found = latest_valid_checkpoint(run_path(cfg) / "checkpoints")
            if found is None:
                log.info("--resume auto: no valid checkpoint yet, starting from step 0")
        return distributed.broadcast_object(found)  # type: ignore[return-value]
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint")
    return path


def _prepared_data(cfg: RunConfig) -> tuple[RunConfig, Path, Tokenizer]:
    if cfg.data.executor != "local":
        raise ConfigError("data.executor: training prepares data locally; run `lmforge data prepare` "
                          f"with executor {cfg.data.executor!r} first, then train with executor: local")
    data_dir = Path(cfg.data.out_dir)
    distributed.run_on_main(lambda: prepare_data(cfg.data))
    require_isolation(data_dir)
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    if cfg.model.vocab_size != tokenizer.vocab_size:
        # The tokenizer, trained on this data, decides the vocabulary; the resolved
        # config written to the run directory records the value actually used.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    if cfg.model.attention.document_mask and tokenizer.eos_id != END_OF_TEXT_ID:
        raise ConfigError(f"model.attention.document_mask: documents are told apart by end-of-text id "
                          f"{END_OF_TEXT_ID}, but {data_dir / 'tokenizer.json'} has it at id {tokenizer.eos_id}")
    return cfg, data_dir, tokenizer


def build_trainer(cfg: RunConfig, resume: str | None = None,
                  extra_callbacks: dict[str, Callback] | None = None) -> Trainer:
    """Assemble the run ``cfg`` describes (see the module docstring for the order).

    ``resume``: None (a new run), ``"auto"`` (the newest valid checkpoint of runs/<name>) or a
    checkpoint directory. ``extra_callbacks`` are added after the defaults and the family's.
    """
    device = device_for_rank(cfg.train.device)
    if device.type == "cpu" and cfg.train.keep_freed_memory and keep_freed_memory():
        log.info("CPU: malloc keeps freed memory for the next step (train.keep_freed_memory)")
    distributed.init_distributed(device)
    check_process_layout(cfg.train, distributed.world_size())  # batch and context-parallel groups fit
    cfg, data_dir, tokenizer = _prepared_data(cfg)
    # A continued run's parent is checked before its own run directory is touched.
    parent = check_parent(cfg, tokenizer) if resume is None else None
    cfg = with_parent_replay_sources(cfg)

    run_dir = run_path(cfg)
    # One writer per run directory: held from before the checkpoint is chosen until fit() ends
    # (a lock left by a killed process is taken over; see core/run_lock.py).
    distributed.run_on_main(lambda: check_run_target(run_dir))  # nothing written into a folder not ours
    lock = distributed.run_on_main(lambda: RunLock(run_dir).acquire())
    try:
        checkpoint, changes = _open_run_directory(cfg, data_dir, resume)
        if checkpoint is None and parent is None:  # --resume auto before the run's first checkpoint
            parent = check_parent(cfg, tokenizer)
        if checkpoint is None and parent is not None:
            distributed.run_on_main(lambda: write_lineage(run_dir, cfg, parent))
        trainer = _assemble(cfg, data_dir, tokenizer, device, checkpoint, parent, changes, extra_callbacks)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.run_lock = lock
    return trainer


def _as_parsed(config: dict[str, Any]) -> dict[str, Any]:
    """A saved run config as this lmforge resolves it, so keys added since (at their defaults) are
    not reported as changed on resume; as saved if it no longer parses."""
    try:
        return RunConfig.from_dict(config).to_dict()
    except (LmforgeError, ValueError, TypeError):  # an old or hand-edited config: compared as written
        return config


def _open_run_directory(cfg: RunConfig, data_dir: Path,
                        resume: str | None) -> tuple[Path | None, list[tuple[str, Any, Any]]]:
    """The checkpoint to resume from and the settings changed since the run last wrote its config;
    the run directory written (refused if it holds another run) and its checkpoints folder checked
    writable now rather than at the first save."""
    run_dir = run_path(cfg)
    checkpoint = find_checkpoint(cfg, resume)
    changes: list[tuple[str, Any, Any]] = []
    if resume is not None and distributed.is_main_process() and (run_dir / "config.yaml").is_file():
        changes = config_differences(_as_parsed(read_yaml(run_dir / "config.yaml")), cfg.to_dict())
    distributed.run_on_main(lambda: init_run_dir(cfg, data_dir, resuming=resume is not None))
    distributed.run_on_main(lambda: check_writable(run_dir / "checkpoints"))
    if resume is not None and checkpoint is None and (run_dir / "metrics.jsonl").exists():
        # --resume auto with no valid checkpoint: the run restarts from step 0, a new branch
        distributed.run_on_main(lambda: record_resume(run_dir, 0, None, [], changes))
    return checkpoint, changes


def _assemble(cfg: RunConfig, data_dir: Path, tokenizer: Tokenizer, device: torch.device,
              checkpoint: Path | None, parent: Parent | None, config_changes: list[tuple[str, Any, Any]],
              extra_callbacks: dict[str, Callback] | None) -> Trainer:
    """Model, parallelism, optimizer, the family's batches and callbacks, the trainer (restored)."""
    rank, world_size = distributed.rank(), distributed.world_size()
    run_dir = run_path(cfg)
    seed_everything(cfg.train.seed)
    model_family = family_of(cfg.model)
    model = cfg.model.build().to(device)
    counts = model_family.count_parameters(cfg.model)
    flops = model_family.flops_per_token(cfg.model, cfg.train.seq_len)
    peak, peak_source = peak_flops(device)
    model = apply_parallelism(model, cfg.train, device, has_unused_parameters=cfg.model.moe is not None)
    # Built after wrapping: FSDP2 replaces parameters with sharded DTensors.
    optimizer = build_optimizer(model, cfg.optim)

    setup = RunSetup(cfg, data_dir, tokenizer, rank, world_size, replay_data_dir(cfg))
    parts = training_family(cfg.model.family).build(setup, model)
    if rank == 0:
        total = cfg.train.tokens_per_step * cfg.train.steps
        warn_repeats(planned_epochs(parts.batches.source_tokens(), parts.batches.weights(), total))
    callbacks = {**default_callbacks(), **parts.callbacks, **(extra_callbacks or {})}
    # The checkpoint saves every callback's state: it runs last, after all of them saw the step.
    callbacks["checkpoint"] = callbacks.pop("checkpoint")
    trainer = Trainer(cfg, model=model, optimizer=optimizer, batches=parts.batches, callbacks=callbacks,
                      run_dir=run_dir, data_dir=data_dir, tokenizer=tokenizer, device=device,
                      flops_per_token=flops, peak_flops=peak,
                      context_parallel=build_context_parallel(cfg.train, cfg.model, device))
    trainer.config_changes = config_changes
    trainer.eval_data_dirs = evaluation_data_dirs(cfg, data_dir, setup.replay_data_dir)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    elif parent is not None:
        initialise_from_parent(trainer, parent)
    if rank == 0:
        write_model_card(run_dir, cfg, counts, flops, device, peak, peak_source, trainer.tokens)
    log.info(
        "model: %s, %.2fM parameters (%.2fM active), %.2f MFLOPs/token; device %s%s",
        cfg.model.family, counts.total / 1e6, counts.active / 1e6, flops / 1e6, device,
        f"; {world_size} processes ({cfg.train.data_parallel})" if world_size > 1 else "",
    )
    if parts.description:
        log.info("%s", parts.description)
    return trainer


def train_run(cfg: RunConfig, resume: str | None = None,
              extra_callbacks: dict[str, Callback] | None = None) -> Path:
    """Assemble and train; returns the run directory. Leaves the process group however it ends."""
    try:
        return build_trainer(cfg, resume, extra_callbacks).fit()
    finally:
        distributed.shutdown()


def train_or_reuse(cfg: RunConfig, purpose: str) -> Path:
    """One run of an experiment (continual, model collapse, ...): reused when it finished earlier
    (its final evaluation exists), resumed when it was interrupted, else trained from the start."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    if (run_dir / "eval" / "final.json").is_file():
        log.info("%s finished earlier: reused", run_dir)
        return run_dir
    resume = "auto" if (run_dir / "metrics.jsonl").exists() else None
    budget = f", or fewer: time budget {cfg.train.time_budget_s:g} s" if cfg.train.time_budget_s else ""
    log.info("%s: run %s (%d steps%s)", purpose, cfg.name, cfg.train.steps, budget)
    return train_run(cfg, resume)
