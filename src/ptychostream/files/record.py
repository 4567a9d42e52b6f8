"""The HDF5 capture record (NeXus-like) that :class:`ptychostream.pipeline.record.Recorder` writes, read back.

Layout (``NX_class`` attributes on the groups)::

    /entry                         NXentry: program, model_id, start_time, end_time,
                                   complete, flush_period_s, flush_frames,
                                   frames_written, frames_dropped, error (the last four at close)
    /entry/frames_flushed (1,) int64   frames on disk at the last flush (the recovery note)
    /entry/flush_time     (1,) float64 when that flush ended, s since 1970
    /entry/data                    NXdata (signal = phase)
        phase       (N, h, w) float32, radians
        amplitude   (N, h, w) float32            (when the model gives it)
        unique_id   (N,) int64                   NTNDArray uniqueId of the input frame
        timestamp   (N,) float64                 EPICS time stamp of the input frame, s since 1970
        consistency (N,) float32                 Poisson deviance per pixel of the frame against
                                                 the model's prediction (model/consistency.py),
                                                 NaN where the frame was not sampled
        position_x_m, position_y_m (N,) float64  the position the frame was stitched at, metres
                                                 (NaN: none came), from any position source
        position_source (N,) uint8 HDF5 enum     where it came from: Attributes (the frame's
                                                 NDAttributes), Table (PositionPV chunks by
                                                 uniqueId), Motors (readbacks by time stamp) or
                                                 Trajectory (a file, by frame number); records
                                                 older than it had Attributes only
        latency_ms  (N,) float32
    /entry/instrument/detector/data (N, H, W)    diffraction frames (CaptureFrames=Yes)
    /entry/mosaic                  NXdata: phase, amplitude, coverage (H, W) float32;
                                   attrs pixel_size_m, origin_x_m, origin_y_m, n_patches

Crash safety: the per-frame datasets are written in HDF5 SWMR mode and flushed at a bounded
interval; ``frames_flushed`` is updated after each flush, so after a crash the first
``frames_flushed`` rows of every dataset are whole (rows past it may be partly written and are
not read).  ``complete`` is true only once the writer closed the record (with the mosaic and
``end_time``).  A record left by a crashed writer opens only as a SWMR reader (its superblock
still says "open for writing"); :func:`open_record` does that by itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptychostream.files.errors import FileFormatError

__all__ = ["DATA", "DETECTOR", "ENTRY", "FLUSHED", "FLUSH_TIME", "MOSAIC", "POSITION_SOURCES", "RecordStatus",
           "check_record", "open_record", "read_record", "record_positions"]

ENTRY = "entry"
DATA = "entry/data"
DETECTOR = "entry/instrument/detector"
MOSAIC = "entry/mosaic"
FLUSHED = "entry/frames_flushed"
FLUSH_TIME = "entry/flush_time"
#: the position sources, in the order of the PositionSource enum of db/ and of ``position_source``'s codes
POSITION_SOURCES = ("Attributes", "Table", "Motors", "Trajectory")


def open_record(path: str | Path) -> Any:
    """Open a record read-only (an ``h5py.File``), as a SWMR reader when a crashed or live writer left it open.

    Raises ``FileNotFoundError``, or :class:`FileFormatError` naming the file when HDF5 cannot open it.
    """
    import h5py

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"record file not found: {file}")
    try:
        return h5py.File(file, "r")
    except OSError as exc:
        first = exc
    try:  # a SWMR writer that crashed (or still runs) leaves the superblock marked "open for writing"
        return h5py.File(file, "r", swmr=True)
    except OSError as exc:
        if "already open for write" in str(first) and "not already open for SWMR" in str(exc):
            raise FileFormatError(f"{file}: left open by a writer that did not close it and not written in SWMR "
                                  f"mode; 'h5clear -s {file}' may recover it") from None
        raise FileFormatError(f"{file}: not readable as HDF5 ({first})") from None


def _checked(fh: Any, file: Path) -> int:
    """The number of whole frames in an open record (``frames_flushed``, or the rows of an older record)."""
    import h5py

    data = fh.get(DATA)
    if not isinstance(data, h5py.Group):
        raise FileFormatError(f"{file}: not a ptychostream record (no /{DATA} group)")
    if FLUSHED in fh:
        return int(fh[FLUSHED][0])
    return int(data["unique_id"].shape[0]) if "unique_id" in data else 0


def record_positions(data: dict[str, Any], n: int | None = None) -> tuple[Any, Any]:
    """Each frame's position and its source from a record's ``data`` (as :func:`read_record` gives it):
    ((N, 2) float64 (y, x) metres, NaN where the frame got none; (N,) str array of source names)."""
    import numpy as np

    if n is None:
        n = len(data["unique_id"]) if "unique_id" in data else 0
    yx = np.full((n, 2), np.nan)
    if "position_y_m" in data and "position_x_m" in data:
        yx[:, 0], yx[:, 1] = data["position_y_m"][:n], data["position_x_m"][:n]
    codes = np.asarray(data["position_source"][:n], np.intp) if "position_source" in data else np.zeros(n, np.intp)
    names = np.asarray(POSITION_SOURCES + ("?",))
    return yx, names[np.clip(codes, 0, len(POSITION_SOURCES))]


def read_record(path: str | Path) -> dict[str, Any]:
    """Read a record back: {'data': {...}, 'mosaic': {..., attrs} (when written), 'frames': array or None,
    'attrs': {...}, 'n_frames': int, 'complete': bool, 'positions_m': (N, 2) (y, x) metres (NaN: none),
    'position_source': (N,) source names} (see :func:`record_positions`).

    A cut record (its writer crashed) gives the frames up to its last flush. Raises
    ``FileNotFoundError``, or :class:`FileFormatError` (a ``ValueError``) when the file is not
    readable as HDF5 or holds no ``/entry/data`` group.
    """
    file = Path(path)
    with open_record(file) as fh:
        n = _checked(fh, file)
        entry = fh[ENTRY]
        attrs = dict(entry.attrs)
        out: dict[str, Any] = {"attrs": attrs, "data": {k: v[:n] for k, v in fh[DATA].items()},
                               "n_frames": n, "complete": _complete(attrs)}
        if MOSAIC in fh:
            m = fh[MOSAIC]
            out["mosaic"] = {k: v[()] for k, v in m.items()}
            out["mosaic"].update({k: m.attrs[k] for k in m.attrs})
        det = fh.get(DETECTOR + "/data")
        out["frames"] = det[:n] if det is not None else None
    out["positions_m"], out["position_source"] = record_positions(out["data"], n)
    return out


def _complete(attrs: dict[str, Any]) -> bool:
    """Closed by its writer: ``complete``, or (a record older than the attribute) an ``end_time``."""
    return bool(attrs["complete"]) if "complete" in attrs else "end_time" in attrs


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class RecordStatus:
    """What a record holds, from its shapes and attributes (no frame data is read)."""

    path: Path
    frames: int  #: whole frames (all of them in a complete record, those up to the last flush in a cut one)
    complete: bool
    outputs: tuple[str, ...]
    positions: int  #: frames (of ``frames``) with a finite x and y position
    diffraction: tuple[int, ...] | None  #: the shape of the stored diffraction frames, cut to ``frames``
    mosaic: tuple[int, ...] | None  #: the shape of the final mosaic
    mosaic_patches: int
    attrs: dict[str, Any]
    last_flush: float | None  #: when the last flush ended, s since 1970
    #: frames positioned, by position source
    position_sources: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """The report of ``ptychostream record check``: a few lines naming the file."""
        a = self.attrs
        lines = [f"{self.path}: ptychostream record, model {_text(a.get('model_id', '?'))}, "
                 f"started {_text(a.get('start_time', '?'))}",
                 f"  frames: {self.frames} ({', '.join(self.outputs) or 'no outputs'})",
                 (f"  positions: {self.positions} of {self.frames}"
                  + (f" ({', '.join(f'{k} {v}' for k, v in self.position_sources.items())})"
                     if self.position_sources else "")),
                 "  diffraction frames: " + (" x ".join(map(str, self.diffraction)) if self.diffraction else "none"),
                 "  mosaic: " + (f"{' x '.join(map(str, self.mosaic))}, {self.mosaic_patches} patches"
                                 if self.mosaic else "none")]
        if "frames_dropped" in a:
            lines.append(f"  written {int(a['frames_written'])}, dropped {int(a['frames_dropped'])}"
                         + (f"; error: {_text(a['error'])}" if _text(a.get("error", "")) else ""))
        if self.complete:
            lines.append(f"  complete: closed {_text(a.get('end_time', '?'))}")
        else:
            when = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.last_flush)) if self.last_flush else "?"
            lines.append(f"  cut at frame {self.frames}: the writer did not close the record; it holds the "
                         f"{self.frames} frames of its last flush ({when}), later frames are lost")
        return "\n".join(lines)


def check_record(path: str | Path) -> RecordStatus:
    """The :class:`RecordStatus` of a record; raises like :func:`read_record`."""
    import numpy as np

    file = Path(path)
    with open_record(file) as fh:
        n = _checked(fh, file)
        data = fh[DATA]
        attrs = dict(fh[ENTRY].attrs)
        yx, source = record_positions({k: data[k] for k in ("unique_id", "position_x_m", "position_y_m",
                                                             "position_source") if k in data}, n)
        ok = np.isfinite(yx).all(axis=1)
        positions = int(np.count_nonzero(ok))
        names, counts = np.unique(source[ok], return_counts=True)
        det = fh.get(DETECTOR + "/data")
        mosaic = fh.get(MOSAIC + "/phase")
        return RecordStatus(
            path=file, frames=n, complete=_complete(attrs),
            outputs=tuple(k for k in ("phase", "amplitude") if k in data), positions=positions,
            diffraction=(min(n, det.shape[0]), *det.shape[1:]) if det is not None else None,
            mosaic=tuple(mosaic.shape) if mosaic is not None else None,
            mosaic_patches=int(fh[MOSAIC].attrs.get("n_patches", 0)) if mosaic is not None else 0,
            attrs=attrs, last_flush=float(fh[FLUSH_TIME][0]) if FLUSH_TIME in fh else None,
            position_sources={str(k): int(v) for k, v in zip(names, counts)})
