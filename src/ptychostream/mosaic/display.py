"""A display-sized mosaic kept up to date where patches land, so a publish costs what the display does.

:class:`DisplayView` keeps the sums of a :class:`~ptychostream.mosaic.stitch.Stitcher`'s planes
(window-weighted phase, weight, amplitude) over square bins of ``binning`` x ``binning`` canvas
pixels, the smallest integer binning that brings the mosaic's longer side to at most
``max_side`` (:func:`binning_for`; ``0``: no binning, the full canvas). Bins sit on the global pixel grid (bin ``i``
holds global pixels ``[i * b, (i + 1) * b)``), so a canvas that grows never moves them; an
update recomputes only the bins under the box the stitcher reports as changed
(:meth:`Stitcher.take_dirty`, one box per view). The image is then formed from the bins alone, with the same
rules as :meth:`Stitcher.mosaic` (``num / max(weight, threshold)``, the mask, the coverage),
at a cost set by ``max_side``, not by the canvas. With ``binning`` 1 it equals ``mosaic()``
(and reads the stitcher's planes in place: no copy of the canvas is kept).

A binned pixel is the weight-averaged value of its canvas pixels (edge bins average only the
pixels inside the mosaic); ``origin_m`` is the centre of bin (0, 0) of a full bin, and
``pixel_m`` is ``binning`` times the canvas pixel.
"""

from __future__ import annotations

import numpy as np

from ptychostream.mosaic.stitch import MosaicImage, Stitcher, complex_phase

__all__ = ["DisplayView", "binning_for"]

Box = tuple[int, int, int, int]


def binning_for(shape: tuple[int, int], max_side: int) -> int:
    """The smallest integer binning that fits ``shape`` into ``max_side`` pixels (1 when max_side <= 0).

    Bins sit on the global grid, so a binned side may need one bin more than ``side / b``: the
    binning is chosen for ``max_side - 1`` bins.
    """
    side = max(int(shape[0]), int(shape[1]))
    if max_side <= 0 or side <= max_side:
        return 1
    return -(-side // max(1, int(max_side) - 1))


def _bin_sums(a: np.ndarray, start: tuple[int, int], b: int, out: np.ndarray) -> None:
    """Write into ``out`` the sums of ``a`` (whose pixel (0, 0) is global pixel ``start``) over the
    ``b`` x ``b`` bins of the global grid that it touches (``out``: one element per such bin)."""
    if b == 1:
        out[...] = a
        return
    oy, ox = start[0] % b, start[1] % b
    h, w = a.shape
    ny, nx = out.shape
    if oy == 0 and ox == 0 and h == ny * b and w == nx * b:
        np.sum(a.reshape(ny, b, nx, b), axis=(1, 3), out=out)
        return
    pad = np.zeros((ny * b, nx * b), a.dtype)  # edge bins only partly inside
    pad[oy:oy + h, ox:ox + w] = a
    np.sum(pad.reshape(ny, b, nx, b), axis=(1, 3), out=out)


def _intersect(a: Box, b: Box) -> Box | None:
    box = (max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[1] and box[2] < box[3] else None


class DisplayView:
    """The binned sums of a stitcher's planes, updated where it changed.

    ``nan_outside``: pixels outside the mask read NaN instead of fading to 0 (a map of a figure
    where 0 is a valid value, such as the consistency map).
    """

    PLANES = ("num_phase", "weight", "num_amp", "weight_amp", "num_im")

    def __init__(self, max_side: int = 1024, nan_outside: bool = False) -> None:
        self.max_side = int(max_side)
        self.nan_outside = nan_outside
        self.binning = 1
        self._key: tuple | None = None  # what the bins were built for
        self._bins: dict[str, np.ndarray] = {}
        self._bbox: Box = (0, 0, 0, 0)  # global bin indices [y0, y1) x [x0, x1) the bins cover
        self._outs: dict[str, np.ndarray] = {}
        self._flip = 0

    # ------------------------------------------------------------------ bins
    def _rebin(self, st: Stitcher, region: Box, bounds: Box) -> None:
        """Recompute the bins over the global pixel box ``region`` (clipped to ``bounds``)."""
        b = self.binning
        r = (region[0] // b * b, -(-region[1] // b) * b, region[2] // b * b, -(-region[3] // b) * b)
        inner = _intersect(r, bounds)
        by0, by1, bx0, bx1 = r[0] // b, r[1] // b, r[2] // b, r[3] // b
        dst = (slice(by0 - self._bbox[0], by1 - self._bbox[0]), slice(bx0 - self._bbox[2], bx1 - self._bbox[2]))
        for name in self._bins:
            self._bins[name][dst] = 0
        if inner is None:
            return
        planes = st.planes(inner)
        iy0, iy1 = inner[0] // b - by0, -(-inner[1] // b) - by0
        ix0, ix1 = inner[2] // b - bx0, -(-inner[3] // b) - bx0
        for name, plane in zip(self.PLANES, planes):
            if plane is not None and name in self._bins:
                _bin_sums(plane, (inner[0], inner[2]), b, self._bins[name][dst][iy0:iy1, ix0:ix1])

    def _cover(self, bbox: Box, names: tuple[str, ...], dtype: np.dtype) -> None:
        """Reallocate the bins to cover ``bbox`` (global bin indices), keeping what overlaps."""
        old, obox = self._bins, self._bbox
        shape = (bbox[1] - bbox[0], bbox[3] - bbox[2])
        new = {name: np.zeros(shape, dtype) for name in names}
        keep = _intersect(bbox, obox)
        if keep is not None:
            for name in names:
                if name in old:
                    new[name][keep[0] - bbox[0]:keep[1] - bbox[0], keep[2] - bbox[2]:keep[3] - bbox[2]] = \
                        old[name][keep[0] - obox[0]:keep[1] - obox[0], keep[2] - obox[2]:keep[3] - obox[2]]
        self._bins, self._bbox = new, bbox

    def update(self, st: Stitcher, box: Box | None = None) -> None:
        """Bring the bins up to date with ``st`` over its exposed mosaic, or over the global pixel box
        ``box`` (another stitcher's mosaic, so that two images share one geometry)."""
        ebox = st.exposed_box if box is None else box
        shape = (ebox[1] - ebox[0], ebox[3] - ebox[2])
        b = binning_for(shape, self.max_side)
        names = tuple(n for n, p in zip(self.PLANES, st.planes(st.exposed_box)) if p is not None)
        key = (st.generation, b, names)
        bbox = (ebox[0] // b, -(-ebox[1] // b), ebox[2] // b, -(-ebox[3] // b))
        bounds = _intersect(ebox, st.exposed_box)
        dirty = st.take_dirty(self)
        if b == 1 and ebox == st.exposed_box:  # unbinned: the stitcher's own planes, no copy
            self._key, self.binning, self._bbox = None, 1, ebox
            self._bins = {name: p for name, p in zip(self.PLANES, st.planes(ebox)) if p is not None}
            return
        if key != self._key:  # a new stitcher, a reset, another binning or another set of planes
            self._key, self.binning, self._bins, self._bbox = key, b, {}, (0, 0, 0, 0)
            self._cover(bbox, names, st.dtype)
            if bounds is not None:
                self._rebin(st, bounds, bounds)
            return
        if bbox != self._bbox:
            self._cover(bbox, names, st.dtype)
        if dirty is not None and bounds is not None:
            region = _intersect(dirty, bounds)
            if region is not None:
                self._rebin(st, region, bounds)

    # ------------------------------------------------------------------ images
    def _outbuf(self, key: str, shape: tuple[int, int], dtype) -> np.ndarray:
        name = f"{self._flip}:{key}"
        out = self._outs.get(name)
        if out is None or out.shape != shape or out.dtype != np.dtype(dtype):
            out = self._outs[name] = np.empty(shape, dtype)
        return out

    def image(self, st: Stitcher, box: Box | None = None) -> MosaicImage:
        """The display-sized mosaic of ``st`` (see :meth:`update` for ``box``).

        The arrays are the view's own, in two alternating sets: they stay valid until the
        second-next call.
        """
        self.update(st, box)
        self._flip ^= 1
        wv = self._bins["weight"]
        shape = (int(wv.shape[0]), int(wv.shape[1]))
        wmax = float(wv.max()) if wv.size else 0.0
        thr = st.min_weight * wmax
        mask = self._outbuf("mask", shape, bool)
        np.greater(wv, thr, out=mask)
        if wmax <= 0:
            mask[...] = False
        floor = np.float32(thr if thr > 0 else 1.0)
        phase = self._outbuf("phase", shape, np.float32)
        if "num_im" in self._bins:  # domain "complex": the angle of the binned phasor sums
            complex_phase(self._bins["num_phase"], self._bins["num_im"], wv, floor, phase)
        else:
            np.maximum(wv, floor, out=phase)
            np.divide(self._bins["num_phase"], phase, out=phase)
        if self.nan_outside:
            phase[~mask] = np.nan
        coverage = self._outbuf("coverage", shape, np.float32)
        np.multiply(wv, np.float32(1.0 / wmax) if wmax > 0 else np.float32(0), out=coverage)
        amp = None
        if "num_amp" in self._bins:
            amp = self._outbuf("amplitude", shape, np.float32)
            wa = self._bins.get("weight_amp", wv)
            np.maximum(wa, floor, out=amp)
            np.divide(self._bins["num_amp"], amp, out=amp)
        b = self.binning
        centre = (b - 1) / 2
        origin = ((self._bbox[0] * b + centre) * st.pixel_m, (self._bbox[2] * b + centre) * st.pixel_m)
        return MosaicImage(phase=phase, amplitude=amp, coverage=coverage, mask=mask, origin_m=origin,
                           pixel_m=st.pixel_m * b, n_patches=st.n_patches, binning=b)

    def flashlight(self, st: Stitcher, phase_patch: np.ndarray, position_m) -> np.ndarray:
        """The latest patch alone on a NaN image with the geometry of the last :meth:`image`
        (binned like it: the mean of the patch's pixels in each bin)."""
        block, (r0, c0) = st.flashlight_patch(phase_patch, position_m)
        b = self.binning
        shape = (self._bbox[1] - self._bbox[0], self._bbox[3] - self._bbox[2])
        out = self._outbuf("flashlight", shape, np.float32)
        out.fill(np.nan)
        ey0, _, ex0, _ = st.exposed_box
        g = (ey0 + r0, ey0 + r0 + block.shape[0], ex0 + c0, ex0 + c0 + block.shape[1])  # global px
        bounds = (self._bbox[0] * b, self._bbox[1] * b, self._bbox[2] * b, self._bbox[3] * b)
        inner = _intersect(g, _intersect(bounds, st.exposed_box) or (0, 0, 0, 0))
        if inner is None:
            return out
        sub = block[inner[0] - g[0]:inner[1] - g[0], inner[2] - g[2]:inner[3] - g[2]]
        seen = np.isfinite(sub)
        by0, by1 = inner[0] // b - self._bbox[0], -(-inner[1] // b) - self._bbox[0]
        bx0, bx1 = inner[2] // b - self._bbox[2], -(-inner[3] // b) - self._bbox[2]
        total = np.empty((by1 - by0, bx1 - bx0), np.float32)
        count = np.empty_like(total)
        _bin_sums(np.where(seen, sub, np.float32(0)), (inner[0], inner[2]), b, total)
        _bin_sums(seen.astype(np.float32), (inner[0], inner[2]), b, count)
        np.divide(total, count, out=out[by0:by1, bx0:bx1], where=count > 0)
        return out
