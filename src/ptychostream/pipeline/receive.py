"""Receive: NTNDArray frames from a detector channel (p4p monitor) or from puts to ``Input``.

Receiving never waits on inference: the monitor callback decodes the frame and hands it
to the intake at once. uniqueId gaps upstream are counted as missed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
from p4p.client.thread import Context, Disconnected, Finished, RemoteError

from ptychostream.core.frames import ImageFrame
from ptychostream.protocols import ntnd

__all__ = ["Receiver", "GapCounter", "PositionMonitor"]

_log = logging.getLogger(__name__)

#: server and client monitor queue: bursts must not be squashed (see docs/architecture.md)
MONITOR_REQUEST = "record[queueSize=1024]field()"


def _close(sub, ctx) -> tuple[None, None]:
    """Close a p4p subscription and its context (either may be None)."""
    if sub is not None:
        sub.close()
    if ctx is not None:
        ctx.close()
    return None, None


class GapCounter:
    """Counts uniqueId gaps in one stream; a uniqueId that goes back means the source restarted."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.restarts = 0

    def update(self, uid: int) -> int:
        """Return how many frames were missed before ``uid``."""
        last, self.last = self.last, uid
        if last is None or uid <= 0:
            return 0
        if uid <= last:
            self.restarts += 1
            return 0
        return uid - last - 1

    def reset(self) -> None:
        self.last = None


class Receiver:
    """Monitors one PVA channel at a time; the channel can change at run time."""

    def __init__(
        self,
        on_frame: Callable[[ImageFrame], None],
        on_bad: Callable[[str], None],
        on_connect: Callable[[bool, str], None],
    ) -> None:
        self._on_frame = on_frame
        self._on_bad = on_bad
        self._on_connect = on_connect
        self.on_stale: Callable[[int], None] = lambda uid: None
        self._fresh = True
        self._ctx: Context | None = None
        self._sub = None
        self._lock = threading.Lock()
        self.channel = ""

    def _context(self) -> Context:
        if self._ctx is None:
            self._ctx = Context("pva", nt=False)
        return self._ctx

    def monitor(self, channel: str) -> None:
        """Switch to ``channel`` ("" stops monitoring)."""
        with self._lock:
            if self._sub is not None:
                self._sub.close()
                self._sub = None
            self.channel = channel
            self._fresh = True
            self._on_connect(False, f"monitoring {channel}" if channel else "no input channel")
            if channel:
                self._sub = self._context().monitor(
                    channel, self._callback, request=MONITOR_REQUEST, notify_disconnect=True
                )

    def _callback(self, value) -> None:
        if isinstance(value, Disconnected):
            self._fresh = True
            self._on_connect(False, f"{self.channel} disconnected")
            return
        if isinstance(value, Finished):
            self._on_connect(False, f"{self.channel} finished")
            return
        if isinstance(value, RemoteError):
            self._on_connect(False, f"{self.channel}: {value}")
            return
        if isinstance(value, Exception):
            self._on_connect(False, f"{self.channel}: {value!r}")
            return
        if value.getID() != "epics:nt/NTNDArray:1.0" and "dimension" not in value:
            self._on_bad(f"{self.channel} is not an NTNDArray ({value.getID()})")
            return
        self._on_connect(True, "")
        if self._fresh:
            # the first update after (re)connecting is the PV's current value: the last frame of an
            # earlier acquisition (or an IOC's empty start-up image), not a new frame
            self._fresh = False
            self.on_stale(int(value["uniqueId"]))
            return
        try:
            frame = ntnd.decode(value, received=time.time())
        except ntnd.FrameError as exc:
            self._on_bad(str(exc))
            return
        self._on_frame(frame)

    def close(self) -> None:
        with self._lock:
            self._sub, self._ctx = _close(self._sub, self._ctx)


class PositionMonitor:
    """Monitors a position channel: an NTTable of (uniqueId, x, y) chunks, or a scalar motor.

    Channel names may carry ``pva://`` (default) or ``ca://``; CA uses caproto's client.
    """

    def __init__(self, on_value: Callable[[object], None], on_status: Callable[[str], None]) -> None:
        self._on_value = on_value
        self._on_status = on_status
        self._ctx: Context | None = None
        self._sub = None
        self._ca = None
        self.channel = ""

    def monitor(self, channel: str) -> None:
        self.close()
        self.channel = channel
        if not channel:
            return
        if channel.startswith("ca://"):
            from caproto.threading.client import Context as CAContext

            self._ca = CAContext()
            (pv,) = self._ca.get_pvs(channel[5:], timeout=2.0)
            self._ca_sub = pv.subscribe()
            self._ca_sub.add_callback(self._ca_callback)
            return
        name = channel[6:] if channel.startswith("pva://") else channel
        self._ctx = Context("pva", nt=False)
        self._sub = self._ctx.monitor(name, self._callback, request=MONITOR_REQUEST, notify_disconnect=True)

    def _ca_callback(self, sub, response) -> None:
        ts = response.metadata.timestamp if response.metadata is not None else time.time()
        self._on_value((float(response.data[0]), ts))

    def _callback(self, value) -> None:
        if isinstance(value, Exception):
            self._on_status(f"position channel {self.channel}: {value!s}" if str(value) else
                            f"position channel {self.channel} disconnected")
            return
        try:
            if "labels" in value:  # NTTable
                cols = value["value"]
                self._on_value((np.asarray(cols["uniqueId"]), np.asarray(cols["x"], float),
                                np.asarray(cols["y"], float)))
            else:  # NTScalar motor readback
                ts = value["timeStamp"]
                self._on_value((float(value["value"]), ts["secondsPastEpoch"] + ts["nanoseconds"] * 1e-9))
        except (KeyError, TypeError, ValueError) as exc:
            self._on_status(f"position channel {self.channel}: unusable update ({exc})")

    def close(self) -> None:
        self._sub, self._ctx = _close(self._sub, self._ctx)
        if self._ca is not None:
            self._ca.disconnect()
            self._ca = None
