"""Measured or saved frames for replay, and ground-truth files of simulated scans.

Conventions: frames are (N, H, W) arrays; simulated frames are fftshift-centred (zero frequency
at (H // 2, W // 2)).  Measured data stored with zero frequency at the corner can be converted
with :func:`ptychostream.sim.forward.centred`; :func:`unshifted` (``np.fft.ifftshift`` over the
last two axes) goes the other way.  Positions are (N, 2) metres ordered (y, x).

The files are read by :mod:`ptychostream.files`: scans to replay by :mod:`~ptychostream.files.scan`
(frames alone by :mod:`~ptychostream.files.frames`),
position files by :mod:`~ptychostream.files.positions`, ground truth by
:mod:`~ptychostream.files.truth` (a Ptychodus product — ``object`` 1×H×W complex64 whose centre
pixel (H // 2, W // 2) is at position (0, 0), ``probe`` 1×1×N×N, ``probe_position_{x,y}_m`` —
plus the true ``patches`` with ``patch_indexes`` and the geometry and detector settings as file
attributes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.frames import FRAME_PATHS, FrameStack, read_frames
from ptychostream.files.positions import check_positions, read_positions
from ptychostream.files.product import Product
from ptychostream.files.scan import read_scan
from ptychostream.files.scandata import NoPositionsError
from ptychostream.files.truth import read_truth, write_truth
from ptychostream.sim.forward import (
    Geometry,
    Simulator,
    centred,
    frame_indices,
    unshifted,
)

__all__ = ["FRAME_PATHS", "ReplayData", "centred", "load_frames", "read_truth_h5", "unshifted",
           "write_truth_h5"]

#: frames (N, H, W), positions (N, 2) in metres (y, x) or None, and a description of the source
ReplayData = FrameStack


def load_frames(path: str | Path, dataset: str | None = None, positions: Any = None,
                defaults: dict[str, float] | None = None) -> ReplayData:
    """Load frames (and positions) to replay from any scan file :func:`ptychostream.files.scan.read_scan` reads.

    PtychoNN and Tike NPZ, CXI, our capture record, HDF5 (``dataset`` or ``path::dataset``, else
    the first of :data:`FRAME_PATHS` present; positions ``probe_position_y_m`` /
    ``probe_position_x_m`` in the same file) and ``.npy``: the frames as stored (a corner-origin
    file replays corner-origin frames) and the positions in metres (pixels converted with the
    file's pixel size or geometry).  A file without positions replays its frames alone (positions
    None).  ``positions`` overrides the file's positions: a position file (Ptychodus product, NPZ,
    CSV, NPY; see :func:`ptychostream.files.positions.read_positions`) or an (N, 2) array in
    metres; NaN rows are kept then (frames without a position).  ``defaults``: geometry for a file
    that has none (see :func:`~ptychostream.files.scan.read_scan`), e.g. to convert pixel positions.
    """
    if positions is None:
        try:
            scan = read_scan(path, defaults=defaults, **({"dataset": dataset} if dataset else {}))
        except NoPositionsError as exc:
            return ReplayData(exc.scan.frames, None, exc.scan.source)
        return ReplayData(scan.frames, scan.positions_m, scan.source)
    data = read_frames(path, dataset)
    if isinstance(positions, (str, Path)):
        pos = read_positions(positions, allow_nan=True)
    else:
        pos = check_positions(positions, "the replay positions", allow_nan=True)
    if len(pos) != len(data.frames):
        raise ValueError(f"{len(pos)} positions for {len(data.frames)} frames in {data.source}")
    return ReplayData(data.frames, pos, data.source)


def write_truth_h5(path: str | Path, sim: Simulator, idx: Any = None, chunk: int = 256) -> None:
    """Write a simulation's ground truth (Ptychodus-like layout; see the module docstring).

    ``idx`` selects the frames whose true patches are stored (default: all), written in chunks.
    """
    ii, _ = frame_indices(slice(None) if idx is None else idx, sim.n)
    g = sim.geometry
    product = Product(sim.obj, sim.object_pixel_m, (0.0, 0.0), probe=sim.probe, positions_m=sim.positions_m)
    attrs = dict(
        energy_keV=g.energy_keV, distance_m=g.distance_m, detector_pixel_m=g.detector_pixel_m,
        size=g.size, wavelength_m=g.wavelength_m, object_pixel_m=sim.object_pixel_m, photons=sim.photons,
        seed=sim.seed, bin=sim.bin, crop=np.asarray(sim.crop or (0, 0)), dtype=sim.dtype.name,
        beamstop_px=sim.beamstop_px, hot_pixels=sim.hot_pixels, normalize=sim.normalize,
        frame_shape=np.asarray(sim.frame_shape),
        conventions="positions (y, x) metres relative to object pixel (H//2, W//2); "
                    "frames |FFT_ortho(P*O)|^2 fftshift-centred",
    )
    write_truth(path, product, sim.patches, ii, sim.hot_index, attrs, chunk)


def read_truth_h5(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`write_truth_h5` into a dict.

    Keys: those of :func:`ptychostream.files.truth.read_truth` (``object`` (H×W),
    ``object_pixel_m``, ``object_center_m`` (y, x), ``probe`` (N×N), ``probe_pixel_m``,
    ``positions_m`` (N, 2) (y, x), ``position_indexes``, ``patches``, ``patch_indexes``,
    ``hot_pixel_indexes``, ``attrs``) and ``geometry`` (a :class:`Geometry`, or None when the
    file does not say).
    """
    out = read_truth(path)
    attrs = out["attrs"]
    if all(k in attrs for k in ("energy_keV", "distance_m", "detector_pixel_m", "size")):
        out["geometry"] = Geometry(attrs["energy_keV"], attrs["distance_m"], attrs["detector_pixel_m"],
                                   int(attrs["size"]))
    else:
        out["geometry"] = None
    return out
