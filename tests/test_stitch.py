"""Stitcher: known-answer mosaics, order independence, sub-pixel splatting, bad input, scale."""

from __future__ import annotations

import time

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from ptychostream.mosaic.stitch import MosaicImage, Stitcher

PX = 10e-9  # 10 nm pixels
OBJ = 384
PATCH = 128


def smooth_phase(n: int = OBJ, seed: int = 3) -> np.ndarray:
    """Sum of Gaussians, within about +-1 rad, decaying to ~0 at the edges (periodic-smooth)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    ph = np.zeros((n, n))
    for _ in range(14):
        cy, cx = rng.uniform(0.25 * n, 0.75 * n, 2)
        s = rng.uniform(12, 30)
        ph += rng.uniform(-1, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return ph / max(1.0, np.abs(ph).max())


def extract(obj: np.ndarray, positions_m: np.ndarray, shape=(PATCH, PATCH)) -> np.ndarray:
    """Simulator convention: patch pixel (i, j) = object pixel (cy + i - h//2, cx + j - w//2),
    (cy, cx) = (H//2, W//2) + p / PX, fractional part applied by a Fourier shift."""
    H, W = obj.shape
    h, w = shape
    F = np.fft.fft2(obj)
    ky = np.fft.fftfreq(H)[:, None]
    kx = np.fft.fftfreq(W)[None, :]
    out = np.empty((len(positions_m), h, w))
    for k, (py, px) in enumerate(positions_m):
        cy = H // 2 + py / PX
        cx = W // 2 + px / PX
        iy, ix = int(np.floor(cy)), int(np.floor(cx))
        fy, fx = cy - iy, cx - ix
        # g(r) = f(r + f): multiply by exp(+2 pi i k f)
        shifted = np.fft.ifft2(F * np.exp(2j * np.pi * (ky * fy + kx * fx))).real
        out[k] = shifted[iy - h // 2: iy - h // 2 + h, ix - w // 2: ix - w // 2 + w]
    return out


def spiral(n: int, step_px: float, seed: int = 0) -> np.ndarray:
    k = np.arange(n)
    r = step_px * np.sqrt(k)
    th = np.deg2rad(137.508) * k
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(-0.5, 0.5, (n, 2))  # make every position fractional
    return (np.stack([r * np.sin(th), r * np.cos(th)], 1) + jitter) * PX


def truth_on_mosaic(obj: np.ndarray, m: MosaicImage) -> np.ndarray:
    """The object resampled on the mosaic grid (integer offset: exact)."""
    H, W = obj.shape
    r0 = H // 2 + int(round(m.origin_m[0] / PX))
    c0 = W // 2 + int(round(m.origin_m[1] / PX))
    h, w = m.phase.shape
    out = np.full((h, w), np.nan)
    ry0, ry1 = max(r0, 0), min(r0 + h, H)
    rx0, rx1 = max(c0, 0), min(c0 + w, W)
    out[ry0 - r0:ry1 - r0, rx0 - c0:rx1 - c0] = obj[ry0:ry1, rx0:rx1]
    return out


def masked_ssim(a: np.ndarray, b: np.ndarray, region: np.ndarray, data_range: float) -> float:
    _, smap = structural_similarity(a, b, data_range=data_range, full=True)
    return float(smap[region].mean())


@pytest.fixture(scope="module")
def scene():
    obj = smooth_phase()
    pos = spiral(90, step_px=12.0)
    patches = extract(obj, pos)
    return obj, pos, patches


def compare(obj, m: MosaicImage, min_cov=0.5):
    truth = truth_on_mosaic(obj, m)
    region = (m.coverage > min_cov) & np.isfinite(truth)
    assert region.sum() > 150 * 150
    t = np.where(region, truth, 0.0)
    est = np.where(region, m.phase, 0.0)
    est = est - (est[region].mean() - t[region].mean()) * region  # global offset
    rng = float(t[region].max() - t[region].min())
    return masked_ssim(est, t, region, rng), float(np.abs(est - t)[region].max()), region


def test_known_answer_no_offset(scene):
    obj, pos, patches = scene
    st = Stitcher(PX, (PATCH, PATCH), offset="none")
    assert st.add(patches, pos) == len(pos)
    m = st.mosaic()
    assert m.n_patches == len(pos) and st.counts["stitched"] == len(pos)
    ssim, maxerr, _ = compare(obj, m)
    assert ssim >= 0.99, ssim
    assert maxerr < 0.02, maxerr  # bilinear splat of a smooth object: near exact
    # origin is on the pixel grid anchored at the scan centre
    assert np.allclose(np.array(m.origin_m) / PX, np.round(np.array(m.origin_m) / PX))


def bandpass_phase(n: int = OBJ, seed: int = 5, lo: float = 1 / 48, hi: float = 1 / 8):
    """Band-passed noise (no structure on scales >= 48 px), tapered to 0 at the edges."""
    rng = np.random.default_rng(seed)
    k = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :])
    ph = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * ((k > lo) & (k < hi))).real
    yy, xx = np.mgrid[0:n, 0:n]
    ph *= np.clip((0.48 * n - np.hypot(yy - n / 2, xx - n / 2)) / (0.08 * n), 0, 1)
    return ph / np.abs(ph).max()


def test_known_answer_mean_offset():
    # "mean" removes each patch's own offset exactly; it is right for objects whose
    # structure is finer than the patch
    obj = bandpass_phase()
    pos = spiral(90, step_px=12.0)
    patches = extract(obj, pos)
    rng = np.random.default_rng(1)
    offs = rng.uniform(-2, 2, len(pos))[:, None, None]  # per-patch offsets, as from a network
    st = Stitcher(PX, (PATCH, PATCH), offset="mean")
    st.add(patches + offs, pos)
    ssim, _, _ = compare(obj, st.mosaic())
    assert ssim >= 0.95, ssim
    # the same offsets without reconciliation ruin the mosaic
    bad = Stitcher(PX, (PATCH, PATCH), offset="none")
    bad.add(patches + offs, pos)
    ssim_bad, _, _ = compare(obj, bad.mosaic())
    assert ssim_bad < 0.9, ssim_bad


def test_overlap_offset_keeps_low_frequencies(scene):
    # coarse object (features ~ patch size): "mean" high-passes it away, "overlap" does not
    obj, pos, patches = scene
    rng = np.random.default_rng(1)
    offs = rng.uniform(-2, 2, len(pos))[:, None, None]
    res = {}
    for mode in ("mean", "overlap"):
        st = Stitcher(PX, (PATCH, PATCH), offset=mode)
        for s in range(0, len(pos), 64):  # network-sized batches
            st.add(patches[s:s + 64] + offs[s:s + 64], pos[s:s + 64])
        res[mode] = compare(obj, st.mosaic())[0]
    assert res["overlap"] >= 0.95, res
    assert res["mean"] < res["overlap"] - 0.2, res


@pytest.mark.parametrize("window", ["hann", "gaussian", "flat", "tukey"])
def test_windows_known_answer(scene, window):
    obj, pos, patches = scene
    st = Stitcher(PX, (PATCH, PATCH), window=window, offset="none")
    st.add(patches, pos)
    ssim, _, _ = compare(obj, st.mosaic())
    assert ssim >= 0.98, (window, ssim)


def test_amplitude_known_answer(scene):
    obj, pos, patches = scene
    amp_obj = 0.8 + 0.1 * obj
    amps = extract(amp_obj, pos)
    st = Stitcher(PX, (PATCH, PATCH), offset="none")
    st.add(patches, pos, amplitude=amps)
    m = st.mosaic()
    assert m.amplitude is not None
    truth = truth_on_mosaic(amp_obj, m)
    region = (m.coverage > 0.5) & np.isfinite(truth)
    assert np.abs(m.amplitude - truth)[region].max() < 0.005


def test_order_and_batching_do_not_matter(scene):
    obj, pos, patches = scene
    a = Stitcher(PX, (PATCH, PATCH))
    a.add(patches, pos)
    ma = a.mosaic()
    rng = np.random.default_rng(7)
    perm = rng.permutation(len(pos))
    b = Stitcher(PX, (PATCH, PATCH))
    b.chunk = 5  # also exercises the internal chunking
    splits = [0, 1, 8, 9, 40, 77, len(pos)]
    for s0, s1 in zip(splits[:-1], splits[1:]):
        b.add(patches[perm[s0:s1]], pos[perm[s0:s1]])
    mb = b.mosaic()
    assert ma.phase.shape == mb.phase.shape and ma.origin_m == mb.origin_m
    scale = np.abs(ma.phase).max()
    np.testing.assert_allclose(mb.coverage, ma.coverage, rtol=1e-5, atol=1e-6)
    sel = ma.coverage > 0.01
    np.testing.assert_allclose(mb.phase[sel], ma.phase[sel], rtol=1e-5, atol=1e-5 * scale)


def test_growing_matches_fixed_extent(scene):
    obj, pos, patches = scene
    half = (OBJ // 2 - 2) * PX
    fixed = Stitcher(PX, (PATCH, PATCH), extent_m=(-half, half, -half, half), offset="none")
    grow = Stitcher(PX, (PATCH, PATCH), offset="none")
    # start in the middle of the spiral, grow outwards in small batches
    for s in range(0, len(pos), 6):
        fixed.add(patches[s:s + 6], pos[s:s + 6])
        grow.add(patches[s:s + 6], pos[s:s + 6])
    assert fixed.counts["rejected_range"] == 0 and grow.counts["rejected_range"] == 0
    mf, mg = fixed.mosaic(), grow.mosaic()
    assert mf.phase.shape == (2 * (OBJ // 2 - 2) + 1,) * 2
    dy = int(round((mg.origin_m[0] - mf.origin_m[0]) / PX))
    dx = int(round((mg.origin_m[1] - mf.origin_m[1]) / PX))
    # compare on the intersection of the two canvases
    hf, wf = mf.phase.shape
    hg, wg = mg.phase.shape
    y0, x0 = max(0, dy), max(0, dx)
    y1, x1 = min(hf, dy + hg), min(wf, dx + wg)
    assert (y1 - y0) > 300 and (x1 - x0) > 300
    f_sub = (slice(y0, y1), slice(x0, x1))
    g_sub = (slice(y0 - dy, y1 - dy), slice(x0 - dx, x1 - dx))
    np.testing.assert_allclose(mg.phase[g_sub], mf.phase[f_sub], rtol=1e-5, atol=1e-6)
    # coverage is normalised to the max of each canvas; compare the raw weights
    wgt_f, wgt_g = fixed._view(fixed.weight), grow._view(grow.weight)
    np.testing.assert_allclose(wgt_g[g_sub], wgt_f[f_sub], rtol=1e-5, atol=1e-6)
    # nothing was splatted outside the intersection on either canvas
    assert wgt_f.sum() == pytest.approx(wgt_f[f_sub].sum(), rel=1e-6)
    assert wgt_g.sum() == pytest.approx(wgt_g[g_sub].sum(), rel=1e-6)


def test_growing_reallocates_rarely_and_keeps_origin():
    st = Stitcher(PX, (16, 16), window="flat", offset="none")
    allocs = []
    for k in range(200):
        p = np.array([[0.0, k * 3.0 * PX]])
        st.add(np.full((1, 16, 16), float(k)), p)
        if not allocs or allocs[-1] != st.num_phase.shape:
            allocs.append(st.num_phase.shape)
    assert len(allocs) <= 6, allocs  # amortised doubling
    m = st.mosaic()
    assert m.phase.shape == (17, 199 * 3 + 17)
    # pixel at global x = 0: covered by patch 0 only (pixels x = -8..8); patch 1 starts at -5
    col = int(round((0.0 - m.origin_m[1]) / PX))
    row = int(round((0.0 - m.origin_m[0]) / PX))
    assert m.origin_m == (-8 * PX, -8 * PX)
    last = int(round((199 * 3 * PX + 7 * PX - m.origin_m[1]) / PX))
    assert m.phase[row, last] == pytest.approx(199.0)
    assert m.phase[row, col - 8] == pytest.approx(0.0)


def test_integer_position_is_exact_copy():
    rng = np.random.default_rng(0)
    patch = rng.standard_normal((1, 10, 12)).astype(np.float32)
    st = Stitcher(PX, (10, 12), window="flat", offset="none")
    st.add(patch, np.array([[3 * PX, -2 * PX]]))
    m = st.mosaic()
    # patch pixel (i, j) is at global (3 + i - 5, -2 + j - 6)
    assert m.origin_m == pytest.approx((-2 * PX, -8 * PX))
    np.testing.assert_array_equal(m.phase[:10, :12], patch[0])
    assert m.mask[:10, :12].all()


def test_delta_at_fractional_position_splats_bilinearly():
    patch = np.zeros((1, 8, 8))
    patch[0, 4, 4] = 1.0  # the centre pixel (h//2, w//2) sits exactly at the position
    big = np.ones((1, 8, 8))
    st = Stitcher(PX, (8, 8), extent_m=(-10 * PX, 10 * PX, -10 * PX, 10 * PX),
                  window="flat", offset="none")
    pos = np.array([[0.25 * PX, 0.5 * PX]])
    st.add(big, pos)  # uniform weight under the delta
    st.reset()
    st.add(patch, pos)
    num = st._view(st.num_phase)
    r0 = int(round(-st.origin_m[0] / PX))
    c0 = int(round(-st.origin_m[1] / PX))
    np.testing.assert_allclose(num[r0:r0 + 2, c0:c0 + 2], [[0.375, 0.375], [0.125, 0.125]],
                               atol=1e-7)
    assert num.sum() == pytest.approx(1.0, abs=1e-6)
    # weight of a flat window: bilinear corners of the footprint, interior exactly 1
    w = st._view(st.weight)
    assert w.sum() == pytest.approx(64.0, abs=1e-4)
    assert w[r0, c0] == pytest.approx(1.0)
    m = st.mosaic()
    assert m.phase[r0, c0] == pytest.approx(0.375)
    assert m.phase[r0 + 1, c0 + 1] == pytest.approx(0.125)


def test_half_pixel_equals_average_of_neighbours():
    rng = np.random.default_rng(2)
    patch = rng.standard_normal((1, 16, 16))
    kw = dict(extent_m=(-20 * PX, 20 * PX, -20 * PX, 20 * PX), window="flat", offset="none")
    a = Stitcher(PX, (16, 16), **kw)
    a.add(patch, np.array([[0.0, 0.5 * PX]]))
    b = Stitcher(PX, (16, 16), **kw)
    b.add(np.concatenate([patch, patch]), np.array([[0.0, 0.0], [0.0, 1.0 * PX]]))
    np.testing.assert_allclose(a._view(a.num_phase) * 2, b._view(b.num_phase), atol=1e-6)
    np.testing.assert_allclose(a._view(a.weight) * 2, b._view(b.weight), atol=1e-6)
    np.testing.assert_allclose(a.mosaic().phase, b.mosaic().phase, atol=1e-6)


def test_bad_positions_counted_and_skipped():
    st = Stitcher(PX, (16, 16), extent_m=(-50 * PX, 50 * PX, -50 * PX, 50 * PX))
    patches = np.ones((6, 16, 16))
    patches[5, 3, 3] = np.nan  # bad data
    pos = np.array([[0, 0], [np.nan, 0], [0, np.inf], [1.0, 0], [0, 51 * PX], [0, 0]])
    n = st.add(patches, pos)
    assert n == 1
    assert st.counts == {"stitched": 1, "rejected_nan": 3, "rejected_range": 2}
    assert "range" in st.last_error
    m = st.mosaic()
    assert np.isfinite(m.phase).all() and np.isfinite(m.coverage).all()
    # edge patch: centre inside, overhang dropped
    assert st.add(patches[:1], np.array([[50 * PX, -50 * PX]])) == 1


def test_growing_canvas_cap():
    st = Stitcher(PX, (16, 16), max_canvas_px=100, offset="none")
    pos = np.array([[0, 0], [0, 60 * PX], [0, 200 * PX], [0, -20 * PX], [1e3, 0]])
    n = st.add(np.ones((5, 16, 16)), pos)
    assert n == 3
    assert st.counts["rejected_range"] == 2
    assert max(st.num_phase.shape) <= 100
    assert max(st.mosaic().phase.shape) <= 100


def test_mixed_amplitude_batches():
    st = Stitcher(PX, (8, 8), window="flat", offset="none")
    st.add(np.ones((1, 8, 8)), np.zeros((1, 2)), amplitude=np.full((1, 8, 8), 0.5))
    st.add(np.ones((1, 8, 8)), np.array([[0, 4 * PX]]))  # no amplitude
    st.add(np.ones((1, 8, 8)), np.array([[0, 8 * PX]]), amplitude=np.full((1, 8, 8), 0.7))
    m = st.mosaic()
    assert m.amplitude is not None
    row = 4
    # origin x = -4 px; patch 1 covers global x -4..3, patch 3 covers 4..11
    assert m.origin_m[1] == pytest.approx(-4 * PX)
    assert m.amplitude[row, 2] == pytest.approx(0.5)   # global x = -2
    assert m.amplitude[row, 14] == pytest.approx(0.7)  # global x = 10
    assert m.phase[row, 8] == pytest.approx(1.0)


def test_flashlight_geometry():
    st = Stitcher(PX, (16, 16), extent_m=(-40 * PX, 40 * PX, -40 * PX, 40 * PX),
                  window="flat", offset="none")
    patch = np.arange(256, dtype=float).reshape(16, 16)
    st.add(patch[None], np.array([[10 * PX, -5 * PX]]))
    img = st.flashlight(patch, (10 * PX, -5 * PX))
    m = st.mosaic()
    assert img.shape == m.phase.shape
    ok = np.isfinite(img)
    assert ok.sum() == 256
    np.testing.assert_allclose(img[ok], m.phase[ok], atol=1e-4)
    assert np.isnan(img[0, 0])
    g = Stitcher(PX, (16, 16))
    assert g.flashlight(patch, (0.0, 0.0)).shape == (17, 17)


def test_reset_and_empty():
    st = Stitcher(PX, (16, 16))
    m = st.mosaic()
    assert m.phase.shape == (0, 0) and m.n_patches == 0
    st.add(np.ones((2, 16, 16)), np.zeros((2, 2)))
    st.reset()
    assert st.counts["stitched"] == 0 and st.mosaic().n_patches == 0
    with pytest.raises(ValueError):
        st.add(np.ones((2, 8, 8)), np.zeros((2, 2)))


def test_large_fixed_canvas_is_fast_and_bounded():
    side = 4096
    half = (side // 2 - 1) * PX
    st = Stitcher(PX, (PATCH, PATCH), extent_m=(-half, half, -half, half))
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((64, PATCH, PATCH)).astype(np.float32)
    n = 2000
    k = np.arange(n)
    r = np.sqrt(k / n) * (half - 70 * PX)
    th = np.deg2rad(137.508) * k
    pos = np.stack([r * np.sin(th), r * np.cos(th)], 1)
    t0 = time.perf_counter()
    for s in range(0, n, 64):
        st.add(patches[: len(pos[s:s + 64])], pos[s:s + 64])
    dt = time.perf_counter() - t0
    assert st.counts["stitched"] == n
    assert dt < 8.0, f"{n / dt:.0f} patches/s"
    m = st.mosaic(reuse=True)
    assert m.phase.shape == (side - 1, side - 1)
    assert np.isfinite(m.phase).all()
    # memory: the canvas planes plus scratch for one chunk, nothing per frame
    canvas = st.num_phase.nbytes + st.weight.nbytes
    scratch = sum(b.nbytes for b in st._ws.values())
    assert canvas < 2 * 4 * (side + 140) ** 2
    assert scratch < 64 * 1024 * 1024
    m2 = st.mosaic(reuse=True)
    m3 = st.mosaic(reuse=True)
    assert m3.phase is m.phase and m2.phase is not m.phase  # two alternating buffers


def test_flashlight_overlap_matches_mosaic(scene):
    obj, pos, patches = scene
    st = Stitcher(PX, (PATCH, PATCH), offset="overlap")
    st.add(patches, pos)
    m = st.mosaic()
    img = st.flashlight(patches[40] + 1.5, pos[40])  # arbitrary offset of the latest patch
    assert img.shape == m.phase.shape
    sel = np.isfinite(img) & (m.coverage > 0.5)
    assert sel.sum() > 5000
    assert np.abs(img[sel] - m.phase[sel]).max() < 0.05


# ---------------------------------------------------------------- batch splatting, display view

def test_batch_splat_matches_patch_by_patch(scene):
    """A batch stitched at once (whole-batch windows and folds, slice-adds) gives the sums that
    stitching its patches one at a time gives, in every offset mode, with amplitude."""
    _, pos, patches = scene
    ph = patches.astype(np.float32)
    amp = (1.0 + 0.1 * ph).astype(np.float32)
    for mode in ("none", "mean"):  # "overlap" depends on the step, not the batch: see below
        a, b = Stitcher(PX, (PATCH, PATCH), offset=mode), Stitcher(PX, (PATCH, PATCH), offset=mode)
        a.add(ph, pos, amp)
        for k in range(len(pos)):
            b.add(ph[k], pos[k], amp[k])
        ma, mb = a.mosaic(), b.mosaic()
        assert np.array_equal(ma.phase, mb.phase) and np.array_equal(ma.amplitude, mb.amplitude), mode
    # overlap: one step of overlap_chunk patches equals one add() of those patches
    a, b = Stitcher(PX, (PATCH, PATCH), offset="overlap"), Stitcher(PX, (PATCH, PATCH), offset="overlap")
    a.add(ph, pos)
    step = a.overlap_chunk
    for k in range(0, len(pos), step):
        b.add(ph[k:k + step], pos[k:k + step])
    assert np.array_equal(a.mosaic().phase, b.mosaic().phase)
    assert not np.array_equal(a.num_phase, 0)


def _random_batches(st: Stitcher, rng: np.random.Generator, k: int) -> None:
    n = 5
    pos = (rng.random((n, 2)) - 0.4) * 200 * PX
    amp = rng.random((n, 16, 16)).astype(np.float32) if k % 3 else None  # mixed: weight_amp appears
    st.add(rng.standard_normal((n, 16, 16)).astype(np.float32), pos, amp)


@pytest.mark.parametrize("extent", [None, (-100 * PX, 150 * PX, -80 * PX, 120 * PX)])
@pytest.mark.parametrize("mode", ["mean", "overlap"])
def test_display_view_unbinned_is_the_mosaic(extent, mode):
    """DisplayView with no binning (max_side 0, or a mosaic that fits) is mosaic() exactly, updated
    only where patches landed, on a growing canvas (which moves and reallocates) and a fixed one."""
    from ptychostream.mosaic.display import DisplayView

    rng = np.random.default_rng(1)
    st = Stitcher(PX, (16, 16), extent_m=extent, offset=mode)
    full, fits = DisplayView(0), DisplayView(4096)
    for k in range(15):
        _random_batches(st, rng, k)
        m = st.mosaic()
        pos = (rng.random(2) - 0.4) * 200 * PX
        for view in (full, fits):
            d = view.image(st)
            assert d.binning == 1 and d.origin_m == m.origin_m and d.pixel_m == m.pixel_m
            for name in ("phase", "coverage", "mask", "amplitude"):
                assert np.array_equal(getattr(d, name), getattr(m, name)), (k, name)
            light = view.flashlight(st, np.ones((16, 16), np.float32), pos)
            assert np.array_equal(light, st.flashlight(np.ones((16, 16), np.float32), pos), equal_nan=True)


@pytest.mark.parametrize("extent", [None, (-100 * PX, 150 * PX, -80 * PX, 120 * PX)])
def test_display_view_binned_incrementally_equals_binned_from_scratch(extent):
    """Binned, the view kept up to date batch by batch equals a view built from the final planes,
    and each binned pixel is the weight average of its canvas pixels: sum(num) / sum(weight)."""
    from ptychostream.mosaic.display import DisplayView, binning_for

    rng = np.random.default_rng(2)
    st = Stitcher(PX, (16, 16), extent_m=extent, offset="mean")
    live = DisplayView(40)
    for k in range(15):
        _random_batches(st, rng, k)
        d = live.image(st)
        fresh = DisplayView(40).image(st)
        assert d.binning == fresh.binning == binning_for(st.canvas_shape, 40) > 1
        assert max(d.shape) <= 40 and d.origin_m == fresh.origin_m
        np.testing.assert_allclose(d.phase, fresh.phase, atol=1e-5)
        assert (d.amplitude is None) == (fresh.amplitude is None) == (k == 0)
        if d.amplitude is not None:
            np.testing.assert_allclose(d.amplitude, fresh.amplitude, atol=1e-5)
        assert np.array_equal(d.mask, fresh.mask)
    b = d.binning
    y0, _, x0, _ = st.exposed_box
    by, bx = np.argwhere(d.mask & (d.coverage > 0.5))[0]  # a well-covered bin
    gy, gx = (y0 // b + by) * b, (x0 // b + bx) * b  # its first canvas pixel (global)
    num, wt, _, _, _ = st.planes((max(gy, y0), gy + b, max(gx, x0), gx + b))
    assert d.phase[by, bx] == pytest.approx(float(num.sum()) / float(wt.sum()), rel=1e-4)
    assert d.pixel_m == pytest.approx(b * PX)


def test_take_dirty_is_per_reader_and_starts_with_everything():
    st = Stitcher(PX, (16, 16), offset="none")
    st.add(np.ones((1, 16, 16), np.float32), np.zeros((1, 2)))
    first = st.take_dirty("a")
    assert first == st.exposed_box  # a new reader sees the whole mosaic
    assert st.take_dirty("a") is None
    st.add(np.ones((1, 16, 16), np.float32), np.array([[40 * PX, 0.0]]))
    assert st.take_dirty("b") == st.exposed_box
    box = st.take_dirty("a")
    assert box is not None and box[0] == 40 - 8 and box[1] == 40 - 8 + 17 and st.take_dirty("a") is None
    st.reset()
    assert st.take_dirty("a") == st.exposed_box == (0, 0, 0, 0)


def test_add_values_is_add_of_constant_patches():
    """add_values(v, pos) splats what add() of patches full of v splats (the weights times v),
    rejects non-finite values like non-finite data, and needs offset="none"."""
    rng = np.random.default_rng(4)
    pos = (rng.random((12, 2)) - 0.5) * 60 * PX
    v = rng.random(12).astype(np.float32) + 1
    v[3] = np.nan
    a, b = Stitcher(PX, (16, 16), offset="none"), Stitcher(PX, (16, 16), offset="none")
    b.compiled = False  # numpy's splat, whose weights are those of add_values bit for bit
    c = Stitcher(PX, (16, 16), offset="none")  # the compiled one where numba serves: within rounding
    assert a.add_values(v, pos) == 11 and a.counts["rejected_nan"] == 1
    for s in (b, c):
        assert s.add(np.broadcast_to(v[:, None, None], (12, 16, 16)), pos) == 11
        np.testing.assert_allclose(a.num_phase, s.num_phase, rtol=1e-5, atol=1e-6)
        assert a.exposed_box == s.exposed_box
    assert np.array_equal(a.weight, b.weight)
    np.testing.assert_allclose(a.weight, c.weight, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="offset='none'"):
        Stitcher(PX, (16, 16)).add_values(v, pos)


def test_display_view_update_touches_only_where_patches_landed(monkeypatch):
    """After a patch lands on a large canvas, the view re-bins only the bins under its footprint,
    so keeping the display image costs what the patch covers, not what the canvas holds."""
    from ptychostream.mosaic import display

    seen: list[int] = []
    real = display._bin_sums
    monkeypatch.setattr(display, "_bin_sums", lambda a, start, b, out: (seen.append(a.size), real(a, start, b, out)))
    half = 1000 * PX
    st = Stitcher(PX, (64, 64), extent_m=(-half, half, -half, half), offset="none")  # 2001 x 2001
    view = display.DisplayView(256)
    st.add(np.ones((1, 64, 64), np.float32), np.zeros((1, 2)))
    first = view.image(st)
    assert first.binning == 8 and first.shape == (251, 251) and sum(seen) >= 2001 * 2001  # built once, whole
    seen.clear()
    st.add(np.ones((1, 64, 64), np.float32), np.array([[300 * PX, -200 * PX]]))
    view.image(st)
    assert 0 < max(seen) <= (65 + 2 * 8) ** 2  # one footprint and its edge bins, per plane
    seen.clear()
    view.image(st)  # nothing new: nothing re-binned
    assert seen == []
