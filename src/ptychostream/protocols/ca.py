"""CA front end: a caproto PVGroup generated from db/, backed by a :class:`DeviceState`.

The generated class reads like a record list: one ``pvproperty`` per record, with
type, units, precision, limits and enum strings taken from db/, and the record fields a
client reads (``NAME.EGU``, ``.PREC``, ``.HOPR/.LOPR``, ``.DRVH/.DRVL``, ``.DESC``, ``.SIZV``,
the state strings and severities) answered as EPICS record support answers them (:func:`record_fields`).
Long strings are served as char waveforms (``caget -S``, also as ``NAME.VAL$``).

Puts. Every CA put to a PV of the device, the readbacks' included, goes through the device's own
put path (:meth:`DeviceState.put`, as PVA puts do): the wire value is converted as an IOC's
``dbPut`` converts it (text to a number, a double to an integer truncated; :func:`from_wire`),
then validated against db/ and handled by the device. A refused put is counted in
``RefusedPuts_RBV`` and explained in ``Message_RBV``, whatever the reason, and the client gets
an error as from a real IOC (:class:`CACircuit`): a put-callback completes with ``ECA_PUTFAIL``,
a plain put gets an ``ECA_PUTFAIL`` error message. The record fields taken from db/ are fixed:
a put to one is refused the same way.

Threads. caproto runs on one asyncio loop and is not thread-safe, while the device state
changes on any thread (p4p's, the inference and stitch threads). Every change is marshalled
onto the loop (``call_soon_threadsafe``) into one queue that a single writer task drains in
order, so nothing but that task writes to caproto. CA puts run the device's put path on
one worker thread in arrival order, off the loop: a put handler never stalls CA.

A record's aliases (``alias()`` in db/) are more names in the pvdb for the same caproto instance:
one value, one alarm, one put path, its fields (``ALIAS.EGU``) the record's.

Each PV has its own alarm (``alarm_group``): caproto's default puts every pvproperty of a
group on one shared alarm, so an alarm written on one PV was shown, and published, on all.

:class:`CAServer` is caproto's asyncio server with its subscription fan-out fixed (see
:meth:`CAServer._subscription_queue_iteration`) and a release that leaves nothing behind
when it stops, so :func:`ptychostream.protocols.server.serve` can start a new one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

import caproto as ca
import numpy as np
from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.asyncio.server import Context, VirtualCircuit
from caproto.server import PVGroup, pvproperty
from caproto.server.records import records as _caproto_records

from ptychostream.core.device import Busy, DeviceState, PutError, Reading
from ptychostream.core.pvdb import MBB_STATES, SEVERITY_NAMES, PVSpec

__all__ = ["CACircuit", "CAFrontEnd", "CAServer", "PutWorker", "ca_limits", "from_wire", "make_group_class",
           "record_fields"]

_log = logging.getLogger(__name__)


#: a record's DESC reaches a CA client as a DBR_STRING, 40 bytes with its NUL: 39 characters
_DESC_CHARS = 39


#: the units of a DBR_GR/DBR_CTRL reply are 8 bytes with their NUL (MAX_UNITS_SIZE): 7 characters
_UNITS_CHARS = 7


def ca_limits(spec: PVSpec) -> tuple[float, float, float, float]:
    """``(lower_disp, upper_disp, lower_ctrl, upper_ctrl)`` of a numeric record's VAL, as EPICS record
    support reports them (tests/test_ca_conformance.py compares them with softioc's): display limits
    LOPR/HOPR; control limits DRVL/DRVH for an ao, for a longout DRVL/DRVH when DRVH > DRVL and
    LOPR/HOPR otherwise, LOPR/HOPR for an input record."""
    lo, hi = spec.drvl or 0.0, spec.drvh or 0.0
    if spec.rtyp == "ao" or (spec.rtyp in ("longout", "int64out") and hi > lo):
        return spec.lopr, spec.hopr, lo, hi
    return spec.lopr, spec.hopr, spec.lopr, spec.hopr


def record_fields(spec: PVSpec) -> dict[str, Any]:
    """The fields of ``spec``'s record that db/ sets, by name, with the values a real IOC serves
    for them (a field that db/ leaves out has its record type's default: 0, "" or NO_ALARM)."""
    fields: dict[str, Any] = {"DESC": spec.desc[:_DESC_CHARS]}
    if spec.kind in ("float", "int"):
        fields.update(EGU=spec.egu, HOPR=spec.hopr, LOPR=spec.lopr)
        # no alarm limits in db/: 0 with NO_ALARM, as a record's defaults (caproto's are MINOR/MAJOR)
        fields.update(HIHI=0.0, HIGH=0.0, LOW=0.0, LOLO=0.0, HHSV="NO_ALARM", HSV="NO_ALARM", LSV="NO_ALARM",
                      LLSV="NO_ALARM")
        if spec.kind == "float":
            fields["PREC"] = spec.prec
        if spec.writable:
            fields.update(DRVH=spec.drvh or 0.0, DRVL=spec.drvl or 0.0)
    elif spec.rtyp in ("bo", "bi"):
        names = (*spec.enum_strs, "", "")[:2]
        sevr = (*spec.enum_sevr, 0, 0)[:2]
        fields.update(ZNAM=names[0], ONAM=names[1], ZSV=SEVERITY_NAMES[sevr[0]], OSV=SEVERITY_NAMES[sevr[1]])
    elif spec.kind == "enum":
        for i, state in enumerate(MBB_STATES):
            fields[f"{state}ST"] = spec.enum_strs[i] if i < len(spec.enum_strs) else ""
            fields[f"{state}SV"] = SEVERITY_NAMES[spec.enum_sevr[i] if i < len(spec.enum_sevr) else 0]
    elif spec.kind == "string":
        fields["SIZV"] = spec.max_length
    return fields


def _chars(item: Any) -> bytes:
    """One DBR_STRING element of a put, up to its NUL."""
    raw = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return raw.split(b"\0", 1)[0]


def from_wire(spec: PVSpec, data: Any, data_type: ChannelType) -> Any:
    """A CA put's payload as the value the device validates, converted as an IOC's ``dbPut`` does.

    A long string takes the bytes of a char array or of a DBR_STRING (the device decodes them, up to
    the NUL) or a number, written as text; a number takes a number (an integer record truncates a
    double) or text that parses as one; an enum takes an index or a state's name. Raises PutError
    when there is nothing to convert or the text is not a number.
    """
    items = [data] if isinstance(data, (bytes, str)) else list(data)
    if not items:
        raise PutError(f"{spec.suffix}: a put with no value")
    if spec.kind == "string":
        if data_type == ChannelType.CHAR:
            return np.asarray(data).astype(np.uint8).tobytes()
        if data_type == ChannelType.STRING:
            return _chars(items[0])
        number = items[0]
        return f"{float(number):g}" if data_type in (ChannelType.DOUBLE, ChannelType.FLOAT) else str(int(number))
    if data_type == ChannelType.STRING:
        text = _chars(items[0]).decode("utf-8", errors="replace").strip()
        if spec.kind == "enum":
            return text
        try:
            return int(text, 10) if spec.kind == "int" else float(text)
        except ValueError:
            pass
        try:
            number = float(text)  # "1e3" to an integer record, as dbConvert parses it
        except ValueError:
            raise PutError(f"{spec.suffix} takes a number, not {text!r}") from None
    else:
        number = items[0].item() if isinstance(items[0], np.generic) else items[0]
    if spec.kind == "float":
        return float(number)
    if isinstance(number, float) and math.isfinite(number):
        return math.trunc(number)  # a C cast, as dbConvert's double to long
    return number  # an integer, or a non-finite float that the device refuses


async def _refuse_plain_puts(group: PVGroup, instance: Any, value: Any) -> Any:
    raise PutError("CA puts to the device are served by CAServer")


def _property(spec: PVSpec, reading: Reading) -> pvproperty:
    kw: dict[str, Any] = {
        "name": spec.suffix,
        "doc": spec.desc,
        # writable over CA even for a readback, as a record is: the device refuses the put, counts and explains it
        "read_only": False,
        "alarm_group": spec.suffix,  # its own alarm, not the group's shared one
    }
    if spec.rtyp in _caproto_records:
        kw["record"] = spec.rtyp
    if spec.kind in ("float", "int"):
        disp_lo, disp_hi, ctrl_lo, ctrl_hi = ca_limits(spec)
        kw.update(
            dtype=ChannelType.DOUBLE if spec.kind == "float" else ChannelType.LONG,
            value=reading.value,
            units=spec.egu[:_UNITS_CHARS],
            lower_disp_limit=disp_lo,
            upper_disp_limit=disp_hi,
            lower_ctrl_limit=ctrl_lo,
            upper_ctrl_limit=ctrl_hi,
        )
        if spec.kind == "float":  # an ai/ao reports an alarm limit whose severity is NO_ALARM as NaN
            kw.update(precision=spec.prec, lower_alarm_limit=math.nan, lower_warning_limit=math.nan,
                      upper_warning_limit=math.nan, upper_alarm_limit=math.nan)
    elif spec.kind == "enum":
        kw.update(dtype=ChannelType.ENUM, enum_strings=list(spec.enum_strs),
                  value=spec.enum_strs[reading.value])
    elif spec.kind == "string":
        kw.update(dtype=ChannelType.CHAR, max_length=spec.max_length,
                  string_encoding="utf-8", value=reading.value)
    else:
        raise ValueError(f"{spec.suffix}: images are PVA-only")
    prop = pvproperty(**kw)
    # puts reach the device through CACircuit; a plain caproto server must not store them past it
    return prop.putter(_refuse_plain_puts)


class PutWorker:
    """One daemon thread that runs calls in the order they were submitted (the CA puts, off the loop).

    A daemon, so that a put handler stuck on a dead disk cannot hold the process at exit.
    """

    def __init__(self, name: str = "ptychostream-ca-put") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """``fn(*args)`` on the worker; the future holds its result or exception."""
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while True:
            fut, fn, args = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever awaits the put
                fut.set_exception(exc)


class DevicePVGroup(PVGroup):
    """Base of the generated groups: mirrors DeviceState changes into caproto."""

    device: DeviceState

    def __init__(self, *args, device: DeviceState, **kwargs) -> None:
        self.device = device
        super().__init__(*args, **kwargs)
        self.puts = PutWorker()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._updates: asyncio.Queue | None = None
        n = len(self.prefix)
        self._by_suffix = {name[n:]: inst for name, inst in self.pvdb.items() if name[n:] in device.db}
        for alias, target in device.db.aliases().items():  # the same instance under another name
            if target in self._by_suffix:
                self.pvdb[self.prefix + alias] = self._by_suffix[target]
        #: the caproto instances whose puts the device answers: a PV's value, by id, and its db/ fields
        self._targets: dict[int, PVSpec] = {id(inst): device.db[sfx] for sfx, inst in self._by_suffix.items()}
        self._fixed: dict[int, str] = {}
        self._fields: list[tuple[Any, Any]] = []
        #: the .PROC fields: processing a record applies nothing more (the device applied the put)
        self._process: set[int] = {id(inst.fields["PROC"]) for inst in self._by_suffix.values()
                                   if inst.fields and "PROC" in inst.fields}
        for suffix, inst in self._by_suffix.items():
            for name, value in record_fields(device.db[suffix]).items():
                fld = inst.fields.get(name) if inst.fields else None
                if fld is None:
                    _log.debug("caproto's %s record has no %s field", device.db[suffix].rtyp, name)
                    continue
                fld.getter = None  # caproto links some (HOPR to the control limit, ...) to the wrong value
                self._fixed[id(fld)] = f"{suffix}.{name}"
                self._fields.append((fld, value))
        device.subscribe(self._on_change)

    @staticmethod
    def to_ca(spec: PVSpec, value: Any) -> Any:
        return spec.enum_strs[value] if spec.kind == "enum" else value

    async def write_fields(self) -> None:
        """Give the record fields their db/ values (before the server answers a client)."""
        for fld, value in self._fields:
            if not isinstance(value, str):
                value = int(value) if fld.data_type in (ChannelType.LONG, ChannelType.INT) else float(value)
            try:
                await fld.write(value, verify_value=False)
            except Exception:
                _log.exception("CA field %s: could not set %r", self._fixed[id(fld)], value)

    def owns(self, entry: Any) -> bool:
        """Whether puts to the caproto instance ``entry`` are the device's to answer."""
        return id(entry) in self._targets or id(entry) in self._fixed or id(entry) in self._process

    async def ca_put(self, entry: Any, data: Any, data_type: ChannelType) -> str | None:
        """A CA put to ``entry`` (see :meth:`owns`) through the device's put path: None when done, or
        why it was refused (counted and explained by then). Completes when the device is done (Busy)."""
        if id(entry) in self._process:
            return None
        fixed = self._fixed.get(id(entry))
        if fixed is not None:
            reason = f"{fixed} is set by db/"
            self.device.refused(f"put refused: {reason}")
            return reason
        spec = self._targets[id(entry)]
        try:
            value = from_wire(spec, data, data_type)
        except PutError as exc:
            self.device.refused(f"put refused: {exc}")
            return str(exc)
        try:
            result = await asyncio.wrap_future(self.puts.submit(self.device.put, spec.suffix, value))
        except PutError as exc:  # counted and explained by the device
            return str(exc)
        except Exception as exc:  # a handler's failure is a refusal too
            _log.exception("CA put to %s failed", spec.suffix)
            self.device.refused(f"put to {spec.suffix} failed: {exc}")
            return f"{spec.suffix}: {exc}"
        if isinstance(result, Busy):  # put-callback completes when the device is done
            try:
                await asyncio.wrap_future(result.done)
            except Exception as exc:  # the device counted and explained it
                return str(exc)
        await self._caught_up()  # a get right after the put's reply reads what the put did
        return None

    async def _caught_up(self, timeout: float = 5.0) -> None:
        """Wait until the mirror task has written every change announced so far (in order: a monitor
        never sees an older value after a newer one)."""
        if self._updates is None or self._loop is None:
            return
        marker = asyncio.get_running_loop().create_future()
        self._updates.put_nowait((None, marker))
        try:
            await asyncio.wait_for(marker, timeout)
        except TimeoutError:
            _log.warning("CA mirror %.0f s behind the device", timeout)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start mirroring (on ``loop``); values that changed since the group was built, or while it
        was not bound, are written first."""
        if self._updates is None:
            self._updates = asyncio.Queue()
        self._loop = loop  # first: a change made while the snapshot is taken comes after it
        for suffix, reading in self.device.readings().items():
            if suffix in self._by_suffix:
                self._updates.put_nowait((self.device.db[suffix], reading))

    def unbind(self) -> None:
        """Stop mirroring: changes from now on are not written (a later :meth:`bind_loop` catches up)."""
        self._loop = None

    def _on_change(self, spec: PVSpec, reading: Reading) -> None:
        """A DeviceState listener (any thread): hand the change to the loop, never touch caproto here."""
        loop, updates = self._loop, self._updates
        if loop is None or updates is None or spec.suffix not in self._by_suffix:
            return
        try:
            loop.call_soon_threadsafe(updates.put_nowait, (spec, reading))
        except RuntimeError:  # the loop closed under us: the CA server is gone
            pass

    async def mirror(self) -> None:
        """The one task that writes device changes into caproto, in the order they happened."""
        assert self._updates is not None, "bind_loop() first"
        while True:
            spec, reading = await self._updates.get()
            if spec is None:  # a put waiting for the changes before it (see _caught_up)
                if not reading.done():
                    reading.set_result(None)
                continue
            await self._write(spec, reading)

    async def _write(self, spec: PVSpec, reading: Reading) -> None:
        """Write a reading into its instance; a monitor fires only if its value or its alarm changed."""
        instance = self._by_suffix[spec.suffix]
        value = self.to_ca(spec, reading.value)
        severity = AlarmSeverity(min(reading.severity, 3))
        try:
            if severity != instance.severity:
                await instance.write(value, verify_value=False, severity=severity, status=_status(spec, reading),
                                     timestamp=reading.timestamp)
            elif instance.value != value:  # an alarm write publishes to every field: only when it changed
                await instance.write(value, verify_value=False, timestamp=reading.timestamp)
        except Exception:
            _log.exception("CA update of %s failed", spec.suffix)


def _status(spec: PVSpec, reading: Reading) -> AlarmStatus:
    """The alarm status that goes with a reading's severity: STATE for an enum's state severity
    (as mbbi/bi records raise it), SOFT for one the device set, NO_ALARM without one."""
    if reading.severity <= 0:
        return AlarmStatus.NO_ALARM
    if spec.kind == "enum" and spec.severity_of(reading.value) == reading.severity:
        return AlarmStatus.STATE
    return AlarmStatus.SOFT


def make_group_class(device: DeviceState, name: str = "ReconstructorGroup") -> type[DevicePVGroup]:
    """Generate the PVGroup subclass for ``device.db`` (one pvproperty per CA-capable record)."""
    readings = device.readings()
    attrs: dict[str, Any] = {"__doc__": f"Generated from {device.db.source.name}"}
    for spec in device.db.for_protocol("ca"):
        attrs[spec.suffix.replace(":", "_")] = _property(spec, readings[spec.suffix])
    return type(name, (DevicePVGroup,), attrs)


def _runs_method_of(task: asyncio.Task, owners: set[int]) -> bool:
    """Whether ``task`` runs a method of one of the objects whose ``id`` is in ``owners``."""
    frame = getattr(task.get_coro(), "cr_frame", None)
    return frame is not None and id(frame.f_locals.get("self")) in owners


class CACircuit(VirtualCircuit):
    """caproto's asyncio circuit, with the puts to the device's PVs answered as a real IOC's rsrv does.

    caproto answers a put that raised with an error message, also to a put-callback, which then
    never completes for caproto's own client and completes as a success for libca; its conversion
    and limit checks run before the device sees the value, so those refusals were neither counted
    nor explained, and a failed check set a MAJOR WRITE alarm on the PV. Here the put goes to
    :meth:`DevicePVGroup.ca_put` (in a task, as caproto runs its writes); a put-callback completes
    with ECA_NORMAL or ECA_PUTFAIL, a plain put that fails gets an ECA_PUTFAIL error message.
    """

    async def _process_command(self, command: Any) -> Any:
        if isinstance(command, (ca.WriteRequest, ca.WriteNotifyRequest)) \
                and command.data_type not in (ChannelType.PUT_ACKT, ChannelType.PUT_ACKS):
            group = getattr(self.context, "group", None)
            chan, entry = self._get_db_entry_from_command(command)
            if group is not None and group.owns(entry):
                async def handle_write() -> None:
                    try:
                        await self._device_write(group, command, chan, entry)
                    finally:
                        self.write_event.set()

                self.write_event.clear()  # a read waits (briefly) for the put, as caproto's own writes do
                await self._start_write_task(handle_write)
                return []
        return await super()._process_command(command)

    async def _device_write(self, group: DevicePVGroup, command: Any, chan: Any, entry: Any) -> None:
        try:
            refused = await group.ca_put(entry, command.data, command.data_type)
        except Exception as exc:  # not the device's refusal: a fault here; the client still gets an answer
            _log.exception("CA put to %s failed", chan.name)
            refused = f"{type(exc).__name__}: {exc}"
        if isinstance(command, ca.WriteNotifyRequest):
            status = ca.CAStatus.ECA_NORMAL if refused is None else ca.CAStatus.ECA_PUTFAIL
            await self.send(chan.write(ioid=command.ioid, status=status, data_count=entry.length))
        elif refused is not None:
            await self.send(ca.ErrorResponse(command, chan.cid, status=ca.CAStatus.ECA_PUTFAIL,
                                             error_message=refused))


class CAServer(Context):
    """caproto's asyncio server with three repairs.

    - Puts to the device's PVs are answered by :class:`CACircuit` (``group``: the
      :class:`DevicePVGroup` whose PVs it serves).

    - The subscription fan-out iterates over a copy of a PV's subscriptions. caproto 1.3 iterates
      over the live deque and waits, between two subscribers, on each client's bounded send queue
      (``CAPROTO_MAX_TOTAL_SUBSCRIPTION_BACKLOG``); a client subscribing or cancelling meanwhile
      (PyDM opening a screen) mutated the deque and ended the server with ``RuntimeError: deque
      mutated during iteration``. Updates queued for a subscription cancelled meanwhile are culled
      by caproto before they are sent.
    - When it stops, for whatever reason, it releases everything it holds (the listening sockets'
      readers, its clients, its tasks, its subscriptions on the shared PV instances), so another
      server can serve the same PVs at once. caproto releases all that only when cancelled.
    """

    CircuitClass = CACircuit

    def __init__(self, pvdb: dict[str, Any], interfaces: list[str] | None = None, *,
                 group: DevicePVGroup | None = None) -> None:
        super().__init__(pvdb, interfaces)
        self.group = group

    async def _subscription_queue_iteration(self, sub_specs, metadata, values, flags, sub) -> None:
        if sub is not None:  # a new subscription's first value
            await super()._subscription_queue_iteration(sub_specs, metadata, values, flags, sub)
            return
        for sub_spec in sub_specs:
            for one in tuple(self.subscriptions[sub_spec]):
                await self._subscription_queue_send(sub_spec, one, metadata=metadata, values=values, flags=flags)

    @property
    def shutdown_methods(self) -> dict[str, Callable]:
        """caproto calls these on its way out, before it closes its sockets (both after a failure and
        when cancelled)."""
        return {**super().shutdown_methods, "ptychostream.release": self._release}

    async def _release(self, async_lib: Any = None) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.tcp_sockets.values():
            loop.remove_reader(sock.fileno())  # before caproto closes it under the selector
        for sub_spec in list(self.subscriptions):
            await sub_spec.db_entry.unsubscribe(self.subscription_queue, sub_spec)
        circuits = list(self.circuits)
        for circuit in circuits:
            circuit.client.close()
        owners = {id(self), *(id(c) for c in circuits)}
        me = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not me and _runs_method_of(task, owners):
                task.cancel()


class CAFrontEnd:
    """Builds the group instance and its pvdb; :meth:`run` serves it with a :class:`CAServer`.

    ``context`` is the server running now (None between two); ``restarts`` counts the restarts
    after a failure (``serve`` does them).
    """

    def __init__(self, device: DeviceState, prefix: str) -> None:
        cls = make_group_class(device)
        self.group = cls(prefix=prefix, device=device)
        self.context: CAServer | None = None
        self.restarts = 0

    @property
    def pvdb(self) -> dict[str, Any]:
        return self.group.pvdb

    async def run(self, interfaces: list[str] | None = None) -> None:
        """Serve until cancelled or failed (interfaces and ports from EPICS_CAS_* / EPICS_CA_*)."""
        from caproto import get_server_address_list

        await self.group.write_fields()
        self.group.bind_loop(asyncio.get_running_loop())
        writer = asyncio.ensure_future(self.group.mirror())
        self.context = CAServer(self.pvdb, interfaces or get_server_address_list(), group=self.group)
        try:
            await self.context.run(log_pv_names=False)
        finally:
            self.group.unbind()
            writer.cancel()
            self.context = None
