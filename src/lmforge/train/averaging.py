"""Weight averaging: an exponential moving average (EMA) of the weights and the average of the
weights of the last N optimizer steps, kept beside the raw weights during training.

    train:
      weight_averaging: {ema_decay: 0.999, window: 200, start_step: 1000}

Both are fp32 copies on the training device, updated after every optimizer step ``s > start_step``:

- **EMA**: ``ema ← decay · ema + (1 − decay) · w_s``; the first averaged step copies the weights
  (no pull towards the random initialisation), so after ``k`` updates the first weights carry
  ``decay^(k−1)`` of the mass. A step the stability guard skipped counts, with its unchanged weights.
- **Window**: the exact mean of ``w_s`` over the last ``window`` steps (fewer, right after
  ``start_step``). A ring of the last N weight copies would cost N copies of the model; but the
  average is only ever *used* at known steps — the held-out evaluations and checkpoints the
  config schedules, and the last step — so one running sum is opened ``window − 1`` steps before
  each of those steps and closed on it. That is exact, and costs one fp32 copy per scheduled
  evaluation/checkpoint within any ``window`` steps (one or two when ``window`` is at most the
  checkpoint interval). A checkpoint written off the schedule (preemption) therefore holds no
  window average, only the open sums, so resuming from it stays exact. If the schedule changes on
  resume, a newly scheduled step whose window began before the resume covers fewer steps; the
  evaluation record says which (``first_step``, ``steps``) and a warning is logged.

What a checkpoint holds (the checkpoint writer, ``train/checkpoint.py``, turns a callback's
``weight_files`` into files listed in ``manifest.json`` with their sha256): ``ema.safetensors``
and, at a scheduled step, ``window.safetensors`` — full state dicts (averaged parameters, buffers
as trained) that ``lmforge eval|generate|export --weights ema|window`` load like
``model.safetensors`` — and ``window_sums.safetensors`` with the open sums. A resumed run, or a
run taking a parent's trainer state, continues the averages bit for bit. After a stability-guard
rollback the averages are read back from the checkpoint rolled back to, as the weights are.

Held-out evaluations also evaluate the averaged weights (swapped into the model in place and
swapped back exactly from one temporary copy of the raw weights): ``eval`` records in ``metrics.jsonl`` gain ``averaged: {ema: {bpb, loss,
...}, window: {...}}`` and the end of the run writes ``eval/ema/final.json`` and
``eval/window/final.json``.

Parallelism: with DDP the replicas are identical, so rank 0 alone keeps the averages (and
evaluates, as it does for the raw weights). With FSDP2 every rank averages its own shards (the
averages are DTensors sharded like the parameters); a checkpoint gathers them to rank 0 like the
weights, and a resume at any world size re-shards them. Only trainable parameters are averaged;
frozen ones and buffers are written as they are. The update's seconds per step are logged as
``weight_averaging_s`` in the train records (they are not part of ``step_time_s`` or tokens/s).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from lmforge.core import distributed
from lmforge.core.checkpoint_files import WEIGHT_FILES
from lmforge.core.config import Config, FieldValueError
from lmforge.core.errors import CheckpointError
from lmforge.core.logging import get_logger
from lmforge.train.callbacks import Callback

if TYPE_CHECKING:
    from lmforge.train.trainer import Trainer

log = get_logger(__name__)

CALLBACK_NAME = "weight_averaging"
EMA_FILE, WINDOW_FILE = WEIGHT_FILES["ema"], WEIGHT_FILES["window"]
SUMS_FILE = "window_sums.safetensors"  # open window sums: training state, not weights to load


@dataclass
class WeightAveragingConfig(Config):
    ema_decay: float | None = None   # e.g. 0.999 (an average over about 1/(1-decay) steps); null: no EMA
    window: int | None = None        # average of the last N steps' weights; null: none
    start_step: int = 0              # average the weights after the steps past this one

    def __post_init__(self) -> None:
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:  # also refuses nan
            raise FieldValueError("ema_decay", f"expected a decay between 0 and 1 such as 0.999, or null "
                                               f"(no EMA); got {self.ema_decay}")
        if self.window is not None and self.window < 2:
            raise FieldValueError("window", f"expected a number of steps >= 2, or null (no window average); "
                                            f"got {self.window}")
        if self.start_step < 0:
            raise FieldValueError("start_step", f"expected a step >= 0, got {self.start_step}")

    @property
    def enabled(self) -> bool:
        return self.ema_decay is not None or self.window is not None


# ---- the averages, on lists of tensors (plain or DTensor shards) --------------------------------

def _plain(tensors: list[torch.Tensor]) -> bool:
    """Ordinary tensors (foreach kernels), not FSDP2's DTensor shards."""
    return not any(hasattr(t, "full_tensor") for t in tensors)


class ExponentialAverage:
    """``ema ← decay · ema + (1 − decay) · w`` per update; the first update copies ``w``."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.tensors: list[torch.Tensor] | None = None
        self.first_step = 0
        self.updates = 0

    @torch.no_grad()
    def update(self, weights: list[torch.Tensor], step: int) -> None:
        if self.tensors is None:
            self.tensors = [w.detach().float().clone() for w in weights]
            self.first_step, self.updates = step, 1
            return
        sources = [w.detach().float() for w in weights]
        if _plain(self.tensors):
            torch._foreach_lerp_(self.tensors, sources, 1.0 - self.decay)
        else:  # DTensor shards: element-wise, no communication
            for target, source in zip(self.tensors, sources):
                target.lerp_(source, 1.0 - self.decay)
        self.updates += 1


@dataclass
class WindowSum:
    """The running sum of the weights of steps ``first_step .. first_step + count - 1``; divided by
    ``count`` once closed."""
    first_step: int
    count: int = 0
    tensors: list[torch.Tensor] = field(default_factory=list)

    @torch.no_grad()
    def add(self, weights: list[torch.Tensor]) -> None:
        sources = [w.detach().float() for w in weights]
        if not self.tensors:
            self.tensors = [s.clone() for s in sources]
        elif _plain(self.tensors):
            torch._foreach_add_(self.tensors, sources)
        else:
            for target, source in zip(self.tensors, sources):
                target.add_(source)
        self.count += 1

    @torch.no_grad()
    def close(self) -> None:
        for tensor in self.tensors:
            tensor.div_(self.count)


class WindowAverage:
    """The mean of the weights of the last ``size`` steps, at every step ``needed(step)`` is true.

    A sum for step T opens at step ``T − size + 1`` (or at the first update, if later) and
    closes at T; ``finished`` holds the last closed average until the next update."""

    def __init__(self, size: int, needed: Callable[[int], bool]) -> None:
        self.size, self.needed = size, needed
        self.pending: dict[int, WindowSum] = {}
        self.finished: tuple[int, WindowSum] | None = None
        self._opened_to = 0  # the steps up to here have been offered a sum (not state: rescanned after a resume)

    def rescan(self, step: int, last_step: int) -> None:
        """The run's last step became ``last_step`` at ``step`` (``train.time_budget_s``): sums for
        steps beyond it go, and the next update offers sums again from ``step + 1`` on (a sum for
        the new last step opened then covers the steps from then, fewer than the window if the
        decision came inside it)."""
        for target in [t for t in self.pending if t > last_step]:
            del self.pending[target]
        self._opened_to = min(self._opened_to, step)

    def update(self, weights: list[torch.Tensor], step: int) -> list[int]:
        """Add the weights after ``step``; returns the steps whose sums opened here."""
        if self.finished is not None and self.finished[0] < step:
            self.finished = None
        opened = []
        for target in range(max(step, self._opened_to + 1), step + self.size):
            if target not in self.pending and self.needed(target):
                self.pending[target] = WindowSum(first_step=step)
                opened.append(target)
        self._opened_to = step + self.size - 1
        for window_sum in self.pending.values():
            window_sum.add(weights)
        done = self.pending.pop(step, None)
        if done is not None:
            done.close()
            self.finished = (step, done)
        return opened


# ---- the callback --------------------------------------------------------------------------------

def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (collective for a DTensor shard)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # type: ignore[operator]


class WeightAveraging(Callback):
    """Keeps the EMA and window averages of ``train.weight_averaging``; a no-op when it is off.

    Listed among the default callbacks before the metrics logger (which logs its seconds), the
    held-out evaluator (which evaluates the averages beside the raw weights) and the checkpointer
    (which saves them)."""

    def __init__(self) -> None:
        self.cfg: WeightAveragingConfig | None = None
        self.ema: ExponentialAverage | None = None
        self.window: WindowAverage | None = None
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.holds = False      # this process keeps averages (every rank with FSDP, rank 0 otherwise)
        self.sharded = False
        self.last_step: int | None = None
        self._loaded: dict[str, Any] = {}
        self._trainer: "Trainer | None" = None

    # ---- setup and state -------------------------------------------------------------------
    def on_train_start(self, trainer: "Trainer") -> None:
        cfg = trainer.cfg.train.weight_averaging
        loaded, self._loaded = self._loaded, {}
        if not cfg.enabled:
            if loaded:
                log.warning("the checkpoint holds averaged weights; train.weight_averaging is off, so they "
                            "are not continued")
            return
        self.cfg, self._trainer = cfg, trainer
        self.sharded = trainer.eval_on_all_ranks  # FSDP2 across processes
        self.holds = self.sharded or trainer.is_main
        self._reshard(trainer)
        from lmforge.train.checkpoint import unwrap

        named = [(n, p) for n, p in unwrap(trainer.model).named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.ema = ExponentialAverage(cfg.ema_decay) if cfg.ema_decay is not None else None
        self.window = WindowAverage(cfg.window, self._needed) if cfg.window is not None else None
        if loaded:
            self._restore(loaded, trainer)
        self._warn_if_never_started(trainer)
        parts = []
        if cfg.ema_decay is not None:
            parts.append(f"EMA (decay {cfg.ema_decay})")
        if cfg.window is not None:
            parts.append(f"mean of the last {cfg.window} steps at each evaluation and checkpoint "
                         f"(up to {self._window_copies()} open sums)")
        log.info("weight averaging after step %d: %s; fp32 on %s", cfg.start_step, ", ".join(parts), trainer.device)

    def _warn_if_never_started(self, trainer: "Trainer") -> None:
        assert self.cfg is not None
        if self.cfg.start_step >= trainer.total_steps:
            log.warning("train.weight_averaging.start_step (%d) is not below the run's last step (%d): no averaged "
                        "weights will be kept", self.cfg.start_step, trainer.total_steps)

    def on_length_fixed(self, trainer: "Trainer") -> None:
        if self.cfg is None:
            return
        if self.window is not None:
            self.window.rescan(trainer.step, trainer.total_steps)
        self._warn_if_never_started(trainer)

    def _needed(self, step: int) -> bool:
        """Steps where the window average is used: held-out evaluations, checkpoints, the last step."""
        trainer = self._trainer
        assert trainer is not None and self.cfg is not None
        total, train = trainer.total_steps, trainer.cfg.train
        if step > total or step <= self.cfg.start_step:
            return False
        return (step == total or (train.eval_every > 0 and step % train.eval_every == 0)
                or (train.checkpoint_every > 0 and step % train.checkpoint_every == 0))

    def _window_copies(self) -> int:
        assert self.cfg is not None and self.cfg.window is not None and self._trainer is not None
        train, size = self._trainer.cfg.train, self.cfg.window
        bound = 1 + sum(-(-size // every) for every in (train.eval_every, train.checkpoint_every) if every > 0)
        return min(size, bound)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Applied at on_train_start, once the model and config are at hand.
        self._loaded = state

    def state_dict(self) -> dict[str, Any]:
        """Collective under FSDP (the shards are gathered); rank 0's holds the tensors."""
        if self.cfg is None or not self.holds or self.last_step is None:
            return {}
        main = distributed.is_main_process()
        state: dict[str, Any] = {"step": self.last_step, "ema_decay": self.cfg.ema_decay,
                                 "window_size": self.cfg.window, "ema": None, "pending": {}, "finished": None}
        files: dict[str, dict[str, torch.Tensor]] = {}
        if self.ema is not None and self.ema.tensors is not None:
            state["ema"] = {"first_step": self.ema.first_step, "updates": self.ema.updates}
            files[EMA_FILE] = self._weights_file(self.ema.tensors)
        if self.window is not None:
            sums: dict[str, torch.Tensor] = {}
            for target, window_sum in sorted(self.window.pending.items()):
                state["pending"][target] = {"first_step": window_sum.first_step, "count": window_sum.count}
                for name, tensor in zip(self.names, window_sum.tensors):
                    full = _full(tensor)
                    if main:
                        sums[f"{target}/{name}"] = full.cpu()
            if sums:
                files[SUMS_FILE] = sums
            finished = self.window.finished
            if finished is not None and finished[0] == self.last_step:
                state["finished"] = {"step": finished[0], "first_step": finished[1].first_step,
                                     "count": finished[1].count}
                files[WINDOW_FILE] = self._weights_file(finished[1].tensors)
        if not main:
            return {}
        if files:
            state["weight_files"] = files
        return state

    def _weights_file(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full state dict of the model with ``tensors`` in place of the averaged parameters, as
        ``model.safetensors`` holds it (gathered under FSDP; empty on ranks other than 0)."""
        from lmforge.train.checkpoint import unwrap

        trainer = self._trainer
        assert trainer is not None
        main = distributed.is_main_process()
        model = unwrap(trainer.model)
        self._reshard(trainer)
        averaged = {id(p): t for p, t in zip(self.params, tensors)}
        by_name = dict(model.named_parameters(remove_duplicate=False))
        out: dict[str, torch.Tensor] = {}
        for key, value in model.state_dict().items():
            param = by_name.get(key)
            full = _full(averaged[id(param)] if param is not None and id(param) in averaged else value)
            if main:
                out[key] = full.detach().cpu()
        return out

    def _restore(self, state: dict[str, Any], trainer: "Trainer") -> None:
        """Continue from a saved state (a resume, a parent's trainer state or a rollback)."""
        assert self.cfg is not None
        cfg = self.cfg
        self.ema = ExponentialAverage(cfg.ema_decay) if cfg.ema_decay is not None else None
        self.window = WindowAverage(cfg.window, self._needed) if cfg.window is not None else None
        if not state:
            return
        self.last_step = int(state["step"])
        if not self.holds:
            return
        files = state.get("weight_files", {})
        if state.get("ema") is not None:
            if self.ema is None:
                log.warning("the checkpoint holds an EMA of the weights; train.weight_averaging.ema_decay is "
                            "null, so it is not continued")
            else:
                if state.get("ema_decay") != cfg.ema_decay:
                    log.warning("continuing the EMA with decay %s (it was kept with %s)", cfg.ema_decay,
                                state.get("ema_decay"))
                self.ema.tensors = self._placed(files, EMA_FILE, self.names)
                self.ema.first_step, self.ema.updates = state["ema"]["first_step"], state["ema"]["updates"]
        if self.window is None:
            return
        if state.get("window_size") != cfg.window:
            if state.get("window_size") is not None:
                log.warning("train.weight_averaging.window changed from %s to %d: the window sums start again",
                            state.get("window_size"), cfg.window)
            return
        for target, meta in state.get("pending", {}).items():
            if int(target) > trainer.total_steps:
                continue  # beyond the (new) last step: never used
            tensors = self._placed(files, SUMS_FILE, [f"{target}/{name}" for name in self.names])
            self.window.pending[int(target)] = WindowSum(meta["first_step"], meta["count"], tensors)
        finished = state.get("finished")
        if finished is not None and int(finished["step"]) == self.last_step:
            tensors = self._placed(files, WINDOW_FILE, self.names)
            self.window.finished = (self.last_step, WindowSum(finished["first_step"], finished["count"], tensors))

    def _placed(self, files: dict[str, Any], file_name: str, keys: list[str]) -> list[torch.Tensor]:
        """Saved full tensors as fp32 on the training device, sharded like the parameters under FSDP."""
        tensors = files.get(file_name)
        if tensors is None:
            raise CheckpointError(f"the weight-averaging state names no {file_name} (incomplete checkpoint)")
        device = self._trainer.device  # type: ignore[union-attr]
        placed = []
        for key, param in zip(keys, self.params):
            if key not in tensors:
                raise CheckpointError(f"{file_name}: no tensor {key!r} (the checkpoint was saved by another model)")
            tensor = tensors[key].to(device=device, dtype=torch.float32)
            if self.sharded:
                from torch.distributed.tensor import distribute_tensor

                # Every rank has the whole tensor (the state is broadcast): take the local shard.
                tensor = distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)  # type: ignore[attr-defined]
            elif tensor.shape != param.shape:
                raise CheckpointError(f"{file_name}: {key!r} has shape {tuple(tensor.shape)}, the model "
                                      f"{tuple(param.shape)}")
            placed.append(tensor.clone() if tensor is tensors[key] else tensor)
        return placed

    # ---- every step ------------------------------------------------------------------------
    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        if self.cfg is None or not self.holds:
            return
        step = trainer.step
        if self.last_step is not None and step <= self.last_step and trainer.last_checkpoint is not None:
            self._after_rollback(trainer)
        self.last_step = step
        if step <= self.cfg.start_step:
            return
        start = time.perf_counter()
        if self.ema is not None:
            self.ema.update(self.params, step)
        if self.window is not None:
            for target in self.window.update(self.params, step):
                if step > max(target - self.window.size + 1, self.cfg.start_step + 1):
                    # a resume whose checkpoint had no sum for this step (the evaluation/checkpoint
                    # schedule or the window changed, or averaging was just turned on)
                    log.warning("the window average at step %d covers steps %d-%d only: the steps before "
                                "%d were not summed", target, step, target, step)
        # Not in step_time_s (nor tokens/s): logged on its own so its cost is visible.
        metrics["weight_averaging_s"] = time.perf_counter() - start

    def _after_rollback(self, trainer: "Trainer") -> None:
        """The stability guard went back to its last checkpoint: so do the averages."""
        from lmforge.train.checkpoint import read_callback_state

        checkpoint = trainer.last_checkpoint
        assert checkpoint is not None
        state: dict[str, Any] | None = None
        if distributed.is_main_process():
            state = read_callback_state(checkpoint, CALLBACK_NAME, trainer.model)
        if self.sharded:
            state = distributed.broadcast_object(state)
        self._restore(state or {}, trainer)
        if not state:
            self.last_step = None
        log.info("weight averages read back from %s after the rollback", checkpoint)

    # ---- the averaged weights, for evaluation ----------------------------------------------
    def ready(self, trainer: "Trainer") -> dict[str, dict[str, Any]]:
        """The averages that exist at this step, with what they cover (empty where this process
        keeps none)."""
        if self.cfg is None or not self.holds:
            return {}
        out: dict[str, dict[str, Any]] = {}
        if self.ema is not None and self.ema.tensors is not None:
            out["ema"] = {"first_step": self.ema.first_step, "steps": self.ema.updates, "ema_decay": self.ema.decay}
        if self.window is not None and self.window.finished is not None and self.window.finished[0] == trainer.step:
            window_sum = self.window.finished[1]
            out["window"] = {"first_step": window_sum.first_step, "steps": window_sum.count}
        return out

    @contextlib.contextmanager
    def weights_in_model(self, trainer: "Trainer", kind: str) -> Iterator[None]:
        """The model holds the ``kind`` average inside the block, its own weights again after it
        (restored exactly from a copy)."""
        if kind == "ema":
            tensors = self.ema.tensors if self.ema is not None else None
        else:
            finished = self.window.finished if self.window is not None else None
            tensors = finished[1].tensors if finished is not None else None
        if tensors is None:
            raise ValueError(f"no {kind} average at step {trainer.step}")
        # FSDP2 may keep the root's gathered weights after a forward; resharding makes the next
        # forward gather the values just written into the shards.
        self._reshard(trainer)
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for param, tensor in zip(self.params, tensors):
                param.copy_(tensor)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, tensor in zip(self.params, saved):
                    param.copy_(tensor)
            self._reshard(trainer)

    def evaluate(self, trainer: "Trainer", evaluate: Callable[[], dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``{kind: evaluate() with the kind's weights in the model, plus what they cover}``."""
        results = {}
        for kind, info in self.ready(trainer).items():
            with self.weights_in_model(trainer, kind):
                results[kind] = {**evaluate(), **info}
        return results

    def _reshard(self, trainer: "Trainer") -> None:
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule

        from lmforge.train.checkpoint import unwrap_compiled

        for module in unwrap_compiled(trainer.model).modules():
            if isinstance(module, FSDPModule):
                module.reshard()
