"""Publisher in-process: every result to the listeners, image posts decimated by PublishRate."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from manual_clock import Clock

from ptychostream.core.device import DeviceState
from ptychostream.core.frames import BatchResult, ImageFrame
from ptychostream.core.pvdb import load_db
from ptychostream.pipeline import publish
from ptychostream.pipeline.publish import Publisher


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def setup(clock):
    device = DeviceState(load_db("reconstructor.db"))
    posts: list[tuple[str, ImageFrame]] = []
    device.add_image_sink(lambda spec, frame: posts.append((spec.suffix, frame)))
    pub = Publisher(device, clock=clock)
    results: list[BatchResult] = []
    pub.add_listener(results.append)
    return pub, posts, results


def batch(first_uid: int, n: int, heads=("phase", "amplitude")) -> BatchResult:
    frames = [ImageFrame(np.zeros((4, 4), np.uint16), unique_id=first_uid + i, timestamp=10.0 + i,
                         data_timestamp=20.0 + i, attributes={"ColorMode": 0, "PositionX": float(i)})
              for i in range(n)]
    outputs = {h: np.stack([np.full((2, 2), first_uid + i + k, np.float32) for i in range(n)])
               for k, h in enumerate(heads)}
    return BatchResult(frames, outputs, latency_s=np.full(n, 0.0125), model_id="abc123", pixel_m=1e-8)


def posted(posts, pv: str) -> list[int]:
    return [f.unique_id for name, f in posts if name == pv]


def test_rate_zero_posts_every_frame_with_its_metadata(setup):
    pub, posts, results = setup
    b = batch(1, 3)
    pub.publish(b)
    assert results == [b]
    assert posted(posts, "Phase") == [1, 2, 3] and posted(posts, "Amplitude") == [1, 2, 3]
    name, img = posts[0]
    assert name == "Phase"
    np.testing.assert_array_equal(img.array, np.full((2, 2), 1.0))
    assert (img.timestamp, img.data_timestamp) == (10.0, 20.0)
    assert img.attributes == {"PositionX": 0.0, "LatencyMs": 12.5, "ModelId": "abc123"}
    amp = [f for n, f in posts if n == "Amplitude"][2]
    np.testing.assert_array_equal(amp.array, np.full((2, 2), 4.0))
    assert b.frames[0].attributes["ColorMode"] == 0  # the input frame is left as it was


def test_rate_limits_image_posts_but_not_listeners(setup, clock):
    pub, posts, results = setup
    assert pub.set_rate(10.0) == 10.0
    pub.publish(batch(1, 3))    # t=100.00: posts the last frame of the batch
    clock.t += 0.05
    pub.publish(batch(4, 3))    # t=100.05: within 1/10 s, no post
    clock.t += 0.049
    pub.publish(batch(7, 2))    # t=100.099: still within
    clock.t += 0.001
    pub.publish(batch(9, 1))    # t=100.10: the next post is due
    clock.t += 5.0
    pub.publish(batch(10, 4))   # long after: one post, not a burst of the missed ones
    assert [r.frames[0].unique_id for r in results] == [1, 4, 7, 9, 10]
    assert posted(posts, "Phase") == [3, 9, 13]
    assert posted(posts, "Amplitude") == [3, 9, 13]


def test_set_rate_resets_the_schedule_and_clamps(setup, clock):
    pub, posts, _ = setup
    pub.set_rate(1.0)
    pub.publish(batch(1, 1))
    pub.publish(batch(2, 1))
    assert posted(posts, "Phase") == [1]
    pub.set_rate(2.0)           # a new rate posts the next result at once
    pub.publish(batch(3, 1))
    assert posted(posts, "Phase") == [1, 3]
    assert pub.set_rate(-5.0) == 0.0
    pub.publish(batch(4, 2))
    assert posted(posts, "Phase") == [1, 3, 4, 5]


def test_missing_head_is_not_posted(setup):
    pub, posts, results = setup
    pub.publish(batch(1, 2, heads=("phase",)))
    assert posted(posts, "Phase") == [1, 2] and posted(posts, "Amplitude") == []
    assert len(results) == 1


def test_remove_listener_by_an_equal_bound_method(setup):
    pub, _, results = setup
    other: list[BatchResult] = []
    pub.add_listener(other.append)
    pub.publish(batch(1, 1))
    pub.remove_listener(other.append)  # a new bound-method object, as the recorder's rec.submit is
    pub.publish(batch(2, 1))
    assert [len(other), len(results)] == [1, 2]
    assert pub.listeners == [results.append]


def with_consistency(b: BatchResult, figures) -> BatchResult:
    b.consistency = np.asarray(figures, dtype=np.float32)
    return b


def test_consistency_is_an_attribute_of_each_posted_image_where_finite(setup):
    pub, posts, _ = setup
    pub.publish(with_consistency(batch(1, 3), [0.25, np.nan, np.inf]))
    pub.publish(batch(4, 1))  # no consistency computed: no attribute
    got = {(name, f.unique_id): f.attributes.get("Consistency") for name, f in posts}
    assert got == {("Phase", 1): 0.25, ("Amplitude", 1): 0.25, ("Phase", 2): None, ("Amplitude", 2): None,
                   ("Phase", 3): None, ("Amplitude", 3): None, ("Phase", 4): None, ("Amplitude", 4): None}
    assert isinstance(posts[0][1].attributes["Consistency"], float)


class Gate:
    """An image sink that holds the poster thread until opened."""

    def __init__(self, posts) -> None:
        self.posts, self.open, self.entered = posts, threading.Event(), threading.Event()

    def __call__(self, spec, frame) -> None:
        self.entered.set()
        assert self.open.wait(10), "gate never opened"
        self.posts.append((spec.suffix, frame))


@pytest.fixture
def threaded():
    device = DeviceState(load_db("reconstructor.db"))
    posts: list[tuple[str, ImageFrame]] = []
    gate = Gate(posts)
    device.add_image_sink(gate)
    pub = Publisher(device)
    results: list[BatchResult] = []
    pub.add_listener(results.append)
    pub.start()
    yield pub, posts, results, gate
    gate.open.set()
    pub.stop()


def test_started_publisher_posts_every_frame_in_order_off_the_calling_thread(threaded):
    pub, posts, results, gate = threaded
    callers: list[str] = []
    pub.device.add_image_sink(lambda spec, frame: callers.append(threading.current_thread().name))
    gate.open.set()
    for first, n in ((1, 3), (4, 2), (6, 2)):
        pub.publish(batch(first, n))
    assert [r.frames[0].unique_id for r in results] == [1, 4, 6]  # listeners at once, on this thread
    assert pub.flush(10)
    assert posted(posts, "Phase") == [1, 2, 3, 4, 5, 6, 7] and posted(posts, "Amplitude") == [1, 2, 3, 4, 5, 6, 7]
    assert set(callers) == {"ptychostream-publish"} and pub.skipped == 0


def test_rate_capped_posts_take_the_latest_result_when_the_poster_is_busy(threaded):
    pub, posts, results, gate = threaded
    pub.set_rate(1e5)  # every result is due; the busy poster keeps only the newest waiting one
    pub.publish(batch(1, 2))
    assert gate.entered.wait(10)  # the poster is inside the post of uid 2, held
    for first in (3, 5, 7):
        pub.publish(batch(first, 2))
    gate.open.set()
    assert pub.flush(10)
    assert posted(posts, "Phase") == [2, 8] and len(results) == 4 and pub.skipped == 0


def test_a_poster_too_far_behind_skips_the_oldest_posts_and_counts_them(threaded, monkeypatch):
    monkeypatch.setattr(publish, "MAX_PENDING", 4)
    pub, posts, results, gate = threaded
    pub.publish(batch(1, 1))
    assert gate.entered.wait(10)
    for first in range(2, 10, 2):  # 4 batches of 2 frames wait: 8 > 4, the oldest two batches go
        pub.publish(batch(first, 2))
    assert pub.skipped == 4
    gate.open.set()
    assert pub.flush(10)
    assert posted(posts, "Phase") == [1, 6, 7, 8, 9]
    assert len(results) == 5  # every result still reached the listeners
    (entry,) = [e for e in pub.device.messages.entries() if "were not posted" in e.text]
    assert entry.frames == 4


def test_stop_posts_what_is_pending_then_posts_inline(threaded):
    pub, posts, _, gate = threaded
    pub.publish(batch(1, 2))
    gate.open.set()
    pub.stop()
    assert posted(posts, "Phase") == [1, 2]
    pub.publish(batch(3, 1))  # no thread any more: posted before publish returns
    assert posted(posts, "Phase") == [1, 2, 3]
