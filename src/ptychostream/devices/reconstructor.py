"""The reconstructor device: PV handlers wired to receive → queue → infer → publish.

Protocol-free: it only talks to :class:`DeviceState`. ``ptychostream ioc`` serves it
over PVA and CA with :func:`ptychostream.protocols.server.serve`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ptychostream import __version__
from ptychostream.core.device import Busy, DeviceState, PutError
from ptychostream.core.frames import BatchResult, ImageFrame
from ptychostream.core.messages import GrowthReport
from ptychostream.core.pvdb import load_db
from ptychostream.core.stats import Counters, LatencyWindow, RateMeter, saturate
from ptychostream.files.arrays import open_npz
from ptychostream.files.errors import FileFormatError
from ptychostream.files.hdf5 import dataset as h5_dataset
from ptychostream.files.hdf5 import dataset_names, find_dataset, is_hdf5
from ptychostream.files.paths import split_dataset_path
from ptychostream.model.consistency import ConsistencyMonitor, ProbeError
from ptychostream.model.infer import Model, ModelError
from ptychostream.model.preprocess import NORMALISATIONS as NORMS
from ptychostream.model.preprocess import SCALES, Preprocess
from ptychostream.mosaic.positions import PatternPositions
from ptychostream.pipeline.batcher import Batcher
from ptychostream.pipeline.publish import Publisher
from ptychostream.pipeline.queue import POLICIES, FrameQueue
from ptychostream.pipeline.receive import (
    REORDER_WINDOW,
    GapCounter,
    PositionMonitor,
    Receiver,
)
from ptychostream.pipeline.receive_process import ProcessReceiver
from ptychostream.pipeline.record import Recorder
from ptychostream.pipeline.stitch import SOURCES, MosaicStage, load_trajectory

__all__ = ["Reconstructor", "MODEL_NONE", "MODEL_LOADING", "MODEL_READY", "MODEL_ERROR",
           "ST_DISABLED", "ST_IDLE", "ST_RUNNING", "ST_OVERLOAD", "ST_ERROR", "PRE_PVS", "INSTRUMENT_PVS",
           "FILE_PRE_PVS", "MASK_NAMES", "load_mask",
           "RETRAIN_IDLE", "RETRAIN_RUNNING", "RETRAIN_DONE", "RETRAIN_FAILED", "RETRAIN_REFUSED", "ADAPT_CMD_ENV",
           "adapt_command", "RECEIVERS"]

_log = logging.getLogger(__name__)

#: ModelStatus_RBV states, in the order of db/
MODEL_NONE, MODEL_LOADING, MODEL_READY, MODEL_ERROR = range(4)
#: Status_RBV states, in the order of db/
ST_DISABLED, ST_IDLE, ST_RUNNING, ST_OVERLOAD, ST_ERROR = range(5)
CONNECT_TIMEOUT_S = 5.0
#: counter growth (drops, missed, out of order, ...) is told at most once per counter per this many seconds
REPORT_PERIOD_S = 1.0
#: how long a stop lets the frames already queued be inferred; what is left stays counted as Backlog
STOP_DRAIN_S = 2.0
#: how long a stop waits for a slow put still in progress (a Capture opening its file)
STOP_PUTS_S = 1.0
#: PositionPV positions kept for a record that starts later (the newest; a table may run ahead of the frames)
TABLE_KEEP = 100_000
#: RetrainState_RBV states, in the order of db/
RETRAIN_IDLE, RETRAIN_RUNNING, RETRAIN_DONE, RETRAIN_FAILED, RETRAIN_REFUSED = range(5)
#: the environment variable that names the retrain command (split like a shell line); its arguments follow it
ADAPT_CMD_ENV = "PTYCHOSTREAM_ADAPT_CMD"
#: how often a running retrain's status file is read
RETRAIN_POLL_S = 0.2
#: how long a stop waits for a retrain process to end after SIGTERM, before SIGKILL
RETRAIN_STOP_S = 5.0
#: how the detector channel is received: a p4p monitor in this process, or in a child process joined
#: by a shared-memory ring (``ptychostream ioc --receive``, pipeline/receive_process.py)
RECEIVERS = ("thread", "process")
#: the pre-processing setpoints (each has a _RBV)
PRE_PVS = ("PreFFTShift", "PreFlipY", "PreFlipX", "PreTranspose", "PreCropSize", "PreCropX", "PreCropY", "PreBin",
           "PreThreshold", "PreScale", "PreNormalise", "PreNormValue", "PreDarkPath", "PreMaskPath")
#: the pre-processing setpoints that name a file (a dark frame, a bad-pixel mask), read on a worker thread
FILE_PRE_PVS = ("PreDarkPath", "PreMaskPath")
#: the PV of each instrument setting of :class:`Preprocess` (kept across a model swap); the model
#: settings (PreCropSize, PreBin, PreScale, PreNormalise, PreNormValue) follow the model
INSTRUMENT_PVS = {"fftshift": "PreFFTShift", "flip_y": "PreFlipY", "flip_x": "PreFlipX", "transpose": "PreTranspose",
                  "crop_center": "PreCropX/PreCropY", "threshold": "PreThreshold", "dark_path": "PreDarkPath",
                  "mask_path": "PreMaskPath"}
#: datasets (HDF5) or keys (NPZ) tried for a bad-pixel mask when the path names none
MASK_NAMES = ("mask", "bad_pixels", "badpixels", "bad_pixel_mask", "pixel_mask")


class Reconstructor:
    """Owns the pipeline and the device state of one reconstructor IOC."""

    def __init__(self, device: DeviceState | None = None, prefix: str = "", receive: str = "thread") -> None:
        self.device = device or DeviceState(load_db("reconstructor.db"), message_pv="Message_RBV",
                                             refused_pv="RefusedPuts_RBV", history_pv="MessageHistory_RBV")
        #: the PV prefix this device is served under (``--ioc`` of a retrain, which swaps through ModelPath)
        self.prefix = prefix
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
        self.batcher.on_health = self._on_model_health
        #: the physics-consistency check on the inference thread (model/consistency.py)
        self.consistency = ConsistencyMonitor(share=d.get("ConsistencyShare"), limit=d.get("ConsistencyLimit"),
                                              frames=d.get("ConsistencyFrames"))
        self.consistency.on_alarm = self._on_consistency_alarm
        self.batcher.after_infer = self.consistency
        if receive not in RECEIVERS:
            raise ValueError(f"unknown receiver {receive!r}; choose one of {', '.join(RECEIVERS)}")
        self.receiver: Receiver | ProcessReceiver
        if receive == "process":
            self.receiver = ProcessReceiver(self._on_monitor_frames, self._on_bad_frame, self._on_connect,
                                            self._on_ring_dropped)
            self.receiver.on_restart = self._on_receive_restart
        else:
            self.receiver = Receiver(self._on_monitor_frame, self._on_bad_frame, self._on_connect)
        self.mosaic = MosaicStage(d, lambda text, sev: self.message(text, severity=sev))
        self.publisher.add_listener(self.mosaic.on_result)
        #: the areaDetector ArrayCounter: frames reconstructed, counting on from the last ArrayCounter put
        self._array_counter = 0
        self._array_uid: int | None = None
        self._array_shape: tuple[int, int] | None = None
        self._arrays_shown: tuple[int, int | None, tuple[int, int] | None] | None = None
        self._array_lock = threading.Lock()
        self.publisher.add_listener(self._on_result)
        d.set("DriverVersion_RBV", __version__)
        self.recorder: Recorder | None = None
        self._record_counts = (0, 0)
        self.table_monitor = PositionMonitor(self._on_table, lambda text: self.message(text, severity=1))
        self.motor_monitors = [PositionMonitor(self._motor_cb(axis), lambda text: self.message(text, severity=1))
                               for axis in (0, 1)]
        self._gaps = {"monitor": GapCounter(self.counters), "put": GapCounter(self.counters)}
        self.receiver.on_stale = self._on_stale
        self._growth = GrowthReport(period=REPORT_PERIOD_S)
        self._shown_recorder: Recorder | None = None
        self._enabled = False
        self._monitor_since: float | None = None
        self._model_error = False
        self._load_lock = threading.Lock()
        self._model_status_lock = threading.Lock()
        self._load_seq = 0
        self._model_info = None
        self._dark_path = ""
        self._dark: np.ndarray | None = None
        self._mask_path = ""
        self._mask: np.ndarray | None = None  # (H, W) bool, True = bad
        self._crop_xy = (-1, -1)
        self._stopping = False  # intake refused from the start of stop() on
        self._stopped = False
        self._capture_opening = False  # a Capture=1 creating its file (on a thread)
        self._slow_lock = threading.Lock()
        self._slow_puts: dict[str, Future] = {}  # the latest slow put to each PV
        self._closing: list[threading.Thread] = []  # records closing after Capture=0
        self._trajectory: PatternPositions | None = None  # the TrajectoryFile's positions (for the record too)
        self._table_seen: OrderedDict[int, tuple[float, float]] = OrderedDict()  # PositionPV (y, x) by uid, unscaled
        self._motor_seen: list[tuple[float, float] | None] = [None, None]  # the latest (t, value) of x and y
        self._positions_lock = threading.Lock()
        self._retrain: subprocess.Popen | None = None  # the running retrain process (under handler_lock)
        self._retrain_watch: threading.Thread | None = None
        self._register()
        for name in ("BatchSize", "BacklogLimit", "BacklogPolicy", "PublishRate", "PositionSource", "PosAttrX",
                     "PosAttrY", "PosScale", "PositionTimeout", "PixelSize", "MosaicRate", "MosaicOffset",
                     "MosaicDomain",
                     "MosaicDisplaySize", "MotorTolerance", "RetrainBudget", "RetrainSwap"):
            d.set(f"{name}_RBV", d.get(name))
        for name in ("ConsistencyLimit", "ConsistencyFrames"):
            d.set(f"{name}_RBV", d.get(name))
        d.set("ConsistencyShare_RBV", self.consistency.used_share())
        self.mosaic.configure(**self._mosaic_settings())
        d.set("Backend_RBV", d.get("Backend"))
        self._show_preprocess(self._preprocess_from_pvs())

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        self.publisher.start()  # Phase/Amplitude posts on their own thread, off the inference loop
        self.batcher.start()
        self.mosaic.start()

    def stop(self, drain_s: float = STOP_DRAIN_S) -> None:
        """Stop the device, once (later calls return at once). ``serve`` runs it on SIGTERM/SIGINT
        while the loop and both servers still run, so its last readbacks and messages go out.

        The cut point, in this order:

        1. intake stops: the detector monitor closes, puts to ``Input`` (and ``Capture=1``) are
           refused from now on;
        2. the frames already queued are inferred for up to ``drain_s`` s (if a model serves); what
           is left then stays counted as Backlog, and is neither recorded nor stitched;
        3. the inference thread ends after its batch in hand, so every result published has
           reached the stitch stage's and the recorder's inboxes; a slow put still running (a
           Capture opening its file) gets up to :data:`STOP_PUTS_S` s to end;
        4. the record being captured is closed with the final mosaic (every result stitched so
           far) and its end time, and records closing after an earlier ``Capture=0`` finish;
        5. the position monitors and the stitch thread stop;
        6. a retrain still running is ended (SIGTERM, then SIGKILL after :data:`RETRAIN_STOP_S` s); it
           leaves the serving model as it was.

        The final account is logged: ``stopped: R received = P processed + D dropped +
        J rejected + B left in the queue``.
        """
        if self._stopped:
            return
        self._stopped = self._stopping = True
        t0 = time.monotonic()
        self.receiver.close()
        if self.batcher.model is not None:
            deadline = t0 + drain_s
            while self.queue.backlog and time.monotonic() < deadline:
                time.sleep(0.01)
        self.batcher.stop()
        self.batcher.join(timeout=5)
        self.publisher.stop()  # the images of the last results are posted
        with self._slow_lock:
            pending = list(self._slow_puts.values())
        wait_futures(pending, timeout=STOP_PUTS_S)
        if self.recorder is not None:
            rec, self.recorder = self.recorder, None
            self.publisher.remove_listener(rec.submit)
            self._finish_record(rec)
        for thread in self._closing:
            thread.join(timeout=5)
        self.table_monitor.close()
        for m in self.motor_monitors:
            m.close()
        self.mosaic.stop()
        self.mosaic.join(timeout=5)
        self._stop_retrain()
        c = self.counters.snapshot()
        text = (f"stopped: {c['received']} received = {c['processed']} processed + {self.queue.dropped} dropped + "
                f"{c['rejected']} rejected + {self.queue.backlog} left in the queue ({time.monotonic() - t0:.2f} s)")
        self.message(text)

    async def status_task(self, period: float = 0.1) -> None:
        """Copy counters, rates and latency into their PVs (the IOC's scan task)."""
        while True:
            self.update_status()
            await asyncio.sleep(period)

    def update_status(self) -> None:
        """Counters into their PVs (int32: saturated at 2**31 - 1, never wrapped), counter growth into
        rate-limited messages, the message history into MessageHistory_RBV."""
        # the stitch stage's counts first: a frame it counts was received and processed before, so the
        # counters read after it include it (read the other way round, one scan showed 128 stitched of 127)
        mosaic_counts = self.mosaic.status()
        d, c = self.device, self.counters.snapshot()
        dropped, backlog = self.queue.dropped, self.queue.backlog
        d.set_many({f"{name}_RBV": saturate(value) for name, value in (
            ("Received", c["received"]), ("Processed", c["processed"]), ("Rejected", c["rejected"]),
            ("NonFinite", c["nonfinite"]), ("Missed", c["missed"]), ("OutOfOrder", c["outoforder"]),
            ("Duplicates", c["duplicates"]), ("SourceRestarts", c["restarts"]), ("Dropped", dropped),
            ("Backlog", backlog))})
        self._report_growth(c, dropped)
        self._show_arrays()
        in_rate, out_rate = self.in_rate.rate(), self.out_rate.rate()
        d.set("QueueFree_RBV", saturate(max(0, self.queue.limit - backlog)))
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
        # a model that keeps giving NaN/inf raises the device status alarm too (see Batcher.on_health), and so
        # does one whose patches do not explain the frames (ConsistencyMonitor.on_alarm)
        d.set("Status_RBV", state, severity=max(d.db["Status_RBV"].severity_of(state), self.model_severity(),
                                                self.consistency.severity))
        self._show_consistency()
        d.set_many({name: saturate(value) for name, value in mosaic_counts.items()})
        rec = self.recorder
        written, rec_dropped = (rec.written, rec.dropped) if rec is not None else self._record_counts
        d.set("CaptureWritten_RBV", saturate(written))
        d.set("CaptureDropped_RBV", saturate(rec_dropped))
        if rec is not None:  # a closed record keeps showing its final count
            self._shown_recorder = rec
        shown = self._shown_recorder
        d.set("CaptureFlushed_RBV", saturate(shown.flushed if shown is not None else 0))
        since = self._monitor_since
        if since is not None and time.monotonic() - since > CONNECT_TIMEOUT_S:
            self._monitor_since = None
            if not d.get("InputConnected_RBV"):
                self.message(f"InputPV {self.receiver.channel} not connected after {CONNECT_TIMEOUT_S:.0f} s: "
                             "check the name and that the detector IOC is reachable", severity=1)
        d.publish_messages()

    def _report_growth(self, c: dict[str, int], dropped: int) -> None:
        """What grew since it was last told, as one routine message per counter and REPORT_PERIOD_S."""
        restart = next((g.last_restart for g in self._gaps.values() if g.last_restart), None)
        noid = next((g.last_noid for g in self._gaps.values() if g.last_noid is not None), None)
        policy, limit = self.queue.policy, self.queue.limit
        reports = (
            ("dropped", dropped, 1, lambda n, dt: f"{n} frame(s) dropped (BacklogPolicy {policy}, queue full at "
                                                  f"{limit}) in the last {dt:.1f} s"),
            ("missed", c["missed"], 1, lambda n, dt: f"{n} frame(s) missed upstream (uniqueId gaps) in the last "
                                                     f"{dt:.1f} s"),
            ("outoforder", c["outoforder"], 0, lambda n, dt: f"{n} frame(s) came out of order (uniqueId back by at "
                                                             f"most {REORDER_WINDOW}) in the last {dt:.1f} s"),
            ("duplicates", c["duplicates"], 1, lambda n, dt: f"{n} frame(s) with a uniqueId seen already in the "
                                                             f"last {dt:.1f} s"),
            ("restarts", c["restarts"], 0, lambda n, dt: f"source restarted {n} time(s) in the last {dt:.1f} s "
                                                         f"(last: uniqueId {restart[1] if restart else '?'} after "
                                                         f"{restart[0] if restart else '?'}); counting from there"),
            ("noid", c["noid"], 1, lambda n, dt: f"{n} frame(s) with uniqueId <= 0 (last: {noid}) in the last "
                                                 f"{dt:.1f} s: not a frame count, left out of Missed"),
        )
        for name, total, severity, say in reports:
            grew = self._growth.check(name, total)
            if grew:
                self.message(say(*grew), severity=severity, frames=grew[0] if name != "restarts" else 0,
                             routine=True)

    def message(self, text: str, severity: int = 0, frames: int = 0, routine: bool = False) -> None:
        """Log and show a status message (Message_RBV; every reason is kept in MessageHistory_RBV,
        see :meth:`DeviceState.message`)."""
        _log.info("%s", text)
        self.device.message(text, severity=severity, frames=frames, routine=routine)

    # -- intake -------------------------------------------------------------------
    def _intake(self, frame: ImageFrame, source: str) -> None:
        self.counters.add("received")
        self.in_rate.add()
        self._gaps[source].update(frame.unique_id)  # missed, out of order, duplicates, restarts
        self.queue.put(frame)

    def _intake_many(self, frames: Sequence[ImageFrame], source: str) -> None:
        """:meth:`_intake` of a batch: each counter and the rate once, the uniqueIds in order, the
        queue under one lock (the same drops)."""
        n = len(frames)
        if not n:
            return
        self.counters.add("received", n)
        self.in_rate.add(n)
        self._gaps[source].update_many([f.unique_id for f in frames])
        self.queue.put_many(frames)

    def _on_result(self, result: BatchResult) -> None:
        """A published batch into the areaDetector readbacks (ArrayCounter, UniqueId, the Phase's
        shape), kept here and posted by the status scan (:meth:`_show_arrays`): no PV post per batch
        on the inference thread."""
        phase = result.outputs.get("phase")
        with self._array_lock:
            self._array_counter = min(self._array_counter + len(result.frames), 2**31 - 1)
            if result.frames:
                self._array_uid = saturate(result.frames[-1].unique_id)
            if phase is not None and phase.ndim == 3:
                self._array_shape = (phase.shape[2], phase.shape[1])

    def _show_arrays(self) -> None:
        """ArrayCounter_RBV, UniqueId_RBV and ArraySize0/1_RBV, when they changed."""
        with self._array_lock:
            shown = (self._array_counter, self._array_uid, self._array_shape)
        if shown == self._arrays_shown:
            return
        self._arrays_shown = shown
        counter, uid, shape = shown
        values: dict[str, int] = {"ArrayCounter_RBV": counter}
        if uid is not None:
            values["UniqueId_RBV"] = uid
        if shape is not None:
            values |= {"ArraySize0_RBV": shape[0], "ArraySize1_RBV": shape[1]}
        self.device.set_many(values)

    def _on_stale(self, uid: int, rejoin: bool) -> None:
        """The channel's current value seen on (re)connecting: not a received frame. On joining, its
        uniqueId is the base and the frames before it are not counted as missed (see GapCounter.join:
        they were published before we watched, and a uniqueId does not say when the acquisition began);
        on rejoining after a disconnect, the frames published meanwhile are missed."""
        self._gaps["monitor"].join(uid, rejoin)
        if not rejoin and uid > 1:
            self.message(f"joined {self.receiver.channel} at uniqueId {uid}: that frame (its current value) and "
                         "any before it are not counted; Missed counts from it", routine=True)

    def _on_monitor_frame(self, frame: ImageFrame) -> None:
        self._intake(frame, "monitor")

    def _on_monitor_frames(self, frames: Sequence[ImageFrame]) -> None:
        self._intake_many(frames, "monitor")

    def _on_ring_dropped(self, uids: Sequence[int]) -> None:
        """Frames the receive process took but its full ring refused: received and dropped."""
        n = len(uids)
        self.counters.add("received", n)
        self.in_rate.add(n)
        self._gaps["monitor"].update_many(uids)
        self.queue.count_dropped(n)
        self.message(f"{n} frame(s) dropped: the receive process's ring was full (this process fell behind)",
                     severity=1, frames=n, routine=True)

    def _on_receive_restart(self, n: int, text: str) -> None:
        """The receive process died and was started again (the ``n``-th time): counted and told."""
        self.device.set("ReceiveRestarts_RBV", n)
        self.message(text, severity=2)

    def _on_bad_frame(self, reason: str) -> None:
        self.counters.add_many({"received": 1, "rejected": 1})
        self.message(f"rejected frame: {reason}", severity=1, frames=1)

    def _on_reject(self, n: int, reason: str) -> None:
        self.message(f"rejected {n} frame(s): {reason}", severity=1, frames=n)

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
            self._check_intake()
            self._intake(frame, "put")

        @d.on_bad_image("Input")
        def _input_undecodable(reason: str) -> None:
            """A put to Input that does not decode into a frame: a frame received and rejected (as a
            monitor update that does not decode is), so Received = Processed + Dropped + Rejected +
            Backlog holds and the reason is in Message_RBV; while disabled, a refused put instead."""
            self._check_intake()
            self._on_bad_frame(reason)

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

        @on("ArrayCounter")
        def _array_counter(value: int) -> None:
            with self._array_lock:
                self._array_counter = value
            self._show_arrays()

        @on("NDArrayAddress")  # areaDetector's input address: one input here, the value is only shown
        def _address(value: int) -> None:
            d.set("NDArrayAddress_RBV", value)

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
            if value and not value.strip():
                raise PutError("ModelPath: a path of spaces names no file; put an empty string to unload")
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

        mosaic_setting("PosAttrX", "attr_x")
        mosaic_setting("PosAttrY", "attr_y")
        mosaic_setting("PosScale", "scale")
        mosaic_setting("PositionTimeout", "timeout_s")
        mosaic_setting("PixelSize", "pixel_m")
        mosaic_setting("MosaicRate", "rate_hz")
        mosaic_setting("MosaicDisplaySize", "display_size")
        mosaic_setting("MosaicOffset", "offset", lambda v: d.db["MosaicOffset"].enum_strs[v])
        mosaic_setting("MosaicDomain", "domain", lambda v: d.db["MosaicDomain"].enum_strs[v])

        @on("MotorTolerance")
        def _tolerance(value: float) -> None:
            self.mosaic.motors.tolerance_s = value
            rec = self.recorder
            if rec is not None:
                rec.configure(motor_tolerance_s=value)
            d.set("MotorTolerance_RBV", value)

        @on("PositionSource")
        def _source(value: int) -> None:
            self.mosaic.configure(source=SOURCES[value])
            rec = self.recorder
            if rec is not None:  # the record keeps the position each frame is stitched at, from any source
                rec.configure(source=SOURCES[value])
            d.set("PositionSource_RBV", value)

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
        def _trajectory(value: str) -> Busy:
            value = value.strip()
            scale = d.get("PosScale")

            def read() -> str:
                traj = None
                if value:
                    try:
                        _open_once(value)
                        traj = load_trajectory(value, scale)  # the slow part: no lock held
                    except (OSError, ValueError, KeyError) as exc:
                        raise PutError(f"TrajectoryFile: {exc}") from None
                with d.handler_lock:
                    self.mosaic.configure(trajectory=traj)
                    self._trajectory = traj
                    if self.recorder is not None:
                        self.recorder.set_trajectory(traj)
                    if traj is not None:
                        self.message(f"trajectory of {len(traj)} points from {value}")
                    d.set("TrajectoryFile_RBV", value)
                return value

            return self._slow_put("TrajectoryFile", value, read)

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
            if self.recorder is not None or self._capture_opening:
                raise PutError("cannot change CaptureFile while capturing: put Capture=0 first")
            return value.strip()

        @on("CaptureFlushPeriod")
        def _flush_period(value: float) -> None:
            rec = self.recorder
            if rec is not None:  # the writer takes it from its next flush on
                rec.flush_period = float(value)
            d.set("CaptureFlushPeriod_RBV", value)

        d.set("CaptureFlushPeriod_RBV", d.get("CaptureFlushPeriod"))

        @on("Capture")
        def _capture(value: int) -> Busy | None:
            if value and self.recorder is None and not self._capture_opening:
                if self._stopping:
                    raise PutError("Capture: the IOC is stopping")
                path = d.get("CaptureFile").strip()
                if not path:
                    raise PutError("Capture: set CaptureFile first")
                self._capture_opening = True  # until the record's file exists (on a thread)
                rec_settings = {"frames": bool(d.get("CaptureFrames")), "attr_x": d.get("PosAttrX"),
                                "attr_y": d.get("PosAttrY"), "scale": d.get("PosScale"),
                                "flush_period": d.get("CaptureFlushPeriod"),
                                "source": SOURCES[d.get("PositionSource")], "trajectory": self._trajectory,
                                "motor_tolerance_s": d.get("MotorTolerance")}
                return self._slow_put("Capture", value, lambda: self._open_record(path, rec_settings))
            if not value and self._capture_opening:  # close it once it is open
                return self._slow_put("Capture", value, self._close_record)
            if not value:
                self._close_record()
            return None

        @on("MosaicReset")
        def _mosaic_reset(value: int) -> int:
            if value:
                self.mosaic.reset()
                self.message("mosaic cleared")
            return 0

        for name in PRE_PVS:
            on(name)(self._make_pre_handler(name))

        # -- retrain (a background process on the last capture) --
        @on("RetrainStart")
        def _retrain_start(value: int) -> Busy | int:
            if not value:
                return 0
            return self._start_retrain()

        @on("RetrainBudget")
        def _retrain_budget(value: float) -> None:
            d.set("RetrainBudget_RBV", value)

        @on("RetrainSwap")
        def _retrain_swap(value: int) -> None:
            d.set("RetrainSwap_RBV", value)

        # -- physics consistency --
        @on("ConsistencyShare")
        def _consistency_share(value: float) -> None:
            d.set("ConsistencyShare_RBV", self.consistency.set_share(value))

        @on("ConsistencyLimit")
        def _consistency_limit(value: float) -> None:
            self.consistency.set_limit(value, d.get("ConsistencyFrames_RBV"))
            d.set("ConsistencyLimit_RBV", value)

        @on("ConsistencyFrames")
        def _consistency_frames(value: int) -> None:
            self.consistency.set_limit(d.get("ConsistencyLimit_RBV"), value)
            d.set("ConsistencyFrames_RBV", value)

        @on("ProbeFile")
        def _probe_file(value: str) -> Busy | str:
            value = value.strip()
            if value == d.get("ProbeFile_RBV"):
                return value
            return self._slow_put("ProbeFile", value, lambda: self._apply_probe_file(value))

    def _apply_probe_file(self, path: str) -> str:
        """ProbeFile's slow part (a worker thread): read the probe and check it against the serving model
        (its own probe's size, else the streaming frames' object window); refused, the previous probe stays."""
        frame = self.batcher.streaming_frame()
        try:
            used = self.consistency.set_probe_file(path, None if frame is None else frame.shape,
                                                   int(self.device.get("PreBin_RBV")))
        except ProbeError as exc:
            raise PutError(f"ProbeFile: {exc}; the previous probe stays ({self.consistency.source()})") from None
        self.device.set("ProbeFile_RBV", path)
        self.message(f"ProbeFile {path}: consistency figure from {used}" if path else
                     f"ProbeFile unloaded: consistency figure from {used}")
        return path

    def _show_consistency(self) -> None:
        """The consistency figures and state into their readbacks (the status task)."""
        d, mon = self.device, self.consistency
        median, p90 = mon.figures()
        for name, value in (("Consistency_RBV", median), ("ConsistencyP90_RBV", p90)):
            if not (math.isnan(value) and math.isnan(d.get(name))):  # NaN: no figure (NaN != NaN)
                d.set(name, value)
        d.set("ConsistencySampled_RBV", saturate(mon.sampled))
        d.set("ConsistencyStatus_RBV", mon.state())
        d.set("ConsistencyInfo_RBV", mon.source())

    def _on_consistency_alarm(self, severity: int, text: str) -> None:
        """The serving model stopped explaining the frames, or explains them again (the inference thread)."""
        if text:
            self.message(text, severity=severity)

    def _finish_record(self, rec: Recorder) -> None:
        """Close a record with the final mosaic (off the put path)."""
        try:
            mosaic = self.mosaic.snapshot()
        except Exception as exc:  # the record still closes
            mosaic = None
            self.message(f"record: no final mosaic ({exc})", severity=1)
        rec.close(mosaic)
        self._record_counts = (rec.written, rec.dropped)
        if not rec.error:  # first: a client that waits on Capture_RBV == 0 then finds why
            self.message(f"record {rec.path} closed: {rec.written} frames, {rec.dropped} dropped")
        self.device.set("Capture_RBV", 0)

    def _open_record(self, path: str, settings: dict[str, Any]) -> int:
        """Capture=1's slow part (a worker thread): create the record's file with no lock held, then
        start recording. Refused (PutError) when the file cannot be written or a setting is invalid."""
        try:
            try:
                _open_once(path, "ab")
                rec = Recorder(path, on_error=lambda text: self.message(text, severity=2), **settings)
            except (OSError, ValueError) as exc:
                raise PutError(f"Capture: cannot write {path}: {exc}") from None
            with self.device.handler_lock:
                if self._stopping:  # stop() began meanwhile and will not see this record: close it here
                    rec.close()
                    raise PutError("Capture: the IOC is stopping")
                self.recorder = rec
                rec.flush_period = float(self.device.get("CaptureFlushPeriod"))  # if put while the file opened
                rec.configure(source=SOURCES[self.device.get("PositionSource")],  # if put while the file opened
                              motor_tolerance_s=self.device.get("MotorTolerance"))
                rec.set_trajectory(self._trajectory)
                with self._positions_lock:  # what the position sources said before the record began
                    if self._table_seen:
                        uids = np.fromiter(self._table_seen, np.int64, len(self._table_seen))
                        yx = np.array(list(self._table_seen.values()), np.float64)
                        rec.add_positions(uids, yx[:, 0], yx[:, 1])
                    for axis, seen in enumerate(self._motor_seen):
                        if seen is not None:
                            rec.add_motor(axis, *seen)
                self.publisher.add_listener(rec.submit)
                # this record's counts from now on, not the last record's until the next status scan
                self._shown_recorder = rec
                self.device.set_many({"CaptureWritten_RBV": 0, "CaptureDropped_RBV": 0, "CaptureFlushed_RBV": 0})
                self.device.set("CaptureFile_RBV", path)
                self.device.set("CaptureFlushPeriod_RBV", rec.flush_period)
                self.message(f"recording to {path}")  # before Capture_RBV, as for the close
                self.device.set("Capture_RBV", 1)
        finally:
            self._capture_opening = False
        return 1

    def _close_record(self) -> None:
        """Capture=0: stop feeding the record and close it on a thread (its end and mosaic follow)."""
        with self.device.handler_lock:
            rec, self.recorder = self.recorder, None
            if rec is None:
                return
            self.publisher.remove_listener(rec.submit)
            thread = threading.Thread(target=self._finish_record, args=(rec,), name="ptychostream-record-close",
                                      daemon=True)
            self._closing = [t for t in self._closing if t.is_alive()] + [thread]
        thread.start()

    def _check_intake(self) -> None:
        """Refuse a put to Input while disabled or stopping (a refused put, not a frame)."""
        if self._stopping:
            raise PutError("the IOC is stopping: no more frames")
        if not self._enabled:
            raise PutError("reconstructor is disabled: put Enable=1 first")

    def _slow_put(self, name: str, value: Any, work: Callable[[], Any]) -> Busy:
        """Complete a put to ``name`` later: ``work()`` (a file read, then applying it) runs on a thread
        with no lock held, after the earlier slow puts to ``name``. It returns the setpoint (None:
        ``value``) or raises PutError, which refuses the put. The client's put (CA put-callback, PVA
        put) completes then, the setpoint is stored only then; CA and the status task never wait."""
        done: Future = Future()
        with self._slow_lock:
            before = self._slow_puts.get(name)
            self._slow_puts[name] = done

        def run() -> None:
            if before is not None:
                wait_futures([before])
            try:
                done.set_result(work())
            except PutError as exc:
                done.set_exception(exc)
            except Exception as exc:  # still the put's answer, not a dead thread
                _log.exception("put to %s failed", name)
                done.set_exception(PutError(f"{name}: {exc}"))

        threading.Thread(target=run, name=f"ptychostream-put-{name}", daemon=True).start()
        return Busy(value, done, setpoint_later=True)

    def _mosaic_settings(self) -> dict[str, Any]:
        d = self.device
        return {"source": SOURCES[d.get("PositionSource")], "attr_x": d.get("PosAttrX"),
                "attr_y": d.get("PosAttrY"), "scale": d.get("PosScale"), "pixel_m": d.get("PixelSize"),
                "rate_hz": d.get("MosaicRate"), "display_size": d.get("MosaicDisplaySize"),
                "timeout_s": d.get("PositionTimeout"),
                "offset": d.db["MosaicOffset"].enum_strs[d.get("MosaicOffset")],
                "domain": d.db["MosaicDomain"].enum_strs[d.get("MosaicDomain")]}

    def _on_table(self, value) -> None:
        uids, x, y = value
        self.mosaic.add_positions(uids, y, x)
        with self._positions_lock:
            rec = self.recorder
            if rec is not None:
                rec.add_positions(uids, y, x)
            seen = self._table_seen
            for u, yv, xv in zip(np.asarray(uids).reshape(-1).tolist(), np.asarray(y).reshape(-1).tolist(),
                                 np.asarray(x).reshape(-1).tolist()):
                seen[int(u)] = (float(yv), float(xv))
                seen.move_to_end(int(u))
            while len(seen) > TABLE_KEEP:
                seen.popitem(last=False)

    def _motor_cb(self, axis: int):
        def cb(value) -> None:
            v, t = value
            self.mosaic.add_motor(axis, t, v)
            with self._positions_lock:
                self._motor_seen[axis] = (float(t), float(v))
                rec = self.recorder
                if rec is not None:
                    rec.add_motor(axis, t, v)
        return cb

    # -- retrain ------------------------------------------------------------------------
    def _refuse_retrain(self, text: str, state: int | None = RETRAIN_REFUSED) -> None:
        """Refuse RetrainStart (counted in RefusedPuts_RBV, said in Message_RBV and RetrainMessage_RBV)."""
        if state is not None:
            self.device.set("RetrainState_RBV", state)
            self.device.set("RetrainMessage_RBV", text)
        raise PutError(f"RetrainStart: {text}")

    def _start_retrain(self) -> Busy:
        """RetrainStart=1 (under the handler lock): spawn the retrain on the last capture; the put completes
        when the process has ended (busy, as areaDetector's Acquire). Refused while one runs, while capturing,
        when there is no capture file, and while stopping."""
        d = self.device
        if self._stopping:
            self._refuse_retrain("the IOC is stopping", state=None)
        if self._retrain is not None:
            self._refuse_retrain(f"a retrain is already running (pid {self._retrain.pid}); wait for "
                                 "RetrainState_RBV", state=None)
        path = str(d.get("CaptureFile_RBV")).strip()
        if not path:
            self._refuse_retrain("no capture to retrain on: record a scan first (CaptureFile, CaptureFrames=Yes, "
                                 "Capture=1, then Capture=0)")
        if self.recorder is not None or self._capture_opening:
            self._refuse_retrain(f"still capturing to {path}: put Capture=0 first")
        if not Path(path).is_file():
            self._refuse_retrain(f"the last capture file {path} is not there")
        work = Path(tempfile.mkdtemp(prefix="ptychostream-retrain-"))
        status, log_path = work / "status.json", work / "adapt.log"
        budget, swap = float(d.get("RetrainBudget")), bool(d.get("RetrainSwap"))
        cmd = [*adapt_command(), path, "--status-file", str(status), "--budget-min", f"{budget:g}"]
        if self.prefix:
            cmd += ["--ioc", self.prefix]
        if not swap:
            cmd.append("--no-swap")
        try:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # its own group: ended with its children
        except OSError as exc:
            self._refuse_retrain(f"cannot start {shlex.join(cmd[:4])}: {exc}", state=RETRAIN_FAILED)
        self._retrain = proc
        d.set_many({"RetrainState_RBV": RETRAIN_RUNNING, "RetrainProgress_RBV": 0.0, "RetrainResult_RBV": "",
                     "RetrainMessage_RBV": f"started on {path}"})
        self.message(f"retrain started on {path} (pid {proc.pid}, budget {budget:g} min, log {log_path})")
        done: Future = Future()
        watch = threading.Thread(target=self._watch_retrain, args=(proc, status, log_path, swap, done),
                                 name="ptychostream-retrain", daemon=True)
        self._retrain_watch = watch
        watch.start()
        return Busy(1, done)

    def _watch_retrain(self, proc: subprocess.Popen, status: Path, log_path: Path, swap: bool, done: Future) -> None:
        """Follow a retrain (a thread): its status file into the Retrain PVs until it ends, then its verdict."""
        d = self.device
        last: dict[str, Any] = {}
        try:
            while True:
                rc = proc.poll()
                now = _read_status(status)
                if now is not None and now != last:
                    last = now
                    d.set("RetrainProgress_RBV", round(100.0 * _progress(now), 1))
                    d.set("RetrainMessage_RBV", _status_text(now))
                if rc is not None:
                    break
                time.sleep(RETRAIN_POLL_S)
            final = _read_status(status) or last
            got = final.get("result")
            result: dict[str, Any] = got if isinstance(got, dict) else {}
            if rc == 0 and final.get("done") and final.get("ok"):
                d.set("RetrainProgress_RBV", 100.0)
                d.set("RetrainResult_RBV", _result_text(result))
                d.set("RetrainMessage_RBV", _status_text(final) or "done")
                self.message(f"retrain done: {_result_text(result)}")
                d.set("RetrainState_RBV", RETRAIN_DONE)
                self._swap_retrained(result, swap)
            else:
                if self._stopping:
                    why = "ended with the IOC; the serving model is unchanged"
                elif final.get("done") and final.get("message"):
                    why = str(final["message"])
                else:
                    tail = _log_tail(log_path)
                    why = (f"the retrain process exited with code {rc} before it finished"
                           + (f": {tail}" if tail else ""))
                if result:
                    d.set("RetrainResult_RBV", _result_text(result))
                d.set("RetrainMessage_RBV", why)
                self.message(f"retrain failed: {why} (log {log_path})", severity=2)
                d.set("RetrainState_RBV", RETRAIN_FAILED)
        except Exception as exc:  # the verdict must come, whatever the file held
            _log.exception("retrain watch failed")
            d.set("RetrainMessage_RBV", f"retrain watch failed: {exc}")
            d.set("RetrainState_RBV", RETRAIN_FAILED)
        finally:
            with d.handler_lock:
                if self._retrain is proc:
                    self._retrain = None
            d.set("RetrainStart", 0)
            done.set_result(0)

    def _swap_retrained(self, result: dict[str, Any], swap: bool) -> None:
        """Without a prefix the retrain could not reach this IOC: load its model here if it was better."""
        model = result.get("model")
        if self.prefix or not swap or result.get("swapped") or not result.get("better") or not model:
            return
        self.message(f"retrain: serving the better model {model}")
        self.device.set("ModelPath", str(model))
        self._load(str(model), self.device.get("Backend"))

    def _stop_retrain(self) -> None:
        """End a running retrain and its children (SIGTERM, SIGKILL after RETRAIN_STOP_S); wait for its verdict."""
        proc, watch = self._retrain, self._retrain_watch
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # the group of the process this device started, and nothing else
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=RETRAIN_STOP_S)
                break
            except subprocess.TimeoutExpired:
                continue
        if watch is not None:
            watch.join(timeout=2 * RETRAIN_POLL_S + 1.0)

    # -- pre-processing -----------------------------------------------------------
    def _preprocess_from_pvs(self, override: dict[str, Any] | None = None) -> Preprocess:
        v = {n: self.device.get(n) for n in PRE_PVS}
        # the files in use are this device's (a slow put stores its setpoint only after applying it)
        v.update({"PreDarkPath": self._dark_path, "PreMaskPath": self._mask_path}, **(override or {}))
        if v["PreDarkPath"] != self._dark_path:
            self._dark = _load_dark(v["PreDarkPath"]) if v["PreDarkPath"] else None
            self._dark_path = v["PreDarkPath"]
        if v["PreMaskPath"] != self._mask_path:
            self._mask = load_mask(v["PreMaskPath"]) if v["PreMaskPath"] else None
            self._mask_path = v["PreMaskPath"]
        cx, cy = v["PreCropX"], v["PreCropY"]
        self._crop_xy = (cx, cy)  # the centre applies once both are set
        pre = Preprocess(
            fftshift=bool(v["PreFFTShift"]),
            flip_y=bool(v["PreFlipY"]),
            flip_x=bool(v["PreFlipX"]),
            transpose=bool(v["PreTranspose"]),
            crop_size=v["PreCropSize"] or None,
            crop_center=None if cx < 0 or cy < 0 else (cy, cx),
            bin=v["PreBin"],
            dark=self._dark,
            dark_path=self._dark_path or None,
            mask=self._mask,
            mask_path=self._mask_path or None,
            threshold=v["PreThreshold"],
            scale=SCALES[v["PreScale"]],
            normalise=NORMS[v["PreNormalise"]],
            norm_value=v["PreNormValue"],
        )
        pre.validate()
        return pre

    def _preprocess_for(self, model_pre: Preprocess) -> tuple[Preprocess, dict[str, tuple[Any, Any]]]:
        """The settings a model swap serves with: this device's instrument settings (from the PVs) with
        the model's own (crop size, bin, scale, normalisation); and the model's instrument settings that
        differ from the device's, which are not applied (see :meth:`Preprocess.for_model`)."""
        with self.device.handler_lock:
            return self._preprocess_from_pvs().for_model(model_pre)

    def _make_pre_handler(self, name: str):
        def handler(value: Any) -> Any:
            if name in FILE_PRE_PVS and value != self._file_setting(name)[1]:  # a file to read: on a thread
                return self._slow_put(name, value, lambda: self._apply_file(name, value))
            try:
                pre = self._preprocess_from_pvs({name: value})
            except (ValueError, OSError, KeyError) as exc:
                raise PutError(f"{name}: {exc}") from None
            self.batcher.set_preprocess(pre)
            self._show_preprocess(pre, setpoints=False)
            return value
        return handler

    def _file_setting(self, name: str) -> tuple[np.ndarray | None, str]:
        """The array and the path of a file setting (PreDarkPath, PreMaskPath) now in use."""
        return (self._dark, self._dark_path) if name == "PreDarkPath" else (self._mask, self._mask_path)

    def _set_file_setting(self, name: str, arr: np.ndarray | None, path: str) -> None:
        if name == "PreDarkPath":
            self._dark, self._dark_path = arr, path
        else:
            self._mask, self._mask_path = arr, path

    def _apply_file(self, name: str, path: str) -> str:
        """A file setting's slow part (a worker thread): read the dark frame or the bad-pixel mask with no
        lock held, then use it. A mask whose shape is not the streaming frames' is refused at once (with
        no stream it is checked at the first frame: frames that do not fit are rejected and counted)."""
        try:
            if path:
                _open_once(path)
            arr = (_load_dark(path) if name == "PreDarkPath" else load_mask(path)) if path else None
        except (ValueError, OSError, KeyError) as exc:
            raise PutError(f"{name}: {exc}") from None
        if name == "PreMaskPath" and arr is not None:
            frame = self.batcher.streaming_frame()
            if frame is not None and frame.shape != arr.shape:
                raise PutError(f"PreMaskPath: the mask {path} is {arr.shape[0]}x{arr.shape[1]} but the frames "
                               f"streaming are {frame.shape[0]}x{frame.shape[1]}: expected the raw detector "
                               "frame's shape")
        with self.device.handler_lock:
            old = self._file_setting(name)
            self._set_file_setting(name, arr, path)
            try:
                pre = self._preprocess_from_pvs({name: path})  # the file is read: no second read
            except (ValueError, OSError, KeyError) as exc:
                self._set_file_setting(name, *old)
                raise PutError(f"{name}: {exc}") from None
            self.batcher.set_preprocess(pre)
            self._show_preprocess(pre, setpoints=False)
        if name == "PreMaskPath":
            self.message(f"bad-pixel mask {path}: {int(arr.sum())} pixel(s) zeroed" if arr is not None
                         else "bad-pixel mask unloaded")
        return path

    def _show_preprocess(self, pre: Preprocess, setpoints: bool = True) -> None:
        """Write a Preprocess into the Pre*_RBV PVs (and the setpoints after a model load: the model
        settings change there, the instrument settings were the device's already)."""
        cy, cx = pre.crop_center if pre.crop_center else self._crop_xy[::-1]
        values = {
            "PreFFTShift": int(pre.fftshift), "PreFlipY": int(pre.flip_y), "PreFlipX": int(pre.flip_x),
            "PreTranspose": int(pre.transpose), "PreCropSize": pre.crop_size or 0,
            "PreCropX": cx, "PreCropY": cy, "PreBin": pre.bin, "PreThreshold": pre.threshold,
            "PreScale": SCALES.index(pre.scale), "PreNormalise": NORMS.index(pre.normalise),
            "PreNormValue": pre.norm_value, "PreDarkPath": self._dark_path, "PreMaskPath": self._mask_path,
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
        self._set_model_status(MODEL_LOADING)
        self.message(f"loading {path}" if path else "unloading model")
        threading.Thread(target=self._load_worker, args=(seq, path, backend),
                         name="ptychostream-load", daemon=True).start()

    def _load_worker(self, seq: int, path: str, backend: int) -> None:
        from ptychostream.model.backends import BACKEND_CHOICES
        from ptychostream.model.infer import open_model

        d = self.device
        if not path:
            self.batcher.swap(None, self.batcher.preprocess or self._preprocess_from_pvs())
            self.consistency.set_model(None)
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
        try:
            pre, ignored = self._preprocess_for(info.preprocess)
        except ValueError as exc:  # the model's crop/bin do not go with this device's crop centre, say
            model.close()
            self._model_error = self.batcher.model is None
            keep = "; the previous model keeps serving" if self.batcher.model is not None else ""
            self._finish_load(seq, MODEL_ERROR if self._model_error else MODEL_READY,
                              f"model {path} refused: its pre-processing does not go with this device's: {exc}{keep}",
                              severity=2)
            return
        if not self._fits_stream(seq, path, model, pre):
            return
        note = self.consistency.set_model(info)  # the model's probe, before it serves
        if note:
            self.message(note, severity=1)
        with self.device.handler_lock:  # a Pre* put meanwhile is in the settings taken, not lost
            pre, ignored = self._preprocess_for(info.preprocess)
            taken = self.batcher.swap(model, pre)
            self._show_preprocess(pre)
        if ignored:
            said = "; ".join(f"{name} {_fmt_setting(theirs)} ({INSTRUMENT_PVS[name]} stays {_fmt_setting(mine)})"
                             for name, (mine, theirs) in ignored.items())
            self.message(f"model {info.name}: its instrument pre-processing is not applied, the device's is kept: "
                         f"{said}; put the PVs to change them", severity=1)
        if not taken.wait(timeout=30):
            self.message("the inference loop did not take the new model within 30 s", severity=2)
        self._model_error = False
        self._apply_stitch_hint(info.metadata.get("ptychostream.stitch"))
        d.set("ModelPath_RBV", path)
        d.set("ModelInfo_RBV", info.summary())
        d.set("Backend_RBV", BACKEND_CHOICES.index(model.backend.name))
        fallback = getattr(model, "fallback_reasons", None) or []
        note = f" (fallback: {'; '.join(fallback)})" if fallback else ""
        self._finish_load(seq, MODEL_READY,
                          f"model ready in {time.monotonic() - t0:.2f} s on {model.backend.name}{note}")

    def _apply_stitch_hint(self, hint: str | None) -> None:
        """A model may say how its patches stitch best (``ptychostream.stitch``: {"offset": ..., "domain":
        ...}); a model without a domain in its hint stitches in the phase domain."""
        import json

        try:
            parsed = json.loads(hint) if hint else None
            wanted = {"offset": parsed.get("offset"), "domain": parsed.get("domain", "phase")} if parsed else {}
        except (ValueError, AttributeError):
            wanted = {}
        changes = {}
        for pv, key in (("MosaicOffset", "offset"), ("MosaicDomain", "domain")):
            choices = self.device.db[pv].enum_strs
            value = wanted.get(key)
            if value in choices:
                if choices.index(value) != self.device.get(pv):
                    self.message(f"{pv} {value}: the model's stitch hint")
                self.device.set(pv, choices.index(value))
                self.device.set(f"{pv}_RBV", choices.index(value))
                changes[key] = value
        if changes:
            self.mosaic.configure(**changes)

    def _finish_load(self, seq: int, status: int, text: str, severity: int = 0) -> None:
        with self._load_lock:
            if seq != self._load_seq:
                return
        self.message(text, severity=severity)  # first, so a client that sees the status finds why
        self._set_model_status(status)

    def _fits_stream(self, seq: int, path: str, model: Model, pre: Preprocess) -> bool:
        """Check a candidate against a real frame of the stream now flowing; refuse it (closed, the
        serving model kept) unless that frame's shape fits it with ``pre`` and its outputs are finite."""
        frame = self.batcher.streaming_frame()
        if frame is None:  # nothing streams: the self-test is all there is to go on
            return True
        try:
            model.check_frames(frame, pre)
        except ModelError as exc:
            model.close()
            serving = self.batcher.model is not None
            self._model_error = not serving
            keep = "; the previous model keeps serving" if serving else ""
            self._finish_load(seq, MODEL_READY if serving else MODEL_ERROR,
                              f"model {path} refused: {exc}{keep}", severity=2)
            return False
        return True

    def model_severity(self) -> int:
        """The serving model's output alarm (0, 1 MINOR, 2 MAJOR: see ``OutputHealth``), for Status_RBV."""
        return self.batcher.health.severity

    def _set_model_status(self, status: int | None = None) -> None:
        """ModelStatus_RBV (None: the current state) with the alarm of its state (db/) or of the
        serving model's outputs, whichever is worse."""
        with self._model_status_lock:  # the load thread and the inference thread both write it
            if status is None:
                status = int(self.device.get("ModelStatus_RBV"))
            spec = self.device.db["ModelStatus_RBV"]
            self.device.set("ModelStatus_RBV", status, severity=max(spec.severity_of(status), self.model_severity()))

    def _on_model_health(self, severity: int, text: str) -> None:
        """The serving model's outputs turned NaN/inf, or finite again (the inference thread)."""
        if text:
            self.message(text, severity=severity)
        self._set_model_status()


def adapt_command() -> list[str]:
    """The retrain command, before its arguments: ``$PTYCHOSTREAM_ADAPT_CMD`` (split like a shell line), else
    ``python -m ptychostream adapt`` with this interpreter (serving code never imports the training)."""
    text = os.environ.get(ADAPT_CMD_ENV, "").strip()
    return shlex.split(text) if text else [sys.executable, "-m", "ptychostream", "adapt"]


def _read_status(path: Path) -> dict[str, Any] | None:
    """The retrain's status file ({"stage", "progress", "message", "done", "ok", "result"}), or None if not
    there (yet) or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _progress(status: dict[str, Any]) -> float:
    try:
        p = float(status.get("progress", 0.0))
    except (TypeError, ValueError):
        return 0.0
    return min(1.0, max(0.0, p)) if math.isfinite(p) else 0.0


def _status_text(status: dict[str, Any]) -> str:
    stage, text = str(status.get("stage") or ""), str(status.get("message") or "")
    return f"{stage}: {text}" if stage and text else stage or text


def _result_text(result: dict[str, Any]) -> str:
    """The result for RetrainResult_RBV: adapt's verdict (``model``, ``better``, ``swapped``, ``reason``), or
    a ``summary``, else the result's scalar entries."""
    if result.get("summary"):
        return str(result["summary"])
    if "model" in result and "better" in result:
        return (f"{result['model']}: {'better' if result['better'] else 'not better'}, "
                f"{'swapped in' if result.get('swapped') else 'not swapped'}"
                + (f"; {result['reason']}" if result.get("reason") else ""))
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(result.items())
                     if isinstance(v, (str, int, float, bool)) or v is None)


def _log_tail(path: Path, chars: int = 300) -> str:
    """The end of a retrain's output, on one line."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - chars))
            return " ".join(fh.read().decode("utf-8", "replace").split())
    except OSError:
        return ""


def _fmt_setting(value: Any) -> str:
    """A pre-processing value as an operator reads it (Yes/No, a path or "none")."""
    if isinstance(value, (bool, np.bool_)):
        return "Yes" if value else "No"
    if value is None or value == "":
        return "none"
    return str(value)


def _open_once(path: str, mode: str = "rb") -> None:
    """Open and close ``path`` with Python's open(), which lets go of the GIL while the disk answers.

    h5py holds the GIL in every HDF5 call, so a first open through h5py (a record, an HDF5
    trajectory or dark) on a stalled disk would stall every thread of the IOC: CA, the status
    task, inference. Waiting here first moves that wait off the GIL. Errors are the reader's to
    report; mode "ab" creates a record's file (its writer then replaces it).
    """
    try:
        with open(path, mode):
            pass
    except OSError:
        pass


def load_mask(path: str) -> np.ndarray:
    """A bad-pixel mask (H, W) bool, True where the pixel is bad (non-zero in the file), in the raw
    detector frame's coordinates.

    ``.npy``; ``.npz`` (``file.npz::key``, else the first of :data:`MASK_NAMES`, else its only array);
    HDF5 (``file.h5::/dataset``, else a dataset named one of :data:`MASK_NAMES`, else its only 2-D
    dataset). One 2-D frame, or (1, H, W); boolean or numeric and finite. Raises FileNotFoundError,
    or :class:`FileFormatError` naming the file, the dataset or key and what was expected.
    """
    file, key = split_dataset_path(path, None, "bad-pixel mask")
    suffix = file.suffix.lower()
    where = str(file)
    if suffix == ".npy":
        try:
            arr = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FileFormatError(f"{file}: cannot read as NPY ({exc}); expected a 2-D bad-pixel mask") from None
    elif suffix == ".npz":
        with open_npz(file) as z:
            names = list(z.files)
            key = key or next((k for k in MASK_NAMES if k in names), names[0] if len(names) == 1 else None)
            if key not in names:
                raise FileFormatError(f"{file}: no mask array {key!r}" if key else
                                      f"{file}: which array is the mask? keys present: {', '.join(names) or 'none'}; "
                                      f"expected one of {', '.join(MASK_NAMES)} (or name it: {file}::KEY)")
            arr = np.asarray(z[key])
        where = f"{file}:{key}"
    elif is_hdf5(file):
        import h5py

        with h5py.File(file, "r") as h5:
            name = key or next((n for n in (find_dataset(h5, m) for m in MASK_NAMES) if n), None)
            if name is None:
                two_d = [n for n in dataset_names(h5) if h5[n].ndim == 2]
                name = two_d[0] if len(two_d) == 1 else None
            if name is None:
                raise FileFormatError(f"{file}: which dataset is the mask? datasets present: "
                                      f"{', '.join(dataset_names(h5)) or 'none'}; expected one of "
                                      f"{', '.join(MASK_NAMES)} (or name it: {file}::/DATASET)")
            arr = np.asarray(h5_dataset(h5, name, file)[()])
        where = f"{file}:{name}"
    else:
        raise FileFormatError(f"{file}: a bad-pixel mask is read from .npy, .npz or HDF5 (file.h5::/dataset)")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.dtype.kind not in "biuf":
        raise FileFormatError(f"{where}: the bad-pixel mask must be one 2-D boolean or numeric frame (non-zero = "
                              f"bad), the raw detector frame's shape; got {arr.dtype} {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise FileFormatError(f"{where}: the bad-pixel mask holds NaN or infinite values; expected 0 or 1")
    return np.asarray(arr != 0)


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
