"""The run-directory lock, with real processes: a holder, a second starter, a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from lmforge.core.errors import LmforgeError
from lmforge.core.run_lock import LOCK_FILE, RunLock

HOLDER = textwrap.dedent("""
    import sys, time
    from lmforge.core.run_lock import RunLock
    lock = RunLock(sys.argv[1], purpose="lmforge train holder.yaml").acquire()
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    run = tmp_path / "runs" / "r"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield run, child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)


def test_second_process_is_refused_with_the_holder_named(holder):
    run, child = holder
    with pytest.raises(LmforgeError) as info:
        RunLock(run).acquire()
    message = str(info.value)
    assert f"process {child.pid} on {socket.gethostname()}" in message
    assert "lmforge train holder.yaml" in message and "--set name=" in message
    assert "\n" not in message  # one line


def test_lock_of_a_sigkilled_process_is_taken_over_with_a_message(holder, records):
    run, child = holder
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == child.pid  # left behind by the kill
    with RunLock(run) as lock:
        assert lock.held
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    messages = [r.getMessage() for r in records]
    assert any("taking over the lock left by process" in m and str(child.pid) in m for m in messages), messages


def test_released_lock_is_free_and_silent(tmp_path, records):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(LmforgeError, match=f"process {os.getpid()}"):
            RunLock(run).acquire()  # even the same process cannot take it twice
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly: no holder recorded
    lock = RunLock(run).acquire()
    lock.release()
    lock.release()  # idempotent
    assert not any("taking over" in r.getMessage() for r in records)


def test_unusable_lock_location_is_one_clear_error(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    with pytest.raises(LmforgeError, match="cannot create the run directory's lock file"):
        RunLock(blocker / "r").acquire()
