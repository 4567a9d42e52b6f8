#!/usr/bin/env python3
"""ptychostream benchmarks: each figure is printed next to a ceiling measured in the same run.

  python benchmarks/run.py                 # all benchmarks, full size
  python benchmarks/run.py --quick         # seconds: checks the harness, not speed
  python benchmarks/run.py --only simdet,pipeline

Every EPICS process runs on a private loopback network (127.0.0.1, free ports).
Results go to stdout as a Markdown table (and to --json FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

from ptychostream.launch import IOCProcess
from ptychostream.loopback import EpicsNet

ROWS: list[dict] = []


def row(bench: str, what: str, value: float, unit: str, ceiling: float | None = None, ceiling_what: str = "",
        note: str = "") -> None:
    r = {"bench": bench, "what": what, "value": round(value, 1), "unit": unit, "ceiling": ceiling and round(ceiling, 1),
         "ceiling_what": ceiling_what, "ratio": round(value / ceiling, 3) if ceiling else None, "note": note}
    ROWS.append(r)
    ratio = f"  ({100 * r['ratio']:.0f}% of {ceiling_what} {ceiling:.0f} {unit})" if ceiling else ""
    print(f"[{bench}] {what}: {value:.1f} {unit}{ratio} {note}", flush=True)


# -- PVA transport ceiling: p4p server process -> p4p client process ------------------------
P4P_SERVER = textwrap.dedent("""
    import sys, time, numpy as np
    from p4p.nt import NTNDArray
    from p4p.server import Server
    from p4p.server.thread import SharedPV
    size, n = int(sys.argv[1]), int(sys.argv[2])
    nt = NTNDArray()
    same = lambda v, **kw: v
    pv = SharedPV(initial=nt.wrap(np.zeros((size, size), np.uint16)), wrap=same, unwrap=same)
    frames = [nt.wrap(np.random.default_rng(i).integers(0, 1000, (size, size), dtype=np.uint16),
                      attrib={"ColorMode": ("i", 0)}) for i in range(16)]
    with Server(providers=[{"BENCH:Image": pv}]):
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(1, n + 1):
            v = frames[i % 16]
            v["uniqueId"] = i
            pv.post(v)
        print("done", flush=True)
        sys.stdin.readline()
""")


def count_frames(net: EpicsNet, channel: str, n: int, start, timeout: float = 120.0) -> tuple[int, float, int]:
    """Monitor ``channel``, call ``start()``, count uniqueIds until n arrive. Returns (got, seconds, gaps)."""
    from p4p.client.thread import Context

    ctx = Context("pva", conf=net.pva_conf(), useenv=False, nt=False)
    uids: list[int] = []
    times: list[float] = []
    done = threading.Event()

    def cb(v):
        if isinstance(v, Exception) or v["uniqueId"] == 0:
            return
        uids.append(v["uniqueId"])
        times.append(time.perf_counter())
        if len(uids) >= n:
            done.set()

    sub = ctx.monitor(channel, cb, request="record[queueSize=4096]", notify_disconnect=True)
    time.sleep(1.0)
    uids.clear()
    times.clear()
    start()
    done.wait(timeout)
    time.sleep(0.5)
    sub.close()
    ctx.close()
    if len(times) < 2:
        return len(uids), float("nan"), 0
    u = np.array(uids)
    gaps = int(np.sum(np.maximum(np.diff(u) - 1, 0)))
    return len(uids), times[-1] - times[0], gaps


def pva_ceiling(net: EpicsNet, size: int, n: int) -> float:
    env = dict(os.environ)
    env.update(net.server_env(net.slots[-1]))
    proc = subprocess.Popen([sys.executable, "-c", P4P_SERVER, str(size), str(n)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"

    def start():
        proc.stdin.write("go\n")
        proc.stdin.flush()

    got, secs, gaps = count_frames(net, "BENCH:Image", n, start)
    proc.stdin.write("stop\n")
    proc.stdin.flush()
    proc.wait(10)
    return got / secs


# -- simulated detector publish rate ---------------------------------------------------------
def bench_simdet(net: EpicsNet, quick: bool) -> None:
    from p4p.client.thread import Context

    n = 2000 if quick else 20000
    ceiling = pva_ceiling(net, 128, n)
    sim = IOCProcess(["simdet", "--prefix", "BENCH:SIM:", "--no-ca"], "BENCH:SIM:", net.slots[0], net).start()
    ctx = Context("pva", conf=net.pva_conf(), useenv=False)
    try:
        for k, v in {"ImageMode": "Multiple", "NumImages": n, "ScanPoints": min(n, 4000), "AcquirePeriod": 0.0,
                     "DataType": "UInt16", "Size": 128}.items():
            ctx.put(f"BENCH:SIM:cam1:{k}", v, wait=True)
        ctx.put("BENCH:SIM:cam1:Acquire", 1, timeout=120)  # build the frame cache first (not timed)

        def start():
            threading.Thread(target=ctx.put, args=("BENCH:SIM:cam1:Acquire", 1), kwargs={"timeout": 300},
                             daemon=True).start()

        got, secs, gaps = count_frames(net, "BENCH:SIM:Pva1:Image", n, start)
        rate = got / secs
        row("simdet", f"simdet -> p4p client, 128x128 uint16, {n} frames", rate, "frames/s", ceiling,
            "raw p4p server->client", note=f"received {got}/{n}, gaps {gaps}")
    finally:
        ctx.close()
        sim.stop()


# -- inference ceiling and end-to-end CPU pipeline ------------------------------------------------
def model_file(tmp: Path) -> str:
    from ptychostream.modelzoo import build_ptychonn_onnx

    return build_ptychonn_onnx(str(tmp / "edge128.onnx"), size=128, heads=("phase",), base_channels=16, depth=4)


def onnx_ceiling(path: str, batch: int, n: int) -> float:
    from ptychostream.infer import open_model

    model = open_model(path, backend="ONNXRuntime-CPU", batch_size=batch)
    frames = np.random.default_rng(0).poisson(5, (batch, 128, 128)).astype(np.uint16)
    model.run(frames)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        model.run(frames)
        done += batch
    rate = done / (time.perf_counter() - t0)
    model.close()
    return rate


def bench_pipeline(net: EpicsNet, quick: bool, tmp: Path) -> None:
    from p4p.client.thread import Context

    n, batch = (300, 16) if quick else (4000, 32)
    path = model_file(tmp)
    ceiling = onnx_ceiling(path, batch, n // 2)
    sim = IOCProcess(["simdet", "--prefix", "BENCH:SIM:", "--no-ca"], "BENCH:SIM:", net.slots[0], net).start()
    rec = IOCProcess(["ioc", "--prefix", "BENCH:NN:", "--no-ca"], "BENCH:NN:", net.slots[1], net).start()
    ctx = Context("pva", conf=net.pva_conf(), useenv=False)
    try:
        for k, v in {"ModelPath": path, "InputPV": "BENCH:SIM:Pva1:Image", "BatchSize": batch, "BacklogLimit": 100000,
                     "PublishRate": 10, "PixelSize": 1e-8, "Enable": 1}.items():
            ctx.put(f"BENCH:NN:{k}", v, wait=True)
        deadline = time.monotonic() + 60
        while int(ctx.get("BENCH:NN:ModelStatus_RBV")) != 2 or int(ctx.get("BENCH:NN:InputConnected_RBV")) != 1:
            if time.monotonic() > deadline:
                raise RuntimeError(ctx.get("BENCH:NN:Message_RBV"))
            time.sleep(0.1)
        for k, v in {"ImageMode": "Multiple", "NumImages": n, "ScanPoints": min(n, 4000), "AcquirePeriod": 0.0}.items():
            ctx.put(f"BENCH:SIM:cam1:{k}", v, wait=True)
        ctx.put("BENCH:SIM:cam1:Acquire", 1, timeout=120)  # warm the cache; these frames are processed too
        while int(ctx.get("BENCH:NN:Processed_RBV")) < n or int(ctx.get("BENCH:NN:Backlog_RBV")) > 0:
            time.sleep(0.2)
        ctx.put("BENCH:NN:ResetCounters", 1, wait=True)
        ctx.put("BENCH:NN:MosaicReset", 1, wait=True)
        threading.Thread(target=ctx.put, args=("BENCH:SIM:cam1:Acquire", 1), kwargs={"timeout": 300}, daemon=True).start()
        t0 = None
        peak = 0
        while True:
            c = {k: int(ctx.get(f"BENCH:NN:{k}_RBV")) for k in ("Received", "Processed", "Dropped", "Rejected", "Backlog")}
            peak = max(peak, c["Backlog"])
            if t0 is None and c["Received"] > 0:
                t0 = time.perf_counter()
            if c["Processed"] + c["Dropped"] + c["Rejected"] >= n:
                break
            time.sleep(0.02)
        secs = time.perf_counter() - t0
        deadline = time.monotonic() + 10  # let the stitch thread finish what inference handed it
        while int(ctx.get("BENCH:NN:Stitched_RBV")) + int(ctx.get("BENCH:NN:Unpositioned_RBV")) < c["Processed"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        p50, p99 = float(ctx.get("BENCH:NN:LatencyP50_RBV")), float(ctx.get("BENCH:NN:LatencyP99_RBV"))
        row("pipeline", f"simdet -> reconstructor (CPU, batch {batch}), {n} frames 128x128", c["Processed"] / secs,
            "frames/s", ceiling, "raw ONNX Runtime, same model and batch",
            note=f"dropped {c['Dropped']}, rejected {c['Rejected']}, peak backlog {peak}, "
                 f"latency p50 {p50:.0f} ms p99 {p99:.0f} ms (queueing included)")
        stitched = int(ctx.get("BENCH:NN:Stitched_RBV"))
        row("pipeline", "frames stitched into the mosaic", stitched, "frames", note=f"of {c['Processed']} processed")
    finally:
        ctx.close()
        rec.stop()
        sim.stop()


# -- stitching -----------------------------------------------------------------------------------
def bench_stitch(quick: bool) -> None:
    from ptychostream.sim.scans import scan_positions
    from ptychostream.stitch import Stitcher

    n = 256 if quick else 4000
    pixel = 1e-8
    for canvas in ((1024,) if quick else (2048, 4096)):
        pos = scan_positions("spiral", 3 * pixel, n, seed=0)
        half = (canvas - 130) * pixel / 2
        pos = np.clip(pos, -half, half)
        rng = np.random.default_rng(0)
        phase = rng.uniform(-1, 1, (64, 128, 128)).astype(np.float32)
        st = Stitcher(pixel, (128, 128), extent_m=(-canvas * pixel / 2, canvas * pixel / 2,
                                                   -canvas * pixel / 2, canvas * pixel / 2), max_canvas_px=canvas + 8)
        st.add(phase[:8], pos[:8])
        t0 = time.perf_counter()
        for k in range(0, n, 64):
            m = min(64, n - k)
            st.add(phase[:m], pos[k:k + m])
        rate = n / (time.perf_counter() - t0)
        t1 = time.perf_counter()
        st.mosaic(reuse=True)
        st.mosaic(reuse=True)
        ms = (time.perf_counter() - t1) / 2 * 1e3
        row("stitch", f"Stitcher.add, 128x128 patches, batch 64, {canvas}x{canvas} canvas", rate, "patches/s",
            note=f"mosaic() {ms:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the harness")
    ap.add_argument("--only", default="simdet,pipeline,stitch", help="comma-separated benchmarks")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    print(f"# machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
          flush=True)
    net = EpicsNet(4)
    with tempfile.TemporaryDirectory() as tmp:
        if "simdet" in only:
            bench_simdet(net, args.quick)
        if "pipeline" in only:
            bench_pipeline(net, args.quick, Path(tmp))
        if "stitch" in only:
            bench_stitch(args.quick)
    print("\n| bench | what | value | ceiling (same run) | ratio | note |\n|---|---|---|---|---|---|")
    for r in ROWS:
        ceil = f"{r['ceiling']} ({r['ceiling_what']})" if r["ceiling"] else ""
        ratio = f"{100 * r['ratio']:.0f}%" if r["ratio"] else ""
        print(f"| {r['bench']} | {r['what']} | {r['value']} {r['unit']} | {ceil} | {ratio} | {r['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
