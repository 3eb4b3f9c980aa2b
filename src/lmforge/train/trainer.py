"""The training loop: data → model → loss → optimizer step, with callbacks for the rest.

The trainer receives parts already built — model (wrapped for parallelism), optimizer, batch
stream, callbacks keyed by name — from :func:`lmforge.train.assembly.build_trainer`, and only
runs the loop, checkpoints, rollbacks and preemption. It does not know the model family.

Exact resume: every source of change between steps is checkpoint state — weights,
optimizer, data-loader position (batch index; batches are a pure function of seed and
index), RNG states, stability-guard window, callback state (by name) and step. On CPU a
resumed run therefore reproduces the losses of an uninterrupted one bit for bit.

Multi-process: under ``torchrun`` each rank takes its slice of the same global batch
(``train.batch_size`` rows per micro-step across all ranks), the model is wrapped with DDP
or FSDP2, logged losses are averaged over ranks, and only rank 0 writes files. A run
saved at one world size resumes at another with the same global batch stream. With
``train.context_parallel`` the ranks of a group share rows and each runs its share of every
sequence in training steps (:mod:`lmforge.parallel.context`); evaluation runs whole sequences.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.core import distributed
from lmforge.core.device import autocast_context
from lmforge.core.errors import CheckpointError
from lmforge.core.io import atomic_write_json
from lmforge.core.logging import get_logger
from lmforge.core.run_lock import RunLock
from lmforge.core.seeding import rng_state, set_rng_state
from lmforge.data.tokenizer import Tokenizer
from lmforge.optim.optimizers import reapply_config_hyperparameters, set_learning_rate
from lmforge.optim.schedules import lr_multiplier
from lmforge.parallel.context import ContextParallel, TorchContextParallel
from lmforge.train import faults
from lmforge.train.callbacks import Callback
from lmforge.train.checkpoint import load_training_checkpoint, save_training_checkpoint, unwrap
from lmforge.train.config import RunConfig
from lmforge.train.guard import StabilityGuard
from lmforge.train.branches import start_branch
from lmforge.train.signals import PreemptionHandler, Preempted
from lmforge.train.time_budget import BudgetDecision, TimeBudget

if TYPE_CHECKING:
    from lmforge.train.families import ModelBatches

log = get_logger(__name__)


class Trainer:
    def __init__(self, cfg: RunConfig, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 batches: "ModelBatches", callbacks: dict[str, Callback], run_dir: Path, data_dir: Path,
                 tokenizer: Tokenizer, device: torch.device, flops_per_token: int, peak_flops: float | None,
                 context_parallel: ContextParallel | TorchContextParallel | None = None):
        self.cfg, self.model, self.optimizer, self.batches = cfg, model, optimizer, batches
        self.callbacks = callbacks
        self.run_dir, self.data_dir, self.tokenizer, self.device = run_dir, data_dir, tokenizer, device
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        # Each sequence split over a group of ranks (train.context_parallel); only training steps use it.
        self.context_parallel = context_parallel
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.total_steps = cfg.train.steps  # train.time_budget_s may shorten it once, early (train/time_budget.py)
        self.time_budget = TimeBudget(cfg.train.time_budget_s, cfg.train.time_budget_calibration_steps,
                                      cfg.train.steps)
        self.guard = StabilityGuard(cfg.train.guard)
        self.step, self.tokens = 0, 0
        self.last_checkpoint: Path | None = None
        self.run_lock: RunLock | None = None  # set by the assembly on rank 0: released when fit() ends
        # Settings the resolved config changed since the run last wrote its config (set by the
        # assembly when resuming), recorded with the optimizer's own in the resume record.
        self.config_changes: list[tuple[str, Any, Any]] = []
        self.eval_data_dirs: dict[str, Path] = {"": data_dir}  # prefix → data evaluated (train/continuation.py)
        self.parent: Any = None  # the checked parent checkpoint of a continued run (train/init_from.py)

    # ---- evaluation target -------------------------------------------------------------
    @property
    def eval_on_all_ranks(self) -> bool:
        """FSDP2 forward passes are collective: every rank must take part in evaluation."""
        return distributed.is_distributed() and self.cfg.train.data_parallel == "fsdp"

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.model if self.eval_on_all_ranks else unwrap(self.model)

    # ---- checkpoints -------------------------------------------------------------------
    def restore(self, checkpoint: Path, keep_data_position: bool = False, branch: bool = True) -> None:
        """Continue from ``checkpoint``: a resume (``branch``: the run's history after it is set aside),
        a guard rollback (``keep_data_position``), or a new run taking a parent's whole trainer state
        (``branch=False``: ``init.trainer_state``, the parent's files are only read)."""
        state = load_training_checkpoint(checkpoint, self.model, self.optimizer)
        # Loading brings back the checkpoint's LR, betas, ...: the resolved config wins (also
        # after a guard rollback, whose checkpoint may predate a changed LR).
        changes = reapply_config_hyperparameters(self.optimizer, self.cfg.optim)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        if not keep_data_position:
            self.batches.load_state_dict(state["loader"])
            self.guard.load_state_dict(state.get("guard", {}))
            self._load_callback_states(state.get("callbacks", {}))
            # a resume keeps the length its run decided; a new run (branch=False) decides its own,
            # for the steps it takes itself
            decision = self.time_budget.load_state_dict(state.get("time_budget", {}) if branch else {})
            if not branch:
                self.time_budget.start_step = self.step
            self.total_steps = decision.total_steps if decision is not None else self.cfg.train.steps
            if branch:
                distributed.run_on_main(lambda: self._record_budget_decision(decision))
        set_rng_state(state["rng"])
        self.last_checkpoint = checkpoint
        log.info("%s %s at step %d", "resumed from" if branch else "took the trainer state of", checkpoint, self.step)
        if not branch:
            self.last_checkpoint = None  # the parent's checkpoint is not this run's to roll back to
        elif not keep_data_position:  # a resume, not a guard rollback: a new branch starts here
            # one entry per setting: the optimizer's own view (checkpoint vs config) wins
            merged = list({field: (field, old, new) for field, old, new in [*self.config_changes, *changes]}.values())
            own = distributed.run_on_main(lambda: start_branch(self.run_dir, checkpoint, self.step, merged))
            self.last_checkpoint = distributed.broadcast_object(own)  # type: ignore[assignment]

    def _load_callback_states(self, saved: dict[str, Any] | list[dict[str, Any]]) -> None:
        if isinstance(saved, list):
            # Checkpoints written before callbacks had names (up to commit cdee255) stored a list in
            # the order of the defaults; none of those callbacks kept state.
            if any(saved):
                log.warning("this checkpoint's callback states are unnamed (older lmforge); they are not restored")
            return
        for name, callback in self.callbacks.items():
            if name in saved:
                callback.load_state_dict(saved[name])
        for name in sorted(set(saved) - set(self.callbacks)):
            if saved[name]:
                log.warning("checkpoint holds state of callback %r, which this run does not use", name)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.batches.state_dict(),
            "rng": rng_state(),
            "guard": self.guard.state_dict(),
            "callbacks": {name: cb.state_dict() for name, cb in self.callbacks.items()},
            "time_budget": self.time_budget.state_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        """Collective; returns the checkpoint path (on rank 0)."""
        path = save_training_checkpoint(
            self.run_dir / "checkpoints", self.step, self.model, self.optimizer,
            self.trainer_state(), self.cfg.to_yaml(), self.data_dir / "tokenizer.json",
            self.cfg.train.keep_checkpoints,
        )
        self.last_checkpoint = distributed.broadcast_object(path)  # type: ignore[assignment]
        return path

    # ---- one step ----------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(inputs, targets, extra model kwargs such as retrieved neighbours) on the device."""
        inputs, targets, extra = self.batches.next_batch()
        return inputs.to(self.device), targets.to(self.device), {k: v.to(self.device) for k, v in extra.items()}

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg.train
        multiplier = lr_multiplier(self.step, self.total_steps, self.cfg.optim)
        set_learning_rate(self.optimizer, multiplier)
        start = time.perf_counter()
        loss_sum, aux_sum = 0.0, 0.0
        moe_metrics: dict[str, Any] = {}
        factor = faults.loss_factor(self.step + 1)
        for _ in range(cfg.grad_accum_steps):
            inputs, targets, extra = self.next_batch()
            with self._sequence_split(inputs, targets) as shard:  # forward and backward inside
                with autocast_context(self.device, cfg.precision):
                    out = self.model(inputs, targets, **extra, **shard)
                loss = out.loss * factor if factor != 1.0 else out.loss
                # Average over micro-batches so accumulation matches one large batch.
                ((loss + out.aux_loss) / cfg.grad_accum_steps).backward()
            loss_sum += loss.item()
            aux_sum += out.aux_loss.item()
            moe_metrics = out.moe_metrics
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        # Ranks agree on the logged loss and on every decision: one small all-reduce.
        loss_mean, aux_mean = distributed.all_reduce(
            [loss_sum / cfg.grad_accum_steps, aux_sum / cfg.grad_accum_steps], "mean", self._collective_device)
        skipped = self.guard.check(loss_mean, float(grad_norm))
        if skipped is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += cfg.tokens_per_step
        metrics = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss_mean,
            "aux_loss": aux_mean,
            "lr": self.cfg.optim.lr * multiplier,
            "grad_norm": float(grad_norm),
            "step_time_s": time.perf_counter() - start,
            **moe_metrics,
            **self.guard.counts,
        }
        if skipped is not None:
            metrics["skipped"] = skipped
            log.warning("step %d skipped: %s loss %.4g, grad norm %.4g", self.step, skipped, loss_mean, float(grad_norm))
        return metrics

    def _sequence_split(self, inputs: torch.Tensor, targets: torch.Tensor) -> contextlib.AbstractContextManager:
        """Context parallelism's micro-step (yields the model's ``sequence_shard`` argument), else nothing."""
        if self.context_parallel is None:
            return contextlib.nullcontext({})
        return self.context_parallel.micro_step(inputs, targets)

    @property
    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _rollback(self) -> None:
        guard = self.guard
        if guard.counts["rollbacks"] >= self.cfg.train.guard.max_rollbacks:
            raise CheckpointError(f"stability guard: {guard.counts['rollbacks']} rollbacks already; "
                                  "the run keeps diverging — lower the learning rate or inspect the data")
        if self.last_checkpoint is None:
            log.warning("stability guard: no checkpoint to roll back to yet; the step was skipped only")
            return
        guard.counts["rollbacks"] += 1
        counts = dict(guard.counts)
        log.warning("stability guard: rolling back to %s; the data loader keeps its position", self.last_checkpoint)
        self.restore(self.last_checkpoint, keep_data_position=True)
        guard.counts.update(counts)

    # ---- the loop ----------------------------------------------------------------------
    def fit(self) -> Path:
        """Train to ``train.steps``; returns the run directory. However it ends, signal handlers are
        restored, every callback is closed and the run directory's lock is released."""
        try:
            preemption = PreemptionHandler().install()
            try:
                self._loop(preemption)
            finally:
                preemption.restore()
                for name, callback in self.callbacks.items():
                    try:
                        callback.close()
                    except Exception:  # one failing close must not keep the others (or the lock) open
                        log.exception("callback %r failed to close", name)
        finally:
            if self.run_lock is not None:
                self.run_lock.release()
        return self.run_dir

    def _loop(self, preemption: PreemptionHandler) -> None:
        budget = self.time_budget
        if budget.pending and budget.start_step + budget.calibration_steps >= self.total_steps:
            log.warning("train.time_budget_s is not applied: train.time_budget_calibration_steps (%d) leaves no "
                        "step of train.steps (%d) to shorten", budget.calibration_steps, self.total_steps)
        for callback in self.callbacks.values():
            callback.on_train_start(self)
        self.model.train()
        while self.step < self.total_steps:
            metrics = self.train_step()
            if self.time_budget.pending:
                self._fix_length_to_budget(metrics["step_time_s"])
            for callback in self.callbacks.values():
                callback.on_step_end(self, metrics)
            faults.maybe_crash(self.step)
            if "skipped" in metrics and self.cfg.train.guard.rollback:
                self._rollback()
            (signum,) = distributed.all_reduce([float(preemption.signum or 0)], "max", self._collective_device)
            if signum:
                self._stop_for_preemption(int(signum))
        for callback in self.callbacks.values():
            callback.on_train_end(self)
        distributed.barrier()  # rank 0 may still be evaluating; leave together

    def _fix_length_to_budget(self, step_time_s: float) -> None:
        """``train.time_budget_s``: once enough steps are timed, fix the run's length (rank 0's timing
        decides for every rank) and record it in ``time_budget.json``."""
        decision = self.time_budget.observe(self.step, step_time_s, self.cfg.optim)
        if decision is None:
            return
        decision = distributed.broadcast_object(decision)  # type: ignore[assignment]
        assert isinstance(decision, BudgetDecision)
        self.time_budget.decision = decision
        self.total_steps = decision.total_steps
        log.info("%s", decision.describe())
        if self.is_main:
            self._record_budget_decision(decision)
        for callback in self.callbacks.values():
            callback.on_length_fixed(self)

    def _record_budget_decision(self, decision: BudgetDecision | None) -> None:
        """``time_budget.json``: the decision the run follows (a resume may have lowered its length),
        or, when it follows none (a budget removed or changed since), no file."""
        path = self.run_dir / "time_budget.json"
        if decision is not None:
            atomic_write_json(path, decision.to_dict())
        elif path.is_file():
            path.unlink()

    def _stop_for_preemption(self, signum: int) -> None:
        saved = (self.last_checkpoint is not None and self.last_checkpoint.name.endswith(f"{self.step:07d}")
                 and self.last_checkpoint.parent.resolve() == (self.run_dir / "checkpoints").resolve())
        path = self.last_checkpoint if saved else self.save_checkpoint()
        raise Preempted(signum, self.step, str(path))
