"""Where stage units run: a local process pool (default) or Slurm array jobs via datatrove.

Why not datatrove everywhere: its local executor, readers and filters would work, but its
Gopher filter needs nltk's word tokenizers, its n-gram decontamination needs lighteval's
task tables, and its MinHash dedup is a four-stage pipeline of signature and bucket files
meant for billions of documents; importing it alone takes ~0.4 s. The steps here are a
few hundred lines of numpy that prepare the demo corpus in seconds on 2 cores. What
datatrove does best for this project is the cluster: its SlurmPipelineExecutor writes the
sbatch array script, chains jobs with dependencies, records completions and requeues
preempted tasks. Stage tasks here have exactly the shape it runs (a callable taking
``data, rank, world_size``), so ``executor: slurm`` hands them to it unchanged.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

from lmforge.core.errors import DataError
from lmforge.data.config import DataConfig


class LocalExecutor:
    """Runs units in up to ``num_workers`` processes; one pool serves every stage."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self._pool: ProcessPoolExecutor | None = None

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent may hold tokenizer (rayon) or torch threads.
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def map(self, fn: Callable[..., Any], calls: list[tuple], on_done: Callable[[tuple, Any], None] | None = None,
            parallel: bool = True) -> list[Any]:
        """``fn(*args)`` for each args tuple, in worker processes when worth it; results in order."""
        if not parallel or self.num_workers == 1 or len(calls) <= 1:
            results = []
            for args in calls:
                results.append(fn(*args))
                if on_done:
                    on_done(args, results[-1])
            return results
        futures: list[Future] = [self.pool().submit(fn, *args) for args in calls]
        results = []
        for args, future in zip(calls, futures):
            results.append(future.result())
            if on_done:
                on_done(args, results[-1])
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class StageTask:
    """A stage as datatrove runs pipeline steps: called with (data, rank, world_size).

    Rank r of world_size takes units r, r + world_size, ... and skips finished ones, so
    any number of array tasks covers the stage and a requeued task redoes nothing.
    """

    def __init__(self, stage: str, out_dir: str):
        self.stage, self.out_dir = stage, out_dir

    def __repr__(self) -> str:  # what datatrove logs as the pipeline
        return f"lmforge data stage {self.stage!r} of {self.out_dir}"

    def __call__(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:
        from lmforge.data import prepare

        prepare.run_stage_slice(self.stage, self.out_dir, rank, world_size)
        return None


def submit_slurm(cfg: DataConfig, out: Path, stages: list[tuple[str, bool]]) -> dict:
    """Submit every stage as a chained Slurm array job; returns what was submitted.

    ``stages``: (name, single) in order; a single stage runs as one task. The last stage
    writes the manifest, so ``lmforge data prepare`` afterwards finds the data prepared.
    """
    try:
        from datatrove.executor.slurm import SlurmPipelineExecutor
    except ImportError as exc:
        raise DataError("executor: slurm needs datatrove (pip install 'datatrove>=0.10.1')") from exc
    if not cfg.slurm.partition:
        raise DataError("executor: slurm needs slurm.partition (the partition to submit to)")
    previous = None
    executors = []
    for name, single in stages:
        executor = SlurmPipelineExecutor(
            pipeline=[StageTask(name, str(out.resolve()))],
            tasks=1 if single else cfg.slurm.tasks,
            time=cfg.slurm.time,
            partition=cfg.slurm.partition,
            cpus_per_task=cfg.slurm.cpus_per_task,
            mem_per_cpu_gb=cfg.slurm.mem_per_cpu_gb,
            job_name=f"lmforge-data-{name}",
            logging_dir=str((out / "work" / "slurm" / name).resolve()),
            venv_path=cfg.slurm.venv_path,
            sbatch_args=dict(cfg.slurm.sbatch_args) or None,
            depends=previous,
            # datatrove's own completion files say a task ran; the units' markers say what
            # it did. Checking both lets a rerun after a config change redo stale work.
            skip_completed=False,
        )
        executors.append(executor)
        previous = executor
    previous.run()  # launches the chain: each job depends on the one before
    return {"status": "submitted", "executor": "slurm", "out_dir": str(out),
            "stages": [{"name": name, "tasks": e.tasks, "job_id": getattr(e, "job_id", None)}
                       for (name, _), e in zip(stages, executors)],
            "logs": str(out / "work" / "slurm")}
