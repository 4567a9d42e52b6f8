"""Frame accounting: counters, rates over the last second, latency percentiles over a window."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

__all__ = ["Counters", "RateMeter", "LatencyWindow", "INT32_MAX", "saturate"]

#: the largest value an int32 PV (longin) can show
INT32_MAX = 2**31 - 1


def saturate(n: int, low: int = -(2**31), high: int = INT32_MAX) -> int:
    """``n`` clipped into an int32 PV's range: a count past 2**31 - 1 shows 2**31 - 1, never wraps."""
    return low if n < low else high if n > high else int(n)


class Counters:
    """Thread-safe frame counters (Python ints: they never wrap; :func:`saturate` them into int32 PVs).

    ``missed`` counts uniqueIds not received; it goes down when a frame it counted arrives late
    (see :class:`~ptychostream.pipeline.receive.GapCounter`). ``outoforder``, ``duplicates``,
    ``restarts`` and ``noid`` (frames whose uniqueId is not a frame count, <= 0) come from there too.
    """

    NAMES = ("received", "processed", "rejected", "missed", "nonfinite", "outoforder", "duplicates", "restarts",
             "noid")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def add_many(self, changes: dict[str, int]) -> None:
        """Add each ``name: n`` under one lock (a reader never sees half of it)."""
        with self._lock:
            for name, n in changes.items():
                self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def reset(self) -> None:
        with self._lock:
            self._values = dict.fromkeys(self.NAMES, 0)


class RateMeter:
    """Events per second over a sliding window (areaDetector's ArrayRate: the last second).

    Events are summed into ``bucket``-second bins with a running total, so :meth:`add` and
    :meth:`rate` cost O(1) whatever the event rate (one mark per frame at 20 kHz would not).
    An event counts while its bin starts within the window.
    """

    def __init__(self, window: float = 1.0, bucket: float = 0.01) -> None:
        self.window = window
        self.bucket = bucket
        self._marks: deque[list[float]] = deque()  # [bin start, events]
        self._total = 0
        self._lock = threading.Lock()

    def add(self, n: int = 1, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            marks = self._marks
            if marks and now - marks[-1][0] < self.bucket:
                marks[-1][1] += n
            else:
                marks.append([now, n])
            self._total += n

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            marks = self._marks
            while marks and marks[0][0] < now - self.window:
                self._total -= int(marks.popleft()[1])
            total = self._total
        return total / self.window

    def reset(self) -> None:
        with self._lock:
            self._marks.clear()
            self._total = 0


class LatencyWindow:
    """p50/p99 of the last ``size`` latencies (seconds in, milliseconds out)."""

    def __init__(self, size: int = 4096) -> None:
        self._buf = np.zeros(size)
        self._n = 0
        self._lock = threading.Lock()

    def add_many(self, seconds: np.ndarray) -> None:
        seconds = np.asarray(seconds, dtype=float).ravel()[-len(self._buf):]
        with self._lock:
            idx = (self._n + np.arange(len(seconds))) % len(self._buf)
            self._buf[idx] = seconds
            self._n += len(seconds)

    def percentiles_ms(self) -> tuple[float, float]:
        with self._lock:
            data = self._buf[: min(self._n, len(self._buf))].copy()
        if data.size == 0:
            return 0.0, 0.0
        p50, p99 = np.percentile(data, [50, 99])
        return float(p50 * 1e3), float(p99 * 1e3)

    def reset(self) -> None:
        with self._lock:
            self._n = 0
