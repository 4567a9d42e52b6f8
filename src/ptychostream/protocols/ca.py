"""CA front end: a caproto PVGroup generated from db/, backed by a :class:`DeviceState`.

The generated class reads like a record list: one ``pvproperty`` per record, with
type, units, precision, limits and enum strings taken from db/. Long strings are
served as char waveforms (``caget -S``).

Threads. caproto runs on one asyncio loop and is not thread-safe, while the device state
changes on any thread (p4p's, the inference and stitch threads). Every change is marshalled
onto the loop (``call_soon_threadsafe``) into one queue that a single writer task drains in
order, so nothing but that task writes to caproto. CA puts run the device's put path on
one worker thread in arrival order, off the loop: a put handler never stalls CA.

Each PV has its own alarm (``alarm_group``): caproto's default puts every pvproperty of a
group on one shared alarm, so an alarm written on one PV was shown, and published, on all.

:class:`CAServer` is caproto's asyncio server with its subscription fan-out fixed (see
:meth:`CAServer._subscription_queue_iteration`) and a release that leaves nothing behind
when it stops, so :func:`ptychostream.protocols.server.serve` can start a new one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from caproto import AlarmSeverity, ChannelType
from caproto.asyncio.server import Context
from caproto.server import PVGroup, pvproperty
from caproto.server.records import records as _caproto_records

from ptychostream.core.device import Busy, DeviceState, PutError, Reading
from ptychostream.core.pvdb import PVSpec

__all__ = ["make_group_class", "CAFrontEnd", "CAServer", "PutWorker"]

_log = logging.getLogger(__name__)


def _property(spec: PVSpec, reading: Reading) -> pvproperty:
    kw: dict[str, Any] = {
        "name": spec.suffix,
        "doc": spec.desc,
        "read_only": not spec.writable,
        "alarm_group": spec.suffix,  # its own alarm, not the group's shared one
    }
    if spec.rtyp in _caproto_records:
        kw["record"] = spec.rtyp
    if spec.kind in ("float", "int"):
        kw.update(
            dtype=ChannelType.DOUBLE if spec.kind == "float" else ChannelType.LONG,
            value=reading.value,
            units=spec.egu,
            lower_disp_limit=spec.lopr,
            upper_disp_limit=spec.hopr,
        )
        if spec.kind == "float":
            kw["precision"] = spec.prec
        if spec.drvl is not None and spec.drvh is not None:
            kw.update(lower_ctrl_limit=spec.drvl, upper_ctrl_limit=spec.drvh)
    elif spec.kind == "enum":
        kw.update(dtype=ChannelType.ENUM, enum_strings=list(spec.enum_strs),
                  value=spec.enum_strs[reading.value])
    elif spec.kind == "string":
        kw.update(dtype=ChannelType.CHAR, max_length=spec.max_length,
                  string_encoding="utf-8", value=reading.value)
    else:
        raise ValueError(f"{spec.suffix}: images are PVA-only")
    prop = pvproperty(**kw)

    if spec.writable:
        async def putter(group: "DevicePVGroup", instance, value):
            try:
                result = await asyncio.wrap_future(group.puts.submit(group.device.put, spec.suffix, value))
                if isinstance(result, Busy):  # put-callback completes when the device is done
                    await asyncio.wrap_future(result.done)
                    result = group.device.get(spec.suffix)  # e.g. Acquire is back to 0
            except PutError as exc:
                raise ValueError(str(exc)) from None
            return group.to_ca(spec, result)

        prop = prop.putter(putter)
    return prop


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
        device.subscribe(self._on_change)

    @staticmethod
    def to_ca(spec: PVSpec, value: Any) -> Any:
        return spec.enum_strs[value] if spec.kind == "enum" else value

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
            await self._write(spec, reading)

    async def _write(self, spec: PVSpec, reading: Reading) -> None:
        instance = self._by_suffix[spec.suffix]
        value = self.to_ca(spec, reading.value)
        severity = AlarmSeverity(min(reading.severity, 3))
        try:
            if severity != instance.severity:
                await instance.write(value, verify_value=False, severity=severity, timestamp=reading.timestamp)
            elif instance.value != value:  # an alarm write publishes to every field: only when it changed
                await instance.write(value, verify_value=False, timestamp=reading.timestamp)
        except Exception:
            _log.exception("CA update of %s failed", spec.suffix)


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


class CAServer(Context):
    """caproto's asyncio server with two repairs.

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

        self.group.bind_loop(asyncio.get_running_loop())
        writer = asyncio.ensure_future(self.group.mirror())
        self.context = CAServer(self.pvdb, interfaces or get_server_address_list())
        try:
            await self.context.run(log_pv_names=False)
        finally:
            self.group.unbind()
            writer.cancel()
            self.context = None
