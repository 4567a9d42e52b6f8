"""Bluesky devices and plans for ptychostream, with ophyd-async over PVA, built from ``db/``.

Every signal of :class:`PtychoReconstructor` and :class:`SimDetector` is made from a
:class:`~ptychostream.core.pvdb.PVSpec` (``pva://`` + prefix + suffix): names, types and enum
choices match the IOC by construction, and ophyd-async checks the enum choices at connect.
A setpoint ``Name`` whose readback ``Name_RBV`` has the same type becomes one read/write
signal (write ``Name``, read ``Name_RBV``); two-state enums (bo/bi records) are ``bool``,
other enums ``StrictEnum`` classes made from the db strings, images ``numpy`` arrays.

Attribute names are the suffixes in snake case without ``_RBV`` or ``cam1:``:
``ModelPath`` → ``model_path``, ``Processed_RBV`` → ``processed``, ``cam1:NumImages`` →
``num_images``, ``Pva1:Image`` → ``image``; where two PVs would share a name, the image
gets ``_image`` (``MosaicCoverage`` → ``mosaic_coverage_image``) and a readback ``_rbv``.

Use it from Bluesky::

    from bluesky import RunEngine
    from ophyd_async.core import init_devices
    from ptychostream.bluesky import PtychoReconstructor, SimDetector, live_ptycho_scan

    RE = RunEngine()
    with init_devices():
        recon = PtychoReconstructor("PTY:NN:")
        det = SimDetector("PTY:SIM:")
    RE(live_ptycho_scan(recon, det, model="/path/to/model.onnx", num=400, step=1e-7))
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Generator, Iterable
from typing import Any

import numpy as np

from ptychostream.core.pvdb import PVDatabase, PVSpec, load_db

try:
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp
    from bluesky.utils import Msg
    from event_model import DataKey
    from ophyd_async.core import (
        AsyncStatus,
        Device,
        SignalR,
        SignalRW,
        StandardReadable,
        StandardReadableFormat,
        StrictEnum,
    )
    from ophyd_async.epics.core import epics_signal_r, epics_signal_rw
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "ptychostream.bluesky needs the 'bluesky' extra: pip install 'ptychostream[bluesky]' "
        f"(bluesky, ophyd-async with p4p): {exc}"
    ) from exc

__all__ = [
    "InputNotConnected",
    "ModelLoadError",
    "ModelLoader",
    "PtychoReconstructor",
    "ScanTimeout",
    "SimDetector",
    "attr_name",
    "live_ptycho_scan",
    "read_mosaic",
    "signals_from_db",
    "swap_model",
    "wait_drained",
]

Plan = Generator[Msg, Any, Any]

#: ModelStatus_RBV strings (db/reconstructor.db)
READY, ERROR, LOADING = "Ready", "Error", "Loading"


class ModelLoadError(RuntimeError):
    """The reconstructor could not load the requested model; the message says why."""


class ScanTimeout(TimeoutError):
    """A scan did not finish (acquire, or the reconstructor's backlog) in time."""


class InputNotConnected(RuntimeError):
    """The reconstructor is not connected to the detector's image channel."""


# -- signals from db/ -----------------------------------------------------------------------
def attr_name(suffix: str) -> str:
    """``ModelPath`` → ``model_path``; ``LatencyP50_RBV`` → ``latency_p50``; ``cam1:NumImages`` → ``num_images``."""
    base = suffix.rsplit(":", 1)[-1]
    base = base.removesuffix("_RBV")
    words = re.findall(r"[A-Z]+[0-9]*(?![a-z])|[A-Z]?[a-z]+[0-9]*|[0-9]+", base) or [base]
    return "_".join(w.lower() for w in words)


def _enum_class(spec: PVSpec) -> type[StrictEnum]:
    members = []
    for choice in spec.enum_strs:
        key = re.sub(r"\W", "_", choice).upper() or "EMPTY"
        members.append((key if key[0].isalpha() else f"V_{key}", choice))
    # Enum's functional API: mypy reads a call on an Enum subclass as a member lookup
    return StrictEnum(attr_name(spec.suffix).title().replace("_", ""), members)  # type: ignore[call-arg, return-value]


def _datatype(spec: PVSpec) -> Any:
    if spec.kind == "image":
        return np.ndarray
    if spec.kind == "enum":
        return bool if spec.rtyp in ("bo", "bi") else _enum_class(spec)
    return {"float": float, "int": int, "string": str}[spec.kind]


def _same_type(a: PVSpec, b: PVSpec) -> bool:
    """Whether one signal datatype fits both (two-state records are bool whatever their strings)."""
    a_bool, b_bool = a.rtyp in ("bo", "bi"), b.rtyp in ("bo", "bi")
    if a_bool or b_bool:
        return a_bool and b_bool
    return a.kind == b.kind and a.enum_strs == b.enum_strs


def signals_from_db(db: PVDatabase, prefix: str, timeout: float = 10.0) -> dict[str, tuple[SignalR, PVSpec]]:
    """One ophyd-async signal per db/ record (setpoint + same-typed readback → one RW signal).

    Returns ``{attribute name: (signal, spec)}``; the spec is the setpoint's for RW signals.
    NTTable PVs are left out (read them with p4p).
    """
    out: dict[str, tuple[SignalR, PVSpec]] = {}
    paired: set[str] = set()
    specs = [s for s in db if s.kind != "table"]
    for spec in specs:
        rbv = spec.readback
        if spec.writable and spec.kind != "image" and rbv and rbv in db and _same_type(spec, db[rbv]):
            paired.add(rbv)
    wanted = [s for s in specs if s.suffix not in paired]
    names = _attr_names(wanted)
    for spec in wanted:
        pv = f"pva://{prefix}{spec.suffix}"
        dtype = _datatype(spec)
        if spec.writable and spec.kind != "image":
            rbv = spec.readback
            read_pv = f"pva://{prefix}{rbv}" if rbv in paired else pv
            sig: SignalR = epics_signal_rw(dtype, read_pv, pv, timeout=timeout)
        else:
            sig = epics_signal_r(dtype, pv, timeout=timeout)
        out[names[spec.suffix]] = (sig, spec)
    return out


def _attr_names(specs: list[PVSpec]) -> dict[str, str]:
    """Attribute names; where two PVs share one, an image gets ``_image``, an ``_RBV`` one ``_rbv``."""
    base = {s.suffix: attr_name(s.suffix) for s in specs}
    count: dict[str, int] = {}
    for name in base.values():
        count[name] = count.get(name, 0) + 1
    out = {}
    for spec in specs:
        name = base[spec.suffix]
        if count[name] > 1:
            if spec.kind == "image":
                name += "_image"
            elif spec.suffix.endswith("_RBV"):
                name += "_rbv"
        out[spec.suffix] = name
    if len(set(out.values())) != len(out):
        dup = sorted(n for n in out.values() if list(out.values()).count(n) > 1)
        raise ValueError(f"PVs in db/ map to the same attribute names: {dup}")
    return out


class _DbDevice(StandardReadable):
    """A StandardReadable whose children are every PV of one db/ file."""

    _db_name = ""
    _read: tuple[str, ...] = ()
    _hinted: tuple[str, ...] = ()

    def __init__(self, prefix: str, name: str = "", db: PVDatabase | None = None) -> None:
        self.prefix = prefix
        self.db = db or load_db(self._db_name)
        self.specs: dict[str, PVSpec] = {}
        signals = signals_from_db(self.db, prefix)
        for attr, (sig, spec) in signals.items():
            setattr(self, attr, sig)
            self.specs[attr] = spec
        by_suffix = {spec.suffix: attr for attr, spec in self.specs.items()}
        for attr, spec in self.specs.items():  # a paired readback reads through its setpoint's signal
            if spec.readback and spec.readback not in by_suffix and isinstance(getattr(self, attr), SignalRW):
                by_suffix[spec.readback] = attr
        self._by_suffix = by_suffix
        read = [by_suffix[s] for s in self._read if s in by_suffix]
        # by the db/ suffix asked for: a paired readback (cam1:ArrayCounter_RBV) is stored under its setpoint
        hinted = [by_suffix[s] for s in self._hinted if s in by_suffix and by_suffix[s] in read]
        self.add_readables([signals[a][0] for a in hinted], StandardReadableFormat.HINTED_UNCACHED_SIGNAL)
        self.add_readables([signals[a][0] for a in read if a not in hinted],
                           StandardReadableFormat.UNCACHED_SIGNAL)
        config = [a for a in self._config_attrs() if a not in read]
        self.add_readables([signals[a][0] for a in config], StandardReadableFormat.CONFIG_SIGNAL)
        super().__init__(name=name)

    def _config_attrs(self) -> list[str]:
        """Every setpoint except actions (puts with no readback), plus model/info readbacks."""
        return [a for a, s in self.specs.items()
                if s.kind != "image" and (s.writable and s.readback is not None)]

    def has(self, suffix: str) -> bool:
        """Whether db/ (and so this device) has the PV ``suffix``."""
        return suffix in self._by_suffix

    def signal(self, suffix: str) -> SignalR:
        """The signal of a db/ suffix (a paired readback gives its setpoint's read/write signal)."""
        if suffix in self._by_suffix:
            return getattr(self, self._by_suffix[suffix])
        raise KeyError(f"{suffix} is not in {self.db.source.name}")

    def writable(self, suffix: str) -> SignalRW:
        """The read/write signal of a db/ setpoint ``suffix``; TypeError for a read-only PV."""
        sig = self.signal(suffix)
        if not isinstance(sig, SignalRW):
            raise TypeError(f"{suffix} of {self.db.source.name} is read-only")
        return sig


class ModelLoader(Device):
    """The reconstructor's model as a Bluesky Movable: ``set(path)`` completes when ``path`` serves.

    ``bps.mv(recon.model, "/path/model.onnx")`` puts ModelPath, then waits (fresh reads, not the
    monitor cache) until ModelStatus_RBV leaves Loading: Ready with ModelPath_RBV == path completes
    it; Error, or Ready with another model still serving (a candidate the stream refused), fails it
    with :class:`ModelLoadError` carrying Message_RBV. ``set("")`` unloads (ModelStatus None).
    """

    def __init__(self, recon: PtychoReconstructor, name: str = "", timeout: float = 60.0) -> None:
        # plain dict, not attributes: the signals stay children of the reconstructor
        self._sig: dict[str, Any] = {"path": recon.writable("ModelPath"), "status": recon.signal("ModelStatus_RBV"),
                     "message": recon.signal("Message_RBV")}
        self._owner_of = (recon,)  # a tuple: a Device attribute would become a child (a cycle)
        self.timeout = timeout
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def set(self, value: str, timeout: float | None = None) -> None:
        path = str(value).strip()
        wait = self.timeout if timeout is None else timeout
        sig = self._sig
        await sig["path"].set(path, timeout=wait)  # the IOC shows Loading before it answers the put
        deadline = time.monotonic() + wait
        while True:
            status = str(await sig["status"].get_value(cached=False))
            if status != LOADING:
                break
            if time.monotonic() > deadline:
                raise ScanTimeout(f"{self._owner_of[0].name}: model {path} still loading after {wait:g} s")
            await asyncio.sleep(0.05)
        message = await sig["message"].get_value(cached=False)
        if status == ERROR:
            raise ModelLoadError(f"{self._owner_of[0].name} could not load model {path}: {message}")
        serving = await sig["path"].get_value(cached=False)  # ModelPath_RBV
        if serving != path or (path and status != READY):
            raise ModelLoadError(f"{self._owner_of[0].name} serves {serving!r} (ModelStatus {status}), not {path!r}, "
                                 f"after the load: {message}")

    async def read_value(self) -> str:
        """The model file now serving (ModelPath_RBV)."""
        return str(await self._sig["path"].get_value(cached=False))


class PtychoReconstructor(_DbDevice):
    """The ptychostream reconstructor IOC (prefix ``$(P)$(R)``, e.g. ``PTY:NN:``) over PVA.

    ``read()`` gives the live mosaic, the frame counters, rates, latencies and status, and the
    physics-consistency figure (``consistency``, ``consistency_p90``, ``consistency_status``);
    ``read_configuration()`` the model, backend, queue, pre-processing and consistency settings
    (with ``consistency_info``: the probe in use, or why there is no figure).
    ``stage()`` enables processing, ``unstage()`` disables it. ``model`` is a :class:`ModelLoader`
    (``bps.mv(recon.model, path)`` waits until the model serves).

    With ``source`` (the :class:`SimDetector` feeding it), ``trigger()`` completes once every frame
    the detector has sent since ``stage()`` has been accounted for (received, and processed, dropped
    or rejected) and every processed frame stitched: in ``count([det, recon])`` the reconstructor
    is read after the detector's acquisition has been reconstructed, not while its frames are
    still in flight. Without a source, ``trigger()`` waits until nothing is in flight.

    The live mosaic's canvas grows with the scan (unless MosaicXMin..YMax fix it), so its data key
    says ``shape [None, None]`` (variable, event-model's convention) instead of the shape of the
    first event.
    """

    # the signals the plans use (all are made from db/ at __init__; annotated for type checkers)
    enable: SignalRW[bool]
    model_path: SignalRW[str]
    model_status: SignalR[StrictEnum]
    message: SignalR[str]
    input_pv: SignalRW[str]
    input_connected: SignalR[bool]
    processed: SignalR[int]
    received: SignalR[int]

    _db_name = "reconstructor.db"
    _read = ("Mosaic", "Processed_RBV", "Dropped_RBV", "Rejected_RBV", "Missed_RBV", "Received_RBV",
             "Backlog_RBV", "Stitched_RBV", "Unpositioned_RBV", "MosaicCoverage_RBV", "InputRate_RBV",
             "FrameRate_RBV", "LatencyP50_RBV", "LatencyP99_RBV", "Status_RBV", "Message_RBV",
             "Consistency_RBV", "ConsistencyP90_RBV", "ConsistencyStatus_RBV")
    _hinted = ("Processed_RBV",)

    def __init__(self, prefix: str, name: str = "", db: PVDatabase | None = None,
                 source: SimDetector | None = None, trigger_timeout: float = 60.0) -> None:
        super().__init__(prefix, name=name, db=db)
        self.model = ModelLoader(self)
        self.set_name(name)  # names the loader too
        self._source_of = (source,)  # a tuple: a Device attribute would become a child
        self.trigger_timeout = trigger_timeout
        self._baseline: tuple[int, int] | None = None  # (detector ArrayCounter, Received) at stage
        self._stitch_base: dict[str, int] | None = None  # the counters at stage (a MosaicReset zeroes Stitched only)

    def _config_attrs(self) -> list[str]:
        extra = [a for a, s in self.specs.items()
                 if s.suffix in ("ModelStatus_RBV", "ModelInfo_RBV", "ConsistencyInfo_RBV")]
        return super()._config_attrs() + extra

    async def describe(self) -> dict[str, DataKey]:
        keys = await super().describe()
        key = f"{self.name}-mosaic"
        if key in keys:
            fixed = await asyncio.gather(*(self.signal(n).get_value() for n in
                                           ("MosaicXMin", "MosaicXMax", "MosaicYMin", "MosaicYMax")
                                           if self.has(n)))
            if not any(fixed):  # a growing canvas: its shape is not the first event's
                keys[key] = DataKey(**{**keys[key], "shape": [None, None]})  # type: ignore[typeddict-item]
        return keys

    async def counts(self) -> dict[str, int]:
        """Frame counters read now (not the monitor cache): processed, dropped, rejected, backlog,
        received, stitched, unpositioned."""
        return await self._counts_now()

    async def _counts_now(self) -> dict[str, int]:
        names = ("processed", "dropped", "rejected", "backlog", "received", "stitched", "unpositioned")
        values = await asyncio.gather(*(getattr(self, n).get_value(cached=False) for n in names))
        return dict(zip(names, map(int, values)))

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        await asyncio.sleep(0)  # let the other triggers of this step start (the detector's acquisition)
        deadline = time.monotonic() + self.trigger_timeout
        source = self._source_of[0]
        acquisition = source.last_trigger if source is not None else None
        if acquisition is not None and not acquisition.done:
            await asyncio.wait_for(acquisition, timeout=self.trigger_timeout)
        last: dict[str, int] = {}
        while time.monotonic() < deadline:
            c = await self.counts()
            sent_ok = True
            if source is not None and self._baseline is not None:
                sent = int(await source.array_counter.get_value(cached=False)) - self._baseline[0]
                sent_ok = c["received"] - self._baseline[1] >= sent
            b = self._stitch_base or {"processed": 0, "stitched": 0, "unpositioned": 0}
            stitched = c["stitched"] - b["stitched"] + c["unpositioned"] - b["unpositioned"]
            drained = (sent_ok and c["backlog"] == 0 and c["processed"] + c["dropped"] + c["rejected"] >= c["received"]
                       and stitched >= c["processed"] - b["processed"])
            if drained and (source is not None or c == last):  # without a source: two equal reads in a row
                await self._mosaic_published()
                return
            last = c
            await asyncio.sleep(0.1)
        raise ScanTimeout(f"{self.name}: frames still in flight after {self.trigger_timeout:g} s: {last}")

    async def _mosaic_published(self) -> None:
        """Wait one MosaicRate period: the stitch stage publishes at most that often."""
        rate = float(await self.signal("MosaicRate_RBV").get_value()) if self.has("MosaicRate_RBV") else 0.0
        await asyncio.sleep(1.0 / rate + 0.05 if rate > 0 else 0.1)

    @AsyncStatus.wrap
    async def stage(self) -> None:
        await super().stage()
        await self.enable.set(True)
        self._stitch_base = await self.counts()
        source = self._source_of[0]
        if source is not None:
            counter, received = await asyncio.gather(source.array_counter.get_value(cached=False),
                                                     self.received.get_value(cached=False))
            self._baseline = (int(counter), int(received))

    @AsyncStatus.wrap
    async def unstage(self) -> None:
        await self.enable.set(False)
        await super().unstage()


class SimDetector(_DbDevice):
    """The simulated ptychography detector IOC (prefix ``$(P)``, e.g. ``PTY:SIM:``) over PVA.

    ``trigger()`` puts ``cam1:Acquire=1`` and completes when the acquisition has ended
    (areaDetector's busy put); ``read()`` gives the frame counters.
    """

    # the signals trigger() and the plans use (made from db/ at __init__; annotated for type checkers)
    image_mode: SignalRW[StrictEnum]
    num_images: SignalRW[int]
    acquire_period: SignalRW[float]
    acquire_time: SignalRW[float]
    acquire: SignalRW[bool]
    detector_state: SignalR[StrictEnum]
    status_message: SignalR[str]
    scan_points: SignalRW[int]
    scan_step: SignalRW[float]
    array_counter: SignalRW[int]

    #: the status of the latest ``trigger()`` (a reconstructor with this detector as source waits on it)
    last_trigger: AsyncStatus | None = None

    _db_name = "simdetector.db"
    _read = ("cam1:ArrayCounter_RBV", "cam1:NumImagesCounter_RBV", "cam1:DetectorState_RBV")
    _hinted = ("cam1:ArrayCounter_RBV",)

    #: seconds allowed beyond NumImages × AcquirePeriod for a triggered acquisition
    trigger_margin = 30.0

    @property
    def image_pv(self) -> str:
        """The NTNDArray channel (no scheme) a reconstructor's InputPV should monitor."""
        return f"{self.prefix}{self.specs['image'].suffix}"

    async def acquire_timeout(self) -> float:
        mode, num, period, exposure = await asyncio.gather(
            self.image_mode.get_value(), self.num_images.get_value(),
            self.acquire_period.get_value(), self.acquire_time.get_value())
        if str(mode) == "Continuous":
            raise ValueError(f"{self.name}: ImageMode is Continuous, so Acquire would never complete")
        frames = 1 if str(mode) == "Single" else int(num)
        return frames * max(float(period), float(exposure), 1e-3) * 2 + self.trigger_margin

    def trigger(self) -> AsyncStatus:
        """Acquire (cam1:Acquire=1, a busy put) and complete when the acquisition has ended."""
        status = self._trigger()
        self.last_trigger = status
        return status

    @AsyncStatus.wrap
    async def _trigger(self) -> None:
        timeout = await self.acquire_timeout()
        await self.acquire.set(True, timeout=timeout)
        state = await self.detector_state.get_value()
        if str(state) not in ("Idle", "Aborted"):
            message = await self.status_message.get_value()
            raise RuntimeError(f"{self.name}: acquisition ended in state {state}: {message}")


# -- plans --------------------------------------------------------------------------------------
def _poll(read: Any, done: Any, timeout: float, what: str, interval: float = 0.05) -> Plan:
    """Read with ``read()`` (a plan) until ``done(value)``; ScanTimeout after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = yield from read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise ScanTimeout(f"timed out after {timeout:g} s waiting for {what} (last: {value})")
        yield from bps.sleep(interval)


def _disable_on_error(recon: PtychoReconstructor, plan: Plan) -> Plan:
    """Run ``plan``; if it fails, put Enable=0 before the error propagates."""
    try:
        return (yield from plan)
    except Exception:
        yield from bps.abs_set(recon.enable, False, wait=True)
        raise


def swap_model(recon: PtychoReconstructor, path: str, timeout: float = 60.0) -> Plan:
    """Load the model file ``path`` and wait until ModelStatus_RBV is Ready.

    Raises :class:`ModelLoadError` (with Message_RBV) if it goes to Error, or if no path is
    given; the reconstructor is then left disabled (Enable=0).
    """

    def body() -> Plan:
        if not path or not str(path).strip():
            raise ModelLoadError("no model path given: pass model='/path/to/model.onnx'")
        yield from bps.abs_set(recon.model_path, str(path), wait=True)

        def read() -> Plan:
            return (yield from bps.rd(recon.model_status))

        status = yield from _poll(read, lambda s: str(s) in (READY, ERROR), timeout,
                                  f"{recon.name} to load {path}")
        message = yield from bps.rd(recon.message)
        if str(status) == ERROR:
            raise ModelLoadError(f"{recon.name} could not load model {path}: {message}")
        serving = yield from bps.rd(recon.model_path)
        if serving != str(path):
            raise ModelLoadError(f"{recon.name} serves {serving!r}, not {path!r}, after the load: {message}")
        return message

    return (yield from _disable_on_error(recon, body()))


def _counters(recon: PtychoReconstructor) -> Plan:
    out = {}
    for name in ("processed", "dropped", "rejected", "backlog", "received", "missed", "stitched", "unpositioned"):
        out[name] = int((yield from bps.rd(getattr(recon, name))))
    return out


def _settle(recon: PtychoReconstructor, quiet: float = 0.3, timeout: float = 10.0) -> Plan:
    """Wait until no frame is in flight: counters unchanged for ``quiet`` s and the backlog empty."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        yield from bps.sleep(quiet)
        counts = yield from _counters(recon)
        if counts == last and counts["backlog"] == 0:
            return counts
        last = counts
    raise ScanTimeout(f"{recon.name} kept receiving frames before the scan started: {last}")


def wait_drained(recon: PtychoReconstructor, num: int, timeout: float = 60.0) -> Plan:
    """Wait until Backlog_RBV == 0, Processed + Dropped + Rejected == ``num`` and every processed
    frame has reached the mosaic (Stitched + Unpositioned == Processed: the stitch stage runs on
    its own thread, behind inference)."""
    def done(c: dict[str, int]) -> bool:
        return (c["backlog"] == 0 and c["processed"] + c["dropped"] + c["rejected"] >= num
                and c["stitched"] + c["unpositioned"] >= c["processed"])

    counts = yield from _poll(lambda: _counters(recon), done, timeout,
                              f"{recon.name} to process {num} frames", interval=0.1)
    total = counts["processed"] + counts["dropped"] + counts["rejected"]
    if total != num:
        raise RuntimeError(f"{recon.name} accounted for {total} frames, expected {num}: {counts}")
    return counts


def _mosaic_settled(recon: PtychoReconstructor, timeout: float = 10.0) -> Plan:
    """Wait until the published Mosaic holds every stitched patch.

    The stitch stage publishes at most every 1/MosaicRate s, so the last patches reach the Mosaic
    PV up to one period after Stitched_RBV counts them: wait until the mosaic's shape and coverage
    stay the same over a whole publish period (the event's reading and its descriptor then agree).
    """
    if not (recon.has("MosaicRate_RBV") and recon.has("MosaicCoverage_RBV")):
        return
    rate = float((yield from bps.rd(recon.signal("MosaicRate_RBV"))))
    period = 1.0 / rate + 0.05 if rate > 0 else 0.1
    deadline = time.monotonic() + timeout

    def state() -> Plan:
        image = yield from bps.rd(recon.signal("Mosaic"))
        coverage = yield from bps.rd(recon.signal("MosaicCoverage_RBV"))
        return np.shape(image), float(coverage)

    last = yield from state()
    while time.monotonic() < deadline:
        yield from bps.sleep(period)
        now = yield from state()
        if now == last:
            return
        last = now
    raise ScanTimeout(f"{recon.name}: the mosaic kept changing for {timeout:g} s after every frame was stitched")


def live_ptycho_scan(recon: PtychoReconstructor, det: SimDetector, model: str | None = None, num: int = 100,
                     step: float = 1e-7, period: float | None = None, pixel_size: float | None = None,
                     connect: bool = True, timeout: float | None = None, connect_timeout: float = 10.0,
                     md: dict[str, Any] | None = None) -> Plan:
    """One live ptychography scan: load ``model``, stream ``num`` frames, read the mosaic.

    1. ``model``: load it and wait for Ready (:class:`ModelLoadError` on Error); with no model
       the one already serving is used (and must be Ready).
    2. ``connect``: point the reconstructor's InputPV at the detector's image channel;
       ``pixel_size`` (m): set the mosaic's object pixel (PixelSize) when the model has none.
    3. Stage (Enable=1) and wait up to ``connect_timeout`` for InputConnected_RBV
       (:class:`InputNotConnected`); let the frame a new monitor delivers pass.
    4. Clear the counters (ResetCounters) and the mosaic (MosaicReset, if db/ has it), configure the detector (Multiple, NumImages=ScanPoints=num,
       ScanStep=step, AcquirePeriod=period if given) and acquire.
    5. Wait for the backlog to drain (Backlog 0, Processed+Dropped+Rejected == num, every processed
       frame stitched or unpositioned) within
       ``timeout`` (:class:`ScanTimeout`), then read both devices into one event.

    The reconstructor is unstaged (Enable=0) at the end, and left disabled on any failure.
    """
    _md = {"plan_name": "live_ptycho_scan", "num_points": num, "model": model,
           "plan_args": {"num": num, "step": step, "period": period, "model": model, "pixel_size": pixel_size},
           "detectors": [det.name, recon.name]}
    _md.update(md or {})

    def body() -> Plan:
        if model is not None:
            yield from swap_model(recon, model)
        else:
            status = yield from bps.rd(recon.model_status)
            if str(status) != READY:
                message = yield from bps.rd(recon.message)
                raise ModelLoadError(f"{recon.name} has no model ready (ModelStatus {status}): {message}")
        if connect:
            yield from bps.abs_set(recon.input_pv, det.image_pv, wait=True)
        if pixel_size is not None:
            yield from bps.abs_set(recon.signal("PixelSize"), pixel_size, wait=True)
        yield from bps.stage(recon, wait=True)  # an ophyd-async stage is a status: wait for Enable=1

        def connected() -> Plan:
            return (yield from bps.rd(recon.input_connected))

        try:
            yield from _poll(connected, bool, connect_timeout, "the connection")
        except ScanTimeout:
            channel = yield from bps.rd(recon.input_pv)
            raise InputNotConnected(f"{recon.name} is not connected to its InputPV {channel!r} after "
                                    f"{connect_timeout:g} s: is the detector IOC running?") from None
        # A new monitor delivers the detector's current (last) frame: let it pass, then clear
        # the counters and the mosaic so that they hold this scan only.
        yield from _settle(recon)
        if recon.has("ResetCounters"):
            yield from bps.abs_set(recon.signal("ResetCounters"), True, wait=True)
        if recon.has("MosaicReset"):
            yield from bps.abs_set(recon.signal("MosaicReset"), True, wait=True)
        settings: list[Any] = [det.image_mode, "Multiple", det.num_images, num, det.scan_points, num,
                               det.scan_step, step]
        if period is not None:
            settings += [det.acquire_period, period]
        yield from bps.mv(*settings)
        yield from bps.trigger(det, wait=True)
        drain = timeout if timeout is not None else 30.0 + num * 0.02
        yield from wait_drained(recon, num, drain)
        yield from _mosaic_settled(recon)
        yield from bps.create("primary")
        yield from bps.read(det)
        yield from bps.read(recon)
        yield from bps.save()
        yield from bps.unstage(recon, wait=True)  # Enable=0 before the run closes

    @bpp.run_decorator(md=_md)
    def run() -> Plan:
        return (yield from _disable_on_error(recon, body()))

    return (yield from run())


def read_mosaic(docs: Iterable[tuple[str, dict]], recon_name: str = "recon") -> np.ndarray | None:
    """The mosaic of the last event in a list of (name, doc) pairs from a RunEngine callback."""
    mosaic = None
    for name, doc in docs:
        if name == "event" and f"{recon_name}-mosaic" in doc["data"]:
            mosaic = np.asarray(doc["data"][f"{recon_name}-mosaic"])
    return mosaic
