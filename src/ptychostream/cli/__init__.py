"""``ptychostream`` command line: the IOCs (ioc, simdet), train, reconstruct, adapt, score, pairs, sim-foreign and pvtable."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

__all__ = ["main"]


def _cmd_ioc(args: argparse.Namespace) -> int:
    from ptychostream.core.memory import Trimmer, tune_allocator

    tune_allocator()  # before the data path's threads allocate (see core/memory.py)
    from ptychostream.devices.reconstructor import Reconstructor
    from ptychostream.protocols.server import apply_startup_values, load_config, serve

    config = load_config(args.config)
    ioc_conf = config.get("ioc", {})
    prefix = args.prefix or ioc_conf.get("prefix", "PTY:NN:")
    ca = ioc_conf.get("ca", True) if args.ca is None else args.ca
    recon = Reconstructor(prefix=prefix, receive=args.receive)
    recon.start()
    for err in apply_startup_values(recon.device, config.get("pvs", {})):
        recon.message(err, severity=1)
        logging.warning(err)

    def ready() -> None:
        print(f"ptychostream ioc {prefix} ready (PVA{' + CA' if ca else ''}, {len(recon.device.db)} PVs)", flush=True)

    trimmer = Trimmer()
    trimmer.start()
    try:  # on SIGTERM/SIGINT the device stops first (recon.stop: the cut point), then the servers
        asyncio.run(serve(recon.device, prefix, ca=ca, tasks=[recon.status_task], ready=ready, shutdown=recon.stop))
    finally:
        trimmer.stop()
        recon.stop()  # a no-op after a clean stop; the servers are gone if serve() failed
    return 0


def _cmd_pvtable(args: argparse.Namespace) -> int:
    from ptychostream.screens import pv_table, update_readme

    if args.update:
        changed = update_readme(args.update)
        print(f"{args.update}: {'updated' if changed else 'already current'}")
        return 0
    print(pv_table(args.db, prefix=args.prefix))
    return 0


def _cmd_pairs(args: argparse.Namespace) -> int:
    from ptychostream.train.pairs import training_pairs

    try:
        n = training_pairs(args.record, args.product, args.out)
    except (OSError, ValueError, KeyError) as exc:
        print(f"ptychostream pairs: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {n} training pairs")
    return 0


def _cmd_simdet(args: argparse.Namespace) -> int:
    from ptychostream.devices.simdet import run_simdet

    return run_simdet(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptychostream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ioc", help="run the reconstructor soft IOC (PVA + CA)",
                       description="Serve the reconstructor over PVA (p4p) and CA (caproto). "
                                   "Addresses and ports come from the standard EPICS_* variables.")
    p.add_argument("--prefix", help="PV prefix, $(P)$(R) (default PTY:NN: or [ioc] prefix)")
    p.add_argument("--no-ca", dest="ca", action="store_false", default=None, help="serve PVA only")
    p.add_argument("--ca", dest="ca", action="store_true", help="also serve CA (the default)")
    p.add_argument("--config", help="TOML file: [ioc] prefix/ca and [pvs] start-up setpoints")
    p.add_argument("--receive", choices=("thread", "process"), default="thread",
                   help="receive the detector channel on a thread of the IOC (the default) or in a child "
                        "process joined to it by shared memory")
    p.set_defaults(func=_cmd_ioc)

    p = sub.add_parser("simdet", help="run the simulated ptychography detector IOC",
                       description="A simulated areaDetector-like ptychography detector: probe x object "
                                   "patch, far-field |FFT|^2, Poisson noise, spiral/raster scans, over PVA.")
    p.add_argument("--prefix", default="PTY:SIM:", help="PV prefix (default PTY:SIM:)")
    p.add_argument("--no-ca", dest="ca", action="store_false", default=True, help="serve PVA only")
    p.add_argument("--config", help="TOML file with [pvs] start-up setpoints")
    p.add_argument("--truth", help="write the ground truth (HDF5) here at each acquisition start")
    p.set_defaults(func=_cmd_simdet)

    from ptychostream.quality.cli import add_score_parser
    from ptychostream.train import add_train_parser

    add_train_parser(sub)
    add_score_parser(sub)

    from ptychostream.iterative.cli import add_reconstruct_parser

    add_reconstruct_parser(sub)

    from ptychostream.cli.record import add_record_parser

    add_record_parser(sub)

    from ptychostream.sim.foreign import add_foreign_parser

    add_foreign_parser(sub)

    from ptychostream.cli.adapt import add_adapt_parser

    add_adapt_parser(sub)

    p = sub.add_parser("pairs", help="training pairs: a record's frames + patches of a later reconstruction",
                       description="Join the diffraction frames of an HDF5 record (CaptureFrames=Yes) with "
                                   "patches cut from an iterative reconstruction (Ptychodus product HDF5 or NPZ) "
                                   "into a PtychoNN training NPZ.")
    p.add_argument("record", help="HDF5 record written by the IOC (Capture)")
    p.add_argument("product", help="Ptychodus product .h5 (object + pixel_width_m) or .npz (object, pixelsize)")
    p.add_argument("--out", required=True, help="output NPZ")
    p.set_defaults(func=_cmd_pairs)

    p = sub.add_parser("pvtable", help="print the PV table (Markdown) generated from db/")
    p.add_argument("--db", default="reconstructor.db", help="database file in db/")
    p.add_argument("--prefix", default="$(P)$(R)", help="prefix shown in the table")
    p.add_argument("--update", metavar="README", help="rewrite the generated tables in this file instead")
    p.set_defaults(func=_cmd_pvtable)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
