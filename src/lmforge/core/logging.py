"""Logging and progress bars (rich), quiet on non-zero ranks."""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

from rich.logging import RichHandler
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


def get_logger(name: str = "lmforge") -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        rank = int(os.environ.get("RANK", "0"))
        level = os.environ.get("LMFORGE_LOG_LEVEL", "INFO" if rank == 0 else "WARNING")
        root = logging.getLogger("lmforge")
        root.setLevel(level)
        handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name)


def progress_enabled() -> bool:
    return os.environ.get("LMFORGE_PROGRESS", "1") != "0" and int(os.environ.get("RANK", "0")) == 0


def make_progress(unit: str = "it") -> Progress:
    """A rich progress bar that shows a rate in ``unit``/s (documents/s, tokens/s...)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not progress_enabled() or not sys.stderr.isatty() and os.environ.get("LMFORGE_PROGRESS") != "1",
        transient=False,
    )


class RateProgress:
    """Context manager around a rich bar: ``advance(n_items, n_units)`` updates the rate.

    The rate is shown in ``unit``/s, where units may differ from the bar's items
    (a bar over documents can show tokens/s).
    """

    def __init__(self, description: str, total: int | None, unit: str = "it"):
        import time

        self._time = time.perf_counter
        self.unit = unit
        self.progress = make_progress(unit)
        self.task = self.progress.add_task(description, total=total, rate="")
        self.units = 0.0
        self.start = self._time()

    def __enter__(self) -> "RateProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def advance(self, items: int = 1, units: float | None = None, **fields: str) -> None:
        self.units += items if units is None else units
        elapsed = max(self._time() - self.start, 1e-9)
        rate = f"{_human(self.units / elapsed)} {self.unit}/s"
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        self.progress.update(self.task, advance=items, rate=f"{rate} {extra}".strip())


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
