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


def test_swap_keeps_instrument_settings_and_takes_the_models(rec, models):
    first, second, dark_path, dark = models
    d = rec.device
    seen: dict[int, np.ndarray] = {}
    d.add_image_sink(lambda spec, f: seen.__setitem__(f.unique_id, np.array(f.array)) if spec.suffix == "Phase"
                     else None)
    for name, value in {"Enable": 1, "PublishRate": 0}.items():
        d.put(name, value)
    load(rec, first)
    for name, value in INSTRUMENT.items():
        d.put(name, value)
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
