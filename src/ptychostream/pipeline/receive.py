"""Receive: NTNDArray frames from a detector channel (p4p monitor) or from puts to ``Input``.

Receiving never waits on inference: the monitor callback decodes the frame and hands it
to the intake at once. uniqueIds are accounted by :class:`GapCounter`: gaps upstream are
missed, late frames out of order, repeats duplicates, a step back to 1 a source restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from p4p.client.thread import Context, Disconnected, Finished, RemoteError

from ptychostream.core.frames import ImageFrame
from ptychostream.core.stats import Counters
from ptychostream.protocols import ntnd

if TYPE_CHECKING:
    from caproto.threading.client import Context as CAContext
    from caproto.threading.client import Subscription

__all__ = ["GapCounter", "PositionMonitor", "Receiver"]

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


#: how far back (in uniqueIds) a frame may come and still count as late rather than as a source
#: restart: the monitor queue's depth (a reorder comes from a producer's parallel threads or from
#: several put clients, a few frames deep; a step back of more than this is a new run)
REORDER_WINDOW = 1024


class GapCounter:
    """uniqueId accounting of one stream into ``counters``: missed, outoforder, duplicates, restarts, noid.

    ``high`` is the highest uniqueId since the stream started (or restarted). A frame whose uid is

    * ``<= 0``: not a frame count (0 is NTNDArray's "not set", areaDetector counts from 1, a negative
      one is a producer's int32 wrap or bug): ``noid`` +1, nothing else moves;
    * the first one (or the first after :meth:`reset`): the base; nothing before it is counted;
    * above ``high``: the ``uid - high - 1`` between are missed; the newest ``window`` of those uids
      are remembered as gaps that a late frame may still fill;
    * a remembered gap: a late frame: ``outoforder`` +1 and ``missed`` -1 (its gap is filled);
    * 1 while ``high`` > 1, or more than ``window`` below ``high``: the source restarted
      (``restarts`` +1, ``last_restart``) and counting starts again from it;
    * below the base by at most ``window`` and not seen yet: a frame from before the base that came
      late: ``outoforder`` +1 (it left no gap to fill);
    * anything else (seen already): ``duplicates`` +1.

    ``missed`` is therefore "uniqueIds not received so far" and goes down when a late frame comes.
    Counts are Python ints (they never wrap). Each update is O(1) amortised: a jump remembers at
    most ``window`` gaps, and gaps older than ``window`` below ``high`` are forgotten (still missed).
    """

    def __init__(self, counters: Counters | None = None, window: int = REORDER_WINDOW) -> None:
        self.counters = counters if counters is not None else Counters()
        self.window = window
        self.base: int | None = None
        self.high: int | None = None
        #: (the highest uniqueId before, the uniqueId that restarted) of the last restart
        self.last_restart: tuple[int, int] | None = None
        #: the last uniqueId that was not a frame count
        self.last_noid: int | None = None
        #: an ordered set, oldest first (OrderedDict: taking the oldest is O(1); a dict's first key is
        #: found by scanning past every entry deleted before it)
        self._gaps: OrderedDict[int, None] = OrderedDict()
        self._early: set[int] = set()
        self._lock = threading.Lock()

    def update(self, uid: int, received: bool = True) -> None:
        """Count frame ``uid``; ``received=False``: a frame that was published but is not taken in
        (the current value on reconnecting, see :meth:`join`), so a new one counts as missed too."""
        with self._lock:
            changes = self._classify(int(uid), received)
        if changes:
            self.counters.add_many(changes)

    def update_many(self, uids: Sequence[int]) -> None:
        """Count the frames ``uids`` in order, as that many :meth:`update` calls would, under one lock
        and with one :meth:`Counters.add_many`."""
        total: dict[str, int] = {}
        with self._lock:
            for uid in uids:
                changes = self._classify(int(uid), True)
                if changes:
                    for k, v in changes.items():
                        total[k] = total.get(k, 0) + v
        total = {k: v for k, v in total.items() if v}
        if total:
            self.counters.add_many(total)

    def _classify(self, uid: int, received: bool) -> dict[str, int] | None:
        if uid <= 0:
            self.last_noid = uid
            return {"noid": 1} if received else None
        high = self.high
        if high is None:
            self._start(uid)
            return None
        if uid > high:
            gap = uid - high - 1
            if gap:
                self._gaps.update(dict.fromkeys(range(max(high + 1, uid - self.window), uid)))
                self.high = uid
                self._prune()
            else:
                self.high = uid
                if self._gaps:
                    self._prune()
            missed = gap + (0 if received else 1)
            return {"missed": missed} if missed else None
        if uid in self._gaps:
            del self._gaps[uid]
            return {"outoforder": 1, "missed": -1} if received else None
        if uid < high - self.window or (uid == 1 and high > 1):
            self.last_restart = (high, uid)
            self._start(uid)
            return {"restarts": 1} if received else {"restarts": 1, "missed": 1}
        if self.base is not None and uid < self.base and uid not in self._early:
            if not received:
                return None
            self._early.add(uid)  # at most window of them: high - window <= uid < base <= high
            return {"outoforder": 1}
        return {"duplicates": 1} if received else None

    def _start(self, uid: int) -> None:
        self.base = self.high = uid
        self._gaps.clear()
        self._early.clear()

    def _prune(self) -> None:
        assert self.high is not None
        oldest = self.high - self.window
        gaps = self._gaps
        while gaps:
            first = next(iter(gaps))
            if first >= oldest:
                break
            gaps.popitem(last=False)

    def join(self, uid: int, rejoin: bool = False) -> None:
        """The first update after a monitor connects: the channel's current value, not a new frame.

        On joining (``rejoin`` False: a new channel, or Enable after Disable) its uniqueId becomes
        the base and nothing before it is counted: the frames before were published before this
        stream was watched, and a uniqueId does not say where an acquisition began (ArrayCounter is
        not always reset between acquisitions, so ``uid - 1`` may be a million frames of earlier
        runs). The value itself is neither received nor missed. On *re*joining after a disconnect
        (``rejoin`` True) the frames published meanwhile were missed: up to and including this one
        (it is not taken in), as :meth:`update` with ``received=False`` counts them.
        """
        if rejoin and self.high is not None:
            self.update(uid, received=False)
            return
        with self._lock:
            self.base = self.high = None
            self._gaps.clear()
            self._early.clear()
            if uid > 0:
                self._start(int(uid))

    def reset(self) -> None:
        """Forget the stream's position (its counts live in ``counters``)."""
        self.join(0)


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
        #: ``on_stale(uid, rejoin)``: the first update after connecting (see :meth:`GapCounter.join`);
        #: ``rejoin`` is True after a disconnect, once this channel had given a value
        self.on_stale: Callable[[int, bool], None] = lambda uid, rejoin: None
        self._fresh = True
        self._joined = False
        #: connected as far as ``on_connect`` was told (it is told on a change, not on every frame)
        self._connected = False
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
            self._joined = False
            self._connected = False
            self._on_connect(False, f"monitoring {channel}" if channel else "no input channel")
            if channel:
                self._sub = self._context().monitor(
                    channel, self._callback, request=MONITOR_REQUEST, notify_disconnect=True
                )

    def _callback(self, value) -> None:
        if not isinstance(value, Exception):  # a frame (the hot path): as little as possible per update
            if not self._connected or self._fresh:
                self._first(value)
                return
            self._take(value)
            return
        self._connected = False
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
        self._on_connect(False, f"{self.channel}: {value!r}")

    def _first(self, value) -> None:
        """An update while not known to be connected, or the first after (re)connecting."""
        if value.getID() != "epics:nt/NTNDArray:1.0" and "dimension" not in value:
            self._on_bad(f"{self.channel} is not an NTNDArray ({value.getID()})")
            return
        self._connected = True
        self._on_connect(True, "")
        if self._fresh:
            # the first update after (re)connecting is the PV's current value: the last frame of an
            # earlier acquisition (or an IOC's empty start-up image), not a new frame
            self._fresh = False
            rejoin, self._joined = self._joined, True
            self.on_stale(int(value["uniqueId"]), rejoin)
            return
        self._take(value)

    def _take(self, value) -> None:
        """Decode a frame update and hand it on; an undecodable one is counted as bad."""
        try:
            frame = ntnd.decode(value, received=time.time())
        except ntnd.FrameError as exc:
            self._on_bad(str(exc))
            return
        except Exception as exc:  # not an NTNDArray at all (a field missing)
            self._on_bad(f"{self.channel} is not an NTNDArray ({value.getID()}: {exc!r})")
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
        self._ca: CAContext | None = None
        self._ca_sub: Subscription | None = None
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
        name = channel.removeprefix("pva://")
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
