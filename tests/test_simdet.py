"""Issue #3: the simulated ptychography detector IOC, read by real clients."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    SLOTS,
    IOCProcess,
    live_monitor,
    put_in_background,
    pva_context,
    restore,
    settings,
    text,
    wait_for,
)

from ptychostream.core.pvdb import load_db
from ptychostream.devices.simdet import ABORTED, IDLE

pytestmark = pytest.mark.system

P = "TST:SIM:"
#: the setpoints a test may change (Acquire and ArrayCounter: each test that cares sets them)
SETTINGS = [s.suffix for s in load_db("simdetector.db")
            if s.writable and s.kind != "image" and s.suffix not in ("cam1:Acquire", "cam1:ArrayCounter")]


@pytest.fixture(scope="module")
def simdet(tmp_path_factory):
    truth = tmp_path_factory.mktemp("truth") / "truth.h5"
    # slot 0: pvapy (pvAccessCPP) searches only EPICS_PVA_BROADCAST_PORT, which is slot 0's
    ioc = IOCProcess(["simdet", "--prefix", P, "--truth", str(truth)], P, SLOTS[0]).start()
    ioc.truth = truth
    yield ioc
    ioc.stop()


@pytest.fixture(scope="module")
def startup(simdet, ctx):
    """The detector's settings as the IOC started them (the --truth file included)."""
    return settings(ctx, P, SETTINGS)


@pytest.fixture(autouse=True)
def known_state(ctx, startup):
    """Each test starts from an idle detector (acquisition finished or stopped) with its start-up settings."""
    ctx.put(P + "cam1:Acquire", 0, wait=True)
    wait_for(lambda: int(ctx.get(P + "cam1:DetectorState_RBV")) in (IDLE, ABORTED), timeout=10,
             message="detector idle")
    restore(ctx, P, startup)


def configure(ctx, **values):
    for name, value in values.items():
        ctx.put(P + "cam1:" + name, value, wait=True)


def acquire(ctx, timeout=60):
    """Put Acquire=1 and wait for the put to complete (areaDetector busy semantics)."""
    ctx.put(P + "cam1:Acquire", 1, wait=True, timeout=timeout)


def own_context():
    """Monitors get their own Context: p4p shares one NT unwrapper per Context across threads,
    so concurrent monitors of different NT types on one Context can be unwrapped wrongly."""
    return pva_context()


def collect(ctx, n_expected, timeout=60, **cfg):
    """Configure, acquire, and return the frames a monitor saw (not the PV's earlier image)."""
    frames = []
    configure(ctx, **cfg)
    mctx = own_context()
    sub = live_monitor(mctx, P + "Pva1:Image", frames.append, request="record[queueSize=1024]")
    try:
        acquire(ctx, timeout)  # done: every frame is posted
        wait_for(lambda: len(frames) >= n_expected, timeout=10, message=f"{n_expected} frames")
    finally:
        sub.close()
        mctx.close()
    return frames


def test_frames_arrive_whole_at_1khz(simdet, ctx):
    from ptychostream.sim.scans import scan_positions

    n = 300
    ctx.put(P + "cam1:ArrayCounter", 0, wait=True)
    frames = collect(ctx, n, ImageMode="Multiple", NumImages=n, AcquirePeriod=0.001, ScanPattern="spiral",
                     ScanPoints=n, ScanStep=1e-7, Size=128, Bin=1, DataType="UInt16", Photons=1e5)
    uids = [int(f.raw["uniqueId"]) for f in frames]
    assert uids == list(range(1, n + 1))
    f0 = frames[0]
    assert f0.dtype == np.uint16 and f0.shape == (128, 128)
    assert [d["size"] for d in f0.raw["dimension"]] == [128, 128]
    assert f0.raw["timeStamp.secondsPastEpoch"] > 0 and f0.raw["dataTimeStamp.secondsPastEpoch"] > 0
    expected = scan_positions("spiral", 1e-7, n, seed=0)
    xs = np.array([f.attrib["PositionX"] for f in frames])
    ys = np.array([f.attrib["PositionY"] for f in frames])
    idx = np.array([f.attrib["ScanIndex"] for f in frames])
    np.testing.assert_array_equal(idx, np.arange(n))
    np.testing.assert_allclose(xs, expected[:, 1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(ys, expected[:, 0], rtol=0, atol=1e-15)
    assert f0.attrib["ColorMode"] == 0
    assert int(ctx.get(P + "cam1:ArrayCounter_RBV")) == n
    assert int(ctx.get(P + "cam1:DetectorState_RBV")) == 0  # back to Idle
    assert int(ctx.get(P + "cam1:Acquire_RBV")) == 0
    assert int(ctx.get(P + "cam1:SizeX_RBV")) == 128


def test_counts_match_photons_and_dtype_binning(simdet, ctx):
    photons = 2e5
    n = 60
    frames = collect(ctx, n, ImageMode="Multiple", NumImages=n, AcquirePeriod=0.0, ScanPoints=n,
                     DataType="UInt32", Bin=2, Photons=photons, Beamstop=0, HotPixels=0)
    assert len(frames) == n
    assert frames[0].dtype == np.uint32 and frames[0].shape == (64, 64)
    totals = np.array([float(np.asarray(f, dtype=np.float64).sum()) for f in frames])
    # each total is Poisson(photons): the mean of n has sigma sqrt(photons/n)
    assert abs(totals.mean() - photons) < 5 * np.sqrt(photons / n)
    assert totals.std() < 5 * np.sqrt(photons)


def test_physics_round_trip_from_truth_file(simdet, ctx):
    """Re-simulate a frame from the ground-truth patch and probe: it is the noise-free frame."""
    from ptychostream.sim.forward import far_field
    from ptychostream.sim.replay import read_truth_h5

    photons = 1e9
    frames = collect(ctx, 20, ImageMode="Multiple", NumImages=20, AcquirePeriod=0.0, ScanPoints=20,
                     DataType="Float32", Photons=photons, Bin=1, Size=128)
    truth = read_truth_h5(simdet.truth)
    probe = np.asarray(truth["probe"]).reshape(truth["probe"].shape[-2:])
    patches = np.asarray(truth["patches"])
    for i in (0, 7, 19):
        clean = far_field(probe * patches[i]).astype(np.float64)
        clean *= photons / clean.sum()
        got = np.asarray(frames[i], dtype=np.float64)
        assert got.shape == clean.shape
        # Poisson noise only: relative error small where there are many counts
        bright = clean > 1e4
        rel = np.abs(got[bright] - clean[bright]) / clean[bright]
        assert np.median(rel) < 0.02
        assert np.corrcoef(got.ravel(), clean.ravel())[0, 1] > 0.999


def test_pvapy_reads_the_same_frames(simdet, ctx):
    pvaccess = pytest.importorskip("pvaccess")
    ch = pvaccess.Channel(P + "Pva1:Image")
    got = []
    # pvapy reuses its PvObject: copy what we need inside the callback
    ch.subscribe("t", lambda pv: got.append((pv["uniqueId"], np.array(next(iter(pv["value"][0].values()))))))
    ch.startMonitor("field()")
    try:
        wait_for(lambda: got, timeout=10, message="pvapy's first update")  # the current image: not a new frame
        got.clear()
        frames = collect(ctx, 10, ImageMode="Multiple", NumImages=10, AcquirePeriod=0.01, ScanPoints=10)
        wait_for(lambda: len(got) >= 10, timeout=10, message="pvapy frames")
    finally:
        ch.stopMonitor()
        ch.unsubscribe("t")
    p4p_ids = [int(f.raw["uniqueId"]) for f in frames]
    pvapy_ids = [uid for uid, _ in got[-10:]]
    assert pvapy_ids == p4p_ids
    a = got[-1][1].reshape(128, 128)
    np.testing.assert_array_equal(a, np.asarray(frames[-1]))


def test_positions_streamed_as_chunks_and_motors(simdet, ctx):
    from ptychostream.sim.scans import scan_positions

    tables = []
    motors = []
    tctx, mctx = own_context(), own_context()
    sub = live_monitor(tctx, P + "Pos1:Positions", tables.append, request="record[queueSize=64]")
    msub = mctx.monitor(P + "PositionX_RBV", lambda v: motors.append(float(v)))
    wait_for(lambda: motors, timeout=10, message="motor monitor's first update")  # the current readback counts
    ctx.put(P + "cam1:ArrayCounter", 0, wait=True)
    try:
        configure(ctx, ImageMode="Multiple", NumImages=95, ScanPoints=95, AcquirePeriod=0.001,
                  PosChunk=20, PosDelay=7)
        acquire(ctx)
        wait_for(lambda: sum(len(t.value.uniqueId) for t in tables) >= 95, timeout=5, message="chunks")
    finally:
        sub.close()
        msub.close()
        tctx.close()
        mctx.close()
    chunks = [t for t in tables if len(t.value.uniqueId)]
    uid = np.concatenate([t.value.uniqueId for t in chunks])
    x = np.concatenate([t.value.x for t in chunks])
    np.testing.assert_array_equal(uid, np.arange(1, 96))
    np.testing.assert_allclose(x, scan_positions("spiral", 1e-7, 95, seed=0)[:, 1], atol=1e-15)
    assert [len(t.value.uniqueId) for t in chunks] == [20, 20, 20, 20, 15]
    # the motor readback follows the scan at MOTOR_RATE_HZ: every sample after the current value is
    # one of the scan's x positions, and it moved (which positions it samples depends on timing)
    scan_x = scan_positions("spiral", 1e-7, 95, seed=0)[:, 1]
    moved = motors[1:]
    assert len(moved) >= 2 and len(set(moved)) >= 2, motors
    assert all(np.isclose(scan_x, m, rtol=0, atol=1e-15).any() for m in moved), motors


def test_bad_inputs_refused_with_message_and_counter(simdet, ctx, tmp_path):
    from p4p.client.thread import RemoteError

    refused0 = int(ctx.get(P + "cam1:RefusedPuts_RBV"))
    with pytest.raises(RemoteError, match="limits"):
        ctx.put(P + "cam1:ScanStep", 0.0, wait=True)
    with pytest.raises(RemoteError, match="limits"):
        ctx.put(P + "cam1:ScanStep", -1e-7, wait=True)
    with pytest.raises(ValueError):  # p4p refuses an unknown choice client-side
        ctx.put(P + "cam1:ScanPattern", "zigzag", wait=True)
    with pytest.raises(RemoteError, match="outside"):  # an unknown index reaches the IOC
        ctx.put(P + "cam1:ScanPattern", 7, wait=True)
    with pytest.raises(RemoteError, match="not found"):
        ctx.put(P + "cam1:ObjectFile", str(tmp_path / "missing.png"), wait=True)
    h5 = tmp_path / "empty.h5"
    import h5py

    with h5py.File(h5, "w") as fh:
        fh["nothing"] = np.zeros(3)
    with pytest.raises(RemoteError):
        ctx.put(P + "cam1:ReplayFile", str(h5), wait=True)
    with pytest.raises(RemoteError, match="limits"):
        ctx.put(P + "cam1:Size", 4096, wait=True)
    assert int(ctx.get(P + "cam1:RefusedPuts_RBV")) == refused0 + 6
    assert "put refused" in text(ctx.get(P + "cam1:StatusMessage_RBV"))
    # a put while acquiring must wait: refused with a message, the IOC keeps running
    configure(ctx, ImageMode="Continuous", AcquirePeriod=0.002)
    put_in_background(ctx, P + "cam1:Acquire", 1)
    # the acquisition thread sets its "acquiring" message just after the state: wait for both, so
    # that it cannot overwrite the refusal's message below
    wait_for(lambda: int(ctx.get(P + "cam1:DetectorState_RBV")) == 1
             and text(ctx.get(P + "cam1:StatusMessage_RBV")).startswith("acquiring"),
             timeout=30, message="acquiring")
    with pytest.raises(RemoteError, match="while acquiring"):
        ctx.put(P + "cam1:ScanPoints", 10, wait=True)
    assert "while acquiring" in text(ctx.get(P + "cam1:StatusMessage_RBV"))
    ctx.put(P + "cam1:Acquire", 0, wait=True)
    wait_for(lambda: int(ctx.get(P + "cam1:DetectorState_RBV")) in (0, 10), timeout=10, message="stopped")
    assert int(ctx.get(P + "cam1:ScanPoints")) != 10
    configure(ctx, ImageMode="Multiple")
    assert float(ctx.get(P + "cam1:ArrayRate_RBV")) >= 0


def test_replay_from_hdf5_with_unshifted_frames(simdet, ctx, tmp_path):
    import h5py

    rng = np.random.default_rng(1)
    data = rng.poisson(5, size=(12, 64, 64)).astype(np.uint16)
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as fh:
        fh["/entry/data/data"] = data
    frames = collect(ctx, 12, ReplayFile=str(path), ImageMode="Multiple", NumImages=12, AcquirePeriod=0.0)
    got = np.stack([np.asarray(f) for f in frames[-12:]])
    np.testing.assert_array_equal(got, data)
