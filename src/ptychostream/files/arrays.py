"""Array shapes and scalar values as the file readers meet them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.errors import FileFormatError

__all__ = ["as_frame_stack", "first_layer", "first_value", "open_npz"]


def first_value(value: Any) -> float:
    """The first element of a scalar or array attribute as a float (HDF5 attributes, NPZ scalars)."""
    return float(np.asarray(value).ravel()[0])


def first_layer(arr: np.ndarray) -> np.ndarray:
    """The first 2-D slice of an (…, H, W) array: a product's first object layer or probe mode."""
    while arr.ndim > 2:
        arr = arr[0]
    return arr


def as_frame_stack(arr: Any, where: str) -> np.ndarray:
    """Frames as (N, H, W): one 2-D frame becomes (1, H, W), more than 3 dimensions are flattened.

    Raises :class:`FileFormatError` (a ``ValueError``) naming ``where`` for fewer than 2 dimensions.
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        return a[None]
    if a.ndim > 3:
        return a.reshape(-1, *a.shape[-2:])
    if a.ndim < 2:
        raise FileFormatError(f"{where}: frames must be 2-D or more, got shape {a.shape}")
    return a


def open_npz(file: Path) -> Any:
    """``np.load`` of an NPZ file without pickles (an ``NpzFile``, to use in a ``with``);
    :class:`FileFormatError` naming the file when it is not one."""
    try:
        return np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"{file}: cannot read as NPZ ({exc})") from None
