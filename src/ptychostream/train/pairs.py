"""Training pairs from a capture: a record's diffraction frames + patches of a later reconstruction."""

from __future__ import annotations

import numpy as np

from ptychostream.files.pairs import write_pairs
from ptychostream.files.product import read_product
from ptychostream.files.record import read_record
from ptychostream.sim.forward import extract_patches

__all__ = ["training_pairs"]


def training_pairs(record_path: str, product_path: str, out_path: str) -> int:
    """Diffraction frames of a record + patches cut from a later iterative reconstruction.

    ``product_path``: a Ptychodus product HDF5 (``object`` with ``pixel_width_m``) or a
    PtychoNN-style NPZ with ``object`` and ``pixelsize`` (see :mod:`ptychostream.files.product`).
    Writes a PtychoNN NPZ (``reciprocal``, ``real``, ``position``, ``pixelsize``) of the frames
    that have a position and returns the number of pairs.
    """
    rec = read_record(record_path)
    frames = rec["frames"]
    if frames is None:
        raise ValueError(f"{record_path} holds no diffraction frames: record with CaptureFrames=Yes")
    pos = np.column_stack([rec["data"]["position_y_m"], rec["data"]["position_x_m"]])
    ok = np.isfinite(pos).all(axis=1)
    if not ok.any():
        raise ValueError(f"{record_path}: no frame has a position")
    product = read_product(product_path, need_positions=False)
    patches = extract_patches(product.object, pos[ok], product.pixel_m, rec["data"]["phase"].shape[-1])
    write_pairs(out_path, frames[ok], patches, pos[ok], product.pixel_m)
    return int(ok.sum())
