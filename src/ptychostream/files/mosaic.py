"""Mosaic images for scoring: a record's ``/entry/mosaic``, any HDF5 / NPZ with ``phase``, or a bare ``.npy``.

HDF5: the group (or dataset) given (``file.h5::group``), else ``/entry/mosaic``, ``/mosaic`` or
the root, holding ``phase`` (also ``mosaic``) and optionally ``coverage`` and ``mask``; the
grid origin and pixel from the attributes ``origin_y_m`` / ``origin_x_m`` or ``origin_m``, and
``pixel_m``, ``pixel_size_m`` or ``pixel_width_m`` (the group's, then the dataset's).  NPZ: the
same names as arrays.  ``.npy``: the phase alone.  Complex images give their angle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.arrays import first_value
from ptychostream.files.errors import FileFormatError
from ptychostream.files.paths import split_dataset_path
from ptychostream.files.record import MOSAIC

__all__ = ["MosaicFile", "read_mosaic", "write_mosaic_npz"]

_PHASE_KEYS = ("phase", "mosaic")
_PIXEL_KEYS = ("pixel_m", "pixel_size_m", "pixel_width_m")


@dataclass
class MosaicFile:
    """A mosaic read from a file: phase (H, W), optional coverage/mask, grid origin and pixel."""

    phase: np.ndarray
    coverage: np.ndarray | None
    mask: np.ndarray | None
    origin_m: tuple[float, float] | None
    pixel_m: float | None
    source: str


def _origin_pixel(attrs: dict[str, Any]) -> tuple[tuple[float, float] | None, float | None]:
    origin = None
    if "origin_m" in attrs:
        o = np.asarray(attrs["origin_m"], dtype=np.float64).ravel()
        if o.size == 2:
            origin = (float(o[0]), float(o[1]))
    elif "origin_y_m" in attrs and "origin_x_m" in attrs:
        origin = (first_value(attrs["origin_y_m"]), first_value(attrs["origin_x_m"]))
    pixel = next((first_value(attrs[k]) for k in _PIXEL_KEYS if k in attrs), None)
    return origin, pixel


def _as_image(arr: Any, where: str) -> np.ndarray:
    a = np.asarray(arr)
    if np.iscomplexobj(a):
        a = np.angle(a)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise FileFormatError(f"{where}: the mosaic must be a 2-D image, got shape {np.shape(arr)}")
    return a.astype(np.float64)


def _mosaic(phase: Any, cov: Any, msk: Any, attrs: dict[str, Any], where: str) -> MosaicFile:
    origin, pixel = _origin_pixel(attrs)
    return MosaicFile(_as_image(phase, where), None if cov is None else np.asarray(cov, dtype=np.float64),
                      None if msk is None else np.asarray(msk, dtype=bool), origin, pixel, where)


def _read_npz(file: Path, dataset: str | None) -> MosaicFile:
    with np.load(file) as z:
        key = dataset or next((k for k in _PHASE_KEYS if k in z.files), None)
        if key is None or key not in z.files:
            raise FileFormatError(f"{file}: no 'phase' array (keys: {', '.join(z.files) or 'none'})")
        attrs = {k: z[k] for k in z.files if k not in (key, "coverage", "mask")}
        return _mosaic(z[key], z["coverage"] if "coverage" in z.files else None,
                       z["mask"] if "mask" in z.files else None, attrs, f"{file}:{key}")


def _read_h5(file: Path, dataset: str | None) -> MosaicFile:
    import h5py

    if not h5py.is_hdf5(file):
        raise FileFormatError(f"{file}: not an HDF5, .npz or .npy file")
    with h5py.File(file, "r") as h5:
        groups = [dataset] if dataset else ["/" + MOSAIC, "/mosaic", "/"]
        for gname in groups:
            g = h5.get(gname)
            if g is None:
                continue
            if isinstance(g, h5py.Dataset):
                attrs = dict(g.attrs)
                attrs.update({k: v for k, v in g.parent.attrs.items() if k not in attrs})
                return _mosaic(g[()], None, None, attrs, f"{file}:{gname}")
            key = next((k for k in _PHASE_KEYS if k in g and isinstance(g[k], h5py.Dataset)), None)
            if key is None:
                continue
            attrs = dict(g.attrs)
            attrs.update({k: v for k, v in g[key].attrs.items() if k not in attrs})
            return _mosaic(g[key][()], g["coverage"][()] if "coverage" in g else None,
                           g["mask"][()] if "mask" in g else None, attrs, f"{file}:{g.name.rstrip('/')}/{key}")
        raise FileFormatError(f"{file}: no mosaic: looked for a 'phase' dataset in {', '.join(groups)}")


def read_mosaic(path: str | Path, dataset: str | None = None) -> MosaicFile:
    """Read a mosaic (see the module docstring); ``path`` may be ``file.h5::group``.

    Raises ``FileNotFoundError`` ("mosaic file not found: ..."), or :class:`FileFormatError`
    naming the file and what was expected.
    """
    file, dataset = split_dataset_path(path, dataset, "mosaic")
    suffix = file.suffix.lower()
    try:
        if suffix == ".npy":
            return _mosaic(np.load(file), None, None, {}, str(file))
        if suffix == ".npz":
            return _read_npz(file, dataset)
        return _read_h5(file, dataset)
    except FileFormatError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise FileFormatError(f"{file}: cannot read the mosaic ({exc})") from None


def write_mosaic_npz(path: str | Path, phase: np.ndarray, coverage: np.ndarray | None, mask: np.ndarray | None,
                     origin_m: tuple[float, float], pixel_m: float, amplitude: np.ndarray | None = None) -> None:
    """Write a mosaic as a compressed NPZ that :func:`read_mosaic` reads back (``phase``, ``coverage``,
    ``mask``, ``amplitude`` when given, ``origin_m`` (y, x) and ``pixel_m``)."""
    arrays: dict[str, Any] = {"phase": phase, "origin_m": np.asarray(origin_m, dtype=np.float64), "pixel_m": pixel_m}
    arrays.update((k, v) for k, v in (("coverage", coverage), ("mask", mask), ("amplitude", amplitude))
                  if v is not None)
    np.savez_compressed(path, **arrays)
