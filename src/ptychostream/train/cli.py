"""``ptychostream train``: the command line."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Sequence

from ptychostream.train.config import OVERLAP_NORMS, PHYSICS_FRAMES, PRECISIONS, SELECT_FIGURES, TrainConfig, TrainError
from ptychostream.train.loop import train

__all__ = ["add_train_parser", "config_from_args"]


def _parse_range(text: str | float | Sequence[float], what: str, positive: bool = True) -> tuple[float, float]:
    """(lo, hi) from "X" (lo = hi), "LO:HI" or a pair; TrainError naming the option ``what`` if not."""
    if isinstance(text, (tuple, list)):
        lo, hi = (float(v) for v in text)
    else:
        parts = str(text).split(":")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise TrainError(f"{what} must be a number or LO:HI, got {text!r}") from None
        if len(vals) == 1:
            lo = hi = vals[0]
        elif len(vals) == 2:
            lo, hi = vals
        else:
            raise TrainError(f"{what} must be a number or LO:HI, got {text!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo or (positive and lo <= 0):
        raise TrainError(f"{what} must be {'positive ' if positive else ''}with LO <= HI, got {text!r}")
    return float(lo), float(hi)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``ptychostream train`` arguments; TrainError for a bad value."""
    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    objects = tuple(k.strip() for k in args.objects.split(",") if k.strip())
    out_size: int | str = args.output_size
    if out_size != "auto":
        try:
            out_size = int(out_size)
        except ValueError:
            raise TrainError(f"--output-size must be 'auto' or an integer, got {args.output_size!r}") from None
    return TrainConfig(
        output=args.output, data=tuple(args.data or ["sim"]), frames=args.frames, objects=objects,
        probe=args.probe, energy_keV=args.energy_kev, distance_m=args.distance_m,
        detector_pixel_m=args.detector_pixel_m, size=args.size, crop=args.crop, bin=args.bin,
        photons=_parse_range(args.photons, "--photons"), max_phase=_parse_range(args.max_phase, "--max-phase"),
        object_px=args.object_px, pool=args.pool, refresh=args.refresh, pixel_m=args.pixel_m, val=args.val,
        heads=heads, base_channels=args.base_channels, depth=args.depth, output_size=out_size,
        scale=args.scale, normalise=args.normalise, epochs=args.epochs, samples=args.samples, batch=args.batch,
        lr=args.lr, schedule=args.schedule, amp_weight=args.amp_weight, grad_weight=args.grad_weight,
        loss_floor=args.loss_floor, init=args.init, precision=args.precision,
        seed=args.seed, device=args.device, threads=args.threads, checkpoint=args.checkpoint,
        time_limit_s=None if args.time_limit is None else 60.0 * args.time_limit,
        budget_s=None if args.budget is None else 60.0 * args.budget, name=args.name,
        scan=args.scan, supervised_weight=args.supervised_weight, physics_weight=args.physics_weight,
        overlap_weight=args.overlap_weight, frames_share=args.frames_share, scan_heldout=args.scan_heldout,
        scan_side=args.scan_side, physics_group=args.physics_group, budget_clock=args.budget_clock,
        physics_context=args.physics_context, context_every=args.context_every,
        physics_frame=args.physics_frame, select=args.select, select_frames=args.select_frames,
        overlap_norm=args.overlap_norm, phase_anchor=args.phase_anchor, wrap_weight=args.wrap_weight,
        stitch_domain=args.stitch_domain,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        summary = train(cfg, progress=not args.quiet)
    except TrainError as exc:
        print(f"ptychostream train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ptychostream train: interrupted (resume with the same --checkpoint)", file=sys.stderr)
        return 130
    print(f"wrote {summary['output']}: {summary['params']:,} parameters, {summary['onnx_bytes'] / 1e6:.2f} MB, "
          f"{summary['steps']} steps in {summary['time_s']:.0f} s; val loss {summary['final_val_loss']}")
    if args.eval_demo:
        from ptychostream.quality.score import ScoreError, simulate_and_score

        try:
            for off in ("mean", "overlap"):
                res = simulate_and_score(summary["output"], offsets=off)
                print(f"demo scan (digits, 1000 points, 100 nm): offset {off}: SSIM {res['ssim']:.3f} "
                      f"PSNR {res['psnr']:.2f} dB FRC-AUC {res['frc_auc']:.3f}")
        except ScoreError as exc:
            print(f"ptychostream train: demo evaluation failed: {exc}", file=sys.stderr)
            return 2
    return 0


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse subparsers object; returns the sub-parser."""
    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train a PtychoNN-class network (PyTorch) and export it as ONNX",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a PtychoNN-class CNN (diffraction frame -> phase [and amplitude] patch) with PyTorch\n"
            "and export it as an ONNX model for the reconstructor: dynamic batch, opset 17, with the\n"
            "pre-processing, output labels, pixel size, probe id and a training summary in its metadata.\n"
            "The export is checked against torch with onnxruntime and self-tested before it replaces OUTPUT.\n\n"
            "Data: simulated on the fly (default; random positions over random etched / circuit /\n"
            "dead_leaves / blurred_noise / procedural objects, Poisson noise) or pairs from files (--data)."),
        epilog=(
            "examples:\n"
            "  ptychostream train model.onnx --epochs 40          # the 128x128 edge layout, simulated data\n"
            "  ptychostream train edge.onnx --crop 64 --budget 33 --name ptychonn_edge --checkpoint ckpt\n"
            "                                 # a first edge model (33 min on 2 CPU cores; resumable)\n"
            "  ptychostream train edge2.onnx --init edge.onnx --crop 64 --budget 60 --precision bf16 --grad-weight 0.5\n"
            "                                 # continue from it (the shipped model's last stage: models/README.md)\n"
            "  ptychostream train m.onnx --data pairs.npz --heads phase --output-size 128 --epochs 50\n"
            "  ptychostream train m.onnx --data product.h5 --frames scan.h5 --device cuda\n"
            "  ptychostream train u.onnx --init edge.onnx --crop 64 --output-size 64 --scan scan.cxi \\\n"
            "      --supervised-weight 0 --physics-weight 1 --overlap-weight 1 --budget 8\n"
            "                                 # unsupervised fine-tune on a scan's frames alone (known probe)\n\n"
            "Errors in the input (empty or mismatched files, wrong keys, NaN labels, unwritable output)\n"
            "are reported in one line and exit with status 2; an existing OUTPUT is left as it was."))
    p.add_argument("output", help="the ONNX file to write (replaced atomically when the export passes its checks)")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="sim|FILE",
                   help="'sim' (default) or a training file, repeatable: PtychoNN .npz (reciprocal, real) "
                        "or a Ptychodus product .h5 (with --frames)")
    g.add_argument("--frames", metavar="FILE", help="diffraction frames for a Ptychodus product (HDF5/NPZ/NPY)")
    g.add_argument("--objects", default=",".join(d.objects),
                   help=f"simulated object families, comma-separated (default {','.join(d.objects)})")
    g.add_argument("--probe", default=d.probe,
                   help="zoneplate (default), gaussian, or a probe file (Ptychodus product .h5 or .npy)")
    g.add_argument("--energy-kev", type=float, default=d.energy_keV, help="photon energy (default 10)")
    g.add_argument("--distance-m", type=float, default=d.distance_m, help="detector distance (default 2)")
    g.add_argument("--detector-pixel-m", type=float, default=d.detector_pixel_m, help="detector pixel (default 75e-6)")
    g.add_argument("--size", type=int, default=d.size, help="frame / model input size in px (default 128)")
    g.add_argument("--crop", type=int, help="feed the network only the central CROP px of each frame "
                   "(recorded in the pre-processing; default: the whole frame)")
    g.add_argument("--bin", type=int, default=1, help="bin frames by this factor before the network (default 1)")
    g.add_argument("--photons", default="1e6", help="photons per frame, or LO:HI drawn log-uniformly (default 1e6)")
    g.add_argument("--max-phase", default="0.6:1.0", help="object phase amplitude in rad, or LO:HI (default 0.6:1.0)")
    g.add_argument("--object-px", type=int, default=d.object_px, help="side of each simulated object (default 384)")
    g.add_argument("--pool", type=int, default=d.pool, help="objects held at a time (default 16)")
    g.add_argument("--refresh", type=int, default=d.refresh, help="steps between new object pools (default 50)")
    g.add_argument("--pixel-m", type=float, help="object pixel for file data without one (metres)")
    g.add_argument("--val", type=int, default=d.val, help="validation samples (default 256; 0: none)")
    g = p.add_argument_group("network")
    g.add_argument("--heads", default="amplitude,phase", help="amplitude,phase (default) or phase")
    g.add_argument("--base-channels", type=int, default=d.base_channels, help="channels of the first block (default 16)")
    g.add_argument("--depth", type=int, default=d.depth, help="encoder/decoder blocks (default 4)")
    g.add_argument("--output-size", default="auto",
                   help="side of the output patch: auto (the square around 97%% of the probe) or N px")
    g.add_argument("--scale", default=d.scale, choices=("none", "log1p", "sqrt"), help="input scaling (default sqrt)")
    g.add_argument("--normalise", default=d.normalise, choices=("none", "max", "sum", "mean"),
                   help="per-frame normalisation (default mean)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs (default 20)")
    g.add_argument("--samples", type=int, default=d.samples, help="samples per epoch for simulated data (default 4096)")
    g.add_argument("--batch", type=int, default=d.batch, help="batch size (default 32)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default 2e-3)")
    g.add_argument("--schedule", default=d.schedule, choices=("onecycle", "cyclic", "constant"),
                   help="learning-rate schedule (default onecycle)")
    g.add_argument("--amp-weight", type=float, default=d.amp_weight, help="weight of the amplitude loss (default 1)")
    g.add_argument("--grad-weight", type=float, default=d.grad_weight,
                   help="weight of an L1 loss on the error's finite differences, for sharper edges (default 0)")
    g.add_argument("--loss-floor", type=float, default=d.loss_floor,
                   help="loss weight of pixels the probe does not light (default 0.05)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="torch device (default cpu)")
    g.add_argument("--threads", type=int, default=d.threads, help="CPU threads for torch (default 2)")
    g.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="fp32 (default) or bf16 autocast (mixed precision: about 1.5x faster on CPUs with "
                        "AVX-512 BF16 or AMX, and on GPUs; the weights stay fp32)")
    g.add_argument("--init", metavar="MODEL.onnx",
                   help="continue from a model this command exported (same architecture and pre-processing), "
                        "as after each scan in the seed's retraining loop")
    g.add_argument("--checkpoint", metavar="DIR", help="save a checkpoint each epoch; resume from DIR if present")
    g.add_argument("--time-limit", type=float, metavar="MIN", help="stop after MIN minutes and export what is there")
    g.add_argument("--budget", type=float, metavar="MIN",
                   help="train for MIN minutes (the last one for evaluation and export) with the one-cycle "
                        "schedule run on the clock, so the run fills the time on any machine; replaces --epochs")
    g.add_argument("--budget-clock", default=d.budget_clock, choices=("wall", "cpu"),
                   help="what --budget counts: wall minutes (default) or this process's CPU minutes (all "
                        "threads; steady on a shared machine)")
    g.add_argument("--name", help="model name in the metadata (default: the file stem)")
    g = p.add_argument_group("physics-informed loss (frames alone, the known probe)")
    g.add_argument("--scan", metavar="FILE",
                   help="a scan (CXI, NPZ, record, ...) whose frames the physics loss explains: predicted patch x "
                        "probe -> FFT -> |.|^2 in the network's input geometry, scaled to each frame's count, "
                        "Poisson deviance of the counts; its probe unless --probe names a file")
    g.add_argument("--physics-weight", type=float, default=d.physics_weight,
                   help="weight of the Poisson deviance (default 0: off)")
    g.add_argument("--overlap-weight", type=float, default=d.overlap_weight,
                   help="weight of the overlap term: neighbouring patches of the scan agree where they overlap "
                        "(default 0)")
    g.add_argument("--supervised-weight", type=float, default=d.supervised_weight,
                   help="weight of the supervised loss (default 1; 0: unsupervised, the scan's frames alone)")
    g.add_argument("--frames-share", type=float, default=d.frames_share,
                   help="share of each batch from the scan's frames when the supervised loss is on (default 0.5)")
    g.add_argument("--scan-heldout", type=float, default=d.scan_heldout,
                   help="hold out this fraction of the scanned extent (a region, never trained on; default 0)")
    g.add_argument("--scan-side", default=d.scan_side, choices=("right", "left", "top", "bottom"),
                   help="where --scan-heldout lies (default right)")
    g.add_argument("--physics-context", default=d.physics_context, choices=("border", "mosaic"),
                   help="the object outside the predicted patch, which the probe lights a little: the patch's mean "
                        "border value (default), or the network's own patches of the scan stitched into one "
                        "object (refreshed every --context-every steps)")
    g.add_argument("--context-every", type=int, default=d.context_every,
                   help="steps between refreshes of the mosaic surround (default 50)")
    g.add_argument("--physics-group", type=int, default=d.physics_group,
                   help="neighbouring frames per group in a batch, for the overlap term (default 4)")
    g.add_argument("--physics-frame", default=d.physics_frame, choices=PHYSICS_FRAMES,
                   help="what the deviance compares: the network's input geometry (default: its crop and bin) "
                        "or the full detector frame (every pixel, same origin and orientation), while the "
                        "network still sees its crop")
    g.add_argument("--overlap-norm", default=d.overlap_norm, choices=OVERLAP_NORMS,
                   help="the overlap term as is (default none) or divided by each pair's mean power (power: the "
                        "object's amplitude scale, which the deviance leaves free, cannot lower it)")
    g.add_argument("--phase-anchor", type=float, default=d.phase_anchor,
                   help="weight of each patch's squared probe-weighted mean phase (default 0: off); the frames "
                        "leave the absolute phase free, and a mean drifting to +-pi clips the bounded phase head")
    g.add_argument("--wrap-weight", type=float, default=d.wrap_weight,
                   help="weight of a penalty on phase jumps between neighbouring output pixels above pi/2 "
                        "(default 0: off): the frames see the phase modulo 2 pi, and a fine-tune may wrap the "
                        "object's upper level, which the stitcher then averages into a blur")
    g.add_argument("--stitch-domain", default=d.stitch_domain, choices=("auto", "phase", "complex"),
                   help="the mosaic domain the model's stitch hint asks for (default auto: complex, which "
                        "averages exp(i phase) and so is safe where phases wrap, when the run trained on the "
                        "frames alone; else phase)")
    g.add_argument("--select", default=d.select, choices=SELECT_FIGURES,
                   help="export the checkpoint with the lowest validation figure instead of the last one: the "
                        "run's loss, the Poisson deviance or the overlap disagreement (default none); with "
                        "--scan the figure is of --select-frames frames kept out of the batches")
    g.add_argument("--select-frames", type=int, default=d.select_frames,
                   help="training-side frames kept out of the batches for --select (default 24)")
    p.add_argument("--eval-demo", action="store_true",
                   help="after export, score the model on the demo scan (digits, 1000 points, 100 nm)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    return p
