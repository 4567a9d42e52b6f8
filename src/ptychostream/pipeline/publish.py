"""Publish: per-frame results out as NTNDArray images, decimated for displays.

Every result still reaches the result listeners (stitcher, recorder), in order, on the
inference thread; only the ``Phase``/``Amplitude`` image posts are limited by ``PublishRate``.
Once :meth:`Publisher.start` ran, the posts (an NTNDArray encode each) are made on a thread of
their own, so inference never waits on them: with a rate cap the poster takes only the latest
due result; with ``PublishRate`` 0 it posts every frame, and when it falls more than
:data:`MAX_PENDING` frames behind, the oldest posts are skipped and counted (:attr:`Publisher.skipped`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Callable, Sequence

from ptychostream.core.device import DeviceState
from ptychostream.core.frames import BatchResult, ImageFrame

__all__ = ["Publisher", "MAX_PENDING"]

_log = logging.getLogger(__name__)

#: frames whose image posts may wait for the poster thread (PublishRate 0) before the oldest are skipped
MAX_PENDING = 4096


class Publisher:
    """Posts Phase/Amplitude images at most ``rate_hz`` times a second (0 = every frame)."""

    IMAGE_PVS = {"phase": "Phase", "amplitude": "Amplitude"}

    def __init__(self, device: DeviceState, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` (seconds, monotonic) times the decimation."""
        self.device = device
        self.clock = clock
        self.rate_hz = 0.0
        self._next = 0.0
        self.listeners: list[Callable[[BatchResult], None]] = []
        #: image posts skipped because the poster thread was :data:`MAX_PENDING` frames behind
        self.skipped = 0
        self._pending: deque[tuple[BatchResult, Sequence[int]]] = deque()
        self._pending_frames = 0
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the poster thread ----------------------------------------------------------
    def start(self) -> None:
        """Post images on a thread of their own from now on (until :meth:`stop`)."""
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="ptychostream-publish", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Post what is pending (for up to ``timeout`` s), then end the thread; posts are inline again."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread.join(timeout)
        with self._cond:
            self._thread = None

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every pending image is posted; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                result, indices = self._pending.popleft()
                self._pending_frames -= len(indices)
                self._busy = True
            try:
                self._post(result, indices)
            except Exception:  # a failing post must not end the poster
                _log.exception("posting Phase/Amplitude failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    # -- any thread -------------------------------------------------------------------
    def set_rate(self, rate_hz: float) -> float:
        """Cap the image posts at ``rate_hz`` (0 or less: every frame); the next result posts at once."""
        self.rate_hz = max(0.0, float(rate_hz))
        self._next = 0.0
        return self.rate_hz

    def add_listener(self, listener: Callable[[BatchResult], None]) -> None:
        self.listeners = [*self.listeners, listener]  # copy-on-write: publish() may be iterating

    def remove_listener(self, listener: Callable[[BatchResult], None]) -> None:
        """Stop calling ``listener``; a bound method matches its equal (``rec.submit`` is new each time)."""
        self.listeners = [x for x in self.listeners if x != listener]

    def publish(self, result: BatchResult) -> None:
        """Hand ``result`` to every listener, then post its images (the last frame only when rate-limited)."""
        for listener in self.listeners:
            listener(result)
        if not result.frames or not any(key in result.outputs for key in self.IMAGE_PVS):
            return
        indices: Sequence[int]
        if self.rate_hz > 0:
            now = self.clock()
            if now < self._next:
                return
            self._next = now + 1.0 / self.rate_hz
            indices = [len(result.frames) - 1]
        else:
            indices = range(len(result.frames))
        if self._thread is None:
            self._post(result, indices)
            return
        skipped = 0
        with self._cond:
            if self.rate_hz > 0:  # a display wants the newest: an older post still waiting is superseded
                self._pending.clear()
                self._pending_frames = 0
            self._pending.append((result, indices))
            self._pending_frames += len(indices)
            while self._pending_frames > MAX_PENDING and len(self._pending) > 1:
                _, old = self._pending.popleft()
                self._pending_frames -= len(old)
                skipped += len(old)
            self.skipped += skipped
            self._cond.notify_all()
        if skipped:
            self.device.message(f"Phase/Amplitude posts fell more than {MAX_PENDING} frames behind: the oldest were "
                                "not posted (every result is still stitched and recorded); set PublishRate for a "
                                "display", severity=1, frames=skipped, routine=True)

    def _post(self, result: BatchResult, indices: Sequence[int]) -> None:
        """Post the images of ``result``'s frames ``indices``, with their metadata and ``Consistency``."""
        consistency = result.consistency
        for key, pv in self.IMAGE_PVS.items():
            data = result.outputs.get(key)
            if data is None:
                continue
            for i in indices:
                src = result.frames[i]
                attrs = dict(src.attributes)
                attrs.pop("ColorMode", None)
                attrs["LatencyMs"] = float(result.latency_s[i] * 1e3)
                attrs["ModelId"] = result.model_id
                if consistency is not None and math.isfinite(figure := float(consistency[i])):
                    attrs["Consistency"] = figure
                self.device.post_image(pv, ImageFrame(
                    array=data[i],
                    unique_id=src.unique_id,
                    timestamp=src.timestamp,
                    data_timestamp=src.data_timestamp,
                    attributes=attrs,
                ))
