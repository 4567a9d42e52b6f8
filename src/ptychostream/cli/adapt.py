"""``ptychostream adapt SCAN``: from one measured scan to a model for this instrument, in one command.

read the scan (:func:`~ptychostream.files.scan.read_scan`) → the iterative reference (pty-chi,
:func:`~ptychostream.iterative.engine.reconstruct`; or ``--reference product.h5``) → labels cut from
it → training from the serving model (the scan's own pairs, probe-centric synthetic pairs, or both
mixed; a time budget) → ONNX export to a new file → both models scored on a held-out region of the
scan (never trained on) → a report (``report.json``, ``report.png``) → with ``--ioc PREFIX``, a put of
the new model to ``$(PREFIX)ModelPath`` only if it beats the serving one there.  Hot pixels found in the
scan are pty-chi's valid-pixel mask and zeroed in the training frames; the mask, in the raw detector
frame's coordinates, is written to ``OUT/bad-pixels.npy`` and put to ``$(PREFIX)PreMaskPath`` together
with the model swap (only then), so that the IOC zeroes them too.

``--status-file`` gets a JSON object after every stage (written to a temporary file and renamed):
``{"stage", "progress" (0..1), "message", "done", "ok", "result"}``; the IOC's ``Retrain`` action
polls it.  A failed or interrupted run leaves the serving model untouched: the new model is a new
file, and only the final put swaps it in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MASK_FILE", "SHIPPED_MODEL", "AdaptError", "StatusFile", "add_adapt_parser", "put_mask", "raw_mask",
           "run_adapt"]

#: the model that serves when no other is given
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "ptychonn_edge.onnx"
#: the bad-pixel mask adapt writes to --out, in the raw detector frame's coordinates (for PreMaskPath)
MASK_FILE = "bad-pixels.npy"
#: the training mode of the physics loss alone: the scan's frames, no labels (train/physics.py)
PHYSICS_MODE = "physics"
#: share of the progress bar of each stage: (start, end)
_STAGES = {"read": (0.0, 0.03), "reference": (0.03, 0.30), "pairs": (0.30, 0.33), "train": (0.33, 0.88),
           "score": (0.88, 0.96), "report": (0.96, 0.97), "swap": (0.97, 1.0)}


class AdaptError(RuntimeError):
    """A step of adapt failed; the message says which and why."""


class StatusFile:
    """The JSON status of a run, replaced atomically (temporary file + ``os.replace``); no file: no-op."""

    def __init__(self, path: str | None, min_interval_s: float = 0.5) -> None:
        self.path = Path(path) if path else None
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self.state: dict[str, Any] = {"stage": "start", "progress": 0.0, "message": "", "done": False,
                                      "ok": False, "result": {}}

    def update(self, stage: str, fraction: float = 0.0, message: str | None = None, *, done: bool = False,
               ok: bool = False, result: dict[str, Any] | None = None, force: bool = True) -> None:
        """Set ``stage`` at ``fraction`` (0..1) of it; written now if ``force`` or the last write is old."""
        lo, hi = _STAGES.get(stage, (1.0, 1.0))
        progress = 1.0 if done else lo + (hi - lo) * min(max(float(fraction), 0.0), 1.0)
        self.state.update(stage=stage, progress=round(progress, 4), done=done, ok=ok)
        if message is not None:
            self.state["message"] = message
        if result is not None:
            self.state["result"] = result
        now = time.monotonic()
        if self.path is None or (not force and now - self._last < self.min_interval_s):
            return
        self._last = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.state, f, default=_json_default)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON: {type(value).__name__}")


# --------------------------------------------------------------------------- IOC
def _pva_context() -> Any:
    from p4p.client.thread import Context

    return Context("pva", nt=False)


def serving_model(prefix: str, timeout: float = 5.0) -> str:
    """The model file the IOC at ``prefix`` serves now (``ModelPath_RBV``); AdaptError if none or unreachable."""
    try:
        with _pva_context() as ctx:
            path = str(ctx.get(prefix + "ModelPath_RBV", timeout=timeout)["value"])
    except Exception as exc:  # p4p raises TimeoutError or RemoteError
        raise AdaptError(f"cannot read {prefix}ModelPath_RBV: {exc}") from None
    if not path:
        raise AdaptError(f"the IOC {prefix} serves no model; pass --init MODEL.onnx")
    return path


def swap_model(prefix: str, path: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Put ``path`` to ``$(prefix)ModelPath`` and wait until the IOC serves it; (served, message)."""
    try:
        with _pva_context() as ctx:
            ctx.put(prefix + "ModelPath", path, wait=True, timeout=timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                rbv = str(ctx.get(prefix + "ModelPath_RBV", timeout=5.0)["value"])
                status = int(ctx.get(prefix + "ModelStatus_RBV", timeout=5.0)["value.index"])
                if rbv == path and status == 2:  # Ready
                    return True, f"{prefix}ModelPath = {path}: serving"
                if status == 3:  # Error: the IOC refused it (the old model keeps serving)
                    msg = str(ctx.get(prefix + "Message_RBV", timeout=5.0)["value"])
                    return False, f"the IOC refused {path}: {msg}"
                time.sleep(0.1)
    except Exception as exc:
        return False, f"cannot put {prefix}ModelPath: {type(exc).__name__}: {exc}"
    return False, f"the IOC did not serve {path} within {timeout:g} s"


def put_mask(prefix: str, path: str, timeout: float = 30.0) -> tuple[bool, str]:
    """Put ``path`` to ``$(prefix)PreMaskPath`` (the IOC reads the file) and check the readback; (applied, message)."""
    try:
        with _pva_context() as ctx:
            ctx.put(prefix + "PreMaskPath", path, wait=True, timeout=timeout)
            rbv = str(ctx.get(prefix + "PreMaskPath_RBV", timeout=5.0)["value"])
    except Exception as exc:  # p4p raises TimeoutError or RemoteError (the IOC's refusal, with its reason)
        return False, f"cannot put {prefix}PreMaskPath: {type(exc).__name__}: {exc}"
    if rbv != path:
        return False, f"{prefix}PreMaskPath_RBV is {rbv!r}, not {path}"
    return True, f"{prefix}PreMaskPath = {path}"


# --------------------------------------------------------------------------- steps
def raw_mask(scan: Any, canonical: np.ndarray) -> np.ndarray:
    """A (H, W) mask of the canonical frames (:meth:`Scan.canonical_frames`) in the stored (raw detector)
    frame's coordinates: the inverse of its centring, transpose and flips, so that the IOC's bad-pixel
    mask (applied to the raw frame, before PreFFTShift and the orientation) zeroes the same pixels.

    A flip reverses the frequencies (k -> -k mod N), its own inverse; the flips are undone first,
    then the transpose, then the centring (``ifftshift`` for corner-origin frames).
    """
    out = np.asarray(canonical)
    if scan.flip_x:
        out = np.roll(out[:, ::-1], 1, axis=1)
    if scan.flip_y:
        out = np.roll(out[::-1], 1, axis=0)
    if scan.transpose:
        out = out.T
    if scan.origin == "corner":
        out = np.fft.ifftshift(out)
    return np.ascontiguousarray(out)


def _probe_modes_of(reference: Any, reference_path: str | None, scan: Any, size: int) -> np.ndarray:
    """The recovered probe, all modes: the reconstruction's, the reference file's, else the scan's."""
    for cand in (getattr(reference, "probe_modes", None),):
        if cand is not None and np.shape(cand)[-2:] == (size, size):
            return np.asarray(cand)
    if reference_path:
        import h5py

        if h5py.is_hdf5(reference_path):
            with h5py.File(reference_path, "r") as h5:
                if "probe" in h5 and h5["probe"].shape[-2:] == (size, size):
                    return np.asarray(h5["probe"][()]).reshape(-1, size, size)
    if reference.probe is not None and np.shape(reference.probe)[-2:] == (size, size):
        return np.asarray(reference.probe)
    if scan.probe is not None and np.shape(scan.probe)[-2:] == (size, size):
        return np.asarray(scan.probe)
    raise AdaptError(f"no {size}x{size} probe in the reference or in {scan.source or 'the scan'}: "
                     "probe-centric training and the loss weight need one")


def _report_png(path: Path, heldout: dict[str, Any], names: dict[str, str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, mask = heldout["_reference"], heldout["_mask"]
    if not mask.any():
        return
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    r, m = ref[box], mask[box]
    lo, hi = np.percentile(r[m], [1, 99])
    rt = (heldout.get("reference") or {}).get("truth_scores")
    panels = [("iterative reference" + (f"\nvs truth: band-pass r {rt['bandpass_corr']:.3f}, SSIM {rt['ssim']:.3f}"
                                        if rt else ""), r)]
    for key, label in names.items():
        img = heldout["_images"].get(key)
        if img is None:
            continue
        a = np.nan_to_num(img[box])
        sc = (heldout.get(key) or {}).get("scores") or {}
        if sc and any(sc.get("shift_px", (0, 0))):  # the scorer's registration, for the eye too
            from scipy.ndimage import shift as nd_shift

            field = np.exp(1j * a)
            dy, dx = sc["shift_px"]
            a = np.angle(nd_shift(field.real, (dy, dx), order=1, mode="nearest")
                         + 1j * nd_shift(field.imag, (dy, dx), order=1, mode="nearest"))
        d = np.where(m, np.exp(1j * (a - np.nan_to_num(r))), 0)
        offset = float(np.angle(d.sum()))
        aligned = r + np.angle(np.exp(1j * (a - offset - r)))  # the reference plus the wrapped difference
        sub = f"\nband-pass r {sc['bandpass_corr']:.3f}, SSIM {sc['ssim']:.3f}" if sc else "\n(not scored)"
        st = (heldout.get(key) or {}).get("truth_scores")
        if st:
            sub += f"\nvs truth: band-pass r {st['bandpass_corr']:.3f}, SSIM {st['ssim']:.3f}"
        panels.append((label + sub, aligned))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for ax, (label, img) in zip(axes[0], panels):
        ax.imshow(np.where(m, img, np.nan), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_adapt(args: argparse.Namespace, status: StatusFile | None = None,
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the whole loop as ``args`` says (see the module docstring); returns the result dict.

    Raises AdaptError (or TrainError, FileFormatError, ...) on failure; the serving model is untouched.
    """
    from ptychostream.files.product import read_product
    from ptychostream.files.scan import read_scan
    from ptychostream.model.info import ModelError, load_model_file
    from ptychostream.train.config import TRAIN_KINDS, TrainConfig
    from ptychostream.train.instrument import (
        bad_pixels,
        clean_frames,
        heldout_scores,
        heldout_split,
        instrument_source,
        is_better,
        label_patches,
        reference_object,
    )
    from ptychostream.train.loop import train
    from ptychostream.train.physics import physics_source

    status = status or StatusFile(None)
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    times: dict[str, float] = {}
    budget_s = float(args.budget_min) * 60.0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        times[name] = round(now - since, 2)
        return now

    # 1. the scan
    status.update("read", 0.0, f"reading {args.scan}")
    overrides = {k: v for k, v in (("origin", args.origin), ("object_pixel_m", args.object_pixel_m),
                                   ("position_units", args.position_units)) if v is not None}
    scan = read_scan(args.scan, **overrides)
    frames = np.asarray(scan.canonical_frames(), dtype=np.float32)
    positions = np.asarray(scan.positions_m, dtype=np.float64)
    pixel = float(scan.pixel_m())
    n, h, w = frames.shape
    if h != w:
        raise AdaptError(f"{args.scan}: the frames are {h}x{w}; the network takes square frames")
    say(f"{args.scan}: {n} frames of {h}x{w}, object pixel {pixel:.4g} m ({scan.layout or 'scan'})")
    # hot pixels: pty-chi's valid-pixel mask, zeroed for the network, and the IOC's bad-pixel mask
    # (PreMaskPath, in the raw frame's coordinates: the IOC zeroes them before its own orientation)
    bad = bad_pixels(frames) if args.bad_pixels == "auto" else np.zeros((h, w), dtype=bool)
    mask_path: Path | None = None
    if bad.any():
        mask_path = out_dir / MASK_FILE
        np.save(mask_path, raw_mask(scan, bad))
        say(f"{int(bad.sum())} hot pixel(s) at (row, col) {[tuple(map(int, rc)) for rc in np.argwhere(bad)][:8]} "
            f"of the canonical frame: masked for pty-chi, zeroed for the network; mask {mask_path}")
        frames = clean_frames(frames, bad, "zero")
    truth = read_product(args.truth, need_positions=False) if args.truth else None
    t = lap("read", t0)

    # 2. the iterative reference
    if args.reference:
        status.update("reference", 0.0, f"reading the reference {args.reference}")
        reference = read_product(args.reference, need_positions=False)
        ref_path = str(args.reference)
    else:
        try:
            from ptychostream.iterative.engine import reconstruct, write_reconstruction
        except ImportError as exc:
            raise AdaptError(f"the iterative step needs pty-chi (pip install 'ptychostream[iterative]'): {exc}; "
                             "or pass --reference product.h5") from None
        status.update("reference", 0.0, f"pty-chi {args.engine}, {args.iterations} iterations")

        def epoch(done: int, total: int, loss: float) -> None:
            status.update("reference", done / max(total, 1), f"pty-chi {args.engine}: epoch {done}/{total}, "
                          f"loss {loss:.4g}", force=False)

        reference = reconstruct(scan, engine=args.engine, iterations=args.iterations, device=args.device,
                                progress=epoch, probe_modes=args.probe_modes, bad_pixels=bad if bad.any() else None)
        ref_path = str(write_reconstruction(out_dir / "reference.h5", reference))
        say(f"reference: {ref_path}")
    t = lap("reference", t)

    # 3. the serving model and the labels
    status.update("pairs", 0.0, "labels from the reference")
    init = args.init or (serving_model(args.ioc) if args.ioc else str(SHIPPED_MODEL))
    try:
        info = load_model_file(init)
    except ModelError as exc:
        raise AdaptError(f"the serving model: {exc}") from None
    layout = (info.training or {}).get("net")
    if not isinstance(layout, dict):
        raise AdaptError(f"{init} was not written by ptychostream train (no network layout in its metadata); "
                         "pass --init with one that was")
    pre = info.preprocess
    try:
        if tuple(pre.output_shape((h, w))) != tuple(info.input_shape):
            pre = pre.fit_to((h, w), info.input_shape)
    except ValueError:
        try:
            pre = pre.fit_to((h, w), info.input_shape)
        except ValueError as exc:
            raise AdaptError(f"{init} takes {info.input_shape} inputs; {h}x{w} frames cannot be cropped/binned "
                             f"to that: {exc}") from None
    out = int(layout["output_size"])
    guard = args.guard_m if args.guard_m is not None else out / 2 * pixel
    split = heldout_split(positions, args.heldout, args.side, guard)
    label_pos = reference.positions_m if reference.positions_m is not None and len(reference.positions_m) == n \
        else positions
    physics_only = args.mode == PHYSICS_MODE
    labels = None if physics_only else label_patches(reference, label_pos[split.train], pixel, out)
    probe = _probe_modes_of(reference, ref_path, scan, h)
    # the physics loss explains the frames under the instrument's known probe: the scan file's, else the
    # recovered one
    known_probe = scan.probe if scan.probe is not None and np.shape(scan.probe)[-2:] == (h, h) else probe
    physics_weight = args.physics_weight if args.physics_weight is not None else (1.0 if physics_only else 0.0)
    overlap_weight = args.overlap_weight if args.overlap_weight is not None else (1.0 if physics_only else 0.0)
    say(f"held out {len(split.held)} frames on the {args.side} ({args.heldout:.0%}), training on {len(split.train)}")
    t = lap("pairs", t)

    # 4. training
    stamp = time.strftime("%Y%m%d-%H%M%S")
    new_path = out_dir / f"adapted-{stamp}.onnx"
    k = 1
    while new_path.exists():
        new_path = out_dir / f"adapted-{stamp}-{k}.onnx"
        k += 1
    reserve = max(5.0, 0.1 * budget_s)
    train_s = budget_s - (time.monotonic() - t0) - reserve
    if args.epochs is None and train_s < 1.0:
        raise AdaptError(f"the budget of {args.budget_min:g} min leaves {train_s:.0f} s to train after the "
                         "reference; raise --budget-min")
    cfg = TrainConfig(
        output=str(new_path), data=("scan",), objects=TRAIN_KINDS, size=h, crop=pre.crop_size, bin=int(pre.bin),
        scale=pre.scale, normalise=pre.normalise, heads=tuple(layout["heads"]),
        base_channels=int(layout["base_channels"]), depth=int(layout["depth"]), output_size=out,
        object_px=max(384, 3 * h), pool=8, batch=args.batch, lr=args.lr, seed=args.seed, device=args.device,
        threads=args.threads, init=init, retarget=True, amp_scale=args.amp_scale, stitch_offset=args.offset,
        name=args.name or f"adapted-{Path(args.scan).stem}", val=args.val,
        epochs=args.epochs or 1, budget_s=None if args.epochs else train_s, budget_reserve_s=0.0,
        supervised_weight=0.0 if physics_only else 1.0, physics_weight=physics_weight,
        overlap_weight=overlap_weight, frames_share=args.frames_share)
    labelled = None
    if not physics_only:
        assert labels is not None
        labelled = instrument_source(cfg, frames=frames[split.train], labels=labels, probe=probe, pixel_m=pixel,
                                     pre=pre, out=out, mode=args.mode, mix=args.mix, bad=bad,
                                     reference=reference_object(reference, split, label_pos, pixel),
                                     reference_share=args.reference_share,
                                     reference_zoom=tuple(args.reference_zoom))
    if cfg.uses_physics():
        source = physics_source(cfg, frames=frames[split.train], positions_m=positions[split.train],
                                modes=known_probe, pixel_m=pixel, pre=pre, out=out, bad=bad if bad.any() else None,
                                labelled=labelled)
    else:
        assert labelled is not None
        source = labelled
    # the model carries the instrument's probe as its sidecar (<model>.probe.npy), for the consistency figure
    source[1].setdefault("probe", known_probe)
    status.update("train", 0.0, f"training ({args.mode}) from {Path(init).name}")

    def step(fraction: float) -> None:
        status.update("train", fraction, f"training ({args.mode}): {fraction:.0%}", force=False)

    summary = train(cfg, progress=not args.quiet, log=say, source=source, on_progress=step)
    say(f"wrote {new_path}: {summary['steps']} steps in {summary['time_s']:.0f} s")
    t = lap("train", t)

    # 5. the held-out scores
    status.update("score", 0.0, "scoring both models on the held-out region")
    held = heldout_scores({"serving": init, "adapted": str(new_path)}, frames[split.held], positions[split.held],
                          reference, split, pixel, offset=args.offset, threads=args.threads, truth=truth)
    old, new = held["serving"]["scores"], held["adapted"]["scores"]
    better, reason = is_better(new, old, args.margin, args.metric)
    say(reason)
    truth_scores = None
    if truth is not None:
        truth_scores = {k: held[k].get("truth_scores") for k in ("serving", "adapted", "reference") if k in held}
        say("against the truth on the held-out region: " + ", ".join(
            f"{k} SSIM {v['ssim']:.3f}, band-pass r {v['bandpass_corr']:.3f}"
            for k, v in truth_scores.items() if v))
    t = lap("score", t)

    # 6. the report
    status.update("report", 0.0, "writing the report")
    png = out_dir / "report.png"
    _report_png(png, held, {"serving": f"serving: {Path(init).name}", "adapted": f"adapted: {new_path.name}"},
                f"{Path(args.scan).name}: held-out {args.side} {args.heldout:.0%}")
    result: dict[str, Any] = {
        "scan": str(args.scan), "frames": int(n), "pixel_m": pixel, "reference": ref_path,
        "serving_model": str(init), "model": str(new_path), "mode": args.mode,
        "mix": args.mix if args.mode == "mixed" else None, "heldout": split.describe(),
        "physics": summary.get("physics"),
        "scores": {"serving": old, "adapted": new}, "truth": args.truth, "scores_vs_truth": truth_scores,
        "bad_pixels": {"count": int(bad.sum()), "canonical_rc": np.argwhere(bad).tolist(),
                       "mask": str(mask_path.resolve()) if mask_path is not None else None},
        "errors": {k: held[k]["error"] for k in ("serving", "adapted") if held[k]["error"]},
        "better": bool(better), "reason": reason, "metric": args.metric, "margin": args.margin,
        "report_png": str(png) if png.exists() else None,
        "training": {k: summary.get(k) for k in ("steps", "epochs", "time_s", "initial_val_loss", "final_val_loss",
                                                  "data", "loss")},
        "amplitude_scale": summary["net"].get("amplitude_scale", 1.0), "swapped": False, "ioc": args.ioc,
    }
    t = lap("report", t)

    # 7. the swap
    if args.ioc and not args.no_swap:
        if better:
            status.update("swap", 0.0, f"putting {new_path.name} to {args.ioc}ModelPath", result=result)
            result["swapped"], result["swap_message"] = swap_model(args.ioc, str(new_path.resolve()))
            if result["swapped"] and mask_path is not None:  # the model was trained with those pixels zeroed
                ok, said = put_mask(args.ioc, str(mask_path.resolve()))
                result["mask_put"] = ok
                result["swap_message"] += f"; bad-pixel mask: {said}" if ok else f"; the bad-pixel mask was not set: {said}"
        else:
            result["swap_message"] = f"{args.ioc}ModelPath left as it was: {reason}"
        say(result["swap_message"])
    lap("swap", t)
    times["total"] = round(time.monotonic() - t0, 2)
    result["times_s"] = times
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, default=_json_default))
    return result


# --------------------------------------------------------------------------- command line
def _cmd_adapt(args: argparse.Namespace) -> int:
    from ptychostream.files.errors import FileFormatError
    from ptychostream.train.config import TrainError

    status = StatusFile(args.status_file)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if os.name == "posix" else None
    try:
        result = run_adapt(args, status)
    except KeyboardInterrupt:
        status.update("interrupted", 1.0, "interrupted; the serving model is untouched", done=True, ok=False)
        print("ptychostream adapt: interrupted; the serving model is untouched", file=sys.stderr)
        return 130
    except (AdaptError, TrainError, FileFormatError, FileNotFoundError, ValueError, OSError) as exc:
        stage = status.state.get("stage", "start")
        status.update(stage, 1.0, f"{stage} failed: {exc}", done=True, ok=False)
        print(f"ptychostream adapt: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    status.update("done", 1.0, result["swap_message"] if "swap_message" in result else result["reason"],
                  done=True, ok=True, result=result)
    print(json.dumps({k: result[k] for k in ("model", "better", "reason", "swapped")}, default=_json_default))
    return 0


def add_adapt_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``adapt`` on an argparse subparsers object; returns the sub-parser."""
    from ptychostream.train.instrument import METRICS, MODES, SIDES

    p = sub.add_parser(
        "adapt", help="train a model for this instrument from one scan, and swap it in if it is better",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "From one scan to a model for this instrument: read the scan, reconstruct it with pty-chi (or\n"
            "take --reference), train from the serving model on the scan's pairs and/or probe-centric\n"
            "synthetic pairs within a time budget, export a new ONNX file, score the old and the new model\n"
            "on a held-out region of the scan (never trained on) against the iterative result, write\n"
            "report.json and report.png to --out, and with --ioc put the new model to $(PREFIX)ModelPath\n"
            "only if it is better there. A failed or interrupted run leaves the serving model untouched."),
        epilog=(
            "examples:\n"
            "  ptychostream adapt scan.cxi --budget-min 15 --out adapt/           # offline, the shipped model\n"
            "  ptychostream adapt scan.npz --reference recon.h5 --ioc PTY:NN: --budget-min 10\n"
            "  ptychostream adapt capture.h5 --ioc PTY:NN: --status-file st.json --mode pairs\n"))
    p.add_argument("scan", help="the scan: CXI, NPZ (PtychoNN or Tike layout), a Ptychodus file or an IOC record")
    g = p.add_argument_group("scan and reference")
    g.add_argument("--reference", metavar="PRODUCT.h5", help="an iterative result to use instead of running pty-chi")
    g.add_argument("--engine", default="lsqml", choices=("lsqml", "epie", "dm"), help="pty-chi engine (default lsqml)")
    g.add_argument("--iterations", type=int, default=60, help="pty-chi iterations (default 60)")
    g.add_argument("--probe-modes", type=int, default=2, help="probe modes to reconstruct (default 2)")
    g.add_argument("--truth", metavar="PRODUCT.h5", help="a simulation's truth (e.g. foreign-truth.h5): the report "
                   "adds both models' (and the reference's) held-out scores against it")
    g.add_argument("--bad-pixels", default="auto", choices=("auto", "none"),
                   help="find hot pixels in the mean frame (default auto): masked for pty-chi, zeroed for the "
                        f"network, written to OUT/{MASK_FILE} (raw frame coordinates) and, with a swap, put to "
                        "$(PREFIX)PreMaskPath")
    g.add_argument("--origin", choices=("corner", "centre"), help="where the stored frames have zero frequency")
    g.add_argument("--object-pixel-m", type=float, help="the object pixel, when the file lacks it")
    g.add_argument("--position-units", choices=("m", "pixels"), help="units of the file's positions")
    g = p.add_argument_group("training")
    g.add_argument("--init", metavar="MODEL.onnx", help="start from this model (default: the one the IOC serves "
                   "with --ioc, else the shipped model)")
    g.add_argument("--mode", default="mixed", choices=(*MODES, PHYSICS_MODE),
                   help="the scan's own pairs, probe-centric synthetic pairs, or both (default mixed); physics: "
                        "the scan's frames alone, no labels (the Poisson likelihood under the known probe, and "
                        "the overlap term; the reference is then used for the scores only)")
    g.add_argument("--physics-weight", type=float,
                   help="weight of the physics loss (the Poisson deviance of the training frames under the scan's "
                        "probe); default 1 with --mode physics, else 0 (set it to mix it into the supervised loss)")
    g.add_argument("--overlap-weight", type=float,
                   help="weight of the overlap term (neighbouring patches agree); default 1 with --mode physics, "
                        "else 0")
    g.add_argument("--frames-share", type=float, default=0.5,
                   help="share of each batch from the scan's unlabelled frames when the physics loss is mixed in "
                        "(default 0.5)")
    g.add_argument("--mix", type=float, default=0.6,
                   help="synthetic fraction of each batch in mixed mode (default 0.6)")
    g.add_argument("--reference-share", type=float, default=0.5,
                   help="share of the synthetic patches cut from the reference's object (its training side, any "
                        "of 8 orientations) instead of generated objects (default 0.5; none where the reference is at "
                        "another pixel than the scan)")
    g.add_argument("--reference-zoom", type=float, nargs=2, default=(1.0, 1.0), metavar=("LO", "HI"),
                   help="each patch cut from the reference's object is zoomed by a factor drawn log-uniformly "
                        "from LO..HI (below 1: more, finer features per patch than the training side shows; "
                        "default 1 1)")
    g.add_argument("--budget-min", type=float, default=11.0,
                   help="wall time for the whole run, minutes (default 11: about 20 CPU minutes on 2 cores)")
    g.add_argument("--epochs", type=int, help="train this many epochs instead of filling the budget")
    g.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    g.add_argument("--amp-scale", type=float, help="amplitude head scale (default: from the labels, at least 1)")
    g.add_argument("--val", type=int, default=64, help="validation pairs from the training region (default 64)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device (default cpu)")
    g.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    g.add_argument("--name", help="model name in the metadata (default adapted-SCAN)")
    g = p.add_argument_group("held-out region and decision")
    g.add_argument("--heldout", type=float, default=0.25, help="fraction of the scanned extent held out (default 0.25)")
    g.add_argument("--side", default="right", choices=tuple(SIDES), help="where the held-out region is (default right)")
    g.add_argument("--guard-m", type=float, help="gap between training and held-out frames (default half a patch)")
    g.add_argument("--offset", default="overlap", choices=("mean", "overlap", "none"),
                   help="mosaic offset for the scores, and the new model's stitch hint (default overlap)")
    g.add_argument("--metric", default="bandpass_corr", choices=METRICS,
                   help="what decides: the band-pass correlation (default), SSIM, or both")
    g.add_argument("--margin", type=float, default=0.0,
                   help="the new model must beat the serving one by more than this (default 0)")
    g = p.add_argument_group("output and IOC")
    g.add_argument("--out", default="adapt", help="folder for the model, reference and report (default ./adapt)")
    g.add_argument("--ioc", metavar="PREFIX", help="the reconstructor IOC: its serving model, and the swap")
    g.add_argument("--no-swap", action="store_true", help="with --ioc: decide, but do not put ModelPath")
    g.add_argument("--status-file", metavar="JSON", help="write the progress here (atomically) after every stage")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_adapt)
    return p
