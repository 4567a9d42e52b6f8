"""Scans in NPZ files, in the two layouts the field uses, read into a :class:`~ptychostream.files.scandata.Scan`.

* **PtychoNN** (``layout="ptychonn-npz"``): ``reciprocal`` (N, H, W) (or (N, 1, H, W))
  intensities, ``position`` (N, 2) (y, x) (extra columns ignored), optional ``real`` (the
  complex object patches, kept as ``attrs["real"]``) and ``pixelsize`` (the object pixel, m).
  Positions are metres, or pixels when larger than 1 cm (as :mod:`ptychostream.files.pairs`).
* **Tike** (``layout="tike-npz"``): ``data`` (N, H, W) (leading singleton axes allowed),
  ``scan`` (N, 2) (or (1, N, 2)) ordered (y, x), in object pixels unless the file says otherwise,
  optional ``probe`` (h, w), (modes, h, w) or (1, 1, modes, h, w) complex.  Tike's ``scan`` is the
  minimum corner of the probe box, not its centre: a constant offset, kept as it is.

Both layouts may also hold scalars that :func:`read_npz` reads where present (an override wins):
``object_pixel_m`` (or ``pixelsize``, ``pixel_size``, ``pixel_size_m``), ``energy_ev`` (or
``energy_kev``), ``distance_m`` (or ``detector_distance_m``), ``detector_pixel_m``, ``origin``
(``"corner"``/``"centre"``), ``position_units`` (``"m"``/``"pixels"``), ``flip_y``, ``flip_x``,
``transpose``.  :func:`write_npz` writes both layouts with those scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.arrays import as_frame_stack, first_value, open_npz
from ptychostream.files.errors import FileFormatError
from ptychostream.files.positions import as_yx
from ptychostream.files.scandata import Parsed, Scan, complete, origin_name

__all__ = ["NPZ_LAYOUTS", "npz_layout", "parse_npz", "read_npz", "write_npz"]

#: layout name -> (frames key, positions key)
NPZ_LAYOUTS: dict[str, tuple[str, str]] = {"ptychonn-npz": ("reciprocal", "position"), "tike-npz": ("data", "scan")}
#: Scan field -> the NPZ keys read for it, in order
_META: dict[str, tuple[str, ...]] = {
    "object_pixel_m": ("object_pixel_m", "pixelsize", "pixel_size", "pixel_size_m"),
    "energy_ev": ("energy_ev",),
    "distance_m": ("distance_m", "detector_distance_m"),
    "detector_pixel_m": ("detector_pixel_m",),
}
_FLAGS = ("flip_y", "flip_x", "transpose")


def npz_layout(keys: list[str], where: str) -> str:
    """The layout of an NPZ holding ``keys``; raises :class:`FileFormatError` naming the keys expected."""
    for name, (frames_key, _) in NPZ_LAYOUTS.items():
        if frames_key in keys:
            return name
    raise FileFormatError(f"{where}: unknown NPZ layout (keys present: {', '.join(keys) or 'none'}); expected "
                          "PtychoNN 'reciprocal' + 'position' or Tike 'data' + 'scan'")


def _text(value: Any) -> str:
    a = np.asarray(value)
    return str(a.item() if a.ndim == 0 else a.ravel()[0])


def parse_npz(path: str | Path) -> Parsed:
    """Parse a PtychoNN or Tike NPZ scan (see the module docstring); :func:`read_npz` completes it."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"scan file not found: {file}")
    with open_npz(file) as z:
        keys = list(z.files)
        layout = npz_layout(keys, str(file))
        frames_key, pos_key = NPZ_LAYOUTS[layout]
        frames = np.asarray(z[frames_key])
        if frames.dtype.kind not in "biuf":
            raise FileFormatError(f"{file}:{frames_key}: frames must be real intensities, got dtype {frames.dtype}")
        frames = as_frame_stack(frames, f"{file}:{frames_key}")
        pos: np.ndarray | None = None
        if pos_key in keys:
            raw = np.asarray(z[pos_key], dtype=np.float64)
            if layout == "tike-npz":
                if raw.shape[-1] != 2:
                    raise FileFormatError(f"{file}:{pos_key}: Tike positions must be (N, 2) or (1, N, 2) (y, x), "
                                          f"got shape {raw.shape}")
                pos = raw.reshape(-1, 2)
            else:
                pos = as_yx(raw[:, :2] if raw.ndim == 2 and raw.shape[1] > 2 else raw, "yx", f"{file}:{pos_key}")
        scan = Scan(frames, np.empty((0, 2)), source=f"{file} ({layout})", layout=layout)
        for name, candidates in _META.items():
            key = next((k for k in candidates if k in keys), None)
            if key is not None:
                setattr(scan, name, first_value(z[key]))
        if scan.energy_ev is None and "energy_kev" in keys:
            scan.energy_ev = 1e3 * first_value(z["energy_kev"])
        for flag in _FLAGS:
            if flag in keys:
                setattr(scan, flag, bool(np.asarray(z[flag]).ravel()[0]))
        origin_from_file = "origin" in keys
        if origin_from_file:
            scan.origin = origin_name(_text(z["origin"]), f"{file}:origin")
        units = _text(z["position_units"]) if "position_units" in keys else ("pixels" if layout == "tike-npz" else None)
        if layout == "tike-npz" and "probe" in keys:
            scan.probe = np.asarray(z["probe"])
        if layout == "ptychonn-npz" and "real" in keys:
            scan.attrs["real"] = np.asarray(z["real"])
    return Parsed(scan, pos, pos_key, units, origin_from_file,
                  no_positions=f"the {layout} layout needs {pos_key!r} (N, 2) (y, x) besides {frames_key!r} "
                               f"(keys present: {', '.join(keys)})")


def read_npz(path: str | Path, **overrides: Any) -> Scan:
    """Read a PtychoNN or Tike NPZ scan (see the module docstring); ``overrides`` as for
    :func:`ptychostream.files.scan.read_scan`.

    Raises ``FileNotFoundError``, or :class:`FileFormatError` naming the file, the key and what
    was expected (an unknown layout, no positions, mismatched counts, NaN positions, a bad probe).
    """
    return complete(parse_npz(path), overrides)


def write_npz(path: str | Path, scan: Scan, *, layout: str = "tike-npz", position_units: str = "pixels",
              metadata: bool = True) -> None:
    """Write ``scan`` as a Tike (``data``, ``scan`` (1, N, 2), ``probe`` (1, 1, modes, h, w)) or PtychoNN
    (``reciprocal``, ``position``, ``real`` when ``attrs`` has it) NPZ, frames as stored.

    ``position_units``: ``"pixels"`` (divided by :meth:`Scan.pixel_m`) or ``"m"``. ``metadata``:
    also write the scalars of the module docstring (the geometry, origin, orientation, units); a
    file without them is what many beamline tools write.
    """
    if layout not in NPZ_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(NPZ_LAYOUTS)}, got {layout!r}")
    if position_units not in ("m", "pixels"):
        raise ValueError("position_units must be 'm' or 'pixels'")
    pos = np.asarray(scan.positions_m, dtype=np.float64)
    if position_units == "pixels":
        pos = pos / scan.pixel_m()
    frames_key, pos_key = NPZ_LAYOUTS[layout]
    arrays: dict[str, Any] = {frames_key: scan.frames, pos_key: pos[None] if layout == "tike-npz" else pos}
    if layout == "tike-npz" and scan.probe is not None:
        arrays["probe"] = np.asarray(scan.probe)[None, None]
    if layout == "ptychonn-npz" and isinstance(scan.attrs.get("real"), np.ndarray):
        arrays["real"] = scan.attrs["real"]
    if metadata:
        for name in ("object_pixel_m", "energy_ev", "distance_m", "detector_pixel_m"):
            value = getattr(scan, name)
            if value is not None:
                arrays[name] = np.float64(value)
        arrays.update(origin=np.str_(scan.origin), position_units=np.str_(position_units),
                      **{flag: np.bool_(getattr(scan, flag)) for flag in _FLAGS})
    np.savez(path, **arrays)
