"""The soak harness (benchmarks/soak.py): a short run accounts for every frame and writes its RSS
samples, JSON and plot; the RSS rule tells flat from growing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOAK = ROOT / "benchmarks" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("ptychostream_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_rss_rule_tells_flat_from_growing():
    soak = _soak_module()
    t = np.arange(0, 600, 10.0)  # 10 min, a sample every 10 s
    warm = np.where(t < 60, 150 + t, 210.0)  # warm-up growth, then flat with 1 MiB of noise
    flat = soak.judge_rss(list(t), list(warm + np.random.default_rng(0).uniform(-1, 1, t.size)))
    assert flat["flat"] is True and flat["spread"] <= soak.FLAT_SPREAD
    assert abs(flat["slope_mib_per_min"]) < 0.5 and flat["samples_after_warmup"] == (t >= 120).sum()

    # finding 10: 0.76 MB/min stays within FLAT_SPREAD over 10 minutes; the slope rule catches it
    growing = soak.judge_rss(list(t), list(200 + 0.76 * t / 60))
    assert growing["spread"] <= soak.FLAT_SPREAD
    assert growing["flat"] is False and growing["slope_mib_per_min"] == pytest.approx(0.76, abs=1e-3)
    assert growing["growth_over_judged_mib"] == pytest.approx(0.76 * 8, abs=0.1)

    assert soak.judge_rss([0.0, 10.0], [100.0, 101.0])["flat"] is None  # too short to judge


@pytest.mark.system
@pytest.mark.timeout(300)
def test_soak_smoke_accounts_for_every_frame(tmp_path):
    out, png = tmp_path / "soak.json", tmp_path / "rss.png"
    proc = subprocess.run([sys.executable, str(SOAK), "--frames", "2000", "--rate", "400", "--model", "null",
                           "--sample-s", "0.5", "--out", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    c, a = r["counters"], r["accounting"]
    assert r["ok"] and r["all_accounted"]
    assert a["sent"] == 2000 == c["Received"] + c["Missed"] and a["sent_eq_received_plus_missed"]
    assert c["Received"] == c["Processed"] + c["Dropped"] + c["Rejected"] + c["Backlog"]
    assert c["Backlog"] == 0 and a["lost"] == 0 and c["Processed"] == 2000
    assert a["processed_eq_stitched_unpositioned_errors"] and a["stitched"] == 2000 and a["not_stitched"] == 0

    samples = r["samples"]
    assert len(samples) >= 4 and all(s["rss_mib"] > 10 and s["threads"] > 1 and s["fds"] > 2 for s in samples)
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    assert all(len(s["load"]) == 3 for s in samples)
    assert samples[-1]["processed"] == 2000
    assert r["rss"]["samples"] == len(samples) and r["rss"]["first_mib"] > 0
    assert "sent 2000 = Received 2000 + Missed 0: yes" in proc.stdout
    assert png.stat().st_size > 10_000


@pytest.mark.system
@pytest.mark.timeout(300)
def test_probe_steps_up_and_accounts_for_each_step(tmp_path):
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--probe", "100,200", "--probe-s", "3", "--model", "null",
                           "--out", str(out)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = json.loads(out.read_text())["probe"]
    steps = probe["steps"]
    assert [s["requested"] for s in steps] == [100, 200][:len(steps)] and steps
    for s in steps:
        assert s["sent"] == s["received"] + s["missed"] and s["balanced"] and s["backlog_end"] == 0
        assert s["processed_eq_stitched_unpositioned_errors"]
        if s["sustained"]:  # a sustained step lost nothing and stitched everything
            assert s["lost"] == 0 and s["not_stitched"] == 0 and s["input_rate"] >= 0.95 * s["requested"]
    assert probe["highest_sustained"] in (0, 100, 200)
    assert probe["highest_sustained"] == max([s["requested"] for s in steps if s["sustained"]], default=0)
    assert "highest rate sustained with zero loss" in proc.stdout


@pytest.mark.system
@pytest.mark.timeout(120)
def test_sockets_tcp_and_ca_on_loopback_and_nothing_answers_elsewhere(tmp_path):
    out = tmp_path / "sockets.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--sockets", "--out", str(out)], capture_output=True,
                          text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for who in ("simdet", "reconstructor"):
        slot, bound = r["slots"][who], r["bound"][who]
        assert f"tcp 127.0.0.1:{slot['pva_tcp']}" in bound and f"tcp 127.0.0.1:{slot['ca']}" in bound
        assert f"udp 127.0.0.1:{slot['ca']}" in bound  # caproto binds its search port where it is told
        assert f"udp 0.0.0.0:{slot['pva_udp']}" in bound  # pvxs always binds the wildcard (docs/reliability.md)
        assert not [row for row in bound if row.startswith("tcp") and "127.0.0.1:" not in row]
    assert r["probes"]["127.0.0.1"] == {"pva_search": "answered", "pva_tcp": "connected",
                                        "ca_search": "answered from 127.0.0.1", "ca_tcp": "connected"}
    for addr, probes in r["probes"].items():
        if addr != "127.0.0.1":  # the host's own other addresses: nothing answers there
            assert probes["pva_search"].startswith("no answer") and probes["ca_search"].startswith("no answer")
            assert probes["pva_tcp"].startswith("refused") and probes["ca_tcp"].startswith("refused")
