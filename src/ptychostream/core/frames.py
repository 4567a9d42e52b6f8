"""The frame and batch types that travel the data path."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["ImageFrame", "BatchResult"]


@dataclass
class ImageFrame:
    """An image with NTNDArray metadata, ready for any image sink."""

    array: np.ndarray
    unique_id: int = 0
    timestamp: float = field(default_factory=time.time)
    data_timestamp: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchResult:
    """One inferred batch: input frames and per-output arrays (n, h, w)."""

    frames: Sequence[ImageFrame]
    outputs: dict[str, np.ndarray]
    latency_s: np.ndarray
    model_id: str
    pixel_m: float | None = None
    #: per-frame physics-consistency figure (NaN where a frame was not sampled); None: not computed
    consistency: np.ndarray | None = None
