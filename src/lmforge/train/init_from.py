"""Start a run from another run: ``lmforge train CONFIG --init-from RUN_OR_CHECKPOINT``.

A continued run is a new run (its own name, schedule, step count and data) whose weights start
from a parent's checkpoint. What it takes from the parent (``init:`` in the run config):

- ``path``: the parent run directory (its newest valid checkpoint) or a checkpoint directory;
- ``optimizer``: also the optimizer's moments (the resolved config's hyperparameters still win);
- ``trainer_state``: also the step count, data-loader position, RNG states, guard and callback
  state — a *branch* of the parent at that step, e.g. a WSD cooldown started from a stable-phase
  checkpoint, which then reproduces bit for bit the cooldown of an uninterrupted run that decays
  at that step (implies ``optimizer``).

Everything is checked before the run directory is touched: the checkpoint's checksums, that its
model config matches this run's in every field that shapes the weights (the error names the
field), and that the data is tokenized with the parent's tokenizer. The lineage — parent run,
checkpoint path and its manifest's sha256, the parent's step and data-manifest fingerprint, and
the parent's own lineage — is written to ``lineage.json`` in the run directory.

``--resume`` keeps its meaning: a continued run killed and resumed continues from its own
checkpoint, and ``init`` only decides how step 0 of the run is filled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.core import distributed
from lmforge.core.checkpoint_files import safe_torch_load, verify_checkpoint_dir
from lmforge.core.config import Config
from lmforge.core.errors import CheckpointError, ConfigError
from lmforge.core.io import atomic_write_json
from lmforge.core.logging import get_logger
from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.families import model_config_from_dict
from lmforge.nn.loading import checkpoint_config, resolve_checkpoint

log = get_logger(__name__)
LINEAGE_FILE = "lineage.json"
# Model settings a continued run may change: none of them shapes a weight. max_seq_len,
# rope_theta and rope_scaling are how a context-extension stage differs from its parent; the
# loss weights and the initialisation scale do not touch trained weights.
CHANGEABLE_MODEL_FIELDS = frozenset({
    "max_seq_len", "rope_theta", "norm_eps", "init_std", "moe.load_balance_weight", "moe.z_loss_weight",
    "rope_scaling", "rope_scaling.kind", "rope_scaling.factor", "rope_scaling.original_max_seq_len",
    "rope_scaling.beta_fast", "rope_scaling.beta_slow", "rope_scaling.attention_factor",
    # which keys a query sees (masks, windows, local RoPE base): no weight depends on them
    "attention.document_mask", "attention.restart_positions", "attention.sliding_window",
    "attention.global_every", "attention.rope_theta_local",
})


@dataclass
class InitConfig(Config):
    path: str | None = None          # parent run directory or checkpoint; None: random initialisation
    optimizer: bool = False          # also take the parent's optimizer state
    trainer_state: bool = False      # also step, data position, RNG, callbacks: a branch of the parent

    def __post_init__(self) -> None:
        if self.path is None and (self.optimizer or self.trainer_state):
            raise ValueError("optimizer and trainer_state take state from a parent: set init.path (--init-from)")
        if self.trainer_state:
            self.optimizer = True


@dataclass
class Parent:
    """The checked parent checkpoint of a continued run."""
    checkpoint: Path
    config: dict[str, Any]
    manifest_sha256: str
    step: int
    lineage: dict[str, Any]


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: value}


def model_differences(parent_model: dict[str, Any], model: Any) -> list[tuple[str, Any, Any]]:
    """``(field, parent's value, this run's value)`` for every model setting that differs, both
    parsed by the family's config class (so defaults added since the parent count as equal)."""
    parent = _flatten("", model_config_from_dict(parent_model).to_dict())
    ours = _flatten("", model.to_dict())
    return [(key, parent.get(key), ours.get(key)) for key in sorted(set(parent) | set(ours))
            if parent.get(key) != ours.get(key)]


def _parent_run_dir(checkpoint: Path) -> Path | None:
    run_dir = checkpoint.parent.parent
    return run_dir if (run_dir / "config.yaml").is_file() else None


def check_parent(cfg: Any, tokenizer: Tokenizer) -> Parent | None:
    """The parent checkpoint ``cfg.init.path`` names, verified against this run (rank 0 reads,
    every rank gets the result or the same error). None when the run starts from scratch."""
    if cfg.init.path is None:
        return None
    parent, error = None, None
    if distributed.is_main_process():
        try:
            parent = _read_parent(cfg, tokenizer)
        except (CheckpointError, ConfigError) as exc:
            error = exc
    error = distributed.broadcast_object(error)
    if error is not None:
        raise error
    return distributed.broadcast_object(parent)  # type: ignore[return-value]


def _read_parent(cfg: Any, tokenizer: Tokenizer) -> Parent:
    where = f"init.path {cfg.init.path!r}"
    if not Path(cfg.init.path).exists():
        raise CheckpointError(f"{where}: no such run or checkpoint")
    try:
        checkpoint = resolve_checkpoint(cfg.init.path)
        verify_checkpoint_dir(checkpoint)  # checksums of every file
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    try:
        config = checkpoint_config(checkpoint)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    parent_tokenizer = Tokenizer.load(checkpoint / "tokenizer.json")
    if parent_tokenizer.sha256 != tokenizer.sha256:
        raise ConfigError(f"{where}: the parent was trained with another tokenizer (sha256 "
                          f"{parent_tokenizer.sha256[:12]}) than this run's data {cfg.data.out_dir} "
                          f"({tokenizer.sha256[:12]}); prepare the new data with the parent's tokenizer "
                          f"(data.tokenizer_from: {cfg.init.path})")
    fixed = [(f, old, new) for f, old, new in model_differences(config["model"], cfg.model)
             if f not in CHANGEABLE_MODEL_FIELDS]
    if fixed:
        shown = "; ".join(f"model.{f}: parent {old!r}, this run {new!r}" for f, old, new in fixed)
        raise ConfigError(f"{where}: the parent's model differs in settings that shape its weights ({shown}); "
                          "a continued run keeps the parent's architecture and vocabulary")
    for field, old, new in model_differences(config["model"], cfg.model):
        log.warning("continuing with model.%s = %r (the parent had %r)", field, new, old)
    state_file = checkpoint / "trainer_state.pt"
    step = int(safe_torch_load(state_file)["step"]) if state_file.is_file() else 0
    if cfg.init.trainer_state and step >= cfg.train.steps:
        raise ConfigError(f"{where}: init.trainer_state continues the parent at step {step}, and train.steps "
                          f"({cfg.train.steps}) leaves nothing to train; set train.steps beyond it")
    run_dir = _parent_run_dir(checkpoint)
    lineage = {}
    if run_dir is not None and (run_dir / LINEAGE_FILE).is_file():
        lineage = json.loads((run_dir / LINEAGE_FILE).read_text())
    return Parent(checkpoint=checkpoint.absolute(), config=config,
                  manifest_sha256=hashlib.sha256((checkpoint / "manifest.json").read_bytes()).hexdigest(),
                  step=step, lineage=lineage)


def parent_data_fingerprint(parent: Parent) -> str | None:
    """The fingerprint of the data the parent was trained on (its run's data manifest)."""
    run_dir = _parent_run_dir(parent.checkpoint)
    manifest = run_dir / "data_manifest.json" if run_dir is not None else None
    if manifest is None or not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("fingerprint")


def write_lineage(run_dir: Path, cfg: Any, parent: Parent) -> dict[str, Any]:
    """``lineage.json``: where this run's weights came from, and the parent's own lineage."""
    parent_run = _parent_run_dir(parent.checkpoint)
    record = {
        "parent_run": None if parent_run is None else str(parent_run.absolute()),
        "parent_name": parent.config.get("name"),
        "checkpoint": str(parent.checkpoint),
        "checkpoint_manifest_sha256": parent.manifest_sha256,
        "parent_step": parent.step,
        "parent_data_fingerprint": parent_data_fingerprint(parent),
        "parent_data_dir": parent.config.get("data", {}).get("out_dir"),
        "took": ["weights"] + (["optimizer"] if cfg.init.optimizer else [])
                + (["trainer_state"] if cfg.init.trainer_state else []),
        "parent_lineage": parent.lineage or None,
    }
    from lmforge.train.continuation import heldout_seen_by_parent

    seen = heldout_seen_by_parent(Path(cfg.data.out_dir), cfg.init.path)
    if seen is not None:
        record["heldout_documents_seen_by_parent"] = seen
        if seen:
            log.warning("%d held-out documents of %s were training documents of the parent: its held-out "
                        "bits-per-byte on them measures memory, not adaptation", seen, cfg.data.out_dir)
    atomic_write_json(run_dir / LINEAGE_FILE, record)
    return record


def read_lineage(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def lineage_chain(lineage: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The ancestors of a run, parent first."""
    chain = []
    while lineage:
        chain.append(lineage)
        lineage = lineage.get("parent_lineage")
    return chain


def initialise_from_parent(trainer: Any, parent: Parent) -> None:
    """Fill the assembled trainer's step 0 from the parent: weights, and per ``init`` the optimizer
    state and the trainer state (collective)."""
    from lmforge.train.checkpoint import load_training_checkpoint

    init = trainer.cfg.init
    if init.trainer_state:
        trainer.restore(parent.checkpoint, branch=False)
    else:
        load_training_checkpoint(parent.checkpoint, trainer.model, trainer.optimizer if init.optimizer else None)
        if init.optimizer:
            from lmforge.optim.optimizers import reapply_config_hyperparameters

            reapply_config_hyperparameters(trainer.optimizer, trainer.cfg.optim)
    took = "weights" + (", optimizer" if init.optimizer else "") + (", trainer state" if init.trainer_state else "")
    log.info("initialised from %s (step %d): %s", parent.checkpoint, parent.step, took)
    trainer.parent = parent
