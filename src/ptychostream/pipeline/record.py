"""Record: per-frame results, positions and the final mosaic to HDF5 (NeXus-like), off the live path.

The layout is described (and read back) by :mod:`ptychostream.files.record`.  Writing happens on
its own thread behind a bounded queue: the inference loop never waits; batches that do not fit
are counted as dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from ptychostream.core.frames import BatchResult
from ptychostream.files.record import DATA, DETECTOR, ENTRY, MOSAIC, read_record

__all__ = ["Recorder", "read_record"]

_log = logging.getLogger(__name__)

QUEUE_BATCHES = 256
CHUNK = 64


class Recorder:
    """An HDF5 record being written. ``submit`` is the publisher listener."""

    def __init__(self, path: str, frames: bool = False, attr_x: str = "PositionX", attr_y: str = "PositionY",
                 scale: float = 1.0, on_error: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.frames = frames
        self.attr_x, self.attr_y, self.scale = attr_x, attr_y, scale
        self.on_error = on_error or (lambda text: None)
        self.written = 0
        self.dropped = 0
        self.error = ""
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise OSError(f"folder {parent} does not exist")
        self._file = h5py.File(path, "w")  # raises OSError if unwritable
        entry = self._file.create_group(ENTRY)
        entry.attrs.update({"NX_class": "NXentry", "program": "ptychostream",
                            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        data = self._file.create_group(DATA)
        data.attrs.update({"NX_class": "NXdata", "signal": "phase"})
        self._entry, self._data = entry, data
        self._thread = threading.Thread(target=self._run, name="ptychostream-record", daemon=True)
        self._thread.start()

    # -- live path ------------------------------------------------------------------
    def submit(self, result: BatchResult) -> None:
        """Queue a batch for writing; never blocks (a full queue counts the batch as dropped)."""
        try:
            self._queue.put_nowait(result)
        except queue.Full:
            self.dropped += len(result.frames)

    # -- writer thread ------------------------------------------------------------------
    def _append(self, group: h5py.Group, name: str, values: np.ndarray) -> None:
        if name not in group:
            group.create_dataset(name, shape=(0, *values.shape[1:]), maxshape=(None, *values.shape[1:]),
                                 dtype=values.dtype, chunks=(min(CHUNK, max(1, len(values))), *values.shape[1:]))
        ds = group[name]
        n = ds.shape[0]
        ds.resize(n + len(values), axis=0)
        ds[n:] = values

    def _write(self, r: BatchResult) -> None:
        f = self._entry
        if "model_id" not in f.attrs:
            f.attrs["model_id"] = r.model_id
        d = self._data
        for key in ("phase", "amplitude"):
            if key in r.outputs:
                self._append(d, key, np.asarray(r.outputs[key], np.float32))
        self._append(d, "unique_id", np.array([fr.unique_id for fr in r.frames], np.int64))
        self._append(d, "timestamp", np.array([fr.timestamp for fr in r.frames], np.float64))
        self._append(d, "latency_ms", (np.asarray(r.latency_s) * 1e3).astype(np.float32))
        xy = np.full((len(r.frames), 2), np.nan)
        for i, fr in enumerate(r.frames):
            try:
                xy[i] = (float(fr.attributes[self.attr_x]) * self.scale, float(fr.attributes[self.attr_y]) * self.scale)
            except (KeyError, TypeError, ValueError):
                pass
        self._append(d, "position_x_m", xy[:, 0])
        self._append(d, "position_y_m", xy[:, 1])
        if self.frames:
            det = self._file.require_group(DETECTOR)
            det.attrs["NX_class"] = "NXdetector"
            self._append(det, "data", np.stack([fr.array for fr in r.frames]))
        self.written += len(r.frames)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error:
                self.dropped += len(item.frames)
                continue
            try:
                self._write(item)
            except (OSError, ValueError, TypeError) as exc:  # full disk, shape change...
                self.error = f"record {self.path}: {exc}"
                self.dropped += len(item.frames)
                self.on_error(self.error)

    def close(self, mosaic: Any = None) -> None:
        """Drain the queue, add the final mosaic (a MosaicImage), and close the file."""
        self._queue.put(None)
        self._thread.join()
        try:
            if mosaic is not None:
                g = self._file.create_group(MOSAIC)
                g.attrs.update({"NX_class": "NXdata", "signal": "phase", "pixel_size_m": mosaic.pixel_m,
                                "origin_y_m": mosaic.origin_m[0], "origin_x_m": mosaic.origin_m[1],
                                "n_patches": mosaic.n_patches})
                g["phase"] = mosaic.phase
                g["coverage"] = mosaic.coverage
                if mosaic.amplitude is not None:
                    g["amplitude"] = mosaic.amplitude
            self._entry.attrs["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        except (OSError, ValueError) as exc:
            self.error = f"record {self.path}: {exc}"
            self.on_error(self.error)
        finally:
            self._file.close()
