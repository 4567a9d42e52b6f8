#!/usr/bin/env python3
"""Stitching and mosaic-publish cost, before and after, side by side in one run.

  python benchmarks/stitch_publish.py                 # HEAD's mosaic/stitch.py and pipeline/stitch.py as "before"
  python benchmarks/stitch_publish.py --ref 41c2b46   # another commit as "before"
  python benchmarks/stitch_publish.py --quick         # seconds: checks the harness, not speed

"before" is the stitcher and the stitch stage of ``--ref``, loaded from git as reference modules;
"after" is the working tree. Both run on the same patches in the same process:

* **stitch**: ``Stitcher.add`` on 64x64 patches in batches of 64 on a raster scan (10.3 px step),
  patches per CPU second of the calling thread (``time.thread_time``: the figures hold on a shared,
  busy machine; numpy runs these on that thread alone) for each offset mode with and without amplitude, and the largest difference between
  the two mosaics (float rounding or exactly 0);
* **publish**: one ``MosaicStage.publish()`` (Mosaic, MosaicAmplitude, MosaicCoverage, Flashlight,
  each NTNDArray-encoded as the PVA server does) on a fixed canvas of 2001^2 and 4001^2 pixels,
  with one new batch of 64 patches stitched between publishes (median CPU ms of the repeats); the
  "+ ConsistencyMap" column has every frame carry a consistency figure, so a fifth image is published.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ptychostream.core.device import DeviceState
from ptychostream.core.frames import BatchResult, ImageFrame
from ptychostream.core.pvdb import load_db
from ptychostream.mosaic import stitch as stitch_now
from ptychostream.pipeline import stitch as stage_now
from ptychostream.protocols import ntnd

PX = 1e-8
PATCH = 64
BATCH = 64


def load_ref(ref: str, path: str, name: str, swap: dict[str, types.ModuleType] | None = None) -> types.ModuleType:
    """The module at ``path`` as of git ``ref``, imported as ``name`` (``swap``: modules it sees instead)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{path}"], check=True, capture_output=True,
                         text=True).stdout
    file = Path(tempfile.mkdtemp(prefix="stitch-ref-")) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    saved = {k: sys.modules.get(k) for k in swap or {}}
    sys.modules.update(swap or {})
    try:
        spec.loader.exec_module(mod)
    finally:
        shutil.rmtree(file.parent, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


def raster(n: int, step_px: float, cols: int, rng: np.random.Generator) -> np.ndarray:
    k = np.arange(n)
    pos = np.stack([(k // cols) * step_px, (k % cols) * step_px], 1) * PX
    pos -= pos.mean(axis=0)
    return pos + rng.random((n, 2)) * PX  # sub-pixel positions: the bilinear path


def bench_stitch(before: Any, after: Any, n: int, repeats: int) -> list[tuple[str, float, float, float]]:
    rng = np.random.default_rng(0)
    phase = rng.standard_normal((n, PATCH, PATCH)).astype(np.float32)
    amp = rng.random((n, PATCH, PATCH)).astype(np.float32)
    pos = raster(n, 10.3, 50, rng)
    rows = []
    for offset in ("mean", "overlap", "none"):
        for with_amp in (False, True):
            rate, mos = {}, {}
            for label, mod in (("before", before), ("after", after)):
                best = 0.0
                for _ in range(repeats):
                    st = mod.Stitcher(PX, (PATCH, PATCH), offset=offset)
                    t0 = time.thread_time()
                    for b in range(0, n, BATCH):
                        st.add(phase[b:b + BATCH], pos[b:b + BATCH], amp[b:b + BATCH] if with_amp else None)
                    best = max(best, n / (time.thread_time() - t0))
                rate[label], mos[label] = best, st.mosaic()
            diff = float(np.abs(mos["before"].phase - mos["after"].phase).max())
            if with_amp:
                diff = max(diff, float(np.abs(mos["before"].amplitude - mos["after"].amplitude).max()))
            rows.append((f"{offset}{' + amplitude' if with_amp else ''}", rate["before"], rate["after"], diff))
    return rows


def bench_scatter(repeats: int) -> list[tuple[str, float]]:
    """Patches/CPU-s of the scatter alone, one plane: the ways to add 64 (h+1, w+1) blocks to a canvas."""
    rng = np.random.default_rng(2)
    side, h = 2001, PATCH + 1
    canvas = np.zeros((side, side), np.float32)
    flat = canvas.reshape(-1)
    pos = np.rint(raster(BATCH, 10.3, 50, rng) / PX).astype(int) + side // 2 - h // 2  # one raster row
    fy, fx = pos[:, 0].tolist(), pos[:, 1].tolist()
    blocks = rng.random((BATCH, h, h), dtype=np.float32)
    off = (np.arange(h)[:, None] * side + np.arange(h)[None, :]).ravel()

    def add_at() -> None:
        idx = ((pos[:, 0] * side + pos[:, 1])[:, None] + off[None, :]).ravel()
        np.add.at(flat, idx, blocks.reshape(-1))

    def slice_adds() -> None:
        for k in range(BATCH):
            canvas[fy[k]:fy[k] + h, fx[k]:fx[k] + h] += blocks[k]

    def bincount_box() -> None:
        y0, x0 = pos.min(axis=0)
        y1, x1 = pos.max(axis=0) + h
        bw = x1 - x0
        local = (np.arange(h)[:, None] * bw + np.arange(h)[None, :]).ravel()
        idx = (((pos[:, 0] - y0) * bw + pos[:, 1] - x0)[:, None] + local[None, :]).ravel()
        canvas[y0:y1, x0:x1] += np.bincount(idx, blocks.reshape(-1), minlength=(y1 - y0) * bw).reshape(y1 - y0, bw)

    rows = []
    for name, fn in (("np.add.at over flat indices", add_at), ("slice-add per patch", slice_adds),
                     ("np.bincount over the batch's box", bincount_box)):
        fn()
        best = 0.0
        for _ in range(repeats):
            t0 = time.thread_time()
            for _ in range(20):
                fn()
            best = max(best, 20 * BATCH / (time.thread_time() - t0))
        rows.append((name, best))
    return rows


def _batch(first: int, pos: np.ndarray, rng: np.random.Generator, consistency: bool = False) -> BatchResult:
    n = len(pos)
    frames = [ImageFrame(np.zeros((0, 0), np.uint8), first + i,
                         attributes={"PositionX": float(pos[i, 1]), "PositionY": float(pos[i, 0])}) for i in range(n)]
    out = {"phase": rng.standard_normal((n, PATCH, PATCH)).astype(np.float32),
           "amplitude": rng.random((n, PATCH, PATCH)).astype(np.float32)}
    figure = rng.random(n).astype(np.float32) if consistency else None
    return BatchResult(frames, out, np.zeros(n), "bench", pixel_m=PX, consistency=figure)


def bench_publish(stage_mod: Any, side: int, repeats: int, fill_step: float, consistency: bool = False,
                  **settings: Any) -> float:
    """Median ms of one publish of a ``side``^2 canvas, a batch stitched between publishes."""
    device = DeviceState(load_db("reconstructor.db"))
    device.add_image_sink(lambda spec, frame: ntnd.encode(frame) if isinstance(frame, ImageFrame) else None)
    stage = stage_mod.MosaicStage(device, lambda text, severity: None)
    half = (side - 1) / 2 * PX
    stage._configure({"pixel_m": PX, "extent_m": (-half, half, -half, half), "offset": "mean", **settings})
    rng = np.random.default_rng(1)
    cols = int((side - PATCH) / fill_step)
    fill = raster(cols * cols, fill_step, cols, rng)
    stage.on_result(_batch(1, fill[:BATCH], rng, consistency))
    stage._drain(stage.inbox.get_nowait())  # makes the stitcher
    ph = rng.standard_normal((len(fill), PATCH, PATCH)).astype(np.float32)
    for b in range(BATCH, len(fill), 1024):  # cover the canvas (straight into the stitchers: fast)
        stage.stitcher.add(ph[b:b + 1024], fill[b:b + 1024], ph[b:b + 1024])
        if consistency:
            stage.consistency.add_values(ph[b:b + 1024, 0, 0], fill[b:b + 1024])
    stage.publish()
    times = []
    uid = 1 + len(fill)
    for r in range(repeats):
        stage.on_result(_batch(uid, fill[(r * BATCH) % len(fill):][:BATCH], rng, consistency))
        uid += BATCH
        stage._drain(stage.inbox.get_nowait())
        t0 = time.thread_time()
        stage.publish()
        times.append(time.thread_time() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="HEAD", help="git commit of the 'before' column (default HEAD)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, not speed")
    args = ap.parse_args()
    stitch_ref = load_ref(args.ref, "src/ptychostream/mosaic/stitch.py", "ref_mosaic_stitch")
    stage_ref = load_ref(args.ref, "src/ptychostream/pipeline/stitch.py", "ref_pipeline_stitch",
                         swap={"ptychostream.mosaic.stitch": stitch_ref})
    n, repeats = (256, 1) if args.quick else (2560, 3)
    print(f"## Stitcher.add: {PATCH}x{PATCH} patches, batches of {BATCH}, {n} patches (best of {repeats})\n")
    print(f"| offset | before ({args.ref}) patches/CPU-s | after patches/CPU-s | speed-up | max abs difference |")
    print("|---|---|---|---|---|")
    for name, b, a, diff in bench_stitch(stitch_ref, stitch_now, n, repeats):
        print(f"| {name} | {b:,.0f} | {a:,.0f} | {a / b:.2f}x | {diff:.2g} |")
    print(f"\n## The scatter alone: {BATCH} blocks of {PATCH + 1}x{PATCH + 1} onto a 2001^2 canvas, one plane\n")
    print("| method | patches/CPU-s |")
    print("|---|---|")
    for name, rate in bench_scatter(repeats):
        print(f"| {name} | {rate:,.0f} |")
    sides, reps = ((257, 513), 3) if args.quick else ((2001, 4001), 7)
    print(f"\n## One mosaic publish (4 images, NTNDArray-encoded; median of {reps}, one batch stitched between)\n")
    print(f"| canvas | before ({args.ref}) CPU ms | after, MosaicDisplaySize 1024 CPU ms | "
          "after, 1024 + ConsistencyMap CPU ms | after, MosaicDisplaySize 0 (full canvas) CPU ms |")
    print("|---|---|---|---|---|")
    for side in sides:
        step = 48.0 if not args.quick else 40.0
        before = bench_publish(stage_ref, side, reps, step)
        small = bench_publish(stage_now, side, reps, step, display_size=1024)
        cmap = bench_publish(stage_now, side, reps, step, consistency=True, display_size=1024)
        full = bench_publish(stage_now, side, reps, step, display_size=0)
        print(f"| {side}x{side} | {before:.1f} | {small:.1f} | {cmap:.1f} | {full:.1f} |")


if __name__ == "__main__":
    main()
