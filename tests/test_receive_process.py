"""The receive process (pipeline/receive_process.py) against real p4p servers on loopback.

First the ProcessReceiver alone (exact uniqueIds and pixels, re-layouts, bad frames with their
reasons, a server restart, the child killed), then the reconstructor IOC with ``--receive process``
(the counting of a join and a rejoin, the child killed under a stream, SIGTERM).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import NET, IOCProcess, next_slot, text, wait_for

from ptychostream.core.frames import ImageFrame
from ptychostream.model.zoo import build_ptychonn_onnx
from ptychostream.pipeline.receive_process import CLOSE_S, SHRINK_AFTER, ProcessReceiver
from ptychostream.protocols.ntnd import encode

pytestmark = [pytest.mark.system]

DET = "TST:RXP:Image"
SCALAR = "TST:RXP:Scalar"


def pixels(uid: int, shape: tuple[int, ...] = (24, 32)) -> np.ndarray:
    """A frame whose every pixel depends on its uniqueId."""
    return ((np.arange(int(np.prod(shape))) * 7 + uid * 13) % 65521).astype(np.uint16).reshape(shape)


def value(uid: int, array: np.ndarray | None = None):
    v = encode(ImageFrame(pixels(uid) if array is None else array, uid, time.time(),
                          attributes={"PositionX": uid * 0.25, "PositionY": -uid * 0.5}))
    v["uniqueId"] = uid
    return v


@contextmanager
def server(initial=None) -> Iterator[dict]:
    """A p4p server of DET (NTNDArray) and SCALAR (NTScalar) on a free slot."""
    from p4p.nt import NTScalar
    from p4p.server import Server
    from p4p.server.thread import SharedPV

    conf = {k: v for k, v in NET.server_env(next_slot()).items() if k.startswith("EPICS_PVA")}
    pvs = {DET: SharedPV(initial=initial if initial is not None else value(1)),
           SCALAR: SharedPV(nt=NTScalar("d"), initial=1.0)}
    with Server(providers=[pvs], conf=conf, useenv=False):
        yield pvs


class Seen:
    """What a ProcessReceiver told, in order."""

    def __init__(self) -> None:
        self.frames: list[ImageFrame] = []
        self.batches = 0
        self.bad: list[str] = []
        self.connects: list[tuple[bool, str]] = []
        self.stale: list[tuple[int, bool]] = []
        self.dropped: list[int] = []
        self.restarts: list[str] = []
        self.lock = threading.Lock()

    def receiver(self) -> ProcessReceiver:
        def on_frames(frames) -> None:
            with self.lock:
                self.frames.extend(frames)
                self.batches += 1

        rx = ProcessReceiver(on_frames, self.bad.append, lambda ok, t: self.connects.append((ok, t)),
                             self.dropped.extend)
        rx.on_stale = lambda uid, rejoin: self.stale.append((uid, rejoin))
        rx.on_restart = lambda n, t: self.restarts.append(t)
        return rx

    def uids(self) -> list[int]:
        with self.lock:
            return [f.unique_id for f in self.frames]

    def connected(self) -> bool:
        return bool(self.connects) and self.connects[-1][0]


@pytest.fixture
def seen() -> Iterator[Seen]:
    s = Seen()
    yield s


def post(pv, uids, shape=(24, 32)) -> None:
    for uid in uids:
        pv.post(value(uid, pixels(uid, shape)))


def test_every_frame_arrives_exact_across_re_layouts_and_close_is_bounded(seen):
    rx = seen.receiver()
    try:
        with server() as pvs:
            rx.monitor(DET)
            wait_for(lambda: seen.stale, timeout=30, message="the current value seen")
            assert seen.stale == [(1, False)] and seen.connected()
            pid = rx.pid
            assert pid is not None and pid != os.getpid()
            # 200 at 24x32, 200 at 48x64 (the slot grows), then smaller ones until the ring shrinks
            post(pvs[DET], range(2, 202))
            post(pvs[DET], range(202, 402), (48, 64))
            n_small = SHRINK_AFTER + 100
            post(pvs[DET], range(402, 402 + n_small), (12, 16))
            last = 401 + n_small
            wait_for(lambda: len(seen.uids()) >= last - 1, timeout=30, message="every frame",
                     state=lambda: len(seen.uids()))
        assert seen.uids() == list(range(2, last + 1))
        for f in seen.frames:
            shape = (24, 32) if f.unique_id < 202 else (48, 64) if f.unique_id < 402 else (12, 16)
            np.testing.assert_array_equal(f.array, pixels(f.unique_id, shape))
            assert f.attributes["PositionX"] == f.unique_id * 0.25 and f.attributes["PositionY"] == -f.unique_id * 0.5
            assert f.data_timestamp is not None and f.timestamp > 1e9
        assert seen.batches < len(seen.frames)  # taken in batches, not one by one
        assert seen.bad == [] and seen.dropped == [] and rx.restarts == 0
    finally:
        t0 = time.monotonic()
        rx.close()
        took = time.monotonic() - t0
    assert took < 3 * CLOSE_S + 1
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(),
             timeout=5, message="the child ended")
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"ptyrx{os.getpid()}_")]


def test_bad_frames_are_counted_with_their_reasons_in_order(seen):
    rx = seen.receiver()
    try:
        with server() as pvs:
            rx.monitor(DET)
            wait_for(lambda: seen.stale, timeout=30, message="connected")
            post(pvs[DET], range(2, 5))
            pvs[DET].post(value(5, np.ones((2, 3, 4), np.uint16)))  # 3-D
            post(pvs[DET], range(6, 8))
            v = value(8)
            v["codec.name"] = "zstd-magic"  # a codec nobody knows
            pvs[DET].post(v)
            for uid in (9, 10):  # the server keeps the last codec until a post changes it
                good = value(uid)
                good["codec.name"] = ""
                pvs[DET].post(good)
            wait_for(lambda: len(seen.uids()) == 7 and len(seen.bad) == 2, timeout=20, message="frames and bad ones",
                     state=lambda: (seen.uids(), seen.bad))
            assert seen.uids() == [2, 3, 4, 6, 7, 9, 10]
            assert "3 dimensions" in seen.bad[0] and "codec zstd-magic" in seen.bad[1]
            rx.monitor(SCALAR)  # not an NTNDArray channel at all
            wait_for(lambda: len(seen.bad) == 3, timeout=20, message="the scalar rejected")
            assert f"{SCALAR} is not an NTNDArray" in seen.bad[2]
    finally:
        rx.close()


def test_lz4_frames_are_decoded_in_the_child(seen):
    lz4_block = pytest.importorskip("lz4.block")
    rx = seen.receiver()
    try:
        with server() as pvs:
            rx.monitor(DET)
            wait_for(lambda: seen.stale, timeout=30, message="connected")
            arr = pixels(2)
            v = value(2)
            comp = np.frombuffer(lz4_block.compress(arr.tobytes(), store_size=False), dtype=np.uint8)
            v["value"] = ("ubyteValue", comp)
            v["codec.name"] = "lz4"
            v["codec.parameters"] = ("i", 3)
            v["compressedSize"] = comp.size
            v["uncompressedSize"] = arr.nbytes
            pvs[DET].post(v)
            wait_for(lambda: seen.uids() == [2], timeout=20, message="the lz4 frame")
            np.testing.assert_array_equal(seen.frames[0].array, arr)
    finally:
        rx.close()


def test_a_server_restart_is_a_disconnect_and_a_rejoin(seen):
    rx = seen.receiver()
    try:
        with server() as pvs:
            rx.monitor(DET)
            wait_for(lambda: seen.stale, timeout=30, message="connected")
            post(pvs[DET], range(2, 11))
            wait_for(lambda: len(seen.uids()) == 9, timeout=20, message="9 frames")
            pvs[DET].close()
            wait_for(lambda: not seen.connected(), timeout=20, message="disconnect seen")
            assert seen.connects[-1][1] == f"{DET} disconnected"
            pvs[DET].open(value(70))
            wait_for(lambda: len(seen.stale) == 2, timeout=20, message="reconnected")
            assert seen.stale[-1] == (70, True) and seen.connected()
            post(pvs[DET], range(71, 81))
            wait_for(lambda: len(seen.uids()) == 19, timeout=20, message="the frames after")
            assert seen.uids() == [*range(2, 11), *range(71, 81)]
    finally:
        rx.close()


def test_a_killed_child_is_restarted_with_a_message_and_rejoins(seen):
    rx = seen.receiver()
    try:
        with server() as pvs:
            rx.monitor(DET)
            wait_for(lambda: seen.stale, timeout=30, message="connected")
            post(pvs[DET], range(2, 6))
            wait_for(lambda: len(seen.uids()) == 4, timeout=20, message="4 frames")
            old = rx.pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: seen.restarts, timeout=20, message="the restart told")
            assert rx.restarts == 1 and "receive process died" in seen.restarts[0] and "exit code -9" in seen.restarts[0]
            wait_for(lambda: len(seen.stale) == 2, timeout=30, message="the new child joined")
            assert rx.pid not in (None, old)
            assert seen.stale[-1] == (5, True)  # a rejoin: what was published meanwhile counts as missed
            post(pvs[DET], range(6, 16))
            wait_for(lambda: len(seen.uids()) == 14, timeout=20, message="frames after the restart")
            assert seen.uids() == list(range(2, 16))
    finally:
        rx.close()


# -- the IOC with --receive process --------------------------------------------------------------
R = "TST:RXPIOC:"
SIZE = 32
COUNTERS = ("Received", "Processed", "Dropped", "Rejected", "Backlog", "Missed")
#: SIGTERM to exit with a stream on, as tests/test_faults_ioc.py bounds it for the thread receiver
STOP_BOUND_S = 5.0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return build_ptychonn_onnx(tmp_path_factory.mktemp("models") / "tiny.onnx", size=SIZE, heads=("phase",),
                               base_channels=2, depth=2, seed=3)


def counters(ctx) -> dict[str, int]:
    return {n: int(v) for n, v in zip(COUNTERS, ctx.get([f"{R}{n}_RBV" for n in COUNTERS]))}


def accounted(c: dict[str, int]) -> bool:
    return c["Received"] == c["Processed"] + c["Dropped"] + c["Rejected"] + c["Backlog"]


def history(ctx) -> str:
    return text(ctx.get(R + "MessageHistory_RBV"))


def small(uid: int) -> np.ndarray:
    return pixels(uid, (SIZE, SIZE))


def receive_child(ioc_pid: int) -> int | None:
    """The pid of the IOC's receive process (spawned: ``multiprocessing.spawn`` on its command line)."""
    for task in Path(f"/proc/{ioc_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmd:
                return int(pid)
    return None


@pytest.fixture
def ioc(model, ctx):
    proc = IOCProcess(["ioc", "--prefix", R, "--no-ca", "--receive", "process"], R, next_slot()).start()
    try:
        ctx.put(R + "ModelPath", model, wait=True, timeout=60)  # the first load imports the runtime
        wait_for(lambda: int(ctx.get(R + "ModelStatus_RBV")) == 2, timeout=60, message="model ready")
        ctx.put(R + "Enable", 1, wait=True)
        yield proc
    finally:
        proc.stop()


def test_ioc_counts_a_join_a_killed_child_and_a_rejoin(ioc, ctx):
    with server(value(1, small(1))) as pvs:
        post(pvs[DET], range(2, 31), (SIZE, SIZE))  # at 30 before the IOC watches
        ctx.put(R + "InputPV", DET, wait=True)
        wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=30, message="connected")
        wait_for(lambda: "joined" in history(ctx) and "uniqueId 30" in history(ctx), timeout=10,
                 message="the join told")
        post(pvs[DET], range(31, 131), (SIZE, SIZE))
        c = wait_for(lambda: (c := counters(ctx))["Processed"] == 100 and c, timeout=30, message="100 processed",
                     state=lambda: counters(ctx))
        assert accounted(c) and c["Missed"] == 0 and c["Dropped"] == 0 and c["Received"] == 100
        child = receive_child(ioc.proc.pid)
        assert child is not None
        maps = Path(f"/proc/{child}/maps").read_text()
        assert "onnxruntime" not in maps and "libtorch" not in maps  # no inference runtime in the child
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: "receive process died" in history(ctx), timeout=20, message="the restart told",
                 state=lambda: history(ctx))
        assert int(ctx.get(R + "ReceiveRestarts_RBV")) == 1
        wait_for(lambda: (new := receive_child(ioc.proc.pid)) is not None and new != child, timeout=20,
                 message="a new child")
        post(pvs[DET], range(131, 141), (SIZE, SIZE))  # published while the new child connects: missed at most
        wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=30, message="reconnected")
        time.sleep(0.5)  # the rejoin's current value seen
        post(pvs[DET], range(141, 191), (SIZE, SIZE))
        c = wait_for(lambda: (c := counters(ctx))["Received"] + c["Missed"] == 190 - 30 and
                     c["Backlog"] == 0 and c, timeout=30, message="every uniqueId accounted",
                     state=lambda: counters(ctx))
        assert accounted(c) and c["Received"] >= 150 and c["Dropped"] == 0 and c["Rejected"] == 0, c
        assert int(ctx.get(R + "InputConnected_RBV")) == 1


def test_ioc_sigterm_with_the_receive_process_exits_0_within_a_bound(ioc, ctx):
    with server(value(1, small(1))) as pvs:
        ctx.put(R + "InputPV", DET, wait=True)
        wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=30, message="connected")
        child = receive_child(ioc.proc.pid)
        stop = threading.Event()

        def stream() -> None:
            uid = 2
            while not stop.is_set():
                post(pvs[DET], range(uid, uid + 20), (SIZE, SIZE))
                uid += 20
                time.sleep(0.01)

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        try:
            wait_for(lambda: counters(ctx)["Processed"] > 100, timeout=30, message="streaming")
            t0 = time.monotonic()
            ioc.proc.send_signal(signal.SIGTERM)
            rc = ioc.proc.wait(15)
            took = time.monotonic() - t0
        finally:
            stop.set()
            t.join(5)
    log = ioc.log()
    assert rc == 0 and took <= STOP_BOUND_S, (rc, took, log[-3000:])
    m = re.search(r"stopped: (\d+) received = (\d+) processed \+ (\d+) dropped \+ (\d+) rejected \+ (\d+) left", log)
    assert m, log[-3000:]
    received, processed, dropped, rejected, left = map(int, m.groups())
    assert received == processed + dropped + rejected + left and processed > 100
    assert child is not None
    wait_for(lambda: not Path(f"/proc/{child}").exists(), timeout=5, message="the receive process ended too")
