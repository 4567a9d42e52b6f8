"""CA front end: a caproto PVGroup generated from db/, backed by a :class:`DeviceState`.

The generated class reads like a record list: one ``pvproperty`` per record, with
type, units, precision, limits and enum strings taken from db/. Long strings are
served as char waveforms (``caget -S``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from caproto import AlarmSeverity, ChannelType
from caproto.server import PVGroup, pvproperty
from caproto.server.records import records as _caproto_records

from ptychostream.core.device import Busy, DeviceState, PutError, Reading
from ptychostream.core.pvdb import PVSpec

__all__ = ["make_group_class", "CAFrontEnd"]

_log = logging.getLogger(__name__)


def _property(spec: PVSpec, reading: Reading) -> pvproperty:
    kw: dict[str, Any] = {
        "name": spec.suffix,
        "doc": spec.desc,
        "read_only": not spec.writable,
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
                result = group.device.put(spec.suffix, value)
            except PutError as exc:
                raise ValueError(str(exc)) from None
            if isinstance(result, Busy):  # put-callback completes when the device is done
                await asyncio.wrap_future(result.done)
                result = group.device.get(spec.suffix)  # e.g. Acquire is back to 0
            return group.to_ca(spec, result)

        prop = prop.putter(putter)
    return prop


class DevicePVGroup(PVGroup):
    """Base of the generated groups: mirrors DeviceState changes into caproto."""

    device: DeviceState

    def __init__(self, *args, device: DeviceState, **kwargs) -> None:
        self.device = device
        super().__init__(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        n = len(self.prefix)
        self._by_suffix = {name[n:]: inst for name, inst in self.pvdb.items() if name[n:] in device.db}
        device.subscribe(self._on_change)

    @staticmethod
    def to_ca(spec: PVSpec, value: Any) -> Any:
        return spec.enum_strs[value] if spec.kind == "enum" else value

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start mirroring; values that changed since the group was built are written now."""
        self._loop = loop
        for suffix, reading in self.device.readings().items():
            if suffix in self._by_suffix:
                self._schedule(self.device.db[suffix], reading)

    def _on_change(self, spec: PVSpec, reading: Reading) -> None:
        if self._loop is None or spec.suffix not in self._by_suffix:
            return
        self._loop.call_soon_threadsafe(self._schedule, spec, reading)

    def _schedule(self, spec: PVSpec, reading: Reading) -> None:
        asyncio.ensure_future(self._write(spec, reading))

    async def _write(self, spec: PVSpec, reading: Reading) -> None:
        instance = self._by_suffix[spec.suffix]
        value = self.to_ca(spec, reading.value)
        severity = AlarmSeverity(min(reading.severity, 3))
        try:
            if instance.value != value or instance.severity != severity:
                await instance.write(value, verify_value=False, severity=severity,
                                     timestamp=reading.timestamp)
        except Exception:
            _log.exception("CA update of %s failed", spec.suffix)


def make_group_class(device: DeviceState, name: str = "ReconstructorGroup") -> type[DevicePVGroup]:
    """Generate the PVGroup subclass for ``device.db`` (one pvproperty per CA-capable record)."""
    readings = device.readings()
    attrs: dict[str, Any] = {"__doc__": f"Generated from {device.db.source.name}"}
    for spec in device.db.for_protocol("ca"):
        attrs[spec.suffix.replace(":", "_")] = _property(spec, readings[spec.suffix])
    return type(name, (DevicePVGroup,), attrs)


class CAFrontEnd:
    """Builds the group instance and its pvdb for a caproto asyncio server."""

    def __init__(self, device: DeviceState, prefix: str) -> None:
        cls = make_group_class(device)
        self.group = cls(prefix=prefix, device=device)

    @property
    def pvdb(self) -> dict[str, Any]:
        return self.group.pvdb

    async def run(self, interfaces: list[str] | None = None) -> None:
        """Serve until cancelled (interfaces and ports from EPICS_CAS_* / EPICS_CA_*)."""
        from caproto import get_server_address_list
        from caproto.asyncio.server import Context

        self.group.bind_loop(asyncio.get_running_loop())
        ctx = Context(self.pvdb, interfaces or get_server_address_list())
        await ctx.run(log_pv_names=False)
