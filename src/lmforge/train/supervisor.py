"""``lmforge train --max-restarts N``: rerun a crashed training process from its checkpoint.

The supervisor runs the real training as a child process (``python -m lmforge train ...``)
and, when the child dies — a crash, an out-of-memory kill, SIGKILL — starts it again with
``--resume auto`` (the newest valid checkpoint), at most N times. A child stopped by
preemption (SIGTERM/SIGINT: it saved a checkpoint and exited 128+signal), a clean finish
and a user error (exit 2: a bad config will not fix itself) are not restarted. SIGTERM and
SIGINT sent to the supervisor are passed on to the child. Under torchrun, use torchrun's
own ``--max-restarts``, which restarts every rank together.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from lmforge.core.logging import get_logger

log = get_logger(__name__)
NO_RESTART = {0, 2, 128 + signal.SIGTERM, 128 + signal.SIGINT}


def drop_option(args: list[str], option: str) -> list[str]:
    """``args`` without ``option VALUE`` and ``option=VALUE``."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def supervise(train_args: list[str], max_restarts: int, resume: str | None) -> int:
    """Run ``lmforge train <train_args>`` and restart it after crashes; return its final exit code."""
    base = [sys.executable, "-m", "lmforge", "train", *drop_option(train_args, "--resume")]
    attempt, resume_arg = 0, resume
    forwarded: list[int] = []
    while True:
        command = base + (["--resume", resume_arg] if resume_arg else [])
        child = subprocess.Popen(command)

        def forward(signum: int, frame: object, _child: subprocess.Popen = child) -> None:
            forwarded.append(signum)
            _child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code < 0:  # killed by a signal: report it the shell's way
            code = 128 - code
        if code in NO_RESTART or forwarded:
            return code
        if attempt >= max_restarts:
            log.error("training failed with exit code %d after %d restarts; giving up", code, attempt)
            return code
        attempt += 1
        log.warning("training exited with code %d; restart %d of %d from the newest valid checkpoint",
                    code, attempt, max_restarts)
        resume_arg = "auto"
        time.sleep(1.0)
