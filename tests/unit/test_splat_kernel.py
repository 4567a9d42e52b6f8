"""The compiled splat (mosaic/_splat.py) against numpy's version of the same Stitcher."""

from __future__ import annotations

import numpy as np
import pytest

from ptychostream.mosaic.stitch import Stitcher, splat_kernel_status

PX = 1e-8


def test_the_compiled_splat_serves():
    """numba is a dependency: the kernel compiles (or loads from its cache) and the stitcher uses it."""
    assert splat_kernel_status() == "compiled"
    for domain in ("phase", "complex"):
        for offset in ("mean", "overlap", "none"):
            assert Stitcher(PX, (16, 16), offset=offset, domain=domain).uses_kernel, (offset, domain)
    assert not Stitcher(PX, (16, 16), dtype=np.float64).uses_kernel


def _pair(offset: str, **kw) -> tuple[Stitcher, Stitcher]:
    ref, fast = Stitcher(PX, (24, 20), offset=offset, **kw), Stitcher(PX, (24, 20), offset=offset, **kw)
    assert ref.domain == fast.domain
    ref.compiled = False
    return ref, fast


def _same(ref: Stitcher, fast: Stitcher) -> None:
    assert fast.uses_kernel and not ref.uses_kernel
    assert ref.counts == fast.counts and ref.exposed_box == fast.exposed_box and ref.n_patches == fast.n_patches
    for name in ("num_phase", "weight", "num_amp", "weight_amp", "num_im"):
        a, b = getattr(ref, name), getattr(fast, name)
        assert (a is None) == (b is None), name
        if a is not None:
            scale = float(np.abs(a).max()) or 1.0
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-6 * scale, err_msg=name)
    ma, mb = ref.mosaic(), fast.mosaic()
    if ref.num_im is None:
        np.testing.assert_allclose(mb.phase, ma.phase, atol=1e-4, equal_nan=True)
    else:  # an angle: compared modulo 2 pi, where the phasor sum is not vanishingly small
        big = np.hypot(ref._view(ref.num_phase), ref._view(ref.num_im)) > 1e-3 * float(ref.weight.max())
        d = (mb.phase - ma.phase + np.pi) % (2 * np.pi) - np.pi
        assert big.sum() > 100 and np.abs(d[big]).max() < 1e-3


@pytest.mark.parametrize("offset", ["mean", "overlap", "none"])
@pytest.mark.parametrize("extent", [None, (-40 * PX, 40 * PX, -50 * PX, 50 * PX)])
@pytest.mark.parametrize("domain", ["phase", "complex"])
def test_compiled_and_numpy_splats_agree(offset, extent, domain):
    """Batches with and without amplitude (so amplitude gets its own weight plane), a NaN patch, a NaN
    and an out-of-range position (rejected alike), sub-pixel positions, a growing or a fixed canvas;
    for ``overlap`` 13 patches a batch are two steps of 8, each matched to the canvas before it."""
    rng = np.random.default_rng(7)
    ref, fast = _pair(offset, extent_m=extent, domain=domain)
    for b in range(6):
        n = 13
        phase = rng.standard_normal((n, 24, 20)).astype(np.float32) + 2.0
        amp = rng.random((n, 24, 20)).astype(np.float32) if b % 3 != 1 else None
        pos = (rng.random((n, 2)) - 0.5) * 70 * PX
        phase[4, 3, 3] = np.nan
        pos[6] = np.nan
        pos[7] = (1e-3, 0.0)  # far off: out of a fixed extent, or over max_canvas_px when growing
        for s in (ref, fast):
            s.add(phase, pos, amp)
    assert ref.counts["stitched"] == 6 * 10 and ref.weight_amp is not None
    _same(ref, fast)


def test_strided_and_float64_patches_are_splatted_alike():
    """The stitch stage hands views of a batch's rows; a float64 or strided batch takes the same path."""
    rng = np.random.default_rng(8)
    big = rng.standard_normal((10, 48, 40))
    pos = (rng.random((10, 2)) - 0.5) * 30 * PX
    ref, fast = _pair("mean")
    ref.add(np.ascontiguousarray(big[:, ::2, ::2], np.float32), pos)
    fast.add(big[:, ::2, ::2], pos)  # float64, not contiguous
    _same(ref, fast)


def test_without_numba_numpy_serves_and_says_so():
    """Where numba does not import (a platform without its wheel), the stitcher splats with numpy, and a
    warning says why; the sums are numpy's."""
    import subprocess
    import sys

    code = (
        "import sys, logging, numpy as np\n"
        "sys.modules['numba'] = None\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from ptychostream.mosaic.stitch import Stitcher, splat_kernel_status\n"
        "st = Stitcher(1e-8, (16, 16))\n"
        "ref = Stitcher(1e-8, (16, 16)); ref.compiled = False\n"
        "ph = np.random.default_rng(0).standard_normal((5, 16, 16)).astype(np.float32)\n"
        "pos = np.random.default_rng(1).random((5, 2)) * 1e-7\n"
        "assert st.add(ph, pos) == ref.add(ph, pos) == 5 and not st.uses_kernel\n"
        "assert np.array_equal(st.num_phase, ref.num_phase)\n"
        "print(splat_kernel_status())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("numpy (ModuleNotFoundError")
    assert "the compiled splat is unavailable" in out.stderr
