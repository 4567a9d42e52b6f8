"""``make demo``: simulated detector → live CNN reconstruction → mosaic, on the CPU, all on 127.0.0.1.

Starts the simulated detector and the reconstructor as subprocesses on a private loopback
network, loads the shipped model, runs a spiral scan of a sample the model never trained on
(digits and lines), shows live progress, records to HDF5, and scores the mosaic against the truth.
Writes ``demo-out/mosaic.png`` (truth | live mosaic | difference) and ``demo-out/record.h5``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ptychostream.testing import EpicsNet, IOCProcess

__all__ = ["main"]

REC, SIM = "PTY:NN:", "PTY:SIM:"
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "ptychonn_edge.onnx"


def default_model(out: Path) -> tuple[str, str]:
    """The shipped model if present, else an untrained PtychoNN-class net (and say so)."""
    if SHIPPED.is_file():
        return str(SHIPPED), "shipped model"
    from ptychostream.model.zoo import build_ptychonn_onnx

    path = out / "untrained_ptychonn.onnx"
    build_ptychonn_onnx(str(path), size=128, heads=("amplitude", "phase"), base_channels=16, depth=4)
    return str(path), "UNTRAINED PtychoNN-class net (no trained model found): the phase is not meaningful"


def score_and_plot(record: Path, truth: Path, png: Path) -> dict:
    """Score the recorded mosaic against the truth and draw truth | mosaic | difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptychostream.pipeline.record import read_record
    from ptychostream.quality.score import illumination_mask, place_truth, score_phase
    from ptychostream.sim.replay import read_truth_h5

    rec = read_record(str(record))
    tr = read_truth_h5(str(truth))
    m = rec["mosaic"]
    origin = (float(m["origin_y_m"]), float(m["origin_x_m"]))
    pixel = float(m["pixel_size_m"])
    phase = np.asarray(m["phase"])
    tphase, inside = place_truth(tr["object"], tr["object_pixel_m"], phase.shape, origin, pixel,
                                 tr["object_center_m"])
    mask = inside & (np.asarray(m["coverage"]) > 1e-3)
    mask &= illumination_mask(tr["probe"], tr["positions_m"], pixel, phase.shape, origin, 0.5)
    res = score_phase(phase, np.nan_to_num(tphase), mask)
    shown = np.where(mask, phase - np.nanmean((phase - tphase)[mask]), np.nan)
    truth_shown = np.where(mask, tphase, np.nan)
    ext = [origin[1] * 1e6, (origin[1] + phase.shape[1] * pixel) * 1e6,
           (origin[0] + phase.shape[0] * pixel) * 1e6, origin[0] * 1e6]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), constrained_layout=True)
    lim = np.nanpercentile(np.abs(truth_shown), 99.5)
    for ax, img, title in ((axes[0], truth_shown, "truth (phase)"), (axes[1], shown, "live mosaic (phase)"),
                           (axes[2], shown - truth_shown, "difference")):
        im = ax.imshow(img, cmap="gray" if ax is not axes[2] else "coolwarm", vmin=-lim, vmax=lim, extent=ext)
        ax.set_title(title)
        ax.set_xlabel("x (µm)")
        fig.colorbar(im, ax=ax, shrink=0.8, label="rad")
    axes[0].set_ylabel("y (µm)")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size:
        for ax in axes:  # zoom to the scanned area
            ax.set_xlim((origin[1] + cols[0] * pixel) * 1e6, (origin[1] + cols[-1] * pixel) * 1e6)
            ax.set_ylim((origin[0] + rows[-1] * pixel) * 1e6, (origin[0] + rows[0] * pixel) * 1e6)
    fig.suptitle(f"ptychostream live mosaic of {m['n_patches']} frames — SSIM {res['ssim']:.3f}, "
                 f"PSNR {res['psnr']:.1f} dB, FRC-AUC {res['frc_auc']:.3f}")
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptychostream.cli.demo", description=__doc__)
    ap.add_argument("--frames", type=int, default=1000, help="scan points (default 1000)")
    ap.add_argument("--step", type=float, default=1e-7, help="spiral step in m (default 1e-7)")
    ap.add_argument("--period", type=float, default=0.002, help="detector frame period in s (default 0.002)")
    ap.add_argument("--model", help="ONNX model (default: the shipped model)")
    ap.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    ap.add_argument("--serve", action="store_true", help="keep the IOCs running for screens and clients")
    args = ap.parse_args(argv)

    from p4p.client.thread import Context
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    net = EpicsNet(2)
    model, what = (args.model, "given model") if args.model else default_model(out)
    console.print(f"[bold]ptychostream demo[/] — {what}: {model}")

    cfg = Path(tempfile.mkdtemp()) / "reconstructor.toml"
    cfg.write_text(
        f'[ioc]\nca = true\n[pvs]\nInputPV = "{SIM}Pva1:Image"\nModelPath = "{model}"\n'
        f'BatchSize = 32\nPublishRate = 10.0\nMosaicRate = 5.0\nCaptureFile = "{out / "record.h5"}"\n'
        'Enable = "Enable"\n'
    )
    sim = IOCProcess(["simdet", "--prefix", SIM, "--truth", str(out / "truth.h5")], SIM, net.slots[0], net).start()
    rec = IOCProcess(["ioc", "--prefix", REC, "--config", str(cfg)], REC, net.slots[1], net).start()
    ctx = Context("pva", conf=net.pva_conf(), useenv=False)
    get = lambda name: ctx.get(REC + name)  # noqa: E731
    try:
        deadline = time.monotonic() + 60
        while int(get("ModelStatus_RBV")) != 2 or int(get("InputConnected_RBV")) != 1:
            if int(get("ModelStatus_RBV")) == 3 or time.monotonic() > deadline:
                raise SystemExit(f"not ready: {get('Message_RBV').raw['value']}")
            time.sleep(0.1)
        console.print(f"model ready: {get('ModelInfo_RBV').raw['value']}")
        if not float(get("PixelSize_RBV")) and not model_pixel(model):
            ctx.put(REC + "PixelSize", float(ctx.get(SIM + "cam1:ObjectPixel_RBV")), wait=True)
        for name, value in {"ImageMode": "Multiple", "NumImages": args.frames, "ScanPoints": args.frames,
                            "ScanPattern": "spiral", "ScanStep": args.step, "Object": "digits",
                            "AcquirePeriod": args.period, "ArrayCounter": 0}.items():
            ctx.put(f"{SIM}cam1:{name}", value, wait=True)
        for name in ("ResetCounters", "MosaicReset", "Capture"):
            ctx.put(REC + name, 1, wait=True)
        acquire = threading.Thread(target=ctx.put, args=(SIM + "cam1:Acquire", 1), kwargs={"timeout": 600},
                                   daemon=True)
        acquire.start()
        n = args.frames
        with Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} frames  {task.fields[status]}"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("reconstructing", total=n, status="")
            deadline = time.monotonic() + 120 + n * args.period
            while time.monotonic() < deadline:
                c = {k: int(get(f"{k}_RBV")) for k in ("Processed", "Dropped", "Rejected", "Backlog", "Stitched")}
                progress.update(task, completed=c["Processed"] + c["Dropped"] + c["Rejected"],
                                status=f"{float(get('InputRate_RBV')):6.0f} in/s {float(get('FrameRate_RBV')):6.0f} "
                                       f"out/s  backlog {c['Backlog']:4d}  stitched {c['Stitched']}")
                if c["Processed"] + c["Dropped"] + c["Rejected"] >= n and c["Backlog"] == 0 and c["Stitched"] >= c["Processed"]:
                    break
                time.sleep(0.2)
        acquire.join(30)
        time.sleep(0.5)
        ctx.put(REC + "Capture", 0, wait=True)
        while int(get("Capture_RBV")):
            time.sleep(0.1)
        summary = {k: float(get(f"{k}_RBV")) for k in ("Received", "Processed", "Dropped", "Rejected", "Missed",
                                                       "Stitched", "Unpositioned", "LatencyP50", "LatencyP99")}
        console.print("counters: " + ", ".join(f"{k}={v:g}" for k, v in summary.items()))
        res = score_and_plot(out / "record.h5", out / "truth.h5", out / "mosaic.png")
        console.print(f"[bold]mosaic vs truth[/]: SSIM {res['ssim']:.3f}, PSNR {res['psnr']:.1f} dB, "
                      f"FRC-AUC {res['frc_auc']:.3f}  ->  {out / 'mosaic.png'}, {out / 'record.h5'}")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in net.client_env().items())
        console.print("\n[bold]Try[/] (in another shell, while `make demo DEMO_ARGS=--serve` runs):")
        console.print(f"  export {env}", soft_wrap=True)
        console.print(f"  {sys.executable} -m p4p.client.cli get {REC}Processed_RBV {REC}FrameRate_RBV")
        console.print(f"  {sys.executable} -m p4p.client.cli get {REC}Mosaic | head")
        console.print(f"  {sys.executable} -c \"import epics; print(epics.caget('{REC}Status_RBV', as_string=True))\"")
        console.print(f"  caget {REC}Processed_RBV; caget -S {REC}ModelInfo_RBV   # EPICS base tools, if installed")
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


def model_pixel(path: str) -> float | None:
    from ptychostream.model.infer import load_model_file

    return load_model_file(path).pixel_m


if __name__ == "__main__":
    sys.exit(main())
