"""The reconstructor's PV handlers driven in-process through its DeviceState (no server, no network).

Frames come in as puts to ``Input``; ``InputPV`` stays empty, so no p4p client is ever created.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for

from ptychostream.core.device import PutError
from ptychostream.core.frames import ImageFrame
from ptychostream.devices.reconstructor import (
    MODEL_ERROR,
    MODEL_NONE,
    MODEL_READY,
    ST_DISABLED,
    ST_IDLE,
    ST_OVERLOAD,
    Reconstructor,
)
from ptychostream.model.infer import load_model_file
from ptychostream.model.preprocess import Preprocess
from ptychostream.model.zoo import build_ptychonn_onnx

SIZE = 32


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    return build_ptychonn_onnx(tmp_path_factory.mktemp("models") / "tiny.onnx", size=SIZE, heads=("phase",),
                               base_channels=2, depth=2)


@pytest.fixture
def rec():
    r = Reconstructor()
    r.start()
    yield r
    r.stop()
    assert not r.batcher.is_alive() and not r.mosaic.is_alive()


def pv(r: Reconstructor, name: str):
    """A PV's value after the status scan (what a client would read)."""
    r.update_status()
    return r.device.get(name)


def frame(uid: int, value: float = 1.0, dtype=np.uint16, shape=(SIZE, SIZE)) -> ImageFrame:
    return ImageFrame(np.full(shape, value, dtype=dtype), unique_id=uid)


def load(r: Reconstructor, path: str, status: int = MODEL_READY) -> None:
    r.device.put("ModelPath", path)
    wait_for(lambda: r.device.get("ModelStatus_RBV") == status, timeout=30, message=f"ModelStatus {status}")


def counts(r: Reconstructor) -> dict[str, int]:
    r.update_status()
    return {n: r.device.get(f"{n}_RBV") for n in ("Received", "Processed", "Dropped", "Rejected", "Missed",
                                                   "Backlog")}


def identity_holds(c: dict[str, int]) -> bool:
    return c["Received"] == c["Processed"] + c["Dropped"] + c["Rejected"] + c["Backlog"]


def settle(r: Reconstructor, **want: int) -> dict[str, int]:
    def reached():
        c = counts(r)
        return c if all(c[k] == v for k, v in want.items()) and c["Backlog"] == 0 else None
    return wait_for(reached, timeout=20, message=str(want))


def test_state_numbers_match_the_db_enums(rec):
    db = rec.device.db
    assert db["ModelStatus_RBV"].enum_strs[MODEL_NONE] == "None"
    assert (db["ModelStatus_RBV"].enum_strs[MODEL_READY], db["ModelStatus_RBV"].enum_strs[MODEL_ERROR]) == \
        ("Ready", "Error")
    assert [db["Status_RBV"].enum_strs[s] for s in (ST_DISABLED, ST_IDLE, ST_OVERLOAD)] == \
        ["Disabled", "Idle", "Overload"]


def test_start_up_readbacks_and_status(rec):
    d = rec.device
    assert (d.get("BatchSize_RBV"), d.get("BacklogLimit_RBV"), d.get("PublishRate_RBV")) == (64, 20000, 0.0)
    assert d.get("PreBin_RBV") == 1 and d.get("PreCropX_RBV") == -1
    assert pv(rec, "Status_RBV") == ST_DISABLED and d.get("ModelStatus_RBV") == MODEL_NONE


def test_control_setpoints_reach_the_pipeline(rec):
    d = rec.device
    d.put("BatchSize", 16)
    assert rec.batcher.batch_size == 16 and d.get("BatchSize_RBV") == 16
    d.put("BacklogLimit", 500)
    assert rec.queue.limit == 500 and d.get("BacklogLimit_RBV") == 500
    d.put("BacklogPolicy", "DropOldest")
    assert rec.queue.policy == "DropOldest" and d.get("BacklogPolicy_RBV") == 1
    d.put("PublishRate", 2.5)
    assert rec.publisher.rate_hz == 2.5 and d.get("PublishRate_RBV") == 2.5
    assert d.put("InputPV", "  SIM:Pva1:Image ") == "SIM:Pva1:Image"
    assert d.get("InputPV_RBV") == "SIM:Pva1:Image" and rec.receiver.channel == ""  # disabled: not monitored


def test_frames_are_refused_while_disabled(rec):
    with pytest.raises(PutError, match="disabled: put Enable=1 first"):
        rec.device.put_image("Input", frame(1))
    assert rec.device.get("RefusedPuts_RBV") == 1 and counts(rec)["Received"] == 0


def test_put_frames_through_a_model(rec, model_file):
    d = rec.device
    phase: list[int] = []
    d.add_image_sink(lambda spec, f: phase.append(f.unique_id) if spec.suffix == "Phase" else None)
    d.put("Backend", "ONNXRuntime-CPU")
    assert d.get("ModelStatus_RBV") == MODEL_NONE  # no model path yet: nothing loads
    load(rec, model_file)
    info = load_model_file(model_file)
    assert d.get("ModelPath_RBV") == model_file and info.model_id in d.get("ModelInfo_RBV")
    assert d.get("Backend_RBV") == 1
    d.put("Enable", 1)
    assert d.get("Enable_RBV") == 1 and pv(rec, "Status_RBV") == ST_IDLE
    for uid in (1, 2, 3, 6):  # 4 and 5 never came: missed
        d.put_image("Input", frame(uid))
    d.put_image("Input", frame(7, np.nan, dtype=np.float32))
    d.put_image("Input", frame(8, shape=(SIZE, SIZE + 2)))
    c = settle(rec, Processed=4, Rejected=2)
    assert (c["Received"], c["Missed"], c["Dropped"]) == (6, 2, 0) and identity_holds(c)
    assert phase == [1, 2, 3, 6]
    assert d.reading("Message_RBV").value.startswith("rejected 1 frame(s): ")
    d.put("ResetCounters", 1)
    assert d.get("ResetCounters") == 0 and d.get("Message_RBV") == "counters reset"
    assert counts(rec) == dict.fromkeys(("Received", "Processed", "Dropped", "Rejected", "Missed", "Backlog"), 0)


def test_drop_oldest_while_no_model_serves(rec, model_file):
    d = rec.device
    phase: list[int] = []
    d.add_image_sink(lambda spec, f: phase.append(f.unique_id) if spec.suffix == "Phase" else None)
    d.put("Enable", 1)
    d.put("BacklogLimit", 3)
    d.put("BacklogPolicy", "DropOldest")
    for uid in range(1, 6):
        d.put_image("Input", frame(uid))
    c = counts(rec)
    assert (c["Received"], c["Dropped"], c["Backlog"]) == (5, 2, 3) and identity_holds(c)
    assert pv(rec, "Status_RBV") == ST_OVERLOAD
    load(rec, model_file)
    c = settle(rec, Processed=3)
    assert identity_holds(c)
    # the publisher thread posts Phase after the frames count as processed
    wait_for(lambda: phase == [3, 4, 5], timeout=5, message="Phase of the 3 kept frames", state=lambda: phase)
    rec.device.put("ModelPath", "")
    wait_for(lambda: d.get("ModelStatus_RBV") == MODEL_NONE, message="unloaded")
    assert d.get("ModelPath_RBV") == ""
    d.put_image("Input", frame(6))  # put after the unload: it waits for the next model
    wait_for(lambda: (len(rec.queue), rec.queue.inflight) == (1, 0), message="frame waiting")
    c = counts(rec)
    assert (c["Processed"], c["Backlog"]) == (3, 1) and identity_holds(c)


def test_a_bad_model_keeps_the_old_one_serving(rec, model_file, tmp_path):
    d = rec.device
    load(rec, model_file)
    serving = rec.batcher.model
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    load(rec, str(bad), status=MODEL_ERROR)
    assert d.reading("ModelStatus_RBV").severity == 2
    assert "the previous model keeps serving" in d.get("Message_RBV")
    assert rec.batcher.model is serving and d.get("ModelPath_RBV") == model_file


def test_preprocessing_setpoints(rec, tmp_path):
    d = rec.device
    d.put("PreCropSize", 30)
    with pytest.raises(PutError, match="PreBin: crop_size 30 is not a multiple of bin 4"):
        d.put("PreBin", 4)
    assert d.get("PreBin") == 1 and d.get("PreBin_RBV") == 1
    d.put("PreBin", 2)
    d.put("PreScale", "log1p")
    d.put("PreCropX", 20)  # the centre applies once both x and y are set
    want = Preprocess(crop_size=30, bin=2, scale="log1p")
    wait_for(lambda: rec.batcher.preprocess == want, message="the loop takes the settings")
    d.put("PreCropY", 18)
    want = Preprocess(crop_size=30, crop_center=(18, 20), bin=2, scale="log1p")
    wait_for(lambda: rec.batcher.preprocess == want, message="the crop centre")
    assert (d.get("PreCropX_RBV"), d.get("PreCropY_RBV"), d.get("PreScale_RBV")) == (20, 18, 1)
    with pytest.raises(PutError, match="dark file not found"):  # the file is read on a thread (a Busy put)
        d.put("PreDarkPath", str(tmp_path / "missing.npy")).done.result(5)
    assert d.get("PreDarkPath") == ""
    dark = tmp_path / "dark.npy"
    np.save(dark, np.full((40, 40), 3.0, np.float32))
    d.put("PreDarkPath", str(dark)).done.result(5)
    assert d.get("PreDarkPath_RBV") == str(dark)
    pre = wait_for(lambda: rec.batcher.preprocess if rec.batcher.preprocess.dark_path == str(dark) else None,
                   message="the dark frame")
    np.testing.assert_array_equal(pre.dark, np.full((40, 40), 3.0))


def test_capture_refusals_and_the_recorder_is_detached(rec, tmp_path):
    d = rec.device
    with pytest.raises(PutError, match="set CaptureFile first"):
        d.put("Capture", 1)
    listeners = list(rec.publisher.listeners)
    path = str(tmp_path / "capture.h5")
    d.put("CaptureFile", f" {path} ")
    d.put("Capture", 1).done.result(5)  # the file is created on a thread (a Busy put)
    assert d.get("Capture_RBV") == 1 and d.get("CaptureFile_RBV") == path
    assert len(rec.publisher.listeners) == len(listeners) + 1
    with pytest.raises(PutError, match="while capturing"):
        d.put("CaptureFile", str(tmp_path / "other.h5"))
    d.put("Capture", 0)
    wait_for(lambda: d.get("Capture_RBV") == 0, message="record closed")
    assert rec.publisher.listeners == listeners  # the closed recorder gets no more results
    assert Path(path).is_file()


def test_mosaic_extent_needs_min_below_max(rec):
    d = rec.device
    d.put("MosaicXMin", 1e-6)
    assert d.get("MosaicXMin") == 1e-6  # kept as typed
    assert d.get("Message_RBV") == "mosaic extent incomplete: set min < max for x and y"
    assert d.reading("Message_RBV").severity == 1
