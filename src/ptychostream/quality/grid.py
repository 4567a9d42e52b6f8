"""The truth on a mosaic's grid, the area the scan illuminated, and common grids for two images.

Grid convention (:mod:`ptychostream.mosaic.stitch`): canvas pixel (r, c) lies at
``origin_m + (r, c)·pixel_m``; object pixel (R, C) at ``obj_center_m + ((R − H//2)·p, (C − W//2)·p)``.
A grid here is ``(shape, origin_m, pixel_m)``: the shape (H, W), the (y, x) metres of pixel (0, 0)
and the (square) pixel size in metres.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Grid", "centre_origin", "illumination_map", "illumination_mask", "overlap_grid", "place_truth",
           "resample"]

#: (shape (H, W), origin_m (y, x) of pixel (0, 0), pixel_m)
Grid = tuple[tuple[int, int], tuple[float, float], float]


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
        r0, c0 = round(oy), round(ox)
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


def centre_origin(shape: tuple[int, int], pixel_m: float, center_m: tuple[float, float]) -> tuple[float, float]:
    """The (y, x) metres of pixel (0, 0) of an object whose centre pixel (H // 2, W // 2) lies at ``center_m``."""
    h, w = (int(s) for s in shape)
    return (float(center_m[0]) - (h // 2) * pixel_m, float(center_m[1]) - (w // 2) * pixel_m)


def overlap_grid(a: Grid, b: Grid) -> Grid:
    """The coarser of two grids, cut to the pixels whose centres lie inside both footprints.

    Both images can then be put on it (:func:`resample`): the coarser one is taken as it is, the
    finer one is smoothed and resampled.  On equal pixels ``a`` wins.  Raises ``ValueError`` when
    the two do not overlap.
    """
    coarse = a if a[2] >= b[2] else b
    (ch, cw), (coy, cox), cp = coarse
    lo, hi = [], []
    for (h, w), (oy, ox), p in (a, b):
        lo.append((oy, ox))
        hi.append((oy + (h - 1) * p, ox + (w - 1) * p))
    lo_y, lo_x = max(v[0] for v in lo), max(v[1] for v in lo)
    hi_y, hi_x = min(v[0] for v in hi), min(v[1] for v in hi)
    eps = 1e-6
    r0 = max(0, math.ceil((lo_y - coy) / cp - eps))
    r1 = min(ch - 1, math.floor((hi_y - coy) / cp + eps))
    c0 = max(0, math.ceil((lo_x - cox) / cp - eps))
    c1 = min(cw - 1, math.floor((hi_x - cox) / cp + eps))
    if r1 < r0 or c1 < c0:
        raise ValueError(f"the two images do not overlap: y {lo_y:.4g}..{hi_y:.4g} m, x {lo_x:.4g}..{hi_x:.4g} m")
    return (r1 - r0 + 1, c1 - c0 + 1), (coy + r0 * cp, cox + c0 * cp), cp


def resample(image: np.ndarray, src_origin_m: tuple[float, float], src_pixel_m: float, dst: Grid, *,
             order: int = 1, antialias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (real or complex; pixel (0, 0) at ``src_origin_m``, pixel ``src_pixel_m``) on grid ``dst``.

    Returns (values (H, W), inside (H, W) bool: the pixel centre lies within the source).  When the
    grids share the pixel and an integer offset the pixels are taken as they are; otherwise spline
    interpolation of ``order`` (bilinear by default; real and imaginary parts apart), after a
    Gaussian smoothing of σ = (ratio − 1) / 2 source pixels when the target pixel is ``ratio`` > 1
    times coarser (scikit-image's anti-aliasing rule).  Outside: 0.  Resample a phase as
    ``exp(i·phase)`` and take the angle, so that 2π wraps cost nothing.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    img = np.asarray(image)
    H, W = img.shape
    s_origin, s_pixel = src_origin_m, float(src_pixel_m)
    (h, w), origin, pixel = dst
    oy = (origin[0] - s_origin[0]) / s_pixel
    ox = (origin[1] - s_origin[1]) / s_pixel
    ratio = pixel / s_pixel
    out = np.zeros((h, w), dtype=img.dtype if np.iscomplexobj(img) else np.float64)
    if abs(ratio - 1.0) < 1e-6 and abs(oy - round(oy)) < 1e-4 and abs(ox - round(ox)) < 1e-4:
        r0, c0 = round(oy), round(ox)
        inside = np.zeros((h, w), dtype=bool)
        ys, ye = max(r0, 0), min(r0 + h, H)
        xs, xe = max(c0, 0), min(c0 + w, W)
        if ye > ys and xe > xs:
            out[ys - r0:ye - r0, xs - c0:xe - c0] = img[ys:ye, xs:xe]
            inside[ys - r0:ye - r0, xs - c0:xe - c0] = True
        return out, inside
    rr = oy + np.arange(h)[:, None] * ratio + np.zeros((1, w))
    cc = ox + np.arange(w)[None, :] * ratio + np.zeros((h, 1))
    tol = 1e-6
    inside = (rr >= -tol) & (rr <= H - 1 + tol) & (cc >= -tol) & (cc <= W - 1 + tol)
    coords = np.stack([np.clip(rr, 0, H - 1), np.clip(cc, 0, W - 1)])
    sigma = (ratio - 1.0) / 2.0 if antialias and ratio > 1.0 else 0.0
    parts = [img.real, img.imag] if np.iscomplexobj(img) else [img]
    res = []
    for part in parts:
        part = np.asarray(part, dtype=np.float64)
        if sigma > 0:
            part = gaussian_filter(part, sigma, mode="nearest")
        res.append(map_coordinates(part, coords, order=order, mode="nearest"))
    vals = res[0] + 1j * res[1] if len(res) == 2 else res[0]
    out[inside] = vals[inside]
    return out, inside
