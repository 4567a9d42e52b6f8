"""Scoring against an iterative reference: registration, wrap-safe ramps, SSIM, band-pass, FRC, grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.ndimage import shift as nd_shift

from ptychostream.files.product import Product
from ptychostream.quality.grid import centre_origin, overlap_grid, resample
from ptychostream.quality.metrics import ScoreError
from ptychostream.quality.reference import (
    bandpass,
    bandpass_correlation,
    compare_to_reference,
    dog_sigmas,
    phase_ramp,
    scanned_region,
    score_against_product,
)
from ptychostream.sim import make_object, make_probe

N = 144


def textured(n: int = N, seed: int = 1) -> np.ndarray:
    """A phase image with features at every scale (dead leaves), in [-1, 1] rad."""
    return np.angle(make_object("dead_leaves", (n, n), seed=seed)).astype(np.float64)


def wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def coords(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    return yy - (n - 1) / 2, xx - (n - 1) / 2


def test_identical_images_score_one():
    b = textured()
    r = compare_to_reference(b.copy(), b)
    assert r.ssim == pytest.approx(1.0, abs=1e-9)
    assert r.bandpass_corr == pytest.approx(1.0, abs=1e-9)
    assert r.frc_auc == pytest.approx(1.0, abs=1e-6)
    assert r.frc_resolution_px == 2.0  # never crosses the threshold: Nyquist
    assert r.shift_px == (0.0, 0.0) and r.registered
    assert np.allclose(r.ramp, 0.0, atol=1e-12)
    assert r.n_pixels == N * N
    assert r.data_range == pytest.approx(np.percentile(b, 99) - np.percentile(b, 1))
    d = r.as_dict()
    assert d["shift_px"] == [0.0, 0.0] and len(d["frc"]["curve"]) == len(r.frc[0])


@pytest.mark.parametrize("gy, gx", [(0.02, -0.015), (0.06, 0.045)])  # the second wraps ~2x across the image
def test_shifted_ramped_offset_noisy_copy(gy, gx):
    b = textured()
    yy, xx = coords()
    rng = np.random.default_rng(0)
    a = nd_shift(b, (2.3, -1.6), order=3, mode="grid-wrap") + 1.2 + gy * yy + gx * xx
    a = wrap(a + 0.03 * rng.standard_normal(b.shape))
    mask = np.zeros_like(b, dtype=bool)
    mask[10:-10, 10:-10] = True
    r = compare_to_reference(a, b, mask=mask)
    assert r.shift_px[0] == pytest.approx(-2.3, abs=0.1)
    assert r.shift_px[1] == pytest.approx(1.6, abs=0.1)
    assert r.ramp[1] == pytest.approx(gy, abs=1e-3) and r.ramp[2] == pytest.approx(gx, abs=1e-3)
    assert r.ssim > 0.9 and r.bandpass_corr > 0.9 and r.pearson > 0.9 and r.frc_auc > 0.8
    raw = compare_to_reference(a, b, mask=mask, register=False)
    assert raw.bandpass_corr < r.bandpass_corr - 0.3  # the registration is what makes it score


def test_unrelated_image_scores_low():
    b = textured(seed=1)
    u = textured(seed=7)
    r = compare_to_reference(u, b)
    assert r.ssim < 0.2 and r.bandpass_corr < 0.2 and r.frc_auc < 0.2 and abs(r.pearson) < 0.2
    assert r.frc_resolution_px > 20  # falls below the threshold in the first rings


def test_wrapped_phase_against_its_unwrapped_twin():
    yy, xx = coords()
    smooth = 2.5 * gaussian_filter(textured(), 2.0) / 0.3 + 4.0 * np.exp(-(yy**2 + xx**2) / (2 * 40.0**2))
    assert np.ptp(smooth) > 3 * np.pi and np.abs(np.diff(smooth, axis=0)).max() < np.pi
    wrapped = wrap(smooth)
    for image, ref in ((wrapped, smooth), (smooth, wrapped)):
        r = compare_to_reference(image, ref)
        assert r.ssim > 0.999 and r.bandpass_corr > 0.999 and r.frc_auc > 0.999
    assert compare_to_reference(smooth, wrapped).reference_unwrapped  # np.angle of a product wraps


def test_bandpass_transfer():
    lo_sigma, hi_sigma = dog_sigmas((2, 16))
    assert lo_sigma == pytest.approx(0.375, abs=1e-3) and hi_sigma == pytest.approx(3.0, abs=1e-2)
    n = 256
    x = np.arange(n)[None, :] + np.zeros((n, 1))

    def gain(period: float) -> float:
        s = np.sin(2 * np.pi * x / period)
        out = bandpass(s)[32:-32, 32:-32]
        return float(np.std(out) / np.std(s[32:-32, 32:-32]))

    assert gain(4) > 0.8 and gain(8) > 0.8  # inside the band
    assert 0.35 < gain(16) < 0.65  # the band edge: about half
    assert gain(64) < 0.1 and gain(256) < 0.05  # slow features are dropped
    assert np.allclose(bandpass(np.full((32, 32), 3.0)), 0.0)


def test_bandpass_ignores_low_frequencies_and_sees_band_features():
    b = textured()
    yy, xx = coords()
    rng = np.random.default_rng(2)
    bump = 3.0 * np.exp(-((yy - 20) ** 2 + (xx + 10) ** 2) / (2 * 45.0**2))  # not a plane: survives ramp removal
    r = compare_to_reference(b + bump, b)
    assert r.bandpass_corr > 0.95
    assert r.pearson < 0.8  # the plain correlation suffers from the slow difference
    # features of ~4 px with the reference's band power spoil the band-pass correlation
    noise = bandpass(rng.standard_normal(b.shape), band=(3, 6))
    noise *= np.std(bandpass(b)) / np.std(bandpass(noise))
    r2 = compare_to_reference(b + 2.0 * noise, b, register=False)
    assert r2.bandpass_corr < 0.6
    # and the direct helper (no alignment) agrees on the bump
    assert bandpass_correlation(b + bump, b) > 0.95


def test_bandpass_mask_edges_do_not_correlate():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, N, N))
    mask = np.zeros((N, N), dtype=bool)
    mask[30:110, 40:100] = True
    a[~mask] = 5.0  # outside the mask: a shared step that would correlate if it leaked in
    b[~mask] = 5.0
    assert abs(bandpass_correlation(a, b, mask)) < 0.05


def test_frc_identical_noisy_copies_and_independent_noise():
    rng = np.random.default_rng(4)
    signal = gaussian_filter(rng.standard_normal((128, 128)), 3.0)
    signal *= 0.5 / signal.std()
    noisy = signal + 0.1 * rng.standard_normal(signal.shape)
    same = compare_to_reference(noisy.copy(), noisy)
    assert same.frc_auc == pytest.approx(1.0, abs=1e-6) and same.frc_resolution_px == 2.0
    # two independent noise realisations: FRC high at low frequency, crossing where noise wins
    other = signal + 0.1 * rng.standard_normal(signal.shape)
    pair = compare_to_reference(other, noisy, register=False)
    _freq, curve, _ = pair.frc
    assert curve[1:6].min() > 0.9 and curve[-10:].mean() < 0.2
    assert 3.0 < pair.frc_resolution_px < 16.0
    seventh = compare_to_reference(other, noisy, register=False, threshold="1/7")
    assert seventh.frc_resolution_px <= pair.frc_resolution_px
    # pure independent noise: no correlation at any ring
    a, b = 0.3 * rng.standard_normal((2, 128, 128))
    indep = compare_to_reference(a, b, register=False)
    assert abs(indep.frc_auc) < 0.1 and indep.frc_resolution_px > 32


def test_phase_ramp_is_wrap_safe():
    yy, xx = coords(64)
    diff = 0.3 + 0.2 * yy - 0.1 * xx  # ~19 rad across: many wraps
    off, gy, gx = phase_ramp(wrap(diff), np.zeros((64, 64)), np.ones((64, 64), bool))
    assert (gy, gx) == pytest.approx((0.2, -0.1), abs=1e-9) and off == pytest.approx(0.3, abs=1e-9)


def test_bad_inputs():
    b = textured(64)
    with pytest.raises(ScoreError, match="one shape"):
        compare_to_reference(b[:, :32], b)
    with pytest.raises(ScoreError, match="real phase"):
        compare_to_reference(np.exp(1j * b), b)
    with pytest.raises(ScoreError, match="mask shape"):
        compare_to_reference(b, b, mask=np.ones((3, 3), bool))
    with pytest.raises(ScoreError, match="usable pixels"):
        compare_to_reference(b, b, mask=np.zeros_like(b, bool))
    with pytest.raises(ScoreError, match="band"):
        compare_to_reference(b, b, band=(16, 2))
    with pytest.raises(ScoreError, match="threshold"):
        compare_to_reference(b, b, threshold="1/2")


# --------------------------------------------------------------------------- grids and products
def test_overlap_grid_and_resample():
    fine = ((100, 80), (0.0, 0.0), 1.0)
    coarse = ((30, 30), (10.5, -5.5), 2.0)
    (h, w), (oy, ox), p = overlap_grid(fine, coarse)
    assert p == 2.0 and (oy, ox) == (10.5, 0.5) and (h, w) == (30, 27)  # y 10.5..68.5, x 0.5..52.5
    yy, xx = np.mgrid[0:100, 0:80].astype(np.float64)
    lin = 0.5 * yy - 0.25 * xx  # a linear image survives smoothing and bilinear resampling
    out, inside = resample(lin, (0.0, 0.0), 1.0, ((h, w), (oy, ox), p))
    ry, rx = oy + 2 * np.arange(h)[:, None], ox + 2 * np.arange(w)[None, :]
    inner = (slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(out[inner], (0.5 * ry - 0.25 * rx + 0 * out)[inner], atol=1e-9)
    assert inside.all()
    crop, _inside2 = resample(lin, (0.0, 0.0), 1.0, ((5, 5), (3.0, 4.0), 1.0))  # same pixel: taken as is
    np.testing.assert_array_equal(crop, lin[3:8, 4:9])
    with pytest.raises(ValueError, match="do not overlap"):
        overlap_grid(fine, ((5, 5), (500.0, 500.0), 1.0))


@pytest.fixture(scope="module")
def product() -> Product:
    p = 10e-9
    obj = make_object("dead_leaves", (160, 160), seed=3)
    g = np.arange(-48, 49, 8) * p
    pos = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2) + np.array([1e-7, -2e-7])
    return Product(obj, p, (1e-7, -2e-7), probe=make_probe("gaussian", 32, p, fwhm_px=10), positions_m=pos,
                   source="product.h5")


def test_score_against_product_on_another_pixel(product):
    p = product.pixel_m
    o = centre_origin(product.object.shape, p, product.center_m)
    coarse = product.object.reshape(80, 2, 80, 2).mean(axis=(1, 3))  # a mosaic at 2x the pixel
    yy, _xx = coords(80)
    mosaic = wrap(np.angle(coarse) + 2.0 + 0.03 * yy)
    r = score_against_product(mosaic, product, origin_m=(o[0] + p / 2, o[1] + p / 2), pixel_m=2 * p)
    assert r.pixel_m == pytest.approx(2 * p)
    assert r.ssim > 0.97 and r.bandpass_corr > 0.97 and r.frc_auc > 0.9
    assert max(abs(s) for s in r.shift_px) < 0.1
    assert "illumination" in r.mask and r.source == "image vs product.h5"
    scanned, _ = scanned_region(product)
    assert r.n_pixels == pytest.approx(scanned.sum() / 4, rel=0.1)
    # a held-out box in metres, and the same as a boolean image on the mosaic's grid
    box = (o[0], o[0] + 80 * p, o[1], o[1] + 160 * p)  # the top half of the object
    top = score_against_product(mosaic, product, origin_m=(o[0] + p / 2, o[1] + p / 2), pixel_m=2 * p, region=box)
    assert top.n_pixels == pytest.approx(r.n_pixels / 2, rel=0.1) and top.ssim > 0.97
    half = np.zeros((80, 80), dtype=bool)
    half[:40] = True
    top2 = score_against_product(mosaic, product, origin_m=(o[0] + p / 2, o[1] + p / 2), pixel_m=2 * p,
                                 region=half)
    assert top2.n_pixels == pytest.approx(top.n_pixels, rel=0.05)
    with pytest.raises(ScoreError, match="pixels are valid"):
        score_against_product(mosaic, product, origin_m=(o[0] + p / 2, o[1] + p / 2), pixel_m=2 * p,
                              region=(1.0, 2.0, 1.0, 2.0))
    with pytest.raises(ScoreError, match="no grid origin"):
        score_against_product(mosaic, product)


def test_scanned_region_without_probe(product):
    bare = Product(product.object, product.pixel_m, product.center_m, positions_m=product.positions_m)
    hull, how = scanned_region(bare)
    assert "positions" in how
    assert hull[80, 80] and not hull[5, 5]
    assert math.isclose(hull.sum(), 97 * 97, rel_tol=0.05)  # the square of positions, 96 px a side
    whole, how2 = scanned_region(Product(product.object, product.pixel_m, product.center_m))
    assert whole.all() and "whole" in how2
