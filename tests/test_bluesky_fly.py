"""Issue #16: the reconstructor as a standard detector (step and fly scans, stream documents, the
HDF5 record read back through them), the model as a Movable, and the classic ophyd device over CA."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from conftest import detector_and_reconstructor, text, wait_for

pytest.importorskip("bluesky", reason="needs the 'bluesky' extra")
pytest.importorskip("ophyd_async", reason="needs the 'bluesky' extra")

R = "TST:BF:NN:"
S = "TST:BF:SIM:"


@pytest.fixture(scope="module")
def iocs():
    with detector_and_reconstructor(S, R, rec_ca=True) as pair:  # CA too: the classic ophyd test
        yield pair


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from ptychostream.model.zoo import build_ptychonn_onnx

    d = tmp_path_factory.mktemp("bfmodels")
    return {"good": build_ptychonn_onnx(str(d / "edge.onnx"), size=128, heads=("phase",), base_channels=8, depth=3),
            "missing": str(d / "no-such-model.onnx")}


@pytest.fixture(scope="module")
def RE():
    from bluesky import RunEngine

    return RunEngine({})


@pytest.fixture(scope="module")
def ptycho(iocs, RE, ctx, tmp_path_factory):
    from ophyd_async.core import init_devices

    from ptychostream.bluesky import PtychoDetector, record_path_provider

    records = tmp_path_factory.mktemp("bfrecords")
    with init_devices():
        ptycho = PtychoDetector(R, S, record_path_provider(records), flush_period=0.1)
    ctx.put(R + "PixelSize", float(ctx.get(S + "cam1:ObjectPixel_RBV")), wait=True)
    return ptycho


def _mosaic_pv_matches(ctx, mosaic: np.ndarray) -> bool:
    pv = np.asarray(ctx.get(R + "Mosaic"))
    return pv.shape == mosaic.shape and np.allclose(pv, mosaic, equal_nan=True, atol=1e-6)


def _check_mosaic_stream(docs, ctx, name: str = "ptycho-mosaic") -> np.ndarray:
    desc = docs.descriptor_of("mosaic")
    keys = desc["data_keys"]
    mosaic = docs.data("mosaic")[name]
    assert keys[name]["shape"] == list(mosaic.shape) and keys[name]["external"] == "STREAM:"
    assert keys[name]["units"] == "rad"
    assert keys[f"{name}-pixel_size"]["units"] == keys[f"{name}-origin_x"]["units"] == "m"
    values = {k: v[0] for k, v in docs.readings("mosaic").items()}
    assert values[f"{name}-pixel_size"] == pytest.approx(float(ctx.get(R + "PixelSize_RBV")), rel=1e-6)
    assert np.isfinite(values[f"{name}-origin_x"]) and np.isfinite(values[f"{name}-origin_y"])
    assert values[f"{name}-n_patches"] == int(ctx.get(R + "Stitched_RBV"))
    # the final mosaic in the file is the one the Mosaic PV shows once every patch is stitched
    wait_for(lambda: _mosaic_pv_matches(ctx, mosaic), timeout=5, message="Mosaic PV == the record's mosaic")
    assert np.isfinite(mosaic).any() and np.nanstd(mosaic) > 0
    return mosaic


def test_step_scan_stream_documents(ptycho, RE, ctx, models):
    """Three events of 8 frames: every document validates; the patches, positions and uniqueIds come
    back from the record through the StreamDatums; the last patch is the Phase PV; then the mosaic."""
    from ptychostream.bluesky import RunDocuments, ptycho_step_scan

    docs = RunDocuments()
    counter0 = int(ctx.get(S + "cam1:ArrayCounter_RBV"))
    t0 = time.monotonic()
    RE(ptycho_step_scan(ptycho, num=3, frames=8, model=models["good"], period=0.002), docs)
    elapsed = time.monotonic() - t0
    assert docs.names[0] == "start" and docs.names[-1] == "stop" and docs.stop_doc["exit_status"] == "success"
    assert docs.names.count("stream_resource") == 4 + 2  # phase, x, y, uniqueId; mosaic phase, coverage
    keys = docs.descriptor_of("primary")["data_keys"]
    assert keys["ptycho-phase"]["shape"] == [8, 128, 128] and keys["ptycho-phase"]["units"] == "rad"
    assert keys["ptycho-position_x"]["units"] == "m" and keys["ptycho-phase"]["external"] == "STREAM:"
    assert docs.descriptor_of("primary")["hints"]["ptycho"]["fields"] == ["ptycho-phase"]
    data = docs.data("primary")
    assert data["ptycho-phase"].shape == (24, 128, 128)
    assert np.array_equal(data["ptycho-unique_id"], np.arange(counter0 + 1, counter0 + 25))
    assert np.isfinite(data["ptycho-position_x"]).all() and np.isfinite(data["ptycho-position_y"]).all()
    # each event is one acquisition from the start of the detector's pattern: the same 8 positions
    assert np.array_equal(data["ptycho-position_x"][:8], data["ptycho-position_x"][8:16])
    assert np.allclose(data["ptycho-phase"][-1], np.asarray(ctx.get(R + "Phase")), atol=1e-6)
    _check_mosaic_stream(docs, ctx)
    assert int(ctx.get(R + "Enable_RBV")) == 0 and int(ctx.get(R + "Capture_RBV")) == 0
    assert ptycho.record_path is not None and text(ctx.get(R + "CaptureFile_RBV")) == str(ptycho.record_path)
    print(f"step scan 3 x 8 frames: {elapsed:.1f} s")


def test_fly_scan_stream_documents(ptycho, RE, ctx, models):
    """prepare / kickoff / complete / collect: 40 frames as StreamDatum pages, then the mosaic."""
    from ptychostream.bluesky import RunDocuments, ptycho_fly_scan

    docs = RunDocuments()
    counter0 = int(ctx.get(S + "cam1:ArrayCounter_RBV"))
    n = 40
    t0 = time.monotonic()
    RE(ptycho_fly_scan(ptycho, num=n, model=models["good"], period=0.002, flush_period=0.2), docs)
    elapsed = time.monotonic() - t0
    assert docs.stop_doc["exit_status"] == "success"
    keys = docs.descriptor_of("primary")["data_keys"]
    assert keys["ptycho-phase"]["shape"] == [1, 128, 128]
    datums = [d for d in docs.datums if d["descriptor"] == docs.descriptor_of("primary")["uid"]]
    assert datums and max(d["indices"]["stop"] for d in datums) == n
    data = docs.data("primary")
    assert data["ptycho-phase"].shape == (n, 128, 128)
    assert np.array_equal(data["ptycho-unique_id"], np.arange(counter0 + 1, counter0 + n + 1))
    assert np.allclose(data["ptycho-phase"][-1], np.asarray(ctx.get(R + "Phase")), atol=1e-6)
    xy = np.stack([data["ptycho-position_y"], data["ptycho-position_x"]], axis=1)
    assert len(np.unique(xy, axis=0)) > 1  # a scan, not one point
    assert int(ctx.get(R + "CaptureWritten_RBV")) == n and int(ctx.get(R + "CaptureDropped_RBV")) == 0
    _check_mosaic_stream(docs, ctx)
    print(f"fly scan {n} frames: {elapsed:.1f} s")


def test_model_set_waits_and_fails_with_the_device_message(ptycho, RE, ctx, models):
    import bluesky.plan_stubs as bps

    t0 = time.monotonic()
    RE(bps.mv(ptycho.model, models["good"]))  # a reload: completes only once it serves again
    assert int(ctx.get(R + "ModelStatus_RBV")) == 2 and text(ctx.get(R + "ModelPath_RBV")) == models["good"]
    print(f"model swap: {time.monotonic() - t0:.2f} s")
    with pytest.raises(Exception) as err:
        RE(bps.mv(ptycho.model, models["missing"]))
    message = text(ctx.get(R + "Message_RBV"))
    assert "no-such-model" in message
    chain = [err.value]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    assert any(message in str(e) for e in chain), [str(e) for e in chain]
    assert int(ctx.get(R + "ModelStatus_RBV")) == 3  # Error
    # and a step scan that loads it fails the plan with the same message
    from ptychostream.bluesky import ptycho_step_scan

    with pytest.raises(Exception, match=re.escape("no-such-model")):
        RE(ptycho_step_scan(ptycho, num=1, model=models["missing"]))
    RE(bps.mv(ptycho.model, models["good"]))


def test_count_detector_then_reconstructor(iocs, RE, ctx, models, ptycho):
    """count([det, recon]): the reconstructor is read after the detector's frames are reconstructed."""
    from bluesky.plans import count
    from ophyd_async.core import init_devices

    from ptychostream.bluesky import PtychoReconstructor, RunDocuments, SimDetector

    t0 = time.monotonic()
    with init_devices():
        det = SimDetector(S)
        recon = PtychoReconstructor(R, source=det)
    print(f"connect: {time.monotonic() - t0:.2f} s")
    assert det.hints == {"fields": ["det-array_counter"]}
    import bluesky.plan_stubs as bps

    RE(bps.mv(recon.model, models["good"]))
    ctx.put(R + "InputPV", S + "Pva1:Image", wait=True)
    ctx.put(S + "cam1:ImageMode", 1, wait=True)
    ctx.put(S + "cam1:NumImages", 30, wait=True)
    ctx.put(S + "cam1:AcquirePeriod", 0.002, wait=True)
    docs = RunDocuments()
    t0 = time.monotonic()
    RE(count([det, recon], num=2), docs)
    print(f"count 2 x 30 frames: {time.monotonic() - t0:.2f} s")
    events = docs.readings("primary")
    processed = events["recon-processed"]
    assert processed[1] - processed[0] == 30, events
    assert events["recon-backlog"] == [0, 0]
    keys = docs.descriptor_of("primary")["data_keys"]
    assert keys["recon-mosaic"]["shape"] == [None, None]  # a growing canvas: variable, not the first event's
    hints = docs.descriptor_of("primary")["hints"]
    assert hints["det"]["fields"] == ["det-array_counter"] and hints["recon"]["fields"] == ["recon-processed"]


def test_classic_ophyd_count_over_ca(iocs, RE, ctx, models):
    pytest.importorskip("ophyd", reason="needs classic ophyd")
    from bluesky.plans import count

    from ptychostream.bluesky import RunDocuments
    from ptychostream.bluesky.classic import ClassicReconstructor

    recon = ClassicReconstructor(R, name="crecon")
    recon.wait_for_connection(timeout=10)
    recon.load_model(models["good"]).wait(30)
    docs = RunDocuments()
    RE(count([recon], num=2), docs)
    desc = docs.descriptor_of("primary")
    assert desc["hints"]["crecon"]["fields"] == ["crecon_processed"]
    assert desc["configuration"]["crecon"]["data"]["crecon_model_path"] == models["good"]
    assert desc["configuration"]["crecon"]["data"]["crecon_model_status"] == "Ready"
    events = docs.readings("primary")
    assert events["crecon_processed"][-1] == int(ctx.get(R + "Processed_RBV"))
    assert events["crecon_status"][-1] in load_status_strings()
    with pytest.raises(Exception, match="no-such-model"):
        recon.load_model(models["missing"]).wait(30)


def load_status_strings() -> list[str]:
    from ptychostream.core.pvdb import load_db

    return list(load_db("reconstructor.db")["Status_RBV"].enum_strs)
