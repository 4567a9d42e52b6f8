"""The :class:`Scan` record and what every scan reader does after parsing its layout.

:mod:`ptychostream.files.scan` is the public face (``from ptychostream.files.scan import Scan,
read_scan``); the class lives here so that the layout readers (:mod:`~ptychostream.files.npz`,
:mod:`~ptychostream.files.cxi`) can build it while :func:`~ptychostream.files.scan.read_scan`
dispatches to them, with no import cycle.

A layout reader parses the file into a :class:`Scan` whose positions are still in the file's
units, then calls :func:`complete`, which applies the caller's overrides and makes the scan whole:

* **overrides** set Scan fields (``object_pixel_m``, ``energy_ev``, ``distance_m``,
  ``detector_pixel_m``, ``probe``, ``origin``, ``flip_y``, ``flip_x``, ``transpose``) and
  ``position_units`` (``"m"`` or ``"pixels"``); an override wins over the file;
* **positions** in pixels are multiplied by :meth:`Scan.pixel_m` (the file's object pixel, the
  override, or lambda * z / (N * detector pixel)); counts and NaN rows are checked;
* **origin**: the override, else what the file says, else a guess: the brightest pixel of the
  mean frame is nearer (on the torus) to pixel (0, 0) than to (H // 2, W // 2) => ``"corner"``;
  ``attrs["origin_from"]`` says which (``override``, ``file``, ``guess``);
* **probe**: made (modes, h, w) complex and checked against the frame size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from ptychostream.files.errors import FileFormatError

__all__ = ["FIELD_OVERRIDES", "OVERRIDES", "PIXEL_POSITIONS_ABOVE_M", "POSITION_UNITS", "NoPositionsError", "Origin",
           "Parsed", "PositionUnits", "Scan", "as_probe_modes", "complete", "guess_origin", "origin_name"]

#: where a stored frame has its zero frequency: at pixel (0, 0), or at (H // 2, W // 2)
Origin = Literal["corner", "centre"]
#: units of the positions in a file: metres or object pixels
PositionUnits = Literal["m", "pixels"]
POSITION_UNITS: tuple[str, ...] = ("m", "pixels")
#: the Scan fields an override may set
FIELD_OVERRIDES: tuple[str, ...] = ("object_pixel_m", "energy_ev", "distance_m", "detector_pixel_m", "probe",
                                    "origin", "flip_y", "flip_x", "transpose")
#: every override :func:`complete` takes
OVERRIDES: tuple[str, ...] = (*FIELD_OVERRIDES, "position_units")
#: positions larger than this (metres) are taken as pixels when the file does not say
PIXEL_POSITIONS_ABOVE_M = 1e-2
#: frames averaged for the origin guess
_GUESS_FRAMES = 64

#: h * c in eV * m, for the wavelength
_HC_EV_M = 1.239841984e-6


@dataclass
class Scan:
    """Frames, positions and geometry of one scan (see :mod:`ptychostream.files.scan`)."""

    frames: np.ndarray  # (N, H, W) intensities, as stored
    positions_m: np.ndarray  # (N, 2) (y, x) metres, sample-plane probe positions
    object_pixel_m: float | None = None  # real-space pixel; None: derive from the geometry
    energy_ev: float | None = None
    distance_m: float | None = None  # sample to detector
    detector_pixel_m: float | None = None
    probe: np.ndarray | None = None  # (modes, h, w) complex, at object_pixel_m
    origin: Origin = "centre"
    flip_y: bool = False  # applied after transpose
    flip_x: bool = False
    transpose: bool = False  # applied first
    source: str = ""  # the file (and layout) it came from, for messages
    layout: str = ""  # e.g. "ptychonn-npz", "tike-npz", "cxi", "ptychodus", "record"
    attrs: dict[str, object] = field(default_factory=dict)  # anything else the file said

    @property
    def wavelength_m(self) -> float | None:
        return None if self.energy_ev is None else _HC_EV_M / self.energy_ev

    def pixel_m(self) -> float:
        """The object pixel: the file's, else lambda * z / (N * detector pixel); raises ValueError if neither.

        N is the canonical frame width (the stored height when ``transpose``).
        """
        if self.object_pixel_m is not None:
            return float(self.object_pixel_m)
        lam = self.wavelength_m
        if lam is None or self.distance_m is None or self.detector_pixel_m is None:
            missing = [n for n, v in (("energy_ev", self.energy_ev), ("distance_m", self.distance_m),
                                      ("detector_pixel_m", self.detector_pixel_m)) if v is None]
            raise ValueError(f"{self.source}: no object pixel size: the file gives none and the geometry lacks "
                             f"{', '.join(missing)} (pass object_pixel_m=... or the geometry)")
        n = self.frames.shape[-2] if self.transpose else self.frames.shape[-1]
        return lam * float(self.distance_m) / (n * float(self.detector_pixel_m))

    def canonical_frames(self) -> np.ndarray:
        """The frames in canonical form (float32, centred, oriented), a new array.

        A stored frame is first centred (``np.fft.fftshift`` when ``origin == "corner"``), then
        transposed, then flipped (rows when ``flip_y``, columns when ``flip_x``).  A flip reverses
        the spatial frequencies (k -> -k mod N: a reversal and a roll by one), so the zero
        frequency stays at (H // 2, W // 2) on even-sized frames; a bare reversal would move it by
        a pixel, a phase ramp of pi across a half-frame patch.
        """
        out = np.asarray(self.frames, dtype=np.float32)
        if self.origin == "corner":
            out = np.fft.fftshift(out, axes=(-2, -1))
        if self.transpose:
            out = np.swapaxes(out, -1, -2)
        if self.flip_y:
            out = np.roll(out[..., ::-1, :], 1, axis=-2)
        if self.flip_x:
            out = np.roll(out[..., :, ::-1], 1, axis=-1)
        if np.may_share_memory(out, self.frames):
            return np.array(out, dtype=np.float32, order="C")
        return np.ascontiguousarray(out)

    def subset(self, indices: Any) -> Scan:
        """The scan of the frames ``indices`` (an index array, a boolean mask or a slice).

        Every other field is kept; arrays in ``attrs`` whose first axis is N (per-frame data such
        as PtychoNN labels) are cut the same way.
        """
        n = len(self.frames)
        idx = np.arange(n)[indices]
        attrs = {k: (v[idx] if isinstance(v, np.ndarray) and v.ndim and len(v) == n else v)
                 for k, v in self.attrs.items()}
        return replace(self, frames=self.frames[idx], positions_m=self.positions_m[idx], attrs=attrs)


class NoPositionsError(FileFormatError):
    """A scan file that holds frames but no positions; ``scan`` is what was read (its ``positions_m`` empty),
    for a caller that can use frames alone (the replay)."""

    def __init__(self, message: str, scan: Scan) -> None:
        super().__init__(message)
        self.scan = scan


def origin_name(value: Any, where: str) -> Origin:
    """``"corner"`` or ``"centre"`` from a file's or caller's value (``center``, bytes and case accepted)."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    text = text.strip().lower()
    if text in ("corner", "centre", "center"):
        return "corner" if text == "corner" else "centre"
    raise FileFormatError(f"{where}: origin must be 'corner' or 'centre', got {text!r}")


def guess_origin(frames: np.ndarray) -> Origin:
    """Where the zero frequency of ``frames`` (N, H, W) sits, from the brightest pixel of the mean frame.

    ``"corner"`` when that pixel is nearer (with wrap-around) to (0, 0) than to (H // 2, W // 2).
    The brightest pixel is taken on the log of the mean frame smoothed over a few pixels
    (Gaussian, sigma 2 px, wrapping), so a few hot pixels do not decide: on a log scale a lone
    pixel, however bright, weighs little against the neighbourhood of the zero frequency.
    """
    from scipy.ndimage import gaussian_filter

    mean = np.asarray(frames[:_GUESS_FRAMES], dtype=np.float64).mean(axis=0)
    mean = gaussian_filter(np.log1p(np.maximum(mean, 0.0)), sigma=2.0, mode="wrap")
    h, w = mean.shape
    iy, ix = np.unravel_index(int(np.argmax(mean)), mean.shape)

    def dist(cy: int, cx: int) -> float:
        dy, dx = abs(iy - cy), abs(ix - cx)
        return float(min(dy, h - dy) ** 2 + min(dx, w - dx) ** 2)

    return "corner" if dist(0, 0) < dist(h // 2, w // 2) else "centre"


def as_probe_modes(probe: Any, frame_shape: tuple[int, int], where: str) -> np.ndarray:
    """A probe as (modes, h, w) complex64 equal in size to the frames.

    Accepted: (h, w), (modes, h, w), or more leading axes of which all but the modes axis are
    singleton or taken at index 0 (Tike (1, 1, modes, h, w), Ptychodus (opr, modes, h, w)).
    Raises :class:`FileFormatError` naming ``where`` for a probe that is not complex or not
    ``frame_shape`` (h, w).
    """
    p = np.asarray(probe)
    if not np.iscomplexobj(p):
        raise FileFormatError(f"{where}: the probe must be complex (modes, {frame_shape[0]}, {frame_shape[1]}), "
                              f"got {p.dtype} {p.shape}")
    if p.ndim < 2:
        raise FileFormatError(f"{where}: the probe must be (modes, h, w), got shape {p.shape}")
    while p.ndim > 3:
        p = p[0]
    if p.ndim == 2:
        p = p[None]
    if tuple(p.shape[-2:]) != tuple(frame_shape):
        raise FileFormatError(f"{where}: the probe is {p.shape[-2]}x{p.shape[-1]} but the frames are "
                              f"{frame_shape[0]}x{frame_shape[1]}: expected (modes, {frame_shape[0]}, "
                              f"{frame_shape[1]})")
    if not np.all(np.isfinite(p)):
        raise FileFormatError(f"{where}: the probe holds NaN or infinite values")
    return p.astype(np.complex64, copy=False)


def _check_overrides(overrides: Mapping[str, Any]) -> None:
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"unknown scan override(s) {', '.join(unknown)}; known: {', '.join(OVERRIDES)}")


@dataclass
class Parsed:
    """A layout reader's result before :func:`complete`: the scan, and its positions in the file's units."""

    scan: Scan  # positions_m is set by complete()
    positions: np.ndarray | None  # (N, 2) (y, x) in position_units; None: the file has none
    positions_key: str  # the file's key for them, for messages
    position_units: str | None = None  # "m", "pixels", or None: decide by size (above 1 cm => pixels)
    origin_from_file: bool = False  # scan.origin is the file's
    probe_key: str = "probe"
    no_positions: str = ""  # what was expected, for the error when positions is None


def complete(parsed: Parsed, overrides: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Scan:
    """Apply ``overrides`` to a parsed scan, convert its positions to metres and check it (see the module
    docstring); returns ``parsed.scan``.

    ``defaults`` (Scan field values, e.g. a detector's own geometry) fill only the fields that the
    file and the overrides leave None.

    Raises :class:`FileFormatError` naming ``scan.source``, the key and what was expected, ``TypeError``
    for an unknown override.
    """
    _check_overrides(overrides)
    scan = parsed.scan
    where = scan.source
    for name in FIELD_OVERRIDES:
        if overrides.get(name) is not None:
            value = overrides[name]
            if name == "origin":
                value = origin_name(value, "origin override")
            elif name in ("flip_y", "flip_x", "transpose"):
                value = bool(value)
            elif name != "probe":
                value = float(value)
            setattr(scan, name, value)
    for name, value in (defaults or {}).items():
        if name not in ("object_pixel_m", "energy_ev", "distance_m", "detector_pixel_m"):
            raise TypeError(f"unknown scan default {name!r}: only the geometry fields take defaults")
        if getattr(scan, name) is None and value is not None:
            setattr(scan, name, float(value))
    frames = scan.frames
    if frames.ndim != 3:
        raise FileFormatError(f"{where}: the frames must be (N, H, W), got shape {frames.shape}")
    key = parsed.positions_key
    if parsed.positions is None:
        raise NoPositionsError(f"{where}: no positions: {parsed.no_positions or f'expected {key!r}'}", scan)
    pos = np.asarray(parsed.positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise FileFormatError(f"{where}: {key!r} must hold (N, 2) (y, x) positions, got shape {pos.shape}")
    if len(pos) != len(frames):
        raise FileFormatError(f"{where}: {len(pos)} positions in {key!r} for {len(frames)} frames: "
                              "expected one position per frame")
    bad = np.flatnonzero(~np.isfinite(pos).all(axis=1))
    if bad.size:
        raise FileFormatError(f"{where}: {bad.size} position(s) in {key!r} are NaN or infinite "
                              f"(first: frame {int(bad[0])}); expected a finite position for every frame")
    units = overrides.get("position_units") or parsed.position_units
    if units is None:
        units = "pixels" if pos.size and np.abs(pos).max() > PIXEL_POSITIONS_ABOVE_M else "m"
    if units not in POSITION_UNITS:
        raise FileFormatError(f"{where}: position units must be one of {', '.join(POSITION_UNITS)}, got {units!r}")
    if units == "pixels":
        try:
            pixel = scan.pixel_m()
        except ValueError as exc:
            raise FileFormatError(f"{where}: the positions in {key!r} are in pixels: {exc}") from None
        pos = pos * pixel
    scan.positions_m = pos
    scan.attrs["position_units"] = units
    if overrides.get("origin") is not None:
        scan.attrs["origin_from"] = "override"
    elif parsed.origin_from_file:
        scan.attrs["origin_from"] = "file"
    else:
        scan.origin = guess_origin(frames)
        scan.attrs["origin_from"] = "guess"
    if scan.probe is not None:
        h, w = frames.shape[1:]
        scan.probe = as_probe_modes(scan.probe, (w, h) if scan.transpose else (h, w),
                                    "probe override" if overrides.get("probe") is not None
                                    else f"{where}:{parsed.probe_key}")
    return scan
