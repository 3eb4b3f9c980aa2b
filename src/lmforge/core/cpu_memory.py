"""CPU training: keep freed memory in the process for the next step (``train.keep_freed_memory``).

A training step on CPU allocates and frees the same large activations every step, and torch's
CPU allocator hands each request to the C library's ``malloc``. With its defaults, glibc returns
the top of the heap to the operating system once more than its trim threshold is free, and (until
its threshold adapts) serves large blocks with fresh ``mmap`` calls, so every step faults the same
pages in again: measurable system time in each step. Two ``mallopt`` settings keep freed memory
in the process instead: blocks up to 32 MiB (glibc's largest mmap threshold on 64-bit) come from
the heap, and the heap is never trimmed. Peak memory is unchanged; the process simply does not
give memory back between steps. (Intel's and PyTorch's CPU tuning guides get the same effect by
preloading jemalloc or tcmalloc; this needs no library outside the C runtime.)

Only glibc is touched (Linux); elsewhere this does nothing. ``mallopt`` has no Python binding,
hence the few lines of ``ctypes`` here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from lmforge.core.logging import get_logger

log = get_logger(__name__)

# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit (4 MiB x sizeof(long))
NEVER_TRIM = 2**31 - 1           # the parameter is an int

_applied = False


def keep_freed_memory() -> bool:
    """Apply the two settings once per process; True when they are in effect (glibc), else False.

    Both must be set together: setting either turns off glibc's adaptive mmap threshold, and the
    trim threshold alone would leave every block above 128 KiB to ``mmap``.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    except (OSError, AttributeError):
        return False
    if not ok:
        log.warning("mallopt refused the settings of train.keep_freed_memory; malloc keeps its defaults")
        return False
    _applied = True
    return True
