"""Bluesky devices and plans for the reconstructor and the simulated detector (ophyd-async over PVA).

Needs the ``bluesky`` extra.  The names live in :mod:`._devices`."""

from ptychostream.bluesky._devices import (
    InputNotConnected,
    ModelLoadError,
    PtychoReconstructor,
    ScanTimeout,
    SimDetector,
    attr_name,
    live_ptycho_scan,
    read_mosaic,
    signals_from_db,
    swap_model,
    wait_drained,
)

__all__ = ['InputNotConnected', 'ModelLoadError', 'PtychoReconstructor', 'ScanTimeout', 'SimDetector', 'attr_name', 'live_ptycho_scan', 'read_mosaic', 'signals_from_db', 'swap_model', 'wait_drained']
