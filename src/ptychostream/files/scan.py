"""A measured (or simulated) ptychography scan as read from a file, in one shape for every use.

Replay, training pairs, training, the iterative step and scoring all read scans through
:func:`read_scan`.  The frames are kept as the file stores them (``origin``, ``flip_y``,
``flip_x`` and ``transpose`` say how to bring them to the canonical form: zero frequency at
(H // 2, W // 2), detector rows along y, columns along x); :meth:`Scan.canonical_frames` applies
that.  Positions are (N, 2) metres ordered (y, x), as everywhere in the package.

Layouts, told apart by content (``layout=`` forces one):

* ``ptychonn-npz`` / ``tike-npz``: :mod:`ptychostream.files.npz`;
* ``cxi``: an HDF5 file with ``/entry_1`` (any name ending), :mod:`ptychostream.files.cxi`;
* ``record``: our capture record (``/entry/data``, :mod:`ptychostream.files.record`), with the
  diffraction frames it captured and the positions it kept (from any position source);
* ``hdf5``: frames at ``dataset`` (or ``file.h5::/dataset``) or one of
  :data:`ptychostream.files.frames.FRAME_PATHS`, positions ``probe_position_{y,x}_m`` in the same
  file (the Ptychodus names), and ``.npy`` frames: these need ``positions=`` or ``product=`` when
  the file has none;
* ``ptychodus``: ``reader="NAME"`` reads the frames with the Ptychodus diffraction file reader of
  that name (its beamline formats: APS, NSLS-II, SLS, MAX IV, LCLS, ...), ``position_reader=``
  the positions with its probe position file reader (from ``positions=``, else the same file).
  Ptychodus (PyPI ``ptychodus`` 1.7) is optional: its readers need only numpy, h5py, scipy and
  scikit-image, but the package itself requires an LLM/MLflow client stack (pydantic-ai,
  mlflow-skinny), so it is not a dependency: install it (``pip install ptychodus``, or with
  ``--no-deps`` for the readers alone) to use ``reader=``.

A Ptychodus *product* (object, probe, positions; :mod:`ptychostream.files.product`) holds no
frames: pass it as ``product=`` with the frames file, and its positions, probe (every mode) and
pixel size are used.

Overrides (keyword arguments) win over the file: the Scan fields ``object_pixel_m``,
``energy_ev``, ``distance_m``, ``detector_pixel_m``, ``probe``, ``origin`` (``"corner"`` /
``"centre"``), ``flip_y``, ``flip_x``, ``transpose``, and ``position_units`` (``"m"`` /
``"pixels"``: the units of the positions the file (or the ``positions=`` file) holds; pixels are
multiplied by :meth:`Scan.pixel_m`).  Where a file says nothing, the origin is guessed from the
brightest pixel of the mean frame, and positions above 1 cm are pixels (see
:mod:`ptychostream.files.scandata`).  Bad input raises :class:`FileFormatError` naming the file,
the key and what was expected.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.cxi import is_cxi, parse_cxi_h5
from ptychostream.files.errors import FileFormatError
from ptychostream.files.frames import read_frames
from ptychostream.files.npz import parse_npz
from ptychostream.files.paths import split_dataset_path
from ptychostream.files.positions import read_positions
from ptychostream.files.product import OBJECT, PIXEL_WIDTH, PROBE, read_product
from ptychostream.files.record import (
    DATA,
    DETECTOR,
    open_record,
    read_record,
    record_positions,
)
from ptychostream.files.scandata import OVERRIDES, Origin, Parsed, Scan, complete

__all__ = ["LAYOUTS", "Origin", "Scan", "read_scan"]

#: the layouts :func:`read_scan` knows (``layout=``)
LAYOUTS: tuple[str, ...] = ("ptychonn-npz", "tike-npz", "cxi", "record", "hdf5", "ptychodus")
#: the reading options of read_scan besides the overrides of complete()
_OPTIONS: tuple[str, ...] = ("dataset", "positions", "product", "reader", "position_reader", "layout", "defaults")


def read_scan(path: str | Path, **overrides: Any) -> Scan:
    """Read a scan file of any supported layout; ``overrides`` set Scan fields the file lacks or gets wrong.

    Besides the overrides of the module docstring: ``dataset`` (the HDF5 frames), ``positions`` (a
    position file, see :func:`ptychostream.files.positions.read_positions`, or an (N, 2) (y, x)
    array in metres, replacing the file's), ``product`` (a Ptychodus product file: positions, probe
    and pixel size), ``reader`` / ``position_reader`` (Ptychodus plugin names), ``layout`` (one of
    :data:`LAYOUTS`, to skip the detection), ``defaults`` (geometry fields, e.g. a detector's own
    ``energy_ev``/``distance_m``/``detector_pixel_m``, used only where the file and the overrides
    give none).  Raises ``FileNotFoundError``, ``TypeError`` (an unknown
    override), or :class:`FileFormatError` naming the file, the key and what was expected.
    """
    opts = {k: overrides.pop(k) for k in _OPTIONS if k in overrides}
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"read_scan: unknown override(s) {', '.join(unknown)}; "
                        f"known: {', '.join(OVERRIDES + _OPTIONS)}")
    file, dataset = split_dataset_path(path, opts.get("dataset"), "scan")
    layout = opts.get("layout")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if opts.get("reader") or layout == "ptychodus":
        parsed = _parse_ptychodus(file, opts.get("reader"), opts.get("positions"), opts.get("position_reader"))
    else:
        parsed = _parse(file, dataset, layout)
    if opts.get("positions") is not None and not opts.get("position_reader"):
        _replace_positions(parsed, opts["positions"])
    if opts.get("product") is not None:
        _apply_product(parsed, Path(opts["product"]), overrides)
    return complete(parsed, overrides, opts.get("defaults"))


def _parse(file: Path, dataset: str | None, layout: str | None) -> Parsed:
    """Detect the layout of ``file`` (unless given) and parse it."""
    import h5py

    if layout in ("ptychonn-npz", "tike-npz") or (layout is None and file.suffix.lower() == ".npz"):
        parsed = parse_npz(file)
        if layout is not None and parsed.scan.layout != layout:
            raise FileFormatError(f"{file}: not a {layout} file (it is {parsed.scan.layout})")
        return parsed
    if file.suffix.lower() == ".npy":
        stack = read_frames(file)
        return Parsed(Scan(stack.frames, np.empty((0, 2)), source=f"{file} (npy)", layout="hdf5"), None, "positions",
                      no_positions="a .npy file holds frames only: pass positions= (a file or an (N, 2) array) "
                                   "or product=")
    if not h5py.is_hdf5(file):
        raise FileFormatError(f"{file}: unknown scan layout: expected a PtychoNN or Tike NPZ, a CXI or HDF5 file, "
                              "a ptychostream record or .npy frames (or reader= for a Ptychodus beamline reader)")
    with open_record(file) as h5:
        if layout == "cxi" or (layout is None and is_cxi(h5)):
            return parse_cxi_h5(h5, str(file))
        record = isinstance(h5.get(DATA), h5py.Group) and "unique_id" in h5[DATA]
        product = OBJECT in h5 and PROBE in h5 and not record
    if layout == "record" or (layout is None and record):
        return _parse_record(file)
    try:
        stack = read_frames(file, dataset)
    except FileFormatError:
        if product and dataset is None:
            raise FileFormatError(f"{file}: a Ptychodus product (object, probe, positions) holds no diffraction "
                                  "frames: pass it as product= with the frames file") from None
        raise
    return Parsed(Scan(stack.frames, np.empty((0, 2)), source=f"{stack.source} (hdf5)", layout="hdf5"),
                  stack.positions_m, "probe_position_y_m/probe_position_x_m", "m",
                  no_positions="expected probe_position_y_m and probe_position_x_m (N,) metres in the file, "
                               "or positions= or product=")


def _parse_record(file: Path) -> Parsed:
    """Our capture record: the diffraction frames it captured and the positions it kept."""
    rec = read_record(file)
    frames = rec["frames"]
    if frames is None:
        raise FileFormatError(f"{file}: the record holds no diffraction frames: expected /{DETECTOR}/data "
                              "(record with CaptureFrames=Yes)")
    data = rec["data"]
    scan = Scan(np.asarray(frames), np.empty((0, 2)), source=f"{file} (record)", layout="record",
                attrs={"record": rec["attrs"], "unique_id": np.asarray(data.get("unique_id"))})
    mosaic = rec.get("mosaic") or {}
    if "pixel_size_m" in mosaic and float(mosaic["pixel_size_m"]) > 0:
        scan.object_pixel_m = float(mosaic["pixel_size_m"])
    key = f"/{DATA}/position_y_m, position_x_m"
    pos, sources = record_positions(data, len(frames))
    scan.attrs["position_source"] = sources
    if not np.isfinite(pos).any():
        return Parsed(scan, None, key, "m",
                      no_positions=f"the record kept no frame positions ({key} absent or all NaN): no position "
                                   "source gave one; pass positions= or product=")
    return Parsed(scan, pos, key, "m")


def _replace_positions(parsed: Parsed, positions: Any) -> None:
    if isinstance(positions, (str, Path)):
        parsed.positions = read_positions(positions, allow_nan=True)
        parsed.positions_key = f"positions file {positions}"
        parsed.position_units = None
    else:
        parsed.positions = np.asarray(positions, dtype=np.float64)
        parsed.positions_key = "positions="
        parsed.position_units = "m"


def _apply_product(parsed: Parsed, file: Path, overrides: dict[str, Any]) -> None:
    """Positions, probe (every mode) and pixel of a Ptychodus product, unless overridden."""
    import h5py

    product = read_product(file)
    parsed.positions, parsed.positions_key, parsed.position_units = product.positions_m, f"{file}", "m"
    scan = parsed.scan
    scan.object_pixel_m = product.probe_pixel_m or product.pixel_m
    if file.suffix.lower() != ".npz":
        with h5py.File(file, "r") as h5:
            if PROBE in h5:
                scan.probe = np.asarray(h5[PROBE][()])
                parsed.probe_key = f"{file}:{PROBE}"
                if PIXEL_WIDTH in h5[PROBE].attrs:
                    scan.object_pixel_m = float(np.asarray(h5[PROBE].attrs[PIXEL_WIDTH]).ravel()[0])
    scan.attrs["product"] = str(file)


@functools.lru_cache(maxsize=1)
def _ptychodus_registry() -> Any:
    try:
        from ptychodus.api.plugins import PluginRegistry
    except ImportError:
        raise ModuleNotFoundError("reader= needs the optional ptychodus package (pip install ptychodus; "
                                  "its readers need only numpy, h5py, scipy and scikit-image)") from None
    with warnings.catch_warnings():  # its plugins import deprecated modules (xdrlib) and say so
        warnings.simplefilter("ignore", DeprecationWarning)
        return PluginRegistry.load_plugins()


def _plugin(chooser: Any, name: str, what: str) -> Any:
    """The plugin ``name`` of ``chooser``; raises ValueError naming the known ones."""
    try:
        return chooser.get_strategy_by_name(name)
    except LookupError:
        raise ValueError(f"no Ptychodus {what} reader {name!r}; known: {chooser.stringify_plugin_names()}") from None


def _parse_ptychodus(file: Path, reader: str | None, positions: Any, position_reader: str | None) -> Parsed:
    """Frames (and positions) through the Ptychodus plugin readers."""
    if not reader:
        raise ValueError("layout='ptychodus' needs reader= (a Ptychodus diffraction file reader name)")
    registry = _ptychodus_registry()
    diffraction_reader = _plugin(registry.diffraction_file_readers, reader, "diffraction file")
    position_plugin = None if not position_reader else _plugin(registry.probe_position_file_readers,
                                                               position_reader, "probe position file")
    try:
        dataset = diffraction_reader.read(file)
        arrays = list(dataset)
        if not arrays:
            raise FileFormatError(f"{file}: the Ptychodus {reader} reader found no diffraction patterns")
        frames = np.concatenate([np.asarray(a.get_patterns()) for a in arrays])
        indexes = np.concatenate([np.asarray(a.get_indexes()) for a in arrays])
        meta = dataset.get_metadata()
    except FileFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin raises what it likes; the caller gets one kind of error
        raise FileFormatError(f"{file}: the Ptychodus {reader} reader failed: {exc}") from None
    scan = Scan(frames, np.empty((0, 2)), source=f"{file} (ptychodus {reader})", layout="ptychodus",
                distance_m=meta.detector_distance_m, energy_ev=meta.photon_energy_eV,
                detector_pixel_m=None if meta.detector_pixel_geometry is None else meta.detector_pixel_geometry.width_m,
                attrs={"indexes": indexes})
    if position_plugin is None:
        return Parsed(scan, None, "positions", None,
                      no_positions=f"the Ptychodus {reader} reader gives frames only: pass positions= (and "
                                   "position_reader=) or product=")
    pfile = Path(positions) if positions is not None else file
    try:
        seq = position_plugin.read(pfile)
    except Exception as exc:  # noqa: BLE001 - as above
        raise FileFormatError(f"{pfile}: the Ptychodus {position_reader} position reader failed: {exc}") from None
    pos = np.stack([np.asarray(seq.get_coordinates_y_m()), np.asarray(seq.get_coordinates_x_m())], axis=1)
    pidx = np.asarray(seq.get_indexes())
    if len(pidx) == len(indexes) and set(pidx.tolist()) == set(indexes.tolist()):
        order = {int(i): k for k, i in enumerate(pidx)}
        pos = pos[[order[int(i)] for i in indexes]]
    return Parsed(scan, pos, f"{pfile} ({position_reader})", "m")

