"""Training (torch): file data, export with metadata and checks, resume, bad input; the shipped model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from ptychostream.model.infer import open_model
from ptychostream.sim import (
    Geometry,
    Simulator,
    make_object,
    make_probe,
    scan_positions,
)

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "ptychostream" / "models" / "ptychonn_edge.onnx"
SIZE = 32


def tiny_pairs(n: int = 24, seed: int = 0):
    g = Geometry(size=SIZE)
    probe = make_probe("gaussian", SIZE, g.pixel_m, fwhm_px=12)
    pos = scan_positions("raster", 3 * g.pixel_m, n)
    obj = make_object("etched", (96, 96), seed=seed, scale=0.4)
    sim = Simulator(obj, probe, pos, g, photons=1e5, seed=seed, threads=1)
    return sim.frames(slice(None)), sim.patches(slice(None)), g


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory):
    frames, patches, g = tiny_pairs()
    path = tmp_path_factory.mktemp("train") / "pairs.npz"
    np.savez(path, reciprocal=frames, real=patches, position=np.zeros((len(frames), 2)), pixelsize=g.pixel_m)
    return path


def tiny_config(out: Path, data, **kw):
    from ptychostream.train import TrainConfig

    base = dict(output=str(out), data=tuple(str(d) for d in data), size=SIZE, depth=2, base_channels=4,
                output_size=SIZE, epochs=2, batch=8, lr=3e-3, threads=1, val=0)
    base.update(kw)
    return TrainConfig(**base)


def parser() -> argparse.ArgumentParser:
    from ptychostream.train import add_train_parser

    ap = argparse.ArgumentParser(prog="ptychostream")
    sub = ap.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    return ap


# --------------------------------------------------------------------------- training on files
def test_train_on_npz_exports_a_model_the_device_loads(npz_file, tmp_path):
    pytest.importorskip("torch")
    from ptychostream.train import train

    out = tmp_path / "tiny.onnx"
    summary = train(tiny_config(out, [npz_file]), progress=False, log=lambda s: None)
    assert out.is_file() and summary["onnx_max_abs_diff"] <= 1e-4
    assert summary["steps"] == summary["planned_steps"] > 0
    with open_model(out, backend="ONNXRuntime-CPU", threads=1) as m:
        assert m.info.outputs == ("amplitude", "phase")
        assert m.info.fixed_batch is None  # dynamic batch
        assert m.info.pixel_m == pytest.approx(Geometry(size=SIZE).pixel_m)
        assert m.info.preprocess.scale == "sqrt" and m.info.preprocess.normalise == "mean"
        assert m.info.training["seed"] == 0 and m.info.training["data"]["source"] == "files"
        frames, _, _ = tiny_pairs(5, seed=3)
        res = m.run(frames)
        assert res["phase"].shape == (5, SIZE, SIZE) and res["amplitude"].shape == (5, SIZE, SIZE)
        assert np.isfinite(res["phase"]).all() and np.abs(res["phase"]).max() <= np.pi
        m.selftest()
    # no temporary files are left beside the model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_phase_only_channels_layout_and_cli(tmp_path, capsys):
    pytest.importorskip("torch")
    frames, patches, g = tiny_pairs(16, seed=1)
    real = np.stack([np.angle(patches), np.abs(patches)], axis=1)  # (N, 2, h, w): C0 phase, C1 amplitude
    data = tmp_path / "chan.npz"
    np.savez(data, reciprocal=frames, real=real, pixelsize=g.pixel_m)
    out = tmp_path / "phase.onnx"
    args = parser().parse_args(["train", str(out), "--data", str(data), "--size", str(SIZE), "--depth", "2",
                                "--base-channels", "4", "--heads", "phase", "--output-size", "16",
                                "--epochs", "1", "--batch", "8", "--threads", "1", "--val", "0", "-q"])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    with open_model(out, backend="ONNXRuntime-CPU", threads=1) as m:
        assert m.info.outputs == ("phase",)
        assert m.info.output_shapes["phase"] == (16, 16)  # the central crop
        assert m.run(frames[:3])["phase"].shape == (3, 16, 16)


def test_ptychodus_product_with_its_frames(tmp_path):
    pytest.importorskip("torch")
    import h5py

    from ptychostream.sim import write_truth_h5
    from ptychostream.train import load_pairs, train

    g = Geometry(size=SIZE)
    probe = make_probe("gaussian", SIZE, g.pixel_m, fwhm_px=10)
    sim = Simulator(make_object("etched", (96, 96), seed=2, scale=0.4), probe,
                    scan_positions("raster", 4 * g.pixel_m, 16), g, photons=1e5, threads=1)
    product = tmp_path / "product.h5"
    write_truth_h5(product, sim)  # a Ptychodus-like product: object, probe, probe_position_{x,y}_m
    frames = tmp_path / "scan.h5"
    with h5py.File(frames, "w") as h5:
        h5["/entry/data/data"] = sim.frames(slice(None))
    pairs = load_pairs([str(product)], str(frames))
    np.testing.assert_allclose(pairs["phase"], np.angle(sim.patches(slice(None))), atol=1e-5)
    assert pairs["probe"].shape == (SIZE, SIZE) and pairs["pixel_m"] == pytest.approx(g.pixel_m)
    out = tmp_path / "p.onnx"
    s = train(tiny_config(out, [product], frames=str(frames), epochs=1, output_size="auto"), progress=False,
              log=lambda t: None)
    assert s["data"]["source"] == "files"
    with open_model(out, backend="ONNXRuntime-CPU", threads=1) as m:
        assert m.info.probe_id.startswith("files-")
        assert m.run(sim.frames(slice(0, 2)))["phase"].shape[0] == 2
    from ptychostream.train import TrainError

    with pytest.raises(TrainError, match="--frames"):
        load_pairs([str(product)], None)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(npz_file, tmp_path):
    pytest.importorskip("torch")
    from ptychostream.train import train

    full = tmp_path / "full.onnx"
    train(tiny_config(full, [npz_file], epochs=3), progress=False, log=lambda s: None)
    ck = tmp_path / "ck"
    part = tmp_path / "part.onnx"
    s1 = train(tiny_config(part, [npz_file], epochs=3, checkpoint=str(ck), time_limit_s=0.0),
               progress=False, log=lambda s: None)
    assert s1["steps"] < s1["planned_steps"] and s1["stopped_early"]
    assert (ck / "last.pt").is_file()
    msgs: list[str] = []
    s2 = train(tiny_config(part, [npz_file], epochs=3, checkpoint=str(ck)), progress=False, log=msgs.append)
    assert any("resuming" in m for m in msgs) and s2["steps"] == s2["planned_steps"]
    frames, _, _ = tiny_pairs(4, seed=5)
    with open_model(full, backend="ONNXRuntime-CPU", threads=1) as a, \
            open_model(part, backend="ONNXRuntime-CPU", threads=1) as b:
        np.testing.assert_allclose(a.run(frames)["phase"], b.run(frames)["phase"], atol=1e-4)
    # a checkpoint from other settings is refused, not silently mixed
    from ptychostream.train import TrainError

    with pytest.raises(TrainError, match="other settings"):
        train(tiny_config(part, [npz_file], epochs=3, checkpoint=str(ck), lr=1e-2), progress=False)


def test_edge_layout_matches_the_modelzoo(tmp_path):
    pytest.importorskip("torch")
    import onnx
    import torch

    from ptychostream.model.zoo import build_ptychonn_onnx, param_count
    from ptychostream.train import build_net, export_onnx

    net = build_net(128, 16, 4, ("phase",), 128)  # with BatchNorm, folded at export
    with torch.no_grad():  # no two weights alike (the exporter shares identical initializers)
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path / "edge.onnx"
    export_onnx(net, out, {"ptychostream.outputs": ["phase"]})
    ref = build_ptychonn_onnx(tmp_path / "ref.onnx", size=128, heads=("phase",))
    assert param_count(out) == param_count(ref) == 733_921
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"Conv", "Relu", "MaxPool", "Resize", "Tanh"} <= ops and "BatchNormalization" not in ops


def test_zoo_graph_is_the_torch_network(tmp_path):
    """One definition: the torch module of a layout, with a model-zoo file's weights, computes that file."""
    torch = pytest.importorskip("torch")
    from ptychostream.model.backends import open_backend
    from ptychostream.model.info import load_model_file
    from ptychostream.model.network import NetLayout, NetworkError, net_from_onnx
    from ptychostream.model.zoo import build_ptychonn_onnx

    layout = NetLayout(32, 4, 2, ("amplitude", "phase"), 16)
    path = build_ptychonn_onnx(tmp_path / "zoo.onnx", size=32, base_channels=4, depth=2, heads=layout.heads,
                               output_size=16, seed=3)
    info = load_model_file(path)
    net = net_from_onnx(path, layout.config())
    assert info.n_params == sum(p.numel() for p in net.parameters())
    x = np.random.default_rng(0).uniform(0, 3, (5, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = [t[:, 0].numpy() for t in net(torch.from_numpy(x[:, None]))]
    got = open_backend("ONNXRuntime-CPU", info).infer(x)
    for head, w in zip(layout.heads, want):
        assert got[head].shape == (5, 16, 16)
        np.testing.assert_allclose(got[head], w, atol=1e-4)
    with pytest.raises(NetworkError, match="convolutions"):
        net_from_onnx(path, {**layout.config(), "depth": 1})


# --------------------------------------------------------------------------- bad input
def _bad(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_bad_training_files_give_clear_errors(npz_file, tmp_path):
    pytest.importorskip("torch")
    from ptychostream.train import TrainError, train

    frames, patches, _ = tiny_pairs(12)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the model already there")
    cases = {
        "empty": (_bad(tmp_path, "empty.npz"), "empty"),
        "keys": (_bad(tmp_path, "keys.npz", frames=frames, labels=patches), "missing 'reciprocal', 'real'"),
        "nan": (_bad(tmp_path, "nan.npz", reciprocal=frames,
                     real=np.where(np.arange(12)[:, None, None] == 3, np.nan, patches)), "NaN"),
        "count": (_bad(tmp_path, "count.npz", reciprocal=frames, real=patches[:-2]), "12 diffraction frames but 10"),
        "zero": (_bad(tmp_path, "zero.npz", reciprocal=frames[:0], real=patches[:0]), "no training pairs"),
        "shape": (_bad(tmp_path, "shape.npz", reciprocal=frames, real=patches[:, :16, :16]),
                  "16x16 labels cannot feed 32x32 outputs"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(TrainError, match=message):
            train(tiny_config(out, [path]), progress=False)
    with pytest.raises(TrainError, match="not found"):
        train(tiny_config(out, [tmp_path / "nope.npz"]), progress=False)
    with pytest.raises(TrainError, match="does not exist"):
        train(tiny_config(tmp_path / "no" / "dir" / "m.onnx", [npz_file]), progress=False)
    with pytest.raises(TrainError, match="is a folder"):
        (tmp_path / "d.onnx").mkdir()
        train(tiny_config(tmp_path / "d.onnx", [npz_file]), progress=False)
    assert out.read_bytes() == b"the model already there"  # nothing was overwritten
    # the CLI prints one line and exits 2
    args = parser().parse_args(["train", str(out), "--data", str(cases["nan"][0]), "-q"])
    assert args.func(args) == 2


def test_full_disk_leaves_the_old_model_intact(npz_file, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import errno
    import os

    from ptychostream import train as tr

    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # the export renames its checked file over the target
    with pytest.raises(tr.TrainError, match="No space left"):
        tr.train(tiny_config(out, [npz_file], epochs=1), progress=False, log=lambda s: None)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_help_lists_options():
    text = parser()._subparsers._group_actions[0].choices["train"].format_help()
    for opt in ("--data", "--frames", "--probe", "--photons", "--heads", "--output-size", "--checkpoint",
                "--device", "--epochs", "--lr", "--schedule", "--seed"):
        assert opt in text


# --------------------------------------------------------------------------- the shipped model
def test_shipped_model_reconstructs_unseen_etched_frames():
    assert SHIPPED.is_file(), "the trained model must ship in src/ptychostream/models/"
    assert SHIPPED.stat().st_size <= 5 * 1024 * 1024
    with open_model(SHIPPED, backend="ONNXRuntime-CPU", threads=2) as m:
        info = m.info
        assert set(info.outputs) == {"amplitude", "phase"}
        assert info.fixed_batch is None
        assert "ptychostream.preprocess" in info.metadata and "ptychostream.outputs" in info.metadata
        g = Geometry()
        assert info.pixel_m == pytest.approx(g.pixel_m)
        training = info.training
        assert training["data"]["source"] == "simulated" and training["seed"] is not None
        m.selftest()
        probe = make_probe("zoneplate", g.size, g.pixel_m, geometry=g)
        rng = np.random.default_rng(7)
        obj = make_object("etched", (320, 320), seed=12345)
        pos = rng.uniform(-90, 90, size=(24, 2)) * g.pixel_m
        sim = Simulator(obj, probe, pos, g, photons=1e6, seed=3)
        out = m.run(sim.frames(slice(None)))["phase"]
    o = out.shape[-1]
    truth = np.angle(sim.patches(slice(None)))
    c0 = g.size // 2 - o // 2
    truth = truth[:, c0:c0 + o, c0:c0 + o]
    inten = np.abs(probe[c0:c0 + o, c0:c0 + o]) ** 2
    lit = inten > 0.1 * inten.max()  # inside the probe footprint
    corr = [np.corrcoef(p[lit], t[lit])[0, 1] for p, t in zip(out, truth)]
    assert np.median(corr) > 0.6, corr
    # chance level: the same predictions against other patches
    other = [np.corrcoef(p[lit], t[lit])[0, 1] for p, t in zip(out, np.roll(truth, 1, axis=0))]
    assert np.median(corr) > np.median(np.abs(other)) + 0.4


# --------------------------------------------------------------------------- continuing from a model
def test_init_continues_from_an_exported_model(npz_file, tmp_path):
    pytest.importorskip("torch")
    from ptychostream.train import TrainError, train

    first = tmp_path / "first.onnx"
    train(tiny_config(first, [npz_file], epochs=2), progress=False, log=lambda s: None)
    msgs: list[str] = []
    second = tmp_path / "second.onnx"
    s = train(tiny_config(second, [npz_file], epochs=1, init=str(first), lr=1e-4, grad_weight=0.5),
              progress=False, log=msgs.append)
    # the BatchNorms folded by the export come back as an identity: the start reproduces the file
    assert s["init"]["file"] == "first.onnx" and s["init"]["max_abs_diff"] < 1e-4
    assert len(s["init"]["sha256"]) == 64 and any("starting from" in m for m in msgs)
    assert "gradient" in s["loss"]
    frames, _, _ = tiny_pairs(6, seed=9)
    with open_model(first, backend="ONNXRuntime-CPU", threads=1) as a, \
            open_model(second, backend="ONNXRuntime-CPU", threads=1) as b:
        pa, pb = a.run(frames)["phase"], b.run(frames)["phase"]
    # a few small steps move the model a little, not back to a random start
    assert 0 < np.abs(pa - pb).max() < 0.5
    fresh = tmp_path / "fresh.onnx"
    train(tiny_config(fresh, [npz_file], epochs=1, lr=1e-4), progress=False, log=lambda s: None)
    with open_model(fresh, backend="ONNXRuntime-CPU", threads=1) as f:
        assert np.abs(pa - pb).mean() < np.abs(pa - f.run(frames)["phase"]).mean()
    # another architecture or pre-processing is refused with the reason; nothing is written
    with pytest.raises(TrainError, match="convolutions"):
        train(tiny_config(tmp_path / "x.onnx", [npz_file], init=str(first), depth=1), progress=False)
    with pytest.raises(TrainError, match="pre-processing differs: scale"):
        train(tiny_config(tmp_path / "x.onnx", [npz_file], init=str(first), scale="log1p"), progress=False)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(TrainError, match="--init"):
        train(tiny_config(tmp_path / "x.onnx", [npz_file], init=str(tmp_path / "junk.onnx")), progress=False)
    assert not (tmp_path / "x.onnx").exists()


def test_bf16_training_and_the_new_options(npz_file, tmp_path):
    pytest.importorskip("torch")
    from ptychostream.train import TrainError, train

    out = tmp_path / "bf16.onnx"
    s = train(tiny_config(out, [npz_file], epochs=1, precision="bf16"), progress=False, log=lambda s: None)
    assert s["precision"] == "bf16" and s["onnx_max_abs_diff"] <= 1e-4  # the export is fp32
    with open_model(out, backend="ONNXRuntime-CPU", threads=1) as m:
        assert np.isfinite(m.run(tiny_pairs(3)[0])["phase"]).all()
    with pytest.raises(TrainError, match="--precision"):
        train(tiny_config(out, [npz_file], precision="fp8"), progress=False)
    with pytest.raises(TrainError, match="--grad-weight"):
        train(tiny_config(out, [npz_file], grad_weight=-1.0), progress=False)
    args = parser().parse_args(["train", "m.onnx", "--init", "a.onnx", "--precision", "bf16",
                                "--grad-weight", "0.5"])
    from ptychostream.train.cli import config_from_args

    cfg = config_from_args(args)
    assert (cfg.init, cfg.precision, cfg.grad_weight) == ("a.onnx", "bf16", 0.5)


def test_simulated_training_batches_include_circuits():
    pytest.importorskip("torch")
    from ptychostream.train import TRAIN_KINDS, TrainConfig
    from ptychostream.train.loop import make_source

    assert "circuit" in TRAIN_KINDS and not {"digits", "siemens"} & set(TRAIN_KINDS)
    src, facts = make_source(TrainConfig(objects=("circuit",), crop=64, object_px=192, pool=2))
    b = src.batch(0, 4)
    assert b.x.shape == (4, 1, 64, 64) and b.phase.shape[-1] == facts["out"]
    assert np.isfinite(b.x).all() and np.ptp(b.phase) > 0.1
    again = src.batch(0, 4)  # a batch is a pure function of its step
    np.testing.assert_array_equal(b.x, again.x)


# --------------------------------------------------------------------------- the PyTorch backend
def test_torch_backend_rebuilds_trained_models_without_onnx2torch(tmp_path):
    torch = pytest.importorskip("torch")
    from ptychostream.model.backends import open_backend
    from ptychostream.model.backends.torch_cuda import TorchCudaBackend
    from ptychostream.model.info import load_model_file
    from ptychostream.train import build_net, export_onnx

    net = build_net(32, 4, 2, ("amplitude", "phase"), 16)
    with torch.no_grad():  # non-trivial BatchNorms, so that the folded export differs from the raw convs
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "t.onnx"
    export_onnx(net, path, {"ptychostream.outputs": ["amplitude", "phase"],
                            "ptychostream.training": {"net": net.config}})
    info = load_model_file(path)
    for model in (info, load_model_file(SHIPPED)):
        be = TorchCudaBackend(model, batch_size=8, half=False, cuda_graphs=False, device="cpu")
        ref = open_backend("ONNXRuntime-CPU", model)
        assert be.converter == "ptychostream" and be.outputs == ref.outputs
        h, w = model.input_shape
        for n in (1, 5, 13):  # one partial bucket, one exact chunk split, several chunks
            x = np.random.default_rng(n).uniform(0, 3, (n, h, w)).astype(np.float32)
            got, want = be.infer(x), ref.infer(x)
            for k in want:
                assert got[k].shape == want[k].shape and got[k].dtype == np.float32
                np.testing.assert_allclose(got[k], want[k], atol=1e-4)
        be.close()
        ref.close()


def test_labels_of_another_size_map_to_the_output(tmp_path):
    pytest.importorskip("torch")
    from ptychostream.train import train

    frames, patches, g = tiny_pairs()
    path = tmp_path / "small_labels.npz"
    np.savez(path, reciprocal=frames, real=patches[:, 8:24, 8:24], pixelsize=g.pixel_m)  # 16 px, same pixel
    out = tmp_path / "m.onnx"
    summary = train(tiny_config(out, [path], output_size=16, epochs=1), progress=False, log=lambda s: None)
    assert summary["data"]["label_zoom"] == 1.0 and summary["net"]["output_size"] == 16
    # labels at twice the model's pixel (--pixel-m): resampled, not refused
    coarse = tmp_path / "coarse.npz"
    np.savez(coarse, reciprocal=frames, real=patches, pixelsize=2 * g.pixel_m)
    summary = train(tiny_config(out, [coarse], output_size=16, epochs=1, pixel_m=g.pixel_m), progress=False,
                    log=lambda s: None)
    assert summary["data"]["label_zoom"] == 2.0
    with open_model(out, backend="ONNXRuntime-CPU", threads=1) as m:
        assert m.run(frames[:2])["phase"].shape == (2, 16, 16)
        assert m.info.pixel_m == pytest.approx(g.pixel_m)
