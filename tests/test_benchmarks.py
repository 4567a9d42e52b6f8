"""The benchmark harness runs (a quick CPU smoke: it checks the harness, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.system
def test_quick_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["bench"] + ":" + r["what"].split(",")[0]: r for r in json.loads(out.read_text())}
    sim = next(r for k, r in rows.items() if k.startswith("simdet:"))
    assert sim["value"] > 0 and sim["ceiling"] > 0 and "received 2000/2000, gaps 0" in sim["note"]
    pipe = next(r for k, r in rows.items() if k.startswith("pipeline:simdet"))
    assert pipe["value"] > 0 and pipe["ceiling"] > 0 and "dropped 0, rejected 0" in pipe["note"]
    assert any(k.startswith("stitch:") and r["value"] > 0 for k, r in rows.items())
    assert "| bench | what |" in proc.stdout
