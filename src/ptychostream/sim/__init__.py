"""Simulated far-field ptychography: objects, probes, scans, the forward model and replay files.

Conventions: positions are metres, (N, 2) ordered (y, x), relative to the object's centre pixel
(H // 2, W // 2), x along columns and y along rows; objects are complex64 transmissions
A·exp(iφ) with A ≤ 1 on the geometry's real-space pixel λz/(Np); frames are |F{P·O}|² with an
orthonormal FFT, fftshift-centred.  See :mod:`.forward` for details.
"""

from ptychostream.sim.forward import (
    DTYPES,
    Geometry,
    Simulator,
    centred,
    extract_patches,
    far_field,
    unshifted,
)
from ptychostream.sim.objects import OBJECT_KINDS, fit_object, load_object, make_object
from ptychostream.sim.probes import PROBE_KINDS, load_probe, make_probe
from ptychostream.sim.replay import (
    ReplayData,
    load_frames,
    read_truth_h5,
    write_truth_h5,
)
from ptychostream.sim.scans import SCAN_PATTERNS, scan_extent_px, scan_positions

__all__ = [
    "DTYPES", "OBJECT_KINDS", "PROBE_KINDS", "SCAN_PATTERNS", "Geometry", "ReplayData", "Simulator",
    "centred", "extract_patches", "far_field", "fit_object", "load_frames", "load_object", "load_probe",
    "make_object", "make_probe", "read_truth_h5", "scan_extent_px", "scan_positions", "unshifted",
    "write_truth_h5",
]
