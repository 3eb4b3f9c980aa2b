"""One writer per run directory: an advisory lock held for the life of a run.

``RunLock(run_dir)`` takes an exclusive ``flock`` on ``run_dir/.lock`` and writes who holds
it (pid, host, start time, command) into the file. A second process that tries gets a
one-line LmforgeError naming the holder. The kernel drops the lock when its holder dies —
even by SIGKILL or an out-of-memory kill — so a lock file left behind by a killed run is
not in the way: the next run takes the lock and says whose stale lock it took over.

``flock`` is advisory: it stops lmforge processes from writing into the same run, not a
user's ``rm``. On Linux NFS (v4, or v3 with lockd) emulates it with byte-range locks, which
work across hosts; on filesystems without locking, ``flock`` fails and the error says so.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

from lmforge.core.errors import LmforgeError
from lmforge.core.logging import get_logger

LOCK_FILE = ".lock"
log = get_logger(__name__)


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (a reader such as `lmforge data prepare`, or a writer that has not yet written its details)"
    text = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("started"):
        text += f", running since {holder['started']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


class RunLock:
    """Exclusive advisory lock on a run directory; use as a context manager or call
    ``acquire()`` / ``release()``. ``acquire`` creates the directory if needed.

    An acquired lock that is never released lasts until the process exits (the open
    descriptor is deliberately not closed on garbage collection).
    """

    def __init__(self, run_dir: str | Path, purpose: str | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.purpose = (purpose or _command_line())[:200]
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise LmforgeError(f"{self.run_dir}: cannot create the run directory's lock file "
                               f"({exc.strerror or exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LmforgeError(f"{self.run_dir} is in use by {_describe(holder)}; wait for it to finish "
                                   "or stop it, or choose another name (--set name=...)") from None
            raise LmforgeError(f"{self.path}: cannot lock the run directory ({exc.strerror or exc}); "
                               "the filesystem may not support file locks") from exc
        previous = _read(fd)
        if previous:
            # Whoever wrote this no longer holds the lock: it was killed before releasing.
            log.warning("%s: taking over the lock left by %s, which is no longer running",
                        self.run_dir, _describe(previous))
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": self.purpose,
        }
        try:
            _write(fd, json.dumps(me).encode())
        except OSError as exc:
            os.close(fd)
            raise LmforgeError(f"{self.path}: cannot write the lock file ({exc.strerror or exc})") from exc
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up; the file stays (empty), so it is never unlinked under a waiter."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            _write(fd, b"")  # an empty file means "released cleanly": no stale-lock message
        except OSError:
            pass  # the directory may be gone (e.g. removed by its owner); the lock still ends
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds ``run_dir``'s lock now (their details, or ``{}`` before they wrote them), or None.

    For readers that must not read a folder while its writer is still at work: a shared,
    non-blocking ``flock`` fails only while some process holds the exclusive lock, so a lock
    file left by a killed writer does not count.
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read(fd) or {}
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_holder(holder: dict[str, Any] | None) -> str:
    """A lock holder as the error messages name it ("process 12 on host, running since ...")."""
    return _describe(holder)


def _command_line() -> str:
    """How this process was started, as a person would type it (``python -m lmforge`` → lmforge)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("__main__.py", "-c", "-m"):
        program = "lmforge" if program == "__main__.py" else "python"
    return " ".join([program, *sys.argv[1:]])


def _read(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _write(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


class FolderBusy(LmforgeError):
    """A folder's writer still holds its lock (raised by :func:`reading`)."""


@contextlib.contextmanager
def reading(run_dir: str | Path) -> Iterator[None]:
    """Hold a shared lock on ``run_dir`` while reading it: refused at once (FolderBusy naming the
    holder) while a writer holds its :class:`RunLock`, and a writer that starts meanwhile is
    refused in turn, so the folder cannot change under the reader. No lock file, no lock: a
    folder no lmforge writer ever locked is read as it is."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderBusy(f"{run_dir} is being written by {_describe(_read(fd))}; read it after that "
                                   "finishes, or stop it") from None
            raise
        yield
    finally:
        os.close(fd)  # releases the shared lock
