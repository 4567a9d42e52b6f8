"""The benchmark harness runs (a quick CPU smoke: it checks the harness and its counts, not speed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.system
def test_quick_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    png = tmp_path / "sweep.png"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out),
                           "--plot", str(png)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["bench"] + ":" + r["what"].split(",")[0]: r for r in data}

    def bench(name: str) -> list[dict]:
        return [r for r in data if r["bench"] == name]

    sim = next(r for k, r in rows.items() if k.startswith("simdet:"))
    assert sim["value"] > 0 and sim["ceiling"] > 0 and "received 2000/2000, gaps 0" in sim["note"]
    pipe = next(r for k, r in rows.items() if k.startswith("pipeline:simdet"))
    assert pipe["value"] > 0 and pipe["ceiling"] > 0 and "dropped 0, rejected 0" in pipe["note"]
    assert pipe["data"]["lost"] == 0 and pipe["data"]["processed"] == 300
    assert any(k.startswith("stitch:") and r["value"] > 0 for k, r in rows.items())

    # sweep: every step accounts for every frame; the lowest rate fits in the queue, so it loses none
    steps = [r for r in bench("sweep") if "sent" in r["data"]]
    assert len(steps) >= 2
    for r in steps:
        d = r["data"]
        assert r["value"] > 0 and r["ceiling"] > 0 and d["requested"] > 0 and d["input_rate"] > 0
        assert d["processed"] > 0 and d["received"] <= d["sent"]
        assert d["processed"] + d["dropped"] + d["rejected"] == d["received"] and d["backlog_end"] == 0
        assert d["lost"] == d["sent"] - d["received"] + d["dropped"] + d["rejected"]
        assert d["balanced"]
        assert 0 < d["p50_ms"] <= d["p99_ms"]
    assert [r["data"]["requested"] for r in steps] == sorted(r["data"]["requested"] for r in steps)
    assert steps[0]["data"]["lost"] == 0
    best = [r for r in bench("sweep") if r["what"].startswith("highest input rate sustained with zero loss")]
    assert len(best) == 1 and best[0]["value"] > 0 and best[0]["ceiling"] > 0

    # burst: nothing lost, a drain time, the queue emptied
    burst = next(r for r in bench("burst") if "overall rate" in r["what"])
    d = burst["data"]
    assert burst["value"] > 0 and burst["ceiling"] > 0
    assert d["lost"] == 0 and d["processed"] == d["sent"] == 400 and d["backlog_end"] == 0
    drain = next(r for r in bench("burst") if r["what"].startswith("drain time"))
    assert drain["value"] >= 0 and drain["unit"] == "s"

    # swap: no frame lost, the books balance, the new model serves
    (swap,) = bench("swap")
    d = swap["data"]
    assert swap["value"] > 0 and swap["ceiling"] > 0
    assert d["lost"] == 0 and d["dropped"] + d["rejected"] == 0 and d["balanced"]
    assert d["processed"] == d["received"] == d["sent"] and d["new_model_serving"]

    # pvapy pass-through, next to the p4p transport ceiling
    if importlib.util.find_spec("pvaccess") is not None:
        (pvapy,) = bench("pvapy")
        assert pvapy["value"] > 0 and pvapy["ceiling"] > 0
        assert 0 < pvapy["data"]["received"] <= pvapy["data"]["published"]

    assert "| bench | what |" in proc.stdout
    assert png.stat().st_size > 10_000
