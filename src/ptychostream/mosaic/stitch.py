"""Live mosaic: splat real-space patches at their scan positions (sub-pixel, vectorised).

Geometry convention (shared with the simulator)
-----------------------------------------------
* Positions are in metres, arrays of shape (n, 2) ordered **(y, x)**, relative to the
  scan/object centre. x grows with the column index, y with the row index.
* A pixel grid of pitch ``pixel_m`` is anchored at the scan centre: *global* pixel
  index ``(gy, gx)`` (integers, may be negative) sits at metres ``(gy * pixel_m, gx * pixel_m)``.
  For an object array of shape (H, W), object pixel ``(r, c)`` is global pixel
  ``(r - H//2, c - W//2)``.
* A patch of shape (h, w) "centred at position p" has its pixel ``(i, j)`` at metres::

      p + ((i - h//2) * pixel_m, (j - w//2) * pixel_m)

  i.e. at object pixel ``(cy + i - h//2, cx + j - w//2)`` with
  ``(cy, cx) = (H//2, W//2) + p / pixel_m`` (fractional in general). The patch's centre
  pixel is ``(h//2, w//2)``. This is exactly how the simulator extracts patches
  (integer block plus a Fourier sub-pixel shift), and :meth:`Stitcher.add` is its inverse
  (geometrically exact; the resampling is bilinear, so sub-pixel detail is slightly
  smoothed): every patch pixel is splatted onto the four canvas pixels around its
  (fractional) global coordinate with bilinear weights times the blending window.
  A patch at an integer-pixel position lands unchanged.
* The canvas pixel ``(0, 0)`` of a :class:`MosaicImage` is at metres ``origin_m`` (y, x);
  canvas pixel ``(r, c)`` is at ``origin_m + (r, c) * pixel_m``. ``origin_m`` is always
  an integer multiple of ``pixel_m``, so mosaics from a growing canvas and from a fixed
  extent share the same grid.

Accumulation
------------
Float planes ``num_phase``, ``weight`` and, once amplitudes arrive, ``num_amp`` are kept
(a fourth, ``weight_amp``, only if batches with and without amplitude are mixed); nothing
per frame is stored, so memory is bounded by the canvas (``max_canvas_px`` per side) plus
scratch for one chunk of ``chunk`` patches. A batch is prepared at once (window, offset, and
the four bilinear corners folded into one (h+1, w+1) block per patch with separable weights,
because a patch's fractional offset is shared by all its pixels), then each block is added to
each plane with one slice-add, in batch order: the sums are those of a grouped
:func:`numpy.add.at` over flat indices, bit for bit. For 64x64 patches in batches of 64 the two
scatter about equally fast (numpy 2 gives ``add.at`` a fast path) and :func:`numpy.bincount`
over the batch's bounding box is slower; slice-adds need no index arrays, and the "overlap" step
reads the canvas under each patch as views instead of gathering it (3x faster). :meth:`Stitcher.add_values` splats one
value per patch (a map of a per-frame figure) at the cost of the weights alone.

Where numba is installed, float32 canvases (every offset, either domain) are splatted by a compiled
kernel instead (:mod:`ptychostream.mosaic._splat`: one call per chunk, the GIL released, the same
sums within float32 rounding; ``overlap`` in the same steps of ``overlap_chunk`` patches);
``Stitcher.compiled`` says which serves, and setting it False keeps numpy's version.

Every change is also recorded as a dirty box per reader (:meth:`Stitcher.take_dirty`), so a
display-sized view (:mod:`ptychostream.mosaic.display`) is updated where patches landed.

Phase offset reconciliation (networks predict phase up to a constant per patch):

* ``"mean"`` subtracts each patch's window-weighted mean phase before splatting. Order
  independent and exact for objects without structure at the patch scale or larger, but it
  is a high-pass filter: phase variations on scales >= the patch are lost.
* ``"overlap"`` removes the mean, then shifts each patch by the offset that best matches the
  mosaic already under it (weighted least squares over the overlap; patches with no
  overlap keep the mean removed). Batches are processed in steps of ``overlap_chunk``
  patches so that patches of one batch align to each other. Keeps low frequencies on
  overlapping scans; depends (slightly) on arrival order.
* ``"none"`` splats phases as they are (for networks whose offsets are consistent).

Domain: ``"phase"`` (the default) averages phase values, as above. ``"complex"`` averages unit
phasors ``exp(i phase)`` instead (a second plane holds the sines), and the mosaic's phase is the
angle of their weighted sum, in (-pi, pi]: two patches that give one feature as +3.1 and -3.1 rad
agree there, where the phase average makes it 0. The offsets act on the phasors: ``mean`` turns
each patch by its window-weighted mean angle, ``overlap`` then by the angle of its overlap with the
phasors already under it. A network whose phases are known only modulo 2 pi (one trained on the
frames alone, whose loss sees ``exp(i phase)``) needs it.

Rejections: a patch whose position is NaN/inf (or whose data holds NaN/inf) is
skipped and counted in ``counts["rejected_nan"]``; with a fixed extent a patch whose
*centre* lies outside the extent is counted in ``counts["rejected_range"]`` (a patch
whose centre is inside but which overhangs the edge is kept; its overhang is dropped).
With a growing canvas a patch that would make the covered area exceed
``max_canvas_px`` on a side is rejected as ``rejected_range``. ``last_error`` keeps
the latest message.

A growing canvas starts empty, reallocates with amortised doubling towards the side it
grows (existing content is copied once per reallocation) and :meth:`Stitcher.mosaic`
returns only the bounding box of what was splatted. A fixed canvas returns the whole
extent, pixel (0, 0) at ``(floor(ymin / pixel_m), floor(xmin / pixel_m)) * pixel_m``.

A Stitcher is not thread-safe: call it from one thread (or hold a lock).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ptychostream.mosaic import _splat

__all__ = ["DOMAINS", "MosaicImage", "Stitcher", "complex_phase", "make_window", "splat_kernel_status",
           "warm_up_splat_kernel"]

WINDOWS = ("hann", "gaussian", "flat", "tukey")
OFFSETS = ("mean", "overlap", "none")
DOMAINS = ("phase", "complex")


def warm_up_splat_kernel() -> None:
    """Load (or compile) the compiled splat in a background thread, so that a first batch need not wait."""
    _splat.warm_up()


def splat_kernel_status() -> str:
    """"compiled" when the compiled splat serves, else why numpy's version does (compiles if not yet tried)."""
    return "compiled" if _splat.available() else f"numpy ({_splat.unavailable_reason()})"


def _window_1d(kind: str, n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    if kind == "flat":
        return np.ones(n)
    if kind == "hann":
        # sin^2 with samples at half-integer phase: no exact zeros at the edges
        return np.sin(np.pi * (i + 0.5) / n) ** 2
    if kind == "gaussian":
        sigma = n / 4.0
        return np.exp(-0.5 * ((i - n // 2) / sigma) ** 2)
    if kind == "tukey":
        alpha = 0.5
        x = (i + 0.5) / n  # in (0, 1)
        out = np.ones(n)
        edge = alpha / 2
        lo = x < edge
        hi = x > 1 - edge
        out[lo] = 0.5 * (1 - np.cos(np.pi * x[lo] / edge))
        out[hi] = 0.5 * (1 - np.cos(np.pi * (1 - x[hi]) / edge))
        return out
    raise ValueError(f"unknown window {kind!r}; choose one of {WINDOWS}")


def make_window(kind: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Separable blending window: returns the (wy, wx) 1-D factors (float64)."""
    return _window_1d(kind, int(shape[0])), _window_1d(kind, int(shape[1]))


def complex_phase(num_re: np.ndarray, num_im: np.ndarray, weight: np.ndarray, floor: np.float32,
                  out: np.ndarray) -> np.ndarray:
    """The domain "complex" mosaic phase: the angle of the phasor sums, faded to 0 where the weight is
    below ``floor`` as the phase domain's ``num / max(weight, floor)`` does, 0 where nothing landed."""
    np.arctan2(num_im, num_re, out=out)
    fade = np.minimum(weight / floor, np.float32(1.0)).astype(np.float32, copy=False)
    np.multiply(out, fade, out=out)
    return out


@dataclass
class MosaicImage:
    """A snapshot of the mosaic.

    ``phase`` (and ``amplitude``) are ``num / weight`` where ``mask`` is True (weight
    above ``min_weight`` times its maximum); below that they fade to 0 as
    ``num / threshold`` and are exactly 0 where nothing was splatted. ``coverage`` is
    the weight normalised to a maximum of 1.
    Canvas pixel (r, c) sits at metres ``origin_m + (r, c) * pixel_m`` ((y, x)).
    """

    phase: np.ndarray
    amplitude: np.ndarray | None
    coverage: np.ndarray
    mask: np.ndarray
    origin_m: tuple[float, float]
    pixel_m: float
    n_patches: int
    #: canvas pixels per side of each pixel here (a display-sized image, :mod:`.display`); 1: the canvas
    binning: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.phase.shape  # type: ignore[return-value]

    @property
    def extent_m(self) -> tuple[float, float, float, float]:
        """(ymin, ymax, xmin, xmax) metres of the first/last pixel centres."""
        h, w = self.phase.shape
        y0, x0 = self.origin_m
        return (y0, y0 + (h - 1) * self.pixel_m, x0, x0 + (w - 1) * self.pixel_m)


class Stitcher:
    """Accumulate phase (and amplitude) patches into a live mosaic.

    Parameters
    ----------
    pixel_m: real-space pixel size of the patches (metres).
    patch_shape: (h, w) of the patches.
    extent_m: (ymin, ymax, xmin, xmax) in metres of a fixed canvas; ``None``: the canvas
        grows with the scan (amortised doubling, capped at ``max_canvas_px``).
    window: blending window, "hann" | "gaussian" | "flat" | "tukey".
    offset: "mean" (subtract each patch's window-weighted mean phase), "overlap" (match
        each patch to the mosaic under it) or "none".
    max_canvas_px: largest canvas side in pixels.
    min_weight: relative weight (to the maximum) below which a mosaic pixel is masked.
    domain: "phase" (average phase values) or "complex" (average exp(i phase): wrap-safe).
    """

    #: the canvas planes: window-weighted phase sum (domain "complex": cosine sum) and window weight
    #: (set by :meth:`reset`)
    num_phase: np.ndarray
    weight: np.ndarray
    #: domain "complex": the window-weighted sine sum (None in the phase domain)
    num_im: np.ndarray | None

    def __init__(
        self,
        pixel_m: float,
        patch_shape: tuple[int, int],
        extent_m: tuple[float, float, float, float] | None = None,
        window: str = "hann",
        offset: str = "mean",
        max_canvas_px: int = 8192,
        dtype=np.float32,
        min_weight: float = 1e-3,
        domain: str = "phase",
    ) -> None:
        if not (np.isfinite(pixel_m) and pixel_m > 0):
            raise ValueError(f"pixel_m must be a positive number, got {pixel_m!r}")
        if offset not in OFFSETS:
            raise ValueError(f"offset must be one of {OFFSETS}, got {offset!r}")
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        self.domain = domain
        self.pixel_m = float(pixel_m)
        self.patch_shape = (int(patch_shape[0]), int(patch_shape[1]))
        h, w = self.patch_shape
        if h < 1 or w < 1:
            raise ValueError(f"bad patch_shape {patch_shape!r}")
        self.window = window
        self.offset = offset
        self.max_canvas_px = int(max_canvas_px)
        self.dtype = np.dtype(dtype)
        self.min_weight = float(min_weight)
        wy, wx = make_window(window, self.patch_shape)
        self._wy = wy.astype(self.dtype)
        self._wx = wx.astype(self.dtype)
        self._win = np.outer(wy, wx).astype(self.dtype)
        self._win_sum = float(np.outer(wy, wx).sum())
        self._ws: dict[str, np.ndarray] = {}
        self._outs: dict[str, np.ndarray] = {}
        #: splat with the compiled kernel where it can (numba installed, float32, offset mean or none)
        self.compiled = True
        self._pad: np.ndarray | None = None
        self._flip = 0
        #: patches splatted per vectorised step (bounds the scratch memory)
        self.chunk = 64
        #: smaller steps for offset="overlap", so that patches of one batch align to each other
        self.overlap_chunk = 8
        #: least mean canvas weight under a patch (window units) for "overlap" to apply
        self.overlap_min = 0.02
        self.extent_m = None if extent_m is None else tuple(float(v) for v in extent_m)
        if self.extent_m is not None:
            ymin, ymax, xmin, xmax = self.extent_m
            if not all(np.isfinite(self.extent_m)) or ymax < ymin or xmax < xmin:
                raise ValueError(f"bad extent_m {extent_m!r}")
            eps = 1e-6
            ey0 = int(np.floor(ymin / self.pixel_m + eps))
            ey1 = int(np.ceil(ymax / self.pixel_m - eps)) + 1
            ex0 = int(np.floor(xmin / self.pixel_m + eps))
            ex1 = int(np.ceil(xmax / self.pixel_m - eps)) + 1
            if ey1 - ey0 > self.max_canvas_px or ex1 - ex0 > self.max_canvas_px:
                raise ValueError(
                    f"extent {extent_m} is {ey1 - ey0}x{ex1 - ex0} px, over max_canvas_px="
                    f"{self.max_canvas_px}")
            #: exposed region, global pixel indices [y0, y1) x [x0, x1)
            self._region = (ey0, ey1, ex0, ex1)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every patch (keeps geometry for a fixed extent)."""
        self.counts = {"stitched": 0, "rejected_nan": 0, "rejected_range": 0}
        self.last_error = ""
        self.n_patches = 0
        self._content: list[int] | None = None  # [y0, y1, x0, x1) global px touched
        #: per reader of take_dirty(): the global px box changed since its last call
        self._dirty: dict[object, list[int] | None] = {}
        #: a new object at every reset (and for every stitcher): a view kept from the planes compares it
        #: by identity to know when to start again (an ``id()`` may be reused once a stitcher is freed)
        self.generation = object()
        self.num_amp: np.ndarray | None = None
        self.weight_amp: np.ndarray | None = None  # None: amplitude shares `weight`
        self._noamp_seen = False
        if self.extent_m is not None:
            h, w = self.patch_shape
            py, px = h // 2 + 2, w // 2 + 2
            ey0, ey1, ex0, ex1 = self._region
            self._oy, self._ox = ey0 - py, ex0 - px
            shape = (ey1 - ey0 + 2 * py, ex1 - ex0 + 2 * px)
            if getattr(self, "num_phase", None) is not None and self.num_phase.shape == shape:
                self.num_phase.fill(0)
                self.weight.fill(0)
            else:
                self.num_phase = np.zeros(shape, self.dtype)
                self.weight = np.zeros(shape, self.dtype)
        else:
            self._oy = self._ox = 0
            self.num_phase = np.zeros((0, 0), self.dtype)
            self.weight = np.zeros((0, 0), self.dtype)
        self.num_im = np.zeros_like(self.num_phase) if self.domain == "complex" else None

    @property
    def canvas_shape(self) -> tuple[int, int]:
        """Shape of the mosaic that :meth:`mosaic` returns now."""
        y0, y1, x0, x1 = self._exposed()
        return (y1 - y0, x1 - x0)

    @property
    def origin_m(self) -> tuple[float, float]:
        """Metres (y, x) of pixel (0, 0) of the mosaic that :meth:`mosaic` returns now."""
        y0, _, x0, _ = self._exposed()
        return (y0 * self.pixel_m, x0 * self.pixel_m)

    def _exposed(self) -> tuple[int, int, int, int]:
        if self.extent_m is not None:
            return self._region
        if self._content is None:
            return (0, 0, 0, 0)
        return tuple(self._content)  # type: ignore[return-value]

    @property
    def exposed_box(self) -> tuple[int, int, int, int]:
        """Global pixel box ``[y0, y1, x0, x1)`` of the mosaic that :meth:`mosaic` returns now."""
        return self._exposed()

    def take_dirty(self, reader: object) -> tuple[int, int, int, int] | None:
        """The global pixel box that patches changed since ``reader``'s last call (None: none).

        Each reader (a hashable key, e.g. the view itself) has its own box; a reader's first call
        (and its first after a :meth:`reset`) returns the whole exposed mosaic.
        """
        if reader not in self._dirty:
            self._dirty[reader] = None
            return self._exposed()
        d, self._dirty[reader] = self._dirty[reader], None
        return None if d is None else (d[0], d[1], d[2], d[3])

    def planes(self, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                                np.ndarray | None, np.ndarray | None]:
        """Views of ``(num_phase, weight, num_amp, weight_amp, num_im)`` over the global pixel box ``box``
        (which must lie inside the exposed mosaic); ``weight_amp`` None: amplitude shares ``weight``;
        ``num_im`` None: the phase domain."""
        y0, y1, x0, x1 = box
        win = (slice(y0 - self._oy, y1 - self._oy), slice(x0 - self._ox, x1 - self._ox))
        return (self.num_phase[win], self.weight[win],
                None if self.num_amp is None else self.num_amp[win],
                None if self.weight_amp is None else self.weight_amp[win],
                None if self.num_im is None else self.num_im[win])

    # ------------------------------------------------------------------ geometry
    def _corners(self, positions_m: np.ndarray):
        """Global integer top-left (fy, fx) of the (h+1, w+1) footprint and fractions."""
        h, w = self.patch_shape
        g = positions_m / self.pixel_m
        gy = g[:, 0] - h // 2
        gx = g[:, 1] - w // 2
        # snap values within 1e-6 px of an integer so exact grid positions stay exact
        for a in (gy, gx):
            r = np.round(a)
            near = np.abs(a - r) < 1e-6
            a[near] = r[near]
        fy = np.floor(gy)
        fx = np.floor(gx)
        return fy.astype(np.int64), fx.astype(np.int64), (gy - fy), (gx - fx)

    def _accept_growing(self, fy, fx, keep) -> np.ndarray:
        """Greedy (in batch order) rejection of patches that would overgrow the canvas."""
        h, w = self.patch_shape
        cap = self.max_canvas_px
        keep = keep.copy()
        if h + 1 > cap or w + 1 > cap:
            keep[:] = False
            return keep
        while True:
            idx = np.flatnonzero(keep)
            if idx.size == 0:
                return keep
            y0 = fy[idx]
            x0 = fx[idx]
            if self._content is not None:
                cy0, cy1, cx0, cx1 = self._content
                lo_y = np.minimum.accumulate(np.minimum(y0, cy0))
                hi_y = np.maximum.accumulate(np.maximum(y0 + h + 1, cy1))
                lo_x = np.minimum.accumulate(np.minimum(x0, cx0))
                hi_x = np.maximum.accumulate(np.maximum(x0 + w + 1, cx1))
            else:
                lo_y = np.minimum.accumulate(y0)
                hi_y = np.maximum.accumulate(y0 + h + 1)
                lo_x = np.minimum.accumulate(x0)
                hi_x = np.maximum.accumulate(x0 + w + 1)
            bad = (hi_y - lo_y > cap) | (hi_x - lo_x > cap)
            if not bad.any():
                return keep
            keep[idx[np.argmax(bad)]] = False

    def _grow(self, u: tuple[int, int, int, int]) -> None:
        """Make the allocation contain global box u = [y0, y1, x0, x1)."""
        h, w = self.patch_shape
        AH, AW = self.num_phase.shape
        oy, ox = self._oy, self._ox
        if AH and AW and oy <= u[0] and u[1] <= oy + AH and ox <= u[2] and u[3] <= ox + AW:
            return
        cap = self.max_canvas_px

        def axis(lo, hi, o, n, p):
            need = hi - lo
            if n and o <= lo and hi <= o + n:
                return o, n
            size = min(cap, max(need + 2 * p, 2 * n, 4 * p))
            size = max(size, need)
            if n == 0:
                start = lo - (size - need) // 2
            else:
                grow_lo = lo < o
                grow_hi = hi > o + n
                if grow_lo and not grow_hi:
                    start = hi - size  # slack on the growing (low) side
                elif grow_hi and not grow_lo:
                    start = lo
                else:
                    start = lo - (size - need) // 2
            return start, size

        ny, nh = axis(u[0], u[1], oy, AH, h + 1)
        nx, nw = axis(u[2], u[3], ox, AW, w + 1)
        planes = ["num_phase", "weight"]
        if self.num_im is not None:
            planes.append("num_im")
        if self.num_amp is not None:
            planes.append("num_amp")
        if self.weight_amp is not None:
            planes.append("weight_amp")
        c = self._content
        for name in planes:
            old = getattr(self, name)
            new = np.zeros((nh, nw), self.dtype)
            if c is not None:
                new[c[0] - ny:c[1] - ny, c[2] - nx:c[3] - nx] = \
                    old[c[0] - oy:c[1] - oy, c[2] - ox:c[3] - ox]
            setattr(self, name, new)
        self._oy, self._ox = ny, nx

    # ------------------------------------------------------------------ splat
    def _buf(self, name: str, shape: tuple[int, ...], dtype=None) -> np.ndarray:
        """Reusable scratch array (avoids page-faulting fresh temporaries every batch)."""
        dtype = np.dtype(self.dtype if dtype is None else dtype)
        size = math.prod(shape)
        b = self._ws.get(name)
        if b is None or b.size < size or b.dtype != dtype:
            b = np.empty(size, dtype)
            self._ws[name] = b
        return b[:size].reshape(shape)

    def _padded(self, n: int) -> np.ndarray:
        """Scratch (n, h+1, w+1) with a zero last row and column; the patches go in ``[:, :h, :w]``."""
        h, w = self.patch_shape
        Z = self._buf("Z", (n, h + 1, w + 1))
        Z[:, h] = 0
        Z[:, :h, w] = 0
        return Z

    def _bilinear_blocks(self, Z: np.ndarray, ay: np.ndarray, ax: np.ndarray) -> np.ndarray:
        """Fold the 4 bilinear corners of each patch into one (h+1, w+1) block.

        ``Z`` is :meth:`_padded` with the patches in its top-left (h, w). On the flattened blocks a
        shift by one row is a shift by w+1 elements and a shift by one column a shift by one, and
        the zero row and column end each shift at the patch's edge: two contiguous multiply-adds.
        """
        n, h1, w1 = Z.shape
        L = h1 * w1
        dt = self.dtype
        ay = ay.astype(dt)[:, None]
        ax = ax.astype(dt)[:, None]
        z = Z.reshape(n, L)
        T = self._buf("T", (n, L))
        tmp = self._buf("tmp", (n, L))
        np.multiply(z, 1 - ay, out=T)
        np.multiply(z[:, :L - w1], ay, out=tmp[:, :L - w1])
        T[:, w1:] += tmp[:, :L - w1]
        Q = self._buf("Q", (n, h1, w1))
        q = Q.reshape(n, L)
        np.multiply(T, 1 - ax, out=q)
        np.multiply(T[:, :L - 1], ax, out=tmp[:, :L - 1])
        q[:, 1:] += tmp[:, :L - 1]
        return Q

    def _weight_blocks(self, ay: np.ndarray, ax: np.ndarray) -> np.ndarray:
        h, w = self.patch_shape
        dt = self.dtype
        ay = ay.astype(dt)[:, None]
        ax = ax.astype(dt)[:, None]
        by = np.zeros((ay.shape[0], h + 1), dt)
        by[:, :h] = self._wy * (1 - ay)
        by[:, 1:] += self._wy * ay
        bx = np.zeros((ax.shape[0], w + 1), dt)
        bx[:, :w] = self._wx * (1 - ax)
        bx[:, 1:] += self._wx * ax
        Wb = self._buf("Wb", (ay.shape[0], h + 1, w + 1))
        np.multiply(by[:, :, None], bx[:, None, :], out=Wb)
        return Wb

    def _reconcile(self, Q: np.ndarray, Wb: np.ndarray, ry: list[int], rx: list[int]) -> None:
        """offset="overlap": shift each (mean-removed) block to agree with the canvas.

        The offset o_k minimises sum(Wb * w_canvas * (Q/Wb - o - num/w_canvas)^2) over the
        footprint, i.e. o_k = sum(w_canvas * Q - Wb * num) / sum(Wb * w_canvas). Patches
        with too little overlap keep their own mean removed. Block k covers allocation rows
        ``ry[k]:ry[k] + h + 1`` and columns ``rx[k]:rx[k] + w + 1`` (read as views, not gathered).
        """
        m = Q.shape[0]
        h, w = self.patch_shape
        den = np.empty(m)
        num = np.empty(m)
        for k in range(m):
            foot = (slice(ry[k], ry[k] + h + 1), slice(rx[k], rx[k] + w + 1))
            wg = self.weight[foot]
            den[k] = np.einsum("ij,ij->", Wb[k], wg, dtype=np.float64)
            num[k] = (np.einsum("ij,ij->", wg, Q[k], dtype=np.float64)
                      - np.einsum("ij,ij->", Wb[k], self.num_phase[foot], dtype=np.float64))
        ok = den > self.overlap_min * Wb.reshape(m, -1).sum(axis=1, dtype=np.float64)
        if ok.any():
            o = np.where(ok, num / np.where(ok, den, 1.0), 0.0).astype(self.dtype)
            Q -= o[:, None, None] * Wb

    def _prepare(self, phase: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Windowed, offset-corrected phase (n, h, w), written into ``out``."""
        P = out
        np.multiply(phase, self._win, out=P, casting="unsafe")
        if self.offset != "none":
            mean = P.sum(axis=(1, 2)) / np.float32(self._win_sum)
            mean = np.where(np.isfinite(mean), mean, 0.0).astype(self.dtype)
            tmp = self._buf("tmp", P.shape)
            np.multiply(mean[:, None, None], self._win, out=tmp)
            P -= tmp
        return P

    @property
    def uses_kernel(self) -> bool:
        """Whether patches are splatted by the compiled kernel (see ``compiled``)."""
        return self.compiled and self.dtype == np.float32 and _splat.available()

    def _splat_compiled(self, phase: np.ndarray, amplitude: np.ndarray | None, ay: np.ndarray, ax: np.ndarray,
                        ry: list[int], rx: list[int]) -> None:
        h, w = self.patch_shape
        if self._pad is None:
            self._pad = np.zeros((4, h + 2, w + 2), np.float32)
            self._pad[1, 1:h + 1, 1:w + 1] = self._win
        f32 = np.float32
        chunk = max(1, int(self.overlap_chunk)) if self.offset == "overlap" else 0
        blocks = self._buf("blocks", (chunk, 4, h + 1, w + 1), f32) if chunk else None
        _splat.splat(np.ascontiguousarray(phase, f32),
                     None if amplitude is None else np.ascontiguousarray(amplitude, f32),
                     self._win, self._pad, self._win_sum, self.offset != "none",
                     np.ascontiguousarray(ay, np.float64), np.ascontiguousarray(ax, np.float64),
                     np.asarray(ry, np.int64), np.asarray(rx, np.int64), self.num_phase, self.weight,
                     None if amplitude is None else self.num_amp,
                     None if amplitude is None else self.weight_amp, self.num_im, chunk, self.overlap_min, blocks)

    def _splat_chunk(self, phase: np.ndarray | None, amplitude: np.ndarray | None, values: np.ndarray | None,
                     ay: np.ndarray, ax: np.ndarray, ry: list[int], rx: list[int]) -> None:
        """Splat accepted patches: window, offset and bilinear fold for all of them at once, then
        one slice-add per patch and plane at allocation row ``ry[k]``, column ``rx[k]``.

        Patches land in batch order, as with ``np.add.at``, so the sums are the same; for
        offset="overlap" each step of ``overlap_chunk`` patches is first matched to the canvas
        that the steps before it made. ``values`` (one per patch) stand for constant patches.
        """
        if phase is not None and self.uses_kernel:
            self._splat_compiled(phase, amplitude, ay, ax, ry, rx)
            return
        m = ay.shape[0]
        h, w = self.patch_shape
        Wb = self._weight_blocks(ay, ax)
        A = S = None  # the amplitude blocks; domain "complex": the sine blocks (Q holds the cosines)
        if phase is not None:
            # phase (complex: cosine and sine) and amplitude go through one bilinear fold, stacked
            both = amplitude is not None and self.num_amp is not None
            parts = 2 if self.domain == "complex" else 1
            Z = self._padded((parts + both) * m)
            if parts == 2:
                self._prepare_complex(phase, Z[:m, :h, :w], Z[m:2 * m, :h, :w])
            else:
                self._prepare(phase, Z[:m, :h, :w])
            if amplitude is not None and both:
                np.multiply(amplitude, self._win, out=Z[parts * m:, :h, :w], casting="unsafe")
            if parts + both > 1:
                ay, ax = np.tile(ay, parts + both), np.tile(ax, parts + both)
            QQ = self._bilinear_blocks(Z, ay, ax)
            Q = QQ[:m]
            S = QQ[m:2 * m] if parts == 2 else None
            A = QQ[parts * m:] if both else None
        else:
            assert values is not None
            Q = self._buf("Q", Wb.shape)
            np.multiply(Wb, values[:, None, None], out=Q)
        num, im, wt, amp, wamp = self.num_phase, self.num_im, self.weight, self.num_amp, self.weight_amp
        overlap = self.offset == "overlap"
        step = max(1, self.overlap_chunk) if overlap else m
        for s0 in range(0, m, step):
            s1 = min(s0 + step, m)
            if overlap and S is not None:
                self._reconcile_complex(Q[s0:s1], S[s0:s1], Wb[s0:s1], ry[s0:s1], rx[s0:s1])
            elif overlap:
                self._reconcile(Q[s0:s1], Wb[s0:s1], ry[s0:s1], rx[s0:s1])
            for k in range(s0, s1):
                y, x = ry[k], rx[k]
                foot = (slice(y, y + h + 1), slice(x, x + w + 1))
                num[foot] += Q[k]
                if S is not None and im is not None:
                    im[foot] += S[k]
                wt[foot] += Wb[k]
                if A is not None and amp is not None:
                    amp[foot] += A[k]
                    if wamp is not None:
                        wamp[foot] += Wb[k]

    def _prepare_complex(self, phase: np.ndarray, cos_out: np.ndarray, sin_out: np.ndarray) -> None:
        """Windowed phasors of ``phase`` (n, h, w), turned by each patch's window-weighted mean angle
        (offsets "mean" and "overlap"), as cosine and sine parts written into the two outputs."""
        ph = np.asarray(phase, np.float32)
        np.cos(ph, out=cos_out)
        np.sin(ph, out=sin_out)
        if self.offset != "none":  # times conj(m) / |m|, m the window-weighted mean phasor
            mr = np.einsum("kij,ij->k", cos_out, self._win, dtype=np.float64)
            mi = np.einsum("kij,ij->k", sin_out, self._win, dtype=np.float64)
            r = np.hypot(mr, mi)
            ok = r > 0
            tc = np.where(ok, mr / np.where(ok, r, 1.0), 1.0).astype(np.float32)[:, None, None]
            ts = np.where(ok, mi / np.where(ok, r, 1.0), 0.0).astype(np.float32)[:, None, None]
            c = cos_out * tc + sin_out * ts
            np.multiply(sin_out, tc, out=sin_out)
            sin_out -= cos_out * ts
            cos_out[...] = c
        cos_out *= self._win
        sin_out *= self._win

    def _reconcile_complex(self, Qc: np.ndarray, Qs: np.ndarray, Wb: np.ndarray, ry: list[int],
                           rx: list[int]) -> None:
        """offset="overlap" in the complex domain: turn each block by the angle of its overlap with the
        phasors under it, sum(conj(canvas) * block); patches with too little overlap keep their mean turn."""
        m = Qc.shape[0]
        h, w = self.patch_shape
        assert self.num_im is not None
        for k in range(m):
            foot = (slice(ry[k], ry[k] + h + 1), slice(rx[k], rx[k] + w + 1))
            den = float(np.einsum("ij,ij->", Wb[k], self.weight[foot], dtype=np.float64))
            if den <= self.overlap_min * float(Wb[k].sum(dtype=np.float64)):
                continue
            C, S = self.num_phase[foot], self.num_im[foot]
            zr = np.einsum("ij,ij->", C, Qc[k], dtype=np.float64) + np.einsum("ij,ij->", S, Qs[k], dtype=np.float64)
            zi = np.einsum("ij,ij->", C, Qs[k], dtype=np.float64) - np.einsum("ij,ij->", S, Qc[k], dtype=np.float64)
            r = float(np.hypot(zr, zi))
            if r <= 0:
                continue
            c, s = np.float32(zr / r), np.float32(zi / r)  # the block times exp(-i angle)
            qc = Qc[k].copy()
            Qc[k] = c * qc + s * Qs[k]
            Qs[k] = c * Qs[k] - s * qc

    def add(self, phase: np.ndarray, positions_m: np.ndarray,
            amplitude: np.ndarray | None = None) -> int:
        """Splat a batch of patches ``phase`` (n, h, w) at ``positions_m`` (n, 2) (y, x).

        ``amplitude`` (n, h, w) is optional. Returns how many patches were accepted.
        """
        phase = np.asarray(phase)
        pos = np.asarray(positions_m, dtype=np.float64)
        if phase.ndim == 2:
            phase = phase[None]
            if amplitude is not None:
                amplitude = np.asarray(amplitude)[None]
        if pos.ndim == 1:
            pos = pos[None]
        n = phase.shape[0]
        if phase.shape[1:] != self.patch_shape:
            raise ValueError(f"patch shape {phase.shape[1:]} != {self.patch_shape}")
        if pos.shape != (n, 2):
            raise ValueError(f"positions shape {pos.shape} != ({n}, 2)")
        if amplitude is not None:
            amplitude = np.asarray(amplitude)
            if amplitude.shape != phase.shape:
                raise ValueError(f"amplitude shape {amplitude.shape} != {phase.shape}")
        if n == 0:
            return 0
        # one cheap reduction finds patches holding NaN/inf (inf - inf is NaN too)
        ok_data = np.isfinite(phase.sum(axis=(1, 2)))
        if amplitude is not None:
            ok_data &= np.isfinite(amplitude.sum(axis=(1, 2)))
        return self._add(pos, ok_data, phase, amplitude, None)

    def add_values(self, values: np.ndarray, positions_m: np.ndarray) -> int:
        """Splat one value per patch, spread over its window: a map of a per-frame figure.

        The same as :meth:`add` with constant patches ``values[k]`` (within float rounding), at
        the cost of the weights alone; only for ``offset="none"`` (an offset would remove the
        constant). Non-finite values are rejected like non-finite data. Returns how many were accepted.
        """
        if self.offset != "none":
            raise ValueError(f"add_values needs offset='none', not {self.offset!r}")
        vals = np.asarray(values, dtype=self.dtype).reshape(-1)
        pos = np.asarray(positions_m, dtype=np.float64).reshape(-1, 2)
        if pos.shape[0] != vals.size:
            raise ValueError(f"positions shape {pos.shape} != ({vals.size}, 2)")
        if vals.size == 0:
            return 0
        return self._add(pos, np.isfinite(vals), None, None, vals)

    def _add(self, pos: np.ndarray, ok_data: np.ndarray, phase: np.ndarray | None,
             amplitude: np.ndarray | None, values: np.ndarray | None) -> int:
        """Accept or reject the patches (positions, data), make room and splat the accepted ones."""
        n = pos.shape[0]
        h, w = self.patch_shape
        finite = np.isfinite(pos[:, 0]) & np.isfinite(pos[:, 1])
        bad_nan = ~(finite & ok_data)
        safe = np.where(finite[:, None], pos, 0.0)
        fy, fx, ay, ax = self._corners(safe)
        keep = ~bad_nan
        if self.extent_m is not None:
            ymin, ymax, xmin, xmax = self.extent_m
            tol = 1e-9 * self.pixel_m
            inside = ((safe[:, 0] >= ymin - tol) & (safe[:, 0] <= ymax + tol)
                      & (safe[:, 1] >= xmin - tol) & (safe[:, 1] <= xmax + tol))
            bad_range = keep & ~inside
            keep &= inside
        else:
            # far-off positions would overflow the integer pixel arithmetic
            sane = (np.abs(fy) < 2**40) & (np.abs(fx) < 2**40)
            k2 = self._accept_growing(fy, fx, keep & sane)
            bad_range = keep & ~k2
            keep = k2
        n_nan = int(bad_nan.sum())
        n_range = int(bad_range.sum())
        if n_nan:
            self.counts["rejected_nan"] += n_nan
            self.last_error = f"{n_nan} patch(es) with non-finite position or data skipped"
        if n_range:
            self.counts["rejected_range"] += n_range
            k = int(np.argmax(bad_range))
            self.last_error = (f"{n_range} patch(es) out of range skipped, e.g. position "
                               f"(y, x) = ({pos[k, 0]:.4g}, {pos[k, 1]:.4g}) m")
        n_ok = int(keep.sum())
        if n_ok == 0:
            return 0
        sel = np.flatnonzero(keep) if n_ok < n else None
        if sel is not None:
            fy, fx, ay, ax = fy[sel], fx[sel], ay[sel], ax[sel]

        box = (int(fy.min()), int(fy.max()) + h + 1, int(fx.min()), int(fx.max()) + w + 1)
        c = self._content
        u = box if c is None else (min(box[0], c[0]), max(box[1], c[1]),
                                   min(box[2], c[2]), max(box[3], c[3]))
        if self.extent_m is None:
            self._grow(u)
        # (fixed extent: the canvas is padded by half a patch, so every accepted
        # footprint fits; mosaic() exposes only the extent)
        self._content = list(u)

        if amplitude is None and self.num_amp is not None and self.weight_amp is None:
            # amplitude weight diverges from the phase weight from now on
            self.weight_amp = self.weight.copy()
        if amplitude is not None and self.num_amp is None:
            self.num_amp = np.zeros_like(self.num_phase)
            if self._noamp_seen:  # earlier patches had no amplitude
                self.weight_amp = np.zeros_like(self.weight)

        rows = sel
        ry = (fy - self._oy).tolist()
        rx = (fx - self._ox).tolist()
        for k0 in range(0, n_ok, self.chunk):
            k1 = min(k0 + self.chunk, n_ok)
            take = slice(k0, k1) if rows is None else rows[k0:k1]
            self._splat_chunk(None if phase is None else phase[take],
                              None if amplitude is None else amplitude[take],
                              None if values is None else values[take],
                              ay[k0:k1], ax[k0:k1], ry[k0:k1], rx[k0:k1])
        for key, d in self._dirty.items():
            self._dirty[key] = list(box) if d is None else [min(box[0], d[0]), max(box[1], d[1]),
                                                            min(box[2], d[2]), max(box[3], d[3])]
        if amplitude is None:
            self._noamp_seen = True

        self.n_patches += n_ok
        self.counts["stitched"] += n_ok
        return n_ok

    # ------------------------------------------------------------------ output
    def _view(self, arr: np.ndarray) -> np.ndarray:
        y0, y1, x0, x1 = self._exposed()
        return arr[y0 - self._oy:y1 - self._oy, x0 - self._ox:x1 - self._ox]

    def _outbuf(self, reuse: bool, key: str, shape, dtype) -> np.ndarray:
        if not reuse:
            return np.empty(shape, dtype)
        name = f"out{self._flip}:{key}"
        b = self._outs.get(name)
        if b is None or b.shape != tuple(shape) or b.dtype != np.dtype(dtype):
            b = np.empty(shape, dtype)
            self._outs[name] = b
        return b

    def mosaic(self, reuse: bool = False) -> MosaicImage:
        """Current mosaic as new float32 arrays (the accumulators are never copied).

        ``reuse=True`` writes into two alternating sets of buffers kept by the stitcher
        (no fresh 4096x4096 allocations at display rate); the arrays returned then stay
        valid until the second-next ``mosaic(reuse=True)`` call.
        """
        if reuse:
            self._flip ^= 1
        shape = self.canvas_shape
        wv = self._view(self.weight)
        wmax = float(wv.max()) if wv.size else 0.0
        thr = self.min_weight * wmax
        mask = self._outbuf(reuse, "mask", shape, bool)
        np.greater(wv, thr, out=mask)
        if wmax <= 0:
            mask[...] = False
        # denominator max(weight, thr): exact num/weight on the mask, fading smoothly
        # to 0 (num ~ weight * phase) below the threshold, exactly 0 where weight == 0
        floor = np.float32(thr if thr > 0 else 1.0)
        phase = self._outbuf(reuse, "phase", shape, np.float32)
        if self.num_im is not None:
            complex_phase(self._view(self.num_phase), self._view(self.num_im), wv, floor, phase)
        else:
            np.maximum(wv, floor, out=phase)
            np.divide(self._view(self.num_phase), phase, out=phase)
        coverage = self._outbuf(reuse, "coverage", shape, np.float32)
        np.multiply(wv, np.float32(1.0 / wmax) if wmax > 0 else np.float32(0), out=coverage)
        amp = None
        if self.num_amp is not None:
            amp = self._outbuf(reuse, "amplitude", shape, np.float32)
            wa = wv if self.weight_amp is None else self._view(self.weight_amp)
            np.maximum(wa, floor, out=amp)
            np.divide(self._view(self.num_amp), amp, out=amp)
        return MosaicImage(phase=phase, amplitude=amp, coverage=coverage, mask=mask,
                           origin_m=self.origin_m, pixel_m=self.pixel_m,
                           n_patches=self.n_patches)

    def flashlight_patch(self, phase_patch: np.ndarray, position_m) -> tuple[np.ndarray, tuple[int, int]]:
        """The patch resampled onto the mosaic grid: (block, (row0, col0)).

        ``block`` is (h+1, w+1) float32 with NaN where the patch has no weight;
        (row0, col0) is its top-left in the current mosaic's pixel coordinates (may be
        negative or beyond the mosaic). Offset handling follows ``offset``.
        """
        ph = np.asarray(phase_patch)
        pos = np.asarray(position_m, dtype=np.float64).reshape(1, 2)
        if ph.shape != self.patch_shape:
            raise ValueError(f"patch shape {ph.shape} != {self.patch_shape}")
        if not np.isfinite(pos).all():
            raise ValueError("non-finite position")
        h, w = self.patch_shape
        cplx = self.domain == "complex"
        Z = self._padded(2 if cplx else 1)
        if cplx:
            self._prepare_complex(ph[None], Z[:1, :h, :w], Z[1:, :h, :w])
        else:
            self._prepare(ph[None], Z[:, :h, :w])
        fy, fx, ay, ax = self._corners(pos.copy())
        Q = self._bilinear_blocks(Z, np.tile(ay, 2) if cplx else ay, np.tile(ax, 2) if cplx else ax)
        Wb = self._weight_blocks(ay, ax)
        AH, AW = self.num_phase.shape
        ry, rx = int(fy[0]) - self._oy, int(fx[0]) - self._ox
        if (self.offset == "overlap" and ry >= 0 and rx >= 0
                and ry + h + 1 <= AH and rx + w + 1 <= AW):
            if cplx:
                self._reconcile_complex(Q[:1], Q[1:], Wb, [ry], [rx])
            else:
                self._reconcile(Q, Wb, [ry], [rx])
        wt = Wb[0].copy()
        thr = self.min_weight * float(wt.max())
        block = np.full(wt.shape, np.nan, np.float32)
        if cplx:
            np.arctan2(Q[1], Q[0], out=block, where=wt > thr)
        else:
            np.divide(Q[0].copy(), wt, out=block, where=wt > thr)
        y0, _, x0, _ = self._exposed()
        if self.extent_m is None and self._content is None:
            y0, x0 = int(fy[0]), int(fx[0])
        return block, (int(fy[0]) - y0, int(fx[0]) - x0)

    def flashlight(self, phase_patch: np.ndarray, position_m) -> np.ndarray:
        """The latest patch alone on a NaN canvas with the current mosaic's geometry.

        Same shape and ``origin_m`` as :meth:`mosaic` (before any patch was added the
        geometry is the patch footprint itself). The parts outside are dropped.
        """
        block, (r0, c0) = self.flashlight_patch(phase_patch, position_m)
        shape = self.canvas_shape
        if self.extent_m is None and self._content is None:
            return block
        out = np.full(shape, np.nan, np.float32)
        bh, bw = block.shape
        ry0, ry1 = max(r0, 0), min(r0 + bh, shape[0])
        rx0, rx1 = max(c0, 0), min(c0 + bw, shape[1])
        if ry1 > ry0 and rx1 > rx0:
            out[ry0:ry1, rx0:rx1] = block[ry0 - r0:ry1 - r0, rx0 - c0:rx1 - c0]
        return out
