"""The physics-consistency figure (model/consistency.py) on simulated frames, no IOC."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ptychostream.model.consistency import (
    STATE_HIGH,
    STATE_OFF,
    STATE_OK,
    STATE_UNAVAILABLE,
    STATE_WAITING,
    ConsistencyMonitor,
    ForwardCheck,
    ProbeError,
    consistency,
)
from ptychostream.model.info import ModelInfo, probe_sidecar
from ptychostream.model.preprocess import Preprocess
from ptychostream.sim.forward import Geometry, Simulator
from ptychostream.sim.objects import make_object
from ptychostream.sim.probes import make_probe
from ptychostream.sim.scans import scan_extent_px, scan_positions

N = 128  # probe / object window (object pixels), the shipped model's geometry
CROP = 64  # the network's input: the centre 64x64 of the 128x128 frame
OUT = 64  # the predicted patch: the centre 64x64 of the window
SHIPPED = Path(__file__).resolve().parents[2] / "src" / "ptychostream" / "models" / "ptychonn_edge.onnx"


@pytest.fixture(scope="module")
def scan() -> SimpleNamespace:
    g = Geometry(size=N)
    probe = make_probe("zoneplate", N, g.pixel_m, geometry=g)
    pos = scan_positions("spiral", 12 * g.pixel_m, 32, seed=0)
    obj = make_object("etched", shape=tuple(scan_extent_px(pos, g.pixel_m, N)), seed=3)
    sim = Simulator(obj, probe, pos, g, photons=1e6, seed=0, dtype="float32")
    return SimpleNamespace(sim=sim, probe=probe, patches=sim.patches(slice(None)), expected=sim.clean(slice(None)))


def centre(patches: np.ndarray, m: int = OUT) -> np.ndarray:
    o = patches.shape[-1] // 2 - m // 2
    return patches[:, o:o + m, o:o + m]


def poisson(lam: np.ndarray, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).poisson(lam).astype(np.float32)


def flip(a: np.ndarray, axis: int) -> np.ndarray:
    """A frequency reversal k -> -k mod n (the device's flip, its own inverse)."""
    return np.roll(np.flip(a, axis=axis), 1, axis=axis)


PRE = Preprocess(crop_size=CROP, scale="sqrt", normalise="mean")


def test_perfect_prediction_gives_the_floor_and_wrong_ones_are_worse(scan):
    raw = poisson(scan.expected)
    p = scan.patches
    full = consistency(scan.probe, PRE, raw, np.angle(p), np.abs(p))  # the whole window: shot noise only
    assert 0.85 < np.median(full) < 1.15
    inner = centre(p)
    floor = consistency(scan.probe, PRE, raw, np.angle(inner), np.abs(inner))  # the predicted patch only
    assert np.all(np.isfinite(floor))
    assert np.median(floor) > np.median(full)  # the probe's tails outside the patch light a guessed object
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(len(p))
    wrong = consistency(scan.probe, PRE, raw, np.angle(inner[shuffled]), np.abs(inner[shuffled]))
    flat = consistency(scan.probe, PRE, raw, np.zeros(inner.shape, np.float32))
    noisy = consistency(scan.probe, PRE, raw, np.angle(inner) + rng.normal(0, 0.3, inner.shape), np.abs(inner))
    for bad in (wrong, flat, noisy):
        assert np.median(bad) > 3 * np.median(floor)
    # the scale is the frame's own photon count: a frame with 100x the counts is no better explained
    loud = poisson(100 * scan.expected)
    assert np.median(consistency(scan.probe, PRE, loud, np.angle(p), np.abs(p))) < 1.2


def test_another_probe_does_not_explain_the_frames(scan):
    raw = poisson(scan.expected)
    inner = centre(scan.patches)
    g = Geometry(size=N)
    other = make_probe("gaussian", N, g.pixel_m, fwhm_px=10, curvature=3.0)
    right = consistency(scan.probe, PRE, raw, np.angle(inner), np.abs(inner))
    wrong = consistency(other, PRE, raw, np.angle(inner), np.abs(inner))
    assert np.median(wrong) > 10 * np.median(right)


@pytest.mark.parametrize("fftshift,transpose,flip_y,flip_x", [
    (True, False, False, False), (False, True, False, False), (False, False, True, False),
    (False, False, False, True), (True, True, True, True)])
def test_geometry_follows_the_device_pre_processing(scan, fftshift, transpose, flip_y, flip_x):
    """Frames stored corner-origin, transposed or flipped and read with the matching settings give the
    same figure as canonical frames; read without them they are not explained."""
    p = scan.patches
    canon = poisson(scan.expected)
    raw = canon
    if flip_x:
        raw = flip(raw, 2)
    if flip_y:
        raw = flip(raw, 1)
    if transpose:
        raw = raw.transpose(0, 2, 1)
    if fftshift:
        raw = np.fft.ifftshift(raw, axes=(-2, -1))
    pre = replace(PRE, fftshift=fftshift, transpose=transpose, flip_y=flip_y, flip_x=flip_x)
    ref = consistency(scan.probe, PRE, canon, np.angle(p), np.abs(p))
    got = consistency(scan.probe, pre, raw, np.angle(p), np.abs(p))
    np.testing.assert_allclose(np.median(got), np.median(ref), rtol=0.05)
    naive = consistency(scan.probe, PRE, raw, np.angle(p), np.abs(p))
    if not fftshift:  # (the crop of a corner-origin frame holds few photons: no deviance can tell much there)
        assert np.median(naive) > 5 * np.median(ref)


def test_binned_frames(scan):
    """A 128x128 detector binned by 2 samples the same 64-pixel object window."""
    lam = np.repeat(np.repeat(scan.expected / 4, 2, axis=1), 2, axis=2)
    raw = poisson(lam)
    pre = replace(PRE, crop_size=2 * CROP, bin=2)
    assert pre.output_shape(raw.shape[1:]) == (CROP, CROP)
    p = scan.patches
    got = consistency(scan.probe, pre, raw, np.angle(p), np.abs(p))
    assert 0.85 < np.median(got) < 1.15
    flat = consistency(scan.probe, pre, raw, np.zeros((len(p), OUT, OUT), np.float32))
    assert np.median(flat) > 10 * np.median(got)


def test_bad_pixels_are_left_out(scan):
    p = scan.patches
    raw = poisson(scan.expected)
    hot = raw.copy()
    hot[:, N // 2 + 3, N // 2 - 5] = 2**20
    mask = np.zeros((N, N), bool)
    mask[N // 2 + 3, N // 2 - 5] = True
    clean = consistency(scan.probe, PRE, raw, np.angle(p), np.abs(p))
    assert np.median(consistency(scan.probe, PRE, hot, np.angle(p), np.abs(p))) > 10 * np.median(clean)
    masked = consistency(scan.probe, replace(PRE, mask=mask), hot, np.angle(p), np.abs(p))
    np.testing.assert_allclose(np.median(masked), np.median(clean), rtol=0.05)


def test_a_probe_that_does_not_fit_is_refused():
    check = ForwardCheck(np.ones((16, 16), np.complex64))
    with pytest.raises(ProbeError, match="16x16.*32x32"):
        check.geometry((32, 32), (16, 16))
    with pytest.raises(ProbeError, match="square"):
        ForwardCheck(np.ones((16, 12), np.complex64))


def test_a_partially_coherent_probe_is_checked_with_every_mode(scan, tmp_path):
    """Frames of a 3-mode probe (intensities add over the modes): every mode explains them to the
    shot noise; the strongest mode alone does not. The monitor reads all modes of a sidecar."""
    from ptychostream.sim.forward import far_field
    from ptychostream.sim.probes import kb_mirror_probe, load_probe, mode_weights

    modes = kb_mirror_probe(N, modes=3, seed=2)
    assert mode_weights(modes)[0] < 0.9  # the other modes carry a real share of the power
    p = scan.patches
    expected = sum(far_field(m[None] * p) for m in modes) * np.float32(1e6)
    raw = poisson(expected)
    full = consistency(modes, PRE, raw, np.angle(p), np.abs(p))  # the whole window: shot noise only
    assert 0.85 < np.median(full) < 1.15
    assert np.median(consistency(modes[0], PRE, raw, np.angle(p), np.abs(p))) > 10  # one mode: a misfit
    inner = centre(p)
    every = consistency(modes, PRE, raw, np.angle(inner), np.abs(inner))
    first = consistency(modes[0], PRE, raw, np.angle(inner), np.abs(inner))
    assert np.median(first) > 3 * np.median(every)
    # the sidecar's modes, as adapt writes them: all of them in use
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(b"")
    np.save(tmp_path / "m.probe.npy", modes)
    loaded, _ = load_probe(tmp_path / "m.probe.npy", modes=True)
    assert loaded.shape == (3, N, N)
    np.testing.assert_allclose(mode_weights(loaded), mode_weights(modes) / mode_weights(modes).sum(), rtol=1e-5)
    assert load_probe(tmp_path / "m.probe.npy")[0].shape == (N, N)  # the one-mode reading is unchanged
    mon = ConsistencyMonitor(share=1.0)
    assert mon.set_model(_info(model_path)) == ""
    assert mon.source().endswith("128x128, 3 modes")
    fig = mon(_Model(_info(model_path)), PRE, raw, None, {"phase": np.angle(inner)[:, None],
                                                           "amplitude": np.abs(inner)[:, None]})
    np.testing.assert_allclose(fig, every, rtol=1e-4)


def _info(path: Path, shape: int = CROP, out: int = OUT, pixel_m: float | None = None) -> ModelInfo:
    return ModelInfo(path=str(path), sha256="0" * 64, input_name="input", input_shape=(shape, shape),
                     fixed_batch=None, outputs=("amplitude", "phase"), pixel_m=pixel_m,
                     output_shapes={"amplitude": (out, out), "phase": (out, out)})


def test_the_shipped_model_carries_the_simulated_detectors_probe():
    from ptychostream.devices.simdet import SimDetector
    from ptychostream.model.info import load_model_file

    info = load_model_file(SHIPPED)
    side = probe_sidecar(info)
    assert side is not None and side.name == "ptychonn_edge.probe.npy"
    probe = np.load(side)
    assert probe.shape == (128, 128) and probe.dtype == np.complex64
    sim = SimDetector().simulator()  # the demo's detector at its defaults
    np.testing.assert_array_equal(probe, sim.probe)
    # the id the model was trained with names this probe's bytes
    import hashlib
    assert info.probe_id.endswith(hashlib.sha256(probe.tobytes()).hexdigest()[:12])


class _Model:
    def __init__(self, info: ModelInfo) -> None:
        self.info = info


def test_monitor_samples_a_share_and_raises_the_alarm(scan, tmp_path):
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(b"")
    np.save(tmp_path / "m.probe.npy", scan.probe)
    info = _info(model_path)
    raw = poisson(scan.expected)
    inner = centre(scan.patches)
    outputs = {"phase": np.angle(inner)[:, None], "amplitude": np.abs(inner)[:, None]}
    wrong = {"phase": np.zeros_like(outputs["phase"]), "amplitude": outputs["amplitude"]}
    good_fig = consistency(scan.probe, PRE, raw, outputs["phase"][:, 0], outputs["amplitude"][:, 0])
    bad_fig = consistency(scan.probe, PRE, raw, wrong["phase"][:, 0], wrong["amplitude"][:, 0])
    limit = float(np.sqrt(good_fig.max() * bad_fig.min()))
    assert good_fig.max() < limit < bad_fig.min()
    mon = ConsistencyMonitor(share=0.25, limit=limit, frames=3)
    alarms: list[tuple[int, str]] = []
    mon.on_alarm = lambda sev, text: alarms.append((sev, text))
    model = _Model(info)
    assert mon.state() == STATE_UNAVAILABLE and "no probe known" in mon.source()
    assert mon(model, PRE, raw, None, outputs) is None  # no probe: no figure, nothing else
    assert mon.set_model(info) == ""
    assert mon.state() == STATE_WAITING and "m.probe.npy" in mon.source()
    fig = mon(model, PRE, raw[:10], None, {k: v[:10] for k, v in outputs.items()})
    assert np.flatnonzero(np.isfinite(fig)).tolist() == [0, 4, 8]
    fig = mon(model, PRE, raw[10:20], None, {k: v[10:20] for k, v in outputs.items()})
    assert np.flatnonzero(np.isfinite(fig)).tolist() == [2, 6]  # every 4th frame across batches
    assert mon.sampled == 5 and mon.state() == STATE_OK and not alarms
    median, p90 = mon.figures()
    assert median < limit and p90 >= median
    mon(model, PRE, raw, None, wrong)
    assert mon.severity == 1 and mon.state() == STATE_HIGH
    assert alarms[-1][0] == 1 and "does not explain the frames" in alarms[-1][1] and "retrain" in alarms[-1][1]
    mon(model, PRE, raw, None, outputs)
    assert mon.severity == 0 and alarms[-1][0] == 0
    assert mon.set_share(0) == 0 and mon.state() == STATE_OFF
    assert mon(model, PRE, raw, None, outputs) is None


def test_probe_file_wins_and_a_wrong_size_is_refused(scan, tmp_path):
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(b"")
    info = _info(model_path, pixel_m=1e-8)
    mon = ConsistencyMonitor(share=1.0)
    mon.set_model(info)
    assert mon.state() == STATE_UNAVAILABLE
    good = tmp_path / "probe.npy"
    np.save(good, scan.probe)
    small = tmp_path / "small.npy"
    np.save(small, scan.probe[:16, :16])
    with pytest.raises(ProbeError, match=r"16x16.*64x64"):
        mon.set_probe_file(str(small))
    assert mon.state() == STATE_UNAVAILABLE  # nothing was taken
    assert "ProbeFile probe.npy 128x128" in mon.set_probe_file(str(good), frame_shape=(N, N))
    other = tmp_path / "other.npy"
    np.save(other, np.ones((48, 48), np.complex64))
    with pytest.raises(ProbeError, match=r"48x48.*128x128"):
        mon.set_probe_file(str(other), frame_shape=(N, N))
    assert "probe.npy 128x128" in mon.source()  # the previous probe stays
    with pytest.raises(ProbeError, match="not found"):
        mon.set_probe_file(str(tmp_path / "missing.npy"))
    assert "unavailable" in mon.set_probe_file("")


def test_the_share_holds_across_batches_of_any_size(scan, tmp_path):
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(b"")
    np.save(tmp_path / "m.probe.npy", scan.probe)
    info = _info(model_path)
    mon = ConsistencyMonitor(share=0.3, limit=1e9)
    mon.set_model(info)
    raw = poisson(scan.expected)
    inner = centre(scan.patches)
    outputs = {"phase": np.angle(inner)[:, None], "amplitude": np.abs(inner)[:, None]}
    picked = []
    start = 0
    for size in (1, 7, 3, 13, 2, 6):  # 32 frames in uneven batches
        sl = slice(start, start + size)
        fig = mon(_Model(info), PRE, raw[sl], None, {k: v[sl] for k, v in outputs.items()})
        picked += (start + np.flatnonzero(np.isfinite(fig))).tolist()
        start += size
    assert picked[0] == 0 and len(picked) in (9, 10)  # 0.3 of 32 frames
    assert np.diff(picked).min() >= 3 and np.diff(picked).max() <= 4  # evenly spaced
    assert mon.used_share() == 0.3 and mon.sampled == len(picked)
