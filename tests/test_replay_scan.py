"""Issue #13: a Tike-style scan (corner-origin frames, positions in pixels) replayed through simdet into the
reconstructor: every frame received, processed and positioned by its own NDAttributes, with no position file and
no ArrayCounter reset."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import (
    detector_and_reconstructor,
    live_monitor,
    put_in_background,
    pva_context,
    wait_for,
)

from ptychostream.files.scan import read_scan
from ptychostream.model.zoo import build_ptychonn_onnx

S, R = "TST:RSSIM:", "TST:RSREC:"
N_SIDE, SIZE, STEP_PX = 8, 64, 6
N = N_SIDE * N_SIDE


def tike_scan(path) -> tuple[np.ndarray, np.ndarray]:
    """A Tike-style NPZ as beamline tools write it: ``data`` |FFT(P * O)|^2 with no fftshift (zero frequency at
    pixel (0, 0)), ``scan`` (1, N, 2) probe-box corners in object pixels, ``probe`` (1, 1, 1, h, w); no pixel size,
    no geometry, no origin. Returns the frames and the positions in pixels."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE / 2
    probe = np.exp(-(yy**2 + xx**2) / (2 * 10.0**2)).astype(np.complex64)
    extent = SIZE + STEP_PX * (N_SIDE + 1)
    obj = np.exp(1j * rng.uniform(-1, 1, (extent, extent))).astype(np.complex64)
    grid = np.stack(np.meshgrid(np.arange(N_SIDE), np.arange(N_SIDE), indexing="ij"), -1).reshape(-1, 2)
    pos_px = (grid * STEP_PX + rng.integers(0, 3, (N, 2))).astype(np.float64)
    frames = np.stack([np.abs(np.fft.fft2(probe * obj[y:y + SIZE, x:x + SIZE], norm="ortho")) ** 2
                       for y, x in pos_px.astype(int)])
    frames = rng.poisson(frames * 50).astype(np.uint16)
    np.savez(path, data=frames, scan=pos_px[None], probe=probe[None, None, None])
    return frames, pos_px


@pytest.mark.system
def test_tike_npz_replay_positions_every_frame(tmp_path):
    path = tmp_path / "tike.npz"
    frames, pos_px = tike_scan(path)
    model = build_ptychonn_onnx(str(tmp_path / "m.onnx"), size=SIZE, heads=("phase",), base_channels=4, depth=2,
                                seed=1)
    with detector_and_reconstructor(S, R), pva_context() as ctx:
        ctx.put(S + "cam1:ReplayFile", str(path), wait=True)  # completes once the file has loaded
        pixel = float(ctx.get(S + "cam1:ObjectPixel_RBV"))  # the detector's geometry: the file gives none
        scan = read_scan(path, defaults={"energy_ev": 1e3 * float(ctx.get(S + "cam1:Energy")),
                                         "distance_m": float(ctx.get(S + "cam1:Distance")),
                                         "detector_pixel_m": float(ctx.get(S + "cam1:DetPixel"))})
        # (the simulator's h*c has 6 digits, the reader's CODATA's 10: 1.6 ppm apart)
        assert scan.origin == "corner" and scan.pixel_m() == pytest.approx(pixel * 128 / SIZE, rel=1e-5, abs=0)
        want = pos_px * scan.pixel_m()
        for k, v in {"ModelPath": model, "InputPV": S + "Pva1:Image", "PixelSize": scan.pixel_m(),
                     "PositionTimeout": 2.0, "Enable": 1}.items():
            ctx.put(R + k, v, wait=True)
        wait_for(lambda: int(ctx.get(R + "ModelStatus_RBV")) == 2, timeout=30, message="model ready")
        wait_for(lambda: int(ctx.get(R + "InputConnected_RBV")) == 1, timeout=10, message="input connected")
        for k, v in {"ImageMode": "Multiple", "NumImages": N, "AcquirePeriod": 0.002}.items():
            ctx.put(S + "cam1:" + k, v, wait=True)
        seen: list = []
        lock = threading.Lock()

        def keep(value) -> None:
            with lock:
                seen.append(value)

        mctx = pva_context()
        sub = live_monitor(mctx, S + "Pva1:Image", keep, request="record[queueSize=1024]")
        try:
            # twice, the counter never reset: the second replay's uniqueIds are N+1..2N, its positions the same
            for run in (1, 2):
                put_in_background(ctx, S + "cam1:Acquire", 1)
                wait_for(lambda run=run: int(ctx.get(R + "Stitched_RBV")) == run * N, timeout=60,
                         message=f"{run * N} stitched",
                         state=lambda: {n: int(ctx.get(R + n + "_RBV"))
                                        for n in ("Received", "Processed", "Unpositioned", "PositionWait")})
                want_counts = {"Received": run * N, "Processed": run * N, "Unpositioned": 0,
                               "Stitched": run * N, "Dropped": 0, "Rejected": 0}

                def counts() -> dict[str, int]:
                    return {n: int(ctx.get(R + n + "_RBV")) for n in want_counts}

                # Stitched_RBV can be posted before the 10 Hz status scan posts Received/Processed of the same
                # frames (seen once in CI: 127 received, 128 stitched): the books are compared once settled
                wait_for(lambda: counts() == want_counts, timeout=5, message="the counters settled", state=counts)
                wait_for(lambda run=run: len(seen) >= run * N, timeout=10, message="frames monitored")
        finally:
            sub.close()
            mctx.close()
        assert int(ctx.get(S + "cam1:ArrayCounter_RBV")) == 2 * N
    uids = [v.raw["uniqueId"] for v in seen]
    assert uids == list(range(1, 2 * N + 1))
    got = np.array([[v.attrib["PositionY"], v.attrib["PositionX"]] for v in seen])
    np.testing.assert_allclose(got, np.concatenate([want, want]), rtol=1e-12)
    # the frames as stored (corner origin): the reconstructor's instrument settings handle the origin
    np.testing.assert_array_equal(np.asarray(seen[N + 5]), frames[5])


@pytest.mark.parametrize("bad", [False, True])
def test_replay_file_put_reads_off_the_handler_lock(tmp_path, bad):
    """The put answers Busy at once and completes when the file has loaded on a thread (the handler lock free
    meanwhile); the source is read once; a file that does not load refuses the put and keeps the setpoint."""
    from ptychostream.core.device import Busy, PutError
    from ptychostream.devices.simdet import SimDetector

    path = tmp_path / "tike.npz"
    frames, pos_px = tike_scan(path)
    if bad:
        np.savez(path, data=frames, scan=pos_px[None, :-1])
    det = SimDetector()
    got = det.device.put("cam1:ReplayFile", str(path))
    assert isinstance(got, Busy)
    assert det.device.handler_lock.acquire(timeout=0.5)  # not held while the file loads
    det.device.handler_lock.release()
    if bad:
        with pytest.raises(PutError, match=rf"scan' for {N} frames"):
            got.done.result(timeout=10)
        assert det.device.get("cam1:ReplayFile") == "" and "tike.npz" in det.device.get("cam1:StatusMessage_RBV")
        return
    got.done.result(timeout=10)
    assert det.device.get("cam1:ReplayFile") == str(path) == det.device.get("cam1:ReplayFile_RBV")
    source = det.build_source()
    assert det.build_source() is source and source.positions is not None
    np.testing.assert_array_equal(source.frames, frames)
    np.testing.assert_allclose(source.positions, pos_px * det.geometry().pixel_m * det.geometry().size / SIZE,
                               rtol=1e-5)  # h*c of 6 digits in the simulator, of 10 in the reader


def test_replay_of_frames_without_positions(tmp_path):
    """A scan file without positions still replays, its frames alone (the frames are not read twice)."""
    from ptychostream.sim.replay import load_frames

    frames, _ = tike_scan(tmp_path / "tike.npz")
    np.savez(tmp_path / "frames.npz", data=frames[:4])
    data = load_frames(tmp_path / "frames.npz")
    assert data.positions_m is None and "tike-npz" in data.source
    np.testing.assert_array_equal(data.frames, frames[:4])
