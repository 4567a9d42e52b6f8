"""Issue #5: every frame joined to its scan position by uniqueId and stitched into the live mosaic."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import (
    detector_and_reconstructor,
    put_in_background,
    pva_context,
    text,
    wait_for,
)
from skimage.metrics import structural_similarity

from ptychostream.core.device import DeviceState
from ptychostream.core.frames import BatchResult, ImageFrame
from ptychostream.core.pvdb import load_db
from ptychostream.pipeline.stitch import MosaicStage
from ptychostream.sim.forward import Geometry, Simulator
from ptychostream.sim.objects import make_object
from ptychostream.sim.probes import make_probe
from ptychostream.sim.scans import scan_extent_px, scan_positions

N = 240
SIZE = 64


@pytest.fixture(scope="module")
def scan():
    """Ground truth of a spiral scan from the simulator: object, positions, true patches."""
    g = Geometry(size=SIZE)
    pos = scan_positions("spiral", 6 * g.pixel_m, N, seed=3)
    obj = make_object("etched", shape=tuple(scan_extent_px(pos, g.pixel_m, SIZE)), seed=3)
    sim = Simulator(obj, make_probe("gaussian", SIZE, g.pixel_m), pos, g, seed=3)
    patches = sim.patches(np.arange(N))
    return sim, obj, pos, np.angle(patches).astype(np.float32), np.abs(patches).astype(np.float32)


class Stage:
    """A MosaicStage with a device whose image posts are captured."""

    def __init__(self, **settings):
        self.device = DeviceState(load_db("reconstructor.db"))
        self.posted: dict[str, ImageFrame] = {}
        self.messages: list[str] = []
        self.device.add_image_sink(lambda spec, frame: self.posted.__setitem__(spec.suffix, frame))
        self.stage = MosaicStage(self.device, lambda text, sev: self.messages.append(text))
        self.stage.configure(rate_hz=50.0, **settings)
        self.stage.start()

    def batch(self, uids, phase, amp=None, attrs=None, pixel_m=None):
        frames = [ImageFrame(np.zeros((2, 2)), int(u), time.time(), None, dict(a) if a else {})
                   for u, a in zip(uids, attrs or [None] * len(uids))]
        outputs = {"phase": phase} if amp is None else {"phase": phase, "amplitude": amp}
        self.stage.on_result(BatchResult(frames, outputs, np.zeros(len(uids)), "test", pixel_m))

    def mosaic(self, n, timeout=20):
        wait_for(lambda: self.posted.get("Mosaic") is not None
                 and self.posted["Mosaic"].attributes["Patches"] >= n, timeout=timeout, message=f"{n} patches")
        return self.posted["Mosaic"]

    def close(self):
        self.stage.stop()
        self.stage.join(5)


def to_object_grid(mosaic: ImageFrame, obj_shape, pixel_m):
    """Place the mosaic on the object's pixel grid (object pixel (r, c) is at ((r-H//2)p, (c-W//2)p))."""
    a = mosaic.attributes
    r0 = int(round(a["OriginY"] / pixel_m)) + obj_shape[0] // 2
    c0 = int(round(a["OriginX"] / pixel_m)) + obj_shape[1] // 2
    out = np.full(obj_shape, np.nan, np.float32)
    h, w = mosaic.array.shape
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + h, obj_shape[0]), min(c0 + w, obj_shape[1])
    out[rs:re, cs:ce] = mosaic.array[rs - r0:re - r0, cs - c0:ce - c0]
    return out


def test_known_answer_ssim(scan):
    sim, obj, pos, phase, amp = scan
    s = Stage(pixel_m=sim.object_pixel_m, offset="none")
    try:
        attrs = [{"PositionX": x, "PositionY": y} for y, x in pos]
        for k in range(0, N, 32):
            s.batch(range(k + 1, min(N, k + 32) + 1), phase[k:k + 32], amp[k:k + 32], attrs[k:k + 32])
        m = s.mosaic(N)
        cov = s.posted["MosaicCoverage"]
    finally:
        s.close()
    assert m.array.dtype == np.float32 and m.attributes["PixelSizeX"] == pytest.approx(sim.object_pixel_m)
    got = to_object_grid(m, obj.shape, sim.object_pixel_m)
    weight = to_object_grid(cov, obj.shape, sim.object_pixel_m)
    truth = np.angle(obj)
    mask = np.nan_to_num(weight) > 0.3
    assert mask.sum() > 0.2 * mask.size
    got = np.where(mask, got - np.nanmean((got - truth)[mask]), 0)  # global offset
    ref = np.where(mask, truth, 0)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    rng = float(truth[mask].max() - truth[mask].min())
    ssim = structural_similarity(ref[box], got[box], data_range=rng)
    assert ssim >= 0.95, ssim
    assert np.abs(got - ref)[mask].mean() < 0.02


def test_order_does_not_matter_late_shuffled_positions(scan):
    sim, obj, pos, phase, amp = scan
    uids = np.arange(1, N + 1)
    a = Stage(pixel_m=sim.object_pixel_m, source="Attributes")
    b = Stage(pixel_m=sim.object_pixel_m, source="Table", timeout_s=30)
    try:
        attrs = [{"PositionX": x, "PositionY": y} for y, x in pos]
        a.batch(uids, phase, amp, attrs)
        ref = a.mosaic(N)
        rng = np.random.default_rng(0)
        order = rng.permutation(N)
        # frames first, in shuffled batches; positions later, in shuffled chunks
        for k in range(0, N, 50):
            sel = order[k:k + 50]
            b.batch(uids[sel], phase[sel], amp[sel])
        wait_for(lambda: b.stage.status()["PositionWait_RBV"] == N, timeout=10, message="frames waiting")
        chunks = np.array_split(rng.permutation(N), 7)
        for c in chunks:
            b.stage.add_positions(uids[c], pos[c, 0], pos[c, 1])
        got = b.mosaic(N)
        assert b.stage.status()["Unpositioned_RBV"] == 0
    finally:
        a.close()
        b.close()
    assert got.array.shape == ref.array.shape
    assert got.attributes["OriginX"] == pytest.approx(ref.attributes["OriginX"])
    np.testing.assert_allclose(got.array, ref.array, atol=1e-5)


def test_bad_positions_counted_mosaic_stays_valid(scan):
    sim, obj, pos, phase, amp = scan
    s = Stage(pixel_m=sim.object_pixel_m, source="Table", timeout_s=0.5)
    try:
        uids = np.arange(1, 41)
        s.batch(uids, phase[:40])
        y, x = pos[:40, 0].copy(), pos[:40, 1].copy()
        y[3] = np.nan           # NaN position
        x[5] = 5.0              # 5 m: out of range
        good = np.ones(40, bool)
        good[[3, 5]] = False
        s.stage.add_positions(uids[good], y[good], x[good])
        for bad, text_ in ((3, "non-finite"), (5, "beyond")):
            s.stage.add_positions(uids[bad:bad + 1], y[bad:bad + 1], x[bad:bad + 1])
            wait_for(lambda: any(text_ in t for t in s.messages), timeout=5, message=text_)
        s.stage.add_positions(uids[10:12], y[10:12] + 1e-7, x[10:12])  # conflicting positions
        wait_for(lambda: any("conflicting" in t for t in s.messages), timeout=5, message="conflict")
        s.batch(uids[20:22], phase[20:22])  # duplicate frames
        wait_for(lambda: any("duplicate frame" in t for t in s.messages), timeout=5, message="duplicate")
        m = s.mosaic(38)
        wait_for(lambda: s.stage.status()["Unpositioned_RBV"] == 2, timeout=5, message="timeouts counted")
        st = s.stage.status()
        assert st["Stitched_RBV"] == 38
        assert st["PositionErrors_RBV"] == 1 + 1 + 2 + 2
        assert np.isfinite(m.array).all()
        # a restarted position stream (uids from 1 again, new values) starts a new scan
        s.stage.add_positions([1, 2], [1e-7, 2e-7], [0.0, 0.0])
        wait_for(lambda: s.stage.joiner.counts["restarts"] == 1, timeout=5, message="restart")
    finally:
        s.close()


def test_no_pixel_size_is_explained(scan):
    sim, obj, pos, phase, amp = scan
    s = Stage(pixel_m=0.0)
    try:
        s.batch([1], phase[:1], attrs=[{"PositionX": 0.0, "PositionY": 0.0}])
        wait_for(lambda: s.stage.status()["Unpositioned_RBV"] == 1, timeout=5)
        assert any("PixelSize" in t for t in s.messages)
    finally:
        s.close()


@pytest.mark.system
def test_end_to_end_simdet_to_mosaic_pv(tmp_path):
    from ptychostream.model.zoo import build_ptychonn_onnx

    model = build_ptychonn_onnx(str(tmp_path / "m.onnx"), size=128, heads=("amplitude", "phase"),
                                base_channels=4, depth=2)
    with detector_and_reconstructor("TST:MS:", "TST:MR:"), pva_context() as ctx:
        pixel = float(ctx.get("TST:MS:cam1:ObjectPixel_RBV"))
        for k, v in {"ModelPath": model, "InputPV": "TST:MS:Pva1:Image", "PixelSize": pixel,
                     "MosaicRate": 20, "Enable": 1}.items():
            ctx.put("TST:MR:" + k, v, wait=True)
        wait_for(lambda: int(ctx.get("TST:MR:ModelStatus_RBV")) == 2, timeout=30, message="model")
        wait_for(lambda: int(ctx.get("TST:MR:InputConnected_RBV")) == 1, timeout=10, message="connected")
        n, step = 150, 1e-7
        for k, v in {"ImageMode": "Multiple", "NumImages": n, "ScanPoints": n, "ScanStep": step,
                     "AcquirePeriod": 0.002, "ArrayCounter": 0}.items():
            ctx.put("TST:MS:cam1:" + k, v, wait=True)
        put_in_background(ctx, "TST:MS:cam1:Acquire", 1)
        wait_for(lambda: int(ctx.get("TST:MR:Stitched_RBV")) == n, timeout=60, message="all stitched")
        # the images follow at MosaicRate: the mosaic of every patch, then the flashlight of the same update
        wait_for(lambda: ctx.get("TST:MR:Mosaic").attrib.get("Patches") == n, timeout=5, message="mosaic of all")
        m = ctx.get("TST:MR:Mosaic")
        wait_for(lambda: ctx.get("TST:MR:Flashlight").raw["uniqueId"] == m.raw["uniqueId"], timeout=5,
                 message="the flashlight of that mosaic")
        attrs = m.attrib
        assert int(ctx.get("TST:MR:Unpositioned_RBV")) == 0
        assert attrs["PixelSizeX"] == pytest.approx(pixel) and attrs["Patches"] == n
        positions = scan_positions("spiral", step, n, seed=0)
        span = (positions.max(0) - positions.min(0)) / pixel  # (y, x) pixels
        h, w = m.shape
        assert span[0] + 128 <= h <= span[0] + 128 + 8 and span[1] + 128 <= w <= span[1] + 128 + 8
        # the origin is the top-left pixel's position: the scan's first quadrant corner minus half a patch
        assert attrs["OriginX"] == pytest.approx(positions[:, 1].min() - 64 * pixel, abs=2 * pixel)
        assert attrs["OriginY"] == pytest.approx(positions[:, 0].min() - 64 * pixel, abs=2 * pixel)
        assert m.dtype == np.float32 and np.isfinite(m).all()
        flash = ctx.get("TST:MR:Flashlight")
        assert flash.shape == m.shape
        assert "um" in text(ctx.get("TST:MR:MosaicExtent_RBV"))
        ctx.put("TST:MR:MosaicReset", 1, wait=True)
        wait_for(lambda: int(ctx.get("TST:MR:Stitched_RBV")) == 0, timeout=5, message="reset")


def test_motor_readbacks_matched_by_timestamp(scan):
    """Scalar motor readbacks (x and y, separate channels) joined to frames by time stamp."""
    sim, obj, pos, phase, amp = scan
    s = Stage(pixel_m=sim.object_pixel_m, source="Motors", timeout_s=2.0)
    try:
        s.stage.motors.tolerance_s = 0.02
        t0 = 1.0e9
        times = t0 + 0.001 * np.arange(N)
        # motors sampled every 5 ms (slower than the 1 kHz frames): interpolated in between
        for k in range(0, N, 5):
            s.stage.add_motor(0, times[k], pos[k, 1])
            s.stage.add_motor(1, times[k], pos[k, 0])
        frames = [ImageFrame(np.zeros((2, 2)), i + 1, times[i]) for i in range(N)]
        s.stage.on_result(BatchResult(frames, {"phase": phase}, np.zeros(N), "test", None))
        m = s.mosaic(N - 5)
        st = s.stage.status()
        assert st["Unpositioned_RBV"] <= 4  # the last frames after the final sample have no bracket
        assert st["Stitched_RBV"] + st["Unpositioned_RBV"] + st["PositionWait_RBV"] == N
        assert np.isfinite(m.array).all()
    finally:
        s.close()


def test_trajectory_file_by_frame_number(scan, tmp_path):
    """A CSV trajectory indexed by frame number gives the same mosaic as attributes."""
    from ptychostream.pipeline.stitch import load_trajectory

    sim, obj, pos, phase, amp = scan
    csv = tmp_path / "traj.csv"
    csv.write_text("x,y\n" + "\n".join(f"{float(x)!r},{float(y)!r}" for y, x in pos))
    a = Stage(pixel_m=sim.object_pixel_m)
    b = Stage(pixel_m=sim.object_pixel_m, source="Trajectory", trajectory=load_trajectory(str(csv), 1.0))
    try:
        uids = np.arange(1, N + 1)
        a.batch(uids, phase, attrs=[{"PositionX": x, "PositionY": y} for y, x in pos])
        b.batch(uids, phase)
        np.testing.assert_allclose(b.mosaic(N).array, a.mosaic(N).array, atol=1e-6)
    finally:
        a.close()
        b.close()
    with pytest.raises((ValueError, OSError)):
        load_trajectory(str(tmp_path / "missing.csv"), 1.0)
