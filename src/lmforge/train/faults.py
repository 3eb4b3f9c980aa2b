"""Fault injection for the fault-tolerance tests and the chaos benchmark.

Read from the environment once, so a test can start ``lmforge train`` in a subprocess and
make it fail at a chosen step:

- ``LMFORGE_CRASH_AT_STEP=K``: SIGKILL itself right after step K (a real kill, no cleanup);
- ``LMFORGE_NAN_AT_STEP=K``: the loss of step K becomes NaN;
- ``LMFORGE_SPIKE_AT_STEP=K``: the loss of step K is multiplied by 50.

Unset variables cost nothing. Steps count from 1 (the step number after the update). Each
fault fires once per process, so a rollback past step K does not meet it again.
"""

from __future__ import annotations

import os
import signal


def _step(name: str) -> int:
    return int(os.environ.get(name, "-1"))


CRASH_AT = _step("LMFORGE_CRASH_AT_STEP")
NAN_AT = _step("LMFORGE_NAN_AT_STEP")
SPIKE_AT = _step("LMFORGE_SPIKE_AT_STEP")


_fired: set[str] = set()


def _fires(name: str, step: int, at: int) -> bool:
    if step != at or name in _fired:
        return False
    _fired.add(name)
    return True


def loss_factor(step: int) -> float:
    """Multiplier for the loss of the step about to be taken (``step`` = its number)."""
    if _fires("nan", step, NAN_AT):
        return float("nan")
    if _fires("spike", step, SPIKE_AT):
        return 50.0
    return 1.0


def maybe_crash(step: int) -> None:
    if step == CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
