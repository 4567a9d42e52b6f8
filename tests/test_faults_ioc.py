"""Issue #17, findings 2, 3 and 9, and the CA server under a subscription storm: real IOCs on loopback.

- SIGTERM with CA on, frames streaming and Capture on: exit code 0 within a bound, and the record
  closed with its final mosaic and end time (finding 2).
- Every kind of undecodable put to ``Input`` is refused to the client *and* counted, with a
  ``Message_RBV`` naming the reason (finding 3).
- A put whose file cannot be read yet does not stall CA or the status task (finding 9). The slow
  file is a real one: the test holds a write lease on it (``fcntl F_SETLEASE``), so the IOC's
  ``open()`` blocks in the kernel until the test lets go (or the kernel's lease-break time, 45 s,
  passes), which is how a stalled network disk looks to the IOC.
- Many CA subscriptions made while values change fast (what PyDM does) do not kill the CA server;
  a CA server that fails anyway is restarted with a message, the PVA side serving on.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from conftest import NET, IOCProcess, next_slot, pva_context, text, wait_for

from ptychostream.core.frames import ImageFrame
from ptychostream.core.pvdb import load_db
from ptychostream.files.record import read_record
from ptychostream.protocols.ntnd import encode

pytestmark = [pytest.mark.system, pytest.mark.faults]

R, TERM, FAN, INPROC = "TST:FI:", "TST:FITERM:", "TST:FIFAN:", "TST:FISRV:"
DB = load_db("reconstructor.db")
COUNTERS = ("Received", "Processed", "Dropped", "Rejected", "Backlog")
#: the clean stop (SIGTERM to exit) with a stream and a record, on a loaded 2-core machine
STOP_BOUND_S = 5.0
#: a CA get or put, or a counter reaching the status PVs, while a slow file blocks a put
ANSWER_BOUND_S = 2.0
READY = 2
FRAMES = np.random.default_rng(17).poisson(4, (64, 64, 64)).astype(np.uint16)


# -- helpers ----------------------------------------------------------------------------------
def ca_get(name: str, timeout: float = ANSWER_BOUND_S) -> Any:
    """One value over CA (caproto's sync client): a number, or a string for a char waveform."""
    from caproto.sync.client import read

    data = read(name, repeater=False, timeout=timeout).data
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        return bytes(data).split(b"\0", 1)[0].decode()
    return data[0].decode() if isinstance(data[0], bytes) else data[0]  # an enum comes as its string


def ca_put(name: str, value: Any, timeout: float = ANSWER_BOUND_S) -> None:
    """A CA put with completion (put-callback)."""
    from caproto.sync.client import write

    write(name, value, repeater=False, timeout=timeout, notify=True)


def ca_put_in_background(name: str, value: Any, timeout: float = 60.0) -> threading.Thread:
    """A CA put-callback that completes later (caproto's threading client: the sync client's shared
    sockets are not for two threads); ``thread.errors`` holds what went wrong."""
    from caproto.threading.client import Context

    errors: list[Any] = []

    def run() -> None:
        ctx = Context()
        try:
            (pv,) = ctx.get_pvs(name, timeout=ANSWER_BOUND_S)
            pv.wait_for_connection(timeout=ANSWER_BOUND_S)
            response = pv.write(value, wait=True, timeout=timeout)
            if not response.status.success:
                errors.append(response.status)
        except BaseException as exc:  # reported by the test
            errors.append(exc)
        finally:
            ctx.disconnect()

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def counters(ctx, prefix: str = R) -> dict[str, int]:
    return {n: int(v) for n, v in zip(COUNTERS, ctx.get([f"{prefix}{n}_RBV" for n in COUNTERS]))}


def accounted(c: dict[str, int]) -> bool:
    return c["Received"] == c["Processed"] + c["Dropped"] + c["Rejected"] + c["Backlog"]


def frame_value(i: int, **attrs: Any):
    """Frame ``i`` of FRAMES as an NTNDArray, uniqueId ``i + 1``."""
    return encode(ImageFrame(FRAMES[i % len(FRAMES)], i + 1, time.time(), None, attrs))


def serve_model(ctx, prefix: str, model: str, **settings: Any) -> None:
    """Enabled, ``model`` serving, every result published, and the given settings."""
    for name, value in {"Enable": 1, "PublishRate": 0, **settings, "ModelPath": model}.items():
        ctx.put(prefix + name, value, wait=True)
    status = wait_for(lambda: (s := int(ctx.get(prefix + "ModelStatus_RBV"))) in (READY, 3) and s, timeout=60,
                      message="model load")
    assert status == READY, text(ctx.get(prefix + "Message_RBV"))


class Streamer(threading.Thread):
    """Puts frames with positions to ``prefix`` Input (p4p) until stopped or the IOC is gone."""

    def __init__(self, prefix: str) -> None:
        super().__init__(daemon=True)
        self.prefix = prefix
        self.halt = threading.Event()
        self.sent = 0

    def run(self) -> None:
        with pva_context(nt=False) as raw:
            while not self.halt.is_set():
                i = self.sent
                value = frame_value(i, PositionX=2e-8 * (i % 8), PositionY=2e-8 * (i // 8 % 8))
                try:
                    raw.put(self.prefix + "Input", value, wait=True, timeout=5)
                except Exception:  # the IOC stopped under the put
                    return
                self.sent += 1


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from ptychostream.model.zoo import build_ptychonn_onnx

    d = tmp_path_factory.mktemp("model")
    return build_ptychonn_onnx(str(d / "m64.onnx"), size=64, heads=("amplitude", "phase"), base_channels=4,
                               depth=2, seed=17)


@pytest.fixture(scope="module")
def ioc(model):
    """A reconstructor IOC with CA, a model serving; frames without a position wait for the whole test
    (no "waited for its position" report over Message_RBV)."""
    proc = IOCProcess(["ioc", "--prefix", R], R, next_slot()).start()
    try:
        with pva_context() as ctx:
            serve_model(ctx, R, model, PositionTimeout=DB["PositionTimeout"].drvh)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def raw():
    with pva_context(nt=False) as c:
        yield c


@pytest.fixture
def settled(ioc, ctx):
    """Before the test: the queue drained, then the counters reset (ResetCounters writes them at
    once); they are returned (all 0)."""
    wait_for(lambda: counters(ctx)["Backlog"] == 0, timeout=30, message="queue drained")
    ctx.put(R + "ResetCounters", 1, wait=True)
    return wait_for(lambda: (c := counters(ctx))["Received"] == 0 and c, timeout=5, message="counters reset")


# -- finding 2: a clean stop with CA on ----------------------------------------------------------
def test_sigterm_with_ca_a_stream_and_capture_exits_0_with_a_closed_record(model, tmp_path):
    import epics

    proc = IOCProcess(["ioc", "--prefix", TERM], TERM, next_slot()).start()
    streamer = Streamer(TERM)
    watchers: list = []
    path = tmp_path / "term.h5"
    try:
        with pva_context() as ctx:
            serve_model(ctx, TERM, model, PixelSize=1e-8, MosaicRate=50)
            for name, value in (("CaptureFile", str(path)), ("CaptureFrames", 1), ("Capture", 1)):
                ctx.put(TERM + name, value, wait=True)
            assert int(ctx.get(TERM + "Capture_RBV")) == 1
            # CA clients watching, as a beamline's screens do
            watchers = [epics.PV(TERM + n, auto_monitor=True) for n in ("Received_RBV", "Message_RBV", "Capture_RBV")]
            assert all(pv.wait_for_connection(5) for pv in watchers)
            streamer.start()
            wait_for(lambda: int(ctx.get(TERM + "CaptureWritten_RBV")) >= 100 and int(ctx.get(TERM + "Stitched_RBV")),
                     timeout=60, message="100 frames written and some stitched")
        assert streamer.is_alive(), "the stream ended before the stop"
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        rc = proc.proc.wait(30)
        stop_s = time.monotonic() - t0
    finally:
        streamer.halt.set()
        streamer.join(10)
        for pv in watchers:
            pv.disconnect()
        proc.stop()
    log = proc.log()
    assert rc == 0, log[-3000:]
    assert stop_s <= STOP_BOUND_S, f"stopped in {stop_s:.2f} s\n{log[-3000:]}"
    # the device's own account of the cut, then the servers' close
    m = re.search(r"stopped: (\d+) received = (\d+) processed \+ (\d+) dropped \+ (\d+) rejected \+ (\d+) left", log)
    assert m, log[-3000:]
    received, processed, dropped, rejected, left = map(int, m.groups())
    assert received == processed + dropped + rejected + left and processed >= 100
    assert log.index(m.group(0)) < log.index(f"IOC {TERM} stopped")
    rec = read_record(path)
    attrs = rec["attrs"]
    assert rec["complete"] and attrs["end_time"] and not attrs["error"], attrs
    # every result published while capturing reached the record (written or counted as dropped)
    assert attrs["frames_written"] + attrs["frames_dropped"] == processed, (attrs, processed)
    assert rec["n_frames"] == attrs["frames_written"] >= 100
    mosaic = rec["mosaic"]
    assert mosaic["phase"].ndim == 2 and mosaic["n_patches"] > 0 and np.isfinite(mosaic["phase"]).all()
    print(f"\nSIGTERM -> exit 0 in {stop_s:.2f} s: {received} received = {processed} processed + {dropped} dropped"
          f" + {rejected} rejected + {left} left; record {attrs['frames_written']} frames, "
          f"mosaic of {mosaic['n_patches']} patches; {streamer.sent} sent")


# -- finding 3: undecodable Input puts ------------------------------------------------------------
def _one_d(v) -> None:
    v["value"] = np.ones(4096, np.uint16)
    v["dimension"] = [{"size": 4096}]


def _three_d(v) -> None:
    v["value"] = np.ones(64 * 64 * 3, np.uint8)
    v["dimension"] = [{"size": 3}, {"size": 64}, {"size": 64}]


def _no_dimension(v) -> None:
    v["dimension"] = []


def _empty_union(v) -> None:
    v["value"] = None


def _dims_mismatch(v) -> None:
    v["dimension"] = [{"size": 10}, {"size": 10}]


def _unknown_codec(v) -> None:
    v["codec.name"] = "zstd-magic"
    v["codec.parameters"] = ("i", 3)  # the original data type (uint16), as NDPluginCodec sends it


UNDECODABLE: dict[str, tuple[Callable[[Any], None], str]] = {
    "1-D": (_one_d, "got 1 dimensions"),
    "3-D": (_three_d, "got 3 dimensions"),
    "no dimension": (_no_dimension, "got 0 dimensions"),
    "empty value union": (_empty_union, "frame has no data"),
    "dims vs element count": (_dims_mismatch, "does not match 4096 elements"),
    "unknown codec": (_unknown_codec, "unsupported codec 'zstd-magic'"),
}


@pytest.mark.parametrize("kind", list(UNDECODABLE))
def test_an_undecodable_input_put_is_refused_counted_and_explained(ioc, ctx, raw, settled, kind):
    from p4p.client.thread import RemoteError

    spoil, reason = UNDECODABLE[kind]
    before = settled
    refused_before = int(ctx.get(R + "RefusedPuts_RBV"))
    value = frame_value(0)
    spoil(value)
    with pytest.raises(RemoteError, match=re.escape(reason)):
        raw.put(R + "Input", value, wait=True)

    def seen():
        c, msg = counters(ctx), text(ctx.get(R + "Message_RBV"))
        return (c["Received"] == before["Received"] + 1 and c["Rejected"] == before["Rejected"] + 1
                and reason in msg and (c, msg))

    c, msg = wait_for(seen, timeout=5, message=f"the {kind} put counted as a rejected frame, with the reason",
                      state=lambda: (counters(ctx), text(ctx.get(R + "Message_RBV"))))
    assert msg.startswith("rejected frame: ") and accounted(c), (c, msg)
    assert int(ctx.get(R + "RefusedPuts_RBV")) == refused_before  # counted once, as a frame
    # the device keeps running: the next good frame is processed
    raw.put(R + "Input", frame_value(1), wait=True)
    expect = {**before, "Received": before["Received"] + 2, "Processed": before["Processed"] + 1,
              "Rejected": before["Rejected"] + 1}
    c = wait_for(lambda: (c := counters(ctx)) == expect and c, timeout=10, message="the next frame processed",
                 state=lambda: counters(ctx))
    assert accounted(c)


def test_an_input_put_while_disabled_is_a_refused_put_not_a_frame(ioc, ctx, raw, settled):
    from p4p.client.thread import RemoteError

    before, refused = settled, int(ctx.get(R + "RefusedPuts_RBV"))
    value = frame_value(0)
    _one_d(value)
    ctx.put(R + "Enable", 0, wait=True)
    try:
        with pytest.raises(RemoteError, match="disabled"):
            raw.put(R + "Input", value, wait=True)
        wait_for(lambda: int(ctx.get(R + "RefusedPuts_RBV")) == refused + 1, timeout=5, message="refused put counted")
    finally:
        ctx.put(R + "Enable", 1, wait=True)
    assert counters(ctx)["Received"] == before["Received"] and "disabled" in text(ctx.get(R + "Message_RBV"))


# -- finding 9: slow file I/O in put handlers -----------------------------------------------------
@pytest.fixture
def sigio_ignored():
    """A broken lease signals its holder (SIGIO, whose default action ends the process)."""
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGIO, old)


def _trajectory(tmp: Path) -> Path:
    path = tmp / "trajectory.csv"
    path.write_text("y,x\n" + "".join(f"{2e-8 * (i // 8)},{2e-8 * (i % 8)}\n" for i in range(64)))
    return path


def _dark(tmp: Path) -> Path:
    path = tmp / "dark.npy"
    np.save(path, np.zeros((64, 64), np.float32))
    return path


def _record(tmp: Path) -> Path:
    path = tmp / "slow.h5"
    path.write_bytes(b"")  # the file the record will replace
    return path


#: PV put -> (the file it reads, the value put, the readback that shows it applied, the message, the undo)
SLOW: dict[str, tuple[Callable[[Path], Path], Callable[[Path], Any], str, str, dict[str, Any]]] = {
    "TrajectoryFile": (_trajectory, str, "TrajectoryFile_RBV", "trajectory of 64 points", {"TrajectoryFile": ""}),
    "PreDarkPath": (_dark, str, "PreDarkPath_RBV", "", {"PreDarkPath": ""}),
    "Capture": (_record, lambda path: 1, "Capture_RBV", "recording to", {"Capture": 0}),
}


@pytest.mark.parametrize("pv", list(SLOW))
def test_a_put_whose_file_is_slow_stalls_neither_ca_nor_the_status_task(ioc, ctx, raw, settled, tmp_path,
                                                                         sigio_ignored, pv):
    make, put_value, readback, said, undo = SLOW[pv]
    path = make(tmp_path)
    value = put_value(path)
    if pv == "Capture":
        ctx.put(R + "CaptureFile", str(path), wait=True)
    old_rbv = ctx.get(R + readback)
    batch = int(ctx.get(R + "BatchSize"))
    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)  # any open() by another process now waits for us
    timings: dict[str, float] = {}
    try:
        slow = ca_put_in_background(R + pv, value)
        # the lease is being broken: the IOC is inside open(), waiting for this test
        wait_for(lambda: fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_WRLCK, timeout=10,
                 message=f"the IOC opening {path.name}")

        t0 = time.monotonic()
        ca_put(R + "BatchSize", batch + 1)
        assert ca_get(R + "BatchSize_RBV") == batch + 1
        timings["CA put + get"] = time.monotonic() - t0

        t0 = time.monotonic()
        raw.put(R + "Input", frame_value(2), wait=True)
        wait_for(lambda: ca_get(R + "Received_RBV") == settled["Received"] + 1, timeout=ANSWER_BOUND_S,
                 message="Received_RBV over CA (the status task)")
        wait_for(lambda: counters(ctx)["Processed"] == settled["Processed"] + 1, timeout=ANSWER_BOUND_S,
                 message="Processed_RBV over PVA")
        timings["frame to status PVs"] = time.monotonic() - t0

        assert slow.is_alive(), "the slow put completed while its file could not be opened"
        assert ctx.get(R + readback) == old_rbv  # nothing applied yet
    finally:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
    try:
        slow.join(30)
        assert not slow.is_alive() and not slow.errors, slow.errors  # the put completes once the file opens
        got = ctx.get(R + readback)
        assert (text(got) == str(path)) if isinstance(value, str) else int(got) == value
        assert said in text(ctx.get(R + "Message_RBV"))
        assert all(t < ANSWER_BOUND_S for t in timings.values()), timings
    finally:
        ctx.put(R + "BatchSize", batch, wait=True)
        for name, v in undo.items():
            ctx.put(R + name, v, wait=True)
        if pv == "Capture":
            wait_for(lambda: int(ctx.get(R + "Capture_RBV")) == 0, timeout=15, message="record closed")
    print(f"\n{pv} blocked on open(): " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in timings.items()))


def test_a_slow_put_refused_late_leaves_the_setpoint_and_says_why(ioc, ctx, tmp_path):
    """A put completed later (Busy) that the handler then refuses: client error, message, count."""
    bad = tmp_path / "bad.csv"
    bad.write_text("no positions here\n")
    refused = int(ctx.get(R + "RefusedPuts_RBV"))
    old = text(ctx.get(R + "TrajectoryFile"))
    from caproto.sync.client import write

    # the put-callback fails (ECA_PUTFAIL), as a real IOC's does
    assert not write(R + "TrajectoryFile", str(bad), repeater=False, timeout=10, notify=True).status.success
    wait_for(lambda: int(ctx.get(R + "RefusedPuts_RBV")) == refused + 1, timeout=5, message="refusal counted")
    assert "TrajectoryFile" in text(ctx.get(R + "Message_RBV"))
    assert text(ctx.get(R + "TrajectoryFile")) == old


def test_each_pv_has_its_own_alarm_over_ca(ioc, ctx):
    """caproto gives every pvproperty of a group one shared alarm unless told otherwise: a MINOR
    Message_RBV showed as MINOR on every PV over CA, and each alarm write was published to all."""
    from caproto import AlarmSeverity, ChannelType
    from caproto.sync.client import read
    from p4p.client.thread import RemoteError

    with pytest.raises(RemoteError):
        ctx.put(R + "BatchSize", 0, wait=True)  # refused: Message_RBV says why, MINOR

    def severity(name: str) -> AlarmSeverity:
        return read(R + name, data_type=ChannelType.TIME_DOUBLE if name != "Message_RBV" else ChannelType.TIME_CHAR,
                    repeater=False, timeout=ANSWER_BOUND_S).metadata.severity

    wait_for(lambda: severity("Message_RBV") == AlarmSeverity.MINOR_ALARM, timeout=5, message="Message_RBV MINOR")
    assert severity("BatchSize_RBV") == AlarmSeverity.NO_ALARM and severity("Received_RBV") == AlarmSeverity.NO_ALARM


# -- the CA server under a subscription storm -----------------------------------------------------
def test_ca_subscriptions_made_and_cancelled_while_values_change_fast_keep_the_ioc_up(monkeypatch):
    """caproto 1.3 fans an update out over the live deque of a PV's subscriptions, waiting on each
    client's bounded send queue in between; a subscription made or cancelled meanwhile (PyDM
    opening or closing a screen) mutated the deque and ended the CA server ("deque mutated during
    iteration") and, with it, the IOC. A send queue of 2 (``CAPROTO_MAX_TOTAL_SUBSCRIPTION_BACKLOG``,
    10000 by default) makes that wait happen at almost every update, as a slow client does."""
    import epics

    with monkeypatch.context() as m:
        m.setenv("CAPROTO_MAX_TOTAL_SUBSCRIPTION_BACKLOG", "2")
        proc = IOCProcess(["ioc", "--prefix", FAN], FAN, next_slot()).start()
    halt = threading.Event()
    puts = [0]

    def change() -> None:
        with pva_context() as c:
            while not halt.is_set():
                c.put(FAN + "PublishRate", 1 + puts[0] % 50 / 10, wait=True)
                puts[0] += 1

    changer = threading.Thread(target=change, daemon=True)
    pvs: list = []
    made = cancelled = 0
    updates = [0]

    def count(**kw) -> None:
        updates[0] += 1

    try:
        changer.start()
        wait_for(lambda: puts[0] > 20, timeout=10, message="values changing")
        while made < 600 and proc.proc.poll() is None:  # subscribe, and cancel the oldest, while updates go out
            pvs.append(epics.PV(FAN + ("PublishRate", "PublishRate_RBV")[made % 2], auto_monitor=True,
                                callback=count))
            made += 1
            if len(pvs) > 100:
                old = pvs.pop(0)
                old.clear_callbacks()
                old.disconnect()
                cancelled += 1
            # the circuit is the slow client's: a create-channel reply queues behind the fan-out
            # (seen at over 10 s once on a loaded CI box); the IOC staying up is what is tested
            wait_for(lambda: pvs[-1].connected or proc.proc.poll() is not None, timeout=30,
                     message="the new subscription connected")
        n = updates[0]
        wait_for(lambda: proc.proc.poll() is not None or updates[0] > n + len(pvs), timeout=30,
                 message="updates flowing to the subscriptions")
        halt.set()
        changer.join(10)
        assert proc.proc.poll() is None, proc.log()[-3000:]
        assert ca_get(FAN + "PublishRate_RBV", timeout=5) > 0
    finally:
        halt.set()
        for pv in pvs:
            pv.clear_callbacks()
            pv.disconnect()
        proc.stop()
    log = proc.log()
    assert "deque mutated" not in log and "CA server failed" not in log, log[-3000:]
    print(f"\n{made} subscriptions made and {cancelled} cancelled during {puts[0]} puts, {updates[0]} updates: "
          "the IOC stayed up")


def test_a_failed_ca_server_is_restarted_and_pva_serves_on(monkeypatch):
    """A fault inside the running caproto server (an item its subscription fan-out cannot unpack)
    ends the CA task; ``serve`` restarts it with a message and a count, PVA unaffected."""
    from ptychostream.core.device import DeviceState
    from ptychostream.protocols.ca import CAFrontEnd
    from ptychostream.protocols.server import serve

    for key, value in NET.server_env(next_slot()).items():
        monkeypatch.setenv(key, value)
    device = DeviceState(DB, message_pv="Message_RBV", refused_pv="RefusedPuts_RBV")
    frontend = CAFrontEnd(device, INPROC)
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        await serve(device, INPROC, ca_frontend=frontend, ready=ready.set)

    def run() -> None:
        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(30)
        wait_for(lambda: frontend.context is not None, timeout=5, message="CA server up")
        assert ca_get(INPROC + "Enable_RBV", timeout=5) == "Disable"
        first = frontend.context
        box["loop"].call_soon_threadsafe(first.subscription_queue.put_nowait, None)
        wait_for(lambda: frontend.restarts == 1, timeout=10, message="the CA server restarted")
        # the count goes up before the message is posted (same task, a few statements later)
        wait_for(lambda: "restart 1" in device.get("Message_RBV"), timeout=5, message="the restart's message")
        assert "CA server failed" in device.get("Message_RBV")
        if "CARestarts_RBV" in DB:
            assert device.get("CARestarts_RBV") == 1
        with pva_context() as c:  # PVA served on
            assert "CA server failed" in text(c.get(INPROC + "Message_RBV"))
        wait_for(lambda: frontend.context is not first and frontend.context is not None, timeout=10,
                 message="a new CA server")
        ca_put(INPROC + "BatchSize", 7, timeout=5)
        assert device.get("BatchSize") == 7 and ca_get(INPROC + "BatchSize", timeout=5) == 7
    finally:
        if "loop" in box:
            box["loop"].call_soon_threadsafe(box["task"].cancel)
        thread.join(15)
    assert not thread.is_alive()
