"""core/memory: the glibc allocator settings and trims that keep a long-running IOC's RSS flat."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ptychostream.core import memory

glibc = pytest.mark.skipif(memory._LIBC is None, reason="the C library is not glibc")


@glibc
def test_tune_allocator_takes_every_setting(monkeypatch):
    for env in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(env, raising=False)
    assert memory.tune_allocator() is True


@glibc
def test_trim_gives_freed_heap_blocks_back():
    """Blocks below the mmap threshold live in the arenas; freed between blocks that stay alive (a
    fragmented heap that free() cannot shrink), their pages come back only with a trim."""
    memory.tune_allocator()
    block = memory.MMAP_THRESHOLD // 2  # heap-allocated, as a single frame is
    n = (192 * 2**20) // block
    # what earlier tests in this process freed goes back first: reused, those pages would not count as
    # growth (seen once: 146 MiB grown for 192 MiB allocated)
    memory.trim()
    before = memory.rss_bytes()
    assert before is not None
    held: list[np.ndarray] = []
    pins: list[bytearray] = []

    def allocate() -> None:  # several threads: several arenas, as the data path has
        for _ in range(n // 4):
            a = np.empty(block, dtype=np.uint8)
            a.fill(1)  # touch every page
            held.append(a)
            pins.append(bytearray(2048))  # malloc'd (not pymalloc), stays: the heap cannot shrink

    threads = [threading.Thread(target=allocate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grown = memory.rss_bytes()
    assert grown is not None and grown - before > 150 * 2**20
    held.clear()
    memory.trim()
    after = memory.rss_bytes()
    assert after is not None
    assert grown - after > 120 * 2**20, f"RSS {before >> 20} -> {grown >> 20} -> {after >> 20} MiB"
    del pins


def test_trimmer_runs_and_stops():
    t = memory.Trimmer(period_s=0.01)
    t.start()
    deadline = threading.Event()
    for _ in range(500):
        if t.trims >= 3 or memory._LIBC is None:
            break
        deadline.wait(0.01)
    t.stop()
    t.join(timeout=2)
    assert not t.is_alive()
    assert memory._LIBC is None or t.trims >= 3
