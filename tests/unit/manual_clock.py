"""A clock the unit tests move by hand, for code that takes a ``clock`` callable."""

from __future__ import annotations


class Clock:
    """Returns ``t``; a test advances it with ``clock.t += dt``."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
