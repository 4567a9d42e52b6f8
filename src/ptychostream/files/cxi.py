"""CXI files (the Coherent X-ray Imaging HDF5 format, spec 1.6), read into and written from a
:class:`~ptychostream.files.scandata.Scan`.

Read (SI units, as the spec says)::

    /entry_1/data_1/data                          (N, H, W) frames (else .../detector_1/data)
    /entry_1/instrument_1/detector_1/distance     sample to detector, m
    /entry_1/instrument_1/detector_1/x_pixel_size, y_pixel_size   m
    /entry_1/instrument_1/source_1/energy         J (converted to eV)
    /entry_1/sample_1/geometry_1/translation      (N, 3) (x, y, z) m (else /entry_1/data_1/translation,
                                                  else .../detector_1/translation)
    /entry_1/image_1/data                         probe (… modes, h, w) complex (else
                                                  .../source_1/illumination), its pixel from
                                                  /entry_1/image_1/image_size (width, height) m
    /entry_1/ptychostream/{origin, flip_y, flip_x, transpose, object_pixel_m}   our additions

The translations are taken as the probe positions on the sample as they are (the convention of
Ptychodus' CXI reader and writer), (x, y) reordered to (y, x).  The object pixel is ours, else
Ptychodus' ``/entry_1/ptychodus/probe_pixel_width_m``, else the probe's ``image_size``, else the
geometry (:meth:`Scan.pixel_m`).  The frames' origin is ours when written, else guessed
(:mod:`ptychostream.files.scandata`).  :func:`write_cxi` writes the same layout, the frames as
stored, ``data_1/data`` and ``data_1/translation`` as soft links, as Ptychodus does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.arrays import as_frame_stack, first_value
from ptychostream.files.errors import FileFormatError
from ptychostream.files.scandata import Parsed, Scan, complete, origin_name

__all__ = ["CXI_VERSION", "EV_J", "TRANSLATION_PATHS", "is_cxi", "parse_cxi_h5", "read_cxi", "write_cxi"]

#: the spec version written (1.6, as an int * 100)
CXI_VERSION = 160
#: one electronvolt in joules
EV_J = 1.602176634e-19

ENTRY = "/entry_1"
DATA = "/entry_1/data_1/data"
DETECTOR = "/entry_1/instrument_1/detector_1"
SOURCE = "/entry_1/instrument_1/source_1"
TRANSLATION = "/entry_1/sample_1/geometry_1/translation"
#: where the positions are looked for, in order
TRANSLATION_PATHS: tuple[str, ...] = (TRANSLATION, "/entry_1/data_1/translation", DETECTOR + "/translation")
PROBE = "/entry_1/image_1"
ILLUMINATION = SOURCE + "/illumination"
OURS = "/entry_1/ptychostream"
PTYCHODUS_PROBE_PIXEL = "/entry_1/ptychodus/probe_pixel_width_m"


def is_cxi(h5: Any) -> bool:
    """An open HDF5 file in the CXI layout (it has ``/entry_1``)."""
    return ENTRY in h5


def _scalar(h5: Any, path: str) -> float | None:
    return first_value(h5[path][()]) if path in h5 else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_cxi_h5(h5: Any, where: str) -> Parsed:
    """Parse an open CXI file; ``where`` names it in errors (see :func:`read_cxi`, which completes it)."""
    import h5py

    path = DATA if isinstance(h5.get(DATA), h5py.Dataset) else DETECTOR + "/data"
    if not isinstance(h5.get(path), h5py.Dataset):
        raise FileFormatError(f"{where}: a CXI file without frames: expected {DATA} or {DETECTOR}/data (N, H, W)")
    frames = np.asarray(h5[path][()])
    if frames.dtype.kind not in "biuf":
        raise FileFormatError(f"{where}:{path}: frames must be real intensities, got dtype {frames.dtype}")
    frames = as_frame_stack(frames, f"{where}:{path}")
    tpath = next((p for p in TRANSLATION_PATHS if isinstance(h5.get(p), h5py.Dataset)), None)
    pos: np.ndarray | None = None
    if tpath is not None:
        t = np.asarray(h5[tpath][()], dtype=np.float64)
        if t.ndim != 2 or t.shape[1] < 2:
            raise FileFormatError(f"{where}:{tpath}: translations must be (N, 3) (x, y, z) metres, got shape "
                                  f"{t.shape}")
        pos = np.stack([t[:, 1], t[:, 0]], axis=1)
    scan = Scan(frames, np.empty((0, 2)), source=f"{where} (cxi)", layout="cxi")
    scan.distance_m = _scalar(h5, DETECTOR + "/distance")
    scan.detector_pixel_m = _scalar(h5, DETECTOR + "/x_pixel_size")
    ypix = _scalar(h5, DETECTOR + "/y_pixel_size")
    if scan.detector_pixel_m is None:
        scan.detector_pixel_m = ypix
    elif ypix is not None and not np.isclose(ypix, scan.detector_pixel_m, rtol=1e-6):
        scan.attrs["detector_pixel_y_m"] = ypix
    energy_j = _scalar(h5, SOURCE + "/energy")
    scan.energy_ev = None if energy_j is None else energy_j / EV_J
    probe_path = next((p for p in (PROBE + "/data", ILLUMINATION) if isinstance(h5.get(p), h5py.Dataset)), None)
    if probe_path is not None:
        scan.probe = np.asarray(h5[probe_path][()])
        size = h5.get(PROBE + "/image_size")
        if PTYCHODUS_PROBE_PIXEL in h5:
            scan.object_pixel_m = _scalar(h5, PTYCHODUS_PROBE_PIXEL)
        elif isinstance(size, h5py.Dataset) and scan.probe.ndim >= 2 and np.asarray(size).size >= 1:
            width = float(np.asarray(size[()]).ravel()[0])
            if width > 0:
                scan.object_pixel_m = width / scan.probe.shape[-1]
    origin_from_file = False
    if OURS in h5:
        ours = h5[OURS]
        if "object_pixel_m" in ours:
            scan.object_pixel_m = first_value(ours["object_pixel_m"][()])
        if "origin" in ours:
            scan.origin = origin_name(_text(ours["origin"][()]), f"{where}:{OURS}/origin")
            origin_from_file = True
        for flag in ("flip_y", "flip_x", "transpose"):
            if flag in ours:
                setattr(scan, flag, bool(ours[flag][()]))
    return Parsed(scan, pos, tpath or TRANSLATION, "m", origin_from_file, probe_path or "probe",
                  no_positions=f"expected {' or '.join(TRANSLATION_PATHS)} (N, 3) (x, y, z) metres")


def read_cxi(path: str | Path, **overrides: Any) -> Scan:
    """Read a CXI scan (see the module docstring); ``overrides`` as for :func:`ptychostream.files.scan.read_scan`.

    Raises ``FileNotFoundError``, or :class:`FileFormatError` naming the file, the dataset and what was expected.
    """
    import h5py

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"scan file not found: {file}")
    try:
        h5 = h5py.File(file, "r")
    except OSError as exc:
        raise FileFormatError(f"{file}: not readable as HDF5 ({exc})") from None
    with h5:
        if not is_cxi(h5):
            raise FileFormatError(f"{file}: not a CXI file: no {ENTRY} group")
        return complete(parse_cxi_h5(h5, str(file)), overrides)


def write_cxi(path: str | Path, scan: Scan) -> None:
    """Write ``scan`` as a CXI file (see the module docstring): frames as stored, SI units, energy in J."""
    import h5py

    pos = np.asarray(scan.positions_m, dtype=np.float64)
    with h5py.File(path, "w") as h5:
        h5["cxi_version"] = CXI_VERSION
        det = h5.create_group(DETECTOR)
        det.create_dataset("data", data=scan.frames, chunks=(1, *scan.frames.shape[1:]), compression="gzip",
                           compression_opts=1)
        if scan.distance_m is not None:
            det["distance"] = float(scan.distance_m)
        if scan.detector_pixel_m is not None:
            det["x_pixel_size"] = det["y_pixel_size"] = float(scan.detector_pixel_m)
        src = h5.create_group(SOURCE)
        if scan.energy_ev is not None:
            src["energy"] = float(scan.energy_ev) * EV_J
        xyz = np.zeros((len(pos), 3))
        xyz[:, 0], xyz[:, 1] = pos[:, 1], pos[:, 0]
        h5[TRANSLATION] = xyz
        data = h5.create_group("/entry_1/data_1")
        data["data"] = h5py.SoftLink(DETECTOR + "/data")
        data["translation"] = h5py.SoftLink(TRANSLATION)
        pixel: float | None
        try:
            pixel = scan.pixel_m()
        except ValueError:
            pixel = None
        if scan.probe is not None:
            probe = np.asarray(scan.probe)
            image = h5.create_group(PROBE)
            image.create_dataset("data", data=probe).attrs["axes"] = "incoherent:y:x" if probe.ndim == 3 else "y:x"
            image["data_type"] = "amplitude"
            image["data_space"] = "real"
            if pixel is not None:
                image["image_size"] = np.array([pixel * probe.shape[-1], pixel * probe.shape[-2], 0.0])
            src["illumination"] = h5py.SoftLink(PROBE + "/data")
        ours = h5.create_group(OURS)
        ours["origin"] = scan.origin
        for flag in ("flip_y", "flip_x", "transpose"):
            ours[flag] = bool(getattr(scan, flag))
        if scan.object_pixel_m is not None:
            ours["object_pixel_m"] = float(scan.object_pixel_m)
