"""``make demo``: simulated detector → reconstructor on the CPU, all on 127.0.0.1.

Starts both IOCs as subprocesses on a private loopback network, loads the model, runs a
spiral scan, shows live progress, and prints commands to try.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from .launch import IOCProcess
from .loopback import EpicsNet

__all__ = ["main"]

REC, SIM = "PTY:NN:", "PTY:SIM:"


def default_model(out: Path) -> tuple[str, str]:
    """The shipped model if present, else an untrained PtychoNN-class net (say so)."""
    shipped = Path(__file__).with_name("models") / "ptychonn_edge.onnx"
    if shipped.is_file():
        return str(shipped), "shipped model"
    from .modelzoo import build_ptychonn_onnx

    path = out / "untrained_ptychonn.onnx"
    build_ptychonn_onnx(str(path), size=128, heads=("amplitude", "phase"), base_channels=16, depth=4)
    return str(path), "UNTRAINED PtychoNN-class net (no trained model ships yet): the phase is not meaningful"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptychostream.demo", description=__doc__)
    ap.add_argument("--frames", type=int, default=1000, help="scan points (default 1000)")
    ap.add_argument("--period", type=float, default=0.002, help="detector frame period in s (default 0.002)")
    ap.add_argument("--out", default="demo-out", help="output folder")
    ap.add_argument("--serve", action="store_true", help="keep the IOCs running for screens and clients")
    args = ap.parse_args(argv)

    from p4p.client.thread import Context
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net = EpicsNet(2)
    model, what = default_model(out)
    console.print(f"[bold]ptychostream demo[/] — model: {what}\n  {model}")

    cfg = Path(tempfile.mkdtemp()) / "reconstructor.toml"
    cfg.write_text(
        f'[ioc]\nca = true\n[pvs]\nInputPV = "{SIM}Pva1:Image"\nModelPath = "{model}"\n'
        'BatchSize = 32\nPublishRate = 10.0\nEnable = "Enable"\n'
    )
    sim = IOCProcess(["simdet", "--prefix", SIM], SIM, net.slots[0], net).start()
    rec = IOCProcess(["ioc", "--prefix", REC, "--config", str(cfg)], REC, net.slots[1], net).start()
    ctx = Context("pva", conf=net.pva_conf(), useenv=False)
    try:
        deadline = time.monotonic() + 60
        while int(ctx.get(REC + "ModelStatus_RBV")) != 2:
            if int(ctx.get(REC + "ModelStatus_RBV")) == 3 or time.monotonic() > deadline:
                raise SystemExit(f"model did not load: {ctx.get(REC + 'Message_RBV').raw['value']}")
            time.sleep(0.1)
        console.print(f"model ready: {ctx.get(REC + 'ModelInfo_RBV').raw['value']}")
        for name, value in {"ImageMode": "Multiple", "NumImages": args.frames, "ScanPoints": args.frames,
                            "ScanPattern": "spiral", "Object": "digits", "AcquirePeriod": args.period,
                            "Photons": 1e6}.items():
            ctx.put(f"{SIM}cam1:{name}", value, wait=True)
        ctx.put(REC + "ResetCounters", 1, wait=True)
        ctx.put(SIM + "cam1:Acquire", 1, wait=False)
        n = args.frames
        with Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} frames  {task.fields[status]}"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("reconstructing", total=n, status="")
            deadline = time.monotonic() + 120 + n * args.period
            while time.monotonic() < deadline:
                c = {k: int(ctx.get(f"{REC}{k}_RBV")) for k in ("Processed", "Dropped", "Rejected", "Backlog")}
                rate = float(ctx.get(REC + "FrameRate_RBV"))
                progress.update(task, completed=c["Processed"] + c["Dropped"] + c["Rejected"],
                                status=f"{rate:7.1f} frames/s  backlog {c['Backlog']}  "
                                       f"dropped {c['Dropped']}  rejected {c['Rejected']}")
                if c["Processed"] + c["Dropped"] + c["Rejected"] >= n and c["Backlog"] == 0:
                    break
                time.sleep(0.2)
        summary = {k: ctx.get(f"{REC}{k}_RBV") for k in ("Received", "Processed", "Dropped", "Rejected", "Missed",
                                                         "LatencyP50", "LatencyP99")}
        console.print("counters: " + ", ".join(f"{k}={float(v):g}" for k, v in summary.items()))
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in net.client_env().items())
        console.print("\n[bold]Try[/] (in another shell while --serve runs):")
        console.print(f"  export {env}")
        console.print(f"  {sys.executable} -m p4p.client.cli get {REC}Processed_RBV {REC}FrameRate_RBV")
        console.print(f"  {sys.executable} -c \"import epics; print(epics.caget('{REC}Status_RBV', as_string=True))\"")
        console.print(f"  caget {REC}ModelStatus_RBV ; caget -S {REC}ModelInfo_RBV")
        if args.serve:
            console.print("\nserving; Ctrl-C to stop")
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        ctx.close()
        rec.stop()
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
