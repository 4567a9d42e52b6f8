"""``ptychostream record check FILE``: what a capture record holds, and whether its writer closed it."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from ptychostream.files.record import check_record

__all__ = ["add_record_parser", "check"]

COMPLETE, CUT, UNREADABLE = 0, 1, 2


def check(path: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the record's frames, positions, mosaic and state; 0 complete, 1 cut (not closed), 2 unreadable."""
    try:
        status = check_record(path)
    except (OSError, ValueError, KeyError) as exc:  # FileNotFoundError, FileFormatError, a damaged layout
        print(f"ptychostream record check: {exc}" if str(path) in str(exc)
              else f"ptychostream record check: {path}: {exc}", file=err or sys.stderr)
        return UNREADABLE
    print(status.describe(), file=out or sys.stdout)
    return COMPLETE if status.complete else CUT


def _cmd_check(args: argparse.Namespace) -> int:
    return check(args.file)


def add_record_parser(sub: Any) -> None:
    """Add ``record check`` to the ``ptychostream`` sub-commands."""
    p = sub.add_parser("record", help="inspect an HDF5 capture record",
                       description="Inspect the HDF5 records the IOC writes (Capture).")
    rsub = p.add_subparsers(dest="record_command", required=True)
    c = rsub.add_parser("check", help="what a record holds; exit 0 complete, 1 cut by a crash, 2 unreadable",
                        description="Print a record's frames, positions, diffraction frames and mosaic, and "
                                    "whether its writer closed it (complete) or it was cut at its last flush. "
                                    "Exit status: 0 complete, 1 cut, 2 unreadable.")
    c.add_argument("file", help="HDF5 record written by the IOC (Capture)")
    c.set_defaults(func=_cmd_check)
