"""The reconstructor device: PV handlers wired to receive → queue → infer → publish.

Protocol-free: it only talks to :class:`DeviceState`. ``ptychostream ioc`` serves it
over PVA and CA with :func:`ptychostream.protocols.server.serve`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.core.device import DeviceState, PutError
from ptychostream.core.frames import ImageFrame
from ptychostream.core.pvdb import load_db
from ptychostream.core.stats import Counters, LatencyWindow, RateMeter
from ptychostream.model.preprocess import NORMALISATIONS as NORMS
from ptychostream.model.preprocess import SCALES, Preprocess
from ptychostream.pipeline.batcher import Batcher
from ptychostream.pipeline.publish import Publisher
from ptychostream.pipeline.queue import POLICIES, FrameQueue
from ptychostream.pipeline.receive import GapCounter, PositionMonitor, Receiver
from ptychostream.pipeline.record import Recorder
from ptychostream.pipeline.stitch import SOURCES, MosaicStage, load_trajectory

__all__ = ["Reconstructor", "MODEL_NONE", "MODEL_LOADING", "MODEL_READY", "MODEL_ERROR",
           "ST_DISABLED", "ST_IDLE", "ST_RUNNING", "ST_OVERLOAD", "ST_ERROR", "PRE_PVS"]

_log = logging.getLogger(__name__)

#: ModelStatus_RBV states, in the order of db/
MODEL_NONE, MODEL_LOADING, MODEL_READY, MODEL_ERROR = range(4)
#: Status_RBV states, in the order of db/
ST_DISABLED, ST_IDLE, ST_RUNNING, ST_OVERLOAD, ST_ERROR = range(5)
CONNECT_TIMEOUT_S = 5.0
#: the pre-processing setpoints (each has a _RBV)
PRE_PVS = ("PreFFTShift", "PreCropSize", "PreCropX", "PreCropY", "PreBin", "PreThreshold", "PreScale",
           "PreNormalise", "PreNormValue", "PreDarkPath")


class Reconstructor:
    """Owns the pipeline and the device state of one reconstructor IOC."""

    def __init__(self, device: DeviceState | None = None) -> None:
        self.device = device or DeviceState(load_db("reconstructor.db"), message_pv="Message_RBV",
                                             refused_pv="RefusedPuts_RBV")
        d = self.device
        self.counters = Counters()
        self.in_rate = RateMeter()
        self.out_rate = RateMeter()
        self.latency = LatencyWindow()
        self.queue = FrameQueue(limit=d.get("BacklogLimit"))
        self.publisher = Publisher(d)
        self.batcher = Batcher(self.queue, self.publisher, self.counters, self.latency,
                               self.out_rate, self._on_reject)
        self.batcher.batch_size = d.get("BatchSize")
        self.receiver = Receiver(self._on_monitor_frame, self._on_bad_frame, self._on_connect)
        self.mosaic = MosaicStage(d, lambda text, sev: self.message(text, severity=sev))
        self.publisher.add_listener(self.mosaic.on_result)
        self.recorder: Recorder | None = None
        self._record_counts = (0, 0)
        self.table_monitor = PositionMonitor(self._on_table, lambda text: self.message(text, severity=1))
        self.motor_monitors = [PositionMonitor(self._motor_cb(axis), lambda text: self.message(text, severity=1))
                               for axis in (0, 1)]
        self._gaps = {"monitor": GapCounter(), "put": GapCounter()}
        self.receiver.on_stale = self._on_stale
        self._enabled = False
        self._monitor_since: float | None = None
        self._model_error = False
        self._load_lock = threading.Lock()
        self._load_seq = 0
        self._model_info = None
        self._dark_path = ""
        self._dark: np.ndarray | None = None
        self._crop_xy = (-1, -1)
        self._register()
        for name in ("BatchSize", "BacklogLimit", "BacklogPolicy", "PublishRate", "PositionSource", "PosAttrX",
                     "PosAttrY", "PosScale", "PositionTimeout", "PixelSize", "MosaicRate", "MosaicOffset",
                     "MotorTolerance"):
            d.set(f"{name}_RBV", d.get(name))
        self.mosaic.configure(**self._mosaic_settings())
        d.set("Backend_RBV", d.get("Backend"))
        self._show_preprocess(self._preprocess_from_pvs())

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()
        self.mosaic.start()

    def stop(self) -> None:
        if self.recorder is not None:
            rec, self.recorder = self.recorder, None
            self._finish_record(rec)
        self.receiver.close()
        self.table_monitor.close()
        for m in self.motor_monitors:
            m.close()
        self.batcher.stop()
        self.mosaic.stop()
        self.batcher.join(timeout=5)
        self.mosaic.join(timeout=5)

    async def status_task(self, period: float = 0.1) -> None:
        """Copy counters, rates and latency into their PVs (the IOC's scan task)."""
        while True:
            self.update_status()
            await asyncio.sleep(period)

    def update_status(self) -> None:
        d, c = self.device, self.counters.snapshot()
        d.set("Received_RBV", c["received"])
        d.set("Processed_RBV", c["processed"])
        d.set("Rejected_RBV", c["rejected"])
        d.set("Missed_RBV", c["missed"])
        d.set("Dropped_RBV", self.queue.dropped)
        backlog = self.queue.backlog
        d.set("Backlog_RBV", backlog)
        in_rate, out_rate = self.in_rate.rate(), self.out_rate.rate()
        d.set("InputRate_RBV", round(in_rate, 1))
        d.set("FrameRate_RBV", round(out_rate, 1))
        p50, p99 = self.latency.percentiles_ms()
        d.set("LatencyP50_RBV", round(p50, 3))
        d.set("LatencyP99_RBV", round(p99, 3))
        if not self._enabled:
            state = ST_DISABLED
        elif self._model_error and self.batcher.model is None:
            state = ST_ERROR
        elif backlog >= self.queue.limit:
            state = ST_OVERLOAD
        elif out_rate > 0 or in_rate > 0 or backlog > 0:
            state = ST_RUNNING
        else:
            state = ST_IDLE
        d.set("Status_RBV", state)
        d.set_many(self.mosaic.status())
        rec = self.recorder
        written, dropped = (rec.written, rec.dropped) if rec is not None else self._record_counts
        d.set("CaptureWritten_RBV", written)
        d.set("CaptureDropped_RBV", dropped)
        since = self._monitor_since
        if since is not None and time.monotonic() - since > CONNECT_TIMEOUT_S:
            self._monitor_since = None
            if not d.get("InputConnected_RBV"):
                self.message(f"InputPV {self.receiver.channel} not connected after {CONNECT_TIMEOUT_S:.0f} s: "
                             "check the name and that the detector IOC is reachable", severity=1)

    def message(self, text: str, severity: int = 0) -> None:
        _log.info("%s", text)
        self.device.set("Message_RBV", text, severity=severity)

    # -- intake -------------------------------------------------------------------
    def _intake(self, frame: ImageFrame, source: str) -> None:
        self.counters.add("received")
        self.in_rate.add()
        missed = self._gaps[source].update(frame.unique_id)
        if missed:
            self.counters.add("missed", missed)
        self.queue.put(frame)

    def _on_stale(self, uid: int) -> None:
        """The current value seen on connecting: not counted, but gaps count from it."""
        self._gaps["monitor"].last = uid or None

    def _on_monitor_frame(self, frame: ImageFrame) -> None:
        self._intake(frame, "monitor")

    def _on_bad_frame(self, reason: str) -> None:
        self.counters.add("received")
        self.counters.add("rejected")
        self.message(f"rejected frame: {reason}", severity=1)

    def _on_reject(self, n: int, reason: str) -> None:
        self.message(f"rejected {n} frame(s): {reason}", severity=1)

    def _on_connect(self, connected: bool, text: str) -> None:
        if connected:
            self._monitor_since = None
        if self.device.set("InputConnected_RBV", int(connected)):
            self.message(text or f"{self.receiver.channel} connected", severity=0 if connected else 1)

    def _monitor(self, channel: str) -> None:
        self._monitor_since = time.monotonic() if channel else None
        self.receiver.monitor(channel)

    # -- PV handlers ----------------------------------------------------------------
    def _register(self) -> None:
        d = self.device
        on = d.on_put

        @on("Enable")
        def _enable(value: int) -> None:
            self._enabled = bool(value)
            self._monitor(d.get("InputPV_RBV") if self._enabled else "")
            d.set("Enable_RBV", value)

        @on("InputPV")
        def _input_pv(value: str) -> str:
            value = value.strip()
            self._gaps["monitor"].reset()
            d.set("InputPV_RBV", value)
            if self._enabled:
                self._monitor(value)
            return value

        @on("Input")
        def _input(frame: ImageFrame) -> None:
            if not self._enabled:
                raise PutError("reconstructor is disabled: put Enable=1 first")
            self._intake(frame, "put")

        @on("BatchSize")
        def _batch(value: int) -> None:
            self.batcher.batch_size = value
            d.set("BatchSize_RBV", self.batcher.batch_size)

        @on("BacklogLimit")
        def _limit(value: int) -> None:
            d.set("BacklogLimit_RBV", self.queue.set_limit(value))

        @on("BacklogPolicy")
        def _policy(value: int) -> None:
            self.queue.set_policy(POLICIES[value])
            d.set("BacklogPolicy_RBV", value)

        @on("PublishRate")
        def _rate(value: float) -> None:
            d.set("PublishRate_RBV", self.publisher.set_rate(value))

        @on("ResetCounters")
        def _reset(value: int) -> int:
            if value:
                self.counters.reset()
                self.queue.dropped = 0
                self.in_rate.reset()
                self.out_rate.reset()
                self.latency.reset()
                for g in self._gaps.values():
                    g.reset()
                self.update_status()
                self.message("counters reset")
            return 0

        @on("ModelPath")
        def _model_path(value: str) -> str:
            value = value.strip()
            self._load(value, d.get("Backend"))
            return value

        @on("Backend")
        def _backend(value: int) -> None:
            path = d.get("ModelPath_RBV")
            if path:
                self._load(path, value)

        # -- positions and mosaic --
        def mosaic_setting(name: str, key: str | None = None, convert=lambda v: v):
            def handler(value: Any) -> None:
                if key is not None:
                    self.mosaic.configure(**{key: convert(value)})
                rbv = d.db[name].readback
                if rbv:
                    d.set(rbv, value)
            on(name)(handler)

        mosaic_setting("PositionSource", "source", lambda v: SOURCES[v])
        mosaic_setting("PosAttrX", "attr_x")
        mosaic_setting("PosAttrY", "attr_y")
        mosaic_setting("PosScale", "scale")
        mosaic_setting("PositionTimeout", "timeout_s")
        mosaic_setting("PixelSize", "pixel_m")
        mosaic_setting("MosaicRate", "rate_hz")
        mosaic_setting("MosaicOffset", "offset", lambda v: d.db["MosaicOffset"].enum_strs[v])

        @on("MotorTolerance")
        def _tolerance(value: float) -> None:
            self.mosaic.motors.tolerance_s = value
            d.set("MotorTolerance_RBV", value)

        @on("PositionPV")
        def _position_pv(value: str) -> str:
            value = value.strip()
            self.table_monitor.monitor(value)
            d.set("PositionPV_RBV", value)
            return value

        def motor_pv(name: str, axis: int) -> None:
            @on(name)
            def handler(value: str) -> str:
                value = value.strip()
                try:
                    self.motor_monitors[axis].monitor(value)
                except Exception as exc:  # a CA name that does not resolve, say
                    raise PutError(f"{name}: cannot monitor {value}: {exc}") from None
                d.set(f"{name}_RBV", value)
                return value

        motor_pv("MotorXPV", 0)
        motor_pv("MotorYPV", 1)

        @on("TrajectoryFile")
        def _trajectory(value: str) -> str:
            value = value.strip()
            traj = None
            if value:
                try:
                    traj = load_trajectory(value, d.get("PosScale"))
                except (OSError, ValueError, KeyError) as exc:
                    raise PutError(f"TrajectoryFile: {exc}") from None
            self.mosaic.configure(trajectory=traj)
            d.set("TrajectoryFile_RBV", value)
            if traj is not None:
                self.message(f"trajectory of {len(traj)} points from {value}")
            return value

        def extent(name: str) -> None:
            @on(name)
            def handler(value: float) -> None:
                ext = {n: d.get(n) for n in ("MosaicYMin", "MosaicYMax", "MosaicXMin", "MosaicXMax")}
                ext[name] = value
                vals = (ext["MosaicYMin"], ext["MosaicYMax"], ext["MosaicXMin"], ext["MosaicXMax"])
                if any(vals) and (vals[1] <= vals[0] or vals[3] <= vals[2]):
                    d.set(name, value)  # accepted as typed; applied once min < max on both axes
                    self.message("mosaic extent incomplete: set min < max for x and y", 1)
                    return
                self.mosaic.configure(extent_m=vals if any(vals) else None)

        for name in ("MosaicXMin", "MosaicXMax", "MosaicYMin", "MosaicYMax"):
            extent(name)

        @on("CaptureFrames")
        def _capture_frames(value: int) -> None:
            d.set("CaptureFrames_RBV", value)

        @on("CaptureFile")
        def _capture_file(value: str) -> str:
            if self.recorder is not None:
                raise PutError("cannot change CaptureFile while capturing: put Capture=0 first")
            return value.strip()

        @on("Capture")
        def _capture(value: int) -> None:
            if value and self.recorder is None:
                path = d.get("CaptureFile").strip()
                if not path:
                    raise PutError("Capture: set CaptureFile first")
                try:
                    self.recorder = Recorder(path, frames=bool(d.get("CaptureFrames")), attr_x=d.get("PosAttrX"),
                                             attr_y=d.get("PosAttrY"), scale=d.get("PosScale"),
                                             on_error=lambda text: self.message(text, severity=2))
                except OSError as exc:
                    raise PutError(f"Capture: cannot write {path}: {exc}") from None
                self.publisher.add_listener(self.recorder.submit)
                d.set("CaptureFile_RBV", path)
                d.set("Capture_RBV", 1)
                self.message(f"recording to {path}")
            elif not value and self.recorder is not None:
                rec, self.recorder = self.recorder, None
                self.publisher.remove_listener(rec.submit)
                threading.Thread(target=self._finish_record, args=(rec,), daemon=True).start()

        @on("MosaicReset")
        def _mosaic_reset(value: int) -> int:
            if value:
                self.mosaic.reset()
                self.message("mosaic cleared")
            return 0

        for name in PRE_PVS:
            on(name)(self._make_pre_handler(name))

    def _finish_record(self, rec: Recorder) -> None:
        """Close a record with the final mosaic (off the put path)."""
        try:
            mosaic = self.mosaic.snapshot()
        except Exception as exc:  # the record still closes
            mosaic = None
            self.message(f"record: no final mosaic ({exc})", severity=1)
        rec.close(mosaic)
        self._record_counts = (rec.written, rec.dropped)
        self.device.set("Capture_RBV", 0)
        if not rec.error:
            self.message(f"record {rec.path} closed: {rec.written} frames, {rec.dropped} dropped")

    def _mosaic_settings(self) -> dict[str, Any]:
        d = self.device
        return {"source": SOURCES[d.get("PositionSource")], "attr_x": d.get("PosAttrX"),
                "attr_y": d.get("PosAttrY"), "scale": d.get("PosScale"), "pixel_m": d.get("PixelSize"),
                "rate_hz": d.get("MosaicRate"), "timeout_s": d.get("PositionTimeout"),
                "offset": d.db["MosaicOffset"].enum_strs[d.get("MosaicOffset")]}

    def _on_table(self, value) -> None:
        uids, x, y = value
        self.mosaic.add_positions(uids, y, x)

    def _motor_cb(self, axis: int):
        def cb(value) -> None:
            v, t = value
            self.mosaic.add_motor(axis, t, v)
        return cb

    # -- pre-processing -----------------------------------------------------------
    def _preprocess_from_pvs(self, override: dict[str, Any] | None = None) -> Preprocess:
        v = {n: self.device.get(n) for n in PRE_PVS}
        v.update(override or {})
        if v["PreDarkPath"] != self._dark_path:
            self._dark = _load_dark(v["PreDarkPath"]) if v["PreDarkPath"] else None
            self._dark_path = v["PreDarkPath"]
        cx, cy = v["PreCropX"], v["PreCropY"]
        self._crop_xy = (cx, cy)  # the centre applies once both are set
        pre = Preprocess(
            fftshift=bool(v["PreFFTShift"]),
            crop_size=v["PreCropSize"] or None,
            crop_center=None if cx < 0 or cy < 0 else (cy, cx),
            bin=v["PreBin"],
            dark=self._dark,
            dark_path=self._dark_path or None,
            threshold=v["PreThreshold"],
            scale=SCALES[v["PreScale"]],
            normalise=NORMS[v["PreNormalise"]],
            norm_value=v["PreNormValue"],
        )
        pre.validate()
        return pre

    def _make_pre_handler(self, name: str):
        def handler(value: Any) -> Any:
            try:
                pre = self._preprocess_from_pvs({name: value})
            except (ValueError, OSError, KeyError) as exc:
                raise PutError(f"{name}: {exc}") from None
            self.batcher.set_preprocess(pre)
            self._show_preprocess(pre, setpoints=False)
            return value
        return handler

    def _show_preprocess(self, pre: Preprocess, setpoints: bool = True) -> None:
        """Write a Preprocess into the Pre*_RBV PVs (and the setpoints after a model load)."""
        cy, cx = pre.crop_center if pre.crop_center else self._crop_xy[::-1]
        values = {
            "PreFFTShift": int(pre.fftshift), "PreCropSize": pre.crop_size or 0,
            "PreCropX": cx, "PreCropY": cy, "PreBin": pre.bin, "PreThreshold": pre.threshold,
            "PreScale": SCALES.index(pre.scale), "PreNormalise": NORMS.index(pre.normalise),
            "PreNormValue": pre.norm_value, "PreDarkPath": self._dark_path,
        }
        for name, value in values.items():
            if setpoints:
                self.device.set(name, value)
            self.device.set(f"{name}_RBV", value)

    # -- model loading (hot swap) ---------------------------------------------------
    def _load(self, path: str, backend: int) -> None:
        """Load and validate in the background; the serving model keeps running meanwhile."""
        with self._load_lock:
            self._load_seq += 1
            seq = self._load_seq
        self.device.set("ModelStatus_RBV", MODEL_LOADING)
        self.message(f"loading {path}" if path else "unloading model")
        threading.Thread(target=self._load_worker, args=(seq, path, backend),
                         name="ptychostream-load", daemon=True).start()

    def _load_worker(self, seq: int, path: str, backend: int) -> None:
        from ptychostream.model.backends import BACKEND_CHOICES
        from ptychostream.model.infer import open_model

        d = self.device
        if not path:
            self.batcher.swap(None, self.batcher.preprocess or self._preprocess_from_pvs())
            self._finish_load(seq, MODEL_NONE, "model unloaded; frames wait in the queue")
            d.set("ModelPath_RBV", "")
            d.set("ModelInfo_RBV", "")
            return
        t0 = time.monotonic()
        try:
            model = open_model(path, backend=BACKEND_CHOICES[backend], batch_size=d.get("BatchSize"),
                               spinning=False)  # idle ONNX Runtime threads must not starve receive/stitch
            model.selftest()
        except Exception as exc:
            self._model_error = True
            keep = "; the previous model keeps serving" if self.batcher.model is not None else ""
            self._finish_load(seq, MODEL_ERROR, f"model {path} failed: {exc}{keep}", severity=2)
            return
        with self._load_lock:
            if seq != self._load_seq:  # a newer request superseded this one
                model.close()
                return
        info = model.info
        pre = replace(info.preprocess)
        if pre.dark is None and pre.dark_path:
            try:
                self._dark, self._dark_path = _load_dark(pre.dark_path), pre.dark_path
            except (OSError, ValueError, KeyError) as exc:
                self.message(f"model's dark frame {pre.dark_path} not loaded: {exc}", severity=1)
        if pre.dark is None and self._dark is not None:
            pre = replace(pre, dark=self._dark, dark_path=self._dark_path)
        if not self.batcher.swap(model, pre).wait(timeout=30):
            self.message("the inference loop did not take the new model within 30 s", severity=2)
        self._model_error = False
        self._show_preprocess(pre)
        self._apply_stitch_hint(info.metadata.get("ptychostream.stitch"))
        d.set("ModelPath_RBV", path)
        d.set("ModelInfo_RBV", info.summary())
        d.set("Backend_RBV", BACKEND_CHOICES.index(model.backend.name))
        fallback = getattr(model, "fallback_reasons", None) or []
        note = f" (fallback: {'; '.join(fallback)})" if fallback else ""
        self._finish_load(seq, MODEL_READY,
                          f"model ready in {time.monotonic() - t0:.2f} s on {model.backend.name}{note}")

    def _apply_stitch_hint(self, hint: str | None) -> None:
        """A model may say how its patches stitch best (``ptychostream.stitch``: {"offset": ...})."""
        import json

        try:
            offset = json.loads(hint).get("offset") if hint else None
        except (ValueError, AttributeError):
            offset = None
        choices = self.device.db["MosaicOffset"].enum_strs
        if offset in choices:
            self.device.set("MosaicOffset", choices.index(offset))
            self.device.set("MosaicOffset_RBV", choices.index(offset))
            self.mosaic.configure(offset=offset)

    def _finish_load(self, seq: int, status: int, text: str, severity: int = 0) -> None:
        with self._load_lock:
            if seq != self._load_seq:
                return
        self.message(text, severity=severity)  # first, so a client that sees the status finds why
        self.device.set("ModelStatus_RBV", status)


def _load_dark(path: str) -> np.ndarray:
    """A dark/background frame from .npy, HDF5 (mean of the first image dataset) or an image file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dark file not found: {path}")
    if p.suffix == ".npy":
        arr = np.load(p)
    elif p.suffix in (".h5", ".hdf5", ".nxs"):
        import h5py

        with h5py.File(p, "r") as fh:
            found: list[str] = []
            fh.visititems(lambda n, o: found.append(n) if hasattr(o, "ndim") and o.ndim in (2, 3) and not found else None)
            if not found:
                raise KeyError(f"no 2-D or 3-D dataset in {path}")
            arr = fh[found[0]][()]
    else:
        from skimage.io import imread

        arr = imread(p)
    arr = np.asarray(arr, dtype=np.float32)
    return arr.mean(axis=0) if arr.ndim == 3 else arr
