"""Scoring a phase image against an iterative reference (a Ptychodus product), for measured data.

A measured scan has no truth; the iterative reconstruction of it is the reference.  The two are
known only up to a shift, a global phase offset and a linear phase ramp, may wrap differently
across ±π, and may sit on different pixels.  :func:`compare_to_reference` takes two phase
images already on one grid and, in order:

1. keeps the ``mask`` pixels finite in both, crops to their bounding box and, when the reference
   itself wraps (it lies in [−π, π], as ``np.angle`` of a product's object does, and steps by more
   than π between neighbours inside the mask), unwraps it
   (``skimage.restoration.unwrap_phase``, masked);
2. removes a first ramp (:func:`phase_ramp`): the gradient of ``exp(i(a − b))`` is averaged over
   neighbour pairs inside the mask, ``g = angle(Σ d[y+1, x]·conj(d[y, x]))`` (and along x), which
   holds for any number of 2π wraps across the image as long as the ramp is below π per pixel;
3. registers the image to the reference: ``skimage.registration.phase_cross_correlation``
   (sub-pixel to 1/``upsample`` = 1/50 px, unnormalised) on the mean-removed, mask-tapered complex fields
   ``exp(i·phase)``, which do not see 2π wraps, refined over up to 3 rounds; the image is shifted
   as ``exp(i·phase)`` (cubic spline) and the mask with it.  A shift above ``max_shift_px``
   (default a quarter of the smaller side) is refused: the images are then compared unshifted
   (``registered`` False);
4. estimates the ramp again on the registered image, refines it by least squares (a plane
   ``c + g_y·y + g_x·x`` fitted to the wrapped residual on the mask; y, x in pixels from the box
   centre) and forms the aligned image ``b + wrap(a − plane − b)``: the reference plus the
   difference on the circle, so a 2π jump costs nothing (a difference truly above π also wraps);
5. SSIM (``skimage.metrics.structural_similarity``, 7×7 window, the map averaged over the mask
   eroded by the window) with a robust ``data_range``: the 1st to 99th percentile of the
   reference on the mask;
6. the band-pass correlation: the Pearson correlation, over the mask, of the two images after
   :func:`bandpass` (a difference of Gaussians, see there) keeping features of ``band`` = 2–16 px;
7. the Fourier ring correlation of the aligned image and the reference
   (:func:`ptychostream.quality.metrics.frc`, both tapered by the same smoothed mask), its AUC
   and the resolution: the period 1/f in pixels at its first crossing of the ½-bit (or 1/7)
   threshold; 2 px (Nyquist) when it never crosses.

:func:`score_against_product` puts a mosaic (a file, a :class:`~ptychostream.files.mosaic.MosaicFile`,
a live ``MosaicImage`` or an array) and a product on a common grid, keeps the mosaic's valid
pixels and the product's scanned region (and a held-out ``region``), and calls it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.mosaic import read_mosaic
from ptychostream.files.product import Product, read_product
from ptychostream.quality.grid import (
    centre_origin,
    illumination_mask,
    overlap_grid,
    resample,
)
from ptychostream.quality.metrics import (
    SSIM_WIN,
    ScoreError,
    frc,
    frc_summary,
    masked_box,
    taper_mask,
)

__all__ = ["BAND_PX", "FRC_THRESHOLDS", "ReferenceScores", "bandpass", "bandpass_correlation",
           "compare_to_reference", "dog_sigmas", "phase_ramp", "register_phase", "scanned_region",
           "score_against_product"]

#: the default band of the band-pass correlation: features (periods) of 2 to 16 pixels
BAND_PX = (2.0, 16.0)
#: FRC thresholds for the resolution: van Heel & Schatz' ½-bit, or the constant 1/7
FRC_THRESHOLDS = ("half-bit", "1/7")
#: σ of a Gaussian whose transfer function exp(−2π²σ²f²) is ½ at the period P = 1/f: σ = K·P
_HALF_AT_PERIOD = math.sqrt(2.0 * math.log(2.0)) / (2.0 * math.pi)


@dataclass
class ReferenceScores:
    """The figures of :func:`compare_to_reference` (see the module docstring)."""

    ssim: float
    bandpass_corr: float  # Pearson r of the band-passed images
    frc_auc: float  # mean FRC from the first ring to Nyquist (1 = perfect)
    frc_resolution_px: float  # period at the threshold crossing; 2.0 = Nyquist, never crosses
    shift_px: tuple[float, float]  # (dy, dx) applied to the image to register it
    ramp: tuple[float, float, float]  # (offset rad, rad/px along y, rad/px along x) removed from the image
    n_pixels: int  # pixels compared
    data_range: float = 0.0  # SSIM's: 99th − 1st percentile of the reference on the mask
    pearson: float = 0.0  # Pearson r of the aligned images, not band-passed
    rms_rad: float = 0.0  # RMS of the wrapped difference after alignment
    frc_threshold: str = "half-bit"
    band_px: tuple[float, float] = BAND_PX
    registered: bool = True  # False: the registration was refused (shift too large) or not asked for
    reference_unwrapped: bool = False  # the reference wrapped and was unwrapped
    pixel_m: float | None = None  # the common grid's pixel (score_against_product)
    mask: str = ""  # which pixels were compared
    source: str = ""
    frc: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # freq, curve, thr

    def as_dict(self, curves: bool = True) -> dict[str, Any]:
        """Plain Python values for JSON; ``curves`` adds the FRC as lists (freq, curve, threshold)."""
        out = {k: v for k, v in asdict(self).items() if k != "frc"}
        out["shift_px"] = [float(v) for v in self.shift_px]
        out["ramp"] = [float(v) for v in self.ramp]
        out["band_px"] = [float(v) for v in self.band_px]
        if curves and self.frc is not None:
            out["frc"] = {k: [float(x) for x in arr] for k, arr in zip(("freq", "curve", "threshold"), self.frc)}
        return out


# --------------------------------------------------------------------------- pieces
def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2.0 * np.pi) - np.pi


def _coords(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return yy - (h - 1) / 2.0, xx - (w - 1) / 2.0


def phase_ramp(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(offset, g_y, g_x) of ``image − reference`` on ``mask``, wrap-safe; rad and rad/px from the centre.

    The gradient is the angle of the summed neighbour products of ``d = exp(i(image − reference))``
    over pairs with both pixels in the mask (any number of 2π wraps; a ramp below π per pixel);
    the offset the angle of the mean of ``d·exp(−i(g_y·y + g_x·x))``.
    """
    m = np.asarray(mask, dtype=bool)
    d = np.where(m, np.exp(1j * (np.asarray(image, np.float64) - np.asarray(reference, np.float64))), 0)
    sy = np.sum(d[1:, :] * np.conj(d[:-1, :]))
    sx = np.sum(d[:, 1:] * np.conj(d[:, :-1]))
    gy = float(np.angle(sy)) if abs(sy) > 0 else 0.0
    gx = float(np.angle(sx)) if abs(sx) > 0 else 0.0
    yy, xx = _coords(m.shape)
    s0 = np.sum(d * np.exp(-1j * (gy * yy + gx * xx)))
    return (float(np.angle(s0)) if abs(s0) > 0 else 0.0), gy, gx


def _plane(shape: tuple[int, ...], ramp: tuple[float, float, float]) -> np.ndarray:
    yy, xx = _coords(shape)
    return ramp[0] + ramp[1] * yy + ramp[2] * xx


def _refine_ramp(image: np.ndarray, reference: np.ndarray, mask: np.ndarray,
                 ramp: tuple[float, float, float]) -> tuple[float, float, float]:
    """``ramp`` plus the least-squares plane of the wrapped residual on ``mask``."""
    yy, xx = _coords(mask.shape)
    resid = _wrap(image - _plane(mask.shape, ramp) - reference)
    basis = np.stack([np.ones(int(mask.sum())), yy[mask], xx[mask]], axis=1)
    coef, *_ = np.linalg.lstsq(basis, resid[mask], rcond=None)
    return ramp[0] + float(coef[0]), ramp[1] + float(coef[1]), ramp[2] + float(coef[2])


def register_phase(image: np.ndarray, reference: np.ndarray, mask: np.ndarray, *, upsample: int = 50,
                   rounds: int = 3, max_shift_px: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray, tuple[float, float], bool]:
    """Shift the phase ``image`` onto ``reference`` (step 3 of the module docstring).

    Returns (shifted phase, mask of the pixels valid in both after the shift, (dy, dx) applied,
    registered).  A total shift above ``max_shift_px`` (default a quarter of the smaller side) is
    refused: the inputs come back unshifted with ``registered`` False.
    """
    from scipy.ndimage import shift as nd_shift
    from skimage.registration import phase_cross_correlation

    m = np.asarray(mask, dtype=bool)
    limit = min(m.shape) / 4.0 if max_shift_px is None else float(max_shift_px)
    eb = np.where(m, np.exp(1j * reference), 0)
    ea = np.exp(1j * np.asarray(image, np.float64))
    if m.sum() < 64:
        return image, m, (0.0, 0.0), False
    taper = taper_mask(m, width=4)
    ref = np.where(m, eb - eb[m].mean(), 0) * taper
    filled = np.where(m, ea, ea[m].mean())
    moved, moved_mask = filled, m
    total = np.zeros(2)
    for _ in range(rounds):
        both = m & moved_mask
        if both.sum() < 64:
            break
        mov = np.where(both, moved - moved[both].mean(), 0) * taper
        shift, _, _ = phase_cross_correlation(ref, mov, upsample_factor=upsample, normalization=None)
        if np.hypot(*shift) < 0.5 / upsample:
            break
        total += shift
        if np.hypot(*total) > limit:
            return image, m, (0.0, 0.0), False
        moved = (nd_shift(filled.real, tuple(total), order=3, mode="nearest")
                 + 1j * nd_shift(filled.imag, tuple(total), order=3, mode="nearest"))
        moved_mask = nd_shift(m.astype(np.float64), tuple(total), order=1, mode="constant", cval=0.0) > 0.999
    if not np.any(total):
        return image, m, (0.0, 0.0), True
    return np.angle(moved), m & moved_mask, (float(total[0]), float(total[1])), True


def dog_sigmas(band: tuple[float, float] = BAND_PX) -> tuple[float, float]:
    """The two Gaussian σ (pixels) of :func:`bandpass` for a band of periods (P_min, P_max) in pixels.

    σ = P·√(2 ln 2)/(2π) ≈ 0.187·P, so that each Gaussian's transfer function exp(−2π²σ²f²) is ½
    at its band edge f = 1/P: (0.375, 3.0) px for the default 2–16 px.
    """
    lo, hi = (float(b) for b in band)
    if not (0 < lo < hi):
        raise ScoreError(f"the band must be two periods 0 < min < max in pixels, got {band!r}")
    return _HALF_AT_PERIOD * lo, _HALF_AT_PERIOD * hi


def bandpass(image: np.ndarray, mask: np.ndarray | None = None, band: tuple[float, float] = BAND_PX) -> np.ndarray:
    """A difference of Gaussians keeping features (periods) of ``band`` pixels, mask-aware.

    ``G_σ1 * image − G_σ2 * image`` with σ1, σ2 from :func:`dog_sigmas` (0.375 and 3.0 px for
    2–16 px): the transfer function ``exp(−2π²σ1²f²) − exp(−2π²σ2²f²)`` is ≈ ½ at f = 1/16 and at
    f = 1/2 cycles/px (Nyquist) and peaks at ≈ 0.9 in between; a constant or a slow ramp gives 0.
    With a ``mask`` each Gaussian is a normalised convolution, ``G * (m·image) / G * m``, so pixels
    outside the mask neither leak in nor make an edge.  Outside the mask the result is 0.
    """
    from scipy.ndimage import gaussian_filter

    img = np.asarray(image, dtype=np.float64)
    m = np.isfinite(img) if mask is None else (np.asarray(mask, dtype=bool) & np.isfinite(img))
    s1, s2 = dog_sigmas(band)
    w = m.astype(np.float64)
    x = np.where(m, img, 0.0)
    out = np.zeros_like(img)
    smooth = []
    for s in (s1, s2):
        num = gaussian_filter(x, s, mode="constant", cval=0.0, truncate=4.0)
        den = gaussian_filter(w, s, mode="constant", cval=0.0, truncate=4.0)
        smooth.append(np.divide(num, den, out=np.zeros_like(num), where=den > 1e-6))
    out[m] = (smooth[0] - smooth[1])[m]
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b) / den) if den > 0 else 0.0


def bandpass_correlation(image: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
                         band: tuple[float, float] = BAND_PX) -> float:
    """Pearson r over ``mask`` of the two images after :func:`bandpass` (no registration, no alignment)."""
    a = np.asarray(image, np.float64)
    b = np.asarray(reference, np.float64)
    m = np.isfinite(a) & np.isfinite(b) if mask is None else np.asarray(mask, bool) & np.isfinite(a) & np.isfinite(b)
    if not m.any():
        raise ScoreError("band-pass correlation: the mask is empty")
    return _pearson(bandpass(a, m, band)[m], bandpass(b, m, band)[m])


def _unwrap_if_wrapped(phase: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """Unwrap a reference that lies in [−π, π] and steps by more than π between neighbours in the mask."""
    vals = phase[mask]
    if vals.min() < -np.pi - 1e-6 or vals.max() > np.pi + 1e-6:
        return phase, False  # not a wrapped phase
    jumps = (np.abs(np.diff(phase, axis=0))[mask[1:] & mask[:-1]] > np.pi).any() or \
        (np.abs(np.diff(phase, axis=1))[mask[:, 1:] & mask[:, :-1]] > np.pi).any()
    if not jumps:
        return phase, False
    from skimage.restoration import unwrap_phase

    un = unwrap_phase(np.ma.masked_array(_wrap(phase), mask=~mask))
    return np.where(mask, np.ma.getdata(un), phase), True


# --------------------------------------------------------------------------- the comparison
def compare_to_reference(image: np.ndarray, reference: np.ndarray, *, mask: np.ndarray | None = None,
                         band: tuple[float, float] = BAND_PX, register: bool = True, upsample: int = 50,
                         max_shift_px: float | None = None, threshold: str = "half-bit") -> ReferenceScores:
    """Score the phase ``image`` against the phase ``reference`` (2-D, radians, one grid).

    ``mask``: True on the pixels valid in both (the mosaic's coverage, the product's scanned
    region; default every pixel finite in both).  ``band``: the periods (pixels) kept by the
    band-pass correlation.  ``threshold``: the FRC resolution's, ``"half-bit"`` or ``"1/7"``.
    See the module docstring for the procedure; raises :class:`ScoreError` on bad input.
    """
    from scipy.ndimage import binary_erosion
    from skimage.metrics import structural_similarity

    a = np.asarray(image)
    b = np.asarray(reference)
    if np.iscomplexobj(a) or np.iscomplexobj(b):
        raise ScoreError("compare_to_reference takes real phase images (radians); pass np.angle(obj)")
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ScoreError(f"image and reference must be 2-D images of one shape, got {a.shape} and {b.shape}")
    if threshold not in FRC_THRESHOLDS:
        raise ScoreError(f"FRC threshold must be one of {', '.join(FRC_THRESHOLDS)}, got {threshold!r}")
    dog_sigmas(band)  # validates the band
    a, b, m = masked_box(a, b, mask)
    a = np.where(m, a, 0.0)
    b = np.where(m, b, 0.0)
    b, unwrapped = _unwrap_if_wrapped(b, m)
    # 2. a first ramp, so that the complex fields correlate; 3. registration
    ramp0 = phase_ramp(a, b, m)
    a1 = a - _plane(a.shape, ramp0)
    shift, registered = (0.0, 0.0), False
    if register:
        a1, m, shift, registered = register_phase(a1, b, m, upsample=upsample, max_shift_px=max_shift_px)
        if m.sum() < 64:
            raise ScoreError("after registration fewer than 64 pixels overlap")
    # 4. the residual ramp, refined by least squares, and the aligned image
    ramp1 = _refine_ramp(a1, b, m, phase_ramp(a1, b, m))
    diff = np.where(m, _wrap(a1 - _plane(a.shape, ramp1) - b), 0.0)
    aligned = b + diff
    ramp = (_wrap(np.array(ramp0[0] + ramp1[0])).item(), ramp0[1] + ramp1[1], ramp0[2] + ramp1[2])
    # 5. SSIM with a robust range
    lo, hi = np.percentile(b[m], [1.0, 99.0])
    dr = float(hi - lo)
    if not dr > 0:
        dr = float(np.ptp(b[m]))
    if not (math.isfinite(dr) and dr > 0):
        raise ScoreError("the reference is flat on the mask: SSIM needs a positive data range")
    _, smap = structural_similarity(b, aligned, data_range=dr, win_size=SSIM_WIN, full=True)
    inner = binary_erosion(m, structure=np.ones((SSIM_WIN, SSIM_WIN), bool), border_value=0)
    if not inner.any():
        inner = m
    ssim = float(smap[inner].mean())
    # 6. band-pass correlation, 7. FRC
    bp = _pearson(bandpass(aligned, m, band)[m], bandpass(b, m, band)[m])
    freq, curve, thr = frc(aligned, b, m)
    if threshold == "1/7":
        thr = np.full_like(curve, 1.0 / 7.0)
    auc, cross = frc_summary(freq, curve, thr)
    return ReferenceScores(
        ssim=ssim, bandpass_corr=bp, frc_auc=auc, frc_resolution_px=float(1.0 / cross) if cross > 0 else math.inf,
        shift_px=shift, ramp=ramp, n_pixels=int(m.sum()), data_range=dr, pearson=_pearson(aligned[m], b[m]),
        rms_rad=float(np.sqrt(np.mean(diff[m] ** 2))), frc_threshold=threshold,
        band_px=(float(band[0]), float(band[1])), registered=registered, reference_unwrapped=unwrapped,
        frc=(freq, curve, thr))


# --------------------------------------------------------------------------- a mosaic against a product
def scanned_region(product: Product, level: float = 0.5) -> tuple[np.ndarray, str]:
    """The pixels of the product's object that its scan covered, and how they were found.

    With a probe and positions: total probe intensity ≥ ``level`` × its maximum
    (:func:`~ptychostream.quality.grid.illumination_mask`; the probe resampled to the object's
    pixel when its own differs).  With positions only: their convex hull.  Else every pixel.
    """
    obj = product.object
    shape = obj.shape
    origin = centre_origin(shape, product.pixel_m, product.center_m)
    pos = product.positions_m
    if pos is None or len(pos) == 0:
        return np.ones(shape, dtype=bool), "the whole reference object"
    if product.probe is not None and level > 0:
        probe = np.abs(np.asarray(product.probe))
        ppx = product.probe_pixel_m
        if ppx and abs(ppx / product.pixel_m - 1.0) > 1e-3:
            from scipy.ndimage import zoom

            probe = zoom(probe, ppx / product.pixel_m, order=1)
        return (illumination_mask(probe, pos, product.pixel_m, shape, origin, level),
                f"reference scan illumination >= {level:g}")
    from scipy.spatial import Delaunay, QhullError

    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    pts = (np.asarray(pos) - np.asarray(origin)) / product.pixel_m
    try:
        hull = Delaunay(pts)
    except (QhullError, ValueError):  # fewer than 3 points, or all on a line: their bounding box
        (y0, x0), (y1, x1) = pts.min(axis=0), pts.max(axis=0)
        return (yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1), "inside the reference scan's positions"
    inside = hull.find_simplex(np.stack([yy.ravel(), xx.ravel()], axis=1)) >= 0
    return inside.reshape(shape), "inside the reference scan's positions"


def _as_mosaic(mosaic: Any, dataset: str | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None,
                                                          tuple[float, float] | None, float | None, str]:
    """(phase, mask, coverage, origin_m, pixel_m, source) of a path, MosaicFile, MosaicImage or array."""
    if isinstance(mosaic, (str, Path)):
        try:
            mosaic = read_mosaic(mosaic, dataset)
        except (OSError, ValueError) as exc:
            raise ScoreError(str(exc)) from None
    if hasattr(mosaic, "phase"):
        phase = np.asarray(mosaic.phase)
        origin = getattr(mosaic, "origin_m", None)
        return (np.angle(phase) if np.iscomplexobj(phase) else phase.astype(np.float64), getattr(mosaic, "mask", None),
                getattr(mosaic, "coverage", None), None if origin is None else (float(origin[0]), float(origin[1])),
                getattr(mosaic, "pixel_m", None), str(getattr(mosaic, "source", "") or "mosaic"))
    arr = np.asarray(mosaic)
    if arr.ndim != 2:
        raise ScoreError(f"the image to score must be 2-D, got shape {arr.shape}")
    return np.angle(arr) if np.iscomplexobj(arr) else arr.astype(np.float64), None, None, None, None, "image"


def score_against_product(mosaic: Any, product: Product | str | Path, *,
                          region: tuple[float, float, float, float] | np.ndarray | None = None,
                          mask: np.ndarray | None = None, coverage: float | None = None,
                          illumination: float | None = 0.5, origin_m: tuple[float, float] | None = None,
                          pixel_m: float | None = None, dataset: str | None = None,
                          band: tuple[float, float] = BAND_PX, register: bool = True,
                          threshold: str = "half-bit") -> ReferenceScores:
    """Score a mosaic against an iterative reconstruction (a product) of the same scan.

    ``mosaic``: a mosaic file path (:func:`~ptychostream.files.mosaic.read_mosaic`), a MosaicFile,
    a live MosaicImage, or a 2-D phase (complex: its angle) array; ``origin_m`` / ``pixel_m``
    override its grid (an array without them lies on the product's own grid and must have its
    shape).  ``product``: a :class:`~ptychostream.files.product.Product` or its file.

    Both go on the coarser of the two grids, cut to their overlap (:func:`overlap_grid`; the
    finer one anti-aliased and resampled as ``exp(i·phase)``).  Compared are the pixels where
    the mosaic is valid (its mask; coverage ≥ ``coverage`` × its maximum when given), the
    product's scanned region (:func:`scanned_region` at ``illumination``; ``None``: the whole
    object), the extra ``mask`` (a boolean image on the mosaic's grid) and ``region``: a held-out
    box (y0, y1, x0, x1) in metres (pixel centres inside it), or a boolean image on the mosaic's
    grid.  Returns :func:`compare_to_reference`'s scores with ``pixel_m``, ``mask`` and ``source``.
    """
    if not isinstance(product, Product):
        try:
            product = read_product(product, need_positions=False)
        except (OSError, ValueError) as exc:
            raise ScoreError(f"cannot read the reference: {exc}") from None
    phase, mmask, cov, m_origin, m_pixel, source = _as_mosaic(mosaic, dataset)
    ref_shape = product.object.shape
    ref_origin = centre_origin(ref_shape, product.pixel_m, product.center_m)
    px = float(pixel_m or m_pixel or product.pixel_m)
    origin = origin_m or m_origin
    if origin is None:
        if phase.shape != ref_shape or abs(px / product.pixel_m - 1.0) > 1e-6:
            raise ScoreError(f"{source}: no grid origin and its shape {phase.shape} differs from the reference "
                             f"object's {ref_shape}; give origin_m (--origin-m Y X) and pixel_m")
        origin = ref_origin
    if not (px > 0 and math.isfinite(px)):
        raise ScoreError(f"{source}: the mosaic pixel must be positive, got {px}")
    m_grid = ((int(phase.shape[0]), int(phase.shape[1])), (float(origin[0]), float(origin[1])), px)
    try:
        grid = overlap_grid(m_grid, (ref_shape, ref_origin, product.pixel_m))
    except ValueError as exc:
        raise ScoreError(f"{source} and {product.source or 'the reference'}: {exc}") from None
    # the mosaic's valid pixels, on its own grid
    valid = np.isfinite(phase)
    used = []
    if mmask is not None and np.shape(mmask) == phase.shape:
        valid &= np.asarray(mmask, dtype=bool)
        used.append("mosaic mask")
    elif cov is not None and np.shape(cov) == phase.shape:
        valid &= np.asarray(cov, dtype=np.float64) > 0
        used.append("coverage > 0")
    if coverage is not None:
        if cov is None:
            raise ScoreError(f"{source}: no coverage to threshold; drop coverage (--coverage)")
        cov = np.asarray(cov, dtype=np.float64)
        valid &= cov >= coverage * float(np.nanmax(cov))
        used.append(f"coverage >= {coverage:g}")
    for extra, name in ((mask, "mask"), (region if isinstance(region, np.ndarray) else None, "region")):
        if extra is None:
            continue
        extra = np.asarray(extra, dtype=bool)
        if extra.shape != phase.shape:
            raise ScoreError(f"the {name} has shape {extra.shape}; the mosaic's is {phase.shape}")
        valid &= extra
        used.append(f"given {name}")
    ph_c, inside_m = resample(np.exp(1j * np.where(np.isfinite(phase), phase, 0.0)), m_grid[1], px, grid)
    valid_c, _ = resample(valid.astype(np.float64), m_grid[1], px, grid, antialias=False)
    ref_c, inside_r = resample(product.object, ref_origin, product.pixel_m, grid)
    keep = inside_m & inside_r & (valid_c > 0.999) & (np.abs(ph_c) > 0) & (np.abs(ref_c) > 0)
    if illumination is not None:
        scanned, how = scanned_region(product, illumination)
        scanned_c, _ = resample(scanned.astype(np.float64), ref_origin, product.pixel_m, grid, antialias=False)
        keep &= scanned_c > 0.5
        used.append(how)
    if region is not None and not isinstance(region, np.ndarray):
        try:
            y0, y1, x0, x1 = (float(v) for v in region)
        except (TypeError, ValueError):
            raise ScoreError(f"region must be (y0, y1, x0, x1) metres or a boolean image, got {region!r}") from None
        (h, w), (oy, ox), p = grid
        yc = oy + np.arange(h)[:, None] * p
        xc = ox + np.arange(w)[None, :] * p
        keep &= (yc >= min(y0, y1)) & (yc <= max(y0, y1)) & (xc >= min(x0, x1)) & (xc <= max(x0, x1))
        used.append(f"region y {min(y0, y1):.4g}..{max(y0, y1):.4g} m, x {min(x0, x1):.4g}..{max(x0, x1):.4g} m")
    if int(keep.sum()) < 64:
        raise ScoreError(f"{source} vs {product.source or 'the reference'}: only {int(keep.sum())} pixels are valid "
                         f"in both ({', '.join(used) or 'overlap'}); at least 64 are needed")
    res = compare_to_reference(np.angle(ph_c), np.angle(ref_c), mask=keep, band=band, register=register,
                               threshold=threshold)
    res.pixel_m = float(grid[2])
    res.mask = ", ".join(["overlap"] + used)
    res.source = f"{source} vs {product.source or 'reference'}"
    return res
