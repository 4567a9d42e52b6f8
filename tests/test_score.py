"""Scoring: known answers for SSIM/PSNR/FRC, registration, offset and ramp removal, file I/O, CLI."""

from __future__ import annotations

import argparse
import json
import math

import h5py
import numpy as np
import pytest
from scipy.ndimage import shift as nd_shift

from ptychostream.files.mosaic import write_mosaic_npz
from ptychostream.files.product import Product, write_product_h5
from ptychostream.quality.cli import add_score_parser
from ptychostream.quality.score import (
    ScoreError,
    frc,
    half_bit_threshold,
    illumination_mask,
    load_mosaic,
    place_truth,
    remove_plane,
    score_files,
    score_phase,
)
from ptychostream.sim import (
    Geometry,
    Simulator,
    make_object,
    make_probe,
    write_truth_h5,
)


def truth_image(n: int = 160, seed: int = 1) -> np.ndarray:
    return np.angle(make_object("etched", (n, n), seed=seed)).astype(np.float64)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ptychostream")
    sub = ap.add_subparsers(dest="command", required=True)
    add_score_parser(sub)
    return ap


def test_identical_images_score_perfectly():
    t = truth_image()
    res = score_phase(t.copy(), t)
    assert res["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert math.isinf(res["psnr"])
    assert res["frc_auc"] == pytest.approx(1.0, abs=1e-6)
    assert res["frc_half_bit"] == 0.5  # never crosses: 0.5 cycles/px = Nyquist
    assert res["shift"] == (0.0, 0.0)
    assert res["data_range"] == pytest.approx(np.ptp(t))


def test_shifted_offset_ramped_copy_still_scores_about_one():
    t = truth_image()
    n = t.shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    moved = nd_shift(t, (2.3, -1.6), order=3, mode="grid-wrap")
    recon = moved + 0.8 + 0.01 * yy - 0.015 * xx
    mask = np.zeros_like(t, dtype=bool)
    mask[12:-12, 12:-12] = True
    raw = score_phase(recon, t, mask, register=False)
    res = score_phase(recon, t, mask)
    assert res["shift"][0] == pytest.approx(-2.3, abs=0.1)
    assert res["shift"][1] == pytest.approx(1.6, abs=0.1)
    assert res["ssim"] > 0.95
    assert res["psnr"] > 25
    assert res["frc_auc"] > 0.9
    assert raw["ssim"] < res["ssim"] - 0.2  # without registration the same copy scores far worse


def test_remove_plane_known_answer_and_wrapping():
    t = truth_image(64)
    n = t.shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    recon = t + 3.0 + 0.5 * (yy - n / 2) / n - 0.25 * (xx - n / 2) / n
    recon = (recon + np.pi) % (2 * np.pi) - np.pi  # wrapped, as a phase image may be
    fixed, coef = remove_plane(recon, t, np.ones_like(t, dtype=bool))
    np.testing.assert_allclose(fixed, t, atol=1e-9)
    assert coef[1] == pytest.approx(0.5, abs=1e-6) and coef[2] == pytest.approx(-0.25, abs=1e-6)


def test_frc_signal_against_noise():
    t = truth_image(128)
    rng = np.random.default_rng(0)
    f, c, _thr = frc(t, t + 0.01 * rng.standard_normal(t.shape))
    assert f[0] == 0 and f[-1] == pytest.approx(0.5)
    assert np.all(c[1:] > 0.85) and c[1:20].min() > 0.99
    a, b = rng.standard_normal((2, 128, 128))
    _, c2, _thr2 = frc(a, b)
    assert abs(c2[1:].mean()) < 0.05  # independent noise does not correlate
    res = score_phase(0.3 * a, 0.3 * b)  # phase-like noise (differences well within ±π)
    assert abs(res["frc_auc"]) < 0.1
    assert res["frc_half_bit"] < 0.1  # falls below the 1/2-bit threshold at once
    assert res["ssim"] < 0.1
    # the threshold falls towards 0.1716 for large rings
    assert half_bit_threshold(np.array([1e9]))[0] == pytest.approx(0.2071 / 1.2071, abs=1e-3)


def test_bad_inputs():
    t = truth_image(64)
    with pytest.raises(ScoreError, match="one shape"):
        score_phase(t[:, :32], t)
    with pytest.raises(ScoreError, match="usable pixels"):
        score_phase(t, t, np.zeros_like(t, dtype=bool))
    with pytest.raises(ScoreError, match="mask shape"):
        score_phase(t, t, np.ones((3, 3), dtype=bool))


# --------------------------------------------------------------------------- files and CLI
@pytest.fixture(scope="module")
def truth_file(tmp_path_factory):
    g = Geometry(size=32)
    probe = make_probe("gaussian", 32, g.pixel_m, fwhm_px=10)
    pos = np.array([[0.0, 0.0], [4 * g.pixel_m, -3 * g.pixel_m], [-5 * g.pixel_m, 6 * g.pixel_m]])
    obj = make_object("etched", (96, 96), seed=4)
    sim = Simulator(obj, probe, pos, g, photons=1e4)
    path = tmp_path_factory.mktemp("score") / "truth.h5"
    write_truth_h5(path, sim)
    return path, sim


def test_place_truth_grid_convention(truth_file):
    _, sim = truth_file
    px = sim.object_pixel_m
    obj = sim.obj
    # canvas pixel (0, 0) at object pixel (10, 20): origin = ((10 - 48)·p, (20 - 48)·p)
    ph, inside = place_truth(obj, px, (30, 40), ((10 - 48) * px, (20 - 48) * px), px)
    np.testing.assert_allclose(ph, np.angle(obj[10:40, 20:60]))
    assert inside.all()
    # off the object: NaN, not inside
    ph2, inside2 = place_truth(obj, px, (10, 10), ((90 - 48) * px, 0.0), px)
    assert not inside2[6:].any() and np.isnan(ph2[6:]).all()


def test_illumination_mask_covers_the_scan(truth_file):
    _, sim = truth_file
    px = sim.object_pixel_m
    m = illumination_mask(sim.probe, sim.positions_m, px, (96, 96), (-48 * px, -48 * px), 0.5)
    assert m[48, 48] and not m[0, 0]


def test_score_files_and_cli(truth_file, tmp_path, capsys):
    path, sim = truth_file
    px = sim.object_pixel_m
    phase = np.angle(sim.obj[20:76, 16:80]).astype(np.float32) + 0.3
    origin = ((20 - 48) * px, (16 - 48) * px)
    npz = tmp_path / "mosaic.npz"
    np.savez(npz, phase=phase, origin_m=np.array(origin), pixel_m=px, coverage=np.ones_like(phase))
    res = score_files(npz, path, illumination=None)
    assert res["ssim"] == pytest.approx(1.0, abs=1e-6) and res["pixels"] == phase.size
    # the recorder's layout: /entry/mosaic with pixel_size_m and origin_{y,x}_m
    rec = tmp_path / "record.h5"
    with h5py.File(rec, "w") as h5:
        g = h5.create_group("entry/mosaic")
        g["phase"] = phase
        g["coverage"] = np.ones_like(phase)
        g.attrs.update(pixel_size_m=px, origin_y_m=origin[0], origin_x_m=origin[1])
    assert load_mosaic(rec).origin_m == pytest.approx(origin)
    ap = parser()
    args = ap.parse_args(["score", str(rec), str(path), "--json", "--illumination", "0"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ssim"] == pytest.approx(1.0, abs=1e-6)
    # a bare .npy on the object's own grid
    npy = tmp_path / "m.npy"
    np.save(npy, np.angle(sim.obj))
    assert score_files(npy, path)["ssim"] == pytest.approx(1.0, abs=1e-6)
    # bad input: exit status 2 and one line
    args = ap.parse_args(["score", str(tmp_path / "missing.h5"), str(path)])
    assert args.func(args) == 2
    assert "mosaic file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, nothing=np.zeros(3))
    with pytest.raises(ScoreError, match="no 'phase' array"):
        score_files(bad, path)


def test_help_lists_options():
    text = parser().parse_args.__self__._subparsers._group_actions[0].choices["score"].format_help()
    for opt in ("--mask", "--coverage", "--illumination", "--origin-m", "--json", "--model", "--reference",
                "--region", "--band", "--frc-threshold"):
        assert opt in text


def test_cli_against_an_iterative_reference(tmp_path, capsys):
    """End to end: a mosaic NPZ against a product HDF5 (write_product_h5), with a held-out region."""
    px = 10e-9
    obj = make_object("dead_leaves", (128, 128), seed=5)
    probe = make_probe("gaussian", 32, px, fwhm_px=10)
    g = np.arange(-40, 41, 8) * px
    pos = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    product = tmp_path / "product.h5"
    with h5py.File(product, "w") as h5:
        write_product_h5(h5, Product(obj, px, (0.0, 0.0), probe=probe, positions_m=pos))
    # the "network" mosaic: a crop of the object, shifted by a pixel fraction, offset, ramped, wrapped
    _yy, xx = np.mgrid[0:100, 0:96]
    phase = nd_shift(np.angle(obj[14:114, 16:112]), (0.4, -0.3), order=3, mode="nearest")
    phase = (phase + 2.5 + 0.02 * xx + np.pi) % (2 * np.pi) - np.pi
    origin = ((14 - 64) * px, (16 - 64) * px)
    mosaic = tmp_path / "mosaic.npz"
    write_mosaic_npz(mosaic, phase, np.ones_like(phase), None, origin, px)
    ap = parser()
    out = tmp_path / "scores.json"
    region = ["0", str(40 * px), str(-40 * px), str(40 * px)]  # the bottom half of the scan
    args = ap.parse_args(["score", str(mosaic), "--reference", str(product), "--region", *region, "--json", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "band-pass r" in text and "FRC resolution" in text and "region y" in text
    res = json.loads(out.read_text())
    assert res["ssim"] > 0.95 and res["bandpass_corr"] > 0.95 and res["frc_auc"] > 0.9
    assert res["shift_px"] == pytest.approx([-0.4, 0.3], abs=0.1)
    assert res["ramp"][2] == pytest.approx(0.02, abs=2e-3)
    assert 1000 < res["n_pixels"] < 0.6 * phase.size and res["pixel_m"] == pytest.approx(px)
    assert len(res["frc"]["freq"]) == len(res["frc"]["curve"]) > 10
    # --json alone prints the JSON object; the whole scan compares more pixels
    args = ap.parse_args(["score", str(mosaic), "--reference", str(product), "--json"])
    assert args.func(args) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["n_pixels"] > 1.5 * res["n_pixels"] and whole["ssim"] > 0.95 and "frc" not in whole
    # an unrelated mosaic scores low
    other = tmp_path / "other.npz"
    write_mosaic_npz(other, np.angle(make_object("dead_leaves", (100, 96), seed=9)), None, None, origin, px)
    args = ap.parse_args(["score", str(other), "--reference", str(product), "--json"])
    assert args.func(args) == 0
    low = json.loads(capsys.readouterr().out)
    assert low["bandpass_corr"] < 0.2 and low["ssim"] < 0.2
    # bad input: exit status 2 and one line naming the problem
    for argv, message in (([str(mosaic), "--reference", str(tmp_path / "none.h5")], "product file not found"),
                          ([str(mosaic), "truth.h5", "--reference", str(product)], "not both"),
                          ([str(mosaic), "--reference", str(product), "--region", "1", "2", "1", "2"],
                           "pixels are valid")):
        args = ap.parse_args(["score", *argv])
        assert args.func(args) == 2
        assert message in capsys.readouterr().err
