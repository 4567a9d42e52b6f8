"""Status messages that cannot hide each other: per-reason counts, a short history, rate limits.

One device has one ``Message_RBV``, and a noisy reason (a frame that waited too long for its
position, reported for every frame) used to overwrite every other reason the moment it came.
:class:`MessageLog` keeps one entry per *reason*: the text with its numbers taken out
(``"frame 17 waited over 10 s"`` and ``"frame 18 waited over 10 s"`` are one reason), so a reason
that repeats increments its count and refreshes its text and time instead of pushing the others
out. ``Message_RBV`` still shows the newest message, with one rule: a *repeat* (a reason reported
less than ``hold_s`` ago) or a *routine* report (counter growth, see :class:`GrowthReport`) does not
replace a different message shown less than ``hold_s`` ago. A new reason is always shown at once;
a held-back repeat is shown once the message over it is ``hold_s`` old (:meth:`MessageLog.due`,
from the status task) unless a newer message came meanwhile, so ``Message_RBV`` ends on the newest
news. The last ``size`` reasons, newest first, with their times and counts, are ``MessageHistory_RBV``.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

__all__ = ["Entry", "MessageLog", "GrowthReport", "reason_key", "SEVERITY_NAMES"]

#: alarm severities as the history shows them
SEVERITY_NAMES = ("INFO", "MINOR", "MAJOR", "INVALID")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def reason_key(text: str, severity: int = 0) -> str:
    """The reason a message gives: its text with every number replaced by ``#``, and its severity."""
    return f"{severity}:{_NUMBER.sub('#', text)}"


@dataclass
class Entry:
    """One reason: its latest text, when it was first and last reported, how often, and for how
    many frames (``frames``: the sum of what the reports said they were about, 0 if none)."""

    key: str
    text: str
    severity: int
    first: float
    last: float
    count: int = 1
    frames: int = 0

    def line(self, max_text: int = 320) -> str:
        """``2024-06-01 12:00:01.234 MINOR x17 (17 frames, since 12:00:00): text``."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last)) + f".{int(self.last % 1 * 1000):03d}"
        sev = SEVERITY_NAMES[min(max(self.severity, 0), 3)]
        notes = []
        if self.frames:
            notes.append(f"{self.frames} frames")
        if self.count > 1:
            notes.append("since " + time.strftime("%H:%M:%S", time.localtime(self.first)))
        head = f"{stamp} {sev}" + (f" x{self.count}" if self.count > 1 else "")
        text = self.text if len(self.text) <= max_text else self.text[: max_text - 3] + "..."
        return f"{head}{' (' + ', '.join(notes) + ')' if notes else ''}: {text}"


class MessageLog:
    """Thread-safe per-reason message counts and history (see the module docstring).

    ``keep`` reasons are counted (the least recently reported one is forgotten beyond that);
    the newest ``size`` of them make the history. ``clock`` gives wall-clock seconds.
    """

    def __init__(self, size: int = 20, hold_s: float = 1.0, keep: int = 256,
                 clock: Callable[[], float] = time.time) -> None:
        self.size, self.hold_s, self.keep = size, hold_s, keep
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._shown_key = ""
        self._shown_since = float("-inf")
        self._pending: tuple[str, str, int] | None = None  # a held-back repeat: key, text, severity
        #: increments on every change: the status task republishes the history only when it moved
        self.version = 0

    def add(self, text: str, severity: int = 0, frames: int = 0, key: str | None = None,
            routine: bool = False, now: float | None = None) -> bool:
        """Count a message under its reason (``key``, default :func:`reason_key`).

        Returns whether ``Message_RBV`` should show it: False for a repeat or a ``routine`` report
        while a different message shown less than ``hold_s`` ago is up.
        """
        now = self.clock() if now is None else now
        key = key or reason_key(text, severity)
        with self._lock:
            entry = self._entries.pop(key, None)
            repeat = entry is not None and now - entry.last < self.hold_s
            if entry is None:
                entry = Entry(key, text, severity, now, now, 0)
            entry.text, entry.last = text, now
            entry.count += 1
            entry.frames += max(int(frames), 0)
            self._entries[key] = entry  # the newest is last
            while len(self._entries) > self.keep:
                self._entries.popitem(last=False)
            self.version += 1
            if key == self._shown_key:
                self._pending = None
                return True  # fresher numbers for the message already up: nothing hidden
            if (repeat or routine) and now - self._shown_since < self.hold_s:
                if not routine:
                    self._pending = (key, text, severity)
                return False
            self._shown_key, self._shown_since = key, now
            self._pending = None
            return True

    def due(self, now: float | None = None) -> tuple[str, int] | None:
        """A held-back repeat whose turn has come (the message over it is ``hold_s`` old): its
        ``(text, severity)``, now counted as shown; None if there is none or not yet."""
        now = self.clock() if now is None else now
        with self._lock:
            pending = self._pending
            if pending is None or now - self._shown_since < self.hold_s:
                return None
            self._pending = None
            self._shown_key, self._shown_since = pending[0], now
            return pending[1], pending[2]

    def entries(self) -> list[Entry]:
        """The newest ``size`` reasons, newest first (copies)."""
        with self._lock:
            newest = list(self._entries.values())[-self.size:]
        return [Entry(**vars(e)) for e in reversed(newest)]

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{reason: (reports, frames)}`` for every reason kept."""
        with self._lock:
            return {k: (e.count, e.frames) for k, e in self._entries.items()}

    def find(self, text: str, severity: int = 0) -> Entry | None:
        """The entry of the reason ``text`` gives (any numbers in it are ignored), or None."""
        key = reason_key(text, severity)
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else Entry(**vars(entry))

    def format(self, max_bytes: int = 8191) -> str:
        """The history as text, one reason a line, newest first; the oldest lines that do not fit
        in ``max_bytes`` (UTF-8) are left out whole."""
        out: list[str] = []
        used = 0
        for entry in self.entries():
            line = entry.line()
            size = len(line.encode("utf-8")) + (1 if out else 0)
            if used + size > max_bytes:
                break
            out.append(line)
            used += size
        return "\n".join(out)

    def clear(self) -> None:
        """Forget every reason."""
        with self._lock:
            self._entries.clear()
            self._shown_key, self._shown_since, self._pending = "", float("-inf"), None
            self.version += 1


class GrowthReport:
    """Turns the growth of running counters into messages, at most one per counter per ``period``.

    :meth:`check` is called from a periodic task with a counter's total; it returns how much the
    counter grew since it was last reported and over how many seconds (from the last check that
    found nothing new), or None while nothing grew or the last report is younger than ``period``.
    A counter that went down (a reset, a gap filled late) is followed from its new value.
    """

    def __init__(self, period: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self.clock = clock
        self._seen: dict[str, tuple[int, float, float]] = {}  # name: (reported total, quiet since, last report)

    def check(self, name: str, total: int, now: float | None = None) -> tuple[int, float] | None:
        now = self.clock() if now is None else now
        reported, quiet, told = self._seen.get(name, (0, now, float("-inf")))
        if total <= reported:
            self._seen[name] = (total, now, told)
            return None
        if now - told < self.period:
            self._seen[name] = (reported, quiet, told)
            return None
        self._seen[name] = (total, now, now)
        return total - reported, max(now - quiet, 0.0)

    def reset(self) -> None:
        self._seen.clear()
