"""Infer: the dynamic-batching loop between the frame queue and the publisher.

It takes whatever is queued, up to ``batch_size``, validates the frames, runs the
current model, and hands results on. A new model is swapped in between batches,
so a hot swap loses no frame.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np

from ptychostream.core.frames import BatchResult
from ptychostream.core.stats import Counters, LatencyWindow, RateMeter
from ptychostream.model.preprocess import Preprocess, finite_mask
from ptychostream.pipeline.publish import Publisher
from ptychostream.pipeline.queue import FrameQueue, QueuedFrame

__all__ = ["Batcher"]

_log = logging.getLogger(__name__)


class Batcher(threading.Thread):
    """One inference thread. ``model`` may be None: frames then wait in the queue."""

    def __init__(
        self,
        queue: FrameQueue,
        publisher: Publisher,
        counters: Counters,
        latency: LatencyWindow,
        rate: RateMeter,
        on_reject: Callable[[int, str], None],
    ) -> None:
        super().__init__(name="ptychostream-infer", daemon=True)
        self.queue = queue
        self.publisher = publisher
        self.counters = counters
        self.latency = latency
        self.rate = rate
        self.on_reject = on_reject
        self.batch_size = 64
        self.model = None
        self.preprocess: Preprocess | None = None
        self._next: tuple[object, Preprocess] | None = None
        self._taken: list[threading.Event] = []
        self._retired: list[object] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._shape_ok: dict[tuple[int, ...], bool] = {}

    # -- control (any thread) ---------------------------------------------------
    def swap(self, model, preprocess: Preprocess) -> threading.Event:
        """Serve ``model`` from the next batch on; the old model is closed after that batch.

        The returned event is set once the loop has switched (so "Ready" means serving).
        """
        taken = threading.Event()
        with self._lock:
            self._next = (model, preprocess)
            self._taken.append(taken)
        return taken

    def set_preprocess(self, preprocess: Preprocess) -> None:
        with self._lock:
            model = self._next[0] if self._next else self.model
            self._next = (model, preprocess)
        if not self.is_alive():  # not started yet: nothing to wait for
            self._take_swap()

    def stop(self) -> None:
        self._stop_event.set()

    # -- loop ---------------------------------------------------------------------
    def _take_swap(self) -> None:
        with self._lock:
            pending, self._next = self._next, None
            taken, self._taken = self._taken, []
        if pending is None:
            return
        old = self.model
        self.model, self.preprocess = pending
        self._shape_ok.clear()
        for event in taken:
            event.set()
        if old is not None and old is not self.model:
            try:
                old.close()
            except Exception:  # closing must not stop the stream
                _log.exception("closing the previous model failed")

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._take_swap()
            if self.model is None:
                self._stop_event.wait(0.02)
                continue
            batch = self.queue.get_batch(self.batch_size, timeout=0.05)
            if not batch:
                continue
            # a swap or setting made before these frames were queued applies to them
            self._take_swap()
            if self.model is None:  # unloaded meanwhile: the frames wait for the next model
                self.queue.requeue(batch)
                continue
            try:
                self.process(batch)
            except Exception as exc:  # a failing batch is counted, the loop goes on
                _log.exception("inference failed")
                self.counters.add("rejected", len(batch))
                self.on_reject(len(batch), f"inference failed: {exc}")
            finally:
                self.queue.done(len(batch))
        if self.model is not None:
            self.model.close()

    def _fits(self, shape: tuple[int, ...]) -> bool:
        ok = self._shape_ok.get(shape)
        if ok is None:
            try:
                ok = tuple(self.preprocess.output_shape(shape)) == tuple(self.model.info.input_shape)
            except ValueError:
                ok = False
            self._shape_ok[shape] = ok
        return ok

    def process(self, batch: list[QueuedFrame]) -> None:
        model, pre = self.model, self.preprocess
        fits = [q.frame.array.ndim == 2 and self._fits(q.frame.array.shape) for q in batch]
        good = [q for q, ok in zip(batch, fits) if ok]
        if len(good) < len(batch):
            bad = [q for q, ok in zip(batch, fits) if not ok]
            shape = bad[0].frame.array.shape
            self.counters.add("rejected", len(bad))
            self.on_reject(len(bad), f"frame shape {shape} does not fit the model input "
                                     f"{tuple(model.info.input_shape)} with this pre-processing")
        if not good:
            return
        raw = np.stack([q.frame.array for q in good])
        if raw.dtype.kind == "f":
            finite = finite_mask(raw)
            if not finite.all():
                nbad = int((~finite).sum())
                self.counters.add("rejected", nbad)
                self.on_reject(nbad, "frame contains NaN or inf")
                good = [q for q, ok in zip(good, finite) if ok]
                raw = raw[finite]
                if not good:
                    return
        x = pre.apply(raw)
        outputs = model.infer(x)
        now = time.monotonic()
        latency = np.array([now - q.received for q in good])
        self.publisher.publish(BatchResult(
            frames=[q.frame for q in good], outputs=outputs, latency_s=latency,
            model_id=model.info.model_id, pixel_m=model.info.pixel_m,
        ))
        self.latency.add_many(latency)
        self.rate.add(len(good), now)
        self.counters.add("processed", len(good))
