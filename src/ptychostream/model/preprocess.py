"""Pre-processing of raw diffraction frames into the network's input.

The steps, in order, on each frame of a stack (n, H, W):

1. convert to float32 and subtract ``dark`` (same shape as the raw frame);
2. zero the bad pixels of ``mask`` (same shape, True/non-zero = bad);
3. set values below ``threshold`` to 0 (with the default 0.0 this clips the
   negatives a dark subtraction leaves);
4. ``fftshift`` (for data stored with zero frequency at the corner);
5. centre crop to ``crop_size`` around ``crop_center`` (row, col of the raw frame;
   default the frame centre, i.e. the zero frequency after an fftshift);
6. bin by ``bin`` (sum of bin×bin pixels, so photon counts are kept);
7. ``scale``: none, log1p or sqrt;
8. ``normalise`` per frame by its max, sum or mean, or by a fixed ``norm_value``;
9. orient: ``transpose`` (rows ↔ columns) first, then ``flip_y`` (rows) and ``flip_x``
   (columns), the order of :class:`ptychostream.files.scan.Scan`; a flip reverses the
   frequencies (the zero frequency stays put). On a centred, unbinned crop this is the same as
   orienting the raw frame first.

Only the pixels inside the crop are converted and processed, and the fftshift is
folded into the crop indices, so a 516² frame cropped to 512 and binned to 128
costs one gather and one reduction. An fftshift that wraps around the frame edge is
gathered as at most four block copies into a contiguous array (never an element-wise
fancy index, whose result also made the binning that follows copy again).

Two kinds of setting (:data:`INSTRUMENT_FIELDS`, :data:`MODEL_FIELDS`). The detector's
own (origin/fftshift, orientation, crop centre, dark, bad-pixel mask, threshold) are the
instrument's: they belong to the device and survive a model swap. What the network was
trained with (crop size and binning, i.e. its input size, the scaling and the
normalisation) comes with the model. :meth:`Preprocess.for_model` joins the two.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

__all__ = ["Preprocess", "InstrumentSettings", "ModelSettings", "SCALES", "NORMALISATIONS", "INSTRUMENT_FIELDS",
           "MODEL_FIELDS", "finite_mask"]

SCALES = ("none", "log1p", "sqrt")
NORMALISATIONS = ("none", "max", "sum", "mean", "fixed")

_JSON_FIELDS = ("fftshift", "flip_y", "flip_x", "transpose", "crop_size", "crop_center", "bin", "threshold",
                "scale", "normalise", "norm_value", "dark_path", "mask_path")
#: the detector's settings: the device's, kept across a model swap
INSTRUMENT_FIELDS = ("fftshift", "flip_y", "flip_x", "transpose", "crop_center", "threshold", "dark", "dark_path",
                     "mask", "mask_path")
#: what the network was trained with: they come with the model
MODEL_FIELDS = ("crop_size", "bin", "scale", "normalise", "norm_value")
#: the settings that hold arrays (kept out of JSON and of comparisons)
_ARRAY_FIELDS = ("dark", "mask")


def finite_mask(frames: np.ndarray) -> np.ndarray:
    """Boolean (n,): True where a frame holds no NaN or inf (integer frames always do)."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.dtype.kind not in "fc":
        return np.ones(frames.shape[0], dtype=bool)
    return np.isfinite(frames).reshape(frames.shape[0], -1).all(axis=1)


@dataclass(frozen=True)
class InstrumentSettings:
    """The detector-side pre-processing: set on the device, kept when the model changes."""

    fftshift: bool = False
    flip_y: bool = False
    flip_x: bool = False
    transpose: bool = False
    crop_center: tuple[int, int] | None = None
    threshold: float = 0.0
    dark: np.ndarray | None = field(default=None, repr=False, compare=False)
    dark_path: str | None = None
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    mask_path: str | None = None


@dataclass(frozen=True)
class ModelSettings:
    """The pre-processing a network was trained with: its input size (crop, bin), scaling and normalisation."""

    crop_size: int | None = None
    bin: int = 1
    scale: str = "none"
    normalise: str = "none"
    norm_value: float = 1.0


@dataclass
class Preprocess:
    """Raw frame → model input. See the module docstring for the order of the steps."""

    fftshift: bool = False
    flip_y: bool = False
    flip_x: bool = False
    transpose: bool = False
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
    #: bad pixels (True/non-zero), the raw frame's shape; they become 0 before the threshold
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    #: where ``mask`` came from (informational, as ``dark_path``)
    mask_path: str | None = None

    # -- checks -------------------------------------------------------------------
    def validate(self) -> "Preprocess":
        """Raise ValueError with a clear message if the configuration is inconsistent."""
        for name in ("fftshift", "flip_y", "flip_x", "transpose"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be true or false, not {getattr(self, name)!r}")
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
        if self.mask is not None:
            m = np.asarray(self.mask)
            if m.ndim != 2 or m.dtype.kind not in "biuf":
                raise ValueError(f"mask must be one 2-D numeric or boolean frame, got {m.dtype} {m.shape}")
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
        for name in _ARRAY_FIELDS:
            arr = getattr(self, name)
            if arr is not None and tuple(np.shape(arr)) != (H, W):
                raise ValueError(f"{name} frame shape {tuple(np.shape(arr))} differs from the "
                                 f"raw frame shape {(H, W)}")
        _, _, h, w = self._window(H, W)
        b = int(self.bin)
        if h % b or w % b:
            raise ValueError(f"frame region ({h}, {w}) is not a multiple of bin {b}")
        oh, ow = (w // b, h // b) if self.transpose else (h // b, w // b)
        return raw_shape[:-2] + (oh, ow)

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
        """Cached (rows, cols, dark crop, bad pixels, crop height, crop width, output (h, w)) for a raw
        frame size (validated once per plan, not per batch)."""
        key = (H, W, bool(self.fftshift), self.crop_size,
               None if self.crop_center is None else tuple(self.crop_center), int(self.bin),
               id(self.dark), id(self.mask), self.transpose, self.flip_y, self.flip_x, self.scale, self.normalise, self.norm_value,
               self.threshold)
        cache = self.__dict__.setdefault("_plan_cache", {})
        plan = cache.get(key)
        if plan is not None:
            return plan
        oshape = self.output_shape((H, W))
        r0, c0, h, w = self._window(H, W)
        rows: _Index
        cols: _Index
        if self.fftshift:
            # a contiguous run in raw coordinates can still be a slice, a wrapped one is two runs
            rows = _as_slice((np.arange(r0, r0 + h) - H // 2) % H)
            cols = _as_slice((np.arange(c0, c0 + w) - W // 2) % W)
        else:
            rows, cols = slice(r0, r0 + h), slice(c0, c0 + w)
        dark = None
        if self.dark is not None:
            dark = _take(np.asarray(self.dark, dtype=np.float32)[None], rows, cols)[0]
            dark = np.ascontiguousarray(dark)
        bad = None
        if self.mask is not None:
            bad = np.ascontiguousarray(_take(np.asarray(self.mask)[None] != 0, rows, cols)[0])
            if not bad.any():
                bad = None
        plan = (rows, cols, dark, bad, h, w, oshape)
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
        rows, cols, dark, bad, h, w, shape = self._plan(H, W)
        b = int(self.bin)
        oshape = (n, *shape)
        if out is None:
            out = np.empty(oshape, dtype=np.float32)
        elif out.shape != oshape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {oshape}, got {out.dtype} {out.shape}")
        final = out
        if self.transpose or self.flip_y or self.flip_x:  # worked on unoriented, copied oriented at the end
            out = np.empty((n, h // b, w // b), dtype=np.float32)
        thr = float(self.threshold)
        # per-pixel work (dark, threshold) is skipped when it cannot change anything:
        # unsigned counts are never below a threshold <= 0
        pixel_ops = dark is not None or bad is not None or not (thr <= 0.0 and frames.dtype.kind in "ub")
        if pixel_ops or b == 1:
            work = out if b == 1 else np.empty((n, h, w), dtype=np.float32)
            if dark is not None:
                np.subtract(_take(frames, rows, cols), dark, out=work, dtype=np.float32, casting="unsafe")
            else:
                _take(frames, rows, cols, out=work)
            if bad is not None:
                work[:, bad] = 0.0
            if pixel_ops and thr == 0.0:
                np.maximum(work, 0.0, out=work)
            elif pixel_ops:
                work[work < thr] = 0.0
            region = work
            if b > 1:
                _bin_sum(region, b, out)
        elif not _bin_blocks(frames, rows, cols, b, out):
            _bin_sum(_take(frames, rows, cols), b, out)
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
        if out is not final:
            view = out.transpose(0, 2, 1) if self.transpose else out
            # a flip reverses the frequencies (k -> -k mod N: a reversal and a roll by one), as
            # Scan.canonical_frames does, so the zero frequency stays at the crop's centre pixel;
            # exact without binning, within half a bin with it
            if self.flip_y:
                view = np.roll(view[:, ::-1], 1, axis=1)
            if self.flip_x:
                view = np.roll(view[:, :, ::-1], 1, axis=2)
            final[...] = view
        return final[0] if single else final

    # -- instrument and model settings -------------------------------------------------
    def instrument(self) -> InstrumentSettings:
        """The detector's settings (:data:`INSTRUMENT_FIELDS`): the device's, kept across a swap."""
        return InstrumentSettings(**{k: getattr(self, k) for k in INSTRUMENT_FIELDS})

    def model_settings(self) -> ModelSettings:
        """What the network was trained with (:data:`MODEL_FIELDS`): they come with the model."""
        return ModelSettings(**{k: getattr(self, k) for k in MODEL_FIELDS})

    @classmethod
    def join(cls, instrument: InstrumentSettings, model: ModelSettings) -> Preprocess:
        """One Preprocess from the two kinds of setting (validated)."""
        return cls(**{k: getattr(instrument, k) for k in INSTRUMENT_FIELDS},
                   **{k: getattr(model, k) for k in MODEL_FIELDS}).validate()

    def for_model(self, model: Preprocess) -> tuple[Preprocess, dict[str, tuple[Any, Any]]]:
        """This device's instrument settings with ``model``'s model settings (a model swap).

        Returns the joined settings and the instrument settings ``model`` names that differ from
        this device's, ``{field: (device's, model's)}``: they are not applied (a swap never
        changes an instrument setting), the caller says so.
        """
        mine, theirs = self.instrument(), model.instrument()
        ignored = {k: (getattr(mine, k), getattr(theirs, k)) for k in INSTRUMENT_FIELDS
                   if k not in _ARRAY_FIELDS and getattr(theirs, k) != getattr(mine, k)
                   and getattr(theirs, k) != getattr(InstrumentSettings(), k)}
        return Preprocess.join(mine, model.model_settings()), ignored

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(replace(self, dark=None, mask=None)).items() if k in _JSON_FIELDS}
        for name in ("fftshift", "flip_y", "flip_x", "transpose"):
            d[name] = bool(d[name])
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
        names = {f.name for f in fields(cls)} - set(_ARRAY_FIELDS)
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


#: an axis of the crop: one slice, or (source slice, destination slice) runs that gather it
_Index = slice | tuple[tuple[slice, slice], ...]


def _as_slice(idx: np.ndarray) -> _Index:
    """Raw indices of one crop axis as a slice, or as the ascending runs they are made of."""
    if idx.size and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    cuts = [0, *(np.flatnonzero(np.diff(idx) != 1) + 1).tolist(), int(idx.size)]
    return tuple((slice(int(idx[a]), int(idx[z - 1]) + 1), slice(a, z)) for a, z in zip(cuts[:-1], cuts[1:]))


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


def _bin_blocks(frames: np.ndarray, rows: _Index, cols: _Index, b: int, out: np.ndarray) -> bool:
    """Bin the runs of a wrapped (fftshifted) crop block by block straight into ``out``, with no
    gathered copy; False (nothing done) when a run does not start and end on a bin boundary."""
    if isinstance(rows, slice) and isinstance(cols, slice):
        return False
    rr = ((rows, slice(0, rows.stop - rows.start)),) if isinstance(rows, slice) else rows
    cc = ((cols, slice(0, cols.stop - cols.start)),) if isinstance(cols, slice) else cols
    if any(d.start % b or d.stop % b for _, d in (*rr, *cc)):
        return False
    for src_r, dst_r in rr:
        for src_c, dst_c in cc:
            _bin_sum(frames[:, src_r, src_c], b,
                     out[:, dst_r.start // b:dst_r.stop // b, dst_c.start // b:dst_c.stop // b])
    return True


def _take(frames: np.ndarray, rows: _Index, cols: _Index, out: np.ndarray | None = None) -> np.ndarray:
    """frames[:, rows][:, :, cols]: a view when both are slices (a copy into ``out`` if given), else a
    C-contiguous gather of the runs' blocks (into ``out``, cast to its dtype, or a new array)."""
    if isinstance(rows, slice) and isinstance(cols, slice):
        if out is None:
            return frames[:, rows, cols]
        np.copyto(out, frames[:, rows, cols], casting="unsafe")
        return out
    rr = ((rows, slice(0, rows.stop - rows.start)),) if isinstance(rows, slice) else rows
    cc = ((cols, slice(0, cols.stop - cols.start)),) if isinstance(cols, slice) else cols
    if out is None:
        out = np.empty((frames.shape[0], rr[-1][1].stop, cc[-1][1].stop), dtype=frames.dtype)
    for src_r, dst_r in rr:
        for src_c, dst_c in cc:
            np.copyto(out[:, dst_r, dst_c], frames[:, src_r, src_c], casting="unsafe")
    return out
