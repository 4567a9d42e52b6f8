"""Batcher in-process with a real tiny ONNX model, FrameQueue, Publisher and DeviceState."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import wait_for

from ptychostream.core.device import DeviceState
from ptychostream.core.frames import BatchResult, ImageFrame
from ptychostream.core.pvdb import load_db
from ptychostream.core.stats import Counters, LatencyWindow, RateMeter
from ptychostream.model.infer import Model, ModelError, open_model
from ptychostream.model.preprocess import Preprocess
from ptychostream.model.zoo import build_bounded_onnx, build_ptychonn_onnx
from ptychostream.pipeline.batcher import (
    NONFINITE_REASON,
    Batcher,
    OutputHealth,
    RecentFrames,
)
from ptychostream.pipeline.publish import Publisher
from ptychostream.pipeline.queue import FrameQueue

SIZE = 32


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "a": build_ptychonn_onnx(folder / "a.onnx", size=SIZE, heads=("phase",), base_channels=2, depth=2),
        "b": build_ptychonn_onnx(folder / "b.onnx", size=SIZE, heads=("phase", "amplitude"), base_channels=2,
                                 depth=2, seed=1),
        # phase = sqrt(100 - x): finite on Poisson(5) counts, NaN on a frame with a pixel above 100
        "bounded": build_bounded_onnx(folder / "bounded.onnx", size=SIZE, limit=100.0),
        "c16": build_ptychonn_onnx(folder / "c16.onnx", size=SIZE // 2, heads=("phase",), base_channels=2, depth=2),
    }


def load(path: str) -> Model:
    return open_model(path, backend="ONNXRuntime-CPU", threads=1)


@dataclass
class Pipe:
    """The data path of one reconstructor, without receive or any protocol."""

    queue: FrameQueue
    batcher: Batcher
    device: DeviceState
    counters: Counters
    results: list[BatchResult] = field(default_factory=list)
    rejects: list[tuple[int, str]] = field(default_factory=list)
    phase_posts: list[int] = field(default_factory=list)
    next_uid: int = 1

    def feed(self, *arrays: np.ndarray) -> list[int]:
        """Queue frames as the reconstructor's intake does (counted as received)."""
        uids = []
        for arr in arrays:
            self.counters.add("received")
            self.queue.put(ImageFrame(arr, unique_id=self.next_uid))
            uids.append(self.next_uid)
            self.next_uid += 1
        return uids

    def swap(self, model: Model | None, pre: Preprocess | None = None) -> None:
        taken = self.batcher.swap(model, pre or (model.info.preprocess if model else Preprocess()))
        assert taken.wait(10), "the loop did not take the model"

    def counts(self) -> dict[str, int]:
        c = self.counters.snapshot()
        c["dropped"], c["backlog"] = self.queue.dropped, self.queue.backlog
        return c

    def settle(self, processed: int, rejected: int = 0) -> dict[str, int]:
        """Wait until the counters reach these values and nothing is in the queue or in flight."""
        def reached():
            c = self.counts()
            return c if (c["processed"], c["rejected"], c["backlog"]) == (processed, rejected, 0) else None
        return wait_for(reached, timeout=20, message=f"processed={processed} rejected={rejected}")

    def by_model(self) -> list[tuple[int, str]]:
        return [(f.unique_id, r.model_id) for r in self.results for f in r.frames]


@pytest.fixture
def pipe():
    device = DeviceState(load_db("reconstructor.db"))
    queue, counters = FrameQueue(limit=1000), Counters()
    publisher = Publisher(device)
    rejects: list[tuple[int, str]] = []
    batcher = Batcher(queue, publisher, counters, LatencyWindow(), RateMeter(),
                      lambda n, reason: rejects.append((n, reason)))
    p = Pipe(queue, batcher, device, counters, rejects=rejects)
    publisher.add_listener(p.results.append)
    device.add_image_sink(lambda spec, f: p.phase_posts.append(f.unique_id) if spec.suffix == "Phase" else None)
    batcher.start()
    yield p
    batcher.stop()
    batcher.join(10)
    assert not batcher.is_alive()


def frames(n: int, shape=(SIZE, SIZE), dtype=np.uint16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.poisson(5.0, shape).astype(dtype) for _ in range(n)]


def identity_holds(c: dict[str, int]) -> bool:
    return c["received"] == c["processed"] + c["dropped"] + c["rejected"] + c["backlog"]


def test_one_batch_with_rejects_processes_the_good_frames(pipe, model_files):
    good = frames(3, dtype=np.float32)
    nan, inf = good[0].copy(), good[0].copy()
    nan[3, 4], inf[0, 0] = np.nan, np.inf
    small, stack = frames(1, shape=(16, 16))[0], np.zeros((1, SIZE, SIZE), np.uint16)
    uids = pipe.feed(good[0], good[1], nan, inf, small, stack, good[2])
    assert pipe.counts()["backlog"] == 7  # no model yet: the frames wait
    pipe.swap(load(model_files["a"]))
    c = pipe.settle(processed=3, rejected=4)
    assert identity_holds(c)
    # the frames were queued before the model came: one batch, the bad frames taken out of it
    assert len(pipe.results) == 1
    result = pipe.results[0]
    assert [f.unique_id for f in result.frames] == [uids[0], uids[1], uids[6]] == pipe.phase_posts
    ref = load(model_files["a"])
    assert result.model_id == ref.info.model_id
    np.testing.assert_allclose(result.outputs["phase"], ref.run(np.stack([good[0], good[1], good[2]]))["phase"],
                               rtol=1e-5, atol=1e-6)
    assert [n for n, _ in pipe.rejects] == [2, 2]
    assert "frame shapes (16, 16), (1, 32, 32) do not fit the model input (32, 32)" in pipe.rejects[0][1]
    assert "NaN or inf" in pipe.rejects[1][1]


def test_hot_swap_applies_from_the_next_batch(pipe, model_files):
    old, new = load(model_files["a"]), load(model_files["b"])
    assert old.info.model_id != new.info.model_id
    pipe.swap(old)
    before = pipe.feed(*frames(5))
    pipe.settle(processed=5)
    taken = pipe.batcher.swap(new, new.info.preprocess)
    after = pipe.feed(*frames(5, seed=1))  # queued after the swap: served by the new model
    c = pipe.settle(processed=10)
    assert taken.is_set() and identity_holds(c)
    assert pipe.by_model() == [(u, old.info.model_id) for u in before] + [(u, new.info.model_id) for u in after]
    assert all(set(r.outputs) == ({"phase", "amplitude"} if r.model_id == new.info.model_id else {"phase"})
               for r in pipe.results)
    with pytest.raises(AttributeError):  # the old model was closed after its last batch
        old.infer(np.zeros((1, SIZE, SIZE), np.float32))


def test_unloaded_model_requeues_and_the_next_model_takes_over(pipe, model_files):
    first, second = load(model_files["a"]), load(model_files["b"])
    pipe.swap(first)
    pipe.feed(*frames(2))
    pipe.settle(processed=2)
    pipe.swap(None, first.info.preprocess)
    waiting = pipe.feed(*frames(4, seed=2))
    q = pipe.queue
    wait_for(lambda: (len(q), q.inflight) == (4, 0), message="frames waiting without a model")
    c = pipe.counts()
    assert (c["processed"], c["rejected"], c["backlog"]) == (2, 0, 4) and identity_holds(c)
    pipe.swap(second)
    c = pipe.settle(processed=6)
    assert identity_holds(c)
    assert pipe.by_model()[2:] == [(u, second.info.model_id) for u in waiting]  # in their order


def test_counter_identity_with_drops_and_rejects(pipe, model_files):
    pipe.queue.set_limit(4)
    pipe.queue.set_policy("DropOldest")
    batch = frames(10, dtype=np.float32)
    batch[8][0, 0] = np.nan
    uids = pipe.feed(*batch)
    c = pipe.counts()
    assert (c["received"], c["dropped"], c["backlog"]) == (10, 6, 4) and identity_holds(c)
    pipe.swap(load(model_files["a"]))
    c = pipe.settle(processed=3, rejected=1)
    assert c["dropped"] == 6 and identity_holds(c)
    assert [u for u, _ in pipe.by_model()] == [uids[6], uids[7], uids[9]]


def test_batch_size_limits_each_batch(pipe, model_files):
    pipe.batcher.batch_size = 2
    pipe.feed(*frames(5))
    pipe.swap(load(model_files["a"]))
    pipe.settle(processed=5)
    assert [len(r.frames) for r in pipe.results] == [2, 2, 1]


def test_failed_inference_counts_each_frame_once(pipe, model_files):
    broken = load(model_files["a"])
    broken.close()  # a model whose session is gone: inference raises
    pipe.feed(*frames(2), frames(1, shape=(8, 8))[0])
    pipe.swap(broken)
    c = pipe.settle(processed=0, rejected=3)
    assert identity_holds(c) and pipe.results == []
    assert [n for n, _ in pipe.rejects] == [1, 2]
    assert pipe.rejects[1][1].startswith("inference failed: ")
    pipe.swap(load(model_files["a"]))  # the loop goes on with the next model
    pipe.feed(*frames(1))
    assert identity_holds(pipe.settle(processed=1, rejected=3))


def test_frames_of_two_shapes_that_crop_to_the_model_are_both_served(pipe, model_files):
    pre = Preprocess(crop_size=SIZE)
    big, small = frames(2, shape=(40, 40)), frames(2, shape=(36, 36), seed=3)
    pipe.feed(big[0], small[0], big[1], small[1])
    model = load(model_files["a"])
    pipe.swap(model, pre)
    assert identity_holds(pipe.settle(processed=4))
    ref = load(model_files["a"])
    got = {f.unique_id: r.outputs["phase"][i] for r in pipe.results for i, f in enumerate(r.frames)}
    want = np.concatenate([ref.run(np.stack(big), pre)["phase"], ref.run(np.stack(small), pre)["phase"]])
    np.testing.assert_allclose(np.stack([got[1], got[3], got[2], got[4]]), want, rtol=1e-5, atol=1e-6)


def bright(n: int, seed: int = 0) -> list[np.ndarray]:
    """Frames with one pixel above the bounded model's limit: its output is NaN there."""
    out = frames(n, seed=seed)
    for arr in out:
        arr[SIZE // 2, SIZE // 2] = 500
    return out


@pytest.mark.faults
def test_odd_shaped_frames_cost_only_themselves(pipe, model_files):
    pipe.batcher.batch_size = 16
    pipe.swap(load(model_files["a"]))
    good, odd = frames(100), frames(10, shape=(SIZE - 1, SIZE), seed=5)
    uids = [pipe.feed(arr)[0] for arr in good[:50]]
    for i in range(10):  # one odd frame after every 5 good ones from here on
        pipe.feed(odd[i])
        uids += pipe.feed(*good[50 + 5 * i: 55 + 5 * i])
    c = pipe.settle(processed=100, rejected=10)
    assert identity_holds(c) and c["dropped"] == 0
    assert [u for u, _ in pipe.by_model()] == uids == pipe.phase_posts
    assert sum(n for n, _ in pipe.rejects) == 10
    assert all(f"frame shape {(SIZE - 1, SIZE)} does not fit" in reason for _, reason in pipe.rejects)


@pytest.mark.faults
def test_nonfinite_outputs_are_rejected_and_the_rest_of_the_batch_published(pipe, model_files):
    dim, hot = frames(5), bright(3)
    uids = pipe.feed(dim[0], hot[0], dim[1], dim[2], hot[1], hot[2], dim[3], dim[4])
    pipe.swap(load(model_files["bounded"]))  # queued first: one batch
    c = pipe.settle(processed=5, rejected=3)
    assert c["nonfinite"] == 3 and identity_holds(c)
    good = [uids[i] for i in (0, 2, 3, 6, 7)]
    assert [u for u, _ in pipe.by_model()] == good == pipe.phase_posts
    assert len(pipe.results) == 1 and np.isfinite(pipe.results[0].outputs["phase"]).all()
    np.testing.assert_allclose(pipe.results[0].outputs["phase"], np.sqrt(100.0 - np.stack(dim)), rtol=1e-6)
    assert pipe.rejects == [(3, pipe.rejects[0][1])] and NONFINITE_REASON in pipe.rejects[0][1]


@pytest.mark.faults
def test_a_model_that_keeps_giving_nan_is_alarmed_until_good_outputs_return(pipe, model_files):
    calls: list[tuple[int, str]] = []
    pipe.batcher.on_health = lambda severity, text: calls.append((severity, text))
    pipe.batcher.batch_size = 16  # no batch takes the window from over 1/2 to 1/10 at once
    pipe.feed(*bright(60))
    pipe.swap(load(model_files["bounded"]))  # queued first: batches of 16
    c = pipe.settle(processed=0, rejected=60)
    assert c["nonfinite"] == 60 and pipe.results == [] and pipe.phase_posts == []
    assert calls == [(2, "model bounded gives NaN or inf on 16 of its last 16 frames: those frames are "
                         "rejected, not published; check the model and the pre-processing")]
    assert pipe.batcher.health.severity == 2 and pipe.batcher.health.counts() == (60, 60)
    assert "60 of its last 60 frames" in pipe.rejects[-1][1]
    pipe.feed(*frames(100, seed=1))
    c = pipe.settle(processed=100, rejected=60)
    assert c["nonfinite"] == 60 and identity_holds(c)
    assert [s for s, _ in calls] == [2, 1, 0]
    assert calls[-1][1].startswith("model bounded outputs are finite again (")
    assert pipe.batcher.health.counts() == (0, 100)
    # a swap clears the alarm with the old model's outputs
    pipe.feed(*bright(60, seed=2))
    pipe.settle(processed=100, rejected=120)
    assert calls[-1][0] == 2
    pipe.swap(load(model_files["a"]))
    assert calls[-1] == (0, "") and pipe.batcher.health.counts() == (0, 0)


def test_output_health_over_its_window():
    h = OutputHealth(window=10)
    assert (h.add(np.zeros(5, bool)), h.severity, h.counts()) == (False, 0, (0, 5))
    assert (h.add(np.ones(1, bool)), h.severity, h.counts()) == (True, 1, (1, 6))  # 1 of 6 > 1/10
    assert (h.add(np.ones(4, bool)), h.severity, h.counts()) == (False, 1, (5, 10))  # 5 of 10 is not > 1/2
    assert (h.add(np.ones(1, bool)), h.severity, h.counts()) == (True, 2, (6, 10))  # the oldest good one left
    h.reset()
    assert (h.severity, h.counts()) == (0, (0, 0))
    assert (h.add(np.r_[np.ones(30, bool), np.zeros(9, bool)]), h.severity, h.counts()) == (False, 0, (1, 10))
    assert (h.add(np.ones(6, bool)), h.severity, h.counts()) == (True, 2, (6, 10))  # a batch wraps the ring


def test_recent_frames_are_the_shape_most_frames_have_now():
    now = [0.0]
    recent = RecentFrames(memory_s=10.0, max_frames=100, clock=lambda: now[0])
    assert recent.dominant() is None
    a, odd = np.zeros((8, 8), np.uint16), np.zeros((7, 8), np.uint16)
    recent.add((8, 8), 40, a)
    recent.add((7, 8), 1, odd)  # the newest frame is odd: the stream is still 8x8
    assert recent.dominant() is a
    nan = np.full((6, 6), np.nan, np.float32)
    recent.add((6, 6), 50, nan)  # most frames, but none usable to check a model on
    assert recent.dominant() is a
    b = np.ones((6, 6), np.float32)
    recent.add((6, 6), 60, b)  # the last 100 frames: 99 of them 6x6 now
    assert recent.dominant() is b
    now[0] = 10.5  # nothing streamed for longer than memory_s
    assert recent.dominant() is None


def test_check_frames_names_both_shapes_and_catches_nan_outputs(model_files):
    small, bounded = load(model_files["c16"]), load(model_files["bounded"])
    with pytest.raises(ModelError, match=r"frames now streaming are \(32, 32\) uint16: its pre-processing turns "
                                         r"\(32, 32\) frames into \(32, 32\), but the model input is \(16, 16\) "
                                         r"\(crop none, bin 2 would fit\)"):
        small.check_frames(frames(1)[0])
    small.check_frames(frames(1)[0], Preprocess(bin=2))
    with pytest.raises(ModelError, match="phase output holds NaN or inf on the frames now streaming"):
        bounded.check_frames(bright(1)[0])
    bounded.check_frames(frames(2))
    assert bounded.misfit((SIZE, SIZE)) is None and "(16, 32) frames into (16, 32)" in (bounded.misfit((16, 32)) or "")


def test_mixed_dtypes_of_one_shape_are_inferred_together_and_buffers_do_not_leak_between_batches(pipe, model_files):
    model = load(model_files["a"])
    ints, floats = frames(2), frames(2, dtype=np.float32, seed=1)
    pipe.feed(ints[0], floats[0], ints[1], floats[1])  # queued before the model: one batch
    pipe.swap(model)
    pipe.settle(processed=4)
    assert len(pipe.results) == 1
    first = [r.outputs["phase"].copy() for r in pipe.results]
    pipe.feed(*frames(3, seed=2))  # a second batch through the same reused buffers
    pipe.settle(processed=7)
    want = model.infer(Preprocess().apply(np.stack([ints[0], floats[0], ints[1], floats[1]]).astype(np.float32)))
    got = np.concatenate([r.outputs["phase"] for r in pipe.results[:len(first)]])
    np.testing.assert_allclose(got, want["phase"], rtol=1e-5, atol=1e-6)  # the first results are intact
    np.testing.assert_array_equal(got, np.concatenate(first))


def test_linger_adapts_between_its_bounds():
    from ptychostream.pipeline.batcher import LINGER_MAX_S, LINGER_MIN_S

    b = Batcher(FrameQueue(), Publisher(DeviceState(load_db("reconstructor.db"))), Counters(), LatencyWindow(),
                RateMeter(), lambda n, reason: None)
    b.batch_size = 64
    assert b._linger == LINGER_MIN_S
    for _ in range(20):  # frames kept coming during each wait and the batch did not fill: longer waits
        b._adapt_linger(10, 5)
    assert b._linger == LINGER_MAX_S
    b._adapt_linger(64, 3)  # a full batch: as it is
    assert b._linger == LINGER_MAX_S
    b._adapt_linger(1, 0)   # nothing came while waiting: shorter
    assert b._linger == LINGER_MAX_S / 2
    for _ in range(20):
        b._adapt_linger(1, 0)
    assert b._linger == LINGER_MIN_S
    b._adapt_linger(1, -1)  # no wait at all (a full queue): as it is
    assert b._linger == LINGER_MIN_S
