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

:func:`kb_mirror_probe` makes a partially coherent probe of several modes (modes, size, size)
focused by a Kirkpatrick–Baez pair of mirrors; its modes carry their weights (Σ over all modes of
Σ|P_k|² = 1) and the simulator sums their intensities incoherently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.arrays import first_layer, first_value
from ptychostream.files.hdf5 import dataset as h5_dataset
from ptychostream.files.paths import split_dataset_path
from ptychostream.files.product import PIXEL_WIDTH, PROBE

__all__ = ["PROBE_KINDS", "kb_mirror_probe", "load_probe", "make_probe", "mode_weights", "zoneplate_defocus_m"]

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


def _soft_step(x: np.ndarray, soft: float) -> np.ndarray:
    return np.clip(0.5 + x / soft, 0.0, 1.0)


def _detilt(phase: np.ndarray, weight: np.ndarray, nu: np.ndarray) -> np.ndarray:
    """``phase`` less its weighted least-squares line in ``nu`` (a tilt only moves the probe)."""
    a = np.stack([np.ones_like(nu), nu], axis=1) * np.sqrt(weight)[:, None]
    coef, *_ = np.linalg.lstsq(a, phase * np.sqrt(weight), rcond=None)
    return phase - coef[0] - coef[1] * nu


def _mirror_phase(nu: np.ndarray, half: float, alpha: float, coma: float, figure: float,
                  correlation: float, rng: np.random.Generator, weight: np.ndarray) -> np.ndarray:
    """1-D pupil phase of one mirror: defocus −π·α·ν², coma-like ``coma``·(ν/a)³, figure error."""
    from scipy.ndimage import gaussian_filter1d

    u = nu / half
    phase = -np.pi * alpha * nu**2 + coma * u**3
    if figure > 0:
        order = np.argsort(nu)  # filter along increasing frequency, not fftfreq order
        err = np.empty_like(nu)
        err[order] = gaussian_filter1d(rng.standard_normal(nu.size), max(correlation * half * nu.size, 0.5))
        err = _detilt(err, weight, nu)  # so that the rms is that of the error that shapes the probe
        rms = np.sqrt(np.sum(weight * err**2) / max(np.sum(weight), 1e-12))
        phase = phase + (figure / rms) * err if rms > 0 else phase
    return _detilt(phase, weight, nu)  # a tilt only moves the probe, a piston does nothing


def kb_mirror_probe(size: int, *, modes: int = 4, aperture: tuple[float, float] = (0.16, 0.12),
                    footprint: float = 0.35, astigmatism: float = 0.3,
                    coma_rad: tuple[float, float] = (1.2, -0.8), figure_error_rad: float = 0.5,
                    figure_correlation: float = 0.15, coherence: tuple[float, float] = (0.15, 0.45),
                    envelope: float = 0.8, edge_px: float = 1.0, defocus_m: float | None = None,
                    pixel_m: float | None = None, wavelength_m: float | None = None,
                    seed: int = 0) -> np.ndarray:
    """A partially coherent probe focused by two crossed 1-D (Kirkpatrick–Baez) mirrors.

    Returns (modes, size, size) complex64 on the object's pixel grid, centred on pixel
    (size // 2, size // 2): orthogonal modes whose powers Σ|P_k|² are the mode weights, in
    decreasing order, summing to 1.  Built in the pupil (far field, frequencies ν in cycles per
    pixel), everything separable in y and x as for two mirrors:

    * a rectangular aperture of half-widths ``aperture`` (y, x) with soft ``edge_px`` edges;
    * per mirror, a defocus −π·α·ν² (α = λ·Δz / pixel², pixel units), the two differing by
      ``astigmatism`` (α_y = α·(1 + a/2), α_x = α·(1 − a/2)); α from ``defocus_m`` (with
      ``pixel_m`` and ``wavelength_m``) or so that the geometric footprint is ``footprint`` of the
      window; a coma-like cubic term ``coma_rad`` (y, x) (radians at the aperture edge); a figure
      (slope) error: smooth random phase of rms ``figure_error_rad`` over the aperture, correlated
      over ``figure_correlation`` of it (seeded by ``seed``); tilt and piston removed;
    * partial coherence as a Gaussian Schell-model beam: the coherent modes are Hermite–Gauss
      functions H_m(ν_y/σ_y)·H_n(ν_x/σ_x)·exp(−ν²/2σ²) (σ = ``envelope`` × the aperture) of weights
      q_y^m·q_x^n (``coherence`` = (q_y, q_x), each in [0, 1)), cut by the aperture,
      orthonormalised in weight order (QR) and given the common phase;

    then Fourier transformed (orthonormal, unitary, so orthogonality and powers are kept) to the
    sample plane.
    """
    if int(size) != size or size < 4:
        raise ValueError(f"probe size must be an integer >= 4, got {size!r}")
    size = int(size)
    if int(modes) != modes or not 1 <= modes <= size:
        raise ValueError(f"modes must be an integer in 1..{size}, got {modes!r}")
    half = np.asarray(aperture, dtype=np.float64)
    if half.shape != (2,) or not np.all((half > 0) & (half <= 0.5)):
        raise ValueError(f"aperture must be two half-widths (y, x) in (0, 0.5] cycles/pixel, got {aperture!r}")
    q = np.asarray(coherence, dtype=np.float64)
    if q.shape != (2,) or not np.all((q >= 0) & (q < 1)):
        raise ValueError(f"coherence must be two mode ratios (q_y, q_x) in [0, 1), got {coherence!r}")
    if not -2 < astigmatism < 2:
        raise ValueError(f"astigmatism must be in (-2, 2), got {astigmatism!r}")
    if not envelope > 0:
        raise ValueError(f"envelope must be positive, got {envelope!r}")
    if defocus_m is not None:
        if pixel_m is None or wavelength_m is None:
            raise ValueError("defocus_m needs pixel_m and wavelength_m")
        alpha = float(wavelength_m) * float(defocus_m) / float(pixel_m) ** 2
    else:
        if not 0 < footprint <= 1:
            raise ValueError(f"footprint must be a fraction in (0, 1] of the window, got {footprint!r}")
        alpha = footprint * size / (2.0 * float(np.mean(half)))
    alphas = (alpha * (1 + astigmatism / 2), alpha * (1 - astigmatism / 2))
    rng = np.random.default_rng(seed)
    nu = np.fft.fftfreq(size)
    soft = edge_px / size
    apert = [_soft_step(h - np.abs(nu), soft) for h in half]
    phase = [_mirror_phase(nu, float(h), a, float(c), float(figure_error_rad), float(figure_correlation), rng, w)
             for h, a, c, w in zip(half, alphas, coma_rad, apert)]
    # Gaussian Schell-model coherent modes, in weight order (ties: lower total order first)
    orders = sorted(((m, n) for m in range(modes) for n in range(modes)),
                    key=lambda mn: (-(q[0] ** mn[0]) * (q[1] ** mn[1]), mn[0] + mn[1], mn[0]))[:modes]
    weights = np.array([q[0] ** m * q[1] ** n for m, n in orders])
    if np.any(weights <= 0):
        raise ValueError(f"coherence {coherence!r} leaves modes of zero weight; use fewer modes or q > 0")
    weights /= weights.sum()
    hermite = np.polynomial.hermite.hermval
    sigma = envelope * half
    axis_modes = [[hermite(nu / s, np.eye(modes)[k]) * np.exp(-0.5 * (nu / s) ** 2) * ap for k in range(modes)]
                  for s, ap in zip(sigma, apert)]
    pupil = np.stack([np.outer(axis_modes[0][m], axis_modes[1][n]).ravel() for m, n in orders], axis=1)
    basis, r = np.linalg.qr(pupil)
    if np.any(np.abs(np.diag(r)) < 1e-9 * np.abs(r).max()):
        raise ValueError(f"{modes} modes are not independent within the aperture; use fewer modes")
    common = np.exp(1j * np.add.outer(phase[0], phase[1]))
    out = np.empty((modes, size, size), dtype=np.complex64)
    for k in range(modes):
        field = basis[:, k].reshape(size, size) * common
        out[k] = np.sqrt(weights[k]) * np.fft.fftshift(np.fft.ifft2(field, norm="ortho"))
    return out


def mode_weights(probe: np.ndarray) -> np.ndarray:
    """Power Σ|P_k|² of each mode of a (modes, h, w) probe (or of one (h, w) probe)."""
    p = np.asarray(probe)
    p = p[None] if p.ndim == 2 else p
    return np.sum(np.abs(p.astype(np.complex128)) ** 2, axis=(-2, -1))


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


def load_probe(path: str | Path, dataset: str | None = None, normalize: bool = True, modes: bool = False
               ) -> tuple[np.ndarray, float | None]:
    """Read a probe (complex64, H×W) and its pixel width (m, or None) from a file.

    HDF5 (a Ptychodus product): dataset ``probe`` (or ``dataset``; ``path::dataset`` works too),
    complex, opr×modes×H×W or modes×H×W or H×W — the first mode is used — with the
    ``pixel_width_m`` attribute (looked up on the dataset, then the file).  ``.npy`` files hold
    the array alone.  With ``normalize`` the result has Σ|P|² = 1.  ``modes``: every mode of the
    first OPR, as (modes, H, W) (one mode: (1, H, W)), normalised together (Σ_k Σ|P_k|² = 1), so
    each mode keeps its share of the power.
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
    if modes:
        while arr.ndim > 3:  # (opr, modes, H, W): the first OPR
            arr = arr[0]
        probe = arr.reshape(-1, *arr.shape[-2:]).astype(np.complex64)
    else:
        probe = first_layer(arr).astype(np.complex64)
    if not np.all(np.isfinite(probe)):
        raise ValueError(f"{file}: probe contains NaN or infinite values")
    return (_normalise(probe) if normalize else probe), pixel
