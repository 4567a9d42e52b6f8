"""FrameQueue in-process: drop policies, capacity, batches, requeue and backlog accounting."""

from __future__ import annotations

import threading
import time

import pytest

from ptychostream.core.pvdb import load_db
from ptychostream.pipeline.queue import POLICIES, FrameQueue


def uids(batch) -> list[int]:
    return [q.frame for q in batch]


def filled(n: int, limit: int, policy: str) -> FrameQueue:
    q = FrameQueue(limit=limit, policy=policy)
    for i in range(n):
        q.put(i)
    return q


def test_policies_match_the_db_enum():
    assert POLICIES == load_db("reconstructor.db")["BacklogPolicy"].enum_strs


def test_drop_newest_keeps_the_first_frames_and_counts_the_rest():
    q = FrameQueue(limit=3, policy="DropNewest")
    assert [q.put(i) for i in range(5)] == [True, True, True, False, False]
    assert (len(q), q.dropped, q.backlog) == (3, 2, 3)
    assert uids(q.get_batch(10, timeout=0)) == [0, 1, 2]


def test_drop_oldest_keeps_the_last_frames_and_counts_the_rest():
    q = FrameQueue(limit=3, policy="DropOldest")
    assert all(q.put(i) for i in range(5))  # the new frame is always kept
    assert (len(q), q.dropped) == (3, 2)
    assert uids(q.get_batch(10, timeout=0)) == [2, 3, 4]


def test_policy_and_limit_change_at_run_time():
    q = filled(4, limit=4, policy="DropNewest")
    assert q.set_policy("DropOldest") == "DropOldest"
    q.put(4)
    assert uids(q.get_batch(1, timeout=0)) == [1]
    with pytest.raises(ValueError, match="unknown policy 'DropAll'"):
        q.set_policy("DropAll")
    assert q.policy == "DropOldest"
    with pytest.raises(ValueError, match="at least 1"):
        q.set_limit(0)
    # a lower limit keeps what is queued above it; new frames are dropped until it drains
    assert q.set_limit(2) == 2
    q.set_policy("DropNewest")
    assert not q.put(5)
    assert (len(q), q.dropped) == (3, 2)
    assert uids(q.get_batch(2, timeout=0)) == [2, 3]
    assert q.put(6) and not q.put(7)
    assert uids(q.get_batch(5, timeout=0)) == [4, 6]


def test_get_batch_sizes_in_order():
    q = filled(10, limit=100, policy="DropNewest")
    assert uids(q.get_batch(4)) == [0, 1, 2, 3]
    assert uids(q.get_batch(4)) == [4, 5, 6, 7]
    assert uids(q.get_batch(4)) == [8, 9]
    assert (len(q), q.inflight, q.backlog) == (0, 10, 10)


def test_get_batch_times_out_empty():
    q = FrameQueue()
    t0 = time.monotonic()
    assert q.get_batch(8, timeout=0.05) == []
    assert time.monotonic() - t0 >= 0.04
    assert q.inflight == 0


def test_get_batch_wakes_on_put():
    q = FrameQueue()
    got: list[list[int]] = []
    started = threading.Event()

    def take() -> None:
        started.set()
        got.append(uids(q.get_batch(8, timeout=30)))

    t = threading.Thread(target=take)
    t.start()
    started.wait(5)
    t0 = time.monotonic()
    q.put(7)
    t.join(10)
    assert got == [[7]] and time.monotonic() - t0 < 10


def test_requeue_puts_the_batch_back_at_the_head_in_order():
    q = filled(5, limit=100, policy="DropNewest")
    batch = q.get_batch(3)
    q.put(5)
    assert (q.inflight, q.backlog) == (3, 6)
    q.requeue(batch)
    assert (q.inflight, len(q), q.backlog) == (0, 6, 6)
    assert uids(q.get_batch(100)) == [0, 1, 2, 3, 4, 5]


def test_done_and_backlog_accounting():
    q = filled(6, limit=100, policy="DropNewest")
    batch = q.get_batch(4)
    assert (len(q), q.inflight, q.backlog) == (2, 4, 6)
    q.done(len(batch))
    assert (len(q), q.inflight, q.backlog) == (2, 0, 2)
    assert q.clear() == 2
    assert (len(q), q.backlog, q.dropped) == (0, 0, 0)


def test_received_equals_queued_plus_dropped_under_both_policies():
    for policy in POLICIES:
        q = FrameQueue(limit=7, policy=policy)
        for i in range(25):
            q.put(i)
        taken = q.get_batch(3)
        q.done(len(taken))
        assert 25 == len(taken) + q.dropped + q.backlog, policy
        assert q.dropped == 18


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "state not reached"
        time.sleep(0.001)


def test_linger_waits_for_a_full_batch_and_wakes_when_it_is_full():
    q = FrameQueue()
    q.put(0)
    got: list = []
    taker = threading.Thread(target=lambda: got.append(q.get_batch(4, timeout=5, linger=30)))
    taker.start()
    wait_until(lambda: q._want == 4)  # lingering for a full batch of 4
    for i in (1, 2, 3):
        q.put(i)
    taker.join(10)
    assert not taker.is_alive()  # woken by the 4th frame, long before the 30 s linger
    assert uids(got[0]) == [0, 1, 2, 3] and q.inflight == 4


def test_linger_gives_up_with_what_is_there():
    q = FrameQueue()
    q.put(0)
    assert uids(q.get_batch(4, timeout=0, linger=0.01)) == [0]
    assert uids(q.get_batch(4, timeout=0, linger=0.01)) == []  # an empty queue does not linger
    q.put(1)
    q.put(2)
    assert uids(q.get_batch(2, timeout=0, linger=30)) == [1, 2]  # full already: no wait
