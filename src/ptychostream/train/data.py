"""Training data: simulated pairs and pairs read from files, as batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ptychostream.model.preprocess import Preprocess
from ptychostream.train.config import (
    KIND_WEIGHTS,
    TRAIN_KINDS,
    TrainConfig,
    TrainError,
    check_finite,
    crop_centre,
)


@dataclass
class Batch:
    x: np.ndarray  # (n, 1, S, S) float32, pre-processed
    phase: np.ndarray  # (n, 1, o, o) float32, mean removed
    amplitude: np.ndarray | None  # (n, 1, o, o) float32


def _targets(patches_phase: np.ndarray, patches_amp: np.ndarray | None, out: int,
             weight: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
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
        self.cfg = cfg
        self.probe = probe
        self.geometry = geometry
        self.pre = pre
        self.out = out
        self.weight = weight
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
        ph, amp = _targets(np.angle(patches), np.abs(patches) if "amplitude" in self.cfg.heads else None,
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
        ph, am = _targets(phase, amp, out, weight)
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


# --------------------------------------------------------------------------- files
def _load_npz(path: Path) -> dict[str, Any]:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: cannot read as NPZ ({exc})") from None
    with z:
        keys = list(z.files)
        if not keys:
            raise TrainError(f"{path}: the NPZ file is empty (no arrays)")
        missing = [k for k in ("reciprocal", "real") if k not in keys]
        if missing:
            raise TrainError(f"{path}: missing {', '.join(repr(k) for k in missing)} "
                             f"(keys present: {', '.join(keys)}); a PtychoNN NPZ holds 'reciprocal' "
                             "(N, H, W) intensities and 'real' complex patches or (N, 2, H, W) phase/amplitude")
        frames = np.asarray(z["reciprocal"])
        real = np.asarray(z["real"])
        pixel = float(np.asarray(z["pixelsize"]).ravel()[0]) if "pixelsize" in keys else None
    if frames.ndim == 4 and frames.shape[1] == 1:
        frames = frames[:, 0]
    if frames.ndim != 3:
        raise TrainError(f"{path}: 'reciprocal' must be (N, H, W), got shape {frames.shape}")
    if frames.dtype.kind not in "biuf":
        raise TrainError(f"{path}: 'reciprocal' must be real intensities, got dtype {frames.dtype}")
    if np.iscomplexobj(real):
        if real.ndim == 4 and real.shape[1] == 1:
            real = real[:, 0]
        if real.ndim != 3:
            raise TrainError(f"{path}: complex 'real' must be (N, h, w), got shape {real.shape}")
        check_finite(f"{path}: 'real'", real)
        phase, amp = np.angle(real), np.abs(real)
    else:
        if real.ndim == 3:
            phase, amp = real, None
        elif real.ndim == 4 and real.shape[1] in (1, 2):
            phase = real[:, 0]
            amp = real[:, 1] if real.shape[1] == 2 else None
        else:
            raise TrainError(f"{path}: real-valued 'real' must be (N, C, h, w) with C0 = phase, C1 = amplitude, "
                             f"got shape {real.shape}")
        check_finite(f"{path}: 'real' (labels)", real)
    return {"frames": frames, "phase": phase, "amp": amp, "pixel_m": pixel, "probe": None,
            "desc": f"{path.name} (PtychoNN NPZ)"}


def _load_product(path: Path, frames_path: str | None) -> dict[str, Any]:
    import h5py

    from ptychostream.sim.forward import extract_patches
    from ptychostream.sim.replay import load_frames

    if not frames_path:
        raise TrainError(f"{path}: a Ptychodus product needs its diffraction frames: pass --frames FILE")
    try:
        with h5py.File(path, "r") as h5:
            missing = [k for k in ("object", "probe_position_x_m", "probe_position_y_m") if k not in h5]
            if missing:
                raise TrainError(f"{path}: not a Ptychodus product, missing {', '.join(missing)}")
            ds = h5["object"]
            obj = np.asarray(ds[()])
            attrs = dict(ds.attrs)
            pos = np.stack([np.asarray(h5["probe_position_y_m"][()], dtype=np.float64).ravel(),
                            np.asarray(h5["probe_position_x_m"][()], dtype=np.float64).ravel()], axis=1)
            probe = np.asarray(h5["probe"][()]) if "probe" in h5 else None
    except OSError as exc:
        raise TrainError(f"{path}: cannot read the product ({exc})") from None
    while obj.ndim > 2:
        obj = obj[0]
    if obj.ndim != 2 or not np.iscomplexobj(obj):
        raise TrainError(f"{path}: 'object' must be complex (layers, H, W), got {obj.dtype} {obj.shape}")
    check_finite(f"{path}: 'object'", obj[None])
    if "pixel_width_m" not in attrs:
        raise TrainError(f"{path}: 'object' has no pixel_width_m attribute")
    px = float(np.asarray(attrs["pixel_width_m"]).ravel()[0])
    cy = float(np.asarray(attrs.get("center_y_m", 0.0)).ravel()[0])
    cx = float(np.asarray(attrs.get("center_x_m", 0.0)).ravel()[0])
    try:
        rep = load_frames(frames_path)
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot read the diffraction frames: {exc}") from None
    frames = rep.frames
    if len(frames) != len(pos):
        raise TrainError(f"{len(frames)} frames in {frames_path} but {len(pos)} positions in {path}")
    if probe is not None:
        while probe.ndim > 2:
            probe = probe[0]
    size = frames.shape[-1] if probe is None else probe.shape[-1]
    try:
        patches = extract_patches(obj, pos - np.array([cy, cx]), px, size)
    except ValueError as exc:
        raise TrainError(f"{path}: {exc}") from None
    return {"frames": frames, "phase": np.angle(patches), "amp": np.abs(patches), "pixel_m": px,
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
