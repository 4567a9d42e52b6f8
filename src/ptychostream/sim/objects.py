"""Synthetic and file-based test objects (complex transmission functions).

Conventions: an object is a complex64 (H, W) array ``A·exp(iφ)`` with amplitude ``A ≤ 1``; its
pixel is the real-space pixel of the geometry (``Geometry.pixel_m``) and its centre, where scan
position (0, 0) falls, is pixel (H // 2, W // 2).  Rows are y, columns are x.

Every synthetic kind first draws a thickness map t ∈ [0, 1] of one material and turns it into a
transmission with :func:`material`: the phase delay grows with t and the amplitude follows the
same material, ``A = exp(-φ_delay / delta_beta)`` (``delta_beta`` = δ/β, default 20: weak
absorption; ``None`` for a pure phase object).  The phase is centred: φ = max_phase·(1 − 2t),
i.e. within ±``max_phase`` (default 1 rad).  Kinds (:data:`OBJECT_KINDS`):

* ``"etched"``: smooth-edged random rectangles, ellipses and lines, two etch depths;
* ``"siemens"``: a Siemens star (``spokes`` spokes) filling the object;
* ``"digits"``: seven-segment digits in rows plus random lines (``text=`` for fixed digits);
* ``"dead_leaves"``: occluding soft discs, radii ∝ r⁻³ (scale-invariant);
* ``"blurred_noise"``: Gaussian-filtered white noise (``sigma_px``);
* ``"procedural"``: Voronoi cells with soft cell walls plus random sinusoids;
* ``"circuit"``: an integrated-circuit-like layout on a routing grid: horizontal and vertical
  wires of a few widths on two etch depths, vias and pads (``pitch_px``, ``density``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.arrays import first_layer
from ptychostream.files.hdf5 import dataset as h5_dataset
from ptychostream.files.hdf5 import is_hdf5
from ptychostream.files.paths import split_dataset_path
from ptychostream.files.product import OBJECT

__all__ = ["OBJECT_KINDS", "fit_object", "load_object", "make_object", "material", "seven_segment_mask"]

OBJECT_KINDS: tuple[str, ...] = ("etched", "siemens", "digits", "dead_leaves", "blurred_noise", "procedural",
                                  "circuit")

#: segments (y0, x0, y1, x1) of a seven-segment digit in a unit box of height 1 and width 0.55
_W = 0.55
_SEGMENTS = {
    "a": (0.0, 0.0, 0.0, _W), "b": (0.0, _W, 0.5, _W), "c": (0.5, _W, 1.0, _W),
    "d": (1.0, 0.0, 1.0, _W), "e": (0.5, 0.0, 1.0, 0.0), "f": (0.0, 0.0, 0.5, 0.0),
    "g": (0.5, 0.0, 0.5, _W),
}
_DIGITS = {
    "0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc",
    "5": "afgcd", "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg", "-": "g", " ": "",
}


def material(thickness: np.ndarray, max_phase: float = 1.0, delta_beta: float | None = 20.0) -> np.ndarray:
    """Complex64 transmission of one material from a thickness map t ∈ [0, 1].

    φ = max_phase·(1 − 2t) (so |φ| ≤ max_phase) and A = exp(−2·max_phase·t / delta_beta).
    """
    t = np.clip(np.asarray(thickness, dtype=np.float64), 0.0, 1.0)
    delay = 2.0 * max_phase * t
    amp = np.ones_like(t) if delta_beta is None or not np.isfinite(delta_beta) else np.exp(-delay / delta_beta)
    return (amp * np.exp(1j * (max_phase - delay))).astype(np.complex64)


# --------------------------------------------------------------------------- drawing helpers
def _edge(d: np.ndarray, soft: float) -> np.ndarray:
    """Coverage from a signed distance (negative inside) with a soft edge of about ``soft`` px."""
    return 0.5 * (1.0 - np.tanh(d / soft))


def _paint(canvas: np.ndarray, cy: float, cx: float, reach: float, value: float,
           sdf: Callable[[np.ndarray, np.ndarray], np.ndarray], soft: float) -> None:
    """Union (maximum) of ``value × coverage`` into the canvas over the shape's bounding box."""
    h, w = canvas.shape
    y0, y1 = max(int(cy - reach - 3 * soft - 1), 0), min(int(cy + reach + 3 * soft + 2), h)
    x0, x1 = max(int(cx - reach - 3 * soft - 1), 0), min(int(cx + reach + 3 * soft + 2), w)
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
    region = canvas[y0:y1, x0:x1]
    np.maximum(region, value * _edge(sdf(yy, xx), soft), out=region)


def _capsule(canvas: np.ndarray, y0: float, x0: float, y1: float, x1: float, half_width: float,
             value: float = 1.0, soft: float = 0.75) -> None:
    """A line segment of half-width ``half_width`` with round caps."""
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    dy, dx = y1 - y0, x1 - x0
    length2 = dy * dy + dx * dx

    def sdf(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        py, px = yy + cy - y0, xx + cx - x0
        s = np.clip((py * dy + px * dx) / length2, 0.0, 1.0) if length2 > 0 else 0.0
        return np.hypot(py - s * dy, px - s * dx) - half_width

    _paint(canvas, cy, cx, np.sqrt(length2) / 2 + half_width, value, sdf, soft)


def _box(canvas: np.ndarray, cy: float, cx: float, a: float, b: float, angle: float,
         value: float = 1.0, soft: float = 0.75) -> None:
    """A rotated rectangle with half-sides a (along the angle) and b."""
    c, s = np.cos(angle), np.sin(angle)

    def sdf(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        u, v = xx * c + yy * s, -xx * s + yy * c
        return np.maximum(np.abs(u) - a, np.abs(v) - b)

    _paint(canvas, cy, cx, np.hypot(a, b), value, sdf, soft)


def _ellipse(canvas: np.ndarray, cy: float, cx: float, a: float, b: float, angle: float,
             value: float = 1.0, soft: float = 0.75) -> None:
    c, s = np.cos(angle), np.sin(angle)

    def sdf(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        u, v = xx * c + yy * s, -xx * s + yy * c
        return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)

    _paint(canvas, cy, cx, max(a, b), value, sdf, soft)


def seven_segment_mask(text: str, height: int = 32, thickness: float | None = None,
                       spacing: float = 0.3, margin: int = 2) -> np.ndarray:
    """Render ``text`` (digits, '-' and spaces) as seven-segment glyphs: float array in [0, 1]."""
    bad = sorted(set(text) - set(_DIGITS))
    if bad:
        raise ValueError(f"seven-segment text supports digits, '-' and ' ' only, got {bad}")
    th = 0.12 * height if thickness is None else float(thickness)
    advance = (_W + spacing) * height
    canvas = np.zeros((int(height + 2 * margin + 2 * th + 1),
                       int(len(text) * advance + 2 * margin + 2 * th + 1)), dtype=np.float64)
    _draw_text(canvas, text, margin + th, margin + th, height, th, advance)
    return canvas


def _draw_text(canvas: np.ndarray, text: str, top: float, left: float, height: float,
               th: float, advance: float) -> None:
    gap = 0.6 * th / height  # shorten each segment so neighbours stay apart, as on a display
    for k, ch in enumerate(text):
        x_off = left + k * advance
        for seg in _DIGITS[ch]:
            y0, x0, y1, x1 = _SEGMENTS[seg]
            if y0 == y1:
                x0, x1 = x0 + gap, x1 - gap
            else:
                y0, y1 = y0 + gap, y1 - gap
            _capsule(canvas, top + y0 * height, x_off + x0 * height, top + y1 * height,
                     x_off + x1 * height, th / 2)


# --------------------------------------------------------------------------- kinds
def _etched(shape: tuple[int, int], rng: np.random.Generator, *, scale: float = 1.0,
            density: float = 1.0) -> np.ndarray:
    h, w = shape
    t = np.zeros(shape)
    count = max(4, int(density * h * w / (40.0 * scale) ** 2))
    kinds = rng.choice(3, size=count, p=[0.45, 0.3, 0.25])
    for kind in kinds:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        depth = rng.choice([0.5, 1.0])
        angle = rng.uniform(0, np.pi)
        if kind == 0:
            a, b = rng.uniform(3, 20, size=2) * scale
            _box(t, cy, cx, a, b, angle, depth)
        elif kind == 1:
            a, b = rng.uniform(3, 14, size=2) * scale
            _ellipse(t, cy, cx, a, b, angle, depth)
        else:
            length = rng.uniform(15, 80) * scale
            dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
            _capsule(t, cy - dy, cx - dx, cy + dy, cx + dx, rng.uniform(0.8, 3.0) * scale, depth)
    return t


def _siemens(shape: tuple[int, int], rng: np.random.Generator, *, spokes: int = 36,
             radius: float | None = None, soft: float = 0.75) -> np.ndarray:
    h, w = shape
    radius = 0.48 * min(h, w) if radius is None else float(radius)
    yy = np.arange(h)[:, None] - h // 2
    xx = np.arange(w)[None, :] - w // 2
    r = np.hypot(yy, xx)
    theta = np.arctan2(yy, xx)
    # distance (px) to the nearest spoke edge, signed: sin(n·θ) > 0 inside a spoke
    d = r * np.sin(spokes * theta) / spokes
    t = _edge(-d, soft)
    inner = spokes / np.pi  # spokes narrower than ~1 px are blended to grey
    t = np.where(r < inner, 0.5, t)
    return t * _edge(r - radius, soft)


def _digits(shape: tuple[int, int], rng: np.random.Generator, *, text: str | None = None,
            height: float | None = None, lines: float = 1.0) -> np.ndarray:
    h, w = shape
    t = np.zeros(shape)
    height = float(rng.uniform(20, 40)) if height is None else float(height)
    th = 0.14 * height
    advance = (_W + 0.35) * height
    row_pitch = 1.6 * height
    n_rows = max(1, int((h - th) // row_pitch))
    per_row = max(1, int((w - th) // advance))
    top0 = (h - (n_rows - 1) * row_pitch - height) / 2
    left0 = (w - (per_row - 1) * advance - _W * height) / 2
    for k in range(n_rows):
        if text is not None:
            row = text
            left = (w - (len(text) - 1) * advance - _W * height) / 2
            top = (h - height) / 2
        else:
            row = "".join(rng.choice(list("0123456789    "), size=per_row))
            left, top = left0, top0 + k * row_pitch
        _draw_text(t, row, top, left, height, th, advance)
        if text is not None:
            break
    n_lines = int(lines * h * w / 80.0**2)
    for _ in range(n_lines):
        y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
        angle, length = rng.uniform(0, np.pi), rng.uniform(20, 120)
        _capsule(t, y0, x0, y0 + np.sin(angle) * length, x0 + np.cos(angle) * length,
                 rng.uniform(0.6, 2.0), float(rng.choice([0.5, 1.0])))
    return t


def _dead_leaves(shape: tuple[int, int], rng: np.random.Generator, *, rmin: float = 2.0,
                 rmax: float | None = None, soft: float = 0.75) -> np.ndarray:
    h, w = shape
    rmax = min(64.0, 0.25 * min(h, w)) if rmax is None else float(rmax)
    rmax = max(rmax, rmin * 1.01)
    value = np.zeros(shape)
    cover = np.zeros(shape)  # front-to-back compositing: later leaves lie underneath
    max_leaves = 400 + (h * w) // 30
    drawn = 0
    while drawn < max_leaves:
        n = 256
        u = rng.uniform(size=n)
        radii = (rmin**-2 - u * (rmin**-2 - rmax**-2)) ** -0.5  # p(r) ∝ r⁻³
        cys, cxs, vals = rng.uniform(-rmax, h + rmax, n), rng.uniform(-rmax, w + rmax, n), rng.uniform(size=n)
        for r, cy, cx, v in zip(radii, cys, cxs, vals):
            y0, y1 = max(int(cy - r - 2), 0), min(int(cy + r + 3), h)
            x0, x1 = max(int(cx - r - 2), 0), min(int(cx + r + 3), w)
            if y0 >= y1 or x0 >= x1:
                continue
            c = cover[y0:y1, x0:x1]
            if c.min() > 0.999:
                continue
            yy = np.arange(y0, y1)[:, None] - cy
            xx = np.arange(x0, x1)[None, :] - cx
            alpha = _edge(np.hypot(yy, xx) - r, soft) * (1.0 - c)
            value[y0:y1, x0:x1] += alpha * v
            c += alpha
        drawn += n
        if cover.min() > 0.999:
            break
    return value + (1.0 - cover) * 0.5


def _blurred_noise(shape: tuple[int, int], rng: np.random.Generator, *, sigma_px: float = 4.0) -> np.ndarray:
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * np.pi**2 * sigma_px**2 * (fy**2 + fx**2))
    smooth = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape)
    return _rescale(smooth)


def _rescale(a: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    p0, p1 = np.percentile(a, [lo, hi])
    return np.clip((a - p0) / (p1 - p0), 0.0, 1.0) if p1 > p0 else np.zeros_like(a)


def _procedural(shape: tuple[int, int], rng: np.random.Generator, *, cell_px: float = 24.0,
                waves: int = 6) -> np.ndarray:
    h, w = shape
    gy, gx = int(np.ceil(h / cell_px)) + 2, int(np.ceil(w / cell_px)) + 2
    seeds = rng.uniform(size=(gy, gx, 2))  # one jittered seed per grid cell, padded by 1
    cell_value = rng.uniform(size=(gy, gx))
    yy = np.arange(h, dtype=np.float64)[:, None] / cell_px
    xx = np.arange(w, dtype=np.float64)[None, :] / cell_px
    iy, ix = np.floor(yy).astype(int) + 1, np.floor(xx).astype(int) + 1
    d1 = np.full(shape, np.inf)
    d2 = np.full(shape, np.inf)
    val = np.zeros(shape)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            cy, cx = iy + dy, ix + dx
            sy = cy - 1 + seeds[cy, cx, 0]
            sx = cx - 1 + seeds[cy, cx, 1]
            d = np.hypot(yy - sy, xx - sx)
            closer = d < d1
            d2 = np.where(closer, d1, np.minimum(d2, d))
            val = np.where(closer, cell_value[cy, cx], val)
            d1 = np.where(closer, d, d1)
    walls = _edge((d2 - d1) * cell_px - 1.5, 0.75)  # ~3 px wide walls between cells
    phase = np.zeros(shape)
    for _ in range(waves):
        f = rng.uniform(1 / 80, 1 / 10)
        a = rng.uniform(0, np.pi)
        along = (xx * np.cos(a) + yy * np.sin(a)) * cell_px  # pixels along the wave vector
        phase += np.sin(2 * np.pi * f * along + rng.uniform(0, 2 * np.pi))
    t = 0.55 * val + 0.3 * (phase / (2.0 * np.sqrt(waves)) + 0.5) + 0.4 * walls
    return _rescale(t, 0.0, 100.0)


def _circuit(shape: tuple[int, int], rng: np.random.Generator, *, pitch_px: float = 12.0,
             density: float = 1.0) -> np.ndarray:
    """Manhattan routing: wires snapped to a grid of ``pitch_px``, two layers, vias and pads."""
    h, w = shape
    t = np.zeros(shape)
    pitch = float(pitch_px)
    tracks_y, tracks_x = np.arange(pitch / 2, h, pitch), np.arange(pitch / 2, w, pitch)
    n_wires = max(4, int(density * h * w / (4.0 * pitch) ** 2))
    for _ in range(n_wires):
        depth = float(rng.choice([0.5, 1.0]))
        half_w = float(rng.uniform(0.12, 0.3)) * pitch
        length = float(rng.uniform(2, 12)) * pitch
        if rng.uniform() < 0.5:  # horizontal wire on a y track
            cy, cx = float(rng.choice(tracks_y)), float(rng.choice(tracks_x))
            _box(t, cy, cx + length / 2, length / 2 + half_w, half_w, 0.0, depth)
        else:
            cy, cx = float(rng.choice(tracks_y)), float(rng.choice(tracks_x))
            _box(t, cy + length / 2, cx, half_w, length / 2 + half_w, 0.0, depth)
    for _ in range(max(1, n_wires // 3)):  # vias: small squares on grid crossings
        side = float(rng.uniform(0.2, 0.4)) * pitch
        _box(t, float(rng.choice(tracks_y)), float(rng.choice(tracks_x)), side, side, 0.0, 1.0)
    for _ in range(max(1, n_wires // 25)):  # pads
        a, b = rng.uniform(0.8, 2.5, size=2) * pitch
        _box(t, float(rng.choice(tracks_y)), float(rng.choice(tracks_x)), float(a), float(b), 0.0,
             float(rng.choice([0.5, 1.0])))
    return t


_MAKERS: dict[str, Callable[..., np.ndarray]] = {
    "etched": _etched, "siemens": _siemens, "digits": _digits, "dead_leaves": _dead_leaves,
    "blurred_noise": _blurred_noise, "procedural": _procedural, "circuit": _circuit,
}


def make_object(kind: str, shape: tuple[int, int] = (512, 512), seed: int = 0, *, max_phase: float = 1.0,
                delta_beta: float | None = 20.0, **kw: Any) -> np.ndarray:
    """Synthetic object (H, W) complex64, deterministic for a seed; see the module docstring.

    Extra keywords go to the kind: etched — ``scale``, ``density``; siemens — ``spokes``,
    ``radius``; digits — ``text``, ``height``, ``lines``; dead_leaves — ``rmin``, ``rmax``;
    blurred_noise — ``sigma_px``; procedural — ``cell_px``, ``waves``; circuit — ``pitch_px``,
    ``density``.
    """
    if kind not in _MAKERS:
        raise ValueError(f"unknown object kind {kind!r}; choose one of {', '.join(OBJECT_KINDS)}")
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be two positive integers (H, W), got {shape!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"shape must be two positive integers (H, W), got {shape!r}")
    rng = np.random.default_rng(seed)
    t = _MAKERS[kind]((h, w), rng, **kw)
    return material(t, max_phase=max_phase, delta_beta=delta_beta)


# --------------------------------------------------------------------------- files
def _grey(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3] @ np.array([0.2125, 0.7154, 0.0721])
    elif img.ndim == 3 and img.shape[-1] == 2:  # grey + alpha
        img = img[..., 0]
    return img


def _from_real(arr: np.ndarray, max_phase: float, real_as: str) -> np.ndarray:
    if real_as == "phase":
        return np.exp(1j * arr).astype(np.complex64)
    if real_as != "grey":
        raise ValueError(f"real_as must be 'grey' or 'phase', got {real_as!r}")
    lo, hi = float(arr.min()), float(arr.max())
    g = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.exp(1j * max_phase * (2.0 * g - 1.0)).astype(np.complex64)


def load_object(path: str | Path, dataset: str | None = None, max_phase: float = 1.0, *,
                real_as: str = "grey") -> np.ndarray:
    """Load an object (complex64, H×W, amplitude ≤ 1) from an image, ``.npy`` or HDF5 file.

    Images (anything ``skimage.io.imread`` reads; colour → luminance) and real arrays become
    pure phase objects: grey levels are scaled to ±``max_phase`` (``real_as="phase"`` takes a
    real array as the phase in radians instead).  HDF5: the dataset ``dataset`` (or
    ``path::dataset``), by default ``object`` — a Ptychodus product's layers×H×W complex object,
    of which the first layer is used.  Complex data with amplitude above 1 is scaled down.
    """
    file, dataset = split_dataset_path(path, dataset, "object")
    where = str(file)
    if is_hdf5(file):
        import h5py

        name = dataset or OBJECT
        with h5py.File(file, "r") as h5:
            arr = np.asarray(h5_dataset(h5, name, file)[()])
        where = f"{file}::{name}"
    elif file.suffix.lower() == ".npy":
        arr = np.load(file)
    else:
        if dataset is not None:
            raise ValueError(f"{file}: a dataset name only applies to HDF5 files")
        from skimage.io import imread

        try:
            arr = _grey(imread(str(file)))
        except Exception as exc:  # imageio/PIL raise many types
            raise ValueError(f"{file}: cannot read as an image ({exc})") from None
    if arr.ndim < 2:
        raise ValueError(f"{where}: object must be at least 2-D, got shape {arr.shape}")
    arr = first_layer(arr)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: object contains NaN or infinite values")
    if np.iscomplexobj(arr):
        obj = arr.astype(np.complex64)
        peak = float(np.abs(obj).max())
        return obj / np.float32(peak) if peak > 1.0 else obj
    return _from_real(arr.astype(np.float64), max_phase, real_as)


def fit_object(obj: np.ndarray, shape: tuple[int, int], mode: str = "reflect") -> np.ndarray:
    """Centre-crop or pad ``obj`` to ``shape`` (e.g. a loaded image to ``scan_extent_px``).

    The centre pixel (H // 2, W // 2) stays the centre.  ``mode`` is an ``np.pad`` mode
    ("reflect", "wrap", "edge", …; "constant" pads with vacuum, transmission 1).
    """
    arr = np.asarray(obj, dtype=np.complex64)
    if arr.ndim != 2:
        raise ValueError(f"object must be 2-D, got shape {arr.shape}")
    out = arr
    for axis, (have, want) in enumerate(zip(arr.shape, shape)):
        want = int(want)
        if want < 1:
            raise ValueError(f"shape must be positive, got {shape!r}")
        if want < have:  # crop, keeping the centre pixel at want // 2
            start = have // 2 - want // 2
            out = np.take(out, np.arange(start, start + want), axis=axis)
        elif want > have:
            before = want // 2 - have // 2
            widths = [(0, 0), (0, 0)]
            widths[axis] = (before, want - have - before)
            kw = {"constant_values": 1.0} if mode == "constant" else {}
            out = np.pad(out, widths, mode=mode, **kw)  # type: ignore[call-overload]
    return np.ascontiguousarray(out, dtype=np.complex64)
