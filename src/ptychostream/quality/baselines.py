"""Iterative baselines to compare the network with: a plain numpy ePIE with a known probe.

A test and scoring baseline only (no probe refinement, no position correction, one CPU core):
iterative labels for training come from pty-chi's engines, :mod:`ptychostream.iterative`
(``ptychostream reconstruct``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ptychostream.quality.metrics import ScoreError
from ptychostream.sim.forward import fourier_shift

__all__ = ["epie"]


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
    probes = fourier_shift(np.repeat(np.asarray(probe, np.complex64)[None], n, axis=0), -frac[:, 0], -frac[:, 1])
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
