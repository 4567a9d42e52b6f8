"""Publish: per-frame results out as NTNDArray images, decimated for displays.

Every result still reaches the result listeners (stitcher, recorder); only the
``Phase``/``Amplitude`` image posts are limited by ``PublishRate``.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from ptychostream.core.device import DeviceState
from ptychostream.core.frames import BatchResult, ImageFrame

__all__ = ["Publisher"]


class Publisher:
    """Posts Phase/Amplitude images at most ``rate_hz`` times a second (0 = every frame)."""

    IMAGE_PVS = {"phase": "Phase", "amplitude": "Amplitude"}

    def __init__(self, device: DeviceState, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` (seconds, monotonic) times the decimation."""
        self.device = device
        self.clock = clock
        self.rate_hz = 0.0
        self._next = 0.0
        self.listeners: list[Callable[[BatchResult], None]] = []

    def set_rate(self, rate_hz: float) -> float:
        """Cap the image posts at ``rate_hz`` (0 or less: every frame); the next result posts at once."""
        self.rate_hz = max(0.0, float(rate_hz))
        self._next = 0.0
        return self.rate_hz

    def add_listener(self, listener: Callable[[BatchResult], None]) -> None:
        self.listeners = [*self.listeners, listener]  # copy-on-write: publish() may be iterating

    def remove_listener(self, listener: Callable[[BatchResult], None]) -> None:
        """Stop calling ``listener``; a bound method matches its equal (``rec.submit`` is new each time)."""
        self.listeners = [x for x in self.listeners if x != listener]

    def publish(self, result: BatchResult) -> None:
        """Hand ``result`` to every listener, then post its images (the last frame only when rate-limited)."""
        for listener in self.listeners:
            listener(result)
        if self.rate_hz > 0:
            now = self.clock()
            if now < self._next:
                return
            self._next = now + 1.0 / self.rate_hz
            indices: Sequence[int] = [len(result.frames) - 1]
        else:
            indices = range(len(result.frames))
        for key, pv in self.IMAGE_PVS.items():
            data = result.outputs.get(key)
            if data is None:
                continue
            for i in indices:
                src = result.frames[i]
                attrs = dict(src.attributes)
                attrs.pop("ColorMode", None)
                attrs["LatencyMs"] = float(result.latency_s[i] * 1e3)
                attrs["ModelId"] = result.model_id
                self.device.post_image(pv, ImageFrame(
                    array=data[i],
                    unique_id=src.unique_id,
                    timestamp=src.timestamp,
                    data_timestamp=src.data_timestamp,
                    attributes=attrs,
                ))
