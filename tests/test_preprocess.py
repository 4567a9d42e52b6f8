"""Pre-processing against hand-written numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptychostream.model.preprocess import Preprocess, finite_mask


@pytest.fixture
def frames() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.poisson(20.0, (3, 12, 12)).astype(np.uint16)


def test_identity_is_float32_copy(frames):
    out = Preprocess().apply(frames)
    assert out.dtype == np.float32 and out.shape == frames.shape
    np.testing.assert_array_equal(out, frames.astype(np.float32))


def test_centre_crop_default_and_explicit(frames):
    out = Preprocess(crop_size=4).apply(frames)
    np.testing.assert_array_equal(out, frames[:, 4:8, 4:8])  # centre (6, 6) → rows 4..7
    out = Preprocess(crop_size=4, crop_center=(2, 9)).apply(frames)
    np.testing.assert_array_equal(out, frames[:, 0:4, 7:11])


def test_bin_sums_blocks(frames):
    out = Preprocess(bin=3).apply(frames)
    want = frames.astype(np.float64).reshape(3, 4, 3, 4, 3).sum(axis=(2, 4))
    np.testing.assert_array_equal(out, want)
    assert out.shape == (3, 4, 4)


def test_bin_of_large_uint16_does_not_overflow():
    raw = np.full((2, 8, 8), 60000, dtype=np.uint16)
    out = Preprocess(bin=4).apply(raw)
    np.testing.assert_array_equal(out, np.full((2, 2, 2), 16 * 60000.0))


@pytest.mark.parametrize("shape", [(12, 12), (9, 11)])
def test_fftshift_matches_numpy(shape):
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 1000, (2, *shape)).astype(np.int32)
    out = Preprocess(fftshift=True).apply(raw)
    np.testing.assert_array_equal(out, np.fft.fftshift(raw, axes=(1, 2)))


def test_fftshift_crop_bin_together():
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 500, (4, 20, 20)).astype(np.uint16)
    pre = Preprocess(fftshift=True, crop_size=8, crop_center=(9, 11), bin=2)
    shifted = np.fft.fftshift(raw.astype(np.float64), axes=(1, 2))
    crop = shifted[:, 5:13, 7:15]
    want = crop.reshape(4, 4, 2, 4, 2).sum(axis=(2, 4))
    np.testing.assert_allclose(pre.apply(raw), want, rtol=1e-6)


def test_dark_and_threshold():
    rng = np.random.default_rng(4)
    raw = rng.poisson(10.0, (3, 8, 8)).astype(np.uint16)
    dark = rng.normal(10.0, 2.0, (8, 8)).astype(np.float32)
    diff = raw.astype(np.float32) - dark
    # the default threshold 0 clips what the dark subtraction leaves negative
    np.testing.assert_allclose(Preprocess(dark=dark).apply(raw), np.where(diff < 0, 0, diff), rtol=1e-6)
    np.testing.assert_allclose(Preprocess(dark=dark, threshold=3.0).apply(raw),
                               np.where(diff < 3.0, 0, diff), rtol=1e-6)
    # dark is in raw coordinates: subtracted before the fftshift and crop
    pre = Preprocess(dark=dark, threshold=1.5, fftshift=True, crop_size=4)
    want = np.fft.fftshift(np.where(diff < 1.5, 0, diff), axes=(1, 2))[:, 2:6, 2:6]
    np.testing.assert_allclose(pre.apply(raw), want, rtol=1e-6)


def test_threshold_without_dark_on_floats():
    raw = np.array([[[-2.0, 0.5], [1.0, 3.0]]])
    np.testing.assert_array_equal(Preprocess().apply(raw), [[[0.0, 0.5], [1.0, 3.0]]])
    np.testing.assert_array_equal(Preprocess(threshold=1.0).apply(raw), [[[0.0, 0.0], [1.0, 3.0]]])


@pytest.mark.parametrize("scale,fn", [("log1p", np.log1p), ("sqrt", np.sqrt)])
def test_scale(frames, scale, fn):
    np.testing.assert_allclose(Preprocess(scale=scale).apply(frames),
                               fn(frames.astype(np.float64)), rtol=1e-6)


def test_bin_then_scale_order(frames):
    want = np.log1p(frames.astype(np.float64).reshape(3, 6, 2, 6, 2).sum(axis=(2, 4)))
    np.testing.assert_allclose(Preprocess(bin=2, scale="log1p").apply(frames), want, rtol=1e-6)


@pytest.mark.parametrize("mode", ["max", "sum", "mean", "fixed"])
def test_normalise(frames, mode):
    f = frames.astype(np.float64)
    pre = Preprocess(normalise=mode, norm_value=250.0)
    norm = {"max": f.max(axis=(1, 2)), "sum": f.sum(axis=(1, 2)), "mean": f.mean(axis=(1, 2)),
            "fixed": np.full(3, 250.0)}[mode]
    np.testing.assert_allclose(pre.apply(frames), f / norm[:, None, None], rtol=1e-5)


def test_normalise_leaves_empty_frame_zero():
    raw = np.zeros((2, 4, 4), dtype=np.uint16)
    raw[1, 0, 0] = 8
    out = Preprocess(normalise="max").apply(raw)
    assert np.all(out[0] == 0) and np.isfinite(out).all()
    assert out[1, 0, 0] == 1.0 and out[1].sum() == 1.0


def test_out_parameter_and_dtypes(frames):
    pre = Preprocess(crop_size=8, bin=2, scale="sqrt")
    out = np.empty((3, 4, 4), np.float32)
    res = pre.apply(frames, out=out)
    assert res is out
    for dtype in (np.int16, np.int32, np.float32, np.float64, np.uint8):
        np.testing.assert_allclose(pre.apply(frames.astype(dtype)), out, rtol=1e-6)
    with pytest.raises(ValueError, match="out must be float32"):
        pre.apply(frames, out=np.empty((3, 8, 8), np.float32))


def test_single_frame(frames):
    out = Preprocess(crop_size=6).apply(frames[0])
    assert out.shape == (6, 6)
    np.testing.assert_array_equal(out, frames[0, 3:9, 3:9])


def test_output_shape():
    pre = Preprocess(crop_size=512, bin=4)
    assert pre.output_shape((516, 516)) == (128, 128)
    assert pre.output_shape((7, 516, 516)) == (7, 128, 128)
    assert Preprocess(bin=2).output_shape((256, 128)) == (128, 64)
    with pytest.raises(ValueError, match="larger than the frame"):
        pre.output_shape((256, 256))
    with pytest.raises(ValueError, match="leaves the frame"):
        Preprocess(crop_size=100, crop_center=(20, 258)).output_shape((516, 516))
    with pytest.raises(ValueError, match="multiple of bin"):
        Preprocess(bin=3).output_shape((128, 128))
    with pytest.raises(ValueError, match="dark frame shape"):
        Preprocess(dark=np.zeros((10, 10))).output_shape((12, 12))


def test_fit_to():
    pre = Preprocess(fftshift=True, scale="log1p").fit_to((516, 516), (128, 128))
    assert (pre.crop_size, pre.bin) == (512, 4)
    assert pre.fftshift and pre.scale == "log1p"
    assert pre.output_shape((516, 516)) == (128, 128)
    same = Preprocess().fit_to((128, 128), (128, 128))
    assert (same.crop_size, same.bin) == (None, 1)
    assert Preprocess().fit_to((256, 256), (128, 128)).bin == 2
    # settings that already fit are kept (crop 256 + bin 2 instead of crop 512 + bin 4)
    kept = Preprocess(crop_size=256, bin=2).fit_to((516, 516), (128, 128))
    assert (kept.crop_size, kept.bin) == (256, 2)
    assert Preprocess().fit_to((516, 516), (128, 128), max_bin=2).crop_size == 256
    with pytest.raises(ValueError, match="cannot fit"):
        Preprocess().fit_to((100, 100), (128, 128))


def test_json_round_trip():
    pre = Preprocess(fftshift=True, crop_size=256, crop_center=(250, 260), bin=2,
                     dark=np.ones((516, 516)), threshold=1.5, scale="sqrt", normalise="fixed",
                     norm_value=3.0, dark_path="/data/dark.npy")
    text = pre.to_json()
    d = json.loads(text)
    assert "dark" not in d and d["dark_path"] == "/data/dark.npy"
    back = Preprocess.from_json(text)
    assert back == pre
    assert back.dark is None and back.crop_center == (250, 260)
    assert Preprocess.from_json(Preprocess().to_json()) == Preprocess()


def test_from_json_rejects_bad_input():
    with pytest.raises(ValueError, match="not valid JSON"):
        Preprocess.from_json("{not json")
    with pytest.raises(ValueError, match="unknown pre-processing setting.*colour"):
        Preprocess.from_json('{"colour": 1}')
    with pytest.raises(ValueError, match="scale must be one of"):
        Preprocess.from_json('{"scale": "log10"}')


@pytest.mark.parametrize("kw,msg", [
    ({"scale": "log"}, "scale must be one of"),
    ({"normalise": "l2"}, "normalise must be one of"),
    ({"bin": 0}, "bin must be an integer"),
    ({"crop_size": 10, "bin": 3}, "not a multiple of bin"),
    ({"crop_size": -4}, "crop_size must be a positive integer"),
    ({"crop_center": (1, 2, 3)}, "crop_center must be"),
    ({"normalise": "fixed", "norm_value": 0.0}, "norm_value > 0"),
    ({"threshold": float("nan")}, "threshold must be finite"),
    ({"dark": np.zeros((2, 3, 3))}, "dark must be one 2-D frame"),
])
def test_validate(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Preprocess(**kw).validate()
    with pytest.raises(ValueError, match=msg):
        Preprocess(**kw).apply(np.zeros((1, 12, 12)))


def test_finite_mask():
    f = np.ones((4, 5, 5), np.float32)
    f[1, 2, 2] = np.nan
    f[2, 0, 4] = np.inf
    np.testing.assert_array_equal(finite_mask(f), [True, False, False, True])
    np.testing.assert_array_equal(finite_mask(np.zeros((3, 4, 4), np.uint16)), [True] * 3)
    assert finite_mask(f[1]).tolist() == [False]


def test_plan_cache_follows_field_changes(frames):
    pre = Preprocess(crop_size=4)
    first = pre.apply(frames)
    pre.crop_size = 6
    np.testing.assert_array_equal(pre.apply(frames), frames[:, 3:9, 3:9])
    assert first.shape == (3, 4, 4)


# -- orientation, bad pixels, and the instrument/model split (issue #13) -----------------------------------
def _oriented(a: np.ndarray, transpose: bool, flip_y: bool, flip_x: bool) -> np.ndarray:
    """What :meth:`ptychostream.files.scan.Scan.canonical_frames` makes of centred frames: the
    device and the training data must orient alike (a flip reverses the frequencies)."""
    from ptychostream.files.scan import Scan

    scan = Scan(a, np.zeros((len(a), 2)), origin="centre", transpose=transpose, flip_y=flip_y, flip_x=flip_x)
    return scan.canonical_frames()


@pytest.mark.parametrize("transpose,flip_y,flip_x", [(True, False, False), (False, True, False),
                                                     (False, False, True), (True, True, True)])
def test_orientation_matches_numpy(transpose, flip_y, flip_x):
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 900, (3, 9, 14)).astype(np.uint16)  # not square: a transpose changes the shape
    pre = Preprocess(transpose=transpose, flip_y=flip_y, flip_x=flip_x)
    want = _oriented(raw.astype(np.float32), transpose, flip_y, flip_x)
    assert pre.output_shape(raw.shape) == want.shape
    np.testing.assert_array_equal(pre.apply(raw), want)
    out = np.empty(want.shape, np.float32)
    assert pre.apply(raw, out=out) is out
    np.testing.assert_array_equal(out, want)


def test_orientation_of_a_centred_crop_is_orientation_of_the_raw_frame():
    """With the default (centred) crop and no binning, orienting the output equals orienting the
    raw frame first but for the crop's edge row (with binning, within half a bin of that)."""
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 500, (2, 24, 24)).astype(np.uint16)
    kw = {"fftshift": True, "crop_size": 16, "bin": 1, "scale": "sqrt", "normalise": "max"}
    oriented_raw = np.ascontiguousarray(_oriented(np.fft.fftshift(raw, axes=(1, 2)), True, True, False))
    want = Preprocess(**{**kw, "fftshift": False}).apply(oriented_raw)
    got = Preprocess(**kw, transpose=True, flip_y=True).apply(raw)
    # the crop's first row is its own mirror (-N/2 = N/2 mod N), the raw frame's comes from outside the crop
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-6)
    assert np.unravel_index(np.argmax(Preprocess(crop_size=16, flip_y=True, flip_x=True).apply(
        np.pad(np.ones((1, 1)), ((12, 11), (12, 11))))), (16, 16)) == (8, 8)  # the zero frequency stays put


def test_bad_pixel_mask_zeroes_pixels_before_threshold_and_bin():
    raw = np.full((2, 8, 8), 10, dtype=np.uint16)
    raw[:, 1, 2] = 60000  # a hot pixel
    mask = np.zeros((8, 8), bool)
    mask[1, 2] = True
    out = Preprocess(mask=mask, bin=2).apply(raw)
    assert out[0, 0, 1] == 30.0 and out[0, 0, 0] == 40.0  # 3 good pixels of 10 in the hot pixel's block
    with pytest.raises(ValueError, match="mask frame shape"):
        Preprocess(mask=np.zeros((4, 4), bool)).apply(raw)


def test_every_setting_is_either_the_instruments_or_the_models():
    from dataclasses import fields

    from ptychostream.model.preprocess import INSTRUMENT_FIELDS, MODEL_FIELDS

    assert set(INSTRUMENT_FIELDS) | set(MODEL_FIELDS) == {f.name for f in fields(Preprocess)}
    assert not set(INSTRUMENT_FIELDS) & set(MODEL_FIELDS)


def test_for_model_keeps_the_instrument_and_takes_the_models_settings():
    dark = np.ones((64, 64))
    device = Preprocess(fftshift=True, flip_y=True, transpose=True, crop_center=(30, 34), threshold=2.0,
                        dark=dark, dark_path="/d.npy", crop_size=16, bin=1, scale="none")
    model = Preprocess(fftshift=False, flip_x=True, threshold=5.0, crop_size=32, bin=2, scale="sqrt",
                       normalise="fixed", norm_value=4.0)
    joined, ignored = device.for_model(model)
    assert joined.instrument() == device.instrument() and joined.dark is dark
    assert (joined.crop_size, joined.bin, joined.scale, joined.normalise, joined.norm_value) == (32, 2, "sqrt",
                                                                                                  "fixed", 4.0)
    # what the model names for the detector is reported, not applied; its defaults say nothing
    assert ignored == {"flip_x": (False, True), "threshold": (2.0, 5.0)}


def test_json_round_trip_of_orientation_and_mask_path():
    pre = Preprocess(flip_y=True, transpose=True, mask=np.zeros((4, 4)), mask_path="/m.npy")
    d = json.loads(pre.to_json())
    assert d["flip_y"] is True and d["flip_x"] is False and d["transpose"] is True and "mask" not in d
    back = Preprocess.from_json(pre.to_json())
    assert back == pre and back.mask is None and back.mask_path == "/m.npy"
    # a model written before orientation existed reads as unflipped
    assert Preprocess.from_json('{"fftshift": true}').instrument() == Preprocess(fftshift=True).instrument()


@pytest.mark.parametrize("shape, crop, centre, b", [
    ((16, 16), None, None, 2),      # a whole-frame shift: both axes wrap
    ((16, 16), None, None, 4),
    ((15, 17), None, None, 1),      # odd sizes
    ((20, 20), 8, (9, 11), 2),      # a crop that wraps on both axes
    ((20, 20), 8, (10, 4), 1),      # wraps on rows only
    ((20, 24), 12, None, 3),        # centre crop after the shift: no wrap, slices
])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_fftshift_gather_matches_numpy_and_is_contiguous(shape, crop, centre, b, dtype):
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 500, (3, *shape)).astype(dtype)
    dark = rng.uniform(0, 5, shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[1, 2] = True
    H, W = shape
    ch, cw = (crop, crop) if crop else (H, W)
    cy, cx = centre or (H // 2, W // 2)
    rows, cols = slice(cy - ch // 2, cy - ch // 2 + ch), slice(cx - cw // 2, cx - cw // 2 + cw)

    def want(frames: np.ndarray) -> np.ndarray:
        region = np.fft.fftshift(frames.astype(np.float64), axes=(1, 2))[:, rows, cols]
        n, h, w = region.shape
        return region.reshape(n, h // b, b, w // b, b).sum(axis=(2, 4))

    out = Preprocess(fftshift=True, crop_size=crop, crop_center=centre, bin=b).apply(raw)
    assert out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_allclose(out, want(raw), rtol=1e-6)
    pixel = Preprocess(fftshift=True, crop_size=crop, crop_center=centre, bin=b, dark=dark, mask=mask)
    np.testing.assert_allclose(pixel.apply(raw), want(np.maximum(np.where(mask, 0, raw - dark), 0)), rtol=1e-5)
