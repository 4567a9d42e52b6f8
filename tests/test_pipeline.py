"""Issue #4: receive → queue → infer → publish, with real simdet streams and real clients."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import (
    detector_and_reconstructor,
    live_monitor,
    put_in_background,
    pva_context,
    restore,
    text,
    wait_for,
)

from ptychostream.core.frames import ImageFrame
from ptychostream.core.pvdb import load_db
from ptychostream.devices.simdet import ABORTED, IDLE
from ptychostream.model.preprocess import Preprocess
from ptychostream.model.zoo import build_ptychonn_onnx
from ptychostream.protocols.ntnd import encode

pytestmark = pytest.mark.system

R = "TST:PL:"
S = "TST:PLSIM:"
DB = load_db("reconstructor.db")
#: what every test starts from: enabled, no input channel, the db/ defaults of the settings tests change,
#: and frames without a position (the frames tests put) held by the mosaic for the whole test: a
#: "waited over N s for its position" report would otherwise overwrite Message_RBV mid-test
BASELINE = {"InputPV": "", "Enable": 1, "PositionTimeout": DB["PositionTimeout"].drvh,
            **{name: DB[name].initial for name in ("BatchSize", "BacklogLimit", "BacklogPolicy", "PublishRate",
                                                   "PreCropSize")}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        # the real third-party edge model's quirks: fixed batch 8, input "input.1", phase only
        "fixed8": build_ptychonn_onnx(str(d / "fixed8.onnx"), size=128, heads=("phase",), base_channels=8,
                                      depth=3, fixed_batch=8, input_name="input.1", seed=1),
        "two": build_ptychonn_onnx(str(d / "two.onnx"), size=128, heads=("amplitude", "phase"), base_channels=8,
                                   depth=3, seed=2),
        "big": build_ptychonn_onnx(str(d / "big.onnx"), size=128, heads=("phase",), base_channels=16, depth=4,
                                   seed=3),
        "small64": build_ptychonn_onnx(str(d / "small64.onnx"), size=64, heads=("phase",), base_channels=4,
                                       depth=2, seed=4),
        # the same, trained on the centre 64×64 of 128×128 frames: it carries its crop
        "small64crop": build_ptychonn_onnx(str(d / "small64crop.onnx"), size=64, heads=("phase",), base_channels=4,
                                           depth=2, seed=4,
                                           metadata={"ptychostream.preprocess": Preprocess(crop_size=64).to_json()}),
        "corrupt": _write(d / "corrupt.onnx", b"\x08\x01garbage-not-onnx"),
        "dir": str(d),
    }


def _write(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def iocs():
    with detector_and_reconstructor(S, R) as pair:
        yield pair


@pytest.fixture(autouse=True)
def known_state(iocs, ctx):
    """Before each test: the detector up and idle, the BASELINE settings, an empty queue, an empty
    mosaic (an earlier test's frames would report there later), zero counters.

    The model is not part of it: a test that needs one says which (``serving``).
    """
    sim, _ = iocs
    if sim.proc is None or sim.proc.poll() is not None:  # a failed restart test left it down
        sim.start()
    ctx.put(S + "cam1:Acquire", 0, wait=True)
    wait_for(lambda: int(ctx.get(S + "cam1:DetectorState_RBV")) in (IDLE, ABORTED), timeout=10,
             message="detector idle (acquisition finished or stopped)")
    restore(ctx, R, BASELINE)
    wait_for(lambda: counters(ctx)["Backlog"] == 0, timeout=60, message="queue drained")
    ctx.put(R + "MosaicReset", 1, wait=True)  # queued after every result the drained frames gave
    wait_for(lambda: int(ctx.get(R + "PositionWait_RBV")) == 0, timeout=10, message="mosaic cleared")
    reset(ctx)


@pytest.fixture(scope="module")
def raw():
    with pva_context(nt=False) as c:
        yield c


def counters(ctx):
    names = ("Received", "Processed", "Dropped", "Rejected", "Missed", "Backlog")
    return {n: int(ctx.get(f"{R}{n}_RBV")) for n in names}


def invariant_holds(c):
    return c["Received"] == c["Processed"] + c["Dropped"] + c["Rejected"] + c["Backlog"]


def load_model(ctx, path, timeout=30):
    ctx.put(R + "ModelPath", path, wait=True)
    status = wait_for(lambda: int(ctx.get(R + "ModelStatus_RBV")) in (2, 3) and int(ctx.get(R + "ModelStatus_RBV")),
                      timeout=timeout, message="model load")
    return status


def serving(ctx, path):
    """Make ``path`` the serving model; loaded only if it is not serving already."""
    if text(ctx.get(R + "ModelPath_RBV")) != path or int(ctx.get(R + "ModelStatus_RBV")) != 2:
        assert load_model(ctx, path) == 2, text(ctx.get(R + "Message_RBV"))


def rejected(ctx, n, reason, timeout=5):
    """Wait until ``n`` frames are rejected and Message_RBV gives ``reason``; returns the message.

    Rejected_RBV comes from the status task and Message_RBV from the inference thread, in
    either order: both are waited for. Tests send one kind of bad frame at a time, since a
    batch holding two kinds reports both and only the last report stays in Message_RBV.
    """
    def state():
        return int(ctx.get(R + "Rejected_RBV")), text(ctx.get(R + "Message_RBV"))

    def seen():
        count, msg = state()
        return count == n and reason in msg and msg

    return wait_for(seen, timeout=timeout, message=f"{n} rejected, Message_RBV with {reason!r}", state=state)


def reset(ctx):
    ctx.put(R + "ResetCounters", 1, wait=True)
    wait_for(lambda: counters(ctx)["Received"] == 0, timeout=5, message="reset")


def put_frame(raw, array, uid, **attrs):
    raw.put(R + "Input", encode(ImageFrame(array, uid, time.time(), None, attrs)), wait=True)


def sim_acquire(ctx, n, period, **cfg):
    for k, v in dict(ImageMode="Multiple", NumImages=n, ScanPoints=min(n, 2000), AcquirePeriod=period, **cfg).items():
        ctx.put(S + "cam1:" + k, v, wait=True)
    ctx.put(S + "cam1:ArrayCounter", 0, wait=True)
    put_in_background(ctx, S + "cam1:Acquire", 1)


def test_fixed_batch8_input1_model_runs_on_put_frames(iocs, ctx, raw, models):
    ctx.put(R + "Enable", 1, wait=True)
    ctx.put(R + "InputPV", "", wait=True)
    assert load_model(ctx, models["fixed8"]) == 2, text(ctx.get(R + "Message_RBV"))
    assert "id" in text(ctx.get(R + "ModelInfo_RBV"))
    assert int(ctx.get(R + "Backend_RBV")) == 1  # ONNXRuntime-CPU
    ctx.put(R + "PublishRate", 0, wait=True)
    reset(ctx)
    got = []
    sub = live_monitor(raw, R + "Phase", got.append, request="record[queueSize=256]")
    rng = np.random.default_rng(0)
    try:
        for uid in range(1, 14):  # 13 frames: one full batch of 8 plus a padded partial batch
            put_frame(raw, rng.poisson(3, (128, 128)).astype(np.uint16), uid, PositionX=uid * 1e-7)
        wait_for(lambda: len([v for v in got if v["uniqueId"]]) >= 13, timeout=10, message="13 phase images")
    finally:
        sub.close()
    imgs = [v for v in got if v["uniqueId"]]
    assert [v["uniqueId"] for v in imgs] == list(range(1, 14))
    v = imgs[4]
    assert [d["size"] for d in v["dimension"]] == [128, 128]
    phase = np.asarray(v["value"]).reshape(128, 128)
    assert phase.dtype == np.float32 and np.all(np.abs(phase) <= np.pi + 1e-5)
    attrs = {a["name"]: a["value"] for a in v["attribute"]}
    assert attrs["PositionX"] == pytest.approx(5e-7)
    assert attrs["LatencyMs"] > 0 and attrs["ModelId"] in text(ctx.get(R + "ModelInfo_RBV"))
    c = wait_for(lambda: counters(ctx)["Processed"] == 13 and counters(ctx), timeout=5)
    assert c["Rejected"] == 0 and invariant_holds(c)


def test_every_ntndarray_value_type_and_lz4(iocs, ctx, raw, models):
    import lz4.block

    serving(ctx, models["fixed8"])
    rng = np.random.default_rng(1)
    base = rng.poisson(3, (128, 128))
    uid = 0
    for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.float32, np.float64):
        uid += 1
        put_frame(raw, base.astype(dtype), uid)
    # an lz4-compressed uint16 frame, as NDPluginCodec sends it
    arr = base.astype(np.uint16)
    v = encode(ImageFrame(arr, uid + 1, time.time()))
    comp = np.frombuffer(lz4.block.compress(arr.tobytes(), store_size=False), dtype=np.uint8)
    v["value"] = ("ubyteValue", comp)
    v["codec.name"] = "lz4"
    v["codec.parameters"] = ("i", 3)
    v["compressedSize"] = comp.size
    v["uncompressedSize"] = arr.nbytes
    raw.put(R + "Input", v, wait=True)
    c = wait_for(lambda: counters(ctx)["Processed"] == 9 and counters(ctx), timeout=10, message="9 processed")
    assert c["Rejected"] == 0
    # an unknown codec is rejected with a reason
    v["codec.name"] = "zstd-magic"
    from p4p.client.thread import RemoteError

    with pytest.raises(RemoteError, match="codec"):
        raw.put(R + "Input", v, wait=True)


def test_bad_frames_rejected_with_reason(iocs, ctx, raw, models):
    serving(ctx, models["fixed8"])
    bad = np.ones((128, 128), np.float32)
    bad[3, 4] = np.nan
    put_frame(raw, bad, 1)
    rejected(ctx, 1, "NaN")
    inf = np.ones((128, 128), np.float64)
    inf[0, 0] = np.inf
    put_frame(raw, inf, 2)
    rejected(ctx, 2, "NaN or inf")
    put_frame(raw, np.ones((64, 96), np.uint16), 3)  # wrong shape for this model
    rejected(ctx, 3, "shape")
    put_frame(raw, np.ones((128, 128), np.uint16), 4)
    c = wait_for(lambda: counters(ctx)["Processed"] == 1 and counters(ctx), timeout=5)
    assert c["Received"] == 4 and invariant_holds(c)


def test_bad_models_keep_the_old_one_serving(iocs, ctx, raw, models):
    serving(ctx, models["fixed8"])
    good = text(ctx.get(R + "ModelPath_RBV"))
    assert good
    for path, expected in ((models["corrupt"], "failed"), (models["dir"] + "/missing.onnx", "failed")):
        assert load_model(ctx, path) == 3
        msg = text(ctx.get(R + "Message_RBV"))
        assert expected in msg and "previous model keeps serving" in msg
        assert text(ctx.get(R + "ModelPath_RBV")) == good
    # the old model still serves
    reset(ctx)
    put_frame(raw, np.ones((128, 128), np.uint16), 1)
    wait_for(lambda: counters(ctx)["Processed"] == 1, timeout=5, message="old model serves")
    # a model whose input does not fit the frames now streaming is refused; the old one keeps serving
    assert load_model(ctx, models["small64"]) == 2
    msg = text(ctx.get(R + "Message_RBV"))
    assert "refused" in msg and "(128, 128)" in msg and "(64, 64)" in msg, msg
    assert "previous model keeps serving" in msg
    assert text(ctx.get(R + "ModelPath_RBV")) == good
    put_frame(raw, np.ones((128, 128), np.uint16), 2)
    wait_for(lambda: counters(ctx)["Processed"] == 2, timeout=5, message="old model still serves")
    assert counters(ctx)["Rejected"] == 0
    # a 64×64 model that brings its centre crop fits the same frames and is swapped in
    assert load_model(ctx, models["small64crop"]) == 2, text(ctx.get(R + "Message_RBV"))
    assert text(ctx.get(R + "ModelPath_RBV")) == models["small64crop"]
    assert int(ctx.get(R + "PreCropSize_RBV")) == 64
    put_frame(raw, np.ones((128, 128), np.uint16), 3)
    wait_for(lambda: counters(ctx)["Processed"] == 3, timeout=5, message="cropped frame processed")


def test_input_pv_that_never_connects(iocs, ctx):
    ctx.put(R + "InputPV", "TST:NOBODY:Image", wait=True)
    ctx.put(R + "Enable", 1, wait=True)
    wait_for(lambda: "not connected" in text(ctx.get(R + "Message_RBV")), timeout=15, message="never connects")
    assert int(ctx.get(R + "InputConnected_RBV")) == 0
    assert int(ctx.get(R + "Enable_RBV")) == 1


def test_overload_backlog_drops_and_drains(iocs, ctx, models):
    assert load_model(ctx, models["big"]) == 2
    ctx.put(R + "BacklogLimit", 300, wait=True)
    ctx.put(R + "BacklogPolicy", "DropNewest", wait=True)
    ctx.put(R + "BatchSize", 16, wait=True)
    ctx.put(R + "PublishRate", 10, wait=True)
    ctx.put(R + "InputPV", S + "Pva1:Image", wait=True)
    wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=10, message="connected")
    reset(ctx)
    n = 2000
    sim_acquire(ctx, n, 0.0)  # as fast as simdet goes: far above the CPU inference rate
    backlogs = []

    def drained():
        c = counters(ctx)
        backlogs.append(c["Backlog"])
        return c["Received"] + c["Missed"] >= n and c["Backlog"] == 0

    wait_for(drained, timeout=60, interval=0.05, message="every frame received and the backlog drained")
    peak = max(backlogs)
    c = counters(ctx)
    assert c["Received"] + c["Missed"] == n
    assert peak >= 250, peak
    assert c["Dropped"] > 0
    assert c["Backlog"] == 0
    assert invariant_holds(c)
    assert c["Processed"] > 0


def test_hot_swap_during_500hz_stream_loses_nothing(iocs, ctx, raw, models):
    assert load_model(ctx, models["two"]) == 2
    ctx.put(R + "PublishRate", 0, wait=True)
    ctx.put(R + "BatchSize", 32, wait=True)
    ctx.put(R + "InputPV", S + "Pva1:Image", wait=True)
    wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=10, message="connected")
    reset(ctx)
    got, amps = [], []
    sub = live_monitor(raw, R + "Phase", lambda v: got.append(v["uniqueId"]), request="record[queueSize=4096]")
    asub = live_monitor(raw, R + "Amplitude", lambda v: amps.append(v["uniqueId"]),
                        request="record[queueSize=4096]")
    n = 1500
    def processed(k, message):  # CPU inference on shared cores: the timeout bounds a hang, not the speed
        wait_for(lambda: counters(ctx)["Processed"] >= k, timeout=90, message=message, state=lambda: counters(ctx))

    try:
        sim_acquire(ctx, n, 0.002)
        processed(200, "stream flowing")
        load_model(ctx, models["fixed8"])  # swap mid-stream
        assert int(ctx.get(R + "ModelStatus_RBV")) == 2
        processed(counters(ctx)["Processed"] + 200, "fixed8 serving")
        load_model(ctx, models["two"])  # and back
        processed(n, "all processed")
        wait_for(lambda: len([u for u in got if u]) >= n, timeout=10, message="every phase image delivered")
    finally:
        sub.close()
        asub.close()
    c = counters(ctx)
    assert c["Dropped"] == 0 and c["Rejected"] == 0 and c["Missed"] == 0
    uids = [u for u in got if u]
    assert sorted(set(uids)) == list(range(1, n + 1))
    assert len(uids) == n
    assert 0 < len([u for u in amps if u]) < n  # the phase-only model served part of the stream


def test_reconnects_when_the_detector_ioc_restarts(iocs, ctx, models):
    sim, _ = iocs
    assert load_model(ctx, models["two"]) == 2
    ctx.put(R + "Enable", 1, wait=True)
    ctx.put(R + "InputPV", S + "Pva1:Image", wait=True)
    wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=10, message="connected")
    sim.stop()
    wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 0, timeout=15, message="disconnect seen")
    sim.start()
    wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=30, message="reconnected")

    def client_reaches_simdet() -> bool:  # this test's own client searches for the new server too
        try:
            ctx.get(S + "cam1:ImageMode", timeout=1)
        except TimeoutError:
            return False
        return True

    wait_for(client_reaches_simdet, timeout=30, message="the test's client reconnected to simdet")
    reset(ctx)
    sim_acquire(ctx, 50, 0.002)
    c = wait_for(lambda: (lambda c: c if c["Processed"] + c["Rejected"] + c["Dropped"] >= 50 else None)(counters(ctx)),
                 timeout=30, message="frames after restart")
    assert c["Processed"] == 50 and c["Received"] == 50, c
    assert int(ctx.get(R + "InputConnected_RBV")) == 1

