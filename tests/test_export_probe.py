"""Issue #14 leftover: a model written by ``ptychostream train`` carries the probe it was trained with.

The export writes ``<stem>.probe.npy`` beside the model and names it in ``ptychostream.probe``; the
device's consistency check finds it (``model.info.probe_sidecar``), so after a retrain swap the figure
is available instead of "unavailable".  A run with no probe of its own takes the ``--init`` model's
sidecar; an export with no probe at all removes a stale sidecar of the same name.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import IOCProcess, next_slot, pva_context, text, wait_for  # noqa: E402

from ptychostream.core.frames import ImageFrame  # noqa: E402
from ptychostream.files.scan import read_scan  # noqa: E402
from ptychostream.model.consistency import ConsistencyMonitor  # noqa: E402
from ptychostream.model.info import load_model_file, probe_sidecar  # noqa: E402
from ptychostream.protocols.ntnd import encode  # noqa: E402
from ptychostream.train.instrument import probe_modes  # noqa: E402

S = 32
R = "TST:PROBESIDE:"
#: ConsistencyStatus_RBV states (db/)
OFF, UNAVAILABLE, WAITING, OK, HIGH = range(5)


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory) -> Path:
    """A small foreign-instrument scan (49 frames of 32x32, 4 probe modes) as CXI, and labelled pairs."""
    from ptychostream.sim.foreign import ForeignInstrument, simulate_foreign, write_foreign_cxi

    scan, truth = simulate_foreign(ForeignInstrument(size=S, frames=49, step_px=3.0, hot_pixels=0, photons=1e6), 0)
    d = tmp_path_factory.mktemp("probe-sidecar")
    write_foreign_cxi(d / "tiny.cxi", scan)
    np.savez(d / "pairs.npz", reciprocal=scan.canonical_frames(), real=truth.patches(),
             position=np.zeros((len(scan.frames), 2)), pixelsize=truth.pixel_m)
    return d


def _train(argv: list[str]) -> None:
    from ptychostream.train import add_train_parser

    ap = argparse.ArgumentParser(prog="ptychostream")
    add_train_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["train", *argv, "--size", str(S), "--depth", "2", "--base-channels", "4",
                          "--output-size", "16", "--batch", "8", "--threads", "1", "--val", "8", "-q"])
    assert args.func(args) == 0


@pytest.fixture(scope="module")
def tuned(scan_dir: Path) -> Path:
    """A model trained on the scan's frames alone (the physics loss under the scan's probe)."""
    out = scan_dir / "tuned.onnx"
    _train([str(out), "--scan", str(scan_dir / "tiny.cxi"), "--supervised-weight", "0", "--physics-weight", "1",
            "--epochs", "2"])
    return out


def test_train_from_a_scan_writes_the_scans_probe_beside_the_model(scan_dir, tuned):
    info = load_model_file(tuned)
    side = tuned.with_name("tuned.probe.npy")
    assert info.metadata["ptychostream.probe"] == "tuned.probe.npy"
    assert probe_sidecar(info) == side
    assert info.training["probe_file"] == side.name
    want = probe_modes(read_scan(scan_dir / "tiny.cxi").probe, S)  # the modes the loss used (power 1)
    got = np.load(side)
    assert got.shape == (4, S, S) and got.dtype == np.complex64
    np.testing.assert_allclose(got, want, atol=1e-6)
    # the device's consistency check takes it
    mon = ConsistencyMonitor(share=1.0)
    assert mon.set_model(info) == ""
    assert mon.source() == f"model probe {side.name} {S}x{S}, 4 modes"  # every mode, not the first alone


def test_a_run_with_no_probe_takes_the_init_models_and_a_bare_export_removes_a_stale_one(scan_dir, tuned):
    from ptychostream.model.network import build_net
    from ptychostream.train.export import export_onnx

    # labelled pairs without a probe, continued from the tuned model (same instrument): its sidecar travels
    child = scan_dir / "child.onnx"
    _train([str(child), "--init", str(tuned), "--data", str(scan_dir / "pairs.npz"), "--epochs", "1"])
    info = load_model_file(child)
    assert probe_sidecar(info) == child.with_name("child.probe.npy")
    np.testing.assert_array_equal(np.load(child.with_name("child.probe.npy")), np.load(probe_sidecar(
        load_model_file(tuned))))
    # an export with no probe over it: the old sidecar would be taken as the new model's, so it goes
    net = build_net(S, 4, 2, ("amplitude", "phase"), 16)
    res = export_onnx(net, child, {"ptychostream.name": "bare"})
    assert res["probe"] is None and not child.with_name("child.probe.npy").exists()
    bare = load_model_file(child)
    assert "ptychostream.probe" not in bare.metadata and probe_sidecar(bare) is None
    assert ConsistencyMonitor().set_model(bare) == ""
    assert ConsistencyMonitor().source().startswith("unavailable")


@pytest.mark.system
def test_after_swapping_in_a_trained_model_the_consistency_figure_is_available(scan_dir, tuned):
    """A real reconstructor IOC: the model's sidecar is in use after the swap and frames get a figure."""
    frames = np.asarray(read_scan(scan_dir / "tiny.cxi").canonical_frames(), dtype=np.float32)
    rec = IOCProcess(["ioc", "--prefix", R, "--no-ca"], R, next_slot()).start()
    try:
        with pva_context() as ctx, pva_context(nt=False) as raw:
            ctx.put(R + "ModelPath", str(tuned), wait=True)
            wait_for(lambda: int(ctx.get(R + "ModelStatus_RBV")) == 2, timeout=60, message="model ready",
                     state=lambda: text(ctx.get(R + "Message_RBV")))
            wait_for(lambda: f"model probe tuned.probe.npy {S}x{S}" in text(ctx.get(R + "ConsistencyInfo_RBV")),
                     timeout=5, message="the model's probe in use",
                     state=lambda: text(ctx.get(R + "ConsistencyInfo_RBV")))
            assert int(ctx.get(R + "ConsistencyStatus_RBV")) == WAITING
            ctx.put(R + "ConsistencyShare", 1.0, wait=True)
            ctx.put(R + "Enable", 1, wait=True)
            n = 12
            for k in range(n):  # the canonical frames: the IOC's default pre-processing leaves them as they are
                raw.put(R + "Input", encode(ImageFrame(frames[k], k + 1, time.time())), wait=True)
            wait_for(lambda: int(ctx.get(R + "ConsistencySampled_RBV")) >= n, timeout=30, message="frames sampled",
                     state=lambda: (int(ctx.get(R + "Processed_RBV")), text(ctx.get(R + "Message_RBV"))))
            wait_for(lambda: math.isfinite(float(ctx.get(R + "Consistency_RBV"))), timeout=5,
                     message="a finite figure")
            assert int(ctx.get(R + "ConsistencyStatus_RBV")) in (OK, HIGH)
    finally:
        rec.stop()
