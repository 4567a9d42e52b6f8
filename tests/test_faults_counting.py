"""Issue #17, findings 7 and 8: honest uniqueId accounting and messages that cannot hide each other.

A reconstructor IOC on loopback (PVA and CA) takes frames put to ``Input`` with p4p, with the
uniqueIds each case chooses, and a detector channel served by a p4p server in this process for
the joins; the counters and ``MessageHistory_RBV`` are read back with p4p and pyepics.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from conftest import NET, IOCProcess, next_slot, pva_context, text, wait_for

from ptychostream.core.frames import ImageFrame
from ptychostream.core.pvdb import load_db
from ptychostream.core.stats import INT32_MAX
from ptychostream.model.zoo import build_ptychonn_onnx
from ptychostream.protocols.ntnd import encode

pytestmark = [pytest.mark.system, pytest.mark.faults]

R = "TST:FC:"
DET = "TST:FCDET:Image"
DB = load_db("reconstructor.db")
SIZE = 32
READY, NONE = 2, 0
COUNTERS = ("Received", "Processed", "Dropped", "Rejected", "Backlog", "Missed", "OutOfOrder", "Duplicates",
            "SourceRestarts")
#: what every test starts from (the db/ defaults of what a test changes)
BASELINE = {"Enable": 1, "InputPV": "", "PublishRate": 0,
            **{n: DB[n].initial for n in ("BacklogLimit", "BacklogPolicy", "PositionTimeout")}}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return build_ptychonn_onnx(tmp_path_factory.mktemp("models") / "tiny.onnx", size=SIZE, heads=("phase",),
                               base_channels=2, depth=2, seed=3)


@pytest.fixture(scope="module")
def ioc():
    proc = IOCProcess(["ioc", "--prefix", R], R, next_slot()).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def raw():
    with pva_context(nt=False) as c:
        yield c


@pytest.fixture(autouse=True)
def baseline(ioc, ctx, model):
    """Settings back to BASELINE, the model serving, the queue empty and the counters zero."""
    for name, value in BASELINE.items():
        ctx.put(R + name, value, wait=True)
    if text(ctx.get(R + "ModelPath_RBV")) != model or int(ctx.get(R + "ModelStatus_RBV")) != READY:
        assert load(ctx, model) == READY, text(ctx.get(R + "Message_RBV"))
    wait_for(lambda: counters(ctx)["Backlog"] == 0, timeout=30, message="queue drained")
    ctx.put(R + "ResetCounters", 1, wait=True)
    wait_for(lambda: counters(ctx)["Received"] == 0, timeout=5, message="counters reset")


def load(ctx, path: str) -> int:
    """Put ModelPath ("" unloads) and wait for the load to end; ModelStatus_RBV."""
    ctx.put(R + "ModelPath", path, wait=True)
    done = (READY, 3) if path else (NONE,)
    return wait_for(lambda: (s := int(ctx.get(R + "ModelStatus_RBV"))) in done and s + 1, timeout=60,
                    message="model load") - 1


def counters(ctx) -> dict[str, int]:
    return {n: int(v) for n, v in zip(COUNTERS, ctx.get([f"{R}{n}_RBV" for n in COUNTERS]))}


def accounted(c: dict[str, int]) -> bool:
    return c["Received"] == c["Processed"] + c["Dropped"] + c["Rejected"] + c["Backlog"]


def settled(ctx, received: int, timeout: float = 30) -> dict[str, int]:
    """Wait until ``received`` frames are in and counted out; the counters."""
    def done():
        c = counters(ctx)
        return c if c["Received"] == received and c["Backlog"] == 0 and accounted(c) else None
    return wait_for(done, timeout=timeout, interval=0.05, message=f"{received} frames in and counted out",
                    state=lambda: counters(ctx))


def frame_value(uid: int, array: np.ndarray | None = None):
    """An NTNDArray of a 32x32 frame with exactly this uniqueId (encode() would fold a negative one)."""
    value = encode(ImageFrame(np.ones((SIZE, SIZE), np.uint16) if array is None else array, 1, time.time()))
    value["uniqueId"] = uid
    return value


def put_frames(raw, uids, arrays=None) -> None:
    for i, uid in enumerate(uids):
        raw.put(R + "Input", frame_value(uid, None if arrays is None else arrays[i]), wait=True)


def history(ctx) -> list[str]:
    return text(ctx.get(R + "MessageHistory_RBV")).split("\n")


def history_line(ctx, pattern: str, timeout: float = 10) -> str:
    """Wait for the MessageHistory_RBV line that matches ``pattern`` (a regex); that line."""
    rx = re.compile(pattern)
    return wait_for(lambda: next((line for line in history(ctx) if rx.search(line)), None), timeout=timeout,
                    message=f"a MessageHistory_RBV line like {pattern!r}", state=lambda: history(ctx))


def gaps(c: dict[str, int]) -> tuple[int, int, int, int]:
    return c["Missed"], c["OutOfOrder"], c["Duplicates"], c["SourceRestarts"]


@pytest.mark.parametrize("uids, expected", [
    # (Missed, OutOfOrder, Duplicates, SourceRestarts)
    pytest.param([1, 2, 3, 0, 4, 5], (0, 0, 0, 0), id="zero uniqueId (was Missed +3)"),
    pytest.param([20, 19, 18, 21, 22], (0, 2, 0, 0), id="late before the base (was Missed +2)"),
    pytest.param([1, 2, 3, 6], (2, 0, 0, 0), id="a gap"),
    pytest.param([1, 2, 4, 3, 5, 5], (0, 1, 1, 0), id="a swap and a repeat"),
    pytest.param([1, 2, 3, 1, 2, 3, 5], (1, 0, 0, 1), id="restart at 1"),
])
def test_uniqueid_sequences(ioc, ctx, raw, uids, expected):
    put_frames(raw, uids)
    c = settled(ctx, len(uids))
    assert gaps(c) == expected, c
    assert c["Processed"] == len(uids) and c["Rejected"] == c["Dropped"] == 0


def test_a_negative_uniqueid_is_no_frame_count_and_does_not_wrap(ioc, ctx, raw):
    put_frames(raw, [1, 2, -5, 3, 4])
    c = settled(ctx, 5)
    assert gaps(c) == (0, 0, 0, 0) and c["Processed"] == 5, c
    line = history_line(ctx, r"uniqueId <= 0 \(last: -5\)")
    assert " MINOR " in line and line.endswith("not a frame count, left out of Missed")


def test_a_huge_jump_counts_in_full_and_saturates_not_wraps(ioc, ctx, raw):
    put_frames(raw, [1, INT32_MAX])
    c = settled(ctx, 2)
    assert gaps(c) == (INT32_MAX - 2, 0, 0, 0), c
    put_frames(raw, [1, INT32_MAX])  # a restart and the same jump: 2**32 - 6 missed, past int32
    c = settled(ctx, 4)
    assert gaps(c) == (INT32_MAX, 0, 0, 1), c  # 2**31 - 1 on the PV, not a negative wrap
    assert int(raw.get(R + "Missed_RBV")["value"]) == INT32_MAX
    history_line(ctx, r"source restarted 1 time\(s\).*uniqueId 1 after 2147483647")


def test_joins_count_honestly(ioc, ctx, raw):
    """A late join counts from the channel's current value; a rejoin counts what came meanwhile."""
    from p4p.server import Server
    from p4p.server.thread import SharedPV

    conf = {k: v for k, v in NET.server_env(next_slot()).items() if k.startswith("EPICS_PVA")}
    pv = SharedPV(initial=frame_value(1))
    image = np.ones((SIZE, SIZE), np.uint16)

    def post(uids) -> None:
        for uid in uids:
            pv.post(frame_value(uid, image))

    with Server(providers=[{DET: pv}], conf=conf, useenv=False):
        post(range(2, 31))  # the stream is at 30 before the reconstructor watches it
        ctx.put(R + "InputPV", DET, wait=True)
        wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=10, message="connected")
        history_line(ctx, rf"joined {DET} at uniqueId 30: that frame .* not counted; Missed counts from it")
        post(range(31, 61))
        c = settled(ctx, 30)
        assert gaps(c) == (0, 0, 0, 0), c  # 1..30 came before we watched: not Missed
        pv.close()  # the detector goes away; 61..70 are published while we are not connected
        wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 0, timeout=10, message="disconnected")
        pv.open(frame_value(70, image))
        wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=10, message="reconnected")
        post(range(71, 81))
        c = settled(ctx, 40)
        assert gaps(c) == (10, 0, 0, 0), c  # 61..70: 70 is the current value, not taken in either
        ctx.put(R + "InputPV", "", wait=True)


def test_unpositioned_reports_do_not_hide_a_reject(ioc, ctx, raw):
    ctx.put(R + "MosaicReset", 1, wait=True)  # no frame of an earlier test waits for its position
    wait_for(lambda: int(ctx.get(R + "Unpositioned_RBV")) == 0, timeout=5, message="mosaic counters reset")
    ctx.put(R + "PositionTimeout", 0.2, wait=True)  # the frames carry no position: each one times out
    uid = 0
    for k, want in enumerate((10, 20, 30)):
        put_frames(raw, range(uid + 1, uid + 11))
        uid += 10
        if k == 0:  # a misfit in between: its reason must survive the unpositioned reports after it
            put_frames(raw, [uid + 1], [np.ones((SIZE - 1, SIZE), np.uint16)])
            uid += 1
        wait_for(lambda want=want: int(ctx.get(R + "Unpositioned_RBV")) >= want, timeout=15,
                 message=f"{want} unpositioned")
    c = settled(ctx, 31)
    assert (c["Processed"], c["Rejected"]) == (30, 1), c
    history_line(ctx, r"MINOR.*: rejected 1 frame\(s\): frame shape \(31, 32\) does not fit the model input")
    waits = [line for line in history(ctx) if "waited over" in line]
    assert len(waits) == 1, history(ctx)  # one reason, one line, counted: not one line per frame
    assert re.search(r" MINOR x([3-9]|\d\d+) ", waits[0]), waits[0]  # a report per expiry pass, >= 3
    assert re.search(r"frame\(s\) unpositioned: frame 3[01] waited over 0.2 s for its position$", waits[0]), \
        waits[0]  # the latest report's text


def test_a_batch_with_misfit_and_nan_frames_keeps_both_reasons(ioc, ctx, raw, model):
    assert load(ctx, "") == NONE  # nothing serves: the frames wait, then go as one batch
    nan = np.full((SIZE, SIZE), np.nan, np.float32)
    misfit = np.ones((SIZE, SIZE + 2), np.uint16)
    good = np.ones((SIZE, SIZE), np.uint16)
    arrays = [nan, misfit, good, nan, misfit, good, misfit, good]
    put_frames(raw, range(1, 9), arrays)
    wait_for(lambda: counters(ctx)["Backlog"] == 8, timeout=10, message="8 frames waiting for a model")
    assert load(ctx, model) == READY
    c = settled(ctx, 8)
    assert (c["Processed"], c["Rejected"]) == (3, 5), c
    misfits = history_line(ctx, r"rejected 3 frame\(s\): frame shape \(32, 34\) does not fit")
    nans = history_line(ctx, r"rejected 2 frame\(s\): frame contains NaN or inf")
    assert misfits != nans and "frames" in misfits and "(2 frames" in nans


def test_queue_drops_are_reported(ioc, ctx, raw, model):
    for name, value in (("BacklogLimit", 5), ("BacklogPolicy", "DropOldest")):
        ctx.put(R + name, value, wait=True)
    assert load(ctx, "") == NONE
    put_frames(raw, range(1, 21))
    wait_for(lambda: counters(ctx)["Dropped"] == 15, timeout=10, message="15 dropped")
    line = history_line(ctx, r"frame\(s\) dropped \(BacklogPolicy DropOldest, queue full at 5\) in the last "
                             r"\d+\.\d s$")
    wait_for(lambda: "(15 frames" in history_line(ctx, r"frame\(s\) dropped"), timeout=5,
             message="every drop told", state=lambda: line)
    ctx.put(R + "BacklogLimit", DB["BacklogLimit"].initial, wait=True)
    assert load(ctx, model) == READY
    c = settled(ctx, 20)
    assert (c["Processed"], c["Dropped"], c["Rejected"]) == (5, 15, 0), c


def test_the_history_reads_the_same_over_ca(ioc, ctx, raw):
    import epics

    put_frames(raw, [1, 3])  # a gap: a report to read
    settled(ctx, 2)
    history_line(ctx, r"1 frame\(s\) missed upstream")

    def same():
        over_ca = epics.caget(R + "MessageHistory_RBV", as_string=True, use_monitor=False, timeout=5)
        return over_ca if over_ca == text(ctx.get(R + "MessageHistory_RBV")) else None
    assert "missed upstream" in wait_for(same, timeout=10, message="CA and PVA agree")
