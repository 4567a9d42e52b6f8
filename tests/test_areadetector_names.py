"""Issue #16, item 3: the areaDetector standard names, as ``alias()`` entries of db/ and a few records.

One reconstructor and one simulated detector, both protocols on: every alias reads as its record over
PVA and CA (value and fields), a put through an alias reaches the device (and a refused one is
counted once, as for the record), and ophyd-async's stock areaDetector classes, ``NDPluginBaseIO`` on
the reconstructor and ``ADBaseIO`` on the detector's ``cam1:``, connect and read over both protocols.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import IOCProcess, next_slot, plain, wait_for

from ptychostream.core.pvdb import load_db

pytestmark = pytest.mark.system

REC, SIM = "TST:AD:NN:", "TST:ADSIM:"
DBS = {"reconstructor.db": REC, "simdetector.db": SIM}


def alias_pairs() -> list[tuple[str, str]]:
    """(full alias name, full record name) of every alias in db/."""
    return [(prefix + alias, prefix + target) for db, prefix in DBS.items()
            for alias, target in load_db(db).aliases().items()]


@pytest.fixture(scope="module")
def iocs():
    procs = [IOCProcess(["ioc", "--prefix", REC], REC, next_slot()),
             IOCProcess(["simdet", "--prefix", SIM], SIM, next_slot())]
    started = []
    try:
        for proc in procs:
            started.append(proc.start())
        yield started
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="module")
def cactx(iocs):
    from caproto.threading.client import Context

    ctx = Context()
    yield ctx
    ctx.disconnect()


def test_aliases_are_names_of_records_not_records(tmp_path):
    rec, sim = load_db("reconstructor.db"), load_db("simdetector.db")
    assert rec.aliases()["EnableCallbacks"] == "Enable" and rec.aliases()["QueueSize"] == "BacklogLimit"
    assert rec.aliases()["DroppedArrays_RBV"] == "Dropped_RBV"
    assert sim.aliases()["cam1:ArraySizeX_RBV"] == "cam1:SizeX_RBV"
    assert "EnableCallbacks" not in rec and "EnableCallbacks" not in rec.names()
    assert rec.resolve("EnableCallbacks") is rec["Enable"] and rec["Enable"].aliases == ("EnableCallbacks",)
    assert rec["PortName_RBV"].initial == "PTYCHOSTREAM"  # a constant INP link is an input record's start value
    (tmp_path / "a.db").write_text('record(ao, "$(P)A") {\n    alias("$(P)B")\n}\nalias("$(P)A", "$(P)C")\n'
                                   'record(ai, "$(P)A_RBV") {\n}\n')
    db = load_db("a.db", str(tmp_path))
    assert [s.suffix for s in db] == ["A", "A_RBV"] and db.aliases() == {"B": "A", "C": "A"}
    # a record block under an alias name is the record again (as in EPICS): still one record
    (tmp_path / "re.db").write_text('record(ao, "$(P)A") {\n    alias("$(P)B")\n}\nrecord(ao, "$(P)B") {\n'
                                    '    field(DESC, "d")\n}\n')
    db = load_db("re.db", str(tmp_path))
    assert [s.suffix for s in db] == ["A"] and db.aliases() == {"B": "A"}


def test_every_alias_reads_as_its_record_over_pva(iocs, ctx):
    pairs = alias_pairs()
    values = ctx.get([name for pair in pairs for name in pair], timeout=10)
    got = dict(zip([name for pair in pairs for name in pair], values))
    diffs = [f"{a}: {plain(got[a])!r}, {t}: {plain(got[t])!r}" for a, t in pairs
             if plain(got[a]) != plain(got[t])
             or got[a].raw["display.description"] != got[t].raw["display.description"]]
    assert not diffs, "\n".join(diffs)
    assert plain(got[REC + "QueueSize"]) == 20000 and plain(got[SIM + "cam1:ArraySizeX_RBV"]) == 128


def test_every_alias_reads_as_its_record_over_ca(iocs, cactx):
    pairs = alias_pairs()
    names = [n + f for pair in pairs for n in pair for f in ("", ".DESC", ".RTYP")]
    pvs = dict(zip(names, cactx.get_pvs(*names, timeout=5)))
    for pv in pvs.values():
        pv.wait_for_connection(timeout=10)
    diffs = []
    for a, t in pairs:
        for f in ("", ".DESC", ".RTYP"):
            va, vt = (list(pvs[n + f].read(timeout=5).data) for n in (a, t))
            if va != vt:
                diffs.append(f"{a}{f}: {va!r}, {t}{f}: {vt!r}")
    assert not diffs, "\n".join(diffs)
    assert pvs[REC + "EnableCallbacks"].channel is not pvs[REC + "Enable"].channel  # two names, one record


def test_a_put_through_an_alias_reaches_the_device(iocs, ctx, cactx):
    ctx.put(REC + "QueueSize", 777, wait=True)  # PVA
    wait_for(lambda: plain(ctx.get(REC + "BacklogLimit_RBV")) == 777, message="BacklogLimit_RBV 777")
    assert plain(ctx.get(REC + "BacklogLimit")) == 777 and plain(ctx.get(REC + "QueueSize_RBV")) == 777
    wait_for(lambda: plain(ctx.get(REC + "QueueFree_RBV")) == 777, message="QueueFree_RBV 777")
    size, rbv = cactx.get_pvs(REC + "QueueSize", REC + "QueueSize_RBV", timeout=5)
    assert size.write([555], wait=True, timeout=10).status.success  # CA
    wait_for(lambda: rbv.read(timeout=5).data[0] == 555, message="QueueSize_RBV 555 over CA")
    refused = plain(ctx.get(REC + "RefusedPuts_RBV"))
    assert not size.write([0], wait=True, timeout=10).status.success  # below DRVL: the record's own check
    wait_for(lambda: plain(ctx.get(REC + "RefusedPuts_RBV")) == refused + 1, message="one refusal counted")
    assert "QueueSize" in plain(ctx.get(REC + "Message_RBV")) or "BacklogLimit" in plain(ctx.get(REC + "Message_RBV"))
    ctx.put(REC + "BacklogLimit", 20000, wait=True)
    ctx.put(REC + "ArrayCounter", 41, wait=True)
    wait_for(lambda: plain(ctx.get(REC + "ArrayCounter_RBV")) == 41, message="ArrayCounter_RBV 41")
    ctx.put(SIM + "cam1:ArrayCounter", 9, wait=True)
    wait_for(lambda: plain(ctx.get(SIM + "cam1:UniqueId_RBV")) == 9, message="simdet UniqueId_RBV 9")


@pytest.mark.parametrize("protocol", ["pva", "ca"])
def test_ophyd_async_stock_classes_connect_and_read(iocs, ctx, protocol):
    pytest.importorskip("ophyd_async", reason="needs the 'bluesky' extra")
    from ophyd_async.epics.adcore import ADBaseIO, NDPluginBaseIO

    async def main() -> tuple[dict, dict]:
        plugin = NDPluginBaseIO(f"{protocol}://{REC}", name="plugin")
        driver = ADBaseIO(f"{protocol}://{SIM}cam1:", name="driver")
        await asyncio.gather(plugin.connect(timeout=10), driver.connect(timeout=10))  # every signal bound
        await plugin.queue_size.set(321)
        await plugin.array_counter.set(5)
        try:
            return tuple([{name: await sig.get_value() for name, sig in dev.children()}  # type: ignore[return-value]
                          for dev in (plugin, driver)])
        finally:
            if protocol == "ca":  # aioca's channels call back into this loop: closed with it
                from aioca import purge_channel_caches

                purge_channel_caches()

    plugin, driver = asyncio.run(main())
    assert len(plugin) == 18 and len(driver) == 26, (sorted(plugin), sorted(driver))
    assert plugin["enable_callbacks"] == "Disable" and plugin["queue_size"] == 321 and plugin["array_counter"] == 5
    assert plugin["data_type"] == "Float32" and plugin["color_mode"] == "Mono" and plugin["port_name"] == "PTYCHOSTREAM"
    assert plugin["driver_version"] and plugin["nd_array_port"] == "" and plugin["array_size0"] == 0
    assert driver["array_size_x"] == driver["array_size0"] == 128 and driver["detector_state"] == "Idle"
    assert driver["model"] == "Simulated ptychography detector" and driver["manufacturer"] == "ptychostream"
    assert driver["image_mode"] == "Multiple" and driver["num_images"] == 100 and driver["data_type"] == "UInt16"
    assert driver["acquire"] is False and driver["color_mode"] == "Mono" and driver["acquire_time"] == 0.0005
    wait_for(lambda: plain(ctx.get(REC + "BacklogLimit_RBV")) == 321, message="BacklogLimit_RBV 321")  # the device's
    ctx.put(REC + "BacklogLimit", 20000, wait=True)
