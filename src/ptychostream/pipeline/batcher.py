"""Infer: the dynamic-batching loop between the frame queue and the publisher.

It takes whatever is queued, up to ``batch_size``, validates the frames, runs the
current model, and hands results on. A new model is swapped in between batches,
so a hot swap loses no frame.

Every frame of a batch is judged on its own, with whole-batch array operations: frames of a
shape the model does not take, frames holding NaN/inf and frames whose *output* holds NaN/inf
are rejected (the last also count as ``nonfinite``); the rest of the batch goes on.
:class:`OutputHealth` raises an alarm when a model keeps giving non-finite outputs, and
:class:`RecentFrames` remembers what is streaming, so that a hot swap can be checked against
real frames before it is taken.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Sequence

import numpy as np

from ptychostream.core.frames import BatchResult
from ptychostream.core.stats import Counters, LatencyWindow, RateMeter
from ptychostream.model.infer import Model
from ptychostream.model.preprocess import Preprocess, finite_mask
from ptychostream.pipeline.publish import Publisher
from ptychostream.pipeline.queue import FrameQueue, QueuedFrame

__all__ = ["Batcher", "OutputHealth", "RecentFrames", "NONFINITE_WINDOW", "NONFINITE_MINOR",
           "NONFINITE_MAJOR", "STREAM_MEMORY_S", "STREAM_FRAMES", "NONFINITE_REASON", "LINGER_MIN_S",
           "LINGER_MAX_S"]

_log = logging.getLogger(__name__)

#: a model's outputs are judged over its last NONFINITE_WINDOW inferred frames
NONFINITE_WINDOW = 100
#: a MINOR alarm when more than this fraction of them came out NaN/inf, MAJOR above NONFINITE_MAJOR
NONFINITE_MINOR = 0.1
NONFINITE_MAJOR = 0.5
#: the reason a frame with a NaN/inf output is rejected with
NONFINITE_REASON = "non-finite output"
#: how long the loop may wait for a full batch once a frame is queued (s), so that a fast stream is
#: inferred in batches rather than a frame or two at a time, each paying a batch's fixed cost (model
#: call, listeners, readbacks). The wait adapts: it doubles (up to LINGER_MAX_S) while frames keep
#: coming during it and the batch still does not fill, and halves (down to LINGER_MIN_S) when none
#: came, so a slow stream waits at most LINGER_MIN_S per frame.
LINGER_MIN_S = 0.0002
LINGER_MAX_S = 0.004
#: "now streaming": the frames of the last STREAM_MEMORY_S seconds, at most the last STREAM_FRAMES
STREAM_MEMORY_S = 10.0
STREAM_FRAMES = 256


def nonfinite_rows(outputs: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Boolean (n,): True where any output of a frame holds NaN or inf."""
    bad = np.zeros(n, dtype=bool)
    for arr in outputs.values():
        bad |= ~np.isfinite(arr.reshape(n, -1)).all(axis=1)
    return bad


class OutputHealth:
    """Which of a model's last ``window`` frames gave a non-finite output, and the alarm that earns.

    Severity 2 (MAJOR) when more than :data:`NONFINITE_MAJOR` of them did, 1 (MINOR) above
    :data:`NONFINITE_MINOR`, else 0; judged on the frames seen so far until the window is full.
    """

    def __init__(self, window: int = NONFINITE_WINDOW) -> None:
        self._bad = np.zeros(window, dtype=bool)
        self._n = 0
        self.severity = 0

    def add(self, bad: np.ndarray) -> bool:
        """Record one batch's flags (True = non-finite); True when the severity changed."""
        bad = np.asarray(bad, dtype=bool).ravel()
        keep = bad[-len(self._bad):]
        start = self._n + len(bad) - len(keep)
        self._bad[(start + np.arange(len(keep))) % len(self._bad)] = keep
        self._n += len(bad)
        k, seen = self.counts()
        severity = 2 if k > NONFINITE_MAJOR * seen else 1 if k > NONFINITE_MINOR * seen else 0
        changed, self.severity = severity != self.severity, severity
        return changed

    def counts(self) -> tuple[int, int]:
        """(non-finite frames, frames) in the window."""
        seen = min(self._n, len(self._bad))
        return int(self._bad[:seen].sum()), seen

    def reset(self) -> None:
        self._n = 0
        self.severity = 0


class RecentFrames:
    """What is streaming: per raw frame shape, how many recent frames had it, and the latest of them.

    "Recent" is the last ``max_frames`` frames seen within ``memory_s`` seconds. Updated once
    per shape group of a batch; :meth:`dominant` is what a hot swap is checked against.
    """

    def __init__(self, memory_s: float = STREAM_MEMORY_S, max_frames: int = STREAM_FRAMES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.memory_s = memory_s
        self.max_frames = max_frames
        self.clock = clock
        self._marks: deque[tuple[float, tuple[int, ...], int]] = deque()
        self._count: dict[tuple[int, ...], int] = {}
        self._latest: dict[tuple[int, ...], np.ndarray] = {}
        self._total = 0
        self._lock = threading.Lock()

    def add(self, shape: tuple[int, ...], n: int, latest: np.ndarray) -> None:
        """``n`` frames of ``shape`` arrived, ``latest`` the last (kept only if it holds no NaN/inf)."""
        usable = latest.dtype.kind not in "fc" or bool(np.isfinite(latest).all())
        with self._lock:
            self._marks.append((self.clock(), shape, n))
            self._count[shape] = self._count.get(shape, 0) + n
            self._total += n
            if usable:
                self._latest[shape] = latest
            self._prune()

    def _prune(self) -> None:
        old = self.clock() - self.memory_s
        while self._marks and (self._marks[0][0] < old or self._total - self._marks[0][2] >= self.max_frames):
            _, shape, n = self._marks.popleft()
            self._total -= n
            self._count[shape] -= n
            if not self._count[shape]:
                del self._count[shape]
                self._latest.pop(shape, None)

    def dominant(self) -> np.ndarray | None:
        """The latest usable frame of the shape most recent frames had; None when nothing streams."""
        with self._lock:
            self._prune()
            usable = [shape for shape in self._count if shape in self._latest]
            if not usable:
                return None
            return self._latest[max(usable, key=self._count.__getitem__)]

    def clear(self) -> None:
        with self._lock:
            self._marks.clear()
            self._count.clear()
            self._latest.clear()
            self._total = 0


#: model, pre-processing, raw frames (n, H, W), model inputs (n, h, w), outputs -> (n,) or None; the raw
#: frames and the inputs are the loop's reused buffers: valid during the call only (copy what is kept)
AfterInfer = Callable[[Model, Preprocess, np.ndarray, np.ndarray, dict[str, np.ndarray]], "np.ndarray | None"]


class Batcher(threading.Thread):
    """One inference thread. ``model`` may be None: frames then wait in the queue.

    ``on_health(severity, text)`` is called from the thread when the serving model's
    :class:`OutputHealth` changes (and with text "" when a swap clears it).
    """

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
        #: the longest wait for a full batch (see :data:`LINGER_MAX_S`; 0: take whatever is queued at once)
        self.linger_max_s = LINGER_MAX_S
        self._linger = LINGER_MIN_S
        #: the raw-frame stack and the model-input buffers, reused from batch to batch (a new array of
        #: a few MB per batch is fresh mmapped pages, faulted in and unmapped again each time)
        self._buffers: dict[str, np.ndarray] = {}
        self.model: Model | None = None
        self.preprocess: Preprocess | None = None
        self._next: tuple[Model | None, Preprocess] | None = None
        self._taken: list[threading.Event] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        #: raw frame shape -> the model-input frame shape it pre-processes into, None: it does not fit
        self._shape_ok: dict[tuple[int, ...], tuple[int, ...] | None] = {}
        self.health = OutputHealth()
        self.on_health: Callable[[int, str], None] = lambda severity, text: None
        self.recent = RecentFrames()
        #: ``after_infer(model, pre, raw, inputs, outputs)`` runs on this thread after each inferred
        #: group of finite outputs and returns a per-frame figure (n,) or None; it is the hook of the
        #: physics-consistency check. A failure is logged, never costs a frame.
        self.after_infer: AfterInfer | None = None

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
        alarmed = self.health.severity if old is not self.model else 0
        if old is not self.model:  # the alarm was about the old model's outputs
            self.health.reset()
        for event in taken:
            event.set()
        if alarmed:
            self._tell_health(0, "")
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
            linger = min(self._linger, self.linger_max_s)
            batch = self.queue.get_batch(self.batch_size, timeout=0.05, linger=linger)
            if not batch:
                continue
            self._adapt_linger(len(batch), self.queue.lingered)
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

    def _adapt_linger(self, n: int, came: int) -> None:
        """Longer waits while a stream keeps coming during them, shorter when nothing came."""
        if came > 0 and n < self.batch_size:
            self._linger = min(self._linger * 2, LINGER_MAX_S)
        elif came == 0:
            self._linger = max(self._linger / 2, LINGER_MIN_S)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A reused C-contiguous (n, ...) array of ``dtype``: the first ``shape[0]`` rows of a buffer that
        grows (doubling, up to the batch size) with the largest batch seen, and is replaced when the
        frame shape or dtype changes."""
        n = shape[0]
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:]:
            buf = None
        if buf is None or buf.shape[0] < n:
            rows = max(n, min(2 * (0 if buf is None else buf.shape[0]), self.batch_size))
            buf = self._buffers[name] = np.empty((rows, *shape[1:]), dtype=dtype)
        return buf[:n]

    def streaming_frame(self) -> np.ndarray | None:
        """A recent real frame of the shape now streaming (see :class:`RecentFrames`), or None."""
        return self.recent.dominant()

    def _fits(self, model: Model, pre: Preprocess, shape: tuple[int, ...]) -> bool:
        if shape not in self._shape_ok:
            out: tuple[int, ...] | None = None
            try:
                out = tuple(pre.output_shape(shape))
                fits = len(shape) == 2 and out == tuple(model.info.input_shape)
            except ValueError:
                fits = False
            self._shape_ok[shape] = out if fits else None
        return self._shape_ok[shape] is not None

    def _reject(self, n: int, reason: str) -> None:
        self.counters.add("rejected", n)
        self.on_reject(n, reason)

    def process(self, batch: list[QueuedFrame]) -> None:
        """Infer a batch with the serving model; every frame counts once, processed or rejected.

        The batch is split by raw frame shape (one pass); a shape the model does not take
        (through the pre-processing) is rejected as a whole group, every other group is
        inferred on its own, so one odd frame costs only itself.
        """
        model, pre = self.model, self.preprocess
        if model is None or pre is None:
            raise RuntimeError("process() needs a model: swap one in first")
        by_shape: dict[tuple[int, ...], list[QueuedFrame]] = {}
        for q in batch:
            by_shape.setdefault(q.frame.array.shape, []).append(q)
        misfits = [shape for shape in by_shape if not self._fits(model, pre, shape)]
        if misfits:
            what = (f"frame shape {misfits[0]} does not fit" if len(misfits) == 1 else
                    f"frame shapes {', '.join(str(shape) for shape in misfits)} do not fit")
            self._reject(sum(len(by_shape[shape]) for shape in misfits),
                         f"{what} the model input {tuple(model.info.input_shape)} with this pre-processing")
        for shape, group in by_shape.items():
            if len(shape) == 2:
                self.recent.add(shape, len(group), group[-1].frame.array)
            if shape not in misfits:
                self._infer(model, pre, group)

    def _infer(self, model: Model, pre: Preprocess, group: list[QueuedFrame]) -> None:
        """Infer and publish frames of one shape; NaN/inf inputs are rejected first, NaN/inf
        outputs after (not published, counted as ``nonfinite`` too)."""
        shape = group[0].frame.array.shape
        dtype = np.result_type(*{q.frame.array.dtype for q in group})  # one dtype, or what holds them all
        raw = np.stack([q.frame.array for q in group], out=self._buffer("raw", (len(group), *shape), dtype))
        if raw.dtype.kind == "f":
            finite = finite_mask(raw)
            if not finite.all():
                self._reject(int((~finite).sum()), "frame contains NaN or inf")
                group = _select(group, finite)
                raw = raw[finite]
                if not group:
                    return
        try:
            in_shape = self._shape_ok.get(shape) or tuple(pre.output_shape(shape))
            inputs = pre.apply(raw, out=self._buffer("input", (len(raw), *in_shape), np.dtype(np.float32)))
            outputs = model.infer(inputs)
        except Exception as exc:  # a failing batch is counted, the loop goes on
            _log.exception("inference failed")
            self._reject(len(group), f"inference failed: {exc}")
            return
        bad = nonfinite_rows(outputs, len(group))
        n_bad = int(bad.sum())
        if n_bad:
            group = _select(group, ~bad)
            outputs = {label: arr[~bad] for label, arr in outputs.items()}
            raw, inputs = raw[~bad], inputs[~bad]
        changed = self.health.add(bad)
        if n_bad:
            self.counters.add("nonfinite", n_bad)
            k, seen = self.health.counts()
            self._reject(n_bad, f"{NONFINITE_REASON} (NaN or inf) from model {model.info.name}"
                                + (f", {k} of its last {seen} frames" if self.health.severity else ""))
        if changed:
            self._tell_health(self.health.severity, self._health_text(model))
        if group:
            figure = self._after_infer(model, pre, raw, inputs, outputs)
            self._publish(model, group, outputs, figure)

    def _after_infer(self, model: Model, pre: Preprocess, raw: np.ndarray, inputs: np.ndarray,
                     outputs: dict[str, np.ndarray]) -> np.ndarray | None:
        hook = self.after_infer
        if hook is None:
            return None
        try:
            figure = hook(model, pre, raw, inputs, outputs)
        except Exception:  # a check must not cost a frame
            _log.exception("the after-inference check failed")
            return None
        return None if figure is None else np.asarray(figure, dtype=np.float32).reshape(len(raw))

    def _tell_health(self, severity: int, text: str) -> None:
        try:
            self.on_health(severity, text)
        except Exception:  # a report must not stop the stream
            _log.exception("reporting the model's output health failed")

    def _health_text(self, model: Model) -> str:
        k, seen = self.health.counts()
        if self.health.severity:
            return (f"model {model.info.name} gives NaN or inf on {k} of its last {seen} frames: "
                    "those frames are rejected, not published; check the model and the pre-processing")
        return f"model {model.info.name} outputs are finite again ({k} of its last {seen} frames NaN or inf)"

    def _publish(self, model: Model, group: list[QueuedFrame], outputs: dict[str, np.ndarray],
                 consistency: np.ndarray | None = None) -> None:
        """Hand finite results on and count them processed (a failing listener rejects them)."""
        now = time.monotonic()
        latency = np.array([now - q.received for q in group])
        try:
            self.publisher.publish(BatchResult(
                frames=[q.frame for q in group], outputs=outputs, latency_s=latency,
                model_id=model.info.model_id, pixel_m=model.info.pixel_m, consistency=consistency,
            ))
        except Exception as exc:  # counted, the loop goes on
            _log.exception("publishing failed")
            self._reject(len(group), f"publishing failed: {exc}")
            return
        self.latency.add_many(latency)
        self.rate.add(len(group), now)
        self.counters.add("processed", len(group))


def _select(items: Sequence[QueuedFrame], keep: np.ndarray) -> list[QueuedFrame]:
    """The items where ``keep`` is True (only called when some are not)."""
    return [items[int(i)] for i in np.flatnonzero(keep)]
