"""Train a PtychoNN-class network (PyTorch) and export it as a ptychostream ONNX model.

``ptychostream train OUT.onnx`` trains on

* **simulated pairs** (the default, ``--data sim``): random positions over random synthetic
  objects (families ``etched``, ``circuit``, ``dead_leaves``, ``blurred_noise``, ``procedural``;
  ``digits`` and ``siemens`` are held out for the demo), a simulated zone-plate or Gaussian probe or a
  measured one (``--probe FILE``: Ptychodus product HDF5 or ``.npy``), far-field frames with
  Poisson noise at ``--photons``;  the data stream is a pure function of (seed, step), so a
  resumed run sees the same batches;
* **pairs from files** (``--data FILE``, repeatable): PtychoNN NPZ (``reciprocal`` (N, H, W)
  intensities; ``real`` complex (N, h, w) patches or (N, C, h, w) with C0 = phase,
  C1 = amplitude), or a Ptychodus product HDF5 (``object``, ``probe_position_x_m``/``_y_m``)
  together with its diffraction file (``--frames FILE``): the patches are cut at the positions.

The network (:func:`build_net`) follows :mod:`ptychostream.modelzoo`: an encoder of ``depth``
blocks [conv3×3+ReLU ×2, maxpool 2] with base·2^k channels, one decoder per head of ``depth``
blocks [conv3×3+ReLU ×2, bilinear ×2] and a conv3×3 to one channel; phase = tanh·π, amplitude =
sigmoid.  With ``--output-size`` smaller than the input the decoders start from the central
cells of the bottleneck and give the central ``output-size``² of the patch: only the area the
probe lights can be learned, and a patch that holds just that area stitches into a sharper
mosaic (see docs/quality.md).  ``auto`` picks the square around 97 % of the probe's intensity.

Targets: the phase has its (probe-weighted) mean removed — a far-field intensity does not
know the absolute phase — and the loss is an L1 weighted by the probe intensity (smoothed,
saturated at 20 % of its peak, with a floor ``--loss-floor`` elsewhere), on the phase plus
``--amp-weight`` × the amplitude.  Adam with a one-cycle (or cyclic) learning rate, fixed seeds,
a rich progress bar, resumable checkpoints (``--checkpoint DIR``) and ``--device cpu|cuda``;
``--precision bf16`` (autocast) and channels-last convolutions for speed, an optional L1 loss on
the error's finite differences (``--grad-weight``) for sharper edges, and ``--init MODEL.onnx``
to continue from an exported model (the seed's retraining after each scan).

The export has a dynamic batch dimension (opset 17), the pre-processing (``Preprocess``) and
the rest of the metadata ``ptychostream.*`` (see :mod:`ptychostream.infer`), is checked against
torch with onnxruntime (1e-4) and with ``open_model(...).selftest()``, and is written to a
temporary file beside the target and renamed over it only when all checks pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .preprocess import Preprocess

__all__ = [
    "TRAIN_KINDS", "TrainConfig", "TrainError", "ArraySource", "SimSource", "build_net", "export_onnx",
    "load_conv_weights", "load_pairs", "net_from_onnx", "probe_weight", "train", "warm_start", "add_train_parser",
]

#: object families used for training (digits and siemens are held out for the demo)
TRAIN_KINDS: tuple[str, ...] = ("etched", "circuit", "dead_leaves", "blurred_noise", "procedural")
#: default mix of the families
KIND_WEIGHTS = {"etched": 0.3, "circuit": 0.25, "dead_leaves": 0.15, "blurred_noise": 0.1, "procedural": 0.2}
PRECISIONS = ("fp32", "bf16")
HEADS = ("amplitude", "phase")
CHECKPOINT_NAME = "last.pt"


class TrainError(ValueError):
    """Bad training input or settings; the message says what to fix."""


# =========================================================================== config
@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in checkpoints and in the ONNX metadata)."""

    output: str = "model.onnx"
    # data
    data: tuple[str, ...] = ("sim",)
    frames: str | None = None
    objects: tuple[str, ...] = TRAIN_KINDS
    probe: str = "zoneplate"
    energy_keV: float = 10.0
    distance_m: float = 2.0
    detector_pixel_m: float = 75e-6
    size: int = 128
    crop: int | None = None
    bin: int = 1
    photons: tuple[float, float] = (1e6, 1e6)
    max_phase: tuple[float, float] = (0.6, 1.0)
    object_px: int = 384
    pool: int = 16
    refresh: int = 50
    pixel_m: float | None = None
    val: int = 256
    val_fraction: float = 0.1
    # network
    heads: tuple[str, ...] = HEADS
    base_channels: int = 16
    depth: int = 4
    output_size: int | str = "auto"
    # pre-processing
    scale: str = "sqrt"
    normalise: str = "mean"
    # optimisation
    epochs: int = 20
    samples: int = 4096
    batch: int = 32
    lr: float = 2e-3
    schedule: str = "onecycle"
    amp_weight: float = 1.0
    grad_weight: float = 0.0
    loss_floor: float = 0.05
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    checkpoint: str | None = None
    time_limit_s: float | None = None
    budget_s: float | None = None
    name: str | None = None
    init: str | None = None
    precision: str = "fp32"

    def key(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed (not output/device/limits)."""
        d = asdict(self)
        for k in ("output", "device", "threads", "checkpoint", "time_limit_s", "budget_s", "name", "epochs",
                  "precision"):
            d.pop(k)
        return json.loads(json.dumps(d))


# =========================================================================== helpers
def _torch():
    try:
        import torch
    except ImportError:
        raise TrainError("training needs PyTorch: pip install 'ptychostream[train]' (or torch>=2.2)") from None
    return torch


def _finite(name: str, arr: np.ndarray) -> None:
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
        bad = int((~np.isfinite(arr)).reshape(len(arr), -1).any(axis=1).sum()) if arr.ndim > 1 else 1
        raise TrainError(f"{name} holds NaN or infinite values ({bad} sample(s)); clean the data first")


def _crop(a: np.ndarray, out: int) -> np.ndarray:
    """Centre crop of the last two axes so that pixel (h//2, w//2) stays the centre."""
    h, w = a.shape[-2:]
    r0, c0 = h // 2 - out // 2, w // 2 - out // 2
    return a[..., r0:r0 + out, c0:c0 + out]


def probe_weight(probe: np.ndarray | None, size: int, out: int, floor: float = 0.05,
                 saturate: float = 0.2, sigma_px: float = 2.0) -> np.ndarray:
    """Loss weight (out, out) float32: smoothed probe intensity / (saturate·peak), clipped to 1, ≥ floor.

    Without a probe every pixel weighs 1.
    """
    if probe is None:
        return np.ones((out, out), dtype=np.float32)
    from scipy.ndimage import gaussian_filter

    inten = gaussian_filter(np.abs(np.asarray(probe, dtype=np.complex128)) ** 2, sigma_px, mode="constant")
    inten /= inten.max()
    w = np.clip(inten / saturate, 0.0, 1.0)
    w = floor + (1.0 - floor) * w
    return _crop(w, out).astype(np.float32)


def auto_output_size(probe: np.ndarray | None, size: int, depth: int, energy: float = 0.97) -> int:
    """Smallest centred square (a multiple of 2**depth) that holds ``energy`` of the probe intensity."""
    step = 2 ** depth
    if probe is None:
        return size
    inten = np.abs(np.asarray(probe)) ** 2
    total = float(inten.sum())
    for out in range(step, size + 1, step):
        if float(_crop(inten, out).sum()) >= energy * total:
            return out
    return size


def _parse_range(text: str | float | Sequence[float], what: str, positive: bool = True) -> tuple[float, float]:
    if isinstance(text, (tuple, list)):
        lo, hi = (float(v) for v in text)
    else:
        parts = str(text).split(":")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise TrainError(f"{what} must be a number or LO:HI, got {text!r}") from None
        if len(vals) == 1:
            lo = hi = vals[0]
        elif len(vals) == 2:
            lo, hi = vals
        else:
            raise TrainError(f"{what} must be a number or LO:HI, got {text!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo or (positive and lo <= 0):
        raise TrainError(f"{what} must be {'positive ' if positive else ''}with LO <= HI, got {text!r}")
    return float(lo), float(hi)


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:12]


# =========================================================================== data
@dataclass
class Batch:
    x: np.ndarray  # (n, 1, S, S) float32, pre-processed
    phase: np.ndarray  # (n, 1, o, o) float32, mean removed
    amplitude: np.ndarray | None  # (n, 1, o, o) float32


def _targets(patches_phase: np.ndarray, patches_amp: np.ndarray | None, out: int,
             weight: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    ph = _crop(patches_phase, out).astype(np.float32)
    mean = (ph * weight).sum(axis=(-2, -1), keepdims=True) / weight.sum()
    ph = ph - mean
    amp = None if patches_amp is None else _crop(patches_amp, out).astype(np.float32)
    return ph[:, None], (None if amp is None else amp[:, None])


class SimSource:
    """Simulated training pairs: random positions on a pool of random objects (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, probe: np.ndarray, geometry: Any, pre: Preprocess,
                 out: int, weight: np.ndarray) -> None:
        from .sim.objects import OBJECT_KINDS

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
        from .sim.objects import make_object

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
        from .sim.forward import Simulator

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
        _finite(f"{path}: 'real'", real)
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
        _finite(f"{path}: 'real' (labels)", real)
    return {"frames": frames, "phase": phase, "amp": amp, "pixel_m": pixel, "probe": None,
            "desc": f"{path.name} (PtychoNN NPZ)"}


def _load_product(path: Path, frames_path: str | None) -> dict[str, Any]:
    import h5py

    from .sim.forward import extract_patches
    from .sim.replay import load_frames

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
    _finite(f"{path}: 'object'", obj[None])
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
        _finite(f"{spec}: the diffraction frames", f)
        _finite(f"{spec}: the phase labels", ph)
        if part["amp"] is not None:
            _finite(f"{spec}: the amplitude labels", part["amp"])
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


# =========================================================================== network
def build_net(size: int = 128, base_channels: int = 16, depth: int = 4, heads: Sequence[str] = HEADS,
              output_size: int | None = None, batchnorm: bool = True):
    """The PtychoNN-class torch module (see the module docstring); returns an ``nn.Module``.

    ``forward(x)`` takes (n, 1, size, size) and returns a tuple of (n, 1, o, o) tensors in
    ``heads`` order, o = ``output_size`` (default ``size``).  ``batchnorm`` puts a BatchNorm
    after every 3×3 conv but the last (it trains much faster); the export folds it into the
    convs, so the ONNX graph has the plain conv/ReLU layout either way.  Convs are
    He-initialised.
    """
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional
    heads = tuple(heads)
    if not heads or len(set(heads)) != len(heads) or not set(heads) <= set(HEADS):
        raise TrainError(f"heads must be distinct names from {HEADS}, got {heads}")
    if depth < 1 or size % (2 ** depth):
        raise TrainError(f"input size {size} must be divisible by 2**depth = {2 ** depth}")
    out = size if output_size is None else int(output_size)
    cell = 2 ** depth
    if out < cell or out > size or out % cell or (size - out) % (2 * cell):
        raise TrainError(f"output size {out} must be a multiple of {cell} (2**depth) between {cell} and {size}, "
                         f"centred (input − output a multiple of {2 * cell})")

    def conv(cin: int, c: int) -> list:
        if batchnorm:
            return [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        return [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU(inplace=True)]

    def pair(cin: int, c: int) -> list:
        return conv(cin, c) + conv(c, c)

    class Up(nn.Module):
        def forward(self, x):  # noqa: D401 - bilinear ×2 (ONNX Resize, half-pixel)
            return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    class PtychoNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            chans = [base_channels * 2 ** k for k in range(depth)]
            layers: list = []
            cin = 1
            for c in chans:
                layers += pair(cin, c) + [nn.MaxPool2d(2)]
                cin = c
            self.encoder = nn.Sequential(*layers)
            self.heads = heads
            self.cells = out // cell
            self.skip = (size // cell - self.cells) // 2
            self.decoders = nn.ModuleList()
            for _ in heads:
                layers, ci = [], cin
                for c in reversed(chans):
                    layers += pair(ci, c) + [Up()]
                    ci = c
                layers.append(nn.Conv2d(ci, 1, 3, padding=1))
                self.decoders.append(nn.Sequential(*layers))
            self.config = {"size": size, "base_channels": base_channels, "depth": depth, "heads": list(heads),
                           "output_size": out, "batchnorm": bool(batchnorm)}
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
            for dec in self.decoders:  # a calm start for tanh / sigmoid
                nn.init.normal_(dec[-1].weight, std=1e-3)

        def forward(self, x):
            z = self.encoder(x)
            if self.skip:
                z = z[:, :, self.skip:self.skip + self.cells, self.skip:self.skip + self.cells]
            outs = []
            for head, dec in zip(self.heads, self.decoders):
                y = dec(z)
                outs.append(torch.tanh(y) * math.pi if head == "phase" else torch.sigmoid(y))
            return tuple(outs)

    return PtychoNN()


# =========================================================================== export
def fuse_batchnorm(net: Any) -> Any:
    """A copy of ``net`` in eval mode with every Conv2d→BatchNorm2d pair folded into one Conv2d."""
    import copy

    torch = _torch()
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()

    def walk(module: Any) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Sequential):
                items, out = list(child), []
                i = 0
                while i < len(items):
                    if (isinstance(items[i], torch.nn.Conv2d) and i + 1 < len(items)
                            and isinstance(items[i + 1], torch.nn.BatchNorm2d)):
                        out.append(fuse_conv_bn_eval(items[i], items[i + 1]))
                        i += 2
                    else:
                        walk(items[i])
                        out.append(items[i])
                        i += 1
                setattr(module, name, torch.nn.Sequential(*out))
            else:
                walk(child)

    walk(net)
    return net


def _ir_version(opset: int) -> int:
    from .modelzoo import _ir_version as irv

    return irv(opset)


def _file_mode(path: Path) -> int:
    """The mode a new file gets (0666 less the umask), or the existing file's mode."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def export_onnx(net: Any, path: str | Path, metadata: dict[str, Any], opset: int = 17, check: bool = True,
                tolerance: float = 1e-4) -> dict[str, Any]:
    """Export ``net`` to ``path`` (dynamic batch), add ``metadata``, verify, and rename into place.

    Verification: onnxruntime vs torch on a random batch of 3 (max |Δ| ≤ ``tolerance``) and
    ``ptychostream.infer.open_model(...).selftest()``.  The file is written to a temporary
    name in the target folder and ``os.replace``\\ d over ``path`` only when all checks pass, so
    an existing model is never left half-written.  Returns {max_abs_diff, params, bytes}.
    """
    torch = _torch()
    import onnx

    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        raise TrainError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise TrainError(f"cannot write {path}: folder {folder} is not writable")
    if path.exists() and path.is_dir():
        raise TrainError(f"cannot write {path}: it is a folder")
    cfg = net.config
    heads = list(cfg["heads"])
    size = int(cfg["size"])
    net = fuse_batchnorm(net.to("cpu")).to(memory_format=torch.contiguous_format)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        dummy = torch.zeros(2, 1, size, size)
        dyn = {"input": {0: "N"}, **{h: {0: "N"} for h in heads}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw: dict[str, Any] = dict(input_names=["input"], output_names=heads, dynamic_axes=dyn,
                                      opset_version=opset, do_constant_folding=True)
            try:
                torch.onnx.export(net, (dummy,), str(tmp), dynamo=False, **kw)
            except TypeError:  # torch without the dynamo switch
                torch.onnx.export(net, (dummy,), str(tmp), **kw)
        model = onnx.load(str(tmp))
        model.ir_version = min(model.ir_version, _ir_version(opset))
        model.producer_name = "ptychostream.train"
        del model.metadata_props[:]
        for k, v in metadata.items():
            e = model.metadata_props.add()
            e.key = str(k)
            e.value = v if isinstance(v, str) else json.dumps(v)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        diff = 0.0
        if check:
            import onnxruntime as ort

            x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 1, size, size)).astype(np.float32))
            with torch.no_grad():
                want = [t.numpy() for t in net(x)]
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
            got = sess.run(heads, {"input": x.numpy()})
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(want, got))
            if not diff <= tolerance:
                raise TrainError(f"the ONNX export differs from torch by {diff:.3g} (> {tolerance:g})")
            from .infer import ModelError, open_model

            try:
                with open_model(tmp, backend="ONNXRuntime-CPU", threads=2) as m:
                    m.selftest()
            except ModelError as exc:
                raise TrainError(f"the exported model fails its self-test: {exc}") from None
        from .modelzoo import count_parameters

        params = count_parameters(model)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; a model is a normal file
        os.replace(tmp, path)
    except OSError as exc:
        raise TrainError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return {"max_abs_diff": diff, "params": params, "bytes": path.stat().st_size}


# =========================================================================== training
def _resolve_probe(cfg: TrainConfig, geometry: Any) -> tuple[np.ndarray, str]:
    from .sim.probes import PROBE_KINDS, load_probe, make_probe

    if cfg.probe in PROBE_KINDS:
        probe = make_probe(cfg.probe, geometry.size, geometry.pixel_m, geometry=geometry)
        return probe, f"sim-{cfg.probe}-{geometry.size}-{_sha(probe)}"
    path = Path(cfg.probe)
    try:
        probe, px = load_probe(path)
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot use probe {cfg.probe!r}: {exc} (or name one of {', '.join(PROBE_KINDS)})") from None
    if probe.shape != (geometry.size, geometry.size):
        raise TrainError(f"probe {path} is {probe.shape}, the frames are {geometry.size}x{geometry.size}")
    if px is not None and abs(px / geometry.pixel_m - 1) > 0.01:
        raise TrainError(f"probe {path} has a pixel of {px:.4g} m but the geometry gives {geometry.pixel_m:.4g} m; "
                         "adjust --energy-kev/--distance-m/--detector-pixel-m")
    return probe, f"{path.stem}-{_sha(probe)}"


def _make_source(cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """The data source and the facts the export needs (pre-processing, pixel, probe id, sizes)."""
    from .sim.forward import Geometry

    pre = Preprocess(scale=cfg.scale, normalise=cfg.normalise, crop_size=cfg.crop, bin=int(cfg.bin))
    try:
        pre.validate()
        n_in = int(pre.output_shape((cfg.size, cfg.size))[-1])
    except ValueError as exc:
        raise TrainError(f"pre-processing: {exc}") from None
    if list(cfg.data) == ["sim"]:
        try:
            g = Geometry(cfg.energy_keV, cfg.distance_m, cfg.detector_pixel_m, cfg.size)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        probe, probe_id = _resolve_probe(cfg, g)
        out = auto_output_size(probe, n_in, cfg.depth) if cfg.output_size == "auto" else int(cfg.output_size)
        weight = probe_weight(probe, cfg.size, out, cfg.loss_floor)
        src = SimSource(cfg, probe, g, pre, out, weight)
        facts = {"pre": pre, "pixel_m": g.pixel_m, "probe_id": probe_id, "out": out, "input": n_in,
                 "geometry": {"energy_keV": g.energy_keV, "distance_m": g.distance_m,
                              "detector_pixel_m": g.detector_pixel_m, "size": g.size}}
        return src, facts
    if "sim" in cfg.data:
        raise TrainError("--data sim cannot be mixed with training files")
    pairs = load_pairs(cfg.data, cfg.frames)
    frames = pairs["frames"]
    H, W = frames.shape[1:]
    try:
        if cfg.crop or cfg.bin > 1:
            n_in = int(pre.output_shape((H, W))[-1])
        else:
            pre = pre.fit_to((H, W), (cfg.size, cfg.size))
            n_in = cfg.size
    except ValueError as exc:
        raise TrainError(f"the frames ({H}x{W}) cannot feed a {cfg.size}x{cfg.size} model: {exc}") from None
    lh, lw = pairs["phase"].shape[1:]
    if (lh, lw) != (cfg.size, cfg.size):
        raise TrainError(f"the labels are {lh}x{lw} but the model works on {cfg.size}x{cfg.size} patches; "
                         f"pass --size {lh} (and frames that crop/bin to it)")
    if "amplitude" in cfg.heads and pairs["amp"] is None:
        raise TrainError("the files hold phase labels only; train with --heads phase")
    probe = pairs["probe"]
    if probe is not None and probe.shape != (cfg.size, cfg.size):
        probe = None
    out = auto_output_size(probe, n_in, cfg.depth) if cfg.output_size == "auto" else int(cfg.output_size)
    weight = probe_weight(probe, cfg.size, out, cfg.loss_floor)
    src = ArraySource(cfg, frames, pairs["phase"], pairs["amp"] if "amplitude" in cfg.heads else None,
                      pre, out, weight, {"source": "files", "files": pairs["desc"], "pairs": int(len(frames))})
    pixel = cfg.pixel_m or pairs["pixel_m"]
    probe_id = f"files-{_sha(probe)}" if probe is not None else "unknown"
    return src, {"pre": pre, "pixel_m": pixel, "probe_id": probe_id, "out": out, "input": n_in,
                 "geometry": None}


def _scheduler(torch: Any, opt: Any, cfg: TrainConfig, total: int) -> Any:
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 10),
                                                   pct_start=0.25, div_factor=20.0, final_div_factor=200.0)
    if cfg.schedule == "cyclic":
        half = max(1, total // 8)
        return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=cfg.lr / 10, max_lr=cfg.lr, step_size_up=half,
                                                 mode="triangular2", cycle_momentum=False)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    raise TrainError(f"--schedule must be onecycle, cyclic or constant, got {cfg.schedule!r}")


class _ClockSchedule:
    """One-cycle learning rate (cosine up over the first 25 %, cosine down) on a progress clock 0..1."""

    def __init__(self, opt: Any, max_lr: float, progress: Any, pct: float = 0.25, div: float = 20.0,
                 final_div: float = 200.0) -> None:
        self.opt, self.hi, self.progress, self.pct = opt, max_lr, progress, pct
        self.lo, self.end = max_lr / div, max_lr / div / final_div
        self.step()

    def lr(self, p: float) -> float:
        p = min(max(p, 0.0), 1.0)
        if p < self.pct:
            return self.lo + (self.hi - self.lo) * (1 - math.cos(math.pi * p / self.pct)) / 2
        q = (p - self.pct) / (1 - self.pct)
        return self.hi + (self.end - self.hi) * (1 - math.cos(math.pi * q)) / 2

    def step(self) -> None:
        self.last = self.lr(self.progress())
        for group in self.opt.param_groups:
            group["lr"] = self.last

    def get_last_lr(self) -> list[float]:
        return [self.last]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _save_checkpoint(torch: Any, folder: Path, state: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".last.", suffix=".pt.tmp", dir=folder)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, folder / CHECKPOINT_NAME)
    except OSError as exc:
        raise TrainError(f"cannot write the checkpoint in {folder}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_init(cfg: TrainConfig, facts: dict[str, Any]) -> Any:
    """The --init model must take the same input as this run (pre-processing, pixel); returns its ModelInfo."""
    from .infer import ModelError, load_model_file

    try:
        info = load_model_file(cfg.init)
    except ModelError as exc:
        raise TrainError(f"--init: {exc}") from None
    if info.kind != "onnx":
        raise TrainError(f"--init {cfg.init}: training continues from an ONNX model, not an engine")
    want, have = facts["pre"].to_dict(), info.preprocess.to_dict()
    bad = [f"{k} {have.get(k)!r} (this run: {want.get(k)!r})" for k in sorted(want) if have.get(k) != want.get(k)]
    if bad:
        raise TrainError(f"--init {cfg.init}: its pre-processing differs: {'; '.join(bad)}; pass the options "
                         "it was trained with (--crop, --bin, --scale, --normalise)")
    if info.pixel_m and facts["pixel_m"] and abs(info.pixel_m / facts["pixel_m"] - 1) > 1e-3:
        raise TrainError(f"--init {cfg.init}: its object pixel is {info.pixel_m:.4g} m, this run's is "
                         f"{facts['pixel_m']:.4g} m")
    return info


def _check_output_path(path: Path) -> None:
    folder = path.resolve().parent
    if path.suffix.lower() != ".onnx":
        raise TrainError(f"the output must be an .onnx file, got {path}")
    if not folder.is_dir():
        raise TrainError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise TrainError(f"cannot write {path}: folder {folder} is not writable")
    if path.is_dir():
        raise TrainError(f"cannot write {path}: it is a folder")


def _loss(torch: Any, outs: tuple, batch: Any, heads: Sequence[str], weight: Any, amp_weight: float,
          grad_weight: float = 0.0):
    """Probe-weighted L1 per head (the reported parts), plus ``grad_weight`` × the L1 of the
    difference of the finite differences along y and x (it penalises blurred edges)."""
    total = 0.0
    parts = {}
    wsum = weight.sum()
    for head, pred in zip(heads, outs):
        pred = pred.float()
        target = batch["phase"] if head == "phase" else batch["amplitude"]
        diff = pred - target
        err = (diff.abs() * weight).sum(dim=(-2, -1)).mean() / wsum
        parts[head] = err
        term = err
        if grad_weight:
            gy = (diff[..., 1:, :] - diff[..., :-1, :]).abs() * torch.minimum(weight[1:, :], weight[:-1, :])
            gx = (diff[..., :, 1:] - diff[..., :, :-1]).abs() * torch.minimum(weight[:, 1:], weight[:, :-1])
            term = term + grad_weight * (gy.sum(dim=(-2, -1)) + gx.sum(dim=(-2, -1))).mean() / (2 * wsum)
        total = total + (term if head == "phase" else amp_weight * term)
    return total, parts


def _read_onnx(path: str | Path, what: str) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # missing, truncated or not ONNX
        raise TrainError(f"{what} {path}: cannot read it as ONNX ({exc})") from None


def load_conv_weights(net: Any, model: Any, what: str = "model") -> None:
    """Copy the Conv weights of an ONNX graph exported by :func:`export_onnx` into ``net``.

    Convolutions pair up in graph order with the ``Conv2d`` modules of ``net`` (the order in
    which the export traced them); any difference in count or shape raises TrainError.
    """
    torch = _torch()
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # the exporter shares equal tensors through Identity nodes
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
        elif node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    mods = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != len(mods):
        raise TrainError(f"{what} has {len(convs)} convolutions, the network has {len(mods)}; "
                         "pass the same --base-channels, --depth, --heads and --output-size as its training")
    with torch.no_grad():
        for k, (node, mod) in enumerate(zip(convs, mods)):
            w = inits.get(node.input[1])
            b = inits.get(node.input[2]) if len(node.input) > 2 else np.zeros(mod.out_channels, np.float32)
            if w is None or b is None or tuple(w.shape) != tuple(mod.weight.shape):
                got = "a computed weight" if w is None or b is None else f"weights {tuple(w.shape)}"
                raise TrainError(f"{what}: convolution {k} has {got}, the network needs "
                                 f"{tuple(mod.weight.shape)}; pass the architecture it was trained with")
            mod.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
            mod.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))


def net_from_onnx(path: str | Path, config: dict[str, Any]) -> Any:
    """The torch module of a model this command exported: :func:`build_net` with the layout
    ``config`` (the ``net`` entry of its ``ptychostream.training`` metadata, as
    ``ModelInfo.training`` holds it), without BatchNorm (the export folded it), and the file's
    weights.  Used by the PyTorch backend."""
    try:
        net = build_net(int(config["size"]), int(config["base_channels"]), int(config["depth"]),
                        tuple(config["heads"]), int(config["output_size"]), batchnorm=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise TrainError(f"{path}: unusable network layout {config!r} ({exc})") from None
    load_conv_weights(net, _read_onnx(path, "model"), str(path))
    return net.eval()


def warm_start(net: Any, path: str | Path, x: Any) -> float:
    """Load an exported model's weights into ``net`` (same layout) to continue training from it.

    The export folds each BatchNorm into its convolution, so the convolutions take the file's
    weights and each BatchNorm is set to the identity on the batch ``x`` (data-dependent
    initialisation: γ = σ, β = μ, running statistics = μ, σ²).  Returns the largest difference
    between the initialised ``net`` (eval mode) and the file run by onnxruntime on ``x``.
    """
    torch = _torch()
    model = _read_onnx(path, "--init")
    load_conv_weights(net, model, f"--init {path}")
    with torch.no_grad():
        stats: dict[Any, tuple[Any, Any]] = {}

        def identity(bn: Any, inputs: tuple) -> None:
            y = inputs[0].float()
            mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mean)
            stats[bn] = (mean.clone(), var.clone())

        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        hooks = [bn.register_forward_pre_hook(identity) for bn in bns]
        was_training = net.training
        try:
            net.train()
            net(x)
        finally:
            for h in hooks:
                h.remove()
        for bn, (mean, var) in stats.items():  # the pass above also moved the running statistics
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        net.eval()
        want = [t.float().cpu().numpy() for t in net(x)]
        net.train(was_training)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.float().cpu().contiguous().numpy()})
    if len(got) != len(want):
        raise TrainError(f"--init {path}: it has {len(got)} outputs, the network to train has {len(want)} heads")
    return max(float(np.max(np.abs(a - b))) for a, b in zip(want, got))


def train(cfg: TrainConfig, progress: bool = True, log: Any = None) -> dict[str, Any]:
    """Train as configured, export ``cfg.output`` and return a summary (also stored in the model)."""
    torch = _torch()
    out_path = Path(cfg.output)
    _check_output_path(out_path)
    for name in ("epochs", "samples", "batch"):
        if int(getattr(cfg, name)) < 1:
            raise TrainError(f"--{name} must be at least 1")
    if not cfg.heads or not set(cfg.heads) <= set(HEADS):
        raise TrainError(f"--heads must be from {HEADS}, got {cfg.heads}")
    heads = tuple(h for h in HEADS if h in cfg.heads)  # graph order: amplitude, phase (PtychoNN)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu, cuda or auto, got {cfg.device!r}")
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.grad_weight < 0 or not math.isfinite(cfg.grad_weight):
        raise TrainError(f"--grad-weight must be a number >= 0, got {cfg.grad_weight!r}")
    torch.set_num_threads(max(1, int(cfg.threads)))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)

    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    src, facts = _make_source(cfg)
    out = facts["out"]
    parent = _check_init(cfg, facts) if cfg.init else None
    # channels-last convolutions run about 1.7x faster on CPUs (oneDNN) and suit tensor cores
    net = build_net(facts["input"], cfg.base_channels, cfg.depth, heads, out).to(
        device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps_per_epoch = src.steps_per_epoch(cfg.batch)
    total = steps_per_epoch * cfg.epochs
    weight = torch.from_numpy(src.weight).to(device)
    state = None

    start_step, history, elapsed0 = 0, [], 0.0
    ckpt_dir = Path(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt_dir is not None:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainError(f"cannot use checkpoint folder {ckpt_dir}: {exc.strerror or exc}") from None
        ck = ckpt_dir / CHECKPOINT_NAME
        if ck.is_file():
            try:
                state = torch.load(ck, map_location=device, weights_only=False)
            except Exception as exc:  # a torn or foreign file
                raise TrainError(f"cannot resume from {ck}: {exc}") from None
            if state.get("key") != cfg.key() or (not cfg.budget_s and state.get("total") != total):
                raise TrainError(f"{ck} was written by a run with other settings; use another --checkpoint "
                                 "folder or delete it")
            total = int(state["total"])
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            start_step, history, elapsed0 = int(state["step"]), list(state["history"]), float(state["elapsed"])
            torch.set_rng_state(state["torch_rng"])
            say(f"resuming from {ck} at step {start_step}/{total}")

    val = src.validation(cfg.val) if cfg.val > 0 else None

    def to_dev(b: Batch) -> dict[str, Any]:
        d = {"x": torch.from_numpy(b.x).to(device).contiguous(memory_format=torch.channels_last),
             "phase": torch.from_numpy(b.phase).to(device)}
        if b.amplitude is not None:
            d["amplitude"] = torch.from_numpy(b.amplitude).to(device)
        return d

    init_info = None
    if parent is not None and state is None:
        diff = warm_start(net, cfg.init, to_dev(val if val is not None else src.batch(0, cfg.batch))["x"])
        if not diff <= 1e-3:
            raise TrainError(f"--init {cfg.init}: the network does not reproduce the file (max |diff| {diff:.3g})")
        init_info = {"file": Path(cfg.init).name, "sha256": parent.sha256, "max_abs_diff": diff}
        say(f"starting from {cfg.init} (reproduced to {diff:.2g})")
    elif state is not None:
        init_info = state.get("init")

    def forward(x: Any) -> tuple:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return net(x)

    def evaluate() -> dict[str, float] | None:
        if val is None:
            return None
        net.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for s in range(0, len(val.x), 64):
                b = to_dev(Batch(val.x[s:s + 64], val.phase[s:s + 64],
                                 None if val.amplitude is None else val.amplitude[s:s + 64]))
                _, parts = _loss(torch, forward(b["x"]), b, heads, weight, cfg.amp_weight)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(b["x"])
        net.train()
        return {k: v / len(val.x) for k, v in sums.items()}

    t0 = time.monotonic()
    step = start_step
    running: dict[str, float] = {}
    stopped = ""
    bar = None

    # the next batch is simulated on a worker thread while this one trains (numpy's FFTs and the
    # Poisson draws release the GIL); a batch is a pure function of its step, so order is kept
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train-data")
    ahead: dict[int, Any] = {}

    def fetch(k: int) -> Batch:
        fut = ahead.pop(k, None) or pool.submit(src.batch, k, cfg.batch)
        ahead[k + 1] = pool.submit(src.batch, k + 1, cfg.batch)
        return fut.result()

    def one_step(k: int) -> None:
        b = to_dev(fetch(k))
        loss, parts = _loss(torch, forward(b["x"]), b, heads, weight, cfg.amp_weight, cfg.grad_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for name, v in parts.items():
            fv = float(v.detach())
            running[name] = 0.98 * running.get(name, fv) + 0.02 * fv

    def clock() -> float:
        """Training seconds so far, across resumes."""
        return elapsed0 + time.monotonic() - t0

    budget = None
    if cfg.budget_s:
        # a one-cycle schedule on the clock instead of the step count: it fills the budget whatever
        # the machine's speed (the number of steps done is recorded in the model)
        budget = max(10.0, float(cfg.budget_s) - 60.0)  # leave time for the last evaluation and export
        sched = _ClockSchedule(opt, cfg.lr, lambda: clock() / budget)
        total = 0
    else:
        sched = _scheduler(torch, opt, cfg, total)
        if state is not None:
            sched.load_state_dict(state["sched"])
            opt.load_state_dict(state["opt"])  # a new scheduler resets lr/betas in the groups: restore them
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        bar = Progress(TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       transient=False)
        task = bar.add_task("train", total=total or budget, completed=step if budget is None else clock(),
                            info="")
        bar.start()
    net.train()
    try:
        while (step < total) if budget is None else (clock() < budget):
            one_step(step)
            sched.step()
            step += 1
            done = step >= total if budget is None else clock() >= budget
            if bar is not None:
                bar.update(task, completed=step if budget is None else clock(), info=" ".join(f"{k[:3]} {v:.4f}" for k, v in running.items())
                           + f" lr {sched.get_last_lr()[0]:.2e}")
            end_epoch = step % steps_per_epoch == 0 or done
            over_time = cfg.time_limit_s is not None and elapsed0 + time.monotonic() - t0 > cfg.time_limit_s
            if end_epoch or over_time:
                v = evaluate() if end_epoch else None
                history.append({"step": step, "epoch": step / steps_per_epoch, "train": dict(running),
                                "val": v, "time_s": round(elapsed0 + time.monotonic() - t0, 1)})
                msg = (f"epoch {step / steps_per_epoch:.2f} step {step}/{total or '?'} "
                       f"({clock() / 60:.1f} min, lr {sched.get_last_lr()[0]:.2e}): train "
                       + " ".join(f"{k} {x:.4f}" for k, x in running.items()))
                if v:
                    msg += "  val " + " ".join(f"{k} {x:.4f}" for k, x in v.items())
                if bar is not None:
                    bar.console.print(msg)
                else:
                    say(msg)
                if ckpt_dir is not None:
                    _save_checkpoint(torch, ckpt_dir, {
                        "key": cfg.key(), "total": total, "step": step, "net": net.state_dict(), "init": init_info,
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "history": history,
                        "elapsed": elapsed0 + time.monotonic() - t0, "torch_rng": torch.get_rng_state()})
            if over_time and not done:
                stopped = f"time limit {cfg.time_limit_s:g} s reached at step {step}"
                say(stopped)
                break
    finally:
        if bar is not None:
            bar.stop()
        for fut in ahead.values():
            fut.cancel()
        pool.shutdown(wait=True)
    elapsed = elapsed0 + time.monotonic() - t0
    final_val = evaluate()
    summary = {
        "framework": f"torch {torch.__version__}", "device": device, "seed": cfg.seed,
        "epochs": round(step / steps_per_epoch, 3), "steps": step, "planned_steps": total or None,
        "batch": cfg.batch, "samples_seen": step * cfg.batch, "lr": cfg.lr, "schedule": cfg.schedule,
        "budget_s": cfg.budget_s,
        "optimizer": "Adam", "precision": cfg.precision, "init": init_info,
        "loss": "L1, probe-weighted" + (f", + {cfg.grad_weight:g} x L1 of the gradient error" if cfg.grad_weight
                                        else "") + (f", + {cfg.amp_weight:g} x amplitude" if "amplitude" in heads
                                                    else ""),
        "final_train_loss": {k: round(v, 5) for k, v in running.items()},
        "final_val_loss": None if final_val is None else {k: round(v, 5) for k, v in final_val.items()},
        "data": src.describe(), "net": net.config, "time_s": round(elapsed, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stopped_early": stopped or None,
        "phase_target": "object phase minus its probe-weighted mean, central output_size px",
    }
    if facts["geometry"]:
        summary["geometry"] = facts["geometry"]
    meta = {
        "ptychostream.name": cfg.name or out_path.stem,
        "ptychostream.preprocess": facts["pre"].to_json(),
        "ptychostream.outputs": list(heads),
        "ptychostream.probe_id": facts["probe_id"],
        "ptychostream.training": summary,
        # a hint for the live mosaic: patches this small stitch better with offset "overlap"
        "ptychostream.stitch": {"offset": "overlap", "window": "hann"},
    }
    if facts["pixel_m"]:
        meta["ptychostream.pixel_m"] = repr(float(facts["pixel_m"]))
    exp = export_onnx(net, out_path, meta)
    summary.update(output=str(out_path), params=exp["params"], onnx_bytes=exp["bytes"],
                   onnx_max_abs_diff=exp["max_abs_diff"])
    return summary


# =========================================================================== CLI
def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    objects = tuple(k.strip() for k in args.objects.split(",") if k.strip())
    out_size: int | str = args.output_size
    if out_size != "auto":
        try:
            out_size = int(out_size)
        except ValueError:
            raise TrainError(f"--output-size must be 'auto' or an integer, got {args.output_size!r}") from None
    return TrainConfig(
        output=args.output, data=tuple(args.data or ["sim"]), frames=args.frames, objects=objects,
        probe=args.probe, energy_keV=args.energy_kev, distance_m=args.distance_m,
        detector_pixel_m=args.detector_pixel_m, size=args.size, crop=args.crop, bin=args.bin,
        photons=_parse_range(args.photons, "--photons"), max_phase=_parse_range(args.max_phase, "--max-phase"),
        object_px=args.object_px, pool=args.pool, refresh=args.refresh, pixel_m=args.pixel_m, val=args.val,
        heads=heads, base_channels=args.base_channels, depth=args.depth, output_size=out_size,
        scale=args.scale, normalise=args.normalise, epochs=args.epochs, samples=args.samples, batch=args.batch,
        lr=args.lr, schedule=args.schedule, amp_weight=args.amp_weight, grad_weight=args.grad_weight,
        loss_floor=args.loss_floor, init=args.init, precision=args.precision,
        seed=args.seed, device=args.device, threads=args.threads, checkpoint=args.checkpoint,
        time_limit_s=None if args.time_limit is None else 60.0 * args.time_limit,
        budget_s=None if args.budget is None else 60.0 * args.budget, name=args.name,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        cfg = _config_from_args(args)
        summary = train(cfg, progress=not args.quiet)
    except TrainError as exc:
        print(f"ptychostream train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ptychostream train: interrupted (resume with the same --checkpoint)", file=sys.stderr)
        return 130
    print(f"wrote {summary['output']}: {summary['params']:,} parameters, {summary['onnx_bytes'] / 1e6:.2f} MB, "
          f"{summary['steps']} steps in {summary['time_s']:.0f} s; val loss {summary['final_val_loss']}")
    if args.eval_demo:
        from .score import ScoreError, simulate_and_score

        try:
            for off in ("mean", "overlap"):
                res = simulate_and_score(summary["output"], offsets=off)
                print(f"demo scan (digits, 1000 points, 100 nm): offset {off}: SSIM {res['ssim']:.3f} "
                      f"PSNR {res['psnr']:.2f} dB FRC-AUC {res['frc_auc']:.3f}")
        except ScoreError as exc:
            print(f"ptychostream train: demo evaluation failed: {exc}", file=sys.stderr)
            return 2
    return 0


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse subparsers object; returns the sub-parser."""
    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train a PtychoNN-class network (PyTorch) and export it as ONNX",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a PtychoNN-class CNN (diffraction frame -> phase [and amplitude] patch) with PyTorch\n"
            "and export it as an ONNX model for the reconstructor: dynamic batch, opset 17, with the\n"
            "pre-processing, output labels, pixel size, probe id and a training summary in its metadata.\n"
            "The export is checked against torch with onnxruntime and self-tested before it replaces OUTPUT.\n\n"
            "Data: simulated on the fly (default; random positions over random etched / circuit /\n"
            "dead_leaves / blurred_noise / procedural objects, Poisson noise) or pairs from files (--data)."),
        epilog=(
            "examples:\n"
            "  ptychostream train model.onnx --epochs 40          # the 128x128 edge layout, simulated data\n"
            "  ptychostream train edge.onnx --crop 64 --budget 33 --name ptychonn_edge --checkpoint ckpt\n"
            "                                 # a first edge model (33 min on 2 CPU cores; resumable)\n"
            "  ptychostream train edge2.onnx --init edge.onnx --crop 64 --budget 60 --precision bf16 --grad-weight 0.5\n"
            "                                 # continue from it (the shipped model's last stage: models/README.md)\n"
            "  ptychostream train m.onnx --data pairs.npz --heads phase --output-size 128 --epochs 50\n"
            "  ptychostream train m.onnx --data product.h5 --frames scan.h5 --device cuda\n\n"
            "Errors in the input (empty or mismatched files, wrong keys, NaN labels, unwritable output)\n"
            "are reported in one line and exit with status 2; an existing OUTPUT is left as it was."))
    p.add_argument("output", help="the ONNX file to write (replaced atomically when the export passes its checks)")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="sim|FILE",
                   help="'sim' (default) or a training file, repeatable: PtychoNN .npz (reciprocal, real) "
                        "or a Ptychodus product .h5 (with --frames)")
    g.add_argument("--frames", metavar="FILE", help="diffraction frames for a Ptychodus product (HDF5/NPZ/NPY)")
    g.add_argument("--objects", default=",".join(d.objects),
                   help=f"simulated object families, comma-separated (default {','.join(d.objects)})")
    g.add_argument("--probe", default=d.probe,
                   help="zoneplate (default), gaussian, or a probe file (Ptychodus product .h5 or .npy)")
    g.add_argument("--energy-kev", type=float, default=d.energy_keV, help="photon energy (default 10)")
    g.add_argument("--distance-m", type=float, default=d.distance_m, help="detector distance (default 2)")
    g.add_argument("--detector-pixel-m", type=float, default=d.detector_pixel_m, help="detector pixel (default 75e-6)")
    g.add_argument("--size", type=int, default=d.size, help="frame / model input size in px (default 128)")
    g.add_argument("--crop", type=int, help="feed the network only the central CROP px of each frame "
                   "(recorded in the pre-processing; default: the whole frame)")
    g.add_argument("--bin", type=int, default=1, help="bin frames by this factor before the network (default 1)")
    g.add_argument("--photons", default="1e6", help="photons per frame, or LO:HI drawn log-uniformly (default 1e6)")
    g.add_argument("--max-phase", default="0.6:1.0", help="object phase amplitude in rad, or LO:HI (default 0.6:1.0)")
    g.add_argument("--object-px", type=int, default=d.object_px, help="side of each simulated object (default 384)")
    g.add_argument("--pool", type=int, default=d.pool, help="objects held at a time (default 16)")
    g.add_argument("--refresh", type=int, default=d.refresh, help="steps between new object pools (default 50)")
    g.add_argument("--pixel-m", type=float, help="object pixel for file data without one (metres)")
    g.add_argument("--val", type=int, default=d.val, help="validation samples (default 256; 0: none)")
    g = p.add_argument_group("network")
    g.add_argument("--heads", default="amplitude,phase", help="amplitude,phase (default) or phase")
    g.add_argument("--base-channels", type=int, default=d.base_channels, help="channels of the first block (default 16)")
    g.add_argument("--depth", type=int, default=d.depth, help="encoder/decoder blocks (default 4)")
    g.add_argument("--output-size", default="auto",
                   help="side of the output patch: auto (the square around 97%% of the probe) or N px")
    g.add_argument("--scale", default=d.scale, choices=("none", "log1p", "sqrt"), help="input scaling (default sqrt)")
    g.add_argument("--normalise", default=d.normalise, choices=("none", "max", "sum", "mean"),
                   help="per-frame normalisation (default mean)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs (default 20)")
    g.add_argument("--samples", type=int, default=d.samples, help="samples per epoch for simulated data (default 4096)")
    g.add_argument("--batch", type=int, default=d.batch, help="batch size (default 32)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default 2e-3)")
    g.add_argument("--schedule", default=d.schedule, choices=("onecycle", "cyclic", "constant"),
                   help="learning-rate schedule (default onecycle)")
    g.add_argument("--amp-weight", type=float, default=d.amp_weight, help="weight of the amplitude loss (default 1)")
    g.add_argument("--grad-weight", type=float, default=d.grad_weight,
                   help="weight of an L1 loss on the error's finite differences, for sharper edges (default 0)")
    g.add_argument("--loss-floor", type=float, default=d.loss_floor,
                   help="loss weight of pixels the probe does not light (default 0.05)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="torch device (default cpu)")
    g.add_argument("--threads", type=int, default=d.threads, help="CPU threads for torch (default 2)")
    g.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="fp32 (default) or bf16 autocast (mixed precision: about 1.5x faster on CPUs with "
                        "AVX-512 BF16 or AMX, and on GPUs; the weights stay fp32)")
    g.add_argument("--init", metavar="MODEL.onnx",
                   help="continue from a model this command exported (same architecture and pre-processing), "
                        "as after each scan in the seed's retraining loop")
    g.add_argument("--checkpoint", metavar="DIR", help="save a checkpoint each epoch; resume from DIR if present")
    g.add_argument("--time-limit", type=float, metavar="MIN", help="stop after MIN minutes and export what is there")
    g.add_argument("--budget", type=float, metavar="MIN",
                   help="train for MIN minutes (the last one for evaluation and export) with the one-cycle "
                        "schedule run on the clock, so the run fills the time on any machine; replaces --epochs")
    g.add_argument("--name", help="model name in the metadata (default: the file stem)")
    p.add_argument("--eval-demo", action="store_true",
                   help="after export, score the model on the demo scan (digits, 1000 points, 100 nm)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    return p
