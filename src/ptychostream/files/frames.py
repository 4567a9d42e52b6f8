"""Diffraction frame stacks (N, H, W) from HDF5, NPY or a PtychoNN NPZ, with their positions when the file has them.

* HDF5: the dataset given (``file.h5::/dataset`` or ``dataset=``), else the first of
  :data:`FRAME_PATHS` present; positions from ``probe_position_y_m`` / ``probe_position_x_m``
  anywhere in the same file (see :func:`ptychostream.files.positions.h5_positions`).
* NPZ: a PtychoNN file (:mod:`ptychostream.files.pairs`): ``reciprocal`` (or the key given) and
  ``position``.
* NPY: the frames alone.

Frames of more than three dimensions are flattened to (N, H, W), one 2-D frame becomes (1, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptychostream.files.arrays import as_frame_stack
from ptychostream.files.errors import FileFormatError
from ptychostream.files.hdf5 import dataset_names
from ptychostream.files.pairs import RECIPROCAL, read_pairs
from ptychostream.files.paths import split_dataset_path
from ptychostream.files.positions import h5_positions

__all__ = ["FRAME_PATHS", "FrameStack", "read_frames"]

#: HDF5 datasets tried, in order, when no dataset is given
FRAME_PATHS: tuple[str, ...] = ("/entry/data/data", "/exchange/data", "/dp")


@dataclass
class FrameStack:
    """Frames (N, H, W), positions (N, 2) in metres (y, x) or None, and a description of the source."""

    frames: np.ndarray
    positions_m: np.ndarray | None
    source: str


def read_frames(path: str | Path, dataset: str | None = None) -> FrameStack:
    """Read a frame stack (see the module docstring); ``path`` may be ``file.h5::/dataset``.

    Raises ``FileNotFoundError``, or :class:`FileFormatError` (a ``ValueError``) naming the file, the dataset or key and
    what was expected (the datasets present, when none of the expected ones is there).
    Positions, when found, are (N, 2) but may hold NaN rows (frames without a position).
    """
    import h5py

    file, dataset = split_dataset_path(path, dataset, "replay")
    suffix = file.suffix.lower()
    if suffix == ".npz":
        pairs = read_pairs(file, labels=False, frames_key=dataset or RECIPROCAL)
        stack = FrameStack(pairs.frames, pairs.positions_m, pairs.source)
    elif suffix == ".npy":
        stack = FrameStack(as_frame_stack(np.load(file), str(file)), None, str(file))
    else:
        if not h5py.is_hdf5(file):
            raise FileFormatError(f"{file}: not an HDF5, .npz or .npy file")
        with h5py.File(file, "r") as h5:
            tried = [dataset] if dataset else list(FRAME_PATHS)
            name = next((p for p in tried if p in h5 and isinstance(h5[p], h5py.Dataset)), None)
            if name is None:
                raise FileFormatError(f"{file}: no frames: looked for {', '.join(tried)}; datasets present: "
                                 f"{', '.join(dataset_names(h5)) or 'none'} (pass dataset= or path::dataset)")
            where = f"{file}:{name}"
            stack = FrameStack(as_frame_stack(h5[name][()], where), h5_positions(h5, str(file)), where)
    if stack.positions_m is not None and len(stack.positions_m) != len(stack.frames):
        raise FileFormatError(f"{len(stack.positions_m)} positions for {len(stack.frames)} frames in {stack.source}")
    return stack
