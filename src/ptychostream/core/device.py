"""Sans-I/O device state: one value table built from db/, shared by every front end.

Front ends (``pva.py``, ``ca.py``) translate protocol puts into :meth:`DeviceState.put`
and post every :class:`Reading` the state announces. Device logic registers put
handlers and writes readbacks with :meth:`DeviceState.set`; it never sees a protocol.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

from ptychostream.core.frames import ImageFrame
from ptychostream.core.messages import MessageLog
from ptychostream.core.pvdb import PutError, PVDatabase, PVSpec

__all__ = ["Reading", "DeviceState", "PutError", "Busy"]


@dataclass(frozen=True)
class Reading:
    """A PV's current value with its alarm and time stamp."""

    value: Any
    severity: int = 0
    message: str = ""
    timestamp: float = field(default_factory=time.time)


@dataclass
class Busy:
    """Returned by a put handler whose put completes later (areaDetector's busy Acquire).

    ``done`` completes the client's put: with a result (the value to store, or None for ``value``)
    or with a :class:`PutError`, which refuses the put then. The setpoint is stored at once,
    unless ``setpoint_later``: then it is stored when ``done`` succeeds and left as it was if
    the put is refused (a handler whose slow part, a file read, may still fail).
    """

    value: Any
    done: Future
    setpoint_later: bool = False


Listener = Callable[[PVSpec, Reading], None]
#: what an image PV carries: a frame, or a table's columns
ImagePayload = ImageFrame | dict[str, Any]
ImageSink = Callable[[PVSpec, ImagePayload], None]
PutHandler = Callable[[Any], Any]


class DeviceState:
    """Thread-safe PV values with validation, put handlers and change listeners."""

    def __init__(self, db: PVDatabase, message_pv: str | None = None,
                 refused_pv: str | None = None, history_pv: str | None = None) -> None:
        self.db = db
        self.message_pv = message_pv
        self.refused_pv = refused_pv
        self.history_pv = history_pv
        #: every message by reason, with counts and times (``message_pv`` shows the newest)
        self.messages = MessageLog()
        self._history_version = -1
        #: guards the values and the listeners; held only for a store and its announcement
        self._lock = threading.RLock()
        #: serialises the put handlers (a put and its handler's state changes are one step); never
        #: held for slow work: a handler hands file I/O to a thread and returns a Busy
        self.handler_lock = threading.RLock()
        self._values: dict[str, Reading] = {
            s.suffix: Reading(s.initial, s.severity_of(s.initial) if s.kind == "enum" else 0)
            for s in db
            if s.kind not in ("image", "table")
        }
        self._handlers: dict[str, PutHandler] = {}
        self._image_put: dict[str, Callable[[ImageFrame], None]] = {}
        self._bad_image: dict[str, Callable[[str], None]] = {}
        self._listeners: list[Listener] = []
        self._image_sinks: list[ImageSink] = []

    # -- wiring -------------------------------------------------------------
    def on_put(self, suffix: str) -> Callable[[PutHandler], PutHandler]:
        """Register ``handler(value) -> value | None`` for puts to ``suffix``.

        The handler applies the setting and writes its readback; raising
        :class:`PutError` refuses the put and leaves the setpoint unchanged.
        """
        spec = self.db[suffix]
        if not spec.writable:
            raise ValueError(f"{suffix} is not writable in db/")

        def register(handler: PutHandler) -> PutHandler:
            if spec.kind == "image":
                self._image_put[suffix] = handler
            else:
                self._handlers[suffix] = handler
            return handler

        return register

    def on_bad_image(self, suffix: str) -> Callable[[Callable[[str], None]], Callable[[str], None]]:
        """Register ``handler(reason)`` for puts to the image PV ``suffix`` that do not decode into a
        frame: it accounts for them (a received frame that was rejected, say) and explains them,
        or raises :class:`PutError` to refuse the put instead (see :meth:`put_bad_image`)."""
        if self.db[suffix].kind != "image":
            raise ValueError(f"{suffix} is not an image PV in db/")

        def register(handler: Callable[[str], None]) -> Callable[[str], None]:
            self._bad_image[suffix] = handler
            return handler

        return register

    def subscribe(self, listener: Listener, replay: bool = False) -> None:
        """Call ``listener(spec, reading)`` on every change; ``replay`` first sends every current value
        (atomically with the subscription, so a front end built from an earlier snapshot misses nothing)."""
        with self._lock:
            self._listeners.append(listener)
            if replay:
                for suffix, reading in self._values.items():
                    listener(self.db[suffix], reading)

    def add_image_sink(self, sink: ImageSink) -> None:
        """Call ``sink(spec, frame)`` for every image (or table) :meth:`post_image` publishes."""
        self._image_sinks.append(sink)

    # -- access ---------------------------------------------------------------
    def get(self, suffix: str) -> Any:
        """The current value of a scalar PV."""
        return self._values[suffix].value

    def reading(self, suffix: str) -> Reading:
        """The current value with its alarm and time stamp."""
        return self._values[suffix]

    def readings(self) -> dict[str, Reading]:
        """A snapshot of every scalar PV."""
        with self._lock:
            return dict(self._values)

    def put(self, suffix: str, raw: Any) -> Any:
        """A client put: validate against db/, run the handler, store the setpoint.

        Returns the stored value, or a :class:`Busy` whose future completes the put later.
        A refused put raises PutError, counts in ``refused_pv`` and explains in ``message_pv``;
        so does a Busy put whose future fails. Handlers run one at a time (:attr:`handler_lock`),
        but never under the value lock: a reading, the status task or another thread's
        :meth:`set` does not wait for a handler.
        """
        try:
            if suffix not in self.db:
                raise PutError(f"no PV {suffix}")
            value = self.db[suffix].coerce(raw)
            with self.handler_lock:
                handler = self._handlers.get(suffix)
                result = handler(value) if handler is not None else None
                busy = result if isinstance(result, Busy) else None
                if busy is not None:
                    result = busy.value
                if result is not None:
                    value = result
                if busy is None or not busy.setpoint_later:
                    self.set(suffix, value)
        except PutError as exc:
            self.refused(f"put refused: {exc}")
            raise
        if busy is None:
            return value
        later = busy.setpoint_later
        settled: Future = Future()
        busy.done.add_done_callback(lambda done: self._settle(suffix, value, later, done, settled))
        return Busy(value, settled, later)

    def _settle(self, suffix: str, value: Any, store: bool, done: Future, settled: Future) -> None:
        """A Busy put completed: store a ``setpoint_later`` setpoint, or count and explain a refusal;
        then complete ``settled``, the future the caller of :meth:`put` holds (so whoever waits on it
        finds the setpoint stored, the refusal counted)."""
        exc = done.exception()
        try:
            if exc is None:
                if store:
                    result = done.result()
                    self.set(suffix, value if result is None else result)
            elif isinstance(exc, PutError):
                self.refused(f"put refused: {exc}")
            else:
                self.refused(f"put to {suffix} failed: {exc}")
        finally:
            if exc is None:
                settled.set_result(done.result())
            else:
                settled.set_exception(exc)

    def refused(self, text: str) -> None:
        """Count a refused request and show why."""
        if self.refused_pv:
            with self._lock:
                self.set(self.refused_pv, self.get(self.refused_pv) + 1)
        self.message(text, severity=1)

    def message(self, text: str, severity: int = 0, frames: int = 0, routine: bool = False) -> None:
        """Record a status message in :attr:`messages` and show it in ``message_pv``, unless it is a
        repeat (or a ``routine`` report) that would hide a different message younger than the log's
        ``hold_s`` (see :class:`~ptychostream.core.messages.MessageLog`). ``frames``: how many
        frames it is about, added to its reason's count."""
        with self._lock:  # the log's verdict and the PV's value in the same order for every thread
            if self.messages.add(text, severity, frames=frames, routine=routine) and self.message_pv:
                self.set(self.message_pv, text, severity=severity)

    def publish_messages(self) -> None:
        """Show a held-back repeat whose turn has come in ``message_pv`` and write the message history
        into ``history_pv`` if it changed (a periodic task calls this)."""
        with self._lock:
            due = self.messages.due()
            if due is not None and self.message_pv:
                self.set(self.message_pv, due[0], severity=due[1])
        version = self.messages.version
        if self.history_pv and version != self._history_version:
            self._history_version = version
            self.set(self.history_pv, self.messages.format(self.db[self.history_pv].max_length - 1))

    def put_image(self, suffix: str, frame: ImageFrame) -> None:
        """A client put of an NTNDArray frame to a writable image PV.

        A refused frame raises PutError, counts in ``refused_pv`` and explains in ``message_pv``.
        Frames take no lock here: the handler is the data path.
        """
        try:
            handler = self._image_put.get(self._image_pv(suffix))
            if handler is None:
                raise PutError(f"{suffix} is not accepting frames")
            handler(frame)
        except PutError as exc:
            self.refused(f"frame put refused: {exc}")
            raise

    def put_bad_image(self, suffix: str, reason: str) -> NoReturn:
        """A client put to a writable image PV that does not decode into a frame (``reason`` says why).

        Always raises PutError, so that the client gets ``reason``. The :meth:`on_bad_image` handler
        accounts for it; without one, or if the handler refuses it, it counts in ``refused_pv``.
        """
        try:
            handler = self._bad_image.get(self._image_pv(suffix))
            if handler is None:
                raise PutError(reason)
            handler(reason)
        except PutError as exc:
            self.refused(f"frame put refused: {exc}")
            raise
        raise PutError(reason)

    def _image_pv(self, suffix: str) -> str:
        spec = self.db[suffix] if suffix in self.db else None
        if spec is None or spec.kind != "image" or not spec.writable:
            raise PutError(f"{suffix} does not take frames")
        return suffix

    def set(self, suffix: str, value: Any, severity: int | None = None, message: str = "") -> bool:
        """Device-side write (any thread). Returns True when the value or alarm changed."""
        spec = self.db[suffix]
        if spec.kind == "float":
            value = float(value)
        elif spec.kind in ("int", "enum"):
            value = int(value)
        elif spec.kind == "string":
            value = _clip_utf8(str(value), spec.max_length - 1)
        if severity is None:
            severity = spec.severity_of(value)
        with self._lock:
            old = self._values[suffix]
            if old.value == value and old.severity == severity and old.message == message:
                return False
            reading = Reading(value, severity, message)
            self._values[suffix] = reading
            for listener in self._listeners:
                listener(spec, reading)
        return True

    def set_many(self, values: dict[str, Any]) -> None:
        """:meth:`set` each ``suffix: value``."""
        for suffix, value in values.items():
            self.set(suffix, value)

    def post_image(self, suffix: str, frame: ImagePayload) -> None:
        """Publish an image (or a table's columns) to every sink (the PVA front end, recorders)."""
        spec = self.db[suffix]
        for sink in self._image_sinks:
            sink(spec, frame)


def _clip_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore")
