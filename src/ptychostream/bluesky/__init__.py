"""Bluesky devices and plans for the reconstructor and the simulated detector (ophyd-async over PVA).

Needs the ``bluesky`` extra. The names live in :mod:`._devices` (one device per IOC, built from
db/), :mod:`._detector` (the two as one ophyd-async StandardDetector writing the HDF5 record) and
:mod:`._documents` (reading the stream documents back); the classic-ophyd (CA) device is in
:mod:`.classic`."""

from ptychostream.bluesky._detector import (
    HDF5_MIMETYPE,
    PtychoDetector,
    PtychoMosaic,
    ptycho_fly_scan,
    ptycho_step_scan,
    record_path_provider,
)
from ptychostream.bluesky._devices import (
    InputNotConnected,
    ModelLoader,
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
from ptychostream.bluesky._documents import RunDocuments, validate_document

__all__ = ['HDF5_MIMETYPE', 'InputNotConnected', 'ModelLoadError', 'ModelLoader', 'PtychoDetector', 'PtychoMosaic',
           'PtychoReconstructor', 'RunDocuments', 'ScanTimeout', 'SimDetector', 'attr_name', 'live_ptycho_scan',
           'ptycho_fly_scan', 'ptycho_step_scan', 'read_mosaic', 'record_path_provider', 'signals_from_db',
           'swap_model', 'validate_document', 'wait_drained']
