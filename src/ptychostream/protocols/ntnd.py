"""NTNDArray <-> :class:`ImageFrame`, in areaDetector's conventions.

- ``dimension`` is x-first: the numpy (H, W) shape is reversed on the wire.
- ``uniqueId`` counts frames; ``timeStamp`` is EPICS time, ``dataTimeStamp`` the detector's.
- ``ColorMode`` goes out as int32 (some viewers reject int64).
- Compressed frames (``codec.name`` lz4 / blosc / bslz4) are decompressed with their libraries;
  ``codec.parameters`` holds the original NDDataType.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from p4p import Value
from p4p.nt import NTNDArray

from ptychostream.core.frames import ImageFrame

__all__ = ["encode", "decode", "FrameError", "ND_DTYPES"]

#: areaDetector NDDataType_t -> numpy dtype
ND_DTYPES = {
    0: np.int8, 1: np.uint8, 2: np.int16, 3: np.uint16, 4: np.int32,
    5: np.uint32, 6: np.int64, 7: np.uint64, 8: np.float32, 9: np.float64,
}
_NT = NTNDArray()


class FrameError(ValueError):
    """A frame that cannot be used; the message says why."""


def _attr_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return value
    if isinstance(value, (bool, np.bool_)):
        return ("i", int(value))
    if isinstance(value, (int, np.integer)):
        return ("i", int(value)) if -(2**31) <= value < 2**31 else ("l", int(value))
    if isinstance(value, (float, np.floating)):
        return ("d", float(value))
    return ("s", str(value))


def _stamp(t: float) -> dict[str, int]:
    sec, frac = divmod(t, 1.0)
    return {"secondsPastEpoch": int(sec), "nanoseconds": int(frac * 1e9), "userTag": 0}


def encode(frame: ImageFrame) -> Value:
    """Build an NTNDArray Value from an ImageFrame (uniqueId and both time stamps set)."""
    attrs = {"ColorMode": ("i", 0)}
    attrs.update({k: _attr_value(v) for k, v in frame.attributes.items()})
    value = _NT.wrap(np.ascontiguousarray(frame.array), attrib=attrs, timestamp=frame.timestamp)
    # NTNDArray uniqueId is a signed int32: keep the sign (a -5 stays -5), wrap like a C int32
    value["uniqueId"] = (int(frame.unique_id) + 2**31) % 2**32 - 2**31
    value["dataTimeStamp"] = _stamp(frame.data_timestamp if frame.data_timestamp is not None else frame.timestamp)
    return value


def _decompress(value: Value, codec: str) -> np.ndarray:
    params = value["codec.parameters"]
    try:
        dtype = np.dtype(ND_DTYPES[int(params)])
    except (KeyError, TypeError, ValueError):
        raise FrameError(f"codec {codec}: unknown original data type {params!r}") from None
    raw = value["value"]
    if raw is None:
        raise FrameError(f"codec {codec}: empty payload")
    raw = np.asarray(raw).view(np.uint8)
    size = int(value["uncompressedSize"])
    try:
        if codec == "lz4":
            import lz4.block

            data = lz4.block.decompress(raw.tobytes(), uncompressed_size=size)
        elif codec == "blosc":
            try:
                import blosc
            except ImportError:
                raise FrameError("codec blosc needs the 'blosc' package") from None
            data = blosc.decompress(raw.tobytes())
        elif codec == "bslz4":
            try:
                import bitshuffle
            except ImportError:
                raise FrameError("codec bslz4 needs the 'bitshuffle' package") from None
            count = size // dtype.itemsize
            return bitshuffle.decompress_lz4(raw, (count,), dtype)
        else:
            raise FrameError(f"unsupported codec {codec!r}")
    except FrameError:
        raise
    except Exception as exc:  # corrupt payloads raise library-specific errors
        raise FrameError(f"codec {codec}: cannot decompress ({exc})") from None
    if len(data) != size:
        raise FrameError(f"codec {codec}: {len(data)} bytes, expected {size}")
    return np.frombuffer(data, dtype=dtype)


def decode(value: Value, received: float | None = None) -> ImageFrame:
    """Unpack an NTNDArray Value into an ImageFrame with a 2-D array (raises FrameError).

    On the receive path: every field is read once, by its full name (``timeStamp.nanoseconds``
    is one lookup, ``timeStamp`` builds a structure first).
    """
    codec = value["codec.name"]
    if codec:
        flat = _decompress(value, codec)
    else:
        flat = value["value"]
        if flat is None:  # a put's empty union arrives as no elements of the PV's type
            raise FrameError("frame has no data (empty value union, or no elements)")
        flat = np.asarray(flat)
        if not flat.size:
            raise FrameError("frame has no data (empty value union, or no elements)")
    dims = value["dimension"]
    if len(dims) != 2:
        raise FrameError(f"expected a 2-D mono frame, got {len(dims)} dimensions {[int(d['size']) for d in dims]}")
    w, h = int(dims[0]["size"]), int(dims[1]["size"])
    if w * h != flat.size:
        raise FrameError(f"dimension {w}x{h} does not match {flat.size} elements")
    attrs: dict[str, Any] = {elem["name"]: elem["value"] for elem in value["attribute"]}
    t = value["timeStamp.secondsPastEpoch"] + value["timeStamp.nanoseconds"] * 1e-9
    return ImageFrame(
        flat.reshape(h, w),
        int(value["uniqueId"]),
        t if t > 0 else (received or time.time()),
        value["dataTimeStamp.secondsPastEpoch"] + value["dataTimeStamp.nanoseconds"] * 1e-9,
        attrs,
    )
