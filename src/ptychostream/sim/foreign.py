"""A "foreign instrument": a simulated scan unlike the default, the tests' stand-in for measured data.

Everything differs from :class:`~ptychostream.sim.forward.Geometry` and the simulated detector's
defaults: the photon energy, the detector distance and pixel; the probe (a partially coherent,
aberrated Kirkpatrick–Baez focus of several modes, :func:`~ptychostream.sim.probes.kb_mirror_probe`);
the scan (a serpentine raster with jitter); the object (another generator and settings, amplitude
slightly above and below 1); and the frames as stored (:class:`ForeignInstrument` for the defaults).

Physics.  The object pixel is λ·z / (N·p).  A frame's mean count is
``photons · Σ_k |F{P_k · O}|² + background``: F is the orthonormal 2-D FFT, the modes P_k carry
their weights (Σ_k Σ|P_k|² = 1, so ``photons`` is the incident count of one exposure and the
intensities of the modes add incoherently), the background is smooth (air scatter,
``b_peak / (1 + (ρ/ρ_0)²) + b_flat`` counts per pixel, ρ the distance to the zero frequency);
the counts are Poisson, then a few hot pixels read ``hot_value`` in every frame.

Frames as stored (what a file holds):

* zero frequency at the corner, pixel (0, 0) (not fftshift-centred);
* a flipped detector axis reverses the frequencies of that axis, k → −k (mod N): ``np.flip``
  then a roll by one (:func:`reverse_frequencies`), so the zero frequency stays at pixel 0;
* ``transpose`` (off by default) swaps the detector axes last, so a reader transposes first.

:class:`~ptychostream.files.scan.Scan` says so (``origin="corner"``, ``flip_x=True``, ...): its
canonical frames are the centred, oriented frames of :func:`~ptychostream.sim.forward.far_field`.
Positions in the files are in object pixels, (y, x): the top-left corner of the probe window in
the truth object's array (Tike's convention, all ≥ 0); ``positions_m`` is the same × the object
pixel, and the truth's object centre (:class:`ForeignTruth.center_m`) is given in that frame.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.product import PIXEL_HEIGHT, PIXEL_WIDTH, PROBE, Product
from ptychostream.files.scan import Scan
from ptychostream.files.truth import write_truth
from ptychostream.sim.forward import extract_patches, frame_indices
from ptychostream.sim.objects import OBJECT_KINDS, make_object
from ptychostream.sim.probes import kb_mirror_probe, mode_weights
from ptychostream.sim.scans import scan_extent_px, scan_positions

__all__ = [
    "FOREIGN_FILES", "HC_EV_M", "ForeignInstrument", "ForeignTruth", "add_foreign_parser", "reverse_frequencies",
    "simulate_foreign", "store_frames", "write_foreign", "write_foreign_cxi", "write_foreign_truth",
    "write_tike_npz",
]

#: h·c in eV·m (CODATA): λ = HC_EV_M / E
HC_EV_M = 1.239841984e-6
#: the files ``ptychostream sim-foreign`` writes: Tike-style NPZ, CXI, truth
FOREIGN_FILES: tuple[str, str, str] = ("foreign.npz", "foreign.cxi", "foreign-truth.h5")
_DTYPES = ("uint16", "uint32", "float32")


@dataclass(frozen=True)
class ForeignInstrument:
    """Settings of the foreign instrument; the defaults give 300 frames of 128×128 in about a second."""

    # geometry (the default Geometry: 10 keV, 2 m, 75 µm)
    energy_ev: float = 8000.0
    distance_m: float = 4.2
    detector_pixel_m: float = 55e-6
    size: int = 128
    # scan: a serpentine raster with jitter (the default: a Fermat spiral in metres)
    frames: int = 300
    step_px: float = 9.0
    jitter: float = 0.15  # uniform, ± this fraction of the step on each axis
    serpentine: bool = True  # odd rows run backwards, as a fly scan does
    # probe: kb_mirror_probe's settings
    probe_modes: int = 4
    aperture: tuple[float, float] = (0.16, 0.12)  # half-widths (y, x), cycles/pixel
    footprint: float = 0.35
    astigmatism: float = 0.3
    coma_rad: tuple[float, float] = (1.2, -0.8)
    figure_error_rad: float = 0.5
    coherence: tuple[float, float] = (0.15, 0.45)
    # object: a make_object kind with other settings than the default's
    object_kind: str = "circuit"
    object_options: tuple[tuple[str, float], ...] = (("pitch_px", 9.0), ("density", 1.3))
    max_phase: float = 1.4
    delta_beta: float = 10.0
    amplitude_scale: float = 1.04  # thin parts transmit slightly more than 1, as a reconstruction may say
    # detector
    photons: float = 5e6  # incident photons per exposure
    background_peak: float = 3.0  # counts per pixel at the zero frequency
    background_width_px: float = 25.0
    background_flat: float = 0.2
    hot_pixels: int = 6
    hot_value: float = 2**20
    noise: bool = True  # False: the mean counts (rounded for integer dtypes)
    dtype: str = "uint32"
    # how the frames are stored
    flip_y: bool = False
    flip_x: bool = True
    transpose: bool = False

    def __post_init__(self) -> None:
        for name in ("energy_ev", "distance_m", "detector_pixel_m", "step_px", "footprint", "photons",
                     "background_width_px", "amplitude_scale", "max_phase", "delta_beta", "hot_value"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ForeignInstrument.{name} must be a positive number, got {value!r}")
        for name in ("size", "frames", "probe_modes"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"ForeignInstrument.{name} must be a positive integer, got {value!r}")
        if self.size % 2 or self.size < 8:
            raise ValueError(f"ForeignInstrument.size must be even and >= 8, got {self.size!r}")
        for name in ("jitter", "background_peak", "background_flat"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"ForeignInstrument.{name} must be >= 0, got {value!r}")
        if int(self.hot_pixels) != self.hot_pixels or not 0 <= self.hot_pixels <= self.size**2:
            raise ValueError(f"ForeignInstrument.hot_pixels must be an integer in 0..{self.size**2}, "
                             f"got {self.hot_pixels!r}")
        if self.object_kind not in OBJECT_KINDS:
            raise ValueError(f"ForeignInstrument.object_kind {self.object_kind!r} is not one of "
                             f"{', '.join(OBJECT_KINDS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ForeignInstrument.dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")

    @property
    def wavelength_m(self) -> float:
        """λ = h·c / E."""
        return HC_EV_M / self.energy_ev

    @property
    def pixel_m(self) -> float:
        """The object pixel λ·z / (N·p)."""
        return self.wavelength_m * self.distance_m / (self.size * self.detector_pixel_m)


@dataclass
class ForeignTruth:
    """What a foreign scan was simulated from; ``positions_m`` are the scan's, in the same frame."""

    object: np.ndarray  # (H, W) complex64
    probe: np.ndarray  # (modes, N, N) complex64, the modes' powers are their weights
    positions_m: np.ndarray  # (N, 2) (y, x): the probe window's top-left corner, metres
    pixel_m: float
    center_m: tuple[float, float]  # (y, x) of the object's centre pixel (H // 2, W // 2)
    background: np.ndarray  # (N, N) float32 mean background counts, canonical (centred) layout
    hot_pixel_indexes: np.ndarray  # flat indexes into the canonical (centred, oriented) frame
    hot_pixel_indexes_stored: np.ndarray  # flat indexes into the stored frame
    settings: ForeignInstrument
    seed: int
    attrs: dict[str, Any] = field(default_factory=dict)

    def positions_from_centre_m(self) -> np.ndarray:
        """Probe-centre positions relative to the object's centre pixel (the sim convention)."""
        return self.positions_m - np.asarray(self.center_m)[None, :]

    def patches(self, idx: Any = slice(None)) -> np.ndarray:
        """The true object patches (n, N, N) complex64 of the frames ``idx``."""
        ii, scalar = frame_indices(idx, len(self.positions_m))
        p = extract_patches(self.object, self.positions_from_centre_m()[ii], self.pixel_m, self.probe.shape[-1])
        return p[0] if scalar else p

    def product(self) -> Product:
        """The truth as a product (its probe: the first, strongest mode)."""
        return Product(self.object, self.pixel_m, self.center_m, probe=self.probe[0], positions_m=self.positions_m)


def reverse_frequencies(frames: np.ndarray, axis: int) -> np.ndarray:
    """Frequencies k → −k (mod N) along ``axis``: a detector flip that keeps the zero frequency in place.

    ``np.flip`` then a roll by one; its own inverse, and it commutes with ``fftshift`` for even N.
    """
    return np.roll(np.flip(frames, axis=axis), 1, axis=axis)


def store_frames(canonical: np.ndarray, *, flip_y: bool = False, flip_x: bool = False,
                 transpose: bool = False) -> np.ndarray:
    """Canonical frames (…, N, N), centred and oriented → stored: corner origin, flips, then transpose.

    The inverse of what ``Scan(origin="corner", flip_y=..., flip_x=..., transpose=...).canonical_frames()``
    does (transpose first, then the flips, then the fftshift).
    """
    out = np.fft.ifftshift(np.asarray(canonical), axes=(-2, -1))
    if flip_y:
        out = reverse_frequencies(out, -2)
    if flip_x:
        out = reverse_frequencies(out, -1)
    if transpose:
        out = np.swapaxes(out, -2, -1)
    return np.ascontiguousarray(out)


def _seeds(seed: int) -> dict[str, int]:
    names = ("scan", "object", "probe", "hot", "noise")
    kids = np.random.SeedSequence(int(seed)).spawn(len(names))
    return {n: int(k.generate_state(1)[0]) for n, k in zip(names, kids)}


def _positions_px(s: ForeignInstrument, seed: int) -> np.ndarray:
    """Serpentine jittered raster (N, 2) (y, x) in object pixels, centred on 0."""
    pos = scan_positions("jitter", s.step_px, s.frames, seed=seed, jitter=s.jitter)
    if s.serpentine:
        cols = math.ceil(math.sqrt(s.frames))  # scan_positions' raster: ceil(sqrt(N)) columns, row by row
        k = np.arange(s.frames)
        row, col = k // cols, k % cols
        in_row = np.minimum(cols, s.frames - row * cols)
        order = np.where(row % 2 == 1, row * cols + (in_row - 1 - col), k)
        pos = pos[order]
    return pos


def _background(s: ForeignInstrument) -> np.ndarray:
    c = np.arange(s.size) - s.size // 2
    rho2 = (c[:, None] ** 2 + c[None, :] ** 2) / s.background_width_px**2
    return (s.background_peak / (1.0 + rho2) + s.background_flat).astype(np.float32)


def _hot_canonical(stored_flat: np.ndarray, s: ForeignInstrument) -> np.ndarray:
    """Flat indexes of stored-frame pixels in the canonical frame."""
    marks = np.zeros(s.size * s.size, dtype=np.int64)
    marks[stored_flat] = np.arange(1, len(stored_flat) + 1)
    img = marks.reshape(s.size, s.size)
    if s.transpose:
        img = img.T
    if s.flip_y:
        img = reverse_frequencies(img, 0)
    if s.flip_x:
        img = reverse_frequencies(img, 1)
    img = np.fft.fftshift(img)
    flat = img.ravel()
    where = np.flatnonzero(flat)
    return where[np.argsort(flat[where])]


def simulate_foreign(settings: ForeignInstrument | None = None, seed: int = 0, *,
                     chunk: int = 32) -> tuple[Scan, ForeignTruth]:
    """Simulate a foreign-instrument scan: the :class:`Scan` as a file would hold it, and its truth.

    Deterministic for a ``seed``.  The scan's frames are stored (corner origin, flipped, see the
    module docstring; ``settings.dtype``), its positions (N, 2) metres (y, x) with the same in
    pixels in ``attrs["positions_px"]`` (float32, as written), its probe the true modes.
    """
    s = ForeignInstrument() if settings is None else settings
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seeds = _seeds(int(seed))
    n, px = s.size, s.pixel_m
    centred_px = _positions_px(s, seeds["scan"])
    h, w = scan_extent_px(centred_px * px, px, n)
    offset = np.array([h // 2 - n // 2, w // 2 - n // 2], dtype=np.float64)
    corner_px = (centred_px + offset).astype(np.float32)  # Tike: the window's top-left corner, >= 0
    positions_m = corner_px.astype(np.float64) * px
    center_m = (float(offset[0] * px), float(offset[1] * px))

    obj = make_object(s.object_kind, (h, w), seeds["object"], max_phase=s.max_phase, delta_beta=s.delta_beta,
                      **dict(s.object_options))
    obj = (obj * np.float32(s.amplitude_scale)).astype(np.complex64)
    probe = kb_mirror_probe(n, modes=s.probe_modes, aperture=s.aperture, footprint=s.footprint,
                            astigmatism=s.astigmatism, coma_rad=s.coma_rad, figure_error_rad=s.figure_error_rad,
                            coherence=s.coherence, seed=seeds["probe"])
    background = _background(s)
    hot_rng = np.random.default_rng(seeds["hot"])
    hot_stored = np.sort(hot_rng.choice(n * n, size=s.hot_pixels, replace=False)).astype(np.int64)
    truth = ForeignTruth(obj, probe, positions_m, px, center_m, background, _hot_canonical(hot_stored, s),
                         hot_stored, s, int(seed))

    dtype = np.dtype(s.dtype)
    top = float(np.iinfo(dtype).max) if dtype.kind == "u" else np.inf
    frames = np.empty((s.frames, n, n), dtype=dtype)
    bg_corner = np.fft.ifftshift(background).astype(np.float32)
    noise_rng = np.random.default_rng(seeds["noise"])
    for start in range(0, s.frames, chunk):
        sl = slice(start, min(start + chunk, s.frames))
        patches = truth.patches(sl)
        inten = np.zeros(patches.shape, dtype=np.float32)
        for mode in probe:  # incoherent sum over the modes, zero frequency at the corner
            spectrum = np.fft.fft2(patches * mode[None], norm="ortho")
            inten += spectrum.real**2 + spectrum.imag**2
        mean = np.float32(s.photons) * inten + bg_corner[None]
        if s.noise:
            counts = noise_rng.poisson(mean).astype(np.float64)
        else:  # the means themselves: rounded for integer frames
            counts = mean.astype(np.float64) if dtype.kind == "f" else np.rint(mean.astype(np.float64))
        canonical_corner = np.minimum(counts, top)  # corner origin, not yet flipped
        frames[sl] = store_frames(np.fft.fftshift(canonical_corner, axes=(-2, -1)), flip_y=s.flip_y,
                                  flip_x=s.flip_x, transpose=s.transpose).astype(dtype)
    if s.hot_pixels:
        frames.reshape(s.frames, -1)[:, hot_stored] = min(s.hot_value, top)

    powers = mode_weights(probe)
    area_m2 = float(np.sum(np.abs(probe) ** 2)) ** 2 / float(np.sum(np.sum(np.abs(probe) ** 2, axis=0) ** 2)) * px**2
    truth.attrs = {
        "energy_keV": s.energy_ev / 1e3, "energy_ev": s.energy_ev, "distance_m": s.distance_m,
        "detector_pixel_m": s.detector_pixel_m, "size": n, "wavelength_m": s.wavelength_m, "object_pixel_m": px,
        "photons": s.photons, "fluence_per_m2": s.photons / area_m2, "probe_area_m2": area_m2, "seed": int(seed),
        "probe_mode_weights": powers, "hot_pixels": s.hot_pixels, "hot_value": s.hot_value,
        "origin": "corner", "flip_y": s.flip_y, "flip_x": s.flip_x, "transpose": s.transpose,
        "frame_shape": np.array([n, n]), "dtype": s.dtype,
        "conventions": "positions (y, x) metres of the probe window's top-left corner; the object's centre pixel "
                       "(H//2, W//2) at center_y_m/center_x_m; stored frames sum_k |FFT_ortho(P_k*O)|^2 with "
                       "zero frequency at (0, 0), flipped axes reversed k -> -k mod N, then transposed",
        "settings": repr(asdict(s)),
    }
    scan = Scan(frames=frames, positions_m=positions_m, object_pixel_m=px, energy_ev=s.energy_ev,
                distance_m=s.distance_m, detector_pixel_m=s.detector_pixel_m, probe=probe, origin="corner",
                flip_y=s.flip_y, flip_x=s.flip_x, transpose=s.transpose,
                source=f"simulate_foreign(seed={int(seed)})", layout="foreign-sim",
                attrs={"positions_px": corner_px, "hot_pixel_indexes": hot_stored, "photons": s.photons})
    return scan, truth


# --------------------------------------------------------------------------- writers
def write_tike_npz(path: str | Path, scan: Scan) -> Path:
    """Write ``scan`` as a Tike-style NPZ; returns the path.

    Keys: ``data`` (N, H, W) the frames as stored; ``probe`` (1, 1, modes, h, w) complex64;
    ``scan`` (1, N, 2) float32 positions in object **pixels**, ordered **(y, x)** (row, column),
    ``positions_m / object_pixel_m``; and 0-d float64 ``energy_ev``, ``distance_m``,
    ``detector_pixel_m``, ``object_pixel_m``.  Origin and orientation are not written (a Tike
    file does not say them): readers are told (``origin="corner"``, ``flip_x=True``, ...).
    """
    missing = [k for k in ("object_pixel_m", "energy_ev", "distance_m", "detector_pixel_m", "probe")
               if getattr(scan, k) is None]
    if missing:
        raise ValueError(f"{scan.source or 'the scan'}: a Tike NPZ needs {', '.join(missing)}")
    probe = np.asarray(scan.probe, dtype=np.complex64)
    probe = probe.reshape(1, 1, -1, *probe.shape[-2:])
    pos_px = (np.asarray(scan.positions_m, dtype=np.float64) / float(scan.object_pixel_m or 1.0)).astype(np.float32)
    out = Path(path)
    with open(out, "wb") as fh:  # np.savez would add ".npz" to another suffix
        np.savez(fh, data=np.asarray(scan.frames), probe=probe,
                 scan=pos_px[None], energy_ev=np.float64(scan.energy_ev), distance_m=np.float64(scan.distance_m),
                 detector_pixel_m=np.float64(scan.detector_pixel_m), object_pixel_m=np.float64(scan.object_pixel_m))
    return out


def write_foreign_cxi(path: str | Path, scan: Scan) -> Path:
    """Write ``scan`` as CXI with :func:`ptychostream.files.cxi.write_cxi`; returns the path."""
    # imported here, so that this module imports without the CXI one
    from ptychostream.files.cxi import write_cxi

    write_cxi(path, scan)
    return Path(path)


def write_foreign_truth(path: str | Path, truth: ForeignTruth, patch_indexes: Any = None) -> Path:
    """Write the truth (:func:`ptychostream.files.truth.write_truth`) so ``ptychostream score`` can use it.

    The product's probe is written with all its modes, (1, modes, N, N) (readers take the
    first); ``patches`` holds the true patches of ``patch_indexes`` (default every frame).
    """
    import h5py

    ii, _ = frame_indices(slice(None) if patch_indexes is None else patch_indexes, len(truth.positions_m))
    out = Path(path)
    write_truth(out, truth.product(), truth.patches, ii, truth.hot_pixel_indexes, truth.attrs)
    with h5py.File(out, "a") as h5:
        del h5[PROBE]
        ds = h5.create_dataset(PROBE, data=truth.probe[None].astype(np.complex64))
        ds.attrs.update({PIXEL_WIDTH: truth.pixel_m, PIXEL_HEIGHT: truth.pixel_m})
        h5.attrs["hot_pixel_indexes_stored"] = truth.hot_pixel_indexes_stored
    return out


def write_foreign(out_dir: str | Path, settings: ForeignInstrument | None = None, seed: int = 0
                  ) -> tuple[Scan, ForeignTruth, dict[str, Path]]:
    """Simulate and write :data:`FOREIGN_FILES` into ``out_dir`` (created); returns scan, truth and paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scan, truth = simulate_foreign(settings, seed)
    npz, cxi, tru = (out / name for name in FOREIGN_FILES)
    paths = {"npz": write_tike_npz(npz, scan), "truth": write_foreign_truth(tru, truth)}
    paths["cxi"] = write_foreign_cxi(cxi, scan)
    return scan, truth, paths


# --------------------------------------------------------------------------- command
def _cmd_sim_foreign(args: argparse.Namespace) -> int:
    try:
        settings = replace(ForeignInstrument(), frames=args.frames) if args.frames else ForeignInstrument()
        scan, truth, paths = write_foreign(args.out, settings, args.seed)
    except (OSError, ValueError, ImportError) as exc:
        print(f"ptychostream sim-foreign: error: {exc}", file=sys.stderr)
        return 2
    s = truth.settings
    h, w = scan.frames.shape[1:]
    print(f"{len(scan.frames)} frames {h}x{w} {scan.frames.dtype}, {s.energy_ev:g} eV, {s.distance_m:g} m, "
          f"detector pixel {s.detector_pixel_m:g} m, object pixel {s.pixel_m:.4g} m, "
          f"{s.probe_modes} probe modes (weights {', '.join(f'{x:.3f}' for x in mode_weights(truth.probe))}), "
          f"object {truth.object.shape[0]}x{truth.object.shape[1]} px")
    print(f"stored: zero frequency at the corner, flip_y={s.flip_y}, flip_x={s.flip_x}, transpose={s.transpose}; "
          f"positions in object pixels (y, x)")
    for key in ("npz", "cxi", "truth"):
        print(f"  {paths[key]}")
    return 0


def add_foreign_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``sim-foreign`` on an argparse subparsers object; returns the sub-parser."""
    defaults = ForeignInstrument()
    p = sub.add_parser(
        "sim-foreign", help="simulate a foreign-instrument scan (Tike NPZ, CXI and truth), a stand-in for real data",
        description="Simulate a scan of an instrument unlike the default (another energy, distance and "
                    "detector pixel, a multi-mode aberrated KB-mirror probe, corner-origin frames with a "
                    "flipped x axis, background, hot pixels, positions in object pixels) and write "
                    f"{', '.join(FOREIGN_FILES)} into DIR.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--frames", type=int, default=None, metavar="N",
                   help=f"number of frames (default {defaults.frames})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of everything random (default 0)")
    p.set_defaults(func=_cmd_sim_foreign)
    return p
