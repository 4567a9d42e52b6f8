"""``ptychostream reconstruct``: pty-chi on a simulated scan from a generic probe guess, products, bad scans."""

from __future__ import annotations

import argparse
import time

import h5py
import numpy as np
import pytest

from ptychostream.files.errors import FileFormatError
from ptychostream.files.product import read_product
from ptychostream.files.scan import Scan
from ptychostream.iterative.probe import fit_probe, guess_probe, probe_radius_px
from ptychostream.quality.grid import illumination_mask, place_truth
from ptychostream.quality.metrics import remove_plane, score_phase
from ptychostream.sim import (
    Geometry,
    Simulator,
    make_object,
    make_probe,
    scan_extent_px,
    scan_positions,
    unshifted,
)

SIZE, POINTS, STEP_M, EPOCHS = 64, 120, 3e-7, 20


@pytest.fixture(scope="module")
def sim() -> Simulator:
    """A small spiral scan of the digits object with the defocused zone-plate probe (about 80 % overlap)."""
    g = Geometry(size=SIZE)
    probe = make_probe("zoneplate", SIZE, g.pixel_m, geometry=g)
    pos = scan_positions("spiral", STEP_M, POINTS)
    obj = make_object("digits", shape=scan_extent_px(pos, g.pixel_m, SIZE), seed=0)
    return Simulator(obj, probe, pos, g, photons=1e6, seed=0, dtype="float32")


@pytest.fixture(scope="module")
def scan(sim: Simulator) -> Scan:
    """The scan as a reader would give it: centred intensities, positions in metres, no probe."""
    return Scan(frames=sim.frames(slice(None)), positions_m=sim.positions_m.copy(), object_pixel_m=sim.object_pixel_m,
                energy_ev=sim.geometry.energy_keV * 1e3, source="simulated spiral", layout="test")


@pytest.fixture(scope="module")
def lsqml(scan: Scan) -> object:
    pytest.importorskip("ptychi")
    from ptychostream.iterative.engine import reconstruct

    seen: list[tuple[int, int, float]] = []
    t0 = time.monotonic()
    rec = reconstruct(scan, engine="lsqml", iterations=EPOCHS, progress=lambda d, n, loss: seen.append((d, n, loss)))
    rec.settings["test_wall_s"] = time.monotonic() - t0
    rec.settings["test_progress"] = seen
    return rec


def _phase_figures(rec: object, sim: Simulator) -> dict[str, float]:
    """Registered SSIM, and the Pearson correlation of the ramp-removed phase where the scan is well lit."""
    obj = rec.object  # type: ignore[attr-defined]
    h, w = obj.shape
    px = sim.object_pixel_m
    origin = (rec.center_m[0] - (h // 2) * px, rec.center_m[1] - (w // 2) * px)  # type: ignore[attr-defined]
    truth, inside = place_truth(sim.obj, px, obj.shape, origin, px)
    mask = illumination_mask(sim.probe, sim.positions_m, px, obj.shape, origin, level=0.5) & inside
    phase = np.angle(obj * np.exp(-1j * np.angle(np.mean(obj[mask]))))  # global phase off, no wrap in the mask
    scored = score_phase(phase, truth, mask)
    flat, _ = remove_plane(phase, np.where(inside, truth, 0.0), mask)
    corr = float(np.corrcoef(flat[mask], truth[mask])[0, 1])
    return {"ssim": scored["ssim"], "corr": corr, "shift": float(np.hypot(*scored["shift"])), "pixels": int(mask.sum())}


def test_lsqml_from_a_guessed_probe_recovers_the_phase(lsqml: object, sim: Simulator) -> None:
    rec = lsqml
    figures = _phase_figures(rec, sim)
    per_epoch = rec.settings["test_wall_s"] / EPOCHS  # type: ignore[attr-defined]
    print(f"\nLSQML {POINTS} frames {SIZE}x{SIZE}, {EPOCHS} epochs: {per_epoch:.2f} s/epoch, "
          f"loss {rec.loss[0]:.3g} -> {rec.loss[-1]:.3g}, {figures}")  # type: ignore[attr-defined]
    assert figures["corr"] > 0.9, figures
    assert figures["ssim"] > 0.8, figures
    assert figures["shift"] < 0.5, figures  # the object sits where the positions say
    assert rec.settings["probe_source"] == "guess"  # type: ignore[attr-defined]
    assert rec.loss[-1] < 0.1 * rec.loss[0]  # type: ignore[attr-defined]
    seen = rec.settings["test_progress"]  # type: ignore[attr-defined]
    assert [d for d, _, _ in seen] == list(range(1, EPOCHS + 1)) and all(n == EPOCHS for _, n, _ in seen)
    # the refined probe is the zone plate's: it correlates with the truth far better than the flat disc it began as
    p, t = rec.probe, sim.probe  # type: ignore[attr-defined]
    overlap = abs(np.vdot(t, p)) / (np.linalg.norm(t) * np.linalg.norm(p))
    disc = guess_probe(sim.frames(slice(0, 8)))
    start = abs(np.vdot(t, disc)) / (np.linalg.norm(t) * np.linalg.norm(disc))
    assert overlap > 0.8 > start, (overlap, start)
    # the power is in the orthonormal convention: |FFT(P)|^2 sums to the mean counts through a transmitting object
    counts = float(np.mean(sim.frames(slice(None)).sum(axis=(1, 2))))
    assert 0.5 * counts < float(np.sum(np.abs(rec.probe_modes) ** 2)) < 2.0 * counts  # type: ignore[attr-defined]


def test_product_file_reads_back(lsqml: object, tmp_path: object) -> None:
    from ptychostream.iterative.engine import write_reconstruction

    rec = lsqml
    out = write_reconstruction(tmp_path / "product.h5", rec)  # type: ignore[operator]
    back = read_product(out)
    np.testing.assert_array_equal(back.object, rec.object)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(back.probe, rec.probe)  # type: ignore[attr-defined]
    np.testing.assert_allclose(back.positions_m, rec.positions_m)  # type: ignore[attr-defined]
    assert back.pixel_m == rec.pixel_m and back.center_m == rec.center_m  # type: ignore[attr-defined]
    with h5py.File(out, "r") as h5:
        assert h5.attrs["ptychostream_engine"] == "lsqml"
        assert len(h5.attrs["ptychostream_loss"]) == EPOCHS


def test_hot_pixels_as_pty_chis_mask_reconstruct_as_well_as_a_clean_scan(lsqml: object, sim: Simulator,
                                                                        scan: Scan) -> None:
    """Hot pixels (a few hundred times a bright pixel's counts) given as ``bad_pixels`` become pty-chi's
    valid-pixel mask: the object comes out about as well as from the clean scan."""
    pytest.importorskip("ptychi")
    from ptychostream.iterative.engine import prepare, reconstruct

    rng = np.random.default_rng(3)
    bad = np.zeros((SIZE, SIZE), dtype=bool)
    bad[rng.integers(0, SIZE, 12), rng.integers(0, SIZE, 12)] = True
    bad[SIZE // 2 + 1, SIZE // 2 + 2] = True  # one in the bright centre too
    frames = np.array(scan.frames, dtype=np.float32)
    frames[:, bad] += 50.0 * float(frames.max())
    hot = Scan(frames=frames, positions_m=scan.positions_m, object_pixel_m=scan.object_pixel_m,
               energy_ev=scan.energy_ev, source="simulated spiral, hot pixels")
    prep = prepare(hot, bad_pixels=bad)  # pty-chi's convention: True = measured, zero frequency at (0, 0)
    assert prep.valid is not None
    np.testing.assert_array_equal(prep.valid, np.fft.ifftshift(~bad))
    assert np.abs(prep.patterns[:, ~prep.valid]).max() < 2 * float(scan.frames.max())  # no hot values left
    rec = reconstruct(hot, engine="lsqml", iterations=EPOCHS, bad_pixels=bad)
    clean, masked = _phase_figures(lsqml, sim), _phase_figures(rec, sim)
    print(f"\nclean {clean}\nhot pixels, masked {masked}")
    assert rec.settings["bad_pixels"] == int(bad.sum())
    assert masked["corr"] > clean["corr"] - 0.02 and masked["ssim"] > clean["ssim"] - 0.05, (masked, clean)
    assert masked["shift"] < 0.5
    with pytest.raises(ValueError, match="bad_pixels must be a boolean 64x64 mask"):
        prepare(hot, bad_pixels=bad[:-1])


def test_file_probe_modes_and_dm(sim: Simulator, scan: Scan, tmp_path: object) -> None:
    """The file's probe (larger than the frames: cropped), two modes, DM: every mode is written and read back."""
    pytest.importorskip("ptychi")
    from ptychostream.iterative.engine import reconstruct, write_reconstruction

    big = np.pad(sim.probe, 8)[None]  # 80x80, centre pixel kept
    with_probe = Scan(frames=scan.frames, positions_m=scan.positions_m, object_pixel_m=scan.object_pixel_m,
                      probe=big, source="simulated, with its probe")
    rec = reconstruct(with_probe, engine="dm", iterations=2, probe_modes=2, refine_positions=True,
                      positions_start=1, batch_size=40)
    assert rec.settings["probe_source"] == "file" and rec.probe_modes.shape == (2, SIZE, SIZE)
    assert rec.positions_m.shape == scan.positions_m.shape
    assert np.abs(rec.positions_m - scan.positions_m).max() < 0.5 * sim.object_pixel_m  # refined, not lost
    out = write_reconstruction(tmp_path / "dm.h5", rec)  # type: ignore[operator]
    with h5py.File(out, "r") as h5:
        assert h5["probe"].shape == (1, 2, SIZE, SIZE)
    np.testing.assert_array_equal(read_product(out).probe, rec.probe_modes[0])


def test_probe_helpers(sim: Simulator) -> None:
    probe = sim.probe
    cropped = fit_probe(np.pad(probe, 4), (SIZE, SIZE))  # 72x72, centre pixel (36, 36) -> (32, 32)
    np.testing.assert_array_equal(cropped, probe)
    padded = fit_probe(probe, (70, 70))
    np.testing.assert_array_equal(padded[3:67, 3:67], probe)
    # the radius estimate from the frames alone is within 25 % of the true rms radius (about 10 px)
    inten = np.abs(probe) ** 2
    c = np.arange(SIZE) - SIZE // 2
    true_r = float(np.sqrt((inten * (c[:, None] ** 2 + c[None, :] ** 2)).sum() / inten.sum()))
    est = probe_radius_px(sim.frames(slice(None)))
    assert abs(est - true_r) < 0.25 * true_r, (est, true_r)


@pytest.mark.parametrize("change, words", [
    ({"positions_m": np.empty((0, 2))}, "no probe positions"),
    ({"positions_m": np.zeros((5, 2))}, "5 positions for"),
    ({"positions_m": "nan"}, "NaN"),
    ({"probe": np.ones((1, 8, 8))}, "'probe' must be finite complex"),
])
def test_bad_scans_error_cleanly(scan: Scan, change: dict[str, object], words: str) -> None:
    from ptychostream.iterative.engine import reconstruct

    fields = {"frames": scan.frames[:20], "positions_m": scan.positions_m[:20].copy(),
              "object_pixel_m": scan.object_pixel_m, "source": "bad.npz (tike-npz)"}
    fields.update(change)
    if isinstance(fields["positions_m"], str):
        fields["positions_m"] = scan.positions_m[:20].copy()
        fields["positions_m"][3, 1] = np.nan  # type: ignore[index]
    with pytest.raises(FileFormatError, match=words) as err:
        reconstruct(Scan(**fields), iterations=1)  # type: ignore[arg-type]
    assert "bad.npz" in str(err.value)


def _parser() -> argparse.ArgumentParser:
    from ptychostream.iterative.cli import add_reconstruct_parser

    parser = argparse.ArgumentParser(prog="ptychostream")
    add_reconstruct_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


def test_cli_on_a_tike_npz(sim: Simulator, scan: Scan, tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    """A Tike NPZ (corner-origin frames, positions in pixels, no metadata but the pixel) to a product."""
    pytest.importorskip("ptychi")
    from ptychostream.files.npz import write_npz

    sub = scan.subset(slice(0, 60))
    stored = Scan(frames=unshifted(sub.frames), positions_m=sub.positions_m, object_pixel_m=sub.object_pixel_m,
                  origin="corner")
    path = tmp_path / "scan.npz"  # type: ignore[operator]
    write_npz(path, stored, layout="tike-npz", position_units="pixels", metadata=False)
    out = tmp_path / "product.h5"  # type: ignore[operator]
    rc = _run(["reconstruct", str(path), "--out", str(out), "--iterations", "2", "--no-progress",
               "--origin", "corner", "--pixel-m", repr(sub.object_pixel_m)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "2 lsqml epochs" in text.out
    back = read_product(out)
    np.testing.assert_allclose(back.positions_m, sub.positions_m, rtol=0, atol=1e-12)
    assert back.pixel_m == pytest.approx(sub.object_pixel_m)


def test_cli_bad_file_exits_2(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "noscan.npz"  # type: ignore[operator]
    np.savez(path, data=np.ones((4, 8, 8), np.float32))
    rc = _run(["reconstruct", str(path), "--out", str(tmp_path / "x.h5"), "--no-progress"])  # type: ignore[operator]
    err = capsys.readouterr().err
    assert rc == 2
    assert "noscan.npz" in err and "error" in err
