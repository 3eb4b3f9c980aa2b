"""The training loop: data → model → loss → optimizer step, with callbacks for the rest.

Exact resume: every source of change between steps is checkpoint state — weights,
optimizer, data-loader position (batch index; batches are a pure function of seed and
index), RNG states and step. On CPU a resumed run therefore reproduces the losses of an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.core import distributed
from lmforge.core.device import autocast_context, resolve_device
from lmforge.core.errors import CheckpointError
from lmforge.core.checkpoint_files import latest_valid_checkpoint
from lmforge.core.logging import get_logger
from lmforge.core.seeding import rng_state, seed_everything, set_rng_state
from lmforge.data.loader import MixtureLoader
from lmforge.data.prepare import prepare_data
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.isolation import require_isolation
from lmforge.nn.counting import count_parameters, flops_per_token
from lmforge.optim.optimizers import build_optimizer, set_learning_rate
from lmforge.optim.schedules import lr_multiplier
from lmforge.parallel.apply import apply_parallelism
from lmforge.train.callbacks import Callback, default_callbacks
from lmforge.train.checkpoint import load_training_checkpoint
from lmforge.train.config import RunConfig
from lmforge.train.model_card import write_model_card
from lmforge.train.run_dir import init_run_dir
from lmforge.train.throughput import peak_flops

log = get_logger(__name__)
_CRASH_AT_STEP = int(os.environ.get("LMFORGE_CRASH_AT_STEP", "-1"))


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None, callbacks: list[Callback] | None = None):
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.data_dir = Path(cfg.data.out_dir)
        prepare_data(cfg.data)
        require_isolation(self.data_dir)
        self.tokenizer = Tokenizer.load(self.data_dir / "tokenizer.json")
        if cfg.model.vocab_size != self.tokenizer.vocab_size:
            # The tokenizer, trained on this data, decides the vocabulary; the resolved
            # config written to the run directory records the value actually used.
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.tokenizer.vocab_size))
        self.cfg = cfg
        self.total_steps = cfg.train.steps
        self.device = resolve_device(cfg.train.device)

        checkpoint = self._find_checkpoint(resume)
        self.run_dir = init_run_dir(cfg, self.data_dir, resuming=resume is not None)

        seed_everything(cfg.train.seed)
        model = cfg.model.build().to(self.device)
        counts = count_parameters(cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak_flops, peak_source = peak_flops(self.device)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.loader = MixtureLoader(
            self.data_dir, cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed,
            weights={s.name: s.weight for s in cfg.data.sources},
            rank=self.rank, world_size=self.world_size,
        )
        self.step, self.tokens = 0, 0
        self.callbacks = callbacks if callbacks is not None else default_callbacks()
        if checkpoint is not None:
            self._restore(checkpoint, model)
        self.model = apply_parallelism(model, cfg.train, self.device)
        if self.is_main:
            write_model_card(self.run_dir, cfg, counts, self.flops_per_token, self.device,
                             self.peak_flops, peak_source, self.tokens)
        log.info(
            "model: %.2fM parameters (%.2fM active), %.2f MFLOPs/token; device %s",
            counts.total / 1e6, counts.active / 1e6, self.flops_per_token / 1e6, self.device,
        )

    def _find_checkpoint(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        if resume == "auto":
            found = latest_valid_checkpoint(Path(self.cfg.runs_dir) / self.cfg.name / "checkpoints")
            if found is None:
                log.info("--resume auto: no checkpoint yet, starting from step 0")
            return found
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"--resume {resume}: no such checkpoint")
        return path

    def _restore(self, checkpoint: Path, model: torch.nn.Module) -> None:
        state = load_training_checkpoint(checkpoint, model, self.optimizer)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        for callback, cb_state in zip(self.callbacks, state.get("callbacks", [])):
            callback.load_state_dict(cb_state)
        log.info("resumed from %s at step %d", checkpoint, self.step)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
        }

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg.train
        multiplier = lr_multiplier(self.step, self.total_steps, self.cfg.optim)
        set_learning_rate(self.optimizer, multiplier)
        start = time.perf_counter()
        loss_sum, aux_sum = 0.0, 0.0
        moe_metrics: dict[str, Any] = {}
        for _ in range(cfg.grad_accum_steps):
            inputs, targets = self.loader.next_batch()
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with autocast_context(self.device, cfg.precision):
                out = self.model(inputs, targets)
            # Average over micro-batches so accumulation matches one large batch.
            ((out.loss + out.aux_loss) / cfg.grad_accum_steps).backward()
            loss_sum += out.loss.item()
            aux_sum += out.aux_loss.item()
            moe_metrics = out.moe_metrics
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += cfg.tokens_per_step * self.world_size
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss_sum / cfg.grad_accum_steps,
            "aux_loss": aux_sum / cfg.grad_accum_steps,
            "lr": self.cfg.optim.lr * multiplier,
            "grad_norm": float(grad_norm),
            "step_time_s": time.perf_counter() - start,
            **moe_metrics,
        }

    def fit(self) -> Path:
        for callback in self.callbacks:
            callback.on_train_start(self)
        self.model.train()
        try:
            while self.step < self.total_steps:
                metrics = self.train_step()
                for callback in self.callbacks:
                    callback.on_step_end(self, metrics)
                if self.step == _CRASH_AT_STEP:
                    # Fault injection for the kill-and-resume tests: a real SIGKILL, no cleanup.
                    os.kill(os.getpid(), signal.SIGKILL)
            for callback in self.callbacks:
                callback.on_train_end(self)
        finally:
            for callback in self.callbacks:
                callback.close()
        return self.run_dir
