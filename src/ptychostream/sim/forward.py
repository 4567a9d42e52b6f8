"""Forward model of far-field ptychography: geometry, patch extraction and detector frames.

Conventions (shared by the whole ``ptychostream.sim`` package)
----------------------------------------------------------------
* **Positions** are in metres, an array of shape (N, 2) ordered **(y, x)**, relative to the
  object's centre.  x grows with the column index, y with the row index.  The object's centre is
  the pixel (row ``H // 2``, column ``W // 2``), so position (0, 0) on an even-sized object
  needs no sub-pixel shift.
* **Objects** are complex64 transmission arrays ``A·exp(iφ)`` with ``A ≤ 1``.  Their pixel is the
  real-space pixel of the geometry, ``Geometry.pixel_m = λ·z / (N·p)``.
* **Patches**: the patch for position ``r`` is the ``size × size`` window of the object whose
  pixel ``(size // 2, size // 2)`` lies exactly on ``r``.  The integer part of the offset is
  taken by indexing, the fractional part (|f| ≤ ½ pixel) by a Fourier shift (a phase ramp,
  periodic over the patch).  The probe's centre is its pixel ``(size // 2, size // 2)`` too.
* **Frames** are far-field intensities ``|F{P · O_patch}|²`` with an orthonormal 2-D FFT,
  fftshift-centred: zero frequency at pixel ``(H // 2, W // 2)``.  Use :func:`unshifted` to
  get the corner-centred layout that some measured data sets are stored in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DTYPES",
    "Geometry",
    "Simulator",
    "centred",
    "extract_patches",
    "far_field",
    "fourier_shift",
    "frame_indices",
    "unshifted",
]

#: pixel data types that :class:`Simulator` can produce
DTYPES: tuple[str, ...] = ("uint8", "int16", "uint16", "uint32", "float32")
#: value of a hot pixel in float32 frames (integer frames use the dtype's maximum)
HOT_FLOAT32 = 1e9
#: h·c in keV·nm: λ[nm] = 1.23984 / E[keV]
HC_KEV_NM = 1.23984


@dataclass(frozen=True)
class Geometry:
    """Far-field geometry: photon energy, detector distance and pixel, frame size (square)."""

    energy_keV: float = 10.0
    distance_m: float = 2.0
    detector_pixel_m: float = 75e-6
    size: int = 128

    def __post_init__(self) -> None:
        for name in ("energy_keV", "distance_m", "detector_pixel_m"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"Geometry.{name} must be a positive number, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if int(self.size) != self.size or int(self.size) < 2:
            raise ValueError(f"Geometry.size must be an integer >= 2, got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))

    @property
    def wavelength_m(self) -> float:
        """Wavelength λ in metres (λ[nm] = 1.23984 / E[keV])."""
        return HC_KEV_NM / self.energy_keV * 1e-9

    @property
    def pixel_m(self) -> float:
        """Real-space pixel λ·z / (N·p) in metres."""
        return self.wavelength_m * self.distance_m / (self.size * self.detector_pixel_m)


def unshifted(frames: np.ndarray) -> np.ndarray:
    """Centred frames → zero frequency at the corner (``np.fft.ifftshift`` over the last two axes).

    Some measured data sets store frames this way; :func:`centred` is the inverse.
    """
    return np.fft.ifftshift(np.asarray(frames), axes=(-2, -1))


def centred(frames: np.ndarray) -> np.ndarray:
    """Corner-stored frames → fftshift-centred frames (inverse of :func:`unshifted`)."""
    return np.fft.fftshift(np.asarray(frames), axes=(-2, -1))


def far_field(exit_waves: np.ndarray) -> np.ndarray:
    """Far-field intensity |F{ψ}|² (orthonormal FFT2 over the last two axes, fftshift), float32."""
    psi = np.asarray(exit_waves)
    if psi.ndim < 2:
        raise ValueError(f"far_field needs at least 2-D exit waves, got shape {psi.shape}")
    psi = psi.astype(np.complex128 if psi.dtype == np.complex128 else np.complex64, copy=False)
    spectrum = np.fft.fft2(psi, norm="ortho")
    intensity = (spectrum.real**2 + spectrum.imag**2).astype(np.float32, copy=False)
    return np.fft.fftshift(intensity, axes=(-2, -1))


# --------------------------------------------------------------------------- patches
@dataclass(frozen=True)
class _PatchPlan:
    """Integer top-left corners and fractional shifts (pixels, |f| ≤ ½) of each patch."""

    top: np.ndarray  # (N,) int64 rows
    left: np.ndarray  # (N,) int64 columns
    frac_y: np.ndarray  # (N,) float64
    frac_x: np.ndarray  # (N,) float64


def _as_positions(positions_m: Any) -> np.ndarray:
    pos = np.asarray(positions_m, dtype=np.float64)
    if pos.ndim == 1 and pos.shape == (2,):
        pos = pos[None]
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"positions must have shape (N, 2) ordered (y, x), got {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise ValueError("positions contain NaN or infinite values")
    return pos


def _plan(obj_shape: tuple[int, int], positions_m: np.ndarray, pixel_m: float, size: int) -> _PatchPlan:
    """Split each patch's top-left corner (object pixels) into an integer and a fractional part."""
    if not np.isfinite(pixel_m) or pixel_m <= 0:
        raise ValueError(f"pixel size must be positive, got {pixel_m!r}")
    if int(size) != size or size < 1:
        raise ValueError(f"patch size must be a positive integer, got {size!r}")
    h, w = obj_shape
    corner = positions_m / pixel_m + np.array([h // 2 - size // 2, w // 2 - size // 2], dtype=np.float64)
    whole = np.rint(corner)
    frac = corner - whole
    frac[np.abs(frac) < 1e-9] = 0.0  # exact integer positions stay exact
    top, left = whole[:, 0].astype(np.int64), whole[:, 1].astype(np.int64)
    bad = (top < 0) | (left < 0) | (top + size > h) | (left + size > w)
    if np.any(bad):
        k = np.flatnonzero(bad)
        need_y = int(2 * max(h // 2 - top.min(), top.max() + size - h // 2, 0))
        need_x = int(2 * max(w // 2 - left.min(), left.max() + size - w // 2, 0))
        raise ValueError(
            f"{k.size} of {len(bad)} patches ({size}x{size} px) fall outside the {h}x{w} object "
            f"(first: position #{k[0]} = {positions_m[k[0]].tolist()} m (y, x)); the scan needs an "
            f"object of at least {need_y}x{need_x} px at {pixel_m:.4g} m/px (see scans.scan_extent_px)")
    return _PatchPlan(top, left, frac[:, 0].copy(), frac[:, 1].copy())


def _shift_ramp(frac: np.ndarray, size: int) -> np.ndarray:
    """Per-patch 1-D Fourier ramps exp(2πi·u·f) (N, size) that move content by -f pixels.

    Applied to the spectrum, the patch value at k becomes the value at k + f.  The Nyquist
    term (even sizes) gets cos(π·f), which keeps real inputs real.
    """
    u = np.fft.fftfreq(size)
    ramp = np.exp(2j * np.pi * frac[:, None] * u[None, :])
    if size % 2 == 0:
        ramp[:, size // 2] = np.cos(np.pi * frac)
    return ramp.astype(np.complex64)


def _gather(obj: np.ndarray, plan: _PatchPlan, sel: np.ndarray, size: int) -> np.ndarray:
    """Integer-aligned patches (copies) for the plan entries ``sel``: (n, size, size) complex64."""
    windows = np.lib.stride_tricks.sliding_window_view(obj, (size, size))
    return np.ascontiguousarray(windows[plan.top[sel], plan.left[sel]], dtype=np.complex64)


def fourier_shift(patches: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """Move each patch's content by (-fy, -fx) pixels (a Fourier shift, periodic over the patch).

    ``patches`` (N, H, W) complex64; ``fy``/``fx`` (N,) fractional shifts in pixels.  Only the
    patches with a non-zero shift are transformed, in one batch of FFTs; ``patches`` may be
    modified in place and is returned when no patch needs a shift.
    """
    need = np.flatnonzero((fy != 0) | (fx != 0))
    if need.size == 0:
        return patches
    size_y, size_x = patches.shape[-2:]
    whole = need.size == len(patches)
    # Use the returned arrays: numpy's fft2(..., out=x) does not reliably leave its result in x,
    # and its unnormalised complex64 forward transform takes a slow double-precision path.
    spectrum = np.fft.fft2(patches if whole else patches[need], norm="ortho")
    spectrum *= _shift_ramp(fy[need], size_y)[:, :, None] * _shift_ramp(fx[need], size_x)[:, None, :]
    shifted = np.fft.ifft2(spectrum, norm="ortho").astype(np.complex64, copy=False)
    if whole:
        return shifted
    patches[need] = shifted
    return patches


def extract_patches(obj: np.ndarray, positions_m: Any, pixel_m: float, size: int) -> np.ndarray:
    """Object patches (N, size, size) complex64 centred on each (y, x) position, sub-pixel accurate.

    The integer part of each offset is taken by indexing, the fractional part by a Fourier
    shift of the patches.  Raises ``ValueError`` if any patch falls outside the object.
    """
    arr = np.asarray(obj)
    if arr.ndim != 2:
        raise ValueError(f"object must be 2-D, got shape {arr.shape}")
    arr = arr.astype(np.complex64, copy=False)
    pos = _as_positions(positions_m)
    plan = _plan(arr.shape, pos, float(pixel_m), int(size))
    sel = np.arange(len(pos))
    return fourier_shift(_gather(arr, plan, sel, int(size)), plan.frac_y, plan.frac_x)


# --------------------------------------------------------------------------- simulator
def frame_indices(idx: Any, n: int) -> tuple[np.ndarray, bool]:
    """``idx`` (int / slice / range / list / int or bool array) over ``n`` frames as int64 indices.

    Returns (indices, scalar): ``scalar`` is True for a single integer index.  Raises
    ``IndexError`` for out-of-range, non-integer or wrongly shaped boolean indices.
    """
    if isinstance(idx, slice):
        return np.arange(n)[idx], False
    if isinstance(idx, range):
        idx = np.asarray(idx, dtype=np.int64)
    arr = np.asarray(idx)
    scalar = arr.ndim == 0
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"boolean index must have shape ({n},), got {arr.shape}")
        return np.flatnonzero(arr), False
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), False
    if not np.issubdtype(arr.dtype, np.integer):
        raise IndexError(f"frame indices must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64).ravel()
    if np.any((arr < -n) | (arr >= n)):
        bad = arr[(arr < -n) | (arr >= n)][:5].tolist()
        raise IndexError(f"frame index out of range for a scan of {n} points: {bad}")
    return np.where(arr < 0, arr + n, arr), scalar


class Simulator:
    """Noisy detector frames of a ptychographic scan: probe × object patch → |FFT|² → Poisson.

    ``photons`` is the expected total count of every frame before the beamstop (``normalize=
    "frame"``); with ``normalize="incident"`` it is the incident count, so absorption lowers the
    total.  Frame ``i`` draws its noise from its own generator seeded by ``(seed, i)``, so any
    subset of frames is reproducible on its own.  Detector processing, in order: beamstop (a
    zeroed disc of radius ``beamstop_px`` full-resolution pixels at the centre), ``bin``×``bin``
    summing, centred ``crop`` (int or (h, w), in binned pixels), Poisson noise, hot pixels
    (``hot_pixels`` fixed positions of the output frame set to ``max_value`` or the dtype's
    maximum; :data:`HOT_FLOAT32` for float32), and a clipped cast to ``dtype``.
    Work is done in chunks of ``chunk`` frames on ``threads`` threads (numpy's FFT and random
    generators release the GIL).
    """

    def __init__(self, obj: np.ndarray, probe: np.ndarray, positions_m: Any, geometry: Geometry,
                 photons: float = 1e6, seed: int = 0, beamstop_px: float = 0, hot_pixels: int = 0,
                 bin: int = 1, crop: int | Sequence[int] | None = None, dtype: str = "uint16",
                 max_value: float | None = None, *, normalize: str = "frame", noise: bool = True,
                 threads: int | None = None, chunk: int = 16) -> None:
        if not isinstance(geometry, Geometry):
            raise ValueError(f"geometry must be a Geometry, got {type(geometry).__name__}")
        self.geometry = geometry
        obj = np.asarray(obj)
        if obj.ndim != 2:
            raise ValueError(f"object must be a 2-D complex array, got shape {obj.shape}")
        self.obj = np.ascontiguousarray(obj, dtype=np.complex64)
        probe = np.asarray(probe)
        n_px = geometry.size
        if probe.shape != (n_px, n_px):
            raise ValueError(f"probe shape {probe.shape} does not match the geometry's frame size "
                             f"{n_px}x{n_px}")
        self.probe = np.ascontiguousarray(probe, dtype=np.complex64)
        self.positions_m = _as_positions(positions_m)
        if len(self.positions_m) == 0:
            raise ValueError("the scan has no positions")
        photons = float(photons)
        if not np.isfinite(photons) or photons <= 0:
            raise ValueError(f"photons must be a positive number, got {photons!r}")
        self.photons = photons
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        if not np.isfinite(beamstop_px) or beamstop_px < 0:
            raise ValueError(f"beamstop_px must be >= 0, got {beamstop_px!r}")
        self.beamstop_px = float(beamstop_px)
        if int(bin) != bin or bin < 1 or n_px % int(bin):
            raise ValueError(f"bin must be a positive integer dividing the frame size {n_px}, got {bin!r}")
        self.bin = int(bin)
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.dtype = np.dtype(dtype)
        if normalize not in ("frame", "incident"):
            raise ValueError(f"normalize must be 'frame' or 'incident', got {normalize!r}")
        self.normalize = normalize
        self.noise = bool(noise)
        if max_value is not None and (not np.isfinite(max_value) or max_value <= 0):
            raise ValueError(f"max_value must be a positive number or None, got {max_value!r}")
        limit = float(np.finfo(np.float32).max) if self.dtype.kind == "f" else float(np.iinfo(self.dtype).max)
        self.max_value = min(float(max_value), limit) if max_value is not None else limit
        self.hot_value = (self.max_value if max_value is not None or self.dtype.kind != "f"
                          else HOT_FLOAT32)

        binned = n_px // self.bin
        if crop is None:
            ch, cw = binned, binned
        else:
            c = np.atleast_1d(np.asarray(crop, dtype=np.float64))
            c = np.repeat(c, 2) if c.size == 1 else c
            if c.shape != (2,) or np.any(c != np.round(c)) or not (1 <= c.min() and c.max() <= binned):
                raise ValueError(f"crop must be 1..{binned} (the binned frame size), got {crop!r}")
            ch, cw = int(c[0]), int(c[1])
        self.crop = None if crop is None else (ch, cw)
        self._rows = slice((binned - ch) // 2, (binned - ch) // 2 + ch)
        self._cols = slice((binned - cw) // 2, (binned - cw) // 2 + cw)
        self._shape = (ch, cw)

        npix_out = self._shape[0] * self._shape[1]
        if int(hot_pixels) != hot_pixels or not 0 <= hot_pixels <= npix_out:
            raise ValueError(f"hot_pixels must be an integer in 0..{npix_out}, got {hot_pixels!r}")
        self.hot_pixels = int(hot_pixels)
        hot_rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1]))
        self.hot_index = np.sort(hot_rng.choice(npix_out, size=self.hot_pixels, replace=False))

        if self.beamstop_px > 0:
            yy, xx = np.ogrid[:n_px, :n_px]
            self._beamstop = (yy - n_px // 2) ** 2 + (xx - n_px // 2) ** 2 <= self.beamstop_px**2
        else:
            self._beamstop = None

        self.threads = max(1, int(threads if threads is not None else min(os.cpu_count() or 1, 8)))
        self.chunk = max(1, int(chunk))
        self._plan = _plan(self.obj.shape, self.positions_m, geometry.pixel_m, n_px)
        # fftshift folded into the probe: FFT{(-1)^(y+x) ψ} = fftshift(FFT{ψ}) for even sizes
        if n_px % 2 == 0:
            sign = np.where((np.add.outer(np.arange(n_px), np.arange(n_px)) % 2) == 0, 1, -1)
            self._probe_fft = (self.probe * sign).astype(np.complex64)
        else:
            self._probe_fft = self.probe
        self._probe_power = float(np.sum(np.abs(self.probe.astype(np.complex128)) ** 2))
        if self._probe_power <= 0:
            raise ValueError("probe is all zeros")

    # -- properties -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of scan points (frames)."""
        return len(self.positions_m)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(height, width) of the output frames after binning and cropping."""
        return self._shape

    @property
    def object_pixel_m(self) -> float:
        """Object (real-space) pixel size in metres."""
        return self.geometry.pixel_m

    @property
    def output_pixel_m(self) -> tuple[float, float]:
        """Real-space pixel (y, x) of a reconstruction from the output frames (λz / (n·bin·p))."""
        g = self.geometry
        return tuple(g.wavelength_m * g.distance_m / (m * self.bin * g.detector_pixel_m)
                     for m in self._shape)  # type: ignore[return-value]

    # -- physics ------------------------------------------------------------------------------
    def patches(self, idx: Any) -> np.ndarray:
        """True complex object patches (ground truth) for the frames ``idx``."""
        ii, scalar = frame_indices(idx, self.n)
        p = fourier_shift(_gather(self.obj, self._plan, ii, self.geometry.size),
                           self._plan.frac_y[ii], self._plan.frac_x[ii])
        return p[0] if scalar else p

    def exit_waves(self, idx: Any) -> np.ndarray:
        """Exit waves probe × patch for the frames ``idx``."""
        return self.probe * self.patches(idx)

    def _clean_chunk(self, ii: np.ndarray) -> np.ndarray:
        """Scaled noise-free intensities (n, N, N) float32 for a chunk of indices."""
        psi = fourier_shift(_gather(self.obj, self._plan, ii, self.geometry.size),
                             self._plan.frac_y[ii], self._plan.frac_x[ii])
        psi *= self._probe_fft
        spectrum = np.fft.fft2(psi, norm="ortho")
        inten = np.square(spectrum.real)
        inten += np.square(spectrum.imag)
        if self.geometry.size % 2:
            inten = np.fft.fftshift(inten, axes=(-2, -1))
        if self.normalize == "frame":
            total = inten.sum(axis=(1, 2), dtype=np.float64)
            scale = np.divide(self.photons, total, out=np.zeros_like(total), where=total > 0)
        else:
            scale = np.full(len(ii), self.photons / self._probe_power)
        inten *= scale.astype(np.float32)[:, None, None]
        return inten

    def _map_chunks(self, ii: np.ndarray, work: Callable[[np.ndarray, slice], None]) -> None:
        bounds = [slice(s, min(s + self.chunk, len(ii))) for s in range(0, len(ii), self.chunk)]
        if self.threads == 1 or len(bounds) < 2:
            for sl in bounds:
                work(ii[sl], sl)
            return
        with ThreadPoolExecutor(max_workers=min(self.threads, len(bounds))) as pool:
            for f in [pool.submit(work, ii[sl], sl) for sl in bounds]:
                f.result()

    def clean(self, idx: Any) -> np.ndarray:
        """Noise-free intensities (float32, full resolution, before beamstop and hot pixels)."""
        ii, scalar = frame_indices(idx, self.n)
        n_px = self.geometry.size
        out = np.empty((len(ii), n_px, n_px), dtype=np.float32)

        def work(sub: np.ndarray, sl: slice) -> None:
            out[sl] = self._clean_chunk(sub)

        self._map_chunks(ii, work)
        return out[0] if scalar else out

    def expected(self, idx: Any) -> np.ndarray:
        """Noise-free frames after beamstop, binning and cropping (float32): the Poisson means."""
        ii, scalar = frame_indices(idx, self.n)
        out = np.empty((len(ii), *self._shape), dtype=np.float32)

        def work(sub: np.ndarray, sl: slice) -> None:
            out[sl] = self._detect(self._clean_chunk(sub))

        self._map_chunks(ii, work)
        return out[0] if scalar else out

    def _detect(self, inten: np.ndarray) -> np.ndarray:
        """Beamstop, binning and crop applied to scaled intensities."""
        if self._beamstop is not None:
            inten[:, self._beamstop] = 0.0
        if self.bin > 1:
            n, h, w = inten.shape
            b = self.bin
            inten = inten.reshape(n, h // b, b, w // b, b).sum(axis=(2, 4))
        if self.crop is not None:
            inten = inten[:, self._rows, self._cols]
        return inten

    def frames(self, idx: Any) -> np.ndarray:
        """Detector frames (``dtype``) with Poisson noise, beamstop, binning, crop and hot pixels."""
        ii, scalar = frame_indices(idx, self.n)
        out = np.empty((len(ii), *self._shape), dtype=self.dtype)
        hot = self.hot_index
        flat_out = out.reshape(len(ii), -1)

        def work(sub: np.ndarray, sl: slice) -> None:
            lam = self._detect(self._clean_chunk(sub))
            for j, i in enumerate(sub):
                k = sl.start + j
                if self.noise:
                    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0, int(i)])))
                    counts = rng.poisson(lam[j])
                elif self.dtype.kind == "f":
                    counts = lam[j].copy()
                else:
                    counts = np.rint(lam[j].astype(np.float64))
                np.minimum(counts, self.max_value, out=counts, casting="unsafe")
                out[k] = counts
            if hot.size:
                flat_out[sl, hot] = self.hot_value

        self._map_chunks(ii, work)
        return out[0] if scalar else out
