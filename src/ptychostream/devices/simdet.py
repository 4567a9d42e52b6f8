"""The simulated ptychography detector IOC (areaDetector-like: cam1 + Pva1:Image).

Frames are computed ahead into a cache (probe × object patch → |FFT|² → Poisson), so
publishing is limited by PVA, not by the FFT. Positions go out three ways: NDAttributes
on each frame, scalar motor readbacks, and chunked (uniqueId, x, y) tables.

``ReplayFile`` replays any scan file :func:`ptychostream.files.scan.read_scan` reads (NPZ, CXI,
HDF5, our record) instead: the frames as stored, each with its own position as NDAttributes
(``PosAttrX``/``PosAttrY``, metres), so the reconstructor positions every frame by the frame
itself, whatever ``ArrayCounter`` is, with no position file.  File puts (``ReplayFile``,
``ObjectFile``, ``ProbeFile``) read the file on a thread, outside the handler lock, and complete
when it has loaded (or are refused with the reader's message).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import numpy as np

from ptychostream import __version__
from ptychostream.core.device import Busy, DeviceState, PutError
from ptychostream.core.frames import ImageFrame
from ptychostream.core.pvdb import load_db
from ptychostream.core.stats import RateMeter

__all__ = ["SimDetector", "run_simdet"]

_log = logging.getLogger(__name__)

IDLE, ACQUIRE, ERROR, INITIALIZING, ABORTED = 0, 1, 6, 8, 10
SINGLE, MULTIPLE, CONTINUOUS = 0, 1, 2
DATA_TYPES = ("uint8", "int16", "uint16", "uint32", "float32")
OBJECTS = ("etched", "siemens", "digits", "dead_leaves", "blurred_noise", "procedural", "file", "circuit")
PROBES = ("zoneplate", "gaussian", "file")
PATTERNS = ("spiral", "raster", "jitter")
#: frames kept in the pre-computed cache (the scan loops over them)
CACHE_BYTES = 1 << 30
#: true patches stored in the ground-truth file (the object, probe and positions are always there)
TRUTH_PATCHES = 256
#: scalar motor readbacks are posted at most this often
MOTOR_RATE_HZ = 100.0

#: setpoints that configure the scan; refused while acquiring
CONFIG = ("cam1:Size", "cam1:Bin", "cam1:DataType", "cam1:Photons", "cam1:Beamstop", "cam1:HotPixels",
          "cam1:Energy", "cam1:Distance", "cam1:DetPixel", "cam1:Object", "cam1:ObjectFile", "cam1:Probe",
          "cam1:ProbeFile", "cam1:Seed", "cam1:ScanPattern", "cam1:ScanStep", "cam1:ScanPoints",
          "cam1:ReplayFile", "cam1:PosAttrX", "cam1:PosAttrY", "cam1:PosChunk", "cam1:PosDelay",
          "cam1:ImageMode", "cam1:NumImages", "cam1:AcquirePeriod", "cam1:AcquireTime", "cam1:TruthFile")


@dataclass
class FrameSource:
    """Pre-computed frames and their positions (metres, (y, x))."""

    frames: np.ndarray
    positions: np.ndarray | None
    simulator: Any = None
    description: str = ""


class SimDetector:
    """Device logic of the simulated detector, protocol-free like the reconstructor."""

    def __init__(self) -> None:
        self.device = DeviceState(load_db("simdetector.db"), message_pv="cam1:StatusMessage_RBV",
                                  refused_pv="cam1:RefusedPuts_RBV")
        self.rate = RateMeter()
        self._source: FrameSource | None = None
        self._source_key: tuple | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._acquiring = False
        self._done: Future | None = None
        self._counter = 0
        self._image_counter = 0
        #: the last replay file read: (path, mtime_ns, size, geometry) and its frames
        self._replay: tuple[tuple[Any, ...], FrameSource] | None = None
        self._replay_lock = threading.Lock()
        #: the newest file put of each file setpoint, which the next one waits for
        self._file_puts: dict[str, Future] = {}
        self._register()
        self.device.set("cam1:DriverVersion_RBV", __version__)
        for name in CONFIG:
            self._echo(name, self.device.get(name))
        self._update_geometry()

    def _echo(self, name: str, value: Any) -> None:
        """Setpoints the device applies as given: their readback shows the value in use."""
        rbv = self.device.db[name].readback
        if rbv and name not in ("cam1:Size", "cam1:TruthFile"):
            self.device.set(rbv, value)

    # -- handlers -------------------------------------------------------------------
    def _register(self) -> None:
        d = self.device
        for name in CONFIG:
            d.on_put(name)(self._config_handler(name))

        @d.on_put("cam1:Acquire")
        def _acquire(value: int):
            if value == 0:
                self._stop.set()
                return None
            if self._acquiring:
                return Busy(1, self._done) if self._done is not None else None
            self._done = Future()
            self._stop.clear()
            self._acquiring = True
            d.set("cam1:Acquire_RBV", 1)
            d.set("cam1:DetectorState_RBV", INITIALIZING)
            self._thread = threading.Thread(target=self._acquire_loop, name="simdet-acquire", daemon=True)
            self._thread.start()
            return Busy(1, self._done)

        @d.on_put("cam1:ArrayCounter")
        def _counter(value: int) -> None:
            self._counter = value
            d.set("cam1:ArrayCounter_RBV", value)

    def _config_handler(self, name: str):
        def handler(value: Any) -> Any:
            if self._acquiring:
                raise PutError(f"cannot change {name} while acquiring: stop first")
            if name in ("cam1:ObjectFile", "cam1:ProbeFile", "cam1:ReplayFile") and value:
                return self._file_put(name, value)
            self._echo(name, value)
            if name in ("cam1:Energy", "cam1:Distance", "cam1:DetPixel", "cam1:Size", "cam1:Bin"):
                self._update_geometry(**{name: value})
            return value
        return handler

    def _file_put(self, name: str, value: str) -> Busy:
        """Complete a put of a file setpoint later: the file is read on a thread, outside the handler
        lock, after the earlier puts to ``name``; a file that does not load refuses the put and
        leaves the setpoint as it was."""
        done: Future = Future()
        before = self._file_puts.get(name)  # under the handler lock: puts are in order
        self._file_puts[name] = done

        def run() -> None:
            if before is not None:
                wait_futures([before])
            try:
                self._check_file(name, value)
                self._echo(name, value)
                done.set_result(None)
            except PutError as exc:
                done.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - still the put's answer, not a dead thread
                _log.exception("put to %s failed", name)
                done.set_exception(PutError(f"{name}: {exc}"))

        threading.Thread(target=run, name=f"simdet-put-{name}", daemon=True).start()
        return Busy(value, done, setpoint_later=True)

    def _replay_source(self, path: str) -> FrameSource:
        """The frames and positions of a replay file, read once per file version (path, mtime, size)."""
        from pathlib import Path

        from ptychostream.sim.replay import load_frames

        st = Path(path.split("::", 1)[0]).stat()
        g = self.geometry()
        # the detector's geometry stands in for a file that gives none (pixel positions need the object pixel)
        defaults = {"energy_ev": 1e3 * g.energy_keV, "distance_m": g.distance_m, "detector_pixel_m": g.detector_pixel_m}
        key = (path, st.st_mtime_ns, st.st_size, *defaults.values())
        with self._replay_lock:
            if self._replay is not None and self._replay[0] == key:
                return self._replay[1]
            data = load_frames(path, defaults=defaults)
            where = "positioned" if data.positions_m is not None else "no positions"
            source = FrameSource(np.ascontiguousarray(data.frames), data.positions_m,
                                 description=f"replay {path} ({len(data.frames)} frames, {where})")
            self._replay = (key, source)
            return source

    def _check_file(self, name: str, path: str) -> None:
        from pathlib import Path

        file = path.split("::", 1)[0]
        if not Path(file).is_file():
            raise PutError(f"{name}: file not found: {file}")
        try:
            if name == "cam1:ObjectFile":
                from ptychostream.sim.objects import load_object

                path_, _, dataset = path.partition("::")
                load_object(path_, dataset or None)
            elif name == "cam1:ProbeFile":
                from ptychostream.sim.probes import load_probe

                load_probe(path)
            else:
                self._replay_source(path)
        except (ValueError, KeyError, OSError) as exc:
            raise PutError(f"{name}: {exc}") from None

    def _update_geometry(self, **override: Any) -> None:
        g = self.geometry(**override)
        binning = override.get("cam1:Bin", self.device.get("cam1:Bin"))
        size = override.get("cam1:Size", self.device.get("cam1:Size"))
        self.device.set("cam1:ObjectPixel_RBV", g.pixel_m)
        self.device.set("cam1:SizeX_RBV", size // binning)
        self.device.set("cam1:SizeY_RBV", size // binning)

    def geometry(self, **override: Any):
        from ptychostream.sim.forward import Geometry

        v = {n: override.get(n, self.device.get(n)) for n in ("cam1:Energy", "cam1:Distance", "cam1:DetPixel", "cam1:Size")}
        return Geometry(energy_keV=v["cam1:Energy"], distance_m=v["cam1:Distance"],
                        detector_pixel_m=v["cam1:DetPixel"], size=v["cam1:Size"])

    # -- frame source -----------------------------------------------------------------
    def _key(self) -> tuple:
        return tuple(self.device.get(n) for n in CONFIG if not n.startswith(("cam1:Pos", "cam1:Image",
                                                                               "cam1:NumImages", "cam1:Acquire",
                                                                               "cam1:TruthFile")))

    def build_source(self) -> FrameSource:
        """Simulate (or load) every frame of the scan into the cache."""
        key = self._key()
        if self._source is not None and key == self._source_key:
            return self._source
        d = self.device
        replay = d.get("cam1:ReplayFile")
        if replay:
            source = self._replay_source(replay)
        else:
            source = self._simulate()
        self._source, self._source_key = source, key
        return source

    def simulator(self):
        """The Simulator for the current settings (ground truth for tests and benchmarks)."""
        from ptychostream.sim.forward import Simulator
        from ptychostream.sim.objects import load_object, make_object
        from ptychostream.sim.probes import load_probe, make_probe
        from ptychostream.sim.scans import scan_extent_px, scan_positions

        d = self.device
        g = self.geometry()
        seed = d.get("cam1:Seed")
        positions = scan_positions(PATTERNS[d.get("cam1:ScanPattern")], d.get("cam1:ScanStep"),
                                   d.get("cam1:ScanPoints"), seed=seed)
        probe_kind = PROBES[d.get("cam1:Probe")]
        if probe_kind == "file":
            if not d.get("cam1:ProbeFile"):
                raise ValueError("Probe=file but ProbeFile is empty")
            probe, _ = load_probe(d.get("cam1:ProbeFile"))
        else:
            probe = make_probe(probe_kind, g.size, g.pixel_m, geometry=g)
        obj_kind = OBJECTS[d.get("cam1:Object")]
        shape = scan_extent_px(positions, g.pixel_m, g.size)
        if obj_kind == "file":
            if not d.get("cam1:ObjectFile"):
                raise ValueError("Object=file but ObjectFile is empty")
            path, _, dataset = d.get("cam1:ObjectFile").partition("::")
            obj = load_object(path, dataset or None)
        else:
            obj = make_object(obj_kind, shape=tuple(shape), seed=seed)
        return Simulator(obj, probe, positions, g, photons=d.get("cam1:Photons"), seed=seed,
                         beamstop_px=d.get("cam1:Beamstop"), hot_pixels=d.get("cam1:HotPixels"),
                         bin=d.get("cam1:Bin"), dtype=DATA_TYPES[d.get("cam1:DataType")])

    def _simulate(self) -> FrameSource:
        sim = self.simulator()
        h, w = sim.frame_shape
        itemsize = np.dtype(DATA_TYPES[self.device.get("cam1:DataType")]).itemsize
        n = min(sim.n, max(1, CACHE_BYTES // (h * w * itemsize)))
        frames = np.empty((n, h, w), dtype=DATA_TYPES[self.device.get("cam1:DataType")])
        for start in range(0, n, 256):
            frames[start:start + 256] = sim.frames(np.arange(start, min(n, start + 256)))
        return FrameSource(frames, np.asarray(sim.positions_m)[:n], simulator=sim,
                           description=f"{sim.n} simulated frames {h}x{w}")

    # -- acquisition -------------------------------------------------------------------
    def _acquire_loop(self) -> None:
        d = self.device
        try:
            source = self.build_source()
            truth = d.get("cam1:TruthFile")
            if truth and source.simulator is not None:
                from ptychostream.sim.replay import write_truth_h5

                # true patches of the first scan points only: a 128x128 patch is 131 kB
                write_truth_h5(truth, source.simulator, idx=np.arange(min(source.simulator.n, TRUTH_PATCHES)))
                d.set("cam1:TruthFile_RBV", truth)
            # the message first: a client that waits on DetectorState_RBV == Acquire then finds what runs
            d.set("cam1:StatusMessage_RBV", f"acquiring: {source.description}")
            d.set("cam1:DetectorState_RBV", ACQUIRE)
            aborted = self._publish(source)
            d.set("cam1:DetectorState_RBV", ABORTED if aborted else IDLE)
            d.set("cam1:StatusMessage_RBV", "aborted" if aborted else f"done: {self._image_counter} frames")
        except Exception as exc:
            _log.exception("acquisition failed")
            d.set("cam1:DetectorState_RBV", ERROR)
            d.set("cam1:StatusMessage_RBV", f"acquisition failed: {exc}", severity=2)
        finally:
            self._acquiring = False
            self.update_status()
            d.set("cam1:Acquire", 0)
            d.set("cam1:Acquire_RBV", 0)
            if self._done is not None:  # always set by the Acquire handler that started this loop
                self._done.set_result(None)

    def _publish(self, source: FrameSource) -> bool:
        d = self.device
        mode = d.get("cam1:ImageMode")
        total = {SINGLE: 1, MULTIPLE: d.get("cam1:NumImages")}.get(mode, None)
        period = d.get("cam1:AcquirePeriod")
        ax, ay = d.get("cam1:PosAttrX"), d.get("cam1:PosAttrY")
        chunk, delay = d.get("cam1:PosChunk"), d.get("cam1:PosDelay")
        positions = source.positions
        n_src = len(source.frames)
        pending: list[tuple[int, dict[str, np.ndarray]]] = []
        buf_uid: list[int] = []
        buf_xy: list[tuple[float, float]] = []
        next_motor = 0.0
        self._image_counter = 0
        t0 = time.perf_counter()
        i = 0
        while total is None or i < total:
            if self._stop.is_set():
                self._flush(pending, buf_uid, buf_xy)
                return True
            if period > 0:
                wait = t0 + i * period - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            k = i % n_src
            self._counter += 1
            uid = self._counter
            now = time.time()
            attrs: dict[str, Any] = {"ScanIndex": k}
            if positions is not None:
                y, x = float(positions[k, 0]), float(positions[k, 1])
                attrs[ax], attrs[ay] = x, y
                buf_uid.append(uid)
                buf_xy.append((x, y))
                if len(buf_uid) >= chunk:
                    pending.append((uid + delay, self._table(buf_uid, buf_xy)))
                    buf_uid, buf_xy = [], []
                if now >= next_motor:
                    d.set("PositionX_RBV", x)
                    d.set("PositionY_RBV", y)
                    next_motor = now + 1.0 / MOTOR_RATE_HZ
            d.post_image("Pva1:Image", ImageFrame(source.frames[k], uid, now, now, attrs))
            while pending and pending[0][0] <= uid:
                d.post_image("Pos1:Positions", pending.pop(0)[1])
            self.rate.add()
            self._image_counter += 1
            i += 1
        self._flush(pending, buf_uid, buf_xy)
        return False

    @staticmethod
    def _table(uids: list[int], xy: list[tuple[float, float]]) -> dict[str, np.ndarray]:
        arr = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return {"uniqueId": np.asarray(uids, dtype=np.int32), "x": arr[:, 0], "y": arr[:, 1]}

    def _flush(self, pending, buf_uid, buf_xy) -> None:
        if buf_uid:
            pending.append((0, self._table(buf_uid, buf_xy)))
        for _, table in pending:
            self.device.post_image("Pos1:Positions", table)
        pending.clear()

    # -- status ---------------------------------------------------------------------------
    def update_status(self) -> None:
        d = self.device
        d.set("cam1:ArrayCounter_RBV", self._counter)
        d.set("cam1:NumImagesCounter_RBV", self._image_counter)
        d.set("cam1:ArrayRate_RBV", round(self.rate.rate(), 1))

    async def status_task(self, period: float = 0.1) -> None:
        while True:
            self.update_status()
            await asyncio.sleep(period)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def run_simdet(args: argparse.Namespace) -> int:
    """``ptychostream simdet``: serve a SimDetector until SIGINT/SIGTERM."""
    from ptychostream.core.memory import Trimmer, tune_allocator
    from ptychostream.protocols.server import apply_startup_values, load_config, serve

    tune_allocator()

    config = load_config(args.config)
    det = SimDetector()
    values = dict(config.get("pvs", {}))
    if args.truth:
        values["cam1:TruthFile"] = args.truth
    for err in apply_startup_values(det.device, values):
        logging.warning(err)
    prefix = args.prefix

    def ready() -> None:
        print(f"ptychostream simdet {prefix} ready (image {prefix}Pva1:Image)", flush=True)

    trimmer = Trimmer()
    trimmer.start()
    try:
        asyncio.run(serve(det.device, prefix, ca=args.ca, tasks=[det.status_task], ready=ready))
    finally:
        trimmer.stop()
        det.stop()
    return 0
