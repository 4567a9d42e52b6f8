"""The stitch stage thread in-process: idle, it sleeps on its inbox instead of spinning."""

from __future__ import annotations

import queue
import threading
import time

from ptychostream.core.device import DeviceState
from ptychostream.core.pvdb import load_db
from ptychostream.pipeline.stitch import MosaicStage


class CountingQueue(queue.Queue):
    """A real queue that counts how often the stage asks it for a message."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.gets = 0
        self._count_lock = threading.Lock()

    def get(self, block: bool = True, timeout: float | None = None):
        with self._count_lock:
            self.gets += 1
        return super().get(block, timeout)


def test_idle_stage_waits_on_its_inbox():
    """With nothing to publish and the publish time long past, the stage polls at its 50 ms tick.

    It used to ask its inbox with a zero timeout in that state: an idle reconstructor burned
    most of a CPU core (77 % measured) on the stitch thread, holding the GIL.
    """
    stage = MosaicStage(DeviceState(load_db("reconstructor.db")), lambda text, severity: None)
    stage.inbox = CountingQueue(stage.inbox.maxsize)
    stage.start()
    try:
        time.sleep(0.1)  # past the first publish time, with a clean mosaic
        before = stage.inbox.gets
        time.sleep(1.0)  # the quiet second under test
        polls = stage.inbox.gets - before
    finally:
        stage.stop()
        stage.join(5)
    assert not stage.is_alive()
    # a 50 ms tick gives about 20 polls a second; a spinning loop gives tens of thousands
    assert 5 <= polls <= 60, polls


def _batch(first_uid: int, n: int = 8, shape: tuple[int, int] = (32, 32)):
    import numpy as np

    from ptychostream.core.frames import BatchResult, ImageFrame

    frames = [ImageFrame(np.ones((256, 256), np.uint16), first_uid + i, attributes={"PositionX": 1e-6 * i,
                                                                                    "PositionY": 0.0})
              for i in range(n)]
    out = {"phase": np.zeros((n, *shape), np.float32), "amplitude": np.ones((n, *shape), np.float32)}
    return BatchResult(frames, out, np.zeros(n), "m", pixel_m=1e-8)


def test_the_inbox_holds_outputs_not_raw_frames_and_is_bounded_in_bytes(monkeypatch):
    """A stitcher that falls behind holds each waiting frame's outputs and metadata only, at most
    INBOX_BYTES of them; the frames beyond are counted as lost (Unpositioned), with a message."""
    import ptychostream.pipeline.stitch as stitch

    per_batch = 2 * 8 * 32 * 32 * 4  # phase and amplitude, float32
    monkeypatch.setattr(stitch, "INBOX_BYTES", 3 * per_batch)
    said: list[str] = []
    stage = MosaicStage(DeviceState(load_db("reconstructor.db")), lambda text, severity: said.append(text))
    for k in range(5):  # the stage thread is not started: nothing leaves the inbox
        stage.on_result(_batch(1 + 8 * k))
    assert stage.inbox.qsize() == 3 and stage._inbox_bytes == 3 * per_batch
    assert stage.lost == 16 and stage.status()["Unpositioned_RBV"] == 16
    assert said == ["stitcher behind: 8 frame(s) not stitched"] * 2
    kind, light, size = stage.inbox.get_nowait()
    assert kind == "batch" and size == per_batch
    assert all(f.array.size == 0 for f in light.frames), "raw frames reached the stitch inbox"
    assert [f.unique_id for f in light.frames] == list(range(1, 9))
    assert light.frames[3].attributes["PositionX"] == 3e-6 and light.outputs["phase"].shape == (8, 32, 32)


def test_a_pass_stitches_every_waiting_batch_and_counts_the_inbox_down():
    """Batches waiting together are stitched in one pass (one canvas update); patch shapes may
    change between them (a model swap), and the inbox's byte count returns to zero."""
    stage = MosaicStage(DeviceState(load_db("reconstructor.db")), lambda text, severity: None)
    stage.on_result(_batch(1))
    stage.on_result(_batch(9))
    stage.on_result(_batch(17, shape=(16, 16)))
    stage._drain(stage.inbox.get_nowait())
    assert stage.inbox.empty() and stage._inbox_bytes == 0
    assert stage.status()["Stitched_RBV"] == 8  # the stitcher was rebuilt for the 16x16 patches of the last batch
    assert stage.stitcher is not None and stage.stitcher.patch_shape == (16, 16)


COUNTS = ("Stitched_RBV", "Unpositioned_RBV", "PositionErrors_RBV", "StitchBacklog_RBV")


def _mixed_batch(first_uid: int, n: int = 8):
    """n frames of which every fourth carries no position (it waits, then times out unpositioned)."""
    import numpy as np

    from ptychostream.core.frames import BatchResult, ImageFrame

    frames = []
    for uid in range(first_uid, first_uid + n):
        attrs = {} if uid % 4 == 0 else {"PositionX": 1e-7 * (uid % 40), "PositionY": 1e-7 * (uid // 40)}
        frames.append(ImageFrame(np.zeros((0, 0), np.uint8), uid, attributes=attrs))
    out = {"phase": np.zeros((n, 16, 16), np.float32)}
    return BatchResult(frames, out, np.zeros(n), "m", pixel_m=1e-8)


def test_stitch_backlog_closes_the_frame_count_at_any_time():
    """Every frame handed to the running stage is in exactly one of Stitched, Unpositioned, PositionErrors
    and StitchBacklog, whenever status() is read (the IOC's 10 Hz task reads it from another thread):
    in the inbox, in the stitch thread's hands, waiting for a position, or counted."""
    stage = MosaicStage(DeviceState(load_db("reconstructor.db")), lambda text, severity: None)
    stage.configure(timeout_s=0.3)
    stage.start()
    handed, seen_backlog, waits = 0, 0, 0
    try:
        for k in range(60):
            stage.on_result(_mixed_batch(1 + 8 * k))
            handed += 8
            for _ in range(20):  # read while the stitch thread works
                s = stage.status()
                assert sum(s[name] for name in COUNTS) == handed, (k, s)
                seen_backlog = max(seen_backlog, s["StitchBacklog_RBV"])
                waits = max(waits, s["PositionWait_RBV"])
            time.sleep(0.002)  # let the stitch thread take some
        stage.on_result(_mixed_batch(401))  # a batch again: duplicate frames, position errors
        handed += 8
        deadline = time.monotonic() + 5
        while stage.status()["StitchBacklog_RBV"] and time.monotonic() < deadline:
            s = stage.status()
            assert sum(s[name] for name in COUNTS) == handed, s
            waits = max(waits, s["PositionWait_RBV"])
            time.sleep(0.01)
        s = stage.status()
    finally:
        stage.stop()
        stage.join(5)
    assert seen_backlog > 0 and waits > 0  # frames were seen waiting, not only counted
    assert s["StitchBacklog_RBV"] == 0 and s["PositionWait_RBV"] == 0, s
    # 3 of 4 frames carry a position; the 1 of 4 without waited 0.3 s and was released unpositioned;
    # the repeated batch's 8 frames are duplicates
    assert (s["Stitched_RBV"], s["Unpositioned_RBV"], s["PositionErrors_RBV"]) == (360, 120, 8), s


def test_stitch_backlog_counts_the_inbox_and_the_joiner():
    """Without the stage thread: frames in the inbox are backlog; taken into the joiner (Table positions
    not yet there) they still are, and PositionWait says so; placed, they are Stitched."""
    import numpy as np

    stage = MosaicStage(DeviceState(load_db("reconstructor.db")), lambda text, severity: None)
    stage._configure({"source": "Table"})
    stage.on_result(_batch(1))
    stage.on_result(_batch(9))
    s = stage.status()
    assert (s["StitchBacklog_RBV"], s["PositionWait_RBV"], s["Stitched_RBV"]) == (16, 0, 0)
    stage._drain(stage.inbox.get_nowait())  # both batches, into the joiner
    s = stage.status()
    assert (s["StitchBacklog_RBV"], s["PositionWait_RBV"], s["Stitched_RBV"]) == (16, 16, 0)
    stage.add_positions(np.arange(1, 6), np.zeros(5), 1e-7 * np.arange(5))
    stage._drain(stage.inbox.get_nowait())
    s = stage.status()
    assert (s["StitchBacklog_RBV"], s["PositionWait_RBV"], s["Stitched_RBV"]) == (11, 11, 5)
