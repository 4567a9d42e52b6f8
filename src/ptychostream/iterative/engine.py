"""A thin wrapper over pty-chi (``ptychi``): a :class:`~ptychostream.files.scan.Scan` in, a product out.

What pty-chi wants, and how a scan is brought to it:

* **Data**: intensities (not amplitudes) with zero frequency at pixel (0, 0), because its far-field
  model is a plain (unshifted, unnormalised) FFT.  The scan's canonical frames are centred, so they
  are ``ifftshift``-ed here and passed with ``fft_shift=False`` (pty-chi's own shift is an
  ``fftshift``, wrong for odd sizes).
* **Positions**: pixels (y, x), relative to the object buffer's centre.  Position 0 puts the centre
  of a patch, (s - 1) / 2, on object coordinate ``H / 2 - 0.5`` (H even), i.e. patch pixel s // 2 on
  object pixel H // 2 for even frames, as in :mod:`ptychostream.sim.forward`; odd frames take half
  a pixel more.  The scan is re-centred on the middle of its position range (a whole number of
  pixels), which becomes the product's ``center_m``.
* **Bad pixels**: pty-chi's valid-pixel mask (``valid_pixel_mask``, True = measured), shifted as the
  data are; the masked pixels constrain nothing (LSQML, ePIE and DM all honour it).  Their values are
  the median of their good neighbours, for the probe guess and its scaling (a zero there measurably
  worsened LSQML: SSIM 0.97 -> 0.73 on the test scan with 12 masked pixels, masked or not).
* **Probe**: (opr modes, incoherent modes, h, w) for the unnormalised FFT, i.e. our orthonormal
  probe divided by √(h·w); the product gets it back in the orthonormal convention, so
  ``|FFT_ortho(P·O)|²`` gives the measured counts, as for the simulator's probe.

:func:`reconstruct` runs LSQML, ePIE or DM from the file's probe (cropped or padded to the frame
size) or from :func:`ptychostream.iterative.probe.guess_probe`, one epoch at a time so a progress
callback sees each; :func:`write_reconstruction` writes the Ptychodus product with every probe mode.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ptychostream.files.errors import FileFormatError
from ptychostream.files.product import (
    PIXEL_HEIGHT,
    PIXEL_WIDTH,
    PROBE,
    Product,
    write_product_h5,
)
from ptychostream.files.scan import Scan
from ptychostream.iterative.probe import (
    add_modes,
    fit_probe,
    guess_probe,
    scale_to_frames,
)

__all__ = ["ENGINES", "Engine", "Progress", "Reconstruction", "prepare", "reconstruct", "write_reconstruction"]

log = logging.getLogger(__name__)

Engine = Literal["lsqml", "epie", "dm"]
#: the engines :func:`reconstruct` offers
ENGINES: tuple[str, ...] = ("lsqml", "epie", "dm")

#: progress callback: (epochs done, epochs in all, the epoch's loss)
Progress = Callable[[int, int, float], None]


@dataclass
class Reconstruction(Product):
    """A product with what the engine adds: every probe mode, the loss per epoch and the settings."""

    probe_modes: np.ndarray | None = None  # (modes, h, w) complex, orthonormal convention
    loss: list[float] = field(default_factory=list)  # one per epoch
    seconds: float = 0.0  # the engine's wall time (build and epochs)
    settings: dict[str, Any] = field(default_factory=dict)  # engine, iterations, modes, device, ...


@dataclass
class Prepared:
    """A scan brought to pty-chi's conventions (see the module docstring)."""

    patterns: np.ndarray  # (N, h, w) float32 intensities, zero frequency at (0, 0)
    positions_px: np.ndarray  # (N, 2) (y, x) pixels about the object buffer's centre (pty-chi's)
    center_m: tuple[float, float]  # (y, x) metres of the object's centre pixel (H // 2, W // 2)
    shape: tuple[int, int]  # object buffer (H, W), even
    pixel_m: float
    probe: np.ndarray  # (modes, h, w) complex64, orthonormal convention
    probe_source: str  # "file" or "guess"
    half_px: float  # the odd-frame offset added to the positions (0 or 0.5)
    valid: np.ndarray | None = None  # (h, w) bool, True = a measured pixel, zero frequency at (0, 0); None: all


def _where(scan: Scan) -> str:
    return scan.source or "the scan"


def prepare(scan: Scan, *, probe_modes: int = 1, margin_px: int = 4, bad_pixels: np.ndarray | None = None) -> Prepared:
    """Check ``scan`` and bring it to pty-chi's conventions: frames, positions, object shape, probe.

    ``bad_pixels``: (H, W) bool (non-zero = bad) in the coordinates of the scan's canonical frames
    (:meth:`Scan.canonical_frames`: centred, oriented); they become pty-chi's valid-pixel mask.

    Raises :class:`FileFormatError` naming the scan's source for no positions, a count that differs
    from the frames', NaN positions, non-square or non-finite frames, or a probe that is not
    (modes, h, w) complex; ``ValueError`` for a pixel size that cannot be had.
    """
    where = _where(scan)
    frames = np.asarray(scan.frames)
    if frames.ndim != 3 or frames.shape[0] == 0:
        raise FileFormatError(f"{where}: 'frames' must be (N, H, W) with N >= 1, got shape {frames.shape}")
    n, h, w = frames.shape
    if h != w:
        raise FileFormatError(f"{where}: 'frames' must be square for the iterative engines, got {h}x{w}")
    pos = None if scan.positions_m is None else np.asarray(scan.positions_m, dtype=np.float64)
    if pos is None or pos.size == 0:
        raise FileFormatError(f"{where}: no probe positions ('positions_m' is empty); expected (N, 2) "
                              f"(y, x) metres, one per frame ({n} frames)")
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise FileFormatError(f"{where}: 'positions_m' must be (N, 2) (y, x) metres, got shape {pos.shape}")
    if len(pos) != n:
        raise FileFormatError(f"{where}: {len(pos)} positions for {n} frames; expected one (y, x) per frame")
    bad = ~np.isfinite(pos).all(axis=1)
    if bad.any():
        raise FileFormatError(f"{where}: 'positions_m' holds NaN or infinite values at {int(bad.sum())} of "
                              f"{n} points (first: #{int(np.flatnonzero(bad)[0])}); expected finite metres")
    pixel_m = float(scan.pixel_m())
    if not (np.isfinite(pixel_m) and pixel_m > 0):
        raise ValueError(f"{where}: the object pixel must be a positive number of metres, got {pixel_m!r}")
    if int(probe_modes) < 1:
        raise ValueError(f"probe_modes must be >= 1, got {probe_modes!r}")

    canon = np.asarray(scan.canonical_frames(), dtype=np.float32)
    if not np.isfinite(canon).all():
        raise FileFormatError(f"{where}: 'frames' hold NaN or infinite values; expected finite intensities")
    canon = np.clip(canon, 0.0, None)  # a dark subtraction may leave negative counts
    valid = None
    if bad_pixels is not None:
        bad = np.asarray(bad_pixels)
        if bad.shape != canon.shape[-2:] or bad.dtype.kind not in "biuf":
            raise ValueError(f"{where}: bad_pixels must be a boolean {canon.shape[-2]}x{canon.shape[-1]} mask of the "
                             f"canonical frames, got {bad.dtype} {bad.shape}")
        bad = bad != 0
        if bad.all():
            raise ValueError(f"{where}: bad_pixels marks every pixel bad")
        if bad.any():
            canon = _fill_bad(canon, bad)  # for the probe guess and its scale; pty-chi ignores them
            valid = np.ascontiguousarray(np.fft.ifftshift(~bad))
    patterns = np.ascontiguousarray(np.fft.ifftshift(canon, axes=(-2, -1)))

    # re-centre on the middle of the position range, by whole pixels, so the object stays on our grid
    px = pos / pixel_m
    mid = np.rint((px.max(axis=0) + px.min(axis=0)) / 2)
    rel = px - mid
    half = 0.5 if h % 2 else 0.0
    reach = np.ceil(np.abs(rel).max(axis=0)).astype(int)
    shape = tuple(int(2 * (r + h // 2 + 1 + margin_px)) for r in reach)

    if scan.probe is not None:
        p = np.asarray(scan.probe)
        p = p[None] if p.ndim == 2 else p
        if p.ndim == 4:  # (opr modes, modes, h, w): the first OPR mode
            p = p[0]
        if p.ndim != 3 or not np.iscomplexobj(p) or not np.isfinite(p).all():
            raise FileFormatError(f"{where}: 'probe' must be finite complex (modes, h, w), got {p.dtype} {p.shape}")
        if p.shape[-2:] != (h, w):
            log.info("%s: probe %s cropped/padded to the %dx%d frames", where, p.shape[-2:], h, w)
            p = fit_probe(p, (h, w))
        if not np.any(p):
            raise FileFormatError(f"{where}: 'probe' is all zeros within the {h}x{w} frame")
        if len(p) >= probe_modes:
            modes = p[:probe_modes]
        else:  # fewer modes in the file: keep them, grow the rest from the first
            extra = add_modes(p[0], probe_modes - len(p) + 1)[1:]
            modes = np.concatenate([p, extra * np.sqrt(np.sum(np.abs(p) ** 2) / np.sum(np.abs(p[0]) ** 2))])
        source = "file"
    else:
        modes = add_modes(guess_probe(canon), probe_modes)
        source = "guess"
    modes = scale_to_frames(modes, canon)
    return Prepared(patterns, rel + half, (float(mid[0] * pixel_m), float(mid[1] * pixel_m)),
                    (shape[0], shape[1]), pixel_m, modes, source, half, valid)


def _fill_bad(frames: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """``frames`` (N, H, W) with each ``bad`` pixel set to the median of its good 3x3 neighbours (wrapping;
    0 when it has none), in place."""
    h, w = bad.shape
    for r, c in np.argwhere(bad):
        rr, cc = np.meshgrid(np.arange(r - 1, r + 2) % h, np.arange(c - 1, c + 2) % w, indexing="ij")
        good = ~bad[rr, cc]
        frames[:, r, c] = np.median(frames[:, rr[good], cc[good]], axis=1) if good.any() else 0.0
    return frames


def _options(engine: str) -> Any:
    from ptychi import api

    if engine == "lsqml":
        return api.LSQMLOptions()
    if engine == "epie":
        return api.EPIEOptions()
    if engine == "dm":
        return api.DMOptions()
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def _run_task(opts: Any, prep: Prepared, obj: np.ndarray, probe: np.ndarray, iterations: int, device: str,
              engine: str, loss: list[float], progress: Progress | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build pty-chi's task, run it epoch by epoch (appending to ``loss``); (object, probe modes, positions px)."""
    import torch
    from ptychi.api.task import PtychographyTask

    task = PtychographyTask(opts, diffraction_data=prep.patterns, object_data=obj, probe_data=probe,
                            probe_position_y_px=prep.positions_px[:, 0], probe_position_x_px=prep.positions_px[:, 1],
                            valid_pixel_mask=prep.valid)
    with task:  # frees the accelerator's cache on the way out
        if device == "cpu":  # the task set a default-device mode: a Python hook on every torch call
            torch.set_default_device(None)
        for epoch in range(iterations):
            task.run(1)
            assert task.reconstructor is not None  # built by the task's constructor
            table = task.reconstructor.loss_tracker.table
            value = float(table.iloc[-1].loss) if len(table) else float("nan")
            loss.append(value)
            if not np.isfinite(value):
                raise RuntimeError(f"{engine} diverged at epoch {epoch + 1}: the loss is {value}")
            if progress is not None:
                progress(epoch + 1, iterations, value)
        out_obj = np.asarray(task.get_data_to_cpu("object", as_numpy=True))[0]
        out_probe = np.asarray(task.get_data_to_cpu("probe", as_numpy=True))[0]
        out_pos = np.stack([task.get_probe_positions_y(as_numpy=True),
                            task.get_probe_positions_x(as_numpy=True)], axis=1).astype(np.float64)
    return out_obj, out_probe, out_pos


def reconstruct(scan: Scan, *, engine: Engine = "lsqml", iterations: int = 100, probe_modes: int = 1,
                refine_probe: bool = True, refine_positions: bool = False, device: str = "cpu",
                batch_size: int | None = None, progress: Progress | None = None, seed: int = 0,
                probe_start: int | None = None, positions_start: int | None = None,
                bad_pixels: np.ndarray | None = None) -> Reconstruction:
    """Reconstruct ``scan`` with pty-chi's ``engine`` (LSQML, ePIE or DM) for ``iterations`` epochs.

    The probe starts from the scan's probe (cropped or padded to the frame size; missing modes
    grown as Hermite modes) or from :func:`~ptychostream.iterative.probe.guess_probe`, and is refined
    with ``refine_probe`` from epoch ``probe_start`` (default: 1, after one object-only epoch).
    ``refine_positions``: the engine's position correction from epoch ``positions_start`` (default:
    a fifth of the epochs); the product then holds the refined positions.  ``device``: ``"cpu"`` or
    ``"cuda"``; ``batch_size``: frames per update (default: about a tenth of the scan, 16 to 256, for
    LSQML and ePIE; the whole scan for DM).  ``progress(done, total, loss)`` is called after
    every epoch.  ``bad_pixels``: (H, W) bool, True = bad, in the canonical frames' coordinates
    (hot or dead pixels): pty-chi's valid-pixel mask, so they constrain nothing (see :func:`prepare`).
    pty-chi's global torch settings (default device and dtype) are restored afterwards.

    Returns a :class:`Reconstruction` (a :class:`~ptychostream.files.product.Product`): the object
    (H, W) complex whose centre pixel (H // 2, W // 2) lies at ``center_m``, the first probe mode and
    all of them, the positions (N, 2) metres (y, x), the loss per epoch.
    """
    import torch
    from ptychi import api

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
    iterations = int(iterations)
    t0 = time.monotonic()
    prep = prepare(scan, probe_modes=probe_modes, bad_pixels=bad_pixels)
    n, h, w = prep.patterns.shape
    if batch_size is None:
        batch_size = n if engine == "dm" else int(np.clip(n // 10, 16, 256))
    batch_size = int(min(max(1, batch_size), n))

    opts = _options(engine)
    ro = opts.reconstructor_options
    ro.num_epochs = iterations
    ro.batch_size = batch_size
    ro.default_device = api.Devices.GPU if device == "cuda" else api.Devices.CPU
    ro.random_seed = int(seed)
    ro.displayed_loss_function = api.LossFunctions.MSE_SQRT
    if engine == "lsqml":
        ro.noise_model = api.NoiseModels.GAUSSIAN
    if scan.wavelength_m is not None:
        opts.data_options.wavelength_m = float(scan.wavelength_m)
    opts.data_options.fft_shift = False  # done here, right for odd sizes too
    oo = opts.object_options
    oo.pixel_size_m = prep.pixel_m
    oo.optimizable = True
    oo.determine_position_origin_coords_by = api.ObjectPosOriginCoordsMethods.SUPPORT
    po = opts.probe_options
    po.optimizable = bool(refine_probe)
    po.optimization_plan.start = min(iterations - 1, 1 if probe_start is None else int(probe_start))
    po.orthogonalize_incoherent_modes.enabled = prep.probe.shape[0] > 1
    pp = opts.probe_position_options
    pp.optimizable = bool(refine_positions)
    if refine_positions:
        pp.optimization_plan.start = min(iterations - 1, max(1, iterations // 5) if positions_start is None
                                         else int(positions_start))

    # our orthonormal probe -> pty-chi's unnormalised FFT: divide by sqrt(h*w)
    norm = float(np.sqrt(h * w))
    probe = (prep.probe / norm)[None]
    obj = np.ones((1, *prep.shape), dtype=np.complex64)
    prev_device, prev_dtype = torch.get_default_device(), torch.get_default_dtype()
    loss: list[float] = []
    try:
        with warnings.catch_warnings():
            # pty-chi turns a tensor that still needs grad into a float (its bounding box): harmless, noisy
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar",
                                    category=UserWarning)
            out_obj, out_probe, out_pos = _run_task(opts, prep, obj, probe, iterations, device, engine, loss,
                                                    progress)
    finally:  # CPU is torch's default: no device mode (its hook slows every call), as before the task
        torch.set_default_device(None if prev_device.type == "cpu" else prev_device)
        torch.set_default_dtype(prev_dtype)
    out_probe = out_probe * norm
    positions_m = (out_pos - prep.half_px) * prep.pixel_m + np.asarray(prep.center_m)
    if not refine_positions:  # exactly the scan's, not a float32 round trip
        positions_m = np.asarray(scan.positions_m, dtype=np.float64).copy()
    settings = {"engine": engine, "iterations": iterations, "probe_modes": int(prep.probe.shape[0]),
                "refine_probe": bool(refine_probe), "refine_positions": bool(refine_positions),
                "device": device, "batch_size": batch_size, "seed": int(seed), "probe_source": prep.probe_source,
                "frames": n, "frame_size": h, "bad_pixels": 0 if prep.valid is None else int((~prep.valid).sum())}
    modes = np.asarray(out_probe, dtype=np.complex64)
    return Reconstruction(object=np.asarray(out_obj, dtype=np.complex64), pixel_m=prep.pixel_m,
                          center_m=prep.center_m, probe=modes[0], probe_pixel_m=prep.pixel_m,
                          positions_m=positions_m, source=_where(scan), probe_modes=modes, loss=loss,
                          seconds=time.monotonic() - t0, settings=settings)


def write_reconstruction(path: str | Path, rec: Product) -> Path:
    """Write ``rec`` as a Ptychodus product HDF5 (:func:`write_product_h5`), with every probe mode.

    For a :class:`Reconstruction` the ``probe`` dataset holds all modes (1, modes, h, w), as Ptychodus
    stores them (:func:`~ptychostream.files.product.read_product` reads the first), and the file
    root carries ``ptychostream_*`` attributes: the settings, the loss per epoch and the wall time.
    """
    import h5py

    target = Path(path)
    with h5py.File(target, "w") as h5:
        write_product_h5(h5, rec)
        if isinstance(rec, Reconstruction):
            if rec.probe_modes is not None and len(rec.probe_modes) > 1:
                attrs = dict(h5[PROBE].attrs)
                del h5[PROBE]
                ds = h5.create_dataset(PROBE, data=np.asarray(rec.probe_modes)[None])
                ds.attrs.update({k: attrs[k] for k in (PIXEL_WIDTH, PIXEL_HEIGHT) if k in attrs})
            for key, value in rec.settings.items():
                h5.attrs[f"ptychostream_{key}"] = value
            h5.attrs["ptychostream_loss"] = np.asarray(rec.loss, dtype=np.float64)
            h5.attrs["ptychostream_seconds"] = float(rec.seconds)
            h5.attrs["ptychostream_source"] = rec.source
    return target
