"""``ptychostream reconstruct``: a scan file through pty-chi into a Ptychodus product (object, probe, positions)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ptychostream.files.errors import FileFormatError

__all__ = ["add_reconstruct_parser", "scan_overrides"]

#: command-line option -> read_scan override
_OVERRIDES: dict[str, str] = {
    "origin": "origin", "flip_y": "flip_y", "flip_x": "flip_x", "transpose": "transpose",
    "pixel_m": "object_pixel_m", "energy_ev": "energy_ev", "distance_m": "distance_m",
    "detector_pixel_m": "detector_pixel_m", "position_units": "position_units", "positions": "positions",
    "product": "product", "layout": "layout", "dataset": "dataset", "reader": "reader",
}


def scan_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`~ptychostream.files.scan.read_scan` keywords given on the command line (None / False: not given)."""
    out: dict[str, Any] = {}
    for opt, key in _OVERRIDES.items():
        value = getattr(args, opt, None)
        if value is None or value is False:
            continue
        out[key] = value
    return out


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from ptychostream.files.scan import read_scan
    from ptychostream.iterative.engine import reconstruct, write_reconstruction

    name = "ptychostream reconstruct"
    try:
        scan = read_scan(args.scan, **scan_overrides(args))
    except (FileFormatError, OSError, ValueError, TypeError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{scan.source}: {len(scan.frames)} frames {scan.frames.shape[1]}x{scan.frames.shape[2]}, "
          f"origin {scan.origin}, probe {'from the file' if scan.probe is not None else 'guessed'}", flush=True)
    bar = None
    if not args.no_progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(TextColumn(f"[bold blue]{args.engine}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
        task = bar.add_task(args.engine, total=args.iterations, loss="-")

    def progress(done: int, total: int, loss: float) -> None:
        if bar is not None:
            bar.update(task, completed=done, loss=f"{loss:.4g}")

    try:
        if bar is not None:
            bar.start()
        try:
            rec = reconstruct(scan, engine=args.engine, iterations=args.iterations, probe_modes=args.probe_modes,
                              refine_probe=not args.no_refine_probe, refine_positions=args.refine_positions,
                              device=args.device, batch_size=args.batch_size, progress=progress, seed=args.seed)
        finally:
            if bar is not None:
                bar.stop()
        out = write_reconstruction(args.out, rec)
    except ModuleNotFoundError as exc:
        print(f"{name}: error: {exc}; the iterative engines are the 'iterative' extra "
              "(pip install 'ptychostream[iterative]')", file=sys.stderr)
        return 2
    except (FileFormatError, OSError, ValueError, RuntimeError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    per = rec.seconds / max(1, len(rec.loss))
    print(f"{out}: object {rec.object.shape[0]}x{rec.object.shape[1]} at {rec.pixel_m:.4g} m/px, "
          f"{rec.settings['probe_modes']} probe mode(s) ({rec.settings['probe_source']}), "
          f"{len(rec.loss)} {args.engine} epochs in {rec.seconds:.1f} s ({per:.2f} s/epoch), "
          f"final loss {rec.loss[-1]:.4g}")
    return 0


def add_reconstruct_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``reconstruct`` on an argparse subparsers object; returns the sub-parser."""
    p = sub.add_parser(
        "reconstruct", help="iterative reconstruction of a scan with pty-chi (LSQML, ePIE, DM) into a product",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Reconstruct a recorded or beamline scan with pty-chi's engines and write a Ptychodus product\n"
            "HDF5 (object, probe with all its modes, positions, pixel size): the labels for training.\n"
            "The probe starts from the file's (or --product's) probe, else from a generic guess (a flat\n"
            "disc of the size the frames' mean autocorrelation gives), and is refined."),
        epilog=("scan files: whatever ptychostream.files.scan.read_scan reads (PtychoNN / Tike NPZ, CXI,\n"
                "HDF5 frames with positions, a ptychostream record, Ptychodus beamline readers).\n\n"
                "examples:\n  ptychostream reconstruct scan.npz --out product.h5\n"
                "  ptychostream reconstruct scan.cxi --out product.h5 --iterations 200 --probe-modes 3 "
                "--refine-positions --device cuda"))
    p.add_argument("scan", help="scan file (NPZ, CXI, HDF5, record)")
    p.add_argument("--out", required=True, help="product HDF5 to write")
    p.add_argument("--engine", choices=("lsqml", "epie", "dm"), default="lsqml", help="pty-chi engine (default lsqml)")
    p.add_argument("--iterations", type=int, default=100, help="epochs (default 100)")
    p.add_argument("--probe-modes", type=int, default=1, help="incoherent probe modes (default 1)")
    p.add_argument("--refine-positions", action="store_true", help="correct the positions (from a fifth of the epochs)")
    p.add_argument("--no-refine-probe", action="store_true", help="keep the starting probe fixed")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-size", type=int, help="frames per update (default: the engine's, see reconstruct())")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("what the file lacks or gets wrong (read_scan overrides)")
    g.add_argument("--origin", choices=("corner", "centre"), help="where the stored frames have zero frequency")
    g.add_argument("--flip-y", action="store_true", default=None, help="flip the frames' rows (after --transpose)")
    g.add_argument("--flip-x", action="store_true", default=None, help="flip the frames' columns")
    g.add_argument("--transpose", action="store_true", default=None, help="swap the frames' axes (first)")
    g.add_argument("--pixel-m", type=float, help="object pixel size in metres")
    g.add_argument("--energy-ev", type=float, help="photon energy (eV)")
    g.add_argument("--distance-m", type=float, help="sample-detector distance (m)")
    g.add_argument("--detector-pixel-m", type=float, help="detector pixel size (m)")
    g.add_argument("--position-units", choices=("m", "pixels"), help="units of the file's positions")
    g.add_argument("--positions", help="positions file instead of the scan's (product, NPZ, CSV, NPY)")
    g.add_argument("--product", help="Ptychodus product: positions, probe and pixel size")
    g.add_argument("--layout", help="force a layout (ptychonn-npz, tike-npz, cxi, record, hdf5, ptychodus)")
    g.add_argument("--dataset", help="HDF5 frames dataset")
    g.add_argument("--reader", help="a Ptychodus diffraction file reader (plugin name) for a beamline file")
    p.set_defaults(func=_cmd_reconstruct)
    return p
