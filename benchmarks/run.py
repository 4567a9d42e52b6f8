#!/usr/bin/env python3
"""ptychostream benchmarks: each figure is printed next to a ceiling measured in the same run.

  python benchmarks/run.py                 # every benchmark, full size
  python benchmarks/run.py --quick         # seconds: checks the harness, not speed
  python benchmarks/run.py --only sweep,burst,swap --backend PyTorch-CUDA --size 64 --plot sweep.png
  python benchmarks/run.py --only host,profile --json host.json   # the host data path, null model
  python benchmarks/run.py --only sweep --rates 1000,4000,8000 --step-s 2   # absolute input rates

Benchmarks (--only, comma-separated):
  simdet    simulated detector -> p4p client, next to the raw p4p transport ceiling
  pipeline  simdet -> reconstructor -> mosaic, one burst, next to the raw inference ceiling
  stitch    Stitcher.add on its own
  sweep     simdet -> reconstructor -> mosaic over input rates paced by AcquirePeriod (fractions
            of the measured inference ceiling); BacklogLimit = 0.5 s of frames at the ceiling
  burst     a burst at simdet's full speed into a large queue: peak backlog, drain time, rate
  swap      a hot model swap (put ModelPath) while frames stream: frames lost, put -> serving
  pvapy     pvapy-ad-sim-server -> pvapy-hpc-consumer, next to the raw p4p transport ceiling
  host      a bare p4p producer (pre-built frames, full speed or paced) -> the reconstructor with a null
            model (PublishRate 10, stitched by position attributes) at 64, 128, 256 and 516 px (516 and
            256 cropped/binned to 128): the highest rate with zero loss and a 20,000-frame burst, next
            to a bare p4p client of the same producer in the same run
            (--receive thread,process: each receiver, next to the same bare client)
  profile   py-spy samples the reconstructor of the host benchmark at 128 px: us/frame per stage
            (with the last receiver of --receive; the process receiver's child is sampled too)

--backend goes to the reconstructor's Backend PV and to the inference ceiling alike.
benchmarks/gpu_check.sh runs the tests and benchmarks of a GPU machine in one command.
Every EPICS process runs on a private loopback network (127.0.0.1, free ports).
Results go to stdout as a Markdown table (and to --json FILE; rows carry their raw numbers
under "data").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ptychostream.model.backends import BACKEND_CHOICES, backend_unavailable_reason
from ptychostream.testing import EpicsNet, IOCProcess

BENCHES = ("simdet", "pipeline", "stitch", "sweep", "burst", "swap", "pvapy", "host", "profile")

#: sweep: input rates as fractions of the inference ceiling measured in the same run
SWEEP_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5)
SWEEP_FRACTIONS_QUICK = (0.25, 1.5)
#: sweep: seconds of input per rate, and the queue (BacklogLimit) as seconds of input at the ceiling.
#: A step is 10 buffers long, so a rate more than ~10 % above what the pipeline sustains overflows.
SWEEP_STEP_S, SWEEP_STEP_S_QUICK = 5.0, 1.5
SWEEP_BUFFER_S = 0.5
#: sweep: a rate is sustained when nothing is lost and the queue peaked at most at this share of BacklogLimit
SUSTAINED_QUEUE = 0.5
#: burst: frames, and the queue that must hold them
BURST_FRAMES, BURST_FRAMES_QUICK = 10000, 400
#: swap: stream at this fraction of the inference ceiling for this long, swap half-way
SWAP_FRACTION = 0.5
SWAP_STREAM_S, SWAP_STREAM_S_QUICK = 10.0, 3.0
#: pvapy: seconds the ad-sim-server publishes
PVAPY_SECONDS, PVAPY_SECONDS_QUICK = 10.0, 2.0
#: monitor queue of the pvapy consumer (the reconstructor asks for record[queueSize=1024])
PVAPY_QUEUE = 1024
#: counter polling period; the reconstructor itself refreshes its counter PVs at 10 Hz
POLL_S = 0.02

ROWS: list[dict] = []
#: --json FILE: rewritten after every row, so a run stopped half-way leaves what it measured
JSON_OUT: Path | None = None


@dataclass
class Opts:
    """What every benchmark is run with (from the command line)."""

    quick: bool
    backend: str
    size: int
    tmp: Path
    fractions: tuple[float, ...] | None = None
    #: sweep: input rates in frames/s instead of fractions of the ceiling; seconds per rate
    rates: tuple[float, ...] | None = None
    step_s: float | None = None
    #: swap: stream at most this many frames/s (a GPU's half ceiling is beyond what simdet publishes)
    max_rate: float | None = None
    #: host: frame sizes; profile: the paced rate (0: PROFILE_SHARE of the sustained one)
    host_sizes: tuple[int, ...] | None = None
    profile_rate: float = 0.0
    #: host: the receivers measured (``ptychostream ioc --receive``); profile: the last of them
    receive: tuple[str, ...] = ("thread",)

    #: BatchSize of every benchmark (0: 16 with --quick, else 32)
    batch_size: int = 0

    @property
    def batch(self) -> int:
        return self.batch_size or (16 if self.quick else 32)


def _num(value: float) -> float:
    return round(value, 3) if abs(value) < 10 else round(value, 1)


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def row(bench: str, what: str, value: float, unit: str, ceiling: float | None = None, ceiling_what: str = "",
        note: str = "", **data) -> None:
    """One figure (next to a ceiling measured in the same run); ``data`` keeps raw numbers for --json."""
    r = {"bench": bench, "what": what, "value": _num(value), "unit": unit, "ceiling": ceiling and _num(ceiling),
         "ceiling_what": ceiling_what, "ratio": round(value / ceiling, 3) if ceiling else None, "note": note,
         "data": data}
    ROWS.append(r)
    if JSON_OUT is not None:
        JSON_OUT.write_text(json.dumps(ROWS, indent=1))
    ratio = f"  ({100 * r['ratio']:.0f}% of {ceiling_what} {_fmt(ceiling)} {unit})" if ceiling else ""
    print(f"[{bench}] {what}: {_fmt(value)} {unit}{ratio} {note}", flush=True)


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
def bench_simdet(net: EpicsNet, o: Opts) -> None:
    from p4p.client.thread import Context

    n, size = (2000 if o.quick else 20000), o.size
    ceiling = pva_ceiling(net, size, n)
    sim = IOCProcess(["simdet", "--prefix", "BENCH:SIM:", "--no-ca"], "BENCH:SIM:", net.slots[0], net).start()
    ctx = Context("pva", conf=net.pva_conf(), useenv=False)
    try:
        for k, v in {"ImageMode": "Multiple", "NumImages": n, "ScanPoints": min(n, 4000), "AcquirePeriod": 0.0,
                     "DataType": "UInt16", "Size": size}.items():
            ctx.put(f"BENCH:SIM:cam1:{k}", v, wait=True)
        ctx.put("BENCH:SIM:cam1:Acquire", 1, timeout=120)  # build the frame cache first (not timed)

        def start():
            threading.Thread(target=ctx.put, args=("BENCH:SIM:cam1:Acquire", 1), kwargs={"timeout": 300},
                             daemon=True).start()

        got, secs, gaps = count_frames(net, "BENCH:SIM:Pva1:Image", n, start)
        rate = got / secs
        row("simdet", f"simdet -> p4p client, {size}x{size} uint16, {n} frames", rate, "frames/s", ceiling,
            "raw p4p server->client", note=f"received {got}/{n}, gaps {gaps}", received=got, sent=n, gaps=gaps)
    finally:
        ctx.close()
        sim.stop()


# -- models and the inference ceiling ----------------------------------------------------------
def model_file(tmp: Path, size: int = 128, seed: int = 0) -> str:
    """The 0.73 M-parameter PtychoNN-class edge net for ``size`` frames (``seed``: other weights, another id)."""
    from ptychostream.model.zoo import build_ptychonn_onnx

    path = tmp / f"edge{size}-{seed}.onnx"
    if path.exists():
        return str(path)
    return build_ptychonn_onnx(str(path), size=size, heads=("phase",), base_channels=16, depth=4, seed=seed)


def open_like_reconstructor(path: str, backend: str, batch: int):
    """Open a model file as the reconstructor's loader does (same backend options), self-tested."""
    from ptychostream.model.infer import open_model

    model = open_model(path, backend=backend, batch_size=batch, spinning=False)
    model.selftest()
    return model


def inference_ceiling(path: str, backend: str, batch: int, size: int, quick: bool) -> tuple[float, str]:
    """Raw inference rate (pre-processing included) of full batches, and the backend that ran it.

    Each benchmark measures it just before it starts its IOCs, so a shared box's load changes little
    between the figure and its ceiling.
    """
    n, min_s = (8 * batch, 0.5) if quick else (2000, 3.0)
    model = open_like_reconstructor(path, backend, batch)
    frames = np.random.default_rng(0).poisson(5, (batch, size, size)).astype(np.uint16)
    for _ in range(3):  # first-run allocations, autotuning
        model.run(frames)
    t0 = time.perf_counter()
    done = 0
    while done < n or time.perf_counter() - t0 < min_s:
        model.run(frames)
        done += batch
    rate = done / (time.perf_counter() - t0)
    name = model.backend.name
    model.close()
    return rate, name


def load_time(path: str, backend: str, batch: int) -> float:
    """Seconds to open and self-test a model file with nothing else running (the swap's reference)."""
    t0 = time.perf_counter()
    model = open_like_reconstructor(path, backend, batch)
    secs = time.perf_counter() - t0
    model.close()
    return secs


# -- simdet -> reconstructor: one harness for pipeline, sweep, burst and swap --------------------
@dataclass
class Stream:
    """One acquisition of ``sent`` frames through the reconstructor, as its counter PVs saw it."""

    sent: int
    period: float
    counters: dict[str, int]
    peak_backlog: int
    backlog_at_last_rx: int
    t0: float            # Acquire put
    first: float         # first poll that saw Received > 0
    last_rx: float       # first poll that saw the final Received
    done: float          # first poll with every received frame accounted for and Backlog 0
    acquired: float      # the Acquire put completed (simdet published the last frame)
    p50_ms: float
    p99_ms: float

    @property
    def lost(self) -> int:
        c = self.counters
        return (self.sent - c["Received"]) + c["Dropped"] + c["Rejected"]

    @property
    def balanced(self) -> bool:
        """Received = Processed + Dropped + Rejected + Backlog."""
        c = self.counters
        return c["Received"] == c["Processed"] + c["Dropped"] + c["Rejected"] + c["Backlog"]

    @property
    def rate(self) -> float:
        """Frames processed per second, first frame received to last frame processed."""
        return self.counters["Processed"] / max(self.done - self.first, 1e-3)

    @property
    def input_rate(self) -> float:
        """Frames per second simdet published (Acquire put to its completion)."""
        return self.sent / max(self.acquired - self.t0, 1e-3)

    @property
    def drain_s(self) -> float:
        return max(0.0, self.done - self.last_rx)

    def lost_note(self) -> str:
        c = self.counters
        return (f"lost {self.lost} (dropped {c['Dropped']}, rejected {c['Rejected']}, "
                f"not received {self.sent - c['Received']}, uniqueId gaps {c['Missed']})")

    def latency_note(self) -> str:
        return f"latency p50 {self.p50_ms:.0f} ms p99 {self.p99_ms:.0f} ms"

    def data(self) -> dict:
        c = self.counters
        return {"sent": self.sent, "received": c["Received"], "processed": c["Processed"], "dropped": c["Dropped"],
                "rejected": c["Rejected"], "missed": c["Missed"], "backlog_end": c["Backlog"], "lost": self.lost,
                "balanced": self.balanced, "rate": round(self.rate, 1), "input_rate": round(self.input_rate, 1),
                "peak_backlog": self.peak_backlog, "backlog_at_last_rx": self.backlog_at_last_rx,
                "drain_s": round(self.drain_s, 3), "p50_ms": self.p50_ms, "p99_ms": self.p99_ms}


def serving(ctx, rec: str, path: str) -> bool:
    """The reconstructor ``rec`` serves ``path``: ModelStatus_RBV Ready and ModelPath_RBV ``path``;
    RuntimeError with its message if the load failed."""
    status, rbv, msg = ctx.get([rec + "ModelStatus_RBV", rec + "ModelPath_RBV", rec + "Message_RBV"])
    if int(status) == 3:
        raise RuntimeError(f"model load failed: {msg.raw['value']}")
    return int(status) == 2 and rbv.raw["value"] == path


class CounterWatch:
    """The counter PVs of ``prefix`` by monitor, as a display client watches them, instead of 50 Hz gets.

    Polling six counters every 20 ms was the harness's own load on the box it measures (0.06 of a core
    in the benchmark process at 200 frames/s, besides what the IOC spent answering); the IOC posts them
    at its 10 Hz status scan, so a monitor sees every value a poll could. ``latest()`` is the newest value
    of each (None until each has one), ``peak`` the largest Backlog of any update.
    """

    def __init__(self, ctx, prefix: str, names: tuple[str, ...]) -> None:
        self._lock = threading.Lock()
        self._names = names
        self._values: dict[str, int] = {}
        self.peak = 0
        self._subs = [ctx.monitor(f"{prefix}{k}_RBV", lambda v, k=k: self._update(k, v)) for k in names]

    def _update(self, name: str, value) -> None:
        if isinstance(value, Exception):  # a disconnect: the last value stays
            return
        with self._lock:
            self._values[name] = int(value)
            if name == "Backlog":
                self.peak = max(self.peak, int(value))

    def latest(self) -> dict[str, int] | None:
        with self._lock:
            return dict(self._values) if len(self._values) == len(self._names) else None

    def wait_first(self, timeout: float = 10.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while (c := self.latest()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no first update of the counters in {timeout:.0f} s")
            time.sleep(POLL_S)
        return c

    def close(self) -> None:
        for sub in self._subs:
            sub.close()


class Pipeline:
    """simdet (slot 0) -> reconstructor (slot 1), configured, model Ready and input connected.

    ``with Pipeline(...) as p:`` then ``p.warm(n)`` and ``p.stream(n, period)``.
    """

    SIM, REC = "BENCH:SIM:", "BENCH:NN:"
    COUNTERS = ("Received", "Processed", "Dropped", "Rejected", "Missed", "Backlog")

    def __init__(self, net: EpicsNet, model: str, o: Opts, batch: int, backlog: int, scan_points: int = 1000) -> None:
        self.net, self.model, self.o = net, model, o
        self.batch, self.backlog, self.scan_points = batch, backlog, scan_points
        self.sim_ioc: IOCProcess | None = None
        self.rec_ioc: IOCProcess | None = None
        self.ctx = self.actx = None
        self.backend_used = ""

    def __enter__(self) -> "Pipeline":
        from p4p.client.thread import Context

        try:
            self.sim_ioc = IOCProcess(["simdet", "--prefix", self.SIM, "--no-ca"], self.SIM, self.net.slots[0],
                                      self.net).start()
            self.rec_ioc = IOCProcess(["ioc", "--prefix", self.REC, "--no-ca"], self.REC, self.net.slots[1],
                                      self.net).start()
            self.ctx = Context("pva", conf=self.net.pva_conf(), useenv=False)
            self.actx = Context("pva", conf=self.net.pva_conf(), useenv=False)  # for the busy Acquire put
            self.actx.get(self.SIM + "cam1:Acquire")  # connected before anything is timed
            self.sim(ImageMode="Multiple", DataType="UInt16", Size=self.o.size, ScanPoints=self.scan_points,
                     AcquirePeriod=0.0)
            # Backend and BatchSize first: the model is opened with them
            self.rec(Backend=self.o.backend, BatchSize=self.batch, BacklogLimit=self.backlog, PublishRate=10,
                     PixelSize=1e-8)
            self.rec(ModelPath=self.model, InputPV=self.SIM + "Pva1:Image", Enable=1)
            self._serve_and_connect()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for c in (self.ctx, self.actx):
            if c is not None:
                c.close()
        for ioc in (self.rec_ioc, self.sim_ioc):
            if ioc is not None:
                ioc.stop()

    # -- PV access --
    def sim(self, **values) -> None:
        for k, v in values.items():
            self.ctx.put(f"{self.SIM}cam1:{k}", v, wait=True)

    def _serve_and_connect(self) -> None:
        """Wait until the model serves and the input channel is connected; note the backend in use."""
        self.wait_serving(self.model)
        deadline = time.monotonic() + 30
        while int(self.get("InputConnected_RBV")) != 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"input not connected: {self.text('Message_RBV')}")
            time.sleep(0.05)
        self.backend_used = BACKEND_CHOICES[int(self.get("Backend_RBV"))]

    def rec(self, **values) -> None:
        for k, v in values.items():
            self.ctx.put(self.REC + k, v, wait=True)

    def get(self, name: str):
        return self.ctx.get(self.REC + name)

    def text(self, name: str) -> str:
        return self.get(name).raw["value"]

    def counters(self) -> dict[str, int]:
        values = self.ctx.get([f"{self.REC}{k}_RBV" for k in self.COUNTERS])
        return {k: int(v) for k, v in zip(self.COUNTERS, values)}

    def serving(self, path: str) -> bool:
        """ModelStatus_RBV Ready and ModelPath_RBV ``path`` (the inference loop has taken it)."""
        return serving(self.ctx, self.REC, path)

    def wait_serving(self, path: str, timeout: float = 120.0) -> float:
        """Poll until ``path`` is serving; returns the time (perf_counter) it was first seen."""
        deadline = time.monotonic() + timeout
        while not self.serving(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} not serving after {timeout:.0f} s: {self.text('Message_RBV')}")
            time.sleep(POLL_S / 4)
        return time.perf_counter()

    def reset(self) -> None:
        self.rec(ResetCounters=1, MosaicReset=1)

    # -- acquisitions --
    def _acquire(self, timeout: float) -> dict:
        """Put Acquire=1 (completes when simdet has published NumImages) on a thread."""
        state: dict = {"done": threading.Event(), "t_end": None, "error": None}

        def run() -> None:
            try:
                self.actx.put(self.SIM + "cam1:Acquire", 1, timeout=timeout)
            except Exception as exc:  # reported by stream()
                state["error"] = exc
            finally:
                state["t_end"] = time.perf_counter()
                state["done"].set()

        threading.Thread(target=run, daemon=True).start()
        return state

    def warm(self, n: int) -> None:
        """An untimed acquisition: builds simdet's frame cache and runs the model on real frames."""
        self.stream(n)

    def stream(self, n: int, period: float = 0.0, during: Callable[[float, dict], None] | None = None) -> Stream:
        """Zero the counters, acquire ``n`` frames ``period`` s apart (0 = as fast as simdet can) and
        poll the counters until every frame is received or given up on, and Backlog_RBV is 0.

        ``during(now, counters)`` is called at every poll (now: time.perf_counter()).
        """
        self.reset()
        self.sim(NumImages=n, AcquirePeriod=period)
        timeout = 120 + 2 * n * max(period, 0.02)
        watch = CounterWatch(self.ctx, self.REC, self.COUNTERS)
        try:
            watch.wait_first()
            t0 = time.perf_counter()
            acq = self._acquire(timeout)
            return self._watch_stream(n, period, t0, acq, timeout, watch, during)
        finally:
            watch.close()

    def _watch_stream(self, n: int, period: float, t0: float, acq: dict, timeout: float, watch: CounterWatch,
                      during: Callable[[float, dict], None] | None) -> Stream:
        first = last_rx = None
        at_last = 0
        prev_rx = -1
        while True:
            now = time.perf_counter()
            c = watch.latest()
            assert c is not None
            if first is None and c["Received"] > 0:
                first = now
            if c["Received"] != prev_rx:
                prev_rx, last_rx, at_last = c["Received"], now, c["Backlog"]
            if during is not None:
                during(now, c)
            if acq["error"] is not None:
                raise RuntimeError(f"Acquire failed: {acq['error']}")
            accounted = c["Processed"] + c["Dropped"] + c["Rejected"] >= c["Received"] and c["Backlog"] == 0
            if acq["done"].is_set() and accounted and (c["Received"] >= n or now - max(acq["t_end"], last_rx) > 2.0):
                break  # everything in, or nothing more arrived for 2 s after simdet finished
            if now - t0 > timeout:
                raise RuntimeError(f"stream of {n} frames not finished after {timeout:.0f} s: {c}")
            time.sleep(POLL_S)
        if first is None:
            raise RuntimeError(f"no frame of {n} reached the reconstructor: {self.text('Message_RBV')}")
        time.sleep(0.25)  # one more status scan: latency of the same frames, final counters
        p50, p99 = float(self.get("LatencyP50_RBV")), float(self.get("LatencyP99_RBV"))
        return Stream(sent=n, period=period, counters=self.counters(), peak_backlog=watch.peak, backlog_at_last_rx=at_last,
                      t0=t0, first=first, last_rx=last_rx, done=now, acquired=acq["t_end"], p50_ms=p50, p99_ms=p99)

    def wait_stitched(self, processed: int, timeout: float = 10.0) -> int:
        """Let the stitch thread finish what inference handed it; returns Stitched_RBV."""
        deadline = time.monotonic() + timeout
        while int(self.get("Stitched_RBV")) + int(self.get("Unpositioned_RBV")) < processed:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return int(self.get("Stitched_RBV"))


class ServingWatch(threading.Thread):
    """Polls every 2 ms, on its own Context (connected when made), until ``path`` is serving:
    ModelStatus_RBV Ready and ModelPath_RBV ``path``. ``t`` is the time.perf_counter() it was first seen."""

    def __init__(self, p: Pipeline, path: str, timeout: float = 120.0) -> None:
        from p4p.client.thread import Context

        super().__init__(name="bench-swap-watch", daemon=True)
        self.rec = p.REC
        self.ctx = Context("pva", conf=p.net.pva_conf(), useenv=False)
        serving(self.ctx, self.rec, "")  # connected before the swap is timed
        self.path, self.timeout = path, timeout
        self.t: float | None = None
        self.error = ""

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                if serving(self.ctx, self.rec, self.path):
                    self.t = time.perf_counter()
                    return
                time.sleep(0.002)
            self.error = f"not serving after {self.timeout:.0f} s"
        except RuntimeError as exc:  # the load failed
            self.error = str(exc)
        finally:
            self.ctx.close()


def _ceiling_what(backend: str) -> str:
    return f"raw inference ({backend}), same model and batch"


def _check_backend(p: Pipeline, ceiling_backend: str) -> str:
    """A note when the reconstructor ended up on another backend than the ceiling."""
    if p.backend_used != ceiling_backend:
        return f"; WARNING: reconstructor on {p.backend_used}, ceiling on {ceiling_backend}"
    return ""


# -- end-to-end: one burst -----------------------------------------------------------------------
def bench_pipeline(net: EpicsNet, o: Opts) -> None:
    n, batch, size = (300 if o.quick else 4000), o.batch, o.size
    path = model_file(o.tmp, size)
    ceiling, be = inference_ceiling(path, o.backend, batch, size, o.quick)
    with Pipeline(net, path, o, batch, backlog=100000, scan_points=min(n, 4000)) as p:
        p.warm(n)  # these frames are processed too
        s = p.stream(n)
        stitched = p.wait_stitched(s.counters["Processed"])
        warn = _check_backend(p, be)
    c = s.counters
    row("pipeline", f"simdet -> reconstructor ({p.backend_used}, batch {batch}), {n} frames {size}x{size}", s.rate,
        "frames/s", ceiling, _ceiling_what(be),
        note=f"dropped {c['Dropped']}, rejected {c['Rejected']}, peak backlog {s.peak_backlog}, "
             f"{s.latency_note()} (queueing included){warn}", **s.data())
    row("pipeline", "frames stitched into the mosaic", stitched, "frames", note=f"of {c['Processed']} processed",
        stitched=stitched, processed=c["Processed"])


# -- end-to-end: swept input rate ------------------------------------------------------------------
def bench_sweep(net: EpicsNet, o: Opts) -> None:
    batch, size = o.batch, o.size
    path = model_file(o.tmp, size)
    ceiling, be = inference_ceiling(path, o.backend, batch, size, o.quick)
    fractions = sorted(o.fractions or (SWEEP_FRACTIONS_QUICK if o.quick else SWEEP_FRACTIONS))
    if o.rates:  # absolute rates, as fractions of this run's ceiling
        fractions = sorted(r / ceiling for r in o.rates)
    step_s = o.step_s or (SWEEP_STEP_S_QUICK if o.quick else SWEEP_STEP_S)
    backlog = max(2 * batch, round(SWEEP_BUFFER_S * ceiling))
    steps: list[tuple[float, float, Stream]] = []
    with Pipeline(net, path, o, batch, backlog=backlog, scan_points=256 if o.quick else 1000) as p:
        p.warm(4 * batch)
        warn = _check_backend(p, be)
        for f in fractions:
            rate = f * ceiling
            n = max(4 * batch, round(rate * step_s))
            s = p.stream(n, period=1.0 / rate)
            steps.append((f, rate, s))
            paced = "" if s.input_rate >= 0.9 * rate else f" (simdet reached only {s.input_rate:.0f}/s)"
            row("sweep", f"input {rate:.0f} frames/s ({f:g} x ceiling), {n} frames {size}x{size}", s.rate, "frames/s",
                ceiling, _ceiling_what(be),
                note=f"sent {n} at {s.input_rate:.0f}/s{paced}; processed {s.counters['Processed']}; {s.lost_note()}; "
                     f"{s.latency_note()}; peak backlog {s.peak_backlog}/{backlog}{warn}",
                requested=round(rate, 1), fraction=f, backlog_limit=backlog, **s.data())
    # sustained: nothing lost *and* the queue stayed at most half full, so processing kept pace and
    # the queue did not merely absorb a step that a longer acquisition would overflow
    ok = [(f, r, s) for f, r, s in steps if s.lost == 0 and s.peak_backlog <= SUSTAINED_QUEUE * backlog]
    if not ok:
        row("sweep", f"highest input rate sustained with zero loss, BacklogLimit {backlog}", 0.0, "frames/s",
            ceiling, _ceiling_what(be), note="no rate was sustained without loss", backlog_limit=backlog)
        return
    f, r, s = max(ok, key=lambda t: t[1])
    lossy_below = [f2 for f2, _, s2 in steps if f2 < f and s2.lost]
    above = [(f2, s2) for f2, _, s2 in steps if f2 > f]
    nxt = (f"; next rate ({above[0][0]:g} x): lost {above[0][1].lost}, processed {above[0][1].rate:.0f}/s of "
           f"{above[0][1].input_rate:.0f}/s in, peak backlog {above[0][1].peak_backlog}" if above else
           "; no higher rate tried")
    note = (f"requested {r:.0f}/s ({f:g} x ceiling), processed {s.rate:.0f}/s, {s.latency_note()}" + nxt
            + (f"; but lower rates {lossy_below} lost frames" if lossy_below else ""))
    row("sweep", f"highest input rate sustained with zero loss, BacklogLimit {backlog}", s.input_rate, "frames/s",
        ceiling, _ceiling_what(be), note=note, sustained=True, requested=round(r, 1), fraction=f,
        backlog_limit=backlog)


# -- end-to-end: a burst into a large queue --------------------------------------------------------
def bench_burst(net: EpicsNet, o: Opts) -> None:
    batch, size = o.batch, o.size
    n = BURST_FRAMES_QUICK if o.quick else BURST_FRAMES
    path = model_file(o.tmp, size)
    ceiling, be = inference_ceiling(path, o.backend, batch, size, o.quick)
    backlog = min(1_000_000, max(100_000, 2 * n))
    with Pipeline(net, path, o, batch, backlog=backlog, scan_points=256 if o.quick else 1000) as p:
        p.warm(4 * batch)
        s = p.stream(n)
        warn = _check_backend(p, be)
    row("burst", f"burst of {n} frames {size}x{size} at simdet's full speed, overall rate", s.rate, "frames/s",
        ceiling, _ceiling_what(be),
        note=f"{s.lost_note()}; peak backlog {s.peak_backlog}; input {s.input_rate:.0f}/s; {s.latency_note()}{warn}",
        backlog_limit=backlog, **s.data())
    ideal = s.backlog_at_last_rx / ceiling
    row("burst", "drain time, last frame received to Backlog_RBV 0", s.drain_s, "s", ideal,
        "raw inference of the backlog left then",
        note=f"backlog {s.backlog_at_last_rx} when the last frame arrived; resolution 0.1 s (10 Hz status scan)",
        **s.data())


# -- hot model swap while streaming ----------------------------------------------------------------
def bench_swap(net: EpicsNet, o: Opts) -> None:
    from ptychostream.model.infer import load_model_file

    batch, size = o.batch, o.size
    path, path2 = model_file(o.tmp, size, seed=0), model_file(o.tmp, size, seed=1)
    ceiling, be = inference_ceiling(path, o.backend, batch, size, o.quick)
    idle_s = load_time(path2, o.backend, batch)
    rate = min(SWAP_FRACTION * ceiling, o.max_rate or float("inf"))
    n = max(8 * batch, round(rate * (SWAP_STREAM_S_QUICK if o.quick else SWAP_STREAM_S)))
    new_id = load_model_file(path2).model_id
    t: dict[str, float] = {}
    with Pipeline(net, path, o, batch, backlog=20000, scan_points=256 if o.quick else 1000) as p:
        p.warm(4 * batch)
        warn = _check_backend(p, be)
        watch = ServingWatch(p, path2)

        def during(now: float, c: dict) -> None:
            if "put" not in t and c["Received"] >= n // 2:
                t["put"] = time.perf_counter()
                p.rec(ModelPath=path2)
                watch.start()

        s = p.stream(n, period=1.0 / rate, during=during)
        if "put" not in t:
            watch.ctx.close()
            raise RuntimeError(f"ModelPath was never put: {s.counters}")
        watch.join(watch.timeout + 5)
        if watch.t is None:
            raise RuntimeError(f"the swap to {path2} did not complete: {watch.error}")
        t["ready"] = watch.t
        info = p.text("ModelInfo_RBV")
    c = s.counters
    in_stream = t["ready"] <= s.acquired
    ok = s.lost == 0 and s.balanced and c["Processed"] == n and new_id in info
    row("swap", f"hot model swap while streaming {rate:.0f} frames/s, {n} frames {size}x{size}: put to serving",
        t["ready"] - t["put"], "s", idle_s, "idle open + self-test of the same file and backend",
        note=f"{s.lost_note()}; Received {c['Received']} = Processed {c['Processed']} + Dropped + Rejected + "
             f"Backlog {c['Backlog']}: {'yes' if s.balanced else 'NO'}; "
             f"{'swapped while frames streamed' if in_stream else 'swap finished after the stream'}; "
             f"new model id {new_id} {'in' if new_id in info else 'NOT in'} ModelInfo_RBV; "
             f"peak backlog {s.peak_backlog}{warn}",
        swap_s=round(t["ready"] - t["put"], 3), idle_load_s=round(idle_s, 3), swapped_in_stream=in_stream,
        new_model_serving=new_id in info, ok=ok, **s.data())


# -- pvapy: pvapy-ad-sim-server -> pvapy-hpc-consumer ------------------------------------------------
def _console_script(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def _stat(text: str, key: str) -> float | None:
    m = re.search(rf"'{key}': ([-0-9.eE+]+)", text)
    return float(m.group(1)) if m else None


def bench_pvapy(net: EpicsNet, o: Opts) -> None:
    server, consumer = _console_script("pvapy-ad-sim-server"), _console_script("pvapy-hpc-consumer")
    if not (server and consumer):
        print("[pvapy] skipped: pvapy-ad-sim-server / pvapy-hpc-consumer not installed (pip install pvapy)",
              flush=True)
        return
    size = o.size
    secs = PVAPY_SECONDS_QUICK if o.quick else PVAPY_SECONDS
    ceiling = pva_ceiling(net, size, 2000 if o.quick else 20000)
    channel, delay = "BENCH:PVAPY:Image", 3.0
    # pvAccessCPP clients search only EPICS_PVA_BROADCAST_PORT, which is slot 0's: the server goes there.
    # The consumer runs its own PVA server (status/control), on slot 2.
    senv, cenv = dict(os.environ), dict(os.environ)
    senv.update(net.server_env(net.slots[0]))
    cenv.update(net.server_env(net.slots[2]))
    srv = subprocess.Popen([server, "-cn", channel, "-nx", str(size), "-ny", str(size), "-dt", "uint16", "-mn", "0",
                            "-mx", "1000", "-nf", "16", "-cs", "16", "-fps", "0", "-rt", str(secs), "-std", str(delay),
                            "-shd", "0", "-rp", "0", "-dc"],
                           env=senv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    con = subprocess.Popen([consumer, "-ic", channel, "-sqs", str(PVAPY_QUEUE), "-rt", str(delay + secs + 60), "-dc"],
                           env=cenv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        sout, _ = srv.communicate(timeout=delay + secs + 60)
        time.sleep(1.0)  # the last frames reach the consumer
        con.send_signal(signal.SIGINT)  # the consumer prints its statistics on the way out
        cout, _ = con.communicate(timeout=30)
    finally:
        for proc in (srv, con):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    m = re.search(r"Published frames:\s*(\d+) @ ([0-9.]+) fps", sout)
    processed, missed = _stat(cout, "nProcessed"), _stat(cout, "nMissed")
    rate, first, last = _stat(cout, "processedRate"), _stat(cout, "firstObjectId"), _stat(cout, "lastObjectId")
    overruns = _stat(cout, "nOverruns") or 0
    if m is None or processed is None or rate is None:
        raise RuntimeError(f"pvapy output not understood:\n--- server\n{sout[-2000:]}\n--- consumer\n{cout[-3000:]}")
    published, pub_rate = int(m.group(1)), float(m.group(2))
    processed, missed, first, last = int(processed), int(missed or 0), int(first or 0), int(last or 0)
    lost = published - processed
    late = f"; consumer joined at uniqueId {first}" if first > 1 else ""
    row("pvapy", f"pvapy-ad-sim-server -> pvapy-hpc-consumer, {size}x{size} uint16, {secs:g} s", rate, "frames/s",
        ceiling, "raw p4p server->client",
        note=f"received {processed}/{published} published ({pub_rate:.0f}/s), uniqueId gaps {missed}, "
             f"overruns {int(overruns)}, monitor queue {PVAPY_QUEUE}{late}",
        published=published, published_rate=pub_rate, received=processed, missed=missed, lost=lost,
        first_id=first, last_id=last, overruns=int(overruns))


# -- host path: a bare p4p producer -> the null-model reconstructor, next to a bare p4p client --------
#: frame sizes of the host benchmark; frames larger than HOST_MODEL_PX are cropped and binned to it
#: by the model's pre-processing (Preprocess.fit_to: 256 -> bin 2, 516 -> crop 512, bin 4)
HOST_SIZES, HOST_SIZES_QUICK = (64, 128, 256, 516), (64, 516)
HOST_MODEL_PX = 128
#: the null model's output patch: the central HOST_PATCH_PX² of its input, as the shipped model's 64² of 128²
HOST_PATCH_PX = 64
#: the burst at the producer's full speed, and the zero-loss search: steps of HOST_STEP_S seconds
HOST_BURST, HOST_BURST_QUICK = 20000, 2000
HOST_STEPS, HOST_STEPS_QUICK = 6, 2
HOST_STEP_S, HOST_STEP_S_QUICK = 3.0, 1.0
#: bare-client bursts before and after the reconstructor's runs (the ceiling is their median)
HOST_BARE_RUNS = 3
#: the bare client and the reconstructor both ask the server for this monitor queue
HOST_QUEUE = 1024
#: pre-built frames, one per scan position (a HOST_GRID x HOST_GRID raster), cycled by uniqueId
HOST_GRID = 8
#: seconds without a new frame after the producer finished: the stream is over
HOST_QUIET_S = 0.5
#: the profile: seconds py-spy samples the reconstructor, samples per second
PROFILE_S, PROFILE_S_QUICK = 6.0, 2.0
PROFILE_HZ = 100
#: the profile's paced rate, as a share of the host row's sustained rate (py-spy takes CPU too)
PROFILE_SHARE = 0.8

HOST_PRODUCER = textwrap.dedent("""
    # a bare NTNDArray producer: pre-built frames, consecutive uniqueIds, posted as fast as asked
    import sys, time, numpy as np
    from p4p.nt import NTNDArray
    from p4p.server import Server
    from p4p.server.thread import SharedPV
    size, grid, step = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    nt = NTNDArray()
    same = lambda v, **kw: v
    pv = SharedPV(initial=nt.wrap(np.zeros((size, size), np.uint16)), wrap=same, unwrap=same)
    frames = []
    for k in range(grid * grid):
        y, x = divmod(k, grid)
        data = np.random.default_rng(k).poisson(5.0, (size, size)).astype(np.uint16)
        frames.append(nt.wrap(data, attrib={"ColorMode": ("i", 0), "PositionX": ("d", x * step),
                                            "PositionY": ("d", y * step)}))
    uid = 1
    with Server(providers=[{"BENCH:HOST:Image": pv}]):
        print("ready", flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            n, rate = int(cmd[1]), float(cmd[2])
            first = uid
            t0 = time.perf_counter()
            for j in range(n):
                if rate > 0:
                    ahead = t0 + j / rate - time.perf_counter()
                    if ahead > 0.001:
                        time.sleep(ahead)
                v = frames[uid % len(frames)]
                v["uniqueId"] = uid
                pv.post(v)
                uid += 1
            print(f"done {first} {uid - 1} {time.perf_counter() - t0:.6f}", flush=True)
""")


def host_geometry(size: int) -> tuple[int, int | None, int]:
    """(model input px, crop, bin) for ``size``² frames: the frame itself up to HOST_MODEL_PX, else the
    crop and binning that ``Preprocess.fit_to`` picks for a HOST_MODEL_PX model."""
    from ptychostream.model.preprocess import Preprocess

    if size <= HOST_MODEL_PX:
        return size, None, 1
    fit = Preprocess().fit_to((size, size), (HOST_MODEL_PX, HOST_MODEL_PX))
    return HOST_MODEL_PX, fit.crop_size, int(fit.bin)


def null_model(path: Path, px: int, crop: int | None = None, binning: int = 1,
               heads: tuple[str, ...] = ("amplitude", "phase"), patch: int | None = HOST_PATCH_PX) -> str:
    """The device without inference: one ONNX ``Slice`` per head, from the (n, 1, px, px) input to
    its central ``patch``² pixels (the shipped model's geometry: a 128² input, a 64² patch), or an
    ``Identity`` when ``patch`` is None or not smaller than px.

    ``crop`` and ``binning`` go to the model's ``ptychostream.preprocess`` (they make larger frames
    px²). benchmarks/soak.py's null model is an Identity for px 64 with a 64-pixel crop.
    """
    import onnx
    from onnx import TensorProto, helper

    from ptychostream.model.zoo import ir_version_for

    out = px if patch is None or patch >= px else int(patch)
    inits = []
    if out < px:
        lo = (px - out) // 2
        inits = [helper.make_tensor(name, TensorProto.INT64, [2], vals)
                 for name, vals in (("starts", [lo, lo]), ("ends", [lo + out, lo + out]), ("axes", [2, 3]))]
        nodes = [helper.make_node("Slice", ["input", "starts", "ends", "axes"], [h]) for h in heads]
    else:
        nodes = [helper.make_node("Identity", ["input"], [h]) for h in heads]
    graph = helper.make_graph(nodes, "null",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, px, px])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["N", 1, out, out]) for h in heads],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ptychostream.bench")
    model.ir_version = ir_version_for(17)
    pre: dict[str, int] = {"bin": binning}
    if crop:
        pre["crop_size"] = crop
    model.metadata_props.add(key="ptychostream.preprocess", value=json.dumps(pre))
    onnx.save(model, str(path))
    return str(path)


class Producer:
    """HOST_PRODUCER on slot ``slot`` of ``net``: ``run(n, rate)`` posts n frames (rate 0: full speed)."""

    CHANNEL = "BENCH:HOST:Image"

    def __init__(self, net: EpicsNet, size: int, pixel: float, slot: int = 0) -> None:
        env = dict(os.environ)
        env.update(net.server_env(net.slots[slot]))
        step = HOST_PATCH_PX // 4 * pixel  # the null model's patches overlap by three quarters
        self.proc = subprocess.Popen([sys.executable, "-c", HOST_PRODUCER, str(size), str(HOST_GRID), repr(step)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        line = self.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"the bench producer did not start: {line!r}")

    def start(self, n: int, rate: float) -> None:
        self.stdin.write(f"run {n} {rate}\n")
        self.stdin.flush()

    def wait(self) -> tuple[int, int, float, float]:
        """(first uniqueId, last uniqueId, seconds it posted for, perf_counter when it said so)."""
        words = self.stdout.readline().split()
        if len(words) != 4 or words[0] != "done":
            raise RuntimeError(f"the bench producer stopped: {words}")
        return int(words[1]), int(words[2]), float(words[3]), time.perf_counter()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.stdin.write("quit\n")
                self.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class BareCount:
    """What the bare p4p client saw of one producer run."""

    sent: int
    received: int
    gaps: int
    rate: float          # frames received per second, first to last received
    producer_rate: float  # frames the producer posted per second


def bare_client(net: EpicsNet, prod: Producer, n: int, rate: float = 0.0) -> BareCount:
    """A bare p4p client (Python monitor, nothing decoded, uniqueIds counted) of ``prod`` while it
    posts ``n`` frames at ``rate`` (0: full speed), with the reconstructor's monitor queue."""
    from p4p.client.thread import Context

    ctx = Context("pva", conf=net.pva_conf(), useenv=False, nt=False)
    uids: list[int] = []
    times: list[float] = []
    connected = threading.Event()

    def cb(v) -> None:
        if isinstance(v, Exception):
            return
        if not connected.is_set():  # the PV's current value: not a frame of this run
            connected.set()
            return
        uids.append(v["uniqueId"])
        times.append(time.perf_counter())

    sub = ctx.monitor(prod.CHANNEL, cb, request=f"record[queueSize={HOST_QUEUE}]", notify_disconnect=True)
    try:
        if not connected.wait(30):
            raise RuntimeError(f"the bare client did not connect to {prod.CHANNEL}")
        prod.start(n, rate)
        first, last, secs, _ = prod.wait()
        count = len(uids)
        deadline = time.monotonic() + 60
        while len(uids) < n and time.monotonic() < deadline:  # all in, or nothing new for HOST_QUIET_S
            time.sleep(POLL_S)
            if len(uids) == count and (count == 0 or time.perf_counter() - times[-1] > HOST_QUIET_S):
                break
            count = len(uids)
    finally:
        sub.close()
        ctx.close()
    got = np.array([u for u in uids if first <= u <= last])
    gaps = int(n - len(got))
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return BareCount(sent=n, received=len(got), gaps=gaps, rate=len(got) / span, producer_rate=n / secs)


class HostPipeline(Pipeline):
    """A bare producer (its own process, slot 0) -> the reconstructor IOC (slot 1) with the null model,
    PublishRate 10 and the mosaic fed by the frames' position attributes."""

    def __init__(self, net: EpicsNet, model: str, o: Opts, batch: int, backlog: int, prod: Producer,
                 receive: str = "thread") -> None:
        super().__init__(net, model, o, batch, backlog)
        self.prod = prod
        self.receive = receive

    def __enter__(self) -> "HostPipeline":
        from p4p.client.thread import Context

        try:
            self.rec_ioc = IOCProcess(["ioc", "--prefix", self.REC, "--no-ca", "--receive", self.receive], self.REC,
                                      self.net.slots[1], self.net).start()
            self.ctx = Context("pva", conf=self.net.pva_conf(), useenv=False)
            self.rec(Backend=self.o.backend, BatchSize=self.batch, BacklogLimit=self.backlog, PublishRate=10,
                     PixelSize=HOST_PIXEL, PositionSource="Attributes", PosAttrX="PositionX", PosAttrY="PositionY",
                     PosScale=1.0)
            self.rec(ModelPath=self.model, InputPV=self.prod.CHANNEL, Enable=1)
            self._serve_and_connect()
        except BaseException:
            self.__exit__()
            raise
        return self

    def mosaic_counts(self) -> tuple[int, int]:
        """(Stitched_RBV, Unpositioned_RBV)."""
        return int(self.get("Stitched_RBV")), int(self.get("Unpositioned_RBV"))

    def run_frames(self, n: int, rate: float = 0.0) -> tuple[Stream, int, int]:
        """Zero the counters, have the producer post ``n`` frames at ``rate`` (0: full speed), poll until
        every frame is received or none came for HOST_QUIET_S, inferred, and stitched; returns the
        stream, Stitched_RBV and Unpositioned_RBV."""
        self.reset()
        deadline = time.monotonic() + 5
        while any(self.counters()[k] for k in ("Received", "Processed", "Missed")):  # the reset is seen
            if time.monotonic() > deadline:
                raise RuntimeError(f"ResetCounters did not zero the counters: {self.counters()}")
            time.sleep(POLL_S)
        watch = CounterWatch(self.ctx, self.REC, self.COUNTERS)
        try:
            watch.wait_first()
            return self._watch_frames(n, rate, watch)
        finally:
            watch.close()

    def _watch_frames(self, n: int, rate: float, watch: CounterWatch) -> tuple[Stream, int, int]:
        t0 = time.perf_counter()
        self.prod.start(n, rate)
        done: dict = {}
        waiter = threading.Thread(target=lambda: done.update(t=self.prod.wait()), daemon=True)
        waiter.start()
        first = None
        last_rx = t0
        at_last = 0
        prev_rx = -1
        timeout = 120 + 2 * n / max(rate, 1000.0)
        while True:
            now = time.perf_counter()
            c = watch.latest()
            assert c is not None
            if first is None and c["Received"] > 0:
                first = now
            if c["Received"] != prev_rx:
                prev_rx, last_rx, at_last = c["Received"], now, c["Backlog"]
            accounted = c["Processed"] + c["Dropped"] + c["Rejected"] >= c["Received"] and c["Backlog"] == 0
            if "t" in done and accounted and (c["Received"] >= n or now - max(done["t"][3], last_rx) > HOST_QUIET_S):
                break
            if now - t0 > timeout:
                raise RuntimeError(f"{n} frames not accounted for after {timeout:.0f} s: {c}")
            time.sleep(POLL_S)
        if first is None:
            raise RuntimeError(f"no frame of {n} reached the reconstructor: {self.text('Message_RBV')}")
        stitched, unpositioned = self.mosaic_counts()
        deadline = time.monotonic() + 30
        while stitched + unpositioned < c["Processed"] and time.monotonic() < deadline:
            time.sleep(0.05)
            stitched, unpositioned = self.mosaic_counts()
        time.sleep(0.15)  # one more 10 Hz status scan: final counters and latency
        p50, p99 = float(self.get("LatencyP50_RBV")), float(self.get("LatencyP99_RBV"))
        s = Stream(sent=n, period=1.0 / rate if rate else 0.0, counters=self.counters(), peak_backlog=watch.peak,
                   backlog_at_last_rx=at_last, t0=t0, first=first, last_rx=last_rx, done=now,
                   acquired=t0 + done["t"][2], p50_ms=p50, p99_ms=p99)
        return s, stitched, unpositioned


#: object pixel size the host benchmark stitches with (metres)
HOST_PIXEL = 1e-8


def host_zero_loss(s: Stream, backlog: int) -> bool:
    """Every uniqueId received and processed (Missed 0, Dropped 0, Rejected 0), the books balanced, and
    the queue at most SUSTAINED_QUEUE full (processing kept pace)."""
    c = s.counters
    return (c["Received"] == s.sent and c["Processed"] == s.sent and c["Missed"] == 0 and c["Dropped"] == 0
            and c["Rejected"] == 0 and s.balanced and s.peak_backlog <= SUSTAINED_QUEUE * backlog)


def host_step(p: HostPipeline, rate: float, secs: float) -> dict:
    """One paced step of the zero-loss search: BacklogLimit 0.5 s of frames at ``rate``."""
    backlog = max(2 * p.batch, round(SWEEP_BUFFER_S * rate))
    p.rec(BacklogLimit=backlog)
    n = max(4 * p.batch, round(rate * secs))
    s, stitched, unpositioned = p.run_frames(n, rate)
    all_stitched = stitched == n and unpositioned == 0
    ok = host_zero_loss(s, backlog) and all_stitched
    why = ("zero loss" if ok else "LOSS" if s.lost or s.counters['Missed'] else
           "queue over half full" if s.peak_backlog > SUSTAINED_QUEUE * backlog else "NOT ALL STITCHED")
    print(f"[host]   {rate:.0f}/s requested, {s.input_rate:.0f}/s posted: received {s.counters['Received']}/{n}, "
          f"processed {s.counters['Processed']}, stitched {stitched} (unpositioned {unpositioned}), {s.lost_note()}, "
          f"peak backlog {s.peak_backlog}/{backlog}: {why}", flush=True)
    return {**s.data(), "requested": round(rate, 1), "backlog_limit": backlog, "zero_loss": ok,
            "stitched": stitched, "unpositioned": unpositioned}


def host_search(p: HostPipeline, guess: float, ceiling: float, steps: int, secs: float) -> list[dict]:
    """Bisection over paced rates between 0 and ``ceiling``, from ``guess``: ``steps`` steps."""
    lo, hi, rate = 0.0, ceiling, min(guess, ceiling)
    out = []
    for _ in range(steps):
        r = host_step(p, rate, secs)
        out.append(r)
        if r["zero_loss"]:
            lo = rate
            rate = (rate + hi) / 2
        else:
            hi = rate
            rate = (lo + rate) / 2 if lo else rate / 2
    return out


def bench_host(net: EpicsNet, o: Opts) -> None:
    """For each frame size: the bare p4p client's rate and burst count (before and after), a burst at
    the producer's full speed into the reconstructor, and the highest paced rate with zero loss."""
    sizes = o.host_sizes or (HOST_SIZES_QUICK if o.quick else HOST_SIZES)
    n_burst = HOST_BURST_QUICK if o.quick else HOST_BURST
    steps, secs = (HOST_STEPS_QUICK, HOST_STEP_S_QUICK) if o.quick else (HOST_STEPS, HOST_STEP_S)
    bare_runs = 1 if o.quick else HOST_BARE_RUNS
    table = []
    for size in sizes:
        px, crop, binning = host_geometry(size)
        pre = ", ".join(([f"crop {crop}"] if crop else []) + ([f"bin {binning}"] if binning > 1 else [])) or "none"
        path = null_model(o.tmp / f"null{size}.onnx", px, crop, binning)
        runs = []
        with Producer(net, size, HOST_PIXEL) as prod:
            bare_client(net, prod, min(n_burst, 2000))  # untimed: a fresh producer's first run is slower
            bare = [bare_client(net, prod, n_burst) for _ in range(bare_runs)]
            for receive in o.receive:
                with HostPipeline(net, path, o, o.batch, backlog=min(1_000_000, max(100_000, 2 * n_burst)),
                                  prod=prod, receive=receive) as p:
                    p.run_frames(min(n_burst, 2000), 0.0)  # untimed: first batches, mosaic canvas
                    burst, stitched, unpositioned = p.run_frames(n_burst)
                    rx_rate = burst.counters["Received"] / max(burst.last_rx - burst.first, 1e-3)
                    print(f"[host] {size}x{size}, --receive {receive}: burst of {n_burst}: received "
                          f"{burst.counters['Received']} at {rx_rate:.0f}/s, {burst.lost_note()}", flush=True)
                    ceiling0 = float(np.median([b.rate for b in bare[:bare_runs]]))
                    search = host_search(p, 0.9 * min(rx_rate, ceiling0), ceiling0, steps, secs)
                    runs.append((receive, burst, stitched, unpositioned, rx_rate, search, p.backend_used))
            bare += [bare_client(net, prod, n_burst) for _ in range(bare_runs)]
        # the bare client's rate swings by 2x between runs on this box: the median of runs before and after
        ceiling = float(np.median([b.rate for b in bare]))
        bare_note = " / ".join(f"{b.rate:.0f}/s" for b in bare)
        bare_rx = float(np.median([b.received for b in bare]))
        for receive, burst, stitched, unpositioned, rx_rate, search, backend in runs:
            ok = [r for r in search if r["zero_loss"]]
            best = max(ok, key=lambda r: r["input_rate"]) if ok else None
            sustained = best["input_rate"] if best else 0.0
            what = (f"{size}x{size} uint16 -> {px}x{px} ({pre}), null model, PublishRate 10, stitched, "
                    f"--receive {receive}")
            note = (f"bare p4p client, {bare_runs} runs before and {bare_runs} after (median): {bare_note}; "
                    + (f"at {best['requested']:.0f}/s requested: processed {best['processed']}/{best['sent']}, "
                       f"peak backlog {best['peak_backlog']}/{best['backlog_limit']}, stitched {best['stitched']} "
                       f"(unpositioned {best['unpositioned']}), "
                       f"latency p50 {best['p50_ms']:.0f} ms p99 {best['p99_ms']:.0f} ms" if best else
                       "no paced rate was sustained with zero loss")
                    + "; tried " + ", ".join(f"{r['requested']:.0f}" + ("" if r["zero_loss"] else " (no)")
                                             for r in search))
            row("host", f"highest rate sustained with zero loss, {what}", sustained, "frames/s", ceiling,
                "bare p4p client (Python monitor, no decode), same producer", note=note, size=size, model_px=px,
                crop=crop, bin=binning, backend=backend, batch=o.batch, receive=receive, bare=[vars(b) for b in bare],
                steps=search)
            c = burst.counters
            row("host", f"burst of {n_burst} at the producer's full speed: received, {what}", c["Received"], "frames",
                bare_rx, "bare p4p client, same burst",
                note=f"processed {c['Processed']}, {burst.lost_note()}; stitched {stitched}, unpositioned "
                     f"{unpositioned}; producer posted {burst.input_rate:.0f}/s, reconstructor received "
                     f"{rx_rate:.0f}/s; bare client received {' / '.join(str(b.received) for b in bare)} at "
                     f"{bare_note}",
                size=size, model_px=px, crop=crop, bin=binning, backend=backend, receive=receive,
                received_rate=round(rx_rate, 1), stitched=stitched, unpositioned=unpositioned,
                bare=[vars(b) for b in bare], **burst.data())
            table.append((size, pre, receive, ceiling, sustained, bare_rx, c["Received"], c["Processed"], burst.lost))
    print(f"\n[host] backend {o.backend}, batch {o.batch}, monitor queue {HOST_QUEUE}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end\n"
          "| frames | pre-processing | receive | bare p4p client | sustained, zero loss | ratio | burst: bare client "
          "received | burst: reconstructor received / processed / lost | ratio |\n|---|---|---|---|---|---|---|---|---|")
    for size, pre, receive, ceil, sus, brx, rx, pr, lost in table:
        print(f"| {size}² | {pre} | {receive} | {ceil:.0f}/s | {sus:.0f}/s | {100 * sus / ceil:.0f} % | {brx:.0f} of "
              f"{n_burst} | {rx} / {pr} / {lost} | {100 * rx / max(brx, 1):.0f} % |")


#: the profile's stages: (stage, files under ptychostream/ whose innermost frame puts a sample there);
#: protocols/ntnd.py is decode, except its encode (publish)
PROFILE_STAGES = (
    ("decode", ("protocols/ntnd.py",)),
    ("intake/queue", ("pipeline/receive.py", "pipeline/queue.py", "core/frames.py")),
    ("stack + pre-process", ("pipeline/batcher.py", "model/preprocess.py")),
    ("inference", ("model/infer.py", "model/backends/")),
    ("publish", ("pipeline/publish.py", "protocols/pva.py")),
    ("stitch", ("pipeline/stitch.py", "mosaic/")),
    ("ring (receive process)", ("pipeline/ring.py", "pipeline/receive_process.py")),
)
#: stages counted per frame received (the rest per frame processed); so are all of the receive process's
PROFILE_PER_RECEIVED = ("decode", "intake/queue", "ring (receive process)")
#: the stage prefix of the samples taken in the receive process (py-spy --subprocesses)
PROFILE_CHILD = "receive process: "


#: innermost frames that wait (py-spy's idle detection misses some): not work of any stage
PROFILE_WAITS = re.compile(r"^(Condition\.wait|Event\.wait|\w*Selector\.select|select|sleep|Queue\.get|"
                           r"_wait_for_tstate_lock|wait) ")


def profile_stage(stack: list[str]) -> str:
    """The stage of one py-spy stack (frames ``func (path:line)``, root first): its innermost frame in
    the ptychostream package decides; 'other (package)' / 'outside the package' otherwise, and
    'waiting' when the innermost frame of all is a wait."""
    if stack and PROFILE_WAITS.match(stack[-1]):
        return "waiting (not counted as work)"
    for frame in reversed(stack):
        m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
        if not m or "/ptychostream/" not in m.group(2):
            continue
        func, rel = m.group(1), m.group(2).rsplit("/ptychostream/", 1)[1]
        if rel == "protocols/ntnd.py" and func.startswith("encode"):
            return "publish"
        for stage, files in PROFILE_STAGES:
            if any(rel.startswith(f) for f in files):
                return stage
        return "other (package: status, device, messages)"
    return "outside the package (p4p, threads)"


def _short(frame: str) -> str:
    """``func (path:line)`` with the path cut to its package (ptychostream/..., p4p/..., numpy/...)."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    path = m.group(2)
    for cut in ("/site-packages/", "/src/", "/lib/python"):
        if cut in path:
            path = path.rsplit(cut, 1)[1]
            break
    return f"{m.group(1)} ({path})"


def read_pyspy_raw(path: Path) -> dict[str, tuple[int, dict[str, int]]]:
    """Samples per stage from py-spy's raw (collapsed) output, with the samples per innermost frame."""
    out: dict[str, tuple[int, dict[str, int]]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        stage = profile_stage(frames)
        if any(f.startswith("process ") and "spawn_main" in f for f in frames):  # the receive process
            stage = PROFILE_CHILD + stage
        k, leaves = out.get(stage, (0, {}))
        leaf = _short(frames[-1])
        leaves[leaf] = leaves.get(leaf, 0) + int(count)
        out[stage] = (k + int(count), leaves)
    return out


def bench_profile(net: EpicsNet, o: Opts) -> None:
    """py-spy on the reconstructor at 128 px while the producer posts at a paced rate: us/frame per stage."""
    spy = _console_script("py-spy")
    if spy is None:
        print("[profile] skipped: py-spy not installed (pip install py-spy)", flush=True)
        return
    size = HOST_MODEL_PX
    secs = PROFILE_S_QUICK if o.quick else PROFILE_S
    receive = o.receive[-1]
    px, crop, binning = host_geometry(size)
    path = null_model(o.tmp / f"null{size}.onnx", px, crop, binning)
    host = [r for r in ROWS if r["bench"] == "host" and r["data"].get("size") == size and "steps" in r["data"]
            and r["data"].get("receive", "thread") == receive]
    with Producer(net, size, HOST_PIXEL) as prod:
        bare = bare_client(net, prod, HOST_BURST_QUICK if o.quick else HOST_BURST)
        rate = o.profile_rate or (PROFILE_SHARE * host[-1]["value"] if host and host[-1]["value"] > 0 else 0.0)
        with HostPipeline(net, path, o, o.batch, backlog=100_000, prod=prod, receive=receive) as p:
            p.run_frames(2000, 0.0)  # untimed warm-up
            if not rate:  # the host benchmark's search, short
                burst, _, _ = p.run_frames(HOST_BURST_QUICK)
                rx_rate = burst.counters["Received"] / max(burst.last_rx - burst.first, 1e-3)
                steps = host_search(p, 0.9 * min(rx_rate, bare.rate), bare.rate, 2 if o.quick else 4,
                                    HOST_STEP_S_QUICK if o.quick else HOST_STEP_S)
                rate = PROFILE_SHARE * max((r["input_rate"] for r in steps if r["zero_loss"]), default=0.5 * rx_rate)
            p.rec(BacklogLimit=max(2 * o.batch, round(SWEEP_BUFFER_S * rate)))
            n = round(rate * (secs + 2.0))
            result: dict = {}
            runner = threading.Thread(target=lambda: result.update(s=p.run_frames(n, rate)), daemon=True)
            runner.start()
            deadline = time.monotonic() + 10
            while p.counters()["Received"] < rate * 0.5 and time.monotonic() < deadline:  # the stream is on
                time.sleep(POLL_S)
            raw = o.tmp / "pyspy.txt"
            assert p.rec_ioc is not None and p.rec_ioc.proc is not None
            c0 = p.counters()
            spied = subprocess.run([spy, "record", "--pid", str(p.rec_ioc.proc.pid), "--duration", f"{secs:g}",
                                    "--rate", str(PROFILE_HZ), "--format", "raw", "--output", str(raw),
                                    "--full-filenames", "--nonblocking",
                                    *(["--subprocesses"] if receive == "process" else [])],
                                   check=False, capture_output=True, text=True)
            c1 = p.counters()
            runner.join(120 + 2 * n / max(rate, 1000.0))
    if spied.returncode != 0 or not raw.exists():
        print(f"[profile] py-spy failed (rc {spied.returncode}): {spied.stderr.strip()[-500:]}", flush=True)
        return
    s, _, _ = result["s"]
    received, processed = c1["Received"] - c0["Received"], c1["Processed"] - c0["Processed"]
    found = read_pyspy_raw(raw)
    samples = {k: v[0] for k, v in found.items()}
    top = {k: sorted(v[1].items(), key=lambda kv: -kv[1])[:3] for k, v in found.items()}
    total = sum(samples.values())
    order = [st for st, _ in PROFILE_STAGES] + sorted(k for k in samples if k not in dict(PROFILE_STAGES))
    per = {}
    for stage in order:
        k = samples.get(stage, 0)
        by_rx = stage in PROFILE_PER_RECEIVED or stage.startswith(PROFILE_CHILD)
        frames = received if by_rx else processed
        us = k / PROFILE_HZ / max(frames, 1) * 1e6
        per[stage] = us
        row("profile", f"{stage}, {size}x{size} uint16, null model, {rate:.0f} frames/s paced, --receive {receive}",
            us, "us/frame",
            note=f"{k} of {total} py-spy samples ({100 * k / max(total, 1):.0f} %, {k / PROFILE_HZ / secs:.2f} cores); "
                 f"per frame {'received' if by_rx else 'processed'} "
                 f"({frames} in {secs:g} s)", stage=stage, samples=k, total_samples=total, frames=frames,
            received=received, processed=processed, seconds=secs, hz=PROFILE_HZ, rate=round(rate, 1),
            lost=s.lost, receive=receive, top=top.get(stage, []))
    print(f"\n[profile] py-spy {PROFILE_HZ} Hz for {secs:g} s on the reconstructor (pid of the ioc subprocess"
          f"{' and its receive process' if receive == 'process' else ''}), --receive {receive}, "
          f"{rate:.0f} frames/s paced, {received} received / {processed} processed meanwhile, lost {s.lost} "
          f"of the run's {s.sent}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
          "| stage | us/frame | samples | share | innermost frames (samples) |\n|---|---|---|---|---|")
    for stage in order:
        k = samples.get(stage, 0)
        leaves = "; ".join(f"`{f}` {c}" for f, c in top.get(stage, []))
        print(f"| {stage} | {per[stage]:.1f} | {k} | {100 * k / max(total, 1):.0f} % | {leaves} |")


# -- stitching -----------------------------------------------------------------------------------
def bench_stitch(o: Opts) -> None:
    from ptychostream.mosaic.stitch import Stitcher
    from ptychostream.sim.scans import scan_positions

    n, size = (256 if o.quick else 4000), o.size
    pixel = 1e-8
    for canvas in ((1024,) if o.quick else (2048, 4096)):
        pos = scan_positions("spiral", 3 * pixel, n, seed=0)
        half = (canvas - size - 2) * pixel / 2
        pos = np.clip(pos, -half, half)
        rng = np.random.default_rng(0)
        phase = rng.uniform(-1, 1, (64, size, size)).astype(np.float32)
        st = Stitcher(pixel, (size, size), extent_m=(-canvas * pixel / 2, canvas * pixel / 2,
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
        row("stitch", f"Stitcher.add, {size}x{size} patches, batch 64, {canvas}x{canvas} canvas", rate, "patches/s",
            note=f"mosaic() {ms:.0f} ms", mosaic_ms=round(ms, 1))
    # every offset and domain, compiled splat and numpy's, 64² patches with amplitude in batches of 32
    n = 256 if o.quick else 2560
    rng = np.random.default_rng(1)
    phase = rng.standard_normal((32, 64, 64)).astype(np.float32)
    amp = rng.random((32, 64, 64)).astype(np.float32)
    pos = (rng.random((n, 2)) - 0.5) * 300 * pixel
    box = (-200 * pixel, 200 * pixel, -200 * pixel, 200 * pixel)
    for domain in ("phase", "complex"):
        for offset in ("mean", "overlap"):
            rates = {}
            for compiled in (False, True):
                st = Stitcher(pixel, (64, 64), offset=offset, domain=domain, extent_m=box)
                st.compiled = compiled
                st.add(phase, pos[:32], amp)  # the kernel loaded, the scratch allocated
                t0 = time.perf_counter()
                for k in range(0, n, 32):
                    st.add(phase, pos[k:k + 32], amp)
                rates[compiled] = n / (time.perf_counter() - t0)
            row("stitch", f"Stitcher.add, 64x64 patches with amplitude, batch 32, offset {offset}, domain {domain}, "
                f"compiled splat", rates[True], "patches/s", rates[False], "numpy's splat, same run",
                note=f"{1e6 / rates[True]:.1f} against {1e6 / rates[False]:.1f} us per patch", offset=offset,
                domain=domain)


# -- plot ------------------------------------------------------------------------------------------
def plot_sweep(png: str, title: str) -> None:
    """Achieved rate and lost frames, and p50/p99 latency, against the input rate of the sweep."""
    steps = [r for r in ROWS if r["bench"] == "sweep" and "fraction" in r["data"] and "sent" in r["data"]]
    if not steps:
        print(f"--plot {png}: no sweep in this run (add sweep to --only)", flush=True)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["data"]["input_rate"] for r in steps]
    fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    ax.plot(x, [r["value"] for r in steps], "o-", label="processed (achieved)")
    ax.plot(x, x, ":", color="grey", label="processed = input")
    ax.axhline(steps[0]["ceiling"], ls="--", color="C2", label=steps[0]["ceiling_what"])
    ax.set_xlabel("input rate (frames/s)")
    ax.set_ylabel("frames/s")
    ax.set_ylim(bottom=0)
    lost = ax.twinx()
    lost.plot(x, [r["data"]["lost"] for r in steps], "s--", color="C3", label="lost frames")
    lost.set_ylabel("frames lost (dropped + rejected + not received)", color="C3")
    lost.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    more = lost.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8)
    ax.set_title("rate and loss")
    lat.plot(x, [max(r["data"]["p50_ms"], 1e-3) for r in steps], "o-", label="LatencyP50_RBV")
    lat.plot(x, [max(r["data"]["p99_ms"], 1e-3) for r in steps], "s-", label="LatencyP99_RBV")
    lat.set_yscale("log")
    lat.set_xlabel("input rate (frames/s)")
    lat.set_ylabel("latency (ms)")
    lat.legend(fontsize=8)
    lat.set_title("latency (queue entry to inference done)")
    fig.suptitle(title, fontsize=9)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"sweep plot: {png}", flush=True)


def _fractions(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("fractions must be positive numbers, e.g. 0.25,0.5,1,1.5")
    return values


def _rates(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(",") if v)
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("rates must be positive numbers of frames/s, e.g. 2000,4000,8000")
    return values


def _sizes(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v)
    if not values or any(v < 8 for v in values):
        raise argparse.ArgumentTypeError("sizes must be frame sizes in pixels, e.g. 64,128,256,516")
    return values


def _receivers(text: str) -> tuple[str, ...]:
    names = tuple(t for t in text.split(",") if t)
    bad = [n for n in names if n not in ("thread", "process")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"receivers are thread and process, not {','.join(bad) or text!r}")
    return names


def _size(text: str) -> int:
    size = int(text)
    if size < 16 or size % 16:
        raise argparse.ArgumentTypeError("--size must be a multiple of 16 (the model halves it 4 times), e.g. 64 or 128")
    return size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the harness")
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated benchmarks (default: all of "
                                                              f"{','.join(BENCHES)})")
    ap.add_argument("--backend", default="ONNXRuntime-CPU", choices=BACKEND_CHOICES,
                    help="the reconstructor's Backend, also used for the inference ceiling (default ONNXRuntime-CPU)")
    ap.add_argument("--size", type=_size, default=128, help="frame (and model input) size in pixels (default 128)")
    ap.add_argument("--fractions", type=_fractions, help="sweep input rates as fractions of the inference ceiling "
                                                          f"(default {','.join(map(str, SWEEP_FRACTIONS))}; "
                                                          f"--quick {','.join(map(str, SWEEP_FRACTIONS_QUICK))})")
    ap.add_argument("--rates", type=_rates, help="sweep input rates in frames/s (instead of --fractions)")
    ap.add_argument("--step-s", type=float, help=f"sweep: seconds of frames per rate (default {SWEEP_STEP_S:g}; "
                                                  f"--quick {SWEEP_STEP_S_QUICK:g})")
    ap.add_argument("--max-rate", type=float, help="swap: stream at most this many frames/s (default: half the "
                                                    "inference ceiling)")
    ap.add_argument("--host-sizes", type=_sizes, help="host: frame sizes in pixels (default "
                                                       f"{','.join(map(str, HOST_SIZES))}; --quick "
                                                       f"{','.join(map(str, HOST_SIZES_QUICK))})")
    ap.add_argument("--profile-rate", type=float, default=0.0,
                    help=f"profile: the paced rate, frames/s (default: {PROFILE_SHARE:g} x the sustained rate at "
                         "128 px, from the host rows if host ran first, else from a short search)")
    ap.add_argument("--receive", type=_receivers, default=("thread",),
                    help="host: the receivers to measure, comma-separated, each next to the same bare client "
                         "(thread, process; default thread); profile: the last of them")
    ap.add_argument("--batch", type=int, default=0,
                    help="the reconstructor's BatchSize and the ceilings' batch (default 32; --quick 16)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--plot", metavar="FILE.png", help="plot the sweep (rate, loss and latency against input rate)")
    args = ap.parse_args(argv)
    only = [b for b in args.only.split(",") if b]
    unknown = set(only) - set(BENCHES)
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHES)}")
    reason = backend_unavailable_reason(args.backend)
    if reason is not None and set(only) & {"pipeline", "sweep", "burst", "swap", "host", "profile"}:
        ap.error(f"--backend {args.backend} cannot run here: {reason}")
    machine = (f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"backend {args.backend}, {args.size}x{args.size} frames")
    print(f"# machine: {machine}", flush=True)
    global JSON_OUT
    JSON_OUT = Path(args.json) if args.json else None
    net = EpicsNet(4)
    with tempfile.TemporaryDirectory() as tmp:
        o = Opts(quick=args.quick, backend=args.backend, size=args.size, tmp=Path(tmp), fractions=args.fractions,
                 rates=args.rates, step_s=args.step_s, max_rate=args.max_rate, host_sizes=args.host_sizes,
                 profile_rate=args.profile_rate, receive=args.receive, batch_size=args.batch)
        for bench in BENCHES:
            if bench not in only:
                continue
            if bench == "stitch":
                bench_stitch(o)
            else:
                globals()[f"bench_{bench}"](net, o)
    print("\n| bench | what | value | ceiling (same run) | ratio | note |\n|---|---|---|---|---|---|")
    for r in ROWS:
        ceil = f"{r['ceiling']} ({r['ceiling_what']})" if r["ceiling"] else ""
        ratio = f"{100 * r['ratio']:.0f}%" if r["ratio"] else ""
        print(f"| {r['bench']} | {r['what']} | {r['value']} {r['unit']} | {ceil} | {ratio} | {r['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=1))
    if args.plot:
        plot_sweep(args.plot, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
