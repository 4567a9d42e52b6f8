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

The CLI (``ptychostream score MOSAIC TRUTH``) reads a mosaic written by the recorder
(``/entry/mosaic`` of a record HDF5), an NPZ/HDF5 with ``phase`` (+ ``coverage``/``mask``,
``origin_m``/``pixel_m``), or a bare ``.npy``, and a truth file written by
:func:`ptychostream.sim.replay.write_truth_h5`; it places the mosaic on the object grid with
the convention of :mod:`ptychostream.mosaic.stitch` (canvas pixel (r, c) at ``origin_m + (r, c)·pixel_m``;
object pixel (R, C) at ``((R − H//2)·p, (C − W//2)·p)``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.paths import split_dataset_path

__all__ = [
    "ScoreError", "MosaicFile", "frc", "half_bit_threshold", "illumination_map", "illumination_mask",
    "load_mosaic", "place_truth", "remove_plane", "score_phase", "score_files", "score_mosaic",
    "simulate_and_score", "simulate_scan", "stitch_patches", "epie", "add_score_parser",
]

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


def _taper(mask: np.ndarray, width: int = 4) -> np.ndarray:
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
    taper = _taper(m, width=max(2, min(h, w) // 16))
    a = (a - a[m].mean()) * taper
    b = (b - b[m].mean()) * taper
    fa = np.fft.fft2(a)
    fb = np.fft.fft2(b)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    r = np.sqrt(fy**2 + fx**2)
    step = 1.0 / min(h, w)
    n_bins = int(round(0.5 / step))
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


def _frc_summary(freq: np.ndarray, curve: np.ndarray, thr: np.ndarray) -> tuple[float, float]:
    """(AUC from 0 to Nyquist normalised to 1, first ½-bit crossing in cycles/pixel)."""
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
    taper = _taper(mask, width=4)
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
    valid = np.isfinite(recon) & np.isfinite(truth)
    if mask is None:
        m = valid
    else:
        m = np.asarray(mask)
        if m.shape != recon.shape:
            raise ScoreError(f"mask shape {m.shape} differs from the image shape {recon.shape}")
        m = m.astype(bool) & valid
    if m.sum() < 64:
        raise ScoreError(f"the mask holds {int(m.sum())} usable pixels; at least 64 are needed")
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    r, t, m = recon[box], truth[box], m[box]
    if min(r.shape) < SSIM_WIN + 2:
        raise ScoreError(f"the masked area {r.shape} is too small to score (>= {SSIM_WIN + 2} px a side)")
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
    auc, half_bit = _frc_summary(freq, curve, thr)
    return {"ssim": ssim, "psnr": psnr, "frc_auc": auc, "frc_half_bit": half_bit, "shift": shift,
            "data_range": dr, "plane": tuple(float(c) for c in plane), "pixels": int(m.sum()),
            "frc": (freq, curve, thr)}


# --------------------------------------------------------------------------- files
@dataclass
class MosaicFile:
    """A mosaic read from a file: phase (H, W), optional coverage/mask, grid origin and pixel."""

    phase: np.ndarray
    coverage: np.ndarray | None
    mask: np.ndarray | None
    origin_m: tuple[float, float] | None
    pixel_m: float | None
    source: str


def _origin_pixel(attrs: dict[str, Any]) -> tuple[tuple[float, float] | None, float | None]:
    origin = None
    if "origin_m" in attrs:
        o = np.asarray(attrs["origin_m"], dtype=np.float64).ravel()
        if o.size == 2:
            origin = (float(o[0]), float(o[1]))
    elif "origin_y_m" in attrs and "origin_x_m" in attrs:
        origin = (float(np.asarray(attrs["origin_y_m"]).ravel()[0]),
                  float(np.asarray(attrs["origin_x_m"]).ravel()[0]))
    pixel = None
    for key in ("pixel_m", "pixel_size_m", "pixel_width_m"):
        if key in attrs:
            pixel = float(np.asarray(attrs[key]).ravel()[0])
            break
    return origin, pixel


def load_mosaic(path: str | Path, dataset: str | None = None) -> MosaicFile:
    """Read a mosaic from a record HDF5 (``/entry/mosaic``), an HDF5/NPZ with ``phase`` or a ``.npy``.

    HDF5: the group ``dataset`` (or ``path::group``), else ``/entry/mosaic``, ``/mosaic`` or the
    root, holding ``phase`` (also ``mosaic``) and optionally ``coverage`` and ``mask``; origin
    and pixel from the group's attributes ``origin_y_m``/``origin_x_m`` or ``origin_m``, and
    ``pixel_size_m`` or ``pixel_m``.  NPZ: the same names as arrays.  ``.npy``: phase only.
    """
    try:
        file, dataset = split_dataset_path(path, dataset, "mosaic")
    except FileNotFoundError as exc:
        raise ScoreError(str(exc)) from None
    suffix = file.suffix.lower()
    try:
        if suffix == ".npy":
            phase = np.load(file)
            return MosaicFile(_as_image(phase, str(file)), None, None, None, None, str(file))
        if suffix == ".npz":
            with np.load(file) as z:
                key = dataset or next((k for k in ("phase", "mosaic") if k in z.files), None)
                if key is None or key not in z.files:
                    raise ScoreError(f"{file}: no 'phase' array (keys: {', '.join(z.files) or 'none'})")
                attrs = {k: z[k] for k in z.files if k not in (key, "coverage", "mask")}
                origin, pixel = _origin_pixel(attrs)
                cov = np.asarray(z["coverage"], dtype=np.float64) if "coverage" in z.files else None
                msk = np.asarray(z["mask"], dtype=bool) if "mask" in z.files else None
                return MosaicFile(_as_image(z[key], f"{file}:{key}"), cov, msk, origin, pixel, f"{file}:{key}")
        import h5py

        if not h5py.is_hdf5(file):
            raise ScoreError(f"{file}: not an HDF5, .npz or .npy file")
        with h5py.File(file, "r") as h5:
            groups = [dataset] if dataset else ["/entry/mosaic", "/mosaic", "/"]
            for gname in groups:
                g = h5.get(gname)
                if g is None:
                    continue
                if isinstance(g, h5py.Dataset):
                    attrs = dict(g.attrs)
                    attrs.update({k: v for k, v in g.parent.attrs.items() if k not in attrs})
                    origin, pixel = _origin_pixel(attrs)
                    return MosaicFile(_as_image(g[()], f"{file}:{gname}"), None, None, origin, pixel,
                                      f"{file}:{gname}")
                key = next((k for k in ("phase", "mosaic") if k in g and isinstance(g[k], h5py.Dataset)), None)
                if key is None:
                    continue
                attrs = dict(g.attrs)
                attrs.update({k: v for k, v in g[key].attrs.items() if k not in attrs})
                origin, pixel = _origin_pixel(attrs)
                cov = np.asarray(g["coverage"][()], dtype=np.float64) if "coverage" in g else None
                msk = np.asarray(g["mask"][()], dtype=bool) if "mask" in g else None
                where = f"{file}:{g.name.rstrip('/')}/{key}"
                return MosaicFile(_as_image(g[key][()], where), cov, msk, origin, pixel, where)
            raise ScoreError(f"{file}: no mosaic: looked for a 'phase' dataset in {', '.join(groups)}")
    except ScoreError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ScoreError(f"{file}: cannot read the mosaic ({exc})") from None


def _as_image(arr: Any, where: str) -> np.ndarray:
    a = np.asarray(arr)
    if np.iscomplexobj(a):
        a = np.angle(a)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ScoreError(f"{where}: the mosaic must be a 2-D image, got shape {np.shape(arr)}")
    return a.astype(np.float64)


def place_truth(obj: np.ndarray, obj_pixel_m: float, shape: tuple[int, int],
                origin_m: tuple[float, float], pixel_m: float,
                obj_center_m: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """The truth's phase on the mosaic grid: (phase (H, W), inside (H, W) bool).

    Canvas pixel (r, c) lies at ``origin_m + (r, c)·pixel_m``; object pixel (R, C) at
    ``obj_center_m + ((R − H//2)·p, (C − W//2)·p)``.  On a shared grid (same pixel, integer
    offset) the pixels are taken as they are, otherwise the complex object is resampled
    (bilinear) and its angle taken.
    """
    obj = np.asarray(obj)
    H, W = obj.shape
    h, w = (int(s) for s in shape)
    oy = (origin_m[0] - obj_center_m[0]) / obj_pixel_m + H // 2
    ox = (origin_m[1] - obj_center_m[1]) / obj_pixel_m + W // 2
    ratio = pixel_m / obj_pixel_m
    if abs(ratio - 1.0) < 1e-6 and abs(oy - round(oy)) < 1e-4 and abs(ox - round(ox)) < 1e-4:
        r0, c0 = int(round(oy)), int(round(ox))
        out = np.full((h, w), np.nan)
        inside = np.zeros((h, w), dtype=bool)
        ys, ye = max(r0, 0), min(r0 + h, H)
        xs, xe = max(c0, 0), min(c0 + w, W)
        if ye > ys and xe > xs:
            out[ys - r0:ye - r0, xs - c0:xe - c0] = np.angle(obj[ys:ye, xs:xe])
            inside[ys - r0:ye - r0, xs - c0:xe - c0] = True
        return out, inside
    from scipy.ndimage import map_coordinates

    rr = oy + np.arange(h)[:, None] * ratio + np.zeros((1, w))
    cc = ox + np.arange(w)[None, :] * ratio + np.zeros((h, 1))
    inside = (rr >= 0) & (rr <= H - 1) & (cc >= 0) & (cc <= W - 1)
    coords = np.stack([rr, cc])
    re = map_coordinates(obj.real.astype(np.float64), coords, order=1, mode="nearest")
    im = map_coordinates(obj.imag.astype(np.float64), coords, order=1, mode="nearest")
    out = np.where(inside, np.angle(re + 1j * im), np.nan)
    return out, inside


def illumination_map(probe: np.ndarray, positions_m: np.ndarray, pixel_m: float, shape: tuple[int, int],
                     origin_m: tuple[float, float]) -> np.ndarray:
    """Total probe intensity Σ|P(x − rᵢ)|² over the scan on a grid (nearest-pixel placement).

    Probe pixel (i, j) of the scan point at ``r`` lies at ``r + ((i − ph//2)·p, (j − pw//2)·p)``;
    canvas pixel (y, x) at ``origin_m + (y, x)·pixel_m``.
    """
    inten = np.abs(np.asarray(probe)) ** 2
    ph, pw = inten.shape
    h, w = (int(s) for s in shape)
    out = np.zeros((h + 2 * ph, w + 2 * pw))  # padded by one probe on every side
    pos = np.asarray(positions_m, dtype=np.float64)
    top = np.rint((pos[:, 0] - origin_m[0]) / pixel_m).astype(np.int64) - ph // 2 + ph
    left = np.rint((pos[:, 1] - origin_m[1]) / pixel_m).astype(np.int64) - pw // 2 + pw
    ok = (top >= 0) & (left >= 0) & (top + ph <= h + 2 * ph) & (left + pw <= w + 2 * pw)
    for r, c in zip(top[ok], left[ok]):
        out[r:r + ph, c:c + pw] += inten
    return out[ph:ph + h, pw:pw + w]


def illumination_mask(probe: np.ndarray, positions_m: np.ndarray, pixel_m: float, shape: tuple[int, int],
                      origin_m: tuple[float, float], level: float = 0.5) -> np.ndarray:
    """Pixels that received at least ``level`` × the maximum total probe intensity of the scan."""
    illum = illumination_map(probe, positions_m, pixel_m, shape, origin_m)
    peak = float(illum.max())
    return illum >= level * peak if peak > 0 else np.zeros(shape, dtype=bool)


def score_files(mosaic_path: str | Path, truth_path: str | Path, *, dataset: str | None = None,
                mask_path: str | None = None, coverage: float | None = None,
                illumination: float | None = 0.5, origin_m: tuple[float, float] | None = None,
                pixel_m: float | None = None, register: bool = True) -> dict[str, Any]:
    """Score a mosaic file against a ground-truth file (see :func:`load_mosaic`, :func:`score_phase`).

    The compared pixels are those inside the object and inside every mask asked for: the
    mosaic's own ``mask`` (if stored), ``coverage`` ≥ the given fraction (if stored and asked
    for), the illuminated area (total probe intensity ≥ ``illumination`` × its maximum, from the
    truth's probe and positions; ``None`` to skip) and ``mask_path`` (a .npy boolean image).
    """
    from ptychostream.sim.replay import read_truth_h5

    mos = load_mosaic(mosaic_path, dataset)
    try:
        truth = read_truth_h5(truth_path)
    except (OSError, ValueError) as exc:
        raise ScoreError(f"cannot read the truth: {exc}") from None
    obj_px = float(truth["object_pixel_m"])
    px = pixel_m or mos.pixel_m or obj_px
    origin = origin_m or mos.origin_m
    H, W = truth["object"].shape
    if origin is None:
        if mos.phase.shape != (H, W):
            raise ScoreError(f"{mos.source}: no origin_m in the file and its shape {mos.phase.shape} differs from "
                             f"the object's {(H, W)}; pass --origin-m Y X and --pixel-m")
        cy, cx = truth["object_center_m"]
        origin = (cy - (H // 2) * obj_px, cx - (W // 2) * obj_px)
    tphase, inside = place_truth(truth["object"], obj_px, mos.phase.shape, origin, px, truth["object_center_m"])
    mask = inside & np.isfinite(mos.phase)
    used = ["inside the object"]
    if mos.mask is not None and mos.mask.shape == mask.shape:
        mask &= mos.mask
        used.append("mosaic mask")
    if coverage is not None:
        if mos.coverage is None:
            raise ScoreError(f"{mos.source}: the file holds no coverage; drop --coverage")
        mask &= mos.coverage >= coverage * float(np.nanmax(mos.coverage))
        used.append(f"coverage >= {coverage:g}")
    if illumination is not None and truth.get("probe") is not None:
        pos = truth["positions_m"]
        mask &= illumination_mask(truth["probe"], pos, px, mos.phase.shape, origin, illumination)
        used.append(f"illumination >= {illumination:g}")
    if mask_path:
        extra = np.load(mask_path).astype(bool)
        if extra.shape != mask.shape:
            raise ScoreError(f"{mask_path}: mask shape {extra.shape} differs from the mosaic's {mask.shape}")
        mask &= extra
        used.append(str(mask_path))
    res = score_phase(mos.phase, tphase, mask, register=register)
    res["mask"] = ", ".join(used)
    res["source"] = mos.source
    return res


# --------------------------------------------------------------------------- simulated scans
def simulate_scan(kind: str = "digits", points: int = 1000, step_m: float = 1e-7, photons: float = 1e6,
                  seed: int = 0, pattern: str = "spiral", probe: np.ndarray | None = None,
                  geometry: Any = None) -> Any:
    """The simulated detector's scan as a :class:`~ptychostream.sim.forward.Simulator`.

    Defaults are the demo's: the default :class:`Geometry`, the zone-plate probe, a Fermat
    spiral of 1000 points with a 100 nm step over ``make_object(kind, scan_extent_px(...), seed)``,
    1e6 photons per frame, uint16 frames.
    """
    from ptychostream.sim import (
        Geometry,
        Simulator,
        make_object,
        make_probe,
        scan_extent_px,
        scan_positions,
    )

    g = geometry or Geometry()
    pr = probe if probe is not None else make_probe("zoneplate", g.size, g.pixel_m, geometry=g)
    pos = scan_positions(pattern, step_m, points, seed=seed)
    obj = make_object(kind, shape=scan_extent_px(pos, g.pixel_m, g.size), seed=seed)
    return Simulator(obj, pr, pos, g, photons=photons, seed=seed)


def stitch_patches(phase: np.ndarray, positions_m: np.ndarray, pixel_m: float, offset: str = "mean",
                   amplitude: np.ndarray | None = None, window: str = "hann") -> Any:
    """Stitch patches with the live :class:`~ptychostream.mosaic.stitch.Stitcher`; returns its MosaicImage."""
    from ptychostream.mosaic.stitch import Stitcher

    st = Stitcher(pixel_m, phase.shape[1:], offset=offset, window=window)
    for s in range(0, len(phase), 32):  # the live path's batch size
        st.add(phase[s:s + 32], positions_m[s:s + 32], None if amplitude is None else amplitude[s:s + 32])
    return st.mosaic()


def score_mosaic(mosaic: Any, sim: Any, illumination: float | None = 0.5) -> dict[str, Any]:
    """Score a MosaicImage of a simulated scan against the simulator's object."""
    g = sim.geometry
    tphase, inside = place_truth(sim.obj, g.pixel_m, mosaic.shape, mosaic.origin_m, mosaic.pixel_m)
    mask = inside & mosaic.mask
    if illumination is not None:
        mask &= illumination_mask(sim.probe, sim.positions_m, mosaic.pixel_m, mosaic.shape, mosaic.origin_m,
                                  illumination)
    return score_phase(mosaic.phase, tphase, mask)


def simulate_and_score(model: Any, *, kind: str = "digits", points: int = 1000, step_m: float = 1e-7,
                       photons: float = 1e6, seed: int = 0, offsets: tuple[str, ...] | str = ("mean", "overlap"),
                       window: str = "hann", threads: int = 2, keep: bool = False) -> dict[str, Any]:
    """Simulate a scan, reconstruct it with ``model`` (path or opened Model), stitch and score.

    Returns {offset: score dict} (or one score dict if ``offsets`` is a single string).  The
    model's ``pixel_m`` must match the simulation's object pixel.  ``keep`` adds the MosaicImage
    under ``"mosaic"`` in each score dict.
    """
    from ptychostream.model.infer import ModelError, open_model

    single = isinstance(offsets, str)
    offs = (offsets,) if single else tuple(offsets)
    sim = simulate_scan(kind, points, step_m, photons, seed)
    g = sim.geometry
    opened = None
    try:
        m = model
        if isinstance(model, (str, Path)):
            try:
                m = opened = open_model(model, backend="ONNXRuntime-CPU", threads=threads)
            except ModelError as exc:
                raise ScoreError(str(exc)) from None
        if m.info.pixel_m and abs(m.info.pixel_m / g.pixel_m - 1) > 1e-3:
            raise ScoreError(f"the model's pixel ({m.info.pixel_m:.4g} m) differs from the scan's "
                             f"({g.pixel_m:.4g} m)")
        phases, amps = [], []
        for s in range(0, sim.n, 64):
            out = m.run(sim.frames(np.arange(s, min(s + 64, sim.n))))
            phases.append(out["phase"])
            if "amplitude" in out:
                amps.append(out["amplitude"])
    finally:
        if opened is not None:
            opened.close()
    phase = np.concatenate(phases)
    amp = np.concatenate(amps) if amps else None
    res = {}
    for off in offs:
        mos = stitch_patches(phase, sim.positions_m, g.pixel_m, off, amp, window)
        r = score_mosaic(mos, sim)
        if keep:
            r["mosaic"] = mos
        res[off] = r
    return res[offs[0]] if single else res


# --------------------------------------------------------------------------- iterative baseline
def epie(frames: np.ndarray, positions_m: np.ndarray, probe: np.ndarray, pixel_m: float,
         shape: tuple[int, int], iterations: int = 50, alpha: float = 1.0, seed: int = 0,
         callback: Any = None) -> np.ndarray:
    """A plain numpy PIE/ePIE reconstruction with a known probe (the object only): complex (H, W).

    ``frames`` are fftshift-centred intensities |FFT_ortho(P·O)|² (the simulator's convention),
    ``positions_m`` (N, 2) (y, x) relative to the object's centre pixel (H//2, W//2).  The integer
    part of each offset indexes the object; the fractional part shifts the probe (Fourier shift),
    so sub-pixel scans are modelled exactly.  Each iteration visits the positions in a random
    order and replaces the far-field modulus by the measured one.
    """
    from ptychostream.sim.forward import _fourier_shift

    frames = np.asarray(frames)
    n, size, _ = frames.shape
    H, W = (int(s) for s in shape)
    amp = np.sqrt(np.maximum(np.fft.ifftshift(frames.astype(np.float32), axes=(-2, -1)), 0.0))
    corner = np.asarray(positions_m, dtype=np.float64) / pixel_m + np.array([H // 2 - size // 2, W // 2 - size // 2])
    whole = np.rint(corner)
    frac = corner - whole
    top, left = whole[:, 0].astype(int), whole[:, 1].astype(int)
    if top.min() < 0 or left.min() < 0 or top.max() + size > H or left.max() + size > W:
        raise ScoreError(f"the scan does not fit a {H}x{W} object")
    # the probe seen by the integer-indexed patch: shifted by +frac (object content moves by -frac)
    probes = _fourier_shift(np.repeat(np.asarray(probe, np.complex64)[None], n, axis=0), -frac[:, 0], -frac[:, 1])
    obj = np.ones((H, W), dtype=np.complex64)
    rng = np.random.default_rng(seed)
    pmax = float(np.max(np.abs(probe)) ** 2)
    for it in range(int(iterations)):
        for k in rng.permutation(n):
            p = probes[k]
            view = obj[top[k]:top[k] + size, left[k]:left[k] + size]
            psi = p * view
            f = np.fft.fft2(psi, norm="ortho")
            f *= amp[k] / np.maximum(np.abs(f), 1e-6)
            diff = np.fft.ifft2(f, norm="ortho") - psi
            view += (alpha / pmax) * np.conj(p) * diff
        if callback is not None:
            callback(it, obj)
    return obj


# --------------------------------------------------------------------------- CLI
def _print(res: dict[str, Any], title: str, as_json: bool) -> None:
    out = {k: v for k, v in res.items() if k not in ("frc", "mosaic")}
    if as_json:
        print(json.dumps(out, default=float))
        return
    print(f"{title}  ({out['pixels']} px compared: {out.get('mask', '')})")
    print(f"  SSIM        {out['ssim']:.4f}")
    print(f"  PSNR        {out['psnr']:.2f} dB  (data range {out['data_range']:.3f} rad)")
    print(f"  FRC AUC     {out['frc_auc']:.4f}")
    print(f"  FRC 1/2-bit {out['frc_half_bit']:.4f} cycles/px (0.5 = Nyquist)")
    print(f"  shift       ({out['shift'][0]:+.2f}, {out['shift'][1]:+.2f}) px (y, x)")


def _cmd_score(args: argparse.Namespace) -> int:
    try:
        if args.model:
            if args.mosaic or args.truth:
                raise ScoreError("give either MOSAIC TRUTH or --model, not both")
            offsets = tuple(args.offset or ("mean", "overlap"))
            res = simulate_and_score(args.model, kind=args.object, points=args.points, step_m=args.step,
                                     photons=args.photons, seed=args.seed, offsets=offsets, keep=bool(args.save))
            for off in offsets:
                r = res[off]
                r["mask"] = "illumination >= 0.5, mosaic mask"
                r["offset"] = off
                r["source"] = (f"{args.model} on a simulated {args.object} spiral scan ({args.points} points, "
                               f"{args.step:g} m step, {args.photons:g} photons), offset {off}")
                _print(r, r["source"], args.json)
                if args.save:
                    mos = r["mosaic"]
                    base = Path(args.save)
                    target = base.with_name(f"{base.stem}_{off}.npz") if len(offsets) > 1 else base
                    np.savez_compressed(target, phase=mos.phase, coverage=mos.coverage, mask=mos.mask,
                                        origin_m=np.asarray(mos.origin_m), pixel_m=mos.pixel_m,
                                        **({"amplitude": mos.amplitude} if mos.amplitude is not None else {}))
            return 0
        if not (args.mosaic and args.truth):
            raise ScoreError("give a MOSAIC and a TRUTH file (or --model to simulate a scan)")
        res = score_files(args.mosaic, args.truth, dataset=args.dataset, mask_path=args.mask,
                          coverage=args.coverage,
                          illumination=None if args.illumination <= 0 else args.illumination,
                          origin_m=tuple(args.origin_m) if args.origin_m else None,
                          pixel_m=args.pixel_m, register=not args.no_register)
    except (ScoreError, OSError) as exc:
        print(f"ptychostream score: error: {exc}", file=sys.stderr)
        return 2
    _print(res, res["source"], args.json)
    return 0


def add_score_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``score`` on an argparse subparsers object; returns the sub-parser."""
    p = sub.add_parser(
        "score", help="SSIM / PSNR / FRC of a phase mosaic against the simulation's truth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Score a reconstructed phase mosaic against the ground truth of a simulated scan.\n\n"
            "The mosaic is placed on the object grid via its origin and pixel size, cropped to the\n"
            "illuminated / covered area, registered (sub-pixel phase cross-correlation), freed of its\n"
            "global phase offset and linear ramp (least squares on the mask), then compared: SSIM and\n"
            "PSNR with data_range = the truth's range on the mask, FRC with its 1/2-bit crossing and AUC."),
        epilog=(
            "mosaic files: a record HDF5 (/entry/mosaic: phase, coverage; attrs origin_y_m, origin_x_m,\n"
            "pixel_size_m), any HDF5/NPZ with 'phase' (+ 'coverage', 'mask', 'origin_m', 'pixel_m'),\n"
            "or a bare .npy (then on the object's own grid unless --origin-m/--pixel-m are given).\n"
            "truth: an HDF5 written by ptychostream.sim.replay.write_truth_h5 (simdet --truth).\n\n"
            "examples:\n  ptychostream score demo-out/record.h5 demo-out/truth.h5 --json\n"
            "  ptychostream score --model src/ptychostream/models/ptychonn_edge.onnx   # the demo scan, offline"))
    p.add_argument("mosaic", nargs="?", help="mosaic file (HDF5, NPZ or NPY; 'file.h5::group' picks a group)")
    p.add_argument("truth", nargs="?", help="ground-truth HDF5 (write_truth_h5)")
    p.add_argument("--dataset", help="HDF5 group/dataset or NPZ key of the mosaic phase")
    p.add_argument("--mask", help=".npy boolean image (mosaic grid): compare only these pixels")
    p.add_argument("--coverage", type=float, default=None, metavar="FRAC",
                   help="also require the mosaic's coverage >= FRAC of its maximum")
    p.add_argument("--illumination", type=float, default=0.5, metavar="FRAC",
                   help="require the scan's total probe intensity >= FRAC of its maximum "
                        "(from the truth's probe and positions; default 0.5; 0 disables)")
    p.add_argument("--origin-m", type=float, nargs=2, metavar=("Y", "X"),
                   help="metres of mosaic pixel (0, 0), overriding the file")
    p.add_argument("--pixel-m", type=float, help="mosaic pixel size in metres, overriding the file")
    p.add_argument("--no-register", action="store_true", help="skip the sub-pixel registration")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object (one per line)")
    g = p.add_argument_group("simulate instead (--model): the demo scan through a model and the live stitcher")
    g.add_argument("--model", metavar="ONNX", help="reconstruct a simulated scan with this model, stitch, score")
    g.add_argument("--object", default="digits", help="object kind (default digits, the demo's)")
    g.add_argument("--points", type=int, default=1000, help="spiral scan points (default 1000)")
    g.add_argument("--step", type=float, default=1e-7, help="scan step in metres (default 1e-7)")
    g.add_argument("--photons", type=float, default=1e6, help="photons per frame (default 1e6)")
    g.add_argument("--seed", type=int, default=0, help="object / noise seed (default 0)")
    g.add_argument("--offset", action="append", choices=("mean", "overlap", "none"),
                   help="stitcher phase-offset mode, repeatable (default: mean and overlap)")
    g.add_argument("--save", metavar="NPZ", help="also save the mosaic(s) (NAME_<offset>.npz for several)")
    p.set_defaults(func=_cmd_score)
    return p
