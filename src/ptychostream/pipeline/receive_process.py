"""Receive in a child process: a p4p monitor there, frames to this process through a shared-memory ring.

:class:`ProcessReceiver` has the interface of :class:`~ptychostream.pipeline.receive.Receiver`
(``monitor``, ``close``, ``channel``, ``on_stale``) but hands frames on in batches. Its child
(``multiprocessing`` with the ``spawn`` start method: no p4p thread is ever forked) runs a
:class:`Receiver` of its own: the same monitor request, decode and bad-frame reasons. Each frame
it decodes goes into a :class:`~ptychostream.pipeline.ring.FrameRing` (laid out by the first frame,
laid out again when a frame does not fit or the frames have shrunk for a while); what the ring
cannot carry (a frame of another rank or type, attributes too large) goes over the control pipe,
pickled. A full ring refuses the frame: its uniqueId is sent back and the device counts it as
received and dropped.

Order is kept across the two channels: every message on the pipe carries the ring's write count
when it was sent, the reader takes the ring's frames up to that count before it acts on the message,
and a shared count of messages sent tells the reader, before it reads the ring, which messages it
must receive first.

One reader thread here takes every frame ready in the ring at once (:meth:`FrameRing.read`) and
calls ``on_frames(frames)``. A child that dies is started again, counted (``restarts``) and told
through ``on_restart``; the frames it had put in the ring are taken in first. The child imports
p4p, numpy and this package's receive path only (no inference runtime).
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from itertools import count
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ptychostream.core.frames import ImageFrame
from ptychostream.pipeline.receive import Receiver
from ptychostream.pipeline.ring import (
    ATTR_BYTES,
    RING_BYTES,
    WRITE,
    FrameRing,
    carries,
    ring_slots,
)

__all__ = ["CLOSE_S", "SHRINK_AFTER", "ProcessReceiver", "RingWriter", "child_main"]

_log = logging.getLogger(__name__)

#: how long close() waits for the child to quit, then again after SIGKILL
CLOSE_S = 1.0
#: a ring is laid out again for smaller frames after this many in a row fit half a slot
SHRINK_AFTER = 256
#: dropped uniqueIds sent back in one message (or sooner: before the next frame taken, every IDLE_S)
DROPS_PER_MESSAGE = 256
#: the child's idle period (flushes dropped uniqueIds); the reader's longest wait for a frame
IDLE_S = 0.05
#: the reader waits this long after a small batch, so a fast stream comes in batches, not frame by frame
SMALL_BATCH, SMALL_BATCH_WAIT_S = 64, 0.001
#: frames taken from the ring in one batch at most (the rest in the next, at once)
READ_LIMIT = 512
#: a child is started at most this often (one that dies at once is not restarted in a tight loop)
RESTART_S = 1.0
#: cells of the shared control array: messages sent by the child, reader asleep
_SENT, _ASLEEP = 0, 1
_instances = count()


# -- the child ---------------------------------------------------------------------------------
class RingWriter:
    """The child's side: frames into the ring, events onto the pipe, both in one order."""

    def __init__(self, conn: Connection, ctl: Any, prefix: str, ring_bytes: int) -> None:
        self.conn = conn
        self.ctl = np.frombuffer(ctl, np.int64)
        self.prefix, self.ring_bytes = prefix, ring_bytes
        self.ring: FrameRing | None = None
        self.gen = 0
        self.small = 0
        self.drops: list[int] = []
        self.lock = threading.Lock()
        self.quiet = False  # no connect events while our own monitor() runs (the parent said it)

    def _seq(self) -> int:
        return int(self.ring.header[WRITE]) if self.ring is not None else 0

    def send(self, *msg: Any) -> None:
        """A message with the ring's write count; counted as sent before anything written after it."""
        with self.lock:
            self._send(msg)

    def _send(self, msg: tuple) -> None:
        self.conn.send((*msg, self._seq()))
        self.ctl[_SENT] += 1

    def _flush_drops(self) -> None:
        if self.drops:
            drops, self.drops = self.drops, []
            self._send(("dropped", drops))

    def flush(self) -> None:
        with self.lock:
            self._flush_drops()

    def _layout(self, nbytes: int) -> FrameRing:
        self._flush_drops()
        if self.ring is not None:
            self.ring.close()  # the reader drains and unlinks it
        self.gen += 1
        self.ring = FrameRing(f"{self.prefix}_{self.gen}", ring_slots(nbytes, self.ring_bytes), nbytes, create=True)
        self.small = 0
        self._send(("layout", self.ring.name))
        return self.ring

    def frame(self, frame: ImageFrame) -> None:
        """A decoded frame (the monitor's thread)."""
        a = frame.array
        blob = pickle.dumps(frame.attributes, 5) if frame.attributes else b""
        with self.lock:
            if len(blob) > ATTR_BYTES or not carries(a):
                self._send(("frame", frame))  # the ring cannot carry it: pickled, in order
                return
            ring = self.ring
            if ring is None or a.nbytes > ring.slot_bytes:
                ring = self._layout(a.nbytes)
            elif 2 * a.nbytes <= ring.slot_bytes:
                self.small += 1
                if self.small >= SHRINK_AFTER:
                    ring = self._layout(a.nbytes)
            else:
                self.small = 0
            if ring.free() <= 0:
                ring.write(frame, blob)  # refused: counted in the ring's header
                self.drops.append(frame.unique_id)
                if len(self.drops) >= DROPS_PER_MESSAGE:
                    self._flush_drops()
                return
            self._flush_drops()  # the refused frames came before this one
            ring.write(frame, blob)
            if self.ctl[_ASLEEP]:
                self.ctl[_ASLEEP] = 0
                self._send(("wake",))


def child_main(conn: Connection, ctl: Any, prefix: str, ring_bytes: int) -> None:
    """The receive process: monitors the channel the parent names, until it says quit or goes away.

    SIGINT and SIGTERM are the parent's to act on (a terminal's Ctrl-C reaches the whole group): the
    child ends when told, or when the pipe closes because the parent ended."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    writer = RingWriter(conn, ctl, prefix, ring_bytes)

    def on_connect(connected: bool, text: str) -> None:
        if not writer.quiet:
            writer.send("connect", connected, text)

    receiver = Receiver(writer.frame, lambda reason: writer.send("bad", reason), on_connect)
    receiver.on_stale = lambda uid, rejoin: writer.send("stale", uid)
    writer.send("started", os.getpid())
    try:
        while True:
            if not conn.poll(IDLE_S):
                writer.flush()
                continue
            cmd = conn.recv()
            if cmd[0] == "quit":
                break
            if cmd[0] == "monitor":
                writer.quiet = True
                try:
                    receiver.monitor(cmd[1])
                finally:
                    writer.quiet = False
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        receiver.close()
        try:
            writer.flush()
        except (OSError, ValueError):
            pass
        if writer.ring is not None:
            writer.ring.close()


# -- the parent --------------------------------------------------------------------------------
class ProcessReceiver:
    """Monitors one PVA channel at a time from a child process; frames come as batches.

    ``on_frames(frames)``: the frames taken from the ring at once (one array per run of one shape,
    each frame a view); ``on_bad(reason)``, ``on_connect(connected, text)``, ``on_stale(uid, rejoin)``
    as :class:`Receiver`'s; ``on_dropped(uids)``: frames the child received but the full ring
    refused; ``on_restart(n, text)``: the child died and was started again (the ``n``-th time).
    """

    def __init__(
        self,
        on_frames: Callable[[Sequence[ImageFrame]], None],
        on_bad: Callable[[str], None],
        on_connect: Callable[[bool, str], None],
        on_dropped: Callable[[Sequence[int]], None],
        ring_bytes: int = RING_BYTES,
    ) -> None:
        self._on_frames, self._on_bad, self._on_connect = on_frames, on_bad, on_connect
        self._on_dropped = on_dropped
        self.on_stale: Callable[[int, bool], None] = lambda uid, rejoin: None
        self.on_restart: Callable[[int, str], None] = lambda n, text: None
        self.ring_bytes = ring_bytes
        self.channel = ""
        #: times the child died and was started again; frames the ring refused
        self.restarts = 0
        self.dropped = 0
        self._joined = False
        self._prefix = f"ptyrx{os.getpid()}_{next(_instances)}"
        self._starts = 0
        self._lock = threading.Lock()  # monitor/close against each other and the restart
        self._proc: Any = None
        self._conn: Connection | None = None
        self._ctl: np.ndarray | None = None
        self._ring: FrameRing | None = None
        self._received = 0  # messages received of the current child
        self._reader: threading.Thread | None = None
        self._closing = False
        self._started = 0.0
        self.pid: int | None = None  # the child's, once it said so

    # -- the interface of Receiver --
    def monitor(self, channel: str) -> None:
        """Switch to ``channel`` ("" stops monitoring); starts the child at the first channel."""
        with self._lock:
            self.channel = channel
            self._joined = False
            self._on_connect(False, f"monitoring {channel}" if channel else "no input channel")
            if self._proc is None:
                if not channel:
                    return
                self._closing = False
                self._start()
            self._command(("monitor", channel))

    def close(self) -> None:
        """Stop the child (quit, then SIGKILL after :data:`CLOSE_S` s) and the reader, which takes in
        what the ring still holds first; bounded by about 3 x CLOSE_S."""
        with self._lock:
            self._closing = True
            proc = self._proc
            if proc is None:
                return
            self._command(("quit",))
            proc.join(CLOSE_S)
            if proc.is_alive():
                proc.kill()
                proc.join(CLOSE_S)
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(CLOSE_S)
        with self._lock:
            self._teardown()

    # -- the child's life --
    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        ctl = ctx.RawArray("q", 4)
        self._starts += 1
        proc = ctx.Process(target=child_main, args=(child, ctl, f"{self._prefix}_{self._starts}", self.ring_bytes),
                           name="ptychostream-receive", daemon=True)
        proc.start()
        child.close()  # ours: the child's death then reads as EOF here
        self._proc, self._conn, self._ctl, self._received = proc, parent, np.frombuffer(ctl, np.int64), 0
        self._started = time.monotonic()
        if self._reader is None or not self._reader.is_alive():
            self._reader = threading.Thread(target=self._read_loop, name="ptychostream-receive-reader", daemon=True)
            self._reader.start()

    def _command(self, cmd: tuple) -> None:
        try:
            if self._conn is not None:
                self._conn.send(cmd)
        except (OSError, ValueError):  # the child is gone; the reader restarts it
            pass

    def _teardown(self) -> None:
        """Forget the child: its pipe, its ring (unlinked), any block it left (under lock)."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        if self._ring is not None:
            self._ring.unlink()
            self._ring.close()
            self._ring = None
        if self._proc is not None:
            for path in glob.glob(f"/dev/shm/{self._prefix}_{self._starts}_*"):  # a layout never announced
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self._proc = None
        self.pid = None

    def _restart(self, why: str) -> None:
        """The child died: take in what its ring holds, then start another one on the same channel."""
        with self._lock:
            if self._closing or self._proc is None:
                return
            proc = self._proc
            proc.join(CLOSE_S)
            code = proc.exitcode
            time.sleep(max(0.0, self._started + RESTART_S - time.monotonic()))
            self._teardown()
            self.restarts += 1
            text = (f"receive process died ({why}, exit code {code}); restarted it on "
                    f"{self.channel or 'no channel'} ({self.restarts} restart(s))")
            _log.warning("%s", text)
            # _joined stays: the new child's first update is a rejoin, the frames published meanwhile missed
            self._start()
            if self.channel:
                self._command(("monitor", self.channel))
        self._on_connect(False, text)
        self.on_restart(self.restarts, text)

    # -- the reader thread --
    def _read_loop(self) -> None:
        while True:
            with self._lock:
                conn, ctl, closing = self._conn, self._ctl, self._closing
            if conn is None or ctl is None:
                return
            try:
                wait = self._take(conn, ctl)
            except (EOFError, OSError) as exc:
                self._drain()
                if closing or self._closing:
                    return
                self._restart(f"pipe closed: {exc!r}" if str(exc) else "pipe closed")
                continue
            except Exception:  # a bug here must not end receiving silently
                _log.exception("receive reader")
                wait = IDLE_S
            if wait:
                self._sleep(conn, ctl, wait)

    def _take(self, conn: Connection, ctl: np.ndarray) -> float:
        """Act on the messages sent so far and take the ring's frames; returns how long to wait next."""
        ring = self._ring
        w = int(ring.header[WRITE]) if ring is not None else 0
        sent = int(ctl[_SENT])  # after the write count: every message sent before those frames
        # and whatever else is in the pipe (a message larger than the pipe holds is counted as sent only
        # once it is all written, so it must be read before it is counted)
        while self._received < sent or conn.poll(0):
            self._handle(conn.recv())
            self._received += 1
        if ring is not self._ring:  # a new layout: its count is read next time round
            return 0.0
        if ring is None:
            return IDLE_S
        frames = ring.read(upto=w, limit=READ_LIMIT)
        n = len(frames)
        if frames:
            self._on_frames(frames)
        if n >= SMALL_BATCH:
            return 0.0
        return SMALL_BATCH_WAIT_S if n else IDLE_S

    def _sleep(self, conn: Connection, ctl: np.ndarray, wait: float) -> None:
        if wait < IDLE_S:
            time.sleep(wait)
            return
        ctl[_ASLEEP] = 1  # the child wakes us at its next frame
        ring = self._ring
        if (ring is None or not ring.ready()) and self._received >= int(ctl[_SENT]):
            conn.poll(wait)
        ctl[_ASLEEP] = 0

    def _upto(self, seq: int) -> None:
        """Hand on the ring's frames written before the message that said ``seq``."""
        if self._ring is not None:
            frames = self._ring.read(upto=seq)
            if frames:
                self._on_frames(frames)

    def _handle(self, msg: tuple) -> None:
        kind, seq = msg[0], msg[-1]
        if kind == "wake":
            return
        self._upto(seq)
        if kind == "layout":
            self._drain_ring()
            self._ring = FrameRing(msg[1])
        elif kind == "connect":
            self._on_connect(bool(msg[1]), msg[2])
        elif kind == "stale":
            rejoin, self._joined = self._joined, True
            self.on_stale(int(msg[1]), rejoin)
        elif kind == "bad":
            self._on_bad(msg[1])
        elif kind == "frame":
            self._on_frames([msg[1]])
        elif kind == "dropped":
            self.dropped += len(msg[1])
            self._on_dropped(msg[1])
        elif kind == "started":
            self.pid = int(msg[1])

    def _drain_ring(self) -> None:
        """Take every frame left in the ring, then unlink and unmap it."""
        ring, self._ring = self._ring, None
        if ring is None:
            return
        frames = ring.read()
        if frames:
            self._on_frames(frames)
        ring.unlink()
        ring.close()

    def _drain(self) -> None:
        """After the child ended: the messages still in the pipe, then the ring."""
        conn = self._conn
        try:
            while conn is not None and conn.poll(0):
                self._handle(conn.recv())
        except (EOFError, OSError):
            pass
        try:
            self._drain_ring()
        except Exception:
            _log.exception("receive reader: draining the ring")
