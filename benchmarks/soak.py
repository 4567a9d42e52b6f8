#!/usr/bin/env python3
"""Soak: stream many frames through the reconstructor, sample its memory, account for every frame.

  python benchmarks/soak.py --probe 400,800,1200 --model null        # short steps: the highest zero-loss rate
  python benchmarks/soak.py --frames 1000000 --model null --rate 800 --out docs/soak-null.json --plot docs/soak-rss.png
  python benchmarks/soak.py --frames 6000 --rate 0 --model shipped   # as fast as it goes: the sustained rate
  python benchmarks/soak.py --minutes 30 --rate 150 --model shipped --out docs/soak-shipped.json

The producer is the simulated detector (simdet, paced by AcquirePeriod: ``--rate`` frames/s; 0 =
as fast as it publishes, with a queue that holds every frame), the consumer the reconstructor IOC
(``benchmarks/run.py``'s ``Pipeline``: both on a private loopback EPICS network), its mosaic
fed by the frames' position attributes. Models: ``null`` (ONNX Identities: the device without
inference), ``tiny`` (a 2-channel, depth-2 PtychoNN-class net) or ``shipped``
(``src/ptychostream/models/ptychonn_edge.onnx``); null and tiny take what the shipped model takes
(the central 64x64 of the frame, amplitude and phase heads), so the mosaic costs the same.

Every ``--sample-s`` seconds (10) it records the reconstructor's (and simdet's) RSS (psutil if
installed, else VmRSS of /proc/PID/status), threads, open fds, CPU seconds, the load averages and
the counters. At the end it checks that every frame is accounted for:

  sent (simdet NumImagesCounter_RBV) = Received + Missed
  Received = Processed + Dropped + Rejected + Backlog, with Backlog 0 after draining
  lost = (sent - Received) + Dropped + Rejected = 0
  Processed = Stitched + Unpositioned + PositionErrors once the mosaic has drained, with
  Unpositioned + PositionErrors = 0 (frames the stitch stage cannot take count as Unpositioned)

and judges the RSS (``RSS_RULE``): the samples after the first ``WARMUP_FRACTION`` of the run are
flat when their max/min - 1 is at most ``FLAT_SPREAD`` and their least-squares slope (MiB/min),
projected over an hour, is at most ``FLAT_SLOPE_PER_H`` of their median. Exit status 0 when the
frames are all accounted for and none is lost or left out of the mosaic (and, with
--require-flat, the RSS is flat); 1 otherwise. ``--rejudge FILE.json`` re-applies the rule to an
earlier result and plots it again. ``--sockets`` lists the sockets a simdet and a reconstructor
bind on loopback and probes them through 127.0.0.1 and through the host's own addresses.

``--trace-malloc N`` starts tracemalloc (N frames deep) in the reconstructor through a
sitecustomize switch (env ``PTYCHOSTREAM_SOAK_TRACE``) and writes a snapshot every
``--trace-every`` seconds, with a gc census (live ImageFrame and BatchResult objects and who holds
the first of each that the garbage collector lists; the largest dicts, lists, sets and deques and
who holds them); the JSON then lists the allocation sites that grew most between the snapshot at
the end of the warm-up and the last one, and every census. ``--census`` takes the census alone,
without tracemalloc's slow-down.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.cli.demo import SHIPPED
from ptychostream.model.backends import BACKEND_CHOICES
from ptychostream.testing import EpicsNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: Pipeline, Opts, ceilings, the sustained-rate rule)

MODELS = ("null", "tiny", "shipped")
#: --stall's longest stop: below the 5 s timeout of the harness's reads of the reconstructor's PVs
STALL_MAX_S = 4.5
#: RSS judgement: samples after this share of the run (by time) ...
WARMUP_FRACTION = 0.2
#: ... are flat when max/min - 1 is at most this ...
FLAT_SPREAD = 0.05
#: ... and their least-squares slope, projected over an hour, is at most this share of their median
#: (a short run stays within FLAT_SPREAD of a slow leak: finding 10's 0.76 MB/min is 3 % in 8 min)
FLAT_SLOPE_PER_H = 0.05
RSS_RULE = (f"samples after the first {WARMUP_FRACTION:.0%} of the run (by time): flat when max/min - 1 <= "
            f"{FLAT_SPREAD:.0%} and |least-squares slope| x 60 min <= {FLAT_SLOPE_PER_H:.0%} of their median")
#: --probe: seconds of frames per rate, and the queue as seconds of frames at that rate
PROBE_STEP_S = 30.0
BACKLOG_S = 2.0
#: --probe: a rate is sustained only if the stitch stage's lag did not grow by more than this share
#: of the input rate (a least-squares slope; a stage a little slower than the input falls behind
#: slowly, and its inbox holds the frames and their outputs meanwhile)
STITCH_LAG_GROWTH = 0.01
#: counters that not every version of the reconstructor has (read if present)
EXTRA_COUNTERS = ("OutOfOrder", "Duplicates", "SourceRestarts", "NonFinite", "RefusedPuts", "PositionWait")
#: seconds the mosaic may take, after the last frame is inferred, to account for every frame
MOSAIC_DRAIN_S = 120.0

SITECUSTOMIZE = textwrap.dedent('''
    """ptychostream soak: tracemalloc snapshots and a gc census of the reconstructor IOC
    (env PTYCHOSTREAM_SOAK_TRACE=folder:depth:seconds)."""
    import collections, gc, json, os, sys, threading, time, tracemalloc
    _spec = os.environ.get("PTYCHOSTREAM_SOAK_TRACE", "")

    def _kind(t):
        return f"{t.__module__}.{t.__qualname__}" if isinstance(t.__module__, str) else str(t)

    def _chain(obj, ignore, depth=5):
        """Who holds ``obj``: type names (and a few dict keys) up to ``depth`` referrers up."""
        out, seen = [], set(ignore) | {id(obj)}
        for _ in range(depth):
            refs = [r for r in gc.get_referrers(obj) if id(r) not in seen and type(r).__name__ != "frame"]
            if not refs:
                break
            obj = max(refs, key=lambda r: len(r) if hasattr(r, "__len__") else 0)
            seen.add(id(obj))
            keys = list(obj)[:6] if isinstance(obj, dict) else None
            out.append({"type": _kind(type(obj)), "len": len(obj) if hasattr(obj, "__len__") else None,
                        "keys": [str(k)[:40] for k in keys or []]})
        return out

    def _census(path):
        objs = gc.get_objects()
        kinds = collections.Counter(_kind(type(o)) for o in objs)
        info = {"t": time.time(), "top": kinds.most_common(25)}
        for name in ("ImageFrame", "BatchResult"):
            found = [o for o in objs if type(o).__name__ == name]
            info[name] = len(found)
            if found:
                info[name + "_held_by"] = _chain(found[0], {id(objs), id(found)})
            del found
        big = sorted((o for o in objs if isinstance(o, (dict, list, set, collections.deque)) and len(o) > 5000),
                     key=len, reverse=True)[:8]
        info["largest_containers"] = [{"type": _kind(type(o)), "len": len(o),
                                       "held_by": _chain(o, {id(objs), id(big)}, depth=3)} for o in big]
        del objs, big
        with open(path, "w") as fh:
            json.dump(info, fh)

    if _spec and "ioc" in sys.orig_argv:
        _folder, _depth, _every = _spec.split(":")
        if int(_depth):  # 0: the gc census alone
            tracemalloc.start(int(_depth))

        def _dump():
            k = 0
            while True:
                time.sleep(float(_every))
                stem = os.path.join(_folder, f"snap-{k:05d}-{time.time():.1f}")
                if tracemalloc.is_tracing():
                    tracemalloc.take_snapshot().dump(stem + ".tm")
                _census(stem + ".json")
                k += 1

        threading.Thread(target=_dump, name="soak-tracemalloc", daemon=True).start()
''')


# -- process probes ------------------------------------------------------------------------------
def _status_fields(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (psutil if installed, else VmRSS of /proc/PID/status)."""
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:
        return int(_status_fields(pid)["VmRSS"].split()[0]) / 1024
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def proc_info(pid: int) -> dict[str, float]:
    """RSS (MiB), threads, open file descriptors and CPU seconds of ``pid``."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"rss_mib": round(rss_mib(pid), 2), "threads": int(_status_fields(pid)["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "cpu_s": round((int(stat[11]) + int(stat[12])) / ticks, 2)}


# -- models ---------------------------------------------------------------------------------------
#: the null and tiny models take what the shipped model takes: the central CROP pixels of the frame,
#: two heads of that size, so that stitching costs what it costs behind the shipped model
CROP = 64
HEADS = ("amplitude", "phase")
CROP_META = {"ptychostream.preprocess": {"crop_size": CROP}}


def null_model(path: Path) -> str:
    """ONNX Identities from the (n, 1, CROP, CROP) input to each of HEADS: the device without inference."""
    import onnx
    from onnx import TensorProto, helper

    from ptychostream.model.zoo import ir_version_for

    shape: list[int | str] = ["N", 1, CROP, CROP]
    graph = helper.make_graph([helper.make_node("Identity", ["input"], [h]) for h in HEADS], "null",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, shape) for h in HEADS])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ptychostream.soak")
    model.ir_version = ir_version_for(17)
    for key, value in CROP_META.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(model, str(path))
    return str(path)


def model_path(kind: str, tmp: Path) -> str:
    """The model file for ``--model``."""
    if kind == "null":
        return null_model(tmp / "null.onnx")
    if kind == "tiny":
        from ptychostream.model.zoo import build_ptychonn_onnx

        return build_ptychonn_onnx(str(tmp / "tiny.onnx"), size=CROP, heads=HEADS, base_channels=2, depth=2,
                                   metadata=CROP_META)
    return str(SHIPPED)


# -- the RSS verdict ------------------------------------------------------------------------------
def judge_rss(t_s: list[float], rss: list[float]) -> dict[str, Any]:
    """Apply ``RSS_RULE`` to samples (seconds since the stream started, MiB)."""
    t, r = np.asarray(t_s, float), np.asarray(rss, float)
    out: dict[str, Any] = {"rule": RSS_RULE, "warmup_fraction": WARMUP_FRACTION, "flat_spread": FLAT_SPREAD,
                           "samples": int(len(r))}
    if len(r) == 0:
        return out | {"flat": None, "note": "no samples"}
    out |= {"first_mib": round(float(r[0]), 1), "last_mib": round(float(r[-1]), 1),
            "peak_mib": round(float(r.max()), 1)}
    after = t >= t[0] + WARMUP_FRACTION * (t[-1] - t[0])
    ta, ra = t[after], r[after]
    out |= {"samples_after_warmup": int(len(ra)), "warmup_end_s": round(float(ta[0]), 1) if len(ta) else None}
    if len(ra) < 3:
        return out | {"flat": None, "note": "fewer than 3 samples after the warm-up: run longer or sample faster"}
    slope = float(np.polyfit(ta / 60.0, ra, 1)[0])
    spread = float(ra.max() / ra.min() - 1)
    per_hour = abs(slope) * 60.0 / float(np.median(ra))
    return out | {"min_mib": round(float(ra.min()), 1), "max_mib": round(float(ra.max()), 1),
                  "spread": round(spread, 4), "slope_mib_per_min": round(slope, 4),
                  "slope_share_per_hour": round(per_hour, 4),
                  "growth_over_judged_mib": round(slope * float(ta[-1] - ta[0]) / 60.0, 1),
                  "flat": spread <= FLAT_SPREAD and per_hour <= FLAT_SLOPE_PER_H}


# -- sampling and progress --------------------------------------------------------------------------
MOSAIC = ("Stitched", "Unpositioned", "PositionErrors")


def mosaic_counts(p: bench.Pipeline) -> dict[str, int]:
    """Stitched_RBV, Unpositioned_RBV (frames the stitch stage could not take count here too) and
    PositionErrors_RBV."""
    ctx: Any = p.ctx
    return {k: int(v) for k, v in zip(MOSAIC, ctx.get([f"{p.REC}{k}_RBV" for k in MOSAIC]))}


def stitch_lag(c: dict[str, int], m: dict[str, int]) -> int:
    """Frames inferred that the mosaic has not accounted for yet (still in the stitch stage's inbox)."""
    return c["Processed"] - sum(m.values())


@dataclass
class Sampler:
    """Called at every counter poll of ``Pipeline.stream``: a sample every ``every`` s, progress."""

    p: bench.Pipeline
    total: int
    every: float
    quiet: bool = False
    samples: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0
    _next: float = 0.0
    _bar: Any = None
    _task: Any = None
    #: (at_s, for_s): stop the reconstructor (SIGSTOP) ``at_s`` into the stream for ``for_s`` s, a load
    #: spike on demand: the frames pile up in its queues and must all come back out
    stall: tuple[float, float] | None = None
    stalled: list[float] = field(default_factory=list)

    def __enter__(self) -> "Sampler":
        if sys.stdout.isatty() and not self.quiet:
            from rich import progress as rp

            self._bar = rp.Progress(rp.TextColumn("soak"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                    rp.TimeRemainingColumn(), rp.TextColumn("{task.fields[info]}"))
            self._bar.start()
            self._task = self._bar.add_task("soak", total=self.total, info="")
        self.t0 = self._next = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    @property
    def peak_stitch_lag(self) -> int:
        """The largest stitch lag sampled so far."""
        return max((s["stitch_lag"] for s in self.samples), default=0)

    def sample(self, now: float, c: dict[str, int]) -> dict[str, Any]:
        """Take one sample (processes, load, counters ``c``, the mosaic's counts) and keep it."""
        assert self.p.rec_ioc is not None and self.p.rec_ioc.proc is not None
        assert self.p.sim_ioc is not None and self.p.sim_ioc.proc is not None
        rec, sim = proc_info(self.p.rec_ioc.proc.pid), proc_info(self.p.sim_ioc.proc.pid)
        m = mosaic_counts(self.p)
        s = {"t_s": round(now - self.t0, 2), **rec, "sim_rss_mib": sim["rss_mib"], "sim_cpu_s": sim["cpu_s"],
             "load": [round(v, 2) for v in os.getloadavg()], **{k.lower(): v for k, v in c.items()},
             **{k.lower(): v for k, v in m.items()}, "stitch_lag": stitch_lag(c, m)}
        self.samples.append(s)
        return s

    def __call__(self, now: float, c: dict[str, int]) -> None:
        if self.stall is not None and not self.stalled and now - self.t0 >= self.stall[0]:
            self._stall(now)
        if now < self._next:
            return
        self._next += self.every
        s = self.sample(now, c)
        if self.quiet:
            return
        info = (f"RSS {s['rss_mib']:.0f} MiB, backlog {c['Backlog']}, stitch lag {s['stitch_lag']}, "
                f"dropped {c['Dropped']}, load {s['load'][0]:.2f}")
        if self._bar is not None:
            self._bar.update(self._task, completed=c["Processed"], info=info)
        else:
            print(f"[soak] {s['t_s']:8.0f} s  processed {c['Processed']}/{self.total}  {info}", flush=True)


    def _stall(self, now: float) -> None:
        assert self.stall is not None and self.p.rec_ioc is not None and self.p.rec_ioc.proc is not None
        pid = self.p.rec_ioc.proc.pid
        self.stalled.append(round(now - self.t0, 2))
        os.kill(pid, signal.SIGSTOP)
        timer = threading.Timer(self.stall[1], os.kill, (pid, signal.SIGCONT))
        timer.daemon = True
        timer.start()
        if not self.quiet:
            print(f"[soak] {now - self.t0:8.0f} s  reconstructor stopped (SIGSTOP) for {self.stall[1]:g} s", flush=True)


def drain_mosaic(p: bench.Pipeline, processed: int, timeout: float) -> tuple[dict[str, int], float]:
    """Wait until the mosaic has accounted for every processed frame; its counts and the seconds it took."""
    t0 = time.perf_counter()
    p.wait_stitched(processed, timeout=timeout)
    deadline = time.monotonic() + 1.0  # the 10 Hz status scan catches up
    m = mosaic_counts(p)
    while sum(m.values()) < processed and time.monotonic() < deadline:
        time.sleep(0.1)
        m = mosaic_counts(p)
    return m, time.perf_counter() - t0


# -- tracemalloc ------------------------------------------------------------------------------------
def trace_report(folder: Path, warmup_s: float, top: int = 15) -> dict[str, Any]:
    """What the reconstructor's snapshots say: the allocation sites that grew most between the first
    snapshot after ``warmup_s`` and the last, and each gc census (live ImageFrames, who holds the oldest)."""
    import tracemalloc

    snaps = sorted(folder.glob("snap-*.tm"))
    census = [json.loads(p.read_text()) for p in sorted(folder.glob("snap-*.json"))]
    if len(snaps) < 2:
        return {"growth": [], "census": census}
    stamp = [float(p.stem.split("-")[2]) for p in snaps]
    first = next((i for i, t in enumerate(stamp) if t - stamp[0] >= warmup_s), 0)
    keep = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    a = tracemalloc.Snapshot.load(str(snaps[first])).filter_traces(keep)
    b = tracemalloc.Snapshot.load(str(snaps[-1])).filter_traces(keep)
    rows = [{"growth_kib": round(d.size_diff / 1024, 1), "size_kib": round(d.size / 1024, 1),
             "count_diff": d.count_diff, "span_s": round(stamp[-1] - stamp[first], 1),
             "traceback": [f"{f.filename}:{f.lineno}" for f in d.traceback][-8:]}
            for d in b.compare_to(a, "traceback")[:top]]
    return {"growth": rows, "census": census}


# -- one soak ---------------------------------------------------------------------------------------
def extra_counters(p: bench.Pipeline) -> dict[str, int]:
    """The EXTRA_COUNTERS this reconstructor has."""
    out = {}
    ctx: Any = p.ctx
    for name in EXTRA_COUNTERS:
        try:
            out[name] = int(ctx.get(f"{p.REC}{name}_RBV", timeout=1.0))
        except Exception:  # not in this version's db
            continue
    return out


@dataclass
class Run:
    """One acquisition through the device: the stream's counters, the samples, the mosaic's books."""

    stream: bench.Stream
    sent: int
    sampler: Sampler
    mosaic: dict[str, int]
    mosaic_drain_s: float

    @property
    def accounting(self) -> dict[str, Any]:
        """The identities every run must satisfy (see the module docstring)."""
        c, m = self.stream.counters, self.mosaic
        return {"sent": self.sent, "sent_eq_received_plus_missed": self.sent == c["Received"] + c["Missed"],
                "received_eq_processed_dropped_rejected_backlog": self.stream.balanced,
                "backlog_end": c["Backlog"], "lost": (self.sent - c["Received"]) + c["Dropped"] + c["Rejected"],
                "processed_eq_stitched_unpositioned_errors": c["Processed"] == sum(m.values()),
                "not_stitched": m["Unpositioned"] + m["PositionErrors"], **{k.lower(): v for k, v in m.items()},
                "peak_stitch_lag": self.sampler.peak_stitch_lag,
                "stitch_lag_growth_per_s": round(self.stitch_lag_growth, 2),
                "mosaic_drain_s": round(self.mosaic_drain_s, 1)}

    @property
    def stitch_lag_growth(self) -> float:
        """Least-squares slope (frames/s) of the stitch stage's lag while frames streamed."""
        during = self.sampler.samples[:-1]  # the last sample is taken after the mosaic drained
        if len(during) < 3:
            return 0.0
        return float(np.polyfit([x["t_s"] for x in during], [x["stitch_lag"] for x in during], 1)[0])

    @property
    def ok(self) -> bool:
        """Every frame accounted for, none lost, every one stitched."""
        a = self.accounting
        return bool(a["sent_eq_received_plus_missed"] and a["received_eq_processed_dropped_rejected_backlog"]
                    and a["backlog_end"] == 0 and a["lost"] == 0 and a["processed_eq_stitched_unpositioned_errors"]
                    and a["not_stitched"] == 0)


def acquire(p: bench.Pipeline, n: int, rate: float, every: float, quiet: bool = False,
            stall: tuple[float, float] | None = None) -> Run:
    """Stream ``n`` frames at ``rate`` (0: full speed) through a warm pipeline, sampling every ``every``
    s, then let the mosaic account for them and take a last sample."""
    with Sampler(p, n, every, quiet=quiet, stall=stall) as sampler:
        s = p.stream(n, period=1.0 / rate if rate else 0.0, during=sampler)
        mosaic, drain_s = drain_mosaic(p, s.counters["Processed"], MOSAIC_DRAIN_S)
        sampler.sample(time.perf_counter(), p.counters())
    ctx: Any = p.ctx
    return Run(s, int(ctx.get(p.SIM + "cam1:NumImagesCounter_RBV")), sampler, mosaic, drain_s)


def soak(p: bench.Pipeline, n: int, rate: float, every: float,
         stall: tuple[float, float] | None = None) -> dict[str, Any]:
    """One long acquisition: counters, accounting, the RSS verdict and every sample."""
    r = acquire(p, n, rate, every, stall=stall)
    samples = r.sampler.samples
    return {"stalled_at_s": r.sampler.stalled, "stream": r.stream.data(), "counters": r.stream.counters, "extra_counters": extra_counters(p),
            "accounting": r.accounting, "all_accounted": r.ok, "duration_s": round(r.stream.done - r.stream.t0, 1),
            "rss": judge_rss([x["t_s"] for x in samples], [x["rss_mib"] for x in samples]),
            "final": samples[-1], "samples": samples}


def probe(p: bench.Pipeline, rates: list[float], step_s: float, backlog_s: float) -> dict[str, Any]:
    """Rates in ascending order, ``step_s`` of frames each, until one is not sustained: run.py's rule
    (nothing lost, the queue at most SUSTAINED_QUEUE full), simdet kept the pace (95 %), and the mosaic
    kept up (every frame stitched, the stitch stage at most ``backlog_s`` of frames behind and its lag
    growing by at most STITCH_LAG_GROWTH of the rate)."""
    steps = []
    for rate in sorted(rates):
        backlog = max(2 * p.batch, round(backlog_s * rate))
        p.rec(BacklogLimit=backlog)
        r = acquire(p, max(4 * p.batch, round(rate * step_s)), rate, every=0.5, quiet=True)
        s, a = r.stream, r.accounting
        ok = (r.ok and s.peak_backlog <= bench.SUSTAINED_QUEUE * backlog and s.input_rate >= 0.95 * rate
              and a["peak_stitch_lag"] <= backlog_s * rate and r.stitch_lag_growth <= STITCH_LAG_GROWTH * rate)
        rss = [x["rss_mib"] for x in r.sampler.samples]
        steps.append({**s.data(), **a, "requested": rate, "backlog_limit": backlog, "sustained": ok,
                      "rss_mib": [rss[0], rss[-1]]})
        print(f"[probe] {rate:.0f} frames/s requested, {s.input_rate:.0f} sent/s, {s.rate:.0f} processed/s: "
              f"{s.lost_note()}; peak backlog {s.peak_backlog}/{backlog}; stitched {a['stitched']}, not stitched "
              f"{a['not_stitched']}, peak stitch lag {a['peak_stitch_lag']} (growing {r.stitch_lag_growth:+.0f}/s); "
              f"{s.latency_note()}; RSS "
              f"{rss[0]:.0f} -> {rss[-1]:.0f} MiB: {'sustained' if ok else 'NOT sustained'}", flush=True)
        if not ok:
            break
    best = max((x["requested"] for x in steps if x["sustained"]), default=0.0)
    return {"steps": steps, "highest_sustained": best}


def plot_rss(png: str, result: dict[str, Any], title: str) -> None:
    """Top: RSS of the reconstructor (and simdet) against time, the judged window and its fit, the load
    average. Bottom: what the device held meanwhile: the queue (Backlog) and the stitch lag."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, verdict = result["samples"], result["rss"]
    t = np.array([s["t_s"] for s in samples]) / 60.0
    fig, (ax, held) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(3, 2), constrained_layout=True)
    ax.plot(t, [s["rss_mib"] for s in samples], ".-", label="reconstructor RSS")
    ax.plot(t, [s["sim_rss_mib"] for s in samples], ".-", color="C7", alpha=0.6, label="simdet RSS")
    if verdict.get("warmup_end_s") is not None and verdict.get("slope_mib_per_min") is not None:
        w = verdict["warmup_end_s"] / 60.0
        ax.axvspan(t[0], w, color="grey", alpha=0.12, label=f"warm-up (first {WARMUP_FRACTION:.0%})")
        judged = t >= w
        r = np.array([s["rss_mib"] for s in samples])[judged]
        fit = np.polyfit(t[judged], r, 1)
        ax.plot(t[judged], np.polyval(fit, t[judged]), "--", color="C3",
                label=f"fit {verdict['slope_mib_per_min']:+.3f} MiB/min; spread {100 * verdict['spread']:.1f} %: "
                      f"{'flat' if verdict['flat'] else 'NOT flat'}")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    load = ax.twinx()
    load.plot(t, [s["load"][0] for s in samples], color="C2", alpha=0.4, lw=0.8, label="load average (1 min)")
    load.set_ylabel("load average (1 min)", color="C2")
    load.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = load.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    held.plot(t, [max(s["stitch_lag"], 0) for s in samples], color="C1", lw=0.9, label="stitch lag (frames)")
    held.plot(t, [s["backlog"] for s in samples], color="C0", lw=0.9, label="Backlog_RBV (frames)")
    held.set_ylabel("frames held")
    held.set_xlabel("minutes since the stream started")
    held.set_ylim(bottom=0)
    held.legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"RSS plot: {png}", flush=True)


# -- sockets ----------------------------------------------------------------------------------------
def _listening(pid: int) -> list[str]:
    """``ss -tulpnH`` rows of ``pid``: protocol and local address."""
    import subprocess

    rows = subprocess.run(["ss", "-tulpnH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted(f"{r.split()[0]} {r.split()[4]}" for r in rows if f"pid={pid}," in r)


def _host_addresses() -> list[str]:
    """The host's global-scope IPv4 addresses (``ip -4 -o addr show scope global``)."""
    import subprocess

    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    return [line.split()[3].split("/")[0] for line in out.stdout.splitlines() if len(line.split()) > 3]


def _pva_answers(name: str, addr: str, port: int) -> str:
    """Does a PVA search for ``name`` sent to ``addr:port`` get an answer?"""
    from p4p.client.thread import Context

    ctx = Context("pva", conf={"EPICS_PVA_ADDR_LIST": f"{addr}:{port}", "EPICS_PVA_AUTO_ADDR_LIST": "NO",
                               "EPICS_PVA_BROADCAST_PORT": str(port)}, useenv=False)
    try:
        ctx.get(name, timeout=3.0)
        return "answered"
    except Exception as exc:  # a timeout is the expected answer off loopback
        return f"no answer ({type(exc).__name__})"
    finally:
        ctx.close()


def _ca_answers(name: str, addr: str, port: int) -> str:
    """Does a CA search datagram for ``name`` sent to ``addr:port`` (from ``addr``) get an answer?"""
    import socket

    from caproto import CLIENT, Broadcaster, SearchRequest, VersionRequest

    payload = Broadcaster(CLIENT).send(VersionRequest(0, 13), SearchRequest(name, 1, 13))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(2.0)
        u.bind((addr, 0))
        u.sendto(payload, (addr, port))
        try:
            return f"answered from {u.recvfrom(4096)[1][0]}"
        except OSError as exc:
            return f"no answer ({type(exc).__name__})"


def _connects(addr: str, port: int) -> str:
    """Does a TCP connection to ``addr:port`` open?"""
    import socket

    try:
        socket.create_connection((addr, port), timeout=2.0).close()
        return "connected"
    except OSError as exc:
        return f"refused ({exc.strerror})"


def sockets() -> dict[str, Any]:
    """What a simdet and a reconstructor (CA on, input connected) bind on a loopback EpicsNet, and
    whether they answer through 127.0.0.1 and through each of the host's own global addresses
    (packets to a local address never leave the host)."""
    from p4p.client.thread import Context

    from ptychostream.testing import IOCProcess

    net = EpicsNet(2)
    sim = IOCProcess(["simdet", "--prefix", "SOCK:SIM:"], "SOCK:SIM:", net.slots[0], net)
    rec = IOCProcess(["ioc", "--prefix", "SOCK:NN:"], "SOCK:NN:", net.slots[1], net)
    out: dict[str, Any] = {"slots": {"simdet": vars(net.slots[0]), "reconstructor": vars(net.slots[1])},
                           "server_env": net.server_env(net.slots[1])}
    ctx = None
    try:
        sim.start()
        rec.start()
        ctx = Context("pva", conf=net.pva_conf(), useenv=False)
        for k, v in {"InputPV": "SOCK:SIM:Pva1:Image", "Enable": 1}.items():
            ctx.put(f"SOCK:NN:{k}", v, wait=True)
        deadline = time.monotonic() + 30
        while int(ctx.get("SOCK:NN:InputConnected_RBV")) != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        out["input_connected"] = int(ctx.get("SOCK:NN:InputConnected_RBV")) == 1
        assert sim.proc is not None and rec.proc is not None
        out["bound"] = {"simdet": _listening(sim.proc.pid), "reconstructor": _listening(rec.proc.pid)}
        slot, pv = net.slots[1], "SOCK:NN:Received_RBV"
        out["probes"] = {addr: {"pva_search": _pva_answers(pv, addr, slot.pva_udp),
                                "pva_tcp": _connects(addr, slot.pva_tcp), "ca_search": _ca_answers(pv, addr, slot.ca),
                                "ca_tcp": _connects(addr, slot.ca)}
                         for addr in ["127.0.0.1", *_host_addresses()]}
    finally:
        if ctx is not None:
            ctx.close()
        rec.stop()
        sim.stop()
    for who, rows in out["bound"].items():
        print(f"[sockets] {who}: {', '.join(rows)}", flush=True)
    for addr, probes in out["probes"].items():
        print(f"[sockets] via {addr}: " + ", ".join(f"{k} {v}" for k, v in probes.items()), flush=True)
    return out


def _title(result: dict[str, Any]) -> str:
    """The plot's title: machine, model, frames, rate and queue."""
    return (f"{result['machine']}\nmodel {result['model']}, {result['stream']['sent']:,} frames at "
            f"{result['rate']:g} frames/s requested, BacklogLimit {result['backlog_limit']}")


def rejudge(path: str, png: str | None) -> int:
    """Apply RSS_RULE to the samples of an earlier result file (rewritten in place), and plot them."""
    result = json.loads(Path(path).read_text())
    samples = result["samples"]
    result["rss"] = judge_rss([x["t_s"] for x in samples], [x["rss_mib"] for x in samples])
    Path(path).write_text(json.dumps(result, indent=1))
    print(f"[soak] {_summary(result)}", flush=True)
    if png:
        plot_rss(png, result, _title(result))
    return 0


def _stall(text: str) -> tuple[float, float]:
    try:
        at, secs = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stall takes AT:SECONDS (e.g. 60:5), not {text!r}") from None
    if at < 0 or not 0 < secs < STALL_MAX_S:
        raise argparse.ArgumentTypeError(f"--stall {text}: AT must be >= 0 and SECONDS in (0, {STALL_MAX_S:g}): "
                                         "the harness's own reads of a stopped IOC time out after 5 s")
    return at, secs


def _rates(text: str) -> list[float]:
    """--probe: comma-separated positive rates."""
    values = [float(v) for v in text.split(",") if v]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("rates must be positive numbers, e.g. 200,400,800")
    return values


def _summary(result: dict[str, Any]) -> str:
    """One line: every identity, the rates and the RSS verdict."""
    a, c, r, st = result["accounting"], result["counters"], result["rss"], result["stream"]
    rss = (f"RSS {r.get('first_mib')} -> {r.get('last_mib')} MiB; after warm-up {r.get('min_mib')}-"
           f"{r.get('max_mib')} MiB (spread {100 * r['spread']:.1f} %, slope {r['slope_mib_per_min']:+.3f} MiB/min): "
           f"{'flat' if r['flat'] else 'NOT flat'}" if r.get("flat") is not None else f"RSS: {r.get('note')}")
    return (f"sent {a['sent']} = Received {c['Received']} + Missed {c['Missed']}: "
            f"{'yes' if a['sent_eq_received_plus_missed'] else 'NO'}; Received {c['Received']} = Processed "
            f"{c['Processed']} + Dropped {c['Dropped']} + Rejected {c['Rejected']} + Backlog {c['Backlog']}: "
            f"{'yes' if a['received_eq_processed_dropped_rejected_backlog'] else 'NO'}; lost {a['lost']}; "
            f"Processed = Stitched {a['stitched']} + Unpositioned {a['unpositioned']} + PositionErrors "
            f"{a['positionerrors']}: {'yes' if a['processed_eq_stitched_unpositioned_errors'] else 'NO'} "
            f"(peak stitch lag {a['peak_stitch_lag']}, mosaic drained in {a['mosaic_drain_s']} s); "
            f"{st['input_rate']:.0f} frames/s in, {st['rate']:.0f} processed/s over {result['duration_s']:.0f} s; "
            f"{rss}")


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000, help="frames to stream (default 1,000,000)")
    ap.add_argument("--minutes", type=float, help="stream for this long instead (frames = minutes x 60 x rate)")
    ap.add_argument("--rate", type=float, default=0.0, help="frames/s simdet publishes (0: as fast as it can, "
                                                            "with a queue that holds every frame)")
    ap.add_argument("--model", choices=MODELS, default="null")
    ap.add_argument("--backend", default="ONNXRuntime-CPU", choices=BACKEND_CHOICES)
    ap.add_argument("--size", type=int, default=128, help="frame size, a multiple of 16 (default 128)")
    ap.add_argument("--batch", type=int, default=32, help="BatchSize (default 32)")
    ap.add_argument("--backlog-s", type=float, default=BACKLOG_S,
                    help=f"BacklogLimit as seconds of frames at --rate (default {BACKLOG_S:g})")
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    ap.add_argument("--probe", type=_rates, help="instead of a soak: these rates, --probe-s each, in ascending "
                                                 "order until one is not sustained")
    ap.add_argument("--probe-s", type=float, default=PROBE_STEP_S)
    ap.add_argument("--ceilings", action="store_true", help="first measure the raw p4p transport and the raw "
                                                            "inference ceilings (benchmarks/run.py's)")
    ap.add_argument("--trace-malloc", type=int, default=0, metavar="DEPTH",
                    help="tracemalloc in the reconstructor, DEPTH frames (0: off), with the gc census")
    ap.add_argument("--census", action="store_true", help="the gc census of the reconstructor alone (no "
                                                          "tracemalloc, which slows it down)")
    ap.add_argument("--trace-every", type=float, default=60.0, help="seconds between tracemalloc snapshots")
    ap.add_argument("--stall", type=_stall, metavar="AT:SECONDS",
                    help="stop the reconstructor (SIGSTOP) AT s into the stream for SECONDS: a load spike on demand")
    ap.add_argument("--require-flat", action="store_true", help="exit 1 when the RSS is not flat")
    ap.add_argument("--out", help="write the result (JSON) here")
    ap.add_argument("--plot", metavar="FILE.png", help="plot RSS against time")
    ap.add_argument("--sockets", action="store_true", help="run nothing else: list the sockets a simdet and a "
                                                           "reconstructor bind on loopback, and probe them")
    ap.add_argument("--rejudge", metavar="FILE.json", help="run nothing: judge the RSS of an earlier --out by "
                                                           "today's rule, rewrite it and --plot it")
    args = ap.parse_args(argv)
    if args.rejudge:
        return rejudge(args.rejudge, args.plot)
    if args.sockets:
        found = sockets()
        if args.out:
            Path(args.out).write_text(json.dumps(found, indent=1))
        return 0 if found["input_connected"] else 1
    if args.size < 16 or args.size % 16:
        ap.error("--size must be a multiple of 16 (the tiny model halves it twice, the shipped one takes 128)")
    if args.minutes:
        if not args.rate:
            ap.error("--minutes needs --rate")
        args.frames = round(args.minutes * 60 * args.rate)
    machine = (f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"backend {args.backend}, {args.size}x{args.size} uint16 frames, batch {args.batch}")
    print(f"# machine: {machine}", flush=True)
    result: dict[str, Any] = {"machine": machine, "argv": sys.argv[1:] if argv is None else argv,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "model": args.model,
                              "backend": args.backend, "size": args.size, "batch": args.batch, "rate": args.rate}
    net = EpicsNet(4)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = model_path(args.model, tmp)
        result["model_path"] = path
        if args.ceilings:
            p4p = bench.pva_ceiling(net, args.size, 20000)
            inf, used = bench.inference_ceiling(path, args.backend, args.batch, args.size, quick=False)
            result["ceilings"] = {"p4p_frames_per_s": round(p4p, 1), "inference_frames_per_s": round(inf, 1),
                                  "inference_backend": used}
            print(f"[ceilings] raw p4p server->client {p4p:.0f} frames/s; raw inference ({used}) {inf:.0f} frames/s",
                  flush=True)
        trace = tmp / "trace"
        tracing = bool(args.trace_malloc or args.census)
        if tracing:
            trace.mkdir()
            (tmp / "sitecustomize.py").write_text(SITECUSTOMIZE)
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))
            os.environ["PTYCHOSTREAM_SOAK_TRACE"] = f"{trace}:{args.trace_malloc}:{args.trace_every}"
        top_rate = max(args.probe) if args.probe else args.rate
        backlog = (min(1_000_000, max(2 * args.batch, round(args.backlog_s * top_rate))) if top_rate
                   else min(1_000_000, max(100_000, args.frames)))
        result["backlog_limit"] = backlog
        opts = bench.Opts(quick=False, backend=args.backend, size=args.size, tmp=tmp)
        with bench.Pipeline(net, path, opts, args.batch, backlog=backlog) as p:
            p.warm(4 * args.batch)
            if args.probe:
                result["probe"] = probe(p, args.probe, args.probe_s, args.backlog_s)
                print(f"[probe] highest rate sustained with zero loss: {result['probe']['highest_sustained']:.0f} "
                      "frames/s", flush=True)
                ok = True
            else:
                result |= soak(p, args.frames, args.rate, args.sample_s, stall=args.stall)
                if tracing:
                    warm_s = result["rss"].get("warmup_end_s") or 0.0
                    result["tracemalloc"] = trace_report(trace, warm_s)
                ok = result["all_accounted"]
                if args.require_flat and not result["rss"].get("flat"):
                    ok = False
                print(f"[soak] {_summary(result)}", flush=True)
        result["ok"] = ok
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        if args.plot and "samples" in result:
            plot_rss(args.plot, result, _title(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
