"""Issue #16: Channel Access answers like a real EPICS IOC.

``softioc`` (pythonSoftIOC: EPICS base's IOC core, its record support and its CA server, rsrv)
loads the same db/ records with the same macros, beside a ptychostream reconstructor and a
simulated detector; for every CA record of db/reconstructor.db and db/simdetector.db the test
compares, over CA, the record fields (``NAME.FIELD``), the VAL's metadata (DBR_CTRL) and the result
of a set of puts (in range, out of range, of the wrong type, to a read-only record), and the
start-up value of every setpoint. Where ptychostream validates more than a plain record can, the
difference is in :data:`DEVICE_REFUSES` (or :data:`DEVICE_VALUE`, :data:`SERVED_OTHERWISE`) with
its reason; nothing else may differ. Every put ptychostream refuses is counted in
``RefusedPuts_RBV`` with a message naming the PV. Then what a client sees of a refusal (libca's and
caproto's put-callback status), what reaches the device, and the per-PV alarms and monitors.

Both IOCs serve the records under their own ``P`` (one loopback network: a name served twice
would be ambiguous), with the same ``R``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import math
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, IOCProcess, next_slot, server_env, wait_for

from ptychostream.core.pvdb import MBB_STATES, PVSpec, load_db
from ptychostream.testing.loopback import free_port

# looked up, not imported: importing softioc starts an EPICS IOC core in this process, whose libCom/libca
# (epicscorelibs') then clash with pyepics' own (pyepics' monitors in later test modules never updated)
if importlib.util.find_spec("softioc") is None:
    pytest.skip("softioc (pythonSoftIOC) is in the test extra", allow_module_level=True)

pytestmark = pytest.mark.system

SOFT, PTY, R = "TST:SOFTIOC:", "TST:CONF:", "NN:"
DBS = {"reconstructor.db": R, "simdetector.db": ""}  # db file: its R ($(P) only in simdetector.db)

#: softioc in a subprocess: ``path@macros`` arguments, CA only; ``ready`` once iocInit is done
SOFTIOC_MAIN = """
import signal, sys, threading
from softioc import asyncio_dispatcher, softioc
for arg in sys.argv[1:]:
    path, macros = arg.split("@", 1)
    softioc.dbLoadDatabase(path, substitutions=macros)
softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher(), enable_pva=False)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
print("ready", flush=True)
stop.wait()
softioc.safeEpicsExit(0)
"""

#: the files whose put makes the device read them: a name it cannot read is refused
FILE_PVS = ("PreDarkPath", "PreMaskPath", "ProbeFile", "TrajectoryFile", "cam1:ObjectFile", "cam1:ProbeFile", "cam1:ReplayFile")

#: puts that ptychostream's device refuses although a plain record takes them: (record name or record
#: type, put label) -> why. Every other put must succeed on both or fail on both.
DEVICE_REFUSES: dict[tuple[str, str], str] = {
    **{(rtyp, "put"): "a readback is written by the device only: a put to it is refused and counted"
       for rtyp in ("ai", "longin", "bi", "mbbi", "lsi")},
    **{(rtyp, label): "outside DRVL..DRVH: refused (the device does not run at a value it was not given), "
                      "where an ao/longout record clamps it to the limit"
       for rtyp in ("ao", "longout") for label in ("above DRVH", "below DRVL")},
    **{(rtyp, "index past the states"): "an index with no state: refused, where a bo/mbbo takes it"
       for rtyp in ("bo", "mbbo")},
    ("lso", "SIZV chars"): "a string with no room for its NUL: refused (a path cut short names another file), "
                           "where an lso cuts it to SIZV-1 characters",
    **{(pv, label): "a file read when it is put: a name that is not a readable file is refused"
       for pv in FILE_PVS for label in ("text", "as DBR_STRING", "SIZV-1 chars")},
    ("RetrainStart", "index"): "starts a retrain: refused while there is no capture to train on",
    ("RetrainStart", "state name"): "starts a retrain: refused while there is no capture to train on",
}

#: puts that both take, after which ptychostream's value is not the one put: (record, put label) -> why
DEVICE_VALUE: dict[tuple[str, str], str] = {
    (pv, label): "an action: back to its first state (Done) once done"
    for pv in ("ResetCounters", "MosaicReset") for label in ("index", "state name")
}

#: what ptychostream serves otherwise than a record, over CA: (record kind, field) -> why
SERVED_OTHERWISE: dict[tuple[str, str], str] = {
    ("string", ""): "a long string is a char array at the record's name too (caget -S NAME reads all of it), "
                    "where an lso/lsi VAL is a 40-character DBR_STRING; NAME.VAL$ is the same on both",
}

#: a value every record takes with no side effect worth waiting for (a busy Acquire would wait for
#: the frames of an acquisition)
QUIET_ENUM = {"cam1:Acquire": 0, "Capture": 0}

#: fields read on every record (record_fields() adds the ones db/ sets for its type)
COMMON_FIELDS = ("RTYP", "DESC", "SCAN", "PINI", "DTYP")
ENUM_FIELDS = {"SCAN", "PINI", "DTYP", "ZSV", "OSV", "HHSV", "HSV", "LSV", "LLSV",
               *(f"{state}SV" for state in MBB_STATES)}


def ca_records(name: str) -> list[PVSpec]:
    return load_db(name).for_protocol("ca")


def softioc_copy(name: str, folder: Path) -> tuple[Path, list[str]]:
    """``db/name`` as softioc loads it, and the records changed on the way.

    The PVA-only records (images and tables: ptychostream serves no CA channel for them) are left
    out. An ``lso`` initial value given as ``field(VAL, ...)``, which a real IOC refuses before
    iocInit, would be rewritten as a constant DOL link and reported: neither db file needs it (the
    fixture asserts that), so db/ loads into a real IOC as it stands.
    """
    text = (ROOT / "db" / name).read_text()
    rewritten: list[str] = []

    def block(m: re.Match) -> str:
        rtyp, rec, body = m.group(1), m.group(2), m.group(3)
        if 'info(ptychostream:protocols, "pva")' in body:
            return ""
        if rtyp in ("lso", "lsi"):
            new = re.sub(r'field\(VAL, "([^"]*)"\)', r'field(DOL, {const:"\1"})', body)
            if new != body:
                rewritten.append(rec)
                body = new
        return f'record({rtyp}, "{rec}") {{{body}\n}}'

    text = re.sub(r'record\((\w+), "([^"]+)"\) \{(.*?)\n\}', block, text, flags=re.DOTALL)
    path = folder / name
    path.write_text(text)
    return path, rewritten


@pytest.fixture(scope="module")
def iocs(tmp_path_factory):
    """softioc with both db files, and a ptychostream reconstructor and simdet (CA on), started together."""
    folder = tmp_path_factory.mktemp("softioc-db")
    args = []
    for name, r in DBS.items():
        path, rewritten = softioc_copy(name, folder)
        assert not rewritten, f"db/{name} sets an lso VAL, which a real IOC refuses before iocInit: {rewritten}"
        args.append(f"{path}@P={SOFT},R={r}")
    # EPICS base runs a CA repeater in the IOC's process when it cannot start caRepeater: on a port of
    # its own, so that the clients here do not register with one that goes with softioc
    env = {**server_env(next_slot()), "EPICS_CA_REPEATER_PORT": str(free_port())}
    soft = subprocess.Popen([sys.executable, "-c", SOFTIOC_MAIN, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ours = [IOCProcess(["ioc", "--prefix", PTY + R], PTY + R, next_slot()),
            IOCProcess(["simdet", "--prefix", PTY], PTY, next_slot())]
    failed: list[BaseException] = []

    def start(ioc) -> None:
        try:
            ioc.start()
        except BaseException as exc:  # reported below, after the others are stopped
            failed.append(exc)

    starting = [threading.Thread(target=start, args=(ioc,)) for ioc in ours]
    try:
        for t in starting:
            t.start()
        log: list[str] = []
        assert soft.stdout is not None
        for line in soft.stdout:
            log.append(line.rstrip())
            if line.startswith("ready"):
                break
        else:
            raise RuntimeError("softioc did not start:\n" + "\n".join(log))
        threading.Thread(target=soft.stdout.read, daemon=True).start()  # keep its pipe drained
        for t in starting:
            t.join()
        if failed:
            raise failed[0]
        yield soft, *ours, setpoints()
    finally:
        for t in starting:
            t.join()
        stopping = [threading.Thread(target=ioc.stop) for ioc in ours]
        for t in stopping:
            t.start()
        soft.terminate()
        soft.wait(10)
        for t in stopping:
            t.join()
        if soft.stdout is not None:
            soft.stdout.close()


def caget_many(names: list[str], as_string: bool) -> list[Any]:
    """pyepics' ``caget_many``, its channels cleared afterwards: thousands of channels left searching for
    IOCs gone at the module's end would hold back the searches of every later pyepics client."""
    import epics
    from epics import ca

    try:
        return epics.caget_many(names, as_string=as_string, connection_timeout=10, timeout=10)
    finally:
        for name in names:
            ca.clear_channel(ca.create_channel(name, connect=False, auto_cb=False))


def setpoints() -> dict[tuple[str, str], Any]:
    """Every output record's value on both IOCs, by (prefix, suffix): taken at start-up, before a test puts."""
    keys = [(prefix, db, spec) for db, spec in all_records() if spec.writable for prefix in (SOFT, PTY)]
    got = {}
    for as_string in (False, True):  # enums by name, long strings (VAL$) as text
        part = [k for k in keys if (k[2].kind in ("enum", "string")) == as_string]
        names = [name_of(prefix, db, spec, "VAL$" if spec.kind == "string" else "") for prefix, db, spec in part]
        values = caget_many(names, as_string)
        got.update({(prefix, spec.suffix): v for (prefix, _, spec), v in zip(part, values)})
    return got


def test_start_up_setpoints_as_softioc(iocs):
    """The start-up value of every setpoint (VAL, or a constant DOL for an lso) is the same on both."""
    values = iocs[-1]
    diffs = [f"{suffix}: softioc {values[(SOFT, suffix)]!r}, ptychostream {values[(PTY, suffix)]!r}"
             for prefix, suffix in values if prefix == SOFT
             and (values[(SOFT, suffix)] is None or not same(values[(SOFT, suffix)], values[(PTY, suffix)]))]
    assert values[(SOFT, "PosAttrX")] == "PositionX" and values[(SOFT, "cam1:PosAttrY")] == "PositionY"
    assert not diffs, f"{len(diffs)} differ:\n" + "\n".join(diffs)


@pytest.fixture(scope="module")
def cactx(iocs):
    from caproto.threading.client import Context

    ctx = Context()
    yield ctx
    ctx.disconnect()


def name_of(prefix: str, db: str, spec: PVSpec, field: str = "") -> str:
    return prefix + DBS[db] + spec.suffix + (f".{field}" if field else "")


def all_records() -> list[tuple[str, PVSpec]]:
    return [(db, spec) for db in DBS for spec in ca_records(db)]


def fields_of(spec: PVSpec) -> list[str]:
    from ptychostream.protocols.ca import record_fields

    return [*COMMON_FIELDS, *(f for f in record_fields(spec) if f not in COMMON_FIELDS)]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            a, b = float(a), float(b)
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
        except (TypeError, ValueError):
            return False
    return a == b


# -- the database ------------------------------------------------------------------------------
def test_start_up_values_come_from_constant_dol_links(tmp_path):
    """An lso's VAL cannot be set before iocInit: db/ gives start-up values as constant DOL links, which
    the PV specs read (and a DOL that links to another PV, which ptychostream does not follow, is an
    error naming the file, the record and the field)."""
    sim = load_db("simdetector.db")
    assert sim["cam1:PosAttrX"].initial == "PositionX" and sim["cam1:PosAttrY"].initial == "PositionY"
    assert not softioc_copy("simdetector.db", tmp_path)[1], "an lso VAL in db/simdetector.db"
    (tmp_path / "t.db").write_text('record(lso, "$(P)A") {\n    field(SIZV, "64")\n    field(DOL, {const:"a b"})\n}\n'
                                   'record(ao, "$(P)B") {\n    field(DOL, "2.5")\n    field(VAL, "1")\n}\n'
                                   'record(lso, "$(P)C") {\n    field(SIZV, "64")\n    field(DOL, ["c"])\n}\n')
    db = load_db("t.db", str(tmp_path))
    assert (db["A"].initial, db["B"].initial, db["C"].initial) == ("a b", 2.5, "c")
    (tmp_path / "bad.db").write_text('record(lso, "$(P)A") {\n    field(DOL, "OTHER:PV")\n}\n')
    with pytest.raises(ValueError, match=r"bad\.db: record \$\(P\)A, field DOL: 'OTHER:PV' is a link"):
        load_db("bad.db", str(tmp_path))


# -- fields and metadata -------------------------------------------------------------------------
def test_every_record_field_as_softioc(iocs):
    asked = [(db, spec, f) for db, spec in all_records() for f in fields_of(spec)]
    t0 = time.monotonic()
    got = {}
    for as_string in (False, True):  # an enum field as its state's name, the others as they are
        part = [(prefix, *a) for a in asked if (a[2] in ENUM_FIELDS) == as_string for prefix in (SOFT, PTY)]
        got.update(zip(part, caget_many([name_of(*key) for key in part], as_string)))
    took = time.monotonic() - t0
    diffs = []
    for db, spec, f in asked:
        soft, pty = got[(SOFT, db, spec, f)], got[(PTY, db, spec, f)]
        if soft is None or not same(soft, pty):
            diffs.append(f"{spec.suffix}.{f}: softioc {soft!r}, ptychostream {pty!r}")
    print(f"\n{len(asked)} fields of {len(all_records())} records compared in {took:.1f} s")
    assert not diffs, f"{len(diffs)} fields differ:\n" + "\n".join(diffs)


def test_every_record_value_metadata_as_softioc(cactx):
    from caproto import ChannelType

    specs = all_records()
    names = [name_of(p, db, s, f) for db, s in specs for p in (SOFT, PTY)
             for f in ([""] if s.kind != "string" else ["", "VAL$"])]
    pvs = dict(zip(names, cactx.get_pvs(*names, timeout=5)))
    for pv in pvs.values():
        pv.wait_for_connection(timeout=10)
    diffs = []

    def describe(pv) -> dict[str, Any]:
        ch = pv.channel
        out: dict[str, Any] = {"type": ChannelType(ch.native_data_type).name, "count": ch.native_data_count}
        if ch.native_data_type in (ChannelType.STRING, ChannelType.CHAR):
            return out
        md = pv.read(data_type="control", timeout=5).metadata
        for key in ("units", "precision", "upper_disp_limit", "lower_disp_limit", "upper_ctrl_limit",
                    "lower_ctrl_limit", "upper_alarm_limit", "upper_warning_limit", "lower_warning_limit",
                    "lower_alarm_limit", "enum_strings"):  # not the alarm: softioc's records, never
            # processed, are UDF INVALID; ptychostream's values are the device's
            if hasattr(md, key):
                out[key] = getattr(md, key)
        return out

    allowed = 0
    for db, spec in specs:
        for f in ([""] if spec.kind != "string" else ["", "VAL$"]):
            soft = describe(pvs[name_of(SOFT, db, spec, f)])
            pty = describe(pvs[name_of(PTY, db, spec, f)])
            if (spec.kind, f) in SERVED_OTHERWISE:
                allowed += 1
                assert pty == {"type": "CHAR", "count": spec.max_length}, spec.suffix
                continue
            for key in soft.keys() | pty.keys():
                if not same(soft.get(key), pty.get(key)):
                    diffs.append(f"{spec.suffix}{'.' + f if f else ''} {key}: softioc {soft.get(key)!r}, "
                                 f"ptychostream {pty.get(key)!r}")
    print(f"\n{len(names)} channels compared; {allowed} served otherwise (allowed)")
    assert not diffs, f"{len(diffs)} differ:\n" + "\n".join(diffs)


# -- puts -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Put:
    label: str
    value: Any
    data_type: Any = None  # a caproto ChannelType, or None for the channel's native type
    field: str = ""  # "VAL$": the long-string channel of a string record


def puts_for(spec: PVSpec) -> list[Put]:
    """The puts tried on a record: in range, out of range, of the wrong type; one to a readback."""
    from caproto import ChannelType as T

    if not spec.writable:
        value = {"float": 1.5, "int": 3, "enum": 0, "string": b"x\0"}[spec.kind]
        return [Put("put", value, field="VAL$" if spec.kind == "string" else "")]
    if spec.kind == "enum":
        i = QUIET_ENUM.get(spec.suffix, len(spec.enum_strs) - 1)
        return [Put("index", i), Put("state name", spec.enum_strs[i], T.STRING),
                Put("index past the states", len(spec.enum_strs)), Put("unknown name", "nope", T.STRING)]
    if spec.kind == "string":
        n = spec.max_length
        return [Put("empty", b"\0", field="VAL$"), Put("text", b"x\0", field="VAL$"),
                Put("as DBR_STRING", "x", T.STRING), Put("SIZV-1 chars", b"y" * (n - 1) + b"\0", field="VAL$"),
                Put("SIZV chars", b"z" * n, field="VAL$"), Put("empty again", b"\0", field="VAL$")]
    lo, hi = spec.drvl, spec.drvh
    limited = lo is not None and hi is not None and lo < hi
    if limited:
        mid = lo + (hi - lo) / 7 if spec.kind == "float" else int(lo + max(1, (hi - lo) // 7))
    else:
        mid = 2.5 if spec.kind == "float" else 2
    out = [Put("in range", mid), Put("number as text", str(mid), T.STRING), Put("text", "many", T.STRING)]
    if spec.kind == "int":
        out.append(Put("fraction", mid + 0.5, T.DOUBLE))
    if limited:
        out += [Put("above DRVH", hi + max(1.0, abs(hi)) if spec.kind == "float" else int(hi) + 1),
                Put("below DRVL", lo - max(1.0, abs(lo)) if spec.kind == "float" else int(lo) - 1)]
    return out


def put(pv, p: Put) -> bool:
    """A put-callback; whether the IOC reported success."""
    response = pv.write(p.value, wait=True, timeout=10, data_type=p.data_type)
    return bool(response.status.success)


def read_value(pv) -> Any:
    import numpy as np
    from caproto import ChannelType

    data = pv.read(timeout=5, data_type=ChannelType.STRING if pv.channel.native_data_type == ChannelType.ENUM
                   else None).data
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        return bytes(data).split(b"\0", 1)[0].decode()
    return data[0].decode() if isinstance(data[0], bytes) else data[0]


def in_history(pv, suffix: str) -> bool:
    """Whether the message history PV (published by the status task) names ``suffix`` within a second."""
    if pv is None:
        return False
    try:
        wait_for(lambda: suffix in read_value(pv), timeout=1.0, interval=0.05)
    except AssertionError:
        return False
    return True


def test_every_put_answers_as_softioc_and_every_refusal_is_counted(cactx):
    specs = all_records()
    names = [name_of(p, db, s, f) for db, s in specs for p in (SOFT, PTY)
             for f in ([""] if s.kind != "string" else ["", "VAL$"])]
    names += [PTY + R + "RefusedPuts_RBV", PTY + R + "Message_RBV", PTY + R + "MessageHistory_RBV",
              PTY + "cam1:RefusedPuts_RBV", PTY + "cam1:StatusMessage_RBV"]
    # a reason repeated within seconds (a test before this one refused the same put) is held back from
    # Message_RBV but counted in the message history (core/messages.py); simdet has no history
    history = {"reconstructor.db": PTY + R + "MessageHistory_RBV", "simdetector.db": ""}
    pvs = dict(zip(names, cactx.get_pvs(*names, timeout=5)))
    for pv in pvs.values():
        pv.wait_for_connection(timeout=10)
    counters = {"reconstructor.db": (pvs[PTY + R + "RefusedPuts_RBV"], pvs[PTY + R + "Message_RBV"]),
                "simdetector.db": (pvs[PTY + "cam1:RefusedPuts_RBV"], pvs[PTY + "cam1:StatusMessage_RBV"])}
    start = {db: read_value(c[0]) for db, c in counters.items()}
    refused = dict.fromkeys(DBS, 0)
    diffs, allowed, n = [], [], 0
    t0 = time.monotonic()
    for db, spec in specs:
        for p in puts_for(spec):
            n += 1
            soft_pv, pty_pv = pvs[name_of(SOFT, db, spec, p.field)], pvs[name_of(PTY, db, spec, p.field)]
            soft_ok, pty_ok = put(soft_pv, p), put(pty_pv, p)
            what = f"{spec.suffix} {p.label} {p.value!r:.60}"
            if not pty_ok:
                refused[db] += 1
                message = read_value(counters[db][1])
                if spec.suffix not in message and not in_history(pvs.get(history[db]), spec.suffix):
                    diffs.append(f"{what}: refused, but the message says {message!r}")
            why = DEVICE_REFUSES.get((spec.suffix, p.label)) or DEVICE_REFUSES.get((spec.rtyp, p.label))
            if soft_ok == pty_ok:
                if why is not None:
                    diffs.append(f"{what}: allowed to differ ({why}), but both {'took' if soft_ok else 'refused'} it")
                elif soft_ok and p.label in ("in range", "index", "state name", "text", "empty", "fraction",
                                             "number as text", "as DBR_STRING"):
                    s, t = read_value(soft_pv), read_value(pty_pv)
                    if not same(s, t) and (spec.suffix, p.label) not in DEVICE_VALUE:
                        diffs.append(f"{what}: softioc reads {s!r}, ptychostream {t!r}")
            elif soft_ok and not pty_ok and why is not None:
                allowed.append(what)
            else:
                diffs.append(f"{what}: softioc {'took' if soft_ok else 'refused'} it, "
                             f"ptychostream {'took' if pty_ok else 'refused'} it")
    took = time.monotonic() - t0
    print(f"\n{n} puts on {len(specs)} records in {took:.1f} s; {len(allowed)} device-level refusals allowed")
    assert not diffs, f"{len(diffs)} puts differ:\n" + "\n".join(diffs)
    for db, (count, _) in counters.items():
        wait_for(lambda db=db, count=count: read_value(count) == start[db] + refused[db], timeout=5,
                 message=f"{db}: RefusedPuts_RBV counts {refused[db]} refusals (from {start[db]})",
                 state=lambda count=count: read_value(count))


# -- what a client sees of a refusal, and what the device does with it ---------------------------
def libca_put_status(name: str, text: bytes) -> int:
    """A DBR_STRING put-callback through libca, pyepics' CA library: the status libca hands the
    callback. (pyepics' ``caput(wait=True)`` waits for that callback but drops its status.)"""
    from epics import ca, dbr

    chid = ca.create_channel(name, connect=False, auto_cb=False)
    assert ca.connect_channel(chid, timeout=5), name
    statuses: list[int] = []
    callback = dbr.make_callback(lambda args: statuses.append(int(args.status)), dbr.event_handler_args)
    value = ctypes.create_string_buffer(text, 40)
    try:
        assert ca.libca.ca_array_put_callback(dbr.STRING, 1, chid, value, callback, None) == 1  # ECA_NORMAL
        ca.flush_io()
        wait_for(lambda: (ca.poll(), statuses)[1], timeout=5, message=f"the put callback from {name}")
    finally:
        ca.clear_channel(chid)
    return statuses[0]


def test_a_refused_put_callback_fails_for_libca_and_caproto_as_on_softioc(iocs):
    import caproto
    from caproto.sync.client import write

    putfail = caproto.CAStatus.ECA_PUTFAIL.value.code_with_severity
    normal = caproto.CAStatus.ECA_NORMAL.value.code_with_severity
    for prefix in (SOFT, PTY):
        name = prefix + R + "Backend"
        assert libca_put_status(name, b"CUDA-Magic") == putfail, prefix
        assert libca_put_status(name, b"Auto") == normal, prefix
        response = write(name, "nope", data_type=caproto.ChannelType.STRING, notify=True, repeater=False, timeout=5)
        assert isinstance(response, caproto.WriteNotifyResponse) and not response.status.success, prefix


def pty_value(name: str) -> Any:
    from caproto.sync.client import read

    data = read(name, repeater=False, timeout=5).data
    return bytes(data).split(b"\0", 1)[0].decode() if getattr(data, "dtype", None) == "uint8" else data[0]


def test_ca_puts_reach_the_device_as_given(iocs, ctx):
    """An empty string is stored as empty (caproto made it a NUL character); text is decoded where the
    device decodes PVA strings; a readback's and a db/ field's refusals are counted with a message
    (a real IOC takes a put to a field such as DRVH; ptychostream's limits are db/'s)."""
    import epics
    import numpy as np
    from caproto.sync.client import write
    from conftest import text

    name = PTY + R + "InputPV"
    ctx.put(name, "TST:CONF:Other", wait=True)
    assert epics.caput(name, "", wait=True, timeout=5) == 1
    wait_for(lambda: text(ctx.get(name)) == "", timeout=5, message="InputPV empty over PVA")
    assert pty_value(name) == "" and pty_value(name + ".VAL$") == ""
    utf8 = np.frombuffer("TST:CONF:Üñï".encode() + b"\0", dtype=np.uint8)
    assert write(name, utf8, notify=True, repeater=False, timeout=5).status.success
    wait_for(lambda: text(ctx.get(name)) == "TST:CONF:Üñï", timeout=5, message="UTF-8 over CA")

    refused = int(ctx.get(PTY + R + "RefusedPuts_RBV"))
    for pv, value, said in (("Processed_RBV", 3, "read-only"), ("BatchSize.DRVH", 5, "BatchSize.DRVH is set by db/"),
                            ("BatchSize", 5000, "outside the limits")):
        assert epics.caput(PTY + R + pv, value, wait=True, timeout=5) == 1  # the put-callback came (failed)
        refused += 1
        wait_for(lambda n=refused: int(ctx.get(PTY + R + "RefusedPuts_RBV")) == n, timeout=5,
                 message=f"the refused put to {pv} counted")
        # a reason refused seconds ago (by the put test) is held back from Message_RBV, not from the history
        wait_for(lambda said=said: any(said in text(ctx.get(PTY + R + pv)) for pv in ("Message_RBV",
                                                                                      "MessageHistory_RBV")),
                 timeout=2, message=f"a message saying {said!r}")
    assert pty_value(PTY + R + "BatchSize.DRVH") == 1024 and int(ctx.get(PTY + R + "BatchSize")) != 5000
    for prefix in (SOFT, PTY):  # processing a record is not a refusal
        assert write(prefix + R + "BatchSize.PROC", [1], notify=True, repeater=False, timeout=5).status.success
    assert int(ctx.get(PTY + R + "RefusedPuts_RBV")) == refused


def test_a_model_path_of_spaces_is_refused_not_an_unload(iocs, ctx):
    import epics
    from conftest import text

    refused = int(ctx.get(PTY + R + "RefusedPuts_RBV"))
    serving = text(ctx.get(PTY + R + "ModelPath_RBV"))
    epics.caput(PTY + R + "ModelPath", "   ", wait=True, timeout=5)
    wait_for(lambda: int(ctx.get(PTY + R + "RefusedPuts_RBV")) == refused + 1, timeout=3,
             message="a ModelPath of spaces refused")
    assert "a path of spaces names no file" in text(ctx.get(PTY + R + "Message_RBV"))
    assert text(ctx.get(PTY + R + "ModelPath_RBV")) == serving  # nothing was unloaded


def test_each_pv_has_its_own_alarm_and_a_monitor_fires_only_on_a_change(iocs):
    """One refused put: over CA, only the PVs it changes post an event (Message_RBV with its MINOR
    alarm, RefusedPuts_RBV, the message history); every other PV stays NO_ALARM and silent."""
    from caproto import AlarmSeverity, AlarmStatus, ChannelType
    from caproto.threading.client import Context

    names = [PTY + R + s.suffix for s in ca_records("reconstructor.db")]
    events: dict[str, list] = {n: [] for n in names}
    ctx = Context()
    try:
        pvs = ctx.get_pvs(*names, timeout=5)
        subs = []
        for pv in pvs:
            pv.wait_for_connection(timeout=10)
            sub = pv.subscribe(data_type="time")  # DBE_VALUE | DBE_ALARM

            def on_event(sub, response, name=pv.name) -> None:
                md = response.metadata
                events[name].append((bytes(response.data), md.severity, md.status))

            sub.add_callback(on_event)
            subs.append((sub, on_event))  # caproto keeps a weak reference only
        wait_for(lambda: all(events.values()), timeout=20, message="every PV's first event")

        def quiet() -> bool:
            before = sum(map(len, events.values()))
            time.sleep(1.0)
            return sum(map(len, events.values())) == before

        wait_for(quiet, timeout=30, interval=0, message="a second with no event on any PV")
        seen = {n: len(e) for n, e in events.items()}
        (batch,) = [pv for pv in pvs if pv.name.endswith(":BatchSize")]
        assert not batch.write(b"alarm-test", data_type=ChannelType.STRING, wait=True, timeout=5).status.success
        time.sleep(1.5)  # the status task (10 Hz) publishes the message history meanwhile
        fired = {n.removeprefix(PTY + R): events[n][seen[n]:] for n in names if len(events[n]) > seen[n]}
        assert set(fired) <= {"Message_RBV", "MessageHistory_RBV", "RefusedPuts_RBV"}, sorted(fired)
        assert {"Message_RBV", "RefusedPuts_RBV"} <= set(fired), sorted(fired)
        assert len(fired["RefusedPuts_RBV"]) == 1, fired
        for name, seen_events in events.items():  # each event is news: a value or an alarm that changed
            assert all(a != b for a, b in itertools.pairwise(seen_events)), (name, seen_events)
        assert any(b"alarm-test" in value for value, _, _ in fired["Message_RBV"]), fired["Message_RBV"]
        _, severity, status = fired["Message_RBV"][-1]
        assert severity == AlarmSeverity.MINOR_ALARM and status == AlarmStatus.SOFT
        for name in names:
            if not name.endswith(("Message_RBV", "MessageHistory_RBV", "ModelStatus_RBV", "Status_RBV",
                                  "InputConnected_RBV", "RetrainState_RBV")):
                assert events[name][-1][1] == AlarmSeverity.NO_ALARM, name
    finally:
        ctx.disconnect()
