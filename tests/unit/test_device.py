"""DeviceState in-process: puts validated against db/, handlers, Busy puts, listeners, image PVs."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest

from ptychostream.core.device import Busy, DeviceState, PutError
from ptychostream.core.frames import ImageFrame
from ptychostream.core.pvdb import load_db


@pytest.fixture
def device() -> DeviceState:
    return DeviceState(load_db("reconstructor.db"), message_pv="Message_RBV", refused_pv="RefusedPuts_RBV")


def refuse(device: DeviceState, suffix: str, value, match: str) -> None:
    """Put ``value``; it must be refused, counted and explained, and leave the setpoint as it was."""
    before = device.get(suffix) if suffix in device.readings() else None
    refused = device.get("RefusedPuts_RBV")
    with pytest.raises(PutError, match=match):
        device.put(suffix, value)
    assert device.get("RefusedPuts_RBV") == refused + 1
    msg = device.reading("Message_RBV")
    assert msg.value.startswith("put refused: ") and msg.severity == 1
    if before is not None:
        assert device.get(suffix) == before


def test_initial_values_come_from_db(device):
    assert device.get("BatchSize") == 64 and device.get("BacklogLimit") == 20000
    assert device.get("PreCropX") == -1 and device.get("PosAttrX") == "PositionX"
    assert device.get("RefusedPuts_RBV") == 0
    # enum alarm states apply from the start: Disconnected is MINOR
    assert device.reading("InputConnected_RBV").severity == 1
    assert "Input" not in device.readings() and "Phase" not in device.readings()


def test_numbers_within_limits_are_stored(device):
    assert device.put("BatchSize", 32) == 32 and device.get("BatchSize") == 32
    assert device.put("BatchSize", np.int64(1024)) == 1024
    assert device.put("BatchSize", 8.0) == 8 and isinstance(device.get("BatchSize"), int)
    assert device.put("PublishRate", np.array(12.5)) == 12.5
    assert device.put("PreCropX", -1) == -1


@pytest.mark.parametrize("suffix,value,match", [
    ("BatchSize", 0, r"outside the limits 1\.\.1024 frames"),
    ("BatchSize", 1025, "outside the limits"),
    ("BatchSize", 2.5, "takes an integer"),
    ("BatchSize", "32", "takes a number, not str"),
    ("BatchSize", None, "takes a number, not NoneType"),
    ("PublishRate", float("nan"), "not a finite number"),
    ("PublishRate", -0.1, r"outside the limits 0\.\.100000 Hz"),
    ("PreCropX", -2, "outside the limits"),
    ("BacklogPolicy", 2, r"index 2 outside 0\.\.1"),
    ("BacklogPolicy", "DropAll", "not one of DropNewest, DropOldest"),
    ("BacklogPolicy", 0.5, "takes a choice index or name"),
    ("InputPV", 5, "takes a string, not int"),
    ("InputPV", "x" * 256, "longer than 255 bytes"),
    ("InputPV", b"\xff\xfe", "not valid UTF-8"),
    ("Processed_RBV", 3, "Processed_RBV is read-only"),
    ("Phase", 0, "Phase is read-only"),
    ("NoSuchPV", 1, "no PV NoSuchPV"),
])
def test_refused_puts_are_counted_and_explained(device, suffix, value, match):
    refuse(device, suffix, value, match)


def test_refusals_accumulate(device):
    for n in range(1, 4):
        with pytest.raises(PutError):
            device.put("BatchSize", 0)
        assert device.get("RefusedPuts_RBV") == n


def test_enum_and_string_forms(device):
    assert device.put("BacklogPolicy", "DropOldest") == 1
    assert device.put("BacklogPolicy", "0") == 0
    assert device.put("BacklogPolicy", True) == 1
    assert device.put("Enable", 1.0) == 1
    assert device.put("InputPV", b"SIM:Pva1:Image\0junk") == "SIM:Pva1:Image"
    assert device.put("InputPV", np.frombuffer(b"A:B\0", np.uint8)) == "A:B"
    assert device.put("InputPV", "é" * 127) == "é" * 127  # 254 bytes fit in 255


def test_readonly_pv_takes_no_handler(device):
    with pytest.raises(ValueError, match="not writable"):
        device.on_put("Processed_RBV")


def test_put_handlers_apply_return_and_refuse(device):
    seen: list[object] = []

    @device.on_put("BatchSize")
    def _batch(value: int) -> None:
        seen.append(value)
        device.set("BatchSize_RBV", value)

    @device.on_put("InputPV")
    def _pv(value: str) -> str:
        return value.strip()

    @device.on_put("PublishRate")
    def _rate(value: float) -> None:
        if value > 50:
            raise PutError("PublishRate above 50 Hz needs a faster display")

    assert device.put("BatchSize", 16) == 16
    assert seen == [16] and device.get("BatchSize_RBV") == 16 and device.get("BatchSize") == 16
    assert device.put("InputPV", "  SIM:Image ") == "SIM:Image" and device.get("InputPV") == "SIM:Image"
    device.put("PublishRate", 5.0)
    refuse(device, "PublishRate", 60.0, "faster display")
    assert device.get("PublishRate") == 5.0
    # a value the db refuses never reaches the handler
    refuse(device, "BatchSize", 0, "outside the limits")
    assert seen == [16]


def test_busy_put_completes_later(device):
    release = threading.Event()

    @device.on_put("Enable")
    def _enable(value: int) -> Busy:
        done: Future = Future()

        def work() -> None:
            release.wait(10)
            device.set("Enable_RBV", value)
            done.set_result(None)

        threading.Thread(target=work, daemon=True).start()
        return Busy(value, done)

    busy = device.put("Enable", 1)
    assert isinstance(busy, Busy) and busy.value == 1
    assert device.get("Enable") == 1  # the setpoint is stored at once
    assert not busy.done.done() and device.get("Enable_RBV") == 0
    release.set()
    assert busy.done.result(timeout=10) is None
    assert device.get("Enable_RBV") == 1


def test_listeners_see_changes_only(device):
    seen: list[tuple[str, object, int]] = []
    device.subscribe(lambda spec, r: seen.append((spec.suffix, r.value, r.severity)))
    assert device.set("Backlog_RBV", 5) is True
    assert device.set("Backlog_RBV", 5) is False  # unchanged: no post
    assert device.set("Backlog_RBV", 5, severity=2) is True  # the alarm changed
    device.put("BatchSize", 8)
    device.set("InputConnected_RBV", 1)  # Connected: the enum's severity is NO_ALARM
    device.set("ModelStatus_RBV", 3)  # Error is MAJOR in db/
    assert seen == [("Backlog_RBV", 5, 0), ("Backlog_RBV", 5, 2), ("BatchSize", 8, 0),
                    ("InputConnected_RBV", 1, 0), ("ModelStatus_RBV", 3, 2)]


def test_subscribe_with_replay_sends_every_value_first(device):
    device.set("Received_RBV", 7)
    seen: dict[str, object] = {}
    device.subscribe(lambda spec, r: seen.__setitem__(spec.suffix, r.value), replay=True)
    assert seen.keys() == device.readings().keys()
    assert seen["Received_RBV"] == 7 and seen["BatchSize"] == 64


def test_set_converts_and_clips_to_the_db_type(device):
    device.set("Backlog_RBV", 3.0)
    assert device.get("Backlog_RBV") == 3 and isinstance(device.get("Backlog_RBV"), int)
    device.set("InputRate_RBV", 2)
    assert isinstance(device.get("InputRate_RBV"), float)
    device.set("Message_RBV", "é" * 600)  # 1200 bytes into a 512-byte string
    text = device.get("Message_RBV")
    assert text == "é" * 255 and len(text.encode()) == 510


def test_image_puts_and_posts(device):
    frame = ImageFrame(np.ones((4, 4), np.uint16), unique_id=9)
    with pytest.raises(PutError, match="Input is not accepting frames"):
        device.put_image("Input", frame)
    assert device.get("RefusedPuts_RBV") == 1
    assert device.get("Message_RBV").startswith("frame put refused: ")
    with pytest.raises(PutError, match="Phase does not take frames"):
        device.put_image("Phase", frame)
    with pytest.raises(PutError, match="NoSuchPV does not take frames"):
        device.put_image("NoSuchPV", frame)
    assert device.get("RefusedPuts_RBV") == 3
    got: list[int] = []

    @device.on_put("Input")
    def _input(f: ImageFrame) -> None:
        if f.unique_id < 0:
            raise PutError("negative uniqueId")
        got.append(f.unique_id)

    device.put_image("Input", frame)
    with pytest.raises(PutError, match="negative uniqueId"):
        device.put_image("Input", ImageFrame(frame.array, unique_id=-1))
    assert got == [9] and device.get("RefusedPuts_RBV") == 4
    posts: list[tuple[str, object]] = []
    device.add_image_sink(lambda spec, f: posts.append((spec.suffix, f)))
    device.post_image("Phase", frame)
    assert posts == [("Phase", frame)]
