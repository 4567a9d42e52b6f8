"""Illumination (probe) functions: synthetic zone-plate and Gaussian probes, and probe files.

Conventions: a probe is a complex64 (size, size) array on the object's pixel grid
(``Geometry.pixel_m``), centred on pixel (size // 2, size // 2), normalised so that
Σ|P|² = 1 (the simulator scales the intensity to the requested photon count).

* ``"zoneplate"``: a focused beam, defocused.  Built in the far field as an annular aperture
  (outer radius ``outer`` in cycles/pixel, central stop ``stop``·outer, soft 1-px edges) with a
  quadratic defocus phase exp(-iπ·λ·Δz·|ν|²), inverse-FFT'd to the sample plane.  In pixel units
  the phase is π·α·ν_px² with α = λΔz / pixel², and the geometric footprint diameter is
  2·α·outer pixels; by default Δz is chosen so that the footprint is ``footprint`` (0.4) of
  the window.  ``defocus_m`` overrides it (needs ``pixel_m`` and a wavelength from ``geometry``
  or ``wavelength_m``).
* ``"gaussian"``: a Gaussian amplitude of full width at half maximum ``fwhm_px`` (default a
  quarter of the window) with an optional quadratic phase ``curvature`` (radians at the FWHM radius).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.arrays import first_layer, first_value
from ptychostream.files.hdf5 import dataset as h5_dataset
from ptychostream.files.paths import split_dataset_path
from ptychostream.files.product import PIXEL_WIDTH, PROBE

__all__ = ["PROBE_KINDS", "load_probe", "make_probe", "zoneplate_defocus_m"]

PROBE_KINDS: tuple[str, ...] = ("zoneplate", "gaussian")


def _normalise(p: np.ndarray) -> np.ndarray:
    power = float(np.sum(np.abs(p.astype(np.complex128)) ** 2))
    if not power > 0:
        raise ValueError("probe is all zeros")
    return (p / np.sqrt(power)).astype(np.complex64)


def _wavelength(geometry: Any, wavelength_m: float | None) -> float | None:
    if wavelength_m is not None:
        return float(wavelength_m)
    return None if geometry is None else float(geometry.wavelength_m)


def zoneplate_defocus_m(size: int, pixel_m: float, wavelength_m: float, footprint: float = 0.4,
                        outer: float = 0.25) -> float:
    """Defocus Δz (m) that gives a zone-plate probe a footprint of ``footprint``·size pixels."""
    alpha = footprint * size / (2.0 * outer)
    return alpha * pixel_m**2 / wavelength_m


def _zoneplate(size: int, pixel_m: float, lam: float | None, *, footprint: float = 0.4,
               outer: float = 0.25, stop: float = 0.3, defocus_m: float | None = None,
               edge_px: float = 1.0) -> np.ndarray:
    if not 0 < outer <= 0.5:
        raise ValueError(f"zone-plate outer radius must be in (0, 0.5] cycles/pixel, got {outer}")
    if not 0 <= stop < 1:
        raise ValueError(f"central stop must be a fraction in [0, 1) of the aperture, got {stop}")
    if defocus_m is not None:
        if lam is None:
            raise ValueError("defocus_m needs a wavelength: pass geometry= or wavelength_m=")
        alpha = lam * float(defocus_m) / pixel_m**2
    else:
        if not 0 < footprint <= 1:
            raise ValueError(f"footprint must be a fraction in (0, 1] of the window, got {footprint}")
        alpha = footprint * size / (2.0 * outer)
    nu = np.fft.fftfreq(size)  # cycles per pixel
    rho = np.sqrt(nu[:, None] ** 2 + nu[None, :] ** 2)
    soft = edge_px / size  # 1 detector pixel, in cycles/pixel

    def step(x: np.ndarray) -> np.ndarray:
        return np.clip(0.5 + x / soft, 0.0, 1.0)

    aperture = step(outer - rho) * step(rho - stop * outer)
    field = aperture * np.exp(-1j * np.pi * alpha * rho**2)
    probe = np.fft.fftshift(np.fft.ifft2(field))  # centre on pixel (size//2, size//2)
    return probe


def _gaussian(size: int, *, fwhm_px: float | None = None, curvature: float = 0.0) -> np.ndarray:
    fwhm = size / 4.0 if fwhm_px is None else float(fwhm_px)
    if not fwhm > 0:
        raise ValueError(f"fwhm_px must be positive, got {fwhm_px}")
    c = np.arange(size) - size // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    amp = np.exp(-r2 / (2.0 * sigma**2))
    return amp * np.exp(1j * curvature * r2 / (fwhm / 2.0) ** 2)


def make_probe(kind: str, size: int, pixel_m: float, geometry: Any = None, **kw: Any) -> np.ndarray:
    """Synthetic probe (size, size) complex64 with Σ|P|² = 1.

    Keywords: zoneplate — ``footprint``, ``outer``, ``stop``, ``defocus_m``, ``wavelength_m``,
    ``edge_px``; gaussian — ``fwhm_px``, ``curvature``.
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; choose one of {', '.join(PROBE_KINDS)}")
    if int(size) != size or size < 2:
        raise ValueError(f"probe size must be an integer >= 2, got {size!r}")
    if not np.isfinite(pixel_m) or pixel_m <= 0:
        raise ValueError(f"pixel_m must be positive, got {pixel_m!r}")
    size = int(size)
    if kind == "zoneplate":
        lam = _wavelength(geometry, kw.pop("wavelength_m", None))
        return _normalise(_zoneplate(size, float(pixel_m), lam, **kw))
    return _normalise(_gaussian(size, **kw))


def load_probe(path: str | Path, dataset: str | None = None, normalize: bool = True
               ) -> tuple[np.ndarray, float | None]:
    """Read a probe (complex64, H×W) and its pixel width (m, or None) from a file.

    HDF5 (a Ptychodus product): dataset ``probe`` (or ``dataset``; ``path::dataset`` works too),
    complex, opr×modes×H×W or modes×H×W or H×W — the first mode is used — with the
    ``pixel_width_m`` attribute (looked up on the dataset, then the file).  ``.npy`` files hold
    the array alone.  With ``normalize`` the result has Σ|P|² = 1.
    """
    file, dataset = split_dataset_path(path, dataset, "probe")
    pixel: float | None = None
    if file.suffix.lower() == ".npy":
        arr = np.load(file)
    else:
        import h5py

        if not h5py.is_hdf5(file):
            raise ValueError(f"{file}: not an HDF5 or .npy probe file")
        with h5py.File(file, "r") as h5:
            ds = h5_dataset(h5, dataset or PROBE, file)
            arr = ds[()]
            pixel = next((first_value(a[PIXEL_WIDTH]) for a in (ds.attrs, h5.attrs) if PIXEL_WIDTH in a), None)
    arr = np.asarray(arr)
    if arr.ndim < 2:
        raise ValueError(f"{file}: probe must be at least 2-D, got shape {arr.shape}")
    probe = first_layer(arr).astype(np.complex64)
    if not np.all(np.isfinite(probe)):
        raise ValueError(f"{file}: probe contains NaN or infinite values")
    return (_normalise(probe) if normalize else probe), pixel
