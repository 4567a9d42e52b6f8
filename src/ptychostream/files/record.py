"""The HDF5 capture record (NeXus-like) that :class:`ptychostream.pipeline.record.Recorder` writes, read back.

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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ptychostream.files.errors import FileFormatError

__all__ = ["DATA", "DETECTOR", "ENTRY", "MOSAIC", "read_record"]

ENTRY = "entry"
DATA = "entry/data"
DETECTOR = "entry/instrument/detector"
MOSAIC = "entry/mosaic"


def read_record(path: str | Path) -> dict[str, Any]:
    """Read a record back: {'data': {...}, 'mosaic': {..., attrs} (when written), 'frames': array or None, 'attrs': {...}}.

    Raises ``FileNotFoundError``, or :class:`FileFormatError` (a ``ValueError``) when the file holds no ``/entry/data`` group.
    """
    import h5py

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"record file not found: {file}")
    with h5py.File(file, "r") as fh:
        if not isinstance(fh.get(DATA), h5py.Group):
            raise FileFormatError(f"{file}: not a ptychostream record (no /{DATA} group)")
        entry = fh[ENTRY]
        out: dict[str, Any] = {"attrs": dict(entry.attrs), "data": {k: v[()] for k, v in fh[DATA].items()}}
        if MOSAIC in fh:
            m = fh[MOSAIC]
            out["mosaic"] = {k: v[()] for k, v in m.items()}
            out["mosaic"].update({k: m.attrs[k] for k in m.attrs})
        det = fh.get(DETECTOR + "/data")
        out["frames"] = det[()] if det is not None else None
    return out
