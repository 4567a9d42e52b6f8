"""Keep a long-running IOC's resident memory at its working set: glibc allocator settings and trims.

A streaming device allocates and frees the same few array sizes (a batch stack, its pre-processed
copy, the outputs) tens of times a second from several threads. With glibc's defaults that heap
only grows: every thread gets its own arena (up to 8 per core), and the mmap threshold rises to the
largest block ever freed, so batch-sized blocks move from mmap (returned to the system on free) to
the arenas (kept, fragmented). :func:`tune_allocator` fixes both at start-up; :func:`trim` hands
the free pages of every arena back (``malloc_trim``), which the IOC does every few seconds.

Both are no-ops (returning False) where the C library is not glibc, e.g. musl or macOS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

__all__ = ["ARENA_MAX", "MMAP_THRESHOLD", "TRIM_PERIOD_S", "tune_allocator", "trim", "Trimmer", "rss_bytes"]

_log = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: blocks from this size up are mmapped and unmapped on free (a 128x128 uint16 frame is 32 KiB, a
#: batch of 64 of them 2 MiB); setting it also stops glibc from raising it by itself
MMAP_THRESHOLD = 256 * 1024
#: arenas for all threads together (glibc's default is 8 per core)
ARENA_MAX = 4
#: free memory at the top of a heap above which glibc gives it back by itself
TRIM_THRESHOLD = 4 * 1024 * 1024
#: how often the IOC calls :func:`trim`
TRIM_PERIOD_S = 10.0


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None  # not glibc
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


_LIBC = _libc()


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, arena_max: int = ARENA_MAX,
                   trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold, arena count and trim threshold; True when all three were taken.

    The standard ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_ARENA_MAX`` and ``MALLOC_TRIM_THRESHOLD_``
    environment variables win: a setting given there is left as it is.
    """
    if _LIBC is None:
        return False
    ok = True
    for env, param, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, mmap_threshold),
                              ("MALLOC_ARENA_MAX", _M_ARENA_MAX, arena_max),
                              ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, trim_threshold)):
        if env in os.environ:
            continue
        ok = bool(_LIBC.mallopt(param, int(value))) and ok
    return ok


def trim() -> bool:
    """Give the free pages of every malloc arena back to the system; True when some were."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


def rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc``), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Trimmer(threading.Thread):
    """Calls :func:`trim` every ``period_s`` on its own thread (a trim of a large heap takes
    milliseconds and must not stall the asyncio loop); ``stop()`` ends it."""

    def __init__(self, period_s: float = TRIM_PERIOD_S) -> None:
        super().__init__(name="ptychostream-trim", daemon=True)
        self.period_s = float(period_s)
        self.trims = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period_s):
            try:
                trim()
                self.trims += 1
            except Exception:  # never stops the IOC
                _log.exception("malloc_trim failed")

    def stop(self) -> None:
        self._stop_event.set()
