"""Train a ladder's rungs locally: K worker processes, finished rungs skipped, the rest resumed.

Each rung runs as ``python -m lmforge train configs/<rung>.yaml --resume R --no-report``
with ``OMP_NUM_THREADS`` = cores / K (so K rungs share the machine without
oversubscribing it), its output in ``logs/<rung>.log``. On a rerun:

- a rung with ``eval/final.json`` is finished and skipped;
- a rung with a valid checkpoint of its own resumes from it (``--resume auto``);
- a WSD branch without one starts from its parent's checkpoint at the branch step;
- anything else starts from step 0 (``--resume auto`` finds nothing, and also accepts a
  run directory left by an attempt killed before its first checkpoint).

A WSD branch becomes ready as soon as its parent has written the branch-point
checkpoint, so it can train while the parent is still decaying. Among ready rungs the
one with the most compute left in its chain starts first. Every start and finish is
appended to ``ladder_events.jsonl`` (the held-out prediction's timestamps are checked
against it). Ctrl-C or SIGTERM sends SIGTERM to running rungs — the trainer saves a
checkpoint and stops — and a rerun continues them.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from lmforge.core.checkpoint_files import latest_valid_checkpoint, list_checkpoints, step_dir_name
from lmforge.core.metrics_file import append_metrics, read_metrics
from lmforge.scaling.ladder.gather import final_path
from lmforge.scaling.ladder.plan import LadderPlan, Rung
from lmforge.scaling.ladder.predict import utc_now

EVENTS = "ladder_events.jsonl"


def run_dir(plan: LadderPlan, rung: Rung) -> Path:
    return plan.runs_dir / rung.name


def is_finished(plan: LadderPlan, rung: Rung) -> bool:
    return final_path(run_dir(plan, rung)).is_file()


def has_started(plan: LadderPlan, rung: Rung) -> bool:
    """True once the trainer has created the rung's run directory (or its log exists)."""
    return (run_dir(plan, rung) / "config.yaml").exists() or (run_dir(plan, rung) / "metrics.jsonl").exists()


def branch_checkpoint(plan: LadderPlan, rung: Rung) -> Path | None:
    """The parent's checkpoint this WSD branch starts from (None for a root rung)."""
    if rung.parent is None or rung.branch_step is None:
        return None
    return plan.runs_dir / rung.parent / "checkpoints" / step_dir_name(rung.branch_step)


def is_ready(plan: LadderPlan, rung: Rung) -> bool:
    """Can start now: a root rung, or the branch checkpoint is complete (its manifest is written last)."""
    checkpoint = branch_checkpoint(plan, rung)
    return checkpoint is None or (checkpoint / "manifest.json").is_file() or _has_checkpoint(plan, rung)


def _has_checkpoint(plan: LadderPlan, rung: Rung) -> bool:
    """A checkpoint of the rung's own exists (not verified: that reads every file; resuming verifies)."""
    return any((path / "manifest.json").is_file() for path in list_checkpoints(run_dir(plan, rung) / "checkpoints"))


def resume_argument(plan: LadderPlan, rung: Rung) -> str:
    """``--resume`` value for the next attempt at ``rung`` (see the module docstring)."""
    checkpoint = branch_checkpoint(plan, rung)
    if checkpoint is None or latest_valid_checkpoint(run_dir(plan, rung) / "checkpoints") is not None:
        return "auto"
    return str(checkpoint)


def train_command(plan: LadderPlan, rung: Rung, resume: str, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "lmforge", "train", str(plan.config_path(rung)),
            "--resume", resume, "--no-report"]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def last_train_record(metrics: Path) -> dict | None:
    """The newest ``train`` record of a metrics.jsonl, reading only its tail."""
    try:
        with open(metrics, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "train":
            return record
    return None


def event_times(plan: LadderPlan, event: str = "start") -> dict[str, float]:
    """Earliest ``event`` time (unix seconds) per rung from ``ladder_events.jsonl``."""
    path = plan.ladder_dir / EVENTS
    times: dict[str, float] = {}
    if path.is_file():
        for record in read_metrics(path):
            if record.get("event") == event:
                times[record["rung"]] = min(times.get(record["rung"], record["unix"]), record["unix"])
    return times


# --------------------------------------------------------------------------- processes


class Process(Protocol):
    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


Launcher = Callable[[LadderPlan, Rung, str, int, Path], Process]


def subprocess_launcher(plan: LadderPlan, rung: Rung, resume: str, threads: int, log_path: Path) -> Process:
    """Start ``lmforge train`` for ``rung`` in a child process with ``threads`` CPU threads."""
    command = train_command(plan, rung, resume)
    env = {**os.environ, "LMFORGE_PROGRESS": "0"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n===== {utc_now()[0]} {' '.join(command)} (threads {threads})\n")
        log.flush()
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


@dataclass
class Outcome:
    status: str                    # done | already finished | failed | blocked
    seconds: float | None = None
    returncode: int | None = None


@dataclass
class _Running:
    rung: Rung
    process: Process
    started: float
    task: int | None


def _children_cpu() -> float:
    """User + system CPU seconds of every waited-for child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop, ``kill``) takes the Ctrl-C path: stop the rungs cleanly first."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LocalRunner:
    """Runs rungs in up to ``workers`` child processes and shows their progress with rich."""

    def __init__(self, plan: LadderPlan, workers: int = 1, threads_per_rung: int | None = None,
                 launcher: Launcher | None = None, poll_seconds: float = 2.0, console=None):
        from rich.console import Console

        self.plan = plan
        self.workers = max(1, workers)
        self.threads_per_rung = threads_per_rung
        self.launcher = launcher or subprocess_launcher
        self.poll_seconds = poll_seconds
        # soft_wrap: off a terminal rich would break lines at 80 columns, splitting what grep looks for.
        self.console = console or Console(stderr=True, soft_wrap=True)
        self._cpu_seen = _children_cpu()
        self._last_status = time.time()

    def _priorities(self) -> dict[str, float]:
        """Compute left in each rung's chain (itself plus every descendant)."""
        children: dict[str, list[Rung]] = {}
        for rung in self.plan.rungs:
            if rung.parent:
                children.setdefault(rung.parent, []).append(rung)

        def total(rung: Rung) -> float:
            return rung.own_compute + sum(total(child) for child in children.get(rung.name, []))

        return {rung.name: total(rung) for rung in self.plan.rungs}

    def _live(self) -> bool:
        """Live bars on a terminal; elsewhere a status line per running rung now and then."""
        from lmforge.core.logging import progress_enabled

        return progress_enabled() and self.console.is_terminal

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
                        disable=not self._live(), transient=False)

    def run(self, rungs: list[Rung]) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        todo = []
        for rung in rungs:
            if is_finished(self.plan, rung):
                outcomes[rung.name] = Outcome("already finished")
            else:
                todo.append(rung)
        if not todo:
            return outcomes
        threads = self.threads_per_rung or max(1, available_cores() // min(self.workers, len(todo)))
        self.console.print(f"ladder {self.plan.cfg.name}: {len(todo)} rung(s) to train "
                           f"({len(outcomes)} already finished), {self.workers} worker(s), {threads} thread(s) each",
                           highlight=False)
        priority = self._priorities()
        running: dict[str, _Running] = {}
        with self._progress() as progress, _sigterm_as_interrupt():
            overall = progress.add_task("rungs", total=len(todo), info="")
            try:
                while todo or running:
                    self._reap(running, outcomes, progress, overall)
                    self._block(todo, outcomes, running)
                    ready = sorted((r for r in todo if is_ready(self.plan, r)), key=lambda r: -priority[r.name])
                    for rung in ready[: self.workers - len(running)]:
                        todo.remove(rung)
                        running[rung.name] = self._start(rung, threads, progress)
                    if not running and todo and not ready:  # parents outside this set, never finished
                        for rung in todo:
                            outcomes[rung.name] = Outcome("blocked")
                            self.console.print(f"[red]blocked[/red] {rung.name}: parent {rung.parent} has no "
                                               f"checkpoint at step {rung.branch_step}")
                        todo.clear()
                    self._update(running, progress)
                    if running:
                        time.sleep(self.poll_seconds)
            except KeyboardInterrupt:
                self._stop(running)
                raise
        return outcomes

    def _start(self, rung: Rung, threads: int, progress) -> _Running:
        resume = resume_argument(self.plan, rung)
        log_path = self.plan.ladder_dir / "logs" / f"{rung.name}.log"
        started = time.time()
        append_metrics(self.plan.ladder_dir / EVENTS, {"event": "start", "rung": rung.name, "unix": started,
                                                       "time": utc_now()[0], "resume": resume, "threads": threads,
                                                       "holdout": rung.holdout})
        process = self.launcher(self.plan, rung, resume, threads, log_path)
        task = progress.add_task(rung.name, total=rung.steps, completed=0, info="starting")
        how = "" if resume == "auto" else f" from {rung.parent} step {rung.branch_step}"
        self.console.print(f"start {rung.name}{how} ({rung.steps} steps, log {log_path})", highlight=False)
        return _Running(rung, process, started, task)

    def _reap(self, running: dict[str, _Running], outcomes: dict[str, Outcome], progress, overall) -> None:
        for name in list(running):
            item = running[name]
            code = item.process.poll()
            if code is None:
                continue
            del running[name]
            seconds = time.time() - item.started
            ok = code == 0 and is_finished(self.plan, item.rung)
            outcomes[name] = Outcome("done" if ok else "failed", seconds, code)
            # CPU time of the children reaped since the last finish (this one, unless two ended together).
            now = _children_cpu()
            cpu, self._cpu_seen = now - self._cpu_seen, now
            append_metrics(self.plan.ladder_dir / EVENTS, {"event": "finish", "rung": name, "unix": time.time(),
                                                           "time": utc_now()[0], "seconds": seconds,
                                                           "cpu_seconds": cpu, "returncode": code, "ok": ok})
            if item.task is not None:
                progress.update(item.task, visible=False)
            progress.advance(overall)
            if ok:
                final = json.loads(final_path(run_dir(self.plan, item.rung)).read_text())
                bpb = ", ".join(f"{k} {v:.3f}" for k, v in final["bpb"].items())
                self.console.print(f"[green]done[/green] {name} in {seconds:.0f} s: bits/byte {bpb}")
            else:
                self.console.print(f"[red]failed[/red] {name} (exit code {code}); see "
                                   f"{self.plan.ladder_dir / 'logs' / (name + '.log')}")

    def _block(self, todo: list[Rung], outcomes: dict[str, Outcome], running: dict[str, _Running]) -> None:
        """Branches whose parent failed or was blocked, and whose branch checkpoint never appeared."""
        for rung in list(todo):
            parent = outcomes.get(rung.parent or "")
            if parent and parent.status in ("failed", "blocked") and not is_ready(self.plan, rung):
                todo.remove(rung)
                outcomes[rung.name] = Outcome("blocked")
                self.console.print(f"[red]blocked[/red] {rung.name}: parent {rung.parent} {parent.status}")

    def _update(self, running: dict[str, _Running], progress) -> None:
        from lmforge.core.logging import progress_enabled, progress_seconds

        status = (not self._live() and progress_enabled() and running
                  and time.time() - self._last_status >= progress_seconds())
        if status:
            self._last_status = time.time()
        for item in running.values():
            record = last_train_record(run_dir(self.plan, item.rung) / "metrics.jsonl")
            info = f"loss {record['loss']:.3f}  {record.get('tokens_per_s', 0):,.0f} tok/s" if record else "starting"
            if record and item.task is not None:
                progress.update(item.task, completed=record["step"], info=info)
            if status:
                step = record["step"] if record else 0
                self.console.print(f"running {item.rung.name}: step {step}/{item.rung.steps}, {info}, "
                                   f"{time.time() - item.started:.0f} s", highlight=False)

    def _stop(self, running: dict[str, _Running]) -> None:
        """SIGTERM every running rung (each saves a checkpoint) and wait for them."""
        for item in running.values():
            item.process.terminate()
        for item in running.values():
            try:
                item.process.wait(timeout=120)
            except subprocess.TimeoutExpired:  # pragma: no cover - a hung child
                pass
