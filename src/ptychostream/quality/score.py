"""Score reconstructions: a mosaic file against a truth file, or a model on a simulated scan.

Against an iterative reference (a Ptychodus product) instead of a truth:
:func:`~ptychostream.quality.reference.score_against_product` and
:func:`~ptychostream.quality.reference.compare_to_reference` (re-exported here).

The figures (SSIM, PSNR, FRC, after registration and offset / ramp removal) come from
:mod:`ptychostream.quality.metrics`; this module reads the mosaic (:mod:`ptychostream.files.mosaic`:
``/entry/mosaic`` of a record HDF5, an NPZ/HDF5 with ``phase`` (+ ``coverage``/``mask``,
``origin_m``/``pixel_m``), or a bare ``.npy``) and a truth file written by
:func:`ptychostream.sim.replay.write_truth_h5`, and places the mosaic on the object grid with
the convention of :mod:`ptychostream.mosaic.stitch` (see :mod:`ptychostream.quality.grid`).
The CLI is :mod:`ptychostream.quality.cli`, the ePIE baseline :mod:`ptychostream.quality.baselines`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.mosaic import MosaicFile, read_mosaic
from ptychostream.files.truth import read_truth
from ptychostream.quality.baselines import epie
from ptychostream.quality.grid import illumination_map, illumination_mask, place_truth
from ptychostream.quality.metrics import (
    ScoreError,
    frc,
    half_bit_threshold,
    remove_plane,
    score_phase,
)
from ptychostream.quality.reference import (
    ReferenceScores,
    compare_to_reference,
    score_against_product,
)

__all__ = [
    "MosaicFile",
    "ReferenceScores",
    "ScoreError",
    "compare_to_reference",
    "epie",
    "frc",
    "half_bit_threshold",
    "illumination_map",
    "illumination_mask",
    "load_mosaic",
    "place_truth",
    "remove_plane",
    "score_against_product",
    "score_files",
    "score_mosaic",
    "score_phase",
    "simulate_and_score",
    "simulate_scan",
    "stitch_patches",
]


def load_mosaic(path: str | Path, dataset: str | None = None) -> MosaicFile:
    """Read a mosaic file (see :func:`ptychostream.files.mosaic.read_mosaic`); raises :class:`ScoreError`."""
    try:
        return read_mosaic(path, dataset)
    except (OSError, ValueError) as exc:
        raise ScoreError(str(exc)) from None


def score_files(mosaic_path: str | Path, truth_path: str | Path, *, dataset: str | None = None,
                mask_path: str | None = None, coverage: float | None = None,
                illumination: float | None = 0.5, origin_m: tuple[float, float] | None = None,
                pixel_m: float | None = None, register: bool = True) -> dict[str, Any]:
    """Score a mosaic file against a ground-truth file (see :func:`load_mosaic`, :func:`score_phase`).

    The compared pixels are those inside the object and inside every mask asked for: the
    mosaic's own ``mask`` (if stored), ``coverage`` ≥ the given fraction (if stored and asked
    for), the illuminated area (total probe intensity ≥ ``illumination`` × its maximum, from the
    truth's probe and positions; ``None`` to skip) and ``mask_path`` (a .npy boolean image).
    """
    mos = load_mosaic(mosaic_path, dataset)
    try:
        truth = read_truth(truth_path)
    except (OSError, ValueError) as exc:
        raise ScoreError(f"cannot read the truth: {exc}") from None
    obj_px = float(truth["object_pixel_m"])
    px = pixel_m or mos.pixel_m or obj_px
    origin = origin_m or mos.origin_m
    H, W = truth["object"].shape
    if origin is None:
        if mos.phase.shape != (H, W):
            raise ScoreError(f"{mos.source}: no origin_m in the file and its shape {mos.phase.shape} differs from "
                             f"the object's {(H, W)}; pass --origin-m Y X and --pixel-m")
        cy, cx = truth["object_center_m"]
        origin = (cy - (H // 2) * obj_px, cx - (W // 2) * obj_px)
    tphase, inside = place_truth(truth["object"], obj_px, mos.phase.shape, origin, px, truth["object_center_m"])
    mask = inside & np.isfinite(mos.phase)
    used = ["inside the object"]
    if mos.mask is not None and mos.mask.shape == mask.shape:
        mask &= mos.mask
        used.append("mosaic mask")
    if coverage is not None:
        if mos.coverage is None:
            raise ScoreError(f"{mos.source}: the file holds no coverage; drop --coverage")
        mask &= mos.coverage >= coverage * float(np.nanmax(mos.coverage))
        used.append(f"coverage >= {coverage:g}")
    if illumination is not None and truth.get("probe") is not None:
        pos = truth["positions_m"]
        mask &= illumination_mask(truth["probe"], pos, px, mos.phase.shape, origin, illumination)
        used.append(f"illumination >= {illumination:g}")
    if mask_path:
        extra = np.load(mask_path).astype(bool)
        if extra.shape != mask.shape:
            raise ScoreError(f"{mask_path}: mask shape {extra.shape} differs from the mosaic's {mask.shape}")
        mask &= extra
        used.append(str(mask_path))
    res = score_phase(mos.phase, tphase, mask, register=register)
    res["mask"] = ", ".join(used)
    res["source"] = mos.source
    return res


# --------------------------------------------------------------------------- simulated scans
def simulate_scan(kind: str = "digits", points: int = 1000, step_m: float = 1e-7, photons: float = 1e6,
                  seed: int = 0, pattern: str = "spiral", probe: np.ndarray | None = None,
                  geometry: Any = None) -> Any:
    """The simulated detector's scan as a :class:`~ptychostream.sim.forward.Simulator`.

    Defaults are the demo's: the default :class:`Geometry`, the zone-plate probe, a Fermat
    spiral of 1000 points with a 100 nm step over ``make_object(kind, scan_extent_px(...), seed)``,
    1e6 photons per frame, uint16 frames.
    """
    from ptychostream.sim import (
        Geometry,
        Simulator,
        make_object,
        make_probe,
        scan_extent_px,
        scan_positions,
    )

    g = geometry or Geometry()
    pr = probe if probe is not None else make_probe("zoneplate", g.size, g.pixel_m, geometry=g)
    pos = scan_positions(pattern, step_m, points, seed=seed)
    obj = make_object(kind, shape=scan_extent_px(pos, g.pixel_m, g.size), seed=seed)
    return Simulator(obj, pr, pos, g, photons=photons, seed=seed)


def stitch_patches(phase: np.ndarray, positions_m: np.ndarray, pixel_m: float, offset: str = "mean",
                   amplitude: np.ndarray | None = None, window: str = "hann", domain: str = "phase") -> Any:
    """Stitch patches with the live :class:`~ptychostream.mosaic.stitch.Stitcher`; returns its MosaicImage."""
    from ptychostream.mosaic.stitch import Stitcher

    st = Stitcher(pixel_m, phase.shape[1:], offset=offset, window=window, domain=domain)
    for s in range(0, len(phase), 32):  # the live path's batch size
        st.add(phase[s:s + 32], positions_m[s:s + 32], None if amplitude is None else amplitude[s:s + 32])
    return st.mosaic()


def score_mosaic(mosaic: Any, sim: Any, illumination: float | None = 0.5) -> dict[str, Any]:
    """Score a MosaicImage of a simulated scan against the simulator's object."""
    g = sim.geometry
    tphase, inside = place_truth(sim.obj, g.pixel_m, mosaic.shape, mosaic.origin_m, mosaic.pixel_m)
    mask = inside & mosaic.mask
    if illumination is not None:
        mask &= illumination_mask(sim.probe, sim.positions_m, mosaic.pixel_m, mosaic.shape, mosaic.origin_m,
                                  illumination)
    return score_phase(mosaic.phase, tphase, mask)


def simulate_and_score(model: Any, *, kind: str = "digits", points: int = 1000, step_m: float = 1e-7,
                       photons: float = 1e6, seed: int = 0, offsets: tuple[str, ...] | str = ("mean", "overlap"),
                       window: str = "hann", threads: int = 2, keep: bool = False,
                       domain: str | None = None) -> dict[str, Any]:
    """Simulate a scan, reconstruct it with ``model`` (path or opened Model), stitch and score.

    Returns {offset: score dict} (or one score dict if ``offsets`` is a single string).  The
    model's ``pixel_m`` must match the simulation's object pixel.  ``keep`` adds the MosaicImage
    under ``"mosaic"`` in each score dict.  ``domain``: the mosaic domain (None: the one the model's
    stitch hint names, as the device applies it), recorded as each score dict's ``"domain"``.
    """
    from ptychostream.model.infer import ModelError, open_model

    single = isinstance(offsets, str)
    offs: tuple[str, ...] = (offsets,) if isinstance(offsets, str) else tuple(offsets)
    sim = simulate_scan(kind, points, step_m, photons, seed)
    g = sim.geometry
    opened = None
    try:
        m = model
        if isinstance(model, (str, Path)):
            try:
                m = opened = open_model(model, backend="ONNXRuntime-CPU", threads=threads)
            except ModelError as exc:
                raise ScoreError(str(exc)) from None
        if m.info.pixel_m and abs(m.info.pixel_m / g.pixel_m - 1) > 1e-3:
            raise ScoreError(f"the model's pixel ({m.info.pixel_m:.4g} m) differs from the scan's "
                             f"({g.pixel_m:.4g} m)")
        dom = domain or m.info.stitch_domain
        phases, amps = [], []
        for s in range(0, sim.n, 64):
            out = m.run(sim.frames(np.arange(s, min(s + 64, sim.n))))
            phases.append(out["phase"])
            if "amplitude" in out:
                amps.append(out["amplitude"])
    finally:
        if opened is not None:
            opened.close()
    phase = np.concatenate(phases)
    amp = np.concatenate(amps) if amps else None
    res: dict[str, Any] = {}
    for off in offs:
        mos = stitch_patches(phase, sim.positions_m, g.pixel_m, off, amp, window, dom)
        r = score_mosaic(mos, sim)
        r["domain"] = dom
        if keep:
            r["mosaic"] = mos
        res[off] = r
    return res[offs[0]] if single else res
