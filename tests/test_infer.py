"""Model files, backends and the Model wrapper, on real ONNX networks from the model zoo."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import wait_for
from onnx import TensorProto, helper

from ptychostream.model.backends import (
    BACKEND_CHOICES,
    Backend,
    BackendError,
    available_backends,
    open_backend,
)
from ptychostream.model.infer import open_model
from ptychostream.model.info import META_KEYS, ModelError, load_model_file
from ptychostream.model.network import NetLayout, NetworkError
from ptychostream.model.preprocess import Preprocess
from ptychostream.model.zoo import build_ptychonn_onnx, param_count

SMALL = dict(size=64, base_channels=8, depth=3)


def _direct(path: str, x: np.ndarray) -> list[np.ndarray]:
    """A plain onnxruntime session call, the reference for every backend."""
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    feed = x[:, None] if len(inp.shape) == 4 else x
    return sess.run(None, {inp.name: feed})


def _frames(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.log1p(rng.poisson(3.0, (n, size, size))).astype(np.float32)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    return {
        "two_head": build_ptychonn_onnx(d / "two_head.onnx", heads=("amplitude", "phase"), **SMALL),
        "fixed8": build_ptychonn_onnx(d / "edge_b8.onnx", fixed_batch=8, input_name="input.1",
                                      seed=1, **SMALL),
        "dir": d,
    }


def _expected_params(heads: int, base: int, depth: int) -> int:
    conv = lambda cin, cout: 9 * cin * cout + cout  # noqa: E731
    chans = [base * 2 ** k for k in range(depth)]
    enc, cin = 0, 1
    for c in chans:
        enc += conv(cin, c) + conv(c, c)
        cin = c
    dec = 0
    for c in reversed(chans):
        dec += conv(cin, c) + conv(c, c)
        cin = c
    return enc + heads * (dec + conv(cin, 1))


def test_param_count_edge_model(tmp_path):
    p = build_ptychonn_onnx(tmp_path / "edge.onnx")
    assert param_count(p) == _expected_params(1, 16, 4) == 733921
    info = load_model_file(p)
    assert info.n_params == 733921
    assert info.input_shape == (128, 128) and info.outputs == ("phase",) and info.fixed_batch is None
    assert param_count(build_ptychonn_onnx(tmp_path / "two.onnx", heads=("amplitude", "phase"),
                                           **SMALL)) == _expected_params(2, 8, 3)


def test_net_layout_is_checked_once_for_both_builders(tmp_path):
    layout = NetLayout(64, 8, 3, ("amplitude", "phase"), 32)
    assert layout.channels == (8, 16, 32) and layout.cell == 8
    assert layout.encoder_blocks == [(1, 8), (8, 16), (16, 32)]
    assert layout.decoder_blocks == [(32, 32), (32, 16), (16, 8)]
    assert (layout.cells, layout.skip) == (4, 2)
    assert [layout.activation(h) for h in layout.heads] == ["sigmoid", "tanh_pi"]
    assert NetLayout.from_config(layout.config()) == layout
    assert NetLayout(64, depth=3).out_size == 64
    for kw, msg in (({"size": 100}, "divisible by 2"), ({"output_size": 40}, "output size 40"),
                    ({"heads": ("phase", "phase")}, "distinct names")):
        args = {"size": 64, "depth": 3, **kw}
        with pytest.raises(NetworkError, match=msg):
            NetLayout(**args)
        with pytest.raises(ValueError, match=msg):  # the model zoo writes the same layout
            build_ptychonn_onnx(tmp_path / "bad.onnx", **args)
    with pytest.raises(NetworkError, match="unusable network layout"):
        NetLayout.from_config({"size": 64})
    assert not (tmp_path / "bad.onnx").exists()


def test_zoo_central_output(tmp_path):
    p = build_ptychonn_onnx(tmp_path / "crop.onnx", heads=("amplitude", "phase"), output_size=32, **SMALL)
    info = load_model_file(p)
    assert info.output_shapes == {"amplitude": (32, 32), "phase": (32, 32)}
    assert info.n_params == _expected_params(2, 8, 3)  # the crop of the bottleneck has no weights
    out = open_backend("ONNXRuntime-CPU", info).infer(_frames(2))
    assert out["phase"].shape == out["amplitude"].shape == (2, 32, 32)
    assert np.abs(out["phase"]).max() <= np.pi and 0 <= out["amplitude"].min() <= out["amplitude"].max() <= 1


def test_edge_model_128_runs(tmp_path):
    p = build_ptychonn_onnx(tmp_path / "edge.onnx", fixed_batch=8, input_name="input.1")
    with open_model(p, "ONNXRuntime-CPU", batch_size=8) as m:
        x = _frames(3, 128)
        out = m.infer(x)["phase"]
        assert out.shape == (3, 128, 128)
        np.testing.assert_allclose(out, _direct(p, np.concatenate([x, np.zeros((5, 128, 128),
                                                                              np.float32)]))[0][:3, 0],
                                   atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 8, 13])
def test_two_head_dynamic(zoo, n):
    be = open_backend("ONNXRuntime-CPU", zoo["two_head"], batch_size=4)
    assert isinstance(be, Backend)
    assert be.name == "ONNXRuntime-CPU" and be.fixed_batch is None and be.input_shape == (64, 64)
    assert be.outputs == ("amplitude", "phase")
    x = _frames(n)
    out = be.infer(x)
    assert tuple(out) == ("amplitude", "phase")
    for arr in out.values():
        assert arr.shape == (n, 64, 64) and arr.dtype == np.float32
    assert np.all(np.abs(out["phase"]) <= np.pi + 1e-6)
    assert out["phase"].std() > 0.05  # not a constant
    assert np.all((out["amplitude"] >= 0) & (out["amplitude"] <= 1))
    amp, phase = _direct(zoo["two_head"], x)
    np.testing.assert_allclose(out["amplitude"], amp[:, 0], atol=1e-5)
    np.testing.assert_allclose(out["phase"], phase[:, 0], atol=1e-5)
    be.close()


@pytest.mark.parametrize("n", [1, 3, 8, 13])
def test_fixed_batch_pads_and_splits(zoo, n):
    info = load_model_file(zoo["fixed8"])
    assert info.input_name == "input.1" and info.fixed_batch == 8
    be = open_backend("ONNXRuntime-CPU", info, batch_size=64)
    assert be.fixed_batch == 8 and be.outputs == ("phase",)
    x = _frames(n, seed=n)
    be.infer(_frames(8, seed=99))  # leaves stale rows in any reused buffer
    out = be.infer(x)["phase"]
    assert out.shape == (n, 64, 64)
    # each frame alone gives the same answer: padding does not leak into results
    for i in sorted({0, n // 2, n - 1}):
        alone = be.infer(x[i:i + 1])["phase"]
        assert alone.shape == (1, 64, 64)
        np.testing.assert_allclose(out[i], alone[0], atol=1e-5)
    # and the same as onnxruntime on zero-padded batches of 8
    pad = (-n) % 8
    xp = np.concatenate([x, np.zeros((pad, 64, 64), np.float32)])
    ref = np.concatenate([_direct(zoo["fixed8"], xp[k:k + 8])[0][:, 0] for k in range(0, len(xp), 8)])
    np.testing.assert_allclose(out, ref[:n], atol=1e-5)
    be.close()


def test_results_are_fresh_arrays(zoo):
    be = open_backend("ONNXRuntime-CPU", zoo["fixed8"])
    a = be.infer(_frames(3, seed=1))["phase"]
    keep = a.copy()
    be.infer(_frames(3, seed=2))
    np.testing.assert_array_equal(a, keep)


def test_rank3_input_and_output(tmp_path):
    p = build_ptychonn_onnx(tmp_path / "r3.onnx", input_rank=3, output_rank=3, input_name="x",
                            output_names=("y",), **SMALL)
    info = load_model_file(p)
    assert info.input_rank == 3 and info.outputs == ("phase",)
    be = open_backend("ONNXRuntime-CPU", info)
    x = _frames(5)
    np.testing.assert_allclose(be.infer(x)["phase"], _direct(p, x)[0], atol=1e-5)


def test_bad_input_shape_is_rejected(zoo):
    be = open_backend("ONNXRuntime-CPU", zoo["two_head"])
    with pytest.raises(ValueError, match=r"\(n, 64, 64\)"):
        be.infer(np.zeros((2, 32, 32), np.float32))


# -- output order -----------------------------------------------------------------------

def test_output_order_from_metadata(tmp_path):
    # graph outputs are (amplitude, phase) heads, with neutral names; metadata names them
    p = build_ptychonn_onnx(tmp_path / "m.onnx", heads=("phase", "amplitude"), output_names=("o1", "o2"),
                            metadata={"ptychostream.outputs": ["phase", "amplitude"]}, **SMALL)
    be = open_backend("ONNXRuntime-CPU", p)
    assert be.outputs == ("phase", "amplitude")
    x = _frames(2)
    out, ref = be.infer(x), _direct(p, x)
    np.testing.assert_allclose(out["phase"], ref[0][:, 0], atol=1e-5)
    np.testing.assert_allclose(out["amplitude"], ref[1][:, 0], atol=1e-5)


def test_output_order_from_names(tmp_path):
    p = build_ptychonn_onnx(tmp_path / "n.onnx", heads=("phase", "amplitude"),
                            output_names=("pred_ph", "pred_amp"), **SMALL)
    info = load_model_file(p)
    assert info.outputs == ("phase", "amplitude")
    x = _frames(2)
    out, ref = open_backend("ONNXRuntime-CPU", info).infer(x), _direct(p, x)
    np.testing.assert_allclose(out["phase"], ref[0][:, 0], atol=1e-5)
    assert out["amplitude"].min() >= 0 and out["amplitude"].max() <= 1


def test_output_order_default_is_ptychonn(tmp_path):
    p = build_ptychonn_onnx(tmp_path / "d.onnx", heads=("amplitude", "phase"),
                            output_names=("out0", "out1"), **SMALL)
    assert load_model_file(p).outputs == ("amplitude", "phase")


def test_two_channel_output_split(tmp_path):
    p = build_ptychonn_onnx(tmp_path / "c.onnx", heads=("phase", "amplitude"), concat_heads=True, **SMALL)
    info = load_model_file(p)
    assert info.outputs == ("phase", "amplitude")  # NPZ convention: channel 0 phase
    x = _frames(3)
    out, ref = open_backend("ONNXRuntime-CPU", info).infer(x), _direct(p, x)[0]
    np.testing.assert_allclose(out["phase"], ref[:, 0], atol=1e-5)
    np.testing.assert_allclose(out["amplitude"], ref[:, 1], atol=1e-5)
    q = build_ptychonn_onnx(tmp_path / "c2.onnx", heads=("amplitude", "phase"), concat_heads=True,
                            metadata={"ptychostream.outputs": ["amplitude", "phase"]}, **SMALL)
    out, ref = open_backend("ONNXRuntime-CPU", q).infer(x), _direct(q, x)[0]
    np.testing.assert_allclose(out["amplitude"], ref[:, 0], atol=1e-5)
    np.testing.assert_allclose(out["phase"], ref[:, 1], atol=1e-5)


def test_output_metadata_mismatch(tmp_path):
    p = build_ptychonn_onnx(tmp_path / "x.onnx", heads=("amplitude", "phase"),
                            metadata={"ptychostream.outputs": ["phase"]}, **SMALL)
    with pytest.raises(ModelError, match="lists.*2 outputs"):
        load_model_file(p)
    q = build_ptychonn_onnx(tmp_path / "y.onnx", metadata={"ptychostream.outputs": ["phase", "chi"]}, **SMALL)
    with pytest.raises(ModelError, match="ptychostream.outputs must be"):
        load_model_file(q)


# -- metadata and model info --------------------------------------------------------------

def test_metadata_and_summary(tmp_path):
    pre = Preprocess(fftshift=True, crop_size=128, bin=2, scale="log1p")
    meta = {"ptychostream.name": "ptychonn-edge", "ptychostream.preprocess": pre.to_json(),
            "ptychostream.pixel_m": "7.5e-09", "ptychostream.probe_id": "hxn-2024-11",
            "ptychostream.training": {"epochs": 50, "loss": "L1"}, "author": "beamline"}
    p = build_ptychonn_onnx(tmp_path / "meta.onnx", metadata=meta, **SMALL)
    info = load_model_file(p)
    assert info.preprocess == pre
    assert info.pixel_m == 7.5e-9 and info.probe_id == "hxn-2024-11"
    assert info.training == {"epochs": 50, "loss": "L1"}
    assert info.metadata["author"] == "beamline"
    sha = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    assert info.sha256 == sha and info.model_id == sha[:12]
    assert info.summary() == f"ptychonn-edge 64x64 phase, batch dyn, 0.05M params, id {sha[:12]}"
    assert set(META_KEYS) >= {"ptychostream.preprocess", "ptychostream.outputs", "ptychostream.pixel_m",
                              "ptychostream.probe_id", "ptychostream.training"}


def test_summary_fixed_batch_default_name(zoo):
    s = load_model_file(zoo["fixed8"]).summary()
    assert s.startswith("edge_b8 64x64 phase, batch 8, 0.05M params, id ")


@pytest.mark.parametrize("key,value,msg", [
    ("ptychostream.pixel_m", "tiny", "pixel_m is not a number"),
    ("ptychostream.preprocess", '{"bin": 0}', "preprocess is invalid.*bin"),
    ("ptychostream.training", "[1, 2]", "training must be a JSON object"),
])
def test_bad_metadata(tmp_path, key, value, msg):
    p = build_ptychonn_onnx(tmp_path / "bad.onnx", metadata={key: value}, **SMALL)
    with pytest.raises(ModelError, match=msg):
        load_model_file(p)


# -- model file errors ----------------------------------------------------------------------

def _tiny(path, in_shape, n_out=1, in_type=TensorProto.FLOAT):
    x = helper.make_tensor_value_info("x", in_type, in_shape)
    outs = [helper.make_tensor_value_info(f"y{i}", in_type, in_shape) for i in range(n_out)]
    nodes = [helper.make_node("Identity", ["x"], [f"y{i}"]) for i in range(n_out)]
    m = helper.make_model(helper.make_graph(nodes, "tiny", [x], outs),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return str(path)


def test_model_file_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model_file(tmp_path / "nope.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError, match="not an ONNX model"):
        load_model_file(garbage)
    text = tmp_path / "text.onnx"
    text.write_text("this is a README, not a network\n")
    with pytest.raises(ModelError, match="not an ONNX model"):
        load_model_file(text)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        load_model_file(empty)
    with pytest.raises(ModelError, match="not a file"):
        load_model_file(tmp_path)
    with pytest.raises(ModelError, match=r"3 outputs.*expected 1 \(phase\) or 2"):
        load_model_file(_tiny(tmp_path / "three.onnx", ["N", 1, 64, 64], n_out=3))
    with pytest.raises(ModelError, match="dynamic spatial dims"):
        load_model_file(_tiny(tmp_path / "dyn.onnx", ["N", 1, "H", "W"]))
    with pytest.raises(ModelError, match="rank 2"):
        load_model_file(_tiny(tmp_path / "rank2.onnx", ["N", 4096]))
    with pytest.raises(ModelError, match="3 channels"):
        load_model_file(_tiny(tmp_path / "rgb.onnx", ["N", 3, 64, 64]))
    with pytest.raises(ModelError, match="element type INT64"):
        load_model_file(_tiny(tmp_path / "int.onnx", ["N", 1, 64, 64], in_type=TensorProto.INT64))
    # the tiny identity model itself is fine
    info = load_model_file(_tiny(tmp_path / "ok.onnx", ["N", 64, 64]))
    assert info.input_shape == (64, 64) and info.input_rank == 3 and info.n_params == 0


def test_open_model_missing_file_is_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        open_model(tmp_path / "missing.onnx")


# -- backend selection ----------------------------------------------------------------------

def test_backend_modules_import_without_their_libraries():
    for mod in ("onnxrt", "tensorrt", "torch_cuda"):
        importlib.import_module(f"ptychostream.model.backends.{mod}")
    assert BACKEND_CHOICES == ("Auto", "ONNXRuntime-CPU", "TensorRT", "PyTorch-CUDA")
    assert "ONNXRuntime-CPU" in available_backends()


def test_tensorrt_unavailable_is_explained(zoo):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        open_backend("TensorRT", zoo["two_head"])
    assert "TensorRT" not in available_backends()


def test_torch_unavailable_is_explained(zoo):
    torch_spec = importlib.util.find_spec("torch")
    if torch_spec is not None:
        import torch
        if torch.cuda.is_available():
            pytest.skip("PyTorch with CUDA is available here")
        msg = "no CUDA GPU"
    else:
        msg = "PyTorch is not installed"
    with pytest.raises(BackendError, match=msg):
        open_backend("PyTorch-CUDA", zoo["two_head"])


def test_auto_falls_back_and_says_why(zoo):
    avail = available_backends()
    if "TensorRT" in avail:
        pytest.skip("TensorRT is available here, Auto does not fall back")
    m = open_model(zoo["two_head"], "Auto", batch_size=8)
    reasons = m.fallback_reasons
    assert reasons[0].startswith("TensorRT: ")
    assert "not installed" in reasons[0] or "GPU" in reasons[0]
    if "PyTorch-CUDA" in avail:
        assert m.backend.name == "PyTorch-CUDA" and len(reasons) == 1
    else:
        assert m.backend.name == "ONNXRuntime-CPU"
        assert [r.split(":")[0] for r in reasons] == ["TensorRT", "PyTorch-CUDA"]
    assert m.backend.fallback_reasons == reasons
    m.close()


def test_named_backend_has_no_fallback(zoo):
    be = open_backend("onnxruntime", zoo["fixed8"])  # alias
    assert be.name == "ONNXRuntime-CPU" and be.fallback_reasons == []
    with pytest.raises(BackendError, match="unknown backend 'OpenVINO'"):
        open_backend("OpenVINO", zoo["fixed8"])


def test_threads_option(zoo):
    be = open_backend("ONNXRuntime-CPU", zoo["fixed8"], threads=1, spinning=False)
    assert be.threads == 1
    np.testing.assert_allclose(be.infer(_frames(2))["phase"],
                               open_backend("ONNXRuntime-CPU", zoo["fixed8"]).infer(_frames(2))["phase"],
                               atol=1e-5)


# -- Model: preprocess + infer, selftest -------------------------------------------------------

def test_model_run_raw_frames(zoo):
    pre = Preprocess(scale="log1p").fit_to((256, 256), (64, 64))
    assert (pre.crop_size, pre.bin) == (None, 4)
    m = open_model(zoo["two_head"], "ONNXRuntime-CPU", batch_size=16, preprocess_override=pre)
    assert m.info.preprocess == pre
    raw = np.random.default_rng(5).poisson(2.0, (5, 256, 256)).astype(np.uint16)
    out = m.run(raw)
    ref = _direct(zoo["two_head"], pre.apply(raw))
    np.testing.assert_allclose(out["phase"], ref[1][:, 0], atol=1e-5)
    assert out["amplitude"].shape == (5, 64, 64)


def test_selftest(zoo, tmp_path):
    m = open_model(zoo["fixed8"], "ONNXRuntime-CPU")
    assert m.selftest() == {"phase": (3, 64, 64)}
    # the model's own pre-processing makes 128 px from its frames, the net wants 64
    bad = build_ptychonn_onnx(tmp_path / "mismatch.onnx", **SMALL,
                              metadata={"ptychostream.preprocess": Preprocess(crop_size=128).to_json()})
    m = open_model(bad, "ONNXRuntime-CPU")
    with pytest.raises(ModelError, match=r"into \(128, 128\).*model input is \(64, 64\)"):
        m.selftest()
    # the same model with a pre-processing that fits passes
    ok = open_model(bad, "ONNXRuntime-CPU", preprocess_override={"crop_size": 128, "bin": 2})
    assert ok.selftest() == {"phase": (3, 64, 64)}
    with pytest.raises(ModelError, match="cannot handle"):
        ok.selftest(raw_shape=(100, 100))
    with pytest.raises(ModelError, match="override is invalid"):
        open_model(bad, "ONNXRuntime-CPU", preprocess_override={"bin": -1})


def test_selftest_catches_non_finite_output(tmp_path):
    # log(0) = -inf: a network that produces inf from zero input
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])
    y = helper.make_tensor_value_info("phase", TensorProto.FLOAT, ["N", 1, 16, 16])
    zero = helper.make_node("Mul", ["x", "z"], ["xz"])
    log = helper.make_node("Log", ["xz"], ["phase"])
    g = helper.make_graph([zero, log], "inf", [x], [y],
                          initializer=[onnx.numpy_helper.from_array(np.zeros(1, np.float32), "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "inf.onnx"))
    model = open_model(tmp_path / "inf.onnx", "ONNXRuntime-CPU")
    with pytest.raises(ModelError, match="NaN or inf"):
        model.selftest()


# -- GPU backends (run only where they are installed) -------------------------------------------

def _gpu_or_skip(name):
    from ptychostream.model.backends import backend_unavailable_reason

    reason = backend_unavailable_reason(name)
    if reason:
        pytest.skip(reason)


def test_tensorrt_engine_cache_and_accuracy(tmp_path):
    pytest.importorskip("tensorrt")
    pytest.importorskip("pycuda")
    _gpu_or_skip("TensorRT")
    for kw in ({"heads": ("amplitude", "phase")}, {"fixed_batch": 8, "input_name": "input.1"}):
        p = build_ptychonn_onnx(tmp_path / f"trt{len(kw)}_{kw.get('fixed_batch')}.onnx", **kw, **SMALL)
        be = open_backend("TensorRT", p, batch_size=16, precision="fp16")
        assert be.built and be.engine_path.endswith(".engine")
        assert be.engine_path.startswith(p + ".")
        mtime = os.stat(be.engine_path).st_mtime_ns
        be.close()
        stamp = tmp_path / "clock"

        def clock_passed_the_engine() -> bool:  # a rebuilt engine would then get a newer mtime
            stamp.touch()
            return os.stat(stamp).st_mtime_ns > mtime

        wait_for(clock_passed_the_engine, timeout=5.0, message="the file-system clock to pass the engine's mtime")
        t0 = time.monotonic()
        be = open_backend("TensorRT", p, batch_size=16, precision="fp16")
        assert not be.built and os.stat(be.engine_path).st_mtime_ns == mtime
        load_s = time.monotonic() - t0
        x = _frames(13)
        out = be.infer(x)
        ref = open_backend("ONNXRuntime-CPU", p).infer(x)
        for k in ref:
            assert out[k].shape == ref[k].shape
            np.testing.assert_allclose(out[k], ref[k], atol=2e-2)
        # a ready engine file opens directly
        be2 = open_model(be.engine_path, "TensorRT")
        np.testing.assert_allclose(be2.infer(x[:3])["phase"], out["phase"][:3], atol=1e-3)
        be2.close()
        be.close()
        assert load_s < 30


def test_torch_cuda_matches_onnxruntime(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx2torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    for kw in ({"heads": ("amplitude", "phase")}, {"fixed_batch": 8, "input_name": "input.1"}):
        p = build_ptychonn_onnx(tmp_path / f"t_{kw.get('fixed_batch')}.onnx", **kw, **SMALL)
        be = open_backend("PyTorch-CUDA", p, batch_size=16, half=True)
        assert be.frozen_resizes == len(load_model_file(p).outputs) * SMALL["depth"]
        ref_be = open_backend("ONNXRuntime-CPU", p)
        for n in (1, 5, 13, 40):
            x = _frames(n, seed=n)
            out, ref = be.infer(x), ref_be.infer(x)
            assert tuple(out) == tuple(ref)
            for k in ref:
                assert out[k].shape == ref[k].shape and out[k].dtype == np.float32
                np.testing.assert_allclose(out[k], ref[k], atol=2e-2)
        be.close()


def test_torch_cuda_runs_trained_models_without_onnx2torch(tmp_path):
    """A model from ``ptychostream train`` is rebuilt by the training code: fp16, CUDA graphs."""
    torch = pytest.importorskip("torch")
    _gpu_or_skip("PyTorch-CUDA")
    from ptychostream.train import build_net, export_onnx

    net = build_net(64, 8, 3, ("amplitude", "phase"), 32)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "trained.onnx"
    export_onnx(net, path, {"ptychostream.outputs": ["amplitude", "phase"], "ptychostream.training": {"net": net.config}})
    be = open_backend("PyTorch-CUDA", str(path), batch_size=16, half=True)
    ref = open_backend("ONNXRuntime-CPU", str(path))
    assert be.converter == "ptychostream" and be.cuda_graphs and be.half
    for n in (1, 5, 16, 40):
        x = _frames(n, seed=n, size=64)
        out, want = be.infer(x), ref.infer(x)
        for k in want:
            assert out[k].shape == want[k].shape == (n, 32, 32) and out[k].dtype == np.float32
            np.testing.assert_allclose(out[k], want[k], atol=2e-2)
    be.close()


def test_no_driver_is_found_without_importing_torch():
    """Auto must not spend seconds importing torch on a machine with no NVIDIA driver."""
    from ptychostream.model.backends import cuda_driver_reason

    if cuda_driver_reason() is None:
        pytest.skip("an NVIDIA driver is present here")
    code = ("import sys; from ptychostream.model.backends import backend_unavailable_reason as r; "
            "print(r('PyTorch-CUDA')); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split("\n")
    assert out[0].startswith("no CUDA GPU") and "driver" in out[0]
    assert out[1] == "False"


def test_metadata_json_values_are_strings(tmp_path):
    p = build_ptychonn_onnx(tmp_path / "j.onnx", metadata={"ptychostream.training": {"a": 1}}, **SMALL)
    props = {e.key: e.value for e in onnx.load(p).metadata_props}
    assert json.loads(props["ptychostream.training"]) == {"a": 1}
