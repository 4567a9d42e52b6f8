"""Physics and file-format tests of the simulator (ptychostream.sim)."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from ptychostream.sim import (
    DTYPES,
    OBJECT_KINDS,
    PROBE_KINDS,
    Geometry,
    Simulator,
    extract_patches,
    far_field,
    load_frames,
    load_object,
    load_probe,
    make_object,
    make_probe,
    read_truth_h5,
    scan_extent_px,
    scan_positions,
    unshifted,
    write_truth_h5,
)
from ptychostream.sim.objects import seven_segment_mask
from ptychostream.sim.scans import GOLDEN_ANGLE_DEG

SIZE = 64


@pytest.fixture(scope="module")
def geom() -> Geometry:
    return Geometry(energy_keV=10.0, distance_m=2.0, detector_pixel_m=75e-6, size=SIZE)


@pytest.fixture(scope="module")
def scene(geom: Geometry):
    pos = scan_positions("spiral", 3.3 * geom.pixel_m, 200)
    obj = make_object("etched", shape=scan_extent_px(pos, geom.pixel_m, SIZE), seed=3)
    probe = make_probe("zoneplate", SIZE, geom.pixel_m, geometry=geom)
    return obj, probe, pos


def sim_of(scene, geom, **kw) -> Simulator:
    obj, probe, pos = scene
    kw.setdefault("photons", 1e5)
    return Simulator(obj, probe, pos, geom, **kw)


# --------------------------------------------------------------------------- geometry
def test_geometry_pixel_size_by_hand():
    g = Geometry()  # 10 keV, 2 m, 75 µm, 128 px
    assert g.wavelength_m == pytest.approx(0.123984e-9, rel=1e-12)
    # 0.123984e-9 m * 2 m / (128 * 75e-6 m) = 2.47968e-10 / 9.6e-3 = 25.83 nm
    assert g.pixel_m == pytest.approx(2.583e-8, rel=1e-12)
    g2 = Geometry(energy_keV=15.0, distance_m=0.5, detector_pixel_m=75e-6, size=256)
    # λ = 0.082656 nm; 0.082656e-9 * 0.5 / (256 * 75e-6) = 2.1525 nm
    assert g2.pixel_m == pytest.approx(2.1525e-9, rel=1e-12)
    with pytest.raises(ValueError, match="energy_keV"):
        Geometry(energy_keV=0)
    with pytest.raises(ValueError, match="size"):
        Geometry(size=1)


# --------------------------------------------------------------------------- determinism and counts
def test_frames_deterministic_and_subset_independent(scene, geom):
    a = sim_of(scene, geom, seed=7)
    b = sim_of(scene, geom, seed=7)
    f10 = a.frames(range(10))
    assert f10.dtype == np.uint16 and f10.shape == (10, SIZE, SIZE)
    np.testing.assert_array_equal(f10, b.frames(np.arange(10)))
    np.testing.assert_array_equal(a.frames([5])[0], f10[5])
    np.testing.assert_array_equal(a.frames(5), f10[5])
    np.testing.assert_array_equal(a.frames(slice(3, 6)), f10[3:6])
    np.testing.assert_array_equal(a.frames([-1]), a.frames([a.n - 1]))
    assert not np.array_equal(sim_of(scene, geom, seed=8).frames(range(10)), f10)
    with pytest.raises(IndexError):
        a.frames([a.n])


def test_mean_total_counts_is_poisson(scene, geom):
    photons, n = 1e5, 200
    sim = sim_of(scene, geom, photons=photons, dtype="uint32")
    totals = sim.frames(range(n)).sum(axis=(1, 2), dtype=np.float64)
    sigma_mean = math.sqrt(photons / n)  # the sum of Poisson counts is Poisson(photons)
    assert abs(totals.mean() - photons) < 4 * sigma_mean
    assert totals.var(ddof=1) == pytest.approx(photons, rel=0.3)
    np.testing.assert_allclose(sim.clean(range(n)).sum(axis=(1, 2), dtype=np.float64), photons, rtol=1e-5)


def test_incident_normalisation_keeps_absorption(scene, geom):
    sim = sim_of(scene, geom, normalize="incident")
    obj, probe, _ = scene
    tot = sim.clean(range(20)).sum(axis=(1, 2), dtype=np.float64)
    transmitted = (np.abs(probe * sim.patches(range(20))) ** 2).sum(axis=(1, 2))
    np.testing.assert_allclose(tot, 1e5 * transmitted, rtol=1e-4)
    assert np.all(tot < 1e5)


# --------------------------------------------------------------------------- physics
def test_round_trip_far_field_matches_clean(scene, geom):
    sim = sim_of(scene, geom)
    _, probe, _ = scene
    idx = [0, 17, 123]
    patches = sim.patches(idx)
    assert patches.dtype == np.complex64 and patches.shape == (3, SIZE, SIZE)
    ff = far_field(probe * patches).astype(np.float64)
    ff *= 1e5 / ff.sum(axis=(1, 2), keepdims=True)
    clean = sim.clean(idx)
    np.testing.assert_allclose(clean, ff, rtol=1e-3, atol=1e-4 * ff.max())
    # zero frequency at the centre: a flat object gives the probe's far field, whose central stop is dark
    flat = far_field(probe)
    assert flat[SIZE // 2, SIZE // 2] < 1e-3 * flat.max()
    assert unshifted(flat)[0, 0] == flat[SIZE // 2, SIZE // 2]
    # Parseval with the orthonormal FFT
    assert far_field(probe).sum() == pytest.approx(1.0, rel=1e-5)


def test_subpixel_extraction():
    obj = make_object("blurred_noise", shape=(96, 96), seed=1, sigma_px=5.0)
    px, s = 1e-8, 32
    base = extract_patches(obj, [[0.0, 0.0]], px, s)[0]
    np.testing.assert_array_equal(base, obj[48 - 16:48 + 16, 48 - 16:48 + 16])
    right = extract_patches(obj, [[0.0, px]], px, s)[0]
    np.testing.assert_array_equal(right, obj[32:64, 33:65])
    down = extract_patches(obj, [[-3 * px, 0.0]], px, s)[0]
    np.testing.assert_array_equal(down, obj[29:61, 32:64])
    # half a pixel: close to the average of neighbours (away from the periodic patch edges)
    half = extract_patches(obj, [[0.0, 0.5 * px], [0.5 * px, 0.0]], px, s)
    avg_x = 0.5 * (obj[32:64, 32:64] + obj[32:64, 33:65])
    avg_y = 0.5 * (obj[32:64, 32:64] + obj[33:65, 32:64])
    inner = (slice(6, -6), slice(6, -6))
    spread = np.abs(obj - obj.mean()).max()
    assert np.abs(half[0][inner] - avg_x[inner]).max() < 0.03 * spread
    assert np.abs(half[1][inner] - avg_y[inner]).max() < 0.03 * spread
    # and it lies between the neighbours far better than either neighbour alone
    assert np.abs(half[0][inner] - avg_x[inner]).mean() < 0.25 * np.abs(base[inner] - avg_x[inner]).mean()
    with pytest.raises(ValueError, match="outside"):
        extract_patches(obj, [[0.0, 40 * px]], px, s)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        extract_patches(obj, np.zeros((3, 3)), px, s)


# --------------------------------------------------------------------------- scans
def test_spiral_formula_and_spacing():
    step = 100e-9
    pos = scan_positions("spiral", step, 400)
    assert pos.shape == (400, 2) and pos.dtype == np.float64
    c = step / math.sqrt(math.pi)
    for n in (1, 2, 7, 50, 399):
        y, x = pos[n]
        assert math.hypot(y, x) == pytest.approx(c * math.sqrt(n), rel=1e-12)
        angle = math.degrees(math.atan2(y, x)) % 360
        assert angle == pytest.approx((n * GOLDEN_ANGLE_DEG) % 360, abs=1e-8)
        diff = (angle - n * 137.508 + 180) % 360 - 180
        assert abs(diff) < 0.1
    d = np.hypot(*(pos[:, None, :] - pos[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert d.min(axis=1).mean() == pytest.approx(step, rel=0.3)
    assert np.all(pos[0] == 0)


def test_raster_and_jitter():
    step = 50e-9
    r = scan_positions("raster", step, 12)
    np.testing.assert_allclose(r.mean(axis=0), [0.0, 0.0], atol=1e-20)  # a full 3 x 4 grid, centred
    assert sorted(set(np.round(np.diff(np.unique(r[:, 1])) / step, 9))) == [1.0]
    assert len(np.unique(r[:, 0])) == 3 and len(np.unique(r[:, 1])) == 4
    j = scan_positions("jitter", step, 12, seed=4, jitter=0.2)
    assert np.abs(j - r).max() <= 0.2 * step and np.abs(j - r).max() > 0
    np.testing.assert_array_equal(j, scan_positions("jitter", step, 12, seed=4, jitter=0.2))
    for args, msg in [(("zigzag", step, 10), "spiral"), (("spiral", 0.0, 10), "step"),
                      (("raster", step, 0), "points"), (("spiral", -1e-9, 10), "step")]:
        with pytest.raises(ValueError, match=msg):
            scan_positions(*args)
    shape = scan_extent_px(r, 1e-8, 32)
    extract_patches(np.ones(shape, np.complex64), r, 1e-8, 32)  # fits


# --------------------------------------------------------------------------- detector processing
def test_dtypes_clip(scene, geom):
    for dt in DTYPES:
        f = sim_of(scene, geom, dtype=dt, photons=2e6).frames([0, 1])
        assert f.dtype == np.dtype(dt)
        assert f.min() >= 0
    assert sim_of(scene, geom, dtype="uint8", photons=2e6).frames([0]).max() == 255
    capped = sim_of(scene, geom, max_value=100, photons=2e6).frames([0])
    assert capped.max() == 100
    fl = sim_of(scene, geom, dtype="float32").frames([0])
    np.testing.assert_array_equal(fl, np.round(fl))


def test_bin_crop_beamstop_hot(scene, geom):
    clean = sim_of(scene, geom).clean([4])[0]
    binned = sim_of(scene, geom, bin=2, dtype="float32", noise=False)
    assert binned.frame_shape == (SIZE // 2, SIZE // 2)
    expect = clean.reshape(SIZE // 2, 2, SIZE // 2, 2).sum(axis=(1, 3))
    np.testing.assert_allclose(binned.expected([4])[0], expect, rtol=1e-5, atol=1e-3)
    assert binned.frames([4]).shape == (1, SIZE // 2, SIZE // 2)

    cropped = sim_of(scene, geom, crop=20, dtype="float32", noise=False)
    assert cropped.frame_shape == (20, 20)
    centre = slice(SIZE // 2 - 10, SIZE // 2 + 10)
    np.testing.assert_allclose(cropped.expected(4), clean[centre, centre], rtol=1e-5, atol=1e-3)
    assert sim_of(scene, geom, bin=2, crop=(8, 12)).frames([0]).shape == (1, 8, 12)

    stop = sim_of(scene, geom, beamstop_px=4, photons=1e6).frames(range(3))
    yy, xx = np.ogrid[:SIZE, :SIZE]
    disc = (yy - SIZE // 2) ** 2 + (xx - SIZE // 2) ** 2 <= 16
    assert np.all(stop[:, disc] == 0)
    assert stop[:, ~disc].sum() > 0

    hot = sim_of(scene, geom, hot_pixels=5, photons=1e3)
    f = hot.frames(range(4))
    flat = f.reshape(4, -1)
    assert np.all(flat[:, hot.hot_index] == 65535)
    assert hot.hot_index.size == 5 and np.all((flat == 65535).sum(axis=1) == 5)
    assert np.all(sim_of(scene, geom, hot_pixels=3, dtype="float32").frames([0]).reshape(-1)[
        sim_of(scene, geom, hot_pixels=3).hot_index] >= 1e8)


def test_bad_inputs(scene, geom):
    obj, probe, pos = scene
    with pytest.raises(ValueError, match="uint16"):
        sim_of(scene, geom, dtype="int64")
    with pytest.raises(ValueError, match="bin"):
        sim_of(scene, geom, bin=3)
    with pytest.raises(ValueError, match="photons"):
        sim_of(scene, geom, photons=-1)
    with pytest.raises(ValueError, match="crop"):
        sim_of(scene, geom, crop=SIZE + 1)
    with pytest.raises(ValueError, match="probe shape"):
        Simulator(obj, probe[:32, :32], pos, geom)
    with pytest.raises(ValueError, match="outside"):
        Simulator(obj[:80, :80], probe, pos, geom)
    with pytest.raises(ValueError, match="hot_pixels"):
        sim_of(scene, geom, hot_pixels=-2)
    with pytest.raises(ValueError, match="etched"):
        make_object("cheese", shape=(32, 32))
    with pytest.raises(ValueError, match="zoneplate"):
        make_probe("laser", 32, 1e-8)


# --------------------------------------------------------------------------- objects and probes
def test_objects_are_valid_and_seeded():
    for kind in OBJECT_KINDS:
        o = make_object(kind, shape=(96, 80), seed=2)
        assert o.dtype == np.complex64 and o.shape == (96, 80), kind
        assert np.abs(o).max() <= 1.0 + 1e-6, kind
        ph = np.angle(o)
        assert ph.min() >= -1.0 - 1e-5 and ph.max() <= 1.0 + 1e-5, kind
        assert ph.std() > 0.1, kind  # has structure
        np.testing.assert_array_equal(o, make_object(kind, shape=(96, 80), seed=2))
        if kind != "siemens":
            assert not np.array_equal(o, make_object(kind, shape=(96, 80), seed=3)), kind
    # one material: amplitude falls as the phase delay grows
    o = make_object("etched", shape=(64, 64), seed=1)
    thick, thin = np.angle(o) < -0.5, np.angle(o) > 0.5
    assert np.abs(o[thick]).mean() < np.abs(o[thin]).mean()


def test_seven_segment_digits_are_recognisable():
    height = 40
    origin = 0.12 * height  # the glyph box starts one segment thickness in

    def lit(text: str) -> list[bool]:
        m = seven_segment_mask(text, height=height, margin=0)
        # centres of segments a b c d e f g, in units of the glyph height (width 0.55)
        centres = [(0, 0.275), (0.25, 0.55), (0.75, 0.55), (1, 0.275), (0.75, 0), (0.25, 0), (0.5, 0.275)]
        return [bool(m[round(origin + fy * height), round(origin + fx * height)] > 0.5) for fy, fx in centres]

    assert all(lit("8"))
    assert lit("0") == [True] * 6 + [False]
    assert lit("1") == [False, True, True, False, False, False, False]
    assert lit("7") == [True, True, True, False, False, False, False]
    digits = make_object("digits", shape=(64, 160), text="0123", max_phase=1.0)
    assert (np.angle(digits) < 0).mean() > 0.05
    with pytest.raises(ValueError, match="digits"):
        seven_segment_mask("A")


def test_probes(geom):
    for kind in PROBE_KINDS:
        p = make_probe(kind, SIZE, geom.pixel_m, geometry=geom)
        assert p.dtype == np.complex64 and p.shape == (SIZE, SIZE)
        assert float((np.abs(p) ** 2).sum()) == pytest.approx(1.0, rel=1e-5)
    p = make_probe("zoneplate", 128, Geometry().pixel_m, geometry=Geometry())
    inten = np.abs(p) ** 2
    c = np.arange(128) - 64
    r = np.hypot(c[:, None], c[None, :]).ravel()
    order = np.argsort(r)
    r90 = r[order][np.searchsorted(np.cumsum(inten.ravel()[order]), 0.9)]
    assert 128 / 6 <= r90 <= 128 / 4  # footprint a third to half of the window
    phase = np.angle(p[64, 60:69])
    assert np.ptp(np.unwrap(phase)) > 0.05  # defocus curvature
    g = np.abs(make_probe("gaussian", SIZE, 1e-8, fwhm_px=16)) ** 2
    row = g[SIZE // 2] / g[SIZE // 2].max()
    assert row[SIZE // 2 + 8] == pytest.approx(0.25, rel=0.01)  # |P|² at the amplitude FWHM radius


# --------------------------------------------------------------------------- files
def test_load_object_png_and_h5(tmp_path):
    from skimage.io import imsave

    img = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))
    imsave(tmp_path / "grad.png", img, check_contrast=False)
    o = load_object(tmp_path / "grad.png", max_phase=0.5)
    assert o.dtype == np.complex64 and o.shape == (30, 40)
    np.testing.assert_allclose(np.abs(o), 1.0, rtol=1e-6)
    assert np.angle(o)[0, 0] == pytest.approx(-0.5, abs=1e-6)
    assert np.angle(o)[0, -1] == pytest.approx(0.5, abs=1e-6)

    truth = make_object("siemens", shape=(32, 32)) * np.float32(0.8)
    with h5py.File(tmp_path / "prod.h5", "w") as h5:
        h5["object"] = np.stack([truth, truth * 0])
        h5["phase"] = np.linspace(-2, 2, 64).reshape(8, 8)
    np.testing.assert_array_equal(load_object(tmp_path / "prod.h5"), truth)
    real = load_object(tmp_path / "prod.h5", "phase", max_phase=1.0)
    assert np.angle(real).min() == pytest.approx(-1.0, abs=1e-6)
    np.testing.assert_allclose(np.angle(load_object(f"{tmp_path}/prod.h5::phase", real_as="phase")),
                               np.linspace(-2, 2, 64).reshape(8, 8), atol=1e-6)
    with pytest.raises(ValueError, match="nothere.*object, phase|nothere"):
        load_object(tmp_path / "prod.h5", "nothere")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_object(tmp_path / "missing.png")


def test_load_probe_h5(tmp_path):
    probe = make_probe("gaussian", 16, 1e-8)
    with h5py.File(tmp_path / "p.h5", "w") as h5:
        ds = h5.create_dataset("probe", data=np.stack([[probe * 3, probe * 0]]))  # 1 × 2 × H × W
        ds.attrs["pixel_width_m"] = 12e-9
    p, px = load_probe(tmp_path / "p.h5")
    assert px == pytest.approx(12e-9)
    np.testing.assert_allclose(p, probe, rtol=1e-5, atol=1e-7)
    with pytest.raises(FileNotFoundError):
        load_probe(tmp_path / "nope.h5")


def test_load_frames_h5_and_npz(tmp_path):
    frames = np.arange(3 * 8 * 8, dtype=np.uint16).reshape(3, 8, 8)
    y, x = np.array([1e-7, 2e-7, 3e-7]), np.array([-1e-7, 0.0, 1e-7])
    with h5py.File(tmp_path / "scan.h5", "w") as h5:
        h5["entry/data/data"] = frames
    with h5py.File(tmp_path / "product.h5", "w") as h5:
        h5["probe_position_x_m"], h5["probe_position_y_m"] = x, y
    d = load_frames(tmp_path / "scan.h5")
    np.testing.assert_array_equal(d.frames, frames)
    assert d.positions_m is None and "/entry/data/data" in d.source
    d = load_frames(tmp_path / "scan.h5", positions=tmp_path / "product.h5")
    np.testing.assert_array_equal(d.positions_m, np.stack([y, x], axis=1))
    with h5py.File(tmp_path / "dp.h5", "w") as h5:
        h5["dp"] = frames.astype(np.float32)
        h5["probe_position_x_m"], h5["probe_position_y_m"] = x, y
    d = load_frames(tmp_path / "dp.h5")
    assert d.frames.dtype == np.float32 and d.positions_m.shape == (3, 2)

    np.savez(tmp_path / "train.npz", reciprocal=frames.astype(np.float32), position=np.stack([y, x], 1))
    d = load_frames(tmp_path / "train.npz")
    np.testing.assert_array_equal(d.frames, frames)
    np.testing.assert_array_equal(d.positions_m, np.stack([y, x], axis=1))

    with h5py.File(tmp_path / "empty.h5", "w") as h5:
        h5["other"] = frames
    with pytest.raises(ValueError, match="/entry/data/data"):
        load_frames(tmp_path / "empty.h5")
    np.savez(tmp_path / "bad.npz", images=frames)
    with pytest.raises(ValueError, match="reciprocal"):
        load_frames(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_frames(tmp_path / "none.h5")
    with pytest.raises(ValueError, match="2 positions for 3 frames"):
        load_frames(tmp_path / "scan.h5", positions=np.zeros((2, 2)))


def test_truth_round_trip(tmp_path, scene, geom):
    sim = sim_of(scene, geom, hot_pixels=2, bin=2)
    write_truth_h5(tmp_path / "truth.h5", sim, idx=[0, 3, 9])
    t = read_truth_h5(tmp_path / "truth.h5")
    np.testing.assert_array_equal(t["object"], sim.obj)
    np.testing.assert_array_equal(t["probe"], sim.probe)
    np.testing.assert_array_equal(t["positions_m"], sim.positions_m)
    np.testing.assert_array_equal(t["patches"], sim.patches([0, 3, 9]))
    np.testing.assert_array_equal(t["patch_indexes"], [0, 3, 9])
    np.testing.assert_array_equal(t["hot_pixel_indexes"], sim.hot_index)
    assert t["object_pixel_m"] == sim.object_pixel_m and t["object_center_m"] == (0.0, 0.0)
    assert t["geometry"] == geom
    assert t["attrs"]["bin"] == 2 and t["attrs"]["dtype"] == "uint16"
    with h5py.File(tmp_path / "truth.h5") as h5:
        assert h5["object"].shape == (1, *sim.obj.shape) and h5["probe"].shape == (1, 1, SIZE, SIZE)
        assert h5["object"].attrs["pixel_height_m"] == sim.object_pixel_m
    # the stored truth and positions are enough to recompute a frame's clean intensity
    ff = far_field(t["probe"] * extract_patches(t["object"], t["positions_m"][[3]], t["object_pixel_m"], SIZE))
    np.testing.assert_allclose(ff[0] * 1e5 / ff[0].sum(), sim.clean(3), rtol=1e-3, atol=1e-3)


def test_odd_frame_size_and_fit_object():
    from ptychostream.sim import fit_object

    g = Geometry(size=33)
    pos = scan_positions("jitter", 6.5 * g.pixel_m, 9, seed=1)
    probe = make_probe("gaussian", 33, g.pixel_m, fwhm_px=10)
    small = make_object("procedural", shape=(40, 40), seed=5)
    with pytest.raises(ValueError, match="at least"):
        Simulator(small, probe, pos, g)
    obj = fit_object(small, scan_extent_px(pos, g.pixel_m, 33))
    assert obj[obj.shape[0] // 2, obj.shape[1] // 2] == small[20, 20]
    sim = Simulator(obj, probe, pos, g, photons=1e4)
    ff = far_field(probe * sim.patches(range(9))).astype(np.float64)
    ff *= 1e4 / ff.sum(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(sim.clean(range(9)), ff, rtol=1e-3, atol=1e-4 * ff.max())
    assert sim.frames(range(9)).shape == (9, 33, 33)
    np.testing.assert_array_equal(fit_object(obj, small.shape), small)


def test_circuit_objects_are_manhattan():
    """Circuit layouts have wires along rows and columns only: no edge runs diagonally."""
    ph = np.angle(make_object("circuit", shape=(192, 192), seed=4, pitch_px=12))
    dy, dx = np.abs(np.diff(ph, axis=0))[:, :-1], np.abs(np.diff(ph, axis=1))[:-1, :]
    edges = (dy > 0.2) | (dx > 0.2)
    assert edges.mean() > 0.02  # there is a layout
    # at a Manhattan edge one of the two differences is near zero; both large only at corners
    both = (dy > 0.2) & (dx > 0.2)
    assert both.sum() < 0.15 * edges.sum()
    etched = np.angle(make_object("etched", shape=(192, 192), seed=4))
    ey, ex = np.abs(np.diff(etched, axis=0))[:, :-1], np.abs(np.diff(etched, axis=1))[:-1, :]
    assert ((ey > 0.2) & (ex > 0.2)).sum() > 0.15 * ((ey > 0.2) | (ex > 0.2)).sum()  # rotated shapes do
