"""The reconstructor and its detector as one ophyd-async ``StandardDetector``, its data in the HDF5 record.

:class:`PtychoDetector` follows ophyd-async's detector conventions (``StandardDetector`` with a
trigger logic, an acquire logic and a data logic): the simulated detector (``cam1:``) is the
driver, the reconstructor's HDF5 capture (``Capture``, ``CaptureFile``, ``CaptureFrames``) is the
writer. Each diffraction frame is one *collection*:

- ``prepare(TriggerInfo(...))`` sets ``NumImages`` (and ``AcquireTime``/``AcquirePeriod`` from
  livetime and deadtime) and opens a new record; the StreamResources name its datasets
  (``/entry/data/phase``, ``amplitude`` when the model gives it, ``position_x_m``, ``position_y_m``,
  ``unique_id``) with the patch shape of the model that serves;
- ``trigger()`` (step scans) and ``kickoff()``/``complete()`` (fly scans) start the acquisition
  and complete when the record holds every frame of it on disk (``CaptureFlushed_RBV``; every
  flushed row is a processed frame); ``collect_asset_docs`` emits the StreamDatum of those rows;
- ``mosaic`` is a separate readable: its ``trigger()`` waits until every processed frame is
  stitched, puts ``Capture=0`` and waits until the record is closed (``Capture_RBV`` = 0, the file
  complete, with its final mosaic); its ``read()`` gives the mosaic as a StreamResource/StreamDatum
  (``/entry/mosaic/phase``, ``coverage``, and ``amplitude``) with its true shape, and the pixel size
  and origin (m) inline. Read it as the last stream of a run (:func:`ptycho_step_scan`,
  :func:`ptycho_fly_scan`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.protocols import Reading, StreamAsset
from event_model import ComposeStreamResource, DataKey
from ophyd_async.core import (
    AsyncStatus,
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    Device,
    PathProvider,
    SignalR,
    StandardDetector,
    StaticFilenameProvider,
    StaticPathProvider,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
    UUIDFilenameProvider,
    wait_for_value,
)

from ptychostream.bluesky._devices import (
    ModelLoadError,
    Plan,
    PtychoReconstructor,
    ScanTimeout,
    SimDetector,
)
from ptychostream.files.record import DATA, MOSAIC, open_record

__all__ = [
    "HDF5_MIMETYPE",
    "PtychoDetector",
    "PtychoMosaic",
    "ptycho_fly_scan",
    "ptycho_step_scan",
    "record_path_provider",
]

#: the StreamResource mimetype of the record (as ophyd-async's HDF writers give it)
HDF5_MIMETYPE = "application/x-hdf5"
#: frames per chunk at most, and about this many bytes per chunk: the record's layout (pipeline/record.py)
_CHUNK_ROWS, _CHUNK_BYTES = 64, 1 << 20
_SUMMARY = r"(\d+)x(\d+) ([a-z+]+)"  # ModelInfo_RBV: "<name> HxW phase+amplitude, batch ..."


def record_path_provider(directory: str | Path, filename: str | None = None) -> PathProvider:
    """Records in ``directory``: ``filename`` (without ``.h5``) or a new UUID name per prepare."""
    names = StaticFilenameProvider(filename) if filename else UUIDFilenameProvider()
    return StaticPathProvider(names, Path(directory).resolve())


def _chunk_rows(row_bytes: int) -> int:
    return max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // max(1, row_bytes)))


async def _message(recon: PtychoReconstructor) -> str:
    return str(await recon.message.get_value(cached=False))


class _Capture:
    """The record now being written, shared by the data logic (opens it) and the mosaic (closes it)."""

    def __init__(self, recon: PtychoReconstructor, timeout: float) -> None:
        self.recon = recon
        self.timeout = timeout
        self.path: Path | None = None  #: the record being written, or the last one closed
        self.uri = ""
        self.open = False

    async def start(self, path: Path, frames: bool, flush_period: float | None) -> None:
        r = self.recon
        await self.close()
        await r.writable("CaptureFrames").set(frames)
        if flush_period is not None:
            await r.writable("CaptureFlushPeriod").set(flush_period)
        await r.writable("CaptureFile").set(str(path))
        try:
            await r.writable("Capture").set(True, timeout=self.timeout)  # a busy put: done when the file exists
        except Exception as exc:
            raise RuntimeError(f"{r.name}: Capture to {path} refused: {exc}: {await _message(r)}") from exc
        await wait_for_value(r.signal("Capture_RBV"), True, timeout=self.timeout)
        # the new record's flushed count (the IOC shows 0 as it opens; an older IOC showed the last
        # record's until its next status scan)
        await wait_for_value(r.signal("CaptureFlushed_RBV"), 0, timeout=self.timeout)
        self.path, self.open = path, True

    async def drained(self) -> None:
        """Every frame received so far inferred and stitched (the final mosaic then holds them all)."""
        r = self.recon
        deadline = time.monotonic() + self.timeout
        while True:
            c = await r.counts()
            if (c["backlog"] == 0 and c["processed"] + c["dropped"] + c["rejected"] >= c["received"]
                    and c["stitched"] + c["unpositioned"] >= c["processed"]):
                return
            if time.monotonic() > deadline:
                raise ScanTimeout(f"{r.name}: frames still in flight after {self.timeout:g} s: {c}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Capture=0 and wait until the record file is closed (Capture_RBV = 0, the file complete)."""
        if not self.open:
            return
        r = self.recon
        await self.drained()
        await r.writable("Capture").set(False, timeout=self.timeout)
        await wait_for_value(r.signal("Capture_RBV"), False, timeout=self.timeout)
        self.open = False
        assert self.path is not None
        with open_record(self.path) as fh:
            if not bool(fh["entry"].attrs.get("complete", False)):
                raise RuntimeError(f"{r.name}: record {self.path} closed incomplete: {await _message(r)}")


class _TriggerLogic(DetectorTriggerLogic):
    """Internal triggering of the simulated detector: Multiple images, NumImages = exposures."""

    def __init__(self, det: SimDetector) -> None:
        self.det = det

    def config_sigs(self) -> set[SignalR]:
        return {self.det.num_images, self.det.acquire_period, self.det.acquire_time}

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        det = self.det
        await det.image_mode.set("Multiple")  # type: ignore[arg-type]  # a StrictEnum of db/ strings
        await det.num_images.set(num)
        if livetime > 0:
            await det.acquire_time.set(livetime)
        if livetime + deadtime > 0:
            await det.acquire_period.set(livetime + deadtime)


class _AcquireLogic(DetectorAcquireLogic):
    """Stage: detector stopped, reconstructor enabled on the detector's image channel, mosaic cleared.
    Acquire: the detector's busy ``cam1:Acquire`` put, awaited in ``wait_for_idle``."""

    def __init__(self, recon: PtychoReconstructor, det: SimDetector, connect_timeout: float) -> None:
        self.recon, self.det = recon, det
        self.connect_timeout = connect_timeout
        self._acquiring: AsyncStatus | None = None

    async def ensure_ready(self) -> None:
        r, det = self.recon, self.det
        await self.ensure_stopped()
        status = str(await r.model_status.get_value(cached=False))
        if status != "Ready":
            raise ModelLoadError(f"{r.name} has no model ready (ModelStatus {status}): {await _message(r)}")
        if await r.input_pv.get_value(cached=False) != det.image_pv:
            await r.input_pv.set(det.image_pv)
        await r.enable.set(True)
        try:
            await wait_for_value(r.input_connected, True, timeout=self.connect_timeout)
        except TimeoutError:
            raise RuntimeError(f"{r.name} is not connected to {det.image_pv!r} after {self.connect_timeout:g} s: "
                               "is the detector IOC running?") from None
        # a new monitor delivers the detector's last frame: let it pass, then clear the mosaic
        last: dict[str, int] = {}
        for _ in range(100):
            await asyncio.sleep(0.15)
            c = await r.counts()
            if c == last and c["backlog"] == 0:
                break
            last = c
        # this run's frames only, on the counters and on the mosaic (Stitched_RBV counts its patches)
        if r.has("ResetCounters"):
            await r.writable("ResetCounters").set(True)
        if r.has("MosaicReset"):
            await r.writable("MosaicReset").set(True)

    async def start_acquiring(self) -> None:
        timeout = await self.det.acquire_timeout()
        self._acquiring = self.det.acquire.set(True, timeout=timeout)

    async def wait_for_idle(self) -> None:
        if self._acquiring is not None:
            status, self._acquiring = self._acquiring, None
            await status
        state = str(await self.det.detector_state.get_value(cached=False))
        if state not in ("Idle", "Aborted"):
            raise RuntimeError(f"{self.det.name}: acquisition ended in state {state}: "
                               f"{await self.det.status_message.get_value()}")

    async def ensure_stopped(self) -> None:
        if await self.det.acquire.get_value(cached=False):
            await self.det.acquire.set(False)
        if self._acquiring is not None:
            status, self._acquiring = self._acquiring, None
            with contextlib.suppress(Exception):  # an acquisition we stopped: its put's answer does not matter
                await status


class _RecordProvider(StreamResourceDataProvider):
    """ophyd-async's StreamResource provider, with the units of each data key."""

    def __init__(self, *args: Any, units: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.units = units

    async def make_datakeys(self, collections_per_event: int) -> dict[str, DataKey]:
        keys = await super().make_datakeys(collections_per_event)
        for key, unit in self.units.items():
            if key in keys:
                keys[key]["units"] = unit
        return keys


class _RecordDataLogic(DetectorDataLogic):
    """The reconstructor's HDF5 record as a stream of StreamResource/StreamDatum documents."""

    def __init__(self, recon: PtychoReconstructor, capture: _Capture, path_provider: PathProvider,
                 frames: bool, flush_period: float | None) -> None:
        self.recon, self.capture = recon, capture
        self.path_provider = path_provider
        self.frames, self.flush_period = frames, flush_period

    async def _patch(self) -> tuple[tuple[int, int], list[str]]:
        """The serving model's patch shape and outputs (ModelInfo_RBV), which the record's rows take."""
        import re

        info = str(await self.recon.signal("ModelInfo_RBV").get_value(cached=False))
        m = re.search(_SUMMARY, info)
        if not m:
            raise ModelLoadError(f"{self.recon.name}: no model serves (ModelInfo_RBV {info!r}): "
                                 f"{await _message(self.recon)}")
        return (int(m.group(1)), int(m.group(2))), m.group(3).split("+")

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        info = self.path_provider(datakey_name)
        path = Path(info.directory_path) / f"{info.filename}.h5"
        (h, w), outputs = await self._patch()
        await self.capture.start(path, self.frames, self.flush_period)
        uri = f"{info.directory_uri}{info.filename}.h5"
        self.capture.uri = uri
        source = f"pva://{self.recon.prefix}CaptureFile_RBV"
        resources = [StreamResourceInfo(data_key=f"{datakey_name}-{out}", shape=(h, w),
                                        chunk_shape=(_chunk_rows(h * w * 4), h, w), dtype_numpy="<f4",
                                        parameters={"dataset": f"/{DATA}/{out}"}, source=source)
                     for out in outputs if out in ("phase", "amplitude")]
        for key, dataset, dtype in (("position_x", "position_x_m", "<f8"), ("position_y", "position_y_m", "<f8"),
                                    ("unique_id", "unique_id", "<i8")):
            resources.append(StreamResourceInfo(data_key=f"{datakey_name}-{key}", shape=(),
                                                chunk_shape=(_chunk_rows(8),), dtype_numpy=dtype,
                                                parameters={"dataset": f"/{DATA}/{dataset}"}, source=source))
        units = {f"{datakey_name}-{k}": u for k, u in (("phase", "rad"), ("position_x", "m"), ("position_y", "m"))}
        return _RecordProvider(uri=uri, resources=resources, mimetype=HDF5_MIMETYPE, units=units,
                               collections_written_signal=self.recon.signal("CaptureFlushed_RBV"))

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [f"{datakey_name}-phase"]

    async def stop(self) -> None:
        await self.capture.close()


class PtychoMosaic(Device):
    """The final mosaic of the record a :class:`PtychoDetector` wrote (Triggerable, Readable, stream assets).

    ``trigger()`` closes the record (every frame stitched first); ``describe()`` and ``read()``
    then give ``<name>`` (the phase, rad), ``<name>-coverage`` and ``<name>-amplitude`` (when
    recorded) as StreamResource/StreamDatum of ``/entry/mosaic``, with their true shape, and the
    pixel size, the origin (y, x of pixel (0, 0), m) and the patch count inline.
    """

    def __init__(self, capture: _Capture, name: str = "") -> None:
        self._capture_of = (capture,)  # not a child
        self._assets: list[StreamAsset] = []
        self._keys: dict[str, DataKey] = {}
        self._values: dict[str, Any] = {}
        super().__init__(name=name)

    @property
    def hints(self) -> dict[str, list[str]]:
        return {"fields": [self.name]}

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        capture = self._capture_of[0]
        await capture.close()
        if capture.path is None:
            raise RuntimeError(f"{self.name}: no record was written (prepare the detector first)")
        with open_record(capture.path) as fh:
            if MOSAIC not in fh:
                raise RuntimeError(f"{self.name}: record {capture.path} has no /{MOSAIC} (no patch was stitched)")
            g = fh[MOSAIC]
            datasets = {name: (g[name].shape, g[name].dtype.str) for name in ("phase", "coverage", "amplitude")
                        if name in g}
            attrs = {k: g.attrs[k] for k in ("pixel_size_m", "origin_x_m", "origin_y_m", "n_patches")}
        source = f"pva://{capture.recon.prefix}CaptureFile_RBV"
        keys: dict[str, DataKey] = {}
        composer = ComposeStreamResource()
        assets: list[StreamAsset] = []
        datums = []
        for dname, (shape, dtype) in datasets.items():
            key = self.name if dname == "phase" else f"{self.name}-{dname}"
            keys[key] = DataKey(source=source, shape=list(shape), dtype="array", dtype_numpy=dtype, external="STREAM:",
                                units="rad" if dname == "phase" else "")
            bundle = composer(mimetype=HDF5_MIMETYPE, uri=capture.uri, data_key=key,
                              parameters={"dataset": f"/{MOSAIC}/{dname}", "chunk_shape": list(shape)}, uid=None)
            assets.append(("stream_resource", bundle.stream_resource_doc))
            datums.append(("stream_datum", bundle.compose_stream_datum({"start": 0, "stop": 1})))
        self._assets = assets + datums  # type: ignore[operator]
        units = {"pixel_size_m": "m", "origin_x_m": "m", "origin_y_m": "m", "n_patches": ""}
        values: dict[str, Any] = {}
        for attr, value in attrs.items():
            key = f"{self.name}-{attr.removesuffix('_m')}"
            is_int = attr == "n_patches"
            values[key] = int(value) if is_int else float(value)
            keys[key] = DataKey(source=f"{capture.uri}#/{MOSAIC}@{attr}", shape=[], units=units[attr],
                                dtype="integer" if is_int else "number", dtype_numpy="<i8" if is_int else "<f8")
        self._keys, self._values = keys, values

    async def describe(self) -> dict[str, DataKey]:
        if not self._keys:
            raise RuntimeError(f"{self.name}: trigger it first (it closes the record and reads the mosaic's shape)")
        return dict(self._keys)

    async def read(self) -> dict[str, Reading]:
        now = time.time()
        return {k: {"value": v, "timestamp": now} for k, v in self._values.items()}

    async def collect_asset_docs(self, index: int | None = None):
        assets, self._assets = self._assets, []
        for asset in assets:
            yield asset

    async def get_index(self) -> int:
        return 1 if self._keys else 0


class PtychoDetector(StandardDetector):
    """The reconstructor (``recon_prefix``) fed by the simulated detector (``det_prefix``), one detector.

    ``path_provider`` says where records go (:func:`record_path_provider`); ``frames`` also records
    the diffraction frames; ``flush_period`` (s) sets CaptureFlushPeriod at prepare (None: as set),
    which bounds how long after a frame a trigger can complete. Children: ``recon``
    (:class:`PtychoReconstructor`), ``det`` (:class:`SimDetector`), ``mosaic`` (:class:`PtychoMosaic`);
    ``model`` is the reconstructor's :class:`ModelLoader`.
    """

    def __init__(self, recon_prefix: str, det_prefix: str, path_provider: PathProvider, name: str = "",
                 frames: bool = False, flush_period: float | None = 0.2, timeout: float = 30.0,
                 connect_timeout: float = 10.0) -> None:
        self.recon = PtychoReconstructor(recon_prefix)
        self.det = SimDetector(det_prefix)
        capture = _Capture(self.recon, timeout)
        self._capture_of = (capture,)
        self.mosaic = PtychoMosaic(capture)
        self.add_detector_logics(
            _TriggerLogic(self.det),
            _AcquireLogic(self.recon, self.det, connect_timeout),
            _RecordDataLogic(self.recon, capture, path_provider, frames, flush_period))
        r = self.recon
        self.add_config_signals(r.model_path, r.signal("ModelInfo_RBV"), r.signal("PixelSize_RBV"),
                                r.signal("PositionSource"), r.signal("CaptureFrames"), self.det.scan_step,
                                self.det.scan_points, self.det.signal("cam1:ObjectPixel_RBV"))
        super().__init__(name=name)

    @property
    def model(self) -> Any:
        """The reconstructor's :class:`ModelLoader`: ``bps.mv(ptycho.model, path)``."""
        return self.recon.model

    @property
    def record_path(self) -> Path | None:
        """The record being written, or the last one closed."""
        return self._capture_of[0].path

    @AsyncStatus.wrap
    async def unstage(self) -> None:
        """Stop the detector, close the record, disable the reconstructor."""
        try:
            await super().unstage()
        finally:
            await self.recon.enable.set(False)


# -- plans --------------------------------------------------------------------------------------
def _load(ptycho: PtychoDetector, model: str | None) -> Plan:
    if model is not None:
        yield from bps.mv(ptycho.model, model)
    else:
        status = yield from bps.rd(ptycho.recon.model_status)
        if str(status) != "Ready":
            message = yield from bps.rd(ptycho.recon.message)
            raise ModelLoadError(f"{ptycho.recon.name} has no model ready (ModelStatus {status}): {message}")


def ptycho_step_scan(ptycho: PtychoDetector, num: int = 1, frames: int = 1, model: str | None = None,
                     period: float | None = None, md: dict[str, Any] | None = None) -> Plan:
    """``num`` events of ``frames`` diffraction frames each (one acquisition per event), then the mosaic.

    Stream ``primary``: per event, the ``frames`` phase patches, positions and uniqueIds (StreamDatum
    into the record). Stream ``mosaic``: the final mosaic of the record, after it is closed.
    ``model``: loaded first (``mv(ptycho.model, model)``; fails with the reconstructor's message).
    """
    _md = {"plan_name": "ptycho_step_scan", "num_points": num, "detectors": [ptycho.name],
           "plan_args": {"num": num, "frames": frames, "model": model, "period": period}}
    _md.update(md or {})
    info = TriggerInfo(number_of_events=1, collections_per_event=frames, deadtime=period or 0.0,
                       exposure_timeout=30.0 + frames * (period or 0.01))

    @bpp.stage_decorator([ptycho])
    @bpp.run_decorator(md=_md)
    def run() -> Plan:
        yield from bps.prepare(ptycho, info, wait=True)
        for _ in range(num):
            yield from bps.trigger_and_read([ptycho])
        yield from bps.trigger_and_read([ptycho.mosaic], name="mosaic")

    yield from _load(ptycho, model)
    return (yield from run())


def ptycho_fly_scan(ptycho: PtychoDetector, num: int, model: str | None = None, period: float | None = None,
                    flush_period: float = 0.5, md: dict[str, Any] | None = None) -> Plan:
    """A fly scan of ``num`` frames: prepare, kickoff, collect while completing, then the mosaic.

    Stream ``primary``: StreamDatum pages of the record's rows as they are flushed; stream
    ``mosaic``: the final mosaic.
    """
    _md = {"plan_name": "ptycho_fly_scan", "num_points": num, "detectors": [ptycho.name],
           "plan_args": {"num": num, "model": model, "period": period}}
    _md.update(md or {})
    info = TriggerInfo(number_of_events=num, deadtime=period or 0.0, exposure_timeout=30.0)

    @bpp.stage_decorator([ptycho])
    @bpp.run_decorator(md=_md)
    def run() -> Plan:
        yield from bps.prepare(ptycho, info, wait=True)
        yield from bps.declare_stream(ptycho, name="primary", collect=True)
        yield from bps.kickoff(ptycho, wait=True)
        yield from bps.collect_while_completing([ptycho], [ptycho], flush_period=flush_period, stream_name="primary")
        yield from bps.trigger_and_read([ptycho.mosaic], name="mosaic")

    yield from _load(ptycho, model)
    return (yield from run())
