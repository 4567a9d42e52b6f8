#!/usr/bin/env python3
"""Unsupervised fine-tuning on the foreign-instrument stand-in, timed and scored on its held-out region.

  python benchmarks/unsupervised.py --out /tmp/unsup                 # the setting of docs/real-data.md
  python benchmarks/unsupervised.py --out /tmp/unsup -- --budget 5   # extra flags go to ptychostream train
  python benchmarks/unsupervised.py --out /tmp/unsup --score-only M.onnx [M2.onnx ...]

Steps: ``ptychostream sim-foreign`` (unless ``--data`` holds one already), then ``ptychostream train``
from the shipped model on the scan's frames alone (no labels; the right 25 % held out with adapt's
guard band, never trained on), run under ``/usr/bin/time -v`` so the CPU time (user + system) of the
whole command is recorded; then the shipped and the tuned model are scored as docs/real-data.md says:
the held-out frames (canonical, hot pixels zeroed, as adapt does) inferred and stitched with
``overlap`` (``heldout_split``/``heldout_scores`` of ``train/instrument.py``) against the truth.
Prints one JSON object and writes it to ``OUT/result.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "src" / "ptychostream" / "models" / "ptychonn_edge.onnx"

#: the fine-tune's settings (docs/real-data.md, "Unsupervised fine-tuning"); later flags override them
TRAIN_FLAGS = [
    "--crop", "64", "--output-size", "64", "--supervised-weight", "0", "--physics-weight", "1",
    "--overlap-weight", "1", "--physics-context", "mosaic", "--scan-heldout", "0.25", "--budget", "5",
    "--budget-clock", "cpu", "--threads", "1", "--batch", "16", "--lr", "1e-3", "--val", "32",
    "--precision", "fp32", "-q",
]


def cpu_seconds(time_report: str) -> dict[str, float]:
    """User, system and wall seconds of a ``/usr/bin/time -v`` report."""
    out: dict[str, float] = {}
    for key, pat in (("user_s", r"User time \(seconds\): ([\d.]+)"), ("sys_s", r"System time \(seconds\): ([\d.]+)")):
        m = re.search(pat, time_report)
        if m:
            out[key] = float(m.group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", time_report)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        out["wall_s"] = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    if "user_s" in out and "sys_s" in out:
        out["cpu_min"] = round((out["user_s"] + out["sys_s"]) / 60, 2)
    return out


def score(models: dict[str, str], data: Path, threads: int = 1) -> dict[str, Any]:
    """Band-pass r and SSIM of each model on the held-out right 25 % against the truth."""
    from ptychostream.files.product import read_product
    from ptychostream.files.scan import read_scan
    from ptychostream.model.info import load_model_file
    from ptychostream.train.instrument import bad_pixels, clean_frames, heldout_scores, heldout_split

    scan = read_scan(data / "foreign.cxi")
    truth = read_product(data / "foreign-truth.h5", need_positions=False)
    frames = np.asarray(scan.canonical_frames(), dtype=np.float32)
    bad = bad_pixels(frames)
    if bad.any():
        frames = clean_frames(frames, bad, "zero")
    positions = np.asarray(scan.positions_m, dtype=np.float64)
    pixel = float(scan.pixel_m())
    shape = load_model_file(SHIPPED).output_shapes.get("phase")
    out = int(shape[0]) if shape else 64
    split = heldout_split(positions, 0.25, "right", out / 2 * pixel)
    held = heldout_scores(models, frames[split.held], positions[split.held], truth, split, pixel,
                          offset="overlap", threads=threads, truth=truth)
    res: dict[str, Any] = {}
    for name in models:
        t = held[name].get("truth_scores") or {}
        res[name] = {"bandpass_corr": round(float(t.get("bandpass_corr", float("nan"))), 4),
                     "ssim": round(float(t.get("ssim", float("nan"))), 4), "error": held[name]["error"]}
    res["split"] = {"train": int(len(split.train)), "held": int(len(split.held))}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for the data, the model and the result")
    ap.add_argument("--data", type=Path, help="a sim-foreign folder (default: OUT/data, made if missing)")
    ap.add_argument("--init", default=str(SHIPPED), help="the model to fine-tune (default: the shipped one)")
    ap.add_argument("--score-only", nargs="+", metavar="MODEL", help="score these models, train nothing")
    ap.add_argument("train_flags", nargs="*", help="after --: flags for ptychostream train (override the defaults)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out / "data"
    py = sys.executable
    if not (data / "foreign.cxi").is_file():
        subprocess.run([py, "-m", "ptychostream", "sim-foreign", "--out", str(data)], check=True)
    result: dict[str, Any] = {"data": str(data)}
    models = {"shipped": str(SHIPPED)}
    if args.score_only:
        models.update({Path(m).stem: m for m in args.score_only})
    else:
        model = args.out / "tuned.onnx"
        timing = args.out / "time.txt"
        cmd = ["/usr/bin/time", "-v", "-o", str(timing), py, "-m", "ptychostream", "train", str(model),
               "--init", args.init, "--scan", str(data / "foreign.cxi"), *TRAIN_FLAGS, *args.train_flags]
        result["command"] = " ".join(cmd)
        with open(args.out / "train.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            print(f"ptychostream train exited with {rc}; see {args.out / 'train.log'}", file=sys.stderr)
            return 2
        result["time"] = cpu_seconds(timing.read_text())
        models["tuned"] = str(model)
        from ptychostream.model.info import load_model_file

        summary = load_model_file(model).training or {}
        result["train"] = {k: summary.get(k) for k in ("steps", "final_val_loss", "initial_val_loss",
                                                         "checkpoint_selection")}
    result["scores"] = score(models, data)
    text = json.dumps(result, indent=1)
    (args.out / "result.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
