"""FrameRing (shared memory, one process here), FrameQueue.put_many and GapCounter.update_many: exact values."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest

from ptychostream.core.frames import ImageFrame
from ptychostream.pipeline.queue import FrameQueue
from ptychostream.pipeline.receive import GapCounter
from ptychostream.pipeline.ring import (
    ATTR_BYTES,
    MAX_SLOTS,
    MIN_SLOTS,
    REFUSED,
    FrameRing,
    ring_slots,
)

_names = itertools.count()


def frame(uid: int, shape=(4, 6), dtype=np.uint16, attrs: dict | None = None) -> ImageFrame:
    a = (np.arange(np.prod(shape)) + uid).astype(dtype).reshape(shape)
    return ImageFrame(a, uid, 1000.0 + uid, 2000.0 + uid if uid % 2 else None,
                      attrs if attrs is not None else {"PositionX": uid * 0.5, "PositionY": -uid, "Name": f"f{uid}"})


@pytest.fixture
def make_ring():
    rings: list[FrameRing] = []

    def make(slots: int, slot_bytes: int) -> tuple[FrameRing, FrameRing]:
        name = f"ptytest{os.getpid()}_{next(_names)}"
        writer = FrameRing(name, slots, slot_bytes, create=True)
        reader = FrameRing(name)  # attached by name, as the other process does
        rings.extend((writer, reader))
        return writer, reader

    yield make
    for r in rings:
        r.unlink()
        r.close()


def same(got: ImageFrame, want: ImageFrame) -> None:
    assert got.unique_id == want.unique_id
    assert got.array.dtype == want.array.dtype and got.array.shape == want.array.shape
    np.testing.assert_array_equal(got.array, want.array)
    assert got.timestamp == want.timestamp
    assert (got.data_timestamp is None) == (want.data_timestamp is None)
    if want.data_timestamp is not None:
        assert got.data_timestamp == want.data_timestamp
    assert got.attributes == want.attributes


def test_batch_read_returns_what_was_written_in_order_as_views_of_one_array(make_ring):
    w, r = make_ring(8, 48)
    sent = [frame(u) for u in range(1, 6)]
    assert all(w.write(f) for f in sent)
    assert r.ready() == 5
    got = r.read()
    assert r.ready() == 0 and r.read() == []
    for g, f in zip(got, sent):
        same(g, f)
    base = got[0].array.base
    assert base is not None and all(g.array.base is base for g in got)  # one copy, frames as views
    got[0].array[0, 0] = 999  # a fresh array: the slot is not touched
    w.write(frame(6))
    assert r.read()[0].unique_id == 6


def test_wrap_keeps_order_across_the_end_of_the_ring(make_ring):
    w, r = make_ring(4, 48)
    sent = []
    uid = itertools.count(1)
    for burst in (3, 3, 4, 2, 4):  # the read position walks round the ring several times
        batch = [frame(next(uid)) for _ in range(burst)]
        assert all(w.write(f) for f in batch)
        sent += batch
        got = r.read()
        assert [g.unique_id for g in got] == [f.unique_id for f in batch]
        for g, f in zip(got, batch):
            same(g, f)
    assert int(w.header[0]) == len(sent) == 16


def test_full_ring_refuses_and_counts_then_takes_again(make_ring):
    w, r = make_ring(3, 48)
    assert [w.write(frame(u)) for u in range(1, 6)] == [True, True, True, False, False]
    assert w.free() == 0 and int(r.header[REFUSED]) == 2
    assert [g.unique_id for g in r.read()] == [1, 2, 3]
    assert w.write(frame(6))
    assert [g.unique_id for g in r.read()] == [6]


def test_read_upto_a_count_leaves_the_later_frames(make_ring):
    w, r = make_ring(8, 48)
    for u in range(1, 6):
        w.write(frame(u))
    assert [g.unique_id for g in r.read(upto=2)] == [1, 2]
    assert [g.unique_id for g in r.read(upto=99)] == [3, 4, 5]


def test_smaller_frames_of_other_shapes_and_types_share_a_ring_in_runs(make_ring):
    w, r = make_ring(8, 4 * 6 * 8)
    sent = [frame(1), frame(2), frame(3, (2, 3), np.float64), frame(4, (5, 1), np.int8), frame(5), frame(6)]
    assert all(w.write(f) for f in sent)
    got = r.read()
    for g, f in zip(got, sent):
        same(g, f)
    assert got[0].array.base is got[1].array.base  # one run of (4, 6) uint16
    assert got[4].array.base is got[5].array.base and got[4].array.base is not got[0].array.base


def test_what_does_not_fit_is_said_before_writing(make_ring):
    w, _ = make_ring(4, 48)
    assert w.fits(frame(1))
    assert not w.fits(frame(2, (5, 6)))  # 60 bytes > 48
    assert not w.fits(ImageFrame(np.zeros((2, 2), complex)))  # no code for the type
    with pytest.raises(ValueError, match="attributes"):
        w.write(frame(3, attrs={"big": "x" * ATTR_BYTES}))
    assert w.ready() == 0


def test_empty_attributes_and_no_data_time_stamp(make_ring):
    w, r = make_ring(4, 48)
    f = ImageFrame(np.ones((4, 6), np.uint16), 7, 5.0, None, {})
    w.write(f)
    (g,) = r.read()
    same(g, f)
    assert g.data_timestamp is None and not math.isnan(g.timestamp)


def test_batch_buffers_are_reused_once_no_frame_views_them(make_ring):
    w, r = make_ring(8, 48)
    for u in (1, 2):
        w.write(frame(u))
    kept = r.read()
    base = id(kept[0].array.base)
    for u in (3, 4):
        w.write(frame(u))
    second = r.read()
    assert id(second[0].array.base) != base  # the first batch is still viewed: not reused
    assert [f.unique_id for f in kept] == [1, 2]
    np.testing.assert_array_equal(kept[1].array, frame(2).array)  # untouched by the second read
    del kept
    w.write(frame(5))
    assert id(r.read()[0].array.base) == base  # free again: reused


def test_ring_slots_follow_the_budget():
    assert ring_slots(32768, 32 * 2**20) == 1024
    assert ring_slots(1, 2**30) == MAX_SLOTS
    assert ring_slots(2**30) == MIN_SLOTS


def test_put_many_drops_as_many_puts_would():
    for policy in ("DropNewest", "DropOldest"):
        one, many = FrameQueue(limit=5, policy=policy), FrameQueue(limit=5, policy=policy)
        for q in (one, many):
            for u in (1, 2, 3):
                q.put(u)
        kept = [one.put(u) for u in range(4, 10)]
        assert many.put_many(list(range(4, 10))) == sum(kept)
        assert many.dropped == one.dropped == 4
        assert [i.frame for i in many.get_batch(10)] == [i.frame for i in one.get_batch(10)]
    q = FrameQueue(limit=2, policy="DropNewest")
    assert q.put_many([]) == 0 and q.put_many([1, 2, 3]) == 2 and q.dropped == 1
    q.count_dropped(3)
    assert q.dropped == 4


def test_update_many_counts_as_updates_would():
    uids = [1, 2, 5, 4, 4, 9, 1, 2, 0, 3]
    one, many = GapCounter(), GapCounter()
    for u in uids:
        one.update(u)
    many.update_many(uids)
    assert many.counters.snapshot() == one.counters.snapshot()
    c = many.counters.snapshot()
    assert (c["missed"], c["outoforder"], c["duplicates"], c["restarts"], c["noid"]) == (4, 1, 1, 1, 1)


# -- the receive process's two channels, in one process: the writer's side and the reader's ---------
def test_pipe_messages_and_ring_frames_arrive_in_the_order_written():
    import multiprocessing

    from ptychostream.pipeline.receive_process import (
        SHRINK_AFTER,
        ProcessReceiver,
        RingWriter,
    )

    log: list[tuple] = []
    rx = ProcessReceiver(lambda fs: log.extend(("frame", f.unique_id, f.array.shape) for f in fs),
                         lambda reason: log.append(("bad", reason)), lambda ok, text: log.append(("connect", ok)),
                         lambda uids: log.append(("dropped", list(uids))))
    rx.on_stale = lambda uid, rejoin: log.append(("stale", uid, rejoin))
    parent, child = multiprocessing.Pipe()
    ctl = multiprocessing.RawArray("q", 4)
    # a ring of MIN_SLOTS slots: budget for fewer
    writer = RingWriter(child, ctl, f"ptytest{os.getpid()}_{next(_names)}", ring_bytes=1)
    rx._conn, rx._ctl = parent, np.frombuffer(ctl, np.int64)

    def take() -> None:
        while rx._received < int(rx._ctl[0]) or (rx._ring is not None and rx._ring.ready()):
            rx._take(parent, rx._ctl)

    try:
        writer.send("connect", True, "")
        writer.send("stale", 1)
        for u in range(2, 6):
            writer.frame(frame(u))
        writer.send("bad", "odd")
        for u in range(6, 8):
            writer.frame(frame(u))
        writer.frame(frame(8, (8, 6)))  # larger: a new layout, in order
        writer.frame(ImageFrame(np.zeros((2, 2), complex), 9))  # no ring code: over the pipe
        take()
        want = [("connect", True), ("stale", 1, False), *[("frame", u, (4, 6)) for u in range(2, 6)], ("bad", "odd"),
                ("frame", 6, (4, 6)), ("frame", 7, (4, 6)), ("frame", 8, (8, 6)), ("frame", 9, (2, 2))]
        assert log == want
        log.clear()
        full = 10 + MIN_SLOTS
        for u in range(10, full + 4):  # MIN_SLOTS fit, the 4 after are refused while nobody reads
            writer.frame(frame(u, (8, 6)))
        writer.flush()
        take()
        writer.frame(frame(full + 4, (8, 6)))
        take()
        assert log == [*[("frame", u, (8, 6)) for u in range(10, full)], ("dropped", list(range(full, full + 4))),
                       ("frame", full + 4, (8, 6))]
        log.clear()
        first = full + 5
        for u in range(first, first + SHRINK_AFTER + 5):  # small for a while: laid out again, nothing lost
            writer.frame(frame(u, (2, 2)))
            if u % 10 == 0:
                take()
        take()
        assert [e[1] for e in log] == list(range(first, first + SHRINK_AFTER + 5))
        assert writer.ring is not None and writer.ring.slot_bytes == 2 * 2 * 2
    finally:
        rx._drain_ring()
        if writer.ring is not None:
            writer.ring.unlink()
            writer.ring.close()
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"ptytest{os.getpid()}_")]
