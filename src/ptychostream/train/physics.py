"""Physics-informed (unsupervised) training: the Poisson likelihood of the measured frames under the known probe.

The network predicts the central ``out``×``out`` of the ``S``×``S`` object patch (amplitude and phase
heads).  :class:`PoissonLoss` turns that prediction back into the frame it should have produced, in the
network's input geometry, and scores the measured counts against it:

1. **the object patch** ``O = A·exp(iφ)`` (amplitude 1 without an amplitude head), padded to ``S``×``S``.
   Outside the predicted patch the network says nothing, yet the probe lights a little of it (about 5 %
   of the foreign stand-in's probe intensity, 3 % of the shipped model's).  That ring is filled with one
   constant, the patch's own mean complex value on its border: a zero fill (opaque) would cut the probe
   and put a sharp-edged aperture into every exit wave, which the network would then distort its patch
   to explain; a unit fill (empty space) is wrong wherever the sample is; the border mean is what the
   object is nearest the ring, varies the least and joins the patch without a step on average;
2. **the exit waves** ``P_k · O`` for every probe mode ``k`` (the modes carry their weights, Σ|P|² = 1),
   the orthonormal 2-D FFT, ``|.|²`` summed over the modes, fftshift-centred: the same intensities as
   :func:`ptychostream.sim.forward.far_field` (tested);
3. **the network's input geometry** (:class:`FrameGeometry`): the crop, bin and orientation of the
   model's :class:`~ptychostream.model.preprocess.Preprocess`, taken as an index map from the canonical
   (centred, oriented) frame, so a flipped, transposed or corner-origin detector is honoured exactly as
   the pre-processing treats the measured frame;
4. **the photon count**: the simulated frame is scaled to the measured frame's counts over the valid
   pixels (the maximum-likelihood scale; the probe/object amplitude scale is not known);
5. **the loss**: the Poisson deviance ``2 Σ [n log(n/λ) − (n − λ)]`` per valid pixel: the negative
   log-likelihood less its value at a perfect fit, so the gradient is the likelihood's and the value is
   about 1 at the noise floor whatever the photon level.

:meth:`PoissonLoss.overlap` is the optional overlap term: two patches of one scan whose positions are
closer than a patch must agree where they overlap (one resampled onto the other's pixels at the
positions' sub-pixel offset, weighted by both probes' intensity, after the best common phase), the mean
squared complex difference.  :class:`FrameSource` serves a scan's frames with no labels, in groups of
neighbours so that the overlap term has pairs; :class:`WithFrames` adds them to a labelled source (the
supervised and the physics loss mixed, weights as options).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.model.preprocess import Preprocess
from ptychostream.train.config import OVERLAP_NORMS, PHYSICS_FRAMES, TrainConfig, TrainError, crop_centre, torch_module
from ptychostream.train.data import Batch, concat_batches
from ptychostream.train.instrument import probe_modes

__all__ = ["FrameGeometry", "FrameSource", "PoissonLoss", "WithFrames", "check_weights", "fill_border", "physics_source",
           "read_probe_modes", "scan_physics_source", "stitch_context"]


# --------------------------------------------------------------------------- geometry
def _roll_reverse(a: np.ndarray, axis: int) -> np.ndarray:
    """k -> -k (mod N) along ``axis``: the frequency reversal of a detector flip (its own inverse)."""
    return np.roll(np.flip(a, axis=axis), 1, axis=axis)


#: the phase jump between neighbouring output pixels (rad) above which --wrap-weight penalises
WRAP_STEP = float(np.pi / 2)


@dataclass(frozen=True)
class FrameGeometry:
    """Where each pixel of the network's input comes from in the canonical (centred, oriented) frame.

    ``gather`` (h0, w0): flat canonical indices of the crop before binning; ``bin``; ``orient`` (h, w):
    flat indices into the binned crop giving the oriented network input.  Built from a Preprocess the
    same way it treats a raw frame, so measured and simulated frames meet in one geometry.
    """

    size: int
    gather: np.ndarray
    bin: int
    orient: np.ndarray

    @classmethod
    def from_preprocess(cls, pre: Preprocess, size: int) -> FrameGeometry:
        """The geometry of ``pre`` for ``size``×``size`` frames.  The canonical frame is what ``pre``'s own
        origin and orientation flags make of a raw frame (fftshift, transpose, then the flips)."""
        s = int(size)
        canon = np.arange(s * s, dtype=np.float64).reshape(s, s)
        raw = canon
        if pre.flip_x:
            raw = _roll_reverse(raw, 1)
        if pre.flip_y:
            raw = _roll_reverse(raw, 0)
        if pre.transpose:
            raw = raw.T
        if pre.fftshift:
            raw = np.fft.ifftshift(raw)
        plain = replace(pre, transpose=False, flip_y=False, flip_x=False, bin=1, scale="none", normalise="none",
                        threshold=0.0, dark=None, mask=None)
        if s * s >= 2**24:
            raise TrainError(f"frames of {s}x{s} are too large for the physics loss's index map")
        try:
            gather = np.rint(plain.apply(np.ascontiguousarray(raw, dtype=np.float32))).astype(np.int64)
            b = int(pre.bin)
            hb, wb = gather.shape[0] // b, gather.shape[1] // b
            orient = Preprocess(transpose=pre.transpose, flip_y=pre.flip_y, flip_x=pre.flip_x).apply(
                np.arange(hb * wb, dtype=np.float32).reshape(hb, wb))
        except ValueError as exc:
            raise TrainError(f"the physics loss cannot use this pre-processing on {s}x{s} frames: {exc}") from None
        return cls(s, gather, b, np.rint(orient).astype(np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.orient.shape[0]), int(self.orient.shape[1])

    def take(self, canonical: np.ndarray, reduce: str = "sum") -> np.ndarray:
        """Canonical frames (..., S, S) in the network's geometry (numpy): binned by ``sum`` or ``any``."""
        a = np.asarray(canonical)
        flat = a.reshape(*a.shape[:-2], -1)[..., self.gather]
        b = self.bin
        if b > 1:
            h0, w0 = self.gather.shape
            blocks = flat.reshape(*flat.shape[:-2], h0 // b, b, w0 // b, b)
            flat = np.asarray(blocks.any(axis=(-3, -1)) if reduce == "any" else blocks.sum(axis=(-3, -1)))
        return np.asarray(flat.reshape(*flat.shape[:-2], -1)[..., self.orient])

    def take_torch(self, torch: Any, canonical: Any) -> Any:
        """The same for a torch tensor (..., S, S) (sum binning); differentiable."""
        gather = torch.as_tensor(self.gather, device=canonical.device)
        flat = canonical.reshape(*canonical.shape[:-2], -1)[..., gather]
        b = self.bin
        if b > 1:
            h0, w0 = self.gather.shape
            flat = flat.reshape(*flat.shape[:-2], h0 // b, b, w0 // b, b).sum(dim=(-3, -1))
        orient = torch.as_tensor(self.orient, device=canonical.device)
        return flat.reshape(*flat.shape[:-2], -1)[..., orient]


# --------------------------------------------------------------------------- the probe
def read_probe_modes(path: str | Path, size: int) -> np.ndarray:
    """Probe modes (K, size, size) of a file: ``.npy``; HDF5 with a ``probe`` dataset (Ptychodus product,
    ``file.h5::/dataset``); or any scan file :func:`~ptychostream.files.scan.read_scan` reads that holds one."""
    from ptychostream.files.paths import split_dataset_path

    file, dataset = split_dataset_path(path, None, "probe")
    if not file.is_file():
        raise TrainError(f"probe file not found: {file}")
    arr: np.ndarray | None = None
    try:
        if file.suffix.lower() == ".npy":
            arr = np.load(file)
        else:
            import h5py

            if h5py.is_hdf5(file):
                with h5py.File(file, "r") as h5:
                    key = dataset or "probe"
                    if key in h5:
                        arr = np.asarray(h5[key][()])
            if arr is None:
                from ptychostream.files.scan import read_scan

                arr = read_scan(file).probe
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot read a probe from {file}: {exc}") from None
    if arr is None:
        raise TrainError(f"{file} holds no probe (expected a 'probe' dataset, a .npy array or a scan with one)")
    return probe_modes(arr, size, where=str(file))


# --------------------------------------------------------------------------- the loss
def fill_border(torch: Any, patch: Any, size: int) -> Any:
    """Complex patches (n, o, o) padded to (n, size, size) with their own mean border value (see the module
    docstring: what the object is outside the predicted patch)."""
    o = int(patch.shape[-1])
    if o == size:
        return patch
    ring = torch.cat([patch[:, 0, :], patch[:, -1, :], patch[:, 1:-1, 0], patch[:, 1:-1, -1]], dim=1)
    fill = ring.mean(dim=1)[:, None, None]
    lo = size // 2 - o // 2
    hi = size - lo - o
    pad = torch.nn.functional.pad
    re = pad((patch - fill).real, (lo, hi, lo, hi))
    im = pad((patch - fill).imag, (lo, hi, lo, hi))
    return torch.complex(re, im) + fill


class PoissonLoss:
    """The physics loss of a model under a known probe (see the module docstring).

    ``modes`` (K, S, S) probe modes (normalised here to a total power of 1), ``pre`` the model's
    pre-processing (its geometry is used), ``out`` the network's output size, ``pixel_m`` the object pixel
    (for the overlap term), ``valid`` (S, S) canonical pixels that count (None: all).
    """

    def __init__(self, modes: np.ndarray, pre: Preprocess, out: int, pixel_m: float | None = None,
                 valid: np.ndarray | None = None, device: str = "cpu", frame: str = "input",
                 overlap_norm: str = "none") -> None:
        torch = torch_module()
        self.torch = torch
        m = np.asarray(modes)
        size = int(m.shape[-1])
        self.modes_np = probe_modes(m, size)
        self.size, self.out, self.pixel_m = size, int(out), pixel_m
        if self.out > size:
            raise TrainError(f"the output patch ({self.out}) is larger than the frames ({size})")
        if frame not in PHYSICS_FRAMES:
            raise TrainError(f"--physics-frame must be one of {', '.join(PHYSICS_FRAMES)}, got {frame!r}")
        #: ``input``: the loss compares the network's input geometry; ``full``: every detector pixel (the
        #: same origin and orientation, no crop and no bin), while the network still sees its crop
        self.frame = frame
        if overlap_norm not in OVERLAP_NORMS:
            raise TrainError(f"--overlap-norm must be one of {', '.join(OVERLAP_NORMS)}, got {overlap_norm!r}")
        #: ``power``: the overlap term divided by the pair's mean power (scale-free; see :meth:`overlap`)
        self.overlap_norm = overlap_norm
        self.geometry = FrameGeometry.from_preprocess(self._geometry_pre(pre), size)
        ok = np.ones((size, size), dtype=bool) if valid is None else ~np.asarray(valid == 0)
        if ok.shape != (size, size):
            raise TrainError(f"the valid-pixel mask is {ok.shape}, the frames are {size}x{size}")
        self.valid_np = ~self.geometry.take(~ok, reduce="any").astype(bool)
        self.device = device
        self.modes = torch.as_tensor(self.modes_np, device=device)
        self.valid = torch.as_tensor(self.valid_np, device=device)
        inten = np.sum(np.abs(self.modes_np) ** 2, axis=0)
        w = crop_centre(inten, self.out)
        #: the overlap weight of a patch pixel: its probe intensity, relative to the peak
        self.light_np = (w / max(float(w.max()), 1e-30)).astype(np.float32)
        self.light = torch.as_tensor(self.light_np, device=device)

    def _geometry_pre(self, pre: Preprocess) -> Preprocess:
        """The pre-processing whose geometry the loss compares in: ``pre``'s own, or (``full``) ``pre``
        with no crop and no bin."""
        return pre if self.frame == "input" else replace(pre, crop_size=None, crop_center=None, bin=1)

    def describe(self) -> dict[str, Any]:
        return {"probe_modes": len(self.modes_np), "frame": self.size, "input": list(self.geometry.shape),
                "output": self.out, "outside": "the patch's mean border value", "compared": self.frame,
                "overlap_norm": self.overlap_norm,
                "valid_pixels": int(self.valid_np.sum())}

    def counts(self, frames: np.ndarray, pre: Preprocess) -> np.ndarray:
        """Measured frames (n, H, W) as counts in the loss's geometry (``pre`` without its scaling; with
        ``frame="full"`` without its crop and bin too)."""
        return replace(self._geometry_pre(pre), scale="none", normalise="none").apply(
            np.asarray(frames)).astype(np.float32)

    def patches(self, outs: tuple, heads: tuple[str, ...]) -> Any:
        """Complex predicted patches (n, out, out) from the network's head outputs."""
        torch = self.torch
        phase = outs[heads.index("phase")].float()[:, 0]
        amp = outs[heads.index("amplitude")].float()[:, 0] if "amplitude" in heads else torch.ones_like(phase)
        return torch.polar(amp, phase)

    def embed(self, patches: Any, context: Any) -> Any:
        """Patches (n, o, o) set into their surround ``context`` (n, S, S) (turned to the patch's own phase
        offset, measured where the probe is bright); rows of ``context`` that are NaN get the border fill."""
        torch = self.torch
        filled = fill_border(torch, patches, self.size)
        if context is None or self.out == self.size:
            return filled
        o, lo = self.out, self.size // 2 - self.out // 2
        ctx = context.to(filled.dtype)
        have = torch.isfinite(ctx.real).all(dim=(-2, -1))
        ctx = torch.where(have[:, None, None], ctx, filled.detach())
        centre = ctx[:, lo:lo + o, lo:lo + o]
        z = (self.light[None] * patches.detach() * centre.conj()).sum(dim=(-2, -1))
        ctx = ctx * torch.exp(1j * torch.angle(z))[:, None, None]
        inner = torch.zeros((self.size, self.size), dtype=torch.bool, device=ctx.device)
        inner[lo:lo + o, lo:lo + o] = True
        obj = torch.where(inner[None], filled, ctx)
        return torch.where(have[:, None, None], obj, filled)

    def intensity(self, patches: Any, context: Any = None) -> Any:
        """Canonical far-field intensities (n, S, S) of patches (n, o, o) (o < S: in their ``context``, else
        border-filled)."""
        torch = self.torch
        obj = self.embed(patches, context)
        psi = self.modes[None] * obj[:, None]
        spec = torch.fft.fft2(psi, norm="ortho")
        inten = (spec.real ** 2 + spec.imag ** 2).sum(dim=1)
        return torch.fft.fftshift(inten, dim=(-2, -1))

    def predicted(self, patches: Any, context: Any = None) -> Any:
        """Intensities in the network's input geometry (n, h, w), before scaling to the counts."""
        return self.geometry.take_torch(self.torch, self.intensity(patches, context))

    def deviance(self, patches: Any, counts: Any, per_frame: bool = False, context: Any = None) -> Any:
        """Mean Poisson deviance per valid pixel of ``counts`` (n, h, w) under the patches' frames, scaled to
        each frame's count (a scalar, or (n,) with ``per_frame``)."""
        torch = self.torch
        pred = self.predicted(patches, context)
        v = self.valid.to(pred.dtype)
        n = counts.float() * v
        scale = n.sum(dim=(-2, -1)) / (pred * v).sum(dim=(-2, -1)).clamp_min(1e-30)
        lam = (pred * scale[:, None, None]).clamp_min(1e-6)
        term = torch.where(n > 0, n * torch.log(n.clamp_min(1e-30) / lam), torch.zeros_like(n)) - (n - lam)
        dev = 2.0 * (term * v).sum(dim=(-2, -1)) / v.sum().clamp_min(1.0)
        return dev if per_frame else dev.mean()

    def anchor(self, phase: Any) -> Any:
        """Mean square of each patch's probe-weighted mean phase (``phase`` (n, o, o) the phase head's output).

        The frames do not fix a patch's absolute phase, yet the phase head is bounded (tanh·π): a patch
        whose mean drifts towards ±π has its structure clipped there.  This term keeps the mean at 0, as the
        supervised targets (phase less its probe-weighted mean) had it, and costs nothing once it is."""
        mean = (phase * self.light).sum(dim=(-2, -1)) / self.light.sum()
        return (mean ** 2).mean()

    def wraps(self, phase: Any, step: float = WRAP_STEP) -> Any:
        """Probe-weighted mean of ``relu(|jump| - step)**2`` over the jumps between neighbouring pixels of
        each patch (``phase`` (n, o, o) the phase head's output).

        The frames see the phase only modulo 2π, so a fine-tune may wrap the upper level of an object to
        the bottom of the bounded head's range; the stitcher averages phase values, and a wrapped patch
        blurs the mosaic. A wrap is a jump of nearly 2π between neighbours; the network's outputs spread
        a real edge over a few pixels, so jumps above ``step`` (π/2 per pixel) are what this term sees."""
        torch = self.torch
        w = self.light
        dy, dx = phase[:, 1:, :] - phase[:, :-1, :], phase[:, :, 1:] - phase[:, :, :-1]
        wy, wx = torch.minimum(w[1:, :], w[:-1, :]), torch.minimum(w[:, 1:], w[:, :-1])
        pen = ((torch.relu(dy.abs() - step) ** 2 * wy).sum(dim=(-2, -1))
               + (torch.relu(dx.abs() - step) ** 2 * wx).sum(dim=(-2, -1))) / (wy.sum() + wx.sum())
        return pen.mean()

    def overlap(self, patches: Any, positions_m: Any, max_pairs: int = 256) -> Any:
        """Mean squared complex difference of overlapping patches (see the module docstring); 0 if none.

        The deviance fixes the object's amplitude only up to a scale (each frame's count is fitted), so
        the plain term can be lowered by shrinking every amplitude; with ``overlap_norm="power"`` each
        pair's difference is divided by its mean power instead (the same value at unit amplitude, and
        blind to the scale)."""
        torch = self.torch
        if self.pixel_m is None or positions_m is None or len(patches) < 2:
            return patches.real.sum() * 0.0
        pos = positions_m.double() / float(self.pixel_m)
        n, o = len(patches), self.out
        d = pos[None, :, :] - pos[:, None, :]  # d[i, j] = pos_j - pos_i in pixels
        near = (d.abs().amax(dim=-1) < 0.75 * o) & ~torch.eye(n, dtype=torch.bool, device=pos.device)
        near &= torch.isfinite(d).all(dim=-1)
        ii, jj = torch.nonzero(torch.triu(near), as_tuple=True)
        if len(ii) == 0:
            return patches.real.sum() * 0.0
        if len(ii) > max_pairs:
            keep = torch.linspace(0, len(ii) - 1, max_pairs, device=ii.device).long()
            ii, jj = ii[keep], jj[keep]
        # patch i's pixel r sits at r - (pos_j - pos_i) in patch j; grid_sample wants x, y in [-1, 1]
        g = torch.arange(o, device=patches.device, dtype=torch.float64)
        shift = d[ii, jj]  # (p, 2) (y, x)
        ys = (g[None, :] - shift[:, 0:1]) * 2 / (o - 1) - 1
        xs = (g[None, :] - shift[:, 1:2]) * 2 / (o - 1) - 1
        grid = torch.stack([xs[:, None, :].expand(-1, o, -1), ys[:, :, None].expand(-1, -1, o)], dim=-1).float()
        pj = patches[jj]
        stack = torch.stack([pj.real, pj.imag, self.light.expand(len(jj), -1, -1)], dim=1)
        moved = torch.nn.functional.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros",
                                                align_corners=True)
        oj = torch.complex(moved[:, 0], moved[:, 1])
        w = moved[:, 2] * self.light[None]
        oi = patches[ii]
        z = (w * oi * oj.conj()).sum(dim=(-2, -1))
        ws = w.sum(dim=(-2, -1)).clamp_min(1e-6)
        power = (w * (oi.abs() ** 2 + oj.abs() ** 2)).sum(dim=(-2, -1))
        err = power - 2 * torch.sqrt(z.abs() ** 2 + 1e-12)
        if self.overlap_norm == "power":
            return (2 * err / power.clamp_min(1e-6)).mean()
        return (err / ws).mean()


# --------------------------------------------------------------------------- the surround
def stitch_context(patches: np.ndarray, positions_m: np.ndarray, pixel_m: float, size: int,
                   light: np.ndarray) -> np.ndarray:
    """Every frame's ``size``×``size`` surround (N, size, size) complex64, cut from one object stitched from
    all the complex ``patches`` (N, o, o) at their positions (nearest pixel), each weighted by ``light``
    and turned to agree with what is already stitched where they overlap (in scan order); pixels no patch
    reached take the window's mean."""
    n, o = len(patches), int(patches.shape[-1])
    px = np.rint(np.asarray(positions_m, dtype=np.float64) / pixel_m).astype(np.int64)
    base = px.min(axis=0) - size
    ext = px.max(axis=0) - base + size + 1
    acc = np.zeros(tuple(int(e) for e in ext), dtype=np.complex128)
    wsum = np.zeros_like(acc, dtype=np.float64)
    w = np.asarray(light, dtype=np.float64)
    for k in range(n):
        r, c = px[k] - base - o // 2
        win = (slice(int(r), int(r) + o), slice(int(c), int(c) + o))
        p = patches[k].astype(np.complex128)
        z = np.sum(w * acc[win] * np.conj(p))
        if abs(z) > 0:
            p = p * (z / abs(z))
        acc[win] += w * p
        wsum[win] += w
    out = np.empty((n, size, size), dtype=np.complex64)
    for k in range(n):
        r, c = px[k] - base - size // 2
        win = (slice(int(r), int(r) + size), slice(int(c), int(c) + size))
        ws, a = wsum[win], acc[win]
        seen = ws > 1e-3
        mean = a[seen].sum() / max(ws[seen].sum(), 1e-12) if seen.any() else 1.0
        out[k] = np.where(seen, a / np.maximum(ws, 1e-12), mean)
    return out


# --------------------------------------------------------------------------- frames as training data
class FrameSource:
    """A scan's frames with no labels, for the physics loss: each batch is a few groups of neighbouring
    scan positions (``group`` frames each: a random frame and its nearest neighbours), so the overlap
    term has pairs; the validation batch is a fixed spread of the frames.

    With ``holdback`` > 0 that many frames (an even spread in scan order) are kept out of every batch
    and are the validation batch instead: a figure of frames the network never trained on, for the
    checkpoint selection (``--select``).  They still join the mosaic surround (their predictions, no
    gradient)."""

    def __init__(self, cfg: TrainConfig, frames: np.ndarray, positions_m: np.ndarray | None, pre: Preprocess,
                 loss: PoissonLoss, weight: np.ndarray, group: int = 4, description: dict[str, Any] | None = None,
                 holdback: int = 0) -> None:
        arr = np.asarray(frames)
        if arr.ndim != 3 or len(arr) == 0:
            raise TrainError(f"the physics loss needs frames (N, H, W), got shape {arr.shape}")
        if positions_m is not None and np.shape(positions_m) != (len(arr), 2):
            raise TrainError(f"{len(arr)} frames but positions of shape {np.shape(positions_m)}")
        self.cfg, self.weight, self.group = cfg, weight, max(1, int(group))
        self.loss = loss
        #: (N, S, S) the surround of each frame's patch (None until :meth:`refresh_context`)
        self.context: np.ndarray | None = None
        self.x = pre.apply(arr)[:, None].astype(np.float32)
        self.counts = loss.counts(arr, pre)
        self.positions = None if positions_m is None else np.asarray(positions_m, dtype=np.float64)
        self.desc = dict(description or {})
        n = len(arr)
        hold = int(holdback)
        if hold < 0 or (hold and hold > n - self.group):
            raise TrainError(f"cannot hold back {hold} of {n} frames for the selection figure "
                             f"(at least {self.group} must stay to train on)")
        #: the frames batches are drawn from (all but the held-back ones)
        self.pool = np.arange(n)
        self.held = np.zeros(0, dtype=np.int64)
        if hold:
            self.held = np.unique(np.linspace(0, n - 1, hold).round().astype(np.int64))
            self.pool = np.setdiff1d(np.arange(n), self.held)
        if self.positions is not None:
            d = np.abs(self.positions[:, None, :] - self.positions[None, :, :]).max(axis=-1)
            d[:, self.held] = np.inf  # a held-back frame is nobody's neighbour in a batch
            self.neighbours = np.argsort(d, axis=1, kind="stable")
        else:  # no positions: a frame's "neighbours" are the frames after it in scan order
            self.neighbours = np.stack([np.roll(self.pool, -(int(np.searchsorted(self.pool, s)) % len(self.pool)))
                                        for s in range(n)])
        if hold:
            self.val_idx = self.held
        else:
            k = min(n, max(1, int(cfg.val)))
            self.val_idx = np.linspace(0, n - 1, k).round().astype(np.int64)

    def describe(self) -> dict[str, Any]:
        d = {"source": "scan frames (no labels)", "frames": len(self.x), "group": self.group}
        if len(self.held):
            d["held_back"] = int(len(self.held))
        d.update(self.desc)
        return d

    def take(self, idx: np.ndarray) -> Batch:
        o = self.weight.shape[-1]
        n = len(idx)
        amp = np.zeros((n, 1, o, o), dtype=np.float32) if "amplitude" in self.cfg.heads else None
        return Batch(self.x[idx], np.zeros((n, 1, o, o), dtype=np.float32), amp,
                     labelled=np.zeros(n, dtype=bool), counts=self.counts[idx],
                     positions_m=None if self.positions is None else self.positions[idx],
                     context=None if self.context is None else self.context[idx])

    def refresh_context(self, predict: Any) -> None:
        """Re-estimate every frame's surround from the network's patches (``predict(x) -> complex patches``)
        stitched into one object (:func:`stitch_context`); nothing without positions or a pixel size."""
        if self.positions is None or self.loss.pixel_m is None:
            return
        patches = np.concatenate([predict(self.x[s:s + 64]) for s in range(0, len(self.x), 64)])
        self.context = stitch_context(patches, self.positions, float(self.loss.pixel_m), self.loss.size,
                                      self.loss.light_np)

    def steps_per_epoch(self, batch: int) -> int:
        return max(1, len(self.x) // batch)

    def indices(self, step: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, 7, step])
        g = min(self.group, n, len(self.pool))
        k = max(1, math.ceil(n / g))
        seeds = self.pool[rng.choice(len(self.pool), size=k, replace=len(self.pool) < k)]
        idx = np.concatenate([self.neighbours[s, :g] for s in seeds])[:n]
        return idx

    def batch(self, step: int, n: int) -> Batch:
        return self.take(self.indices(step, n))

    def validation(self, n: int) -> Batch | None:
        """``n`` frames spread over the scan, or every held-back frame when there are any."""
        return self.take(self.held if len(self.held) else self.val_idx[:n])


class WithFrames:
    """A labelled source's batches with ``share`` of each batch taken from a :class:`FrameSource` instead."""

    def __init__(self, labelled: Any, frames: FrameSource, share: float) -> None:
        if not 0.0 < share < 1.0:
            raise TrainError(f"the share of unlabelled frames in a batch must be between 0 and 1, got {share!r}")
        self.labelled, self.frames, self.share = labelled, frames, float(share)
        self.weight = labelled.weight

    def _split(self, n: int) -> tuple[int, int]:
        k = min(n - 1, max(1, int(round(self.share * n)))) if n > 1 else 0
        return n - k, k

    def describe(self) -> dict[str, Any]:
        return {"source": "labelled + scan frames", "frames_share": self.share,
                "labelled": self.labelled.describe(), "frames": self.frames.describe()}

    def steps_per_epoch(self, batch: int) -> int:
        return int(self.labelled.steps_per_epoch(self._split(batch)[0]))

    def batch(self, step: int, n: int) -> Batch:
        n_l, n_f = self._split(n)
        parts = [self.labelled.batch(step, n_l)] + ([self.frames.batch(step, n_f)] if n_f else [])
        return concat_batches(parts)

    def refresh_context(self, predict: Any) -> None:
        self.frames.refresh_context(predict)

    def validation(self, n: int) -> Batch | None:
        parts = [b for b in (self.labelled.validation(n), self.frames.validation(n)) if b is not None]
        return concat_batches(parts) if parts else None


# --------------------------------------------------------------------------- sources for train()
def check_weights(cfg: TrainConfig) -> None:
    """TrainError for loss weights that are negative, not finite, or all zero."""
    for name in ("supervised_weight", "physics_weight", "overlap_weight", "phase_anchor", "wrap_weight"):
        v = float(getattr(cfg, name))
        if not (math.isfinite(v) and v >= 0):
            raise TrainError(f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(cfg, name)!r}")
    if cfg.supervised_weight == 0 and not cfg.uses_physics():
        raise TrainError("every loss weight is 0: set --physics-weight (and/or --overlap-weight) or "
                         "--supervised-weight above 0")


def physics_source(cfg: TrainConfig, *, frames: np.ndarray, positions_m: np.ndarray | None, modes: np.ndarray,
                   pixel_m: float, pre: Preprocess, out: int, bad: np.ndarray | None = None,
                   labelled: tuple[Any, dict[str, Any]] | None = None) -> tuple[Any, dict[str, Any]]:
    """The (source, facts) of a run with the physics loss, for ``train(cfg, source=...)``.

    ``frames`` (N, S, S) as ``pre`` takes them (canonical when ``pre`` has no origin or orientation
    flags), ``modes`` the probe, ``bad`` (S, S) canonical pixels left out of the loss; ``labelled``: a
    labelled (source, facts) to mix with (``cfg.frames_share`` of each batch is frames; its facts are
    kept), else the frames alone (the unsupervised run).
    """
    import hashlib

    from ptychostream.train.config import probe_weight

    check_weights(cfg)
    size = int(np.shape(frames)[-1])
    m = probe_modes(modes, size)
    try:
        n_in = int(pre.output_shape((size, size))[-1])
    except ValueError as exc:
        raise TrainError(f"pre-processing: {exc}") from None
    loss = PoissonLoss(m, pre, out, pixel_m, valid=None if bad is None else ~np.asarray(bad, dtype=bool),
                       device="cuda" if cfg.device == "cuda" else "cpu", frame=cfg.physics_frame,
                       overlap_norm=cfg.overlap_norm)
    if labelled is not None:
        src, facts = labelled
        if int(facts["input"]) != n_in or int(facts["out"]) != int(out):
            raise TrainError(f"the scan's frames feed {n_in}x{n_in} inputs and {out}x{out} outputs, the labelled "
                             f"data {facts['input']}x{facts['input']} and {facts['out']}x{facts['out']}")
        weight = src.weight
    else:
        weight = probe_weight(np.sqrt(np.sum(np.abs(m) ** 2, axis=0)), size, out, cfg.loss_floor)
        facts = {"pre": pre, "pixel_m": float(pixel_m), "out": int(out), "input": n_in, "geometry": None,
                 "probe_id": "scan-" + hashlib.sha256(m.tobytes()).hexdigest()[:12], "amp_scale": 1.0}
    fs = FrameSource(cfg, frames, positions_m, pre, loss, weight, cfg.physics_group,
                     {"probe_modes": len(m), "bad_pixels": 0 if bad is None else int(np.sum(bad))},
                     holdback=cfg.select_frames if cfg.select != "none" else 0)
    # the probe the model is trained with: the export writes it beside the model (its sidecar)
    facts = dict(facts, physics=loss)
    facts.setdefault("probe", m)
    if labelled is None or cfg.supervised_weight == 0:
        return fs, facts
    return WithFrames(src, fs, cfg.frames_share), facts


def scan_physics_source(cfg: TrainConfig, pre: Preprocess, out: int | str,
                        labelled: tuple[Any, dict[str, Any]] | None = None) -> tuple[Any, dict[str, Any]]:
    """:func:`physics_source` for ``cfg.scan``: its canonical frames (hot pixels found and left out), its
    positions (the training side of ``cfg.scan_heldout``) and probe (or ``cfg.probe`` when that is a file)."""
    from ptychostream.files.errors import FileFormatError
    from ptychostream.files.scan import read_scan
    from ptychostream.sim.probes import PROBE_KINDS
    from ptychostream.train.config import auto_output_size
    from ptychostream.train.instrument import bad_pixels, clean_frames, heldout_split

    assert cfg.scan is not None
    try:
        scan = read_scan(cfg.scan)
        frames = np.asarray(scan.canonical_frames(), dtype=np.float32)
        pixel = float(scan.pixel_m())
    except (OSError, ValueError, FileFormatError) as exc:
        raise TrainError(f"--scan {cfg.scan}: {exc}") from None
    n, h, w = frames.shape
    if h != w:
        raise TrainError(f"--scan {cfg.scan}: the frames are {h}x{w}; the network takes square frames")
    if cfg.probe not in PROBE_KINDS:
        modes = read_probe_modes(cfg.probe, h)
    elif scan.probe is not None:
        modes = probe_modes(scan.probe, h, where=f"--scan {cfg.scan}")
    else:
        raise TrainError(f"--scan {cfg.scan} holds no probe: pass --probe FILE (the physics loss needs it)")
    if out == "auto":
        out = auto_output_size(np.sqrt(np.sum(np.abs(modes) ** 2, axis=0)), int(pre.output_shape((h, w))[-1]),
                               cfg.depth)
    positions = np.asarray(scan.positions_m, dtype=np.float64)
    keep = np.arange(n)
    if cfg.scan_heldout > 0:
        split = heldout_split(positions, cfg.scan_heldout, cfg.scan_side, int(out) / 2 * pixel)
        keep = split.train
    bad = bad_pixels(frames)
    frames = clean_frames(frames[keep], bad, "zero") if bad.any() else frames[keep]
    src, facts = physics_source(cfg, frames=frames, positions_m=positions[keep], modes=modes, pixel_m=pixel,
                                pre=pre, out=int(out), bad=bad if bad.any() else None, labelled=labelled)
    if labelled is None:
        facts["pixel_m"] = pixel
    return src, facts
