"""Quality figures of a reconstructed phase image against the truth: SSIM, PSNR and FRC.

Phase from a network or an iterative solver is known only up to a global offset, a linear
ramp and a small shift, and only where the sample was illuminated.  :func:`score_phase`
therefore, in order:

1. keeps the ``mask`` (the illuminated / covered pixels; default: every finite pixel) and
   crops both images to its bounding box;
2. registers the reconstruction to the truth (``skimage.registration.phase_cross_correlation``,
   sub-pixel, on the mean-removed masked images) and shifts it (cubic spline), shifting the
   mask with it;
3. removes the global phase offset and a linear ramp: a least-squares plane ``a + b·y + c·x``
   fitted on the mask to the phase difference, compared on the circle (the difference is
   wrapped into (−π, π] before and after the fit, so 2π jumps cost nothing);
4. computes SSIM (``skimage.metrics.structural_similarity``; the SSIM map averaged over the
   mask eroded by the window radius) and PSNR (``peak_signal_noise_ratio`` over the mask
   pixels), both with ``data_range`` = the truth's peak-to-peak range on the mask, given
   explicitly (never the dtype's range);
5. computes the Fourier ring correlation of the two images (both tapered by the same smooth
   mask), ring-binned at 1/min(H, W) cycles per pixel up to Nyquist (0.5 cycles/pixel), and
   reports where it first falls below the ½-bit threshold (van Heel & Schatz 2005) and its
   area under the curve (AUC, the mean FRC from 0 to Nyquist; 1 is perfect).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["SSIM_WIN", "ScoreError", "frc", "frc_summary", "half_bit_threshold", "masked_box", "remove_plane",
           "score_phase", "taper_mask"]

SSIM_WIN = 7


class ScoreError(ValueError):
    """Bad input to the scorer (shapes, empty masks, unreadable files)."""


# --------------------------------------------------------------------------- pieces
def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2.0 * np.pi) - np.pi


def remove_plane(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``recon`` with the least-squares offset + linear ramp of ``recon − truth`` on ``mask`` removed.

    The difference is compared on the circle: returns (``truth + wrap(recon − truth − plane)``,
    the plane coefficients (a, b_y, c_x)).
    """
    h, w = recon.shape
    yy, xx = np.mgrid[0:h, 0:w]
    yy = (yy - h / 2.0) / max(h, 1)
    xx = (xx - w / 2.0) / max(w, 1)
    diff = _wrap(recon.astype(np.float64) - truth.astype(np.float64))
    m = mask & np.isfinite(diff)
    if m.sum() < 3:
        raise ScoreError("the mask holds fewer than 3 pixels: nothing to compare")
    # a first wrapped mean keeps the fit away from the ±π seam
    c0 = float(np.angle(np.mean(np.exp(1j * diff[m]))))
    diff = _wrap(diff - c0)
    basis = np.stack([np.ones(m.sum()), yy[m], xx[m]], axis=1)
    coef, *_ = np.linalg.lstsq(basis, diff[m], rcond=None)
    plane = coef[0] + coef[1] * yy + coef[2] * xx
    out = truth.astype(np.float64) + _wrap(diff - plane)
    coef = coef.copy()
    coef[0] += c0
    return out, coef


def half_bit_threshold(n_pixels: np.ndarray) -> np.ndarray:
    """The ½-bit FRC threshold for rings of ``n_pixels`` pixels (van Heel & Schatz 2005)."""
    s = np.sqrt(np.maximum(np.asarray(n_pixels, dtype=np.float64), 1.0))
    return (0.2071 + 1.9102 / s) / (1.2071 + 0.9102 / s)


def taper_mask(mask: np.ndarray, width: int = 4) -> np.ndarray:
    """A smooth (0..1) version of a boolean mask: distance-based cosine edge of ``width`` px."""
    from scipy.ndimage import distance_transform_edt

    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    d = distance_transform_edt(padded)[1:-1, 1:-1]
    t = np.clip(d / max(width, 1), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def frc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fourier ring correlation of two images: (frequency in cycles/pixel, FRC, ½-bit threshold).

    Both images have their (masked) mean removed and are multiplied by the same smooth taper
    of ``mask`` (default: a cosine taper of the whole frame's edges).  Rings are
    1/min(H, W) cycles/pixel wide, up to Nyquist (0.5).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ScoreError(f"FRC needs two 2-D images of one shape, got {a.shape} and {b.shape}")
    h, w = a.shape
    if min(h, w) < 8:
        raise ScoreError(f"FRC needs images of at least 8x8 pixels, got {a.shape}")
    m = np.ones(a.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if not m.any():
        raise ScoreError("FRC: the mask is empty")
    taper = taper_mask(m, width=max(2, min(h, w) // 16))
    a = (a - a[m].mean()) * taper
    b = (b - b[m].mean()) * taper
    fa = np.fft.fft2(a)
    fb = np.fft.fft2(b)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    r = np.sqrt(fy**2 + fx**2)
    step = 1.0 / min(h, w)
    n_bins = round(0.5 / step)
    k = np.floor(r / step + 0.5).astype(np.int64).ravel()  # ring k: |f| in [k-½, k+½)·step
    keep = k < n_bins + 1
    k = k[keep]
    cross = np.bincount(k, (fa * np.conj(fb)).real.ravel()[keep], minlength=n_bins + 1)
    pa = np.bincount(k, (np.abs(fa) ** 2).ravel()[keep], minlength=n_bins + 1)
    pb = np.bincount(k, (np.abs(fb) ** 2).ravel()[keep], minlength=n_bins + 1)
    count = np.bincount(k, minlength=n_bins + 1)
    den = np.sqrt(pa * pb)
    curve = np.divide(cross, den, out=np.zeros_like(cross), where=den > 0)
    freq = np.arange(n_bins + 1) * step
    return freq, curve, half_bit_threshold(count)


def frc_summary(freq: np.ndarray, curve: np.ndarray, thr: np.ndarray) -> tuple[float, float]:
    """(AUC from 0 to Nyquist normalised to 1, first crossing of ``thr`` in cycles/pixel; 0.5 = none).

    The DC ring is left out; the crossing is interpolated linearly between the rings around it.
    """
    f, c = freq[1:], curve[1:]  # the DC ring is meaningless after mean removal
    t = thr[1:]
    auc = float(np.trapezoid(c, f) / (f[-1] - f[0])) if len(f) > 1 else float(c.mean())
    below = np.flatnonzero(c < t)
    if below.size == 0:
        return auc, 0.5
    j = int(below[0])
    if j == 0:
        return auc, float(f[0])
    # linear interpolation of the crossing between rings j-1 and j
    d0, d1 = c[j - 1] - t[j - 1], c[j] - t[j]
    frac = d0 / (d0 - d1) if d0 != d1 else 0.0
    return auc, float(f[j - 1] + frac * (f[j] - f[j - 1]))


def _register(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray, upsample: int, rounds: int = 3
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Shift ``recon`` (and ``mask``) onto ``truth``; returns (recon, mask, (dy, dx)).

    The masked, tapered cross-correlation is biased towards zero shift by the shared taper, so
    the estimate is refined over a few rounds on the shifted image (the bias shrinks with the
    residual shift).
    """
    from scipy.ndimage import shift as nd_shift
    from skimage.registration import phase_cross_correlation

    if not mask.any():
        return recon, mask, (0.0, 0.0)
    t = np.where(mask, truth - truth[mask].mean(), 0.0)
    if not np.any(t):
        return recon, mask, (0.0, 0.0)
    taper = taper_mask(mask, width=4)
    filled = np.where(mask, recon, recon[mask].mean())
    total = np.zeros(2)
    moved, moved_mask = filled, mask
    for _ in range(rounds):
        both = mask & moved_mask
        if both.sum() < 64:
            break
        r = np.where(both, moved - moved[both].mean(), 0.0)
        if not np.any(r):
            break
        shift, _, _ = phase_cross_correlation(t * taper, r * taper, upsample_factor=upsample,
                                              normalization=None)
        if np.hypot(*shift) < 0.5 / upsample:
            break
        total += shift
        moved = nd_shift(filled, tuple(total), order=3, mode="nearest")
        moved_mask = nd_shift(mask.astype(np.float64), tuple(total), order=1, mode="constant", cval=0.0) > 0.999
    if not np.any(total):
        return recon, mask, (0.0, 0.0)
    return moved, mask & moved_mask, (float(total[0]), float(total[1]))


def masked_box(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``a``, ``b`` and the mask of pixels to compare (``mask`` and finite in both), cut to the
    mask's bounding box; ScoreError for a mask of another shape, fewer than 64 pixels, or a box
    too small for the SSIM window."""
    m = np.isfinite(a) & np.isfinite(b)
    if mask is not None:
        mk = np.asarray(mask)
        if mk.shape != a.shape:
            raise ScoreError(f"mask shape {mk.shape} differs from the image shape {a.shape}")
        m &= mk.astype(bool)
    if m.sum() < 64:
        raise ScoreError(f"the mask holds {int(m.sum())} usable pixels; at least 64 are needed")
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    if min(m[box].shape) < SSIM_WIN + 2:
        raise ScoreError(f"the masked area {m[box].shape} is too small to score (>= {SSIM_WIN + 2} px a side)")
    return a[box], b[box], m[box]


def score_phase(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, *,
                register: bool = True, upsample: int = 20, data_range: float | None = None
                ) -> dict[str, Any]:
    """SSIM, PSNR and FRC of a phase image ``recon`` against ``truth`` (same shape, radians).

    ``mask``: boolean, True on the illuminated / covered pixels to compare (default: every
    pixel finite in both).  Returns a dict with ``ssim``, ``psnr`` (dB), ``frc_auc``,
    ``frc_half_bit`` (cycles/pixel; 0.5 = Nyquist, i.e. no crossing), ``shift`` ((dy, dx)
    pixels applied to ``recon``), ``data_range``, ``plane`` (offset, y and x ramp removed),
    ``pixels`` (compared), and ``frc`` (freq, curve, threshold) arrays.  See the module
    docstring for the procedure.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    recon = np.asarray(recon, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if recon.ndim != 2 or recon.shape != truth.shape:
        raise ScoreError(f"recon and truth must be 2-D images of one shape, got {recon.shape} and {truth.shape}")
    r, t, m = masked_box(recon, truth, mask)
    r = np.where(m, r, 0.0)
    t = np.where(np.isfinite(t), t, 0.0)
    # a first offset removal helps the registration
    r, plane0 = remove_plane(r, t, m)
    shift = (0.0, 0.0)
    if register:
        r, m, shift = _register(r, t, m, upsample)
        if m.sum() < 64:
            raise ScoreError("after registration fewer than 64 pixels overlap")
    r, plane = remove_plane(r, t, m)
    plane = plane + plane0  # offset and ramps removed in all (the second fit takes the residual)
    r = np.where(m, r, t)  # outside the mask: no difference (only the mask is averaged)
    dr = float(np.ptp(t[m])) if data_range is None else float(data_range)
    if not (math.isfinite(dr) and dr > 0):
        raise ScoreError(f"data range must be positive; the truth on the mask spans {dr}")
    _, smap = structural_similarity(t, r, data_range=dr, win_size=SSIM_WIN, full=True)
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(m, structure=np.ones((SSIM_WIN, SSIM_WIN), bool), border_value=0)
    if not inner.any():
        inner = m
    ssim = float(smap[inner].mean())
    mse = float(np.mean((t[m] - r[m]) ** 2))
    psnr = float(peak_signal_noise_ratio(t[m], r[m], data_range=dr)) if mse > 0 else math.inf
    freq, curve, thr = frc(r, t, m)
    auc, half_bit = frc_summary(freq, curve, thr)
    return {"ssim": ssim, "psnr": psnr, "frc_auc": auc, "frc_half_bit": half_bit, "shift": shift,
            "data_range": dr, "plane": tuple(float(c) for c in plane), "pixels": int(m.sum()),
            "frc": (freq, curve, thr)}
