"""The physics-informed loss (train/physics.py): forward model, geometry, minimum at the truth, overlap, CLI."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ptychostream.model.preprocess import Preprocess
from ptychostream.sim.foreign import store_frames
from ptychostream.sim.forward import extract_patches, far_field
from ptychostream.train.physics import FrameGeometry, PoissonLoss

S = 32


def probe_modes(size: int = S, k: int = 2, seed: int = 0) -> np.ndarray:
    """``k`` smooth complex probe modes, lit mostly inside the central half of the window."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size // 2
    modes = []
    for j in range(k):
        env = np.exp(-(yy**2 + xx**2) / (2 * (size / 10) ** 2))
        phase = 0.02 * (yy**2 - 0.5 * xx**2) + rng.uniform(-0.5, 0.5) * (yy + xx) / size
        modes.append(env * np.exp(1j * phase) * (0.8 if j == 0 else 0.4))
    return np.asarray(modes, dtype=np.complex64)


def structured_object(n: int, size: int = S, inner: int = S // 2, seed: int = 1) -> np.ndarray:
    """(n, size, size) complex patches: structure well inside the central ``inner`` px, a constant
    transmission elsewhere (so the border fill of the loss is exact)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size // 2
    inside = (np.abs(yy) < inner // 2 - 2) & (np.abs(xx) < inner // 2 - 2)
    out = np.empty((n, size, size), dtype=np.complex64)
    for k in range(n):
        phase = np.where(inside, rng.uniform(-0.8, 0.8, (size, size)), 0.0)
        amp = np.where(inside, rng.uniform(0.85, 1.0, (size, size)), 0.95)
        out[k] = 0.9 * amp * np.exp(1j * phase)
    return out


def counts_of(modes: np.ndarray, patches: np.ndarray, photons: float = 1e6) -> np.ndarray:
    inten = sum(far_field(m[None] * patches) for m in modes)
    return (inten / inten.sum(axis=(1, 2), keepdims=True) * photons).astype(np.float32)


# --------------------------------------------------------------------------- the forward model
def test_intensities_equal_the_numpy_forward_model():
    modes = probe_modes()
    rng = np.random.default_rng(3)
    patches = (rng.uniform(0.5, 1, (3, S, S)) * np.exp(1j * rng.uniform(-2, 2, (3, S, S)))).astype(np.complex64)
    loss = PoissonLoss(modes, Preprocess(), S)
    got = loss.intensity(torch.from_numpy(patches)).numpy()
    m = modes / np.sqrt(np.sum(np.abs(modes) ** 2))  # the loss normalises the probe to a power of 1
    want = sum(far_field(k[None] * patches) for k in m)
    assert got.shape == want.shape == (3, S, S)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.max()))


@pytest.mark.parametrize("flip_y,flip_x,transpose,bin_", [(False, False, False, 1), (True, False, False, 1),
                                                          (False, True, True, 1), (True, True, True, 2)])
def test_geometry_honours_origin_flips_transpose_crop_and_bin(flip_y, flip_x, transpose, bin_):
    """The simulated frame in the network's geometry equals the pre-processing of the stored frame."""
    modes = probe_modes()
    patches = structured_object(2)
    canonical = counts_of(modes, patches)
    stored = store_frames(canonical, flip_y=flip_y, flip_x=flip_x, transpose=transpose)  # corner origin
    pre = Preprocess(fftshift=True, flip_y=flip_y, flip_x=flip_x, transpose=transpose, crop_size=16, bin=bin_,
                     scale="sqrt", normalise="mean")
    geo = FrameGeometry.from_preprocess(pre, S)
    measured = replace(pre, scale="none", normalise="none").apply(stored)
    np.testing.assert_allclose(geo.take(canonical), measured, rtol=1e-5)
    # and the loss's own prediction, from the object, lands on the measured counts up to the photon scale
    loss = PoissonLoss(modes, pre, S)
    pred = loss.predicted(torch.from_numpy(patches)).numpy()
    ratio = measured.sum(axis=(1, 2)) / pred.sum(axis=(1, 2))
    np.testing.assert_allclose(pred * ratio[:, None, None], measured, rtol=1e-3, atol=1e-3 * float(measured.max()))
    assert float(loss.deviance(torch.from_numpy(patches), torch.from_numpy(loss.counts(stored, pre)))) < 1e-4


def test_geometry_the_canonical_frame_is_found_before_the_crop():
    """A flipped detector with a crop: the frequency reversal (k -> -k) is taken on the whole frame."""
    pre = Preprocess(fftshift=False, flip_x=True, crop_size=8)
    geo = FrameGeometry.from_preprocess(pre, 16)
    canon = np.arange(256, dtype=np.float32).reshape(16, 16)
    raw = np.roll(canon[:, ::-1], 1, axis=1)  # the stored frame of a flipped detector
    np.testing.assert_array_equal(geo.take(canon), pre.apply(raw))


# --------------------------------------------------------------------------- the minimum at the truth
def test_the_loss_is_minimal_with_zero_gradient_at_the_true_object():
    modes = probe_modes()
    out = S // 2
    patches = structured_object(4)
    counts = torch.from_numpy(counts_of(modes, patches))
    loss = PoissonLoss(modes, Preprocess(), out)
    true_c = torch.from_numpy(patches[:, S // 2 - out // 2:S // 2 + out // 2, S // 2 - out // 2:S // 2 + out // 2])

    def value_and_grad(phase_shift: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        phase = torch.angle(true_c) + phase_shift * torch.from_numpy(rng.standard_normal(true_c.shape)).float()
        phase.requires_grad_(True)
        amp = true_c.abs()
        dev = loss.deviance(torch.polar(amp, phase), counts)
        dev.backward()
        return float(dev.detach()), float(phase.grad.abs().max())

    dev0, g0 = value_and_grad(0.0)
    assert dev0 < 1e-4
    for shift in (0.05, 0.3):
        dev, g = value_and_grad(shift)
        assert dev > 100 * max(dev0, 1e-6), shift
        assert g > 30 * g0, (shift, g, g0)
    # a global phase does not change the frames
    amp = true_c.abs()
    assert float(loss.deviance(torch.polar(amp, torch.angle(true_c) + 1.3), counts)) < 1e-4


def test_valid_mask_leaves_hot_pixels_out():
    modes = probe_modes()
    patches = structured_object(2)
    counts = counts_of(modes, patches)
    hot = np.zeros((S, S), dtype=bool)
    hot[S // 2 + 3, S // 2 - 5] = hot[2, 7] = True
    spoiled = counts.copy()
    spoiled[:, hot] = 2**20
    p = torch.from_numpy(patches)
    masked = PoissonLoss(modes, Preprocess(), S, valid=~hot)
    plain = PoissonLoss(modes, Preprocess(), S)
    assert float(masked.deviance(p, torch.from_numpy(spoiled))) < 1e-3
    assert float(plain.deviance(p, torch.from_numpy(spoiled))) > 100


# --------------------------------------------------------------------------- the overlap term
def test_overlap_term_is_zero_for_patches_of_one_object_and_large_for_others():
    modes = probe_modes(size=48)
    rng = np.random.default_rng(5)
    obj = np.exp(1j * rng.uniform(-1, 1, (96, 96))).astype(np.complex64)
    from scipy.ndimage import gaussian_filter

    obj = np.exp(1j * gaussian_filter(np.angle(obj), 1.5) * 3).astype(np.complex64)
    px = 1e-8
    pos = np.array([[0.0, 0.0], [3.0, 4.0], [-5.0, 2.0], [6.0, -6.0]]) * px
    patches = extract_patches(obj, pos, px, 24)
    loss = PoissonLoss(modes, Preprocess(crop_size=24), 24, pixel_m=px)
    p = torch.from_numpy(patches)
    same = float(loss.overlap(p, torch.from_numpy(pos)))
    offset = float(loss.overlap(p * torch.exp(1j * torch.tensor([0.0, 1.0, -2.0, 0.5]))[:, None, None],
                                torch.from_numpy(pos)))
    other = extract_patches(np.conj(obj), pos, px, 24)
    mixed = float(loss.overlap(torch.from_numpy(np.concatenate([patches[:2], other[2:]])), torch.from_numpy(pos)))
    assert same < 0.02 and offset < 0.02  # exact but for the bilinear resampling of the grid
    assert mixed > 10 * max(same, 1e-3)


# --------------------------------------------------------------------------- a short CLI run
def test_mosaic_surround_is_the_object_around_each_patch():
    from ptychostream.train.physics import stitch_context

    rng = np.random.default_rng(2)
    from scipy.ndimage import gaussian_filter

    obj = np.exp(1j * 2 * gaussian_filter(rng.standard_normal((120, 120)), 2)).astype(np.complex64)
    px = 1e-8
    yy, xx = np.mgrid[-3:4, -3:4] * 4.0
    pos = np.column_stack([yy.ravel(), xx.ravel()]) * px
    patches = extract_patches(obj, pos, px, 16) * np.exp(1j * rng.uniform(-3, 3, len(pos)))[:, None, None]
    light = np.ones((16, 16), dtype=np.float32)
    ctx = stitch_context(patches.astype(np.complex64), pos, px, 32, light)
    want = extract_patches(obj, pos, px, 32)
    k = len(pos) // 2  # the middle frame: its whole 32-px surround was scanned
    turn = np.sum(ctx[k] * np.conj(want[k]))
    np.testing.assert_allclose(ctx[k] * np.conj(turn / abs(turn)), want[k], atol=2e-3)


@pytest.fixture(scope="module")
def tiny_scan(tmp_path_factory):
    from ptychostream.sim.foreign import (
        ForeignInstrument,
        simulate_foreign,
        write_foreign_cxi,
    )

    settings = ForeignInstrument(size=S, frames=49, step_px=3.0, hot_pixels=2, photons=1e6)
    scan, truth = simulate_foreign(settings, 0)
    d = tmp_path_factory.mktemp("physics")
    path = d / "tiny.cxi"
    write_foreign_cxi(path, scan)
    np.savez(d / "pairs.npz", reciprocal=scan.canonical_frames(), real=truth.patches(),
             position=np.zeros((len(scan.frames), 2)), pixelsize=truth.pixel_m)
    return path


def test_supervised_and_physics_losses_mix(tiny_scan, tmp_path):
    from ptychostream.train import TrainConfig, train

    cfg = TrainConfig(output=str(tmp_path / "m.onnx"), data=(str(tiny_scan.parent / "pairs.npz"),), scan=str(tiny_scan),
                      physics_weight=1.0, overlap_weight=0.5, physics_context="mosaic", context_every=3, size=S,
                      depth=2, base_channels=4, output_size=16, epochs=2, batch=8, threads=1, val=8)
    summary = train(cfg, progress=False, log=lambda s: None)
    assert summary["data"]["source"] == "labelled + scan frames"
    assert {"phase", "amplitude", "poisson", "overlap"} <= set(summary["final_val_loss"])
    assert summary["loss"].startswith("1 x (L1") and "Poisson deviance" in summary["loss"]


def parser() -> argparse.ArgumentParser:
    from ptychostream.train import add_train_parser

    ap = argparse.ArgumentParser(prog="ptychostream")
    sub = ap.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    return ap


def test_cli_unsupervised_run_lowers_the_loss_and_writes_a_model_that_loads(tiny_scan, tmp_path):
    from ptychostream.files.scan import read_scan
    from ptychostream.model.infer import open_model
    from ptychostream.model.info import load_model_file

    out = tmp_path / "u.onnx"
    args = parser().parse_args([
        "train", str(out), "--scan", str(tiny_scan), "--supervised-weight", "0", "--physics-weight", "1",
        "--overlap-weight", "0.5", "--size", str(S), "--depth", "2", "--base-channels", "4", "--output-size", "16",
        "--epochs", "12", "--batch", "8", "--lr", "4e-3", "--threads", "1", "--val", "16", "--scale", "sqrt",
        "--normalise", "mean", "-q"])
    assert args.func(args) == 0
    info = load_model_file(out)
    summary = info.training
    assert summary["physics"]["physics_weight"] == 1.0 and "Poisson deviance" in summary["loss"]
    first = summary["initial_val_loss"]["poisson"]
    final = summary["final_val_loss"]["poisson"]
    assert final < 0.7 * first, (first, final)
    # the exported model serves, and its patches explain the frames better than a flat object does
    scan = read_scan(tiny_scan)
    frames = scan.canonical_frames()
    pre = info.preprocess
    loss = PoissonLoss(scan.probe, pre, 16)
    counts = torch.from_numpy(loss.counts(frames, pre))
    with open_model(out, backend="ONNXRuntime-CPU", threads=1) as m:
        res = m.run(frames)
    amp, phase = (torch.from_numpy(np.asarray(res[k], dtype=np.float32).reshape(len(frames), 16, 16))
                  for k in ("amplitude", "phase"))
    patches = torch.polar(amp, phase)
    flat = torch.ones((len(frames), 16, 16), dtype=torch.complex64)
    assert float(loss.deviance(patches, counts)) < 0.7 * float(loss.deviance(flat, counts))


def test_physics_flags_without_a_scan_or_with_zero_weights_are_refused(tiny_scan, tmp_path):
    from ptychostream.train import TrainConfig, TrainError, train

    with pytest.raises(TrainError, match="--scan"):
        train(TrainConfig(output=str(tmp_path / "a.onnx"), physics_weight=1.0), progress=False)
    with pytest.raises(TrainError, match="physics-weight must be a number >= 0"):
        train(TrainConfig(output=str(tmp_path / "a.onnx"), scan=str(tiny_scan), supervised_weight=0.0,
                          physics_weight=-1.0, overlap_weight=1.0), progress=False)
    with pytest.raises(TrainError, match="physics-weight"):
        train(TrainConfig(output=str(tmp_path / "a.onnx"), scan=str(tiny_scan)), progress=False)


# --------------------------------------------------------------------------- the full detector frame
@pytest.mark.parametrize("flip_x,transpose,bin_", [(False, False, 1), (True, True, 2)])
def test_full_frame_loss_compares_every_detector_pixel_in_the_same_orientation(flip_x, transpose, bin_):
    """``frame="full"``: the counts are the whole stored frame brought to the canonical orientation (no crop,
    no bin), the loss's prediction lands on them, and the minimum at the truth stays."""
    modes = probe_modes()
    patches = structured_object(2)
    canonical = counts_of(modes, patches)
    stored = store_frames(canonical, flip_x=flip_x, transpose=transpose)  # corner origin
    pre = Preprocess(fftshift=True, flip_x=flip_x, transpose=transpose, crop_size=16, bin=bin_, scale="sqrt",
                     normalise="mean")
    loss = PoissonLoss(modes, pre, S, frame="full")
    counts = loss.counts(stored, pre)
    want = Preprocess(fftshift=True, flip_x=flip_x, transpose=transpose).apply(stored)
    assert counts.shape == (2, S, S) and loss.geometry.shape == (S, S)
    np.testing.assert_allclose(counts, want, rtol=1e-6)
    pred = loss.predicted(torch.from_numpy(patches)).numpy()
    ratio = counts.sum(axis=(1, 2)) / pred.sum(axis=(1, 2))
    np.testing.assert_allclose(pred * ratio[:, None, None], counts, rtol=1e-3, atol=1e-3 * float(counts.max()))
    assert float(loss.deviance(torch.from_numpy(patches), torch.from_numpy(counts))) < 1e-4
    # the finest detail (a checkerboard phase: its signal moves to the detector's edge) costs far more in
    # the full frame than in the central crop (compared at bin 1, per-pixel means of like pixels)
    if bin_ > 1:
        return
    fine = patches * np.exp(0.3j * ((np.indices((S, S)).sum(axis=0) % 2) * 2 - 1))[None]
    crop = PoissonLoss(modes, pre, S)
    d_full = float(loss.deviance(torch.from_numpy(fine), torch.from_numpy(counts)))
    d_crop = float(crop.deviance(torch.from_numpy(fine), torch.from_numpy(crop.counts(stored, pre))))
    assert d_full > 4 * max(d_crop, 1e-3), (d_full, d_crop)
    with pytest.raises(Exception, match="physics-frame"):
        PoissonLoss(modes, pre, S, frame="all")


# --------------------------------------------------------------------------- held-back frames, selection
def test_held_back_frames_never_join_a_batch_and_are_the_validation(tiny_scan):
    from ptychostream.files.scan import read_scan
    from ptychostream.train import TrainConfig
    from ptychostream.train.physics import FrameSource

    scan = read_scan(tiny_scan)
    frames = np.asarray(scan.canonical_frames(), dtype=np.float32)
    pre = Preprocess(scale="sqrt", normalise="mean")
    loss = PoissonLoss(scan.probe, pre, 16, pixel_m=scan.pixel_m())
    cfg = TrainConfig(val=8, size=S)
    w = np.ones((16, 16), np.float32)
    for positions in (np.asarray(scan.positions_m), None):
        fs = FrameSource(cfg, frames, positions, pre, loss, w, group=4, holdback=7)
        assert len(fs.held) == 7 and fs.describe()["held_back"] == 7
        seen = np.concatenate([fs.indices(k, 16) for k in range(200)])
        assert not np.isin(seen, fs.held).any()
        assert len(np.unique(seen)) == len(frames) - 7  # every other frame is drawn
        np.testing.assert_array_equal(fs.validation(8).x, fs.x[fs.held])
    with pytest.raises(Exception, match="hold back"):
        FrameSource(cfg, frames, None, pre, loss, w, group=4, holdback=len(frames))


def test_select_exports_the_best_checkpoint_by_the_held_back_figure(tiny_scan, tmp_path):
    from ptychostream.model.info import load_model_file
    from ptychostream.train import TrainConfig, TrainError, train

    kw = dict(scan=str(tiny_scan), supervised_weight=0.0, physics_weight=1.0, overlap_weight=0.5, size=S, depth=2,
              base_channels=4, output_size=16, batch=8, threads=1, val=8, lr=4e-3, physics_context="mosaic",
              context_every=4)
    out = tmp_path / "sel.onnx"
    summary = train(TrainConfig(output=str(out), epochs=8, select="poisson", select_frames=9, **kw),
                    progress=False, log=lambda s: None)
    sel = summary["checkpoint_selection"]
    assert sel["figure"] == "poisson" and sel["frames"] == 9 and summary["data"]["held_back"] == 9
    assert 0 <= sel["best_step"] <= sel["last_step"] and sel["best_value"] <= sel["last_value"]
    # the exported model is the selected one: its validation figure is the best one seen
    assert summary["final_val_loss"]["poisson"] == pytest.approx(sel["best_value"], rel=1e-4)
    assert load_model_file(out).training["checkpoint_selection"]["best_step"] == sel["best_step"]
    with pytest.raises(TrainError, match="--select overlap needs"):
        train(TrainConfig(output=str(out), epochs=1, select="overlap", **dict(kw, overlap_weight=0.0)),
              progress=False)
    with pytest.raises(TrainError, match="--select must be"):
        train(TrainConfig(output=str(out), epochs=1, select="best", **kw), progress=False)


def test_power_normalised_overlap_is_blind_to_the_amplitude_scale():
    """The deviance leaves the object's amplitude scale free; the plain overlap term falls with it, the
    power-normalised one does not (and the two agree at unit amplitude)."""
    modes = probe_modes(size=48)
    rng = np.random.default_rng(2)
    from scipy.ndimage import gaussian_filter

    obj = np.exp(1j * gaussian_filter(rng.uniform(-1, 1, (96, 96)), 1.5) * 3).astype(np.complex64)
    px = 1e-8
    pos = np.array([[0.0, 0.0], [3.0, 4.0], [-5.0, 2.0], [6.0, -6.0]]) * px
    p = extract_patches(obj, pos, px, 24)
    p = torch.from_numpy(p * np.exp(1j * rng.uniform(-0.3, 0.3, p.shape)).astype(np.complex64))  # disagree a little
    t = torch.from_numpy(pos)
    plain = PoissonLoss(modes, Preprocess(crop_size=24), 24, pixel_m=px)
    norm = PoissonLoss(modes, Preprocess(crop_size=24), 24, pixel_m=px, overlap_norm="power")
    a, b = float(plain.overlap(p, t)), float(norm.overlap(p, t))
    assert a > 0.01 and b == pytest.approx(a, rel=1e-3)
    assert float(plain.overlap(0.3 * p, t)) == pytest.approx(0.09 * a, rel=1e-3)
    assert float(norm.overlap(0.3 * p, t)) == pytest.approx(b, rel=1e-3)
    with pytest.raises(Exception, match="overlap-norm"):
        PoissonLoss(modes, Preprocess(crop_size=24), 24, overlap_norm="max")


def test_phase_anchor_is_the_squared_probe_weighted_mean_phase():
    modes = probe_modes()
    loss = PoissonLoss(modes, Preprocess(), 16)
    rng = np.random.default_rng(4)
    phase = torch.from_numpy(rng.uniform(-1, 1, (3, 16, 16)).astype(np.float32))
    w = loss.light
    centred = phase - ((phase * w).sum(dim=(-2, -1)) / w.sum())[:, None, None]
    assert float(loss.anchor(centred)) < 1e-10
    shifted = centred + torch.tensor([0.5, -1.0, 2.0])[:, None, None]
    assert float(loss.anchor(shifted)) == pytest.approx((0.25 + 1.0 + 4.0) / 3, rel=1e-5)


def test_wrap_penalty_sees_wrapped_levels_not_smooth_edges():
    """--wrap-weight: a two-level object whose upper level is wrapped by 2π costs a lot; the same
    object unwrapped, with its 2.8 rad edge spread over a few pixels as a network draws it, costs nothing."""
    from scipy.ndimage import gaussian_filter

    modes = probe_modes()
    loss = PoissonLoss(modes, Preprocess(), 16)
    levels = np.zeros((16, 16), np.float32)
    levels[:, 8:] = 2.8
    smooth = gaussian_filter(levels, 1.0).astype(np.float32) - 1.0  # -1 .. 1.8 rad, an edge of ~1 rad/px
    wrapped = np.where(smooth > 1.0, smooth - 2 * np.pi, smooth).astype(np.float32)
    assert float(loss.wraps(torch.from_numpy(smooth[None]))) == 0.0
    assert float(loss.wraps(torch.from_numpy(wrapped[None]))) > 0.1
