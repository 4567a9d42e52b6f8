"""Ground-truth HDF5 files of simulated scans: a Ptychodus product plus the true patches.

The layout of :mod:`ptychostream.files.product` (``object`` 1×H×W, ``probe`` 1×1×N×N,
``probe_position_{x,y}_m``, ``probe_position_indexes``), plus ``patches`` (n×N×N complex64, the
true object patches of the frames ``patch_indexes``), ``hot_pixel_indexes`` and the simulation
settings as file attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.product import (
    POSITION_INDEXES,
    Product,
    read_product_h5,
    write_product_h5,
)

__all__ = ["read_truth", "write_truth"]

PATCHES, PATCH_INDEXES, HOT_PIXEL_INDEXES = "patches", "patch_indexes", "hot_pixel_indexes"


def write_truth(path: str | Path, product: Product, patches: Callable[[np.ndarray], np.ndarray],
                patch_indexes: np.ndarray, hot_pixel_indexes: np.ndarray, attrs: Mapping[str, Any],
                chunk: int = 256) -> None:
    """Write a truth file: ``product``, the patches ``patches(indexes)`` of the frames
    ``patch_indexes`` (asked for ``chunk`` at a time), the hot pixels and the file ``attrs``."""
    import h5py

    ii = np.atleast_1d(np.asarray(patch_indexes, dtype=np.int64))
    n_px = product.probe.shape[-1] if product.probe is not None else 0
    with h5py.File(path, "w") as h5:
        write_product_h5(h5, product)
        h5.create_dataset(PATCH_INDEXES, data=ii)
        ds = h5.create_dataset(PATCHES, shape=(len(ii), n_px, n_px), dtype=np.complex64,
                               chunks=(1, n_px, n_px) if len(ii) else None)
        for s in range(0, len(ii), chunk):
            ds[s:s + chunk] = patches(ii[s:s + chunk])
        h5.create_dataset(HOT_PIXEL_INDEXES, data=hot_pixel_indexes)
        h5.attrs.update(dict(attrs))


def read_truth(path: str | Path) -> dict[str, Any]:
    """Read a truth file into a dict.

    Keys: ``object`` (H×W), ``object_pixel_m``, ``object_center_m`` (y, x), ``probe`` (N×N),
    ``probe_pixel_m``, ``positions_m`` (N, 2) (y, x), ``position_indexes``, ``patches``,
    ``patch_indexes``, ``hot_pixel_indexes`` (each None when absent) and ``attrs`` (numpy
    scalars as Python ones).  Raises ``FileNotFoundError`` or :class:`FileFormatError` (a ``ValueError``) naming the file.
    """
    import h5py

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"truth file not found: {file}")
    with h5py.File(file, "r") as h5:
        p = read_product_h5(h5, str(file), need_probe=True, what="ground-truth file")

        def optional(name: str) -> np.ndarray | None:
            return h5[name][()] if name in h5 else None

        return {
            "object": p.object, "object_pixel_m": p.pixel_m, "object_center_m": p.center_m,
            "probe": p.probe, "probe_pixel_m": p.probe_pixel_m, "positions_m": p.positions_m,
            "position_indexes": optional(POSITION_INDEXES), "patches": optional(PATCHES),
            "patch_indexes": optional(PATCH_INDEXES), "hot_pixel_indexes": optional(HOT_PIXEL_INDEXES),
            "attrs": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()},
        }
