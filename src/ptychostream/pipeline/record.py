"""Record: per-frame results, positions and the final mosaic to HDF5 (NeXus-like), off the live path.

The layout is described (and read back) by :mod:`ptychostream.files.record`.  Writing happens on
its own thread behind a bounded queue: the inference loop never waits; batches that do not fit
are counted as dropped.

Crash safety (HDF5 SWMR).  The record is created, with its header, when the recorder starts, and
closed again, so a crash before the first frame leaves a valid record with no frames.  The first
batch fixes the layout: a sibling file gets the header and every per-frame dataset (chunked,
resizable), is switched to SWMR mode and renamed over the record, so the record on disk is
always either the empty one or a SWMR file.  From then on the writer only appends, and flushes
at most ``flush_period`` seconds after the first unflushed frame or after ``flush_frames``
frames, whichever comes first; each flush writes the data, then ``frames_flushed`` (the
recovery note), then flushes again.  What SWMR forbids once it has started (new objects and
attributes: the final mosaic, ``end_time``, ``complete``) is written at a clean close, by
reopening the closed file in append mode.

Positions.  Every frame's row holds the position the live mosaic joins it to, from the
``source`` the device uses (``PositionSource``), and the source's name: the frame's NDAttributes,
a position table (NTTable chunks by uniqueId, :meth:`Recorder.add_positions`), motor readbacks
matched by time stamp (:meth:`Recorder.add_motor`, with the stitch stage's matcher) or a
trajectory by frame number.  A position that arrives after its frame's row was written (a late
table chunk, a motor sample that brackets the frame later) is written into that row then (SWMR
lets existing rows change) and is on disk from the next flush on.

Consistency.  Every row holds the frame's physics-consistency figure (``consistency``, the
Poisson deviance per pixel of :mod:`ptychostream.model.consistency`), NaN for a frame that was not
sampled (``ConsistencyShare``) or when no probe is known.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from ptychostream.core.frames import BatchResult
from ptychostream.files.record import (
    DATA,
    DETECTOR,
    ENTRY,
    FLUSH_TIME,
    FLUSHED,
    MOSAIC,
    POSITION_SOURCES,
    read_record,
)
from ptychostream.mosaic.positions import PatternPositions, TimestampMatcher

__all__ = ["Recorder", "read_record"]

_log = logging.getLogger(__name__)

QUEUE_BATCHES = 256
#: positions kept for frames not written yet, and written rows kept waiting for their position (oldest dropped)
MAX_WAITING = 100_000
#: the per-frame position source, stored as an HDF5 enum
SOURCE_DTYPE = h5py.enum_dtype({name: i for i, name in enumerate(POSITION_SOURCES)}, basetype="u1")
CHUNK = 64  #: frames per chunk at most
CHUNK_BYTES = 1 << 20  #: and about this many bytes per chunk (one frame at least)
_STOP = object()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Recorder:
    """An HDF5 record being written. ``submit`` is the publisher listener.

    ``flush_period`` (s) and ``flush_frames`` bound what a crash can lose: frames are on disk at
    most ``flush_period`` seconds after they were written, or sooner once ``flush_frames`` frames
    wait. ``written``, ``flushed`` and ``dropped`` count frames; ``written + dropped`` is every
    frame submitted.
    """

    def __init__(self, path: str, frames: bool = False, attr_x: str = "PositionX", attr_y: str = "PositionY",
                 scale: float = 1.0, on_error: Callable[[str], None] | None = None,
                 flush_period: float = 1.0, flush_frames: int = 1000, source: str = "Attributes",
                 trajectory: PatternPositions | None = None, motor_tolerance_s: float = 0.02) -> None:
        if not flush_period > 0 or flush_frames < 1:
            raise ValueError(f"Recorder: flush_period must be > 0 s and flush_frames >= 1, "
                             f"got {flush_period} s and {flush_frames}")
        if source not in POSITION_SOURCES:
            raise ValueError(f"Recorder: position source must be one of {', '.join(POSITION_SOURCES)}, not {source!r}")
        self.path = path
        self.frames = frames
        self.attr_x, self.attr_y, self.scale = attr_x, attr_y, scale
        # the writer thread's position state (changed through its queue only)
        self._source = source
        self._trajectory = trajectory
        self._motors = TimestampMatcher(tolerance_s=motor_tolerance_s)
        self._motor_xy = [np.nan, np.nan]  # the latest x, y motor values (scaled)
        self._known: OrderedDict[int, tuple[float, float]] = OrderedDict()  # by uid, frames not written yet
        self._waiting: OrderedDict[int, tuple[int, float]] = OrderedDict()  # uid -> (row, time stamp), no position
        self._positions_dirty = False  # rows changed in place since the last flush
        self._queued = 0  # batches in the queue (bounded by QUEUE_BATCHES)
        self._queued_lock = threading.Lock()
        self.on_error = on_error or (lambda text: None)
        self.flush_period, self.flush_frames = float(flush_period), int(flush_frames)
        self.written = 0
        self.flushed = 0
        self.error = ""
        self._inbox_dropped = 0  # counted by submit (the publisher's thread) only
        self._write_dropped = 0  # counted by the writer thread only
        self._queue: queue.Queue = queue.Queue()  # batches (bounded by _queued) and position updates
        self._file: h5py.File | None = None  # the SWMR file, from the first batch on
        self._datasets: dict[str, h5py.Dataset] = {}
        self._start_time = _now()
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise OSError(f"folder {parent} does not exist")
        with h5py.File(path, "w", libver="latest") as f:  # raises OSError if unwritable
            self._header(f)
        self._thread = threading.Thread(target=self._run, name="ptychostream-record", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Frames not written: the inbox was full, or the record had stopped on an error."""
        return self._inbox_dropped + self._write_dropped

    # -- live path ------------------------------------------------------------------
    def submit(self, result: BatchResult) -> None:
        """Queue a batch for writing; never blocks (a full queue counts the batch as dropped)."""
        with self._queued_lock:
            full = self._queued >= QUEUE_BATCHES
            if not full:
                self._queued += 1
        if full:
            self._inbox_dropped += len(result.frames)
        else:
            self._queue.put_nowait(result)

    def add_positions(self, uids, y, x) -> None:
        """Positions by uniqueId (a PositionPV table chunk, unscaled as it came; ``scale`` applies), for
        PositionSource=Table. Any thread, never blocks."""
        self._queue.put_nowait(("positions", np.asarray(uids).reshape(-1), np.asarray(y, np.float64).reshape(-1),
                                np.asarray(x, np.float64).reshape(-1)))

    def add_motor(self, axis: int, t: float, value: float) -> None:
        """A motor readback (axis 0 = x, 1 = y, unscaled) at time ``t``, for PositionSource=Motors."""
        self._queue.put_nowait(("motor", int(axis), float(t), float(value)))

    def configure(self, source: str | None = None, motor_tolerance_s: float | None = None) -> None:
        """Change the position source or the motor tolerance, from the next batch on."""
        if source is not None and source not in POSITION_SOURCES:
            raise ValueError(f"Recorder: position source must be one of {', '.join(POSITION_SOURCES)}, not {source!r}")
        self._queue.put_nowait(("configure", source, motor_tolerance_s))

    def set_trajectory(self, trajectory: PatternPositions | None) -> None:
        """The trajectory of PositionSource=Trajectory (positions by frame number), from the next batch on."""
        self._queue.put_nowait(("trajectory", trajectory))

    # -- writer thread ------------------------------------------------------------------
    def _header(self, f: h5py.File) -> None:
        """The groups and attributes every record has from the start."""
        entry = f.create_group(ENTRY)
        entry.attrs.update({"NX_class": "NXentry", "program": "ptychostream", "start_time": self._start_time,
                            "complete": False, "flush_period_s": self.flush_period,
                            "flush_frames": self.flush_frames})
        f.create_group(DATA).attrs.update({"NX_class": "NXdata", "signal": "phase"})

    def _positions(self, r: BatchResult) -> np.ndarray:
        """(n, 2) (y, x) metres of a batch's frames from the current source, NaN where not known yet."""
        n, src = len(r.frames), self._source
        yx = np.full((n, 2), np.nan)
        if src == "Attributes":
            for i, fr in enumerate(r.frames):
                try:
                    yx[i] = (float(fr.attributes[self.attr_y]) * self.scale,
                             float(fr.attributes[self.attr_x]) * self.scale)
                except (KeyError, TypeError, ValueError):
                    pass
        elif src == "Trajectory" and self._trajectory is not None:
            yx = self._trajectory.lookup([fr.unique_id for fr in r.frames])
        elif src == "Motors":
            yx = self._motors.lookup_many([fr.timestamp for fr in r.frames])
        elif src == "Table":
            for i, fr in enumerate(r.frames):
                got = self._known.pop(int(fr.unique_id), None)
                if got is not None:
                    yx[i] = got
        return yx

    def _arrays(self, r: BatchResult) -> dict[str, np.ndarray]:
        """The rows one batch adds, by dataset path."""
        out = {f"{DATA}/{key}": np.asarray(r.outputs[key], np.float32)
               for key in ("phase", "amplitude") if key in r.outputs}
        yx = self._positions(r)
        out.update({f"{DATA}/unique_id": np.array([fr.unique_id for fr in r.frames], np.int64),
                    f"{DATA}/timestamp": np.array([fr.timestamp for fr in r.frames], np.float64),
                    f"{DATA}/latency_ms": (np.asarray(r.latency_s) * 1e3).astype(np.float32),
                    f"{DATA}/consistency": self._consistency(r),
                    f"{DATA}/position_x_m": yx[:, 1], f"{DATA}/position_y_m": yx[:, 0],
                    f"{DATA}/position_source": np.full(len(r.frames), POSITION_SOURCES.index(self._source), np.uint8)})
        if self.frames:
            out[f"{DETECTOR}/data"] = np.stack([fr.array for fr in r.frames])
        return out

    @staticmethod
    def _consistency(r: BatchResult) -> np.ndarray:
        """The per-frame physics-consistency figure (Poisson deviance per pixel), NaN where not computed."""
        n = len(r.frames)
        if r.consistency is None:
            return np.full(n, np.nan, np.float32)
        return np.asarray(r.consistency, np.float32).reshape(n)

    def _open_swmr(self, r: BatchResult, arrays: dict[str, np.ndarray]) -> None:
        """Lay the record out for the first batch in a sibling file, start SWMR, rename it over the record."""
        target = Path(self.path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.swmr")
        f = h5py.File(tmp, "w", libver="latest")
        try:
            self._header(f)
            f[ENTRY].attrs["model_id"] = r.model_id
            if self.frames:
                f.create_group(DETECTOR).attrs["NX_class"] = "NXdetector"
            for name, values in arrays.items():
                row = values.shape[1:]
                rows = max(1, min(CHUNK, CHUNK_BYTES // max(1, values[:1].nbytes)))
                dtype = SOURCE_DTYPE if name.endswith("/position_source") else values.dtype
                self._datasets[name] = f.create_dataset(name, shape=(0, *row), maxshape=(None, *row),
                                                        dtype=dtype, chunks=(rows, *row))
            for name, dtype in ((FLUSHED, np.int64), (FLUSH_TIME, np.float64)):
                self._datasets[name] = f.create_dataset(name, shape=(1,), maxshape=(1,), chunks=(1,), dtype=dtype,
                                                        fillvalue=0)
            f.swmr_mode = True
            os.replace(tmp, target)
        except BaseException:
            self._datasets.clear()
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        self._file = f

    def _check(self, arrays: dict[str, np.ndarray]) -> None:
        """Refuse a batch that does not fit the layout the first batch fixed (SWMR adds no datasets)."""
        have = {name for name in self._datasets if name.startswith(DATA) or name.startswith(DETECTOR)}
        if set(arrays) != have:
            names = sorted(n.rsplit("/", 1)[1] for n in set(arrays) ^ have)
            raise ValueError(f"the batch's outputs differ from the record's (model changed?): {', '.join(names)}")
        for name, values in arrays.items():
            ds = self._datasets[name]
            if values.shape[1:] != ds.shape[1:] or not np.can_cast(values.dtype, ds.dtype, "safe"):
                raise ValueError(f"{name}: rows of {values.dtype} {values.shape[1:]} do not fit the record's "
                                 f"{ds.dtype} {ds.shape[1:]}")

    def _write(self, r: BatchResult) -> None:
        arrays = self._arrays(r)
        if self._file is None:
            self._open_swmr(r, arrays)
        else:
            self._check(arrays)
        n = self.written
        for name, values in arrays.items():
            ds = self._datasets[name]
            ds.resize(n + len(values), axis=0)
            ds[n:] = values
        self.written += len(r.frames)
        missing = np.flatnonzero(~np.isfinite(arrays[f"{DATA}/position_y_m"] + arrays[f"{DATA}/position_x_m"]))
        for i in missing.tolist():  # their position may still come (a late table chunk, a later motor sample)
            self._waiting[int(r.frames[i].unique_id)] = (n + i, float(r.frames[i].timestamp))
        while len(self._waiting) > MAX_WAITING:
            self._waiting.popitem(last=False)

    def _fill(self, found: dict[int, tuple[float, float]]) -> None:
        """Write positions into rows written without one (uid -> (y, x)); the rest wait or are kept for later."""
        rows: dict[int, tuple[float, float]] = {}
        for uid, yx in found.items():
            if not (np.isfinite(yx[0]) and np.isfinite(yx[1])):
                continue
            waiting = self._waiting.pop(uid, None)
            if waiting is not None and self._file is not None:
                rows[waiting[0]] = yx
            else:  # for a frame still to come (a table runs ahead of the frames)
                self._known[uid] = yx
                self._known.move_to_end(uid)
        while len(self._known) > MAX_WAITING:
            self._known.popitem(last=False)
        if rows:
            order = sorted(rows)
            values = np.array([rows[i] for i in order], np.float64)
            self._datasets[f"{DATA}/position_y_m"][order] = values[:, 0]
            self._datasets[f"{DATA}/position_x_m"][order] = values[:, 1]
            self._positions_dirty = True

    def _retry_waiting(self) -> None:
        """Rows waiting for a motor sample or a trajectory: look them up again."""
        if not self._waiting or self._source not in ("Motors", "Trajectory"):
            return
        uids = list(self._waiting)
        if self._source == "Motors":
            yx = self._motors.lookup_many([self._waiting[u][1] for u in uids])
        elif self._trajectory is not None:
            yx = self._trajectory.lookup(uids)
        else:
            return
        self._fill({u: (float(p[0]), float(p[1])) for u, p in zip(uids, yx) if np.isfinite(p).all()})

    def _position_update(self, item: tuple) -> None:
        kind = item[0]
        if kind == "positions":
            _, uids, y, x = item
            if not len(uids) == len(y) == len(x):
                raise ValueError(f"a position chunk of {len(uids)} uniqueIds, {len(y)} y and {len(x)} x values")
            self._fill({int(u): (float(yv) * self.scale, float(xv) * self.scale) for u, yv, xv in zip(uids, y, x)})
        elif kind == "motor":
            _, axis, t, value = item
            self._motor_xy[axis] = value * self.scale
            self._motors.add_sample(t, self._motor_xy[1], self._motor_xy[0])  # axis 0 = x, 1 = y
            self._retry_waiting()
        elif kind == "configure":
            _, source, tolerance = item
            if source is not None:
                self._source = source
            if tolerance is not None:
                self._motors.tolerance_s = float(tolerance)
            self._retry_waiting()
        elif kind == "trajectory":
            self._trajectory = item[1]
            self._retry_waiting()

    def _flush(self) -> None:
        """Data to disk, then the recovery note, then that to disk: ``frames_flushed`` never runs ahead."""
        if self._file is None or (self.flushed == self.written and not self._positions_dirty):
            return
        try:
            self._file.flush()
            self._datasets[FLUSHED][0] = self.written
            self._datasets[FLUSH_TIME][0] = time.time()
            self._file.flush()
            self.flushed = self.written
            self._positions_dirty = False
        except (OSError, ValueError) as exc:
            self._fail(f"flush: {exc}")

    def _fail(self, text: str) -> None:
        if not self.error:
            self.error = f"record {self.path}: stopped at frame {self.flushed}: {text}"
            self.on_error(self.error)

    def _take(self, item: BatchResult | tuple) -> None:
        if isinstance(item, tuple):  # a position update
            if not self.error:
                try:
                    self._position_update(item)
                except (OSError, ValueError, TypeError) as exc:
                    self._fail(f"positions: {exc}")
            return
        with self._queued_lock:
            self._queued -= 1
        if self.error:
            self._write_dropped += len(item.frames)
            return
        try:
            self._write(item)
        except (OSError, ValueError, TypeError) as exc:  # full disk, shape change...
            self._write_dropped += len(item.frames)
            self._flush()  # what was written before the failing batch
            self._fail(str(exc))

    def _run(self) -> None:
        due: float | None = None  # when the unflushed frames must be on disk
        while True:
            try:
                item = self._queue.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None:
                self._take(item)
                if due is None and (self.written > self.flushed or self._positions_dirty):
                    due = time.monotonic() + self.flush_period
            if due is not None and (self.written - self.flushed >= self.flush_frames or time.monotonic() >= due):
                self._flush()
                due = None
        self._flush()

    def close(self, mosaic: Any = None) -> None:
        """Drain the queue, flush, close; then add the final mosaic (a MosaicImage), the end time and ``complete``."""
        self._queue.put(_STOP)
        self._thread.join()
        try:
            if self._file is not None:
                self._file.close()
            with h5py.File(self.path, "a", libver="latest") as f:
                if mosaic is not None:
                    g = f.create_group(MOSAIC)
                    g.attrs.update({"NX_class": "NXdata", "signal": "phase", "pixel_size_m": mosaic.pixel_m,
                                    "origin_y_m": mosaic.origin_m[0], "origin_x_m": mosaic.origin_m[1],
                                    "n_patches": mosaic.n_patches})
                    g["phase"] = mosaic.phase
                    g["coverage"] = mosaic.coverage
                    if mosaic.amplitude is not None:
                        g["amplitude"] = mosaic.amplitude
                f[ENTRY].attrs.update({"end_time": _now(), "frames_written": self.written,
                                       "frames_dropped": self.dropped, "error": self.error})
                f[ENTRY].attrs["complete"] = True  # last: a record is complete only with all of the above
        except (OSError, ValueError) as exc:
            self.error = f"record {self.path}: {exc}"
            self.on_error(self.error)
        finally:
            self._file = None
            self._datasets.clear()
