"""A compiled splat of windowed patches into the canvas planes, for every offset (``mean``, ``overlap``,
``none``) in the phase and complex domains.

numpy's version (in :class:`~ptychostream.mosaic.stitch.Stitcher`) folds a batch's bilinear
corners with whole-array operations and then adds each patch's block to the canvas with three or
four slice-adds, each dominated by numpy's per-call and per-row overhead, all under the GIL. Here one
compiled call does a whole batch, with the GIL released, so the receive thread runs beside it.

Each canvas pixel of a patch's (h+1, w+1) footprint gathers its four bilinear neighbours from the
windowed patch padded with a zero border, a loop over contiguous rows that the compiler vectorises.
The sums equal numpy's within float32 rounding (the order of the operations differs). For
``overlap`` each step of ``chunk`` patches is folded into scratch blocks, each block is matched to
the canvas the steps before it made (shifted, or in the complex domain turned, as numpy's version
does), then the blocks are added.

numba is optional: :func:`available` says whether it imported and the kernel compiled; without it
the stitcher keeps numpy's version. The first use compiles (about a second; cached on disk where
numba can write its cache); :func:`warm_up` does it ahead of the first batch.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

__all__ = ["available", "splat", "unavailable_reason", "warm_up"]

_lock = threading.Lock()
_kernel = None
_error: str | None = None


def _build():
    from ptychostream.mosaic import _splat_kernel

    return _splat_kernel.kernel


def _get():
    global _kernel, _error
    if _kernel is None and _error is None:
        with _lock:
            if _kernel is None and _error is None:
                try:
                    k = _build()
                    _compile(k)
                    _kernel = k
                except Exception as exc:  # no numba, or it cannot compile here: numpy's version serves
                    _error = f"{type(exc).__name__}: {exc}"
                    logging.getLogger(__name__).warning("the compiled splat is unavailable (%s): the mosaic "
                                                        "is splatted by numpy, about 2.5x slower", _error)
    return _kernel


def _compile(k) -> None:
    """Compile for float32 canvases (the stitcher's default) with a tiny batch."""
    f = np.float32
    z2 = np.zeros((4, 4), f)
    k(np.zeros((1, 2, 2), f), np.zeros((0, 2, 2), f), np.ones((2, 2), f), np.zeros((4, 4, 4), f), 4.0, True,
      np.zeros(1), np.zeros(1), np.zeros(1, np.int64), np.zeros(1, np.int64), z2, z2.copy(),
      np.zeros((0, 0), f), np.zeros((0, 0), f), np.zeros((0, 0), f), np.zeros((0, 0, 0), f), 0, 0.0,
      np.zeros((0, 4, 0, 0), f))


def available() -> bool:
    """Whether the compiled splat serves (numba imported and compiled it); compiles on first call."""
    return _get() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None while it is True or not yet tried)."""
    return _error


def warm_up() -> threading.Thread:
    """Compile in the background now, so that the first batch does not wait for it."""
    t = threading.Thread(target=_get, name="splat-compile", daemon=True)
    t.start()
    return t


_EMPTY4 = np.zeros((0, 4, 0, 0), np.float32)
_EMPTY3 = np.zeros((0, 0, 0), np.float32)
_EMPTY2 = np.zeros((0, 0), np.float32)


def splat(phase: np.ndarray, amplitude: np.ndarray | None, win: np.ndarray, pad: np.ndarray, win_sum: float,
          sub_mean: bool, ay: np.ndarray, ax: np.ndarray, ry: np.ndarray, rx: np.ndarray,
          num: np.ndarray, wt: np.ndarray, num_amp: np.ndarray | None, wt_amp: np.ndarray | None,
          num_im: np.ndarray | None = None, overlap_chunk: int = 0, overlap_min: float = 0.0,
          blocks: np.ndarray | None = None) -> None:
    """Splat float32 patches ``phase`` (n, h, w) (and ``amplitude``) at allocation rows ``ry`` and
    columns ``rx`` with bilinear fractions ``ay``, ``ax`` into float32 planes, in batch order.

    ``pad`` is float32 scratch (4, h+2, w+2) whose border is zero and whose ``pad[1]`` holds the window
    in its interior; ``sub_mean`` removes each patch's window-weighted mean phase first. With
    ``num_im`` (the complex domain) ``num`` takes the windowed cosines and ``num_im`` the sines, and
    ``sub_mean`` turns each patch by its window-weighted mean angle. ``overlap_chunk`` > 0: offset
    "overlap" (with ``sub_mean``) in steps of that many patches, ``overlap_min`` the least canvas
    weight (window units) for a block to be matched, ``blocks`` float32 scratch (chunk, 4, h+1, w+1).
    """
    k = _get()
    if k is None:
        raise RuntimeError(f"the compiled splat is unavailable: {_error}")
    first, sines = phase, _EMPTY3
    if num_im is not None:  # numpy's vectorised cos and sin, then the kernel
        first, sines = np.cos(phase), np.sin(phase)
    k(first, _EMPTY3 if amplitude is None else amplitude, win, pad, float(win_sum), bool(sub_mean),
      ay, ax, ry, rx, num, wt, _EMPTY2 if num_amp is None else num_amp, _EMPTY2 if wt_amp is None else wt_amp,
      _EMPTY2 if num_im is None else num_im, sines, int(overlap_chunk), float(overlap_min),
      _EMPTY4 if blocks is None or overlap_chunk <= 0 else blocks)
