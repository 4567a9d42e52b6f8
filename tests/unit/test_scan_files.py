"""Issue #13: reading real scans natively (NPZ, CXI, HDF5 + product, our record, Ptychodus readers)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ptychostream.files.cxi import EV_J, read_cxi, write_cxi
from ptychostream.files.errors import FileFormatError
from ptychostream.files.npz import read_npz, write_npz
from ptychostream.files.product import Product, write_product_h5
from ptychostream.files.scan import Scan, read_scan
from ptychostream.files.scandata import NoPositionsError, guess_origin

RNG = np.random.default_rng(13)
N, H = 12, 16
PIXEL = 2e-8


def centred_frames(n: int = N, h: int = H) -> np.ndarray:
    """Frames with a bright zero frequency at (h // 2, h // 2), noise elsewhere."""
    f = RNG.poisson(2.0, (n, h, h)).astype(np.uint16)
    f[:, h // 2, h // 2] += 500
    f[:, h // 2, h // 2 + 1] += 100  # asymmetric, so a flip or a transpose shows
    return f


def corner_frames(n: int = N, h: int = H) -> np.ndarray:
    return np.fft.ifftshift(centred_frames(n, h), axes=(-2, -1))


def probe_modes(modes: int = 2, h: int = H) -> np.ndarray:
    return (RNG.normal(size=(modes, h, h)) + 1j * RNG.normal(size=(modes, h, h))).astype(np.complex64)


POS_M = RNG.uniform(-1e-6, 1e-6, (N, 2))


# --------------------------------------------------------------------------- Scan itself
def test_pixel_from_geometry_and_canonical_frames():
    frames = corner_frames()
    s = Scan(frames, POS_M, energy_ev=10_000.0, distance_m=2.0, detector_pixel_m=75e-6, origin="corner",
             transpose=True, flip_x=True)
    lam = 1.239841984e-6 / 10_000.0
    assert s.pixel_m() == pytest.approx(lam * 2.0 / (H * 75e-6), rel=1e-12)
    c = s.canonical_frames()
    # a flip reverses the frequencies: a reversal and a roll by one, the zero frequency stays put
    want = np.roll(np.fft.fftshift(frames, axes=(-2, -1)).swapaxes(-1, -2)[..., ::-1], 1, axis=-1).astype(np.float32)
    np.testing.assert_array_equal(c, want)
    peak = Scan(np.pad(np.ones((1, 1, 1)), ((0, 0), (0, H - 1), (0, H - 1))), POS_M[:1], origin="corner",
                flip_x=True, flip_y=True)  # a lone zero-frequency pixel at the corner
    assert np.unravel_index(np.argmax(peak.canonical_frames()[0]), (H, H)) == (H // 2, H // 2)
    assert c.dtype == np.float32 and c.flags.c_contiguous and not np.shares_memory(c, frames)
    plain = Scan(frames.astype(np.float32), POS_M)
    assert not np.shares_memory(plain.canonical_frames(), plain.frames)
    with pytest.raises(ValueError, match="energy_ev, distance_m"):
        Scan(frames, POS_M, detector_pixel_m=75e-6).pixel_m()
    sub = Scan(frames, POS_M, object_pixel_m=PIXEL, attrs={"real": np.arange(N), "note": "x"}).subset([3, 1])
    np.testing.assert_array_equal(sub.frames, frames[[3, 1]])
    np.testing.assert_array_equal(sub.positions_m, POS_M[[3, 1]])
    assert sub.attrs["real"].tolist() == [3, 1] and sub.attrs["note"] == "x" and sub.object_pixel_m == PIXEL


def test_origin_guess():
    assert guess_origin(corner_frames()) == "corner"
    assert guess_origin(centred_frames()) == "centre"


# --------------------------------------------------------------------------- NPZ
def test_ptychonn_npz_positions_in_pixels(tmp_path):
    frames = centred_frames().astype(np.float32)
    real = np.exp(1j * RNG.normal(size=(N, 8, 8))).astype(np.complex64)
    path = tmp_path / "ptychonn.npz"
    np.savez(path, reciprocal=frames[:, None], real=real, position=POS_M / PIXEL, pixelsize=PIXEL)
    s = read_scan(path)
    assert s.layout == "ptychonn-npz" and s.frames.shape == (N, H, H)
    np.testing.assert_array_equal(s.frames, frames)
    np.testing.assert_allclose(s.positions_m, POS_M, rtol=1e-12)
    assert s.object_pixel_m == PIXEL and s.attrs["position_units"] == "pixels"
    assert s.origin == "centre" and s.attrs["origin_from"] == "guess"
    np.testing.assert_array_equal(s.attrs["real"], real)
    np.testing.assert_array_equal(s.subset(slice(2, 5)).attrs["real"], real[2:5])


def test_tike_npz_singleton_axes_pixels_corner(tmp_path):
    frames = corner_frames()
    probe = probe_modes(3)
    path = tmp_path / "tike.npz"
    np.savez(path, data=frames[None], scan=(POS_M / PIXEL)[None], probe=probe[None, None])
    with pytest.raises(FileFormatError, match=r"in 'scan' are in pixels: .*no object pixel size"):
        read_scan(path)
    s = read_scan(path, object_pixel_m=PIXEL)
    assert s.layout == "tike-npz" and s.origin == "corner" and s.attrs["origin_from"] == "guess"
    np.testing.assert_array_equal(s.frames, frames)
    np.testing.assert_allclose(s.positions_m, POS_M, rtol=1e-12)
    assert s.probe is not None and s.probe.shape == (3, H, H)
    np.testing.assert_array_equal(s.probe, probe)
    np.testing.assert_array_equal(s.canonical_frames(), np.fft.fftshift(frames, axes=(-2, -1)))
    # the pixel from the geometry instead, and the override of the origin winning over the guess
    s = read_scan(path, energy_ev=8000.0, distance_m=1.5, detector_pixel_m=55e-6, origin="centre")
    assert s.object_pixel_m is None and s.origin == "centre" and s.attrs["origin_from"] == "override"
    np.testing.assert_allclose(s.positions_m, POS_M / PIXEL * s.pixel_m(), rtol=1e-12)
    # metres when the caller says so
    np.savez(path, data=frames, scan=POS_M[None])
    s = read_scan(path, position_units="m")
    np.testing.assert_allclose(s.positions_m, POS_M)


def test_npz_round_trip_with_metadata(tmp_path):
    scan = Scan(corner_frames(), POS_M, object_pixel_m=PIXEL, energy_ev=9000.0, distance_m=3.0,
                detector_pixel_m=75e-6, probe=probe_modes(2), origin="corner", flip_y=True)
    write_npz(tmp_path / "t.npz", scan)
    back = read_npz(tmp_path / "t.npz")
    assert (back.origin, back.attrs["origin_from"], back.flip_y, back.flip_x) == ("corner", "file", True, False)
    assert (back.energy_ev, back.distance_m, back.detector_pixel_m, back.object_pixel_m) == (9000.0, 3.0, 75e-6, PIXEL)
    np.testing.assert_allclose(back.positions_m, POS_M, rtol=1e-12)
    np.testing.assert_array_equal(back.probe, scan.probe)
    with np.load(tmp_path / "t.npz") as z:
        assert z["scan"].shape == (1, N, 2) and z["probe"].shape == (1, 1, 2, H, H)
        np.testing.assert_allclose(z["scan"][0], POS_M / PIXEL)
    write_npz(tmp_path / "p.npz", scan, layout="ptychonn-npz", position_units="m")
    back = read_scan(tmp_path / "p.npz")
    assert back.layout == "ptychonn-npz" and back.origin == "corner"
    np.testing.assert_allclose(back.positions_m, POS_M)


# --------------------------------------------------------------------------- CXI
def test_cxi_round_trip(tmp_path):
    scan = Scan(corner_frames(), POS_M, object_pixel_m=PIXEL, energy_ev=8800.0, distance_m=2.5,
                detector_pixel_m=75e-6, probe=probe_modes(2), origin="corner", transpose=True)
    path = tmp_path / "scan.cxi"
    write_cxi(path, scan)
    with h5py.File(path, "r") as h5:  # the spec's units: energy in J, (x, y, z) translations in metres
        assert h5["entry_1/instrument_1/source_1/energy"][()] == pytest.approx(8800.0 * EV_J)
        t = h5["entry_1/sample_1/geometry_1/translation"][()]
        np.testing.assert_allclose(t[:, :2], POS_M[:, ::-1])
        np.testing.assert_array_equal(h5["entry_1/data_1/data"][()], scan.frames)
        assert h5["entry_1/image_1/data"].shape == (2, H, H)
    back = read_cxi(path)
    assert back.layout == "cxi" and back.attrs["origin_from"] == "file"
    assert (back.origin, back.transpose, back.flip_y) == ("corner", True, False)
    assert back.energy_ev == pytest.approx(8800.0) and back.distance_m == 2.5 and back.detector_pixel_m == 75e-6
    assert back.object_pixel_m == PIXEL
    np.testing.assert_array_equal(back.frames, scan.frames)
    np.testing.assert_allclose(back.positions_m, POS_M)
    np.testing.assert_array_equal(back.probe, scan.probe)
    assert read_scan(path).layout == "cxi"


def test_cxi_written_elsewhere(tmp_path):
    """A CXI file as other programs write it: legacy translation path, illumination probe with image_size."""
    frames = centred_frames()
    path = tmp_path / "other.h5"  # not .cxi: told by its /entry_1
    with h5py.File(path, "w") as h5:
        h5["entry_1/instrument_1/detector_1/data"] = frames
        h5["entry_1/instrument_1/detector_1/distance"] = 1.2
        h5["entry_1/instrument_1/detector_1/x_pixel_size"] = 172e-6
        h5["entry_1/instrument_1/detector_1/y_pixel_size"] = 172e-6
        h5["entry_1/instrument_1/source_1/energy"] = 6200.0 * EV_J
        h5["entry_1/data_1/translation"] = np.column_stack([POS_M[:, 1], POS_M[:, 0], np.zeros(N)])
        h5["entry_1/image_1/data"] = probe_modes(1)[0]
        h5["entry_1/image_1/image_size"] = [H * 3e-8, H * 3e-8, 0.0]
    s = read_scan(path)
    assert s.layout == "cxi" and s.origin == "centre" and s.attrs["origin_from"] == "guess"
    assert s.object_pixel_m == pytest.approx(3e-8) and s.energy_ev == pytest.approx(6200.0)
    assert s.probe is not None and s.probe.shape == (1, H, H)
    np.testing.assert_allclose(s.positions_m, POS_M)


# --------------------------------------------------------------------------- HDF5 + product, record
def test_hdf5_frames_with_a_ptychodus_product(tmp_path):
    frames = centred_frames()
    with h5py.File(tmp_path / "frames.h5", "w") as h5:
        h5["entry/data/data"] = frames
    probe = probe_modes(2)
    with h5py.File(tmp_path / "product.h5", "w") as h5:
        write_product_h5(h5, Product(np.ones((40, 40), np.complex64), 2.5e-8, (0.0, 0.0), probe=probe[0],
                                     positions_m=POS_M))
        del h5["probe"]
        h5["probe"] = probe[None]  # (opr, modes, h, w) as Ptychodus writes it
        h5["probe"].attrs["pixel_width_m"] = 2.5e-8
    with pytest.raises(NoPositionsError, match="expected probe_position_y_m and probe_position_x_m"):
        read_scan(tmp_path / "frames.h5")
    s = read_scan(tmp_path / "frames.h5", product=tmp_path / "product.h5")
    assert s.layout == "hdf5" and s.object_pixel_m == 2.5e-8 and s.probe is not None and s.probe.shape == (2, H, H)
    np.testing.assert_allclose(s.positions_m, POS_M)
    np.testing.assert_array_equal(s.probe, probe)
    with pytest.raises(FileFormatError, match="holds no diffraction frames: pass it as product="):
        read_scan(tmp_path / "product.h5")
    s = read_scan(f"{tmp_path / 'frames.h5'}::/entry/data/data", positions=POS_M[::-1])
    np.testing.assert_allclose(s.positions_m, POS_M[::-1])


def _record(path, frames, x, y):
    with h5py.File(path, "w") as h5:
        data = h5.create_group("entry/data")
        data["unique_id"] = np.arange(1, len(frames) + 1)
        data["phase"] = np.zeros((len(frames), 4, 4), np.float32)
        data["position_x_m"], data["position_y_m"] = x, y
        h5["entry/instrument/detector/data"] = frames
        h5["entry/frames_flushed"] = [len(frames)]
        m = h5.create_group("entry/mosaic")
        m["phase"] = np.zeros((8, 8), np.float32)
        m.attrs["pixel_size_m"] = PIXEL
        h5["entry"].attrs["complete"] = True


def test_our_record(tmp_path):
    frames = centred_frames()
    _record(tmp_path / "rec.h5", frames, POS_M[:, 1], POS_M[:, 0])
    s = read_scan(tmp_path / "rec.h5")
    assert s.layout == "record" and s.object_pixel_m == PIXEL
    np.testing.assert_array_equal(s.frames, frames)
    np.testing.assert_allclose(s.positions_m, POS_M)
    assert s.attrs["unique_id"].tolist() == list(range(1, N + 1))
    _record(tmp_path / "nopos.h5", frames, np.full(N, np.nan), np.full(N, np.nan))
    with pytest.raises(NoPositionsError, match=r"/entry/data/position_y_m, position_x_m absent or all NaN"):
        read_scan(tmp_path / "nopos.h5")


# --------------------------------------------------------------------------- bad input
def test_bad_input_names_file_and_key(tmp_path):
    frames = centred_frames()
    p = tmp_path / "bad.npz"
    np.savez(p, reciprocal=frames)
    with pytest.raises(FileFormatError, match=r"bad.npz \(ptychonn-npz\): no positions: .*needs 'position'"):
        read_scan(p)
    np.savez(p, data=frames, scan=np.zeros((1, N - 2, 2)))
    with pytest.raises(FileFormatError, match=rf"bad.npz .*{N - 2} positions in 'scan' for {N} frames"):
        read_scan(p, object_pixel_m=PIXEL)
    pos = POS_M.copy()
    pos[4, 1] = np.nan
    np.savez(p, reciprocal=frames, position=pos)
    with pytest.raises(FileFormatError, match=r"1 position\(s\) in 'position' are NaN .*first: frame 4"):
        read_scan(p)
    np.savez(p, images=frames)
    with pytest.raises(FileFormatError, match=r"unknown NPZ layout \(keys present: images\); expected .*'reciprocal'"):
        read_scan(p)
    np.savez(p, data=frames, scan=POS_M, probe=probe_modes(1, H // 2))
    with pytest.raises(FileFormatError, match=rf"bad.npz .*:probe: the probe is 8x8 but the frames are {H}x{H}"):
        read_scan(p, position_units="m")
    np.savez(p, data=frames, scan=POS_M, probe=np.ones((1, 1, 1, H, H)))
    with pytest.raises(FileFormatError, match=r":probe: the probe must be complex"):
        read_scan(p, position_units="m")
    with h5py.File(tmp_path / "t.cxi", "w") as h5:
        h5["entry_1/data_1/data"] = frames
    with pytest.raises(FileFormatError, match=r"t.cxi \(cxi\): no positions: expected /entry_1/sample_1/geometry_1/"
                                              r"translation or"):
        read_scan(tmp_path / "t.cxi")
    (tmp_path / "t.txt").write_text("not a scan")
    with pytest.raises(FileFormatError, match="t.txt: unknown scan layout"):
        read_scan(tmp_path / "t.txt")
    with pytest.raises(TypeError, match="unknown override.*pixel_size"):
        read_scan(p, pixel_size=1e-8)
    with pytest.raises(FileNotFoundError, match="scan file not found"):
        read_scan(tmp_path / "gone.npz")


# --------------------------------------------------------------------------- Ptychodus readers (optional)
def test_ptychodus_beamline_readers(tmp_path):
    pytest.importorskip("ptychodus.api.plugins")
    frames = centred_frames()
    np.savez(tmp_path / "diffraction.npz", patterns=frames, indexes=np.arange(N)[::-1])
    (tmp_path / "positions.txt").write_text("".join(f"{x:.17g} {y:.17g}\n" for y, x in POS_M))
    s = read_scan(tmp_path / "diffraction.npz", reader="NPZ", positions=tmp_path / "positions.txt",
                  position_reader="TXT", object_pixel_m=PIXEL)
    assert s.layout == "ptychodus" and s.frames.shape == (N, H, H)
    np.testing.assert_array_equal(s.frames, frames)
    np.testing.assert_allclose(s.positions_m, POS_M[::-1])  # joined by the frames' indexes
    with pytest.raises(ValueError, match="no Ptychodus diffraction file reader 'nope'"):
        read_scan(tmp_path / "diffraction.npz", reader="nope")


def test_the_origin_guess_is_not_fooled_by_hot_pixels():
    """Hot pixels (constant, 2000 times brighter than the zero frequency) near the centre of
    corner-origin frames whose central speckle spans a few pixels, as measured ones do: the guess
    still says corner, and centre for the same frames centred."""
    from ptychostream.files.scandata import guess_origin

    yy, xx = np.mgrid[:H, :H] - H // 2
    centred = RNG.poisson(2.0, (N, H, H)) + 500.0 * np.exp(-(yy ** 2 + xx ** 2) / 4.0)
    corner = np.fft.ifftshift(centred, axes=(-2, -1))
    corner[:, H // 2 - 1, H // 2 + 2] = 2 ** 20
    corner[:, H // 2 + 3, H // 2 - 2] = 2 ** 20
    assert guess_origin(corner) == "corner"
    centred[:, 1, 2] = 2 ** 20  # and one near the corner
    assert guess_origin(centred) == "centre"
