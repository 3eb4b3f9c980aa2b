"""Logging and progress: plain lines off a terminal, rich on one; quiet on non-zero ranks.

Where the log goes decides its form, checked once per process on stderr:

- **a terminal**: rich — time, coloured level, and a live progress bar for long work;
- **anything else** (a file, a pipe, Slurm's output, CI): one plain line per record,
  ``2025-01-31 14:02:07 INFO resumed from ... at step 8``, never wrapped. (Rich wraps at
  the console width, 80 columns when it cannot ask a terminal, which splits one message
  over several lines that ``grep`` cannot find.) A progress bar becomes a progress record
  every ``LMFORGE_PROGRESS_SECONDS`` (default 30), with the rate and eta since the previous
  record, and one when it ends, with the whole run's rate.

The message text is the same in both. ``LMFORGE_PROGRESS=0`` turns progress off (bars and
records); ``LMFORGE_LOG_LEVEL`` sets the level (default INFO on rank 0, WARNING elsewhere).
In a multi-process run (``WORLD_SIZE`` > 1) plain lines carry the rank.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
_CONFIGURED = False
_CONSOLE = None
PROGRESS_SECONDS = 30.0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def interactive() -> bool:
    """Whether stderr (where logs and bars go) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def console():
    """The one rich console on stderr that log records and live bars share on a terminal
    (a record printed while a bar is live then appears above the bar, not through it)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (tests and tools swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


def plain_formatter() -> logging.Formatter:
    rank = f"rank {_rank()} " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    return logging.Formatter(f"%(asctime)s {rank}%(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def _handler() -> logging.Handler:
    if interactive():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console(), show_path=False, rich_tracebacks=False,
                                               markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler
    handler = _StderrHandler()
    handler.setFormatter(plain_formatter())
    return handler


def get_logger(name: str = "lmforge") -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        level = os.environ.get("LMFORGE_LOG_LEVEL", "INFO" if _rank() == 0 else "WARNING")
        root = logging.getLogger("lmforge")
        root.setLevel(level)
        root.addHandler(_handler())
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name)


def progress_enabled() -> bool:
    return os.environ.get("LMFORGE_PROGRESS", "1") != "0" and _rank() == 0


def progress_seconds() -> float:
    """Seconds between progress records off a terminal (``LMFORGE_PROGRESS_SECONDS``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("LMFORGE_PROGRESS_SECONDS", PROGRESS_SECONDS)))
    except ValueError:
        return PROGRESS_SECONDS


def make_progress(unit: str = "it", live: bool | None = None) -> Progress:
    """A rich progress bar that shows a rate in ``unit``/s (documents/s, tokens/s...); drawn only
    when ``live`` (default: progress is on and stderr is a terminal), otherwise it only counts."""
    live = progress_enabled() and interactive() if live is None else live
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console() if live else None,
        disable=not live,
        transient=False,
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class RateProgress:
    """Context manager around a progress bar: ``advance(n_items, n_units)`` updates the rate.

    The rate is shown in ``unit``/s, where units may differ from the bar's items
    (a bar over documents can show tokens/s). On a terminal this is a live rich bar; off
    one, a progress record every :func:`progress_seconds` and one at the end.
    """

    def __init__(self, description: str, total: int | None, unit: str = "it"):
        self._time = time.perf_counter
        self.description = description
        self.unit = unit
        enabled = progress_enabled()
        self.live = enabled and interactive()
        self.records = enabled and not self.live
        self.progress = make_progress(unit, live=self.live)
        self.task = self.progress.add_task(description, total=total, rate="")
        self.units = 0.0
        self.items = 0
        self.start = self._time()
        self._recorded_items = -1
        self._window = (self.start, 0, 0.0)  # time, items and units at the previous record
        self._fields = ""

    def __enter__(self) -> "RateProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
        if self.records and self._recorded_items != self.items:  # unless the last record said it all
            self._record(final=True)

    def _rate(self, since: float | None = None, units: float = 0.0) -> str:
        """Units per second since the start, or since time ``since`` (``units`` done by then)."""
        elapsed = max(self._time() - (self.start if since is None else since), 1e-9)
        return f"{_human((self.units - units) / elapsed)} {self.unit}/s"

    def set_total(self, total: int | None) -> None:
        """A new length for the bar (a run whose time budget fixed its step count)."""
        self.progress.update(self.task, total=total)

    def advance(self, items: int = 1, units: float | None = None, **fields: str) -> None:
        self.units += items if units is None else units
        self.items += items
        self._fields = " ".join(f"{k}={v}" for k, v in fields.items())
        self.progress.update(self.task, advance=items, rate=f"{self._rate()} {self._fields}".strip())
        if self.records and self._time() - self._window[0] >= progress_seconds():
            self._record()

    def _record(self, final: bool = False) -> None:
        """One line: what, how far, how fast, and (while running) how long is left."""
        now = self._time()
        task = next(t for t in self.progress.tasks if t.id == self.task)
        done, total, elapsed = int(task.completed), task.total, now - self.start
        where = f"{done}/{int(total)} ({100.0 * done / total:.0f}%)" if total else f"{done}"
        # While running, the rate and the eta are those since the previous record: a slow start (a
        # torch.compile step, a cold cache) would otherwise hold the average down and the eta up for
        # most of the run. The final record gives the whole run's average.
        window_start, window_items, window_units = self._window
        recent = not final and self.items > window_items
        rate = self._rate(window_start, window_units) if recent else self._rate()
        text = f"{self.description}: {where}, {rate}"
        if self._fields:
            text += f", {self._fields}"
        text += f", {_duration(elapsed)} elapsed"
        if final:
            text += "" if total is None or done >= total else " (stopped before the end)"
        elif total and self.items and done < total:
            seconds_per_item = ((now - window_start) / (self.items - window_items) if recent
                                else elapsed / self.items)
            text += f", eta {_duration((total - done) * seconds_per_item)}"
        self._recorded_items = self.items
        self._window = (now, self.items, self.units)
        get_logger("lmforge.progress").info("%s", text)


def _human(x: float) -> str:
    for suffix in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{suffix}"
        x /= 1000
    return f"{x:.1f}T"


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    with RateProgress(description, total, unit) as bar:
        for item in items:
            yield item
            bar.advance(1)
