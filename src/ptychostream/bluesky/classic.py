"""The reconstructor as a classic ophyd ``Device`` over Channel Access (for ophyd/pyepics beamlines).

Needs ``ophyd`` (classic). Component names follow the ophyd-async devices (:mod:`._devices`);
the PVs are db/'s, areaDetector style (setpoint ``Name``, readback ``Name_RBV``)::

    from bluesky import RunEngine
    from bluesky.plans import count
    from ptychostream.bluesky.classic import ClassicReconstructor

    recon = ClassicReconstructor("PTY:NN:", name="recon")
    recon.wait_for_connection()
    RE = RunEngine()
    RE(count([recon], num=3))

``trigger()`` completes when no frame is in flight (the backlog empty, every received frame
processed, dropped or rejected, every processed one stitched, and the counters unchanged for
``quiet`` s); ``load_model(path)`` returns a status that completes when ``path`` serves and fails
with the device's message when its load fails.
"""

from __future__ import annotations

import threading
import time
from typing import Any

try:
    # ophyd has no py.typed: its names are Any (installed or not)
    from ophyd import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
        Component as Cpt,
    )
    from ophyd import (
        Device,
        EpicsSignal,
        EpicsSignalRO,
        Kind,
    )
    from ophyd.status import DeviceStatus, Status  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(f"ptychostream.bluesky.classic needs classic ophyd: pip install ophyd: {exc}") from exc

__all__ = ["ClassicReconstructor"]

_COUNTERS = ("processed", "dropped", "rejected", "backlog", "received", "stitched", "unpositioned")


def _rw(suffix: str, kind: Kind = Kind.config, **kw: Any) -> Cpt:
    """Write ``suffix``, read ``suffix_RBV``."""
    return Cpt(EpicsSignal, f"{suffix}_RBV", write_pv=suffix, kind=kind, **kw)


def _ro(suffix: str, kind: Kind = Kind.normal, **kw: Any) -> Cpt:
    return Cpt(EpicsSignalRO, suffix, kind=kind, **kw)


class ClassicReconstructor(Device):
    """The ptychostream reconstructor (prefix ``$(P)$(R)``) over CA with classic ophyd."""

    enable = _rw("Enable", string=True)
    model_path = _rw("ModelPath", string=True)
    model_status = _ro("ModelStatus_RBV", Kind.config, string=True)
    model_info = _ro("ModelInfo_RBV", Kind.config, string=True)
    input_pv = _rw("InputPV", string=True)
    batch_size = _rw("BatchSize")
    pixel_size = _rw("PixelSize")
    capture = _rw("Capture", Kind.omitted, string=True)
    capture_file = _rw("CaptureFile", Kind.omitted, string=True)

    processed = _ro("Processed_RBV", Kind.hinted)
    received = _ro("Received_RBV")
    dropped = _ro("Dropped_RBV")
    rejected = _ro("Rejected_RBV")
    missed = _ro("Missed_RBV")
    backlog = _ro("Backlog_RBV")
    stitched = _ro("Stitched_RBV")
    unpositioned = _ro("Unpositioned_RBV")
    frame_rate = _ro("FrameRate_RBV")
    latency_p50 = _ro("LatencyP50_RBV")
    mosaic_coverage = _ro("MosaicCoverage_RBV")
    status = _ro("Status_RBV", string=True)
    message = _ro("Message_RBV", string=True)

    def __init__(self, prefix: str = "", *, name: str, quiet: float = 0.3, timeout: float = 60.0,
                 **kwargs: Any) -> None:
        super().__init__(prefix, name=name, **kwargs)
        self.quiet, self.timeout = quiet, timeout

    def counts(self) -> dict[str, int]:
        """The frame counters, read now."""
        return {n: int(getattr(self, n).get(use_monitor=False)) for n in _COUNTERS}

    def stage(self) -> list[Any]:
        self._base = self.counts()  # a MosaicReset zeroes Stitched_RBV only: compare what changed since
        return super().stage()

    def _drained(self, c: dict[str, int]) -> bool:
        b = getattr(self, "_base", None) or dict.fromkeys(_COUNTERS, 0)
        stitched = c["stitched"] - b["stitched"] + c["unpositioned"] - b["unpositioned"]
        return (c["backlog"] == 0 and c["processed"] + c["dropped"] + c["rejected"] >= c["received"]
                and stitched >= c["processed"] - b["processed"])

    def trigger(self) -> DeviceStatus:
        """Complete when no frame is in flight (see the module's docstring)."""
        status = DeviceStatus(self, timeout=self.timeout)

        def run() -> None:
            last: dict[str, int] = {}
            deadline = time.monotonic() + self.timeout
            try:
                while time.monotonic() < deadline:
                    c = self.counts()
                    if c == last and self._drained(c):
                        status.set_finished()
                        return
                    last = c
                    time.sleep(self.quiet)
                status.set_exception(TimeoutError(f"{self.name}: frames still in flight: {last}"))
            except Exception as exc:  # noqa: BLE001 - a read failed: the status carries it
                status.set_exception(exc)

        threading.Thread(target=run, name=f"{self.name}-trigger", daemon=True).start()
        return status

    def load_model(self, path: str) -> Status:
        """Put ModelPath; the status completes when ``path`` serves, fails with Message_RBV on Error."""
        status = Status(obj=self, timeout=self.timeout)

        def run() -> None:
            try:
                self.model_path.put(path, wait=True)
                deadline = time.monotonic() + self.timeout
                state = self.model_status.get(use_monitor=False)
                while state == "Loading" and time.monotonic() < deadline:
                    time.sleep(0.05)
                    state = self.model_status.get(use_monitor=False)
                message = self.message.get(use_monitor=False)
                serving = self.model_path.get(use_monitor=False)
                if state != "Ready" or serving != path:
                    raise RuntimeError(f"{self.name} could not load model {path} (ModelStatus {state}, "
                                       f"serving {serving!r}): {message}")
                status.set_finished()
            except Exception as exc:  # noqa: BLE001 - the status carries any failure
                status.set_exception(exc)

        threading.Thread(target=run, name=f"{self.name}-load", daemon=True).start()
        return status
