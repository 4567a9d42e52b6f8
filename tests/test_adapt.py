"""Training for one instrument and ``ptychostream adapt``: the held-out split, label resampling, amplitude
heads above 1, probe-centric pairs, and the loop end to end (offline, and against a running IOC)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ptychostream.files.product import Product, write_product_h5
from ptychostream.model.preprocess import Preprocess
from ptychostream.sim import Geometry, Simulator, make_object, make_probe

SIZE = 32


def adapt_parser() -> argparse.ArgumentParser:
    from ptychostream.cli.adapt import add_adapt_parser

    ap = argparse.ArgumentParser(prog="ptychostream")
    sub = ap.add_subparsers(dest="command", required=True)
    add_adapt_parser(sub)
    return ap


def run_cli(*argv: str) -> int:
    args = adapt_parser().parse_args(["adapt", *argv])
    return args.func(args)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def wide_raster(rows: int, cols: int, step_m: float) -> np.ndarray:
    """(y, x) positions of a rows x cols raster centred on 0, wider in x than in y."""
    yy, xx = np.meshgrid((np.arange(rows) - (rows - 1) / 2) * step_m, (np.arange(cols) - (cols - 1) / 2) * step_m,
                         indexing="ij")
    return np.column_stack([yy.ravel(), xx.ravel()])


@pytest.fixture(scope="module")
def scan_files(tmp_path_factory):
    """A small simulated scan (Tike NPZ with its probe), its 'iterative' reference (the truth as a
    product) and a poor serving model (a tiny network trained a few steps on another probe)."""
    pytest.importorskip("torch")
    from ptychostream.files.npz import write_npz
    from ptychostream.files.scandata import Scan
    from ptychostream.train import TrainConfig, train

    d = tmp_path_factory.mktemp("adapt")
    g = Geometry(size=SIZE)
    probe = make_probe("gaussian", SIZE, g.pixel_m, fwhm_px=10)
    pos = wide_raster(10, 36, 3 * g.pixel_m)
    obj = make_object("blurred_noise", (96, 176), seed=4, sigma_px=3.0)
    frames = Simulator(obj, probe, pos, g, photons=1e5, seed=1, threads=2, dtype="float32").frames(slice(None))
    write_npz(d / "scan.npz", Scan(frames=frames, positions_m=pos, object_pixel_m=g.pixel_m, probe=probe[None]))
    with __import__("h5py").File(d / "ref.h5", "w") as h5:
        write_product_h5(h5, Product(obj, g.pixel_m, (0.0, 0.0), probe=probe, positions_m=pos))
    hot = frames.copy()
    hot[:, [2, 30], [7, 19]] = 50.0 * frames.max()  # two hot pixels, for the bad-pixel mask
    write_npz(d / "hot.npz", Scan(frames=hot, positions_m=pos, object_pixel_m=g.pixel_m, probe=probe[None]))
    serving = d / "serving.onnx"
    train(TrainConfig(output=str(serving), size=SIZE, depth=2, base_channels=8, output_size=SIZE, epochs=1,
                      samples=32, batch=16, threads=1, val=0, probe="zoneplate", object_px=128, pool=2),
          progress=False, log=lambda s: None)
    return {"dir": d, "scan": d / "scan.npz", "hot": d / "hot.npz", "ref": d / "ref.h5", "serving": serving, "pixel": g.pixel_m,
            "n": len(pos)}


# --------------------------------------------------------------------------- pieces (no torch)
def test_heldout_split_is_spatial_and_disjoint():
    from ptychostream.train import TrainError
    from ptychostream.train.instrument import heldout_split

    rng = np.random.default_rng(0)
    pos = rng.uniform(-1e-6, 1e-6, size=(400, 2))
    s = heldout_split(pos, 0.25, "right", guard_m=0.1e-6)
    x = pos[:, 1]
    assert set(s.train).isdisjoint(s.held) and len(s.train) + len(s.held) < 400  # the guard band drops some
    thr = x.max() - 0.25 * np.ptp(x)
    assert s.threshold_m == pytest.approx(thr)
    assert (x[s.held] >= thr).all() and (x[s.train] < thr - 0.1e-6).all()  # a region, not a random subset
    assert set(np.flatnonzero(x >= thr)) == set(s.held)
    box = s.region_box()
    assert box[2] == pytest.approx(thr) and box[3] == pytest.approx(x.max())
    top = heldout_split(pos, 0.5, "top")
    assert (pos[top.held, 0] <= pos[top.train, 0].min()).all() and len(top.train) + len(top.held) == 400
    with pytest.raises(TrainError, match="side must be one of"):
        heldout_split(pos, 0.25, "middle")
    with pytest.raises(TrainError, match="leaves 0 training"):
        heldout_split(pos, 0.25, "right", guard_m=5e-6)


def test_labels_of_any_size_are_resampled_to_the_output():
    from ptychostream.train.data import fit_labels, resample_patches
    from ptychostream.train.instrument import label_patches

    # a smooth phase that wraps: resampled as a complex field it stays exact up to interpolation
    yy, xx = np.mgrid[0:64, 0:64] - 32
    phase = np.angle(np.exp(1j * (0.15 * xx + 0.05 * yy + 3.0)))[None].astype(np.float32)
    amp = (1.2 + 0.002 * xx)[None].astype(np.float32)
    ph2, am2 = fit_labels(phase, amp, 48, zoom=2.0)  # labels at twice the model's pixel
    y2, x2 = (np.mgrid[0:48, 0:48] - 24) / 2.0
    want = np.angle(np.exp(1j * (0.15 * x2 + 0.05 * y2 + 3.0)))
    assert ph2.shape == (1, 48, 48) and am2 is not None
    assert np.abs(np.angle(np.exp(1j * (ph2[0] - want)))).max() < 0.02
    assert np.abs(am2[0] - (1.2 + 0.002 * x2)).max() < 0.01
    # same pixel: the central crop, untouched
    same, _ = fit_labels(phase, None, 16)
    assert np.array_equal(same[0], phase[0, 24:40, 24:40])
    with pytest.raises(ValueError, match="do not cover"):
        resample_patches(phase, 48, zoom=0.5)
    # labels cut from a product at another pixel match the object sampled at the model's pixel
    obj = np.exp(1j * np.sin(np.mgrid[0:200, 0:200][1] / 9.0)).astype(np.complex64)
    pos = np.array([[0.0, 0.0], [4e-8, -6e-8]])
    coarse = Product(obj[::2, ::2], 2e-8, (0.0, 0.0))
    labels = label_patches(coarse, pos, 1e-8, 32)
    fine = label_patches(Product(obj, 1e-8, (0.0, 0.0)), pos, 1e-8, 32)
    assert labels.shape == fine.shape == (2, 32, 32)
    assert np.abs(np.angle(labels * np.conj(fine))).max() < 0.05


def test_probe_centric_pairs_use_the_given_probe_and_all_its_modes():
    from ptychostream.train import TrainConfig
    from ptychostream.train.config import probe_weight
    from ptychostream.train.instrument import (
        MixedSource,
        ProbeSource,
        instrument_source,
        probe_modes,
    )

    n = SIZE
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    spot = np.exp(-(xx**2 + yy**2) / (2 * 5.0**2))
    # two modes whose far fields sit 6 px right and 6 px up of the centre: the frames show both
    modes = np.stack([np.sqrt(0.7) * spot * np.exp(2j * np.pi * 6 * xx / n),
                      np.sqrt(0.3) * spot * np.exp(-2j * np.pi * 6 * yy / n)])
    cfg = TrainConfig(size=n, objects=("blurred_noise",), object_px=96, pool=2, max_phase=(0.1, 0.1), seed=3)
    pm = probe_modes(modes, n)
    w = probe_weight(np.sqrt((np.abs(pm) ** 2).sum(0)), n, 16)
    src = ProbeSource(cfg, pm, 1e-8, Preprocess(), 16, w, photons=(1e7, 1e7))
    b = src.batch(0, 8)
    mean = b.x[:, 0].mean(axis=0)
    c = n // 2
    right, up, centre = mean[c, c + 6], mean[c - 6, c], mean[c, c]
    assert right > 20 * centre and up > 20 * centre
    assert right / up == pytest.approx(0.7 / 0.3, rel=0.15)
    assert b.phase.shape == (8, 1, 16, 16) and b.amplitude is not None
    assert src.describe()["probe_modes"] == 2
    # a probe of the wrong size is refused with what was expected
    with pytest.raises(ValueError, match=r"expected \(modes, 32, 32\)"):
        probe_modes(modes[:, :16, :16], n)
    # mixed: the first part of each batch the scan's pairs, the rest synthetic, at the ratio
    frames = np.random.default_rng(0).poisson(50, (40, n, n)).astype(np.float32)
    labels = np.exp(1j * np.random.default_rng(1).uniform(-1, 1, (40, 16, 16))).astype(np.complex64)
    mixed, facts = instrument_source(cfg, frames=frames, labels=labels, probe=modes, pixel_m=1e-8,
                                     pre=Preprocess(), out=16, mode="mixed", mix=0.25)
    assert isinstance(mixed, MixedSource) and facts["out"] == 16 and facts["probe_id"].startswith("scan-")
    mb = mixed.batch(0, 16)
    pairs_only = mixed.pairs.batch(0, 12)
    assert mb.x.shape == (16, 1, n, n) and np.array_equal(mb.x[:12], pairs_only.x)


def test_hot_pixels_are_found_and_cleaned():
    from ptychostream.train.instrument import bad_pixels, clean_frames

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] - SIZE // 2
    frames = rng.poisson(1e4 * np.exp(-(xx**2 + yy**2) / 18.0) + 2.0, (20, SIZE, SIZE)).astype(np.float32)
    frames[:, 3, 5] = 2**20  # hot in every frame
    frames[:, 28, 30] = 5e3
    bad = bad_pixels(frames)
    assert set(map(tuple, np.argwhere(bad))) == {(3, 5), (28, 30)}  # the bright centre is not "hot"
    med = clean_frames(frames, bad, "median")
    assert med[:, 3, 5].max() < 20 and np.array_equal(med[:, ~bad], frames[:, ~bad])
    assert (clean_frames(frames, bad, "zero")[:, bad] == 0).all()


@pytest.mark.parametrize("origin", ["corner", "centre"])
@pytest.mark.parametrize("transpose,flip_y,flip_x", [(False, False, False), (True, False, False),
                                                     (False, True, False), (False, False, True), (True, True, True)])
def test_the_mask_adapt_writes_is_the_raw_frames_hot_pixels(origin, transpose, flip_y, flip_x):
    """adapt finds hot pixels in the canonical frames; the mask it writes for PreMaskPath is in the raw
    (stored) frame's coordinates: the hot pixels of the raw frames themselves. Through the IOC's
    pre-processing with the same instrument settings, it zeroes what the network was trained without."""
    from ptychostream.cli.adapt import raw_mask
    from ptychostream.files.scandata import Scan
    from ptychostream.train.instrument import bad_pixels, clean_frames

    rng = np.random.default_rng(1)
    h, w = 24, 32  # not square: the transpose shows
    yy, xx = np.mgrid[0:h, 0:w] - np.array([h // 2, w // 2])[:, None, None]
    centred = rng.poisson(1e4 * np.exp(-(xx**2 + yy**2) / 18.0) + 2.0, (6, h, w)).astype(np.float32)
    raw = np.fft.ifftshift(centred, axes=(-2, -1)) if origin == "corner" else centred
    hot = np.zeros((h, w), dtype=bool)
    hot[[0, 3, 11, 23], [31, 5, 16, 0]] = True  # edges and the centre's neighbourhood too
    raw[:, hot] = 2**18
    scan = Scan(frames=raw, positions_m=np.zeros((6, 2)), origin=origin, transpose=transpose, flip_y=flip_y,
                flip_x=flip_x)
    canonical = scan.canonical_frames()
    bad = bad_pixels(canonical)
    assert bad.sum() == hot.sum()
    mask = raw_mask(scan, bad)
    np.testing.assert_array_equal(mask, hot)
    np.testing.assert_array_equal(mask, bad_pixels(raw))  # found in the raw frames: the same
    ioc = Preprocess(fftshift=origin == "corner", transpose=transpose, flip_y=flip_y, flip_x=flip_x, mask=mask)
    np.testing.assert_array_equal(ioc.apply(raw), clean_frames(canonical, bad, "zero"))


def test_reference_object_never_shows_the_heldout_region():
    from ptychostream.train.instrument import heldout_split, reference_object

    obj = np.exp(1j * np.random.default_rng(2).uniform(-1, 1, (60, 100))).astype(np.complex64)
    px = 1e-8
    pos = wide_raster(4, 10, 6 * px)
    split = heldout_split(pos, 0.25, "right", 3 * px)
    ref = reference_object(Product(obj, px, (0.0, 0.0)), split, pos, px)
    assert ref is not None
    cut = 50 + int(np.floor(split.threshold_m / px))  # first held-out column of the object
    assert np.array_equal(ref.object[:, :cut], obj[:, :cut])
    assert np.array_equal(ref.object[:, cut:cut + 10], obj[:, cut - 1:cut - 11:-1])  # a mirror of the training side
    assert ref.box_m[3] < split.threshold_m
    assert reference_object(Product(obj, 2 * px, (0.0, 0.0)), split, pos, px) is None  # another pixel


def test_reference_patches_are_zoomed_within_the_range():
    """--reference-zoom: each patch cut from the reference is resampled by a zoom from the range; below 1 a
    patch holds more of the sample, so a phase ramp's slope in the labels grows by 1/zoom. A range outside
    0.25..4 (or reversed) is refused."""
    from ptychostream.train import TrainConfig, TrainError
    from ptychostream.train.config import probe_weight
    from ptychostream.train.instrument import ProbeSource, ReferenceObject, probe_modes

    n, px, slope = SIZE, 1e-8, 0.02  # rad per object pixel, along x
    yy, xx = np.mgrid[0:200, 0:200]
    obj = np.exp(1j * slope * (xx + 0.3 * yy)).astype(np.complex64)
    ref = ReferenceObject(obj, (-40 * px, 40 * px, -40 * px, 40 * px))
    cfg = TrainConfig(size=n, objects=("blurred_noise",), object_px=96, pool=2, max_phase=(0.1, 0.1), seed=3)
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    pm = probe_modes(np.exp(-(xx**2 + yy**2) / (2 * 5.0**2))[None].astype(np.complex64), n)
    w = probe_weight(np.sqrt((np.abs(pm) ** 2).sum(0)), n, 16)

    def steepness(zoom: tuple[float, float]) -> np.ndarray:
        src = ProbeSource(cfg, pm, px, Preprocess(), 16, w, photons=(1e6, 1e6), reference=ref,
                          reference_share=1.0, reference_zoom=zoom)
        ph = src.batch(0, 12).phase[:, 0]
        # wrap-safe neighbour differences; any of the 8 orientations keeps |d/dy| + |d/dx|
        dy = np.abs(np.angle(np.exp(1j * np.diff(ph, axis=-2)))).mean(axis=(-2, -1))
        dx = np.abs(np.angle(np.exp(1j * np.diff(ph, axis=-1)))).mean(axis=(-2, -1))
        return dy + dx

    np.testing.assert_allclose(steepness((1.0, 1.0)), 1.3 * slope, rtol=0.05)  # sub-pixel centres blur a little
    np.testing.assert_allclose(steepness((0.5, 0.5)), 2 * 1.3 * slope, rtol=0.05)
    spread = steepness((0.5, 2.0)) / (1.3 * slope)
    assert spread.min() >= 0.5 * 0.95 and spread.max() <= 2.0 * 1.05 and spread.max() / spread.min() > 1.5
    assert ProbeSource(cfg, pm, px, Preprocess(), 16, w, photons=(1e6, 1e6), reference=ref,
                       reference_share=1.0, reference_zoom=(0.5, 2.0)).describe()["reference_zoom"] == [0.5, 2.0]
    for bad in ((0.1, 1.0), (2.0, 1.0), (1.0, float("nan"))):
        with pytest.raises(TrainError, match="reference zoom"):
            ProbeSource(cfg, pm, px, Preprocess(), 16, w, photons=(1e6, 1e6), reference=ref,
                        reference_share=1.0, reference_zoom=bad)


# --------------------------------------------------------------------------- amplitude above 1
def test_amplitude_above_one_survives_export_and_serving(tmp_path):
    pytest.importorskip("torch")
    import torch

    from ptychostream.model.infer import open_model
    from ptychostream.train import build_net, export_onnx
    from ptychostream.train.loop import scale_amplitude

    net = build_net(SIZE, 4, 2, ("amplitude", "phase"), SIZE)
    with torch.no_grad():  # amplitude head saturated: sigmoid = 1 everywhere
        net.decoders[0][-1].bias.fill_(20.0)
    scaled = scale_amplitude(net, 2.5)
    meta = {"ptychostream.outputs": ["amplitude", "phase"], "ptychostream.pixel_m": "1e-8",
            "ptychostream.preprocess": Preprocess(scale="sqrt", normalise="mean").to_json(),
            "ptychostream.training": {"net": scaled.config}}
    export_onnx(scaled, tmp_path / "amp.onnx", meta)
    frames = np.random.default_rng(0).poisson(20, (3, SIZE, SIZE))
    with open_model(tmp_path / "amp.onnx", backend="ONNXRuntime-CPU", threads=1) as m:
        out = m.run(frames)
        assert m.info.training["net"]["amplitude_scale"] == 2.5
    assert out["amplitude"].shape == (3, SIZE, SIZE)
    assert np.allclose(out["amplitude"], 2.5, atol=1e-3)  # > 1, as served
    assert np.abs(out["phase"]).max() <= np.pi
    # the PyTorch backend rebuilds the network from the recorded layout: the scale comes with it
    from ptychostream.model.network import net_from_onnx

    rebuilt = net_from_onnx(tmp_path / "amp.onnx", scaled.config)
    with torch.no_grad():
        amp, _ = rebuilt(torch.zeros((1, 1, SIZE, SIZE)))
    assert np.allclose(amp.numpy(), 2.5, atol=1e-3)


def test_training_picks_an_amplitude_scale_from_the_labels(tmp_path):
    pytest.importorskip("torch")
    from ptychostream.model.infer import open_model
    from ptychostream.train import TrainConfig, train

    g = Geometry(size=SIZE)
    probe = make_probe("gaussian", SIZE, g.pixel_m, fwhm_px=12)
    pos = wide_raster(4, 6, 3 * g.pixel_m)
    obj = make_object("etched", (80, 80), seed=2, scale=0.4)
    sim = Simulator(obj, probe, pos, g, photons=1e5, seed=0, threads=1)
    real = sim.patches(slice(None)) * 1.6  # iterative amplitudes above 1
    np.savez(tmp_path / "p.npz", reciprocal=sim.frames(slice(None)), real=real, pixelsize=g.pixel_m)
    cfg = TrainConfig(output=str(tmp_path / "m.onnx"), data=(str(tmp_path / "p.npz"),), size=SIZE, depth=2,
                      base_channels=4, output_size=16, epochs=1, batch=8, threads=1, val=0)
    summary = train(cfg, progress=False, log=lambda s: None)
    assert summary["net"]["amplitude_scale"] >= 2.0  # ≥ 1.25 x the labels' 99.9th percentile
    with open_model(tmp_path / "m.onnx", backend="ONNXRuntime-CPU", threads=1) as m:
        assert m.info.training["net"]["amplitude_scale"] == summary["net"]["amplitude_scale"]
        m.selftest()


# --------------------------------------------------------------------------- adapt end to end
def test_adapt_offline_writes_the_report_and_decides(scan_files, tmp_path):
    out = tmp_path / "out"
    status = tmp_path / "status.json"
    before = sha(scan_files["serving"])
    rc = run_cli(str(scan_files["scan"]), "--reference", str(scan_files["ref"]), "--init", str(scan_files["serving"]),
                 "--truth", str(scan_files["ref"]), "--offset", "mean",
                 "--out", str(out), "--status-file", str(status), "--mode", "pairs", "--epochs", "8",
                 "--batch", "16", "--lr", "5e-3", "--threads", "1", "-q")
    assert rc == 0
    st = json.loads(status.read_text())
    assert st["done"] and st["ok"] and st["progress"] == 1.0 and st["stage"] == "done"
    res = json.loads((out / "report.json").read_text())
    assert st["result"]["model"] == res["model"]
    new = Path(res["model"])
    assert new.is_file() and new.parent == out and new != scan_files["serving"]
    assert sha(scan_files["serving"]) == before  # the serving model is never written
    assert (out / "report.png").stat().st_size > 1000
    held = res["heldout"]
    assert held["heldout_frames"] > 0 and held["train_frames"] + held["heldout_frames"] < scan_files["n"]
    old, adapted = res["scores"]["serving"], res["scores"]["adapted"]
    assert adapted["bandpass_corr"] > old["bandpass_corr"] + 0.2  # the poor serving model is beaten
    assert res["better"] is True and res["swapped"] is False and "better on the held-out" in res["reason"]
    vs_truth = res["scores_vs_truth"]  # --truth: the same figures against it (here the reference is the truth)
    assert vs_truth["reference"]["ssim"] > 0.99
    assert vs_truth["adapted"]["bandpass_corr"] > vs_truth["serving"]["bandpass_corr"] + 0.2
    from ptychostream.model.infer import open_model

    with open_model(new, backend="ONNXRuntime-CPU", threads=1) as m:
        assert m.info.pixel_m == pytest.approx(scan_files["pixel"])
        assert m.info.training["init"]["sha256"] == before
        assert m.info.metadata["ptychostream.stitch"] == json.dumps({"offset": "mean", "window": "hann", "domain": "phase"})
    # a margin no model can meet: not better, exit 0 with the reason
    rc = run_cli(str(scan_files["scan"]), "--reference", str(scan_files["ref"]), "--init", str(scan_files["serving"]),
                 "--out", str(out), "--status-file", str(status), "--mode", "mixed", "--mix", "0.5", "--epochs", "1",
                 "--batch", "16", "--margin", "2", "--threads", "1", "-q")
    assert rc == 0
    st = json.loads(status.read_text())
    assert st["ok"] and st["result"]["better"] is False and "not better" in st["message"]
    data = st["result"]["training"]["data"]
    assert data["source"] == "mixed" and data["synthetic_fraction"] == 0.5
    # by default half the synthetic patches come from the reference (here at the scan's pixel)
    assert data["synthetic"]["reference_share"] == 0.5 and data["synthetic"]["reference_zoom"] == [1.0, 1.0]
    # a bad input: the status says so, exit 2
    rc = run_cli(str(tmp_path / "missing.npz"), "--out", str(out), "--status-file", str(status), "--threads", "1", "-q")
    assert rc == 2
    st = json.loads(status.read_text())
    assert st["done"] and not st["ok"] and "missing.npz" in st["message"]


def test_adapt_physics_mode_trains_on_the_frames_alone(scan_files, tmp_path):
    """--mode physics: no labels, the Poisson likelihood under the scan's probe (and the overlap term)."""
    out = tmp_path / "phys"
    rc = run_cli(str(scan_files["scan"]), "--reference", str(scan_files["ref"]), "--init", str(scan_files["serving"]),
                 "--out", str(out), "--mode", "physics", "--epochs", "4", "--batch", "16", "--lr", "3e-3",
                 "--threads", "1", "--val", "32", "-q")
    assert rc == 0
    res = json.loads((out / "report.json").read_text())
    assert res["mode"] == "physics" and Path(res["model"]).is_file()
    phys = res["physics"]
    assert phys["supervised_weight"] == 0 and phys["physics_weight"] == 1 and phys["overlap_weight"] == 1
    tr = res["training"]
    assert tr["data"]["source"] == "scan frames (no labels)" and "Poisson deviance" in tr["loss"]
    assert "phase" not in tr["final_val_loss"]  # no labels were used
    assert tr["final_val_loss"]["poisson"] < 0.8 * tr["initial_val_loss"]["poisson"]
    assert res["scores"]["adapted"] is not None


def test_adapt_swaps_the_ioc_model_only_when_better(scan_files, tmp_path):
    from conftest import IOCProcess, next_slot, pva_context, text, wait_for

    prefix = "TEST:ADAPT:"
    ioc = IOCProcess(["ioc", "--prefix", prefix, "--no-ca"], prefix, next_slot()).start()
    try:
        with pva_context() as ctx:
            serving = str(scan_files["serving"].resolve())
            ctx.put(prefix + "ModelPath", serving, wait=True)
            wait_for(lambda: text(ctx.get(prefix + "ModelPath_RBV")) == serving, 30, message="the first model")
            common = [str(scan_files["hot"]), "--reference", str(scan_files["ref"]), "--ioc", prefix,
                      "--out", str(tmp_path / "out"), "--mode", "pairs", "--batch", "16", "--lr", "5e-3",
                      "--threads", "1", "-q"]
            # forced "not better": the IOC keeps its model
            assert run_cli(*common, "--epochs", "1", "--margin", "2") == 0
            res = json.loads((tmp_path / "out" / "report.json").read_text())
            assert res["serving_model"] == serving and res["better"] is False and res["swapped"] is False
            assert text(ctx.get(prefix + "ModelPath_RBV")) == serving
            mask = res["bad_pixels"]["mask"]  # written, listed, but not put: no swap
            assert res["bad_pixels"]["count"] == 2 and Path(mask).name == "bad-pixels.npy"
            assert sorted(map(tuple, np.argwhere(np.load(mask)))) == [(2, 7), (30, 19)]
            assert text(ctx.get(prefix + "PreMaskPath_RBV")) == ""
            # better: put, and served
            assert run_cli(*common, "--epochs", "8") == 0
            res = json.loads((tmp_path / "out" / "report.json").read_text())
            assert res["better"] is True and res["swapped"] is True, res
            new = str(Path(res["model"]).resolve())
            assert text(ctx.get(prefix + "ModelPath_RBV")) == new
            # with the model, the IOC got the mask the model was trained for (those pixels zeroed)
            assert res["mask_put"] is True and "bad-pixel mask" in res["swap_message"], res["swap_message"]
            assert text(ctx.get(prefix + "PreMaskPath_RBV")) == res["bad_pixels"]["mask"]
            # --no-swap decides but leaves the IOC alone
            assert run_cli(*common, "--epochs", "1", "--no-swap") == 0
            res = json.loads((tmp_path / "out" / "report.json").read_text())
            assert res["serving_model"] == new and res["swapped"] is False
            assert text(ctx.get(prefix + "ModelPath_RBV")) == new
    finally:
        ioc.stop()
