"""Training data: simulated pairs and pairs read from files, as batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ptychostream.files.frames import read_frames
from ptychostream.files.pairs import read_pairs
from ptychostream.files.product import read_product
from ptychostream.model.preprocess import Preprocess
from ptychostream.train.config import (
    KIND_WEIGHTS,
    TRAIN_KINDS,
    TrainConfig,
    TrainError,
    check_finite,
    crop_centre,
)

__all__ = ["Batch", "concat_batches", "SimSource", "ArraySource", "load_pairs", "resample_patches", "fit_labels", "targets"]


@dataclass
class Batch:
    x: np.ndarray  # (n, 1, S, S) float32, pre-processed
    phase: np.ndarray  # (n, 1, o, o) float32, mean removed
    amplitude: np.ndarray | None  # (n, 1, o, o) float32
    #: (n,) bool: the rows whose phase/amplitude are labels (None: all); the others are frames alone
    labelled: np.ndarray | None = None
    #: (n, h, w) float32 measured counts in the network's input geometry, for the physics loss (None: none)
    counts: np.ndarray | None = None
    #: (n, 2) scan positions in metres (y, x), NaN where unknown, for the overlap term (None: none)
    positions_m: np.ndarray | None = None
    #: (n, S, S) complex64 estimate of the object around each frame's patch (NaN rows: none), for the
    #: physics loss's surround
    context: np.ndarray | None = None

    def rows(self, sl: slice) -> Batch:
        """The batch of rows ``sl``."""
        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[sl]

        return Batch(self.x[sl], self.phase[sl], cut(self.amplitude), cut(self.labelled), cut(self.counts),
                     cut(self.positions_m), cut(self.context))


def concat_batches(parts: Sequence[Batch]) -> Batch:
    """Batches joined row-wise; a field some parts lack is filled (unlabelled rows, zero counts with no
    physics term, NaN positions), amplitudes are dropped unless every part has them."""
    if len(parts) == 1:
        return parts[0]
    lens = [len(p.x) for p in parts]
    labelled = None
    if any(p.labelled is not None for p in parts):
        labelled = np.concatenate([np.ones(k, dtype=bool) if p.labelled is None else p.labelled
                                   for p, k in zip(parts, lens)])
    counts = None
    have = [p.counts for p in parts if p.counts is not None]
    if have:
        shape = have[0].shape[1:]
        counts = np.concatenate([np.full((k, *shape), np.nan, dtype=np.float32) if p.counts is None else p.counts
                                 for p, k in zip(parts, lens)])
    pos = None
    if any(p.positions_m is not None for p in parts):
        pos = np.concatenate([np.full((k, 2), np.nan) if p.positions_m is None else p.positions_m
                              for p, k in zip(parts, lens)])
    context = None
    have_ctx = [p.context for p in parts if p.context is not None]
    if have_ctx:
        shape = have_ctx[0].shape[1:]
        context = np.concatenate([np.full((k, *shape), np.nan, dtype=np.complex64) if p.context is None
                                  else p.context for p, k in zip(parts, lens)])
    amps = [p.amplitude for p in parts if p.amplitude is not None]
    amp = np.concatenate(amps) if len(amps) == len(parts) else None
    return Batch(np.concatenate([p.x for p in parts]), np.concatenate([p.phase for p in parts]), amp,
                 labelled, counts, pos, context)


def targets(patches_phase: np.ndarray, patches_amp: np.ndarray | None, out: int,
            weight: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Training targets (n, 1, out, out): the central phase less its ``weight``-ed mean, and the amplitude."""
    ph = crop_centre(patches_phase, out).astype(np.float32)
    mean = (ph * weight).sum(axis=(-2, -1), keepdims=True) / weight.sum()
    ph = ph - mean
    amp = None if patches_amp is None else crop_centre(patches_amp, out).astype(np.float32)
    return ph[:, None], (None if amp is None else amp[:, None])


class SimSource:
    """Simulated training pairs: random positions on a pool of random objects (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, probe: np.ndarray, geometry: Any, pre: Preprocess,
                 out: int, weight: np.ndarray) -> None:
        from ptychostream.sim.objects import OBJECT_KINDS

        bad = [k for k in cfg.objects if k not in OBJECT_KINDS]
        if bad or not cfg.objects:
            raise TrainError(f"unknown object kind(s) {bad or '(none)'}; choose from {', '.join(TRAIN_KINDS)}")
        self.cfg, self.probe, self.geometry = cfg, probe, geometry
        self.pre, self.out, self.weight = pre, out, weight
        kinds = list(cfg.objects)
        p = np.array([KIND_WEIGHTS.get(k, 0.2) for k in kinds], dtype=np.float64)
        self.kinds, self.kind_p = kinds, p / p.sum()
        self._pool_key: tuple | None = None
        self._pool: list[np.ndarray] = []
        self.n_px = int(cfg.object_px)
        if self.n_px < geometry.size + 8:
            raise TrainError(f"--object-px {self.n_px} is too small for {geometry.size}-px patches")

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {"source": "simulated", "objects": self.kinds, "object_px": self.n_px, "pool": c.pool,
                "refresh_steps": c.refresh, "photons": list(c.photons), "max_phase": list(c.max_phase),
                "probe": c.probe}

    def _object(self, stream: int, cycle: int, j: int) -> np.ndarray:
        from ptychostream.sim.objects import make_object

        rng = np.random.default_rng([self.cfg.seed, stream, cycle, j])
        kind = str(rng.choice(self.kinds, p=self.kind_p))
        lo, hi = self.cfg.max_phase
        kw: dict[str, Any] = {"max_phase": float(rng.uniform(lo, hi))}
        if kind == "etched":
            kw.update(scale=float(rng.uniform(0.4, 1.4)), density=float(rng.uniform(0.7, 2.0)))
        elif kind == "blurred_noise":
            kw.update(sigma_px=float(rng.uniform(1.0, 6.0)))
        elif kind == "procedural":
            kw.update(cell_px=float(rng.uniform(10.0, 40.0)))
        elif kind == "dead_leaves":
            kw.update(rmin=float(rng.uniform(1.5, 4.0)))
        elif kind == "circuit":
            kw.update(pitch_px=float(rng.uniform(8.0, 24.0)), density=float(rng.uniform(0.5, 1.5)))
        obj = make_object(kind, (self.n_px, self.n_px), seed=int(rng.integers(2**31)), **kw)
        k = int(rng.integers(4))  # orientation variety
        return np.ascontiguousarray(np.rot90(obj, k))

    def _objects(self, stream: int, cycle: int) -> list[np.ndarray]:
        key = (stream, cycle)
        if self._pool_key != key:
            self._pool = [self._object(stream, cycle, j) for j in range(self.cfg.pool)]
            self._pool_key = key
        return self._pool

    def make(self, n: int, stream: int, index: int, cycle: int) -> Batch:
        """``n`` pairs drawn from the object pool ``(stream, cycle)`` with the generator (seed, stream, index)."""
        from ptychostream.sim.forward import Simulator

        g = self.geometry
        size = g.size
        objs = self._objects(stream, cycle)
        rng = np.random.default_rng([self.cfg.seed, stream + 100, index])
        which = rng.integers(len(objs), size=n)
        reach = (self.n_px // 2 - size // 2 - 2) * g.pixel_m
        # whole-pixel positions: the objects are random anyway, and it saves the sub-pixel FFTs
        pos = np.rint(rng.uniform(-reach, reach, size=(n, 2)) / g.pixel_m) * g.pixel_m
        lo, hi = self.cfg.photons
        photons = np.exp(rng.uniform(np.log(lo), np.log(hi), size=n))
        frames = np.empty((n, size, size), dtype=np.float32)
        patches = np.empty((n, size, size), dtype=np.complex64)
        for j in np.unique(which):
            sel = np.flatnonzero(which == j)
            sim = Simulator(objs[j], self.probe, pos[sel], g, photons=1.0, noise=False,
                            dtype="float32", threads=1)
            frames[sel] = sim.expected(slice(None))
            patches[sel] = sim.patches(slice(None))
        counts = rng.poisson(frames * photons[:, None, None].astype(np.float32)).astype(np.float32)
        x = self.pre.apply(counts)[:, None]
        ph, amp = targets(np.angle(patches), np.abs(patches) if "amplitude" in self.cfg.heads else None,
                           self.out, self.weight)
        return Batch(np.ascontiguousarray(x, dtype=np.float32), ph, amp)

    def steps_per_epoch(self, batch: int) -> int:
        return max(1, self.cfg.samples // batch)

    def batch(self, step: int, n: int) -> Batch:
        return self.make(n, stream=1, index=step, cycle=step // max(1, self.cfg.refresh))

    def validation(self, n: int) -> Batch:
        return self.make(n, stream=3, index=0, cycle=0)


class ArraySource:
    """Pairs held in memory (from files): a seeded shuffle per epoch, a held-out validation split."""

    def __init__(self, cfg: TrainConfig, frames: np.ndarray, phase: np.ndarray, amp: np.ndarray | None,
                 pre: Preprocess, out: int, weight: np.ndarray, description: dict[str, Any]) -> None:
        self.cfg = cfg
        self.weight = weight
        n = len(frames)
        x = pre.apply(frames)[:, None].astype(np.float32)
        ph, am = targets(phase, amp, out, weight)
        rng = np.random.default_rng([cfg.seed, 5])
        order = rng.permutation(n)
        n_val = int(round(cfg.val_fraction * n)) if n >= 10 else 0
        self.val_idx, self.train_idx = order[:n_val], order[n_val:]
        if len(self.train_idx) == 0:
            raise TrainError(f"only {n} training pair(s): nothing left to train on after the validation split")
        self.x, self.ph, self.amp = x, ph, am
        self.desc = description

    def describe(self) -> dict[str, Any]:
        d = dict(self.desc)
        d.update(train_pairs=int(len(self.train_idx)), val_pairs=int(len(self.val_idx)))
        return d

    def _take(self, idx: np.ndarray) -> Batch:
        return Batch(self.x[idx], self.ph[idx], None if self.amp is None else self.amp[idx])

    def steps_per_epoch(self, batch: int) -> int:
        """One pass over the training pairs (the last partial batch is dropped)."""
        return max(1, len(self.train_idx) // batch)

    def batch(self, step: int, n: int) -> Batch:
        per_epoch = self.steps_per_epoch(n)
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([self.cfg.seed, 6, epoch]).permutation(self.train_idx)
        if len(order) < n:
            return self._take(order)
        return self._take(order[k * n:(k + 1) * n])

    def validation(self, n: int) -> Batch | None:
        if len(self.val_idx) == 0:
            return None
        return self._take(self.val_idx[:n])


# --------------------------------------------------------------------------- labels
def resample_patches(patches: np.ndarray, out: int, zoom: float = 1.0, order: int = 1) -> np.ndarray:
    """Patches (N, h, w) resampled by ``zoom`` (label pixel / wanted pixel) to the central (N, out, out).

    Centre pixel (h // 2, w // 2) stays the centre (out // 2, out // 2); with ``zoom`` 1 and
    ``out`` <= h, w this is a centre crop.  Complex patches are resampled as a complex field (a
    phase wrap costs nothing), real ones as they are (``scipy.ndimage.map_coordinates``, spline
    ``order``).  ValueError if the resampled patch does not cover ``out`` pixels.
    """
    arr = np.asarray(patches)
    if arr.ndim != 3:
        raise ValueError(f"patches must be (N, h, w), got shape {arr.shape}")
    n, h, w = arr.shape
    if not (math.isfinite(zoom) and zoom > 0):
        raise ValueError(f"zoom must be a positive number, got {zoom!r}")
    if abs(zoom - 1.0) < 1e-6:
        if out > min(h, w):
            raise ValueError(f"{h}x{w} labels cannot give {out}x{out} outputs at the same pixel")
        return np.ascontiguousarray(crop_centre(arr, out))
    reach = (out // 2) / zoom, (out - 1 - out // 2) / zoom
    if h // 2 - reach[0] < -0.5 or h // 2 + reach[1] > h - 0.5 or w // 2 - reach[0] < -0.5 \
            or w // 2 + reach[1] > w - 0.5:
        raise ValueError(f"{h}x{w} labels resampled by {zoom:.4g} do not cover {out}x{out} outputs")
    from scipy.ndimage import map_coordinates

    axis = (np.arange(out) - out // 2) / zoom
    rr, cc = np.meshgrid(h // 2 + axis, w // 2 + axis, indexing="ij")
    parts = (arr.real, arr.imag) if np.iscomplexobj(arr) else (arr,)
    res = []
    for part in parts:
        stack = np.empty((n, out, out), dtype=np.float32)
        for k in range(n):
            stack[k] = map_coordinates(part[k].astype(np.float64), [rr, cc], order=order, mode="nearest")
        res.append(stack)
    return (res[0] + 1j * res[1]).astype(np.complex64) if len(res) == 2 else res[0]


def fit_labels(phase: np.ndarray, amp: np.ndarray | None, out: int, zoom: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Phase (and amplitude) labels of any size mapped to the model's (N, out, out) output patches.

    ``zoom`` = the labels' pixel / the model's pixel.  The labels are resampled as the complex field
    amp·exp(i·phase) (phase wraps are safe), so phase and amplitude stay consistent.
    """
    if abs(zoom - 1.0) < 1e-6:
        return (resample_patches(phase, out).astype(np.float32),
                None if amp is None else resample_patches(amp, out).astype(np.float32))
    field = (np.ones_like(phase) if amp is None else amp) * np.exp(1j * np.asarray(phase, dtype=np.float64))
    res = resample_patches(field.astype(np.complex64), out, zoom)
    return np.angle(res).astype(np.float32), (None if amp is None else np.abs(res).astype(np.float32))


# --------------------------------------------------------------------------- files
def _load_npz(path: Path) -> dict[str, Any]:
    try:
        d = read_pairs(path)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    return {"frames": d.frames, "phase": d.phase, "amp": d.amplitude, "pixel_m": d.pixel_m, "probe": None,
            "desc": f"{path.name} (PtychoNN NPZ)"}


def _load_product(path: Path, frames_path: str | None) -> dict[str, Any]:
    from ptychostream.sim.forward import extract_patches

    if not frames_path:
        raise TrainError(f"{path}: a Ptychodus product needs its diffraction frames: pass --frames FILE")
    try:
        product = read_product(path)
    except (OSError, ValueError) as exc:
        raise TrainError(str(exc)) from None
    try:
        frames = read_frames(frames_path).frames
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot read the diffraction frames: {exc}") from None
    pos = product.positions_m
    assert pos is not None  # read_product refuses a product without positions
    if len(frames) != len(pos):
        raise TrainError(f"{len(frames)} frames in {frames_path} but {len(pos)} positions in {path}")
    probe = product.probe
    size = frames.shape[-1] if probe is None else probe.shape[-1]
    try:
        patches = extract_patches(product.object, pos - np.array(product.center_m), product.pixel_m, size)
    except ValueError as exc:
        raise TrainError(f"{path}: {exc}") from None
    return {"frames": frames, "phase": np.angle(patches), "amp": np.abs(patches), "pixel_m": product.pixel_m,
            "probe": probe, "desc": f"{path.name} + {Path(frames_path).name} (Ptychodus product)"}


def load_pairs(paths: Sequence[str], frames_path: str | None = None) -> dict[str, Any]:
    """Training pairs from PtychoNN NPZ files and/or a Ptychodus product (+ ``frames_path``).

    Returns ``frames`` (N, H, W), ``phase`` (N, h, w), ``amp`` (N, h, w) or None, ``pixel_m``,
    ``probe`` (or None) and a description.  Raises :class:`TrainError` on anything unusable.
    """
    import h5py

    parts = []
    for spec in paths:
        path = Path(spec)
        if not path.is_file():
            raise TrainError(f"training file not found: {path}")
        if path.suffix.lower() == ".npz":
            parts.append(_load_npz(path))
        elif h5py.is_hdf5(path):
            parts.append(_load_product(path, frames_path))
        else:
            raise TrainError(f"{path}: not a PtychoNN .npz or a Ptychodus product HDF5")
    for part, spec in zip(parts, paths):
        f, ph = part["frames"], part["phase"]
        if len(f) == 0:
            raise TrainError(f"{spec}: no training pairs (0 frames)")
        if len(f) != len(ph):
            raise TrainError(f"{spec}: {len(f)} diffraction frames but {len(ph)} labels; they must pair up")
        if part["amp"] is not None and part["amp"].shape != ph.shape:
            raise TrainError(f"{spec}: amplitude labels {part['amp'].shape} differ from phase labels {ph.shape}")
        check_finite(f"{spec}: the diffraction frames", f)
        check_finite(f"{spec}: the phase labels", ph)
        if part["amp"] is not None:
            check_finite(f"{spec}: the amplitude labels", part["amp"])
    shapes = {(p["frames"].shape[1:], p["phase"].shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise TrainError(f"the training files disagree on frame/label shapes: {sorted(shapes)}")
    has_amp = all(p["amp"] is not None for p in parts)
    out = {
        "frames": np.concatenate([p["frames"] for p in parts]),
        "phase": np.concatenate([p["phase"] for p in parts]).astype(np.float32),
        "amp": np.concatenate([p["amp"] for p in parts]).astype(np.float32) if has_amp else None,
        "pixel_m": next((p["pixel_m"] for p in parts if p["pixel_m"]), None),
        "probe": next((p["probe"] for p in parts if p["probe"] is not None), None),
        "desc": [p["desc"] for p in parts],
    }
    return out
