"""PVA front end: one p4p SharedPV per db/ record, all backed by a :class:`DeviceState`.

A record's aliases (``alias()`` in db/) are served as the same SharedPV: one value, one handler.
"""

from __future__ import annotations

import logging
from typing import Any

from p4p import Value
from p4p.nt import NTEnum, NTNDArray, NTScalar, NTTable
from p4p.server import Server
from p4p.server.thread import SharedPV

from ptychostream.core.device import Busy, DeviceState, PutError, Reading
from ptychostream.core.frames import ImageFrame
from ptychostream.core.pvdb import PVSpec
from ptychostream.protocols import ntnd

__all__ = ["PVAFrontEnd"]

_log = logging.getLogger(__name__)


def _nt_for(spec: PVSpec):
    if spec.kind == "float":
        return NTScalar("d", display=True, control=True, valueAlarm=False, form=True)
    if spec.kind == "int":
        return NTScalar("i", display=True, control=True, form=True)
    if spec.kind == "enum":
        return NTEnum(display=True)
    if spec.kind == "string":
        return NTScalar("s", display=True)
    if spec.kind == "table":
        return NTTable(columns=_table_columns(spec))
    return NTNDArray()


def _table_columns(spec: PVSpec) -> list[tuple[str, str]]:
    """``info(ptychostream:nttable, "uniqueId:i x:d y:d")`` -> p4p column spec."""
    cols = (col.partition(":") for col in spec.info["ptychostream:nttable"].split())
    return [(name, code) for name, _, code in cols]


def _initial(spec: PVSpec, reading: Reading) -> dict[str, Any]:
    """A full first value with display/control metadata from db/."""
    val: dict[str, Any] = {
        "alarm.severity": reading.severity,
        "alarm.message": reading.message,
        "display.description": spec.desc,
    }
    if spec.kind in ("float", "int"):
        val.update({
            "value": reading.value,
            "display.units": spec.egu,
            "display.limitLow": spec.lopr,
            "display.limitHigh": spec.hopr,
            "display.precision": spec.prec,
            "control.limitLow": spec.drvl if spec.drvl is not None else 0,
            "control.limitHigh": spec.drvh if spec.drvh is not None else 0,
        })
    elif spec.kind == "enum":
        val["value.index"] = reading.value
        val["value.choices"] = list(spec.enum_strs)
    else:
        val["value"] = reading.value
        val["display.units"] = spec.egu
    return val


class _Handler:
    def __init__(self, frontend: "PVAFrontEnd", spec: PVSpec) -> None:
        self.frontend = frontend
        self.spec = spec

    def put(self, pv: SharedPV, op) -> None:
        device = self.frontend.device
        try:
            raw: Value = op.value().raw if hasattr(op.value(), "raw") else op.value()
            result = None
            if self.spec.kind == "image":
                device.put_image(self.spec.suffix, _decoded(device, self.spec.suffix, raw))
            elif self.spec.kind == "enum":
                result = device.put(self.spec.suffix, raw["value.index"])
            else:
                result = device.put(self.spec.suffix, raw["value"])
            if isinstance(result, Busy):  # completes when the device says so
                result.done.add_done_callback(
                    lambda f: op.done(error=str(f.exception())) if f.exception() else op.done())
                return
        except (PutError, ntnd.FrameError) as exc:
            op.done(error=str(exc))
            return
        except Exception as exc:  # never leave a client hanging
            _log.exception("put to %s failed", self.spec.suffix)
            op.done(error=f"internal error: {exc}")
            return
        op.done()


def _decoded(device: DeviceState, suffix: str, raw: Value) -> ImageFrame:
    """The frame a client put to an image PV; one that does not decode is accounted for by the device
    (:meth:`DeviceState.put_bad_image`, which raises PutError with the reason for the client)."""
    try:
        return ntnd.decode(raw)
    except ntnd.FrameError as exc:
        reason = str(exc)
    except Exception as exc:  # a structure the codec did not foresee
        reason = f"undecodable NTNDArray ({type(exc).__name__}: {exc})"
    device.put_bad_image(suffix, reason)


class PVAFrontEnd:
    """Serves every PVA-capable PV of ``device.db`` under ``prefix``."""

    def __init__(self, device: DeviceState, prefix: str) -> None:
        self.device = device
        self.prefix = prefix
        self.pvs: dict[str, SharedPV] = {}
        readings = device.readings()
        for spec in device.db.for_protocol("pva"):
            nt = _nt_for(spec)
            handler = _Handler(self, spec)  # read-only PVs answer puts with a clear refusal
            if spec.kind in ("image", "table"):  # we build these Values ourselves
                pv = SharedPV(handler=handler, wrap=_as_is, unwrap=_as_is)
                pv.nt = nt
                pv.open(nt.wrap(_empty_image(spec)) if spec.kind == "image" else _table_value(nt, spec, {}))
            else:
                pv = SharedPV(nt=nt, handler=handler)
                pv.open(nt.wrap(_initial(spec, readings[spec.suffix]), timestamp=readings[spec.suffix].timestamp))
            self.pvs[spec.suffix] = pv
        device.subscribe(self._on_change, replay=True)  # values that changed while we were building
        device.add_image_sink(self._on_image)

    @property
    def provider(self) -> dict[str, SharedPV]:
        """Every PV by its full name, each alias of a record naming the record's own SharedPV."""
        names = {self.prefix + name: pv for name, pv in self.pvs.items()}
        names.update({self.prefix + alias: self.pvs[target] for alias, target in self.device.db.aliases().items()
                      if target in self.pvs})
        return names

    def _on_change(self, spec: PVSpec, reading: Reading) -> None:
        pv = self.pvs.get(spec.suffix)
        if pv is None:
            return
        update: dict[str, Any] = {"alarm.severity": reading.severity, "alarm.message": reading.message}
        if spec.kind == "enum":
            update["value.index"] = reading.value
        else:
            update["value"] = reading.value
        pv.post(update, timestamp=reading.timestamp)

    def _on_image(self, spec: PVSpec, frame: ImageFrame | dict) -> None:
        pv = self.pvs.get(spec.suffix)
        if pv is None:
            return
        if isinstance(frame, ImageFrame):
            pv.post(ntnd.encode(frame))
        else:  # a table's columns
            pv.post(_table_value(pv.nt, spec, frame))

    def server(self, conf: dict[str, str] | None = None) -> Server:
        """Start a p4p server for these PVs (EPICS_PVAS_* from the environment, ``conf`` on top)."""
        return Server(providers=[self.provider], conf=conf, useenv=True)


def _as_is(value, **_kws):
    return value


def _table_value(nt: NTTable, spec: PVSpec, columns: dict) -> Value:
    import time

    import numpy as np

    cols = _table_columns(spec)
    value = Value(nt.type, {
        "labels": [name for name, _ in cols],
        "value": {name: np.asarray(columns.get(name, []), dtype={"i": np.int32, "d": np.float64, "l": np.int64}[code])
                  for name, code in cols},
    })
    sec, frac = divmod(time.time(), 1.0)
    value["timeStamp"] = {"secondsPastEpoch": int(sec), "nanoseconds": int(frac * 1e9)}
    return value


def _empty_image(spec: PVSpec):
    import numpy as np

    dtype = {"FLOAT": np.float32, "DOUBLE": np.float64, "USHORT": np.uint16}.get(spec.ftvl, np.float32)
    return np.zeros((0, 0), dtype=dtype)
