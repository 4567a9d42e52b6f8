"""Issue #13, build item 5 (the IOC's part): the Retrain PV group.

RetrainStart runs the retrain command on the device's last capture in a background process and
follows its status file into RetrainState/Progress/Message/Result_RBV; the put completes when the
process has ended. The command is ``$PTYCHOSTREAM_ADAPT_CMD`` when set: here a small real script
that writes the status file as ``ptychostream adapt`` does, and waits for the test's go-ahead, so
the test sees it running. Driven in-process through the device state.
"""

from __future__ import annotations

import json
import shlex
import sys
import textwrap

import numpy as np
import pytest
from conftest import wait_for

from ptychostream.core.device import Busy, PutError
from ptychostream.core.frames import ImageFrame
from ptychostream.devices.reconstructor import (
    ADAPT_CMD_ENV,
    MODEL_READY,
    RETRAIN_DONE,
    RETRAIN_FAILED,
    RETRAIN_REFUSED,
    RETRAIN_RUNNING,
    Reconstructor,
)
from ptychostream.model.zoo import build_ptychonn_onnx

SIZE = 32
PREFIX = "TST:RT:"

ADAPT = textwrap.dedent('''
    """A stand-in for `ptychostream adapt` with the same arguments and status file."""
    import json, os, pathlib, sys, time

    args = sys.argv[1:]
    home = pathlib.Path(os.environ["RETRAIN_TEST_DIR"])
    (home / "argv.json").write_text(json.dumps(args))
    status = pathlib.Path(args[args.index("--status-file") + 1])

    def say(**kw):
        tmp = status.with_name(status.name + ".tmp")
        tmp.write_text(json.dumps(kw))
        os.replace(tmp, status)  # atomic, as adapt writes it

    say(stage="reconstruct", progress=0.25, message="iterating", done=False, ok=False, result={})
    while not (home / "go").exists():
        time.sleep(0.02)
    (home / "go").unlink()
    mode = (home / "mode").read_text()
    if mode == "ok":
        say(stage="export", progress=1.0, message="better than the serving model", done=True, ok=True,
            result={"model": (home / "model").read_text() if (home / "model").exists() else "/models/new.onnx",
                    "better": True, "swapped": False, "reason": "band-pass r 0.91 > 0.40",
                    "scores": {"adapted": {"ssim": 0.8}}})
    elif mode == "fail":
        say(stage="pairs", progress=0.5, message="no frame has a position", done=True, ok=False, result={})
        sys.exit(1)
    else:
        print("Traceback (most recent call last): RuntimeError: boom")
        sys.exit(3)
''')


@pytest.fixture
def adapt(tmp_path, monkeypatch):
    """The stand-in command; returns its folder (argv.json, the go and mode files)."""
    script = tmp_path / "adapt.py"
    script.write_text(ADAPT)
    monkeypatch.setenv(ADAPT_CMD_ENV, shlex.join([sys.executable, str(script)]))
    monkeypatch.setenv("RETRAIN_TEST_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def rec(tmp_path):
    r = Reconstructor(prefix=PREFIX)
    r.start()
    yield r
    r.stop()


def capture(r: Reconstructor, path: str, model: str) -> None:
    """A real capture of 3 frames to ``path`` (the device's last capture)."""
    d = r.device
    d.put("Enable", 1)
    d.put("ModelPath", model)
    wait_for(lambda: d.get("ModelStatus_RBV") == MODEL_READY, timeout=30, message="model")
    d.put("CaptureFile", path)
    started = d.put("Capture", 1)
    started.done.result(timeout=10)
    for uid in (1, 2, 3):
        d.put_image("Input", ImageFrame(np.full((SIZE, SIZE), 5, np.uint16), unique_id=uid))
    wait_for(lambda: r.recorder is not None and r.recorder.written == 3, timeout=10, message="3 written")
    d.put("Capture", 0)
    wait_for(lambda: d.get("Capture_RBV") == 0, timeout=10, message="record closed")


def refused(r: Reconstructor, match: str) -> None:
    before = r.device.get("RefusedPuts_RBV")
    with pytest.raises(PutError, match=match):
        r.device.put("RetrainStart", 1)
    assert r.device.get("RefusedPuts_RBV") == before + 1
    assert match in r.device.get("Message_RBV")


def start(r: Reconstructor, adapt, mode: str) -> Busy:
    (adapt / "mode").write_text(mode)
    busy = r.device.put("RetrainStart", 1)
    assert isinstance(busy, Busy) and not busy.done.done()
    wait_for(lambda: r.device.get("RetrainProgress_RBV") == 25.0, timeout=10, message="its first status")
    assert r.device.get("RetrainState_RBV") == RETRAIN_RUNNING
    assert r.device.get("RetrainMessage_RBV") == "reconstruct: iterating"
    return busy


def test_retrain_runs_in_the_background_and_reports(rec, adapt, tmp_path):
    d = rec.device
    refused(rec, "no capture to retrain on")
    assert d.get("RetrainState_RBV") == RETRAIN_REFUSED
    model = build_ptychonn_onnx(tmp_path / "m.onnx", size=SIZE, heads=("phase",), base_channels=2, depth=2)
    record = str(tmp_path / "scan.h5")
    capture(rec, record, model)
    d.put("RetrainBudget", 2.5)
    d.put("RetrainSwap", 0)
    assert (d.get("RetrainBudget_RBV"), d.get("RetrainSwap_RBV")) == (2.5, 0)

    busy = start(rec, adapt, "ok")
    assert json.loads((adapt / "argv.json").read_text())[0] == record
    argv = json.loads((adapt / "argv.json").read_text())
    assert argv[argv.index("--budget-min") + 1] == "2.5" and argv[argv.index("--ioc") + 1] == PREFIX
    assert "--no-swap" in argv and argv[argv.index("--status-file") + 1].endswith(".json")
    refused(rec, "already running")
    assert d.get("RetrainState_RBV") == RETRAIN_RUNNING
    # the IOC keeps serving meanwhile
    before = rec.counters.snapshot()["processed"]
    for uid in (10, 11):
        d.put_image("Input", ImageFrame(np.full((SIZE, SIZE), 5, np.uint16), unique_id=uid))
    wait_for(lambda: rec.counters.snapshot()["processed"] == before + 2, timeout=10, message="2 more processed")

    (adapt / "go").touch()
    busy.done.result(timeout=10)  # the put completes when the retrain has ended
    assert d.get("RetrainState_RBV") == RETRAIN_DONE and d.get("RetrainProgress_RBV") == 100.0
    assert d.get("RetrainResult_RBV") == "/models/new.onnx: better, not swapped; band-pass r 0.91 > 0.40"
    assert d.get("RetrainStart") == 0 and d.get("ModelPath_RBV") == model  # adapt swaps, through --ioc

    busy = start(rec, adapt, "fail")
    (adapt / "go").touch()
    busy.done.result(timeout=10)
    assert d.get("RetrainState_RBV") == RETRAIN_FAILED
    assert d.get("RetrainMessage_RBV") == "no frame has a position"
    assert "retrain failed: no frame has a position" in d.get("Message_RBV")

    busy = start(rec, adapt, "crash")
    (adapt / "go").touch()
    busy.done.result(timeout=10)
    assert d.get("RetrainState_RBV") == RETRAIN_FAILED
    said = d.get("RetrainMessage_RBV")
    assert "exited with code 3 before it finished" in said and "RuntimeError: boom" in said

    # a capture in progress is not a scan to retrain on yet
    d.put("CaptureFile", str(tmp_path / "live.h5"))
    d.put("Capture", 1).done.result(timeout=10)
    refused(rec, "still capturing")
    d.put("Capture", 0)


def test_a_stop_ends_the_retrain(rec, adapt, tmp_path):
    model = build_ptychonn_onnx(tmp_path / "m.onnx", size=SIZE, heads=("phase",), base_channels=2, depth=2)
    capture(rec, str(tmp_path / "scan.h5"), model)
    busy = start(rec, adapt, "ok")
    rec.stop()  # the script never gets its go-ahead: the stop ends it
    busy.done.result(timeout=10)
    assert rec.device.get("RetrainState_RBV") == RETRAIN_FAILED
    assert "ended with the IOC" in rec.device.get("RetrainMessage_RBV")


def test_without_a_prefix_the_ioc_serves_a_better_model_itself(adapt, tmp_path):
    """An IOC that does not know its prefix cannot pass --ioc: it loads the better model itself."""
    r = Reconstructor()
    r.start()
    try:
        first = build_ptychonn_onnx(tmp_path / "m.onnx", size=SIZE, heads=("phase",), base_channels=2, depth=2)
        better = build_ptychonn_onnx(tmp_path / "better.onnx", size=SIZE, heads=("phase",), base_channels=2,
                                     depth=2, seed=3)
        (adapt / "model").write_text(better)
        capture(r, str(tmp_path / "scan.h5"), first)
        busy = start(r, adapt, "ok")
        assert "--ioc" not in json.loads((adapt / "argv.json").read_text())
        (adapt / "go").touch()
        busy.done.result(timeout=10)
        wait_for(lambda: r.device.get("ModelPath_RBV") == better and r.device.get("ModelStatus_RBV") == MODEL_READY,
                 timeout=30, message="the better model serving")
    finally:
        r.stop()
