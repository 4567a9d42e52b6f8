"""RateMeter: events per second over the last window, in bins, with a hand-moved clock."""

from __future__ import annotations

import pytest

from ptychostream.core.stats import RateMeter


def test_rate_counts_the_events_of_the_last_window():
    m = RateMeter(window=1.0, bucket=0.01)
    for i in range(1000):  # 1,000 events over 0.5 s, 20 per 10 ms bin
        m.add(1, now=100.0 + i * 0.0005)
    assert m.rate(now=100.5) == pytest.approx(1000.0)
    assert m.rate(now=101.25) == pytest.approx(500.0, abs=21)  # the bins before 100.25 left (within one bin)
    assert m.rate(now=102.0) == 0.0
    m.add(5, now=102.0)
    assert m.rate(now=102.0) == 5.0
    m.reset()
    assert m.rate(now=102.0) == 0.0


def test_batches_count_their_frames():
    m = RateMeter()
    m.add(256, now=10.0)
    m.add(44, now=10.5)
    assert m.rate(now=10.9) == 300.0
