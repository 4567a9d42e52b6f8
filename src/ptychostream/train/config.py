"""Training configuration, its errors and small helpers shared by the training modules."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ptychostream.model.network import HEADS, NetworkError, import_torch

__all__ = [
    "TRAIN_KINDS", "KIND_WEIGHTS", "PRECISIONS", "CHECKPOINT_NAME", "SELECT_FIGURES", "PHYSICS_FRAMES",
    "OVERLAP_NORMS", "TrainError", "TrainConfig", "torch_module", "check_finite", "crop_centre", "probe_weight",
    "auto_output_size", "amplitude_scale_for",
]

#: object families used for training (digits and siemens are held out for the demo)
TRAIN_KINDS: tuple[str, ...] = ("etched", "circuit", "dead_leaves", "blurred_noise", "procedural")

#: default mix of the families
KIND_WEIGHTS = {"etched": 0.3, "circuit": 0.25, "dead_leaves": 0.15, "blurred_noise": 0.1, "procedural": 0.2}

PRECISIONS = ("fp32", "bf16")

#: the checkpoint file in a --checkpoint folder
CHECKPOINT_NAME = "last.pt"

#: the validation figures a run can keep its best checkpoint by (``--select``): ``none`` exports the last
#: step; ``loss`` the run's weighted loss; ``poisson`` the deviance; ``overlap`` the overlap disagreement
SELECT_FIGURES = ("none", "loss", "poisson", "overlap")

#: what the physics loss compares (``--physics-frame``): the network's input geometry, or the full frame
PHYSICS_FRAMES = ("input", "full")

#: the overlap term's normalisation (``--overlap-norm``): none, or by the overlapping pair's power
OVERLAP_NORMS = ("none", "power")


class TrainError(ValueError):
    """Bad training input or settings; the message says what to fix."""


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
    #: the amplitude head is ``amp_scale`` × sigmoid, so it can give amplitudes above 1 (None: from the
    #: labels, at least 1, or the --init model's); recorded as ``net.amplitude_scale`` in the metadata
    amp_scale: float | None = None
    #: the --init model may have another object pixel and pre-processing (a model moved to another
    #: instrument: its weights are a starting point, the run's own pre-processing and pixel are kept)
    retarget: bool = False
    #: seconds of a --budget kept for the last evaluation and the export
    budget_reserve_s: float = 60.0
    #: the mosaic offset the model asks the live stitcher for (``ptychostream.stitch``)
    stitch_offset: str = "overlap"
    #: the mosaic domain it asks for: "phase", "complex", or "auto": complex when the run trained on the
    #: frames alone (a loss that sees only exp(i phase) fixes the phase modulo 2 pi), else phase
    stitch_domain: str = "auto"
    #: what ``budget_s`` counts: ``wall`` seconds, or ``cpu`` seconds of this process (all its threads)
    budget_clock: str = "wall"
    # physics-informed loss (train/physics.py): weights of the supervised L1, the Poisson deviance of the
    # measured frames under the known probe, and the overlap agreement of neighbouring patches
    supervised_weight: float = 1.0
    physics_weight: float = 0.0
    overlap_weight: float = 0.0
    #: the scan whose frames (no labels) feed the physics loss; its probe unless ``probe`` is a file
    scan: str | None = None
    #: share of each batch taken from the scan's frames when the supervised loss is on too
    frames_share: float = 0.5
    #: frames of the scan held out (a spatial region, as adapt's): never used by the physics loss
    scan_heldout: float = 0.0
    scan_side: str = "right"
    #: neighbouring frames per group in a physics batch (pairs for the overlap term)
    physics_group: int = 4
    #: the object outside the predicted patch: ``border`` (the patch's mean border value) or ``mosaic`` (the
    #: network's own patches of the scan stitched, refreshed every ``context_every`` steps)
    physics_context: str = "border"
    context_every: int = 50
    #: what the physics loss compares: ``input`` (the network's input geometry: its crop and bin) or
    #: ``full`` (every pixel of the detector frame, in the same origin and orientation)
    physics_frame: str = "input"
    #: the overlap term as is (``none``) or divided by the pair's mean power (``power``: blind to the object's
    #: amplitude scale, which the deviance leaves free)
    overlap_norm: str = "none"
    #: weight of the squared probe-weighted mean phase of each patch (physics loss; keeps the bounded phase
    #: head away from ±π, where the frames leave the absolute phase free)
    phase_anchor: float = 0.0
    #: weight of the penalty on phase jumps between neighbouring output pixels above pi/2 (phase wraps)
    wrap_weight: float = 0.0
    #: export the checkpoint with the lowest validation figure (``SELECT_FIGURES``) instead of the last one;
    #: with the physics loss, ``select_frames`` training-side frames are kept out of the batches for it
    select: str = "none"
    select_frames: int = 24

    def hinted_domain(self) -> str:
        """The mosaic domain of the model's stitch hint (``stitch_domain``, "auto" resolved)."""
        if self.stitch_domain != "auto":
            return self.stitch_domain
        return "complex" if self.uses_physics() and self.supervised_weight == 0 else "phase"

    def uses_physics(self) -> bool:
        """Whether the physics loss (or its overlap term) is on."""
        return self.physics_weight > 0 or self.overlap_weight > 0

    def key(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed (not output/device/limits)."""
        d = asdict(self)
        for k in ("output", "device", "threads", "checkpoint", "time_limit_s", "budget_s", "name", "epochs",
                  "precision", "budget_reserve_s", "stitch_offset", "stitch_domain", "budget_clock"):
            d.pop(k)
        return json.loads(json.dumps(d))


# =========================================================================== helpers
def torch_module() -> Any:
    """The ``torch`` module, imported on first use; TrainError saying how to install it."""
    try:
        return import_torch()
    except NetworkError:
        raise TrainError("training needs PyTorch: pip install 'ptychostream[train]' (or torch>=2.2)") from None


def check_finite(name: str, arr: np.ndarray) -> None:
    """TrainError naming ``name`` and how many samples hold NaN or inf, if any do."""
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
        bad = int((~np.isfinite(arr)).reshape(len(arr), -1).any(axis=1).sum()) if arr.ndim > 1 else 1
        raise TrainError(f"{name} holds NaN or infinite values ({bad} sample(s)); clean the data first")


def crop_centre(a: np.ndarray, out: int) -> np.ndarray:
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
    return crop_centre(w, out).astype(np.float32)


def auto_output_size(probe: np.ndarray | None, size: int, depth: int, energy: float = 0.97) -> int:
    """Smallest centred square (a multiple of 2**depth) that holds ``energy`` of the probe intensity."""
    step = 2 ** depth
    if probe is None:
        return size
    inten = np.abs(np.asarray(probe)) ** 2
    total = float(inten.sum())
    for out in range(step, size + 1, step):
        if float(crop_centre(inten, out).sum()) >= energy * total:
            return out
    return size


def amplitude_scale_for(amplitudes: np.ndarray | None, headroom: float = 1.25, step: float = 0.25) -> float:
    """The amplitude head's scale for these labels: 1 when they stay at or below 1, else their 99.9th
    percentile × ``headroom``, rounded up to a multiple of ``step`` (a sigmoid never reaches its top)."""
    if amplitudes is None or np.size(amplitudes) == 0:
        return 1.0
    peak = float(np.percentile(np.asarray(amplitudes, dtype=np.float32), 99.9))
    if not math.isfinite(peak) or peak <= 1.05:  # resampling rings a little above 1
        return 1.0
    return float(math.ceil(peak * headroom / step) * step)
