"""Trainer extras as callbacks: throughput/MFU, metrics, progress, evaluation, checkpoints.

Each callback sees the trainer at fixed points and may keep state that is saved in
checkpoints (``state_dict`` / ``load_state_dict``), stored under the callback's name, so adding
or removing a callback never hands one callback another's state on resume. They run in the
order of their names in the dict, so the throughput monitor (which adds tokens/s and MFU to a
step's metrics) comes first; a model family replaces a default by reusing its name.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from lmforge.core.errors import CheckpointError
from lmforge.core.io import atomic_write_json
from lmforge.core.logging import RateProgress, get_logger
from lmforge.core.metrics_file import append_metrics
from lmforge.eval.suite import complete_evaluation, describe, format_interval, heldout_record_over

if TYPE_CHECKING:
    from lmforge.train.trainer import Trainer

log = get_logger(__name__)
# What an ``eval`` record keeps of each averaged weights' evaluation (eval/<kind>/final.json has all).
_AVERAGED_FIELDS = ("loss", "bpb", "bpb_interval", "first_step", "steps", "ema_decay")


class Callback:
    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None:
        """Called once after the last step of a run that finished."""

    def on_length_fixed(self, trainer: "Trainer") -> None:
        """Called once when ``train.time_budget_s`` fixed the run's length (``trainer.total_steps``)."""

    def close(self) -> None:
        """Release resources; called however the run ended (also on errors)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _due(step: int, every: int, last_step: int) -> bool:
    return step == last_step or (every > 0 and step % every == 0)


class ThroughputMonitor(Callback):
    """Adds tokens/s and MFU (model FLOPs / peak FLOP/s of the device) to each step."""

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        seconds = max(metrics["step_time_s"], 1e-9)
        tokens_per_s = trainer.cfg.train.tokens_per_step / seconds  # global tokens
        metrics["tokens_per_s"] = tokens_per_s
        peak = trainer.peak_flops
        metrics["mfu"] = tokens_per_s * trainer.flops_per_token / peak if peak else 0.0


class MetricsLogger(Callback):
    """Writes train records to ``metrics.jsonl`` and TensorBoard every ``log_every`` steps."""

    def __init__(self) -> None:
        self.writer: Any = None

    def on_train_start(self, trainer: "Trainer") -> None:
        if trainer.cfg.train.tensorboard and trainer.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops TensorBoard events past the resume point (they are redone).
            self.writer = SummaryWriter(str(trainer.run_dir / "tensorboard"), purge_step=trainer.step + 1)

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        if not trainer.is_main or not _due(trainer.step, trainer.cfg.train.log_every, trainer.total_steps):
            return
        record = {"kind": "train", **metrics, "epochs": trainer.batches.epochs_consumed()}
        drawn = trainer.batches.tokens_drawn()
        if drawn:  # the mixture as drawn, beside the requested one (data/replay.py)
            record["tokens_drawn"] = drawn
        append_metrics(trainer.run_dir / "metrics.jsonl", record)
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"train/{key}", value, trainer.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressBar(Callback):
    def __init__(self) -> None:
        self.bar: RateProgress | None = None

    def on_train_start(self, trainer: "Trainer") -> None:
        if not trainer.is_main:
            return
        self.bar = RateProgress(f"train {trainer.cfg.name}", trainer.total_steps, unit="tokens")
        self.bar.progress.update(self.bar.task, completed=trainer.step)
        self.bar.__enter__()

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.advance(1, units=trainer.cfg.train.tokens_per_step,
                         loss=f"{metrics['loss']:.3f}")

    def on_length_fixed(self, trainer: "Trainer") -> None:
        if self.bar is not None:
            self.bar.set_total(trainer.total_steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__()
            self.bar = None


class HeldoutEvaluator(Callback):
    """Held-out loss and bits-per-byte per domain every ``eval_every`` steps and at the end.

    At the end it also samples text and writes ``eval/final.json`` with the isolation check.
    A run continued from a parent (``init.path``) is also evaluated before its first step, and
    every later record carries ``change_from_parent`` per domain (forgetting: a rise on the old
    domains; adaptation: a fall on the new); the parent's own data, if elsewhere, is evaluated
    too, as ``parent/<domain>``. Averaged weights (``train.weight_averaging``) are evaluated beside
    the raw ones: the record gains ``averaged: {ema: {...}, window: {...}}`` (its other fields stay
    those of the raw weights) and the end writes ``eval/<ema|window>/final.json`` too.
    """

    def __init__(self) -> None:
        self.initial_bpb: dict[str, float] | None = None  # bits-per-byte at the start of a continued run
        self.averaged: dict[str, dict[str, Any]] = {}  # the averaged weights' held-out records, last evaluation

    @staticmethod
    def _takes_part(trainer: "Trainer") -> bool:
        return trainer.is_main or trainer.eval_on_all_ranks

    def _evaluate(self, trainer: "Trainer") -> dict[str, Any]:
        record = {"kind": "eval", "step": trainer.step, "tokens": trainer.tokens,
                  **heldout_record_over(trainer.eval_model, trainer.eval_data_dirs, trainer.cfg.train.seq_len,
                                        trainer.cfg.eval, trainer.device, trainer.cfg.train.precision)}
        if self.initial_bpb is not None:
            record["change_from_parent"] = {d: v - self.initial_bpb[d] for d, v in record["bpb"].items()
                                            if d in self.initial_bpb}
        self.averaged = self._evaluate_averages(trainer)
        if self.averaged:
            record["averaged"] = {kind: {k: v for k, v in result.items() if k in _AVERAGED_FIELDS}
                                  for kind, result in self.averaged.items()}
        if not trainer.is_main:
            return record
        append_metrics(trainer.run_dir / "metrics.jsonl", record)
        bpb = ", ".join(f"{k} {v:.3f} [{format_interval(record, k)}]" for k, v in record["bpb"].items())
        log.info("step %d held-out bits-per-byte: %s", trainer.step, bpb)
        for kind, result in self.averaged.items():
            log.info("step %d held-out bits-per-byte, %s weights (steps %d-%d): %s", trainer.step, kind,
                     result["first_step"], trainer.step, ", ".join(f"{k} {v:.3f}" for k, v in result["bpb"].items()))
        if "change_from_parent" in record:
            log.info("step %d change from the parent: %s", trainer.step,
                     ", ".join(f"{d} {v:+.3f}" for d, v in record["change_from_parent"].items()))
        return record

    @staticmethod
    def _evaluate_averages(trainer: "Trainer") -> dict[str, dict[str, Any]]:
        """Held-out records of the averaged weights the run keeps at this step (train/averaging.py)."""
        averaging = trainer.callbacks.get("weight_averaging")
        if averaging is None or not hasattr(averaging, "evaluate"):
            return {}
        return averaging.evaluate(trainer, lambda: heldout_record_over(
            trainer.eval_model, trainer.eval_data_dirs, trainer.cfg.train.seq_len, trainer.cfg.eval,
            trainer.device, trainer.cfg.train.precision))

    def on_train_start(self, trainer: "Trainer") -> None:
        if trainer.parent is not None and self.initial_bpb is None and self._takes_part(trainer):
            self.initial_bpb = self._evaluate(trainer)["bpb"]

    def state_dict(self) -> dict[str, Any]:
        return {"initial_bpb": self.initial_bpb} if self.initial_bpb is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_bpb = state.get("initial_bpb")

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        every = trainer.cfg.train.eval_every
        if self._takes_part(trainer) and every > 0 and trainer.step % every == 0 and trainer.step != trainer.total_steps:
            self._evaluate(trainer)

    def on_train_end(self, trainer: "Trainer") -> None:
        if not self._takes_part(trainer):
            return
        record = complete_evaluation(self._evaluate(trainer), trainer.eval_model, trainer.tokenizer,
                                     trainer.data_dir, trainer.cfg.eval)
        if trainer.is_main:
            for line in describe(record)[1 + len(record["bpb"]):]:
                log.info("%s", line)
            atomic_write_json(trainer.run_dir / "eval" / "final.json", record)
        averaging = trainer.callbacks.get("weight_averaging")
        for kind, heldout in self.averaged.items():
            final = {"kind": "eval", "weights": kind, "step": trainer.step, "tokens": trainer.tokens, **heldout}
            with averaging.weights_in_model(trainer, kind):  # type: ignore[union-attr]
                complete_evaluation(final, trainer.eval_model, trainer.tokenizer, trainer.data_dir, trainer.cfg.eval)
            if trainer.is_main:
                atomic_write_json(trainer.run_dir / "eval" / kind / "final.json", final)
                log.info("%s weights: evaluation written to %s", kind, trainer.run_dir / "eval" / kind / "final.json")


class Checkpointer(Callback):
    """Saves a full training checkpoint every ``checkpoint_every`` steps and at the end.

    Collective (every rank takes part; rank 0 writes). Each save is logged as a
    ``checkpoint`` record with its duration. A failed periodic save (disk full, I/O error)
    is logged and training goes on — the previous checkpoints are untouched and the next
    save tries again; a failed final save is an error.
    """

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        if not _due(trainer.step, trainer.cfg.train.checkpoint_every, trainer.total_steps):
            return
        start = time.perf_counter()
        record: dict[str, Any] = {"kind": "checkpoint", "step": trainer.step}
        try:
            path = trainer.save_checkpoint()
        except CheckpointError as exc:
            if trainer.step == trainer.total_steps:
                raise
            log.error("%s", exc)
            record["error"] = str(exc)
        else:
            record["path"] = str(path)
        record["seconds"] = time.perf_counter() - start
        if trainer.is_main:
            append_metrics(trainer.run_dir / "metrics.jsonl", record)


def default_callbacks() -> dict[str, Callback]:
    # weight_averaging (a no-op unless train.weight_averaging is set) updates the averages before
    # the evaluator and the checkpointer see the step, and adds its seconds to the logged metrics.
    from lmforge.train.averaging import WeightAveraging  # it derives from Callback, defined here

    return {"throughput": ThroughputMonitor(), "weight_averaging": WeightAveraging(), "metrics": MetricsLogger(),
            "progress": ProgressBar(), "checkpoint": Checkpointer(), "heldout_eval": HeldoutEvaluator()}
