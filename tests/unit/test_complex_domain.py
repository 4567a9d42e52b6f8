"""The mosaic's complex domain: phasors averaged, the angle of their sums the mosaic (wrap-safe)."""

from __future__ import annotations

import numpy as np
import pytest

from ptychostream.mosaic.display import DisplayView
from ptychostream.mosaic.stitch import Stitcher

PX = 1e-8
H = W = 24


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def _scan(n_side: int = 6, step: int = 8) -> np.ndarray:
    g = (np.arange(n_side) - (n_side - 1) / 2) * step * PX
    yy, xx = np.meshgrid(g, g, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def _object(shape: tuple[int, int], seed: int = 3) -> np.ndarray:
    """A smooth phase object spanning more than 2 pi."""
    y, x = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
    rng = np.random.default_rng(seed)
    return 1.2 * np.sin(x / 9 + rng.random()) + 1.2 * np.cos(y / 7) + 0.04 * x


def _patches(obj: np.ndarray, pos: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    out = []
    for p in pos:
        r = centre[0] + int(round(p[0] / PX)) - H // 2
        c = centre[1] + int(round(p[1] / PX)) - W // 2
        out.append(obj[r:r + H, c:c + W])
    return np.array(out, np.float32)


def test_values_either_side_of_the_cut_agree():
    """One feature at 3.1 rad, predicted as +3.1 by some patches and as 3.1 - 2 pi by the others: the
    phase domain averages the two into nonsense near 0, the complex domain gives 3.1."""
    pos = _scan()
    patches = np.full((len(pos), H, W), 3.1, np.float32)
    patches[1::2] -= 2 * np.pi
    for domain, ok in (("phase", False), ("complex", True)):
        st = Stitcher(PX, (H, W), offset="none", domain=domain)
        st.add(patches, pos)
        m = st.mosaic()
        inner = m.phase[m.mask & (m.coverage > 0.5)]
        assert inner.size > 100
        assert np.allclose(inner, 3.1, atol=1e-4) == ok, (domain, inner.min(), inner.max())


@pytest.mark.parametrize("offset", ["mean", "overlap"])
def test_patch_offsets_modulo_2pi_are_removed(offset):
    """Patches of a smooth object, each wrapped with its own unknown constant: the complex mosaic is the
    object modulo 2 pi up to one constant (overlap), where the phase domain blurs; with ``mean`` each
    patch's mean turn is removed (a high-pass, as in the phase domain)."""
    rng = np.random.default_rng(1)
    pos = _scan()
    obj = _object((120, 120))
    true = _patches(obj, pos, (60, 60))
    shifted = true + rng.uniform(-np.pi, np.pi, len(pos))[:, None, None].astype(np.float32)
    given = _wrap(shifted).astype(np.float32)

    def stitch(patches: np.ndarray, domain: str):
        st = Stitcher(PX, (H, W), offset=offset, domain=domain)
        st.overlap_chunk = 1  # each patch turned to all before it (in steps of 8, a step sees earlier steps only)
        for s in range(0, len(pos), 7):
            st.add(patches[s:s + 7], pos[s:s + 7])
        return st.mosaic()

    m = stitch(given, "complex")
    # wrapping the inputs changes nothing in the complex domain
    np.testing.assert_allclose(_wrap(m.phase - stitch(shifted, "complex").phase), 0, atol=2e-4)
    sel = m.mask & (m.coverage > 0.3)
    r0 = 60 + int(round(m.origin_m[0] / PX))
    c0 = 60 + int(round(m.origin_m[1] / PX))
    ref = obj[r0:r0 + m.phase.shape[0], c0:c0 + m.phase.shape[1]]

    def off_by(phase: np.ndarray) -> float:
        d = _wrap(phase - ref)[sel]
        return float(np.abs(_wrap(d - np.angle(np.exp(1j * d).mean()))).max())  # one constant for the mosaic

    if offset == "overlap":
        assert off_by(m.phase) < 0.05
        assert off_by(stitch(given, "phase").phase) > 1.0  # the phase domain averages wrapped patches: a blur


def test_display_view_and_flashlight_in_the_complex_domain():
    """The display-sized image is the angle of the binned phasor sums; unbinned it is the mosaic; the
    flashlight of a patch is its turned angle, in (-pi, pi]."""
    rng = np.random.default_rng(2)
    pos = _scan(8, 6)
    ph = _wrap(rng.normal(0, 2.0, (len(pos), H, W))).astype(np.float32)
    amp = rng.random((len(pos), H, W)).astype(np.float32)
    st = Stitcher(PX, (H, W), offset="overlap", domain="complex")
    st.add(ph, pos, amp)
    m = st.mosaic()
    assert st.num_im is not None and m.amplitude is not None
    full = DisplayView(0).image(st)
    np.testing.assert_allclose(full.phase, m.phase, atol=1e-6)
    binned = DisplayView(20).image(st)
    assert binned.binning >= 2 and max(binned.phase.shape) <= 20
    b = binned.binning
    box = st.exposed_box
    num_re, _, _, _, num_im = st.planes(box)
    # the second full bin inside the mosaic on each axis: its angle is that of the phasors summed there
    by, bx = (b - box[0] % b) % b + b, (b - box[2] % b) % b + b
    sl = (slice(by, by + b), slice(bx, bx + b))
    want = np.arctan2(num_im[sl].sum(), num_re[sl].sum())
    oy, ox = binned_origin(binned, b, st)
    gy, gx = (box[0] + by) // b - oy, (box[2] + bx) // b - ox
    assert binned.mask[gy, gx]
    assert binned.phase[gy, gx] == pytest.approx(want, abs=1e-5)
    block, _ = st.flashlight_patch(ph[0], pos[0])
    seen = block[np.isfinite(block)]
    assert seen.size > 0 and np.all(np.abs(seen) <= np.pi + 1e-6)
    with pytest.raises(ValueError, match="domain"):
        Stitcher(PX, (H, W), domain="polar")


def binned_origin(img, b: int, st: Stitcher) -> tuple[int, int]:
    """Global bin index of the display image's pixel (0, 0)."""
    return (int(round(img.origin_m[0] / st.pixel_m - (b - 1) / 2)) // b,
            int(round(img.origin_m[1] / st.pixel_m - (b - 1) / 2)) // b)


def test_a_models_hinted_domain_is_what_scoring_stitches_in(tmp_path):
    """``ModelInfo.stitch_domain`` reads the hint ("phase" where it names none or is unreadable), and
    ``simulate_and_score`` stitches in it unless told otherwise, as the device does on a swap."""
    import json

    from ptychostream.model.info import load_model_file
    from ptychostream.model.zoo import build_ptychonn_onnx
    from ptychostream.quality.score import simulate_and_score

    def model(name: str, hint: str | None) -> str:
        meta = {} if hint is None else {"ptychostream.stitch": hint}
        return build_ptychonn_onnx(str(tmp_path / name), size=128, heads=("phase",), base_channels=2, depth=2,
                                   metadata=meta)

    cplx = model("c.onnx", json.dumps({"offset": "mean", "domain": "complex"}))
    cases = {cplx: "complex", model("p.onnx", json.dumps({"offset": "overlap"})): "phase",
             model("n.onnx", None): "phase", model("bad.onnx", "{not json"): "phase",
             model("odd.onnx", json.dumps({"domain": "polar"})): "phase"}
    for path, want in cases.items():
        assert load_model_file(path).stitch_domain == want, path
    got = simulate_and_score(cplx, points=40, offsets="mean", threads=1)
    assert got["domain"] == "complex" and 0 <= got["ssim"] <= 1
    assert simulate_and_score(cplx, points=40, offsets="mean", threads=1, domain="phase")["domain"] == "phase"
