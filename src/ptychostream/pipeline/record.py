"""Record: per-frame results, positions and the final mosaic to HDF5 (NeXus-like), off the live path.

Layout (``NX_class`` attributes on the groups)::

    /entry                         NXentry: program, model_id, model_path, start_time, end_time
    /entry/data                    NXdata (signal = phase)
        phase       (N, h, w) float32, radians
        amplitude   (N, h, w) float32            (when the model gives it)
        unique_id   (N,) int64                   NTNDArray uniqueId of the input frame
        timestamp   (N,) float64                 EPICS time stamp of the input frame, s since 1970
        position_x_m, position_y_m (N,) float64  from the frame's NDAttributes (NaN if absent)
        latency_ms  (N,) float32
    /entry/instrument/detector/data (N, H, W)    diffraction frames (CaptureFrames=Yes)
    /entry/mosaic                  NXdata: phase, amplitude, coverage (H, W) float32;
                                   attrs pixel_size_m, origin_x_m, origin_y_m, n_patches

Writing happens on its own thread behind a bounded queue: the inference loop never waits;
batches that do not fit are counted as dropped.
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

__all__ = ["Recorder", "read_record", "training_pairs"]

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
        entry = self._file.create_group("entry")
        entry.attrs.update({"NX_class": "NXentry", "program": "ptychostream",
                            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        data = entry.create_group("data")
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
            det = self._file.require_group("entry/instrument/detector")
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
                g = self._entry.create_group("mosaic")
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


def read_record(path: str) -> dict[str, Any]:
    """Read a record back: {'data': {...}, 'mosaic': {... , attrs}, 'frames': array or None, 'attrs': {...}}."""
    with h5py.File(path, "r") as fh:
        entry = fh["entry"]
        out: dict[str, Any] = {"attrs": dict(entry.attrs), "data": {k: v[()] for k, v in entry["data"].items()}}
        if "mosaic" in entry:
            m = entry["mosaic"]
            out["mosaic"] = {k: v[()] for k, v in m.items()}
            out["mosaic"].update({k: m.attrs[k] for k in m.attrs})
        det = entry.get("instrument/detector/data")
        out["frames"] = det[()] if det is not None else None
    return out


def training_pairs(record_path: str, product_path: str, out_path: str) -> int:
    """Diffraction frames of a record + patches cut from a later iterative reconstruction.

    ``product_path``: a Ptychodus product HDF5 (``object`` with ``pixel_width_m``) or a
    PtychoNN-style NPZ with ``object`` and ``pixelsize``. Writes a PtychoNN NPZ
    (``reciprocal``, ``real``, ``position``, ``pixelsize``) and returns the number of pairs.
    """
    from ptychostream.sim.forward import extract_patches

    rec = read_record(record_path)
    frames = rec["frames"]
    if frames is None:
        raise ValueError(f"{record_path} holds no diffraction frames: record with CaptureFrames=Yes")
    pos = np.column_stack([rec["data"]["position_y_m"], rec["data"]["position_x_m"]])
    ok = np.isfinite(pos).all(axis=1)
    if not ok.any():
        raise ValueError(f"{record_path}: no frame has a position")
    if product_path.endswith(".npz"):
        with np.load(product_path) as z:
            obj, pixel = np.asarray(z["object"]), float(z["pixelsize"])
    else:
        with h5py.File(product_path, "r") as fh:
            if "object" not in fh:
                raise ValueError(f"{product_path} has no 'object' dataset")
            ds = fh["object"]
            obj, pixel = ds[()], float(ds.attrs["pixel_width_m"])
    obj = obj.reshape(obj.shape[-2:]) if obj.ndim > 2 else obj
    patches = extract_patches(obj, pos[ok], pixel, rec["data"]["phase"].shape[-1])
    np.savez(out_path, reciprocal=frames[ok], real=patches, position=pos[ok], pixelsize=pixel)
    return int(ok.sum())
