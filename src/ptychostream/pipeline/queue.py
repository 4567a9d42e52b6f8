"""The bounded frame queue between receive and inference, with a drop policy and counters."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["POLICIES", "FrameQueue", "QueuedFrame"]

#: order matches the BacklogPolicy enum in db/
POLICIES = ("DropNewest", "DropOldest")


@dataclass
class QueuedFrame:
    """A received frame waiting for inference."""

    frame: Any
    received: float = field(default_factory=time.monotonic)


class FrameQueue:
    """Bounded FIFO. ``put`` never blocks: when full, the policy drops a frame and counts it."""

    def __init__(self, limit: int = 20000, policy: str = "DropNewest") -> None:
        self._items: deque[QueuedFrame] = deque()
        self._cond = threading.Condition()
        self.limit = limit
        self.policy = policy
        self.dropped = 0
        self.inflight = 0
        #: how many queued frames wake the consumer (1: the first; a lingering get_batch: a full batch)
        self._want = 1
        #: frames that came during the last get_batch's linger (-1: it did not linger)
        self.lingered = -1

    def set_limit(self, limit: int) -> int:
        """Change the capacity; frames already queued above it are kept (they drain)."""
        if limit < 1:
            raise ValueError("backlog limit must be at least 1")
        with self._cond:
            self.limit = int(limit)
        return self.limit

    def set_policy(self, policy: str) -> str:
        """Choose what a full queue drops (one of :data:`POLICIES`)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy = policy
        return policy

    def put(self, frame: Any, received: float | None = None) -> bool:
        """Queue a frame. Returns False when the policy dropped the new frame."""
        item = QueuedFrame(frame, received if received is not None else time.monotonic())
        with self._cond:
            if len(self._items) >= self.limit:
                self.dropped += 1
                if self.policy == "DropNewest":
                    return False
                self._items.popleft()
            self._items.append(item)
            if len(self._items) >= self._want:
                self._cond.notify()
        return True

    def put_many(self, frames: Sequence[Any], received: float | None = None) -> int:
        """Queue ``frames`` in order under one lock, as that many :meth:`put` calls would (the same
        drops, counted in ``dropped``). Returns how many were queued (DropNewest refuses the newest that
        find no room; DropOldest queues them all and drops as many of the oldest)."""
        if not frames:
            return 0
        t = received if received is not None else time.monotonic()
        items = [QueuedFrame(f, t) for f in frames]
        n = len(items)
        with self._cond:
            room = max(0, self.limit - len(self._items))
            drop = max(0, n - room)
            self.dropped += drop
            if self.policy == "DropNewest":
                self._items.extend(items[:n - drop] if drop else items)
                kept = n - drop
            else:  # DropOldest: each frame past the room pushes out the oldest (possibly a new one)
                self._items.extend(items)
                for _ in range(drop):
                    self._items.popleft()
                kept = n  # each was queued, as put() says, though the later ones pushed some out
            if len(self._items) >= self._want:
                self._cond.notify()
        return kept

    def count_dropped(self, n: int) -> None:
        """Count ``n`` frames dropped before they reached the queue (a full receive ring), in ``dropped``."""
        with self._cond:
            self.dropped += n

    def get_batch(self, max_n: int, timeout: float = 0.1, linger: float = 0.0) -> list[QueuedFrame]:
        """Take up to ``max_n`` frames (waits up to ``timeout`` for the first). Marks them in flight.

        ``linger`` > 0: once there is a frame but fewer than ``max_n``, wait up to ``linger`` s more
        for a full batch (woken once, when it is full), so a fast stream is taken in batches rather
        than a frame or two at a time, each paying a whole batch's fixed cost.
        """
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            self.lingered = -1
            if linger > 0 and 0 < len(self._items) < max_n:
                deadline = time.monotonic() + linger
                before = len(self._items)
                self._want = max_n
                try:
                    while len(self._items) < max_n:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                finally:
                    self._want = 1
                    self.lingered = len(self._items) - before
            n = min(max_n, len(self._items))
            batch = [self._items.popleft() for _ in range(n)]
            self.inflight += n
        return batch

    def requeue(self, batch: list[QueuedFrame]) -> None:
        """Put an untouched batch back at the head, in order (it is no longer in flight)."""
        with self._cond:
            self._items.extendleft(reversed(batch))
            self.inflight -= len(batch)

    def done(self, n: int) -> None:
        """Inference finished with ``n`` in-flight frames (processed or rejected)."""
        with self._cond:
            self.inflight -= n

    def clear(self) -> int:
        """Drop every waiting frame (not those in flight); returns how many."""
        with self._cond:
            n = len(self._items)
            self._items.clear()
        return n

    def __len__(self) -> int:
        return len(self._items)

    @property
    def backlog(self) -> int:
        """Frames waiting or being inferred (read together, so a batch being taken counts once)."""
        with self._cond:
            return len(self._items) + self.inflight
