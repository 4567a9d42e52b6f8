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
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
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
    read_record,
)

__all__ = ["Recorder", "read_record"]

_log = logging.getLogger(__name__)

QUEUE_BATCHES = 256
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
                 flush_period: float = 1.0, flush_frames: int = 1000) -> None:
        if not flush_period > 0 or flush_frames < 1:
            raise ValueError(f"Recorder: flush_period must be > 0 s and flush_frames >= 1, "
                             f"got {flush_period} s and {flush_frames}")
        self.path = path
        self.frames = frames
        self.attr_x, self.attr_y, self.scale = attr_x, attr_y, scale
        self.on_error = on_error or (lambda text: None)
        self.flush_period, self.flush_frames = float(flush_period), int(flush_frames)
        self.written = 0
        self.flushed = 0
        self.error = ""
        self._inbox_dropped = 0  # counted by submit (the publisher's thread) only
        self._write_dropped = 0  # counted by the writer thread only
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
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
        try:
            self._queue.put_nowait(result)
        except queue.Full:
            self._inbox_dropped += len(result.frames)

    # -- writer thread ------------------------------------------------------------------
    def _header(self, f: h5py.File) -> None:
        """The groups and attributes every record has from the start."""
        entry = f.create_group(ENTRY)
        entry.attrs.update({"NX_class": "NXentry", "program": "ptychostream", "start_time": self._start_time,
                            "complete": False, "flush_period_s": self.flush_period,
                            "flush_frames": self.flush_frames})
        f.create_group(DATA).attrs.update({"NX_class": "NXdata", "signal": "phase"})

    def _arrays(self, r: BatchResult) -> dict[str, np.ndarray]:
        """The rows one batch adds, by dataset path."""
        out = {f"{DATA}/{key}": np.asarray(r.outputs[key], np.float32)
               for key in ("phase", "amplitude") if key in r.outputs}
        xy = np.full((len(r.frames), 2), np.nan)
        for i, fr in enumerate(r.frames):
            try:
                xy[i] = (float(fr.attributes[self.attr_x]) * self.scale, float(fr.attributes[self.attr_y]) * self.scale)
            except (KeyError, TypeError, ValueError):
                pass
        out.update({f"{DATA}/unique_id": np.array([fr.unique_id for fr in r.frames], np.int64),
                    f"{DATA}/timestamp": np.array([fr.timestamp for fr in r.frames], np.float64),
                    f"{DATA}/latency_ms": (np.asarray(r.latency_s) * 1e3).astype(np.float32),
                    f"{DATA}/position_x_m": xy[:, 0], f"{DATA}/position_y_m": xy[:, 1]})
        if self.frames:
            out[f"{DETECTOR}/data"] = np.stack([fr.array for fr in r.frames])
        return out

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
                self._datasets[name] = f.create_dataset(name, shape=(0, *row), maxshape=(None, *row),
                                                        dtype=values.dtype, chunks=(rows, *row))
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

    def _flush(self) -> None:
        """Data to disk, then the recovery note, then that to disk: ``frames_flushed`` never runs ahead."""
        if self._file is None or self.flushed == self.written:
            return
        try:
            self._file.flush()
            self._datasets[FLUSHED][0] = self.written
            self._datasets[FLUSH_TIME][0] = time.time()
            self._file.flush()
            self.flushed = self.written
        except (OSError, ValueError) as exc:
            self._fail(f"flush: {exc}")

    def _fail(self, text: str) -> None:
        if not self.error:
            self.error = f"record {self.path}: stopped at frame {self.flushed}: {text}"
            self.on_error(self.error)

    def _take(self, item: BatchResult) -> None:
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
                if due is None and self.written > self.flushed:
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
