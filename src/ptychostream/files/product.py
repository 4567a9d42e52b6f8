"""Ptychodus products: the object, probe and scan positions of a reconstruction, in HDF5 (or NPZ).

HDF5, the layout of Ptychodus' ``H5ProductFileIO``:

* ``object``: complex (layers, H, W) (or (H, W)); attributes ``pixel_width_m``,
  ``pixel_height_m``, ``center_x_m``, ``center_y_m`` (the position of the object's centre pixel
  (H // 2, W // 2); 0 when absent);
* ``probe``: complex (opr, modes, h, w), (modes, h, w) or (h, w); attributes ``pixel_width_m``,
  ``pixel_height_m``;
* ``probe_position_x_m``, ``probe_position_y_m``, ``probe_position_indexes`` (N,).

NPZ (PtychoNN style): ``object`` and ``pixelsize``.  Only the first object layer and the first
probe mode are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.arrays import first_layer, first_value
from ptychostream.files.errors import FileFormatError
from ptychostream.files.positions import POS_X, POS_Y, check_positions, stack_yx

__all__ = ["CENTER_X", "CENTER_Y", "OBJECT", "PIXEL_HEIGHT", "PIXEL_WIDTH", "POSITION_INDEXES", "PROBE",
           "Product", "read_product", "read_product_h5", "write_product_h5"]

OBJECT, PROBE, POSITION_INDEXES = "object", "probe", "probe_position_indexes"
PIXEL_WIDTH, PIXEL_HEIGHT, CENTER_X, CENTER_Y = "pixel_width_m", "pixel_height_m", "center_x_m", "center_y_m"


@dataclass
class Product:
    """The parts of a product ptychostream uses (positions (N, 2) metres (y, x))."""

    object: np.ndarray  # (H, W) complex, the first layer
    pixel_m: float  # object pixel width
    center_m: tuple[float, float]  # (y, x) of the object's centre pixel (H // 2, W // 2)
    probe: np.ndarray | None = None  # (h, w) complex, the first mode
    probe_pixel_m: float | None = None
    positions_m: np.ndarray | None = None
    source: str = ""


def _object(arr: np.ndarray, where: str) -> np.ndarray:
    obj = first_layer(np.asarray(arr))
    if obj.ndim != 2 or not np.iscomplexobj(obj):
        raise FileFormatError(f"{where}: 'object' must be complex (layers, H, W), got {obj.dtype} {obj.shape}")
    if not np.all(np.isfinite(obj)):
        raise FileFormatError(f"{where}: 'object' holds NaN or infinite values")
    return obj


def read_product_h5(h5: Any, where: str, *, need_positions: bool = True, need_probe: bool = False,
                    what: str = "Ptychodus product") -> Product:
    """A product from an open HDF5 file (see the module docstring); ``where`` names it in errors.

    ``need_positions`` / ``need_probe``: refuse a file without them (else they are read when
    present).  Raises :class:`FileFormatError` for missing datasets ("not a {what}, missing ..."), a
    missing pixel size, a non-complex or non-finite object, or non-finite positions.
    """
    need = [OBJECT] + ([PROBE] if need_probe else []) + ([POS_X, POS_Y] if need_positions else [])
    missing = [k for k in need if k not in h5]
    if missing:
        raise FileFormatError(f"{where}: not a {what}, missing {', '.join(missing)}")
    ds = h5[OBJECT]
    if PIXEL_WIDTH not in ds.attrs:
        raise FileFormatError(f"{where}: 'object' has no {PIXEL_WIDTH} attribute")
    center = (first_value(ds.attrs.get(CENTER_Y, 0.0)), first_value(ds.attrs.get(CENTER_X, 0.0)))
    product = Product(_object(ds[()], where), first_value(ds.attrs[PIXEL_WIDTH]), center, source=where)
    if PROBE in h5:
        probe = h5[PROBE]
        product.probe = first_layer(np.asarray(probe[()]))
        if PIXEL_WIDTH in probe.attrs:
            product.probe_pixel_m = first_value(probe.attrs[PIXEL_WIDTH])
    if POS_X in h5 and POS_Y in h5:
        product.positions_m = check_positions(stack_yx(h5[POS_Y][()], h5[POS_X][()], where), where)
    return product


def read_product(path: str | Path, *, need_positions: bool = True) -> Product:
    """Read a product file: HDF5 (Ptychodus) or NPZ (``object`` + ``pixelsize``); see :func:`read_product_h5`.

    Raises ``FileNotFoundError``, or :class:`FileFormatError` (a ``ValueError``) naming the file and what is wrong.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"product file not found: {file}")
    if file.suffix.lower() == ".npz":
        with np.load(file, allow_pickle=False) as z:
            missing = [k for k in (OBJECT, "pixelsize") if k not in z.files]
            if missing:
                raise FileFormatError(f"{file}: not a product NPZ, missing {', '.join(missing)} "
                                 f"(keys present: {', '.join(z.files) or 'none'})")
            return Product(_object(z[OBJECT], str(file)), first_value(z["pixelsize"]), (0.0, 0.0),
                           source=str(file))
    import h5py

    try:
        with h5py.File(file, "r") as h5:
            return read_product_h5(h5, str(file), need_positions=need_positions)
    except OSError as exc:
        raise FileFormatError(f"{file}: cannot read the product ({exc})") from None


def write_product_h5(h5: Any, product: Product) -> None:
    """Write ``product`` into an open HDF5 file in the Ptychodus layout (one layer, one mode).

    The positions (required) get ``probe_position_indexes`` 0..N-1; the probe (required) is
    written (1, 1, h, w) with the object's pixel when ``probe_pixel_m`` is None.
    """
    if product.probe is None or product.positions_m is None:
        raise ValueError("a product to write needs its probe and positions")
    px = product.pixel_m
    obj = h5.create_dataset(OBJECT, data=product.object[None])
    obj.attrs.update({PIXEL_WIDTH: px, PIXEL_HEIGHT: px, CENTER_X: product.center_m[1],
                      CENTER_Y: product.center_m[0]})
    ppx = px if product.probe_pixel_m is None else product.probe_pixel_m
    probe = h5.create_dataset(PROBE, data=product.probe[None, None])
    probe.attrs.update({PIXEL_WIDTH: ppx, PIXEL_HEIGHT: ppx})
    pos = np.asarray(product.positions_m)
    h5.create_dataset(POS_X, data=pos[:, 1])
    h5.create_dataset(POS_Y, data=pos[:, 0])
    h5.create_dataset(POSITION_INDEXES, data=np.arange(len(pos), dtype=np.int64))
