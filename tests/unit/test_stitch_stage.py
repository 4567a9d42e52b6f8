"""The stitch stage thread in-process: idle, it sleeps on its inbox instead of spinning."""

from __future__ import annotations

import queue
import threading
import time

import pytest

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


def _stage_with_images():
    """A stage whose device keeps the latest frame of each image PV it posts."""
    device = DeviceState(load_db("reconstructor.db"))
    images: dict = {}
    device.add_image_sink(lambda spec, frame: images.__setitem__(spec.suffix, frame))
    return MosaicStage(device, lambda text, severity: None), images


def _placed(x_px, figures, first_uid: int = 1, shape=(16, 16)):
    """Frames at (y, x) = (0, x_px * 10 nm), constant phase, with the given consistency figures."""
    import numpy as np

    from ptychostream.core.frames import BatchResult, ImageFrame

    n = len(x_px)
    frames = [ImageFrame(np.zeros((0, 0), np.uint8), first_uid + i, attributes={"PositionX": 1e-8 * x, "PositionY": 0.0})
              for i, x in enumerate(x_px)]
    out = {"phase": np.full((n, *shape), 0.5, np.float32)}
    figure = None if figures is None else np.asarray(figures, np.float32)
    return BatchResult(frames, out, np.zeros(n), "m", pixel_m=1e-8, consistency=figure)


def _at(frame, y_m: float, x_m: float) -> float:
    """The value of a published image at metres (y, x), from its Origin/PixelSize attributes."""
    a = frame.attributes
    r = round((y_m - a["OriginY"]) / a["PixelSizeY"])
    c = round((x_m - a["OriginX"]) / a["PixelSizeX"])
    return float(frame.array[r, c])


def test_consistency_map_spreads_each_sampled_figure_over_its_patch():
    """Each sampled frame's figure covers its patch window; where patches overlap the map is their
    weight average; frames not sampled (NaN) leave no mark (NaN where no sampled frame reached) and
    are stitched into the mosaic and counted like any other."""
    import numpy as np

    stage, images = _stage_with_images()
    stage._configure({"offset": "none"})  # the mosaic keeps the patches' constant phase
    # A at x=0 (figure 1), D at x=8 px (3) overlapping A by half, B at 40 px (2), C at 80 px not sampled
    stage.on_result(_placed([0, 8, 40, 80], [1.0, 3.0, 2.0, np.nan]))
    stage._drain(stage.inbox.get_nowait())
    stage.publish()
    cmap, mosaic = images["ConsistencyMap"], images["Mosaic"]
    assert cmap.array.shape == mosaic.array.shape and cmap.array.dtype == np.float32
    assert {k: cmap.attributes[k] for k in ("OriginX", "OriginY", "PixelSizeX")} == \
        {k: mosaic.attributes[k] for k in ("OriginX", "OriginY", "PixelSizeX")}
    px = 1e-8
    assert _at(cmap, 0.0, 40 * px) == pytest.approx(2.0, abs=1e-5)  # B alone
    assert _at(cmap, 0.0, -6 * px) == pytest.approx(1.0, abs=1e-5)  # A alone
    assert _at(cmap, 0.0, 12 * px) == pytest.approx(3.0, abs=1e-5)  # D alone
    # at x = 4 px: A's window pixel 12 and D's pixel 4 (Hann, sin^2 at half-integer phase)
    w_a, w_d = np.sin(np.pi * 12.5 / 16) ** 2, np.sin(np.pi * 4.5 / 16) ** 2
    between = _at(cmap, 0.0, 4 * px)
    assert between == pytest.approx((1.0 * w_a + 3.0 * w_d) / (w_a + w_d), abs=1e-5)
    assert 1.0 < _at(cmap, 0.0, 2 * px) < between < _at(cmap, 0.0, 6 * px) < 3.0
    assert np.isnan(_at(cmap, 0.0, 80 * px))  # C was not sampled
    assert _at(mosaic, 0.0, 80 * px) == pytest.approx(0.5, abs=1e-5)  # ... but it is on the mosaic
    s = stage.status()
    assert (s["Stitched_RBV"], s["PositionErrors_RBV"], s["Unpositioned_RBV"]) == (4, 0, 0)


def test_no_consistency_figures_no_map():
    """With the check off (BatchResult.consistency None) the mosaic is published and the map is not."""
    stage, images = _stage_with_images()
    stage.on_result(_placed([0, 20], None))
    stage._drain(stage.inbox.get_nowait())
    stage.publish()
    assert "Mosaic" in images and "ConsistencyMap" not in images
    assert stage.consistency is None


def test_mosaic_images_are_display_sized_and_the_full_canvas_is_on_demand():
    """MosaicDisplaySize bounds the published images (binned by an integer factor, said by Binning and
    MosaicBinning_RBV, with the pixel size to match); snapshot(), which the record uses, is the full
    canvas; MosaicDisplaySize 0 publishes the full canvas."""
    import numpy as np

    stage, images = _stage_with_images()
    stage.configure(display_size=32, rate_hz=50.0, offset="none")
    stage.start()
    try:
        stage.on_result(_placed(list(range(0, 120, 6)), [1.0] * 20))

        names = ("Mosaic", "MosaicCoverage", "Flashlight", "ConsistencyMap")

        def published(patches: int, binning: int):
            """The Mosaic once every image of a publish of ``patches`` binned by ``binning`` is in."""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                got = [images.get(name) for name in names]
                if all(f is not None and f.attributes["Patches"] == patches and f.attributes["Binning"] == binning
                       for f in got):
                    return got[0]
                time.sleep(0.01)
            raise AssertionError(f"no images of {patches} patches binned {binning}: {images}")

        full = stage.snapshot()
        assert full is not None and full.binning == 1 and full.shape == (17, 131)
        b = -(-131 // 31)  # 5: bins sit on the global grid, so a side may take one bin more than 131 / b
        m = published(20, b)
        y0, y1, x0, x1 = stage.stitcher.exposed_box
        assert m.array.shape == (-(-y1 // b) - y0 // b, -(-x1 // b) - x0 // b) and max(m.array.shape) <= 32
        assert m.attributes["PixelSizeX"] == pytest.approx(b * 1e-8)
        assert stage.device.get("MosaicBinning_RBV") == b  # set before the images are posted
        deadline = time.monotonic() + 5  # the extent readback follows the images
        while "131x17 px" not in stage.device.get("MosaicExtent_RBV") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stage.device.get("MosaicExtent_RBV").endswith("(131x17 px, shown 27x4)")
        for name in names:
            assert images[name].array.shape == m.array.shape, name
        inside = np.isfinite(m.array) & (images["MosaicCoverage"].array > 0.5)
        assert inside.sum() > 10 and np.allclose(m.array[inside], 0.5, atol=1e-5)  # a constant stays constant

        stage.configure(display_size=0)
        m = published(20, 1)
        assert np.array_equal(m.array, stage.snapshot().phase)
        assert stage.device.get("MosaicBinning_RBV") == 1
    finally:
        stage.stop()
        stage.join(5)


def _random_batch(first_uid: int, n: int, rng, skip_every: int = 0):
    """n frames with random phase and amplitude patches; with ``skip_every``, every such frame
    carries no position attribute (it never joins), so the joined rows are not consecutive."""
    import numpy as np

    from ptychostream.core.frames import BatchResult, ImageFrame

    frames = []
    for uid in range(first_uid, first_uid + n):
        gone = skip_every and uid % skip_every == 0
        attrs = {} if gone else {"PositionX": 3e-8 * (uid % 12), "PositionY": 3e-8 * (uid // 12)}
        frames.append(ImageFrame(np.zeros((0, 0), np.uint8), uid, attributes=attrs))
    out = {"phase": rng.normal(size=(n, 16, 16)).astype(np.float32),
           "amplitude": rng.uniform(0.5, 1, size=(n, 16, 16)).astype(np.float32)}
    return BatchResult(frames, out, np.zeros(n), "m", pixel_m=1e-8)


@pytest.mark.parametrize("skip_every", [0, 3])
def test_patches_reach_the_stitcher_as_batch_rows_with_the_same_sums_as_stacking(skip_every):
    """The stage hands the stitcher views of the batch outputs, one run of consecutive rows at a
    time, instead of stacking every patch: the mosaic is the same as stitching the stacked patches
    of the positioned frames in arrival order, in one go."""
    import numpy as np

    from ptychostream.mosaic.stitch import Stitcher

    rng = np.random.default_rng(5)
    stage = MosaicStage(DeviceState(load_db("reconstructor.db")), lambda text, severity: None)
    batches = [_random_batch(1 + 10 * k, 10, rng, skip_every) for k in range(4)]
    for b in batches:
        stage.on_result(b)
    stage._drain(stage.inbox.get_nowait())
    keep = [(b.outputs["phase"][i], b.outputs["amplitude"][i],
             (float(f.attributes["PositionY"]), float(f.attributes["PositionX"])))
            for b in batches for i, f in enumerate(b.frames) if f.attributes]
    ref = Stitcher(1e-8, (16, 16), offset=stage.settings.offset)
    ref.add(np.stack([k[0] for k in keep]), np.array([k[2] for k in keep]), np.stack([k[1] for k in keep]))
    assert stage.stitcher is not None and stage.stitcher.n_patches == len(keep) == (40 if not skip_every else 27)
    got, want = stage.stitcher.mosaic(), ref.mosaic()  # the canvas may be allocated differently
    assert got.origin_m == want.origin_m and got.shape == want.shape
    np.testing.assert_array_equal(got.phase, want.phase)
    np.testing.assert_array_equal(got.amplitude, want.amplitude)
    np.testing.assert_array_equal(got.coverage, want.coverage)


def test_consecutive_rows_of_one_batch_are_a_view_not_a_copy():
    import numpy as np

    from ptychostream.pipeline.stitch import _Patch, _runs

    phase = np.arange(6 * 4, dtype=np.float32).reshape(6, 2, 2)
    amp = -phase
    src = (phase, amp)
    rows = [_Patch(phase[i], amp[i], 0.0, 1e-8, src=src, row=i) for i in range(6)]
    ((i0, i1, ph, am),) = _runs(rows[1:4])
    assert (i0, i1) == (0, 3) and np.shares_memory(ph, phase) and np.shares_memory(am, amp)
    np.testing.assert_array_equal(ph, phase[1:4])
    np.testing.assert_array_equal(am, amp[1:4])
    loose = [_Patch(np.full((2, 2), -k, np.float32), np.full((2, 2), k, np.float32), 0.0, 1e-8) for k in (1, 2)]
    runs = _runs([rows[1], rows[2], loose[0], loose[1], rows[4], rows[3]])
    assert [(i0, i1) for i0, i1, _, _ in runs] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert not np.shares_memory(runs[1][2], phase)
    np.testing.assert_array_equal(np.concatenate([r[2] for r in runs]),
                                  np.stack([phase[1], phase[2], loose[0].phase, loose[1].phase, phase[4], phase[3]]))
    np.testing.assert_array_equal(np.concatenate([r[3] for r in runs]),
                                  np.stack([amp[1], amp[2], loose[0].amplitude, loose[1].amplitude, amp[4], amp[3]]))
