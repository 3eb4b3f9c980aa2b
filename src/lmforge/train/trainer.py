"""The training loop: data → model → loss → optimizer step, with callbacks for the rest.

Exact resume: every source of change between steps is checkpoint state — weights,
optimizer, data-loader position (batch index; batches are a pure function of seed and
index), RNG states, stability-guard window and step. On CPU a resumed run therefore
reproduces the losses of an uninterrupted one bit for bit.

Multi-process: under ``torchrun`` each rank takes its slice of the same global batch
(``train.batch_size`` rows per micro-step across all ranks), the model is wrapped with DDP
or FSDP2, logged losses are averaged over ranks, and only rank 0 writes files. A run
saved at one world size resumes at another with the same global batch stream.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.core import distributed
from lmforge.core.checkpoint_files import latest_valid_checkpoint
from lmforge.core.device import autocast_context, resolve_device
from lmforge.core.errors import CheckpointError, ConfigError
from lmforge.core.logging import get_logger
from lmforge.core.seeding import rng_state, seed_everything, set_rng_state
from lmforge.data.loader import MixtureLoader
from lmforge.data.mixture import planned_epochs, warn_repeats
from lmforge.data.prepare import prepare_data
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.isolation import require_isolation
from lmforge.nn.counting import count_parameters, flops_per_token
from lmforge.optim.optimizers import build_optimizer, set_learning_rate
from lmforge.optim.schedules import lr_multiplier
from lmforge.parallel.apply import apply_parallelism
from lmforge.train import faults
from lmforge.train.callbacks import Callback, default_callbacks
from lmforge.train.checkpoint import load_training_checkpoint, save_training_checkpoint, unwrap
from lmforge.train.config import RunConfig
from lmforge.train.guard import StabilityGuard
from lmforge.train.model_card import write_model_card
from lmforge.train.run_dir import init_run_dir, run_path
from lmforge.train.signals import PreemptionHandler, Preempted
from lmforge.train.throughput import peak_flops

log = get_logger(__name__)


def _device_for_rank(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and distributed.world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())
    return device


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None, callbacks: list[Callback] | None = None):
        self.device = _device_for_rank(cfg.train.device)
        distributed.init_distributed(self.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        if cfg.data.executor != "local":
            raise ConfigError("data.executor: training prepares data locally; run `lmforge data prepare` "
                              f"with executor {cfg.data.executor!r} first, then train with executor: local")
        if cfg.train.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) is the global batch and must be "
                              f"divisible by the number of processes ({self.world_size})")
        self.data_dir = Path(cfg.data.out_dir)
        distributed.run_on_main(lambda: prepare_data(cfg.data))
        require_isolation(self.data_dir)
        self.tokenizer = Tokenizer.load(self.data_dir / "tokenizer.json")
        if cfg.model.vocab_size != self.tokenizer.vocab_size:
            # The tokenizer, trained on this data, decides the vocabulary; the resolved
            # config written to the run directory records the value actually used.
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.tokenizer.vocab_size))
        self.cfg = cfg
        self.total_steps = cfg.train.steps

        checkpoint = self._find_checkpoint(resume)
        self.run_dir = run_path(cfg)
        distributed.run_on_main(lambda: init_run_dir(cfg, self.data_dir, resuming=resume is not None))

        seed_everything(cfg.train.seed)
        model = cfg.model.build().to(self.device)
        counts = count_parameters(cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak_flops, peak_source = peak_flops(self.device)
        self.model = apply_parallelism(model, cfg.train, self.device, has_unused_parameters=cfg.model.moe is not None)
        # Built after wrapping: FSDP2 replaces parameters with sharded DTensors.
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.loader = MixtureLoader(
            self.data_dir, cfg.train.seq_len, cfg.train.batch_size // self.world_size, cfg.train.seed,
            weights={s.name: s.weight for s in cfg.data.sources},
            rank=self.rank, world_size=self.world_size, temperature=cfg.data.mixture_temperature,
        )
        if self.is_main:
            total = cfg.train.tokens_per_step * cfg.train.steps
            warn_repeats(planned_epochs(self.loader.source_tokens(), self.loader.weights(), total))
        self.guard = StabilityGuard(cfg.train.guard)
        self.step, self.tokens = 0, 0
        self.last_checkpoint: Path | None = None
        self.callbacks = callbacks if callbacks is not None else default_callbacks()
        if checkpoint is not None:
            self._restore(checkpoint)
        if self.is_main:
            write_model_card(self.run_dir, cfg, counts, self.flops_per_token, self.device,
                             self.peak_flops, peak_source, self.tokens)
        log.info(
            "model: %.2fM parameters (%.2fM active), %.2f MFLOPs/token; device %s%s",
            counts.total / 1e6, counts.active / 1e6, self.flops_per_token / 1e6, self.device,
            f"; {self.world_size} processes ({cfg.train.data_parallel})" if self.world_size > 1 else "",
        )

    # ---- evaluation target -------------------------------------------------------------
    @property
    def eval_on_all_ranks(self) -> bool:
        """FSDP2 forward passes are collective: every rank must take part in evaluation."""
        return distributed.is_distributed() and self.cfg.train.data_parallel == "fsdp"

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.model if self.eval_on_all_ranks else unwrap(self.model)

    # ---- checkpoints -------------------------------------------------------------------
    def _find_checkpoint(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        if resume == "auto":
            found = None
            if self.is_main:
                found = latest_valid_checkpoint(run_path(self.cfg) / "checkpoints")
                if found is None:
                    log.info("--resume auto: no valid checkpoint yet, starting from step 0")
            return distributed.broadcast_object(found)  # type: ignore[return-value]
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"--resume {resume}: no such checkpoint")
        return path

    def _restore(self, checkpoint: Path, keep_data_position: bool = False) -> None:
        state = load_training_checkpoint(checkpoint, self.model, self.optimizer)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        if not keep_data_position:
            self.loader.load_state_dict(state["loader"])
            self.guard.load_state_dict(state.get("guard", {}))
            for callback, cb_state in zip(self.callbacks, state.get("callbacks", [])):
                callback.load_state_dict(cb_state)
        set_rng_state(state["rng"])
        self.last_checkpoint = checkpoint
        log.info("resumed from %s at step %d", checkpoint, self.step)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "guard": self.guard.state_dict(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
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
        """(inputs, targets, extra model kwargs) on the device. Subclasses that feed the model
        more than tokens (e.g. retrieved neighbours) override this; whatever they read must be
        a pure function of the loader position so resume stays exact."""
        inputs, targets = self.loader.next_batch()
        return inputs.to(self.device), targets.to(self.device), {}

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
            with autocast_context(self.device, cfg.precision):
                out = self.model(inputs, targets, **extra)
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
        self._restore(self.last_checkpoint, keep_data_position=True)
        guard.counts.update(counts)

    # ---- the loop ----------------------------------------------------------------------
    def fit(self) -> Path:
        preemption = PreemptionHandler().install()
        for callback in self.callbacks:
            callback.on_train_start(self)
        self.model.train()
        try:
            while self.step < self.total_steps:
                metrics = self.train_step()
                for callback in self.callbacks:
                    callback.on_step_end(self, metrics)
                faults.maybe_crash(self.step)
                if "skipped" in metrics and self.cfg.train.guard.rollback:
                    self._rollback()
                (signum,) = distributed.all_reduce([float(preemption.signum or 0)], "max", self._collective_device)
                if signum:
                    self._stop_for_preemption(int(signum))
            for callback in self.callbacks:
                callback.on_train_end(self)
            distributed.barrier()  # rank 0 may still be evaluating; leave together
        finally:
            preemption.restore()
            for callback in self.callbacks:
                callback.close()
        return self.run_dir

    def _stop_for_preemption(self, signum: int) -> None:
        saved = self.last_checkpoint is not None and self.last_checkpoint.name.endswith(f"{self.step:07d}")
        path = self.last_checkpoint if saved else self.save_checkpoint()
        raise Preempted(signum, self.step, str(path))
