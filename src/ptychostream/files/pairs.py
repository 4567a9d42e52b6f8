"""PtychoNN training NPZ files: ``reciprocal`` frames, ``real`` labels, ``position``, ``pixelsize``.

* ``reciprocal``: (N, H, W) (or (N, 1, H, W)) diffraction intensities;
* ``real``: the labels, complex (N, h, w) object patches, or real (N, C, h, w) with channel 0 the
  phase and channel 1 (optional) the amplitude, or real (N, h, w) phase;
* ``position`` (optional): (N, 2) (y, x) (extra columns are ignored), in metres, or in object
  pixels when larger than 1 cm and ``pixelsize`` is there to convert them;
* ``pixelsize`` (optional): the object pixel in metres.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.arrays import as_frame_stack, first_value, open_npz
from ptychostream.files.errors import FileFormatError
from ptychostream.files.positions import as_yx

__all__ = ["PIXELSIZE", "POSITION", "REAL", "RECIPROCAL", "PtychoNNData", "read_pairs", "write_pairs"]

RECIPROCAL, REAL, POSITION, PIXELSIZE = "reciprocal", "real", "position", "pixelsize"
#: positions larger than this (metres) are object pixels
PIXEL_POSITIONS_ABOVE_M = 1e-2


@dataclass
class PtychoNNData:
    """A PtychoNN NPZ read back: frames (N, H, W), labels, positions (N, 2) metres (y, x), pixel."""

    frames: np.ndarray
    phase: np.ndarray | None  # (N, h, w) radians; None when the labels were not read
    amplitude: np.ndarray | None  # (N, h, w), or None
    positions_m: np.ndarray | None
    pixel_m: float | None
    source: str


def _labels(real: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(phase, amplitude or None) from the ``real`` array."""
    if np.iscomplexobj(real):
        if real.ndim == 4 and real.shape[1] == 1:
            real = real[:, 0]
        if real.ndim != 3:
            raise FileFormatError(f"{where}: complex 'real' must be (N, h, w), got shape {real.shape}")
        return np.angle(real), np.abs(real)
    if real.ndim == 3:
        return real, None
    if real.ndim == 4 and real.shape[1] in (1, 2):
        return real[:, 0], (real[:, 1] if real.shape[1] == 2 else None)
    raise FileFormatError(f"{where}: real-valued 'real' must be (N, C, h, w) with C0 = phase, C1 = amplitude, "
                     f"got shape {real.shape}")


def _training_frames(frames: np.ndarray, where: str) -> np.ndarray:
    if frames.ndim == 4 and frames.shape[1] == 1:
        frames = frames[:, 0]
    if frames.ndim != 3:
        raise FileFormatError(f"{where}: 'reciprocal' must be (N, H, W), got shape {frames.shape}")
    if frames.dtype.kind not in "biuf":
        raise FileFormatError(f"{where}: 'reciprocal' must be real intensities, got dtype {frames.dtype}")
    return frames


def _positions(z: Any, pixel: float | None, where: str) -> np.ndarray | None:
    if POSITION not in z.files:
        return None
    pos = np.asarray(z[POSITION], dtype=np.float64)
    if pos.ndim == 2 and pos.shape[1] > 2:
        pos = pos[:, :2]
    pos = as_yx(pos, "yx", f"{where}:{POSITION}")
    if pos.size and np.abs(pos).max() > PIXEL_POSITIONS_ABOVE_M and pixel is not None:
        pos = pos * pixel
    return pos


def read_pairs(path: str | Path, *, labels: bool = True, frames_key: str = RECIPROCAL) -> PtychoNNData:
    """Read a PtychoNN NPZ (see the module docstring).

    ``labels``: also read ``real`` (required) and hold the frames to (N, H, W) training shapes;
    without it only the frames (``frames_key``, any stack of 2-D frames) and positions are read.
    Raises :class:`FileFormatError` (a ``ValueError``) naming the file, the key and what was expected.
    """
    file = Path(path)
    with open_npz(file) as z:
        keys = list(z.files)
        if not keys:
            raise FileFormatError(f"{file}: the NPZ file is empty (no arrays)")
        wanted = [frames_key, REAL] if labels else [frames_key]
        missing = [k for k in wanted if k not in keys]
        if missing:
            raise FileFormatError(f"{file}: missing {', '.join(repr(k) for k in missing)} "
                             f"(keys present: {', '.join(keys)}); a PtychoNN NPZ holds 'reciprocal' "
                             "(N, H, W) intensities and 'real' complex patches or (N, 2, H, W) phase/amplitude")
        pixel = first_value(z[PIXELSIZE]) if PIXELSIZE in keys else None
        raw = np.asarray(z[frames_key])
        phase, amp = _labels(np.asarray(z[REAL]), str(file)) if labels else (None, None)
        positions = _positions(z, pixel, str(file))
    frames = _training_frames(raw, str(file)) if labels else as_frame_stack(raw, f"{file}:{frames_key}")
    return PtychoNNData(frames, phase, amp, positions, pixel, f"{file}:{frames_key}")


def write_pairs(path: str | Path, frames: np.ndarray, patches: np.ndarray, positions_m: np.ndarray,
                pixel_m: float) -> None:
    """Write a PtychoNN NPZ: ``reciprocal`` frames, ``real`` complex patches, ``position`` (y, x) m, ``pixelsize``."""
    arrays: dict[str, Any] = {RECIPROCAL: frames, REAL: patches, POSITION: positions_m, PIXELSIZE: pixel_m}
    np.savez(path, **arrays)
