"""Issue #7: the Bluesky devices (ophyd-async over PVA, signals from db/) and plans, live."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import detector_and_reconstructor, wait_for

pytest.importorskip("bluesky", reason="needs the 'bluesky' extra")
pytest.importorskip("ophyd_async", reason="needs the 'bluesky' extra")

from ptychostream.core.pvdb import load_db  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
R = "TST:BS:NN:"
S = "TST:BS:SIM:"


# -- no IOC: the devices are built from db/ ---------------------------------------------------
def test_signals_are_built_from_db():
    """Every db/ record (but NTTables) is a signal: a setpoint and its same-typed readback share one."""
    from ophyd_async.core import SignalRW

    from ptychostream.bluesky import PtychoReconstructor, SimDetector

    for cls, prefix, db_name in ((PtychoReconstructor, R, "reconstructor.db"), (SimDetector, S, "simdetector.db")):
        dev = cls(prefix, name="dev")
        db = load_db(db_name)
        covered = set()
        for attr, spec in dev.specs.items():
            backend = getattr(dev, attr)._connector.backend
            assert backend.write_pv == prefix + spec.suffix, attr
            assert backend.read_pv in (prefix + spec.suffix, prefix + str(spec.readback)), attr
            covered |= {backend.read_pv[len(prefix):], backend.write_pv[len(prefix):]}
            assert getattr(dev, attr).source.startswith("pva://")
            assert isinstance(getattr(dev, attr), SignalRW) == bool(spec.writable and spec.kind != "image"), attr
            assert dev.signal(spec.suffix) is getattr(dev, attr)
        assert covered == {s.suffix for s in db if s.kind != "table"}
    recon = PtychoReconstructor(R, name="recon")
    assert recon.signal("Processed_RBV") is recon.processed
    assert recon.signal("ModelPath_RBV") is recon.model_path  # write ModelPath, read ModelPath_RBV
    assert recon.mosaic._connector.backend.read_pv == R + "Mosaic"
    det = SimDetector(S, name="det")
    assert det.image_pv == S + "Pva1:Image"
    assert det.signal("cam1:ArrayCounter_RBV") is det.array_counter


def test_annotated_signals_match_db():
    """The signals the devices declare for type checkers are made from db/ with that class and datatype."""
    from ophyd_async.core import StrictEnum

    from ptychostream.bluesky import PtychoReconstructor, SimDetector

    for cls, prefix in ((PtychoReconstructor, R), (SimDetector, S)):
        declared = {a: t for a, t in cls.__annotations__.items() if str(t).startswith("Signal")}
        assert len(declared) >= 6, cls
        dev = cls(prefix, name="dev")
        for attr, anno in declared.items():
            kind, datatype = re.fullmatch(r"(SignalRW?)\[(\w+)\]", str(anno)).groups()
            sig = getattr(dev, attr)
            assert type(sig).__name__ == kind, (cls.__name__, attr)
            if datatype == "StrictEnum":
                assert issubclass(sig.datatype, StrictEnum), (cls.__name__, attr)
            else:
                assert sig.datatype.__name__ == datatype, (cls.__name__, attr)


# -- live IOCs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def iocs():
    with detector_and_reconstructor(S, R) as pair:
        yield pair


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from ptychostream.model.zoo import build_ptychonn_onnx

    d = tmp_path_factory.mktemp("bsmodels")
    garbage = d / "garbage.onnx"
    garbage.write_bytes(b"\x08\x01this is not an ONNX model")
    return {
        "good": build_ptychonn_onnx(str(d / "edge.onnx"), size=128, heads=("phase",), base_channels=8, depth=3),
        "garbage": str(garbage),
        "missing": str(d / "no-such-model.onnx"),
    }


@pytest.fixture(scope="module")
def RE():
    from bluesky import RunEngine

    return RunEngine({})


@pytest.fixture(scope="module")
def devices(iocs, RE):
    from ophyd_async.core import init_devices

    from ptychostream.bluesky import PtychoReconstructor, SimDetector

    with init_devices():
        recon = PtychoReconstructor(R)
        det = SimDetector(S)
    return recon, det


def _run(RE, plan):
    docs = []
    RE(plan, lambda name, doc: docs.append((name, doc)))
    return docs


def test_live_scan_documents(devices, RE, ctx, models):
    from ptychostream.bluesky import live_ptycho_scan

    recon, det = devices
    n = 150
    counter0 = int(ctx.get(S + "cam1:ArrayCounter_RBV"))
    pixel = float(ctx.get(S + "cam1:ObjectPixel_RBV"))
    docs = _run(RE, live_ptycho_scan(recon, det, model=models["good"], num=n, step=2e-7, period=0.002,
                                     pixel_size=pixel))
    names = [name for name, _ in docs]
    assert names.count("event") == 1 and names[0] == "start" and names[-1] == "stop"
    start = docs[0][1]
    assert start["plan_name"] == "live_ptycho_scan" and start["num_points"] == n
    desc = next(doc for name, doc in docs if name == "descriptor")
    keys = desc["data_keys"]
    for key in ("recon-mosaic", "recon-processed", "recon-dropped", "recon-rejected", "recon-missed",
                "recon-backlog", "recon-frame_rate", "recon-latency_p50", "recon-status", "recon-message",
                "det-array_counter", "det-detector_state"):
        assert key in keys, key
    # the canvas grows with the scan: its shape is variable (event-model's None), not the first event's
    assert keys["recon-mosaic"]["dtype"] == "array" and keys["recon-mosaic"]["shape"] == [None, None]
    assert keys["recon-processed"]["dtype"] == "integer"
    assert keys["recon-status"]["choices"] == list(load_db("reconstructor.db")["Status_RBV"].enum_strs)
    assert desc["hints"]["recon"]["fields"] == ["recon-processed"]
    config = desc["configuration"]["recon"]["data"]
    assert config["recon-model_path"] == models["good"]
    assert config["recon-model_status"] == "Ready" and config["recon-enable"] is True
    assert config["recon-input_pv"] == S + "Pva1:Image"
    data = next(doc for name, doc in docs if name == "event")["data"]
    assert data["recon-processed"] == n
    assert data["recon-dropped"] == data["recon-rejected"] == data["recon-missed"] == data["recon-backlog"] == 0
    assert data["recon-received"] == n
    assert data["det-array_counter"] == counter0 + n
    assert data["det-detector_state"] == "Idle"
    mosaic = np.asarray(data["recon-mosaic"])
    assert mosaic.ndim == 2 and min(mosaic.shape) >= 128
    # unstaged: disabled again; the phase of the last frame is a 128x128 patch
    assert int(ctx.get(R + "Enable_RBV")) == 0
    phase = ctx.get(R + "Phase")
    assert phase.shape == (128, 128) and np.all(np.abs(phase) <= np.pi + 1e-5)


def test_mosaic_is_stitched(devices, RE, ctx, models):
    """The mosaic in the documents covers the scan: every patch stitched at its position."""
    from ptychostream.bluesky import live_ptycho_scan, read_mosaic, swap_model

    recon, det = devices
    RE(swap_model(recon, models["good"]))  # model=None below: the scan uses the model already serving
    pixel = float(ctx.get(S + "cam1:ObjectPixel_RBV"))
    n, step = 60, 3e-7
    docs = _run(RE, live_ptycho_scan(recon, det, model=None, num=n, step=step, period=0.002, pixel_size=pixel))
    data = next(doc for name, doc in docs if name == "event")["data"]
    assert data["recon-processed"] == n and data["recon-unpositioned"] == 0
    assert data["recon-stitched"] == n, "MosaicReset at the start: the mosaic holds this scan only"
    mosaic = read_mosaic(docs)
    assert mosaic is not None and mosaic.ndim == 2 and min(mosaic.shape) > 128
    assert np.isfinite(mosaic).any() and np.nanstd(mosaic) > 0
    assert 0 < data["recon-mosaic_coverage_rbv"] <= 100


def test_garbage_model_raises_and_leaves_disabled(devices, RE, ctx, models):
    from ptychostream.bluesky import ModelLoadError, live_ptycho_scan

    recon, det = devices
    ctx.put(R + "Enable", 1, wait=True)
    wait_for(lambda: int(ctx.get(R + "Enable_RBV")) == 1, timeout=5)
    with pytest.raises(ModelLoadError, match=re.escape(models["garbage"])) as err:
        _run(RE, live_ptycho_scan(recon, det, model=models["garbage"], num=10))
    assert "could not load" in str(err.value)
    assert int(ctx.get(R + "ModelStatus_RBV")) == 3  # Error
    assert int(ctx.get(R + "Enable_RBV")) == 0


def test_missing_model_path_raises(devices, RE, ctx, models):
    from ptychostream.bluesky import ModelLoadError, swap_model

    recon, _ = devices
    ctx.put(R + "Enable", 1, wait=True)
    with pytest.raises(ModelLoadError, match="no-such-model"):
        _run(RE, swap_model(recon, models["missing"]))
    assert int(ctx.get(R + "Enable_RBV")) == 0
    with pytest.raises(ModelLoadError, match="no model path"):
        _run(RE, swap_model(recon, ""))
    # and a good model swaps back in
    RE(swap_model(recon, models["good"]))
    assert int(ctx.get(R + "ModelStatus_RBV")) == 2


def test_unconnected_input_and_timeouts_are_clear_and_disable(devices, RE, ctx, models):
    from ptychostream.bluesky import (
        InputNotConnected,
        ScanTimeout,
        live_ptycho_scan,
        swap_model,
        wait_drained,
    )

    recon, det = devices
    RE(swap_model(recon, models["good"]))  # a model is ready, so the scan fails on the input alone
    ctx.put(R + "InputPV", "TST:BS:NOBODY:Image", wait=True)
    with pytest.raises(InputNotConnected, match="TST:BS:NOBODY:Image"):
        _run(RE, live_ptycho_scan(recon, det, model=None, num=5, connect=False, connect_timeout=1.0))
    assert int(ctx.get(R + "Enable_RBV")) == 0
    with pytest.raises(ScanTimeout, match="to process 1000000 frames"):
        RE(wait_drained(recon, 1_000_000, timeout=0.5))


def test_bluesky_snippet_in_docs_runs(devices, iocs, models):
    """The README's "Use it from Bluesky" snippet runs as written."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Use it from Bluesky\n.*?```python\n(.*?)```", text, re.S)
    assert m, "README.md lacks the 'Use it from Bluesky' python snippet"
    code = m.group(1)
    assert "PTY:NN:" in code and "PTY:SIM:" in code and "/path/to/model.onnx" in code
    code = code.replace("PTY:NN:", R).replace("PTY:SIM:", S).replace("/path/to/model.onnx", models["good"])
    ns: dict = {}
    exec(compile(code, "README.md:Use it from Bluesky", "exec"), ns)
    event = ns["event"]
    assert event["data"]["recon-processed"] == 200
