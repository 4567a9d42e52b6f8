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
from ptychostream.model.infer import Model, open_model
from ptychostream.model.preprocess import Preprocess
from ptychostream.model.zoo import build_ptychonn_onnx
from ptychostream.pipeline.batcher import Batcher
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
    assert "frame shape (16, 16) does not fit the model input (32, 32)" in pipe.rejects[0][1]
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
