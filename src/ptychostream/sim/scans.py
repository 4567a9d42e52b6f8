"""Scan trajectories in metres.

Conventions: positions have shape (N, 2) ordered **(y, x)**, in metres, relative to the object's
centre (pixel (H // 2, W // 2)); x grows with the column index, y with the row index.

* ``"spiral"``: Fermat spiral r_n = c·√n, θ_n = n·φ_g for n = 0 … N-1, where φ_g is the golden
  angle 180°·(3 − √5) ≈ 137.508°, x = r·cos θ, y = r·sin θ.  We take c = step / √π so that each
  point owns an area step² (the same dose density as a square raster of that step); the mean
  nearest-neighbour spacing of such a spiral is then ≈ 0.96·step.
* ``"raster"``: a square-ish grid (⌈√N⌉ columns, row by row) with spacing ``step``, centred on 0.
* ``"jitter"``: the raster plus uniform noise in ±``jitter``·step on each axis (seeded).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["GOLDEN_ANGLE_DEG", "SCAN_PATTERNS", "scan_extent_px", "scan_positions", "spiral_constant"]

SCAN_PATTERNS: tuple[str, ...] = ("spiral", "raster", "jitter")
#: the golden angle in degrees, 180·(3 − √5) ≈ 137.508
GOLDEN_ANGLE_DEG = 180.0 * (3.0 - math.sqrt(5.0))


def spiral_constant(step_m: float) -> float:
    """Fermat-spiral constant c (r_n = c·√n) for a nominal step: c = step / √π."""
    return step_m / math.sqrt(math.pi)


def _raster(step_m: float, npoints: int) -> np.ndarray:
    cols = math.ceil(math.sqrt(npoints))
    rows = math.ceil(npoints / cols)
    k = np.arange(npoints)
    r, c = k // cols, k % cols
    y = (r - (rows - 1) / 2.0) * step_m
    x = (c - (cols - 1) / 2.0) * step_m
    return np.stack([y, x], axis=1)


def scan_positions(pattern: str, step_m: float, npoints: int, seed: int = 0, jitter: float = 0.1) -> np.ndarray:
    """Scan positions (N, 2) float64 in metres, (y, x), centred on the origin."""
    if pattern not in SCAN_PATTERNS:
        raise ValueError(f"unknown scan pattern {pattern!r}; choose one of {', '.join(SCAN_PATTERNS)}")
    step_m = float(step_m)
    if not math.isfinite(step_m) or step_m <= 0:
        raise ValueError(f"scan step must be a positive number of metres, got {step_m!r}")
    if int(npoints) != npoints or npoints <= 0:
        raise ValueError(f"number of scan points must be a positive integer, got {npoints!r}")
    npoints = int(npoints)
    if pattern == "spiral":
        n = np.arange(npoints, dtype=np.float64)
        r = spiral_constant(step_m) * np.sqrt(n)
        theta = np.deg2rad(GOLDEN_ANGLE_DEG) * n
        return np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1)
    pos = _raster(step_m, npoints)
    if pattern == "jitter":
        if not math.isfinite(jitter) or jitter < 0:
            raise ValueError(f"jitter must be a non-negative fraction of the step, got {jitter!r}")
        rng = np.random.default_rng(seed)
        pos = pos + rng.uniform(-jitter * step_m, jitter * step_m, size=pos.shape)
    return pos


def scan_extent_px(positions_m: np.ndarray, pixel_m: float, patch: int) -> tuple[int, int]:
    """Object shape (H, W), even, that holds every patch of the scan with the object's centre at 0.

    There are 2 pixels of margin around the outermost patches.
    """
    pos = np.asarray(positions_m, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or len(pos) == 0:
        raise ValueError(f"positions must have shape (N, 2) ordered (y, x), got {pos.shape}")
    if not np.isfinite(pixel_m) or pixel_m <= 0:
        raise ValueError(f"pixel size must be positive, got {pixel_m!r}")
    if int(patch) != patch or patch < 1:
        raise ValueError(f"patch size must be a positive integer, got {patch!r}")
    reach = np.ceil(np.abs(pos).max(axis=0) / pixel_m)
    half = reach.astype(int) + int(patch) // 2 + 2
    return int(2 * half[0]), int(2 * half[1])
