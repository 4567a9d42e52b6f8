"""Issue #14: the live physics-consistency figure on real IOCs (simdet → reconstructor on loopback).

One detector and one reconstructor serve the shipped model through every step: the demo stream is
explained (a finite figure under the limit, in the HDF5 record too); a foreign instrument's frames
are not (the figure >= 3x worse, Status_RBV MINOR and Message_RBV pointing to retraining within a
bounded number of frames); a probe file of the wrong size is refused and the previous probe stays;
a model with no probe reads "unavailable" and serves as before.
"""

from __future__ import annotations

import math
import shutil
import threading
import time

import numpy as np
import pytest
from conftest import detector_and_reconstructor, live_monitor, put_in_background, pva_context, text, wait_for

from ptychostream.cli.demo import SHIPPED
from ptychostream.files.record import read_record
from ptychostream.sim.foreign import simulate_foreign, write_tike_npz

S, R = "TST:CONSIM:", "TST:CONREC:"
#: ConsistencyStatus_RBV states (db/)
OFF, UNAVAILABLE, WAITING, OK, HIGH = range(5)
DEMO_FRAMES = 160


def _severity(ctx, name: str) -> int:
    return int(ctx.get(R + name).raw["alarm.severity"])


def _acquire(ctx, n: int, period: float = 0.01) -> threading.Thread:
    for k, v in {"ImageMode": "Multiple", "NumImages": n, "AcquirePeriod": period}.items():
        ctx.put(S + "cam1:" + k, v, wait=True)
    return put_in_background(ctx, S + "cam1:Acquire", 1)


def _processed(ctx) -> int:
    return int(ctx.get(R + "Processed_RBV"))


def _bluesky_reading() -> tuple[dict, dict]:
    """One ``count([recon])`` with the ophyd-async device: the event's data and the configuration."""
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd_async.core import init_devices

    from ptychostream.bluesky import PtychoReconstructor

    RE = RunEngine({})
    with init_devices():
        recon = PtychoReconstructor(R)
    docs: list = []
    RE(count([recon]), lambda name, doc: docs.append((name, doc)))
    desc = next(doc for name, doc in docs if name == "descriptor")
    event = next(doc for name, doc in docs if name == "event")
    return event["data"], desc["configuration"]["recon"]["data"]


@pytest.mark.system
def test_consistency_on_real_iocs(tmp_path):
    from p4p.client.thread import RemoteError

    scan, _ = simulate_foreign(seed=0)
    foreign = write_tike_npz(tmp_path / "foreign.npz", scan)
    record = tmp_path / "record.h5"
    with detector_and_reconstructor(S, R), pva_context() as ctx:
        for k, v in {"ModelPath": str(SHIPPED), "InputPV": S + "Pva1:Image", "CaptureFile": str(record),
                     "Enable": 1}.items():
            ctx.put(R + k, v, wait=True)
        wait_for(lambda: int(ctx.get(R + "ModelStatus_RBV")) == 2, timeout=60, message="model ready")
        wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=10, message="input connected")
        wait_for(lambda: "model probe ptychonn_edge.probe.npy 128x128" in text(ctx.get(R + "ConsistencyInfo_RBV")),
                 timeout=5, message="the model's probe in use")  # (readbacks follow at the 10 Hz status task)
        assert int(ctx.get(R + "ConsistencyStatus_RBV")) == WAITING
        share = float(ctx.get(R + "ConsistencyShare_RBV"))
        limit = float(ctx.get(R + "ConsistencyLimit_RBV"))
        frames = int(ctx.get(R + "ConsistencyFrames_RBV"))
        assert 0 < share <= 1 and limit > 0 and frames >= 1

        # -- the demo stream: explained --
        for k, v in {"Object": "digits", "ScanPoints": DEMO_FRAMES, "ScanPattern": "spiral", "ScanStep": 1e-7}.items():
            ctx.put(S + "cam1:" + k, v, wait=True)
        ctx.put(R + "Capture", 1, wait=True)
        _acquire(ctx, DEMO_FRAMES, period=0.005)
        wait_for(lambda: _processed(ctx) == DEMO_FRAMES, timeout=60, message="demo frames processed")
        wait_for(lambda: int(ctx.get(R + "ConsistencySampled_RBV")) == DEMO_FRAMES * share, timeout=5,
                 message="demo frames sampled")
        ctx.put(R + "Capture", 0, wait=True)
        demo = float(ctx.get(R + "Consistency_RBV"))
        assert math.isfinite(demo) and 0 < demo < limit
        assert float(ctx.get(R + "ConsistencyP90_RBV")) >= demo
        assert int(ctx.get(R + "ConsistencyStatus_RBV")) == OK and _severity(ctx, "Status_RBV") == 0
        wait_for(lambda: read_record(record)["complete"], timeout=10, message="record closed")
        rec = read_record(record)
        fig = rec["data"]["consistency"]
        assert fig.shape == (DEMO_FRAMES,) and np.isfinite(fig).sum() == DEMO_FRAMES * share
        assert np.nanmedian(fig) < limit
        # the Bluesky device reads the figure, its state and the probe in use
        data, config = _bluesky_reading()
        assert data["recon-consistency"] == pytest.approx(demo) and data["recon-consistency_status"] == "OK"
        assert data["recon-consistency_p90"] >= demo
        assert "ptychonn_edge.probe.npy" in config["recon-consistency_info"]
        assert config["recon-consistency_share"] == share and config["recon-consistency_limit"] == limit
        ctx.put(R + "Enable", 1, wait=True)  # unstage() disabled it
        wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=10, message="input connected")

        # -- a foreign instrument (another probe, energy, distance): not explained --
        ctx.put(S + "cam1:ReplayFile", str(foreign), wait=True)
        for k, v in {"PreFFTShift": 1, "PreFlipX": 1}.items():  # its origin and orientation are set right
            ctx.put(R + k, v, wait=True)
        seen: list[tuple[float, int]] = []

        def alarm(value) -> None:
            if value.raw["alarm.severity"] == 1 and not seen:
                seen.append((time.monotonic(), _processed(ctx)))

        mctx = pva_context()
        sub = live_monitor(mctx, R + "Status_RBV", alarm)
        try:
            before = _processed(ctx)
            n = len(scan.frames)
            t0 = time.monotonic()
            _acquire(ctx, n, period=0.01)  # 100 Hz
            wait_for(lambda: seen, timeout=30, message="the consistency alarm",
                     state=lambda: (text(ctx.get(R + "Message_RBV")), float(ctx.get(R + "Consistency_RBV"))))
            t_alarm, at = seen[0]
            # ConsistencyFrames sampled frames in a row, every 1/share-th frame, within a batch of slack
            assert at - before <= frames / share + int(ctx.get(R + "BatchSize_RBV"))
            print(f"alarm {t_alarm - t0:.2f} s after Acquire, after {at - before} frames")
            wait_for(lambda: _processed(ctx) == before + n, timeout=60, message="foreign frames processed")
        finally:
            sub.close()
            mctx.close()
        message = text(ctx.get(R + "Message_RBV"))
        history = text(ctx.get(R + "MessageHistory_RBV"))
        assert "does not explain the frames" in message + history and "retrain" in message + history
        assert _severity(ctx, "Status_RBV") == 1 and int(ctx.get(R + "ConsistencyStatus_RBV")) == HIGH
        worse = float(ctx.get(R + "Consistency_RBV"))
        assert worse >= 3 * demo, (worse, demo)
        print(f"consistency: demo {demo:.2f}, foreign {worse:.2f} ({worse / demo:.0f}x)")

        # -- a probe file of the wrong size is refused; the previous probe stays --
        small = tmp_path / "small.npy"
        np.save(small, np.ones((96, 96), np.complex64))
        with pytest.raises(RemoteError, match=r"96x96.*128x128"):
            ctx.put(R + "ProbeFile", str(small), wait=True)
        assert text(ctx.get(R + "ProbeFile_RBV")) == ""
        assert "model probe ptychonn_edge.probe.npy 128x128" in text(ctx.get(R + "ConsistencyInfo_RBV"))
        # the right one is taken, and wins over the model's
        good = tmp_path / "instrument-probe.npy"
        shutil.copy(SHIPPED.with_name("ptychonn_edge.probe.npy"), good)
        ctx.put(R + "ProbeFile", str(good), wait=True)
        assert text(ctx.get(R + "ProbeFile_RBV")) == str(good)
        wait_for(lambda: "ProbeFile instrument-probe.npy 128x128" in text(ctx.get(R + "ConsistencyInfo_RBV")),
                 timeout=5, message="the instrument's probe in use")
        wait_for(lambda: _severity(ctx, "Status_RBV") == 0, timeout=5,
                 message="the alarm cleared")  # a new probe starts the judgement again
        ctx.put(R + "ProbeFile", "", wait=True)

        # -- a model with no probe: "unavailable", and it serves as before --
        bare = tmp_path / "bare" / "edge.onnx"
        bare.parent.mkdir()
        shutil.copy(SHIPPED, bare)
        ctx.put(R + "ModelPath", str(bare), wait=True)
        wait_for(lambda: text(ctx.get(R + "ModelPath_RBV")) == str(bare)
                 and int(ctx.get(R + "ModelStatus_RBV")) == 2, timeout=60, message="bare model ready")
        wait_for(lambda: "no probe known" in text(ctx.get(R + "ConsistencyInfo_RBV")), timeout=5,
                 message="no probe")
        assert int(ctx.get(R + "ConsistencyStatus_RBV")) == UNAVAILABLE
        before = _processed(ctx)
        _acquire(ctx, 20, period=0.005)
        wait_for(lambda: _processed(ctx) == before + 20, timeout=60, message="frames served with no probe")
        wait_for(lambda: math.isnan(float(ctx.get(R + "Consistency_RBV"))), timeout=5, message="no figure")
        assert int(ctx.get(R + "Rejected_RBV")) == 0 and _severity(ctx, "Status_RBV") == 0
