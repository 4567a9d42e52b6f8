"""``ptychostream score``: a phase mosaic against the simulation's truth, or against an iterative reference."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.mosaic import write_mosaic_npz
from ptychostream.quality.metrics import ScoreError
from ptychostream.quality.reference import (
    BAND_PX,
    FRC_THRESHOLDS,
    ReferenceScores,
    score_against_product,
)
from ptychostream.quality.score import score_files, simulate_and_score

__all__ = ["add_score_parser"]


def _print(res: dict[str, Any], title: str, as_json: bool) -> None:
    out = {k: v for k, v in res.items() if k not in ("frc", "mosaic")}
    if as_json:
        print(json.dumps(out, default=float))
        return
    print(f"{title}  ({out['pixels']} px compared: {out.get('mask', '')})")
    print(f"  SSIM        {out['ssim']:.4f}")
    print(f"  PSNR        {out['psnr']:.2f} dB  (data range {out['data_range']:.3f} rad)")
    print(f"  FRC AUC     {out['frc_auc']:.4f}")
    print(f"  FRC 1/2-bit {out['frc_half_bit']:.4f} cycles/px (0.5 = Nyquist)")
    print(f"  shift       ({out['shift'][0]:+.2f}, {out['shift'][1]:+.2f}) px (y, x)")


def _print_reference(res: ReferenceScores, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res.as_dict(curves=False), default=float))
        return
    px = f" at {res.pixel_m * 1e9:.4g} nm" if res.pixel_m else ""
    lo, hi = res.band_px
    offset, gy, gx = res.ramp
    print(f"{res.source}  ({res.n_pixels} px compared{px}: {res.mask})")
    print(f"  SSIM           {res.ssim:.4f}  (data range {res.data_range:.3f} rad: "
          "1st-99th percentile of the reference)")
    print(f"  band-pass r    {res.bandpass_corr:.4f}  (features of {lo:g}-{hi:g} px)")
    print(f"  Pearson r      {res.pearson:.4f}  (RMS difference {res.rms_rad:.3f} rad)")
    print(f"  FRC AUC        {res.frc_auc:.4f}")
    print(f"  FRC resolution {res.frc_resolution_px:.2f} px  "
          f"({res.frc_threshold} threshold; 2 px = Nyquist, no crossing)")
    reg = "" if res.registered else "  (not registered)"
    print(f"  shift          ({res.shift_px[0]:+.2f}, {res.shift_px[1]:+.2f}) px (y, x){reg}")
    print(f"  ramp removed   {offset:+.3f} rad, {gy * 1e3:+.3f} / {gx * 1e3:+.3f} mrad/px (y / x)")


def _json_file(args: argparse.Namespace) -> str | None:
    """The --json FILE (None when absent or '-', stdout)."""
    return None if args.json in (None, "-") else str(args.json)


def _write_json(path: str, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=float) + "\n")


def _cmd_reference(args: argparse.Namespace) -> int:
    if args.truth:
        raise ScoreError("give either TRUTH or --reference PRODUCT, not both")
    if not args.mosaic:
        raise ScoreError("give the MOSAIC to score against --reference")
    mask = None
    if args.mask:
        mask = np.load(args.mask).astype(bool)
    res = score_against_product(args.mosaic, args.reference, region=tuple(args.region) if args.region else None,
                                mask=mask, coverage=args.coverage,
                                illumination=None if args.illumination <= 0 else args.illumination,
                                origin_m=tuple(args.origin_m) if args.origin_m else None, pixel_m=args.pixel_m,
                                dataset=args.dataset, band=tuple(args.band), register=not args.no_register,
                                threshold=args.frc_threshold)
    _print_reference(res, args.json == "-")
    target = _json_file(args)
    if target:
        _write_json(target, res.as_dict())
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    as_json = args.json == "-"
    target = _json_file(args)
    try:
        if args.reference:
            return _cmd_reference(args)
        if args.region:
            raise ScoreError("--region needs --reference")
        if args.model:
            if args.mosaic or args.truth:
                raise ScoreError("give either MOSAIC TRUTH or --model, not both")
            offsets = tuple(args.offset or ("mean", "overlap"))
            res = simulate_and_score(args.model, kind=args.object, points=args.points, step_m=args.step,
                                     photons=args.photons, seed=args.seed, offsets=offsets, keep=bool(args.save))
            for off in offsets:
                r = res[off]
                r["mask"] = "illumination >= 0.5, mosaic mask"
                r["offset"] = off
                r["source"] = (f"{args.model} on a simulated {args.object} spiral scan ({args.points} points, "
                               f"{args.step:g} m step, {args.photons:g} photons), offset {off}, "
                               f"{r['domain']} domain")
                _print(r, r["source"], as_json)
                if args.save:
                    mos = r["mosaic"]
                    base = Path(args.save)
                    path = base.with_name(f"{base.stem}_{off}.npz") if len(offsets) > 1 else base
                    write_mosaic_npz(path, mos.phase, mos.coverage, mos.mask, mos.origin_m, mos.pixel_m,
                                     mos.amplitude)
            if target:
                _write_json(target, {off: {k: v for k, v in res[off].items() if k not in ("frc", "mosaic")}
                                     for off in offsets})
            return 0
        if not (args.mosaic and args.truth):
            raise ScoreError("give a MOSAIC and a TRUTH file, a MOSAIC and --reference PRODUCT, "
                             "or --model to simulate a scan")
        res = score_files(args.mosaic, args.truth, dataset=args.dataset, mask_path=args.mask,
                          coverage=args.coverage,
                          illumination=None if args.illumination <= 0 else args.illumination,
                          origin_m=tuple(args.origin_m) if args.origin_m else None,
                          pixel_m=args.pixel_m, register=not args.no_register)
    except (ScoreError, OSError) as exc:
        print(f"ptychostream score: error: {exc}", file=sys.stderr)
        return 2
    _print(res, res["source"], as_json)
    if target:
        _write_json(target, {k: v for k, v in res.items() if k not in ("frc", "mosaic")})
    return 0


def add_score_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``score`` on an argparse subparsers object; returns the sub-parser."""
    p = sub.add_parser(
        "score", help="SSIM / FRC / band-pass correlation of a phase mosaic against the truth or an iterative "
                      "reference",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Score a reconstructed phase mosaic against the ground truth of a simulated scan (MOSAIC TRUTH),\n"
            "or against an iterative reconstruction of the same scan (MOSAIC --reference PRODUCT.h5).\n\n"
            "The mosaic is placed on the object grid via its origin and pixel size, cropped to the\n"
            "illuminated / covered area, registered (sub-pixel phase cross-correlation), freed of its\n"
            "global phase offset and linear ramp (least squares on the mask), then compared: SSIM and\n"
            "PSNR with data_range = the truth's range on the mask, FRC with its 1/2-bit crossing and AUC.\n\n"
            "With --reference (a Ptychodus product: object, pixel size, centre, positions) both images go on\n"
            "the coarser grid of the two, cut to their overlap; the mosaic's valid pixels and the product's\n"
            "scanned region (and --region) are compared after a wrap-safe ramp removal and registration:\n"
            "SSIM (data range = 1st-99th percentile of the reference), the band-pass correlation (Pearson r\n"
            "after a difference of Gaussians keeping 2-16 px features), FRC AUC and resolution. See\n"
            "docs/scoring.md."),
        epilog=(
            "mosaic files: a record HDF5 (/entry/mosaic: phase, coverage; attrs origin_y_m, origin_x_m,\n"
            "pixel_size_m), any HDF5/NPZ with 'phase' (+ 'coverage', 'mask', 'origin_m', 'pixel_m'),\n"
            "or a bare .npy (then on the object's own grid unless --origin-m/--pixel-m are given).\n"
            "truth: an HDF5 written by ptychostream.sim.replay.write_truth_h5 (simdet --truth).\n\n"
            "examples:\n  ptychostream score demo-out/record.h5 demo-out/truth.h5 --json\n"
            "  ptychostream score record.h5 --reference product.h5 --region 0 2e-6 -1e-6 1e-6 --json out.json\n"
            "  ptychostream score --model src/ptychostream/models/ptychonn_edge.onnx   # the demo scan, offline"))
    p.add_argument("mosaic", nargs="?", help="mosaic file (HDF5, NPZ or NPY; 'file.h5::group' picks a group)")
    p.add_argument("truth", nargs="?", help="ground-truth HDF5 (write_truth_h5)")
    p.add_argument("--reference", metavar="PRODUCT",
                   help="score against this iterative reconstruction (Ptychodus product .h5, or .npz) instead")
    p.add_argument("--region", type=float, nargs=4, metavar=("Y0", "Y1", "X0", "X1"),
                   help="with --reference: compare only inside this box (metres, e.g. a held-out region)")
    p.add_argument("--band", type=float, nargs=2, metavar=("MIN", "MAX"), default=list(BAND_PX),
                   help="with --reference: feature sizes (periods, px) the band-pass keeps (default 2 16)")
    p.add_argument("--frc-threshold", choices=FRC_THRESHOLDS, default="half-bit",
                   help="with --reference: FRC threshold of the resolution (default half-bit)")
    p.add_argument("--dataset", help="HDF5 group/dataset or NPZ key of the mosaic phase")
    p.add_argument("--mask", help=".npy boolean image (mosaic grid): compare only these pixels")
    p.add_argument("--coverage", type=float, default=None, metavar="FRAC",
                   help="also require the mosaic's coverage >= FRAC of its maximum")
    p.add_argument("--illumination", type=float, default=0.5, metavar="FRAC",
                   help="require the scan's total probe intensity >= FRAC of its maximum "
                        "(from the truth's or the reference's probe and positions; default 0.5; 0 disables)")
    p.add_argument("--origin-m", type=float, nargs=2, metavar=("Y", "X"),
                   help="metres of mosaic pixel (0, 0), overriding the file")
    p.add_argument("--pixel-m", type=float, help="mosaic pixel size in metres, overriding the file")
    p.add_argument("--no-register", action="store_true", help="skip the sub-pixel registration")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="print the figures as one JSON object (one per line); with FILE, write them there "
                        "(with the FRC curve for --reference) and print the table")
    g = p.add_argument_group("simulate instead (--model): the demo scan through a model and the live stitcher")
    g.add_argument("--model", metavar="ONNX", help="reconstruct a simulated scan with this model, stitch, score")
    g.add_argument("--object", default="digits", help="object kind (default digits, the demo's)")
    g.add_argument("--points", type=int, default=1000, help="spiral scan points (default 1000)")
    g.add_argument("--step", type=float, default=1e-7, help="scan step in metres (default 1e-7)")
    g.add_argument("--photons", type=float, default=1e6, help="photons per frame (default 1e6)")
    g.add_argument("--seed", type=int, default=0, help="object / noise seed (default 0)")
    g.add_argument("--offset", action="append", choices=("mean", "overlap", "none"),
                   help="stitcher phase-offset mode, repeatable (default: mean and overlap)")
    g.add_argument("--save", metavar="NPZ", help="also save the mosaic(s) (NAME_<offset>.npz for several)")
    # metres are often negative and written like -4e-07, which argparse (3.11) takes for an option
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    p.set_defaults(func=_cmd_score)
    return p
