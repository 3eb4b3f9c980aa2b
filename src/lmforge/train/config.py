"""The run config: data + model + optimizer + training + evaluation, as one YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.core.config import Config, FieldValueError
from lmforge.data.config import DataConfig
from lmforge.eval.config import EvalConfig
from lmforge.nn.config import ModelConfig
from lmforge.nn.families import model_config_from_dict
from lmforge.optim.config import OptimConfig
from lmforge.optim.schedules import check_schedule
from lmforge.data.replay import ReplayConfig
from lmforge.retrieval.config import RetrievalConfig
from lmforge.train.guard import GuardConfig
from lmforge.train.averaging import WeightAveragingConfig
from lmforge.train.init_from import InitConfig
from lmforge.train.run_dir import validate_run_name
from lmforge.train.time_budget import check_time_budget


@dataclass
class TrainConfig(Config):
    steps: int = 200                 # optimizer steps
    batch_size: int = 16             # sequences per micro-batch, global: split evenly over processes
    grad_accum_steps: int = 1        # micro-batches per optimizer step
    seq_len: int = 128
    grad_clip: float = 1.0           # max global grad norm; 0 disables clipping
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast on CUDA, fp32 on CPU; bf16: autocast on either; fast: bf16 where the
    # hardware multiplies it natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32 (core/device.py)
    precision: Literal["auto", "fp32", "bf16", "fast"] = "auto"
    compile: bool = False            # torch.compile the model
    # CPU: glibc malloc keeps freed memory for the next step instead of returning it to the OS and
    # faulting it in again (core/cpu_memory.py; +6-7% tokens/s here); false: its defaults
    keep_freed_memory: bool = True
    activation_checkpointing: bool = False
    data_parallel: Literal["ddp", "fsdp"] = "ddp"  # used under torchrun with more than one process
    # Ranks that split each sequence (parallel/context.py): world = data-parallel groups x this
    context_parallel: int = 1
    context_parallel_impl: Literal["lmforge", "torch"] = "lmforge"  # torch: its ring attention, CUDA only
    log_every: int = 10              # steps between metrics.jsonl / TensorBoard records
    eval_every: int = 100            # steps between held-out evaluations (0: only at the end)
    checkpoint_every: int = 100      # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3        # keep the newest K checkpoints
    tensorboard: bool = True
    guard: GuardConfig = field(default_factory=GuardConfig)  # skip non-finite / spiking steps
    weight_averaging: WeightAveragingConfig = field(default_factory=WeightAveragingConfig)  # EMA / window, train/averaging.py
    # Wall-clock seconds for the training steps: after time_budget_calibration_steps steps the run
    # fixes its length once to what the median step time (of the later half of them) fits
    # (train.steps is then an upper bound);
    # needs a schedule whose start does not depend on the step count (train/time_budget.py)
    time_budget_s: float | None = None
    time_budget_calibration_steps: int = 20

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum_steps", "seq_len", "log_every", "keep_checkpoints",
                    "time_budget_calibration_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.grad_clip < 0:
            raise ValueError("grad_clip must be >= 0")
        if self.context_parallel < 1:
            raise FieldValueError("context_parallel", f"must be >= 1 (ranks per sequence), got {self.context_parallel}")
        if self.context_parallel > 1 and self.seq_len % (2 * self.context_parallel):
            raise FieldValueError("context_parallel", f"splits each sequence into 2 x {self.context_parallel} equal "
                                  f"chunks (zigzag load balancing): seq_len {self.seq_len} is not divisible by "
                                  f"{2 * self.context_parallel}")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step, over all processes."""
        return self.batch_size * self.grad_accum_steps * self.seq_len


@dataclass
class RunConfig(Config):
    name: str = "run"
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=lambda: DataConfig.from_dict(
        {"sources": [{"name": "literature", "kind": "demo_literature"}]}))  # type: ignore[arg-type]
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrieval: RetrievalConfig | None = None  # the database a retro model reads (model.family: retro)
    init: InitConfig = field(default_factory=InitConfig)  # start from another run (--init-from), train/init_from.py
    replay: ReplayConfig | None = None  # a share of old data mixed into the batches, data/replay.py

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, path: str = "") -> "RunConfig":
        """The ``model:`` section is parsed by the config class of the family it names."""
        if isinstance(data, dict) and "model" in data and not isinstance(data["model"], ModelConfig):
            data = {**data, "model": model_config_from_dict(data["model"], path=f"{path}.model" if path else "model")}
        return super().from_dict(data, path)  # type: ignore[return-value]

    def __post_init__(self) -> None:
        validate_run_name(self.name)  # one folder name: never runs_dir itself or its parent
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        check_schedule(self.train.steps, self.optim)  # a layout that does not fit fails now, not at step 1
        check_time_budget(self.train.time_budget_s, self.optim)
        if self.replay is not None:
            if self.model.family != "transformer":
                raise ValueError(f"replay: the {self.model.family!r} family reads its own batches; replay is "
                                 "for transformer runs")
            if self.replay.data_dir is None and self.init.path is None and self.replay.sources is None:
                raise ValueError("replay: name the old data (replay.data_dir, or replay.sources of this run's "
                                 "data), or continue from a parent (init.path) whose data is replayed")
        if self.train.context_parallel > 1 and self.model.family != "transformer":
            raise ValueError(f"train.context_parallel: the {self.model.family!r} family runs whole sequences; "
                             "context parallelism is for the 'transformer' family")
        if self.data.unique_tokens is not None:
            if self.model.family != "transformer":
                raise ValueError(f"data.unique_tokens: the {self.model.family!r} family reads its own batches; a "
                                 "unique-token budget is for transformer runs")
            if self.replay is not None:
                raise ValueError("data.unique_tokens: a unique-token budget cannot be combined with replay "
                                 "(the replayed rows would come from outside the budget)")
        if self.init.trainer_state and self.replay is not None:
            raise ValueError("init.trainer_state continues the parent's data stream; it cannot add replay")
        from lmforge.train.families import training_family  # the families module imports this one

        training_family(self.model.family).check_run(self)
