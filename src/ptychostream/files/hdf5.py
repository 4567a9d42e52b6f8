"""HDF5 look-ups shared by the readers: is it HDF5, which datasets it holds, where a name sits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from ptychostream.files.errors import FileFormatError

__all__ = ["HDF5_SUFFIXES", "dataset", "dataset_names", "find_dataset", "is_hdf5"]

#: file name endings taken as HDF5 without looking inside
HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5", ".hdf", ".nxs", ".cxi", ".nx5")


def is_hdf5(file: str | Path) -> bool:
    """True for an HDF5 file name ending, or a file whose signature says HDF5."""
    return Path(file).suffix.lower() in HDF5_SUFFIXES or h5py.is_hdf5(file)


def dataset_names(h5: h5py.Group) -> list[str]:
    """The absolute names ("/a/b") of every dataset below ``h5``."""
    found: list[str] = []
    h5.visititems(lambda n, o: found.append("/" + n) if isinstance(o, h5py.Dataset) else None)
    return found


def find_dataset(h5: h5py.Group, name: str) -> str | None:
    """Where the dataset ``name`` is: the path itself, else the first dataset anywhere whose last
    component equals ``name`` (case-insensitive); ``None`` when there is none."""
    if name in h5 and isinstance(h5[name], h5py.Dataset):
        return name
    base = name.rsplit("/", 1)[-1].lower()
    return next((n for n in dataset_names(h5) if n.rsplit("/", 1)[-1].lower() == base), None)


def dataset(h5: h5py.Group, name: str, where: Any) -> h5py.Dataset:
    """The dataset ``name`` of an open file; raises :class:`FileFormatError` (a ``ValueError``) naming the file (``where``) and
    listing the datasets present when it is missing."""
    obj = h5.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise FileFormatError(f"{where}: no dataset {name!r}; datasets present: "
                         f"{', '.join(dataset_names(h5)) or 'none'} (pass dataset= or path::dataset)")
    return obj
