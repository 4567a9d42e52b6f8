#!/usr/bin/env python3
"""Where an adapted model's held-out figure goes: memorised content, a frame domain gap, or the ceiling.

  python benchmarks/heldout_gap.py --data D --reference REF.h5 adapted=M.onnx [other=M2.onnx ...]

``D`` holds ``ptychostream sim-foreign``'s files (``foreign.cxi``, ``foreign-truth.h5``); ``REF.h5``
is the iterative product adapt made (its probe modes make the synthetic frames). For each side of the
scan (the training side ``left``, the held-out side ``right``, each the outer 25 % of the extent), on
the frames there, read and cleaned as adapt does, every figure against the truth (SSIM / band-pass r,
``score_against_product``), stitched with ``overlap`` and with ``mean``:

* ``true``: the truth's own central patches (the stitcher's ceiling), and ``true-lowpass``: the same
  cut to the frequencies a 64² central crop of the frames carries (|k| <= 1/4 cycle per pixel);
* each model on the measured frames;
* each model on *synthetic* frames of the same positions: the truth object through the recovered
  probe (every mode, intensities added, Poisson at each frame's measured count; no background, no
  hot pixels). The same figure on both says the measured frames are not what limits the model.

A model that scores like ``true-lowpass`` on the side it was trained on and far lower on the held-out
side has memorised the content it saw. Prints a Markdown table and, with ``--json``, writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

OFFSETS = ("overlap", "mean")
SIDES = ("left", "right")
FRACTION = 0.25
#: the highest spatial frequency (cycles per object pixel) a 64² central crop of 128² frames carries
CROP_KMAX = 0.25


def lowpass(patches: np.ndarray, kmax: float = CROP_KMAX) -> np.ndarray:
    """Complex patches (n, N, N) with every frequency above ``kmax`` cycles/px removed."""
    k = np.fft.fftfreq(patches.shape[-1])
    keep = np.hypot(k[:, None], k[None, :]) <= kmax
    return np.fft.ifft2(np.fft.fft2(patches) * keep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with foreign.cxi and foreign-truth.h5")
    ap.add_argument("--reference", type=Path, required=True, help="the iterative product (its probe modes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="Poisson noise of the synthetic frames")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("models", nargs="+", metavar="NAME=MODEL.onnx")
    args = ap.parse_args(argv)

    import h5py

    from ptychostream.files.product import read_product
    from ptychostream.files.scan import read_scan
    from ptychostream.quality.reference import score_against_product
    from ptychostream.sim.forward import extract_patches, far_field
    from ptychostream.train.data import crop_centre
    from ptychostream.train.instrument import (
        bad_pixels,
        clean_frames,
        heldout_split,
        infer_phases,
        probe_modes,
        stitch_phases,
    )

    models = dict(m.split("=", 1) if "=" in m else (Path(m).stem, m) for m in args.models)
    scan = read_scan(args.data / "foreign.cxi")
    frames = np.asarray(scan.canonical_frames(), dtype=np.float32)
    pos = np.asarray(scan.positions_m, dtype=np.float64)
    pixel = float(scan.pixel_m())
    frames = clean_frames(frames, bad_pixels(frames), "zero")
    truth = read_product(args.data / "foreign-truth.h5", need_positions=False)
    with h5py.File(args.reference, "r") as h5:
        modes = probe_modes(np.asarray(h5["probe"][()]), frames.shape[-1])
    rng = np.random.default_rng(args.seed)

    def figure(phase: np.ndarray, sel: np.ndarray, split: Any, offset: str) -> tuple[float, float]:
        half = phase.shape[-1] / 2 * pixel
        p = pos[sel]
        extent = (p[:, 0].min() - half, p[:, 0].max() + half, p[:, 1].min() - half, p[:, 1].max() + half)
        mos = stitch_phases(np.ascontiguousarray(phase, dtype=np.float32), p, pixel, extent, offset)
        sc = score_against_product(mos, truth, region=split.region_box(pad_m=half), mask=mos.mask).as_dict(curves=False)
        return round(float(sc["ssim"]), 3), round(float(sc["bandpass_corr"]), 3)

    rows: list[dict[str, Any]] = []
    for side in SIDES:
        split = heldout_split(pos, FRACTION, side, 0.0)
        sel = split.held
        true = extract_patches(truth.object, pos[sel] - np.asarray(truth.center_m)[None], pixel, frames.shape[-1])
        inten = sum(far_field(m[None] * true) for m in modes)
        inten *= frames[sel].sum(axis=(1, 2), keepdims=True) / np.maximum(inten.sum(axis=(1, 2), keepdims=True),
                                                                          1e-30)
        synthetic = rng.poisson(inten).astype(np.float32)
        inferred: dict[str, np.ndarray] = {}
        for name, path in models.items():
            inferred[name], _ = infer_phases(path, frames[sel], args.threads)
            inferred[f"{name}, synthetic frames"], _ = infer_phases(path, synthetic, args.threads)
        out = next(iter(inferred.values())).shape[-1]  # the true patches at the models' patch size
        cases = {"true": np.angle(crop_centre(true, out)), "true-lowpass": np.angle(crop_centre(lowpass(true), out)),
                 **inferred}
        for what, phase in cases.items():
            row = {"side": side, "frames": int(len(sel)), "what": what}
            for off in OFFSETS:
                row[off] = figure(phase, sel, split, off)
            rows.append(row)
            print(f"[gap] {side} {what}: " + ", ".join(f"{o} {row[o]}" for o in OFFSETS), file=sys.stderr, flush=True)
    print("| side | frames | patches | SSIM / band-pass r, `overlap` | SSIM / band-pass r, `mean` |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['frames']} | {r['what']} | {r['overlap'][0]:.3f} / {r['overlap'][1]:.3f} | "
              f"{r['mean'][0]:.3f} / {r['mean'][1]:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
