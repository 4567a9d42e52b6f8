"""The file readers of ptychostream.files: round trips on small files and the errors they give."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ptychostream.core.frames import BatchResult, ImageFrame
from ptychostream.files.arrays import as_frame_stack, first_layer, first_value
from ptychostream.files.errors import FileFormatError
from ptychostream.files.frames import read_frames
from ptychostream.files.hdf5 import dataset, find_dataset, is_hdf5
from ptychostream.files.mosaic import read_mosaic, write_mosaic_npz
from ptychostream.files.pairs import read_pairs, write_pairs
from ptychostream.files.positions import read_positions
from ptychostream.files.product import Product, read_product, write_product_h5
from ptychostream.files.record import read_record
from ptychostream.files.truth import read_truth, write_truth

RNG = np.random.default_rng(0)
POS = RNG.uniform(-1e-6, 1e-6, (6, 2))  # (y, x) metres


def complex_image(shape, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.0, shape) * np.exp(1j * rng.uniform(-1, 1, shape))).astype(np.complex64)


# --------------------------------------------------------------------------- arrays, hdf5
def test_array_helpers():
    a = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(first_layer(a), a[0, 0])
    assert as_frame_stack(a, "x").shape == (6, 4, 5)
    assert as_frame_stack(np.zeros((4, 5)), "x").shape == (1, 4, 5)
    with pytest.raises(FileFormatError, match="where: frames must be 2-D or more, got shape \\(3,\\)"):
        as_frame_stack(np.zeros(3), "where")
    assert first_value(np.array([[2.5, 1.0]])) == 2.5 and first_value(3) == 3.0


def test_hdf5_lookups(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as h5:
        h5["entry/scan/Probe_Position_Y_m"] = [1.0]
        h5["top"] = [2.0]
    assert is_hdf5(path) and is_hdf5(tmp_path / "named.nxs") and not is_hdf5(tmp_path / "a.csv")
    with h5py.File(path, "r") as h5:
        assert find_dataset(h5, "top") == "top"
        assert find_dataset(h5, "probe_position_y_m") == "/entry/scan/Probe_Position_Y_m"
        assert find_dataset(h5, "nothere") is None
        assert dataset(h5, "top", path)[()][0] == 2.0
        with pytest.raises(FileFormatError, match="f.h5: no dataset 'nope'; datasets present: "
                                                  "/entry/scan/Probe_Position_Y_m, /top"):
            dataset(h5, "nope", path)


# --------------------------------------------------------------------------- positions
def test_positions_round_trip_every_format(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("# a comment\nPosX,PosY\n" + "".join(f"{float(x)!r},{float(y)!r}\n" for y, x in POS))
    npy = tmp_path / "p.npy"
    np.save(npy, POS[:, ::-1])  # (x, y)
    npz = tmp_path / "p.npz"
    np.savez(npz, probe_position_y_m=POS[:, 0], probe_position_x_m=POS[:, 1])
    npz_t = tmp_path / "t.npz"
    np.savez(npz_t, positions=POS.T)  # (2, N)
    h5 = tmp_path / "p.h5"
    with h5py.File(h5, "w") as f:
        f["entry/probe_position_y_m"], f["entry/probe_position_x_m"] = POS[:, 0], POS[:, 1]
    h5_key = tmp_path / "k.hdf5"
    with h5py.File(h5_key, "w") as f:
        f["scan/positions"] = POS
    for path, kw in [(csv, {}), (npy, {"order": "xy"}), (npz, {}), (npz_t, {}), (h5, {}), (h5_key, {})]:
        got = read_positions(path, **kw)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, POS, err_msg=str(path))
    tsv = tmp_path / "um.tsv"
    tsv.write_text("a\tyy\txx\n0\t1.5\t-2\n")
    np.testing.assert_array_equal(read_positions(tsv, y_name="YY", x_name="xx"), [[1.5, -2.0]])


def test_positions_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="positions file not found: .*none.csv"):
        read_positions(tmp_path / "none.csv")
    no_y = tmp_path / "no_y.csv"
    no_y.write_text("x,z\n1,2\n")
    with pytest.raises(KeyError, match="no y column/dataset among \\['x', 'z'\\]"):
        read_positions(no_y)
    with pytest.raises(KeyError, match="no y column/dataset 'height'"):
        read_positions(no_y, y_name="height")
    np.save(tmp_path / "three.npy", np.zeros((4, 3)))
    with pytest.raises(FileFormatError, match="three.npy: a position array must be \\(N, 2\\), got \\(4, 3\\)"):
        read_positions(tmp_path / "three.npy")
    np.savez(tmp_path / "count.npz", probe_position_y_m=np.zeros(3), probe_position_x_m=np.zeros(2))
    with pytest.raises(FileFormatError, match="count.npz: the y and x positions differ in length \\(3 vs 2\\)"):
        read_positions(tmp_path / "count.npz")
    nan = POS.copy()
    nan[4] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(FileFormatError, match="nan.npy: 1 position\\(s\\) are NaN or infinite \\(first: row 4\\)"):
        read_positions(tmp_path / "nan.npy")
    kept = read_positions(tmp_path / "nan.npy", allow_nan=True)
    assert np.isnan(kept[4]).all() and np.array_equal(kept[:4], POS[:4])
    with h5py.File(tmp_path / "none.h5", "w") as f:
        f["other"] = POS
    with pytest.raises(KeyError, match="none.h5: no probe_position_y_m/probe_position_x_m datasets and no 'position'"):
        read_positions(tmp_path / "none.h5")
    (tmp_path / "p.json").write_text("[]")
    with pytest.raises(FileFormatError, match="unknown position file format '.json'"):
        read_positions(tmp_path / "p.json")
    (tmp_path / "bad.csv").write_text("y,x\n1,oops\n")
    with pytest.raises(FileFormatError, match="bad.csv: a row of the y/x columns 'y'/'x' is not a number"):
        read_positions(tmp_path / "bad.csv")


# --------------------------------------------------------------------------- frames
def test_frames_round_trip(tmp_path):
    frames = RNG.poisson(3, (6, 8, 8)).astype(np.uint16)
    h5 = tmp_path / "scan.h5"
    with h5py.File(h5, "w") as f:
        f["exchange/data"] = frames
        f["meta/probe_position_x_m"], f["meta/probe_position_y_m"] = POS[:, 1], POS[:, 0]
        f["other/frames"] = frames[:2]
    d = read_frames(h5)
    np.testing.assert_array_equal(d.frames, frames)
    np.testing.assert_array_equal(d.positions_m, POS)
    assert d.source == f"{h5}:/exchange/data"
    with pytest.raises(FileFormatError, match="6 positions for 2 frames"):  # the positions are for the 6 others
        read_frames(f"{h5}::/other/frames")
    npy = tmp_path / "f.npy"
    np.save(npy, frames.reshape(2, 3, 8, 8))
    d = read_frames(npy)
    assert d.frames.shape == (6, 8, 8) and d.positions_m is None
    npz = tmp_path / "f.npz"
    write_pairs(npz, frames, np.ones((6, 4, 4), np.complex64), POS / 1e-8, 1e-8)  # positions in pixels
    d = read_frames(npz)
    np.testing.assert_array_equal(d.frames, frames)
    np.testing.assert_allclose(d.positions_m, POS, rtol=1e-12)


def test_frames_errors(tmp_path):
    h5 = tmp_path / "empty.h5"
    with h5py.File(h5, "w") as f:
        f["nothing"] = np.zeros(3)
    with pytest.raises(FileFormatError, match="empty.h5: no frames: looked for /entry/data/data, /exchange/data, "
                                              "/dp; datasets present: /nothing"):
        read_frames(h5)
    with pytest.raises(FileFormatError, match="frames must be 2-D or more"):
        read_frames(h5, "/nothing")
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(FileFormatError, match="k.npz: missing 'reciprocal' \\(keys present: images\\)"):
        read_frames(tmp_path / "k.npz")
    np.savez(tmp_path / "c.npz", reciprocal=np.zeros((3, 4, 4)), position=np.zeros((2, 2)))
    with pytest.raises(FileFormatError, match="2 positions for 3 frames"):
        read_frames(tmp_path / "c.npz")
    (tmp_path / "t.txt").write_text("frames")
    with pytest.raises(FileFormatError, match="t.txt: not an HDF5, .npz or .npy file"):
        read_frames(tmp_path / "t.txt")
    with pytest.raises(FileNotFoundError, match="replay file not found"):
        read_frames(tmp_path / "gone.h5")


# --------------------------------------------------------------------------- PtychoNN pairs
def test_pairs_round_trip_and_layouts(tmp_path):
    frames = RNG.poisson(3, (6, 8, 8)).astype(np.float32)
    patches = complex_image((6, 4, 4))
    path = tmp_path / "pairs.npz"
    write_pairs(path, frames, patches, POS, 2e-8)
    d = read_pairs(path)
    np.testing.assert_array_equal(d.frames, frames)
    np.testing.assert_allclose(d.phase, np.angle(patches))
    np.testing.assert_allclose(d.amplitude, np.abs(patches))
    np.testing.assert_array_equal(d.positions_m, POS)  # metres already: not scaled
    assert d.pixel_m == 2e-8
    chan = tmp_path / "chan.npz"  # (N, 1, H, W) frames, (N, 2, h, w) phase / amplitude channels
    np.savez(chan, reciprocal=frames[:, None], real=np.stack([np.angle(patches), np.abs(patches)], axis=1))
    d = read_pairs(chan)
    assert d.frames.shape == (6, 8, 8) and d.positions_m is None and d.pixel_m is None
    np.testing.assert_allclose(d.amplitude, np.abs(patches))
    np.savez(chan, reciprocal=frames, real=np.angle(patches))  # phase only
    d = read_pairs(chan)
    assert d.amplitude is None
    np.testing.assert_allclose(d.phase, np.angle(patches))


def test_pairs_errors(tmp_path):
    frames = np.zeros((3, 8, 8), np.float32)
    cases = {
        "empty": ({}, "the NPZ file is empty"),
        "keys": ({"frames": frames}, "missing 'reciprocal', 'real' \\(keys present: frames\\)"),
        "shape": ({"reciprocal": frames[0], "real": frames}, "'reciprocal' must be \\(N, H, W\\), got shape \\(8, 8\\)"),
        "dtype": ({"reciprocal": frames.astype(np.complex64), "real": frames}, "must be real intensities"),
        "channels": ({"reciprocal": frames, "real": np.zeros((3, 3, 4, 4))},
                     "real-valued 'real' must be \\(N, C, h, w\\).*got shape \\(3, 3, 4, 4\\)"),
        "complex": ({"reciprocal": frames, "real": np.zeros((3, 2, 4, 4), np.complex64)},
                    "complex 'real' must be \\(N, h, w\\)"),
        "position": ({"reciprocal": frames, "real": frames, "position": np.zeros(3)}, "position: a position array"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(FileFormatError, match=f"{name}.npz.*{message}"):
            read_pairs(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FileFormatError, match="junk.npz: cannot read as NPZ"):
        read_pairs(tmp_path / "junk.npz")


# --------------------------------------------------------------------------- products and truth
def product_file(path, obj, probe, positions, center=(0.0, 0.0)):
    with h5py.File(path, "w") as h5:
        write_product_h5(h5, Product(obj, 1e-8, center, probe=probe, probe_pixel_m=2e-8, positions_m=positions))
    return path


def test_product_round_trip(tmp_path):
    obj, probe = complex_image((16, 20)), complex_image((4, 4), seed=2)
    path = product_file(tmp_path / "p.h5", obj, probe, POS, center=(3e-7, -1e-7))
    with h5py.File(path) as h5:  # the Ptychodus layout
        assert h5["object"].shape == (1, 16, 20) and h5["probe"].shape == (1, 1, 4, 4)
        np.testing.assert_array_equal(h5["probe_position_indexes"][()], np.arange(6))
        assert h5["object"].attrs["center_x_m"] == -1e-7 and h5["object"].attrs["pixel_height_m"] == 1e-8
    p = read_product(path)
    np.testing.assert_array_equal(p.object, obj)
    np.testing.assert_array_equal(p.probe, probe)
    np.testing.assert_array_equal(p.positions_m, POS)
    assert p.pixel_m == 1e-8 and p.probe_pixel_m == 2e-8 and p.center_m == (3e-7, -1e-7)
    npz = tmp_path / "p.npz"
    np.savez(npz, object=obj[None], pixelsize=np.array([5e-9]))
    p = read_product(npz)
    np.testing.assert_array_equal(p.object, obj)
    assert p.pixel_m == 5e-9 and p.positions_m is None and p.probe is None


def test_product_errors(tmp_path):
    obj = complex_image((16, 16))
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as h5:
        h5["object"] = obj[None]
        h5["object"].attrs["pixel_width_m"] = 1e-8
    with pytest.raises(FileFormatError, match="bare.h5: not a Ptychodus product, missing probe_position_x_m, "
                                              "probe_position_y_m"):
        read_product(bare)
    assert read_product(bare, need_positions=False).positions_m is None
    nan = POS.copy()
    nan[2, 1] = np.inf
    with pytest.raises(FileFormatError, match="nan.h5: 1 position\\(s\\) are NaN or infinite \\(first: row 2\\)"):
        read_product(product_file(tmp_path / "nan.h5", obj, obj[:4, :4], nan))
    with h5py.File(tmp_path / "nopx.h5", "w") as h5:
        h5["object"] = obj
    with pytest.raises(FileFormatError, match="nopx.h5: 'object' has no pixel_width_m attribute"):
        read_product(tmp_path / "nopx.h5", need_positions=False)
    np.savez(tmp_path / "real.npz", object=np.abs(obj), pixelsize=1e-8)
    with pytest.raises(FileFormatError, match="real.npz: 'object' must be complex \\(layers, H, W\\), got float32"):
        read_product(tmp_path / "real.npz")
    np.savez(tmp_path / "nopix.npz", object=obj)
    with pytest.raises(FileFormatError, match="nopix.npz: not a product NPZ, missing pixelsize"):
        read_product(tmp_path / "nopix.npz")
    with pytest.raises(FileNotFoundError, match="product file not found"):
        read_product(tmp_path / "gone.h5")


def test_truth_round_trip(tmp_path):
    obj, probe = complex_image((16, 16)), complex_image((4, 4), seed=2)
    asked: list[list[int]] = []
    stack = complex_image((6, 4, 4), seed=3)

    def patches(idx):
        asked.append(idx.tolist())
        return stack[idx]

    path = tmp_path / "truth.h5"
    write_truth(path, Product(obj, 1e-8, (0.0, 0.0), probe=probe, positions_m=POS), patches,
                np.array([0, 2, 5]), np.array([7, 9]), {"size": 4, "dtype": "uint16"}, chunk=2)
    assert asked == [[0, 2], [5]]
    t = read_truth(path)
    np.testing.assert_array_equal(t["object"], obj)
    np.testing.assert_array_equal(t["probe"], probe)
    np.testing.assert_array_equal(t["positions_m"], POS)
    np.testing.assert_array_equal(t["patches"], stack[[0, 2, 5]])
    np.testing.assert_array_equal(t["patch_indexes"], [0, 2, 5])
    np.testing.assert_array_equal(t["hot_pixel_indexes"], [7, 9])
    np.testing.assert_array_equal(t["position_indexes"], np.arange(6))
    assert t["probe_pixel_m"] == 1e-8  # the object's pixel when none is given
    assert t["attrs"] == {"size": 4, "dtype": "uint16"} and type(t["attrs"]["size"]) is int
    no_probe = tmp_path / "no_probe.h5"
    with h5py.File(no_probe, "w") as h5:
        h5["object"] = obj
    with pytest.raises(FileFormatError, match="no_probe.h5: not a ground-truth file, missing probe, "
                                              "probe_position_x_m, probe_position_y_m"):
        read_truth(no_probe)


# --------------------------------------------------------------------------- record and mosaic
class Mosaic:
    """The parts of a MosaicImage the recorder writes."""

    phase = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    amplitude = None
    coverage = np.ones((3, 4), np.float32)
    pixel_m, origin_m, n_patches = 1e-8, (-2e-8, 3e-8), 2


def test_record_written_by_the_recorder_reads_back(tmp_path):
    from ptychostream.pipeline.record import Recorder

    path = tmp_path / "rec.h5"
    frames = [ImageFrame(np.full((4, 4), k, np.uint16), unique_id=k + 1, timestamp=100.0 + k,
                         attributes={"PositionX": 1e-8 * k, "PositionY": 2e-8 * k} if k else {}) for k in range(3)]
    phase = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    rec = Recorder(str(path), frames=True)
    rec.submit(BatchResult(frames, {"phase": phase}, np.array([1e-3, 2e-3, 3e-3]), "model-a"))
    rec.close(Mosaic())
    r = read_record(path)
    np.testing.assert_array_equal(r["data"]["phase"], phase)
    np.testing.assert_array_equal(r["data"]["unique_id"], [1, 2, 3])
    np.testing.assert_array_equal(r["data"]["position_y_m"], [np.nan, 2e-8, 4e-8])
    np.testing.assert_allclose(r["data"]["latency_ms"], [1, 2, 3])
    np.testing.assert_array_equal(r["frames"], np.stack([f.array for f in frames]))
    assert r["attrs"]["model_id"] == "model-a"
    assert r["mosaic"]["n_patches"] == 2 and r["mosaic"]["origin_x_m"] == 3e-8
    # the scorer's mosaic reader finds the same mosaic in the record
    m = read_mosaic(path)
    np.testing.assert_array_equal(m.phase, Mosaic.phase)
    np.testing.assert_array_equal(m.coverage, Mosaic.coverage)
    assert m.origin_m == (-2e-8, 3e-8) and m.pixel_m == 1e-8 and m.source == f"{path}:/entry/mosaic/phase"
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["entry/x"] = [1]
    with pytest.raises(FileFormatError, match="other.h5: not a ptychostream record \\(no /entry/data group\\)"):
        read_record(tmp_path / "other.h5")


def test_record_reader_stops_at_the_last_flush_and_tells_complete_from_cut(tmp_path):
    """A record whose writer did not close it reads up to ``frames_flushed``; older records (no
    ``complete`` attribute) are complete when they have an ``end_time``."""
    from ptychostream.files.record import check_record

    cut = tmp_path / "cut.h5"
    with h5py.File(cut, "w") as h5:
        h5.create_group("entry").attrs.update({"complete": False, "model_id": "m"})
        h5["entry/frames_flushed"] = [2]
        h5["entry/flush_time"] = [1.7e9]
        h5["entry/data/phase"] = np.arange(3 * 4, dtype=np.float32).reshape(3, 2, 2)  # row 3: past the flush
        h5["entry/data/unique_id"] = [5, 6, 0]
        h5["entry/data/position_x_m"] = [1e-8, np.nan, 0.0]
        h5["entry/data/position_y_m"] = [1e-8, 2e-8, 0.0]
        h5["entry/instrument/detector/data"] = np.ones((3, 4, 4), np.uint16)
    r = read_record(cut)
    assert r["n_frames"] == 2 and r["complete"] is False
    np.testing.assert_array_equal(r["data"]["unique_id"], [5, 6])
    assert r["data"]["phase"].shape == (2, 2, 2) and r["frames"].shape == (2, 4, 4)
    s = check_record(cut)
    assert (s.frames, s.complete, s.outputs, s.positions, s.diffraction, s.mosaic) == (2, False, ("phase",), 1,
                                                                                     (2, 4, 4), None)
    assert s.last_flush == 1.7e9 and "cut at frame 2: the writer did not close the record" in s.describe()
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as h5:
        h5.create_group("entry").attrs["end_time"] = "2026-01-01T00:00:00+0000"
        h5["entry/data/unique_id"] = [1, 2, 3]
    r = read_record(old)
    assert r["n_frames"] == 3 and r["complete"] is True
    assert "complete: closed 2026-01-01T00:00:00+0000" in check_record(old).describe()
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\0" * 1000)
    with pytest.raises(FileFormatError, match="garbage.h5: not readable as HDF5"):
        read_record(garbage)


def test_mosaic_npz_round_trip(tmp_path):
    phase = np.linspace(-1, 1, 20).reshape(4, 5)
    path = tmp_path / "saved.npz"
    write_mosaic_npz(path, phase, np.full((4, 5), 0.5), phase > 0, (1e-7, -2e-7), 4e-9, amplitude=np.ones((4, 5)))
    m = read_mosaic(path)
    np.testing.assert_array_equal(m.phase, phase)
    np.testing.assert_array_equal(m.coverage, np.full((4, 5), 0.5))
    np.testing.assert_array_equal(m.mask, phase > 0)
    assert m.origin_m == (1e-7, -2e-7) and m.pixel_m == 4e-9 and m.source == f"{path}:phase"
    with np.load(path) as z:
        np.testing.assert_array_equal(z["amplitude"], np.ones((4, 5)))


def test_mosaic_files(tmp_path):
    phase = np.linspace(0, 1, 20).reshape(4, 5)
    npz = tmp_path / "m.npz"
    np.savez(npz, phase=phase, mask=phase > 0.5, origin_m=np.array([1e-7, 2e-7]), pixel_m=5e-9)
    m = read_mosaic(npz)
    np.testing.assert_array_equal(m.phase, phase)
    np.testing.assert_array_equal(m.mask, phase > 0.5)
    assert m.coverage is None and m.origin_m == (1e-7, 2e-7) and m.pixel_m == 5e-9
    npy = tmp_path / "c.npy"
    np.save(npy, np.exp(1j * phase)[None])
    m = read_mosaic(npy)
    np.testing.assert_allclose(m.phase, phase, atol=1e-12)
    assert m.origin_m is None and m.pixel_m is None
    h5 = tmp_path / "g.h5"
    with h5py.File(h5, "w") as f:
        g = f.create_group("result")
        g.attrs.update(pixel_width_m=7e-9, origin_y_m=0.0, origin_x_m=1e-8)
        g["img"] = phase
    m = read_mosaic(f"{h5}::/result/img")  # a dataset: its group's attributes count
    assert m.pixel_m == 7e-9 and m.origin_m == (0.0, 1e-8)
    with pytest.raises(FileFormatError, match="g.h5: no mosaic: looked for a 'phase' dataset in /entry/mosaic, "
                                              "/mosaic, /"):
        read_mosaic(h5)
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(FileFormatError, match="cube.npy: the mosaic must be a 2-D image, got shape \\(2, 3, 4\\)"):
        read_mosaic(tmp_path / "cube.npy")
    np.savez(tmp_path / "none.npz", other=phase)
    with pytest.raises(FileFormatError, match="none.npz: no 'phase' array \\(keys: other\\)"):
        read_mosaic(tmp_path / "none.npz")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(FileFormatError, match="junk.npy: cannot read the mosaic"):
        read_mosaic(tmp_path / "junk.npy")
