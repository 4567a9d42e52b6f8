"""GapCounter: uniqueId accounting (issue #17, finding 7), on exact sequences, with no network."""

from __future__ import annotations

import numpy as np
import pytest

from ptychostream.core.stats import INT32_MAX, saturate
from ptychostream.pipeline.receive import REORDER_WINDOW, GapCounter, Receiver

KEYS = ("missed", "outoforder", "duplicates", "restarts", "noid")


def run(uids, gaps: GapCounter | None = None) -> dict[str, int]:
    """Feed ``uids`` as received frames; the counts (received = len(uids) is not GapCounter's job)."""
    gaps = gaps or GapCounter()
    for uid in uids:
        gaps.update(uid)
    c = gaps.counters.snapshot()
    return {k: c[k] for k in KEYS}


def want(**counts: int) -> dict[str, int]:
    return {k: counts.get(k, 0) for k in KEYS}


@pytest.mark.parametrize("uids, expected", [
    pytest.param([1, 2, 3, 4, 5], want(), id="in order"),
    pytest.param([1, 2, 3, 6], want(missed=2), id="a gap"),
    # finding 7: 0 is NTNDArray's "not set", not a restart to count gaps from (was Missed +3)
    pytest.param([1, 2, 3, 0, 4, 5], want(noid=1), id="a zero uniqueId"),
    # finding 7: every frame arrived, the first three backwards (was Missed +2)
    pytest.param([20, 19, 18, 21, 22], want(outoforder=2), id="late frames before the base"),
    pytest.param([1, 2, 4, 3, 5], want(outoforder=1), id="a swap fills its gap"),
    pytest.param([1, 5, 4, 3, 2, 6], want(outoforder=3), id="a reversed run fills every gap"),
    pytest.param([1, 5, 3, 7], want(missed=3, outoforder=1), id="a gap partly filled"),
    pytest.param([1, 2, 2, 3, 3, 3], want(duplicates=3), id="repeats"),
    pytest.param([1, 2, 4, 3, 3], want(outoforder=1, duplicates=1), id="a late frame repeated"),
    pytest.param([20, 19, 19], want(outoforder=1, duplicates=1), id="a frame before the base repeated"),
    pytest.param([1, 2, 3, 1, 2, 3], want(restarts=1), id="restart at 1"),
    pytest.param([1, 2, 3, 0, 1, 2], want(noid=1, restarts=1), id="restart through 0"),
    pytest.param([5, 6, 1, 3], want(restarts=1, missed=1), id="gaps count from the restart"),
    pytest.param([1, 1], want(duplicates=1), id="1 twice is a repeat, not a restart"),
    # finding 7: -5 is not a frame count and does not wrap into 2,147,483,643 or a huge gap
    pytest.param([1, 2, -5, 3, 4], want(noid=1), id="a negative uniqueId"),
    pytest.param([-5, -4, 1, 2], want(noid=2), id="negative first"),
])
def test_sequences(uids, expected):
    assert run(uids) == expected


def test_a_step_back_beyond_the_window_is_a_restart_within_it_a_duplicate():
    w = REORDER_WINDOW
    far = [*range(1, w + 11), 5, 6, 7]  # back by more than the window: a new run from 5
    assert run(far) == want(restarts=1)
    near = [*range(1, 100), 50]  # back by 49, already seen
    assert run(near) == want(duplicates=1)
    assert run([100, 200, 150]) == want(missed=98, outoforder=1)  # a gap in the window is filled late


def test_a_gap_older_than_the_window_stays_missed():
    w = REORDER_WINDOW
    g = GapCounter()
    run([1, *range(3, w + 10)], g)
    assert g.counters.snapshot()["missed"] == 1 and not g._gaps  # 2 is forgotten as a gap, still missed
    # when 2 shows up at last it is more than a window back: by the rule, a source restart from 2
    assert run([2, 3], g) == want(missed=1, restarts=1)


def test_a_huge_jump_is_counted_in_full_and_saturates_on_the_pv():
    g = GapCounter()
    run([1, INT32_MAX], g)
    assert g.counters.snapshot()["missed"] == INT32_MAX - 2
    assert len(g._gaps) == REORDER_WINDOW  # only the newest window of the gap is remembered
    run([1, INT32_MAX], g)  # a restart, then the same jump again: 2**32 - 6 in Python ...
    missed = g.counters.snapshot()["missed"]
    assert missed == 2 * (INT32_MAX - 2) and missed > INT32_MAX
    assert saturate(missed) == INT32_MAX  # ... and 2**31 - 1 on the int32 PV, never negative
    assert saturate(-(2**40)) == -(2**31) and saturate(7) == 7


def test_join_sets_the_base_and_counts_nothing_before_it():
    g = GapCounter()
    g.join(18)  # joining a stream already at 18: 1..17 were published before we watched
    assert run([19, 20, 22], g) == want(missed=1)
    assert (g.base, g.high) == (18, 22)
    g.join(0)  # an IOC's empty start-up image: no base
    assert g.high is None
    assert run([5, 6], g) == want(missed=1)  # counting from 5 (the first frame), not from 0


def test_rejoin_counts_what_was_published_while_disconnected():
    g = GapCounter()
    run([1, 2, 3], g)
    g.join(10, rejoin=True)  # 4..10 published meanwhile; 10, the current value, is not taken in either
    assert run([11, 12], g) == want(missed=7)
    g.join(12, rejoin=True)  # nothing was published meanwhile
    assert run([13], g) == want(missed=7)
    g.join(1, rejoin=True)  # the source restarted while we were away: its current value is missed
    assert run([2, 3], g) == want(missed=8, restarts=1)
    h = GapCounter()
    h.join(5, rejoin=True)  # a "rejoin" with nothing seen yet is a join
    assert run([6], h) == want()


def test_reset_forgets_the_position_not_the_counts():
    g = GapCounter()
    run([1, 4], g)
    g.reset()
    assert run([100, 101], g) == want(missed=2)


def ntnd_value(uid: int, shape=(4, 6)):
    from p4p.nt import NTNDArray

    v = NTNDArray().wrap(np.arange(np.prod(shape), dtype=np.uint16).reshape(shape), attrib={"PositionX": ("d", 1.5)})
    v["uniqueId"] = uid
    return v


def test_receiver_tells_connect_on_a_change_not_on_every_frame():
    from p4p.client.thread import Disconnected
    from p4p.nt import NTScalar

    frames, bad, connects, stale = [], [], [], []
    r = Receiver(frames.append, bad.append, lambda ok, text: connects.append(ok))
    r.on_stale = lambda uid, rejoin: stale.append((uid, rejoin))
    for uid in range(1, 6):
        r._callback(ntnd_value(uid))
    assert connects == [True] and stale == [(1, False)] and [f.unique_id for f in frames] == [2, 3, 4, 5]
    assert frames[0].array.shape == (4, 6) and frames[0].attributes == {"ColorMode": 0, "PositionX": 1.5}
    r._callback(Disconnected())
    r._callback(ntnd_value(9))   # the current value after reconnecting: stale, a rejoin
    r._callback(ntnd_value(10))
    assert connects == [True, False, True] and stale == [(1, False), (9, True)] and frames[-1].unique_id == 10
    r._callback(ntnd_value(11, shape=(2, 3, 4)))  # a bad frame while connected: counted, still connected
    r._callback(NTScalar("d").wrap(1.0))
    assert len(bad) == 2 and "3 dimensions" in bad[0] and connects == [True, False, True]
