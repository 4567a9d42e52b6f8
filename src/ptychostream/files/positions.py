"""Position tables: scan positions (N, 2) in metres ordered (y, x), from CSV, NPY, NPZ or HDF5.

* HDF5 (any file :func:`ptychostream.files.hdf5.is_hdf5` accepts): the datasets ``y_name`` /
  ``x_name`` (default ``probe_position_y_m`` / ``probe_position_x_m``, the Ptychodus names) at
  the path given, else anywhere in the file by their last name; or an (N, 2) dataset ``key``
  (default ``position``, also ``positions``).
* NPZ: the arrays ``y_name`` / ``x_name`` (default the Ptychodus names), else an (N, 2) array
  ``key`` (default the first of ``position``, ``positions``, ``pos``).
* NPY: one (N, 2) array.
* CSV / TXT / DAT / TSV: a header row naming the columns (comma, tab or whitespace separated,
  ``#`` comments); y and x are ``y_name`` / ``x_name`` or the first of :data:`Y_NAMES` /
  :data:`X_NAMES` present (case-insensitive).

(N, 2) arrays are ordered by ``order`` ("yx" or "xy"); a (2, N) array is transposed.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.errors import FileFormatError
from ptychostream.files.hdf5 import find_dataset, is_hdf5

__all__ = [
    "CSV_SUFFIXES", "POS_X", "POS_Y", "X_NAMES", "Y_NAMES", "as_yx", "check_positions", "h5_positions",
    "pick_name", "read_positions", "stack_yx",
]

#: the Ptychodus names of the position datasets
POS_Y, POS_X = "probe_position_y_m", "probe_position_x_m"
#: column names taken for y / x in a CSV header, in order of preference
Y_NAMES: tuple[str, ...] = (POS_Y, "y_m", "y", "pos_y", "posy", "position_y", "ypos")
X_NAMES: tuple[str, ...] = (POS_X, "x_m", "x", "pos_x", "posx", "position_x", "xpos")
#: file name endings read as delimited text
CSV_SUFFIXES: tuple[str, ...] = (".csv", ".txt", ".dat", ".tsv")
_ARRAY_KEYS = ("position", "positions", "pos")


def check_positions(pos: np.ndarray, where: str, allow_nan: bool = False) -> np.ndarray:
    """``pos`` as float64 (N, 2); raises :class:`FileFormatError` (a ``ValueError``) naming ``where`` for another shape or,
    unless ``allow_nan``, for a non-finite row."""
    p = np.asarray(pos, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise FileFormatError(f"{where}: positions must have shape (N, 2) ordered (y, x), got {p.shape}")
    if not allow_nan:
        bad = np.flatnonzero(~np.isfinite(p).all(axis=1))
        if bad.size:
            raise FileFormatError(f"{where}: {bad.size} position(s) are NaN or infinite (first: row {int(bad[0])})")
    return p


def stack_yx(y: Any, x: Any, where: str) -> np.ndarray:
    """(N, 2) (y, x) float64 from a y and an x column; raises :class:`FileFormatError` (a ``ValueError``) if their lengths differ."""
    ya = np.asarray(y, dtype=np.float64).ravel()
    xa = np.asarray(x, dtype=np.float64).ravel()
    if ya.shape != xa.shape:
        raise FileFormatError(f"{where}: the y and x positions differ in length ({ya.size} vs {xa.size})")
    return np.stack([ya, xa], axis=1)


def as_yx(arr: Any, order: str, where: str) -> np.ndarray:
    """An (N, 2) (or (2, N)) position array ordered ``order`` ("yx" or "xy") as (N, 2) (y, x) float64."""
    if order not in ("yx", "xy"):
        raise ValueError("order must be 'yx' or 'xy'")
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 2 and a.shape[1] != 2 and a.shape[0] == 2:
        a = a.T
    if a.ndim != 2 or a.shape[1] != 2:
        raise FileFormatError(f"{where}: a position array must be (N, 2), got {a.shape}")
    return a if order == "yx" else a[:, ::-1].copy()


def pick_name(names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str) -> str:
    """The name in ``names`` matching ``wanted`` (or else the first of ``candidates``), case-insensitive.

    Raises ``KeyError`` listing ``names`` when there is none.
    """
    low = {n.lower().strip(): n for n in names}
    if wanted is not None:
        if wanted.lower() in low:
            return low[wanted.lower()]
        raise KeyError(f"no {what} column/dataset {wanted!r}; have {list(names)}")
    for c in candidates:
        if c in low:
            return low[c]
    raise KeyError(f"no {what} column/dataset among {list(names)}")


def h5_positions(h5: Any, where: str, y_name: str = POS_Y, x_name: str = POS_X) -> np.ndarray | None:
    """(N, 2) (y, x) from the datasets ``y_name`` / ``x_name`` of an open HDF5 file (at their path,
    else anywhere by their last name); ``None`` when either is missing."""
    ypath, xpath = find_dataset(h5, y_name), find_dataset(h5, x_name)
    if ypath is None or xpath is None:
        return None
    return stack_yx(h5[ypath][()], h5[xpath][()], where)


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, y_name: str | None, x_name: str | None) -> np.ndarray:
    with open(path, newline="") as fh:
        lines = [ln for ln in fh.read().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise FileFormatError(f"{path}: empty position file")
    delim = "," if "," in lines[0] else ("\t" if "\t" in lines[0] else None)
    rows = [ln.split() for ln in lines] if delim is None else list(csv.reader(lines, delimiter=delim))
    header = [h.strip() for h in rows[0]]
    if all(_is_number(v) for v in header):
        raise FileFormatError(f"{path}: a CSV position file needs a header row naming y and x")
    yi = header.index(pick_name(header, y_name, Y_NAMES, "y"))
    xi = header.index(pick_name(header, x_name, X_NAMES, "x"))
    try:
        return np.array([[float(r[yi]), float(r[xi])] for r in rows[1:]], dtype=np.float64).reshape(-1, 2)
    except (IndexError, ValueError) as exc:
        raise FileFormatError(f"{path}: a row of the y/x columns {header[yi]!r}/{header[xi]!r} is not a number "
                         f"({exc})") from None


def _read_npz(path: Path, y_name: str | None, x_name: str | None, key: str | None, order: str) -> np.ndarray:
    with np.load(path) as z:
        names = list(z.files)
        if key is None:
            try:
                yk = pick_name(names, y_name, (POS_Y,), "y")
                xk = pick_name(names, x_name, (POS_X,), "x")
                return stack_yx(z[yk], z[xk], str(path))
            except KeyError:
                pass
        try:
            k = pick_name(names, key, _ARRAY_KEYS, "position")
        except KeyError as exc:
            raise KeyError(f"{path}: {exc.args[0]}") from None
        return as_yx(z[k], order, f"{path}:{k}")


def _read_h5(path: Path, y_name: str | None, x_name: str | None, key: str | None, order: str) -> np.ndarray:
    import h5py

    yk, xk = y_name or POS_Y, x_name or POS_X
    with h5py.File(path, "r") as h5:
        if key is None:
            pos = h5_positions(h5, str(path), yk, xk)
            if pos is not None:
                return pos
        k = key or "position"
        kpath = find_dataset(h5, k) or find_dataset(h5, k + "s")
        if kpath is None:
            raise KeyError(f"{path}: no {yk}/{xk} datasets and no {k!r} dataset")
        return as_yx(h5[kpath][()], order, f"{path}:{kpath}")


def read_positions(path: str | Path, *, y_name: str | None = None, x_name: str | None = None,
                   key: str | None = None, order: str = "yx", allow_nan: bool = False) -> np.ndarray:
    """Positions (N, 2) float64 (y, x) from a position file (see the module docstring for the formats).

    ``key`` picks an (N, 2) array instead of the y/x pair.  Raises ``FileNotFoundError``,
    ``KeyError`` (no such column / dataset) or :class:`FileFormatError` (a ``ValueError``) (unknown format, no header, bad
    shape, lengths that differ, or, unless ``allow_nan``, non-finite positions), naming the file.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"positions file not found: {file}")
    suffix = file.suffix.lower()
    if suffix == ".npz":
        pos = _read_npz(file, y_name, x_name, key, order)
    elif suffix == ".npy":
        pos = as_yx(np.load(file), order, str(file))
    elif suffix in CSV_SUFFIXES:
        pos = _read_csv(file, y_name, x_name)
    elif is_hdf5(file):
        pos = _read_h5(file, y_name, x_name, key, order)
    else:
        raise FileFormatError(f"{file}: unknown position file format {suffix!r} (HDF5, CSV, NPY or NPZ)")
    return check_positions(pos, str(file), allow_nan)
