"""Preemption: turn SIGTERM / SIGINT into "save a checkpoint, then exit".

Cluster schedulers send SIGTERM some time before killing a job. The handler only sets a
flag; the trainer checks it between steps (agreeing across ranks), saves a checkpoint and
raises :class:`Preempted`, so at most the step in flight is redone on resume. A second
signal while saving is ignored; the previous handlers come back when the run ends.
"""

from __future__ import annotations

import signal
from types import FrameType

from lmforge.core.errors import LmforgeError


class Preempted(LmforgeError):
    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint}; "
                         "continue with --resume auto")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class PreemptionHandler:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> "PreemptionHandler":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
