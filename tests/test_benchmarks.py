"""The benchmark harness runs (a quick CPU smoke: it checks the harness and its counts, not speed)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the benchmarks of issue #8 and before (host and profile are checked through the GPU script's dry run)
E2E = "simdet,pipeline,stitch,sweep,burst,swap,pvapy"
#: where ``make test`` leaves ``benchmarks/gpu_check.sh --dry-run``'s output for the test below
GPU_CHECK_OUT = "PTYCHOSTREAM_GPU_CHECK_OUT"


@pytest.mark.system
def test_quick_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    png = tmp_path / "sweep.png"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", E2E, "--json",
                           str(out), "--plot", str(png)], capture_output=True, text=True, timeout=300)
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


def _py_spy() -> bool:
    """py-spy (the profile's sampler) is installed beside this Python, where run.py looks for it."""
    return (Path(sys.executable).parent / "py-spy").exists() or shutil.which("py-spy") is not None


def _host_step_books(d: dict) -> None:
    """One acquisition of the host benchmark accounts for every frame."""
    assert d["received"] <= d["sent"] and d["processed"] + d["dropped"] + d["rejected"] == d["received"]
    assert d["backlog_end"] == 0 and d["balanced"]
    assert d["lost"] == d["sent"] - d["received"] + d["dropped"] + d["rejected"]
    assert 0 <= d["missed"] <= d["sent"] - d["received"]  # a frame squashed at the very end leaves no gap
    assert d["stitched"] + d["unpositioned"] == d["processed"]
    if d.get("zero_loss"):  # a paced step counts as lossless only when its mosaic has every frame
        assert d["stitched"] == d["sent"] and d["unpositioned"] == 0


def test_null_model_is_the_central_patch_of_its_input(tmp_path):
    """The host benchmark's null model has the shipped model's geometry: a 128² input, its central
    64² as each head's output (an ONNX Slice); inputs no larger than the patch pass whole."""
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    x = np.random.default_rng(0).random((3, 1, 128, 128), dtype=np.float32)
    sess = ort.InferenceSession(bench.null_model(tmp_path / "n128.onnx", 128), providers=["CPUExecutionProvider"])
    amp, phase = sess.run(["amplitude", "phase"], {"input": x})
    assert phase.shape == amp.shape == (3, 1, 64, 64)
    np.testing.assert_array_equal(phase, x[:, :, 32:96, 32:96])
    sess = ort.InferenceSession(bench.null_model(tmp_path / "n64.onnx", 64), providers=["CPUExecutionProvider"])
    (phase,) = sess.run(["phase"], {"input": x[:, :, :64, :64]})
    np.testing.assert_array_equal(phase, x[:, :, :64, :64])


@pytest.mark.system
@pytest.mark.timeout(540)
def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every step ran and passed, in the planned order and time, and
    wrote what the GPU run writes, within what the device tool brings back.

    ``make test`` runs the dry run before pytest and names its folder in $PTYCHOSTREAM_GPU_CHECK_OUT;
    without it, this test runs the dry run itself (about two minutes on the 2-core box)."""
    given = os.environ.get(GPU_CHECK_OUT)
    out = Path(given) if given else tmp_path / "gpu-check"
    if not given:
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                              capture_output=True, text=True, timeout=480)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert (out / "summary.json").exists(), f"no summary.json in {out}: did the dry run start?"
    summary = json.loads((out / "summary.json").read_text())
    log = (out / "gpu_check.log").read_text()
    assert summary["dry_run"] and summary["backend"] == "ONNXRuntime-CPU"
    steps = {s["name"]: s for s in summary["steps"]}
    order = ["install", "env", "tests", "host", "e2e-32", "train", "score"]
    assert list(steps) == order, summary["steps"]
    failed = [s for s in summary["steps"] if s["rc"] != 0]
    assert not failed, f"steps failed: {failed}\n{log[-4000:]}"
    assert all(0 <= s["seconds"] <= s["limit_s"] for s in summary["steps"])
    # the plan, printed first: every step's limit fits the budget, the training run taking the rest
    assert log.splitlines()[1].startswith("# plan, seconds at most"), log[:500]
    plan = summary["plan_s"]
    assert list(plan) == order and plan["train"].endswith("+")
    assert sum(int(v.rstrip("+")) for v in plan.values()) <= summary["budget_s"]
    assert sum(s["seconds"] for s in summary["steps"]) <= summary["budget_s"]
    assert " passed" in summary["tests"] and "failed" not in summary["tests"]
    # what comes back from a device run: at most 8 plain files of 16 MiB, named as the device tool allows
    files = sorted(p.name for p in out.iterdir())
    assert files == ["e2e-32.json", "gpu_check.log", "host.json", "summary.json", "sweep-32.png", "train.onnx"], files
    assert all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    assert sorted(summary["files"]) == files  # summary.json lists them (rewritten after the last step)

    # the training run: the shipped model continued on the CPU for a few seconds, exported, then scored
    shipped = ROOT / "src" / "ptychostream" / "models" / "ptychonn_edge.onnx"
    train = summary["train"]
    assert train["device"] == "cpu" and train["precision"] == "bf16" and train["steps"] > 0
    assert train["init"]["file"] == shipped.name and train["init"]["max_abs_diff"] < 1e-3
    assert train["init"]["sha256"].startswith("bd5603804ec2")
    assert train["final_val_loss"]["phase"] > 0 and train["initial_val_loss"]["phase"] > 0
    assert train["history"] and train["history"][-1]["step"] == train["steps"] and "phase" in train["history"][-1]["val"]
    assert "starting from src/ptychostream/models/ptychonn_edge.onnx" in log
    from ptychostream.model.infer import open_model

    model = open_model(str(out / "train.onnx"))
    assert model.info.name == "ptychonn_edge" and model.info.input_shape == (64, 64)
    assert model.info.model_id == train["model_id"] != "bd5603804ec2"
    model.close()
    scores = summary["scores"]
    assert scores["model"] == "train.onnx" and sorted(scores["by_seed"]) == ["0", "1"]
    for by_offset in scores["by_seed"].values():
        assert sorted(by_offset) == ["mean", "overlap"]
        assert all(0 < r["ssim"] <= 1 and r["psnr"] > 0 for r in by_offset.values())
    assert scores["n_seeds_1_5_overlap"] == 1 and scores["mean_ssim_seeds_1_5_overlap"] == pytest.approx(
        scores["by_seed"]["1"]["overlap"]["ssim"], abs=1e-4)
    # --report: the Markdown for docs/benchmarks.md, from summary.json
    rep = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--report", str(out)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "| 132² → 128² |" in rep.stdout and "End to end at 32²" in rep.stdout and "| 1 | " in rep.stdout, rep.stdout
    assert f"{train['steps']} steps" in rep.stdout and "(dry run on the CPU: no GPU figure)" in rep.stdout

    host = json.loads((out / "host.json").read_text())
    for size, px in ((32, 32), (132, 128)):  # 132: cropped to the 128-pixel model by its pre-processing
        rows = [r for r in host if r["bench"] == "host" and r["data"]["size"] == size]
        sustained = next(r for r in rows if r["what"].startswith("highest rate sustained"))
        burst = next(r for r in rows if r["what"].startswith("burst of"))
        assert sustained["data"]["model_px"] == burst["data"]["model_px"] == px
        assert sustained["ceiling"] > 0 and sustained["value"] >= 0
        bare = sustained["data"]["bare"]
        assert len(bare) == 2 and all(0 < b["received"] <= b["sent"] == 2000 for b in bare)
        assert all(b["gaps"] == b["sent"] - b["received"] for b in bare)
        for step in sustained["data"]["steps"]:
            _host_step_books(step)
            assert step["zero_loss"] == (step["lost"] == 0 and step["missed"] == 0 and step["processed"] == step["sent"]
                                         and step["peak_backlog"] <= 0.5 * step["backlog_limit"])
        ok = [s["input_rate"] for s in sustained["data"]["steps"] if s["zero_loss"]]
        assert sustained["value"] == (round(max(ok), 1) if ok else 0.0)
        d = burst["data"]
        _host_step_books(d)
        assert d["sent"] == 2000 and burst["value"] == d["received"] > 0 and burst["ceiling"] > 0
    e2e = json.loads((out / "e2e-32.json").read_text())
    assert {r["bench"] for r in e2e} == {"sweep", "burst", "swap"}
    steps32 = [r for r in e2e if r["bench"] == "sweep" and "sent" in r["data"]]
    assert [round(r["data"]["requested"]) for r in steps32] == [150, 600]  # --rates, not fractions
    (swap,) = [r for r in e2e if r["bench"] == "swap"]
    assert swap["data"]["lost"] == 0 and swap["data"]["new_model_serving"]

    profile = [r for r in host if r["bench"] == "profile"]
    if not _py_spy():  # not in the venv: the profile says so and measures nothing
        assert not profile and "[profile] skipped: py-spy not installed" in log
        return
    stages = [r["data"]["stage"] for r in profile]
    assert stages[:6] == ["decode", "intake/queue", "stack + pre-process", "inference", "publish", "stitch"]
    assert sum(r["data"]["samples"] for r in profile) == profile[0]["data"]["total_samples"] > 0
    assert all(r["value"] >= 0 and r["unit"] == "us/frame" for r in profile)
    assert profile[0]["data"]["received"] > 0 and profile[0]["data"]["processed"] > 0
