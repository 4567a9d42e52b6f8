"""Issue #6 (record): the IOC's HDF5 writer, switched on by Capture, and training-pair capture."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest
from conftest import IOCProcess, next_slot, pva_client_conf, text, wait_for

from ptychostream.core.frames import BatchResult, ImageFrame
from ptychostream.model.zoo import build_ptychonn_onnx
from ptychostream.pipeline.record import read_record
from ptychostream.protocols.ntnd import encode
from ptychostream.train.pairs import training_pairs

pytestmark = pytest.mark.system
R = "TST:REC:"


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    d = tmp_path_factory.mktemp("rec")
    model = build_ptychonn_onnx(str(d / "m.onnx"), size=64, heads=("amplitude", "phase"), base_channels=4, depth=2)
    proc = IOCProcess(["ioc", "--prefix", R, "--no-ca"], R, next_slot()).start()
    from p4p.client.thread import Context

    ctx = Context("pva", conf=pva_client_conf(), useenv=False)
    raw = Context("pva", conf=pva_client_conf(), useenv=False, nt=False)
    for k, v in {"ModelPath": model, "Enable": 1, "PixelSize": 1e-8, "PublishRate": 0, "MosaicRate": 50}.items():
        ctx.put(R + k, v, wait=True)
    wait_for(lambda: int(ctx.get(R + "ModelStatus_RBV")) == 2, timeout=30, message="model")
    yield proc, ctx, raw, d
    ctx.close()
    raw.close()
    proc.stop()


def send(raw, n, first=1):
    rng = np.random.default_rng(first)
    frames = rng.poisson(4, (n, 64, 64)).astype(np.uint16)
    for i in range(n):
        uid = first + i
        raw.put(R + "Input", encode(ImageFrame(frames[i], uid, time.time(), None,
                                               {"PositionX": 2e-8 * (i % 5), "PositionY": 2e-8 * (i // 5)})),
                wait=True)
    return frames


@pytest.fixture(scope="module")
def captured(ioc):
    """One capture of 20 positioned frames with CaptureFrames=Yes, made the first time a test asks
    for it (whatever the test order): (record path, the frames sent, the Mosaic PV at the end,
    Message_RBV after the close)."""
    proc, ctx, raw, d = ioc
    path = d / "record.h5"
    ctx.put(R + "ResetCounters", 1, wait=True)
    ctx.put(R + "MosaicReset", 1, wait=True)
    wait_for(lambda: int(ctx.get(R + "Stitched_RBV")) == 0, timeout=10, message="an empty mosaic")
    ctx.put(R + "CaptureFile", str(path), wait=True)
    ctx.put(R + "CaptureFrames", 1, wait=True)
    ctx.put(R + "Capture", 1, wait=True)
    assert int(ctx.get(R + "Capture_RBV")) == 1
    sent = send(raw, 20)
    wait_for(lambda: int(ctx.get(R + "CaptureWritten_RBV")) == 20, timeout=15, message="20 written")
    wait_for(lambda: int(ctx.get(R + "Stitched_RBV")) == 20, timeout=10, message="20 stitched")
    # the Mosaic PV is published after the count: wait until it shows all 20 patches
    wait_for(lambda: int(ctx.get(R + "Mosaic").attrib.get("Patches", 0)) == 20, timeout=10,
             message="the Mosaic PV with 20 patches")
    live = ctx.get(R + "Mosaic")
    ctx.put(R + "Capture", 0, wait=True)
    wait_for(lambda: int(ctx.get(R + "Capture_RBV")) == 0, timeout=15, message="record closed")
    return path, sent, live, text(ctx.get(R + "Message_RBV"))


def recorded_pairs(path, tmp_path, seed: int):
    """Training pairs from the captured record and a Ptychodus-like product (a random
    256x256 phase object, 10 nm pixel); returns (pairs path, number of pairs, object)."""
    obj = np.exp(1j * np.random.default_rng(seed).uniform(-1, 1, (1, 256, 256))).astype(np.complex64)
    product = tmp_path / "product.h5"
    with h5py.File(product, "w") as fh:
        fh["object"] = obj
        fh["object"].attrs["pixel_width_m"] = 1e-8
    out = tmp_path / "pairs.npz"
    return out, training_pairs(str(path), str(product), str(out)), obj


def test_capture_writes_results_positions_frames_and_mosaic(captured):
    path, sent, live, message = captured
    assert "closed: 20 frames, 0 dropped" in message
    rec = read_record(str(path))
    data = rec["data"]
    assert data["phase"].shape == (20, 64, 64) and data["amplitude"].shape == (20, 64, 64)
    np.testing.assert_array_equal(data["unique_id"], np.arange(1, 21))
    np.testing.assert_allclose(data["position_x_m"], 2e-8 * (np.arange(20) % 5))
    np.testing.assert_array_equal(rec["frames"], sent)
    assert (data["timestamp"] > 1e9).all() and (data["latency_ms"] > 0).all()
    # the record re-reads to the same mosaic the Mosaic PV shows
    mosaic = rec["mosaic"]
    np.testing.assert_allclose(mosaic["phase"], np.asarray(live), atol=1e-6)
    assert mosaic["n_patches"] == 20 and mosaic["pixel_size_m"] == pytest.approx(1e-8)
    assert mosaic["origin_x_m"] == pytest.approx(live.attrib["OriginX"])
    with h5py.File(path) as fh:
        assert fh["entry"].attrs["NX_class"] == "NXentry" and fh["entry/data"].attrs["signal"] == "phase"


def test_a_new_capture_counts_from_zero_at_once(ioc):
    """A closed record's counts stay shown after its close; the next Capture shows its own (0) as soon
    as Capture_RBV reads 1, not the last record's until the next status scan. Two records of its own,
    so the test holds whichever capture ran before it."""
    proc, ctx, raw, d = ioc

    def record(name: str, n: int, first: int) -> None:
        ctx.put(R + "CaptureFile", str(d / name), wait=True)
        ctx.put(R + "CaptureFrames", 0, wait=True)
        ctx.put(R + "Capture", 1, wait=True)
        try:
            got = {k: int(ctx.get(R + k)) for k in ("Capture_RBV", "CaptureFlushed_RBV", "CaptureWritten_RBV",
                                                     "CaptureDropped_RBV")}
            assert got == {"Capture_RBV": 1, "CaptureFlushed_RBV": 0, "CaptureWritten_RBV": 0,
                           "CaptureDropped_RBV": 0}, name
            send(raw, n, first=first)
            wait_for(lambda: int(ctx.get(R + "CaptureWritten_RBV")) == n, timeout=15, message=f"{n} written")
        finally:
            ctx.put(R + "Capture", 0, wait=True)
            wait_for(lambda: int(ctx.get(R + "Capture_RBV")) == 0, timeout=15, message="record closed")
        wait_for(lambda: int(ctx.get(R + "CaptureFlushed_RBV")) == n, timeout=10, message=f"{name}'s {n} flushed")
        assert int(ctx.get(R + "CaptureWritten_RBV")) == n  # still shown after the close

    record("counts-first.h5", 5, 201)
    record("counts-second.h5", 3, 301)


def test_capture_refuses_unwritable_path_and_keeps_running(ioc):
    proc, ctx, raw, d = ioc
    from p4p.client.thread import RemoteError

    ctx.put(R + "CaptureFile", "/nonexistent-folder/x.h5", wait=True)
    with pytest.raises(RemoteError, match="cannot write"):
        ctx.put(R + "Capture", 1, wait=True)
    assert int(ctx.get(R + "Capture_RBV")) == 0
    assert "cannot write" in text(ctx.get(R + "Message_RBV"))
    ctx.put(R + "CaptureFile", "", wait=True)
    with pytest.raises(RemoteError, match="CaptureFile first"):
        ctx.put(R + "Capture", 1, wait=True)
    before = int(ctx.get(R + "Processed_RBV"))
    send(raw, 3, first=100)
    wait_for(lambda: int(ctx.get(R + "Processed_RBV")) == before + 3, timeout=10, message="still processing")


def test_training_pairs_from_record_and_product(captured, tmp_path):
    out, n, obj = recorded_pairs(captured[0], tmp_path, seed=0)
    assert n == 20
    with np.load(out) as z:
        assert z["reciprocal"].shape == (20, 64, 64) and z["real"].shape == (20, 64, 64)
        assert z["real"].dtype == np.complex64 and float(z["pixelsize"]) == 1e-8
        # frame 0 sits at (0, 0): its patch is the object's centre block
        np.testing.assert_allclose(z["real"][0], obj[0, 128 - 32:128 + 32, 128 - 32:128 + 32], atol=1e-5)


def test_retrain_on_captured_pairs_and_hot_swap_through_modelpath(ioc, captured, tmp_path):
    """The seed's loop: record a scan, pair it with an iterative product, train on the pairs,
    and load the new model into the running IOC through ModelPath, with no frame lost."""
    pytest.importorskip("torch")
    from ptychostream.train import TrainConfig, train

    proc, ctx, raw, d = ioc
    pairs, n, _ = recorded_pairs(captured[0], tmp_path, seed=1)
    assert n == 20
    model = tmp_path / "retrained.onnx"
    summary = train(TrainConfig(output=str(model), data=(str(pairs),), size=64, depth=2, base_channels=4,
                                output_size=64, epochs=2, batch=8, threads=1, val=0), progress=False,
                    log=lambda s: None)
    assert summary["steps"] == 4 and summary["data"]["pairs"] == 20
    before = {k: int(ctx.get(R + k + "_RBV")) for k in ("Received", "Processed")}
    ctx.put(R + "ModelPath", str(model), wait=True)
    wait_for(lambda: text(ctx.get(R + "ModelPath_RBV")) == str(model) and int(ctx.get(R + "ModelStatus_RBV")) == 2,
             timeout=30, message="the retrained model serving")
    assert "retrained" in text(ctx.get(R + "ModelInfo_RBV"))
    send(raw, 5, first=200)
    wait_for(lambda: int(ctx.get(R + "Processed_RBV")) == before["Processed"] + 5, timeout=15,
             message="frames through the retrained model")
    assert int(ctx.get(R + "Received_RBV")) == before["Received"] + 5
    phase = ctx.get(R + "Phase")
    assert np.asarray(phase).shape == (64, 64) and np.isfinite(np.asarray(phase)).all()


# -- positions from every source (issue #13) ------------------------------------------------------------
def test_capture_with_a_trajectory_source_keeps_every_frames_position_and_pairs_work(ioc, tmp_path):
    """PositionSource=Trajectory: the frames carry no position attributes; the record keeps the trajectory's
    position of each frame (and says where it came from), so `ptychostream pairs` takes every frame."""
    _, ctx, raw, _ = ioc
    traj = 2e-8 * np.column_stack([np.arange(12) // 4, np.arange(12) % 4]).astype(np.float64)  # (y, x)
    np.save(tmp_path / "traj.npy", traj)
    path = tmp_path / "traj-record.h5"
    ctx.put(R + "PositionSource", 3, wait=True)  # Trajectory
    try:
        ctx.put(R + "TrajectoryFile", str(tmp_path / "traj.npy"), wait=True)
        ctx.put(R + "CaptureFile", str(path), wait=True)
        ctx.put(R + "CaptureFrames", 1, wait=True)
        ctx.put(R + "Capture", 1, wait=True)
        frames = np.random.default_rng(5).poisson(4, (12, 64, 64)).astype(np.uint16)
        for i in range(12):  # uniqueIds from 1: frame i sits at traj[i]
            raw.put(R + "Input", encode(ImageFrame(frames[i], i + 1, time.time(), None, {})), wait=True)
        wait_for(lambda: int(ctx.get(R + "CaptureWritten_RBV")) == 12, timeout=15, message="12 written")
        ctx.put(R + "Capture", 0, wait=True)
        wait_for(lambda: int(ctx.get(R + "Capture_RBV")) == 0, timeout=15, message="record closed")
    finally:
        ctx.put(R + "PositionSource", 0, wait=True)
        ctx.put(R + "TrajectoryFile", "", wait=True)
    rec = read_record(str(path))
    np.testing.assert_allclose(rec["positions_m"], traj)
    assert list(rec["position_source"]) == ["Trajectory"] * 12
    np.testing.assert_allclose(rec["data"]["position_y_m"], traj[:, 0])
    from ptychostream.files.record import check_record

    assert "positions: 12 of 12 (Trajectory 12)" in check_record(path).describe()
    _, n, _ = recorded_pairs(path, tmp_path, seed=2)
    assert n == 12


def _batch(uids, t0: float = 1000.0, attrs=None) -> BatchResult:
    frames = [ImageFrame(np.zeros((4, 4), np.uint16), int(u), t0 + 0.1 * i, None, attrs or {})
              for i, u in enumerate(uids)]
    return BatchResult(frames, {"phase": np.zeros((len(uids), 4, 4), np.float32)}, np.full(len(uids), 1e-3), "m")


def test_recorder_keeps_table_positions_early_or_late(tmp_path):
    """PositionSource=Table: positions that came before their frame and after it (written into the
    row then) are both in the record; a frame whose position never came stays NaN."""
    from ptychostream.pipeline.record import Recorder

    path = tmp_path / "table.h5"
    r = Recorder(str(path), source="Table", scale=1e-6, flush_period=0.1)
    r.add_positions([1, 2], [1.0, 2.0], [10.0, 20.0])  # micrometres, ahead of the frames
    r.submit(_batch([1, 2, 3, 4, 5]))
    r.add_positions([4, 3], [4.0, 3.0], [40.0, 30.0])  # late, shuffled
    r.close()
    rec = read_record(path)
    want = 1e-6 * np.array([[1, 10], [2, 20], [3, 30], [4, 40], [np.nan, np.nan]])
    np.testing.assert_allclose(rec["positions_m"], want)
    assert list(rec["position_source"]) == ["Table"] * 5


def test_recorder_keeps_motor_positions_matched_by_time(tmp_path):
    """PositionSource=Motors: readbacks matched at each frame's time stamp as the stitch stage matches them
    (the nearest sample within MotorTolerance, or the two around it), also when that sample comes after
    the frame was written."""
    from ptychostream.pipeline.record import Recorder

    path = tmp_path / "motors.h5"
    r = Recorder(str(path), source="Motors", motor_tolerance_s=0.15, flush_period=0.1)
    r.add_motor(0, 1000.0, 0.0)  # x
    r.add_motor(1, 1000.0, 5.0)  # y
    r.submit(_batch([1, 2, 3, 4], t0=1000.0))  # at 1000.0, 1000.1 (near the first sample), 1000.2, 1000.3
    r.add_motor(0, 1000.3, 3.0)  # frames 3 and 4 waited for it: the nearest sample within 0.15 s
    r.close()
    rec = read_record(path)
    np.testing.assert_allclose(rec["positions_m"], [[5.0, 0.0], [5.0, 0.0], [5.0, 3.0], [5.0, 3.0]])
    assert list(rec["position_source"]) == ["Motors"] * 4
