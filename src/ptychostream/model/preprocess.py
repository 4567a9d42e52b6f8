"""Pre-processing of raw diffraction frames into the network's input.

The steps, in order, on each frame of a stack (n, H, W):

1. convert to float32 and subtract ``dark`` (same shape as the raw frame);
2. set values below ``threshold`` to 0 (with the default 0.0 this clips the
   negatives a dark subtraction leaves);
3. ``fftshift`` (for data stored with zero frequency at the corner);
4. centre crop to ``crop_size`` around ``crop_center`` (row, col; default the
   frame centre, i.e. the zero frequency after an fftshift);
5. bin by ``bin`` (sum of bin×bin pixels, so photon counts are kept);
6. ``scale``: none, log1p or sqrt;
7. ``normalise`` per frame by its max, sum or mean, or by a fixed ``norm_value``.

Only the pixels inside the crop are converted and processed, and the fftshift is
folded into the crop indices, so a 516² frame cropped to 512 and binned to 128
costs one gather and one reduction.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

__all__ = ["Preprocess", "SCALES", "NORMALISATIONS", "finite_mask"]

SCALES = ("none", "log1p", "sqrt")
NORMALISATIONS = ("none", "max", "sum", "mean", "fixed")

_JSON_FIELDS = ("fftshift", "crop_size", "crop_center", "bin", "threshold", "scale",
                "normalise", "norm_value", "dark_path")


def finite_mask(frames: np.ndarray) -> np.ndarray:
    """Boolean (n,): True where a frame holds no NaN or inf (integer frames always do)."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.dtype.kind not in "fc":
        return np.ones(frames.shape[0], dtype=bool)
    return np.isfinite(frames).reshape(frames.shape[0], -1).all(axis=1)


@dataclass
class Preprocess:
    """Raw frame → model input. See the module docstring for the order of the steps."""

    fftshift: bool = False
    crop_size: int | None = None
    crop_center: tuple[int, int] | None = None
    bin: int = 1
    dark: np.ndarray | None = field(default=None, repr=False, compare=False)
    threshold: float = 0.0
    scale: str = "none"
    normalise: str = "none"
    norm_value: float = 1.0
    #: where ``dark`` came from (informational; kept in JSON, the array is not)
    dark_path: str | None = None

    # -- checks -------------------------------------------------------------------
    def validate(self) -> "Preprocess":
        """Raise ValueError with a clear message if the configuration is inconsistent."""
        if not isinstance(self.fftshift, (bool, np.bool_)):
            raise ValueError(f"fftshift must be true or false, not {self.fftshift!r}")
        if self.crop_size is not None:
            if not _is_int(self.crop_size) or self.crop_size <= 0:
                raise ValueError(f"crop_size must be a positive integer or None, not {self.crop_size!r}")
        if self.crop_center is not None:
            cc = tuple(self.crop_center)
            if len(cc) != 2 or not all(_is_int(c) and c >= 0 for c in cc):
                raise ValueError(f"crop_center must be (row, col) with non-negative integers, "
                                 f"not {self.crop_center!r}")
        if not _is_int(self.bin) or self.bin < 1:
            raise ValueError(f"bin must be an integer >= 1, not {self.bin!r}")
        if self.crop_size is not None and self.crop_size % self.bin:
            raise ValueError(f"crop_size {self.crop_size} is not a multiple of bin {self.bin}")
        if self.dark is not None:
            d = np.asarray(self.dark)
            if d.ndim != 2:
                raise ValueError(f"dark must be one 2-D frame, got shape {d.shape}")
            if d.dtype.kind not in "biuf":
                raise ValueError(f"dark must be numeric, got dtype {d.dtype}")
        try:
            thr = float(self.threshold)
        except (TypeError, ValueError):
            raise ValueError(f"threshold must be a number, not {self.threshold!r}") from None
        if not math.isfinite(thr):
            raise ValueError(f"threshold must be finite, not {self.threshold!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {self.scale!r}")
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {', '.join(NORMALISATIONS)}; "
                             f"got {self.normalise!r}")
        try:
            nv = float(self.norm_value)
        except (TypeError, ValueError):
            raise ValueError(f"norm_value must be a number, not {self.norm_value!r}") from None
        if self.normalise == "fixed" and not (math.isfinite(nv) and nv > 0):
            raise ValueError(f"normalise='fixed' needs a finite norm_value > 0, got {self.norm_value!r}")
        return self

    # -- geometry -----------------------------------------------------------------
    def _window(self, H: int, W: int) -> tuple[int, int, int, int]:
        """(row0, col0, height, width) of the crop in the (fftshifted) frame."""
        if self.crop_size is None:
            return 0, 0, H, W
        c = int(self.crop_size)
        if c > H or c > W:
            raise ValueError(f"crop_size {c} is larger than the frame ({H}, {W})")
        cy, cx = (H // 2, W // 2) if self.crop_center is None else map(int, self.crop_center)
        r0, c0 = cy - c // 2, cx - c // 2
        if r0 < 0 or c0 < 0 or r0 + c > H or c0 + c > W:
            raise ValueError(f"a {c}x{c} crop around (row {cy}, col {cx}) leaves the frame ({H}, {W})")
        return r0, c0, c, c

    def output_shape(self, raw_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape that :meth:`apply` produces for frames of ``raw_shape`` ((H, W) or (n, H, W))."""
        raw_shape = tuple(int(s) for s in raw_shape)
        if len(raw_shape) not in (2, 3):
            raise ValueError(f"frames must be (H, W) or (n, H, W), got shape {raw_shape}")
        H, W = raw_shape[-2:]
        self.validate()
        if self.dark is not None and tuple(np.shape(self.dark)) != (H, W):
            raise ValueError(f"dark frame shape {tuple(np.shape(self.dark))} differs from the "
                             f"raw frame shape {(H, W)}")
        _, _, h, w = self._window(H, W)
        b = int(self.bin)
        if h % b or w % b:
            raise ValueError(f"frame region ({h}, {w}) is not a multiple of bin {b}")
        return raw_shape[:-2] + (h // b, w // b)

    def fit_to(self, raw_shape: tuple[int, ...], model_shape: tuple[int, int],
               max_bin: int = 16) -> "Preprocess":
        """A copy whose crop/bin turn ``raw_shape`` frames into ``model_shape``.

        Settings that already fit are kept. Otherwise the largest bin (at most
        ``max_bin``) whose crop ``model·bin`` fits in the frame is chosen, so as
        much of the detector as possible is used (516 → crop 512, bin 4 → 128).
        Raises ValueError if no crop/bin fits.
        """
        H, W = (int(s) for s in tuple(raw_shape)[-2:])
        h, w = (int(s) for s in model_shape)
        try:
            if self.output_shape((H, W)) == (h, w):
                return replace(self)
        except ValueError:
            pass
        if (H, W) == (h, w):
            return replace(self, crop_size=None, bin=1)
        if h != w:
            raise ValueError(f"cannot fit ({H}, {W}) frames to a non-square model input ({h}, {w}); "
                             "crops are square")
        for b in range(max(1, max_bin), 0, -1):
            crop = h * b
            if crop > H or crop > W:
                continue
            if crop == H == W:
                cand = replace(self, crop_size=None, bin=b)
            else:
                cand = replace(self, crop_size=crop, bin=b)
            try:
                if cand.output_shape((H, W)) == (h, w):
                    return cand
            except ValueError:
                continue
        raise ValueError(f"cannot fit ({H}, {W}) frames to the model input ({h}, {w}) "
                         f"by cropping and binning (bin <= {max_bin})")

    def _plan(self, H: int, W: int) -> tuple:
        """Cached (row index, col index, dark crop) for a raw frame size."""
        key = (H, W, bool(self.fftshift), self.crop_size,
               None if self.crop_center is None else tuple(self.crop_center), int(self.bin),
               id(self.dark))
        cache = self.__dict__.setdefault("_plan_cache", {})
        plan = cache.get(key)
        if plan is not None:
            return plan
        self.output_shape((H, W))
        r0, c0, h, w = self._window(H, W)
        rows: np.ndarray | slice
        cols: np.ndarray | slice
        if self.fftshift:
            # a contiguous run in raw coordinates can still be a slice
            rows = _as_slice((np.arange(r0, r0 + h) - H // 2) % H)
            cols = _as_slice((np.arange(c0, c0 + w) - W // 2) % W)
        else:
            rows, cols = slice(r0, r0 + h), slice(c0, c0 + w)
        dark = None
        if self.dark is not None:
            dark = _take(np.asarray(self.dark, dtype=np.float32)[None], rows, cols)[0]
            dark = np.ascontiguousarray(dark)
        plan = (rows, cols, dark, h, w)
        cache.clear()
        cache[key] = plan
        return plan

    # -- the work -------------------------------------------------------------------
    def apply(self, frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Pre-process a stack (n, H, W) (or one frame (H, W)) into float32 (n, h, w)."""
        frames = np.asarray(frames)
        single = frames.ndim == 2
        if single:
            frames = frames[None]
        if frames.ndim != 3:
            raise ValueError(f"frames must be (n, H, W), got shape {frames.shape}")
        if frames.dtype.kind not in "biuf":
            raise ValueError(f"frames must be numeric, got dtype {frames.dtype}")
        n, H, W = frames.shape
        rows, cols, dark, h, w = self._plan(H, W)
        b = int(self.bin)
        oshape = (n, h // b, w // b)
        if out is None:
            out = np.empty(oshape, dtype=np.float32)
        elif out.shape != oshape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {oshape}, got {out.dtype} {out.shape}")
        region = _take(frames, rows, cols)
        thr = float(self.threshold)
        # per-pixel work (dark, threshold) is skipped when it cannot change anything:
        # unsigned counts are never below a threshold <= 0
        pixel_ops = dark is not None or not (thr <= 0.0 and frames.dtype.kind in "ub")
        if pixel_ops or b == 1:
            work = out if b == 1 else np.empty((n, h, w), dtype=np.float32)
            if dark is not None:
                np.subtract(region, dark, out=work, dtype=np.float32, casting="unsafe")
            else:
                work[...] = region
            if pixel_ops and thr == 0.0:
                np.maximum(work, 0.0, out=work)
            elif pixel_ops:
                work[work < thr] = 0.0
            region = work
        if b > 1:
            _bin_sum(region, b, out)
        if self.scale == "log1p":
            np.log1p(out, out=out)
        elif self.scale == "sqrt":
            np.sqrt(out, out=out)
        if self.normalise == "fixed":
            out *= np.float32(1.0 / float(self.norm_value))
        elif self.normalise != "none":
            flat = out.reshape(n, -1)
            if self.normalise == "max":
                norm = flat.max(axis=1)
            elif self.normalise == "sum":
                norm = flat.sum(axis=1, dtype=np.float64).astype(np.float32)
            else:
                norm = flat.mean(axis=1, dtype=np.float64).astype(np.float32)
            norm[~(norm > 0)] = 1.0  # empty (all-zero) frames stay zero
            out /= norm[:, None, None]
        return out[0] if single else out

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(replace(self, dark=None)).items() if k in _JSON_FIELDS}
        d["fftshift"] = bool(d["fftshift"])
        if d["crop_center"] is not None:
            d["crop_center"] = [int(c) for c in d["crop_center"]]
        d["threshold"] = float(d["threshold"])
        d["norm_value"] = float(d["norm_value"])
        return d

    def to_json(self) -> str:
        """JSON of the settings; the dark array is not included (only ``dark_path``)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        """Settings from a dict (the keys of :meth:`to_dict`); raises ValueError for bad ones."""
        if not isinstance(d, dict):
            raise ValueError(f"pre-processing settings must be a JSON object, not {type(d).__name__}")
        names = {f.name for f in fields(cls)} - {"dark"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown pre-processing setting(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        kw = dict(d)
        if kw.get("crop_center") is not None:
            cc = kw["crop_center"]
            if not isinstance(cc, (list, tuple)) or len(cc) != 2:
                raise ValueError(f"crop_center must be [row, col], not {cc!r}")
            kw["crop_center"] = tuple(cc)
        return cls(**kw).validate()

    @classmethod
    def from_json(cls, text: str | bytes | dict[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_json`; raises ValueError for bad JSON or settings."""
        if isinstance(text, dict):
            return cls.from_dict(text)
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"pre-processing settings are not valid JSON: {exc}") from None
        return cls.from_dict(d)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _as_slice(idx: np.ndarray) -> np.ndarray | slice:
    if idx.size and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _bin_sum(src: np.ndarray, b: int, out: np.ndarray) -> None:
    """Sum b×b blocks of src (n, h, w) (any numeric dtype) into float32 out (n, h/b, w/b).

    Adds whole row slabs first, then column phases: much faster than a reduction
    over a 5-D reshape, and needs no float copy of the full-resolution frames.
    """
    n, h, w = src.shape
    kw: dict[str, Any] = {"dtype": np.float32, "casting": "unsafe"}
    rows = src.reshape(n, h // b, b, w)
    tmp = np.empty((n, h // b, w), dtype=np.float32)
    np.add(rows[:, :, 0], rows[:, :, 1], out=tmp, **kw)
    for k in range(2, b):
        np.add(tmp, rows[:, :, k], out=tmp, **kw)
    cols = tmp.reshape(n, h // b, w // b, b)
    np.add(cols[..., 0], cols[..., 1], out=out, **kw)
    for k in range(2, b):
        np.add(out, cols[..., k], out=out, **kw)


def _take(frames: np.ndarray, rows, cols) -> np.ndarray:
    """frames[:, rows][:, :, cols] with slices as views and index arrays gathered once."""
    if isinstance(rows, slice) and isinstance(cols, slice):
        return frames[:, rows, cols]
    if isinstance(rows, slice):
        return frames[:, rows][:, :, cols]
    if isinstance(cols, slice):
        return frames[:, :, cols][:, rows]
    return frames[:, rows[:, None], cols[None, :]]
