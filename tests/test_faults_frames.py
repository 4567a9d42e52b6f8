"""Issue #17, findings 4-6: odd frames, NaN outputs and unfit models, with real IOCs on loopback.

A simdet IOC streams 128x128 uint16 frames into a reconstructor IOC; the test puts odd frames
to ``Input`` with p4p and reads the counters, the alarms and the ``Phase`` images back with p4p.

The NaN model is ``build_bounded_onnx``: phase = sqrt(100 - x). Its self-test feeds Poisson(4)
counts, all below 100, so it loads Ready; every simulated frame has a central speckle of
several hundred photons, where the square root of a negative number is NaN: a model that
works on the inputs it was tried on and breaks on real intensities, which is what finding 5 saw.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import (
    IOCProcess,
    detector_and_reconstructor,
    live_monitor,
    next_slot,
    put_in_background,
    pva_context,
    text,
    wait_for,
)

from ptychostream.core.frames import ImageFrame
from ptychostream.core.pvdb import load_db
from ptychostream.devices.simdet import ABORTED, IDLE
from ptychostream.model.info import load_model_file
from ptychostream.model.zoo import build_bounded_onnx, build_ptychonn_onnx
from ptychostream.protocols.ntnd import encode

pytestmark = [pytest.mark.system, pytest.mark.faults]

R, S, FRESH = "TST:FF:", "TST:FFSIM:", "TST:FFNEW:"
DB = load_db("reconstructor.db")
READY = 2
COUNTERS = ("Received", "Processed", "Dropped", "Rejected", "Missed", "Backlog", "NonFinite")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("models")
    return {
        "good": build_ptychonn_onnx(d / "good.onnx", size=128, heads=("phase",), base_channels=4, depth=2, seed=7),
        "m32": build_ptychonn_onnx(d / "m32.onnx", size=32, heads=("phase",), base_channels=4, depth=2, seed=8),
        "bounded": build_bounded_onnx(d / "bounded.onnx", size=128, limit=100.0),
    }


@pytest.fixture(scope="module")
def iocs():
    with detector_and_reconstructor(S, R) as pair:
        yield pair


@pytest.fixture(scope="module")
def raw():
    with pva_context(nt=False) as c:
        yield c


@pytest.fixture(autouse=True)
def detector_idle(iocs, ctx):
    ctx.put(S + "cam1:Acquire", 0, wait=True)
    wait_for(lambda: int(ctx.get(S + "cam1:DetectorState_RBV")) in (IDLE, ABORTED), timeout=10,
             message="detector idle")


def counters(ctx, prefix: str = R) -> dict[str, int]:
    return {n: int(v) for n, v in zip(COUNTERS, ctx.get([f"{prefix}{n}_RBV" for n in COUNTERS]))}


def accounted(c: dict[str, int]) -> bool:
    return c["Received"] == c["Processed"] + c["Dropped"] + c["Rejected"] + c["Backlog"]


def settled(ctx, received: int, prefix: str = R, timeout: float = 120) -> dict[str, int]:
    """Wait until ``received`` frames came in and every one of them is counted out; the counters."""
    def done():
        c = counters(ctx, prefix)
        return c if c["Received"] + c["Missed"] >= received and c["Backlog"] == 0 and accounted(c) else None
    return wait_for(done, timeout=timeout, interval=0.1, message=f"{received} frames in and counted out")


def severity(raw, name: str) -> int:
    return int(raw.get(name)["alarm.severity"])


def prepare(ctx, prefix: str, model: str) -> None:
    """Enabled, every result posted, no mosaic report over Message_RBV, ``model`` serving, zero counters."""
    for name, value in (("Enable", 1), ("InputPV", ""), ("PublishRate", 0),
                        ("PositionTimeout", DB["PositionTimeout"].drvh)):
        ctx.put(prefix + name, value, wait=True)
    wait_for(lambda: counters(ctx, prefix)["Backlog"] == 0, timeout=60, message="queue drained")
    if text(ctx.get(prefix + "ModelPath_RBV")) != model:
        assert load_model(ctx, prefix, model) == READY, text(ctx.get(prefix + "Message_RBV"))
    ctx.put(prefix + "ResetCounters", 1, wait=True)
    wait_for(lambda: counters(ctx, prefix)["Received"] == 0, timeout=5, message="counters reset")


def load_model(ctx, prefix: str, path: str) -> int:
    """Put ModelPath and wait for the load to end; ModelStatus_RBV (2 Ready, 3 Error)."""
    ctx.put(prefix + "ModelPath", path, wait=True)
    return wait_for(lambda: (s := int(ctx.get(prefix + "ModelStatus_RBV"))) in (2, 3) and s, timeout=60,
                    message="model load")


def stream(ctx, prefix: str, n: int, period: float) -> None:
    """Connect ``prefix`` to the detector and start an acquisition of ``n`` frames."""
    ctx.put(prefix + "InputPV", S + "Pva1:Image", wait=True)
    wait_for(lambda: int(ctx.get(prefix + "InputConnected_RBV")) == 1, timeout=10, message="connected")
    for k, v in dict(ImageMode="Multiple", NumImages=n, ScanPoints=n, AcquirePeriod=period, ArrayCounter=0).items():
        ctx.put(S + "cam1:" + k, v, wait=True)
    put_in_background(ctx, S + "cam1:Acquire", 1)


def put_frame(raw, prefix: str, array: np.ndarray, uid: int) -> None:
    raw.put(prefix + "Input", encode(ImageFrame(array, uid, time.time())), wait=True)


def phase_images(raw, prefix: str, into: list):
    """Collect (uniqueId, finite?, ModelId) of every Phase image posted from now on."""
    def keep(v) -> None:
        attrs = {a["name"]: a["value"] for a in v["attribute"]}
        into.append((v["uniqueId"], bool(np.isfinite(np.asarray(v["value"])).all()), attrs.get("ModelId")))
    return live_monitor(raw, prefix + "Phase", keep, request="record[queueSize=4096]")


def test_ten_odd_frames_in_a_1000_frame_stream_cost_only_themselves(iocs, ctx, raw, models):
    prepare(ctx, R, models["good"])
    got: list = []
    sub = phase_images(raw, R, got)
    odd = np.random.default_rng(0).poisson(3, (10, 127, 128)).astype(np.uint16)
    try:
        stream(ctx, R, 1000, 0.002)
        for i in range(10):  # spread over the stream: one after every ~90 detector frames
            wait_for(lambda: counters(ctx)["Received"] >= 90 * (i + 1), timeout=60, message="stream flowing")
            put_frame(raw, R, odd[i], i + 1)
        c = settled(ctx, 1010)
        wait_for(lambda: len(got) >= 1000, timeout=30, message="1000 phase images")
    finally:
        sub.close()
    assert c == {**c, "Received": 1010, "Processed": 1000, "Rejected": 10, "Dropped": 0, "Missed": 0,
                 "NonFinite": 0}, c
    assert sorted(u for u, _, _ in got) == list(range(1, 1001))  # every detector frame published once
    assert all(ok for _, ok, _ in got)
    assert "(127, 128) does not fit the model input (128, 128)" in text(ctx.get(R + "Message_RBV"))


def test_a_model_unfit_for_the_stream_is_refused_and_the_old_one_serves_on(iocs, ctx, raw, models):
    prepare(ctx, R, models["good"])
    good_id = load_model_file(models["good"]).model_id
    got: list = []
    sub = phase_images(raw, R, got)
    n = 600
    try:
        stream(ctx, R, n, 0.002)
        wait_for(lambda: counters(ctx)["Processed"] >= 100, timeout=60, message="stream flowing")
        assert load_model(ctx, R, models["m32"]) == READY
        msg = text(ctx.get(R + "Message_RBV"))
        assert f"model {models['m32']} refused: the frames now streaming are (128, 128) uint16" in msg, msg
        assert "the model input is (32, 32)" in msg and msg.endswith("the previous model keeps serving"), msg
        assert text(ctx.get(R + "ModelPath_RBV")) == models["good"]
        assert severity(raw, R + "ModelStatus_RBV") == 0
        # a model that fits but gives NaN on these frames is refused too, before it serves one
        assert load_model(ctx, R, models["bounded"]) == READY
        msg = text(ctx.get(R + "Message_RBV"))
        assert "phase output holds NaN or inf on the frames now streaming ((128, 128) uint16)" in msg, msg
        assert text(ctx.get(R + "ModelPath_RBV")) == models["good"]
        c = settled(ctx, n)
        wait_for(lambda: len(got) >= n, timeout=30, message=f"{n} phase images")
    finally:
        sub.close()
    assert c == {**c, "Received": n, "Processed": n, "Rejected": 0, "Dropped": 0, "Missed": 0}, c
    assert sorted(u for u, _, _ in got) == list(range(1, n + 1))
    assert {m for _, _, m in got} == {good_id}  # the old model served every frame
    assert int(ctx.get(R + "ModelStatus_RBV")) == READY


@pytest.fixture
def fresh(iocs):
    """A reconstructor IOC that has seen no frame (so a swap has no stream to be checked against)."""
    rec = IOCProcess(["ioc", "--prefix", FRESH, "--no-ca"], FRESH, next_slot()).start()
    yield rec
    rec.stop()


def test_nan_outputs_are_counted_not_published_and_alarmed(fresh, ctx, raw, models):
    prepare(ctx, FRESH, models["bounded"])  # loads Ready: nothing streams, the self-test passes
    got: list = []
    sub = phase_images(raw, FRESH, got)
    n = 200
    try:
        stream(ctx, FRESH, n, 0.002)
        c = settled(ctx, n, FRESH)
        assert c == {**c, "Received": n, "Processed": 0, "Rejected": n, "NonFinite": n, "Dropped": 0}, c
        # the reject report and the model-health report are two reasons: the newer one is shown first
        # and the other comes back when its turn comes (the message log never lets one hide the other)
        msg = wait_for(lambda: (m := text(ctx.get(FRESH + "Message_RBV")))
                       and "non-finite output (NaN or inf) from model bounded" in m and m,
                       timeout=5, message="the non-finite report in Message_RBV")
        history = text(ctx.get(FRESH + "MessageHistory_RBV"))
        assert "non-finite output (NaN or inf) from model bounded" in history, history
        assert "of its last 100 frames" in msg or "of its last 100 frames" in history, (msg, history)
        assert int(ctx.get(FRESH + "ModelStatus_RBV")) == READY
        assert severity(raw, FRESH + "ModelStatus_RBV") == 2
        wait_for(lambda: severity(raw, FRESH + "Status_RBV") == 2, timeout=5, message="Status_RBV MAJOR")
        assert got == []  # not one NaN image posted
        # frames the model can take: finite outputs, published, and the alarm clears
        ctx.put(FRESH + "InputPV", "", wait=True)
        rng = np.random.default_rng(1)
        for uid in range(1, 101):
            put_frame(raw, FRESH, rng.poisson(3, (128, 128)).astype(np.uint16), uid)
        c = settled(ctx, n + 100, FRESH)
        wait_for(lambda: len(got) >= 100, timeout=30, message="100 phase images")
    finally:
        sub.close()
    assert c == {**c, "Processed": 100, "Rejected": n, "NonFinite": n}, c
    assert [u for u, _, _ in got] == list(range(1, 101)) and all(ok for _, ok, _ in got)
    assert "model bounded outputs are finite again" in text(ctx.get(FRESH + "Message_RBV"))
    assert severity(raw, FRESH + "ModelStatus_RBV") == 0
    wait_for(lambda: severity(raw, FRESH + "Status_RBV") == 0, timeout=5, message="Status_RBV alarm cleared")
