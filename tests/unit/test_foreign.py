"""The foreign-instrument stand-in for measured data: probe modes, stored frames, positions, files."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ptychostream.files.truth import read_truth
from ptychostream.sim.foreign import (
    FOREIGN_FILES,
    ForeignInstrument,
    add_foreign_parser,
    simulate_foreign,
    write_foreign_truth,
    write_tike_npz,
)
from ptychostream.sim.forward import far_field
from ptychostream.sim.probes import kb_mirror_probe, mode_weights
from ptychostream.sim.replay import read_truth_h5

SMALL = replace(ForeignInstrument(), frames=24)


@pytest.fixture(scope="module")
def small():
    return simulate_foreign(SMALL, seed=3)


def test_kb_probe_modes_are_orthogonal_with_decreasing_weights():
    probe = kb_mirror_probe(128, modes=5, seed=1)
    assert probe.shape == (5, 128, 128) and probe.dtype == np.complex64
    gram = np.einsum("aij,bij->ab", probe.conj().astype(np.complex128), probe)
    weights = np.real(np.diag(gram))
    np.testing.assert_allclose(weights, mode_weights(probe), rtol=1e-6)
    assert np.all(np.diff(weights) < 0), weights
    assert weights.sum() == pytest.approx(1.0, abs=1e-6)
    off = np.abs(gram - np.diag(np.diag(gram)))
    assert off.max() < 1e-6, off.max()
    # a focus that fits the window, centred on (64, 64), wider in y (larger aperture, astigmatism)
    total = np.sum(np.abs(probe) ** 2, axis=0)
    yy, xx = np.indices(total.shape)
    assert (total * yy).sum() == pytest.approx(64, abs=3) and (total * xx).sum() == pytest.approx(64, abs=3)
    edge = total.copy()
    edge[8:-8, 8:-8] = 0
    assert edge.sum() < 0.01
    # the figure error is seeded; the aberrations shape the focus (not a plain defocused rectangle)
    assert not np.allclose(kb_mirror_probe(64, seed=1), kb_mirror_probe(64, seed=2))
    plain = kb_mirror_probe(64, modes=1, coma_rad=(0.0, 0.0), figure_error_rad=0.0, astigmatism=0.0)
    assert np.abs(np.abs(plain[0]) - np.abs(kb_mirror_probe(64, modes=1)[0])).max() > 0.1 * np.abs(plain).max()


def test_kb_probe_refuses_bad_settings():
    with pytest.raises(ValueError, match="aperture"):
        kb_mirror_probe(64, aperture=(0.7, 0.1))
    with pytest.raises(ValueError, match="coherence"):
        kb_mirror_probe(64, coherence=(1.0, 0.2))
    with pytest.raises(ValueError, match="defocus_m needs"):
        kb_mirror_probe(64, defocus_m=1e-4)


def test_settings_differ_from_the_default_geometry():
    from ptychostream.sim.forward import Geometry

    s, g = ForeignInstrument(), Geometry()
    assert s.energy_ev != g.energy_keV * 1e3 and s.distance_m != g.distance_m
    assert s.detector_pixel_m != g.detector_pixel_m
    lam = 1.239841984e-6 / s.energy_ev
    assert s.pixel_m == pytest.approx(lam * s.distance_m / (s.size * s.detector_pixel_m), rel=1e-12)
    with pytest.raises(ValueError, match="energy_ev"):
        ForeignInstrument(energy_ev=-1.0)
    with pytest.raises(ValueError, match="object_kind"):
        ForeignInstrument(object_kind="nope")


def _expected_canonical(scan, truth, photons: float) -> np.ndarray:
    """Mean counts, centred and oriented, by the package's own far-field model (no corner, no flip)."""
    patches = truth.patches()
    inten = sum(far_field(mode[None] * patches).astype(np.float64) for mode in truth.probe)
    return photons * inten + truth.background[None]


def test_frames_are_corner_origin_flipped_far_field_counts():
    s = replace(SMALL, noise=False, dtype="float32")
    scan, truth = simulate_foreign(s, seed=3)
    assert (scan.origin, scan.flip_x, scan.flip_y, scan.transpose) == ("corner", True, False, False)
    expected = _expected_canonical(scan, truth, s.photons)
    n = s.size
    k = np.arange(n)
    # stored[ky, kx] = canonical[ky + N/2, -kx + N/2]: zero frequency at (0, 0), x frequencies reversed
    want = expected[:, (k[:, None] + n // 2) % n, (-k[None, :] + n // 2) % n]
    want.reshape(len(want), -1)[:, truth.hot_pixel_indexes_stored] = s.hot_value
    np.testing.assert_allclose(scan.frames, want, rtol=2e-4, atol=1e-3)
    # the flip matters: without it the frames do not match (|F{ψ}|² of a complex ψ is not symmetric)
    plain = expected[:, (k + n // 2) % n][:, :, (k + n // 2) % n]
    assert np.abs(plain - want).mean() > 0.05 * want.mean()
    # Parseval: the counts above background are the photons times the exit waves' power
    power = sum(np.sum(np.abs(mode[None] * truth.patches()) ** 2, axis=(1, 2)) for mode in truth.probe)
    np.testing.assert_allclose((expected - truth.background).sum(axis=(1, 2)), s.photons * power, rtol=1e-4)
    # the canonical hot-pixel indexes are the stored ones, moved like the frames
    hy, hx = np.divmod(truth.hot_pixel_indexes, n)
    sy, sx = np.divmod(truth.hot_pixel_indexes_stored, n)
    np.testing.assert_array_equal(sy, (hy - n // 2) % n)
    np.testing.assert_array_equal(sx, (-(hx - n // 2)) % n)


def test_noisy_frames_put_the_zero_frequency_at_the_corner(small):
    scan, truth = small
    mean = scan.frames.astype(np.float64).mean(axis=0)
    mean.ravel()[truth.hot_pixel_indexes_stored] = np.median(mean)
    smooth = gaussian_filter(mean, 6.0, mode="wrap")
    peak = np.unravel_index(np.argmax(smooth), smooth.shape)
    wrapped = [min(p, smooth.shape[i] - p) for i, p in enumerate(peak)]
    assert max(wrapped) <= 3, peak
    centre = smooth[48:80, 48:80].mean()
    assert smooth[0, 0] > 100 * centre  # high frequencies in the middle of a stored frame
    assert scan.frames.dtype == np.uint32 and scan.frames.shape == (24, 128, 128)
    counts = scan.frames.reshape(24, -1).astype(np.float64)
    counts[:, truth.hot_pixel_indexes_stored] = 0
    assert np.abs(counts.sum(axis=1) / SMALL.photons - 1).max() < 0.3  # weak absorption


def test_positions_are_pixels_times_the_object_pixel(small):
    scan, truth = small
    px = scan.attrs["positions_px"]
    assert px.dtype == np.float32 and px.shape == (24, 2)
    np.testing.assert_array_equal(px.astype(np.float64) * scan.object_pixel_m, scan.positions_m)
    assert scan.object_pixel_m == SMALL.pixel_m == truth.pixel_m
    assert px.min() >= 0  # Tike: the window's top-left corner in the object array
    # every window inside the object; the raster step and its jitter
    h, w = truth.object.shape
    assert px[:, 0].max() + SMALL.size <= h and px[:, 1].max() + SMALL.size <= w
    steps = np.abs(np.diff(px[:5, 1]))
    assert np.all(np.abs(steps - SMALL.step_px) <= 2 * SMALL.jitter * SMALL.step_px + 1e-4)
    assert np.any(np.abs(steps - SMALL.step_px) > 1e-3)
    # serpentine: the second row runs backwards
    assert px[5, 1] > px[9, 1]
    # the truth's object centre is where a window's centre sits when the position is the centre
    centre_px = (np.asarray(truth.center_m) / truth.pixel_m).round(6)
    np.testing.assert_array_equal(centre_px, [h // 2 - SMALL.size // 2, w // 2 - SMALL.size // 2])
    patch = truth.patches(0)
    r, c = (int(v) for v in np.rint(px[0]))

    def err(dy: int, dx: int) -> float:
        return float(np.abs(patch - truth.object[r + dy:r + dy + SMALL.size, c + dx:c + dx + SMALL.size]).mean())

    assert err(0, 0) < 0.5 * min(err(dy, dx) for dy, dx in [(2, 0), (-2, 0), (0, 2), (0, -2)])


def test_background_and_hot_pixels_are_there():
    base = replace(SMALL, frames=8, noise=False, dtype="float32")
    with_bg, truth = simulate_foreign(base, seed=5)
    clean, _ = simulate_foreign(replace(base, background_peak=0.0, background_flat=0.0), seed=5)
    diff = (with_bg.frames.astype(np.float64) - clean.frames.astype(np.float64)).mean(axis=0)
    hot = truth.hot_pixel_indexes_stored
    assert len(hot) == SMALL.hot_pixels
    bg_stored = np.fft.ifftshift(truth.background)
    bg_stored = np.roll(np.flip(bg_stored, axis=1), 1, axis=1)
    ok = np.ones(diff.size, dtype=bool)
    ok[hot] = False
    np.testing.assert_allclose(diff.ravel()[ok], bg_stored.ravel()[ok], atol=0.02)
    assert truth.background.max() == pytest.approx(SMALL.background_peak + SMALL.background_flat)
    assert truth.background.min() > SMALL.background_flat
    noisy, _ = simulate_foreign(replace(SMALL, frames=8), seed=5)
    flat = noisy.frames.reshape(8, -1).astype(np.float64)
    assert np.all(flat[:, hot] == SMALL.hot_value)
    rest = np.delete(flat, hot, axis=1)
    assert rest.max() < SMALL.hot_value / 10


def test_tike_npz_round_trip(small, tmp_path):
    scan, truth = small
    path = write_tike_npz(tmp_path / "scan.npz", scan)
    assert path == tmp_path / "scan.npz"
    with np.load(path) as z:
        assert set(z.files) == {"data", "probe", "scan", "energy_ev", "distance_m", "detector_pixel_m",
                                "object_pixel_m"}
        np.testing.assert_array_equal(z["data"], scan.frames)
        assert z["data"].dtype == np.uint32
        assert z["probe"].shape == (1, 1, SMALL.probe_modes, 128, 128) and z["probe"].dtype == np.complex64
        np.testing.assert_array_equal(z["probe"][0, 0], truth.probe)
        assert z["scan"].shape == (1, 24, 2) and z["scan"].dtype == np.float32
        np.testing.assert_array_equal(z["scan"][0], scan.attrs["positions_px"])
        for key in ("energy_ev", "distance_m", "detector_pixel_m", "object_pixel_m"):
            assert z[key].shape == () and float(z[key]) == getattr(scan, key)


def test_deterministic_for_a_seed():
    s = replace(SMALL, frames=6)
    a, ta = simulate_foreign(s, seed=11)
    b, tb = simulate_foreign(s, seed=11)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.positions_m, b.positions_m)
    np.testing.assert_array_equal(ta.object, tb.object)
    np.testing.assert_array_equal(a.probe, b.probe)
    c, tc = simulate_foreign(s, seed=12)
    assert not np.array_equal(a.frames, c.frames)
    assert not np.array_equal(ta.object, tc.object)
    assert not np.array_equal(a.positions_m, c.positions_m)


def test_truth_file_reads_back(small, tmp_path):
    scan, truth = small
    path = write_foreign_truth(tmp_path / "truth.h5", truth, patch_indexes=np.arange(4))
    got = read_truth(path)
    np.testing.assert_array_equal(got["object"], truth.object)
    np.testing.assert_array_equal(got["positions_m"], scan.positions_m)
    assert got["object_pixel_m"] == truth.pixel_m
    assert got["object_center_m"] == pytest.approx(truth.center_m)
    np.testing.assert_array_equal(got["probe"], truth.probe[0])  # the first (strongest) mode
    np.testing.assert_array_equal(got["patches"], truth.patches(np.arange(4)))
    assert got["attrs"]["flip_x"] and got["attrs"]["origin"] == "corner"
    np.testing.assert_allclose(got["attrs"]["probe_mode_weights"], mode_weights(truth.probe))
    amp = np.abs(got["object"])
    assert amp.max() > 1.0 and amp.min() < 0.9  # amplitude slightly above and below 1
    phase = np.angle(got["object"])
    assert 1.0 <= phase.max() <= 2.0 and -2.0 <= phase.min() <= -1.0
    import h5py

    with h5py.File(path) as h5:
        assert h5["probe"].shape == (1, SMALL.probe_modes, 128, 128)
    geometry = read_truth_h5(path)["geometry"]
    assert geometry.size == 128 and geometry.distance_m == SMALL.distance_m
    assert geometry.pixel_m == pytest.approx(truth.pixel_m, rel=1e-5)


def test_sim_foreign_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_foreign_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sim-foreign", "--out", str(tmp_path / "out"), "--frames", "12", "--seed", "2"])
    assert args.func(args) == 0, capsys.readouterr().err
    for name in FOREIGN_FILES:
        assert (tmp_path / "out" / name).is_file()
    with np.load(tmp_path / "out" / "foreign.npz") as z:
        assert z["data"].shape == (12, 128, 128)
    assert "12 frames" in capsys.readouterr().out


def test_read_scan_of_npz_and_cxi_gives_the_centred_unflipped_simulation(tmp_path):
    from ptychostream.files.scan import read_scan
    from ptychostream.sim.foreign import write_foreign_cxi

    s = replace(SMALL, frames=10, noise=False, dtype="float32")
    scan, truth = simulate_foreign(s, seed=4)
    want = _expected_canonical(scan, truth, s.photons)  # centred, unflipped, by forward.far_field
    want.reshape(len(want), -1)[:, truth.hot_pixel_indexes] = s.hot_value
    npz = read_scan(write_tike_npz(tmp_path / "foreign.npz", scan), origin="corner", flip_x=True)
    cxi = read_scan(write_foreign_cxi(tmp_path / "foreign.cxi", scan))  # the CXI says origin and flips
    for got in (npz, cxi):
        assert (got.origin, got.flip_x, got.flip_y, got.transpose) == ("corner", True, False, False), got.source
        np.testing.assert_allclose(got.canonical_frames(), want, rtol=2e-4, atol=1e-3, err_msg=got.source)
        np.testing.assert_allclose(got.positions_m, scan.positions_m, rtol=1e-12, atol=1e-15, err_msg=got.source)
        assert got.pixel_m() == pytest.approx(truth.pixel_m, rel=1e-12)
        assert got.energy_ev == pytest.approx(s.energy_ev) and got.distance_m == pytest.approx(s.distance_m)
        assert got.detector_pixel_m == pytest.approx(s.detector_pixel_m)
        np.testing.assert_array_equal(got.probe, truth.probe)
