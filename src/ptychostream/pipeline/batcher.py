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
from ptychostream.model.infer import Model
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
        self.model: Model | None = None
        self.preprocess: Preprocess | None = None
        self._next: tuple[Model | None, Preprocess] | None = None
        self._taken: list[threading.Event] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._shape_ok: dict[tuple[int, ...], bool] = {}

    # -- control (any thread) ---------------------------------------------------
    def swap(self, model: Model | None, preprocess: Preprocess) -> threading.Event:
        """Serve ``model`` from the next batch on; the old model is closed after that batch.

        The returned event is set once the loop has switched (so "Ready" means serving).
        """
        taken = threading.Event()
        with self._lock:
            self._next = (model, preprocess)
            self._taken.append(taken)
        return taken

    def set_preprocess(self, preprocess: Preprocess) -> None:
        """Use ``preprocess`` from the next batch on, with the current (or pending) model."""
        with self._lock:
            model = self._next[0] if self._next else self.model
            self._next = (model, preprocess)
        if not self.is_alive():  # not started yet: nothing to wait for
            self._take_swap()

    def stop(self) -> None:
        """End the loop after the batch in hand; the serving model is closed."""
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
            except Exception:  # process() has counted every frame; the loop goes on
                _log.exception("batch failed")
            finally:
                self.queue.done(len(batch))
        if self.model is not None:
            self.model.close()

    def _fits(self, model: Model, pre: Preprocess, shape: tuple[int, ...]) -> bool:
        ok = self._shape_ok.get(shape)
        if ok is None:
            try:
                ok = tuple(pre.output_shape(shape)) == tuple(model.info.input_shape)
            except ValueError:
                ok = False
            self._shape_ok[shape] = ok
        return ok

    def _reject(self, n: int, reason: str) -> None:
        self.counters.add("rejected", n)
        self.on_reject(n, reason)

    def process(self, batch: list[QueuedFrame]) -> None:
        """Infer a batch with the serving model; every frame counts once, processed or rejected.

        Frames that do not fit the model or hold NaN/inf are rejected and the rest go on;
        frames of different raw shapes that all fit (through a crop) are inferred per shape.
        """
        model, pre = self.model, self.preprocess
        if model is None or pre is None:
            raise RuntimeError("process() needs a model: swap one in first")
        fits = [q.frame.array.ndim == 2 and self._fits(model, pre, q.frame.array.shape) for q in batch]
        good = [q for q, ok in zip(batch, fits) if ok]
        if len(good) < len(batch):
            bad = [q for q, ok in zip(batch, fits) if not ok]
            self._reject(len(bad), f"frame shape {bad[0].frame.array.shape} does not fit the model input "
                                   f"{tuple(model.info.input_shape)} with this pre-processing")
        by_shape: dict[tuple[int, ...], list[QueuedFrame]] = {}
        for q in good:
            by_shape.setdefault(q.frame.array.shape, []).append(q)
        for group in by_shape.values():
            self._infer(model, pre, group)

    def _infer(self, model: Model, pre: Preprocess, group: list[QueuedFrame]) -> None:
        """Infer and publish frames of one shape (NaN/inf frames rejected first)."""
        raw = np.stack([q.frame.array for q in group])
        if raw.dtype.kind == "f":
            finite = finite_mask(raw)
            if not finite.all():
                self._reject(int((~finite).sum()), "frame contains NaN or inf")
                group = [q for q, ok in zip(group, finite) if ok]
                raw = raw[finite]
                if not group:
                    return
        try:
            outputs = model.infer(pre.apply(raw))
            now = time.monotonic()
            latency = np.array([now - q.received for q in group])
            self.publisher.publish(BatchResult(
                frames=[q.frame for q in group], outputs=outputs, latency_s=latency,
                model_id=model.info.model_id, pixel_m=model.info.pixel_m,
            ))
        except Exception as exc:  # a failing batch is counted, the loop goes on
            _log.exception("inference failed")
            self._reject(len(group), f"inference failed: {exc}")
            return
        self.latency.add_many(latency)
        self.rate.add(len(group), now)
        self.counters.add("processed", len(group))
