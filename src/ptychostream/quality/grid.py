"""The truth on a mosaic's grid, and the area the scan illuminated.

Grid convention (:mod:`ptychostream.mosaic.stitch`): canvas pixel (r, c) lies at
``origin_m + (r, c)·pixel_m``; object pixel (R, C) at ``obj_center_m + ((R − H//2)·p, (C − W//2)·p)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["illumination_map", "illumination_mask", "place_truth"]


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
