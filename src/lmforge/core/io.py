"""Atomic file writes and checksums: a reader never sees a half-written file."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows.

    ``os.umask`` can only be read by setting it; the brief window with umask 0 would give
    files created meanwhile by other threads world-writable modes, so Linux's
    ``/proc/self/status`` is read first.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file (0644 under the usual umask 022)."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode ``mkdir`` would give a new directory (0755 under the usual umask 022)."""
    return 0o777 & ~current_umask()


def apply_default_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes ordinary files and folders get.

    ``tempfile.mkdtemp``/``mkstemp`` create 0700/0600 and some writers (safetensors) write
    0600; a directory written under a temporary name and renamed into place must end up
    like every other output, readable by whoever may read the rest of the run.
    """
    root = Path(root)
    file_mode, dir_mode = default_file_mode(), default_dir_mode()
    if root.is_symlink():
        return
    if root.is_file():
        os.chmod(root, file_mode)
        return
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), file_mode)


def make_temp_dir(final: Path) -> Path:
    """A new empty directory next to ``final`` (same filesystem, so a rename publishes it),
    with the usual directory mode rather than mkdtemp's 0700."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, default_dir_mode())
    return tmp


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, fsync it, then rename it over ``path``.

    If ``write`` raises (disk full, bad data), the temporary file is removed and any
    existing file at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600 files (and ``write`` may replace the file): the usual mode.
        os.chmod(tmp, default_file_mode())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_npy(path: str | Path, array: Any) -> Path:
    """``array`` as a ``.npy`` file, atomically (no pickled objects)."""
    import numpy as np  # (numpy stays out of this module's import cost for callers without arrays)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save(path) would append ".npy" to the temporary name
            np.save(handle, np.asarray(array), allow_pickle=False)
    return atomic_write(path, write)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def unreplaceable_folder_reason(path: Path) -> str | None:
    """Why the existing ``path`` must not be replaced or deleted as a folder of lmforge's output:
    a symbolic link (never followed), a file, or a protected place (see below); None if it may be,
    as far as its kind goes (callers still check it is their own output)."""
    path = Path(path)
    if path.is_symlink():
        return "a symbolic link (lmforge never deletes through links)"
    if not path.is_dir():
        return "a file, not a folder"
    return protected_path_reason(path)


def protected_path_reason(path: Path) -> str | None:
    """Why deleting or replacing ``path`` wholesale must be refused, or None.

    The filesystem root, the home folder, the working directory, any of their parents, a
    git repository and the folder holding lmforge's own source are never an output folder,
    whatever a config or a typo says.
    """
    path = Path(path).resolve()
    if path.parent == path:
        return "the filesystem root"
    try:
        home: Path | None = Path.home().resolve()
    except RuntimeError:  # no home folder known
        home = None
    if home is not None and home.is_relative_to(path):
        return "the home folder" if path == home else "a parent of the home folder"
    cwd = Path.cwd().resolve()
    if cwd.is_relative_to(path):
        return "the working directory" if path == cwd else "a parent of the working directory"
    if (path / ".git").exists():
        return "a git repository"
    source = Path(__file__).resolve().parents[1]  # the lmforge package
    if source.is_relative_to(path):
        return "a folder holding lmforge's own code"
    return None


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where the
    system or filesystem cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc older than 2.28, or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
