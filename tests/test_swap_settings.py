"""Issue #13, build item 2: instrument settings belong to the device, model settings to the model.

A hot swap (ModelPath) keeps what the operator set for the detector (origin/fftshift, orientation,
crop centre, threshold, dark frame) and takes from the new model only what it was trained with
(crop size and binning, i.e. its input size, the scaling and the normalisation). The model's
own instrument keys are reported, never applied. Driven in-process through the device state.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import wait_for

from ptychostream.core.frames import ImageFrame
from ptychostream.devices.reconstructor import MODEL_READY, Reconstructor
from ptychostream.model.infer import open_model
from ptychostream.model.preprocess import NORMALISATIONS, SCALES, Preprocess
from ptychostream.model.zoo import build_ptychonn_onnx

RAW = 96  #: detector frames RAW x RAW
SIZE = 32  #: model input

#: what the operator set for this detector
INSTRUMENT = {"PreFFTShift": 1, "PreFlipY": 1, "PreTranspose": 1, "PreFlipX": 0, "PreCropX": 46, "PreCropY": 50,
              "PreThreshold": 2.0}


def model(path, pre: Preprocess, seed: int) -> str:
    return build_ptychonn_onnx(path, size=SIZE, heads=("phase",), base_channels=2, depth=2, seed=seed,
                               metadata={"ptychostream.preprocess": pre.to_json()})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("swap")
    first = model(d / "first.onnx", Preprocess(crop_size=32, bin=1), seed=0)
    # trained elsewhere: its metadata also names detector settings (fftshift off, a column flip, a
    # threshold, a dark frame), which are the instrument's to set, not the model's
    second = model(d / "second.onnx", Preprocess(fftshift=False, flip_x=True, threshold=7.0,
                                                 dark_path=str(d / "models-dark.npy"), crop_size=64, bin=2,
                                                 scale="sqrt", normalise="max"), seed=1)
    dark = np.random.default_rng(0).uniform(0, 3, (RAW, RAW)).astype(np.float32)
    np.save(d / "dark.npy", dark)
    return first, second, str(d / "dark.npy"), dark


@pytest.fixture
def rec():
    r = Reconstructor()
    r.start()
    yield r
    r.stop()


def load(r: Reconstructor, path: str) -> None:
    r.device.put("ModelPath", path)
    wait_for(lambda: r.device.get("ModelPath_RBV") == path and r.device.get("ModelStatus_RBV") == MODEL_READY,
             timeout=30, message=f"{path} serving")


def phase_of(r: Reconstructor, raw: np.ndarray, uid: int, seen: dict[int, np.ndarray]) -> np.ndarray:
    r.device.put_image("Input", ImageFrame(raw, unique_id=uid))
    wait_for(lambda: uid in seen, timeout=10, message=f"Phase of frame {uid}")
    return seen[uid]


def serve_with_instrument_settings(rec: Reconstructor, model) -> dict[int, np.ndarray]:
    """Enable, publish every frame, load ``model`` and put the INSTRUMENT settings; returns the
    Phase outputs by uniqueId, filled as they are published."""
    d = rec.device
    seen: dict[int, np.ndarray] = {}
    d.add_image_sink(lambda spec, f: seen.__setitem__(f.unique_id, np.array(f.array)) if spec.suffix == "Phase"
                     else None)
    for name, value in {"Enable": 1, "PublishRate": 0}.items():
        d.put(name, value)
    load(rec, model)
    for name, value in INSTRUMENT.items():
        d.put(name, value)
    return seen


def test_swap_keeps_instrument_settings_and_takes_the_models(rec, models):
    first, second, dark_path, dark = models
    d = rec.device
    seen = serve_with_instrument_settings(rec, first)
    d.put("PreDarkPath", dark_path).done.result(timeout=10)  # a file read: the put completes later
    assert d.get("PreDarkPath_RBV") == dark_path
    raw = np.random.default_rng(1).poisson(30, (RAW, RAW)).astype(np.uint16)
    before = phase_of(rec, raw, 1, seen)

    load(rec, second)

    # the instrument settings did not move ...
    for name, value in INSTRUMENT.items():
        assert d.get(name + "_RBV") == value and d.get(name) == value, name
    assert d.get("PreDarkPath_RBV") == dark_path
    # ... the model's settings did
    assert (d.get("PreCropSize_RBV"), d.get("PreBin_RBV")) == (64, 2)
    assert SCALES[d.get("PreScale_RBV")] == "sqrt" and NORMALISATIONS[d.get("PreNormalise_RBV")] == "max"
    # and what the model said about the detector is reported, not applied
    said = d.messages.format(4000)
    assert "flip_x Yes (PreFlipX stays No)" in said and "threshold 7.0 (PreThreshold stays 2.0)" in said
    assert "PreDarkPath stays" in said

    # frames go through the device's detector settings and the new model's own
    want_pre = Preprocess(fftshift=True, flip_y=True, transpose=True, crop_center=(50, 46), threshold=2.0, dark=dark,
                          crop_size=64, bin=2, scale="sqrt", normalise="max")
    with open_model(second) as m:
        want = m.run(raw[None], want_pre)["phase"][0]
    after = phase_of(rec, raw, 2, seen)
    np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(after, before)  # another model, so another answer


def test_swap_back_and_unload_keep_them_too(rec, models):
    first, second, _, _ = models
    d = rec.device
    load(rec, second)
    for name, value in INSTRUMENT.items():
        d.put(name, value)
    load(rec, first)
    load(rec, second)
    d.put("ModelPath", "")
    wait_for(lambda: d.get("ModelPath_RBV") == "", timeout=10, message="unloaded")
    load(rec, first)
    for name, value in INSTRUMENT.items():
        assert d.get(name + "_RBV") == value, name
    assert (d.get("PreCropSize_RBV"), d.get("PreBin_RBV")) == (32, 1)  # the first model's input again
    # the serving pre-processing is the device's for the detector
    pre = rec.batcher.preprocess
    assert pre is not None and (pre.fftshift, pre.flip_y, pre.transpose, pre.crop_center) == (True, True, True,
                                                                                              (50, 46))


def test_bad_pixel_mask_zeroes_the_pixels_and_survives_a_swap(rec, models, tmp_path):
    """PreMaskPath: the masked pixels of the raw frame are 0 in the network's input (the Phase output is
    the model's on the frame with them zeroed); a swap keeps the mask; a mask of another shape than the
    streaming frames, or a file that cannot be read, is refused and counted; "" unloads it."""
    from ptychostream.core.pvdb import PutError

    first, second, _, _ = models
    d = rec.device
    seen = serve_with_instrument_settings(rec, first)
    rng = np.random.default_rng(4)
    mask = rng.random((RAW, RAW)) < 0.05
    path = str(tmp_path / "mask.npy")
    np.save(path, mask.astype(np.uint8))  # non-zero = bad
    d.put("PreMaskPath", path).done.result(timeout=10)
    assert d.get("PreMaskPath_RBV") == path
    raw = rng.poisson(30, (RAW, RAW)).astype(np.uint16)
    raw[mask] = 60_000  # hot
    zeroed = np.where(mask, 0, raw).astype(np.uint16)
    masked = phase_of(rec, raw, 1, seen)
    instrument = {"fftshift": True, "flip_y": True, "transpose": True, "crop_center": (50, 46), "threshold": 2.0}
    with open_model(first) as m:
        want = m.run(zeroed[None], Preprocess(**instrument, crop_size=32, bin=1))["phase"][0]
        unmasked = m.run(raw[None], Preprocess(**instrument, crop_size=32, bin=1))["phase"][0]
    np.testing.assert_allclose(masked, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(masked, unmasked, atol=1e-3)  # the hot pixels would have changed the answer

    load(rec, second)
    assert d.get("PreMaskPath_RBV") == d.get("PreMaskPath") == path
    with open_model(second) as m:
        want = m.run(zeroed[None], Preprocess(**instrument, crop_size=64, bin=2, scale="sqrt",
                                              normalise="max"))["phase"][0]
    np.testing.assert_allclose(phase_of(rec, raw, 2, seen), want, rtol=1e-5, atol=1e-5)

    refused = d.get("RefusedPuts_RBV")
    small = str(tmp_path / "small.npy")
    np.save(small, np.zeros((64, 64), bool))
    with pytest.raises(PutError, match=r"64x64 but the frames streaming are 96x96"):
        d.put("PreMaskPath", small).done.result(timeout=10)
    with pytest.raises(PutError, match="bad-pixel mask file not found"):
        d.put("PreMaskPath", str(tmp_path / "missing.npy")).done.result(timeout=10)
    assert d.get("RefusedPuts_RBV") == refused + 2 and d.get("PreMaskPath_RBV") == path
    assert "64x64" in d.messages.format(4000)
    d.put("PreMaskPath", "").done.result(timeout=10)
    assert d.get("PreMaskPath_RBV") == ""
    wait_for(lambda: rec.batcher.preprocess.mask is None and rec.batcher.preprocess.mask_path is None,
             message="the inference loop takes the unloaded mask")


def test_mask_files_npy_npz_and_hdf5(tmp_path):
    """load_mask reads NPY, NPZ and HDF5 (``file::key``, a dataset named mask or its only 2-D array), and
    names the file, the key and what was expected when it cannot."""
    import h5py

    from ptychostream.devices.reconstructor import load_mask
    from ptychostream.files.errors import FileFormatError

    m = np.zeros((8, 10), np.uint8)
    m[2, 3] = m[7, 9] = 1
    np.savez(tmp_path / "one.npz", anything=m)
    np.savez(tmp_path / "named.npz", frames=np.zeros((8, 10)), mask=m)
    np.savez(tmp_path / "two.npz", a=m, b=m)
    with h5py.File(tmp_path / "m.h5", "w") as h5:
        h5["/entry/instrument/detector/pixel_mask"] = m
        h5["/entry/data/data"] = np.zeros((3, 8, 10))
        h5["/other"] = m.astype(bool)
    for path in ("one.npz", "named.npz", "two.npz::b", "m.h5", "m.h5::/other"):
        np.testing.assert_array_equal(load_mask(str(tmp_path / path)), m != 0, err_msg=path)
    np.save(tmp_path / "flat.npy", np.zeros(10))
    np.save(tmp_path / "nan.npy", np.full((8, 10), np.nan))
    (tmp_path / "m.txt").write_text("0 1")
    for path, words in (("two.npz", r"which array is the mask\? keys present: a, b"),
                        ("m.h5::/nope", "no dataset '/nope'"), ("flat.npy", "one 2-D boolean or numeric frame"),
                        ("nan.npy", "NaN"), ("m.txt", "read from .npy, .npz or HDF5")):
        with pytest.raises(FileFormatError, match=words) as info:
            load_mask(str(tmp_path / path))
        assert path.split("::")[0] in str(info.value)


def test_a_models_stitch_hint_sets_offset_and_domain(rec, tmp_path):
    """A model's ``ptychostream.stitch`` hint sets MosaicOffset and MosaicDomain (each with a message);
    a hint without a domain means the phase domain, and a model without a hint changes neither."""
    import json

    d = rec.device
    pre = Preprocess(crop_size=32, bin=1).to_json()

    def hinted(name: str, hint: dict | None) -> str:
        meta = {"ptychostream.preprocess": pre}
        if hint is not None:
            meta["ptychostream.stitch"] = json.dumps(hint)
        return build_ptychonn_onnx(str(tmp_path / name), size=SIZE, heads=("phase",), base_channels=2, depth=2,
                                   metadata=meta)

    offsets, domains = d.db["MosaicOffset"].enum_strs, d.db["MosaicDomain"].enum_strs
    assert (offsets[d.get("MosaicOffset_RBV")], domains[d.get("MosaicDomain_RBV")]) == ("mean", "phase")
    load(rec, hinted("unsupervised.onnx", {"offset": "overlap", "window": "hann", "domain": "complex"}))
    wait_for(lambda: rec.mosaic.settings.domain == "complex", timeout=5, message="the stitch stage took the domain")
    assert (offsets[d.get("MosaicOffset_RBV")], domains[d.get("MosaicDomain_RBV")]) == ("overlap", "complex")
    assert rec.mosaic.settings.offset == "overlap"
    rec.update_status()  # the status scan copies the message history into its PV
    assert "MosaicDomain complex: the model's stitch hint" in d.get("MessageHistory_RBV")
    load(rec, hinted("plain.onnx", None))  # no hint: the settings stay
    assert domains[d.get("MosaicDomain_RBV")] == "complex" and rec.mosaic.settings.domain == "complex"
    load(rec, hinted("supervised.onnx", {"offset": "mean", "window": "hann"}))  # no domain named: phase
    wait_for(lambda: rec.mosaic.settings.domain == "phase", timeout=5, message="back to the phase domain")
    assert (offsets[d.get("MosaicOffset_RBV")], domains[d.get("MosaicDomain_RBV")]) == ("mean", "phase")
    d.put("MosaicDomain", 1)  # an operator's put is taken as given
    wait_for(lambda: rec.mosaic.settings.domain == "complex", timeout=5, message="the put reached the stage")
    assert d.get("MosaicDomain_RBV") == 1
