"""Training for one instrument: a scan's own pairs, probe-centric synthetic pairs, both mixed, and the
held-out region of the scan that decides whether the new model is better than the serving one.

* :func:`heldout_split`: a spatial split of a scan's positions (by default the right-most 25 % of the
  scanned extent in x), with a guard band so that no training patch reaches the scored region;
* :func:`label_patches`: the labels of a scan's frames, cut from an iterative product at any pixel and
  resampled to the model's pixel and output size;
* :class:`ProbeSource`: probe-centric synthetic pairs (the recovered probe, all its modes, the scan's
  frame size, pixel and photon level, procedurally generated objects), as the generalisation paper in
  the seeds recommends;
* :class:`MixedSource`: a fixed fraction of each batch synthetic, the rest the scan's pairs;
* :func:`instrument_source`: the (source, facts) that :func:`ptychostream.train.loop.train` takes;
* :func:`heldout_scores`: each model's stitched phase on the held-out frames against the reference
  (:func:`ptychostream.quality.reference.score_against_product`: band-pass correlation, SSIM, FRC),
  on one grid and one mask for every model, and against a simulation's truth when there is one;
* :func:`bad_pixels` / :func:`clean_frames`: hot pixels found in a scan's mean frame, replaced before the
  iterative engine sees them (they read the same huge count in every frame, and an engine that fits
  them paints fringes over the object) and zeroed for the network (as the reconstructor's bad-pixel
  mask does when it serves).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.product import Product
from ptychostream.model.preprocess import Preprocess
from ptychostream.sim.forward import extract_patches, far_field
from ptychostream.train.config import (
    TrainConfig,
    TrainError,
    amplitude_scale_for,
    probe_weight,
)
from ptychostream.train.data import (
    ArraySource,
    Batch,
    SimSource,
    resample_patches,
    targets,
)

__all__ = [
    "METRICS",
    "MODES",
    "SIDES",
    "HeldOut",
    "bad_pixels",
    "clean_frames",
    "MixedSource",
    "PatchGrid",
    "ProbeSource",
    "ReferenceObject",
    "heldout_scores",
    "heldout_split",
    "infer_phases",
    "instrument_source",
    "is_better",
    "label_patches",
    "probe_modes",
    "reference_object",
    "stitch_phases",
]

#: where the held-out region lies: (axis of the positions, +1 the high end / -1 the low end); y grows down
SIDES: dict[str, tuple[int, int]] = {"right": (1, 1), "left": (1, -1), "bottom": (0, 1), "top": (0, -1)}
#: the training data of an instrument run
MODES = ("pairs", "synthetic", "mixed")


def bad_pixels(frames: np.ndarray, factor: float = 10.0, floor: float = 10.0) -> np.ndarray:
    """Hot pixels (H, W) bool of a stack of frames (N, H, W): where the mean frame exceeds ``factor`` ×
    the 3×3 median of the mean frame, plus ``floor`` counts (a diffraction pattern is smooth on that
    scale; the bright centre is as bright as its neighbours, a hot pixel is not)."""
    from scipy.ndimage import median_filter

    arr = np.asarray(frames)
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise TrainError(f"bad pixels: frames must be (N, H, W) with N >= 1, got shape {arr.shape}")
    mean = arr.mean(axis=0, dtype=np.float64)
    return np.asarray(mean > factor * median_filter(mean, size=3, mode="wrap") + floor)


def clean_frames(frames: np.ndarray, bad: np.ndarray, fill: str = "median") -> np.ndarray:
    """A copy of ``frames`` (N, H, W) float32 with the ``bad`` pixels set to the 3×3 median of their
    neighbours in each frame (``fill="median"``, for an iterative engine) or to 0 (``"zero"``, what the
    reconstructor's bad-pixel mask gives the network)."""
    out = np.array(frames, dtype=np.float32)
    mask = np.asarray(bad, dtype=bool)
    if not mask.any():
        return out
    if fill == "zero":
        out[:, mask] = 0.0
        return out
    if fill != "median":
        raise TrainError(f"clean_frames: fill must be 'median' or 'zero', got {fill!r}")
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    for r, c in zip(rows, cols):
        rr = (np.arange(r - 1, r + 2) % h)[:, None]
        cc = (np.arange(c - 1, c + 2) % w)[None, :]
        block = out[:, rr, cc].reshape(len(out), 9)
        good = ~mask[rr, cc].ravel()
        out[:, r, c] = np.median(block[:, good], axis=1) if good.any() else 0.0
    return out


@dataclass(frozen=True)
class HeldOut:
    """A spatial split of a scan: frame indices to train on and to hold out, and the held-out region."""

    train: np.ndarray  # indices of the training frames
    held: np.ndarray  # indices of the held-out frames
    side: str
    fraction: float
    threshold_m: float  # held out: coordinate >= threshold (high side) or <= (low side)
    guard_m: float  # training frames lie at least this far on the other side of the threshold
    extent_m: tuple[float, float, float, float]  # (y0, y1, x0, x1) of the scan positions

    def region_box(self, pad_m: float = 0.0) -> tuple[float, float, float, float]:
        """The held-out region (y0, y1, x0, x1) in metres: the scan's extent beyond the threshold, padded
        by ``pad_m`` on the three outer sides (the patches reach past the last positions)."""
        y0, y1, x0, x1 = self.extent_m
        box = [y0 - pad_m, y1 + pad_m, x0 - pad_m, x1 + pad_m]
        axis, sign = SIDES[self.side]
        box[2 * axis + (0 if sign > 0 else 1)] = self.threshold_m
        return box[0], box[1], box[2], box[3]

    def describe(self) -> dict[str, Any]:
        return {"side": self.side, "fraction": self.fraction, "threshold_m": self.threshold_m,
                "guard_m": self.guard_m, "train_frames": len(self.train), "heldout_frames": len(self.held),
                "region_m": list(self.region_box())}


def heldout_split(positions_m: np.ndarray, fraction: float = 0.25, side: str = "right",
                  guard_m: float = 0.0) -> HeldOut:
    """Hold out the frames in the last ``fraction`` of the scanned extent on ``side`` (never a random subset).

    Frames within ``guard_m`` of the threshold on the training side are used for neither (so that the
    training patches stop where the scored region starts).  TrainError if a part ends up empty.
    """
    pos = np.asarray(positions_m, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or not np.isfinite(pos).all():
        raise TrainError(f"positions must be finite (N, 2) (y, x) metres, got shape {pos.shape}")
    if side not in SIDES:
        raise TrainError(f"the held-out side must be one of {', '.join(SIDES)}, got {side!r}")
    if not 0.0 < fraction < 1.0:
        raise TrainError(f"the held-out fraction must be between 0 and 1, got {fraction!r}")
    if not (math.isfinite(guard_m) and guard_m >= 0):
        raise TrainError(f"the guard band must be >= 0 m, got {guard_m!r}")
    axis, sign = SIDES[side]
    c = pos[:, axis]
    lo, hi = float(c.min()), float(c.max())
    if hi - lo <= 0:
        raise TrainError(f"the scan does not extend along {'xy'[1 - axis] if axis == 0 else 'x'}: "
                         f"no region to hold out on the {side}")
    if sign > 0:
        thr = hi - fraction * (hi - lo)
        held, train = np.flatnonzero(c >= thr), np.flatnonzero(c < thr - guard_m)
    else:
        thr = lo + fraction * (hi - lo)
        held, train = np.flatnonzero(c <= thr), np.flatnonzero(c > thr + guard_m)
    if len(held) == 0 or len(train) == 0:
        raise TrainError(f"holding out {fraction:.0%} on the {side} with a {guard_m:.3g} m guard leaves "
                         f"{len(train)} training and {len(held)} held-out frames; change --heldout or --guard")
    extent = (float(pos[:, 0].min()), float(pos[:, 0].max()), float(pos[:, 1].min()), float(pos[:, 1].max()))
    return HeldOut(train, held, side, float(fraction), float(thr), float(guard_m), extent)


def probe_modes(probe: np.ndarray | None, size: int, where: str = "probe") -> np.ndarray:
    """Probe modes (K, size, size) complex64 with a total power of 1, from (h, w), (K, h, w) or (1, K, h, w)."""
    if probe is None:
        raise TrainError(f"{where}: no probe; probe-centric training and the loss weight need one")
    arr = np.asarray(probe)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (size, size):
        raise TrainError(f"{where}: the probe is {np.shape(probe)}, expected (modes, {size}, {size}) like the frames")
    arr = arr.astype(np.complex64)
    power = float(np.sum(np.abs(arr.astype(np.complex128)) ** 2))
    if not (math.isfinite(power) and power > 0):
        raise TrainError(f"{where}: the probe is zero or not finite")
    return (arr / np.sqrt(power)).astype(np.complex64)


def label_patches(product: Product, positions_m: np.ndarray, pixel_m: float, out: int) -> np.ndarray:
    """Complex labels (N, out, out) at ``pixel_m``: the product's object cut at the positions, resampled.

    ``positions_m`` are in the scan's frame, the product's object centre lies at ``product.center_m``.
    """
    zoom = product.pixel_m / pixel_m
    n_src = out if abs(zoom - 1.0) < 1e-6 else int(math.ceil(out / zoom)) + 4
    rel = np.asarray(positions_m, dtype=np.float64) - np.asarray(product.center_m, dtype=np.float64)
    try:
        patches = extract_patches(product.object, rel, product.pixel_m, n_src)
        return resample_patches(patches, out, zoom)
    except ValueError as exc:
        raise TrainError(f"reference {product.source or '(product)'}: cannot cut the labels: {exc}") from None


@dataclass(frozen=True)
class ReferenceObject:
    """The iterative reference's object as a source of synthetic objects: its held-out side replaced by a
    mirror image of the training side (so nothing of the scored region is seen), and the box of patch
    centres (metres about the object's centre pixel: y0, y1, x0, x1) where the training frames lit it."""

    object: np.ndarray  # (H, W) complex64 at the scan's pixel
    box_m: tuple[float, float, float, float]


def reference_object(product: Product, split: HeldOut, positions_m: np.ndarray, pixel_m: float
                     ) -> ReferenceObject | None:
    """:class:`ReferenceObject` of ``product`` for the training frames of ``split`` (None when the product
    is at another pixel than the scan's, or the training region is empty)."""
    if abs(product.pixel_m / pixel_m - 1.0) > 1e-3 or len(split.train) == 0:
        return None
    obj = np.asarray(product.object, dtype=np.complex64)
    axis, sign = SIDES[split.side]
    centre = np.asarray(product.center_m, dtype=np.float64)
    h, w = obj.shape
    # the held-out boundary in object pixels along the split axis
    cut = (h // 2, w // 2)[axis] + (split.threshold_m - centre[axis]) / pixel_m
    view = obj if axis == 1 else obj.T
    view = view if sign > 0 else view[:, ::-1]
    n = view.shape[1]
    k = math.floor(cut) if sign > 0 else math.floor(n - 1 - cut) + 1
    k = min(max(k, 1), n)
    view = np.pad(view[:, :k], ((0, 0), (0, n - k)), mode="symmetric")
    view = view if sign > 0 else view[:, ::-1]
    obj = np.ascontiguousarray(view if axis == 1 else view.T)
    rel = np.asarray(positions_m, dtype=np.float64)[split.train] - centre
    box = (float(rel[:, 0].min()), float(rel[:, 0].max()), float(rel[:, 1].min()), float(rel[:, 1].max()))
    return ReferenceObject(obj, box)


@dataclass(frozen=True)
class PatchGrid:
    """The frame size and object pixel of a scan (what :class:`SimSource` reads of a geometry)."""

    size: int
    pixel_m: float


class ProbeSource(SimSource):
    """Probe-centric synthetic pairs: procedurally generated objects (:mod:`ptychostream.sim.objects`,
    the families of ``cfg.objects``) seen through the scan's probe, every mode (frames are the incoherent
    sum over the modes), at the scan's pixel and photon level (``photons``: (lo, hi) per frame)."""

    def __init__(self, cfg: TrainConfig, modes: np.ndarray, pixel_m: float, pre: Preprocess, out: int,
                 weight: np.ndarray, photons: tuple[float, float], amp_gain: float = 1.0,
                 bad: np.ndarray | None = None, reference: ReferenceObject | None = None,
                 reference_share: float = 0.0, reference_zoom: tuple[float, float] = (1.0, 1.0)) -> None:
        size = int(modes.shape[-1])
        super().__init__(cfg, modes[0], PatchGrid(size, float(pixel_m)), pre, out, weight)
        self.modes = np.ascontiguousarray(modes, dtype=np.complex64)
        self.photons = (float(photons[0]), float(photons[1]))
        self.amp_gain = float(amp_gain)
        #: the scan's bad pixels (canonical frame), zeroed in every synthetic frame as in the scan's
        self.bad = None if bad is None or not np.any(bad) else np.asarray(bad, dtype=bool)
        #: ``reference_share`` of the patches come from the reference's object (training side only), at
        #: random positions of the lit box and in a random one of the 8 orientations of the square
        self.reference = reference
        self.reference_share = float(reference_share) if reference is not None else 0.0
        #: each reference patch is shrunk or enlarged by a zoom drawn log-uniformly from this range (below 1:
        #: more of the sample in one patch, finer and denser than the training side shows)
        lo, hi = (float(v) for v in reference_zoom)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.25 <= lo <= hi <= 4.0):
            raise TrainError(f"the reference zoom must be a range within 0.25..4, got {lo:g}..{hi:g}")
        self.reference_zoom = (lo, hi)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(source="probe-centric", probe_modes=len(self.modes), photons=list(self.photons),
                 amplitude_gain=self.amp_gain, probe=hashlib.sha256(self.modes.tobytes()).hexdigest()[:12],
                 bad_pixels=0 if self.bad is None else int(self.bad.sum()),
                 reference_share=self.reference_share, reference_zoom=list(self.reference_zoom))
        return d

    def make(self, n: int, stream: int, index: int, cycle: int) -> Batch:
        g = self.geometry
        objs = self._objects(stream, cycle)
        rng = np.random.default_rng([self.cfg.seed, stream + 100, index])
        which = rng.integers(len(objs), size=n)
        reach = (self.n_px // 2 - g.size // 2 - 2) * g.pixel_m
        pos = np.rint(rng.uniform(-reach, reach, size=(n, 2)) / g.pixel_m) * g.pixel_m
        lo, hi = self.photons
        photons = np.exp(rng.uniform(np.log(lo), np.log(hi), size=n))
        patches = np.empty((n, g.size, g.size), dtype=np.complex64)
        gain = np.full(n, self.amp_gain, dtype=np.float32)
        from_ref = rng.random(n) < self.reference_share
        for j in np.unique(which[~from_ref]):
            sel = np.flatnonzero((which == j) & ~from_ref)
            patches[sel] = extract_patches(objs[j], pos[sel], g.pixel_m, g.size)
        if from_ref.any():
            assert self.reference is not None
            sel = np.flatnonzero(from_ref)
            y0, y1, x0, x1 = self.reference.box_m
            rp = np.column_stack([rng.uniform(y0, y1, len(sel)), rng.uniform(x0, x1, len(sel))])
            cut = self._reference_patches(rp, rng)
            turns = rng.integers(8, size=len(sel))
            for m, (i, t) in enumerate(zip(sel, turns)):
                q = np.rot90(cut[m], int(t) % 4)
                patches[i] = q[:, ::-1] if t >= 4 else q
            gain[sel] = 1.0  # the reference's amplitudes are at their own level already
        inten = np.zeros((n, g.size, g.size), dtype=np.float32)
        for mode in self.modes:
            inten += far_field(mode[None] * patches)
        inten /= np.maximum(inten.sum(axis=(1, 2), keepdims=True), 1e-30)
        counts = rng.poisson(inten * photons[:, None, None].astype(np.float32)).astype(np.float32)
        if self.bad is not None:
            counts[:, self.bad] = 0.0
        x = self.pre.apply(counts)[:, None]
        amp = np.abs(patches) * gain[:, None, None] if "amplitude" in self.cfg.heads else None
        ph, am = targets(np.angle(patches), amp, self.out, self.weight)
        return Batch(np.ascontiguousarray(x, dtype=np.float32), ph, am)

    def _reference_patches(self, centres_m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Patches (n, size, size) of the reference's object about ``centres_m``, each at its own zoom."""
        assert self.reference is not None
        g = self.geometry
        lo, hi = self.reference_zoom
        if hi / lo < 1.0 + 1e-6 and abs(lo - 1.0) < 1e-6:
            return extract_patches(self.reference.object, centres_m, g.pixel_m, g.size)
        zooms = np.exp(rng.uniform(math.log(lo), math.log(hi), size=len(centres_m)))
        big = int(math.ceil(g.size / min(lo, 1.0))) + 4
        h, w = self.reference.object.shape
        # keep the larger window inside the object
        reach_y = (h // 2 - big // 2 - 2) * g.pixel_m
        reach_x = (w // 2 - big // 2 - 2) * g.pixel_m
        pos = np.column_stack([np.clip(centres_m[:, 0], -reach_y, reach_y), np.clip(centres_m[:, 1], -reach_x, reach_x)])
        wide = extract_patches(self.reference.object, pos, g.pixel_m, big)
        return np.stack([resample_patches(wide[k:k + 1], g.size, float(z))[0] for k, z in enumerate(zooms)])


class MixedSource:
    """Batches of which ``ratio`` are synthetic (``synth``) and the rest the scan's pairs (``pairs``)."""

    def __init__(self, pairs: ArraySource, synth: ProbeSource, ratio: float) -> None:
        if not 0.0 < ratio < 1.0:
            raise TrainError(f"the synthetic fraction of a mix must be between 0 and 1, got {ratio!r}")
        self.pairs, self.synth, self.ratio = pairs, synth, float(ratio)
        self.weight = pairs.weight

    def _split(self, n: int) -> tuple[int, int]:
        k = min(n - 1, max(1, int(round(self.ratio * n)))) if n > 1 else 0
        return n - k, k

    def describe(self) -> dict[str, Any]:
        return {"source": "mixed", "synthetic_fraction": self.ratio, "pairs": self.pairs.describe(),
                "synthetic": self.synth.describe()}

    def steps_per_epoch(self, batch: int) -> int:
        """One pass over the scan's training pairs."""
        return self.pairs.steps_per_epoch(self._split(batch)[0])

    def batch(self, step: int, n: int) -> Batch:
        n_pairs, n_synth = self._split(n)
        parts = [self.pairs.batch(step, n_pairs)] + ([self.synth.batch(step, n_synth)] if n_synth else [])
        amps = [p.amplitude for p in parts]
        return Batch(np.concatenate([p.x for p in parts]), np.concatenate([p.phase for p in parts]),
                     None if any(a is None for a in amps) else np.concatenate(amps))  # type: ignore[arg-type]

    def validation(self, n: int) -> Batch | None:
        """The scan's own validation pairs: what the model must get right."""
        return self.pairs.validation(n)


def instrument_source(cfg: TrainConfig, *, frames: np.ndarray, labels: np.ndarray, probe: np.ndarray,
                      pixel_m: float, pre: Preprocess, out: int, mode: str = "mixed", mix: float = 0.5,
                      photons: tuple[float, float] | None = None, bad: np.ndarray | None = None,
                      reference: ReferenceObject | None = None,
                      reference_share: float = 0.5, reference_zoom: tuple[float, float] = (1.0, 1.0)
                      ) -> tuple[Any, dict[str, Any]]:
    """The (data source, facts) of a run on one instrument, for ``train(cfg, source=...)``.

    ``frames`` (N, S, S) canonical intensities of the training frames, ``labels`` (N, out, out) complex
    patches at ``pixel_m``, ``probe`` (modes, S, S), ``mode`` one of :data:`MODES` (``mix``: the synthetic
    fraction of a ``mixed`` batch), ``photons`` the synthetic frames' (lo, hi) counts (default: the
    scan's 10th to 90th percentile of the frame sums), ``bad`` the scan's bad pixels (S, S), zeroed in the
    synthetic frames as they are in the scan's; ``reference`` (:func:`reference_object`): ``reference_share``
    of the synthetic patches are cut from it instead of the generated objects, each at a zoom drawn from
    ``reference_zoom`` (lo, hi).
    """
    if mode not in MODES:
        raise TrainError(f"the training mode must be one of {', '.join(MODES)}, got {mode!r}")
    size = int(frames.shape[-1])
    modes = probe_modes(probe, size)
    intensity = np.sqrt(np.sum(np.abs(modes) ** 2, axis=0))
    weight = probe_weight(intensity, size, out, cfg.loss_floor)
    try:
        n_in = int(pre.output_shape((size, size))[-1])
    except ValueError as exc:
        raise TrainError(f"pre-processing: {exc}") from None
    # each label turned by its probe-weighted circular mean phase: a patch whose phase crosses ±pi in the
    # reference (an iterative phase is known up to an offset) is then continuous around 0
    turn = np.exp(-1j * np.angle(np.sum(labels * weight, axis=(-2, -1), keepdims=True)))
    labels = (labels * turn).astype(np.complex64)
    amp_labels = np.abs(labels).astype(np.float32)
    has_amp = "amplitude" in cfg.heads
    # the synthetic objects' amplitude (<= 1) brought to the reference's level (iterative amplitudes carry
    # the probe/object scale ambiguity), measured where the probe is bright
    lit = weight >= 0.5 * float(weight.max())
    gain = float(np.median(amp_labels[:, lit])) if has_amp and lit.any() else 1.0
    gain = gain if math.isfinite(gain) and gain > 0 else 1.0
    if photons is None:
        sums = np.asarray(frames, dtype=np.float64).reshape(len(frames), -1).sum(axis=1)
        lo, hi = (float(v) for v in np.percentile(sums, [10, 90]))
        photons = (max(lo, 1.0), max(hi, lo, 1.0))
    pairs = synth = None
    if mode in ("pairs", "mixed"):
        pairs = ArraySource(cfg, np.asarray(frames), np.angle(labels).astype(np.float32),
                            amp_labels if has_amp else None, pre, out, weight,
                            {"source": "scan pairs", "pairs": len(frames)})
    if mode in ("synthetic", "mixed"):
        synth = ProbeSource(cfg, modes, pixel_m, pre, out, weight, photons, gain, bad, reference, reference_share,
                            reference_zoom)
    src: Any
    if mode == "mixed":
        assert pairs is not None and synth is not None
        src = MixedSource(pairs, synth, mix)
    else:
        src = pairs if pairs is not None else synth
    probe_id = "scan-" + hashlib.sha256(modes.tobytes()).hexdigest()[:12]
    amp_scale = max(amplitude_scale_for(amp_labels), amplitude_scale_for(np.array([gain]))) if has_amp else 1.0
    facts = {"pre": pre, "pixel_m": float(pixel_m), "probe_id": probe_id, "out": int(out), "input": n_in,
             "geometry": None, "amp_scale": amp_scale}
    return src, facts


# --------------------------------------------------------------------------- held-out scores
def infer_phases(path: str | Path, frames: np.ndarray, threads: int) -> tuple[np.ndarray, Any]:
    """The phase patches a model file infers from canonical ``frames`` (ONNX Runtime on the CPU, in
    batches of 64), and its ModelInfo; TrainError when the model cannot take frames of this size."""
    from ptychostream.model.infer import open_model

    with open_model(path, backend="ONNXRuntime-CPU", threads=threads) as m:
        misfit = m.misfit(frames.shape[1:])
        if misfit:
            raise TrainError(misfit)
        phases = [m.run(frames[s:s + 64])["phase"] for s in range(0, len(frames), 64)]
        return np.concatenate(phases), m.info


def stitch_phases(phase: np.ndarray, positions_m: np.ndarray, pixel_m: float,
                  extent_m: tuple[float, float, float, float], offset: str, domain: str = "phase") -> Any:
    """The mosaic (:class:`~ptychostream.mosaic.stitch.Mosaic`) of phase patches (n, m, m) at
    ``positions_m`` on a canvas of ``extent_m``, stitched as the device does, in batches of 32."""
    from ptychostream.mosaic.stitch import Stitcher

    st = Stitcher(pixel_m, phase.shape[1:], extent_m=extent_m, offset=offset, domain=domain)
    for s in range(0, len(phase), 32):
        st.add(phase[s:s + 32], positions_m[s:s + 32])
    return st.mosaic()


def heldout_scores(models: Mapping[str, str | Path], frames: np.ndarray, positions_m: np.ndarray,
                   reference: Product, split: HeldOut, pixel_m: float, offset: str = "mean",
                   threads: int = 2, truth: Product | None = None, domain: str | None = None) -> dict[str, Any]:
    """Score each model's stitched phase on the held-out frames against the iterative ``reference``.

    ``frames``/``positions_m``: the held-out frames (canonical) and their scan positions.  Every model
    is stitched (:class:`~ptychostream.mosaic.stitch.Stitcher`, ``offset``) at the scan's ``pixel_m``
    on one canvas; the compared pixels are the held-out region where every model's mosaic is valid and
    the reference was scanned.  Returns {name: {"scores": dict or None, "error": str or None},
    "_images": {name: phase}, "_reference": phase, "_mask": mask, "_grid": (origin, pixel)}.  With a
    ``truth`` (a simulation's object as a product) each model also gets ``"truth_scores"`` (the same
    figures against the truth, on the held-out region where the truth was scanned) and the result a
    ``"reference"`` entry: the iterative reference itself scored against the truth there.
    ``domain``: the mosaic domain of every model; None: each model's own stitch hint (as the device
    applies it on a swap; "phase" where the hint names none), recorded as each entry's ``"domain"``.
    """
    from ptychostream.quality.grid import place_truth
    from ptychostream.quality.metrics import ScoreError
    from ptychostream.quality.reference import score_against_product

    pos = np.asarray(positions_m, dtype=np.float64)
    patches: dict[str, np.ndarray] = {}
    domains: dict[str, str] = {}
    result: dict[str, Any] = {}
    for name, path in models.items():
        try:
            patches[name], info = infer_phases(path, frames, threads)
            domains[name] = domain or info.stitch_domain
            result[name] = {"scores": None, "error": None, "model": str(path), "domain": domains[name]}
        except Exception as exc:  # a model that cannot serve these frames scores nothing
            result[name] = {"scores": None, "error": f"{type(exc).__name__}: {exc}", "model": str(path)}
    if not patches:
        return result
    half = max(p.shape[-1] for p in patches.values()) / 2 * pixel_m
    extent = (pos[:, 0].min() - half, pos[:, 0].max() + half, pos[:, 1].min() - half, pos[:, 1].max() + half)
    mosaics = {name: stitch_phases(ph, pos, pixel_m, extent, offset, domains[name]) for name, ph in patches.items()}
    first = next(iter(mosaics.values()))
    common = np.logical_and.reduce([m.mask for m in mosaics.values()])
    region = split.region_box(pad_m=half)
    for name, mos in mosaics.items():
        try:
            sc = score_against_product(mos, reference, region=region, mask=common)
            result[name]["scores"] = sc.as_dict(curves=False)
        except ScoreError as exc:
            result[name]["error"] = str(exc)
        if truth is not None:
            try:
                vt = score_against_product(mos, truth, region=region, mask=common)
                result[name]["truth_scores"] = vt.as_dict(curves=False)
            except ScoreError as exc:
                result[name]["truth_scores"] = None
                result[name]["error"] = (result[name]["error"] or "") + f" (vs the truth: {exc})"
    if truth is not None:
        result["reference"] = {"scores": None, "error": None, "model": reference.source or "reference",
                               "truth_scores": _reference_vs_truth(reference, truth, region)}
    ref_phase, inside = place_truth(reference.object, reference.pixel_m, first.shape, first.origin_m, pixel_m,
                                    reference.center_m)
    yy = first.origin_m[0] + np.arange(first.shape[0])[:, None] * pixel_m
    xx = first.origin_m[1] + np.arange(first.shape[1])[None, :] * pixel_m
    y0, y1, x0, x1 = region
    box = (yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1)
    result["_images"] = {name: m.phase for name, m in mosaics.items()}
    result["_reference"] = ref_phase
    result["_mask"] = common & inside & box
    result["_grid"] = (first.origin_m, pixel_m)
    return result


def _reference_vs_truth(reference: Product, truth: Product, region: tuple[float, float, float, float]
                        ) -> dict[str, Any] | None:
    """The iterative reference's own phase scored against the truth on ``region`` (None if it cannot be)."""
    from ptychostream.quality.grid import centre_origin
    from ptychostream.quality.metrics import ScoreError
    from ptychostream.quality.reference import score_against_product

    origin = centre_origin(reference.object.shape, reference.pixel_m, reference.center_m)
    try:
        sc = score_against_product(np.angle(reference.object), truth, region=region, origin_m=origin,
                                   pixel_m=reference.pixel_m)
    except ScoreError:
        return None
    return sc.as_dict(curves=False)


#: the held-out figures a decision can rest on
METRICS = ("bandpass_corr", "ssim", "both")


def is_better(new: Mapping[str, Any] | None, old: Mapping[str, Any] | None, margin: float = 0.0,
              metric: str = "bandpass_corr") -> tuple[bool, str]:
    """Whether the new model's held-out scores beat the old one's by more than ``margin`` in ``metric``
    (the band-pass correlation, SSIM, or both); (decision, the reason in words)."""
    if metric not in METRICS:
        raise TrainError(f"the decision metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not new:
        return False, "the new model could not be scored on the held-out region"
    bp, ss = float(new["bandpass_corr"]), float(new["ssim"])
    if not old:
        return True, (f"the serving model could not be scored there; the new one has band-pass r {bp:.3f}, "
                      f"SSIM {ss:.3f}")
    bp0, ss0 = float(old["bandpass_corr"]), float(old["ssim"])
    words = f"band-pass r {bp:.3f} vs {bp0:.3f}, SSIM {ss:.3f} vs {ss0:.3f} (on {metric}, margin {margin:g})"
    wins = {"bandpass_corr": bp > bp0 + margin, "ssim": ss > ss0 + margin}
    ok = all(wins.values()) if metric == "both" else wins[metric]
    return ok, ("better" if ok else "not better") + " on the held-out region: " + words
